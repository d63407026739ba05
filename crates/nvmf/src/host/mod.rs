//! NVMe/TCP host (initiator): a [`BlockDevice`] whose data lives in a namespace of a
//! remote NVMe/TCP subsystem, reached over one or more paths.
//!
//! # Threads
//!
//! * **The controller thread** (one per [`RemoteDevice`], blocking sockets with timeouts:
//!   the control plane) owns the admin queue: Fabrics Connect of queue 0 with the
//!   keep-alive timeout, CC.EN=1 and CSTS.RDY, Identify Controller and Namespace, Set
//!   Features Number of Queues. It sends Keep Alive every `kato / 2`, re-reads the
//!   namespace size and, where Identify Controller's CMIC bit 3 says the controller reports
//!   ANA, the ANA log page (every few seconds). It notices a lost path (admin socket closed
//!   or failing, keep-alive failure, an inaccessible ANA state), picks the next path
//!   (ANA optimized > non-optimized/unknown > inaccessible, then the order given), and
//!   establishes a new association there (new admin connection, new CNTLID). Paths that
//!   failed are tried again about every second while no path is up.
//! * **I/O queues** ([`BlockQueue`], one per worker, owned by one thread, no locks on
//!   the hot path). Each queue registers a hand-over slot with the controller thread; the
//!   controller thread connects its TCP connection (ICReq/ICResp, Fabrics Connect with
//!   qid = the queue's index and the association's CNTLID) on its own thread, then puts
//!   the socket in the slot and signals the slot's eventfd: a worker never blocks on a
//!   connect. Each queue runs its socket on its own io_uring (`completion_fd` is the
//!   ring's eventfd; `wait_fds` adds the hand-over eventfd): one `Recv` preposted into a
//!   64 KiB receive buffer, PDUs parsed incrementally from it and C2HData payload copied
//!   straight into the command's SG list; one `Send` at a time of a preallocated send
//!   buffer holding command capsules (in-capsule data up to the controller's IOCCSZ,
//!   otherwise the data follows an R2T in H2CData PDUs of at most MAXH2CDATA), with a
//!   second buffer filling meanwhile. The kernel never sees a buffer move: a lost
//!   connection's socket is shut down and kept until its operations completed.
//!   CID = slot index (a slot table of `depth` entries and a free list, allocated at open;
//!   commands past the depth wait in a backlog with room reserved up front): no heap
//!   allocation per I/O once the buffers reached their high-water mark.
//!
//! # Retry rules
//!
//! When an I/O queue's connection is lost (closed, a send or receive error, a protocol
//! violation by the controller, or a command outstanding longer than `io_timeout`), every
//! in-flight command goes back to the front of the queue's pending list (counted in
//! `commands_retried`) and is resent on the next connection the controller thread hands
//! over. If none arrives within `loss_timeout` of the loss, the waiting commands complete
//! with a path error (SCT 3 / SC 0x71, transient transport error; `commands_failed`), and
//! while the queue stays disconnected new commands fail at once. A new connection ends
//! that state.
//!
//! # Limits
//!
//! Every value a controller sends is checked before use: PDU type, HLEN, PLEN and PDO
//! against the negotiated digests and the largest transfer; CIDs must name an in-flight
//! command; C2HData must arrive in order and stay within the command's data; R2Ts must
//! stay within a write's data. A violation closes the connection (the path goes through a
//! reconnect), never a panic. Admin data is bounded to 64 KiB per command.
//!
//! DH-HMAC-CHAP (host secret, optionally the controller's for bidirectional
//! authentication) runs on every queue whose Connect asks for it, on the controller
//! thread, before the queue is handed over.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmux_core::eventfd::EventFd;
use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, Error, ErrorKind};

use crate::pdu::Digests;

mod auth;
mod queue;
pub mod sync;
pub mod wire;

pub use queue::PATH_ERROR;
use queue::{Conn, QueueShared, RemoteQueue};
use sync::SyncConn;

