//! The NVMe controller model: subsystems, namespaces, controllers, admin commands and
//! the mapping of NVM I/O commands to [`IoCommand`]s. Nothing here knows about TCP; a
//! transport hands in submission queue entries and the data that came with them, and
//! sends back what [`Controller::admin`] and [`parse_io`] produce.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use nvmux_core::eventfd::EventFd;
use nvmux_core::stats::DiskStats;
use nvmux_core::{BlockDevice, Status};

use crate::auth::{Dhchap, HostKeys, Policy};

/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Model number reported by every controller.
pub use crate::model::MODEL;
use crate::model::{put16, put32, put64};
/// Largest I/O queue: CAP.MQES + 1 entries.
pub const IO_QUEUE_ENTRIES: u16 = 128;
/// Largest admin queue.
pub const ADMIN_QUEUE_ENTRIES: u16 = 32;
/// Maximum data transfer size: 2^MDTS pages of 4 KiB (128 KiB).
pub const MDTS: u8 = 5;
pub const MAX_TRANSFER: usize = 4096 << MDTS;
/// In-capsule data an I/O command capsule may carry (IOCCSZ is this + 64 bytes).
pub const IN_CAPSULE_DATA: usize = 8192;
/// I/O queues granted to one controller at most.
pub const MAX_IO_QUEUES: u16 = 64;
/// Highest namespace id (NN).
pub const MAX_NSID: u32 = 1024;
/// Outstanding Asynchronous Event Requests allowed (AERL is this minus one).
pub const MAX_AERS: usize = 4;
/// Keep-alive granularity reported (KAS, in 100 ms units).
const KAS: u16 = 10;
/// Admin data returned by anything but Get Log Page is at most this long (Identify,
/// features: 4 KiB); log pages are bounded by MDTS ([`MAX_TRANSFER`]).
pub const ADMIN_DATA: usize = 4096;
/// Controller ids: 1..=FFEFh (FFF0h and above are reserved).
pub const MAX_CNTLID: u16 = 0xffef;
/// A controller is torn down when its host sent nothing for KATO plus this margin: half
/// of KATO, at least 1 s (the host sends a Keep Alive every KATO/2 at the latest, and
/// every command on any of the controller's queues counts as keep-alive traffic).
pub fn kato_margin(kato: Duration) -> Duration {
    (kato / 2).max(Duration::from_secs(1))
}
/// A discovery controller with KATO 0 (no keep-alive, as `nvme discover` connects) is
/// closed after this long without a command: discovery is a short exchange, and an idle
/// discovery connection must not be held forever by a host that need not authenticate.
pub const DISCOVERY_IDLE: Duration = Duration::from_secs(60);

/// The instant controller activity times are counted from.
fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

/// Status codes used beyond the ones nvmux-core names.
pub mod sc {
    use nvmux_core::Status;
    pub const CMD_SEQUENCE: Status = Status::new(0, 0x0c);
    pub const SGL_LENGTH_INVALID: Status = Status::new(0, 0x0f);
    pub const SGL_TYPE_INVALID: Status = Status::new(0, 0x11);
    pub const SGL_OFFSET_INVALID: Status = Status::new(0, 0x16);
    pub const INVALID_QUEUE_ID: Status = Status::new(1, 0x01);
    pub const INVALID_QUEUE_SIZE: Status = Status::new(1, 0x02);
    pub const AER_LIMIT: Status = Status::new(1, 0x05);
    pub const INVALID_LOG_PAGE: Status = Status::new(1, 0x09);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::new(1, 0x0d);
    pub const CONNECT_INCOMPATIBLE: Status = Status::new(1, 0x80);
    pub const CONNECT_CTRL_BUSY: Status = Status::new(1, 0x81);
    pub const AUTH_REQUIRED: Status = Status::new(1, 0x91);
    pub const CONNECT_INVALID_PARAM: Status = Status::new(1, 0x82);
    pub const CONNECT_INVALID_HOST: Status = Status::new(1, 0x84);
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    (le32(b, o) as u64) | (le32(b, o + 4) as u64) << 32
}
/// A NUL-terminated string field (NQNs, addresses).
fn put_str(b: &mut [u8], o: usize, len: usize, s: &str) {
    let n = s.len().min(len - 1);
    b[o..o + n].copy_from_slice(&s.as_bytes()[..n]);
}
/// A NUL-padded string field as a String (lossy, trailing NULs and spaces dropped).
fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_string()
}

/// A submission queue entry.
#[derive(Clone, Copy)]
pub struct Sqe<'a>(pub &'a [u8; 64]);

/// SGL descriptor types (byte 15 of the descriptor) that NVMe/TCP uses.
pub const SGL_IN_CAPSULE: u8 = 0x01; // data block, offset addressing
pub const SGL_TRANSPORT: u8 = 0x5a; // transport data block

