//! AES key wrap (RFC 3394) with a 256-bit key-encryption key: how a disk's data key is
//! stored. Unwrapping checks the RFC's integrity value, so a wrong KEK is detected
//! instead of yielding a wrong data key.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;

const IV: u64 = 0xA6A6_A6A6_A6A6_A6A6;

/// Wrap `key` (a multiple of 8 bytes, at least 16) under `kek`. The result is 8 bytes
/// longer.
pub fn wrap(kek: &[u8; 32], key: &[u8]) -> Vec<u8> {
    assert!(
        key.len().is_multiple_of(8) && key.len() >= 16,
        "key wrap input size"
    );
    let c = Aes256::new(GenericArray::from_slice(kek));
    let n = key.len() / 8;
    let mut r: Vec<[u8; 8]> = key
        .chunks_exact(8)
        .map(|b| b.try_into().unwrap_or([0; 8]))
        .collect();
    let mut a = IV;
    for j in 0..6 {
        for (i, ri) in r.iter_mut().enumerate() {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&a.to_be_bytes());
            b[8..].copy_from_slice(ri);
            let blk = GenericArray::from_mut_slice(&mut b);
            c.encrypt_block(blk);
            let t = (n * j + i + 1) as u64;
            a = u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8])) ^ t;
            ri.copy_from_slice(&b[8..]);
        }
    }
    let mut out = a.to_be_bytes().to_vec();
    for ri in r {
        out.extend_from_slice(&ri);
    }
    out
}

/// Unwrap; `None` if the integrity check fails (a wrong KEK or damaged input).
pub fn unwrap(kek: &[u8; 32], wrapped: &[u8]) -> Option<Vec<u8>> {
    if !wrapped.len().is_multiple_of(8) || wrapped.len() < 24 {
        return None;
    }
    let c = Aes256::new(GenericArray::from_slice(kek));
    let n = wrapped.len() / 8 - 1;
    let mut a = u64::from_be_bytes(wrapped[..8].try_into().ok()?);
    let mut r: Vec<[u8; 8]> = wrapped[8..]
        .chunks_exact(8)
        .map(|b| b.try_into().unwrap_or([0; 8]))
        .collect();
    for j in (0..6).rev() {
        for i in (0..n).rev() {
            let t = (n * j + i + 1) as u64;
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&(a ^ t).to_be_bytes());
            b[8..].copy_from_slice(&r[i]);
            c.decrypt_block(GenericArray::from_mut_slice(&mut b));
            a = u64::from_be_bytes(b[..8].try_into().ok()?);
            r[i].copy_from_slice(&b[8..]);
        }
    }
    if a != IV {
        return None;
    }
    Some(r.concat())
}

/// A key check value: the first 8 bytes of AES-256(kek, 0), shown to identify a KEK
/// without revealing it.
pub fn check_value(kek: &[u8; 32]) -> [u8; 8] {
    let c = Aes256::new(GenericArray::from_slice(kek));
    let mut b = [0u8; 16];
    c.encrypt_block(GenericArray::from_mut_slice(&mut b));
    let mut out = [0u8; 8];
    out.copy_from_slice(&b[..8]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 3394 sections 4.3 and 4.6 (256-bit KEK).
    #[test]
    fn rfc3394_vectors() {
        let mut kek = [0u8; 32];
        for (i, b) in kek.iter_mut().enumerate() {
            *b = i as u8;
        }
        for (data, want) in [
            (
                "00112233445566778899aabbccddeeff",
                "64e8c3f9ce0f5ba263e9777905818a2a93c8191e7d6e8ae7",
            ),
            (
                "00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f",
                "28c9f404c4b810f4cbccb35cfb87f8263f5786e2d80ed326cbc7f0e71a99f43bfb988b9b7a02dd21",
            ),
        ] {
            let w = wrap(&kek, &hex(data));
            assert_eq!(w, hex(want));
            assert_eq!(unwrap(&kek, &w), Some(hex(data)));
        }
    }

    #[test]
    fn wrong_kek_or_damage_is_detected() {
        let kek = [1u8; 32];
        let w = wrap(&kek, &[9u8; 64]);
        assert_eq!(unwrap(&kek, &w), Some(vec![9u8; 64]));
        assert_eq!(unwrap(&[2u8; 32], &w), None);
        let mut d = w.clone();
        d[20] ^= 1;
        assert_eq!(unwrap(&kek, &d), None);
        assert_eq!(unwrap(&kek, &w[..16]), None);
    }
}
