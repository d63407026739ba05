//! `nvmux bench`: 4 KiB random read and write at QD1 and QD32 through libblkio against
//! nvmux and qemu-storage-daemon on the same files, plus bare-metal fio, in one run.
//! Prints a table and writes JSON under `target/bench/`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use crate::client::BlkioClient;
use crate::daemon::Daemon;
use crate::procs::{self, QsdTarget};
use crate::report::{prepare_file, Res};
use crate::{Measured, Op, Workload};

/// What `nvmux bench` runs (the binary parses it from its command line).
#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// The evaluation suite (the ICPE'22 matrix on bare metal, nvmux vhost-user,
    /// NBD and NVMe/TCP, QSD, qemu-nbd and nbdkit; multi-VM scaling; JSON, markdown and
    /// PNG plots; last, db_bench in QEMU guests). With --quick, a slice of the matrix and
    /// a short db_bench in under 5 minutes.
    pub suite: bool,
    /// Seconds per measurement.
    pub seconds: u64,
    /// 2 seconds per measurement (with `suite`: the quick slice of the matrix, 1 s per run).
    pub quick: bool,
    /// Use a polled libblkio queue (the client busy-polls its completions).
    pub client_poll: bool,
    /// Where JSON results go.
    pub out: PathBuf,
    /// Size of the test files.
    pub file_size: String,
    /// Skip qemu-storage-daemon and fio.
    pub no_baselines: bool,
    /// Only drive this existing vhost-user-blk socket (any server) and print the results.
    pub socket: Option<PathBuf>,
    /// Only run workloads whose name contains this, e.g. "randread QD32". With `suite`,
    /// `dbbench` runs only the db_bench stage (RocksDB in a QEMU guest on four paths),
    /// `vfio-user` only the guest-path stage (4 KiB random reads of one QEMU 11 guest
    /// through vfio-user NVMe, vhost-user-blk and NVMe/TCP, with host CPU per I/O).
    pub only: Option<String>,
    /// Run the pool suite instead: thin volumes vs QSD qcow2 vs a raw-file disk.
    pub pool: bool,
    /// Run the encryption suite instead: encrypted vs plain nvmux disk vs QSD luks.
    pub crypt: bool,
    /// Run the fairness suite instead: 4 disks on one pool saturated at once, vs QSD.
    pub fair: bool,
    /// Run the NVMe/TCP suite instead: NVMe/TCP (host initiator) vs vhost-user vs fio.
    pub nvmf: bool,
    /// Run the router suite instead: no classifier vs the pass-through and example
    /// classifiers vs the external-function path, on one /dev/shm file disk.
    pub router: bool,
    /// Run the hostile-peer suite instead: a victim disk's IOPS at rest and while each
    /// attack of the attacker suite runs (NVMe/TCP and NBD length fields, floods,
    /// slow handshakes, half-open and non-reading peers).
    pub hostile: bool,
    /// Run the NBD-over-TLS suite instead: nvmux and qemu-nbd, plaintext, TLS X.509 (fio)
    /// and TLS-PSK (nbdcopy), on one /dev/shm file.
    pub nbd_tls: bool,
    /// Measure the I/O pause instead: the longest completion latency a libblkio client
    /// sees during `nvmux upgrade` (5 times) and during SIGKILL plus a restart.
    pub restart: bool,
    /// Run the mirror suite instead: one /dev/shm file vs a mirror of two, and a remote
    /// NVMe/TCP backend vs the same disk served locally.
    pub mirror: bool,
    /// Run the RBD suite instead: one Ceph RBD image ($CEPH_CONF's cluster) served by
    /// nvmux, by qemu-storage-daemon's rbd driver (both over vhost-user) and driven by
    /// fio's rbd engine directly.
    pub rbd: bool,
    /// With --rbd: the image, POOL/IMAGE (default rbd/nvmux-bench).
    pub image: Option<String>,
    /// With --rbd: the image's size when the bench creates it (default 1G).
    pub size: Option<String>,
    /// With --router: the directory of the example classifiers' sources (default: the
    /// source tree's examples/classifiers).
    pub classifiers: Option<PathBuf>,
    /// With --fair: the daemon's qos.fair_depth for the "on" rows.
    pub fair_depth: u32,
    /// With --pool: the pool's cluster size, e.g. 256K (default 64K).
    pub cluster_size: String,
    /// Rounds of the nvmux/QSD rows: each round measures nvmux, then QSD, on every
    /// workload (interleaved); the table shows the medians and the JSON every round.
    pub rounds: usize,
    /// Idle figure: this many null disks, each exported over vhost-user with a libblkio
    /// client attached and idle, while the daemon's CPU is measured for 5 s (0: skip).
    pub idle_clients: usize,
}

