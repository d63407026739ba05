//! Remote disks and mirrors through real daemons: one daemon is the NVMe/TCP target (its
//! own `subsystem`), the other the initiator, with libblkio writing through a vhost-user
//! export. A remote daemon killed with SIGKILL faults its leg with no error to the client;
//! when it is back only the dirty regions are copied; a SIGKILL of the mirroring daemon
//! in the middle of a resync leaves its bitmap intact and the legs converge.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A target daemon with a `SIZE` file disk as namespace 1 of `nqn`, open to any host.
fn target(dir: std::path::PathBuf, nqn: &str, listen: &str) -> (TestDaemon, String) {
    let t = TestDaemon::start_in(dir);
    let img = t.dir.join("remote.img");
    if t.api.get("/v1/disks/remote").is_err() {
        t.api
            .post(
                "/v1/disks",
                &json!({"name": "remote", "backend": "file", "path": img, "size": SIZE}),
            )
            .expect("remote disk");
        t.api
            .post(
                "/v1/subsystems",
                &json!({"nqn": nqn, "listen": listen, "allow_any_host": true}),
            )
            .expect("subsystem");
        t.api
            .post(
                &format!("/v1/subsystems/{nqn}/namespaces"),
                &json!({"disk": "remote"}),
            )
            .expect("namespace");
    }
    let v = t.api.get("/v1/subsystems").expect("subsystems");
    let addr = v
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["nqn"] == nqn)
        .and_then(|s| s["listen"].as_str().map(str::to_string))
        .expect("listen address");
    (t, addr)
}

/// A fixed loopback port for a target that must come back on the same address.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn write(c: &mut BlkioClient, q: usize, off: u64, data: &[u8]) {
    c.buf()[..data.len()].copy_from_slice(data);
    c.io_ok(q, Op::Write, off, data.len(), 0, ReqFlags::empty())
        .expect("write");
}

fn read(c: &mut BlkioClient, q: usize, off: u64, len: usize) -> Vec<u8> {
    c.buf()[..len].fill(0xee);
    c.io_ok(q, Op::Read, off, len, 0, ReqFlags::empty())
        .expect("read");
    c.buf()[..len].to_vec()
}

fn mirror(d: &TestDaemon, disk: &str) -> Value {
    d.api
        .get(&format!("/v1/disks/{disk}/mirror"))
        .expect("mirror status")
}

