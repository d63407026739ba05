//! A migration pair of vhost-user exports (`migration_peer`), through the real daemon's API
//! and the real libblkio client: the rules for creating a pair, the ring gate (the second
//! export's queues cannot start while the first one's run, and start once they stopped),
//! the counters, a restart, and the end of a pairing.

mod common;

use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn export(d: &TestDaemon, body: Value) -> Result<Value, String> {
    d.api.post("/v1/exports", &body).map_err(|e| e.to_string())
}

fn migration(d: &TestDaemon, name: &str) -> Value {
    let all = d.api.get("/v1/exports").expect("exports");
    all.as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no export {name}: {all}"))
}

/// Connect a libblkio client in a thread: Ok(client) or Err(what), within `secs` (libblkio
/// may block on a server that does not answer).
fn connect_within(sock: &std::path::Path, secs: u64) -> Result<BlkioClient, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let s = sock.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(BlkioClient::connect(&s, 1, false, 1 << 20).map_err(|e| e.to_string()));
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| Err(format!("no answer within {secs} s")))
}

#[test]
fn a_migration_pair_runs_one_side_at_a_time() {
    watchdog(180);
    let dir = unique_dir("migpair");
    let d = TestDaemon::start_in(dir.clone());
    for n in ["m", "other"] {
        d.api
            .post(
                "/v1/disks",
                &json!({"name": n, "backend": "memory", "size": 8 * MIB}),
            )
            .expect("disk");
    }
    let sa = dir.join("a.sock");
    let sb = dir.join("b.sock");
    export(&d, json!({"name": "a", "disk": "m", "socket": sa})).expect("export a");
    let b = export(
        &d,
        json!({"name": "b", "disk": "m", "socket": sb, "migration_peer": "a"}),
    )
    .expect("export b");
    assert_eq!(b["migration_peer"], "a");
    assert_eq!(b["migration"]["side"], 1);
    assert_eq!(b["migration"]["paired_exports"], 2);

    // The rules: one pair per disk, a peer that exists, of the same disk, vhost-user only.
    let e = export(
        &d,
        json!({"name": "c", "disk": "m", "socket": dir.join("c.sock"), "migration_peer": "a"}),
    )
    .unwrap_err();
    assert!(e.contains("already paired"), "{e}");
    let e = export(
        &d,
        json!({"name": "c", "disk": "m", "socket": dir.join("c.sock"), "migration_peer": "b"}),
    )
    .unwrap_err();
    assert!(e.contains("already paired"), "{e}");
    let e = export(
        &d,
        json!({"name": "c", "disk": "m", "socket": dir.join("c.sock"), "migration_peer": "nope"}),
    )
    .unwrap_err();
    assert!(e.contains("does not exist"), "{e}");
    let e = export(
        &d,
        json!({"name": "c", "disk": "other", "socket": dir.join("c.sock"), "migration_peer": "a"}),
    )
    .unwrap_err();
    assert!(e.contains("of disk \"other\""), "{e}");
    let e = export(
        &d,
        json!({"name": "c", "disk": "m", "type": "nbd", "socket": dir.join("c.sock"), "migration_peer": "a"}),
    )
    .unwrap_err();
    assert!(e.contains("vhost-user-blk"), "{e}");

    // The gate: a's client runs its queue; b's cannot start beside it.
    let mut ca = BlkioClient::connect(&sa, 1, false, 1 << 20).expect("client on a");
    ca.buf()[..4096].copy_from_slice(&pattern(7, 4096));
    ca.io_ok(0, Op::Write, 8192, 4096, 0, ReqFlags::empty())
        .expect("write on a");
    let t0 = Instant::now();
    let r = connect_within(&sb, 30);
    assert!(r.is_err(), "b's queue started while a's ran");
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "b gave up before the gate's wait"
    );
    let m = migration(&d, "b")["migration"].clone();
    assert_eq!(m["refused"], 1, "{m}");
    assert_eq!(m["overlaps"], 0, "{m}");
    // a still serves.
    ca.io_ok(0, Op::Read, 8192, 4096, 0, ReqFlags::empty())
        .expect("read on a after b's attempt");

    // a's client goes (its queue stops): b's client starts and sees a's data.
    drop(ca);
    let mut cb = connect_within(&sb, 30).expect("client on b once a stopped");
    cb.io_ok(0, Op::Read, 8192, 4096, 0, ReqFlags::empty())
        .expect("read on b");
    assert!(
        cb.buf()[..4096] == pattern(7, 4096)[..],
        "b reads a's write"
    );
    let m = migration(&d, "a")["migration"].clone();
    assert!(m["handoffs"].as_u64().unwrap_or(0) >= 1, "{m}");
    assert_eq!(m["overlaps"], 0, "{m}");
    assert_eq!(m["rings_running"], 0, "{m}");
    assert_eq!(migration(&d, "b")["migration"]["rings_running"], 1);
    drop(cb);
    let (_, metrics) = d.api.call_raw("GET", "/metrics", None).expect("metrics");
    assert!(
        metrics.contains("nvmux_export_ring_overlaps_total{export=\"b\",disk=\"m\"} 0"),
        "{metrics}"
    );

    // A restart restores the pair (the peer first).
    d.stop();
    let d = TestDaemon::start_in(dir.clone());
    let b = migration(&d, "b");
    assert_eq!(b["status"], "ok", "{b}");
    assert_eq!(b["migration"]["paired_exports"], 2, "{b}");

    // Deleting a ends the pairing: b forgets its peer, also across a restart.
    d.api.delete("/v1/exports/a").expect("delete a");
    let b = migration(&d, "b");
    assert!(b.get("migration_peer").is_none(), "{b}");
    d.stop();
    let d = TestDaemon::start_in(dir);
    let b = migration(&d, "b");
    assert_eq!(b["status"], "ok");
    assert!(b.get("migration_peer").is_none(), "{b}");
    d.stop();
}
