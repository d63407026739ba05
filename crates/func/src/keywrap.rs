//! AES key wrap (RFC 3394) with a 256-bit key-encryption key: how a disk's data key is
//! stored. The wrap itself is RustCrypto's `aes-kw`; this module fixes the sizes nvmux
//! uses (a 64-byte data key, 72 bytes wrapped) and wipes every intermediate copy.
//! Unwrapping checks the RFC's integrity value, so a wrong KEK is detected instead of
//! yielding a wrong data key.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockEncrypt, KeyInit};
use aes::Aes256;
use aes_kw::KekAes256;
use zeroize::Zeroizing;

use crate::xts::KEY_BYTES;

/// Bytes of a wrapped data key: the key plus RFC 3394's 8-byte integrity value.
pub const WRAPPED_BYTES: usize = KEY_BYTES + 8;

/// Wrap a data key under `kek`.
pub fn wrap(kek: &[u8; 32], key: &[u8; KEY_BYTES]) -> [u8; WRAPPED_BYTES] {
    // `Kek` holds the AES key schedule, which the `aes` crate wipes on drop.
    let k = KekAes256::from(*GenericArray::from_slice(kek));
    let mut out = [0u8; WRAPPED_BYTES];
    // Cannot fail: the input is a multiple of 8 bytes, at least 16, and `out` is 8 longer.
    if k.wrap(key, &mut out).is_err() {
        unreachable!("RFC 3394 wrap of 64 bytes into 72");
    }
    out
}

/// Unwrap; `None` if the integrity check fails (a wrong KEK or damaged input) or the
/// input is not a wrapped 64-byte key.
pub fn unwrap(kek: &[u8; 32], wrapped: &[u8]) -> Option<Zeroizing<[u8; KEY_BYTES]>> {
    if wrapped.len() != WRAPPED_BYTES {
        return None;
    }
    let k = KekAes256::from(*GenericArray::from_slice(kek));
    let mut out = Zeroizing::new([0u8; KEY_BYTES]);
    k.unwrap(wrapped, &mut out[..]).ok()?;
    Some(out)
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

    /// RFC 3394 sections 4.3 and 4.6 (256-bit KEK; 128- and 256-bit key data), through
    /// `aes-kw` directly (nvmux wraps only 64-byte keys, which the RFC has no vector for).
    #[test]
    fn rfc3394_vectors() {
        let mut kek = [0u8; 32];
        for (i, b) in kek.iter_mut().enumerate() {
            *b = i as u8;
        }
        let k = KekAes256::from(kek);
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
            let (data, want) = (hex(data), hex(want));
            let mut w = vec![0u8; data.len() + 8];
            k.wrap(&data, &mut w).unwrap();
            assert_eq!(w, want);
            let mut back = vec![0u8; data.len()];
            k.unwrap(&w, &mut back).unwrap();
            assert_eq!(back, data);
        }
    }

    /// The on-disk form did not change with the move to `aes-kw`: this 64-byte key wrapped
    /// by the hand-written RFC 3394 code nvmux had before (and by Python's `cryptography`,
    /// `aes_key_wrap`) unwraps, and wraps back to the same bytes.
    #[test]
    fn same_wrapped_form_as_before() {
        let mut kek = [0u8; 32];
        for (i, b) in kek.iter_mut().enumerate() {
            *b = i as u8;
        }
        let mut dek = [0u8; KEY_BYTES];
        for (i, b) in dek.iter_mut().enumerate() {
            *b = (i * 3 + 1) as u8;
        }
        let want = hex(OLD_FORM);
        assert_eq!(wrap(&kek, &dek).to_vec(), want);
        assert_eq!(*unwrap(&kek, &want).unwrap(), dek);
    }
    const OLD_FORM: &str = "eaf748d48a9d1122ff2c6e1a2546d40587d5157e5884572e6a0c8289c931902db1ca02e6ba2cc5ecb698197ad962a0eb7acba582276481d33153ff9d3371ecc44c4218404a66ba2b";

    #[test]
    fn wrong_kek_or_damage_is_detected() {
        let kek = [1u8; 32];
        let w = wrap(&kek, &[9u8; KEY_BYTES]);
        assert_eq!(*unwrap(&kek, &w).unwrap(), [9u8; KEY_BYTES]);
        assert!(unwrap(&[2u8; 32], &w).is_none());
        let mut d = w;
        d[20] ^= 1;
        assert!(unwrap(&kek, &d).is_none());
        assert!(unwrap(&kek, &w[..16]).is_none());
    }
}
