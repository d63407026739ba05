//! `nvmux bench --nbd-tls`: NBD over TLS next to plaintext NBD, nvmux next to qemu-nbd,
//! on one file, with the same credentials and the same clients, each workload back to
//! back.
//!
//! Two clients, both libnbd (GnuTLS), because fio's nbd engine refuses `tls-psk-file` in
//! a URI (libnbd forbids URIs that read local files unless the program allows it, and
//! fio 3.33 does not), and `qemu-img bench` (QEMU 7.2) takes no `--object`:
//! * fio's nbd engine, 4 KiB random reads and writes at QD1 and QD32, plaintext and TLS
//!   with X.509 (the server's certificate; the client checks none:
//!   `tls-verify-peer=false`);
//! * nbdcopy, 4 KiB requests at QD1 and QD32 (`--request-size`, `--requests`, one
//!   connection, one thread), the whole disk to `null:` (reads) or from a file on
//!   /dev/shm (writes), plaintext and TLS-PSK (the same `keys.psk` for both servers);
//!   sequential, and its time includes connecting and the TLS handshake.
//!
//! Servers listen on loopback TCP. The file is at most 256 MiB (nbdcopy copies it whole).
//! Benchmarks report; they never assert.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::procs::{self, Fio, FioTarget, ServerProc};
use crate::workload::Measured;
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::{cell_iops, cell_ratio, measured_rows, prepare_file, write_report, Res};
use crate::run::BenchArgs;

const RUNS: [(&str, usize, &str); 4] = [
    ("randread", 1, "4K randread QD1"),
    ("randread", 32, "4K randread QD32"),
    ("randwrite", 1, "4K randwrite QD1"),
    ("randwrite", 32, "4K randwrite QD32"),
];

