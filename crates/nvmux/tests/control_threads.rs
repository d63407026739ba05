//! vhost-user exports share a few control threads (epoll), and a front-end that stalls
//! in the middle of a request holds up no other export on the same thread.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::*;
use nvmux_bench::client::{BlkioClient, Op};
use serde_json::json;

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// After the removals the thread count returns to `base` (+1: the control thread stays);
/// a short-lived API connection thread may still be ending, so wait for it a little.
fn threads_back_to(d: &TestDaemon, base: usize) {
    let t0 = Instant::now();
    while threads_of(d.pid()) > base + 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{} threads after the removals ({base} before anything): {:?}",
            threads_of(d.pid()),
            thread_names(d.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Threads of `pid` whose name starts with `prefix`.
fn named_threads(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| t.ok())
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

fn read_one(sock: &std::path::Path) {
    let mut c = BlkioClient::connect(sock, 1, false, 1 << 20).expect("connect");
    c.io_ok(0, Op::Read, 0, 4096, 0, ReqFlags::empty())
        .expect("read");
}

/// A 1 MiB null disk `name`.
fn null_disk(d: &TestDaemon, name: &str) {
    d.api
        .post(
            "/v1/disks",
            &json!({"name": name, "backend": "null", "size": 1u64 << 20}),
        )
        .expect("create disk");
}

/// A daemon with one worker and one control thread, in a new directory.
fn one_control_thread(tag: &str) -> (std::path::PathBuf, TestDaemon) {
    let dir = unique_dir(tag);
    let cfg = dir.join("nvmux.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[workers]\nthreads = 1\ncontrol_threads = 1\n",
            dir.display().to_string()
        ),
    )
    .expect("config");
    let d = TestDaemon::start_with(dir.clone(), &["--config", cfg.to_str().expect("path")]);
    (dir, d)
}

#[test]
fn many_exports_few_threads_and_a_stalled_front_end_holds_up_nobody() {
    watchdog(120);
    let (dir, d) = one_control_thread("ctlthreads");
    let base = threads_of(d.pid());
    const N: usize = 40;
    let mut socks = Vec::new();
    for i in 0..N {
        let name = format!("n{i}");
        null_disk(&d, &name);
        let sock = dir.join(format!("{name}.sock"));
        d.api
            .post("/v1/exports", &json!({"disk": name, "socket": sock}))
            .expect("export");
        socks.push(sock);
    }
    let after = threads_of(d.pid());
    // Short-lived threads (an API connection finishing, say) may come and go around
    // the two samples, so the bound is "far fewer than one per export", and the control
    // threads are counted by name.
    assert!(
        after < base + N / 4,
        "{N} exports took the daemon from {base} to {after} threads: a thread per export?"
    );
    assert_eq!(
        named_threads(d.pid(), "nvmux-ctl"),
        1,
        "one control thread serves all {N} exports"
    );

    // Export 0: a front-end sends half a request header and stalls.
    let mut stalled = UnixStream::connect(&socks[0]).expect("connect");
    stalled.write_all(&[1, 0, 0, 0, 1]).expect("partial header");
    // Export 1: a whole header announcing a body that never fully comes.
    let mut short = UnixStream::connect(&socks[1]).expect("connect");
    let mut msg = Vec::new();
    msg.extend_from_slice(&2u32.to_le_bytes()); // SET_FEATURES
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&[0, 0, 0]);
    short.write_all(&msg).expect("partial body");

    // Every other export, served by the same thread, works meanwhile.
    let t0 = Instant::now();
    for s in &socks[2..] {
        read_one(s);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the other exports waited on the stalled ones ({:?})",
        t0.elapsed()
    );

    // The stalled connections are closed after the message timeout (5 s)...
    for s in [&mut stalled, &mut short] {
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let mut b = [0u8; 16];
        // Closed with our bytes unread: a reset, or end of stream.
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the daemon should close the connection, got {other:?}"),
        }
    }
    // ... and their exports take the next client.
    read_one(&socks[0]);
    read_one(&socks[1]);
    assert!(d.log().contains("stayed incomplete"), "{}", d.log());

    // Removing the exports ends their tasks; the thread count is back.
    for i in 0..N {
        d.api
            .delete(&format!("/v1/exports/n{i}"))
            .expect("delete export");
    }
    threads_back_to(&d, base);
    d.stop();
}

