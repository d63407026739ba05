//! `nvmux bench --rbd`: one Ceph RBD image served three ways, in one run.
//!
//! - **nvmux**: a daemon with the disk `b` on the image (`"backend": "rbd"`), exported
//!   over vhost-user; load from the libblkio client (one queue).
//! - **QSD**: qemu-storage-daemon's `rbd` driver on the same image, exported over
//!   vhost-user-blk; the same libblkio client as load.
//! - **fio-rbd**: fio's `rbd` engine on the same image, the bound: no vhost-user hop,
//!   fio's own thread submits to librbd.
//!
//! Workloads: 4 KiB random read and write at QD1 and QD32. Each round runs every workload
//! on the three in turn (never two at once), round r starting with the (r mod 3)-th of
//! nvmux, QSD, fio-rbd; the tables show the median round of each.
//!
//! **The image.** `--image POOL/IMAGE` (default `rbd/nvmux-bench`), `--size` (default
//! 1 GiB). When it is missing the bench creates it (`rbd create`) and marks it with the
//! image-meta key `nvmux-bench`; an existing image without that key is refused (the
//! random writes would destroy its data). Before the first run the whole image is written
//! once (fio's rbd engine, sequential 1 MiB writes), so reads hit allocated objects; the
//! mark then says `prefilled` and later runs skip this. The image is kept: remove it
//! with `rbd rm POOL/IMAGE`.
//!
//! **Cluster and cache.** The cluster is the one `$CEPH_CONF` names (`cluster.sh env`);
//! the bench fails early when it is unset or `rbd ls POOL` fails, and when
//! qemu-storage-daemon has no `rbd` driver or fio no `rbd` engine. All three run with the
//! librbd cache **off**: the bench writes a copy of `$CEPH_CONF` with `rbd cache = false`
//! under `[client]` and gives it to all three (the daemon and fio through `CEPH_CONF`,
//! QSD through `conf=`), and QSD gets `cache.direct=on`, which makes its rbd driver set
//! `rbd_cache=false` itself (without it QSD turns the cache on, writeback, whatever the
//! conf says). With the cache off a write completes when the OSD has it, for all three;
//! a cache would turn QD1 writes into memory copies for whichever one had it.
//!
//! **CPUs.** nvmux and QSD (each with librbd's threads in its process) on CPU 0, the
//! libblkio client on CPU 1; fio-rbd (its submitting thread and librbd's) on CPU 0, where
//! the servers' librbd runs. The cluster's daemons are not pinned: they run on both CPUs
//! and compete with everything else; the CPU table shows each process's share (the
//! OSD: every `ceph-osd` whose command line names `$CEPH_CONF`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::Op;
use crate::daemon::Daemon;
use crate::procs::{self, output_timeout, Finished, ServerProc};
use crate::report::{run_one, write_report, Res};
use crate::run::BenchArgs;
use crate::workload::Measured;

/// The image when `--image` is not given.
pub const DEFAULT_IMAGE: &str = "rbd/nvmux-bench";
/// Its size when `--size` is not given and the image is created.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// The image-meta key of images the bench created (`created`, then `prefilled`).
pub const META_KEY: &str = "nvmux-bench";
const CLIENT: &str = "admin";

const NVMUX: &str = "nvmux";
const QSD: &str = "QSD";
const FIO: &str = "fio-rbd";
/// The targets: nvmux against QSD and against fio's rbd engine.
const TARGET_QSD: f64 = 1.2;
const TARGET_FIO: f64 = 0.9;

const RUNS: [(Op, usize, &str); 4] = [
    (Op::Read, 1, "randread QD1"),
    (Op::Read, 32, "randread QD32"),
    (Op::Write, 1, "randwrite QD1"),
    (Op::Write, 32, "randwrite QD32"),
];

