//! Data keys and the key-encryption key (KEK) that wraps them.
//!
//! Each encrypted disk has its own random data key (DEK, 64 bytes: an XTS-AES-256 key).
//! Only the DEK wrapped with the KEK (RFC 3394) is ever stored. The KEK comes from a
//! [`KeyProvider`]: today a file or an environment variable; a KMS can implement the
//! same trait.

use std::path::PathBuf;

use nvmux_core::{Error, ErrorKind, Result};

use crate::keywrap;
use crate::xts::KEY_BYTES;

/// A source of the key-encryption key.
pub trait KeyProvider: Send + Sync {
    /// Where the KEK comes from, for messages (never the key itself).
    fn describe(&self) -> String;
    /// The 256-bit KEK.
    fn kek(&self) -> Result<[u8; 32]>;
}

/// A KEK in a file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
pub struct KekFile(pub PathBuf);

/// A KEK in an environment variable, as 64 hex digits.
pub struct KekEnv(pub String);

impl KeyProvider for KekFile {
    fn describe(&self) -> String {
        format!("KEK file {}", self.0.display())
    }
    fn kek(&self) -> Result<[u8; 32]> {
        let b = std::fs::read(&self.0).map_err(|e| Error::io(self.describe(), e))?;
        parse_kek(&b).map_err(|m| bad_key(format!("{}: {m}", self.describe())))
    }
}

impl KeyProvider for KekEnv {
    fn describe(&self) -> String {
        format!("KEK in ${}", self.0)
    }
    fn kek(&self) -> Result<[u8; 32]> {
        let v = std::env::var(&self.0)
            .map_err(|_| bad_key(format!("{} is not set", self.describe())))?;
        parse_kek(v.as_bytes()).map_err(|m| bad_key(format!("{}: {m}", self.describe())))
    }
}

fn bad_key(msg: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// 32 raw bytes, or 64 hex digits.
pub fn parse_kek(b: &[u8]) -> std::result::Result<[u8; 32], String> {
    if b.len() == 32 {
        let mut k = [0u8; 32];
        k.copy_from_slice(b);
        return Ok(k);
    }
    let t = std::str::from_utf8(b)
        .map_err(|_| "not 32 raw bytes or 64 hex digits".to_string())?
        .trim();
    let v = from_hex(t).ok_or("not 32 raw bytes or 64 hex digits")?;
    v.try_into().map_err(|v: Vec<u8>| {
        format!(
            "{} bytes of hex; a KEK is 32 bytes (64 hex digits)",
            v.len()
        )
    })
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A fresh random data key from the kernel's CSPRNG.
pub fn new_data_key() -> Result<[u8; KEY_BYTES]> {
    let mut k = [0u8; KEY_BYTES];
    random_bytes(&mut k)?;
    Ok(k)
}

/// Fill `k` from the kernel's CSPRNG.
pub fn random_bytes(k: &mut [u8]) -> Result<()> {
    let mut got = 0;
    while got < k.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n = unsafe { libc::getrandom(k[got..].as_mut_ptr().cast(), k.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io("getrandom", e));
        }
        got += n as usize;
    }
    Ok(())
}

/// A data key as stored: wrapped, with the check value of the KEK that wrapped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// RFC 3394 output, hex (144 digits).
    pub wrapped: String,
    /// `keywrap::check_value` of the KEK, hex (16 digits).
    pub kek_check: String,
}

pub fn wrap(p: &dyn KeyProvider, dek: &[u8; KEY_BYTES]) -> Result<WrappedKey> {
    let kek = p.kek()?;
    Ok(WrappedKey {
        wrapped: to_hex(&keywrap::wrap(&kek, dek)),
        kek_check: to_hex(&keywrap::check_value(&kek)),
    })
}

pub fn unwrap(p: &dyn KeyProvider, w: &WrappedKey) -> Result<[u8; KEY_BYTES]> {
    let kek = p.kek()?;
    let kcv = to_hex(&keywrap::check_value(&kek));
    if kcv != w.kek_check {
        return Err(bad_key(format!(
            "the {} (check value {kcv}) is not the KEK this disk's key was wrapped with (check value {})",
            p.describe(),
            w.kek_check
        )));
    }
    let raw = from_hex(&w.wrapped).ok_or_else(|| bad_key("wrapped key is not hex".into()))?;
    let k = keywrap::unwrap(&kek, &raw)
        .ok_or_else(|| bad_key("wrapped key failed its integrity check (damaged)".into()))?;
    k.try_into()
        .map_err(|_| bad_key("wrapped key has the wrong length".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed([u8; 32]);
    impl KeyProvider for Fixed {
        fn describe(&self) -> String {
            "test KEK".into()
        }
        fn kek(&self) -> Result<[u8; 32]> {
            Ok(self.0)
        }
    }

    #[test]
    fn wrap_round_trip_and_wrong_kek() {
        let dek = new_data_key().unwrap();
        assert_ne!(dek, [0u8; KEY_BYTES]);
        let w = wrap(&Fixed([5; 32]), &dek).unwrap();
        assert_eq!(w.wrapped.len(), 144);
        assert!(!w.wrapped.contains(&to_hex(&dek[..8])));
        assert_eq!(unwrap(&Fixed([5; 32]), &w).unwrap(), dek);
        let e = unwrap(&Fixed([6; 32]), &w).unwrap_err();
        assert!(e.msg.contains("not the KEK"), "{e}");
    }

    #[test]
    fn kek_formats() {
        assert_eq!(parse_kek(&[7u8; 32]).unwrap(), [7u8; 32]);
        let h = format!("{}\n", "ab".repeat(32));
        assert_eq!(parse_kek(h.as_bytes()).unwrap(), [0xab; 32]);
        assert!(parse_kek(b"abcd").unwrap_err().contains("2 bytes"));
        assert!(parse_kek(b"xyz").is_err());
    }
}
