//! Attacks on an NVMe/TCP target, made as a hostile host would make them: lengths at their
//! maximum, R2T before Connect, H2CData games, connection floods, slow handshakes. The
//! integration tests (`crates/nvmux/tests/nvmf_hostile.rs`) and the attacker suite call
//! them; each returns what the target did and leaves the judging to the caller.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{le16, le32, Completion, Queue, Res, Sqe};

/// What the target answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A completion (the connection stays).
    Status(Completion),
    /// A C2HTermReq (with its fatal error status), then the close.
    Terminated(u16),
    /// The connection closed (end of stream or reset) without a word.
    Closed,
    /// An R2T: the target asked for the data.
    R2t { len: u32 },
    /// Nothing within the wait.
    Silent,
}

impl Verdict {
    /// The connection is gone (terminated or closed).
    pub fn ended(&self) -> bool {
        matches!(self, Verdict::Terminated(_) | Verdict::Closed)
    }
    /// An error completion (SCT, SC).
    pub fn error(&self) -> Option<(u8, u8)> {
        match self {
            Verdict::Status(c) if !c.ok() => Some(c.sct_sc()),
            _ => None,
        }
    }
}

/// The next thing the target says on `q`, waiting at most `wait`.
pub fn outcome(q: &mut Queue, wait: Duration) -> Verdict {
    let _ = q.stream().set_read_timeout(Some(wait));
    let r = q.recv();
    let _ = q.stream().set_read_timeout(Some(Duration::from_secs(30)));
    match r {
        Ok(p) if p.ty == 0x05 => {
            let c = &p.hdr;
            Verdict::Status(Completion {
                dw0: le32(c, 0),
                dw1: le32(c, 4),
                cid: le16(c, 12),
                status: (le16(c, 14) >> 1) & 0x7ff,
            })
        }
        Ok(p) if p.ty == 0x03 => Verdict::Terminated(le16(&p.hdr, 0)),
        Ok(p) if p.ty == 0x09 => Verdict::R2t {
            len: le32(&p.hdr, 8),
        },
        Ok(_) => Verdict::Silent,
        Err(e) if e.contains("timed out") || e.contains("temporarily unavailable") => {
            Verdict::Silent
        }
        Err(_) => Verdict::Closed,
    }
}

/// A command PDU (no digests) with `sqe` and in-capsule `data`; the SGL fields are the
/// caller's (`sgl_type` 0x01 in-capsule, 0x5a transport).
pub fn capsule(mut sqe: Sqe, cid: u16, sgl_len: u32, sgl_type: u8, data: &[u8]) -> Vec<u8> {
    sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
    sqe.0[24..32].fill(0);
    sqe.0[32..36].copy_from_slice(&sgl_len.to_le_bytes());
    sqe.0[39] = sgl_type;
    let pdo = if data.is_empty() { 0 } else { 72 };
    let mut b = vec![0x04, 0, 72, pdo];
    b.extend_from_slice(&(72 + data.len() as u32).to_le_bytes());
    b.extend_from_slice(&sqe.0);
    b.extend_from_slice(data);
    b
}

