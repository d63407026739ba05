//! The daemon's end of a disk's external function (protocol: `nvmux_extfn::proto`).
//!
//! [`External`] owns the listening socket and a task on the process's control threads
//! ([`nvmux_core::ctlpoll`], not a thread per disk) that accepts one function process at
//! a time, shakes hands (one handshake at a time, at most [`HANDSHAKE_TIMEOUT`] long,
//! without blocking the control thread) and then watches the connection: when the process
//! exits or dies, the socket reaches EOF, the connection's generation ends, and every
//! disk queue with a ring to it is woken to fail or re-route what it had in flight. A new
//! process can attach at any time.
//!
//! [`ExtRing`] is one disk queue's ring: created by the queue's worker the first time it
//! routes a command to the function, single producer, single consumer, no locks. Everything
//! the function writes into it (completion entries, indices, read data) is treated as
//! untrusted: a bad index or an id that is not outstanding breaks the ring and detaches
//! the function; it never reaches beyond the ring's mapping or completes a command twice.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmux_core::ctlpoll::{CtlCx, CtlHandle, CtlTask, Next};
use nvmux_core::eventfd::{signal_fd, EventFd};
use nvmux_core::{IoCommand, Status};
use nvmux_extfn::proto::{self, hdr, Cqe, Layout, RingView, Sqe};

/// What happens to commands for the function while it is not attached (or after it died
/// with them in flight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Complete them with Namespace Not Ready (a retryable NVMe status).
    Fail,
    /// Send them through the disk's function chain, as if no function were configured.
    Chain,
}

