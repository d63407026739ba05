//! What the default chain's pass-through layers cost per command, without a frontend:
//! batches of 32 4 KiB reads through a null disk's queue, bare, under `qos` (no limit),
//! and under the router (no program) on top of `qos`, as the daemon stacks them.
//!   cargo run --release -p nvmux-daemon --example chain_cost [MILLION_COMMANDS]
//! Prints nanoseconds per command (submit, kick, completion) for each stack.

use std::sync::Arc;
use std::time::Instant;

use nvmux_backend::NullDevice;
use nvmux_core::{BlockDevice, IoCommand, Opcode, SgList};

fn run(name: &str, dev: &dyn BlockDevice, total: u64) -> nvmux_core::Result<()> {
    const BATCH: u64 = 32;
    let mut q = dev.open_queue(BATCH as u32)?;
    let mut pool: Vec<SgList> = (0..BATCH).map(|_| SgList::with_capacity(1)).collect();
    let mut done = 0u64;
    let t = Instant::now();
    let mut lba = 0u64;
    while done < total {
        for tag in 0..BATCH {
            let sg = pool.pop().unwrap_or_default();
            lba = (lba + 7919) % 1000;
            q.submit(IoCommand::new(Opcode::Read, lba * 8, 8, tag, sg));
        }
        q.kick();
        while (pool.len() as u64) < BATCH {
            q.poll(&mut |c, _| pool.push(c.sg));
        }
        done += BATCH;
    }
    let ns = t.elapsed().as_nanos() as f64 / done as f64;
    println!("{name:<28} {ns:6.1} ns/command");
    Ok(())
}

fn main() -> nvmux_core::Result<()> {
    let m: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let total = m * 1_000_000;
    let null: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(1 << 30, 512, false)?);
    let qos = nvmux_func::Qos::new(nvmux_func::Limits::default(), None)?;
    let with_qos: Arc<dyn BlockDevice> =
        Arc::new(nvmux_func::QosDevice::new(null.clone(), qos.clone()));
    let routed = nvmux_router::RouterDevice::new(
        nvmux_router::Router::new("null"),
        with_qos.clone(),
        Some(null.clone()),
    );
    for _ in 0..2 {
        run("null", &*null, total)?;
        run("qos -> null", &*with_qos, total)?;
        run("router -> qos -> null", &routed, total)?;
    }
    Ok(())
}
