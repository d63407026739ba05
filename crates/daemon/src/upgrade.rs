//! `nvmux upgrade`: hand the running daemon's sockets and vhost-user sessions to a new
//! binary without a reconnect (the protocol is in `nvmux_vhost::handover`).
//!
//! Old process ([`Daemon::upgrade`], behind `POST /v1/upgrade`): spawn `BINARY <the same
//! arguments> --takeover <data_dir>/takeover.sock`, wait for its HELLO, freeze every
//! vhost-user export (rings drained and stopped, next_avail recorded), send every
//! listening socket, the data directory's lock and the sessions, and wait for the new
//! process's health check (READY). Any failure before GO (the binary exits, times out,
//! answers not ok): kill it and thaw the rings. After GO: stop accepting, drain NBD and
//! NVMe/TCP connections (they are closed; clients reconnect), close the pools, send
//! RELEASED, wait for STARTED, answer the API call and exit.
//!
//! New process ([`take_over`]): receive, check, answer READY, wait for GO and RELEASED,
//! then start as usual from state.json: `unixsock::bind` and `tcp_listener` hand back the
//! inherited sockets, and each vhost-user export adopts its session and starts its rings
//! at the recorded next_avail (the used index is read from the ring).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::unixsock::{self, SocketPerms};
use nvmux_core::{Error, ErrorKind, Result};
use nvmux_vhost::handover::{self, ListenerKind, Msg, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};

use crate::{err, Config, Daemon, Handle};

/// Default time the new binary has for each step (start, health check, start-up).
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// The most an upgrade may be given.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// How long committed NBD and NVMe/TCP connections get to finish their commands.
const DRAIN: Duration = Duration::from_secs(10);
/// How much of the new binary's log a failure report quotes.
const LOG_EXCERPT: u64 = 4096;

/// The registry key of the data directory's lock file.
pub fn lock_key(p: &Path) -> String {
    format!("lock:{}", p.display())
}

/// `POST /v1/upgrade` body.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The new binary (default: the running daemon's own executable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
    /// Time for each step of the new binary, in ms (default 30000, at most 600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// `POST /v1/upgrade` reply: the new process serves.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UpgradeView {
    pub pid: u32,
    pub binary: PathBuf,
    /// Connected vhost-user sessions handed over (no reconnect).
    pub sessions: usize,
    /// Listening sockets handed over (API, exports, NVMe/TCP, data-dir lock).
    pub listeners: usize,
    /// NBD and NVMe/TCP connections that were drained and closed, and vfio-user clients
    /// disconnected (clients reconnect).
    pub closed_connections: u64,
    /// From the first ring stopped to the new process's STARTED: the longest I/O pause a
    /// vhost-user guest saw.
    pub pause_ms: f64,
    /// What the new process reported.
    pub detail: String,
}

struct Abort<'a> {
    d: &'a Daemon,
    child: Option<Child>,
    log: LogTail,
    frozen: Vec<String>,
}

/// Copies the new binary's output to this process's standard error and keeps its last
/// [`LOG_EXCERPT`] bytes.
struct LogTail {
    tail: Arc<std::sync::Mutex<std::collections::VecDeque<u8>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl LogTail {
    fn start(
        out: Option<std::process::ChildStdout>,
        err: Option<std::process::ChildStderr>,
    ) -> LogTail {
        let tail = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let mut threads = Vec::new();
        let readers: Vec<Box<dyn Read + Send>> = [
            out.map(|o| Box::new(o) as Box<dyn Read + Send>),
            err.map(|e| Box::new(e) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for mut r in readers {
            let t = tail.clone();
            if let Ok(h) = std::thread::Builder::new()
                .name("nvmux-upgrade-log".into())
                .spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let chunk = buf.get(..n).unwrap_or(&[]);
                        let _ = std::io::Write::write_all(&mut std::io::stderr(), chunk);
                        let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
                        g.extend(chunk.iter().copied());
                        while g.len() as u64 > LOG_EXCERPT {
                            g.pop_front();
                        }
                    }
                })
            {
                threads.push(h);
            }
        }
        LogTail { tail, threads }
    }