impl OnFailure {
    pub fn name(self) -> &'static str {
        match self {
            OnFailure::Fail => "fail",
            OnFailure::Chain => "chain",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ExternalConfig {
    pub socket: PathBuf,
    pub on_failure: OnFailure,
    /// Entries per ring (a power of two, up to 1024).
    pub depth: u32,
    /// Data bytes per command (a multiple of 4096); larger commands are handled as by
    /// `on_failure`.
    pub max_io: u32,
}

/// The attached process.
pub(crate) struct Conn {
    pub gen: u64,
    pub name: String,
    pub pid: i32,
    sock: UnixStream,
    /// Serialises sends from several workers.
    send: Mutex<()>,
    /// Duplicates of the wake eventfds of the queues with a ring (by ring id), written at
    /// detach; a ring's entry goes when the ring does.
    wakers: Mutex<Vec<(u32, OwnedFd)>>,
    next_ring: AtomicU32,
}

impl Conn {
    fn send(&self, msg: &[u8; proto::MSG_SIZE], fds: &[RawFd]) -> io::Result<()> {
        let _g = self.send.lock().unwrap_or_else(|e| e.into_inner());
        nvmux_extfn::sock::send_with_fds(self.sock.as_raw_fd(), msg, fds)
    }

    /// End the connection (the listener task then detaches it).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

/// What the API shows of an external function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalStatus {
    pub attached: bool,
    pub name: String,
    pub pid: i32,
    pub attaches: u64,
    pub detaches: u64,
}

pub struct External {
    pub cfg: ExternalConfig,
    disk: String,
    block_size: u32,
    num_blocks: AtomicU64,
    /// Bumped at every attach and detach: a ring from an older generation is dead.
    gen: AtomicU64,
    conn: Mutex<Option<Arc<Conn>>>,
    stopping: AtomicBool,
    /// The listener task on a control thread.
    task: Mutex<Option<CtlHandle>>,
    attaches: AtomicU64,
    detaches: AtomicU64,
}

impl External {
    /// Serve function processes on `listener` (bound by the daemon, which checks the path).
    pub fn start(
        cfg: ExternalConfig,
        listener: UnixListener,
        disk: &str,
        block_size: u32,
        num_blocks: u64,
    ) -> io::Result<Arc<External>> {
        if Layout::new(cfg.depth, cfg.max_io).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "depth {} and max_io {} do not make a ring (depth a power of two up to {}, max_io a multiple of 4096 up to {})",
                    cfg.depth,
                    cfg.max_io,
                    proto::MAX_DEPTH,
                    proto::MAX_SLOT
                ),
            ));
        }
        let ext = Arc::new(External {
            cfg,
            disk: disk.to_string(),
            block_size,
            num_blocks: AtomicU64::new(num_blocks),
            gen: AtomicU64::new(0),
            conn: Mutex::new(None),
            stopping: AtomicBool::new(false),
            task: Mutex::new(None),
            attaches: AtomicU64::new(0),
            detaches: AtomicU64::new(0),
        });
        listener.set_nonblocking(true)?;
        let task = ListenTask {
            ext: ext.clone(),
            listener,
            started: false,
            hello: None,
            watched: None,
        };
        let h = nvmux_core::ctlpoll::global()
            .map_err(|e| io::Error::other(e.to_string()))?
            .add(Box::new(task));
        *ext.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(ext)
    }

    pub fn set_num_blocks(&self, n: u64) {
        self.num_blocks.store(n, Ordering::Relaxed);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    pub(crate) fn conn(&self) -> Option<Arc<Conn>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn status(&self) -> ExternalStatus {
        let c = self.conn();
        ExternalStatus {
            attached: c.is_some(),
            name: c.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            pid: c.as_ref().map_or(0, |c| c.pid),
            attaches: self.attaches.load(Ordering::Relaxed),
            detaches: self.detaches.load(Ordering::Relaxed),
        }
    }

    /// Stop listening and detach the process; rings fail over as for a dead process.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            t.wake();
            t.wait_done();
        }
        let _ = std::fs::remove_file(&self.cfg.socket);
    }

    /// Answer a function's hello (read whole by the listener task); the connection if
    /// it is now attached.
    fn welcome(
        &self,
        mut s: UnixStream,
        b: &[u8; proto::MSG_SIZE],
    ) -> io::Result<Option<Arc<Conn>>> {
        let Some(h) = proto::Hello::decode(b) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an nvmux function (bad hello)",
            ));
        };
        let mut w = proto::Welcome {
            version: proto::VERSION,
            status: proto::WELCOME_OK,
            block_size: self.block_size,
            depth: self.cfg.depth,
            num_blocks: self.num_blocks.load(Ordering::Relaxed),
            max_io: self.cfg.max_io,
            disk: self.disk.clone(),
        };
        if h.version != proto::VERSION {
            w.status = proto::WELCOME_VERSION;
        } else if self.conn().is_some() {
            w.status = proto::WELCOME_BUSY;
        }
        // The first bytes on a fresh socket: its buffer has room (a would-block fails the
        // handshake rather than wait).
        s.write_all(&w.encode())?;
        if w.status != proto::WELCOME_OK {
            tracing::warn!(disk = %self.disk, function = %h.name, status = w.status, "external function refused");
            return Ok(None);
        }
        let pid = peer_pid(&s);
        let conn = Arc::new(Conn {
            gen: self.gen.fetch_add(1, Ordering::AcqRel) + 1,
            name: h.name,
            pid,
            sock: s,
            send: Mutex::new(()),
            wakers: Mutex::new(Vec::new()),
            next_ring: AtomicU32::new(0),
        });
        tracing::info!(disk = %self.disk, function = %conn.name, pid, "external function attached");
        self.attaches.fetch_add(1, Ordering::Relaxed);
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        Ok(Some(conn))
    }

    fn detach(&self, why: &str) {
        let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        self.gen.fetch_add(1, Ordering::AcqRel);
        self.detaches.fetch_add(1, Ordering::Relaxed);
        c.shutdown();
        for (_, w) in c.wakers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            signal_fd(w.as_raw_fd());
        }
        tracing::warn!(disk = %self.disk, function = %c.name, pid = c.pid, "external function detached: {why}");
    }
}

/// How long a connecting process has to send its whole hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A hello being read (one at a time: others wait in the listen backlog).
struct Hello {
    s: UnixStream,
    buf: [u8; proto::MSG_SIZE],
    got: usize,
    deadline: Instant,
}

/// An external function's listening socket and connection, as a task on the control
/// threads.
struct ListenTask {
    ext: Arc<External>,
    listener: UnixListener,
    started: bool,
    hello: Option<Hello>,
    /// The attached connection whose socket the task watches for its end.
    watched: Option<Arc<Conn>>,
}

/// What a read of a hello came to.
enum HelloRead {
    Whole,
    More,
    Failed(String),
}