impl Sqe<'_> {
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub fn cid(&self) -> u16 {
        le16(self.0, 2)
    }
    pub fn nsid(&self) -> u32 {
        le32(self.0, 4)
    }
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        le32(self.0, n * 4)
    }
    /// Fabrics command type (opcode 0x7f).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    pub fn sgl_addr(&self) -> u64 {
        le64(self.0, 24)
    }
    /// PRP entry 1 and 2 (PCIe transports: the same bytes as the SGL descriptor).
    pub fn prp1(&self) -> u64 {
        le64(self.0, 24)
    }
    pub fn prp2(&self) -> u64 {
        le64(self.0, 32)
    }
    pub fn sgl_len(&self) -> u32 {
        le32(self.0, 32)
    }
    pub fn sgl_type(&self) -> u8 {
        self.0[39]
    }
    pub fn is_fabrics(&self) -> bool {
        self.opcode() == 0x7f
    }
    /// Data direction: bit 0 host to controller, bit 1 controller to host.
    pub fn direction(&self) -> u8 {
        if self.is_fabrics() {
            self.fctype() & 3
        } else {
            self.opcode() & 3
        }
    }
}

/// How a command ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub status: Status,
}

impl Cqe {
    pub fn ok(dw0: u32) -> Cqe {
        Cqe {
            dw0,
            ..Default::default()
        }
    }
    pub fn err(status: Status) -> Cqe {
        Cqe {
            status,
            ..Default::default()
        }
    }
    /// The 16-byte completion queue entry. Errors carry Do Not Retry: none of them goes
    /// away by itself.
    pub fn encode(&self, cid: u16, sqhd: u16, sqid: u16) -> [u8; 16] {
        let mut b = [0u8; 16];
        put32(&mut b, 0, self.dw0);
        put32(&mut b, 4, self.dw1);
        put16(&mut b, 8, sqhd);
        put16(&mut b, 10, sqid);
        put16(&mut b, 12, cid);
        let mut st = self.status.to_cqe_bits();
        if !self.status.is_ok() {
            st |= 1 << 15;
        }
        put16(&mut b, 14, st);
        b
    }
}

/// One namespace: an nvmux disk under an NSID.
pub struct Namespace {
    pub nsid: u32,
    pub disk: String,
    pub dev: Arc<dyn BlockDevice>,
    pub stats: Arc<DiskStats>,
    /// Namespace globally unique identifier (also reported as the UUID).
    pub nguid: [u8; 16],
}

impl Namespace {
    pub fn block_size(&self) -> u32 {
        self.dev.info().block_size
    }
    pub fn num_blocks(&self) -> u64 {
        self.dev.capacity_bytes() / self.block_size() as u64
    }
}

pub type NsMap = Arc<BTreeMap<u32, Arc<Namespace>>>;

/// Wakes one connection from another thread: a flag plus an eventfd its worker waits on.
pub struct Waker {
    fd: EventFd,
    pub stop: AtomicBool,
}

impl Waker {
    pub fn new() -> std::io::Result<Arc<Waker>> {
        Ok(Arc::new(Waker {
            fd: EventFd::new()?,
            stop: AtomicBool::new(false),
        }))
    }
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    pub fn wake(&self) {
        self.fd.signal();
    }
    /// Ask the connection to close.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
    }
}

struct SubState {
    ns: NsMap,
    any_host: bool,
    hosts: BTreeSet<String>,
    /// DH-HMAC-CHAP secrets of hosts that must authenticate.
    keys: BTreeMap<String, Arc<HostKeys>>,
    /// Every host must authenticate (a host without a secret cannot connect).
    require_auth: bool,
    policy: Arc<Policy>,
}

/// What a host may do on a subsystem.
#[derive(Clone)]
pub enum Access {
    /// Not on the allow-list.
    Denied,
    /// On the allow-list, no authentication.
    Open,
    /// On the allow-list with a secret: it must authenticate every queue.
    Auth(Arc<HostKeys>, Arc<Policy>),
    /// On the allow-list, but the subsystem requires authentication and the host has no
    /// secret.
    NoSecret,
}

/// An NVM subsystem: an NQN, its namespaces and the hosts allowed to connect.
pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    st: Mutex<SubState>,
    ns_gen: AtomicU64,
    ctrls: Mutex<CtrlTable>,
    next_cntlid: AtomicU16,
}

