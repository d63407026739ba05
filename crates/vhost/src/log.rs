//! Dirty page logging for live migration (VHOST_F_LOG_ALL, VHOST_USER_PROTOCOL_F_LOG_SHMFD,
//! SET_LOG_BASE).
//!
//! While a VM migrates, QEMU copies its memory to the destination over and over and asks
//! every device which guest pages it wrote since the last round. A vhost-user back-end
//! answers through a bitmap QEMU shares (SET_LOG_BASE: a file descriptor, a size and an
//! offset): one bit per 4 KiB guest page, bit `p % 8` of byte `p / 8` for the page at guest
//! address `p * 4096`. The back-end sets bits with an atomic OR; QEMU clears them with an
//! atomic exchange when it reads them. Logging is on while the front-end has acked
//! VHOST_F_LOG_ALL (feature bit 26): SET_FEATURES turns it on and off while the rings run.
//!
//! What this device writes into guest memory, and so marks, after the write and before
//! the used entry that hands it to the driver is published:
//! - the payload of a read or GET_ID request (io_uring writes read data straight into guest
//!   memory, so the ranges are recorded when the request is parsed, see [`record_writes`],
//!   and marked when it completes, whatever its status: a failed read may have written
//!   part of its buffers);
//! - the status byte;
//! - the used ring: entries, `used->idx`, `used->flags` and `avail_event`, through the log
//!   address SET_VRING_ADDR gives with VHOST_VRING_F_LOG (the whole used ring, at most
//!   three pages, is marked per batch: cheaper than working out which of its pages moved).
//!
//! Changes reach the workers through [`LogSlot`] plus a per-queue epoch: the control thread
//! publishes the new state, bumps each running queue's `log_epoch` and waits (bounded)
//! until the worker acknowledges it at the start of a poll. So when SET_FEATURES,
//! SET_LOG_BASE or SET_VRING_ADDR is answered, every later completion uses the new log
//! (QEMU reads and frees an old log right after replacing it). Marking allocates nothing.
//!
//! The log file is the front-end's: [`LogMap::map`] checks size and offset against the file
//! and a bound before mapping anything, and registers the mapping with the SIGBUS recovery
//! like guest memory (`mem.rs`), so a front-end that shrinks the file under us breaks only
//! its own migration (counted and logged), never the daemon.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use nvmux_core::sigbus;

use crate::blk::Seg;
use crate::mem::MAX_TABLE_BYTES;

/// The virtio/vhost feature bit: log every write to guest memory.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Bytes of guest memory per log bit.
pub const LOG_PAGE: u64 = 4096;
/// The largest log accepted: one bit per page of the largest memory table (16 TiB of guest
/// memory: 512 MiB of bitmap).
pub const MAX_LOG_BYTES: u64 = MAX_TABLE_BYTES / LOG_PAGE / 8;
/// Write ranges recorded per request: the payload's segments (at most
/// `blk::MAX_SEGMENTS`) plus the status byte. A request never needs more; past this the
/// last range is widened instead (over-marking is harmless), so nothing grows unbounded.
pub const MAX_WRITE_RANGES: usize = crate::blk::MAX_SEGMENTS + 1;

/// Why a log was refused (the message goes to the daemon's log; the front-end loses its
/// connection).
pub type Refusal = String;

/// A mapped dirty log.
pub(crate) struct LogMap {
    /// Declared first: unregistered before the mapping goes (see `Drop`).
    reg: Option<sigbus::Registration>,
    /// The mapping (from file offset 0) and its length.
    base: *mut u8,
    map_len: usize,
    /// The bitmap: `bits` bytes at `base + offset`.
    bits: *mut u8,
    len: u64,
    /// Marks that fell past the end of the log (a log smaller than guest memory).
    pub beyond: AtomicU64,
    /// The fault was reported (once per log).
    reported: AtomicBool,
}

// SAFETY: the pointers refer to a shared mapping owned by this struct for its whole life;
// every access to the bitmap is atomic.
unsafe impl Send for LogMap {}
// SAFETY: as above: concurrent markers only use atomic read-modify-write operations.
unsafe impl Sync for LogMap {}

