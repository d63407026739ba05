//! No allocation per I/O through the storage functions: 100k I/Os (after a warm-up) from
//! libblkio over vhost-user through a disk with qos limits (and fair sharing), an
//! encrypted disk, a thin volume of a pool, and a disk with a classifier loaded in
//! pass-through, each against the real daemon. The daemon's workers count their heap
//! allocations (`workers[i].allocs` in `GET /v1/stats`); across the 100k I/Os the sum must
//! not move.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use common::*;
use nvmux_bench::client::{BlkioClient, Op, Req};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const QD: usize = 16;

fn worker_allocs(d: &TestDaemon) -> u64 {
    let st = d.api.get("/v1/stats").expect("stats");
    st["workers"]
        .as_array()
        .expect("workers in stats")
        .iter()
        .map(|w| w["allocs"].as_u64().expect("allocs"))
        .sum()
}

/// `n` random I/Os at QD16 from one libblkio queue: every third a write, every eighth
/// 128 KiB (across a thin volume's 64 KiB clusters, so it is split), the rest 4 KiB.
fn run(c: &mut BlkioClient, n: usize, seed: &mut u64) {
    let blocks = SIZE / 4096;
    let mut done = 0;
    let mut issued = 0;
    let mut out = [const { MaybeUninit::<Completion>::uninit() }; QD];
    let next = |seed: &mut u64| {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    };
    while done < n {
        while issued - done < QD && issued < n {
            let r = next(seed);
            let op = if r % 3 == 0 { Op::Write } else { Op::Read };
            let slot = issued % QD;
            let len = if (r >> 8) % 8 == 0 { 128 << 10 } else { 4096 };
            let offset = ((r % blocks) * 4096).min(SIZE - len as u64);
            c.enqueue(
                0,
                Req {
                    op,
                    offset,
                    len,
                    buf_off: slot * (128 << 10),
                },
                slot,
                ReqFlags::empty(),
            );
            issued += 1;
        }
        let got = c
            .reap(0, &mut out, 1, Duration::from_secs(20))
            .expect("completions");
        for o in out.iter().take(got) {
            // SAFETY: reap initialised the first `got` entries.
            let ret = unsafe { o.assume_init_read() }.ret;
            assert_eq!(ret, 0, "I/O failed");
        }
        done += got;
    }
}

/// Warm up, then count the workers' allocations across 100k I/Os on `sock`.
fn allocs_over_100k(d: &TestDaemon, sock: &Path, what: &str) -> u64 {
    let mut c = BlkioClient::connect(sock, 1, false, 4 << 20).expect("libblkio connect");
    // Write the whole disk first (a thin volume then has every cluster allocated; an
    // allocating write is covered by the pool tests), then a mixed warm-up.
    for off in (0..SIZE).step_by(MIB as usize) {
        c.io_ok(0, Op::Write, off, MIB as usize, 0, ReqFlags::empty())
            .expect("fill");
    }
    // The most buffers a queue ever needs at once: QD16 writes of each size together
    // (functions keep their bounce buffers for reuse; they grow to the high-water mark).
    let mut out = [const { MaybeUninit::<Completion>::uninit() }; QD];
    for len in [128usize << 10, 4096] {
        for slot in 0..QD {
            let r = Req {
                op: Op::Write,
                offset: slot as u64 * (128 << 10),
                len,
                buf_off: slot * (128 << 10),
            };
            c.enqueue(0, r, slot, ReqFlags::empty());
        }
        let mut got = 0;
        while got < QD {
            got += c
                .reap(0, &mut out, 1, Duration::from_secs(20))
                .expect("completions");
        }
    }
    let mut seed = 0x1234_5678;
    run(&mut c, 20_000, &mut seed);
    let before = worker_allocs(d);
    run(&mut c, 100_000, &mut seed);
    let after = worker_allocs(d);
    let delta = after - before;
    println!("{what}: {delta} worker allocations across 100k I/Os");
    delta
}

fn export(d: &TestDaemon, disk: &str) -> PathBuf {
    let sock = d.dir.join(format!("{disk}.sock"));
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": disk, "socket": sock, "num_queues": 1}),
        )
        .expect("export disk");
    sock
}

#[test]
fn no_worker_allocation_per_io_through_qos_crypt_thin_and_router() {
    watchdog(600);
    let dir = unique_dir("zalloc-func");
    let kek = dir.join("kek");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&kek, "5a".repeat(32) + "\n").expect("write KEK");
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let d = TestDaemon::start_with(dir, &["--kek-file", kek.to_str().expect("utf-8 path")]);
    let mut results = Vec::new();

    // qos: limits well above what the client reaches, so every command takes the
    // buckets; the file lives on a host device, so fair sharing is on too.
    let (_img, sock) = d.disk_and_export(
        "q",
        SIZE,
        1,
        json!({"qos": {"iops_total": 10_000_000, "bps_total": 100_000_000_000u64}}),
    );
    results.push(("qos", allocs_over_100k(&d, &sock, "qos")));

    let (_img, sock) = d.disk_and_export("c", SIZE, 1, json!({"encrypt": true}));
    results.push(("crypt", allocs_over_100k(&d, &sock, "crypt")));

    d.pool("p", 256 * MIB);
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "t", "pool": "p", "size": SIZE}),
        )
        .expect("thin volume");
    let sock = export(&d, "t");
    results.push(("thin", allocs_over_100k(&d, &sock, "thin")));

    let (_img, sock) = d.disk_and_export("r", SIZE, 1, json!({}));
    let obj = compile_classifier(&d.dir, "passthrough");
    d.api
        .post(
            "/v1/disks/r/classifier",
            &json!({"object": obj, "maps": []}),
        )
        .expect("load the pass-through classifier");
    results.push(("router", allocs_over_100k(&d, &sock, "router pass-through")));

    for (what, n) in &results {
        assert_eq!(
            *n, 0,
            "{what}: worker allocations across 100k I/Os: {results:?}"
        );
    }
    d.stop();
}
