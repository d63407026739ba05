//! The HTTP/JSON API on a Unix socket. Routes are listed in docs/api.md.
//!
//! Errors are `{"error": "<what failed, on which object, what to do>", "kind": "<kind>"}`
//! with a matching HTTP status (400 bad input, 403 refused peer, 404 not found, 409
//! conflict, 500 I/O).
//!
//! **Who may use it.** The socket is bound with its owner, group and mode already set
//! (`[api]` in the configuration; default 0600, 0660 with a group), so the file mode
//! keeps most users out. Each accepted connection's peer credentials (`SO_PEERCRED`,
//! and `SO_PEERGROUPS` for supplementary groups) are then checked **before any byte of
//! the request is read**: root, the daemon's own uid, `allow_uids`, and members of
//! `allow_gids` or of `group` are served; anyone else gets a 403 and the connection
//! closes. (This is why the API reads HTTP itself, in `http.rs`: an HTTP library that
//! accepts connections on its own threads never shows the accepted socket.)
//!
//! ```text
//!  accept thread ── accept ─► SO_PEERCRED (+ SO_PEERGROUPS) ─┬─ allowed ─► thread per
//!                                                            │   connection (≤ 32):
//!                                                            │   read request, handle,
//!                                                            │   reply, close
//!                                                            └─ refused / too many ─►
//!   rejecter thread (queue of 64; beyond it, closed unanswered): 403 or 503, drain ≤ 64 KiB
//!   for ≤ 200 ms without parsing (so the client reads the reply, not a reset), close
//! ```

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvmux_core::eventfd::EventFd;
use nvmux_core::unixsock::{self, PeerCred, SocketPerms};
use nvmux_core::{Error, ErrorKind, Result};
use serde::Serialize;

use crate::http::{self, Request, Response};
use crate::pools::{PoolCreate, Resize, SnapshotCreate};
use crate::{Daemon, DiskCreate, ExportCreate};

/// Connections served at once; more get 503.
const MAX_CONNS: usize = 32;
/// Refused and surplus connections waiting for their reply; more are closed unanswered.
const REJECT_QUEUE: usize = 64;
/// How long a refused connection is drained (never parsed) before it is closed.
const REJECT_DRAIN: Duration = Duration::from_millis(200);
/// Bytes drained from a refused connection at most.
const REJECT_DRAIN_BYTES: usize = 64 << 10;
/// Refusals logged per minute; the rest are counted and summed up in one line.
const REFUSAL_LOG_BURST: u32 = 20;

/// Who may use the API socket: its owner, group and mode, and the allow-list checked on
/// every connection (besides root and the daemon's own uid, always allowed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiAccess {
    pub perms: SocketPerms,
    pub allow_uids: Vec<u32>,
    /// Includes the socket's group, if one is set.
    pub allow_gids: Vec<u32>,
}

impl ApiAccess {
    /// Whether the peer of `fd`, whose credentials are `cred`, may use the API.
    fn allows(&self, cred: &PeerCred, fd: RawFd, daemon_uid: u32) -> bool {
        if cred.uid == 0
            || cred.uid == daemon_uid
            || self.allow_uids.contains(&cred.uid)
            || self.allow_gids.contains(&cred.gid)
        {
            return true;
        }
        if self.allow_gids.is_empty() {
            return false;
        }
        match unixsock::peer_groups(fd) {
            Ok(groups) => groups.iter().any(|g| self.allow_gids.contains(g)),
            Err(e) => {
                tracing::warn!(
                    pid = cred.pid,
                    uid = cred.uid,
                    "API: cannot read the peer's supplementary groups (SO_PEERGROUPS): {e}"
                );
                false
            }
        }
    }

    /// One line for the log at start.
    pub fn describe(&self) -> String {
        let ids = |v: &[u32]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
            }
        };
        format!(
            "mode {}{}; allowed: root, the daemon's uid, uids {}, gids {}",
            unixsock::format_mode(self.perms.mode),
            self.perms
                .gid
                .map(|g| format!(", group {g}"))
                .unwrap_or_default(),
            ids(&self.allow_uids),
            ids(&self.allow_gids)
        )
    }
}

