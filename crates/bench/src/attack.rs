//! Hostile peers, and a victim that shows what another tenant sees meanwhile.
//!
//! Every function here does to a daemon what an attacker on one of its endpoints would
//! do (an NVMe/TCP host, an NBD client), waits a bounded time, and reports what the
//! daemon did in a short sentence. [`Victim`] keeps verified I/O going on another disk
//! through libblkio and counts what it completes. The attacker suite
//! (`crates/nvmux/tests/hostile.rs`) checks the outcomes and the victim; `nvmux bench
//! hostile` reports the victim's IOPS during each attack against its IOPS at rest.
//!
//! Nothing here waits for ever: every socket has a timeout, every loop a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::ReqFlags;

use nvmux_extfn::proto;

use crate::client::{BlkioClient, Op, Req};
use crate::nvmf::{Queue, Sqe};

pub type Res<T> = std::result::Result<T, String>;

// ---- the victim ------------------------------------------------------------------------

/// Verified 4 KiB random writes and reads on a vhost-user disk, from a thread of its own,
/// at queue depth 8: every block read back is checked against what was written there.
pub struct Victim {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

/// A snapshot of a victim's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VictimCount {
    pub ops: u64,
    pub errors: u64,
}

const VICTIM_QD: usize = 8;
const BLOCK: usize = 4096;

