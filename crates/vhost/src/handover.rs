//! Upgrade without a reconnect: the messages of the takeover channel, and the state of a
//! vhost-user session as it moves from the old daemon process to the new one.
//!
//! `nvmux upgrade` makes the running daemon start the new binary with
//! `serve --takeover SOCK` and talk to it over that private Unix socket (mode 0600, in
//! the data directory). Descriptors travel with SCM_RIGHTS, so both processes hold the
//! same open sockets, memory files and eventfds: the guest's connection never closes.
//!
//! ```text
//!  old daemon                                  new daemon (serve --takeover SOCK)
//!      spawn ─────────────────────────────────►  start workers, connect
//!            ◄──────────────────────── HELLO (version, pid)
//!  freeze: stop every vhost ring (drain its in-flight requests, record next_avail:
//!          what GET_VRING_BASE does); the connection threads stop reading
//!      LISTENER × n (one fd each: API, vhost-user, NBD, NVMe/TCP sockets, data-dir lock)
//!      SESSION × m  (connection, back-end channel, memory fds + table, kick/call fds,
//!                    vring state)
//!      END (counts) ─────────────────────────►  check everything arrived and is usable
//!            ◄──────────────────────── READY (health check: ok or why not)
//!  ── commit point: GO; before it the old daemon thaws its rings on any failure ──
//!      GO ───────────────────────────────────►
//!  drain NBD/NVMe-TCP connections, close pools
//!      RELEASED ─────────────────────────────►  restore state.json with the inherited
//!                                               fds, start rings at next_avail (used idx
//!            ◄──────────────────────── STARTED    read from the ring), serve the API
//!  exit
//! ```
//!
//! Every message is a frame: type (u32 LE), payload length (u32 LE), payload; the
//! descriptors ride on the frame's first bytes. The parser ([`decode`]) checks every
//! count and length against the limits below before it reserves memory, and a frame must
//! carry exactly the descriptors its payload names; it never panics (fuzzed by the
//! `takeover_msg` target).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Version of the takeover protocol; both binaries must speak the same one.
/// 2: a session carries its inflight region (descriptor and geometry).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 << 10;
/// Most descriptors one frame carries (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 200;
/// Most memory regions of a session (the slots offered with CONFIGURE_MEM_SLOTS).
pub const MAX_REGIONS: usize = crate::MAX_MEM_SLOTS as usize;
/// Most vrings of a session (the largest num-queues an export accepts).
pub const MAX_VRINGS: usize = 64;
/// Longest path or address string.
pub const MAX_STRING: usize = 4096;
/// Most listeners and sessions one takeover moves.
pub const MAX_OBJECTS: u32 = 100_000;

const T_HELLO: u32 = 1;
const T_LISTENER: u32 = 2;
const T_SESSION: u32 = 3;
const T_END: u32 = 4;
const T_READY: u32 = 5;
const T_GO: u32 = 6;
const T_RELEASED: u32 = 7;
const T_STARTED: u32 = 8;

/// What a handed-over listening socket (or lock) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenerKind {
    /// The API socket (key: its path).
    Api = 1,
    /// A Unix socket bound by `nvmux_core::unixsock::bind` (key: its path): vhost-user,
    /// NBD on a Unix socket.
    Unix = 2,
    /// A TCP listener (key: its bound address): NBD on TCP, NVMe/TCP.
    Tcp = 3,
    /// The data directory's lock file (key: its path): flock belongs to the open file,
    /// so the new process holds the same lock.
    DataDirLock = 4,
    /// The old process's standard output or error (key `stdout`, `stderr`): the new
    /// process logs there once it serves, so the logs stay where the operator put them.
    Stdio = 5,
}

impl ListenerKind {
    fn from_u8(v: u8) -> Option<ListenerKind> {
        Some(match v {
            1 => ListenerKind::Api,
            2 => ListenerKind::Unix,
            3 => ListenerKind::Tcp,
            4 => ListenerKind::DataDirLock,
            5 => ListenerKind::Stdio,
            _ => return None,
        })
    }
}

