//! Long-running operations (erase today), listed by `GET /v1/operations` while they run.
//!
//! The registry has its own lock, so it can be read while the operation holds the
//! daemon's state lock; the CLI polls it to draw a progress bar.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// One running operation, as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct OpView {
    pub id: u64,
    /// What it does, e.g. `erase`.
    pub op: String,
    /// What it works on, e.g. `disk/vm1`.
    pub target: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Seconds since it started.
    pub seconds: f64,
}

#[derive(Default)]
pub(crate) struct Ops {
    next: AtomicU64,
    running: Mutex<BTreeMap<u64, (OpView, Instant)>>,
}

impl Ops {
    /// Register an operation; it is listed until the guard drops.
    pub(crate) fn start(&self, op: &str, target: String) -> OpGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let view = OpView {
            id,
            op: op.to_string(),
            target,
            done_bytes: 0,
            total_bytes: 0,
            seconds: 0.0,
        };
        self.lock().insert(id, (view, Instant::now()));
        OpGuard { ops: self, id }
    }

    pub(crate) fn list(&self) -> Vec<OpView> {
        self.lock()
            .values()
            .map(|(v, t)| OpView {
                seconds: t.elapsed().as_secs_f64(),
                ..v.clone()
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (OpView, Instant)>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct OpGuard<'a> {
    ops: &'a Ops,
    id: u64,
}

impl OpGuard<'_> {
    pub(crate) fn progress(&self, done_bytes: u64, total_bytes: u64) {
        if let Some((v, _)) = self.ops.lock().get_mut(&self.id) {
            v.done_bytes = done_bytes;
            v.total_bytes = total_bytes;
        }
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.ops.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_while_running_with_progress() {
        let ops = Ops::default();
        let g = ops.start("erase", "disk/a".into());
        g.progress(5, 10);
        let l = ops.list();
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].op.as_str(), l[0].target.as_str()),
            ("erase", "disk/a")
        );
        assert_eq!((l[0].done_bytes, l[0].total_bytes), (5, 10));
        drop(g);
        assert!(ops.list().is_empty());
    }
}
