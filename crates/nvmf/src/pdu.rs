//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0): parsing of what a host sends and
//! encoding of what the controller sends. Pure functions on byte slices, so they are unit
//! tested and fuzzed without sockets.
//!
//! Every PDU starts with an 8-byte common header: type, flags, HLEN (header length),
//! PDO (data offset) and PLEN (whole PDU length, little endian). With header digests
//! a CRC32C of the header follows it; with data digests a CRC32C of the data follows the
//! data.

use nvmux_core::crc32c::{crc32c, Crc32c};

pub const ICREQ: u8 = 0x00;
pub const ICRESP: u8 = 0x01;
pub const H2C_TERM: u8 = 0x02;
pub const C2H_TERM: u8 = 0x03;
pub const CMD: u8 = 0x04;
pub const RSP: u8 = 0x05;
pub const H2C_DATA: u8 = 0x06;
pub const C2H_DATA: u8 = 0x07;
pub const R2T: u8 = 0x09;

pub const FLAG_HDGST: u8 = 0x01;
pub const FLAG_DDGST: u8 = 0x02;
pub const FLAG_LAST: u8 = 0x04;
pub const FLAG_SUCCESS: u8 = 0x08;

/// Common header length.
pub const CH: usize = 8;
pub const ICREQ_LEN: usize = 128;
pub const CMD_HLEN: usize = 72;
pub const RSP_HLEN: usize = 24;
pub const DATA_HLEN: usize = 24;
pub const TERM_HLEN: usize = 24;
/// A TermReq carries at most this much of the offending PDU header.
pub const TERM_MAX_DATA: usize = 152;

/// Fatal error status codes of a termination request.
pub const FES_INVALID_HEADER: u16 = 0x01;
pub const FES_SEQUENCE: u16 = 0x02;
pub const FES_HDGST: u16 = 0x03;
pub const FES_OUT_OF_RANGE: u16 = 0x04;
pub const FES_LIMIT: u16 = 0x05;
pub const FES_UNSUPPORTED: u16 = 0x06;

/// Which digests the connection negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// A PDU the host may send, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Pdu<'a> {
    ICReq {
        pfv: u16,
        hpda: u8,
        digests: Digests,
        maxr2t: u32,
    },
    /// H2CTermReq: the host gives up on the connection.
    Term { fes: u16 },
    /// Command capsule: the 64-byte submission queue entry and in-capsule data.
    Cmd { sqe: &'a [u8; 64], data: &'a [u8] },
    H2CData {
        cccid: u16,
        ttag: u16,
        datao: u32,
        last: bool,
        data: &'a [u8],
    },
}

/// Why a PDU was refused: the connection is terminated with this fatal error status and
/// field error information (the byte offset of the bad field, where there is one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PduError {
    pub fes: u16,
    pub fei: u32,
    pub why: &'static str,
}

