//! The NBD frontend (`nbd` room): disks served to qemu-img, nbdcopy, fio's nbd engine,
//! nbdinfo and the Linux nbd client.
//!
//! ```text
//!  listener thread (Unix socket or loopback TCP) ─ accept ─► handshake thread
//!      negotiate (handshake.rs: fixed newstyle, GO/INFO/LIST/EXPORT_NAME, structured replies)
//!      └─► NbdConn (conn.rs) attached to a worker: requests ─► IoCommand ─► the disk's queue
//! ```
//!
//! One [`NbdServer`] per listen address holds any number of named exports; each export
//! is one disk (read-write or read-only). See docs/nbd.md.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nvmux_core::stats::DiskStats;
use nvmux_core::BlockDevice;

pub mod conn;
pub mod fuzzing;
pub mod handshake;
pub mod proto;
mod server;

pub use server::{Listen, NbdServer};

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
