//! One NBD connection in its transmission phase: a [`WorkSource`] a worker polls.
//!
//! It reads requests from its socket into a buffer (write payloads straight into the
//! command's buffer when they are large), turns them into [`IoCommand`]s on the export's
//! disk, and writes replies (simple, or structured for reads once negotiated) into a send
//! buffer that goes out in as few system calls as the socket allows; the data of large
//! reads goes out from the command's own buffer (one `writev` with the headers around
//! it), never copied into the send buffer. A request that breaks
//! the protocol (a bad magic, a write larger than the maximum block size) ends this
//! connection only, once what is in flight has completed.
//!
//! **Memory.** Every buffer the connection holds is reserved from its [`ConnBudget`]
//! (per connection, inside the daemon-wide budget) before it is allocated: the receive
//! buffer, the send buffer (each admitted request reserves room for its reply there), and
//! each command's data buffer. A request whose memory is not available is not taken: its
//! header stays in the receive buffer, the socket is not read, and the request is tried
//! again when the connection's own commands complete or after a short wait (another
//! connection may have given memory back). The largest request admitted (`max_io`, also
//! what the negotiation advertises) fits the per-connection budget with the fixed buffers,
//! so it is always admitted eventually. An idle connection gives all of it back.
//!
//! **Stalls.** A request whose bytes stop arriving, or replies the client does not read,
//! for the listener's stall timeout end the connection.

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::budget::{ConnBudget, ConnPermit};
use nvmux_core::engine::{DiskId, Engine, SlotId};
use nvmux_core::worker::{Readiness, WorkSource};
use nvmux_core::{AlignedBuf, DeviceInfo, Opcode, Status, Wire};

use crate::proto::*;
use crate::{BurstLog, Export};

/// Receive buffer for request headers and small payloads.
const RX_CAP: usize = 256 << 10;
/// The send buffer's first allocation: the replies of 32 small reads in flight (a
/// typical client depth) fit, so a late peak of them does not grow it mid-run.
const TX_MIN: usize = 256 << 10;
/// Payloads at least this long are received straight into their command's buffer.
const DIRECT_PAYLOAD: usize = 64 << 10;
/// Reads at least this long are sent from their command's buffer rather than copied.
const DIRECT_REPLY: usize = 16 << 10;
/// Direct read replies one `writev` carries at most (with the bytes between them).
const DIRECT_PER_SEND: usize = 32;
/// Stop reading new requests while this much output waits for the socket.
const TX_HIGH: usize = 8 << 20;
/// Commands in flight per connection (the client is told nothing: requests beyond this
/// wait in the socket).
const MAX_SLOTS: usize = 256;
/// Sent bytes at the send buffer's front are dropped once there are this many.
const TX_COMPACT: usize = 1 << 20;
/// Room reserved in the send buffer for any reply header (simple 16, structured read
/// chunk 20 + 8, error chunk 26).
const REPLY_HDR: usize = 32;
/// Memory a TLS session holds (OpenSSL's record buffers and state), charged to the
/// connection's budget when TLS starts.
pub const TLS_MEMORY: usize = 96 << 10;
/// A connection waiting for memory tries again this often (its own completions also
/// retry at once).
const MEM_RETRY: Duration = Duration::from_millis(5);
/// A connection idle this long gives its buffers back.
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// Time-based checks run every this many polls that found nothing (and after each sleep).
const TIMER_POLLS: u32 = 64;

/// Memory every connection holds while it works, besides command buffers.
pub fn fixed_memory(tls: bool) -> usize {
    RX_CAP + TX_MIN + if tls { TLS_MEMORY } else { 0 }
}

/// The largest request a connection with a `per_connection` budget admits: a power of
/// two (so its buffer is exactly that) no larger than [`MAX_IO`], that fits the budget
/// with the fixed buffers and a reply; `None` if not even 4 KiB fits.
pub fn max_io_for(per_connection: usize, tls: bool) -> Option<u32> {
    let room = per_connection.checked_sub(fixed_memory(tls) + REPLY_HDR + DIRECT_REPLY)?;
    let mut p = MAX_IO as usize;
    while p > room {
        p /= 2;
    }
    (p >= 4096).then_some(p as u32)
}

/// What a connection's listener allows it.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Largest read or write (from [`max_io_for`]; advertised in the negotiation).
    pub max_io: u32,
    /// No progress for this long while waiting on the client ends the connection.
    pub stall_timeout: Duration,
}

/// Counters a listener's connections share.
#[derive(Default, Debug)]
pub struct ConnCounters {
    /// Connections ended by the stall timeout.
    pub stalls: AtomicU64,
    /// Times a connection had to wait for memory (one per wait, however long).
    pub memory_waits: AtomicU64,
    /// Stall log lines, once per burst.
    pub stall_log: BurstLog,
}