/// The contents of block `lba` after its `gen`-th write: the first 16 bytes name it.
fn victim_block(lba: u64, gen: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&lba.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    let mut x =
        lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ gen.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    for b in out[16..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

impl Victim {
    /// Connect to the vhost-user socket and start the I/O. Blocks until the first round
    /// completed (or fails with why it could not).
    pub fn start(socket: &Path) -> Res<Victim> {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let first_error = Arc::new(Mutex::new(None));
        let (tx, rx) = std::sync::mpsc::channel::<Res<()>>();
        let sock = socket.to_path_buf();
        let (st, op, er, fe) = (
            stop.clone(),
            ops.clone(),
            errors.clone(),
            first_error.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("victim".into())
            .spawn(move || victim_loop(&sock, st, op, er, fe, tx))
            .map_err(|e| format!("victim thread: {e}"))?;
        let v = Victim {
            stop,
            ops,
            errors,
            first_error,
            thread: Some(thread),
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(v),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the victim's first round did not complete in 30 s".into()),
        }
    }

    pub fn count(&self) -> VictimCount {
        VictimCount {
            ops: self.ops.load(Ordering::Acquire),
            errors: self.errors.load(Ordering::Acquire),
        }
    }

    /// The first error the victim saw, if any.
    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Operations completed per second over `d`, sampled now.
    pub fn iops_over(&self, d: Duration) -> f64 {
        let a = self.count().ops;
        let t0 = Instant::now();
        std::thread::sleep(d);
        let b = self.count().ops;
        (b - a) as f64 / t0.elapsed().as_secs_f64()
    }

    /// Wait until `n` more operations completed (the victim still makes progress).
    pub fn progresses(&self, n: u64, timeout: Duration) -> bool {
        let base = self.count().ops;
        let t0 = Instant::now();
        while self.count().ops < base + n {
            if t0.elapsed() > timeout || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stop; the number of operations, or the first error if there was one.
    pub fn finish(self) -> Res<u64> {
        let e = self.first_error();
        let c = self.stop();
        match e {
            Some(e) => Err(format!("{e} ({} errors)", c.errors)),
            None => Ok(c.ops),
        }
    }

    /// Stop and return the final counts.
    pub fn stop(mut self) -> VictimCount {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.count()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn victim_loop(
    sock: &Path,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    first_error: Arc<Mutex<Option<String>>>,
    ready: std::sync::mpsc::Sender<Res<()>>,
) {
    let fail = |e: String| {
        errors.fetch_add(1, Ordering::AcqRel);
        let mut g = first_error.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(e);
    };
    let mut c = match BlkioClient::connect(sock, 1, false, 2 * VICTIM_QD * BLOCK) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("victim: connect {}: {e}", sock.display())));
            return;
        }
    };
    c.timeout = Duration::from_secs(30);
    let blocks = (c.capacity() / BLOCK as u64).max(1);
    let mut gens = vec![0u64; blocks as usize];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut ready = Some(ready);
    let mut expect = vec![0u8; BLOCK];
    let mut out: Vec<std::mem::MaybeUninit<blkio::Completion>> = (0..VICTIM_QD)
        .map(|_| std::mem::MaybeUninit::uninit())
        .collect();
    while !stop.load(Ordering::Acquire) {
        // Pick QD distinct blocks; write them, then read them back and check.
        let mut lbas = Vec::with_capacity(VICTIM_QD);
        while lbas.len() < VICTIM_QD.min(blocks as usize) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let l = rng % blocks;
            if !lbas.contains(&l) {
                lbas.push(l);
            }
        }
        for (i, &l) in lbas.iter().enumerate() {
            gens[l as usize] += 1;
            victim_block(
                l,
                gens[l as usize],
                &mut c.buf()[i * BLOCK..(i + 1) * BLOCK],
            );
        }
        for phase in [Op::Write, Op::Read] {
            for (i, &l) in lbas.iter().enumerate() {
                let buf_off = match phase {
                    Op::Write => i * BLOCK,
                    _ => (VICTIM_QD + i) * BLOCK,
                };
                c.enqueue(
                    0,
                    Req {
                        op: phase,
                        offset: l * BLOCK as u64,
                        len: BLOCK,
                        buf_off,
                    },
                    i,
                    ReqFlags::empty(),
                );
            }
            let mut got = 0;
            while got < lbas.len() {
                let want = lbas.len() - got;
                match c.reap(0, &mut out[..want], want, Duration::from_secs(30)) {
                    Ok(n) => {
                        for o in out.iter().take(n) {
                            // SAFETY: reap initialised the first n completions.
                            let r = unsafe { o.assume_init_read() };
                            if r.ret != 0 {
                                fail(format!(
                                    "{phase:?} failed: {}",
                                    std::io::Error::from_raw_os_error(-r.ret)
                                ));
                            } else {
                                ops.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        got += n;
                    }
                    Err(e) => {
                        fail(format!("victim {phase:?}: {e}"));
                        // libblkio cannot recover a queue it lost track of.
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e));
                        }
                        return;
                    }
                }
            }
        }
        for (i, &l) in lbas.iter().enumerate() {
            victim_block(l, gens[l as usize], &mut expect);
            let o = (VICTIM_QD + i) * BLOCK;
            if c.buf()[o..o + BLOCK] != expect[..] {
                fail(format!(
                    "block {l}: read back differs from what was written"
                ));
            }
        }
        if let Some(r) = ready.take() {
            let _ = r.send(Ok(()));
        }
    }
}

// ---- helpers ---------------------------------------------------------------------------

/// Resident memory of a process, in bytes (from /proc).
pub fn rss_bytes(pid: u32) -> Res<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
        .ok_or_else(|| "no VmRSS".into())
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Res<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}

/// Read until EOF or an error, at most `cap` bytes and `within`; returns (bytes read,
/// closed by the peer).
fn drain_until_closed(s: &mut dyn Read, cap: usize, within: Duration) -> (usize, bool) {
    let t0 = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    while t0.elapsed() < within && total < cap {
        match s.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return (total, true),
        }
    }
    (total, false)
}

/// Is the peer's end of `s` closed? Waits up to `within` for EOF (discarding data).
fn closed_within(s: &mut dyn Read, within: Duration) -> bool {
    drain_until_closed(s, usize::MAX, within).1
}

