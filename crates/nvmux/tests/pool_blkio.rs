//! Pools and thin volumes through the real daemon, driven by the real libblkio client.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

const MIB: u64 = 1 << 20;
const CL: u64 = 64 << 10;

fn thin(d: &TestDaemon, name: &str, body: serde_json::Value) -> PathBuf {
    let mut b = json!({"name": name, "pool": "p"});
    if let (Some(o), Some(e)) = (b.as_object_mut(), body.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    d.api.post("/v1/disks", &b).expect("create pool disk");
    let sock = d.dir.join(format!("{name}.sock"));
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": name, "socket": sock, "num_queues": 2}),
        )
        .expect("export");
    sock
}

fn write(c: &mut BlkioClient, q: usize, off: u64, data: &[u8]) {
    c.buf()[..data.len()].copy_from_slice(data);
    c.io_ok(q, Op::Write, off, data.len(), 0, ReqFlags::empty())
        .expect("write");
}

/// Write `pattern(seed + i)` at each case (alternating queues), then read each back
/// through the other queue.
fn write_and_read_back(c: &mut BlkioClient, cases: &[(u64, usize)], seed: u64) {
    for (i, &(off, len)) in cases.iter().enumerate() {
        write(c, i % 2, off, &pattern(i as u64 + seed, len));
    }
    for (i, &(off, len)) in cases.iter().enumerate() {
        assert!(
            read(c, (i + 1) % 2, off, len) == pattern(i as u64 + seed, len),
            "case {i}"
        );
    }
}

fn read(c: &mut BlkioClient, q: usize, off: u64, len: usize) -> Vec<u8> {
    c.buf()[..len].fill(0xee);
    c.io_ok(q, Op::Read, off, len, 0, ReqFlags::empty())
        .expect("read");
    c.buf()[..len].to_vec()
}

