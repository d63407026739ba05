//! Hostile NBD clients against the real daemon, with its limits configured: 1000
//! connections from one address, a memory budget that back-pressures big requests,
//! 1 byte/s and silent handshakes, clients that stop mid-request or stop reading replies,
//! and 4 GiB requests. After each, the daemon is alive, its RSS stayed bounded, and
//! another client's I/O (fio with verification, nbdinfo) went on. The attacks live in
//! `nvmux_bench::attack::nbd`, shared with the attacker suite (`hostile.rs`) and
//! `nvmux bench --hostile`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{psk_file, unique_dir, watchdog, TestDaemon};
use nvmux_bench::attack::nbd::{self, Reply, Target};
use nvmux_bench::attack::{self, time_to_close};
use serde_json::{json, Value};

/// RSS growth allowed during an attack.
const RSS_SLACK: u64 = 256 << 20;

fn daemon(tag: &str, toml: &str) -> TestDaemon {
    let dir = unique_dir(tag);
    let cfg = dir.join("nvmux.toml");
    std::fs::write(&cfg, toml).unwrap();
    TestDaemon::start_with(dir, &["--config", cfg.to_str().unwrap()])
}

fn rss(d: &TestDaemon) -> u64 {
    attack::rss_bytes(d.pid()).expect("the daemon's RSS")
}

