//! nvmux pools and thin volumes.
//!
//! Today this room holds:
//! * `format`: the pool format, version 1, i.e. the encoding and validation of every
//!   metadata block, specified byte by byte in `docs/format.md`;
//! * `journal`: the circular metadata journal, with commit (write + sync) and crash-safe
//!   replay of whole transactions, over a `MetaIo` device.
//!
//! The allocator, thin volumes, checkpoints and `pool check` build on them.

pub mod format;
pub mod journal;
mod park;
pub mod pool;
pub mod thin;

pub use pool::{check, CheckReport, Pool, PoolOptions, PoolUsage, VolumeInfo};
pub use thin::ThinDevice;

/// Fuzz entry point: decode arbitrary bytes as every kind of metadata block. Decoding must
/// never panic, and whatever decodes must encode back to the same bytes.
#[doc(hidden)]
pub fn fuzz_metadata(data: &[u8]) {
    use format::*;
    let mut blk = [0u8; BLOCK];
    let n = data.len().min(BLOCK);
    blk[..n].copy_from_slice(&data[..n]);
    // Let the fuzzer reach past the checksum: a byte after the block asks for a sealed block.
    if data.get(BLOCK).is_some_and(|b| b & 1 == 1) {
        let c = nvmux_core::crc32c::crc32c(&blk[..BLOCK - 4]);
        blk[BLOCK - 4..].copy_from_slice(&c.to_le_bytes());
    }
    if let Ok(s) = Superblock::decode(&blk, 0) {
        assert_eq!(Superblock::decode(&s.encode(), 0).as_ref(), Ok(&s));
    }
    if let Ok(j) = JournalBlock::decode(&blk, 0) {
        let again = j.encode().expect("a decoded journal block encodes");
        assert_eq!(JournalBlock::decode(&again, 0).as_ref(), Ok(&j));
    }
    if let Ok(t) =
        VolumeTableBlock::decode(&blk, u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]))
    {
        let again = t.encode().expect("a decoded volume table block encodes");
        assert_eq!(VolumeTableBlock::decode(&again, t.index).as_ref(), Ok(&t));
    }
    if let Ok(o) = OwnerBlock::decode(&blk, u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]])) {
        assert_eq!(OwnerBlock::decode(&o.encode(), o.index).as_ref(), Ok(&o));
    }
    let _ = current_superblock(&blk, &blk);
}

#[cfg(test)]
mod tests {
    use super::format::*;

    /// Write the seed corpus from the encoders:
    /// `cargo test -p nvmux-volume -- --ignored write_fuzz_seeds`.
    #[test]
    #[ignore = "regenerates fuzz/corpus/pool_metadata/seed-*"]
    fn write_fuzz_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/pool_metadata");
        std::fs::create_dir_all(&dir).expect("corpus dir");
        let sb = layout([9; 16], 1 << 30, 65536, 1 << 20, 1).expect("layout");
        let j = JournalBlock {
            seq: 7,
            pool_uuid: [9; 16],
            commit: true,
            prior_durable: false,
            records: vec![
                Record {
                    cluster: 4,
                    owner: Owner::Vol { vol: 1, index: 0 },
                },
                Record {
                    cluster: 5,
                    owner: Owner::Dirty,
                },
            ],
        };
        let mut entries = vec![None; VOLUMES_PER_BLOCK];
        entries[0] = Some(VolumeEntry {
            id: 1,
            flags: 0,
            size: 1 << 30,
            parent: 0,
            parent_limit: 0,
            name: "vm1".into(),
            uuid: [3; 16],
        });
        let t = VolumeTableBlock { index: 0, entries };
        for (name, bytes) in [
            ("superblock", sb.encode().to_vec()),
            ("journal", j.encode().expect("journal").to_vec()),
            ("voltab", t.encode().expect("voltab").to_vec()),
            (
                "owner",
                OwnerBlock {
                    index: 0,
                    owners: vec![Owner::Vol { vol: 1, index: 2 }, Owner::Dirty, Owner::Free],
                }
                .encode()
                .to_vec(),
            ),
        ] {
            // The trailing 1 asks the harness to keep the checksum valid after mutation.
            let sealed: Vec<u8> = bytes.iter().copied().chain([1]).collect();
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
            std::fs::write(dir.join(format!("seed-{name}-sealed")), sealed).expect("write seed");
        }
    }

    #[test]
    fn replay_fuzz_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/pool_metadata");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("corpus directory") {
            super::fuzz_metadata(&std::fs::read(e.expect("entry").path()).expect("read seed"));
            n += 1;
        }
        assert!(n > 0, "empty corpus in {}", dir.display());
    }
}

#[cfg(test)]
mod pool_tests;