fn nvmux(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_nvmux"))
        .args(args)
        .output()
        .expect("run nvmux");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn thin_disk_reads_back_and_unwritten_or_discarded_space_reads_zero() {
    watchdog(120);
    let d = TestDaemon::start("thin");
    d.pool("p", 256 * MIB);
    let sock = thin(&d, "t", json!({"size": 64 * MIB}));
    let mut c = BlkioClient::connect(&sock, 2, false, 4 << 20).expect("connect");
    assert_eq!(c.capacity(), 64 * MIB);
    let cases = [
        (0u64, 4096usize),
        (CL - 512, 1024),
        (5 * MIB + 512, 200 << 10),
        (64 * MIB - 4096, 4096),
    ];
    write_and_read_back(&mut c, &cases, 7);
    // Never written: zeros, both in an untouched cluster and around written bytes.
    assert!(read(&mut c, 0, 20 * MIB, 1 << 20).iter().all(|&b| b == 0));
    assert!(read(&mut c, 0, 4096, CL as usize - 8192)
        .iter()
        .all(|&b| b == 0));
    // Discard a whole cluster and write zeroes over part of another.
    c.io_ok(0, Op::Flush, 0, 0, 0, ReqFlags::empty())
        .expect("flush");
    c.io_ok(0, Op::Discard, 5 * MIB, CL as usize, 0, ReqFlags::empty())
        .expect("discard");
    c.io_ok(1, Op::WriteZeroes, 5 * MIB + CL, 4096, 0, ReqFlags::empty())
        .expect("write zeroes");
    let r = read(&mut c, 0, 5 * MIB, 2 * CL as usize);
    assert!(
        r[..CL as usize + 4096].iter().all(|&b| b == 0),
        "discarded range reads zero"
    );
    let p = pattern(9, 200 << 10);
    assert!(r[CL as usize + 4096..] == p[CL as usize + 4096 - 512..2 * CL as usize - 512]);
    let v = d.api.get("/v1/pools/p").expect("pool");
    let vol = &v["usage"]["volumes"][0];
    assert_eq!(vol["name"], "t");
    assert!(vol["allocated_bytes"].as_u64().unwrap_or(0) >= 4 * CL);
    drop(c);
    d.stop();
}

#[test]
fn resize_grows_a_connected_disk_and_shrink_needs_force() {
    watchdog(120);
    let d = TestDaemon::start("resize");
    d.pool("p", 256 * MIB);
    let sock = thin(&d, "r", json!({"size": 16 * MIB}));
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("connect");
    assert_eq!(c.capacity(), 16 * MIB);
    write(&mut c, 0, 16 * MIB - 4096, &pattern(1, 4096));
    c.buf()[..4096].fill(1);
    assert!(
        c.io_ok(0, Op::Write, 16 * MIB, 4096, 0, ReqFlags::empty())
            .is_err(),
        "a write past the end fails before the resize"
    );
    d.api
        .post("/v1/disks/r/resize", &json!({"size": 32 * MIB}))
        .expect("grow");
    // The same connection (the same queue) now accepts the grown range.
    write(&mut c, 0, 24 * MIB, &pattern(2, 8192));
    assert!(read(&mut c, 0, 24 * MIB, 8192) == pattern(2, 8192));
    assert!(read(&mut c, 0, 16 * MIB, 4096).iter().all(|&b| b == 0));
    drop(c);
    // A new connection reads the new capacity from the config space.
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("reconnect");
    assert_eq!(c.capacity(), 32 * MIB);
    assert!(read(&mut c, 0, 16 * MIB - 4096, 4096) == pattern(1, 4096));
    drop(c);
    // Shrinking over allocated data: refused without --force, and without
    // --discard-data even with it; nothing is lost by a refused shrink.
    let e = d
        .api
        .post("/v1/disks/r/resize", &json!({"size": 8 * MIB}))
        .expect_err("shrink without force");
    assert!(e.to_string().contains("force"), "{e}");
    let e = d
        .api
        .post(
            "/v1/disks/r/resize",
            &json!({"size": 20 * MIB, "force": true}),
        )
        .expect_err("shrink over data");
    assert!(e.to_string().contains("discard-data"), "{e}");
    d.api
        .post(
            "/v1/disks/r/resize",
            &json!({"size": 30 * MIB, "force": true}),
        )
        .expect("shrink over unallocated space");
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("reconnect");
    assert_eq!(c.capacity(), 30 * MIB);
    assert!(read(&mut c, 0, 24 * MIB, 8192) == pattern(2, 8192));
    drop(c);
    d.stop();
}

#[test]
fn snapshot_keeps_content_and_clone_diverges() {
    watchdog(120);
    let d = TestDaemon::start("snap");
    d.pool("p", 256 * MIB);
    let sock = thin(&d, "vm", json!({"size": 16 * MIB}));
    let mut c = BlkioClient::connect(&sock, 2, false, 4 << 20).expect("connect");
    let old = pattern(1, 1 << 20);
    write(&mut c, 0, MIB, &old);
    c.io_ok(0, Op::Flush, 0, 0, 0, ReqFlags::empty())
        .expect("flush");
    d.api
        .post("/v1/disks/vm/snapshot", &json!({"snapshot": "vm-snap"}))
        .expect("snapshot");
    // Overwrite the origin while it stays attached: partial and whole clusters.
    write(&mut c, 1, MIB + 4096, &pattern(2, 8192));
    write(&mut c, 0, MIB + 4 * CL, &pattern(3, 2 * CL as usize));
    let now = read(&mut c, 0, MIB, 1 << 20);
    assert!(now[4096..4096 + 8192] == pattern(2, 8192)[..]);
    assert!(
        now[..4096] == old[..4096],
        "copy-on-write kept the rest of the cluster"
    );
    // The snapshot, attached read-only, still has the old bytes.
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "sv", "pool": "p", "volume": "vm-snap"}),
        )
        .expect("attach snapshot");
    let ssock = d.dir.join("sv.sock");
    d.api
        .post("/v1/exports", &json!({"disk": "sv", "socket": ssock}))
        .expect("export snapshot");
    let mut s =
        BlkioClient::connect_opts(&ssock, 1, false, 2 << 20, true).expect("connect snapshot");
    assert!(
        read(&mut s, 0, MIB, 1 << 20) == old,
        "snapshot kept its content"
    );
    // A clone starts as the snapshot and diverges without touching it.
    let csock = thin(&d, "cl", json!({"from_snapshot": "vm-snap"}));
    let mut k = BlkioClient::connect(&csock, 2, false, 4 << 20).expect("connect clone");
    assert_eq!(k.capacity(), 16 * MIB);
    assert!(read(&mut k, 0, MIB, 1 << 20) == old);
    write(&mut k, 0, MIB, &pattern(9, 4096));
    assert!(read(&mut k, 1, MIB, 4096) == pattern(9, 4096));
    assert!(
        read(&mut s, 0, MIB, 1 << 20) == old,
        "clone writes do not reach the snapshot"
    );
    assert!(read(&mut c, 0, MIB, 4096) == old[..4096]);
    drop((c, s, k));
    d.stop();
}

