//! Bad input against the real daemon: malformed descriptor chains, addresses outside guest
//! memory, oversized requests, and garbage on the vhost-user socket. Each must fail only
//! its own request or connection.
//!
//! libblkio cannot produce malformed chains, so this test plays the driver itself: it
//! sets the device up with the `vhost` crate's frontend and writes descriptors into
//! shared memory by hand.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Guest memory: a shared memfd mapped here, guest physical address 0.
struct Guest {
    ptr: *mut u8,
    fd: std::fs::File,
    next_avail: u16,
    kick: EventFd,
    _call: EventFd,
    _f: Frontend,
}

impl Guest {
    fn w<T: Copy>(&self, gpa: u64, v: T) {
        assert!(gpa as usize + std::mem::size_of::<T>() <= MEM);
        // SAFETY: in bounds of our own shared mapping (checked above).
        unsafe { std::ptr::write_volatile(self.ptr.add(gpa as usize) as *mut T, v) }
    }
    fn r<T: Copy>(&self, gpa: u64) -> T {
        assert!(gpa as usize + std::mem::size_of::<T>() <= MEM);
        // SAFETY: in bounds of our own shared mapping (checked above).
        unsafe { std::ptr::read_volatile(self.ptr.add(gpa as usize) as *const T) }
    }
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = DESC + i as u64 * 16;
        self.w(d, addr);
        self.w(d + 8, len);
        self.w(d + 12, flags);
        self.w(d + 14, next);
    }
    fn header(&self, gpa: u64, rtype: u32, sector: u64) {
        self.w(gpa, rtype);
        self.w(gpa + 4, 0u32);
        self.w(gpa + 8, sector);
    }
    /// Make chain `head` available and kick; wait until the device used it.
    /// Returns the used length.
    fn submit(&mut self, head: u16) -> u32 {
        let slot = self.next_avail % QSIZE;
        self.w(AVAIL + 4 + slot as u64 * 2, head);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.w(AVAIL + 2, self.next_avail);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1).expect("kick");
        let t0 = Instant::now();
        while self.r::<u16>(USED + 2) != self.next_avail {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "device did not complete chain {head}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let e = USED + 4 + ((self.next_avail.wrapping_sub(1)) % QSIZE) as u64 * 8;
        assert_eq!(self.r::<u32>(e), head as u32, "used ring names the chain");
        self.r::<u32>(e + 4)
    }
}

fn setup(sock: &std::path::Path) -> Guest {
    // SAFETY: memfd_create with a valid C string; result checked.
    let raw = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
    assert!(raw >= 0);
    // SAFETY: raw is a fresh fd we own.
    let fd: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    fd.set_len(MEM as u64).expect("size guest memory");
    // SAFETY: mapping our own memfd shared, MEM bytes; result checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            raw,
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    let ptr = ptr as *mut u8;
    let mut f = Frontend::connect(sock, 1).expect("vhost-user connect");
    f.set_owner().expect("set_owner");
    let feats = f.get_features().expect("get_features");
    f.set_features(feats & ((1 << 32) | (1 << 30)))
        .expect("set_features");
    let pf = f.get_protocol_features().expect("get_protocol_features");
    f.set_protocol_features(
        pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG),
    )
    .expect("set_protocol_features");
    let ua = ptr as u64;
    f.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: ua,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
    }])
    .expect("set_mem_table");
    f.set_vring_num(0, QSIZE).expect("set_vring_num");
    f.set_vring_addr(
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
    .expect("set_vring_addr");
    f.set_vring_base(0, 0).expect("set_vring_base");
    let call = EventFd::new(0).expect("eventfd");
    let kick = EventFd::new(0).expect("eventfd");
    f.set_vring_call(0, &call).expect("set_vring_call");
    f.set_vring_kick(0, &kick).expect("set_vring_kick");
    f.set_vring_enable(0, true).expect("set_vring_enable");
    Guest {
        ptr,
        fd,
        next_avail: 0,
        kick,
        _call: call,
        _f: f,
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: unmapping the region mapped in setup.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, MEM) };
        let _ = &self.fd;
    }
}

const HDR: u64 = 0x3000;
const STATUS: u64 = 0x8000;
const DATA: u64 = 0x10000;

/// A three-descriptor request: header, data, status.
fn request(g: &mut Guest, rtype: u32, data_addr: u64, data_len: u32) -> (u32, u8) {
    g.header(HDR, rtype, 0);
    g.w(STATUS, 0xaau8);
    let dflags = if rtype == 0 { F_WRITE } else { 0 } | F_NEXT;
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, data_addr, data_len, dflags, 2);
    g.desc(2, STATUS, 1, F_WRITE, 0);
    let used = g.submit(0);
    (used, g.r::<u8>(STATUS))
}

