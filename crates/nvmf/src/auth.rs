//! DH-HMAC-CHAP in-band authentication (NVMe Base Specification 2.0, section 8.13.5;
//! TP 8006), the controller's side, free of transport code. A transport hands in the
//! data of each AUTH_Send command ([`Dhchap::send`]) and gets the data of each
//! AUTH_Receive ([`Dhchap::receive`]).
//!
//! ```text
//!  host                                              controller (Dhchap, one per queue)
//!  AUTH_Send    Negotiate (hashes, DH groups)     ─► pick a hash and a group from the policy;
//!                                                    C1, S1, private x, public g^x
//!  AUTH_Receive                                   ◄─ Challenge (hash, group, C1, S1, g^x)
//!  AUTH_Send    Reply (R1, [C2, S2], g^y)         ─► ks = (g^y)^x; R1 checked (constant time)
//!  AUTH_Receive                                   ◄─ Success1 ([R2]) or Failure1 (then close)
//!  AUTH_Send    Success2 (bidirectional only)     ─► authenticated
//!
//!  R1 = HMAC(Kh, C1' | S1 | T_ID | 00h | "HostHost"   | NQNh | 00h | NQNc)
//!  R2 = HMAC(Kc, C2' | S2 | T_ID | 00h | "Controller" | NQNc | 00h | NQNh)
//!  C' = C without a DH group, else HMAC(H(ks), C); S and T_ID little endian
//!  Kh = the host's secret, Kc = the controller's secret, each transformed when its DHHC-1
//!       header says so: HMAC(secret, NQN | "NVMe-over-Fabrics") with NQNh for Kh, NQNc for Kc
//! ```
//!
//! Everything the host sends is parsed with explicit length checks; messages are at most
//! [`MAX_SEND`] bytes (the transport refuses more before reading them). The modular
//! exponentiations of the FFDHE groups (RFC 7919) cost up to tens of milliseconds, so a
//! transport runs [`Dhchap::send`] off its data-path thread.

use std::sync::Arc;

use openssl::bn::{BigNum, BigNumContext, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;

/// Security protocol of DH-HMAC-CHAP (SECP of AUTH_Send/AUTH_Receive).
pub const SECP: u8 = 0xe9;
/// SPSP0 and SPSP1 of DH-HMAC-CHAP.
pub const SPSP: u8 = 0x01;
/// Largest AUTH_Send transfer accepted (a Reply with SHA-512 values and an ffdhe8192 value
/// is 1168 bytes).
pub const MAX_SEND: usize = 4096;
/// Largest AUTH_Receive transfer served (a Challenge with ffdhe8192 is 1104 bytes; Linux
/// asks for 4096).
pub const MAX_RECEIVE: usize = 4096;

const COMMON: u8 = 0x00;
const DHCHAP: u8 = 0x01;
const NEGOTIATE: u8 = 0x00;
const CHALLENGE: u8 = 0x01;
const REPLY: u8 = 0x02;
const SUCCESS1: u8 = 0x03;
const SUCCESS2: u8 = 0x04;
const FAILURE2: u8 = 0xf0;
const FAILURE1: u8 = 0xf1;
/// Protocol identifier of DH-HMAC-CHAP in a Negotiate descriptor.
const AUTHID_DHCHAP: u8 = 0x01;
/// Negotiate messages one queue may send before it authenticates: each makes the
/// controller compute a DH key pair, so a host must not ask for them without end.
pub const MAX_NEGOTIATIONS: u32 = 4;

/// Failure reason code explanations (Failure1 / Failure2 messages).
pub mod reason {
    pub const FAILED: u8 = 0x01;
    pub const NOT_USABLE: u8 = 0x02;
    pub const CONCAT_MISMATCH: u8 = 0x03;
    pub const HASH_UNUSABLE: u8 = 0x04;
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    pub const INCORRECT_MESSAGE: u8 = 0x07;

    pub fn name(r: u8) -> &'static str {
        match r {
            FAILED => "authentication failed",
            NOT_USABLE => "authentication protocol not usable",
            CONCAT_MISMATCH => "secure channel concatenation mismatch",
            HASH_UNUSABLE => "hash function not usable",
            DHGROUP_UNUSABLE => "DH group not usable",
            INCORRECT_PAYLOAD => "incorrect payload",
            INCORRECT_MESSAGE => "incorrect protocol message",
            _ => "unknown reason",
        }
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Bytes that are zeroed when dropped (secrets, session keys).
#[derive(Default)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    pub fn new(v: Vec<u8>) -> SecretBytes {
        SecretBytes(v)
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own vector; the
            // volatile write keeps the compiler from dropping the store as dead.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes({} bytes)", self.0.len())
    }
}

