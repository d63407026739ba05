//! A hand-driven vhost-user-blk front-end over shared memory, for what libblkio and QEMU
//! never do: write malformed descriptor chains, and pull guest memory away under the
//! daemon (shrink the memfd that backs it).
//!
//! Used by `vhost_bad_input.rs`, `vhost_guest_memory.rs`, the attacker suite and `nvmux
//! bench --hostile`.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size of [`Guest::setup`].
pub const MEM: usize = 1 << 20;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
/// Where [`request`] puts its header, status byte and data.
pub const HDR: u64 = 0x3000;
pub const STATUS: u64 = 0x8000;
pub const DATA: u64 = 0x10000;

/// How to set the front-end up.
#[derive(Clone, Copy, Debug)]
pub struct GuestOpts {
    /// Bytes of guest memory (one region at guest address 0).
    pub mem: usize,
    /// Size of the memfd, if it should differ from `mem` (a region larger than its file).
    pub file_size: Option<u64>,
    /// Create the memfd with MFD_ALLOW_SEALING and seal it against shrinking (as QEMU's
    /// memory-backend-memfd does by default).
    pub seal: bool,
    /// Negotiate REPLY_ACK, so that a refused message returns an error here.
    pub reply_ack: bool,
    /// Negotiate CONFIGURE_MEM_SLOTS (ADD_MEM_REGION / REMOVE_MEM_REGION).
    pub mem_slots: bool,
}

impl Default for GuestOpts {
    fn default() -> Self {
        GuestOpts {
            mem: MEM,
            file_size: None,
            seal: false,
            reply_ack: false,
            mem_slots: false,
        }
    }
}

/// Guest memory: a shared memfd mapped here, guest physical address 0, one virtqueue.
pub struct Guest {
    pub ptr: *mut u8,
    pub fd: std::fs::File,
    pub mem: usize,
    pub next_avail: u16,
    pub kick: EventFd,
    pub call: EventFd,
    pub front: Frontend,
}