/// One guest memory region of a session (its descriptor travels beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionState {
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub offset: u64,
}

/// One vring of a session. `base` is the next available index the old process recorded
/// when it stopped the ring after its in-flight requests completed.
#[derive(Debug, PartialEq, Eq)]
pub struct VringState<F> {
    pub size: u16,
    /// Guest addresses of the descriptor table, available ring and used ring.
    pub addrs: Option<(u64, u64, u64)>,
    pub base: u16,
    pub enabled: bool,
    /// The ring ran before the freeze (it is started again by the new process).
    pub running: bool,
    pub kick: Option<F>,
    pub call: Option<F>,
}

/// A connected vhost-user session, frozen: every ring stopped and drained.
#[derive(Debug, PartialEq, Eq)]
pub struct SessionState<F> {
    /// The export's socket path (the session's key).
    pub socket: PathBuf,
    pub features: u64,
    pub protocol: u64,
    pub conn: F,
    pub backend_req: Option<F>,
    pub regions: Vec<(RegionState, F)>,
    pub vrings: Vec<VringState<F>>,
    /// The inflight region the front-end set up (INFLIGHT_SHMFD), if any: the new
    /// process opens the same file range and keeps tracking.
    pub inflight: Option<InflightState<F>>,
}

/// A session's inflight region: its descriptor and what `inflight::Region::open` needs
/// (the fields of GET/SET_INFLIGHT_FD).
#[derive(Debug, PartialEq, Eq)]
pub struct InflightState<F> {
    pub num_queues: u16,
    pub queue_size: u16,
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub fd: F,
}

/// A message of the takeover channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<F> {
    Hello {
        version: u32,
        pid: u32,
    },
    Listener {
        kind: ListenerKind,
        key: String,
        fd: F,
    },
    Session(SessionState<F>),
    End {
        listeners: u32,
        sessions: u32,
    },
    /// The new process's health check: `ok`, or why it cannot take over.
    Ready {
        ok: bool,
        detail: String,
    },
    Go,
    Released,
    Started {
        ok: bool,
        detail: String,
    },
}

/// Little-endian reader over a payload; every read is bounds-checked.
struct Rd<'a> {
    b: &'a [u8],
}

impl Rd<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.b.len() < n {
            return Err(format!(
                "payload ends early ({} bytes left, {n} needed)",
                self.b.len()
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(format!("flag byte {v} is neither 0 nor 1")),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(format!("string of {n} bytes (at most {MAX_STRING})"));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| "string is not UTF-8".to_string())
    }
    fn end(&self) -> Result<(), String> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} unexpected bytes after the message",
                self.b.len()
            ))
        }
    }
}

#[derive(Default)]
struct Wr {
    b: Vec<u8>,
}

impl Wr {
    fn u8(&mut self, v: u8) {
        self.b.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.b.extend_from_slice(s.as_bytes());
    }
}

