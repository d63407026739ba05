//! A running virtqueue: a [`WorkSource`] that a worker thread polls.
//!
//! It pops descriptor chains, parses them into [`IoCommand`]s whose SG lists point
//! straight into guest memory (zero copy), submits them to this worker's
//! [`BlockQueue`], and on completion writes the status byte, fills the used ring and
//! signals the guest when the event index says so.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::stats::{DiskStats, OpClass, QueueStats};
use nvmux_core::worker::WorkSource;
use nvmux_core::{
    BlockDevice, BlockQueue, DeviceInfo, IoCommand, KeepAlive, Opcode, SgList, Status,
};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::blk::{self, GuestMem, Kind, Seg};
use crate::inflight::Tracker;
use crate::log::{self as dirty, LogCounters, LogMap, LogSlot};
use crate::mem::{ExportCounters, MemSlot, Memory};
use crate::migration::RingGate;
use crate::split::SplitQueue;

/// `QueueCtl::used_log` when the used ring is not logged.
pub(crate) const NO_LOG: u64 = u64::MAX;

/// Translate guest addresses through a vm-memory map.
pub(crate) struct MemView<'a>(pub &'a GuestMemoryMmap);

impl GuestMem for MemView<'_> {
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let r = self.0.find_region(GuestAddress(gpa))?;
        let off = gpa - r.start_addr().0;
        if off.checked_add(len as u64)? > r.len() {
            return None;
        }
        r.get_host_address(MemoryRegionAddress(off)).ok()
    }
}

/// Control shared between the vhost-user connection thread and the worker.
pub(crate) struct QueueCtl {
    pub stop: AtomicBool,
    /// The call eventfd (-1: none). QEMU may replace it while the queue runs: the
    /// connection thread stores the new one, then bumps `call_epoch`; it closes a replaced
    /// file only after the worker copied that epoch to `call_ack` (see
    /// `BlkBackend::set_vring_call`), so a stale number is never a reused descriptor.
    pub call_fd: AtomicI32,
    pub call_epoch: AtomicU64,
    pub call_ack: AtomicU64,
    /// Dirty-log hand-over (see `log.rs`): the connection thread publishes the log in
    /// `LogSlot` and the used ring's log address here, then bumps `log_epoch`; the worker
    /// reloads both and copies the epoch to `log_ack` at the start of a poll.
    pub log_epoch: AtomicU64,
    pub log_ack: AtomicU64,
    pub used_log: AtomicU64,
}

/// Per-request bookkeeping, indexed by the command's tag.
#[derive(Clone, Copy)]
struct Slot {
    head: u16,
    status: *mut u8,
    used_len: u32,
    start: Instant,
    class: OpClass,
    /// Data bytes moved on success (reads and writes).
    bytes: u64,
}

pub(crate) struct VringSource {
    queue: SplitQueue,
    /// The memory table the ring pointers point into, kept mapped while the queue runs.
    ring_mem: Arc<Memory>,
    /// The driver corrupted the ring; the queue serves nothing until it is restarted.
    broken: bool,
    /// Guest memory shrank under us: the queue touches guest memory no more (in-flight
    /// commands still complete) until the front-end sends a new table and restarts it.
    failed: bool,
    mem: Arc<MemSlot>,
    /// The newest memory table, cached (refreshed when `mem`'s generation moves; released
    /// before the worker sleeps).
    cur_mem: Option<(u64, Arc<Memory>)>,
    /// The last call-fd epoch acknowledged.
    call_epoch: u64,
    counters: Arc<ExportCounters>,
    name: String,
    index: usize,
    kick: File,
    info: DeviceInfo,
    /// For the live capacity: a thin volume can grow while the queue runs.
    dev: Arc<dyn BlockDevice>,
    bq: Box<dyn BlockQueue>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    sg_pool: Vec<SgList>,
    segs: Vec<Seg>,
    done: Vec<(IoCommand, Status)>,
    serial: [u8; blk::ID_BYTES],
    ctl: Arc<QueueCtl>,
    final_tx: Option<SyncSender<u16>>,
    stats: Arc<QueueStats>,
    disk_stats: Arc<DiskStats>,
    in_flight: usize,
    finished: bool,
    /// Inflight tracking (INFLIGHT_SHMFD), when the front-end set up a region.
    inflight: Option<Tracker>,
    /// Heads to resubmit before popping new ones (a restart found them in flight); the
    /// oldest is last.
    resubmit: Vec<u16>,
    /// Test-only completion delay (see [`Delay`]).
    delay: Option<Delay>,
    /// Dirty logging: the log to mark (None: off), the epoch it was loaded at, the used
    /// ring's log address, and per slot the guest ranges its request may write.
    log_slot: Arc<LogSlot>,
    log: Option<Arc<LogMap>>,
    log_epoch: u64,
    used_log: Option<u64>,
    writes: Vec<Vec<(u64, u64)>>,
    log_counters: Arc<LogCounters>,
    /// The migration gate and this export's side: told when the ring stopped for good.
    gate: Arc<RingGate>,
    side: usize,
}

