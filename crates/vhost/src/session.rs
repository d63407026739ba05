//! An export's listening socket and control connection, served as a task on the
//! process's control threads ([`nvmux_core::ctlpoll`]) instead of a thread of its own.
//!
//! The task never blocks on the front-end. Both sockets are non-blocking and watched
//! through epoll. A request is handed to the `vhost` crate's handler only once it is
//! whole in the socket's receive queue: the 12-byte header is peeked (`MSG_PEEK`), and
//! `FIONREAD` must show header + body. A front-end that sends part of a message and
//! stalls holds up nobody: its bytes stay in the kernel until the rest arrives, and a
//! message still incomplete after [`MESSAGE_TIMEOUT`] costs the front-end its connection.
//! Replies go out on the non-blocking socket: a front-end that stops reading its replies
//! until its receive buffer fills loses its connection instead of stalling the thread.
//! One task serves at most [`MESSAGES_PER_TURN`] requests before the other tasks of its
//! thread get a turn.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmux_core::ctlpoll::{CtlCx, CtlTask, Next};
use nvmux_core::stats::DiskStats;
use nvmux_core::unixsock::{peek_queued, Queued};
use nvmux_core::worker::WorkerHandle;
use nvmux_core::BlockDevice;
use vhost::vhost_user::message::MAX_MSG_SIZE;
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};

use crate::log::LogCounters;
use crate::mem::ExportCounters;
use crate::migration::RingGate;
use crate::{backend_req, dup_fd, BlkBackend, ExportConfig, Frozen};

/// A request still incomplete this long after its first byte arrived closes the
/// connection.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests one task serves before the other tasks of its control thread get a turn.
pub const MESSAGES_PER_TURN: usize = 32;
/// The vhost-user message header: request, flags, size (little-endian u32 each).
const HEADER: usize = 12;

/// Takeover requests to an export's task.
pub(crate) enum Ctl {
    Freeze(SyncSender<std::io::Result<Frozen>>),
    Thaw,
    Release,
}

type Handler = BackendReqHandler<Mutex<BlkBackend>>;

/// A connected front-end.
pub(crate) struct Session {
    pub handler: Handler,
    pub backend: Arc<Mutex<BlkBackend>>,
    /// A duplicate of the connection, to peek at requests.
    pub peek: UnixStream,
    /// When the bytes of an incomplete request started waiting.
    partial_since: Option<Instant>,
}

impl Session {
    pub fn new(handler: Handler, backend: Arc<Mutex<BlkBackend>>) -> std::io::Result<Session> {
        let peek = handler.try_clone_connection()?;
        Ok(Session {
            handler,
            backend,
            peek,
            partial_since: None,
        })
    }
}

enum State {
    Idle,
    Session(Session),
    /// Frozen for a takeover: nothing is watched until the verdict. The session's
    /// rings ran as in `running` before the freeze.
    Frozen(Option<Session>, Vec<bool>),
}

/// What a new client's back-end is built from.
pub(crate) struct Parts {
    pub dev: Arc<dyn BlockDevice>,
    pub cfg: ExportConfig,
    pub workers: Vec<WorkerHandle>,
    pub stats: Arc<DiskStats>,
    pub counters: Arc<ExportCounters>,
    pub log_counters: Arc<LogCounters>,
    pub gate: Arc<RingGate>,
    pub side: usize,
}

impl Parts {
    pub fn backend(&self) -> Arc<Mutex<BlkBackend>> {
        Arc::new(Mutex::new(BlkBackend::new(
            self.dev.clone(),
            &self.cfg,
            self.workers.clone(),
            self.stats.clone(),
            self.counters.clone(),
            self.log_counters.clone(),
            (self.gate.clone(), self.side),
        )))
    }
}

/// One export's control-plane task.
pub(crate) struct ExportTask {
    pub listener: Listener,
    pub parts: Parts,
    pub socket: PathBuf,
    pub stop: Arc<AtomicBool>,
    pub conn: Arc<Mutex<Option<UnixStream>>>,
    pub req: Arc<Mutex<Option<UnixStream>>>,
    pub ctl: Receiver<Ctl>,
    state: State,
    started: bool,
}

