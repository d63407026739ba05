//! Fair sharing of one backend between the disks on it, without a lock per command:
//! per-queue slot credit, and a periodic exchange that sets each queue's quota of slots
//! by weight and measured service.
//!
//! A [`ShareGroup`] stands for one backend device (the daemon makes one per host device
//! that holds disk files or pool files). It lets at most `depth` commands of its disks be
//! in flight at once: the group owns `depth` slots, and every slot is at any time either
//! `free` (an atomic counter in the group) or held by exactly one queue (its local
//! `credit` for unused slots, plus its commands in flight).
//!
//! * **Uncontended** (no queue waits for a slot): a queue takes slots from `free` when
//!   it needs them (a few at a time, one atomic compare-and-swap), keeps them as credit
//!   while it has commands in flight, and reuses them for its next commands with no
//!   atomic at all. When it goes idle it parks its credit in an atomic of its own
//!   (`parked`, on its own cache line), and takes it back at its next command. Nobody
//!   waits, so nothing else happens.
//! * **Contended** (a queue found `free` empty and has commands waiting; the group's
//!   `hungry` count is then non-zero): each queue may hold at most its **quota** of
//!   slots. A queue over its quota gives slots back to `free` as its commands complete; a
//!   queue under it takes them. Idle credit goes back at once.
//! * **The exchange** runs every `period` completions of a queue (and when a queue
//!   starts to wait), on whichever worker gets there first (`try_lock`: nobody ever
//!   waits for it). It reclaims parked credit, and sets the quotas: the `depth` slots
//!   are divided among the queues with commands to run in proportion to
//!   `weight / service per slot`, capped at what each queue can use (water-filling).
//!   "Service per slot" is the queue's measured cost completed per slot held since the
//!   last exchange (smoothed), so a disk whose commands are slower or costlier gets more
//!   slots, and under saturation each disk's *service* (cost completed) follows its
//!   weight, not its slot count: the guarantee SFQ(D) gives, reached by feedback instead
//!   of a per-command tag. A disk's weight is split among its queues that have work.
//!   Fractional quotas (2 slots split 1:3) are dithered across exchanges, with the
//!   remainder carried, so they hold on average.
//! * An idle disk banks no credit: its smoothed rate is forgotten when it goes idle, and
//!   it re-enters with an equal share.
//!
//! A command's cost models the device's work: `1 + bytes / 32 KiB`, so a 4 KiB command
//! costs 1.125 and a 128 KiB one 5.
//!
//! A queue that waits with nothing in flight has no completion to wake it: it is marked
//! `sleeping`, and a queue that returns slots to `free` while one sleeps wakes it through
//! its completion eventfd (which its worker watches in `epoll_wait`). That wake-up takes
//! the group's registry lock; it happens only under contention, when a starved queue
//! sleeps, never per command.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nvmux_core::{Error, ErrorKind, Result};

/// Weights run from 1 to 10000; 100 is the default.
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 10_000;

pub fn check_weight(w: u32) -> Result<()> {
    if (1..=MAX_WEIGHT).contains(&w) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("weight {w} is out of range (1..={MAX_WEIGHT})"),
        ))
    }
}

/// The cost of a command of `bytes` bytes, in units of a small command.
pub fn cost(bytes: u64) -> f64 {
    1.0 + bytes as f64 / 32768.0
}

/// Cost in fixed point (1/1024 of a small command), as the queues count it.
fn cost_fixed(bytes: u64) -> u64 {
    1024 + bytes / 32
}

/// How far (in cost units of 1/1024 small command per unit of weight) a queue's service
/// may fall behind or run ahead of the others' before the excess is forgotten: 32 small
/// commands at weight 100. The share correction doubles per `LAG_SCALE` behind.
const MAX_LAG: f64 = 32.0 * 1024.0 / 100.0;
const LAG_SCALE: f64 = 8.0 * 1024.0 / 100.0;

/// How long the measured service rates remember (2 ms).
const RATE_TAU_NS: f64 = 2e6;

