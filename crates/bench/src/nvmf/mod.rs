//! A small NVMe/TCP host (initiator), written from the specification independently of
//! nvmux's target code, for integration tests and `nvmux bench --nvmf`.
//!
//! Blocking sockets; one [`Queue`] per TCP connection. Commands can be pipelined: send
//! several with [`Queue::send_cmd`] and collect completions with [`Queue::next_completion`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub mod auth;

pub use auth::{DhchapHost, Negotiated};

pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// In-capsule data the host sends at most (the target's IOCCSZ allows 8 KiB).
pub const INLINE_MAX: usize = 8192;

fn crc32c(data: &[u8]) -> u32 {
    let mut c: u32 = !0;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

pub(crate) fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

pub type Res<T> = Result<T, String>;

/// A completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub cid: u16,
    pub dw0: u32,
    pub dw1: u32,
    /// Status field (SC in bits 0..8, SCT in 8..11), without phase and DNR.
    pub status: u16,
}

impl Completion {
    pub fn ok(&self) -> bool {
        self.status == 0
    }
    pub fn sct_sc(&self) -> (u8, u8) {
        ((self.status >> 8) as u8 & 7, self.status as u8)
    }
}

/// One received PDU.
pub struct Pdu {
    pub ty: u8,
    pub flags: u8,
    /// Header (without the common header's 8 bytes), digests removed.
    pub hdr: Vec<u8>,
    pub data: Vec<u8>,
}

/// A 64-byte submission queue entry under construction.
#[derive(Clone, Copy)]
pub struct Sqe(pub [u8; 64]);