/// `POOL/IMAGE` -> (pool, image). Namespaces and snapshots are refused: fio's rbd engine
/// has neither, and a snapshot cannot take the writes.
pub fn parse_image(s: &str) -> Res<(String, String)> {
    let bad = || -> Box<dyn std::error::Error> {
        format!("--image {s:?}: want POOL/IMAGE (no namespace, no @snapshot: fio's rbd engine has neither)").into()
    };
    let (pool, image) = s.split_once('/').ok_or_else(bad)?;
    let ok = |p: &str| {
        !p.is_empty() && !p.contains(['/', '@', ',', '=']) && !p.contains(char::is_whitespace)
    };
    if !ok(pool) || !ok(image) {
        return Err(bad());
    }
    Ok((pool.to_string(), image.to_string()))
}

/// The cluster's configuration file: `$CEPH_CONF`, which must name a file.
pub fn ceph_conf() -> Res<PathBuf> {
    match std::env::var_os("CEPH_CONF") {
        Some(c) if !c.is_empty() => {
            let p = PathBuf::from(c);
            if !p.is_file() {
                return Err(format!(
                    "no Ceph cluster: CEPH_CONF={} is not a file (the test cluster: tests/ceph/cluster.sh up, then eval \"$(tests/ceph/cluster.sh env)\")",
                    p.display()
                )
                .into());
            }
            Ok(p)
        }
        _ => Err("no Ceph cluster: CEPH_CONF is not set (nvmux bench --rbd needs a cluster; the test cluster: tests/ceph/cluster.sh up, then eval \"$(tests/ceph/cluster.sh env)\")".into()),
    }
}

/// The cluster's configuration with the librbd cache off for every client: `orig`'s
/// text with `rbd cache = false` under a `[client]` section at the end (a later value
/// of a key replaces an earlier one in Ceph's parser).
pub fn bench_conf_text(orig: &str) -> String {
    let mut s = orig.to_string();
    if !s.ends_with('\n') && !s.is_empty() {
        s.push('\n');
    }
    s.push_str("\n# added by nvmux bench --rbd: the same librbd cache setting (off) for every client\n[client]\n\trbd cache = false\n");
    s
}

/// `rbd --conf CONF --id admin ARGS`, killed after `timeout`.
fn rbd(conf: &Path, args: &[&str], timeout: Duration) -> Res<Finished> {
    let mut c = Command::new("rbd");
    c.arg("--conf")
        .arg(conf)
        .args(["--id", CLIENT, "--client-mount-timeout", "15"])
        .args(args);
    Ok(output_timeout(
        c,
        timeout,
        &format!("rbd {}", args.join(" ")),
    )?)
}

/// `rbd ARGS` that must succeed; returns its stdout.
fn rbd_ok(conf: &Path, args: &[&str], timeout: Duration) -> Res<String> {
    let f = rbd(conf, args, timeout)?;
    match f.status {
        Some(s) if s.success() => Ok(String::from_utf8_lossy(&f.stdout).into_owned()),
        Some(_) => Err(format!("rbd {}: {}", args.join(" "), f.stderr_tail(3)).into()),
        None => Err(format!("rbd {}: no answer within {timeout:?}", args.join(" ")).into()),
    }
}

/// Fail early, with a clear message, when the cluster is not reachable or a baseline
/// lacks its rbd support.
pub fn preflight(conf: &Path, pool: &str) -> Res<()> {
    let f = rbd(conf, &["ls", pool], Duration::from_secs(40)).map_err(|e| {
        format!(
            "no Ceph cluster reachable through CEPH_CONF={}: {e}",
            conf.display()
        )
    })?;
    if !f.success() {
        let why = match f.status {
            None => "no answer within 40 s".to_string(),
            Some(_) => f.stderr_tail(3),
        };
        return Err(format!(
            "no Ceph cluster reachable through CEPH_CONF={}: `rbd ls {pool}` failed: {why}",
            conf.display()
        )
        .into());
    }
    // An image that does not exist: with the driver, QSD connects and fails to open it.
    let mut q = Command::new("qemu-storage-daemon");
    q.arg("--blockdev").arg(format!(
        "driver=rbd,node-name=probe,pool={pool},image=nvmux-bench-probe-{},conf={},user={CLIENT}",
        std::process::id(),
        conf.display()
    ));
    let f = output_timeout(q, Duration::from_secs(30), "qemu-storage-daemon")?;
    let err = String::from_utf8_lossy(&f.stderr);
    if err.contains("does not accept value") || err.contains("Unknown driver") {
        return Err(format!(
            "qemu-storage-daemon has no rbd driver (Debian: install qemu-block-extra): {}",
            f.stderr_tail(2)
        )
        .into());
    }
    let mut e = Command::new("fio");
    e.arg("--enghelp=rbd");
    let f = output_timeout(e, Duration::from_secs(20), "fio --enghelp=rbd")?;
    if !String::from_utf8_lossy(&f.stdout).contains("rbdname") {
        return Err(format!(
            "fio has no rbd engine (fio --enghelp=rbd: {})",
            f.stderr_tail(2)
        )
        .into());
    }
    Ok(())
}

