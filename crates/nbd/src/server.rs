//! Listeners: one per address, holding named exports, handing negotiated connections to
//! the workers in turn.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use nvmux_core::worker::WorkerHandle;
use nvmux_core::{Error, ErrorKind, Result, Wire};

use crate::conn::NbdConn;
use crate::handshake::negotiate;
use crate::Export;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    /// A loopback address: NBD has no TLS here, so nothing else is accepted.
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

/// Handshakes running at once; more connections are closed at once.
const MAX_HANDSHAKES: usize = 64;
/// A client has this long to finish negotiating.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type Exports = Arc<RwLock<BTreeMap<String, Arc<Export>>>>;

/// An accepted connection's negotiation, to run on its own thread.
type Negotiation = Box<dyn FnOnce(Exports, WorkerHandle) + Send>;

enum Sock {
    Unix(UnixListener),
    Tcp(TcpListener),
}

pub struct NbdServer {
    listen: Listen,
    exports: Exports,
    workers: Vec<WorkerHandle>,
    stop: Arc<AtomicBool>,
    fd: RawFd,
    thread: Option<JoinHandle<()>>,
}

fn read_exports(e: &Exports) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
    e.read().unwrap_or_else(|p| p.into_inner())
}

/// The negotiation and hand-off of one connection, on its own thread.
fn serve_one<S: io::Read + io::Write + Wire + 'static>(
    mut s: S,
    exports: Exports,
    worker: WorkerHandle,
    peer: String,
) {
    let find = |n: &str| read_exports(&exports).get(n).cloned();
    let list = || read_exports(&exports).values().cloned().collect::<Vec<_>>();
    match negotiate(&mut s, &find, &list) {
        Ok(Some(n)) => {
            if let Some(fd) = s.fd() {
                // SAFETY: fcntl on the connection's own descriptor.
                unsafe {
                    let fl = libc::fcntl(fd, libc::F_GETFL);
                    libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
                }
            }
            let name = n.export.name.clone();
            match NbdConn::new(Box::new(s), n.export, n.structured) {
                Ok(c) => {
                    tracing::info!(export = %name, peer = %peer, structured = n.structured, "nbd: client connected");
                    worker.attach(Box::new(c));
                }
                Err(e) => tracing::error!(export = %name, "nbd: cannot open the disk's queue: {e}"),
            }
        }
        Ok(None) => tracing::debug!(peer = %peer, "nbd: client ended the negotiation"),
        Err(e) => tracing::info!(peer = %peer, "nbd: negotiation failed: {e}"),
    }
}

impl NbdServer {
    /// Bind `listen` and serve connections on the `workers` in turn. A Unix socket gets
    /// `perms` (owner and mode) before it appears at its path.
    pub fn start(
        listen: Listen,
        perms: &nvmux_core::unixsock::SocketPerms,
        workers: Vec<WorkerHandle>,
    ) -> Result<NbdServer> {
        let sock = match &listen {
            Listen::Unix(p) => Sock::Unix(nvmux_core::unixsock::bind(p, perms)?),
            Listen::Tcp(a) => {
                if !a.ip().is_loopback() {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("NBD on {a}: nvmux has no TLS for NBD, so it listens on loopback addresses (127.0.0.1, ::1) or Unix sockets only"),
                    ));
                }
                Sock::Tcp(
                    TcpListener::bind(a).map_err(|e| Error::io(format!("NBD listener {a}"), e))?,
                )
            }
        };
        let listen = match (&sock, listen) {
            (Sock::Tcp(l), Listen::Tcp(_)) => Listen::Tcp(
                l.local_addr()
                    .map_err(|e| Error::io("NBD listener address", e))?,
            ),
            (_, l) => l,
        };
        let fd = match &sock {
            Sock::Unix(l) => l.as_raw_fd(),
            Sock::Tcp(l) => l.as_raw_fd(),
        };
        let exports: Exports = Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ex, st, ws) = (exports.clone(), stop.clone(), workers.clone());
        let name = match &listen {
            Listen::Tcp(a) => format!("nbd-listen-{}", a.port()),
            Listen::Unix(_) => "nbd-listen".to_string(),
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || accept_loop(sock, ex, st, ws))
            .map_err(|e| Error::io("spawn NBD listener", e))?;
        Ok(NbdServer {
            listen,
            exports,
            workers,
            stop,
            fd,
            thread: Some(thread),
        })
    }

    /// Where it listens (the bound port for a TCP address given with port 0).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    pub fn add(&self, e: Arc<Export>) -> Result<()> {
        let mut g = self.exports.write().unwrap_or_else(|p| p.into_inner());
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
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)?;
        e.stop.store(true, Ordering::Release);
        for w in &self.workers {
            w.wake();
        }
        Some(e)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        read_exports(&self.exports).get(name).cloned()
    }

    pub fn is_empty(&self) -> bool {
        read_exports(&self.exports).is_empty()
    }

    /// Stop listening and close every connection.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: shutting down our own listening socket wakes the blocking accept.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let names: Vec<String> = read_exports(&self.exports).keys().cloned().collect();
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

fn sndbuf(fd: RawFd) {
    let v = SNDBUF;
    // SAFETY: setsockopt reads size_of::<c_int>() bytes from &v, a live local; fd is the
    // socket just accepted, owned by the caller. Failure only leaves the default size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn accept_loop(sock: Sock, exports: Exports, stop: Arc<AtomicBool>, workers: Vec<WorkerHandle>) {
    let next = AtomicUsize::new(0);
    let busy = Arc::new(AtomicUsize::new(0));
    loop {
        let conn: io::Result<(Negotiation, String)> = match &sock {
            Sock::Unix(l) => l.accept().map(|(s, _)| {
                sndbuf(s.as_raw_fd());
                let f: Negotiation = Box::new(move |e, w| {
                    let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
                    let _ = s.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
                    serve_one::<UnixStream>(s, e, w, "unix".into())
                });
                (f, "unix".to_string())
            }),
            Sock::Tcp(l) => l.accept().map(|(s, a)| {
                sndbuf(s.as_raw_fd());
                let f: Negotiation = Box::new(move |e, w| {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
                    let _ = s.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
                    serve_one::<TcpStream>(s, e, w, a.to_string())
                });
                (f, a.to_string())
            }),
        };
        if stop.load(Ordering::Acquire) {
            break;
        }
        let (f, peer) = match conn {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("nbd: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.load(Ordering::Acquire) >= MAX_HANDSHAKES {
            tracing::warn!(peer = %peer, "nbd: too many negotiations at once; connection closed");
            continue;
        }
        let w = workers[next.fetch_add(1, Ordering::Relaxed) % workers.len().max(1)].clone();
        let (e, b) = (exports.clone(), busy.clone());
        b.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("nvmux-nbd-hs".into())
            .spawn(move || {
                f(e, w);
                b.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            busy.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("nbd: cannot start a negotiation thread: {e}");
        }
    }
}