/// Encode a message: (type, payload, descriptors in the order the payload names them).
pub fn encode<F: Copy>(m: &Msg<F>) -> (u32, Vec<u8>, Vec<F>) {
    let mut w = Wr::default();
    let mut fds = Vec::new();
    let t = match m {
        Msg::Hello { version, pid } => {
            w.u32(*version);
            w.u32(*pid);
            T_HELLO
        }
        Msg::Listener { kind, key, fd } => {
            w.u8(*kind as u8);
            w.string(key);
            fds.push(*fd);
            T_LISTENER
        }
        Msg::Session(s) => {
            w.string(&s.socket.to_string_lossy());
            w.u64(s.features);
            w.u64(s.protocol);
            fds.push(s.conn);
            w.u8(s.backend_req.is_some() as u8);
            fds.extend(s.backend_req);
            match &s.inflight {
                Some(i) => {
                    w.u8(1);
                    w.u16(i.num_queues);
                    w.u16(i.queue_size);
                    w.u64(i.mmap_size);
                    w.u64(i.mmap_offset);
                    fds.push(i.fd);
                }
                None => w.u8(0),
            }
            w.u32(s.regions.len() as u32);
            for (r, f) in &s.regions {
                w.u64(r.gpa);
                w.u64(r.size);
                w.u64(r.uaddr);
                w.u64(r.offset);
                fds.push(*f);
            }
            w.u32(s.vrings.len() as u32);
            for v in &s.vrings {
                w.u16(v.size);
                match v.addrs {
                    Some((d, a, u)) => {
                        w.u8(1);
                        w.u64(d);
                        w.u64(a);
                        w.u64(u);
                    }
                    None => w.u8(0),
                }
                w.u16(v.base);
                w.u8(v.enabled as u8);
                w.u8(v.running as u8);
                w.u8(v.kick.is_some() as u8);
                fds.extend(v.kick);
                w.u8(v.call.is_some() as u8);
                fds.extend(v.call);
            }
            T_SESSION
        }
        Msg::End {
            listeners,
            sessions,
        } => {
            w.u32(*listeners);
            w.u32(*sessions);
            T_END
        }
        Msg::Ready { ok, detail } => {
            w.u8(*ok as u8);
            w.string(detail);
            T_READY
        }
        Msg::Go => T_GO,
        Msg::Released => T_RELEASED,
        Msg::Started { ok, detail } => {
            w.u8(*ok as u8);
            w.string(detail);
            T_STARTED
        }
    };
    (t, w.b, fds)
}

