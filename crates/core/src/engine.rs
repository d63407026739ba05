//! The frontend engine: the machinery every protocol frontend (vhost-user-blk, NVMe/TCP,
//! NBD, and vfio-user next) shares, so that a frontend is a protocol codec on top of it.
//!
//! ```text
//!   wire ─► codec (vhost / nvmf / nbd)                         Engine<P>
//!           parse a request ─────────► alloc() ──────────────► slot table + free list
//!                                      prepare(slot, disk, op, slba, nlb, fua)
//!                                        └─ validation against live capacity (once)
//!           fill the slot's SgList ──► sg_mut(slot) / parts(slot)  (reused, never allocated)
//!                                      submit(slot) / submit_ranges(slot, ..)
//!                                        └─► BlockQueue::submit ... kick()
//!                                      reap() ◄── BlockQueue::poll
//!                                        └─ stats: one clock read per round, OpClass::of
//!           write the reply ◄───────── next_completion() → (slot, Status)
//!           release(slot) once the reply no longer needs the slot's buffer
//! ```
//!
//! **What the engine owns.**
//! * The slot table: at most `capacity` slots (fixed when the queue is set up), created
//!   on first use and kept for reuse, with a free list. Each slot carries a reusable
//!   [`SgList`] and the codec's own request state `P` (a cookie, a command id, a buffer):
//!   a command in steady state allocates nothing.
//! * The disks a queue serves (one for vhost and NBD, one per namespace for NVMe/TCP),
//!   each with its [`BlockQueue`], its [`DeviceInfo`] and its [`QueueStats`].
//! * Validation: [`Engine::prepare`] checks a command with
//!   [`IoCommand::validate_range`] against the disk's size, and re-reads the live size
//!   ([`BlockDevice::capacity_bytes`], a thin volume may have grown) only when the command
//!   is out of range. [`Engine::submit`] checks the data length. No frontend repeats this.
//! * Batch-clocked stats: [`Engine::now`] reads the clock at most once per poll round
//!   (a round starts with [`Engine::round`]); a slot's start time and its completion time
//!   are that round's clock. The opcode → [`OpClass`] mapping is [`OpClass::of`].
//!   [`QueueStats::record`] runs when the slot's last block command completes.
//! * Stop → drain → retire: [`Engine::stop`] marks the queue stopping (the codec takes
//!   no new request); [`Engine::drained`] says nothing is in a block queue any more;
//!   [`Engine::retire`] (or dropping the engine) folds the counters into the disk's totals.
//!   [`Engine::retire_disk`] does the same for one disk (a namespace that left), once its
//!   commands are done.
//! * The sleep/wake half of a [`crate::worker::WorkSource`]: [`Engine::wait_fds`],
//!   [`Engine::take_fds_changed`], [`Engine::may_sleep`], [`Engine::next_deadline`].
//!
//! **What a codec does.** It parses its wire protocol, keeps its protocol state (the
//! connection's buffers, the negotiation, its memory budget, its timers), maps a
//! [`Status`] to its wire's error, and writes replies. It never touches a block queue.
//!
//! **Slot life.** `alloc` → (`prepare` → [`set_keepalive`](Engine::set_keepalive)? →
//! `submit`)* → completion via `next_completion` → `release`. A request that needs no
//! block command (it failed to parse or to validate, or the codec answers it itself) goes
//! `alloc` → [`complete_now`](Engine::complete_now) → `next_completion` → `release`: it is
//! counted in the stats like any other. A keepalive (a guest memory mapping) travels with
//! the slot's block commands and is dropped at `release`, after the reply was written. A slot is not in the free list between its completion and `release`, so
//! a reply can still be sent from the slot's buffer. `submit_ranges` fans one slot out
//! into several data-less block commands (NVMe Dataset Management); the slot completes
//! when the last of them does, with the first error any of them met.
//!
//! The API above is stable: later changes are additions.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::stats::{DiskStats, OpClass, QueueStats};
use crate::worker::{WorkerHandle, WorkerPool};
use crate::{BlockDevice, BlockQueue, DeviceInfo, IoCommand, KeepAlive, Opcode, SgList, Status};

/// A slot's index in the engine's table (also the block command's tag).
pub type SlotId = u32;
/// A disk's index in the engine (stable while the disk is attached).
pub type DiskId = u16;