/// While popping a long batch, completions are reaped (and the used ring published) after
/// every this many submissions. See `start_requests`.
const EARLY_REAP: usize = 8;

/// Longest completion delay of the test-only fault `vhost-complete-delay` (ms).
pub(crate) const MAX_COMPLETE_DELAY_MS: u64 = 30;

/// Test-only fault `vhost-complete-delay:<socket file name>`: every completed request is
/// held for a pseudo-random 0..=[`MAX_COMPLETE_DELAY_MS`] ms before it goes on the used
/// ring, so requests stay in flight longer and complete out of order. One fixed entry per
/// slot: no allocation per request.
struct Delay {
    due: Vec<Option<(Instant, Status)>>,
    held: usize,
    rng: u64,
    ready: Vec<(u16, Status)>,
}

impl Delay {
    fn new(slots: usize, seed: u64) -> Delay {
        Delay {
            due: vec![None; slots],
            held: 0,
            rng: seed | 1,
            ready: Vec::with_capacity(slots),
        }
    }
    fn hold(&mut self, slot: u16, st: Status, now: Instant) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let ms = self.rng % (MAX_COMPLETE_DELAY_MS + 1);
        if let Some(e) = self.due.get_mut(slot as usize) {
            if e.is_none() {
                self.held += 1;
            }
            *e = Some((now + Duration::from_millis(ms), st));
        }
    }
    /// Move the entries due by `now` to `ready`.
    fn take_ready(&mut self, now: Instant) {
        self.ready.clear();
        if self.held == 0 {
            return;
        }
        for (i, e) in self.due.iter_mut().enumerate() {
            if let Some((t, st)) = *e {
                if t <= now {
                    self.ready.push((i as u16, st));
                    *e = None;
                    self.held -= 1;
                }
            }
        }
    }
    fn earliest(&self) -> Option<Instant> {
        if self.held == 0 {
            return None;
        }
        self.due.iter().flatten().map(|(t, _)| *t).min()
    }
}

// SAFETY: the raw status pointers in `slots` point into guest memory kept mapped by the
// commands' keepalive; the source is used by one worker thread at a time.
unsafe impl Send for VringSource {}

pub(crate) struct VringParams {
    pub queue: SplitQueue,
    pub ring_mem: Arc<Memory>,
    pub mem: Arc<MemSlot>,
    pub kick: File,
    pub info: DeviceInfo,
    pub dev: Arc<dyn BlockDevice>,
    pub bq: Box<dyn BlockQueue>,
    pub serial: [u8; blk::ID_BYTES],
    pub ctl: Arc<QueueCtl>,
    pub final_tx: SyncSender<u16>,
    pub disk_stats: Arc<DiskStats>,
    pub counters: Arc<ExportCounters>,
    pub name: String,
    pub index: usize,
    /// Inflight tracker and the heads to resubmit (oldest first).
    pub inflight: Option<(Tracker, Vec<u16>)>,
    /// The test-only fault `vhost-complete-delay` is armed for this export.
    pub complete_delay: bool,
    pub log: Arc<LogSlot>,
    pub log_counters: Arc<LogCounters>,
    pub gate: (Arc<RingGate>, usize),
}

