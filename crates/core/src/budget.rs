//! Memory budgets and connection limits of the network frontends (NVMe/TCP, NBD).
//!
//! A network peer decides how much memory its connection asks the daemon for: a command
//! with a large transfer needs a buffer, and many commands in flight need many. These
//! budgets bound that memory **by back-pressure**: a connection that cannot get memory
//! for its next command stops reading its socket until its own commands complete (or
//! another connection's do), so the peer waits; nothing is refused, nothing aborts.
//!
//! ```text
//!  MemBudget (daemon-wide, `network.memory_budget`)      shared, atomic
//!     ├─ ConnBudget (connection 1, `*.memory_per_connection`)   owned by its worker
//!     ├─ ConnBudget (connection 2)
//!     └─ ...
//! ```
//!
//! [`ConnLimiter`] bounds how many connections a listener accepts, in total and per peer
//! address; a [`ConnPermit`] is held for a connection's life.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Memory shared by many connections: bytes reserved now, against a limit.
#[derive(Debug)]
pub struct MemBudget {
    limit: usize,
    used: AtomicUsize,
    /// Times a reservation was refused because this budget was full.
    waits: AtomicU64,
}

impl MemBudget {
    pub fn new(limit: usize) -> Arc<MemBudget> {
        Arc::new(MemBudget {
            limit,
            used: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
        })
    }

    /// A budget that never refuses (tests, fuzz harnesses).
    pub fn unlimited() -> Arc<MemBudget> {
        MemBudget::new(usize::MAX)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// How often a connection had to wait because this budget was full.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, n: usize) -> bool {
        self.reserve_below(n, self.limit, true)
    }

    /// Reserve `n` bytes if `used` stays at most `cap` (a refusal counts as a wait when
    /// `count` says so).
    fn reserve_below(&self, n: usize, cap: usize, count: bool) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(n).filter(|&v| v <= cap) else {
                if count {
                    self.waits.fetch_add(1, Ordering::Relaxed);
                }
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(v) => cur = v,
            }
        }
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One connection's share: at most `limit` bytes, each also reserved in the daemon-wide
/// budget. Owned by the connection (one thread), so its own count needs no atomics. What
/// it holds goes back to the daemon-wide budget when it is dropped.
#[derive(Debug)]
pub struct ConnBudget {
    global: Arc<MemBudget>,
    limit: usize,
    held: usize,
    /// Reservations refused (by either budget) over the connection's life.
    waits: u64,
}

impl ConnBudget {
    pub fn new(global: Arc<MemBudget>, limit: usize) -> ConnBudget {
        ConnBudget {
            global,
            limit,
            held: 0,
            waits: 0,
        }
    }

    /// Reserve `n` bytes, or `false` (nothing reserved) if either budget would overflow.
    /// A `false` means "wait until something you hold comes back", never "fail".
    pub fn try_take(&mut self, n: usize) -> bool {
        let fits = self.held.checked_add(n).is_some_and(|v| v <= self.limit);
        if !fits || !self.global.try_reserve(n) {
            self.waits += 1;
            return false;
        }
        self.held += n;
        true
    }

    /// Reserve `n` bytes for something not needed yet (buffers provisioned ahead of
    /// demand): only if the connection's limit allows it and the daemon-wide budget stays
    /// at most three quarters full, so that spare buffers never take the memory other
    /// connections need. A refusal is not a wait and is not counted.
    pub fn try_take_spare(&mut self, n: usize) -> bool {
        let fits = self.held.checked_add(n).is_some_and(|v| v <= self.limit);
        let cap = self.global.limit - self.global.limit / 4;
        if !fits || !self.global.reserve_below(n, cap, false) {
            return false;
        }
        self.held += n;
        true
    }

    /// Give back `n` bytes taken earlier (clamped to what is held).
    pub fn give(&mut self, n: usize) {
        let n = n.min(self.held);
        self.held -= n;
        self.global.release(n);
    }

    /// Bytes held by this connection.
    pub fn held(&self) -> usize {
        self.held
    }

    /// The per-connection limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn waits(&self) -> u64 {
        self.waits
    }

    /// Whether `n` more bytes could ever fit this connection (if it held nothing).
    pub fn can_ever_fit(&self, n: usize) -> bool {
        n <= self.limit && n <= self.global.limit
    }
}

impl Drop for ConnBudget {
    fn drop(&mut self) {
        self.global.release(self.held);
    }
}

/// Connection limits of one listener: in total and per peer address.
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_peer: usize,
    st: Mutex<LimiterState>,
    refused: AtomicU64,
}

#[derive(Debug, Default)]
struct LimiterState {
    total: usize,
    per_peer: HashMap<Peer, usize>,
}

/// Who a connection comes from, for the per-peer limit: an IP address on TCP, a user id
/// (`SO_PEERCRED`) on a Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    Ip(IpAddr),
    Uid(u32),
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds `max_total` connections.
    Total(usize),
    /// This peer address holds `max_per_peer` connections.
    PerPeer(usize),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Total(n) => write!(f, "the listener already holds {n} connections"),
            Refusal::PerPeer(n) => write!(f, "this peer already holds {n} connections"),
        }
    }
}

