//! `nvmux bench --restart`: the longest I/O pause a vhost-user client sees (a) while
//! `nvmux upgrade` hands the daemon to a second copy of its binary, and (b) when the
//! daemon is killed with SIGKILL and started again.
//!
//! A libblkio client keeps QD16 of 4 KiB random writes in flight on a file disk and
//! records every request's completion latency. (a) The pause of an upgrade is the longest
//! latency of the requests in flight during the `POST /v1/upgrade` call. (b) libblkio
//! does not reconnect, so a killed daemon strands its requests for ever: what is measured
//! is the time from SIGKILL to the first completed write of a client that connects again
//! as soon as the restarted daemon's socket answers (a lower bound of what a QEMU guest
//! sees: QEMU's `reconnect=` adds its own delay, at least 1 s).

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{BlkioClient, Op, Req};
use blkio::{Completion, ReqFlags};
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::Res;
use crate::run::BenchArgs;

const QD: usize = 16;
const BS: usize = 4096;
const UPGRADES: usize = 5;

/// (submitted, completed) of every completed request, relative to `t0`.
type Log = Arc<Mutex<Vec<(Duration, Duration)>>>;

fn writer(sock: PathBuf, t0: Instant, stop: Arc<AtomicBool>, log: Log) -> Result<u64, String> {
    let mut c = BlkioClient::connect(&sock, 1, false, QD * BS)?;
    let blocks = c.capacity() / BS as u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut submitted = [Duration::ZERO; QD];
    let mut out: Vec<MaybeUninit<Completion>> = (0..QD).map(|_| MaybeUninit::uninit()).collect();
    let mut issue = |c: &mut BlkioClient, tag: usize, submitted: &mut [Duration; QD]| {
        submitted[tag] = t0.elapsed();
        c.enqueue(
            0,
            Req {
                op: Op::Write,
                offset: next(blocks) * BS as u64,
                len: BS,
                buf_off: tag * BS,
            },
            tag,
            ReqFlags::empty(),
        );
    };
    for tag in 0..QD {
        issue(&mut c, tag, &mut submitted);
    }
    let mut done = 0u64;
    let mut local = Vec::with_capacity(1 << 16);
    while !stop.load(Ordering::Acquire) {
        let n = c.reap(0, &mut out, 1, Duration::from_secs(5))?;
        let now = t0.elapsed();
        for o in out.iter().take(n) {
            // SAFETY: reap returned n, so libblkio initialised the first n.
            let cmp = unsafe { o.assume_init_read() };
            if cmp.ret != 0 {
                return Err(format!("write failed: {}", cmp.ret));
            }
            let tag = cmp.user_data % QD;
            local.push((submitted[tag], now));
            done += 1;
            issue(&mut c, tag, &mut submitted);
        }
        if local.len() >= 1 << 16 {
            log.lock().map_err(|_| "log")?.append(&mut local);
        }
    }
    log.lock().map_err(|_| "log")?.append(&mut local);
    // Let the last requests finish before the client goes.
    let mut left = QD;
    while left > 0 {
        match c.reap(0, &mut out, 1, Duration::from_secs(5)) {
            Ok(n) => left = left.saturating_sub(n),
            Err(_) => break,
        }
    }
    Ok(done)
}

