//! `nvmux bench --fair`: four disks on one backend, saturated at once; how evenly is the
//! backend shared? nvmux serves four thin volumes of one pool (one worker thread), with
//! fair sharing off and on (equal weights, then weights 1:2:3:4);
//! qemu-storage-daemon serves four raw files on the same filesystem (one process, its
//! main loop), the closest like-for-like it has (its throttle groups limit, they do not
//! share).

use std::path::PathBuf;
use std::process::Command;

use crate::client::Op;
use crate::procs;
use crate::workload::{run_on_each, Measured, Workload};
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::{prepare_file, write_report, Res};
use crate::run::BenchArgs;

const DISKS: usize = 4;
const SIZE: u64 = 512 << 20;
const WEIGHTED_DEPTH: u32 = 16;

/// 4 KiB random `op` at QD32 on every socket at once; per socket.
fn together(socks: &[PathBuf], op: Op, secs: u64) -> Res<Vec<Measured>> {
    Ok(run_on_each(socks, &Workload::random(op, 4096, 32, secs))?)
}

/// Daemon configuration with fair sharing at `depth` (0: off).
fn fair_cfg(depth: u32) -> String {
    format!("[qos]\nfair_depth = {depth}")
}

/// One measured row: who served, the workload, the weights (if not equal), per-disk IOPS.
struct Row {
    server: String,
    workload: String,
    weights: Option<Vec<u32>>,
    per_disk: Vec<Measured>,
}

impl Row {
    /// min/max of IOPS per unit of weight.
    fn evenness(&self) -> f64 {
        let v: Vec<f64> = self
            .per_disk
            .iter()
            .enumerate()
            .map(|(i, m)| m.iops / self.weights.as_ref().map_or(1.0, |w| w[i] as f64))
            .collect();
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(0.0, f64::max);
        min / max
    }
    fn total(&self) -> f64 {
        self.per_disk.iter().map(|m| m.iops).sum()
    }
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-fair-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let depth = a.fair_depth;
    let mut table: Vec<Row> = Vec::new();
    let runs = [
        (Op::Read, "4K randread QD32"),
        (Op::Write, "4K randwrite QD32"),
    ];
    let mut log_row = |r: Row| {
        eprintln!(
            "{:<40} {}: total {:.0} IOPS, min/max {:.3}",
            r.server,
            r.workload,
            r.total(),
            r.evenness()
        );
        table.push(r);
    };

    // Set up once; every measurement restarts the daemon on the same state with the
    // fair-sharing setting it measures, so "off" and "on" alternate on the same data.
    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, &fair_cfg(0))?;
    d.api().post(
        "/v1/pools",
        &json!({"name": "p", "path": work.join("pool.img"), "size": DISKS as u64 * SIZE + (256 << 20)}),
    )?;
    let mut socks = Vec::new();
    for i in 0..DISKS {
        let n = format!("vm{i}");
        d.api()
            .post("/v1/disks", &json!({"name": n, "pool": "p", "size": SIZE}))?;
        let sock = ddir.join(format!("{n}.sock"));
        d.api()
            .post("/v1/exports", &json!({"disk": n, "socket": sock}))?;
        crate::suites::pool::fill(&sock)?;
        socks.push(sock);
    }
    let _ = d.stop();
    eprintln!("filled {DISKS} thin volumes of {} MiB", SIZE >> 20);
    let on = format!("nvmux, fair_depth {depth}");
    for (op, w) in runs {
        for (label, dp) in [("nvmux, fair sharing off", 0), (on.as_str(), depth)] {
            let (_, d) = Daemon::start_bench(&work, srv_cpu, &fair_cfg(dp))?;
            let per_disk = together(&socks, op, secs)?;
            let _ = d.stop();
            log_row(Row {
                server: label.into(),
                workload: w.into(),
                weights: None,
                per_disk,
            });
        }
    }
    // Unequal weights, set live, at depth 16: the four clients share one CPU, and at a
    // deeper setting the heavy disks' clients cannot issue their shares (the clients,
    // not the backend, become the bottleneck and split the CPU evenly).
    let weights: Vec<u32> = (1..=DISKS as u32).map(|i| 100 * i).collect();
    let (_, d) = Daemon::start_bench(&work, srv_cpu, &fair_cfg(WEIGHTED_DEPTH))?;
    for (i, w) in weights.iter().enumerate() {
        d.api()
            .post(&format!("/v1/disks/vm{i}/qos"), &json!({ "weight": w }))?;
    }
    for (op, w) in runs {
        let per_disk = together(&socks, op, secs)?;
        log_row(Row {
            server: format!("nvmux, fair_depth {WEIGHTED_DEPTH}, weights 1:2:3:4"),
            workload: w.into(),
            weights: Some(weights.clone()),
            per_disk,
        });
    }
    let _ = d.stop();
    let _ = std::fs::remove_file(work.join("pool.img"));

    if !a.no_baselines {
        let mut cmd = Command::new("qemu-storage-daemon");
        let mut qsocks = Vec::new();
        for i in 0..DISKS {
            let img = work.join(format!("raw{i}.img"));
            prepare_file(&img, SIZE)?;
            let sock = work.join(format!("qsd{i}.sock"));
            cmd.arg("--blockdev").arg(format!(
                "driver=file,node-name=n{i},filename={},cache.direct=on,aio=io_uring",
                img.display()
            ));
            cmd.arg("--export").arg(format!(
                "type=vhost-user-blk,id=e{i},node-name=n{i},addr.type=unix,addr.path={},writable=on",
                sock.display()
            ));
            qsocks.push(sock);
        }
        let log = work.join("qsd.log");
        let mut p = procs::spawn_pinned("qemu-storage-daemon", cmd, srv_cpu, &log)?;
        for s in &qsocks {
            procs::wait_for_socket(&mut p, s, &log)?;
        }
        for (op, w) in runs {
            let per_disk = together(&qsocks, op, secs)?;
            log_row(Row {
                server: "QSD (4 raw files)".into(),
                workload: w.into(),
                weights: None,
                per_disk,
            });
        }
        drop(p);
    }
    let _ = std::fs::remove_dir_all(&work);

    println!(
        "\n{DISKS} disks of {} MiB written end to end, one libblkio client each (all on CPU 1), QD32, {secs} s, at the same time; server on CPU 0, files on {}",
        SIZE >> 20,
        std::env::temp_dir().display()
    );
    println!("min/max is of IOPS per unit of weight: 1.000 is a perfect share.");
    println!("| server | workload | IOPS per disk | total | min/max |");
    println!("|---|---|---|---|---|");
    for r in &table {
        let per: Vec<String> = r
            .per_disk
            .iter()
            .map(|m| format!("{:.0}", m.iops))
            .collect();
        println!(
            "| {} | {} | {} | {:.0} | {:.3} |",
            r.server,
            r.workload,
            per.join(" / "),
            r.total(),
            r.evenness()
        );
    }
    write_report(
        &a.out,
        "fair-latest.json",
        "fairness",
        secs,
        json!(table
            .iter()
            .map(|r| json!({"server": r.server, "workload": r.workload, "weights": r.weights, "per_disk": r.per_disk, "min_max": r.evenness()}))
            .collect::<Vec<_>>()),
    )?;
    Ok(())
}
