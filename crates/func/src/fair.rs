//! Fair sharing of one backend between the disks on it: start-time fair queueing with a
//! depth limit, SFQ(D) (Jin, Chase and Kaur, SIGMETRICS 2004).
//!
//! A [`ShareGroup`] stands for one backend device (the daemon makes one per host device
//! that holds disk files or pool files). It lets at most `depth` commands of its disks be
//! in flight at once. While fewer are in flight, a command goes straight down. When the
//! group is full, commands wait in their queues, and each slot that frees up goes to the
//! waiting disk that has received the least service for its weight:
//!
//! * every disk has a finish tag `F`; the group has a virtual time `V`;
//! * a command of disk *d* that starts gets the start tag `S = max(V, F_d)`; then
//!   `F_d = S + cost / weight_d` and `V = S`;
//! * a free slot goes to the waiting disk with the smallest `max(V, F_d)`.
//!
//! A disk that was idle re-enters at `V`: it gets no credit for the time it did not use.
//! Under saturation disks therefore get slots, and so throughput, in proportion to their
//! weights, whatever the latency of each one's commands. Below saturation nobody waits,
//! so the group costs one uncontended lock per command and per completion batch.
//!
//! A command's cost models the device's work: `1 + bytes / 32 KiB`, so a 4 KiB command
//! costs 1.125 and a 128 KiB one 5.
//!
//! Slots are handed over across threads: a disk's queue may run on another worker than
//! the one whose completion freed the slot. The waiting queue is then woken through its
//! completion eventfd (which its worker watches in `epoll_wait`).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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

/// One backend shared by several disks.
pub struct ShareGroup {
    name: String,
    depth: u32,
    st: Mutex<GroupState>,
}

#[derive(Default)]
struct GroupState {
    in_flight: u32,
    vtime: f64,
    /// Indexed by member id; `None` for a member that left.
    members: Vec<Option<Member>>,
    /// One entry per queue that has commands waiting for a slot.
    waiting: Vec<Waiting>,
}

struct Member {
    weight: u32,
    finish: f64,
    started: u64,
    waited: u64,
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

struct Waiting {
    member: usize,
    /// Commands waiting, and their total cost.
    count: u32,
    cost: f64,
    waiter: Arc<Waiter>,
}

/// A queue's mailbox for slots granted while it waited.
pub struct Waiter {
    granted: AtomicU32,
    wake: Option<RawFd>,
    /// The thread that drives the queue (see [`Waiter::driven_here`]); 0: not yet known.
    thread: AtomicU64,
}

/// A small number per thread, for telling whether a grant comes from the queue's own
/// worker (no wake-up needed: it polls the queue before it sleeps).
fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    TAG.with(|t| *t)
}

impl Waiter {
    /// `wake`: an eventfd the queue's worker watches (its completion fd), or `None` for a
    /// queue whose worker never sleeps with commands pending.
    pub fn new(wake: Option<RawFd>) -> Arc<Waiter> {
        Arc::new(Waiter {
            granted: AtomicU32::new(0),
            wake,
            thread: AtomicU64::new(0),
        })
    }

    /// Record that the calling thread drives the queue (a queue is opened on one thread
    /// and then moved to its worker).
    pub fn driven_here(&self) {
        let t = thread_tag();
        if self.thread.load(Ordering::Relaxed) != t {
            self.thread.store(t, Ordering::Relaxed);
        }
    }

    /// Take the slots granted since the last call: start that many waiting commands.
    pub fn take_grants(&self) -> u32 {
        self.granted.swap(0, Ordering::AcqRel)
    }

    /// Slots are waiting to be taken.
    pub fn has_grant(&self) -> bool {
        self.granted.load(Ordering::Acquire) > 0
    }

    /// Called with the group locked; wakes the queue's worker at the first grant.
    fn grant(&self) {
        if self.granted.fetch_add(1, Ordering::AcqRel) == 0
            && self.thread.load(Ordering::Relaxed) != thread_tag()
        {
            if let Some(fd) = self.wake {
                let one = 1u64;
                // SAFETY: an 8-byte write from a live u64 to an eventfd; the fd belongs to
                // the queue, which outlives its waiting entry (it cancels it on drop).
                unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
            }
        }
    }
}

