//! Data keys and the key-encryption key (KEK) that wraps them.
//!
//! Each encrypted disk has its own random data key (DEK, 64 bytes: an XTS-AES-256 key).
//! Only the DEK wrapped with the KEK (RFC 3394) is ever stored. The KEK comes from a
//! [`KeyProvider`]: today a file or an environment variable; a KMS can implement the
//! same trait.
//!
//! Every copy of a KEK or a data key this module hands out is [`Zeroizing`]: wiped when
//! it goes out of scope. A KEK file that its group or others may access is refused.

use std::path::PathBuf;

use nvmux_core::{Error, ErrorKind, Result};
use zeroize::{Zeroize, Zeroizing};

use crate::keywrap;
use crate::xts::KEY_BYTES;

/// A KEK (256 bits), wiped on drop.
pub type Kek = Zeroizing<[u8; 32]>;
/// A data key (XTS-AES-256: 64 bytes), wiped on drop.
pub type DataKey = Zeroizing<[u8; KEY_BYTES]>;

/// A source of the key-encryption key.
pub trait KeyProvider: Send + Sync {
    /// Where the KEK comes from, for messages (never the key itself).
    fn describe(&self) -> String;
    /// The 256-bit KEK.
    fn kek(&self) -> Result<Kek>;
}

/// A KEK in a file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
pub struct KekFile(pub PathBuf);

/// A KEK in an environment variable, as 64 hex digits.
pub struct KekEnv(pub String);

impl KeyProvider for KekFile {
    fn describe(&self) -> String {
        format!("KEK file {}", self.0.display())
    }
    fn kek(&self) -> Result<Kek> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let mut f = std::fs::File::open(&self.0).map_err(|e| Error::io(self.describe(), e))?;
        let mode = f
            .metadata()
            .map_err(|e| Error::io(self.describe(), e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{} is accessible by group or others (mode {:04o}): a KEK must be readable by the daemon's user only; run `chmod 600 {}`",
                    self.describe(),
                    mode & 0o7777,
                    self.0.display()
                ),
            ));
        }
        // At most 200 bytes (64 hex digits with generous whitespace): a larger file is
        // not a KEK, and a bounded read keeps the copy in one wiped buffer.
        let mut b = Zeroizing::new(Vec::with_capacity(201));
        f.by_ref()
            .take(201)
            .read_to_end(&mut b)
            .map_err(|e| Error::io(self.describe(), e))?;
        if b.len() > 200 {
            return Err(bad_key(format!(
                "{}: not 32 raw bytes or 64 hex digits (the file is larger)",
                self.describe()
            )));
        }
        parse_kek(&b).map_err(|m| bad_key(format!("{}: {m}", self.describe())))
    }
}

impl KeyProvider for KekEnv {
    fn describe(&self) -> String {
        format!("KEK in ${}", self.0)
    }
    fn kek(&self) -> Result<Kek> {
        // The environment itself cannot be wiped (it is the process's); this copy is.
        let v = Zeroizing::new(
            std::env::var(&self.0)
                .map_err(|_| bad_key(format!("{} is not set", self.describe())))?,
        );
        parse_kek(v.as_bytes()).map_err(|m| bad_key(format!("{}: {m}", self.describe())))
    }
}

fn bad_key(msg: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// 32 raw bytes, or 64 hex digits.
pub fn parse_kek(b: &[u8]) -> std::result::Result<Kek, String> {
    let mut k = Zeroizing::new([0u8; 32]);
    if b.len() == 32 {
        k.copy_from_slice(b);
        return Ok(k);
    }
    let t = std::str::from_utf8(b)
        .map_err(|_| "not 32 raw bytes or 64 hex digits".to_string())?
        .trim();
    let v = Zeroizing::new(from_hex(t).ok_or("not 32 raw bytes or 64 hex digits")?);
    if v.len() != 32 {
        return Err(format!(
            "{} bytes of hex; a KEK is 32 bytes (64 hex digits)",
            v.len()
        ));
    }
    k.copy_from_slice(&v);
    Ok(k)
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
pub fn new_data_key() -> Result<DataKey> {
    let mut k = Zeroizing::new([0u8; KEY_BYTES]);
    random_bytes(&mut k[..])?;
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

/// A data key as stored: wrapped, with the check value of the KEK that wrapped it. Its
/// `Debug` shows the check value only, so that no log or error message carries a key.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// RFC 3394 output.
    pub wrapped: [u8; keywrap::WRAPPED_BYTES],
    /// `keywrap::check_value` of the KEK.
    pub kek_check: [u8; 8],
}

impl WrappedKey {
    /// From the hex strings of a `state.json` written before the keystore (migration).
    pub fn from_hex(wrapped: &str, kek_check: &str) -> Result<Self> {
        let w = from_hex(wrapped)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad_key("wrapped key is not 144 hex digits".into()))?;
        let c = from_hex(kek_check)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad_key("KEK check value is not 16 hex digits".into()))?;
        Ok(WrappedKey {
            wrapped: w,
            kek_check: c,
        })
    }
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("wrapped", &"(72 bytes, not shown)")
            .field("kek_check", &to_hex(&self.kek_check))
            .finish()
    }
}

