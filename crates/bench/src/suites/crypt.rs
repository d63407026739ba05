//! `nvmux bench --crypt`: an encrypted nvmux disk against the same disk unencrypted and
//! against qemu-storage-daemon's `luks` driver (AES-256-XTS, plain64), all file-backed
//! on the same filesystem, in one run; each workload runs on the three back to back.
//!
//! First, on the same run, the XTS kernels alone (CPU only): nvmux's `xts.rs` against
//! RustCrypto's `xts-mode` crate over the same `aes` crate, after checking that both give
//! the same ciphertext. `xts.rs` stays only while `xts-mode` is slower (docs/benchmarks.md).
//! `--only xts` runs just this part.

use crate::client::Op;
use crate::procs::{self, QsdTarget};
use crate::workload::Measured;
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::{
    cell_iops, cell_lat, cell_ratio, measured_rows, median_round, prepare_file, run_one,
    write_report, Res,
};
use crate::run::BenchArgs;

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

/// One XTS kernel measurement: MB/s of plaintext processed.
struct Kernel {
    what: String,
    /// `Xts::new`: the AES-NI kernel where the CPU has AES-NI.
    nvmux: f64,
    /// `Xts::portable`: the kernel over the `aes` crate.
    portable: f64,
    xts_mode: f64,
}

