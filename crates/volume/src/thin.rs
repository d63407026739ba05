//! Thin volumes as block devices.
//!
//! A [`ThinQueue`] turns each guest command into I/O on the pool's data clusters through
//! an io_uring queue of the pool file:
//!
//! * reads of mapped clusters go to their data cluster (the volume's own, or a snapshot's
//!   it reads through to); unmapped ranges are filled with zeroes in guest memory;
//! * a write to a cluster the volume owns goes in place; otherwise it takes a claimed
//!   (zero) cluster, and when the volume reads that cluster through to a snapshot the
//!   rest of it is copied (copy-on-write through a bounce buffer);
//! * the new mapping is installed only when the data write has completed ("data before
//!   metadata"); its journal record is written (not synced) before the command completes,
//!   so a `kill -9` of the daemon loses no completed write, and synced at the next flush;
//! * a command whose single piece needs no copy is passed down whole, without copying its
//!   scatter list (the common case: any I/O inside one cluster).
//!
//! Two writes to the same unallocated cluster must not both allocate: the second waits
//! (parked) until the first has installed its mapping, then runs again. Flushes and FUA
//! writes wait for the pool's flusher to commit the journal. Parked commands come back
//! through the queue's [`Mailbox`].

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nvmux_core::eventfd::EventFd;
use nvmux_core::{
    AlignedBuf, BlockDevice, BlockQueue, DeviceInfo, Error, ErrorKind, IoCommand, Opcode, Result,
    SgList, Status,
};

use crate::pool::{lock, Pool, State, VolHandle};

use crate::park::{Mailbox, Parked, COMPLETE, KIND, RESUME, RETRY};

/// A device over one thin volume of a pool.
pub struct ThinDevice {
    pool: Arc<Pool>,
    handle: Arc<VolHandle>,
    info: DeviceInfo,
    name: String,
    /// Test fault `pool-write-delay:<volume>`: every write is held 1 s after its data
    /// reached the device, before its mapping is installed (in flight across a snapshot).
    delay_writes: bool,
}

impl ThinDevice {
    pub fn open(pool: &Arc<Pool>, name: &str) -> Result<ThinDevice> {
        let (handle, snapshot) = pool.handle(name)?;
        let di = pool.data.info();
        // A volume's logical block is the pool device's (512, or 4096 on a 4Kn device):
        // every piece the queue sends down is then a whole number of device blocks
        // (sizes, clusters and metadata blocks are multiples of 4096).
        let bs = di.block_size.max(512);
        if !bs.is_power_of_two() || bs as usize > crate::format::BLOCK {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "pool {}: its device has {bs}-byte logical blocks; pools need 512 or 4096",
                    pool.path.display()
                ),
            ));
        }
        Ok(ThinDevice {
            pool: pool.clone(),
            info: DeviceInfo {
                block_size: bs,
                num_blocks: handle.size.load(Ordering::Acquire) / bs as u64,
                read_only: snapshot,
                discard: true,
                write_zeroes: true,
                volatile_cache: true,
                max_transfer: di.max_transfer,
            },
            handle,
            name: name.to_string(),
            delay_writes: nvmux_core::fault::armed("pool-write-delay", name),
        })
    }

    /// The volume's current size in bytes (it changes with resize).
    pub fn size(&self) -> u64 {
        self.handle.size.load(Ordering::Acquire)
    }
}

impl BlockDevice for ThinDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        let inner = self.pool.data.open_queue(depth.saturating_mul(2).max(8))?;
        let mut q = self.queue_over(inner)?;
        q.reserve(depth as usize);
        Ok(Box::new(q))
    }
    fn capacity_bytes(&self) -> u64 {
        self.size()
    }
    fn describe(&self) -> String {
        format!(
            "thin volume {:?} in pool {} ({} KiB clusters)",
            self.name,
            self.pool.path().display(),
            self.pool.cluster_size() >> 10
        )
    }
}

