//! Host-side NVMe/TCP PDU encoding and parsing: pure functions on byte slices (unit
//! tested and fuzzed without sockets). The parser checks every field a controller sends
//! against the negotiated limits before the caller uses it.

use crate::pdu::{
    Digests, C2H_DATA, C2H_TERM, CH, CMD, CMD_HLEN, DATA_HLEN, FLAG_DDGST, FLAG_HDGST, FLAG_LAST,
    FLAG_SUCCESS, H2C_DATA, ICREQ, ICREQ_LEN, ICRESP, R2T, RSP, RSP_HLEN, TERM_HLEN, TERM_MAX_DATA,
};
use nvmux_core::crc32c::crc32c;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// What the receiver must buffer of a PDU before acting on it: `head` bytes (the header,
/// its digest and padding up to the data), then `data` bytes of payload (C2HData only),
/// then a 4-byte data digest if `ddgst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub ty: u8,
    pub head: usize,
    pub data: usize,
    pub ddgst: bool,
}

/// A controller-to-host PDU header, parsed and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPdu {
    /// CapsuleResp: a completion queue entry.
    Rsp {
        cid: u16,
        dw0: u32,
        dw1: u32,
        /// Status field without the phase bit (SC bits 0..8, SCT 8..11, CRD, More, DNR).
        status: u16,
    },
    C2HData {
        cid: u16,
        datao: u32,
        datal: u32,
        last: bool,
        success: bool,
    },
    R2T {
        cid: u16,
        ttag: u16,
        off: u32,
        len: u32,
    },
    Term {
        fes: u16,
    },
}

/// Check a common header: which PDU, how much of it is header and how much data.
/// `max_data` bounds the data of one C2HData PDU.
pub fn frame(ch: &[u8; CH], dg: Digests, max_data: usize) -> Result<Frame, &'static str> {
    let (ty, flags, hlen, pdo, plen) = (
        ch[0],
        ch[1],
        ch[2] as usize,
        ch[3] as usize,
        le32(ch, 4) as usize,
    );
    let hd = if dg.header { 4 } else { 0 };
    let flag_hd = flags & FLAG_HDGST != 0;
    match ty {
        RSP | R2T => {
            let want = if ty == RSP { RSP_HLEN } else { DATA_HLEN };
            if hlen != want {
                return Err("wrong header length");
            }
            if flag_hd != dg.header {
                return Err("header digest flag does not match the negotiation");
            }
            if plen != want + hd {
                return Err("wrong PDU length");
            }
            Ok(Frame {
                ty,
                head: plen,
                data: 0,
                ddgst: false,
            })
        }
        C2H_TERM => {
            if hlen != TERM_HLEN || !(TERM_HLEN..=TERM_HLEN + TERM_MAX_DATA).contains(&plen) {
                return Err("bad termination request length");
            }
            Ok(Frame {
                ty,
                head: plen,
                data: 0,
                ddgst: false,
            })
        }
        C2H_DATA => {
            if hlen != DATA_HLEN {
                return Err("wrong header length");
            }
            if flag_hd != dg.header {
                return Err("header digest flag does not match the negotiation");
            }
            if (flags & FLAG_DDGST != 0) != dg.data {
                return Err("data digest flag does not match the negotiation");
            }
            let dd = if dg.data { 4 } else { 0 };
            if pdo < DATA_HLEN + hd || pdo + dd >= plen {
                return Err("C2HData data offset outside the PDU");
            }
            let data = plen - pdo - dd;
            if data > max_data {
                return Err("C2HData longer than allowed");
            }
            Ok(Frame {
                ty,
                head: pdo,
                data,
                ddgst: dg.data,
            })
        }
        _ => Err("unexpected PDU type"),
    }
}

