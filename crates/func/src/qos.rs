//! The `qos` function: per-disk limits on IOPS and bandwidth (read, write and total),
//! each a token bucket with a burst allowance, changeable while the disk is in use.
//!
//! All queues of a disk share one set of buckets. A command that finds its buckets empty
//! waits in its queue's backlog (in order: a queue never overtakes its own commands) and
//! the queue reports when the next one can go (`BlockQueue::next_deadline`), so the
//! worker sleeps until then instead of spinning.
//!
//! A bucket may go into debt by one command: a request larger than the bucket's burst
//! still goes when the bucket is non-negative, and later requests wait for the debt to be
//! paid back. The long-run rate is the limit either way.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fair::{FairQueue, Share};
use nvmux_core::{
    BlockDevice, BlockQueue, DeviceInfo, Error, ErrorKind, IoCommand, Opcode, Result, Status,
};

/// Limits of one disk. `None` or 0: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub read_iops: Option<u64>,
    pub write_iops: Option<u64>,
    pub total_iops: Option<u64>,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub total_bps: Option<u64>,
    /// How much may be spent at once after an idle period, as time at the limit
    /// (default 100 ms).
    pub burst_ms: Option<u64>,
}

impl Limits {
    pub const DEFAULT_BURST_MS: u64 = 100;

    /// Reject limits that contradict each other.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::new(ErrorKind::InvalidArgument, m));
        let pairs = [
            ("iops_read", self.read_iops, self.total_iops, "iops_total"),
            ("iops_write", self.write_iops, self.total_iops, "iops_total"),
            ("bps_read", self.read_bps, self.total_bps, "bps_total"),
            ("bps_write", self.write_bps, self.total_bps, "bps_total"),
        ];
        for (n, v, t, tn) in pairs {
            if let (Some(v), Some(t)) = (v.filter(|&v| v > 0), t.filter(|&t| t > 0)) {
                if v > t {
                    return bad(format!(
                        "{n} = {v} exceeds {tn} = {t}: the total must be at least each part"
                    ));
                }
            }
        }
        if let Some(b) = self.burst_ms {
            if b == 0 || b > 60_000 {
                return bad(format!("burst_ms = {b} is out of range (1..=60000)"));
            }
        }
        Ok(())
    }

    pub fn is_unlimited(&self) -> bool {
        [
            self.read_iops,
            self.write_iops,
            self.total_iops,
            self.read_bps,
            self.write_bps,
            self.total_bps,
        ]
        .iter()
        .all(|v| v.unwrap_or(0) == 0)
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens per second; 0: unlimited.
    rate: f64,
    cap: f64,
    tokens: f64,
}

impl Bucket {
    fn new(rate: Option<u64>, burst: Duration) -> Bucket {
        let rate = rate.unwrap_or(0) as f64;
        let cap = (rate * burst.as_secs_f64()).max(1.0);
        Bucket {
            rate,
            cap,
            tokens: cap,
        }
    }
    fn limited(&self) -> bool {
        self.rate > 0.0
    }
    fn refill(&mut self, dt: f64) {
        if self.limited() {
            self.tokens = (self.tokens + self.rate * dt).min(self.cap);
        }
    }
    fn spend(&mut self, n: f64) {
        if self.limited() {
            self.tokens -= n;
        }
    }
    /// Seconds until the bucket is non-negative again.
    fn wait(&self) -> f64 {
        if !self.limited() || self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }
}

/// Read, write and total buckets for ops and bytes.
#[derive(Debug)]
struct Buckets {
    // Index: 0 read, 1 write, 2 total; ops then bytes.
    ops: [Bucket; 3],
    bytes: [Bucket; 3],
    last: Instant,
}

