//! Zero allocations per I/O on the network frontends (NBD, NVMe/TCP), on the real daemon
//! with real clients: fio's nbd engine (libnbd) for NBD, the independent NVMe/TCP
//! initiator in nvmux-bench for NVMe/TCP. The `nvmux` binary counts heap allocations per
//! thread and every worker publishes its count (`workers[i].allocs` in `GET /v1/stats`).
//! After a warm-up on the same connection (so the slots and their buffers exist), 100 000
//! I/Os must not move the sum over all workers.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{watchdog, TestDaemon};
use nvmux_bench::nvmf::{Host, Sqe};
use serde_json::{json, Value};

/// I/Os measured after the warm-up.
const MEASURED: u64 = 100_000;

/// (allocations over all workers, completed requests on `disk`).
fn sample(d: &TestDaemon, disk: &str) -> (u64, u64) {
    let v: Value = d.api.get("/v1/stats").expect("stats");
    let allocs = v["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["allocs"].as_u64().expect("allocs"))
        .sum();
    let s = &v["disks"][disk];
    let ops = ["read", "write", "other"]
        .iter()
        .map(|c| s[c]["ops"].as_u64().unwrap_or(0))
        .sum();
    (allocs, ops)
}

/// Connections open on the NBD export "n".
fn connections(d: &TestDaemon) -> u64 {
    let v: Value = d.api.get("/v1/exports").expect("exports");
    v.as_array()
        .into_iter()
        .flatten()
        .chain(v["exports"].as_array().into_iter().flatten())
        .filter(|e| e["type"] == "nbd")
        .map(|e| e["connections"].as_u64().unwrap_or(0))
        .sum()
}

fn null_disk(d: &TestDaemon, name: &str) {
    d.api
        .post(
            "/v1/disks",
            &json!({"name": name, "backend": "null", "size": 1u64 << 30}),
        )
        .expect("null disk");
}

/// One fio run (one NBD connection) of random reads and writes of `bs`, with a flush
/// every 64 writes: after `warm` requests (every slot fio keeps busy has its buffer), the
/// next `n` must not allocate on the workers. Returns (requests, allocations) measured.
fn nbd_run(d: &TestDaemon, sock: &std::path::Path, bs: &str, warm: u64, n: u64) -> (u64, u64) {
    let mut fio = Command::new("fio")
        .args([
            "--name=z",
            "--ioengine=nbd",
            // One process: killing it ends the job (and its connection) at once.
            "--thread",
            "--rw=randrw",
            "--iodepth=32",
            "--size=1g",
            "--fsync=64",
            "--time_based",
            "--runtime=240",
        ])
        .arg(format!("--bs={bs}"))
        .arg(format!("--uri=nbd+unix:///n?socket={}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fio");
    let start = sample(d, "n").1;
    let mut wait_ops = |want: u64| {
        let t0 = Instant::now();
        loop {
            let s = sample(d, "n");
            if s.1 >= want {
                return s;
            }
            if let Ok(Some(st)) = fio.try_wait() {
                panic!("fio (bs {bs}) ended early ({st}) at {} requests", s.1);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(200),
                "bs {bs}: only {} of {want} requests",
                s.1
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (a0, o0) = wait_ops(start + warm);
    let (a1, o1) = wait_ops(o0 + n);
    assert!(
        fio.try_wait().expect("fio").is_none(),
        "fio's connection must last the whole measurement"
    );
    let _ = fio.kill();
    let _ = fio.wait();
    // The connection is gone before the next run starts.
    let t0 = Instant::now();
    while connections(d) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the connection stays"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "nbd bs {bs}: {} requests, {} worker allocations (warm-up from {start}: {o0} requests, {a0} allocations)",
        o1 - o0,
        a1 - a0
    );
    (o1 - o0, a1 - a0)
}

#[test]
fn nbd_serves_100k_ios_without_allocating() {
    watchdog(600);
    let d = TestDaemon::start("zero-alloc-nbd");
    null_disk(&d, "n");
    let sock = d.dir.join("nbd.sock");
    d.nbd_export(json!({"disk": "n", "socket": sock}));
    // Small reads are copied into the send buffer, 64 KiB ones sent from their slot's
    // buffer; 64 KiB and 1 MiB write payloads are received straight into it. fio's depth
    // seen by the server wanders (up to 32 and beyond): the connection's slots all exist
    // from the start and its buffers grow by powers of two, so a late new peak allocates
    // nothing.
    let mut total = 0;
    for (bs, warm, n) in [
        ("4k", 5_000, 70_000),
        // A longer warm-up at 64k: the slots' buffers double (16 -> 32) the first time
        // more than 16 requests are in flight, and with the mirror pass-through of the
        // default chain that peak may come after 3000 requests.
        ("64k", 12_000, 20_000),
        ("1m", 8_000, 10_000),
    ] {
        let (ios, allocs) = nbd_run(&d, &sock, bs, warm, n);
        assert_eq!(
            allocs, 0,
            "{ios} NBD requests of {bs} made {allocs} allocations on the workers"
        );
        total += ios;
    }
    assert!(total >= MEASURED, "{total} requests measured");
    d.stop();
}

const NQN: &str = "nqn.2026-12.io.nvmux:zero-alloc";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-00000000000a";

/// Keep `qd` commands in flight on I/O queue 0 until `n` have completed: reads and writes
/// of 4 KiB (in-capsule) and 64 KiB (R2T), Write Zeroes, Dataset Management (deallocate,
/// several ranges) and Flush; all of kind `only` if given, else a random mix.
fn nvmf_load(h: &mut Host, n: u64, qd: usize, seed: u64, only: Option<u64>) {
    let small = vec![0x5au8; 4096];
    let big = vec![0xa5u8; 64 << 10];
    let mut dsm = Vec::new();
    for r in 0..4u64 {
        dsm.extend_from_slice(&0u32.to_le_bytes()); // context attributes
        dsm.extend_from_slice(&8u32.to_le_bytes()); // blocks
        dsm.extend_from_slice(&(r * 4096).to_le_bytes()); // starting LBA
    }
    let mut x = seed;
    let mut issue = |q: &mut nvmux_bench::nvmf::Queue| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let slba = (x >> 33) % (1 << 20);
        match only.unwrap_or((x >> 20) % 16) {
            0..=5 => q.send_cmd(Sqe::read(1, slba, 8), None, 4096),
            6..=8 => q.send_cmd(Sqe::write(1, slba, 8), Some(&small), 0),
            9 => q.send_cmd(Sqe::read(1, slba, 128), None, 64 << 10),
            10 => q.send_cmd(Sqe::write(1, slba, 128), Some(&big), 0),
            11 => q.send_cmd(
                Sqe::new(0x08, 1)
                    .cdw(10, slba as u32)
                    .cdw(11, (slba >> 32) as u32)
                    .cdw(12, 15),
                None,
                0,
            ),
            12 => q.send_cmd(Sqe::new(0x09, 1).cdw(10, 3).cdw(11, 1 << 2), Some(&dsm), 0),
            13 => q.send_cmd(Sqe::new(0x00, 1), None, 0),
            _ => q.send_cmd(Sqe::read(1, slba, 1), None, 512),
        }
        .expect("send")
    };
    let q = &mut h.io[0];
    let mut out = 0usize;
    let mut sent = 0u64;
    while sent < n && out < qd {
        issue(q);
        sent += 1;
        out += 1;
    }
    while out > 0 {
        let (c, _) = q.next_completion().expect("completion");
        assert!(c.ok(), "command {} failed: status {:#x}", c.cid, c.status);
        out -= 1;
        if sent < n {
            issue(q);
            sent += 1;
            out += 1;
        }
    }
}

#[test]
fn nvmf_serves_100k_ios_without_allocating() {
    watchdog(300);
    let d = TestDaemon::start("zero-alloc-nvmf");
    null_disk(&d, "n");
    let addr: SocketAddr = d.nvmf_subsystem(NQN, &[HOST], &["n"]);
    let mut h = Host::connect(addr, NQN, HOST, 1, 128, false).expect("connect");
    // Warm up on the same queue, at the same depth: each kind of command alone (so the
    // buffer pool holds a full queue of each size), then the mix.
    for kind in 0..16 {
        nvmf_load(&mut h, 500, 32, kind, Some(kind));
    }
    nvmf_load(&mut h, 10_000, 32, 1, None);
    // Let the admin queue's first keep-alive bookkeeping and the workers settle.
    std::thread::sleep(Duration::from_millis(100));
    let (a0, o0) = sample(&d, "n");
    nvmf_load(&mut h, MEASURED, 32, 2, None);
    let (a1, o1) = sample(&d, "n");
    eprintln!("nvmf: {} requests, {} worker allocations", o1 - o0, a1 - a0);
    assert!(o1 - o0 >= MEASURED, "{} requests counted", o1 - o0);
    assert_eq!(
        a1 - a0,
        0,
        "{} NVMe/TCP commands made {} allocations on the workers",
        o1 - o0,
        a1 - a0
    );
    h.shutdown().expect("shutdown");
    d.stop();
}
