//! Pool data safety against the real daemon with real clients (qemu-io over NBD): no
//! command waits for ever, snapshots of a live volume lose no acknowledged write, and
//! errors are sticky.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Test faults every daemon of this binary starts with (`nvmux_core::fault`): they name
/// a pool file and a volume no other test here uses.
const FAULTS: &str = "pool-commit-error:sticky.pool,pool-write-delay:held,fsync-error:sticky.img";

/// A daemon with [`FAULTS`] armed and `extra` arguments.
fn daemon(tag: &str, extra: &[&str]) -> TestDaemon {
    daemon_in(unique_dir(tag), extra)
}

fn daemon_in(dir: PathBuf, extra: &[&str]) -> TestDaemon {
    TestDaemon::start_with_env(dir, extra, &[("NVMUX_TEST_FAULTS", FAULTS)])
}

/// Stop the daemon and remove its directory (pool files are fully allocated).
fn finish(d: TestDaemon) {
    let dir = d.dir.clone();
    d.stop();
    let _ = std::fs::remove_dir_all(dir);
}

fn metrics(d: &TestDaemon) -> String {
    d.api.call_raw("GET", "/metrics", None).expect("metrics").1
}

/// The value of metric line `key` (name and labels).
fn metric(d: &TestDaemon, key: &str) -> Option<f64> {
    metrics(d)
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// Wait until disk `disk` has a command in flight, and still has 300 ms later: the write
/// held by `pool-write-delay` (1 s), not the client's first read.
fn wait_held(d: &TestDaemon, disk: &str) {
    let key = format!("nvmux_disk_in_flight{{disk=\"{disk}\"}}");
    let t0 = std::time::Instant::now();
    loop {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "no write held in flight on {disk}"
        );
        if metric(d, &key).unwrap_or(0.0) >= 1.0 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            if metric(d, &key).unwrap_or(0.0) >= 1.0 {
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A thin volume `name` of pool `p`, exported over NBD on `nbd.sock`.
fn thin_nbd(d: &TestDaemon, name: &str, size: u64) -> PathBuf {
    thin_nbd_in(d, "p", name, size)
}

fn thin_nbd_in(d: &TestDaemon, pool: &str, name: &str, size: u64) -> PathBuf {
    d.api
        .post(
            "/v1/disks",
            &json!({"name": name, "pool": pool, "size": size}),
        )
        .expect("create thin disk");
    let sock = d.dir.join("nbd.sock");
    d.nbd_export(json!({"disk": name, "socket": sock}));
    sock
}

/// qemu-io on export `name` with `cmds`, under `timeout 60` as a hang detector: (exited
/// by itself, succeeded, output).
fn qemu_io(sock: &Path, name: &str, cmds: &[String]) -> (bool, bool, String) {
    qemu_io_with(sock, name, &[], cmds)
}

fn qemu_io_with(sock: &Path, name: &str, opts: &[&str], cmds: &[String]) -> (bool, bool, String) {
    let mut c = Command::new("timeout");
    c.args(["-s", "KILL", "60", "qemu-io", "-f", "raw"]);
    c.args(opts);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri(sock, name));
    let o = c.output().expect("run timeout qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // SIGKILL from timeout: no exit code.
    let finished = o.status.code().is_some();
    // qemu-io exits 0 even when a command fails: a failure prints "failed".
    let good = o.status.success() && !text.contains("failed") && !text.contains("error");
    (finished, good, text)
}

/// The issue's reproduction: a 256 MiB pool, a 200 MiB volume, 32 MiB writes at 0, 32,
/// 64, ... MiB. Before the fix the write at 96 MiB waited for claimed clusters for ever.
#[test]
fn large_allocating_writes_on_a_small_pool_complete_or_fail() {
    watchdog(600);
    let d = daemon("pool-small", &[]);
    d.pool("p", 256 * MIB);
    let sock = thin_nbd(&d, "t", 200 * MIB);
    let mut off = 0;
    while off < 200 * MIB {
        let len = (200 * MIB - off).min(32 * MIB);
        let (finished, good, out) = qemu_io(
            &sock,
            "t",
            &[format!("write -P {} {off} {len}", (off / MIB) as u8 | 1)],
        );
        assert!(
            finished,
            "the {len}-byte write at {off} hung (killed after 60 s): {out}\n{}",
            d.log()
        );
        // The volume fits the pool: every write must succeed (ENOSPC would be allowed
        // only for a volume larger than the free space).
        assert!(good, "the write at {off} failed: {out}");
        off += len;
    }
    // Everything reads back.
    let mut off = 0;
    while off < 200 * MIB {
        let len = (200 * MIB - off).min(32 * MIB);
        let (finished, good, out) = qemu_io(
            &sock,
            "t",
            &[format!("read -P {} {off} {len}", (off / MIB) as u8 | 1)],
        );
        assert!(finished && good, "read back at {off}: {out}");
        off += len;
    }
    finish(d);
}

/// A volume larger than the pool: writes past the free space fail (ENOSPC), none hangs.
#[test]
fn writes_past_the_free_space_fail_instead_of_hanging() {
    watchdog(600);
    let d = daemon("pool-full", &[]);
    d.pool("p", 128 * MIB);
    let sock = thin_nbd(&d, "big", 256 * MIB);
    let mut failed = 0;
    let mut off = 0;
    while off < 256 * MIB {
        let (finished, good, out) =
            qemu_io(&sock, "big", &[format!("write -P 7 {off} {}", 32 * MIB)]);
        assert!(
            finished,
            "the write at {off} hung (killed after 60 s): {out}\n{}",
            d.log()
        );
        if !good {
            failed += 1;
            assert!(
                out.contains("No space left") || out.contains("Input/output error"),
                "the write at {off} failed, but not with ENOSPC: {out}"
            );
        }
        off += 32 * MIB;
    }
    assert!(failed > 0, "a 256 MiB volume cannot fit a 128 MiB pool");
    finish(d);
}

/// qemu-io with `cmds` in the background; joined for its result.
fn qemu_io_bg(
    sock: &Path,
    name: &str,
    cmds: &[String],
) -> std::thread::JoinHandle<(bool, bool, String)> {
    let (sock, name, cmds) = (sock.to_path_buf(), name.to_string(), cmds.to_vec());
    std::thread::spawn(move || qemu_io(&sock, &name, &cmds))
}

/// The issue's snapshot race, aimed at: an allocating write held in flight (test fault
/// `pool-write-delay:held`: its data written, its mapping not yet installed, for 1 s)
/// while the volume is snapshotted, then a second write to the same 64 KiB cluster.
/// Before the fix the first write installed its cluster into the snapshot while the
/// second allocated a fresh cluster for the live volume: the live volume lost the first,
/// acknowledged, write.
#[test]
fn a_write_in_flight_across_a_snapshot_stays_in_the_live_volume() {
    watchdog(300);
    let d = daemon("pool-snap-race", &[]);
    d.pool("p", 64 * MIB);
    let sock = thin_nbd(&d, "held", 32 * MIB);
    let w1 = qemu_io_bg(&sock, "held", &["write -P 0xaa 0 4k".into()]);
    wait_held(&d, "held");
    d.api
        .post("/v1/disks/held/snapshot", &json!({"snapshot": "s1"}))
        .expect("snapshot");
    let (finished, good, out) = qemu_io(&sock, "held", &["write -P 0xbb 8k 4k".into()]);
    assert!(finished && good, "second write: {out}");
    let (finished, good, out) = w1.join().expect("first write");
    assert!(finished && good, "first write: {out}");
    // Both writes read back from the live volume, the rest of the cluster is zero.
    let (finished, good, out) = qemu_io(
        &sock,
        "held",
        &[
            "read -P 0xaa 0 4k".into(),
            "read -P 0 4k 4k".into(),
            "read -P 0xbb 8k 4k".into(),
            "read -P 0 12k 52k".into(),
        ],
    );
    assert!(finished && good, "the live volume lost a write: {out}");
    // The snapshot holds what was acknowledged or in flight when it was taken, never
    // the later write.
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "snapview", "pool": "p", "volume": "s1"}),
        )
        .expect("attach the snapshot");
    d.nbd_export(json!({"disk": "snapview", "socket": sock, "read_only": true}));
    let (finished, good, out) = qemu_io_with(
        &sock,
        "snapview",
        &["-r"],
        &["read -P 0 4k 60k".into(), "read -P 0xaa 0 4k".into()],
    );
    assert!(finished && good, "snapshot content: {out}");
    finish(d);
}

