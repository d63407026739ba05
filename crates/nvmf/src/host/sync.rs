//! A blocking NVMe/TCP queue for the controller thread: the admin queue (Connect,
//! properties, Identify, Get Log Page, Keep Alive) and the handshake of I/O queues before
//! they are handed to their worker. Every read has a timeout; every peer value is checked.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::wire::{self, HostPdu, IcResp};
use crate::pdu::{Digests, C2H_DATA, C2H_TERM, CH, R2T, RSP};
use nvmux_core::crc32c::Crc32c;

pub type Res<T> = Result<T, String>;

/// A completion on a blocking queue.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub dw0: u32,
    pub dw1: u32,
    pub status: u16,
}

impl Done {
    pub fn ok(&self) -> bool {
        self.status & 0x7ff == 0
    }
}

/// Largest data a command on this queue reads (Identify, log pages).
const MAX_READ: usize = 64 << 10;

pub struct SyncConn {
    pub s: TcpStream,
    pub ic: IcResp,
    pub addr: SocketAddr,
    next_cid: u16,
}

/// A 64-byte submission queue entry.
pub fn sqe(opcode: u8, nsid: u32) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0] = opcode;
    b[1] = 0x40; // SGL
    b[4..8].copy_from_slice(&nsid.to_le_bytes());
    b
}

pub fn set32(s: &mut [u8; 64], dw: usize, v: u32) {
    s[dw * 4..dw * 4 + 4].copy_from_slice(&v.to_le_bytes());
}

fn fabrics(fctype: u8) -> [u8; 64] {
    let mut s = sqe(0x7f, 0);
    s[4] = fctype;
    s
}

/// A host identifier derived from the host NQN (stable per NQN).
pub fn hostid(hostnqn: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, b) in hostnqn.bytes().enumerate() {
        id[i % 16] = id[i % 16].wrapping_mul(31).wrapping_add(b);
    }
    id[6] = (id[6] & 0x0f) | 0x40; // looks like a v4 UUID
    id
}

impl SyncConn {
    /// TCP connect (bounded by `timeout`) and ICReq/ICResp; the digests asked for must
    /// be granted.
    pub fn open(addr: SocketAddr, dg: Digests, timeout: Duration) -> Res<SyncConn> {
        let s = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut c = SyncConn {
            s,
            ic: IcResp {
                digests: dg,
                cpda: 4,
                maxh2cdata: 4096,
            },
            addr,
            next_cid: 1,
        };
        c.s.write_all(&wire::icreq(dg))
            .map_err(|e| format!("{addr}: send ICReq: {e}"))?;
        let mut r = [0u8; 128];
        c.s.read_exact(&mut r)
            .map_err(|e| format!("{addr}: receive ICResp: {e}"))?;
        let ic = wire::icresp(&r).map_err(|e| format!("{addr}: {e}"))?;
        if ic.digests != dg {
            return Err(format!(
                "{addr}: the controller did not grant the digests asked for"
            ));
        }
        c.ic = ic;
        Ok(c)
    }

    pub fn set_timeout(&self, t: Duration) {
        self.s.set_read_timeout(Some(t)).ok();
        self.s.set_write_timeout(Some(t)).ok();
    }

    /// Send a command with `out` as in-capsule data (at most 8 KiB) and wait for its
    /// completion; `read_len` bytes of data may come back.
    pub fn cmd(&mut self, mut sq: [u8; 64], out: &[u8], read_len: usize) -> Res<(Done, Vec<u8>)> {
        if read_len > MAX_READ || out.len() > 8192 {
            return Err("command too large".into());
        }
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sq[2..4].copy_from_slice(&cid.to_le_bytes());
        let dg = self.ic.digests;
        let mut h = [0u8; 80];
        let n = wire::cmd_header(&mut h, &sq, out.len(), read_len as u32, dg);
        let mut msg = Vec::with_capacity(n + out.len() + 4);
        msg.extend_from_slice(&h[..n]);
        msg.extend_from_slice(out);
        if dg.data && !out.is_empty() {
            msg.extend_from_slice(&nvmux_core::crc32c::crc32c(out).to_le_bytes());
        }
        self.s.write_all(&msg).map_err(|e| format!("send: {e}"))?;
        let mut data = vec![0u8; read_len];
        loop {
            let mut ch = [0u8; CH];
            self.s
                .read_exact(&mut ch)
                .map_err(|e| format!("receive: {e}"))?;
            let f = wire::frame(&ch, dg, MAX_READ)?;
            let mut head = [0u8; 256];
            head[..CH].copy_from_slice(&ch);
            self.s
                .read_exact(&mut head[CH..f.head])
                .map_err(|e| format!("receive: {e}"))?;
            let p = wire::parse(&head[..f.head], &f, dg)?;
            match (f.ty, p) {
                (
                    RSP,
                    HostPdu::Rsp {
                        cid: c,
                        dw0,
                        dw1,
                        status,
                    },
                ) => {
                    if c != cid {
                        return Err(format!("completion for unknown command {c}"));
                    }
                    return Ok((Done { dw0, dw1, status }, data));
                }
                (
                    C2H_DATA,
                    HostPdu::C2HData {
                        cid: c,
                        datao,
                        datal,
                        success,
                        ..
                    },
                ) => {
                    let (o, l) = (datao as usize, datal as usize);
                    if c != cid || o.checked_add(l).is_none_or(|e| e > read_len) {
                        return Err("C2HData outside the command".into());
                    }
                    self.s
                        .read_exact(&mut data[o..o + l])
                        .map_err(|e| format!("receive: {e}"))?;
                    if f.ddgst {
                        let mut d = [0u8; 4];
                        self.s
                            .read_exact(&mut d)
                            .map_err(|e| format!("receive: {e}"))?;
                        let mut c = Crc32c::new();
                        c.update(&data[o..o + l]);
                        if c.finish() != u32::from_le_bytes(d) {
                            return Err("data digest mismatch".into());
                        }
                    }
                    if success {
                        return Ok((
                            Done {
                                dw0: 0,
                                dw1: 0,
                                status: 0,
                            },
                            data,
                        ));
                    }
                }
                (R2T, _) => return Err("R2T on the control queue".into()),
                (C2H_TERM, HostPdu::Term { fes }) => {
                    return Err(format!(
                        "controller terminated the connection (FES {fes:#x})"
                    ))
                }
                _ => return Err("unexpected PDU".into()),
            }
        }
    }