#[test]
fn a_new_disk_over_a_deleted_disks_clusters_reads_zeros() {
    watchdog(180);
    let d = TestDaemon::start("iso");
    // A small pool, so disk B must reuse the clusters disk A had.
    d.pool("p", 40 * MIB);
    let free0 = d.api.get("/v1/pools/p").expect("pool")["usage"]["free_clusters"]
        .as_u64()
        .unwrap_or(0);
    let sock = thin(&d, "a", json!({"size": 32 * MIB}));
    let mut c = BlkioClient::connect(&sock, 2, false, 4 << 20).expect("connect");
    let secret = pattern(77, 1 << 20);
    for i in 0..32u64 {
        write(&mut c, (i % 2) as usize, i * MIB, &secret);
    }
    c.io_ok(0, Op::Flush, 0, 0, 0, ReqFlags::empty())
        .expect("flush");
    drop(c);
    d.api.delete("/v1/exports/a").expect("unexport");
    let v = d.api.delete("/v1/disks/a?erase=1").expect("erase disk");
    assert_eq!(v["erased_bytes"].as_u64(), Some(32 * MIB));
    let sock = thin(&d, "b", json!({"size": 32 * MIB}));
    let mut c = BlkioClient::connect(&sock, 2, false, 4 << 20).expect("connect");
    for i in 0..32u64 {
        assert!(
            read(&mut c, 0, i * MIB, 1 << 20).iter().all(|&b| b == 0),
            "MiB {i} of B is not zero"
        );
        // Writing part of each cluster allocates A's old clusters: the rest stays zero.
        write(&mut c, 1, i * MIB + 512, &pattern(i, 512));
        let r = read(&mut c, 0, i * MIB, CL as usize);
        assert!(r[..512].iter().all(|&b| b == 0) && r[1024..].iter().all(|&b| b == 0));
    }
    let free1 = d.api.get("/v1/pools/p").expect("pool")["usage"]["free_clusters"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        free0 < 32 * MIB / CL + free1 + 8,
        "B reused A's clusters ({free0} free before, {free1} after)"
    );
    drop(c);
    d.stop();
}

fn active_table(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open pool");
    let mut b0 = vec![0u8; 4096];
    let mut b1 = vec![0u8; 4096];
    f.read_exact_at(&mut b0, 0).expect("read");
    f.read_exact_at(&mut b1, 4096).expect("read");
    let (sb, _) = nvmux_volume::format::current_superblock(&b0, &b1).expect("superblock");
    (
        sb.table_block_at(sb.active_tables, sb.voltab_blocks()),
        sb.table_block_at(sb.active_tables, 0),
    )
}

#[test]
fn check_finds_a_flipped_byte_and_the_daemon_refuses_the_pool() {
    watchdog(120);
    let dir = unique_dir("corrupt");
    let d = TestDaemon::start_in(dir.clone());
    let path = d.pool("p", 128 * MIB);
    let sock = thin(&d, "t", json!({"size": 16 * MIB}));
    let mut c = BlkioClient::connect(&sock, 1, false, 2 << 20).expect("connect");
    write(&mut c, 0, 0, &pattern(1, 1 << 20));
    drop(c);
    d.stop();
    let (ok, out) = nvmux(&["pool", "check", path.to_str().unwrap_or("")]);
    assert!(ok && out.contains("pool is consistent"), "{out}");
    // Flip one byte in the live owner table.
    let (owner0, _) = active_table(&path);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, owner0 + 40).expect("read");
        b[0] ^= 0x10;
        f.write_all_at(&b, owner0 + 40).expect("write");
    }
    let (ok, out) = nvmux(&["pool", "check", path.to_str().unwrap_or("")]);
    assert!(!ok, "check must fail: {out}");
    assert!(
        out.contains("owner table block 0") && out.contains("checksum"),
        "{out}"
    );
    let d = TestDaemon::start_in(dir);
    let v = d.api.get("/v1/pools/p").expect("pool");
    let st = v["status"].as_str().unwrap_or("");
    assert!(
        st.contains("damaged") && st.contains("owner table block 0"),
        "{st}"
    );
    let disk = d.api.get("/v1/disks/t").expect("disk");
    assert!(
        disk["status"].as_str().unwrap_or("").starts_with("error"),
        "{disk}"
    );
    d.stop();
}

