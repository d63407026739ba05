//! PNG plots and the markdown report of `nvmux bench suite`, in the style of the ICPE'22
//! study's figures: bandwidth against queue depth and block size per path, server CPU
//! load against jobs, completion-latency percentiles, and multi-VM scaling and fairness.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Res;
use crate::suite::Row;

const PATH_ORDER: [&str; 7] = [
    "bare",
    "nvmux-vhost",
    "qsd-vhost",
    "nvmux-nbd",
    "qemu-nbd",
    "nbdkit",
    "nvmux-nvmf",
];
const COLORS: [RGBColor; 7] = [
    RGBColor(90, 90, 90),
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const FONT_FILES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Register a sans-serif font for the plots' text (once per process).
pub(crate) fn font() -> Res<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONT_FILES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or("no DejaVu Sans font for the plots (install fonts-dejavu-core)")?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the DejaVu font does not load".to_string())
    })
    .clone()
    .map_err(|e| e.into())
}

struct Series {
    name: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// One series per path (in a fixed order and colour) from the rows `keep` selects.
fn by_path(
    rows: &[Row],
    keep: impl Fn(&Row) -> bool,
    x: impl Fn(&Row) -> f64,
    y: impl Fn(&Row) -> Option<f64>,
) -> Vec<Series> {
    PATH_ORDER
        .iter()
        .zip(COLORS)
        .filter_map(|(p, color)| {
            let mut points: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.path == *p && keep(r))
                .filter_map(|r| Some((x(r), y(r)?)))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (!points.is_empty()).then(|| Series {
                name: p.to_string(),
                color,
                points,
            })
        })
        .collect()
}

/// A line chart with a log2-scaled x axis (ticks at powers of two).
fn chart(
    file: &Path,
    title: &str,
    xdesc: &str,
    ydesc: &str,
    series: &[Series],
    xticks: &dyn Fn(f64) -> String,
) -> Res<()> {
    font()?;
    let root = BitMapBackend::new(file, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (xmin, xmax) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (xmin, xmax) = if xmin.is_finite() && xmax > xmin {
        (xmin, xmax)
    } else {
        (1.0, 2.0)
    };
    let (lo, hi) = (xmin.log2().floor(), xmax.log2().ceil());
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(lo - 0.3..hi + 0.3, 0.0..ymax * 1.12)?;
    c.configure_mesh()
        .x_desc(xdesc)
        .y_desc(ydesc)
        .x_labels((hi - lo) as usize + 1)
        .x_max_light_lines(0)
        .x_label_formatter(&|v| pow2_tick(*v, xticks))
        .y_label_formatter(&|v| num_label(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    for s in series {
        let col = s.color;
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x.log2(), y)).collect();
        c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(3)))?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], col.stroke_width(3)));
        c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, col.filled())))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn size_label(v: f64) -> String {
    let b = v.round() as u64;
    if b >= 1 << 20 {
        format!("{}M", b >> 20)
    } else {
        format!("{}K", b >> 10)
    }
}

fn int_label(v: f64) -> String {
    format!("{}", v.round() as u64)
}

/// A tick of a log2 axis: the label of 2^v at whole v, nothing between.
fn pow2_tick(v: f64, label: &dyn Fn(f64) -> String) -> String {
    if (v - v.round()).abs() < 0.01 {
        label(v.round().exp2())
    } else {
        String::new()
    }
}

