//! A mirror queue: one per worker. A slot table (allocated at open) holds each mirrored
//! command with its per-leg sub-commands' SG lists, so steady-state I/O allocates nothing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Instant;

use nvmux_core::eventfd::EventFd;
use nvmux_core::{BlockQueue, IoCommand, Opcode, Result, SgList, Status};

use crate::{Fd, Inner, LegShared, LegState, MAX_LEGS};

struct QLeg {
    leg: Arc<LegShared>,
    q: Box<dyn BlockQueue>,
    /// Sub-commands of this queue outstanding on the leg.
    outstanding: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Idle,
    Write,
    Read,
    Repair,
}

struct Slot {
    cmd: Option<IoCommand>,
    /// SG lists for sub-commands, reused (one per leg).
    spare: Vec<SgList>,
    phase: Phase,
    pending: u32,
    /// Legs that were Healthy when the write was issued.
    healthy_mask: u8,
    ok: bool,
    err: Status,
    /// Leg table version that must be durable before the command is acknowledged.
    table_need: u64,
    /// Regions whose in-flight counts this command holds.
    tracked: Option<(u64, u64)>,
    /// A write issued in solo mode (counted in `solo_writes` until it completes).
    solo: bool,
    tried: u8,
    failed: u8,
    /// Read retry: the regions' summed write generations when the retry was issued, and
    /// whether a write was in flight on them then (a repair may then race a guest write).
    gen0: u32,
    raced: bool,
    /// Legs a repair write went to.
    repaired: u8,
    status: Status,
}

impl Slot {
    fn new() -> Slot {
        let mut spare = Vec::with_capacity(MAX_LEGS);
        for _ in 0..MAX_LEGS {
            spare.push(SgList::with_capacity(8));
        }
        Slot {
            cmd: None,
            spare,
            phase: Phase::Idle,
            pending: 0,
            healthy_mask: 0,
            ok: false,
            err: Status::SUCCESS,
            table_need: 0,
            tracked: None,
            solo: false,
            tried: 0,
            failed: 0,
            gen0: 0,
            raced: false,
            repaired: 0,
            status: Status::SUCCESS,
        }
    }
}

pub(crate) struct MirrorQueue {
    // Dropped first: the leg queues hand back (or leak) their sub-commands before the
    // parent commands' memory in `slots` goes.
    legs: Vec<Option<QLeg>>,
    inner: Arc<Inner>,
    depth: u32,
    seen_version: u64,
    slots: Vec<Slot>,
    free: Vec<u32>,
    backlog: VecDeque<IoCommand>,
    parked: VecDeque<u32>,
    table_wait: VecDeque<u32>,
    /// Writes held back by the sync thread's barrier (not counted in flight yet).
    held: VecDeque<u32>,
    finished: VecDeque<u32>,
    comps: Vec<(u8, IoCommand, Status)>,
    efd: Arc<EventFd>,
    fds_changed: bool,
    kick_mask: u8,
    in_flight: usize,
}

impl MirrorQueue {
    pub(crate) fn new(inner: Arc<Inner>, depth: u32, efd: Arc<EventFd>) -> Result<MirrorQueue> {
        let d = depth as usize;
        let mut legs = Vec::with_capacity(MAX_LEGS);
        legs.resize_with(MAX_LEGS, || None);
        let mut q = MirrorQueue {
            legs,
            inner,
            depth,
            seen_version: 0,
            slots: (0..d).map(|_| Slot::new()).collect(),
            free: (0..depth).rev().collect(),
            backlog: VecDeque::with_capacity(d * 2),
            parked: VecDeque::with_capacity(d),
            table_wait: VecDeque::with_capacity(d),
            held: VecDeque::with_capacity(d),
            finished: VecDeque::with_capacity(d),
            comps: Vec::with_capacity(d * MAX_LEGS + 16),
            efd,
            fds_changed: false,
            kick_mask: 0,
            in_flight: 0,
        };
        q.refresh();
        q.fds_changed = false;
        Ok(q)
    }