impl VringSource {
    pub(crate) fn new(p: VringParams) -> Self {
        let n = p.queue.size() as usize;
        // Kick eventfd: the worker reads it to reset it, so it must not block.
        // SAFETY: fcntl on a descriptor we hold; flags are plain integers.
        unsafe {
            let fd = p.kick.as_raw_fd();
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let stats = p.disk_stats.new_queue();
        let empty = Slot {
            head: 0,
            status: std::ptr::null_mut(),
            used_len: 0,
            start: Instant::now(),
            class: OpClass::Other,
            bytes: 0,
        };
        let (inflight, mut resubmit) = match p.inflight {
            Some((t, r)) => (Some(t), r),
            None => (None, Vec::new()),
        };
        resubmit.reverse();
        let delay = p.complete_delay.then(|| {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                ^ ((p.index as u64) << 32);
            Delay::new(n, seed)
        });
        let used_log = p.ctl.used_log.load(Ordering::SeqCst);
        VringSource {
            inflight,
            resubmit,
            delay,
            log: p.log.load(),
            log_slot: p.log,
            log_epoch: 0,
            used_log: (used_log != NO_LOG).then_some(used_log),
            writes: (0..n).map(|_| Vec::with_capacity(4)).collect(),
            log_counters: p.log_counters,
            gate: p.gate.0,
            side: p.gate.1,
            queue: p.queue,
            ring_mem: p.ring_mem,
            broken: false,
            failed: false,
            mem: p.mem,
            cur_mem: None,
            call_epoch: 0,
            counters: p.counters,
            name: p.name,
            index: p.index,
            kick: p.kick,
            info: p.info,
            dev: p.dev,
            bq: p.bq,
            slots: vec![empty; n],
            free: (0..n as u16).rev().collect(),
            sg_pool: (0..n).map(|_| SgList::with_capacity(8)).collect(),
            segs: Vec::with_capacity(64),
            done: Vec::with_capacity(n),
            serial: p.serial,
            ctl: p.ctl,
            final_tx: Some(p.final_tx),
            stats,
            disk_stats: p.disk_stats,
            in_flight: 0,
            finished: false,
        }
    }

    fn signal(&mut self) {
        let fd = self.ctl.call_fd.load(Ordering::Acquire);
        if fd >= 0 {
            let one = 1u64;
            // SAFETY: writing 8 bytes from a u64 to an eventfd the connection keeps open.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }

    /// Write the status byte and put the request on the used ring (published later).
    fn finish(&mut self, slot: u16, status: Status, now: Instant) {
        let s = self.slots[slot as usize];
        let byte = blk::virtio_status(status);
        // SAFETY: `status` was checked to lie in guest memory when the request was parsed,
        // and the memory map it belongs to is still referenced (the command's keepalive or
        // the map the caller holds).
        unsafe { std::ptr::write_volatile(s.status, byte) };
        // Data (written by the block queue, or GET_ID's copy) and the status byte are in
        // guest memory now: mark them before the used entry is published.
        if let Some(log) = &self.log {
            log.mark_ranges(&self.writes[slot as usize]);
        }
        let used = if status.is_ok() { s.used_len } else { 1 };
        self.free.push(slot);
        self.in_flight -= 1;
        let bytes = if status.is_ok() { s.bytes } else { 0 };
        let lat = now.saturating_duration_since(s.start);
        self.stats.record(s.class, bytes, lat, status.is_ok());
        self.put_used(s.head, used);
    }

    /// Put a head on the used ring (and in the inflight region's batch).
    fn put_used(&mut self, head: u16, len: u32) {
        if self.inflight.as_ref().is_some_and(Tracker::batch_full) {
            self.publish_and_notify();
        }
        if let Some(t) = &mut self.inflight {
            t.used(head);
        }
        self.queue.add_used(head, len);
    }

    /// Mark the used ring (entries, index, flags, avail_event) after the device wrote it.
    fn log_used(&self) {
        if let (Some(log), Some(gpa)) = (&self.log, self.used_log) {
            log.mark_used_ring(gpa, self.queue.size());
        }
    }

    /// Take a new dirty-log state the connection thread published (one atomic load when
    /// nothing changed), and report a log whose file shrank under us.
    fn refresh_log(&mut self) {
        let e = self.ctl.log_epoch.load(Ordering::SeqCst);
        if e != self.log_epoch {
            self.log = self.log_slot.load();
            let u = self.ctl.used_log.load(Ordering::SeqCst);
            self.used_log = (u != NO_LOG).then_some(u);
            self.log_epoch = e;
            self.ctl.log_ack.store(e, Ordering::SeqCst);
        }
        if let Some(log) = &self.log {
            if log.take_report() {
                self.log_counters.log_faults.fetch_add(1, Ordering::Relaxed);
                tracing::error!(export = %self.name, queue = self.index, "the dirty log's file shrank under the device (the front-end truncated it): pages written since are not marked, so this migration cannot be trusted");
            }
        }
    }

    fn publish_and_notify(&mut self) {
        self.queue.publish();
        if let Some(t) = &mut self.inflight {
            t.published(self.queue.next_used());
        }
        self.log_used();
        if self.queue.needs_notification() {
            self.signal();
        }
    }

    fn recycle(&mut self, mut sg: SgList) {
        sg.clear();
        self.sg_pool.push(sg);
    }

    /// Complete what the block queue finished.
    fn reap(&mut self) -> usize {
        self.reap_at(None)
    }

    /// [`reap`](Self::reap) with the batch's timestamp when the caller has one (one clock
    /// read per batch).
    fn reap_at(&mut self, mut now: Option<Instant>) -> usize {
        let mut done = std::mem::take(&mut self.done);
        let n = self.bq.poll(&mut |c, s| done.push((c, s)));
        let mut finished = false;
        if !done.is_empty() {
            // One timestamp for the batch.
            let t = *now.get_or_insert_with(Instant::now);
            for (cmd, status) in done.drain(..) {
                // Move the SG list back into the pool (it keeps its capacity: no allocation).
                let IoCommand { tag, sg, .. } = cmd;
                self.recycle(sg);
                match &mut self.delay {
                    Some(d) => d.hold(tag as u16, status, t),
                    None => {
                        self.finish(tag as u16, status, t);
                        finished = true;
                    }
                }
            }
        }
        if let Some(d) = &mut self.delay {
            if d.held > 0 {
                let t = *now.get_or_insert_with(Instant::now);
                d.take_ready(t);
                let ready = std::mem::take(&mut d.ready);
                for &(slot, status) in &ready {
                    self.finish(slot, status, t);
                    finished = true;
                }
                if let Some(d) = &mut self.delay {
                    d.ready = ready;
                }
            }
        }
        if finished {
            self.publish_and_notify();
        }
        self.done = done;
        n
    }

    /// The newest memory table (cached; one atomic load when it did not change).
    fn current_mem(&mut self) -> Arc<Memory> {
        let gen = self.mem.generation();
        match &self.cur_mem {
            Some((g, m)) if *g == gen => m.clone(),
            _ => {
                let m = self.mem.load();
                self.cur_mem = Some((gen, m.clone()));
                m
            }
        }
    }

    /// Did guest memory go away under us (the SIGBUS recovery raised a table's flag)?
    /// Then fail the device: log and count once per table, stop touching guest memory.
    fn check_memory(&mut self) -> bool {
        if self.failed {
            return true;
        }
        // The common case, two atomic loads: nothing faulted (no Arc clone, no Vec).
        if !self.ring_mem.faulted() && !self.cur_mem.as_ref().is_some_and(|(_, m)| m.faulted()) {
            return false;
        }
        let cur = self.cur_mem.as_ref().map(|(_, m)| m.clone());
        let faulted: Vec<&Arc<Memory>> = [Some(&self.ring_mem), cur.as_ref()]
            .into_iter()
            .flatten()
            .filter(|m| m.faulted())
            .collect();
        if faulted.is_empty() {
            return false;
        }
        self.failed = true;
        self.counters.device_failed.store(true, Ordering::Relaxed);
        let mut first = false;
        for m in faulted {
            first |= m.take_report();
        }
        if first {
            self.counters.memory_faults.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                export = %self.name,
                queue = self.index,
                "guest memory shrank under the device (the front-end truncated or punched its memory file); the device is failed until the front-end sends a new memory table"
            );
        }
        true
    }

    /// Pop and start every available request. Returns how many, and the batch's timestamp
    /// if the clock was read.
    fn start_requests(&mut self, mem: &Arc<Memory>) -> (usize, Option<Instant>) {
        let mut n = 0;
        let mut submitted = 0usize;
        let mut completed_now = false;
        // One timestamp for the whole batch: requests popped together arrived together.
        let mut now: Option<Instant> = None;
        let view = MemView(&mem.map);
        while !self.free.is_empty() && !self.broken && !self.failed {
            // Requests found in flight at start go first (their chains are still intact
            // in guest memory, and they are still marked in the inflight region).
            let popped = match self.resubmit.pop() {
                Some(h) => Ok(Some((h, self.queue.rewalk(&view, h, &mut self.segs)))),
                None => self.queue.pop(&view, &mut self.segs).inspect(|p| {
                    if let (Some((h, _)), Some(t)) = (p, &mut self.inflight) {
                        t.popped(*h);
                    }
                }),
            };
            let (head, chain) = match popped {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => {
                    tracing::error!("virtqueue: the driver published more entries than the ring holds; queue stopped");
                    self.broken = true;
                    break;
                }
            };
            n += 1;
            if let Err(e) = chain {
                // Malformed chain: hand it back with nothing written.
                tracing::debug!(head, ?e, "virtio-blk: malformed descriptor chain");
                self.put_used(head, 0);
                completed_now = true;
                continue;
            }
            let Some(slot) = self.free.pop() else { break };
            let mut sg = self.sg_pool.pop().unwrap_or_default(); // the pool holds one per slot
            let req = match blk::parse(&self.segs, &view, &self.info, &mut sg) {
                Ok(r) => r,
                Err(blk::ParseError::NoStatus) => {
                    // Nowhere to put a status: hand the chain back with nothing written.
                    tracing::debug!(head, "virtio-blk: chain without a usable status byte");
                    self.recycle(sg);
                    self.free.push(slot);
                    self.put_used(head, 0);
                    completed_now = true;
                    continue;
                }
            };
            self.in_flight += 1;
            // What the device may write for this request, marked when it completes (the
            // log may be switched on while it is in flight).
            dirty::record_writes(
                &self.segs,
                req.used_len.saturating_sub(1) as u64,
                &mut self.writes[slot as usize],
            );
            let class = match req.kind {
                Kind::Io(Opcode::Read) => OpClass::Read,
                Kind::Io(Opcode::Write) => OpClass::Write,
                _ => OpClass::Other,
            };
            self.slots[slot as usize] = Slot {
                head,
                status: req.status,
                used_len: req.used_len,
                start: *now.get_or_insert_with(Instant::now),
                class,
                bytes: if class == OpClass::Other {
                    0
                } else {
                    req.blocks as u64 * self.info.block_size as u64
                },
            };
            // Every arm either hands `sg` to the block queue inside a command or returns it
            // to the pool, so no request allocates.
            let immediate = match (req.kind, req.error) {
                (Kind::Io(op), None) => {
                    let mut cmd = IoCommand::new(op, req.lba, req.blocks, slot as u64, sg);
                    let mut valid = cmd.validate(&self.info);
                    if valid == Err(Status::LBA_OUT_OF_RANGE) {
                        // The disk may have grown since the queue started (a shrink is
                        // enforced by the device itself).
                        self.info.num_blocks =
                            self.dev.capacity_bytes() / self.info.block_size as u64;
                        valid = cmd.validate(&self.info);
                    }
                    match valid {
                        Ok(()) => {
                            let ka: KeepAlive = mem.clone();
                            cmd.keepalive = Some(ka);
                            self.bq.submit(cmd);
                            submitted += 1;
                            if submitted.is_multiple_of(EARLY_REAP) {
                                // A synchronous backend (null, memory, tmpfs) has finished
                                // these already: hand them back now, so that a driver
                                // asleep waiting for them wakes while the rest of the
                                // batch is parsed (with EVENT_IDX the later publications
                                // of this batch do not signal it again).
                                self.reap_at(now);
                            }
                            None
                        }
                        Err(e) => {
                            self.recycle(cmd.sg);
                            Some(e)
                        }
                    }
                }
                (kind, err) => {
                    let st = match (kind, err) {
                        (_, Some(e)) => e,
                        (Kind::GetId, None) => {
                            // SAFETY: the SG list holds validated, writable guest ranges.
                            unsafe { sg.copy_from(&self.serial) };
                            Status::SUCCESS
                        }
                        _ => Status::INVALID_OPCODE,
                    };
                    self.recycle(sg);
                    Some(st)
                }
            };
            if let Some(st) = immediate {
                let t = *now.get_or_insert_with(Instant::now);
                self.finish(slot, st, t);
                completed_now = true;
            }
        }
        if n > 0 {
            self.bq.kick();
        }
        if completed_now {
            self.publish_and_notify();
        }
        (n, now)
    }
}

impl Drop for VringSource {
    fn drop(&mut self) {
        // Dropped without its final drain (the worker gave it up after a panic): it runs
        // no more either.
        if self.final_tx.is_some() {
            self.gate.ring_stopped(self.side);
        }
    }
}

impl WorkSource for VringSource {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        // Acknowledge call-fd replacements before loading the descriptor (set_vring_call).
        let epoch = self.ctl.call_epoch.load(Ordering::SeqCst);
        if epoch != self.call_epoch {
            self.call_epoch = epoch;
            self.ctl.call_ack.store(epoch, Ordering::SeqCst);
        }
        self.refresh_log();
        let mut n = self.reap();
        if self.ctl.stop.load(Ordering::Acquire) {
            if self.in_flight == 0 && self.bq.in_flight() == 0 {
                // The ring touches guest memory no more: the other export of a migration
                // pair may start its rings (counted before the connection thread hears).
                if self.final_tx.is_some() {
                    self.gate.ring_stopped(self.side);
                }
                if let Some(tx) = self.final_tx.take() {
                    let _ = tx.send(self.queue.next_avail());
                }
                self.disk_stats.retire(&self.stats);
                self.finished = true;
            }
            return n.max(1);
        }
        // Data buffers are translated with the newest memory map (regions may be added).
        let mem = self.current_mem();
        if !self.check_memory() {
            let (started, now) = self.start_requests(&mem);
            n += started + self.reap_at(now);
        }
        // A fault during this poll (the ring or a data buffer was truncated): stop here.
        self.check_memory();
        self.stats.set_in_flight(self.in_flight as u64);
        n
    }

    fn describe(&self) -> String {
        format!("vhost-user queue {} of {}", self.index, self.name)
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.kick.as_raw_fd()];
        self.bq.wait_fds(&mut v);
        v
    }

    fn prepare_sleep(&mut self) -> bool {
        // Commands complete but not yet handed back, with nothing to wake the worker.
        if !self.bq.may_sleep() {
            return false;
        }
        if self.broken || self.failed {
            // Nothing to do until the queue is stopped; drop the cached table.
            self.cur_mem = None;
            return true;
        }
        // Re-enabling reports whether chains arrived while notifications were off.
        let sleep = !self.queue.enable_notification();
        self.log_used();
        if sleep {
            self.cur_mem = None;
        }
        sleep
    }

    fn after_sleep(&mut self) {
        if !self.broken && !self.failed {
            self.queue.disable_notification();
            self.log_used();
        }
    }

    fn finished(&self) -> bool {
        self.finished
    }
    fn next_deadline(&self) -> Option<std::time::Instant> {
        let held = self.delay.as_ref().and_then(Delay::earliest);
        match (self.bq.next_deadline(), held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn take_fds_changed(&mut self) -> bool {
        self.bq.take_fds_changed()
    }
}
