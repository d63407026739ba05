//! One NVMe/TCP connection (one queue pair): a [`WorkSource`] a worker polls.
//!
//! It reads PDUs from its socket into a buffer, turns command capsules into admin
//! commands (qid 0) or [`IoCommand`]s (I/O queues), asks for write data with R2T when it
//! is not in the capsule, and sends C2HData and CapsuleResp PDUs when commands finish.
//! A PDU that breaks the protocol ends this connection only: the controller sends a
//! C2HTermReq and closes once nothing is in flight.

use std::io::ErrorKind;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use nvmux_core::stats::{OpClass, QueueStats};
use nvmux_core::worker::{Readiness, WorkSource};
use nvmux_core::{AlignedBuf, BlockQueue, DeviceInfo, IoCommand, Opcode, SgList, Status};

use crate::ctrl::{
    self, connect, parse_io, sc, Controller, Cqe, IoPlan, Namespace, NsMap, Outcome, Resolver, Sqe,
    Waker, Where, IN_CAPSULE_DATA, MAX_TRANSFER, SGL_IN_CAPSULE, SGL_TRANSPORT,
};
use crate::pdu::{self, Digests, Pdu, PduError};

/// Largest H2CData payload the host may send in one PDU (MAXH2CDATA).
pub const MAX_H2C_DATA: usize = MAX_TRANSFER;
/// Receive buffer: the largest PDU (header, digest, padding, data, digest) and more.
const RX_CAP: usize = 2 * (MAX_H2C_DATA + 512);
/// Stop reading new PDUs while this much output waits for the socket.
const TX_HIGH: usize = 4 << 20;

pub use nvmux_core::Wire;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for ICReq.
    Init,
    /// ICResp sent; commands flow.
    Ready,
    /// Terminated: nothing more is read; closes when nothing is in flight.
    Dead,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Free,
    /// Waiting for H2CData after an R2T.
    AwaitData,
    /// Sent to the block queue(s).
    InFlight,
}

struct Slot {
    stage: Stage,
    cid: u16,
    sqe: [u8; 64],
    /// Bytes the host sends with the command (via R2T), or the controller returns.
    len: usize,
    got: usize,
    /// I/O data (aligned, for O_DIRECT backends).
    buf: Option<AlignedBuf>,
    /// Admin or Dataset Management data.
    small: Vec<u8>,
    /// Block commands still in flight (several for a multi-range deallocate).
    pending: u32,
    status: Status,
    start: Instant,
    class: OpClass,
    /// Index into `queues` of the namespace the command runs on.
    q: usize,
}

struct NsQueue {
    ns: Arc<Namespace>,
    info: DeviceInfo,
    bq: Box<dyn BlockQueue>,
    stats: Arc<QueueStats>,
    /// The namespace left the subsystem: no new commands, drop when idle.
    retired: bool,
}

/// A connection's fixed context.
pub struct ConnParams {
    pub resolver: Arc<dyn Resolver>,
    pub at: Where,
    pub peer: String,
}

pub struct Conn {
    wire: Box<dyn Wire>,
    p: ConnParams,
    waker: Arc<Waker>,
    phase: Phase,
    dg: Digests,
    hpda: u8,
    rx: Vec<u8>,
    rx_head: usize,
    rx_tail: usize,
    /// The last recv filled the buffer: there may be more without a new edge.
    rx_more: bool,
    /// The peer closed its side.
    eof: bool,
    tx: Vec<u8>,
    tx_off: usize,
    tx_blocked: bool,
    /// The socket reported a hang-up: read until the end of the stream shows.
    hup: bool,
    ctrl: Option<Arc<Controller>>,
    qid: u16,
    sqhd: u16,
    entries: u16,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Held Asynchronous Event Requests (command ids).
    aers: Vec<u16>,
    ns: NsMap,
    ns_gen: u64,
    queues: Vec<NsQueue>,
    /// Queues dropped once the worker has re-read our fds.
    graveyard: Vec<NsQueue>,
    fds_changed: bool,
    bufs: Vec<Vec<AlignedBuf>>,
    out: Vec<u8>,
    done: Vec<(IoCommand, Status)>,
    finished: bool,
}

