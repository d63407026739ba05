//! The ring gate: one disk served on two vhost-user exports for a live migration on one
//! host (the source QEMU on one, the destination QEMU on the other), with the rings of
//! only one of them running at any time.
//!
//! Every vhost-user export has a gate; a migration peer export (`ExportConfig::peer`) shares
//! the gate of the export it pairs with, as its second *side*. The gate holds a token:
//! - a connection takes it when it starts its first queue, and gives it back when its last
//!   queue stopped (GET_VRING_BASE, SET_VRING_ENABLE 0, a reset or a disconnect) and the
//!   workers of its side finished their final drain;
//! - a queue start of the other side waits up to [`GATE_WAIT`] for it (QEMU's destination
//!   starts its rings only after the source stopped its own, so this wait is normally
//!   empty), then fails: the queue is not started, the destination's request fails and
//!   its connection closes. Both sides never run rings together.
//!
//! Independently of the token, the gate counts ring activity as the workers see it: a
//! ring counts as running from its start until its worker finished the final drain (after
//! its last access to guest memory). A ring that starts while a ring of the other side
//! still runs is counted in `overlaps`, which the API shows and the migration VM test
//! asserts to be 0.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a queue start waits for the other side of its gate to stop its rings.
pub const GATE_WAIT: Duration = Duration::from_secs(5);

/// Connections of every export get distinct ids.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_conn_id() -> u64 {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

#[derive(Default)]
struct GateState {
    /// The connection holding the token, and its side.
    holder: Option<(u64, usize)>,
    /// The holder stopped every queue, but a worker of its side has not finished its final
    /// drain yet: the last one to finish gives the token back.
    release_pending: bool,
    /// The last connection that held it (to count hand-overs).
    last: Option<u64>,
    /// Sides taken by exports.
    taken: [bool; 2],
}

/// What the API shows of a gate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateStatus {
    /// The side of this export (0: the first export, 1: its migration peer).
    pub side: usize,
    /// Exports sharing the gate (2 for a migration pair).
    pub sides: usize,
    /// Rings of this export running now.
    pub rings_running: u32,
    /// The token moved from one connection to another.
    pub handoffs: u64,
    /// Queue starts that waited for the other side to stop.
    pub waits: u64,
    /// Queue starts refused because the other side did not stop within [`GATE_WAIT`].
    pub refused: u64,
    /// Rings started while a ring of the other side was running (must stay 0).
    pub overlaps: u64,
}

/// The token and counters shared by the exports of one disk pair.
pub struct RingGate {
    state: Mutex<GateState>,
    cv: Condvar,
    running: [AtomicU32; 2],
    handoffs: AtomicU64,
    waits: AtomicU64,
    refused: AtomicU64,
    overlaps: AtomicU64,
}

