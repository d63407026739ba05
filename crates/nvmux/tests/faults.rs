//! A panic while serving one connection stays with that connection. The daemon runs with
//! the test fault `nbd-request:bait` armed (`NVMUX_TEST_FAULTS`, see `nvmux_core::fault`):
//! the first NBD connection to export `bait` panics on its worker as soon as it has a
//! request in the kernel. On one worker thread, beside a verified libblkio victim, the
//! daemon must log and count the panic, close only that connection (its io_uring queue is
//! dropped with the request in flight), and go on serving the victim and new connections
//! to the same disk.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{watchdog, TestDaemon};
use nvmux_bench::attack::Victim;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// `qemu-io` on an NBD export behind a Unix socket, bounded by `timeout`.
fn qemu_io(sock: &Path, export: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.arg("60").arg("qemu-io").arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(format!("nbd+unix:///{export}?socket={}", sock.display()));
    let out = c.output().expect("run qemu-io (package qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = !out.status.success() || text.contains("error") || text.contains("failed");
    (!failed, text)
}

#[test]
fn a_panic_serving_one_connection_closes_only_that_connection() {
    watchdog(240);
    // Read once by the daemon at start; this test binary starts no other daemon.
    std::env::set_var("NVMUX_TEST_FAULTS", "nbd-request:bait");
    let dir = common::unique_dir("faults");
    let mut d = TestDaemon::start_with(dir, &["--workers", "1"]);
    std::env::remove_var("NVMUX_TEST_FAULTS");
    let (_, vsock) = d.disk_and_export("victim", 64 * MIB, 1, json!({}));
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "shared", "path": d.dir.join("shared.img"), "size": 64 * MIB}),
        )
        .expect("disk");
    let bait = d.dir.join("bait.sock");
    let calm = d.dir.join("calm.sock");
    for (name, sock) in [("bait", &bait), ("calm", &calm)] {
        d.api
            .post(
                "/v1/exports",
                &json!({"name": name, "disk": "shared", "type": "nbd", "socket": sock, "export_name": name}),
            )
            .expect("nbd export");
    }
    let victim = Victim::vhost(&vsock).expect("victim I/O");

    let (ok, text) = qemu_io(&bait, "bait", &["read 0 64k"]);
    assert!(!ok, "the read on the faulty connection succeeded: {text}");

    assert!(d.healthy(), "daemon died: {}", d.log());
    assert!(
        d.log().contains("injected fault nbd-request:bait"),
        "the panic is not in the log: {}",
        d.log()
    );
    let stats = d.api.get("/v1/stats").expect("stats");
    let panics: u64 = stats["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["panics"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(panics, 1, "panics counted: {stats}");
    let (_, metrics) = d.api.call_raw("GET", "/metrics", None).expect("metrics");
    assert!(
        metrics.contains("nvmux_worker_panics_total{worker=\"0\"} 1"),
        "metric missing: {metrics}"
    );

    // The victim on the same worker never saw an error and goes on.
    assert!(
        victim.progresses(200, Duration::from_secs(30)),
        "victim stopped after the panic"
    );
    // The disk whose queue was dropped mid-request still serves new connections.
    let (ok, text) = qemu_io(&calm, "calm", &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    assert!(ok, "the same disk through another export: {text}");
    let done = victim.finish().expect("victim without errors");
    assert!(done > 0);
    d.stop();
}
