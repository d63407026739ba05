//! A vfio-user connection, served without blocking, and the listening socket's task on
//! the process's control threads ([`nvmux_core::ctlpoll`]).
//!
//! A request is handled only once it is whole in the socket's receive queue: the 16-byte
//! header is peeked (`MSG_PEEK`, which installs no descriptors), its size checked against
//! [`MAX_MSG_SIZE`] (a bigger or smaller size ends the connection after an error reply),
//! and `FIONREAD` must show the whole message. Then the message is received with its
//! descriptors (`SCM_RIGHTS`, at most [`MAX_MSG_FDS`]; each becomes an `OwnedFd` at once,
//! so every path that refuses the message closes them). A client that sends part of a
//! message and stalls for [`MESSAGE_TIMEOUT`] loses its connection. Replies go out on the
//! non-blocking socket; a client that does not read its replies until its buffer fills
//! loses its connection. One turn serves at most [`MESSAGES_PER_TURN`] requests.
//!
//! The first request must be VERSION. A malformed request (bad size, payload, flags or
//! descriptor count) gets an error reply (unless it asked for none) and ends the
//! connection; a well-formed request the device refuses (a region access out of range,
//! an overlapping DMA_MAP, an unknown command) gets an error reply and the connection
//! goes on.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::ctlpoll::{CtlCx, CtlTask, Next};
use nvmux_core::unixsock::{peek_queued, Queued};

use crate::device::VfioDevice;
use crate::proto::{
    self, cmd, put_u32, put_u64, Errno, Header, Refused, Request, DMA_UNMAP_ALL,
    DMA_UNMAP_GET_DIRTY_BITMAP, EINVAL, EPROTO, HDR, MAX_MSG_FDS, MAX_MSG_SIZE,
};

/// A request still incomplete this long after its first byte arrived ends the
/// connection.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests one connection serves before the other tasks of its thread get a turn.
pub const MESSAGES_PER_TURN: usize = 32;

const STOPPING: &str = "the server stops";

/// What a connection did, for logs, tests and metrics.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub dma_maps: AtomicU64,
    pub dma_unmaps: AtomicU64,
    pub region_reads: AtomicU64,
    pub region_writes: AtomicU64,
}

/// What a turn of [`Conn::serve`] ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Waiting for more bytes (a partial request waits at most until `deadline`).
    Wait { deadline: Option<Instant> },
    /// More requests may be queued: run again after the others.
    Again,
    /// The connection is finished: None when the client hung up, else why it was cut.
    Closed(Option<String>),
}

enum Peek {
    Empty,
    Partial,
    /// A whole message of this many bytes.
    Whole(Header),
    /// A header whose size breaks the limits.
    BadSize(Header, String),
    Closed,
}

fn peek(fd: RawFd) -> Peek {
    let mut hdr = [0u8; HDR];
    let (n, total) = match peek_queued(fd, &mut hdr) {
        Queued::Empty => return Peek::Empty,
        Queued::Closed => return Peek::Closed,
        Queued::Bytes { copied, total } => (copied, total),
    };
    let Some(h) = Header::parse(&hdr[..n]) else {
        return Peek::Partial;
    };
    match h.check_size() {
        Err(e) => Peek::BadSize(h, e),
        Ok(size) if total >= size => Peek::Whole(h),
        Ok(_) => Peek::Partial,
    }
}