/// Everything a connection gets from its listener besides the wire and the export.
pub struct ConnSetup {
    pub budget: ConnBudget,
    /// The connection's place in its listener's count, held for its life.
    pub permit: Option<ConnPermit>,
    pub limits: ConnLimits,
    pub counters: Arc<ConnCounters>,
    /// The wire is a TLS stream (it may have decrypted bytes to give after a writable
    /// edge too).
    pub tls: bool,
    /// Who is on the other end, for log lines.
    pub peer: String,
}

/// A read reply's data, sent from its slot's buffer once `tx` has gone out up to `at`
/// (the reply's header). The slot is reused only after it has been sent.
struct Direct {
    at: usize,
    slot: u32,
    len: usize,
    sent: usize,
}

/// A request's state in its engine slot (kept, buffer included, for the next request).
#[derive(Default)]
struct Req {
    req: Request,
    buf: Option<AlignedBuf>,
    /// Send-buffer room promised to this command's reply.
    cost: usize,
}

pub struct NbdConn {
    wire: Box<dyn Wire>,
    export: Arc<Export>,
    /// Slots, the disk's queue, validation, stats, drain: the shared frontend engine.
    eng: Engine<Req>,
    disk: DiskId,
    /// What the disk can do (its size lives in the engine).
    info: DeviceInfo,
    structured: bool,
    /// Empty until first needed (and again after an idle spell): reserved, then allocated.
    rx: Vec<u8>,
    rx_head: usize,
    rx_tail: usize,
    /// The last read filled the buffer, or reading stopped for back-pressure: there may
    /// be more in the socket, which no new edge will announce.
    rx_more: bool,
    /// A write whose payload is still arriving: (slot, bytes received so far).
    payload: Option<(u32, usize)>,
    /// Bytes of a refused write's payload still to drop.
    skip: usize,
    tx: Vec<u8>,
    tx_off: usize,
    /// Bytes of send-buffer capacity reserved in the budget.
    tx_charged: usize,
    /// Send-buffer room promised to the replies of admitted commands not yet answered.
    promised: usize,
    /// Read data sent from slot buffers, in stream order, each after `tx[..at]`.
    direct: VecDeque<Direct>,
    /// Bytes of `direct` not yet sent.
    direct_bytes: usize,
    tx_blocked: bool,
    /// The socket reported a hang-up: read until the end of the stream shows.
    hup: bool,
    /// Commands refused at submission, answered by the next `reap`.
    refused: Vec<(SlotId, Status)>,
    eof: bool,
    /// NBD_CMD_DISC received: finish what is in flight, then close.
    disc: bool,
    /// Protocol error, stall or export removed: read nothing more.
    dead: bool,
    finished: bool,
    budget: ConnBudget,
    _permit: Option<ConnPermit>,
    limits: ConnLimits,
    counters: Arc<ConnCounters>,
    tls: bool,
    peer: String,
    /// A request waits for memory (its header is kept; the socket is not read).
    mem_wait: bool,
    /// This wait is counted (until something is admitted again).
    mem_episode: bool,
    mem_retry: Option<Instant>,
    /// Bytes received and sent so far (stall detection compares them over time).
    rx_total: u64,
    tx_total: u64,
    /// While waiting on the client: the byte count and when it was last seen to move.
    rx_mark: Option<(u64, Instant)>,
    tx_mark: Option<(u64, Instant)>,
    /// Quiet since; buffers go back after [`IDLE_RELEASE`].
    idle_since: Option<Instant>,
    /// Polls that found nothing since the last time-based check.
    empty_polls: u32,
    /// The worker slept: run the time-based checks on the next poll.
    woke: bool,
    /// Test fault `nbd-request:<export>` armed: panic once a request is in the kernel.
    fault: bool,
}

// SAFETY: the SG lists in flight point into this connection's own slot buffers; the
// connection is driven by one worker thread at a time.
unsafe impl Send for NbdConn {}

