//! Shared pieces of the NVMe/TCP host tests: an nvmux target on a MemoryDevice, a TCP
//! proxy that can be cut (a path that dies with its listener and live connections), and a
//! driver that runs commands through a `BlockQueue` with a bounded wait.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmux_backend::MemoryDevice;
use nvmux_core::stats::DiskStats;
use nvmux_core::worker::{WorkerConfig, WorkerPool};
use nvmux_core::{AlignedBuf, BlockDevice, BlockQueue, IoCommand, Opcode, Status};
use nvmux_nvmf::{Namespace, Subsystem, Target, TargetConfig};

pub const NQN: &str = "nqn.2026-12.io.nvmux:host-test";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427";
pub const DEV_SIZE: u64 = 64 << 20;

pub struct TestTarget {
    pub target: Target,
    pub addr: SocketAddr,
    pub sub: Arc<Subsystem>,
    _pool: WorkerPool,
}

pub fn target() -> TestTarget {
    let pool = WorkerPool::new(&WorkerConfig {
        threads: 2,
        ..WorkerConfig::default()
    })
    .expect("workers");
    let target = Target::new(pool.placement(), TargetConfig::default());
    let sub = Subsystem::new(NQN, "hosttest");
    sub.set_hosts(true, BTreeSet::new());
    let dev: Arc<dyn BlockDevice> =
        Arc::new(MemoryDevice::new(DEV_SIZE, 4096, false).expect("memory device"));
    sub.add_namespace(Namespace {
        nsid: 1,
        disk: "m".into(),
        dev,
        stats: Arc::new(DiskStats::default()),
        nguid: [7; 16],
    })
    .expect("namespace");
    let addr = target
        .add(sub.clone(), "127.0.0.1:0".parse().unwrap())
        .expect("listen");
    TestTarget {
        target,
        addr,
        sub,
        _pool: pool,
    }
}