impl ThinDevice {
    /// A queue of this volume over `inner`, a queue of the pool's data device.
    pub(crate) fn queue_over(&self, inner: Box<dyn BlockQueue>) -> Result<ThinQueue> {
        let own = inner.completion_fd().is_none();
        let fd: OwnedFd = match inner.completion_fd() {
            Some(f) => {
                // SAFETY: dup of a descriptor the inner queue holds open; checked below.
                let d = unsafe { libc::fcntl(f, libc::F_DUPFD_CLOEXEC, 0) };
                if d < 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(Error::io("thin queue: dup of the completion eventfd", e));
                }
                // SAFETY: `d` is a new descriptor we own.
                unsafe { OwnedFd::from_raw_fd(d) }
            }
            None => EventFd::new()
                .map_err(|e| Error::io("thin queue: mailbox eventfd", e))?
                .into(),
        };
        Ok(ThinQueue {
            pool: self.pool.clone(),
            handle: self.handle.clone(),
            ibs: self.pool.data.info().block_size as u64,
            bs: self.info.block_size as u64,
            read_only: self.info.read_only,
            inner,
            cmds: Vec::new(),
            free_cmds: Vec::new(),
            subs: Vec::new(),
            free_subs: Vec::new(),
            done: VecDeque::new(),
            mb: Arc::new(Mailbox {
                items: Mutex::new(Vec::new()),
                posted: AtomicBool::new(false),
                fd,
            }),
            own,
            in_flight: 0,
            bounces: Vec::new(),
            sgs: Vec::new(),
            mail: Vec::new(),
            got: Vec::new(),
            actions: Vec::new(),
            spare: Vec::new(),
            drain_wait: std::time::Duration::from_secs(10),
            delay_writes: self.delay_writes,
        })
    }
}

/// One piece of a command, planned under the pool lock and issued after it.
enum Action {
    /// Read or write `len` bytes at device byte `phys`, from `sg_off` in the command's data.
    Data { phys: u64, sg_off: u64, len: u64 },
    /// Fill `len` bytes of the command's buffer at `sg_off` with zeroes.
    Fill { sg_off: u64, len: u64 },
    /// Write zeroes to the device.
    Zero { phys: u64, len: u64 },
    /// Copy cluster `src` to `dst` with `len` bytes at `at` replaced by the command's data
    /// from `sg_off` (or by zeroes).
    Cow {
        src: u64,
        dst: u64,
        at: u64,
        sg_off: u64,
        len: u64,
        zero: bool,
    },
}

enum Plan {
    /// Parked: it comes back through the mailbox.
    Wait,
    Complete(Status),
    /// Issue the planned actions.
    Issue,
}

/// A guest command in flight.
struct Cmd {
    cmd: Option<IoCommand>,
    slba: u64,
    tag: u64,
    fua: bool,
    remaining: u32,
    status: Status,
    vol: u32,
    /// Passed down whole: the inner command is the guest's own.
    whole: bool,
    pins: Vec<u64>,
    /// Counted in the volume handle's `writes` (a write planned, not yet installed).
    counted: bool,
    /// Held once by the `pool-write-delay` test fault.
    delayed: bool,
    /// (virtual cluster, new data cluster) to install on success.
    installs: Vec<(u64, u64)>,
    /// Virtual clusters to unmap on success.
    unmaps: Vec<u64>,
    /// Virtual clusters registered as allocating by this command.
    allocs: Vec<u64>,
    /// An install replaces data the volume read through to a snapshot: the commit that
    /// maps it must sync the data first (see `Pool::commit`).
    ordered: bool,
}

enum Phase {
    Io,
    CowRead {
        dst: u64,
        at: u64,
        sg_off: u64,
        len: u64,
        zero: bool,
    },
    CowWrite,
}

struct Sub {
    cmd: usize,
    phase: Phase,
    bounce: Option<AlignedBuf>,
}

