//! `nvmux bench --nvmf`: one file disk served over NVMe/TCP (driven by nvmux-bench's
//! host-side initiator over loopback) and over vhost-user-blk (libblkio), against fio
//! io_uring O_DIRECT on the same file (bare metal), each workload back to back.
//!
//! The guest kernel initiator's figures come from the VM stage (TCG-bound); see
//! docs/benchmarks.md.

use crate::client::Op;
use crate::nvmf::Host;
use crate::workload::{Measured, Workload};
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::{
    cell_iops, cell_lat, cell_ratio, measured_rows, prepare_file, run_one, write_report, Res,
};
use crate::run::BenchArgs;

const SIZE: u64 = 1 << 30;
const NQN: &str = "nqn.2026-11.io.nvmux:bench";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000be9c4";

const RUNS: [(Op, usize, &str); 4] = [
    (Op::Read, 1, "4K randread QD1"),
    (Op::Read, 32, "4K randread QD32"),
    (Op::Write, 1, "4K randwrite QD1"),
    (Op::Write, 32, "4K randwrite QD32"),
];

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>, cli_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-nvmf-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, "")?;
    let img = work.join("d.img");
    prepare_file(&img, SIZE)?;
    d.api().post(
        "/v1/disks",
        &json!({"name": "d", "backend": "file", "path": img}),
    )?;
    let sock = ddir.join("d.sock");
    d.api()
        .post("/v1/exports", &json!({"disk": "d", "socket": sock}))?;
    let addr = d.nvmf_subsystem(NQN, HOST, "d")?;
    if let Some(c) = cli_cpu {
        crate::procs::pin_current_thread(c);
    }
    let mut host = Host::connect(addr, NQN, HOST, 1, 128, false)?;
    let mut rows: Vec<(String, String, Measured)> = Vec::new();
    for (op, qd, w) in RUNS {
        if a.only.as_deref().is_some_and(|o| !w.contains(o)) {
            continue;
        }
        let m = crate::nvmf::run_workload(&mut host, 1, &Workload::random(op, 4096, qd, secs))?;
        report(&mut rows, "nvmux nvme/tcp", w, m);
        let m = run_one(&sock, 4096, op, qd, secs)?;
        report(&mut rows, "nvmux vhost-user", w, m);
        if !a.no_baselines {
            let rw = if op == Op::Read {
                "randread"
            } else {
                "randwrite"
            };
            let m = crate::procs::run_fio(&img, rw, 4096, qd, secs, cli_cpu)?;
            report(&mut rows, "fio io_uring", w, m);
        }
    }
    host.shutdown()?;
    let _ = d.stop();
    let _ = std::fs::remove_dir_all(&work);

    println!(
        "\nNVMe/TCP (nvmux-bench initiator over loopback, one I/O queue) vs vhost-user-blk (libblkio) on the same nvmux file disk vs fio io_uring O_DIRECT on the file; 1 GiB file on {}, {secs} s per run",
        std::env::temp_dir().display()
    );
    println!("| workload | nvme/tcp IOPS | p50/p99 µs | vhost-user IOPS | tcp/vhost | fio IOPS | tcp/fio |");
    println!("|---|---|---|---|---|---|---|");
    let find = |s: &str, w: &str| rows.iter().find(|r| r.0 == s && r.1 == w).map(|r| &r.2);
    for (_, _, w) in RUNS {
        let (t, v, f) = (
            find("nvmux nvme/tcp", w),
            find("nvmux vhost-user", w),
            find("fio io_uring", w),
        );
        if t.is_none() {
            continue;
        }
        println!(
            "| {w} | {} | {} | {} | {} | {} | {} |",
            cell_iops(t),
            cell_lat(t),
            cell_iops(v),
            cell_ratio(t, v),
            cell_iops(f),
            cell_ratio(t, f)
        );
    }
    write_report(
        &a.out,
        "nvmf-latest.json",
        "nvmf",
        secs,
        measured_rows(&rows),
    )?;
    Ok(())
}

fn report(rows: &mut Vec<(String, String, Measured)>, server: &str, w: &str, m: Measured) {
    eprintln!(
        "[{:>2}] {server:<18} {w:<20} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs",
        rows.len() + 1,
        m.iops,
        m.p50_us,
        m.p99_us
    );
    rows.push((server.into(), w.into(), m));
}
