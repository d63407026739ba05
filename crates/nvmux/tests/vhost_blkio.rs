//! The real daemon, driven over its sockets by the real libblkio vhost-user-blk client.

mod common;

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[test]
fn pattern_over_queues_and_offsets_including_last_block() {
    watchdog(120);
    let d = TestDaemon::start("pattern");
    let (img, sock) = d.disk_and_export("p", 64 * MIB, 4, json!({}));
    let mut c = BlkioClient::connect(&sock, 4, false, 4 << 20).expect("connect");
    assert_eq!(c.num_queues(), 4);
    assert_eq!(c.capacity(), 64 * MIB);
    let cap = c.capacity();
    // (offset, length): aligned and 512-byte-granular offsets, small and large, the last block.
    let cases = [
        (0u64, 4096usize),
        (11776, 512),
        (MIB + 512, 65536),
        (cap / 2, 1 << 20),
        (cap - 8192, 4096),
        (cap - 512, 512),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        c.buf()[..len].copy_from_slice(&data);
        c.io_ok(i % 4, Op::Write, off, len, 0, ReqFlags::empty())
            .expect("write");
    }
    for (i, &(off, len)) in cases.iter().enumerate() {
        c.buf()[..len].fill(0);
        // Read back on a different queue than the one that wrote.
        c.io_ok((i + 1) % 4, Op::Read, off, len, 0, ReqFlags::empty())
            .expect("read");
        assert!(
            c.buf()[..len] == pattern(i as u64 + 1, len)[..],
            "case {i}: read back differs"
        );
        // And the bytes really are in the backing file.
        assert!(
            read_file_at(&img, off, len) == pattern(i as u64 + 1, len),
            "case {i}: file differs"
        );
    }
    let st = d.api.get("/v1/stats").expect("stats");
    assert!(st["disks"]["p"]["write"]["ops"].as_u64().unwrap_or(0) >= cases.len() as u64);
    assert!(st["disks"]["p"]["read"]["ops"].as_u64().unwrap_or(0) >= cases.len() as u64);
    drop(c);
    d.stop();
}

#[test]
fn flush_and_fua_writes() {
    watchdog(120);
    let d = TestDaemon::start("flush");
    let (img, sock) = d.disk_and_export("f", 16 * MIB, 1, json!({}));
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("connect");
    let data = pattern(7, 8192);
    c.buf()[..8192].copy_from_slice(&data);
    c.io_ok(0, Op::Write, 8192, 8192, 0, ReqFlags::FUA)
        .expect("FUA write");
    assert_eq!(read_file_at(&img, 8192, 8192), data);
    c.io_ok(0, Op::Write, 0, 4096, 0, ReqFlags::empty())
        .expect("write");
    c.io_ok(0, Op::Flush, 0, 0, 0, ReqFlags::empty())
        .expect("flush");
    let st = d.api.get("/v1/stats").expect("stats");
    assert!(
        st["disks"]["f"]["other"]["ops"].as_u64().unwrap_or(0) >= 1,
        "flush reached the daemon"
    );
    drop(c);
    d.stop();
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    watchdog(120);
    let d = TestDaemon::start("zeroes");
    let (img, sock) = d.disk_and_export("z", 16 * MIB, 1, json!({}));
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("connect");
    let data = pattern(3, 65536);
    c.buf()[..65536].copy_from_slice(&data);
    c.io_ok(0, Op::Write, 0, 65536, 0, ReqFlags::empty())
        .expect("write");
    c.io_ok(0, Op::Discard, 8192, 16384, 0, ReqFlags::empty())
        .expect("discard");
    c.io_ok(0, Op::WriteZeroes, 32768, 8192, 0, ReqFlags::empty())
        .expect("write zeroes");
    c.buf()[..65536].fill(0xff);
    c.io_ok(0, Op::Read, 0, 65536, 0, ReqFlags::empty())
        .expect("read");
    let got = c.buf()[..65536].to_vec();
    for (i, (&g, &w)) in got.iter().zip(data.iter()).enumerate() {
        let zero = (8192..24576).contains(&i) || (32768..40960).contains(&i);
        assert_eq!(g, if zero { 0 } else { w }, "byte {i}");
    }
    assert!(read_file_at(&img, 8192, 16384).iter().all(|&b| b == 0));
    drop(c);
    d.stop();
}