fn listener(d: &TestDaemon, address: &str) -> Value {
    let v = d.api.get("/v1/nbd").unwrap();
    v["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["address"] == address).cloned())
        .unwrap_or_else(|| panic!("no listener {address} in {v}"))
}

fn tcp_target(v: &Value) -> (Target, String) {
    let a = v["listen"].as_str().expect("bound address").to_string();
    (Target::Tcp(a.parse().unwrap()), a)
}

/// fio with verification on an NBD URI, in the background.
fn fio_verify(uri: &str, seed: u32) -> Child {
    Command::new("fio")
        .args([
            "--name=victim",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
        ])
        .args([
            "--size=24M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
        ])
        .args(["--verify_fatal=1", "--minimal"])
        .arg(format!("--randseed={seed}"))
        .arg(format!("--uri={uri}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio")
}

fn finish(c: Child) {
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "the victim's fio failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn unix_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

fn wait_for(what: &str, max: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < max, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_thousand_connections_are_refused_beyond_the_limits_and_the_victim_keeps_its_io() {
    watchdog(300);
    attack::raise_fd_limit();
    let mut d = daemon(
        "nbd-flood",
        "[nbd]\nmax_connections = 300\nmax_connections_per_host = 200\nhandshake_timeout_ms = 120000\n",
    );
    d.file_disk("victim", 64 << 20);
    d.file_disk("target", 64 << 20);
    let vsock = d.dir.join("victim.sock");
    d.nbd_export(json!({"disk": "victim", "socket": vsock}));
    let tv = d.nbd_export(json!({"disk": "target", "listen": "127.0.0.1:0"}));
    let (tcp, taddr) = tcp_target(&tv);
    let usock = d.dir.join("target.sock");
    d.nbd_export(json!({"disk": "target", "name": "target-unix", "socket": usock}));
    let unix = Target::Unix(usock.clone());
    let base = rss(&d);
    let fio = fio_verify(&unix_uri(&vsock, "victim"), 1);
    // 1000 connections from one address: the per-host limit admits 200.
    let f = nbd::flood(&tcp, 1000, Duration::from_secs(10));
    assert_eq!(
        (f.held.len(), f.refused + f.failed),
        (200, 800),
        "per-host limit"
    );
    // 1000 on the Unix socket from one user: the per-peer limit counts user ids there.
    let g = nbd::flood(&unix, 1000, Duration::from_secs(10));
    assert_eq!(
        (g.held.len(), g.refused + g.failed),
        (200, 800),
        "per-uid limit"
    );
    // Half of the held connections negotiate a real export (they then hold buffers) ...
    let mut held = f.held;
    for s in held.iter_mut().take(100) {
        nbd::go(s, "target").expect("an admitted connection negotiates");
    }
    let l = listener(&d, &taddr);
    assert_eq!(l["connections"], 200, "{l}");
    assert_eq!(l["refused"], 800, "{l}");
    // ... and the victim's I/O goes on meanwhile, on another listener.
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(unix_uri(&vsock, "victim"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    finish(fio);
    let peak = rss(&d);
    assert!(
        peak < base + RSS_SLACK,
        "RSS grew from {base} to {peak} bytes"
    );
    // Refusals were logged once per burst, not once per connection.
    let refusals = d.log().matches("connection refused").count();
    assert!(refusals <= 4, "{refusals} refusal lines");
    // Everything comes back when the attacker leaves.
    drop(held);
    drop(g);
    wait_for("the connections to close", Duration::from_secs(20), || {
        listener(&d, &taddr)["connections"] == 0
            && listener(&d, usock.to_str().unwrap())["connections"] == 0
    });
    assert!(d.healthy());
    let m = Command::new(env!("CARGO_BIN_EXE_nvmux"))
        .arg("--api")
        .arg(d.dir.join("nvmux.sock"))
        .arg("metrics")
        .output()
        .unwrap();
    let m = String::from_utf8_lossy(&m.stdout);
    assert!(
        m.contains(&format!(
            "nvmux_nbd_connections_refused_total{{listener=\"{taddr}\"}} 800"
        )),
        "{m}"
    );
    d.stop();
    // Without a per-peer limit, the listener's total still holds.
    let d = daemon(
        "nbd-flood-total",
        "[nbd]\nmax_connections = 100\nmax_connections_per_host = 0\nhandshake_timeout_ms = 120000\n",
    );
    d.file_disk("target", 8 << 20);
    let tv = d.nbd_export(json!({"disk": "target", "listen": "127.0.0.1:0"}));
    let (tcp, _) = tcp_target(&tv);
    let f = nbd::flood(&tcp, 1000, Duration::from_secs(10));
    assert_eq!(
        (f.held.len(), f.refused + f.failed),
        (100, 900),
        "total limit"
    );
    drop(f);
    d.stop();
}

#[test]
fn big_requests_wait_for_memory_within_the_budget() {
    watchdog(300);
    // A small daemon-wide budget (64 MiB) and the smallest per-connection one (33 MiB):
    // one 32 MiB request at a time fits.
    let mut d = daemon(
        "nbd-budget",
        "[network]\nmemory_budget = \"64M\"\n[nbd]\nmemory_per_connection = \"33M\"\nstall_timeout_ms = 2000\n",
    );
    d.file_disk("target", 128 << 20);
    let tv = d.nbd_export(json!({"disk": "target", "listen": "127.0.0.1:0"}));
    let (t, taddr) = tcp_target(&tv);
    assert_eq!(listener(&d, &taddr)["max_io"], 32 << 20);
    let base = rss(&d);
    // Eight clients each start a 32 MiB write and send 4 MiB of it.
    let mut held: Vec<nbd::Stream> = (0..8)
        .map(|_| nbd::partial_request(&t, "target", 32 << 20, 28 + (4 << 20)).expect("attack"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let v = d.api.get("/v1/stats").unwrap();
    let used = v["network"]["memory_used"].as_u64().unwrap();
    assert!(used <= 64 << 20, "{v}");
    assert!(
        listener(&d, &taddr)["memory_waits"].as_u64() > Some(0),
        "{v}"
    );
    assert!(rss(&d) < base + RSS_SLACK);
    // The stall timeout ends them one after the other (each waited for memory, then for
    // the rest of its payload); the memory comes back whole.
    for s in held.iter_mut() {
        assert!(
            time_to_close(s, Duration::from_secs(60)).is_some(),
            "a stalled write was not cut"
        );
    }
    wait_for("the budget to empty", Duration::from_secs(10), || {
        d.api.get("/v1/stats").unwrap()["network"]["memory_used"] == 0
    });
    assert!(listener(&d, &taddr)["stalls"].as_u64() >= Some(8));
    // A well-behaved client gets the whole maximum afterwards.
    let fio = Command::new("fio")
        .args(["--name=big", "--ioengine=nbd", "--rw=write", "--bs=32m"])
        .args([
            "--size=64M",
            "--iodepth=2",
            "--verify=crc32c",
            "--do_verify=1",
        ])
        .arg(format!("--uri=nbd://{taddr}/target"))
        .output()
        .unwrap();
    assert!(
        fio.status.success(),
        "{}",
        String::from_utf8_lossy(&fio.stderr)
    );
    assert!(d.healthy());
    d.stop();
}

#[test]
fn slow_silent_and_stalled_clients_are_cut_by_the_timeouts() {
    watchdog(300);
    let mut d = daemon(
        "nbd-slow",
        "[nbd]\nhandshake_timeout_ms = 1500\nstall_timeout_ms = 1500\n",
    );
    d.file_disk("target", 64 << 20);
    let tv = d.nbd_export(json!({"disk": "target", "listen": "127.0.0.1:0"}));
    let (t, taddr) = tcp_target(&tv);
    let psk = psk_file(&d.dir.join("psk"), "alice");
    let tlsv = d.nbd_export(
        json!({"disk": "target", "name": "tls", "listen": "127.0.0.1:0", "tls": {"psk_file": psk}}),
    );
    let (tls, _) = tcp_target(&tlsv);
    // An idle, well-behaved connection is not cut.
    let mut idle = nbd::connect_go(&t, "target").unwrap();
    let base = rss(&d);
    let cut = |what: &str, took: Option<Duration>| {
        let took = took.unwrap_or_else(|| panic!("{what}: still open"));
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_secs(15),
            "{what}: closed after {took:?}"
        );
    };
    // 1 byte/s: cut at the handshake deadline however steadily bytes come.
    cut(
        "1 byte/s handshake",
        nbd::slow_handshake(
            &t,
            "target",
            Duration::from_secs(1),
            Duration::from_secs(20),
        )
        .expect("slow handshake"),
    );
    // Connect and never speak.
    let mut s = t.connect().unwrap();
    cut(
        "silent client",
        time_to_close(&mut s, Duration::from_secs(20)),
    );
    // STARTTLS, then no TLS handshake: the deadline covers TLS too.
    let mut s = tls.connect().unwrap();
    let t0 = Instant::now();
    assert!(nbd::greeting(&mut s, Duration::from_secs(5)));
    let mut v = 1u32.to_be_bytes().to_vec();
    v.extend(nbd::option(nbd::OPT_STARTTLS, &[]));
    std::io::Write::write_all(&mut s, &v).unwrap();
    assert_eq!(nbd::option_reply(&mut s).unwrap().0, 1, "STARTTLS ACK");
    time_to_close(&mut s, Duration::from_secs(20)).expect("stuck TLS handshake cut");
    cut("stuck TLS handshake", Some(t0.elapsed()));
    // Half a request header, then nothing.
    let mut s = nbd::partial_request(&t, "target", 4096, 10).unwrap();
    let t0 = Instant::now();
    time_to_close(&mut s, Duration::from_secs(20)).expect("partial header cut");
    cut("partial header", Some(t0.elapsed()));
    // A write whose payload stops.
    let mut s = nbd::partial_request(&t, "target", 1 << 20, 28 + 1000).unwrap();
    let t0 = Instant::now();
    time_to_close(&mut s, Duration::from_secs(20)).expect("partial payload cut");
    cut("partial payload", Some(t0.elapsed()));
    // Reads whose replies are never read: the server's output backs up; the stall timeout
    // ends that connection (the counters show it without reading a byte).
    let before = listener(&d, &taddr)["stalls"].as_u64().unwrap();
    let s = nbd::unread_replies(&t, "target", 256, 1 << 20).unwrap();
    wait_for(
        "the unread connection to be cut",
        Duration::from_secs(20),
        || listener(&d, &taddr)["stalls"].as_u64().unwrap() > before,
    );
    drop(s);
    let l = listener(&d, &taddr);
    assert!(l["handshake_timeouts"].as_u64() >= Some(2), "{l}");
    assert!(l["stalls"].as_u64() >= Some(3), "{l}");
    // The idle connection still works.
    std::io::Write::write_all(&mut idle, &nbd::request(nbd::CMD_READ, 5, 0, 4096)).unwrap();
    assert_eq!(
        nbd::reply(&mut idle, Duration::from_secs(20)),
        Reply::Simple {
            error: 0,
            cookie: 5
        }
    );
    assert!(rss(&d) < base + RSS_SLACK);
    assert!(d.healthy());
    d.stop();
}

#[test]
fn four_gib_requests_are_refused_without_allocating() {
    watchdog(120);
    let mut d = TestDaemon::start("nbd-4g");
    d.file_disk("target", 64 << 20);
    let sock: PathBuf = d.dir.join("t.sock");
    d.nbd_export(json!({"disk": "target", "socket": sock}));
    let t = Target::Unix(sock.clone());
    let base = rss(&d);
    // A 4 GiB read: EOVERFLOW, and the connection goes on.
    let mut s = nbd::connect_go(&t, "target").expect("negotiate");
    let r = nbd::huge_request(&mut s, nbd::CMD_READ, u32::MAX);
    assert!(
        matches!(
            r,
            Reply::Simple {
                error: nbd::EOVERFLOW,
                ..
            }
        ),
        "{r:?}"
    );
    // A 4 GiB write: the payload cannot be skipped safely; the connection ends without a
    // reply, and nothing was allocated for it.
    let mut s = nbd::connect_go(&t, "target").expect("negotiate");
    assert_eq!(
        nbd::huge_request(&mut s, nbd::CMD_WRITE, u32::MAX),
        Reply::Closed
    );
    for (kind, len) in [
        (nbd::CMD_WRITE, u32::MAX - 511),
        (nbd::CMD_READ, (32 << 20) + 512),
    ]
    .repeat(20)
    {
        if let Ok(mut s) = nbd::connect_go(&t, "target") {
            let _ = nbd::huge_request(&mut s, kind, len);
        }
    }
    assert!(rss(&d) < base + (64 << 20));
    let v = d.api.get("/v1/stats").unwrap();
    assert!(v["network"]["memory_used"].as_u64() < Some(2 << 20), "{v}");
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(unix_uri(&sock, "target"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(d.healthy());
    d.stop();
}