/// The longest latency of the requests that were in flight at any time in [a, b].
fn max_latency(log: &[(Duration, Duration)], a: Duration, b: Duration) -> Option<Duration> {
    log.iter()
        .filter(|(s, e)| *s <= b && *e >= a)
        .map(|(s, e)| e.saturating_sub(*s))
        .max()
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: &BenchArgs, server_cpu: Option<usize>) -> Res<()> {
    let work = std::env::temp_dir().join(format!("nvmux-bench-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let r = run_in(a, &work, server_cpu);
    let _ = std::fs::remove_dir_all(&work);
    r
}

fn run_in(a: &BenchArgs, work: &Path, server_cpu: Option<usize>) -> Res<()> {
    let (ddir, d) = Daemon::start_bench(work, server_cpu, "")?;
    let img =
        PathBuf::from("/dev/shm").join(format!("nvmux-bench-restart-{}.img", std::process::id()));
    let _g = RemoveOnDrop(img.clone());
    let sock = ddir.join("r.sock");
    d.api().post(
        "/v1/disks",
        &json!({"name": "r", "backend": "file", "path": img, "size": 256u64 << 20}),
    )?;
    d.api().post(
        "/v1/exports",
        &json!({"disk": "r", "socket": sock, "num_queues": 1}),
    )?;
    let exe = std::env::current_exe()?;
    let bins = [work.join("nvmux-a"), work.join("nvmux-b")];
    for b in &bins {
        std::fs::copy(&exe, b)?;
    }

    // (a) upgrades under load.
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let log: Log = Arc::default();
    let (s2, l2, k2) = (stop.clone(), log.clone(), sock.clone());
    let client = std::thread::spawn(move || writer(k2, t0, s2, l2));
    std::thread::sleep(Duration::from_secs(1));
    let mut windows = Vec::new();
    let mut pid = d.pid();
    for i in 0..UPGRADES {
        let a0 = t0.elapsed();
        let v = d.api().post(
            "/v1/upgrade",
            &json!({"binary": bins[i % 2], "timeout_ms": 30000}),
        )?;
        let a1 = t0.elapsed();
        let old = pid;
        pid = v["pid"].as_u64().ok_or("no pid in the upgrade reply")? as u32;
        let t = Instant::now();
        while alive(old) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        windows.push((a0, a1, v["pause_ms"].as_f64().unwrap_or(0.0)));
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Release);
    let writes = client.join().map_err(|_| "client thread panicked")??;
    let l = log.lock().map_err(|_| "log")?.clone();
    let base = l
        .iter()
        .filter(|(s, e)| windows.iter().all(|(a, b, _)| *e < *a || *s > *b))
        .map(|(s, e)| e.saturating_sub(*s))
        .max()
        .unwrap_or_default();
    let up: Vec<(f64, f64)> = windows
        .iter()
        .map(|(a, b, p)| (max_latency(&l, *a, *b).map_or(0.0, ms), *p))
        .collect();

    // (b) SIGKILL and a restart, with a client that connects again.
    let stop = Arc::new(AtomicBool::new(false));
    let log2: Log = Arc::default();
    let t1 = Instant::now();
    let (s2, l2, k2) = (stop.clone(), log2.clone(), sock.clone());
    let stranded = std::thread::spawn(move || writer(k2, t1, s2, l2));
    std::thread::sleep(Duration::from_secs(1));
    let k0 = Instant::now();
    // SAFETY: killing the daemon this benchmark started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    while alive(pid) {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(&ddir)
        .arg("--config")
        .arg(ddir.join("nvmux.toml"));
    let mut proc =
        crate::procs::spawn_pinned("nvmux serve", cmd, server_cpu, &ddir.join("daemon.log"))?;
    let mut c = loop {
        if let Ok(c) = BlkioClient::connect(&sock, 1, false, BS) {
            break c;
        }
        if !proc.alive() || k0.elapsed() > Duration::from_secs(30) {
            return Err("the restarted daemon did not serve its socket within 30 s".into());
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let serving = k0.elapsed();
    c.io_ok(0, Op::Write, 0, BS, 0, ReqFlags::empty())?;
    let first = k0.elapsed();
    drop(c);
    stop.store(true, Ordering::Release);
    // The stranded client's requests never complete: its reap times out.
    let stranded = stranded.join().map_err(|_| "client thread panicked")?;

    println!(
        "\nI/O pause seen by a libblkio client (4 KiB random writes, QD{QD}, file on /dev/shm)\n"
    );
    println!("| event | longest completion latency | daemon's own pause |");
    println!("|---|---|---|");
    println!(
        "| no event (baseline, {writes} writes) | {:.2} ms | - |",
        ms(base)
    );
    for (i, (lat, p)) in up.iter().enumerate() {
        println!("| `nvmux upgrade` #{} | {lat:.2} ms | {p:.2} ms |", i + 1);
    }
    println!(
        "| kill -9 + restart | ∞ for the {QD} requests in flight (libblkio does not reconnect: {}) | socket served again after {:.1} ms; a new client's first write done after {:.1} ms |",
        match &stranded {
            Ok(_) => "they completed".to_string(),
            Err(e) => format!("\"{e}\""),
        },
        ms(serving),
        ms(first)
    );
    let worst = up.iter().map(|(l, _)| *l).fold(0.0, f64::max);
    println!("\nlongest upgrade pause: {worst:.2} ms (goal: under 50 ms)");
    std::fs::create_dir_all(&a.out)?;
    std::fs::write(
        a.out.join("restart.json"),
        serde_json::to_string_pretty(&json!({
            "kind": "restart",
            "queue_depth": QD,
            "baseline_max_ms": ms(base),
            "upgrades": up.iter().map(|(l, p)| json!({"max_latency_ms": l, "daemon_pause_ms": p})).collect::<Vec<_>>(),
            "kill9": {"socket_served_ms": ms(serving), "first_write_ms": ms(first), "stranded_requests": QD},
        }))?,
    )?;
    let _ = proc.stop();
    Ok(())
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