#[test]
fn out_of_range_lba_fails_only_that_request() {
    watchdog(120);
    let mut d = TestDaemon::start("range");
    let (_img, sock) = d.disk_and_export("r", 4 * MIB, 1, json!({}));
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("connect");
    let cap = c.capacity();
    for (off, len) in [(cap, 4096usize), (cap - 512, 1024), (u64::MAX - 4095, 4096)] {
        let r = c
            .io(0, Op::Read, off, len, 0, ReqFlags::empty())
            .expect("completion");
        assert!(r < 0, "read at {off} len {len} must fail, got {r}");
        let w = c
            .io(0, Op::Write, off, len, 0, ReqFlags::empty())
            .expect("completion");
        assert!(w < 0, "write at {off} len {len} must fail, got {w}");
    }
    // The same connection keeps working, and so does the daemon.
    c.io_ok(0, Op::Read, cap - 4096, 4096, 0, ReqFlags::empty())
        .expect("valid read after errors");
    assert!(d.healthy());
    let st = d.api.get("/v1/stats").expect("stats");
    assert!(
        st["disks"]["r"]["read"]["errors"].as_u64().unwrap_or(0) >= 1,
        "errors are counted by the daemon"
    );
    drop(c);
    d.stop();
}

#[test]
fn read_only_disk_refuses_writes() {
    watchdog(120);
    let d = TestDaemon::start("ro");
    let img = d.dir.join("ro.img");
    std::fs::write(&img, pattern(9, 1 << 20)).expect("image");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "ro", "path": img, "read_only": true}),
        )
        .expect("create read-only disk");
    let sock = d.dir.join("ro.sock");
    d.api
        .post("/v1/exports", &json!({"disk": "ro", "socket": sock}))
        .expect("export");
    // libblkio attaches to a read-only device only when asked to be read-only.
    assert!(BlkioClient::connect(&sock, 1, false, 1 << 20).is_err());
    let mut c = BlkioClient::connect_opts(&sock, 1, false, 1 << 20, true).expect("connect");
    c.io_ok(0, Op::Read, 0, 4096, 0, ReqFlags::empty())
        .expect("reads work");
    assert!(c.buf()[..4096] == pattern(9, 1 << 20)[..4096]);
    c.buf()[..4096].fill(0xee);
    for op in [Op::Write, Op::WriteZeroes, Op::Discard] {
        let r = c
            .io(0, op, 0, 4096, 0, ReqFlags::empty())
            .expect("completion");
        assert!(r < 0, "{op:?} on a read-only disk must fail");
    }
    assert_eq!(
        std::fs::read(&img).expect("read image"),
        pattern(9, 1 << 20),
        "image unchanged"
    );
    drop(c);
    d.stop();
}

#[test]
fn a_new_client_attaches_after_a_disconnect() {
    watchdog(120);
    let d = TestDaemon::start("reconnect");
    let (_img, sock) = d.disk_and_export("c", 8 * MIB, 2, json!({}));
    for round in 0..3u64 {
        let mut c = BlkioClient::connect(&sock, 2, false, 1 << 20).expect("connect");
        if round > 0 {
            c.io_ok(1, Op::Read, round * 4096, 4096, 0, ReqFlags::empty())
                .expect("read");
            assert!(
                c.buf()[..4096] == pattern(round, 4096)[..],
                "data from the previous client"
            );
        }
        c.buf()[..4096].copy_from_slice(&pattern(round + 1, 4096));
        c.io_ok(0, Op::Write, (round + 1) * 4096, 4096, 0, ReqFlags::empty())
            .expect("write");
        drop(c);
    }
    d.stop();
}

#[test]
fn state_survives_a_restart() {
    watchdog(120);
    let d = TestDaemon::start("restart");
    let dir = d.dir.clone();
    let (_img, sock) = d.disk_and_export("keep", 8 * MIB, 2, json!({}));
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "scratch", "backend": "memory", "size": MIB}),
        )
        .expect("memory disk");
    {
        let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("connect");
        c.buf()[..4096].copy_from_slice(&pattern(42, 4096));
        c.io_ok(0, Op::Write, 0, 4096, 0, ReqFlags::empty())
            .expect("write");
    }
    let before_disks = d.api.get("/v1/disks").expect("disks");
    let before_exports = d.api.get("/v1/exports").expect("exports");
    d.stop();
    let d = TestDaemon::start_in(dir);
    assert_eq!(d.api.get("/v1/disks").expect("disks"), before_disks);
    let after: Vec<_> = d
        .api
        .get("/v1/exports")
        .expect("exports")
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        after.len(),
        before_exports.as_array().map_or(0, |a| a.len())
    );
    assert_eq!(after[0]["socket"], before_exports[0]["socket"]);
    let mut c = BlkioClient::connect(&sock, 2, false, 1 << 20).expect("reconnect after restart");
    c.io_ok(1, Op::Read, 0, 4096, 0, ReqFlags::empty())
        .expect("read");
    assert!(c.buf()[..4096] == pattern(42, 4096)[..]);
    drop(c);
    d.stop();
}