impl Drop for LogMap {
    fn drop(&mut self) {
        // Unregister before unmapping (a recovered SIGBUS must never replace a range that
        // is no longer ours).
        drop(self.reg.take());
        // SAFETY: `base`/`map_len` is the mapping made in `map`, unmapped only here.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

/// Check a log's size and offset against its file and [`MAX_LOG_BYTES`] (nothing mapped).
pub fn check_log(size: u64, offset: u64, file: &File) -> Result<u64, Refusal> {
    if size == 0 {
        return Err("a dirty log of size 0".into());
    }
    if size > MAX_LOG_BYTES {
        return Err(format!(
            "a dirty log of {size:#x} bytes (at most {MAX_LOG_BYTES:#x}: one bit per 4 KiB page of {MAX_TABLE_BYTES:#x} bytes of guest memory)"
        ));
    }
    if offset > MAX_LOG_BYTES {
        return Err(format!(
            "a dirty log at offset {offset:#x} of its file (at most {MAX_LOG_BYTES:#x})"
        ));
    }
    let end = offset + size; // both bounded above: no overflow
                             // SAFETY: fstat writes a stat struct for a descriptor we hold.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(file.as_raw_fd(), &mut st) != 0 {
            return Err(format!(
                "fstat of the dirty log's descriptor: {}",
                std::io::Error::last_os_error()
            ));
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!(
            "the dirty log's descriptor is not a regular file (mode {:#o}); it must be a memfd or a tmpfs file",
            st.st_mode
        ));
    }
    let file_size = st.st_size.max(0) as u64;
    if end > file_size {
        return Err(format!(
            "dirty log [{offset:#x}, {end:#x}) reaches past the end of its file ({file_size:#x} bytes)"
        ));
    }
    Ok(end)
}

impl LogMap {
    /// Map a log the front-end handed over (SET_LOG_BASE), after [`check_log`].
    pub fn map(size: u64, offset: u64, file: &File) -> Result<LogMap, Refusal> {
        let end = check_log(size, offset, file)?;
        let map_len = end as usize; // at most 2 * MAX_LOG_BYTES: fits
                                    // Mapped from offset 0 of the file: mmap wants a page-aligned offset, and the
                                    // front-end's offset need not be one.
                                    // SAFETY: a fresh shared mapping of a file we hold; the kernel picks the address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(format!(
                "mmap of the dirty log ({map_len:#x} bytes): {}",
                std::io::Error::last_os_error()
            ));
        }
        let base = base.cast::<u8>();
        let mut m = LogMap {
            reg: None,
            base,
            map_len,
            // SAFETY: offset + size <= map_len (checked): inside the mapping.
            bits: unsafe { base.add(offset as usize) },
            len: size,
            beyond: AtomicU64::new(0),
            reported: AtomicBool::new(false),
        };
        // The front-end may shrink the file later: a recovered SIGBUS turns the pages into
        // anonymous zero pages and raises the flag (checked by `faulted`).
        // SAFETY: `base` is our fresh page-aligned mapping of `map_len` bytes; it stays
        // mapped until `reg` is dropped (first thing in Drop). On error `m` unmaps it.
        let reg = unsafe { sigbus::register(base, map_len, Arc::new(AtomicBool::new(false))) }
            .map_err(|e| format!("dirty log: {e}"))?;
        m.reg = Some(reg);
        Ok(m)
    }

    /// Bytes of bitmap (the log covers `len * 8` pages).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The front-end shrank the log's file under us: marks since went nowhere.
    pub fn faulted(&self) -> bool {
        self.reg.as_ref().is_some_and(|r| r.faulted())
    }

    /// True the first time it is called after a fault (log and count once).
    pub fn take_report(&self) -> bool {
        self.faulted() && !self.reported.swap(true, Ordering::AcqRel)
    }

    /// Mark the pages of `len` bytes at guest address `gpa` dirty. Pages past the end of the
    /// log are counted in `beyond`, not marked.
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let pages = self.len * 8;
        if last >= pages {
            self.beyond.fetch_add(1, Ordering::Relaxed);
            if first >= pages {
                return;
            }
        }
        let last = last.min(pages - 1);
        let mut byte = first / 8;
        while byte <= last / 8 {
            let lo = if byte == first / 8 { first % 8 } else { 0 };
            let hi = if byte == last / 8 { last % 8 } else { 7 };
            let mask = ((0xffu16 << lo) & (0xffu16 >> (7 - hi))) as u8;
            // SAFETY: byte <= (pages - 1) / 8 < self.len: inside the bitmap, which is
            // mapped while `self` lives; AtomicU8 has the alignment of u8.
            let cell = unsafe { &*(self.bits.add(byte as usize) as *const AtomicU8) };
            cell.fetch_or(mask, Ordering::SeqCst);
            byte += 1;
        }
    }

    /// Mark every range of a request (see [`record_writes`]).
    pub fn mark_ranges(&self, ranges: &[(u64, u64)]) {
        for &(gpa, len) in ranges {
            self.mark(gpa, len);
        }
    }

    /// Mark a used ring of `size` entries at `gpa` (flags, idx, ring, avail_event).
    pub fn mark_used_ring(&self, gpa: u64, size: u16) {
        self.mark(gpa, 6 + 8 * size as u64);
    }
}