/// NVMe/TCP listeners and external-function sockets are control tasks too: N of each add
/// no thread, and a function process that stalls in the middle of its hello holds up
/// neither another disk's function nor an NVMe/TCP connect; it is cut after the
/// handshake timeout (5 s).
#[test]
fn listeners_and_function_sockets_take_no_thread_each() {
    use nvmux_extfn::proto;
    watchdog(120);
    let (dir, d) = one_control_thread("ctlthreads-net");
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-4000-8000-0000000000c1";
    let base = threads_of(d.pid());
    const N: usize = 24;
    let mut addrs = Vec::new();
    let mut fsocks = Vec::new();
    for i in 0..N {
        let name = format!("n{i}");
        null_disk(&d, &name);
        let fsock = dir.join(format!("{name}-fn.sock"));
        d.api
            .post(
                &format!("/v1/disks/{name}/external"),
                &json!({"socket": fsock, "on_failure": "chain"}),
            )
            .expect("set external");
        fsocks.push(fsock);
        // Each subsystem on its own port: a listener each.
        let nqn = format!("nqn.2026-12.io.nvmux:ctl{i}");
        addrs.push((nqn.clone(), d.nvmf_subsystem(&nqn, &[HOST], &[&name])));
    }
    let after = threads_of(d.pid());
    assert!(
        after < base + N / 4,
        "{N} listeners and {N} function sockets took the daemon from {base} to {after} threads"
    );
    assert_eq!(named_threads(d.pid(), "nvmf-listen"), 0);
    assert_eq!(named_threads(d.pid(), "nvmux-extfn"), 0);
    assert_eq!(named_threads(d.pid(), "nvmux-ctl"), 1);

    // Disk 0: a process connects and sends half its hello.
    let mut stalled = UnixStream::connect(&fsocks[0]).expect("connect");
    let hello = proto::Hello {
        version: proto::VERSION,
        name: "stalled".into(),
    }
    .encode();
    stalled.write_all(&hello[..10]).expect("half a hello");
    std::thread::sleep(Duration::from_millis(100));

    // Meanwhile disk 1's function shakes hands and is attached, and an NVMe/TCP host
    // connects to the last subsystem.
    let t0 = Instant::now();
    let mut f = UnixStream::connect(&fsocks[1]).expect("connect");
    f.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let hello = proto::Hello {
        version: proto::VERSION,
        name: "prompt".into(),
    }
    .encode();
    f.write_all(&hello).expect("hello");
    let mut b = [0u8; proto::MSG_SIZE];
    f.read_exact(&mut b).expect("welcome");
    let w = proto::Welcome::decode(&b).expect("a welcome");
    assert_eq!(w.status, proto::WELCOME_OK);
    assert_eq!(w.disk, "n1");
    let v = d.api.get("/v1/disks/n1/classifier").expect("disk");
    assert_eq!(v["external"]["status"], "attached", "{v}");
    assert_eq!(v["external"]["function"], "prompt", "{v}");
    let (nqn, addr) = &addrs[N - 1];
    let h = nvmux_bench::nvmf::Host::connect(*addr, nqn, HOST, 1, 32, false).expect("nvmf");
    h.shutdown().expect("disconnect");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the stalled hello held up the others ({:?})",
        t0.elapsed()
    );

    // The stalled process is cut after the handshake timeout, unanswered.
    stalled
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    match stalled.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the daemon should close the stalled handshake, got {other:?}"),
    }
    assert!(d.log().contains("no hello within 5 s"), "{}", d.log());
    // Disk 1's function leaving is seen (its socket ends).
    drop(f);
    let t0 = Instant::now();
    while d.api.get("/v1/disks/n1/classifier").expect("disk")["external"]["status"] == "attached" {
        assert!(t0.elapsed() < Duration::from_secs(10), "detach not seen");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Removing subsystems and functions ends their tasks.
    for (i, (nqn, _)) in addrs.iter().enumerate() {
        d.api
            .delete(&format!("/v1/subsystems/{nqn}"))
            .expect("delete subsystem");
        d.api
            .delete(&format!("/v1/disks/n{i}/external"))
            .expect("delete external");
    }
    threads_back_to(&d, base);
    d.stop();
}

fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| t.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|c| c.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}
