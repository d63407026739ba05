//! The I/O router: the one place every command of a disk passes between its frontend and
//! its functions, where a per-disk classifier (a verified eBPF program) decides its path.
//!
//! ```text
//!  frontend ─► RouterQueue::submit ─┬─ no program ───────────────► chain queue (qos → crypt → volume)
//!                                   └─ program(ctx) → route:
//!                                        NVMUX_CHAIN    ─► chain queue
//!                                        NVMUX_FAST     ─► fast queue (crypt → volume: no qos)
//!                                        NVMUX_EXTERNAL ─► ExtRing ─► function process
//!                                        NVMUX_COMPLETE ─► completes now with ctx.status
//!                                      (| NVMUX_HOOK: run the program again at completion,
//!                                         which may complete, retry or send it elsewhere)
//! ```
//!
//! * [`elf`] reads `clang -target bpf` objects, [`verifier`] proves them safe,
//!   [`program`] links and JIT-compiles them (rbpf), [`maps`] holds their state.
//! * [`Router`] is a disk's routing state: its program (swapped live: each queue picks up
//!   the new program at its next command; commands in flight finish on the path and
//!   with the hook of the program that routed them), its external function, counters.
//! * [`RouterDevice`] / [`RouterQueue`] are the `BlockDevice` layer the daemon puts on top
//!   of a disk's chain. With no program loaded a command costs one atomic load more.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvmux_core::eventfd::EventFd;
use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, IoCommand, Opcode, Status};

pub mod ctx;
pub mod elf;
pub mod ext;
pub mod fuzzing;
pub mod maps;
pub mod program;
pub mod verifier;

pub use ctx::{Ctx, Route};
pub use ext::{External, ExternalConfig, ExternalStatus, OnFailure};
pub use nvmux_core::{Error, Result};
pub use program::{Program, ProgramInfo};

/// A refusal with a reason (bad object, failed verification, bad map access).
pub(crate) fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::new(nvmux_core::ErrorKind::InvalidArgument, msg))
}

/// Most classifier runs for one command (submission and hooks); past it the command
/// completes with Internal Error, so no program can keep a command forever.
pub const MAX_HOPS: u8 = 16;

/// Per-queue counters, written by the queue's worker only.
#[derive(Default, Debug)]
pub struct RouteCounters {
    /// Decisions per route (`Route as usize`).
    pub routed: [AtomicU64; 4],
    /// Completion hooks run.
    pub hooks: AtomicU64,
    /// Commands whose LBA, length or FUA a program changed.
    pub rewrites: AtomicU64,
    /// Bad verdicts, rewrites outside the disk, hop limit.
    pub errors: AtomicU64,
    /// Commands for the external function that failed or went to the chain instead.
    pub fallbacks: AtomicU64,
    /// FLUSHes a program completed (or a function acknowledged) without the disk's device
    /// having flushed, sent down the chain instead because the disk does not allow it.
    pub flushes_forced: AtomicU64,
}

