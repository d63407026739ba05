//! The NBD frontend (`nbd` room): disks served to qemu-img, nbdcopy, fio's nbd engine,
//! nbdinfo and the Linux nbd client.
//!
//! ```text
//!  listener thread (Unix socket, or TCP: loopback, or any address with TLS), one epoll loop:
//!      accept within the limits (ConnLimiter: total, per peer address)
//!      negotiate every connection at once, non-blocking, one total deadline each
//!        (handshake.rs: fixed newstyle, STARTTLS (tls.rs, OpenSSL), GO/INFO/LIST/EXPORT_NAME)
//!      └─► NbdConn (conn.rs) attached to a worker: requests ─► IoCommand ─► the disk's queue
//!          (buffers reserved from the connection's memory budget; stall timeout)
//! ```
//!
//! One [`NbdServer`] per listen address holds any number of named exports; each export
//! is one disk (read-write or read-only). See docs/nbd.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmux_core::stats::DiskStats;
use nvmux_core::BlockDevice;

pub mod conn;
pub mod fuzzing;
pub mod handshake;
pub mod proto;
mod server;
pub mod tls;

pub use server::{Listen, ListenerStats, NbdServer, ServerConfig};
pub use tls::{TlsCreds, TlsServer};

/// Log lines about what may happen a thousand times at once (refused connections,
/// negotiations cut at their deadline, stalls): the first of a burst is logged, then at
/// most one per [`BurstLog::INTERVAL`], saying how many were left out in between.
#[derive(Debug, Default)]
pub struct BurstLog {
    last: Mutex<Option<Instant>>,
    skipped: AtomicU64,
}

impl BurstLog {
    pub const INTERVAL: Duration = Duration::from_secs(10);

    /// `Some(n)`: log this one (`n` like it were left out since the last line).
    pub fn hit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut g = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some_and(|t| now.saturating_duration_since(t) < Self::INTERVAL) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *g = Some(now);
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }

    /// The tail of a log line: how many were left out.
    pub fn more(n: u64) -> String {
        if n == 0 {
            String::new()
        } else {
            format!(" ({n} more like it since the last such line)")
        }
    }
}

/// One export: a disk under a name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub dev: Arc<dyn BlockDevice>,
    read_only: bool,
    pub stats: Arc<DiskStats>,
    /// The export was removed: its connections close.
    pub stop: AtomicBool,
    /// Connections in their transmission phase.
    pub connections: AtomicU64,
}

impl Export {
    pub fn new(
        name: &str,
        description: &str,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
        stats: Arc<DiskStats>,
    ) -> Arc<Export> {
        Arc::new(Export {
            name: name.to_string(),
            description: description.to_string(),
            dev,
            read_only,
            stats,
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        })
    }

    /// Read-only as exported, or because the disk is.
    pub fn read_only(&self) -> bool {
        self.read_only || self.dev.info().read_only
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}