    /// Pick up legs added, replaced or removed since the last look (one atomic load when
    /// nothing changed).
    fn refresh(&mut self) {
        let v = self.inner.legs_version.load(SeqCst);
        if v == self.seen_version {
            return;
        }
        let mut complete = true;
        let slots = self.inner.legs.read().unwrap_or_else(|e| e.into_inner());
        for (i, cur) in slots.iter().enumerate() {
            let same = match (&self.legs[i], cur) {
                (Some(q), Some(l)) => Arc::ptr_eq(&q.leg, l),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            if self.legs[i].as_ref().is_some_and(|q| q.outstanding > 0) {
                complete = false;
                continue;
            }
            self.legs[i] = None;
            self.fds_changed = true;
            if let Some(l) = cur {
                match l.dev.open_queue(self.depth) {
                    Ok(q) => {
                        self.legs[i] = Some(QLeg {
                            leg: l.clone(),
                            q,
                            outstanding: 0,
                        })
                    }
                    Err(e) => {
                        tracing::error!(leg = %l.name, "mirror: cannot open a queue on the leg: {e}");
                        self.inner.fault_leg(l);
                    }
                }
            }
        }
        drop(slots);
        if complete {
            self.seen_version = v;
        }
    }

    fn finish(&mut self, s: u32, st: Status) {
        let slot = &mut self.slots[s as usize];
        slot.status = st;
        slot.phase = Phase::Idle;
        if slot.table_need > self.inner.table_durable.load(SeqCst) {
            self.table_wait.push_back(s);
        } else {
            self.finished.push_back(s);
        }
    }

    fn start(&mut self, s: u32, cmd: IoCommand) {
        let info = &self.inner.info;
        let slot = &mut self.slots[s as usize];
        slot.ok = false;
        slot.err = Status::SUCCESS;
        slot.table_need = 0;
        slot.tracked = None;
        slot.tried = 0;
        slot.failed = 0;
        slot.raced = false;
        slot.repaired = 0;
        slot.pending = 0;
        slot.healthy_mask = 0;
        let op = cmd.opcode;
        // Solo: the frontend checked the range against the live size and the leg checks
        // again; the mirror's own size is fixed only once it has a bitmap.
        let bad = if op == Opcode::Flush || self.inner.solo.load(SeqCst) {
            None
        } else if cmd.nlb == 0
            || cmd
                .slba
                .checked_add(cmd.nlb as u64)
                .is_none_or(|e| e > info.num_blocks)
        {
            Some(Status::LBA_OUT_OF_RANGE)
        } else if op.has_data() && cmd.sg.len() != cmd.nlb as u64 * info.block_size as u64 {
            Some(Status::DATA_TRANSFER_ERROR)
        } else if (op == Opcode::Deallocate && !info.discard)
            || (op == Opcode::WriteZeroes && !info.write_zeroes)
        {
            // Not offered: refused here, so that no leg is faulted for refusing it.
            Some(Status::INVALID_OPCODE)
        } else {
            None
        };
        let (slba, nlb) = (cmd.slba, cmd.nlb);
        slot.cmd = Some(cmd);
        if let Some(st) = bad {
            self.finish(s, st);
            return;
        }
        match op {
            Opcode::Read => self.issue_read(s),
            Opcode::Flush => self.issue_write(s),
            _ => self.begin_write(s, slba, nlb),
        }
    }

    /// True while the sync thread holds back new writes to one of regions `a..=b` (a copy
    /// that guest writes kept from finishing).
    fn barred(&self, a: u64, b: u64) -> bool {
        let br = self.inner.barrier.load(SeqCst);
        br != u64::MAX && a <= br && br <= b
    }

    /// A write-like command: held while its region is barred; else its regions counted in
    /// flight, and issued once their bits are durable.
    fn begin_write(&mut self, s: u32, slba: u64, nlb: u32) {
        {
            {
                let inner = &*self.inner;
                if inner.solo.load(SeqCst) {
                    // Counted first, then `solo` looked at again: `unsolo` either sees
                    // this write in `solo_writes` or this queue sees `solo` cleared.
                    inner.solo_writes.fetch_add(1, SeqCst);
                    if inner.solo.load(SeqCst) {
                        self.slots[s as usize].solo = true;
                        self.issue_write(s);
                        return;
                    }
                    inner.solo_writes.fetch_sub(1, SeqCst);
                }
                let (a, b) = inner.regions_of(slba, nlb);
                if self.barred(a, b) {
                    self.held.push_back(s);
                    return;
                }
                let mut all = true;
                for r in a..=b {
                    inner.inflight[r as usize].fetch_add(1, SeqCst);
                    inner.gen[r as usize].fetch_add(1, SeqCst);
                    if !inner.is_durable(r) {
                        inner.set_bit(r);
                        all = false;
                    }
                }
                self.slots[s as usize].tracked = Some((a, b));
                if all {
                    self.issue_write(s);
                } else if inner.shutdown.load(SeqCst) {
                    self.untrack(s);
                    self.finish(s, Status::WRITE_FAULT);
                } else {
                    self.parked.push_back(s);
                    inner.wake_writer();
                }
            }
        }
    }

    fn any_healthy(&self) -> bool {
        self.legs
            .iter()
            .flatten()
            .any(|q| q.leg.state() == LegState::Healthy && !q.leg.removing.load(SeqCst))
    }

    /// Send a write-like command (or a flush) to every Healthy and Syncing leg.
    fn issue_write(&mut self, s: u32) {
        if !self.any_healthy() {
            self.untrack(s);
            self.finish(s, Status::WRITE_FAULT);
            return;
        }
        let slot = &mut self.slots[s as usize];
        let Some(cmd) = slot.cmd.as_ref() else {
            return;
        };
        slot.phase = Phase::Write;
        let mut pending = 0;
        let mut healthy = 0u8;
        for (i, ql) in self.legs.iter_mut().enumerate() {
            let Some(ql) = ql else { continue };
            let st = ql.leg.state();
            if st == LegState::Faulted || !ql.leg.enter() {
                continue;
            }
            if st == LegState::Healthy {
                healthy |= 1 << i;
            }
            let mut sg = slot.spare.pop().unwrap_or_else(SgList::empty);
            cmd.sg.slice_into(0, cmd.sg.len(), &mut sg);
            let mut sub = IoCommand::new(cmd.opcode, cmd.slba, cmd.nlb, s as u64, sg);
            sub.fua = cmd.fua;
            ql.q.submit(sub);
            ql.outstanding += 1;
            pending += 1;
            self.kick_mask |= 1 << i;
        }
        slot.pending = pending;
        slot.healthy_mask = healthy;
        if pending == 0 {
            self.complete_write(s);
        }
    }

    /// Send a read to the least busy Healthy leg not tried yet.
    fn issue_read(&mut self, s: u32) {
        let inner = &*self.inner;
        let slot = &mut self.slots[s as usize];
        let Some(cmd) = slot.cmd.as_ref() else {
            return;
        };
        // Regions still to be resynced after a crash are read from the source only.
        let source_only = inner.crash_resync.load(SeqCst) && {
            let (a, b) = inner.regions_of(cmd.slba, cmd.nlb);
            (a..=b).any(|r| inner.is_dirty(r))
        };
        loop {
            let mut best: Option<usize> = None;
            for (i, ql) in self.legs.iter().enumerate() {
                let Some(ql) = ql else { continue };
                if slot.tried & (1 << i) != 0
                    || ql.leg.state() != LegState::Healthy
                    || ql.leg.removing.load(SeqCst)
                {
                    continue;
                }
                if source_only {
                    best = Some(i);
                    break;
                }
                if best.is_none_or(|b| {
                    self.legs[b]
                        .as_ref()
                        .is_some_and(|bq| ql.outstanding < bq.outstanding)
                }) {
                    best = Some(i);
                }
            }
            let Some(i) = best else {
                let st = if slot.err.is_ok() {
                    Status::UNRECOVERED_READ
                } else {
                    slot.err
                };
                self.finish(s, st);
                return;
            };
            slot.tried |= 1 << i;
            let Some(ql) = self.legs[i].as_mut() else {
                continue;
            };
            if !ql.leg.enter() {
                continue;
            }
            let mut sg = slot.spare.pop().unwrap_or_else(SgList::empty);
            cmd.sg.slice_into(0, cmd.sg.len(), &mut sg);
            let sub = IoCommand::new(Opcode::Read, cmd.slba, cmd.nlb, s as u64, sg);
            ql.q.submit(sub);
            ql.outstanding += 1;
            slot.pending = 1;
            slot.phase = Phase::Read;
            self.kick_mask |= 1 << i;
            return;
        }
    }

    /// Write the data a retried read got back to the legs that failed to read it.
    fn issue_repair(&mut self, s: u32) {
        let slot = &mut self.slots[s as usize];
        let Some(cmd) = slot.cmd.as_ref() else {
            return;
        };
        slot.phase = Phase::Repair;
        slot.pending = 0;
        for (i, ql) in self.legs.iter_mut().enumerate() {
            let Some(ql) = ql else { continue };
            if slot.failed & (1 << i) == 0 || ql.leg.state() != LegState::Healthy || !ql.leg.enter()
            {
                continue;
            }
            let mut sg = slot.spare.pop().unwrap_or_else(SgList::empty);
            cmd.sg.slice_into(0, cmd.sg.len(), &mut sg);
            let sub = IoCommand::new(Opcode::Write, cmd.slba, cmd.nlb, s as u64, sg);
            ql.q.submit(sub);
            ql.outstanding += 1;
            slot.repaired |= 1 << i;
            slot.pending += 1;
            self.kick_mask |= 1 << i;
        }
        if slot.pending == 0 {
            self.finish(s, Status::SUCCESS);
        }
    }

    fn untrack(&mut self, s: u32) {
        if std::mem::take(&mut self.slots[s as usize].solo) {
            self.inner.solo_writes.fetch_sub(1, SeqCst);
        }
        if let Some((a, b)) = self.slots[s as usize].tracked.take() {
            let inner = &*self.inner;
            let now = inner.now_ms();
            for r in a..=b {
                inner.last_write[r as usize].store(now, SeqCst);
                inner.inflight[r as usize].fetch_sub(1, SeqCst);
            }
        }
    }

    fn complete_write(&mut self, s: u32) {
        self.untrack(s);
        let slot = &self.slots[s as usize];
        let st = if slot.ok {
            Status::SUCCESS
        } else if !slot.err.is_ok() {
            slot.err
        } else {
            Status::WRITE_FAULT
        };
        self.finish(s, st);
    }

    fn handle(&mut self, i: usize, mut sub: IoCommand, st: Status) {
        let s = sub.tag as u32;
        let Some(ql) = self.legs[i].as_mut() else {
            return;
        };
        ql.outstanding = ql.outstanding.saturating_sub(1);
        ql.leg.leave();
        let leg = ql.leg.clone();
        let Some(slot) = self.slots.get_mut(s as usize) else {
            return;
        };
        sub.sg.clear();
        if slot.spare.len() < slot.spare.capacity() {
            slot.spare
                .push(std::mem::replace(&mut sub.sg, SgList::empty()));
        }
        let inner = self.inner.clone();
        match slot.phase {
            Phase::Write => {
                if st.is_ok() {
                    if slot.healthy_mask & (1 << i) != 0 {
                        slot.ok = true;
                    }
                } else {
                    leg.errors.fetch_add(1, SeqCst);
                    slot.err = st;
                    // Solo, the one leg is all there is: its error goes to the guest as
                    // it is, and the leg stays (a file's or pool's own failed state
                    // decides what comes next).
                    if !slot.solo && !inner.solo.load(SeqCst) {
                        slot.table_need = slot.table_need.max(inner.fault_leg(&leg));
                    }
                }
                slot.pending = slot.pending.saturating_sub(1);
                if slot.pending == 0 {
                    self.complete_write(s);
                }
            }
            Phase::Read => {
                slot.pending = 0;
                if st.is_ok() {
                    if slot.failed != 0 {
                        self.issue_repair(s);
                    } else {
                        self.finish(s, Status::SUCCESS);
                    }
                } else {
                    leg.errors.fetch_add(1, SeqCst);
                    inner.counters.read_retries.fetch_add(1, SeqCst);
                    slot.failed |= 1 << i;
                    slot.err = st;
                    // What the retry reads is what a repair writes back: note the writes
                    // that could race with it (see `repair_done`).
                    let (g, busy) = self.region_gens(s);
                    let slot = &mut self.slots[s as usize];
                    slot.gen0 = g;
                    slot.raced |= busy;
                    self.issue_read(s);
                }
            }
            Phase::Repair => {
                if st.is_ok() {
                    inner.counters.read_repairs.fetch_add(1, SeqCst);
                } else {
                    leg.errors.fetch_add(1, SeqCst);
                    slot.table_need = slot.table_need.max(inner.fault_leg(&leg));
                }
                slot.pending = slot.pending.saturating_sub(1);
                if slot.pending == 0 {
                    self.repair_done(s);
                }
            }
            Phase::Idle => {}
        }
    }

    /// The summed write generations of a command's regions, and whether a write is in
    /// flight on them.
    fn region_gens(&self, s: u32) -> (u32, bool) {
        let inner = &*self.inner;
        let Some(cmd) = self.slots[s as usize].cmd.as_ref() else {
            return (0, false);
        };
        let (a, b) = inner.regions_of(cmd.slba, cmd.nlb);
        let mut g = 0u32;
        let mut busy = false;
        for r in a..=b {
            g = g.wrapping_add(inner.gen[r as usize].load(SeqCst));
            busy |= inner.inflight[r as usize].load(SeqCst) != 0;
        }
        (g, busy)
    }

    /// A repair write that may have raced a guest write of the same regions (one was in
    /// flight, or issued, since the retry read) may have left older data on the repaired
    /// leg: fault that leg, so that it resyncs those regions (their bits stay set: no bit
    /// clears while a leg is faulted). Rare: a guest reading and writing the same blocks
    /// at once while a leg fails reads.
    fn repair_done(&mut self, s: u32) {
        let (g, busy) = self.region_gens(s);
        let slot = &self.slots[s as usize];
        if slot.raced || busy || g != slot.gen0 {
            let mask = slot.repaired;
            let mut need = slot.table_need;
            for (i, ql) in self.legs.iter().enumerate() {
                if let Some(ql) = ql.as_ref().filter(|_| mask & (1 << i) != 0) {
                    tracing::warn!(leg = %ql.leg.name, "mirror: a read repair raced a write; resyncing the leg");
                    need = need.max(self.inner.fault_leg(&ql.leg));
                }
            }
            self.slots[s as usize].table_need = need;
        }
        self.finish(s, Status::SUCCESS);
    }

    fn kick_legs(&mut self) {
        let m = std::mem::take(&mut self.kick_mask);
        if m == 0 {
            return;
        }
        for (i, ql) in self.legs.iter_mut().enumerate() {
            if m & (1 << i) != 0 {
                if let Some(ql) = ql {
                    ql.q.kick();
                }
            }
        }
    }

    fn start_backlog(&mut self) {
        while !self.backlog.is_empty() {
            let Some(s) = self.free.pop() else { break };
            if let Some(c) = self.backlog.pop_front() {
                self.start(s, c);
            }
        }
    }

    /// Parked writes whose bits are durable now go; with the bitmap failing they fail.
    fn release_parked(&mut self) {
        for _ in 0..self.held.len() {
            let Some(s) = self.held.pop_front() else {
                break;
            };
            let Some((slba, nlb)) = self.slots[s as usize].cmd.as_ref().map(|c| (c.slba, c.nlb))
            else {
                continue;
            };
            self.begin_write(s, slba, nlb);
        }
        let failed = self.inner.bitmap_failed.load(SeqCst) || self.inner.shutdown.load(SeqCst);
        for _ in 0..self.parked.len() {
            let Some(s) = self.parked.pop_front() else {
                break;
            };
            let ready = match self.slots[s as usize].tracked {
                Some((a, b)) => (a..=b).all(|r| self.inner.is_durable(r)),
                None => true,
            };
            if ready {
                self.issue_write(s);
            } else if failed {
                self.untrack(s);
                self.finish(s, Status::WRITE_FAULT);
            } else {
                self.parked.push_back(s);
            }
        }
        let td = self.inner.table_durable.load(SeqCst);
        for _ in 0..self.table_wait.len() {
            let Some(s) = self.table_wait.pop_front() else {
                break;
            };
            if self.slots[s as usize].table_need <= td {
                self.finished.push_back(s);
            } else if failed {
                self.slots[s as usize].status = Status::WRITE_FAULT;
                self.finished.push_back(s);
            } else {
                self.table_wait.push_back(s);
            }
        }
    }
}

impl BlockQueue for MirrorQueue {
    fn submit(&mut self, cmd: IoCommand) {
        self.refresh();
        self.in_flight += 1;
        match self.free.pop() {
            Some(s) if self.backlog.is_empty() => self.start(s, cmd),
            Some(s) => {
                self.free.push(s);
                self.backlog.push_back(cmd);
            }
            None => self.backlog.push_back(cmd),
        }
    }