/// Receive exactly `buf.len()` bytes (known to be queued) and their descriptors.
fn recv_whole(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), String> {
    const CMSG_WORDS: usize = 64; // 512 bytes: room for MAX_MSG_FDS descriptors
    let mut got = 0;
    while got < buf.len() {
        let mut cbuf = [0u64; CMSG_WORDS];
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: buf.len() - got,
        };
        // SAFETY: a zeroed msghdr is valid; we point it at live buffers below.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        // Room for MAX_MSG_FDS descriptors only: more are truncated (and closed by
        // the kernel), which ends the connection below.
        // SAFETY: CMSG_SPACE is a pure computation.
        mh.msg_controllen = unsafe { libc::CMSG_SPACE((MAX_MSG_FDS * 4) as u32) } as usize;
        // SAFETY: mh points at live, writable buffers of the lengths given.
        let n = unsafe { libc::recvmsg(fd, &mut mh, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("recvmsg: {e}"));
        }
        // Take ownership of every descriptor before anything else can fail.
        // SAFETY: the CMSG_* walk stays inside msg_control as the kernel filled it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&mh);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let len = ((*c).cmsg_len as usize).saturating_sub(data as usize - c as usize);
                    for i in 0..len / 4 {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&mh, c);
            }
        }
        if mh.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(format!(
                "more than {MAX_MSG_FDS} descriptors in one message"
            ));
        }
        if fds.len() > MAX_MSG_FDS {
            return Err(format!(
                "{} descriptors in one message (at most {MAX_MSG_FDS})",
                fds.len()
            ));
        }
        if n == 0 {
            return Err("the client hung up inside a message".into());
        }
        got += n as usize;
    }
    Ok(())
}

/// One client connection and the device it drives.
pub struct Conn<D: VfioDevice> {
    sock: UnixStream,
    dev: D,
    buf: Vec<u8>,
    out: Vec<u8>,
    negotiated: bool,
    partial_since: Option<Instant>,
    pub stats: Arc<ConnStats>,
}

impl<D: VfioDevice> Conn<D> {
    /// Serve `sock` (made non-blocking here) with `dev`.
    pub fn new(sock: UnixStream, dev: D) -> std::io::Result<Conn<D>> {
        sock.set_nonblocking(true)?;
        Ok(Conn {
            sock,
            dev,
            buf: vec![0; MAX_MSG_SIZE],
            out: Vec::with_capacity(MAX_MSG_SIZE),
            negotiated: false,
            partial_since: None,
            stats: Arc::new(ConnStats::default()),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    pub fn device(&self) -> &D {
        &self.dev
    }
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// End the connection: the device is reset and the client's DMA space forgotten.
    pub fn finish(mut self) -> D {
        self.dev.reset();
        self.dev.dma().clear();
        self.dev
    }

    /// Serve the whole requests waiting on the socket.
    pub fn serve(&mut self) -> Step {
        for _ in 0..MESSAGES_PER_TURN {
            match peek(self.sock.as_raw_fd()) {
                Peek::Empty => {
                    self.partial_since = None;
                    return Step::Wait { deadline: None };
                }
                Peek::Partial => {
                    let since = *self.partial_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= MESSAGE_TIMEOUT {
                        return Step::Closed(Some(format!(
                            "a request stayed incomplete for {} s",
                            MESSAGE_TIMEOUT.as_secs()
                        )));
                    }
                    return Step::Wait {
                        deadline: Some(since + MESSAGE_TIMEOUT),
                    };
                }
                Peek::Closed => return Step::Closed(None),
                Peek::BadSize(h, why) => {
                    self.refuse(&h, EINVAL);
                    return Step::Closed(Some(why));
                }
                Peek::Whole(h) => {
                    self.partial_since = None;
                    if let Err(why) = self.one(h) {
                        return Step::Closed(Some(why));
                    }
                }
            }
        }
        Step::Again
    }

    /// Send an error reply to `h` if it wants one (best effort: the connection may be
    /// about to close).
    fn refuse(&mut self, h: &Header, errno: Errno) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        if h.is_request() && !h.no_reply() {
            let mut out = std::mem::take(&mut self.out);
            proto::error_reply(h, errno, &mut out);
            let _ = self.send(&out);
            self.out = out;
        }
    }

    fn send(&self, b: &[u8]) -> Result<(), String> {
        let mut off = 0;
        while off < b.len() {
            // SAFETY: sending from a live slice; MSG_NOSIGNAL: a closed peer is an error,
            // not a signal.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    b[off..].as_ptr().cast(),
                    b.len() - off,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!(
                    "sending a reply: {e} (the client does not read its replies)"
                ));
            }
            off += n as usize;
        }
        Ok(())
    }