    /// The tail of the output once the new binary is gone (its pipes closed).
    fn excerpt(self) -> String {
        for t in self.threads {
            let _ = t.join();
        }
        let g = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let v: Vec<u8> = g.iter().copied().collect();
        let s = String::from_utf8_lossy(&v).trim().to_string();
        if s.is_empty() {
            "(nothing)".into()
        } else {
            s
        }
    }
}

impl Abort<'_> {
    /// Kill the new binary (so it can never start the rings), thaw ours, and say why
    /// with the new binary's log.
    fn fail(mut self, why: String) -> Error {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let g = self.d.lock();
        for name in &self.frozen {
            if let Some(crate::Export {
                handle: Ok(Handle::Vhost(v)),
                ..
            }) = g.exports.get(name)
            {
                v.thaw();
            }
        }
        drop(g);
        tracing::error!("upgrade abandoned, this daemon serves on: {why}");
        let excerpt = self.log.excerpt();
        err(
            ErrorKind::Io,
            format!(
                "upgrade failed, the running daemon keeps serving: {why}. The new binary's output ends with:\n{excerpt}"
            ),
        )
    }
}

/// The arguments this daemon was started with, without a previous `--takeover PATH`.
fn serve_args() -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        if a == "--takeover" {
            it.next();
            continue;
        }
        if a.to_string_lossy().starts_with("--takeover=") {
            continue;
        }
        out.push(a);
    }
    out
}

fn accept_within(l: &UnixListener, deadline: Instant, child: &mut Child) -> Result<UnixStream> {
    l.set_nonblocking(true)
        .map_err(|e| Error::io("takeover socket", e))?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| Error::io("takeover socket", e))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::io("takeover socket accept", e)),
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(err(
                ErrorKind::Io,
                format!("the new binary exited ({st}) before it connected"),
            ));
        }
        if Instant::now() >= deadline {
            return Err(err(
                ErrorKind::Busy,
                "the new binary did not connect to the takeover socket in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn recv_within(s: &UnixStream, deadline: Instant) -> std::result::Result<Msg<OwnedFd>, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    let _ = s.set_read_timeout(Some(left));
    handover::recv(s).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".to_string(),
        _ => e.to_string(),
    })
}

impl Daemon {
    /// Hand this daemon over to `req.binary` (see the module documentation). On success
    /// the process exits once the API reply is written.
    pub fn upgrade(&self, req: UpgradeRequest) -> Result<UpgradeView> {
        if self.upgrading.swap(true, Ordering::AcqRel) {
            return Err(err(ErrorKind::Busy, "an upgrade is already under way"));
        }
        let r = self.upgrade_inner(req);
        if r.is_err() {
            self.upgrading.store(false, Ordering::Release);
        }
        r
    }

