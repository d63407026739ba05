//! `nvmux bench`: 4 KiB random read and write at QD1 and QD32 through libblkio against
//! nvmux and qemu-storage-daemon on the same files, plus bare-metal fio, in one run.
//! Prints a table and writes JSON under `target/bench/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use nvmux_bench::client::BlkioClient;
use nvmux_bench::procs::{self, QsdTarget, ServerProc};
use nvmux_bench::{Measured, Op, Workload};
use nvmux_daemon::client::ApiClient;
use serde::Serialize;
use serde_json::json;

pub(crate) type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A `nvmux serve` child process.
pub struct Daemon {
    proc: ServerProc,
    api: ApiClient,
}

impl Daemon {
    /// Start `nvmux serve --data-dir DIR [--config CFG]`, pinned to `cpu`.
    pub fn start(dir: &Path, config: Option<&str>, cpu: Option<usize>) -> Res<Daemon> {
        let exe = std::env::current_exe()?;
        let sock = dir.join("nvmux.sock");
        let log = dir.join("daemon.log");
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg("--data-dir").arg(dir);
        if let Some(c) = config {
            let p = dir.join("nvmux.toml");
            std::fs::write(&p, c)?;
            cmd.arg("--config").arg(p);
        }
        let mut proc = procs::spawn_pinned("nvmux serve", cmd, cpu, &log)?;
        procs::wait_for_socket(&mut proc, &sock, &log)?;
        Ok(Daemon {
            proc,
            api: ApiClient::new(&sock),
        })
    }
    /// The daemon every bench run uses: `<work>/nvmux`, one worker thread on `cpu`.
    pub fn start_bench(work: &Path, cpu: Option<usize>, extra_cfg: &str) -> Res<(PathBuf, Daemon)> {
        let ddir = work.join("nvmux");
        std::fs::create_dir_all(&ddir)?;
        let cfg = format!(
            "data_dir = {:?}\n{extra_cfg}\n[workers]\nthreads = 1\npoll_idle_us = 50\ncpus = [{}]\n",
            ddir,
            cpu.unwrap_or(0)
        );
        let d = Daemon::start(&ddir, Some(&cfg), cpu)?;
        Ok((ddir, d))
    }
    pub fn api(&self) -> &ApiClient {
        &self.api
    }
    /// An NVMe/TCP subsystem `nqn` on a free loopback port, open to `host`, with `disk` as
    /// its namespace 1; returns the address it listens on.
    pub fn nvmf_subsystem(&self, nqn: &str, host: &str, disk: &str) -> Res<std::net::SocketAddr> {
        let sub = self.api.post(
            "/v1/subsystems",
            &json!({"nqn": nqn, "listen": "127.0.0.1:0", "hosts": [host]}),
        )?;
        self.api.post(
            &format!("/v1/subsystems/{nqn}/namespaces"),
            &json!({ "disk": disk }),
        )?;
        Ok(sub["listen"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("the subsystem has no listen address")?)
    }
    pub fn cpu_seconds(&self) -> f64 {
        self.proc.cpu_seconds()
    }
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
    /// SIGTERM and wait; returns how it exited.
    pub fn stop(self) -> String {
        match self.proc.stop() {
            Some(s) if s.success() => "exit 0".into(),
            Some(s) => format!("{s}"),
            None => "unknown".into(),
        }
    }
}

/// One libblkio workload of `bs`-byte random I/O at `qd` on one queue of `sock`.
pub(crate) fn run_one(sock: &Path, bs: usize, op: Op, qd: usize, secs: u64) -> Res<Measured> {
    Ok(nvmux_bench::workload::run_on(
        sock,
        &Workload::random(op, bs, qd, secs),
    )?)
}

/// The JSON rows of a suite's report: server, workload and what was measured.
pub(crate) fn measured_rows(rows: &[(String, String, Measured)]) -> serde_json::Value {
    json!(rows
        .iter()
        .map(|(s, w, m)| json!({"server": s, "workload": w, "m": m}))
        .collect::<Vec<_>>())
}

/// Table cells of the suites' markdown tables; "-" where a server was not run.
pub(crate) fn cell_iops(m: Option<&Measured>) -> String {
    m.map_or("-".into(), |m| format!("{:.0}", m.iops))
}

pub(crate) fn cell_lat(m: Option<&Measured>) -> String {
    m.map_or("-".into(), |m| format!("{:.1}/{:.1}", m.p50_us, m.p99_us))
}

pub(crate) fn cell_ratio(a: Option<&Measured>, b: Option<&Measured>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.iops > 0.0 => format!("{:.2}x", a.iops / b.iops),
        _ => "-".into(),
    }
}