/// The message a refused peer gets.
fn refusal(cred: &PeerCred) -> String {
    format!(
        "{} with gid {} (pid {}) may not use this nvmux API socket; the operator can allow it in the daemon's configuration: [api] allow_uids = [{}], or allow_gids / group for one of its groups",
        unixsock::describe_uid(cred.uid),
        cred.gid,
        cred.pid,
        cred.uid
    )
}

/// Logs refusals, at most [`REFUSAL_LOG_BURST`] lines a minute (a local user must not be
/// able to flood the log), then one line with the count of the others.
struct RefusalLog {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    fn note(&mut self, cred: &PeerCred) {
        if self.window.elapsed() >= Duration::from_secs(60) {
            if self.suppressed > 0 {
                tracing::warn!(
                    count = self.suppressed,
                    "API: more connections were refused in the last minute (not logged one by one)"
                );
            }
            *self = RefusalLog {
                window: Instant::now(),
                logged: 0,
                suppressed: 0,
            };
        }
        if self.logged < REFUSAL_LOG_BURST {
            self.logged += 1;
            tracing::warn!(
                pid = cred.pid,
                uid = cred.uid,
                gid = cred.gid,
                "API connection refused: the peer is not allowed ([api] allow_uids, allow_gids, group)"
            );
        } else {
            self.suppressed += 1;
        }
    }
}

