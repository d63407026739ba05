//! Hostile hosts against the NVMe/TCP target of a real daemon, over real sockets: the
//! length fields at their maximum (NUMD FFFFFFFFh on discovery and admin, 4 GiB SGLs, an
//! R2T-provoking Connect), H2CData games, 1000 connections from one address, slow
//! handshakes, stalls, silent hosts (keep-alive timeout), the discovery policy and the
//! memory budget. In each case another host's verified I/O goes on without an error and
//! the daemon's resident memory stays bounded. The attacks live in
//! `nvmux_bench::attack::nvmf`, shared with the attacker suite (`hostile.rs`) and
//! `nvmux bench --hostile`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{watchdog, TestDaemon};
use nvmux_bench::attack::nvmf::{self, H2cGame};
use nvmux_bench::attack::{rss_bytes, time_to_close, Victim};
use nvmux_bench::nvmf::{Host, HostOpts, Queue, Sqe, DISCOVERY_NQN};
use serde_json::Value;

const NQN: &str = "nqn.2026-11.io.nvmux:hostile";
const VICTIM: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-0000000000a1";
const ATTACKER: &str = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-4000-8000-0000000000b2";
const STRANGER: &str = "nqn.2014-08.org.nvmexpress:uuid:cccccccc-0000-4000-8000-0000000000c3";

/// Resident memory may grow by this much over the daemon's baseline during an attack.
const RSS_BOUND: u64 = 256 << 20;

/// A daemon with `config` (TOML), a 64 MiB file disk as namespace 1 of NQN on an ephemeral
/// port, VICTIM and ATTACKER on its allow-list.
fn setup(tag: &str, config: &str) -> (TestDaemon, SocketAddr) {
    let dir = common::unique_dir(tag);
    let cfg = dir.join("nvmux.toml");
    std::fs::write(&cfg, config).expect("config");
    let d = TestDaemon::start_with(dir, &["--config", cfg.to_str().expect("path")]);
    d.file_disk("d1", 64 << 20);
    let addr = d.nvmf_subsystem(NQN, &[VICTIM, ATTACKER], &["d1"]);
    (d, addr)
}

/// HostOpts with one I/O queue of 32 entries and a keep-alive timeout of `kato_ms`.
fn opts(kato_ms: u32) -> HostOpts {
    HostOpts {
        nr_io: 1,
        entries: 32,
        kato_ms,
        ..Default::default()
    }
}

fn rss(d: &TestDaemon) -> u64 {
    rss_bytes(d.pid()).expect("the daemon's RSS")
}

fn victim(addr: SocketAddr) -> Victim {
    // LBAs 16384..: the attacks write (legitimately, as an allowed host) to LBAs 0..4352,
    // and the victim's verified region must not overlap them.
    let v = Victim::nvmf(addr, NQN, VICTIM, opts(5000), 16384).expect("victim connects");
    assert!(v.progresses(20, Duration::from_secs(20)), "victim I/O runs");
    v
}

fn stats(d: &TestDaemon) -> Value {
    d.api.get("/v1/stats").expect("stats")
}

/// After an attack: the daemon answers, the victim makes progress, RSS is bounded.
fn after(what: &str, d: &mut TestDaemon, v: &Victim, base_rss: u64) {
    assert!(d.healthy(), "{what}: the daemon is alive");
    assert!(
        v.progresses(10, Duration::from_secs(20)),
        "{what}: the victim's I/O goes on (victim's first error: {:?})",
        v.first_error()
    );
    let rss = rss(d);
    assert!(
        rss < base_rss + RSS_BOUND,
        "{what}: RSS {} MiB, baseline {} MiB",
        rss >> 20,
        base_rss >> 20
    );
}

