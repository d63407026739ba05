//! `nvmux bench --fair`: four disks on one backend, saturated at once by clients of equal
//! weight; how evenly is the backend shared? nvmux serves four thin volumes of one pool
//! (one worker thread); qemu-storage-daemon serves four raw files on the same filesystem
//! (one process, its main loop), the closest like-for-like it has (its throttle groups
//! limit, they do not share).

use std::path::PathBuf;
use std::process::Command;

use nvmux_bench::client::Op;
use nvmux_bench::procs;
use nvmux_bench::workload::Measured;
use serde_json::json;

use crate::bench::{prepare_file, run_one, write_report, BenchArgs, Daemon, Res};

const DISKS: usize = 4;
const SIZE: u64 = 512 << 20;

/// Run the same workload on every socket at once; IOPS per socket.
fn together(socks: &[PathBuf], op: Op, qd: usize, secs: u64) -> Res<Vec<Measured>> {
    let results: Vec<std::result::Result<Measured, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = socks
            .iter()
            .map(|sock| {
                s.spawn(move || run_one(sock, 4096, op, qd, secs).map_err(|e| e.to_string()))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    });
    results
        .into_iter()
        .map(|r| r.map_err(|e| e.into()))
        .collect()
}

fn summary(ms: &[Measured]) -> (f64, f64, f64) {
    let v: Vec<f64> = ms.iter().map(|m| m.iops).collect();
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    (min, max, v.iter().sum())
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-fair-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let mut table: Vec<(String, String, Vec<Measured>)> = Vec::new();
    let runs = [
        (Op::Read, "4K randread QD32"),
        (Op::Write, "4K randwrite QD32"),
    ];

    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, "")?;
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
        crate::bench_pool::fill(&sock)?;
        socks.push(sock);
    }
    eprintln!("filled {DISKS} thin volumes of {} MiB", SIZE >> 20);
    for (op, w) in runs {
        let ms = together(&socks, op, 32, secs)?;
        let (min, max, sum) = summary(&ms);
        eprintln!(
            "nvmux thin  {w}: total {sum:.0} IOPS, min/max {:.3}",
            min / max
        );
        table.push(("nvmux (4 thin volumes, one pool)".into(), w.into(), ms));
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
            let ms = together(&qsocks, op, 32, secs)?;
            let (min, max, sum) = summary(&ms);
            eprintln!(
                "qsd raw     {w}: total {sum:.0} IOPS, min/max {:.3}",
                min / max
            );
            table.push(("QSD (4 raw files)".into(), w.into(), ms));
        }
        drop(p);
    }
    let _ = std::fs::remove_dir_all(&work);

    println!(
        "\n{DISKS} disks of {} MiB written end to end, one libblkio client each (all on CPU 1), QD32, {secs} s, at the same time; server on CPU 0, files on {}",
        SIZE >> 20,
        std::env::temp_dir().display()
    );
    println!("| server | workload | IOPS per disk | total | min/max |");
    println!("|---|---|---|---|---|");
    for (s, w, ms) in &table {
        let (min, max, sum) = summary(ms);
        let per: Vec<String> = ms.iter().map(|m| format!("{:.0}", m.iops)).collect();
        println!(
            "| {s} | {w} | {} | {sum:.0} | {:.3} |",
            per.join(" / "),
            min / max
        );
    }
    write_report(
        &a.out,
        "fair-latest.json",
        "fairness",
        secs,
        json!(table
            .iter()
            .map(|(s, w, ms)| json!({"server": s, "workload": w, "per_disk": ms}))
            .collect::<Vec<_>>()),
    )?;
    Ok(())
}
