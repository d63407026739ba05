//! `nvmux bench --hostile`: what a victim tenant sees while others attack the daemon.
//!
//! One daemon (one worker, on CPU 0) serves a victim disk over vhost-user, driven by
//! libblkio with verified 4 KiB writes and reads at queue depth 8 (the attacker suite's
//! victim, `crate::attack::Victim`, on CPU 1), and attackable endpoints: an
//! NVMe/TCP subsystem that admits the attacker's host NQN, and NBD exports on a Unix
//! socket and on loopback TCP. For each attack the victim's IOPS are measured at rest and
//! then while the attack runs for the same time (repeated for as long as the window
//! lasts, on CPU 1 too); the report gives the ratio. Attacks use the daemon's default
//! limits and timeouts, as an operator would run it.
//!
//! A ratio well below 1 means the attack costs other tenants throughput: on this 2-core
//! machine the attacker shares CPU 1 with the victim's client, so some drop is the
//! client's, not the daemon's. The victim's errors are reported too; there must be none.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::attack::nbd::{self, Target};
use crate::attack::{self, local, nvmf, time_to_close, Victim};
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::{write_report, Res};
use crate::run::BenchArgs;

const NQN: &str = "nqn.2026-12.io.nvmux:bench-hostile";
const MALLORY: &str = "nqn.2014-08.org.nvmexpress:uuid:6d616c6c-6f72-4079-8000-000000000666";
const DISCOVERY: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Where the attacks aim.
struct Targets {
    nvmf: SocketAddr,
    /// A vhost-user export for the front-end attacks.
    evil: std::path::PathBuf,
    nbd_unix: Target,
    nbd_tcp: Target,
}

type Attack = Box<dyn Fn(&Targets, &AtomicBool) + Send + Sync>;

/// Repeat `f` until `stop`.
fn repeat(f: impl Fn(&Targets) + Send + Sync + 'static) -> Attack {
    Box::new(move |t, stop| {
        while !stop.load(Ordering::Acquire) {
            f(t);
        }
    })
}

fn attacks() -> Vec<(&'static str, Attack)> {
    let w = Duration::from_secs(1);
    vec![
        (
            "NVMe/TCP Get Log Page NUMD 0xffffffff (discovery), repeated",
            repeat(|t| {
                if let Ok(mut q) = nvmf::enabled_admin(t.nvmf, DISCOVERY, MALLORY) {
                    let _ = nvmf::huge_log_page(&mut q, 0x70, u32::MAX);
                }
            }),
        ),
        (
            "NVMe/TCP Get Log Page NUMD 0xffffffff (admin), repeated",
            repeat(|t| {
                if let Ok(mut q) = nvmf::enabled_admin(t.nvmf, NQN, MALLORY) {
                    let _ = nvmf::huge_log_page(&mut q, 0x02, u32::MAX);
                }
            }),
        ),
        (
            "NVMe/TCP Identify with a 4 GiB SGL, repeated",
            repeat(|t| {
                if let Ok(mut q) = nvmf::enabled_admin(t.nvmf, NQN, MALLORY) {
                    let _ = nvmf::huge_admin_sgl(&mut q);
                }
            }),
        ),
        (
            "NVMe/TCP 4 GiB Connect data by R2T, repeated",
            repeat(|t| {
                let _ = nvmf::r2t_before_connect(t.nvmf, u32::MAX);
            }),
        ),
        (
            "NBD 4 GiB read and write, repeated (Unix socket)",
            repeat(|t| {
                if let Ok(mut s) = nbd::connect_go(&t.nbd_unix, "bait") {
                    let _ = nbd::huge_request(&mut s, nbd::CMD_READ, u32::MAX);
                    let _ = nbd::huge_request(&mut s, nbd::CMD_WRITE, u32::MAX);
                }
            }),
        ),
        (
            "1000 NVMe/TCP connections",
            repeat(move |t| {
                let f = nvmf::flood(t.nvmf, 1000, Duration::from_secs(5));
                std::thread::sleep(w);
                drop(f);
            }),
        ),
        (
            "1000 NBD connections (TCP)",
            repeat(move |t| {
                let f = nbd::flood(&t.nbd_tcp, 1000, Duration::from_secs(5));
                std::thread::sleep(w);
                drop(f);
            }),
        ),
        (
            "64 NVMe/TCP handshakes at 1 byte/s",
            parallel(64, |t| {
                let _ = nvmf::slow_handshake(t.nvmf, NQN, MALLORY, Duration::from_secs(1), SLOW);
            }),
        ),
        (
            "64 NBD handshakes at 1 byte/s (TCP)",
            parallel(64, |t| {
                let _ = nbd::slow_handshake(&t.nbd_tcp, "bait", Duration::from_secs(1), SLOW);
            }),
        ),
        (
            "200 half-open NVMe/TCP connections",
            repeat(|t| {
                let _ = attack::half_open(t.nvmf, 200, Duration::from_secs(2));
            }),
        ),
        (
            "vhost-user front-end truncating its guest memory, repeated",
            repeat(|t| {
                let _ = local::vhost_shrink_memory(&t.evil, Duration::from_millis(100));
            }),
        ),
        (
            "NBD client that never reads 64 MiB of replies",
            parallel(4, |t| {
                if let Ok(mut s) = nbd::unread_replies(&t.nbd_tcp, "bait", 64, 1 << 20) {
                    std::thread::sleep(SLOW);
                    let _ = time_to_close(&mut s, Duration::from_secs(5));
                }
            }),
        ),
    ]
}

