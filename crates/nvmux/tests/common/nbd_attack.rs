//! Attacks on an NBD endpoint, for `tests/nbd.rs` and the cross-endpoint attacker suite:
//! connection floods, slow and silent handshakes, clients that stop reading, partial
//! requests and 4 GiB requests; plus TLS fixtures (from `nvmux_bench::tls`) and the
//! daemon's RSS.
//!
//! Each function speaks raw NBD over a [`Target`] and reports what the server did; none
//! asserts, so a suite decides what it expects.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const OPT_GO: u32 = 7;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_LIST: u32 = 3;
pub const EOVERFLOW: u32 = 75;

/// Where an NBD listener is.
#[derive(Clone, Debug)]
pub enum Target {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Target {
    pub fn connect(&self) -> io::Result<Stream> {
        Ok(match self {
            Target::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Target::Tcp(a) => Stream::Tcp(TcpStream::connect(a)?),
        })
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

/// Raise this process's open-file limit to its hard limit (floods hold many sockets).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write a plain struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Read the server's 18-byte greeting; `false` if the connection closed instead (refused)
/// or nothing came within `wait`.
pub fn greeting(s: &mut Stream, wait: Duration) -> bool {
    let _ = s.set_read_timeout(Some(wait));
    let mut g = [0u8; 18];
    s.read_exact(&mut g).is_ok() && &g[..8] == b"NBDMAGIC"
}

pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The client's side of a plaintext negotiation up to `NBD_OPT_GO` on `export`, as bytes.
pub fn go_bytes(export: &str) -> Vec<u8> {
    let mut v = 1u32.to_be_bytes().to_vec(); // fixed newstyle
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    v.extend(option(OPT_GO, &d));
    v
}

/// Read one option reply: (type, data).
pub fn option_reply(s: &mut Stream) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
    let mut d = vec![0u8; len.min(1 << 20)];
    s.read_exact(&mut d)?;
    Ok((kind, d))
}

/// Connect and negotiate `NBD_OPT_GO` on `export` (simple replies); the stream is then
/// in the transmission phase.
pub fn connect_go(t: &Target, export: &str) -> io::Result<Stream> {
    let mut s = t.connect()?;
    if !greeting(&mut s, Duration::from_secs(20)) {
        return Err(io::Error::other("no greeting"));
    }
    go(&mut s, export)?;
    Ok(s)
}

/// Negotiate `NBD_OPT_GO` on a connection whose greeting has been read.
pub fn go(s: &mut Stream, export: &str) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(&go_bytes(export))?;
    loop {
        let (kind, d) = option_reply(s)?;
        if kind >= 1 << 31 {
            return Err(io::Error::other(format!(
                "GO refused: {kind:#x} {}",
                String::from_utf8_lossy(&d)
            )));
        }
        if kind == 1 {
            return Ok(());
        }
    }
}

pub fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&kind.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// A simple reply's (error, cookie); `None` at the end of the stream.
pub fn simple_reply(s: &mut Stream) -> Option<(u32, u64)> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).ok()?;
    if u32::from_be_bytes([h[0], h[1], h[2], h[3]]) != SIMPLE_REPLY_MAGIC {
        return None;
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&h[8..16]);
    Some((
        u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        u64::from_be_bytes(c),
    ))
}

/// Read until the server closes the connection; how long that took, or `None` if it was
/// still open after `max` (what arrives meanwhile is discarded).
pub fn wait_closed(s: &mut Stream, max: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut b = vec![0u8; 64 << 10];
    loop {
        let left = max.checked_sub(t0.elapsed())?;
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(t0.elapsed()), // reset: closed too
        }
    }
}

/// What a connection flood got.
pub struct Flood {
    /// The connections the server admitted (they got the greeting); still open.
    pub held: Vec<Stream>,
    /// Connections the server closed at once.
    pub refused: usize,
    /// Connections that could not even be opened (connect failed).
    pub failed: usize,
}