    /// Receive and serve one whole request.
    fn one(&mut self, h: Header) -> Result<(), String> {
        let size = h.size as usize;
        let mut fds = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        let r = match buf.get_mut(..size) {
            Some(b) => recv_whole(self.sock.as_raw_fd(), b, &mut fds),
            None => Err(format!("message size {size} exceeds the buffer")),
        };
        let r = r.and_then(|()| self.dispatch(&h, buf.get(HDR..size).unwrap_or(&[]), fds));
        self.buf = buf;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        r
    }

    fn dispatch(&mut self, h: &Header, body: &[u8], fds: Vec<OwnedFd>) -> Result<(), String> {
        let name = proto::command_name(h.command);
        if !h.is_request() {
            self.refuse(h, EPROTO);
            return Err(format!(
                "a message of type {} from the client (only requests are expected)",
                h.flags & 0xf
            ));
        }
        if !self.negotiated && h.command != cmd::VERSION {
            self.refuse(h, EINVAL);
            return Err(format!("{name} before VERSION"));
        }
        let req = match proto::decode(h, body, fds.len()) {
            Ok(r) => r,
            Err(Refused { errno, msg, fatal }) => {
                self.refuse(h, errno);
                if fatal {
                    return Err(msg);
                }
                tracing::debug!("vfio-user: {msg}");
                return Ok(());
            }
        };
        let mut out = std::mem::take(&mut self.out);
        proto::begin_reply(h, &mut out);
        let r = self.handle(req, fds, &mut out);
        let res = match r {
            Ok(()) => {
                if h.no_reply() {
                    Ok(())
                } else {
                    proto::finish_reply(&mut out);
                    self.send(&out)
                }
            }
            Err(Refused { errno, msg, fatal }) => {
                tracing::debug!("vfio-user: {name} refused: {msg}");
                self.refuse(h, errno);
                if fatal {
                    Err(msg)
                } else {
                    Ok(())
                }
            }
        };
        self.out = out;
        res
    }

