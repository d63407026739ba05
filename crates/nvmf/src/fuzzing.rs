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

/// The host side's PDU framing and header parsing ([`crate::host::wire`]) on a stream of
/// controller-to-host PDUs: the first byte picks the digests and the data limit.
pub fn fuzz_host_pdu(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let dg = Digests {
        header: sel & 1 != 0,
        data: sel & 2 != 0,
    };
    let max = if sel & 4 != 0 { 4096 } else { 128 << 10 };
    crate::host::wire::parse_stream(rest, dg, max);
}

/// DH-HMAC-CHAP: the controller's state machine driven by a host the input scripts. The
/// first byte picks the policy (hashes, null and/or ffdhe2048) and whether a controller
/// secret exists; then records `[op, a, b, len, bytes...]`:
///
/// * op 0: AUTH_Send of `bytes` (any message, any length);
/// * op 1: AUTH_Receive of `a << 8 | b` bytes (the host reads what is due);
/// * op 2: a Negotiate offering hashes `a` and groups `b` (bit masks);
/// * op 3: a correct Reply to the last Challenge (with a DH value when the group needs
///   one), bidirectional if `a & 1`, then `bytes` XORed over it (empty: untouched);
/// * op 4: Success2 for the current transaction.
///
/// Whatever the input, nothing panics, AUTH_Receive returns at most a Failure1-sized
/// message beyond the length asked, and the queue is never authenticated unless the host
/// sent an untouched correct Reply (it knows the secret).
pub fn fuzz_auth(data: &[u8]) {
    run_auth(data);
}