/// Parse the `head` bytes of a PDU whose [`Frame`] was returned by [`frame`] for its
/// first 8 bytes.
pub fn parse(head: &[u8], f: &Frame, dg: Digests) -> Result<HostPdu, &'static str> {
    if head.len() != f.head || head.len() < CH {
        return Err("header incomplete");
    }
    let hlen = head[2] as usize;
    if dg.header && f.ty != C2H_TERM {
        if head.len() < hlen + 4 {
            return Err("header digest missing");
        }
        if crc32c(&head[..hlen]) != le32(head, hlen) {
            return Err("header digest mismatch");
        }
    }
    match f.ty {
        RSP => {
            if head.len() < RSP_HLEN {
                return Err("short response");
            }
            Ok(HostPdu::Rsp {
                dw0: le32(head, 8),
                dw1: le32(head, 12),
                cid: le16(head, 20),
                status: le16(head, 22) >> 1,
            })
        }
        R2T => {
            if head.len() < DATA_HLEN {
                return Err("short R2T");
            }
            let len = le32(head, 16);
            if len == 0 {
                return Err("R2T for no data");
            }
            Ok(HostPdu::R2T {
                cid: le16(head, 8),
                ttag: le16(head, 10),
                off: le32(head, 12),
                len,
            })
        }
        C2H_DATA => {
            if head.len() < DATA_HLEN {
                return Err("short C2HData");
            }
            let datal = le32(head, 16);
            if datal as usize != f.data {
                return Err("C2HData DATAL does not match its data");
            }
            let flags = head[1];
            let success = flags & FLAG_SUCCESS != 0;
            let last = flags & FLAG_LAST != 0;
            if success && !last {
                return Err("C2HData SUCCESS without LAST");
            }
            Ok(HostPdu::C2HData {
                cid: le16(head, 8),
                datao: le32(head, 12),
                datal,
                last,
                success,
            })
        }
        C2H_TERM => Ok(HostPdu::Term { fes: le16(head, 8) }),
        _ => Err("unexpected PDU type"),
    }
}

/// ICReq: PFV 0, HPDA 0, the digests asked for, MAXR2T 0 (one outstanding R2T).
pub fn icreq(dg: Digests) -> [u8; ICREQ_LEN] {
    let mut b = [0u8; ICREQ_LEN];
    b[0] = ICREQ;
    b[2] = ICREQ_LEN as u8;
    b[4..8].copy_from_slice(&(ICREQ_LEN as u32).to_le_bytes());
    b[11] = dg.header as u8 | (dg.data as u8) << 1;
    b
}

/// What an ICResp granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    pub digests: Digests,
    /// Data alignment the controller wants in H2CData PDUs (bytes).
    pub cpda: usize,
    pub maxh2cdata: u32,
}

/// Parse a whole ICResp (128 bytes).
pub fn icresp(b: &[u8]) -> Result<IcResp, &'static str> {
    if b.len() != ICREQ_LEN || b[0] != ICRESP || b[2] as usize != ICREQ_LEN {
        return Err("not an ICResp");
    }
    if le32(b, 4) as usize != ICREQ_LEN {
        return Err("ICResp length is not 128");
    }
    if le16(b, 8) != 0 {
        return Err("unsupported PDU format version");
    }
    let maxh2cdata = le32(b, 12);
    if maxh2cdata < 4096 {
        return Err("MAXH2CDATA below 4096");
    }
    let cpda = b[10] as usize;
    if cpda > 31 {
        return Err("CPDA out of range");
    }
    Ok(IcResp {
        digests: Digests {
            header: b[11] & 1 != 0,
            data: b[11] & 2 != 0,
        },
        cpda: (cpda + 1) * 4,
        maxh2cdata,
    })
}