enum Peek {
    /// Nothing waiting.
    Empty,
    /// Part of a request.
    Partial,
    /// A whole request (or a header the handler will refuse).
    Complete,
    /// End of stream or a socket error.
    Closed,
}

/// Look at what waits on `fd` without taking it.
fn peek(fd: RawFd) -> Peek {
    let mut hdr = [0u8; HEADER];
    let total = match peek_queued(fd, &mut hdr) {
        Queued::Empty => return Peek::Empty,
        Queued::Closed => return Peek::Closed,
        Queued::Bytes { copied, .. } if copied < HEADER => return Peek::Partial,
        Queued::Bytes { total, .. } => total,
    };
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_MSG_SIZE || total >= HEADER + size {
        // A whole request, or a header the handler refuses without reading further.
        Peek::Complete
    } else {
        Peek::Partial
    }
}

enum Served {
    /// Waiting for more bytes.
    Wait,
    /// More requests may be queued: run again after the others.
    Again,
    /// The connection is finished (None: the front-end hung up).
    Closed(Option<String>),
}

impl ExportTask {
    pub fn new(
        listener: Listener,
        parts: Parts,
        stop: Arc<AtomicBool>,
        conn: Arc<Mutex<Option<UnixStream>>>,
        req: Arc<Mutex<Option<UnixStream>>>,
        ctl: Receiver<Ctl>,
        adopted: Option<Session>,
    ) -> ExportTask {
        let socket = parts.cfg.socket.clone();
        ExportTask {
            listener,
            parts,
            socket,
            stop,
            conn,
            req,
            ctl,
            state: adopted.map_or(State::Idle, State::Session),
            started: false,
        }
    }

    fn listen_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Start serving a connected session: non-blocking, watched, visible to the API.
    fn attach(&self, s: &Session, cx: &mut CtlCx<'_>) -> std::io::Result<()> {
        s.peek.set_nonblocking(true)?;
        cx.watch(s.peek.as_raw_fd())?;
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = s.peek.try_clone().ok();
        Ok(())
    }

    /// The client is gone: stop its rings and forget its memory table.
    fn detach(&self, s: Session, cx: &mut CtlCx<'_>) {
        cx.unwatch(s.peek.as_raw_fd());
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.req.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let Session {
            handler, backend, ..
        } = s;
        drop(handler);
        // Stop every queue of this client before accepting the next one.
        backend.lock().unwrap_or_else(|e| e.into_inner()).stop_all();
        let c = &self.parts.counters;
        // The client's memory table is gone with it (faults stay counted).
        c.device_failed.store(false, Ordering::Relaxed);
        c.regions.store(0, Ordering::Relaxed);
        c.regions_sealed.store(0, Ordering::Relaxed);
        self.parts
            .log_counters
            .active
            .store(false, Ordering::Relaxed);
    }

