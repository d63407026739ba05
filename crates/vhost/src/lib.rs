//! vhost-user-blk frontend.
//!
//! One [`VhostBlkExport`] serves one disk on one Unix socket. Its task on the process's
//! control threads (`session.rs` on [`nvmux_core::ctlpoll`]: a few epoll threads for all
//! exports) accepts a vhost-user connection and answers the control messages once each is
//! whole (the `vhost` crate parses them; [`BlkBackend`] implements the requests). When a virtqueue is ready it becomes a
//! [`vring::VringSource`] on a worker thread. When the client goes away every queue is
//! stopped and the socket listens again, so a VM can reboot or be restarted and attach
//! once more.
//!
//! ```text
//!  QEMU / libblkio ──unix socket──► control thread (BlkBackend: features, memory
//!        │                              table, vring setup, config space)
//!        │ kick eventfd                      │ start / stop queue
//!        ▼                                   ▼
//!   guest memory ◄── zero-copy I/O ── worker thread: VringSource ─► BlockQueue
//! ```
//!
//! Vring processing is ours (not `vhost-user-backend`'s), which is what lets us offer
//! inflight tracking (INFLIGHT_SHMFD, [`inflight`]): a daemon killed with requests in
//! flight resubmits them when QEMU reconnects.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::WorkerHandle;
use nvmux_core::{BlockDevice, DeviceInfo, Error, ErrorKind};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult};
use vhost::vhost_user::{Listener, VhostUserBackendReqHandlerMut};

mod backend_req;
pub mod blk;
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
pub mod inflight;
pub mod log;
mod session;
mod takeover;
pub use takeover::{drop_unclaimed_sessions, stash_session};
pub mod mem;
pub mod migration;
pub mod split;
mod vring;

use log::{LogCounters, LogMap, LogSlot};
use mem::{ExportCounters, MemSlot, Memory, RegionDesc};
use migration::RingGate;
use split::{RingAddrs, SplitQueue};
use vring::{MemView, QueueCtl, VringParams, VringSource};

/// Largest virtqueue size accepted.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Memory slots offered with CONFIGURE_MEM_SLOTS.
pub const MAX_MEM_SLOTS: u64 = 32;

/// How a disk is exported.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub socket: PathBuf,
    pub num_queues: u16,
    /// Serial returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// The socket's owner and mode, set before it appears at `socket`.
    pub perms: nvmux_core::unixsock::SocketPerms,
    /// Migration peer: share this gate (another export's, [`VhostBlkExport::gate`]) so that
    /// the rings of only one of the two exports run at a time (see `migration.rs`). None:
    /// a gate of its own.
    pub gate: Option<Arc<RingGate>>,
}

#[derive(Default)]
struct VringCfg {
    size: u16,
    /// Guest addresses of the descriptor table, available ring and used ring.
    addrs: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    /// The current call eventfd.
    call: Option<File>,
    /// Call eventfds replaced while the queue runs, with the epoch of the replacement:
    /// closed once the worker acknowledged that epoch (see [`BlkBackend::set_vring_call`]).
    retired_calls: VecDeque<(u64, File)>,
    enabled: bool,
    /// Guest address of the used ring for the dirty log (SET_VRING_ADDR with
    /// VHOST_VRING_F_LOG), see `log.rs`.
    log_addr: Option<u64>,
    running: Option<Running>,
}

struct Running {
    ctl: Arc<QueueCtl>,
    rx: Receiver<u16>,
    worker: WorkerHandle,
}

#[derive(Clone, Copy)]
struct RegionInfo {
    gpa: u64,
    size: u64,
    uaddr: u64,
}

/// The vhost-user request handler of one connection.
pub struct BlkBackend {
    dev: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    config: [u8; blk::CONFIG_SIZE],
    serial: [u8; blk::ID_BYTES],
    num_queues: u16,
    acked_features: u64,
    acked_protocol: u64,
    mem: Arc<MemSlot>,
    regions: Vec<RegionInfo>,
    vrings: Vec<VringCfg>,
    workers: Vec<WorkerHandle>,
    stats: Arc<DiskStats>,
    counters: Arc<ExportCounters>,
    name: String,
    /// The inflight region the front-end set up (GET/SET_INFLIGHT_FD).
    inflight: Option<Arc<inflight::Region>>,
    /// Test-only faults (NVMUX_TEST_FAULTS), read once per connection; the name is the
    /// export socket's file name: `vhost-no-inflight:<name>` (INFLIGHT_SHMFD not
    /// offered), `vhost-complete-delay:<name>` (completions held 0..=30 ms).
    no_inflight: bool,
    complete_delay: bool,
    /// Dirty logging: the mapped log (SET_LOG_BASE), what the workers see, counters.
    log_map: Option<Arc<LogMap>>,
    log_slot: Arc<LogSlot>,
    log_counters: Arc<LogCounters>,
    /// The migration gate, this export's side of it, this connection's id, and whether
    /// it holds the gate's token (some queue runs).
    gate: Arc<RingGate>,
    side: usize,
    conn_id: u64,
    holds_token: bool,
}

