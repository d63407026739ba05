//! Bad input against the real daemon: malformed descriptor chains, addresses outside guest
//! memory, oversized requests, and garbage on the vhost-user socket. Each must fail only
//! its own request or connection.
//!
//! libblkio cannot produce malformed chains, so this test plays the driver itself: it
//! sets the device up with the `vhost` crate's frontend and writes descriptors into
//! shared memory by hand.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use nvmux_bench::vufront::*;
use serde_json::json;

fn setup(sock: &std::path::Path) -> Guest {
    Guest::setup(sock)
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

/// A chain through an indirect table: header, `n` data segments of 512 bytes, status.
fn indirect_read(g: &mut Guest, n: u16) -> (u32, u8) {
    const TABLE: u64 = 0x20000;
    const F_INDIRECT: u16 = 4;
    let entry = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
        let d = TABLE + i as u64 * 16;
        g.w(d, addr);
        g.w(d + 8, len);
        g.w(d + 12, flags);
        g.w(d + 14, next);
    };
    entry(0, HDR, 16, F_NEXT, 1);
    for i in 0..n {
        entry(1 + i, DATA + i as u64 * 512, 512, F_WRITE | F_NEXT, 2 + i);
    }
    entry(1 + n, STATUS, 1, F_WRITE, 0);
    g.header(HDR, 0, 0);
    g.w(STATUS, 0xaau8);
    g.desc(0, TABLE, (n as u32 + 2) * 16, F_INDIRECT, 0);
    let used = g.submit(0);
    (used, g.r::<u8>(STATUS))
}

#[test]
fn requests_beyond_the_advertised_limits_fail_alone() {
    watchdog(120);
    let mut d = TestDaemon::start("badlimits");
    let (img, sock) = d.disk_and_export("l", 4 << 20, 1, json!({}));
    std::fs::write(&img, pattern(6, 4 << 20)).expect("fill image");
    let mut g = setup(&sock);
    // seg_max (126) data segments: served.
    let n = 126u16; // seg_max in the config space (nvmux_vhost::blk::MAX_SEGMENTS)
    assert_eq!(indirect_read(&mut g, n), (n as u32 * 512 + 1, 0));
    // One more than seg_max: IOERR, nothing else happens.
    assert_eq!(indirect_read(&mut g, n + 1).1, 1);
    // Larger than the device's transfer limit: IOERR before anything is allocated.
    assert_eq!(request(&mut g, 0, DATA, (32 << 20) + 512).1, 1);
    assert_eq!(request(&mut g, 1, DATA, u32::MAX - 511).1, 1);
    // The queue still serves, the daemon is healthy.
    assert_eq!(request(&mut g, 0, DATA, 4096), (4097, 0));
    assert!(d.healthy());
    drop(g);
    d.stop();
}