/// A TCP proxy in front of `upstream`; `cut` closes its listener and every live
/// connection (both directions), as a failed network path would.
pub struct Proxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(bind: SocketAddr, upstream: SocketAddr) -> Proxy {
        let l = TcpListener::bind(bind).expect("proxy bind");
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (st, cs) = (stop.clone(), conns.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((down, _)) => {
                        down.set_nonblocking(false).ok();
                        let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2))
                        else {
                            continue;
                        };
                        up.set_nodelay(true).ok();
                        down.set_nodelay(true).ok();
                        {
                            let mut g = cs.lock().unwrap();
                            g.push(down.try_clone().unwrap());
                            g.push(up.try_clone().unwrap());
                        }
                        if st.load(Ordering::Acquire) {
                            let _ = down.shutdown(Shutdown::Both);
                            let _ = up.shutdown(Shutdown::Both);
                        }
                        for (mut a, mut b) in [
                            (down.try_clone().unwrap(), up.try_clone().unwrap()),
                            (up, down),
                        ] {
                            std::thread::spawn(move || {
                                let mut buf = vec![0u8; 256 << 10];
                                loop {
                                    match a.read(&mut buf) {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => {
                                            if b.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                    }
                                }
                                let _ = a.shutdown(Shutdown::Both);
                                let _ = b.shutdown(Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { addr, stop, conns }
    }

    pub fn cut(&self) {
        self.stop.store(true, Ordering::Release);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        // The listener closes within one accept poll.
        std::thread::sleep(Duration::from_millis(30));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Wait (bounded) until `q` has completions, then poll.
pub fn wait_poll(q: &mut dyn BlockQueue, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
    q.kick();
    let n = q.poll(done);
    if n > 0 {
        return n;
    }
    // A reused vector: waiting allocates nothing (the zero-allocation test runs this).
    thread_local!(static FDS: std::cell::RefCell<Vec<i32>> = std::cell::RefCell::new(Vec::with_capacity(8)));
    let mut fds = [-1; 4];
    FDS.with(|v| {
        let mut v = v.borrow_mut();
        v.clear();
        q.wait_fds(&mut v);
        for (d, s) in fds.iter_mut().zip(v.iter()) {
            *d = *s;
        }
    });
    let mut ms = 100;
    if let Some(d) = q.next_deadline() {
        ms = ms.min(d.saturating_duration_since(Instant::now()).as_millis() as i32 + 1);
    }
    let mut p = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 4];
    for (p, fd) in p.iter_mut().zip(fds) {
        p.fd = fd;
    }
    // SAFETY: a valid array of pollfds (unused ones have fd -1).
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    q.poll(done)
}

/// Run one command to completion (bounded by `limit`).
pub fn run_one(q: &mut dyn BlockQueue, cmd: IoCommand, limit: Duration) -> Status {
    q.submit(cmd);
    let t = Instant::now();
    let mut st = None;
    while st.is_none() {
        assert!(
            t.elapsed() < limit,
            "command did not complete within {limit:?}"
        );
        wait_poll(q, &mut |_, s| st = Some(s));
    }
    st.unwrap()
}

pub fn io(op: Opcode, slba: u64, buf: &AlignedBuf, tag: u64) -> IoCommand {
    let nlb = (buf.len() / 4096) as u32;
    IoCommand::new(op, slba, nlb, tag, buf.sg(0, buf.len()))
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random writes and reads of 4K..128K at queue depth `qd` over disjoint 128 KiB
/// chunks, checked against a shadow copy. `between(i)` runs after every completion
/// (the tests cut paths there). Returns failed command count.
pub fn verify_workload(
    q: &mut dyn BlockQueue,
    shadow: &mut [u8],
    count: usize,
    qd: usize,
    seed: u64,
    limit: Duration,
    between: &mut dyn FnMut(usize),
) -> usize {
    const CHUNK: u64 = 128 << 10;
    let chunks = shadow.len() as u64 / CHUNK;
    let mut rng = Rng(seed);
    // (tag) -> (is_write, offset, buffer)
    let mut inflight: Vec<Option<(bool, u64, AlignedBuf, u64)>> = (0..qd).map(|_| None).collect();
    let mut busy = vec![false; chunks as usize];
    let (mut issued, mut completed, mut failed) = (0, 0, 0);
    let t0 = Instant::now();
    let mut results: Vec<(u64, Status)> = Vec::with_capacity(qd);
    while completed < count {
        assert!(
            t0.elapsed() < limit,
            "workload did not finish within {limit:?}"
        );
        while issued < count && inflight.iter().any(|s| s.is_none()) {
            let tag = inflight.iter().position(|s| s.is_none()).unwrap();
            let mut chunk = rng.next() % chunks;
            while busy[chunk as usize] {
                chunk = (chunk + 1) % chunks;
            }
            busy[chunk as usize] = true;
            let blocks = 1 + rng.next() % 32;
            let first = rng.next() % (32 - blocks + 1);
            let off = chunk * CHUNK + first * 4096;
            let len = (blocks * 4096) as usize;
            let write = rng.next().is_multiple_of(2);
            let mut buf = AlignedBuf::new(len);
            if write {
                let v = rng.next();
                for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
                    *b = (v >> (i % 8 * 8)) as u8 ^ i as u8;
                }
            }
            let op = if write { Opcode::Write } else { Opcode::Read };
            q.submit(io(op, off / 4096, &buf, tag as u64));
            inflight[tag] = Some((write, off, buf, chunk));
            issued += 1;
        }
        results.clear();
        wait_poll(q, &mut |c, s| results.push((c.tag, s)));
        for &(tag, st) in &results {
            let (write, off, buf, chunk) = inflight[tag as usize].take().expect("known tag");
            busy[chunk as usize] = false;
            completed += 1;
            let (o, l) = (off as usize, buf.len());
            if !st.is_ok() {
                failed += 1;
            } else if write {
                shadow[o..o + l].copy_from_slice(buf.as_slice());
            } else {
                assert!(
                    buf.as_slice() == &shadow[o..o + l],
                    "read at {off} returned wrong data"
                );
            }
            between(completed);
        }
    }
    failed
}
