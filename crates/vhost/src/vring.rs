//! A running virtqueue: a [`WorkSource`] that a worker thread polls.
//!
//! It is the virtio-blk codec on the shared frontend engine ([`nvmux_core::engine`]): it
//! pops descriptor chains, parses them into commands whose SG lists point straight into
//! guest memory (zero copy) and hands them to the engine (slots, validation against the
//! live capacity, stats, the block queue, stop → drain → retire); on completion it writes
//! the status byte, fills the used ring and signals the guest when the event index says
//! so. What stays here is virtio's own: the split ring, EVENT_IDX and the early reap,
//! inflight tracking, the dirty log, the call-fd hand-over and the guest-memory checks.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::engine::{DiskId, Engine, SlotId};
use nvmux_core::eventfd::EventFd;
use nvmux_core::stats::{DiskStats, OpClass};
use nvmux_core::worker::WorkSource;
use nvmux_core::{BlockDevice, KeepAlive, SgList, Status};
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

/// A request's virtio state in its engine slot (kept for the next request).
pub(crate) struct Req {
    head: u16,
    /// Host address of the status byte (in guest memory kept mapped by the slot's
    /// keepalive, or by the table the worker holds).
    status: *mut u8,
    used_len: u32,
    /// The guest ranges the request may write, marked in the dirty log at completion
    /// (the log may be switched on while it is in flight).
    writes: Vec<(u64, u64)>,
}

impl Default for Req {
    fn default() -> Req {
        Req {
            head: 0,
            status: std::ptr::null_mut(),
            used_len: 0,
            writes: Vec::with_capacity(4),
        }
    }
}

/// The engine of one virtqueue: one disk, one slot per ring entry.
pub(crate) type VringEngine = Engine<Req>;

