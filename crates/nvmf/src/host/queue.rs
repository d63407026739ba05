//! One I/O queue of a [`super::RemoteDevice`]: a [`BlockQueue`] driven by one worker
//! thread over a TCP connection the controller thread connected for it, on the queue's
//! own io_uring: one `Recv` preposted into the receive buffer, at most one `Send` of the
//! send buffer in flight (commands queued meanwhile go to a second buffer, swapped in
//! when the send completes), so the kernel never sees a buffer that moves.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use nvmux_core::crc32c::Crc32c;
use nvmux_core::eventfd::EventFd;
use nvmux_core::{BlockQueue, IoCommand, Opcode, SgList, Status};

use super::wire::{self, Frame, HostPdu};
use super::Shared;
use crate::pdu::{Digests, CH};

/// Path-related status: transient transport error (SCT 3, SC 0x71).
pub const PATH_ERROR: Status = Status::new(3, 0x71);
/// Receive staging buffer.
const RX_BUF: usize = 64 << 10;
/// New commands wait while this much is queued for sending.
const TX_HIGH: usize = 1 << 20;
/// How often in-flight commands are checked against the I/O timeout.
const SCAN: Duration = Duration::from_millis(250);
/// How long a dropped queue waits for the kernel to finish its socket operations.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// user_data: generation << 2 | kind.
const K_RECV: u64 = 1;
const K_SEND: u64 = 2;

/// A connected I/O queue socket, handed from the controller thread to the worker.
pub struct Conn {
    pub stream: TcpStream,
    pub dg: Digests,
    /// In-capsule data limit (IOCCSZ).
    pub inline_max: usize,
    pub maxh2c: usize,
    pub cpda: usize,
    pub nsid: u32,
    pub block_size: u32,
    /// Largest C2HData payload accepted (the device's largest transfer).
    pub max_data: usize,
}

/// What a queue and the controller thread share.
pub struct QueueShared {
    pub qid: u16,
    pub entries: u16,
    pub handover: Mutex<Option<Conn>>,
    pub ready: AtomicBool,
    pub evt: EventFd,
    /// The queue needs a connection (new, or its connection was lost).
    pub want: AtomicBool,
    pub closed: AtomicBool,
}

struct Slot {
    cmd: Option<IoCommand>,
    bytes: u32,
    recvd: u32,
    started: Instant,
    /// An R2T being answered: (transfer tag, offset, length, bytes sent so far).
    r2t: Option<(u16, u32, u32, u32)>,
}

/// Largest H2CData PDU payload this host sends (smaller than MAXH2CDATA is allowed).
const H2C_CHUNK: u32 = 64 << 10;

enum Rx {
    /// Waiting for a common header.
    Ch,
    /// Receiving C2HData payload for `cid`.
    Data {
        cid: u16,
        off: u32,
        left: u32,
        len: u32,
        ddgst: bool,
        success: bool,
        crc: Crc32c,
    },
}

pub struct RemoteQueue {
    sh: Arc<QueueShared>,
    dev: Arc<Shared>,
    ring: IoUring,
    ring_efd: EventFd,
    cqes: Vec<(u64, i32)>,
    /// Connection generation (stale completions of an older connection are ignored).
    generation: u64,
    /// Socket operations in the kernel (of any generation).
    ops: u32,
    recv_busy: bool,
    send_busy: bool,
    unsubmitted: bool,
    /// A lost connection's socket, kept open until its operations completed.
    dead: Option<TcpStream>,
    /// The buffer being sent (the kernel reads it while `send_busy`).
    sending: Vec<u8>,
    send_off: usize,
    conn: Option<Conn>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    pending: VecDeque<IoCommand>,
    failed: VecDeque<IoCommand>,
    /// Filled while `sending` is in flight; never beyond its capacity (no reallocation).
    tx: Vec<u8>,
    /// Commands with an R2T still to answer, in arrival order.
    r2t_wait: VecDeque<u16>,
    rx: Box<[u8]>,
    r0: usize,
    r1: usize,
    rx_state: Rx,
    lost_at: Option<Instant>,
    failing: bool,
    last_scan: Instant,
    in_flight: usize,
}