impl Subsystem {
    pub fn new(nqn: &str, serial: &str) -> Arc<Subsystem> {
        Arc::new(Subsystem {
            nqn: nqn.into(),
            serial: serial.into(),
            st: Mutex::new(SubState {
                ns: Arc::new(BTreeMap::new()),
                any_host: false,
                hosts: BTreeSet::new(),
                keys: BTreeMap::new(),
                require_auth: false,
                policy: Arc::new(Policy::default()),
            }),
            ns_gen: AtomicU64::new(1),
            ctrls: Mutex::new(CtrlTable::default()),
            next_cntlid: AtomicU16::new(1),
        })
    }
    fn lock(&self) -> MutexGuard<'_, SubState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The namespaces now (a snapshot; see [`Subsystem::ns_generation`]).
    pub fn namespaces(&self) -> NsMap {
        self.lock().ns.clone()
    }
    /// Changes whenever a namespace is added or removed.
    pub fn ns_generation(&self) -> u64 {
        self.ns_gen.load(Ordering::Acquire)
    }
    pub fn add_namespace(&self, ns: Namespace) -> Result<(), String> {
        let nsid = ns.nsid;
        if nsid == 0 || nsid > MAX_NSID {
            return Err(format!("namespace id {nsid} is outside 1..={MAX_NSID}"));
        }
        {
            let mut g = self.lock();
            if g.ns.contains_key(&nsid) {
                return Err(format!("namespace {nsid} already exists in {}", self.nqn));
            }
            let mut m = (*g.ns).clone();
            m.insert(nsid, Arc::new(ns));
            g.ns = Arc::new(m);
            self.ns_gen.fetch_add(1, Ordering::AcqRel);
        }
        self.ns_changed(nsid);
        Ok(())
    }
    pub fn remove_namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        let old = {
            let mut g = self.lock();
            let mut m = (*g.ns).clone();
            let old = m.remove(&nsid)?;
            g.ns = Arc::new(m);
            self.ns_gen.fetch_add(1, Ordering::AcqRel);
            old
        };
        self.ns_changed(nsid);
        Some(old)
    }
    /// Tell every controller that namespace `nsid` changed (added, removed, resized): each
    /// raises a Namespace Attribute Changed event if the host enabled it.
    pub fn ns_changed(&self, nsid: u32) {
        for c in self.controllers() {
            c.note_ns_change(nsid);
        }
    }
    pub fn set_hosts(&self, any: bool, hosts: BTreeSet<String>) {
        let mut g = self.lock();
        g.any_host = any;
        g.hosts = hosts;
    }
    pub fn host_allowed(&self, host: &str) -> bool {
        let g = self.lock();
        g.any_host || g.hosts.contains(host)
    }
    /// The DH-HMAC-CHAP secrets of the hosts that must authenticate.
    pub fn set_host_keys(&self, keys: BTreeMap<String, Arc<HostKeys>>) {
        self.lock().keys = keys;
    }
    /// Whether every host must authenticate, and which hashes and DH groups it may use.
    pub fn set_auth(&self, require: bool, policy: Policy) {
        let mut g = self.lock();
        g.require_auth = require;
        g.policy = Arc::new(policy);
    }
    /// What `host` may do here.
    pub fn access(&self, host: &str) -> Access {
        let g = self.lock();
        if !(g.any_host || g.hosts.contains(host)) {
            return Access::Denied;
        }
        match g.keys.get(host) {
            Some(k) => Access::Auth(k.clone(), g.policy.clone()),
            None if g.require_auth => Access::NoSecret,
            None => Access::Open,
        }
    }
    /// Live controllers.
    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        let weak: Vec<Weak<Controller>> = {
            let mut g = self.ctrls.lock().unwrap_or_else(|e| e.into_inner());
            g.list.retain(|w| w.strong_count() > 0);
            g.list.clone()
        };
        // Upgraded (and possibly dropped: a controller's Drop takes the table's lock)
        // outside the lock.
        weak.iter().filter_map(|w| w.upgrade()).collect()
    }
    /// The subsystem is being deleted: every connection to it closes.
    pub fn remove(&self) {
        for c in self.controllers() {
            c.stop_all();
        }
    }
    /// A new controller with the next free id in 1..=[`MAX_CNTLID`], or `None` when every
    /// id is in use.
    fn new_controller(
        self: &Arc<Self>,
        host: &str,
        hostid: [u8; 16],
        kato_ms: u32,
        auth: Option<(Arc<HostKeys>, Arc<Policy>)>,
    ) -> Option<Arc<Controller>> {
        let mut g = self.ctrls.lock().unwrap_or_else(|e| e.into_inner());
        if g.used.len() >= MAX_CNTLID as usize {
            return None;
        }
        if g.list.len() > 2 * g.used.len() + 16 {
            g.list.retain(|w| w.strong_count() > 0);
        }
        // Ids rotate (an id is not reused at once), skipping those in use; fewer than
        // MAX_CNTLID are in use, so one of MAX_CNTLID candidates is free.
        let start = self
            .next_cntlid
            .load(Ordering::Relaxed)
            .clamp(1, MAX_CNTLID);
        let id = (0..MAX_CNTLID)
            .map(|i| ((start - 1 + i) % MAX_CNTLID) + 1)
            .find(|id| !g.used.contains(id))?;
        g.used.insert(id);
        self.next_cntlid
            .store(if id == MAX_CNTLID { 1 } else { id + 1 }, Ordering::Relaxed);
        let c = Arc::new(Controller {
            cntlid: id,
            host: host.into(),
            hostid,
            subsys: self.clone(),
            st: Mutex::new(CtrlState::default()),
            queues: Mutex::new(Vec::new()),
            kato_ms: AtomicU32::new(kato_ms),
            last_ms: AtomicU64::new(now_ms(Instant::now())),
            auth,
        });
        g.list.push(Arc::downgrade(&c));
        Some(c)
    }
}

/// One entry of the discovery log page.
#[derive(Clone, Debug)]
pub struct DiscoveryEntry {
    pub subnqn: String,
    pub addr: std::net::SocketAddr,
    pub port_id: u16,
}

