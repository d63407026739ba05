//! Listeners: one per address, holding named exports.
//!
//! Each listener runs one thread, an epoll loop that accepts connections within the
//! listener's limits (in total and per peer address, [`ConnLimiter`]), negotiates all of
//! them at once on non-blocking sockets ([`Negotiator`], TLS included) under one total
//! deadline each, and hands each negotiated connection to the workers in turn. A client
//! that sends one byte a second holds one entry in that loop until its deadline, not a
//! thread.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmux_core::budget::{ConnBudget, ConnLimiter, ConnPermit, MemBudget, Peer};
use nvmux_core::engine::Placement;
use nvmux_core::eventfd::EventFd;
use nvmux_core::{Error, ErrorKind, Result, Wire};
use openssl::ssl::{HandshakeError, MidHandshakeSslStream, SslStream};

use crate::conn::{
    fixed_memory, max_io_for, ConnCounters, ConnLimits, ConnSetup, NbdConn, TLS_MEMORY,
};
use crate::handshake::{Event, Negotiated, Negotiator, Policy};
use crate::tls::{ssl_io_error, Sock, TlsServer, TlsWire};
use crate::{BurstLog, Export};

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    /// A TCP address: loopback, or any address when the listener has TLS.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "{}", p.display()),
            Listen::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// A listener's limits and TLS.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections held at once, negotiating or not (0: no limit).
    pub max_connections: usize,
    /// Connections one peer holds at once (0: no limit): an IP address on TCP, a user id
    /// on a Unix socket.
    pub max_connections_per_host: usize,
    /// Buffers one connection may hold, negotiation and TLS included (bytes).
    pub memory_per_connection: usize,
    /// The daemon-wide budget the connections' memory also comes from.
    pub budget: Arc<MemBudget>,
    /// From accept to the end of the negotiation, TLS handshake included.
    pub handshake_timeout: Duration,
    /// See [`ConnLimits::stall_timeout`].
    pub stall_timeout: Duration,
    /// TLS, required for every export of the listener (FORCEDTLS).
    pub tls: Option<Arc<TlsServer>>,
}

