//! The NVMe controller behind the PCI function (skeleton; filled in next).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::WorkerHandle;
use nvmux_core::BlockDevice;

use crate::device::Irqs;
use crate::dma::DmaSpace;
use crate::nvme::{Doorbell, EnableParams, PciNvmeDevice, Shutdown};

/// CAP.MQES: the largest queue has MQES + 1 entries.
pub const MQES: u16 = 1023;

/// Counters of an export (every session).
#[derive(Default)]
pub struct CtrlCounters {
    pub enabled: AtomicBool,
    pub io_queues: AtomicU64,
    pub dma_regions: AtomicU64,
    pub bad_prps: AtomicU64,
    pub bad_doorbells: AtomicU64,
    pub admin_commands: AtomicU64,
    pub io_commands: AtomicU64,
    pub interrupts: AtomicU64,
    pub async_events: AtomicU64,
    pub fatal_errors: AtomicU64,
}

/// What every controller of an export shares: the disk, the workers, the counters.
pub struct CtrlShared {
    pub dev: Arc<dyn BlockDevice>,
    pub serial: String,
    pub read_only: bool,
    pub num_queues: u16,
    pub workers: Vec<WorkerHandle>,
    pub stats: Arc<DiskStats>,
    pub counters: CtrlCounters,
    connected: AtomicBool,
    capacity_gen: AtomicU64,
}

impl CtrlShared {
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        serial: String,
        read_only: bool,
        num_queues: u16,
        workers: Vec<WorkerHandle>,
        stats: Arc<DiskStats>,
    ) -> CtrlShared {
        CtrlShared {
            dev,
            serial,
            read_only,
            num_queues,
            workers,
            stats,
            counters: CtrlCounters::default(),
            connected: AtomicBool::new(false),
            capacity_gen: AtomicU64::new(0),
        }
    }
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    pub fn capacity_changed(&self) {
        self.capacity_gen.fetch_add(1, Ordering::AcqRel);
    }
}

/// The NVMe controller of one client.
pub struct Controller {
    shared: Arc<CtrlShared>,
    #[allow(dead_code)]
    dma: Arc<DmaSpace>,
    #[allow(dead_code)]
    irqs: Arc<Irqs>,
}

impl Controller {
    pub fn new(shared: Arc<CtrlShared>, dma: Arc<DmaSpace>, irqs: Arc<Irqs>) -> Controller {
        shared.connected.store(true, Ordering::Relaxed);
        Controller { shared, dma, irqs }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shared.connected.store(false, Ordering::Relaxed);
    }
}

impl PciNvmeDevice for Controller {
    fn enable(&mut self, _p: &EnableParams) -> Result<(), String> {
        Ok(())
    }
    fn disable(&mut self) {}
    fn shutdown(&mut self, _kind: Shutdown) {}
    fn doorbell(&mut self, _db: Doorbell) {}
}