/// A monotonic clock in nanoseconds (read once per exchange, not per command). Tests run
/// on simulated time.
#[cfg(not(test))]
fn now_ns() -> u64 {
    use std::sync::OnceLock;
    static T0: OnceLock<std::time::Instant> = OnceLock::new();
    T0.get_or_init(std::time::Instant::now).elapsed().as_nanos() as u64
}
#[cfg(test)]
thread_local!(static SIM_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
#[cfg(test)]
fn now_ns() -> u64 {
    SIM_NS.with(|t| t.get())
}

/// One backend shared by several disks.
pub struct ShareGroup {
    name: String,
    depth: u32,
    /// Slots held by no queue.
    free: AtomicU32,
    /// Queues with commands waiting for a slot (non-zero: contended).
    hungry: AtomicU32,
    /// Queues waiting with nothing in flight, to be woken when slots come back.
    sleepers: AtomicU32,
    reg: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    /// Indexed by member id; `None` for a member that left.
    members: Vec<Option<Arc<MemberShared>>>,
    queues: Vec<Entry>,
    /// When the exchange last ran (`now_ns`).
    last_ns: u64,
    // The exchange's scratch space, kept so that it does not allocate once warm.
    active: Vec<u32>,
    share: Vec<f64>,
    cap: Vec<f64>,
    alloc: Vec<f64>,
    done: Vec<bool>,
}

/// The exchange's own view of a queue.
struct Entry {
    q: Arc<QueueShared>,
    /// `served` at the last exchange.
    last_served: u64,
    /// Smoothed service per slot held (cost units per slot per exchange); 0: unknown.
    rate: f64,
    /// Dithering remainder of the quota.
    carry: f64,
    /// `held` at the last exchange.
    last_held: f64,
    /// The queue's weight (its disk's, split among the disk's busy queues).
    weight: f64,
    /// Service received over weight (cost units per unit of weight) while busy; NaN:
    /// idle, it re-enters at the others' mean.
    norm: f64,
}

struct MemberShared {
    weight: AtomicU32,
    /// Counters of the disk's queues that have gone.
    started: AtomicU64,
    waited: AtomicU64,
}

/// What a queue publishes for the exchange, and its quota. Written by the queue's worker
/// (once per batch), read by the exchange.
struct QueueShared {
    member: usize,
    quota: AtomicU32,
    /// Credit the queue parked when it went idle; the exchange may reclaim it.
    parked: AtomicU32,
    /// Commands in flight and waiting, as of the queue's last batch.
    in_flight: AtomicU32,
    waiting: AtomicU32,
    /// Slots held (credit plus in flight), as of the last batch.
    held: AtomicU32,
    /// Cumulative cost completed (fixed point), commands started and how many waited.
    served: AtomicU64,
    started: AtomicU64,
    waited: AtomicU64,
    sleeping: AtomicBool,
    wake: Option<RawFd>,
}

/// A disk's fair-sharing counters.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ShareStats {
    /// The host device (major:minor).
    pub group: String,
    pub depth: u32,
    pub weight: u32,
    /// Commands started, and how many of them waited for a slot.
    pub started: u64,
    pub waited: u64,
    /// The whole group now: commands in flight and commands waiting.
    pub group_in_flight: u32,
    pub group_waiting: u32,
}

impl ShareGroup {
    /// `depth`: how many commands of the group's disks may be in flight at once.
    pub fn new(name: impl Into<String>, depth: u32) -> Arc<ShareGroup> {
        let depth = depth.max(1);
        Arc::new(ShareGroup {
            name: name.into(),
            depth,
            free: AtomicU32::new(depth),
            hungry: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            reg: Mutex::new(Registry::default()),
        })
    }

