//! A hostile NVMe/TCP host: length fields at their maximum (NUMD FFFFFFFFh, 4 GiB SGLs),
//! R2T before Connect, I/O before Connect, H2CData games, connection floods and slow
//! handshakes, plus the wire helpers to build more (capsules, H2CData PDUs, Connect).
//! Each attack returns what the target did ([`Answer`]) and leaves the judging to the
//! caller.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{trickle, Flood, Res};
use crate::nvmf::{le16, le32, Completion, Queue, Sqe};

/// How long an attack waits for the target's answer (the H2CData stall waits longer).
const WAIT: Duration = Duration::from_secs(20);

/// The event that ended the wait for an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A completion (the connection stays).
    Status(Completion),
    /// A C2HTermReq (with its fatal error status), then the close.
    Terminated(u16),
    /// The connection closed (end of stream or reset) without a word.
    Closed,
    /// An R2T: the target asked for the data.
    R2t { ttag: u16, len: u32 },
    /// Nothing within the wait.
    Silent,
}

/// What the target answered to one command: the data it sent (C2HData, counted, never
/// kept), then the [`Verdict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub data: usize,
    pub verdict: Verdict,
}

impl Answer {
    /// The connection is gone (terminated or closed).
    pub fn ended(&self) -> bool {
        matches!(self.verdict, Verdict::Terminated(_) | Verdict::Closed)
    }
    /// An error completion (SCT, SC).
    pub fn error(&self) -> Option<(u8, u8)> {
        match self.verdict {
            Verdict::Status(c) if !c.ok() => Some(c.sct_sc()),
            _ => None,
        }
    }
    /// The target asked for data (R2T).
    pub fn r2t(&self) -> bool {
        matches!(self.verdict, Verdict::R2t { .. })
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.data > 0 {
            write!(f, "sent {} bytes of data, then ", self.data)?;
        }
        match self.verdict {
            Verdict::Status(c) => {
                let (sct, sc) = c.sct_sc();
                write!(f, "completed with sct {sct}, sc {sc:#04x}")
            }
            Verdict::Terminated(fes) => write!(f, "terminated the connection (FES {fes:#x})"),
            Verdict::Closed => write!(f, "closed the connection"),
            Verdict::R2t { len, .. } => write!(f, "asked for {len} bytes of data (R2T)"),
            Verdict::Silent => write!(f, "did not answer"),
        }
    }
}

