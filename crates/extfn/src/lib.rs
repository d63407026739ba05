//! SDK for nvmux external functions.
//!
//! An external function is a separate, unprivileged process that serves some of a disk's
//! commands: the disk's classifier routes a command to it (`NVMUX_EXTERNAL`), it does its
//! work (log, mirror, transform, answer), and completes the command with an NVMe status.
//! It talks to the daemon over a Unix socket (set up with `nvmux disk set-external`) and
//! one shared-memory ring per disk queue; see [`proto`] and `docs/external-functions.md`.
//!
//! ```no_run
//! use nvmux_extfn::{serve, Function, Reply, Request, OP_WRITE};
//! struct CountWrites(u64);
//! impl Function for CountWrites {
//!     fn handle(&mut self, req: Request<'_>) -> Reply {
//!         if req.opcode == OP_WRITE {
//!             self.0 += 1;
//!         }
//!         Reply::ok(req.cookie)
//!     }
//! }
//! serve("/run/nvmux/vm1-fn.sock".as_ref(), "count", &mut CountWrites(0)).unwrap();
//! ```
//!
//! [`serve`] runs the whole protocol on the calling thread: it polls the rings while
//! commands arrive and sleeps in `epoll_wait` when they stop (after `poll_us`), so an
//! idle function costs no CPU. It returns when the daemon closes the connection.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub mod proto;
pub mod sock;

use proto::{hdr, Cqe, Layout, FN_NEED_WAKEUP};

pub const OP_FLUSH: u8 = 0x00;
pub const OP_WRITE: u8 = 0x01;
pub const OP_READ: u8 = 0x02;
pub const OP_WRITE_ZEROES: u8 = 0x08;
pub const OP_DEALLOCATE: u8 = 0x09;

/// NVMe statuses, `(SCT << 8) | SC`.
pub const STATUS_SUCCESS: u16 = 0;
pub const STATUS_INVALID_OPCODE: u16 = 0x0001;
pub const STATUS_INVALID_FIELD: u16 = 0x0002;
pub const STATUS_INTERNAL_ERROR: u16 = 0x0006;
pub const STATUS_WRITE_FAULT: u16 = 0x0280;
pub const STATUS_UNRECOVERED_READ: u16 = 0x0281;

/// The disk this function serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    pub name: String,
    pub block_size: u32,
    pub num_blocks: u64,
    /// The most data one command carries.
    pub max_io: u32,
}

/// One command.
pub struct Request<'a> {
    pub opcode: u8,
    pub fua: bool,
    pub nsid: u32,
    pub slba: u64,
    pub nlb: u32,
    /// The classifier's per-command value.
    pub cookie: u64,
    /// Writes: the data to write. Reads: the buffer to fill (what it holds when `handle`
    /// returns success goes to the guest). Empty for commands without data.
    pub data: &'a mut [u8],
}

/// A command's completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// NVMe status, `(SCT << 8) | SC`; 0 is success.
    pub status: u16,
    /// Handed to the classifier's completion hook as `ctx->cookie`.
    pub cookie: u64,
}

impl Reply {
    pub fn ok(cookie: u64) -> Reply {
        Reply {
            status: STATUS_SUCCESS,
            cookie,
        }
    }
    pub fn error(status: u16, cookie: u64) -> Reply {
        Reply { status, cookie }
    }
}