/// A value axis' tick: 1.5M, 250k, 40, 0.8.
fn num_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn latency_chart(file: &Path, rows: &[Row], qd: usize) -> Res<()> {
    font()?;
    let pick: Vec<&Row> = PATH_ORDER
        .iter()
        .filter_map(|p| {
            rows.iter().find(|r| {
                r.path == *p
                    && r.rw == "randread"
                    && r.bs == 4096
                    && r.qd == qd
                    && r.jobs == 1
                    && r.sweep != "multi-vm"
            })
        })
        .collect();
    let root = BitMapBackend::new(file, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = pick.iter().map(|r| r.p99_us).fold(1.0f64, f64::max);
    let n = pick.len().max(1);
    let mut c = ChartBuilder::on(&root)
        .caption(
            format!("Completion latency, 4 KiB random read, QD{qd}"),
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0.0..ymax * 1.15)?;
    let names: Vec<String> = pick.iter().map(|r| r.path.to_string()).collect();
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| {
            let i = v.round();
            if (*v - i).abs() < 0.05 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("µs")
        .y_label_formatter(&|v| num_label(*v))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    let shades = [
        ("p50", RGBColor(120, 170, 220)),
        ("p95", RGBColor(31, 119, 180)),
        ("p99", RGBColor(20, 60, 120)),
    ];
    for (k, (label, col)) in shades.iter().enumerate() {
        let col = *col;
        c.draw_series(pick.iter().enumerate().map(|(i, r)| {
            let v = [r.p50_us, r.p95_us, r.p99_us][k];
            let x0 = i as f64 - 0.35 + k as f64 * 0.24;
            Rectangle::new([(x0, 0.0), (x0 + 0.2, v)], col.filled())
        }))?
        .label(*label)
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled()));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn multivm_chart(file: &Path, rows: &[Row]) -> Res<()> {
    font()?;
    let mut v: Vec<&Row> = rows.iter().filter(|r| r.sweep == "multi-vm").collect();
    v.sort_by_key(|r| r.disks);
    let root = BitMapBackend::new(file, (960, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(420);
    let hi = (v.iter().map(|r| r.disks).max().unwrap_or(1) as f64)
        .log2()
        .ceil();
    let xr = -0.3..hi + 0.3;
    let xs = |r: &Row| (r.disks as f64).log2();
    let ymax = v.iter().map(|r| r.iops).fold(1.0f64, f64::max);
    let mut c = ChartBuilder::on(&top)
        .caption(
            "Disks served at once by one nvmux daemon (4 KiB random read, QD4 each)",
            ("sans-serif", 22),
        )
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(xr.clone(), 0.0..ymax * 1.15)?;
    c.configure_mesh()
        .x_labels(hi as usize + 1)
        .x_max_light_lines(0)
        .x_label_formatter(&|v| pow2_tick(*v, &int_label))
        .y_label_formatter(&|v| num_label(*v))
        .y_desc("aggregate IOPS")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let red = COLORS[1];
    c.draw_series(LineSeries::new(
        v.iter().map(|r| (xs(r), r.iops)),
        red.stroke_width(3),
    ))?;
    c.draw_series(
        v.iter()
            .map(|r| Circle::new((xs(r), r.iops), 4, red.filled())),
    )?;
    let mut f = ChartBuilder::on(&bottom)
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(xr.clone(), 0.0..1.05)?;
    f.configure_mesh()
        .x_labels(hi as usize + 1)
        .x_max_light_lines(0)
        .x_label_formatter(&|v| pow2_tick(*v, &int_label))
        .x_desc("disks (one libblkio client each)")
        .y_desc("min/max IOPS")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let blue = COLORS[2];
    f.draw_series(LineSeries::new(
        v.iter().map(|r| (xs(r), r.fairness.unwrap_or(0.0))),
        blue.stroke_width(3),
    ))?;
    f.draw_series(
        v.iter()
            .map(|r| Circle::new((xs(r), r.fairness.unwrap_or(0.0)), 4, blue.filled())),
    )?;
    f.draw_series(LineSeries::new(
        [(xr.start, 0.8), (xr.end, 0.8)],
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    root.present()?;
    Ok(())
}

/// A line chart of the suite: which rows, plotted how.
struct LineSpec {
    file: &'static str,
    title: &'static str,
    xdesc: &'static str,
    ydesc: &'static str,
    keep: fn(&Row) -> bool,
    x: fn(&Row) -> f64,
    y: fn(&Row) -> Option<f64>,
    ticks: fn(f64) -> String,
}

/// One path's run of a single-job sweep (or of the full matrix, which holds them all).
fn in_sweep(r: &Row, s: &str) -> bool {
    (r.sweep == s || r.sweep == "matrix") && r.jobs == 1 && r.rw == "randread"
}

const LINES: [LineSpec; 4] = [
    LineSpec {
        file: "qd.png",
        title: "Bandwidth against queue depth, 4 KiB random read",
        xdesc: "queue depth",
        ydesc: "MB/s",
        keep: |r| in_sweep(r, "qd") && r.bs == 4096,
        x: |r| r.qd as f64,
        y: |r| Some(r.mbps),
        ticks: int_label,
    },
    LineSpec {
        file: "bs.png",
        title: "Bandwidth against block size, random read, QD16",
        xdesc: "block size",
        ydesc: "MB/s",
        keep: |r| in_sweep(r, "bs") && r.qd == 16,
        x: |r| r.bs as f64,
        y: |r| Some(r.mbps),
        ticks: size_label,
    },
    LineSpec {
        file: "cpu-jobs.png",
        title: "Server CPU load against jobs, 4 KiB random read, QD4 per job",
        xdesc: "jobs",
        ydesc: "server CPU (% of one core)",
        keep: |r| r.sweep == "jobs",
        x: |r| r.jobs as f64,
        y: |r| r.server_cpu_s.map(|c| c / r.window_s.max(1e-9) * 100.0),
        ticks: int_label,
    },
    LineSpec {
        file: "iops-jobs.png",
        title: "IOPS against jobs, 4 KiB random read, QD4 per job",
        xdesc: "jobs",
        ydesc: "IOPS",
        keep: |r| r.sweep == "jobs",
        x: |r| r.jobs as f64,
        y: |r| Some(r.iops),
        ticks: int_label,
    },
];

/// Draw the plots into `out`; returns their file names.
pub fn suite_plots(rows: &[Row], out: &Path) -> Res<Vec<String>> {
    let mut made = Vec::new();
    for l in &LINES {
        let series = by_path(rows, l.keep, l.x, l.y);
        chart(
            &out.join(l.file),
            l.title,
            l.xdesc,
            l.ydesc,
            &series,
            &l.ticks,
        )?;
        made.push(l.file.to_string());
    }
    for qd in [1, 32] {
        let f = format!("latency-qd{qd}.png");
        latency_chart(&out.join(&f), rows, qd)?;
        made.push(f);
    }
    if rows.iter().any(|r| r.sweep == "multi-vm") {
        multivm_chart(&out.join("multi-vm.png"), rows)?;
        made.push("multi-vm.png".to_string());
    }
    Ok(made)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The markdown report: machine, targets, tables per sweep, plots.
pub fn suite_markdown(
    rows: &[Row],
    machine: &serde_json::Value,
    secs: u64,
    quick: bool,
    plots: &[String],
    wall: f64,
) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# nvmux evaluation suite{}\n",
        if quick { " (quick)" } else { "" }
    );
    let _ = writeln!(
        o,
        "Machine: {} ({} CPUs, {} GiB), kernel {}. One 1 GiB file on /dev/shm served by every path at once; servers on CPU 0, clients on CPU 1; {secs} s per run; the suite took {wall:.0} s. Command: `nvmux bench suite{}`.\n",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        if quick { " --quick" } else { "" }
    );
    // Targets: each path's median over the interleaved runs of the targets' cell.
    let runs = |p: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r.sweep == "target" && r.path == p)
            .map(|r| r.iops)
            .collect()
    };
    let r = |p: &str| median(runs(p));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}x"));
    let verdict = |x: Option<f64>, t: f64| match x {
        Some(x) if x >= t => "met",
        Some(_) => "**missed**",
        None => "not measured",
    };
    let nq = ratio(r("nvmux-nbd"), r("qemu-nbd"));
    let nk = ratio(r("nvmux-nbd"), r("nbdkit"));
    let vq = ratio(r("nvmux-vhost"), r("qsd-vhost"));
    let fair32 = rows
        .iter()
        .find(|r| r.sweep == "multi-vm" && r.disks == 32)
        .and_then(|r| r.fairness);
    let each = |p: &str| {
        runs(p)
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let _ = writeln!(o, "## Targets (4 KiB random read, QD32, same run)\n");
    let _ = writeln!(
        o,
        "Each path's median IOPS over {} interleaved runs (IOPS of each run in brackets).\n",
        runs("nvmux-vhost").len()
    );
    let _ = writeln!(o, "| target | measured | |\n|---|---|---|");
    let _ = writeln!(
        o,
        "| nvmux NBD ≥ 1.2× qemu-nbd | {} ({} against {}) | {} |",
        fmt(nq),
        each("nvmux-nbd"),
        each("qemu-nbd"),
        verdict(nq, 1.2)
    );
    let _ = writeln!(
        o,
        "| nvmux NBD ≥ nbdkit (file plugin) | {} ({} against {}) | {} |",
        fmt(nk),
        each("nvmux-nbd"),
        each("nbdkit"),
        verdict(nk, 1.0)
    );
    let _ = writeln!(
        o,
        "| nvmux vhost-user ≥ 1.5× QSD vhost-user | {} ({} against {}) | {} |",
        fmt(vq),
        each("nvmux-vhost"),
        each("qsd-vhost"),
        verdict(vq, 1.5)
    );
    let _ = writeln!(
        o,
        "| 32 disks at once, min/max ≥ 0.8 | {} | {} |\n",
        fair32.map_or("-".into(), |f| format!("{f:.3}")),
        verdict(fair32, 0.8)
    );
    for p in plots {
        let _ = writeln!(o, "![{p}]({p})\n");
    }
    // Tables.
    let mut sweeps: Vec<&str> = Vec::new();
    for r in rows {
        if !sweeps.contains(&r.sweep) {
            sweeps.push(r.sweep);
        }
    }
    for s in sweeps {
        let _ = writeln!(o, "## Sweep: {s}\n");
        let _ = writeln!(o, "| path | rw | bs | QD | jobs | disks | IOPS | MB/s | p50 µs | p95 µs | p99 µs | server CPU s | CPU load | min/max |");
        let _ = writeln!(
            o,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for r in rows.iter().filter(|r| r.sweep == s) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                r.path,
                r.rw,
                size_label(r.bs as f64),
                r.qd,
                r.jobs,
                r.disks,
                r.iops,
                r.mbps,
                r.p50_us,
                r.p95_us,
                r.p99_us,
                r.server_cpu_s.map_or("-".into(), |c| format!("{c:.2}")),
                r.server_cpu_s.map_or("-".into(), |c| format!("{:.0}%", c / r.window_s.max(1e-9) * 100.0)),
                r.fairness.map_or("-".into(), |f| format!("{f:.3}")),
            );
        }
        let _ = writeln!(o);
    }
    o
}
