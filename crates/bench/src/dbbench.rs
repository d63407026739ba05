//! The db_bench stage of `nvmux bench suite`: the ICPE'22 study's application benchmark.
//!
//! A QEMU/TCG guest (the VM tests' image, `tests/vm/build-initramfs.sh`, which carries
//! Debian's `db_bench` from `rocksdb-tools`) makes an ext4 file system on its disk and runs
//! RocksDB's `db_bench` with `fillrandom`, then `readrandom`, then `readwhilewriting`
//! (`tests/vm/guest-dbbench.sh`). The same backing file is reached through four paths, one
//! guest boot each, in turns:
//!
//! | path | server | guest device |
//! |---|---|---|
//! | `nvmux-vhost` | nvmux, vhost-user-blk | virtio-blk (vhost-user-blk-pci) |
//! | `qsd-vhost` | qemu-storage-daemon, vhost-user-blk (`cache.direct=on,aio=io_uring`) | virtio-blk (vhost-user-blk-pci) |
//! | `nvmux-nvmf` | nvmux, NVMe/TCP | the guest kernel's nvme-tcp initiator over QEMU user networking |
//! | `virtio-blk` | QEMU itself (`aio=io_uring,cache=none`) | virtio-blk-pci |
//!
//! The rounds interleave the paths (each round runs all four), and the report takes each
//! path's median over the rounds. Under TCG the guest's CPU, not the storage, bounds every
//! figure: only the ratios between paths measured in one run mean anything. Reads go to the
//! disk (direct reads, an 8 MiB block cache), so the path is on the critical path of every
//! read that misses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::client::Result;
use crate::procs;

/// The benchmarks, in the order one db_bench run does them.
pub const BENCHMARKS: [&str; 3] = ["fillrandom", "readrandom", "readwhilewriting"];

/// One way to the backing file.
#[derive(Clone, Debug)]
pub enum DbPath {
    /// A vhost-user-blk socket served by nvmux.
    NvmuxVhost(PathBuf),
    /// A vhost-user-blk socket served by qemu-storage-daemon.
    QsdVhost(PathBuf),
    /// An nvmux NVMe/TCP subsystem: its address (on the host's loopback), NQN, and the
    /// host NQN on its allow-list (an NVMe UUID NQN; its UUID is the guest's host ID).
    NvmuxNvmf {
        addr: SocketAddr,
        nqn: String,
        hostnqn: String,
    },
    /// QEMU's own virtio-blk on the file (`aio=io_uring,cache=none`): the baseline.
    Virtio(PathBuf),
    /// An nvmux vfio-user socket: the guest's nvme driver on nvmux's PCI NVMe controller
    /// (QEMU 10.1+: the VM's `qemu_root`).
    NvmuxVfioUser(PathBuf),
}

impl DbPath {
    pub fn name(&self) -> &'static str {
        match self {
            DbPath::NvmuxVhost(_) => "nvmux-vhost",
            DbPath::QsdVhost(_) => "qsd-vhost",
            DbPath::NvmuxNvmf { .. } => "nvmux-nvmf",
            DbPath::Virtio(_) => "virtio-blk",
            DbPath::NvmuxVfioUser(_) => "nvmux-vfio-user",
        }
    }
}

/// The workload's size.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sizes {
    /// Keys written by fillrandom (16-byte keys).
    pub num: u64,
    /// Reads by readrandom and by readwhilewriting's reader.
    pub reads: u64,
    pub value_size: u32,
    /// readwhilewriting's writer, bytes per second.
    pub write_rate: u64,
    /// Rounds (each boots one guest per path).
    pub rounds: usize,
}

impl Sizes {
    /// `--quick`: one round of a small database (15–25 s a path here, under 2 minutes in
    /// all); else 5 rounds of a larger one with more reads (about 20 s a path, 7 minutes).
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                num: 20_000,
                reads: 3_000,
                value_size: 400,
                write_rate: 256 << 10,
                rounds: 1,
            }
        } else {
            Sizes {
                num: 40_000,
                reads: 10_000,
                value_size: 400,
                write_rate: 256 << 10,
                rounds: 5,
            }
        }
    }
}

/// Where the guest image and its scripts are.
#[derive(Clone, Debug)]
pub struct Vm {
    /// `tests/vm` of the source tree (boot.sh, build-initramfs.sh, guest-dbbench.sh).
    pub scripts: PathBuf,
    /// The base image, built (or found up to date) by build-initramfs.sh; shared with
    /// `tests/vm/run.sh`.
    pub image: PathBuf,
    /// Run QEMU from this root (`boot.sh --qemu-root`: the Debian sid chroot of
    /// `scripts/sid-qemu.sh`, QEMU 11); `None`: the host's QEMU.
    pub qemu_root: Option<PathBuf>,
}

