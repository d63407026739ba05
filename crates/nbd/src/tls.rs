//! TLS for NBD (`NBD_OPT_STARTTLS`), on the system OpenSSL (the `openssl` crate).
//!
//! Why OpenSSL and not rustls: qemu-nbd, nbdkit, qemu-img and libnbd speak TLS-PSK with
//! an external (out-of-band) key, and rustls has no external PSK (rustls/rustls#174). See
//! docs/nbd.md.
//!
//! Credentials are read when a listener starts ([`TlsServer::load`]):
//! * **PSK**: a file in psktool's format, one `identity:hexkey` per line, as qemu's
//!   `tls-creds-psk` (`DIR/keys.psk`) and nbdkit's `--tls-psk=FILE` read it. GnuTLS clients
//!   (qemu-img, nbdinfo, nbdcopy, fio) negotiate TLS 1.3 with an external PSK (found here
//!   through OpenSSL's PSK server callback), or TLS 1.2 PSK suites (`ECDHE-PSK`, `DHE-PSK`,
//!   `PSK`).
//! * **X.509**: a directory laid out as qemu's `tls-creds-x509` and nbdkit's
//!   `--tls-certificates` want it: `server-cert.pem`, `server-key.pem`, and `ca-cert.pem`
//!   (required to verify client certificates, `verify_peer`).
//!
//! In the transmission phase a connection's wire is a [`TlsWire`]: a non-blocking
//! `SslStream` whose reads go on until the socket is drained or the buffer is full (OpenSSL
//! holds decrypted bytes that no epoll edge would announce), and whose retried writes
//! repeat at least the bytes of the write that would have blocked.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvmux_core::{Error, ErrorKind, Result, Wire};
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions,
    SslRef, SslSessionCacheMode, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509Name;

/// Credentials of a TLS listener, as the operator gave them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsCreds {
    /// A psktool-format file: `identity:hexkey` per line.
    Psk { file: PathBuf },
    /// A directory with `server-cert.pem`, `server-key.pem` and (for `verify_peer`, and
    /// sent to clients as the accepted issuers) `ca-cert.pem`.
    X509 { dir: PathBuf, verify_peer: bool },
}

impl std::fmt::Display for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsCreds::Psk { file } => write!(f, "TLS-PSK ({})", file.display()),
            TlsCreds::X509 { dir, verify_peer } => write!(
                f,
                "TLS X.509 ({}{})",
                dir.display(),
                if *verify_peer {
                    ", client certificates verified"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Shortest PSK accepted (psktool makes 32 bytes).
const MIN_PSK: usize = 16;
/// Longest PSK and identity OpenSSL takes.
const MAX_PSK: usize = 256;
const MAX_IDENTITY: usize = 128;

/// A listener's TLS: an OpenSSL server context built from [`TlsCreds`].
pub struct TlsServer {
    ctx: SslContext,
    /// Where a session keeps the PSK identity its client gave (for log lines).
    identity: Index<Ssl, String>,
    creds: TlsCreds,
    /// What a log line says about it ("TLS-PSK, 2 identities from /etc/nvmux/keys.psk").
    summary: String,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary)
    }
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("{what}: {e}"))
}

