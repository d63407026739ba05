//! Per-disk state for classifiers: array maps.
//!
//! A map's values live in one block of 8-byte words; value `i` starts at word
//! `i * stride / 8`, so every value is 8-byte aligned (which `nvmux_atomic_add` needs).
//! Programs on several workers read and write values through plain pointers, as eBPF
//! programs do in Linux: a value written while another worker reads it may be seen half
//! old, half new. Counters that must not lose updates use `nvmux_atomic_add`. The API
//! reads and writes values with relaxed atomic word accesses.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::elf::MapDef;
use crate::{refuse, Result};

pub struct ArrayMap {
    pub def: MapDef,
    /// Bytes from one value to the next: the value size rounded up to 8.
    stride: usize,
    words: Box<[AtomicU64]>,
}

impl ArrayMap {
    /// A zeroed map; the definition was checked by `verifier::check_maps`.
    pub fn new(def: &MapDef) -> ArrayMap {
        let stride = (def.value_size as usize).next_multiple_of(8);
        let n = stride / 8 * def.max_entries as usize;
        ArrayMap {
            def: def.clone(),
            stride,
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The address of value `key`, or `None` past the last entry.
    pub fn value_ptr(&self, key: u32) -> Option<*mut u8> {
        if key >= self.def.max_entries {
            return None;
        }
        let w = key as usize * self.stride / 8;
        Some(self.words[w].as_ptr().cast())
    }

    /// The range of addresses the values occupy (for the interpreter's memory checks).
    pub fn address_range(&self) -> std::ops::Range<u64> {
        let start = self.words.as_ptr() as u64;
        start..start + (self.words.len() * 8) as u64
    }

    fn check_key(&self, key: u32) -> Result<usize> {
        if key >= self.def.max_entries {
            return refuse(format!(
                "map {:?} has {} entries; key {key} is past the end",
                self.def.name, self.def.max_entries
            ));
        }
        Ok(key as usize * self.stride / 8)
    }

    /// Value `key`, `value_size` bytes.
    pub fn read(&self, key: u32) -> Result<Vec<u8>> {
        let w = self.check_key(key)?;
        let mut out = Vec::with_capacity(self.stride);
        for a in &self.words[w..w + self.stride / 8] {
            out.extend_from_slice(&a.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(self.def.value_size as usize);
        Ok(out)
    }

    /// Set value `key` to `bytes` (at most `value_size`; the rest of the value is zeroed).
    pub fn write(&self, key: u32, bytes: &[u8]) -> Result<()> {
        let w = self.check_key(key)?;
        if bytes.len() > self.def.value_size as usize {
            return refuse(format!(
                "map {:?}: a value is {} bytes; {} were given",
                self.def.name,
                self.def.value_size,
                bytes.len()
            ));
        }
        for (i, a) in self.words[w..w + self.stride / 8].iter().enumerate() {
            let mut b = [0u8; 8];
            let lo = (i * 8).min(bytes.len());
            let hi = (i * 8 + 8).min(bytes.len());
            b[..hi - lo].copy_from_slice(&bytes[lo..hi]);
            a.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Keys whose value is not all zeroes.
    pub fn nonzero_keys(&self) -> impl Iterator<Item = u32> + '_ {
        let per = self.stride / 8;
        (0..self.def.max_entries).filter(move |&k| {
            let w = k as usize * per;
            self.words[w..w + per]
                .iter()
                .any(|a| a.load(Ordering::Relaxed) != 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds() {
        let m = ArrayMap::new(&MapDef {
            name: "g".into(),
            kind: 2,
            key_size: 4,
            value_size: 12,
            max_entries: 3,
            flags: 0,
        });
        m.write(2, &[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap();
        assert_eq!(m.read(2).unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]);
        assert!(m.write(3, &[1]).is_err());
        assert!(m.write(0, &[0; 13]).is_err());
        assert_eq!(m.nonzero_keys().collect::<Vec<_>>(), vec![2]);
        assert!(m.value_ptr(3).is_none());
        assert_eq!(m.value_ptr(1).map(|p| p as usize % 8), Some(0));
    }
}