fn size_class(len: usize) -> usize {
    (len.max(4096).next_power_of_two().trailing_zeros() - 12) as usize
}

impl Conn {
    pub fn new(wire: Box<dyn Wire>, p: ConnParams) -> std::io::Result<Conn> {
        Ok(Conn {
            wire,
            p,
            waker: Waker::new()?,
            phase: Phase::Init,
            dg: Digests::default(),
            hpda: 0,
            rx: vec![0u8; RX_CAP],
            rx_head: 0,
            rx_tail: 0,
            rx_more: true,
            eof: false,
            tx: Vec::with_capacity(64 << 10),
            tx_off: 0,
            tx_blocked: false,
            hup: false,
            ctrl: None,
            qid: 0,
            sqhd: 0,
            entries: 0,
            slots: Vec::new(),
            free: Vec::new(),
            aers: Vec::new(),
            ns: Arc::default(),
            ns_gen: 0,
            queues: Vec::new(),
            graveyard: Vec::new(),
            fds_changed: false,
            bufs: (0..=size_class(MAX_TRANSFER)).map(|_| Vec::new()).collect(),
            out: Vec::with_capacity(4096),
            done: Vec::new(),
            finished: false,
        })
    }

    /// The waker other threads use to stop this connection.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    fn in_flight(&self) -> bool {
        self.slots.iter().any(|s| s.stage == Stage::InFlight)
    }

    /// Protocol error: send a C2HTermReq and stop reading.
    fn terminate(&mut self, e: PduError, hdr: &[u8]) {
        tracing::warn!(peer = %self.p.peer, fes = e.fes, fei = e.fei, "nvme/tcp: {}; connection terminated", e.why);
        if self.phase != Phase::Dead {
            pdu::c2h_term(&mut self.tx, e.fes, e.fei, hdr);
        }
        self.die();
    }

    fn die(&mut self) {
        if self.phase == Phase::Dead {
            return;
        }
        self.phase = Phase::Dead;
        // Held AERs end with the connection; commands in flight finish first.
        self.aers.clear();
    }

    fn get_buf(&mut self, len: usize) -> Option<AlignedBuf> {
        let c = size_class(len);
        match self.bufs.get_mut(c).and_then(|v| v.pop()) {
            Some(b) => Some(b),
            None => AlignedBuf::try_new(4096 << c),
        }
    }

    fn put_buf(&mut self, b: AlignedBuf) {
        let c = size_class(b.len());
        if let Some(v) = self.bufs.get_mut(c) {
            if v.len() < 64 {
                v.push(b);
            }
        }
    }

    fn respond(&mut self, cid: u16, cqe: Cqe) {
        let e = cqe.encode(cid, self.sqhd, self.qid);
        pdu::capsule_resp(&mut self.tx, &e, self.dg);
    }

    /// Send `data` as C2HData (in one PDU), then the response.
    fn respond_with_data(&mut self, cid: u16, data: &[u8], cqe: Cqe) {
        if !data.is_empty() {
            pdu::c2h_data_header(&mut self.tx, cid, 0, data.len(), true, self.dg, self.hpda);
            self.tx.extend_from_slice(data);
            if self.dg.data {
                pdu::data_digest(&mut self.tx, &[data]);
            }
        }
        self.respond(cid, cqe);
    }

    fn free_slot(&mut self, i: u16) {
        let s = &mut self.slots[i as usize];
        s.stage = Stage::Free;
        s.small.clear();
        if let Some(b) = s.buf.take() {
            self.put_buf(b);
        }
        self.free.push(i);
    }

    // ---- receiving ---------------------------------------------------------------------

    fn recv(&mut self) -> usize {
        let mut n = 0;
        if !self.rx_more && !self.hup {
            return 0; // drained, and no edge since: nothing to read
        }
        while !self.eof && self.phase != Phase::Dead && self.pending_tx() < TX_HIGH {
            if self.rx_tail == self.rx.len() {
                if self.rx_head == 0 {
                    break; // full: a PDU must be consumed first
                }
                self.rx.copy_within(self.rx_head..self.rx_tail, 0);
                self.rx_tail -= self.rx_head;
                self.rx_head = 0;
            }
            let tail = self.rx_tail;
            match self.wire.recv(&mut self.rx[tail..]) {
                Ok(0) => {
                    self.eof = true;
                    self.rx_more = false;
                }
                Ok(k) => {
                    self.rx_tail += k;
                    self.rx_more = self.rx_tail == self.rx.len();
                    n += 1;
                    n += self.process_rx();
                    if !self.rx_more {
                        // Short read: the socket is drained; the next edge wakes us.
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.rx_more = false;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %self.p.peer, "nvme/tcp: receive: {e}");
                    self.eof = true;
                    self.rx_more = false;
                }
            }
        }
        n
    }

    /// Handle every complete PDU in the receive buffer.
    fn process_rx(&mut self) -> usize {
        let mut n = 0;
        while self.phase != Phase::Dead && self.rx_tail - self.rx_head >= pdu::CH {
            let ch: [u8; pdu::CH] = match self.rx[self.rx_head..].first_chunk() {
                Some(c) => *c,
                None => break,
            };
            let max = if self.phase == Phase::Init {
                0
            } else {
                MAX_H2C_DATA
            };
            let plen = match pdu::peek_len(&ch, max) {
                Ok(l) => l,
                Err(e) => {
                    self.terminate(e, &ch);
                    break;
                }
            };
            if self.rx_tail - self.rx_head < plen {
                break;
            }
            let start = self.rx_head;
            self.rx_head += plen;
            // Move the buffer out while handling, so handlers can borrow self.
            let rx = std::mem::take(&mut self.rx);
            let r = pdu::parse(&rx[start..start + plen], self.dg, max);
            match r {
                Ok(p) => self.on_pdu(p, &rx[start..start + plen.min(pdu::TERM_MAX_DATA)]),
                Err(e) => self.terminate(e, &rx[start..start + plen.min(pdu::TERM_MAX_DATA)]),
            }
            self.rx = rx;
            n += 1;
        }
        if self.rx_head == self.rx_tail {
            self.rx_head = 0;
            self.rx_tail = 0;
        }
        n
    }

    fn on_pdu(&mut self, p: Pdu<'_>, hdr: &[u8]) {
        let seq = |why| PduError {
            fes: pdu::FES_SEQUENCE,
            fei: 0,
            why,
        };
        match (self.phase, p) {
            (
                Phase::Init,
                Pdu::ICReq {
                    pfv, hpda, digests, ..
                },
            ) => {
                if pfv != 0 {
                    return self.terminate(
                        PduError {
                            fes: pdu::FES_UNSUPPORTED,
                            fei: 8,
                            why: "unsupported PDU format version",
                        },
                        hdr,
                    );
                }
                if hpda > 31 {
                    return self.terminate(
                        PduError {
                            fes: pdu::FES_INVALID_HEADER,
                            fei: 10,
                            why: "HPDA out of range",
                        },
                        hdr,
                    );
                }
                self.hpda = hpda;
                self.dg = digests;
                pdu::icresp(&mut self.tx, digests, MAX_H2C_DATA as u32);
                self.phase = Phase::Ready;
            }
            (Phase::Init, _) => self.terminate(seq("first PDU is not ICReq"), hdr),
            (Phase::Ready, Pdu::ICReq { .. }) => self.terminate(seq("second ICReq"), hdr),
            (Phase::Ready, Pdu::Term { fes }) => {
                tracing::info!(peer = %self.p.peer, fes, "nvme/tcp: host terminated the connection");
                self.die();
            }
            (Phase::Ready, Pdu::Cmd { sqe, data }) => self.on_cmd(sqe, data, hdr),
            (
                Phase::Ready,
                Pdu::H2CData {
                    cccid,
                    ttag,
                    datao,
                    last,
                    data,
                },
            ) => self.on_h2c(cccid, ttag, datao, last, data, hdr),
            (Phase::Dead, _) => {}
        }
    }

    fn on_cmd(&mut self, sqe: &[u8; 64], data: &[u8], hdr: &[u8]) {
        if data.len() > IN_CAPSULE_DATA {
            return self.terminate(
                PduError {
                    fes: pdu::FES_LIMIT,
                    fei: 4,
                    why: "in-capsule data larger than IOCCSZ allows",
                },
                hdr,
            );
        }
        if self.entries != 0 {
            self.sqhd = (self.sqhd + 1) % self.entries;
        }
        let s = Sqe(sqe);
        let cid = s.cid();
        let Some(i) = self.alloc_slot() else {
            return self.terminate(
                PduError {
                    fes: pdu::FES_SEQUENCE,
                    fei: 0,
                    why: "more commands outstanding than the queue holds",
                },
                hdr,
            );
        };
        {
            let sl = &mut self.slots[i as usize];
            sl.cid = cid;
            sl.sqe = *sqe;
            sl.start = Instant::now();
            sl.status = Status::SUCCESS;
            sl.pending = 0;
            sl.got = 0;
            sl.len = 0;
            sl.class = OpClass::Other;
        }
        let dir = s.direction();
        let sgl_len = s.sgl_len() as usize;
        // I/O commands know their namespace and data size up front.
        let mut io = None;
        if self.ctrl.is_some() && self.qid != 0 && !s.is_fabrics() {
            match self.plan_io(s) {
                Ok(x) => io = Some(x),
                Err(st) => return self.finish_now(i, Cqe::err(st)),
            }
        }
        let want = match &io {
            // Linux may describe a Dataset Management range list with a longer buffer
            // (a whole page): take what the SGL says, within reason.
            Some((_, IoPlan::Dsm { ranges, .. }))
                if sgl_len >= ranges * 16 && sgl_len <= 64 << 10 =>
            {
                sgl_len
            }
            Some((q, plan)) => plan.data_len(self.queues[*q].info.block_size),
            None if dir & 3 != 0 => sgl_len,
            None => 0,
        };
        if want > 0 && want != sgl_len {
            return self.finish_now(i, Cqe::err(sc::SGL_LENGTH_INVALID));
        }
        if want > 0 && dir & 2 != 0 && s.sgl_type() != SGL_TRANSPORT {
            return self.finish_now(i, Cqe::err(sc::SGL_TYPE_INVALID));
        }
        let host_to_ctrl = want > 0 && dir & 1 != 0;
        // Where the host data goes: an aligned buffer for block I/O, else `small`.
        let big = matches!(io, Some((_, IoPlan::One { .. })));
        if want > 0 && big {
            match self.get_buf(want) {
                Some(b) => self.slots[i as usize].buf = Some(b),
                None => return self.finish_now(i, Cqe::err(Status::INTERNAL_ERROR)),
            }
        }
        self.slots[i as usize].len = want;
        if host_to_ctrl {
            match s.sgl_type() {
                SGL_IN_CAPSULE => {
                    let off = s.sgl_addr();
                    if off != 0 {
                        return self.finish_now(i, Cqe::err(sc::SGL_OFFSET_INVALID));
                    }
                    if data.len() < want {
                        return self.finish_now(i, Cqe::err(sc::SGL_LENGTH_INVALID));
                    }
                    self.store(i, 0, &data[..want]);
                    self.slots[i as usize].got = want;
                }
                SGL_TRANSPORT => {
                    if !data.is_empty() {
                        return self.finish_now(i, Cqe::err(sc::SGL_TYPE_INVALID));
                    }
                    self.slots[i as usize].stage = Stage::AwaitData;
                    pdu::r2t(&mut self.tx, cid, i, 0, want as u32, self.dg);
                    return;
                }
                _ => return self.finish_now(i, Cqe::err(sc::SGL_TYPE_INVALID)),
            }
        }
        self.execute(i, io);
    }

    fn store(&mut self, i: u16, off: usize, data: &[u8]) {
        let sl = &mut self.slots[i as usize];
        if let Some(b) = sl.buf.as_mut() {
            b.as_mut_slice()[off..off + data.len()].copy_from_slice(data);
        } else {
            if sl.small.len() < off + data.len() {
                sl.small.resize(off + data.len(), 0);
            }
            sl.small[off..off + data.len()].copy_from_slice(data);
        }
    }

    fn on_h2c(&mut self, cccid: u16, ttag: u16, datao: u32, last: bool, data: &[u8], hdr: &[u8]) {
        let ok = self
            .slots
            .get(ttag as usize)
            .is_some_and(|s| s.stage == Stage::AwaitData && s.cid == cccid);
        if !ok {
            return self.terminate(
                PduError {
                    fes: pdu::FES_INVALID_HEADER,
                    fei: 10,
                    why: "H2CData for an unknown transfer tag or command",
                },
                hdr,
            );
        }
        let (len, got) = {
            let s = &self.slots[ttag as usize];
            (s.len, s.got)
        };
        let off = datao as usize;
        if off != got || off + data.len() > len {
            return self.terminate(
                PduError {
                    fes: pdu::FES_OUT_OF_RANGE,
                    fei: 12,
                    why: "H2CData offset or length outside the requested range",
                },
                hdr,
            );
        }
        self.store(ttag, off, data);
        let got = off + data.len();
        self.slots[ttag as usize].got = got;
        if got == len {
            if !last {
                tracing::debug!(peer = %self.p.peer, "nvme/tcp: last H2CData without the LAST flag");
            }
            let io = if self.qid != 0 && self.ctrl.is_some() {
                let sqe = self.slots[ttag as usize].sqe;
                match self.plan_io(Sqe(&sqe)) {
                    Ok(x) => Some(x),
                    Err(st) => return self.finish_now(ttag, Cqe::err(st)),
                }
            } else {
                None
            };
            self.execute(ttag, io);
        }
    }

    fn alloc_slot(&mut self) -> Option<u16> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        // Room for the admin queue before Connect (and for AERs beyond its entries).
        let cap = if self.entries == 0 {
            4
        } else {
            self.entries as usize + ctrl::MAX_AERS
        };
        if self.slots.len() >= cap {
            return None;
        }
        self.slots.push(Slot {
            stage: Stage::Free,
            cid: 0,
            sqe: [0; 64],
            len: 0,
            got: 0,
            buf: None,
            small: Vec::new(),
            pending: 0,
            status: Status::SUCCESS,
            start: Instant::now(),
            class: OpClass::Other,
            q: 0,
        });
        Some((self.slots.len() - 1) as u16)
    }

    fn finish_now(&mut self, i: u16, cqe: Cqe) {
        let cid = self.slots[i as usize].cid;
        self.respond(cid, cqe);
        self.free_slot(i);
    }

    // ---- executing -----------------------------------------------------------------------

    /// Refresh the namespace snapshot if the subsystem changed.
    fn refresh_ns(&mut self) {
        let Some(c) = &self.ctrl else { return };
        let g = c.subsys.ns_generation();
        if g == self.ns_gen {
            return;
        }
        self.ns_gen = g;
        self.ns = c.subsys.namespaces();
        for q in self.queues.iter_mut() {
            let cur = self.ns.get(&q.ns.nsid);
            if !cur.is_some_and(|n| Arc::ptr_eq(n, &q.ns)) {
                q.retired = true;
            }
        }
    }

    /// The queue of namespace `nsid` on this connection, opened on first use.
    fn queue_for(&mut self, nsid: u32) -> Result<usize, Status> {
        if let Some(i) = self
            .queues
            .iter()
            .position(|q| q.ns.nsid == nsid && !q.retired)
        {
            return Ok(i);
        }
        let ns = self
            .ns
            .get(&nsid)
            .cloned()
            .ok_or(Status::INVALID_NAMESPACE)?;
        let bq = ns.dev.open_queue(self.entries.max(1) as u32).map_err(|e| {
            tracing::error!(disk = %ns.disk, "nvme/tcp: cannot open a queue: {e}");
            Status::INTERNAL_ERROR
        })?;
        let mut info = ns.dev.info().clone();
        info.num_blocks = ns.num_blocks();
        let stats = ns.stats.new_queue();
        self.queues.push(NsQueue {
            ns,
            info,
            bq,
            stats,
            retired: false,
        });
        self.fds_changed = true;
        Ok(self.queues.len() - 1)
    }

    fn plan_io(&mut self, s: Sqe) -> Result<(usize, IoPlan), Status> {
        let q = self.queue_for(s.nsid())?;
        let info = &self.queues[q].info;
        match parse_io(s, info.block_size, info.num_blocks, info.read_only) {
            Err(Status::LBA_OUT_OF_RANGE) => {
                // The namespace may have grown since the queue opened.
                let n = self.queues[q].ns.num_blocks();
                let info = &mut self.queues[q].info;
                info.num_blocks = n;
                parse_io(s, info.block_size, n, info.read_only).map(|p| (q, p))
            }
            r => r.map(|p| (q, p)),
        }
    }

    fn execute(&mut self, i: u16, io: Option<(usize, IoPlan)>) {
        let sqe = self.slots[i as usize].sqe;
        let s = Sqe(&sqe);
        let cid = s.cid();
        let Some(c) = self.ctrl.clone() else {
            return self.do_connect(i, s);
        };
        if self.qid == 0 {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            let r = c.admin(&*self.p.resolver, self.p.at, s, &mut out, self.aers.len());
            match r {
                Outcome::Held => {
                    self.aers.push(cid);
                    self.free_slot(i);
                }
                Outcome::Done(cqe) => {
                    if s.is_fabrics() && s.fctype() == 0x08 {
                        self.respond(cid, cqe);
                        self.free_slot(i);
                        self.die();
                    } else if s.direction() & 2 != 0 && cqe.status.is_ok() {
                        let len = self.slots[i as usize].len;
                        out.resize(len, 0);
                        self.respond_with_data(cid, &out, cqe);
                        self.free_slot(i);
                    } else {
                        self.finish_now(i, cqe);
                    }
                }
            }
            self.out = out;
            return;
        }
        if s.is_fabrics() {
            let cqe = match s.fctype() {
                0x08 => {
                    self.respond(cid, Cqe::ok(0));
                    self.free_slot(i);
                    return self.die();
                }
                0x01 => Cqe::err(sc::CMD_SEQUENCE),
                _ => Cqe::err(Status::INVALID_OPCODE),
            };
            return self.finish_now(i, cqe);
        }
        let Some((q, plan)) = io else {
            return self.finish_now(i, Cqe::err(Status::INTERNAL_ERROR));
        };
        self.slots[i as usize].q = q;
        match plan {
            IoPlan::One { op, slba, nlb, fua } => {
                let sg = match &self.slots[i as usize].buf {
                    Some(b) if op.has_data() => b.sg(0, self.slots[i as usize].len),
                    _ => SgList::default(),
                };
                let mut cmd = IoCommand::new(op, slba, nlb, i as u64, sg);
                cmd.nsid = self.queues[q].ns.nsid;
                cmd.fua = fua;
                if op == Opcode::WriteZeroes && !self.queues[q].info.write_zeroes {
                    // Emulated with a write of zeros.
                    let len = nlb as usize * self.queues[q].info.block_size as usize;
                    if len > MAX_TRANSFER {
                        return self.finish_now(i, Cqe::err(Status::INVALID_FIELD));
                    }
                    let Some(mut b) = self.get_buf(len) else {
                        return self.finish_now(i, Cqe::err(Status::INTERNAL_ERROR));
                    };
                    b.as_mut_slice()[..len].fill(0);
                    cmd = IoCommand::new(Opcode::Write, slba, nlb, i as u64, b.sg(0, len));
                    cmd.nsid = self.queues[q].ns.nsid;
                    self.slots[i as usize].buf = Some(b);
                }
                let sl = &mut self.slots[i as usize];
                sl.class = match op {
                    Opcode::Read => OpClass::Read,
                    Opcode::Write => OpClass::Write,
                    _ => OpClass::Other,
                };
                sl.stage = Stage::InFlight;
                sl.pending = 1;
                self.queues[q].bq.submit(cmd);
            }
            IoPlan::Dsm { deallocate, ranges } => {
                let mut data = std::mem::take(&mut self.slots[i as usize].small);
                data.truncate(ranges * 16);
                let info = self.queues[q].info.clone();
                let mut n = 0;
                let mut bad = false;
                if deallocate && info.discard {
                    for (slba, nlb) in ctrl::dsm_ranges(&data) {
                        if nlb == 0 {
                            continue;
                        }
                        let mut cmd = IoCommand::new(
                            Opcode::Deallocate,
                            slba,
                            nlb,
                            i as u64,
                            SgList::default(),
                        );
                        cmd.nsid = self.queues[q].ns.nsid;
                        if cmd.validate(&info).is_err() {
                            bad = true;
                            break;
                        }
                        self.queues[q].bq.submit(cmd);
                        n += 1;
                    }
                }
                self.slots[i as usize].small = data;
                let sl = &mut self.slots[i as usize];
                if bad {
                    sl.status = Status::LBA_OUT_OF_RANGE;
                }
                if n == 0 {
                    // Deallocate is advisory: nothing to do (or a bad range found first).
                    let st = sl.status;
                    return self.finish_now(i, Cqe::err(st));
                }
                sl.stage = Stage::InFlight;
                sl.pending = n;
            }
        }
    }

    fn do_connect(&mut self, i: u16, s: Sqe) {
        if !(s.is_fabrics() && s.fctype() == 0x01) {
            return self.finish_now(i, Cqe::err(sc::CMD_SEQUENCE));
        }
        let data = std::mem::take(&mut self.slots[i as usize].small);
        let r = connect(&*self.p.resolver, s, &data, &self.p.peer);
        self.slots[i as usize].small = data;
        match r {
            Ok(c) => {
                tracing::info!(
                    peer = %self.p.peer,
                    subsystem = %c.ctrl.subsys.nqn,
                    host = %c.ctrl.host,
                    cntlid = c.ctrl.cntlid,
                    qid = c.qid,
                    "nvme/tcp: queue connected"
                );
                self.qid = c.qid;
                self.entries = c.entries;
                self.sqhd = 1 % c.entries;
                c.ctrl.attach_queue(c.qid, &self.waker);
                let cntlid = c.ctrl.cntlid;
                self.ns_gen = 0;
                self.ctrl = Some(c.ctrl);
                self.refresh_ns();
                self.finish_now(i, Cqe::ok(cntlid as u32));
            }
            Err(cqe) => self.finish_now(i, cqe),
        }
    }

    // ---- completing ----------------------------------------------------------------------

    fn reap(&mut self) -> usize {
        let mut n = 0;
        let mut done = std::mem::take(&mut self.done);
        for qi in 0..self.queues.len() {
            n += self.queues[qi].bq.poll(&mut |c, s| done.push((c, s)));
            if done.is_empty() {
                continue;
            }
            let now = Instant::now();
            for (cmd, st) in done.drain(..) {
                let i = cmd.tag as u16;
                drop(cmd);
                let sl = &mut self.slots[i as usize];
                if !st.is_ok() && sl.status.is_ok() {
                    sl.status = st;
                }
                sl.pending -= 1;
                if sl.pending > 0 {
                    continue;
                }
                let (status, class, len, start, cid) =
                    (sl.status, sl.class, sl.len, sl.start, sl.cid);
                let bytes = if class == OpClass::Other {
                    0
                } else {
                    len as u64
                };
                self.queues[qi].stats.record(
                    class,
                    if status.is_ok() { bytes } else { 0 },
                    now.saturating_duration_since(start),
                    status.is_ok(),
                );
                if class == OpClass::Read && status.is_ok() {
                    let b = self.slots[i as usize].buf.take();
                    if let Some(b) = &b {
                        let data = &b.as_slice()[..len];
                        pdu::c2h_data_header(&mut self.tx, cid, 0, len, true, self.dg, self.hpda);
                        self.tx.extend_from_slice(data);
                        if self.dg.data {
                            pdu::data_digest(&mut self.tx, &[data]);
                        }
                    }
                    self.slots[i as usize].buf = b;
                }
                self.finish_now(i, Cqe::err(status));
            }
        }
        self.done = done;
        n
    }

    fn pending_tx(&self) -> usize {
        self.tx.len() - self.tx_off
    }

    fn flush(&mut self) -> usize {
        let mut n = 0;
        if self.tx_blocked {
            return 0; // the socket was full; its next writable edge clears this
        }
        while self.tx_off < self.tx.len() {
            match self.wire.send(&self.tx[self.tx_off..]) {
                Ok(0) => break,
                Ok(k) => {
                    self.tx_off += k;
                    n += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.tx_blocked = true;
                    return n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %self.p.peer, "nvme/tcp: send: {e}");
                    self.eof = true;
                    self.tx.clear();
                    self.tx_off = 0;
                    self.die();
                    return n;
                }
            }
        }
        self.tx_blocked = false;
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        n
    }

    fn events(&mut self) -> usize {
        let Some(c) = self.ctrl.clone() else { return 0 };
        let mut n = 0;
        while !self.aers.is_empty() {
            let Some(ev) = c.take_event() else { break };
            if let Some(cid) = self.aers.pop() {
                self.respond(cid, Cqe::ok(ev));
                n += 1;
            }
        }
        n
    }
}

