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

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use nvmux_core::stats::{OpClass, QueueStats};
use nvmux_core::worker::{Readiness, WorkSource};
use nvmux_core::{AlignedBuf, BlockQueue, DeviceInfo, IoCommand, Opcode, SgList, Status, Wire};

use crate::proto::*;
use crate::Export;

/// Receive buffer for request headers and small payloads.
const RX_CAP: usize = 256 << 10;
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

/// A read reply's data, sent from its slot's buffer once `tx` has gone out up to `at`
/// (the reply's header). The slot is reused only after it has been sent.
struct Direct {
    at: usize,
    slot: u32,
    len: usize,
    sent: usize,
}

struct Slot {
    req: Request,
    buf: Option<AlignedBuf>,
    start: Instant,
    class: OpClass,
    used: bool,
}

pub struct NbdConn {
    wire: Box<dyn Wire>,
    export: Arc<Export>,
    bq: Box<dyn BlockQueue>,
    info: DeviceInfo,
    structured: bool,
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
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    tx: Vec<u8>,
    tx_off: usize,
    /// Read data sent from slot buffers, in stream order, each after `tx[..at]`.
    direct: VecDeque<Direct>,
    /// Bytes of `direct` not yet sent.
    direct_bytes: usize,
    tx_blocked: bool,
    /// The socket reported a hang-up: read until the end of the stream shows.
    hup: bool,
    done: Vec<(IoCommand, Status)>,
    stats: Arc<QueueStats>,
    eof: bool,
    /// NBD_CMD_DISC received: finish what is in flight, then close.
    disc: bool,
    /// Protocol error or export removed: read nothing more.
    dead: bool,
    finished: bool,
}

// SAFETY: the SG lists in flight point into this connection's own slot buffers; the
// connection is driven by one worker thread at a time.
unsafe impl Send for NbdConn {}

impl NbdConn {
    pub fn new(
        wire: Box<dyn Wire>,
        export: Arc<Export>,
        structured: bool,
    ) -> nvmux_core::Result<NbdConn> {
        let bq = export.dev.open_queue(MAX_SLOTS as u32)?;
        let info = export.dev.info().clone();
        let stats = export.stats.new_queue();
        export.connections.fetch_add(1, Ordering::Relaxed);
        Ok(NbdConn {
            wire,
            bq,
            info,
            structured,
            rx: vec![0u8; RX_CAP],
            rx_head: 0,
            rx_tail: 0,
            rx_more: true,
            payload: None,
            skip: 0,
            slots: Vec::with_capacity(32),
            free: Vec::with_capacity(32),
            in_flight: 0,
            tx: Vec::with_capacity(1 << 20),
            tx_off: 0,
            direct: VecDeque::new(),
            direct_bytes: 0,
            tx_blocked: false,
            hup: false,
            done: Vec::with_capacity(MAX_SLOTS),
            stats,
            export,
            eof: false,
            disc: false,
            dead: false,
            finished: false,
        })
    }

    fn pending_tx(&self) -> usize {
        self.tx.len() - self.tx_off + self.direct_bytes
    }

