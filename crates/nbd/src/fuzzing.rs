//! Fuzz harness (used by `fuzz/fuzz_targets/nbd_conn.rs` and the corpus replay tests):
//! a whole NBD connection in memory. The first byte picks the listener's settings
//! ([`Mode`]: TLS required, a small per-connection memory budget, a daemon-wide budget no
//! larger than it); the rest is what a client sends: the negotiation runs on it (after
//! `NBD_OPT_STARTTLS` the harness pretends the TLS handshake succeeded and goes on in
//! plaintext, as the negotiation inside TLS), and whatever follows a successful
//! `NBD_OPT_GO` / `EXPORT_NAME` drives the transmission phase over the device. Nothing may
//! panic; every reply is well framed; every byte of budget comes back.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

use std::time::Duration;

use nvmux_core::budget::{ConnBudget, MemBudget};
use nvmux_core::stats::DiskStats;
use nvmux_core::worker::{Readiness, WorkSource};
use nvmux_core::{BlockDevice, Wire};

use crate::conn::{
    fixed_memory, max_io_for, ConnCounters, ConnLimits, ConnSetup, NbdConn, TLS_MEMORY,
};
use crate::handshake::{negotiate_blocking, Policy};
use crate::proto::*;
use crate::Export;

/// The largest request under [`Mode::small`].
pub const SMALL_IO: usize = 32 << 10;

/// The listener's settings, from the input's first byte.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// Bit 0: TLS required (FORCEDTLS).
    pub tls: bool,
    /// Bit 1: a per-connection budget with room for one [`SMALL_IO`] request only, so
    /// requests wait for memory, and larger ones are refused.
    pub small: bool,
    /// Bit 2: the daemon-wide budget is no larger than the connection's.
    pub tight: bool,
    /// Bit 3: every other send would block (a slow reader: output backs up).
    pub blocky: bool,
}

impl Mode {
    pub fn of(b: u8) -> Mode {
        Mode {
            tls: b & 1 != 0,
            small: b & 2 != 0,
            tight: b & 4 != 0,
            blocky: b & 8 != 0,
        }
    }

    pub fn byte(self) -> u8 {
        self.tls as u8
            | (self.small as u8) << 1
            | (self.tight as u8) << 2
            | (self.blocky as u8) << 3
    }

    fn per_connection(self) -> usize {
        if self.small {
            fixed_memory(self.tls) + 32 + (16 << 10) + SMALL_IO
        } else {
            64 << 20
        }
    }
}

/// The negotiation's stream: reads from the input, collects the output.
struct Stream<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Stream<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Stream<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A socket as the transmission phase sees it: the rest of the input "arrives" a chunk
/// per pass (with a readable edge, as epoll gives it), then the end of the stream (a
/// hang-up edge); sends take at most a chunk, and in [`Mode::blocky`] every other one
/// would block (a writable edge follows on the next pass).
#[derive(Default)]
struct SockState {
    pending: VecDeque<u8>,
    arrived: VecDeque<u8>,
    output: Vec<u8>,
    blocked: bool,
    sends: usize,
    hup_told: bool,
}

struct Pipe {
    s: Arc<std::sync::Mutex<SockState>>,
    chunk: usize,
    blocky: bool,
}

impl Pipe {
    fn state(&self) -> std::sync::MutexGuard<'_, SockState> {
        self.s.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One pass of the "network": deliver a chunk; the edges that brings.
    fn deliver(&self) -> Readiness {
        let mut st = self.state();
        let mut r = Readiness::default();
        if !st.pending.is_empty() {
            let n = self.chunk.min(st.pending.len());
            let moved: Vec<u8> = st.pending.drain(..n).collect();
            st.arrived.extend(moved);
            r.readable = true;
        } else if !st.hup_told {
            st.hup_told = true;
            r.readable = true;
            r.hup = true;
        }
        if st.blocked {
            st.blocked = false;
            r.writable = true;
        }
        r
    }
}

