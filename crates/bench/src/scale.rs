//! The scale stage of `nvmux bench suite`: one daemon with `disks` null disks (1000, or
//! 100 with `--quick`), each exported over vhost-user with a libblkio client attached to
//! every one at once, plus as many NVMe/TCP namespaces. It measures what an idle export
//! costs (resident memory, threads, descriptors, CPU), how long creating the disks and
//! exports through the API takes and how long the daemon takes to restore them at start,
//! and how evenly the daemon serves 100 and then all clients at once (min/max IOPS).
//!
//! Each client is a thread of this process with its own libblkio instance (one queue,
//! interrupt-driven), so memory and descriptors of the clients are not the daemon's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use nvmux_daemon::client::ApiClient;
use plotters::prelude::*;
use serde::Serialize;
use serde_json::json;

use crate::attack::{fd_count, raise_fd_limit, rss_bytes};
use crate::client::BlkioClient;
use crate::procs::{self, ServerProc};
use crate::workload::{self, Measured, Workload};
use crate::Op;

pub type Res<T> = std::result::Result<T, String>;

/// A client's index and its results in the 100-client and the all-client run.
type ClientRuns = (usize, Res<Measured>, Res<Measured>);

/// How big a run is.
#[derive(Clone, Debug)]
pub struct ScaleArgs {
    /// The `nvmux` binary.
    pub exe: PathBuf,
    /// Scratch directory (the daemon's data directory goes under it).
    pub work: PathBuf,
    pub disks: usize,
    /// Seconds of each fairness run.
    pub seconds: u64,
    /// CPU the daemon (and its worker) is pinned to.
    pub cpu: Option<usize>,
}

/// The daemon at one disk count.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub disks: usize,
    /// Clients attached (0 or `disks`).
    pub clients: usize,
    pub rss_mib: f64,
    pub threads: usize,
    pub fds: usize,
    /// Daemon CPU over the idle window, percent of one core.
    pub idle_cpu_pct: f64,
}

/// One fairness run.
#[derive(Clone, Debug, Serialize)]
pub struct Fairness {
    pub clients: usize,
    pub total_iops: f64,
    pub min_iops: f64,
    pub max_iops: f64,
    /// min / max.
    pub ratio: f64,
    pub p99_us_worst: f64,
    pub failed: usize,
}

/// What the stage measured.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleReport {
    pub disks: usize,
    pub points: Vec<Point>,
    /// Creating `disks` null disks and their vhost-user exports through the API.
    pub create_seconds: f64,
    /// Adding `disks` namespaces to one NVMe/TCP subsystem.
    pub nvmf_seconds: f64,
    /// Resident memory per idle export: (RSS with all exports - RSS before) / disks.
    pub kib_per_export: f64,
    /// As above, with a client attached to each export (its memory table mapped).
    pub kib_per_attached_export: f64,
    /// Threads and descriptors with every client attached and every namespace added.
    pub threads_all: usize,
    pub fds_all: usize,
    pub rss_all_mib: f64,
    /// Daemon start (restoring every disk, export and namespace) until the last export's
    /// socket accepts.
    pub restore_seconds: f64,
    /// Creating a disk and its export with two CLI processes, averaged over
    /// `cli_sample` disks (added to the `disks` already there).
    pub cli_ms_per_disk: f64,
    pub cli_sample: usize,
    pub fairness: Vec<Fairness>,
    pub idle_window_s: f64,
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

struct Daemon {
    proc: ServerProc,
    api: ApiClient,
}

fn start_daemon(a: &ScaleArgs, dir: &Path) -> Res<Daemon> {
    let cfg = format!(
        "data_dir = {:?}\n[workers]\nthreads = 1\npoll_idle_us = 50\ncpus = [{}]\n",
        dir,
        a.cpu.unwrap_or(0)
    );
    let cfgp = dir.join("nvmux.toml");
    std::fs::write(&cfgp, cfg).map_err(|e| format!("{}: {e}", cfgp.display()))?;
    let mut cmd = Command::new(&a.exe);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .arg("--config")
        .arg(&cfgp);
    let log = dir.join("daemon.log");
    let mut proc = procs::spawn_pinned("nvmux serve", cmd, a.cpu, &log)?;
    let sock = dir.join("nvmux.sock");
    procs::wait_for_socket(&mut proc, &sock, &log)?;
    Ok(Daemon {
        proc,
        api: ApiClient::new(&sock),
    })
}

