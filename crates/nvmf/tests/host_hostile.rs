//! A hostile NVMe/TCP controller: a fake controller thread that passes the admin queue
//! bring-up, then answers I/O commands with garbage (bad PLEN, an unknown CID, C2HData
//! past the command's data, an R2T past it, random bytes, silence past the I/O timeout)
//! on successive I/O connections.
//! The host must not panic: each violation takes the connection down, the command is
//! resent on the next connection, and the last (well-behaved) connection completes it.

mod hostkit;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hostkit::{io, run_one, HOSTNQN};
use nvmux_core::{AlignedBuf, BlockDevice, Opcode};
use nvmux_nvmf::host::{RemoteDevice, RemoteSpec};
use nvmux_nvmf::pdu::{self, Digests, Pdu};

const NQN: &str = "nqn.2026-12.io.nvmux:hostile";
const NSZE: u64 = 16384;

#[derive(Clone, Copy, Debug)]
enum Mode {
    BadPlen,
    UnknownCid,
    C2HPast,
    R2TPast,
    Garbage,
    /// Never answers: the host's I/O timeout declares the connection dead.
    Silent,
    Good,
}
const MODES: [Mode; 7] = [
    Mode::BadPlen,
    Mode::UnknownCid,
    Mode::C2HPast,
    Mode::R2TPast,
    Mode::Garbage,
    Mode::Silent,
    Mode::Good,
];

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn resp(s: &mut TcpStream, cid: u16, dw0: u32, dw1: u32) -> std::io::Result<()> {
    let mut c = [0u8; 16];
    c[0..4].copy_from_slice(&dw0.to_le_bytes());
    c[4..8].copy_from_slice(&dw1.to_le_bytes());
    c[12..14].copy_from_slice(&cid.to_le_bytes());
    let mut v = Vec::new();
    pdu::capsule_resp(&mut v, &c, Digests::default());
    s.write_all(&v)
}

fn c2h(s: &mut TcpStream, cid: u16, off: u32, data: &[u8]) -> std::io::Result<()> {
    let mut v = Vec::new();
    pdu::c2h_data_header(&mut v, cid, off, data.len(), true, Digests::default(), 0);
    v.extend_from_slice(data);
    s.write_all(&v)
}