/// A TCP port something listens on (connect succeeds), waiting up to 20 s.
fn wait_tcp(p: &mut ServerProc, port: u16, log: &Path) -> Res<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if !p.alive() {
            return Err(format!(
                "{} exited: {}",
                p.name,
                std::fs::read_to_string(log).unwrap_or_default()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{} did not listen on port {port}", p.name).into())
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// qemu-nbd on `port` serving `img` (its best file settings, as in the suite), with the
/// TLS object `tls` (`--object` argument) if given.
fn qemu_nbd(
    work: &Path,
    name: &str,
    img: &Path,
    tls: Option<String>,
    cpu: Option<usize>,
) -> Res<(ServerProc, u16)> {
    let port = free_port()?;
    let mut c = Command::new("qemu-nbd");
    c.args(["-t", "-f", "raw", "-x", "d", "-e", "64"])
        .args(["--cache=none", "--aio=io_uring", "-b", "127.0.0.1"])
        .arg(format!("--port={port}"));
    if let Some(o) = tls {
        c.args(["--object", &o, "--tls-creds=tls0"]);
    }
    c.arg(img);
    let log = work.join(format!("{name}.log"));
    let mut p = procs::spawn_pinned(name, c, cpu, &log)?;
    wait_tcp(&mut p, port, &log)?;
    Ok((p, port))
}

/// One nbdcopy of the whole disk (`bytes`) in 4 KiB requests, `qd` at a time: to `null:`,
/// or from `src` (writes). IOPS from its wall time (no latencies). A copy that takes
/// longer than `limit` is stopped and reported as an error with the bound it shows.
fn nbdcopy(
    uri: &str,
    src: Option<&Path>,
    bytes: u64,
    qd: usize,
    cpu: Option<usize>,
    limit: Duration,
) -> Res<Measured> {
    let mut c = Command::new("timeout");
    c.arg(format!("{}s", limit.as_secs().max(1)))
        .arg("taskset")
        .arg("-c")
        .arg(cpu.map_or("0-1023".to_string(), |c| c.to_string()))
        .args([
            "nbdcopy",
            "--connections=1",
            "--threads=1",
            "--request-size=4096",
        ])
        .arg(format!("--requests={qd}"));
    match src {
        Some(f) => c.arg(f).arg(uri),
        None => c.arg(uri).arg("null:"),
    };
    let t0 = Instant::now();
    let out = c.output().map_err(|e| format!("run nbdcopy: {e}"))?;
    let t = t0.elapsed().as_secs_f64().max(1e-3);
    let ios = bytes / 4096;
    if out.status.code() == Some(124) {
        return Err(format!(
            "nbdcopy did not finish {ios} requests in {} s (under {:.0} IOPS)",
            limit.as_secs(),
            ios as f64 / t
        )
        .into());
    }
    if !out.status.success() {
        return Err(format!("nbdcopy failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(Measured {
        ios,
        seconds: t,
        iops: ios as f64 / t,
        p50_us: 0.0,
        p95_us: 0.0,
        p99_us: 0.0,
    })
}

struct Target {
    /// A libnbd URI (fio, nbdcopy).
    uri: String,
}

pub fn run(a: &BenchArgs, secs: u64, srv: Option<usize>, cli: Option<usize>) -> Res<()> {
    let size =
        nvmux_core::parse_size(&a.file_size)?.min(if a.quick { 64 << 20 } else { 256 << 20 });
    let work = std::env::temp_dir().join(format!("nvmux-bench-nbdtls-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let img = PathBuf::from(format!(
        "/dev/shm/nvmux-bench-nbdtls-{}.img",
        std::process::id()
    ));
    eprintln!(
        "preparing a {} file on /dev/shm, TLS credentials, nvmux and qemu-nbd",
        nvmux_core::format_size(size)
    );
    prepare_file(&img, size)?;
    let r = run_in(a, secs, srv, cli, &work, &img, size);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_dir_all(&work);
    r
}

fn run_in(
    a: &BenchArgs,
    secs: u64,
    srv: Option<usize>,
    cli: Option<usize>,
    work: &Path,
    img: &Path,
    size: u64,
) -> Res<()> {
    let pskdir = work.join("psk");
    let psk = crate::tls::psk_file(&pskdir, "bench")?;
    let pki = crate::tls::x509(&work.join("pki"))?;
    let (_, d) = Daemon::start_bench(work, srv, "")?;
    d.api().post(
        "/v1/disks",
        &json!({"name": "d", "backend": "file", "path": img}),
    )?;
    let export = |name: &str, tls: serde_json::Value| -> Res<u16> {
        let v = d.api().post(
            "/v1/exports",
            &json!({"name": name, "disk": "d", "type": "nbd", "listen": "127.0.0.1:0", "export_name": "d", "tls": tls}),
        )?;
        let port = v["listen"]
            .as_str()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .ok_or("no bound port")?;
        Ok(port)
    };
    let n_plain = export("plain", serde_json::Value::Null)?;
    let n_x509 = export("x509", json!({"x509_dir": pki.server}))?;
    let n_psk = export("psk", json!({"psk_file": psk}))?;
    let psk_q = format!("?tls-psk-file={}", psk.display());
    let target = |port: u16, tls: Option<&str>| Target {
        uri: match tls {
            Some(q) if q.starts_with("?tls-psk") => {
                format!("nbds://bench@127.0.0.1:{port}/d{q}")
            }
            Some(q) => format!("nbds://127.0.0.1:{port}/d{q}"),
            None => format!("nbd://127.0.0.1:{port}/d"),
        },
    };
    let no_verify = Some("?tls-verify-peer=false");
    let mut targets: Vec<(&str, Target)> = vec![
        ("nvmux", target(n_plain, None)),
        ("nvmux TLS X.509", target(n_x509, no_verify)),
        ("nvmux TLS-PSK", target(n_psk, Some(&psk_q))),
    ];
    let mut keep: Vec<ServerProc> = Vec::new();
    if !a.no_baselines {
        let servers = [
            ("qemu-nbd", None),
            (
                "qemu-nbd TLS X.509",
                Some(format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
                    pki.server.display()
                )),
            ),
            (
                "qemu-nbd TLS-PSK",
                Some(format!(
                    "tls-creds-psk,id=tls0,dir={},endpoint=server",
                    pskdir.display()
                )),
            ),
        ];
        for (name, tls) in servers {
            let psk = name.ends_with("PSK");
            let x509 = name.ends_with("X.509");
            match qemu_nbd(work, &name.replace(' ', "-"), img, tls, srv) {
                Ok((p, port)) => {
                    keep.push(p);
                    let t = if psk {
                        target(port, Some(&psk_q))
                    } else if x509 {
                        target(port, no_verify)
                    } else {
                        target(port, None)
                    };
                    targets.push((name, t));
                }
                Err(e) => eprintln!("{name}: not measured: {e}"),
            }
        }
    }
    let mut rows: Vec<(String, String, Measured)> = Vec::new();
    // A copy slower than this says so instead of holding the run up.
    let limit = Duration::from_secs((4 * secs).max(20));
    for (rw, qd, w) in RUNS {
        if a.only.as_deref().is_some_and(|o| !w.contains(o)) {
            continue;
        }
        for (name, t) in &targets {
            let write = rw == "randwrite";
            let src = write.then_some(img);
            let (client, m) = if name.ends_with("PSK") {
                ("nbdcopy", nbdcopy(&t.uri, src, size, qd, cli, limit))
            } else {
                let mut f = Fio::new(FioTarget::Nbd(t.uri.clone()), rw, 4096, qd, secs);
                f.cpu = cli;
                ("fio", f.run().map_err(Into::into))
            };
            match m {
                Ok(m) => {
                    eprintln!("{w:<18} {name:<20} {client:<8} {:>9.0} IOPS", m.iops);
                    rows.push((format!("{name} ({client})"), w.to_string(), m));
                }
                Err(e) => eprintln!("{w} {name}: {e}"),
            }
            // Plaintext through nbdcopy too, as the PSK rows' reference.
            if *name == "nvmux" || *name == "qemu-nbd" {
                match nbdcopy(&t.uri, src, size, qd, cli, limit) {
                    Ok(m) => {
                        eprintln!("{w:<18} {name:<20} nbdcopy  {:>9.0} IOPS", m.iops);
                        rows.push((format!("{name} (nbdcopy)"), w.to_string(), m));
                    }
                    Err(e) => eprintln!("{w} {name} (nbdcopy): {e}"),
                }
            }
        }
    }
    drop(keep);
    let _ = d.stop();
    let find = |s: &str, w: &str| rows.iter().find(|r| r.0 == s && r.1 == w).map(|r| &r.2);
    println!(
        "\nNBD over TLS on loopback TCP: nvmux vs qemu-nbd (--cache=none --aio=io_uring), one {} file on /dev/shm; fio {secs} s per run, nbdcopy the whole file",
        nvmux_core::format_size(size)
    );
    println!("\nfio nbd engine (libnbd, GnuTLS), TLS with X.509 (IOPS)");
    print_table(&find, "fio", "TLS X.509", "TLS", |w| w.to_string());
    println!("\nnbdcopy (libnbd, GnuTLS), 4 KiB requests, sequential, TLS-PSK with the same keys.psk (IOPS)");
    print_table(&find, "nbdcopy", "TLS-PSK", "TLS-PSK", |w| {
        w.replace("rand", "")
    });
    write_report(
        &a.out,
        "nbd-tls.json",
        "nbd-tls",
        secs,
        measured_rows(&rows),
    )?;
    println!("\nwrote {}", a.out.join("nbd-tls.json").display());
    Ok(())
}

/// One Markdown table of the run: per workload, nvmux and qemu-nbd in plaintext and with
/// TLS (`tls` in the row labels, `head` in the column heads), with the ratios.
fn print_table<'a>(
    find: &dyn Fn(&str, &str) -> Option<&'a Measured>,
    client: &str,
    tls: &str,
    head: &str,
    label: impl Fn(&str) -> String,
) {
    println!("| workload | nvmux | nvmux {head} | TLS/plain | qemu-nbd | qemu-nbd {head} | TLS/plain | nvmux {head} / qemu-nbd {head} |");
    println!("|---|---|---|---|---|---|---|---|");
    for (_, _, w) in RUNS {
        let (np, nt, qp, qt) = (
            find(&format!("nvmux ({client})"), w),
            find(&format!("nvmux {tls} ({client})"), w),
            find(&format!("qemu-nbd ({client})"), w),
            find(&format!("qemu-nbd {tls} ({client})"), w),
        );
        if np.is_none() && nt.is_none() {
            continue;
        }
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            label(w),
            cell_iops(np),
            cell_iops(nt),
            cell_ratio(nt, np),
            cell_iops(qp),
            cell_iops(qt),
            cell_ratio(qt, qp),
            cell_ratio(nt, qt)
        );
    }
}