#[test]
fn api_errors_are_clear_and_change_nothing() {
    watchdog(60);
    let d = TestDaemon::start("errors");
    let e = d
        .api
        .post("/v1/disks", &json!({"name": "bad/name", "size": MIB}))
        .unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.message.contains("bad/name"), "{}", e.message);
    let e = d
        .api
        .post("/v1/disks", &json!({"name": "n", "backend": "null"}))
        .unwrap_err();
    assert!(e.message.contains("size"), "{}", e.message);
    let e = d.api.get("/v1/disks/missing").unwrap_err();
    assert_eq!(e.status, 404);
    let (_img, _sock) = d.disk_and_export("busy", MIB, 1, json!({}));
    let e = d.api.delete("/v1/disks/busy").unwrap_err();
    assert_eq!(e.status, 409);
    assert!(
        e.message.contains("remove the export first"),
        "{}",
        e.message
    );
    let e = d
        .api
        .post("/v1/disks", &json!({"name": "busy", "size": MIB}))
        .unwrap_err();
    assert_eq!(e.status, 409);
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"disk": "busy", "socket": "/nonexistent-dir/x.sock", "name": "x"}),
        )
        .unwrap_err();
    assert!(e.message.contains("/nonexistent-dir"), "{}", e.message);
    // Nothing half-created.
    assert_eq!(
        d.api
            .get("/v1/disks")
            .expect("list")
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
    assert_eq!(
        d.api
            .get("/v1/exports")
            .expect("list")
            .as_array()
            .map(|a| a.len()),
        Some(1)
    );
    d.api.delete("/v1/exports/busy").expect("remove export");
    d.api.delete("/v1/disks/busy").expect("delete disk");
    let (code, text) = d.api.call_raw("GET", "/metrics", None).expect("metrics");
    assert_eq!(code, 200);
    assert!(text.contains("# TYPE nvmux_disk_latency_seconds histogram"));
    d.stop();
}

#[test]
fn one_daemon_per_data_dir_and_safe_socket_paths() {
    watchdog(120);
    let d = TestDaemon::start("guards");
    let (_img, sock) = d.disk_and_export("g", 4 * MIB, 1, json!({}));
    // A second daemon on the same data directory is refused and disturbs nothing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvmux"))
        .arg("serve")
        .arg("--data-dir")
        .arg(&d.dir)
        .output()
        .expect("run second daemon");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another nvmux daemon"));
    let mut c = BlkioClient::connect(&sock, 1, false, 1 << 20).expect("first daemon still serves");
    c.io_ok(0, Op::Read, 0, 4096, 0, ReqFlags::empty())
        .expect("read");
    drop(c);
    // An export never replaces a file that is not a socket, nor the API socket.
    let precious = d.dir.join("precious.txt");
    std::fs::write(&precious, b"keep me").expect("write");
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"disk": "g", "name": "x", "socket": precious}),
        )
        .unwrap_err();
    assert!(e.message.contains("not a socket"), "{}", e.message);
    assert_eq!(std::fs::read(&precious).expect("read"), b"keep me");
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"disk": "g", "name": "y", "socket": d.dir.join(".").join("nvmux.sock")}),
        )
        .unwrap_err();
    assert!(e.message.contains("API socket"), "{}", e.message);
    // A socket another server listens on is not taken over.
    let live = d.dir.join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).expect("bind");
    let e = d
        .api
        .post(
            "/v1/exports",
            &json!({"disk": "g", "name": "z", "socket": live}),
        )
        .unwrap_err();
    assert!(e.message.contains("in use"), "{}", e.message);
    // Read-only applies to every backend (here null): libblkio must ask for read-only.
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "nro", "backend": "null", "size": MIB, "read_only": true}),
        )
        .expect("null disk");
    let s2 = d.dir.join("nro.sock");
    d.api
        .post("/v1/exports", &json!({"disk": "nro", "socket": s2}))
        .expect("export");
    assert!(
        BlkioClient::connect(&s2, 1, false, 1 << 20).is_err(),
        "device must be read-only"
    );
    // A bad size creates nothing, and the name stays free.
    let e = d
        .api
        .post("/v1/disks", &json!({"name": "odd", "size": 1000}))
        .unwrap_err();
    assert_eq!(e.status, 400, "{}", e.message);
    d.api
        .post("/v1/disks", &json!({"name": "odd", "size": MIB}))
        .expect("same name works after a failure");
    // Shutdown works even if someone removed an export's socket file.
    std::fs::remove_file(&sock).expect("remove socket file");
    d.stop();
}

#[test]
fn a_vanished_image_is_reported_not_recreated() {
    watchdog(120);
    let d = TestDaemon::start("vanish");
    let dir = d.dir.clone();
    let (img, _sock) = d.disk_and_export("v", 4 * MIB, 1, json!({}));
    d.stop();
    std::fs::remove_file(&img).expect("remove image");
    let d = TestDaemon::start_in(dir);
    let disk = d.api.get("/v1/disks/v").expect("disk still listed");
    let status = disk["status"].as_str().unwrap_or("");
    assert!(
        status.starts_with("error") && status.contains("does not exist"),
        "{status}"
    );
    assert!(!img.exists(), "no empty image was created in its place");
    let exports = d.api.get("/v1/exports").expect("exports");
    assert!(
        exports[0]["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("error"),
        "{exports}"
    );
    d.stop();
}