fn recv_pdu(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut ch = [0u8; 8];
    s.read_exact(&mut ch)?;
    let plen = pdu::peek_len(&ch, 256 << 10).map_err(|e| std::io::Error::other(e.why))?;
    let mut v = vec![0u8; plen];
    v[..8].copy_from_slice(&ch);
    s.read_exact(&mut v[8..])?;
    Ok(v)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn serve(mut s: TcpStream, io_conns: Arc<AtomicUsize>) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut ic = [0u8; 128];
    s.read_exact(&mut ic)?;
    let mut v = Vec::new();
    pdu::icresp(&mut v, Digests::default(), 128 << 10);
    s.write_all(&v)?;
    let mut mode = Mode::Good;
    loop {
        let buf = recv_pdu(&mut s)?;
        let Ok(Pdu::Cmd { sqe, data }) = pdu::parse(&buf, Digests::default(), 256 << 10) else {
            return Ok(());
        };
        let cid = le16(sqe, 2);
        match sqe[0] {
            0x7f => match sqe[4] {
                0x01 => {
                    if le16(sqe, 42) != 0 {
                        let k = io_conns.fetch_add(1, Ordering::SeqCst);
                        mode = MODES[k.min(MODES.len() - 1)];
                    }
                    resp(&mut s, cid, 1, 0)?
                }
                0x04 => {
                    let v: u64 = match le32(sqe, 44) {
                        0 => 127 | 2 << 24,
                        0x1c => 1,
                        _ => 0,
                    };
                    resp(&mut s, cid, v as u32, (v >> 32) as u32)?
                }
                _ => resp(&mut s, cid, 0, 0)?,
            },
            0x06 => {
                let mut d = vec![0u8; 4096];
                if sqe[40] == 1 {
                    d[77] = 5;
                    d[520] = 0x0c;
                    d[1792..1796].copy_from_slice(&((64 + 8192) / 16u32).to_le_bytes());
                } else if le32(sqe, 4) == 1 {
                    d[0..8].copy_from_slice(&NSZE.to_le_bytes());
                    d[8..16].copy_from_slice(&NSZE.to_le_bytes());
                    d[130] = 12;
                }
                c2h(&mut s, cid, 0, &d)?;
                resp(&mut s, cid, 0, 0)?
            }
            0x09 => resp(&mut s, cid, 0x0003_0003, 0)?,
            0x02 if le32(sqe, 4) == 0 => {
                let numd = (le32(sqe, 40) >> 16) as usize + 1;
                c2h(&mut s, cid, 0, &vec![0u8; numd * 4])?;
                resp(&mut s, cid, 0, 0)?
            }
            0x18 => resp(&mut s, cid, 0, 0)?,
            op => {
                // An I/O command (read 0x02 or write 0x01).
                let len = (le32(sqe, 48) as usize + 1) * 4096;
                match mode {
                    Mode::BadPlen => s.write_all(&[0x05, 0, 24, 0, 0, 0xff, 0xff, 0xff])?,
                    Mode::UnknownCid => resp(&mut s, cid ^ 0x1234, 0, 0)?,
                    Mode::C2HPast => c2h(&mut s, cid, 4096, &pattern(len))?,
                    Mode::R2TPast => {
                        let mut v = Vec::new();
                        pdu::r2t(&mut v, cid, 1, 0, (len + 4096) as u32, Digests::default());
                        s.write_all(&v)?
                    }
                    Mode::Garbage => s.write_all(&[0x5a; 300])?,
                    Mode::Silent => {}
                    Mode::Good if op == 0x02 => {
                        c2h(&mut s, cid, 0, &pattern(len))?;
                        resp(&mut s, cid, 0, 0)?
                    }
                    Mode::Good => {
                        let mut got = data.to_vec();
                        if got.is_empty() {
                            let mut v = Vec::new();
                            pdu::r2t(&mut v, cid, 1, 0, len as u32, Digests::default());
                            s.write_all(&v)?;
                            while got.len() < len {
                                let b = recv_pdu(&mut s)?;
                                match pdu::parse(&b, Digests::default(), 256 << 10) {
                                    Ok(Pdu::H2CData { data, datao, .. })
                                        if datao as usize == got.len() =>
                                    {
                                        got.extend_from_slice(data)
                                    }
                                    _ => return Ok(()),
                                }
                            }
                        }
                        let ok = got == pattern(len);
                        resp(&mut s, cid, 0, if ok { 0 } else { 1 })?;
                        if !ok {
                            return Ok(());
                        }
                    }
                }
                if !matches!(mode, Mode::Good) {
                    // Leave the host to close the connection.
                    let mut sink = [0u8; 4096];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                    return Ok(());
                }
            }
        }
    }
}

fn fake_controller(stop: Arc<AtomicBool>, io_conns: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let n = io_conns.clone();
                    std::thread::spawn(move || {
                        let _ = serve(s, n);
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    addr
}

#[test]
fn hostile_controller_costs_connections_not_the_process() {
    let stop = Arc::new(AtomicBool::new(false));
    let io_conns = Arc::new(AtomicUsize::new(0));
    let addr = fake_controller(stop.clone(), io_conns.clone());
    let mut spec = RemoteSpec::new(NQN, vec![addr], HOSTNQN);
    spec.io_timeout = Duration::from_secs(1);
    let dev = RemoteDevice::connect(spec).expect("connect");
    assert_eq!(dev.info().num_blocks, NSZE);
    assert!(dev.info().discard && dev.info().write_zeroes);
    let mut q = dev.open_queue(4).expect("queue");
    let limit = Duration::from_secs(60);
    // A 64 KiB write (R2T) meets every kind of garbage, one connection each, then a
    // well-behaved connection takes it.
    let mut w = AlignedBuf::new(64 << 10);
    w.as_mut_slice().copy_from_slice(&pattern(64 << 10));
    let st = run_one(&mut *q, io(Opcode::Write, 0, &w, 1), limit);
    assert!(st.is_ok(), "{st} {:?}", dev.status());
    assert_eq!(io_conns.load(Ordering::SeqCst), MODES.len());
    let r = AlignedBuf::new(64 << 10);
    assert!(run_one(&mut *q, io(Opcode::Read, 0, &r, 2), limit).is_ok());
    assert!(r.as_slice() == pattern(64 << 10).as_slice());
    let s = dev.status();
    assert!(s.connected);
    assert_eq!(s.commands_retried, MODES.len() as u64 - 1, "{s:?}");
    assert_eq!(s.commands_failed, 0);
    drop(q);
    dev.shutdown();
    stop.store(true, Ordering::Release);
}