    fn handle(
        &mut self,
        req: Request<'_>,
        mut fds: Vec<OwnedFd>,
        out: &mut Vec<u8>,
    ) -> Result<(), Refused> {
        match req {
            Request::Version { major, minor, caps } => {
                if self.negotiated {
                    return Err(Refused::fatal(EINVAL, "a second VERSION"));
                }
                self.negotiated = true;
                tracing::info!(
                    "vfio-user: client version {major}.{minor}, max_msg_fds {}, pgsizes {:#x}{}",
                    caps.max_msg_fds,
                    caps.pgsizes,
                    if caps.migration {
                        ", offers migration (not supported)"
                    } else {
                        ""
                    }
                );
                proto::put_u16(out, proto::VERSION_MAJOR);
                proto::put_u16(out, proto::VERSION_MINOR);
                out.extend_from_slice(proto::server_caps().as_bytes());
                out.push(0);
                Ok(())
            }
            Request::DmaMap {
                flags,
                offset,
                iova,
                size,
            } => {
                let fd = fds.pop();
                let shared = fd.is_some();
                self.dev
                    .dma()
                    .map(flags, iova, size, offset, fd)
                    .map_err(|(e, m)| Refused::soft(e, m))?;
                self.stats.dma_maps.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    "vfio-user: DMA_MAP iova {iova:#x} size {size:#x} offset {offset:#x} flags {flags:#x}{}",
                    if shared { "" } else { " (no descriptor: not accessible)" }
                );
                Ok(())
            }
            Request::DmaUnmap { flags, iova, size } => {
                if flags & DMA_UNMAP_GET_DIRTY_BITMAP != 0
                    || flags & !(DMA_UNMAP_ALL | DMA_UNMAP_GET_DIRTY_BITMAP) != 0
                {
                    return Err(Refused::soft(
                        proto::ENOTSUP,
                        format!("DMA_UNMAP flags {flags:#x}"),
                    ));
                }
                self.dev
                    .before_unmap(iova, size, flags & DMA_UNMAP_ALL != 0);
                let r = self.dev.dma().unmap(iova, size, flags & DMA_UNMAP_ALL != 0);
                self.dev.after_unmap();
                let n = r.map_err(|(e, m)| Refused::soft(e, m))?;
                self.stats.dma_unmaps.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("vfio-user: DMA_UNMAP iova {iova:#x} size {size:#x}: {n:#x} bytes");
                put_u32(out, 24);
                put_u32(out, flags);
                put_u64(out, iova);
                put_u64(out, size);
                Ok(())
            }
            Request::GetInfo => {
                put_u32(out, 16);
                put_u32(out, self.dev.flags());
                put_u32(out, self.dev.num_regions());
                put_u32(out, self.dev.num_irqs());
                Ok(())
            }
            Request::GetRegionInfo { argsz: _, index } => {
                let r = self
                    .dev
                    .region_info(index)
                    .ok_or_else(|| Refused::soft(EINVAL, format!("no region {index}")))?;
                put_u32(out, 32);
                put_u32(out, r.flags);
                put_u32(out, index);
                put_u32(out, 0); // cap_offset: no capabilities
                put_u64(out, r.size);
                put_u64(out, 0); // offset: regions are reached by messages only
                Ok(())
            }
            Request::GetIrqInfo { index } => {
                let r = self
                    .dev
                    .irq_info(index)
                    .ok_or_else(|| Refused::soft(EINVAL, format!("no interrupt index {index}")))?;
                put_u32(out, 16);
                put_u32(out, r.flags);
                put_u32(out, index);
                put_u32(out, r.count);
                Ok(())
            }
            Request::SetIrqs(s) => {
                let nfds = fds.len();
                self.dev.set_irqs(&s, fds).map_err(|e| {
                    Refused::soft(
                        e,
                        format!(
                            "SET_IRQS index {} start {} count {} flags {:#x}",
                            s.index, s.start, s.count, s.flags
                        ),
                    )
                })?;
                tracing::info!(
                    "vfio-user: SET_IRQS index {} start {} count {} flags {:#x} ({} eventfds)",
                    s.index,
                    s.start,
                    s.count,
                    s.flags,
                    nfds
                );
                Ok(())
            }
            Request::RegionRead {
                offset,
                region,
                count,
            } => {
                self.check_region(region, offset, count as usize, proto::REGION_READ)?;
                put_u64(out, offset);
                put_u32(out, region);
                put_u32(out, count);
                let start = out.len();
                out.resize(start + count as usize, 0);
                self.dev
                    .region_read(region, offset, &mut out[start..])
                    .map_err(|e| Refused::soft(e, format!("read of region {region}")))?;
                self.stats.region_reads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Request::RegionWrite {
                offset,
                region,
                data,
            } => {
                self.check_region(region, offset, data.len(), proto::REGION_WRITE)?;
                self.dev
                    .region_write(region, offset, data)
                    .map_err(|e| Refused::soft(e, format!("write of region {region}")))?;
                self.stats.region_writes.fetch_add(1, Ordering::Relaxed);
                put_u64(out, offset);
                put_u32(out, region);
                put_u32(out, data.len() as u32);
                Ok(())
            }
            Request::Reset => {
                tracing::info!("vfio-user: DEVICE_RESET");
                self.dev.reset();
                Ok(())
            }
        }
    }

    /// An access of `len` bytes at `offset` must lie inside region `region` and the
    /// region must allow it.
    fn check_region(&self, region: u32, offset: u64, len: usize, need: u32) -> Result<(), Refused> {
        let r = self
            .dev
            .region_info(region)
            .ok_or_else(|| Refused::soft(EINVAL, format!("no region {region}")))?;
        let end = offset.checked_add(len as u64);
        if r.flags & need == 0 || end.is_none_or(|e| e > r.size) {
            return Err(Refused::soft(
                EINVAL,
                format!(
                    "access of {len} bytes at {offset:#x} of region {region} ({:#x} bytes, flags {:#x})",
                    r.size, r.flags
                ),
            ));
        }
        Ok(())
    }
}