// ---- NVMe/TCP --------------------------------------------------------------------------

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// A command capsule with a transport SGL of `sgl_len` bytes and no data in it.
fn capsule(sqe: &Sqe, sgl_len: u32) -> Vec<u8> {
    let mut s = sqe.0;
    s[24..32].fill(0);
    s[32..36].copy_from_slice(&sgl_len.to_le_bytes());
    s[39] = 0x5a; // transport data block
    let mut b = vec![0x04, 0, 72, 0];
    b.extend_from_slice(&72u32.to_le_bytes());
    b.extend_from_slice(&s);
    b
}

/// What the controller answered to one command: data bytes it sent (C2HData), its
/// status, whether it asked for data (R2T), or that it ended the connection.
#[derive(Debug, Default)]
pub struct NvmfAnswer {
    pub data: usize,
    pub status: Option<u16>,
    pub r2t: Option<u32>,
    pub terminated: bool,
}

impl std::fmt::Display for NvmfAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.r2t {
            write!(f, "asked for {n} bytes of data (R2T); ")?;
        }
        if self.data > 0 {
            write!(f, "sent {} bytes of data; ", self.data)?;
        }
        match (self.status, self.terminated) {
            (Some(st), _) => write!(
                f,
                "completed with status {st:#06x} (sct {}, sc {:#04x})",
                (st >> 9) & 7,
                (st >> 1) & 0xff
            ),
            (None, true) => write!(f, "ended the connection"),
            (None, false) => write!(f, "did not answer"),
        }
    }
}

/// Read PDUs (no digests) until the completion of `cid`, an R2T, or the end; data
/// counted, never kept; at most `cap` data bytes.
fn read_answer(s: &mut TcpStream, cid: u16, cap: usize, within: Duration) -> NvmfAnswer {
    let mut a = NvmfAnswer::default();
    let t0 = Instant::now();
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut hdr = [0u8; 8];
    while t0.elapsed() < within {
        match read_full(s, &mut hdr, t0, within) {
            Ok(true) => {}
            Ok(false) => {
                a.terminated = true;
                return a;
            }
            Err(()) => return a,
        }
        let ty = hdr[0];
        let plen = le32(&hdr, 4) as usize;
        if !(8..=(16 << 20) + 4096).contains(&plen) {
            a.terminated = true;
            return a;
        }
        let mut rest = vec![0u8; plen - 8];
        match read_full(s, &mut rest, t0, within) {
            Ok(true) => {}
            Ok(false) => {
                a.terminated = true;
                return a;
            }
            Err(()) => return a,
        }
        match ty {
            // CapsuleResp: the 16-byte CQE follows the common header; CID is in its
            // bytes 12..14, the status field (with the phase bit) in 14..16.
            0x05 if rest.len() >= 16 && le16(&rest, 12) == cid => {
                a.status = Some(le16(&rest, 14));
                return a;
            }
            0x07 => {
                // C2HData: header 24 bytes (16 after the common header).
                let hlen = hdr[2] as usize;
                a.data += plen.saturating_sub(hlen);
                if a.data > cap {
                    return a;
                }
            }
            0x09 if rest.len() >= 16 => {
                a.r2t = Some(le32(&rest, 12));
                return a;
            }
            0x03 => {
                a.terminated = true;
                return a;
            }
            _ => {}
        }
    }
    a
}