#[test]
fn maximum_lengths_end_only_their_own_connection() {
    watchdog(300);
    let (mut d, addr) = setup("nvmf-hostile-len", "");
    let v = victim(addr);
    let base = rss(&d);

    // NUMD = FFFFFFFFh on the discovery controller (an allowed host) and on the admin
    // queue, with a 4 GiB SGL and with a 128 KiB one: an error status, and the connection
    // stays usable (Identify after it works).
    for sub in [DISCOVERY_NQN, NQN] {
        for (lid, sgl) in [
            (0x70u8, u32::MAX),
            (0x70, 128 << 10),
            (0x02, u32::MAX),
            (0x02, 128 << 10),
        ] {
            let mut q = nvmf::enabled_admin(addr, sub, ATTACKER).expect("admin");
            let r = nvmf::huge_log_page(&mut q, lid, sgl).expect("send");
            assert!(
                r.error().is_some(),
                "{sub}: NUMD FFFFFFFFh, log {lid:#x}, SGL {sgl}: {r:?}"
            );
            let id = q.admin_read(Sqe::new(0x06, 0).cdw(10, 1), 4096);
            assert!(id.is_ok(), "{sub}: the connection still works: {id:?}");
            after("NUMD FFFFFFFFh", &mut d, &v, base);
        }
    }
    // A log page within MDTS but longer than the page: what the page has, zeros after.
    let mut q = nvmf::enabled_admin(addr, DISCOVERY_NQN, ATTACKER).expect("admin");
    let page = q
        .admin_read(
            Sqe::new(0x02, 0).cdw(10, 0x70 | ((32768 / 4 - 1) << 16)),
            32768,
        )
        .expect("discovery log of 32 KiB");
    assert_eq!(u64::from_le_bytes(page[8..16].try_into().unwrap()), 1);
    assert!(page[2048..].iter().all(|&b| b == 0));

    // Identify with a 4 GiB SGL.
    let mut q = nvmf::enabled_admin(addr, NQN, ATTACKER).expect("admin");
    let r = nvmf::huge_admin_sgl(&mut q).expect("send");
    assert_eq!(r.error(), Some((0, 0x0f)), "SGL length invalid: {r:?}");
    after("admin SGL 4 GiB", &mut d, &v, base);

    // Before Connect: no R2T, whatever the length; an I/O command too.
    for len in [u32::MAX, 1024, 4096] {
        let r = nvmf::r2t_before_connect(addr, len).expect("send");
        assert!(
            !r.r2t() && (r.error().is_some() || r.ended()),
            "Connect by R2T ({len} bytes): {r:?}"
        );
    }
    let r = nvmf::io_before_connect(addr).expect("send");
    assert!(
        r.error().is_some() || r.ended(),
        "I/O before Connect: {r:?}"
    );
    after("R2T before Connect", &mut d, &v, base);

    // H2CData games: each ends its own connection.
    for g in [
        H2cGame::NoR2t,
        H2cGame::WrongTtag,
        H2cGame::PastRange,
        H2cGame::DatalMismatch,
        H2cGame::HugePlen,
        H2cGame::Duplicate,
    ] {
        let r = nvmf::h2c_game(addr, NQN, ATTACKER, g).expect("game");
        assert!(r.ended(), "{g:?}: {r:?}");
        after(&format!("H2CData {g:?}"), &mut d, &v, base);
    }
    let s = stats(&d);
    assert!(s["nvmf"]["protocol_errors"].as_u64().unwrap() >= 6, "{s}");
    v.finish().expect("the victim saw no error");
}

#[test]
fn a_thousand_connections_are_bounded() {
    watchdog(300);
    let (mut d, addr) = setup(
        "nvmf-hostile-flood",
        "[nvmf]\nmax_connections = 400\nmax_connections_per_host = 200\nhandshake_timeout_ms = 60000\n",
    );
    let v = victim(addr); // 2 connections
    let base = rss(&d);
    let f = nvmf::flood(addr, 1000, Duration::from_secs(5));
    assert_eq!(
        (f.held.len(), f.refused, f.failed),
        (198, 1000 - 198, 0),
        "accepted up to the per-host limit"
    );
    after("1000 connections", &mut d, &v, base);
    let s = stats(&d);
    let l = &s["nvmf"]["listeners"][0];
    assert_eq!(l["connections"], 200, "{s}");
    assert!(l["refused"].as_u64().unwrap() >= 802, "{s}");
    // The refusals are logged a few times, not 800.
    let lines = d.log().lines().filter(|l| l.contains("refused:")).count();
    assert!(
        (1..=30).contains(&lines),
        "{lines} refusal lines in the log"
    );
    // An accepted connection works: ICReq, Connect, I/O.
    drop(f);
    std::thread::sleep(Duration::from_millis(500));
    let mut h = Host::connect(addr, NQN, ATTACKER, 1, 32, false).expect("connect after the flood");
    let (c, _) = h.io[0].cmd(Sqe::read(1, 0, 8), None, 4096).unwrap();
    assert!(c.ok());
    v.finish().expect("the victim saw no error");
}