/// An H2CData PDU (no digests). `datal` is what the header claims; `data` what follows.
pub fn h2c(cid: u16, ttag: u16, off: u32, datal: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![0x06, 0x04, 24, 24];
    b.extend_from_slice(&(24 + data.len() as u32).to_le_bytes());
    b.extend_from_slice(&cid.to_le_bytes());
    b.extend_from_slice(&ttag.to_le_bytes());
    b.extend_from_slice(&off.to_le_bytes());
    b.extend_from_slice(&datal.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(data);
    b
}

/// The 1024 bytes of Connect data.
pub fn connect_data(subnqn: &str, hostnqn: &str, cntlid: u16) -> Vec<u8> {
    let mut d = vec![0u8; 1024];
    d[16..18].copy_from_slice(&cntlid.to_le_bytes());
    let (s, h) = (subnqn.as_bytes(), hostnqn.as_bytes());
    d[256..256 + s.len().min(255)].copy_from_slice(&s[..s.len().min(255)]);
    d[512..512 + h.len().min(255)].copy_from_slice(&h[..h.len().min(255)]);
    d
}

/// A Connect command (qid 0, 32 entries).
pub fn connect_sqe(qid: u16, kato_ms: u32) -> Sqe {
    Sqe::fabrics(0x01)
        .set(42, &qid.to_le_bytes())
        .set(44, &31u16.to_le_bytes())
        .set(48, &kato_ms.to_le_bytes())
}

/// An admin queue connected to `subnqn` as `hostnqn` and enabled (CC.EN), with no I/O
/// queues: the starting point of the admin attacks.
pub fn enabled_admin(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Res<Queue> {
    let mut q = Queue::open(addr, false, false)?;
    let c = q.connect(0, 32, subnqn, hostnqn, 0xffff)?;
    if !c.ok() {
        return Err(format!("connect refused: status {:#x}", c.status));
    }
    q.prop_set(0x14, 1 | 6 << 16 | 4 << 20)?;
    Ok(q)
}

/// Get Log Page with NUMD = FFFFFFFFh (16 GiB asked for) for log `lid`, with an SGL of
/// `sgl_len` bytes (the attack of issue 15: the target must neither allocate by NUMD nor
/// trust the SGL).
pub fn huge_log_page(q: &mut Queue, lid: u8, sgl_len: u32) -> Res<Verdict> {
    let sqe = Sqe::new(0x02, 0)
        .cdw(10, lid as u32 | 0xffff << 16)
        .cdw(11, 0xffff);
    q.raw(&capsule(sqe, 0x4242, sgl_len, 0x5a, &[]))?;
    Ok(outcome(q, Duration::from_secs(10)))
}

/// Identify with a 4 GiB SGL (an admin command whose data length is the host's word).
pub fn huge_admin_sgl(q: &mut Queue) -> Res<Verdict> {
    let sqe = Sqe::new(0x06, 0).cdw(10, 1);
    q.raw(&capsule(sqe, 0x4343, u32::MAX, 0x5a, &[]))?;
    Ok(outcome(q, Duration::from_secs(10)))
}

/// Before Connect, a Connect whose data is to come by R2T (`len` bytes): an R2T before
/// Connect would let any peer make the target reserve `len` bytes.
pub fn r2t_before_connect(addr: SocketAddr, subnqn: &str, hostnqn: &str, len: u32) -> Res<Verdict> {
    let mut q = Queue::open(addr, false, false)?;
    let _ = (subnqn, hostnqn);
    q.raw(&capsule(connect_sqe(0, 0), 1, len, 0x5a, &[]))?;
    Ok(outcome(&mut q, Duration::from_secs(10)))
}

/// Before Connect, a write to namespace 1 with a 4 GiB transport SGL.
pub fn io_before_connect(addr: SocketAddr) -> Res<Verdict> {
    let mut q = Queue::open(addr, false, false)?;
    q.raw(&capsule(Sqe::write(1, 0, 1), 2, u32::MAX, 0x5a, &[]))?;
    Ok(outcome(&mut q, Duration::from_secs(10)))
}

/// What to do with an H2CData PDU on an I/O queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H2cGame {
    /// H2CData for a transfer tag no R2T gave.
    NoR2t,
    /// The R2T's command id, another transfer tag.
    WrongTtag,
    /// Data past the range the R2T asked for.
    PastRange,
    /// DATAL says more than the PDU carries.
    DatalMismatch,
    /// A PDU length of 4 GiB.
    HugePlen,
    /// The whole data, then the same range again.
    Duplicate,
    /// Half of the data, then nothing (the stall timeout must end it).
    Stall,
}

/// Play `game` on I/O queue 1 of a new controller of (`subnqn`, `hostnqn`): a 64 KiB
/// write asks for its data with an R2T, and the game answers it.
pub fn h2c_game(addr: SocketAddr, subnqn: &str, hostnqn: &str, game: H2cGame) -> Res<Verdict> {
    let mut admin = enabled_admin(addr, subnqn, hostnqn)?;
    let (c, _) = admin.cmd(Sqe::new(0x09, 0).cdw(10, 7).cdw(11, 0), None, 0)?;
    if !c.ok() {
        return Err(format!("number of queues: {:#x}", c.status));
    }
    let cntlid = {
        let id = admin.cmd(Sqe::new(0x06, 0).cdw(10, 1), None, 4096)?.1;
        le16(&id, 78)
    };
    let mut q = Queue::open(addr, false, false)?;
    let c = q.connect(1, 32, subnqn, hostnqn, cntlid)?;
    if !c.ok() {
        return Err(format!("I/O connect: {:#x}", c.status));
    }
    const LEN: u32 = 64 << 10;
    let cid = 0x55;
    if game == H2cGame::NoR2t {
        q.raw(&h2c(cid, 7, 0, 4096, &[0xab; 4096]))?;
        return Ok(outcome(&mut q, Duration::from_secs(10)));
    }
    q.raw(&capsule(Sqe::write(1, 0, 128), cid, LEN, 0x5a, &[]))?;
    let r2t = q.recv()?;
    if r2t.ty != 0x09 {
        return Err(format!("expected an R2T, got PDU type {:#x}", r2t.ty));
    }
    let ttag = le16(&r2t.hdr, 2);
    let bytes = match game {
        H2cGame::NoR2t => unreachable!("handled above"),
        H2cGame::WrongTtag => h2c(cid, ttag.wrapping_add(1), 0, 4096, &[1; 4096]),
        H2cGame::PastRange => h2c(cid, ttag, LEN - 1024, 4096, &[2; 4096]),
        H2cGame::DatalMismatch => h2c(cid, ttag, 0, 8192, &[3; 4096]),
        H2cGame::HugePlen => {
            let mut b = h2c(cid, ttag, 0, 4096, &[]);
            b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
            b
        }
        H2cGame::Duplicate => {
            q.raw(&h2c(cid, ttag, 0, LEN, &vec![4; LEN as usize]))?;
            let first = outcome(&mut q, Duration::from_secs(10));
            if first.error().is_some() || first.ended() {
                return Ok(first);
            }
            h2c(cid, ttag, 0, 4096, &[5; 4096])
        }
        H2cGame::Stall => h2c(cid, ttag, 0, LEN / 2, &vec![6; LEN as usize / 2]),
    };
    q.raw(&bytes)?;
    let wait = if game == H2cGame::Stall {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(10)
    };
    Ok(outcome(&mut q, wait))
}

/// Open `n` TCP connections that never speak. A refused one is closed by the target at
/// once: each is probed for `probe` for an end of stream. Returns the ones still open and
/// how many were closed.
pub fn connection_flood(addr: SocketAddr, n: usize, probe: Duration) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            open.push(s);
        }
    }
    let deadline = Instant::now() + probe;
    let mut closed = 0;
    let mut alive = Vec::with_capacity(open.len());
    for s in open {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let mut b = [0u8; 1];
        match (&s).read(&mut b) {
            Ok(0) => closed += 1,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                alive.push(s)
            }
            Err(_) => closed += 1,
            Ok(_) => alive.push(s),
        }
    }
    (alive, closed)
}