/// Set up the engine for a queue of `size` entries on `dev` (opens its block queue).
pub(crate) fn engine(
    dev: Arc<dyn BlockDevice>,
    stats: &Arc<DiskStats>,
    size: u16,
) -> nvmux_core::Result<(VringEngine, DiskId)> {
    let mut eng = Engine::new(size as usize);
    let disk = eng.add_disk(dev, stats, 1, size as u32)?;
    Ok((eng, disk))
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
    kick: EventFd,
    /// Slots, validation, stats, the block queue, drain: the shared frontend engine.
    eng: VringEngine,
    disk: DiskId,
    /// The chain being parsed (then swapped into its slot: no list is allocated).
    scratch: SgList,
    segs: Vec<Seg>,
    serial: [u8; blk::ID_BYTES],
    ctl: Arc<QueueCtl>,
    final_tx: Option<SyncSender<u16>>,
    finished: bool,
    /// Entries were put on the used ring since the last publication.
    unpublished: bool,
    /// Inflight tracking (INFLIGHT_SHMFD), when the front-end set up a region.
    inflight: Option<Tracker>,
    /// Heads to resubmit before popping new ones (a restart found them in flight); the
    /// oldest is last.
    resubmit: Vec<u16>,
    /// Test-only completion delay (see [`Delay`]).
    delay: Option<Delay>,
    /// Dirty logging: the log to mark (None: off), the epoch it was loaded at, and the
    /// used ring's log address (each slot holds the ranges its request may write).
    log_slot: Arc<LogSlot>,
    log: Option<Arc<LogMap>>,
    log_epoch: u64,
    used_log: Option<u64>,
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
    ready: Vec<(SlotId, Status)>,
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
    fn hold(&mut self, slot: SlotId, st: Status, now: Instant) {
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
                    self.ready.push((i as SlotId, st));
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

// SAFETY: the raw status pointers in the engine's slots point into guest memory kept
// mapped by the slots' keepalive; the source is used by one worker thread at a time.
unsafe impl Send for VringSource {}

pub(crate) struct VringParams {
    pub queue: SplitQueue,
    pub ring_mem: Arc<Memory>,
    pub mem: Arc<MemSlot>,
    /// The kick eventfd, non-blocking (the worker drains it).
    pub kick: EventFd,
    /// The queue's engine and its disk (see [`engine`]).
    pub eng: (VringEngine, DiskId),
    pub serial: [u8; blk::ID_BYTES],
    pub ctl: Arc<QueueCtl>,
    pub final_tx: SyncSender<u16>,
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
            eng: p.eng.0,
            disk: p.eng.1,
            scratch: SgList::with_capacity(8),
            segs: Vec::with_capacity(64),
            serial: p.serial,
            ctl: p.ctl,
            final_tx: Some(p.final_tx),
            finished: false,
            unpublished: false,
        }
    }

    fn signal(&mut self) {
        let fd = self.ctl.call_fd.load(Ordering::Acquire);
        if fd >= 0 {
            // The connection keeps the descriptor open until we acknowledged its
            // replacement (set_vring_call).
            nvmux_core::eventfd::signal_fd(fd);
        }
    }

    /// Write the status byte, put the request on the used ring (published later) and give
    /// its slot back (its stats were recorded when it completed).
    fn finish(&mut self, slot: SlotId, status: Status) {
        let Some(s) = self.eng.get(slot) else { return };
        let r = &s.data;
        let byte = blk::virtio_status(status);
        if !status.is_ok() {
            tracing::debug!(head = r.head, ?status, "vhost-user-blk: request failed");
        }
        // SAFETY: `status` was checked to lie in guest memory when the request was parsed,
        // and the memory map it belongs to is still referenced (the slot's keepalive,
        // dropped only at `release` below, or the map the worker holds).
        unsafe { std::ptr::write_volatile(r.status, byte) };
        // Data (written by the block queue, or GET_ID's copy) and the status byte are in
        // guest memory now: mark them before the used entry is published.
        if let Some(log) = &self.log {
            log.mark_ranges(&r.writes);
        }
        let used = if status.is_ok() { r.used_len } else { 1 };
        let head = r.head;
        self.eng.release(slot);
        self.put_used(head, used);
    }

    /// Put a head on the used ring (and in the inflight region's batch); published by the
    /// next [`reap`](Self::reap).
    fn put_used(&mut self, head: u16, len: u32) {
        self.unpublished = true;
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
        self.unpublished = false;
        self.queue.publish();
        if let Some(t) = &mut self.inflight {
            t.published(self.queue.next_used());
        }
        self.log_used();
        if self.queue.needs_notification() {
            self.signal();
        }
    }

    /// Reap the block queue and complete every slot that is done (the engine's, and the
    /// ones completed without a block command), then publish the used ring once. Returns
    /// the number of block commands reaped.
    fn reap(&mut self) -> usize {
        let n = self.eng.reap();
        let mut finished = false;
        while let Some((slot, status)) = self.eng.next_completion() {
            match &mut self.delay {
                Some(d) => d.hold(slot, status, self.eng.now()),
                None => {
                    self.finish(slot, status);
                    finished = true;
                }
            }
        }
        if self.delay.as_ref().is_some_and(|d| d.held > 0) {
            let t = self.eng.now();
            if let Some(d) = &mut self.delay {
                d.take_ready(t);
            }
            let ready = self
                .delay
                .as_mut()
                .map(|d| std::mem::take(&mut d.ready))
                .unwrap_or_default();
            for &(slot, status) in &ready {
                self.finish(slot, status);
                finished = true;
            }
            if let Some(d) = &mut self.delay {
                d.ready = ready;
            }
        }
        if finished || self.unpublished {
            self.publish_and_notify();
        }
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

    /// Pop and start every available request. Returns how many.
    fn start_requests(&mut self, mem: &Arc<Memory>) -> usize {
        let mut n = 0;
        let mut submitted = 0usize;
        let view = MemView(&mem.map);
        while self.eng.has_free() && !self.broken && !self.failed {
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
                continue;
            }
            let Some(info) = self.eng.info(self.disk) else {
                break;
            };
            let req = match blk::parse(&self.segs, &view, info, &mut self.scratch) {
                Ok(r) => r,
                Err(blk::ParseError::NoStatus) => {
                    // Nowhere to put a status: hand the chain back with nothing written.
                    tracing::debug!(head, "virtio-blk: chain without a usable status byte");
                    self.put_used(head, 0);
                    continue;
                }
            };
            let Some(slot) = self.eng.alloc() else {
                break; // has_free said yes: not reached
            };
            {
                let r = &mut self.eng.slot_mut(slot).data;
                r.head = head;
                r.status = req.status;
                r.used_len = req.used_len;
                // What the device may write for this request, marked when it completes
                // (the log may be switched on while it is in flight).
                dirty::record_writes(
                    &self.segs,
                    req.used_len.saturating_sub(1) as u64,
                    &mut r.writes,
                );
            }
            let class = match req.kind {
                Kind::Io(op) => OpClass::of(op),
                _ => OpClass::Other,
            };
            let st = match (req.kind, req.error) {
                (Kind::Io(op), None) => {
                    match self
                        .eng
                        .prepare(slot, self.disk, op, req.lba, req.blocks, false)
                    {
                        Ok(()) => {
                            // The parsed list becomes the slot's; the slot's (empty) one is
                            // the next chain's scratch.
                            std::mem::swap(&mut self.scratch, self.eng.slot_mut(slot).sg_mut());
                            let ka: KeepAlive = mem.clone();
                            self.eng.set_keepalive(slot, ka);
                            match self.eng.submit(slot) {
                                Ok(()) => {
                                    submitted += 1;
                                    if submitted.is_multiple_of(EARLY_REAP) {
                                        // A synchronous backend (null, memory, tmpfs) has
                                        // finished these already: hand them back now, so
                                        // that a driver asleep waiting for them wakes
                                        // while the rest of the batch is parsed (with
                                        // EVENT_IDX the later publications of this batch
                                        // do not signal it again).
                                        self.reap();
                                    }
                                    continue;
                                }
                                Err(e) => e,
                            }
                        }
                        Err(e) => e,
                    }
                }
                (_, Some(e)) => e,
                (Kind::GetId, None) => {
                    // SAFETY: the SG list holds validated, writable guest ranges.
                    unsafe { self.scratch.copy_from(&self.serial) };
                    Status::SUCCESS
                }
                _ => Status::INVALID_OPCODE,
            };
            self.eng.complete_now(slot, self.disk, class, st);
        }
        if n > 0 {
            self.eng.kick();
        }
        n
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
        self.eng.round();
        let mut n = self.reap();
        if self.ctl.stop.load(Ordering::Acquire) {
            self.eng.stop();
            // Drained: nothing in the block queue, and every slot handed back (a held
            // completion of the test-only delay still owns its slot).
            if self.eng.drained() && self.eng.busy() == 0 {
                // The ring touches guest memory no more: the other export of a migration
                // pair may start its rings (counted before the connection thread hears).
                if self.final_tx.is_some() {
                    self.gate.ring_stopped(self.side);
                }
                if let Some(tx) = self.final_tx.take() {
                    let _ = tx.send(self.queue.next_avail());
                }
                self.eng.retire();
                self.finished = true;
            }
            return n.max(1);
        }
        // Data buffers are translated with the newest memory map (regions may be added).
        let mem = self.current_mem();
        if !self.check_memory() {
            n += self.start_requests(&mem);
            n += self.reap();
        }
        // A fault during this poll (the ring or a data buffer was truncated): stop here.
        self.check_memory();
        self.eng.publish();
        n
    }

    fn describe(&self) -> String {
        format!("vhost-user queue {} of {}", self.index, self.name)
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.kick.as_raw_fd()];
        self.eng.wait_fds(&mut v);
        v
    }

    fn prepare_sleep(&mut self) -> bool {
        // Commands complete but not yet handed back, with nothing to wake the worker.
        if !self.eng.may_sleep() {
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
        match (self.eng.next_deadline(), held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn take_fds_changed(&mut self) -> bool {
        self.eng.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.eng.busy_poll()
    }
}