/// A listening socket and one client at a time, as a control-thread task (others wait
/// in the backlog until it leaves). `make` builds a fresh device for each client.
pub struct ServerTask<D: VfioDevice, F: FnMut() -> D + Send + 'static> {
    listener: UnixListener,
    socket: PathBuf,
    make: F,
    conn: Option<Conn<D>>,
    stop: Arc<AtomicBool>,
    started: bool,
    /// Clients served so far.
    pub sessions: Arc<AtomicU64>,
    /// Connections that ended on an error (not by the client hanging up or a stop).
    pub failed: Arc<AtomicU64>,
}

impl<D: VfioDevice + 'static, F: FnMut() -> D + Send + 'static> ServerTask<D, F> {
    pub fn new(listener: UnixListener, socket: PathBuf, make: F, stop: Arc<AtomicBool>) -> Self {
        ServerTask {
            listener,
            socket,
            make,
            conn: None,
            stop,
            started: false,
            sessions: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
        }
    }

    fn close(&mut self, cx: &mut CtlCx<'_>, why: Option<String>) {
        if let Some(c) = self.conn.take() {
            cx.unwatch(c.fd());
            match why {
                None => tracing::info!("vfio-user {}: client disconnected", self.socket.display()),
                Some(w) if w == STOPPING => {
                    tracing::info!("vfio-user {}: {w}", self.socket.display())
                }
                Some(w) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "vfio-user {}: connection closed: {w}",
                        self.socket.display()
                    )
                }
            }
            drop(c.finish());
        }
        cx.set_deadline(None);
    }
}

impl<D: VfioDevice + 'static, F: FnMut() -> D + Send + 'static> CtlTask for ServerTask<D, F> {
    fn run(&mut self, cx: &mut CtlCx<'_>) -> Next {
        if self.stop.load(Ordering::Acquire) {
            self.close(cx, Some(STOPPING.into()));
            cx.unwatch(self.listener.as_raw_fd());
            return Next::Done;
        }
        if !self.started {
            self.started = true;
            if let Err(e) = self
                .listener
                .set_nonblocking(true)
                .and_then(|()| cx.watch(self.listener.as_raw_fd()))
            {
                tracing::error!(
                    "vfio-user {}: cannot watch the socket: {e}",
                    self.socket.display()
                );
                return Next::Done;
            }
        }
        // Serve the client; when there is none (or it just left), take the next one
        // from the backlog. Clients that connect meanwhile wait in the backlog.
        loop {
            if let Some(c) = self.conn.as_mut() {
                // Work the device owes outside any message (an asynchronous event).
                c.device_mut().tick();
                match c.serve() {
                    Step::Wait { deadline } => {
                        cx.set_deadline(deadline);
                        return Next::Keep;
                    }
                    Step::Again => {
                        cx.again();
                        return Next::Keep;
                    }
                    Step::Closed(why) => self.close(cx, why),
                }
            }
            match self.listener.accept() {
                Ok((s, _)) => match Conn::new(s, (self.make)()) {
                    Ok(c) => {
                        if let Err(e) = cx.watch(c.fd()) {
                            tracing::error!(
                                "vfio-user {}: cannot watch a client: {e}",
                                self.socket.display()
                            );
                            continue;
                        }
                        self.sessions.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("vfio-user {}: client connected", self.socket.display());
                        self.conn = Some(c);
                    }
                    Err(e) => {
                        tracing::warn!("vfio-user {}: client setup: {e}", self.socket.display())
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) => {
                    tracing::warn!("vfio-user {}: accept: {e}", self.socket.display());
                    return Next::Keep;
                }
            }
        }
    }
}
