//! Fuzz harnesses (used by `fuzz/` and by the corpus replay tests).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::WorkSource;
use nvmux_core::BlockDevice;

use crate::conn::{Conn, ConnParams, Wire};
use crate::ctrl::{DiscoveryEntry, Namespace, Resolver, Subsystem, Where, DISCOVERY_NQN};
use crate::pdu::{self, Digests, Pdu};

/// PDU parsing: the first byte picks the negotiated digests, the rest is one PDU.
/// Whatever the bytes, nothing may panic, and an accepted PDU's data lies inside it.
pub fn fuzz_pdu(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let dg = Digests {
        header: sel & 1 != 0,
        data: sel & 2 != 0,
    };
    let max = if sel & 4 != 0 { 8192 } else { 128 << 10 };
    if let Some(ch) = rest.first_chunk::<{ pdu::CH }>() {
        if let Ok(l) = pdu::peek_len(ch, max) {
            if l <= rest.len() {
                check(pdu::parse(&rest[..l], dg, max), max);
            }
        }
    }
    check(pdu::parse(rest, dg, max), max);
}

fn check(r: Result<Pdu<'_>, pdu::PduError>, max: usize) {
    match r {
        Ok(Pdu::Cmd { data, .. }) | Ok(Pdu::H2CData { data, .. }) => assert!(data.len() <= max),
        _ => {}
    }
}

/// Bytes in, bytes out: the host side of a connection in memory.
struct Pipe {
    input: VecDeque<u8>,
    chunk: usize,
    /// Empty input reads as "would block" instead of end of stream.
    stay_open: bool,
    /// What the controller sent, when the caller wants to look at it.
    output: Option<Arc<std::sync::Mutex<Vec<u8>>>>,
}