impl ConnLimiter {
    /// 0 means no limit for either.
    pub fn new(max_total: usize, max_per_peer: usize) -> Arc<ConnLimiter> {
        let z = |v: usize| if v == 0 { usize::MAX } else { v };
        Arc::new(ConnLimiter {
            max_total: z(max_total),
            max_per_peer: z(max_per_peer),
            st: Mutex::new(LimiterState::default()),
            refused: AtomicU64::new(0),
        })
    }

    /// Admit a connection from `peer` (`None` for a Unix socket: counted in the total
    /// only), or say why not.
    pub fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<ConnPermit, Refusal> {
        self.admit_peer(peer.map(Peer::Ip))
    }

    /// Admit a connection from `peer` (`None`: counted in the total only), or say why not.
    pub fn admit_peer(self: &Arc<Self>, peer: Option<Peer>) -> Result<ConnPermit, Refusal> {
        let mut g = self.st.lock().unwrap_or_else(|e| e.into_inner());
        if g.total >= self.max_total {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Total(self.max_total));
        }
        if let Some(ip) = peer {
            let n = g.per_peer.entry(ip).or_insert(0);
            if *n >= self.max_per_peer {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::PerPeer(self.max_per_peer));
            }
            *n += 1;
        }
        g.total += 1;
        Ok(ConnPermit {
            lim: self.clone(),
            peer,
        })
    }

    /// Connections admitted and not yet closed.
    pub fn open(&self) -> usize {
        self.st.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A connection's place in its listener's count; given back on drop.
#[derive(Debug)]
pub struct ConnPermit {
    lim: Arc<ConnLimiter>,
    peer: Option<Peer>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut g = self.lim.st.lock().unwrap_or_else(|e| e.into_inner());
        g.total = g.total.saturating_sub(1);
        if let Some(ip) = self.peer {
            if let Some(n) = g.per_peer.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    g.per_peer.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_nest_and_return() {
        let g = MemBudget::new(100);
        let mut a = ConnBudget::new(g.clone(), 60);
        let mut b = ConnBudget::new(g.clone(), 60);
        assert!(a.try_take(60));
        assert!(!a.try_take(1), "per-connection limit");
        assert!(b.try_take(40));
        assert!(!b.try_take(1), "daemon-wide limit");
        assert_eq!(g.used(), 100);
        assert!(g.waits() >= 1);
        a.give(30);
        assert!(b.try_take(20));
        assert_eq!(g.used(), 90);
        drop(b);
        assert_eq!(g.used(), 30);
        a.give(1000); // clamped
        assert_eq!(g.used(), 0);
        assert!(!a.can_ever_fit(61));
        assert!(a.can_ever_fit(60));
        assert!(!a.try_take(usize::MAX));
    }

    #[test]
    fn spare_reservations_leave_a_quarter_and_count_no_wait() {
        let g = MemBudget::new(100);
        let mut a = ConnBudget::new(g.clone(), 90);
        assert!(a.try_take_spare(70));
        assert!(
            !a.try_take_spare(6),
            "the daemon-wide budget's last quarter"
        );
        assert!(a.try_take_spare(5));
        assert!(a.try_take(15), "demand may use the last quarter");
        assert!(!a.try_take_spare(1), "the connection's limit");
        assert_eq!((g.used(), a.held(), g.waits(), a.waits()), (90, 90, 0, 0));
    }

    #[test]
    fn limiter_counts_total_and_per_peer() {
        let l = ConnLimiter::new(3, 2);
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.admit(Some(ip1)).unwrap();
        let _p2 = l.admit(Some(ip1)).unwrap();
        assert_eq!(l.admit(Some(ip1)).unwrap_err(), Refusal::PerPeer(2));
        let _p3 = l.admit(Some(ip2)).unwrap();
        assert_eq!(l.admit(None).unwrap_err(), Refusal::Total(3));
        assert_eq!(l.refused(), 2);
        drop(p1);
        assert_eq!(l.open(), 2);
        let _p4 = l.admit(Some(ip1)).unwrap();
        // User ids on a Unix socket count apart from addresses.
        let u = ConnLimiter::new(0, 1);
        let _a = u.admit_peer(Some(Peer::Uid(1000))).unwrap();
        assert_eq!(
            u.admit_peer(Some(Peer::Uid(1000))).unwrap_err(),
            Refusal::PerPeer(1)
        );
        let _b = u.admit_peer(Some(Peer::Uid(0))).unwrap();
        let unlimited = ConnLimiter::new(0, 0);
        let v: Vec<_> = (0..1000)
            .map(|_| unlimited.admit(Some(ip1)).unwrap())
            .collect();
        assert_eq!(unlimited.open(), v.len());
    }
}