pub struct ThinQueue {
    pool: Arc<Pool>,
    handle: Arc<VolHandle>,
    inner: Box<dyn BlockQueue>,
    ibs: u64,
    bs: u64,
    read_only: bool,
    cmds: Vec<Option<Cmd>>,
    free_cmds: Vec<usize>,
    subs: Vec<Option<Sub>>,
    free_subs: Vec<usize>,
    done: VecDeque<(IoCommand, Status)>,
    mb: Arc<Mailbox>,
    /// The mailbox eventfd is our own (the inner queue has none).
    own: bool,
    in_flight: usize,
    bounces: Vec<AlignedBuf>,
    /// SG lists of the pieces sent down, back from their completions for the next ones.
    sgs: Vec<SgList>,
    // Buffers kept across calls, so the I/O path does not allocate.
    mail: Vec<(u64, Status)>,
    got: Vec<(IoCommand, Status)>,
    actions: Vec<Action>,
    /// Finished commands, their vectors' capacity kept for the next ones.
    spare: Vec<Cmd>,
    /// How long `drop` waits for the device to hand back what it holds.
    pub(crate) drain_wait: std::time::Duration,
    delay_writes: bool,
}

const WHOLE: u64 = 1 << 63;

impl ThinQueue {
    /// Size the queue's tables for `depth` guest commands (each up to two pieces in
    /// flight below, the inner queue's depth), so that the I/O path does not grow them.
    fn reserve(&mut self, depth: usize) {
        let pieces = depth * 2;
        self.cmds.reserve(depth);
        self.free_cmds.reserve(depth);
        self.spare.reserve(depth);
        self.subs.reserve(pieces);
        self.free_subs.reserve(pieces);
        self.done.reserve(depth);
        self.got.reserve(pieces);
        self.mail.reserve(depth);
        self.actions.reserve(8);
        self.sgs.reserve(pieces);
        for _ in 0..pieces {
            self.sgs.push(SgList::with_capacity(4));
        }
    }

    fn parked(&self, idx: usize, kind: u64) -> Parked {
        Parked {
            mb: self.mb.clone(),
            token: ((idx as u64) << 2) | kind,
            since: std::time::Instant::now(),
        }
    }

    fn finish(&mut self, mut cmd: IoCommand, slba: u64, tag: u64, st: Status) {
        cmd.slba = slba;
        cmd.tag = tag;
        self.in_flight -= 1;
        self.done.push_back((cmd, st));
    }

    fn complete_idx(&mut self, idx: usize, st: Status) {
        if let Some(mut c) = self.cmds[idx].take() {
            self.free_cmds.push(idx);
            if let Some(cmd) = c.cmd.take() {
                self.finish(cmd, c.slba, c.tag, st);
            }
            self.spare.push(c);
        }
    }

    fn new_sub(&mut self, s: Sub) -> usize {
        match self.free_subs.pop() {
            Some(i) => {
                self.subs[i] = Some(s);
                i
            }
            None => {
                self.subs.push(Some(s));
                self.subs.len() - 1
            }
        }
    }

    fn bounce(&mut self) -> AlignedBuf {
        self.bounces
            .pop()
            .unwrap_or_else(|| AlignedBuf::new(self.pool.cluster_size as usize))
    }

    /// Plan command `idx` under the pool lock and issue its pieces.
    fn start(&mut self, idx: usize) {
        let Some(mut c) = self.cmds[idx].take() else {
            return;
        };
        let mut actions = std::mem::take(&mut self.actions);
        actions.clear();
        let plan = self.plan(&mut c, idx, &mut actions);
        self.cmds[idx] = Some(c);
        match plan {
            Plan::Wait => {}
            Plan::Complete(st) => self.complete_idx(idx, st),
            Plan::Issue => self.issue_all(idx, &mut actions),
        }
        self.actions = actions;
    }