fn point(d: &Daemon, disks: usize, clients: usize, idle: Duration) -> Res<Point> {
    let pid = d.proc.pid();
    let c0 = d.proc.cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(idle);
    let cpu = (d.proc.cpu_seconds() - c0) / t0.elapsed().as_secs_f64() * 100.0;
    Ok(Point {
        disks,
        clients,
        rss_mib: rss_bytes(pid)? as f64 / (1 << 20) as f64,
        threads: threads_of(pid),
        fds: fd_count(pid)?,
        idle_cpu_pct: cpu,
    })
}

fn sock_of(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("s{i}.sock"))
}

/// Run the stage.
pub fn run(a: &ScaleArgs) -> Res<ScaleReport> {
    raise_fd_limit();
    let n = a.disks.max(1);
    let dir = a.work.join("scale");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let idle = Duration::from_secs(2);
    let mut d = start_daemon(a, &dir)?;
    let mut points = vec![point(&d, 0, 0, idle)?];
    let rss0 = points[0].rss_mib;
    let marks: Vec<usize> = [n / 10, n / 4, n / 2, 3 * n / 4, n]
        .into_iter()
        .filter(|&m| m > 0)
        .collect();
    let mut create = Duration::ZERO;
    let mut made = 0;
    for &m in &marks {
        let t0 = Instant::now();
        while made < m {
            let name = format!("d{made}");
            d.api
                .post(
                    "/v1/disks",
                    &json!({"name": name, "backend": "null", "size": 64u64 << 20}),
                )
                .map_err(|e| format!("create disk {name}: {e}"))?;
            d.api
                .post(
                    "/v1/exports",
                    &json!({"disk": name, "socket": sock_of(&dir, made), "num_queues": 1}),
                )
                .map_err(|e| format!("export {name}: {e}"))?;
            made += 1;
        }
        create += t0.elapsed();
        points.push(point(&d, m, 0, idle)?);
        eprintln!(
            "scale: {m} disks + exports, RSS {:.1} MiB, {} threads, {} fds, idle CPU {:.2}%",
            points.last().map_or(0.0, |p| p.rss_mib),
            points.last().map_or(0, |p| p.threads),
            points.last().map_or(0, |p| p.fds),
            points.last().map_or(0.0, |p| p.idle_cpu_pct),
        );
    }
    let rss_n = points.last().map_or(rss0, |p| p.rss_mib);
    let kib_per_export = (rss_n - rss0) * 1024.0 / n as f64;

    // NVMe/TCP: one subsystem with a namespace per disk.
    let t0 = Instant::now();
    let nqn = "nqn.2026-12.io.nvmux:scale";
    d.api
        .post(
            "/v1/subsystems",
            &json!({"nqn": nqn, "listen": "127.0.0.1:0", "hosts": ["nqn.2026-12.io.nvmux:bench"]}),
        )
        .map_err(|e| format!("create subsystem: {e}"))?;
    for i in 0..n {
        d.api
            .post(
                &format!("/v1/subsystems/{nqn}/namespaces"),
                &json!({"disk": format!("d{i}")}),
            )
            .map_err(|e| format!("namespace for d{i}: {e}"))?;
    }
    let nvmf_seconds = t0.elapsed().as_secs_f64();
    eprintln!("scale: {n} NVMe/TCP namespaces in {nvmf_seconds:.1} s");

    // Every export gets a client, all at once; then 100 and all of them run I/O.
    let w = Workload::random(Op::Read, 4096, 1, a.seconds);
    let socks: Vec<PathBuf> = (0..n).map(|i| sock_of(&dir, i)).collect();
    let few = n.min(100);
    let bar = Arc::new(Barrier::new(n + 1));
    let results: Arc<Mutex<Vec<ClientRuns>>> = Arc::new(Mutex::new(Vec::new()));
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut hs = Vec::new();
    for (i, s) in socks.iter().enumerate() {
        let (bar, results, s, w, connected) = (
            bar.clone(),
            results.clone(),
            s.clone(),
            w.clone(),
            connected.clone(),
        );
        let h = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                let c = BlkioClient::connect(&s, 1, false, 4096);
                if c.is_ok() {
                    connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                bar.wait(); // all attached
                bar.wait(); // idle measured
                let r1 = match (&c, i < few) {
                    (Ok(_), true) => None,
                    _ => Some(Err("not in this run".to_string())),
                };
                let mut c = c;
                let r1 = match r1 {
                    Some(r) => r,
                    None => match c.as_mut() {
                        Ok(c) => workload::run(c, &w),
                        Err(e) => Err(e.clone()),
                    },
                };
                bar.wait(); // first run done
                let r2 = match c.as_mut() {
                    Ok(c) => workload::run(c, &w),
                    Err(e) => Err(e.clone()),
                };
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, r1, r2));
            })
            .map_err(|e| format!("client thread {i}: {e}"))?;
        hs.push(h);
    }
    bar.wait();
    let attached = connected.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("scale: {attached}/{n} libblkio clients attached");
    let p = point(&d, n, attached, idle * 2);
    bar.wait();
    bar.wait();
    for h in hs {
        let _ = h.join();
    }
    let p = p?;
    let kib_per_attached_export = (p.rss_mib - rss0) * 1024.0 / n as f64;
    let (threads_all, fds_all, rss_all_mib) = (p.threads, p.fds, p.rss_mib);
    points.push(p);
    let res = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
    let fair = |pick: &dyn Fn(&ClientRuns) -> Option<Res<Measured>>, clients: usize| {
        let ms: Vec<Res<Measured>> = res.iter().filter_map(pick).collect();
        let ok: Vec<&Measured> = ms.iter().filter_map(|m| m.as_ref().ok()).collect();
        let min = ok.iter().map(|m| m.iops).fold(f64::INFINITY, f64::min);
        let max = ok.iter().map(|m| m.iops).fold(0.0, f64::max);
        Fairness {
            clients,
            total_iops: ok.iter().map(|m| m.iops).sum(),
            min_iops: if ok.is_empty() { 0.0 } else { min },
            max_iops: max,
            ratio: if max > 0.0 && !ok.is_empty() {
                min / max
            } else {
                0.0
            },
            p99_us_worst: ok.iter().map(|m| m.p99_us).fold(0.0, f64::max),
            failed: ms.len() - ok.len(),
        }
    };
    let mut fairness = vec![fair(&|r| (r.0 < few).then(|| r.1.clone()), few)];
    if n > few {
        fairness.push(fair(&|r| Some(r.2.clone()), n));
    } else {
        // With --quick the second run is the same 100 clients again.
        fairness.push(fair(&|r| Some(r.2.clone()), n));
    }
    for f in &fairness {
        eprintln!(
            "scale: {} active clients: {:.0} IOPS in all, min {:.0} max {:.0} (min/max {:.3}), {} failed",
            f.clients, f.total_iops, f.min_iops, f.max_iops, f.ratio, f.failed
        );
    }

    // Restore: stop, start again on the same state, wait for the last export.
    let _ = d.proc.stop();
    let t0 = Instant::now();
    d = start_daemon(a, &dir)?;
    let last = sock_of(&dir, n - 1);
    while std::os::unix::net::UnixStream::connect(&last).is_err() {
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(format!("restore: {} did not come back", last.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let restore_seconds = t0.elapsed().as_secs_f64();
    let exports = d
        .api
        .get("/v1/exports")
        .map_err(|e| format!("list exports: {e}"))?;
    let restored = exports.as_array().map_or(0, |v| v.len());
    eprintln!("scale: restart restored {restored} exports in {restore_seconds:.2} s");
    if restored < n {
        return Err(format!("restore brought back {restored} of {n} exports"));
    }
    // The same through the CLI (one `nvmux disk create` and one `nvmux export add`
    // process per disk), on a sample of disks.
    let k = n.min(100);
    let api = dir.join("nvmux.sock");
    let t0 = Instant::now();
    for i in 0..k {
        let name = format!("c{i}");
        let sock = dir.join(format!("c{i}.sock"));
        for args in [
            vec![
                "disk",
                "create",
                &name,
                "--backend",
                "null",
                "--size",
                "64M",
            ],
            vec![
                "export",
                "add",
                &name,
                "--socket",
                sock.to_str().unwrap_or(""),
            ],
        ] {
            let o = Command::new(&a.exe)
                .args(&args)
                .arg("--api")
                .arg(&api)
                .output()
                .map_err(|e| format!("nvmux {}: {e}", args.join(" ")))?;
            if !o.status.success() {
                return Err(format!(
                    "nvmux {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
    }
    let cli_ms_per_disk = t0.elapsed().as_secs_f64() * 1000.0 / k as f64;
    eprintln!("scale: through the CLI: {cli_ms_per_disk:.1} ms per disk + export ({k} disks)");
    let _ = d.proc.stop();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ScaleReport {
        disks: n,
        points,
        create_seconds: create.as_secs_f64(),
        nvmf_seconds,
        kib_per_export,
        kib_per_attached_export,
        threads_all,
        fds_all,
        rss_all_mib,
        restore_seconds,
        cli_ms_per_disk,
        cli_sample: k,
        fairness,
        idle_window_s: idle.as_secs_f64(),
    })
}

/// Memory and idle CPU against disk count (one PNG, two panels); returns its file name.
pub fn plot(r: &ScaleReport, out: &Path) -> Res<String> {
    let name = "scale.png";
    let path = out.join(name);
    let root = BitMapBackend::new(&path, (1000, 420)).into_drawing_area();
    let pe = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| pe(&e))?;
    let (left, right) = root.split_horizontally(500);
    panel(&left, "daemon RSS (MiB)", r, |p| p.rss_mib, true).map_err(|e| pe(&e))?;
    panel(
        &right,
        "daemon CPU while idle (% of a core)",
        r,
        |p| p.idle_cpu_pct,
        false,
    )
    .map_err(|e| pe(&e))?;
    root.present().map_err(|e| pe(&e))?;
    Ok(name.to_string())
}

/// One panel of the plot: `value` against disk count, the points without clients as a
/// red line with dots, those with a client on each export as blue dots.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    r: &ScaleReport,
    value: fn(&Point) -> f64,
    legend: bool,
) -> Res<()> {
    let se = |e: &dyn std::fmt::Display| e.to_string();
    let idle: Vec<&Point> = r.points.iter().filter(|p| p.clients == 0).collect();
    let attached: Vec<&Point> = r.points.iter().filter(|p| p.clients > 0).collect();
    let xmax = r.disks as f64 * 1.05;
    let ymax = r.points.iter().map(value).fold(1.0, f64::max) * 1.15;
    let mut c = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(|e| se(&e))?;
    c.configure_mesh()
        .x_desc("disks (vhost-user exports)")
        .draw()
        .map_err(|e| se(&e))?;
    let line = c
        .draw_series(LineSeries::new(
            idle.iter().map(|p| (p.disks as f64, value(p))),
            RED.stroke_width(2),
        ))
        .map_err(|e| se(&e))?;
    if legend {
        line.label("no client")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], RED));
    }
    c.draw_series(
        idle.iter()
            .map(|p| Circle::new((p.disks as f64, value(p)), 3, RED.filled())),
    )
    .map_err(|e| se(&e))?;
    let dots = c
        .draw_series(
            attached
                .iter()
                .map(|p| Circle::new((p.disks as f64, value(p)), 5, BLUE.filled())),
        )
        .map_err(|e| se(&e))?;
    if legend {
        dots.label("a libblkio client on each")
            .legend(|(x, y)| Circle::new((x + 7, y), 4, BLUE.filled()));
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| se(&e))?;
    }
    Ok(())
}

