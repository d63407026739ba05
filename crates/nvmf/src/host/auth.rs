//! The host side of DH-HMAC-CHAP (NVMe Base 2.0, 8.13.5) on a blocking queue, after a
//! Connect whose AUTHREQ asked for it. Uses this crate's secret parsing, hash and group
//! definitions and response computation ([`crate::auth`]); every length the controller
//! sends is checked against the message before it is used.

use openssl::bn::{BigNum, BigNumContext, MsbOption};

use super::sync::{Res, SyncConn};
use crate::auth::{response, DhGroup, HashFn, Secret};

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn auth_sqe(fctype: u8, len: usize) -> [u8; 64] {
    let mut s = super::sync::sqe(0x7f, 0);
    s[4] = fctype;
    s[41..44].copy_from_slice(&[1, 1, 0xe9]);
    s[44..48].copy_from_slice(&(len as u32).to_le_bytes());
    s
}

fn send(q: &mut SyncConn, msg: &[u8]) -> Res<()> {
    let (c, _) = q.cmd(auth_sqe(0x05, msg.len()), msg, 0)?;
    if !c.ok() {
        return Err(format!("AUTH_Send: status {:#x}", c.status));
    }
    Ok(())
}

fn receive(q: &mut SyncConn) -> Res<Vec<u8>> {
    let (c, d) = q.cmd(auth_sqe(0x06, 4096), &[], 4096)?;
    if !c.ok() {
        return Err(format!("AUTH_Receive: status {:#x}", c.status));
    }
    if d.len() >= 8 && d[0] == 0 && d[1] == 0xf1 {
        return Err(format!(
            "the controller refused: Failure1 (reason {:#x}, explanation {:#x})",
            d[6], d[7]
        ));
    }
    Ok(d)
}