impl NbdConn {
    pub fn new(
        wire: Box<dyn Wire>,
        export: Arc<Export>,
        structured: bool,
        setup: ConnSetup,
    ) -> nvmux_core::Result<NbdConn> {
        let mut eng = Engine::new(MAX_SLOTS);
        let disk = eng.add_disk(export.dev.clone(), &export.stats, 1, MAX_SLOTS as u32)?;
        // Every slot exists from the start (its SG list is allocated here, on the listener
        // thread): NBD negotiates no queue depth, and a client whose depth rises late
        // (fio's in-flight count wanders) must not make the worker allocate then.
        let mut ids = Vec::with_capacity(MAX_SLOTS);
        while let Some(i) = eng.alloc() {
            ids.push(i);
        }
        for i in ids.into_iter().rev() {
            eng.release(i);
        }
        let info = export.dev.info().clone();
        export.connections.fetch_add(1, Ordering::Relaxed);
        let fault = nvmux_core::fault::armed("nbd-request", &export.name);
        Ok(NbdConn {
            wire,
            eng,
            disk,
            info,
            structured,
            rx: Vec::new(),
            rx_head: 0,
            rx_tail: 0,
            rx_more: true,
            payload: None,
            skip: 0,
            tx: Vec::new(),
            tx_off: 0,
            tx_charged: 0,
            promised: 0,
            // Every slot may wait here at once: sized now, never grown per request.
            direct: VecDeque::with_capacity(MAX_SLOTS),
            direct_bytes: 0,
            tx_blocked: false,
            hup: false,
            refused: Vec::with_capacity(MAX_SLOTS),
            export,
            eof: false,
            disc: false,
            dead: false,
            finished: false,
            budget: setup.budget,
            _permit: setup.permit,
            limits: setup.limits,
            counters: setup.counters,
            tls: setup.tls,
            peer: setup.peer,
            mem_wait: false,
            mem_episode: false,
            mem_retry: None,
            rx_total: 0,
            tx_total: 0,
            rx_mark: None,
            tx_mark: None,
            idle_since: None,
            empty_polls: 0,
            fault,
            woke: false,
        })
    }

    /// The state, for a failing test's message.
    pub fn debug_state(&self) -> String {
        format!(
            "open={} bq={} rx={}..{} payload={:?} skip={} mem_wait={} held={} tx={} off={} promised={} charged={} direct={} eof={} dead={} disc={} rx_more={} busy={}",
            self.open_cmds(), self.eng.in_flight(), self.rx_head, self.rx_tail, self.payload, self.skip,
            self.mem_wait, self.budget.held(), self.tx.len(), self.tx_off, self.promised,
            self.tx_charged, self.direct.len(), self.eof, self.dead, self.disc, self.rx_more,
            self.eng.busy()
        )
    }

    /// Requests admitted and not yet answered (slots in use, less those whose reply data
    /// is being sent from their buffer).
    fn open_cmds(&self) -> usize {
        self.eng.busy() - self.direct.len()
    }

    /// Bytes of the connection's budget it holds now.
    pub fn memory(&self) -> usize {
        self.budget.held()
    }

    fn pending_tx(&self) -> usize {
        self.tx.len() - self.tx_off + self.direct_bytes
    }

    fn can_take(&self) -> bool {
        !self.dead
            && !self.disc
            && !self.mem_wait
            && self.pending_tx() < TX_HIGH
            && self.eng.has_free()
    }

    /// Reserve `n` bytes; when the connection's own limit is in the way, first give back
    /// the buffers cached in free slots.
    fn take(&mut self, n: usize) -> bool {
        if self.budget.try_take(n) {
            return true;
        }
        if self.release_cached() == 0 {
            return false;
        }
        self.budget.try_take(n)
    }

    /// Drop the buffers of free slots; returns the bytes given back.
    fn release_cached(&mut self) -> usize {
        let mut n = 0;
        for r in self.eng.free_data_mut() {
            if let Some(b) = r.buf.take() {
                n += b.len();
            }
        }
        self.budget.give(n);
        n
    }

    /// Make sure the send buffer holds, without growing, what is queued, what is promised
    /// and `cost` more bytes; then promise them.
    fn promise(&mut self, cost: usize) -> bool {
        let need = |c: &Self| c.tx.len() + c.promised + cost;
        if need(self) > self.tx_charged && self.tx_off > 0 {
            self.compact_tx();
        }
        if need(self) > self.tx_charged {
            let want = need(self).max(2 * self.tx_charged).max(TX_MIN);
            let exact = need(self);
            let got = if self.take(want - self.tx_charged) {
                want
            } else if want > exact && self.take(exact - self.tx_charged) {
                exact
            } else {
                return false;
            };
            // Vec grows to exactly the capacity asked of `reserve_exact`.
            self.tx.reserve_exact(got - self.tx.len());
            self.tx_charged = got;
        }
        self.promised += cost;
        true
    }

    /// Drop the bytes at the send buffer's front that have gone out.
    fn compact_tx(&mut self) {
        self.tx.drain(..self.tx_off);
        for d in self.direct.iter_mut() {
            d.at -= self.tx_off;
        }
        self.tx_off = 0;
    }

    fn enter_mem_wait(&mut self) {
        if !self.mem_episode {
            self.mem_episode = true;
            self.counters.memory_waits.fetch_add(1, Ordering::Relaxed);
        }
        self.mem_wait = true;
        self.mem_retry = Some(self.eng.now() + MEM_RETRY);
    }