#[test]
fn slow_handshakes_and_stalls_are_cut() {
    watchdog(300);
    let (mut d, addr) = setup(
        "nvmf-hostile-slow",
        "[nvmf]\nhandshake_timeout_ms = 1500\nstall_timeout_ms = 1500\n",
    );
    let v = victim(addr);
    let base = rss(&d);
    // An ICReq and a Connect (1224 bytes) at 1 byte/s, and at 10 bytes/s: cut at the
    // handshake timeout, however steadily the bytes come.
    for every in [Duration::from_secs(1), Duration::from_millis(100)] {
        let t = nvmf::slow_handshake(addr, NQN, ATTACKER, every, Duration::from_secs(20))
            .expect("slow")
            .expect("closed");
        assert!(
            t >= Duration::from_millis(1400) && t < Duration::from_secs(5),
            "a byte every {every:?}: closed after {t:?}"
        );
    }
    // A TCP connection that says nothing.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let t = time_to_close(&mut s, Duration::from_secs(20)).expect("closed");
    assert!(
        t < Duration::from_secs(5),
        "silent connection closed after {t:?}"
    );
    after("slow handshake", &mut d, &v, base);

    // Connected, then half a capsule: the stall timeout.
    let mut q = nvmf::enabled_admin(addr, NQN, ATTACKER).expect("admin");
    let cap = nvmf::capsule(Sqe::new(0x06, 0).cdw(10, 1), 9, 4096, 0x5a, &[]);
    q.raw(&cap[..40]).unwrap();
    let t = time_to_close(&mut q.stream(), Duration::from_secs(20)).expect("closed");
    assert!(t < Duration::from_secs(5), "half a PDU: closed after {t:?}");
    // An R2T whose data stops half-way.
    let r = nvmf::h2c_game(addr, NQN, ATTACKER, H2cGame::Stall).expect("game");
    assert!(r.ended(), "R2T data stalled: {r:?}");
    // A host that does not read: 127 reads of 128 KiB pipelined (more than the socket
    // buffers hold), nothing read back.
    let mut h = Host::connect(addr, NQN, ATTACKER, 1, 128, false).expect("connect");
    for _ in 0..127 {
        h.io[0]
            .send_cmd(Sqe::read(1, 0, 256), None, 128 << 10)
            .expect("send read");
    }
    let t = time_to_close(&mut h.admin.stream(), Duration::from_secs(1));
    assert!(t.is_none(), "still open while the host reads nothing yet");
    std::thread::sleep(Duration::from_secs(4));
    // Reading now finds what the socket held, then the end.
    let t = time_to_close(&mut h.io[0].stream(), Duration::from_secs(20));
    assert!(
        t.is_some(),
        "the connection whose host does not read was closed"
    );
    after("stalls", &mut d, &v, base);
    let s = stats(&d);
    assert!(
        s["nvmf"]["handshake_timeouts"].as_u64().unwrap() >= 2,
        "{s}"
    );
    assert!(s["nvmf"]["stall_timeouts"].as_u64().unwrap() >= 3, "{s}");
    v.finish().expect("the victim saw no error");
}

#[test]
fn a_silent_host_is_torn_down_after_kato() {
    watchdog(300);
    let (mut d, addr) = setup("nvmf-hostile-kato", "");
    let v = victim(addr);
    let base = rss(&d);
    // KATO 1 s, then silence on every queue: torn down at KATO + 1 s margin.
    let h = Host::connect_with(addr, NQN, ATTACKER, &opts(1000)).expect("connect");
    let t0 = Instant::now();
    let ta = time_to_close(&mut h.admin.stream(), Duration::from_secs(20)).expect("admin closed");
    let ti = time_to_close(&mut h.io[0].stream(), Duration::from_secs(5)).expect("I/O closed");
    assert!(
        t0.elapsed() >= Duration::from_millis(1900) && ta < Duration::from_secs(6),
        "torn down after {ta:?} (I/O queue {ti:?})"
    );
    // Traffic on an I/O queue alone keeps the controller (traffic-based keep alive).
    let mut h = Host::connect_with(addr, NQN, ATTACKER, &opts(1000)).expect("connect");
    let id = h.identify(1, 0).unwrap();
    assert_ne!(
        u32::from_le_bytes(id[96..100].try_into().unwrap()) & 1 << 6,
        0,
        "CTRATT.TBKAS"
    );
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let (c, _) = h.io[0].cmd(Sqe::read(1, 0, 8), None, 4096).expect("read");
        assert!(c.ok());
        std::thread::sleep(Duration::from_millis(200));
    }
    let (c, _) = h
        .admin
        .cmd(Sqe::new(0x18, 0), None, 0)
        .expect("still connected");
    assert!(c.ok());
    after("silent host", &mut d, &v, base);
    assert!(stats(&d)["nvmf"]["kato_expired"].as_u64().unwrap() >= 1);
    assert!(d.log().contains("keep-alive timeout"), "{}", d.log());
    v.finish().expect("the victim saw no error");
}