    fn issue_all(&mut self, idx: usize, actions: &mut Vec<Action>) {
        let Some(c) = self.cmds[idx].as_mut() else {
            return;
        };
        let len = c.cmd.as_ref().map_or(0, |m| m.sg.len());
        // A single data piece covering the whole command: pass it down as is.
        if let [Action::Data { phys, len: n, .. }] = actions[..] {
            if n == len {
                if let Some(mut cmd) = c.cmd.take() {
                    c.whole = true;
                    c.remaining = 1;
                    cmd.slba = phys / self.ibs;
                    cmd.tag = WHOLE | idx as u64;
                    cmd.fua = false;
                    self.inner.submit(cmd);
                    return;
                }
            }
        }
        c.remaining = 1; // held while issuing, so nothing completes early
        for a in actions.drain(..) {
            self.issue(idx, a);
        }
        self.put(idx, Status::SUCCESS);
    }

    fn plan(&self, c: &mut Cmd, idx: usize, actions: &mut Vec<Action>) -> Plan {
        let Some(cmd) = c.cmd.as_ref() else {
            return Plan::Wait;
        };
        let op = cmd.opcode;
        if op == Opcode::Flush {
            self.pool.flush_after_commit(self.parked(idx, COMPLETE));
            return Plan::Wait;
        }
        let size = self.handle.size.load(Ordering::Acquire);
        let off = c.slba * self.bs;
        let len = cmd.nlb as u64 * self.bs;
        if cmd.nlb == 0 {
            return Plan::Complete(Status::INVALID_FIELD);
        } else if off.checked_add(len).is_none_or(|e| e > size) {
            return Plan::Complete(Status::LBA_OUT_OF_RANGE);
        } else if op.has_data() && cmd.sg.len() != len {
            return Plan::Complete(Status::DATA_TRANSFER_ERROR);
        } else if op.is_write() && self.read_only {
            return Plan::Complete(Status::WRITE_PROTECTED);
        } else if op.is_write() && self.pool.failed.load(Ordering::Acquire) {
            return Plan::Complete(Status::WRITE_FAULT);
        } else if self.handle.deleted.load(Ordering::Acquire) {
            return Plan::Complete(Status::INVALID_NAMESPACE);
        }
        let pool = &*self.pool;
        let cs = pool.cluster_size;
        let base = pool.data_offset;
        let end = off + len;
        let mut guard = pool.lock_state();
        let s: &mut State = &mut guard;
        let vol = self.handle.id.load(Ordering::Acquire);
        c.vol = vol;
        if op.is_write() {
            // A snapshot of this volume is being taken: wait until it is done (it waits
            // for the writes already planned against the volume's current id).
            if self.handle.quiesce.load(Ordering::Acquire) {
                s.quiesce_waiters.push(self.parked(idx, RETRY));
                return Plan::Wait;
            }
            // A write where another command allocates: wait for it to install.
            let (x0, x1) = (off / cs, (end - 1) / cs);
            if let Some(x) = (x0..=x1).find(|x| s.allocating.contains_key(&(vol, *x))) {
                if let Some(w) = s.allocating.get_mut(&(vol, x)) {
                    w.push(self.parked(idx, RETRY));
                }
                return Plan::Wait;
            }
            // Count the new clusters it takes, so it never stops half-planned.
            let mut need = 0;
            let mut pos = off;
            while pos < end {
                let x = pos / cs;
                let n = (cs - pos % cs).min(end - pos);
                match s.lookup(vol, x, cs) {
                    Some((_, true)) => {}
                    Some((_, false)) => need += 1,
                    None if op == Opcode::Write => need += 1,
                    None => {}
                }
                pos += n;
            }
            if need > s.claimed.len() {
                // Everything it could ever get: claimed, free, being claimed, and
                // released clusters about to be zeroed. Less than it needs: no space.
                let obtainable =
                    s.claimed.len() as u64 + s.free + s.claiming + s.to_zero.len() as u64;
                if need as u64 > obtainable {
                    return Plan::Complete(Status::CAPACITY_EXCEEDED);
                }
                // The flusher claims at least this many (a command larger than a claim
                // batch, or than the claimed clusters left, must not wait for ever).
                s.claim_want = s.claim_want.max(need as u64);
                s.claim_waiters.push(self.parked(idx, RETRY));
                drop(guard);
                pool.ensure_claimed();
                return Plan::Wait;
            }
            if s.claimed.len() < 64 {
                pool.ensure_claimed();
            }
        }
        let mut pos = off;
        while pos < end {
            let x = pos / cs;
            let at = pos % cs;
            let n = (cs - at).min(end - pos);
            let whole = at == 0 && n == cs;
            let sg_off = pos - off;
            let found = s.lookup(vol, x, cs);
            let pin = |pc: u64, c: &mut Cmd| {
                pool.pins[pc as usize].fetch_add(1, Ordering::AcqRel);
                c.pins.push(pc);
            };
            match (op, found) {
                (Opcode::Read, Some((pc, _))) | (Opcode::Write, Some((pc, true))) => {
                    pin(pc, c);
                    actions.push(Action::Data {
                        phys: base + pc * cs + at,
                        sg_off,
                        len: n,
                    });
                }
                (Opcode::Read, None) => actions.push(Action::Fill { sg_off, len: n }),
                (_, Some((_, false))) | (Opcode::Write, None) => {
                    let Some(nc) = s.claimed.pop() else {
                        unreachable!("claimed clusters were counted above")
                    };
                    c.installs.push((x, nc));
                    s.allocating.insert((vol, x), Vec::new());
                    c.allocs.push(x);
                    // Over inherited data, the new cluster must never be mapped
                    // durably before its contents are: a zero cluster in its place
                    // would read as neither the old data nor the new.
                    if found.is_some() && !(op != Opcode::Write && whole) {
                        c.ordered = true;
                    }
                    match found {
                        // Zeroes over a whole cluster read from a snapshot: the fresh
                        // (zero) cluster hides it, no I/O needed.
                        Some(_) if op != Opcode::Write && whole => {}
                        Some((pc, _)) if !whole => {
                            pin(pc, c);
                            actions.push(Action::Cow {
                                src: base + pc * cs,
                                dst: base + nc * cs,
                                at,
                                sg_off,
                                len: n,
                                zero: op != Opcode::Write,
                            });
                        }
                        _ => actions.push(Action::Data {
                            phys: base + nc * cs + at,
                            sg_off,
                            len: n,
                        }),
                    }
                }
                (_, Some((pc, true))) => {
                    // Write zeroes or deallocate over our own cluster.
                    if whole && !s.inherits(vol, x, cs) {
                        c.unmaps.push(x);
                    } else {
                        pin(pc, c);
                        actions.push(Action::Zero {
                            phys: base + pc * cs + at,
                            len: n,
                        });
                    }
                }
                (_, None) => {} // already reads as zeroes
            }
            pos += n;
        }
        if op.is_write() {
            // Under the pool lock, so a snapshot that set `quiesce` sees every write
            // planned before it.
            self.handle.writes.fetch_add(1, Ordering::AcqRel);
            c.counted = true;
        }
        Plan::Issue
    }