/// Copy `src` into `sg` at byte offset `off`.
///
/// # Safety
/// `sg`'s segments must be valid writable memory (the command's buffers).
unsafe fn sg_write(sg: &SgList, mut off: usize, mut src: &[u8]) {
    for seg in sg.segments() {
        if src.is_empty() {
            break;
        }
        if off >= seg.iov_len {
            off -= seg.iov_len;
            continue;
        }
        let n = (seg.iov_len - off).min(src.len());
        // SAFETY: within the segment (off + n <= iov_len), per the caller's contract.
        std::ptr::copy_nonoverlapping(src.as_ptr(), (seg.iov_base as *mut u8).add(off), n);
        src = &src[n..];
        off = 0;
    }
}

/// Append `len` bytes of `sg` from byte offset `off` to `out`.
///
/// # Safety
/// `sg`'s segments must be valid readable memory.
unsafe fn sg_append(sg: &SgList, mut off: usize, mut len: usize, out: &mut Vec<u8>) {
    for seg in sg.segments() {
        if len == 0 {
            break;
        }
        if off >= seg.iov_len {
            off -= seg.iov_len;
            continue;
        }
        let n = (seg.iov_len - off).min(len);
        // SAFETY: within the segment, per the caller's contract.
        out.extend_from_slice(std::slice::from_raw_parts(
            (seg.iov_base as *const u8).add(off),
            n,
        ));
        len -= n;
        off = 0;
    }
}

impl RemoteQueue {
    pub fn new(dev: Arc<Shared>, sh: Arc<QueueShared>) -> std::io::Result<RemoteQueue> {
        let ring = IoUring::new(8)?;
        let ring_efd = EventFd::new()?;
        ring.submitter().register_eventfd(ring_efd.as_raw_fd())?;
        let n = sh.entries as usize - 1;
        let now = Instant::now();
        Ok(RemoteQueue {
            slots: (0..n)
                .map(|_| Slot {
                    cmd: None,
                    bytes: 0,
                    recvd: 0,
                    started: now,
                    r2t: None,
                })
                .collect(),
            free: (0..n as u16).rev().collect(),
            pending: VecDeque::with_capacity(4 * n + 64),
            failed: VecDeque::with_capacity(4 * n + 64),
            r2t_wait: VecDeque::with_capacity(n),
            tx: Vec::with_capacity(TX_HIGH + (256 << 10)),
            sending: Vec::with_capacity(TX_HIGH + (256 << 10)),
            send_off: 0,
            ring,
            ring_efd,
            cqes: Vec::with_capacity(16),
            generation: 0,
            ops: 0,
            recv_busy: false,
            send_busy: false,
            unsubmitted: false,
            dead: None,
            rx: vec![0u8; RX_BUF].into_boxed_slice(),
            r0: 0,
            r1: 0,
            rx_state: Rx::Ch,
            lost_at: Some(now),
            failing: false,
            last_scan: now,
            in_flight: 0,
            conn: None,
            sh,
            dev,
        })
    }

    /// Take a connection the controller thread handed over (once the kernel is done
    /// with the previous one's buffers).
    fn adopt(&mut self) {
        if self.ops > 0 || !self.sh.ready.load(Ordering::Acquire) {
            return;
        }
        self.sh.ready.store(false, Ordering::Release);
        self.sh.evt.drain();
        let c = self
            .sh
            .handover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(c) = c else { return };
        if self.conn.is_some() {
            self.lose("replaced by a new association", false);
            if self.ops > 0 {
                // Put it back until the old connection's operations are done.
                *self.sh.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
                self.sh.ready.store(true, Ordering::Release);
                return;
            }
        }
        self.dead = None;
        self.generation += 1;
        self.sending.clear();
        self.send_off = 0;
        self.tx.clear();
        self.r0 = 0;
        self.r1 = 0;
        self.rx_state = Rx::Ch;
        self.conn = Some(c);
        self.lost_at = None;
        self.failing = false;
        self.last_scan = Instant::now();
    }

