//! The queues of the vfio-user NVMe controller: a completion queue ring ([`CqRing`],
//! used by the admin queue on the control thread and by every I/O queue), and an I/O
//! submission/completion queue pair as a [`WorkSource`] on a worker thread
//! ([`IoQueue`]), on the shared frontend engine ([`nvmux_core::engine::Engine`]) and the
//! shared NVM command model ([`nvmux_nvmf::nvm`]).
//!
//! **Polling and sleeping.** While busy the worker reads the submission queue's tail
//! (from the shadow doorbell buffer when the guest set one with Doorbell Buffer Config,
//! else the value the control thread stored from the last doorbell write) and the
//! completion queue's head each round. While awake it keeps the event indexes one behind
//! what it has seen, so the guest's driver skips the MMIO doorbell write (no trap, no
//! vfio-user message). Before it sleeps it sets the SQ event index to the tail it has
//! seen, so the guest's next submission writes the doorbell through BAR0: the control
//! thread stores the tail and signals the queue's eventfd, which wakes the worker. Without
//! shadow doorbells every doorbell is a BAR0 write and the same eventfd wakes a sleeping
//! worker. An idle queue costs no CPU.
//!
//! **Data.** A command's PRPs are walked page by page against the DMA table
//! ([`crate::prp`]); the slot's SG list points straight at guest memory (no copy) and the
//! table (an `Arc`) travels with the block command as its keepalive, so an unmap cannot
//! pull the memory from under a command in flight.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use nvmux_core::engine::{DiskId, Engine, SlotId};
use nvmux_core::eventfd::EventFd;
use nvmux_core::stats::OpClass;
use nvmux_core::worker::WorkSource;
use nvmux_core::{KeepAlive, Status};
use nvmux_nvmf::ctrl::Sqe;
use nvmux_nvmf::nvm::{self, IoPlan, Need};

use crate::ctrl::CtrlShared;
use crate::device::Irqs;
use crate::dma::{DmaFault, DmaSpace, DmaTable};
use crate::prp::{self, PAGE};

/// A completion queue in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct CqRing {
    pub base: u64,
    pub size: u16,
    pub tail: u16,
    pub phase: bool,
    /// The guest's head (last doorbell or shadow value).
    pub head: u16,
    pub vector: u16,
    /// Interrupts enabled.
    pub ien: bool,
}

impl CqRing {
    pub fn new(base: u64, size: u16, vector: u16, ien: bool) -> CqRing {
        CqRing {
            base,
            size,
            tail: 0,
            phase: true,
            head: 0,
            vector,
            ien,
        }
    }

    /// No room for another entry.
    pub fn full(&self) -> bool {
        (self.tail + 1) % self.size == self.head
    }

    /// The guest consumed everything.
    pub fn empty(&self) -> bool {
        self.tail == self.head
    }

    /// Write one completion queue entry (the last dword, with the phase tag, last) and
    /// advance the tail. The caller checked [`CqRing::full`].
    pub fn post(
        &mut self,
        t: &DmaTable,
        dw0: u32,
        sqhd: u16,
        sqid: u16,
        cid: u16,
        st: Status,
    ) -> Result<(), DmaFault> {
        let g = t.translate(self.base + self.tail as u64 * 16, 16, true)?;
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&dw0.to_le_bytes());
        b[8..10].copy_from_slice(&sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&sqid.to_le_bytes());
        g.write_at(0, &b);
        let mut s = st.to_cqe_bits();
        if !st.is_ok() {
            s |= 1 << 15; // Do Not Retry: no error of ours goes away by itself
        }
        s |= self.phase as u16;
        let dw3 = cid as u32 | (s as u32) << 16;
        // The ring is page aligned, so the entry's last dword is 4-byte aligned.
        g.atomic_u32(12)
            .ok_or(DmaFault::Unmapped)?
            .store(dw3, Ordering::Release);
        self.tail += 1;
        if self.tail == self.size {
            self.tail = 0;
            self.phase = !self.phase;
        }
        Ok(())
    }
}

/// Where a queue's shadow doorbell and event index live (Doorbell Buffer Config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shadow {
    /// Shadow doorbell buffer and event index buffer (page-aligned IOVAs).
    pub db: u64,
    pub ei: u64,
}

