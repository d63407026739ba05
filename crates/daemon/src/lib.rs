//! The nvmux daemon: the only room that wires the others together.
//!
//! It holds the desired state (disks and exports), persists it to `state.json` in the
//! data directory (written to a temporary file, fsynced and renamed, so a crash leaves
//! either the old or the new state), serves the HTTP/JSON API on a Unix socket, runs the
//! worker threads, and publishes metrics.
//!
//! Layout: this file holds the daemon's shared types ([`Daemon`], its locked state) and
//! `serve`; `state` the specs and the atomic write of `state.json`; `assembly` the wiring
//! of backends, functions, routers, frontends and workers (the only place rooms meet);
//! `disks` and `exports` their operations; `views` what the API shows; `pools`, `nvmf`,
//! `nbd`, `routing` and `upgrade` their own objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::WorkerPool;
use nvmux_core::{BlockDevice, Error, ErrorKind, Result};
use nvmux_func::keys::KeyProvider;
use nvmux_vhost::VhostBlkExport;

pub mod api;
mod assembly;
pub mod client;
pub mod config;
mod disks;
mod exports;
pub mod http;
pub mod metrics;
mod mirrors;
pub mod nbd;
pub mod nvmf;
pub mod ops;
pub mod pools;
mod rbd;
pub mod routing;
mod state;
pub mod upgrade;
mod views;

pub use config::Config;
pub use disks::DiskCreate;
pub use exports::ExportCreate;
pub use mirrors::{LegAdd, LegView, MirrorView, PathView, RemoteView};
pub use state::{
    BackendSpec, CryptSpec, DiskSpec, ExportKind, ExportSpec, Function, LegSpec, MirrorSpec,
    QosSpec, CIPHER, STATE_VERSION,
};
pub use views::{
    ClassView, DiskStatsView, DiskView, ExportView, GuestMemoryView, MigrationView, NetworkView,
    StatsView, VfioUserView, WorkerView,
};

pub(crate) use assembly::{with_functions, NewKey};
pub(crate) use exports::check_export_socket;

struct Disk {
    spec: DiskSpec,
    /// The disk's rate limiter, shared by every device opened for it (live changes).
    qos: Arc<nvmux_func::Qos>,
    /// The disk's router (classifier, external function), shared likewise.
    router: Arc<nvmux_router::Router>,
    dev: std::result::Result<Arc<dyn BlockDevice>, String>,
    /// The mirror at the bottom of the chain (when the chain has `mirror`): its legs
    /// change live (`disk mirror add|remove`, `disk move`).
    mirror: Option<Arc<nvmux_mirror::MirrorDevice>>,
    /// The initiators of its remote legs (backend or mirror legs), by leg name.
    remotes: Vec<(String, Arc<nvmux_nvmf::host::RemoteDevice>)>,
    stats: Arc<DiskStats>,
}

struct Export {
    spec: ExportSpec,
    handle: std::result::Result<Handle, String>,
}

/// A running export.
enum Handle {
    Vhost(VhostBlkExport),
    Nbd(nbd::NbdHandle),
    VfioUser(nvmux_vfiouser::VfioUserExport),
}

impl Handle {
    fn connected(&self) -> bool {
        match self {
            Handle::Vhost(h) => h.connected(),
            Handle::Nbd(h) => h.export.connections() > 0,
            Handle::VfioUser(h) => h.connected(),
        }
    }
}

#[derive(Default)]
struct Inner {
    pools: BTreeMap<String, pools::PoolEntry>,
    disks: BTreeMap<String, Disk>,
    exports: BTreeMap<String, Export>,
    subsystems: BTreeMap<String, nvmf::SubsystemEntry>,
    /// The host NQN nvmux's NVMe/TCP initiator connects with (remote disks and legs).
    hostnqn: String,
    /// The Ceph cluster connection and open images of RBD disks.
    rbd: rbd::RbdConn,
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    inner: Mutex<Inner>,
    workers: WorkerPool,
    started: Instant,
    /// Long-running operations, readable without the state lock.
    ops: ops::Ops,
    /// The key-encryption key's source.
    keys: Mutex<Arc<dyn KeyProvider>>,
    /// The wrapped data keys (`<data_dir>/keystore`). Lock order: `inner`, then this.
    keystore: Mutex<nvmux_func::keystore::Keystore>,
    /// The NVMe/TCP target (subsystems, listeners, connections).
    nvmf: nvmux_nvmf::Target,
    /// The one budget of network buffers (`network.memory_budget`), shared by every
    /// network frontend (NVMe/TCP, NBD).
    net_mem: Arc<nvmux_core::budget::MemBudget>,
    /// NBD listeners by address (with their named exports), outside the state lock.
    nbd: Mutex<BTreeMap<String, nbd::NbdListener>>,
    /// Fair-share groups by host device id; a group lives while a disk uses it.
    groups: Mutex<std::collections::HashMap<u64, std::sync::Weak<nvmux_func::ShareGroup>>>,
    /// Held for the daemon's lifetime: one daemon per data directory.
    lock_file: std::fs::File,
    /// The API server (`serve` sets it): a takeover hands its socket over.
    api: Mutex<Option<api::ApiServer>>,
    /// An upgrade is under way (one at a time).
    upgrading: std::sync::atomic::AtomicBool,
    /// The process exits once the reply to `POST /v1/upgrade` is written: the new
    /// process serves.
    pub(crate) exit_after_reply: std::sync::atomic::AtomicBool,
}

