//! Fuzz harness (used by `fuzz/fuzz_targets/nbd_conn.rs` and the corpus replay tests):
//! a whole NBD connection in memory. The bytes are what a client sends: the negotiation
//! runs on them, and whatever follows a successful `NBD_OPT_GO` / `EXPORT_NAME` drives the
//! transmission phase over the device. Nothing may panic; every reply is well framed.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::sync::Arc;

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::{Readiness, WorkSource};
use nvmux_core::{BlockDevice, Wire};

use crate::conn::NbdConn;
use crate::handshake::negotiate;
use crate::proto::*;
use crate::Export;

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

/// The transmission phase's wire: the rest of the input in small chunks, then EOF; sends
/// take at most a chunk at a time.
struct Pipe {
    input: VecDeque<u8>,
    chunk: usize,
    output: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Wire for Pipe {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.input.len());
        for (d, s) in buf.iter_mut().zip(self.input.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Partial sends, like a socket whose buffer is nearly full.
        let n = buf.len().min(self.chunk);
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

const EDGE: Readiness = Readiness {
    readable: true,
    writable: true,
    hup: false,
};

/// Run one connection over `dev`; returns the transmission-phase output (if it got there).
pub fn run(data: &[u8], dev: Arc<dyn BlockDevice>) -> Option<Vec<u8>> {
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
    let n = negotiate(&mut s, &find, &list).ok()??;
    let rest = s.input;
    let output = Arc::new(std::sync::Mutex::new(Vec::new()));
    let chunk = 1 + (rest.first().copied().unwrap_or(0) as usize % 64) * 97;
    let wire = Pipe {
        input: rest.iter().copied().collect(),
        chunk,
        output: output.clone(),
    };
    let mut c = NbdConn::new(Box::new(wire), n.export, n.structured).ok()?;
    for _ in 0..100_000 {
        if c.finished() {
            break;
        }
        // An in-memory wire has no epoll edges: announce one before every pass.
        c.socket_ready(EDGE);
        c.poll();
    }
    assert!(
        c.finished(),
        "an NBD connection at end of input did not finish"
    );
    let out = output.lock().unwrap_or_else(|e| e.into_inner()).clone();
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
        vec![
            ("large-reads", big),
            ("structured", session(true, "disk")),
            ("simple", session(false, "disk")),
            ("read-only", session(true, "ro")),
            ("export-name", old),
            ("bad-magic", bad),
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
        let out = run(&session(false, "disk"), mem()).expect("negotiated");
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
        let out = run(&session(false, "ro"), mem()).expect("negotiated");
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
        let out = run(&session(true, "disk"), mem()).expect("negotiated");
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
        assert_eq!(run(&bad, mem()), Some(Vec::new()));
        // An unknown export: GO answers ERR_UNKNOWN and negotiation goes on; EOF ends it.
        let mut v = flags();
        v.extend(go("nope"));
        assert!(run(&v, mem()).is_none());
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
        let out = run(&v, mem()).expect("negotiated");
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
        assert!(n >= 5, "seeds missing");
    }

    #[test]
    fn random_inputs() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        let base = session(true, "disk");
        for _ in 0..2000 {
            let mut v = base.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x as usize) % v.len();
                v[i] = (x >> 32) as u8;
            }
            fuzz_conn(&v, mem());
            let cut = (x as usize) % v.len();
            fuzz_conn(&v[..cut], mem());
        }
    }
}