impl Wire for Pipe {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.input.is_empty() {
            if self.stay_open {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            return Ok(0);
        }
        let n = buf.len().min(self.chunk).min(self.input.len());
        for (d, s) in buf.iter_mut().zip(self.input.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(o) = &self.output {
            o.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn fd(&self) -> Option<RawFd> {
        None
    }
}

struct OneSubsystem(Arc<Subsystem>);

impl Resolver for OneSubsystem {
    fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        if nqn == self.0.nqn || nqn == DISCOVERY_NQN {
            Some(self.0.clone())
        } else {
            None
        }
    }
    fn discovery_log(&self, _host: &str, listen: SocketAddr) -> (u64, Vec<DiscoveryEntry>) {
        let e = DiscoveryEntry {
            subnqn: self.0.nqn.clone(),
            addr: listen,
            port_id: 1,
        };
        (1, vec![e])
    }
    fn refused(&self, _why: &str) {}
}

/// NQN of the subsystem [`fuzz_conn`] serves (any host may connect).
pub const FUZZ_NQN: &str = "nqn.2026-11.io.nvmux:fuzz";
const FUZZ_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000000f022";

/// Host-side PDU builders for the harness and the seed corpus.
pub mod host {
    pub fn icreq(digests: u8) -> Vec<u8> {
        let mut b = vec![0u8; 128];
        b[2] = 128;
        b[4] = 128;
        b[11] = digests;
        b
    }
    /// A command capsule with `data` in the capsule (no digests).
    pub fn capsule(mut sqe: [u8; 64], data: &[u8]) -> Vec<u8> {
        sqe[32..36].copy_from_slice(&(data.len() as u32).to_le_bytes());
        sqe[39] = 0x01;
        let pdo = if data.is_empty() { 0 } else { 72 };
        let mut b = vec![0x04, 0, 72, pdo];
        b.extend_from_slice(&(72 + data.len() as u32).to_le_bytes());
        b.extend_from_slice(&sqe);
        b.extend_from_slice(data);
        b
    }
    /// A command whose data (`len` bytes, either direction) moves in data PDUs.
    pub fn capsule_xfer(mut sqe: [u8; 64], len: u32) -> Vec<u8> {
        sqe[32..36].copy_from_slice(&len.to_le_bytes());
        sqe[39] = 0x5a;
        let mut b = vec![0x04, 0, 72, 0];
        b.extend_from_slice(&72u32.to_le_bytes());
        b.extend_from_slice(&sqe);
        b
    }
    pub fn h2c(cid: u16, ttag: u16, off: u32, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0x06, 0x04, 24, 24];
        b.extend_from_slice(&(24 + data.len() as u32).to_le_bytes());
        b.extend_from_slice(&cid.to_le_bytes());
        b.extend_from_slice(&ttag.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&(data.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(data);
        b
    }
    pub fn sqe(op: u8, cid: u16, nsid: u32, cdw: &[(usize, u32)]) -> [u8; 64] {
        let mut s = [0u8; 64];
        s[0] = op;
        s[2..4].copy_from_slice(&cid.to_le_bytes());
        s[4..8].copy_from_slice(&nsid.to_le_bytes());
        for &(n, v) in cdw {
            s[n * 4..n * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        s
    }
    pub fn connect(qid: u16, cntlid: u16) -> Vec<u8> {
        let mut s = sqe(0x7f, 1, 0, &[]);
        s[4] = 0x01;
        s[42..44].copy_from_slice(&qid.to_le_bytes());
        s[44..46].copy_from_slice(&31u16.to_le_bytes());
        let mut d = vec![0u8; 1024];
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + super::FUZZ_NQN.len()].copy_from_slice(super::FUZZ_NQN.as_bytes());
        d[512..512 + super::FUZZ_HOST.len()].copy_from_slice(super::FUZZ_HOST.as_bytes());
        capsule(s, &d)
    }
    pub fn prop_set(off: u32, v: u64) -> Vec<u8> {
        let mut s = sqe(0x7f, 2, 0, &[]);
        s[4] = 0x00;
        s[44..48].copy_from_slice(&off.to_le_bytes());
        s[48..56].copy_from_slice(&v.to_le_bytes());
        capsule(s, &[])
    }
    /// An admin session: connect, enable, ask for 4 I/O queues (controller id 1).
    pub fn admin_session() -> Vec<u8> {
        let mut b = icreq(0);
        b.extend(connect(0, 0xffff));
        b.extend(prop_set(0x14, 1));
        b.extend(capsule(sqe(0x09, 3, 0, &[(10, 7), (11, 0x0003_0003)]), &[]));
        b
    }
}

fn feed(c: &mut Conn, rounds: usize) {
    for _ in 0..rounds {
        // An in-memory wire has no epoll edges: announce one before every pass.
        c.socket_ready(nvmux_core::worker::Readiness {
            readable: true,
            writable: true,
            hup: false,
        });
        c.poll();
        let _ = c.take_fds_changed();
        if c.finished() {
            break;
        }
    }
}

/// Two connections over namespace 1 on `dev`: an admin queue set up by the harness
/// (controller 1, enabled, 4 I/O queues granted), then `data` as the byte stream of a
/// second connection (the first byte sets its receive chunk size), which may connect
/// as an I/O queue of controller 1 or as a new admin queue: PDUs, capsules, admin and
/// I/O commands, R2T and H2CData.
pub fn fuzz_conn(data: &[u8], dev: Arc<dyn BlockDevice>) {
    run_conn(data, dev, None)
}

fn run_conn(
    data: &[u8],
    dev: Arc<dyn BlockDevice>,
    output: Option<Arc<std::sync::Mutex<Vec<u8>>>>,
) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let sub = Subsystem::new(FUZZ_NQN, "fuzz");
    sub.set_hosts(true, Default::default());
    let _ = sub.add_namespace(Namespace {
        nsid: 1,
        disk: "fuzz".into(),
        dev,
        stats: Arc::new(DiskStats::default()),
        nguid: [7; 16],
    });
    let addr: SocketAddr = ([127, 0, 0, 1], 4420).into();
    let resolver: Arc<dyn Resolver> = Arc::new(OneSubsystem(sub));
    let conn = |input: &[u8], chunk: usize, stay_open: bool, output| {
        let wire = Pipe {
            input: input.iter().copied().collect(),
            chunk,
            stay_open,
            output,
        };
        let params = ConnParams {
            resolver: resolver.clone(),
            at: Where {
                listen: addr,
                local: addr,
            },
            peer: "fuzz".into(),
        };
        Conn::new(Box::new(wire), params).ok()
    };
    let Some(mut admin) = conn(&host::admin_session(), 1 << 20, true, None) else {
        return;
    };
    feed(&mut admin, 16);
    let Some(mut c) = conn(rest, 1 + sel as usize * 64, false, output) else {
        return;
    };
    // Enough rounds for every byte to be read (one chunk per round) and every command to
    // complete.
    feed(&mut c, rest.len() + 64);
}

#[cfg(test)]
mod tests {
    use super::host::*;
    use super::*;

    fn corpus(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(name)
    }

    fn mem() -> Arc<dyn BlockDevice> {
        Arc::new(nvmux_backend::MemoryDevice::new(1 << 20, 512, false).expect("memory device"))
    }