/// Where a connection arrived: the listener's address and the socket's local address
/// (they differ when the listener is bound to a wildcard address).
#[derive(Clone, Copy, Debug)]
pub struct Where {
    pub listen: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
}

/// Where a transport finds subsystems by NQN, and what the discovery controller lists.
pub trait Resolver: Send + Sync {
    fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>>;
    /// Generation counter and the subsystems this host may connect to through the
    /// listener at `listen`.
    fn discovery_log(&self, host: &str, listen: std::net::SocketAddr)
        -> (u64, Vec<DiscoveryEntry>);
    /// A refused connection attempt, for the log.
    fn refused(&self, why: &str);
    /// Whether `host` may connect to the discovery controller.
    fn discovery_allowed(&self, _host: &str) -> bool {
        true
    }
    /// Run `job` (a DH-HMAC-CHAP step: modular exponentiations of up to tens of
    /// milliseconds) away from the data path; it signals its end itself. By default it
    /// runs at once, on the caller's thread.
    fn offload(&self, job: Box<dyn FnOnce() + Send>) {
        job()
    }
}

fn now_ms(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64
}

#[derive(Default)]
struct CtrlState {
    cc: u32,
    csts: u32,
    /// Asynchronous event configuration (Set Features 0x0b).
    aec: u32,
    /// I/O queues granted by Set Features Number of Queues (0 until asked).
    io_queues: u16,
    /// Changed namespaces since the host last read log page 0x04.
    changed: BTreeSet<u32>,
    changed_overflow: bool,
    /// A namespace notice waits for an AER.
    aen_pending: bool,
    /// A notice was sent; the next one waits until the host reads the log page.
    aen_masked: bool,
    /// Qids connected.
    qids: BTreeSet<u16>,
}

/// The controllers of a subsystem: weak references (for events and views) and the ids in
/// use (a controller gives its id back when it is dropped).
#[derive(Default)]
struct CtrlTable {
    list: Vec<Weak<Controller>>,
    used: BTreeSet<u16>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let mut g = self.subsys.ctrls.lock().unwrap_or_else(|e| e.into_inner());
        g.used.remove(&self.cntlid);
    }
}

/// A controller: the admin queue and I/O queues of one host association.
pub struct Controller {
    pub cntlid: u16,
    pub host: String,
    pub hostid: [u8; 16],
    pub subsys: Arc<Subsystem>,
    st: Mutex<CtrlState>,
    /// Wakers of its queues' connections; the admin queue's is first.
    queues: Mutex<Vec<(u16, Weak<Waker>)>>,
    /// Keep-alive timeout (ms; 0: none), from Connect or Set Features.
    kato_ms: AtomicU32,
    /// When the host last sent a command on any of the controller's queues (ms since
    /// [`epoch`]).
    last_ms: AtomicU64,
    /// The host's secrets, when it must authenticate (every queue does).
    auth: Option<(Arc<HostKeys>, Arc<Policy>)>,
}

use crate::model::{AEC_NS_ATTR, AEN_NS_CHANGED};

/// What an admin command asks of the transport.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done(Cqe),
    /// Asynchronous Event Request: held until an event arrives ([`Controller::take_event`]).
    Held,
}