impl OpClass {
    /// The stats class of an opcode: the one place this mapping lives.
    #[inline]
    pub fn of(op: Opcode) -> OpClass {
        match op {
            Opcode::Read => OpClass::Read,
            Opcode::Write => OpClass::Write,
            Opcode::Flush | Opcode::WriteZeroes | Opcode::Deallocate => OpClass::Other,
        }
    }
}

/// One slot: the codec's request state plus what the engine tracks for it.
pub struct Slot<P> {
    /// The codec's own request state, kept (with whatever buffers it holds) for reuse.
    pub data: P,
    sg: SgList,
    used: bool,
    /// Block commands of this slot in a block queue.
    pending: u32,
    status: Status,
    start: Instant,
    class: OpClass,
    /// Data bytes the slot moves (reads and writes), counted on success.
    bytes: u64,
    disk: DiskId,
    op: Opcode,
    slba: u64,
    nlb: u32,
    fua: bool,
    /// What keeps the slot's buffers valid while its commands run (guest memory, a ring
    /// generation): travels with the block command and comes home with it; dropped at
    /// `release`, after the codec wrote its reply.
    keepalive: Option<KeepAlive>,
}

impl<P> Slot<P> {
    /// The slot's SG list, to fill before [`Engine::submit`] (cleared by `prepare`).
    pub fn sg_mut(&mut self) -> &mut SgList {
        &mut self.sg
    }
    /// The codec's state and the SG list at once (to point the list into a buffer the
    /// state holds).
    pub fn parts(&mut self) -> (&mut P, &mut SgList) {
        (&mut self.data, &mut self.sg)
    }
    /// When the slot was allocated (the round's clock then).
    pub fn start(&self) -> Instant {
        self.start
    }
    /// The disk the slot's command was prepared for.
    pub fn disk(&self) -> DiskId {
        self.disk
    }
    /// Block commands of this slot still in a block queue.
    pub fn pending(&self) -> u32 {
        self.pending
    }
    /// True between `alloc` and `release`.
    pub fn in_use(&self) -> bool {
        self.used
    }
}

struct Disk {
    dev: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    nsid: u32,
    bq: Box<dyn BlockQueue>,
    stats: Arc<QueueStats>,
    owner: Arc<DiskStats>,
    /// Block commands sent to `bq` and not reaped yet (what `publish` reports, without a
    /// call down the device chain every round).
    sent: usize,
    /// No new commands; dropped once its block queue is empty.
    retired: bool,
    /// The counters were folded into `owner`.
    folded: bool,
}

impl Disk {
    fn fold(&mut self) {
        if !self.folded {
            self.folded = true;
            self.stats.set_in_flight(0);
            self.owner.retire(&self.stats);
        }
    }
}

/// The shared frontend engine of one queue (a virtqueue, an NVMe/TCP queue pair, an NBD
/// connection). Driven by one worker thread; takes no lock.
pub struct Engine<P> {
    slots: Vec<Slot<P>>,
    free: Vec<SlotId>,
    capacity: usize,
    disks: Vec<Option<Disk>>,
    /// Disks dropped from `disks`, kept until the worker has re-read our descriptors.
    graveyard: Vec<Disk>,
    fds_changed: bool,
    done: Vec<(IoCommand, Status)>,
    ready: Vec<(SlotId, Status)>,
    ready_at: usize,
    now: Option<Instant>,
    in_flight: usize,
    busy: usize,
    stopping: bool,
    retired: bool,
}

impl<P: Default> Engine<P> {
    /// An engine with room for `capacity` slots (0 until the queue is set up: see
    /// [`Engine::set_capacity`]).
    pub fn new(capacity: usize) -> Self {
        let mut e = Engine {
            slots: Vec::new(),
            free: Vec::new(),
            capacity: 0,
            disks: Vec::new(),
            graveyard: Vec::new(),
            fds_changed: false,
            done: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
            now: None,
            in_flight: 0,
            busy: 0,
            stopping: false,
            retired: false,
        };
        e.set_capacity(capacity);
        e
    }