    /// Add a disk with `weight`.
    pub fn join(self: &Arc<Self>, weight: u32) -> Result<Arc<Share>> {
        check_weight(weight)?;
        let mut reg = self.lock();
        let m = Arc::new(MemberShared {
            weight: AtomicU32::new(weight),
            started: AtomicU64::new(0),
            waited: AtomicU64::new(0),
        });
        let id = match reg.members.iter().position(Option::is_none) {
            Some(i) => {
                reg.members[i] = Some(m.clone());
                i
            }
            None => {
                reg.members.push(Some(m.clone()));
                reg.members.len() - 1
            }
        };
        Ok(Arc::new(Share {
            group: self.clone(),
            id,
            member: m,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commands in flight (by the queues' last batches) and queues waiting.
    #[cfg(test)]
    fn load(&self) -> (u32, u32) {
        let reg = self.lock();
        let f: u32 = reg
            .queues
            .iter()
            .map(|e| e.q.in_flight.load(Ordering::Relaxed))
            .sum();
        (f, self.hungry.load(Ordering::Relaxed))
    }

    /// Take up to `n` free slots; returns how many were taken.
    fn take_free(&self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let mut cur = self.free.load(Ordering::Relaxed);
        loop {
            let t = cur.min(n);
            if t == 0 {
                return 0;
            }
            match self
                .free
                .compare_exchange_weak(cur, cur - t, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return t,
                Err(c) => cur = c,
            }
        }
    }

    /// Give `n` slots back, and wake the queues that wait with nothing in flight.
    fn give_back(&self, n: u32) {
        if n == 0 {
            return;
        }
        // SeqCst with the sleeper's `sleepers` increment then `free` load: one of the two
        // sides sees the other.
        self.free.fetch_add(n, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            wake_sleepers(self, &self.lock());
        }
    }

    /// The periodic exchange: reclaim parked credit and set every queue's quota. Skipped
    /// when another thread is at it.
    fn exchange(&self) {
        let mut reg = match self.reg.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let reg = &mut *reg;
        let depth = self.depth;
        if self.hungry.load(Ordering::Acquire) == 0 {
            for e in &mut reg.queues {
                e.q.quota.store(depth, Ordering::Relaxed);
                e.last_served = e.q.served.load(Ordering::Relaxed);
            }
            return;
        }
        let mut reclaimed = 0;
        for e in &reg.queues {
            reclaimed += e.q.parked.swap(0, Ordering::AcqRel);
        }
        if reclaimed > 0 {
            self.free.fetch_add(reclaimed, Ordering::AcqRel);
        }
        // Queues with work, per member (a disk's weight is split among them).
        let mut active = std::mem::take(&mut reg.active);
        active.clear();
        active.resize(reg.members.len(), 0);
        for e in &reg.queues {
            let q = &e.q;
            if q.in_flight.load(Ordering::Relaxed) + q.waiting.load(Ordering::Relaxed) > 0 {
                if let Some(a) = active.get_mut(q.member) {
                    *a += 1;
                }
            }
        }
        // Service per slot and second since the last exchange, smoothed over `RATE_TAU`,
        // and each queue's normalized service (cost / weight) against the others'.
        let now = now_ns();
        let dt = now.saturating_sub(reg.last_ns) as f64;
        reg.last_ns = now;
        let alpha = (dt / RATE_TAU_NS).min(1.0);
        let (mut sum_rate, mut n_rate, mut sum_norm, mut n_busy) = (0.0, 0, 0.0, 0);
        for e in &mut reg.queues {
            let q = &e.q;
            let served = q.served.load(Ordering::Relaxed);
            let delta = served.saturating_sub(e.last_served) as f64;
            e.last_served = served;
            // Slots held over the interval: the mean of its two ends.
            let now_held = q.held.load(Ordering::Relaxed) as f64;
            let held = (now_held + e.last_held) / 2.0;
            e.last_held = now_held;
            let busy = q.in_flight.load(Ordering::Relaxed) + q.waiting.load(Ordering::Relaxed);
            let n = active.get(q.member).copied().unwrap_or(0).max(1);
            e.weight = match reg.members.get(q.member) {
                Some(Some(m)) => m.weight.load(Ordering::Relaxed) as f64 / n as f64,
                _ => 0.0,
            };
            if busy == 0 || e.weight == 0.0 {
                // Idle: forget; it re-enters level with the others (no credit banked).
                e.rate = 0.0;
                e.norm = f64::NAN;
                continue;
            }
            if held > 0.0 && dt > 0.0 {
                let r = delta / held / dt;
                e.rate = if e.rate == 0.0 {
                    r
                } else {
                    (1.0 - alpha) * e.rate + alpha * r
                };
            }
            if e.rate > 0.0 {
                sum_rate += e.rate;
                n_rate += 1;
            }
            if !e.norm.is_nan() {
                e.norm += delta / e.weight;
                sum_norm += e.norm;
                n_busy += 1;
            }
        }
        let mean_rate = if n_rate > 0 {
            sum_rate / n_rate as f64
        } else {
            1.0
        };
        let mean_norm = if n_busy > 0 {
            sum_norm / n_busy as f64
        } else {
            0.0
        };
        // Each busy queue's claim: weight / service per slot (the share that gives equal
        // service per weight), corrected by how far it is behind or ahead of the others
        // (which removes what the rate estimate gets wrong), capped at what it can use.
        let (mut share, mut cap) = (std::mem::take(&mut reg.share), std::mem::take(&mut reg.cap));
        share.clear();
        cap.clear();
        for e in &mut reg.queues {
            let q = &e.q;
            let want = q.in_flight.load(Ordering::Relaxed) + q.waiting.load(Ordering::Relaxed);
            cap.push(want as f64);
            if want == 0 || e.weight == 0.0 {
                share.push(0.0);
                continue;
            }
            if e.norm.is_nan() {
                e.norm = mean_norm;
            }
            // No more than `MAX_LAG` of history either way.
            e.norm = e.norm.clamp(mean_norm - MAX_LAG, mean_norm + MAX_LAG);
            let lag = (mean_norm - e.norm) / LAG_SCALE;
            let rate = if e.rate > 0.0 { e.rate } else { mean_rate };
            share.push(e.weight / rate * lag.exp2().clamp(0.25, 4.0));
        }
        let (mut alloc, mut done) = (
            std::mem::take(&mut reg.alloc),
            std::mem::take(&mut reg.done),
        );
        water_fill(depth as f64, &share, &cap, &mut alloc, &mut done);
        for (e, &a) in reg.queues.iter_mut().zip(alloc.iter()) {
            let x = a + e.carry;
            let quota = x.floor().max(0.0);
            e.carry = (x - quota).clamp(-1.0, 1.0);
            if a == 0.0 {
                e.carry = 0.0;
            }
            e.q.quota.store(quota as u32, Ordering::Relaxed);
        }
        (reg.active, reg.share, reg.cap, reg.alloc, reg.done) = (active, share, cap, alloc, done);
        // Quotas changed and slots may be free: a queue asleep may use them now.
        if self.free.load(Ordering::SeqCst) > 0 && self.sleepers.load(Ordering::SeqCst) > 0 {
            wake_sleepers(self, reg);
        }
    }
}

/// Wake every queue that waits with nothing in flight (the caller holds the registry).
fn wake_sleepers(g: &ShareGroup, reg: &Registry) {
    for e in &reg.queues {
        if e.q.sleeping.swap(false, Ordering::AcqRel) {
            g.sleepers.fetch_sub(1, Ordering::AcqRel);
            e.q.signal();
        }
    }
}

/// Divide `total` among claims in proportion to `share`, none above its `cap`.
fn water_fill(total: f64, share: &[f64], cap: &[f64], out: &mut Vec<f64>, done: &mut Vec<bool>) {
    out.clear();
    out.resize(share.len(), 0.0);
    done.clear();
    done.resize(share.len(), false);
    let mut left = total;
    for (i, s) in share.iter().enumerate() {
        if *s <= 0.0 {
            done[i] = true;
        }
    }
    for _ in 0..share.len() {
        let sum: f64 = (0..share.len())
            .filter(|&i| !done[i])
            .map(|i| share[i])
            .sum();
        if sum <= 0.0 || left <= 0.0 {
            break;
        }
        let mut capped = false;
        for i in 0..share.len() {
            if !done[i] && left * share[i] / sum >= cap[i] {
                out[i] = cap[i];
                done[i] = true;
                capped = true;
            }
        }
        if capped {
            left = total - out.iter().sum::<f64>();
            continue;
        }
        for i in 0..share.len() {
            if !done[i] {
                out[i] = left * share[i] / sum;
            }
        }
        break;
    }
}

impl QueueShared {
    fn signal(&self) {
        // The fd belongs to the queue, which removes itself from the registry (under its
        // lock, which the caller holds) before the fd is closed.
        if let Some(fd) = self.wake {
            nvmux_core::eventfd::signal_fd(fd);
        }
    }
}

/// One disk's membership of a group.
pub struct Share {
    group: Arc<ShareGroup>,
    id: usize,
    member: Arc<MemberShared>,
}

impl Share {
    pub fn stats(&self) -> ShareStats {
        let reg = self.group.lock();
        let mut s = ShareStats {
            group: self.group.name.clone(),
            depth: self.group.depth,
            weight: self.weight(),
            started: self.member.started.load(Ordering::Relaxed),
            waited: self.member.waited.load(Ordering::Relaxed),
            ..Default::default()
        };
        for e in &reg.queues {
            let q = &e.q;
            s.group_in_flight += q.in_flight.load(Ordering::Relaxed);
            s.group_waiting += q.waiting.load(Ordering::Relaxed);
            if q.member == self.id {
                s.started += q.started.load(Ordering::Relaxed);
                s.waited += q.waited.load(Ordering::Relaxed);
            }
        }
        s
    }

    pub fn weight(&self) -> u32 {
        self.member.weight.load(Ordering::Relaxed)
    }

    /// Change the weight; it applies from the next exchange.
    pub fn set_weight(&self, weight: u32) -> Result<()> {
        check_weight(weight)?;
        self.member.weight.store(weight, Ordering::Relaxed);
        Ok(())
    }

    /// A queue of this disk joins the group. `wake`: an eventfd its worker watches (its
    /// completion fd), or `None` for a queue whose worker never sleeps with commands
    /// pending.
    pub fn queue(self: &Arc<Self>, wake: Option<RawFd>) -> FairQueue {
        let g = &self.group;
        let q = Arc::new(QueueShared {
            member: self.id,
            quota: AtomicU32::new(g.depth),
            parked: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            held: AtomicU32::new(0),
            served: AtomicU64::new(0),
            started: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            wake,
        });
        g.lock().queues.push(Entry {
            q: q.clone(),
            last_served: 0,
            rate: 0.0,
            carry: 0.0,
            last_held: 0.0,
            weight: 0.0,
            norm: f64::NAN,
        });
        FairQueue {
            share: self.clone(),
            q,
            credit: 0,
            in_flight: 0,
            hungry: false,
            since: 0,
            period: (g.depth / 2).clamp(4, 64),
            started: 0,
            waited: 0,
            served: 0,
            batch: (g.depth / 8).clamp(1, 16),
        }
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut reg = self.group.lock();
        if let Some(m) = reg.members.get_mut(self.id) {
            *m = None;
        }
    }
}

/// A queue's side of fair sharing, driven by the queue's one worker: local slot credit,
/// counters published once per batch.
pub struct FairQueue {
    share: Arc<Share>,
    q: Arc<QueueShared>,
    /// Slots held and unused.
    credit: u32,
    /// Commands started through the group and not yet completed.
    in_flight: u32,
    /// Counted in the group's `hungry`.
    hungry: bool,
    /// Completions since this queue last ran the exchange.
    since: u32,
    period: u32,
    started: u64,
    waited: u64,
    served: u64,
    /// Slots taken from `free` at a time when uncontended.
    batch: u32,
}

impl FairQueue {
    fn group(&self) -> &ShareGroup {
        &self.share.group
    }

    /// How many more slots this queue may hold now.
    fn room(&self) -> u32 {
        if self.group().hungry.load(Ordering::Relaxed) == 0 {
            return u32::MAX;
        }
        self.q
            .quota
            .load(Ordering::Relaxed)
            .saturating_sub(self.credit + self.in_flight)
    }

    /// Start a command of `bytes` now if the queue holds or can get a slot. `queued`: the
    /// queue already has commands waiting (they go first), so this one waits too. A
    /// command that does not start is the caller's to keep and to start when
    /// [`FairQueue::exchange`] says so.
    pub fn try_start(&mut self, bytes: u64, queued: bool) -> bool {
        if queued {
            return false;
        }
        if self.credit == 0 {
            self.credit = self.q.parked.swap(0, Ordering::AcqRel);
        }
        if self.credit == 0 {
            let room = self.room();
            self.credit = self.group().take_free(self.batch.min(room));
        }
        if self.credit == 0 {
            return false;
        }
        self.credit -= 1;
        self.start_one(bytes, false);
        true
    }

    fn start_one(&mut self, bytes: u64, waited: bool) {
        self.in_flight += 1;
        self.started += 1;
        self.waited += waited as u64;
        self.served += cost_fixed(bytes);
    }

    /// `n` commands completed: their slots become credit.
    pub fn complete(&mut self, n: u32) {
        let n = n.min(self.in_flight);
        self.in_flight -= n;
        self.credit += n;
        self.since += n;
    }

    /// Once per batch: give back what the quota does not allow, take slots for waiting
    /// commands, publish the counters and run the exchange when it is due. `waiting`:
    /// the commands the caller holds; `bytes_of(i)` the size of the i-th of them (for
    /// its cost). Returns how many of them may start now (the first ones).
    pub fn exchange(&mut self, waiting: u32, bytes_of: &mut dyn FnMut(usize) -> u64) -> u32 {
        let share = self.share.clone();
        let g = &*share.group;
        let contended = g.hungry.load(Ordering::Relaxed) > 0;
        let mut go = 0;
        if waiting > 0 {
            if self.credit == 0 {
                self.credit = self.q.parked.swap(0, Ordering::AcqRel);
            }
            // Contended, the quota bounds the slots in use, credit included.
            let allowed = if contended {
                self.q
                    .quota
                    .load(Ordering::Relaxed)
                    .saturating_sub(self.in_flight)
            } else {
                u32::MAX
            };
            let want = waiting.min(allowed);
            if self.credit < want {
                self.credit += g.take_free(want - self.credit);
            }
            go = want.min(self.credit);
            for i in 0..go {
                self.credit -= 1;
                let b = bytes_of(i as usize);
                self.start_one(b, true);
            }
        }
        let left = waiting - go;
        // Contended, unused credit goes back for others (over the quota, or idle).
        // Uncontended, it stays while commands are in flight and is parked when idle.
        let mut back = 0;
        if contended {
            back = self.credit;
            self.credit = 0;
        } else if self.in_flight == 0 && left == 0 && self.credit > 0 {
            self.q.parked.fetch_add(self.credit, Ordering::AcqRel);
            self.credit = 0;
        }
        let was_hungry = self.hungry;
        self.hungry = left > 0;
        if self.hungry != was_hungry {
            if self.hungry {
                g.hungry.fetch_add(1, Ordering::AcqRel);
            } else {
                g.hungry.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.publish(left);
        g.give_back(back);
        if self.since >= self.period || (self.hungry && !was_hungry) {
            self.since = 0;
            g.exchange();
        }
        let held = self.credit + self.in_flight;
        if self.hungry && (held == 0 || held < self.q.quota.load(Ordering::Relaxed)) {
            // Waiting with room under the quota (or nothing in flight to wake us): a slot
            // that comes back wakes us. Look once more after saying so (SeqCst, see
            // `give_back`), in case one came back meanwhile.
            if !self.q.sleeping.swap(true, Ordering::SeqCst) {
                g.sleepers.fetch_add(1, Ordering::SeqCst);
            }
            if g.free.load(Ordering::SeqCst) > 0 && self.room() > 0 {
                self.q.signal();
            }
        }
        go
    }

    fn publish(&self, waiting: u32) {
        let q = &self.q;
        q.in_flight.store(self.in_flight, Ordering::Relaxed);
        q.waiting.store(waiting, Ordering::Relaxed);
        q.held
            .store(self.in_flight + self.credit, Ordering::Relaxed);
        q.served.store(self.served, Ordering::Relaxed);
        q.started.store(self.started, Ordering::Relaxed);
        q.waited.store(self.waited, Ordering::Relaxed);
    }
}

impl Drop for FairQueue {
    fn drop(&mut self) {
        let g = self.share.group.clone();
        // Slots of commands it will never see complete, its credit and its parked credit.
        let mut back = self.credit + self.in_flight;
        let m = &self.share.member;
        m.started.fetch_add(self.started, Ordering::Relaxed);
        m.waited.fetch_add(self.waited, Ordering::Relaxed);
        {
            let mut reg = g.lock();
            back += self.q.parked.swap(0, Ordering::AcqRel);
            reg.queues.retain(|e| !Arc::ptr_eq(&e.q, &self.q));
            if self.q.sleeping.swap(false, Ordering::AcqRel) {
                g.sleepers.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if self.hungry {
            g.hungry.fetch_sub(1, Ordering::AcqRel);
        }
        g.give_back(back);
        g.exchange();
    }
}

#[cfg(test)]
// The simulation indexes several per-disk arrays by disk number.
#[allow(clippy::needless_range_loop)]
mod tests {
    use super::*;

    /// A simulated device: each command takes a fixed number of steps (its latency),
    /// commands run in parallel. Each disk keeps `outstanding` commands ready.
    struct Sim {
        g: Arc<ShareGroup>,
        shares: Vec<Arc<Share>>,
        qs: Vec<FairQueue>,
        waiting: Vec<u32>,
        /// (disk, steps left)
        device: Vec<(usize, u32)>,
        latency: Vec<u32>,
        bytes: Vec<u64>,
        done: Vec<u64>,
        outstanding: u32,
        max_in_flight: usize,
    }

    impl Sim {
        fn new(depth: u32, disks: &[(u32, u32, u64)], outstanding: u32) -> Sim {
            let g = ShareGroup::new("t", depth);
            let shares: Vec<_> = disks.iter().map(|d| g.join(d.0).unwrap()).collect();
            let qs = shares.iter().map(|s| s.queue(None)).collect();
            Sim {
                g,
                qs,
                shares,
                waiting: vec![0; disks.len()],
                device: Vec::new(),
                latency: disks.iter().map(|d| d.1).collect(),
                bytes: disks.iter().map(|d| d.2).collect(),
                done: vec![0; disks.len()],
                outstanding,
                max_in_flight: 0,
            }
        }

        fn step(&mut self, active: &[bool]) {
            // A step is 10 µs.
            SIM_NS.with(|t| t.set(t.get() + 10_000));
            let n = self.qs.len();
            for d in 0..n {
                if !active[d] {
                    continue;
                }
                let dev = self.device.iter().filter(|c| c.0 == d).count() as u32;
                for _ in (self.waiting[d] + dev)..self.outstanding {
                    if self.qs[d].try_start(self.bytes[d], self.waiting[d] > 0) {
                        self.device.push((d, self.latency[d]));
                    } else {
                        self.waiting[d] += 1;
                    }
                }
            }
            let mut completed = vec![0u32; n];
            self.device.retain_mut(|c| {
                c.1 -= 1;
                if c.1 == 0 {
                    completed[c.0] += 1;
                }
                c.1 > 0
            });
            for d in 0..n {
                self.done[d] += completed[d] as u64;
                self.qs[d].complete(completed[d]);
                let b = self.bytes[d];
                let go = self.qs[d].exchange(self.waiting[d], &mut |_| b);
                self.waiting[d] -= go;
                for _ in 0..go {
                    self.device.push((d, self.latency[d]));
                }
            }
            self.max_in_flight = self.max_in_flight.max(self.device.len());
        }

        fn run(&mut self, steps: u32, active: &[bool]) -> Vec<u64> {
            let before = self.done.clone();
            for _ in 0..steps {
                self.step(active);
            }
            self.done.iter().zip(before).map(|(a, b)| a - b).collect()
        }
    }

    /// Under saturation, completions follow the weights 1:3, and the group never has more
    /// than `depth` commands in flight.
    #[test]
    fn service_follows_weights_under_saturation() {
        let mut s = Sim::new(8, &[(100, 4, 4096), (300, 4, 4096)], 16);
        s.run(2000, &[true, true]);
        let r = s.run(20_000, &[true, true]);
        let ratio = r[1] as f64 / r[0] as f64;
        assert!((2.8..3.2).contains(&ratio), "{r:?}");
        assert!(s.max_in_flight <= 8, "{}", s.max_in_flight);
    }

    /// Fractional quotas: two slots split 1:3 still give 1:3 on average.
    #[test]
    fn a_small_depth_is_shared_by_weight_on_average() {
        let mut s = Sim::new(2, &[(100, 3, 4096), (300, 3, 4096)], 8);
        s.run(2000, &[true, true]);
        let r = s.run(30_000, &[true, true]);
        let ratio = r[1] as f64 / r[0] as f64;
        assert!((2.6..3.4).contains(&ratio), "{r:?}");
        assert!(s.max_in_flight <= 2);
    }

    /// Slower commands do not cost a disk its share: with equal weights and one disk's
    /// commands taking 3x as long, both complete about as many (SFQ's guarantee: service
    /// follows the weights whatever the latency).
    #[test]
    fn slower_commands_get_more_slots() {
        let mut s = Sim::new(12, &[(100, 2, 4096), (100, 6, 4096)], 24);
        s.run(3000, &[true, true]);
        let r = s.run(30_000, &[true, true]);
        let ratio = r[1] as f64 / r[0] as f64;
        assert!((0.85..1.18).contains(&ratio), "{r:?}");
    }

    /// Costlier commands count as more service: 128 KiB commands (cost 5) against 4 KiB
    /// ones (cost 1.125), same latency, equal weights: 4.4x as many small ones complete.
    #[test]
    fn cost_counts_bytes() {
        let mut s = Sim::new(16, &[(100, 4, 128 << 10), (100, 4, 4096)], 32);
        s.run(3000, &[true, true]);
        let r = s.run(30_000, &[true, true]);
        let ratio = r[1] as f64 / r[0] as f64;
        assert!((3.8..5.0).contains(&ratio), "{r:?}");
    }

    /// An idle disk banks no credit: after disk a ran alone, a newcomer shares equally
    /// from then on instead of taking every slot, and the first gets slots again.
    #[test]
    fn a_newcomer_shares_equally() {
        let mut s = Sim::new(4, &[(100, 3, 4096), (100, 3, 4096)], 8);
        let r = s.run(5000, &[true, false]);
        assert_eq!(r[1], 0);
        let r = s.run(20_000, &[true, true]);
        let ratio = r[1] as f64 / r[0] as f64;
        assert!((0.85..1.18).contains(&ratio), "{r:?}");
    }

    /// Uncontended, a queue works from its own credit: slots go back to `free` only when
    /// it is dropped, and nothing waits.
    #[test]
    fn uncontended_queues_never_wait_and_slots_come_back() {
        let g = ShareGroup::new("t", 8);
        let a = g.join(100).unwrap();
        let mut q = a.queue(None);
        for _ in 0..1000 {
            assert!(q.try_start(4096, false));
            assert!(q.try_start(4096, false));
            q.complete(2);
            assert_eq!(q.exchange(0, &mut |_| 0), 0);
        }
        assert_eq!(g.hungry.load(Ordering::Relaxed), 0);
        let st = a.stats();
        assert_eq!((st.started, st.waited), (2000, 0));
        // In flight when the queue goes: its slots come back.
        assert!(q.try_start(4096, false));
        drop(q);
        assert_eq!(g.free.load(Ordering::Relaxed), 8);
        assert_eq!(g.load(), (0, 0));
        assert!(check_weight(0).is_err() && g.join(MAX_WEIGHT + 1).is_err());
    }

    /// A weight changed live applies from the next exchange.
    #[test]
    fn a_weight_change_applies() {
        let mut s = Sim::new(8, &[(100, 4, 4096), (100, 4, 4096)], 16);
        s.run(2000, &[true, true]);
        s.shares[1].set_weight(400).unwrap();
        s.run(2000, &[true, true]);
        let r = s.run(20_000, &[true, true]);
        let ratio = r[1] as f64 / r[0] as f64;
        assert!((3.5..4.5).contains(&ratio), "{r:?}");
        let _ = &s.g;
    }
}
