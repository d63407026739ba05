//! The sync thread: probes faulted legs, copies regions to Syncing legs (full copies with
//! a persistent cursor, dirty-region resyncs) and resyncs the dirty regions after a crash.
//! It drives its own queues on the legs synchronously, every wait bounded.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::eventfd::drain_fd;
use nvmux_core::{AlignedBuf, BlockQueue, IoCommand, Opcode, Status};

use crate::{Inner, LegShared, LegState, MAX_LEGS};

/// Longest wait for one command of the sync thread.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Copies of one region retried because guest writes kept moving it.
const MAX_ATTEMPTS: u32 = 200;

/// Attempts at a region copy before new guest writes to it are held back.
const BARRIER_AFTER: u32 = 10;

/// Lifts the write barrier on a region when the copy is over, however it ends.
struct Barrier<'a> {
    inner: &'a Inner,
    set: bool,
}

impl Drop for Barrier<'_> {
    fn drop(&mut self) {
        if self.set {
            self.inner.barrier.store(u64::MAX, SeqCst);
            self.inner.signal_queues();
        }
    }
}

enum Copy {
    Done,
    SrcFail,
    DstFail,
    /// Guest writes kept the region busy, or the thread stops: try later.
    Later,
}

/// The sync thread's own queue on a leg.
type LegQueue = (Arc<LegShared>, Box<dyn BlockQueue>);

struct Syncer {
    inner: Arc<Inner>,
    qs: Vec<Option<LegQueue>>,
    buf: AlignedBuf,
    chunk: u64,
    next_probe: [Option<Instant>; MAX_LEGS],
    pace_next: Instant,
}

pub(crate) fn sync_main(inner: Arc<Inner>) {
    let max_t = (inner.info.max_transfer as u64 / inner.bs * inner.bs).max(inner.bs);
    let chunk = inner.region_size.min(max_t).min(1 << 20);
    let mut s = Syncer {
        buf: AlignedBuf::new(chunk as usize),
        chunk,
        qs: (0..MAX_LEGS).map(|_| None).collect(),
        next_probe: [None; MAX_LEGS],
        pace_next: Instant::now(),
        inner,
    };
    s.run();
}

fn indexed(inner: &Inner) -> Vec<(usize, Arc<LegShared>)> {
    inner
        .legs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.clone().map(|l| (i, l)))
        .collect()
}

impl Syncer {
    fn stopping(&self) -> bool {
        self.inner.shutdown.load(SeqCst)
    }

    fn run(&mut self) {
        let tick = self
            .inner
            .probe_interval
            .clamp(Duration::from_millis(10), Duration::from_millis(100));
        while !self.stopping() {
            let legs = indexed(&self.inner);
            for i in 0..MAX_LEGS {
                let keep = match (&self.qs[i], legs.iter().find(|(j, _)| *j == i)) {
                    (Some((a, _)), Some((_, b))) => Arc::ptr_eq(a, b),
                    _ => false,
                };
                if !keep {
                    self.qs[i] = None;
                }
            }
            let now = Instant::now();
            for (i, l) in &legs {
                if l.state() != LegState::Faulted {
                    self.next_probe[*i] = None;
                    continue;
                }
                match self.next_probe[*i] {
                    None => self.next_probe[*i] = Some(now + self.inner.probe_interval),
                    Some(t) if t <= now => {
                        self.probe(*i, l);
                        self.next_probe[*i] = Some(Instant::now() + self.inner.probe_interval);
                    }
                    Some(_) => {}
                }
            }
            if self.inner.crash_resync.load(SeqCst) && self.crash_resync(&legs) {
                self.inner.crash_resync.store(false, SeqCst);
                self.inner.wake_writer();
            }
            for (i, l) in &legs {
                if self.stopping() {
                    return;
                }
                if l.state() == LegState::Syncing && !l.removing.load(SeqCst) {
                    self.sync_leg(*i, l, &legs);
                }
            }
            self.inner.sync_sleep(tick);
        }
    }

