//! Log lines about what peers do (refused connections, timeouts, failed authentication)
//! without letting a peer flood the log: at most [`RateLog::PER_WINDOW`] lines per
//! window, then one line saying how many were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLog {
    st: Mutex<State>,
}

struct State {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Default for RateLog {
    fn default() -> Self {
        RateLog {
            st: Mutex::new(State {
                start: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }
}

impl RateLog {
    pub const PER_WINDOW: u32 = 10;
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// Whether a line may be written now; also the number left out before it, when a
    /// new window opened after some were.
    pub fn allow(&self) -> (bool, u64) {
        let mut g = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut dropped = 0;
        if now.saturating_duration_since(g.start) >= Self::WINDOW {
            dropped = std::mem::take(&mut g.suppressed);
            g.start = now;
            g.logged = 0;
        }
        if g.logged < Self::PER_WINDOW {
            g.logged += 1;
            (true, dropped)
        } else {
            g.suppressed += 1;
            (false, dropped)
        }
    }

    /// A warning, unless too many were written lately.
    pub fn warn(&self, msg: impl FnOnce() -> String) {
        let (ok, dropped) = self.allow();
        if dropped > 0 {
            tracing::warn!("nvme/tcp: {dropped} similar messages were not logged");
        }
        if ok {
            tracing::warn!("nvme/tcp: {}", msg());
        }
    }

    /// An informational line, under the same limit.
    pub fn info(&self, msg: impl FnOnce() -> String) {
        let (ok, dropped) = self.allow();
        if dropped > 0 {
            tracing::warn!("nvme/tcp: {dropped} similar messages were not logged");
        }
        if ok {
            tracing::info!("nvme/tcp: {}", msg());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bursts_are_cut() {
        let r = super::RateLog::default();
        let allowed = (0..100).filter(|_| r.allow().0).count();
        assert_eq!(allowed, super::RateLog::PER_WINDOW as usize);
    }
}
