//! One NVMe/TCP connection (one queue pair): a [`WorkSource`] a worker polls.
//!
//! It reads PDUs from its socket, turns command capsules into admin commands (qid 0) or
//! [`IoCommand`]s (I/O queues), asks for write data with R2T when it is not in the
//! capsule, and sends C2HData and CapsuleResp PDUs when commands finish. A PDU that breaks
//! the protocol ends this connection only: the controller sends a C2HTermReq and closes
//! once nothing is in flight.
//!
//! Bounds (see docs/nvmf.md, "Limits"): every length from the host is checked before
//! memory is reserved for it, and every buffer is taken from the connection's
//! [`ConnBudget`] (itself a share of the daemon-wide [`MemBudget`]):
//!
//! ```text
//!  receive buffer   starts at 4 KiB; grows to hold one PDU (a capsule with 8 KiB of
//!                   in-capsule data at most), and up to 64 KiB while reads fill it
//!  H2CData payload  received straight into its command's buffer (never buffered whole)
//!  command buffers  one per command with data, sized by the command (at most MDTS);
//!                   pooled per size class
//!  send buffer      responses and PDU headers only; read data goes out from the
//!                   command's own buffer (writev)
//!  inline reserve   8 KiB taken at Connect: an in-capsule command always finds a buffer
//! ```
//!
//! When memory is short the connection waits, never fails: a command that needs a buffer
//! is parked (in order) until one is free, and a capsule whose in-capsule data cannot be
//! stored stays unread in the receive buffer (the socket is not read meanwhile). Commands
//! parked this way depend on nothing later in the stream, so waiting cannot deadlock.
//!
//! Timers: the handshake (accept to a completed Connect and authentication), stalls (a
//! PDU started but not finished, an R2T whose data does not come, output the host does not
//! read) and, on an admin queue, the controller's keep-alive timeout.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmux_core::budget::{ConnBudget, ConnPermit, MemBudget};
use nvmux_core::crc32c::crc32c;
use nvmux_core::engine::{DiskId, Engine, SlotId};
use nvmux_core::worker::{Readiness, WorkSource};
use nvmux_core::{AlignedBuf, Opcode, Status};

use crate::auth::{self, Dhchap, Sent};
use crate::ctrl::{
    self, connect, sc, Controller, Cqe, Namespace, NsMap, Outcome, Resolver, Sqe, Waker, Where,
    ADMIN_DATA, AUTHREQ_ATR, IN_CAPSULE_DATA, MAX_TRANSFER, SGL_IN_CAPSULE, SGL_TRANSPORT,
};
use crate::nvm::{self, parse_io, IoPlan, Need};
use crate::pdu::{self, Digests, Pdu, PduError};
use crate::ratelog::RateLog;

/// Largest H2CData payload the host may send in one PDU (MAXH2CDATA).
pub const MAX_H2C_DATA: usize = MAX_TRANSFER;
/// The receive buffer's first size.
const RX_START: usize = 4096;
/// The receive buffer grows up to this while reads fill it (fewer system calls).
const RX_MAX: usize = 64 << 10;
/// The send buffer's size when it shrinks back after a burst.
const TX_START: usize = 4096;
/// Stop reading PDUs while this much control output (responses, headers) waits.
const TX_HIGH: usize = 16 << 10;
/// Pooled command buffers per size class, at least (a queue keeps as many as it has
/// slots, so a steady load finds every buffer it needs in the pool).
const POOL_PER_CLASS: usize = 16;
/// While waiting for memory, look again this often (other connections may free some).
const MEM_RETRY: Duration = Duration::from_millis(2);
/// Read data sent from command buffers by one `writev` at most.
const DIRECT_PER_SEND: usize = 32;
/// Largest Dataset Management range list (256 ranges of 16 bytes).
const DSM_MAX: usize = 4096;
/// While no timer is due, timers are looked at on every this many idle polls.
const TIMER_POLLS: u32 = 64;

pub use nvmux_core::Wire;

/// Target-wide counters of what the connections met.
#[derive(Default, Debug)]
pub struct Counters {
    /// Connections closed because Connect (and authentication) did not finish in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed because a PDU, an R2T's data or output stalled.
    pub stall_timeouts: AtomicU64,
    /// Controllers torn down by their keep-alive timeout.
    pub kato_expired: AtomicU64,
    /// Connections terminated for breaking the protocol or a limit.
    pub protocol_errors: AtomicU64,
    /// Queues that completed DH-HMAC-CHAP.
    pub auth_ok: AtomicU64,
    /// Queues whose DH-HMAC-CHAP failed (wrong secret, bad messages, host gave up).
    pub auth_failed: AtomicU64,
    /// Times a connection had to wait for memory.
    pub mem_waits: AtomicU64,
}

/// Limits every connection of a target shares.
pub struct Limits {
    /// The daemon-wide budget of network buffers.
    pub mem: Arc<MemBudget>,
    /// Buffers one connection may hold.
    pub per_conn: usize,
    /// From accept to a completed Connect and authentication.
    pub handshake: Duration,
    /// A PDU, an R2T's data or output stalled this long ends the connection.
    pub stall: Duration,
    pub counters: Arc<Counters>,
    pub log: Arc<RateLog>,
}

