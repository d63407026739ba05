//! I/O statistics: per-queue counters written by one worker thread, read by anyone.
//!
//! The hot path does plain relaxed loads and stores (no locked read-modify-write): each
//! [`QueueStats`] has exactly one writer, the worker that owns the queue. Readers sum the
//! queues of a disk with [`DiskStats::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Latency histogram buckets: bucket `i` counts completions with latency < 2^i µs
/// (bucket 0: < 1 µs), the last bucket everything slower.
pub const LAT_BUCKETS: usize = 24;

/// Read / write / other (flush, discard, write zeroes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    Read = 0,
    Write = 1,
    Other = 2,
}

#[derive(Default)]
struct ClassCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    lat_sum_ns: AtomicU64,
    lat: [AtomicU64; LAT_BUCKETS],
}

/// Counters for one queue. One writer (its worker), many readers.
#[derive(Default)]
pub struct QueueStats {
    class: [ClassCounters; 3],
    in_flight: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64, v: u64) {
    // Single writer: a load and a store are enough, and cost no locked instruction.
    c.store(c.load(Relaxed).wrapping_add(v), Relaxed);
}

impl QueueStats {
    /// Record one completed command.
    #[inline]
    pub fn record(&self, class: OpClass, bytes: u64, latency: Duration, ok: bool) {
        let c = &self.class[class as usize];
        bump(&c.ops, 1);
        bump(&c.bytes, bytes);
        if !ok {
            bump(&c.errors, 1);
        }
        let ns = latency.as_nanos().min(u64::MAX as u128) as u64;
        bump(&c.lat_sum_ns, ns);
        let us = ns / 1000;
        let b = if us == 0 {
            0
        } else {
            (64 - us.leading_zeros() as usize).min(LAT_BUCKETS - 1)
        };
        bump(&c.lat[b], 1);
    }
    #[inline]
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.store(n, Relaxed);
    }
}

/// A point-in-time sum of counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassSnapshot {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub lat_sum_ns: u64,
    pub lat: [u64; LAT_BUCKETS],
}

impl ClassSnapshot {
    fn add(&mut self, c: &ClassCounters) {
        self.ops += c.ops.load(Relaxed);
        self.bytes += c.bytes.load(Relaxed);
        self.errors += c.errors.load(Relaxed);
        self.lat_sum_ns += c.lat_sum_ns.load(Relaxed);
        for (d, s) in self.lat.iter_mut().zip(c.lat.iter()) {
            *d += s.load(Relaxed);
        }
    }
    fn add_snap(&mut self, o: &ClassSnapshot) {
        self.ops += o.ops;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.lat_sum_ns += o.lat_sum_ns;
        for (d, s) in self.lat.iter_mut().zip(o.lat.iter()) {
            *d += s;
        }
    }
    /// Upper bound of bucket `i`, in seconds (`None` for the overflow bucket).
    pub fn bucket_le_seconds(i: usize) -> Option<f64> {
        (i < LAT_BUCKETS - 1).then(|| (1u64 << i) as f64 * 1e-6)
    }
    /// Approximate percentile latency in µs (upper bucket bound).
    pub fn percentile_us(&self, p: f64) -> Option<u64> {
        let total: u64 = self.lat.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (total as f64 * p).ceil() as u64;
        let mut acc = 0;
        for (i, n) in self.lat.iter().enumerate() {
            acc += n;
            if acc >= want {
                return Some(1u64 << i);
            }
        }
        None
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub read: ClassSnapshot,
    pub write: ClassSnapshot,
    pub other: ClassSnapshot,
    pub in_flight: u64,
}

/// All queues of one disk, including those that have gone (their counts are kept).
#[derive(Default)]
pub struct DiskStats {
    inner: Mutex<DiskStatsInner>,
}

#[derive(Default)]
struct DiskStatsInner {
    live: Vec<Arc<QueueStats>>,
    retired: Snapshot,
}

impl DiskStats {
    /// Counters for a new queue of this disk.
    pub fn new_queue(&self) -> Arc<QueueStats> {
        let q = Arc::new(QueueStats::default());
        self.lock().live.push(q.clone());
        q
    }
    /// Fold a queue that has stopped into the retired totals.
    pub fn retire(&self, q: &Arc<QueueStats>) {
        let mut g = self.lock();
        if let Some(i) = g.live.iter().position(|x| Arc::ptr_eq(x, q)) {
            let q = g.live.swap_remove(i);
            let mut s = Snapshot::default();
            add_queue(&mut s, &q);
            s.in_flight = 0;
            let r = &mut g.retired;
            r.read.add_snap(&s.read);
            r.write.add_snap(&s.write);
            r.other.add_snap(&s.other);
        }
    }
    pub fn snapshot(&self) -> Snapshot {
        let g = self.lock();
        let mut s = g.retired.clone();
        for q in &g.live {
            add_queue(&mut s, q);
        }
        s
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, DiskStatsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn add_queue(s: &mut Snapshot, q: &QueueStats) {
    s.read.add(&q.class[0]);
    s.write.add(&q.class[1]);
    s.other.add(&q.class[2]);
    s.in_flight += q.in_flight.load(Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_retire() {
        let d = DiskStats::default();
        let q = d.new_queue();
        q.record(OpClass::Read, 4096, Duration::from_micros(3), true);
        q.record(OpClass::Read, 4096, Duration::from_nanos(10), false);
        let s = d.snapshot();
        assert_eq!(s.read.ops, 2);
        assert_eq!(s.read.errors, 1);
        assert_eq!(s.read.lat[0], 1);
        assert_eq!(s.read.lat[2], 1); // 3 µs < 4 µs
        d.retire(&q);
        assert_eq!(d.snapshot().read.ops, 2);
        assert_eq!(d.snapshot().read.percentile_us(0.99), Some(4));
    }
}
