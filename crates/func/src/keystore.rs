//! The keystore: every encrypted disk's wrapped data key, in a small file of fixed-size
//! slots that are overwritten in place and synced (as LUKS overwrites a keyslot).
//!
//! `state.json` names a disk's slot and the slot's random id, never the key. Destroying a
//! key (crypto-erase, disk delete) overwrites its slot with zeros and syncs, so the file
//! system's current copy of the wrapped key is gone, not merely unlinked as a replaced
//! `state.json` would leave it. Rotating the KEK re-wraps every slot in place. The layout
//! is in docs/format.md ("The keystore").

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nvmux_core::crc32c::crc32c;
use nvmux_core::{Error, ErrorKind, Result};

use crate::keys::WrappedKey;
use crate::keywrap::WRAPPED_BYTES;

/// Bytes of the header and of every slot.
pub const SLOT_BYTES: usize = 256;
/// Slots one keystore holds at most (16 MiB of file).
pub const MAX_SLOTS: u32 = 65536;
/// Header magic.
pub const MAGIC: &[u8; 8] = b"NVMUXKS\0";
/// Magic of a slot in use; a free slot is all zeros.
pub const SLOT_MAGIC: &[u8; 4] = b"NVKY";
pub const VERSION: u32 = 1;
/// Owner names (disk names) fit in 64 bytes.
pub const OWNER_BYTES: usize = 64;
const CRC_AT: usize = SLOT_BYTES - 4;

/// A slot's random id: `state.json` holds it next to the slot number, so a disk never
/// picks up another disk's key from a reused slot.
pub type KeyId = [u8; 16];

/// A slot in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub id: KeyId,
    pub owner: String,
    pub key: WrappedKey,
}

pub struct Keystore {
    path: PathBuf,
    file: File,
    /// Number of whole slots in the file (used or free).
    slots: u32,
}

fn bad(path: &Path, msg: String) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("keystore {}: {msg}", path.display()),
    )
}

fn offset(index: u32) -> u64 {
    (1 + index as u64) * SLOT_BYTES as u64
}

fn encode_header() -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(SLOT_BYTES as u32).to_le_bytes());
    let c = crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&c.to_le_bytes());
    b
}

fn encode_slot(id: &KeyId, owner: &str, key: &WrappedKey) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[..4].copy_from_slice(SLOT_MAGIC);
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..24].copy_from_slice(id);
    b[24..32].copy_from_slice(&key.kek_check);
    b[32..32 + WRAPPED_BYTES].copy_from_slice(&key.wrapped);
    let o = owner.as_bytes();
    let n = o.len().min(OWNER_BYTES);
    b[104] = n as u8;
    b[105..105 + n].copy_from_slice(&o[..n]);
    let c = crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&c.to_le_bytes());
    b
}

/// Decode a slot: `Ok(None)` for a free (all-zero) slot.
pub fn decode_slot(index: u32, b: &[u8; SLOT_BYTES]) -> std::result::Result<Option<Slot>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let stored = u32::from_le_bytes([b[CRC_AT], b[CRC_AT + 1], b[CRC_AT + 2], b[CRC_AT + 3]]);
    if crc32c(&b[..CRC_AT]) != stored {
        return Err(format!("slot {index} is damaged (checksum mismatch)"));
    }
    if &b[..4] != SLOT_MAGIC {
        return Err(format!("slot {index} has no slot magic"));
    }
    let v = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    if v != VERSION {
        return Err(format!(
            "slot {index} has version {v}, this nvmux reads {VERSION}"
        ));
    }
    let n = b[104] as usize;
    if n > OWNER_BYTES {
        return Err(format!(
            "slot {index} has an owner name of {n} bytes (at most {OWNER_BYTES})"
        ));
    }
    let owner = std::str::from_utf8(&b[105..105 + n])
        .map_err(|_| format!("slot {index} has an owner name that is not UTF-8"))?
        .to_string();
    let mut id = [0u8; 16];
    id.copy_from_slice(&b[8..24]);
    let mut kek_check = [0u8; 8];
    kek_check.copy_from_slice(&b[24..32]);
    let mut wrapped = [0u8; WRAPPED_BYTES];
    wrapped.copy_from_slice(&b[32..32 + WRAPPED_BYTES]);
    Ok(Some(Slot {
        index,
        id,
        owner,
        key: WrappedKey { wrapped, kek_check },
    }))
}