/// Authenticate on `q` with the host secret and, for bidirectional authentication, the
/// controller secret. `tid` is the transaction id.
pub fn authenticate(
    q: &mut SyncConn,
    tid: u16,
    subnqn: &str,
    hostnqn: &str,
    secret: &str,
    ctrl_secret: Option<&str>,
) -> Res<()> {
    let host_key = Secret::parse(secret)?.transformed(hostnqn)?;
    let ctrl_key = match ctrl_secret {
        Some(s) => Some(Secret::parse(s)?.transformed(subnqn)?),
        None => None,
    };
    // Negotiate: one DH-HMAC-CHAP protocol descriptor, SHA-256/384/512, null and
    // ffdhe2048/3072/4096.
    let hashes = [1u8, 2, 3];
    let groups = [0u8, 1, 2, 3];
    let mut neg = vec![0u8; 72];
    neg[4..6].copy_from_slice(&tid.to_le_bytes());
    neg[7] = 1; // NAPD
    neg[8] = 1; // AUTHID: DH-HMAC-CHAP
    neg[10] = hashes.len() as u8;
    neg[11] = groups.len() as u8;
    neg[12..12 + hashes.len()].copy_from_slice(&hashes);
    neg[42..42 + groups.len()].copy_from_slice(&groups);
    send(q, &neg)?;
    let ch = receive(q)?;
    if ch.len() < 16 || ch[0] != 1 || ch[1] != 1 || le16(&ch, 4) != tid {
        return Err("the controller did not send a Challenge".into());
    }
    let (hl, hash_id, group_id) = (ch[6] as usize, ch[8], ch[9]);
    let dhvlen = le16(&ch, 10) as usize;
    let s1 = le32(&ch, 12);
    let h = HashFn::from_id(hash_id).ok_or("the controller chose a hash not offered")?;
    if hl != h.digest_len() || 16 + hl + dhvlen > ch.len() {
        return Err("Challenge lengths do not add up".into());
    }
    let c1 = &ch[16..16 + hl];
    let group = DhGroup::from_id(group_id).ok_or("the controller chose a DH group not offered")?;
    let (ks, gy) = match group.prime() {
        None => {
            if dhvlen != 0 {
                return Err("a DH value with the null group".into());
            }
            (None, Vec::new())
        }
        Some(p) => {
            let n = group.bytes();
            if dhvlen != n {
                return Err(format!("{dhvlen}-byte DH value for a {n}-byte group"));
            }
            let e = |e: openssl::error::ErrorStack| format!("DH: {e}");
            let mut ctx = BigNumContext::new().map_err(e)?;
            let mut y = BigNum::new().map_err(e)?;
            y.rand(384, MsbOption::MAYBE_ZERO, false).map_err(e)?;
            let two = BigNum::from_u32(2).map_err(e)?;
            let mut gyb = BigNum::new().map_err(e)?;
            gyb.mod_exp(&two, &y, &p, &mut ctx).map_err(e)?;
            let gx = BigNum::from_slice(&ch[16 + hl..16 + hl + dhvlen]).map_err(e)?;
            let one = BigNum::from_u32(1).map_err(e)?;
            let mut pm1 = BigNum::new().map_err(e)?;
            pm1.checked_sub(&p, &one).map_err(e)?;
            if gx <= one || gx >= pm1 {
                return Err("the controller's DH value is out of range".into());
            }
            let mut k = BigNum::new().map_err(e)?;
            k.mod_exp(&gx, &y, &p, &mut ctx).map_err(e)?;
            (
                Some(k.to_vec_padded(n as i32).map_err(e)?),
                gyb.to_vec_padded(n as i32).map_err(e)?,
            )
        }
    };
    let r1 = response(
        h,
        host_key.as_slice(),
        c1,
        ks.as_deref(),
        s1,
        tid,
        b"HostHost",
        hostnqn,
        subnqn,
    )?;
    let bidi = ctrl_key.is_some();
    let mut c2 = vec![0u8; hl];
    openssl::rand::rand_bytes(&mut c2).map_err(|e| format!("random: {e}"))?;
    let mut s2b = [0u8; 4];
    openssl::rand::rand_bytes(&mut s2b).map_err(|e| format!("random: {e}"))?;
    let s2 = if bidi { u32::from_le_bytes(s2b) | 1 } else { 0 };
    let mut rep = vec![0u8; 16];
    rep[0] = 1;
    rep[1] = 2; // Reply
    rep[4..6].copy_from_slice(&tid.to_le_bytes());
    rep[6] = hl as u8;
    rep[8] = bidi as u8;
    rep[10..12].copy_from_slice(&(gy.len() as u16).to_le_bytes());
    rep[12..16].copy_from_slice(&s2.to_le_bytes());
    rep.extend_from_slice(&r1);
    rep.extend_from_slice(&c2);
    rep.extend_from_slice(&gy);
    send(q, &rep)?;
    let ok = receive(q)?;
    if ok.len() < 16 || ok[0] != 1 || ok[1] != 3 || le16(&ok, 4) != tid {
        return Err("the controller did not send Success1".into());
    }
    if let Some(kc) = &ctrl_key {
        let want = response(
            h,
            kc.as_slice(),
            &c2,
            ks.as_deref(),
            s2,
            tid,
            b"Controller",
            subnqn,
            hostnqn,
        )?;
        if ok[8] & 1 == 0 || ok.len() < 16 + hl || ok[16..16 + hl] != want[..] {
            let mut f = vec![0u8; 8];
            f[1] = 0xf0; // Failure2
            f[4..6].copy_from_slice(&tid.to_le_bytes());
            f[6] = 1;
            f[7] = 1;
            let _ = send(q, &f);
            return Err("the controller's response does not match its secret".into());
        }
        let mut s2m = vec![0u8; 16];
        s2m[0] = 1;
        s2m[1] = 4; // Success2
        s2m[4..6].copy_from_slice(&tid.to_le_bytes());
        send(q, &s2m)?;
    }
    Ok(())
}