impl Guest {
    pub fn w<T: Copy>(&self, gpa: u64, v: T) {
        assert!(gpa as usize + std::mem::size_of::<T>() <= self.mem);
        // SAFETY: in bounds of our own shared mapping (checked above).
        unsafe { std::ptr::write_volatile(self.ptr.add(gpa as usize) as *mut T, v) }
    }
    pub fn r<T: Copy>(&self, gpa: u64) -> T {
        assert!(gpa as usize + std::mem::size_of::<T>() <= self.mem);
        // SAFETY: in bounds of our own shared mapping (checked above).
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize) as *const T) }
    }
    pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = DESC + i as u64 * 16;
        self.w(d, addr);
        self.w(d + 8, len);
        self.w(d + 12, flags);
        self.w(d + 14, next);
    }
    pub fn header(&self, gpa: u64, rtype: u32, sector: u64) {
        self.w(gpa, rtype);
        self.w(gpa + 4, 0u32);
        self.w(gpa + 8, sector);
    }
    /// Make chain `head` available (no kick).
    pub fn publish(&mut self, head: u16) {
        let slot = self.next_avail % QSIZE;
        self.w(AVAIL + 4 + slot as u64 * 2, head);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.w(AVAIL + 2, self.next_avail);
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    /// Wait until the device used everything published; false after `timeout`.
    pub fn wait_used(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while self.r::<u16>(USED + 2) != self.next_avail {
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }
    /// Make chain `head` available and kick; wait until the device used it.
    /// Returns the used length.
    pub fn submit(&mut self, head: u16) -> u32 {
        self.publish(head);
        self.kick.write(1).expect("kick");
        assert!(
            self.wait_used(Duration::from_secs(10)),
            "device did not complete chain {head}"
        );
        let e = USED + 4 + ((self.next_avail.wrapping_sub(1)) % QSIZE) as u64 * 8;
        assert_eq!(self.r::<u32>(e), head as u32, "used ring names the chain");
        self.r::<u32>(e + 4)
    }

    /// Shrink (or grow) the memfd behind guest memory, as a hostile front-end would.
    /// Our own mapping loses the same pages: touch nothing past `len` afterwards.
    pub fn resize_memory(&self, len: u64) -> std::io::Result<()> {
        self.fd.set_len(len)
    }

    /// Set a device up on `sock`: memory table, one queue of QSIZE entries, started.
    pub fn setup(sock: &Path) -> Guest {
        Self::setup_with(sock, GuestOpts::default()).expect("vhost-user setup")
    }

    /// Like [`setup`](Self::setup); `Err` names the step the daemon refused.
    pub fn setup_with(sock: &Path, o: GuestOpts) -> Result<Guest, String> {
        let flags = if o.seal { libc::MFD_ALLOW_SEALING } else { 0 } | libc::MFD_CLOEXEC;
        // SAFETY: memfd_create with a valid C string; result checked.
        let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), flags) };
        assert!(raw >= 0);
        // SAFETY: raw is a fresh fd we own.
        let fd: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
        let file_size = o.file_size.unwrap_or(o.mem as u64);
        fd.set_len(file_size).expect("size guest memory");
        if o.seal {
            // SAFETY: fcntl on our memfd.
            let r = unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(r, 0, "seal the guest memfd");
        }
        // Map no more than the file has (a region larger than its file is the test).
        let map_len = o.mem.min(file_size as usize);
        // SAFETY: mapping our own memfd shared; result checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let ptr = ptr as *mut u8;
        let step = |what: &str, e: vhost::Error| format!("{what}: {e}");
        let mut f = Frontend::connect(sock, 1).map_err(|e| step("connect", e))?;
        f.set_owner().map_err(|e| step("set_owner", e))?;
        let feats = f.get_features().map_err(|e| step("get_features", e))?;
        f.set_features(feats & ((1 << 32) | (1 << 30)))
            .map_err(|e| step("set_features", e))?;
        let pf = f
            .get_protocol_features()
            .map_err(|e| step("get_protocol_features", e))?;
        let mut want = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
        if o.reply_ack {
            want |= VhostUserProtocolFeatures::REPLY_ACK;
        }
        if o.mem_slots {
            want |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        }
        f.set_protocol_features(pf & want)
            .map_err(|e| step("set_protocol_features", e))?;
        if o.reply_ack {
            // Ask for an ack of every message from here on.
            f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let mut g = Guest {
            ptr,
            fd,
            mem: map_len,
            next_avail: 0,
            kick: EventFd::new(0).expect("eventfd"),
            call: EventFd::new(0).expect("eventfd"),
            front: f,
        };
        let ua = ptr as u64;
        let f = &mut g;
        f.front
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: o.mem as u64,
                userspace_addr: ua,
                mmap_offset: 0,
                mmap_handle: f.fd.as_raw_fd(),
            }])
            .map_err(|e| step("set_mem_table", e))?;
        f.front
            .set_vring_num(0, QSIZE)
            .map_err(|e| step("set_vring_num", e))?;
        f.front
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: ua + DESC,
                    used_ring_addr: ua + USED,
                    avail_ring_addr: ua + AVAIL,
                    log_addr: None,
                },
            )
            .map_err(|e| step("set_vring_addr", e))?;
        f.front
            .set_vring_base(0, 0)
            .map_err(|e| step("set_vring_base", e))?;
        f.front
            .set_vring_call(0, &f.call)
            .map_err(|e| step("set_vring_call", e))?;
        f.front
            .set_vring_kick(0, &f.kick)
            .map_err(|e| step("set_vring_kick", e))?;
        f.front
            .set_vring_enable(0, true)
            .map_err(|e| step("set_vring_enable", e))?;
        Ok(g)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mapped in setup.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.mem) };
    }
}

/// A three-descriptor request: header, data, status. Returns (used length, status byte).
pub fn request(g: &mut Guest, rtype: u32, data_addr: u64, data_len: u32) -> (u32, u8) {
    g.header(HDR, rtype, 0);
    g.w(STATUS, 0xaau8);
    let dflags = if rtype == 0 || rtype == 8 { F_WRITE } else { 0 } | F_NEXT;
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, data_addr, data_len, dflags, 2);
    g.desc(2, STATUS, 1, F_WRITE, 0);
    let used = g.submit(0);
    (used, g.r::<u8>(STATUS))
}

/// A memfd of `len` bytes (unsealed), for extra memory regions.
pub fn memfd(len: u64) -> std::fs::File {
    // SAFETY: memfd_create with a valid C string; result checked.
    let raw = unsafe { libc::memfd_create(c"guest-extra".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: raw is a fresh fd we own.
    let f: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    f.set_len(len).expect("size memfd");
    f
}