impl ListenTask {
    /// Read what the attached process sent: any byte, or the end, detaches it.
    fn check_conn(&mut self, cx: &mut CtlCx<'_>) {
        let Some(c) = self.watched.clone() else {
            return;
        };
        let why = loop {
            let mut b = [0u8; 64];
            match (&c.sock).read(&mut b) {
                Ok(0) => break "the process closed its connection".to_string(),
                Ok(_) => break "unexpected message from the function".to_string(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break format!("connection error: {e}"),
            }
        };
        cx.unwatch(c.sock.as_raw_fd());
        self.watched = None;
        self.ext.detach(&why);
    }

    fn read_hello(h: &mut Hello) -> HelloRead {
        while h.got < h.buf.len() {
            match (&h.s).read(&mut h.buf[h.got..]) {
                Ok(0) => return HelloRead::Failed("closed before its hello".into()),
                Ok(k) => h.got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HelloRead::More,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return HelloRead::Failed(e.to_string()),
            }
        }
        HelloRead::Whole
    }

    /// Go on with the handshake in progress; true while it still waits on the process.
    fn handshake(&mut self, cx: &mut CtlCx<'_>) -> bool {
        let Some(h) = self.hello.as_mut() else {
            return false;
        };
        let r = match Self::read_hello(h) {
            HelloRead::More if Instant::now() >= h.deadline => {
                HelloRead::Failed(format!("no hello within {} s", HANDSHAKE_TIMEOUT.as_secs()))
            }
            r => r,
        };
        let disk = &self.ext.disk;
        match r {
            HelloRead::More => {
                cx.set_deadline(Some(h.deadline));
                return true;
            }
            HelloRead::Failed(e) => {
                tracing::warn!(%disk, "external function handshake failed: {e}");
            }
            HelloRead::Whole => {}
        }
        let Some(h) = self.hello.take() else {
            return false;
        };
        cx.unwatch(h.s.as_raw_fd());
        cx.set_deadline(None);
        if h.got < h.buf.len() {
            return false; // failed above
        }
        match self.ext.welcome(h.s, &h.buf) {
            Ok(Some(c)) => {
                if let Err(e) = cx.watch(c.sock.as_raw_fd()) {
                    tracing::warn!(%disk, "cannot watch the function's connection: {e}");
                }
                self.watched = Some(c);
                // It may have gone already (before the watch).
                self.check_conn(cx);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(%disk, "external function handshake failed: {e}"),
        }
        false
    }
}

impl CtlTask for ListenTask {
    fn run(&mut self, cx: &mut CtlCx<'_>) -> Next {
        if self.ext.stopping.load(Ordering::Acquire) {
            cx.unwatch(self.listener.as_raw_fd());
            if let Some(h) = self.hello.take() {
                cx.unwatch(h.s.as_raw_fd());
            }
            if let Some(c) = self.watched.take() {
                cx.unwatch(c.sock.as_raw_fd());
            }
            self.ext.detach("the disk's external function was removed");
            return Next::Done;
        }
        if !self.started {
            self.started = true;
            if let Err(e) = cx.watch(self.listener.as_raw_fd()) {
                tracing::error!(disk = %self.ext.disk, "external function listener: cannot watch the socket: {e}");
            }
        }
        self.check_conn(cx);
        if self.handshake(cx) {
            return Next::Keep; // one handshake at a time
        }
        match self.listener.accept() {
            Ok((s, _)) => {
                let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
                match s
                    .set_nonblocking(true)
                    .and_then(|_| cx.watch(s.as_raw_fd()))
                {
                    Ok(()) => {
                        self.hello = Some(Hello {
                            s,
                            buf: [0; proto::MSG_SIZE],
                            got: 0,
                            deadline,
                        });
                        cx.set_deadline(Some(deadline));
                    }
                    Err(e) => {
                        tracing::warn!(disk = %self.ext.disk, "external function accept: {e}")
                    }
                }
                // Read what came with it, and then the next connection, on the next turn.
                cx.again();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(disk = %self.ext.disk, "external function accept failed: {e}");
                cx.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
            }
        }
        Next::Keep
    }
}

fn peer_pid(s: &UnixStream) -> i32 {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        cred.pid
    } else {
        0
    }
}

/// The seals every ring memfd carries before it is handed to the function.
pub const RING_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A memfd of `size` bytes, sealed with [`RING_SEALS`].
///
/// The function process (maybe another user) gets this descriptor. Without the seals it
/// could `ftruncate` the file, and the daemon's next access to the ring would die with
/// SIGBUS; with them, `ftruncate` fails with EPERM, and F_SEAL_SEAL keeps anyone from
/// adding a seal (F_SEAL_WRITE would make the daemon's stores fault). Sealing failure
/// fails the attach.
pub fn sealed_memfd(size: usize) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name; checked below.
    let mfd = unsafe {
        libc::memfd_create(
            c"nvmux-extfn-ring".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if mfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let memfd = unsafe { OwnedFd::from_raw_fd(mfd) };
    // SAFETY: plain syscalls on our memfd.
    if unsafe { libc::ftruncate(memfd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on our memfd with integer arguments.
    if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, RING_SEALS) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("seal the external-function ring memfd: {e}"),
        ));
    }
    Ok(memfd)
}