    fn upgrade_inner(&self, req: UpgradeRequest) -> Result<UpgradeView> {
        let timeout = Duration::from_millis(
            req.timeout_ms
                .unwrap_or(DEFAULT_TIMEOUT_MS)
                .clamp(100, MAX_TIMEOUT_MS),
        );
        let binary = match req.binary {
            Some(b) => b,
            None => std::env::current_exe().map_err(|e| Error::io("this daemon's binary", e))?,
        };
        if !binary.is_file() {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!(
                    "{} is not a file; give the new nvmux binary",
                    binary.display()
                ),
            ));
        }
        let dir = &self.cfg.data_dir;
        let sock_path = dir.join("takeover.sock");
        let _ = std::fs::remove_file(&sock_path);
        let listener = unixsock::bind(
            &sock_path,
            &SocketPerms {
                uid: None,
                gid: None,
                mode: 0o600,
            },
        )?;
        let cleanup = scopeguard(&sock_path);
        // The new binary's output goes through pipes into this daemon's standard error
        // (its tail kept for a failure report) until it takes over this process's
        // stdout and stderr (after GO).
        let mut child = Command::new(&binary)
            .args(serve_args())
            .arg("--takeover")
            .arg(&sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(format!("start {}", binary.display()), e))?;
        let log = LogTail::start(child.stdout.take(), child.stderr.take());
        let pid = child.id();
        tracing::info!(binary = %binary.display(), pid, "upgrade: new binary started");
        let deadline = Instant::now() + timeout;
        let stream = match accept_within(&listener, deadline, &mut child) {
            Ok(s) => s,
            Err(e) => {
                let a = Abort {
                    d: self,
                    child: Some(child),
                    log,
                    frozen: vec![],
                };
                return Err(a.fail(e.msg));
            }
        };
        drop(listener);
        drop(cleanup);
        let mut abort = Abort {
            d: self,
            child: Some(child),
            log,
            frozen: vec![],
        };
        // Only the process we started may take over.
        match unixsock::peer_cred(stream.as_raw_fd()) {
            Ok(c) if c.pid == pid as i32 => {}
            Ok(c) => {
                return Err(abort.fail(format!(
                    "the takeover socket was reached by pid {}, not the new binary (pid {pid})",
                    c.pid
                )))
            }
            Err(e) => return Err(abort.fail(format!("SO_PEERCRED: {e}"))),
        }
        match recv_within(&stream, deadline) {
            Ok(Msg::Hello { version, .. }) if version == PROTOCOL_VERSION => {}
            Ok(Msg::Hello { version, .. }) => {
                return Err(abort.fail(format!(
                    "the new binary speaks takeover protocol {version}, this one {PROTOCOL_VERSION}"
                )))
            }
            Ok(_) => return Err(abort.fail("the new binary did not say HELLO".into())),
            Err(e) => return Err(abort.fail(format!("waiting for HELLO: {e}"))),
        }

        // Freeze: from here the guests' I/O pauses.
        let t_pause = Instant::now();
        let mut g = self.lock();
        let mut msgs: Vec<Msg<RawFd>> = Vec::new();
        let mut owned: Vec<OwnedFd> = Vec::new();
        let mut sessions = 0usize;
        let mut frozen_fds: Vec<(String, nvmux_vhost::Frozen)> = Vec::new();
        for (name, e) in g.exports.iter() {
            if let Ok(Handle::Vhost(v)) = &e.handle {
                match v.freeze(timeout) {
                    Ok(f) => {
                        abort.frozen.push(name.clone());
                        frozen_fds.push((v.socket().display().to_string(), f));
                    }
                    Err(e) => {
                        // Its thread may still freeze, then wait for a verdict: thaw it
                        // too.
                        abort.frozen.push(name.clone());
                        drop(g);
                        return Err(abort.fail(e.msg));
                    }
                }
            }
        }
        let lock_path = dir.join("nvmux.lock");
        msgs.push(Msg::Listener {
            kind: ListenerKind::DataDirLock,
            key: lock_key(&lock_path),
            fd: self.lock_file.as_raw_fd(),
        });
        for (key, fd) in [("stdout", 1), ("stderr", 2)] {
            msgs.push(Msg::Listener {
                kind: ListenerKind::Stdio,
                key: key.into(),
                fd,
            });
        }
        if let Some(api) = self.api.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let (p, fd) = api.listener();
            msgs.push(Msg::Listener {
                kind: ListenerKind::Api,
                key: unixsock::unix_key(p),
                fd,
            });
        }
        for (path, f) in frozen_fds {
            msgs.push(Msg::Listener {
                kind: ListenerKind::Unix,
                key: unixsock::unix_key(Path::new(&path)),
                fd: f.listener.as_raw_fd(),
            });
            owned.push(f.listener);
            if let Some(s) = f.session {
                sessions += 1;
                msgs.push(Msg::Session(handover::SessionState {
                    socket: s.socket,
                    features: s.features,
                    protocol: s.protocol,
                    conn: s.conn.as_raw_fd(),
                    backend_req: s.backend_req.as_ref().map(|f| f.as_raw_fd()),
                    regions: s.regions.iter().map(|(r, f)| (*r, f.as_raw_fd())).collect(),
                    vrings: s
                        .vrings
                        .iter()
                        .map(|v| handover::VringState {
                            size: v.size,
                            addrs: v.addrs,
                            base: v.base,
                            enabled: v.enabled,
                            running: v.running,
                            kick: v.kick.as_ref().map(|f| f.as_raw_fd()),
                            call: v.call.as_ref().map(|f| f.as_raw_fd()),
                        })
                        .collect(),
                    inflight: s.inflight.as_ref().map(|i| handover::InflightState {
                        num_queues: i.num_queues,
                        queue_size: i.queue_size,
                        mmap_size: i.mmap_size,
                        mmap_offset: i.mmap_offset,
                        fd: i.fd.as_raw_fd(),
                    }),
                }));
                // The descriptors stay open until they are sent.
                owned.push(s.conn);
                owned.extend(s.backend_req);
                owned.extend(s.regions.into_iter().map(|(_, f)| f));
                owned.extend(s.inflight.map(|i| i.fd));
                for v in s.vrings {
                    owned.extend(v.kick);
                    owned.extend(v.call);
                }
            }
        }
        {
            let nbd = self.nbd.lock().unwrap_or_else(|e| e.into_inner());
            for l in nbd.values() {
                let (kind, key) = match l.srv.listen() {
                    nvmux_nbd::Listen::Unix(p) => (ListenerKind::Unix, unixsock::unix_key(p)),
                    nvmux_nbd::Listen::Tcp(a) => (ListenerKind::Tcp, unixsock::tcp_key(a)),
                };
                msgs.push(Msg::Listener {
                    kind,
                    key,
                    fd: l.srv.listen_fd(),
                });
            }
        }
        for (a, fd) in self.nvmf.listener_fds() {
            msgs.push(Msg::Listener {
                kind: ListenerKind::Tcp,
                key: unixsock::tcp_key(&a),
                fd,
            });
        }
        let listeners = msgs
            .iter()
            .filter(|m| matches!(m, Msg::Listener { .. }))
            .count();
        msgs.push(Msg::End {
            listeners: listeners as u32,
            sessions: sessions as u32,
        });
        for m in &msgs {
            if let Err(e) = handover::send(&stream, m) {
                drop(g);
                return Err(abort.fail(format!("sending the state: {e}")));
            }
        }
        drop(owned);
        match recv_within(&stream, deadline.max(Instant::now() + timeout)) {
            Ok(Msg::Ready { ok: true, .. }) => {}
            Ok(Msg::Ready { ok: false, detail }) => {
                drop(g);
                return Err(abort.fail(format!("the new binary's health check failed: {detail}")));
            }
            Ok(_) => {
                drop(g);
                return Err(abort.fail("the new binary did not answer READY".into()));
            }
            Err(e) => {
                drop(g);
                return Err(abort.fail(format!("waiting for the health check: {e}")));
            }
        }
        if let Err(e) = handover::send(&stream, &Msg::Go) {
            drop(g);
            return Err(abort.fail(format!("sending GO: {e}")));
        }
        // Committed: the new process serves from now on; this one lets go.
        let child = abort.child.take();
        tracing::info!(pid, "upgrade: committed; releasing sockets and pools");
        if let Some(api) = self.api.lock().unwrap_or_else(|e| e.into_inner()).take() {
            api.release();
        }
        let mut closed = 0u64;
        let nbd = std::mem::take(&mut *self.nbd.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, l) in nbd {
            closed += l.srv.stats().connections;
            l.srv.release(DRAIN);
        }
        closed += self
            .nvmf
            .stats()
            .listeners
            .iter()
            .map(|l| l.open as u64)
            .sum::<u64>();
        self.nvmf.shutdown_and_wait(DRAIN);
        for (_, e) in std::mem::take(&mut g.exports) {
            match e.handle {
                Ok(Handle::Vhost(v)) => v.release(),
                // No vfio-user takeover: the export stops (its client is disconnected,
                // the socket removed) and the new process re-creates it from state.json;
                // QEMU must attach again (docs/vfio-user.md, "Using it").
                Ok(Handle::VfioUser(v)) => {
                    if v.connected() {
                        closed += 1;
                        tracing::warn!(socket = %v.socket().display(), "upgrade: vfio-user client disconnected (a vfio-user session is not handed over)");
                    }
                    v.stop();
                }
                // NBD exports went with their listeners above.
                Ok(Handle::Nbd(h)) => std::mem::forget(h),
                Err(_) => {}
            }
        }
        for (name, p) in std::mem::take(&mut g.pools) {
            if let Ok(p) = p.pool {
                if let Err(e) = p.close_and_unlock() {
                    tracing::error!(pool = %name, "close before the takeover: {e}");
                }
            }
        }
        let released = handover::send(&stream, &Msg::Released);
        let started = match released {
            Err(e) => Err(format!("sending RELEASED: {e}")),
            Ok(()) => match recv_within(&stream, Instant::now() + timeout) {
                Ok(Msg::Started { ok: true, detail }) => Ok(detail),
                Ok(Msg::Started { ok: false, detail }) => Err(detail),
                Ok(_) => Err("the new binary did not answer STARTED".into()),
                Err(e) => Err(e),
            },
        };
        let pause_ms = t_pause.elapsed().as_secs_f64() * 1e3;
        // Whatever happens now, this process exits after the reply: it released
        // everything.
        self.exit_after_reply.store(true, Ordering::Release);
        drop(child);
        match started {
            Ok(detail) => {
                tracing::info!(pid, pause_ms, "upgrade: the new process serves; exiting");
                Ok(UpgradeView {
                    pid,
                    binary,
                    sessions,
                    listeners,
                    closed_connections: closed,
                    pause_ms,
                    detail,
                })
            }
            Err(e) => {
                tracing::error!(pid, "upgrade: the new process failed after the commit: {e}");
                Err(err(
                    ErrorKind::Io,
                    format!(
                        "the new binary (pid {pid}) failed after taking over: {e}. This daemon had already released its sockets and exits; see the daemon's log and restart nvmux"
                    ),
                ))
            }
        }
    }
}