impl Drop for WrappedKey {
    fn drop(&mut self) {
        // Wrapped, so useless without the KEK; wiped anyway, so that no copy of a key the
        // operator erased outlives it in memory.
        self.wrapped.zeroize();
    }
}

pub fn wrap(p: &dyn KeyProvider, dek: &[u8; KEY_BYTES]) -> Result<WrappedKey> {
    let kek = p.kek()?;
    Ok(wrap_with(&kek, dek))
}

pub fn wrap_with(kek: &[u8; 32], dek: &[u8; KEY_BYTES]) -> WrappedKey {
    WrappedKey {
        wrapped: keywrap::wrap(kek, dek),
        kek_check: keywrap::check_value(kek),
    }
}

pub fn unwrap(p: &dyn KeyProvider, w: &WrappedKey) -> Result<DataKey> {
    let kek = p.kek()?;
    unwrap_with(&kek, &p.describe(), w)
}

/// Unwrap with a KEK in hand; `what` names it in messages.
pub fn unwrap_with(kek: &[u8; 32], what: &str, w: &WrappedKey) -> Result<DataKey> {
    let kcv = keywrap::check_value(kek);
    if kcv != w.kek_check {
        return Err(bad_key(format!(
            "the {what} (check value {}) is not the KEK this disk's key was wrapped with (check value {})",
            to_hex(&kcv),
            to_hex(&w.kek_check)
        )));
    }
    keywrap::unwrap(kek, &w.wrapped)
        .ok_or_else(|| bad_key("wrapped key failed its integrity check (damaged)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed([u8; 32]);
    impl KeyProvider for Fixed {
        fn describe(&self) -> String {
            "test KEK".into()
        }
        fn kek(&self) -> Result<Kek> {
            Ok(Zeroizing::new(self.0))
        }
    }

    #[test]
    fn wrap_round_trip_and_wrong_kek() {
        let dek = new_data_key().unwrap();
        assert_ne!(*dek, [0u8; KEY_BYTES]);
        let w = wrap(&Fixed([5; 32]), &dek).unwrap();
        assert!(!w.wrapped.windows(8).any(|x| x == &dek[..8]));
        assert_eq!(*unwrap(&Fixed([5; 32]), &w).unwrap(), *dek);
        let e = unwrap(&Fixed([6; 32]), &w).unwrap_err();
        assert!(e.msg.contains("not the KEK"), "{e}");
    }

    #[test]
    fn kek_formats() {
        assert_eq!(*parse_kek(&[7u8; 32]).unwrap(), [7u8; 32]);
        let h = format!("{}\n", "ab".repeat(32));
        assert_eq!(*parse_kek(h.as_bytes()).unwrap(), [0xab; 32]);
        assert!(parse_kek(b"abcd").unwrap_err().contains("2 bytes"));
        assert!(parse_kek(b"xyz").is_err());
    }

    #[test]
    fn debug_shows_no_key() {
        let w = wrap_with(&[5; 32], &[0xee; KEY_BYTES]);
        let d = format!("{w:?}");
        assert!(
            !d.contains(&format!("{:?}", &w.wrapped[..4])) && !d.contains(&to_hex(&w.wrapped[..4])),
            "{d}"
        );
        assert!(d.contains(&to_hex(&w.kek_check)), "{d}");
    }

    #[test]
    fn kek_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nvmux-kekperm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("kek");
        std::fs::write(&p, "cd".repeat(32)).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = KekFile(p.clone()).kek().unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
            assert!(e.msg.contains("chmod 600"), "{e}");
            assert!(e.msg.contains(&format!("{mode:04o}")), "{e}");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(*KekFile(p.clone()).kek().unwrap(), [0xcd; 32]);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(*KekFile(p.clone()).kek().unwrap(), [0xcd; 32]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