    /// Fix the slot table's size at queue setup (a protocol that learns its queue depth
    /// in its handshake sets it then). It only grows; the bookkeeping vectors are
    /// reserved here, so later commands allocate nothing.
    pub fn set_capacity(&mut self, capacity: usize) {
        if capacity <= self.capacity {
            return;
        }
        self.capacity = capacity;
        self.slots.reserve_exact(capacity - self.slots.len());
        self.free
            .reserve_exact(capacity.saturating_sub(self.free.capacity()));
        self.ready
            .reserve_exact(capacity.saturating_sub(self.ready.capacity()));
        self.done
            .reserve_exact(capacity.saturating_sub(self.done.capacity()));
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    // ---- disks --------------------------------------------------------------------------

    /// Open a queue of `depth` on `dev` for this engine; its counters go to `stats`.
    /// `nsid` is what the block commands carry (1 for single-disk protocols).
    pub fn add_disk(
        &mut self,
        dev: Arc<dyn BlockDevice>,
        stats: &Arc<DiskStats>,
        nsid: u32,
        depth: u32,
    ) -> crate::Result<DiskId> {
        let bq = dev.open_queue(depth)?;
        let info = dev.info().clone();
        let disk = Disk {
            dev,
            info,
            nsid,
            bq,
            stats: stats.new_queue(),
            owner: stats.clone(),
            sent: 0,
            retired: false,
            folded: false,
        };
        self.fds_changed = true;
        if let Some(i) = self.disks.iter().position(|d| d.is_none()) {
            self.disks[i] = Some(disk);
            return Ok(i as DiskId);
        }
        if self.disks.len() > DiskId::MAX as usize {
            return Err(crate::Error::new(
                crate::ErrorKind::Busy,
                "frontend engine: too many disks on one queue",
            ));
        }
        self.disks.push(Some(disk));
        Ok((self.disks.len() - 1) as DiskId)
    }

    fn disk(&self, d: DiskId) -> Option<&Disk> {
        self.disks.get(d as usize).and_then(|x| x.as_ref())
    }

    fn disk_mut(&mut self, d: DiskId) -> Option<&mut Disk> {
        self.disks.get_mut(d as usize).and_then(|x| x.as_mut())
    }

    /// The live disk serving namespace `nsid`, if one is attached and not retired.
    pub fn disk_for(&self, nsid: u32) -> Option<DiskId> {
        self.disks
            .iter()
            .position(|d| d.as_ref().is_some_and(|d| d.nsid == nsid && !d.retired))
            .map(|i| i as DiskId)
    }

    /// What disk `d` is (its size as last seen: a thin volume may have grown since).
    pub fn info(&self, d: DiskId) -> Option<&DeviceInfo> {
        self.disk(d).map(|d| &d.info)
    }

    /// The device behind disk `d`.
    pub fn device(&self, d: DiskId) -> Option<&Arc<dyn BlockDevice>> {
        self.disk(d).map(|d| &d.dev)
    }

    /// Every attached disk, retired or not.
    pub fn disks(&self) -> impl Iterator<Item = DiskId> + '_ {
        self.disks
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_some())
            .map(|(i, _)| i as DiskId)
    }

    /// Disk `d` takes no new commands; it is dropped (and its counters retired) once the
    /// commands in its block queue have completed.
    pub fn retire_disk(&mut self, d: DiskId) {
        if let Some(x) = self.disk_mut(d) {
            x.retired = true;
        }
        self.collect_disks();
    }

    fn collect_disks(&mut self) {
        for slot in self.disks.iter_mut() {
            if slot
                .as_ref()
                .is_some_and(|d| d.retired && d.bq.in_flight() == 0)
            {
                if let Some(mut d) = slot.take() {
                    d.fold();
                    self.graveyard.push(d);
                    self.fds_changed = true;
                }
            }
        }
    }

    // ---- rounds and the clock -------------------------------------------------------------

    /// A poll round starts: the clock will be read again (once) when needed, and disks
    /// dropped earlier are released once the worker has re-read the descriptors.
    pub fn round(&mut self) {
        self.now = None;
        if !self.fds_changed {
            self.graveyard.clear();
        }
    }

    /// This round's clock, read at most once per round.
    pub fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }

    /// This round's clock if it has been read.
    pub fn clock(&self) -> Option<Instant> {
        self.now
    }

    // ---- slots ----------------------------------------------------------------------------

    /// A free slot, or `None` when all `capacity` are in use (or the queue is stopping).
    pub fn alloc(&mut self) -> Option<SlotId> {
        if self.stopping {
            return None;
        }
        let now = self.now();
        let i = match self.free.pop() {
            Some(i) => i,
            None if self.slots.len() < self.capacity => {
                self.slots.push(Slot {
                    data: P::default(),
                    sg: SgList::with_capacity(4),
                    used: false,
                    pending: 0,
                    status: Status::SUCCESS,
                    start: now,
                    class: OpClass::Other,
                    bytes: 0,
                    disk: 0,
                    op: Opcode::Flush,
                    slba: 0,
                    nlb: 0,
                    fua: false,
                    keepalive: None,
                });
                (self.slots.len() - 1) as SlotId
            }
            None => return None,
        };
        let s = &mut self.slots[i as usize];
        s.used = true;
        s.pending = 0;
        s.status = Status::SUCCESS;
        s.start = now;
        s.class = OpClass::Other;
        s.bytes = 0;
        self.busy += 1;
        Some(i)
    }

    /// Like `alloc`, but prefers a free slot whose state `fits` (one whose buffer is
    /// large enough, say), scanning the free list from its most recent end.
    pub fn alloc_where(&mut self, fits: impl Fn(&P) -> bool) -> Option<SlotId> {
        if self.stopping {
            return None;
        }
        if let Some(p) = self
            .free
            .iter()
            .rposition(|&i| fits(&self.slots[i as usize].data))
        {
            let last = self.free.len() - 1;
            self.free.swap(p, last);
        }
        self.alloc()
    }

    /// Give slot `i` back. Its state `P` is kept for the next command.
    pub fn release(&mut self, i: SlotId) {
        if let Some(s) = self.slots.get_mut(i as usize) {
            if s.used && s.pending == 0 {
                s.used = false;
                s.keepalive = None;
                self.busy -= 1;
                self.free.push(i);
            }
        }
    }

    /// Slot `i` (as handed out by `alloc`).
    ///
    /// # Panics
    /// If `i` is not a slot of this engine; use [`Engine::get`] for an index that comes
    /// from the wire.
    pub fn slot(&self, i: SlotId) -> &Slot<P> {
        &self.slots[i as usize]
    }

    /// Slot `i`, mutably (see [`Engine::slot`]).
    pub fn slot_mut(&mut self, i: SlotId) -> &mut Slot<P> {
        &mut self.slots[i as usize]
    }

    /// Slot `i` if it exists (for indices from the wire).
    pub fn get(&self, i: SlotId) -> Option<&Slot<P>> {
        self.slots.get(i as usize)
    }

    pub fn get_mut(&mut self, i: SlotId) -> Option<&mut Slot<P>> {
        self.slots.get_mut(i as usize)
    }

    /// Every slot created so far (free or not), with its id.
    pub fn iter(&self) -> impl Iterator<Item = (SlotId, &Slot<P>)> {
        self.slots.iter().enumerate().map(|(i, s)| (i as SlotId, s))
    }

    /// The state of every free slot (to drop cached buffers when memory is short).
    pub fn free_data_mut(&mut self) -> impl Iterator<Item = &mut P> {
        let slots = &mut self.slots;
        slots.iter_mut().filter(|s| !s.used).map(|s| &mut s.data)
    }

    /// Slots in use (allocated and not yet released).
    pub fn busy(&self) -> usize {
        self.busy
    }

    /// True when another slot can be allocated now.
    pub fn has_free(&self) -> bool {
        !self.stopping && (!self.free.is_empty() || self.slots.len() < self.capacity)
    }

    // ---- commands -------------------------------------------------------------------------

    /// Check `op` on `slba..slba+nlb` against disk `d` (read-only, range) and remember it
    /// as slot `i`'s command. The disk's live size is re-read only when the command is out
    /// of range. The slot's SG list is cleared, ready to be filled.
    pub fn prepare(
        &mut self,
        i: SlotId,
        d: DiskId,
        op: Opcode,
        slba: u64,
        nlb: u32,
        fua: bool,
    ) -> Result<(), Status> {
        self.check(d, op, slba, nlb)?;
        let bs = self.disk(d).map_or(0, |x| x.info.block_size as u64);
        let s = self
            .slots
            .get_mut(i as usize)
            .ok_or(Status::INTERNAL_ERROR)?;
        s.disk = d;
        s.op = op;
        s.slba = slba;
        s.nlb = nlb;
        s.fua = fua;
        s.class = OpClass::of(op);
        s.bytes = if op.has_data() { nlb as u64 * bs } else { 0 };
        s.sg.clear();
        Ok(())
    }

    /// The one validation of a command against a disk (see [`Engine::prepare`]).
    fn check(&mut self, d: DiskId, op: Opcode, slba: u64, nlb: u32) -> Result<(), Status> {
        let disk = self.disk_mut(d).ok_or(Status::INVALID_NAMESPACE)?;
        if disk.retired {
            return Err(Status::INVALID_NAMESPACE);
        }
        validate_live(op, slba, nlb, &mut disk.info, disk.dev.as_ref())
    }

    /// Keep `ka` alive while slot `i` is in use: it goes into the slot's block commands
    /// (so a device that holds a command holds it too) and is dropped at `release`, after
    /// the codec wrote its reply into the buffers it keeps valid (a guest memory mapping,
    /// a ring generation). Set after `prepare`, before `submit`.
    pub fn set_keepalive(&mut self, i: SlotId, ka: KeepAlive) {
        if let Some(s) = self.slots.get_mut(i as usize) {
            s.keepalive = Some(ka);
        }
    }

    /// Complete slot `i` without a block command: a request that failed to parse or to
    /// validate, or one the codec answers itself (virtio-blk GET_ID). It is counted in
    /// disk `d`'s stats under `class` (with the bytes `prepare` set, on success) with this
    /// round's clock, and queued for [`Engine::next_completion`] like any other. A slot
    /// with block commands in flight is left alone.
    pub fn complete_now(&mut self, i: SlotId, d: DiskId, class: OpClass, st: Status) {
        let now = self.now();
        let Some(s) = self.slots.get_mut(i as usize) else {
            return;
        };
        if !s.used || s.pending > 0 {
            return;
        }
        s.status = st;
        s.class = class;
        let ok = st.is_ok();
        let bytes = if ok && class != OpClass::Other {
            s.bytes
        } else {
            0
        };
        if let Some(disk) = self.disks.get(d as usize).and_then(|x| x.as_ref()) {
            disk.stats
                .record(class, bytes, now.saturating_duration_since(s.start), ok);
        }
        self.ready.push((i, st));
    }

    /// Count slot `i` under another stats class than its opcode's (an emulated command:
    /// a Write Zeroes carried out as a write of zeros still counts as "other").
    pub fn set_class(&mut self, i: SlotId, class: OpClass) {
        if let Some(s) = self.slots.get_mut(i as usize) {
            s.class = class;
        }
    }

    /// Send slot `i`'s prepared command (with its SG list) to its disk's block queue. The
    /// list must cover exactly the command's blocks (reads, writes).
    pub fn submit(&mut self, i: SlotId) -> Result<(), Status> {
        let s = self
            .slots
            .get_mut(i as usize)
            .ok_or(Status::INTERNAL_ERROR)?;
        let d = s.disk;
        let Some(disk) = self.disks.get_mut(d as usize).and_then(|x| x.as_mut()) else {
            return Err(Status::INVALID_NAMESPACE);
        };
        if disk.retired {
            return Err(Status::INVALID_NAMESPACE);
        }
        if s.op.has_data() && s.sg.len() != s.nlb as u64 * disk.info.block_size as u64 {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
        let sg = std::mem::replace(&mut s.sg, SgList::empty());
        let mut cmd = IoCommand::new(s.op, s.slba, s.nlb, i as u64, sg);
        cmd.nsid = disk.nsid;
        cmd.fua = s.fua;
        cmd.keepalive = s.keepalive.take();
        s.pending += 1;
        self.in_flight += 1;
        disk.sent += 1;
        disk.bq.submit(cmd);
        Ok(())
    }

    /// Fan slot `i` out into one data-less `op` per `(slba, nlb)` range on disk `d`
    /// (ranges of 0 blocks are skipped). Every range is checked before any is sent: on an
    /// error none is. Returns how many commands went out; with 0 the slot has nothing in
    /// flight and the codec completes it itself.
    pub fn submit_ranges(
        &mut self,
        i: SlotId,
        d: DiskId,
        op: Opcode,
        ranges: &[(u64, u32)],
    ) -> Result<u32, Status> {
        if op.has_data() {
            return Err(Status::INVALID_FIELD);
        }
        for &(slba, nlb) in ranges {
            if nlb != 0 {
                self.check(d, op, slba, nlb)?;
            }
        }
        let s = self
            .slots
            .get_mut(i as usize)
            .ok_or(Status::INTERNAL_ERROR)?;
        let Some(disk) = self.disks.get_mut(d as usize).and_then(|x| x.as_mut()) else {
            return Err(Status::INVALID_NAMESPACE);
        };
        s.disk = d;
        s.op = op;
        s.class = OpClass::of(op);
        s.bytes = 0;
        let mut n = 0;
        for &(slba, nlb) in ranges.iter().filter(|r| r.1 != 0) {
            let mut cmd = IoCommand::new(op, slba, nlb, i as u64, SgList::empty());
            cmd.nsid = disk.nsid;
            cmd.keepalive = s.keepalive.clone();
            disk.bq.submit(cmd);
            n += 1;
        }
        s.pending += n;
        self.in_flight += n as usize;
        disk.sent += n as usize;
        Ok(n)
    }

    /// Send what was submitted to the devices (one system call per queue at most).
    pub fn kick(&mut self) {
        for d in self.disks.iter_mut().flatten() {
            d.bq.kick();
        }
    }

    /// Reap block completions. A slot whose last command completed has its stats recorded
    /// (with this round's clock) and is queued for [`Engine::next_completion`]. Returns
    /// the number of block commands reaped.
    pub fn reap(&mut self) -> usize {
        let mut done = std::mem::take(&mut self.done);
        let mut n = 0;
        for d in self.disks.iter_mut().flatten() {
            let k = d.bq.poll(&mut |c, s| done.push((c, s)));
            d.sent = d.sent.saturating_sub(k);
            n += k;
        }
        if !done.is_empty() {
            let now = self.now();
            for (mut cmd, st) in done.drain(..) {
                self.in_flight = self.in_flight.saturating_sub(1);
                let i = (cmd.tag & !IoCommand::ROUTER_TAG) as SlotId;
                let Some(s) = self.slots.get_mut(i as usize).filter(|s| s.pending > 0) else {
                    continue;
                };
                if s.keepalive.is_none() {
                    s.keepalive = cmd.keepalive.take(); // kept until `release`
                }
                if cmd.sg.capacity() > s.sg.capacity() {
                    s.sg = cmd.sg; // the slot's list comes home
                }
                if !st.is_ok() && s.status.is_ok() {
                    s.status = st;
                }
                s.pending -= 1;
                if s.pending > 0 {
                    continue;
                }
                let ok = s.status.is_ok();
                let bytes = if ok && s.class != OpClass::Other {
                    s.bytes
                } else {
                    0
                };
                if let Some(disk) = self.disks.get(s.disk as usize).and_then(|x| x.as_ref()) {
                    disk.stats
                        .record(s.class, bytes, now.saturating_duration_since(s.start), ok);
                }
                self.ready.push((i, s.status));
            }
        }
        self.done = done;
        if n > 0 && self.disks.iter().flatten().any(|d| d.retired) {
            self.collect_disks();
        }
        n
    }

    /// The next slot whose commands have all completed, with its status (the first error
    /// any of its commands met). The slot stays in use until `release`.
    pub fn next_completion(&mut self) -> Option<(SlotId, Status)> {
        let r = self.ready.get(self.ready_at).copied();
        match r {
            Some(_) => self.ready_at += 1,
            None => {
                self.ready.clear();
                self.ready_at = 0;
            }
        }
        r
    }

    /// Block commands in block queues.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Publish each disk's in-flight count (once per round, after `kick`): the engine's
    /// own count, no call into the block queue.
    pub fn publish(&self) {
        for d in self.disks.iter().flatten() {
            d.stats.set_in_flight(d.sent as u64);
        }
    }

    // ---- stop, drain, retire -------------------------------------------------------------

    /// The queue is stopping: no slot is handed out any more; what is in flight finishes.
    pub fn stop(&mut self) {
        self.stopping = true;
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Nothing is in a block queue and no completion waits to be taken.
    pub fn drained(&self) -> bool {
        self.in_flight == 0
            && self.ready_at >= self.ready.len()
            && self.disks.iter().flatten().all(|d| d.bq.in_flight() == 0)
    }

    /// Fold every disk's counters into its totals (idempotent; dropping does it too).
    pub fn retire(&mut self) {
        if self.retired {
            return;
        }
        self.retired = true;
        for d in self.disks.iter_mut().flatten() {
            d.fold();
        }
    }

    // ---- WorkSource helpers ---------------------------------------------------------------

    /// The descriptors a sleeping worker watches for the block queues.
    pub fn wait_fds(&self, out: &mut Vec<RawFd>) {
        for d in self.disks.iter().flatten() {
            d.bq.wait_fds(out);
        }
    }

    /// True once after the descriptors changed (a disk was added or dropped, a queue
    /// opened a device lazily).
    pub fn take_fds_changed(&mut self) -> bool {
        let mut changed = std::mem::take(&mut self.fds_changed);
        for d in self.disks.iter_mut().flatten() {
            changed |= d.bq.take_fds_changed();
        }
        changed
    }

    /// The descriptors changed and the worker has not re-read them yet.
    pub fn fds_pending(&self) -> bool {
        self.fds_changed
    }

    /// Busy-polling pays for one of the block queues ([`BlockQueue::busy_poll`]), or the
    /// engine has none yet.
    pub fn busy_poll(&self) -> bool {
        let mut disks = self.disks.iter().flatten().peekable();
        disks.peek().is_none() || disks.any(|d| d.bq.busy_poll())
    }

    /// The block queues allow the worker to sleep, and no completion waits to be taken.
    pub fn may_sleep(&self) -> bool {
        self.ready_at >= self.ready.len() && self.disks.iter().flatten().all(|d| d.bq.may_sleep())
    }

    /// The earliest time a block queue must be polled without being told.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.disks
            .iter()
            .flatten()
            .filter_map(|d| d.bq.next_deadline())
            .min()
    }
}