impl Vm {
    /// `$NVMUX_VM_SCRIPTS` or the source tree's `tests/vm`; the image in the source tree's
    /// `target/vm/initramfs.cpio` (the VM tests' image) or `$NVMUX_VM_IMAGE`.
    pub fn from_source_tree() -> Vm {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let scripts = std::env::var_os("NVMUX_VM_SCRIPTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("tests/vm"));
        let image = std::env::var_os("NVMUX_VM_IMAGE")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target/vm/initramfs.cpio"));
        Vm {
            scripts,
            image,
            qemu_root: None,
        }
    }

    /// Build the image unless it is up to date, and check that it carries db_bench.
    pub fn prepare(&self, log: &Path) -> Result<()> {
        self.build(log)?;
        let tools_file = PathBuf::from(format!("{}.tools", self.image.display()));
        let tools = std::fs::read_to_string(&tools_file).unwrap_or_default();
        if !tools.lines().any(|l| l == "db_bench") {
            return Err(
                "db_bench stage: the guest image has no db_bench; apt-get install rocksdb-tools \
                 (the image is rebuilt on the next run)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Build the image unless it is up to date (`tests/vm/build-initramfs.sh`).
    pub fn build(&self, log: &Path) -> Result<()> {
        let script = self.scripts.join("build-initramfs.sh");
        if !script.exists() {
            return Err(format!(
                "guest image: {} is missing; it needs the source tree's tests/vm (set NVMUX_VM_SCRIPTS=DIR)",
                script.display()
            ));
        }
        if let Some(dir) = self.image.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let out = std::process::Command::new(&script)
            .arg(&self.image)
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        let _ = std::fs::write(log, [&out.stdout[..], &out.stderr[..]].concat());
        if !out.status.success() {
            return Err(format!(
                "guest image: building it failed ({}); see {}",
                out.status,
                log.display()
            ));
        }
        Ok(())
    }

    /// `boot.sh` for one guest running `script` (a file of `tests/vm`) on path `p`, its
    /// console in `log`: the disk's device and the guest's `DEV_KIND` (virtio, nvmf,
    /// nvme) with what it needs to reach the disk; QEMU from `qemu_root` if set.
    pub fn boot_command(
        &self,
        script: &str,
        p: &DbPath,
        log: &Path,
        timeout_s: u64,
    ) -> Result<std::process::Command> {
        let mut cmd = std::process::Command::new(self.scripts.join("boot.sh"));
        cmd.arg("--initrd")
            .arg(&self.image)
            .arg("--script")
            .arg(self.scripts.join(script))
            .arg("--log")
            .arg(log)
            .args(["--smp", "1", "--timeout", &timeout_s.to_string()]);
        if let Some(r) = &self.qemu_root {
            cmd.arg("--qemu-root").arg(r);
        }
        match p {
            DbPath::NvmuxVhost(sock) | DbPath::QsdVhost(sock) => {
                cmd.arg("--vhost-sock")
                    .arg(sock)
                    .arg("--env")
                    .arg("DEV_KIND=virtio");
            }
            DbPath::Virtio(file) => {
                cmd.arg("--raw-disk")
                    .arg(format!("{}:dbbench", file.display()))
                    .args(["--raw-aio", "io_uring", "--env", "DEV_KIND=virtio"]);
            }
            DbPath::NvmuxVfioUser(sock) => {
                cmd.arg("--vfio-user")
                    .arg(sock)
                    .arg("--env")
                    .arg("DEV_KIND=nvme");
            }
            DbPath::NvmuxNvmf { addr, nqn, hostnqn } => {
                let hostid = hostnqn
                    .rsplit_once(":uuid:")
                    .map(|(_, u)| u.to_string())
                    .ok_or_else(|| format!("host NQN {hostnqn} is not a UUID NQN"))?;
                cmd.arg("--net");
                for kv in [
                    "DEV_KIND=nvmf".to_string(),
                    "TARGET_IP=10.0.2.2".to_string(),
                    format!("PORT={}", addr.port()),
                    format!("NQN={nqn}"),
                    format!("HOSTNQN={hostnqn}"),
                    format!("HOSTID={hostid}"),
                ] {
                    cmd.arg("--env").arg(kv);
                }
            }
        }
        Ok(cmd)
    }
}

/// One benchmark of one db_bench run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DbRow {
    pub path: &'static str,
    pub round: usize,
    pub bench: String,
    pub ops_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Seconds db_bench measured this benchmark for.
    pub seconds: f64,
}

/// Per path and benchmark: medians over the rounds, and ratios.
#[derive(Clone, Debug, Serialize)]
pub struct DbSummary {
    pub path: &'static str,
    pub bench: String,
    pub rounds: usize,
    pub ops_per_s: f64,
    pub p99_us: f64,
    /// ops/s over the plain virtio-blk path's (higher is better).
    pub ops_vs_virtio: Option<f64>,
    /// p99 over the plain virtio-blk path's (lower is better).
    pub p99_vs_virtio: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DbReport {
    pub sizes: Sizes,
    pub rows: Vec<DbRow>,
    pub summary: Vec<DbSummary>,
    /// Paths that were not measured or failed, with why.
    pub failures: Vec<String>,
    pub wall_seconds: f64,
}

/// Run the stage: `rounds` rounds, each booting one guest per path in `paths`, QEMU pinned
/// to `cpu`. Logs (guest consoles, the image build) go to `work`.
pub fn run(
    vm: &Vm,
    paths: &[DbPath],
    sizes: Sizes,
    cpu: Option<usize>,
    work: &Path,
) -> Result<DbReport> {
    let t0 = Instant::now();
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    vm.prepare(&work.join("image-build.log"))?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for round in 0..sizes.rounds {
        for p in paths {
            let log = work.join(format!("dbbench-{}-{round}.log", p.name()));
            let b0 = Instant::now();
            match boot(vm, p, sizes, cpu, &log) {
                Ok(r) => {
                    eprintln!(
                        "db_bench {:<12} round {}: {} ({:.0} s)",
                        p.name(),
                        round + 1,
                        r.iter()
                            .map(|r| format!(
                                "{} {:.0} ops/s p99 {:.0} µs",
                                r.bench, r.ops_per_s, r.p99_us
                            ))
                            .collect::<Vec<_>>()
                            .join(", "),
                        b0.elapsed().as_secs_f64()
                    );
                    rows.extend(r.into_iter().map(|mut r| {
                        r.path = p.name();
                        r.round = round;
                        r
                    }));
                }
                Err(e) => {
                    eprintln!("db_bench {:<12} round {}: {e}", p.name(), round + 1);
                    failures.push(format!("{} round {}: {e}", p.name(), round + 1));
                }
            }
        }
    }
    let summary = summarize(&rows, paths);
    Ok(DbReport {
        sizes,
        rows,
        summary,
        failures,
        wall_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Boot one guest on path `p` and parse its db_bench report.
fn boot(vm: &Vm, p: &DbPath, s: Sizes, cpu: Option<usize>, log: &Path) -> Result<Vec<DbRow>> {
    let mut cmd = vm.boot_command("guest-dbbench.sh", p, log, 600)?;
    for (k, v) in [
        ("NUM", s.num.to_string()),
        ("READS", s.reads.to_string()),
        ("VALUE_SIZE", s.value_size.to_string()),
        ("WRITE_RATE", s.write_rate.to_string()),
    ] {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    let out = PathBuf::from(format!("{}.boot", log.display()));
    let mut proc = procs::spawn_pinned("boot.sh", cmd, cpu, &out)?;
    let st = proc.child.wait().map_err(|e| format!("boot.sh: {e}"))?;
    let console = std::fs::read_to_string(log).unwrap_or_default();
    if !st.success() {
        let why = std::fs::read_to_string(&out).unwrap_or_default();
        let first = why.lines().next().unwrap_or("").to_string();
        return Err(format!(
            "guest failed ({st}): {first} (console: {})",
            log.display()
        ));
    }
    let rows = parse(&console);
    let missing: Vec<&str> = BENCHMARKS
        .iter()
        .filter(|b| !rows.iter().any(|r| r.bench == **b))
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "no result for {} in the console ({})",
            missing.join(", "),
            log.display()
        ));
    }
    Ok(rows)
}

/// db_bench's report between the guest's NVMUX-DBBENCH-BEGIN/END markers: a line
/// `NAME : X micros/op N ops/sec S seconds ...` per benchmark, followed (with
/// `--histogram`) by `Percentiles: P50: a P75: b P99: c ...`.
pub fn parse(console: &str) -> Vec<DbRow> {
    let body = console
        .split_once("NVMUX-DBBENCH-BEGIN")
        .map_or("", |(_, b)| b);
    let body = body
        .split_once("NVMUX-DBBENCH-END")
        .map_or(body, |(b, _)| b);
    let mut rows: Vec<DbRow> = Vec::new();
    let mut pending: Option<DbRow> = None;
    for line in body.lines() {
        let line = line.trim();
        if let Some((name, rest)) = line.split_once(" : ").or_else(|| line.split_once(":")) {
            let name = name.trim();
            if BENCHMARKS.contains(&name) && rest.contains("ops/sec") {
                let w: Vec<&str> = rest.split_whitespace().collect();
                let before = |unit: &str| {
                    w.iter()
                        .position(|x| *x == unit)
                        .and_then(|i| i.checked_sub(1))
                        .and_then(|i| w.get(i))
                        .and_then(|x| x.parse::<f64>().ok())
                };
                if let (Some(ops), Some(secs)) = (before("ops/sec"), before("seconds")) {
                    if let Some(r) = pending.take() {
                        rows.push(r);
                    }
                    pending = Some(DbRow {
                        path: "",
                        round: 0,
                        bench: name.to_string(),
                        ops_per_s: ops,
                        p50_us: f64::NAN,
                        p99_us: f64::NAN,
                        seconds: secs,
                    });
                    continue;
                }
            }
        }
        if let (Some(r), Some(pct)) = (pending.as_mut(), line.strip_prefix("Percentiles:")) {
            let w: Vec<&str> = pct.split_whitespace().collect();
            let after = |key: &str| {
                w.iter()
                    .position(|x| *x == key)
                    .and_then(|i| w.get(i + 1))
                    .and_then(|x| x.parse::<f64>().ok())
            };
            r.p50_us = after("P50:").unwrap_or(f64::NAN);
            r.p99_us = after("P99:").unwrap_or(f64::NAN);
            if let Some(r) = pending.take() {
                rows.push(r);
            }
        }
    }
    rows.extend(pending);
    rows
}

/// The median of the finite values (NaN when there is none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

/// Medians per path and benchmark, with ratios against the virtio-blk path.
pub fn summarize(rows: &[DbRow], paths: &[DbPath]) -> Vec<DbSummary> {
    let mut out: Vec<DbSummary> = Vec::new();
    for p in paths {
        for b in BENCHMARKS {
            let mine: Vec<&DbRow> = rows
                .iter()
                .filter(|r| r.path == p.name() && r.bench == b)
                .collect();
            if mine.is_empty() {
                continue;
            }
            out.push(DbSummary {
                path: p.name(),
                bench: b.to_string(),
                rounds: mine.len(),
                ops_per_s: median(mine.iter().map(|r| r.ops_per_s).collect()),
                p99_us: median(mine.iter().map(|r| r.p99_us).collect()),
                ops_vs_virtio: None,
                p99_vs_virtio: None,
            });
        }
    }
    let base: Vec<(String, f64, f64)> = out
        .iter()
        .filter(|s| s.path == "virtio-blk")
        .map(|s| (s.bench.clone(), s.ops_per_s, s.p99_us))
        .collect();
    for s in &mut out {
        if let Some((_, ops, p99)) = base.iter().find(|(b, ..)| *b == s.bench) {
            s.ops_vs_virtio = ratio(s.ops_per_s, *ops);
            s.p99_vs_virtio = ratio(s.p99_us, *p99);
        }
    }
    out
}

impl DbReport {
    fn get(&self, path: &str, bench: &str) -> Option<&DbSummary> {
        self.summary
            .iter()
            .find(|s| s.path == path && s.bench == bench)
    }

    /// A `## db_bench` section for report.md.
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let s = &self.sizes;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "\n## db_bench (RocksDB in a QEMU/TCG guest, ext4)\n\n{} round(s), medians; {} keys of 16+{} bytes, {} reads, readwhilewriting's writer at {} KiB/s; direct reads and flush/compaction, 8 MiB block cache. TCG bounds every figure: compare the ratios, which are against the plain QEMU virtio-blk disk (`aio=io_uring,cache=none`) on the same file in the same run.\n",
            s.rounds,
            s.num,
            s.value_size,
            s.reads,
            s.write_rate >> 10
        );
        let _ = writeln!(
            md,
            "| path | benchmark | ops/s | p99 µs | ops/s vs virtio-blk | p99 vs virtio-blk |\n|---|---|---|---|---|---|"
        );
        let f = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.2}"));
        for r in &self.summary {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {} | {} |",
                r.path,
                r.bench,
                r.ops_per_s,
                r.p99_us,
                f(r.ops_vs_virtio),
                f(r.p99_vs_virtio)
            );
        }
        let _ = writeln!(
            md,
            "\n| benchmark | nvmux-vhost / qsd-vhost ops/s | p99 | nvmux-nvmf / virtio-blk ops/s |\n|---|---|---|---|"
        );
        for b in BENCHMARKS {
            let (n, q, t) = (
                self.get("nvmux-vhost", b),
                self.get("qsd-vhost", b),
                self.get("nvmux-nvmf", b),
            );
            let v = self.get("virtio-blk", b);
            let _ = writeln!(
                md,
                "| {b} | {} | {} | {} |",
                f(n.zip(q).and_then(|(n, q)| ratio(n.ops_per_s, q.ops_per_s))),
                f(n.zip(q).and_then(|(n, q)| ratio(n.p99_us, q.p99_us))),
                f(t.zip(v).and_then(|(t, v)| ratio(t.ops_per_s, v.ops_per_s))),
            );
        }
        if !self.failures.is_empty() {
            let _ = writeln!(md, "\nNot measured: {}", self.failures.join("; "));
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // What Debian 12's db_bench 7.8.3 printed in a guest (shortened).
    const CONSOLE: &str = "init: running /test.sh\r
test: ext4 on /dev/vda (1024 MiB)\r
NVMUX-DBBENCH-BEGIN\r
RocksDB:    version 7.8.3\r
Read rate: 0 ops/second\r
fillrandom   :     403.454 micros/op 2478 ops/sec 20.174 seconds 50000 operations;    1.0 MB/s\r
Microseconds per write:\r
Count: 50000 Average: 403.1  StdDev: 1.0\r
Percentiles: P50: 102.19 P75: 151.04 P99: 4695.12 P99.9: 9331.03 P99.99: 21000.00\r
readrandom   :     519.516 micros/op 1924 ops/sec 2.598 seconds 5000 operations;    0.5 MB/s (3148 of 5000 found)\r
Percentiles: P50: 310.03 P75: 625.56 P99: 5426.67 P99.9: 8662.50 P99.99: 12975.00\r
readwhilewriting :    2073.414 micros/op 481 ops/sec 10.389 seconds 5000 operations;    0.1 MB/s (3463 of 5000 found)\r
Percentiles: P50: 700.54 P75: 1883.71 P99: 15212.12 P99.9: 32388.89 P99.99: 47875.00\r
NVMUX-DBBENCH-END\r
fillrandom   :     1.0 micros/op 9 ops/sec 1.0 seconds 1 operations; outside the markers\r
";

    #[test]
    fn parses_db_bench_output() {
        let r = parse(CONSOLE);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].bench, "fillrandom");
        assert_eq!(r[0].ops_per_s, 2478.0);
        assert_eq!(r[0].seconds, 20.174);
        assert_eq!(r[0].p50_us, 102.19);
        assert_eq!(r[0].p99_us, 4695.12);
        assert_eq!(r[1].bench, "readrandom");
        assert_eq!(r[1].p99_us, 5426.67);
        assert_eq!(r[2].bench, "readwhilewriting");
        assert_eq!(r[2].ops_per_s, 481.0);
        assert_eq!(r[2].p99_us, 15212.12);
    }

    #[test]
    fn garbage_and_truncated_output_give_no_rows_or_partial_rows() {
        assert!(parse("").is_empty());
        assert!(parse("NVMUX-DBBENCH-BEGIN\nfillrandom : x micros/op y ops/sec\n").is_empty());
        // Cut before the percentiles: the row is kept without them.
        let r = parse("NVMUX-DBBENCH-BEGIN\nreadrandom : 1 micros/op 10 ops/sec 2 seconds\n");
        assert_eq!(r.len(), 1);
        assert!(r[0].p99_us.is_nan());
    }

    #[test]
    fn summary_takes_medians_and_ratios_against_virtio() {
        let paths = [DbPath::NvmuxVhost("a".into()), DbPath::Virtio("f".into())];
        let row = |path, round, ops, p99| DbRow {
            path,
            round,
            bench: "readrandom".into(),
            ops_per_s: ops,
            p50_us: 1.0,
            p99_us: p99,
            seconds: 1.0,
        };
        let rows = vec![
            row("nvmux-vhost", 0, 300.0, 10.0),
            row("nvmux-vhost", 1, 100.0, 30.0),
            row("nvmux-vhost", 2, 200.0, 20.0),
            row("virtio-blk", 0, 100.0, 40.0),
        ];
        let s = summarize(&rows, &paths);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].ops_per_s, 200.0);
        assert_eq!(s[0].rounds, 3);
        assert_eq!(s[0].ops_vs_virtio, Some(2.0));
        assert_eq!(s[0].p99_vs_virtio, Some(0.5));
        assert_eq!(s[1].ops_vs_virtio, Some(1.0));
    }
}
