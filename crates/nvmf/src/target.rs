//! The NVMe/TCP target: subsystems by NQN, one listener thread per address, and the
//! discovery controller on every listener.
//!
//! A listener thread only accepts. Each accepted connection becomes a [`Conn`] on a
//! worker (round robin), so the queues of one controller spread over the workers.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use nvmux_core::worker::WorkerHandle;

use crate::conn::{Conn, ConnParams};
use crate::ctrl::{DiscoveryEntry, Resolver, Subsystem, Waker, Where, DISCOVERY_NQN};

struct Registry {
    subs: Mutex<BTreeMap<String, (Arc<Subsystem>, SocketAddr)>>,
    discovery: Arc<Subsystem>,
    genctr: AtomicU64,
    port_ids: Mutex<BTreeMap<SocketAddr, u16>>,
    /// Every connection, to close them at shutdown.
    conns: Mutex<Vec<Weak<Waker>>>,
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
        tracing::warn!("nvme/tcp: {why}");
    }
}

struct Listener {
    addr: SocketAddr,
    stop: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn stop(mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The NVMe/TCP target of one daemon.
pub struct Target {
    reg: Arc<Registry>,
    listeners: Mutex<BTreeMap<SocketAddr, Listener>>,
    workers: Vec<WorkerHandle>,
    next_worker: Arc<AtomicUsize>,
}

impl Target {
    pub fn new(workers: Vec<WorkerHandle>) -> Target {
        Target {
            reg: Arc::new(Registry {
                subs: Mutex::new(BTreeMap::new()),
                discovery: Subsystem::new(DISCOVERY_NQN, "discovery"),
                genctr: AtomicU64::new(1),
                port_ids: Mutex::new(BTreeMap::new()),
                conns: Mutex::new(Vec::new()),
            }),
            listeners: Mutex::new(BTreeMap::new()),
            workers,
            next_worker: Arc::new(AtomicUsize::new(0)),
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
        let l = TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
        let bound = l
            .local_addr()
            .map_err(|e| format!("listen on {addr}: {e}"))?;
        let stop = Waker::new().map_err(|e| format!("eventfd: {e}"))?;
        let (reg, workers, next, st) = (
            self.reg.clone(),
            self.workers.clone(),
            self.next_worker.clone(),
            stop.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("nvmf-listen-{}", bound.port()))
            .spawn(move || accept_loop(l, bound, reg, workers, next, st))
            .map_err(|e| format!("listener thread: {e}"))?;
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
                stop,
                thread: Some(thread),
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

fn accept_loop(
    l: TcpListener,
    listen: SocketAddr,
    reg: Arc<Registry>,
    workers: Vec<WorkerHandle>,
    next: Arc<AtomicUsize>,
    stop: Arc<Waker>,
) {
    if workers.is_empty() {
        return;
    }
    loop {
        let mut fds = [
            libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call's duration.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if stop.stop.load(Ordering::Acquire) {
            return;
        }
        if r <= 0 || fds[0].revents == 0 {
            continue;
        }
        let (s, peer) = match l.accept() {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(addr = %listen, "nvme/tcp: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let local = s.local_addr().unwrap_or(listen);
        if let Err(e) = s.set_nonblocking(true).and_then(|_| s.set_nodelay(true)) {
            tracing::warn!(%peer, "nvme/tcp: socket setup: {e}");
            continue;
        }
        let params = ConnParams {
            resolver: reg.clone(),
            at: Where { listen, local },
            peer: peer.to_string(),
        };
        let conn = match Conn::new(Box::new(s), params) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, "nvme/tcp: connection setup: {e}");
                continue;
            }
        };
        {
            let mut cs = reg.conns.lock().unwrap_or_else(|e| e.into_inner());
            cs.retain(|w| w.strong_count() > 0);
            cs.push(Arc::downgrade(&conn.waker()));
        }
        tracing::debug!(%peer, addr = %listen, "nvme/tcp: connection accepted");
        let w = next.fetch_add(1, Ordering::Relaxed) % workers.len();
        workers[w].attach(Box::new(conn));
    }
}
