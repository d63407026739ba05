//! The external-function protocol, version 1: the messages on the Unix socket and the
//! layout of a shared-memory ring. Both sides (the daemon's router and this SDK) use
//! these definitions; `docs/external-functions.md` describes them byte by byte.
//!
//! ```text
//!  function process                       nvmux daemon (router)
//!  connect(socket) ─── Hello ───────────►  accept; one function per disk
//!                  ◄── Welcome ──────────  disk geometry, ring depth, max I/O
//!                  ◄── AddRing + fds ────  per disk queue, when it first routes to the
//!                                          function: memfd, SQ eventfd, CQ eventfd
//!  poll SQ ◄────────── SQE (+ write data) ─ command routed here
//!  handle, post CQE ─► CQ (+ read data) ───► completion; classifier hook or the guest
//!  write CQ eventfd ─────────────────────►  wakes the worker
//!                  ◄── RemoveRing ───────  the disk queue closed
//!  exit or crash: socket EOF ───────────►  in-flight commands fail or fall back
//! ```

use std::sync::atomic::{AtomicU32, Ordering};

/// "NVXF": first word of every socket message.
pub const MAGIC: u32 = 0x4658_564e;
/// "NVXR": first word of a ring.
pub const RING_MAGIC: u32 = 0x5258_564e;
pub const VERSION: u16 = 1;
/// Every socket message is this long.
pub const MSG_SIZE: usize = 64;

/// Message kinds (word 1 of daemon → function messages after the welcome).
pub const MSG_ADD_RING: u32 = 1;
pub const MSG_REMOVE_RING: u32 = 2;

/// Welcome status.
pub const WELCOME_OK: u16 = 0;
/// Another process is attached to this disk.
pub const WELCOME_BUSY: u16 = 1;
/// The daemon does not speak the version asked for.
pub const WELCOME_VERSION: u16 = 2;

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
fn get16(b: &[u8; MSG_SIZE], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn get32(b: &[u8; MSG_SIZE], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn get64(b: &[u8; MSG_SIZE], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn name_field(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Function → daemon, first message: `magic u32, version u16, flags u16, name [u8; 56]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// The function's name, for logs and the API (at most 56 bytes).
    pub name: String,
}

impl Hello {
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        put32(&mut b, 0, MAGIC);
        put16(&mut b, 4, self.version);
        let n = self.name.as_bytes();
        let l = n.len().min(56);
        b[8..8 + l].copy_from_slice(&n[..l]);
        b
    }
    pub fn decode(b: &[u8; MSG_SIZE]) -> Option<Hello> {
        (get32(b, 0) == MAGIC).then(|| Hello {
            version: get16(b, 4),
            name: name_field(&b[8..]),
        })
    }
}

/// Daemon → function, the answer to `Hello`: `magic u32, version u16, status u16,
/// block_size u32, depth u32, num_blocks u64, max_io u32, reserved u32, disk [u8; 32]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub status: u16,
    pub block_size: u32,
    /// Entries per ring.
    pub depth: u32,
    pub num_blocks: u64,
    /// Bytes of data a command can carry (the ring's data slot size).
    pub max_io: u32,
    pub disk: String,
}

impl Welcome {
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        put32(&mut b, 0, MAGIC);
        put16(&mut b, 4, self.version);
        put16(&mut b, 6, self.status);
        put32(&mut b, 8, self.block_size);
        put32(&mut b, 12, self.depth);
        put64(&mut b, 16, self.num_blocks);
        put32(&mut b, 24, self.max_io);
        let n = self.disk.as_bytes();
        let l = n.len().min(32);
        b[32..32 + l].copy_from_slice(&n[..l]);
        b
    }
    pub fn decode(b: &[u8; MSG_SIZE]) -> Option<Welcome> {
        (get32(b, 0) == MAGIC).then(|| Welcome {
            version: get16(b, 4),
            status: get16(b, 6),
            block_size: get32(b, 8),
            depth: get32(b, 12),
            num_blocks: get64(b, 16),
            max_io: get32(b, 24),
            disk: name_field(&b[32..]),
        })
    }
}

/// Daemon → function after the welcome: `magic u32, kind u32, ring u32, depth u32,
/// size u64, slot_size u32`. `MSG_ADD_RING` carries three descriptors (SCM_RIGHTS): the
/// ring's memfd (`size` bytes), the SQ eventfd (the daemon writes it when the function
/// asked to be woken) and the CQ eventfd (the function writes it after posting
/// completions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingMsg {
    pub kind: u32,
    pub ring: u32,
    pub depth: u32,
    pub size: u64,
    pub slot_size: u32,
}

impl RingMsg {
    pub fn encode(&self) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.kind);
        put32(&mut b, 8, self.ring);
        put32(&mut b, 12, self.depth);
        put64(&mut b, 16, self.size);
        put32(&mut b, 24, self.slot_size);
        b
    }
    pub fn decode(b: &[u8; MSG_SIZE]) -> Option<RingMsg> {
        (get32(b, 0) == MAGIC).then(|| RingMsg {
            kind: get32(b, 4),
            ring: get32(b, 8),
            depth: get32(b, 12),
            size: get64(b, 16),
            slot_size: get32(b, 24),
        })
    }
}