/// How long the target keeps `s` open while nothing else happens (end of stream, a
/// reset, or `max`: `None`). Anything the target sends is read and dropped.
pub fn time_to_close(s: &TcpStream, max: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut b = vec![0u8; 64 << 10];
    loop {
        let left = max.checked_sub(t0.elapsed())?;
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match (&*s).read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if t0.elapsed() >= max {
                    return None;
                }
            }
            Err(_) => return Some(t0.elapsed()),
        }
    }
}

/// Slowloris: send `bytes` (say an ICReq and a Connect) one byte every `interval`, and
/// return how long the target kept the connection (or `None` if it still had it when
/// the bytes ran out and `max` passed).
pub fn slow_bytes(
    addr: SocketAddr,
    bytes: &[u8],
    interval: Duration,
    max: Duration,
) -> Res<Option<Duration>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let t0 = Instant::now();
    let peek = s.try_clone().map_err(|e| format!("{e}"))?;
    let _ = peek.set_nonblocking(true);
    for &b in bytes {
        if t0.elapsed() >= max {
            break;
        }
        if s.write_all(&[b]).is_err() {
            return Ok(Some(t0.elapsed()));
        }
        std::thread::sleep(interval);
        let mut x = [0u8; 64];
        match (&peek).read(&mut x) {
            Ok(0) => return Ok(Some(t0.elapsed())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Ok(Some(t0.elapsed())),
        }
    }
    let _ = peek.set_nonblocking(false);
    let left = max.saturating_sub(t0.elapsed());
    Ok(time_to_close(&peek, left).map(|d| d + (max - left)))
}

