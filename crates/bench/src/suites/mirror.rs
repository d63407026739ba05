//! `nvmux bench --mirror`: what a mirror leg and a remote backend cost, in one run.
//!
//! - **Mirror write cost**: a disk on one /dev/shm file, against a disk on a /dev/shm
//!   file mirrored to a second /dev/shm file (the leg added live and copied first).
//! - **Remote backend**: a disk whose backend is a namespace of a second nvmux daemon
//!   over NVMe/TCP (loopback), against the same disk served by that daemon directly over
//!   vhost-user ("the same disk served locally").
//!
//! Each round runs every workload on every target back to back; the table shows medians.

use serde_json::json;

use crate::client::Op;
use crate::daemon::Daemon;
use crate::report::{
    cell_iops, cell_lat, cell_ratio, measured_rows, median_round, prepare_file, run_one,
    write_report, Res,
};
use crate::run::BenchArgs;
use crate::workload::Measured;

const SIZE: u64 = 256 << 20;
const NQN: &str = "nqn.2026-12.io.nvmux.bench:mirror";
const HOST: &str = "nqn.2026-12.io.nvmux.bench:host";

const RUNS: [(Op, usize, &str); 4] = [
    (Op::Write, 1, "randwrite QD1"),
    (Op::Write, 32, "randwrite QD32"),
    (Op::Read, 1, "randread QD1"),
    (Op::Read, 32, "randread QD32"),
];

/// Wait until every leg of `disk` is healthy.
fn wait_healthy(d: &Daemon, disk: &str) -> Res<()> {
    let t0 = std::time::Instant::now();
    loop {
        let v = d.api().get(&format!("/v1/disks/{disk}/mirror"))?;
        let legs = v["legs"].as_array().cloned().unwrap_or_default();
        if legs.len() > 1 && legs.iter().all(|l| l["state"] == "healthy") {
            return Ok(());
        }
        if t0.elapsed() > std::time::Duration::from_secs(120) {
            return Err(format!("mirror of {disk} not in sync after 120 s: {v}").into());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-mirror-{}", std::process::id()));
    let shm = std::path::PathBuf::from(format!(
        "/dev/shm/nvmux-bench-mirror-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&shm)?;
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&work);
        let _ = std::fs::remove_dir_all(&shm);
    };
    let cfg = format!("[nvmf]\nhostnqn = {HOST:?}");
    let (adir, da) = Daemon::start_bench(&work.join("a"), srv_cpu, &cfg)?;
    // The target daemon stands for another host: on the other CPU (with the client), so
    // that the initiator's busy-polling spell does not take its CPU away.
    let (bdir, db) = Daemon::start_bench(&work.join("b"), srv_cpu.map(|c| 1 - c.min(1)), "")?;
    let mut socks: Vec<(&str, std::path::PathBuf)> = Vec::new();
    let mut add = |d: &Daemon,
                   dir: &std::path::Path,
                   name: &'static str,
                   body: serde_json::Value|
     -> Res<()> {
        d.api().post("/v1/disks", &body)?;
        let sock = dir.join(format!("{name}.sock"));
        d.api().post(
            "/v1/exports",
            &json!({"disk": body["name"], "socket": sock}),
        )?;
        socks.push((name, sock));
        Ok(())
    };
    for f in ["one", "m0", "m1", "remote"] {
        prepare_file(&shm.join(format!("{f}.img")), SIZE)?;
    }
    add(
        &da,
        &adir,
        "1 leg",
        json!({"name": "one", "backend": "file", "path": shm.join("one.img")}),
    )?;
    add(
        &da,
        &adir,
        "mirror 2 legs",
        json!({"name": "m", "backend": "file", "path": shm.join("m0.img")}),
    )?;
    da.api().post(
        "/v1/disks/m/mirror",
        &json!({"file": shm.join("m1.img"), "sync_rate": 0}),
    )?;
    wait_healthy(&da, "m")?;
    db.api().post(
        "/v1/disks",
        &json!({"name": "remote", "backend": "file", "path": shm.join("remote.img")}),
    )?;
    let addr = db.nvmf_subsystem(NQN, HOST, "remote")?;
    add(
        &da,
        &adir,
        "remote backend",
        json!({"name": "r", "backend": "nvmf", "remote": format!("{NQN}@{addr}")}),
    )?;
    let bsock = bdir.join("local.sock");
    db.api()
        .post("/v1/exports", &json!({"disk": "remote", "socket": bsock}))?;
    socks.push(("served locally", bsock));

    let rounds = a.rounds.max(1);
    let mut rows: Vec<(String, String, Measured)> = Vec::new();
    let total = rounds * RUNS.len() * socks.len();
    for _ in 0..rounds {
        for &(op, qd, w) in &RUNS {
            if a.only.as_deref().is_some_and(|o| !w.contains(o)) {
                continue;
            }
            for (server, sock) in &socks {
                let m = run_one(sock, 4096, op, qd, secs)?;
                eprintln!(
                    "[{:>2}/{total}] {server:<15} {w:<15} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs",
                    rows.len() + 1,
                    m.iops,
                    m.p50_us,
                    m.p99_us
                );
                rows.push((server.to_string(), w.to_string(), m));
            }
        }
    }
    let _ = da.stop();
    let _ = db.stop();
    cleanup();
    let find = |s: &str, w: &str| median_round(&rows, s, w);
    println!(
        "\nMirror and remote backend, 256 MiB files on /dev/shm, 4 KiB random I/O through libblkio (vhost-user), {secs} s per run, medians of {rounds} rounds, the initiator daemon on CPU 0, the target daemon and the client on CPU 1"
    );
    println!("| workload | 1 leg IOPS | p50/p99 µs | mirror 2 legs IOPS | p50/p99 µs | mirror/1 leg | served locally IOPS | remote backend IOPS | p50/p99 µs | remote/local |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &(_, _, w) in &RUNS {
        let (one, m, local, remote) = (
            find("1 leg", w),
            find("mirror 2 legs", w),
            find("served locally", w),
            find("remote backend", w),
        );
        if one.is_none() {
            continue;
        }
        println!(
            "| {w} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell_iops(one),
            cell_lat(one),
            cell_iops(m),
            cell_lat(m),
            cell_ratio(m, one),
            cell_iops(local),
            cell_iops(remote),
            cell_lat(remote),
            cell_ratio(remote, local)
        );
    }
    write_report(
        &a.out,
        "mirror-latest.json",
        "mirror",
        secs,
        measured_rows(&rows),
    )?;
    Ok(())
}
