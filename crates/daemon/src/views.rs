//! What the API shows: disks, exports (guest memory, migration) and statistics.

use std::collections::BTreeMap;

use nvmux_vhost::VhostBlkExport;
use serde::{Deserialize, Serialize};

use crate::{nvmf, Daemon, DiskSpec, Export, ExportSpec, Function, Handle};

/// A disk as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskView {
    #[serde(flatten)]
    pub spec: DiskSpec,
    /// `ok`, or why the disk could not be opened.
    pub status: String,
    pub device: String,
    /// The function chain as built, outermost first.
    pub functions: Vec<Function>,
    pub exports: Vec<String>,
    /// A remote backend's initiator: its paths and failovers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<crate::RemoteView>,
    /// The mirror's legs and bitmap, once the disk has more than one leg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_status: Option<crate::MirrorView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportView {
    #[serde(flatten)]
    pub spec: ExportSpec,
    pub status: String,
    /// A client is connected (nbd: at least one).
    pub connected: bool,
    /// nbd: connections in their transmission phase right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Where clients connect: the socket, or an NBD URI.
    pub address: String,
    /// vhost-user: the front-end's guest memory (faults, refused and sealed regions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory: Option<GuestMemoryView>,
    /// vhost-user: live migration (the ring gate shared with a migration peer, and the
    /// dirty log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationView>,
    /// vfio-user: the NVMe controller the guest sees (its sessions, queues and refusals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_user: Option<VfioUserView>,
}

/// `vfio_user` of a vfio-user export (see docs/api.md and docs/vfio-user.md).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VfioUserView {
    /// Clients (QEMU) served since the export started, and of those the connections that
    /// ended on a protocol error (malformed message, stalled client).
    pub sessions_total: u64,
    pub sessions_failed: u64,
    /// The guest's driver enabled the controller (CSTS.RDY).
    pub enabled: bool,
    /// I/O queue pairs the guest created, and the most it may create (`num_queues`).
    pub io_queues: u64,
    pub io_queues_max: u64,
    /// DMA mappings of the connected client.
    pub dma_regions: u64,
    /// Commands failed because a PRP lay outside the mapped DMA.
    pub bad_prps: u64,
    /// Doorbell writes refused (no such queue, past the queue size): each fails that
    /// guest's controller (CSTS.CFS), nobody else's.
    pub bad_doorbells: u64,
    pub admin_commands: u64,
    pub io_commands: u64,
    pub interrupts: u64,
    /// Asynchronous events delivered (namespace attribute changed, after a resize).
    pub async_events: u64,
    /// Times the controller entered the fatal status (CSTS.CFS).
    pub fatal_errors: u64,
}

impl From<nvmux_vfiouser::ExportStatus> for VfioUserView {
    fn from(s: nvmux_vfiouser::ExportStatus) -> Self {
        VfioUserView {
            sessions_total: s.sessions_total,
            sessions_failed: s.sessions_failed,
            enabled: s.enabled,
            io_queues: s.io_queues as u64,
            io_queues_max: s.io_queues_max as u64,
            dma_regions: s.dma_regions,
            bad_prps: s.bad_prps,
            bad_doorbells: s.bad_doorbells,
            admin_commands: s.admin_commands,
            io_commands: s.io_commands,
            interrupts: s.interrupts,
            async_events: s.async_events,
            fatal_errors: s.fatal_errors,
        }
    }
}

/// `migration` of a vhost-user export (see docs/api.md and docs/operations.md).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationView {
    /// This export's side of its ring gate: 0, or 1 for the export created with
    /// `migration_peer`.
    pub side: u64,
    /// Exports sharing the gate (2 while a migration pair exists).
    pub paired_exports: u64,
    /// Rings of this export running now.
    pub rings_running: u64,
    /// Times the right to run rings moved from one connection to another (one per
    /// migration, and per reconnect).
    pub handoffs: u64,
    /// Ring starts that waited for the other export's rings to stop.
    pub waits: u64,
    /// Ring starts refused because the other export's rings did not stop in time.
    pub refused: u64,
    /// Rings started while a ring of the other export was still running: always 0.
    pub overlaps: u64,
    /// Dirty logging is on now (VHOST_F_LOG_ALL acked, a log set).
    pub dirty_log_active: bool,
    /// Dirty logs mapped (SET_LOG_BASE) and refused.
    pub dirty_logs_set: u64,
    pub dirty_logs_refused: u64,
    /// Dirty logs whose file shrank under the device (that migration is void).
    pub dirty_log_faults: u64,
}

fn migration_view(h: &VhostBlkExport) -> MigrationView {
    let g = h.gate_status();
    let l = h.log_status();
    MigrationView {
        side: g.side as u64,
        paired_exports: g.sides as u64,
        rings_running: g.rings_running as u64,
        handoffs: g.handoffs,
        waits: g.waits,
        refused: g.refused,
        overlaps: g.overlaps,
        dirty_log_active: l.active,
        dirty_logs_set: l.logs_set,
        dirty_logs_refused: l.logs_refused,
        dirty_log_faults: l.log_faults,
    }
}

/// `guest_memory` of a vhost-user export (see docs/security.md).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestMemoryView {
    /// Memory tables whose backing shrank under the device (each failed it once).
    pub faults: u64,
    /// The current memory table faulted: its queues are stopped until the front-end
    /// sends a new table (a reconnect does).
    pub device_failed: bool,
    /// Regions refused at SET_MEM_TABLE / ADD_MEM_REGION.
    pub regions_refused: u64,
    /// Regions of the current table.
    pub regions: u64,
    /// Of those, regions whose file is sealed against shrinking (F_SEAL_SHRINK).
    pub regions_sealed: u64,
}