/// Removes the takeover socket when dropped.
struct SockGuard<'a>(&'a Path);
impl Drop for SockGuard<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}
fn scopeguard(p: &Path) -> SockGuard<'_> {
    SockGuard(p)
}

/// `serve --takeover SOCK`: take over from the daemon that started this process, then
/// serve. Returns the running daemon (its API serving on the inherited socket).
pub(crate) fn take_over(
    cfg: Config,
    sock: &Path,
    api_path: &Path,
    access: &crate::api::ApiAccess,
) -> Result<Arc<Daemon>> {
    let s = UnixStream::connect(sock)
        .map_err(|e| Error::io(format!("takeover socket {}", sock.display()), e))?;
    let io = |e: std::io::Error| Error::io("takeover channel", e);
    handover::send(
        &s,
        &Msg::Hello {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
        },
    )
    .map_err(io)?;
    let step = Duration::from_secs(120);
    let mut listeners = 0u32;
    let mut sessions = 0u32;
    let mut stdio: Vec<(RawFd, OwnedFd)> = Vec::new();
    let (want_l, want_s) = loop {
        match recv_within(&s, Instant::now() + step) {
            Ok(Msg::Listener {
                kind: ListenerKind::Stdio,
                key,
                fd,
            }) => {
                listeners += 1;
                match key.as_str() {
                    "stdout" => stdio.push((1, fd)),
                    "stderr" => stdio.push((2, fd)),
                    _ => {}
                }
            }
            Ok(Msg::Listener { key, fd, .. }) => {
                listeners += 1;
                unixsock::inherit(key, fd);
            }
            Ok(Msg::Session(st)) => {
                sessions += 1;
                nvmux_vhost::stash_session(st);
            }
            Ok(Msg::End {
                listeners,
                sessions,
            }) => break (listeners, sessions),
            Ok(_) => return Err(err(ErrorKind::Io, "takeover: unexpected message")),
            Err(e) => return Err(err(ErrorKind::Io, format!("takeover: {e}"))),
        }
    };
    // The health check: everything arrived, and this binary can serve with it.
    let mut problems = Vec::new();
    if (listeners, sessions) != (want_l, want_s) {
        problems.push(format!(
            "received {listeners} listeners and {sessions} sessions, {want_l} and {want_s} were sent"
        ));
    }
    if !unixsock::is_inherited(&unixsock::unix_key(api_path)) {
        problems.push(format!(
            "the old daemon's API socket is not {} (the configuration differs)",
            api_path.display()
        ));
    }
    if !unixsock::is_inherited(&lock_key(&cfg.data_dir.join("nvmux.lock"))) {
        problems.push("the data directory's lock was not handed over".into());
    }
    if let Err(e) = nvmux_backend::probe_io_uring() {
        problems.push(e.msg);
    }
    if nvmux_core::fault::armed("upgrade-health", "*") {
        problems.push("fault injection: upgrade-health".into());
    }
    let ok = problems.is_empty();
    handover::send(
        &s,
        &Msg::Ready {
            ok,
            detail: problems.join("; "),
        },
    )
    .map_err(io)?;
    if !ok {
        return Err(err(
            ErrorKind::Io,
            format!("takeover refused: {}", problems.join("; ")),
        ));
    }
    match recv_within(&s, Instant::now() + step) {
        Ok(Msg::Go) => {}
        Ok(_) => return Err(err(ErrorKind::Io, "takeover: expected GO")),
        Err(e) => {
            return Err(err(
                ErrorKind::Io,
                format!("takeover abandoned by the old daemon: {e}"),
            ))
        }
    }
    // Log where the old daemon logged (its output pipe to the old process ends here).
    for (target, fd) in &stdio {
        // SAFETY: dup2 of a descriptor we own onto our own standard output or error.
        unsafe { libc::dup2(fd.as_raw_fd(), *target) };
    }
    drop(stdio);
    match recv_within(&s, Instant::now() + step) {
        Ok(Msg::Released) => {}
        Ok(_) => return Err(err(ErrorKind::Io, "takeover: expected RELEASED")),
        Err(e) => {
            return Err(err(
                ErrorKind::Io,
                format!("takeover: waiting for RELEASED: {e}"),
            ))
        }
    }
    let started = Daemon::start(cfg).and_then(|d| {
        let server = crate::api::ApiServer::start(d.clone(), api_path, access)?;
        *d.api.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
        Ok(d)
    });
    for (key, _) in unixsock::take_all_inherited() {
        tracing::warn!(
            socket = key,
            "a socket handed over is not in the state any more: closed"
        );
    }
    for p in nvmux_vhost::drop_unclaimed_sessions() {
        tracing::warn!(socket = %p.display(), "a vhost-user session handed over has no export any more: closed");
    }
    let d = match started {
        Ok(d) => d,
        Err(e) => {
            let _ = handover::send(
                &s,
                &Msg::Started {
                    ok: false,
                    detail: e.to_string(),
                },
            );
            return Err(e);
        }
    };
    tracing::info!(
        listeners,
        sessions,
        "took over from the previous daemon process"
    );
    handover::send(
        &s,
        &Msg::Started {
            ok: true,
            detail: format!("{listeners} listeners, {sessions} vhost-user sessions taken over"),
        },
    )
    .map_err(io)?;
    Ok(d)
}