    /// Send one piece of command `idx` down as is: `len` bytes at pool offset `phys`.
    fn submit_io(&mut self, idx: usize, op: Opcode, phys: u64, len: u64, sg: SgList) {
        let si = self.new_sub(Sub {
            cmd: idx,
            phase: Phase::Io,
            bounce: None,
        });
        let ibs = self.ibs;
        self.inner.submit(IoCommand::new(
            op,
            phys / ibs,
            (len / ibs) as u32,
            si as u64,
            sg,
        ));
    }

    /// An SG list from the queue's pool (empty).
    fn take_sg(&mut self) -> SgList {
        let mut sg = self.sgs.pop().unwrap_or_else(|| SgList::with_capacity(4));
        sg.clear();
        sg
    }

    /// Give a piece's SG list back to the pool.
    fn put_sg(&mut self, cmd: &mut IoCommand) {
        self.sgs
            .push(std::mem::replace(&mut cmd.sg, SgList::with_capacity(0)));
    }

    fn issue(&mut self, idx: usize, a: Action) {
        let ibs = self.ibs;
        let mut sg = self.take_sg();
        let Some(c) = self.cmds[idx].as_mut() else {
            self.sgs.push(sg);
            return;
        };
        let Some(cmd) = c.cmd.as_ref() else {
            self.sgs.push(sg);
            return;
        };
        match a {
            Action::Fill { sg_off, len } => {
                cmd.sg.slice_into(sg_off, len, &mut sg);
                // SAFETY: a read command's buffers are writable guest memory of their
                // length (the transport validated them).
                unsafe { sg.zero() };
                self.sgs.push(sg);
            }
            Action::Data { phys, sg_off, len } => {
                cmd.sg.slice_into(sg_off, len, &mut sg);
                let op = cmd.opcode;
                c.remaining += 1;
                self.submit_io(idx, op, phys, len, sg);
            }
            Action::Zero { phys, len } => {
                c.remaining += 1;
                self.submit_io(idx, Opcode::WriteZeroes, phys, len, sg);
            }
            Action::Cow {
                src,
                dst,
                at,
                sg_off,
                len,
                zero,
            } => {
                c.remaining += 1;
                let b = self.bounce();
                let cs = self.pool.cluster_size;
                sg.push(b.as_mut_ptr(), cs as usize);
                let si = self.new_sub(Sub {
                    cmd: idx,
                    phase: Phase::CowRead {
                        dst,
                        at,
                        sg_off,
                        len,
                        zero,
                    },
                    bounce: Some(b),
                });
                self.inner.submit(IoCommand::new(
                    Opcode::Read,
                    src / ibs,
                    (cs / ibs) as u32,
                    si as u64,
                    sg,
                ));
            }
        }
    }

