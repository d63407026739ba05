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
}

impl Wire for Pipe {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.input.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(self.chunk).min(self.input.len());
        for (d, s) in buf.iter_mut().zip(self.input.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
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

/// A whole connection fed with `data` as the host's byte stream (the first byte sets the
/// receive chunk size), over namespace 1 on `dev`: PDUs, capsules, admin and I/O commands.
pub fn fuzz_conn(data: &[u8], dev: Arc<dyn BlockDevice>) {
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
    let wire = Pipe {
        input: rest.iter().copied().collect(),
        chunk: 1 + sel as usize * 64,
    };
    let params = ConnParams {
        resolver: Arc::new(OneSubsystem(sub)),
        at: Where {
            listen: addr,
            local: addr,
        },
        peer: "fuzz".into(),
    };
    let Ok(mut c) = Conn::new(Box::new(wire), params) else {
        return;
    };
    // Enough rounds for every byte to be read and every command to complete.
    for _ in 0..rest.len() / 8 + 64 {
        c.poll();
        let _ = c.take_fds_changed();
        if c.finished() {
            break;
        }
    }
}
