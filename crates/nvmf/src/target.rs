//! The NVMe/TCP target: subsystems by NQN, a listener per address, and the discovery
//! controller on every listener.
//!
//! A listener is a task on the process's control threads ([`nvmux_core::ctlpoll`]), not
//! a thread of its own: 1000 listening addresses cost no thread each. It only accepts. It admits a connection within the listener's limits
//! (in total and per peer address; refused ones are closed at once and logged at most a
//! few times per burst), turns on TCP keep-alive, and makes the connection a [`Conn`] on a
//! worker (round robin), so the queues of one controller spread over the workers.
//! DH-HMAC-CHAP's modular exponentiations run on two `nvmf-auth` threads, off the workers.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nvmux_core::budget::{ConnLimiter, MemBudget};
use nvmux_core::ctlpoll::{CtlCx, CtlHandle, CtlTask, Next};
use nvmux_core::engine::Placement;

use crate::conn::{Conn, ConnParams, Counters, Limits};
use crate::ctrl::{DiscoveryEntry, Resolver, Subsystem, Waker, Where, DISCOVERY_NQN};
use crate::ratelog::RateLog;

/// Who may use the discovery controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DiscoveryPolicy {
    /// Every host (the log still lists only what the host may connect to).
    Open,
    /// Hosts on the allow-list of some subsystem (or any host, where a subsystem admits
    /// any host).
    #[default]
    AllowList,
    /// Nobody.
    Closed,
}

impl DiscoveryPolicy {
    pub fn parse(s: &str) -> Option<DiscoveryPolicy> {
        Some(match s {
            "open" => DiscoveryPolicy::Open,
            "allow-list" => DiscoveryPolicy::AllowList,
            "closed" => DiscoveryPolicy::Closed,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            DiscoveryPolicy::Open => "open",
            DiscoveryPolicy::AllowList => "allow-list",
            DiscoveryPolicy::Closed => "closed",
        }
    }
}

/// Limits and policies of a target.
#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// The daemon-wide budget of network buffers (shared with other frontends).
    pub mem: Arc<MemBudget>,
    /// Buffers one connection may hold.
    pub memory_per_connection: usize,
    /// Connections one listener holds at once (0: no limit).
    pub max_connections: usize,
    /// Connections one peer address holds at once on one listener (0: no limit).
    pub max_connections_per_host: usize,
    pub handshake_timeout: Duration,
    pub stall_timeout: Duration,
    pub discovery: DiscoveryPolicy,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            mem: MemBudget::new(1 << 30),
            memory_per_connection: 32 << 20,
            max_connections: 2048,
            max_connections_per_host: 256,
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            discovery: DiscoveryPolicy::AllowList,
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Threads for DH-HMAC-CHAP steps, started on first use.
const AUTH_THREADS: usize = 2;

struct Registry {
    subs: Mutex<BTreeMap<String, (Arc<Subsystem>, SocketAddr)>>,
    discovery: Arc<Subsystem>,
    policy: Mutex<DiscoveryPolicy>,
    genctr: AtomicU64,
    port_ids: Mutex<BTreeMap<SocketAddr, u16>>,
    /// Every connection, to close them at shutdown.
    conns: Mutex<Vec<Weak<Waker>>>,
    log: Arc<RateLog>,
    jobs: Mutex<Option<Sender<Job>>>,
}

impl Registry {
    fn subs(&self) -> MutexGuard<'_, BTreeMap<String, (Arc<Subsystem>, SocketAddr)>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Resolver for Registry {
    fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == DISCOVERY_NQN {
            return Some(self.discovery.clone());
        }
        self.subs().get(nqn).map(|(s, _)| s.clone())
    }
    fn discovery_log(&self, host: &str, listen: SocketAddr) -> (u64, Vec<DiscoveryEntry>) {
        let port_id = self
            .port_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&listen)
            .copied()
            .unwrap_or(0);
        let entries = self
            .subs()
            .values()
            .filter(|(s, a)| *a == listen && s.host_allowed(host))
            .map(|(s, a)| DiscoveryEntry {
                subnqn: s.nqn.clone(),
                addr: *a,
                port_id,
            })
            .collect();
        (self.genctr.load(Ordering::Relaxed), entries)
    }
    fn refused(&self, why: &str) {
        self.log.warn(|| why.to_string());
    }
    fn discovery_allowed(&self, host: &str) -> bool {
        match *self.policy.lock().unwrap_or_else(|e| e.into_inner()) {
            DiscoveryPolicy::Open => true,
            DiscoveryPolicy::Closed => false,
            DiscoveryPolicy::AllowList => self.subs().values().any(|(s, _)| s.host_allowed(host)),
        }
    }
    fn offload(&self, job: Job) {
        let mut g = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..AUTH_THREADS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("nvmf-auth{i}"))
                    .spawn(move || auth_thread(rx));
                if let Err(e) = spawned {
                    tracing::error!("nvme/tcp: cannot start an authentication thread: {e}");
                }
            }
            *g = Some(tx);
        }
        if let Some(tx) = g.as_ref() {
            if let Err(e) = tx.send(job) {
                // No thread to take it: run it here rather than lose it.
                drop(g);
                (e.0)();
            }
        }
    }
}

