//! The NVMe controller behind the PCI function: the admin queue (served on the session's
//! control thread, synchronously: no admin command waits for a disk), the I/O queues
//! ([`crate::queue::IoQueue`] on the export's workers), asynchronous events and the
//! controller's fatal status.
//!
//! ```text
//!  BAR0 write (control thread) ─► NvmeRegs ─► Controller (PciNvmeDevice)
//!     CC.EN / CC.SHN                             enable / disable / shutdown
//!     SQ0 tail, CQ0 head                         admin commands ─► ACQ + MSI-X vector 0
//!     SQy tail, CQy head (y > 0)                 QueueCtl atomics + eventfd kick ─► worker
//!  worker: IoQueue (WorkSource) ─► nvm::parse_io/prepare/submit ─► Engine ─► BlockQueue
//! ```
//!
//! Identify data, log pages and feature values come from the model NVMe/TCP uses
//! ([`nvmux_nvmf::model`]); I/O commands from its NVM command model
//! ([`nvmux_nvmf::nvm`]).
//!
//! **Bad input.** A doorbell write for a queue that does not exist, a value at or past a
//! queue's size, or a malformed write puts the controller in the fatal status (CSTS.CFS):
//! its I/O queues stop, the guest's driver resets the controller. Only this guest's
//! controller is affected. A bad PRP fails its command with Data Transfer Error (outside
//! the mapped DMA) or PRP Offset Invalid.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::WorkerHandle;
use nvmux_core::{BlockDevice, Status};
use nvmux_nvmf::ctrl::{sc, Sqe, MDTS};
use nvmux_nvmf::model;

use crate::device::Irqs;
use crate::dma::DmaSpace;
use crate::nvme::{Doorbell, EnableParams, PciNvmeDevice, Shutdown};
use crate::prp;
use crate::queue::{CqRing, IoQueue, IoQueueParams, QueueCtl, Shadow};

/// CAP.MQES: the largest queue has MQES + 1 entries.
pub const MQES: u16 = 1023;
/// Asynchronous Event Requests held at most (AERL + 1).
pub const MAX_AERS: usize = 4;
/// How long a controller reset, a queue deletion or a DMA_UNMAP waits for a queue's
/// in-flight commands before it gives up on them (they complete into nothing).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Admin commands served per doorbell write at most (the rest wait for the next one).
const ADMIN_PER_DOORBELL: usize = 256;