impl Controller {
    fn lock(&self) -> MutexGuard<'_, CtrlState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn is_discovery(&self) -> bool {
        self.subsys.nqn == DISCOVERY_NQN
    }
    /// Register a connected queue's waker (qid 0 is the admin queue).
    pub fn attach_queue(&self, qid: u16, w: &Arc<Waker>) {
        self.lock().qids.insert(qid);
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|(_, w)| w.strong_count() > 0);
        q.push((qid, Arc::downgrade(w)));
    }
    pub fn detach_queue(&self, qid: u16) {
        self.lock().qids.remove(&qid);
        if qid == 0 {
            // Without its admin queue the association is gone: close the I/O queues.
            self.stop_all();
        }
    }
    fn stop_all(&self) {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for (_, w) in q.iter() {
            if let Some(w) = w.upgrade() {
                w.stop();
            }
        }
    }
    fn wake_admin(&self) {
        let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = q
            .iter()
            .find(|(qid, _)| *qid == 0)
            .and_then(|(_, w)| w.upgrade())
        {
            w.wake();
        }
    }
    /// The host sent a command (on any queue): keep-alive traffic.
    pub fn touch(&self, now: Instant) {
        let t = now_ms(now);
        if self.last_ms.load(Ordering::Relaxed) != t {
            self.last_ms.store(t, Ordering::Relaxed);
        }
    }
    /// Keep-alive timeout in ms (0: none).
    pub fn kato_ms(&self) -> u32 {
        self.kato_ms.load(Ordering::Relaxed)
    }
    /// When the controller is torn down unless the host sends something: its last
    /// command plus KATO plus [`kato_margin`]; for a discovery controller with KATO 0,
    /// plus [`DISCOVERY_IDLE`]. `None`: never (an I/O controller with KATO 0).
    pub fn keepalive_deadline(&self) -> Option<Instant> {
        let kato = Duration::from_millis(self.kato_ms() as u64);
        let limit = if kato.is_zero() {
            if !self.is_discovery() {
                return None;
            }
            DISCOVERY_IDLE
        } else {
            kato + kato_margin(kato)
        };
        Some(epoch() + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit)
    }
    /// Close every queue of the controller (keep-alive timeout, subsystem deleted).
    pub fn close(&self) {
        self.stop_all();
    }
    /// A DH-HMAC-CHAP exchange for a new queue of this controller, if its host must
    /// authenticate.
    pub fn new_auth(&self) -> Option<Dhchap> {
        self.auth
            .as_ref()
            .map(|(k, p)| Dhchap::new(k.clone(), p.clone(), &self.host, &self.subsys.nqn))
    }
    pub fn io_queues_granted(&self) -> u16 {
        self.lock().io_queues
    }
    pub fn enabled(&self) -> bool {
        self.lock().csts & 1 != 0
    }
    pub fn qids(&self) -> Vec<u16> {
        self.lock().qids.iter().copied().collect()
    }
    fn note_ns_change(&self, nsid: u32) {
        let mut g = self.lock();
        if g.changed.len() >= 1024 {
            g.changed_overflow = true;
        } else {
            g.changed.insert(nsid);
        }
        if g.aec & AEC_NS_ATTR != 0 && !g.aen_masked {
            g.aen_pending = true;
            drop(g);
            self.wake_admin();
        }
    }
    /// An event for a held AER, if one is due (dword 0 of its completion).
    pub fn take_event(&self) -> Option<u32> {
        let mut g = self.lock();
        if g.aen_pending {
            g.aen_pending = false;
            g.aen_masked = true;
            Some(AEN_NS_CHANGED)
        } else {
            None
        }
    }

    /// Property Get / Set (fabrics), on the admin queue.
    fn property(&self, sqe: Sqe, set: bool) -> Cqe {
        let size8 = sqe.0[40] & 7 == 1;
        let off = le32(sqe.0, 44);
        let mut g = self.lock();
        if set {
            let v = le64(sqe.0, 48);
            return match (off, size8) {
                (0x14, false) => {
                    let v = v as u32;
                    let was = g.cc;
                    g.cc = v;
                    if v & 1 != 0 && was & 1 == 0 {
                        g.csts |= 1; // RDY
                    } else if v & 1 == 0 {
                        g.csts &= !1;
                    }
                    if (v >> 14) & 3 != 0 {
                        g.csts = (g.csts & !(3 << 2)) | (2 << 2); // shutdown complete
                    } else {
                        g.csts &= !(3 << 2);
                    }
                    Cqe::ok(0)
                }
                _ => Cqe::err(Status::INVALID_FIELD),
            };
        }
        let v: u64 = match (off, size8) {
            (0x00, true) => {
                let mqes = if self.is_discovery() {
                    ADMIN_QUEUE_ENTRIES
                } else {
                    IO_QUEUE_ENTRIES
                } as u64
                    - 1;
                // MQES, CQR, timeout 15 s (500 ms units), CSS: NVM command set.
                mqes | 1 << 16 | 30 << 24 | 1 << 37
            }
            (0x08, false) => 0x0001_0400, // 1.4
            (0x14, false) => g.cc as u64,
            (0x1c, false) => g.csts as u64,
            _ => return Cqe::err(Status::INVALID_FIELD),
        };
        Cqe {
            dw0: v as u32,
            dw1: (v >> 32) as u32,
            status: Status::SUCCESS,
        }
    }

    /// Execute an admin command (or a fabrics Property Get/Set on the admin queue). Data
    /// for the host goes to `out` (the transport sends the command's data length, padded
    /// with zeros). No supported admin command takes data from the host.
    pub fn admin(
        &self,
        r: &dyn Resolver,
        at: Where,
        sqe: Sqe,
        out: &mut Vec<u8>,
        aers: usize,
    ) -> Outcome {
        if sqe.is_fabrics() {
            return Outcome::Done(match sqe.fctype() {
                0x00 => self.property(sqe, true),
                0x04 => self.property(sqe, false),
                0x08 => Cqe::ok(0), // Disconnect: the transport closes
                0x01 => Cqe::err(sc::CMD_SEQUENCE), // Connect twice
                _ => Cqe::err(Status::INVALID_OPCODE),
            });
        }
        if !self.enabled() {
            return Outcome::Done(Cqe::err(sc::CMD_SEQUENCE));
        }
        let disc = self.is_discovery();
        let cqe = match sqe.opcode() {
            0x06 => self.identify(sqe, out),
            0x02 => self.get_log_page(r, at, sqe, out),
            0x09 if !disc => self.set_features(sqe),
            0x0a => self.get_features(sqe, out),
            0x18 => Cqe::ok(0), // Keep Alive
            0x0c => {
                if aers >= MAX_AERS {
                    Cqe::err(sc::AER_LIMIT)
                } else {
                    return Outcome::Held;
                }
            }
            0x08 => Cqe::ok(1), // Abort: not aborted
            0x09 => {
                // Discovery controllers support only the keep-alive and AEC features.
                match sqe.cdw(10) & 0xff {
                    0x0f | 0x0b => self.set_features(sqe),
                    _ => Cqe::err(Status::INVALID_FIELD),
                }
            }
            _ => Cqe::err(Status::INVALID_OPCODE),
        };
        Outcome::Done(cqe)
    }

    fn identify(&self, sqe: Sqe, out: &mut Vec<u8>) -> Cqe {
        let cns = sqe.cdw(10) & 0xff;
        let nsid = sqe.nsid();
        out.clear();
        out.resize(4096, 0);
        let ns = self.subsys.namespaces();
        let disc = self.is_discovery();
        match cns {
            0x01 => self.identify_ctrl(out),
            0x00 if !disc => {
                if nsid == 0 || (nsid > MAX_NSID && nsid != 0xffff_ffff) {
                    return Cqe::err(Status::INVALID_NAMESPACE);
                }
                // An inactive (unused) NSID reads as zeros.
                if let Some(n) = ns.get(&nsid) {
                    identify_ns(n, out);
                }
            }
            0x02 if !disc => {
                if nsid >= 0xffff_fffe {
                    return Cqe::err(Status::INVALID_NAMESPACE);
                }
                for (i, id) in ns.keys().filter(|&&id| id > nsid).take(1024).enumerate() {
                    put32(out, i * 4, *id);
                }
            }
            0x03 if !disc => {
                let Some(n) = ns.get(&nsid) else {
                    return Cqe::err(Status::INVALID_NAMESPACE);
                };
                crate::model::ns_descriptors(&n.nguid, out);
            }
            // I/O command set specific controller / namespace for the NVM set: no limits.
            0x06 if !disc && (sqe.cdw(11) >> 24) == 0 => {}
            0x05 if !disc && (sqe.cdw(11) >> 24) == 0 => {
                if !ns.contains_key(&nsid) {
                    return Cqe::err(Status::INVALID_NAMESPACE);
                }
            }
            _ => {
                out.clear();
                return Cqe::err(Status::INVALID_FIELD);
            }
        }
        Cqe::ok(0)
    }

    fn identify_ctrl(&self, b: &mut [u8]) {
        let disc = self.is_discovery();
        crate::model::identify_ctrl_common(
            &crate::model::CtrlIdent {
                serial: &self.subsys.serial,
                cntlid: self.cntlid,
                mdts: MDTS,
                aerl: (MAX_AERS - 1) as u8,
                maxcmd: IO_QUEUE_ENTRIES,
                nn: MAX_NSID,
                ns_notices: !disc,
            },
            b,
        );
        b[76] = 0x02; // CMIC: may have more than one controller
                      // CTRATT: traffic-based keep alive (every command counts as keep-alive traffic).
        put32(b, 96, 1 << 6);
        put16(b, 320, KAS);
        if disc {
            b[111] = 2; // CNTRLTYPE: discovery
            b[512] = 0;
            b[513] = 0;
            put16(b, 514, ADMIN_QUEUE_ENTRIES);
            put32(b, 516, 0);
            put16(b, 520, 0);
            b[525] = 0;
            put32(b, 540, 0);
        }
        put32(b, 536, 1 | 1 << 20); // SGLS: SGLs supported, offsets in data block descriptors
        put_str(b, 768, 256, &self.subsys.nqn);
        // Fabrics: IOCCSZ, IORCSZ (16-byte units), ICDOFF 0, dynamic model, one SGL
        // descriptor.
        put32(b, 1792, ((64 + IN_CAPSULE_DATA) / 16) as u32);
        put32(b, 1796, 1);
        b[1803] = 1;
    }

    fn get_log_page(&self, r: &dyn Resolver, at: Where, sqe: Sqe, out: &mut Vec<u8>) -> Cqe {
        let lid = sqe.cdw(10) & 0xff;
        let rae = sqe.cdw(10) & (1 << 15) != 0;
        // NUMD (0-based dwords) may ask for up to 16 GiB: check it against MDTS before
        // anything else, and never size a buffer by it.
        let numd = ((sqe.cdw(11) & 0xffff) as u64) << 16 | (sqe.cdw(10) >> 16) as u64;
        let len = (numd + 1) * 4;
        if len > MAX_TRANSFER as u64 {
            return Cqe::err(Status::INVALID_FIELD);
        }
        let len = len as usize;
        let off = (sqe.cdw(13) as u64) << 32 | sqe.cdw(12) as u64;
        if off & 3 != 0 {
            return Cqe::err(Status::INVALID_FIELD);
        }
        let disc = self.is_discovery();
        let page: Vec<u8> = match lid {
            0x70 if disc => {
                let (gen, mut entries) = r.discovery_log(&self.host, at.listen);
                for e in entries.iter_mut() {
                    if e.addr.ip().is_unspecified() {
                        e.addr.set_ip(at.local.ip());
                    }
                }
                discovery_log(gen, &entries)
            }
            0x01 => vec![0u8; 64],
            0x02 if !disc => self.smart_log(),
            0x03 if !disc => crate::model::firmware_log().to_vec(),
            0x04 if !disc => {
                let mut g = self.lock();
                let mut p = vec![0u8; 4096];
                if g.changed_overflow {
                    put32(&mut p, 0, 0xffff_ffff);
                } else {
                    for (i, id) in g.changed.iter().enumerate() {
                        put32(&mut p, i * 4, *id);
                    }
                }
                if !rae {
                    g.changed.clear();
                    g.changed_overflow = false;
                    g.aen_masked = false;
                }
                p
            }
            _ => return Cqe::err(sc::INVALID_LOG_PAGE),
        };
        // What the page holds from the offset on, at most what was asked for; the transport
        // pads the rest of the host's buffer with zeros.
        out.clear();
        if off > page.len() as u64 {
            return Cqe::err(Status::INVALID_FIELD);
        }
        let src = &page[off as usize..];
        out.extend_from_slice(&src[..src.len().min(len)]);
        Cqe::ok(0)
    }

    fn smart_log(&self) -> Vec<u8> {
        let ns = self.subsys.namespaces();
        crate::model::smart_log(ns.values().map(|n| &*n.stats)).to_vec()
    }

    fn set_features(&self, sqe: Sqe) -> Cqe {
        let fid = sqe.cdw(10) & 0xff;
        if sqe.cdw(10) & (1 << 31) != 0 {
            return Cqe::err(sc::FEATURE_NOT_SAVEABLE);
        }
        let v = sqe.cdw(11);
        let mut g = self.lock();
        match fid {
            0x07 => {
                let (nsq, ncq) = ((v & 0xffff) as u16, (v >> 16) as u16);
                if nsq == 0xffff || ncq == 0xffff {
                    return Cqe::err(Status::INVALID_FIELD);
                }
                if g.io_queues == 0 {
                    g.io_queues = (nsq.max(ncq) + 1).min(MAX_IO_QUEUES);
                }
                let n = (g.io_queues - 1) as u32;
                Cqe::ok(n | n << 16)
            }
            0x0b => {
                g.aec = v;
                Cqe::ok(0)
            }
            0x0f => {
                self.kato_ms.store(v, Ordering::Relaxed);
                Cqe::ok(0)
            }
            // Accepted and remembered nowhere: arbitration, power management, temperature
            // threshold, error recovery, volatile write cache (always on), interrupt
            // coalescing and configuration (no interrupts on fabrics).
            0x01 | 0x02 | 0x04 | 0x05 | 0x06 | 0x08 | 0x09 => Cqe::ok(0),
            _ => Cqe::err(Status::INVALID_FIELD),
        }
    }

    fn get_features(&self, sqe: Sqe, out: &mut Vec<u8>) -> Cqe {
        let fid = sqe.cdw(10) & 0xff;
        let sel = (sqe.cdw(10) >> 8) & 7;
        out.clear();
        let g = self.lock();
        if sel == 3 {
            // Supported capabilities: changeable, not saveable.
            return match fid {
                0x01..=0x09 | 0x0b | 0x0f => Cqe::ok(0b100),
                _ => Cqe::err(Status::INVALID_FIELD),
            };
        }
        let current = sel == 0;
        let v = match fid {
            0x01 | 0x02 | 0x04 | 0x05 | 0x06 => crate::model::common_feature(fid).unwrap_or(0),
            0x07 => {
                let n = if current && g.io_queues > 0 {
                    g.io_queues
                } else {
                    MAX_IO_QUEUES
                } as u32
                    - 1;
                n | n << 16
            }
            0x08 | 0x09 => 0,
            0x0b => {
                if current {
                    g.aec
                } else {
                    0
                }
            }
            0x0f => {
                if current {
                    self.kato_ms()
                } else {
                    0
                }
            }
            _ => return Cqe::err(Status::INVALID_FIELD),
        };
        Cqe::ok(v)
    }
}