impl Buckets {
    fn new(l: &Limits) -> Buckets {
        let burst = Duration::from_millis(l.burst_ms.unwrap_or(Limits::DEFAULT_BURST_MS));
        Buckets {
            ops: [
                Bucket::new(l.read_iops, burst),
                Bucket::new(l.write_iops, burst),
                Bucket::new(l.total_iops, burst),
            ],
            bytes: [
                Bucket::new(l.read_bps, burst),
                Bucket::new(l.write_bps, burst),
                Bucket::new(l.total_bps, burst),
            ],
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        for b in self.ops.iter_mut().chain(self.bytes.iter_mut()) {
            b.refill(dt);
        }
    }

    /// Take what `cmd` costs if its buckets allow it now; else how long to wait.
    fn take(&mut self, op: Opcode, bytes: u64, now: Instant) -> std::result::Result<(), Duration> {
        let dir = match op {
            Opcode::Read => 0,
            Opcode::Write | Opcode::WriteZeroes => 1,
            // Flush and deallocate move no data and are not limited.
            _ => return Ok(()),
        };
        self.refill(now);
        let wait = [
            self.ops[dir].wait(),
            self.ops[2].wait(),
            self.bytes[dir].wait(),
            self.bytes[2].wait(),
        ]
        .into_iter()
        .fold(0.0, f64::max);
        if wait > 0.0 {
            return Err(Duration::from_secs_f64(wait));
        }
        for i in [dir, 2] {
            self.ops[i].spend(1.0);
            self.bytes[i].spend(bytes as f64);
        }
        Ok(())
    }
}

/// The limits of one disk, shared by its queues and changed through the API, and its
/// share of the backend it lives on.
pub struct Qos {
    limits: Mutex<(Limits, Buckets)>,
    /// No limit is set: queues pass commands straight through without the lock.
    unlimited: AtomicBool,
    /// The disk's membership of its backend's fair-share group, if it has one.
    share: Option<Arc<Share>>,
}

impl Qos {
    pub fn new(l: Limits, share: Option<Arc<Share>>) -> Result<Arc<Qos>> {
        l.validate()?;
        Ok(Arc::new(Qos {
            limits: Mutex::new((l, Buckets::new(&l))),
            unlimited: AtomicBool::new(l.is_unlimited()),
            share,
        }))
    }

    pub fn share(&self) -> Option<&Arc<Share>> {
        self.share.as_ref()
    }

    pub fn limits(&self) -> Limits {
        self.lock().0
    }

