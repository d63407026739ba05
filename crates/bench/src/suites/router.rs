//! `nvmux bench --router`: what classifiers and external functions cost. One file disk on
//! /dev/shm (so the software path, not a device, is the bottleneck and any cost shows)
//! is driven through libblkio; programs are swapped live between runs on the same disk
//! and export.
//!
//! * The target, pass-through against no classifier: per workload, ten pairs of 1 s runs
//!   back to back in alternating order (A B, B A, ...), so that the machine's drift
//!   cancels; the median of the pairs' ratios.
//! * Every configuration (each example classifier, and the external-function path with
//!   nvmux-fn-audit as a separate process): two rounds in alternating order, with the
//!   ratio against no classifier in the same rounds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::Op;
use crate::procs::{self, ServerProc};
use crate::workload::Measured;
use serde_json::{json, Value};

use crate::daemon::Daemon;
use crate::report::{cell_lat, measured_rows, prepare_file, run_one, write_report, Res};
use crate::run::BenchArgs;

const SIZE: u64 = 1 << 30;

const RUNS: [(Op, usize, &str); 4] = [
    (Op::Read, 1, "4K randread QD1"),
    (Op::Read, 32, "4K randread QD32"),
    (Op::Write, 1, "4K randwrite QD1"),
    (Op::Write, 32, "4K randwrite QD32"),
];