    /// Try the request that waits for memory again (at least 1: poll again, the receive
    /// buffer may be what was missing).
    fn retry_memory(&mut self) -> usize {
        self.mem_wait = false;
        self.mem_retry = None;
        1 + self.process_rx()
    }

    /// The write whose payload was arriving will never run: free its slot.
    fn abandon_payload(&mut self) {
        if let Some((i, _)) = self.payload.take() {
            self.promised -= self.eng.slot(i).data.cost;
            self.eng.release(i);
        }
    }

    fn reply_error(&mut self, cookie: u64, err: u32) {
        // Errors use simple replies (allowed also with structured replies negotiated,
        // except for reads, which get an error chunk).
        simple_reply(&mut self.tx, err, cookie);
    }

    fn read_error(&mut self, cookie: u64, err: u32) {
        if self.structured {
            chunk(&mut self.tx, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6);
            self.tx.extend_from_slice(&err.to_be_bytes());
            self.tx.extend_from_slice(&0u16.to_be_bytes());
        } else {
            simple_reply(&mut self.tx, err, cookie);
        }
    }

    /// Give slot `i` a buffer of at least `len` bytes, reserved in the budget; `false`
    /// when the memory is not there now.
    ///
    /// Buffers are provisioned the way a `Vec` grows: when slot `i` needs a new one, free
    /// slots get one too until the buffers of that size number a power of two (as spare
    /// memory allows: [`ConnBudget::try_take_spare`]). A client's depth of 17 to 32 then
    /// costs one round of allocations at 17 and none later, however slowly it reaches
    /// its peak; before, each new peak allocated once more, late in a run (the
    /// zero-allocation test's 64 KiB and 1 MiB cases).
    fn ensure_buf(&mut self, i: SlotId, len: usize) -> bool {
        let need = buf_size(len);
        if self.eng.slot(i).data.buf.as_ref().map_or(0, |b| b.len()) >= need {
            return true;
        }
        // Buffers are kept for reuse at the size of the largest request a slot has
        // seen; a larger one replaces it.
        if let Some(old) = self.eng.slot_mut(i).data.buf.take() {
            self.budget.give(old.len());
        }
        if !self.take(need) {
            return false;
        }
        match AlignedBuf::try_new(need) {
            Some(b) => {
                self.eng.slot_mut(i).data.buf = Some(b);
                self.provision(need);
                true
            }
            None => {
                self.budget.give(need);
                false
            }
        }
    }

    /// Give free slots buffers of `need` bytes ahead of demand, until the slots that have
    /// one number a power of two (see [`NbdConn::ensure_buf`]).
    fn provision(&mut self, need: usize) {
        let have = self
            .eng
            .iter()
            .filter(|(_, s)| s.data.buf.as_ref().is_some_and(|b| b.len() >= need))
            .count();
        // At least 32 at once (a typical client's queue depth, within the connection's
        // budget): a client whose depth peaks late then finds its buffers there instead of
        // doubling them mid-run.
        let mut more = have.next_power_of_two().max(32) - have;
        let budget = &mut self.budget;
        for r in self.eng.free_data_mut() {
            if more == 0 {
                break;
            }
            if r.buf.as_ref().is_some_and(|b| b.len() >= need) {
                continue;
            }
            if !budget.try_take_spare(need) {
                break;
            }
            match AlignedBuf::try_new(need) {
                Some(b) => {
                    if let Some(old) = r.buf.replace(b) {
                        budget.give(old.len());
                    }
                    more -= 1;
                }
                None => {
                    budget.give(need);
                    break;
                }
            }
        }
    }