/// A secret file must exist, be a regular file, and not be open to every user.
fn check_secret_file(p: &Path, what: &str) -> Result<()> {
    let m = std::fs::metadata(p).map_err(|e| {
        Error::new(
            if e.kind() == io::ErrorKind::NotFound {
                ErrorKind::NotFound
            } else {
                ErrorKind::InvalidArgument
            },
            format!("{what} {}: {e}", p.display()),
        )
    })?;
    if !m.is_file() {
        return Err(tls_err(
            &format!("{what} {}", p.display()),
            "not a regular file",
        ));
    }
    let mode = m.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(tls_err(
            &format!("{what} {}", p.display()),
            format!(
                "mode {:04o} lets every user read or change it; run chmod o-rwx on it",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Parse a psktool-format key file: `identity:hexkey` per line; blank lines and lines
/// starting with `#` are skipped.
pub fn parse_psk_file(text: &str) -> std::result::Result<HashMap<Vec<u8>, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let Some((id, hex)) = line.rsplit_once(':') else {
            return Err(format!("line {n} is not identity:hexkey"));
        };
        if id.is_empty() || id.len() > MAX_IDENTITY {
            return Err(format!(
                "line {n}: the identity has {} bytes (1 to {MAX_IDENTITY})",
                id.len()
            ));
        }
        let key = decode_hex(hex).ok_or_else(|| format!("line {n}: the key is not hex digits"))?;
        if !(MIN_PSK..=MAX_PSK).contains(&key.len()) {
            return Err(format!(
                "line {n}: the key of {id:?} has {} bytes ({MIN_PSK} to {MAX_PSK}; psktool makes 32)",
                key.len()
            ));
        }
        if keys.insert(id.as_bytes().to_vec(), key).is_some() {
            return Err(format!("line {n}: identity {id:?} appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("it holds no keys (one identity:hexkey per line)".into());
    }
    Ok(keys)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

fn base_context() -> std::result::Result<SslContextBuilder, openssl::error::ErrorStack> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
    b.set_options(
        SslOptions::NO_COMPRESSION
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::NO_TICKET
            | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    // Partial writes: a write returns once a record went out, so a slow reader's progress
    // is seen record by record. A retried write may come from another address (the same
    // bytes; the send buffer may have moved).
    b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    // Read ahead: one read takes as many records as the socket holds (a 4 KiB write is
    // a header record and a payload record; without it each record costs two reads). The
    // wire reads until OpenSSL needs the socket, so nothing read ahead is left behind.
    b.set_read_ahead(true);
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_num_tickets(0)?;
    Ok(b)
}

impl TlsServer {
    /// Read the credentials and build the context. Errors name the file and the fix.
    pub fn load(creds: &TlsCreds) -> Result<Arc<TlsServer>> {
        let mut b = base_context().map_err(|e| tls_err("OpenSSL context", e))?;
        let identity =
            Ssl::new_ex_index::<String>().map_err(|e| tls_err("OpenSSL session data", e))?;
        let summary = match creds {
            TlsCreds::Psk { file } => {
                check_secret_file(file, "PSK file")?;
                let text = std::fs::read_to_string(file)
                    .map_err(|e| Error::io(format!("PSK file {}", file.display()), e))?;
                let keys = parse_psk_file(&text)
                    .map_err(|e| tls_err(&format!("PSK file {}", file.display()), e))?;
                let n = keys.len();
                // TLS 1.3 (external PSK) and TLS 1.2 PSK suites, forward-secret first.
                b.set_cipher_list("ECDHE-PSK:DHE-PSK:PSK:!NULL:!3DES:!RC4:!MD5")
                    .map_err(|e| tls_err("PSK cipher list", e))?;
                b.set_psk_server_callback(move |ssl, id, out| {
                    let key = id.and_then(|i| keys.get(i));
                    match key {
                        Some(k) if k.len() <= out.len() => {
                            out[..k.len()].copy_from_slice(k);
                            if let Some(i) = id {
                                ssl.set_ex_data(identity, String::from_utf8_lossy(i).into_owned());
                            }
                            Ok(k.len())
                        }
                        // 0: unknown identity; the handshake fails.
                        _ => Ok(0),
                    }
                });
                format!(
                    "TLS-PSK, {n} {} from {}",
                    if n == 1 { "identity" } else { "identities" },
                    file.display()
                )
            }
            TlsCreds::X509 { dir, verify_peer } => {
                let cert = dir.join("server-cert.pem");
                let key = dir.join("server-key.pem");
                let ca = dir.join("ca-cert.pem");
                if !cert.exists() {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!("{} is missing (the X.509 directory needs server-cert.pem and server-key.pem, and ca-cert.pem to verify clients)", cert.display()),
                    ));
                }
                check_secret_file(&key, "server key")?;
                b.set_certificate_chain_file(&cert)
                    .map_err(|e| tls_err(&format!("certificate {}", cert.display()), e))?;
                b.set_private_key_file(&key, SslFiletype::PEM)
                    .map_err(|e| tls_err(&format!("key {}", key.display()), e))?;
                b.check_private_key().map_err(|e| {
                    tls_err(
                        &format!("{} and {}", cert.display(), key.display()),
                        format!("the key does not match the certificate ({e})"),
                    )
                })?;
                b.set_cipher_list("HIGH:!aNULL:!eNULL:!PSK:!SRP:!3DES:!MD5")
                    .map_err(|e| tls_err("X.509 cipher list", e))?;
                if *verify_peer {
                    if !ca.exists() {
                        return Err(Error::new(
                            ErrorKind::NotFound,
                            format!(
                                "{} is missing: verify_peer needs the CA that signs client certificates",
                                ca.display()
                            ),
                        ));
                    }
                    b.set_ca_file(&ca)
                        .map_err(|e| tls_err(&format!("CA {}", ca.display()), e))?;
                    let names = X509Name::load_client_ca_file(&ca)
                        .map_err(|e| tls_err(&format!("CA {}", ca.display()), e))?;
                    b.set_client_ca_list(names);
                    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                } else {
                    b.set_verify(SslVerifyMode::NONE);
                }
                format!(
                    "TLS X.509 from {}{}",
                    dir.display(),
                    if *verify_peer {
                        ", client certificates required"
                    } else {
                        ""
                    }
                )
            }
        };
        Ok(Arc::new(TlsServer {
            ctx: b.build(),
            identity,
            creds: creds.clone(),
            summary,
        }))
    }

    pub fn creds(&self) -> &TlsCreds {
        &self.creds
    }

    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// Who the client of a finished handshake is: its PSK identity, or its certificate's
    /// subject; and the protocol version.
    pub(crate) fn peer_of(&self, ssl: &SslRef) -> String {
        let who = match ssl.ex_data(self.identity) {
            Some(id) => format!("psk identity {id:?}"),
            None => match ssl.peer_certificate() {
                Some(c) => {
                    let subject: Vec<String> = c
                        .subject_name()
                        .entries()
                        .filter_map(|e| {
                            Some(format!(
                                "{}={}",
                                e.object().nid().short_name().ok()?,
                                e.data().to_string().ok()?
                            ))
                        })
                        .collect();
                    format!("certificate {}", subject.join(","))
                }
                None => "no client certificate".into(),
            },
        };
        format!("{}, {who}", ssl.version_str())
    }

    /// A new server-side session.
    pub(crate) fn session(&self) -> std::result::Result<Ssl, openssl::error::ErrorStack> {
        Ssl::new(&self.ctx)
    }
}

/// An accepted socket, before or under TLS.
pub(crate) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
        }
    }
    fn write_vectored(&mut self, b: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(b),
            Sock::Unix(s) => s.write_vectored(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Wire for Sock {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write(buf)
    }
    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_vectored(bufs)
    }
    fn fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// Map an OpenSSL I/O error: `WANT_*` is "try again after the next edge".
pub(crate) fn ssl_io_error(e: openssl::ssl::Error) -> io::Error {
    match e.code() {
        ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => io::ErrorKind::WouldBlock.into(),
        ErrorCode::ZERO_RETURN => io::ErrorKind::UnexpectedEof.into(),
        _ => match e.into_io_error() {
            Ok(io) => io,
            Err(e) => io::Error::other(e.to_string()),
        },
    }
}

/// Small slices are gathered into one record of up to this many bytes; a first slice at
/// least this long is written as it is.
const STAGE: usize = 16 << 10;

/// The transmission phase's wire over TLS.
pub struct TlsWire {
    s: SslStream<Sock>,
    eof: bool,
    stage: Vec<u8>,
    /// Bytes the last write that would have blocked was given: its retry gives at least
    /// as many (OpenSSL's rule), which the connection guarantees by sending from the same
    /// place in its stream.
    retry_len: usize,
}

impl TlsWire {
    pub(crate) fn new(s: SslStream<Sock>) -> TlsWire {
        TlsWire {
            s,
            eof: false,
            stage: Vec::new(),
            retry_len: 0,
        }
    }

    fn write_out(&mut self, staged: bool, direct: &[u8]) -> io::Result<usize> {
        let data = if staged { &self.stage[..] } else { direct };
        if data.len() < self.retry_len {
            return Err(io::Error::other(
                "TLS write retried with fewer bytes than the write that blocked",
            ));
        }
        match self.s.ssl_write(data) {
            Ok(k) => {
                self.retry_len = 0;
                Ok(k)
            }
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => {
                self.retry_len = data.len();
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(ssl_io_error(e)),
        }
    }
}

impl Wire for TlsWire {
    /// Read until the buffer is full or OpenSSL needs the socket (drained): a short read
    /// means no decrypted byte is left behind without an edge to announce it.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() && !self.eof {
            match self.s.ssl_read(&mut buf[n..]) {
                Ok(0) => self.eof = true,
                Ok(k) => n += k,
                Err(e) => match e.code() {
                    ErrorCode::WANT_READ | ErrorCode::WANT_WRITE if n > 0 => break,
                    ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => {
                        return Err(io::ErrorKind::WouldBlock.into())
                    }
                    ErrorCode::ZERO_RETURN => self.eof = true,
                    _ if n > 0 => {
                        // Hand over what was read; the error shows as the end next time.
                        self.eof = true;
                    }
                    _ => return Err(ssl_io_error(e)),
                },
            }
        }
        Ok(n)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_out(false, buf)
    }

    fn send_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Ok(0);
        };
        if bufs[first].len() >= STAGE || bufs[first + 1..].iter().all(|b| b.is_empty()) {
            return self.write_out(false, &bufs[first]);
        }
        // Gather the small pieces (reply headers, small reads) into one record.
        self.stage.clear();
        for b in &bufs[first..] {
            let k = b.len().min(STAGE - self.stage.len());
            self.stage.extend_from_slice(&b[..k]);
            if self.stage.len() == STAGE {
                break;
            }
        }
        self.write_out(true, &[])
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.s.get_ref().as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files() {
        let k = "00112233445566778899aabbccddeeff";
        let m = parse_psk_file(&format!("# keys\nalice:{k}\n\nbob:{k}{k}\n")).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[&b"alice".to_vec()].len(), 16);
        assert_eq!(m[&b"bob".to_vec()].len(), 32);
        // An identity may hold a colon (the key is after the last one).
        assert!(parse_psk_file(&format!("a:b:{k}"))
            .unwrap()
            .contains_key(b"a:b".as_slice()));
        for (bad, why) in [
            ("", "no keys"),
            ("alice", "not identity:hexkey"),
            (":00112233445566778899aabbccddeeff", "identity has 0 bytes"),
            ("alice:0011", "has 2 bytes"),
            ("alice:zz112233445566778899aabbccddeeff", "not hex"),
            ("alice:0011223344556677889", "not hex"),
        ] {
            let e = parse_psk_file(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let e = parse_psk_file(&format!("alice:{k}\nalice:{k}")).unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn credentials_are_checked_when_loaded() {
        let d = std::env::temp_dir().join(format!("nvmux-nbd-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("keys.psk");
        let e = TlsServer::load(&TlsCreds::Psk { file: f.clone() }).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        std::fs::write(&f, "alice:00112233445566778899aabbccddeeff\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = TlsServer::load(&TlsCreds::Psk { file: f.clone() }).unwrap_err();
        assert!(e.to_string().contains("chmod o-rwx"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = TlsServer::load(&TlsCreds::Psk { file: f.clone() }).unwrap();
        assert!(s.summary().contains("1 identity"), "{}", s.summary());
        let e = TlsServer::load(&TlsCreds::X509 {
            dir: d.clone(),
            verify_peer: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("server-cert.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
