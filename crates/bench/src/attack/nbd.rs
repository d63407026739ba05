//! A hostile NBD client, on a Unix socket or TCP ([`Target`]): connection floods, slow
//! handshakes, clients that stop mid-request or stop reading their replies, 4 GiB
//! requests; plus the wire helpers to build more (greeting, options, requests, replies).
//! Each attack speaks raw NBD (fixed newstyle, simple replies) and reports what the
//! server did.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{trickle, Conn, Flood, Res};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
/// The option reply that ends a successful NBD_OPT_GO.
pub const REP_ACK: u32 = 1;
pub const EOVERFLOW: u32 = 75;

/// Where an NBD listener is.
#[derive(Clone, Debug)]
pub enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Target {
    /// Open a connection (TCP: within 5 s).
    pub fn connect(&self) -> Res<Stream> {
        Ok(match self {
            Target::Unix(p) => {
                Stream::Unix(UnixStream::connect(p).map_err(|e| format!("{}: {e}", p.display()))?)
            }
            Target::Tcp(a) => Stream::Tcp(
                TcpStream::connect_timeout(a, Duration::from_secs(5))
                    .map_err(|e| format!("{a}: {e}"))?,
            ),
        })
    }
}

impl Target {
    /// `unix` or `tcp`, to label what ran on which.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Unix(_) => "unix",
            Target::Tcp(_) => "tcp",
        }
    }
}

/// `unix:PATH` or `tcp:ADDRESS`, for messages.
impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A client connection.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(d),
            Stream::Tcp(s) => s.set_read_timeout(d),
        }
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(d),
            Stream::Tcp(s) => s.set_write_timeout(d),
        }
    }
}

impl Conn for Stream {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        Stream::set_read_timeout(self, d)
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read the server's 18-byte greeting; `false` if the connection closed instead (refused)
/// or nothing came within `wait`.
pub fn greeting(s: &mut Stream, wait: Duration) -> bool {
    let _ = s.set_read_timeout(Some(wait));
    let mut g = [0u8; 18];
    s.read_exact(&mut g).is_ok() && &g[..8] == b"NBDMAGIC"
}

/// An option request: `opt` with `data`.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The client's side of a plaintext negotiation up to `NBD_OPT_GO` on `export`, as
/// bytes: the client flags (fixed newstyle), then the option.
pub fn go_bytes(export: &str) -> Vec<u8> {
    let mut v = 1u32.to_be_bytes().to_vec();
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    v.extend(option(OPT_GO, &d));
    v
}

/// Read one option reply: (type, data). Data over 1 MiB is an error.
pub fn option_reply(s: &mut Stream) -> Res<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)
        .map_err(|e| format!("option reply: {e}"))?;
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
    if len > 1 << 20 {
        return Err(format!("an option reply of {len} bytes"));
    }
    let mut d = vec![0u8; len];
    s.read_exact(&mut d)
        .map_err(|e| format!("option reply data: {e}"))?;
    Ok((kind, d))
}

/// Connect and negotiate `NBD_OPT_GO` on `export` (simple replies); the stream is then
/// in the transmission phase.
pub fn connect_go(t: &Target, export: &str) -> Res<Stream> {
    let mut s = t.connect()?;
    if !greeting(&mut s, Duration::from_secs(20)) {
        return Err(format!("{t}: no greeting"));
    }
    go(&mut s, export)?;
    Ok(s)
}

/// Negotiate `NBD_OPT_GO` on a connection whose greeting has been read.
pub fn go(s: &mut Stream, export: &str) -> Res<()> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    s.write_all(&go_bytes(export))
        .map_err(|e| format!("send GO: {e}"))?;
    loop {
        let (kind, d) = option_reply(s)?;
        if kind >= 1 << 31 {
            return Err(format!(
                "GO {export} refused: {kind:#x} {}",
                String::from_utf8_lossy(&d)
            ));
        }
        if kind == REP_ACK {
            return Ok(());
        }
    }
}