impl Default for ServerConfig {
    /// The defaults of `[nbd]` in the daemon's configuration, with a budget of its own.
    fn default() -> Self {
        ServerConfig {
            max_connections: 1024,
            max_connections_per_host: 64,
            memory_per_connection: 64 << 20,
            budget: MemBudget::new(1 << 30),
            handshake_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// A listener's counters, for the API and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections held now (negotiating and transmitting).
    pub connections: u64,
    /// Of those, still negotiating.
    pub negotiating: u64,
    /// Connections closed at accept: beyond `max_connections` or
    /// `max_connections_per_host` (per IP address, or per user id on a Unix socket).
    pub refused: u64,
    /// Negotiations cut at `handshake_timeout`.
    pub handshake_timeouts: u64,
    /// Negotiations that broke the protocol.
    pub negotiation_errors: u64,
    /// TLS handshakes that failed (a wrong key, no client certificate, no TLS at all).
    pub tls_failures: u64,
    /// Connections ended by `stall_timeout`.
    pub stalls: u64,
    /// Times a connection waited for memory.
    pub memory_waits: u64,
}

type Exports = RwLock<BTreeMap<String, Arc<Export>>>;

/// What the listener thread and the server handle share.
struct Shared {
    exports: Exports,
    limiter: Arc<ConnLimiter>,
    counters: Arc<ConnCounters>,
    negotiating: AtomicU64,
    handshake_timeouts: AtomicU64,
    negotiation_errors: AtomicU64,
    tls_failures: AtomicU64,
    refuse_log: BurstLog,
    timeout_log: BurstLog,
    fail_log: BurstLog,
}

enum ListenSock {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl ListenSock {
    fn fd(&self) -> RawFd {
        match self {
            ListenSock::Unix(l) => l.as_raw_fd(),
            ListenSock::Tcp(l) => l.as_raw_fd(),
        }
    }
}

pub struct NbdServer {
    listen: Listen,
    shared: Arc<Shared>,
    placement: Placement,
    /// Written to stop the listener thread.
    stop_fd: EventFd,
    thread: Option<JoinHandle<()>>,
    tls: Option<Arc<TlsServer>>,
    max_io: u32,
    /// The listening socket (owned by the listener thread), for a takeover.
    listen_fd: RawFd,
}

fn read_exports(e: &Exports) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
    e.read().unwrap_or_else(|p| p.into_inner())
}

impl NbdServer {
    /// Bind `listen` and serve connections on the workers of `placement`, in turn. A Unix
    /// socket gets `perms` (owner and mode) before it appears at its path.
    pub fn start(
        listen: Listen,
        perms: &nvmux_core::unixsock::SocketPerms,
        placement: Placement,
        cfg: ServerConfig,
    ) -> Result<NbdServer> {
        let tls = cfg.tls.is_some();
        let Some(max_io) = max_io_for(cfg.memory_per_connection, tls) else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "NBD on {listen}: memory_per_connection = {} leaves no room for a request beside the connection's buffers ({} bytes)",
                    cfg.memory_per_connection,
                    fixed_memory(tls)
                ),
            ));
        };
        let sock = match &listen {
            Listen::Unix(p) => ListenSock::Unix(nvmux_core::unixsock::bind(p, perms)?),
            Listen::Tcp(a) => {
                if !a.ip().is_loopback() && !tls {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("NBD on {a}: without TLS, NBD gives anyone who reaches the port the whole disk, so nvmux listens on loopback addresses (127.0.0.1, ::1) and Unix sockets only; give the export tls settings (a PSK file or an X.509 directory) to listen on {a}"),
                    ));
                }
                ListenSock::Tcp(
                    nvmux_core::unixsock::tcp_listener(*a)
                        .map_err(|e| Error::io(format!("NBD listener {a}"), e))?,
                )
            }
        };
        let nb = match &sock {
            ListenSock::Unix(l) => l.set_nonblocking(true),
            ListenSock::Tcp(l) => l.set_nonblocking(true),
        };
        nb.map_err(|e| Error::io(format!("NBD listener {listen}"), e))?;
        let listen = match (&sock, listen) {
            (ListenSock::Tcp(l), Listen::Tcp(_)) => Listen::Tcp(
                l.local_addr()
                    .map_err(|e| Error::io("NBD listener address", e))?,
            ),
            (_, l) => l,
        };
        let shared = Arc::new(Shared {
            exports: Default::default(),
            limiter: ConnLimiter::new(cfg.max_connections, cfg.max_connections_per_host),
            counters: Default::default(),
            negotiating: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            negotiation_errors: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            refuse_log: BurstLog::default(),
            timeout_log: BurstLog::default(),
            fail_log: BurstLog::default(),
        });
        let stop_fd = EventFd::new().map_err(|e| Error::io("NBD listener eventfd", e))?;
        let stop_raw = stop_fd.as_raw_fd();
        let listen_fd = match &sock {
            ListenSock::Unix(l) => l.as_raw_fd(),
            ListenSock::Tcp(l) => l.as_raw_fd(),
        };
        let name = match &listen {
            Listen::Tcp(a) => format!("nbd-listen-{}", a.port()),
            Listen::Unix(_) => "nbd-listen".to_string(),
        };
        let tls_server = cfg.tls.clone();
        let ctx = Loop {
            sock,
            sh: shared.clone(),
            placement: placement.clone(),
            policy: Policy { tls, max_io },
            limits: ConnLimits {
                max_io,
                stall_timeout: cfg.stall_timeout,
            },
            cfg,
            listen: listen.to_string(),
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || ctx.run(stop_raw))
            .map_err(|e| Error::io("spawn NBD listener", e))?;
        Ok(NbdServer {
            listen,
            shared,
            placement,
            stop_fd,
            thread: Some(thread),
            tls: tls_server,
            max_io,
            listen_fd,
        })
    }

    /// The listening socket's descriptor (valid while this server lives), for a takeover.
    pub fn listen_fd(&self) -> RawFd {
        self.listen_fd
    }

    /// A takeover committed: stop accepting (the listening socket, shared with the new
    /// process, is neither shut down nor unlinked), stop every export, and wait up to
    /// `timeout` for the connections to finish their commands and close. Returns the
    /// connections still open then.
    pub fn release(mut self, timeout: Duration) -> u64 {
        self.stop_fd.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let names: Vec<String> = read_exports(&self.shared.exports).keys().cloned().collect();
        for n in names {
            self.remove(&n);
        }
        let deadline = Instant::now() + timeout;
        while self.shared.limiter.open() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.shared.limiter.open() as u64
    }

    /// Where it listens (the bound port for a TCP address given with port 0).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// The TLS it requires, if any.
    pub fn tls(&self) -> Option<&Arc<TlsServer>> {
        self.tls.as_ref()
    }

    /// The largest read or write its connections admit (advertised as the maximum block
    /// size).
    pub fn max_io(&self) -> u32 {
        self.max_io
    }

    pub fn stats(&self) -> ListenerStats {
        let s = &self.shared;
        ListenerStats {
            connections: s.limiter.open() as u64,
            negotiating: s.negotiating.load(Ordering::Relaxed),
            refused: s.limiter.refused(),
            handshake_timeouts: s.handshake_timeouts.load(Ordering::Relaxed),
            negotiation_errors: s.negotiation_errors.load(Ordering::Relaxed),
            tls_failures: s.tls_failures.load(Ordering::Relaxed),
            stalls: s.counters.stalls.load(Ordering::Relaxed),
            memory_waits: s.counters.memory_waits.load(Ordering::Relaxed),
        }
    }

    pub fn add(&self, e: Arc<Export>) -> Result<()> {
        let mut g = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if g.contains_key(&e.name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "NBD export name {:?} is already served on {}",
                    e.name, self.listen
                ),
            ));
        }
        g.insert(e.name.clone(), e);
        Ok(())
    }

    /// Stop serving an export: its connections close once their commands complete.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let e = self
            .shared
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        e.stop.store(true, Ordering::Release);
        for w in self.placement.workers() {
            w.wake();
        }
        Some(e)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        read_exports(&self.shared.exports).get(name).cloned()
    }

    pub fn is_empty(&self) -> bool {
        read_exports(&self.shared.exports).is_empty()
    }

    /// The export names served here.
    pub fn names(&self) -> Vec<String> {
        read_exports(&self.shared.exports).keys().cloned().collect()
    }

    /// Stop listening and close every connection.
    pub fn stop(mut self) {
        self.stop_fd.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let names: Vec<String> = read_exports(&self.shared.exports).keys().cloned().collect();
        for n in names {
            self.remove(&n);
        }
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Socket send buffer asked for (the kernel caps it at `net.core.wmem_max`): a 1 MiB read
/// reply then goes out in one or two sends instead of five or six.
const SNDBUF: libc::c_int = 4 << 20;
/// TCP keepalive: probes after this long without traffic, this often, this many times; a
/// peer that vanished (a half-open connection) is found within about a minute.
const KEEPIDLE: libc::c_int = 30;
const KEEPINTVL: libc::c_int = 10;
const KEEPCNT: libc::c_int = 3;
/// A negotiation waiting for memory tries again this often.
const MEM_RETRY: Duration = Duration::from_millis(10);
/// Accepting pauses this long after accept fails for want of resources (file
/// descriptors), rather than spinning on a listener that stays readable.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// A negotiation keeps a receive buffer of at most this size between options.
const NEG_BUF_KEEP: usize = 4096;

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from &v, a live local; fd is a
    // socket the caller owns. Failure only leaves the default.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32) {
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: ep is our epoll descriptor; ev is a valid epoll_event for the call.
    let r = unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
    // A descriptor closed already (a failed TLS handshake consumes its socket) has left
    // the set by itself.
    if r != 0 && op != libc::EPOLL_CTL_DEL {
        tracing::warn!(fd, op, "nbd: epoll_ctl: {}", io::Error::last_os_error());
    }
}

