//! The API socket's HTTP/1.1 server side: one request per connection, strict limits.
//!
//! nvmux reads requests itself (rather than through an HTTP library) because it must see
//! each accepted socket before anything is read from it: the peer's credentials
//! (`SO_PEERCRED`) decide whether a single byte of the request is parsed (see
//! `api.rs`). The API needs little of HTTP: a request line, `Content-Length`,
//! `Expect: 100-continue` (curl sends it for larger bodies) and a body of at most
//! [`MAX_BODY`] bytes. Every reply carries `Connection: close`.
//!
//! Limits, checked before memory is reserved: the head (request line and headers) is at
//! most [`MAX_HEAD`] bytes with at most [`MAX_HEADERS`] headers; the request target at
//! most [`MAX_TARGET`] bytes; the body at most [`MAX_BODY`] bytes, announced by
//! `Content-Length` (chunked request bodies are refused with 501).

use std::io::{Read, Write};
use std::time::Duration;

/// Largest request head (request line and headers), bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in a request.
pub const MAX_HEADERS: usize = 64;
/// Longest request target (path and query), bytes.
pub const MAX_TARGET: usize = 4096;
/// Largest request body, bytes.
pub const MAX_BODY: u64 = 1 << 20;
/// How long a client may take to send its request, and to take the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// Path and query, as sent (not percent-decoded).
    pub target: String,
    pub content_length: u64,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
}

/// Why a request head was refused: the HTTP status and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadError {
    pub status: u16,
    pub msg: String,
}

fn bad(status: u16, msg: impl Into<String>) -> HeadError {
    HeadError {
        status,
        msg: msg.into(),
    }
}

/// Where the head ends in `buf` (the index just past its empty line), if it is complete.
/// Lines end with CRLF; a bare LF is accepted too (RFC 9112 section 2.2).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parse a request head at the start of `buf`. `Ok(None)`: not complete yet (read more,
/// unless `buf` already holds [`MAX_HEAD`] bytes, which is reported as an error here).
/// `Ok(Some((head, n)))`: the head is the first `n` bytes; the body follows.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let Some(end) = head_end(buf) else {
        if buf.len() >= MAX_HEAD {
            return Err(bad(
                431,
                format!("the request head is larger than {MAX_HEAD} bytes"),
            ));
        }
        return Ok(None);
    };
    if end > MAX_HEAD {
        return Err(bad(
            431,
            format!("the request head is larger than {MAX_HEAD} bytes"),
        ));
    }
    let text = buf
        .get(..end)
        .ok_or_else(|| bad(400, "malformed request head"))?;
    if text
        .iter()
        .any(|&b| b >= 0x80 || (b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')) || b == 0x7f)
    {
        return Err(bad(
            400,
            "the request head holds non-ASCII or control bytes",
        ));
    }
    // ASCII checked above, so this cannot fail; still no panic if it did.
    let text = std::str::from_utf8(text).map_err(|_| bad(400, "malformed request head"))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(400, format!("malformed request line {request_line:?}")));
    };
    if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad(400, format!("malformed method {method:?}")));
    }
    if !target.starts_with('/') {
        return Err(bad(
            400,
            format!("request target {target:?} must start with /"),
        ));
    }
    if target.len() > MAX_TARGET {
        return Err(bad(
            414,
            format!("the request target is longer than {MAX_TARGET} bytes"),
        ));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(bad(
            505,
            format!("{version:?} is not supported; use HTTP/1.1"),
        ));
    }
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    let mut n = 0;
    for line in lines {
        if line.is_empty() {
            break; // the head's end
        }
        n += 1;
        if n > MAX_HEADERS {
            return Err(bad(431, format!("more than {MAX_HEADERS} header lines")));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(400, format!("malformed header line {line:?}")));
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(bad(400, format!("malformed header name {name:?}")));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(400, format!("bad Content-Length {value:?}")));
            }
            let v: u64 = value
                .parse()
                .map_err(|_| bad(400, format!("bad Content-Length {value:?}")))?;
            if content_length.is_some_and(|c| c != v) {
                return Err(bad(400, "conflicting Content-Length headers"));
            }
            content_length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad(
                501,
                "Transfer-Encoding is not supported in requests: send the body with Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            } else {
                return Err(bad(417, format!("unknown expectation {value:?}")));
            }
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(bad(
            413,
            format!("the request body is {content_length} bytes; at most {MAX_BODY} are accepted"),
        ));
    }
    Ok(Some((
        Head {
            method: method.to_string(),
            target: target.to_string(),
            content_length,
            expect_continue,
        },
        end,
    )))
}

/// A request read whole: its head and its body.
#[derive(Debug)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

/// A reply: status, content type, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// `{"error": msg, "kind": kind}`, the API's error shape.
    pub fn error(status: u16, kind: &str, msg: &str) -> Response {
        let v = serde_json::json!({ "error": msg, "kind": kind });
        Response::json(
            status,
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
        )
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        v.extend_from_slice(self.body.as_bytes());
        v
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        414 => "URI Too Long",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Read one request from `s`: the head (at most [`MAX_HEAD`] bytes), then exactly
/// `Content-Length` body bytes. Bytes after the body are not read (the connection is
/// closed after the reply). On a bad request, the reply to send is the error.
pub fn read_request<S: Read + Write>(s: &mut S) -> Result<Request, Option<Response>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut have = 0usize;
    let (head, used) = loop {
        match parse_head(buf.get(..have).unwrap_or(&[])) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(Some(Response::error(e.status, "invalid_argument", &e.msg))),
        }
        let room = buf.get_mut(have..).unwrap_or(&mut []);
        match read_some(s, room, "a complete request head")? {
            0 if have == 0 => return Err(None), // connected and left: nothing to answer
            0 => {
                return Err(Some(Response::error(
                    400,
                    "invalid_argument",
                    "the connection closed in the middle of the request head",
                )))
            }
            n => have += n,
        }
    };
    // content_length <= MAX_BODY (checked by parse_head), so this fits in memory.
    let want = head.content_length as usize;
    let mut body: Vec<u8> = buf.get(used..have).unwrap_or(&[]).to_vec();
    body.truncate(want);
    if body.len() < want
        && head.expect_continue
        && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
    {
        return Err(None);
    }
    let mut filled = body.len();
    body.resize(want, 0);
    while filled < want {
        match read_some(
            s,
            body.get_mut(filled..).unwrap_or(&mut []),
            "the request body",
        )? {
            0 => {
                return Err(Some(Response::error(
                    400,
                    "invalid_argument",
                    &format!(
                        "the connection closed after {filled} of {want} body bytes (Content-Length)"
                    ),
                )))
            }
            n => filled += n,
        }
    }
    Ok(Request { head, body })
}