/// Status codes of the PCIe controller beyond the shared ones.
mod st {
    use nvmux_core::Status;
    pub const CQ_INVALID: Status = Status::new(1, 0x00);
    pub const INVALID_VECTOR: Status = Status::new(1, 0x08);
    pub const INVALID_QUEUE_DELETION: Status = Status::new(1, 0x0c);
}

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
    pub nguid: [u8; 16],
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
        // A stable NGUID from the serial (the export's name): "nvmux" + CRC32C of it,
        // salted three ways.
        let mut nguid = [0u8; 16];
        nguid[..4].copy_from_slice(b"nvmx");
        for (i, salt) in [b'a', b'b', b'c'].iter().enumerate() {
            let mut c = nvmux_core::crc32c::Crc32c::new();
            c.update(&[*salt]);
            c.update(serial.as_bytes());
            nguid[4 + i * 4..8 + i * 4].copy_from_slice(&c.finish().to_be_bytes());
        }
        CtrlShared {
            dev,
            serial,
            read_only,
            num_queues,
            workers,
            stats,
            counters: CtrlCounters::default(),
            nguid,
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

/// A created I/O completion queue.
#[derive(Clone, Copy)]
struct IoCq {
    ring: CqRing,
    /// The submission queue bound to it (nvmux binds one SQ per CQ).
    sq: Option<u16>,
    /// An SQ was bound to it before: its tail and phase live on with that SQ's worker,
    /// so a CQ takes one SQ in its life (Linux deletes and creates them in pairs).
    used: bool,
}

/// A running I/O submission queue.
struct IoSq {
    ctl: Arc<QueueCtl>,
    cqid: u16,
    size: u16,
    worker: usize,
}

/// The NVMe controller of one client.
pub struct Controller {
    shared: Arc<CtrlShared>,
    dma: Arc<DmaSpace>,
    irqs: Arc<Irqs>,
    enabled: bool,
    fatal: bool,
    asq: u64,
    asq_size: u16,
    asq_head: u16,
    asq_tail: u16,
    acq: CqRing,
    iosqes: u8,
    iocqes: u8,
    /// I/O queues granted by Set Features Number of Queues (0: not asked yet).
    granted: u16,
    cqs: Vec<Option<IoCq>>,
    sqs: Vec<Option<IoSq>>,
    shadow: Option<(u64, u64)>,
    /// Held Asynchronous Event Requests (their command ids).
    aers: Vec<u16>,
    aec: u32,
    aen_pending: bool,
    aen_masked: bool,
    ns_changed: bool,
    cap_gen: u64,
    /// Feature values the host set (by feature id, 0..32).
    features: [u32; 32],
    next_worker: usize,
}

impl Controller {
    pub fn new(shared: Arc<CtrlShared>, dma: Arc<DmaSpace>, irqs: Arc<Irqs>) -> Controller {
        shared.connected.store(true, Ordering::Relaxed);
        let n = shared.num_queues as usize + 1;
        let cap_gen = shared.capacity_gen.load(Ordering::Acquire);
        Controller {
            shared,
            dma,
            irqs,
            enabled: false,
            fatal: false,
            asq: 0,
            asq_size: 0,
            asq_head: 0,
            asq_tail: 0,
            acq: CqRing::new(0, 2, 0, true),
            iosqes: 0,
            iocqes: 0,
            granted: 0,
            cqs: (0..n).map(|_| None).collect(),
            sqs: (0..n).map(|_| None).collect(),
            shadow: None,
            aers: Vec::with_capacity(MAX_AERS),
            aec: 0,
            aen_pending: false,
            aen_masked: false,
            ns_changed: false,
            cap_gen,
            features: [0; 32],
            next_worker: 0,
        }
    }

    fn granted(&self) -> u16 {
        if self.granted == 0 {
            self.shared.num_queues
        } else {
            self.granted
        }
    }

    fn go_fatal(&mut self, why: &str) {
        if !self.fatal {
            self.fatal = true;
            self.shared
                .counters
                .fatal_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!("vfio-user nvme: {why}: controller fatal status (CSTS.CFS); the guest must reset the controller");
            // Stop the I/O queues: nothing more is fetched, nothing more posted.
            for q in self.sqs.iter().flatten() {
                q.ctl.fatal.store(true, Ordering::Release);
                q.ctl.kick.signal();
            }
        }
    }

    fn bad_doorbell(&mut self, why: &str) {
        self.shared
            .counters
            .bad_doorbells
            .fetch_add(1, Ordering::Relaxed);
        self.go_fatal(why);
    }

    /// Stop every I/O queue and wait for each to finish (posting its last completions
    /// when `post`).
    fn stop_queues(&mut self, post: bool) {
        let qids: Vec<u16> = (1..self.sqs.len() as u16).collect();
        for q in qids {
            self.stop_sq(q, post);
        }
        for c in self.cqs.iter_mut() {
            *c = None;
        }
        self.shared.counters.io_queues.store(0, Ordering::Relaxed);
    }

    fn stop_sq(&mut self, qid: u16, post: bool) {
        let Some(q) = self.sqs.get_mut(qid as usize).and_then(|s| s.take()) else {
            return;
        };
        q.ctl.post_on_stop.store(post, Ordering::Release);
        q.ctl.stop.store(true, Ordering::Release);
        q.ctl.kick.signal();
        if let Some(w) = self.shared.workers.get(q.worker) {
            w.wake();
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !q.ctl.finished.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                tracing::error!(
                    "vfio-user nvme: I/O queue {qid} did not drain within {DRAIN_TIMEOUT:?}; left behind"
                );
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        if let Some(Some(c)) = self.cqs.get_mut(q.cqid as usize) {
            c.sq = None;
        }
        self.shared
            .counters
            .io_queues
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Serve the admin commands between the head and the tail (while the ACQ has room).
    fn process_admin(&mut self) {
        if !self.enabled || self.fatal {
            return;
        }
        let table = self.dma.load();
        let mut n = 0;
        let mut posted = false;
        while self.asq_head != self.asq_tail && !self.acq.full() && n < ADMIN_PER_DOORBELL {
            let mut sqe = [0u8; 64];
            match table.translate(self.asq + self.asq_head as u64 * 64, 64, false) {
                Ok(g) => {
                    g.read_to(&mut sqe);
                }
                Err(_) => {
                    self.go_fatal("the admin submission queue is outside the mapped DMA");
                    return;
                }
            }
            self.asq_head = (self.asq_head + 1) % self.asq_size;
            n += 1;
            let cid = u16::from_le_bytes([sqe[2], sqe[3]]);
            self.shared
                .counters
                .admin_commands
                .fetch_add(1, Ordering::Relaxed);
            let Some((dw0, status)) = self.admin(&sqe, &table) else {
                continue; // held (AER)
            };
            tracing::debug!(
                "vfio-user nvme: admin opcode {:#04x} cid {cid} cdw10 {:#x}: status {:#x}",
                sqe[0],
                u32::from_le_bytes([sqe[40], sqe[41], sqe[42], sqe[43]]),
                status.to_cqe_bits()
            );
            if self
                .acq
                .post(&table, dw0, self.asq_head, 0, cid, status)
                .is_err()
            {
                self.go_fatal("the admin completion queue is outside the mapped DMA");
                return;
            }
            posted = true;
        }
        if posted {
            self.admin_irq();
        }
        if !posted {
            self.deliver_event();
        }
    }

    fn admin_irq(&self) {
        if !self.irqs.signal_msix(0) {
            self.irqs.assert_intx();
        }
        self.shared
            .counters
            .interrupts
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Complete a held AER if an event is due.
    fn deliver_event(&mut self) {
        if !self.enabled || self.fatal || !self.aen_pending || self.acq.full() {
            return;
        }
        let Some(cid) = self.aers.pop() else {
            return;
        };
        let table = self.dma.load();
        if self
            .acq
            .post(
                &table,
                model::AEN_NS_CHANGED,
                self.asq_head,
                0,
                cid,
                Status::SUCCESS,
            )
            .is_err()
        {
            self.go_fatal("the admin completion queue is outside the mapped DMA");
            return;
        }
        self.aen_pending = false;
        self.aen_masked = true;
        self.shared
            .counters
            .async_events
            .fetch_add(1, Ordering::Relaxed);
        self.admin_irq();
    }

    /// One admin command: (dword 0, status), or None when it is held (AER).
    fn admin(&mut self, sqe: &[u8; 64], table: &crate::dma::DmaTable) -> Option<(u32, Status)> {
        let s = Sqe(sqe);
        let ok = |dw0| Some((dw0, Status::SUCCESS));
        let err = |st| Some((0, st));
        // PSDT must be 0 (PRPs): nvmux offers no SGLs on PCIe.
        if (sqe[1] >> 6) & 3 != 0 {
            return err(Status::INVALID_FIELD);
        }
        match s.opcode() {
            0x00 => err(self.delete_sq(s)),
            0x01 => err(self.create_sq(s, table)),
            0x02 => self.get_log_page(s, table),
            0x04 => err(self.delete_cq(s)),
            0x05 => err(self.create_cq(s, table)),
            0x06 => self.identify(s, table),
            0x08 => ok(1), // Abort: the command was not aborted
            0x09 => self.set_features(s),
            0x0a => self.get_features(s),
            0x0c => {
                if self.aers.len() >= MAX_AERS {
                    return err(sc::AER_LIMIT);
                }
                self.aers.push(s.cid());
                None
            }
            0x18 => ok(0), // Keep Alive
            0x7c => err(self.doorbell_buffer_config(s, table)),
            _ => err(Status::INVALID_OPCODE),
        }
    }

    fn send(&self, s: Sqe<'_>, table: &crate::dma::DmaTable, data: &[u8], len: usize) -> Status {
        match prp::write_all(table, s.prp1(), s.prp2(), len, data) {
            Ok(()) => Status::SUCCESS,
            Err(e) => {
                if matches!(e, prp::PrpError::Fault(_)) {
                    self.shared
                        .counters
                        .bad_prps
                        .fetch_add(1, Ordering::Relaxed);
                }
                e.status()
            }
        }
    }

    fn identify(&self, s: Sqe<'_>, table: &crate::dma::DmaTable) -> Option<(u32, Status)> {
        let cns = s.cdw(10) & 0xff;
        let nsid = s.nsid();
        let mut b = [0u8; 4096];
        match cns {
            0x01 => self.identify_ctrl(&mut b),
            0x00 => {
                if nsid == 0 || (nsid > 1 && nsid != 0xffff_ffff) {
                    return Some((0, Status::INVALID_NAMESPACE));
                }
                let dev = &self.shared.dev;
                let mut info = dev.info().clone();
                info.read_only |= self.shared.read_only;
                let blocks = dev.capacity_bytes() / info.block_size.max(1) as u64;
                model::identify_ns(&info, blocks, &self.shared.nguid, false, &mut b);
            }
            0x02 => {
                if nsid >= 0xffff_fffe {
                    return Some((0, Status::INVALID_NAMESPACE));
                }
                if nsid < 1 {
                    model::put32(&mut b, 0, 1);
                }
            }
            0x03 => {
                if nsid != 1 {
                    return Some((0, Status::INVALID_NAMESPACE));
                }
                model::ns_descriptors(&self.shared.nguid, &mut b);
            }
            // I/O command set specific controller / namespace data for the NVM set.
            0x06 if s.cdw(11) >> 24 == 0 => {}
            0x05 if s.cdw(11) >> 24 == 0 => {
                if nsid != 1 {
                    return Some((0, Status::INVALID_NAMESPACE));
                }
            }
            _ => return Some((0, Status::INVALID_FIELD)),
        }
        Some((0, self.send(s, table, &b, 4096)))
    }

    fn identify_ctrl(&self, b: &mut [u8]) {
        model::identify_ctrl_common(
            &model::CtrlIdent {
                serial: &self.shared.serial,
                cntlid: 1,
                mdts: MDTS,
                aerl: (MAX_AERS - 1) as u8,
                maxcmd: MQES + 1,
                nn: 1,
                ns_notices: true,
            },
            b,
        );
        model::put16(b, 0, crate::pci::VENDOR_ID); // VID
        model::put16(b, 2, crate::pci::VENDOR_ID); // SSVID
        model::put16(b, 256, 1 << 8); // OACS: Doorbell Buffer Config
                                      // SUBNQN: one per export (the serial is the export's name).
        let nqn = format!("nqn.2024-01.io.nvmux:vfio-user:{}", self.shared.serial);
        let n = nqn.len().min(255);
        b[768..768 + n].copy_from_slice(&nqn.as_bytes()[..n]);
    }

    fn get_log_page(&mut self, s: Sqe<'_>, table: &crate::dma::DmaTable) -> Option<(u32, Status)> {
        let lid = s.cdw(10) & 0xff;
        let rae = s.cdw(10) & (1 << 15) != 0;
        let numd = ((s.cdw(11) & 0xffff) as u64) << 16 | (s.cdw(10) >> 16) as u64;
        let len = (numd + 1) * 4;
        if len > prp::MAX_PRP_BYTES as u64 {
            return Some((0, Status::INVALID_FIELD));
        }
        let off = (s.cdw(13) as u64) << 32 | s.cdw(12) as u64;
        if off & 3 != 0 {
            return Some((0, Status::INVALID_FIELD));
        }
        let mut page = [0u8; 4096];
        let size = match lid {
            0x01 => 64,
            0x02 => {
                page[..512]
                    .copy_from_slice(&model::smart_log(std::iter::once(&*self.shared.stats)));
                512
            }
            0x03 => {
                page[..512].copy_from_slice(&model::firmware_log());
                512
            }
            0x04 => {
                if self.ns_changed {
                    model::put32(&mut page, 0, 1);
                }
                if !rae {
                    self.ns_changed = false;
                    self.aen_masked = false;
                }
                4096
            }
            _ => return Some((0, sc::INVALID_LOG_PAGE)),
        };
        if off > size as u64 {
            return Some((0, Status::INVALID_FIELD));
        }
        let src = &page[off as usize..size];
        Some((0, self.send(s, table, src, len as usize)))
    }

    fn set_features(&mut self, s: Sqe<'_>) -> Option<(u32, Status)> {
        let fid = s.cdw(10) & 0xff;
        if s.cdw(10) & (1 << 31) != 0 {
            return Some((0, sc::FEATURE_NOT_SAVEABLE));
        }
        let v = s.cdw(11);
        match fid {
            0x07 => {
                let (nsq, ncq) = ((v & 0xffff) as u16, (v >> 16) as u16);
                if nsq == 0xffff || ncq == 0xffff {
                    return Some((0, Status::INVALID_FIELD));
                }
                if self.sqs.iter().any(|q| q.is_some()) || self.cqs.iter().any(|q| q.is_some()) {
                    return Some((0, sc::CMD_SEQUENCE));
                }
                self.granted = (nsq.max(ncq) + 1).min(self.shared.num_queues);
                let n = (self.granted - 1) as u32;
                Some((n | n << 16, Status::SUCCESS))
            }
            0x0b => {
                self.aec = v;
                Some((0, Status::SUCCESS))
            }
            // Remembered and reported back; none changes what the controller does:
            // arbitration, power management, temperature threshold, error recovery,
            // volatile write cache (flushes go to the disk either way), interrupt
            // coalescing (every completion batch interrupts), interrupt vector
            // configuration, write atomicity.
            0x01 | 0x02 | 0x04 | 0x05 | 0x06 | 0x08 | 0x09 | 0x0a => {
                self.features[fid as usize] = v;
                Some((0, Status::SUCCESS))
            }
            _ => Some((0, Status::INVALID_FIELD)),
        }
    }

    fn get_features(&self, s: Sqe<'_>) -> Option<(u32, Status)> {
        let fid = s.cdw(10) & 0xff;
        let sel = (s.cdw(10) >> 8) & 7;
        if sel == 3 {
            return match fid {
                0x01..=0x0b => Some((0b100, Status::SUCCESS)),
                _ => Some((0, Status::INVALID_FIELD)),
            };
        }
        let current = sel == 0;
        let v = match fid {
            0x07 => {
                let n = (if current {
                    self.granted()
                } else {
                    self.shared.num_queues
                } - 1) as u32;
                n | n << 16
            }
            0x0b => {
                if current {
                    self.aec
                } else {
                    0
                }
            }
            0x01 | 0x02 | 0x04 | 0x05 | 0x06 | 0x08 | 0x09 | 0x0a => {
                let set = self.features[fid as usize];
                if current && (set != 0 || fid == 0x08) {
                    set
                } else {
                    model::common_feature(fid).unwrap_or(0)
                }
            }
            _ => return Some((0, Status::INVALID_FIELD)),
        };
        Some((v, Status::SUCCESS))
    }

    fn qid_ok(&self, qid: u16) -> bool {
        qid >= 1 && qid <= self.granted()
    }

    fn create_cq(&mut self, s: Sqe<'_>, table: &crate::dma::DmaTable) -> Status {
        let qid = (s.cdw(10) & 0xffff) as u16;
        let size = (s.cdw(10) >> 16) + 1;
        let flags = s.cdw(11);
        let (pc, ien, iv) = (flags & 1 != 0, flags & 2 != 0, (flags >> 16) as u16);
        if !self.qid_ok(qid) || self.cqs.get(qid as usize).is_none_or(|c| c.is_some()) {
            return sc::INVALID_QUEUE_ID;
        }
        if size < 2 || size > MQES as u32 + 1 {
            return sc::INVALID_QUEUE_SIZE;
        }
        if !pc || self.iocqes != 4 {
            return Status::INVALID_FIELD;
        }
        if iv as u32 >= self.irqs.msix_vectors() {
            return st::INVALID_VECTOR;
        }
        let base = s.prp1();
        if !base.is_multiple_of(prp::PAGE) {
            return prp::PrpError::Offset.status();
        }
        if table.translate(base, size as usize * 16, true).is_err() {
            self.shared
                .counters
                .bad_prps
                .fetch_add(1, Ordering::Relaxed);
            return Status::DATA_TRANSFER_ERROR;
        }
        self.cqs[qid as usize] = Some(IoCq {
            ring: CqRing::new(base, size as u16, iv, ien),
            sq: None,
            used: false,
        });
        Status::SUCCESS
    }

    fn create_sq(&mut self, s: Sqe<'_>, table: &crate::dma::DmaTable) -> Status {
        let qid = (s.cdw(10) & 0xffff) as u16;
        let size = (s.cdw(10) >> 16) + 1;
        let flags = s.cdw(11);
        let (pc, cqid) = (flags & 1 != 0, (flags >> 16) as u16);
        if !self.qid_ok(qid) || self.sqs.get(qid as usize).is_none_or(|q| q.is_some()) {
            return sc::INVALID_QUEUE_ID;
        }
        let Some(Some(cq)) = self.cqs.get(cqid as usize).copied() else {
            return st::CQ_INVALID;
        };
        if cqid == 0 || cq.sq.is_some() || cq.used {
            // nvmux binds one submission queue per completion queue, once (as Linux uses
            // them).
            return st::CQ_INVALID;
        }
        if size < 2 || size > MQES as u32 + 1 {
            return sc::INVALID_QUEUE_SIZE;
        }
        if !pc || self.iosqes != 6 {
            return Status::INVALID_FIELD;
        }
        let base = s.prp1();
        if !base.is_multiple_of(prp::PAGE) {
            return prp::PrpError::Offset.status();
        }
        if table.translate(base, size as usize * 64, false).is_err() {
            self.shared
                .counters
                .bad_prps
                .fetch_add(1, Ordering::Relaxed);
            return Status::DATA_TRANSFER_ERROR;
        }
        let ctl = match QueueCtl::new(qid) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!("vfio-user nvme: I/O queue {qid}: no eventfd: {e}");
                return Status::INTERNAL_ERROR;
            }
        };
        if let Some((db, ei)) = self.shadow {
            ctl.shadow_ei.store(ei, Ordering::Release);
            ctl.shadow_db.store(db, Ordering::Release);
        }
        let params = IoQueueParams {
            qid,
            sq_base: base,
            sq_size: size as u16,
            cq: cq.ring,
            shadow: self.shadow.map(|(db, ei)| Shadow { db, ei }),
        };
        let q = match IoQueue::new(
            params,
            ctl.clone(),
            self.shared.clone(),
            self.dma.clone(),
            self.irqs.clone(),
        ) {
            Ok(q) => q,
            Err(e) => {
                tracing::error!("vfio-user nvme: I/O queue {qid}: {e}");
                return Status::INTERNAL_ERROR;
            }
        };
        let nw = self.shared.workers.len().max(1);
        let w = self.next_worker % nw;
        self.next_worker += 1;
        let Some(worker) = self.shared.workers.get(w) else {
            return Status::INTERNAL_ERROR;
        };
        worker.attach(Box::new(q));
        if let Some(Some(c)) = self.cqs.get_mut(cqid as usize) {
            c.sq = Some(qid);
            c.used = true;
        }
        self.sqs[qid as usize] = Some(IoSq {
            ctl,
            cqid,
            size: size as u16,
            worker: w,
        });
        self.shared
            .counters
            .io_queues
            .fetch_add(1, Ordering::Relaxed);
        Status::SUCCESS
    }

    fn delete_sq(&mut self, s: Sqe<'_>) -> Status {
        let qid = (s.cdw(10) & 0xffff) as u16;
        if !self.qid_ok(qid) || self.sqs.get(qid as usize).is_none_or(|q| q.is_none()) {
            return sc::INVALID_QUEUE_ID;
        }
        self.stop_sq(qid, true);
        Status::SUCCESS
    }

    fn delete_cq(&mut self, s: Sqe<'_>) -> Status {
        let qid = (s.cdw(10) & 0xffff) as u16;
        match self.cqs.get(qid as usize).copied() {
            Some(Some(c)) if qid != 0 => {
                if c.sq.is_some() {
                    return st::INVALID_QUEUE_DELETION;
                }
                self.cqs[qid as usize] = None;
                Status::SUCCESS
            }
            _ => sc::INVALID_QUEUE_ID,
        }
    }

    fn doorbell_buffer_config(&mut self, s: Sqe<'_>, table: &crate::dma::DmaTable) -> Status {
        let (db, ei) = (s.prp1(), s.prp2());
        if !db.is_multiple_of(prp::PAGE) || !ei.is_multiple_of(prp::PAGE) || db == 0 || ei == 0 {
            return Status::INVALID_FIELD;
        }
        if table.translate(db, prp::PAGE as usize, true).is_err()
            || table.translate(ei, prp::PAGE as usize, true).is_err()
        {
            return Status::INVALID_FIELD;
        }
        // Applies to the I/O queues created from now on and to those that exist: their
        // shadow doorbells start from the values of the last BAR0 doorbell writes (what
        // the controller has seen), and their workers switch over.
        self.shadow = Some((db, ei));
        for q in self.sqs.iter().flatten() {
            let qid = q.ctl.qid as u64;
            let tail = q.ctl.sq_tail.load(Ordering::Acquire);
            let head = q.ctl.cq_head.load(Ordering::Acquire);
            if let Ok(g) = table.translate(db + qid * 8, 8, true) {
                g.write_at(0, &tail.to_le_bytes());
                g.write_at(4, &head.to_le_bytes());
            }
            q.ctl.shadow_ei.store(ei, Ordering::Release);
            q.ctl.shadow_db.store(db, Ordering::Release);
            q.ctl.kick.signal();
        }
        Status::SUCCESS
    }

    /// The capacity changed: a namespace attribute notice, if the host enabled them.
    fn check_capacity(&mut self) {
        let g = self.shared.capacity_gen.load(Ordering::Acquire);
        if g == self.cap_gen {
            return;
        }
        self.cap_gen = g;
        self.ns_changed = true;
        if self.aec & model::AEC_NS_ATTR != 0 && !self.aen_masked {
            self.aen_pending = true;
        }
        self.deliver_event();
    }

    /// Wait until every I/O queue is idle (a DMA_UNMAP is pending), or give up.
    fn pause_queues(&mut self) {
        for q in self.sqs.iter().flatten() {
            q.ctl.idle.store(false, Ordering::Release);
            q.ctl.pause.store(true, Ordering::Release);
            q.ctl.kick.signal();
            if let Some(w) = self.shared.workers.get(q.worker) {
                w.wake();
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for q in self.sqs.iter().flatten() {
            while !q.ctl.idle.load(Ordering::Acquire)
                && !q.ctl.finished.load(Ordering::Acquire)
                && !q.ctl.fatal.load(Ordering::Acquire)
            {
                if Instant::now() > deadline {
                    tracing::error!(
                        "vfio-user nvme: I/O queue {} did not quiesce for a DMA_UNMAP within {DRAIN_TIMEOUT:?}",
                        q.ctl.qid
                    );
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn resume_queues(&mut self) {
        for q in self.sqs.iter().flatten() {
            q.ctl.pause.store(false, Ordering::Release);
            q.ctl.kick.signal();
        }
    }

    /// I/O submission queues running now.
    pub fn queue_count(&self) -> usize {
        self.sqs.iter().flatten().count()
    }

    /// Test view: the I/O queues and the sizes they were created with.
    #[cfg(test)]
    pub(crate) fn io_sqs(&self) -> Vec<(u16, u16)> {
        self.sqs
            .iter()
            .flatten()
            .map(|q| (q.ctl.qid, q.size))
            .collect()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop_queues(false);
        self.shared.counters.enabled.store(false, Ordering::Relaxed);
        // The client's mappings go with it: the view shows none until the next one maps.
        self.shared.counters.dma_regions.store(0, Ordering::Relaxed);
        self.shared.connected.store(false, Ordering::Relaxed);
    }
}

impl PciNvmeDevice for Controller {
    fn enable(&mut self, p: &EnableParams) -> Result<(), String> {
        if p.page_size != prp::PAGE as u32 {
            return Err(format!("page size {} (only 4096)", p.page_size));
        }
        self.enabled = true;
        self.fatal = false;
        self.asq = p.asq;
        self.asq_size = p.asq_entries;
        self.asq_head = 0;
        self.asq_tail = 0;
        self.acq = CqRing::new(p.acq, p.acq_entries, 0, true);
        self.iosqes = p.iosqes;
        self.iocqes = p.iocqes;
        self.shared.counters.enabled.store(true, Ordering::Relaxed);
        self.cap_gen = self.shared.capacity_gen.load(Ordering::Acquire);
        self.shared
            .counters
            .dma_regions
            .store(self.dma.load().len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn disable(&mut self) {
        self.stop_queues(false);
        self.enabled = false;
        self.fatal = false;
        self.granted = 0;
        self.shadow = None;
        self.aers.clear();
        self.aec = 0;
        self.aen_pending = false;
        self.aen_masked = false;
        self.features = [0; 32];
        self.irqs.deassert_intx();
        self.shared.counters.enabled.store(false, Ordering::Relaxed);
    }

    fn shutdown(&mut self, kind: Shutdown) {
        // Normal: what is in flight completes into its queues first.
        self.stop_queues(kind == Shutdown::Normal);
    }

    fn doorbell(&mut self, db: Doorbell) {
        if self.fatal {
            return;
        }
        match db {
            Doorbell::SqTail { qid: 0, tail } => {
                if tail >= self.asq_size {
                    return self.bad_doorbell(&format!(
                        "admin SQ tail {tail} past its {} entries",
                        self.asq_size
                    ));
                }
                self.asq_tail = tail;
                self.process_admin();
            }
            Doorbell::CqHead { qid: 0, head } => {
                if head >= self.acq.size {
                    return self.bad_doorbell(&format!(
                        "admin CQ head {head} past its {} entries",
                        self.acq.size
                    ));
                }
                self.acq.head = head;
                if self.acq.empty() {
                    self.irqs.deassert_intx();
                }
                // Commands may wait for room in the ACQ.
                self.process_admin();
            }
            Doorbell::SqTail { qid, tail } => {
                let Some(Some(q)) = self.sqs.get(qid as usize) else {
                    return self.bad_doorbell(&format!("SQ {qid} tail doorbell: no such queue"));
                };
                if tail >= q.size {
                    let size = q.size;
                    return self
                        .bad_doorbell(&format!("SQ {qid} tail {tail} past its {size} entries"));
                }
                q.ctl.sq_tail.store(tail as u32, Ordering::SeqCst);
                q.ctl.notify();
            }
            Doorbell::CqHead { qid, head } => {
                let Some(Some(c)) = self.cqs.get(qid as usize).copied() else {
                    return self.bad_doorbell(&format!("CQ {qid} head doorbell: no such queue"));
                };
                if head >= c.ring.size {
                    return self.bad_doorbell(&format!(
                        "CQ {qid} head {head} past its {} entries",
                        c.ring.size
                    ));
                }
                if let Some(Some(q)) = c.sq.and_then(|s| self.sqs.get(s as usize)) {
                    q.ctl.cq_head.store(head as u32, Ordering::SeqCst);
                    q.ctl.notify();
                }
            }
            Doorbell::Invalid { offset, len, value } => self.bad_doorbell(&format!(
                "doorbell write at BAR0 {offset:#x} ({len} bytes, value {value:#x}) refused"
            )),
        }
    }

    fn tick(&mut self) {
        if !self.enabled {
            return;
        }
        if !self.fatal
            && self
                .sqs
                .iter()
                .flatten()
                .any(|q| q.ctl.fatal.load(Ordering::Acquire))
        {
            self.go_fatal("an I/O queue failed");
        }
        self.check_capacity();
        self.shared
            .counters
            .dma_regions
            .store(self.dma.load().len() as u64, Ordering::Relaxed);
    }

    fn before_unmap(&mut self, _iova: u64, _size: u64, _all: bool) {
        // Commands in flight keep the old table (and its memory) alive anyway; this
        // makes sure none of them writes guest memory after the unmap is acknowledged.
        if self.sqs.iter().any(|q| q.is_some()) {
            self.pause_queues();
        }
    }

    fn after_unmap(&mut self) {
        // The queues reload the table (its generation moved); a queue whose rings went
        // away fails (CSTS.CFS) on its next access.
        self.resume_queues();
    }

    fn fatal(&self) -> bool {
        self.fatal
            || self
                .sqs
                .iter()
                .flatten()
                .any(|q| q.ctl.fatal.load(Ordering::Acquire))
    }
}
