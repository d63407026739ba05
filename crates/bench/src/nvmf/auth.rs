//! The host side of DH-HMAC-CHAP (NVMe Base 2.0, 8.13.5), written from the specification
//! for this initiator, independently of the target's `nvmux_nvmf::auth`: its own secret
//! parsing (OpenSSL's base64), its own messages, the RFC 7919 groups from OpenSSL's PEM
//! parameters. It offers the null group and ffdhe2048/3072/4096.

use openssl::bn::{BigNum, BigNumContext, MsbOption};
use openssl::dh::Dh;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;

use super::{le16, le32, Queue, Res, Sqe};

/// What the host authenticates with.
#[derive(Clone, Debug)]
pub struct DhchapHost {
    /// The host's secret (`DHHC-1:..`).
    pub secret: String,
    /// The controller's secret: ask the controller to authenticate itself too.
    pub ctrl_secret: Option<String>,
    /// Hash ids offered (1 SHA-256, 2 SHA-384, 3 SHA-512).
    pub hashes: Vec<u8>,
    /// DH group ids offered (0 null, 1 ffdhe2048, 2 ffdhe3072, 3 ffdhe4096).
    pub dhgroups: Vec<u8>,
}

impl DhchapHost {
    pub fn new(secret: &str) -> DhchapHost {
        DhchapHost {
            secret: secret.into(),
            ctrl_secret: None,
            hashes: vec![1, 2, 3],
            dhgroups: vec![0, 1, 2, 3],
        }
    }
    pub fn bidirectional(mut self, ctrl_secret: &str) -> DhchapHost {
        self.ctrl_secret = Some(ctrl_secret.into());
        self
    }
}

/// What an exchange settled on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub hash: u8,
    pub dhgroup: u8,
    pub bidirectional: bool,
}

const FFDHE2048: &str = r"-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
";
const FFDHE3072: &str = r"-----BEGIN DH PARAMETERS-----
MIIBiAKCAYEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEfz9zeNVs7ZRkDW7w09N75nAI4YbRvydbmyQd62R0mkff3
7lmMsPrBhtkcrv4TCYUTknC0EwyTvEN5RPT9RFLi103TZPLiHnH1S/9croKrnJ32
nuhtK8UiNjoNq8Uhl5sN6todv5pC1cRITgq80Gv6U93vPBsg7j/VnXwl5B0rZsYu
N///////////AgEC
-----END DH PARAMETERS-----
";
const FFDHE4096: &str = r"-----BEGIN DH PARAMETERS-----
MIICCAKCAgEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEfz9zeNVs7ZRkDW7w09N75nAI4YbRvydbmyQd62R0mkff3
7lmMsPrBhtkcrv4TCYUTknC0EwyTvEN5RPT9RFLi103TZPLiHnH1S/9croKrnJ32
nuhtK8UiNjoNq8Uhl5sN6todv5pC1cRITgq80Gv6U93vPBsg7j/VnXwl5B0rZp4e
8W5vUsMWTfT7eTDp5OWIV7asfV9C1p9tGHdjzx1VA0AEh/VbpX4xzHpxNciG77Qx
iu1qHgEtnmgyqQdgCpGBMMRtx3j5ca0AOAkpmaMzy4t6Gh25PXFAADwqTs6p+Y0K
zAqCkc3OyX3Pjsm1Wn+IpGtNtahR9EGC4caKAH5eZV9q//////////8CAQI=
-----END DH PARAMETERS-----
";

fn md(id: u8) -> Res<MessageDigest> {
    Ok(match id {
        1 => MessageDigest::sha256(),
        2 => MessageDigest::sha384(),
        3 => MessageDigest::sha512(),
        _ => return Err(format!("hash id {id} is not one this host offered")),
    })
}

fn hmac(id: u8, key: &[u8], parts: &[&[u8]]) -> Res<Vec<u8>> {
    let e = |e: openssl::error::ErrorStack| format!("HMAC: {e}");
    let k = PKey::hmac(key).map_err(e)?;
    let mut s = Signer::new(md(id)?, &k).map_err(e)?;
    for p in parts {
        s.update(p).map_err(e)?;
    }
    s.sign_to_vec().map_err(e)
}

/// IEEE CRC-32 (zlib's), bitwise with the polynomial in normal form, reflected by hand.
fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        let mut b = byte;
        for _ in 0..8 {
            let mix = (crc ^ b as u32) & 1;
            crc >>= 1;
            if mix != 0 {
                crc ^= 0xedb8_8320;
            }
            b >>= 1;
        }
    }
    crc ^ 0xffff_ffff
}