/// Measurement window (per side) and how long one slow attack lasts before it is
/// started again.
const WINDOW_SECS: u64 = 3;
const SLOW: Duration = Duration::from_secs(3);

/// `n` copies of `f` at once, each in a thread, restarted until `stop`.
fn parallel(n: usize, f: fn(&Targets)) -> Attack {
    Box::new(move |t, stop| {
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| {
                    while !stop.load(Ordering::Acquire) {
                        f(t);
                    }
                });
            }
        });
    })
}

pub fn run(a: &BenchArgs, srv_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let (ddir, d) = Daemon::start_bench(&work, srv_cpu, "")?;
    let r = run_in(a, &ddir, &d);
    let how = d.stop();
    let _ = std::fs::remove_dir_all(&work);
    r?;
    eprintln!("daemon stopped: {how}");
    Ok(())
}

fn run_in(a: &BenchArgs, ddir: &Path, d: &Daemon) -> Res<()> {
    let api = d.api();
    let size = 256u64 << 20;
    api.post(
        "/v1/disks",
        &json!({"name": "victim", "path": ddir.join("victim.img"), "size": size}),
    )?;
    let vsock = ddir.join("victim.sock");
    api.post("/v1/exports", &json!({"disk": "victim", "socket": vsock}))?;
    api.post(
        "/v1/disks",
        &json!({"name": "bait", "path": ddir.join("bait.img"), "size": 64u64 << 20}),
    )?;
    let nvmf = d.nvmf_subsystem(NQN, MALLORY, "bait")?;
    let nbd_sock = ddir.join("bait-nbd.sock");
    api.post(
        "/v1/exports",
        &json!({"name": "bait-unix", "disk": "bait", "type": "nbd", "socket": nbd_sock, "export_name": "bait"}),
    )?;
    let v = api.post(
        "/v1/exports",
        &json!({"name": "bait-tcp", "disk": "bait", "type": "nbd", "listen": "127.0.0.1:0", "export_name": "bait"}),
    )?;
    let nbd_tcp: SocketAddr = v["listen"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or("the NBD export has no listen address")?;
    api.post(
        "/v1/disks",
        &json!({"name": "evil", "path": ddir.join("evil.img"), "size": 8u64 << 20}),
    )?;
    let evil = ddir.join("evil.sock");
    api.post("/v1/exports", &json!({"disk": "evil", "socket": evil}))?;
    let t = Arc::new(Targets {
        nvmf,
        evil,
        nbd_unix: Target::Unix(nbd_sock),
        nbd_tcp: Target::Tcp(nbd_tcp),
    });
    // The floods hold 1000 sockets at a time.
    attack::raise_fd_limit();
    let victim = Victim::vhost(&vsock)?;
    let pid = d.pid();
    let window = Duration::from_secs(if a.quick { 2 } else { WINDOW_SECS });
    std::thread::sleep(Duration::from_millis(500));
    let base_rss = attack::rss_bytes(pid)?;
    let mut rows = Vec::new();
    println!(
        "{:<62} {:>10} {:>10} {:>7} {:>8} {:>6}",
        "attack", "rest IOPS", "attack IOPS", "ratio", "RSS MiB", "errors"
    );
    for (name, atk) in attacks() {
        if a.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let rest = victim.iops_over(window);
        let stop = Arc::new(AtomicBool::new(false));
        let (t2, s2) = (t.clone(), stop.clone());
        let th = std::thread::spawn(move || atk(&t2, &s2));
        // Let the attack get going, then measure for the window.
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        let during = victim.iops_over(window);
        let mut peak = attack::rss_bytes(pid).unwrap_or(0);
        stop.store(true, Ordering::Release);
        while !th.is_finished() && t0.elapsed() < window * 10 {
            peak = peak.max(attack::rss_bytes(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = th.join();
        let c = victim.count();
        let ratio = if rest > 0.0 { during / rest } else { 0.0 };
        println!(
            "{:<62} {:>10.0} {:>10.0} {:>6.2}x {:>8} {:>6}",
            name,
            rest,
            during,
            ratio,
            peak >> 20,
            c.errors
        );
        rows.push(json!({
            "attack": name, "rest_iops": rest, "attack_iops": during, "ratio": ratio,
            "peak_rss_bytes": peak, "victim_errors": c.errors,
        }));
    }
    let victim_error = victim.first_error();
    let c = victim.stop();
    println!(
        "victim: {} verified operations, {} errors; daemon RSS baseline {} MiB",
        c.ops,
        c.errors,
        base_rss >> 20
    );
    if c.errors > 0 {
        eprintln!("the victim saw errors: {:?}", victim_error);
    }
    std::fs::create_dir_all(&a.out)?;
    write_report(
        &a.out,
        "hostile.json",
        "hostile",
        window.as_secs(),
        json!(rows),
    )?;
    Ok(())
}