/// Hash functions of DH-HMAC-CHAP (identifiers of the Negotiate and Challenge messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashFn {
    Sha256 = 1,
    Sha384 = 2,
    Sha512 = 3,
}

impl HashFn {
    pub const ALL: [HashFn; 3] = [HashFn::Sha256, HashFn::Sha384, HashFn::Sha512];
    pub fn from_id(id: u8) -> Option<HashFn> {
        Some(match id {
            1 => HashFn::Sha256,
            2 => HashFn::Sha384,
            3 => HashFn::Sha512,
            _ => return None,
        })
    }
    pub fn id(self) -> u8 {
        self as u8
    }
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashFn::Sha256 => 32,
            HashFn::Sha384 => 48,
            HashFn::Sha512 => 64,
        }
    }
    fn md(self) -> MessageDigest {
        match self {
            HashFn::Sha256 => MessageDigest::sha256(),
            HashFn::Sha384 => MessageDigest::sha384(),
            HashFn::Sha512 => MessageDigest::sha512(),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            HashFn::Sha256 => "sha256",
            HashFn::Sha384 => "sha384",
            HashFn::Sha512 => "sha512",
        }
    }
    pub fn parse(s: &str) -> Option<HashFn> {
        HashFn::ALL
            .into_iter()
            .find(|h| h.name() == s || format!("hmac({})", h.name()) == s)
    }
}

/// Diffie-Hellman groups of DH-HMAC-CHAP: none, or the RFC 7919 finite-field groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DhGroup {
    Null = 0,
    Ffdhe2048 = 1,
    Ffdhe3072 = 2,
    Ffdhe4096 = 3,
    Ffdhe6144 = 4,
    Ffdhe8192 = 5,
}

impl DhGroup {
    pub const ALL: [DhGroup; 6] = [
        DhGroup::Null,
        DhGroup::Ffdhe2048,
        DhGroup::Ffdhe3072,
        DhGroup::Ffdhe4096,
        DhGroup::Ffdhe6144,
        DhGroup::Ffdhe8192,
    ];
    pub fn from_id(id: u8) -> Option<DhGroup> {
        DhGroup::ALL.into_iter().find(|g| *g as u8 == id)
    }
    pub fn id(self) -> u8 {
        self as u8
    }
    pub fn name(self) -> &'static str {
        match self {
            DhGroup::Null => "null",
            DhGroup::Ffdhe2048 => "ffdhe2048",
            DhGroup::Ffdhe3072 => "ffdhe3072",
            DhGroup::Ffdhe4096 => "ffdhe4096",
            DhGroup::Ffdhe6144 => "ffdhe6144",
            DhGroup::Ffdhe8192 => "ffdhe8192",
        }
    }
    pub fn parse(s: &str) -> Option<DhGroup> {
        DhGroup::ALL.into_iter().find(|g| g.name() == s)
    }
    /// Bytes of the group's modulus (and of every DH value on the wire); 0 for null.
    pub fn bytes(self) -> usize {
        match self {
            DhGroup::Null => 0,
            DhGroup::Ffdhe2048 => 256,
            DhGroup::Ffdhe3072 => 384,
            DhGroup::Ffdhe4096 => 512,
            DhGroup::Ffdhe6144 => 768,
            DhGroup::Ffdhe8192 => 1024,
        }
    }
    /// Private exponent size: RFC 7919 appendix A's short exponents (at least twice the
    /// group's estimated strength).
    fn exponent_bits(self) -> i32 {
        match self {
            DhGroup::Null => 0,
            DhGroup::Ffdhe2048 => 225,
            DhGroup::Ffdhe3072 => 275,
            DhGroup::Ffdhe4096 => 325,
            DhGroup::Ffdhe6144 => 375,
            DhGroup::Ffdhe8192 => 400,
        }
    }
    /// The group's prime (hexadecimal), as OpenSSL 3 knows it by name.
    fn prime_hex(self) -> Option<&'static str> {
        Some(match self {
            DhGroup::Null => return None,
            DhGroup::Ffdhe2048 => crate::ffdhe::FFDHE2048,
            DhGroup::Ffdhe3072 => crate::ffdhe::FFDHE3072,
            DhGroup::Ffdhe4096 => crate::ffdhe::FFDHE4096,
            DhGroup::Ffdhe6144 => crate::ffdhe::FFDHE6144,
            DhGroup::Ffdhe8192 => crate::ffdhe::FFDHE8192,
        })
    }
    /// The prime as a number (the generator of every RFC 7919 group is 2).
    pub fn prime(self) -> Option<BigNum> {
        BigNum::from_hex_str(self.prime_hex()?).ok()
    }
}

