//! The bitmap file: two header copies (pages 0 and 1) and the bitmap pages (see the crate
//! docs for the layout).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nvmux_core::crc32c::crc32c;
use nvmux_core::{Error, ErrorKind, Result};

use crate::LegState;

pub const MAGIC: &[u8; 8] = b"NVMXMBM1";
pub const VERSION: u32 = 1;
pub const PAGE: u64 = 4096;
/// Most legs a mirror (and its leg table) holds.
pub const MAX_LEGS: usize = 8;
/// Bytes of a leg name in the table (NUL-padded).
pub const NAME_LEN: usize = 64;
/// Largest region count accepted from a file (2^32 regions: 512 MiB of bitmap).
pub const MAX_REGIONS: u64 = 1 << 32;

const LEG_OFF: usize = 48;
const LEG_SIZE: usize = 88;
const CRC_OFF: usize = LEG_OFF + MAX_LEGS * LEG_SIZE;
/// Offset of the first bitmap page.
pub const BITMAP_OFF: u64 = 2 * PAGE;

/// One entry of the leg table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegRecord {
    pub name: String,
    pub state: LegState,
    /// Full-copy cursor: regions below it are copied (`regions` when no full copy runs).
    pub cursor: u64,
    /// When the leg was faulted, seconds since the Unix epoch (0: not faulted).
    pub faulted_at: u64,
}

/// A decoded header page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub region_size: u64,
    pub regions: u64,
    /// The mirror's size in bytes when the file was made.
    pub size: u64,
    pub generation: u64,
    pub legs: Vec<LegRecord>,
}

/// What [`crate::read_bitmap`] finds in a bitmap file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    pub region_size: u64,
    pub regions: u64,
    pub size: u64,
    pub generation: u64,
    /// Indexes of the regions whose bit is set.
    pub dirty: Vec<u64>,
    pub legs: Vec<LegRecord>,
}

fn state_byte(s: LegState) -> u8 {
    match s {
        LegState::Healthy => 0,
        LegState::Syncing => 1,
        LegState::Faulted => 2,
    }
}

/// Check a leg name: 1..=64 bytes, no NUL.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > NAME_LEN || name.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("mirror leg name {name:?}: must be 1 to {NAME_LEN} bytes without NUL"),
        ));
    }
    Ok(())
}

/// Bitmap pages for `regions` regions.
pub fn bitmap_pages(regions: u64) -> u64 {
    regions.div_ceil(8).div_ceil(PAGE).max(1)
}