/// One read into `room` (0 at the end of the stream), retried when interrupted. A read
/// timeout answers 408 naming what did not arrive; any other error closes silently.
fn read_some<S: Read>(s: &mut S, room: &mut [u8], what: &str) -> Result<usize, Option<Response>> {
    loop {
        match s.read(room) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Some(Response::error(
                    408,
                    "invalid_argument",
                    &format!("{what} did not arrive within {} s", IO_TIMEOUT.as_secs()),
                )))
            }
            Err(_) => return Err(None),
        }
    }
}

/// Fuzz harness: the head parser and the request reader on arbitrary bytes.
pub fn fuzz_request(data: &[u8]) {
    if let Ok(Some((h, n))) = parse_head(data) {
        assert!(n <= data.len() && n <= MAX_HEAD);
        assert!(h.content_length <= MAX_BODY && h.target.len() <= MAX_TARGET);
    }
    struct Mem<'a> {
        input: &'a [u8],
        out: Vec<u8>,
    }
    impl Read for Mem<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            // Small reads, so heads split across reads are exercised.
            let n = b.len().min(self.input.len()).min(97);
            let (a, rest) = self.input.split_at(n);
            b.get_mut(..n).unwrap_or(&mut []).copy_from_slice(a);
            self.input = rest;
            Ok(n)
        }
    }
    impl Write for Mem<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.out.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut m = Mem {
        input: data,
        out: Vec::new(),
    };
    match read_request(&mut m) {
        Ok(r) => assert_eq!(r.body.len() as u64, r.head.content_length),
        Err(Some(resp)) => assert!(resp.status >= 400),
        Err(None) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<(Head, usize)>, HeadError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn parses_requests() {
        let (h, n) = head("GET /v1/disks?x=1 HTTP/1.1\r\nHost: x\r\n\r\nrest")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.target, "/v1/disks?x=1");
        assert_eq!(h.content_length, 0);
        assert_eq!(n, "GET /v1/disks?x=1 HTTP/1.1\r\nHost: x\r\n\r\n".len());
        let (h, _) =
            head("POST /v1/disks HTTP/1.0\ncontent-length:  12 \nExpect: 100-Continue\n\n")
                .unwrap()
                .unwrap();
        assert_eq!((h.content_length, h.expect_continue), (12, true));
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap(), None);
        assert_eq!(head("").unwrap(), None);
    }

    #[test]
    fn refuses_bad_heads() {
        let status = |s: &str| head(s).unwrap_err().status;
        assert_eq!(status("GET /\r\n\r\n"), 400);
        assert_eq!(status("get / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2\r\n\r\n"), 505);
        assert_eq!(status("GET /  HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nNo colon\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nA b: c\r\n\r\n"), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"),
            413
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(status("POST / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        assert_eq!(status("GET /\u{e9} HTTP/1.1\r\n\r\n"), 400);
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "A: b\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(status(&many), 431);
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET));
        assert_eq!(status(&long), 414);
        let huge = format!("GET / HTTP/1.1\r\nA: {}", "b".repeat(MAX_HEAD));
        assert_eq!(status(&huge), 431);
    }

    #[test]
    fn reads_body_and_continue() {
        use std::os::unix::net::UnixStream;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            b.write_all(
                b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            )
            .unwrap();
            let mut c = [0u8; 25];
            b.read_exact(&mut c).unwrap();
            assert_eq!(&c, b"HTTP/1.1 100 Continue\r\n\r\n");
            b.write_all(b"hello, and more").unwrap();
        });
        let r = read_request(&mut a).unwrap();
        assert_eq!(r.body, b"hello");
        t.join().unwrap();
    }

    #[test]
    fn truncated_body_is_an_error() {
        use std::os::unix::net::UnixStream;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        drop(b);
        let e = read_request(&mut a).unwrap_err().unwrap();
        assert_eq!(e.status, 400);
    }

    fn corpus() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/api_http")
    }

    #[test]
    fn replay_corpus() {
        let mut n = 0;
        for e in std::fs::read_dir(corpus()).expect("the api_http corpus") {
            let b = std::fs::read(e.expect("entry").path()).expect("seed");
            fuzz_request(&b);
            n += 1;
        }
        assert!(n >= 5, "seeds missing");
    }

    #[test]
    fn random_inputs() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        let base = b"POST /v1/exports HTTP/1.1\r\nHost: nvmux\r\nContent-Length: 16\r\nExpect: 100-continue\r\n\r\n{\"disk\": \"db1\"}\n".to_vec();
        for _ in 0..5000 {
            let mut v = base.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % v.len();
                v[i] = (x >> 32) as u8;
            }
            fuzz_request(&v);
            let cut = (x as usize) % v.len();
            fuzz_request(&v[..cut]);
        }
    }
}