/// Bytes/s of `f` over `buf`, the best of 5 rounds of about `round` each (the best
/// filters out preemption on a shared machine).
fn rate(buf: &mut [u8], round: std::time::Duration, f: &mut dyn FnMut(&mut [u8], u64)) -> f64 {
    let mut best = 0f64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let mut n = 0u64;
        while t.elapsed() < round {
            for _ in 0..64 {
                f(buf, n);
                n += 1;
            }
        }
        best = best.max(n as f64 * buf.len() as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// nvmux's XTS against `xts-mode` 0.5 (both on `aes` 0.8, AES-NI), same key, same
/// buffers, alternating. Fails if they disagree on a single byte.
fn xts_kernels() -> Res<Vec<Kernel>> {
    use aes::cipher::KeyInit;
    use xts_mode::{get_tweak_default, Xts128};
    let key = nvmux_func::keys::new_data_key()?;
    let ours = nvmux_func::xts::Xts::new(&key);
    let soft = nvmux_func::xts::Xts::portable(&key);
    let theirs = Xts128::<aes::Aes256>::new(
        aes::Aes256::new_from_slice(&key[..32]).map_err(|_| "AES key")?,
        aes::Aes256::new_from_slice(&key[32..]).map_err(|_| "AES key")?,
    );
    // Same ciphertext first (IVs counting sectors: xts-mode's get_tweak_default).
    for sector in [512usize, 4096] {
        let plain: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
        let (mut a, mut b) = (plain.clone(), plain.clone());
        let mut c = plain.clone();
        ours.encrypt_iv(&mut a, sector, 1000, 1);
        soft.encrypt_iv(&mut c, sector, 1000, 1);
        theirs.encrypt_area(&mut b, sector, 1000, get_tweak_default);
        if a != b || c != b {
            return Err(format!(
                "xts.rs ({}, portable) and xts-mode disagree ({sector}-byte sectors)",
                ours.kernel()
            )
            .into());
        }
        ours.decrypt_iv(&mut b, sector, 1000, 1);
        if b != plain {
            return Err("xts.rs does not decrypt xts-mode's ciphertext".into());
        }
    }
    let round = std::time::Duration::from_millis(100);
    let mut out = Vec::new();
    for len in [4096usize, 65536] {
        for sector in [512usize, 4096] {
            for enc in [true, false] {
                let mut buf = vec![0x5au8; len];
                let ns = (len / sector) as u64;
                let n = rate(&mut buf, round, &mut |b, i| {
                    if enc {
                        ours.encrypt_iv(b, sector, i * ns, 1)
                    } else {
                        ours.decrypt_iv(b, sector, i * ns, 1)
                    }
                });
                let p = rate(&mut buf, round, &mut |b, i| {
                    if enc {
                        soft.encrypt_iv(b, sector, i * ns, 1)
                    } else {
                        soft.decrypt_iv(b, sector, i * ns, 1)
                    }
                });
                let x = rate(&mut buf, round, &mut |b, i| {
                    let first = (i * ns) as u128;
                    if enc {
                        theirs.encrypt_area(b, sector, first, get_tweak_default)
                    } else {
                        theirs.decrypt_area(b, sector, first, get_tweak_default)
                    }
                });
                let k = Kernel {
                    what: format!(
                        "{} {} KiB in {sector}-byte sectors",
                        if enc { "encrypt" } else { "decrypt" },
                        len >> 10
                    ),
                    nvmux: n / 1e6,
                    portable: p / 1e6,
                    xts_mode: x / 1e6,
                };
                eprintln!(
                    "xts {:<36} xts.rs {:>7.0} MB/s  portable {:>7.0} MB/s  xts-mode {:>7.0} MB/s",
                    k.what, k.nvmux, k.portable, k.xts_mode
                );
                out.push(k);
            }
        }
    }
    Ok(out)
}

fn print_kernels(ks: &[Kernel], kernel: &str) {
    println!("\nXTS-AES-256 kernels alone, one thread, same key and buffers, best of 5 × 0.1 s (MB/s of data; 4 KiB = one block I/O); xts.rs runs its {kernel} kernel:");
    println!("| operation | nvmux xts.rs MB/s | µs per 4 KiB | xts.rs portable MB/s | µs per 4 KiB | xts-mode 0.5 MB/s | µs per 4 KiB | xts.rs / portable | xts.rs / xts-mode |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for k in ks {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2}x | {:.2}x |",
            k.what,
            k.nvmux,
            4096.0 / k.nvmux,
            k.portable,
            4096.0 / k.portable,
            k.xts_mode,
            4096.0 / k.xts_mode,
            k.nvmux / k.portable,
            k.nvmux / k.xts_mode
        );
    }
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let kernels = xts_kernels()?;
    let kernel = nvmux_func::xts::Xts::new(&[0u8; nvmux_func::xts::KEY_BYTES]).kernel();
    if a.only.as_deref() == Some("xts") {
        print_kernels(&kernels, kernel);
        return Ok(());
    }
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
    let rounds = a.rounds.max(1);
    let total = rounds * RUNS.len() * if qsd.is_some() { 3 } else { 2 };
    for &(bs, op, qd) in RUNS.iter().cycle().take(rounds * RUNS.len()) {
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

    print_kernels(&kernels, kernel);
    println!(
        "\nEncrypted nvmux disk (aes-xts-plain64, AES-NI) vs the same disk unencrypted vs qemu-storage-daemon luks (aes-256-xts-plain64, cache.direct=on, aio=io_uring), 1 GiB files on {}; random I/O through libblkio, {secs} s per run, medians of {rounds} rounds (each round runs every workload on the three back to back), server on CPU 0",
        std::env::temp_dir().display()
    );
    println!("| workload | nvmux plain IOPS | nvmux crypt IOPS | p50/p99 µs | crypt/plain | QSD luks IOPS | p50/p99 µs | crypt/luks |");
    println!("|---|---|---|---|---|---|---|---|");
    // The median round of each server and workload (by IOPS).
    let find = |s: &str, w: &str| median_round(&rows, s, w);
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
    let mut report = measured_rows(&rows);
    if let Some(r) = report.as_array_mut() {
        for k in &kernels {
            r.push(json!({"server": "xts kernels", "workload": k.what,
                          "xts_rs_mb_s": k.nvmux, "xts_rs_kernel": kernel,
                          "xts_rs_portable_mb_s": k.portable, "xts_mode_mb_s": k.xts_mode}));
        }
    }
    write_report(&a.out, "crypt-latest.json", "crypt", secs, report)?;
    Ok(())
}