/// A request header (no payload).
pub fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// What the server did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply (error 0: success; its read data, if any, follows).
    Simple { error: u32, cookie: u64 },
    /// A reply header with another magic number.
    BadMagic(u32),
    /// It closed the connection (end of stream or reset).
    Closed,
    /// Nothing within the time allowed.
    Silent,
}

/// The next reply header on `s`, waiting at most `within`.
pub fn reply(s: &mut Stream, within: Duration) -> Reply {
    let t0 = Instant::now();
    let mut h = [0u8; 16];
    let mut got = 0;
    while got < h.len() {
        let Some(left) = within.checked_sub(t0.elapsed()) else {
            return Reply::Silent;
        };
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut h[got..]) {
            Ok(0) => return Reply::Closed,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Reply::Closed,
        }
    }
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if be32(0) != SIMPLE_REPLY_MAGIC {
        return Reply::BadMagic(be32(0));
    }
    Reply::Simple {
        error: be32(4),
        cookie: u64::from(be32(8)) << 32 | u64::from(be32(12)),
    }
}

/// Open `n` connections one after the other and keep those the server admits (it sends
/// its greeting within `wait`; a refused one is closed at once).
pub fn flood(t: &Target, n: usize, wait: Duration) -> Flood<Stream> {
    super::flood(n, || t.connect(), |s| greeting(s, wait))
}

/// Slowloris: the client's half of a negotiation (after the greeting) one byte every
/// `every`. Returns how long after the connect the server ended the connection
/// (`None`: still open at `give_up`).
pub fn slow_handshake(
    t: &Target,
    export: &str,
    every: Duration,
    give_up: Duration,
) -> Res<Option<Duration>> {
    let t0 = Instant::now();
    let mut s = t.connect()?;
    if !greeting(&mut s, Duration::from_secs(10)) {
        return Err(format!("{t}: no greeting"));
    }
    Ok(trickle(&mut s, t0, &go_bytes(export), every, give_up))
}

/// Negotiate, then queue `n` reads of `len` bytes and never read a reply (a client that
/// stopped reading). Returns the stream (nothing of it has been read since GO).
pub fn unread_replies(t: &Target, export: &str, n: u64, len: u32) -> Res<Stream> {
    let mut s = connect_go(t, export)?;
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    for i in 0..n {
        // The server stops reading once its output backs up: stop writing then too.
        if s.write_all(&request(CMD_READ, i, 0, len)).is_err() {
            break;
        }
    }
    Ok(s)
}

/// Negotiate, then send (up to) `part` bytes of a write request of `len` bytes (header
/// and payload) and stop. A server that does not take them within half a second gets
/// what went out.
pub fn partial_request(t: &Target, export: &str, len: u32, part: usize) -> Res<Stream> {
    let mut s = connect_go(t, export)?;
    let mut v = request(CMD_WRITE, 1, 0, len).to_vec();
    v.resize(28 + (part.saturating_sub(28)).min(len as usize), 0x5a);
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    let mut off = 0;
    while off < part.min(v.len()) {
        match s.write(&v[off..part.min(v.len())]) {
            Ok(0) => break,
            Ok(k) => off += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(s)
}

/// On a negotiated connection, one request of `kind` with length `len` (`u32::MAX` is
/// the 4 GiB attack); a write is followed by 1 MiB of its payload (a server that took
/// the length at its word would wait for the rest). The server must refuse a read it
/// cannot serve and end the connection at a write whose payload it cannot skip safely,
/// allocating nothing for either.
pub fn huge_request(s: &mut Stream, kind: u16, len: u32) -> Reply {
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    if s.write_all(&request(kind, 7, 0, len)).is_err() {
        return reply(s, Duration::from_secs(20));
    }
    if kind == CMD_WRITE {
        let _ = s.write_all(&vec![0u8; 1 << 20]);
    }
    reply(s, Duration::from_secs(20))
}