impl<P> Drop for Engine<P> {
    fn drop(&mut self) {
        if !self.retired {
            for d in self.disks.iter_mut().flatten() {
                d.fold();
            }
        }
    }
}

/// [`IoCommand::validate_range`] against `info`, the disk's size as last seen; only when
/// the command is out of range is the live size re-read from `dev`
/// ([`BlockDevice::capacity_bytes`]: a thin volume may have grown) into `info` and the
/// command checked again. A shrink is the device's to enforce. The one place this
/// re-read lives: the engine's [`Engine::prepare`] and the router (for a command a
/// classifier rewrote) both come here.
#[inline]
pub fn validate_live(
    op: Opcode,
    slba: u64,
    nlb: u32,
    info: &mut DeviceInfo,
    dev: &dyn BlockDevice,
) -> Result<(), Status> {
    match IoCommand::validate_range(op, slba, nlb, info) {
        Err(Status::LBA_OUT_OF_RANGE) => {
            let bs = info.block_size.max(1) as u64;
            info.num_blocks = dev.capacity_bytes() / bs;
            IoCommand::validate_range(op, slba, nlb, info)
        }
        r => r,
    }
}

// ---- placement ----------------------------------------------------------------------------

/// Spreads queues over a set of workers: one shared turn counter, so connections and
/// exports of every frontend take turns on the same workers. The one place placement
/// lives: the NVMe/TCP and NBD listeners take [`Placement::next`] for each connection, a
/// vhost-user export takes [`Placement::spread`] for its queues.
#[derive(Clone)]
pub struct Placement {
    workers: Arc<[WorkerHandle]>,
    next: Arc<AtomicUsize>,
}

impl Placement {
    pub fn new(workers: Vec<WorkerHandle>) -> Placement {
        Placement {
            workers: workers.into(),
            next: Arc::default(),
        }
    }

    /// The worker whose turn it is (a new connection).
    pub fn next(&self) -> Option<&WorkerHandle> {
        let n = self.workers.len();
        (n > 0).then(|| &self.workers[self.next.fetch_add(1, Ordering::Relaxed) % n])
    }

    /// The workers for an export with several queues: queue `i` of the returned list goes
    /// to entry `i % len`; the list starts at the worker whose turn it is.
    pub fn spread(&self) -> Vec<WorkerHandle> {
        let n = self.workers.len();
        if n == 0 {
            return Vec::new();
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| self.workers[(first + k) % n].clone())
            .collect()
    }

    pub fn workers(&self) -> &[WorkerHandle] {
        &self.workers
    }
}

impl WorkerPool {
    /// The placement of queues over this pool's workers (round robin). Every placement of
    /// one pool shares the pool's turn.
    pub fn placement(&self) -> Placement {
        Placement {
            workers: self.workers().to_vec().into(),
            next: self.turn.clone(),
        }
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