fn identify_ns(n: &Namespace, b: &mut [u8]) {
    crate::model::identify_ns(n.dev.info(), n.num_blocks(), &n.nguid, true, b);
}

/// The discovery log page (header and entries).
pub fn discovery_log(gen: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut p = vec![0u8; 1024 * (1 + entries.len())];
    put64(&mut p, 0, gen);
    put64(&mut p, 8, entries.len() as u64);
    for (i, e) in entries.iter().enumerate() {
        let o = 1024 * (i + 1);
        p[o] = 3; // TRTYPE: TCP
        p[o + 1] = if e.addr.is_ipv4() { 1 } else { 2 }; // ADRFAM
        p[o + 2] = if e.subnqn == DISCOVERY_NQN { 3 } else { 2 }; // SUBTYPE
        p[o + 3] = 0x02; // TREQ: secure channel not required
        put16(&mut p, o + 4, e.port_id);
        put16(&mut p, o + 6, 0xffff); // CNTLID: dynamic
        put16(&mut p, o + 8, ADMIN_QUEUE_ENTRIES); // ASQSZ
        put_str(&mut p, o + 32, 32, &e.addr.port().to_string());
        put_str(&mut p, o + 256, 256, &e.subnqn);
        put_str(&mut p, o + 512, 256, &e.addr.ip().to_string());
        // TSAS for TCP: security type none.
    }
    p
}