/// Where and how to reach a remote namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    pub subnqn: String,
    /// Paths to the same subsystem, in order of preference ("127.0.0.1:4420").
    pub paths: Vec<SocketAddr>,
    pub nsid: u32,
    pub hostnqn: String,
    /// "DHHC-1:..." host secret.
    pub dhchap_secret: Option<String>,
    /// Controller secret (bidirectional authentication).
    pub dhchap_ctrl_secret: Option<String>,
    pub hdgst: bool,
    pub ddgst: bool,
    /// After every path is lost, commands wait this long for a path, then fail; after it
    /// new commands fail at once until a path is back (reconnect goes on in the background).
    pub loss_timeout: Duration,
    /// Keep-alive timeout.
    pub kato: Duration,
    /// A command without answer this long: the connection is declared dead.
    pub io_timeout: Duration,
}

impl RemoteSpec {
    /// A spec with the defaults: namespace 1, no secrets, no digests, loss timeout 30 s,
    /// keep-alive timeout 10 s, I/O timeout 30 s.
    pub fn new(subnqn: &str, paths: Vec<SocketAddr>, hostnqn: &str) -> Self {
        RemoteSpec {
            subnqn: subnqn.to_string(),
            paths,
            nsid: 1,
            hostnqn: hostnqn.to_string(),
            dhchap_secret: None,
            dhchap_ctrl_secret: None,
            hdgst: false,
            ddgst: false,
            loss_timeout: Duration::from_secs(30),
            kato: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Parse "NQN@HOST:PORT[,HOST:PORT...]" (split at the last '@').
pub fn parse_remote(s: &str) -> nvmux_core::Result<(String, Vec<SocketAddr>)> {
    let Some((nqn, addrs)) = s.rsplit_once('@') else {
        return Err(invalid(format!(
            "remote {s:?}: expected NQN@HOST:PORT[,HOST:PORT...]"
        )));
    };
    let nqn = nqn.trim();
    if nqn.is_empty() {
        return Err(invalid(format!("remote {s:?}: the subsystem NQN is empty")));
    }
    if nqn.len() > 223 {
        return Err(invalid(format!(
            "remote {s:?}: the NQN is longer than 223 bytes"
        )));
    }
    let mut paths = Vec::new();
    for a in addrs.split(',') {
        let a = a.trim();
        if a.is_empty() {
            return Err(invalid(format!("remote {s:?}: an empty address")));
        }
        let addr = match a.parse::<SocketAddr>() {
            Ok(x) => x,
            Err(_) => {
                if !a.contains(':') {
                    return Err(invalid(format!("remote {s:?}: address {a:?} has no port")));
                }
                a.to_socket_addrs()
                    .map_err(|e| invalid(format!("remote {s:?}: address {a:?}: {e}")))?
                    .next()
                    .ok_or_else(|| {
                        invalid(format!("remote {s:?}: address {a:?} resolves to nothing"))
                    })?
            }
        };
        if addr.port() == 0 {
            return Err(invalid(format!("remote {s:?}: address {a:?} has port 0")));
        }
        if paths.contains(&addr) {
            return Err(invalid(format!("remote {s:?}: address {addr} given twice")));
        }
        paths.push(addr);
    }
    Ok((nqn.to_string(), paths))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    Live,
    Connecting,
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathStatus {
    pub addr: SocketAddr,
    pub state: PathState,
    /// The path the association is on.
    pub active: bool,
    /// The namespace's ANA state on this path when last seen ("optimized",
    /// "non-optimized", "inaccessible", "persistent-loss", "change"), if reported.
    pub ana: Option<&'static str>,
}

#[derive(Clone, Debug)]
pub struct RemoteStatus {
    pub subnqn: String,
    pub nsid: u32,
    pub paths: Vec<PathStatus>,
    pub connected: bool,
    /// Times the active path changed.
    pub failovers: u64,
    /// Associations re-established after a loss.
    pub reconnects: u64,
    /// Time from a path loss to the first command completed on the new path.
    pub last_failover_ms: Option<u64>,
    /// Commands failed after the loss timeout.
    pub commands_failed: u64,
    /// Commands resent after a connection loss.
    pub commands_retried: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    failovers: AtomicU64,
    reconnects: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
}

struct Ctl {
    queues: Vec<Arc<QueueShared>>,
    poked: bool,
    paths: Vec<PathStatus>,
    connected: bool,
    /// I/O queues the controller granted.
    granted: u16,
    /// Largest queue size (CAP.MQES + 1).
    max_entries: u16,
}

/// What the device, its queues and the controller thread share.
pub struct Shared {
    spec: RemoteSpec,
    counters: Counters,
    failover_pending: AtomicBool,
    failover_since: Mutex<Option<Instant>>,
    last_failover_ms: AtomicU64,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    stop: AtomicBool,
    capacity: AtomicU64,
    /// Parameters queues need, fixed at the first connect.
    nsid: u32,
    block_size: u32,
    max_transfer: u32,
}

impl Shared {
    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the controller thread (a queue wants a connection or closed).
    pub(crate) fn poke(&self) {
        self.ctl().poked = true;
        self.cv.notify_all();
    }

    /// A command completed: the first one after a failover sets `last_failover_ms`.
    #[inline]
    pub(crate) fn first_completion(&self) {
        if self.failover_pending.load(Ordering::Relaxed)
            && self.failover_pending.swap(false, Ordering::AcqRel)
        {
            let since = self
                .failover_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(t) = since {
                self.last_failover_ms
                    .store(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// A namespace of a remote NVMe/TCP subsystem as a block device.
pub struct RemoteDevice {
    sh: Arc<Shared>,
    info: DeviceInfo,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Each path's TCP connect and each blocking exchange while connecting is bounded by this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Queues asked for at Set Features Number of Queues.
const WANT_QUEUES: u16 = 64;
/// How often the ANA log and the namespace size are re-read.
const POLL_EVERY: Duration = Duration::from_secs(3);

/// One association: the admin queue on one path.
struct Assoc {
    admin: SyncConn,
    path: usize,
    cntlid: u16,
    ana: bool,
    anagrpid: u32,
    inline_max: usize,
    next_ka: Instant,
    next_poll: Instant,
}

/// What Identify told at the first connect.
struct Ident {
    info: DeviceInfo,
}

fn ana_name(s: u8) -> Option<&'static str> {
    Some(match s & 0xf {
        1 => "optimized",
        2 => "non-optimized",
        3 => "inaccessible",
        4 => "persistent-loss",
        0xf => "change",
        _ => return None,
    })
}

fn ana_rank(a: Option<&'static str>) -> u8 {
    match a {
        Some("optimized") => 0,
        None | Some("non-optimized") | Some("change") => 1,
        _ => 2,
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes([
        b[o],
        b[o + 1],
        b[o + 2],
        b[o + 3],
        b[o + 4],
        b[o + 5],
        b[o + 6],
        b[o + 7],
    ])
}

/// The namespace's ANA state in an ANA log page (`None` if not listed). Every count is
/// checked against the page's length.
pub fn ana_state(page: &[u8], anagrpid: u32, nsid: u32) -> Option<u8> {
    if page.len() < 16 {
        return None;
    }
    let n = u16::from_le_bytes([page[8], page[9]]) as usize;
    let mut o = 16;
    for _ in 0..n {
        if o + 32 > page.len() {
            return None;
        }
        let grp = le32(page, o);
        let nns = le32(page, o + 4) as usize;
        let state = page[o + 16];
        let end = nns.checked_mul(4).and_then(|x| x.checked_add(o + 32))?;
        if end > page.len() {
            return None;
        }
        if grp == anagrpid || (o + 32..end).step_by(4).any(|p| le32(page, p) == nsid) {
            return Some(state & 0xf);
        }
        o = end;
    }
    None
}

impl Shared {
    fn set_path(
        &self,
        i: usize,
        state: PathState,
        active: bool,
        ana: Option<Option<&'static str>>,
    ) {
        let mut c = self.ctl();
        if let Some(p) = c.paths.get_mut(i) {
            p.state = state;
            p.active = active;
            if let Some(a) = ana {
                p.ana = a;
            }
        }
    }

    /// The order in which to try the paths.
    fn path_order(&self) -> Vec<usize> {
        let c = self.ctl();
        let mut v: Vec<usize> = (0..c.paths.len()).collect();
        v.sort_by_key(|&i| (ana_rank(c.paths[i].ana), i));
        v
    }

    fn digests(&self) -> Digests {
        Digests {
            header: self.spec.hdgst,
            data: self.spec.ddgst,
        }
    }
}

/// DH-HMAC-CHAP on a queue whose Connect asked for it (`atr`).
fn maybe_auth(q: &mut SyncConn, spec: &RemoteSpec, qid: u16, atr: bool) -> Result<(), String> {
    if !atr {
        return Ok(());
    }
    let Some(secret) = &spec.dhchap_secret else {
        return Err(format!(
            "{}: the controller requires DH-HMAC-CHAP authentication and no host secret is configured",
            q.addr
        ));
    };
    auth::authenticate(
        q,
        qid.wrapping_add(1),
        &spec.subnqn,
        &spec.hostnqn,
        secret,
        spec.dhchap_ctrl_secret.as_deref(),
    )
    .map_err(|e| format!("{}: queue {qid}: authentication failed: {e}", q.addr))
}

/// Connect the admin queue on `addr` and identify. Returns the association and what
/// Identify says.
fn associate(
    spec: &RemoteSpec,
    dg: Digests,
    path: usize,
) -> Result<(Assoc, Ident, u16, u16), String> {
    let addr = spec.paths[path];
    let mut a = SyncConn::open(addr, dg, CONNECT_TIMEOUT)?;
    let kato_ms = spec.kato.as_millis().min(u32::MAX as u128) as u32;
    let (cntlid, atr) = a.connect(0, 32, &spec.subnqn, &spec.hostnqn, 0xffff, kato_ms)?;
    maybe_auth(&mut a, spec, 0, atr)?;
    let cap = a.prop_get(0, true)?;
    let mqes = (cap & 0xffff) as u16;
    let to = (cap >> 24) & 0xff;
    let mpsmin = ((cap >> 48) & 0xf) as u32;
    a.prop_set(0x14, 1 | 6 << 16 | 4 << 20)?;
    let deadline = Instant::now() + Duration::from_millis((to * 500).clamp(500, 15_000));
    loop {
        let csts = a.prop_get(0x1c, false)?;
        if csts & 2 != 0 {
            return Err(format!("{addr}: controller fatal status"));
        }
        if csts & 1 == 1 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("{addr}: controller not ready in time"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let idc = a.identify(1, 0)?;
    let idn = a.identify(0, spec.nsid)?;
    let nsze = le64(&idn, 0);
    if nsze == 0 {
        return Err(format!("{addr}: namespace {} does not exist", spec.nsid));
    }
    let flbas = idn[26];
    let fmt = ((flbas & 0xf) | ((flbas >> 5) & 3) << 4) as usize;
    if fmt > 63 {
        return Err(format!("{addr}: bad LBA format index"));
    }
    let lbaf = &idn[128 + 4 * fmt..132 + 4 * fmt];
    if lbaf[0] != 0 || lbaf[1] != 0 {
        return Err(format!(
            "{addr}: namespaces with metadata are not supported"
        ));
    }
    let lbads = lbaf[2];
    if lbads != 9 && lbads != 12 {
        return Err(format!(
            "{addr}: block size 2^{lbads} not supported (512 or 4096 only)"
        ));
    }
    let block_size = 1u32 << lbads;
    let page = 4096u64 << mpsmin;
    let mdts = idc[77];
    let max_transfer = if mdts == 0 || mdts > 20 {
        1 << 20
    } else {
        (page << mdts).min(1 << 20)
    } as u32;
    let oncs = u16::from_le_bytes([idc[520], idc[521]]);
    let ioccsz = le32(&idc, 1792) as usize;
    let inline_max = (ioccsz * 16).saturating_sub(64).min(64 << 10);
    let ana = idc[76] & 0x08 != 0;
    let anagrpid = le32(&idn, 92);
    let info = DeviceInfo {
        block_size,
        num_blocks: nsze,
        read_only: idn[99] & 1 != 0,
        discard: oncs & 0x04 != 0,
        write_zeroes: oncs & 0x08 != 0,
        volatile_cache: idc[525] & 1 != 0,
        max_transfer,
    };
    // Number of queues.
    let mut s = sync::sqe(0x09, 0);
    sync::set32(&mut s, 10, 0x07);
    let w = (WANT_QUEUES - 1) as u32;
    sync::set32(&mut s, 11, w | w << 16);
    let (c, _) = a.cmd(s, &[], 0)?;
    if !c.ok() {
        return Err(format!(
            "{addr}: set features number of queues: status {:#x}",
            c.status
        ));
    }
    let granted = ((c.dw0 & 0xffff).min(c.dw0 >> 16) as u16).saturating_add(1);
    let t = spec.kato.min(spec.io_timeout).max(Duration::from_secs(1));
    a.set_timeout(t);
    let now = Instant::now();
    Ok((
        Assoc {
            admin: a,
            path,
            cntlid,
            ana,
            anagrpid,
            inline_max,
            next_ka: now + spec.kato / 2,
            next_poll: now,
        },
        Ident { info },
        granted,
        mqes.saturating_add(1).max(2),
    ))
}

impl Shared {
    /// Connect I/O queue `q` on association `a` and hand it over.
    fn connect_io(&self, a: &Assoc, q: &QueueShared) -> Result<(), String> {
        let addr = self.spec.paths[a.path];
        let mut c = SyncConn::open(addr, self.digests(), CONNECT_TIMEOUT)?;
        let (_, atr) = c.connect(
            q.qid,
            q.entries,
            &self.spec.subnqn,
            &self.spec.hostnqn,
            a.cntlid,
            0,
        )?;
        maybe_auth(&mut c, &self.spec, q.qid, atr)?;
        c.s.set_read_timeout(None).ok();
        c.s.set_write_timeout(None).ok();
        let conn = Conn {
            dg: c.ic.digests,
            inline_max: a.inline_max,
            maxh2c: c.ic.maxh2cdata as usize,
            cpda: c.ic.cpda,
            nsid: self.nsid,
            block_size: self.block_size,
            max_data: self.max_transfer as usize,
            stream: c.s,
        };
        *q.handover.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
        q.ready.store(true, Ordering::Release);
        q.evt.signal();
        Ok(())
    }

    /// Try the paths in order; the first that works carries the new association.
    fn establish(&self, prev: Option<usize>) -> Option<Assoc> {
        for i in self.path_order() {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            self.set_path(i, PathState::Connecting, false, None);
            match associate(&self.spec, self.digests(), i) {
                Ok((mut a, id, granted, mqes)) => {
                    if id.info.block_size != self.block_size || id.info.num_blocks == 0 {
                        tracing::warn!("{}: the namespace changed its format", self.spec.paths[i]);
                        self.set_path(i, PathState::Down, false, None);
                        continue;
                    }
                    let mut ana = None;
                    if a.ana {
                        if let Ok(p) = a.admin.get_log(0x0c, 0, 4096) {
                            ana = ana_state(&p, a.anagrpid, self.nsid).and_then(ana_name);
                        }
                        a.next_poll = Instant::now() + POLL_EVERY;
                    }
                    let bad = matches!(ana, Some("inaccessible") | Some("persistent-loss"));
                    let others = {
                        let c = self.ctl();
                        c.paths
                            .iter()
                            .enumerate()
                            .any(|(j, p)| j != i && ana_rank(p.ana) < 2)
                    };
                    if bad && others {
                        self.set_path(i, PathState::Down, false, Some(ana));
                        continue;
                    }
                    self.capacity.store(
                        id.info.num_blocks * self.block_size as u64,
                        Ordering::Relaxed,
                    );
                    self.set_path(i, PathState::Live, true, Some(ana));
                    {
                        let mut c = self.ctl();
                        c.connected = true;
                        c.granted = granted;
                        c.max_entries = c.max_entries.min(mqes);
                        for q in &c.queues {
                            q.want.store(true, Ordering::Release);
                        }
                    }
                    if let Some(p) = prev {
                        self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        if p != i {
                            self.counters.failovers.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tracing::info!(
                        "NVMe/TCP {}: associated on {} (cntlid {})",
                        self.spec.subnqn,
                        self.spec.paths[i],
                        a.cntlid
                    );
                    return Some(a);
                }
                Err(e) => {
                    tracing::warn!(
                        "NVMe/TCP {}: path {}: {e}",
                        self.spec.subnqn,
                        self.spec.paths[i]
                    );
                    self.set_path(i, PathState::Down, false, None);
                }
            }
        }
        None
    }

    fn lost(&self, a: &Assoc, why: &str) {
        tracing::warn!(
            "NVMe/TCP {}: path {} lost: {why}",
            self.spec.subnqn,
            self.spec.paths[a.path]
        );
        let _ = a.admin.s.shutdown(std::net::Shutdown::Both);
        self.set_path(a.path, PathState::Down, false, None);
        self.ctl().connected = false;
        *self
            .failover_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.failover_pending.store(true, Ordering::Release);
    }

    /// Keep-alive, ANA and size polling, and queue hand-overs on a live association.
    /// Err: the association is lost.
    fn service(&self, a: &mut Assoc) -> Result<(), String> {
        let now = Instant::now();
        if a.admin.peer_gone() {
            return Err("admin connection closed".into());
        }
        if !self.spec.kato.is_zero() && now >= a.next_ka {
            a.admin.keep_alive()?;
            a.next_ka = now + self.spec.kato / 2;
        }
        if now >= a.next_poll {
            a.next_poll = now + POLL_EVERY;
            let idn = a.admin.identify(0, self.nsid)?;
            let nsze = le64(&idn, 0);
            self.capacity
                .store(nsze * self.block_size as u64, Ordering::Relaxed);
            if a.ana {
                let p = a.admin.get_log(0x0c, 0, 4096)?;
                let st = ana_state(&p, a.anagrpid, self.nsid).and_then(ana_name);
                self.set_path(a.path, PathState::Live, true, Some(st));
                if matches!(st, Some("inaccessible") | Some("persistent-loss")) {
                    let others = self
                        .ctl()
                        .paths
                        .iter()
                        .enumerate()
                        .any(|(j, p)| j != a.path && ana_rank(p.ana) < 2);
                    if others {
                        return Err(format!("ANA state {}", st.unwrap_or("?")));
                    }
                }
            }
        }
        let qs: Vec<Arc<QueueShared>> = {
            let mut c = self.ctl();
            c.queues.retain(|q| !q.closed.load(Ordering::Acquire));
            c.queues
                .iter()
                .filter(|q| q.want.load(Ordering::Acquire))
                .cloned()
                .collect()
        };
        for q in qs {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            q.want.store(false, Ordering::Release);
            if let Err(e) = self.connect_io(a, &q) {
                tracing::warn!("NVMe/TCP {}: I/O queue {}: {e}", self.spec.subnqn, q.qid);
                q.want.store(true, Ordering::Release);
                if a.admin.peer_gone() {
                    return Err("admin connection closed".into());
                }
                // The controller may not have noticed the old connection close yet.
                std::thread::sleep(Duration::from_millis(100));
                a.admin.keep_alive()?;
            }
        }
        Ok(())
    }

    fn run(self: Arc<Shared>, first: Assoc) {
        let mut cur = Some(first);
        let mut prev = None;
        let mut next_try = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            match cur.as_mut() {
                Some(a) => {
                    if let Err(e) = self.service(a) {
                        self.lost(a, &e);
                        prev = Some(a.path);
                        cur = None;
                        next_try = Instant::now();
                        continue;
                    }
                }
                None if Instant::now() >= next_try => {
                    cur = self.establish(prev);
                    if cur.is_none() {
                        next_try = Instant::now() + Duration::from_secs(1);
                    }
                    continue;
                }
                None => {}
            }
            let mut c = self.ctl();
            if !c.poked {
                let wait = if cur.is_some() {
                    Duration::from_millis(50)
                } else {
                    Duration::from_millis(100)
                };
                c = self
                    .cv
                    .wait_timeout(c, wait)
                    .map(|r| r.0)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            c.poked = false;
        }
        if let Some(mut a) = cur {
            // Orderly shutdown (CC.SHN normal), briefly: a dead controller costs 500 ms.
            a.admin.set_timeout(Duration::from_millis(500));
            if !a.admin.peer_gone() {
                let _ = a.admin.prop_set(0x14, 1 | 6 << 16 | 4 << 20 | 1 << 14);
            }
            let _ = a.admin.s.shutdown(std::net::Shutdown::Both);
        }
        self.ctl().connected = false;
    }
}

impl RemoteDevice {
    /// Connect the admin queue on the first working path (ANA-optimized first where
    /// reported), identify controller and namespace, start the controller thread. Error if
    /// no path works or the namespace does not exist.
    pub fn connect(spec: RemoteSpec) -> nvmux_core::Result<Arc<RemoteDevice>> {
        if spec.paths.is_empty() {
            return Err(invalid("no path to the remote subsystem"));
        }
        if spec.nsid == 0 || spec.nsid == u32::MAX {
            return Err(invalid(format!("bad namespace id {}", spec.nsid)));
        }
        if spec.subnqn.len() > 223 || spec.hostnqn.len() > 223 || spec.hostnqn.is_empty() {
            return Err(invalid("NQNs must be 1 to 223 bytes"));
        }
        let dg = Digests {
            header: spec.hdgst,
            data: spec.ddgst,
        };
        let mut errs = Vec::new();
        for i in 0..spec.paths.len() {
            match associate(&spec, dg, i) {
                Ok((a, id, granted, mqes)) => {
                    let paths = spec
                        .paths
                        .iter()
                        .enumerate()
                        .map(|(j, &addr)| PathStatus {
                            addr,
                            state: if j == i {
                                PathState::Live
                            } else {
                                PathState::Down
                            },
                            active: j == i,
                            ana: None,
                        })
                        .collect();
                    let sh = Arc::new(Shared {
                        nsid: spec.nsid,
                        block_size: id.info.block_size,
                        max_transfer: id.info.max_transfer,
                        capacity: AtomicU64::new(id.info.size_bytes()),
                        spec,
                        counters: Counters::default(),
                        failover_pending: AtomicBool::new(false),
                        failover_since: Mutex::new(None),
                        last_failover_ms: AtomicU64::new(u64::MAX),
                        ctl: Mutex::new(Ctl {
                            queues: Vec::new(),
                            poked: false,
                            paths,
                            connected: true,
                            granted,
                            max_entries: mqes,
                        }),
                        cv: Condvar::new(),
                        stop: AtomicBool::new(false),
                    });
                    let s2 = sh.clone();
                    let t = std::thread::Builder::new()
                        .name("nvmf-host".into())
                        .spawn(move || s2.run(a))
                        .map_err(|e| Error::io("spawn the NVMe/TCP controller thread", e))?;
                    return Ok(Arc::new(RemoteDevice {
                        sh,
                        info: id.info,
                        thread: Mutex::new(Some(t)),
                    }));
                }
                Err(e) => {
                    if e.contains("does not exist") || e.contains("not supported") {
                        return Err(invalid(e));
                    }
                    errs.push(e)
                }
            }
        }
        Err(Error::new(
            ErrorKind::Io,
            format!(
                "NVMe/TCP {}: no path works: {}",
                spec.subnqn,
                errs.join("; ")
            ),
        ))
    }

    pub fn status(&self) -> RemoteStatus {
        let c = self.sh.ctl();
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ms = r(&self.sh.last_failover_ms);
        RemoteStatus {
            subnqn: self.sh.spec.subnqn.clone(),
            nsid: self.sh.nsid,
            paths: c.paths.clone(),
            connected: c.connected,
            failovers: r(&self.sh.counters.failovers),
            reconnects: r(&self.sh.counters.reconnects),
            last_failover_ms: (ms != u64::MAX).then_some(ms),
            commands_failed: r(&self.sh.counters.failed),
            commands_retried: r(&self.sh.counters.retried),
        }
    }

    /// Stop the controller thread and close every connection (also on Drop).
    pub fn shutdown(&self) {
        self.sh.stop.store(true, Ordering::Release);
        self.sh.poke();
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl BlockDevice for RemoteDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_queue(&self, depth: u32) -> nvmux_core::Result<Box<dyn BlockQueue>> {
        let q = {
            let mut c = self.sh.ctl();
            c.queues.retain(|q| !q.closed.load(Ordering::Acquire));
            let granted = c.granted.max(1);
            let Some(qid) = (1..=granted).find(|id| !c.queues.iter().any(|q| q.qid == *id)) else {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("the controller granted {granted} I/O queues, all in use"),
                ));
            };
            let entries = (depth.clamp(1, 1023) + 1).min(c.max_entries as u32).max(2) as u16;
            let q = Arc::new(QueueShared {
                qid,
                entries,
                handover: Mutex::new(None),
                ready: AtomicBool::new(false),
                evt: EventFd::new().map_err(|e| Error::io("eventfd", e))?,
                want: AtomicBool::new(true),
                closed: AtomicBool::new(false),
            });
            c.queues.push(q.clone());
            q
        };
        let rq = RemoteQueue::new(self.sh.clone(), q).map_err(|e| Error::io("epoll", e))?;
        self.sh.poke();
        Ok(Box::new(rq))
    }

    fn describe(&self) -> String {
        let st = self.status();
        let active = st
            .paths
            .iter()
            .find(|p| p.active)
            .map(|p| p.addr.to_string());
        format!(
            "nvmf {} nsid {} via {}",
            self.sh.spec.subnqn,
            self.sh.nsid,
            active.unwrap_or_else(|| "no path".into())
        )
    }

    fn capacity_bytes(&self) -> u64 {
        self.sh.capacity.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_remote_forms() {
        let (n, p) = parse_remote("nqn.2014-08.org.x:a@b@127.0.0.1:4420,127.0.0.1:4421").unwrap();
        assert_eq!(n, "nqn.2014-08.org.x:a@b");
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].port(), 4421);
        for bad in [
            "nqn",
            "@1.2.3.4:1",
            "n@",
            "n@1.2.3.4",
            "n@1.2.3.4:1,",
            "n@1.2.3.4:0",
            "n@1.2.3.4:1,1.2.3.4:1",
        ] {
            assert!(parse_remote(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ana_log_parsing() {
        let mut p = vec![0u8; 16];
        p[8] = 2;
        for (grp, nsids, st) in [(1u32, vec![5u32], 3u8), (2, vec![1, 2], 1)] {
            let mut d = vec![0u8; 32];
            d[0..4].copy_from_slice(&grp.to_le_bytes());
            d[4..8].copy_from_slice(&(nsids.len() as u32).to_le_bytes());
            d[16] = st;
            for n in nsids {
                d.extend_from_slice(&n.to_le_bytes());
            }
            p.extend_from_slice(&d);
        }
        assert_eq!(ana_state(&p, 0, 2), Some(1));
        assert_eq!(ana_state(&p, 1, 9), Some(3));
        assert_eq!(ana_state(&p, 0, 9), None);
        // A count past the page.
        p[16 + 4] = 0xff;
        assert_eq!(ana_state(&p, 0, 2), None);
    }
}