/// Parse one frame's payload with the descriptors that came with it. A frame must carry
/// exactly the descriptors its payload names (extra or missing ones are an error; the
/// caller's descriptors are dropped, and so closed, on every error).
pub fn decode<F>(t: u32, payload: &[u8], fds: Vec<F>) -> Result<Msg<F>, String> {
    if payload.len() > MAX_PAYLOAD {
        return Err(format!(
            "payload of {} bytes (at most {MAX_PAYLOAD})",
            payload.len()
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(format!("{} descriptors (at most {MAX_FDS})", fds.len()));
    }
    let mut r = Rd { b: payload };
    let nfds = fds.len();
    let mut fds = fds.into_iter();
    let mut fd = |what: &str| {
        fds.next()
            .ok_or_else(|| format!("the frame carries {nfds} descriptors, too few for {what}"))
    };
    let m = match t {
        T_HELLO => Msg::Hello {
            version: r.u32()?,
            pid: r.u32()?,
        },
        T_LISTENER => {
            let k = r.u8()?;
            let kind = ListenerKind::from_u8(k).ok_or_else(|| format!("listener kind {k}"))?;
            let key = r.string()?;
            Msg::Listener {
                kind,
                key,
                fd: fd("the listener")?,
            }
        }
        T_SESSION => {
            let socket = PathBuf::from(r.string()?);
            let features = r.u64()?;
            let protocol = r.u64()?;
            let conn = fd("the connection")?;
            let backend_req = if r.bool()? {
                Some(fd("the back-end channel")?)
            } else {
                None
            };
            let inflight = if r.bool()? {
                let num_queues = r.u16()?;
                let queue_size = r.u16()?;
                let mmap_size = r.u64()?;
                let mmap_offset = r.u64()?;
                // The limits of SET_INFLIGHT_FD (Region::open checks the file too).
                let len = crate::inflight::region_bytes(num_queues, queue_size)?;
                let max = crate::inflight::region_bytes(
                    crate::inflight::MAX_QUEUES,
                    crate::MAX_QUEUE_SIZE,
                )?;
                if mmap_size < len as u64 || mmap_size > max as u64 {
                    return Err(format!(
                        "inflight region of {mmap_size} bytes for {num_queues} queues of {queue_size} (needs {len}, at most {max})"
                    ));
                }
                if mmap_offset.checked_add(mmap_size).is_none() {
                    return Err(format!(
                        "inflight region offset {mmap_offset:#x} + size overflows"
                    ));
                }
                Some(InflightState {
                    num_queues,
                    queue_size,
                    mmap_size,
                    mmap_offset,
                    fd: fd("the inflight region")?,
                })
            } else {
                None
            };
            let n = r.u32()? as usize;
            if n > MAX_REGIONS {
                return Err(format!("{n} memory regions (at most {MAX_REGIONS})"));
            }
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                let s = RegionState {
                    gpa: r.u64()?,
                    size: r.u64()?,
                    uaddr: r.u64()?,
                    offset: r.u64()?,
                };
                regions.push((s, fd("a memory region")?));
            }
            let n = r.u32()? as usize;
            if n > MAX_VRINGS {
                return Err(format!("{n} vrings (at most {MAX_VRINGS})"));
            }
            let mut vrings = Vec::with_capacity(n);
            for _ in 0..n {
                let size = r.u16()?;
                if size > crate::MAX_QUEUE_SIZE || (size != 0 && !size.is_power_of_two()) {
                    return Err(format!("vring size {size}"));
                }
                let addrs = if r.bool()? {
                    Some((r.u64()?, r.u64()?, r.u64()?))
                } else {
                    None
                };
                let base = r.u16()?;
                let enabled = r.bool()?;
                let running = r.bool()?;
                let kick = if r.bool()? {
                    Some(fd("a kick eventfd")?)
                } else {
                    None
                };
                let call = if r.bool()? {
                    Some(fd("a call eventfd")?)
                } else {
                    None
                };
                vrings.push(VringState {
                    size,
                    addrs,
                    base,
                    enabled,
                    running,
                    kick,
                    call,
                });
            }
            Msg::Session(SessionState {
                socket,
                features,
                protocol,
                conn,
                backend_req,
                regions,
                vrings,
                inflight,
            })
        }
        T_END => {
            let listeners = r.u32()?;
            let sessions = r.u32()?;
            if listeners > MAX_OBJECTS || sessions > MAX_OBJECTS {
                return Err(format!(
                    "{listeners} listeners and {sessions} sessions (at most {MAX_OBJECTS} each)"
                ));
            }
            Msg::End {
                listeners,
                sessions,
            }
        }
        T_READY => Msg::Ready {
            ok: r.bool()?,
            detail: r.string()?,
        },
        T_GO => Msg::Go,
        T_RELEASED => Msg::Released,
        T_STARTED => Msg::Started {
            ok: r.bool()?,
            detail: r.string()?,
        },
        _ => return Err(format!("unknown message type {t}")),
    };
    r.end()?;
    if fds.next().is_some() {
        return Err(format!(
            "the frame carries {nfds} descriptors, more than its message names"
        ));
    }
    Ok(m)
}

/// Send one message; its descriptors are duplicated into the peer by the kernel.
pub fn send(sock: &UnixStream, m: &Msg<RawFd>) -> std::io::Result<()> {
    let (t, payload, fds) = encode(m);
    if payload.len() > MAX_PAYLOAD || fds.len() > MAX_FDS {
        return Err(std::io::Error::other(format!(
            "takeover message too large ({} bytes, {} descriptors)",
            payload.len(),
            fds.len()
        )));
    }
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.extend_from_slice(&t.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    // The descriptors go with the first bytes; the rest of the frame follows.
    let mut cbuf = vec![0u64; cmsg_words(MAX_FDS)];
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields set below point to
    // live buffers of the given lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure size computations; the header written
        // through CMSG_FIRSTHDR lies in `cbuf`, which is large enough for MAX_FDS
        // descriptors (cmsg_words), and the data copy stays within CMSG_LEN.
        unsafe {
            let len = std::mem::size_of_val(fds.as_slice());
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(len as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), len);
        }
    }
    // SAFETY: `msg` describes the buffers above, which outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    if n < frame.len() {
        let mut s = sock;
        s.write_all(frame.get(n..).unwrap_or(&[]))?;
    }
    Ok(())
}

fn cmsg_words(nfds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((nfds * std::mem::size_of::<RawFd>()) as u32) };
    (space as usize).div_ceil(8)
}

