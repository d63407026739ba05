//! The vfio-user stage of `nvmux bench suite` (`--only vfio-user`): what one QEMU/TCG
//! guest gets from the same disk through nvmux's three guest paths, in one run:
//!
//! | path | guest device | QEMU |
//! |---|---|---|
//! | `nvmux-vfio-user` | the guest's nvme driver on nvmux's PCI NVMe controller (vfio-user) | 11, `-device vfio-user-pci` |
//! | `nvmux-vhost` | virtio-blk (vhost-user-blk-pci, one queue) | 11 |
//! | `nvmux-nvmf` | the guest kernel's nvme-tcp initiator over QEMU user networking | 11 |
//!
//! One nvmux daemon (one worker thread, pinned like the suite's servers) serves one
//! /dev/shm file disk on all three. Each round boots one guest per path, in turns
//! (`tests/vm/guest-randread.sh`: fio 4 KiB random reads, QD32, one job, `RUNTIME`
//! seconds, after a 1 s warm-up), with the db_bench stage's machinery
//! ([`crate::dbbench::Vm`]); the report takes each path's median over the rounds.
//!
//! Host CPU per I/O: the daemon's and QEMU's CPU seconds (`/proc/<pid>/stat`, user +
//! system) between the guest's NVMUX-FIO-BEGIN and NVMUX-FIO-END markers (the host polls
//! the console every 20 ms), divided by the I/Os fio completed. Under TCG, QEMU's share is
//! mostly the emulated guest itself (its driver and fio): compare the daemon's share, and
//! the ratios between paths measured in the same run; TCG bounds every absolute figure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::daemon::Daemon;
use crate::dbbench::{median, DbPath, Vm};
use crate::procs;
use crate::report::{prepare_file, Res};

const NQN: &str = "nqn.2026-12.io.nvmux:guestio";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000919";
const DISK: u64 = 256 << 20;

/// One guest's run on one path.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct IoRow {
    pub path: &'static str,
    pub round: usize,
    pub iops: f64,
    pub ios: u64,
    /// fio's runtime, seconds.
    pub seconds: f64,
    /// CPU seconds between the guest's markers: the daemon's, QEMU's.
    pub daemon_cpu_s: f64,
    pub qemu_cpu_s: f64,
    /// Of the daemon's, the workers' time in loop iterations that found work
    /// (`busy_s` of `GET /v1/stats`): the rest is polling before sleeping, and the
    /// control threads.
    pub worker_busy_s: f64,
    /// Wall seconds between the markers as the host saw them.
    pub window_s: f64,
}

/// Per path: medians over the rounds, ratios against vhost-user-blk.
#[derive(Clone, Debug, Serialize)]
pub struct IoSummary {
    pub path: &'static str,
    pub rounds: usize,
    pub iops: f64,
    pub iops_vs_vhost: Option<f64>,
    /// Host CPU per I/O, µs: the daemon's, QEMU's, and their sum; and the workers' busy
    /// time per I/O (the daemon's work without its idle polling).
    pub daemon_us_per_io: f64,
    pub worker_busy_us_per_io: f64,
    pub qemu_us_per_io: f64,
    pub host_us_per_io: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct IoReport {
    pub rounds: usize,
    pub runtime_s: u64,
    pub qemu: String,
    pub rows: Vec<IoRow>,
    pub summary: Vec<IoSummary>,
    pub failures: Vec<String>,
    pub wall_seconds: f64,
}

/// fio's terse (v3) line after "NVMUX-FIO: ": (KiB read, IOPS, runtime ms) in fields 6, 8
/// and 9 (1-based).
pub fn parse_terse(console: &str) -> Option<(u64, f64, f64)> {
    let line = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("NVMUX-FIO: "))?;
    let f: Vec<&str> = line.split(';').collect();
    if f.first() != Some(&"3") {
        return None;
    }
    let kib: u64 = f.get(5)?.parse().ok()?;
    let iops: f64 = f.get(7)?.parse().ok()?;
    let ms: f64 = f.get(8)?.parse().ok()?;
    Some((kib, iops, ms))
}