/// kill -9 during allocating writes with periodic flushes, 24 rounds: after each, the pool
/// checks clean and every write acknowledged before a completed flush is there.
#[test]
fn kill_9_during_allocating_writes_loses_nothing_flushed() {
    watchdog(900);
    let dir = unique_dir("crash");
    let mut d = TestDaemon::start_in(dir.clone());
    let path = d.pool("p", 1024 * MIB);
    let sock = thin(&d, "t", json!({"size": 512 * MIB}));
    // Every write gets its own cluster, so every write allocates.
    let slots = 512 * MIB / CL;
    let mut durable: Vec<(u64, u64)> = Vec::new(); // (slot, seed)
    let mut next_slot = 0u64;
    let mut seed = 1u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..24 {
        let mut c = BlkioClient::connect(&sock, 2, false, 1 << 20).expect("connect");
        // A killed daemon completes nothing: give up on a request quickly.
        c.timeout = std::time::Duration::from_secs(1);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let kill_after = 30 + rng % 150;
        let mut acked: Vec<(u64, u64)> = Vec::new();
        let mut i = 0u64;
        let child_pid = d.pid();
        loop {
            if i == kill_after {
                // kill -9 from another thread while writes are in flight.
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    // SAFETY: signalling our own child process.
                    unsafe { libc::kill(child_pid as i32, libc::SIGKILL) };
                });
            }
            if next_slot >= slots {
                break;
            }
            let slot = next_slot;
            let data = pattern(seed, 4096);
            c.buf()[..4096].copy_from_slice(&data);
            let off = slot * CL + (seed % 16) * 4096;
            match c.io(i as usize % 2, Op::Write, off, 4096, 0, ReqFlags::empty()) {
                Ok(0) => acked.push((slot, seed)),
                _ => break,
            }
            next_slot += 1;
            seed += 1;
            i += 1;
            if i.is_multiple_of(8) {
                match c.io(0, Op::Flush, 0, 0, 0, ReqFlags::empty()) {
                    Ok(0) => durable.append(&mut acked),
                    _ => break,
                }
            }
        }
        drop(c);
        d.wait_killed();
        let (ok, out) = nvmux(&["pool", "check", path.to_str().unwrap_or("")]);
        assert!(ok, "round {round}: pool check failed after kill -9:\n{out}");
        d = TestDaemon::start_in(dir.clone());
        let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("reconnect");
        for &(slot, s) in &durable {
            let off = slot * CL + (s % 16) * 4096;
            let got = read(&mut c, 0, off, 4096);
            assert!(
                got == pattern(s, 4096),
                "round {round}: flushed write {s} at slot {slot} lost"
            );
        }
        eprintln!("round {round}: {} flushed writes verified", durable.len());
        drop(c);
    }
    assert!(
        durable.len() > 24 * 8,
        "the test wrote too little: {}",
        durable.len()
    );
    d.stop();
}

/// A loop device with 4096-byte logical blocks over a sparse file; detached on drop.
struct Loop4k(String);

impl Loop4k {
    /// `None` (after saying why) only when this kernel has no loop devices at all.
    fn new(file: &Path, size: u64) -> Option<Loop4k> {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(size))
            .expect("create the loop file");
        let o = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", "4096"])
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        if !o.status.success() {
            let why = String::from_utf8_lossy(&o.stderr).to_string();
            if !Path::new("/dev/loop-control").exists() && !Path::new("/sys/module/loop").exists() {
                eprintln!("SKIP: this kernel has no loop devices (no /dev/loop-control): {why}");
                return None;
            }
            panic!("losetup --sector-size 4096 failed: {why}");
        }
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let ss = Command::new("blockdev")
            .args(["--getss", &dev])
            .output()
            .expect("blockdev");
        let l = Loop4k(dev);
        assert_eq!(
            String::from_utf8_lossy(&ss.stdout).trim(),
            "4096",
            "{}",
            l.0
        );
        Some(l)
    }
}

