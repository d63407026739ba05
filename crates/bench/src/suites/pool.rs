//! `nvmux bench --pool`: thin volumes against qemu-storage-daemon's qcow2 and against a
//! raw-file nvmux disk, all on the same filesystem, in one run.

use std::path::{Path, PathBuf};

use crate::client::{BlkioClient, Op};
use crate::procs::{self, QsdTarget};
use crate::workload::Measured;
use blkio::ReqFlags;
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::{
    cell_iops, cell_lat, cell_ratio, measured_rows, prepare_file, run_one, write_report, Res,
};
use crate::run::BenchArgs;

const GIB: u64 = 1 << 30;
/// Virtual size of a fresh volume: large enough that random 4 KiB writes for the whole
/// run keep landing on unallocated clusters.
const FRESH: u64 = 16 * GIB;
/// Size of the fully allocated volume.
const FULL: u64 = GIB;

/// Write every byte once (1 MiB sequential writes), then flush.
pub fn fill(sock: &Path) -> Res<()> {
    let mut c = BlkioClient::connect(sock, 1, false, 2 << 20)?;
    for (i, b) in c.buf().iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let cap = c.capacity();
    let mut off = 0;
    while off < cap {
        let n = (cap - off).min(1 << 20) as usize;
        c.io_ok(0, Op::Write, off, n, 0, ReqFlags::empty())?;
        off += n as u64;
    }
    c.io_ok(0, Op::Flush, 0, 0, 0, ReqFlags::empty())?;
    Ok(())
}

/// What a workload runs on.
#[derive(Clone, Copy, PartialEq)]
enum On {
    /// A new, empty volume (qcow2: a new image): every write allocates.
    Fresh,
    /// The filled volume (qcow2: the filled image).
    Full,
    /// A new clone of a snapshot of the filled volume (qcow2: a new overlay on the
    /// filled image): every first write to a cluster copies it.
    Clone,
}

const RUNS: [(&str, Op, usize, On); 8] = [
    ("allocating randwrite QD1", Op::Write, 1, On::Fresh),
    ("allocating randwrite QD32", Op::Write, 32, On::Fresh),
    ("allocated randwrite QD1", Op::Write, 1, On::Full),
    ("allocated randwrite QD32", Op::Write, 32, On::Full),
    ("allocated randread QD1", Op::Read, 1, On::Full),
    ("allocated randread QD32", Op::Read, 32, On::Full),
    // Last: the snapshot they need turns the filled volume's later writes into copies.
    ("clone randwrite QD1", Op::Write, 1, On::Clone),
    ("clone randwrite QD32", Op::Write, 32, On::Clone),
];