/// Make sure `pool/image` exists (created when missing, `size` or 1 GiB), was made by the
/// bench, and has been written once over its whole length. Returns its size.
pub fn prepare_image(conf: &Path, pool: &str, image: &str, size: Option<u64>) -> Res<u64> {
    let spec = format!("{pool}/{image}");
    let t = Duration::from_secs(60);
    let info = rbd(conf, &["info", "--format", "json", &spec], t)?;
    let size = if info.success() {
        let v: serde_json::Value =
            serde_json::from_slice(&info.stdout).map_err(|e| format!("rbd info {spec}: {e}"))?;
        let have = v["size"].as_u64().ok_or("rbd info: no size")?;
        let mark = rbd(conf, &["image-meta", "get", &spec, META_KEY], t)?;
        if !mark.success() {
            return Err(format!(
                "{spec} exists but was not created by nvmux bench (it has no image-meta key {META_KEY}): its data would be overwritten; pass another --image, or remove it (rbd rm {spec})"
            )
            .into());
        }
        if let Some(s) = size.filter(|&s| s != have) {
            return Err(format!(
                "{spec} exists with {have} bytes, not {s}: pass --size {have}, or remove it (rbd rm {spec})"
            )
            .into());
        }
        have
    } else if String::from_utf8_lossy(&info.stderr).contains("No such file") {
        let s = size.unwrap_or(DEFAULT_SIZE);
        if s < (1 << 20) || !s.is_multiple_of(4096) {
            return Err(format!("--size {s}: want a multiple of 4 KiB, at least 1 MiB").into());
        }
        eprintln!("creating {spec} ({})", nvmux_core::format_size(s));
        rbd_ok(conf, &["create", "--size", &format!("{s}B"), &spec], t)?;
        rbd_ok(conf, &["image-meta", "set", &spec, META_KEY, "created"], t)?;
        s
    } else {
        return Err(format!("rbd info {spec}: {}", info.stderr_tail(3)).into());
    };
    let mark = rbd_ok(conf, &["image-meta", "get", &spec, META_KEY], t)?;
    if mark.trim() != "prefilled" {
        eprintln!(
            "prefilling {spec} ({}): fio rbd engine, sequential 1 MiB writes",
            nvmux_core::format_size(size)
        );
        let t0 = Instant::now();
        let mut f = fio_cmd(conf, pool, image, "write", 1 << 20, 16);
        f.arg(format!("--size={size}"));
        // 2 MiB/s is far below any working cluster; past that something is wrong.
        let limit = Duration::from_secs(120 + size / (2 << 20));
        let out = output_timeout(f, limit, "fio (prefill)")?;
        if !out.success() {
            return Err(format!("prefill of {spec} failed: {}", out.stderr_tail(3)).into());
        }
        rbd_ok(
            conf,
            &["image-meta", "set", &spec, META_KEY, "prefilled"],
            t,
        )?;
        eprintln!("prefilled in {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(size)
}

/// fio on `pool/image` with the rbd engine (JSON output, `CEPH_CONF=conf`).
fn fio_cmd(conf: &Path, pool: &str, image: &str, rw: &str, bs: usize, qd: usize) -> Command {
    let mut c = Command::new("fio");
    c.env("CEPH_CONF", conf).args([
        "--name=j",
        "--ioengine=rbd",
        &format!("--clientname={CLIENT}"),
        &format!("--pool={pool}"),
        &format!("--rbdname={image}"),
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={qd}"),
        "--direct=1",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]);
    c
}

/// One measurement with the CPU each process used over it, in percent of one core.
#[derive(Clone, Debug)]
struct Sample {
    m: Measured,
    /// nvmux or QSD (librbd included); none for fio-rbd.
    server_pct: Option<f64>,
    /// The libblkio client (this process), or fio (its thread and librbd's).
    client_pct: f64,
    /// The cluster's OSDs; none when none was found.
    osd_pct: Option<f64>,
    /// Every CPU of the machine busy (any process), in percent of one core (2 CPUs:
    /// up to 200%): near the maximum, the machine's CPUs are what limits the run.
    machine_pct: Option<f64>,
}

/// (busy, total) jiffies of all CPUs, from /proc/stat's first line.
fn machine_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user already)
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// The machine's CPUs (not this thread's affinity, which is one CPU).
fn machine_cpus() -> usize {
    std::fs::read_to_string("/proc/stat")
        .map(|s| {
            s.lines()
                .filter(|l| {
                    l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                })
                .count()
        })
        .unwrap_or(0)
        .max(1)
}

/// Busy percent (of one core) between two [`machine_jiffies`] readings.
fn machine_busy(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<f64> {
    let ((b0, t0), (b1, t1)) = (a?, b?);
    let ncpu = machine_cpus() as f64;
    (t1 > t0).then(|| b1.saturating_sub(b0) as f64 / (t1 - t0) as f64 * 100.0 * ncpu)
}

/// The cluster's OSD processes: every `ceph-osd` whose command line names `conf`.
fn osd_pids(conf: &Path) -> Vec<u32> {
    let want = conf.to_string_lossy().into_owned();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.trim() == "ceph-osd" && cmd.split(|&b| b == 0).any(|a| a == want.as_bytes())
        })
        .collect()
}

