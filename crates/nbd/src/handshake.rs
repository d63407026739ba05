//! Fixed newstyle negotiation as a state machine with no I/O of its own ([`Negotiator`]):
//! the listener's event loop feeds it exactly the bytes it asks for ([`Negotiator::need`])
//! from a non-blocking socket or TLS stream, and sends what it produces. The fuzz harness
//! and the tests feed it from byte slices.
//!
//! It never reads ahead: whatever the client sends after the option that ends the
//! negotiation (a TLS ClientHello after `NBD_OPT_STARTTLS`, requests after `NBD_OPT_GO`)
//! stays in the socket (or in the TLS stream's buffer) for the next stage.
//!
//! Supported: `NBD_OPT_GO` and `NBD_OPT_INFO` (with `NBD_INFO_EXPORT`, `NAME`,
//! `DESCRIPTION` and `BLOCK_SIZE`), `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`,
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_ABORT`, `NBD_OPT_STARTTLS` (when the listener has
//! TLS: FORCEDTLS mode, every other option before it gets `NBD_REP_ERR_TLS_REQD`); meta
//! contexts are answered with none (no `base:allocation` yet); anything else gets an error
//! reply and the negotiation goes on. A malformed option ends the connection.

use std::io;
use std::sync::Arc;

use crate::proto::*;
use crate::Export;

/// What the negotiation agreed on.
pub struct Negotiated {
    pub export: Arc<Export>,
    /// Structured replies are on.
    pub structured: bool,
}

/// What a listener imposes on its negotiations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// FORCEDTLS: nothing but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` before TLS.
    pub tls: bool,
    /// The largest read or write the listener admits (what fits one connection's memory
    /// budget; at most [`MAX_IO`]).
    pub max_io: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            tls: false,
            max_io: MAX_IO,
        }
    }
}

/// How many options a client may send before it must pick an export.
const MAX_OPTIONS: usize = 256;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
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

/// (minimum, preferred, maximum) block sizes of an export under a listener's `max_io`.
pub fn block_sizes(e: &Export, max_io: u32) -> (u32, u32, u32) {
    let info = e.dev.info();
    let bs = info.block_size;
    (
        bs,
        bs.max(4096),
        max_io.min(MAX_IO).min(info.max_transfer.max(bs)).max(bs),
    )
}

fn info_export(e: &Export, structured: bool) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.dev.capacity_bytes().to_be_bytes());
    d.extend_from_slice(&transmission_flags(e, structured).to_be_bytes());
    d
}

/// What the caller does next, after [`Negotiator::input`].
pub enum Event {
    /// Send the output, then feed `need()` more bytes.
    Continue,
    /// Send the output (the `NBD_REP_ACK` of `NBD_OPT_STARTTLS`), run the TLS handshake,
    /// call [`Negotiator::tls_started`], and go on inside TLS.
    StartTls,
    /// Send the output, then enter the transmission phase.
    Done(Negotiated),
    /// Send the output (if any), then close: the client ended the negotiation (abort, an
    /// unknown name or no TLS with `NBD_OPT_EXPORT_NAME`, which has no error reply).
    Ended,
}

enum State {
    Flags,
    Header,
    Data { opt: u32, len: usize },
    Over,
}

/// One connection's negotiation.
pub struct Negotiator {
    policy: Policy,
    state: State,
    no_zeroes: bool,
    structured: bool,
    tls_active: bool,
    options: usize,
    out: Vec<u8>,
}

impl Negotiator {
    /// A new negotiation; its output starts with the server's greeting.
    pub fn new(policy: Policy) -> Negotiator {
        Negotiator {
            policy,
            state: State::Flags,
            no_zeroes: false,
            structured: false,
            tls_active: false,
            options: 0,
            out: greeting().to_vec(),
        }
    }

    /// Bytes the next [`Negotiator::input`] takes, exactly (0 for an option without data,
    /// which is still fed, as an empty slice).
    pub fn need(&self) -> usize {
        match self.state {
            State::Flags => 4,
            State::Header => 16,
            State::Data { len, .. } => len,
            State::Over => 0,
        }
    }