/// Fill `b`: Ok(true) when full, Ok(false) at EOF or a reset, Err(()) at the deadline.
fn read_full(s: &mut TcpStream, b: &mut [u8], t0: Instant, within: Duration) -> Result<bool, ()> {
    let mut got = 0;
    while got < b.len() {
        if t0.elapsed() >= within {
            return Err(());
        }
        match s.read(&mut b[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

/// A connected, enabled admin queue of `subnqn` as `hostnqn`.
fn admin_queue(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Res<Queue> {
    let mut q = Queue::open(addr, false, false)?;
    let c = q.connect(0, 32, subnqn, hostnqn, 0xffff)?;
    if !c.ok() {
        return Err(format!(
            "connect to {subnqn} as {hostnqn}: status {:#x}",
            c.status
        ));
    }
    q.prop_set(0x14, 1)?;
    Ok(q)
}

/// Get Log Page with NUMD = 0xffffffff (16 GiB) and a 4 GiB transport SGL, on the
/// admin queue of `subnqn` (the discovery NQN works for any host while discovery is
/// open). `lid` 0x70 is the discovery log, 0x02 the SMART log.
pub fn nvmf_log_page_numd_max(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    lid: u8,
) -> Res<NvmfAnswer> {
    let mut q = admin_queue(addr, subnqn, hostnqn)?;
    let sqe = Sqe::new(0x02, 0xffff_ffff)
        .cdw(10, lid as u32 | 0xffff << 16)
        .cdw(11, 0xffff);
    let mut sqe = sqe;
    sqe.0[2..4].copy_from_slice(&0x4242u16.to_le_bytes());
    q.raw(&capsule(&sqe, u32::MAX))?;
    let mut s = q.stream().try_clone().map_err(|e| e.to_string())?;
    Ok(read_answer(
        &mut s,
        0x4242,
        64 << 20,
        Duration::from_secs(20),
    ))
}

/// Identify (controller) with a 4 GiB transport SGL on an admin queue.
pub fn nvmf_identify_sgl_4g(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Res<NvmfAnswer> {
    let mut q = admin_queue(addr, subnqn, hostnqn)?;
    let mut sqe = Sqe::new(0x06, 0).cdw(10, 1);
    sqe.0[2..4].copy_from_slice(&0x4343u16.to_le_bytes());
    q.raw(&capsule(&sqe, u32::MAX))?;
    let mut s = q.stream().try_clone().map_err(|e| e.to_string())?;
    Ok(read_answer(
        &mut s,
        0x4343,
        64 << 20,
        Duration::from_secs(20),
    ))
}

/// Before Connect: a Connect capsule whose 4 GiB of data is to come by R2T (a
/// controller that answers with an R2T would then have to take 4 GiB).
pub fn nvmf_r2t_before_connect(addr: SocketAddr) -> Res<NvmfAnswer> {
    let mut q = Queue::open(addr, false, false)?;
    let mut sqe = Sqe::fabrics(0x01);
    sqe.0[2..4].copy_from_slice(&0x4444u16.to_le_bytes());
    q.raw(&capsule(&sqe, u32::MAX))?;
    let mut s = q.stream().try_clone().map_err(|e| e.to_string())?;
    let mut a = read_answer(&mut s, 0x4444, 1 << 20, Duration::from_secs(20));
    if let Some(n) = a.r2t {
        // It asked: send 64 MiB of H2CData the way a host would, and see what happens.
        let chunk = vec![0u8; 128 << 10];
        let mut sent = 0u32;
        while sent < (64 << 20).min(n) {
            let mut h = vec![0x06, 0x04, 24, 24];
            h.extend_from_slice(&(24u32 + chunk.len() as u32).to_le_bytes());
            h.extend_from_slice(&0x4444u16.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&sent.to_le_bytes());
            h.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            h.extend_from_slice(&[0; 4]);
            if s.write_all(&h).and_then(|_| s.write_all(&chunk)).is_err() {
                a.terminated = true;
                break;
            }
            sent += chunk.len() as u32;
        }
    }
    Ok(a)
}

/// Outcome of opening many connections at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flood {
    /// Connections the server took (it answered the first exchange).
    pub accepted: usize,
    /// Connections it closed or did not answer.
    pub refused: usize,
}

/// Open `n` NVMe/TCP connections, each with an ICReq; hold the accepted ones for `hold`.
pub fn nvmf_flood(addr: SocketAddr, n: usize, hold: Duration) -> Flood {
    let mut f = Flood::default();
    let mut held = Vec::new();
    for _ in 0..n {
        match icreq_exchange(addr, Duration::from_secs(5)) {
            Ok(q) => {
                f.accepted += 1;
                held.push(q);
            }
            Err(_) => f.refused += 1,
        }
    }
    std::thread::sleep(hold);
    f
}

/// TCP connect and an ICReq; Ok once the ICResp came within `within`.
fn icreq_exchange(addr: SocketAddr, within: Duration) -> Res<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, within).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(within)).ok();
    let mut ic = vec![0u8; 128];
    ic[2] = 128;
    ic[4..8].copy_from_slice(&128u32.to_le_bytes());
    s.write_all(&ic).map_err(|e| e.to_string())?;
    let mut r = [0u8; 128];
    s.read_exact(&mut r).map_err(|e| e.to_string())?;
    if r[0] != 0x01 {
        return Err(format!("expected ICResp, got PDU type {:#x}", r[0]));
    }
    Ok(s)
}

/// Send `bytes` one at a time, one every `every`, until the server closes the
/// connection or `give_up` passes. Returns how long the server let it live (None: it
/// was still open at `give_up`).
pub fn trickle(
    stream: &mut dyn ReadWrite,
    bytes: &[u8],
    every: Duration,
    give_up: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    let mut i = 0;
    loop {
        if t0.elapsed() >= give_up {
            return None;
        }
        if i < bytes.len() {
            if stream.write_all(&bytes[i..i + 1]).is_err() {
                return Some(t0.elapsed());
            }
            i += 1;
        }
        // Look for the close while waiting for the next byte's turn.
        let until = Instant::now() + every;
        while Instant::now() < until {
            let mut b = [0u8; 4096];
            match stream.read(&mut b) {
                Ok(0) => return Some(t0.elapsed()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Some(t0.elapsed()),
            }
        }
    }
}

/// A byte stream (TCP or Unix socket) for the attacks.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// An ICReq, sent a byte a second (slowloris on the NVMe/TCP handshake).
pub fn nvmf_slow_handshake(
    addr: SocketAddr,
    every: Duration,
    give_up: Duration,
) -> Res<Option<Duration>> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(50))).ok();
    let mut ic = vec![0u8; 128];
    ic[2] = 128;
    ic[4..8].copy_from_slice(&128u32.to_le_bytes());
    Ok(trickle(&mut s, &ic, every, give_up))
}