fn osd_cpu(pids: &[u32]) -> Option<f64> {
    (!pids.is_empty()).then(|| pids.iter().filter_map(|&p| procs::cpu_seconds(p)).sum())
}

fn pct(d: f64, wall: f64) -> f64 {
    d / wall.max(1e-6) * 100.0
}

/// One libblkio run on a vhost-user socket, with the server's, this process's and the
/// OSDs' CPU over it.
fn measure_vhost(
    sock: &Path,
    op: Op,
    qd: usize,
    secs: u64,
    server: &dyn Fn() -> f64,
    osds: &[u32],
) -> Res<Sample> {
    let me = std::process::id();
    let (s0, c0, o0) = (
        server(),
        procs::cpu_seconds(me).unwrap_or(0.0),
        osd_cpu(osds),
    );
    let j0 = machine_jiffies();
    let t0 = Instant::now();
    let m = run_one(sock, 4096, op, qd, secs)?;
    let wall = t0.elapsed().as_secs_f64();
    Ok(Sample {
        m,
        server_pct: Some(pct(server() - s0, wall)),
        client_pct: pct(procs::cpu_seconds(me).unwrap_or(0.0) - c0, wall),
        osd_pct: o0.zip(osd_cpu(osds)).map(|(a, b)| pct(b - a, wall)),
        machine_pct: machine_busy(j0, machine_jiffies()),
    })
}

/// One fio rbd-engine run, pinned to `cpu`, with its CPU and the OSDs'.
#[allow(clippy::too_many_arguments)]
fn measure_fio(
    conf: &Path,
    pool: &str,
    image: &str,
    op: Op,
    qd: usize,
    secs: u64,
    cpu: Option<usize>,
    osds: &[u32],
) -> Res<Sample> {
    let rw = if op == Op::Read {
        "randread"
    } else {
        "randwrite"
    };
    let mut c = fio_cmd(conf, pool, image, rw, 4096, qd);
    c.args(["--time_based", &format!("--runtime={secs}")]);
    if let Some(cpu) = cpu {
        procs::pin_command(&mut c, cpu);
    }
    let (f0, o0) = (procs::children_cpu_seconds(), osd_cpu(osds));
    let j0 = machine_jiffies();
    let t0 = Instant::now();
    let out = output_timeout(c, Duration::from_secs(secs + 60), "fio")?;
    let wall = t0.elapsed().as_secs_f64();
    if !out.success() {
        return Err(format!("fio {rw} QD{qd} on {pool}/{image}: {}", out.stderr_tail(3)).into());
    }
    let m = procs::parse_fio_json(&String::from_utf8_lossy(&out.stdout), 1)?;
    Ok(Sample {
        m,
        server_pct: None,
        client_pct: pct(procs::children_cpu_seconds() - f0, wall),
        osd_pct: o0.zip(osd_cpu(osds)).map(|(a, b)| pct(b - a, wall)),
        machine_pct: machine_busy(j0, machine_jiffies()),
    })
}

