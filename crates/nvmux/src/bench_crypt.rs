//! `nvmux bench --crypt`: an encrypted nvmux disk against the same disk unencrypted and
//! against qemu-storage-daemon's `luks` driver (AES-256-XTS, plain64), all file-backed
//! on the same filesystem, in one run; each workload runs on the three back to back.

use std::path::Path;
use std::time::Duration;

use nvmux_bench::client::{BlkioClient, Op};
use nvmux_bench::procs::{self, QsdTarget};
use nvmux_bench::workload::{Measured, Workload};
use serde_json::json;

use crate::bench::{prepare_file, BenchArgs, Daemon, Res};

const SIZE: u64 = 1 << 30;

const RUNS: [(usize, Op, usize); 8] = [
    (4096, Op::Read, 1),
    (4096, Op::Read, 32),
    (4096, Op::Write, 1),
    (4096, Op::Write, 32),
    (128 << 10, Op::Read, 1),
    (128 << 10, Op::Read, 32),
    (128 << 10, Op::Write, 1),
    (128 << 10, Op::Write, 32),
];

fn name(bs: usize, op: Op, qd: usize) -> String {
    let op = if op == Op::Read {
        "randread"
    } else {
        "randwrite"
    };
    format!("{}K {op} QD{qd}", bs >> 10)
}

/// One libblkio workload of `bs`-byte random I/O at `qd` on one queue.
pub(crate) fn run_one(sock: &Path, bs: usize, op: Op, qd: usize, secs: u64) -> Res<Measured> {
    let mut c = BlkioClient::connect(sock, 1, false, qd * bs)?;
    Ok(nvmux_bench::workload::run(
        &mut c,
        &Workload {
            op,
            block_size: bs,
            queue_depth: qd,
            duration: Duration::from_secs(secs),
            queue: 0,
        },
    )?)
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-crypt-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let kek = work.join("kek");
    std::fs::write(
        &kek,
        nvmux_func::keys::new_data_key()?
            .get(..32)
            .unwrap_or(&[0; 32]),
    )?;
    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, &format!("[keys]\nkek_file = {kek:?}"))?;
    let mut socks = Vec::new();
    for (n, enc) in [("plain", false), ("enc", true)] {
        let img = work.join(format!("{n}.img"));
        prepare_file(&img, SIZE)?;
        d.api().post(
            "/v1/disks",
            &json!({"name": n, "backend": "file", "path": img, "encrypt": enc}),
        )?;
        let sock = ddir.join(format!("{n}.sock"));
        d.api()
            .post("/v1/exports", &json!({"disk": n, "socket": sock}))?;
        socks.push(sock);
    }
    let qsd = if a.no_baselines {
        None
    } else {
        let img = work.join("luks.img");
        let secret = "nvmux-bench";
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "luks", "--object"])
            .arg(format!("secret,id=s,data={secret}"))
            .args([
                "-o",
                "key-secret=s,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,iter-time=10,preallocation=full",
            ])
            .arg(&img)
            .arg(SIZE.to_string())
            .status()?;
        if !st.success() {
            return Err("qemu-img create -f luks failed".into());
        }
        let sock = work.join("qsd.sock");
        let p = procs::start_qsd(
            &QsdTarget::Luks {
                path: img,
                secret: secret.into(),
            },
            &sock,
            1,
            srv_cpu,
            &work.join("qsd.log"),
        )?;
        Some((p, sock))
    };
    let mut rows: Vec<(String, String, Measured)> = Vec::new();
    let total = RUNS.len() * if qsd.is_some() { 3 } else { 2 };
    for &(bs, op, qd) in &RUNS {
        let w = name(bs, op, qd);
        if a.only.as_deref().is_some_and(|o| !w.contains(o)) {
            continue;
        }
        let mut targets = vec![("nvmux plain", &socks[0]), ("nvmux crypt", &socks[1])];
        if let Some((_, s)) = &qsd {
            targets.push(("qsd luks", s));
        }
        for (server, sock) in targets {
            let m = run_one(sock, bs, op, qd, secs)?;
            eprintln!(
                "[{:>2}/{total}] {server:<12} {w:<20} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs",
                rows.len() + 1,
                m.iops,
                m.p50_us,
                m.p99_us
            );
            rows.push((server.into(), w.clone(), m));
        }
    }
    drop(qsd);
    let _ = d.stop();
    let _ = std::fs::remove_dir_all(&work);

    println!(
        "\nEncrypted nvmux disk (aes-xts-plain64, AES-NI) vs the same disk unencrypted vs qemu-storage-daemon luks (aes-256-xts-plain64, cache.direct=on, aio=io_uring), 1 GiB files on {}; random I/O through libblkio, {secs} s per run, server on CPU 0",
        std::env::temp_dir().display()
    );
    println!("| workload | nvmux plain IOPS | nvmux crypt IOPS | p50/p99 µs | crypt/plain | QSD luks IOPS | p50/p99 µs | crypt/luks |");
    println!("|---|---|---|---|---|---|---|---|");
    let find = |s: &str, w: &str| rows.iter().find(|r| r.0 == s && r.1 == w).map(|r| &r.2);
    for &(bs, op, qd) in &RUNS {
        let w = name(bs, op, qd);
        let (p, c, l) = (
            find("nvmux plain", &w),
            find("nvmux crypt", &w),
            find("qsd luks", &w),
        );
        if c.is_none() {
            continue;
        }
        let iops = |m: Option<&Measured>| m.map_or("-".into(), |m| format!("{:.0}", m.iops));
        let lat = |m: Option<&Measured>| {
            m.map_or("-".into(), |m| format!("{:.1}/{:.1}", m.p50_us, m.p99_us))
        };
        let ratio = |a: Option<&Measured>, b: Option<&Measured>| match (a, b) {
            (Some(a), Some(b)) if b.iops > 0.0 => format!("{:.2}x", a.iops / b.iops),
            _ => "-".into(),
        };
        println!(
            "| {w} | {} | {} | {} | {} | {} | {} | {} |",
            iops(p),
            iops(c),
            lat(c),
            ratio(c, p),
            iops(l),
            lat(l),
            ratio(c, l)
        );
    }
    std::fs::create_dir_all(&a.out)?;
    let report = json!({
        "kind": "crypt",
        "seconds_per_run": secs,
        "rows": rows.iter().map(|(s, w, m)| json!({"server": s, "workload": w, "m": m})).collect::<Vec<_>>(),
    });
    std::fs::write(
        a.out.join("crypt-latest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}