struct Config {
    name: &'static str,
    classifier: Option<&'static str>,
    /// Map values: (map, key, words).
    maps: Vec<(&'static str, u32, Vec<u64>)>,
    /// nvmux-fn-audit arguments, for the external-function rows.
    function: Option<Vec<String>>,
}

fn configs(work: &Path) -> Vec<Config> {
    let blocks = SIZE / 512;
    let c = |name, classifier, maps, function| Config {
        name,
        classifier,
        maps,
        function,
    };
    vec![
        c("no classifier", None, vec![], None),
        c("pass-through", Some("passthrough"), vec![], None),
        // An empty range: every write is checked, none is refused.
        c(
            "guard (empty range)",
            Some("guard"),
            vec![("range", 0, vec![0, 0])],
            None,
        ),
        // Offset 0 over the whole disk: the lookup, the bound check and the rewrite run.
        c(
            "remap (offset 0)",
            Some("remap"),
            vec![("part", 0, vec![0, blocks])],
            None,
        ),
        c("fast_reads", Some("fast_reads"), vec![], None),
        c(
            "audit_writes + nvmux-fn-audit --log",
            Some("audit_writes"),
            vec![],
            Some(vec![
                "--log".into(),
                work.join("audit.log").display().to_string(),
            ]),
        ),
        c(
            "all_external + nvmux-fn-audit --null",
            Some("all_external"),
            vec![],
            Some(vec!["--null".into()]),
        ),
    ]
}

/// Compile examples/classifiers/NAME.c with clang.
fn compile(dir: &Path, name: &str, out: &Path) -> Res<PathBuf> {
    let o = out.join(format!("{name}.o"));
    let st = std::process::Command::new("clang")
        .args(["-O2", "-target", "bpf", "-I"])
        .arg(dir)
        .arg("-c")
        .arg(dir.join(format!("{name}.c")))
        .arg("-o")
        .arg(&o)
        .status()
        .map_err(|e| format!("clang: {e} (install clang to build classifiers)"))?;
    if !st.success() {
        return Err(format!("clang failed on {name}.c").into());
    }
    Ok(o)
}

fn start_function(args: &[String], sock: &Path, cpu: Option<usize>, log: &Path) -> Res<ServerProc> {
    let exe = std::env::current_exe()?.with_file_name("nvmux-fn-audit");
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("--socket").arg(sock).args(args);
    Ok(procs::spawn_pinned("nvmux-fn-audit", cmd, cpu, log)?)
}

fn wait_attached(d: &Daemon) -> Res<()> {
    let t0 = Instant::now();
    loop {
        let v = d.api().get("/v1/disks/d/classifier")?;
        if v["external"]["status"] == "attached" {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("nvmux-fn-audit did not attach: {v}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const ROUNDS: usize = 2;
/// Pairs of (no classifier, pass-through) runs for the cost target, 1 s each.
const PAIRS: usize = 10;

/// Load a configuration's classifier (or none) into disk `d`, live.
fn set_config(
    d: &Daemon,
    c: &Config,
    objects: &std::collections::HashMap<&str, PathBuf>,
) -> Res<()> {
    match c.classifier {
        Some(n) => {
            let maps: Vec<Value> = c
                .maps
                .iter()
                .map(|(m, k, w)| json!({"map": m, "key": k, "words": w}))
                .collect();
            d.api().post(
                "/v1/disks/d/classifier",
                &json!({"object": objects[n], "maps": maps}),
            )?;
        }
        None => {
            d.api().delete("/v1/disks/d/classifier")?;
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>, fn_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-router-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let src = a.classifiers.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/classifiers")
    });
    let cfgs = configs(&work);
    let mut objects = std::collections::HashMap::new();
    for c in &cfgs {
        if let Some(n) = c.classifier {
            objects.insert(n, compile(&src, n, &work)?);
        }
    }
    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, "")?;
    let img = PathBuf::from(format!(
        "/dev/shm/nvmux-bench-router-{}.img",
        std::process::id()
    ));
    prepare_file(&img, SIZE)?;
    d.api().post(
        "/v1/disks",
        &json!({"name": "d", "backend": "file", "path": img}),
    )?;
    let sock = ddir.join("d.sock");
    d.api()
        .post("/v1/exports", &json!({"disk": "d", "socket": sock}))?;
    let fsock = ddir.join("d-fn.sock");
    d.api().post(
        "/v1/disks/d/external",
        &json!({"socket": fsock, "on_failure": "fail"}),
    )?;

    let runs: Vec<_> = RUNS
        .iter()
        .filter(|r| a.only.as_deref().is_none_or(|o| r.2.contains(o)))
        .collect();
    let total = runs.len() * (2 * PAIRS + cfgs.len() * ROUNDS);
    let mut n = 0;
    // The cost target: pass-through against no classifier, in close pairs (A B, B A, ...)
    // so that the machine's drift cancels; the median of the pairs' ratios.
    let mut pairs: Vec<(String, f64, f64, f64, f64, f64)> = Vec::new();
    for &&(op, qd, w) in &runs {
        set_config(&d, &cfgs[0], &objects)?;
        run_one(&sock, 4096, op, qd, 2)?; // warm-up, not recorded
        let (mut ratios, mut none, mut pass) = (Vec::new(), 0.0, 0.0);
        for i in 0..PAIRS {
            let mut got = [0.0f64; 2];
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                set_config(&d, &cfgs[k], &objects)?;
                let m = run_one(&sock, 4096, op, qd, 1)?;
                n += 1;
                eprintln!(
                    "[{n:>3}/{total}] pair {i:>2} {:<26} {w:<18} {:>9.0} IOPS",
                    cfgs[k].name, m.iops
                );
                got[k] = m.iops;
            }
            none += got[0] / PAIRS as f64;
            pass += got[1] / PAIRS as f64;
            ratios.push(got[1] / got[0]);
        }
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        let med = median(&mut ratios);
        pairs.push((w.to_string(), none, pass, med, lo, hi));
    }

    // Every configuration, in rounds of alternating order.
    let mut rows: Vec<(String, String, Measured, f64)> = Vec::new();
    for &&(op, qd, w) in &runs {
        set_config(&d, &cfgs[0], &objects)?;
        run_one(&sock, 4096, op, qd, secs.min(2))?; // warm-up, not recorded
        for round in 0..ROUNDS {
            let order: Vec<&Config> = if round % 2 == 0 {
                cfgs.iter().collect()
            } else {
                cfgs.iter().rev().collect()
            };
            for c in order {
                set_config(&d, c, &objects)?;
                let func = match &c.function {
                    Some(args) => {
                        let p = start_function(args, &fsock, fn_cpu, &work.join("fn.log"))?;
                        wait_attached(&d)?;
                        Some(p)
                    }
                    None => None,
                };
                let cpu0 = d.cpu_seconds() + func.as_ref().map_or(0.0, |f| f.cpu_seconds());
                let m = run_one(&sock, 4096, op, qd, secs)?;
                let cpu = d.cpu_seconds() + func.as_ref().map_or(0.0, |f| f.cpu_seconds()) - cpu0;
                if let Some(f) = func {
                    f.stop();
                }
                n += 1;
                eprintln!(
                    "[{n:>3}/{total}] {:<38} {w:<18} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs  server CPU {:.2} s",
                    c.name, m.iops, m.p50_us, m.p99_us, cpu
                );
                rows.push((c.name.into(), w.into(), m, cpu));
            }
        }
    }
    let routes = d.api().get("/v1/disks/d/classifier")?["routes"].clone();
    let _ = d.stop();
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_dir_all(&work);

    println!(
        "\nThe cost of a classifier: one 1 GiB file disk on /dev/shm, 4 KiB random I/O through libblkio (one queue); daemon on CPU 0, client on CPU 1; {PAIRS} pairs of 1 s runs per workload, no classifier and pass-through back to back in alternating order"
    );
    println!("| workload | no classifier IOPS | pass-through IOPS | pass-through / none (median of pairs) | range of the pairs |");
    println!("|---|---|---|---|---|");
    for (w, none, pass, med, lo, hi) in &pairs {
        println!("| {w} | {none:.0} | {pass:.0} | **{med:.3}x** | {lo:.3}–{hi:.3} |");
    }
    println!(
        "\nEvery configuration on the same disk: {secs} s per run; the function process (nvmux-fn-audit) on CPU 1 with the client; {ROUNDS} rounds of alternating order. IOPS: mean of the rounds; ratio: against no classifier in the same rounds"
    );
    println!("| workload | configuration | IOPS | p50/p99 µs | vs no classifier | server CPU s (daemon + function) |");
    println!("|---|---|---|---|---|---|");
    // The runs of one configuration and workload, in round order.
    let of = |cfg: &str, w: &str| -> Vec<&(String, String, Measured, f64)> {
        rows.iter().filter(|r| r.0 == cfg && r.1 == w).collect()
    };
    for &&(_, _, w) in &runs {
        let base = of("no classifier", w);
        let base_iops = base.iter().map(|r| r.2.iops).sum::<f64>() / base.len().max(1) as f64;
        for c in &cfgs {
            let v = of(c.name, w);
            let Some(last) = v.last() else { continue };
            let k = v.len() as f64;
            let iops = v.iter().map(|r| r.2.iops).sum::<f64>() / k;
            let cpu = v.iter().map(|r| r.3).sum::<f64>() / k;
            println!(
                "| {w} | {} | {iops:.0} | {} | {:.3}x | {cpu:.2} |",
                c.name,
                cell_lat(Some(&last.2)),
                iops / base_iops
            );
        }
    }
    println!("route counters at the end: {routes}");
    let mut json_rows = measured_rows(
        &rows
            .iter()
            .map(|r| (r.0.clone(), r.1.clone(), r.2.clone()))
            .collect::<Vec<_>>(),
    );
    if let Some(a) = json_rows.as_array_mut() {
        for (j, r) in a.iter_mut().zip(&rows) {
            j["server_cpu_s"] = json!(r.3);
        }
    }
    let pair_rows: Vec<Value> = pairs
        .iter()
        .map(|(w, none, pass, med, lo, hi)| json!({"workload": w, "none_iops": none, "passthrough_iops": pass, "median_ratio": med, "min_ratio": lo, "max_ratio": hi}))
        .collect();
    write_report(
        &a.out,
        "router-latest.json",
        "router",
        secs,
        json!({"pairs": pair_rows, "rows": json_rows}),
    )?;
    Ok(())
}