/// Write a suite's results to `<out>/<file>`.
pub(crate) fn write_report(
    out: &Path,
    file: &str,
    kind: &str,
    secs: u64,
    rows: serde_json::Value,
) -> Res<()> {
    std::fs::create_dir_all(out)?;
    let report = json!({"kind": kind, "seconds_per_run": secs, "rows": rows});
    std::fs::write(out.join(file), serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

#[derive(Args)]
pub struct BenchArgs {
    /// `suite`: the evaluation suite (the ICPE'22 matrix on bare metal, nvmux vhost-user,
    /// NBD and NVMe/TCP, QSD, qemu-nbd and nbdkit; multi-VM scaling; JSON, markdown and
    /// PNG plots; last, db_bench in QEMU guests). With --quick, a slice of the matrix and
    /// a short db_bench in under 5 minutes.
    #[arg(value_parser = ["suite"])]
    what: Option<String>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    pub(crate) seconds: u64,
    /// 2 seconds per measurement (with `suite`: the quick slice of the matrix, 1 s per run).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Use a polled libblkio queue (the client busy-polls its completions).
    #[arg(long)]
    client_poll: bool,
    /// Where JSON results go.
    #[arg(long, default_value = "target/bench")]
    pub(crate) out: PathBuf,
    /// Size of the test files.
    #[arg(long, default_value = "1G")]
    pub(crate) file_size: String,
    /// Skip qemu-storage-daemon and fio.
    #[arg(long)]
    pub(crate) no_baselines: bool,
    /// Only drive this existing vhost-user-blk socket (any server) and print the results.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Only run workloads whose name contains this, e.g. "randread QD32". With `suite`,
    /// `dbbench` runs only the db_bench stage (RocksDB in a QEMU guest on four paths).
    #[arg(long)]
    pub(crate) only: Option<String>,
    /// Run the pool suite instead: thin volumes vs QSD qcow2 vs a raw-file disk.
    #[arg(long)]
    pool: bool,
    /// Run the encryption suite instead: encrypted vs plain nvmux disk vs QSD luks.
    #[arg(long, conflicts_with = "pool")]
    crypt: bool,
    /// Run the fairness suite instead: 4 disks on one pool saturated at once, vs QSD.
    #[arg(long, conflicts_with_all = ["pool", "crypt"])]
    fair: bool,
    /// Run the NVMe/TCP suite instead: NVMe/TCP (host initiator) vs vhost-user vs fio.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair"])]
    nvmf: bool,
    /// Run the router suite instead: no classifier vs the pass-through and example
    /// classifiers vs the external-function path, on one /dev/shm file disk.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf"])]
    router: bool,
    /// Run the hostile-peer suite instead: a victim disk's IOPS at rest and while each
    /// attack of the attacker suite runs (NVMe/TCP and NBD length fields, floods,
    /// slow handshakes, half-open and non-reading peers).
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router"])]
    hostile: bool,
    /// Run the NBD-over-TLS suite instead: nvmux and qemu-nbd, plaintext, TLS X.509 (fio)
    /// and TLS-PSK (nbdcopy), on one /dev/shm file.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router", "hostile"])]
    nbd_tls: bool,
    /// Measure the I/O pause instead: the longest completion latency a libblkio client
    /// sees during `nvmux upgrade` (5 times) and during SIGKILL plus a restart.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router", "hostile", "nbd_tls"])]
    restart: bool,
    /// With --router: the directory of the example classifiers' sources (default: the
    /// source tree's examples/classifiers).
    #[arg(long)]
    pub(crate) classifiers: Option<PathBuf>,
    /// With --fair: the daemon's qos.fair_depth for the "on" rows.
    #[arg(long, default_value_t = 64)]
    pub(crate) fair_depth: u32,
    /// With --pool: the pool's cluster size, e.g. 256K (default 64K).
    #[arg(long, default_value = "64K")]
    pub(crate) cluster_size: String,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    backing: String,
    workload: String,
    server: String,
    #[serde(flatten)]
    m: Measured,
    server_cpu_s: Option<f64>,
}

impl Row {
    fn new(
        backing: &str,
        server: &str,
        workload: &str,
        m: Measured,
        server_cpu_s: Option<f64>,
    ) -> Row {
        Row {
            backing: backing.into(),
            workload: workload.into(),
            server: server.into(),
            m,
            server_cpu_s,
        }
    }
}

const WORKLOADS: [(Op, usize, &str); 4] = [
    (Op::Read, 1, "randread QD1"),
    (Op::Read, 32, "randread QD32"),
    (Op::Write, 1, "randwrite QD1"),
    (Op::Write, 32, "randwrite QD32"),
];

/// Fill a file with data, so reads hit real blocks rather than holes.
pub(crate) fn prepare_file(p: &Path, size: u64) -> Res<()> {
    use std::io::Write;
    if std::fs::metadata(p)
        .map(|m| m.len() == size)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let mut f = std::fs::File::create(p)?;
    let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i % 253) as u8).collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

fn measure(
    sock: &Path,
    poll: bool,
    secs: u64,
    only: Option<&str>,
    server: Option<&dyn Fn() -> f64>,
    mut each: impl FnMut(&str, Measured, Option<f64>),
) -> Res<()> {
    let mut c = BlkioClient::connect(sock, 1, poll, 32 * 4096)?;
    for (op, qd, name) in WORKLOADS {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let cpu0 = server.map(|f| f());
        let m = nvmux_bench::workload::run(&mut c, &Workload::random(op, 4096, qd, secs))?;
        let cpu = server.zip(cpu0).map(|(f, c0)| f() - c0);
        each(name, m, cpu);
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Res<()> {
    let secs = if a.quick { 2 } else { a.seconds };
    if let Some(sock) = &a.socket {
        return measure(
            sock,
            a.client_poll,
            secs,
            a.only.as_deref(),
            None,
            |w, m, _| {
                println!(
                    "{w:<15} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs",
                    m.iops, m.p50_us, m.p99_us
                )
            },
        );
    }
    let suite = a.what.as_deref() == Some("suite");
    if suite
        || a.pool
        || a.crypt
        || a.fair
        || a.nvmf
        || a.router
        || a.hostile
        || a.nbd_tls
        || a.restart
    {
        let two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
        if two {
            procs::pin_current_thread(1);
        }
        if suite {
            return crate::bench_suite::run(&a, two.then_some(0), two.then_some(1));
        }
        if a.nvmf {
            return crate::bench_nvmf::run(&a, secs, two.then_some(0), two.then_some(1));
        }
        if a.crypt {
            return crate::bench_crypt::run(&a, secs, two.then_some(0));
        }
        if a.router {
            return crate::bench_router::run(&a, secs, two.then_some(0), two.then_some(1));
        }
        if a.hostile {
            return crate::bench_hostile::run(&a, two.then_some(0));
        }
        if a.restart {
            return crate::bench_restart::run(&a, two.then_some(0));
        }
        if a.nbd_tls {
            return crate::bench_nbd_tls::run(&a, secs, two.then_some(0), two.then_some(1));
        }
        if a.fair {
            return crate::bench_fair::run(&a, secs, two.then_some(0));
        }
        return crate::bench_pool::run(&a, secs, two.then_some(0));
    }
    let size = nvmux_core::parse_size(&a.file_size)?;
    let work = std::env::temp_dir().join(format!("nvmux-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let tmp_file = work.join("disk.img");
    let shm_file = PathBuf::from(format!("/dev/shm/nvmux-bench-{}.img", std::process::id()));
    eprintln!(
        "preparing {} test files on /tmp and /dev/shm",
        nvmux_core::format_size(size)
    );
    prepare_file(&tmp_file, size)?;
    prepare_file(&shm_file, size)?;
    let backings: [(&str, Option<&Path>); 3] = [
        ("/tmp file", Some(&tmp_file)),
        ("/dev/shm file", Some(&shm_file)),
        ("null", None),
    ];
    let servers = if a.no_baselines { 1 } else { 2 };
    let total = backings.len() * servers * WORKLOADS.len()
        + if a.no_baselines {
            0
        } else {
            2 * WORKLOADS.len()
        };
    let mut done = 0usize;
    let mut rows: Vec<Row> = Vec::new();
    let mut progress = |rows: &mut Vec<Row>, r: Row| {
        done += 1;
        eprintln!(
            "[{done:>2}/{total}] {:<14} {:<8} {:<15} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs",
            r.backing, r.server, r.workload, r.m.iops, r.m.p50_us, r.m.p99_us
        );
        rows.push(r);
    };
    // Server on CPU 0, client on CPU 1, as in the testbed's anchor measurements.
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (srv_cpu, cli_cpu) = if ncpu >= 2 {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    if let Some(c) = cli_cpu {
        procs::pin_current_thread(c);
    }

    // nvmux: one daemon, three disks.
    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, "")?;
    let mut idle_cpu_pct = None;
    for (name, file) in backings {
        let disk = name.trim_start_matches('/').replace([' ', '/'], "-");
        let body = match file {
            Some(f) => json!({"name": disk, "backend": "file", "path": f}),
            None => json!({"name": disk, "backend": "null", "size": size}),
        };
        d.api().post("/v1/disks", &body)?;
        let sock = ddir.join(format!("{disk}.sock"));
        d.api().post(
            "/v1/exports",
            &json!({"disk": disk, "socket": sock, "num_queues": 1}),
        )?;
        if idle_cpu_pct.is_none() {
            // Idle cost with a client attached and its queue running.
            let c = BlkioClient::connect(&sock, 1, false, 1 << 20)?;
            std::thread::sleep(Duration::from_millis(500));
            let c0 = d.cpu_seconds();
            std::thread::sleep(Duration::from_secs(3));
            idle_cpu_pct = Some((d.cpu_seconds() - c0) / 3.0 * 100.0);
            drop(c);
        }
        let cpu = || d.cpu_seconds();
        measure(
            &sock,
            a.client_poll,
            secs,
            a.only.as_deref(),
            Some(&cpu),
            |w, m, c| progress(&mut rows, Row::new(name, "nvmux", w, m, c)),
        )?;
    }
    let _ = d.stop();

    if !a.no_baselines {
        for (name, file) in backings {
            let sock = work.join("qsd.sock");
            let target = match file {
                Some(f) => QsdTarget::File(f.to_path_buf()),
                None => QsdTarget::Null { size },
            };
            let q = procs::start_qsd(&target, &sock, 1, srv_cpu, &work.join("qsd.log"))?;
            let cpu = || q.cpu_seconds();
            measure(
                &sock,
                a.client_poll,
                secs,
                a.only.as_deref(),
                Some(&cpu),
                |w, m, c| progress(&mut rows, Row::new(name, "qsd", w, m, c)),
            )?;
            drop(q);
        }
        for (name, file) in backings {
            let Some(f) = file else { continue };
            for (op, qd, w) in WORKLOADS {
                let rw = if op == Op::Read {
                    "randread"
                } else {
                    "randwrite"
                };
                let m = procs::run_fio(f, rw, 4096, qd, secs, cli_cpu)?;
                progress(&mut rows, Row::new(name, "fio", w, m, None));
            }
        }
    }
    let _ = std::fs::remove_file(&shm_file);
    let _ = std::fs::remove_dir_all(&work);

    print_table(&rows, idle_cpu_pct, secs, a.client_poll);
    std::fs::create_dir_all(&a.out)?;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report = json!({
        "kind": "vhost-user-blk 4k",
        "seconds_per_run": secs,
        "client_poll": a.client_poll,
        "cpus": ncpu,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "idle_cpu_pct": idle_cpu_pct,
        "rows": rows,
    });
    let text = serde_json::to_string_pretty(&report)?;
    let p = a.out.join(format!("vhost-{ts}.json"));
    std::fs::write(&p, &text)?;
    std::fs::write(a.out.join("vhost-latest.json"), &text)?;
    println!("\nJSON: {}", p.display());
    Ok(())
}

fn print_table(rows: &[Row], idle: Option<f64>, secs: u64, poll: bool) {
    let find = |b: &str, w: &str, s: &str| {
        rows.iter()
            .find(|r| r.backing == b && r.workload == w && r.server == s)
    };
    println!(
        "\n4 KiB random I/O through libblkio virtio-blk-vhost-user ({} client), {secs} s per run; server on CPU 0, client on CPU 1",
        if poll { "polled" } else { "interrupt-driven" }
    );
    println!(
        "| backing | workload | nvmux IOPS | p50/p99 µs | nvmux CPU s | QSD IOPS | p50/p99 µs | QSD CPU s | nvmux/QSD | fio IOPS | nvmux/fio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut backs: Vec<&str> = Vec::new();
    for r in rows {
        if !backs.contains(&r.backing.as_str()) {
            backs.push(&r.backing);
        }
    }
    for b in backs {
        for (_, _, w) in WORKLOADS {
            let n = find(b, w, "nvmux");
            let q = find(b, w, "qsd");
            let f = find(b, w, "fio");
            let iops = |r: Option<&Row>| r.map_or("-".into(), |r| format!("{:.0}", r.m.iops));
            let lat = |r: Option<&Row>| {
                r.map_or("-".into(), |r| {
                    format!("{:.1}/{:.1}", r.m.p50_us, r.m.p99_us)
                })
            };
            let cpu = |r: Option<&Row>| {
                r.and_then(|r| r.server_cpu_s)
                    .map_or("-".into(), |c| format!("{c:.2}"))
            };
            let ratio = |a: Option<&Row>, b: Option<&Row>| match (a, b) {
                (Some(a), Some(b)) if b.m.iops > 0.0 => format!("{:.2}x", a.m.iops / b.m.iops),
                _ => "-".into(),
            };
            println!(
                "| {b} | {w} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                iops(n),
                lat(n),
                cpu(n),
                iops(q),
                lat(q),
                cpu(q),
                ratio(n, q),
                iops(f),
                ratio(n, f)
            );
        }
    }
    if let Some(i) = idle {
        println!("\nnvmux daemon CPU while idle with a client attached: {i:.2}% of one core");
    }
}
