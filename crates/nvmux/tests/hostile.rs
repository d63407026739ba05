//! The attacker suite: one daemon serves a victim disk under steady, verified libblkio
//! I/O while every endpoint is attacked the way a hostile guest, network host, NBD
//! client, vhost-user front-end or function process would. After each attack the daemon
//! must be alive, its resident memory must have stayed under the baseline + 256 MiB, and
//! the victim's I/O must have gone on without a single error.
//!
//! The attacks live in `nvmux_bench::attack`, shared with `nvmux bench --hostile` (which
//! reports the victim's IOPS during each attack against its IOPS at rest). This test
//! never looks at speed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{compile_classifier, hostile_fn, unique_dir, watchdog, TestDaemon};
use nvmux_bench::attack::nbd::{self, Reply, Target};
use nvmux_bench::attack::nvmf::{self, Verdict};
use nvmux_bench::attack::{self, local, time_to_close, Victim};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// How far the daemon's RSS may grow over its baseline during any attack.
const RSS_SLACK: u64 = 256 * MIB;
const NQN: &str = "nqn.2026-12.io.nvmux:attacker";
const MALLORY: &str = "nqn.2014-08.org.nvmexpress:uuid:6d616c6c-6f72-4079-8000-000000000666";
/// Short timeouts so the slow attacks end quickly.
const HANDSHAKE_MS: u64 = 2000;
const STALL_MS: u64 = 3000;

struct Rig {
    // The victim stops before the daemon does (fields drop in order).
    victim: Victim,
    d: TestDaemon,
    base_rss: u64,
    nvmf: SocketAddr,
    nbd_tcp: Target,
    nbd_unix: Target,
    peak_rss: u64,
}