/// Ring header offsets. Each index lives on its own 64-byte line; the indices run free
/// (u32, wrapping) and an entry's position is `index % depth`.
pub mod hdr {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const DEPTH: usize = 8;
    pub const SLOT_SIZE: usize = 12;
    pub const SQ_OFF: usize = 16;
    pub const CQ_OFF: usize = 24;
    pub const DATA_OFF: usize = 32;
    pub const SIZE: usize = 40;
    /// Written by the daemon: SQ entries below this index are published.
    pub const SQ_TAIL: usize = 64;
    /// Written by the function: SQ entries below this index were taken (informational).
    pub const SQ_HEAD: usize = 128;
    /// Written by the function: CQ entries below this index are published.
    pub const CQ_TAIL: usize = 192;
    /// Written by the daemon: CQ entries below this index were consumed.
    pub const CQ_HEAD: usize = 256;
    /// Written by the function: `FN_NEED_WAKEUP` while it sleeps.
    pub const FN_FLAGS: usize = 320;
}

/// `hdr::FN_FLAGS`: the function sleeps; write the SQ eventfd after publishing entries.
pub const FN_NEED_WAKEUP: u32 = 1;

/// Bytes of one SQ entry.
pub const SQE_SIZE: usize = 64;
/// Bytes of one CQ entry.
pub const CQE_SIZE: usize = 16;
/// Largest ring depth.
pub const MAX_DEPTH: u32 = 1024;
/// Largest data slot (one command's data).
pub const MAX_SLOT: u32 = 32 << 20;

/// `Sqe::flags`: force unit access.
pub const SQE_FUA: u8 = 1;

/// A command for the function: `id u16, opcode u8, flags u8, nsid u32, slba u64, nlb u32,
/// data_len u32, cookie u64`, then 32 reserved bytes. Its data is in slot `id` of the data
/// area (write data on submission; read data on completion).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub id: u16,
    pub opcode: u8,
    pub flags: u8,
    pub nsid: u32,
    pub slba: u64,
    pub nlb: u32,
    pub data_len: u32,
    pub cookie: u64,
}

/// A completion: `id u16, status u16 ((SCT << 8) | SC), flags u32, cookie u64`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    pub id: u16,
    pub status: u16,
    pub flags: u32,
    /// Returned to the classifier's completion hook as `ctx->cookie`.
    pub cookie: u64,
}

/// Where the parts of a ring are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub depth: u32,
    pub slot_size: u32,
    pub sq_off: usize,
    pub cq_off: usize,
    pub data_off: usize,
    pub size: usize,
}

impl Layout {
    /// The layout for `depth` entries (a power of two up to `MAX_DEPTH`) of up to
    /// `slot_size` bytes (a multiple of 4096 up to `MAX_SLOT`).
    pub fn new(depth: u32, slot_size: u32) -> Option<Layout> {
        if !depth.is_power_of_two()
            || depth > MAX_DEPTH
            || slot_size == 0
            || slot_size > MAX_SLOT
            || !slot_size.is_multiple_of(4096)
        {
            return None;
        }
        let sq_off = 4096;
        let cq_off = sq_off + depth as usize * SQE_SIZE;
        let data_off = (cq_off + depth as usize * CQE_SIZE).next_multiple_of(4096);
        let size = data_off + depth as usize * slot_size as usize;
        Some(Layout {
            depth,
            slot_size,
            sq_off,
            cq_off,
            data_off,
            size,
        })
    }
}