/// Receive one message (blocking, within the socket's read timeout). A frame whose
/// descriptors did not fit, whose length is over the limit, or that does not parse is an
/// error; its descriptors are closed.
pub fn recv(sock: &UnixStream) -> std::io::Result<Msg<OwnedFd>> {
    let mut hdr = [0u8; 8];
    let mut cbuf = vec![0u64; cmsg_words(MAX_FDS)];
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    // SAFETY: as in `send`: the msghdr points to live buffers of the given lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.len() * 8;
    let n = loop {
        // SAFETY: `msg` describes the buffers above, which outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        break n as usize;
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel just filled, within
    // msg_controllen; each SCM_RIGHTS payload holds (len - CMSG_LEN(0)) / 4 descriptors
    // that the kernel installed for us, so we own them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const i32;
                let count = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<i32>();
                for k in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(k))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the other process closed the takeover channel",
        ));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(format!(
            "a takeover frame carried more than {MAX_FDS} descriptors"
        )));
    }
    let mut s = sock;
    if n < hdr.len() {
        s.read_exact(hdr.get_mut(n..).unwrap_or(&mut []))?;
    }
    let t = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::other(format!(
            "takeover frame of {len} bytes (at most {MAX_PAYLOAD})"
        )));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload)?;
    decode(t, &payload, fds).map_err(|e| std::io::Error::other(format!("takeover message: {e}")))
}

