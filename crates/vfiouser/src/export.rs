//! `VfioUserExport`: one disk served as a PCI NVMe controller on a vfio-user socket.
//!
//! The socket is bound with [`nvmux_core::unixsock::bind`] (owner and mode set before it
//! appears, as vhost-user's exports) and served by a [`ServerTask`] on the process's
//! control threads ([`nvmux_core::ctlpoll`]): one client at a time, others wait in the
//! backlog. Each client gets a fresh [`NvmePci`] function whose controller
//! ([`crate::ctrl::Controller`]) runs the admin queue on the control thread and the I/O
//! queues on the `workers` given to [`VfioUserExport::start`] (the frontend engine).
//!
//! This is the seam with the daemon (issue 19): the API below is stable, later changes
//! are additions.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::WorkerHandle;
use nvmux_core::{BlockDevice, Error, ErrorKind};

use crate::ctrl::{Controller, CtrlCounters, CtrlShared};
use crate::device::Irqs;
use crate::dma::DmaSpace;
use crate::pci::NvmePci;
use crate::session::ServerTask;

/// Most I/O queue pairs an export offers.
pub const MAX_EXPORT_QUEUES: u16 = 64;
/// I/O queue pairs when the configuration gives none.
pub const DEFAULT_QUEUES: u16 = 4;

/// How a disk is exported over vfio-user.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The listening socket QEMU's `-device vfio-user-pci,socket=` connects to.
    pub socket: PathBuf,
    /// The socket's owner and mode, set before it appears at `socket`.
    pub perms: nvmux_core::unixsock::SocketPerms,
    /// I/O queue pairs offered to the guest, 1..=[`MAX_EXPORT_QUEUES`] (default 4).
    pub num_queues: u16,
    /// NVMe serial number (at most 20 bytes are used).
    pub serial: String,
    /// Writes fail with Write Protected; the namespace says so.
    pub read_only: bool,
}

/// What the API and metrics show of a vfio-user export.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportStatus {
    /// A client (QEMU) is connected now.
    pub connected: bool,
    /// Clients served since the export started.
    pub sessions_total: u64,
    /// Connections that ended on a protocol error (malformed message, stalled client).
    pub sessions_failed: u64,
    /// The guest's controller is enabled (CSTS.RDY).
    pub enabled: bool,
    /// I/O queue pairs the guest created (now), and the most it may create.
    pub io_queues: u16,
    pub io_queues_max: u16,
    /// DMA mappings of the current client.
    pub dma_regions: u64,
    /// Commands failed because a PRP (or PRP list) lay outside the mapped DMA.
    pub bad_prps: u64,
    /// Doorbell writes refused (non-existent queue, value past the queue size, bad
    /// width): each sets the controller fatal status (CSTS.CFS) of that guest only.
    pub bad_doorbells: u64,
    /// Admin commands completed, I/O commands completed (all queues, all sessions).
    pub admin_commands: u64,
    pub io_commands: u64,
    /// Interrupts signalled (MSI-X vectors or INTx).
    pub interrupts: u64,
    /// Asynchronous events delivered (namespace attribute changed).
    pub async_events: u64,
    /// Times the controller entered the fatal status (CSTS.CFS).
    pub fatal_errors: u64,
}

/// A disk served on a vfio-user socket as a PCI NVMe controller.
pub struct VfioUserExport {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    shared: Arc<CtrlShared>,
    sessions: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: Mutex<Option<nvmux_core::ctlpoll::CtlHandle>>,
}

impl VfioUserExport {
    /// Bind the socket and serve one client at a time on the control threads; the I/O
    /// queues run on `workers` (spread over them). Returns once the socket listens.
    pub fn start(
        dev: Arc<dyn BlockDevice>,
        cfg: ExportConfig,
        workers: Vec<WorkerHandle>,
        stats: Arc<DiskStats>,
    ) -> nvmux_core::Result<Self> {
        if workers.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "no worker threads"));
        }
        if cfg.num_queues == 0 || cfg.num_queues > MAX_EXPORT_QUEUES {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "queues {} is out of range (1..={MAX_EXPORT_QUEUES})",
                    cfg.num_queues
                ),
            ));
        }
        if let Some(dir) = cfg.socket.parent() {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("socket directory {} does not exist", dir.display()),
                ));
            }
        }
        let listener: UnixListener = nvmux_core::unixsock::bind(&cfg.socket, &cfg.perms)?;
        let shared = Arc::new(CtrlShared::new(
            dev,
            cfg.serial.clone(),
            cfg.read_only,
            cfg.num_queues,
            workers,
            stats,
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let sh = shared.clone();
        let make = move || {
            let dma = Arc::new(DmaSpace::new());
            let irqs = Arc::new(Irqs::new(sh.num_queues as u32 + 1));
            let ctrl = Controller::new(sh.clone(), dma.clone(), irqs.clone());
            NvmePci::new(ctrl, irqs, dma, sh.num_queues + 1, crate::ctrl::MQES)
        };
        let task = ServerTask::new(listener, cfg.socket.clone(), make, stop.clone());
        let sessions = task.sessions.clone();
        let failed = task.failed.clone();
        let poll = nvmux_core::ctlpoll::global()?;
        let h = poll.add(Box::new(task));
        tracing::info!(socket = %cfg.socket.display(), queues = cfg.num_queues, "vfio-user NVMe export listening");
        Ok(VfioUserExport {
            socket: cfg.socket,
            stop,
            shared,
            sessions,
            failed,
            task: Mutex::new(Some(h)),
        })
    }

    /// True while a client is connected.
    pub fn connected(&self) -> bool {
        self.shared.connected()
    }

    /// The disk's capacity changed: the controller re-reads it and raises a Namespace
    /// Attribute Changed asynchronous event (if the host has an AER outstanding, else
    /// when it sends one).
    pub fn capacity_changed(&self) {
        self.shared.capacity_changed();
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            t.wake();
        }
    }

    /// Counters for the export view and metrics.
    pub fn status(&self) -> ExportStatus {
        let c: &CtrlCounters = &self.shared.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExportStatus {
            connected: self.shared.connected(),
            sessions_total: self.sessions.load(Ordering::Relaxed),
            sessions_failed: self.failed.load(Ordering::Relaxed),
            enabled: c.enabled.load(Ordering::Relaxed),
            io_queues: r(&c.io_queues) as u16,
            io_queues_max: self.shared.num_queues,
            dma_regions: r(&c.dma_regions),
            bad_prps: r(&c.bad_prps),
            bad_doorbells: r(&c.bad_doorbells),
            admin_commands: r(&c.admin_commands),
            io_commands: r(&c.io_commands),
            interrupts: r(&c.interrupts),
            async_events: r(&c.async_events),
            fatal_errors: r(&c.fatal_errors),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Stop serving: the client is disconnected (its queues drained), the socket removed.
    pub fn stop(self) {
        self.shutdown();
    }

    fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let t = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            t.wake();
            t.wait_done();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

impl Drop for VfioUserExport {
    fn drop(&mut self) {
        self.shutdown();
    }
}