/// A Fabrics Connect that succeeded.
pub struct Connected {
    pub ctrl: Arc<Controller>,
    pub qid: u16,
    /// Queue entries (SQSIZE + 1).
    pub entries: u16,
    /// The queue must authenticate before anything else (Connect's AUTHREQ.ATR is set).
    pub auth: Option<Dhchap>,
}

/// AUTHREQ of a Connect response (dword 0 bits 17 and 18): ATR, authentication required.
pub const AUTHREQ_ATR: u32 = 1 << 17;

/// Fabrics Connect: create a controller (admin queue) or join one (I/O queue).
/// `data` is the 1024-byte connect data. On refusal the completion to send is returned.
pub fn connect(r: &dyn Resolver, sqe: Sqe, data: &[u8], peer: &str) -> Result<Connected, Cqe> {
    // Invalid parameter: dword 0 says which (IATTR bit 16: 1 = in the data, IPO = offset).
    let invalid = |in_data: bool, off: u16| Cqe {
        dw0: (in_data as u32) << 16 | off as u32,
        dw1: 0,
        status: sc::CONNECT_INVALID_PARAM,
    };
    if le16(sqe.0, 40) != 0 {
        return Err(Cqe::err(sc::CONNECT_INCOMPATIBLE)); // record format 0 only
    }
    if data.len() < 1024 {
        return Err(Cqe::err(sc::SGL_LENGTH_INVALID));
    }
    let qid = le16(sqe.0, 42);
    let entries = le16(sqe.0, 44) as u32 + 1;
    let kato = le32(sqe.0, 48);
    let mut hostid = [0u8; 16];
    hostid.copy_from_slice(&data[..16]);
    let cntlid = le16(data, 16);
    let subnqn = get_str(&data[256..512]);
    let hostnqn = get_str(&data[512..768]);
    let Some(sub) = r.subsystem(&subnqn) else {
        r.refused(&format!(
            "connect from {peer} ({hostnqn}) to unknown subsystem {subnqn:?}"
        ));
        return Err(invalid(true, 256));
    };
    let disc = sub.nqn == DISCOVERY_NQN;
    let auth = if disc {
        if !r.discovery_allowed(&hostnqn) {
            r.refused(&format!(
                "host {hostnqn:?} ({peer}) may not use the discovery controller: connect refused"
            ));
            return Err(Cqe::err(sc::CONNECT_INVALID_HOST));
        }
        None
    } else {
        match sub.access(&hostnqn) {
            Access::Denied => {
                r.refused(&format!(
                    "host {hostnqn:?} ({peer}) is not on the allow-list of {subnqn}: connect refused"
                ));
                return Err(Cqe::err(sc::CONNECT_INVALID_HOST));
            }
            Access::NoSecret => {
                r.refused(&format!(
                    "host {hostnqn:?} ({peer}) has no DH-HMAC-CHAP secret, and {subnqn} requires authentication: connect refused"
                ));
                return Err(Cqe::err(sc::CONNECT_INVALID_HOST));
            }
            Access::Open => None,
            Access::Auth(k, p) => Some((k, p)),
        }
    };
    if qid == 0 {
        if entries < 2 || entries > ADMIN_QUEUE_ENTRIES as u32 {
            return Err(invalid(false, 44));
        }
        if cntlid != 0xffff {
            return Err(invalid(true, 16)); // dynamic controller model only
        }
        let Some(ctrl) = sub.new_controller(&hostnqn, hostid, kato, auth) else {
            r.refused(&format!(
                "{subnqn} has {MAX_CNTLID} controllers, every controller id is in use: connect from {peer} refused"
            ));
            return Err(Cqe::err(sc::CONNECT_CTRL_BUSY));
        };
        let auth = ctrl.new_auth();
        return Ok(Connected {
            ctrl,
            qid,
            entries: entries as u16,
            auth,
        });
    }
    if disc {
        return Err(invalid(false, 42));
    }
    let Some(ctrl) = sub.controllers().into_iter().find(|c| c.cntlid == cntlid) else {
        return Err(invalid(true, 16));
    };
    if ctrl.host != hostnqn || ctrl.hostid != hostid {
        return Err(invalid(true, 512));
    }
    if !ctrl.enabled() {
        return Err(Cqe::err(sc::CMD_SEQUENCE));
    }
    let granted = ctrl.io_queues_granted();
    if qid > granted.max(1) || qid > MAX_IO_QUEUES {
        return Err(invalid(false, 42));
    }
    if ctrl.lock().qids.contains(&qid) {
        return Err(invalid(false, 42));
    }
    if entries < 2 || entries > IO_QUEUE_ENTRIES as u32 {
        return Err(invalid(false, 44));
    }
    let auth = ctrl.new_auth();
    Ok(Connected {
        ctrl,
        qid,
        entries: entries as u16,
        auth,
    })
}

// The NVM I/O semantics (parse, Write Zeroes emulation, Dataset Management fan-out)
// live in `crate::nvm`, shared by every transport.
pub use crate::nvm::{dsm_ranges, parse_io, IoPlan};

#[cfg(test)]
mod tests;
