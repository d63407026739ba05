//! A small HTTP/1.1 client for the API socket (used by the CLI, the benchmarks and tests).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// An API error: the HTTP status and the daemon's message.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}

pub struct ApiClient {
    path: PathBuf,
}

impl ApiClient {
    pub fn new(path: &Path) -> Self {
        ApiClient {
            path: path.to_path_buf(),
        }
    }

    /// Send one request; returns the body (JSON, or text for /metrics).
    pub fn call_raw(
        &self,
        method: &str,
        route: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), ApiError> {
        let conn_err = |e: std::io::Error| ApiError {
            status: 0,
            message: connect_error(&self.path, &e),
        };
        let mut s = UnixStream::connect(&self.path).map_err(conn_err)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(conn_err)?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {route} HTTP/1.1\r\nHost: nvmux\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        // A daemon that refuses this client answers at once and closes: the write may
        // then fail (broken pipe) and the read end early (reset), while its reply is
        // already here. So a failed write or read is reported only if no reply came.
        let sent = s.write_all(req.as_bytes());
        let mut resp = Vec::new();
        let read = read_reply(&mut s, &mut resp);
        if resp.is_empty() {
            sent.and(read).map_err(|e| ApiError {
                status: 0,
                message: format!(
                    "the nvmux daemon at {} closed the connection: {e}",
                    self.path.display()
                ),
            })?;
        }
        let text = String::from_utf8_lossy(&resp);
        let bad = || ApiError {
            status: 0,
            message: "malformed response from the daemon".into(),
        };
        let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(bad)?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Ok((status, body))
    }

    /// Send one request and parse the JSON reply; non-2xx statuses become `Err`.
    pub fn call(&self, method: &str, route: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let (status, text) = self.call_raw(method, route, body)?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            let mut message = v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            if status == 403 && v["kind"] == "permission_denied" {
                message = format!(
                    "the nvmux daemon at {} refused this client: {message}",
                    self.path.display()
                );
            }
            Err(ApiError { status, message })
        }
    }

    pub fn get(&self, route: &str) -> Result<Value, ApiError> {
        self.call("GET", route, None)
    }
    pub fn post(&self, route: &str, body: &Value) -> Result<Value, ApiError> {
        self.call("POST", route, Some(body))
    }
    pub fn delete(&self, route: &str) -> Result<Value, ApiError> {
        self.call("DELETE", route, None)
    }
}

/// Read a reply until the end of the stream, or until as many body bytes as its
/// `Content-Length` says have arrived.
fn read_reply(s: &mut UnixStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut buf = [0u8; 16384];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.extend_from_slice(buf.get(..n).unwrap_or(&[]));
        if reply_complete(out) {
            return Ok(());
        }
    }
}

fn reply_complete(r: &[u8]) -> bool {
    let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(r.get(..end).unwrap_or(&[])).to_ascii_lowercase();
    let len = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    len.is_some_and(|n| r.len() >= end + 4 + n)
}

/// Why the client could not connect, with what the operator can do about it. A refused
/// connect (EACCES) names the socket's mode and owner and the caller's uid.
fn connect_error(path: &Path, e: &std::io::Error) -> String {
    use nvmux_core::unixsock::{describe_gid, describe_uid};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return format!(
            "cannot reach the nvmux daemon at {}: {e} (is `nvmux serve` running? use --api to point elsewhere)",
            path.display()
        );
    }
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let me = format!("{}, {}", describe_uid(uid), describe_gid(gid));
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "permission denied connecting to the nvmux API socket {}: it is mode {:04o}, owner {}, group {}, and this client runs as {me}. Connecting needs write permission on the socket. The daemon's operator can set [api] group (mode 0660) and add you to allow_uids or allow_gids in its configuration, or run this command as root.",
            path.display(),
            m.permissions().mode() & 0o7777,
            describe_uid(m.uid()),
            describe_gid(m.gid()),
        ),
        Err(_) => format!(
            "permission denied connecting to the nvmux API socket {}: a directory on its path is not searchable by this client ({me}). The daemon's operator can put the socket (api_socket) in a directory you can reach, and allow you in [api] of its configuration.",
            path.display()
        ),
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((len, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}