impl RingGate {
    pub fn new() -> Arc<RingGate> {
        Arc::new(RingGate {
            state: Mutex::new(GateState::default()),
            cv: Condvar::new(),
            running: [AtomicU32::new(0), AtomicU32::new(0)],
            handoffs: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            overlaps: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Join the gate: the side of a new export, or None when both sides are taken.
    pub fn join(&self) -> Option<usize> {
        let mut s = self.lock();
        let side = s.taken.iter().position(|t| !t)?;
        s.taken[side] = true;
        Some(side)
    }

    /// An export left (deleted): its side may be taken by a new peer.
    pub fn leave(&self, side: usize) {
        let mut s = self.lock();
        if let Some(t) = s.taken.get_mut(side) {
            *t = false;
        }
    }

    /// Take the token for connection `conn` of `side`, waiting up to `wait`.
    pub(crate) fn acquire(&self, conn: u64, side: usize, wait: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        let mut s = self.lock();
        let mut waited = false;
        loop {
            match s.holder {
                None => break,
                Some((c, _)) if c == conn => return Ok(()),
                Some(_) => {}
            }
            let left = wait.saturating_sub(t0.elapsed());
            if left.is_zero() {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let other = s.holder.map_or(0, |(_, side)| side);
                return Err(format!(
                    "the rings of side {other} of this disk's migration pair did not stop within {} ms; this queue is not started (never both at once)",
                    wait.as_millis()
                ));
            }
            waited = true;
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if waited {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        if s.last.is_some_and(|l| l != conn) {
            self.handoffs.fetch_add(1, Ordering::Relaxed);
        }
        s.holder = Some((conn, side));
        s.last = Some(conn);
        s.release_pending = false;
        Ok(())
    }

    /// Connection `conn` stopped all its queues: give the token back once the workers of
    /// its side finished.
    pub(crate) fn release(&self, conn: u64) {
        let mut s = self.lock();
        let Some((c, side)) = s.holder else { return };
        if c != conn {
            return;
        }
        if self.running[side & 1].load(Ordering::SeqCst) == 0 {
            s.holder = None;
            s.release_pending = false;
            self.cv.notify_all();
        } else {
            s.release_pending = true;
        }
    }

    /// A ring of `side` is about to run (before its worker gets it).
    pub(crate) fn ring_started(&self, side: usize) {
        self.running[side & 1].fetch_add(1, Ordering::SeqCst);
        if self.running[(side + 1) & 1].load(Ordering::SeqCst) > 0 {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                side,
                "a ring started while a ring of the other export of this migration pair runs"
            );
        }
    }

    /// A ring of `side` finished its final drain (its last access to guest memory is
    /// behind it). Called by the worker.
    pub(crate) fn ring_stopped(&self, side: usize) {
        let left = self.running[side & 1].fetch_sub(1, Ordering::SeqCst) - 1;
        if left == 0 {
            let mut s = self.lock();
            if s.release_pending && s.holder.is_some_and(|(_, hs)| hs == side) {
                s.holder = None;
                s.release_pending = false;
                self.cv.notify_all();
            }
        }
    }

    pub fn status(&self, side: usize) -> GateStatus {
        let sides = self.lock().taken.iter().filter(|t| **t).count();
        GateStatus {
            side,
            sides,
            rings_running: self.running[side & 1].load(Ordering::SeqCst),
            handoffs: self.handoffs.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            overlaps: self.overlaps.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for RingGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingGate")
            .field("holder", &self.lock().holder)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_side_at_a_time() {
        let g = RingGate::new();
        assert_eq!(g.join(), Some(0));
        assert_eq!(g.join(), Some(1));
        assert_eq!(g.join(), None, "one double export per disk");
        g.leave(0);
        assert_eq!(g.join(), Some(0), "a side left is free again");
        let (a, b) = (next_conn_id(), next_conn_id());
        g.acquire(a, 0, GATE_WAIT).unwrap();
        g.ring_started(0);
        g.acquire(a, 0, GATE_WAIT).unwrap(); // a second queue of the same connection
                                             // The other side waits, then fails.
        let e = g.acquire(b, 1, Duration::from_millis(50)).unwrap_err();
        assert!(e.contains("did not stop"), "{e}");
        assert_eq!(g.status(1).refused, 1);
        // The holder stops its queues while its worker still drains: still held.
        g.release(a);
        assert!(g.acquire(b, 1, Duration::from_millis(20)).is_err());
        // A waiter gets it as soon as the worker finished.
        let g2 = g.clone();
        let t = std::thread::spawn(move || g2.acquire(b, 1, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(50));
        g.ring_stopped(0);
        t.join().unwrap().unwrap();
        g.ring_started(1);
        let st = g.status(1);
        assert_eq!((st.handoffs, st.waits, st.overlaps), (1, 1, 0));
        assert_eq!(st.rings_running, 1);
        // A ring of side 0 starting now (a bug the token prevents) is counted.
        g.ring_started(0);
        assert_eq!(g.status(0).overlaps, 1);
    }
}