/// Connections being served, so that `stop` can cut short those still reading.
#[derive(Default)]
struct Conns {
    next: u64,
    open: HashMap<u64, UnixStream>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    conns: Mutex<Conns>,
    idle: Condvar,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct ApiServer {
    listen_fd: RawFd,
    /// Wakes the accept thread's poll (stop, or a takeover's release).
    wake: EventFd,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    rejecter: Option<JoinHandle<()>>,
    path: PathBuf,
    /// The socket file we created (device, inode): `stop` removes only that one.
    ino: Option<(u64, u64)>,
}

impl ApiServer {
    pub fn start(daemon: Arc<Daemon>, path: &Path, access: &ApiAccess) -> Result<ApiServer> {
        // A socket inherited from the process this one took over is ours already.
        if !unixsock::is_inherited(&unixsock::unix_key(path)) {
            crate::claim_socket(path)?;
        }
        let listener = unixsock::bind(path, &access.perms)
            .map_err(|e| Error::new(e.kind, format!("API {}", e.msg)))?;
        let ino = {
            use std::os::unix::fs::MetadataExt;
            std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino()))
        };
        let listen_fd = listener.as_raw_fd();
        let wake = EventFd::new().map_err(|e| Error::io("API eventfd", e))?;
        let efd = wake.as_raw_fd();
        let shared = Arc::new(Shared::default());
        let (tx, rx) = sync_channel::<(UnixStream, Response)>(REJECT_QUEUE);
        let sh = shared.clone();
        let rejecter = std::thread::Builder::new()
            .name("nvmux-api-rej".into())
            .spawn(move || reject_loop(rx, &sh))
            .map_err(|e| Error::io("spawn API thread", e))?;
        let (sh, acc) = (shared.clone(), access.clone());
        let accept = std::thread::Builder::new()
            .name("nvmux-api".into())
            .spawn(move || accept_loop(listener, efd, daemon, acc, sh, tx))
            .map_err(|e| Error::io("spawn API thread", e))?;
        Ok(ApiServer {
            listen_fd,
            wake,
            shared,
            accept: Some(accept),
            rejecter: Some(rejecter),
            path: path.to_path_buf(),
            ino,
        })
    }

    /// The listening socket's path and descriptor (valid while the server lives).
    pub(crate) fn listener(&self) -> (&Path, RawFd) {
        (&self.path, self.listen_fd)
    }

    fn wake(&self) {
        self.wake.signal();
    }

    /// A takeover committed: stop accepting, without shutting down or unlinking the
    /// listening socket (the new process shares it). Requests being handled finish.
    pub(crate) fn release(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }

    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
        // SAFETY: the listener is owned by the accept thread, joined below, so the
        // descriptor is still open; shutdown wakes its blocking accept.
        unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // Connections still reading a request are cut short; requests being handled
        // finish and are answered.
        let mut g = self.shared.conns();
        for s in g.open.values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !g.open.is_empty() && Instant::now() < deadline {
            g = self
                .shared
                .idle
                .wait_timeout(g, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(g);
        if let Some(t) = self.rejecter.take() {
            let _ = t.join();
        }
        use std::os::unix::fs::MetadataExt;
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    wake: RawFd,
    daemon: Arc<Daemon>,
    access: ApiAccess,
    shared: Arc<Shared>,
    reject: SyncSender<(UnixStream, Response)>,
) {
    // SAFETY: geteuid has no preconditions.
    let daemon_uid = unsafe { libc::geteuid() };
    let mut log = RefusalLog {
        window: Instant::now(),
        logged: 0,
        suppressed: 0,
    };
    loop {
        // Wait for a connection or a wake-up: a takeover stops this loop without shutting
        // down the socket, which the new process goes on listening on.
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of two pollfd for the call's duration.
        let pr = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        if pr <= 0 || fds[0].revents == 0 {
            continue;
        }
        let r = listener.accept();
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let s = match r {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("API: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // Nothing is read from the connection before its peer is known and allowed.
        let cred = match unixsock::peer_cred(s.as_raw_fd()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "API: cannot read the peer's credentials (SO_PEERCRED): {e}; connection closed"
                );
                continue;
            }
        };
        if !access.allows(&cred, s.as_raw_fd(), daemon_uid) {
            log.note(&cred);
            let resp = Response::error(403, "permission_denied", &refusal(&cred));
            let _ = reject.try_send((s, resp));
            continue;
        }
        let id = {
            let mut g = shared.conns();
            if g.open.len() >= MAX_CONNS {
                None
            } else {
                match s.try_clone() {
                    Ok(c) => {
                        g.next += 1;
                        let id = g.next;
                        g.open.insert(id, c);
                        Some(id)
                    }
                    Err(_) => None,
                }
            }
        };
        let Some(id) = id else {
            let resp = Response::error(
                503,
                "busy",
                &format!("the API serves {MAX_CONNS} connections at once; try again"),
            );
            let _ = reject.try_send((s, resp));
            continue;
        };
        let (d, sh) = (daemon.clone(), shared.clone());
        let spawned = std::thread::Builder::new()
            .name("nvmux-api-conn".into())
            .spawn(move || {
                serve_conn(&d, s);
                sh.conns().open.remove(&id);
                sh.idle.notify_all();
            });
        if let Err(e) = spawned {
            shared.conns().open.remove(&id);
            tracing::warn!("API: cannot start a connection thread: {e}");
        }
    }
}

/// Answer refused and surplus connections: the reply, then a short drain (never parsed),
/// so the client reads the reply rather than a reset or a broken pipe.
fn reject_loop(rx: Receiver<(UnixStream, Response)>, shared: &Shared) {
    while let Ok((mut s, resp)) = rx.recv() {
        let _ = s.set_write_timeout(Some(REJECT_DRAIN));
        let _ = s.write_all(&resp.to_bytes());
        let _ = s.shutdown(std::net::Shutdown::Write);
        if shared.stop.load(Ordering::Acquire) {
            continue;
        }
        let deadline = Instant::now() + REJECT_DRAIN;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < REJECT_DRAIN_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

/// One allowed connection: one request, one reply.
fn serve_conn(d: &Daemon, mut s: UnixStream) {
    let _ = s.set_read_timeout(Some(http::IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(http::IO_TIMEOUT));
    let resp = match http::read_request(&mut s) {
        Ok(req) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle(d, &req)))
            .unwrap_or_else(|_| {
                tracing::error!(method = %req.head.method, target = %req.head.target, "API: the request handler panicked");
                Response::error(500, "io", "internal error while handling the request (see the daemon log)")
            }),
        Err(Some(resp)) => resp,
        Err(None) => return,
    };
    let _ = s.write_all(&resp.to_bytes());
    let _ = s.flush();
    if d.exit_after_reply.load(Ordering::Acquire) {
        // An upgrade handed everything to the new process: leave without cleaning up
        // (no socket is shut down or unlinked; the new process serves them).
        tracing::info!("handed over to the new process; exiting");
        std::process::exit(0);
    }
}

fn reply_json<T: Serialize>(code: u16, v: &T) -> Response {
    let body = serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    Response::json(code, body + "\n")
}

fn kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::InvalidArgument => "invalid_argument",
        ErrorKind::NotFound => "not_found",
        ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Busy => "busy",
        _ => "io",
    }
}