/// Which hash functions and DH groups a subsystem accepts, most preferred first. The
/// controller picks the first of each list that the host offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub hashes: Vec<HashFn>,
    pub dhgroups: Vec<DhGroup>,
}

impl Default for Policy {
    /// SHA-256 first (what every host offers; the negotiated hash only sizes the
    /// challenge and response), and ffdhe2048 first among the DH groups: the cheapest
    /// ephemeral exchange, with null kept last for hosts that offer no group.
    fn default() -> Self {
        Policy {
            hashes: vec![HashFn::Sha256, HashFn::Sha384, HashFn::Sha512],
            dhgroups: vec![
                DhGroup::Ffdhe2048,
                DhGroup::Ffdhe3072,
                DhGroup::Ffdhe4096,
                DhGroup::Ffdhe6144,
                DhGroup::Ffdhe8192,
                DhGroup::Null,
            ],
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it): the check value of a DHHC-1 secret.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c: u32 = !0;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let v = (c[0] as u32) << 16
            | (c.get(1).copied().unwrap_or(0) as u32) << 8
            | c.get(2).copied().unwrap_or(0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Strict base64 (standard alphabet, padded): `None` for anything else.
fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, q) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let mut v = 0u32;
        let mut pad = 0;
        for (j, &ch) in q.iter().enumerate() {
            let d = match ch {
                b'=' if last && j >= 2 => {
                    pad += 1;
                    0
                }
                _ if pad > 0 => return None,
                _ => B64.iter().position(|&x| x == ch)? as u32,
            };
            v = v << 6 | d;
        }
        let bytes = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// A DH-HMAC-CHAP secret in nvme-cli's `DHHC-1:<hh>:<base64(key | crc32)>:` form. `hh`
/// says how the key is transformed before use: 00 not at all, 01/02/03 with
/// HMAC-SHA-256/384/512 over the NQN and "NVMe-over-Fabrics" (section 8.13.5.7).
pub struct Secret {
    transform: u8,
    key: SecretBytes,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secret(DHHC-1:{:02}, {} bytes)",
            self.transform,
            self.key.len()
        )
    }
}

impl Secret {
    /// Parse and check a secret: the header, the transform, a 32-, 48- or 64-byte key and
    /// its CRC-32.
    pub fn parse(s: &str) -> Result<Secret, String> {
        let s = s.trim();
        let rest = s
            .strip_prefix("DHHC-1:")
            .ok_or("a DH-HMAC-CHAP secret starts with \"DHHC-1:\"")?;
        let (hh, rest) = rest
            .split_once(':')
            .ok_or("a DH-HMAC-CHAP secret is DHHC-1:<hh>:<base64>:")?;
        let transform = match hh {
            "00" => 0,
            "01" => 1,
            "02" => 2,
            "03" => 3,
            _ => {
                return Err(format!(
                "key transform {hh:?} is not 00 (none), 01 (SHA-256), 02 (SHA-384) or 03 (SHA-512)"
            ))
            }
        };
        let b64 = rest.strip_suffix(':').unwrap_or(rest);
        let raw = b64_decode(b64).ok_or("the key is not valid base64")?;
        let raw = SecretBytes::new(raw);
        let n = raw.len();
        if !matches!(n, 36 | 52 | 68) {
            return Err(format!(
                "the key is {} bytes; it must be 32, 48 or 64 (plus a 4-byte CRC)",
                n.saturating_sub(4)
            ));
        }
        let (key, crc) = raw.as_slice().split_at(n - 4);
        if crc32(key) != le32(crc, 0) {
            return Err("the key's CRC-32 does not match (mistyped or truncated secret?)".into());
        }
        Ok(Secret {
            transform,
            key: SecretBytes::new(key.to_vec()),
        })
    }

