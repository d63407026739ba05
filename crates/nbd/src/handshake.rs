//! Fixed newstyle negotiation, on any `Read + Write` stream (a socket with a timeout in
//! the daemon, a byte vector in the fuzz harness and the tests).
//!
//! Supported: `NBD_OPT_GO` and `NBD_OPT_INFO` (with `NBD_INFO_EXPORT`, `NAME`,
//! `DESCRIPTION` and `BLOCK_SIZE`), `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_ABORT`; meta contexts are answered with none
//! (no `base:allocation` yet); `NBD_OPT_STARTTLS` and anything else get an error reply
//! and the negotiation goes on. A malformed option ends the connection.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::proto::*;
use crate::Export;

/// What the negotiation agreed on.
pub struct Negotiated {
    pub export: Arc<Export>,
    /// Structured replies are on.
    pub structured: bool,
}

/// How many options a client may send before it must pick an export.
const MAX_OPTIONS: usize = 256;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn read_exact(s: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// The transmission flags of an export.
pub fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let info = e.dev.info();
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
    if structured {
        f |= TF_SEND_DF;
    }
    if e.read_only() {
        f |= TF_READ_ONLY;
    } else {
        if info.discard {
            f |= TF_SEND_TRIM;
        }
        if info.write_zeroes {
            f |= TF_SEND_WRITE_ZEROES;
        }
    }
    f
}

/// (minimum, preferred, maximum) block sizes of an export.
pub fn block_sizes(e: &Export) -> (u32, u32, u32) {
    let info = e.dev.info();
    let bs = info.block_size;
    (bs, bs.max(4096), MAX_IO.min(info.max_transfer.max(bs)))
}

fn info_export(e: &Export, structured: bool) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.dev.capacity_bytes().to_be_bytes());
    d.extend_from_slice(&transmission_flags(e, structured).to_be_bytes());
    d
}

/// Run the negotiation. `Ok(None)`: the client ended it (abort, or a name that does not
/// exist with `NBD_OPT_EXPORT_NAME`, which has no error reply).
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    find: &dyn Fn(&str) -> Option<Arc<Export>>,
    list: &dyn Fn() -> Vec<Arc<Export>>,
) -> io::Result<Option<Negotiated>> {
    s.write_all(&greeting())?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(bad("the client does not speak fixed newstyle negotiation"));
    }
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(bad("unknown client flags"));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut out = Vec::with_capacity(256);
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        if u64::from_be_bytes(h[..8].try_into().unwrap_or([0; 8])) != IHAVEOPT {
            return Err(bad("option without IHAVEOPT"));
        }
        let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
        if len > MAX_OPTION {
            return Err(bad("option too long"));
        }
        let data = read_exact(s, len)?;
        out.clear();
        let err =
            |out: &mut Vec<u8>, kind: u32, msg: &str| option_reply(out, opt, kind, msg.as_bytes());
        match opt {
            OPT_EXPORT_NAME => {
                let Some(e) = std::str::from_utf8(&data).ok().and_then(|n| lookup(find, list, n)) else {
                    return Ok(None);
                };
                out.extend_from_slice(&e.dev.capacity_bytes().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&e, structured).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out)?;
                return Ok(Some(Negotiated { export: e, structured }));
            }
            OPT_ABORT => {
                option_reply(&mut out, opt, REP_ACK, &[]);
                let _ = s.write_all(&out);
                return Ok(None);
            }
            OPT_LIST if len != 0 => err(&mut out, REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
            OPT_LIST => {
                for e in list() {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(&mut out, opt, REP_SERVER, &d);
                }
                option_reply(&mut out, opt, REP_ACK, &[]);
            }
            OPT_STARTTLS => err(
                &mut out,
                REP_ERR_POLICY,
                "TLS is not supported: nvmux serves NBD on Unix sockets and loopback addresses only",
            ),
            OPT_STRUCTURED_REPLY if len != 0 => err(&mut out, REP_ERR_INVALID, "takes no data"),
            OPT_STRUCTURED_REPLY if structured => err(&mut out, REP_ERR_INVALID, "already negotiated"),
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(&mut out, opt, REP_ACK, &[]);
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                // Validate the framing, answer with no contexts (none are supported).
                if meta_query_ok(&data) {
                    option_reply(&mut out, opt, REP_ACK, &[]);
                } else {
                    err(&mut out, REP_ERR_INVALID, "malformed meta context query");
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => err(&mut out, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data"),
                Some((name, infos)) => match lookup(find, list, &name) {
                    None => err(&mut out, REP_ERR_UNKNOWN, &format!("there is no export {name:?}")),
                    Some(e) => {
                        option_reply(&mut out, opt, REP_INFO, &info_export(&e, structured));
                        if infos.contains(&INFO_NAME) {
                            let mut d = INFO_NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(e.name.as_bytes());
                            option_reply(&mut out, opt, REP_INFO, &d);
                        }
                        if infos.contains(&INFO_DESCRIPTION) {
                            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                            d.extend_from_slice(e.description.as_bytes());
                            option_reply(&mut out, opt, REP_INFO, &d);
                        }
                        let (min, pref, max) = block_sizes(&e);
                        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [min, pref, max] {
                            d.extend_from_slice(&v.to_be_bytes());
                        }
                        option_reply(&mut out, opt, REP_INFO, &d);
                        option_reply(&mut out, opt, REP_ACK, &[]);
                        s.write_all(&out)?;
                        if opt == OPT_GO {
                            return Ok(Some(Negotiated { export: e, structured }));
                        }
                        continue;
                    }
                },
            },
            _ => err(&mut out, REP_ERR_UNSUP, "option not supported"),
        }
        s.write_all(&out)?;
    }
    Err(bad("too many options"))
}

/// An export by name; the empty name is the default export when there is only one.
fn lookup(
    find: &dyn Fn(&str) -> Option<Arc<Export>>,
    list: &dyn Fn() -> Vec<Arc<Export>>,
    name: &str,
) -> Option<Arc<Export>> {
    if name.is_empty() {
        let all = list();
        return if all.len() == 1 {
            all.into_iter().next()
        } else {
            None
        };
    }
    find(name)
}

/// `u32 name length, name, u16 count, count × u16 info types`, exactly.
pub fn parse_info_request(d: &[u8]) -> Option<(String, Vec<u16>)> {
    let nl = u32::from_be_bytes(d.get(..4)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(d.get(4..4usize.checked_add(nl)?)?)
        .ok()?
        .to_string();
    let rest = &d[4 + nl..];
    let n = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let infos = rest.get(2..)?;
    if infos.len() != n * 2 {
        return None;
    }
    Some((
        name,
        infos
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// `u32 export name length, name, u32 query count, each u32 length + query`, exactly.
fn meta_query_ok(d: &[u8]) -> bool {
    let be32 = |o: usize| -> Option<usize> {
        Some(u32::from_be_bytes(d.get(o..o.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let Some(nl) = be32(0) else { return false };
    let Some(mut o) = 4usize.checked_add(nl) else {
        return false;
    };
    let Some(count) = be32(o) else { return false };
    o += 4;
    for _ in 0..count {
        let Some(ql) = be32(o) else { return false };
        match o.checked_add(4 + ql) {
            Some(n) if n <= d.len() => o = n,
            _ => return false,
        }
    }
    o == d.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_framing() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vm1");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("vm1".into(), vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        assert_eq!(parse_info_request(&[0xff; 4]), None);
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert!(meta_query_ok(&m));
        assert!(!meta_query_ok(&m[..m.len() - 1]));
    }
}