impl Rig {
    fn start() -> Rig {
        let dir = unique_dir("hostile");
        let cfg = dir.join("nvmux.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {dir:?}\n\
                 [workers]\nthreads = 2\n\
                 [nvmf]\nhandshake_timeout_ms = {HANDSHAKE_MS}\nstall_timeout_ms = {STALL_MS}\n\
                 [nbd]\nhandshake_timeout_ms = {HANDSHAKE_MS}\nstall_timeout_ms = {STALL_MS}\n"
            ),
        )
        .expect("config");
        let cfg_s = cfg.to_string_lossy().to_string();
        let d = TestDaemon::start_with(dir, &["--config", &cfg_s]);
        // The victim: a 64 MiB file disk over vhost-user, driven by libblkio.
        let (_, vsock) = d.disk_and_export("victim", 64 * MIB, 1, json!({}));
        // What the attackers may reach: an NVMe/TCP subsystem that allows MALLORY, and an
        // NBD export on a Unix socket and on loopback TCP.
        d.file_disk("bait", 64 * MIB);
        let nvmf = d.nvmf_subsystem(NQN, &[MALLORY], &["bait"]);
        let nbd_sock = d.dir.join("bait-nbd.sock");
        d.api
            .post(
                "/v1/exports",
                &json!({"name": "bait-unix", "disk": "bait", "type": "nbd", "socket": nbd_sock, "export_name": "bait"}),
            )
            .expect("nbd unix export");
        let v = d
            .api
            .post(
                "/v1/exports",
                &json!({"name": "bait-tcp", "disk": "bait", "type": "nbd", "listen": "127.0.0.1:0", "export_name": "bait"}),
            )
            .expect("nbd tcp export");
        let nbd_tcp: SocketAddr = v["listen"].as_str().unwrap().parse().unwrap();
        let victim = Victim::vhost(&vsock).expect("victim I/O");
        // Let the victim reach its steady state before taking the baseline.
        std::thread::sleep(Duration::from_millis(500));
        let base_rss = attack::rss_bytes(d.pid()).expect("rss");
        Rig {
            d,
            victim,
            base_rss,
            nvmf,
            nbd_tcp: Target::Tcp(nbd_tcp),
            nbd_unix: Target::Unix(nbd_sock),
            peak_rss: base_rss,
        }
    }

    /// After an attack: the daemon is alive and answers its API, its RSS stayed under
    /// the bound, and the victim has gone on without an error.
    fn check(&mut self, what: &str) {
        assert!(
            self.d.healthy(),
            "{what}: the daemon died or stopped answering\n{}",
            tail(&self.d.log())
        );
        let rss = attack::rss_bytes(self.d.pid()).expect("rss");
        self.peak_rss = self.peak_rss.max(rss);
        assert!(
            rss < self.base_rss + RSS_SLACK,
            "{what}: RSS {} MiB over the baseline {} MiB + 256 MiB",
            rss >> 20,
            self.base_rss >> 20
        );
        let before = self.victim.count();
        std::thread::sleep(Duration::from_millis(300));
        let after = self.victim.count();
        assert_eq!(
            after.errors,
            0,
            "{what}: the victim saw an error: {:?}",
            self.victim.first_error()
        );
        assert!(
            after.ops > before.ops,
            "{what}: the victim's I/O stopped ({} ops, none in 300 ms)",
            after.ops
        );
        eprintln!(
            "after {what}: daemon alive, RSS {} MiB (baseline {} MiB), victim {} ops, 0 errors",
            rss >> 20,
            self.base_rss >> 20,
            after.ops
        );
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
#[ignore = "entry point of the hostile function process (run by other tests)"]
fn hostile_function_process() {
    hostile_fn::child_main();
}

#[test]
fn every_endpoint_withstands_hostile_peers() {
    watchdog(900);
    let mut r = Rig::start();
    let disc = "nqn.2014-08.org.nvmexpress.discovery";
    let slack = Duration::from_millis(HANDSHAKE_MS + 3000);

    // ---- NVMe/TCP: the largest length fields ----
    for (sub, lid, what) in [
        (disc, 0x70u8, "NUMD 0xffffffff on the discovery controller"),
        (NQN, 0x02, "NUMD 0xffffffff on an admin queue"),
    ] {
        let mut q = nvmf::enabled_admin(r.nvmf, sub, MALLORY).expect(what);
        let a = nvmf::huge_log_page(&mut q, lid, u32::MAX).expect(what);
        eprintln!("{what} with a 4 GiB SGL: the controller {a}");
        assert!(a.data <= 1 << 20, "{what}: {a}");
        assert!(
            matches!(a.verdict, Verdict::Status(_)) || a.ended(),
            "{what}: {a}"
        );
        r.check(what);
    }
    let mut q = nvmf::enabled_admin(r.nvmf, NQN, MALLORY).expect("admin queue");
    let a = nvmf::huge_admin_sgl(&mut q).expect("identify");
    eprintln!("Identify with a 4 GiB SGL: the controller {a}");
    assert!(a.data <= 4096, "{a}");
    r.check("a 4 GiB SGL on an admin command");
    let a = nvmf::r2t_before_connect(r.nvmf, u32::MAX).expect("r2t before connect");
    eprintln!("a Connect whose 4 GiB of data is to come by R2T: the controller {a}");
    assert!(!a.r2t(), "no R2T before Connect: {a}");
    r.check("an R2T-provoking capsule before Connect");

    let nbd_targets = [r.nbd_unix.clone(), r.nbd_tcp.clone()];
    // ---- NBD: the largest length fields ----
    for t in &nbd_targets {
        let mut s = nbd::connect_go(t, "bait").expect("NBD negotiation");
        let read = nbd::huge_request(&mut s, nbd::CMD_READ, u32::MAX);
        let write = nbd::huge_request(&mut s, nbd::CMD_WRITE, u32::MAX);
        eprintln!(
            "NBD over {}: 4 GiB read: {read:?}; then a 4 GiB write: {write:?}",
            t.kind()
        );
        assert!(
            matches!(read, Reply::Simple { error, .. } if error != 0),
            "{}: a 4 GiB read is refused: {read:?}",
            t.kind()
        );
        assert_eq!(
            write,
            Reply::Closed,
            "{}: a 4 GiB write ends the connection",
            t.kind()
        );
        r.check(&format!("NBD 4 GiB requests over {}", t.kind()));
    }

    // ---- 1000 connections (checked while the admitted ones are held) ----
    attack::raise_fd_limit();
    let f = nvmf::flood(r.nvmf, 1000, Duration::from_secs(5));
    eprintln!(
        "1000 NVMe/TCP connections: {} taken, {} refused, {} not connected",
        f.held.len(),
        f.refused,
        f.failed
    );
    assert!(f.refused > 0, "the per-host limit refuses some of 1000");
    r.check("1000 NVMe/TCP connections");
    drop(f);
    for t in &nbd_targets {
        let f = nbd::flood(t, 1000, Duration::from_secs(5));
        eprintln!(
            "1000 NBD connections over {}: {} taken, {} refused, {} not connected",
            t.kind(),
            f.held.len(),
            f.refused,
            f.failed
        );
        assert!(
            f.refused > 0,
            "{}: the connection limits refuse some of 1000",
            t.kind()
        );
        r.check(&format!("1000 NBD connections over {}", t.kind()));
    }

    // ---- a byte a second ----
    let every = Duration::from_millis(1000);
    let give_up = Duration::from_secs(30);
    let took = nvmf::slow_handshake(r.nvmf, NQN, MALLORY, every, give_up).expect("slow nvmf");
    eprintln!("NVMe/TCP handshake at 1 byte/s: closed after {took:?}");
    assert!(
        took.is_some_and(|t| t < slack),
        "cut at the handshake timeout: {took:?}"
    );
    r.check("a 1 byte/s NVMe/TCP handshake");
    for t in &nbd_targets {
        let took = nbd::slow_handshake(t, "bait", every, give_up).expect("slow nbd");
        eprintln!(
            "NBD negotiation at 1 byte/s over {}: closed after {took:?}",
            t.kind()
        );
        assert!(
            took.is_some_and(|t| t < slack),
            "{}: cut at the handshake timeout: {took:?}",
            t.kind()
        );
        r.check(&format!("a 1 byte/s NBD handshake over {}", t.kind()));
    }

    // ---- half-open sockets ----
    let n = attack::half_open(r.nvmf, 50, slack).expect("half-open nvmf");
    assert_eq!(
        n, 50,
        "silent NVMe/TCP connections are closed at the handshake timeout"
    );
    r.check("50 half-open NVMe/TCP connections");
    if let Target::Tcp(a) = r.nbd_tcp {
        let n = attack::half_open(a, 50, slack).expect("half-open nbd");
        assert_eq!(
            n, 50,
            "silent NBD connections are closed at the handshake timeout"
        );
        r.check("50 half-open NBD connections");
    }
    let mut s = nbd::unread_replies(&r.nbd_tcp, "bait", 64, 1 << 20).expect("not reading");
    std::thread::sleep(Duration::from_millis(STALL_MS + 3000));
    assert!(
        time_to_close(&mut s, Duration::from_secs(5)).is_some(),
        "a client that never reads its replies is cut at the stall timeout"
    );
    r.check("an NBD client that never reads its replies");

    // ---- a vhost-user front-end that shrinks its memory ----
    let (_, evil) = r.d.disk_and_export("evil", 8 * MIB, 1, json!({}));
    local::vhost_shrink_memory(&evil, Duration::from_millis(500)).expect("shrinking front-end");
    let t0 = std::time::Instant::now();
    while r
        .d
        .api
        .get("/v1/exports")
        .expect("exports")
        .as_array()
        .is_none_or(|a| {
            // The attack has left by now, and with it its memory table: `device_failed`
            // is cleared then, but the fault that failed the device stays counted.
            !a.iter()
                .any(|e| e["name"] == "evil" && e["guest_memory"]["faults"].as_u64() >= Some(1))
        })
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the shrunk device is failed (a guest memory fault is counted)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    r.check("a front-end that truncates its guest memory");

    // ---- a function process that resizes its ring ----
    let fsock = r.d.dir.join("bait-fn.sock");
    r.d.api
        .post(
            "/v1/disks/evil/external",
            &json!({"socket": fsock, "on_failure": "chain", "owner": "65534:65534"}),
        )
        .expect("set external");
    let obj = compile_classifier(&r.d.dir, "all_external");
    r.d.api
        .post("/v1/disks/evil/classifier", &json!({"object": obj}))
        .expect("load all_external");
    let child = hostile_fn::spawn(&fsock, Some(65534));
    let t0 = std::time::Instant::now();
    while r
        .d
        .api
        .get("/v1/disks/evil/classifier")
        .expect("classifier")["external"]["status"]
        != "attached"
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the function attaches"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A command routed to the function makes the ring (the device failed above, so a
    // fresh front-end on a new memory table sends it).
    let mut g = nvmux_bench::vufront::Guest::setup(&evil);
    let _ = nvmux_bench::vufront::request(&mut g, 0, nvmux_bench::vufront::DATA, 4096);
    let rep = hostile_fn::report(child).expect("the function's report");
    eprintln!("a function process resizing its ring: {rep:?}");
    assert_eq!(
        (rep.shrink, rep.grow, rep.seal_write),
        (libc::EPERM, libc::EPERM, libc::EPERM)
    );
    drop(g);
    r.check("a function process that resizes its ring");

    // ---- a classifier that tries to leak a pointer ----
    let obj = compile_classifier(&r.d.dir, "bad_leak_pointer");
    let e =
        r.d.api
            .post("/v1/disks/evil/classifier", &json!({"object": obj}))
            .expect_err("a pointer-leaking classifier is refused");
    eprintln!("a classifier leaking a pointer: {e}");
    assert!(e.to_string().contains("pointer"), "{e}");
    r.check("a classifier that tries to leak a pointer");

    eprintln!(
        "attacker suite: peak RSS {} MiB over a baseline of {} MiB; victim {} ops without an error",
        r.peak_rss >> 20,
        r.base_rss >> 20,
        r.victim.count().ops
    );
    assert_eq!(r.victim.count().errors, 0);
}