    /// One piece of command `idx` is done.
    fn put(&mut self, idx: usize, st: Status) {
        let Some(c) = self.cmds[idx].as_mut() else {
            return;
        };
        if !st.is_ok() && c.status.is_ok() {
            c.status = st;
        }
        c.remaining -= 1;
        if c.remaining > 0 {
            return;
        }
        if self.delay_writes && c.counted && !c.delayed && c.status.is_ok() {
            // Test fault: hold the write, its data written and its mapping not yet
            // installed, so a snapshot can be taken while it is in flight.
            c.delayed = true;
            c.remaining = 1;
            let p = self.parked(idx, RESUME);
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(1));
                p.wake(Status::SUCCESS);
            });
            return;
        }
        let st = c.status;
        let is_data_write = c
            .cmd
            .as_ref()
            .is_some_and(|m| matches!(m.opcode, Opcode::Write | Opcode::WriteZeroes));
        if st == Status::WRITE_FAULT && (is_data_write || !c.installs.is_empty()) {
            // A write the device failed with a media error (its data, or a copy-on-write):
            // what it lost is unknown, so the pool fails until it is reopened
            // ("fsyncgate"). Errors without I/O (no memory, cancelled) do not.
            self.pool.fail(&format!(
                "a data write to volume id {} failed with status {st:?}",
                c.vol
            ));
        }
        let vol = c.vol;
        let fua = c.fua && c.cmd.as_ref().is_some_and(|m| m.opcode.is_write());
        let mut woken = Vec::new();
        let released = st.is_ok() && !c.unmaps.is_empty();
        // A mapping changed: its journal record is written before the completion goes
        // back, so a kill -9 of the daemon cannot lose the write (docs/format.md, "Crash
        // safety").
        let recorded = st.is_ok() && (!c.installs.is_empty() || !c.unmaps.is_empty());
        if !c.installs.is_empty() || !c.unmaps.is_empty() || !c.allocs.is_empty() {
            let mut s = self.pool.lock_state();
            if st.is_ok() && c.ordered && !c.installs.is_empty() && !self.pool.cow_unordered {
                s.cow_unsynced = true;
            }
            for (x, nc) in c.installs.drain(..) {
                if st.is_ok() {
                    s.install(vol, x, nc);
                } else {
                    // It may hold part of the failed write: zero it before reuse.
                    s.release(nc);
                }
            }
            for x in c.unmaps.drain(..) {
                if st.is_ok() {
                    s.unmap(vol, x);
                }
            }
            for x in c.allocs.drain(..) {
                if let Some(w) = s.allocating.remove(&(vol, x)) {
                    woken.extend(w);
                }
            }
        }
        for pc in c.pins.drain(..) {
            self.pool.pins[pc as usize].fetch_sub(1, Ordering::AcqRel);
        }
        if std::mem::take(&mut c.counted) {
            // After the installs above: a snapshot waiting for this sees them.
            self.handle.writes.fetch_sub(1, Ordering::AcqRel);
        }
        if released {
            self.pool.kick();
        }
        for w in woken {
            w.wake(Status::SUCCESS);
        }
        if fua && st.is_ok() {
            let p = self.parked(idx, COMPLETE);
            self.pool.flush_after_commit(p);
            return;
        }
        if recorded {
            let p = self.parked(idx, COMPLETE);
            self.pool.complete_after_journal_write(p);
            return;
        }
        self.complete_idx(idx, st);
    }

    fn inner_done(&mut self, mut cmd: IoCommand, st: Status) {
        if cmd.tag & WHOLE != 0 {
            let idx = (cmd.tag & !WHOLE) as usize;
            if let Some(c) = self.cmds[idx].as_mut() {
                cmd.fua = c.fua;
                c.cmd = Some(cmd);
            }
            self.put(idx, st);
            return;
        }
        let si = cmd.tag as usize;
        self.put_sg(&mut cmd);
        let Some(sub) = self.subs.get_mut(si).and_then(|s| s.take()) else {
            return;
        };
        self.free_subs.push(si);
        match sub.phase {
            Phase::CowRead {
                dst,
                at,
                sg_off,
                len,
                zero,
            } if st.is_ok() => {
                let Some(b) = sub.bounce else { return };
                let mut sg = self.take_sg();
                if let Some(src) = self.cmds[sub.cmd].as_ref().and_then(|c| c.cmd.as_ref()) {
                    // SAFETY: the bounce buffer is ours and `at + len` lies inside the
                    // cluster; the guest buffers are readable for their length.
                    let dst_slice = unsafe {
                        std::slice::from_raw_parts_mut(
                            b.as_mut_ptr().add(at as usize),
                            len as usize,
                        )
                    };
                    if zero {
                        dst_slice.fill(0);
                    } else {
                        src.sg.slice_into(sg_off, len, &mut sg);
                        // SAFETY: as above.
                        unsafe { sg.copy_to(dst_slice) };
                    }
                }
                let cs = self.pool.cluster_size;
                sg.clear();
                sg.push(b.as_mut_ptr(), cs as usize);
                let ni = self.new_sub(Sub {
                    cmd: sub.cmd,
                    phase: Phase::CowWrite,
                    bounce: Some(b),
                });
                self.inner.submit(IoCommand::new(
                    Opcode::Write,
                    dst / self.ibs,
                    (cs / self.ibs) as u32,
                    ni as u64,
                    sg,
                ));
            }
            _ => {
                if let Some(b) = sub.bounce {
                    if self.bounces.len() < 8 {
                        self.bounces.push(b);
                    }
                }
                self.put(sub.cmd, st);
            }
        }
    }
}

