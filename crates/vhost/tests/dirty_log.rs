//! Dirty logging against a real vhost-user front-end: the `vhost` crate's frontend side
//! (as a VMM uses it) drives a real export over its Unix socket, with guest memory and the
//! dirty log in memfds, and reads the log bits the device set.
//!
//! One read request (8 KiB of data at guest pages 16–17, status byte on page 32, used
//! ring on page 2) is run three times: without VHOST_F_LOG_ALL (no bit may be set), after
//! SET_FEATURES switched LOG_ALL on while the ring runs (the data pages, the status page and
//! the used-ring page must be set, and nothing the device only reads), and after it was
//! switched off again.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::worker::{WorkerConfig, WorkerPool};
use nvmux_core::BlockDevice;
use nvmux_vhost::{ExportConfig, VhostBlkExport};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDR: u64 = 0x3000;
const DATA: u64 = 0x10000; // pages 16 and 17
const STATUS: u64 = 0x20000; // page 32
const LOG_ALL: u64 = 1 << 26;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;

fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// The guest's memory as the test (the "driver") sees it.
struct Guest {
    file: File,
    base: *mut u8,
}

impl Guest {
    fn new() -> Guest {
        let file = memfd(c"guest", MEM as u64);
        // SAFETY: a fresh shared mapping of our memfd; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Guest {
            file,
            base: p.cast(),
        }
    }
    fn uaddr(&self, gpa: u64) -> u64 {
        self.base as u64 + gpa
    }
    fn write(&self, gpa: u64, b: &[u8]) {
        self.file.write_all_at(b, gpa).unwrap();
    }
    fn used_idx(&self) -> u16 {
        // SAFETY: USED + 2 is inside the mapping and 2-aligned; the device updates it
        // atomically.
        let a = unsafe { &*(self.base.add(USED as usize + 2) as *const AtomicU16) };
        u16::from_le(a.load(Ordering::Acquire))
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), MEM) };
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Publish one read request (8 KiB at sector 8) as avail entry `n` and wait until the
/// device put it on the used ring.
fn one_read(g: &Guest, kick: &EventFd, n: u16) {
    let mut hdr = [0u8; 16];
    hdr[8..16].copy_from_slice(&8u64.to_le_bytes()); // type 0 (IN), sector 8
    g.write(HDR, &hdr);
    g.write(DESC, &desc(HDR, 16, 1, 1));
    g.write(DESC + 16, &desc(DATA, 8192, 1 | 2, 2));
    g.write(DESC + 32, &desc(STATUS, 1, 2, 0));
    g.write(STATUS, &[0xff]);
    g.write(AVAIL + 4 + 2 * (n % QSIZE) as u64, &0u16.to_le_bytes());
    g.write(AVAIL + 2, &(n + 1).to_le_bytes());
    kick.write(1).unwrap();
    let t0 = Instant::now();
    while g.used_idx() != n + 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the read did not complete"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut st = [0u8];
    g.file.read_exact_at(&mut st, STATUS).unwrap();
    assert_eq!(st[0], 0, "read status");
}