/// The QEMU process under `root` (boot.sh → timeout → QEMU): the first descendant whose
/// command name starts with `qemu-system`.
fn qemu_below(root: u32) -> Option<u32> {
    let mut parent = std::collections::HashMap::new();
    let mut qemus = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat.get(l + 1..r).unwrap_or("");
        let ppid: u32 = stat
            .get(r + 2..)
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        parent.insert(pid, ppid);
        if comm.starts_with("qemu-system") {
            qemus.push(pid);
        }
    }
    qemus.into_iter().find(|&q| {
        let mut p = q;
        for _ in 0..16 {
            match parent.get(&p) {
                Some(&pp) if pp == root => return true,
                Some(&pp) if pp > 1 => p = pp,
                _ => return false,
            }
        }
        false
    })
}

/// Boot one guest on `p`; sample CPU at its markers.
fn boot_one(
    vm: &Vm,
    p: &DbPath,
    d: &Daemon,
    runtime: u64,
    cpu: Option<usize>,
    log: &Path,
) -> Res<IoRow> {
    let mut cmd = vm.boot_command("guest-randread.sh", p, log, 600)?;
    cmd.arg("--env").arg(format!("RUNTIME={runtime}"));
    let out = PathBuf::from(format!("{}.boot", log.display()));
    let _ = std::fs::remove_file(log);
    let mut proc = procs::spawn_pinned("boot.sh", cmd, cpu, &out)?;
    let root = proc.pid();
    let mut qemu: Option<u32> = None;
    let mut begin: Option<(Instant, f64, f64, f64)> = None;
    let mut end: Option<(Instant, f64, f64, f64)> = None;
    let busy = || -> f64 {
        d.api()
            .get("/v1/stats")
            .ok()
            .and_then(|v| {
                v["workers"].as_array().map(|w| {
                    w.iter()
                        .map(|x| x["busy_s"].as_f64().unwrap_or(0.0))
                        .sum::<f64>()
                })
            })
            .unwrap_or(f64::NAN)
    };
    let sample = |q: Option<u32>| {
        (
            Instant::now(),
            d.cpu_seconds(),
            q.and_then(procs::cpu_seconds).unwrap_or(f64::NAN),
            busy(),
        )
    };
    let status = loop {
        if let Some(st) = proc.child.try_wait()? {
            break st;
        }
        if qemu.is_none() {
            qemu = qemu_below(root);
        }
        if begin.is_none() || end.is_none() {
            let console = std::fs::read_to_string(log).unwrap_or_default();
            if begin.is_none() && console.contains("NVMUX-FIO-BEGIN") {
                begin = Some(sample(qemu));
            }
            if begin.is_some() && end.is_none() && console.contains("NVMUX-FIO-END") {
                end = Some(sample(qemu));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let console = std::fs::read_to_string(log).unwrap_or_default();
    if !status.success() {
        let why = std::fs::read_to_string(&out).unwrap_or_default();
        let first = why.lines().next().unwrap_or("").to_string();
        return Err(format!(
            "guest failed ({status}): {first} (console: {})",
            log.display()
        )
        .into());
    }
    let (kib, iops, ms) =
        parse_terse(&console).ok_or_else(|| format!("no fio result in {}", log.display()))?;
    let ((t0, d0, q0, b0), (t1, d1, q1, b1)) = begin.zip(end).ok_or_else(|| {
        format!(
            "the host missed the guest's fio markers ({})",
            log.display()
        )
    })?;
    Ok(IoRow {
        path: p.name(),
        round: 0,
        iops,
        ios: kib / 4,
        seconds: ms / 1000.0,
        daemon_cpu_s: d1 - d0,
        qemu_cpu_s: q1 - q0,
        worker_busy_s: b1 - b0,
        window_s: (t1 - t0).as_secs_f64(),
    })
}

/// Medians per path (CPU per I/O is each round's ratio, then the median), and IOPS
/// against vhost-user-blk's.
pub fn summarize(rows: &[IoRow], paths: &[&'static str]) -> Vec<IoSummary> {
    let per_io = |cpu: f64, ios: u64| {
        if ios == 0 {
            f64::NAN
        } else {
            cpu * 1e6 / ios as f64
        }
    };
    let mut out: Vec<IoSummary> = paths
        .iter()
        .filter_map(|&p| {
            let mine: Vec<&IoRow> = rows.iter().filter(|r| r.path == p).collect();
            if mine.is_empty() {
                return None;
            }
            Some(IoSummary {
                path: p,
                rounds: mine.len(),
                iops: median(mine.iter().map(|r| r.iops).collect()),
                iops_vs_vhost: None,
                daemon_us_per_io: median(
                    mine.iter().map(|r| per_io(r.daemon_cpu_s, r.ios)).collect(),
                ),
                worker_busy_us_per_io: median(
                    mine.iter()
                        .map(|r| per_io(r.worker_busy_s, r.ios))
                        .collect(),
                ),
                qemu_us_per_io: median(mine.iter().map(|r| per_io(r.qemu_cpu_s, r.ios)).collect()),
                host_us_per_io: median(
                    mine.iter()
                        .map(|r| per_io(r.daemon_cpu_s + r.qemu_cpu_s, r.ios))
                        .collect(),
                ),
            })
        })
        .collect();
    let base = out.iter().find(|s| s.path == "nvmux-vhost").map(|s| s.iops);
    for s in &mut out {
        s.iops_vs_vhost = base
            .filter(|b| *b > 0.0 && s.iops.is_finite())
            .map(|b| s.iops / b);
    }
    out
}

impl IoReport {
    /// The `## vfio-user NVMe` section of report.md (and of docs/benchmarks.md).
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "\n## vfio-user NVMe (one QEMU/TCG guest, 4 KiB random read QD32)\n\n{} round(s), medians, {} s of fio per guest; {}; one nvmux worker thread; the same /dev/shm file disk on every path. TCG bounds every figure: the guest's CPU (emulated) is the bottleneck, so compare the ratios between paths measured in this one run, not the absolute IOPS. Host CPU per I/O is the daemon's plus QEMU's CPU time (`/proc/PID/stat`) during fio over the I/Os done; QEMU's part is mostly the emulated guest itself. The daemon's includes its worker's polling before it sleeps (`workers.poll_idle_us` = 50 here), which at a few thousand IOPS is most of it: *worker busy* is the worker's time in loop iterations that found work, per I/O.\n",
            self.rounds, self.runtime_s, self.qemu
        );
        let _ = writeln!(
            md,
            "| path | IOPS | vs vhost-user-blk | daemon CPU µs/IO | worker busy µs/IO | QEMU CPU µs/IO | host CPU µs/IO |\n|---|---|---|---|---|---|---|"
        );
        let f = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.2}"));
        for s in &self.summary {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                s.path,
                s.iops,
                f(s.iops_vs_vhost),
                s.daemon_us_per_io,
                s.worker_busy_us_per_io,
                s.qemu_us_per_io,
                s.host_us_per_io
            );
        }
        if !self.failures.is_empty() {
            let _ = writeln!(md, "\nNot measured: {}", self.failures.join("; "));
        }
        md
    }
}