impl BlockQueue for ThinQueue {
    fn submit(&mut self, cmd: IoCommand) {
        self.in_flight += 1;
        let mut c = self.spare.pop().unwrap_or_else(|| Cmd {
            cmd: None,
            slba: 0,
            tag: 0,
            fua: false,
            remaining: 0,
            status: Status::SUCCESS,
            vol: 0,
            whole: false,
            counted: false,
            delayed: false,
            pins: Vec::new(),
            installs: Vec::new(),
            unmaps: Vec::new(),
            allocs: Vec::new(),
            ordered: false,
        });
        c.slba = cmd.slba;
        c.tag = cmd.tag;
        c.fua = cmd.fua;
        c.cmd = Some(cmd);
        c.remaining = 0;
        c.status = Status::SUCCESS;
        c.whole = false;
        c.counted = false;
        c.delayed = false;
        c.pins.clear();
        c.installs.clear();
        c.unmaps.clear();
        c.allocs.clear();
        c.ordered = false;
        let idx = match self.free_cmds.pop() {
            Some(i) => {
                self.cmds[i] = Some(c);
                i
            }
            None => {
                self.cmds.push(Some(c));
                self.cmds.len() - 1
            }
        };
        self.start(idx);
    }

    fn kick(&mut self) {
        self.inner.kick();
        self.wake_self();
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut got = std::mem::take(&mut self.got);
        self.inner.poll(&mut |c, s| got.push((c, s)));
        for (c, s) in got.drain(..) {
            self.inner_done(c, s);
        }
        self.got = got;
        if self.mb.posted.swap(false, Ordering::Acquire) {
            let mut mail = std::mem::take(&mut self.mail);
            mail.append(&mut lock(&self.mb.items));
            for (token, st) in mail.drain(..) {
                let idx = (token >> 2) as usize;
                if token & KIND == COMPLETE {
                    self.complete_idx(idx, st);
                } else if token & KIND == RESUME {
                    self.put(idx, st);
                } else if self.cmds.get(idx).is_some_and(|c| c.is_some()) {
                    self.start(idx);
                }
            }
            self.mail = mail;
        }
        self.inner.kick();
        self.wake_self();
        let n = self.done.len();
        while let Some((c, s)) = self.done.pop_front() {
            done(c, s);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd().or(Some(self.mb.fd.as_raw_fd()))
    }
}

impl ThinQueue {
    /// With an inner queue that completes on poll (memory filesystems), keep the worker
    /// polling while it holds work.
    fn wake_self(&self) {
        if self.own && self.inner.in_flight() > 0 {
            self.mb.signal();
        }
    }
}

impl Drop for ThinQueue {
    fn drop(&mut self) {
        // Let the device finish what it holds (pins protect those clusters), then unpin
        // and unregister whatever is left.
        let deadline = std::time::Instant::now() + self.drain_wait;
        while self.inner.in_flight() > 0 && std::time::Instant::now() < deadline {
            self.poll(&mut |_, _| {});
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        // Commands with pieces still in the device (it stopped answering): their new
        // clusters stay claimed and their pins stay up, so no cluster a write may still
        // land in is ever released, zeroed or handed to another volume; their buffers
        // (bounce buffers, the guest's command) stay allocated, as the inner queue's do.
        let stuck = self.inner.in_flight() > 0;
        let mut leaked = 0;
        let mut s = self.pool.lock_state();
        for c in self.cmds.iter_mut().flatten() {
            for x in c.allocs.drain(..) {
                if let Some(w) = s.allocating.remove(&(c.vol, x)) {
                    for p in w {
                        p.wake(Status::SUCCESS);
                    }
                }
            }
            if stuck && c.remaining > 0 {
                leaked += 1;
                continue;
            }
            for pc in c.pins.drain(..) {
                self.pool.pins[pc as usize].fetch_sub(1, Ordering::AcqRel);
            }
            for (_, nc) in c.installs.drain(..) {
                s.release(nc);
            }
            if std::mem::take(&mut c.counted) {
                self.handle.writes.fetch_sub(1, Ordering::AcqRel);
            }
        }
        drop(s);
        if stuck {
            tracing::error!(
                commands = leaked,
                "thin volume queue dropped while its device still holds I/O: the clusters those commands write stay allocated and pinned, their buffers are kept"
            );
            std::mem::forget(std::mem::take(&mut self.subs));
            std::mem::forget(std::mem::take(&mut self.cmds));
        }
    }
}