    fn can_take(&self) -> bool {
        !self.dead
            && !self.disc
            && self.pending_tx() < TX_HIGH
            && (self.free.len() + MAX_SLOTS > self.slots.len())
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

    fn alloc_slot(&mut self, req: Request, len: usize, class: OpClass) -> u32 {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    req,
                    buf: None,
                    start: Instant::now(),
                    class,
                    used: false,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[i as usize];
        s.req = req;
        s.class = class;
        s.used = true;
        s.start = Instant::now();
        if len > 0 && s.buf.as_ref().is_none_or(|b| b.len() < len) {
            // Buffers grow to the largest request a slot has seen and are kept.
            s.buf = Some(AlignedBuf::new(len.next_power_of_two().max(4096)));
        }
        self.in_flight += 1;
        i
    }

    /// The command of slot `i` is over; its buffer stays untouched until `free.push(i)`.
    fn retire(&mut self, i: u32) {
        self.slots[i as usize].used = false;
        self.in_flight -= 1;
    }

    fn release(&mut self, i: u32) {
        self.retire(i);
        self.free.push(i);
    }

    /// Check a request; `Err(errno)` for one the export refuses.
    fn check(&mut self, r: &Request) -> Result<(), u32> {
        if r.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_FAST_ZERO) != 0 {
            return Err(EINVAL);
        }
        if r.kind == CMD_FLUSH {
            return Ok(());
        }
        let writes = r.kind != CMD_READ;
        if writes && self.export.read_only() {
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
        if (r.kind == CMD_READ || r.kind == CMD_WRITE) && r.length > MAX_IO {
            return Err(EOVERFLOW);
        }
        let bs = self.info.block_size as u64;
        if r.length == 0 || !r.offset.is_multiple_of(bs) || !(r.length as u64).is_multiple_of(bs) {
            return Err(EINVAL);
        }
        let end = r.offset.checked_add(r.length as u64).ok_or(EINVAL)?;
        let mut size = self.info.size_bytes();
        if end > size {
            // The disk may have grown (a thin volume); a shrink is the device's to enforce.
            self.info.num_blocks = self.export.dev.capacity_bytes() / bs;
            size = self.info.size_bytes();
        }
        if end > size {
            return Err(if writes { ENOSPC } else { EINVAL });
        }
        Ok(())
    }

    /// Act on one request header (its write payload, if any, follows in the stream).
    fn request(&mut self, r: Request) {
        let known = matches!(
            r.kind,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES
        );
        if r.kind == CMD_DISC {
            self.disc = true;
            return;
        }
        if !known {
            return self.reply_error(r.cookie, EINVAL);
        }
        if r.kind == CMD_WRITE && r.length > MAX_IO {
            // The payload cannot be skipped safely: the stream is lost.
            tracing::debug!(export = %self.export.name, "nbd: write of {} bytes exceeds the maximum; closing", r.length);
            self.dead = true;
            return;
        }
        if let Err(e) = self.check(&r) {
            if r.kind == CMD_WRITE {
                self.skip = r.length as usize;
            }
            return if r.kind == CMD_READ {
                self.read_error(r.cookie, e)
            } else {
                self.reply_error(r.cookie, e)
            };
        }
        let len = if matches!(r.kind, CMD_READ | CMD_WRITE) {
            r.length as usize
        } else {
            0
        };
        let class = match r.kind {
            CMD_READ => OpClass::Read,
            CMD_WRITE => OpClass::Write,
            _ => OpClass::Other,
        };
        let i = self.alloc_slot(r, len, class);
        if r.kind == CMD_WRITE {
            self.payload = Some((i, 0));
        } else {
            self.submit(i);
        }
    }

    fn submit(&mut self, i: u32) {
        let s = &self.slots[i as usize];
        let r = s.req;
        let bs = self.info.block_size as u64;
        let (op, has_data) = match r.kind {
            CMD_READ => (Opcode::Read, true),
            CMD_WRITE => (Opcode::Write, true),
            CMD_FLUSH => (Opcode::Flush, false),
            CMD_TRIM => (Opcode::Deallocate, false),
            _ => (Opcode::WriteZeroes, false),
        };
        let mut sg = SgList::with_capacity(1);
        if has_data {
            if let Some(b) = &s.buf {
                sg = b.sg(0, r.length as usize);
            }
        }
        let (slba, nlb) = if op == Opcode::Flush {
            (0, 0)
        } else {
            (r.offset / bs, (r.length as u64 / bs) as u32)
        };
        let mut cmd = IoCommand::new(op, slba, nlb, i as u64, sg);
        cmd.fua = r.flags & CMD_FLAG_FUA != 0;
        match cmd.validate(&self.info) {
            Ok(()) => self.bq.submit(cmd),
            Err(st) => self.done.push((cmd, st)),
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
                let len = self.slots[i as usize].req.length as usize;
                let k = (len - got).min(avail);
                if let Some(b) = self.slots[i as usize].buf.as_mut() {
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
                tracing::debug!(export = %self.export.name, "nbd: bad request magic; closing the connection");
                self.dead = true;
                break;
            };
            self.rx_head += REQUEST_LEN;
            self.request(r);
            n += 1;
        }
        if self.rx_head == self.rx_tail {
            self.rx_head = 0;
            self.rx_tail = 0;
        }
        n
    }

    fn recv(&mut self) -> usize {
        let mut n = 0;
        if !self.rx_more && !self.hup {
            return 0; // drained, and no edge since: nothing to read
        }
        loop {
            if self.eof || self.dead || self.disc {
                self.rx_more = false;
                break;
            }
            if self.payload.is_none() && self.skip == 0 && !self.can_take() {
                self.rx_more = true; // back-pressure: come back when slots or output free up
                break;
            }
            // A large payload goes straight into its buffer.
            if let (Some((i, got)), true) = (self.payload, self.rx_head == self.rx_tail) {
                let len = self.slots[i as usize].req.length as usize;
                if len - got >= DIRECT_PAYLOAD {
                    let r = match self.slots[i as usize].buf.as_mut() {
                        Some(b) => self.wire.recv(&mut b.as_mut_slice()[got..len]),
                        None => Ok(0),
                    };
                    match r {
                        Ok(0) => self.eof = true,
                        Ok(k) => {
                            n += 1;
                            if got + k == len {
                                self.payload = None;
                                self.submit(i);
                            } else {
                                self.payload = Some((i, got + k));
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            self.rx_more = false;
                            break;
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => self.eof = true,
                    }
                    continue;
                }
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
                    let full = self.rx_tail == self.rx.len();
                    n += 1 + self.process_rx();
                    if !full {
                        self.rx_more = false;
                        break; // short read: drained; the next edge wakes us
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.rx_more = false;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => self.eof = true,
            }
        }
        n
    }

    fn reap(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.done);
        self.bq.poll(&mut |c, s| done.push((c, s)));
        let n = done.len();
        if n > 0 {
            let now = Instant::now();
            for (cmd, st) in done.drain(..) {
                let i = cmd.tag as u32;
                let Some(s) = self.slots.get(i as usize).filter(|s| s.used) else {
                    continue;
                };
                let (r, class, start) = (s.req, s.class, s.start);
                let err = errno(st);
                let bytes = if err == 0 && class != OpClass::Other {
                    r.length as u64
                } else {
                    0
                };
                self.stats
                    .record(class, bytes, now.saturating_duration_since(start), err == 0);
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
                            // Sent from the slot's buffer; the slot is freed once it is.
                            self.retire(i);
                            self.direct.push_back(Direct {
                                at: self.tx.len(),
                                slot: i,
                                len,
                                sent: 0,
                            });
                            self.direct_bytes += len;
                            continue;
                        }
                        if let Some(b) = &self.slots[i as usize].buf {
                            self.tx.extend_from_slice(&b.as_slice()[..len]);
                        }
                    }
                } else {
                    simple_reply(&mut self.tx, err, r.cookie);
                }
                self.release(i);
            }
        }
        self.done = done;
        n
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
                    if let Some(b) = &self.slots[d.slot as usize].buf {
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
            self.free.push(slot);
        }
        self.tx_off += k;
    }

