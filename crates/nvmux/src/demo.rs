//! `nvmux demo`: see nvmux serve I/O within one command of cloning.

use std::path::PathBuf;

use clap::Args;
use nvmux_bench::client::BlkioClient;
use nvmux_bench::{Op, Workload};
use serde_json::json;

use nvmux_bench::daemon::Daemon;

#[derive(Args)]
pub struct DemoArgs {
    /// Seconds of random I/O to run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Data directory for the demo daemon (default: a fresh directory under /tmp, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub fn run(a: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    let keep = a.data_dir.is_some();
    let dir = a
        .data_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("nvmux-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    println!(
        "==> starting `nvmux serve` on the embedded default configuration (data dir {})",
        dir.display()
    );
    let d = Daemon::start(&dir, None, None)?;
    let api = d.api();
    let disk = api.post(
        "/v1/disks",
        &json!({"name": "demo", "backend": "file", "size": 256u64 << 20}),
    )?;
    println!(
        "==> created disk demo: {} bytes, {}",
        disk["size"],
        disk["device"].as_str().unwrap_or("")
    );
    let sock = dir.join("demo.sock");
    api.post(
        "/v1/exports",
        &json!({"disk": "demo", "socket": sock, "num_queues": 2}),
    )?;
    println!(
        "==> exported it over vhost-user-blk on {} with 2 queues",
        sock.display()
    );

    let mut c = BlkioClient::connect(&sock, 2, false, 8 << 20)?;
    println!(
        "==> libblkio (virtio-blk-vhost-user) connected: capacity {} bytes, {} queues",
        c.capacity(),
        c.num_queues()
    );
    // Write a pattern on both queues, including the last block, and read it back.
    let cap = c.capacity();
    let offsets = [0u64, 4096, 1 << 20, cap / 2, cap - 4096];
    for (i, &off) in offsets.iter().enumerate() {
        let q = i % 2;
        c.buf()[..4096]
            .iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (j as u8) ^ (i as u8).wrapping_mul(37));
        c.io_ok(q, Op::Write, off, 4096, 0, blkio::ReqFlags::empty())?;
    }
    for (i, &off) in offsets.iter().enumerate() {
        c.io_ok(
            1 - i % 2,
            Op::Read,
            off,
            4096,
            4096,
            blkio::ReqFlags::empty(),
        )?;
        let got = &c.buf()[4096..8192];
        if got
            .iter()
            .enumerate()
            .any(|(j, b)| *b != (j as u8) ^ (i as u8).wrapping_mul(37))
        {
            return Err(
                format!("data read back at offset {off} differs from what was written").into(),
            );
        }
    }
    println!(
        "==> wrote and verified a pattern at {} offsets (last block included) over both queues",
        offsets.len()
    );
    for (op, name) in [(Op::Read, "random read"), (Op::Write, "random write")] {
        let m = nvmux_bench::workload::run(&mut c, &Workload::random(op, 4096, 32, a.seconds))?;
        println!(
            "==> 4 KiB {name}, QD32, {} s: {:.0} IOPS (p50 {:.1} µs, p99 {:.1} µs)",
            a.seconds, m.iops, m.p50_us, m.p99_us
        );
    }
    drop(c);
    let st = api.get("/v1/stats")?;
    let s = &st["disks"]["demo"];
    println!(
        "==> daemon stats for demo: {} reads, {} writes, {} errors",
        s["read"]["ops"],
        s["write"]["ops"],
        s["read"]["errors"].as_u64().unwrap_or(0) + s["write"]["errors"].as_u64().unwrap_or(0)
    );
    let status = d.stop();
    println!("==> daemon stopped ({status})");
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("demo: OK");
    Ok(())
}