    /// Serve the whole requests waiting on the session's connection.
    fn serve(&self, s: &mut Session, cx: &mut CtlCx<'_>) -> Served {
        for _ in 0..MESSAGES_PER_TURN {
            match peek(s.peek.as_raw_fd()) {
                Peek::Empty => {
                    s.partial_since = None;
                    cx.set_deadline(None);
                    return Served::Wait;
                }
                Peek::Closed => return Served::Closed(None),
                Peek::Partial => {
                    let now = Instant::now();
                    let since = *s.partial_since.get_or_insert(now);
                    if now.duration_since(since) >= MESSAGE_TIMEOUT {
                        return Served::Closed(Some(format!(
                            "a request stayed incomplete for {} s",
                            MESSAGE_TIMEOUT.as_secs()
                        )));
                    }
                    cx.set_deadline(Some(since + MESSAGE_TIMEOUT));
                    return Served::Wait;
                }
                Peek::Complete => {
                    s.partial_since = None;
                    cx.set_deadline(None);
                    let chan = backend_req::peek_backend_req_fd(&s.peek);
                    // A panic while serving one client must not take the export down.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        s.handler.handle_request()
                    }));
                    match r {
                        Ok(Ok(())) => {}
                        Ok(Err(VuError::Disconnected)) | Ok(Err(VuError::PartialMessage)) => {
                            return Served::Closed(None)
                        }
                        Ok(Err(e)) => return Served::Closed(Some(e.to_string())),
                        Err(_) => {
                            return Served::Closed(Some("the connection handler panicked".into()))
                        }
                    }
                    if chan.is_some() {
                        tracing::info!(socket = %self.socket.display(), "back-end request channel set up");
                        *self.req.lock().unwrap_or_else(|e| e.into_inner()) = chan;
                    }
                }
            }
        }
        Served::Again
    }

    /// A takeover request.
    fn control(&mut self, c: Ctl, cx: &mut CtlCx<'_>) -> Next {
        match c {
            Ctl::Freeze(tx) => {
                let state = std::mem::replace(&mut self.state, State::Idle);
                self.state = match state {
                    State::Frozen(s, r) => {
                        let _ = tx.send(Err(std::io::Error::other("already frozen")));
                        State::Frozen(s, r)
                    }
                    State::Idle => {
                        cx.unwatch(self.listen_fd());
                        let l = dup_fd(self.listen_fd()).map(|listener| Frozen {
                            listener,
                            session: None,
                        });
                        let _ = tx.send(l);
                        State::Frozen(None, Vec::new())
                    }
                    State::Session(s) => {
                        cx.unwatch(s.peek.as_raw_fd());
                        cx.set_deadline(None);
                        let (r, running) = self.freeze_session(&s);
                        let _ = tx.send(r);
                        State::Frozen(Some(s), running)
                    }
                };
                Next::Keep
            }
            Ctl::Thaw => {
                let state = std::mem::replace(&mut self.state, State::Idle);
                self.state = match state {
                    State::Frozen(None, _) => {
                        if let Err(e) = cx.watch(self.listen_fd()) {
                            tracing::error!(socket = %self.socket.display(), "thaw: cannot watch the listening socket: {e}");
                        }
                        State::Idle
                    }
                    State::Frozen(Some(s), running) => {
                        let mut b = s.backend.lock().unwrap_or_else(|e| e.into_inner());
                        b.thaw(&running);
                        tracing::info!(export = %b.name, "takeover abandoned: virtqueues restarted");
                        drop(b);
                        if let Err(e) = cx.watch(s.peek.as_raw_fd()) {
                            tracing::error!(socket = %self.socket.display(), "thaw: cannot watch the connection: {e}");
                        }
                        State::Session(s)
                    }
                    other => other,
                };
                Next::Keep
            }
            Ctl::Release => {
                // The new process serves this export now: our copies of the sockets
                // close, the sockets themselves stay open and linked.
                cx.unwatch(self.listen_fd());
                match std::mem::replace(&mut self.state, State::Idle) {
                    State::Session(s) | State::Frozen(Some(s), _) => {
                        cx.unwatch(s.peek.as_raw_fd());
                        // Dropping the back-end would stop rings the new process runs.
                        std::mem::forget(s.backend);
                    }
                    _ => {}
                }
                Next::Done
            }
        }
    }

    /// Stop every ring of the client (draining its requests) and hand its state out.
    fn freeze_session(&self, s: &Session) -> (std::io::Result<Frozen>, Vec<bool>) {
        let mut b = s.backend.lock().unwrap_or_else(|e| e.into_inner());
        let running = b.running();
        let t0 = Instant::now();
        b.stop_all();
        let chan = self
            .req
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.try_clone().map(OwnedFd::from));
        let r = (|| {
            let listener = dup_fd(self.listen_fd())?;
            let chan = chan.transpose()?;
            let session = b.snapshot(&self.socket, dup_fd(s.peek.as_raw_fd())?, chan, &running)?;
            Ok(Frozen {
                listener,
                session: Some(session),
            })
        })();
        tracing::info!(export = %b.name, drained_us = t0.elapsed().as_micros() as u64, "vhost-user session frozen for a takeover");
        (r, running)
    }

    /// Stop: the client is disconnected and the listening socket shut down.
    fn finish(&mut self, cx: &mut CtlCx<'_>) -> Next {
        cx.unwatch(self.listen_fd());
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Session(s) | State::Frozen(Some(s), _) => {
                let _ = s.peek.shutdown(std::net::Shutdown::Both);
                self.detach(s, cx);
            }
            _ => {}
        }
        // SAFETY: the listener is ours and open until this task is dropped; shutdown only
        // changes its state (a copy inherited elsewhere sees it closed too, as before).
        unsafe { libc::shutdown(self.listen_fd(), libc::SHUT_RDWR) };
        Next::Done
    }
}