/// `n` half-open connections: TCP connected, then silence. Returns how many the server
/// had closed by `within`.
pub fn half_open_tcp(addr: SocketAddr, n: usize, within: Duration) -> Res<usize> {
    let mut v = Vec::new();
    for _ in 0..n {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(20))).ok();
        v.push(s);
    }
    let t0 = Instant::now();
    let mut closed = vec![false; n];
    while t0.elapsed() < within && closed.iter().any(|c| !c) {
        for (i, s) in v.iter_mut().enumerate() {
            if !closed[i] {
                closed[i] = closed_within(s, Duration::from_millis(1));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(closed.iter().filter(|&&c| c).count())
}

// ---- vhost-user front-ends ------------------------------------------------------------

/// A vhost-user front-end whose guest memory (an unsealed memfd) shrinks under the
/// daemon: it sets up a queue, has one request served, truncates the memfd to nothing,
/// kicks, and holds the connection for `hold`. The daemon must fail that device only.
pub fn vhost_shrink_memory(sock: &Path, hold: Duration) -> Res<()> {
    use crate::vufront::{request, Guest, GuestOpts, DATA};
    let mut g = Guest::setup_with(sock, GuestOpts::default())?;
    let (used, status) = request(&mut g, 0, DATA, 4096);
    if (used, status) != (4097, 0) {
        return Err(format!(
            "the first read was not served: used {used}, status {status}"
        ));
    }
    g.resize_memory(0)
        .map_err(|e| format!("truncate guest memory: {e}"))?;
    g.kick.write(1).map_err(|e| format!("kick: {e}"))?;
    std::thread::sleep(hold);
    Ok(())
}

// ---- external functions --------------------------------------------------------------

/// What the hostile function tried, and the errno each attempt got (0: it worked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FnReport {
    /// F_GET_SEALS of the ring memfd.
    pub seals: i32,
    pub shrink: i32,
    pub grow: i32,
    pub seal_write: i32,
}

fn errno_of(r: libc::c_int) -> i32 {
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// A hostile external function: attach to a disk's function socket like any function,
/// and when the daemon hands over a ring, try to pull its memory away (shrink and grow
/// the memfd, add F_SEAL_WRITE so the daemon's stores would fault). Returns what the
/// kernel answered; the connection closes with the daemon's commands in flight.
pub fn extfn_resize_ring(sock: &Path) -> std::io::Result<FnReport> {
    let mut s = UnixStream::connect(sock)?;
    s.write_all(
        &proto::Hello {
            version: proto::VERSION,
            name: "hostile".into(),
        }
        .encode(),
    )?;
    let mut b = [0u8; proto::MSG_SIZE];
    s.read_exact(&mut b)?;
    match proto::Welcome::decode(&b) {
        Some(w) if w.status == proto::WELCOME_OK => {}
        _ => {
            return Err(std::io::Error::other(
                "the daemon refused the hostile function",
            ))
        }
    }
    loop {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 1000) };
        let (n, fds) = match nvmux_extfn::sock::recv_with_fds(s.as_raw_fd(), &mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => r?,
        };
        if n == 0 {
            return Err(std::io::Error::other("the daemon closed the connection"));
        }
        let Some(m) = proto::RingMsg::decode(&b) else {
            continue;
        };
        if m.kind != proto::MSG_ADD_RING || fds.is_empty() {
            continue;
        }
        let fd = fds[0].as_raw_fd();
        // SAFETY: fcntl and ftruncate on a descriptor we received and hold.
        let r = unsafe {
            FnReport {
                seals: libc::fcntl(fd, libc::F_GET_SEALS),
                shrink: errno_of(libc::ftruncate(fd, 0)),
                grow: errno_of(libc::ftruncate(fd, (m.size * 2) as libc::off_t)),
                seal_write: errno_of(libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE)),
            }
        };
        return Ok(r);
    }
}