/// qemu-storage-daemon's rbd driver on `pool/image`, exported over vhost-user-blk.
fn start_qsd(
    conf: &Path,
    pool: &str,
    image: &str,
    sock: &Path,
    cpu: Option<usize>,
    log: &Path,
) -> Res<ServerProc> {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.env("CEPH_CONF", conf)
        .arg("--blockdev")
        .arg(format!(
            "driver=rbd,node-name=r,pool={pool},image={image},conf={},user={CLIENT},cache.direct=on",
            conf.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=r,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ));
    procs::die_with_parent(&mut cmd, libc::SIGTERM);
    let mut p = procs::spawn_pinned("qemu-storage-daemon", cmd, cpu, log)?;
    procs::wait_for_socket(&mut p, sock, log)?;
    Ok(p)
}

/// The nvmux daemon with disk `b` on `spec` exported over vhost-user.
fn start_nvmux(work: &Path, cpu: Option<usize>, conf: &Path, spec: &str) -> Res<(Daemon, PathBuf)> {
    let (ddir, d) = Daemon::start_bench_env(work, cpu, "", &[("CEPH_CONF", conf.as_os_str())])?;
    let sock = ddir.join("b.sock");
    let r = d
        .api()
        .post(
            "/v1/disks",
            &json!({"name": "b", "backend": "rbd", "image": spec}),
        )
        .and_then(|_| {
            d.api().post(
                "/v1/exports",
                &json!({"disk": "b", "socket": sock, "num_queues": 1}),
            )
        });
    match r {
        Ok(_) => Ok((d, sock)),
        Err(e) => {
            let _ = d.stop();
            Err(e.into())
        }
    }
}

/// The median round (by IOPS) of `server` on `workload`.
fn median_of<'a>(
    rows: &'a [(String, String, Sample)],
    server: &str,
    workload: &str,
) -> Option<&'a Sample> {
    let mut m: Vec<&Sample> = rows
        .iter()
        .filter(|r| r.0 == server && r.1 == workload)
        .map(|r| &r.2)
        .collect();
    m.sort_by(|a, b| a.m.iops.total_cmp(&b.m.iops));
    m.get(m.len() / 2).copied()
}

/// "1.31x (met)" / "0.85x (below)", or "-".
pub fn ratio_cell(a: Option<f64>, b: Option<f64>, target: f64) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => {
            let r = a / b;
            format!("{r:.2}x ({})", if r >= target { "met" } else { "below" })
        }
        _ => "-".into(),
    }
}

/// The libblkio client's latency histogram ends at 20 ms: anything slower is in its last
/// bucket, shown as "≥20000".
const LAT_CAP_US: f64 = 20_000.0;

fn lat(us: f64) -> String {
    if us >= LAT_CAP_US {
        format!("≥{LAT_CAP_US:.0}")
    } else {
        format!("{us:.0}")
    }
}

fn cell_pct(p: Option<f64>) -> String {
    p.map_or("-".into(), |p| format!("{p:.0}%"))
}