/// Write a command capsule header for `sqe` (CID already set) with `inline` bytes of
/// in-capsule data following (0: none, the SGL then describes a transport data block of
/// `xfer` bytes). Returns the header length written into `out` (72 or 76 bytes). The
/// caller sends the data and, if `data_digest` is Some, its CRC after it.
pub fn cmd_header(
    out: &mut [u8; 80],
    sqe: &[u8; 64],
    inline: usize,
    xfer: u32,
    dg: Digests,
) -> usize {
    let hd = if dg.header { 4 } else { 0 };
    let dd = if dg.data && inline > 0 { 4 } else { 0 };
    let pdo = if inline > 0 { CMD_HLEN + hd } else { 0 };
    let plen = CMD_HLEN + hd + inline + dd;
    let flags = (if dg.header { FLAG_HDGST } else { 0 }) | (if dd != 0 { FLAG_DDGST } else { 0 });
    out[..4].copy_from_slice(&[CMD, flags, CMD_HLEN as u8, pdo as u8]);
    out[4..8].copy_from_slice(&(plen as u32).to_le_bytes());
    out[8..72].copy_from_slice(sqe);
    // SGL descriptor: in-capsule data block (offset 0) or a transport SGL data block.
    out[8 + 24..8 + 32].fill(0);
    out[8 + 32..8 + 36]
        .copy_from_slice(&(if inline > 0 { inline as u32 } else { xfer }).to_le_bytes());
    out[8 + 36..8 + 39].fill(0);
    out[8 + 39] = if inline > 0 { 0x01 } else { 0x5a };
    if dg.header {
        let c = crc32c(&out[..CMD_HLEN]);
        out[72..76].copy_from_slice(&c.to_le_bytes());
    }
    CMD_HLEN + hd
}

/// Write an H2CData header for `len` bytes at `off` of command `cid` (transfer tag
/// `ttag`); `pad` is the data offset the controller's CPDA asks for (at least the
/// header length). Returns the bytes of `out` to send before the data.
#[allow(clippy::too_many_arguments)]
pub fn h2c_header(
    out: &mut [u8; 128],
    cid: u16,
    ttag: u16,
    off: u32,
    len: u32,
    last: bool,
    dg: Digests,
    cpda: usize,
) -> usize {
    let hd = if dg.header { 4 } else { 0 };
    let dd = if dg.data { 4 } else { 0 };
    let pdo = (DATA_HLEN + hd).div_ceil(cpda.max(4)) * cpda.max(4);
    let pdo = pdo.min(128);
    let plen = pdo + len as usize + dd;
    let flags = (if dg.header { FLAG_HDGST } else { 0 })
        | (if dg.data { FLAG_DDGST } else { 0 })
        | (if last { FLAG_LAST } else { 0 });
    out[..pdo].fill(0);
    out[..4].copy_from_slice(&[H2C_DATA, flags, DATA_HLEN as u8, pdo as u8]);
    out[4..8].copy_from_slice(&(plen as u32).to_le_bytes());
    out[8..10].copy_from_slice(&cid.to_le_bytes());
    out[10..12].copy_from_slice(&ttag.to_le_bytes());
    out[12..16].copy_from_slice(&off.to_le_bytes());
    out[16..20].copy_from_slice(&len.to_le_bytes());
    if dg.header {
        let c = crc32c(&out[..DATA_HLEN]);
        out[DATA_HLEN..DATA_HLEN + 4].copy_from_slice(&c.to_le_bytes());
    }
    pdo
}