// ---- NBD -------------------------------------------------------------------------------

/// Where an NBD server listens.
#[derive(Clone, Debug)]
pub enum NbdAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

fn nbd_connect(a: &NbdAddr, read_timeout: Duration) -> Res<Box<dyn ReadWrite + Send>> {
    Ok(match a {
        NbdAddr::Unix(p) => {
            let s = UnixStream::connect(p).map_err(|e| format!("{}: {e}", p.display()))?;
            s.set_read_timeout(Some(read_timeout)).ok();
            Box::new(s)
        }
        NbdAddr::Tcp(t) => {
            let s = TcpStream::connect_timeout(t, Duration::from_secs(5))
                .map_err(|e| format!("{t}: {e}"))?;
            s.set_read_timeout(Some(read_timeout)).ok();
            Box::new(s)
        }
    })
}

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;

/// Fixed newstyle negotiation with NBD_OPT_GO of `export`, no structured replies.
pub fn nbd_go(a: &NbdAddr, export: &str) -> Res<Box<dyn ReadWrite + Send>> {
    let mut s = nbd_connect(a, Duration::from_secs(10))?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g).map_err(|e| format!("greeting: {e}"))?;
    s.write_all(&3u32.to_be_bytes())
        .map_err(|e| e.to_string())?;
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&7u32.to_be_bytes());
    o.extend_from_slice(&(d.len() as u32).to_be_bytes());
    o.extend_from_slice(&d);
    s.write_all(&o).map_err(|e| e.to_string())?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)
            .map_err(|e| format!("option reply: {e}"))?;
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        if len > 1 << 20 {
            return Err("absurd option reply".into());
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).map_err(|e| e.to_string())?;
        if kind >= 1 << 31 {
            return Err(format!(
                "GO {export} refused: {kind:#x} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        if kind == 1 {
            return Ok(s);
        }
    }
}