/// A command parked longer than `[pool] command_timeout_ms` fails (EIO) and is counted:
/// a write to a cluster another write allocates waits for it, and that one is held for
/// 1 s by the test fault, past a 200 ms limit.
#[test]
fn a_command_waiting_longer_than_the_timeout_fails_and_is_counted() {
    watchdog(300);
    let dir = unique_dir("pool-timeout");
    let cfg = dir.join("nvmux.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[pool]\ncommand_timeout_ms = 200\n",
            dir.display().to_string()
        ),
    )
    .expect("config");
    let d = daemon_in(dir, &["--config", cfg.to_str().expect("utf-8")]);
    d.pool("p", 64 * MIB);
    let sock = thin_nbd(&d, "held", 32 * MIB);
    let w1 = qemu_io_bg(&sock, "held", &["write -P 0xaa 0 4k".into()]);
    wait_held(&d, "held");
    // Same cluster: parks until the first installs, 1 s later.
    let (finished, good, out) = qemu_io(&sock, "held", &["write -P 0xbb 8k 4k".into()]);
    assert!(finished, "the parked write hung: {out}");
    assert!(
        !good,
        "the parked write should have failed after 200 ms: {out}"
    );
    let (finished, good, out) = w1.join().expect("first write");
    assert!(finished && good, "the first write: {out}");
    let n = metric(&d, "nvmux_pool_commands_timed_out_total{pool=\"p\"}");
    assert!(n.unwrap_or(0.0) >= 1.0, "not counted: {}", metrics(&d));
    // A write that does not wait is not affected.
    let (finished, good, out) = qemu_io(&sock, "held", &["write -P 0xcc 1M 4k".into()]);
    assert!(finished && good, "an unrelated write: {out}");
    finish(d);
}