    /// A new random secret of `len` bytes (32, 48 or 64) with transform `transform` (0..=3).
    pub fn generate(transform: u8, len: usize) -> Result<Secret, String> {
        if transform > 3 || !matches!(len, 32 | 48 | 64) {
            return Err(format!(
                "cannot make a {len}-byte secret with transform {transform}: the length is 32, 48 or 64 and the transform 0 to 3"
            ));
        }
        let mut key = vec![0u8; len];
        openssl::rand::rand_bytes(&mut key).map_err(|e| format!("random bytes: {e}"))?;
        Ok(Secret {
            transform,
            key: SecretBytes::new(key),
        })
    }

    /// The `DHHC-1:` text form.
    pub fn encode(&self) -> String {
        let mut raw = self.key.as_slice().to_vec();
        raw.extend_from_slice(&crc32(self.key.as_slice()).to_le_bytes());
        let raw = SecretBytes::new(raw);
        format!(
            "DHHC-1:{:02}:{}:",
            self.transform,
            b64_encode(raw.as_slice())
        )
    }

    pub fn transform(&self) -> u8 {
        self.transform
    }

    pub fn key_len(&self) -> usize {
        self.key.len()
    }

    /// The key as the HMAC of a response uses it, for the entity named `nqn`.
    pub fn transformed(&self, nqn: &str) -> Result<SecretBytes, String> {
        match HashFn::from_id(self.transform) {
            None => Ok(SecretBytes::new(self.key.as_slice().to_vec())),
            Some(h) => hmac(
                h,
                self.key.as_slice(),
                &[nqn.as_bytes(), b"NVMe-over-Fabrics"],
            )
            .map(SecretBytes::new),
        }
    }
}

/// A host's secrets on a subsystem's allow-list.
#[derive(Debug)]
pub struct HostKeys {
    /// Authenticates the host to the controller.
    pub host: Secret,
    /// Authenticates the controller to the host (bidirectional), if set.
    pub ctrl: Option<Secret>,
}

fn hmac(h: HashFn, key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, String> {
    let run = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let k = PKey::hmac(key)?;
        let mut s = Signer::new(h.md(), &k)?;
        for p in parts {
            s.update(p)?;
        }
        s.sign_to_vec()
    };
    run().map_err(|e| format!("HMAC-{}: {e}", h.name()))
}

fn digest(h: HashFn, data: &[u8]) -> Result<Vec<u8>, String> {
    openssl::hash::hash(h.md(), data)
        .map(|d| d.to_vec())
        .map_err(|e| format!("{}: {e}", h.name()))
}

/// The response of one side (section 8.13.5.5): HMAC(key, C' | S | T_ID | 00h | who |
/// NQN1 | 00h | NQN2), with C' the challenge augmented by the session key when there is one.
#[allow(clippy::too_many_arguments)]
pub fn response(
    h: HashFn,
    key: &[u8],
    challenge: &[u8],
    session: Option<&[u8]>,
    seq: u32,
    tid: u16,
    who: &[u8],
    nqn1: &str,
    nqn2: &str,
) -> Result<Vec<u8>, String> {
    let aug;
    let c = match session {
        None => challenge,
        Some(ks) => {
            let hk = SecretBytes::new(digest(h, ks)?);
            aug = hmac(h, hk.as_slice(), &[challenge])?;
            &aug
        }
    };
    hmac(
        h,
        key,
        &[
            c,
            &seq.to_le_bytes(),
            &tid.to_le_bytes(),
            &[0],
            who,
            nqn1.as_bytes(),
            &[0],
            nqn2.as_bytes(),
        ],
    )
}