/// The stage's part of the suite's markdown report.
pub fn markdown(r: &ScaleReport, plot: Option<&str>) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "## Scale: {} null disks on one daemon\n\n",
        r.disks
    ));
    s.push_str("| disks | clients attached | RSS MiB | threads | fds | idle CPU % |\n|---|---|---|---|---|---|\n");
    for p in &r.points {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {} | {} | {:.2} |\n",
            p.disks, p.clients, p.rss_mib, p.threads, p.fds, p.idle_cpu_pct
        ));
    }
    s.push_str(&format!(
        "\n- memory per idle export: {:.1} KiB ({:.1} KiB with a client attached)\n\
         - create {} disks + vhost-user exports through the API: {:.2} s; {} NVMe/TCP namespaces: {:.2} s\n\
         - through the CLI (`nvmux disk create` + `nvmux export add`, two processes a disk): {:.1} ms a disk (over {} disks), {:.1} s for {}\n\
         - restore at daemon start (until the last export accepts): {:.2} s\n\
         - with every client attached and every namespace added: {} threads, {} fds, {:.1} MiB\n",
        r.kib_per_export,
        r.kib_per_attached_export,
        r.disks,
        r.create_seconds,
        r.disks,
        r.nvmf_seconds,
        r.cli_ms_per_disk,
        r.cli_sample,
        r.cli_ms_per_disk * r.disks as f64 / 1000.0,
        r.disks,
        r.restore_seconds,
        r.threads_all,
        r.fds_all,
        r.rss_all_mib
    ));
    s.push_str("\n| active clients (4 KiB random read, QD1 each) | IOPS in all | min | max | min/max | worst p99 µs | failed |\n|---|---|---|---|---|---|---|\n");
    for f in &r.fairness {
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.0} | {} |\n",
            f.clients, f.total_iops, f.min_iops, f.max_iops, f.ratio, f.p99_us_worst, f.failed
        ));
    }
    if let Some(p) = plot {
        s.push_str(&format!(
            "\n![memory and idle CPU against disk count]({p})\n"
        ));
    }
    s
}