/// Read what the target says on `q` until a completion, an R2T, a C2HTermReq, the end
/// of the connection or `wait` (C2HData is counted and dropped).
pub fn answer(q: &mut Queue, wait: Duration) -> Answer {
    let t0 = Instant::now();
    let mut data = 0;
    let verdict = loop {
        let Some(left) = wait.checked_sub(t0.elapsed()) else {
            break Verdict::Silent;
        };
        let _ = q
            .stream()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match q.recv() {
            Ok(p) if p.ty == 0x05 && p.hdr.len() >= 16 => {
                let c = &p.hdr;
                break Verdict::Status(Completion {
                    dw0: le32(c, 0),
                    dw1: le32(c, 4),
                    cid: le16(c, 12),
                    status: (le16(c, 14) >> 1) & 0x7ff,
                });
            }
            Ok(p) if p.ty == 0x03 && p.hdr.len() >= 2 => {
                break Verdict::Terminated(le16(&p.hdr, 0))
            }
            Ok(p) if p.ty == 0x09 && p.hdr.len() >= 12 => {
                break Verdict::R2t {
                    ttag: le16(&p.hdr, 2),
                    len: le32(&p.hdr, 8),
                }
            }
            Ok(p) if p.ty == 0x07 => data += p.data.len(),
            Ok(_) => {}
            Err(e) if e.contains("timed out") || e.contains("temporarily unavailable") => {
                break Verdict::Silent
            }
            Err(_) => break Verdict::Closed,
        }
    };
    let _ = q.stream().set_read_timeout(Some(Duration::from_secs(30)));
    Answer { data, verdict }
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

/// An ICReq (PFV 0, no digests).
pub fn icreq() -> Vec<u8> {
    let mut ic = vec![0u8; 128];
    ic[2] = 128;
    ic[4..8].copy_from_slice(&128u32.to_le_bytes());
    ic
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

/// A Connect command (32 entries).
pub fn connect_sqe(qid: u16, kato_ms: u32) -> Sqe {
    Sqe::fabrics(0x01)
        .set(42, &qid.to_le_bytes())
        .set(44, &31u16.to_le_bytes())
        .set(48, &kato_ms.to_le_bytes())
}

/// An ICReq and a Connect capsule (1224 bytes) as one byte string: a whole handshake.
pub fn handshake_bytes(subnqn: &str, hostnqn: &str) -> Vec<u8> {
    let mut b = icreq();
    b.extend(capsule(
        connect_sqe(0, 0),
        1,
        1024,
        0x01,
        &connect_data(subnqn, hostnqn, 0xffff),
    ));
    b
}

/// An admin queue connected to `subnqn` as `hostnqn` and enabled (CC.EN), with no I/O
/// queues: the starting point of the admin attacks.
pub fn enabled_admin(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Res<Queue> {
    let mut q = Queue::open(addr, false, false)?;
    let c = q.connect(0, 32, subnqn, hostnqn, 0xffff)?;
    if !c.ok() {
        return Err(format!(
            "connect to {subnqn} as {hostnqn} refused: status {:#x}",
            c.status
        ));
    }
    q.prop_set(0x14, 1 | 6 << 16 | 4 << 20)?;
    Ok(q)
}

/// Get Log Page with NUMD = FFFFFFFFh (16 GiB asked for) for log `lid` (0x70 the
/// discovery log, 0x02 the SMART log), with a transport SGL of `sgl_len` bytes: the
/// target must neither allocate by NUMD nor trust the SGL.
pub fn huge_log_page(q: &mut Queue, lid: u8, sgl_len: u32) -> Res<Answer> {
    let sqe = Sqe::new(0x02, 0)
        .cdw(10, lid as u32 | 0xffff << 16)
        .cdw(11, 0xffff);
    q.raw(&capsule(sqe, 0x4242, sgl_len, 0x5a, &[]))?;
    Ok(answer(q, WAIT))
}

/// Identify (controller) with a 4 GiB SGL: an admin command whose data length is the
/// host's word.
pub fn huge_admin_sgl(q: &mut Queue) -> Res<Answer> {
    let sqe = Sqe::new(0x06, 0).cdw(10, 1);
    q.raw(&capsule(sqe, 0x4343, u32::MAX, 0x5a, &[]))?;
    Ok(answer(q, WAIT))
}

/// Before Connect, a Connect whose `len` bytes of data are to come by R2T: an R2T before
/// Connect would let any peer make the target reserve `len` bytes. If the target asks
/// anyway, up to 64 MiB of H2CData goes to it the way a host would send it.
pub fn r2t_before_connect(addr: SocketAddr, len: u32) -> Res<Answer> {
    let mut q = Queue::open(addr, false, false)?;
    q.raw(&capsule(connect_sqe(0, 0), 1, len, 0x5a, &[]))?;
    let a = answer(&mut q, WAIT);
    if let Verdict::R2t { ttag, len } = a.verdict {
        let chunk = vec![0u8; 128 << 10];
        let mut sent = 0u32;
        while sent < len.min(64 << 20) {
            if q.raw(&h2c(1, ttag, sent, chunk.len() as u32, &chunk))
                .is_err()
            {
                break;
            }
            sent += chunk.len() as u32;
        }
    }
    Ok(a)
}

/// Before Connect, a write to namespace 1 with a 4 GiB transport SGL.
pub fn io_before_connect(addr: SocketAddr) -> Res<Answer> {
    let mut q = Queue::open(addr, false, false)?;
    q.raw(&capsule(Sqe::write(1, 0, 1), 2, u32::MAX, 0x5a, &[]))?;
    Ok(answer(&mut q, WAIT))
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
pub fn h2c_game(addr: SocketAddr, subnqn: &str, hostnqn: &str, game: H2cGame) -> Res<Answer> {
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
        return Ok(answer(&mut q, WAIT));
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
            let first = answer(&mut q, WAIT);
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
        WAIT
    };
    Ok(answer(&mut q, wait))
}

/// Open `n` NVMe/TCP connections one after the other, each with an ICReq; keep those the
/// target answers (with an ICResp) within `wait`. A refused one is closed at once.
pub fn flood(addr: SocketAddr, n: usize, wait: Duration) -> Flood<TcpStream> {
    super::flood(
        n,
        || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect {addr}: {e}"))
        },
        |s| {
            let _ = s.set_read_timeout(Some(wait));
            let mut r = [0u8; 128];
            s.write_all(&icreq()).is_ok() && s.read_exact(&mut r).is_ok() && r[0] == 0x01
        },
    )
}

/// Slowloris: an ICReq and a Connect to `subnqn` as `hostnqn`, one byte every `every`.
/// Returns how long after the connect the target ended the connection (`None`: still
/// open at `give_up`).
pub fn slow_handshake(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    every: Duration,
    give_up: Duration,
) -> Res<Option<Duration>> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(trickle(
        &mut s,
        t0,
        &handshake_bytes(subnqn, hostnqn),
        every,
        give_up,
    ))
}