/// "fsyncgate": the first journal commit of pool `sticky` fails (test fault
/// `pool-commit-error:sticky.pool`, a sync that returns EIO once). Every later flush
/// fails too, on new connections as well, although the device's later syncs succeed;
/// the failed state shows in the pool, the disk and the metrics. Before the fix a flush
/// with nothing to commit synced the file and succeeded.
#[test]
fn after_a_failed_commit_every_flush_fails_until_the_pool_is_reopened() {
    watchdog(300);
    let d = daemon("pool-sticky", &[]);
    d.pool("sticky", 64 * MIB);
    let sock = thin_nbd_in(&d, "sticky", "s", 32 * MIB);
    // The write's cluster claim commits first, and fails.
    let (finished, good, out) = qemu_io(&sock, "s", &["write -P 1 0 64k".into(), "flush".into()]);
    assert!(finished, "{out}");
    assert!(
        !good,
        "the write or flush after a failed commit must fail: {out}"
    );
    for i in 0..3 {
        let (finished, good, out) = qemu_io(&sock, "s", &["flush".into()]);
        assert!(finished, "{out}");
        assert!(
            !good,
            "flush {i} on a new connection succeeded after a failed commit: {out}"
        );
    }
    let v = d.api.get("/v1/pools/sticky").expect("pool");
    assert!(
        v["usage"]["failed"]
            .as_str()
            .is_some_and(|f| f.contains("pool-commit-error")),
        "pool show: {v}"
    );
    let disk = d.api.get("/v1/disks/s").expect("disk");
    assert!(
        disk["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed")),
        "disk show: {disk}"
    );
    assert_eq!(
        metric(&d, "nvmux_pool_failed{pool=\"sticky\"}"),
        Some(1.0),
        "{}",
        metrics(&d)
    );
    // Reopening (a daemon restart, the fault no longer armed) clears it.
    let dir = d.dir.clone();
    d.wait_killed();
    let d = TestDaemon::start_with_env(dir, &[], &[("NVMUX_TEST_FAULTS", "")]);
    assert!(
        d.api.get("/v1/pools/sticky").expect("pool")["usage"]["failed"].is_null(),
        "the reopened pool is not failed"
    );
    let (finished, good, out) = qemu_io(&sock, "s", &["write -P 2 0 64k".into(), "flush".into()]);
    assert!(finished && good, "after a restart: {out}");
    finish(d);
}

