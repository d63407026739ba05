//! `nvmux bench --crypt`: an encrypted nvmux disk against the same disk unencrypted and
//! against qemu-storage-daemon's `luks` driver (AES-256-XTS, plain64), all file-backed
//! on the same filesystem, in one run; each workload runs on the three back to back.

use nvmux_bench::client::Op;
use nvmux_bench::procs::{self, QsdTarget};
use nvmux_bench::workload::Measured;
use serde_json::json;

use crate::bench::{
    cell_iops, cell_lat, cell_ratio, measured_rows, prepare_file, run_one, write_report, BenchArgs,
    Daemon, Res,
};

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

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-crypt-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let kek = work.join("kek");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // Mode 0600: the daemon refuses a KEK others may read.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&kek)?
            .write_all(&nvmux_func::keys::new_data_key()?[..32])?;
    }
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
        println!(
            "| {w} | {} | {} | {} | {} | {} | {} | {} |",
            cell_iops(p),
            cell_iops(c),
            cell_lat(c),
            cell_ratio(c, p),
            cell_iops(l),
            cell_lat(l),
            cell_ratio(c, l)
        );
    }
    write_report(
        &a.out,
        "crypt-latest.json",
        "crypt",
        secs,
        measured_rows(&rows),
    )?;
    Ok(())
}