    fn kick(&mut self) {
        self.kick_legs();
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        self.efd.drain();
        self.refresh();
        let mut comps = std::mem::take(&mut self.comps);
        for (i, ql) in self.legs.iter_mut().enumerate() {
            if let Some(ql) = ql {
                if ql.outstanding > 0 || ql.q.in_flight() > 0 {
                    ql.q.poll(&mut |c, st| comps.push((i as u8, c, st)));
                }
            }
        }
        for (i, c, st) in comps.drain(..) {
            self.handle(i as usize, c, st);
        }
        self.comps = comps;
        if !self.parked.is_empty() || !self.table_wait.is_empty() || !self.held.is_empty() {
            self.release_parked();
        }
        let mut n = 0;
        loop {
            while let Some(s) = self.finished.pop_front() {
                let slot = &mut self.slots[s as usize];
                let st = slot.status;
                if let Some(cmd) = slot.cmd.take() {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    n += 1;
                    done(cmd, st);
                }
                self.free.push(s);
            }
            self.start_backlog();
            if self.finished.is_empty() {
                break;
            }
        }
        self.kick_legs();
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn completion_fd(&self) -> Option<Fd> {
        Some(self.efd.as_raw_fd())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.legs
            .iter()
            .flatten()
            .filter_map(|q| q.q.next_deadline())
            .min()
    }

    fn wait_fds(&self, out: &mut Vec<Fd>) {
        // Always, also while solo: a layer above may wake this queue through it (the
        // fair-share group signals `completion_fd`).
        out.push(self.efd.as_raw_fd());
        for q in self.legs.iter().flatten() {
            q.q.wait_fds(out);
        }
    }

    fn take_fds_changed(&mut self) -> bool {
        let mut c = std::mem::take(&mut self.fds_changed);
        for q in self.legs.iter_mut().flatten() {
            c |= q.q.take_fds_changed();
        }
        c
    }

    /// While any leg's backend pays for it (a local file leg under an RBD disk does).
    fn busy_poll(&self) -> bool {
        self.legs.iter().flatten().any(|q| q.q.busy_poll())
    }

    fn may_sleep(&self) -> bool {
        self.finished.is_empty()
            && (self.backlog.is_empty() || self.free.is_empty())
            && self.legs.iter().flatten().all(|q| q.q.may_sleep())
    }
}

impl Drop for MirrorQueue {
    fn drop(&mut self) {
        // The leg queues first: they hand back or leak their sub-commands.
        for ql in self.legs.iter_mut() {
            if let Some(q) = ql.take() {
                for _ in 0..q.outstanding {
                    q.leg.leave();
                }
            }
        }
        for s in 0..self.slots.len() as u32 {
            self.untrack(s);
        }
    }
}