#[derive(Clone, Debug, Serialize)]
struct Row {
    backing: String,
    workload: String,
    server: String,
    #[serde(flatten)]
    m: Measured,
    server_cpu_s: Option<f64>,
    round: usize,
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
            round: 0,
        }
    }
    fn round(mut self, r: usize) -> Row {
        self.round = r;
        self
    }
}

const WORKLOADS: [(Op, usize, &str); 4] = [
    (Op::Read, 1, "randread QD1"),
    (Op::Read, 32, "randread QD32"),
    (Op::Write, 1, "randwrite QD1"),
    (Op::Write, 32, "randwrite QD32"),
];

/// Whether `--only` selects `workload` on `backing`: the filter is a part of the workload's
/// name ("randread QD32": every backing) or of "backing workload" ("null": every null
/// row; "null randread QD32": one row). `backing` is empty when there is none (`--socket`).
fn selected(only: Option<&str>, backing: &str, workload: &str) -> bool {
    only.is_none_or(|o| {
        workload.contains(o) || (!backing.is_empty() && format!("{backing} {workload}").contains(o))
    })
}

fn measure(
    sock: &Path,
    poll: bool,
    secs: u64,
    only: (Option<&str>, &str),
    server: Option<&dyn Fn() -> f64>,
    mut each: impl FnMut(&str, Measured, Option<f64>),
) -> Res<()> {
    let mut c = BlkioClient::connect(sock, 1, poll, 32 * 4096)?;
    for (op, qd, name) in WORKLOADS {
        if !selected(only.0, only.1, name) {
            continue;
        }
        let cpu0 = server.map(|f| f());
        let m = crate::workload::run(&mut c, &Workload::random(op, 4096, qd, secs))?;
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
            (a.only.as_deref(), ""),
            None,
            |w, m, _| {
                println!(
                    "{w:<15} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs",
                    m.iops, m.p50_us, m.p99_us
                )
            },
        );
    }
    let suite = a.suite;
    if suite
        || a.pool
        || a.crypt
        || a.fair
        || a.nvmf
        || a.router
        || a.hostile
        || a.nbd_tls
        || a.restart
        || a.mirror
        || a.rbd
    {
        let two = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
        if two {
            procs::pin_current_thread(1);
        }
        if suite {
            return crate::suite::run(&a, two.then_some(0), two.then_some(1));
        }
        if a.nvmf {
            return crate::suites::nvmf::run(&a, secs, two.then_some(0), two.then_some(1));
        }
        if a.crypt {
            return crate::suites::crypt::run(&a, secs, two.then_some(0));
        }
        if a.router {
            return crate::suites::router::run(&a, secs, two.then_some(0), two.then_some(1));
        }
        if a.hostile {
            return crate::suites::hostile::run(&a, two.then_some(0));
        }
        if a.restart {
            return crate::suites::restart::run(&a, two.then_some(0));
        }
        if a.mirror {
            return crate::suites::mirror::run(&a, secs, two.then_some(0));
        }
        if a.rbd {
            return crate::suites::rbd::run(&a, secs, two.then_some(0));
        }
        if a.nbd_tls {
            return crate::suites::nbd_tls::run(&a, secs, two.then_some(0), two.then_some(1));
        }
        if a.fair {
            return crate::suites::fair::run(&a, secs, two.then_some(0));
        }
        return crate::suites::pool::run(&a, secs, two.then_some(0));
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
    let rounds = a.rounds.max(1);
    let count = |b: &str| {
        WORKLOADS
            .iter()
            .filter(|(_, _, w)| selected(a.only.as_deref(), b, w))
            .count()
    };
    let total = backings
        .iter()
        .map(|(b, f)| count(b) * (servers * rounds + usize::from(f.is_some() && !a.no_baselines)))
        .sum::<usize>();
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

    // nvmux: one daemon, three disks, alive for the whole run; QSD is started per backing
    // and the two are measured in turns, round after round.
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
    }
    let idle_many = if a.idle_clients > 0 {
        Some(idle_with_clients(&d, &ddir, a.idle_clients, size)?)
    } else {
        None
    };
    let cpu = || d.cpu_seconds();
    for (name, file) in backings {
        if count(name) == 0 {
            continue;
        }
        let disk = name.trim_start_matches('/').replace([' ', '/'], "-");
        let sock = ddir.join(format!("{disk}.sock"));
        let qsd = if a.no_baselines {
            None
        } else {
            let qsock = work.join("qsd.sock");
            let target = match file {
                Some(f) => QsdTarget::File(f.to_path_buf()),
                None => QsdTarget::Null { size },
            };
            let q = procs::start_qsd(&target, &qsock, 1, srv_cpu, &work.join("qsd.log"))?;
            Some((q, qsock))
        };
        for r in 0..rounds {
            measure(
                &sock,
                a.client_poll,
                secs,
                (a.only.as_deref(), name),
                Some(&cpu),
                |w, m, c| progress(&mut rows, Row::new(name, "nvmux", w, m, c).round(r)),
            )?;
            if let Some((q, qsock)) = &qsd {
                let qcpu = || q.cpu_seconds();
                measure(
                    qsock,
                    a.client_poll,
                    secs,
                    (a.only.as_deref(), name),
                    Some(&qcpu),
                    |w, m, c| progress(&mut rows, Row::new(name, "qsd", w, m, c).round(r)),
                )?;
            }
        }
        drop(qsd);
    }
    let _ = d.stop();

    if !a.no_baselines {
        for (name, file) in backings {
            let Some(f) = file else { continue };
            for (op, qd, w) in WORKLOADS {
                if !selected(a.only.as_deref(), name, w) {
                    continue;
                }
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

    print_table(&rows, idle_cpu_pct, idle_many, secs, a.client_poll, rounds);
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
        "idle_clients": idle_many.map(|(n, pct)| json!({"clients": n, "cpu_pct": pct, "seconds": 5})),
        "rounds": rounds,
        "rows": rows,
    });
    let text = serde_json::to_string_pretty(&report)?;
    let p = a.out.join(format!("vhost-{ts}.json"));
    std::fs::write(&p, &text)?;
    std::fs::write(a.out.join("vhost-latest.json"), &text)?;
    println!("\nJSON: {}", p.display());
    Ok(())
}