/// What a function does. Calls come from the thread that runs [`serve`].
pub trait Function {
    /// The connection is up.
    fn attached(&mut self, _disk: &DiskInfo) {}
    /// Handle one command and say how it ends.
    fn handle(&mut self, req: Request<'_>) -> Reply;
    /// A batch of commands was handled; their completions are published after this
    /// returns. An error fails every command of the batch (Internal Error): a function
    /// that makes its work durable here (an audit log) never completes a command whose
    /// work was lost.
    fn end_batch(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Tuning of [`serve_with`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Keep polling this long after the last command before sleeping.
    pub poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            poll: Duration::from_micros(50),
        }
    }
}

struct Ring {
    id: u32,
    map: proto::MappedRing,
    sq_efd: OwnedFd,
    cq_efd: OwnedFd,
    sq_head: u32,
    cq_tail: u32,
}

impl Ring {
    /// Handle every published command; returns how many.
    fn process(&mut self, f: &mut dyn Function, out: &mut Vec<Cqe>) -> usize {
        let tail = self.map.view.load(hdr::SQ_TAIL);
        let depth = self.map.view.layout.depth;
        let avail = tail.wrapping_sub(self.sq_head).min(depth);
        if avail == 0 {
            return 0;
        }
        out.clear();
        let slot_size = self.map.view.layout.slot_size;
        for _ in 0..avail {
            let e = self.map.view.read_sqe(self.sq_head);
            self.sq_head = self.sq_head.wrapping_add(1);
            let len = e.data_len.min(slot_size) as usize;
            let reply = match self.map.view.slot(e.id) {
                Some(p) => {
                    // SAFETY: the slot is slot_size bytes of our mapping; the daemon does
                    // not touch it while the command is ours.
                    let data = unsafe { std::slice::from_raw_parts_mut(p, len) };
                    f.handle(Request {
                        opcode: e.opcode,
                        fua: e.flags & proto::SQE_FUA != 0,
                        nsid: e.nsid,
                        slba: e.slba,
                        nlb: e.nlb,
                        cookie: e.cookie,
                        data,
                    })
                }
                None => Reply::error(STATUS_INTERNAL_ERROR, e.cookie),
            };
            out.push(Cqe {
                id: e.id,
                status: reply.status,
                flags: 0,
                cookie: reply.cookie,
            });
        }
        self.map.view.store(hdr::SQ_HEAD, self.sq_head);
        if f.end_batch().is_err() {
            for c in out.iter_mut() {
                c.status = STATUS_INTERNAL_ERROR;
            }
        }
        for c in out.iter() {
            self.map.view.write_cqe(self.cq_tail, c);
            self.cq_tail = self.cq_tail.wrapping_add(1);
        }
        self.map.view.store(hdr::CQ_TAIL, self.cq_tail);
        signal(self.cq_efd.as_raw_fd());
        avail as usize
    }

    fn pending(&self) -> bool {
        self.map.view.load(hdr::SQ_TAIL) != self.sq_head
    }
}

fn signal(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writing 8 bytes from a u64 to an eventfd we hold.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

fn drain(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a u64 from a non-blocking eventfd we hold.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Refuse a ring that could shrink under us: the daemon seals every ring memfd
/// (F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_SEAL) before it sends it, and the file must hold
/// the whole ring. A ring that could shrink would kill this process with SIGBUS.
fn check_sealed(fd: RawFd, size: usize) -> io::Result<()> {
    // SAFETY: F_GET_SEALS on a descriptor we hold.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    if seals < 0 || seals & need != need {
        return Err(invalid(format!(
            "AddRing with a ring memfd that is not sealed against shrinking (seals {seals:#x})"
        )));
    }
    // SAFETY: fstat writes a stat struct for a descriptor we hold.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    if (st.st_size as u64) < size as u64 {
        return Err(invalid(format!(
            "AddRing with a ring memfd of {} bytes, smaller than the ring ({size} bytes)",
            st.st_size
        )));
    }
    Ok(())
}

fn add_ring(m: &proto::RingMsg, fds: Vec<OwnedFd>) -> io::Result<Ring> {
    let [memfd, sq_efd, cq_efd]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|_| invalid("AddRing without its three descriptors"))?;
    let layout = Layout::new(m.depth, m.slot_size)
        .ok_or_else(|| invalid("AddRing with a bad depth or slot size"))?;
    if layout.size as u64 != m.size {
        return Err(invalid("AddRing size does not match its layout"));
    }
    check_sealed(memfd.as_raw_fd(), layout.size)?;
    let map = proto::MappedRing::map(memfd.as_raw_fd(), layout)?;
    let ring = Ring {
        id: m.ring,
        sq_head: map.view.load(hdr::SQ_HEAD),
        cq_tail: map.view.load(hdr::CQ_TAIL),
        map,
        sq_efd,
        cq_efd,
    };
    if !ring.map.view.header_matches() {
        return Err(invalid("the ring's header does not match AddRing"));
    }
    Ok(ring)
}

/// Connect to `socket`, serve commands with `f` until the daemon closes the connection.
pub fn serve(socket: &Path, name: &str, f: &mut dyn Function) -> io::Result<()> {
    serve_with(socket, name, f, &Options::default())
}