/// Why a command could not be handed to the ring now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SubmitError {
    /// Every entry is in use: retry when one completes.
    Full,
    /// The data does not fit a slot.
    TooBig,
}

const FREE: u32 = u32::MAX;

/// One disk queue's ring to the attached function.
pub(crate) struct ExtRing {
    conn: Arc<Conn>,
    pub gen: u64,
    id: u32,
    map: proto::MappedRing,
    sq_efd: EventFd,
    free: Vec<u16>,
    /// Ring entry id → the router slot it carries (`FREE` if none).
    owner: Vec<u32>,
    sq_tail: u32,
    cq_head: u32,
    unpublished: bool,
    outstanding: usize,
}

impl Drop for ExtRing {
    fn drop(&mut self) {
        let m = proto::RingMsg {
            kind: proto::MSG_REMOVE_RING,
            ring: self.id,
            depth: 0,
            size: 0,
            slot_size: 0,
        };
        let _ = self.conn.send(&m.encode(), &[]);
        self.conn
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.id);
    }
}

impl ExtRing {
    /// Create a ring whose completions wake `wake_fd`, and hand it to the function.
    pub fn create(ext: &External, conn: Arc<Conn>, wake_fd: RawFd) -> io::Result<ExtRing> {
        let layout = Layout::new(ext.cfg.depth, ext.cfg.max_io)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad ring geometry"))?;
        let memfd = sealed_memfd(layout.size)?;
        let map = proto::MappedRing::map(memfd.as_raw_fd(), layout)?;
        map.view.init_header();
        let sq_efd = EventFd::new()?;
        // SAFETY: dup of a descriptor the caller keeps open for the ring's life; checked.
        let wake_dup = unsafe { libc::fcntl(wake_fd, libc::F_DUPFD_CLOEXEC, 0) };
        if wake_dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let wake_dup = unsafe { OwnedFd::from_raw_fd(wake_dup) };
        let id = conn.next_ring.fetch_add(1, Ordering::Relaxed);
        let ring = ExtRing {
            gen: conn.gen,
            id,
            map,
            sq_efd,
            free: (0..layout.depth as u16).rev().collect(),
            owner: vec![FREE; layout.depth as usize],
            sq_tail: 0,
            cq_head: 0,
            unpublished: false,
            outstanding: 0,
            conn,
        };
        let m = proto::RingMsg {
            kind: proto::MSG_ADD_RING,
            ring: id,
            depth: layout.depth,
            size: layout.size as u64,
            slot_size: layout.slot_size,
        };
        ring.conn.send(
            &m.encode(),
            &[memfd.as_raw_fd(), ring.sq_efd.as_raw_fd(), wake_fd],
        )?;
        ring.conn
            .wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, wake_dup));
        Ok(ring)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Hand `cmd` (router slot `slot`) to the function; write data is copied into its slot.
    pub fn submit(&mut self, slot: u32, cmd: &IoCommand, cookie: u64) -> Result<(), SubmitError> {
        let len = cmd.sg.len();
        if len > self.map.view.layout.slot_size as u64 {
            return Err(SubmitError::TooBig);
        }
        let Some(id) = self.free.pop() else {
            return Err(SubmitError::Full);
        };
        if cmd.opcode == nvmux_core::Opcode::Write {
            if let Some(p) = self.map.view.slot(id) {
                // SAFETY: the slot has slot_size >= len bytes in our mapping; the SG list's
                // segments are readable for the command's life (its keepalive).
                unsafe {
                    cmd.sg
                        .copy_to(std::slice::from_raw_parts_mut(p, len as usize))
                };
            }
        }
        self.map.view.write_sqe(
            self.sq_tail,
            &Sqe {
                id,
                opcode: cmd.opcode as u8,
                flags: if cmd.fua { proto::SQE_FUA } else { 0 },
                nsid: cmd.nsid,
                slba: cmd.slba,
                nlb: cmd.nlb,
                data_len: len as u32,
                cookie,
            },
        );
        self.sq_tail = self.sq_tail.wrapping_add(1);
        self.owner[id as usize] = slot;
        self.outstanding += 1;
        self.unpublished = true;
        Ok(())
    }

    /// Publish what was submitted; wake the function if it sleeps.
    pub fn kick(&mut self) {
        if !self.unpublished {
            return;
        }
        self.unpublished = false;
        self.map.view.store(hdr::SQ_TAIL, self.sq_tail);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.map.view.load(hdr::FN_FLAGS) & proto::FN_NEED_WAKEUP != 0 {
            self.sq_efd.signal();
        }
    }

    /// Take the published completions: `(router slot, ring id, entry)` each. `Err` if the
    /// function broke the protocol (the ring must then be abandoned).
    pub fn reap(&mut self, out: &mut Vec<(u32, u16, Cqe)>) -> Result<(), &'static str> {
        reap_cq(
            &self.map.view,
            &mut self.owner,
            &mut self.cq_head,
            &mut self.outstanding,
            out,
        )
    }

    /// Copy a read's data from entry `id`'s slot into `cmd`'s buffers.
    pub fn copy_read(&self, id: u16, cmd: &IoCommand) {
        if let Some(p) = self.map.view.slot(id) {
            let len = (cmd.sg.len() as usize).min(self.map.view.layout.slot_size as usize);
            // SAFETY: the slot has slot_size bytes in our mapping (the function may still
            // write them: we copy bytes, whatever they are); the SG list is writable.
            unsafe { cmd.sg.copy_from(std::slice::from_raw_parts(p, len)) };
        }
    }

    /// Entry `id` may be reused.
    pub fn release(&mut self, id: u16) {
        self.free.push(id);
    }

    /// The router slots of every command still in flight (to fail or re-route them).
    pub fn drain_owners(&mut self) -> Vec<u32> {
        let v: Vec<u32> = self.owner.iter().copied().filter(|&s| s != FREE).collect();
        self.owner.fill(FREE);
        self.outstanding = 0;
        v
    }

    /// Detach the function: it broke the protocol.
    pub fn break_conn(&self, why: &str) {
        tracing::error!(ring = self.id, function = %self.conn.name, "external function broke the ring protocol: {why}");
        self.conn.shutdown();
    }
}

