//! Rate limits through the real daemon, measured by the real libblkio client. Tolerances
//! are generous (10% over several seconds), as the issue asks; rates are measured, not
//! wall-clock assertions on the daemon's speed.

mod common;

use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use nvmux_bench::workload::{run, run_on_each, Workload};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn measure(c: &mut BlkioClient, op: Op, bs: usize, qd: usize, secs: u64) -> f64 {
    run(c, &Workload::random(op, bs, qd, secs))
        .expect("workload")
        .iops
}

fn within(got: f64, want: f64, what: &str) {
    let r = got / want;
    println!("{what}: {got:.0} against a limit of {want:.0} ({r:.3}x)");
    assert!((0.9..=1.1).contains(&r), "{what}: {got:.0} vs {want:.0}");
}

#[test]
fn limits_hold_and_change_live() {
    watchdog(180);
    let d = TestDaemon::start("qos");
    let (_img, sock) = d.disk_and_export("q", 64 * MIB, 1, json!({"qos": {"iops_total": 1000}}));
    let mut c = BlkioClient::connect(&sock, 1, false, 16 * 65536).expect("connect");
    within(
        measure(&mut c, Op::Read, 4096, 16, 5),
        1000.0,
        "iops_total 1000, 4K read QD16",
    );

    // Live change on the same connection: no reattach.
    d.api
        .post(
            "/v1/disks/q/qos",
            &json!({"iops_read": 2500, "iops_total": 4000}),
        )
        .expect("set qos");
    within(
        measure(&mut c, Op::Read, 4096, 16, 4),
        2500.0,
        "iops_read 2500, 4K read",
    );
    within(
        measure(&mut c, Op::Write, 4096, 16, 4),
        4000.0,
        "iops_total 4000, 4K write",
    );

    // Bandwidth: 8 MiB/s of 64 KiB writes is 128 IOPS.
    d.api
        .post("/v1/disks/q/qos", &json!({"bps_write": 8 * MIB}))
        .expect("set qos");
    within(
        measure(&mut c, Op::Write, 65536, 8, 5),
        128.0,
        "bps_write 8 MiB/s, 64K write",
    );

    // Contradictory limits: a clear error, and the limits in force do not change.
    let e = d
        .api
        .post(
            "/v1/disks/q/qos",
            &json!({"iops_read": 5000, "iops_total": 1000}),
        )
        .expect_err("contradictory");
    assert_eq!(e.status, 400);
    assert!(
        e.to_string()
            .contains("iops_read = 5000 exceeds iops_total = 1000"),
        "{e}"
    );
    let e = d
        .api
        .post("/v1/disks/q/qos", &json!({"iops": 5}))
        .expect_err("unknown field");
    assert!(e.to_string().contains("iops"), "{e}");
    let v = d.api.get("/v1/disks/q").expect("disk");
    assert_eq!(v["qos"], json!({"bps_write": 8 * MIB}));

    // Removing every limit: back to full speed (well above the old limit).
    d.api.post("/v1/disks/q/qos", &json!({})).expect("clear");
    assert!(d.api.get("/v1/disks/q").expect("disk").get("qos").is_none());
    let free = measure(&mut c, Op::Write, 65536, 8, 2);
    assert!(free > 2.0 * 128.0, "unlimited: {free:.0} IOPS");
    drop(c);

    // Limits persist across a restart.
    d.api
        .post("/v1/disks/q/qos", &json!({"iops_total": 700}))
        .expect("set qos");
    let dir = d.dir.clone();
    d.stop();
    let d = TestDaemon::start_in(dir);
    let mut c = BlkioClient::connect(&sock, 1, false, 16 * 4096).expect("reconnect");
    within(
        measure(&mut c, Op::Read, 4096, 8, 4),
        700.0,
        "iops_total 700 after restart",
    );
    drop(c);
    d.stop();
}

/// Run the same workload on several sockets at once; IOPS of each.
fn together(socks: &[&std::path::Path], op: Op, bs: usize, qd: usize, secs: u64) -> Vec<f64> {
    run_on_each(socks, &Workload::random(op, bs, qd, secs))
        .expect("workloads")
        .iter()
        .map(|m| m.iops)
        .collect()
}

/// Write `len` bytes from the start of a disk, 1 MiB at a time, so reads reach the device.
fn fill(sock: &std::path::Path, len: u64) {
    let mut c = BlkioClient::connect(sock, 1, false, MIB as usize).expect("connect");
    c.buf().fill(0x5a);
    for off in (0..len).step_by(MIB as usize) {
        c.io_ok(0, Op::Write, off, MIB as usize, 0, blkio::ReqFlags::empty())
            .expect("fill");
    }
}

/// Two disks on one host device share it by weight once it is saturated. `fair_depth`
/// is small, so the group's slots are the bottleneck: the disks are written first, so
/// each read waits for the device (tens of µs) and the clients and the daemon's CPU are
/// not the limit (reads of unwritten file space complete inline, at memory speed, and
/// then the CPU would decide). The two disks' queues run on different workers, so slots
/// cross threads.
#[test]
fn fair_sharing_follows_weights_and_changes_live() {
    watchdog(180);
    let dir = unique_dir("fair");
    let cfg = dir.join("nvmux.toml");
    std::fs::write(&cfg, "[qos]\nfair_depth = 2\n").expect("config");
    let d = TestDaemon::start_with(dir, &["--config", cfg.to_str().expect("utf-8 path")]);
    let (_a, sa) = d.disk_and_export("a", 64 * MIB, 1, json!({"qos": {"weight": 100}}));
    let (_b, sb) = d.disk_and_export("b", 64 * MIB, 1, json!({"qos": {"weight": 300}}));
    fill(&sa, 64 * MIB);
    fill(&sb, 64 * MIB);

    let r = together(&[&sa, &sb], Op::Read, 4096, 8, 4);
    let ratio = r[1] / r[0];
    println!(
        "weights 100:300, 4K randread QD8 each: {:.0} / {:.0} IOPS, ratio {ratio:.2}",
        r[0], r[1]
    );
    assert!((2.0..=4.5).contains(&ratio), "{r:?}");

    // Equal weights, set live: the same connections' next run shares evenly.
    d.api
        .post("/v1/disks/b/qos", &json!({"weight": 100}))
        .expect("set weight");
    let r = together(&[&sa, &sb], Op::Read, 4096, 8, 4);
    let ratio = r[1] / r[0];
    println!(
        "weights 100:100: {:.0} / {:.0} IOPS, ratio {ratio:.2}",
        r[0], r[1]
    );
    assert!((0.75..=1.33).contains(&ratio), "{r:?}");

    let st = d.api.get("/v1/stats").expect("stats");
    let (fa, fb) = (&st["disks"]["a"]["fair"], &st["disks"]["b"]["fair"]);
    assert_eq!(fa["group"], fb["group"], "one host device, one group");
    assert_eq!(fa["depth"], 2);
    assert!(fa["waited"].as_u64().unwrap_or(0) > 0, "{fa}");

    let e = d
        .api
        .post("/v1/disks/a/qos", &json!({"weight": 0}))
        .expect_err("weight 0");
    assert!(e.to_string().contains("weight 0 is out of range"), "{e}");
    d.stop();
}