fn reply_err(e: &Error) -> Response {
    let code = match e.kind {
        ErrorKind::InvalidArgument | ErrorKind::Unsupported => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::AlreadyExists | ErrorKind::Busy => 409,
        _ => 500,
    };
    Response::error(code, kind_name(e.kind), &e.msg)
}

fn body<T: serde::de::DeserializeOwned>(req: &Request) -> Result<T> {
    serde_json::from_slice(&req.body)
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("bad request body: {e}")))
}

/// `POST /v1/pools/check` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckReq {
    path: PathBuf,
}

fn handle(d: &Daemon, req: &Request) -> Response {
    let target = req.head.target.as_str();
    let query = target
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    let flag = |name: &str| {
        query
            .split('&')
            .any(|kv| kv == name || kv == format!("{name}=1") || kv == format!("{name}=true"))
    };
    let url = target.split('?').next().unwrap_or("").to_string();
    let parts: Vec<&str> = url.trim_matches('/').split('/').collect();
    let method = req.head.method.as_str();
    match (method, parts.as_slice()) {
        ("GET", ["v1", "health"]) => reply_json(
            200,
            &serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
        ),
        ("GET", ["v1", "disks"]) => reply_json(200, &d.disks()),
        ("POST", ["v1", "upgrade"]) => {
            match body::<crate::upgrade::UpgradeRequest>(req).and_then(|b| d.upgrade(b)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "disks"]) => match body::<DiskCreate>(req).and_then(|b| d.create_disk(b)) {
            Ok(v) => reply_json(201, &v),
            Err(e) => reply_err(&e),
        },
        ("GET", ["v1", "disks", name]) => match d.disk(name) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("DELETE", ["v1", "disks", name]) => {
            let erase = flag("erase");
            let t = std::time::Instant::now();
            match d.delete_disk(name, erase) {
                Ok(bytes) => reply_json(
                    200,
                    &serde_json::json!({"deleted": name, "erased_bytes": if erase { Some(bytes) } else { None }, "seconds": t.elapsed().as_secs_f64()}),
                ),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "disks", name, "snapshot"]) => {
            match body::<SnapshotCreate>(req).and_then(|b| d.snapshot_disk(name, &b.snapshot)) {
                Ok(v) => reply_json(201, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "disks", name, "qos"]) => {
            match body::<crate::QosSpec>(req).and_then(|q| d.set_qos(name, q)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("GET", ["v1", "disks", name, "mirror"]) => match d.mirror_status(name) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "disks", name, "mirror"]) => {
            match body::<crate::LegAdd>(req).and_then(|b| d.add_mirror_leg(name, b)) {
                Ok(v) => reply_json(201, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("DELETE", ["v1", "disks", name, "mirror", leg]) => match d.remove_mirror_leg(name, leg) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "disks", name, "chain"]) => {
            match body::<ChainBody>(req).and_then(|b| d.set_chain(name, b.chain)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "disks", name, "crypto-erase"]) => match d.crypto_erase(name) {
            Ok(secs) => reply_json(200, &serde_json::json!({"disk": name, "seconds": secs})),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "disks", name, "resize"]) => {
            match body::<Resize>(req).and_then(|b| d.resize_disk(name, b)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("GET", ["v1", "disks", name, "classifier"]) => match d.classifier(name) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "disks", name, "classifier"]) => {
            match body::<crate::routing::ClassifierLoad>(req)
                .and_then(|b| d.set_classifier(name, b))
            {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "disks", name, "flush-policy"]) => {
            match body::<crate::routing::FlushPolicy>(req).and_then(|b| d.set_flush_policy(name, b))
            {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("DELETE", ["v1", "disks", name, "classifier"]) => match d.clear_classifier(name) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "disks", name, "classifier", "maps", map]) => {
            match body::<crate::routing::MapWrite>(req).and_then(|b| d.set_map(name, map, b)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "disks", name, "external"]) => {
            match body::<crate::routing::ExternalSet>(req)
                .and_then(|b| d.set_external(name, Some(b)))
            {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("DELETE", ["v1", "disks", name, "external"]) => match d.set_external(name, None) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("GET", ["v1", "pools"]) => reply_json(200, &d.pools()),
        ("POST", ["v1", "keys", "rotate"]) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Rotate {
                kek_file: std::path::PathBuf,
            }
            match body::<Rotate>(req).and_then(|r| d.rotate_kek(&r.kek_file)) {
                Ok(n) => reply_json(200, &serde_json::json!({"rewrapped": n})),
                Err(e) => reply_err(&e),
            }
        }
        ("GET", ["v1", "operations"]) => reply_json(200, &d.operations()),
        ("POST", ["v1", "pools"]) => match body::<PoolCreate>(req).and_then(|b| d.create_pool(b)) {
            Ok(v) => reply_json(201, &v),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "pools", "check"]) => {
            match body::<CheckReq>(req).and_then(|b| crate::pools::check_path(&b.path)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("GET", ["v1", "pools", name]) => match d.pool(name) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("DELETE", ["v1", "pools", name]) => match d.remove_pool(name) {
            Ok(()) => reply_json(200, &serde_json::json!({"removed": name})),
            Err(e) => reply_err(&e),
        },
        ("DELETE", ["v1", "pools", pool, "volumes", vol]) => match d.delete_volume(pool, vol) {
            Ok(()) => reply_json(200, &serde_json::json!({"deleted": vol})),
            Err(e) => reply_err(&e),
        },
        ("GET", ["v1", "exports"]) => reply_json(200, &d.exports()),
        ("POST", ["v1", "exports"]) => {
            match body::<ExportCreate>(req).and_then(|b| d.create_export(b)) {
                Ok(v) => reply_json(201, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("DELETE", ["v1", "exports", name]) => match d.delete_export(name) {
            Ok(()) => reply_json(200, &serde_json::json!({"deleted": name})),
            Err(e) => reply_err(&e),
        },
        ("GET", ["v1", "subsystems"]) => reply_json(200, &d.subsystems()),
        ("POST", ["v1", "subsystems"]) => {
            match body::<crate::nvmf::SubsystemCreate>(req).and_then(|b| d.create_subsystem(b)) {
                Ok(v) => reply_json(201, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("GET", ["v1", "subsystems", nqn]) => match d.subsystem(nqn) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("DELETE", ["v1", "subsystems", nqn]) => match d.delete_subsystem(nqn) {
            Ok(()) => reply_json(200, &serde_json::json!({"deleted": nqn})),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "subsystems", nqn, "namespaces"]) => {
            match body::<crate::nvmf::NamespaceCreate>(req).and_then(|b| d.add_namespace(nqn, b)) {
                Ok(v) => reply_json(201, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("DELETE", ["v1", "subsystems", nqn, "namespaces", nsid]) => {
            let r = nsid
                .parse::<u32>()
                .map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidArgument,
                        format!("namespace id {nsid:?} is not a number"),
                    )
                })
                .and_then(|n| d.remove_namespace(nqn, n));
            match r {
                Ok(()) => reply_json(200, &serde_json::json!({"removed": nsid})),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "subsystems", nqn, "hosts"]) => {
            match body::<crate::nvmf::HostAllow>(req).and_then(|b| d.allow_host(nqn, b)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("DELETE", ["v1", "subsystems", nqn, "hosts", host]) => match d.deny_host(nqn, host) {
            Ok(v) => reply_json(200, &v),
            Err(e) => reply_err(&e),
        },
        ("POST", ["v1", "subsystems", nqn, "auth"]) => {
            match body::<crate::nvmf::SubsystemAuth>(req).and_then(|b| d.set_subsystem_auth(nqn, b))
            {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("POST", ["v1", "subsystems", nqn, "listen"]) => {
            match body::<ListenBody>(req).and_then(|b| d.set_listen(nqn, &b.listen)) {
                Ok(v) => reply_json(200, &v),
                Err(e) => reply_err(&e),
            }
        }
        ("GET", ["v1", "stats"]) => reply_json(200, &d.stats()),
        ("GET", ["v1", "nbd"]) => reply_json(200, &d.nbd_view()),
        ("GET", ["metrics"]) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body: crate::metrics::render(d),
        },
        _ => reply_err(&Error::new(
            ErrorKind::NotFound,
            format!("no route {method} {url}; see docs/api.md"),
        )),
    }
}

/// `POST /v1/subsystems/{nqn}/listen` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenBody {
    listen: String,
}

/// `POST /v1/disks/{name}/chain` body; `null` or absent: the default chain.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainBody {
    #[serde(default)]
    chain: Option<Vec<crate::Function>>,
}