/// What the control thread and a queue's worker share.
pub struct QueueCtl {
    pub qid: u16,
    /// The SQ tail and CQ head of the last BAR0 doorbell writes.
    pub sq_tail: AtomicU32,
    pub cq_head: AtomicU32,
    /// Signalled by the control thread when the worker sleeps (or must look at a flag).
    pub kick: EventFd,
    pub sleeping: AtomicBool,
    /// Stop: finish what is in flight, then end. `post_on_stop`: their completions are
    /// posted (Delete I/O SQ), else dropped (controller reset).
    pub stop: AtomicBool,
    pub post_on_stop: AtomicBool,
    /// Pause: take no new command (a DMA_UNMAP is pending); `idle` once nothing is in
    /// flight.
    pub pause: AtomicBool,
    pub idle: AtomicBool,
    pub finished: AtomicBool,
    /// The worker met a fatal error (a doorbell value past the queue, queue memory
    /// unmapped): the controller shows CSTS.CFS.
    pub fatal: AtomicBool,
    /// Commands in flight (for the status view).
    pub in_flight: AtomicU64,
    /// The shadow doorbell and event index buffers (0: none), set by Doorbell Buffer
    /// Config, which may come after the queue was created: the worker adopts them.
    pub shadow_db: AtomicU64,
    pub shadow_ei: AtomicU64,
}

impl QueueCtl {
    pub fn new(qid: u16) -> std::io::Result<QueueCtl> {
        Ok(QueueCtl {
            qid,
            sq_tail: AtomicU32::new(0),
            cq_head: AtomicU32::new(0),
            kick: EventFd::new()?,
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            post_on_stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            idle: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            fatal: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            shadow_db: AtomicU64::new(0),
            shadow_ei: AtomicU64::new(0),
        })
    }

    /// Wake the worker if it sleeps (after a doorbell value was stored).
    pub fn notify(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.kick.signal();
        }
    }
}

/// The engine slot's own state: the command id, and a buffer kept for Dataset Management
/// range lists and emulated Write Zeroes (grown once, reused).
#[derive(Default)]
pub struct Cmd {
    cid: u16,
    buf: Vec<u8>,
}

/// An I/O queue pair on a worker.
pub struct IoQueue {
    ctl: Arc<QueueCtl>,
    shared: Arc<CtrlShared>,
    dma: Arc<DmaSpace>,
    table: Arc<DmaTable>,
    gen: u64,
    irqs: Arc<Irqs>,
    qid: u16,
    sq_base: u64,
    sq_size: u16,
    sq_head: u16,
    /// The tail seen last (what the event index is based on).
    sq_tail: u16,
    cq: CqRing,
    shadow: Option<Shadow>,
    eng: Engine<Cmd>,
    disk: DiskId,
    block_size: u32,
    read_only: bool,
    /// Completions waiting for room in the CQ.
    deferred: VecDeque<(SlotId, Status)>,
    irq_due: bool,
    finished: bool,
    /// The event indexes as last written (to write them only when they change).
    ei_sq: Option<u16>,
    ei_cq: Option<u16>,
}

/// What the controller hands a new I/O queue.
pub struct IoQueueParams {
    pub qid: u16,
    pub sq_base: u64,
    pub sq_size: u16,
    pub cq: CqRing,
    pub shadow: Option<Shadow>,
}

impl IoQueue {
    pub fn new(
        p: IoQueueParams,
        ctl: Arc<QueueCtl>,
        shared: Arc<CtrlShared>,
        dma: Arc<DmaSpace>,
        irqs: Arc<Irqs>,
    ) -> nvmux_core::Result<IoQueue> {
        // At most size - 1 commands of an SQ are outstanding.
        let depth = (p.sq_size as usize).saturating_sub(1).max(1);
        let mut eng = Engine::new(depth);
        let disk = eng.add_disk(shared.dev.clone(), &shared.stats, 1, depth as u32)?;
        let block_size = eng.info(disk).map(|i| i.block_size).unwrap_or(512);
        let read_only = shared.read_only || eng.info(disk).is_some_and(|i| i.read_only);
        let gen = dma.generation();
        let table = dma.load();
        Ok(IoQueue {
            qid: p.qid,
            sq_base: p.sq_base,
            sq_size: p.sq_size,
            sq_head: 0,
            sq_tail: 0,
            cq: p.cq,
            shadow: p.shadow,
            ctl,
            shared,
            dma,
            table,
            gen,
            irqs,
            eng,
            disk,
            block_size,
            read_only,
            deferred: VecDeque::with_capacity(depth),
            irq_due: false,
            finished: false,
            ei_sq: None,
            ei_cq: None,
        })
    }

