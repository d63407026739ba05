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
        let conn_err = |e: std::io::Error| {
            ApiError {
            status: 0,
            message: format!(
                "cannot reach the nvmux daemon at {}: {e} (is `nvmux serve` running? use --api to point elsewhere)",
                self.path.display()
            ),
        }
        };
        let mut s = UnixStream::connect(&self.path).map_err(conn_err)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(conn_err)?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {route} HTTP/1.1\r\nHost: nvmux\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        s.write_all(req.as_bytes()).map_err(conn_err)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(conn_err)?;
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
            let message = v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
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