fn leg_state(d: &TestDaemon, disk: &str, leg: &str) -> String {
    mirror(d, disk)["legs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["name"] == leg)
        .and_then(|l| l["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

fn wait_state(d: &TestDaemon, disk: &str, leg: &str, want: &str, secs: u64) {
    let t0 = Instant::now();
    while leg_state(d, disk, leg) != want {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "leg {leg} of {disk} not {want} after {secs} s: {}",
            mirror(d, disk)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn same_files(a: &Path, b: &Path) {
    let (x, y) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    assert!(x.len() as u64 >= SIZE && y.len() as u64 >= SIZE);
    let n = SIZE as usize;
    if let Some(i) = (0..n)
        .step_by(512)
        .find(|&i| x[i..i + 512] != y[i..i + 512])
    {
        panic!(
            "{} and {} differ at byte {i} (region {})",
            a.display(),
            b.display(),
            i as u64 / MIB
        );
    }
}

#[test]
fn remote_disk_passes_write_verify_through_vhost_user() {
    watchdog(180);
    let nqn = "nqn.2026-12.io.nvmux.test:remote1";
    let (t, addr) = target(unique_dir("mirror-target"), nqn, "127.0.0.1:0");
    let d = TestDaemon::start("mirror-init");
    let v = d
        .api
        .post(
            "/v1/disks",
            &json!({"name": "r", "backend": "nvmf", "remote": format!("{nqn}@{addr}")}),
        )
        .expect("remote disk");
    assert_eq!(v["size"], SIZE, "{v}");
    assert_eq!(v["remote"]["connected"], true, "{v}");
    let sock = d.dir.join("r.sock");
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": "r", "socket": sock, "num_queues": 2}),
        )
        .expect("export");
    let mut c = BlkioClient::connect(&sock, 2, false, 1 << 20).expect("blkio");
    assert_eq!(c.capacity(), SIZE);
    let cases: Vec<(u64, usize)> = (0..64u64)
        .map(|i| ((i * 997 * 4096) % (SIZE - (128 << 10)), 4096 << (i % 6)))
        .collect();
    for (i, &(off, len)) in cases.iter().enumerate() {
        write(&mut c, i % 2, off, &pattern(i as u64, len));
    }
    for (i, &(off, len)) in cases.iter().enumerate().rev() {
        // Later cases may overlap earlier ones: check each against the last writer.
        let last = cases
            .iter()
            .enumerate()
            .rev()
            .find(|(_, &(o, l))| o < off + len as u64 && off < o + l as u64)
            .map(|(j, _)| j);
        if last == Some(i) {
            assert!(
                read(&mut c, (i + 1) % 2, off, len) == pattern(i as u64, len),
                "case {i}"
            );
        }
    }
    // What the client wrote is in the target's file.
    let (off, len) = cases[cases.len() - 1];
    assert!(
        read_file_at(&t.dir.join("remote.img"), off, len) == pattern(cases.len() as u64 - 1, len)
    );
    drop(c);
    d.stop();
    t.stop();
}

/// A file disk mirrored to a remote namespace; returns the client and the two files.
fn mirrored(
    d: &TestDaemon,
    nqn: &str,
    addr: &str,
    rate: Option<u64>,
) -> (BlkioClient, std::path::PathBuf) {
    let img = d.dir.join("m.img");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "m", "backend": "file", "path": img, "size": SIZE}),
        )
        .expect("disk");
    let sock = d.dir.join("m.sock");
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": "m", "socket": sock, "num_queues": 2}),
        )
        .expect("export");
    let mut c = BlkioClient::connect(&sock, 2, false, 1 << 20).expect("blkio");
    // Data before the leg exists: the full copy carries it over.
    for r in 0..8u64 {
        write(&mut c, 0, r * 8 * MIB, &pattern(100 + r, 64 << 10));
    }
    d.api
        .post(
            "/v1/disks/m/mirror",
            &json!({"remote": format!("{nqn}@{addr}"), "name": "far", "sync_rate": rate}),
        )
        .expect("mirror add");
    (c, img)
}

#[test]
fn remote_leg_killed_faults_then_resyncs_only_dirty_regions() {
    watchdog(240);
    let nqn = "nqn.2026-12.io.nvmux.test:leg1";
    let listen = format!("127.0.0.1:{}", free_port());
    let tdir = unique_dir("mirror-leg");
    let (t, addr) = target(tdir.clone(), nqn, &listen);
    let d = TestDaemon::start("mirror-src");
    let (mut c, img) = mirrored(&d, nqn, &addr, None);
    wait_state(&d, "m", "far", "healthy", 60);
    assert_eq!(mirror(&d, "m")["full_copies"], 1);

    // The remote daemon dies: writes go on with no error, the leg is faulted.
    let pid = t.pid();
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    t.wait_killed();
    for r in [3u64, 17, 40] {
        write(
            &mut c,
            (r % 2) as usize,
            r * MIB + 4096,
            &pattern(200 + r, 128 << 10),
        );
    }
    wait_state(&d, "m", "far", "faulted", 30);
    for r in [5u64, 41] {
        write(&mut c, 1, r * MIB, &pattern(300 + r, 4096));
    }
    assert!(mirror(&d, "m")["dirty_regions"].as_u64().unwrap_or(0) >= 5);

    // It comes back: only the dirty regions are copied.
    let (t, _) = target(tdir.clone(), nqn, &listen);
    wait_state(&d, "m", "far", "healthy", 60);
    let m = mirror(&d, "m");
    let (resynced, regions) = (
        m["resynced_regions"].as_u64().unwrap_or(0),
        m["regions"].as_u64().unwrap_or(0),
    );
    eprintln!("resynced {resynced} of {regions} regions");
    assert!(resynced >= 5 && resynced < regions, "{m}");
    // Reads are right whichever leg serves them.
    assert!(read(&mut c, 0, 17 * MIB + 4096, 128 << 10) == pattern(217, 128 << 10));
    drop(c);
    d.stop();
    t.stop();
    same_files(&img, &tdir.join("remote.img"));
}

#[test]
fn sigkill_during_resync_keeps_the_bitmap_and_the_legs_converge() {
    watchdog(300);
    let nqn = "nqn.2026-12.io.nvmux.test:leg2";
    let listen = format!("127.0.0.1:{}", free_port());
    let tdir = unique_dir("mirror-crash-t");
    let (t, addr) = target(tdir.clone(), nqn, &listen);
    let ddir = unique_dir("mirror-crash");
    let d = TestDaemon::start_in(ddir.clone());
    // A slow copy rate (4 MiB/s), so that the resync below takes seconds.
    let (mut c, img) = mirrored(&d, nqn, &addr, Some(4 * MIB));
    wait_state(&d, "m", "far", "healthy", 60);
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(t.pid() as i32, libc::SIGKILL) };
    t.wait_killed();
    // 24 regions written while the leg is away.
    for r in 0..24u64 {
        write(
            &mut c,
            (r % 2) as usize,
            (r * 2 + 1) * MIB,
            &pattern(400 + r, 64 << 10),
        );
    }
    wait_state(&d, "m", "far", "faulted", 30);
    let dirty = mirror(&d, "m")["dirty_regions"].as_u64().unwrap_or(0);
    assert!(dirty >= 24, "dirty {dirty}");
    let (t, _) = target(tdir.clone(), nqn, &listen);
    wait_state(&d, "m", "far", "syncing", 30);
    std::thread::sleep(Duration::from_millis(1500));
    let before = mirror(&d, "m");
    drop(c);
    // SIGKILL mid-resync.
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    d.wait_killed();
    let bm = nvmux_mirror::read_bitmap(&ddir.join("mirror").join("m.bitmap")).expect("bitmap");
    eprintln!(
        "before the kill: {}; bitmap after: {} dirty regions",
        before,
        bm.dirty.len()
    );
    assert!(
        !bm.dirty.is_empty(),
        "the resync had not finished: dirty regions must remain"
    );
    // Every region written while the leg was away and not yet copied is still dirty.
    let d = TestDaemon::start_in(ddir);
    wait_state(&d, "m", "far", "healthy", 90);
    assert_eq!(
        mirror(&d, "m")["dirty_regions"].as_u64().map(|n| n <= 24),
        Some(true)
    );
    d.stop();
    t.stop();
    same_files(&img, &tdir.join("remote.img"));
}
