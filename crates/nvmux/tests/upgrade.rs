//! `nvmux upgrade`: the real daemon hands its sockets and a live vhost-user session to a
//! second copy of its binary while the real libblkio client keeps writing and verifying
//! (libblkio cannot reconnect, so a client that goes on working proves the connection
//! was never closed); and a new binary that fails leaves the old daemon serving.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use common::*;
use nvmux_bench::client::{BlkioClient, Op, Req};
use serde_json::json;

const MIB: u64 = 1 << 20;
const QD: usize = 16;
const BS: usize = 4096;

/// A copy of the binary at another path, so the upgrade really runs another file.
fn binary_copy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(env!("CARGO_BIN_EXE_nvmux"), &p).expect("copy the binary");
    p
}

fn seed(round: u64, i: usize) -> u64 {
    round * 1000 + i as u64
}

/// QD16 batches of 4 KiB writes over a 4 MiB window, each batch read back and compared
/// (round `r` writes blocks `(r % 64) * 16 ..`). Runs until `stop`; returns the rounds
/// done and the last round that wrote each window slot.
fn writer(
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
) -> Result<Vec<u64>, String> {
    let mut c = BlkioClient::connect(&sock, 1, false, 2 * QD * BS)?;
    let mut last = vec![0u64; 64];
    let mut out: Vec<MaybeUninit<Completion>> = (0..QD).map(|_| MaybeUninit::uninit()).collect();
    let mut round = 0u64;
    while !stop.load(Ordering::Acquire) {
        round += 1;
        let slot = (round % 64) as usize;
        let base = slot as u64 * (QD * BS) as u64;
        for i in 0..QD {
            c.buf()[i * BS..(i + 1) * BS].copy_from_slice(&pattern(seed(round, i), BS));
        }
        for op in [Op::Write, Op::Read] {
            for i in 0..QD {
                let buf_off = if op == Op::Write {
                    i * BS
                } else {
                    (QD + i) * BS
                };
                c.enqueue(
                    0,
                    Req {
                        op,
                        offset: base + (i * BS) as u64,
                        len: BS,
                        buf_off,
                    },
                    i,
                    ReqFlags::empty(),
                );
            }
            let mut got = 0;
            while got < QD {
                let n = c.reap(0, &mut out[..QD - got], QD - got, Duration::from_secs(30))?;
                for o in &out[..n] {
                    // SAFETY: reap returned n, so libblkio initialised the first n.
                    let cmp = unsafe { o.assume_init_read() };
                    if cmp.ret != 0 {
                        return Err(format!("round {round}: {op:?} failed: {}", cmp.ret));
                    }
                }
                got += n;
            }
        }
        for i in 0..QD {
            if c.buf()[(QD + i) * BS..(QD + i + 1) * BS] != pattern(seed(round, i), BS)[..] {
                return Err(format!("round {round}: block {i} reads back wrong"));
            }
        }
        last[slot] = round;
        rounds.store(round, Ordering::Release);
    }
    Ok(last)
}