/// ICReq and a Connect capsule as one byte string (for [`slow_bytes`]).
pub fn handshake_bytes(subnqn: &str, hostnqn: &str) -> Vec<u8> {
    let mut ic = vec![0u8; 128];
    ic[2] = 128;
    ic[4] = 128;
    ic.extend(capsule(
        connect_sqe(0, 0),
        1,
        1024,
        0x01,
        &connect_data(subnqn, hostnqn, 0xffff),
    ));
    ic
}

/// A host doing steady, verified I/O in the background while attacks run: it writes a
/// pattern to a range of namespace 1 and reads it back, over and over, and records any
/// error. Attacks pass when the victim saw none.
pub struct Victim {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ops: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<Res<()>>>,
}

impl Victim {
    /// Connect (with `opts`) and start the I/O: 4 KiB in-capsule writes and 64 KiB R2T
    /// writes, each read back and compared, at LBAs `first..first + 2048` (512-byte
    /// blocks).
    pub fn start(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        opts: super::HostOpts,
        first: u64,
    ) -> Res<Victim> {
        let mut h = super::Host::connect_with(addr, subnqn, hostnqn, &opts)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ops = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (st, op) = (stop.clone(), ops.clone());
        let thread = std::thread::Builder::new()
            .name("nvmf-victim".into())
            .spawn(move || -> Res<()> {
                let mut seed = 1u64;
                while !st.load(std::sync::atomic::Ordering::Relaxed) {
                    for (nlb, off) in [(8u32, 0u64), (128, 512)] {
                        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                        let lba = first + off + (seed >> 33) % 256;
                        let data: Vec<u8> = (0..nlb as usize * 512)
                            .map(|i| (seed as usize).wrapping_add(i * 7) as u8)
                            .collect();
                        let q = &mut h.io[0];
                        let (c, _) = q.cmd(Sqe::write(1, lba, nlb), Some(&data), 0)?;
                        if !c.ok() {
                            return Err(format!(
                                "victim write at LBA {lba}: status {:#x}",
                                c.status
                            ));
                        }
                        let (c, back) = q.cmd(Sqe::read(1, lba, nlb), None, data.len())?;
                        if !c.ok() {
                            return Err(format!(
                                "victim read at LBA {lba}: status {:#x}",
                                c.status
                            ));
                        }
                        if back != data {
                            return Err(format!("victim read at LBA {lba}: wrong data"));
                        }
                        op.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
                    }
                    // Keep-alive traffic on the admin queue too.
                    let (c, _) = h.admin.cmd(Sqe::new(0x18, 0), None, 0)?;
                    if !c.ok() {
                        return Err(format!("victim keep alive: status {:#x}", c.status));
                    }
                }
                Ok(())
            })
            .map_err(|e| format!("victim thread: {e}"))?;
        Ok(Victim {
            stop,
            ops,
            thread: Some(thread),
        })
    }

    /// Commands completed so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the victim is still running without an error.
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Wait until it completed `n` more commands (or failed, or `max` passed).
    pub fn progress(&self, n: u64, max: Duration) -> bool {
        let t0 = Instant::now();
        let start = self.ops();
        while t0.elapsed() < max && self.alive() {
            if self.ops() >= start + n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.ops() >= start + n
    }

    /// Stop it; its error, if it met one.
    pub fn finish(mut self) -> Res<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r.map(|_| self.ops()),
            Some(Err(_)) => Err("victim thread panicked".into()),
            None => Ok(self.ops()),
        }
    }
}

/// Resident memory of process `pid` (VmRSS, bytes).
pub fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = l.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