/// `qemu-img create -f qcow2 PATH SIZE [-b BACKING]` (64 KiB clusters).
fn qemu_img(path: &Path, size: u64, backing: Option<&Path>) -> Res<()> {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.arg("-F").arg("qcow2").arg("-b").arg(b);
    }
    let st = cmd.arg(path).arg(size.to_string()).status()?;
    if !st.success() {
        return Err(format!("qemu-img create {} failed", path.display()).into());
    }
    Ok(())
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-pool-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let total = RUNS.len() * 2 + RUNS.iter().filter(|r| r.3 == On::Full).count();
    let mut done = 0;
    let mut rows: Vec<(String, String, Measured)> = Vec::new();
    let mut record = |server: &str, w: &str, m: Measured| {
        done += 1;
        eprintln!(
            "[{done:>2}/{total}] {server:<12} {w:<26} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs",
            m.iops, m.p50_us, m.p99_us
        );
        rows.push((server.into(), w.into(), m));
    };

    // Everything is set up first and the servers run side by side, so each workload runs
    // on nvmux thin, nvmux raw and QSD qcow2 back to back: a disk whose speed drifts
    // over minutes (a shared virtio disk does) then moves all three alike.
    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, "")?;
    d.api().post(
        "/v1/pools",
        &json!({"name": "p", "path": work.join("pool.img"), "size": 2 * FRESH + 2 * GIB,
                "cluster_size": a.cluster_size}),
    )?;
    let disk = |name: &str, body: serde_json::Value| -> Res<PathBuf> {
        d.api().post("/v1/disks", &body)?;
        let sock = ddir.join(format!("{name}.sock"));
        d.api().post(
            "/v1/exports",
            &json!({"disk": name, "socket": sock, "num_queues": 1}),
        )?;
        Ok(sock)
    };
    let full = disk("full", json!({"name": "full", "pool": "p", "size": FULL}))?;
    eprintln!("filling a {} GiB thin volume", FULL / GIB);
    fill(&full)?;
    let raw_img = work.join("raw.img");
    prepare_file(&raw_img, FULL)?;
    let raw = disk(
        "raw",
        json!({"name": "raw", "backend": "file", "path": raw_img}),
    )?;
    let log = work.join("qsd.log");
    let qsock = work.join("qsd-full.sock");
    let fsock = work.join("qsd-fresh.sock");
    let full_qcow2 = work.join("full.qcow2");
    let start_full = || {
        procs::start_qsd(
            &QsdTarget::Qcow2(full_qcow2.clone()),
            &qsock,
            1,
            srv_cpu,
            &log,
        )
    };
    let mut qsd_full = None;
    if !a.no_baselines {
        qemu_img(&full_qcow2, FULL, None)?;
        qsd_full = Some(start_full()?);
        eprintln!("filling a {} GiB qcow2 image", FULL / GIB);
        fill(&qsock)?;
    }
    let mut snapped = false;
    for (i, &(w, op, qd, on)) in RUNS.iter().enumerate() {
        if a.only.as_deref().is_some_and(|o| !w.contains(o)) {
            continue;
        }
        if on == On::Full {
            record("nvmux thin", w, run_one(&full, 4096, op, qd, secs)?);
            record("nvmux raw", w, run_one(&raw, 4096, op, qd, secs)?);
            if !a.no_baselines {
                if qsd_full.is_none() {
                    qsd_full = Some(start_full()?);
                }
                record("qsd qcow2", w, run_one(&qsock, 4096, op, qd, secs)?);
            }
            continue;
        }
        if on == On::Clone {
            // QEMU's image locking refuses a backing file that another QSD writes.
            drop(qsd_full.take());
            if !snapped {
                d.api()
                    .post("/v1/disks/full/snapshot", &json!({"snapshot": "base"}))?;
                snapped = true;
            }
        }
        let n = format!("run{i}");
        let (body, size, backing) = match on {
            On::Clone => (
                json!({"name": n, "pool": "p", "from_snapshot": "base"}),
                FULL,
                Some(full_qcow2.as_path()),
            ),
            _ => (json!({"name": n, "pool": "p", "size": FRESH}), FRESH, None),
        };
        let sock = disk(&n, body)?;
        record("nvmux thin", w, run_one(&sock, 4096, op, qd, secs)?);
        if !a.no_baselines {
            let img = work.join(format!("{n}.qcow2"));
            qemu_img(&img, size, backing)?;
            let q = procs::start_qsd(&QsdTarget::Qcow2(img.clone()), &fsock, 1, srv_cpu, &log)?;
            record("qsd qcow2", w, run_one(&fsock, 4096, op, qd, secs)?);
            drop(q);
            let _ = std::fs::remove_file(&img);
        }
    }
    drop(qsd_full);
    let _ = d.stop();
    let _ = std::fs::remove_dir_all(&work);

    println!(
        "\nThin volumes ({} clusters) vs qemu-storage-daemon qcow2 (64 KiB clusters, cache.direct=on, aio=io_uring) vs a raw-file nvmux disk, all on {}; 4 KiB random I/O through libblkio, {secs} s per run, server on CPU 0",
        a.cluster_size,
        std::env::temp_dir().display()
    );
    println!("| workload | nvmux thin IOPS | p50/p99 µs | QSD qcow2 IOPS | p50/p99 µs | thin/qcow2 | nvmux raw IOPS | thin/raw |");
    println!("|---|---|---|---|---|---|---|---|");
    let find = |s: &str, w: &str| rows.iter().find(|r| r.0 == s && r.1 == w).map(|r| &r.2);
    for (w, ..) in RUNS {
        let (t, q, r) = (
            find("nvmux thin", w),
            find("qsd qcow2", w),
            find("nvmux raw", w),
        );
        println!(
            "| {w} | {} | {} | {} | {} | {} | {} | {} |",
            cell_iops(t),
            cell_lat(t),
            cell_iops(q),
            cell_lat(q),
            cell_ratio(t, q),
            cell_iops(r),
            cell_ratio(t, r)
        );
    }
    write_report(
        &a.out,
        "pool-latest.json",
        "pool 4k",
        secs,
        measured_rows(&rows),
    )?;
    Ok(())
}
