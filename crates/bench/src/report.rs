//! What every suite shares: the error type, one libblkio run, test files, the JSON
//! report and the cells of the markdown tables, and a progress bar.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use crate::workload::{Measured, Workload};
use crate::Op;

/// The suites' result type.
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One libblkio workload of `bs`-byte random I/O at `qd` on one queue of `sock`.
pub fn run_one(sock: &Path, bs: usize, op: Op, qd: usize, secs: u64) -> Res<Measured> {
    Ok(crate::workload::run_on(
        sock,
        &Workload::random(op, bs, qd, secs),
    )?)
}

/// The JSON rows of a suite's report: server, workload and what was measured.
pub fn measured_rows(rows: &[(String, String, Measured)]) -> serde_json::Value {
    json!(rows
        .iter()
        .map(|(s, w, m)| json!({"server": s, "workload": w, "m": m}))
        .collect::<Vec<_>>())
}

/// The median round (by IOPS) of `server` on `workload` among a suite's rows.
pub fn median_round<'a>(
    rows: &'a [(String, String, Measured)],
    server: &str,
    workload: &str,
) -> Option<&'a Measured> {
    let mut m: Vec<&Measured> = rows
        .iter()
        .filter(|r| r.0 == server && r.1 == workload)
        .map(|r| &r.2)
        .collect();
    m.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    m.get(m.len() / 2).copied()
}

/// Table cells of the suites' markdown tables; "-" where a server was not run.
pub fn cell_iops(m: Option<&Measured>) -> String {
    m.map_or("-".into(), |m| format!("{:.0}", m.iops))
}

pub fn cell_lat(m: Option<&Measured>) -> String {
    m.map_or("-".into(), |m| format!("{:.1}/{:.1}", m.p50_us, m.p99_us))
}

pub fn cell_ratio(a: Option<&Measured>, b: Option<&Measured>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.iops > 0.0 => format!("{:.2}x", a.iops / b.iops),
        _ => "-".into(),
    }
}

/// Write a suite's results to `<out>/<file>`.
pub fn write_report(
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

/// Fill a file with data, so reads hit real blocks rather than holes.
pub fn prepare_file(p: &Path, size: u64) -> Res<()> {
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

/// Draw `label [####....] 42% done / total` on stderr.
pub fn draw_bar(label: &str, done: u64, total: u64) {
    let frac = (done as f64 / total.max(1) as f64).clamp(0.0, 1.0);
    let fill = (frac * 30.0) as usize;
    eprint!(
        "\r{label} [{}{}] {:3.0}% {} / {}\x1b[K",
        "#".repeat(fill),
        ".".repeat(30 - fill),
        frac * 100.0,
        nvmux_core::format_size(done),
        nvmux_core::format_size(total)
    );
    let _ = std::io::stderr().flush();
}