    /// Output that can never be sent: drop it and free its slots.
    fn drop_output(&mut self) {
        self.tx.clear();
        self.tx_off = 0;
        for d in self.direct.drain(..) {
            self.free.push(d.slot);
        }
        self.direct_bytes = 0;
    }

    fn closing(&self) -> bool {
        self.eof || self.disc || self.dead
    }
}

impl Drop for NbdConn {
    fn drop(&mut self) {
        if !self.finished {
            self.export.stats.retire(&self.stats);
        }
        self.export.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkSource for NbdConn {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        if self.export.stop.load(Ordering::Acquire) {
            self.dead = true;
        }
        let mut n = self.reap();
        n += self.recv();
        if (self.eof || self.dead) && self.payload.is_some() {
            // A write cut short by the end of the stream (or a protocol error): it can
            // neither run nor be answered.
            if let Some((i, _)) = self.payload.take() {
                self.release(i);
            }
        }
        self.bq.kick();
        n += self.reap();
        n += self.flush();
        self.stats.set_in_flight(self.in_flight as u64);
        if self.closing()
            && self.in_flight == 0
            && self.bq.in_flight() == 0
            && (self.pending_tx() == 0 || self.eof)
        {
            self.export.stats.retire(&self.stats);
            self.finished = true;
            return n.max(1);
        }
        n
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        let mut v = Vec::new();
        self.bq.wait_fds(&mut v);
        v
    }

    fn socket_fd(&self) -> Option<RawFd> {
        self.wire.fd()
    }

    fn take_fds_changed(&mut self) -> bool {
        self.bq.take_fds_changed()
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.finished {
            return false;
        }
        if self.closing() && self.in_flight == 0 {
            return false; // finish on the next poll
        }
        if self.rx_more && !self.closing() && self.can_take() {
            return false;
        }
        if self.pending_tx() > 0 && !self.tx_blocked {
            return false;
        }
        if !self.done.is_empty() {
            return false;
        }
        self.bq.may_sleep()
    }

    fn after_sleep(&mut self) {}

    fn finished(&self) -> bool {
        self.finished
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.bq.next_deadline()
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
        format!("NBD connection to export {:?}", self.export.name)
    }
}