/// The markdown of the run: the comparison table, then the CPU table.
fn tables(rows: &[(String, String, Sample)], title: &str) -> String {
    let mut s = format!("{title}\n\n");
    s.push_str(&format!(
        "| workload | nvmux IOPS | QSD IOPS | fio-rbd IOPS | nvmux/QSD (target ≥ {TARGET_QSD:.1}x) | nvmux/fio-rbd (target ≥ {TARGET_FIO:.1}x) | p50 µs nvmux / QSD / fio-rbd |\n|---|---|---|---|---|---|---|\n"
    ));
    let iops = |m: Option<&Sample>| m.map_or("-".into(), |m| format!("{:.0}", m.m.iops));
    let p50 = |m: Option<&Sample>| m.map_or("-".into(), |m| lat(m.m.p50_us));
    for &(_, _, w) in &RUNS {
        let (n, q, f) = (
            median_of(rows, NVMUX, w),
            median_of(rows, QSD, w),
            median_of(rows, FIO, w),
        );
        if n.is_none() && q.is_none() && f.is_none() {
            continue;
        }
        let io = |m: Option<&Sample>| m.map(|m| m.m.iops);
        s.push_str(&format!(
            "| {w} | {} | {} | {} | {} | {} | {} / {} / {} |\n",
            iops(n),
            iops(q),
            iops(f),
            ratio_cell(io(n), io(q), TARGET_QSD),
            ratio_cell(io(n), io(f), TARGET_FIO),
            p50(n),
            p50(q),
            p50(f)
        ));
    }
    let ncpu = machine_cpus();
    s.push_str(&format!("\nCPU over each median run, percent of one core (server: the daemon with its librbd threads; client: the libblkio client, or fio with its librbd threads; OSD: the cluster's ceph-osd; machine: all {ncpu} CPUs, any process, at most {}%):\n\n| workload | path | IOPS | p50/p99 µs | server CPU | client CPU | OSD CPU | machine CPU |\n|---|---|---|---|---|---|---|---|\n", 100 * ncpu));
    for &(_, _, w) in &RUNS {
        for srv in [NVMUX, QSD, FIO] {
            let Some(m) = median_of(rows, srv, w) else {
                continue;
            };
            s.push_str(&format!(
                "| {w} | {srv} | {:.0} | {}/{} | {} | {:.0}% | {} | {} |\n",
                m.m.iops,
                lat(m.m.p50_us),
                lat(m.m.p99_us),
                cell_pct(m.server_pct),
                m.client_pct,
                cell_pct(m.osd_pct),
                cell_pct(m.machine_pct)
            ));
        }
    }
    s
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
    let conf = ceph_conf()?;
    let (pool, image) = parse_image(a.image.as_deref().unwrap_or(DEFAULT_IMAGE))?;
    let spec = format!("{pool}/{image}");
    let size = a.size.as_deref().map(nvmux_core::parse_size).transpose()?;
    preflight(&conf, &pool)?;
    let work = std::env::temp_dir().join(format!("nvmux-bench-rbd-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let r = run_in(a, secs, srv_cpu, &conf, &pool, &image, &spec, size, &work);
    let _ = std::fs::remove_dir_all(&work);
    r
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    a: &BenchArgs,
    secs: u64,
    srv_cpu: Option<usize>,
    orig_conf: &Path,
    pool: &str,
    image: &str,
    spec: &str,
    size: Option<u64>,
    work: &Path,
) -> Res<()> {
    let conf = work.join("ceph.conf");
    std::fs::write(&conf, bench_conf_text(&std::fs::read_to_string(orig_conf)?))?;
    let size = prepare_image(&conf, pool, image, size)?;
    let osds = osd_pids(orig_conf);
    if osds.is_empty() {
        eprintln!(
            "note: no ceph-osd process names {} on its command line; the OSD CPU column stays empty",
            orig_conf.display()
        );
    }
    // The nvmux rows are left out (and the run fails at the end) when the daemon cannot
    // serve the image; the baselines are still measured.
    let nvmux = match start_nvmux(work, srv_cpu, &conf, spec) {
        Ok(x) => Some(x),
        Err(e) => {
            eprintln!("nvmux: cannot serve {spec}: {e}");
            None
        }
    };
    let nvmux_err = nvmux.is_none();
    let qsock = work.join("qsd.sock");
    let qsd = start_qsd(&conf, pool, image, &qsock, srv_cpu, &work.join("qsd.log"))?;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rounds = a.rounds.max(1);
    let runs: Vec<(Op, usize, &str)> = RUNS
        .iter()
        .copied()
        .filter(|(_, _, w)| a.only.as_deref().is_none_or(|o| w.contains(o)))
        .collect();
    let servers = 2 + usize::from(nvmux.is_some());
    let total = rounds * runs.len() * servers;
    let mut rows: Vec<(String, String, Sample)> = Vec::new();
    let mut json_rows = Vec::new();
    for round in 0..rounds {
        for &(op, qd, w) in &runs {
            // Each round starts with another of the three: what one run leaves behind in
            // the OSD (deferred writes, compaction) slows the next, whoever that is.
            let mut order = [NVMUX, QSD, FIO];
            order.rotate_left(round % 3);
            for srv in order {
                let s = match srv {
                    NVMUX => {
                        let Some((d, sock)) = &nvmux else { continue };
                        let cpu = || d.cpu_seconds();
                        measure_vhost(sock, op, qd, secs, &cpu, &osds)?
                    }
                    QSD => {
                        let cpu = || qsd.cpu_seconds();
                        measure_vhost(&qsock, op, qd, secs, &cpu, &osds)?
                    }
                    _ => measure_fio(&conf, pool, image, op, qd, secs, srv_cpu, &osds)?,
                };
                eprintln!(
                    "[{:>2}/{total}] {srv:<8} {w:<15} {:>8.0} IOPS  p50 {:>7.1} µs  p99 {:>8.1} µs  CPU server {} client {:.0}% OSD {} machine {}",
                    rows.len() + 1,
                    s.m.iops,
                    s.m.p50_us,
                    s.m.p99_us,
                    cell_pct(s.server_pct),
                    s.client_pct,
                    cell_pct(s.osd_pct),
                    cell_pct(s.machine_pct)
                );
                json_rows.push(json!({
                    "server": srv, "workload": w, "round": round, "m": s.m,
                    "cpu_pct": {"server": s.server_pct, "client": s.client_pct, "osd": s.osd_pct, "machine": s.machine_pct},
                }));
                rows.push((srv.to_string(), w.to_string(), s));
            }
        }
    }
    if let Some((d, _)) = nvmux {
        let _ = d.stop();
    }
    let _ = qsd.stop();
    let title = format!(
        "One RBD image ({spec}, {}, written once before the runs), 4 KiB random I/O, {secs} s per run, medians of {rounds} rounds (each round runs every workload on nvmux, QSD and fio-rbd in turn, each round starting with the next of the three); librbd cache off for all three; nvmux and QSD (vhost-user, libblkio client on CPU 1) on CPU 0, fio's rbd engine on CPU 0; the cluster's daemons unpinned",
        nvmux_core::format_size(size)
    );
    let title = format!(
        "{title}; load average before the runs: {}",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let md = tables(&rows, &title);
    println!("\n{md}");
    write_report(&a.out, "rbd-latest.json", "rbd", secs, json!(json_rows))?;
    std::fs::write(a.out.join("rbd.md"), &md)?;
    if nvmux_err {
        return Err(format!(
            "the nvmux rows are missing: the daemon could not serve {spec} (see above)"
        )
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs() {
        let (p, i) = parse_image("rbd/nvmux-bench").unwrap();
        assert_eq!((p.as_str(), i.as_str()), ("rbd", "nvmux-bench"));
        for bad in [
            "rbd",
            "/img",
            "rbd/",
            "rbd/ns/img",
            "rbd/img@snap",
            "rbd/a,b",
            "rbd/a b",
        ] {
            assert!(parse_image(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn conf_turns_the_cache_off_last() {
        let t = bench_conf_text("[global]\nmon host = 127.0.0.1:6789\n[client]\nrbd cache = true");
        assert!(t.starts_with("[global]\nmon host = 127.0.0.1:6789\n[client]\nrbd cache = true\n"));
        let tail = &t[t.rfind("[client]").unwrap()..];
        assert!(tail.contains("rbd cache = false"), "{t}");
    }

    #[test]
    fn ratio_cells_say_whether_the_target_is_met() {
        assert_eq!(ratio_cell(Some(130.0), Some(100.0), 1.2), "1.30x (met)");
        assert_eq!(ratio_cell(Some(85.0), Some(100.0), 0.9), "0.85x (below)");
        assert_eq!(ratio_cell(None, Some(100.0), 0.9), "-");
        assert_eq!(ratio_cell(Some(1.0), Some(0.0), 0.9), "-");
    }
}