    /// The connection is gone: in-flight commands go back to the front of the pending
    /// list, to be resent on the next connection.
    fn lose(&mut self, why: &str, ask: bool) {
        if let Some(c) = self.conn.take() {
            tracing::warn!(
                qid = self.sh.qid,
                "NVMe/TCP I/O queue connection lost: {why}"
            );
            // Pending socket operations complete at once; the socket stays open until then.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.dead = Some(c.stream);
        }
        let mut n = 0;
        for i in (0..self.slots.len()).rev() {
            if let Some(cmd) = self.slots[i].cmd.take() {
                self.pending.push_front(cmd);
                self.free.push(i as u16);
                n += 1;
            }
        }
        self.in_flight = 0;
        self.dev.counters.retried.fetch_add(n, Ordering::Relaxed);
        self.tx.clear();
        self.r2t_wait.clear();
        for s in self.slots.iter_mut() {
            s.r2t = None;
        }
        self.rx_state = Rx::Ch;
        if self.lost_at.is_none() {
            self.lost_at = Some(Instant::now());
        }
        if ask {
            self.sh.want.store(true, Ordering::Release);
            self.dev.poke();
        }
    }

    /// Start pending commands in free slots (encode them into the send buffer).
    fn start(&mut self) {
        let Some(c) = &self.conn else { return };
        let (dg, inline_max, nsid, bs) = (c.dg, c.inline_max, c.nsid, c.block_size);
        // Room for the largest capsule (header, in-capsule data, digest).
        let need = 80 + inline_max.max(16) + 4;
        while self.tx.len() + (self.sending.len() - self.send_off) < TX_HIGH
            && self.tx.len() + need <= self.tx.capacity()
        {
            let Some(cid) = self.free.last().copied() else {
                break;
            };
            let Some(cmd) = self.pending.pop_front() else {
                break;
            };
            self.free.pop();
            let bytes = if cmd.opcode.has_data() {
                cmd.sg.len() as u32
            } else {
                0
            };
            let mut s = super::sync::sqe(cmd.opcode as u8, nsid);
            s[2..4].copy_from_slice(&cid.to_le_bytes());
            let nlb0 = cmd.nlb.saturating_sub(1);
            let mut range = [0u8; 16];
            let mut inline: &[u8] = &[];
            match cmd.opcode {
                Opcode::Read | Opcode::Write | Opcode::WriteZeroes => {
                    super::sync::set32(&mut s, 10, cmd.slba as u32);
                    super::sync::set32(&mut s, 11, (cmd.slba >> 32) as u32);
                    let fua = if cmd.fua && cmd.opcode != Opcode::Read {
                        1 << 30
                    } else {
                        0
                    };
                    super::sync::set32(&mut s, 12, (nlb0 & 0xffff) | fua);
                }
                Opcode::Deallocate => {
                    super::sync::set32(&mut s, 10, 0); // one range
                    super::sync::set32(&mut s, 11, 1 << 2); // AD
                    range[4..8].copy_from_slice(&cmd.nlb.to_le_bytes());
                    range[8..16].copy_from_slice(&cmd.slba.to_le_bytes());
                    inline = &range;
                }
                Opcode::Flush => {}
            }
            let _ = bs;
            let write_inline = cmd.opcode == Opcode::Write && (bytes as usize) <= inline_max;
            let inl = if write_inline {
                bytes as usize
            } else {
                inline.len()
            };
            let mut h = [0u8; 80];
            let n = wire::cmd_header(&mut h, &s, inl, bytes, dg);
            self.tx.extend_from_slice(&h[..n]);
            if inl > 0 {
                let start = self.tx.len();
                if write_inline {
                    // SAFETY: the command's buffers are valid until it completes.
                    unsafe { sg_append(&cmd.sg, 0, bytes as usize, &mut self.tx) };
                } else {
                    self.tx.extend_from_slice(inline);
                }
                if dg.data {
                    let crc = nvmux_core::crc32c::crc32c(&self.tx[start..]);
                    self.tx.extend_from_slice(&crc.to_le_bytes());
                }
            }
            let slot = &mut self.slots[cid as usize];
            slot.cmd = Some(cmd);
            slot.bytes = bytes;
            slot.recvd = 0;
            slot.r2t = None;
            slot.started = Instant::now();
            self.in_flight += 1;
        }
    }