fn random_nonzero_u32() -> u32 {
    let mut b = [0u8; 4];
    loop {
        if openssl::rand::rand_bytes(&mut b).is_err() {
            // No randomness: a fixed, nonzero value still makes a valid (if predictable)
            // sequence number; the challenge below fails the exchange anyway.
            return 1;
        }
        let v = u32::from_le_bytes(b);
        if v != 0 {
            return v;
        }
    }
}

/// The controller's half of an ephemeral FFDHE exchange.
struct DhState {
    p: BigNum,
    x: BigNum,
    /// g^x mod p, padded to the modulus length.
    gx: Vec<u8>,
}

impl DhState {
    fn new(g: DhGroup) -> Result<DhState, String> {
        let e = |e: openssl::error::ErrorStack| format!("{}: {e}", g.name());
        let p = g.prime().ok_or("no prime for the DH group")?;
        let mut ctx = BigNumContext::new_secure().map_err(e)?;
        let mut x = BigNum::new_secure().map_err(e)?;
        // 2 <= x < 2^bits
        loop {
            x.rand(g.exponent_bits(), MsbOption::MAYBE_ZERO, false)
                .map_err(e)?;
            if x.num_bits() > 1 {
                break;
            }
        }
        x.set_const_time();
        let two = BigNum::from_u32(2).map_err(e)?;
        let mut gx = BigNum::new().map_err(e)?;
        gx.mod_exp(&two, &x, &p, &mut ctx).map_err(e)?;
        let gx = gx.to_vec_padded(g.bytes() as i32).map_err(e)?;
        Ok(DhState { p, x, gx })
    }

    /// The shared secret from the host's value, padded to the modulus length. The value
    /// must lie in 2..=p-2 (1 and p-1 would make the secret trivial).
    fn shared(&self, g: DhGroup, gy: &[u8]) -> Result<SecretBytes, u8> {
        let run = || -> Result<Option<Vec<u8>>, openssl::error::ErrorStack> {
            let y = BigNum::from_slice(gy)?;
            let mut pm1 = BigNum::new()?;
            let one = BigNum::from_u32(1)?;
            pm1.checked_sub(&self.p, &one)?;
            if y.num_bits() < 2 || y.ucmp(&pm1) != std::cmp::Ordering::Less {
                return Ok(None);
            }
            let mut ctx = BigNumContext::new_secure()?;
            let mut k = BigNum::new_secure()?;
            k.mod_exp(&y, &self.x, &self.p, &mut ctx)?;
            Ok(Some(k.to_vec_padded(g.bytes() as i32)?))
        };
        match run() {
            Ok(Some(k)) => Ok(SecretBytes::new(k)),
            Ok(None) => Err(reason::DHGROUP_UNUSABLE),
            Err(_) => Err(reason::FAILED),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Waiting for Negotiate.
    Negotiate,
    /// Negotiate accepted: the next AUTH_Receive gets the Challenge.
    Challenge,
    /// Waiting for Reply.
    Reply,
    /// Reply checked: the next AUTH_Receive gets Success1.
    Success1,
    /// Waiting for Success2 (bidirectional authentication).
    Success2,
    /// The next AUTH_Receive gets Failure1, then the connection ends.
    Failure1,
    /// Authenticated; a new Negotiate starts a re-authentication.
    Done,
}

/// What an AUTH_Send did.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Accepted (a failure, if any, is reported by the next AUTH_Receive).
    Ok,
    /// The host reported a failure (Failure2): the connection ends.
    HostFailed(u8),
}

/// One queue's DH-HMAC-CHAP state.
pub struct Dhchap {
    keys: Arc<HostKeys>,
    policy: Arc<Policy>,
    hostnqn: String,
    subnqn: String,
    step: Step,
    authenticated: bool,
    tid: u16,
    hash: HashFn,
    group: DhGroup,
    s1: u32,
    c1: Vec<u8>,
    s2: u32,
    c2: Option<Vec<u8>>,
    dh: Option<DhState>,
    session: Option<SecretBytes>,
    failure: u8,
    /// Why the exchange failed, for the log.
    why: Option<String>,
    /// Negotiate messages since the last success.
    negotiations: u32,
}

impl Dhchap {
    pub fn new(keys: Arc<HostKeys>, policy: Arc<Policy>, hostnqn: &str, subnqn: &str) -> Dhchap {
        Dhchap {
            keys,
            policy,
            hostnqn: hostnqn.into(),
            subnqn: subnqn.into(),
            step: Step::Negotiate,
            authenticated: false,
            tid: 0,
            hash: HashFn::Sha256,
            group: DhGroup::Null,
            s1: 0,
            c1: Vec::new(),
            s2: 0,
            c2: None,
            dh: None,
            session: None,
            failure: 0,
            why: None,
            negotiations: 0,
        }
    }