/// [`fuzz_auth`]; returns whether the queue ended authenticated.
fn run_auth(data: &[u8]) -> bool {
    use crate::auth::{response, DhGroup, Dhchap, HashFn, HostKeys, Policy, Secret, Sent};
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000a0717";
    let Some((&sel, mut rest)) = data.split_first() else {
        return false;
    };
    let key = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
    let (Ok(host), Ok(ctrl)) = (Secret::parse(key), Secret::generate(1, 32)) else {
        return false;
    };
    let keys = std::sync::Arc::new(HostKeys {
        host,
        ctrl: (sel & 0x10 != 0).then_some(ctrl),
    });
    let hashes: Vec<HashFn> = HashFn::ALL
        .into_iter()
        .filter(|h| sel & (1 << (h.id() - 1)) != 0)
        .collect();
    let mut groups = Vec::new();
    if sel & 0x20 == 0 {
        groups.push(DhGroup::Null);
    }
    if sel & 0x40 != 0 {
        groups.push(DhGroup::Ffdhe2048);
    }
    let policy = Policy {
        hashes: if hashes.is_empty() {
            vec![HashFn::Sha256]
        } else {
            hashes
        },
        dhgroups: if groups.is_empty() {
            vec![DhGroup::Null]
        } else {
            groups
        },
    };
    let mut d = Dhchap::new(keys.clone(), std::sync::Arc::new(policy), HOST, FUZZ_NQN);
    let mut out = Vec::new();
    let mut challenge: Option<Vec<u8>> = None;
    let mut honest = false; // a Challenge got a correct, untouched Reply
    let mut tid = 0u16;
    let mut steps = 0;
    while rest.len() >= 4 && steps < 64 {
        steps += 1;
        let (op, a, b, n) = (rest[0] % 5, rest[1], rest[2], rest[3] as usize);
        let bytes = &rest[4..(4 + n).min(rest.len())];
        rest = &rest[(4 + n).min(rest.len())..];
        match op {
            0 => {
                if bytes.len() >= 6 {
                    tid = u16::from_le_bytes([bytes[4], bytes[5]]);
                }
                if let Sent::HostFailed(_) = d.send(bytes) {
                    return false;
                }
            }
            1 => {
                let al = ((a as usize) << 8 | b as usize).clamp(1, crate::auth::MAX_RECEIVE);
                let end = d.receive(al, &mut out);
                assert!(out.len() <= al.max(8), "AUTH_Receive larger than asked");
                if out.len() >= 16 && out[0] == 1 && out[1] == 1 {
                    challenge = Some(out.clone());
                }
                if end {
                    return false;
                }
            }
            2 => {
                tid = tid.wrapping_add(1);
                let mut m = vec![0u8; 72];
                m[4..6].copy_from_slice(&tid.to_le_bytes());
                m[7] = 1;
                m[8] = 1;
                let hs: Vec<u8> = (1..=3).filter(|i| a & (1 << (i - 1)) != 0).collect();
                let gs: Vec<u8> = (0..=5).filter(|i| b & (1 << i) != 0).collect();
                m[10] = hs.len() as u8;
                m[11] = gs.len() as u8;
                m[12..12 + hs.len()].copy_from_slice(&hs);
                m[42..42 + gs.len()].copy_from_slice(&gs);
                d.send(&m);
            }
            3 => {
                let Some(ch) = challenge.as_ref() else {
                    continue;
                };
                let (Some(h), Some(g)) = (HashFn::from_id(ch[8]), DhGroup::from_id(ch[9])) else {
                    continue;
                };
                let hl = ch[6] as usize;
                let dhvlen = u16::from_le_bytes([ch[10], ch[11]]) as usize;
                if ch.len() < 16 + hl + dhvlen || hl != h.digest_len() {
                    continue;
                }
                let ctid = u16::from_le_bytes([ch[4], ch[5]]);
                let s1 = u32::from_le_bytes([ch[12], ch[13], ch[14], ch[15]]);
                let (ks, gy) = match (g, g.prime()) {
                    (DhGroup::Null, _) => (None, Vec::new()),
                    (_, Some(p)) => {
                        let run = || -> Result<(Vec<u8>, Vec<u8>), openssl::error::ErrorStack> {
                            let mut ctx = openssl::bn::BigNumContext::new()?;
                            let y = openssl::bn::BigNum::from_u32(0x1234_5679)?;
                            let two = openssl::bn::BigNum::from_u32(2)?;
                            let mut v = openssl::bn::BigNum::new()?;
                            v.mod_exp(&two, &y, &p, &mut ctx)?;
                            let gx =
                                openssl::bn::BigNum::from_slice(&ch[16 + hl..16 + hl + dhvlen])?;
                            let mut k = openssl::bn::BigNum::new()?;
                            k.mod_exp(&gx, &y, &p, &mut ctx)?;
                            Ok((
                                k.to_vec_padded(g.bytes() as i32)?,
                                v.to_vec_padded(g.bytes() as i32)?,
                            ))
                        };
                        match run() {
                            Ok((k, v)) => (Some(k), v),
                            Err(_) => continue,
                        }
                    }
                    _ => continue,
                };
                let Ok(kh) = keys.host.transformed(HOST) else {
                    continue;
                };
                let Ok(r1) = response(
                    h,
                    kh.as_slice(),
                    &ch[16..16 + hl],
                    ks.as_deref(),
                    s1,
                    ctid,
                    b"HostHost",
                    HOST,
                    FUZZ_NQN,
                ) else {
                    continue;
                };
                let bidi = a & 1 != 0;
                let mut m = vec![0u8; 16];
                m[0] = 1;
                m[1] = 2;
                m[4..6].copy_from_slice(&ctid.to_le_bytes());
                m[6] = hl as u8;
                m[8] = bidi as u8;
                m[10..12].copy_from_slice(&(gy.len() as u16).to_le_bytes());
                m[12..16].copy_from_slice(&(if bidi { 7u32 } else { 0 }).to_le_bytes());
                m.extend_from_slice(&r1);
                m.extend_from_slice(&vec![0x42; hl]);
                m.extend_from_slice(&gy);
                // Bytes that carry the host's proof or decide how it is read: the
                // message type, T_ID, HL, DHVLEN, the response and the DH value. The
                // rest (reserved bytes, the controller challenge and its sequence
                // number) may change without making the Reply any less correct.
                let proof = |j: usize| {
                    matches!(j, 0 | 1 | 4 | 5 | 6 | 10 | 11)
                        || (16..16 + hl).contains(&j)
                        || j >= 16 + 2 * hl
                };
                let mut touched = false;
                for (i, x) in bytes.iter().enumerate() {
                    if *x != 0 {
                        let j = i % m.len();
                        m[j] ^= x;
                        touched |= proof(j);
                    }
                }
                honest |= !touched;
                d.send(&m);
            }
            _ => {
                let mut m = vec![0u8; 16];
                m[0] = 1;
                m[1] = 4;
                m[4..6].copy_from_slice(&tid.to_le_bytes());
                if let Some(ch) = &challenge {
                    m[4..6].copy_from_slice(&ch[4..6]);
                }
                d.send(&m);
            }
        }
        if d.authenticated() {
            assert!(honest, "authenticated without a correct Reply");
        }
    }
    d.authenticated()
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
/// A host of [`fuzz_conn`]'s subsystem that must authenticate (DH-HMAC-CHAP).
const FUZZ_AUTH_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000a0022";

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
        connect_as(qid, cntlid, super::FUZZ_HOST)
    }
    pub fn connect_as(qid: u16, cntlid: u16, host: &str) -> Vec<u8> {
        let mut s = sqe(0x7f, 1, 0, &[]);
        s[4] = 0x01;
        s[42..44].copy_from_slice(&qid.to_le_bytes());
        s[44..46].copy_from_slice(&31u16.to_le_bytes());
        let mut d = vec![0u8; 1024];
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + super::FUZZ_NQN.len()].copy_from_slice(super::FUZZ_NQN.as_bytes());
        d[512..512 + host.len()].copy_from_slice(host.as_bytes());
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
    if let Ok(host) =
        crate::auth::Secret::parse("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:")
    {
        let keys = crate::auth::HostKeys { host, ctrl: None };
        sub.set_host_keys([(FUZZ_AUTH_HOST.to_string(), Arc::new(keys))].into());
    }
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
            limits: crate::conn::Limits::relaxed(),
            permit: None,
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
        // The lengths of issue 15 after Connect: NUMD FFFFFFFFh with a 4 GiB and a 128 KiB
        // SGL, Identify with a 4 GiB SGL, Dataset Management with a 1 MiB list, then
        // Identify that must still work.
        let mut limits = admin_session();
        let numd = [(10, 0x02 | 0xffff << 16), (11, 0xffff)];
        limits.extend(capsule_xfer(sqe(0x02, 4, 0, &numd), u32::MAX));
        limits.extend(capsule_xfer(sqe(0x02, 5, 0, &numd), 128 << 10));
        limits.extend(capsule_xfer(sqe(0x06, 6, 0, &[(10, 1)]), u32::MAX));
        limits.extend(capsule_xfer(sqe(0x06, 7, 0, &[(10, 1)]), 4096));
        // Before Connect: a Connect whose data would come by R2T (4 GiB).
        let mut pre = icreq(0);
        let mut c = sqe(0x7f, 1, 0, &[]);
        c[4] = 0x01;
        pre.extend(capsule_xfer(c, u32::MAX));
        // A host that must authenticate sends Identify instead.
        let mut auth = icreq(0);
        auth.extend(connect_as(0, 0xffff, FUZZ_AUTH_HOST));
        auth.extend(capsule_xfer(sqe(0x06, 2, 0, &[(10, 1)]), 4096));
        // H2CData past its R2T on an I/O queue.
        let mut h2cs = icreq(0);
        h2cs.extend(connect(1, 1));
        h2cs.extend(capsule_xfer(sqe(0x01, 10, 1, &[(10, 0), (12, 7)]), 4096));
        h2cs.extend(h2c(10, 0, 2048, &[1; 4096]));
        vec![
            ("admin", [&[0u8][..], &admin].concat()),
            ("io", [&[255u8][..], &io].concat()),
            ("bad", [&[3u8][..], &bad].concat()),
            ("limits", [&[0u8][..], &limits].concat()),
            ("preconnect", [&[1u8][..], &pre].concat()),
            ("authreq", [&[2u8][..], &auth].concat()),
            ("h2c-range", [&[7u8][..], &h2cs].concat()),
        ]
    }

    /// DH-HMAC-CHAP scripts for [`fuzz_auth`] (see its record format).
    fn auth_seeds() -> Vec<(&'static str, Vec<u8>, bool)> {
        let rec = |op: u8, a: u8, b: u8, bytes: &[u8]| {
            [&[op, a, b, bytes.len() as u8][..], bytes].concat()
        };
        let recv = rec(1, 0x10, 0, &[]);
        let null = [
            &[0x01u8][..],
            &rec(2, 1, 1, &[]),
            &recv,
            &rec(3, 0, 0, &[]),
            &recv,
        ]
        .concat();
        let dh_bidi = [
            &[0x01u8 | 0x10 | 0x20 | 0x40][..],
            &rec(2, 7, 0b11, &[]),
            &recv,
            &rec(3, 1, 0, &[]),
            &recv,
            &rec(4, 0, 0, &[]),
        ]
        .concat();
        let wrong = [
            &[0x07u8][..],
            &rec(2, 4, 1, &[]),
            &recv,
            &rec(
                3,
                0,
                0,
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            ),
            &recv,
        ]
        .concat();
        let raw = [
            &[0x01u8][..],
            &rec(0, 0, 0, &[1, 2, 0, 0, 0, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            &recv,
            &rec(0, 0, 0, &[0, 0xf0, 0, 0, 0, 0, 1, 1]),
        ]
        .concat();
        vec![
            ("null", null, true),
            ("dh-bidi", dh_bidi, true),
            ("wrong", wrong, false),
            ("raw", raw, false),
        ]
    }

    #[test]
    fn host_pdu_seeds_parse() {
        // The committed seeds of fuzz/corpus/nvmf_host_pdu: whole PDU streams the host
        // parser accepts to the end (so the fuzzer starts from valid input).
        let want = [("seed-0", 3), ("seed-1", 2), ("seed-2", 0)];
        for (name, n) in want {
            let b = std::fs::read(corpus("nvmf_host_pdu").join(name)).expect("seed");
            fuzz_host_pdu(&b);
            let dg = Digests::default();
            assert_eq!(
                crate::host::wire::parse_stream(&b[1..], dg, 4096),
                n,
                "{name}"
            );
        }
    }

    #[test]
    fn auth_seeds_reach_their_ends() {
        for (name, s, ok) in auth_seeds() {
            assert_eq!(run_auth(&s), ok, "auth seed {name}");
        }
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
            let errors = {
                let mut e = Vec::new();
                let mut o = 0;
                while o + 8 <= out.len() {
                    let plen = u32::from_le_bytes(out[o + 4..o + 8].try_into().unwrap()) as usize;
                    if out[o] == 0x05 {
                        let st = u16::from_le_bytes([out[o + 8 + 14], out[o + 8 + 15]]) >> 1;
                        if st & 0x7ff != 0 {
                            e.push(st & 0x7ff);
                        }
                    }
                    o += plen;
                }
                e
            };
            match name {
                // Connect, write, read, write via R2T, deallocate, flush, write zeroes.
                "io" => {
                    assert_eq!(ok, 7, "io seed");
                    assert!(c2h.len() == 4096 && c2h.iter().all(|&b| b == 0x5a));
                }
                // Connect, property, features, four identifies, the log page (the AER
                // is held).
                "admin" => assert_eq!(ok, 8, "admin seed"),
                // Session (3) and the last Identify succeed; NUMD twice Invalid Field
                // (the first also SGL-length-checked first), Identify 4 GiB: SGL length.
                "limits" => {
                    assert_eq!(ok, 4, "limits seed: {errors:x?}");
                    assert_eq!(errors.len(), 3, "limits seed: {errors:x?}");
                    assert_eq!(c2h.len(), 4096, "the last Identify's data");
                }
                // Refused (no R2T), connection closed.
                "preconnect" => {
                    assert_eq!(ok, 0);
                    assert_eq!(errors.len(), 1, "{errors:x?}");
                    assert_ne!(last, 0x09, "no R2T before Connect");
                }
                // Connect succeeds (ATR), Identify: Authentication Required (SCT 1, 91h).
                "authreq" => {
                    assert_eq!(ok, 1);
                    assert_eq!(errors, vec![0x191]);
                }
                _ => assert_eq!(last, 0x03, "{name} seed ends in a C2HTermReq"),
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
        for (name, s, _) in auth_seeds() {
            let d = corpus("nvmf_auth");
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
        for (name, f) in [("nvmf_pdu", 0), ("nvmf_conn", 1), ("nvmf_auth", 2)] {
            let dir = corpus(name);
            let mut n = 0;
            for e in std::fs::read_dir(&dir).expect("corpus directory") {
                let b = std::fs::read(e.expect("entry").path()).expect("read seed");
                match f {
                    0 => fuzz_pdu(&b),
                    1 => fuzz_conn(&b, mem()),
                    _ => fuzz_auth(&b),
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