fn bad(fes: u16, fei: u32, why: &'static str) -> PduError {
    PduError { fes, fei, why }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Check a common header and return the PDU's total length, before the rest of it is
/// buffered. `max_data` bounds the data a PDU may carry.
pub fn peek_len(ch: &[u8; CH], max_data: usize) -> Result<usize, PduError> {
    let (ty, hlen, plen) = (ch[0], ch[2] as usize, le32(ch, 4) as usize);
    let want = match ty {
        ICREQ => ICREQ_LEN,
        H2C_TERM => TERM_HLEN,
        CMD => CMD_HLEN,
        H2C_DATA => DATA_HLEN,
        _ => {
            return Err(bad(
                FES_INVALID_HEADER,
                0,
                "unknown or controller-to-host PDU type",
            ))
        }
    };
    if hlen != want {
        return Err(bad(FES_INVALID_HEADER, 2, "wrong header length"));
    }
    if plen < hlen {
        return Err(bad(
            FES_INVALID_HEADER,
            4,
            "PDU length shorter than its header",
        ));
    }
    // Header, header digest, padding up to 255 (PDO is one byte), data, data digest.
    let limit = match ty {
        ICREQ => ICREQ_LEN,
        H2C_TERM => TERM_HLEN + TERM_MAX_DATA,
        _ => 256 + max_data + 4,
    };
    if plen > limit {
        return Err(bad(
            FES_LIMIT,
            4,
            "PDU longer than the negotiated limits allow",
        ));
    }
    Ok(plen)
}

/// Parse one whole PDU (`buf.len()` is its PLEN, as returned by [`peek_len`]).
pub fn parse(buf: &[u8], dg: Digests, max_data: usize) -> Result<Pdu<'_>, PduError> {
    let Some(ch) = buf.first_chunk::<CH>() else {
        return Err(bad(
            FES_INVALID_HEADER,
            4,
            "PDU shorter than a common header",
        ));
    };
    let plen = peek_len(ch, max_data)?;
    if plen != buf.len() {
        return Err(bad(FES_INVALID_HEADER, 4, "PDU length does not match"));
    }
    let (ty, flags, hlen, pdo) = (buf[0], buf[1], buf[2] as usize, buf[3] as usize);
    match ty {
        ICREQ => {
            if plen != ICREQ_LEN {
                return Err(bad(FES_INVALID_HEADER, 4, "ICReq length is not 128"));
            }
            let dgst = buf[11];
            Ok(Pdu::ICReq {
                pfv: le16(buf, 8),
                hpda: buf[10],
                digests: Digests {
                    header: dgst & 1 != 0,
                    data: dgst & 2 != 0,
                },
                maxr2t: le32(buf, 12),
            })
        }
        H2C_TERM => Ok(Pdu::Term { fes: le16(buf, 8) }),
        H2C_DATA => {
            let h = h2c_header(buf, plen, dg)?;
            let end = plen - if dg.data { 4 } else { 0 };
            let data = &buf[h.pdo..end];
            if data.len() > max_data {
                return Err(bad(FES_LIMIT, 4, "more data than the negotiated limit"));
            }
            if dg.data && crc32c(data) != le32(buf, end) {
                return Err(bad(FES_HDGST, 0, "data digest mismatch"));
            }
            Ok(Pdu::H2CData {
                cccid: h.cccid,
                ttag: h.ttag,
                datao: h.datao,
                last: h.last,
                data,
            })
        }
        CMD => {
            if (flags & FLAG_HDGST != 0) != dg.header {
                return Err(bad(
                    FES_INVALID_HEADER,
                    1,
                    "header digest flag does not match the negotiated digests",
                ));
            }
            let hd = if dg.header { 4 } else { 0 };
            if plen < hlen + hd {
                return Err(bad(
                    FES_INVALID_HEADER,
                    4,
                    "PDU too short for its header digest",
                ));
            }
            if dg.header && crc32c(&buf[..hlen]) != le32(buf, hlen) {
                return Err(bad(FES_HDGST, 0, "header digest mismatch"));
            }
            let data = if plen == hlen + hd {
                if pdo != 0 && pdo != plen {
                    return Err(bad(
                        FES_INVALID_HEADER,
                        3,
                        "data offset set on a PDU without data",
                    ));
                }
                if flags & FLAG_DDGST != 0 {
                    return Err(bad(
                        FES_INVALID_HEADER,
                        1,
                        "data digest flag on a PDU without data",
                    ));
                }
                &buf[plen..]
            } else {
                if pdo < hlen + hd || pdo > plen {
                    return Err(bad(FES_INVALID_HEADER, 3, "data offset outside the PDU"));
                }
                if (flags & FLAG_DDGST != 0) != dg.data {
                    return Err(bad(
                        FES_INVALID_HEADER,
                        1,
                        "data digest flag does not match the negotiated digests",
                    ));
                }
                let dd = if dg.data { 4 } else { 0 };
                if plen - pdo < dd {
                    return Err(bad(
                        FES_INVALID_HEADER,
                        4,
                        "PDU too short for its data digest",
                    ));
                }
                let end = plen - dd;
                let data = &buf[pdo..end];
                if dg.data && crc32c(data) != le32(buf, end) {
                    return Err(bad(FES_HDGST, 0, "data digest mismatch"));
                }
                if data.len() > max_data {
                    return Err(bad(FES_LIMIT, 4, "more data than the negotiated limit"));
                }
                data
            };
            let sqe = buf[CH..CH + 64].first_chunk::<64>().ok_or(bad(
                FES_INVALID_HEADER,
                4,
                "short command capsule",
            ))?;
            Ok(Pdu::Cmd { sqe, data })
        }
        _ => Err(bad(FES_INVALID_HEADER, 0, "unexpected PDU type")),
    }
}