    /// The queue may carry other commands.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// What was negotiated (after a successful exchange): hash, DH group, bidirectional.
    pub fn negotiated(&self) -> (HashFn, DhGroup, bool) {
        (self.hash, self.group, self.s2 != 0)
    }

    /// Why the exchange failed (after a Failure1 was produced).
    pub fn why(&self) -> Option<&str> {
        self.why.as_deref()
    }

    fn fail(&mut self, reason: u8, why: impl Into<String>) {
        self.step = Step::Failure1;
        self.failure = reason;
        self.why = Some(why.into());
        self.authenticated = false;
        self.dh = None;
        self.session = None;
    }

    /// The data of an AUTH_Send (at most [`MAX_SEND`] bytes).
    pub fn send(&mut self, msg: &[u8]) -> Sent {
        if msg.len() < 8 {
            self.fail(reason::INCORRECT_PAYLOAD, "message shorter than its header");
            return Sent::Ok;
        }
        let (ty, id, tid) = (msg[0], msg[1], le16(msg, 4));
        match (ty, id) {
            (COMMON, NEGOTIATE) => {
                if self.step == Step::Failure1 {
                    return Sent::Ok; // a failed exchange ends with Failure1, not a restart
                }
                self.tid = tid;
                self.negotiations += 1;
                if self.negotiations > MAX_NEGOTIATIONS {
                    self.fail(
                        reason::INCORRECT_MESSAGE,
                        format!("more than {MAX_NEGOTIATIONS} Negotiate messages without success"),
                    );
                    return Sent::Ok;
                }
                self.negotiate(msg);
            }
            (COMMON, FAILURE2) => {
                let r = msg[7];
                self.why = Some(format!("the host reported: {}", reason::name(r)));
                self.authenticated = false;
                return Sent::HostFailed(r);
            }
            (DHCHAP, REPLY) if self.step == Step::Reply && tid == self.tid => self.reply(msg),
            (DHCHAP, SUCCESS2) if self.step == Step::Success2 && tid == self.tid => {
                self.authenticated = true;
                self.negotiations = 0;
                self.step = Step::Done;
                self.dh = None;
                self.session = None;
            }
            _ if self.step == Step::Failure1 => {}
            _ => self.fail(
                reason::INCORRECT_MESSAGE,
                format!("unexpected message {ty:#04x}/{id:#04x} (transaction {tid})"),
            ),
        }
        Sent::Ok
    }