impl WorkSource for Conn {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        if self.fds_changed {
            return 1; // the worker re-reads our fds first
        }
        self.graveyard.clear();
        if self.waker.stop.load(std::sync::atomic::Ordering::Acquire) {
            self.die();
        }
        self.refresh_ns();
        let mut n = self.reap();
        n += self.recv();
        for q in self.queues.iter_mut() {
            q.bq.kick();
        }
        if self.qid == 0 && !self.aers.is_empty() {
            n += self.events();
        }
        n += self.reap();
        n += self.flush();
        // Namespaces that left: drop their queues once nothing is in flight (slots refer
        // to queues by index, so indices only change while no command is out).
        if self.queues.iter().any(|q| q.retired) && !self.in_flight() {
            let (gone, keep): (Vec<_>, Vec<_>) = self.queues.drain(..).partition(|q| q.retired);
            self.queues = keep;
            for q in gone {
                q.ns.stats.retire(&q.stats);
                self.graveyard.push(q);
            }
            self.fds_changed = true;
        }
        if self.eof && self.phase != Phase::Dead {
            tracing::info!(peer = %self.p.peer, qid = self.qid, "nvme/tcp: connection closed by the host");
            self.die();
        }
        if self.phase == Phase::Dead && !self.in_flight() {
            let _ = self.flush();
            if let Some(c) = self.ctrl.take() {
                c.detach_queue(self.qid);
            }
            for q in self.queues.drain(..) {
                q.ns.stats.retire(&q.stats);
            }
            self.finished = true;
            return n.max(1);
        }
        for q in self.queues.iter() {
            q.stats.set_in_flight(q.bq.in_flight() as u64);
        }
        n
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.waker.fd()];
        for q in &self.queues {
            q.bq.wait_fds(&mut v);
        }
        v
    }

    fn socket_fd(&self) -> Option<RawFd> {
        self.wire.fd()
    }

    fn take_fds_changed(&mut self) -> bool {
        let mut changed = std::mem::take(&mut self.fds_changed);
        for q in self.queues.iter_mut() {
            changed |= q.bq.take_fds_changed();
        }
        changed
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.finished || self.fds_changed {
            return false;
        }
        // More bytes may sit in the socket (the buffer filled up) or in our buffer.
        if self.rx_more && !self.eof && self.pending_tx() < TX_HIGH {
            return false;
        }
        if self.pending_tx() > 0 && !self.tx_blocked {
            return false;
        }
        if self.phase == Phase::Dead && !self.in_flight() {
            return false;
        }
        self.queues.iter().all(|q| q.bq.may_sleep())
    }

    fn after_sleep(&mut self) {}

    fn finished(&self) -> bool {
        self.finished
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|q| q.bq.next_deadline())
            .min()
    }

    fn socket_ready(&mut self, r: Readiness) {
        if r.readable {
            self.rx_more = true;
        }
        self.hup |= r.hup;
        if r.writable {
            self.tx_blocked = false;
        }
    }

    fn describe(&self) -> String {
        format!(
            "NVMe/TCP connection from {} (qid {})",
            self.p.peer, self.qid
        )
    }
}