/// A mapped ring, as either side sees it. All accesses go through this view, which
/// bounds every position by the layout; values read from the other side are data, not
/// trusted offsets.
pub struct RingView {
    base: *mut u8,
    pub layout: Layout,
}

// SAFETY: the view only carries the mapping's address; accesses are atomic for indices
// and plain copies for entries and data, which the protocol hands over with release and
// acquire stores of the indices.
unsafe impl Send for RingView {}

impl RingView {
    /// # Safety
    /// `base` must point to a mapping of at least `layout.size` bytes that stays mapped
    /// while the view is used.
    pub unsafe fn new(base: *mut u8, layout: Layout) -> RingView {
        RingView { base, layout }
    }

    fn atomic(&self, off: usize) -> &AtomicU32 {
        // SAFETY: header offsets are below 4096 <= size, 4-byte aligned, in our mapping.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    pub fn load(&self, off: usize) -> u32 {
        self.atomic(off).load(Ordering::Acquire)
    }

    pub fn store(&self, off: usize, v: u32) {
        self.atomic(off).store(v, Ordering::Release)
    }

    /// Write the header (the daemon does, once, before handing the ring over).
    pub fn init_header(&self) {
        let l = self.layout;
        for (off, v) in [
            (hdr::MAGIC, RING_MAGIC),
            (hdr::VERSION, VERSION as u32),
            (hdr::DEPTH, l.depth),
            (hdr::SLOT_SIZE, l.slot_size),
        ] {
            self.store(off, v);
        }
        for (off, v) in [
            (hdr::SQ_OFF, l.sq_off),
            (hdr::CQ_OFF, l.cq_off),
            (hdr::DATA_OFF, l.data_off),
            (hdr::SIZE, l.size),
        ] {
            self.store(off, v as u32);
            self.store(off + 4, (v as u64 >> 32) as u32);
        }
    }

    /// True if the header a mapping holds describes `layout`.
    pub fn header_matches(&self) -> bool {
        let l = self.layout;
        self.load(hdr::MAGIC) == RING_MAGIC
            && self.load(hdr::VERSION) == VERSION as u32
            && self.load(hdr::DEPTH) == l.depth
            && self.load(hdr::SLOT_SIZE) == l.slot_size
            && self.load(hdr::DATA_OFF) as usize == l.data_off
    }

    fn entry(&self, base: usize, size: usize, index: u32) -> *mut u8 {
        let i = (index % self.layout.depth) as usize;
        // SAFETY: base + i * size + size <= data_off <= the mapping's size (Layout::new).
        unsafe { self.base.add(base + i * size) }
    }