impl Limits {
    /// No memory limit and long timeouts (tests, fuzzing).
    pub fn relaxed() -> Arc<Limits> {
        Arc::new(Limits {
            mem: MemBudget::unlimited(),
            per_conn: 64 << 20,
            handshake: Duration::from_secs(3600),
            stall: Duration::from_secs(3600),
            counters: Arc::default(),
            log: Arc::default(),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for ICReq.
    Init,
    /// ICResp sent; commands flow.
    Ready,
    /// Terminated: nothing more is read; closes when nothing is in flight.
    Dead,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
enum Stage {
    #[default]
    Free,
    /// Needs a buffer: waits in `waitq` until memory is free.
    WaitMem,
    /// Waiting for H2CData after an R2T.
    AwaitData,
    /// Sent to the block queue(s).
    InFlight,
    /// An AUTH_Send being processed off the data path.
    Auth,
    /// Its data is queued for the socket (sent from `buf`); freed once sent.
    Sending,
}

/// A command's transport state in its engine slot (the engine keeps its block commands,
/// status and stats).
struct Cmd {
    stage: Stage,
    cid: u16,
    sqe: [u8; 64],
    /// Bytes the host sends with the command, or the controller returns.
    len: usize,
    /// H2CData bytes received so far.
    got: usize,
    /// The command's data (aligned, for O_DIRECT backends).
    buf: Option<AlignedBuf>,
    /// `buf` is the connection's inline reserve.
    reserve: bool,
    /// When the R2T went out (stall timer).
    r2t_at: Option<Instant>,
    /// An I/O command: its disk and plan, checked when the command arrived.
    io: Option<(DiskId, IoPlan)>,
    /// The memory the plan needs.
    need: Need,
}

impl Default for Cmd {
    fn default() -> Self {
        Cmd {
            stage: Stage::Free,
            cid: 0,
            sqe: [0; 64],
            len: 0,
            got: 0,
            buf: None,
            reserve: false,
            r2t_at: None,
            io: None,
            need: Need::Nothing,
        }
    }
}

/// H2CData being received straight into a command's buffer.
struct Sink {
    slot: SlotId,
    /// Where the next data byte goes in the buffer.
    off: usize,
    /// Data bytes still to come.
    left: usize,
    /// This PDU's data: offset and length in the buffer (for its digest).
    start: usize,
    datal: usize,
    /// Data digest: bytes expected (0 or 4), received so far, the bytes.
    dd_len: usize,
    dd_got: usize,
    dd: [u8; 4],
}

/// Read or admin data sent from a slot's buffer once `tx` has gone out up to `at`.
struct Direct {
    at: usize,
    slot: SlotId,
    len: usize,
    sent: usize,
}

/// An AUTH_Send processed off the data path, handed back.
struct AuthDone {
    dh: Box<Dhchap>,
    buf: Option<AlignedBuf>,
    sent: Sent,
}

type AuthJob = Arc<Mutex<Option<AuthDone>>>;

/// A connection's fixed context.
pub struct ConnParams {
    pub resolver: Arc<dyn Resolver>,
    pub at: Where,
    pub peer: String,
    pub limits: Arc<Limits>,
    /// The connection's place in its listener's limits (given back when it closes).
    pub permit: Option<ConnPermit>,
}

pub struct Conn {
    wire: Box<dyn Wire>,
    p: ConnParams,
    waker: Arc<Waker>,
    phase: Phase,
    dg: Digests,
    hpda: u8,
    budget: ConnBudget,
    /// Bytes of `rx` (its length) charged to the budget.
    rx: Vec<u8>,
    rx_head: usize,
    rx_tail: usize,
    /// The last recv filled the buffer: there may be more without a new edge.
    rx_more: bool,
    /// A PDU needs this many bytes in the buffer (to grow it).
    rx_need: usize,
    sink: Option<Sink>,
    /// The PDU at the buffer's head waits for memory (it is not consumed yet).
    mem_blocked: bool,
    /// A buffer could not be had: retry soon.
    mem_wait: bool,
    /// In a spell of waiting for memory (for the counter).
    mem_waiting: bool,
    /// The peer closed its side.
    eof: bool,
    tx: Vec<u8>,
    tx_off: usize,
    tx_charged: usize,
    tx_blocked: bool,
    direct: VecDeque<Direct>,
    direct_bytes: usize,
    /// The socket reported a hang-up: read until the end of the stream shows.
    hup: bool,
    ctrl: Option<Arc<Controller>>,
    qid: u16,
    sqhd: u16,
    entries: u16,
    /// Slots, the namespaces' queues, validation, stats, drain: the frontend engine.
    eng: Engine<Cmd>,
    /// Commands waiting for memory, in arrival order.
    waitq: VecDeque<SlotId>,
    /// Held Asynchronous Event Requests (command ids).
    aers: Vec<u16>,
    ns: NsMap,
    ns_gen: u64,
    /// The namespaces this connection has a disk open on in the engine.
    nsq: Vec<(DiskId, Arc<Namespace>)>,
    bufs: Vec<Vec<AlignedBuf>>,
    /// The inline reserve (taken at Connect), when no command holds it.
    reserve: Option<AlignedBuf>,
    out: Vec<u8>,
    finished: bool,
    accepted: Instant,
    /// Connect (and authentication, where required) completed.
    handshake_done: bool,
    /// The queue must authenticate before anything else.
    needs_auth: bool,
    authenticated: bool,
    auth: Option<Box<Dhchap>>,
    auth_job: Option<(SlotId, AuthJob)>,
    /// First byte of an unfinished PDU (stall timer).
    pdu_started: Option<Instant>,
    /// Output waiting since (stall timer; reset whenever the socket takes some).
    tx_stalled: Option<Instant>,
    idle_polls: u32,
}

fn size_class(len: usize) -> usize {
    (len.max(4096).next_power_of_two().trailing_zeros() - 12) as usize
}

impl Conn {
    pub fn new(wire: Box<dyn Wire>, p: ConnParams) -> std::io::Result<Conn> {
        let budget = ConnBudget::new(p.limits.mem.clone(), p.limits.per_conn);
        Ok(Conn {
            wire,
            waker: Waker::new()?,
            phase: Phase::Init,
            dg: Digests::default(),
            hpda: 0,
            budget,
            rx: Vec::new(),
            rx_head: 0,
            rx_tail: 0,
            rx_more: true,
            rx_need: 0,
            sink: None,
            mem_blocked: false,
            mem_wait: false,
            mem_waiting: false,
            eof: false,
            tx: Vec::new(),
            tx_off: 0,
            tx_charged: 0,
            tx_blocked: false,
            direct: VecDeque::new(),
            direct_bytes: 0,
            hup: false,
            ctrl: None,
            qid: 0,
            sqhd: 0,
            entries: 0,
            eng: Engine::new(0),
            waitq: VecDeque::new(),
            aers: Vec::new(),
            ns: Arc::default(),
            ns_gen: 0,
            nsq: Vec::new(),
            bufs: (0..=size_class(MAX_TRANSFER)).map(|_| Vec::new()).collect(),
            reserve: None,
            out: Vec::new(),
            finished: false,
            accepted: Instant::now(),
            handshake_done: false,
            needs_auth: false,
            authenticated: false,
            auth: None,
            auth_job: None,
            pdu_started: None,
            tx_stalled: None,
            idle_polls: 0,
            p,
        })
    }

    /// The waker other threads use to stop this connection.
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Bytes of buffers this connection holds (charged to its budget).
    pub fn memory(&self) -> usize {
        self.budget.held()
    }

    /// This poll round's clock (read at most once per round, by the engine).
    fn now(&mut self) -> Instant {
        self.eng.now()
    }

    fn in_flight(&self) -> bool {
        self.eng.in_flight() > 0
    }

    fn log(&self) -> &RateLog {
        &self.p.limits.log
    }

    fn count(&self, c: impl Fn(&Counters) -> &AtomicU64) {
        c(&self.p.limits.counters).fetch_add(1, Ordering::Relaxed);
    }

    /// Protocol error: send a C2HTermReq and stop reading.
    fn terminate(&mut self, e: PduError, hdr: &[u8]) {
        let (peer, qid) = (self.p.peer.clone(), self.qid);
        self.log().warn(|| {
            format!(
                "{peer} (qid {qid}): {} (FES {:#x}, FEI {}); connection terminated",
                e.why, e.fes, e.fei
            )
        });
        self.count(|c| &c.protocol_errors);
        if self.phase != Phase::Dead {
            pdu::c2h_term(&mut self.tx, e.fes, e.fei, hdr);
            self.tx_account();
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
        self.sink = None;
        self.eng.stop();
    }

    // ---- memory ------------------------------------------------------------------------

    /// Memory was short: wait (counted once per spell of waiting).
    fn note_mem_wait(&mut self) {
        self.mem_wait = true;
        if !self.mem_waiting {
            self.mem_waiting = true;
            self.count(|c| &c.mem_waits);
        }
    }

    /// A buffer of at least `len` bytes (at most [`MAX_TRANSFER`]) from the pool or the
    /// budget; `None` means wait.
    fn get_buf(&mut self, len: usize) -> Option<AlignedBuf> {
        let c = size_class(len);
        if let Some(b) = self.bufs.get_mut(c).and_then(|v| v.pop()) {
            self.mem_waiting = false;
            return Some(b);
        }
        let sz = 4096usize << c;
        if !self.budget.try_take(sz) {
            self.trim_pool();
            if !self.budget.try_take(sz) {
                self.mem_wait = true;
                self.note_mem_wait();
                return None;
            }
        }
        match AlignedBuf::try_new(sz) {
            Some(b) => {
                self.mem_waiting = false;
                Some(b)
            }
            None => {
                self.budget.give(sz);
                self.note_mem_wait();
                None
            }
        }
    }

    fn put_buf(&mut self, b: AlignedBuf) {
        let c = size_class(b.len());
        match self.bufs.get_mut(c) {
            Some(v)
                if v.len() < POOL_PER_CLASS.max(self.eng.capacity()) && b.len() == 4096 << c =>
            {
                v.push(b)
            }
            _ => self.budget.give(b.len()),
        }
    }

    /// Give pooled buffers back to the budget (memory is short).
    fn trim_pool(&mut self) {
        let budget = &mut self.budget;
        for v in self.bufs.iter_mut() {
            for b in v.drain(..) {
                budget.give(b.len());
            }
        }
    }

    /// Make the receive buffer at least `want` bytes long; `false`: no memory (and, if
    /// `need`, wait for some).
    fn rx_grow(&mut self, want: usize, need: bool) -> bool {
        let cur = self.rx.len();
        if cur >= want {
            return true;
        }
        let new = want.next_power_of_two();
        if !self.budget.try_take(new - cur) {
            if !need {
                return false;
            }
            self.trim_pool();
            if !self.budget.try_take(new - cur) {
                self.mem_wait = true;
                self.note_mem_wait();
                return false;
            }
        }
        self.rx.resize(new, 0);
        true
    }

    /// Charge the send buffer's growth. Control output (responses and headers: at most
    /// [`TX_HIGH`] plus one round of commands) is written even when the budget is short;
    /// what could not be charged is charged when it can.
    fn tx_account(&mut self) {
        let cap = self.tx.capacity();
        if cap > self.tx_charged && self.budget.try_take(cap - self.tx_charged) {
            self.tx_charged = cap;
        }
    }

    // ---- output --------------------------------------------------------------------------

    fn respond(&mut self, cid: u16, cqe: Cqe) {
        let e = cqe.encode(cid, self.sqhd, self.qid);
        pdu::capsule_resp(&mut self.tx, &e, self.dg);
        self.tx_account();
    }

    /// Queue `len` bytes of slot `i`'s buffer as one C2HData PDU (sent from the buffer).
    fn send_data(&mut self, i: SlotId, len: usize) {
        let cid = self.eng.slot(i).data.cid;
        pdu::c2h_data_header(&mut self.tx, cid, 0, len, true, self.dg, self.hpda);
        self.direct.push_back(Direct {
            at: self.tx.len(),
            slot: i,
            len,
            sent: 0,
        });
        self.direct_bytes += len;
        if self.dg.data {
            if let Some(b) = &self.eng.slot(i).data.buf {
                pdu::data_digest(&mut self.tx, &[&b.as_slice()[..len]]);
            }
        }
        self.tx_account();
        self.eng.slot_mut(i).data.stage = Stage::Sending;
    }

    /// Give slot `i`'s buffer back (to the inline reserve or the pool).
    fn release_buf(&mut self, i: SlotId) {
        let s = &mut self.eng.slot_mut(i).data;
        let b = s.buf.take();
        let reserve = std::mem::take(&mut s.reserve);
        if let Some(b) = b {
            if reserve {
                self.reserve = Some(b);
            } else {
                self.put_buf(b);
            }
        }
    }

    fn free_slot(&mut self, i: SlotId) {
        self.eng.slot_mut(i).data.stage = Stage::Free;
        self.release_buf(i);
        self.eng.release(i);
    }

    fn finish_now(&mut self, i: SlotId, cqe: Cqe) {
        let cid = self.eng.slot(i).data.cid;
        self.respond(cid, cqe);
        self.free_slot(i);
    }

    /// Refuse a command before or instead of Connect, and close: a host that does not
    /// follow the handshake gets nothing more from this connection.
    fn reject(&mut self, cid: u16, status: Status, why: &str) {
        let peer = self.p.peer.clone();
        self.log()
            .warn(|| format!("{peer}: {why}; connection closed"));
        self.count(|c| &c.protocol_errors);
        self.respond(cid, Cqe::err(status));
        self.die();
    }

    // ---- receiving ---------------------------------------------------------------------

    /// Reading stops (back-pressure) while this holds.
    fn rx_paused(&self) -> bool {
        self.phase == Phase::Dead || self.mem_blocked || self.pending_control() > TX_HIGH
    }

    fn recv(&mut self) -> usize {
        let mut n = 0;
        if !self.rx_more && !self.hup {
            return 0; // drained, and no edge since: nothing to read
        }
        while !self.eof && !self.rx_paused() {
            if self.sink.is_some() {
                match self.recv_sink() {
                    Some(k) => n += k,
                    None => break,
                }
                continue;
            }
            if self.rx.is_empty() && !self.rx_grow(RX_START, true) {
                break;
            }
            if self.rx_tail == self.rx.len() {
                if self.rx_head > 0 {
                    self.rx.copy_within(self.rx_head..self.rx_tail, 0);
                    self.rx_tail -= self.rx_head;
                    self.rx_head = 0;
                } else if !self.rx_grow(self.rx_need.max(self.rx.len() + 1), true) {
                    break; // a PDU longer than the buffer, and no memory yet
                }
            }
            let tail = self.rx_tail;
            match self.wire.recv(&mut self.rx[tail..]) {
                Ok(0) => {
                    self.eof = true;
                    self.rx_more = false;
                }
                Ok(k) => {
                    self.rx_tail += k;
                    let filled = self.rx_tail == self.rx.len();
                    self.rx_more = filled;
                    n += 1;
                    n += self.process_rx();
                    if filled && self.rx.len() < RX_MAX {
                        // Busy: a larger buffer takes more PDUs per system call.
                        let _ = self.rx_grow(self.rx.len() * 2, false);
                    }
                    if !filled {
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

    /// Receive H2CData straight into its command's buffer. `None`: stop reading for now.
    fn recv_sink(&mut self) -> Option<usize> {
        let sk = self.sink.as_mut()?;
        let r = if sk.left > 0 {
            let slot = self.eng.get_mut(sk.slot)?;
            let b = slot.data.buf.as_mut()?;
            let end = sk.off + sk.left;
            match b.as_mut_slice().get_mut(sk.off..end) {
                Some(dst) => self.wire.recv(dst),
                None => return None,
            }
        } else {
            self.wire.recv(&mut sk.dd[sk.dd_got..sk.dd_len])
        };
        match r {
            Ok(0) => {
                self.eof = true;
                self.rx_more = false;
                None
            }
            Ok(k) => {
                if let Some(sk) = self.sink.as_mut() {
                    if sk.left > 0 {
                        sk.off += k;
                        sk.left -= k;
                    } else {
                        sk.dd_got += k;
                    }
                    if sk.left == 0 && sk.dd_got == sk.dd_len {
                        self.finish_sink();
                        self.process_rx();
                    }
                }
                Some(1)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.rx_more = false;
                None
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Some(0),
            Err(e) => {
                tracing::debug!(peer = %self.p.peer, "nvme/tcp: receive: {e}");
                self.eof = true;
                self.rx_more = false;
                None
            }
        }
    }

    /// Handle every complete PDU in the receive buffer.
    fn process_rx(&mut self) -> usize {
        let mut n = 0;
        while self.phase != Phase::Dead && self.sink.is_none() && !self.mem_blocked {
            let avail = self.rx_tail - self.rx_head;
            let Some(ch) = self
                .rx
                .get(self.rx_head..self.rx_tail)
                .and_then(|b| b.first_chunk::<{ pdu::CH }>())
                .copied()
            else {
                break;
            };
            let max = match (self.phase, ch[0]) {
                (Phase::Init, _) => 0,
                (_, pdu::H2C_DATA) => MAX_H2C_DATA,
                _ => IN_CAPSULE_DATA,
            };
            let plen = match pdu::peek_len(&ch, max) {
                Ok(l) => l,
                Err(e) => {
                    self.terminate(e, &ch);
                    break;
                }
            };
            let start = self.rx_head;
            if ch[0] == pdu::H2C_DATA && self.phase == Phase::Ready {
                // Only the header is buffered; the data goes to the command's buffer.
                let need = (ch[3] as usize).max(pdu::DATA_HLEN);
                if avail < need {
                    self.rx_need = need;
                    break;
                }
                let hdr = &self.rx[start..start + need];
                // The header as a C2HTermReq would quote it (header and digest).
                let mut quote = [0u8; pdu::DATA_HLEN + 4];
                let ql = hdr.len().min(quote.len());
                quote[..ql].copy_from_slice(&hdr[..ql]);
                match pdu::h2c_header(hdr, plen, self.dg) {
                    Ok(h) => {
                        self.rx_head += h.pdo;
                        n += 1;
                        self.start_h2c(h, &quote[..ql]);
                    }
                    Err(e) => {
                        self.terminate(e, &quote[..ql]);
                        break;
                    }
                }
                continue;
            }
            if avail < plen {
                self.rx_need = plen;
                break;
            }
            // Move the buffer out while handling, so handlers can borrow self.
            let rx = std::mem::take(&mut self.rx);
            let pdu_bytes = &rx[start..start + plen];
            let hdr = &pdu_bytes[..plen.min(pdu::TERM_MAX_DATA)];
            let consumed = match pdu::parse(pdu_bytes, self.dg, max) {
                Ok(p) => self.on_pdu(p, hdr),
                Err(e) => {
                    self.terminate(e, hdr);
                    true
                }
            };
            self.rx = rx;
            if !consumed {
                self.mem_blocked = true;
                break;
            }
            self.rx_head += plen;
            n += 1;
        }
        if self.rx_head == self.rx_tail {
            self.rx_head = 0;
            self.rx_tail = 0;
        }
        // Stall timer: an unfinished PDU from the host (not one we hold back ourselves).
        let partial = (self.rx_tail > self.rx_head && !self.mem_blocked) || self.sink.is_some();
        if !partial {
            self.pdu_started = None;
        } else if n > 0 || self.pdu_started.is_none() {
            let now = self.now();
            self.pdu_started = Some(now);
        }
        n
    }

    /// An H2CData header: check it against its R2T and start receiving its data.
    fn start_h2c(&mut self, h: pdu::H2CHeader, hdr: &[u8]) {
        let ttag = h.ttag as SlotId;
        let ok = self
            .eng
            .get(ttag)
            .is_some_and(|s| s.data.stage == Stage::AwaitData && s.data.cid == h.cccid);
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
            let s = &self.eng.slot(ttag).data;
            (s.len, s.got)
        };
        let off = h.datao as usize;
        if off != got || h.datal > len - got || h.datal > MAX_H2C_DATA {
            return self.terminate(
                PduError {
                    fes: pdu::FES_OUT_OF_RANGE,
                    fei: 12,
                    why: "H2CData offset or length outside the requested range",
                },
                hdr,
            );
        }
        if let Some(c) = self.ctrl.clone() {
            let now = self.now();
            c.touch(now);
        }
        self.sink = Some(Sink {
            slot: ttag,
            off,
            left: h.datal,
            start: off,
            datal: h.datal,
            dd_len: if self.dg.data { 4 } else { 0 },
            dd_got: 0,
            dd: [0; 4],
        });
        // Whatever of the data is already buffered.
        let Some(sk) = self.sink.as_mut() else { return };
        let avail = self.rx_tail - self.rx_head;
        let k = avail.min(sk.left);
        if k > 0 {
            if let Some(dst) = self
                .eng
                .slot_mut(sk.slot)
                .data
                .buf
                .as_mut()
                .and_then(|b| b.as_mut_slice().get_mut(sk.off..sk.off + k))
            {
                dst.copy_from_slice(&self.rx[self.rx_head..self.rx_head + k]);
            }
            sk.off += k;
            sk.left -= k;
            self.rx_head += k;
        }
        if sk.left == 0 {
            let avail = self.rx_tail - self.rx_head;
            let d = avail.min(sk.dd_len - sk.dd_got);
            sk.dd[sk.dd_got..sk.dd_got + d]
                .copy_from_slice(&self.rx[self.rx_head..self.rx_head + d]);
            sk.dd_got += d;
            self.rx_head += d;
            if sk.dd_got == sk.dd_len {
                self.finish_sink();
            }
        }
    }

    /// All of an H2CData PDU's data is in: check its digest; run the command once all of
    /// its data is in.
    fn finish_sink(&mut self) {
        let Some(sk) = self.sink.take() else { return };
        let i = sk.slot;
        if sk.dd_len == 4 {
            let ok = self.eng.slot(i).data.buf.as_ref().is_some_and(|b| {
                crc32c(&b.as_slice()[sk.start..sk.start + sk.datal]) == u32::from_le_bytes(sk.dd)
            });
            if !ok {
                return self.terminate(
                    PduError {
                        fes: pdu::FES_HDGST,
                        fei: 0,
                        why: "H2CData data digest mismatch",
                    },
                    &[],
                );
            }
        }
        let s = &mut self.eng.slot_mut(i).data;
        s.got += sk.datal;
        if s.got == s.len {
            self.data_complete(i);
        }
    }

    /// A command's host data is all in (in-capsule or H2CData).
    fn data_complete(&mut self, i: SlotId) {
        let io = self.eng.slot(i).data.io;
        self.execute(i, io);
    }

    fn on_pdu(&mut self, p: Pdu<'_>, hdr: &[u8]) -> bool {
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
                    self.terminate(
                        PduError {
                            fes: pdu::FES_UNSUPPORTED,
                            fei: 8,
                            why: "unsupported PDU format version",
                        },
                        hdr,
                    );
                    return true;
                }
                if hpda > 31 {
                    self.terminate(
                        PduError {
                            fes: pdu::FES_INVALID_HEADER,
                            fei: 10,
                            why: "HPDA out of range",
                        },
                        hdr,
                    );
                    return true;
                }
                self.hpda = hpda;
                self.dg = digests;
                pdu::icresp(&mut self.tx, digests, MAX_H2C_DATA as u32);
                self.tx_account();
                self.phase = Phase::Ready;
            }
            (Phase::Init, _) => self.terminate(seq("first PDU is not ICReq"), hdr),
            (Phase::Ready, Pdu::ICReq { .. }) => self.terminate(seq("second ICReq"), hdr),
            (Phase::Ready, Pdu::Term { fes }) => {
                tracing::info!(peer = %self.p.peer, fes, "nvme/tcp: host terminated the connection");
                self.die();
            }
            (Phase::Ready, Pdu::Cmd { sqe, data }) => return self.on_cmd(sqe, data, hdr),
            // Only reached through `parse` (H2CData is normally taken apart by `start_h2c`).
            (Phase::Ready, Pdu::H2CData { .. }) => {
                self.terminate(seq("H2CData outside a transfer"), hdr)
            }
            (Phase::Dead, _) => {}
        }
        true
    }

    /// A command capsule. Returns `false` when it must wait for memory (unconsumed, with
    /// nothing changed).
    fn on_cmd(&mut self, sqe: &[u8; 64], data: &[u8], hdr: &[u8]) -> bool {
        if data.len() > IN_CAPSULE_DATA {
            self.terminate(
                PduError {
                    fes: pdu::FES_LIMIT,
                    fei: 4,
                    why: "in-capsule data larger than IOCCSZ allows",
                },
                hdr,
            );
            return true;
        }
        let s = Sqe(sqe);
        let Some(ctrl) = self.ctrl.clone() else {
            return self.pre_connect(s, data);
        };
        // In-capsule data needs a buffer before anything else happens: from the budget,
        // else the inline reserve, else the capsule waits unread.
        let mut inbuf = None;
        if !data.is_empty() {
            match self.get_buf(data.len()) {
                Some(b) => inbuf = Some((b, false)),
                None => match self.reserve.take() {
                    Some(b) => inbuf = Some((b, true)),
                    None => return false,
                },
            }
        }
        let now = self.now();
        ctrl.touch(now);
        if self.entries != 0 {
            self.sqhd = (self.sqhd + 1) % self.entries;
        }
        let cid = s.cid();
        let Some(i) = self.alloc_slot() else {
            if let Some((b, r)) = inbuf {
                if r {
                    self.reserve = Some(b);
                } else {
                    self.put_buf(b);
                }
            }
            self.terminate(
                PduError {
                    fes: pdu::FES_SEQUENCE,
                    fei: 0,
                    why: "more commands outstanding than the queue holds",
                },
                hdr,
            );
            return true;
        };
        {
            let sl = &mut self.eng.slot_mut(i).data;
            sl.cid = cid;
            sl.sqe = *sqe;
            sl.got = 0;
            sl.len = 0;
            sl.io = None;
            sl.need = Need::Nothing;
            sl.r2t_at = None;
            if let Some((b, r)) = inbuf {
                sl.buf = Some(b);
                sl.reserve = r;
            }
        }
        let fab = s.is_fabrics();
        let fctype = s.fctype();
        let auth_cmd = fab && (fctype == 0x05 || fctype == 0x06);
        if self.needs_auth && !self.authenticated && !auth_cmd {
            if fab && fctype == 0x08 {
                self.finish_now(i, Cqe::ok(0));
                self.die();
                return true;
            }
            self.free_slot(i);
            self.count(|c| &c.auth_failed);
            self.reject(
                cid,
                sc::AUTH_REQUIRED,
                "a command before DH-HMAC-CHAP authentication completed",
            );
            return true;
        }
        let dir = s.direction();
        let sgl_len = s.sgl_len() as usize;
        let mut io = None;
        let want = if auth_cmd {
            if self.auth.is_none() && self.auth_job.is_none() {
                self.finish_now(i, Cqe::err(Status::INVALID_OPCODE));
                return true;
            }
            if self.auth_job.is_some() {
                self.finish_now(i, Cqe::err(sc::CMD_SEQUENCE));
                return true;
            }
            let max = if fctype == 0x05 {
                auth::MAX_SEND
            } else {
                auth::MAX_RECEIVE
            };
            match auth::command_len(sqe, max) {
                Some(l) if l == sgl_len => l,
                Some(_) => {
                    self.finish_now(i, Cqe::err(sc::SGL_LENGTH_INVALID));
                    return true;
                }
                None => {
                    self.finish_now(i, Cqe::err(Status::INVALID_FIELD));
                    return true;
                }
            }
        } else if fab {
            // Property Get/Set, Disconnect: no data.
            0
        } else if self.qid == 0 {
            if dir & 1 != 0 && sgl_len > 0 {
                // No supported admin command takes data from the host.
                self.finish_now(i, Cqe::err(Status::INVALID_FIELD));
                return true;
            }
            let limit = if s.opcode() == 0x02 {
                MAX_TRANSFER
            } else {
                ADMIN_DATA
            };
            if dir & 2 != 0 && sgl_len > limit {
                self.finish_now(i, Cqe::err(sc::SGL_LENGTH_INVALID));
                return true;
            }
            if dir & 2 != 0 {
                sgl_len
            } else {
                0
            }
        } else {
            // Checked now (the engine's validation), before any data moves.
            let need = match self.plan_io(s).and_then(|(d, plan)| {
                io = Some((d, plan));
                nvm::prepare(&mut self.eng, i, d, &plan)
            }) {
                Ok(n) => n,
                Err(st) => {
                    self.finish_now(i, Cqe::err(st));
                    return true;
                }
            };
            let sl = &mut self.eng.slot_mut(i).data;
            sl.io = io;
            sl.need = need;
            match need {
                // Linux may describe a Dataset Management range list with a longer buffer
                // (a whole page): take what the SGL says, up to a page.
                Need::Ranges(l) if sgl_len >= l && sgl_len <= DSM_MAX => sgl_len,
                Need::Ranges(l) | Need::Data(l) => l,
                // Zeros are the controller's own scratch memory, not host data.
                Need::Zeros(_) | Need::Nothing => 0,
            }
        };
        if want > 0 && want != sgl_len {
            self.finish_now(i, Cqe::err(sc::SGL_LENGTH_INVALID));
            return true;
        }
        if want == 0 {
            self.execute(i, io);
            return true;
        }
        self.eng.slot_mut(i).data.len = want;
        if dir & 1 != 0 {
            match s.sgl_type() {
                SGL_IN_CAPSULE => {
                    if s.sgl_addr() != 0 {
                        self.finish_now(i, Cqe::err(sc::SGL_OFFSET_INVALID));
                        return true;
                    }
                    if data.len() < want {
                        self.finish_now(i, Cqe::err(sc::SGL_LENGTH_INVALID));
                        return true;
                    }
                    let sl = &mut self.eng.slot_mut(i).data;
                    if let Some(b) = sl.buf.as_mut() {
                        b.as_mut_slice()[..want].copy_from_slice(&data[..want]);
                    }
                    sl.got = want;
                    self.execute(i, io);
                }
                SGL_TRANSPORT if data.is_empty() => self.wait_or_start(i),
                _ => self.finish_now(i, Cqe::err(sc::SGL_TYPE_INVALID)),
            }
        } else if s.sgl_type() != SGL_TRANSPORT || !data.is_empty() {
            self.finish_now(i, Cqe::err(sc::SGL_TYPE_INVALID));
        } else {
            self.wait_or_start(i);
        }
        true
    }

    /// Before Connect only a Connect with its data in the capsule is accepted; nothing
    /// is asked for with R2T, and anything else closes the connection.
    fn pre_connect(&mut self, s: Sqe, data: &[u8]) -> bool {
        let cid = s.cid();
        if !(s.is_fabrics() && s.fctype() == 0x01) {
            self.reject(
                cid,
                sc::CMD_SEQUENCE,
                "a command other than Connect before Connect",
            );
            return true;
        }
        if s.sgl_type() != SGL_IN_CAPSULE
            || s.sgl_addr() != 0
            || s.sgl_len() != 1024
            || data.len() < 1024
        {
            self.reject(
                cid,
                sc::SGL_LENGTH_INVALID,
                "Connect without its 1024 bytes of data in the capsule",
            );
            return true;
        }
        // The inline reserve, so that an in-capsule command always finds a buffer.
        if self.reserve.is_none() {
            if !self.budget.try_take(IN_CAPSULE_DATA) {
                self.mem_wait = true;
                self.note_mem_wait();
                return false;
            }
            match AlignedBuf::try_new(IN_CAPSULE_DATA) {
                Some(b) => self.reserve = Some(b),
                None => {
                    self.budget.give(IN_CAPSULE_DATA);
                    self.mem_wait = true;
                    return false;
                }
            }
        }
        self.do_connect(cid, s, &data[..1024]);
        true
    }

    /// Start a command's data transfer (R2T, or run it to produce its data) once it has
    /// a buffer; park it in arrival order until then.
    fn wait_or_start(&mut self, i: SlotId) {
        self.eng.slot_mut(i).data.stage = Stage::WaitMem;
        if !self.waitq.is_empty() || !self.start_data(i) {
            self.waitq.push_back(i);
        }
    }

    /// Give slot `i` a buffer of at least `len` bytes (one too small, such as an in-capsule
    /// buffer, is swapped for a fitting one); `false`: no memory for it now.
    fn ensure_buf(&mut self, i: SlotId, len: usize) -> bool {
        if self
            .eng
            .slot(i)
            .data
            .buf
            .as_ref()
            .is_some_and(|b| b.len() < len)
        {
            self.release_buf(i);
        }
        if self.eng.slot(i).data.buf.is_none() {
            match self.get_buf(len) {
                Some(b) => self.eng.slot_mut(i).data.buf = Some(b),
                None => return false,
            }
        }
        true
    }

    /// `false`: still no memory.
    fn start_data(&mut self, i: SlotId) -> bool {
        let len = self.eng.slot(i).data.len;
        if !self.ensure_buf(i, len) {
            return false;
        }
        let sqe = self.eng.slot(i).data.sqe;
        let s = Sqe(&sqe);
        if s.direction() & 1 != 0 {
            let now = self.now();
            let sl = &mut self.eng.slot_mut(i).data;
            sl.stage = Stage::AwaitData;
            sl.r2t_at = Some(now);
            // The transfer tag is the slot (slots are fewer than 2^16: entries + AERs).
            pdu::r2t(&mut self.tx, s.cid(), i as u16, 0, len as u32, self.dg);
            self.tx_account();
        } else {
            let io = self.eng.slot(i).data.io;
            self.execute(i, io);
        }
        true
    }

    /// Commands parked for memory, in order, while memory comes.
    fn retry_waiting(&mut self) -> usize {
        let mut n = 0;
        while let Some(&i) = self.waitq.front() {
            if self.phase == Phase::Dead {
                self.waitq.clear();
                break;
            }
            if !self.start_data(i) {
                break;
            }
            self.waitq.pop_front();
            n += 1;
        }
        n
    }

    fn alloc_slot(&mut self) -> Option<SlotId> {
        let i = self.eng.alloc()?;
        self.eng.slot_mut(i).data.stage = Stage::Free;
        Some(i)
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
        // A namespace that left (or was replaced): its disk takes no new command and goes
        // once its commands are done.
        let mut k = 0;
        while k < self.nsq.len() {
            let (d, ns) = &self.nsq[k];
            if self.ns.get(&ns.nsid).is_some_and(|n| Arc::ptr_eq(n, ns)) {
                k += 1;
            } else {
                self.eng.retire_disk(*d);
                self.nsq.swap_remove(k);
            }
        }
    }

    /// The engine's disk for namespace `nsid` on this connection, opened on first use.
    fn queue_for(&mut self, nsid: u32) -> Result<DiskId, Status> {
        if let Some(d) = self.eng.disk_for(nsid) {
            return Ok(d);
        }
        let ns = self
            .ns
            .get(&nsid)
            .cloned()
            .ok_or(Status::INVALID_NAMESPACE)?;
        let d = self
            .eng
            .add_disk(ns.dev.clone(), &ns.stats, nsid, self.entries.max(1) as u32)
            .map_err(|e| {
                tracing::error!(disk = %ns.disk, "nvme/tcp: cannot open a queue: {e}");
                Status::INTERNAL_ERROR
            })?;
        self.nsq.push((d, ns));
        Ok(d)
    }

    /// Decode an I/O command for its namespace's disk (checked against it by
    /// `nvm::prepare`).
    fn plan_io(&mut self, s: Sqe) -> Result<(DiskId, IoPlan), Status> {
        let d = self.queue_for(s.nsid())?;
        let info = self.eng.info(d).ok_or(Status::INVALID_NAMESPACE)?;
        parse_io(s, info.block_size, info.read_only).map(|p| (d, p))
    }

    /// Copy `out` (what a command produced) into slot `i`'s buffer, zero the rest of
    /// its `len` bytes (a pooled buffer holds old data), and queue it for the host.
    fn send_out(&mut self, i: SlotId, out: &[u8]) {
        let len = self.eng.slot(i).data.len;
        if let Some(b) = self.eng.slot_mut(i).data.buf.as_mut() {
            let dst = &mut b.as_mut_slice()[..len];
            let n = out.len().min(len);
            dst[..n].copy_from_slice(&out[..n]);
            dst[n..].fill(0);
        }
        self.send_data(i, len);
    }

    fn execute(&mut self, i: SlotId, io: Option<(DiskId, IoPlan)>) {
        let sqe = self.eng.slot(i).data.sqe;
        let s = Sqe(&sqe);
        let cid = s.cid();
        let Some(c) = self.ctrl.clone() else {
            return self.finish_now(i, Cqe::err(sc::CMD_SEQUENCE));
        };
        if s.is_fabrics() {
            match s.fctype() {
                0x05 => return self.auth_send(i),
                0x06 => return self.auth_receive(i),
                0x08 => {
                    self.finish_now(i, Cqe::ok(0));
                    return self.die();
                }
                _ if self.qid != 0 => {
                    let st = if s.fctype() == 0x01 {
                        sc::CMD_SEQUENCE
                    } else {
                        Status::INVALID_OPCODE
                    };
                    return self.finish_now(i, Cqe::err(st));
                }
                _ => {}
            }
        }
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
                    if self.eng.slot(i).data.len > 0 && cqe.status.is_ok() {
                        self.send_out(i, &out);
                        self.respond(cid, cqe);
                    } else {
                        self.finish_now(i, cqe);
                    }
                }
            }
            // A large log page leaves a large vector behind: do not keep it.
            if out.capacity() > ADMIN_DATA {
                out = Vec::new();
            }
            self.out = out;
            return;
        }
        let Some((d, plan)) = io else {
            return self.finish_now(i, Cqe::err(Status::INTERNAL_ERROR));
        };
        // The NVM semantics are `nvm`'s; this transport provides the memory.
        let need = self.eng.slot(i).data.need;
        let r = match need {
            Need::Data(len) => {
                let (c, sg) = self.eng.slot_mut(i).parts();
                if let Some(b) = &c.buf {
                    sg.push(b.as_mut_ptr(), len.min(b.len()));
                }
                nvm::submit(&mut self.eng, i, d, &plan, None)
            }
            Need::Nothing => nvm::submit(&mut self.eng, i, d, &plan, None),
            Need::Zeros(len) | Need::Ranges(len) => {
                if matches!(need, Need::Zeros(_)) && !self.ensure_buf(i, len) {
                    // Wait for memory like a command with data (it moves no host data,
                    // so `start_data` asks for nothing with R2T).
                    let sl = &mut self.eng.slot_mut(i).data;
                    sl.len = len;
                    sl.stage = Stage::WaitMem;
                    self.waitq.push_back(i);
                    return;
                }
                // The buffer leaves the slot while the model writes or reads it (the SG
                // list points at its heap memory, which does not move).
                let mut b = self.eng.slot_mut(i).data.buf.take();
                let got = self.eng.slot(i).data.got;
                let mem = b.as_mut().map(|b| {
                    let n = if matches!(need, Need::Zeros(_)) {
                        len
                    } else {
                        len.min(got)
                    };
                    let n = n.min(b.len());
                    &mut b.as_mut_slice()[..n]
                });
                let r = nvm::submit(&mut self.eng, i, d, &plan, mem);
                self.eng.slot_mut(i).data.buf = b;
                r
            }
        };
        match r {
            Ok(0) => self.finish_now(i, Cqe::ok(0)),
            Ok(_) => self.eng.slot_mut(i).data.stage = Stage::InFlight,
            Err(st) => self.finish_now(i, Cqe::err(st)),
        }
    }

    fn do_connect(&mut self, cid: u16, s: Sqe, data: &[u8]) {
        let r = connect(&*self.p.resolver, s, data, &self.p.peer);
        match r {
            Ok(c) => {
                tracing::info!(
                    peer = %self.p.peer,
                    subsystem = %c.ctrl.subsys.nqn,
                    host = %c.ctrl.host,
                    cntlid = c.ctrl.cntlid,
                    qid = c.qid,
                    auth = c.auth.is_some(),
                    "nvme/tcp: queue connected"
                );
                self.qid = c.qid;
                self.entries = c.entries;
                // The queue's slots: its entries, plus room for the AERs an admin queue
                // holds. Fixed from here on.
                let cap = c.entries.max(1) as usize + ctrl::MAX_AERS;
                self.eng.set_capacity(cap);
                // Every slot may be parked or sending at once: sized now, not per command.
                self.direct.reserve(cap);
                self.waitq.reserve(cap);
                self.sqhd = 1 % c.entries;
                c.ctrl.attach_queue(c.qid, &self.waker);
                let now = self.now();
                c.ctrl.touch(now);
                let mut dw0 = c.ctrl.cntlid as u32;
                match c.auth {
                    Some(a) => {
                        self.auth = Some(Box::new(a));
                        self.needs_auth = true;
                        dw0 |= AUTHREQ_ATR;
                    }
                    None => self.handshake_done = true,
                }
                self.ns_gen = 0;
                self.ctrl = Some(c.ctrl);
                self.refresh_ns();
                self.respond(cid, Cqe::ok(dw0));
            }
            Err(cqe) => {
                // A refused Connect (logged by the resolver) ends the connection.
                self.respond(cid, cqe);
                self.die();
            }
        }
    }

    // ---- authentication ------------------------------------------------------------------

    /// AUTH_Send: the DH-HMAC-CHAP step runs off the data path (its modular
    /// exponentiations may take milliseconds); the command completes when it is back.
    fn auth_send(&mut self, i: SlotId) {
        let Some(mut dh) = self.auth.take() else {
            return self.finish_now(i, Cqe::err(sc::CMD_SEQUENCE));
        };
        let sl = &mut self.eng.slot_mut(i).data;
        let len = sl.len;
        let buf = sl.buf.take();
        sl.stage = Stage::Auth;
        let job: AuthJob = Arc::new(Mutex::new(None));
        let (j2, waker) = (job.clone(), self.waker.clone());
        self.auth_job = Some((i, job));
        self.p.resolver.offload(Box::new(move || {
            let sent = match &buf {
                Some(b) => dh.send(&b.as_slice()[..len.min(b.len())]),
                None => dh.send(&[]),
            };
            *j2.lock().unwrap_or_else(|e| e.into_inner()) = Some(AuthDone { dh, buf, sent });
            waker.wake();
        }));
        self.auth_done();
    }

    /// An AUTH_Send came back from the crypto thread.
    fn auth_done(&mut self) -> usize {
        let Some((i, job)) = &self.auth_job else {
            return 0;
        };
        let i = *i;
        let Some(done) = job.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return 0;
        };
        self.auth_job = None;
        self.auth = Some(done.dh);
        self.eng.slot_mut(i).data.buf = done.buf;
        if self.phase == Phase::Dead {
            self.free_slot(i);
            return 1;
        }
        match done.sent {
            Sent::Ok => {
                self.finish_now(i, Cqe::ok(0));
                self.note_auth();
            }
            Sent::HostFailed(_) => {
                self.finish_now(i, Cqe::ok(0));
                self.auth_failed();
            }
        }
        1
    }

    fn auth_receive(&mut self, i: SlotId) {
        let Some(mut dh) = self.auth.take() else {
            return self.finish_now(i, Cqe::err(sc::CMD_SEQUENCE));
        };
        let len = self.eng.slot(i).data.len;
        let mut out = std::mem::take(&mut self.out);
        let end = dh.receive(len, &mut out);
        self.auth = Some(dh);
        let cid = self.eng.slot(i).data.cid;
        self.send_out(i, &out);
        self.respond(cid, Cqe::ok(0));
        out.clear();
        self.out = out;
        if end {
            self.auth_failed();
        } else {
            self.note_auth();
        }
    }

    /// The exchange may just have succeeded.
    fn note_auth(&mut self) {
        let Some(dh) = &self.auth else { return };
        if !dh.authenticated() || self.authenticated {
            return;
        }
        self.authenticated = true;
        self.handshake_done = true;
        self.count(|c| &c.auth_ok);
        let (h, g, bidi) = dh.negotiated();
        let host = self
            .ctrl
            .as_ref()
            .map(|c| c.host.clone())
            .unwrap_or_default();
        tracing::info!(
            peer = %self.p.peer,
            host = %host,
            qid = self.qid,
            hash = %h.name(),
            dhgroup = %g.name(),
            bidirectional = bidi,
            "nvme/tcp: DH-HMAC-CHAP authentication succeeded"
        );
    }

    fn auth_failed(&mut self) {
        self.count(|c| &c.auth_failed);
        let why = self
            .auth
            .as_ref()
            .and_then(|d| d.why().map(str::to_string))
            .unwrap_or_else(|| "authentication failed".into());
        let host = self
            .ctrl
            .as_ref()
            .map(|c| c.host.clone())
            .unwrap_or_default();
        let (peer, qid) = (self.p.peer.clone(), self.qid);
        self.log().warn(|| {
            format!(
                "{peer} (host {host:?}, qid {qid}): DH-HMAC-CHAP failed: {why}; connection closed"
            )
        });
        self.authenticated = false;
        self.die();
    }

    // ---- completing ----------------------------------------------------------------------

    fn reap(&mut self) -> usize {
        let n = self.eng.reap();
        while let Some((i, status)) = self.eng.next_completion() {
            let c = &self.eng.slot(i).data;
            let read = matches!(
                c.io,
                Some((
                    _,
                    IoPlan::One {
                        op: Opcode::Read,
                        ..
                    }
                ))
            );
            let (len, cid) = (c.len, c.cid);
            if read && status.is_ok() && self.phase != Phase::Dead {
                // Sent from the command's buffer; the slot is freed once it is.
                self.send_data(i, len);
                self.respond(cid, Cqe::err(status));
            } else {
                self.finish_now(i, Cqe::err(status));
            }
        }
        n
    }

    /// Control output (responses, headers) not yet sent.
    fn pending_control(&self) -> usize {
        self.tx.len() - self.tx_off
    }

    fn pending_tx(&self) -> usize {
        self.pending_control() + self.direct_bytes
    }

    fn flush(&mut self) -> usize {
        let mut n = 0;
        if self.tx_blocked {
            return 0; // the socket was full; its next writable edge clears this
        }
        while self.pending_tx() > 0 {
            // The stream from here: tx up to the first direct send, its data, tx up to
            // the next, ..., the rest of tx.
            let r = if self.direct.is_empty() {
                self.wire.send(&self.tx[self.tx_off..])
            } else {
                let mut iov = [IoSlice::new(&[]); 2 * DIRECT_PER_SEND + 1];
                let mut k = 0;
                let mut pos = self.tx_off;
                for d in self.direct.iter().take(DIRECT_PER_SEND) {
                    if pos < d.at {
                        iov[k] = IoSlice::new(&self.tx[pos..d.at]);
                        k += 1;
                    }
                    pos = d.at;
                    if let Some(b) = &self.eng.slot(d.slot).data.buf {
                        iov[k] = IoSlice::new(&b.as_slice()[d.sent..d.len]);
                        k += 1;
                    }
                }
                if self.direct.len() <= DIRECT_PER_SEND && pos < self.tx.len() {
                    iov[k] = IoSlice::new(&self.tx[pos..]);
                    k += 1;
                }
                self.wire.send_vectored(&iov[..k])
            };
            match r {
                Ok(0) => break,
                Ok(k) => {
                    self.sent(k);
                    self.tx_stalled = None;
                    n += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.tx_blocked = true;
                    if self.tx_stalled.is_none() {
                        let now = self.now();
                        self.tx_stalled = Some(now);
                    }
                    return n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %self.p.peer, "nvme/tcp: send: {e}");
                    self.eof = true;
                    self.drop_output();
                    self.die();
                    return n;
                }
            }
        }
        self.tx_blocked = false;
        if self.pending_tx() == 0 {
            self.tx_stalled = None;
            self.tx.clear();
            self.tx_off = 0;
            if self.tx.capacity() > 4 * TX_START {
                // A burst is over: give its memory back.
                self.tx = Vec::with_capacity(TX_START);
                let keep = self.tx.capacity().min(self.tx_charged);
                self.budget.give(self.tx_charged - keep);
                self.tx_charged = keep;
            }
        } else if self.tx_off >= TX_HIGH {
            // Output keeps coming while some waits: drop what has gone out.
            self.tx.drain(..self.tx_off);
            for d in self.direct.iter_mut() {
                d.at -= self.tx_off;
            }
            self.tx_off = 0;
        }
        n
    }

    /// Account for `k` bytes sent, in stream order; free the slots whose data went out.
    fn sent(&mut self, mut k: usize) {
        while let Some(d) = self.direct.front_mut() {
            let a = k.min(d.at - self.tx_off);
            self.tx_off += a;
            k -= a;
            if self.tx_off < d.at {
                return;
            }
            let b = k.min(d.len - d.sent);
            d.sent += b;
            k -= b;
            self.direct_bytes -= b;
            if d.sent < d.len {
                return;
            }
            let slot = d.slot;
            self.direct.pop_front();
            self.free_slot(slot);
        }
        self.tx_off += k;
    }

    /// Output that can never be sent: drop it and free its slots.
    fn drop_output(&mut self) {
        self.tx.clear();
        self.tx_off = 0;
        while let Some(d) = self.direct.pop_front() {
            self.free_slot(d.slot);
        }
        self.direct_bytes = 0;
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

    // ---- timers --------------------------------------------------------------------------

    /// When the oldest R2T still waiting for its data went out.
    fn r2t_oldest(&self) -> Option<Instant> {
        self.eng
            .iter()
            .filter(|(_, s)| s.data.stage == Stage::AwaitData)
            .filter_map(|(_, s)| s.data.r2t_at)
            .min()
    }

    /// The earliest of the connection's own timers (not the block queues').
    fn timer_deadline(&self) -> Option<Instant> {
        if self.phase == Phase::Dead {
            return None;
        }
        let l = &self.p.limits;
        let mut d: Option<Instant> = None;
        let mut add = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        if !self.handshake_done {
            add(self.accepted + l.handshake);
        }
        if let Some(t) = self.pdu_started {
            add(t + l.stall);
        }
        if let Some(t) = self.tx_stalled {
            add(t + l.stall);
        }
        if !self.rx_paused() {
            if let Some(t) = self.r2t_oldest() {
                add(t + l.stall);
            }
        }
        if self.qid == 0 && self.handshake_done {
            if let Some(t) = self.ctrl.as_ref().and_then(|c| c.keepalive_deadline()) {
                add(t);
            }
        }
        d
    }

    /// End the connection if one of its timers ran out.
    fn check_timers(&mut self) {
        let Some(d) = self.timer_deadline() else {
            return;
        };
        let now = self.now();
        if now < d {
            return;
        }
        let l = self.p.limits.clone();
        let peer = self.p.peer.clone();
        let qid = self.qid;
        if !self.handshake_done && now >= self.accepted + l.handshake {
            self.count(|c| &c.handshake_timeouts);
            let what = if self.ctrl.is_some() {
                "authentication"
            } else {
                "Connect"
            };
            l.log.info(|| {
                format!(
                    "{peer}: no {what} within {} ms of accepting the connection (handshake timeout); closed",
                    l.handshake.as_millis()
                )
            });
            self.drop_output();
            return self.die();
        }
        let stalled = |t: Option<Instant>| t.is_some_and(|t| now >= t + l.stall);
        let r2t = if self.rx_paused() {
            None
        } else {
            self.r2t_oldest()
        };
        let why = if stalled(self.pdu_started) {
            Some("a PDU was started but not finished")
        } else if stalled(r2t) {
            Some("the data an R2T asked for did not come")
        } else if stalled(self.tx_stalled) {
            Some("the host does not read its responses")
        } else {
            None
        };
        if let Some(why) = why {
            self.count(|c| &c.stall_timeouts);
            l.log.info(|| {
                format!(
                    "{peer} (qid {qid}): {why} for {} ms (stall timeout); closed",
                    l.stall.as_millis()
                )
            });
            self.drop_output();
            return self.die();
        }
        if qid == 0 {
            if let Some(c) = self.ctrl.clone() {
                if c.keepalive_deadline().is_some_and(|t| now >= t) {
                    self.count(|c| &c.kato_expired);
                    let (kato, host, sub, id) =
                        (c.kato_ms(), c.host.clone(), c.subsys.nqn.clone(), c.cntlid);
                    l.log.warn(|| {
                        if kato == 0 {
                            format!(
                                "discovery controller {id} of host {host:?} ({peer}): idle for {} s; closed",
                                ctrl::DISCOVERY_IDLE.as_secs()
                            )
                        } else {
                            format!(
                                "controller {id} of host {host:?} on {sub} ({peer}): no command for the keep-alive timeout ({kato} ms, plus {} ms); its queues are closed",
                                ctrl::kato_margin(Duration::from_millis(kato as u64)).as_millis()
                            )
                        }
                    });
                    c.close();
                    self.drop_output();
                    self.die();
                }
            }
        }
    }
}

impl WorkSource for Conn {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        if self.eng.fds_pending() {
            return 1; // the worker re-reads our fds first
        }
        self.eng.round();
        if self.waker.stop.load(Ordering::Acquire) {
            self.die();
        }
        self.refresh_ns();
        let mut n = self.auth_done();
        n += self.reap();
        if self.mem_blocked || self.mem_wait || !self.waitq.is_empty() {
            self.mem_blocked = false;
            self.mem_wait = false;
            n += self.retry_waiting();
            n += self.process_rx();
        }
        n += self.recv();
        self.eng.kick();
        if self.qid == 0 && !self.aers.is_empty() {
            n += self.events();
        }
        n += self.reap();
        n += self.flush();
        if n > 0 || self.eng.clock().is_some() || self.idle_polls >= TIMER_POLLS {
            self.idle_polls = 0;
            self.check_timers();
        } else {
            self.idle_polls += 1;
        }
        // (Namespaces that left: the engine drops their disks once their commands are
        // done.)
        if self.eof && self.phase != Phase::Dead {
            tracing::info!(peer = %self.p.peer, qid = self.qid, "nvme/tcp: connection closed by the host");
            self.die();
        }
        if self.phase == Phase::Dead && !self.in_flight() {
            let _ = self.flush();
            if let Some(c) = self.ctrl.take() {
                c.detach_queue(self.qid);
            }
            self.eng.retire();
            self.finished = true;
            return n.max(1);
        }
        self.eng.publish();
        n
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.waker.fd()];
        self.eng.wait_fds(&mut v);
        v
    }

    fn socket_fd(&self) -> Option<RawFd> {
        self.wire.fd()
    }

    fn take_fds_changed(&mut self) -> bool {
        self.eng.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.eng.busy_poll()
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.finished || self.eng.fds_pending() {
            return false;
        }
        // More bytes may sit in the socket (the buffer filled up) or in our buffer.
        if self.rx_more && !self.eof && !self.rx_paused() {
            return false;
        }
        if self.pending_tx() > 0 && !self.tx_blocked {
            return false;
        }
        if self.phase == Phase::Dead && !self.in_flight() {
            return false;
        }
        if self
            .auth_job
            .as_ref()
            .is_some_and(|(_, j)| j.lock().map(|g| g.is_some()).unwrap_or(true))
        {
            return false;
        }
        self.eng.may_sleep()
    }

    fn after_sleep(&mut self) {
        // Timers are looked at on the next poll (a deadline may be what woke us).
        self.idle_polls = TIMER_POLLS;
    }

    fn finished(&self) -> bool {
        self.finished
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.eng.next_deadline();
        let mut add = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        if let Some(t) = self.timer_deadline() {
            add(t);
        }
        if self.mem_blocked || self.mem_wait || !self.waitq.is_empty() {
            add(Instant::now() + MEM_RETRY);
        }
        d
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