/// Pages whose log bit is set, and clear the log (as QEMU does when it syncs).
fn take_dirty(log: &File) -> Vec<u64> {
    let mut b = vec![0u8; 4096];
    log.read_exact_at(&mut b, 0).unwrap();
    log.write_all_at(&vec![0u8; 4096], 0).unwrap();
    let mut pages = Vec::new();
    for (i, byte) in b.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                pages.push(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

/// A 1 MiB memory disk exported over vhost-user on one worker: (its directory, the
/// socket, the workers, the export).
fn export(tag: &str) -> (PathBuf, PathBuf, WorkerPool, VhostBlkExport) {
    let dir = std::env::temp_dir().join(format!("nvmux-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("blk.sock");
    let pool = WorkerPool::new(&WorkerConfig::default()).unwrap();
    let dev: Arc<dyn BlockDevice> =
        Arc::new(nvmux_backend::MemoryDevice::new(1 << 20, 512, false).unwrap());
    let export = VhostBlkExport::start(
        dev,
        ExportConfig {
            socket: sock.clone(),
            num_queues: 1,
            serial: "dirty".into(),
            perms: Default::default(),
            gate: None,
        },
        pool.workers().to_vec(),
        Arc::new(Default::default()),
    )
    .unwrap();
    (dir, sock, pool, export)
}

#[test]
fn read_marks_data_status_and_used_ring_pages_only_while_log_all() {
    let (dir, sock, mut pool, export) = export("dirty-log");

    let g = Guest::new();
    let log = memfd(c"dirty-log", 4096);
    let mut fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & LOG_ALL, 0, "VHOST_F_LOG_ALL offered");
    let base = VERSION_1 | PROTOCOL_FEATURES;
    fe.set_features(base).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    assert!(
        pf.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD offered"
    );
    // REPLY_ACK: every request waits for the device's answer (as QEMU's SET_FEATURES with
    // LOG_ALL does).
    fe.set_protocol_features(
        VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: g.uaddr(0),
        mmap_offset: 0,
        mmap_handle: g.file.as_raw_fd(),
    }])
    .unwrap();
    // The log (QEMU sets it before switching LOG_ALL on); a reply is awaited.
    fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: 4096,
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        }),
    )
    .unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 1, // VHOST_VRING_F_LOG
            desc_table_addr: g.uaddr(DESC),
            used_ring_addr: g.uaddr(USED),
            avail_ring_addr: g.uaddr(AVAIL),
            log_addr: Some(USED),
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    // 1. Without LOG_ALL the device marks nothing.
    one_read(&g, &kick, 0);
    assert_eq!(
        take_dirty(&log),
        Vec::<u64>::new(),
        "bits set without LOG_ALL"
    );

    // 2. LOG_ALL switched on while the ring runs: every page the device wrote is marked,
    //    and nothing it only read (descriptors: page 0, avail ring: 1, header: 3).
    fe.set_features(base | LOG_ALL).unwrap();
    one_read(&g, &kick, 1);
    let dirty = take_dirty(&log);
    for p in [DATA / 4096, DATA / 4096 + 1, STATUS / 4096, USED / 4096] {
        assert!(dirty.contains(&p), "page {p} not marked: {dirty:?}");
    }
    assert_eq!(dirty, vec![2, 16, 17, 32], "only the written pages");
    let st = export.log_status();
    assert!(st.active && st.logs_set == 1 && st.logs_refused == 0 && st.log_faults == 0);

    // 3. Off again: nothing more. (The worker may have written used->flags while the log
    //    was still on, before SET_FEATURES was answered: that mark is legitimate, and
    //    cleared here.)
    fe.set_features(base).unwrap();
    take_dirty(&log);
    one_read(&g, &kick, 2);
    assert_eq!(
        take_dirty(&log),
        Vec::<u64>::new(),
        "bits set after LOG_ALL went off"
    );
    assert!(!export.log_status().active);

    // 4. On again, and the ring stopped (GET_VRING_BASE) after a last read: its pages are
    //    marked before the stop is answered.
    fe.set_features(base | LOG_ALL).unwrap();
    one_read(&g, &kick, 3);
    assert_eq!(fe.get_vring_base(0).unwrap(), 4);
    assert_eq!(take_dirty(&log), vec![2, 16, 17, 32]);

    drop(fe);
    export.stop();
    pool.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_log_costs_the_front_end_its_connection_only() {
    let (dir, sock, mut pool, export) = export("dirty-log-bad");
    // Past the file's end (twice), and past the bound. (A log of size 0 is refused by the
    // vhost crate's message check before it reaches the device.)
    let too_big = nvmux_vhost::log::MAX_LOG_BYTES + 8;
    for (size, offset, file_len) in [
        (8192u64, 0u64, 4096u64),
        (16, 4090, 4096),
        (too_big, 0, 4096),
    ] {
        let log = memfd(c"bad-log", file_len);
        let mut fe = Frontend::connect(&sock, 1).unwrap();
        fe.set_owner().unwrap();
        fe.get_features().unwrap();
        fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::LOG_SHMFD)
            .unwrap();
        let r = fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: size,
                mmap_offset: offset,
                mmap_handle: log.as_raw_fd(),
            }),
        );
        assert!(
            r.is_err(),
            "log of {size} bytes at {offset} in a {file_len}-byte file accepted"
        );
        drop(fe);
        // The export serves the next front-end.
        let t0 = Instant::now();
        while export.connected() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(export.log_status().logs_refused, 3);
    let fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    assert_ne!(fe.get_features().unwrap() & LOG_ALL, 0);
    drop(fe);
    export.stop();
    pool.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