/// `nvmux bench suite --only vfio-user [--quick]`: 1 round of 5 s with `--quick`, else 3
/// rounds of 10 s. QEMU 11 comes from the sid chroot (`$NVMUX_SID_ROOT`, default
/// /var/cache/nvmux/sid-qemu; `scripts/sid-qemu.sh` builds it).
pub fn run(quick: bool, out: &Path, srv: Option<usize>, cli: Option<usize>) -> Res<IoReport> {
    let t0 = Instant::now();
    let (rounds, runtime) = if quick { (1, 5) } else { (3, 10) };
    let work = std::env::temp_dir().join(format!("nvmux-bench-guestio-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let root = PathBuf::from(
        std::env::var_os("NVMUX_SID_ROOT").unwrap_or_else(|| "/var/cache/nvmux/sid-qemu".into()),
    );
    let qemu_bin = root.join("usr/bin/qemu-system-x86_64");
    if !qemu_bin.exists() {
        return Err(format!(
            "vfio-user stage: no QEMU 11 at {} (run scripts/sid-qemu.sh, or set NVMUX_SID_ROOT)",
            qemu_bin.display()
        )
        .into());
    }
    let qemu = std::process::Command::new("chroot")
        .arg(&root)
        .args(["/usr/bin/qemu-system-x86_64", "--version"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "QEMU from the sid chroot".into());
    let mut vm = Vm::from_source_tree();
    vm.qemu_root = Some(root);
    vm.build(&work.join("image-build.log"))?;

    let img = PathBuf::from(format!("/dev/shm/nvmux-guestio-{}.img", std::process::id()));
    prepare_file(&img, DISK)?;
    // Sockets in a short directory: the chroot's QEMU reaches them through a bind mount.
    let (ddir, d) = Daemon::start_bench(&work, srv, "")?;
    let result = (|| -> Res<IoReport> {
        d.api().post(
            "/v1/disks",
            &json!({"name": "d", "backend": "file", "path": img}),
        )?;
        let vfu = ddir.join("vfu.sock");
        let vhost = ddir.join("vhost.sock");
        d.api().post(
            "/v1/exports",
            &json!({"name": "vfu", "disk": "d", "type": "vfio-user", "socket": vfu, "num_queues": 1}),
        )?;
        d.api().post(
            "/v1/exports",
            &json!({"name": "vhost", "disk": "d", "socket": vhost, "num_queues": 1}),
        )?;
        let addr = d.nvmf_subsystem(NQN, HOST, "d")?;
        let paths = [
            DbPath::NvmuxVfioUser(vfu),
            DbPath::NvmuxVhost(vhost),
            DbPath::NvmuxNvmf {
                addr,
                nqn: NQN.into(),
                hostnqn: HOST.into(),
            },
        ];
        let mut rows = Vec::new();
        let mut failures = Vec::new();
        for round in 0..rounds {
            for p in &paths {
                let log = work.join(format!("guestio-{}-{round}.log", p.name()));
                let b0 = Instant::now();
                match boot_one(&vm, p, &d, runtime, cli, &log) {
                    Ok(mut r) => {
                        r.round = round;
                        eprintln!(
                            "vfio-user stage {:<16} round {}: {:.0} IOPS, daemon {:.1} µs/IO (worker busy {:.1}), QEMU {:.1} µs/IO ({:.0} s)",
                            p.name(),
                            round + 1,
                            r.iops,
                            r.daemon_cpu_s * 1e6 / r.ios.max(1) as f64,
                            r.worker_busy_s * 1e6 / r.ios.max(1) as f64,
                            r.qemu_cpu_s * 1e6 / r.ios.max(1) as f64,
                            b0.elapsed().as_secs_f64()
                        );
                        rows.push(r);
                    }
                    Err(e) => {
                        eprintln!("vfio-user stage {:<16} round {}: {e}", p.name(), round + 1);
                        failures.push(format!("{} round {}: {e}", p.name(), round + 1));
                    }
                }
            }
        }
        let names: Vec<&'static str> = paths.iter().map(|p| p.name()).collect();
        Ok(IoReport {
            rounds,
            runtime_s: runtime,
            qemu: qemu.clone(),
            summary: summarize(&rows, &names),
            rows,
            failures,
            wall_seconds: t0.elapsed().as_secs_f64(),
        })
    })();
    let _ = d.stop();
    let _ = std::fs::remove_file(&img);
    let report = result?;
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(
            &json!({"kind": "suite-vfio-user", "quick": quick, "guestio": report}),
        )?,
    )?;
    std::fs::write(out.join("report.md"), report.markdown())?;
    if report.failures.is_empty() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("vfio-user stage: logs kept in {}", work.display());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_terse_between_noise() {
        let c = "init: running /test.sh\r\nNVMUX-FIO-BEGIN\r\nNVMUX-FIO-END\r\nNVMUX-FIO: 3;fio-3.33;rr;0;0;40960;4096;1024;10000;0;0\r\n";
        assert_eq!(parse_terse(c), Some((40960, 1024.0, 10000.0)));
        assert_eq!(parse_terse("NVMUX-FIO: fio: error\n"), None);
        assert_eq!(parse_terse(""), None);
    }

    #[test]
    fn summary_medians_and_ratios() {
        let row = |path, iops, ios, dcpu| IoRow {
            path,
            round: 0,
            iops,
            ios,
            seconds: 1.0,
            daemon_cpu_s: dcpu,
            qemu_cpu_s: 1.0,
            worker_busy_s: 0.0005,
            window_s: 1.0,
        };
        let rows = vec![
            row("nvmux-vhost", 100.0, 1000, 0.001),
            row("nvmux-vfio-user", 300.0, 2000, 0.002),
            row("nvmux-vfio-user", 100.0, 2000, 0.004),
            row("nvmux-vfio-user", 200.0, 2000, 0.006),
        ];
        let s = summarize(&rows, &["nvmux-vfio-user", "nvmux-vhost", "nvmux-nvmf"]);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].iops, 200.0);
        assert_eq!(s[0].iops_vs_vhost, Some(2.0));
        assert_eq!(s[0].daemon_us_per_io, 2.0);
        assert_eq!(s[1].daemon_us_per_io, 1.0);
        assert_eq!(s[1].qemu_us_per_io, 1000.0);
        assert_eq!(s[1].worker_busy_us_per_io, 0.5);
    }
}