/// `DHHC-1:hh:base64(key | crc32):` into (hh, key).
pub fn parse_secret(s: &str) -> Res<(u8, Vec<u8>)> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() < 3 || parts[0] != "DHHC-1" {
        return Err(format!("{s:?} is not a DHHC-1 secret"));
    }
    let hh: u8 = parts[1]
        .parse()
        .map_err(|_| format!("bad transform in {s:?}"))?;
    let raw = openssl::base64::decode_block(parts[2]).map_err(|e| format!("base64: {e}"))?;
    if !matches!(raw.len(), 36 | 52 | 68) {
        return Err(format!("{} key bytes", raw.len()));
    }
    let (key, crc) = raw.split_at(raw.len() - 4);
    if crc32_ieee(key) != le32(crc, 0) {
        return Err("secret CRC mismatch".into());
    }
    Ok((hh, key.to_vec()))
}

/// The key a response is computed with: transformed with the NQN when hh says so.
fn response_key(secret: &str, nqn: &str) -> Res<Vec<u8>> {
    let (hh, key) = parse_secret(secret)?;
    if hh == 0 {
        return Ok(key);
    }
    hmac(hh, &key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"])
}

fn group_prime(id: u8) -> Res<(BigNum, usize)> {
    let pem = match id {
        1 => FFDHE2048,
        2 => FFDHE3072,
        3 => FFDHE4096,
        _ => return Err(format!("DH group {id} is not one this host offered")),
    };
    let dh = Dh::params_from_pem(pem.as_bytes()).map_err(|e| format!("DH params: {e}"))?;
    let p = dh.prime_p().to_owned().map_err(|e| format!("{e}"))?;
    let n = p.num_bytes() as usize;
    Ok((p, n))
}

fn auth_sqe(fctype: u8, len: usize) -> Sqe {
    Sqe::fabrics(fctype)
        .set(41, &[1, 1, 0xe9])
        .set(44, &(len as u32).to_le_bytes())
}

/// What the controller sent back for an AUTH_Receive: the message, or why it refused.
fn receive(q: &mut Queue) -> Res<Vec<u8>> {
    let (c, d) = q.cmd(auth_sqe(0x06, 4096), None, 4096)?;
    if !c.ok() {
        return Err(format!("AUTH_Receive: status {:#x}", c.status));
    }
    if d.len() >= 8 && d[0] == 0 && d[1] == 0xf1 {
        return Err(format!(
            "controller sent Failure1 (reason {:#x}, explanation {:#x})",
            d[6], d[7]
        ));
    }
    Ok(d)
}

fn send(q: &mut Queue, msg: &[u8]) -> Res<()> {
    let (c, _) = q.cmd(auth_sqe(0x05, msg.len()), Some(msg), 0)?;
    if !c.ok() {
        return Err(format!("AUTH_Send: status {:#x}", c.status));
    }
    Ok(())
}

fn random(n: usize) -> Res<Vec<u8>> {
    let mut v = vec![0u8; n];
    openssl::rand::rand_bytes(&mut v).map_err(|e| format!("random: {e}"))?;
    Ok(v)
}

impl Queue {
    /// DH-HMAC-CHAP on this queue (after a Connect whose AUTHREQ asked for it).
    pub fn authenticate(&mut self, subnqn: &str, hostnqn: &str, a: &DhchapHost) -> Res<Negotiated> {
        let tid = self.next_tid();
        // Negotiate: one DH-HMAC-CHAP descriptor with our hashes and groups.
        let mut neg = vec![0u8; 72];
        neg[4..6].copy_from_slice(&tid.to_le_bytes());
        neg[7] = 1; // NAPD
        neg[8] = 1; // AUTHID: DH-HMAC-CHAP
        neg[10] = a.hashes.len() as u8;
        neg[11] = a.dhgroups.len() as u8;
        neg[12..12 + a.hashes.len()].copy_from_slice(&a.hashes);
        neg[42..42 + a.dhgroups.len()].copy_from_slice(&a.dhgroups);
        send(self, &neg)?;
        // Challenge.
        let ch = receive(self)?;
        if ch.len() < 16 || ch[0] != 1 || ch[1] != 1 || le16(&ch, 4) != tid {
            return Err(format!("not a Challenge: {:?}", &ch[..ch.len().min(16)]));
        }
        let (hl, hash, group) = (ch[6] as usize, ch[8], ch[9]);
        let dhvlen = le16(&ch, 10) as usize;
        let s1 = le32(&ch, 12);
        if 16 + hl + dhvlen > ch.len() || hl != md(hash)?.size() {
            return Err("Challenge lengths do not add up".into());
        }
        let c1 = &ch[16..16 + hl];
        let (ks, gy) = if group == 0 {
            if dhvlen != 0 {
                return Err("DH value with the null group".into());
            }
            (None, Vec::new())
        } else {
            let (p, n) = group_prime(group)?;
            if dhvlen != n {
                return Err(format!("{dhvlen}-byte DH value for a {n}-byte group"));
            }
            let e = |e: openssl::error::ErrorStack| format!("DH: {e}");
            let mut ctx = BigNumContext::new().map_err(e)?;
            let mut y = BigNum::new().map_err(e)?;
            y.rand(384, MsbOption::MAYBE_ZERO, false).map_err(e)?;
            let two = BigNum::from_u32(2).map_err(e)?;
            let mut gy = BigNum::new().map_err(e)?;
            gy.mod_exp(&two, &y, &p, &mut ctx).map_err(e)?;
            let gx = BigNum::from_slice(&ch[16 + hl..16 + hl + dhvlen]).map_err(e)?;
            let mut k = BigNum::new().map_err(e)?;
            k.mod_exp(&gx, &y, &p, &mut ctx).map_err(e)?;
            (
                Some(k.to_vec_padded(n as i32).map_err(e)?),
                gy.to_vec_padded(n as i32).map_err(e)?,
            )
        };
        // C' = HMAC(H(ks), C) with a DH group.
        let augment = |c: &[u8]| -> Res<Vec<u8>> {
            match &ks {
                None => Ok(c.to_vec()),
                Some(k) => {
                    let hk = openssl::hash::hash(md(hash)?, k).map_err(|e| format!("{e}"))?;
                    hmac(hash, &hk, &[c])
                }
            }
        };
        let kh = response_key(&a.secret, hostnqn)?;
        let r1 = hmac(
            hash,
            &kh,
            &[
                &augment(c1)?,
                &s1.to_le_bytes(),
                &tid.to_le_bytes(),
                &[0],
                b"HostHost",
                hostnqn.as_bytes(),
                &[0],
                subnqn.as_bytes(),
            ],
        )?;
        let bidi = a.ctrl_secret.is_some();
        let c2 = random(hl)?;
        let s2: u32 = if bidi { 0x4e56_4d58 } else { 0 };
        let mut rep = vec![0u8; 16];
        rep[0] = 1;
        rep[1] = 2;
        rep[4..6].copy_from_slice(&tid.to_le_bytes());
        rep[6] = hl as u8;
        rep[8] = bidi as u8;
        rep[10..12].copy_from_slice(&(gy.len() as u16).to_le_bytes());
        rep[12..16].copy_from_slice(&s2.to_le_bytes());
        rep.extend_from_slice(&r1);
        rep.extend_from_slice(&c2);
        rep.extend_from_slice(&gy);
        send(self, &rep)?;
        let ok = receive(self)?;
        if ok.len() < 16 || ok[0] != 1 || ok[1] != 3 || le16(&ok, 4) != tid {
            return Err(format!("not a Success1: {:?}", &ok[..ok.len().min(16)]));
        }
        if let Some(cs) = &a.ctrl_secret {
            let kc = response_key(cs, subnqn)?;
            let want = hmac(
                hash,
                &kc,
                &[
                    &augment(&c2)?,
                    &s2.to_le_bytes(),
                    &tid.to_le_bytes(),
                    &[0],
                    b"Controller",
                    subnqn.as_bytes(),
                    &[0],
                    hostnqn.as_bytes(),
                ],
            )?;
            if ok[8] & 1 == 0 || ok.len() < 16 + hl || ok[16..16 + hl] != want[..] {
                // Failure2: the controller did not prove it knows its secret.
                let mut f = vec![0u8; 8];
                f[1] = 0xf0;
                f[4..6].copy_from_slice(&tid.to_le_bytes());
                f[6] = 1;
                f[7] = 1;
                let _ = send(self, &f);
                return Err("the controller's response does not match its secret".into());
            }
            let mut s2m = vec![0u8; 16];
            s2m[0] = 1;
            s2m[1] = 4;
            s2m[4..6].copy_from_slice(&tid.to_le_bytes());
            send(self, &s2m)?;
        }
        Ok(Negotiated {
            hash,
            dhgroup: group,
            bidirectional: bidi,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_crc() {
        // nvme gen-dhchap-key -s 000102...1f -m 0 (nvme-cli 2.3)
        let (hh, k) =
            parse_secret("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:").unwrap();
        assert_eq!((hh, k), (0, (0..32).collect::<Vec<u8>>()));
        assert!(
            parse_secret("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaS:").is_err()
        );
        assert_eq!(crc32_ieee(b"123456789"), 0xcbf4_3926);
        for g in 1..=3 {
            let (p, n) = group_prime(g).unwrap();
            assert_eq!(p.num_bits() as usize, n * 8);
        }
    }
}