/// Status for commands that cannot reach the function.
pub const NOT_READY: Status = Status::NAMESPACE_NOT_READY;

/// The completion side of a ring, on its own so that it can be fuzzed over arbitrary
/// ring contents: every entry between our head and the function's tail must name an
/// entry in flight (`owner[id] != FREE`), and each completes exactly once.
pub fn reap_cq(
    view: &RingView,
    owner: &mut [u32],
    cq_head: &mut u32,
    outstanding: &mut usize,
    out: &mut Vec<(u32, u16, Cqe)>,
) -> Result<(), &'static str> {
    let tail = view.load(hdr::CQ_TAIL);
    let n = tail.wrapping_sub(*cq_head);
    if n as usize > *outstanding {
        return Err("more completions than commands in flight");
    }
    for _ in 0..n {
        let c = view.read_cqe(*cq_head);
        *cq_head = cq_head.wrapping_add(1);
        let slot = match owner.get(c.id as usize) {
            Some(&s) if s != FREE => s,
            _ => return Err("a completion for an entry that is not in flight"),
        };
        owner[c.id as usize] = FREE;
        *outstanding -= 1;
        out.push((slot, c.id, c));
    }
    if n > 0 {
        view.store(hdr::CQ_HEAD, *cq_head);
    }
    Ok(())
}

/// An entry that carries no command.
pub const FREE_ENTRY: u32 = FREE;

#[cfg(test)]
mod seal_tests {
    use super::*;

    #[test]
    fn a_ring_memfd_cannot_be_resized_or_resealed() {
        let fd = sealed_memfd(1 << 16).expect("sealed memfd");
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl and ftruncate on our memfd.
        unsafe {
            assert_eq!(libc::fcntl(raw, libc::F_GET_SEALS), RING_SEALS);
            for len in [0, 4096, 1 << 20] {
                assert_eq!(libc::ftruncate(raw, len), -1, "ftruncate to {len}");
                assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
            }
            assert_eq!(libc::fcntl(raw, libc::F_ADD_SEALS, libc::F_SEAL_WRITE), -1);
            assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
            assert_eq!(
                libc::ftruncate(raw, 1 << 16),
                0,
                "the same size is no change"
            );
        }
    }
}