/// Open `n` connections and keep those the server admits (it sends its greeting within
/// `wait`; a refused one is closed at once).
pub fn flood(t: &Target, n: usize, wait: Duration) -> Flood {
    let mut f = Flood {
        held: Vec::new(),
        refused: 0,
        failed: 0,
    };
    for _ in 0..n {
        match t.connect() {
            Ok(mut s) => {
                if greeting(&mut s, wait) {
                    f.held.push(s);
                } else {
                    f.refused += 1;
                }
            }
            Err(_) => f.failed += 1,
        }
    }
    f
}

/// A valid negotiation sent one byte every `gap` (slowloris); how long until the server
/// closed the connection, or `None` if it was still open after `max`.
pub fn slow_handshake(t: &Target, export: &str, gap: Duration, max: Duration) -> Option<Duration> {
    let mut s = t.connect().ok()?;
    let t0 = Instant::now();
    if !greeting(&mut s, Duration::from_secs(10)) {
        return Some(t0.elapsed());
    }
    let bytes = go_bytes(export);
    for b in bytes.iter().cycle() {
        if t0.elapsed() > max {
            return None;
        }
        if s.write_all(&[*b]).is_err() {
            return Some(t0.elapsed());
        }
        // A closed connection shows as EOF (or a reset) on a short read.
        let _ = s.set_read_timeout(Some(gap));
        let mut x = [0u8; 256];
        match s.read(&mut x) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

/// Connect and never say anything (a half-open client); how long until the server closed
/// the connection.
pub fn silent(t: &Target, max: Duration) -> Option<Duration> {
    let mut s = t.connect().ok()?;
    let t0 = Instant::now();
    wait_closed(&mut s, max).map(|_| t0.elapsed())
}

/// Negotiate, then queue `n` reads of `len` bytes and never read a reply (a client that
/// stopped reading). Returns the stream (nothing of it has been read since GO).
pub fn unread_replies(t: &Target, export: &str, n: u64, len: u32) -> io::Result<Stream> {
    let mut s = connect_go(t, export)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    for i in 0..n {
        // The server stops reading once its output backs up: stop writing then too.
        if s.write_all(&request(CMD_READ, i, 0, len)).is_err() {
            break;
        }
    }
    Ok(s)
}

/// Negotiate, then send (up to) `part` bytes of a write request (header and payload) and
/// stop. A server that does not take them within half a second gets what went out.
pub fn partial_request(t: &Target, export: &str, len: u32, part: usize) -> io::Result<Stream> {
    let mut s = connect_go(t, export)?;
    let mut v = request(CMD_WRITE, 1, 0, len).to_vec();
    v.resize(28 + (part.saturating_sub(28)).min(len as usize), 0x5a);
    s.set_write_timeout(Some(Duration::from_millis(500)))?;
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

/// Send one request with length `len` (`u32::MAX` is the 4 GiB attack) after GO; the
/// reply's error, or `None` if the server closed the connection without replying.
pub fn huge_request(t: &Target, export: &str, kind: u16, len: u32) -> io::Result<Option<u32>> {
    let mut s = connect_go(t, export)?;
    s.write_all(&request(kind, 7, 0, len))?;
    if kind == CMD_WRITE {
        // Some payload: a server that took the length at its word would wait for it.
        let _ = s.write_all(&vec![0u8; 1 << 20]);
    }
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(simple_reply(&mut s).map(|(e, _)| e))
}

/// A process's resident set size (VmRSS), in bytes.
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A psktool-format key file `dir/keys.psk` with a random key for `identity`, mode 0600
/// (see `nvmux_bench::tls`).
pub fn psk_file(dir: &Path, identity: &str) -> PathBuf {
    nvmux_bench::tls::psk_file(dir, identity).expect("a PSK file")
}

pub use nvmux_bench::tls::X509;

/// A CA with server and client certificates under `dir` (the `openssl` command).
pub fn x509(dir: &Path) -> X509 {
    nvmux_bench::tls::x509(dir).expect("X.509 credentials (the openssl command)")
}