    /// Change the limits at once; commands already waiting are held to the new ones.
    pub fn set(&self, l: Limits) -> Result<()> {
        l.validate()?;
        let mut g = self.lock();
        *g = (l, Buckets::new(&l));
        self.unlimited.store(l.is_unlimited(), Ordering::Release);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Limits, Buckets)> {
        self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct QosDevice {
    inner: Arc<dyn BlockDevice>,
    qos: Arc<Qos>,
}

impl QosDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, qos: Arc<Qos>) -> Self {
        QosDevice { inner, qos }
    }
}

impl BlockDevice for QosDevice {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        let inner = self.inner.open_queue(depth)?;
        let fair = self.qos.share.clone().map(|share| Fair {
            fq: share.queue(inner.completion_fd()),
            queue: VecDeque::with_capacity(depth as usize),
        });
        Ok(Box::new(QosQueue {
            inner,
            qos: self.qos.clone(),
            bs: self.inner.info().block_size as u64,
            backlog: VecDeque::with_capacity(depth as usize),
            wait_until: None,
            now: None,
            fair,
        }))
    }
    fn describe(&self) -> String {
        if self.qos.unlimited.load(Ordering::Acquire) {
            self.inner.describe()
        } else {
            format!("rate-limited {}", self.inner.describe())
        }
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

struct QosQueue {
    inner: Box<dyn BlockQueue>,
    qos: Arc<Qos>,
    bs: u64,
    backlog: VecDeque<IoCommand>,
    /// When the first backlogged command may go.
    wait_until: Option<Instant>,
    /// The batch's clock reading (one per batch: taken at the first need, dropped at
    /// `kick` and at the end of `poll`).
    now: Option<Instant>,
    fair: Option<Fair>,
}

/// A queue's side of fair sharing: its slot credit, and the commands the limits let
/// through that wait for a slot of the backend's group.
struct Fair {
    fq: FairQueue,
    queue: VecDeque<IoCommand>,
}

impl QosQueue {
    /// Send a command the limits let through down, or queue it for a slot of the
    /// backend's fair-share group.
    fn dispatch(&mut self, cmd: IoCommand) {
        let Some(f) = &mut self.fair else {
            self.inner.submit(cmd);
            return;
        };
        if f.fq
            .try_start(cmd.nlb as u64 * self.bs, !f.queue.is_empty())
        {
            self.inner.submit(cmd);
        } else {
            f.queue.push_back(cmd);
        }
    }

    /// The batch's fair-share exchange: start the waiting commands it allows. Returns how
    /// many.
    fn granted(&mut self) -> usize {
        let Some(Fair { fq, queue }) = &mut self.fair else {
            return 0;
        };
        let bs = self.bs;
        let go = fq.exchange(queue.len() as u32, &mut |i| {
            queue.get(i).map_or(0, |c| c.nlb as u64 * bs)
        });
        for _ in 0..go {
            if let Some(c) = queue.pop_front() {
                self.inner.submit(c);
            }
        }
        go as usize
    }

    /// Send backlogged commands that the buckets now allow, taking the buckets' lock
    /// once for all of them. Returns how many went.
    fn release(&mut self) -> usize {
        if self.backlog.is_empty() {
            return 0;
        }
        let now = *self.now.get_or_insert_with(Instant::now);
        let mut n = 0;
        {
            // The lock is not held while the commands go down (a crypt layer below
            // encrypts in `submit`).
            let mut g = self.qos.lock();
            self.wait_until = None;
            for c in self.backlog.iter() {
                match g.1.take(c.opcode, c.nlb as u64 * self.bs, now) {
                    Ok(()) => n += 1,
                    Err(w) => {
                        self.wait_until = Some(now + w);
                        break;
                    }
                }
            }
        }
        for _ in 0..n {
            if let Some(c) = self.backlog.pop_front() {
                self.dispatch(c);
            }
        }
        n
    }
}

impl BlockQueue for QosQueue {
    fn submit(&mut self, cmd: IoCommand) {
        if self.backlog.is_empty() && self.qos.unlimited.load(Ordering::Acquire) {
            self.dispatch(cmd);
            return;
        }
        // Limited: the backlog goes at `kick`, the whole batch under one lock.
        self.backlog.push_back(cmd);
    }
    fn kick(&mut self) {
        self.release();
        if self.fair.as_ref().is_some_and(|f| !f.queue.is_empty()) {
            self.granted();
        }
        self.now = None;
        self.inner.kick();
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let n = self.inner.poll(done);
        if let Some(f) = &mut self.fair {
            f.fq.complete(n as u32);
        }
        let sent = self.release() + self.granted();
        self.now = None;
        if sent > 0 {
            self.inner.kick();
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
            + self.backlog.len()
            + self.fair.as_ref().map_or(0, |f| f.queue.len())
    }
    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }
    // A device below with several descriptors (a mirror's legs, a remote queue's
    // hand-over) wakes the worker through all of them.
    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.inner.wait_fds(out)
    }
    fn take_fds_changed(&mut self) -> bool {
        self.inner.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.inner.busy_poll()
    }
    fn may_sleep(&self) -> bool {
        self.inner.may_sleep()
    }
    fn next_deadline(&self) -> Option<Instant> {
        match (self.wait_until, self.inner.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(f: impl FnOnce(&mut Limits)) -> Limits {
        let mut l = Limits::default();
        f(&mut l);
        l
    }

    #[test]
    fn contradictory_limits_are_refused() {
        assert!(lim(|l| {
            l.read_iops = Some(2000);
            l.total_iops = Some(1000)
        })
        .validate()
        .is_err());
        assert!(lim(|l| l.burst_ms = Some(0)).validate().is_err());
        assert!(lim(|l| {
            l.read_iops = Some(500);
            l.total_iops = Some(1000)
        })
        .validate()
        .is_ok());
    }

    /// Simulated time: the number of commands a bucket lets through in 10 s is the limit
    /// times 10, plus the burst.
    #[test]
    fn rate_and_burst() {
        let l = lim(|l| {
            l.read_iops = Some(1000);
            l.burst_ms = Some(100)
        });
        let mut b = Buckets::new(&l);
        let t0 = b.last;
        let mut sent = 0u64;
        let mut t = t0;
        while t < t0 + Duration::from_secs(10) {
            match b.take(Opcode::Read, 4096, t) {
                Ok(()) => sent += 1,
                Err(w) => t += w.max(Duration::from_micros(1)),
            }
        }
        assert!((10_000..=10_101).contains(&sent), "{sent}");
        // Writes are not limited by a read limit.
        assert!(b.take(Opcode::Write, 4096, t).is_ok());
    }

    #[test]
    fn bandwidth_counts_bytes_and_a_big_request_goes_into_debt() {
        let l = lim(|l| l.total_bps = Some(1 << 20)); // 1 MiB/s, 100 ms burst = 104857 B
        let mut b = Buckets::new(&l);
        let t = b.last;
        assert!(
            b.take(Opcode::Write, 1 << 20, t).is_ok(),
            "non-negative bucket: goes"
        );
        let w = b.take(Opcode::Read, 4096, t).expect_err("in debt");
        // About 0.9 s of debt to pay back.
        assert!(
            w > Duration::from_millis(850) && w < Duration::from_millis(950),
            "{w:?}"
        );
    }
}