fn auth_thread(rx: Arc<Mutex<Receiver<Job>>>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(j) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(j)).is_err() {
                    tracing::error!("nvme/tcp: an authentication step panicked");
                }
            }
            Err(_) => return,
        }
    }
}

struct Listener {
    addr: SocketAddr,
    /// The listening socket (owned by the accept task), for a takeover.
    fd: std::os::fd::RawFd,
    stop: Arc<AtomicBool>,
    /// The accept task on a control thread.
    task: CtlHandle,
    limiter: Arc<ConnLimiter>,
}

impl Listener {
    /// Stop accepting and wait until the accept task has closed its socket (a copy a
    /// takeover's new process holds stays open and listening).
    fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.task.wake();
        self.task.wait_done();
    }
}

/// A listener's connection counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerStats {
    pub addr: SocketAddr,
    pub open: usize,
    pub refused: u64,
}

/// What a target's connections met, and its listeners' counts.
#[derive(Clone, Debug, Default)]
pub struct TargetStats {
    pub listeners: Vec<ListenerStats>,
    pub handshake_timeouts: u64,
    pub stall_timeouts: u64,
    pub kato_expired: u64,
    pub protocol_errors: u64,
    pub auth_ok: u64,
    pub auth_failed: u64,
    pub mem_waits: u64,
}

/// The NVMe/TCP target of one daemon.
pub struct Target {
    reg: Arc<Registry>,
    listeners: Mutex<BTreeMap<SocketAddr, Listener>>,
    placement: Placement,
    cfg: TargetConfig,
    limits: Arc<Limits>,
}

impl Target {
    /// A target whose connections go to the workers of `placement`, in turn.
    pub fn new(placement: Placement, cfg: TargetConfig) -> Target {
        let log = Arc::new(RateLog::default());
        let limits = Arc::new(Limits {
            mem: cfg.mem.clone(),
            per_conn: cfg.memory_per_connection,
            handshake: cfg.handshake_timeout,
            stall: cfg.stall_timeout,
            counters: Arc::new(Counters::default()),
            log: log.clone(),
        });
        Target {
            reg: Arc::new(Registry {
                subs: Mutex::new(BTreeMap::new()),
                discovery: Subsystem::new(DISCOVERY_NQN, "discovery"),
                policy: Mutex::new(cfg.discovery),
                genctr: AtomicU64::new(1),
                port_ids: Mutex::new(BTreeMap::new()),
                conns: Mutex::new(Vec::new()),
                log,
                jobs: Mutex::new(None),
            }),
            listeners: Mutex::new(BTreeMap::new()),
            placement,
            cfg,
            limits,
        }
    }

    fn listeners(&self) -> MutexGuard<'_, BTreeMap<SocketAddr, Listener>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The discovery log changed (hosts, namespaces do not count).
    pub fn changed(&self) {
        self.reg.genctr.fetch_add(1, Ordering::Relaxed);
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.reg.subs().get(nqn).map(|(s, _)| s.clone())
    }

    pub fn listen_addr(&self, nqn: &str) -> Option<SocketAddr> {
        self.reg.subs().get(nqn).map(|(_, a)| *a)
    }