    fn negotiate(&mut self, msg: &[u8]) {
        let (sc_c, napd) = (msg[6], msg[7] as usize);
        if sc_c != 0 {
            return self.fail(
                reason::CONCAT_MISMATCH,
                "the host asked for secure channel concatenation (TLS), which nvmux does not offer",
            );
        }
        if napd == 0 || msg.len() < 8 + 64 * napd {
            return self.fail(
                reason::INCORRECT_PAYLOAD,
                format!(
                    "Negotiate of {} bytes with {napd} protocol descriptors",
                    msg.len()
                ),
            );
        }
        let Some(d) = msg[8..8 + 64 * napd]
            .chunks_exact(64)
            .find(|d| d[0] == AUTHID_DHCHAP)
        else {
            return self.fail(
                reason::NOT_USABLE,
                "the host offers no DH-HMAC-CHAP descriptor",
            );
        };
        let (halen, dhlen) = (d[2] as usize, d[3] as usize);
        if halen > 30 || dhlen > 30 {
            return self.fail(reason::INCORRECT_PAYLOAD, "identifier list longer than 30");
        }
        let hashes = &d[4..4 + halen];
        let groups = &d[34..34 + dhlen];
        let Some(h) = self
            .policy
            .hashes
            .iter()
            .copied()
            .find(|h| hashes.contains(&h.id()))
        else {
            return self.fail(
                reason::HASH_UNUSABLE,
                format!("the host offers hash ids {hashes:?}, none of which this subsystem allows"),
            );
        };
        let Some(g) = self
            .policy
            .dhgroups
            .iter()
            .copied()
            .find(|g| groups.contains(&g.id()))
        else {
            return self.fail(
                reason::DHGROUP_UNUSABLE,
                format!(
                    "the host offers DH groups {groups:?}, none of which this subsystem allows"
                ),
            );
        };
        self.hash = h;
        self.group = g;
        self.s1 = random_nonzero_u32();
        let mut c1 = vec![0u8; h.digest_len()];
        if let Err(e) = openssl::rand::rand_bytes(&mut c1) {
            return self.fail(reason::FAILED, format!("random challenge: {e}"));
        }
        self.c1 = c1;
        self.s2 = 0;
        self.c2 = None;
        self.session = None;
        self.dh = None;
        if g != DhGroup::Null {
            match DhState::new(g) {
                Ok(d) => self.dh = Some(d),
                Err(e) => return self.fail(reason::FAILED, e),
            }
        }
        self.step = Step::Challenge;
    }

    fn reply(&mut self, msg: &[u8]) {
        if msg.len() < 16 {
            return self.fail(reason::INCORRECT_PAYLOAD, "Reply shorter than 16 bytes");
        }
        let hl = msg[6] as usize;
        let cvalid = msg[8] & 1 != 0;
        let dhvlen = le16(msg, 10) as usize;
        let seq = le32(msg, 12);
        if hl != self.hash.digest_len() {
            return self.fail(
                reason::HASH_UNUSABLE,
                format!(
                    "Reply with {hl}-byte values for {} ({} bytes)",
                    self.hash.name(),
                    self.hash.digest_len()
                ),
            );
        }
        if 16 + 2 * hl + dhvlen > msg.len() {
            return self.fail(
                reason::INCORRECT_PAYLOAD,
                "Reply values run past the message",
            );
        }
        let rval = &msg[16..16 + hl];
        let c2 = &msg[16 + hl..16 + 2 * hl];
        let dhv = &msg[16 + 2 * hl..16 + 2 * hl + dhvlen];
        match (&self.dh, dhvlen) {
            (None, 0) => {}
            (Some(d), n) if n > 0 && n <= self.group.bytes() => match d.shared(self.group, dhv) {
                Ok(k) => self.session = Some(k),
                Err(r) => return self.fail(r, "the host's DH value is outside 2..p-2"),
            },
            _ => {
                return self.fail(
                    reason::INCORRECT_PAYLOAD,
                    format!(
                        "Reply with a {dhvlen}-byte DH value for group {}",
                        self.group.name()
                    ),
                )
            }
        }
        let kh = match self.keys.host.transformed(&self.hostnqn) {
            Ok(k) => k,
            Err(e) => return self.fail(reason::FAILED, e),
        };
        let want = match response(
            self.hash,
            kh.as_slice(),
            &self.c1,
            self.session.as_ref().map(|s| s.as_slice()),
            self.s1,
            self.tid,
            b"HostHost",
            &self.hostnqn,
            &self.subnqn,
        ) {
            Ok(r) => r,
            Err(e) => return self.fail(reason::FAILED, e),
        };
        if !openssl::memcmp::eq(&want, rval) {
            return self.fail(
                reason::FAILED,
                "the host's response does not match its secret (wrong DH-HMAC-CHAP secret)",
            );
        }
        // A challenge with sequence number 0 only feeds a secure channel: no controller
        // authentication was asked for.
        self.s2 = if cvalid { seq } else { 0 };
        self.c2 = (cvalid && seq != 0).then(|| c2.to_vec());
        if self.c2.is_some() && self.keys.ctrl.is_none() {
            return self.fail(
                reason::FAILED,
                "the host asked for bidirectional authentication, but no controller secret is set for it",
            );
        }
        if self.c2.is_none() {
            self.s2 = 0;
        }
        self.step = Step::Success1;
    }