/// Like [`serve`], with tuning.
pub fn serve_with(
    socket: &Path,
    name: &str,
    f: &mut dyn Function,
    opt: &Options,
) -> io::Result<()> {
    let mut s = UnixStream::connect(socket)?;
    s.write_all(
        &proto::Hello {
            version: proto::VERSION,
            name: name.into(),
        }
        .encode(),
    )?;
    let mut b = [0u8; proto::MSG_SIZE];
    s.read_exact(&mut b)?;
    let w =
        proto::Welcome::decode(&b).ok_or_else(|| invalid("the daemon's welcome is malformed"))?;
    match w.status {
        proto::WELCOME_OK => {}
        proto::WELCOME_BUSY => {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another function is attached to this disk",
            ))
        }
        proto::WELCOME_VERSION => {
            return Err(invalid("the daemon does not speak protocol version 1"))
        }
        x => {
            return Err(invalid(format!(
                "the daemon refused the connection (status {x})"
            )))
        }
    }
    f.attached(&DiskInfo {
        name: w.disk,
        block_size: w.block_size,
        num_blocks: w.num_blocks,
        max_io: w.max_io,
    });
    s.set_nonblocking(true)?;
    // SAFETY: epoll_create1 has no preconditions; checked below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let watch = |fd: RawFd, token: u64, op: i32| {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd and event for the call.
        unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) };
    };
    const SOCKET: u64 = u64::MAX;
    watch(s.as_raw_fd(), SOCKET, libc::EPOLL_CTL_ADD);
    let mut rings: Vec<Ring> = Vec::new();
    let mut cqes = Vec::with_capacity(proto::MAX_DEPTH as usize);
    let mut idle_since: Option<Instant> = None;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
    loop {
        // Control messages.
        loop {
            match sock::recv_with_fds(s.as_raw_fd(), &mut b) {
                Ok((0, _)) => return Ok(()), // the daemon closed the connection
                Ok((_, fds)) => {
                    let m = proto::RingMsg::decode(&b)
                        .ok_or_else(|| invalid("malformed message from the daemon"))?;
                    match m.kind {
                        proto::MSG_ADD_RING => {
                            let r = add_ring(&m, fds)?;
                            watch(r.sq_efd.as_raw_fd(), r.id as u64, libc::EPOLL_CTL_ADD);
                            rings.push(r);
                        }
                        proto::MSG_REMOVE_RING => {
                            if let Some(i) = rings.iter().position(|r| r.id == m.ring) {
                                let r = rings.swap_remove(i);
                                watch(r.sq_efd.as_raw_fd(), 0, libc::EPOLL_CTL_DEL);
                            }
                        }
                        k => return Err(invalid(format!("unknown message {k} from the daemon"))),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let mut n = 0;
        for r in rings.iter_mut() {
            n += r.process(f, &mut cqes);
        }
        if n > 0 {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < opt.poll {
            std::hint::spin_loop();
            continue;
        }
        idle_since = None;
        for r in &rings {
            r.map.view.store(hdr::FN_FLAGS, FN_NEED_WAKEUP);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if !rings.iter().any(Ring::pending) {
            // SAFETY: `events` is a valid buffer of its length.
            let k = unsafe {
                libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1)
            };
            for ev in events.iter().take(k.max(0) as usize) {
                if ev.u64 != SOCKET {
                    if let Some(r) = rings.iter().find(|r| r.id as u64 == ev.u64) {
                        drain(r.sq_efd.as_raw_fd());
                    }
                }
            }
        }
        for r in &rings {
            r.map.view.store(hdr::FN_FLAGS, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(size: i64, seals: i32) -> OwnedFd {
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let fd = unsafe {
            libc::memfd_create(
                c"extfn-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor; plain fcntl/ftruncate on it.
        unsafe {
            assert_eq!(libc::ftruncate(fd, size), 0);
            if seals != 0 {
                assert_eq!(libc::fcntl(fd, libc::F_ADD_SEALS, seals), 0);
            }
            OwnedFd::from_raw_fd(fd)
        }
    }

    #[test]
    fn only_sealed_rings_of_the_right_size_are_taken() {
        let all = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        check_sealed(memfd(1 << 16, all).as_raw_fd(), 1 << 16).expect("sealed ring");
        let e = check_sealed(memfd(1 << 16, 0).as_raw_fd(), 1 << 16).unwrap_err();
        assert!(e.to_string().contains("not sealed"), "{e}");
        let e = check_sealed(memfd(1 << 16, libc::F_SEAL_SHRINK).as_raw_fd(), 1 << 16).unwrap_err();
        assert!(e.to_string().contains("not sealed"), "{e}");
        let e = check_sealed(memfd(4096, all).as_raw_fd(), 1 << 16).unwrap_err();
        assert!(e.to_string().contains("smaller than the ring"), "{e}");
    }
}