impl ShareGroup {
    /// `depth`: how many commands of the group's disks may be in flight at once.
    pub fn new(name: impl Into<String>, depth: u32) -> Arc<ShareGroup> {
        Arc::new(ShareGroup {
            name: name.into(),
            depth: depth.max(1),
            st: Mutex::new(GroupState::default()),
        })
    }

    /// Add a disk with `weight`.
    pub fn join(self: &Arc<Self>, weight: u32) -> Result<Arc<Share>> {
        check_weight(weight)?;
        let mut st = self.lock();
        let m = Member {
            weight,
            finish: st.vtime,
            started: 0,
            waited: 0,
        };
        let id = match st.members.iter().position(Option::is_none) {
            Some(i) => {
                st.members[i] = Some(m);
                i
            }
            None => {
                st.members.push(Some(m));
                st.members.len() - 1
            }
        };
        Ok(Arc::new(Share {
            group: self.clone(),
            id,
        }))
    }

    /// Commands in flight, and the number of queues waiting for a slot.
    #[cfg(test)]
    fn load(&self) -> (u32, usize) {
        let st = self.lock();
        (st.in_flight, st.waiting.len())
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl GroupState {
    fn start(&mut self, member: usize, cost: f64, waited: bool) {
        self.in_flight += 1;
        if let Some(Some(m)) = self.members.get_mut(member) {
            m.started += 1;
            m.waited += waited as u64;
            let s = self.vtime.max(m.finish);
            m.finish = s + cost / m.weight as f64;
            self.vtime = s;
        }
    }

    fn tag(&self, member: usize) -> f64 {
        match self.members.get(member) {
            Some(Some(m)) => self.vtime.max(m.finish),
            _ => self.vtime,
        }
    }

    /// Hand free slots to the waiting queues, least-served disk first, one command at a
    /// time (so a disk that stays least-served gets several slots in a row).
    fn grant(&mut self, depth: u32) {
        while self.in_flight < depth && !self.waiting.is_empty() {
            let mut best = 0;
            let mut best_tag = f64::INFINITY;
            for (i, w) in self.waiting.iter().enumerate() {
                let t = self.tag(w.member);
                if t < best_tag {
                    best = i;
                    best_tag = t;
                }
            }
            let w = &mut self.waiting[best];
            let c = w.cost / w.count.max(1) as f64;
            w.count -= 1;
            w.cost -= c;
            let (member, waiter) = (w.member, w.waiter.clone());
            if w.count == 0 {
                self.waiting.swap_remove(best);
            }
            self.start(member, c, true);
            waiter.grant();
        }
    }
}

/// One disk's membership of a group.
pub struct Share {
    group: Arc<ShareGroup>,
    id: usize,
}

impl Share {
    pub fn stats(&self) -> ShareStats {
        let st = self.group.lock();
        let mut s = ShareStats {
            group: self.group.name.clone(),
            depth: self.group.depth,
            group_in_flight: st.in_flight,
            group_waiting: st.waiting.iter().map(|w| w.count).sum(),
            ..Default::default()
        };
        if let Some(Some(m)) = st.members.get(self.id) {
            s.weight = m.weight;
            s.started = m.started;
            s.waited = m.waited;
        }
        s
    }

    pub fn weight(&self) -> u32 {
        match self.group.lock().members.get(self.id) {
            Some(Some(m)) => m.weight,
            _ => DEFAULT_WEIGHT,
        }
    }

    /// Change the weight; it applies to the next command that starts.
    pub fn set_weight(&self, weight: u32) -> Result<()> {
        check_weight(weight)?;
        if let Some(Some(m)) = self.group.lock().members.get_mut(self.id) {
            m.weight = weight;
        }
        Ok(())
    }

    /// Start a command of `cost` now if the group has a free slot and nobody is waiting.
    /// Otherwise (or with `queued`: the queue already has commands waiting, which must
    /// go first) add it to the queue's waiting commands and return false; the queue
    /// learns of its slots from [`Waiter::take_grants`].
    pub fn try_start(&self, cost: f64, waiter: &Arc<Waiter>, queued: bool) -> bool {
        let mut st = self.group.lock();
        if !queued && st.in_flight < self.group.depth && st.waiting.is_empty() {
            st.start(self.id, cost, false);
            return true;
        }
        match st
            .waiting
            .iter_mut()
            .find(|w| Arc::ptr_eq(&w.waiter, waiter))
        {
            Some(w) => {
                w.count += 1;
                w.cost += cost;
            }
            None => st.waiting.push(Waiting {
                member: self.id,
                count: 1,
                cost,
                waiter: waiter.clone(),
            }),
        }
        // A slot may have freed up between the caller's last look and now.
        st.grant(self.group.depth);
        false
    }

    /// `n` commands of this disk completed: free their slots and hand them on.
    pub fn complete(&self, n: u32) {
        if n == 0 {
            return;
        }
        let mut st = self.group.lock();
        st.in_flight = st.in_flight.saturating_sub(n);
        st.grant(self.group.depth);
    }

    /// A queue goes away: withdraw its waiting entry and give back a slot it was granted
    /// but did not use, and the slots of `in_flight` commands it will never complete.
    pub fn leave_queue(&self, waiter: &Arc<Waiter>, in_flight: u32) {
        let mut st = self.group.lock();
        st.waiting.retain(|w| !Arc::ptr_eq(&w.waiter, waiter));
        let unused = waiter.take_grants();
        st.in_flight = st.in_flight.saturating_sub(in_flight + unused);
        st.grant(self.group.depth);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut st = self.group.lock();
        if let Some(m) = st.members.get_mut(self.id) {
            *m = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Simulated saturation: two disks keep 16 commands each ready, the device (depth
    /// 8) completes the oldest command in flight each step. Slots, and so completions,
    /// go 1:3 with weights 100:300.
    #[test]
    fn slots_follow_weights_under_saturation() {
        let g = ShareGroup::new("t", 8);
        let shares = [g.join(100).unwrap(), g.join(300).unwrap()];
        let waiters = [Waiter::new(None), Waiter::new(None)];
        let mut device: VecDeque<usize> = VecDeque::new();
        let mut queued = [0u32; 2];
        let mut served = [0u32; 2];
        for _ in 0..10_000 {
            for d in 0..2 {
                for _ in 0..waiters[d].take_grants() {
                    queued[d] -= 1;
                    device.push_back(d);
                }
                let outstanding = queued[d] + device.iter().filter(|&&x| x == d).count() as u32;
                for _ in outstanding..16 {
                    if shares[d].try_start(cost(4096), &waiters[d], queued[d] > 0) {
                        device.push_back(d);
                    } else {
                        queued[d] += 1;
                    }
                }
            }
            if let Some(d) = device.pop_front() {
                served[d] += 1;
                shares[d].complete(1);
            }
        }
        let ratio = served[1] as f64 / served[0] as f64;
        assert!((2.9..3.1).contains(&ratio), "{served:?}");
    }

    /// An idle disk does not bank credit: after disk a ran alone, a newcomer shares
    /// equally from then on instead of taking every slot.
    #[test]
    fn a_newcomer_starts_at_the_current_virtual_time() {
        let g = ShareGroup::new("t", 1);
        let a = g.join(100).unwrap();
        let w = Waiter::new(None);
        for _ in 0..1000 {
            assert!(a.try_start(1.0, &w, false));
            a.complete(1);
        }
        let b = g.join(100).unwrap();
        let wb = Waiter::new(None);
        assert!(a.try_start(1.0, &w, false));
        assert!(!b.try_start(1.0, &wb, false));
        assert!(!a.try_start(1.0, &w, false));
        // a completes: b (tag V) goes before a's second command (tag V + 1).
        a.complete(1);
        assert_eq!(wb.take_grants(), 1);
        assert_eq!(w.take_grants(), 0);
        b.complete(1);
        assert_eq!(w.take_grants(), 1);
    }

    #[test]
    fn a_departing_queue_gives_back_its_slots() {
        let g = ShareGroup::new("t", 2);
        let a = g.join(100).unwrap();
        let w = Waiter::new(None);
        assert!(a.try_start(1.0, &w, false));
        assert!(a.try_start(1.0, &w, false));
        assert!(!a.try_start(1.0, &w, false));
        a.leave_queue(&w, 2);
        assert_eq!(g.load(), (0, 0));
        assert!(check_weight(0).is_err() && g.join(MAX_WEIGHT + 1).is_err());
    }
}