fn invalid(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

impl BlkBackend {
    fn new(
        dev: Arc<dyn BlockDevice>,
        cfg: &ExportConfig,
        workers: Vec<WorkerHandle>,
        stats: Arc<DiskStats>,
        counters: Arc<ExportCounters>,
        log_counters: Arc<LogCounters>,
        gate: (Arc<RingGate>, usize),
    ) -> Self {
        let info = dev.info().clone();
        let mut serial = [0u8; blk::ID_BYTES];
        let sb = cfg.serial.as_bytes();
        let n = sb.len().min(blk::ID_BYTES);
        serial[..n].copy_from_slice(&sb[..n]);
        let num_queues = cfg.num_queues.max(1);
        let file_name = cfg
            .socket
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let no_inflight = nvmux_core::fault::armed("vhost-no-inflight", &file_name);
        let complete_delay = nvmux_core::fault::armed("vhost-complete-delay", &file_name);
        if no_inflight || complete_delay {
            tracing::warn!(socket = %cfg.socket.display(), no_inflight, complete_delay, "test faults armed on this export (NVMUX_TEST_FAULTS)");
        }
        BlkBackend {
            inflight: None,
            no_inflight,
            complete_delay,
            // seg_max = 126 fits the smallest common queue (128 entries) without indirect
            // descriptors; guests with larger queues use indirect tables anyway.
            config: blk::config_space(&info, num_queues),
            info,
            dev,
            serial,
            num_queues,
            acked_features: 0,
            acked_protocol: 0,
            mem: Arc::new(MemSlot::new()),
            regions: Vec::new(),
            vrings: (0..num_queues).map(|_| VringCfg::default()).collect(),
            workers,
            stats,
            counters,
            name: cfg.socket.display().to_string(),
            log_map: None,
            log_slot: Arc::new(LogSlot::default()),
            log_counters,
            gate: gate.0,
            side: gate.1,
            conn_id: migration::next_conn_id(),
            holds_token: false,
        }
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut VringCfg> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    /// Translate a front-end virtual address (vring addresses) to a guest address.
    fn uaddr_to_gpa(&self, uaddr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| uaddr >= r.uaddr && uaddr - r.uaddr < r.size)
            .map(|r| uaddr - r.uaddr + r.gpa)
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & blk::VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    /// Start queue `i` if everything it needs has arrived.
    fn try_start(&mut self, i: usize) -> VuResult<()> {
        let pf = self.protocol_features_acked();
        let event_idx = self.acked_features & blk::VIRTIO_RING_F_EVENT_IDX != 0;
        let mem = self.mem.clone();
        let guard = mem.load();
        if guard.faulted() {
            tracing::warn!(export = %self.name, queue = i, "guest memory of this memory table shrank under the device; queue not started (the front-end must send a new memory table)");
            return Err(invalid("guest memory of this table faulted"));
        }
        let v = &mut self.vrings[i];
        let Some((desc, avail, used)) = v.addrs else {
            return Ok(());
        };
        if v.running.is_some() || v.kick.is_none() || v.size == 0 {
            return Ok(());
        }
        // Without protocol features a ring starts when it gets its kick fd; with them it
        // also needs SET_VRING_ENABLE.
        if pf && !v.enabled {
            return Ok(());
        }
        // Only one export of a migration pair runs rings at a time (migration.rs): take
        // the token before reading anything of the rings (the other side may still move
        // them).
        if !self.holds_token {
            if let Err(why) = self
                .gate
                .acquire(self.conn_id, self.side, migration::GATE_WAIT)
            {
                tracing::error!(export = %self.name, queue = i, "{why}");
                return Err(invalid("the migration peer's rings still run"));
            }
            self.holds_token = true;
        }
        let v = &mut self.vrings[i];
        let addrs = RingAddrs { desc, avail, used };
        let Some(mut q) = SplitQueue::new(&MemView(&guard.map), v.size, addrs, event_idx) else {
            tracing::warn!(export = %self.name, queue = i, "virtqueue rings are misaligned or outside guest memory; queue not started");
            self.release_if_idle();
            return Err(VuError::InvalidParam);
        };
        q.set_next_avail(v.base);
        // The used index in guest memory is authoritative (a reconnect keeps it).
        q.sync_used_from_ring();
        // Requests in flight when a previous daemon died are resubmitted first.
        let tracked = self
            .inflight
            .as_ref()
            .and_then(|r| inflight::start_queue(r, i, &mut q, &self.name));
        // The worker drains the kick eventfd, so it must not block.
        let kick = v.kick.as_ref().and_then(|f| f.try_clone().ok());
        let Some(kick) = kick.and_then(|f| nvmux_core::eventfd::EventFd::adopt(f.into()).ok())
        else {
            self.release_if_idle();
            return Err(invalid("kick fd"));
        };
        let used_log = v.log_addr.unwrap_or(vring::NO_LOG);
        let eng = match vring::engine(self.dev.clone(), &self.stats, v.size) {
            Ok(e) => e,
            Err(e) => {
                self.release_if_idle();
                return Err(VuError::ReqHandlerError(std::io::Error::other(
                    e.to_string(),
                )));
            }
        };
        let ctl = Arc::new(QueueCtl {
            stop: AtomicBool::new(false),
            call_fd: AtomicI32::new(v.call.as_ref().map_or(-1, |f| f.as_raw_fd())),
            call_epoch: AtomicU64::new(0),
            call_ack: AtomicU64::new(0),
            log_epoch: AtomicU64::new(0),
            log_ack: AtomicU64::new(0),
            used_log: AtomicU64::new(used_log),
        });
        let (tx, rx) = sync_channel(1);
        let src = VringSource::new(VringParams {
            queue: q,
            ring_mem: guard,
            mem,
            kick,
            eng,
            serial: self.serial,
            ctl: ctl.clone(),
            final_tx: tx,
            counters: self.counters.clone(),
            name: self.name.clone(),
            index: i,
            inflight: tracked,
            complete_delay: self.complete_delay,
            log: self.log_slot.clone(),
            log_counters: self.log_counters.clone(),
            gate: (self.gate.clone(), self.side),
        });
        self.gate.ring_started(self.side);
        let worker = self.workers[i % self.workers.len()].clone();
        worker.attach(Box::new(src));
        tracing::info!(export = %self.name, queue = i, size = v.size, worker = worker.index, event_idx, "virtqueue started");
        v.running = Some(Running { ctl, rx, worker });
        Ok(())
    }

    /// Stop queue `i`, wait for its in-flight requests, and remember where it stopped.
    fn stop(&mut self, i: usize) {
        let name = self.name.clone();
        let v = &mut self.vrings[i];
        if let Some(r) = v.running.take() {
            r.ctl.stop.store(true, Ordering::Release);
            r.worker.wake();
            match r.rx.recv_timeout(Duration::from_secs(30)) {
                Ok(base) => v.base = base,
                Err(_) => {
                    tracing::error!(export = %name, queue = i, "queue did not drain within 30 s")
                }
            }
            tracing::info!(export = %name, queue = i, base = v.base, "virtqueue stopped");
            // The worker is done with the queue: replaced call fds may be closed.
            v.retired_calls.clear();
        }
        self.release_if_idle();
    }

    /// Give the migration gate's token back once no queue of this connection runs.
    fn release_if_idle(&mut self) {
        if self.holds_token && self.vrings.iter().all(|v| v.running.is_none()) {
            self.gate.release(self.conn_id);
            self.holds_token = false;
        }
    }

    /// Publish the dirty-log state (LOG_ALL acked, the log, each queue's used-ring log
    /// address) to the running queues and wait until each worker took it: when this
    /// returns, every later completion marks (or not) as the front-end asked.
    fn publish_log(&mut self) -> VuResult<()> {
        let on = self.acked_features & log::VHOST_F_LOG_ALL != 0;
        let active = if on { self.log_map.clone() } else { None };
        self.log_counters
            .active
            .store(active.is_some(), Ordering::Relaxed);
        self.log_slot.store(active);
        let mut waiting = Vec::new();
        for v in &self.vrings {
            if let Some(r) = &v.running {
                r.ctl
                    .used_log
                    .store(v.log_addr.unwrap_or(vring::NO_LOG), Ordering::SeqCst);
                let e = r.ctl.log_epoch.fetch_add(1, Ordering::SeqCst) + 1;
                waiting.push((r.ctl.clone(), r.worker.clone(), e));
            }
        }
        let t0 = Instant::now();
        for (ctl, worker, e) in waiting {
            while ctl.log_ack.load(Ordering::SeqCst) < e {
                if t0.elapsed() > Duration::from_secs(5) {
                    tracing::error!(export = %self.name, "a queue's worker did not take the new dirty-log state within 5 s; closing the connection");
                    return Err(invalid("worker did not acknowledge the dirty log"));
                }
                worker.wake();
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    fn stop_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
    }

    /// Which rings run now (to thaw them after a takeover that did not happen).
    fn running(&self) -> Vec<bool> {
        self.vrings.iter().map(|v| v.running.is_some()).collect()
    }

    fn reset(&mut self) {
        self.stop_all();
        self.vrings = (0..self.num_queues).map(|_| VringCfg::default()).collect();
        self.acked_features = 0;
        self.acked_protocol = 0;
        // A reset device starts over with a new region (QEMU frees its copy on reset).
        self.inflight = None;
        self.log_map = None;
        self.log_slot.store(None);
        self.log_counters.active.store(false, Ordering::Relaxed);
    }

    /// Map one region of the front-end's table, or refuse it (logged and counted).
    fn map_region(
        &self,
        d: &RegionDesc,
        file: File,
        flag: &Arc<AtomicBool>,
    ) -> VuResult<mem::Mapped> {
        mem::map_region(d, file, flag).map_err(|why| self.refuse_memory(why))
    }

    fn refuse_memory(&self, why: String) -> VuError {
        self.counters
            .regions_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(export = %self.name, "guest memory refused: {why}");
        VuError::ReqHandlerError(std::io::Error::other(why))
    }

    /// Install a memory table and publish what the API shows of it.
    fn install_memory(&mut self, m: Memory, infos: Vec<RegionInfo>) {
        let (n, sealed) = m.sealed_counts();
        self.counters.regions.store(n as u64, Ordering::Relaxed);
        self.counters
            .regions_sealed
            .store(sealed as u64, Ordering::Relaxed);
        self.counters
            .device_failed
            .store(m.faulted(), Ordering::Relaxed);
        self.mem.store(m);
        self.regions = infos;
    }

    /// The front-end's addresses of the regions must not overlap either (vring addresses
    /// are translated through them).
    fn check_uaddrs(infos: &[RegionInfo]) -> Result<(), String> {
        for (i, a) in infos.iter().enumerate() {
            for b in &infos[..i] {
                if a.uaddr < b.uaddr.saturating_add(b.size)
                    && b.uaddr < a.uaddr.saturating_add(a.size)
                {
                    return Err(format!(
                        "memory regions overlap in the front-end's address space ({:#x} and {:#x})",
                        a.uaddr, b.uaddr
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        self.stop_all();
    }
}

impl VhostUserBackendReqHandlerMut for BlkBackend {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }
    fn reset_device(&mut self) -> VuResult<()> {
        self.reset();
        Ok(())
    }
    fn get_features(&mut self) -> VuResult<u64> {
        Ok(blk::device_features(&self.info) | log::VHOST_F_LOG_ALL)
    }
    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !(blk::device_features(&self.info) | log::VHOST_F_LOG_ALL) != 0 {
            return Err(VuError::InvalidParam);
        }
        let log_changed = (features ^ self.acked_features) & log::VHOST_F_LOG_ALL != 0;
        self.acked_features = features;
        if log_changed {
            tracing::info!(export = %self.name, on = features & log::VHOST_F_LOG_ALL != 0, "dirty logging (VHOST_F_LOG_ALL)");
            self.publish_log()?;
        }
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<u64>>> {
        if ctx.len() != files.len() || ctx.len() as u64 > MAX_MEM_SLOTS {
            return Err(self.refuse_memory(format!(
                "a memory table of {} regions with {} descriptors (at most {MAX_MEM_SLOTS} regions)",
                ctx.len(),
                files.len()
            )));
        }
        let descs: Vec<RegionDesc> = ctx
            .iter()
            .map(|r| RegionDesc {
                gpa: r.guest_phys_addr,
                size: r.memory_size,
                uaddr: r.user_addr,
                offset: r.mmap_offset,
            })
            .collect();
        let infos: Vec<RegionInfo> = descs
            .iter()
            .map(|d| RegionInfo {
                gpa: d.gpa,
                size: d.size,
                uaddr: d.uaddr,
            })
            .collect();
        // Check everything before mapping anything.
        for (d, f) in descs.iter().zip(&files) {
            mem::check_region(d, f).map_err(|why| self.refuse_memory(why))?;
        }
        Self::check_uaddrs(&infos).map_err(|why| self.refuse_memory(why))?;
        mem::check_table_size(descs.iter().map(|d| d.size))
            .map_err(|why| self.refuse_memory(why))?;
        // A new table starts with a fresh faulted flag (a reconnecting front-end, or one
        // that replaced the memory that went away).
        let flag = Arc::new(AtomicBool::new(false));
        let mut parts = Vec::with_capacity(descs.len());
        for (d, f) in descs.iter().zip(files) {
            parts.push(self.map_region(d, f, &flag)?);
        }
        let m = Memory::new(parts, flag).map_err(|why| self.refuse_memory(why))?;
        self.install_memory(m, infos);
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > MAX_QUEUE_SIZE as u32 || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let desc = self.uaddr_to_gpa(descriptor).ok_or(VuError::InvalidParam)?;
        let used = self.uaddr_to_gpa(used).ok_or(VuError::InvalidParam)?;
        let avail = self.uaddr_to_gpa(available).ok_or(VuError::InvalidParam)?;
        // The used ring's log address is a guest address (QEMU gives the ring's own).
        let log_addr = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        let name = self.name.clone();
        let v = self.vring(index)?;
        let running = v.running.is_some();
        if running && v.addrs != Some((desc, avail, used)) {
            // QEMU re-sends the same rings to switch the log flag; new rings take effect
            // at the next start.
            tracing::warn!(export = %name, queue = index, "SET_VRING_ADDR moved the rings of a running queue; the new addresses apply when it restarts");
        }
        v.addrs = Some((desc, avail, used));
        let changed = v.log_addr != log_addr;
        v.log_addr = log_addr;
        if running && changed {
            self.publish_log()?;
        }
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.base = base as u16;
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        self.stop(index as usize);
        let v = &mut self.vrings[index as usize];
        v.kick = None;
        v.enabled = false;
        Ok(VhostUserVringState::new(index, v.base as u32))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let fd = fd.ok_or(invalid("polling mode (no kick fd) is not supported"))?;
        self.vring(index as u32)?;
        self.stop(index as usize);
        self.vrings[index as usize].kick = Some(fd);
        self.try_start(index as usize)
    }
    /// Replace a queue's call eventfd.
    ///
    /// The running worker reads the raw descriptor from `QueueCtl::call_fd` and writes to
    /// it, so the replaced file may be closed only once the worker can no longer use it: a
    /// closed number can be reused by another open, and a late write would hit that file.
    /// Hand-over: store the new descriptor, then bump `call_epoch`. The worker copies the
    /// epoch to `call_ack` at the start of every poll, before it loads the descriptor, and
    /// writes to it only inside a poll; so once `call_ack` reaches the epoch of a
    /// replacement, the descriptors replaced up to it are unused and are closed. At most
    /// two replaced descriptors wait at a time: beyond that this waits (waking the worker)
    /// for the acknowledgment, and a worker that does not answer within 5 s costs the
    /// front-end its connection rather than the daemon its descriptors.
    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(index as u32)?;
        let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        let old = std::mem::replace(&mut v.call, fd);
        let Some(r) = &v.running else {
            drop(old);
            return Ok(());
        };
        r.ctl.call_fd.store(raw, Ordering::SeqCst);
        let epoch = r.ctl.call_epoch.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(f) = old {
            v.retired_calls.push_back((epoch, f));
        }
        let t0 = Instant::now();
        loop {
            let ack = r.ctl.call_ack.load(Ordering::SeqCst);
            while v.retired_calls.front().is_some_and(|(e, _)| *e <= ack) {
                v.retired_calls.pop_front();
            }
            if v.retired_calls.len() <= 2 {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(5) {
                tracing::error!(export = %self.name, queue = index, "the queue's worker did not take the new call eventfd within 5 s; closing the connection");
                return Err(invalid("worker did not acknowledge the new call fd"));
            }
            r.worker.wake();
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(index as u32)?;
        Ok(())
    }
    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::LOG_SHMFD;
        Ok(if self.no_inflight {
            f
        } else {
            f | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        })
    }
    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.num_queues as u64)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.try_start(index as usize)
        } else {
            self.stop(index as usize);
            Ok(())
        }
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // Serve exactly the requested window; bytes past our struct read as zero.
        if size > 256 || offset > 256 {
            return Err(VuError::InvalidParam);
        }
        // Capacity is read live: a thin volume can grow while the client is attached.
        self.config[0..8].copy_from_slice(&(self.dev.capacity_bytes() / 512).to_le_bytes());
        let mut out = vec![0u8; size as usize];
        let off = offset as usize;
        if off < self.config.len() {
            let n = (self.config.len() - off).min(out.len());
            out[..n].copy_from_slice(&self.config[off..off + n]);
        }
        Ok(out)
    }
    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Only `writeback` is writable in virtio-blk, and we do not offer CONFIG_WCE.
        Err(invalid("config space is read-only"))
    }
    fn set_gpu_socket(&mut self, _b: vhost::vhost_user::GpuBackend) -> VuResult<()> {
        Err(invalid("not a GPU"))
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("shared objects are not supported"))
    }
    fn get_inflight_fd(&mut self, i: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        if self.no_inflight {
            return Err(invalid("inflight tracking is switched off (test fault)"));
        }
        let (region, file) =
            inflight::Region::create(i.num_queues, i.queue_size).map_err(|why| {
                tracing::warn!(export = %self.name, "GET_INFLIGHT_FD refused: {why}");
                VuError::ReqHandlerError(std::io::Error::other(why))
            })?;
        let size = inflight::region_bytes(i.num_queues, i.queue_size).unwrap_or(0) as u64;
        tracing::info!(export = %self.name, queues = i.num_queues, queue_size = i.queue_size, size, "inflight region created");
        self.inflight = Some(region);
        Ok((
            VhostUserInflight::new(size, 0, i.num_queues, i.queue_size),
            file,
        ))
    }
    fn set_inflight_fd(&mut self, i: &VhostUserInflight, f: File) -> VuResult<()> {
        if self.no_inflight {
            return Err(invalid("inflight tracking is switched off (test fault)"));
        }
        let region =
            inflight::Region::open(i.num_queues, i.queue_size, i.mmap_size, i.mmap_offset, f)
                .map_err(|why| {
                    tracing::warn!(export = %self.name, "SET_INFLIGHT_FD refused: {why}");
                    VuError::ReqHandlerError(std::io::Error::other(why))
                })?;
        tracing::info!(export = %self.name, queues = i.num_queues, queue_size = i.queue_size, "inflight region set");
        self.inflight = Some(region);
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }
    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<u64>> {
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return Err(self.refuse_memory(format!(
                "ADD_MEM_REGION beyond the {MAX_MEM_SLOTS} memory slots offered"
            )));
        }
        let d = RegionDesc {
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            uaddr: region.user_addr,
            offset: region.mmap_offset,
        };
        let mut infos: Vec<RegionInfo> = self.regions.to_vec();
        infos.push(RegionInfo {
            gpa: d.gpa,
            size: d.size,
            uaddr: d.uaddr,
        });
        mem::check_region(&d, &fd).map_err(|why| self.refuse_memory(why))?;
        Self::check_uaddrs(&infos).map_err(|why| self.refuse_memory(why))?;
        mem::check_table_size(infos.iter().map(|r| r.size))
            .map_err(|why| self.refuse_memory(why))?;
        let cur = self.mem.load();
        let part = self.map_region(&d, fd, &cur.faulted)?;
        let m = cur
            .with_region(part)
            .map_err(|why| self.refuse_memory(why))?;
        drop(cur);
        self.install_memory(m, infos);
        Ok(None)
    }
    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let cur = self.mem.load();
        let m = cur
            .without_region(region.guest_phys_addr, region.memory_size)
            .map_err(|why| {
                tracing::warn!(export = %self.name, "REMOVE_MEM_REGION: {why}");
                VuError::InvalidParam
            })?;
        drop(cur);
        let infos = self
            .regions
            .iter()
            .filter(|r| r.gpa != region.guest_phys_addr)
            .copied()
            .collect();
        self.install_memory(m, infos);
        Ok(())
    }
    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _f: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("migration state transfer is not supported"))
    }
    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("migration state transfer is not supported"))
    }
    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }
    /// Map the front-end's dirty log (LOG_SHMFD). The vhost crate answers with the same
    /// size and offset, which QEMU waits for (it only checks the request code). A refused
    /// log costs the front-end its connection (and so its migration).
    fn set_log_base(&mut self, l: &VhostUserLog, file: File) -> VuResult<()> {
        let (size, offset) = (l.mmap_size, l.mmap_offset);
        let m = LogMap::map(size, offset, &file).map_err(|why| {
            self.log_counters
                .logs_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(export = %self.name, "dirty log refused: {why}");
            VuError::ReqHandlerError(std::io::Error::other(why))
        })?;
        drop(file);
        self.log_counters.logs_set.fetch_add(1, Ordering::Relaxed);
        tracing::info!(export = %self.name, size, offset, "dirty log mapped (covers {} MiB of guest memory)", (m.len() * 8 * log::LOG_PAGE) >> 20);
        self.log_map = Some(Arc::new(m));
        self.publish_log()
    }
}