/// Take an exclusive lock on `<data_dir>/nvmux.lock`, or fail if another daemon holds it.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let p = dir.join("nvmux.lock");
    // After a takeover: the old process's lock (flock belongs to the open file, which the
    // two processes share).
    if let Some(fd) = nvmux_core::unixsock::take_inherited(&upgrade::lock_key(&p)) {
        return Ok(std::fs::File::from(fd));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(format!("open {}", p.display()), e))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(err(
            ErrorKind::Busy,
            format!("{} is in use by another nvmux daemon", dir.display()),
        ));
    }
    Ok(f)
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> Error {
    Error::new(kind, msg)
}

/// Names: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn check_name(what: &str, n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorKind::InvalidArgument,
            format!("{what} name {n:?} is invalid: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . or -)"),
        ))
    }
}

impl Daemon {
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn for_each_disk_stats(
        &self,
        mut f: impl FnMut(&str, &nvmux_core::stats::Snapshot),
    ) {
        let g = self.lock();
        for d in g.disks.values() {
            f(&d.spec.name, &d.stats.snapshot());
        }
    }

    pub(crate) fn route_totals(&self) -> Vec<(String, nvmux_router::RouteTotals)> {
        let g = self.lock();
        g.disks
            .values()
            .map(|d| (d.spec.name.clone(), d.router.totals()))
            .collect()
    }

    pub(crate) fn worker_handles(&self) -> &[nvmux_core::worker::WorkerHandle] {
        self.workers.workers()
    }

    /// Stop every export (the state file keeps them for the next start).
    pub fn shutdown(&self) {
        self.nvmf.shutdown();
        let mut g = self.lock();
        let exports = std::mem::take(&mut g.exports);
        drop(g);
        for (_, e) in exports {
            if let Ok(h) = e.handle {
                self.stop_handle(h);
            }
        }
        // Devices hold queues on the pools: drop them, then close the pools cleanly.
        let mut g = self.lock();
        for d in g.disks.values() {
            if let Some(e) = d.router.set_external(None) {
                e.stop();
            }
        }
        g.disks.clear();
        for (name, p) in std::mem::take(&mut g.pools) {
            if let Ok(p) = p.pool {
                if let Err(e) = p.close() {
                    tracing::error!(pool = %name, "close: {e}");
                }
            }
        }
    }
}

/// Run the daemon until SIGINT or SIGTERM: restore state, serve the API, shut down.
pub fn serve(cfg: Config) -> Result<()> {
    serve_with(cfg, None)
}

/// [`serve`], or with `takeover`, take over from the daemon that started this process
/// (`nvmux upgrade`; see [`upgrade`]).
pub fn serve_with(cfg: Config, takeover: Option<PathBuf>) -> Result<()> {
    cfg.validate()
        .map_err(|e| err(ErrorKind::InvalidArgument, e))?;
    // Block the termination signals in every thread; one thread waits for them.
    // SAFETY: sigset manipulation on a local set; pthread_sigmask affects this thread and
    // the threads it spawns afterwards.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let sock = cfg.api_socket();
    let access = cfg
        .api
        .access()
        .map_err(|e| err(ErrorKind::InvalidArgument, e))?;
    let daemon = match takeover {
        Some(t) => upgrade::take_over(cfg, &t, &sock, &access)?,
        None => {
            let daemon = Daemon::start(cfg)?;
            let server = api::ApiServer::start(daemon.clone(), &sock, &access)?;
            *daemon.api.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
            daemon
        }
    };
    tracing::info!(api = %sock.display(), access = %access.describe(), "nvmux is serving");
    let mut sig: libc::c_int = 0;
    // SAFETY: sigwait reads our initialised set and writes the signal number to `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    tracing::info!(signal = sig, "shutting down");
    if let Some(server) = daemon.api.lock().unwrap_or_else(|e| e.into_inner()).take() {
        server.stop();
    }
    daemon.shutdown();
    Ok(())
}

/// Check that a listening socket may be created at `path`: nothing there, a stale socket
/// or a symlink (both are replaced by [`nvmux_core::unixsock::bind`], which never follows
/// a link). A regular file, a directory or a socket a live server answers on is refused.
pub fn claim_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(()); // nothing there yet
    };
    let t = m.file_type();
    if t.is_symlink() {
        tracing::warn!(
            "{} is a symlink; it will be replaced by the socket (its target is left alone)",
            path.display()
        );
        return Ok(());
    }
    if !t.is_socket() {
        return Err(err(
            ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(
            ErrorKind::AlreadyExists,
            format!(
                "{} is in use by a running server (another nvmux daemon?); choose another path",
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("disk", "db-1.a_b").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name("disk", bad).is_err(), "{bad:?}");
        }
    }
}