impl Drop for Loop4k {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A pool on a 4Kn device (a loop device with 4096-byte logical blocks): its disks have
/// 4096-byte blocks, so every piece the thin volume sends down is whole device blocks.
/// Before, the volume claimed 512-byte blocks and a piece under 4 KiB became a zero-length
/// device command: the write "succeeded" and read back as zeros.
#[test]
fn a_pool_on_a_4kn_device_serves_4096_byte_blocks() {
    watchdog(180);
    let dir = unique_dir("pool4k");
    let Some(lo) = Loop4k::new(&dir.join("backing.img"), 256 * MIB) else {
        return;
    };
    let d = TestDaemon::start_in(dir.clone());
    d.api
        .post("/v1/pools", &json!({"name": "p", "path": lo.0}))
        .expect("create a pool on the 4Kn loop device");
    let refused = d
        .api
        .post(
            "/v1/disks",
            &json!({"name": "bad", "pool": "p", "size": 16 * MIB, "block_size": 512}),
        )
        .expect_err("512-byte blocks on a 4Kn pool");
    assert!(refused.message.contains("4096-byte blocks"), "{refused:?}");
    let sock = thin(&d, "t", json!({"size": 64 * MIB}));
    let v = d.api.get("/v1/disks/t").expect("disk");
    assert_eq!(v["block_size"], 4096, "{v}");

    // libblkio over vhost-user: 4 KiB pieces inside a cluster, across a cluster boundary,
    // at the end; each reads back, the rest of each cluster reads zero.
    let mut c = BlkioClient::connect(&sock, 2, false, 4 << 20).expect("connect");
    let cases = [
        (4096u64, 4096usize),
        (CL - 4096, 8192),
        (5 * MIB + 12288, 200 << 10),
        (64 * MIB - 4096, 4096),
    ];
    write_and_read_back(&mut c, &cases, 40);
    assert!(read(&mut c, 0, 0, 4096).iter().all(|&b| b == 0));
    assert!(read(&mut c, 0, 8192, CL as usize - 16384)
        .iter()
        .all(|&b| b == 0));
    c.io_ok(0, Op::Flush, 0, 0, 0, ReqFlags::empty())
        .expect("flush");

    // A snapshot, then a 4 KiB overwrite in a shared cluster: copy-on-write of the rest.
    d.api
        .post("/v1/disks/t/snapshot", &json!({"snapshot": "t-snap"}))
        .expect("snapshot");
    write(&mut c, 0, 5 * MIB + 16384, &pattern(99, 4096));
    let now = read(&mut c, 1, 5 * MIB, CL as usize);
    let old = pattern(42, 200 << 10);
    assert!(
        now[12288..16384] == old[..4096],
        "copy-on-write kept the cluster"
    );
    assert!(now[16384..20480] == pattern(99, 4096)[..]);
    drop(c);

    // qemu-io over NBD: the export advertises 4096-byte minimum blocks, so QEMU turns a
    // 512-byte write into a read-modify-write of whole blocks.
    let nsock = d.dir.join("nbd.sock");
    d.nbd_export(json!({"disk": "t", "socket": nsock, "name": "t4k"}));
    let uri = format!("nbd+unix:///t4k?socket={}", nsock.display());
    let out = ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 512 512",
        "-c",
        "read -P 0xab 512 512",
        "-c",
        "read -P 0 0 512",
        "-c",
        "read -P 0 1024 3072",
    ]));
    assert!(!out.contains("fail"), "{out}");
    assert_eq!(out.matches("read 512/512").count(), 2, "{out}");

    // The snapshot still has the old bytes; the pool reopens on the 4Kn device.
    d.stop();
    let d = TestDaemon::start_in(dir);
    let v = d.api.get("/v1/disks/t").expect("disk after restart");
    assert_eq!(v["block_size"], 4096, "{v}");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "sv", "pool": "p", "volume": "t-snap"}),
        )
        .expect("attach snapshot");
    let ssock = d.dir.join("sv.sock");
    d.api
        .post("/v1/exports", &json!({"disk": "sv", "socket": ssock}))
        .expect("export snapshot");
    let mut s =
        BlkioClient::connect_opts(&ssock, 1, false, 2 << 20, true).expect("connect snapshot");
    assert!(
        read(&mut s, 0, 5 * MIB + 12288, 200 << 10) == old,
        "snapshot content"
    );
    drop(s);
    d.stop();
    drop(lo);
}