    pub fn discovery_policy(&self) -> DiscoveryPolicy {
        *self.reg.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters and listener counts now.
    pub fn stats(&self) -> TargetStats {
        let c = &self.limits.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TargetStats {
            listeners: self
                .listeners()
                .values()
                .map(|l| ListenerStats {
                    addr: l.addr,
                    open: l.limiter.open(),
                    refused: l.limiter.refused(),
                })
                .collect(),
            handshake_timeouts: r(&c.handshake_timeouts),
            stall_timeouts: r(&c.stall_timeouts),
            kato_expired: r(&c.kato_expired),
            protocol_errors: r(&c.protocol_errors),
            auth_ok: r(&c.auth_ok),
            auth_failed: r(&c.auth_failed),
            mem_waits: r(&c.mem_waits),
        }
    }

    /// Serve `sub` on `addr` (binding a listener there if none exists). Port 0 binds an
    /// ephemeral port; the address actually bound is returned.
    pub fn add(&self, sub: Arc<Subsystem>, addr: SocketAddr) -> Result<SocketAddr, String> {
        if sub.nqn == DISCOVERY_NQN {
            return Err("the discovery NQN is reserved".into());
        }
        if self.reg.subs().contains_key(&sub.nqn) {
            return Err(format!("subsystem {} already exists", sub.nqn));
        }
        let bound = self.ensure_listener(addr)?;
        self.reg.subs().insert(sub.nqn.clone(), (sub, bound));
        self.changed();
        Ok(bound)
    }

    /// Move a subsystem to another listener address. Connected hosts stay connected.
    pub fn set_listen(&self, nqn: &str, addr: SocketAddr) -> Result<SocketAddr, String> {
        if !self.reg.subs().contains_key(nqn) {
            return Err(format!("subsystem {nqn} does not exist"));
        }
        let bound = self.ensure_listener(addr)?;
        if let Some(e) = self.reg.subs().get_mut(nqn) {
            e.1 = bound;
        }
        self.changed();
        self.drop_unused_listeners();
        Ok(bound)
    }

    /// Delete a subsystem: every connection to it closes.
    pub fn remove(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        let (sub, _) = self.reg.subs().remove(nqn)?;
        sub.remove();
        self.changed();
        self.drop_unused_listeners();
        Some(sub)
    }

    fn ensure_listener(&self, addr: SocketAddr) -> Result<SocketAddr, String> {
        let mut ls = self.listeners();
        if addr.port() != 0 && ls.contains_key(&addr) {
            return Ok(addr);
        }
        let l = nvmux_core::unixsock::tcp_listener(addr)
            .map_err(|e| format!("listen on {addr}: {e}"))?;
        let bound = l
            .local_addr()
            .map_err(|e| format!("listen on {addr}: {e}"))?;
        let fd = l.as_raw_fd();
        l.set_nonblocking(true)
            .map_err(|e| format!("listen on {addr}: non-blocking: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let limiter = ConnLimiter::new(self.cfg.max_connections, self.cfg.max_connections_per_host);
        let task = AcceptTask {
            l,
            listen: bound,
            reg: self.reg.clone(),
            placement: self.placement.clone(),
            stop: stop.clone(),
            limiter: limiter.clone(),
            limits: self.limits.clone(),
            refusals: RateLog::default(),
            watching: false,
        };
        let task = nvmux_core::ctlpoll::global()
            .map_err(|e| format!("listen on {addr}: {e}"))?
            .add(Box::new(task));
        {
            let mut ids = self.reg.port_ids.lock().unwrap_or_else(|e| e.into_inner());
            let id = ids.len() as u16 + 1;
            ids.entry(bound).or_insert(id);
        }
        tracing::info!(addr = %bound, "nvme/tcp: listening");
        ls.insert(
            bound,
            Listener {
                addr: bound,
                fd,
                stop,
                task,
                limiter,
            },
        );
        Ok(bound)
    }

    fn drop_unused_listeners(&self) {
        let used: Vec<SocketAddr> = self.reg.subs().values().map(|(_, a)| *a).collect();
        let mut ls = self.listeners();
        let gone: Vec<SocketAddr> = ls.keys().filter(|a| !used.contains(a)).copied().collect();
        for a in gone {
            if let Some(l) = ls.remove(&a) {
                tracing::info!(addr = %l.addr, "nvme/tcp: listener closed");
                l.stop();
            }
        }
    }

    /// Every listener's address and descriptor (valid while the target listens there),
    /// for a takeover.
    pub fn listener_fds(&self) -> Vec<(SocketAddr, std::os::fd::RawFd)> {
        self.listeners().values().map(|l| (l.addr, l.fd)).collect()
    }

    /// [`Target::shutdown`], then wait up to `timeout` for the connections to finish
    /// their commands and go. The listening sockets are not shut down (a takeover's new
    /// process shares them). Returns the connections still alive then.
    pub fn shutdown_and_wait(&self, timeout: Duration) -> usize {
        let conns: Vec<_> = self
            .reg
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.shutdown();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let alive = conns.iter().filter(|w| w.strong_count() > 0).count();
            if alive == 0 || std::time::Instant::now() >= deadline {
                return alive;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stop listening and close every connection.
    pub fn shutdown(&self) {
        let ls = std::mem::take(&mut *self.listeners());
        for (_, l) in ls {
            l.stop();
        }
        let subs = std::mem::take(&mut *self.reg.subs());
        for (_, (s, _)) in subs {
            s.remove();
        }
        let conns = std::mem::take(&mut *self.reg.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for w in conns.iter().filter_map(|w| w.upgrade()) {
            w.stop();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A listener's accept loop as a task on the control threads: it accepts what is
/// pending when its socket is readable, at most [`ACCEPT_BATCH`] per turn.
struct AcceptTask {
    l: TcpListener,
    listen: SocketAddr,
    reg: Arc<Registry>,
    placement: Placement,
    stop: Arc<AtomicBool>,
    limiter: Arc<ConnLimiter>,
    limits: Arc<Limits>,
    refusals: RateLog,
    watching: bool,
}

/// Connections one turn of an accept task takes at most before it lets the other
/// control tasks run (it runs again on the next turn).
const ACCEPT_BATCH: usize = 64;

/// TCP keep-alive: a peer that vanished without closing (power loss, a cut link) is
/// noticed after about 10 + 3 × 5 s of silence, and unacknowledged output gives up after
/// twice the stall timeout (the stall timer, which logs and counts, acts first).
fn keepalive(s: &TcpStream, user_timeout: Duration) -> std::io::Result<()> {
    let fd = s.as_raw_fd();
    let ut = user_timeout.as_millis().min(u32::MAX as u128) as libc::c_int;
    for (level, opt, v) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ut),
    ] {
        let v: libc::c_int = v;
        // SAFETY: setsockopt reads an int from a valid pointer for the given length; the
        // fd is the open socket `s`.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl CtlTask for AcceptTask {
    fn run(&mut self, cx: &mut CtlCx<'_>) -> Next {
        if self.stop.load(Ordering::Acquire) {
            cx.unwatch(self.l.as_raw_fd());
            return Next::Done; // dropping the task closes our copy of the socket
        }
        if self.placement.workers().is_empty() {
            return Next::Keep;
        }
        if !self.watching {
            if let Err(e) = cx.watch(self.l.as_raw_fd()) {
                tracing::error!(addr = %self.listen, "nvme/tcp: cannot watch the listening socket: {e}");
                cx.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
                return Next::Keep;
            }
            self.watching = true;
        }
        for _ in 0..ACCEPT_BATCH {
            match self.l.accept() {
                Ok((s, peer)) => self.admit(s, peer),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, say: try again shortly rather than spin (the
                    // pending connection keeps the socket readable, but no new edge
                    // would come).
                    tracing::warn!(addr = %self.listen, "nvme/tcp: accept: {e}");
                    cx.set_deadline(Some(Instant::now() + Duration::from_millis(10)));
                    return Next::Keep;
                }
            }
        }
        cx.again(); // more may be pending: after the other tasks
        Next::Keep
    }
}

impl AcceptTask {
    /// Admit one accepted connection within the listener's limits and hand it to a
    /// worker.
    fn admit(&mut self, s: TcpStream, peer: SocketAddr) {
        let listen = self.listen;
        let permit = match self.limiter.admit(Some(peer.ip())) {
            Ok(p) => p,
            Err(why) => {
                // Closed at once (dropping the socket); logged a few times per burst.
                drop(s);
                let total = self.limiter.refused();
                self.refusals.warn(|| {
                    format!(
                        "{listen}: connection from {peer} refused: {why} ({total} refused on this listener so far)"
                    )
                });
                return;
            }
        };
        let local = s.local_addr().unwrap_or(listen);
        if let Err(e) = s
            .set_nonblocking(true)
            .and_then(|_| s.set_nodelay(true))
            .and_then(|_| keepalive(&s, self.limits.stall * 2))
        {
            tracing::warn!(%peer, "nvme/tcp: socket setup: {e}");
            return;
        }
        let params = ConnParams {
            resolver: self.reg.clone(),
            at: Where { listen, local },
            peer: peer.to_string(),
            limits: self.limits.clone(),
            permit: Some(permit),
        };
        let conn = match Conn::new(Box::new(s), params) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, "nvme/tcp: connection setup: {e}");
                return;
            }
        };
        {
            let mut cs = self.reg.conns.lock().unwrap_or_else(|e| e.into_inner());
            cs.retain(|w| w.strong_count() > 0);
            cs.push(Arc::downgrade(&conn.waker()));
        }
        tracing::debug!(%peer, addr = %listen, "nvme/tcp: connection accepted");
        if let Some(w) = self.placement.next() {
            w.attach(Box::new(conn));
        }
    }
}