const CONN_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// The stream of a negotiating connection.
enum Io {
    Plain(Sock),
    Handshaking(MidHandshakeSslStream<Sock>),
    Tls(SslStream<Sock>),
    Gone,
}

impl Io {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(b),
            Io::Tls(s) => match s.ssl_read(b) {
                Ok(n) => Ok(n),
                Err(e) => match ssl_io_error(e) {
                    e if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                    e => Err(e),
                },
            },
            _ => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write(b),
            Io::Tls(s) => s.ssl_write(b).map_err(ssl_io_error),
            _ => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// What comes after the output of the last option has gone out.
enum Next {
    StartTls,
    Done(Negotiated),
    End,
}

/// Why a negotiation ended without a connection.
enum Close {
    /// The client hung up or aborted: nothing to report.
    Client,
    Protocol(String),
    Tls(String),
}

enum Outcome {
    Wait,
    Done(Negotiated),
    Closed(Close),
}

/// A connection being negotiated.
struct Pending {
    io: Io,
    neg: Negotiator,
    buf: Vec<u8>,
    have: usize,
    sent: usize,
    next: Option<Next>,
    deadline: Instant,
    budget: ConnBudget,
    permit: ConnPermit,
    peer: String,
    mem_wait: bool,
}

impl Pending {
    fn drive(&mut self, sh: &Shared, tls: Option<&TlsServer>) -> Outcome {
        let find = |n: &str| read_exports(&sh.exports).get(n).cloned();
        let list = || {
            read_exports(&sh.exports)
                .values()
                .cloned()
                .collect::<Vec<_>>()
        };
        self.mem_wait = false;
        loop {
            while self.sent < self.neg.output().len() {
                match self.io.write(&self.neg.output()[self.sent..]) {
                    Ok(0) => return Outcome::Closed(Close::Client),
                    Ok(k) => self.sent += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Wait,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Outcome::Closed(Close::Client),
                }
            }
            self.neg.clear_output();
            self.sent = 0;
            match self.next.take() {
                Some(Next::Done(n)) => return Outcome::Done(n),
                Some(Next::End) => return Outcome::Closed(Close::Client),
                Some(Next::StartTls) => {
                    let Some(tls) = tls else {
                        return Outcome::Closed(Close::Protocol("STARTTLS without TLS".into()));
                    };
                    if !self.budget.try_take(TLS_MEMORY) {
                        self.next = Some(Next::StartTls);
                        self.mem_wait = true;
                        return Outcome::Wait;
                    }
                    let Io::Plain(sock) = std::mem::replace(&mut self.io, Io::Gone) else {
                        return Outcome::Closed(Close::Protocol("STARTTLS twice".into()));
                    };
                    let ssl = match tls.session() {
                        Ok(s) => s,
                        Err(e) => return Outcome::Closed(Close::Tls(e.to_string())),
                    };
                    match self.handshake_step(ssl.accept(sock)) {
                        Some(o) => return o,
                        None => continue,
                    }
                }
                None => {}
            }
            if matches!(self.io, Io::Handshaking(_)) {
                let Io::Handshaking(m) = std::mem::replace(&mut self.io, Io::Gone) else {
                    continue;
                };
                match self.handshake_step(m.handshake()) {
                    Some(o) => return o,
                    None => continue,
                }
            }
            let need = self.neg.need();
            if self.buf.len() < need {
                if !self.budget.try_take(need - self.buf.len()) {
                    self.mem_wait = true;
                    return Outcome::Wait;
                }
                let old = self.buf.len();
                self.buf = vec![0u8; need];
                self.budget.give(old);
            }
            while self.have < need {
                match self.io.read(&mut self.buf[self.have..need]) {
                    Ok(0) => return Outcome::Closed(Close::Client),
                    Ok(k) => self.have += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Wait,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Outcome::Closed(Close::Client),
                }
            }
            self.have = 0;
            let ev = self.neg.input(&self.buf[..need], &find, &list);
            if self.buf.len() > NEG_BUF_KEEP {
                self.budget.give(self.buf.len());
                self.buf = Vec::new();
            }
            match ev {
                Err(e) => return Outcome::Closed(Close::Protocol(e.to_string())),
                Ok(Event::Continue) => {}
                Ok(Event::StartTls) => self.next = Some(Next::StartTls),
                Ok(Event::Done(n)) => self.next = Some(Next::Done(n)),
                Ok(Event::Ended) => self.next = Some(Next::End),
            }
        }
    }