    fn fatal(&mut self, why: &str) {
        if !self.ctl.fatal.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "vfio-user nvme: I/O queue {}: {why}; controller fatal status",
                self.qid
            );
        }
    }

    /// The shadow doorbell word `slot` (0: SQ tail, 1: CQ head) of this queue in the
    /// doorbell (`ei` false) or event index (`ei` true) buffer.
    fn shadow_word(&self, ei: bool, slot: u64) -> Option<&AtomicU32> {
        let s = self.shadow?;
        let base = if ei { s.ei } else { s.db };
        let off = (2 * self.qid as u64 + slot) * 4;
        self.table
            .translate(base + off, 4, ei)
            .ok()
            .and_then(|g| g.atomic_u32(0).map(|a| a as *const AtomicU32))
            // SAFETY: the word lies in a mapping of `self.table`, which `self` holds;
            // the reference does not outlive `&self`.
            .map(|p| unsafe { &*p })
    }

    /// The guest's SQ tail (shadow or doorbell), checked against the queue size.
    fn read_tail(&mut self) -> Option<u16> {
        let v = match self.shadow {
            Some(_) => match self.shadow_word(false, 0) {
                Some(a) => a.load(Ordering::Acquire),
                None => {
                    self.fatal("the shadow doorbell buffer is not mapped any more");
                    return None;
                }
            },
            None => self.ctl.sq_tail.load(Ordering::Acquire),
        };
        if v >= self.sq_size as u32 {
            self.shared
                .counters
                .bad_doorbells
                .fetch_add(1, Ordering::Relaxed);
            self.fatal(&format!(
                "SQ tail {v} past the queue's {} entries",
                self.sq_size
            ));
            return None;
        }
        Some(v as u16)
    }

    fn read_head(&mut self) -> Option<u16> {
        let v = match self.shadow {
            Some(_) => self.shadow_word(false, 1)?.load(Ordering::Acquire),
            None => self.ctl.cq_head.load(Ordering::Acquire),
        };
        if v >= self.cq.size as u32 {
            self.shared
                .counters
                .bad_doorbells
                .fetch_add(1, Ordering::Relaxed);
            self.fatal(&format!(
                "CQ head {v} past the queue's {} entries",
                self.cq.size
            ));
            return None;
        }
        Some(v as u16)
    }

    fn write_ei(&mut self, slot: u64, v: u16) {
        let cur = if slot == 0 { self.ei_sq } else { self.ei_cq };
        if cur == Some(v) {
            return;
        }
        if let Some(a) = self.shadow_word(true, slot) {
            a.store(v as u32, Ordering::Release);
        }
        if slot == 0 {
            self.ei_sq = Some(v);
        } else {
            self.ei_cq = Some(v);
        }
    }

    /// Post one completion (the CQ has room).
    fn post(&mut self, slot: SlotId, st: Status) -> bool {
        let cid = self.eng.get(slot).map(|s| s.data.cid).unwrap_or(0);
        match self
            .cq
            .post(&self.table, 0, self.sq_head, self.qid, cid, st)
        {
            Ok(()) => {
                self.irq_due = true;
                self.shared
                    .counters
                    .io_commands
                    .fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.fatal("the completion queue is not mapped any more");
                false
            }
        }
    }

    /// Reap block completions and post them (or keep them until the CQ has room).
    fn complete(&mut self, post: bool) -> usize {
        let mut n = self.eng.reap();
        if let Some(h) = self.read_head() {
            self.cq.head = h;
        }
        while let Some(&(slot, st)) = self.deferred.front() {
            if post && self.cq.full() {
                break;
            }
            self.deferred.pop_front();
            if post && !self.ctl.fatal.load(Ordering::Relaxed) {
                self.post(slot, st);
            }
            self.eng.release(slot);
            n += 1;
        }
        while let Some((slot, st)) = self.eng.next_completion() {
            n += 1;
            if !post || self.ctl.fatal.load(Ordering::Relaxed) {
                self.eng.release(slot);
                continue;
            }
            if !self.deferred.is_empty() || self.cq.full() {
                self.deferred.push_back((slot, st));
                continue;
            }
            self.post(slot, st);
            self.eng.release(slot);
        }
        if self.irq_due {
            self.irq_due = false;
            if self.cq.ien {
                if !self.irqs.signal_msix(self.cq.vector as u32) {
                    self.irqs.assert_intx();
                }
                self.shared
                    .counters
                    .interrupts
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        n
    }

    /// Fetch and start the commands between our head and the guest's tail.
    fn fetch(&mut self) -> usize {
        let Some(tail) = self.read_tail() else {
            return 0;
        };
        self.sq_tail = tail;
        if self.shadow.is_some() {
            // Awake: keep the event index behind the tail so the guest does not trap.
            self.write_ei(0, tail.wrapping_sub(1));
        }
        let mut n = 0;
        while self.sq_head != tail && self.eng.has_free() {
            let mut sqe = [0u8; 64];
            match self
                .table
                .translate(self.sq_base + self.sq_head as u64 * 64, 64, false)
            {
                Ok(g) => {
                    g.read_to(&mut sqe);
                }
                Err(_) => {
                    self.fatal("the submission queue is not mapped any more");
                    return n;
                }
            }
            self.sq_head = (self.sq_head + 1) % self.sq_size;
            n += 1;
            self.start(&sqe);
        }
        if n > 0 {
            self.eng.kick();
        }
        n
    }

    /// Start one command (or complete it at once when it fails).
    fn start(&mut self, sqe: &[u8; 64]) {
        let Some(slot) = self.eng.alloc() else {
            return;
        };
        let s = Sqe(sqe);
        let cid = u16::from_le_bytes([sqe[2], sqe[3]]);
        self.eng.slot_mut(slot).data.cid = cid;
        let d = self.disk;
        let (class, res) = match nvm::parse_io(s, self.block_size, self.read_only) {
            Err(st) => (OpClass::Other, Err(st)),
            Ok(plan) => {
                let class = match plan {
                    IoPlan::One { op, .. } => OpClass::of(op),
                    IoPlan::Dsm { .. } => OpClass::Other,
                };
                // Flush may name every namespace; everything else names ours.
                let nsid = s.nsid();
                let ns_ok = nsid == 1 || (nsid == 0xffff_ffff && sqe[0] == 0x00);
                if !ns_ok {
                    (class, Err(Status::INVALID_NAMESPACE))
                } else {
                    (class, self.run(slot, d, &plan, s))
                }
            }
        };
        match res {
            Ok(true) => {}
            Ok(false) => self.eng.complete_now(slot, d, class, Status::SUCCESS),
            Err(st) => self.eng.complete_now(slot, d, class, st),
        }
    }

    /// Prepare and submit; Ok(true): block commands went out, Ok(false): nothing to do.
    fn run(&mut self, slot: SlotId, d: DiskId, plan: &IoPlan, s: Sqe<'_>) -> Result<bool, Status> {
        let need = nvm::prepare(&mut self.eng, slot, d, plan)?;
        let (prp1, prp2) = (s.prp1(), s.prp2());
        let mem: Option<Vec<u8>> = match need {
            Need::Nothing => None,
            Need::Data(len) => {
                let write =
                    matches!(plan, IoPlan::One { op, .. } if *op == nvmux_core::Opcode::Read);
                let table = self.table.clone();
                let sg = self.eng.slot_mut(slot).sg_mut();
                if let Err(e) = prp::walk(&table, prp1, prp2, len, write, |g| {
                    sg.push(g.as_ptr(), g.len())
                }) {
                    if matches!(e, prp::PrpError::Fault(_)) {
                        self.shared
                            .counters
                            .bad_prps
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e.status());
                }
                let ka: KeepAlive = table;
                self.eng.set_keepalive(slot, ka);
                None
            }
            Need::Zeros(len) => {
                let mut b = std::mem::take(&mut self.eng.slot_mut(slot).data.buf);
                b.resize(len, 0);
                Some(b)
            }
            Need::Ranges(len) => {
                let mut b = std::mem::take(&mut self.eng.slot_mut(slot).data.buf);
                b.resize(len, 0);
                if let Err(e) = prp::read_all(&self.table, prp1, prp2, &mut b) {
                    self.eng.slot_mut(slot).data.buf = b;
                    if matches!(e, prp::PrpError::Fault(_)) {
                        self.shared
                            .counters
                            .bad_prps
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e.status());
                }
                Some(b)
            }
        };
        match mem {
            None => nvm::submit(&mut self.eng, slot, d, plan, None).map(|n| n > 0),
            Some(mut b) => {
                let r = nvm::submit(&mut self.eng, slot, d, plan, Some(&mut b));
                // The buffer goes back to the slot (its heap block does not move: an
                // emulated Write Zeroes points the block command at it).
                self.eng.slot_mut(slot).data.buf = b;
                r.map(|n| n > 0)
            }
        }
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        // Dropped without finishing (the worker gave it up after a panic, or the pool
        // shut down): whoever waits for it must not wait any longer.
        self.ctl.finished.store(true, Ordering::Release);
    }
}

impl WorkSource for IoQueue {
    fn poll(&mut self) -> usize {
        if self.finished {
            return 0;
        }
        self.eng.round();
        let db = self.ctl.shadow_db.load(Ordering::Acquire);
        if db != self.shadow.map_or(0, |s| s.db) {
            let ei = self.ctl.shadow_ei.load(Ordering::Acquire);
            self.shadow = (db != 0).then_some(Shadow { db, ei });
            self.ei_sq = None;
            self.ei_cq = None;
        }
        let gen = self.dma.generation();
        if gen != self.gen {
            self.gen = gen;
            self.table = self.dma.load();
            self.ei_sq = None;
            self.ei_cq = None;
        }
        let stopping = self.ctl.stop.load(Ordering::Acquire);
        let fatal = self.ctl.fatal.load(Ordering::Relaxed);
        let post = !stopping || self.ctl.post_on_stop.load(Ordering::Relaxed);
        let mut n = self.complete(post);
        if stopping || fatal {
            self.eng.stop();
            // Deferred completions of a stopping queue that may not post are dropped.
            if !post || fatal {
                while let Some((slot, _)) = self.deferred.pop_front() {
                    self.eng.release(slot);
                }
            }
            if stopping && self.eng.drained() && self.eng.busy() == 0 {
                self.eng.retire();
                self.finished = true;
                self.ctl.finished.store(true, Ordering::Release);
            }
            self.eng.publish();
            return n.max(stopping as usize);
        }
        if self.ctl.pause.load(Ordering::Acquire) {
            let idle = self.eng.in_flight() == 0 && self.eng.busy() == 0;
            self.ctl.idle.store(idle, Ordering::Release);
            self.eng.publish();
            return n;
        }
        n += self.fetch();
        n += self.complete(true);
        self.ctl
            .in_flight
            .store(self.eng.busy() as u64, Ordering::Relaxed);
        self.eng.publish();
        n
    }

    fn wait_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.ctl.kick.as_raw_fd()];
        self.eng.wait_fds(&mut v);
        v
    }

    fn take_fds_changed(&mut self) -> bool {
        self.eng.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.eng.busy_poll()
    }

    fn prepare_sleep(&mut self) -> bool {
        if self.finished {
            return true;
        }
        if !self.eng.may_sleep() {
            return false;
        }
        self.ctl.sleeping.store(true, Ordering::SeqCst);
        if self.ctl.stop.load(Ordering::SeqCst) {
            self.ctl.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        if self.ctl.fatal.load(Ordering::Relaxed) || self.ctl.pause.load(Ordering::SeqCst) {
            // Nothing to fetch until the controller resets or resumes us (it kicks).
            return true;
        }
        if self.shadow.is_some() {
            // Ask the guest to write the doorbell (and trap) on its next submission, and
            // on its next CQ head update when completions wait for room.
            let t = self.sq_tail;
            self.write_ei(0, t);
            if !self.deferred.is_empty() {
                let h = self.cq.head;
                self.write_ei(1, h);
            }
        }
        fence(Ordering::SeqCst);
        let tail = self.read_tail();
        let head = if self.deferred.is_empty() {
            Some(self.cq.head)
        } else {
            self.read_head()
        };
        if tail != Some(self.sq_tail) || head != Some(self.cq.head) {
            self.ctl.sleeping.store(false, Ordering::SeqCst);
            return self.ctl.fatal.load(Ordering::Relaxed);
        }
        true
    }

    fn after_sleep(&mut self) {
        self.ctl.sleeping.store(false, Ordering::SeqCst);
        self.ctl.kick.drain();
    }

    fn finished(&self) -> bool {
        self.finished
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.eng.next_deadline()
    }

    fn describe(&self) -> String {
        format!("vfio-user nvme I/O queue {}", self.qid)
    }
}

/// The doorbell buffer and event index buffer are one page each.
pub const SHADOW_BYTES: u64 = PAGE;