/// A thin volume `name` of pool `p` (or attach `volume`), exported over vhost-user.
fn vhost_disk(d: &TestDaemon, name: &str, body: serde_json::Value) -> PathBuf {
    let mut b = json!({"name": name, "pool": "p"});
    for (k, v) in body.as_object().cloned().unwrap_or_default() {
        b[k] = v;
    }
    d.api.post("/v1/disks", &b).expect("create thin disk");
    let sock = d.dir.join(format!("{name}.sock"));
    d.api
        .post(
            "/v1/exports",
            &json!({"disk": name, "socket": sock, "num_queues": 1}),
        )
        .expect("export");
    sock
}

const BLK: usize = 4096;

/// Block `lba` after its `gen`-th write (generation 0: never written, zeros).
fn block(lba: u64, gen: u64, out: &mut [u8]) {
    if gen == 0 {
        out.fill(0);
        return;
    }
    let p = pattern(lba.wrapping_mul(1_000_003) ^ gen, BLK);
    out.copy_from_slice(&p);
    out[..8].copy_from_slice(&lba.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
}

/// The generation a block read back holds (0 for zeros); None if it is neither.
fn gen_of(lba: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let l = u64::from_le_bytes(data[..8].try_into().ok()?);
    let g = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let mut want = vec![0; BLK];
    block(lba, g, &mut want);
    (l == lba && want == data).then_some(g)
}

/// Read a whole disk through `c` and return each block's generation.
fn read_gens(c: &mut BlkioClient, blocks: u64) -> Vec<Option<u64>> {
    let chunk = 64 * BLK;
    let mut out = Vec::with_capacity(blocks as usize);
    let mut off = 0;
    while off < blocks * BLK as u64 {
        c.io_ok(0, Op::Read, off, chunk, 0, ReqFlags::empty())
            .expect("read back");
        let buf = c.buf()[..chunk].to_vec();
        for (i, b) in buf.chunks(BLK).enumerate() {
            out.push(gen_of(off / BLK as u64 + i as u64, b));
        }
        off += chunk as u64;
    }
    out
}

/// Snapshots every 100 ms of a volume under verified writes (libblkio over vhost-user,
/// 16 random 4 KiB writes in flight to a 2 MiB volume, so writes to the same 64 KiB
/// cluster meet across snapshots). Each snapshot is requested while a round of writes
/// is in flight. Afterwards the live volume holds every acknowledged write, and each
/// sampled snapshot holds, for every block, what was acknowledged before it was taken or
/// the write that was in flight then.
#[test]
fn snapshots_every_100_ms_during_verified_writes_lose_nothing() {
    use std::mem::MaybeUninit;
    use std::time::{Duration, Instant};
    watchdog(600);
    let d = daemon("pool-snap-load", &[]);
    // Each snapshot keeps what was written before it: 60 of a 2 MiB volume fit.
    d.pool("p", 192 * MIB);
    let size = 2 * MIB;
    let blocks = size / BLK as u64;
    let sock = vhost_disk(&d, "v", json!({"size": size}));
    const QD: usize = 16;
    let mut c = BlkioClient::connect(&sock, 1, false, 64 * BLK).expect("connect");
    let mut gens = vec![0u64; blocks as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    // (snapshot name, acknowledged generations before it, (block, generation) in flight)
    type Snap = (String, Vec<u64>, Vec<(u64, u64)>);
    let mut snaps: Vec<Snap> = Vec::new();
    let mut last = Instant::now();
    let mut rounds = 0u64;
    let mut out: Vec<MaybeUninit<blkio::Completion>> =
        (0..QD).map(|_| MaybeUninit::uninit()).collect();
    while snaps.len() < 60 {
        let mut lbas: Vec<u64> = Vec::with_capacity(QD);
        while lbas.len() < QD {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let l = rng % blocks;
            if !lbas.contains(&l) {
                lbas.push(l);
            }
        }
        let next: Vec<u64> = lbas.iter().map(|&l| gens[l as usize] + 1).collect();
        for (i, (&l, &g)) in lbas.iter().zip(&next).enumerate() {
            block(l, g, &mut c.buf()[i * BLK..(i + 1) * BLK]);
            c.enqueue(
                0,
                nvmux_bench::client::Req {
                    op: Op::Write,
                    offset: l * BLK as u64,
                    len: BLK,
                    buf_off: i * BLK,
                },
                i,
                ReqFlags::empty(),
            );
        }
        // Submit without waiting; take the snapshot while they are in flight.
        let mut got = c
            .reap(0, &mut out, 0, Duration::from_secs(60))
            .expect("submit");
        let mut done = Vec::new();
        for o in out.iter().take(got) {
            // SAFETY: reap initialised the first `got` completions.
            done.push(unsafe { o.assume_init_read() });
        }
        if last.elapsed() >= Duration::from_millis(100) {
            let name = format!("s{}", snaps.len());
            let before = gens.clone();
            d.api
                .post("/v1/disks/v/snapshot", &json!({"snapshot": name}))
                .unwrap_or_else(|e| panic!("snapshot {name}: {e:?}"));
            snaps.push((
                name,
                before,
                lbas.iter().copied().zip(next.clone()).collect(),
            ));
            last = Instant::now();
        }
        while got < QD {
            let n = c
                .reap(0, &mut out, 1, Duration::from_secs(60))
                .expect("reap");
            for o in out.iter().take(n) {
                // SAFETY: as above.
                done.push(unsafe { o.assume_init_read() });
            }
            got += n;
        }
        for r in &done {
            assert_eq!(r.ret, 0, "write {} failed", r.user_data);
        }
        for (&l, &g) in lbas.iter().zip(&next) {
            gens[l as usize] = g;
        }
        rounds += 1;
        if rounds.is_multiple_of(20) {
            let now = read_gens(&mut c, blocks);
            for (l, g) in now.iter().enumerate() {
                assert_eq!(*g, Some(gens[l]), "block {l} after round {rounds}");
            }
        }
    }
    // Every acknowledged write is in the live volume.
    let now = read_gens(&mut c, blocks);
    let lost = (0..blocks as usize)
        .filter(|&l| now[l] != Some(gens[l]))
        .count();
    assert_eq!(
        lost,
        0,
        "blocks lost or damaged in the live volume after {rounds} rounds and {} snapshots",
        snaps.len()
    );
    drop(c);
    // Sampled snapshots hold what they should.
    for (name, before, inflight) in snaps.iter().step_by(12) {
        let view = format!("view-{name}");
        let vs = vhost_disk(&d, &view, json!({"volume": name}));
        let mut sc =
            BlkioClient::connect_opts(&vs, 1, false, 64 * BLK, true).expect("connect snapshot");
        let got = read_gens(&mut sc, blocks);
        for (l, g) in got.iter().enumerate() {
            let ok = *g == Some(before[l])
                || inflight
                    .iter()
                    .any(|&(b, ng)| b == l as u64 && *g == Some(ng));
            assert!(
                ok,
                "snapshot {name}: block {l} holds {g:?}, expected {} or the write in flight",
                before[l]
            );
        }
    }
    finish(d);
}

/// "fsyncgate" on a file disk: its first flush fails (test fault `fsync-error:sticky.img`
/// completes it with EIO without syncing). Every later flush and write fails, on new
/// connections too, until the daemon restarts; `disk show` and the metrics say so. Before
/// (checked by disabling the sticky state), the next flush synced again and succeeded,
/// as Linux's next fsync does after it dropped the pages.
#[test]
fn after_a_failed_fsync_every_flush_of_a_file_disk_fails() {
    watchdog(300);
    let d = daemon("file-sticky", &[]);
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "f", "path": d.dir.join("sticky.img"), "size": 16 * MIB}),
        )
        .expect("file disk");
    let sock = d.dir.join("nbd.sock");
    d.nbd_export(json!({"disk": "f", "socket": sock}));
    // qemu-io flushes when it closes the image: the injected error hits that flush,
    // which qemu-io does not report.
    let (finished, good, out) = qemu_io(&sock, "f", &["write -P 3 0 64k".into()]);
    assert!(finished && good, "a write before the failure: {out}");
    let (finished, good, out) = qemu_io(&sock, "f", &["flush".into()]);
    assert!(
        finished && !good,
        "a flush after the failed one succeeded: {out}"
    );
    for i in 0..3 {
        let (finished, good, out) = qemu_io(&sock, "f", &["flush".into()]);
        assert!(finished, "{out}");
        assert!(
            !good,
            "flush {i} on a new connection succeeded after a failed fsync: {out}"
        );
    }
    let (finished, good, out) = qemu_io(&sock, "f", &["write -P 4 0 4k".into()]);
    assert!(finished && !good, "a write after the failure: {out}");
    let (finished, good, out) = qemu_io(&sock, "f", &["read -P 3 0 64k".into()]);
    assert!(finished && good, "reads still work: {out}");
    let disk = d.api.get("/v1/disks/f").expect("disk");
    assert!(
        disk["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed") && s.contains("fsync-error")),
        "disk show: {disk}"
    );
    assert_eq!(
        metric(&d, "nvmux_disk_failed{disk=\"f\"}"),
        Some(1.0),
        "{}",
        metrics(&d)
    );
    let dir = d.dir.clone();
    d.wait_killed();
    let d = TestDaemon::start_with_env(dir, &[], &[("NVMUX_TEST_FAULTS", "")]);
    let (finished, good, out) = qemu_io(&sock, "f", &["write -P 5 0 4k".into(), "flush".into()]);
    assert!(finished && good, "after a restart: {out}");
    assert_eq!(d.api.get("/v1/disks/f").expect("disk")["status"], "ok");
    finish(d);
}