/// An H2CData PDU's header, checked: which command and transfer it belongs to, where its
/// data goes, how long the data is and where it starts in the PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2CHeader {
    pub cccid: u16,
    pub ttag: u16,
    pub datao: u32,
    pub datal: usize,
    pub last: bool,
    /// Offset of the data in the PDU (PDO).
    pub pdo: usize,
}

/// Check the header of an H2CData PDU of length `plen` (as [`peek_len`] returned it) from
/// its first bytes: at least PDO of them, so the data (and its digest) can be received
/// straight into the command's buffer. `hdr` may be longer than PDO; only PDO bytes are
/// read.
pub fn h2c_header(hdr: &[u8], plen: usize, dg: Digests) -> Result<H2CHeader, PduError> {
    if hdr.len() < DATA_HLEN || hdr[0] != H2C_DATA || hdr[2] as usize != DATA_HLEN {
        return Err(bad(FES_INVALID_HEADER, 0, "not an H2CData header"));
    }
    let (flags, pdo) = (hdr[1], hdr[3] as usize);
    if (flags & FLAG_HDGST != 0) != dg.header {
        return Err(bad(
            FES_INVALID_HEADER,
            1,
            "header digest flag does not match the negotiated digests",
        ));
    }
    if (flags & FLAG_DDGST != 0) != dg.data {
        return Err(bad(
            FES_INVALID_HEADER,
            1,
            "data digest flag does not match the negotiated digests",
        ));
    }
    let hd = if dg.header { 4 } else { 0 };
    let dd = if dg.data { 4 } else { 0 };
    if pdo < DATA_HLEN + hd || pdo + dd >= plen {
        return Err(bad(
            FES_INVALID_HEADER,
            3,
            "H2CData without data, or data offset outside the PDU",
        ));
    }
    if hdr.len() < pdo {
        return Err(bad(FES_INVALID_HEADER, 3, "H2CData header incomplete"));
    }
    if dg.header && crc32c(&hdr[..DATA_HLEN]) != le32(hdr, DATA_HLEN) {
        return Err(bad(FES_HDGST, 0, "header digest mismatch"));
    }
    let datal = plen - pdo - dd;
    if le32(hdr, 16) as usize != datal {
        return Err(bad(
            FES_INVALID_HEADER,
            16,
            "H2CData DATAL does not match its data",
        ));
    }
    Ok(H2CHeader {
        cccid: le16(hdr, 8),
        ttag: le16(hdr, 10),
        datao: le32(hdr, 12),
        datal,
        last: flags & FLAG_LAST != 0,
        pdo,
    })
}

fn common(out: &mut Vec<u8>, ty: u8, flags: u8, hlen: usize, pdo: usize, plen: usize) {
    out.extend_from_slice(&[ty, flags, hlen as u8, pdo as u8]);
    out.extend_from_slice(&(plen as u32).to_le_bytes());
}

fn header_digest(out: &mut Vec<u8>, start: usize, dg: Digests) {
    if dg.header {
        let c = crc32c(&out[start..]);
        out.extend_from_slice(&c.to_le_bytes());
    }
}