fn nbd_request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// What an NBD server did with a request.
#[derive(Debug)]
pub enum NbdAnswer {
    /// A simple reply with this errno (0: success; its read data, if any, follows).
    Errno(u32),
    /// It closed the connection.
    Closed,
    /// Nothing within the time allowed.
    Silent,
}

fn nbd_reply(s: &mut dyn ReadWrite, within: Duration) -> NbdAnswer {
    let t0 = Instant::now();
    let mut h = [0u8; 16];
    let mut got = 0;
    while got < 16 {
        if t0.elapsed() >= within {
            return NbdAnswer::Silent;
        }
        match s.read(&mut h[got..]) {
            Ok(0) => return NbdAnswer::Closed,
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return NbdAnswer::Closed,
        }
    }
    NbdAnswer::Errno(u32::from_be_bytes([h[4], h[5], h[6], h[7]]))
}

/// A read of 4 GiB − 1 bytes, then a write announcing as many (with no payload): the
/// server must refuse the read and end the connection at the write (whose payload it
/// cannot skip safely), allocating nothing for either.
pub fn nbd_huge_requests(a: &NbdAddr, export: &str) -> Res<(NbdAnswer, NbdAnswer)> {
    let mut s = nbd_go(a, export)?;
    s.write_all(&nbd_request(0, 1, 0, u32::MAX))
        .map_err(|e| e.to_string())?;
    let read = nbd_reply(&mut *s, Duration::from_secs(20));
    s.write_all(&nbd_request(1, 2, 0, u32::MAX))
        .map_err(|e| e.to_string())?;
    // A little payload, then nothing: the write can never complete.
    let _ = s.write_all(&[0u8; 4096]);
    let write = nbd_reply(&mut *s, Duration::from_secs(20));
    Ok((read, write))
}

/// Open `n` NBD connections and wait for each one's greeting; hold them for `hold`.
pub fn nbd_flood(a: &NbdAddr, n: usize, hold: Duration) -> Flood {
    let mut f = Flood::default();
    let mut held = Vec::new();
    for _ in 0..n {
        let ok = nbd_connect(a, Duration::from_secs(5)).and_then(|mut s| {
            let mut g = [0u8; 18];
            s.read_exact(&mut g).map_err(|e| e.to_string())?;
            Ok(s)
        });
        match ok {
            Ok(s) => {
                f.accepted += 1;
                held.push(s);
            }
            Err(_) => f.refused += 1,
        }
    }
    std::thread::sleep(hold);
    f
}

/// The client's half of a negotiation, a byte every `every` (slowloris).
pub fn nbd_slow_handshake(
    a: &NbdAddr,
    export: &str,
    every: Duration,
    give_up: Duration,
) -> Res<Option<Duration>> {
    let mut s = nbd_connect(a, Duration::from_millis(50))?;
    let mut g = [0u8; 18];
    let t0 = Instant::now();
    let mut got = 0;
    while got < g.len() {
        match s.read(&mut g[got..]) {
            Ok(0) => return Err("closed before the greeting".into()),
            Ok(n) => got += n,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {}
            Err(e) => return Err(format!("greeting: {e}")),
        }
    }
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&(d.len() as u32).to_be_bytes());
    b.extend_from_slice(&d);
    Ok(trickle(&mut *s, &b, every, give_up))
}

/// Negotiate, send `n` 1 MiB reads and never read the replies. Returns whether the
/// server had ended the connection by `within` (it should, at its stall timeout).
pub fn nbd_not_reading(a: &NbdAddr, export: &str, n: usize, within: Duration) -> Res<bool> {
    let mut s = nbd_go(a, export)?;
    for i in 0..n {
        if s.write_all(&nbd_request(0, i as u64, 0, 1 << 20)).is_err() {
            return Ok(true);
        }
    }
    // Hold still without reading, then look: a closed connection shows as EOF after
    // whatever replies were queued.
    std::thread::sleep(within);
    Ok(drain_until_closed(&mut *s, usize::MAX, Duration::from_secs(5)).1)
}