    /// The protocol's own checks of a request (the range and the disk's read-only flag
    /// are the engine's); `Err(errno)` for one the export refuses.
    fn check(&self, r: &Request) -> Result<(), u32> {
        if r.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_FAST_ZERO) != 0 {
            return Err(EINVAL);
        }
        if r.kind == CMD_FLUSH {
            return Ok(());
        }
        if r.kind != CMD_READ && self.export.read_only() {
            return Err(EPERM);
        }
        if r.kind == CMD_WRITE_ZEROES && r.flags & CMD_FLAG_FAST_ZERO != 0 {
            return Err(ENOTSUP); // zeroing is not guaranteed to be fast
        }
        if (r.kind == CMD_TRIM && !self.info.discard)
            || (r.kind == CMD_WRITE_ZEROES && !self.info.write_zeroes)
        {
            return Err(EINVAL);
        }
        if (r.kind == CMD_READ || r.kind == CMD_WRITE) && r.length > self.limits.max_io {
            return Err(EOVERFLOW);
        }
        let bs = self.info.block_size as u64;
        if r.length == 0 || !r.offset.is_multiple_of(bs) || !(r.length as u64).is_multiple_of(bs) {
            return Err(EINVAL);
        }
        Ok(())
    }

    /// A slot for `r`, its command checked by the engine against the disk's live size.
    fn start(&mut self, r: &Request) -> Result<Option<SlotId>, u32> {
        let len = match r.kind {
            CMD_READ | CMD_WRITE => r.length as usize,
            _ => 0,
        };
        // A command without data prefers a slot without a buffer, so that the buffers
        // stay free for reads and writes.
        let need = buf_size(len);
        let Some(i) = self.eng.alloc_where(|q| match &q.buf {
            Some(b) => need > 0 && b.len() >= need,
            None => need == 0,
        }) else {
            return Ok(None);
        };
        let bs = self.info.block_size as u64;
        let (op, slba, nlb) = match r.kind {
            CMD_READ => (Opcode::Read, r.offset / bs, r.length as u64 / bs),
            CMD_WRITE => (Opcode::Write, r.offset / bs, r.length as u64 / bs),
            CMD_TRIM => (Opcode::Deallocate, r.offset / bs, r.length as u64 / bs),
            CMD_WRITE_ZEROES => (Opcode::WriteZeroes, r.offset / bs, r.length as u64 / bs),
            _ => (Opcode::Flush, 0, 0),
        };
        let fua = r.flags & CMD_FLAG_FUA != 0;
        match self.eng.prepare(i, self.disk, op, slba, nlb as u32, fua) {
            Ok(()) => Ok(Some(i)),
            Err(st) => {
                self.eng.release(i);
                Err(match st {
                    // Past the end: no room to write, nothing to read.
                    Status::LBA_OUT_OF_RANGE if r.kind != CMD_READ => ENOSPC,
                    st => errno(st),
                })
            }
        }
    }

    /// Act on one request header (its write payload, if any, follows in the stream).
    /// `false`: its memory is not available now; the header must stay where it is.
    fn admit(&mut self, r: Request) -> bool {
        let known = matches!(
            r.kind,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES
        );
        if r.kind == CMD_DISC {
            self.disc = true;
            return true;
        }
        if r.kind == CMD_WRITE && r.length > self.limits.max_io {
            // The payload cannot be skipped safely (nor is it worth reading): the stream
            // is lost.
            tracing::debug!(export = %self.export.name, peer = %self.peer, "nbd: write of {} bytes exceeds the maximum of {}; closing", r.length, self.limits.max_io);
            self.dead = true;
            return true;
        }
        let verdict = if known { self.check(&r) } else { Err(EINVAL) };
        let slot = match verdict {
            Ok(()) => self.start(&r),
            Err(e) => Err(e),
        };
        let i = match slot {
            Ok(Some(i)) => i,
            Ok(None) => return false, // no slot: `can_take` said there was one
            Err(e) => {
                if !self.promise(REPLY_HDR) {
                    return false;
                }
                if r.kind == CMD_WRITE {
                    self.skip = r.length as usize;
                }
                if r.kind == CMD_READ {
                    self.read_error(r.cookie, e);
                } else {
                    self.reply_error(r.cookie, e);
                }
                self.promised -= REPLY_HDR;
                return true;
            }
        };
        let len = if matches!(r.kind, CMD_READ | CMD_WRITE) {
            r.length as usize
        } else {
            0
        };
        let cost = if r.kind == CMD_READ && len < DIRECT_REPLY {
            REPLY_HDR + len
        } else {
            REPLY_HDR
        };
        if !self.promise(cost) {
            self.eng.release(i);
            return false;
        }
        if !self.ensure_buf(i, len) {
            self.promised -= cost;
            self.eng.release(i);
            return false;
        }
        let q = &mut self.eng.slot_mut(i).data;
        q.req = r;
        q.cost = cost;
        if r.kind == CMD_WRITE {
            self.payload = Some((i, 0));
        } else {
            self.submit(i);
        }
        true
    }

    /// Point the slot's SG list at its buffer and hand the command to the engine.
    fn submit(&mut self, i: SlotId) {
        let (q, sg) = self.eng.slot_mut(i).parts();
        if matches!(q.req.kind, CMD_READ | CMD_WRITE) {
            if let Some(b) = &q.buf {
                sg.push(b.as_mut_ptr(), q.req.length as usize);
            }
        }
        if let Err(st) = self.eng.submit(i) {
            self.refused.push((i, st));
        }
    }

    /// Consume what the receive buffer holds. Returns how many requests were started.
    fn process_rx(&mut self) -> usize {
        let mut n = 0;
        loop {
            let avail = self.rx_tail - self.rx_head;
            if self.skip > 0 {
                let k = self.skip.min(avail);
                self.skip -= k;
                self.rx_head += k;
                if self.skip > 0 {
                    break;
                }
                continue;
            }
            if let Some((i, got)) = self.payload {
                let len = self.eng.slot(i).data.req.length as usize;
                let k = (len - got).min(avail);
                if let Some(b) = self.eng.slot_mut(i).data.buf.as_mut() {
                    b.as_mut_slice()[got..got + k]
                        .copy_from_slice(&self.rx[self.rx_head..self.rx_head + k]);
                }
                self.rx_head += k;
                if got + k < len {
                    self.payload = Some((i, got + k));
                    break;
                }
                self.payload = None;
                self.submit(i);
                n += 1;
                continue;
            }
            if avail < REQUEST_LEN || !self.can_take() {
                break;
            }
            let h: [u8; REQUEST_LEN] = self.rx[self.rx_head..self.rx_head + REQUEST_LEN]
                .try_into()
                .unwrap_or([0; REQUEST_LEN]);
            let Some(r) = parse_request(&h) else {
                tracing::debug!(export = %self.export.name, peer = %self.peer, "nbd: bad request magic; closing the connection");
                self.dead = true;
                break;
            };
            if !self.admit(r) {
                self.enter_mem_wait();
                break;
            }
            self.mem_episode = false;
            self.rx_head += REQUEST_LEN;
            n += 1;
        }
        if self.rx_head == self.rx_tail {
            self.rx_head = 0;
            self.rx_tail = 0;
        }
        if self.stranded() {
            // Requests wait in the buffer (back-pressure): take them up again once the
            // connection can, though no edge will say so.
            self.rx_more = true;
        }
        n
    }

    /// Whole request headers wait in the receive buffer.
    fn stranded(&self) -> bool {
        !self.dead
            && self.payload.is_none()
            && self.skip == 0
            && self.rx_tail - self.rx_head >= REQUEST_LEN
    }

    fn recv(&mut self) -> usize {
        let mut n = 0;
        if !self.rx_more && !self.hup {
            return 0; // drained, and no edge since: nothing to read
        }
        if self.rx_tail > self.rx_head && self.can_take() {
            n += self.process_rx(); // what waited in the buffer first
        }
        loop {
            if self.eof || self.dead || self.disc {
                // What arrived before the end is still served.
                self.rx_more = self.stranded() && !self.disc;
                break;
            }
            if self.payload.is_none() && self.skip == 0 && !self.can_take() {
                self.rx_more = true; // back-pressure: come back when slots, output or memory free up
                break;
            }
            // A large payload goes straight into its buffer.
            if let (Some((i, got)), true) = (self.payload, self.rx_head == self.rx_tail) {
                let len = self.eng.slot(i).data.req.length as usize;
                if len - got >= DIRECT_PAYLOAD {
                    let r = match self.eng.slot_mut(i).data.buf.as_mut() {
                        Some(b) => self.wire.recv(&mut b.as_mut_slice()[got..len]),
                        None => Ok(0),
                    };
                    match r {
                        Ok(0) => self.eof = true,
                        Ok(k) => {
                            n += 1;
                            self.rx_total += k as u64;
                            if got + k == len {
                                self.payload = None;
                                self.submit(i);
                            } else {
                                self.payload = Some((i, got + k));
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            self.rx_more = self.stranded();
                            break;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => self.eof = true,
                    }
                    continue;
                }
            }
            if self.rx.is_empty() {
                // The receive buffer is reserved before it is allocated.
                if !self.take(RX_CAP) {
                    self.enter_mem_wait();
                    self.rx_more = true;
                    break;
                }
                self.rx = vec![0u8; RX_CAP];
                self.mem_episode = false;
            }
            if self.rx_tail == self.rx.len() {
                if self.rx_head == 0 {
                    self.rx_more = true;
                    break;
                }
                self.rx.copy_within(self.rx_head..self.rx_tail, 0);
                self.rx_tail -= self.rx_head;
                self.rx_head = 0;
            }
            let tail = self.rx_tail;
            match self.wire.recv(&mut self.rx[tail..]) {
                Ok(0) => self.eof = true,
                Ok(k) => {
                    self.rx_tail += k;
                    self.rx_total += k as u64;
                    let full = self.rx_tail == self.rx.len();
                    n += 1 + self.process_rx();
                    if !full {
                        // Short read: drained; the next edge wakes us (unless requests
                        // wait in the buffer).
                        self.rx_more = self.stranded();
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.rx_more = self.stranded();
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
        n
    }

    fn reap(&mut self) -> usize {
        let mut n = self.eng.reap();
        if !self.refused.is_empty() {
            let mut refused = std::mem::take(&mut self.refused);
            n += refused.len();
            for (i, st) in refused.drain(..) {
                self.complete(i, st);
            }
            self.refused = refused;
        }
        while let Some((i, st)) = self.eng.next_completion() {
            self.complete(i, st);
        }
        n
    }

    /// Write slot `i`'s reply; free the slot unless its data goes out from its buffer.
    fn complete(&mut self, i: SlotId, st: Status) {
        let (r, cost) = {
            let q = &self.eng.slot(i).data;
            (q.req, q.cost)
        };
        self.promised -= cost;
        let err = errno(st);
        if r.kind == CMD_READ {
            if err != 0 {
                self.read_error(r.cookie, err);
            } else {
                if self.structured {
                    chunk(
                        &mut self.tx,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        r.cookie,
                        8 + r.length,
                    );
                    self.tx.extend_from_slice(&r.offset.to_be_bytes());
                } else {
                    simple_reply(&mut self.tx, 0, r.cookie);
                }
                let len = r.length as usize;
                if len >= DIRECT_REPLY {
                    // Sent from the slot's buffer; the slot is released once it is.
                    self.direct.push_back(Direct {
                        at: self.tx.len(),
                        slot: i,
                        len,
                        sent: 0,
                    });
                    self.direct_bytes += len;
                    return;
                }
                if let Some(b) = &self.eng.slot(i).data.buf {
                    self.tx.extend_from_slice(&b.as_slice()[..len]);
                }
            }
        } else {
            simple_reply(&mut self.tx, err, r.cookie);
        }
        self.eng.release(i);
    }

    fn flush(&mut self) -> usize {
        let mut n = 0;
        if self.tx_blocked {
            return 0; // the socket was full; its next writable edge clears this
        }
        while self.pending_tx() > 0 {
            // The stream from here: tx up to the first direct reply, its data, tx up to
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
                    self.tx_total += k as u64;
                    self.sent(k);
                    n += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.tx_blocked = true;
                    return n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // The peer is gone: nothing more can be sent.
                    self.eof = true;
                    self.dead = true;
                    self.drop_output();
                    return n;
                }
            }
        }
        self.tx_blocked = false;
        if self.tx_off == self.tx.len() && self.direct.is_empty() {
            self.tx.clear();
            self.tx_off = 0;
        } else if self.tx_off >= TX_COMPACT {
            // Output keeps coming while some waits: drop what has gone out.
            self.compact_tx();
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
            self.eng.release(slot);
        }
        self.tx_off += k;
    }

    /// Output that can never be sent: drop it and free its slots.
    fn drop_output(&mut self) {
        self.tx.clear();
        self.tx_off = 0;
        for d in self.direct.drain(..) {
            self.eng.release(d.slot);
        }
        self.direct_bytes = 0;
    }

    fn closing(&self) -> bool {
        self.eof || self.disc || self.dead
    }

    /// Part of a request is here and the rest is up to the client.
    fn partial_request(&self) -> bool {
        let avail = self.rx_tail - self.rx_head;
        self.payload.is_some() || self.skip > 0 || (avail > 0 && avail < REQUEST_LEN)
    }

    fn quiet(&self) -> bool {
        self.open_cmds() == 0
            && self.pending_tx() == 0
            && !self.partial_request()
            && self.rx_head == self.rx_tail
            && !self.mem_wait
            && self.refused.is_empty()
    }

    /// The connection waited on its client too long: end it.
    fn stalled(&mut self, what: &str) {
        self.counters.stalls.fetch_add(1, Ordering::Relaxed);
        if let Some(more) = self.counters.stall_log.hit() {
            tracing::info!(export = %self.export.name, peer = %self.peer,
                "nbd: {what} for {} ms (stall_timeout_ms); connection closed{}",
                self.limits.stall_timeout.as_millis(), BurstLog::more(more));
        }
        self.dead = true;
        self.eof = true;
        self.skip = 0;
        self.abandon_payload();
        self.drop_output();
    }

    /// Give back every buffer an idle connection holds (TLS state stays).
    fn release_idle(&mut self) {
        self.release_cached();
        if !self.rx.is_empty() {
            self.rx = Vec::new();
            self.rx_head = 0;
            self.rx_tail = 0;
            self.budget.give(RX_CAP);
        }
        if self.tx_charged > 0 {
            self.tx = Vec::new();
            self.tx_off = 0;
            self.budget.give(self.tx_charged);
            self.tx_charged = 0;
        }
    }

    /// The checks that need the clock: stalls, the memory retry, idle release.
    fn timers(&mut self) -> usize {
        self.empty_polls = 0;
        let now = self.eng.now();
        let stall = self.limits.stall_timeout;
        let mut n = 0;
        if self.partial_request() && !self.closing() {
            match self.rx_mark {
                Some((t, since)) if t == self.rx_total => {
                    if now.saturating_duration_since(since) >= stall {
                        self.stalled("a request's bytes stopped arriving");
                        n += 1;
                    }
                }
                _ => self.rx_mark = Some((self.rx_total, now)),
            }
        } else {
            self.rx_mark = None;
        }
        if self.pending_tx() > 0 && self.tx_blocked && !self.eof {
            match self.tx_mark {
                Some((t, since)) if t == self.tx_total => {
                    if now.saturating_duration_since(since) >= stall {
                        self.stalled("the client read no reply");
                        n += 1;
                    }
                }
                _ => self.tx_mark = Some((self.tx_total, now)),
            }
        } else {
            self.tx_mark = None;
        }
        if self.mem_wait && self.mem_retry.is_some_and(|t| now >= t) {
            n += self.retry_memory();
        }
        if self.quiet() && !self.closing() {
            let since = *self.idle_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= IDLE_RELEASE
                && (self.budget.held() > self.fixed_tls())
            {
                self.release_idle();
            }
        } else {
            self.idle_since = None;
        }
        n
    }

    fn fixed_tls(&self) -> usize {
        if self.tls {
            TLS_MEMORY
        } else {
            0
        }
    }
}

/// The buffer a request of `len` data bytes gets: a power of two, at least 4 KiB (none
/// for a command without data).
fn buf_size(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len.next_power_of_two().max(4096)
    }
}

impl Drop for NbdConn {
    fn drop(&mut self) {
        // The engine retires the queue's counters when it goes.
        self.export.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkSource for NbdConn {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        self.eng.round();
        if self.export.stop.load(Ordering::Acquire) {
            self.dead = true;
        }
        let mut n = self.reap();
        if self.mem_wait && n > 0 {
            n += self.retry_memory(); // own commands completed: memory came back
        }
        n += self.recv();
        if (self.eof || self.dead) && self.payload.is_some() {
            // A write cut short by the end of the stream (or a protocol error): it can
            // neither run nor be answered.
            self.abandon_payload();
        }
        self.eng.kick();
        if self.fault && self.eng.in_flight() > 0 {
            // Injected by a test: unwinds with requests in the kernel, which the worker
            // contains to this connection.
            panic!("injected fault nbd-request:{}", self.export.name);
        }
        let reaped = self.reap();
        n += reaped;
        let freed = self.direct.len();
        n += self.flush();
        if self.mem_wait && (reaped > 0 || self.direct.len() < freed) {
            // Commands completed, or read data went out: their buffers are free.
            n += self.retry_memory();
        }
        self.eng.publish();
        if n == 0 {
            self.empty_polls += 1;
        } else {
            self.idle_since = None; // busy: the idle clock starts again when it is quiet
        }
        if self.woke || self.empty_polls >= TIMER_POLLS {
            self.woke = false;
            n += self.timers();
        }
        if (self.dead || self.disc) && !self.eng.stopping() && self.payload.is_none() {
            // No new request: what is in flight finishes, then the queue retires. (At
            // the end of the stream alone, requests that arrived before it are served.)
            self.eng.stop();
        }
        if self.closing()
            && self.open_cmds() == 0
            && self.eng.drained()
            && (self.pending_tx() == 0 || self.eof)
            && (!self.stranded() || self.disc)
        {
            self.eng.retire();
            self.finished = true;
            return n.max(1);
        }
        n
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        let mut v = Vec::new();
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
        if self.finished {
            return false;
        }
        // Arm the deadlines (stall, memory retry, idle release) before sleeping.
        if self.timers() > 0 {
            return false;
        }
        if self.closing() && self.open_cmds() == 0 {
            return false; // finish on the next poll
        }
        if self.rx_more && !self.closing() && self.can_take() {
            return false;
        }
        if self.pending_tx() > 0 && !self.tx_blocked {
            return false;
        }
        if !self.refused.is_empty() {
            return false;
        }
        self.eng.may_sleep()
    }

    fn after_sleep(&mut self) {
        self.woke = true;
    }

    fn finished(&self) -> bool {
        self.finished
    }

    fn next_deadline(&self) -> Option<Instant> {
        let stall = self.limits.stall_timeout;
        [
            self.eng.next_deadline(),
            self.rx_mark.map(|m| m.1 + stall),
            self.tx_mark.map(|m| m.1 + stall),
            self.mem_retry.filter(|_| self.mem_wait),
            self.idle_since
                .filter(|_| self.budget.held() > self.fixed_tls())
                .map(|t| t + IDLE_RELEASE),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn socket_ready(&mut self, r: Readiness) {
        if r.readable || (r.writable && self.tls) {
            // A TLS read may have stopped because OpenSSL had to write first.
            self.rx_more = true;
        }
        self.hup |= r.hup;
        if r.writable {
            self.tx_blocked = false;
        }
    }

    fn describe(&self) -> String {
        format!(
            "NBD connection from {} to export {:?}",
            self.peer, self.export.name
        )
    }
}
