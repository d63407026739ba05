//! A hostile external function against the real daemon: handed a ring, it tries to shrink
//! and grow the ring's memfd and to seal it against writes. The ring is sealed before it
//! is handed over, so every attempt fails with EPERM; the daemon stays up, fails the
//! function's commands over to the chain when it leaves, and another disk under steady
//! libblkio I/O sees no error.

mod common;

use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::hostile_fn;
use common::*;
use nvmux_bench::attack::Victim;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

/// The user the function runs as (it does not own the daemon's memory).
const NOBODY: u32 = 65534;

#[test]
#[ignore = "entry point of the hostile function process (run by other tests)"]
fn hostile_function_process() {
    hostile_fn::child_main();
}

#[test]
fn a_function_cannot_resize_its_ring() {
    watchdog(180);
    let mut d = TestDaemon::start("extfn-hostile");
    let (_img, sock) = d.disk_and_export("a", 16 << 20, 1, json!({}));
    let (_vimg, vsock) = d.disk_and_export("victim", 8 << 20, 1, json!({}));
    let victim = Victim::vhost(&vsock).expect("victim I/O");
    let fsock = d.dir.join("a-fn.sock");
    d.api
        .post(
            "/v1/disks/a/external",
            &json!({"socket": fsock, "on_failure": "chain", "owner": format!("{NOBODY}:{NOBODY}")}),
        )
        .expect("set external");
    let obj = compile_classifier(&d.dir, "all_external");
    d.api
        .post("/v1/disks/a/classifier", &json!({"object": obj}))
        .expect("load all_external");
    let child = hostile_fn::spawn(&fsock, Some(NOBODY));
    let t0 = Instant::now();
    loop {
        let v = d.api.get("/v1/disks/a/classifier").expect("classifier");
        if v["external"]["status"] == "attached" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no attach: {v}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The first command routed to the function creates the ring; the function attacks it
    // and leaves with the command in flight, which then takes the chain.
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("connect a");
    c.buf()[..4096].copy_from_slice(&pattern(9, 4096));
    c.io_ok(0, Op::Write, 0, 4096, 0, ReqFlags::empty())
        .expect("the write completes through the chain");
    let r = hostile_fn::report(child).expect("report");
    assert_eq!(
        r.seals,
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        "{r:?}"
    );
    assert_eq!(r.shrink, libc::EPERM, "shrinking the ring: {r:?}");
    assert_eq!(r.grow, libc::EPERM, "growing the ring: {r:?}");
    assert_eq!(
        r.seal_write,
        libc::EPERM,
        "sealing the ring against writes: {r:?}"
    );
    // The daemon is alive and the disk keeps serving (the function is gone: the chain).
    assert!(d.healthy(), "{}", d.log());
    c.io_ok(0, Op::Read, 0, 4096, 4096, ReqFlags::empty())
        .expect("read back");
    assert_eq!(c.buf()[4096..8192], pattern(9, 4096)[..]);
    assert!(
        victim.progresses(50, Duration::from_secs(20)),
        "the victim stalled"
    );
    victim.finish().expect("the victim's I/O saw an error");
    drop(c);
    d.stop();
}