/// Record the guest ranges the device may write for one request: the first `payload`
/// bytes of the writable part of the chain (read data, GET_ID), and the status byte, the
/// last writable byte. `payload` is what `blk::parse` accepted (`used_len - 1`), so these
/// bytes were bounds-checked; adjacent ranges are merged. `out` keeps its capacity between
/// requests (no allocation once it has grown) and never holds more than
/// [`MAX_WRITE_RANGES`].
pub fn record_writes(segs: &[Seg], payload: u64, out: &mut Vec<(u64, u64)>) {
    out.clear();
    let mut need = payload;
    for s in segs.iter().filter(|s| s.write && s.len > 0) {
        if need == 0 {
            break;
        }
        let n = (s.len as u64).min(need);
        push_range(out, s.addr, n);
        need -= n;
    }
    if let Some(last) = segs.iter().rev().find(|s| s.write && s.len > 0) {
        push_range(out, last.addr.saturating_add(last.len as u64 - 1), 1);
    }
}

fn push_range(out: &mut Vec<(u64, u64)>, gpa: u64, len: u64) {
    let full = out.len() >= MAX_WRITE_RANGES;
    if let Some(prev) = out.last_mut() {
        let prev_end = prev.0.saturating_add(prev.1);
        if prev_end == gpa || full {
            // Adjacent: merge. Full (unreachable for a request `blk::parse` accepted):
            // widen the last range over the new one rather than grow (over-marking is
            // harmless).
            let start = prev.0.min(gpa);
            let end = prev_end.max(gpa.saturating_add(len));
            *prev = (start, end - start);
            return;
        }
    }
    out.push((gpa, len));
}

/// The log a connection's queues mark: present while VHOST_F_LOG_ALL is acked and a log
/// base is set. Written by the control thread, read by a worker only when its queue's
/// log epoch moved.
#[derive(Default)]
pub(crate) struct LogSlot {
    cur: Mutex<Option<Arc<LogMap>>>,
}