    /// One command on leg `i`'s sync queue over `self.buf[..nlb blocks]`. `None`: the
    /// queue could not be opened or the command timed out (its buffer is then leaked, as
    /// the leg may still write into it).
    fn io(
        &mut self,
        i: usize,
        leg: &Arc<LegShared>,
        op: Opcode,
        slba: u64,
        nlb: u32,
    ) -> Option<Status> {
        if self.qs[i].is_none() {
            match leg.dev.open_queue(4) {
                Ok(q) => self.qs[i] = Some((leg.clone(), q)),
                Err(e) => {
                    tracing::warn!(leg = %leg.name, "mirror sync: cannot open a queue: {e}");
                    return None;
                }
            }
        }
        if !leg.enter() {
            return Some(Status::ABORTED);
        }
        let (_, q) = self.qs[i].as_mut()?;
        let len = nlb as usize * self.inner.bs as usize;
        let cmd = IoCommand::new(op, slba, nlb, 0, self.buf.sg(0, len));
        q.submit(cmd);
        q.kick();
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let mut got = None;
            q.poll(&mut |_, st| got = Some(st));
            if let Some(st) = got {
                leg.leave();
                return Some(st);
            }
            if Instant::now() >= deadline {
                tracing::error!(leg = %leg.name, "mirror sync: a command got no answer in {IO_TIMEOUT:?}");
                // The command stays counted in flight on the leg: it is.
                let old = std::mem::replace(&mut self.buf, AlignedBuf::new(self.chunk as usize));
                std::mem::forget(old);
                if let Some(q) = self.qs[i].take() {
                    std::mem::forget(q);
                }
                return None;
            }
            match q.completion_fd() {
                Some(fd) => {
                    let mut p = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one pollfd on the stack; bounded timeout.
                    unsafe { libc::poll(&mut p, 1, 10) };
                    drain_fd(fd);
                }
                None => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    }

    fn probe(&mut self, i: usize, leg: &Arc<LegShared>) {
        if let Some(st) = self.io(i, leg, Opcode::Read, 0, 1) {
            if st.is_ok()
                && leg
                    .state
                    .compare_exchange(
                        LegState::Faulted as u8,
                        LegState::Syncing as u8,
                        SeqCst,
                        SeqCst,
                    )
                    .is_ok()
            {
                tracing::info!(leg = %leg.name, "mirror leg answers again: resyncing");
                self.inner.table_changed();
            }
        }
    }

    /// Keep copies to `sync_rate` bytes/s.
    fn pace(&mut self, bytes: u64) {
        let rate = self.inner.sync_rate.load(SeqCst);
        if rate == 0 {
            return;
        }
        let now = Instant::now();
        if self.pace_next + Duration::from_millis(100) < now {
            self.pace_next = now;
        }
        self.pace_next += Duration::from_secs_f64(bytes as f64 / rate as f64);
        while !self.stopping() {
            let now = Instant::now();
            if now >= self.pace_next || self.inner.sync_rate.load(SeqCst) == 0 {
                break;
            }
            std::thread::sleep((self.pace_next - now).min(Duration::from_millis(50)));
        }
    }

    /// Copy region `r` from `src` to `dst` without overwriting newer guest data.
    fn copy_region(
        &mut self,
        (si, src): (usize, &Arc<LegShared>),
        (di, dst): (usize, &Arc<LegShared>),
        r: u64,
    ) -> Copy {
        let inner = self.inner.clone();
        let bs = inner.bs;
        let first = r * inner.region_size / bs;
        let end = ((r + 1) * inner.region_size / bs).min(inner.info.num_blocks);
        let step = self.chunk / bs;
        let ri = r as usize;
        let mut bar = Barrier {
            inner: &inner,
            set: false,
        };
        for attempt in 0..MAX_ATTEMPTS {
            if self.stopping() || dst.state() == LegState::Faulted || dst.removing.load(SeqCst) {
                return Copy::Later;
            }
            if attempt >= BARRIER_AFTER && !bar.set {
                // Guest writes keep the region busy: hold new ones back until it is copied.
                inner.barrier.store(r, SeqCst);
                bar.set = true;
            }
            let g0 = inner.gen[ri].load(SeqCst);
            if inner.inflight[ri].load(SeqCst) != 0 {
                std::thread::sleep(Duration::from_micros(200 * (attempt as u64 + 1).min(10)));
                continue;
            }
            let mut lba = first;
            while lba < end {
                let n = (end - lba).min(step) as u32;
                match self.io(si, src, Opcode::Read, lba, n) {
                    Some(st) if st.is_ok() => {}
                    Some(st) if st == Status::ABORTED => return Copy::Later,
                    _ => {
                        src.errors.fetch_add(1, SeqCst);
                        return Copy::SrcFail;
                    }
                }
                match self.io(di, dst, Opcode::Write, lba, n) {
                    Some(st) if st.is_ok() => {}
                    Some(st) if st == Status::ABORTED => return Copy::Later,
                    _ => {
                        dst.errors.fetch_add(1, SeqCst);
                        let v = inner.fault_leg(dst);
                        inner.wait_table(v, Duration::from_secs(10));
                        return Copy::DstFail;
                    }
                }
                lba += n as u64;
            }
            if inner.gen[ri].load(SeqCst) == g0 && inner.inflight[ri].load(SeqCst) == 0 {
                self.pace((end - first) * bs);
                return Copy::Done;
            }
        }
        Copy::Later
    }

    fn source(
        &self,
        legs: &[(usize, Arc<LegShared>)],
        not: usize,
    ) -> Option<(usize, Arc<LegShared>)> {
        legs.iter()
            .find(|(i, l)| *i != not && l.state() == LegState::Healthy && !l.removing.load(SeqCst))
            .cloned()
    }

    fn dirty_list(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (w, word) in self.inner.bits.iter().enumerate() {
            let mut b = word.load(SeqCst);
            while b != 0 {
                v.push(w as u64 * 64 + b.trailing_zeros() as u64);
                b &= b - 1;
            }
        }
        v
    }

    /// Copy to a Syncing leg: the rest of its full copy (from the cursor), then the dirty
    /// regions; then it is Healthy.
    fn sync_leg(&mut self, i: usize, leg: &Arc<LegShared>, legs: &[(usize, Arc<LegShared>)]) {
        let Some((si, src)) = self.source(legs, i) else {
            return;
        };
        let inner = self.inner.clone();
        let regions = inner.regions;
        let cursor = leg.cursor.load(SeqCst).min(regions);
        let full = cursor < regions;
        let dirty = self.dirty_list();
        leg.sync_total.store(
            (regions - cursor + dirty.len() as u64) * inner.region_size,
            SeqCst,
        );
        leg.sync_done.store(0, SeqCst);
        let mut persisted = Instant::now();
        for r in cursor..regions {
            match self.copy_region((si, &src), (i, leg), r) {
                Copy::Done => {
                    leg.cursor.store(r + 1, SeqCst);
                    leg.sync_done.fetch_add(inner.region_size, SeqCst);
                    if persisted.elapsed() >= Duration::from_secs(1) {
                        inner.table_changed();
                        persisted = Instant::now();
                    }
                }
                _ => {
                    inner.table_changed();
                    return;
                }
            }
        }
        if full {
            inner.table_changed();
        }
        // Regions set since the list was taken were written to this leg too (it was
        // Syncing), so one pass over the list taken now suffices.
        for r in self.dirty_list() {
            match self.copy_region((si, &src), (i, leg), r) {
                Copy::Done => {
                    leg.sync_done.fetch_add(inner.region_size, SeqCst);
                    if !full {
                        inner.counters.resynced_regions.fetch_add(1, SeqCst);
                    }
                }
                _ => return,
            }
        }
        if leg
            .state
            .compare_exchange(
                LegState::Syncing as u8,
                LegState::Healthy as u8,
                SeqCst,
                SeqCst,
            )
            .is_ok()
        {
            if full {
                inner.counters.full_copies.fetch_add(1, SeqCst);
            }
            leg.cursor.store(regions, SeqCst);
            leg.sync_done.store(0, SeqCst);
            leg.sync_total.store(0, SeqCst);
            let v = inner.table_changed();
            inner.wait_table(v, Duration::from_secs(10));
            tracing::info!(leg = %leg.name, full, "mirror leg in sync: healthy");
        }
    }

    /// After a crash while mirrored: copy the dirty regions from the first Healthy leg to
    /// the other Healthy legs. True when done.
    fn crash_resync(&mut self, legs: &[(usize, Arc<LegShared>)]) -> bool {
        let Some((si, src)) = self.source(legs, usize::MAX) else {
            return false;
        };
        let targets: Vec<(usize, Arc<LegShared>)> = legs
            .iter()
            .filter(|(i, l)| *i != si && l.state() == LegState::Healthy)
            .cloned()
            .collect();
        for r in self.dirty_list() {
            for (ti, t) in &targets {
                if t.state() != LegState::Healthy {
                    continue;
                }
                match self.copy_region((si, &src), (*ti, t), r) {
                    Copy::Done | Copy::DstFail => {}
                    Copy::SrcFail | Copy::Later => return false,
                }
            }
            self.inner.counters.resynced_regions.fetch_add(1, SeqCst);
        }
        true
    }
}
