//! `nvmux bench --router`: what classifiers and external functions cost. One file disk on
//! /dev/shm (so the software path, not a device, is the bottleneck and any cost shows)
//! is driven through libblkio with no classifier, with the pass-through classifier, with
//! each example classifier, and through the external-function path (nvmux-fn-audit as a
//! separate process). Programs are swapped live between runs on the same disk and
//! export; every workload runs all configurations back to back, twice in alternating
//! order, and the table gives the mean with each ratio against "no classifier".

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvmux_bench::client::Op;
use nvmux_bench::procs::{self, ServerProc};
use nvmux_bench::workload::Measured;
use serde_json::{json, Value};

use crate::bench::{
    cell_lat, measured_rows, prepare_file, run_one, write_report, BenchArgs, Daemon, Res,
};

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

pub fn run(a: &BenchArgs, secs: u64, srv_cpu: Option<usize>) -> Res<()> {
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

    // (config, workload, round) -> measured, server CPU seconds (daemon + function).
    let mut rows: Vec<(String, String, Measured, f64)> = Vec::new();
    let runs: Vec<_> = RUNS
        .iter()
        .filter(|r| a.only.as_deref().is_none_or(|o| r.2.contains(o)))
        .collect();
    let total = runs.len() * cfgs.len() * 2;
    for &&(op, qd, w) in &runs {
        // Warm up (not recorded): the first run after a change of workload is slower.
        d.api().delete("/v1/disks/d/classifier")?;
        run_one(&sock, 4096, op, qd, secs.min(2))?;
        for round in 0..2 {
            let order: Vec<&Config> = if round == 0 {
                cfgs.iter().collect()
            } else {
                cfgs.iter().rev().collect()
            };
            for c in order {
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
                let func = match &c.function {
                    Some(args) => {
                        let p = start_function(args, &fsock, srv_cpu, &work.join("fn.log"))?;
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
                eprintln!(
                    "[{:>2}/{total}] {:<38} {w:<18} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs  server CPU {:.2} s",
                    rows.len() + 1,
                    c.name,
                    m.iops,
                    m.p50_us,
                    m.p99_us,
                    cpu
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
        "\nClassifiers and external functions: one 1 GiB file disk on /dev/shm, 4 KiB random I/O through libblkio (one queue), {secs} s per run, server (daemon and function) on CPU 0; each workload runs every configuration twice, in alternating order; IOPS is the mean of the two"
    );
    println!("| workload | configuration | IOPS | p50/p99 µs | vs no classifier | server CPU s |");
    println!("|---|---|---|---|---|---|");
    let mean = |cfg: &str, w: &str| -> Option<(f64, Measured, f64)> {
        let v: Vec<_> = rows.iter().filter(|r| r.0 == cfg && r.1 == w).collect();
        if v.is_empty() {
            return None;
        }
        let iops = v.iter().map(|r| r.2.iops).sum::<f64>() / v.len() as f64;
        let cpu = v.iter().map(|r| r.3).sum::<f64>() / v.len() as f64;
        Some((iops, v[v.len() - 1].2.clone(), cpu))
    };
    for &&(_, _, w) in &runs {
        let base = mean("no classifier", w).map(|m| m.0);
        for c in &cfgs {
            let Some((iops, last, cpu)) = mean(c.name, w) else {
                continue;
            };
            let ratio = base
                .filter(|b| *b > 0.0)
                .map_or("-".into(), |b| format!("{:.3}x", iops / b));
            println!(
                "| {w} | {} | {iops:.0} | {} | {ratio} | {cpu:.2} |",
                c.name,
                cell_lat(Some(&last))
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
    write_report(&a.out, "router-latest.json", "router", secs, json_rows)?;
    Ok(())
}