impl Sqe {
    pub fn new(opcode: u8, nsid: u32) -> Sqe {
        let mut b = [0u8; 64];
        b[0] = opcode;
        b[1] = 0x40; // SGL for data
        b[4..8].copy_from_slice(&nsid.to_le_bytes());
        Sqe(b)
    }
    pub fn fabrics(fctype: u8) -> Sqe {
        let mut s = Sqe::new(0x7f, 0);
        s.0[4] = fctype;
        s
    }
    pub fn cdw(mut self, n: usize, v: u32) -> Sqe {
        self.0[n * 4..n * 4 + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    pub fn set(mut self, off: usize, bytes: &[u8]) -> Sqe {
        self.0[off..off + bytes.len()].copy_from_slice(bytes);
        self
    }
    fn sgl(&mut self, len: usize, inline: bool) {
        self.0[24..32].fill(0);
        self.0[32..36].copy_from_slice(&(len as u32).to_le_bytes());
        self.0[39] = if inline { 0x01 } else { 0x5a };
    }
    pub fn read(nsid: u32, slba: u64, nlb: u32) -> Sqe {
        Sqe::new(0x02, nsid)
            .cdw(10, slba as u32)
            .cdw(11, (slba >> 32) as u32)
            .cdw(12, nlb - 1)
    }
    pub fn write(nsid: u32, slba: u64, nlb: u32) -> Sqe {
        Sqe::new(0x01, nsid)
            .cdw(10, slba as u32)
            .cdw(11, (slba >> 32) as u32)
            .cdw(12, nlb - 1)
    }
}

/// One queue pair over one TCP connection.
pub struct Queue {
    s: TcpStream,
    pub hdgst: bool,
    pub ddgst: bool,
    pub qid: u16,
    next_cid: u16,
    /// Data to send for commands waiting for an R2T, by command id.
    pending: Vec<(u16, Vec<u8>)>,
    /// Read data received so far, by command id.
    reads: Vec<(u16, Vec<u8>)>,
    /// Next DH-HMAC-CHAP transaction id.
    tid: u16,
}

impl Queue {
    /// TCP connect and the ICReq/ICResp exchange.
    pub fn open(addr: SocketAddr, hdgst: bool, ddgst: bool) -> Res<Queue> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut q = Queue {
            s,
            hdgst,
            ddgst,
            qid: 0,
            next_cid: 1,
            pending: Vec::new(),
            reads: Vec::new(),
            tid: 1,
        };
        let mut ic = vec![0u8; 128];
        ic[0] = 0x00;
        ic[2] = 128;
        ic[4..8].copy_from_slice(&128u32.to_le_bytes());
        ic[11] = hdgst as u8 | (ddgst as u8) << 1;
        q.raw(&ic)?;
        let p = q.recv()?;
        if p.ty != 0x01 {
            return Err(format!("expected ICResp, got PDU type {:#x}", p.ty));
        }
        let dg = p.hdr[3];
        if dg != (hdgst as u8 | (ddgst as u8) << 1) {
            return Err(format!("digests not granted: {dg:#x}"));
        }
        Ok(q)
    }

    fn next_tid(&mut self) -> u16 {
        self.tid = self.tid.wrapping_add(1);
        self.tid
    }

    /// Send raw bytes (for protocol tests).
    pub fn raw(&mut self, b: &[u8]) -> Res<()> {
        self.s.write_all(b).map_err(|e| format!("send: {e}"))
    }

    pub fn stream(&self) -> &TcpStream {
        &self.s
    }

    /// Receive one PDU, checking digests.
    pub fn recv(&mut self) -> Res<Pdu> {
        let mut ch = [0u8; 8];
        self.s
            .read_exact(&mut ch)
            .map_err(|e| format!("receive: {e}"))?;
        let (ty, flags, hlen, pdo, plen) = (
            ch[0],
            ch[1],
            ch[2] as usize,
            ch[3] as usize,
            le32(&ch, 4) as usize,
        );
        if plen < 8 || hlen < 8 || plen > (16 << 20) {
            return Err(format!("bad PDU header {ch:?}"));
        }
        let mut rest = vec![0u8; plen - 8];
        self.s
            .read_exact(&mut rest)
            .map_err(|e| format!("receive: {e}"))?;
        let mut whole = ch.to_vec();
        whole.extend_from_slice(&rest);
        let hd = if flags & 0x01 != 0 { 4 } else { 0 };
        if hd != 0 && crc32c(&whole[..hlen]) != le32(&whole, hlen) {
            return Err("header digest mismatch".into());
        }
        let data = if pdo != 0 && pdo < plen {
            let dd = if flags & 0x02 != 0 { 4 } else { 0 };
            let d = whole[pdo..plen - dd].to_vec();
            if dd != 0 && crc32c(&d) != le32(&whole, plen - 4) {
                return Err("data digest mismatch".into());
            }
            d
        } else {
            Vec::new()
        };
        Ok(Pdu {
            ty,
            flags,
            hdr: whole[8..hlen].to_vec(),
            data,
        })
    }

    fn pdu(&mut self, ty: u8, flags: u8, hdr: &[u8], data: &[u8]) -> Res<()> {
        let hlen = 8 + hdr.len();
        let hd = if self.hdgst { 4 } else { 0 };
        let dd = if self.ddgst && !data.is_empty() { 4 } else { 0 };
        let pdo = if data.is_empty() { 0 } else { hlen + hd };
        let plen = hlen + hd + data.len() + dd;
        let mut f = flags;
        if self.hdgst {
            f |= 0x01;
        }
        if dd != 0 {
            f |= 0x02;
        }
        let mut b = Vec::with_capacity(plen);
        b.extend_from_slice(&[ty, f, hlen as u8, pdo as u8]);
        b.extend_from_slice(&(plen as u32).to_le_bytes());
        b.extend_from_slice(hdr);
        if hd != 0 {
            let c = crc32c(&b);
            b.extend_from_slice(&c.to_le_bytes());
        }
        b.extend_from_slice(data);
        if dd != 0 {
            b.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        self.raw(&b)
    }

    /// Send a command. `data` goes in the capsule when it fits, else after an R2T.
    /// `read_len` is the data the controller returns. Returns the command id.
    pub fn send_cmd(&mut self, mut sqe: Sqe, data: Option<&[u8]>, read_len: usize) -> Res<u16> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
        match data {
            Some(d) if d.len() <= INLINE_MAX => {
                sqe.sgl(d.len(), true);
                self.pdu(0x04, 0, &sqe.0, d)
            }
            Some(d) => {
                sqe.sgl(d.len(), false);
                self.pending.push((cid, d.to_vec()));
                self.pdu(0x04, 0, &sqe.0, &[])
            }
            None => {
                sqe.sgl(read_len, false);
                if read_len > 0 {
                    self.reads.push((cid, vec![0u8; read_len]));
                }
                self.pdu(0x04, 0, &sqe.0, &[])
            }
        }?;
        Ok(cid)
    }

    /// Handle PDUs until a completion arrives; returns it with any data read.
    pub fn next_completion(&mut self) -> Res<(Completion, Vec<u8>)> {
        loop {
            let p = self.recv()?;
            match p.ty {
                0x05 => {
                    let c = &p.hdr;
                    let comp = Completion {
                        dw0: le32(c, 0),
                        dw1: le32(c, 4),
                        cid: le16(c, 12),
                        status: (le16(c, 14) >> 1) & 0x7ff,
                    };
                    let data = match self.reads.iter().position(|(id, _)| *id == comp.cid) {
                        Some(i) => self.reads.swap_remove(i).1,
                        None => Vec::new(),
                    };
                    self.pending.retain(|(id, _)| *id != comp.cid);
                    return Ok((comp, data));
                }
                0x07 => {
                    let (cid, off) = (le16(&p.hdr, 0), le32(&p.hdr, 4) as usize);
                    let Some((_, buf)) = self.reads.iter_mut().find(|(id, _)| *id == cid) else {
                        return Err(format!("C2HData for unknown command {cid}"));
                    };
                    if off + p.data.len() > buf.len() {
                        return Err("C2HData past the buffer".into());
                    }
                    buf[off..off + p.data.len()].copy_from_slice(&p.data);
                }
                0x09 => {
                    let (cid, ttag, off, len) = (
                        le16(&p.hdr, 0),
                        le16(&p.hdr, 2),
                        le32(&p.hdr, 4) as usize,
                        le32(&p.hdr, 8) as usize,
                    );
                    let Some((_, d)) = self.pending.iter().find(|(id, _)| *id == cid) else {
                        return Err(format!("R2T for unknown command {cid}"));
                    };
                    if off + len > d.len() {
                        return Err("R2T past the data".into());
                    }
                    let chunk = d[off..off + len].to_vec();
                    // Send in 32 KiB H2CData PDUs, the last with the LAST flag.
                    let mut o = 0;
                    while o < chunk.len() {
                        let n = (chunk.len() - o).min(32 << 10);
                        let mut h = Vec::with_capacity(16);
                        h.extend_from_slice(&cid.to_le_bytes());
                        h.extend_from_slice(&ttag.to_le_bytes());
                        h.extend_from_slice(&((off + o) as u32).to_le_bytes());
                        h.extend_from_slice(&(n as u32).to_le_bytes());
                        h.extend_from_slice(&[0; 4]);
                        let last = if o + n == chunk.len() { 0x04 } else { 0 };
                        self.pdu(0x06, last, &h, &chunk[o..o + n])?;
                        o += n;
                    }
                }
                0x03 => {
                    return Err(format!(
                        "controller terminated the connection (FES {:#x})",
                        le16(&p.hdr, 0)
                    ))
                }
                t => return Err(format!("unexpected PDU type {t:#x}")),
            }
        }
    }

    /// Send a command and wait for its completion.
    pub fn cmd(
        &mut self,
        sqe: Sqe,
        data: Option<&[u8]>,
        read_len: usize,
    ) -> Res<(Completion, Vec<u8>)> {
        self.send_cmd(sqe, data, read_len)?;
        self.next_completion()
    }

    /// Fabrics Connect. Returns the completion (dword 0 is the controller id on success).
    pub fn connect(
        &mut self,
        qid: u16,
        entries: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
    ) -> Res<Completion> {
        self.connect_kato(qid, entries, subnqn, hostnqn, cntlid, 0)
    }

    /// Fabrics Connect with a keep-alive timeout (ms). Dword 0 of a successful
    /// completion holds the controller id, and bit 17 (AUTHREQ.ATR) asks for
    /// authentication.
    pub fn connect_kato(
        &mut self,
        qid: u16,
        entries: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato_ms: u32,
    ) -> Res<Completion> {
        let sqe = Sqe::fabrics(0x01)
            .set(42, &qid.to_le_bytes())
            .set(44, &(entries - 1).to_le_bytes())
            .set(48, &kato_ms.to_le_bytes());
        let mut d = vec![0u8; 1024];
        d[..16].copy_from_slice(&hostid(hostnqn));
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
        let (c, _) = self.cmd(sqe, Some(&d), 0)?;
        if c.ok() {
            self.qid = qid;
        }
        Ok(c)
    }

    pub fn prop_get(&mut self, off: u32, eight: bool) -> Res<u64> {
        let sqe = Sqe::fabrics(0x04)
            .set(40, &[eight as u8])
            .set(44, &off.to_le_bytes());
        let (c, _) = self.cmd(sqe, None, 0)?;
        if !c.ok() {
            return Err(format!("property get {off:#x}: status {:#x}", c.status));
        }
        Ok(c.dw0 as u64 | (c.dw1 as u64) << 32)
    }

    pub fn prop_set(&mut self, off: u32, v: u32) -> Res<()> {
        let sqe = Sqe::fabrics(0x00)
            .set(44, &off.to_le_bytes())
            .set(48, &(v as u64).to_le_bytes());
        let (c, _) = self.cmd(sqe, None, 0)?;
        if !c.ok() {
            return Err(format!("property set {off:#x}: status {:#x}", c.status));
        }
        Ok(())
    }

    /// An admin command returning `len` bytes.
    pub fn admin_read(&mut self, sqe: Sqe, len: usize) -> Res<Vec<u8>> {
        let (c, d) = self.cmd(sqe, None, len)?;
        if !c.ok() {
            return Err(format!(
                "admin opcode {:#x}: status {:#x}",
                sqe.0[0], c.status
            ));
        }
        Ok(d)
    }
}

/// A host id derived from the host NQN (stable per NQN).
fn hostid(hostnqn: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in hostnqn.bytes().enumerate() {
        id[i % 16] = id[i % 16].wrapping_mul(31).wrapping_add(b);
    }
    id
}

/// A connected controller: admin queue and I/O queues.
pub struct Host {
    pub admin: Queue,
    pub io: Vec<Queue>,
    pub cntlid: u16,
    /// What DH-HMAC-CHAP settled on for the admin queue, if it ran.
    pub auth: Option<Negotiated>,
}

/// How [`Host::connect_with`] connects.
#[derive(Clone, Debug, Default)]
pub struct HostOpts {
    pub nr_io: u16,
    pub entries: u16,
    pub digests: bool,
    /// Keep-alive timeout asked for at Connect (ms; 0: none).
    pub kato_ms: u32,
    /// Secrets to authenticate with when the controller asks (every queue).
    pub auth: Option<DhchapHost>,
}

/// AUTHREQ.ATR in a Connect completion's dword 0.
pub const AUTHREQ_ATR: u32 = 1 << 17;

impl Queue {
    /// Connect, then authenticate if the controller asks for it (and `auth` is given).
    #[allow(clippy::too_many_arguments)]
    fn connect_auth(
        &mut self,
        qid: u16,
        entries: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato_ms: u32,
        auth: Option<&DhchapHost>,
    ) -> Res<(Completion, Option<Negotiated>)> {
        let c = self.connect_kato(qid, entries, subnqn, hostnqn, cntlid, kato_ms)?;
        if !c.ok() {
            let (sct, sc) = c.sct_sc();
            return Err(format!(
                "connect refused: sct {sct:#x} sc {sc:#x} dw0 {:#x}",
                c.dw0
            ));
        }
        let n = match (c.dw0 & AUTHREQ_ATR != 0, auth) {
            (true, Some(a)) => Some(
                self.authenticate(subnqn, hostnqn, a)
                    .map_err(|e| format!("qid {qid}: authentication failed: {e}"))?,
            ),
            (true, None) => {
                return Err(format!(
                    "qid {qid}: the controller requires authentication and no secret was given"
                ))
            }
            (false, _) => None,
        };
        Ok((c, n))
    }
}

impl Host {
    /// Connect to `subnqn` as `hostnqn` with `nr_io` I/O queues of `entries` each.
    pub fn connect(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        nr_io: u16,
        entries: u16,
        digests: bool,
    ) -> Res<Host> {
        Host::connect_with(
            addr,
            subnqn,
            hostnqn,
            &HostOpts {
                nr_io,
                entries,
                digests,
                ..Default::default()
            },
        )
    }