    /// Fabrics Connect; returns the controller id (dword 0) and whether the controller
    /// asks for authentication.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        &mut self,
        qid: u16,
        entries: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato_ms: u32,
    ) -> Res<(u16, bool)> {
        if subnqn.len() > 255 || hostnqn.len() > 255 {
            return Err("NQN longer than 255 bytes".into());
        }
        let mut s = fabrics(0x01);
        s[42..44].copy_from_slice(&qid.to_le_bytes());
        s[44..46].copy_from_slice(&(entries - 1).to_le_bytes());
        s[48..52].copy_from_slice(&kato_ms.to_le_bytes());
        let mut d = vec![0u8; 1024];
        d[..16].copy_from_slice(&hostid(hostnqn));
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        d[256..256 + subnqn.len()].copy_from_slice(subnqn.as_bytes());
        d[512..512 + hostnqn.len()].copy_from_slice(hostnqn.as_bytes());
        let (c, _) = self.cmd(s, &d, 0)?;
        if !c.ok() {
            return Err(format!(
                "{}: connect qid {qid} refused: status {:#x} dw0 {:#x}",
                self.addr, c.status, c.dw0
            ));
        }
        Ok((c.dw0 as u16, c.dw0 & (1 << 17) != 0))
    }

    pub fn prop_get(&mut self, off: u32, eight: bool) -> Res<u64> {
        let mut s = fabrics(0x04);
        s[40] = eight as u8;
        s[44..48].copy_from_slice(&off.to_le_bytes());
        let (c, _) = self.cmd(s, &[], 0)?;
        if !c.ok() {
            return Err(format!("property get {off:#x}: status {:#x}", c.status));
        }
        Ok(c.dw0 as u64 | (c.dw1 as u64) << 32)
    }

    pub fn prop_set(&mut self, off: u32, v: u32) -> Res<()> {
        let mut s = fabrics(0x00);
        s[44..48].copy_from_slice(&off.to_le_bytes());
        s[48..56].copy_from_slice(&(v as u64).to_le_bytes());
        let (c, _) = self.cmd(s, &[], 0)?;
        if !c.ok() {
            return Err(format!("property set {off:#x}: status {:#x}", c.status));
        }
        Ok(())
    }

    /// An admin command returning `len` bytes.
    pub fn admin_read(&mut self, s: [u8; 64], len: usize) -> Res<Vec<u8>> {
        let (c, d) = self.cmd(s, &[], len)?;
        if !c.ok() {
            return Err(format!("admin opcode {:#x}: status {:#x}", s[0], c.status));
        }
        Ok(d)
    }

    pub fn identify(&mut self, cns: u8, nsid: u32) -> Res<Vec<u8>> {
        let mut s = sqe(0x06, nsid);
        set32(&mut s, 10, cns as u32);
        self.admin_read(s, 4096)
    }

    pub fn get_log(&mut self, lid: u8, nsid: u32, len: usize) -> Res<Vec<u8>> {
        let numd = (len / 4 - 1) as u32;
        let mut s = sqe(0x02, nsid);
        set32(&mut s, 10, lid as u32 | (numd & 0xffff) << 16);
        set32(&mut s, 11, numd >> 16);
        self.admin_read(s, len)
    }

    pub fn keep_alive(&mut self) -> Res<()> {
        let (c, _) = self.cmd(sqe(0x18, 0), &[], 0)?;
        if !c.ok() {
            return Err(format!("keep alive: status {:#x}", c.status));
        }
        Ok(())
    }

    /// The peer closed the connection (or it failed): checked without blocking.
    pub fn peer_gone(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: a 1-byte buffer we own; MSG_PEEK|MSG_DONTWAIT neither consumes nor blocks.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.s),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => true, // unsolicited data on an idle admin queue: not ours to keep
            _ => {
                let e = std::io::Error::last_os_error().raw_os_error();
                !matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR))
            }
        }
    }
}