/// A disk served on a vhost-user socket.
pub struct VhostBlkExport {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<UnixStream>>>,
    /// The back-end request channel of the current client, if it set one up.
    backend_req: Arc<Mutex<Option<UnixStream>>>,
    counters: Arc<ExportCounters>,
    log_counters: Arc<LogCounters>,
    gate: Arc<RingGate>,
    side: usize,
    /// Takeover requests to the export's task (see `session.rs`).
    ctl: Mutex<std::sync::mpsc::Sender<session::Ctl>>,
    /// Released to a new process: dropping must not shut the shared sockets down.
    handed_over: bool,
    /// The export's task on the control threads; None once it finished.
    task: Option<nvmux_core::ctlpoll::CtlHandle>,
}

/// A frozen export: its listening socket and its session (if a client is connected).
pub struct Frozen {
    pub listener: std::os::fd::OwnedFd,
    pub session: Option<handover::SessionState<std::os::fd::OwnedFd>>,
}

pub(crate) fn dup_fd(fd: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor this thread keeps open; the result is a
    // fresh descriptor we own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) })
}

/// What the API shows of an export's dirty logging (live migration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStatus {
    /// Logging is on now (VHOST_F_LOG_ALL acked and a log set).
    pub active: bool,
    /// Logs mapped (SET_LOG_BASE accepted) and refused.
    pub logs_set: u64,
    pub logs_refused: u64,
    /// Logs whose file shrank under the device while it marked.
    pub log_faults: u64,
}