/// The suite's hook: run the stage (1000 disks, or 100 with `quick`), write
/// `scale.json` and `scale.png` into `out`, and return the markdown section.
pub fn suite_stage(
    exe: &Path,
    work: &Path,
    out: &Path,
    quick: bool,
    cpu: Option<usize>,
) -> Res<String> {
    // NVMUX_SCALE_BIN: measure another nvmux binary (a baseline) with this stage.
    let exe = std::env::var_os("NVMUX_SCALE_BIN").map_or_else(|| exe.to_path_buf(), PathBuf::from);
    let a = ScaleArgs {
        exe,
        work: work.to_path_buf(),
        disks: if quick { 100 } else { 1000 },
        seconds: if quick { 2 } else { 5 },
        cpu,
    };
    eprintln!(
        "scale: {} null disks with vhost-user exports and libblkio clients, and {} NVMe/TCP namespaces, on one daemon",
        a.disks, a.disks
    );
    let r = run(&a)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let j = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
    std::fs::write(out.join("scale.json"), j).map_err(|e| format!("scale.json: {e}"))?;
    let p = crate::plots::font()
        .map_err(|e| e.to_string())
        .and_then(|()| plot(&r, out));
    if let Err(e) = &p {
        eprintln!("scale: no plot: {e}");
    }
    Ok(markdown(&r, p.ok().as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_both_panels() {
        crate::plots::font().unwrap();
        let point = |disks, clients, rss_mib, idle_cpu_pct| Point {
            disks,
            clients,
            rss_mib,
            threads: 6,
            fds: 2 * disks,
            idle_cpu_pct,
        };
        let r = ScaleReport {
            disks: 100,
            points: vec![
                point(0, 0, 6.0, 0.0),
                point(50, 0, 9.0, 0.0),
                point(100, 0, 12.0, 0.01),
                point(100, 100, 30.0, 0.02),
            ],
            create_seconds: 1.0,
            nvmf_seconds: 0.5,
            kib_per_export: 60.0,
            kib_per_attached_export: 180.0,
            threads_all: 6,
            fds_all: 400,
            rss_all_mib: 30.0,
            restore_seconds: 1.0,
            cli_ms_per_disk: 20.0,
            cli_sample: 10,
            fairness: Vec::new(),
            idle_window_s: 5.0,
        };
        let dir = std::env::temp_dir().join(format!("nvmux-scale-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let name = plot(&r, &dir).unwrap();
        let png = std::fs::read(dir.join(&name)).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(&png[1..4], b"PNG");
        assert!(png.len() > 10_000, "{} bytes", png.len());
    }
}