fn wait_rounds(rounds: &AtomicU64, more: u64) {
    let start = rounds.load(Ordering::Acquire);
    let t0 = Instant::now();
    while rounds.load(Ordering::Acquire) < start + more {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the client made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// SIGTERM a daemon that is not our child (the upgraded one) and wait for it.
fn stop_pid(pid: u32) {
    // SAFETY: signalling a process this test started (indirectly).
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "pid {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn upgrade_hands_a_live_vhost_session_to_the_new_binary() {
    watchdog(240);
    let d = TestDaemon::start("upgrade");
    let (img, sock) = d.disk_and_export("u", 64 * MIB, 1, json!({}));
    let bins = [
        binary_copy(&d.dir, "nvmux-a"),
        binary_copy(&d.dir, "nvmux-b"),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let (s2, r2, sock2) = (stop.clone(), rounds.clone(), sock.clone());
    let client = std::thread::spawn(move || writer(sock2, s2, r2));
    wait_rounds(&rounds, 20);
    let mut pids = vec![d.pid()];
    for (n, bin) in bins.iter().chain(bins.iter().take(1)).enumerate() {
        let t0 = Instant::now();
        let v = d
            .api
            .post("/v1/upgrade", &json!({"binary": bin, "timeout_ms": 30000}))
            .unwrap_or_else(|e| panic!("upgrade {n}: {e}\n{}", d.log()));
        let pid = v["pid"].as_u64().expect("pid") as u32;
        assert_eq!(v["sessions"], 1, "{v}");
        eprintln!(
            "upgrade {n}: pid {pid}, pause {} ms, call {} ms",
            v["pause_ms"],
            t0.elapsed().as_millis()
        );
        // The old process exits; the new one answers on the same API socket.
        let old = *pids.last().unwrap_or(&0);
        let t = Instant::now();
        while alive(old) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "old daemon {old} still runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(alive(pid));
        pids.push(pid);
        let h = d
            .api
            .get("/v1/exports")
            .expect("exports from the new daemon");
        assert_eq!(h[0]["connected"], true, "{h}");
        // I/O goes on through the same connection.
        wait_rounds(&rounds, 20);
    }
    stop.store(true, Ordering::Release);
    let last = client.join().expect("client thread").expect("verified I/O");
    // The data is in the image: every window slot holds its last round's pattern.
    for (slot, r) in last.iter().enumerate() {
        if *r == 0 {
            continue;
        }
        let base = slot as u64 * (QD * BS) as u64;
        for i in 0..QD {
            assert!(
                read_file_at(&img, base + (i * BS) as u64, BS) == pattern(seed(*r, i), BS),
                "slot {slot} block {i} differs in the image"
            );
        }
    }
    // The takeover socket is gone; state is intact for the next start.
    assert!(!d.dir.join("takeover.sock").exists());
    let pid = *pids.last().unwrap_or(&0);
    stop_pid(pid);
    d.wait_killed();
}

#[test]
fn a_failing_new_binary_leaves_the_old_daemon_serving() {
    watchdog(240);
    // The daemon's environment arms a failed health check in the new process (which
    // inherits it) for the second attempt; the first uses a binary that exits at once.
    let dir = unique_dir("upgrade-fail");
    let d = TestDaemon::start_with_env(dir, &[], &[("NVMUX_TEST_FAULTS", "upgrade-health:*")]);
    let (_img, sock) = d.disk_and_export("f", 16 * MIB, 1, json!({}));
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let (s2, r2, sock2) = (stop.clone(), rounds.clone(), sock.clone());
    let client = std::thread::spawn(move || writer(sock2, s2, r2));
    wait_rounds(&rounds, 10);

    let bad = d.dir.join("exits-at-once");
    std::fs::write(
        &bad,
        "#!/bin/sh\necho 'nvmux-next: cannot start' >&2\nexit 3\n",
    )
    .expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let e = d
        .api
        .post("/v1/upgrade", &json!({"binary": bad, "timeout_ms": 5000}))
        .expect_err("an upgrade to a binary that exits must fail");
    assert!(e.message.contains("keeps serving"), "{}", e.message);
    assert!(
        e.message.contains("cannot start"),
        "log excerpt: {}",
        e.message
    );
    wait_rounds(&rounds, 10);

    // A real binary whose health check fails: the session was frozen and is thawed.
    let real = binary_copy(&d.dir, "nvmux-next");
    let e = d
        .api
        .post("/v1/upgrade", &json!({"binary": real, "timeout_ms": 30000}))
        .expect_err("a failed health check must abandon the upgrade");
    assert!(e.message.contains("health check failed"), "{}", e.message);
    assert!(e.message.contains("upgrade-health"), "{}", e.message);
    wait_rounds(&rounds, 10);

    let h = d
        .api
        .get("/v1/health")
        .expect("the old daemon still answers");
    assert_eq!(h["status"], "ok");
    stop.store(true, Ordering::Release);
    client.join().expect("client thread").expect("verified I/O");
    d.stop();
}

#[test]
fn nbd_and_nvmf_listeners_move_and_their_clients_reconnect() {
    use nvmux_bench::nvmf::Host;
    const NQN: &str = "nqn.2026-12.io.nvmux:upgrade";
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-000000000001";
    watchdog(240);
    let d = TestDaemon::start("upgrade-net");
    // A thin disk in a pool: the old process closes the pool, the new one opens it.
    d.pool("p", 256 * MIB);
    d.api
        .post(
            "/v1/disks",
            &json!({"name": "n", "pool": "p", "size": 32 * MIB}),
        )
        .expect("pool disk");
    d.file_disk("m", 32 * MIB);
    let nsock = d.dir.join("n.nbd");
    d.nbd_export(json!({"disk": "n", "socket": nsock}));
    let addr = d.nvmf_subsystem(NQN, &[HOST], &["m"]);
    let nbd_size = || {
        let out = ok(std::process::Command::new("nbdinfo")
            .arg("--size")
            .arg(format!("nbd+unix:///n?socket={}", nsock.display())));
        out.trim().parse::<u64>().unwrap_or(0)
    };
    assert_eq!(nbd_size(), 32 * MIB);
    let mut h = Host::connect(addr, NQN, HOST, 1, 32, false).expect("NVMe/TCP connect");
    h.identify(0, 1).expect("identify before");
    let bin = binary_copy(&d.dir, "nvmux-next");
    let v = d
        .api
        .post("/v1/upgrade", &json!({"binary": bin}))
        .unwrap_or_else(|e| panic!("upgrade: {e}\n{}", d.log()));
    let pid = v["pid"].as_u64().expect("pid") as u32;
    assert_eq!(v["sessions"], 0, "{v}");
    // The host's admin and I/O queue connections.
    assert_eq!(v["closed_connections"], 2, "the NVMe/TCP connections: {v}");
    // The connection that was open is closed (drained); the host connects again to the
    // same address, which the new process listens on.
    assert!(
        h.identify(0, 1).is_err(),
        "the old NVMe/TCP connection still answers"
    );
    let mut h = Host::connect(addr, NQN, HOST, 1, 32, false).expect("NVMe/TCP reconnect");
    h.identify(0, 1).expect("identify after");
    let subs = d.api.get("/v1/subsystems").expect("subsystems");
    assert_eq!(subs[0]["listen"], addr.to_string(), "{subs}");
    assert_eq!(nbd_size(), 32 * MIB);
    let disk = d.api.get("/v1/disks/n").expect("disk from the new daemon");
    assert_eq!(
        disk["status"], "ok",
        "the pool disk in the new daemon: {disk}"
    );
    drop(h);
    stop_pid(pid);
    d.wait_killed();
}