/// Feed arbitrary bytes through the host-side parser as a receiver would: frame, then
/// parse the header (for fuzzing). Never panics.
pub fn parse_stream(mut b: &[u8], dg: Digests, max_data: usize) -> usize {
    let mut n = 0;
    while let Some(ch) = b.first_chunk::<CH>() {
        let Ok(f) = frame(ch, dg, max_data) else {
            break;
        };
        if b.len() < f.head {
            break;
        }
        if parse(&b[..f.head], &f, dg).is_err() {
            break;
        }
        let total = f.head + f.data + if f.ddgst { 4 } else { 0 };
        if b.len() < total {
            break;
        }
        b = &b[total..];
        n += 1;
    }
    let _ = icresp(b);
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdu;

    #[test]
    fn target_encoded_pdus_parse() {
        for (h, d) in [(false, false), (true, true), (true, false), (false, true)] {
            let dg = Digests { header: h, data: d };
            let mut v = Vec::new();
            pdu::capsule_resp(
                &mut v,
                &{
                    let mut c = [0u8; 16];
                    c[12..14].copy_from_slice(&7u16.to_le_bytes());
                    c[14..16].copy_from_slice(&(0x0281u16 << 1).to_le_bytes());
                    c
                },
                dg,
            );
            let f = frame(v.first_chunk().unwrap(), dg, 4096).unwrap();
            assert_eq!(f.head, v.len());
            match parse(&v, &f, dg).unwrap() {
                HostPdu::Rsp { cid, status, .. } => assert_eq!((cid, status), (7, 0x0281)),
                p => panic!("{p:?}"),
            }
            let mut v = Vec::new();
            pdu::c2h_data_header(&mut v, 3, 512, 100, true, dg, 0);
            let f = frame(v.first_chunk().unwrap(), dg, 4096).unwrap();
            assert_eq!((f.head, f.data), (v.len(), 100));
            assert!(matches!(
                parse(&v, &f, dg).unwrap(),
                HostPdu::C2HData {
                    cid: 3,
                    datao: 512,
                    datal: 100,
                    ..
                }
            ));
            let mut v = Vec::new();
            pdu::r2t(&mut v, 9, 1, 0, 8192, dg);
            let f = frame(v.first_chunk().unwrap(), dg, 4096).unwrap();
            assert_eq!(
                parse(&v, &f, dg).unwrap(),
                HostPdu::R2T {
                    cid: 9,
                    ttag: 1,
                    off: 0,
                    len: 8192
                }
            );
            // The target's own parser accepts what the host encodes.
            let mut out = [0u8; 80];
            let sqe = [1u8; 64];
            let n = cmd_header(&mut out, &sqe, 0, 4096, dg);
            assert!(matches!(
                pdu::parse(&out[..n], dg, 8192).unwrap(),
                pdu::Pdu::Cmd { .. }
            ));
            let mut hh = [0u8; 128];
            let pdo = h2c_header(&mut hh, 1, 2, 0, 4, true, dg, 4);
            let mut w = hh[..pdo].to_vec();
            w.extend_from_slice(b"abcd");
            if d {
                pdu::data_digest(&mut w, &[b"abcd"]);
            }
            assert!(matches!(
                pdu::parse(&w, dg, 8192).unwrap(),
                pdu::Pdu::H2CData {
                    cccid: 1,
                    ttag: 2,
                    ..
                }
            ));
        }
    }

    #[test]
    fn refusals() {
        let dg = Digests::default();
        let mut v = Vec::new();
        pdu::c2h_data_header(&mut v, 3, 0, 100, true, dg, 0);
        assert!(frame(v.first_chunk().unwrap(), dg, 64).is_err()); // too long
        v[3] = 200; // PDO past the end
        assert!(frame(v.first_chunk().unwrap(), dg, 4096).is_err());
        let mut r = Vec::new();
        pdu::capsule_resp(&mut r, &[0; 16], dg);
        r[4] = 200; // PLEN
        assert!(frame(r.first_chunk().unwrap(), dg, 4096).is_err());
        r[4] = 24;
        r[0] = 0x42;
        assert!(frame(r.first_chunk().unwrap(), dg, 4096).is_err());
        // Header digest corrupted.
        let hd = Digests {
            header: true,
            data: false,
        };
        let mut r = Vec::new();
        pdu::capsule_resp(&mut r, &[0; 16], hd);
        r[25] ^= 1;
        let f = frame(r.first_chunk().unwrap(), hd, 4096).unwrap();
        assert!(parse(&r, &f, hd).is_err());
        let mut ic = Vec::new();
        pdu::icresp(&mut ic, dg, 1 << 17);
        assert_eq!(icresp(&ic).unwrap().maxh2cdata, 1 << 17);
        ic[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(icresp(&ic).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut buf = vec![0u8; 512];
        for i in 0..200_000u32 {
            let n = (i as usize * 7) % buf.len();
            for b in buf[..n].iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Bias towards plausible headers so the deeper checks run.
            if n >= 8 && i % 2 == 0 {
                buf[0] = [RSP, R2T, C2H_DATA, C2H_TERM][(i as usize / 2) % 4];
                buf[2] = 24;
                buf[4..8].copy_from_slice(&((x as u32) % 300).to_le_bytes());
            }
            for dg in [
                Digests::default(),
                Digests {
                    header: true,
                    data: true,
                },
            ] {
                parse_stream(&buf[..n], dg, 256);
            }
        }
    }
}