impl Keystore {
    /// Open the keystore at `path`, creating it (mode 0600) if it does not exist.
    pub fn open(path: &Path) -> Result<Keystore> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let io = |what: &str, e: std::io::Error| {
            Error::io(format!("keystore {}: {what}", path.display()), e)
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| io("set mode 0600", e))?;
        }
        let len = meta.len();
        if len < SLOT_BYTES as u64 {
            // New (or a crash before its header was synced: nothing was stored yet).
            file.write_all_at(&encode_header(), 0)
                .map_err(|e| io("write header", e))?;
            file.sync_all().map_err(|e| io("sync", e))?;
            if let Some(dir) = path.parent() {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("sync its directory", e))?;
            }
            return Ok(Keystore {
                path: path.to_path_buf(),
                file,
                slots: 0,
            });
        }
        let mut h = [0u8; SLOT_BYTES];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| io("read header", e))?;
        let stored = u32::from_le_bytes([h[CRC_AT], h[CRC_AT + 1], h[CRC_AT + 2], h[CRC_AT + 3]]);
        if &h[..8] != MAGIC || crc32c(&h[..CRC_AT]) != stored {
            return Err(bad(
                path,
                "not an nvmux keystore, or its header is damaged".into(),
            ));
        }
        let v = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let ss = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if v != VERSION || ss != SLOT_BYTES as u32 {
            return Err(bad(
                path,
                format!("version {v} with {ss}-byte slots; this nvmux reads version {VERSION} with {SLOT_BYTES}-byte slots"),
            ));
        }
        // A slot torn by a crash while the file grew is ignored (it was never referenced:
        // state.json names a slot only after the slot is synced) and overwritten by the
        // next new key.
        let slots = ((len / SLOT_BYTES as u64) - 1).min(MAX_SLOTS as u64) as u32;
        Ok(Keystore {
            path: path.to_path_buf(),
            file,
            slots,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: String, e: std::io::Error) -> Error {
        Error::io(format!("keystore {}: {what}", self.path.display()), e)
    }

    fn read_raw(&self, index: u32) -> Result<[u8; SLOT_BYTES]> {
        let mut b = [0u8; SLOT_BYTES];
        self.file
            .read_exact_at(&mut b, offset(index))
            .map_err(|e| self.io(format!("read slot {index}"), e))?;
        Ok(b)
    }

    /// Overwrite slot `index` in place and sync it to stable storage.
    fn write_raw(&mut self, index: u32, b: &[u8; SLOT_BYTES]) -> Result<()> {
        self.file
            .write_all_at(b, offset(index))
            .map_err(|e| self.io(format!("write slot {index}"), e))?;
        self.file
            .sync_data()
            .map_err(|e| self.io(format!("sync slot {index}"), e))?;
        self.slots = self.slots.max(index + 1);
        Ok(())
    }

    /// Every slot in use. A damaged slot is an error naming it.
    pub fn slots(&self) -> Result<Vec<Slot>> {
        let mut v = Vec::new();
        for i in 0..self.slots {
            if let Some(s) = decode_slot(i, &self.read_raw(i)?).map_err(|m| bad(&self.path, m))? {
                v.push(s);
            }
        }
        Ok(v)
    }

    /// Store a new key for `owner` in a free slot (or a new one at the end); synced before
    /// it returns. Returns the slot and its new random id.
    pub fn add(&mut self, owner: &str, key: &WrappedKey) -> Result<(u32, KeyId)> {
        let mut index = None;
        for i in 0..self.slots {
            // A damaged slot is not reused blindly: it may be a key a disk still needs.
            if self.read_raw(i)?.iter().all(|&x| x == 0) {
                index = Some(i);
                break;
            }
        }
        let index = match index {
            Some(i) => i,
            None if self.slots < MAX_SLOTS => self.slots,
            None => {
                return Err(bad(
                    &self.path,
                    format!("all {MAX_SLOTS} slots are in use; delete encrypted disks first"),
                ))
            }
        };
        let mut id = [0u8; 16];
        crate::keys::random_bytes(&mut id)?;
        self.write_raw(index, &encode_slot(&id, owner, key))?;
        Ok((index, id))
    }

    /// The slot `index`, which must carry `id`.
    pub fn get(&self, index: u32, id: &KeyId) -> Result<Slot> {
        let missing = || {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "keystore {}: slot {index} does not hold this disk's key (it was erased, or the keystore is not the one state.json was written with)",
                    self.path.display()
                ),
            )
        };
        if index >= self.slots {
            return Err(missing());
        }
        match decode_slot(index, &self.read_raw(index)?).map_err(|m| bad(&self.path, m))? {
            Some(s) if &s.id == id => Ok(s),
            _ => Err(missing()),
        }
    }

    /// Overwrite slot `index` (which must carry `id`) with `key`, in place; synced.
    pub fn replace(&mut self, index: u32, id: &KeyId, key: &WrappedKey) -> Result<()> {
        let s = self.get(index, id)?;
        self.write_raw(index, &encode_slot(id, &s.owner, key))
    }

    /// Destroy the key in slot `index`: overwrite the slot with zeros, in place; synced.
    pub fn erase(&mut self, index: u32) -> Result<()> {
        if index >= self.slots {
            return Ok(());
        }
        self.write_raw(index, &[0u8; SLOT_BYTES])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::wrap_with;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nvmux-ks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn add_get_replace_erase_in_place() {
        let d = dir("basic");
        let p = d.join("keystore");
        let kek = [3u8; 32];
        let (a, b) = (wrap_with(&kek, &[1u8; 64]), wrap_with(&kek, &[2u8; 64]));
        let mut ks = Keystore::open(&p).unwrap();
        let (ia, ida) = ks.add("a", &a).unwrap();
        let (ib, idb) = ks.add("b", &b).unwrap();
        assert_eq!((ia, ib), (0, 1));
        assert_eq!(ks.get(ia, &ida).unwrap().key, a);
        assert_eq!(ks.get(ib, &idb).unwrap().owner, "b");
        assert!(ks.get(ia, &idb).is_err(), "wrong id");
        drop(ks);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let mut ks = Keystore::open(&p).unwrap();
        assert_eq!(ks.slots().unwrap().len(), 2);
        let c = wrap_with(&kek, &[4u8; 64]);
        ks.replace(ia, &ida, &c).unwrap();
        let raw = std::fs::read(&p).unwrap();
        assert!(!contains(&raw, &a.wrapped), "old key still in the file");
        assert!(contains(&raw, &c.wrapped));
        assert_eq!(
            raw.len(),
            3 * SLOT_BYTES,
            "overwritten in place, not appended"
        );

        ks.erase(ib).unwrap();
        let raw = std::fs::read(&p).unwrap();
        assert!(!contains(&raw, &b.wrapped));
        assert!(ks.get(ib, &idb).is_err());
        // The freed slot is reused.
        let (ie, _) = ks.add("e", &b).unwrap();
        assert_eq!(ie, ib);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn damage_and_foreign_files_are_refused_by_name() {
        let d = dir("damage");
        let p = d.join("keystore");
        let mut ks = Keystore::open(&p).unwrap();
        let (i, id) = ks.add("a", &wrap_with(&[1; 32], &[5; 64])).unwrap();
        drop(ks);
        let mut raw = std::fs::read(&p).unwrap();
        raw[SLOT_BYTES + 40] ^= 1;
        std::fs::write(&p, &raw).unwrap();
        let ks = Keystore::open(&p).unwrap();
        let e = ks.get(i, &id).unwrap_err();
        assert!(e.msg.contains("slot 0 is damaged"), "{e}");
        std::fs::write(&p, vec![7u8; 600]).unwrap();
        let e = Keystore::open(&p).err().unwrap();
        assert!(e.msg.contains("not an nvmux keystore"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A torn append (a crash while the file grew) is ignored and overwritten.
    #[test]
    fn torn_tail_is_ignored() {
        let d = dir("torn");
        let p = d.join("keystore");
        let mut ks = Keystore::open(&p).unwrap();
        ks.add("a", &wrap_with(&[1; 32], &[5; 64])).unwrap();
        drop(ks);
        let f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all_at(&[9u8; 100], 2 * SLOT_BYTES as u64).unwrap();
        let mut ks = Keystore::open(&p).unwrap();
        assert_eq!(ks.slots().unwrap().len(), 1);
        let (i, id) = ks.add("b", &wrap_with(&[1; 32], &[6; 64])).unwrap();
        assert_eq!(i, 1);
        assert_eq!(ks.get(i, &id).unwrap().owner, "b");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