fn bump(a: &AtomicU64) {
    // Single writer: no locked read-modify-write.
    a.store(a.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// Totals of a disk's route counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteTotals {
    pub routed: [u64; 4],
    pub hooks: u64,
    pub rewrites: u64,
    pub errors: u64,
    pub fallbacks: u64,
    pub flushes_forced: u64,
}

impl RouteTotals {
    fn add(&mut self, c: &RouteCounters) {
        for (t, r) in self.routed.iter_mut().zip(c.routed.iter()) {
            *t += r.load(Ordering::Relaxed);
        }
        self.hooks += c.hooks.load(Ordering::Relaxed);
        self.rewrites += c.rewrites.load(Ordering::Relaxed);
        self.errors += c.errors.load(Ordering::Relaxed);
        self.fallbacks += c.fallbacks.load(Ordering::Relaxed);
        self.flushes_forced += c.flushes_forced.load(Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Counters {
    live: Vec<Arc<RouteCounters>>,
    retired: RouteTotals,
}

/// A disk's routing state; it outlives the disk's devices (resize, chain changes).
pub struct Router {
    disk: String,
    /// Bumped whenever the program or the external function changes.
    gen: AtomicU64,
    program: Mutex<Option<Arc<Program>>>,
    external: Mutex<Option<Arc<External>>>,
    counters: Mutex<Counters>,
    next_queue: AtomicU32,
    /// The operator's opt-in: a FLUSH may complete without reaching the device.
    allow_flush_complete: AtomicBool,
}

impl Router {
    pub fn new(disk: &str) -> Arc<Router> {
        Arc::new(Router {
            disk: disk.to_string(),
            gen: AtomicU64::new(0),
            program: Mutex::new(None),
            external: Mutex::new(None),
            counters: Mutex::new(Counters::default()),
            next_queue: AtomicU32::new(0),
            allow_flush_complete: AtomicBool::new(false),
        })
    }

    /// Whether a classifier (or an external function) may complete a FLUSH that the
    /// disk's device has not completed. Off (the default), such a FLUSH is sent down the
    /// chain instead, and a FLUSH the device failed never completes as a success: an
    /// acknowledged flush always means a durable one. On, the acknowledgement means only
    /// what the program decided (e.g. a cache that is lost with the host). Takes effect
    /// at each command.
    pub fn set_allow_flush_complete(&self, allow: bool) {
        self.allow_flush_complete.store(allow, Ordering::Release);
    }

    pub fn allow_flush_complete(&self) -> bool {
        self.allow_flush_complete.load(Ordering::Acquire)
    }

    /// Replace the program (`None`: every command takes the chain). Takes effect at each
    /// queue's next command; nothing in flight is dropped or reordered.
    pub fn set_program(&self, p: Option<Arc<Program>>) {
        *self.program.lock().unwrap_or_else(|e| e.into_inner()) = p;
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    pub fn program(&self) -> Option<Arc<Program>> {
        self.program
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the external function (the old one, if any, is stopped by the caller).
    pub fn set_external(&self, e: Option<Arc<External>>) -> Option<Arc<External>> {
        let old = std::mem::replace(
            &mut *self.external.lock().unwrap_or_else(|e| e.into_inner()),
            e,
        );
        self.gen.fetch_add(1, Ordering::AcqRel);
        old
    }

    pub fn external(&self) -> Option<Arc<External>> {
        self.external
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn totals(&self) -> RouteTotals {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = c.retired;
        for q in &c.live {
            t.add(q);
        }
        t
    }

    fn new_counters(&self) -> Arc<RouteCounters> {
        let q = Arc::new(RouteCounters::default());
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .push(q.clone());
        q
    }

    fn retire(&self, q: &Arc<RouteCounters>) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.live.retain(|x| !Arc::ptr_eq(x, q));
        c.retired.add(q);
    }
}

/// The router as a `BlockDevice`, on top of a disk's chain.
pub struct RouterDevice {
    router: Arc<Router>,
    chain: Arc<dyn BlockDevice>,
    /// The fast path, when it differs from the chain (the chain has optional functions).
    fast: Option<Arc<dyn BlockDevice>>,
}

impl RouterDevice {
    pub fn new(
        router: Arc<Router>,
        chain: Arc<dyn BlockDevice>,
        fast: Option<Arc<dyn BlockDevice>>,
    ) -> RouterDevice {
        RouterDevice {
            router,
            chain,
            fast,
        }
    }
}

impl BlockDevice for RouterDevice {
    fn info(&self) -> &DeviceInfo {
        self.chain.info()
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        let chain = self.chain.open_queue(depth)?;
        let efd = EventFd::new().map_err(|e| Error::io("router queue wake eventfd", e))?;
        let q = self.router.next_queue.fetch_add(1, Ordering::Relaxed) as u16;
        let d = depth.max(1) as usize;
        Ok(Box::new(RouterQueue {
            counters: self.router.new_counters(),
            router: self.router.clone(),
            dev: self.chain.clone(),
            info: self.chain.info().clone(),
            chain,
            fast_dev: self.fast.clone(),
            fast: None,
            depth,
            fds_changed: false,
            gen: u64::MAX,
            prog: None,
            ext: None,
            ring: None,
            ring_failed: None,
            ctx: Ctx::default(),
            queue: q,
            slots: Vec::with_capacity(d),
            tracked: 0,
            free: Vec::with_capacity(d),
            ready: Vec::with_capacity(d),
            scratch: Vec::with_capacity(d),
            cqes: Vec::with_capacity(d),
            ext_wait: VecDeque::with_capacity(d),
            efd,
            kick: false,
        }))
    }
    fn describe(&self) -> String {
        self.chain.describe()
    }
    fn capacity_bytes(&self) -> u64 {
        self.chain.capacity_bytes()
    }
}

/// A command the router tracks (it asked for a hook, or it is at the external function).
struct Slot {
    /// The frontend's tag.
    tag: u64,
    /// The program whose hook runs at completion.
    prog: Option<Arc<Program>>,
    hook: bool,
    hops: u8,
    cookie: u64,
    /// The command, while the external function holds it.
    cmd: Option<IoCommand>,
    used: bool,
    /// Where the program sent it (what its hook sees as `ctx.route`).
    route: Route,
    /// The status of its last pass through the chain or the fast path (which both end at
    /// the disk's device), if it made one.
    dev_status: Option<Status>,
}

pub struct RouterQueue {
    router: Arc<Router>,
    counters: Arc<RouteCounters>,
    /// For the live capacity after a rewrite (a thin volume grows).
    dev: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    chain: Box<dyn BlockQueue>,
    /// The fast path's device (`None`: the chain is the fast path) and its queue, opened
    /// when a program first routes a command there.
    fast_dev: Option<Arc<dyn BlockDevice>>,
    fast: Option<Box<dyn BlockQueue>>,
    depth: u32,
    fds_changed: bool,
    /// The router generation `prog` and `ext` were read at.
    gen: u64,
    prog: Option<Arc<Program>>,
    ext: Option<Arc<External>>,
    ring: Option<ext::ExtRing>,
    /// The function generation whose ring could not be set up.
    ring_failed: Option<u64>,
    ctx: Ctx,
    queue: u16,
    slots: Vec<Slot>,
    /// Slots in use: while 0, no command below carries `ROUTER_TAG`, and completions go
    /// straight from the chain to the frontend.
    tracked: u32,
    free: Vec<u32>,
    /// Completed by the router itself, handed back at the next poll.
    ready: Vec<(IoCommand, Status)>,
    scratch: Vec<(IoCommand, Status)>,
    cqes: Vec<(u32, u16, nvmux_extfn::proto::Cqe)>,
    /// Slots waiting for a free ring entry.
    ext_wait: VecDeque<u32>,
    /// Readable when the external function completed something (or detached).
    efd: EventFd,
    /// A sub-queue got commands since the last kick.
    kick: bool,
}

impl RouterQueue {
    /// Pick up a new program or external function.
    #[inline]
    fn refresh(&mut self) {
        let g = self.router.gen.load(Ordering::Acquire);
        if g != self.gen {
            self.gen = g;
            self.prog = self.router.program();
            let ext = self.router.external();
            let same = match (&ext, &self.ext) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                self.ext = ext;
                self.abandon_ring();
            }
        }
    }

    fn fill_ctx(
        &mut self,
        cmd: &IoCommand,
        event: u32,
        route: Route,
        hops: u8,
        status: Status,
        cookie: u64,
    ) {
        self.ctx = Ctx {
            version: ctx::CTX_VERSION,
            event,
            opcode: cmd.opcode as u8,
            flags: if cmd.fua { ctx::F_FUA } else { 0 },
            route: route as u8,
            hops,
            nsid: cmd.nsid,
            slba: cmd.slba,
            nlb: cmd.nlb,
            status: Ctx::encode_status(status),
            queue: self.queue,
            disk_blocks: self.info.num_blocks,
            block_size: self.info.block_size,
            reserved0: 0,
            cookie,
            reserved1: 0,
        };
    }

    fn alloc_slot(&mut self, tag: u64) -> u32 {
        let s = Slot {
            tag,
            prog: None,
            hook: false,
            hops: 0,
            cookie: 0,
            cmd: None,
            used: true,
            route: Route::Chain,
            dev_status: None,
        };
        self.tracked += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = s;
                i
            }
            None => {
                self.slots.push(s);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Restore the frontend's tag and free the slot.
    fn release(&mut self, cmd: &mut IoCommand, slot: Option<u32>) {
        if let Some(i) = slot {
            let s = &mut self.slots[i as usize];
            cmd.tag = s.tag;
            s.prog = None;
            if std::mem::take(&mut s.used) {
                self.tracked -= 1;
            }
            self.free.push(i);
        }
    }

    fn complete(&mut self, mut cmd: IoCommand, mut st: Status, slot: Option<u32>) {
        if cmd.opcode == Opcode::Flush && st.is_ok() && !self.router.allow_flush_complete() {
            match slot.and_then(|i| self.slots.get(i as usize)?.dev_status) {
                // The device flushed: the program may fail the FLUSH, never undo a
                // failure of the device.
                Some(dev) => {
                    if !dev.is_ok() {
                        st = dev;
                    }
                }
                // Nothing below has flushed: the device does it now.
                None => return self.force_flush(cmd, slot),
            }
        }
        self.release(&mut cmd, slot);
        self.ready.push((cmd, st));
    }

    /// Send a FLUSH that was about to be acknowledged without the device down the chain;
    /// it completes with the chain's status (no hook runs again).
    fn force_flush(&mut self, mut cmd: IoCommand, slot: Option<u32>) {
        bump(&self.counters.flushes_forced);
        let i = self.track(&mut cmd, slot);
        let s = &mut self.slots[i as usize];
        s.hook = false;
        s.prog = None;
        s.route = Route::Chain;
        self.chain.submit(cmd);
        self.kick = true;
    }

    /// The router's slot for `cmd`: `slot` if it already has one, else a new one (and
    /// the command's tag points at it).
    fn track(&mut self, cmd: &mut IoCommand, slot: Option<u32>) -> u32 {
        slot.unwrap_or_else(|| {
            let i = self.alloc_slot(cmd.tag);
            cmd.tag = IoCommand::ROUTER_TAG | i as u64;
            i
        })
    }

    /// Check a command a classifier rewrote, against the live size (re-read only when it
    /// is out of range: [`nvmux_core::engine::validate_live`]).
    fn validate(&mut self, cmd: &IoCommand) -> std::result::Result<(), Status> {
        let (op, slba, nlb) = (cmd.opcode, cmd.slba, cmd.nlb);
        nvmux_core::engine::validate_live(op, slba, nlb, &mut self.info, self.dev.as_ref())?;
        if op.has_data() && cmd.sg.len() != nlb as u64 * self.info.block_size as u64 {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
        Ok(())
    }

    /// Act on a program's verdict for `cmd` (`slot`: the router already tracks it).
    fn apply(
        &mut self,
        mut cmd: IoCommand,
        r0: Option<u64>,
        slot: Option<u32>,
        prog: &Arc<Program>,
    ) {
        let Some((route, hook)) = r0.and_then(ctx::decode_verdict) else {
            bump(&self.counters.errors);
            return self.complete(cmd, Status::INTERNAL_ERROR, slot);
        };
        bump(&self.counters.routed[route as usize]);
        if route == Route::Complete {
            let st = self.ctx.nvme_status();
            return self.complete(cmd, st, slot);
        }
        let fua = self.ctx.flags & ctx::F_FUA != 0;
        if self.ctx.slba != cmd.slba || self.ctx.nlb != cmd.nlb || fua != cmd.fua {
            bump(&self.counters.rewrites);
            cmd.slba = self.ctx.slba;
            cmd.nlb = self.ctx.nlb;
            cmd.fua = fua;
            if let Err(st) = self.validate(&cmd) {
                bump(&self.counters.errors);
                return self.complete(cmd, st, slot);
            }
        }
        let cookie = self.ctx.cookie;
        // Track the command if it needs a hook or goes to the function.
        let slot = if hook || route == Route::External {
            let i = self.track(&mut cmd, slot);
            let s = &mut self.slots[i as usize];
            s.hook = hook;
            s.route = route;
            s.cookie = cookie;
            if hook && s.prog.is_none() {
                s.prog = Some(prog.clone());
            }
            Some(i)
        } else {
            self.release(&mut cmd, slot);
            None
        };
        match (route, slot) {
            (Route::External, Some(i)) => self.send_external(cmd, i),
            (Route::Fast, _) if self.fast_queue().is_some() => {
                if let Some(f) = self.fast.as_mut() {
                    f.submit(cmd);
                }
                self.kick = true;
            }
            _ => {
                self.chain.submit(cmd);
                self.kick = true;
            }
        }
    }

    /// The fast path's queue, opened on first use (`None`: the chain is the fast path, or
    /// the queue could not be opened, and the chain serves).
    fn fast_queue(&mut self) -> Option<&mut Box<dyn BlockQueue>> {
        if self.fast.is_none() {
            let dev = self.fast_dev.take()?;
            match dev.open_queue(self.depth) {
                Ok(q) => {
                    self.fast = Some(q);
                    self.fds_changed = true;
                }
                Err(e) => {
                    tracing::error!(disk = %self.router.disk, "cannot open the fast path, using the chain: {e}");
                    return None;
                }
            }
        }
        self.fast.as_mut()
    }

    /// The ring to the attached function, created on first use.
    fn ring(&mut self) -> Option<&mut ext::ExtRing> {
        let ext = self.ext.as_ref()?;
        let g = ext.generation();
        if self.ring.as_ref().is_some_and(|r| r.gen != g) {
            self.abandon_ring();
        }
        if self.ring.is_none() {
            // One attempt per attach: a failure is logged once, then the policy applies.
            if self.ring_failed == Some(g) {
                return None;
            }
            let ext = self.ext.as_ref()?;
            let conn = ext.conn()?;
            match ext::ExtRing::create(ext, conn, self.efd.as_raw_fd()) {
                Ok(r) => self.ring = Some(r),
                Err(e) => {
                    tracing::warn!(disk = %self.router.disk, "cannot set up a ring to the external function (its commands fall back until it attaches again): {e}");
                    self.ring_failed = Some(g);
                    return None;
                }
            }
        }
        self.ring.as_mut()
    }

    fn send_external(&mut self, cmd: IoCommand, slot: u32) {
        let cookie = self.slots[slot as usize].cookie;
        let r = match self.ring() {
            Some(ring) => ring.submit(slot, &cmd, cookie),
            None => return self.fall_back(cmd, slot),
        };
        match r {
            Ok(()) => self.slots[slot as usize].cmd = Some(cmd),
            Err(ext::SubmitError::Full) => {
                self.slots[slot as usize].cmd = Some(cmd);
                self.ext_wait.push_back(slot);
            }
            Err(ext::SubmitError::TooBig) => self.fall_back(cmd, slot),
        }
    }

    /// The function cannot take `cmd`: fail it or send it through the chain.
    fn fall_back(&mut self, mut cmd: IoCommand, slot: u32) {
        bump(&self.counters.fallbacks);
        let policy = self
            .ext
            .as_ref()
            .map_or(OnFailure::Fail, |e| e.cfg.on_failure);
        match policy {
            OnFailure::Fail => self.complete(cmd, ext::NOT_READY, Some(slot)),
            OnFailure::Chain => {
                self.release(&mut cmd, Some(slot));
                self.chain.submit(cmd);
                self.kick = true;
            }
        }
    }

    /// Drop the ring; whatever it held fails or falls back.
    fn abandon_ring(&mut self) {
        let Some(mut ring) = self.ring.take() else {
            return;
        };
        let mut lost = ring.drain_owners();
        lost.extend(self.ext_wait.drain(..));
        drop(ring);
        for i in lost {
            if let Some(cmd) = self.slots[i as usize].cmd.take() {
                self.fall_back(cmd, i);
            }
        }
    }

    /// A path completed a tracked command: run its hook or complete it.
    fn hop_done(&mut self, mut cmd: IoCommand, st: Status) {
        let i = (cmd.tag & !IoCommand::ROUTER_TAG) as u32;
        let Some(s) = self.slots.get_mut(i as usize).filter(|s| s.used) else {
            // Not ours after all (cannot happen): hand it back as it is.
            cmd.tag &= !IoCommand::ROUTER_TAG;
            self.ready.push((cmd, st));
            return;
        };
        if !s.hook {
            return self.complete(cmd, st, Some(i));
        }
        s.hops += 1;
        let (hops, cookie, route) = (s.hops, s.cookie, s.route);
        let Some(prog) = s.prog.clone() else {
            return self.complete(cmd, st, Some(i));
        };
        if hops > MAX_HOPS {
            bump(&self.counters.errors);
            return self.complete(cmd, Status::INTERNAL_ERROR, Some(i));
        }
        bump(&self.counters.hooks);
        self.fill_ctx(&cmd, ctx::EV_COMPLETE, route, hops, st, cookie);
        let r0 = prog.run(&mut self.ctx);
        self.apply(cmd, r0, Some(i), &prog);
    }

    fn poll_external(&mut self) -> usize {
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        let dead = self.ext.as_ref().is_none_or(|e| e.generation() != ring.gen);
        let broken = if dead {
            None
        } else {
            ring.reap(&mut cqes).err()
        };
        if let Some(why) = broken {
            ring.break_conn(why);
        }
        let n = cqes.len();
        for &(slot, id, c) in &cqes {
            let Some(cmd) = self.slots[slot as usize].cmd.take() else {
                continue;
            };
            let st = Status::new(((c.status >> 8) & 7) as u8, c.status as u8);
            if let Some(r) = self.ring.as_mut() {
                if cmd.opcode == Opcode::Read && st.is_ok() {
                    r.copy_read(id, &cmd);
                }
                r.release(id);
            }
            self.slots[slot as usize].cookie = c.cookie;
            self.hop_done(cmd, st);
        }
        self.cqes = cqes;
        if dead || broken.is_some() {
            self.abandon_ring();
        }
        // Commands that waited for a free entry.
        while let Some(&slot) = self.ext_wait.front() {
            let Some(cmd) = self.slots[slot as usize].cmd.take() else {
                self.ext_wait.pop_front();
                continue;
            };
            let cookie = self.slots[slot as usize].cookie;
            let r = match self.ring.as_mut() {
                Some(ring) => ring.submit(slot, &cmd, cookie),
                None => Err(ext::SubmitError::TooBig),
            };
            match r {
                Ok(()) => {
                    self.ext_wait.pop_front();
                    self.slots[slot as usize].cmd = Some(cmd);
                }
                Err(ext::SubmitError::Full) => {
                    self.slots[slot as usize].cmd = Some(cmd);
                    break;
                }
                Err(ext::SubmitError::TooBig) => {
                    self.ext_wait.pop_front();
                    self.fall_back(cmd, slot);
                }
            }
        }
        n
    }
}

impl BlockQueue for RouterQueue {
    #[inline]
    fn submit(&mut self, cmd: IoCommand) {
        self.refresh();
        let Some(prog) = self.prog.take() else {
            self.kick = true;
            return self.chain.submit(cmd);
        };
        self.fill_ctx(&cmd, ctx::EV_SUBMIT, Route::Chain, 0, Status::SUCCESS, 0);
        let r0 = prog.run(&mut self.ctx);
        self.apply(cmd, r0, None, &prog);
        self.prog = Some(prog);
    }

    fn kick(&mut self) {
        if std::mem::take(&mut self.kick) {
            self.chain.kick();
            if let Some(f) = self.fast.as_mut() {
                f.kick();
            }
        }
        if let Some(r) = self.ring.as_mut() {
            r.kick();
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        if self.tracked == 0 && self.ring.is_none() && self.ready.is_empty() {
            // Pass-through (no program, or one that asked for no hook): nothing below is
            // the router's, so the chain completes straight to the frontend, with no
            // closure of ours per completion.
            let mut n = self.chain.poll(done);
            if let Some(f) = self.fast.as_mut() {
                n += f.poll(done);
            }
            if self.kick {
                self.kick();
            }
            return n;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut n = 0;
        self.chain.poll(&mut |c, s| {
            if c.tag & IoCommand::ROUTER_TAG == 0 {
                done(c, s);
            } else {
                scratch.push((c, s));
            }
            n += 1;
        });
        if let Some(f) = self.fast.as_mut() {
            f.poll(&mut |c, s| {
                if c.tag & IoCommand::ROUTER_TAG == 0 {
                    done(c, s);
                } else {
                    scratch.push((c, s));
                }
                n += 1;
            });
        }
        for (c, s) in scratch.drain(..) {
            let i = (c.tag & !IoCommand::ROUTER_TAG) as usize;
            if let Some(slot) = self.slots.get_mut(i).filter(|x| x.used) {
                slot.dev_status = Some(s);
            }
            self.hop_done(c, s);
        }
        self.scratch = scratch;
        if self.ring.is_some() || !self.ext_wait.is_empty() {
            // (The worker resets the eventfd when it fires; polling needs no system call.)
            self.refresh();
            n += self.poll_external();
        }
        for (c, s) in self.ready.drain(..) {
            done(c, s);
            n += 1;
        }
        if self.kick || self.ring.is_some() {
            self.kick();
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.chain.in_flight()
            + self.fast.as_ref().map_or(0, |f| f.in_flight())
            + self.ring.as_ref().map_or(0, |r| r.outstanding())
            + self.ext_wait.len()
            + self.ready.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.chain.wait_fds(out);
        if let Some(f) = &self.fast {
            f.wait_fds(out);
        }
        out.push(self.efd.as_raw_fd());
    }

    fn take_fds_changed(&mut self) -> bool {
        // Also the queues below: a mirror that gains a leg, a remote queue's new
        // connection (their descriptors change under the router).
        let mut c = std::mem::take(&mut self.fds_changed);
        c |= self.chain.take_fds_changed();
        if let Some(f) = &mut self.fast {
            c |= f.take_fds_changed();
        }
        c
    }

    fn busy_poll(&self) -> bool {
        self.chain.busy_poll() || self.fast.as_ref().is_some_and(|f| f.busy_poll())
    }

    fn may_sleep(&self) -> bool {
        self.ready.is_empty()
            && self.chain.may_sleep()
            && self.fast.as_ref().is_none_or(|f| f.may_sleep())
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        let f = self.fast.as_ref().and_then(|f| f.next_deadline());
        match (self.chain.next_deadline(), f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Drop for RouterQueue {
    fn drop(&mut self) {
        self.abandon_ring();
        self.router.retire(&self.counters);
    }
}

#[cfg(test)]
mod tests;