    pub fn write_sqe(&self, index: u32, e: &Sqe) {
        let mut b = [0u8; SQE_SIZE];
        put16(&mut b, 0, e.id);
        b[2] = e.opcode;
        b[3] = e.flags;
        put32(&mut b, 4, e.nsid);
        put64(&mut b, 8, e.slba);
        put32(&mut b, 16, e.nlb);
        put32(&mut b, 20, e.data_len);
        put64(&mut b, 24, e.cookie);
        // SAFETY: the entry is SQE_SIZE bytes inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b.as_ptr(),
                self.entry(self.layout.sq_off, SQE_SIZE, index),
                SQE_SIZE,
            )
        };
    }

    pub fn read_sqe(&self, index: u32) -> Sqe {
        let mut b = [0u8; MSG_SIZE];
        // SAFETY: the entry is SQE_SIZE (= MSG_SIZE) bytes inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.entry(self.layout.sq_off, SQE_SIZE, index),
                b.as_mut_ptr(),
                SQE_SIZE,
            )
        };
        Sqe {
            id: get16(&b, 0),
            opcode: b[2],
            flags: b[3],
            nsid: get32(&b, 4),
            slba: get64(&b, 8),
            nlb: get32(&b, 16),
            data_len: get32(&b, 20),
            cookie: get64(&b, 24),
        }
    }

    pub fn write_cqe(&self, index: u32, e: &Cqe) {
        let mut b = [0u8; CQE_SIZE];
        put16(&mut b, 0, e.id);
        put16(&mut b, 2, e.status);
        put32(&mut b, 4, e.flags);
        put64(&mut b, 8, e.cookie);
        // SAFETY: the entry is CQE_SIZE bytes inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                b.as_ptr(),
                self.entry(self.layout.cq_off, CQE_SIZE, index),
                CQE_SIZE,
            )
        };
    }

    pub fn read_cqe(&self, index: u32) -> Cqe {
        let mut b = [0u8; MSG_SIZE];
        // SAFETY: the entry is CQE_SIZE bytes inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.entry(self.layout.cq_off, CQE_SIZE, index),
                b.as_mut_ptr(),
                CQE_SIZE,
            )
        };
        Cqe {
            id: get16(&b, 0),
            status: get16(&b, 2),
            flags: get32(&b, 4),
            cookie: get64(&b, 8),
        }
    }

    /// Data slot `id` (`id < depth`), `slot_size` bytes.
    pub fn slot(&self, id: u16) -> Option<*mut u8> {
        if id as u32 >= self.layout.depth {
            return None;
        }
        // SAFETY: data_off + (id + 1) * slot_size <= size.
        Some(unsafe {
            self.base
                .add(self.layout.data_off + id as usize * self.layout.slot_size as usize)
        })
    }
}

/// A ring's memfd mapped shared, read-write: the view both sides use, unmapped on drop.
pub struct MappedRing {
    base: *mut libc::c_void,
    pub view: RingView,
}

// SAFETY: the mapping is owned by this value; see RingView.
unsafe impl Send for MappedRing {}

impl MappedRing {
    /// Map `layout.size` bytes of the memfd `fd`.
    pub fn map(fd: std::os::fd::RawFd, layout: Layout) -> std::io::Result<MappedRing> {
        // SAFETY: a shared mapping of a descriptor the caller holds; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the mapping is layout.size bytes and lives as long as the MappedRing.
        let view = unsafe { RingView::new(base.cast(), layout) };
        Ok(MappedRing { base, view })
    }
}

impl Drop for MappedRing {
    fn drop(&mut self) {
        // SAFETY: our mapping of layout.size bytes; the view goes with it.
        unsafe { libc::munmap(self.base, self.view.layout.size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let h = Hello {
            version: VERSION,
            name: "audit".into(),
        };
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        let w = Welcome {
            version: 1,
            status: WELCOME_OK,
            block_size: 512,
            depth: 64,
            num_blocks: 1 << 30,
            max_io: 1 << 20,
            disk: "vm1".into(),
        };
        assert_eq!(Welcome::decode(&w.encode()), Some(w));
        let r = RingMsg {
            kind: MSG_ADD_RING,
            ring: 3,
            depth: 64,
            size: 4 << 20,
            slot_size: 65536,
        };
        assert_eq!(RingMsg::decode(&r.encode()), Some(r));
        assert_eq!(Hello::decode(&[0u8; MSG_SIZE]), None);
    }

    #[test]
    fn ring_entries() {
        let l = Layout::new(8, 4096).unwrap();
        assert!(Layout::new(6, 4096).is_none());
        assert!(Layout::new(8, 100).is_none());
        let mut mem = vec![0u64; l.size / 8];
        // SAFETY: `mem` is l.size bytes and outlives the view.
        let v = unsafe { RingView::new(mem.as_mut_ptr().cast(), l) };
        v.init_header();
        assert!(v.header_matches());
        let s = Sqe {
            id: 5,
            opcode: 1,
            flags: SQE_FUA,
            nsid: 1,
            slba: 77,
            nlb: 8,
            data_len: 4096,
            cookie: 9,
        };
        v.write_sqe(13, &s);
        assert_eq!(v.read_sqe(5), s);
        let c = Cqe {
            id: 5,
            status: 0x182,
            flags: 0,
            cookie: 3,
        };
        v.write_cqe(9, &c);
        assert_eq!(v.read_cqe(1), c);
        assert!(v.slot(8).is_none());
        assert!(v.slot(7).is_some());
    }
}