/// ICResp: the controller's answer to ICReq.
pub fn icresp(out: &mut Vec<u8>, dg: Digests, maxh2cdata: u32) {
    let start = out.len();
    common(out, ICRESP, 0, ICREQ_LEN, 0, ICREQ_LEN);
    out.extend_from_slice(&0u16.to_le_bytes()); // PFV 0
    out.push(0); // CPDA: no alignment needed for host data
    out.push(dg.header as u8 | (dg.data as u8) << 1);
    out.extend_from_slice(&maxh2cdata.to_le_bytes());
    out.resize(start + ICREQ_LEN, 0);
}

/// CapsuleResp carrying a 16-byte completion queue entry.
pub fn capsule_resp(out: &mut Vec<u8>, cqe: &[u8; 16], dg: Digests) {
    let start = out.len();
    let hd = if dg.header { 4 } else { 0 };
    common(
        out,
        RSP,
        if dg.header { FLAG_HDGST } else { 0 },
        RSP_HLEN,
        0,
        RSP_HLEN + hd,
    );
    out.extend_from_slice(cqe);
    header_digest(out, start, dg);
}

/// R2T: ask the host for `len` bytes of command `cccid` from offset `off`.
pub fn r2t(out: &mut Vec<u8>, cccid: u16, ttag: u16, off: u32, len: u32, dg: Digests) {
    let start = out.len();
    let hd = if dg.header { 4 } else { 0 };
    common(
        out,
        R2T,
        if dg.header { FLAG_HDGST } else { 0 },
        DATA_HLEN,
        0,
        DATA_HLEN + hd,
    );
    out.extend_from_slice(&cccid.to_le_bytes());
    out.extend_from_slice(&ttag.to_le_bytes());
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    header_digest(out, start, dg);
}