#[test]
fn malformed_requests_fail_only_themselves() {
    watchdog(120);
    let mut d = TestDaemon::start("badreq");
    let (img, sock) = d.disk_and_export("b", 4 << 20, 1, json!({}));
    std::fs::write(&img, pattern(5, 4 << 20)).expect("fill image");
    let mut g = setup(&sock);

    // A valid read works: status OK, 4096 + 1 bytes written.
    assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
    // SAFETY: reading 4096 bytes of our own mapping at DATA.
    let got = unsafe { std::slice::from_raw_parts(g.ptr.add(DATA as usize), 4096) }.to_vec();
    assert_eq!(got, pattern(5, 4096));

    // Data buffer outside guest memory: IOERR for this request.
    assert_eq!(request(&mut g, 0, 0x4000_0000, 4096).1, 1);
    assert_eq!(
        request(&mut g, 1, (MEM - 512) as u64, 4096).1,
        1,
        "write buffer running off the end"
    );
    // Oversized request: IOERR.
    assert_eq!(request(&mut g, 0, DATA, 64 << 20).1, 1);
    // Data length not a multiple of the block size: IOERR.
    assert_eq!(request(&mut g, 0, DATA, 100).1, 1);
    // Unknown request type: UNSUPP.
    assert_eq!(request(&mut g, 99, DATA, 512).1, 2);

    // A descriptor loop (every descriptor readable, chain never ends): handed back unused.
    g.header(HDR, 0, 0);
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, DATA, 512, F_NEXT, 0);
    assert_eq!(g.submit(0), 0);
    // A next index outside the table: the chain ends early, no status byte: handed back.
    g.desc(0, HDR, 16, F_NEXT, 200);
    assert_eq!(g.submit(0), 0);
    // Status byte outside guest memory.
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, 0x7000_0000, 1, F_WRITE, 0);
    assert_eq!(g.submit(0), 0);
    // Readable descriptor after a writable one (spec violation).
    g.desc(0, HDR, 16, F_NEXT, 1);
    g.desc(1, STATUS, 1, F_WRITE | F_NEXT, 2);
    g.desc(2, DATA, 512, 0, 0);
    assert_eq!(g.submit(0), 0);

    // The queue still serves valid requests, and the daemon is healthy.
    assert_eq!(request(&mut g, 0, DATA, 8192), (8193, 0));
    assert!(d.healthy());
    drop(g);
    d.stop();
}

#[test]
fn the_daemon_itself_refuses_writes_to_a_read_only_disk() {
    watchdog(120);
    let d = TestDaemon::start("rawro");
    let img = d.dir.join("ro.img");
    std::fs::write(&img, pattern(8, 1 << 20)).expect("image");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "ro", "path": img, "read_only": true}),
        )
        .expect("disk");
    let sock = d.dir.join("ro.sock");
    d.api
        .post("/v1/exports", &json!({"disk": "ro", "socket": sock}))
        .expect("export");
    // This driver ignores VIRTIO_BLK_F_RO and writes anyway: the device must refuse.
    let mut g = setup(&sock);
    g.w(DATA, 0x55u8);
    assert_eq!(
        request(&mut g, 1, DATA, 4096).1,
        1,
        "write to a read-only disk"
    );
    g.header(HDR, 11, 0); // discard
    g.w(HDR + 16, 0u64);
    g.w(HDR + 24, 8u32);
    g.w(HDR + 28, 0u32);
    g.w(STATUS, 0xaau8);
    g.desc(0, HDR, 32, F_NEXT, 1);
    g.desc(1, STATUS, 1, F_WRITE, 0);
    g.submit(0);
    assert_eq!(g.r::<u8>(STATUS), 1, "discard on a read-only disk");
    assert_eq!(
        request(&mut g, 0, DATA, 4096),
        (4097, 0),
        "reads still work"
    );
    assert_eq!(
        std::fs::read(&img).expect("image"),
        pattern(8, 1 << 20),
        "image unchanged"
    );
    drop(g);
    d.stop();
}

#[test]
fn garbage_on_the_vhost_socket_closes_only_that_connection() {
    watchdog(120);
    let mut d = TestDaemon::start("garbage");
    let (_img, sock) = d.disk_and_export("g", 4 << 20, 1, json!({}));
    let (_img2, sock2) = d.disk_and_export("h", 4 << 20, 1, json!({}));
    // A healthy client on another export keeps working throughout.
    let mut other = BlkioClient::connect(&sock2, 1, false, 1 << 20).expect("connect h");
    for (i, garbage) in [
        pattern(1, 4096),
        vec![0xff; 64],
        vec![0u8; 12],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let _ = s.write_all(&garbage);
        let mut buf = [0u8; 64];
        // The server must hang up (EOF or reset), not hang.
        match s.read(&mut buf) {
            Ok(n) => assert!(
                n == 0 || i == 2,
                "garbage {i}: server answered {n} bytes instead of closing"
            ),
            Err(e) => assert_ne!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "garbage {i}: server hung"
            ),
        }
        drop(s);
        other
            .io_ok(0, Op::Read, 0, 4096, 0, ReqFlags::empty())
            .expect("other export still serves");
    }
    // The export that got garbage accepts a proper client afterwards.
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("connect after garbage");
    c.io_ok(0, Op::Read, 0, 4096, 0, ReqFlags::empty())
        .expect("read");
    assert!(d.healthy());
    drop(c);
    drop(other);
    d.stop();
}