/// `kill -9` of the daemon loses no completed write, as with a file disk (the page cache
/// outlives the process). Allocating writes (a copy-on-write from a snapshot, a new
/// cluster, a whole new cluster) are sent as raw `NBD_CMD_WRITE`s and their replies
/// read, with no flush; then the daemon is killed and restarted on the same pool. Before
/// the fix the mappings lived only in memory until the next journal commit, and the
/// restarted daemon read the snapshot's (or zero) data where the writes had completed
/// (found by the VM scenario crash-snapshots).
#[test]
fn kill_9_loses_no_completed_allocating_write() {
    use nvmux_bench::attack::nbd::{self, Reply, Target};
    use std::io::Write;
    watchdog(300);
    let d = daemon("pool-kill9", &[]);
    d.pool("p", 64 * MIB);
    let sock = thin_nbd(&d, "k", 8 * MIB);
    // Cluster 0 mapped and durable, then a snapshot the live volume reads through to.
    let (finished, good, out) = qemu_io(&sock, "k", &["write -P 1 0 64k".into(), "flush".into()]);
    assert!(finished && good, "first write: {out}");
    d.api
        .post("/v1/disks/k/snapshot", &json!({"snapshot": "k1"}))
        .expect("snapshot");
    let writes: [(u64, u32, u8); 3] = [
        (4096, 4096, 0x22),        // copy-on-write from the snapshot
        (MIB, 4096, 0x33),         // a new cluster, partly written
        (2 * MIB, 64 << 10, 0x44), // a whole new cluster
    ];
    let mut s = nbd::connect_go(&Target::Unix(sock.clone()), "k").expect("NBD connect");
    for (i, &(off, len, pat)) in writes.iter().enumerate() {
        let mut req = nbd::request(nbd::CMD_WRITE, i as u64 + 1, off, len).to_vec();
        req.extend(std::iter::repeat_n(pat, len as usize));
        s.write_all(&req).expect("send write");
        match nbd::reply(&mut s, std::time::Duration::from_secs(30)) {
            Reply::Simple { error: 0, cookie } => assert_eq!(cookie, i as u64 + 1),
            r => panic!("write {i} at {off}: {r:?}"),
        }
    }
    // Every write completed; no flush. The daemon dies now.
    let dir = d.dir.clone();
    d.wait_killed();
    drop(s);
    let d = daemon_in(dir, &[]);
    let (finished, good, out) = qemu_io(
        &sock,
        "k",
        &[
            "read -P 1 0 4k".into(),
            "read -P 0x22 4k 4k".into(),
            "read -P 1 8k 56k".into(),
            "read -P 0x33 1M 4k".into(),
            "read -P 0 1028k 60k".into(),
            "read -P 0x44 2M 64k".into(),
        ],
    );
    assert!(
        finished && good,
        "a write completed before kill -9 is lost: {out}"
    );
    finish(d);
}