/// The header (and padding) of a C2HData PDU carrying `len` bytes; the caller appends
/// the data and then [`data_digest`] if data digests are on. `hpda` is the host's
/// requested data alignment (in 4-byte units, 0-based).
pub fn c2h_data_header(
    out: &mut Vec<u8>,
    cccid: u16,
    off: u32,
    len: usize,
    last: bool,
    dg: Digests,
    hpda: u8,
) {
    let start = out.len();
    let hd = if dg.header { 4 } else { 0 };
    let align = (hpda as usize + 1) * 4;
    let pdo = (DATA_HLEN + hd).div_ceil(align) * align;
    let plen = pdo + len + if dg.data { 4 } else { 0 };
    let flags = (if dg.header { FLAG_HDGST } else { 0 })
        | (if dg.data { FLAG_DDGST } else { 0 })
        | (if last { FLAG_LAST } else { 0 });
    common(out, C2H_DATA, flags, DATA_HLEN, pdo, plen);
    out.extend_from_slice(&cccid.to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    header_digest(out, start, dg);
    out.resize(start + pdo, 0);
}

/// Append the CRC32C of `data` (the data of the PDU just written).
pub fn data_digest(out: &mut Vec<u8>, data: &[&[u8]]) {
    let mut c = Crc32c::new();
    for d in data {
        c.update(d);
    }
    out.extend_from_slice(&c.finish().to_le_bytes());
}

/// C2HTermReq: the controller terminates the connection; `hdr` is the offending PDU header.
pub fn c2h_term(out: &mut Vec<u8>, fes: u16, fei: u32, hdr: &[u8]) {
    let hdr = &hdr[..hdr.len().min(TERM_MAX_DATA)];
    common(out, C2H_TERM, 0, TERM_HLEN, 0, TERM_HLEN + hdr.len());
    out.extend_from_slice(&fes.to_le_bytes());
    out.extend_from_slice(&fei.to_le_bytes());
    out.extend_from_slice(&[0; 10]);
    out.extend_from_slice(hdr);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd_pdu(dg: Digests, data: &[u8]) -> Vec<u8> {
        let hd = if dg.header { 4 } else { 0 };
        let pdo = if data.is_empty() { 0 } else { CMD_HLEN + hd };
        let dd = if dg.data && !data.is_empty() { 4 } else { 0 };
        let plen = CMD_HLEN + hd + data.len() + dd;
        let mut flags = if dg.header { FLAG_HDGST } else { 0 };
        if dd != 0 {
            flags |= FLAG_DDGST;
        }
        let mut v = Vec::new();
        common(&mut v, CMD, flags, CMD_HLEN, pdo, plen);
        v.extend((0..64).map(|i| i as u8));
        header_digest(&mut v, 0, dg);
        v.extend_from_slice(data);
        if dd != 0 {
            data_digest(&mut v, &[data]);
        }
        v
    }

    #[test]
    fn command_capsules_with_and_without_digests() {
        for (h, d) in [(false, false), (true, false), (false, true), (true, true)] {
            let dg = Digests { header: h, data: d };
            for data in [&b""[..], &b"hello world"[..]] {
                let v = cmd_pdu(dg, data);
                let ch = v.first_chunk::<CH>().unwrap();
                assert_eq!(peek_len(ch, 8192).unwrap(), v.len());
                match parse(&v, dg, 8192).unwrap() {
                    Pdu::Cmd { sqe, data: got } => {
                        assert_eq!(sqe[5], 5);
                        assert_eq!(got, data);
                    }
                    p => panic!("{p:?}"),
                }
            }
        }
    }

    #[test]
    fn refusals() {
        let dg = Digests::default();
        let mut v = cmd_pdu(dg, b"abcd");
        // Digest flags that were not negotiated.
        assert_eq!(
            parse(
                &v,
                Digests {
                    header: true,
                    data: false
                },
                64
            )
            .unwrap_err()
            .fes,
            FES_INVALID_HEADER
        );
        // Header digest corrupted.
        let hd = Digests {
            header: true,
            data: true,
        };
        let mut w = cmd_pdu(hd, b"abcd");
        w[CMD_HLEN] ^= 1;
        assert_eq!(parse(&w, hd, 64).unwrap_err().fes, FES_HDGST);
        // Data offset past the end.
        v[3] = 250;
        assert_eq!(parse(&v, dg, 64).unwrap_err().fei, 3);
        // Wrong header length, unknown type, controller-only type.
        let mut x = cmd_pdu(dg, b"");
        x[2] = 71;
        assert!(parse(&x, dg, 64).is_err());
        for ty in [0x08, RSP, C2H_DATA, 0xff] {
            let mut y = cmd_pdu(dg, b"");
            y[0] = ty;
            assert_eq!(parse(&y, dg, 64).unwrap_err().fes, FES_INVALID_HEADER);
        }
        // Too much data for the limit.
        let big = cmd_pdu(dg, &[0u8; 100]);
        assert_eq!(parse(&big, dg, 64).unwrap_err().fes, FES_LIMIT);
        // Truncated.
        let t = cmd_pdu(dg, b"abcd");
        assert!(parse(&t[..t.len() - 1], dg, 64).is_err());
    }

    #[test]
    fn encoders() {
        let dg = Digests {
            header: true,
            data: true,
        };
        let mut v = Vec::new();
        c2h_data_header(&mut v, 7, 4096, 5, true, dg, 0);
        assert_eq!(v.len(), DATA_HLEN + 4);
        v.extend_from_slice(b"hello");
        data_digest(&mut v, &[b"hel", b"lo"]);
        assert_eq!(le32(&v, 4) as usize, v.len());
        assert_eq!(le32(&v, DATA_HLEN), crc32c(&v[..DATA_HLEN]));
        assert_eq!(le32(&v, v.len() - 4), crc32c(b"hello"));
        let mut a = Vec::new();
        c2h_data_header(&mut a, 1, 0, 0, true, Digests::default(), 7); // 32-byte alignment
        assert_eq!(a[3], 32);
        let mut r = Vec::new();
        icresp(&mut r, dg, 1 << 17);
        assert_eq!((r.len(), r[11], le32(&r, 12)), (128, 3, 1 << 17));
    }
}