/// What the API shows of a vhost-user export's guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStatus {
    /// Memory tables whose backing shrank under the device (each failed it once).
    pub memory_faults: u64,
    /// The current memory table faulted: its queues are stopped until a new table.
    pub device_failed: bool,
    /// Regions refused (past the end of their file, empty, overlapping, not a file).
    pub regions_refused: u64,
    /// Regions of the current table, and how many are sealed against shrinking.
    pub regions: u64,
    pub regions_sealed: u64,
}

impl VhostBlkExport {
    /// Bind the socket and start serving. Returns once the socket is listening.
    pub fn start(
        dev: Arc<dyn BlockDevice>,
        cfg: ExportConfig,
        workers: Vec<WorkerHandle>,
        stats: Arc<DiskStats>,
    ) -> nvmux_core::Result<Self> {
        if workers.is_empty() {
            return Err(Error::new(ErrorKind::InvalidArgument, "no worker threads"));
        }
        let gate = cfg.gate.clone().unwrap_or_else(RingGate::new);
        let side = gate.join().ok_or_else(|| {
            Error::new(
                ErrorKind::AlreadyExists,
                "the migration peer already has a peer (one double export per disk)",
            )
        })?;
        // Leave the gate again if anything below fails.
        struct Joined(Option<(Arc<RingGate>, usize)>);
        impl Drop for Joined {
            fn drop(&mut self) {
                if let Some((g, side)) = self.0.take() {
                    g.leave(side);
                }
            }
        }
        let mut joined = Joined(Some((gate.clone(), side)));
        if cfg.num_queues == 0 || cfg.num_queues > 64 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("num-queues {} is out of range (1..=64)", cfg.num_queues),
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
        // Owner and mode are set before the socket appears at its path (no link is
        // followed); a stale socket there is replaced. After a takeover the listening
        // socket is the old process's (nvmux_core::unixsock::bind hands it back).
        let listener = Listener::from(nvmux_core::unixsock::bind(&cfg.socket, &cfg.perms)?);
        let stop = Arc::new(AtomicBool::new(false));
        let conn: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let backend_req: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let counters = Arc::new(ExportCounters::default());
        let counters2 = counters.clone();
        let log_counters = Arc::new(LogCounters::default());
        let log_counters2 = log_counters.clone();
        let gate2 = gate.clone();
        let (stop2, conn2, socket) = (stop.clone(), conn.clone(), cfg.socket.clone());
        let req2 = backend_req.clone();
        // A session handed over by the old process: adopted before anything is accepted.
        let adopted = match takeover::take_session(&cfg.socket) {
            Some(mut s) => {
                let backend = Arc::new(Mutex::new(BlkBackend::new(
                    dev.clone(),
                    &cfg,
                    workers.clone(),
                    stats.clone(),
                    counters.clone(),
                    log_counters.clone(),
                    (gate.clone(), side),
                )));
                let running: Vec<bool> = s.vrings.iter().map(|v| v.running).collect();
                let r = backend
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .adopt(&mut s);
                match r.and_then(|()| {
                    takeover::prime_handler(s.conn, backend.clone(), s.features, s.protocol)
                        .map_err(|e| e.to_string())
                }) {
                    Ok(h) => {
                        *req2.lock().unwrap_or_else(|e| e.into_inner()) =
                            s.backend_req.map(UnixStream::from);
                        backend
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .start_adopted(&running);
                        tracing::info!(socket = %cfg.socket.display(), "vhost-user session taken over");
                        match session::Session::new(h, backend) {
                            Ok(s) => Some(s),
                            Err(e) => {
                                tracing::error!(socket = %cfg.socket.display(), "the taken-over vhost-user connection cannot be served: {e}");
                                None
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(socket = %cfg.socket.display(), "the handed-over vhost-user session could not be taken over: {e}; its connection is closed (the front-end reconnects if it was started with reconnect)");
                        None
                    }
                }
            }
            None => None,
        };
        let parts = session::Parts {
            dev,
            cfg,
            workers,
            stats,
            counters: counters2,
            log_counters: log_counters2,
            gate: gate2,
            side,
        };
        let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
        let task = session::ExportTask::new(listener, parts, stop2, conn2, req2, ctl_rx, adopted);
        let task = nvmux_core::ctlpoll::global()?.add(Box::new(task));
        joined.0 = None;
        Ok(VhostBlkExport {
            socket,
            stop,
            conn,
            backend_req,
            counters,
            log_counters,
            gate,
            side,
            ctl: Mutex::new(ctl_tx),
            handed_over: false,
            task: Some(task),
        })
    }

    /// Takeover, step 1: stop accepting, stop every ring of the connected client
    /// (draining its in-flight requests; each ring's next available index is recorded, as
    /// GET_VRING_BASE does) and stop reading its connection. Returns the listening
    /// socket and the session, with duplicates of every descriptor. Then either
    /// [`VhostBlkExport::thaw`] or [`VhostBlkExport::release`].
    pub fn freeze(&self, timeout: Duration) -> nvmux_core::Result<Frozen> {
        let (tx, rx) = sync_channel(1);
        self.send(session::Ctl::Freeze(tx));
        match rx.recv_timeout(timeout) {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(Error::new(
                ErrorKind::Io,
                format!("export {}: freeze: {e}", self.socket.display()),
            )),
            Err(_) => Err(Error::new(
                ErrorKind::Busy,
                format!(
                    "export {}: its control task did not freeze within {} ms (a control message in progress?)",
                    self.socket.display(),
                    timeout.as_millis()
                ),
            )),
        }
    }

    /// The takeover was abandoned: restart the rings where they stopped and serve on.
    pub fn thaw(&self) {
        self.send(session::Ctl::Thaw);
    }

    fn send(&self, c: session::Ctl) {
        let _ = self.ctl.lock().unwrap_or_else(|e| e.into_inner()).send(c);
        if let Some(t) = &self.task {
            t.wake();
        }
    }

    /// The new process serves this export now: the task ends without touching the
    /// shared sockets (no shutdown, no unlink), and only this process's copies close.
    pub fn release(mut self) {
        self.handed_over = true;
        self.send(session::Ctl::Release);
        if let Some(t) = self.task.take() {
            t.wait_done();
        }
    }

    /// Tell the attached front-end that the disk's size changed
    /// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG): QEMU re-reads the config space and raises
    /// the guest's config interrupt, so the guest sees the new capacity. Returns false
    /// when no client is attached or the client did not set up the back-end request
    /// channel (libblkio does not); such a client sees the new size when it reconnects.
    pub fn notify_config_change(&self) -> std::io::Result<bool> {
        let mut g = self.backend_req.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_mut() {
            None => Ok(false),
            Some(chan) => match backend_req::send_config_change(chan) {
                Ok(()) => Ok(true),
                Err(e) => {
                    *g = None;
                    Err(e)
                }
            },
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Guest memory faults and regions (see [`MemoryStatus`]).
    pub fn memory_status(&self) -> MemoryStatus {
        let c = &self.counters;
        MemoryStatus {
            memory_faults: c.memory_faults.load(Ordering::Relaxed),
            device_failed: c.device_failed.load(Ordering::Relaxed),
            regions_refused: c.regions_refused.load(Ordering::Relaxed),
            regions: c.regions.load(Ordering::Relaxed),
            regions_sealed: c.regions_sealed.load(Ordering::Relaxed),
        }
    }

    /// The migration gate, for a peer export ([`ExportConfig::gate`]).
    pub fn gate(&self) -> Arc<RingGate> {
        self.gate.clone()
    }

    /// The migration gate as this export sees it (see `migration.rs`).
    pub fn gate_status(&self) -> migration::GateStatus {
        self.gate.status(self.side)
    }

    /// Dirty logging (see [`LogStatus`]).
    pub fn log_status(&self) -> LogStatus {
        let c = &self.log_counters;
        LogStatus {
            active: c.active.load(Ordering::Relaxed),
            logs_set: c.logs_set.load(Ordering::Relaxed),
            logs_refused: c.logs_refused.load(Ordering::Relaxed),
            log_faults: c.log_faults.load(Ordering::Relaxed),
        }
    }

    /// True while a client is connected.
    pub fn connected(&self) -> bool {
        self.conn.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// Disconnect the client, stop listening and remove the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // The task disconnects the client, shuts the listening socket down and ends.
        if let Some(t) = self.task.take() {
            t.wake();
            t.wait_done();
        }
        self.gate.leave(self.side);
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for VhostBlkExport {
    fn drop(&mut self) {
        if self.task.is_some() && !self.handed_over {
            self.shutdown();
        }
    }
}
