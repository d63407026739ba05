//! No allocation per I/O on the vhost-user path: the real daemon (whose global allocator
//! counts every worker thread's allocations, `workers[i].allocs` in `/v1/stats`) serves
//! 100k requests from the real libblkio client after a warm-up, and its workers' count
//! must not move.

mod common;

use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use common::*;
use nvmux_bench::client::{BlkioClient, Op, Req};
use nvmux_bench::workload::Rng;
use serde_json::json;

const MIB: u64 = 1 << 20;
const QD: usize = 16;
const BS: usize = 4096;

/// The sum of every worker's allocation count, once the workers are asleep (a worker
/// publishes its count at the top of each pass and before it sleeps).
fn worker_allocs(d: &TestDaemon) -> u64 {
    std::thread::sleep(Duration::from_millis(200));
    let st = d.api.get("/v1/stats").expect("stats");
    let w = st["workers"].as_array().expect("workers in /v1/stats");
    assert!(!w.is_empty());
    w.iter()
        .map(|w| w["allocs"].as_u64().expect("workers[i].allocs"))
        .sum()
}

/// `n` requests (reads, writes, or both alternating) at QD16, random 4 KiB offsets.
fn drive(c: &mut BlkioClient, n: u64, ops: &[Op], seed: u64) {
    let blocks = c.capacity() / BS as u64;
    let mut rng = Rng::new(seed);
    let mut comps: Vec<MaybeUninit<Completion>> = (0..QD).map(|_| MaybeUninit::uninit()).collect();
    let mut issued = 0u64;
    let mut done = 0u64;
    let mut issue = |c: &mut BlkioClient, slot: usize, issued: &mut u64| {
        let r = Req {
            op: ops[(*issued % ops.len() as u64) as usize],
            offset: (rng.next_u64() % blocks) * BS as u64,
            len: BS,
            buf_off: slot * BS,
        };
        c.enqueue(0, r, slot, ReqFlags::empty());
        *issued += 1;
    };
    for slot in 0..QD {
        issue(c, slot, &mut issued);
    }
    while done < issued {
        let k = c
            .reap(0, &mut comps, 1, Duration::from_secs(20))
            .expect("completions");
        for comp in comps.iter().take(k) {
            // SAFETY: reap reported k initialised completions.
            let comp = unsafe { comp.assume_init_read() };
            assert_eq!(comp.ret, 0, "request failed");
            done += 1;
            if issued < n {
                issue(c, comp.user_data, &mut issued);
            }
        }
    }
}

fn no_allocations(d: &TestDaemon, sock: &std::path::Path, ops: &[Op]) {
    let mut c = BlkioClient::connect(sock, 1, false, QD * BS).expect("connect");
    // Warm-up: pools grow to their steady size (SG lists, completion vectors).
    drive(&mut c, 20_000, ops, 1);
    let before = worker_allocs(d);
    // Attaching the queue allocated on the worker: the counter is live in this binary.
    assert!(before > 0, "the daemon does not count allocations");
    drive(&mut c, 100_000, ops, 2);
    let after = worker_allocs(d);
    assert_eq!(
        after - before,
        0,
        "{ops:?}: the workers allocated {} times during 100000 I/Os ({before} -> {after})",
        after - before
    );
    drop(c);
}

#[test]
fn vhost_null_reads_and_writes_allocate_nothing() {
    watchdog(300);
    let d = TestDaemon::start("zalloc-null");
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "n", "backend": "null", "size": 256 * MIB}),
        )
        .expect("null disk");
    let sock = d.dir.join("n.sock");
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": "n", "socket": sock, "num_queues": 1}),
        )
        .expect("export");
    no_allocations(&d, &sock, &[Op::Read]);
    no_allocations(&d, &sock, &[Op::Read, Op::Write]);
    d.stop();
}

#[test]
fn vhost_file_reads_and_writes_allocate_nothing() {
    watchdog(300);
    let d = TestDaemon::start("zalloc-file");
    let (_img, sock) = d.disk_and_export("f", 64 * MIB, 1, json!({}));
    no_allocations(&d, &sock, &[Op::Read, Op::Write]);
    d.stop();
}