/// The daemon's CPU over 5 s with `n` null disks exported over vhost-user and a libblkio
/// client attached to each, doing nothing. Returns `(n, percent of one core)`.
fn idle_with_clients(d: &Daemon, ddir: &Path, n: usize, size: u64) -> Res<(usize, f64)> {
    let size = size.min(64 << 20);
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let disk = format!("idle-{i}");
        d.api().post(
            "/v1/disks",
            &json!({"name": disk, "backend": "null", "size": size}),
        )?;
        let sock = ddir.join(format!("{disk}.sock"));
        d.api().post(
            "/v1/exports",
            &json!({"name": disk, "disk": disk, "socket": sock, "num_queues": 1}),
        )?;
        clients.push(BlkioClient::connect(&sock, 1, false, 4096)?);
    }
    // Let every queue start and the worker fall asleep.
    std::thread::sleep(Duration::from_secs(1));
    let c0 = d.cpu_seconds();
    std::thread::sleep(Duration::from_secs(5));
    let pct = (d.cpu_seconds() - c0) / 5.0 * 100.0;
    eprintln!("idle: {n} vhost-user clients attached, daemon CPU {pct:.2}% of one core over 5 s");
    drop(clients);
    for i in 0..n {
        let disk = format!("idle-{i}");
        d.api().delete(&format!("/v1/exports/{disk}"))?;
        d.api().delete(&format!("/v1/disks/{disk}"))?;
    }
    Ok((n, pct))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let k = v.len();
    Some(if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2.0
    })
}