impl CtlTask for ExportTask {
    fn run(&mut self, cx: &mut CtlCx<'_>) -> Next {
        if !self.started {
            self.started = true;
            if let Err(e) = self.listener.set_nonblocking(true) {
                tracing::error!(socket = %self.socket.display(), "listener: {e}");
            }
            let state = std::mem::replace(&mut self.state, State::Idle);
            self.state = match state {
                State::Session(s) => match self.attach(&s, cx) {
                    Ok(()) => {
                        tracing::info!(socket = %self.socket.display(), "vhost-user client resumed after a takeover");
                        State::Session(s)
                    }
                    Err(e) => {
                        tracing::warn!(socket = %self.socket.display(), "the taken-over connection cannot be served: {e}");
                        self.detach(s, cx);
                        State::Idle
                    }
                },
                other => other,
            };
            if matches!(self.state, State::Idle) {
                if let Err(e) = cx.watch(self.listen_fd()) {
                    tracing::error!(socket = %self.socket.display(), "cannot watch the listening socket: {e}");
                }
            }
        }
        while let Ok(c) = self.ctl.try_recv() {
            if self.control(c, cx) == Next::Done {
                return Next::Done;
            }
        }
        if self.stop.load(Ordering::Acquire) {
            return self.finish(cx);
        }
        loop {
            match std::mem::replace(&mut self.state, State::Idle) {
                State::Frozen(s, r) => {
                    self.state = State::Frozen(s, r);
                    return Next::Keep;
                }
                State::Idle => {
                    match self.listener.accept() {
                        Ok(Some(stream)) => {
                            let backend = self.parts.backend();
                            let h = BackendReqHandler::from_stream(stream, backend.clone());
                            match Session::new(h, backend) {
                                Ok(s) => match self.attach(&s, cx) {
                                    Ok(()) => {
                                        cx.unwatch(self.listen_fd());
                                        tracing::info!(socket = %self.socket.display(), "vhost-user client connected");
                                        self.state = State::Session(s);
                                    }
                                    Err(e) => {
                                        tracing::warn!(socket = %self.socket.display(), "cannot serve the new connection: {e}");
                                        self.detach(s, cx);
                                    }
                                },
                                Err(e) => {
                                    tracing::warn!(socket = %self.socket.display(), "accept: {e}")
                                }
                            }
                        }
                        Ok(None) => return Next::Keep,
                        Err(e) => {
                            tracing::warn!(socket = %self.socket.display(), "accept: {e}");
                            // Try again shortly rather than spin on a broken listener.
                            cx.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
                            return Next::Keep;
                        }
                    }
                }
                State::Session(mut s) => match self.serve(&mut s, cx) {
                    Served::Wait => {
                        self.state = State::Session(s);
                        return Next::Keep;
                    }
                    Served::Again => {
                        self.state = State::Session(s);
                        cx.again();
                        return Next::Keep;
                    }
                    Served::Closed(why) => {
                        cx.set_deadline(None);
                        match why {
                            None => {
                                tracing::info!(socket = %self.socket.display(), "vhost-user client disconnected")
                            }
                            Some(e) => {
                                tracing::warn!(socket = %self.socket.display(), "vhost-user connection closed: {e}")
                            }
                        }
                        self.detach(s, cx);
                        if let Err(e) = cx.watch(self.listen_fd()) {
                            tracing::error!(socket = %self.socket.display(), "cannot watch the listening socket: {e}");
                        }
                    }
                },
            }
        }
    }
}