impl From<nvmux_vhost::MemoryStatus> for GuestMemoryView {
    fn from(m: nvmux_vhost::MemoryStatus) -> Self {
        GuestMemoryView {
            faults: m.memory_faults,
            device_failed: m.device_failed,
            regions_refused: m.regions_refused,
            regions: m.regions,
            regions_sealed: m.regions_sealed,
        }
    }
}

pub(crate) fn export_view(e: &Export) -> ExportView {
    ExportView {
        spec: e.spec.clone(),
        status: match &e.handle {
            Ok(_) => "ok".into(),
            Err(er) => format!("error: {er}"),
        },
        connected: e.handle.as_ref().map(|h| h.connected()).unwrap_or(false),
        connections: match &e.handle {
            Ok(Handle::Nbd(h)) => Some(h.export.connections()),
            _ => None,
        },
        address: e.spec.kind.address(),
        guest_memory: match &e.handle {
            Ok(Handle::Vhost(h)) => Some(h.memory_status().into()),
            _ => None,
        },
        migration: match &e.handle {
            Ok(Handle::Vhost(h)) => Some(migration_view(h)),
            _ => None,
        },
        vfio_user: match &e.handle {
            Ok(Handle::VfioUser(h)) => Some(h.status().into()),
            _ => None,
        },
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClassView {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub mean_us: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl From<&nvmux_core::stats::ClassSnapshot> for ClassView {
    fn from(c: &nvmux_core::stats::ClassSnapshot) -> Self {
        ClassView {
            ops: c.ops,
            bytes: c.bytes,
            errors: c.errors,
            mean_us: if c.ops == 0 {
                0.0
            } else {
                c.lat_sum_ns as f64 / c.ops as f64 / 1000.0
            },
            p50_us: c.percentile_us(0.5),
            p99_us: c.percentile_us(0.99),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskStatsView {
    pub read: ClassView,
    pub write: ClassView,
    pub other: ClassView,
    pub in_flight: u64,
    /// Fair sharing of the disk's host device, if it takes part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fair: Option<nvmux_func::fair::ShareStats>,
}

impl From<&nvmux_core::stats::Snapshot> for DiskStatsView {
    fn from(s: &nvmux_core::stats::Snapshot) -> Self {
        DiskStatsView {
            read: (&s.read).into(),
            write: (&s.write).into(),
            other: (&s.other).into(),
            in_flight: s.in_flight,
            fair: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerView {
    pub busy_s: f64,
    pub idle_poll_s: f64,
    pub sleeps: u64,
    pub sources: u64,
    /// Queues and connections dropped because serving them panicked.
    #[serde(default)]
    pub panics: u64,
    /// Heap allocations made on this worker thread since it started (counted by the
    /// `nvmux` binary's allocator; serving I/O must not move it).
    #[serde(default)]
    pub allocs: u64,
}

impl From<&nvmux_core::worker::WorkerHandle> for WorkerView {
    fn from(w: &nvmux_core::worker::WorkerHandle) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let s = w.stats();
        WorkerView {
            busy_s: s.busy_ns.load(Relaxed) as f64 / 1e9,
            idle_poll_s: s.idle_poll_ns.load(Relaxed) as f64 / 1e9,
            sleeps: s.sleeps.load(Relaxed),
            sources: s.sources.load(Relaxed),
            panics: s.panics.load(Relaxed),
            allocs: s.allocs.load(Relaxed),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsView {
    pub uptime_s: f64,
    pub disks: BTreeMap<String, DiskStatsView>,
    pub workers: Vec<WorkerView>,
    /// Buffers of the network frontends (`network.memory_budget`).
    #[serde(default)]
    pub network: NetworkView,
    /// NVMe/TCP listeners and what connections met.
    #[serde(default)]
    pub nvmf: nvmf::NvmfStatsView,
}

/// The budget of network buffers shared by NVMe/TCP and NBD connections.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetworkView {
    /// `network.memory_budget` (bytes).
    pub memory_budget: u64,
    /// Bytes reserved by connections now.
    pub memory_used: u64,
    /// Times a reservation had to wait because the budget was full.
    pub memory_waits: u64,
}

impl Daemon {
    /// Per-disk statistics and per-worker counters.
    pub fn stats(&self) -> StatsView {
        let g = self.lock();
        StatsView {
            uptime_s: self.started.elapsed().as_secs_f64(),
            disks: g
                .disks
                .values()
                .map(|d| {
                    let mut v = DiskStatsView::from(&d.stats.snapshot());
                    v.fair = d.qos.share().map(|s| s.stats());
                    (d.spec.name.clone(), v)
                })
                .collect(),
            workers: self
                .workers
                .workers()
                .iter()
                .map(WorkerView::from)
                .collect(),
            network: self.network_view(),
            nvmf: self.nvmf_stats(),
        }
    }

    /// The network frontends' shared buffer budget.
    pub fn network_view(&self) -> NetworkView {
        NetworkView {
            memory_budget: self.net_mem.limit() as u64,
            memory_used: self.net_mem.used() as u64,
            memory_waits: self.net_mem.waits(),
        }
    }
}