impl Header {
    /// Encode into a 4 KiB page (the rest of the page is zero).
    pub fn encode(&self, page: &mut [u8]) {
        page.fill(0);
        page[0..8].copy_from_slice(MAGIC);
        page[8..12].copy_from_slice(&VERSION.to_le_bytes());
        page[12..16].copy_from_slice(&(self.legs.len().min(MAX_LEGS) as u32).to_le_bytes());
        page[16..24].copy_from_slice(&self.region_size.to_le_bytes());
        page[24..32].copy_from_slice(&self.regions.to_le_bytes());
        page[32..40].copy_from_slice(&self.generation.to_le_bytes());
        page[40..48].copy_from_slice(&self.size.to_le_bytes());
        for (i, l) in self.legs.iter().take(MAX_LEGS).enumerate() {
            let o = LEG_OFF + i * LEG_SIZE;
            let n = l.name.len().min(NAME_LEN);
            page[o..o + n].copy_from_slice(&l.name.as_bytes()[..n]);
            page[o + 64] = state_byte(l.state);
            page[o + 72..o + 80].copy_from_slice(&l.cursor.to_le_bytes());
            page[o + 80..o + 88].copy_from_slice(&l.faulted_at.to_le_bytes());
        }
        let crc = crc32c(&page[..CRC_OFF]);
        page[CRC_OFF..CRC_OFF + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode a header page; the error says what is wrong with it.
    pub fn decode(page: &[u8]) -> std::result::Result<Header, String> {
        if page.len() < CRC_OFF + 4 {
            return Err("short header".into());
        }
        if &page[0..8] != MAGIC {
            return Err("bad magic (not an nvmux mirror bitmap)".into());
        }
        let u32at = |o: usize| u32::from_le_bytes([page[o], page[o + 1], page[o + 2], page[o + 3]]);
        let u64at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&page[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let crc = u32at(CRC_OFF);
        if crc32c(&page[..CRC_OFF]) != crc {
            return Err("header checksum mismatch".into());
        }
        let version = u32at(8);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let count = u32at(12) as usize;
        if count > MAX_LEGS {
            return Err(format!("leg count {count} exceeds {MAX_LEGS}"));
        }
        let region_size = u64at(16);
        let regions = u64at(24);
        let generation = u64at(32);
        let size = u64at(40);
        if !region_size.is_power_of_two() || region_size < 512 {
            return Err(format!("bad region size {region_size}"));
        }
        if regions == 0 || regions > MAX_REGIONS || regions != size.div_ceil(region_size) {
            return Err(format!(
                "region count {regions} does not match size {size} and region size {region_size}"
            ));
        }
        let mut legs = Vec::with_capacity(count);
        for i in 0..count {
            let o = LEG_OFF + i * LEG_SIZE;
            let raw = &page[o..o + NAME_LEN];
            let end = raw.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
            let name = std::str::from_utf8(&raw[..end])
                .map_err(|_| format!("leg {i}: name is not UTF-8"))?
                .to_string();
            if name.is_empty() {
                return Err(format!("leg {i}: empty name"));
            }
            let state = match page[o + 64] {
                0 => LegState::Healthy,
                1 => LegState::Syncing,
                2 => LegState::Faulted,
                s => return Err(format!("leg {name}: bad state {s}")),
            };
            legs.push(LegRecord {
                name,
                state,
                cursor: u64at(o + 72).min(regions),
                faulted_at: u64at(o + 80),
            });
        }
        Ok(Header {
            region_size,
            regions,
            size,
            generation,
            legs,
        })
    }
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("mirror bitmap {}: {why}", path.display()),
    )
}

/// Read the newest valid header and the bitmap words (bit i = word i/64, bit i%64).
pub fn load(file: &File, path: &Path) -> Result<(Header, Vec<u64>)> {
    let mut pages = [vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]];
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("mirror bitmap {}", path.display()), e))?
        .len();
    if len < BITMAP_OFF {
        return Err(bad(
            path,
            format!("file is {len} bytes, too short for a header"),
        ));
    }
    let mut results = Vec::with_capacity(2);
    for (i, p) in pages.iter_mut().enumerate() {
        file.read_exact_at(p, i as u64 * PAGE)
            .map_err(|e| Error::io(format!("mirror bitmap {}", path.display()), e))?;
        results.push(Header::decode(p));
    }
    let h = match (&results[0], &results[1]) {
        (Ok(a), Ok(b)) => {
            if a.generation >= b.generation {
                a.clone()
            } else {
                b.clone()
            }
        }
        (Ok(a), Err(_)) => a.clone(),
        (Err(_), Ok(b)) => b.clone(),
        (Err(a), Err(b)) => {
            return Err(bad(
                path,
                format!("no valid header (page 0: {a}; page 1: {b})"),
            ));
        }
    };
    let npages = bitmap_pages(h.regions);
    if len < BITMAP_OFF + npages * PAGE {
        return Err(bad(
            path,
            format!(
                "file is {len} bytes, too short for {} regions ({} bitmap pages)",
                h.regions, npages
            ),
        ));
    }
    let mut bytes = vec![0u8; (npages * PAGE) as usize];
    file.read_exact_at(&mut bytes, BITMAP_OFF)
        .map_err(|e| Error::io(format!("mirror bitmap {}", path.display()), e))?;
    let nwords = h.regions.div_ceil(64) as usize;
    let mut words = vec![0u64; nwords];
    for (w, out) in words.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[w * 8..w * 8 + 8]);
        *out = u64::from_le_bytes(b);
    }
    // Bits past the last region mean nothing.
    let tail = h.regions % 64;
    if tail != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << tail) - 1;
        }
    }
    Ok((h, words))
}

/// Create a new bitmap file: both header copies and zeroed bitmap pages, synced.
pub fn create(file: &File, path: &Path, h: &Header) -> Result<()> {
    let ctx = |e| Error::io(format!("mirror bitmap {}", path.display()), e);
    let npages = bitmap_pages(h.regions);
    file.set_len(BITMAP_OFF + npages * PAGE).map_err(ctx)?;
    let mut page = vec![0u8; PAGE as usize];
    let mut h0 = h.clone();
    for i in 0..2u64 {
        h0.generation = h.generation + i;
        h0.encode(&mut page);
        file.write_all_at(&page, (h0.generation % 2) * PAGE)
            .map_err(ctx)?;
    }
    file.sync_all().map_err(ctx)?;
    Ok(())
}

/// Read a bitmap file without opening a mirror (for tests and tools).
pub fn read_bitmap(path: &Path) -> Result<BitmapInfo> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("mirror bitmap {}", path.display()), e))?;
    let (h, words) = load(&file, path)?;
    let mut dirty = Vec::new();
    for (w, &word) in words.iter().enumerate() {
        let mut b = word;
        while b != 0 {
            let i = b.trailing_zeros() as u64;
            dirty.push(w as u64 * 64 + i);
            b &= b - 1;
        }
    }
    Ok(BitmapInfo {
        region_size: h.region_size,
        regions: h.regions,
        size: h.size,
        generation: h.generation,
        dirty,
        legs: h.legs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_crc() {
        let h = Header {
            region_size: 1 << 20,
            regions: 10,
            size: 10 << 20,
            generation: 7,
            legs: vec![
                LegRecord {
                    name: "a".into(),
                    state: LegState::Healthy,
                    cursor: 10,
                    faulted_at: 0,
                },
                LegRecord {
                    name: "b".repeat(64),
                    state: LegState::Faulted,
                    cursor: 3,
                    faulted_at: 12345,
                },
            ],
        };
        let mut p = vec![0u8; PAGE as usize];
        h.encode(&mut p);
        assert_eq!(Header::decode(&p).unwrap(), h);
        p[100] ^= 1;
        assert!(Header::decode(&p).unwrap_err().contains("checksum"));
        p[0] = b'X';
        assert!(Header::decode(&p).unwrap_err().contains("magic"));
    }
}