    /// Connect with keep-alive and DH-HMAC-CHAP options.
    pub fn connect_with(addr: SocketAddr, subnqn: &str, hostnqn: &str, o: &HostOpts) -> Res<Host> {
        let (nr_io, entries, digests) = (o.nr_io, o.entries, o.digests);
        let mut admin = Queue::open(addr, digests, digests)?;
        let (c, auth) =
            admin.connect_auth(0, 32, subnqn, hostnqn, 0xffff, o.kato_ms, o.auth.as_ref())?;
        let cntlid = c.dw0 as u16;
        admin.prop_set(0x14, 1 | 6 << 16 | 4 << 20)?; // EN, IOSQES 64, IOCQES 16
        for _ in 0..100 {
            if admin.prop_get(0x1c, false)? & 1 == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut io = Vec::new();
        if nr_io > 0 {
            let n = (nr_io - 1) as u32;
            let (c, _) = admin.cmd(
                Sqe::new(0x09, 0).cdw(10, 0x07).cdw(11, n | n << 16),
                None,
                0,
            )?;
            if !c.ok() {
                return Err(format!("set features number of queues: {:#x}", c.status));
            }
            let granted = (c.dw0 & 0xffff) as u16 + 1;
            for qid in 1..=nr_io.min(granted) {
                let mut q = Queue::open(addr, digests, digests)?;
                q.connect_auth(qid, entries, subnqn, hostnqn, cntlid, 0, o.auth.as_ref())?;
                io.push(q);
            }
        }
        Ok(Host {
            admin,
            io,
            cntlid,
            auth,
        })
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> Res<Vec<u8>> {
        self.admin
            .admin_read(Sqe::new(0x06, nsid).cdw(10, cns as u32), 4096)
    }

    /// The discovery log page: (subnqn, traddr, trsvcid) of each entry.
    pub fn discovery_log(&mut self) -> Res<Vec<(String, String, String)>> {
        let head = self
            .admin
            .admin_read(Sqe::new(0x02, 0).cdw(10, 0x70 | (1024 / 4 - 1) << 16), 1024)?;
        let n = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default()) as usize;
        let len = 1024 * (n + 1);
        let numd = (len / 4 - 1) as u32;
        let page = self.admin.admin_read(
            Sqe::new(0x02, 0)
                .cdw(10, 0x70 | (numd & 0xffff) << 16)
                .cdw(11, numd >> 16),
            len,
        )?;
        let s = |b: &[u8]| {
            String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())])
                .trim()
                .to_string()
        };
        Ok((0..n)
            .map(|i| {
                let e = &page[1024 * (i + 1)..1024 * (i + 2)];
                (s(&e[256..512]), s(&e[512..768]), s(&e[32..64]))
            })
            .collect())
    }

    /// Orderly shutdown (CC.SHN), as `nvme disconnect` does.
    pub fn shutdown(mut self) -> Res<()> {
        self.admin.prop_set(0x14, 1 | 1 << 14)?;
        let st = self.admin.prop_get(0x1c, false)?;
        if (st >> 2) & 3 != 2 {
            return Err(format!("shutdown not complete: CSTS {st:#x}"));
        }
        Ok(())
    }
}