    fn push(&mut self, e: io_uring::squeue::Entry) {
        // SAFETY: the entry points at memory that stays valid and unmoved until its
        // completion is reaped (the receive buffer, the `sending` buffer), see the callers.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            let _ = self.ring.submit();
        }
        self.ops += 1;
        self.unsubmitted = true;
    }

    /// Answer waiting R2Ts with H2CData PDUs while the send buffer has room.
    fn fill_h2c(&mut self, dg: Digests, cpda: usize) {
        let maxh2c = self.conn.as_ref().map_or(4096, |c| c.maxh2c) as u32;
        while let Some(&cid) = self.r2t_wait.front() {
            let slot = &mut self.slots[cid as usize];
            let (Some(cmd), Some((ttag, off, len, sent))) = (&slot.cmd, slot.r2t) else {
                self.r2t_wait.pop_front();
                continue;
            };
            let k = (len - sent).min(maxh2c).min(H2C_CHUNK);
            if self.tx.len() + 128 + k as usize + 4 > self.tx.capacity() {
                return;
            }
            let mut h = [0u8; 128];
            let last = sent + k == len;
            let pdo = wire::h2c_header(&mut h, cid, ttag, off + sent, k, last, dg, cpda);
            self.tx.extend_from_slice(&h[..pdo]);
            let start = self.tx.len();
            // SAFETY: off + len was checked to be within the command's SG list.
            unsafe { sg_append(&cmd.sg, (off + sent) as usize, k as usize, &mut self.tx) };
            if dg.data {
                let crc = nvmux_core::crc32c::crc32c(&self.tx[start..]);
                self.tx.extend_from_slice(&crc.to_le_bytes());
            }
            if last {
                slot.r2t = None;
                self.r2t_wait.pop_front();
            } else {
                slot.r2t = Some((ttag, off, len, sent + k));
            }
        }
    }

    /// Post the receive and the send the connection needs.
    fn arm(&mut self) {
        if let Some(c) = &self.conn {
            let (dg, cpda) = (c.dg, c.cpda);
            self.fill_h2c(dg, cpda);
        }
        let Some(c) = &self.conn else { return };
        let fd = types::Fd(c.stream.as_raw_fd());
        let g = self.generation << 2;
        if !self.recv_busy {
            // No receive in flight: the buffer may move.
            if self.r0 > 0 {
                self.rx.copy_within(self.r0..self.r1, 0);
                self.r1 -= self.r0;
                self.r0 = 0;
            }
            let room = self.rx.len() - self.r1;
            if room > 0 {
                // SAFETY: r1 < rx.len(): a pointer into the receive buffer, which is not
                // touched until this receive completes (recv_busy).
                let p = unsafe { self.rx.as_mut_ptr().add(self.r1) };
                let e = opcode::Recv::new(fd, p, room as u32)
                    .build()
                    .user_data(g | K_RECV);
                self.push(e);
                self.recv_busy = true;
            }
        }
        if !self.send_busy {
            if self.send_off == self.sending.len() {
                self.sending.clear();
                self.send_off = 0;
                std::mem::swap(&mut self.sending, &mut self.tx);
            }
            let left = self.sending.len() - self.send_off;
            if left > 0 {
                // SAFETY: `sending` is neither written nor dropped while the send is in
                // flight (send_busy); new data goes to `tx`.
                let p = unsafe { self.sending.as_ptr().add(self.send_off) };
                let e = opcode::Send::new(fd, p, left as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(g | K_SEND);
                self.push(e);
                self.send_busy = true;
            }
        }
    }

    fn submit_ring(&mut self) {
        if self.unsubmitted {
            self.unsubmitted = false;
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit: {e}");
            }
        }
    }

    /// Reap socket completions; received data is parsed at once.
    fn reap(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes.is_empty() {
                break;
            }
            for &(ud, res) in &cqes {
                self.ops = self.ops.saturating_sub(1);
                let current = ud >> 2 == self.generation && self.conn.is_some();
                match ud & 3 {
                    K_RECV => {
                        self.recv_busy = false;
                        if !current {
                            continue;
                        }
                        if res > 0 {
                            self.r1 += (res as usize).min(self.rx.len() - self.r1);
                            match self.process(done) {
                                Ok(k) => n += k,
                                Err(why) => self.lose(why, true),
                            }
                        } else if res == 0 {
                            self.lose("connection closed by the controller", true);
                        } else if res != -libc::EINTR && res != -libc::EAGAIN {
                            self.lose("receive failed", true);
                        }
                    }
                    K_SEND => {
                        self.send_busy = false;
                        if !current {
                            continue;
                        }
                        if res > 0 {
                            self.send_off = (self.send_off + res as usize).min(self.sending.len());
                        } else if res != -libc::EINTR && res != -libc::EAGAIN {
                            self.lose("send failed", true);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.cqes = cqes;
        if self.ops == 0 {
            self.dead = None;
        }
        n
    }

    fn complete(&mut self, cid: u16, st: Status, done: &mut dyn FnMut(IoCommand, Status)) -> bool {
        self.slots[cid as usize].r2t = None;
        let Some(cmd) = self.slots[cid as usize].cmd.take() else {
            return false;
        };
        self.free.push(cid);
        self.in_flight -= 1;
        if st.is_ok() {
            self.dev.first_completion();
        }
        done(cmd, st);
        true
    }

    /// Handle every whole PDU (and payload piece) in the receive buffer.
    fn process(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> Result<usize, &'static str> {
        let Some(c) = &self.conn else { return Ok(0) };
        let (dg, cpda, max_data) = (c.dg, c.cpda, c.max_data);
        let mut n = 0;
        loop {
            let avail = self.r1 - self.r0;
            match &mut self.rx_state {
                Rx::Data {
                    cid,
                    off,
                    left,
                    len,
                    ddgst,
                    success,
                    crc,
                } => {
                    if *left > 0 {
                        if avail == 0 {
                            return Ok(n);
                        }
                        let k = avail.min(*left as usize);
                        let src = &self.rx[self.r0..self.r0 + k];
                        let slot = &self.slots[*cid as usize];
                        if let Some(cmd) = &slot.cmd {
                            // SAFETY: off + len was checked against the command's length,
                            // which is its SG list's length.
                            unsafe { sg_write(&cmd.sg, (*off + (*len - *left)) as usize, src) };
                        }
                        if *ddgst {
                            crc.update(src);
                        }
                        *left -= k as u32;
                        self.r0 += k;
                        continue;
                    }
                    if *ddgst {
                        if avail < 4 {
                            return Ok(n);
                        }
                        let d = &self.rx[self.r0..self.r0 + 4];
                        let want = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                        if std::mem::take(crc).finish() != want {
                            return Err("C2HData digest mismatch");
                        }
                        self.r0 += 4;
                    }
                    let (cid, len, success) = (*cid, *len, *success);
                    self.rx_state = Rx::Ch;
                    let slot = &mut self.slots[cid as usize];
                    slot.recvd += len;
                    if success {
                        if slot.recvd != slot.bytes {
                            return Err("C2HData SUCCESS before all data");
                        }
                        if self.complete(cid, Status::SUCCESS, done) {
                            n += 1;
                        }
                    }
                }
                Rx::Ch => {
                    let Some(ch) = self.rx[self.r0..self.r1].first_chunk::<CH>() else {
                        return Ok(n);
                    };
                    let f: Frame = wire::frame(ch, dg, max_data)?;
                    if avail < f.head {
                        return Ok(n);
                    }
                    let p = wire::parse(&self.rx[self.r0..self.r0 + f.head], &f, dg)?;
                    self.r0 += f.head;
                    match p {
                        HostPdu::Rsp { cid, status, .. } => {
                            let slot = self
                                .slots
                                .get(cid as usize)
                                .ok_or("completion for an unknown command")?;
                            let Some(cmd) = &slot.cmd else {
                                return Err("completion for an idle command");
                            };
                            let mut st = Status::new((status >> 8) as u8 & 7, status as u8);
                            if st.is_ok() && cmd.opcode == Opcode::Read && slot.recvd != slot.bytes
                            {
                                st = Status::DATA_TRANSFER_ERROR;
                            }
                            if self.complete(cid, st, done) {
                                n += 1;
                            }
                        }
                        HostPdu::C2HData {
                            cid,
                            datao,
                            datal,
                            success,
                            ..
                        } => {
                            let slot = self
                                .slots
                                .get(cid as usize)
                                .ok_or("C2HData for an unknown command")?;
                            let Some(cmd) = &slot.cmd else {
                                return Err("C2HData for an idle command");
                            };
                            if cmd.opcode != Opcode::Read {
                                return Err("C2HData for a command without read data");
                            }
                            if datao != slot.recvd
                                || datao.checked_add(datal).is_none_or(|e| e > slot.bytes)
                            {
                                return Err("C2HData outside the command's data");
                            }
                            self.rx_state = Rx::Data {
                                cid,
                                off: datao,
                                left: datal,
                                len: datal,
                                ddgst: f.ddgst,
                                success,
                                crc: Crc32c::new(),
                            };
                        }
                        HostPdu::R2T {
                            cid,
                            ttag,
                            off,
                            len,
                        } => {
                            let slot = self
                                .slots
                                .get(cid as usize)
                                .ok_or("R2T for an unknown command")?;
                            let Some(cmd) = &slot.cmd else {
                                return Err("R2T for an idle command");
                            };
                            if cmd.opcode != Opcode::Write
                                || off.checked_add(len).is_none_or(|e| e > slot.bytes)
                            {
                                return Err("R2T outside the command's data");
                            }
                            let slot = &mut self.slots[cid as usize];
                            if slot.r2t.is_some() {
                                return Err(
                                    "a second R2T for a command before the first was answered",
                                );
                            }
                            slot.r2t = Some((ttag, off, len, 0));
                            self.r2t_wait.push_back(cid);
                            self.fill_h2c(dg, cpda);
                        }
                        HostPdu::Term { .. } => {
                            return Err("the controller terminated the connection")
                        }
                    }
                }
            }
        }
    }

    /// Fail every waiting command once the loss timeout has passed without a connection.
    fn expire(&mut self, now: Instant, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        if self.conn.is_none() {
            if let Some(t) = self.lost_at {
                if now >= t + self.dev.spec.loss_timeout {
                    self.failing = true;
                }
            }
        }
        if self.failing {
            while let Some(c) = self.pending.pop_front() {
                self.failed.push_back(c);
            }
        }
        let k = self.failed.len() as u64;
        if k > 0 {
            self.dev.counters.failed.fetch_add(k, Ordering::Relaxed);
        }
        while let Some(c) = self.failed.pop_front() {
            done(c, PATH_ERROR);
            n += 1;
        }
        n
    }
}

impl BlockQueue for RemoteQueue {
    fn submit(&mut self, cmd: IoCommand) {
        if self.failing && self.conn.is_none() {
            self.failed.push_back(cmd);
        } else {
            self.pending.push_back(cmd);
        }
    }

    fn kick(&mut self) {
        self.adopt();
        self.start();
        self.arm();
        self.submit_ring();
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        self.ring_efd.drain();
        let mut n = self.reap(done);
        self.adopt();
        let now = Instant::now();
        if self.conn.is_some() && self.in_flight > 0 && now >= self.last_scan + SCAN {
            self.last_scan = now;
            let t = self.dev.spec.io_timeout;
            if self
                .slots
                .iter()
                .any(|s| s.cmd.is_some() && now >= s.started + t)
            {
                self.lose("a command timed out", true);
            }
        }
        n += self.expire(now, done);
        self.start();
        self.arm();
        self.submit_ring();
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.pending.len() + self.failed.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ring_efd.as_raw_fd())
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.ring_efd.as_raw_fd());
        out.push(self.sh.evt.as_raw_fd());
    }

    fn next_deadline(&self) -> Option<Instant> {
        if !self.failed.is_empty() {
            return Some(Instant::now());
        }
        if self.conn.is_none() {
            if !self.failing && !self.pending.is_empty() {
                return self.lost_at.map(|t| t + self.dev.spec.loss_timeout);
            }
            return None;
        }
        if self.in_flight > 0 {
            return Some(self.last_scan + SCAN);
        }
        None
    }

    fn may_sleep(&self) -> bool {
        self.failed.is_empty()
    }
}

impl Drop for RemoteQueue {
    fn drop(&mut self) {
        self.sh.closed.store(true, Ordering::Release);
        self.dev.poke();
        if let Some(c) = self.conn.take() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
            self.dead = Some(c.stream);
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        let _ = self.ring.submit();
        while self.ops > 0 && Instant::now() < deadline {
            for _ in self.ring.completion() {
                self.ops = self.ops.saturating_sub(1);
            }
            if self.ops > 0 {
                let ts = types::Timespec::new().nsec(10_000_000);
                let args = types::SubmitArgs::new().timespec(&ts);
                let _ = self.ring.submitter().submit_with_args(1, &args);
            }
        }
        if self.ops > 0 {
            // The kernel still owns the buffers: leak them rather than let it write into
            // freed memory.
            tracing::error!(
                qid = self.sh.qid,
                "NVMe/TCP queue dropped with socket operations still in the kernel; buffers leaked"
            );
            std::mem::forget(std::mem::take(&mut self.rx));
            std::mem::forget(std::mem::take(&mut self.sending));
        }
    }
}