impl LogSlot {
    pub fn load(&self) -> Option<Arc<LogMap>> {
        self.cur.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn store(&self, m: Option<Arc<LogMap>>) {
        let old = std::mem::replace(&mut *self.cur.lock().unwrap_or_else(|e| e.into_inner()), m);
        drop(old);
    }
}

/// Export-wide dirty-log counters, shown in the API.
#[derive(Default)]
pub struct LogCounters {
    /// Logs mapped (SET_LOG_BASE accepted).
    pub logs_set: AtomicU64,
    /// SET_LOG_BASE refused (bad size or offset, not a file, too large).
    pub logs_refused: AtomicU64,
    /// Logs whose file shrank under the device while it marked (that migration is void).
    pub log_faults: AtomicU64,
    /// Logging (LOG_ALL acked with a log) is on now.
    pub active: AtomicBool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"vhost-log-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let f: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn bytes(f: &File, off: u64, n: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn logs_are_checked_before_mapping() {
        let f = memfd(8192);
        assert!(check_log(0, 0, &f).unwrap_err().contains("size 0"));
        assert!(check_log(8193, 0, &f).unwrap_err().contains("past the end"));
        assert!(check_log(4096, 4097, &f)
            .unwrap_err()
            .contains("past the end"));
        assert!(check_log(u64::MAX, 0, &f).unwrap_err().contains("at most"));
        assert!(check_log(8, u64::MAX - 4, &f)
            .unwrap_err()
            .contains("at most"));
        assert_eq!(check_log(4096, 4096, &f), Ok(8192));
        // A pipe has no size to check against.
        let mut p = [0; 2];
        // SAFETY: pipe writes two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors we own.
        let (r, _w): (File, File) = unsafe {
            (
                std::os::fd::FromRawFd::from_raw_fd(p[0]),
                std::os::fd::FromRawFd::from_raw_fd(p[1]),
            )
        };
        assert!(check_log(8, 0, &r)
            .unwrap_err()
            .contains("not a regular file"));
    }

    #[test]
    fn marks_set_one_bit_per_page() {
        let f = memfd(4096 + 16);
        let m = LogMap::map(16, 4096 + 3, &f).err();
        assert!(m.is_some(), "offset + size past the file is refused");
        let m = LogMap::map(16, 4096, &f).unwrap(); // 128 pages, 4096 bytes into the file
        m.mark(0, 1); // page 0
        m.mark(5 * 4096 + 4095, 2); // pages 5 and 6
        m.mark(16 * 4096, 8 * 4096); // pages 16..=23: byte 2 whole
        m.mark(127 * 4096, 4096 * 10); // page 127, the rest is beyond the log
        m.mark(200 * 4096, 1); // beyond
        let b = bytes(&f, 4096, 16);
        assert_eq!(b[0], 0b0110_0001);
        assert_eq!(b[1], 0);
        assert_eq!(b[2], 0xff);
        assert_eq!(b[15], 0x80);
        assert_eq!(b.iter().map(|x| x.count_ones()).sum::<u32>(), 1 + 2 + 8 + 1);
        assert_eq!(m.beyond.load(Ordering::Relaxed), 2);
        assert_eq!(
            bytes(&f, 0, 4096),
            vec![0u8; 4096],
            "nothing before the offset"
        );
        // The front-end shrinks the file: the device survives, the log reports its fault.
        f.set_len(0).unwrap();
        m.mark(0, 1);
        assert!(m.faulted());
        assert!(m.take_report());
        assert!(!m.take_report());
    }

    #[test]
    fn writes_are_recorded_for_payload_and_status() {
        let seg = |addr, len, write| Seg { addr, len, write };
        let chain = [
            seg(0x1000, 16, false),
            seg(0x10000, 4096, true),
            seg(0x11000, 4096, true),
            seg(0x30000, 1, true),
        ];
        let mut out = Vec::new();
        record_writes(&chain, 8192, &mut out);
        assert_eq!(out, vec![(0x10000, 8192), (0x30000, 1)]);
        // An error: only the status byte.
        record_writes(&chain, 0, &mut out);
        assert_eq!(out, vec![(0x30000, 1)]);
        // Status inside the last data descriptor: merged.
        let chain = [seg(0x1000, 16, false), seg(0x20000, 513, true)];
        record_writes(&chain, 512, &mut out);
        assert_eq!(out, vec![(0x20000, 513)]);
        // Many scattered segments never grow the list past its bound.
        let many: Vec<Seg> = (0..1000u64).map(|i| seg(i * 0x2000, 512, true)).collect();
        record_writes(&many, 1000 * 512, &mut out);
        assert!(out.len() <= MAX_WRITE_RANGES);
        let end = out.last().map(|r| r.0 + r.1).unwrap();
        assert_eq!(end, 999 * 0x2000 + 512, "the last bytes are still covered");
    }
}