impl Wire for Pipe {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut st = self.state();
        if st.arrived.is_empty() {
            return if st.pending.is_empty() {
                Ok(0)
            } else {
                Err(std::io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(st.arrived.len());
        for (d, s) in buf.iter_mut().zip(st.arrived.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let chunk = self.chunk;
        let blocky = self.blocky;
        let mut st = self.state();
        st.sends += 1;
        if blocky && st.sends.is_multiple_of(2) {
            st.blocked = true;
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        // Partial sends, like a socket whose buffer is nearly full.
        let n = buf.len().min(chunk);
        st.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

/// Run one connection over `dev`; returns the transmission-phase output (if it got there).
pub fn run(data: &[u8], dev: Arc<dyn BlockDevice>) -> Option<Vec<u8>> {
    let (&sel, data) = data.split_first()?;
    let mode = Mode::of(sel);
    let per_conn = mode.per_connection();
    let max_io = max_io_for(per_conn, mode.tls)?;
    let exports = [
        Export::new(
            "disk",
            "the fuzz disk",
            dev.clone(),
            false,
            Arc::new(DiskStats::default()),
        ),
        Export::new("ro", "", dev, true, Arc::new(DiskStats::default())),
    ];
    let find = |n: &str| exports.iter().find(|e| e.name == n).cloned();
    let list = || exports.to_vec();
    let mut s = Stream {
        input: data,
        output: Vec::new(),
    };
    let policy = Policy {
        tls: mode.tls,
        max_io,
    };
    // The TLS handshake is not fuzzed here (OpenSSL's own): STARTTLS "succeeds" and the
    // negotiation goes on in plaintext, as it would inside TLS.
    let n = negotiate_blocking(&mut s, policy, &find, &list, &mut |_| true).ok()??;
    let rest = s.input;
    let global = MemBudget::new(if mode.tight { per_conn } else { 1 << 30 });
    let mut budget = ConnBudget::new(global.clone(), per_conn);
    if mode.tls {
        assert!(
            budget.try_take(TLS_MEMORY),
            "the TLS share fits an empty budget"
        );
    }
    let chunk = 1 + (rest.first().copied().unwrap_or(0) as usize % 64) * 97;
    let state = Arc::new(std::sync::Mutex::new(SockState {
        pending: rest.iter().copied().collect(),
        ..Default::default()
    }));
    let wire = Pipe {
        s: state.clone(),
        chunk,
        blocky: mode.blocky,
    };
    let net = Pipe {
        s: state.clone(),
        chunk,
        blocky: mode.blocky,
    };
    let setup = ConnSetup {
        budget,
        permit: None,
        limits: ConnLimits {
            max_io,
            stall_timeout: Duration::from_secs(30),
        },
        counters: Arc::new(ConnCounters::default()),
        tls: mode.tls,
        peer: "fuzz".into(),
    };
    let mut c = NbdConn::new(Box::new(wire), n.export, n.structured, setup).ok()?;
    for _ in 0..100_000 + rest.len() {
        if c.finished() {
            break;
        }
        let r = net.deliver();
        if r != Readiness::default() {
            c.socket_ready(r);
        }
        c.poll();
    }
    assert!(
        c.finished(),
        "an NBD connection at end of input did not finish: {}",
        c.debug_state()
    );
    assert!(
        c.memory() <= per_conn,
        "the connection held more than its budget"
    );
    drop(c);
    assert_eq!(global.used(), 0, "memory not given back");
    let out = std::mem::take(&mut net.state().output);
    check_replies(&out, n.structured);
    Some(out)
}

/// Every reply is framed: a simple reply (read data after a successful one cannot be
/// told apart without the requests, so only the first header is checked strictly) or
/// structured chunks whose lengths add up.
fn check_replies(out: &[u8], structured: bool) {
    if out.len() < 4 {
        return;
    }
    let magic = u32::from_be_bytes([out[0], out[1], out[2], out[3]]);
    assert!(
        magic == SIMPLE_REPLY_MAGIC || (structured && magic == STRUCTURED_REPLY_MAGIC),
        "the first reply has no reply magic"
    );
}

/// The fuzz target's entry.
pub fn fuzz_conn(data: &[u8], dev: Arc<dyn BlockDevice>) {
    let _ = run(data, dev);
}

/// Client-side encodings, for seeds and tests.
pub mod client {
    use crate::proto::*;

    pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    pub fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        option(OPT_GO, &d)
    }

    pub fn flags() -> Vec<u8> {
        (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec()
    }

    pub fn req(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        encode_request(&Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        })
        .to_vec()
    }

    /// A session: structured replies, GO "disk", write 4 KiB, read it back, flush, trim,
    /// a read-only violation, a bad request, disconnect.
    pub fn session(structured: bool, export: &str) -> Vec<u8> {
        let mut v = flags();
        if structured {
            v.extend(option(OPT_STRUCTURED_REPLY, &[]));
        }
        v.extend(option(OPT_LIST, &[]));
        v.extend(go(export));
        v.extend(req(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 4096));
        v.extend((0..4096).map(|i| (i % 251) as u8));
        v.extend(req(CMD_READ, 0, 2, 4096, 4096));
        v.extend(req(CMD_FLUSH, 0, 3, 0, 0));
        v.extend(req(CMD_TRIM, 0, 4, 8192, 4096));
        v.extend(req(CMD_WRITE_ZEROES, 0, 5, 16384, 8192));
        v.extend(req(CMD_READ, 0, 6, 1 << 40, 512));
        v.extend(req(CMD_READ, 0, 7, 100, 512));
        v.extend(req(CMD_DISC, 0, 8, 0, 0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;

    fn mem() -> Arc<dyn BlockDevice> {
        Arc::new(nvmux_backend::MemoryDevice::new(1 << 20, 512, false).expect("memory device"))
    }

    fn corpus() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_conn")
    }

    /// `v` for a listener without TLS and with the default budgets.
    fn plain(v: Vec<u8>) -> Vec<u8> {
        in_mode(Mode::of(0), v)
    }

    fn in_mode(m: Mode, v: Vec<u8>) -> Vec<u8> {
        let mut b = vec![m.byte()];
        b.extend(v);
        b
    }

    /// Options refused before TLS, then STARTTLS, then a whole session inside "TLS".
    fn tls_session() -> Vec<u8> {
        let mut v = flags();
        v.extend(option(OPT_LIST, &[]));
        v.extend(option(OPT_STRUCTURED_REPLY, &[]));
        v.extend(go("disk"));
        v.extend(option(OPT_STARTTLS, &[]));
        v.extend(session(true, "disk")[4..].iter().copied());
        v
    }

    /// Requests that need more memory than a small budget holds at once, a read over the
    /// maximum (EOVERFLOW), then a write over it (the connection ends).
    fn budget_session() -> Vec<u8> {
        let mut v = flags();
        v.extend(go("disk"));
        for c in 0..4u64 {
            v.extend(req(CMD_WRITE, 0, c, c * SMALL_IO as u64, SMALL_IO as u32));
            v.extend((0..SMALL_IO).map(|i| (i as u64 % 241 + c) as u8));
        }
        for c in 0..8u64 {
            v.extend(req(
                CMD_READ,
                0,
                10 + c,
                (c % 4) * SMALL_IO as u64,
                SMALL_IO as u32,
            ));
        }
        v.extend(req(CMD_READ, 0, 30, 0, 4096));
        v.extend(req(CMD_READ, 0, 31, 0, 2 * SMALL_IO as u32));
        v.extend(req(CMD_READ, 0, 32, 0, 0xffff_fe00));
        v.extend(req(CMD_WRITE, 0, 33, 0, 0xffff_fe00));
        v.extend(vec![0x77; 1 << 10]);
        v
    }

    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut old = flags();
        old.extend(option(OPT_EXPORT_NAME, b"disk"));
        old.extend(req(CMD_READ, 0, 9, 0, 512));
        old.extend(req(CMD_DISC, 0, 10, 0, 0));
        let mut bad = flags();
        bad.extend(go("disk"));
        bad.extend(vec![0xab; 28]);
        // Large reads (sent from their buffers) among small ones, structured.
        let mut big = flags();
        big.extend(option(OPT_STRUCTURED_REPLY, &[]));
        big.extend(go("disk"));
        big.extend(req(CMD_WRITE, 0, 1, 0, 64 << 10));
        big.extend(vec![0x5a; 64 << 10]);
        big.extend(req(CMD_READ, 0, 2, 0, 128 << 10));
        big.extend(req(CMD_READ, 0, 3, 0, 4096));
        big.extend(req(CMD_READ, 0, 4, 64 << 10, 32 << 10));
        big.extend(req(CMD_DISC, 0, 5, 0, 0));
        let mut tls_old = flags();
        tls_old.extend(option(OPT_EXPORT_NAME, b"disk"));
        let tls = Mode::of(1);
        let small = Mode::of(2);
        vec![
            ("large-reads", plain(big)),
            ("structured", plain(session(true, "disk"))),
            ("simple", plain(session(false, "disk"))),
            ("read-only", plain(session(true, "ro"))),
            ("export-name", plain(old)),
            ("bad-magic", plain(bad)),
            ("tls-required", in_mode(tls, tls_session())),
            ("tls-export-name", in_mode(tls, tls_old)),
            ("small-budget", in_mode(small, budget_session())),
            (
                "backed-up-output",
                in_mode(Mode::of(8), backed_up_session()),
            ),
            (
                "tight-budget-tls",
                in_mode(Mode::of(7), {
                    let mut v = flags();
                    v.extend(option(OPT_STARTTLS, &[]));
                    v.extend(budget_session()[4..].iter().copied());
                    v
                }),
            ),
        ]
    }

    /// Walk simple replies: (cookie, error, offset of the read data) of each, sorted by
    /// cookie (replies come in completion order), skipping read data of known length.
    fn simple_replies(out: &[u8], reads: &[(u64, usize)]) -> Vec<(u64, u32, usize)> {
        let mut v = Vec::new();
        let mut o = 0;
        while o + 16 <= out.len() {
            assert_eq!(
                u32::from_be_bytes(out[o..o + 4].try_into().unwrap()),
                SIMPLE_REPLY_MAGIC
            );
            let err = u32::from_be_bytes(out[o + 4..o + 8].try_into().unwrap());
            let cookie = u64::from_be_bytes(out[o + 8..o + 16].try_into().unwrap());
            o += 16;
            v.push((cookie, err, o));
            if err == 0 {
                if let Some(&(_, n)) = reads.iter().find(|r| r.0 == cookie) {
                    o += n;
                }
            }
        }
        v.sort();
        v
    }

    #[test]
    fn a_session_does_what_it_says() {
        let out = run(&plain(session(false, "disk")), mem()).expect("negotiated");
        let r = simple_replies(&out, &[(2, 4096)]);
        let errs: Vec<(u64, u32)> = r.iter().map(|x| (x.0, x.1)).collect();
        assert_eq!(
            errs,
            vec![
                (1, 0),
                (2, 0),
                (3, 0),
                (4, 0),
                (5, 0),
                (6, EINVAL),
                (7, EINVAL)
            ]
        );
        // The read returned what the write wrote.
        let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
        assert_eq!(&out[r[1].2..r[1].2 + 4096], &data[..]);
        // Read-only: the write, trim and zeroes get EPERM (the write's payload skipped).
        let out = run(&plain(session(false, "ro")), mem()).expect("negotiated");
        let r = simple_replies(&out, &[(2, 4096)]);
        let errs: Vec<(u64, u32)> = r.iter().map(|x| (x.0, x.1)).collect();
        assert_eq!(
            errs,
            vec![
                (1, EPERM),
                (2, 0),
                (3, 0),
                (4, EPERM),
                (5, EPERM),
                (6, EINVAL),
                (7, EINVAL)
            ]
        );
        // Structured: the read is an OFFSET_DATA chunk with the DONE flag.
        let out = run(&plain(session(true, "disk")), mem()).expect("negotiated");
        let mut o = 0;
        let mut found = false;
        while o + 16 <= out.len() {
            let magic = u32::from_be_bytes(out[o..o + 4].try_into().unwrap());
            if magic == STRUCTURED_REPLY_MAGIC {
                assert_eq!(
                    u16::from_be_bytes([out[o + 4], out[o + 5]]),
                    REPLY_FLAG_DONE
                );
                let kind = u16::from_be_bytes([out[o + 6], out[o + 7]]);
                let len = u32::from_be_bytes(out[o + 16..o + 20].try_into().unwrap()) as usize;
                if kind == REPLY_TYPE_OFFSET_DATA {
                    assert_eq!(len, 8 + 4096);
                    assert_eq!(&out[o + 28..o + 28 + 4096], &data[..]);
                    found = true;
                } else {
                    assert_eq!(kind, REPLY_TYPE_ERROR);
                }
                o += 20 + len;
            } else {
                assert_eq!(magic, SIMPLE_REPLY_MAGIC);
                o += 16;
            }
        }
        assert!(found, "no OFFSET_DATA chunk");
        // A bad magic ends the connection with nothing more sent.
        let mut bad = flags();
        bad.extend(go("disk"));
        bad.extend(vec![0xab; 28]);
        bad.extend(req(CMD_READ, 0, 1, 0, 512));
        assert_eq!(run(&plain(bad), mem()), Some(Vec::new()));
        // An unknown export: GO answers ERR_UNKNOWN and negotiation goes on; EOF ends it.
        let mut v = flags();
        v.extend(go("nope"));
        assert!(run(&plain(v), mem()).is_none());
    }

    #[test]
    fn large_reads_go_out_whole_and_in_order() {
        // Large reads are sent from their buffers between small replies, through sends
        // that take a few KiB at a time.
        let a: Vec<u8> = (0..64 << 10).map(|i| (i % 253) as u8).collect();
        let b: Vec<u8> = (0..4096).map(|i| (i % 7) as u8 + 1).collect();
        let mut v = flags();
        v.extend(go("disk"));
        v.extend(req(CMD_WRITE, 0, 1, 0, a.len() as u32));
        v.extend(&a);
        v.extend(req(CMD_WRITE, 0, 2, 128 << 10, 4096));
        v.extend(&b);
        let reads: [(u64, u64, usize); 4] = [
            (10, 0, 64 << 10),
            (11, 128 << 10, 4096),
            (12, 0, 128 << 10),
            (13, 0, 64 << 10),
        ];
        for (cookie, off, len) in reads {
            v.extend(req(CMD_READ, 0, cookie, off, len as u32));
        }
        v.extend(req(CMD_DISC, 0, 99, 0, 0));
        let out = run(&plain(v), mem()).expect("negotiated");
        let lens: Vec<(u64, usize)> = reads.iter().map(|r| (r.0, r.2)).collect();
        let r = simple_replies(&out, &lens);
        assert_eq!(
            r.iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
            vec![(1, 0), (2, 0), (10, 0), (11, 0), (12, 0), (13, 0)]
        );
        let data = |cookie: u64| {
            let x = r.iter().find(|x| x.0 == cookie).expect("reply");
            let len = lens.iter().find(|l| l.0 == cookie).expect("read").1;
            &out[x.2..x.2 + len]
        };
        assert_eq!(data(10), &a[..]);
        assert_eq!(data(11), &b[..]);
        assert_eq!(&data(12)[..64 << 10], &a[..]);
        assert!(data(12)[64 << 10..].iter().all(|&x| x == 0));
        assert_eq!(data(13), &a[..]);
        // Six headers, the read data, nothing else.
        assert_eq!(out.len(), 6 * 16 + lens.iter().map(|l| l.1).sum::<usize>());
    }

    #[test]
    #[ignore]
    fn write_seeds() {
        std::fs::create_dir_all(corpus()).unwrap();
        for (n, s) in seeds() {
            std::fs::write(corpus().join(format!("seed-{n}")), s).unwrap();
        }
    }

    #[test]
    fn replay_corpus() {
        let mut n = 0;
        for e in std::fs::read_dir(corpus()).expect("the nbd_conn corpus") {
            let b = std::fs::read(e.expect("entry").path()).expect("seed");
            fuzz_conn(&b, mem());
            n += 1;
        }
        assert!(n >= 10, "seeds missing");
    }

    /// Simple replies' (cookie, error) pairs, sorted; read data of known lengths skipped.
    fn errors_of(out: &[u8], reads: &[(u64, usize)]) -> Vec<(u64, u32)> {
        simple_replies(out, reads)
            .iter()
            .map(|x| (x.0, x.1))
            .collect()
    }

    #[test]
    fn tls_required_refuses_options_until_starttls() {
        // Before STARTTLS: LIST, STRUCTURED_REPLY and GO get TLS_REQD; then the session
        // runs inside "TLS" as usual.
        let out = run(&in_mode(Mode::of(1), tls_session()), mem()).expect("negotiated");
        assert!(!out.is_empty());
        // EXPORT_NAME before TLS ends the connection.
        let mut v = flags();
        v.extend(option(OPT_EXPORT_NAME, b"disk"));
        v.extend(req(CMD_READ, 0, 1, 0, 512));
        assert!(run(&in_mode(Mode::of(1), v), mem()).is_none());
        // GO before TLS does not enter transmission (and EOF then ends it).
        let mut v = flags();
        v.extend(go("disk"));
        v.extend(req(CMD_READ, 0, 1, 0, 512));
        assert!(run(&in_mode(Mode::of(1), v), mem()).is_none());
    }

    #[test]
    fn a_small_budget_serialises_requests_and_bounds_them() {
        for m in [Mode::of(2), Mode::of(6), Mode::of(7)] {
            let reads: Vec<(u64, usize)> = (10..18)
                .map(|c| (c, SMALL_IO))
                .chain([(30, 4096)])
                .collect();
            let mut v = budget_session();
            if m.tls {
                let mut t = flags();
                t.extend(option(OPT_STARTTLS, &[]));
                t.extend(v[4..].iter().copied());
                v = t;
            }
            let out = run(&in_mode(m, v), mem()).expect("negotiated");
            let r = simple_replies(&out, &reads);
            let errs: Vec<(u64, u32)> = r.iter().map(|x| (x.0, x.1)).collect();
            let mut want: Vec<(u64, u32)> = (0..4).map(|c| (c, 0)).collect();
            want.extend((10..18).map(|c| (c, 0)));
            want.extend([(30, 0), (31, EOVERFLOW), (32, EOVERFLOW)]);
            assert_eq!(errs, want, "{m:?}");
            // Every read returned what its write wrote, though they could not all be in
            // flight at once.
            for c in 10..18u64 {
                let x = r.iter().find(|x| x.0 == c).unwrap();
                let w = (c - 10) % 4;
                let expect: Vec<u8> = (0..SMALL_IO).map(|i| (i as u64 % 241 + w) as u8).collect();
                assert!(out[x.2..x.2 + SMALL_IO] == expect[..], "read {c} in {m:?}");
            }
        }
        // The 4 GiB write closed the connection before any of its payload was taken: no
        // reply for it (the harness also checks the budget came back whole).
        let out = run(&in_mode(Mode::of(2), budget_session()), mem()).unwrap();
        let reads: Vec<(u64, usize)> = (10..18)
            .map(|c| (c, SMALL_IO))
            .chain([(30, 4096)])
            .collect();
        assert!(!errors_of(&out, &reads).iter().any(|e| e.0 == 33));
    }

    /// Large reads queued beyond the output high-water mark, behind a reader that is
    /// slow to take them, then DISC: the requests left in the buffer while output backed
    /// up are all served once it drains, and the stream's end does not drop them.
    fn backed_up_session() -> Vec<u8> {
        let mut v = flags();
        v.extend(go("disk"));
        for c in 0..12u64 {
            v.extend(req(CMD_READ, 0, c, 0, 1 << 20));
        }
        // A payload that takes many passes to arrive, while the reads' output backs up;
        // the requests after it find the output over its high-water mark.
        v.extend(req(CMD_WRITE, 0, 50, 0, 256 << 10));
        v.extend(vec![0x3c; 256 << 10]);
        for c in 0..4u64 {
            v.extend(req(CMD_READ, 0, 60 + c, 0, 4096));
        }
        v.extend(req(CMD_DISC, 0, 100, 0, 0));
        v
    }

    #[test]
    fn requests_held_back_by_output_are_served_later() {
        let mut reads: Vec<(u64, usize)> = (0..12).map(|c| (c, 1 << 20)).collect();
        reads.extend((60..64).map(|c| (c, 4096)));
        for m in [Mode::of(0), Mode::of(8)] {
            let out = run(&in_mode(m, backed_up_session()), mem()).expect("negotiated");
            let mut want: Vec<(u64, u32)> = (0..12).map(|c| (c, 0)).collect();
            want.push((50, 0));
            want.extend((60..64).map(|c| (c, 0)));
            assert_eq!(errors_of(&out, &reads), want, "{m:?}");
            let r = simple_replies(&out, &reads);
            let x = r.iter().find(|x| x.0 == 63).unwrap();
            assert!(out[x.2..x.2 + 4096].iter().all(|&b| b == 0x3c), "{m:?}");
        }
    }

    #[test]
    fn random_inputs() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        let bases = [
            plain(session(true, "disk")),
            in_mode(Mode::of(1), tls_session()),
            in_mode(Mode::of(2), budget_session()[..5000].to_vec()),
        ];
        for k in 0..2000 {
            let base = &bases[k % bases.len()];
            let mut v = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = 1 + (x as usize) % (v.len() - 1);
                v[i] = (x >> 32) as u8;
            }
            fuzz_conn(&v, mem());
            let cut = (x as usize) % v.len();
            fuzz_conn(&v[..cut], mem());
        }
    }
}