/// Run a random-I/O workload on namespace `nsid` through I/O queue `w.queue` of `h`,
/// keeping `w.queue_depth` commands in flight (pipelined on the one connection).
pub fn run_workload(
    h: &mut Host,
    nsid: u32,
    w: &crate::workload::Workload,
) -> Res<crate::workload::Measured> {
    use crate::client::Op;
    use crate::workload::{LatHist, Measured, Rng};
    use std::time::Instant;
    let id = h.identify(0, nsid)?;
    let blocks_ns = u64::from_le_bytes(id[0..8].try_into().map_err(|_| "identify")?);
    let lbads = id[130];
    let bs_lba = 1usize << lbads;
    let nlb = (w.block_size / bs_lba) as u32;
    let span = blocks_ns / nlb as u64;
    if nlb == 0 || span == 0 {
        return Err("namespace smaller than one I/O".into());
    }
    let q = h.io.get_mut(w.queue).ok_or("no such I/O queue")?;
    let data: Vec<u8> = (0..w.block_size).map(|i| (i % 251) as u8).collect();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut started: Vec<(u16, Instant)> = Vec::with_capacity(w.queue_depth);
    let mut hist = LatHist::default();
    let issue = |q: &mut Queue, rng: &mut Rng| -> Res<u16> {
        let slba = (rng.next_u64() % span) * nlb as u64;
        if w.pick(rng) == Op::Write {
            q.send_cmd(Sqe::write(nsid, slba, nlb), Some(&data), 0)
        } else {
            q.send_cmd(Sqe::read(nsid, slba, nlb), None, w.block_size)
        }
    };
    let t0 = Instant::now();
    let end = t0 + w.duration;
    for _ in 0..w.queue_depth.max(1) {
        let cid = issue(q, &mut rng)?;
        started.push((cid, Instant::now()));
    }
    let mut ios = 0u64;
    while !started.is_empty() {
        let (c, _) = q.next_completion()?;
        if !c.ok() {
            return Err(format!("{:?} failed: status {:#x}", w.op, c.status));
        }
        let now = Instant::now();
        if let Some(i) = started.iter().position(|(id, _)| *id == c.cid) {
            hist.record(now - started.swap_remove(i).1);
        }
        ios += 1;
        if now < end {
            let cid = issue(q, &mut rng)?;
            started.push((cid, now));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(Measured {
        ios,
        seconds: secs,
        iops: ios as f64 / secs,
        p50_us: hist.percentile_us(0.50),
        p95_us: hist.percentile_us(0.95),
        p99_us: hist.percentile_us(0.99),
    })
}