/// What the fuzz target runs: a frame's type and payload with `nfds` descriptors.
pub fn fuzz_one(data: &[u8]) {
    if data.len() < 5 {
        return;
    }
    let t = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) % 10;
    let nfds = data[4] as usize;
    let fds: Vec<u32> = (0..nfds as u32).collect();
    if let Ok(m) = decode(t, &data[5..], fds) {
        // What parses encodes back to the same message.
        let (t2, p2, f2) = encode(&m);
        assert_eq!(t2, t);
        assert_eq!(decode(t2, &p2, f2).ok().as_ref(), Some(&m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Msg<u32> {
        Msg::Session(SessionState {
            socket: "/run/vm1.sock".into(),
            features: 0x1_7000_0246,
            protocol: 0x8a1b,
            conn: 0,
            backend_req: Some(1),
            regions: vec![
                (
                    RegionState {
                        gpa: 0,
                        size: 0xa0000,
                        uaddr: 0x7f00_0000_0000,
                        offset: 0,
                    },
                    2,
                ),
                (
                    RegionState {
                        gpa: 0x10_0000,
                        size: 0x1ff0_0000,
                        uaddr: 0x7f00_0010_0000,
                        offset: 0x10_0000,
                    },
                    3,
                ),
            ],
            vrings: vec![
                VringState {
                    size: 256,
                    addrs: Some((0x1000, 0x2000, 0x3000)),
                    base: 77,
                    enabled: true,
                    running: true,
                    kick: Some(4),
                    call: Some(5),
                },
                VringState {
                    size: 0,
                    addrs: None,
                    base: 0,
                    enabled: false,
                    running: false,
                    kick: None,
                    call: None,
                },
            ],
            inflight: None,
        })
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            Msg::Hello {
                version: PROTOCOL_VERSION,
                pid: 42,
            },
            Msg::Listener {
                kind: ListenerKind::Tcp,
                key: "127.0.0.1:4420".into(),
                fd: 9,
            },
            session(),
            Msg::End {
                listeners: 3,
                sessions: 1,
            },
            Msg::Ready {
                ok: false,
                detail: "no".into(),
            },
            Msg::Go,
            Msg::Released,
            Msg::Started {
                ok: true,
                detail: String::new(),
            },
        ];
        for m in msgs {
            let (t, p, f) = encode(&m);
            assert_eq!(decode(t, &p, f).unwrap(), m);
        }
    }

    #[test]
    fn descriptor_counts_must_match() {
        let (t, p, mut f) = encode(&session());
        assert_eq!(f, vec![0, 1, 2, 3, 4, 5]);
        f.push(6);
        assert!(decode(t, &p, f.clone()).unwrap_err().contains("more than"));
        f.truncate(4);
        assert!(decode(t, &p, f).unwrap_err().contains("too few"));
        // Every truncation of the payload is an error, never a panic.
        let (t, p, f) = encode(&session());
        for n in 0..p.len() {
            assert!(decode(t, &p[..n], f.clone()).is_err());
        }
    }

    #[test]
    fn counts_are_bounded_before_allocation() {
        // A session naming 2^32-1 regions is refused before anything is reserved.
        let mut w = Wr::default();
        w.string("/s");
        w.u64(0);
        w.u64(0);
        w.u8(0);
        w.u8(0);
        w.u32(u32::MAX);
        assert!(decode(T_SESSION, &w.b, vec![0u32])
            .unwrap_err()
            .contains("memory regions"));
        let mut w = Wr::default();
        w.u8(2);
        w.u32(1 << 30);
        assert!(decode(T_LISTENER, &w.b, vec![0u32])
            .unwrap_err()
            .contains("at most"));
        // An inflight region's geometry is held to SET_INFLIGHT_FD's limits.
        for (nq, qs, size, off) in [
            (0u16, 256u16, 8192u64, 0u64),
            (65, 256, 1 << 20, 0),
            (1, 0, 4096, 0),
            (1, 256, 64, 0),
            (1, 256, 1 << 40, 0),
            (1, 256, 8192, u64::MAX),
        ] {
            let Msg::Session(mut s) = session() else {
                unreachable!()
            };
            s.inflight = Some(InflightState {
                num_queues: nq,
                queue_size: qs,
                mmap_size: size,
                mmap_offset: off,
                fd: 9,
            });
            let (t, p, f) = encode(&Msg::Session(s));
            assert!(
                decode(t, &p, f).unwrap_err().contains("inflight region"),
                "{nq} {qs} {size} {off}"
            );
        }
    }

    #[test]
    fn a_session_with_an_inflight_region_round_trips() {
        let Msg::Session(mut s) = session() else {
            unreachable!()
        };
        s.inflight = Some(InflightState {
            num_queues: 2,
            queue_size: 256,
            mmap_size: 2 * crate::inflight::queue_bytes(256) as u64,
            mmap_offset: 4096,
            fd: 6,
        });
        let m = Msg::Session(s);
        let (t, p, f) = encode(&m);
        // The region's descriptor travels after the back-end channel's.
        assert_eq!(f, vec![0, 1, 6, 2, 3, 4, 5]);
        assert_eq!(decode(t, &p, f.clone()).unwrap(), m);
        for n in 0..p.len() {
            assert!(decode(t, &p[..n], f.clone()).is_err());
        }
    }

    #[test]
    fn frames_carry_descriptors_over_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, y) = UnixStream::pair().unwrap();
        send(
            &a,
            &Msg::Listener {
                kind: ListenerKind::Unix,
                key: "/tmp/s".into(),
                fd: x.as_raw_fd(),
            },
        )
        .unwrap();
        let Msg::Listener { kind, key, fd } = recv(&b).unwrap() else {
            panic!("not a listener")
        };
        assert_eq!((kind, key.as_str()), (ListenerKind::Unix, "/tmp/s"));
        // The received descriptor is the same socket: what goes in one end comes out.
        let mut got = UnixStream::from(fd);
        (&y).write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        got.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        // A frame with a bad length is refused.
        (&a).write_all(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])
            .unwrap();
        assert!(recv(&b).is_err());
        drop(a);
    }

    #[test]
    fn replay_corpus() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/takeover_msg");
        let (mut n, mut sessions) = (0, 0);
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            let p = e.expect("entry").path();
            let data = std::fs::read(&p).expect("read seed");
            fuzz_one(&data);
            if data.len() >= 5 {
                let t = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                let fds: Vec<u32> = (0..data[4] as u32).collect();
                if let Ok(Msg::Session(_)) = decode(t, &data[5..], fds) {
                    sessions += 1;
                }
            }
            n += 1;
        }
        assert!(n > 0, "empty corpus in {}", dir.display());
        assert!(sessions > 0, "no seed holds a whole session");
    }
}