    /// The data of an AUTH_Receive into `out` (cleared first; at most the message). Returns
    /// `true` when the connection must end once this is sent (a Failure1).
    pub fn receive(&mut self, al: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        match self.step {
            Step::Challenge => {
                let dhv = self.dh.as_ref().map(|d| d.gx.as_slice()).unwrap_or(&[]);
                let size = 16 + self.hash.digest_len() + dhv.len();
                if al < size {
                    self.fail(
                        reason::INCORRECT_PAYLOAD,
                        format!("AUTH_Receive of {al} bytes for a {size}-byte Challenge"),
                    );
                    return self.failure1(out);
                }
                out.extend_from_slice(&[DHCHAP, CHALLENGE, 0, 0]);
                out.extend_from_slice(&self.tid.to_le_bytes());
                out.extend_from_slice(&[
                    self.hash.digest_len() as u8,
                    0,
                    self.hash.id(),
                    self.group.id(),
                ]);
                out.extend_from_slice(&(dhv.len() as u16).to_le_bytes());
                out.extend_from_slice(&self.s1.to_le_bytes());
                out.extend_from_slice(&self.c1);
                out.extend_from_slice(dhv);
                self.step = Step::Reply;
                false
            }
            Step::Success1 => {
                let r2 = match (&self.c2, &self.keys.ctrl) {
                    (Some(c2), Some(kc)) => {
                        let r = kc.transformed(&self.subnqn).and_then(|k| {
                            response(
                                self.hash,
                                k.as_slice(),
                                c2,
                                self.session.as_ref().map(|s| s.as_slice()),
                                self.s2,
                                self.tid,
                                b"Controller",
                                &self.subnqn,
                                &self.hostnqn,
                            )
                        });
                        match r {
                            Ok(r) => Some(r),
                            Err(e) => {
                                self.fail(reason::FAILED, e);
                                return self.failure1(out);
                            }
                        }
                    }
                    _ => None,
                };
                let size = 16 + r2.as_ref().map_or(0, |r| r.len());
                if al < size {
                    self.fail(
                        reason::INCORRECT_PAYLOAD,
                        format!("AUTH_Receive of {al} bytes for a {size}-byte Success1"),
                    );
                    return self.failure1(out);
                }
                out.extend_from_slice(&[DHCHAP, SUCCESS1, 0, 0]);
                out.extend_from_slice(&self.tid.to_le_bytes());
                out.extend_from_slice(&[self.hash.digest_len() as u8, 0, r2.is_some() as u8]);
                out.extend_from_slice(&[0; 7]);
                if let Some(r) = &r2 {
                    out.extend_from_slice(r);
                    self.step = Step::Success2;
                } else {
                    self.authenticated = true;
                    self.negotiations = 0;
                    self.step = Step::Done;
                    self.dh = None;
                    self.session = None;
                }
                false
            }
            Step::Failure1 => self.failure1(out),
            _ => {
                self.fail(
                    reason::INCORRECT_MESSAGE,
                    "AUTH_Receive when no message is due",
                );
                self.failure1(out)
            }
        }
    }

    fn failure1(&mut self, out: &mut Vec<u8>) -> bool {
        out.clear();
        out.extend_from_slice(&[COMMON, FAILURE1, 0, 0]);
        out.extend_from_slice(&self.tid.to_le_bytes());
        out.extend_from_slice(&[reason::FAILED, self.failure]);
        self.authenticated = false;
        true
    }
}

/// Check an AUTH_Send / AUTH_Receive command's fields (SECP, SPSP0, SPSP1 in bytes 41..44,
/// TL/AL in bytes 44..48) and return the transfer length, which must be 1..=`max`.
pub fn command_len(sqe: &[u8; 64], max: usize) -> Option<usize> {
    let (spsp0, spsp1, secp) = (sqe[41], sqe[42], sqe[43]);
    let len = le32(sqe, 44) as usize;
    (secp == SECP && spsp0 == SPSP && spsp1 == SPSP && len > 0 && len <= max).then_some(len)
}

#[cfg(test)]
mod tests;