#[test]
fn discovery_policies() {
    watchdog(120);
    // Default: allow-list.
    let (d, addr) = setup("nvmf-hostile-disc", "");
    let e = Host::connect(addr, DISCOVERY_NQN, STRANGER, 0, 0, false)
        .err()
        .expect("unknown host refused");
    assert!(e.contains("sc 0x84"), "{e}");
    let mut h = Host::connect(addr, DISCOVERY_NQN, VICTIM, 0, 0, false).expect("allowed");
    assert_eq!(h.discovery_log().unwrap().len(), 1);
    assert_eq!(stats(&d)["nvmf"]["discovery"], "allow-list");
    drop(d);
    for (policy, stranger_ok, allowed_ok) in [("open", true, true), ("closed", false, false)] {
        let (d, addr) = setup(
            &format!("nvmf-hostile-disc-{policy}"),
            &format!("[nvmf]\ndiscovery = \"{policy}\"\n"),
        );
        let s = Host::connect(addr, DISCOVERY_NQN, STRANGER, 0, 0, false);
        assert_eq!(s.is_ok(), stranger_ok, "{policy}: stranger");
        if let Ok(mut h) = s {
            assert!(
                h.discovery_log().unwrap().is_empty(),
                "lists nothing for a stranger"
            );
        }
        let a = Host::connect(addr, DISCOVERY_NQN, VICTIM, 0, 0, false);
        assert_eq!(a.is_ok(), allowed_ok, "{policy}: allowed host");
        // The subsystem itself is unaffected.
        let mut h = Host::connect(addr, NQN, VICTIM, 1, 32, false).expect("subsystem");
        assert!(h.io[0].cmd(Sqe::read(1, 0, 8), None, 4096).unwrap().0.ok());
        drop(d);
    }
}

#[test]
fn memory_budget_makes_hosts_wait_not_fail() {
    watchdog(300);
    // 1 MiB per connection: 64 reads of 128 KiB in flight need 8 MiB, so the connection
    // must wait for its own reads to be sent before starting more.
    let (mut d, addr) = setup(
        "nvmf-hostile-mem",
        "[network]\nmemory_budget = \"64M\"\n[nvmf]\nmemory_per_connection = \"1M\"\n",
    );
    let v = victim(addr);
    let base = rss(&d);
    let mut h = Host::connect(addr, NQN, ATTACKER, 1, 128, false).expect("connect");
    let data = common::pattern(3, 128 << 10);
    let (c, _) = h.io[0]
        .cmd(Sqe::write(1, 4096, 256), Some(&data), 0)
        .unwrap();
    assert!(c.ok());
    for round in 0..3 {
        let mut cids = Vec::new();
        for _ in 0..64 {
            cids.push(
                h.io[0]
                    .send_cmd(Sqe::read(1, 4096, 256), None, 128 << 10)
                    .unwrap(),
            );
        }
        // And writes by R2T, which wait for a buffer before their R2T goes out.
        for _ in 0..16 {
            cids.push(
                h.io[0]
                    .send_cmd(Sqe::write(1, 4096, 256), Some(&data), 0)
                    .unwrap(),
            );
        }
        for _ in 0..cids.len() {
            let (c, back) = h.io[0].next_completion().expect("completion");
            assert!(c.ok(), "round {round}: status {:#x}", c.status);
            if !back.is_empty() {
                assert!(back == data, "round {round}: read data");
            }
        }
    }
    after("memory budget", &mut d, &v, base);
    let s = stats(&d);
    assert!(s["nvmf"]["memory_waits"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["network"]["memory_used"].as_u64().unwrap() <= 64 << 20,
        "{s}"
    );
    v.finish().expect("the victim saw no error");
    drop(h);
    std::thread::sleep(Duration::from_millis(500));
    let used = stats(&d)["network"]["memory_used"].as_u64().unwrap();
    assert!(
        used < 1 << 20,
        "memory comes back when connections close: {used}"
    );
    let _ = Queue::open(addr, false, false);
}