    /// One step of the TLS handshake: `None` when it completed (go on inside TLS).
    fn handshake_step(
        &mut self,
        r: std::result::Result<SslStream<Sock>, HandshakeError<Sock>>,
    ) -> Option<Outcome> {
        match r {
            Ok(s) => {
                self.io = Io::Tls(s);
                self.neg.tls_started();
                None
            }
            Err(HandshakeError::WouldBlock(m)) => {
                self.io = Io::Handshaking(m);
                Some(Outcome::Wait)
            }
            Err(HandshakeError::Failure(m)) => {
                let why = match m.ssl().verify_result() {
                    openssl::x509::X509VerifyResult::OK => m.error().to_string(),
                    v => format!("{} (certificate: {})", m.error(), v.error_string()),
                };
                Some(Outcome::Closed(Close::Tls(why)))
            }
            Err(HandshakeError::SetupFailure(e)) => {
                Some(Outcome::Closed(Close::Tls(e.to_string())))
            }
        }
    }
}

/// The listener thread's state.
struct Loop {
    sock: ListenSock,
    sh: Arc<Shared>,
    placement: Placement,
    policy: Policy,
    limits: ConnLimits,
    cfg: ServerConfig,
    listen: String,
}

impl Loop {
    fn run(self, stop_fd: RawFd) {
        // SAFETY: epoll_create1 has no preconditions; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            tracing::error!(listen = %self.listen, "nbd: epoll_create1: {}", io::Error::last_os_error());
            return;
        }
        // SAFETY: ep is a fresh descriptor we own.
        let ep_owned = unsafe { OwnedFd::from_raw_fd(ep) };
        let lfd = self.sock.fd();
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32);
        epoll_ctl(ep, libc::EPOLL_CTL_ADD, stop_fd, libc::EPOLLIN as u32);
        let mut pending: HashMap<RawFd, Pending> = HashMap::new();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut accept_paused: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if accept_paused.is_some_and(|t| now >= t) {
                accept_paused = None;
                epoll_ctl(ep, libc::EPOLL_CTL_ADD, lfd, libc::EPOLLIN as u32);
            }
            let mem_waiting = pending.values().any(|p| p.mem_wait);
            let deadline = pending
                .values()
                .map(|p| p.deadline)
                .chain(accept_paused)
                .chain(mem_waiting.then(|| now + MEM_RETRY))
                .min();
            let timeout = deadline.map_or(-1, |d| {
                let us = d.saturating_duration_since(now).as_micros();
                us.div_ceil(1000).min(i32::MAX as u128) as i32
            });
            // SAFETY: events is a valid buffer of events.len() entries.
            let r =
                unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout) };
            let mut ready: Vec<RawFd> = Vec::new();
            let mut accept_now = false;
            for ev in events.iter().take(r.max(0) as usize) {
                let fd = ev.u64 as RawFd;
                if fd == stop_fd {
                    drop(pending);
                    drop(ep_owned);
                    return;
                } else if fd == lfd {
                    accept_now = true;
                } else {
                    ready.push(fd);
                }
            }
            if mem_waiting {
                ready.extend(
                    pending
                        .iter()
                        .filter(|(_, p)| p.mem_wait)
                        .map(|(fd, _)| *fd),
                );
            }
            if accept_now {
                let (accepted, failed) = self.accept(ep, &mut pending);
                ready.extend(accepted);
                if let Some(e) = failed {
                    tracing::warn!(listen = %self.listen, "nbd: accept failed: {e}; pausing for {} ms", ACCEPT_PAUSE.as_millis());
                    epoll_ctl(ep, libc::EPOLL_CTL_DEL, lfd, 0);
                    accept_paused = Some(Instant::now() + ACCEPT_PAUSE);
                }
            }
            for fd in ready {
                let Some(p) = pending.get_mut(&fd) else {
                    continue;
                };
                match p.drive(&self.sh, self.cfg.tls.as_deref()) {
                    Outcome::Wait => {}
                    Outcome::Done(n) => {
                        if let Some(p) = pending.remove(&fd) {
                            epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0);
                            self.sh.negotiating.fetch_sub(1, Ordering::Relaxed);
                            self.hand_off(p, n);
                        }
                    }
                    Outcome::Closed(why) => {
                        if let Some(p) = pending.remove(&fd) {
                            epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0);
                            self.sh.negotiating.fetch_sub(1, Ordering::Relaxed);
                            self.closed(&p, why);
                        }
                    }
                }
            }
            let now = Instant::now();
            let expired: Vec<RawFd> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(fd, _)| *fd)
                .collect();
            for fd in expired {
                if let Some(p) = pending.remove(&fd) {
                    epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0);
                    self.sh.negotiating.fetch_sub(1, Ordering::Relaxed);
                    self.sh.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    if let Some(more) = self.sh.timeout_log.hit() {
                        tracing::info!(listen = %self.listen, peer = %p.peer,
                            "nbd: negotiation not finished within {} ms (handshake_timeout_ms); connection closed{}",
                            self.cfg.handshake_timeout.as_millis(), BurstLog::more(more));
                    }
                }
            }
        }
    }

    /// Accept every waiting connection; returns the descriptors now negotiating, and the
    /// error that stopped accepting if accepting must pause (out of descriptors or memory).
    fn accept(
        &self,
        ep: RawFd,
        pending: &mut HashMap<RawFd, Pending>,
    ) -> (Vec<RawFd>, Option<io::Error>) {
        let mut out = Vec::new();
        let pause = |e: io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            )
            .then_some(e)
        };
        let failed = loop {
            let (sock, ip, peer) = match &self.sock {
                ListenSock::Unix(l) => match l.accept() {
                    Ok((s, _)) => {
                        // Local users are told apart by their uid.
                        let cred = nvmux_core::unixsock::peer_cred(s.as_raw_fd()).ok();
                        let peer = cred.map_or("unix".to_string(), |c| {
                            format!("unix uid {} pid {}", c.uid, c.pid)
                        });
                        (Sock::Unix(s), cred.map(|c| Peer::Uid(c.uid)), peer)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break pause(e),
                },
                ListenSock::Tcp(l) => match l.accept() {
                    Ok((s, a)) => {
                        let _ = s.set_nodelay(true);
                        let fd = s.as_raw_fd();
                        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
                        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPIDLE);
                        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPINTVL);
                        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPCNT);
                        (Sock::Tcp(s), Some(Peer::Ip(a.ip())), a.to_string())
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break pause(e),
                },
            };
            let permit = match self.sh.limiter.admit_peer(ip) {
                Ok(p) => p,
                Err(why) => {
                    if let Some(more) = self.sh.refuse_log.hit() {
                        tracing::warn!(listen = %self.listen, peer = %peer,
                            "nbd: connection refused: {why} (max_connections / max_connections_per_host){}",
                            BurstLog::more(more));
                    }
                    continue; // dropping the socket closes it
                }
            };
            let ok = match &sock {
                Sock::Tcp(s) => s.set_nonblocking(true),
                Sock::Unix(s) => s.set_nonblocking(true),
            };
            if ok.is_err() {
                continue;
            }
            let fd = sock.as_raw_fd();
            setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SNDBUF);
            epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, CONN_EVENTS);
            self.sh.negotiating.fetch_add(1, Ordering::Relaxed);
            pending.insert(
                fd,
                Pending {
                    io: Io::Plain(sock),
                    neg: Negotiator::new(self.policy),
                    buf: Vec::new(),
                    have: 0,
                    sent: 0,
                    next: None,
                    deadline: Instant::now() + self.cfg.handshake_timeout,
                    budget: ConnBudget::new(
                        self.cfg.budget.clone(),
                        self.cfg.memory_per_connection,
                    ),
                    permit,
                    peer,
                    mem_wait: false,
                },
            );
            out.push(fd);
        };
        (out, failed)
    }

    fn closed(&self, p: &Pending, why: Close) {
        match why {
            Close::Client => {
                tracing::debug!(listen = %self.listen, peer = %p.peer, "nbd: client ended the negotiation")
            }
            Close::Protocol(e) => {
                self.sh.negotiation_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = self.sh.fail_log.hit() {
                    tracing::info!(listen = %self.listen, peer = %p.peer, "nbd: negotiation failed: {e}{}", BurstLog::more(more));
                }
            }
            Close::Tls(e) => {
                self.sh.tls_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(more) = self.sh.fail_log.hit() {
                    tracing::info!(listen = %self.listen, peer = %p.peer, "nbd: TLS handshake failed: {e}{}", BurstLog::more(more));
                }
            }
        }
    }

    fn hand_off(&self, p: Pending, n: Negotiated) {
        let tls = matches!(p.io, Io::Tls(_));
        let identity = match (&p.io, &self.cfg.tls) {
            (Io::Tls(s), Some(t)) => t.peer_of(s.ssl()),
            _ => String::new(),
        };
        let wire: Box<dyn Wire> = match p.io {
            Io::Plain(s) => Box::new(s),
            Io::Tls(s) => Box::new(TlsWire::new(s)),
            Io::Handshaking(_) | Io::Gone => return,
        };
        let name = n.export.name.clone();
        let peer = p.peer.clone();
        let mut budget = p.budget;
        budget.give(p.buf.len());
        let setup = ConnSetup {
            budget,
            permit: Some(p.permit),
            limits: self.limits,
            counters: self.sh.counters.clone(),
            tls,
            peer: p.peer,
        };
        match NbdConn::new(wire, n.export, n.structured, setup) {
            Ok(c) => {
                tracing::info!(export = %name, peer = %peer, structured = n.structured, tls = %identity,
                    "nbd: client connected");
                if let Some(w) = self.placement.next() {
                    w.attach(Box::new(c));
                }
            }
            Err(e) => tracing::error!(export = %name, "nbd: cannot open the disk's queue: {e}"),
        }
    }
}