/// The median row of a cell over its rounds (IOPS, p50, p99 and CPU each the median).
fn median_row(rows: &[Row], b: &str, w: &str, s: &str) -> Option<Row> {
    let cell: Vec<&Row> = rows
        .iter()
        .filter(|r| r.backing == b && r.workload == w && r.server == s)
        .collect();
    let first = *cell.first()?;
    let m = |f: &dyn Fn(&Row) -> f64| median(cell.iter().map(|r| f(r)).collect());
    let mut out = first.clone();
    out.m.iops = m(&|r| r.m.iops)?;
    out.m.p50_us = m(&|r| r.m.p50_us)?;
    out.m.p99_us = m(&|r| r.m.p99_us)?;
    out.server_cpu_s = median(cell.iter().filter_map(|r| r.server_cpu_s).collect());
    Some(out)
}

/// The nvmux/QSD ratio of each round of a cell: (min, max).
fn round_ratios(rows: &[Row], b: &str, w: &str) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = 0f64;
    for n in rows
        .iter()
        .filter(|r| r.backing == b && r.workload == w && r.server == "nvmux")
    {
        let q = rows.iter().find(|r| {
            r.backing == b && r.workload == w && r.server == "qsd" && r.round == n.round
        })?;
        if q.m.iops > 0.0 {
            let x = n.m.iops / q.m.iops;
            lo = lo.min(x);
            hi = hi.max(x);
        }
    }
    (hi > 0.0).then_some((lo, hi))
}

fn print_table(
    rows: &[Row],
    idle: Option<f64>,
    idle_many: Option<(usize, f64)>,
    secs: u64,
    poll: bool,
    rounds: usize,
) {
    println!(
        "\n4 KiB random I/O through libblkio virtio-blk-vhost-user ({} client), {secs} s per run; server on CPU 0, client on CPU 1; nvmux and QSD interleaved, medians of {rounds} rounds",
        if poll { "polled" } else { "interrupt-driven" }
    );
    println!(
        "| backing | workload | nvmux IOPS | p50/p99 µs | nvmux CPU s | QSD IOPS | p50/p99 µs | QSD CPU s | nvmux/QSD | rounds | fio IOPS | nvmux/fio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut backs: Vec<&str> = Vec::new();
    for r in rows {
        if !backs.contains(&r.backing.as_str()) {
            backs.push(&r.backing);
        }
    }
    for b in backs {
        for (_, _, w) in WORKLOADS {
            let n = median_row(rows, b, w, "nvmux");
            let q = median_row(rows, b, w, "qsd");
            let f = median_row(rows, b, w, "fio");
            if n.is_none() && q.is_none() && f.is_none() {
                continue;
            }
            let (n, q, f) = (n.as_ref(), q.as_ref(), f.as_ref());
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
            let spread =
                round_ratios(rows, b, w).map_or("-".into(), |(lo, hi)| format!("{lo:.2}–{hi:.2}x"));
            println!(
                "| {b} | {w} | {} | {} | {} | {} | {} | {} | {} | {spread} | {} | {} |",
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
    if let Some((n, i)) = idle_many {
        println!(
            "nvmux daemon CPU over 5 s with {n} idle libblkio clients attached ({n} vhost-user exports): {i:.2}% of one core"
        );
    }
}