    /// Bytes to send.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// The output went out.
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// TLS is up: the negotiation goes on inside it, forgetting what was agreed before
    /// (the protocol's rule; in FORCEDTLS mode nothing was).
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.structured = false;
    }

    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Feed exactly `need()` bytes. An error ends the connection (a malformed option, too
    /// many options, unknown client flags).
    pub fn input(
        &mut self,
        data: &[u8],
        find: &dyn Fn(&str) -> Option<Arc<Export>>,
        list: &dyn Fn() -> Vec<Arc<Export>>,
    ) -> io::Result<Event> {
        if data.len() != self.need() {
            return Err(bad("negotiation fed the wrong number of bytes"));
        }
        match self.state {
            State::Over => Err(bad("the negotiation is over")),
            State::Flags => {
                let cflags = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                if cflags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    return Err(bad("the client does not speak fixed newstyle negotiation"));
                }
                if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(bad("unknown client flags"));
                }
                self.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
                self.state = State::Header;
                Ok(Event::Continue)
            }
            State::Header => {
                let mut magic = [0u8; 8];
                magic.copy_from_slice(&data[..8]);
                if u64::from_be_bytes(magic) != IHAVEOPT {
                    return Err(bad("option without IHAVEOPT"));
                }
                self.options += 1;
                if self.options > MAX_OPTIONS {
                    return Err(bad("too many options"));
                }
                let opt = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
                let len = u32::from_be_bytes([data[12], data[13], data[14], data[15]]) as usize;
                if len > MAX_OPTION {
                    return Err(bad("option too long"));
                }
                self.state = State::Data { opt, len };
                Ok(Event::Continue)
            }
            State::Data { opt, len } => {
                self.state = State::Header;
                let ev = self.option(opt, len, data, find, list);
                if !matches!(ev, Event::Continue | Event::StartTls) {
                    self.state = State::Over;
                }
                Ok(ev)
            }
        }
    }

    fn err(&mut self, opt: u32, kind: u32, msg: &str) -> Event {
        option_reply(&mut self.out, opt, kind, msg.as_bytes());
        Event::Continue
    }

    fn option(
        &mut self,
        opt: u32,
        len: usize,
        data: &[u8],
        find: &dyn Fn(&str) -> Option<Arc<Export>>,
        list: &dyn Fn() -> Vec<Arc<Export>>,
    ) -> Event {
        let tls_missing = self.policy.tls && !self.tls_active;
        match opt {
            OPT_ABORT => {
                option_reply(&mut self.out, opt, REP_ACK, &[]);
                Event::Ended
            }
            OPT_STARTTLS if !self.policy.tls => self.err(
                opt,
                REP_ERR_POLICY,
                "TLS is not configured for this address (nvmux gives TLS to the exports created with tls settings)",
            ),
            OPT_STARTTLS if self.tls_active => {
                self.err(opt, REP_ERR_INVALID, "TLS is already negotiated")
            }
            OPT_STARTTLS if len != 0 => self.err(opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"),
            OPT_STARTTLS => {
                option_reply(&mut self.out, opt, REP_ACK, &[]);
                Event::StartTls
            }
            // No error reply exists for EXPORT_NAME: without TLS the session ends.
            OPT_EXPORT_NAME if tls_missing => Event::Ended,
            _ if tls_missing => self.err(
                opt,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            ),
            OPT_EXPORT_NAME => {
                let Some(e) = std::str::from_utf8(data)
                    .ok()
                    .and_then(|n| lookup(find, list, n))
                else {
                    return Event::Ended;
                };
                self.out
                    .extend_from_slice(&e.dev.capacity_bytes().to_be_bytes());
                self.out
                    .extend_from_slice(&transmission_flags(&e, self.structured).to_be_bytes());
                if !self.no_zeroes {
                    self.out.extend_from_slice(&[0u8; 124]);
                }
                Event::Done(Negotiated {
                    export: e,
                    structured: self.structured,
                })
            }
            OPT_LIST if len != 0 => self.err(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
            OPT_LIST => {
                for e in list() {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    option_reply(&mut self.out, opt, REP_SERVER, &d);
                }
                option_reply(&mut self.out, opt, REP_ACK, &[]);
                Event::Continue
            }
            OPT_STRUCTURED_REPLY if len != 0 => self.err(opt, REP_ERR_INVALID, "takes no data"),
            OPT_STRUCTURED_REPLY if self.structured => {
                self.err(opt, REP_ERR_INVALID, "already negotiated")
            }
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                option_reply(&mut self.out, opt, REP_ACK, &[]);
                Event::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                // Validate the framing, answer with no contexts (none are supported).
                if meta_query_ok(data) {
                    option_reply(&mut self.out, opt, REP_ACK, &[]);
                    Event::Continue
                } else {
                    self.err(opt, REP_ERR_INVALID, "malformed meta context query")
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(data) {
                None => self.err(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data"),
                Some((name, infos)) => match lookup(find, list, &name) {
                    None => self.err(opt, REP_ERR_UNKNOWN, &format!("there is no export {name:?}")),
                    Some(e) => {
                        let out = &mut self.out;
                        option_reply(out, opt, REP_INFO, &info_export(&e, self.structured));
                        if infos.contains(&INFO_NAME) {
                            let mut d = INFO_NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(e.name.as_bytes());
                            option_reply(out, opt, REP_INFO, &d);
                        }
                        if infos.contains(&INFO_DESCRIPTION) {
                            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                            d.extend_from_slice(e.description.as_bytes());
                            option_reply(out, opt, REP_INFO, &d);
                        }
                        let (min, pref, max) = block_sizes(&e, self.policy.max_io);
                        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [min, pref, max] {
                            d.extend_from_slice(&v.to_be_bytes());
                        }
                        option_reply(out, opt, REP_INFO, &d);
                        option_reply(out, opt, REP_ACK, &[]);
                        if opt == OPT_GO {
                            Event::Done(Negotiated {
                                export: e,
                                structured: self.structured,
                            })
                        } else {
                            Event::Continue
                        }
                    }
                },
            },
            _ => self.err(opt, REP_ERR_UNSUP, "option not supported"),
        }
    }
}

/// Run a whole negotiation on a blocking stream (tests, fuzzing): `Ok(None)` when the
/// client ended it. `start_tls` is called after the ACK of `NBD_OPT_STARTTLS` has been
/// written; it returns `false` to end the connection.
pub fn negotiate_blocking<S: io::Read + io::Write>(
    s: &mut S,
    policy: Policy,
    find: &dyn Fn(&str) -> Option<Arc<Export>>,
    list: &dyn Fn() -> Vec<Arc<Export>>,
    start_tls: &mut dyn FnMut(&mut S) -> bool,
) -> io::Result<Option<Negotiated>> {
    let mut n = Negotiator::new(policy);
    let mut buf = Vec::new();
    loop {
        s.write_all(n.output())?;
        n.clear_output();
        buf.resize(n.need(), 0);
        s.read_exact(&mut buf)?;
        match n.input(&buf, find, list)? {
            Event::Continue => {}
            Event::StartTls => {
                s.write_all(n.output())?;
                n.clear_output();
                if !start_tls(s) {
                    return Ok(None);
                }
                n.tls_started();
            }
            Event::Done(d) => {
                s.write_all(n.output())?;
                return Ok(Some(d));
            }
            Event::Ended => {
                let _ = s.write_all(n.output());
                return Ok(None);
            }
        }
    }
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
    let rest = d.get(4 + nl..)?;
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
        match o.checked_add(4).and_then(|v| v.checked_add(ql)) {
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

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Feed `input` unit by unit; the option reply types seen, and the last event.
    fn drive(policy: Policy, input: &[u8]) -> (Vec<u32>, &'static str) {
        let none = |_: &str| None;
        let empty = Vec::new;
        let mut n = Negotiator::new(policy);
        assert_eq!(n.output(), &greeting()[..]);
        n.clear_output();
        let mut rest = input;
        let mut kinds = Vec::new();
        let mut last = "eof";
        while rest.len() >= n.need() {
            let (a, b) = rest.split_at(n.need());
            rest = b;
            let ev = match n.input(a, &none, &empty) {
                Ok(ev) => ev,
                Err(_) => return (kinds, "error"),
            };
            let out = n.output().to_vec();
            n.clear_output();
            let mut o = 0;
            while o + 20 <= out.len() {
                kinds.push(u32::from_be_bytes(out[o + 12..o + 16].try_into().unwrap()));
                o += 20 + u32::from_be_bytes(out[o + 16..o + 20].try_into().unwrap()) as usize;
            }
            match ev {
                Event::Continue => {}
                Event::StartTls => {
                    n.tls_started();
                    last = "tls";
                }
                Event::Done(_) => return (kinds, "done"),
                Event::Ended => return (kinds, "ended"),
            }
        }
        (kinds, last)
    }

    #[test]
    fn forced_tls_refuses_everything_before_starttls() {
        let tls = Policy {
            tls: true,
            max_io: MAX_IO,
        };
        let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
        let mut v = flags.to_vec();
        v.extend(opt(OPT_LIST, &[]));
        v.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        v.extend(opt(OPT_STARTTLS, &[1]));
        v.extend(opt(OPT_STARTTLS, &[]));
        v.extend(opt(OPT_STARTTLS, &[]));
        v.extend(opt(OPT_LIST, &[]));
        let (k, last) = drive(tls, &v);
        assert_eq!(
            k,
            vec![
                REP_ERR_TLS_REQD,
                REP_ERR_TLS_REQD,
                REP_ERR_INVALID,
                REP_ACK,
                REP_ERR_INVALID,
                REP_ACK
            ]
        );
        assert_eq!(last, "tls");
        // EXPORT_NAME before TLS ends the session; ABORT is answered.
        let mut v = flags.to_vec();
        v.extend(opt(OPT_EXPORT_NAME, b"disk"));
        assert_eq!(drive(tls, &v).1, "ended");
        let mut v = flags.to_vec();
        v.extend(opt(OPT_ABORT, &[]));
        assert_eq!(drive(tls, &v), (vec![REP_ACK], "ended"));
        // Without TLS configured, STARTTLS is a policy error and nothing needs TLS.
        let mut v = flags.to_vec();
        v.extend(opt(OPT_STARTTLS, &[]));
        v.extend(opt(OPT_LIST, &[]));
        assert_eq!(
            drive(Policy::default(), &v).0,
            vec![REP_ERR_POLICY, REP_ACK]
        );
        // Too many options end the connection.
        let mut v = flags.to_vec();
        for _ in 0..=MAX_OPTIONS {
            v.extend(opt(999, &[]));
        }
        assert_eq!(drive(tls, &v).1, "error");
    }
}