    /// Seeds: an admin session with identify and log pages, and an I/O session.
    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut admin = admin_session();
        for (cid, cns, nsid) in [(4u16, 1u32, 0u32), (5, 0, 1), (6, 2, 0), (7, 3, 1)] {
            admin.extend(capsule_xfer(sqe(0x06, cid, nsid, &[(10, cns)]), 4096));
        }
        admin.extend(capsule_xfer(
            sqe(0x02, 8, 0, &[(10, 0x02 | 127 << 16)]),
            512,
        ));
        admin.extend(capsule(sqe(0x0c, 9, 0, &[]), &[]));
        let mut io = icreq(3);
        io.truncate(0);
        io.extend(icreq(0));
        io.extend(connect(1, 1));
        io.extend(capsule(
            sqe(0x01, 10, 1, &[(10, 0), (12, 7)]),
            &[0x5a; 4096],
        ));
        io.extend(capsule_xfer(sqe(0x02, 11, 1, &[(10, 0), (12, 7)]), 4096));
        io.extend(capsule_xfer(sqe(0x01, 12, 1, &[(10, 8), (12, 31)]), 16384));
        // Slots 0 and 1 hold the write and the read, so the R2T carries transfer tag 2.
        io.extend(h2c(12, 2, 0, &[1; 16384]));
        let mut r = vec![0u8; 16];
        r[4] = 8;
        io.extend(capsule(sqe(0x09, 13, 1, &[(11, 4)]), &r));
        io.extend(capsule(sqe(0x00, 14, 1, &[]), &[]));
        io.extend(capsule(sqe(0x08, 15, 1, &[(10, 64), (12, 7)]), &[]));
        let mut bad = icreq(0);
        bad.extend(connect(1, 1));
        bad.extend(h2c(99, 42, 1 << 20, &[0; 8]));
        vec![
            ("admin", [&[0u8][..], &admin].concat()),
            ("io", [&[255u8][..], &io].concat()),
            ("bad", [&[3u8][..], &bad].concat()),
        ]
    }

    #[test]
    fn seeds_reach_io() {
        let dev = mem();
        for (name, s) in seeds() {
            let out = Arc::new(std::sync::Mutex::new(Vec::new()));
            run_conn(&s, dev.clone(), Some(out.clone()));
            let out = out.lock().unwrap();
            // Walk the PDUs sent back: count successful responses and C2H data bytes.
            let (mut ok, mut c2h, mut o, mut last) = (0, Vec::new(), 0, 0);
            while o + 8 <= out.len() {
                last = out[o];
                let plen = u32::from_le_bytes(out[o + 4..o + 8].try_into().unwrap()) as usize;
                match out[o] {
                    0x05 if out[o + 8 + 14..o + 8 + 16] == [0, 0] => ok += 1,
                    0x07 => c2h.extend_from_slice(&out[o + out[o + 3] as usize..o + plen]),
                    _ => {}
                }
                o += plen;
            }
            match name {
                // Connect, write, read, write via R2T, deallocate, flush, write zeroes.
                "io" => {
                    assert_eq!(ok, 7, "io seed");
                    assert!(c2h.len() == 4096 && c2h.iter().all(|&b| b == 0x5a));
                }
                // Connect, property, features, four identifies, the log page (the AER
                // is held).
                "admin" => assert_eq!(ok, 8, "admin seed"),
                _ => assert_eq!(last, 0x03, "bad seed ends in a C2HTermReq"),
            }
        }
    }

    /// Regenerate the checked-in seeds: `cargo test -p nvmux-nvmf -- --ignored write_seeds`.
    #[test]
    #[ignore]
    fn write_seeds() {
        for (name, s) in seeds() {
            let d = corpus("nvmf_conn");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("seed-{name}")), &s).unwrap();
        }
        let d = corpus("nvmf_pdu");
        std::fs::create_dir_all(&d).unwrap();
        let s = seeds();
        for (i, chunk) in [
            icreq(3),
            capsule(sqe(0x06, 1, 0, &[]), &[1, 2, 3]),
            h2c(1, 2, 0, &[9; 64]),
        ]
        .iter()
        .enumerate()
        {
            std::fs::write(
                d.join(format!("seed-{i}")),
                [&[i as u8][..], chunk].concat(),
            )
            .unwrap();
        }
        drop(s);
    }

    /// Replay the checked-in fuzz corpora on stable Rust, so the targets cannot rot.
    #[test]
    fn replay_corpus() {
        for (name, f) in [("nvmf_pdu", 0), ("nvmf_conn", 1)] {
            let dir = corpus(name);
            let mut n = 0;
            for e in std::fs::read_dir(&dir).expect("corpus directory") {
                let b = std::fs::read(e.expect("entry").path()).expect("read seed");
                if f == 0 {
                    fuzz_pdu(&b);
                } else {
                    fuzz_conn(&b, mem());
                }
                n += 1;
            }
            assert!(n > 0, "empty corpus in {}", dir.display());
        }
    }

    #[test]
    fn random_inputs() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let dev = mem();
        let session = admin_session();
        for len in [2usize, 16, 300, 5000] {
            for _ in 0..50 {
                let mut v: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                fuzz_pdu(&v);
                // Also after a valid session prefix, so the garbage reaches commands.
                v.splice(1..1, session.iter().copied());
                fuzz_conn(&v, dev.clone());
            }
        }
    }
}
