//! Pool format version 1: encoding and validation of the metadata blocks.
//!
//! Everything is little-endian and lives in 4096-byte blocks, each ending in a CRC-32C of
//! the bytes before it. `docs/format.md` describes each block byte by byte; this module is
//! the code for that description. Decoding never trusts the input: every field is
//! range-checked, and an error names the block, the field and what was wrong, so that
//! `pool check` and the daemon can say where a pool is damaged.

use nvmux_core::crc32c::crc32c;

/// Size of every metadata block.
pub const BLOCK: usize = 4096;
/// Bytes covered by a block's checksum (the checksum sits in the last 4 bytes).
const CRC_AT: usize = BLOCK - 4;

pub const SUPER_MAGIC: [u8; 8] = *b"NVMUXPL\0";
pub const JOURNAL_MAGIC: [u8; 4] = *b"NVJB";
pub const VOLTAB_MAGIC: [u8; 4] = *b"NVVT";
pub const OWNER_MAGIC: [u8; 4] = *b"NVOT";
pub const FORMAT_VERSION: u32 = 1;

pub const MIN_CLUSTER: u32 = 4096;
pub const MAX_CLUSTER: u32 = 1 << 20;

/// Journal record size and how many fit in one journal block.
pub const RECORD_BYTES: usize = 24;
const JOURNAL_HDR: usize = 32;
pub const RECORDS_PER_BLOCK: usize = (CRC_AT - JOURNAL_HDR) / RECORD_BYTES;

/// Volume table entry size and how many fit in one volume table block.
pub const VOLUME_BYTES: usize = 128;
const VOLTAB_HDR: usize = 16;
pub const VOLUMES_PER_BLOCK: usize = (CRC_AT - VOLTAB_HDR) / VOLUME_BYTES;
/// Longest volume name, in bytes.
pub const NAME_BYTES: usize = 64;

/// Owner table entries (u64) per owner table block.
const OWNER_HDR: usize = 16;
pub const OWNERS_PER_BLOCK: usize = (CRC_AT - OWNER_HDR) / 8;

/// What is wrong with a metadata block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{block}: buffer is {got} bytes, a metadata block is {BLOCK}")]
    Size { block: String, got: usize },
    #[error("{block}: bad magic {found:02x?}: not nvmux pool metadata")]
    Magic { block: String, found: Vec<u8> },
    #[error("{block}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the block is damaged")]
    Checksum {
        block: String,
        stored: u32,
        computed: u32,
    },
    #[error("{block}: format version {found}; this nvmux reads version {FORMAT_VERSION}")]
    Version { block: String, found: u32 },
    #[error("{block}: field {field} at byte {offset}: {why}")]
    Field {
        block: String,
        field: &'static str,
        offset: usize,
        why: String,
    },
}

impl FormatError {
    /// Name the table copy the block was read from.
    pub fn in_table_copy(mut self, copy: u32) -> Self {
        let (FormatError::Size { block, .. }
        | FormatError::Magic { block, .. }
        | FormatError::Checksum { block, .. }
        | FormatError::Version { block, .. }
        | FormatError::Field { block, .. }) = &mut self;
        block.push_str(&format!(" (table copy {copy})"));
        self
    }
}

fn field(block: &str, field: &'static str, offset: usize, why: impl Into<String>) -> FormatError {
    FormatError::Field {
        block: block.to_string(),
        field,
        offset,
        why: why.into(),
    }
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Check a block's size, magic and checksum.
fn check_block(b: &[u8], name: &str, magic: &[u8]) -> Result<(), FormatError> {
    if b.len() != BLOCK {
        return Err(FormatError::Size {
            block: name.into(),
            got: b.len(),
        });
    }
    if b[..magic.len()] != *magic {
        return Err(FormatError::Magic {
            block: name.into(),
            found: b[..magic.len()].to_vec(),
        });
    }
    let stored = u32_at(b, CRC_AT);
    let computed = crc32c(&b[..CRC_AT]);
    if stored != computed {
        return Err(FormatError::Checksum {
            block: name.into(),
            stored,
            computed,
        });
    }
    Ok(())
}

/// A table block's `index` field must match where it was read.
fn check_index(b: &[u8], name: &str, index: u32) -> Result<(), FormatError> {
    if u32_at(b, 4) != index {
        return Err(field(
            name,
            "index",
            4,
            format!("block says it is number {}", u32_at(b, 4)),
        ));
    }
    Ok(())
}

fn seal(b: &mut [u8; BLOCK]) {
    let c = crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&c.to_le_bytes());
}

/// The superblock. Two copies live in blocks 0 and 1; the valid copy with the higher
/// generation is current, so rewriting the older copy is an atomic commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub generation: u64,
    pub cluster_size: u32,
    /// Which copy of the tables (volume table + owner table) is current: 0 or 1.
    pub active_tables: u32,
    /// Bytes of the device the pool uses.
    pub pool_bytes: u64,
    /// Data clusters (cluster 0 is the first data cluster, at `data_offset`).
    pub n_clusters: u64,
    /// Byte offset and length of the circular journal.
    pub journal_offset: u64,
    pub journal_bytes: u64,
    /// Replay starts at this journal sequence number, in the block at this offset
    /// (relative to `journal_offset`).
    pub journal_head_seq: u64,
    pub journal_head_offset: u64,
    /// Byte offset of table copy 0; copy 1 follows it. A copy is the volume table
    /// (`voltab_bytes`) followed by the owner table (`owner_bytes`).
    pub tables_offset: u64,
    pub voltab_bytes: u64,
    pub owner_bytes: u64,
    /// Byte offset of data cluster 0.
    pub data_offset: u64,
}

impl Superblock {
    pub fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..8].copy_from_slice(&SUPER_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        let put =
            |b: &mut [u8; BLOCK], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut b, 32, self.generation);
        b[40..44].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.active_tables.to_le_bytes());
        put(&mut b, 48, self.pool_bytes);
        put(&mut b, 56, self.n_clusters);
        put(&mut b, 64, self.journal_offset);
        put(&mut b, 72, self.journal_bytes);
        put(&mut b, 80, self.journal_head_seq);
        put(&mut b, 88, self.journal_head_offset);
        put(&mut b, 96, self.tables_offset);
        put(&mut b, 104, self.voltab_bytes);
        put(&mut b, 112, self.owner_bytes);
        put(&mut b, 120, self.data_offset);
        seal(&mut b);
        b
    }

    /// Decode and validate copy `copy` (0 or 1, for messages).
    pub fn decode(b: &[u8], copy: usize) -> Result<Superblock, FormatError> {
        let name = format!("superblock copy {copy} (byte {})", copy * BLOCK);
        check_block(b, &name, &SUPER_MAGIC)?;
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version {
                block: name,
                found: version,
            });
        }
        if u32_at(b, 12) != BLOCK as u32 {
            return Err(field(
                &name,
                "header_size",
                12,
                format!("{} (must be {BLOCK})", u32_at(b, 12)),
            ));
        }
        if u32_at(b, 44) > 1 {
            return Err(field(
                &name,
                "active_tables",
                44,
                format!("{} (must be 0 or 1)", u32_at(b, 44)),
            ));
        }
        if let Some(i) = b[128..CRC_AT].iter().position(|&c| c != 0) {
            return Err(field(
                &name,
                "reserved",
                128 + i,
                "reserved bytes are not zero",
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let s = Superblock {
            uuid,
            generation: u64_at(b, 32),
            cluster_size: u32_at(b, 40),
            active_tables: u32_at(b, 44),
            pool_bytes: u64_at(b, 48),
            n_clusters: u64_at(b, 56),
            journal_offset: u64_at(b, 64),
            journal_bytes: u64_at(b, 72),
            journal_head_seq: u64_at(b, 80),
            journal_head_offset: u64_at(b, 88),
            tables_offset: u64_at(b, 96),
            voltab_bytes: u64_at(b, 104),
            owner_bytes: u64_at(b, 112),
            data_offset: u64_at(b, 120),
        };
        s.validate(&name)?;
        Ok(s)
    }

    /// Check that the regions are sane and do not overlap.
    fn validate(&self, name: &str) -> Result<(), FormatError> {
        let cs = self.cluster_size;
        if !(cs.is_power_of_two() && (MIN_CLUSTER..=MAX_CLUSTER).contains(&cs)) {
            return Err(field(
                name,
                "cluster_size",
                40,
                format!("{cs} is not a power of two in 4 KiB..=1 MiB"),
            ));
        }
        let blk = BLOCK as u64;
        if self.voltab_bytes == 0 || self.owner_bytes == 0 {
            return Err(field(name, "voltab_bytes", 104, "a table is empty"));
        }
        let copy = self.voltab_bytes.saturating_add(self.owner_bytes);
        let regions = [
            ("journal", 64, self.journal_offset, self.journal_bytes),
            ("tables", 96, self.tables_offset, copy.saturating_mul(2)),
        ];
        let mut spans = vec![(0u64, 2 * blk, "superblocks")];
        for (what, off, start, len) in regions {
            if start % blk != 0 || len % blk != 0 || len == 0 {
                return Err(field(
                    name,
                    what_field(what),
                    off,
                    format!("{what} region {start}+{len} is not a non-empty run of whole blocks"),
                ));
            }
            let end = start
                .checked_add(len)
                .filter(|&e| e <= self.data_offset)
                .ok_or_else(|| {
                    field(
                        name,
                        what_field(what),
                        off,
                        format!(
                            "{what} region {start}+{len} runs past the data area at {}",
                            self.data_offset
                        ),
                    )
                })?;
            spans.push((start, end, what));
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(field(
                    name,
                    "layout",
                    96,
                    format!("{} and {} overlap", w[0].2, w[1].2),
                ));
            }
        }
        if self.owner_bytes / blk < self.n_clusters.div_ceil(OWNERS_PER_BLOCK as u64) {
            return Err(field(
                name,
                "owner_bytes",
                112,
                format!(
                    "{} bytes cannot hold {} clusters",
                    self.owner_bytes, self.n_clusters
                ),
            ));
        }
        if !self.data_offset.is_multiple_of(cs as u64) {
            return Err(field(
                name,
                "data_offset",
                120,
                format!("{} is not cluster-aligned", self.data_offset),
            ));
        }
        let data_end = self
            .n_clusters
            .checked_mul(cs as u64)
            .and_then(|n| n.checked_add(self.data_offset));
        if data_end.is_none_or(|e| e > self.pool_bytes) {
            return Err(field(
                name,
                "n_clusters",
                56,
                format!(
                    "{} clusters of {cs} bytes at {} do not fit in {} bytes",
                    self.n_clusters, self.data_offset, self.pool_bytes
                ),
            ));
        }
        if !self.journal_head_offset.is_multiple_of(blk)
            || self.journal_head_offset >= self.journal_bytes
        {
            return Err(field(
                name,
                "journal_head_offset",
                88,
                format!(
                    "{} is not a block inside the journal",
                    self.journal_head_offset
                ),
            ));
        }
        Ok(())
    }
}

fn what_field(what: &str) -> &'static str {
    match what {
        "journal" => "journal_offset",
        _ => "tables_offset",
    }
}

/// Pick the current superblock: the valid copy with the higher generation. Returns it and
/// the errors of an invalid copy (for `pool check`).
pub fn current_superblock(
    copy0: &[u8],
    copy1: &[u8],
) -> Result<(Superblock, Vec<FormatError>), Vec<FormatError>> {
    let a = Superblock::decode(copy0, 0);
    let b = Superblock::decode(copy1, 1);
    match (a, b) {
        (Ok(a), Ok(b)) if a.uuid != b.uuid => Err(vec![field(
            "superblocks",
            "uuid",
            16,
            "the two copies belong to different pools",
        )]),
        (Ok(a), Ok(b)) => Ok((if b.generation > a.generation { b } else { a }, vec![])),
        (Ok(a), Err(e)) | (Err(e), Ok(a)) => Ok((a, vec![e])),
        (Err(e0), Err(e1)) => Err(vec![e0, e1]),
    }
}

/// Who owns a data cluster: the owner table's entry, and a journal record's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// Free, and its content is known to be zero: it may be handed out.
    Free,
    /// Free, but it may hold old data: it is zeroed before it is handed out.
    Dirty,
    /// Virtual cluster `index` of volume `vol`.
    Vol { vol: u32, index: u32 },
}

const OWNER_DIRTY: u64 = u64::MAX;

impl Owner {
    /// The on-disk u64: 0 free, all ones dirty, else `vol << 32 | index`.
    pub fn encode(self) -> u64 {
        match self {
            Owner::Free => 0,
            Owner::Dirty => OWNER_DIRTY,
            Owner::Vol { vol, index } => ((vol as u64) << 32) | index as u64,
        }
    }
    pub fn decode(v: u64) -> Option<Owner> {
        match v {
            0 => Some(Owner::Free),
            OWNER_DIRTY => Some(Owner::Dirty),
            _ => {
                let vol = (v >> 32) as u32;
                (vol != 0 && vol != u32::MAX).then_some(Owner::Vol {
                    vol,
                    index: v as u32,
                })
            }
        }
    }
}

/// A journal record: data cluster `cluster` now has owner `owner`. Records are absolute
/// values, so replaying one twice is harmless.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub cluster: u64,
    pub owner: Owner,
}

const OP_OWNER_SET: u8 = 1;

/// One block of the journal: records of one sequence number. A transaction is one or more
/// consecutive blocks; the last has `commit` set. Replay applies whole transactions only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalBlock {
    pub seq: u64,
    pub pool_uuid: [u8; 16],
    pub commit: bool,
    /// Every block before this one was durable (synced) when it was written: a damaged
    /// block before it is corruption, not an unsynced tail a power cut tore.
    pub prior_durable: bool,
    pub records: Vec<Record>,
}

impl JournalBlock {
    pub fn encode(&self) -> Result<[u8; BLOCK], FormatError> {
        if self.records.len() > RECORDS_PER_BLOCK {
            return Err(field(
                "journal block",
                "n_records",
                4,
                format!(
                    "{} records; at most {RECORDS_PER_BLOCK} fit",
                    self.records.len()
                ),
            ));
        }
        let mut b = [0u8; BLOCK];
        b[0..4].copy_from_slice(&JOURNAL_MAGIC);
        b[4..6].copy_from_slice(&(self.records.len() as u16).to_le_bytes());
        b[6..8].copy_from_slice(
            &(self.commit as u16 | (self.prior_durable as u16) << 1).to_le_bytes(),
        );
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..32].copy_from_slice(&self.pool_uuid);
        for (i, r) in self.records.iter().enumerate() {
            let o = JOURNAL_HDR + i * RECORD_BYTES;
            let (a, y) = match r.owner {
                Owner::Free => (0, 0),
                Owner::Dirty => (0, 1),
                Owner::Vol { vol, index } => (vol, index as u64),
            };
            let (op, x) = (OP_OWNER_SET, r.cluster);
            b[o] = op;
            b[o + 4..o + 8].copy_from_slice(&a.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&x.to_le_bytes());
            b[o + 16..o + 24].copy_from_slice(&y.to_le_bytes());
        }
        seal(&mut b);
        Ok(b)
    }

    /// Decode the journal block at `offset` (for messages).
    pub fn decode(b: &[u8], offset: u64) -> Result<JournalBlock, FormatError> {
        let name = format!("journal block at journal offset {offset}");
        check_block(b, &name, &JOURNAL_MAGIC)?;
        let n = u16_at(b, 4) as usize;
        if n > RECORDS_PER_BLOCK {
            return Err(field(
                &name,
                "n_records",
                4,
                format!("{n} records; at most {RECORDS_PER_BLOCK} fit"),
            ));
        }
        let flags = u16_at(b, 6);
        if flags & !3 != 0 {
            return Err(field(
                &name,
                "flags",
                6,
                format!("{flags:#x}: unknown flags"),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let mut records = Vec::with_capacity(n);
        for i in 0..n {
            let o = JOURNAL_HDR + i * RECORD_BYTES;
            let (op, a, x, y) = (b[o], u32_at(b, o + 4), u64_at(b, o + 8), u64_at(b, o + 16));
            if b[o + 1..o + 4] != [0, 0, 0] {
                return Err(field(
                    &name,
                    "record padding",
                    o + 1,
                    format!("record {i}: reserved bytes are not zero"),
                ));
            }
            let owner = match (a, y) {
                (0, 0) => Some(Owner::Free),
                (0, 1) => Some(Owner::Dirty),
                (vol, index) if vol != 0 && vol != u32::MAX => u32::try_from(index)
                    .ok()
                    .map(|index| Owner::Vol { vol, index }),
                _ => None,
            };
            records.push(match (op, owner) {
                (OP_OWNER_SET, Some(owner)) => Record { cluster: x, owner },
                (OP_OWNER_SET, None) => {
                    return Err(field(
                        &name,
                        "record",
                        o,
                        format!("record {i}: owner (volume {a}, cluster {y}) is invalid"),
                    ))
                }
                (other, _) => {
                    return Err(field(
                        &name,
                        "record op",
                        o,
                        format!("record {i}: unknown op {other}"),
                    ))
                }
            });
        }
        Ok(JournalBlock {
            seq: u64_at(b, 8),
            pool_uuid: uuid,
            commit: flags & 1 != 0,
            prior_durable: flags & 2 != 0,
            records,
        })
    }
}

/// A volume (a thin volume, or a snapshot of one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeEntry {
    /// Non-zero for a used slot.
    pub id: u32,
    /// Bit 0: snapshot (read-only). Other bits reserved.
    pub flags: u32,
    /// Size in bytes (a multiple of 512).
    pub size: u64,
    /// Id of the snapshot this volume reads through to, 0 for none.
    pub parent: u32,
    /// Bytes at the start of the volume where unmapped clusters read from `parent`; past
    /// it they read as zeros (a shrink lowers it, so a later grow never exposes old data).
    pub parent_limit: u64,
    pub name: String,
    pub uuid: [u8; 16],
}

pub const VOLUME_SNAPSHOT: u32 = 1;
/// Deleted by the user but kept because clones still read through it.
pub const VOLUME_HIDDEN: u32 = 2;

/// One block of the volume table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeTableBlock {
    pub index: u32,
    pub entries: Vec<Option<VolumeEntry>>,
}

impl VolumeTableBlock {
    pub fn encode(&self) -> Result<[u8; BLOCK], FormatError> {
        let name = format!("volume table block {}", self.index);
        if self.entries.len() > VOLUMES_PER_BLOCK {
            return Err(field(
                &name,
                "entries",
                VOLTAB_HDR,
                format!(
                    "{} entries; at most {VOLUMES_PER_BLOCK} fit",
                    self.entries.len()
                ),
            ));
        }
        let mut b = [0u8; BLOCK];
        b[0..4].copy_from_slice(&VOLTAB_MAGIC);
        b[4..8].copy_from_slice(&self.index.to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let Some(e) = e else { continue };
            let o = VOLTAB_HDR + i * VOLUME_BYTES;
            if e.id == 0
                || e.name.is_empty()
                || e.name.len() > NAME_BYTES
                || e.name.as_bytes().contains(&0)
            {
                return Err(field(&name, "volume", o, format!("entry {i}: id must be non-zero and the name 1-{NAME_BYTES} bytes without NUL")));
            }
            b[o..o + 4].copy_from_slice(&e.id.to_le_bytes());
            b[o + 4..o + 8].copy_from_slice(&e.flags.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&e.size.to_le_bytes());
            b[o + 16..o + 20].copy_from_slice(&e.parent.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&e.parent_limit.to_le_bytes());
            b[o + 32..o + 48].copy_from_slice(&e.uuid);
            b[o + 48..o + 48 + e.name.len()].copy_from_slice(e.name.as_bytes());
        }
        seal(&mut b);
        Ok(b)
    }

    pub fn decode(b: &[u8], index: u32) -> Result<VolumeTableBlock, FormatError> {
        let name = format!("volume table block {index}");
        check_block(b, &name, &VOLTAB_MAGIC)?;
        check_index(b, &name, index)?;
        if u64_at(b, 8) != 0 {
            return Err(field(&name, "reserved", 8, "reserved bytes are not zero"));
        }
        let mut entries = Vec::with_capacity(VOLUMES_PER_BLOCK);
        for i in 0..VOLUMES_PER_BLOCK {
            let o = VOLTAB_HDR + i * VOLUME_BYTES;
            let id = u32_at(b, o);
            if id == 0 {
                if b[o..o + VOLUME_BYTES].iter().any(|&c| c != 0) {
                    return Err(field(
                        &name,
                        "volume",
                        o,
                        format!("entry {i}: free slot is not all zero"),
                    ));
                }
                entries.push(None);
                continue;
            }
            if b[o + 112..o + VOLUME_BYTES].iter().any(|&c| c != 0) || u32_at(b, o + 20) != 0 {
                return Err(field(
                    &name,
                    "volume reserved",
                    o + 112,
                    format!("entry {i}: reserved bytes are not zero"),
                ));
            }
            let flags = u32_at(b, o + 4);
            if flags & !(VOLUME_SNAPSHOT | VOLUME_HIDDEN) != 0 {
                return Err(field(
                    &name,
                    "volume flags",
                    o + 4,
                    format!("entry {i}: unknown flags {flags:#x}"),
                ));
            }
            let size = u64_at(b, o + 8);
            if !size.is_multiple_of(512) {
                return Err(field(
                    &name,
                    "volume size",
                    o + 8,
                    format!("entry {i}: size {size} is not a multiple of 512"),
                ));
            }
            let raw = &b[o + 48..o + 48 + NAME_BYTES];
            let len = raw.iter().position(|&c| c == 0).unwrap_or(NAME_BYTES);
            let Ok(vname) = std::str::from_utf8(&raw[..len]) else {
                return Err(field(
                    &name,
                    "volume name",
                    o + 48,
                    format!("entry {i}: name is not UTF-8"),
                ));
            };
            if vname.is_empty() || raw[len..].iter().any(|&c| c != 0) {
                return Err(field(
                    &name,
                    "volume name",
                    o + 48,
                    format!("entry {i}: name is empty or not NUL-padded"),
                ));
            }
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&b[o + 32..o + 48]);
            entries.push(Some(VolumeEntry {
                id,
                flags,
                size,
                parent: u32_at(b, o + 16),
                parent_limit: u64_at(b, o + 24),
                name: vname.to_string(),
                uuid,
            }));
        }
        Ok(VolumeTableBlock { index, entries })
    }
}

/// One block of the owner table: who owns each of `OWNERS_PER_BLOCK` data clusters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerBlock {
    pub index: u32,
    pub owners: Vec<Owner>,
}

impl OwnerBlock {
    /// Encode owners (at most `OWNERS_PER_BLOCK`; missing ones are free).
    pub fn encode_raw(index: u32, owners: &[u64]) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..4].copy_from_slice(&OWNER_MAGIC);
        b[4..8].copy_from_slice(&index.to_le_bytes());
        for (i, v) in owners.iter().take(OWNERS_PER_BLOCK).enumerate() {
            let o = OWNER_HDR + i * 8;
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        seal(&mut b);
        b
    }

    pub fn encode(&self) -> [u8; BLOCK] {
        let raw: Vec<u64> = self.owners.iter().map(|o| o.encode()).collect();
        Self::encode_raw(self.index, &raw)
    }

    pub fn decode(b: &[u8], index: u32) -> Result<OwnerBlock, FormatError> {
        let name = format!("owner table block {index}");
        check_block(b, &name, &OWNER_MAGIC)?;
        check_index(b, &name, index)?;
        if u64_at(b, 8) != 0 || u32_at(b, CRC_AT - 4) != 0 {
            return Err(field(&name, "reserved", 8, "reserved bytes are not zero"));
        }
        let mut owners = Vec::with_capacity(OWNERS_PER_BLOCK);
        for i in 0..OWNERS_PER_BLOCK {
            let o = OWNER_HDR + i * 8;
            let v = u64_at(b, o);
            owners.push(Owner::decode(v).ok_or_else(|| {
                field(
                    &name,
                    "owner",
                    o,
                    format!(
                        "entry {i} (cluster {}): {v:#x} names volume 0",
                        index as usize * OWNERS_PER_BLOCK + i
                    ),
                )
            })?);
        }
        Ok(OwnerBlock { index, owners })
    }
}

impl Superblock {
    pub fn voltab_blocks(&self) -> u64 {
        self.voltab_bytes / BLOCK as u64
    }
    pub fn owner_blocks(&self) -> u64 {
        self.owner_bytes / BLOCK as u64
    }
    /// Byte offset of table block `i` (volume table blocks first, then owner table
    /// blocks) in table copy `copy`.
    pub fn table_block_at(&self, copy: u32, i: u64) -> u64 {
        self.tables_offset + copy as u64 * (self.voltab_bytes + self.owner_bytes) + i * BLOCK as u64
    }
    /// Byte offset of data cluster `c`.
    pub fn cluster_at(&self, c: u64) -> u64 {
        self.data_offset + c * self.cluster_size as u64
    }
}

/// The layout of a new pool on `pool_bytes` bytes: where each region goes.
pub fn layout(
    uuid: [u8; 16],
    pool_bytes: u64,
    cluster_size: u32,
    journal_bytes: u64,
    voltab_blocks: u64,
) -> Result<Superblock, FormatError> {
    let name = "new pool";
    if !(cluster_size.is_power_of_two() && (MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster_size)) {
        return Err(field(
            name,
            "cluster_size",
            40,
            format!("{cluster_size} is not a power of two in 4 KiB..=1 MiB"),
        ));
    }
    let blk = BLOCK as u64;
    let cs = cluster_size as u64;
    let round = |v: u64, to: u64| v.div_ceil(to) * to;
    let journal_bytes = round(journal_bytes.max(16 * blk), blk);
    let voltab_bytes = voltab_blocks.max(1) * blk;
    let journal_offset = 2 * blk;
    let tables_offset = journal_offset + journal_bytes;
    let owner_bytes_for = |n: u64| n.div_ceil(OWNERS_PER_BLOCK as u64).max(1) * blk;
    // Two table copies must cover every data cluster; solve for the largest n that fits.
    let mut n = pool_bytes.saturating_sub(tables_offset) / (cs + 16);
    loop {
        let owner_bytes = owner_bytes_for(n);
        let data_offset = round(tables_offset + 2 * (voltab_bytes + owner_bytes), cs);
        if n == 0 || data_offset + n * cs <= pool_bytes {
            let sb = Superblock {
                uuid,
                generation: 1,
                cluster_size,
                active_tables: 0,
                pool_bytes,
                n_clusters: n,
                journal_offset,
                journal_bytes,
                journal_head_seq: 1,
                journal_head_offset: 0,
                tables_offset,
                voltab_bytes,
                owner_bytes,
                data_offset,
            };
            if n == 0 {
                return Err(field(
                    name,
                    "pool_bytes",
                    48,
                    format!("{pool_bytes} bytes leave no room for data clusters"),
                ));
            }
            sb.validate(name)?;
            return Ok(sb);
        }
        n -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        layout([7; 16], 1 << 30, 65536, 1 << 20, 1).unwrap()
    }

    #[test]
    fn superblock_round_trip_and_layout() {
        let s = sb();
        assert_eq!(Superblock::decode(&s.encode(), 0).unwrap(), s);
        assert!(s.data_offset + s.n_clusters * 65536 <= 1 << 30);
        assert!(s.owner_blocks() * OWNERS_PER_BLOCK as u64 >= s.n_clusters);
        assert!(
            s.n_clusters > 16000,
            "most of the pool is data: {}",
            s.n_clusters
        );
    }

    #[test]
    fn corruption_is_found_and_located() {
        let mut b = sb().encode();
        b[60] ^= 1; // a bit of n_clusters
        match Superblock::decode(&b, 1) {
            Err(FormatError::Checksum { block, .. }) => assert!(block.contains("copy 1")),
            other => panic!("{other:?}"),
        }
        let mut b = sb().encode();
        b[0] = b'X';
        assert!(matches!(
            Superblock::decode(&b, 0),
            Err(FormatError::Magic { .. })
        ));
        // A field out of range with a valid checksum (a bug, or a crafted block).
        let mut s = sb();
        s.cluster_size = 3000;
        let e = Superblock::decode(&s.encode(), 0).unwrap_err();
        assert!(e.to_string().contains("cluster_size"), "{e}");
        let mut s = sb();
        s.journal_bytes = s.tables_offset; // journal overlaps the tables
        let e = Superblock::decode(&s.encode(), 0).unwrap_err();
        assert!(
            e.to_string().contains("overlap") || e.to_string().contains("past"),
            "{e}"
        );
    }

    #[test]
    fn newer_valid_copy_wins() {
        let a = sb();
        let mut b = a.clone();
        b.generation = 2;
        let (cur, errs) = current_superblock(&a.encode(), &b.encode()).unwrap();
        assert_eq!((cur.generation, errs.len()), (2, 0));
        let mut torn = b.encode();
        torn[100] ^= 0xff;
        let (cur, errs) = current_superblock(&a.encode(), &torn).unwrap();
        assert_eq!(
            (cur.generation, errs.len()),
            (1, 1),
            "a torn newer copy falls back to the older"
        );
    }

    #[test]
    fn journal_round_trip_and_limits() {
        let j = JournalBlock {
            seq: 42,
            pool_uuid: [7; 16],
            commit: true,
            prior_durable: false,
            records: vec![
                Record {
                    cluster: 1000,
                    owner: Owner::Vol { vol: 3, index: 9 },
                },
                Record {
                    cluster: 1,
                    owner: Owner::Dirty,
                },
                Record {
                    cluster: 2,
                    owner: Owner::Free,
                },
            ],
        };
        let b = j.encode().unwrap();
        assert_eq!(JournalBlock::decode(&b, 8192).unwrap(), j);
        let full = JournalBlock {
            records: vec![
                Record {
                    cluster: 1,
                    owner: Owner::Free
                };
                RECORDS_PER_BLOCK + 1
            ],
            ..j
        };
        assert!(full.encode().is_err());
        let mut bad = b;
        bad[JOURNAL_HDR] = 9; // unknown op, checksum fixed up
        let c = crc32c(&bad[..CRC_AT]);
        bad[CRC_AT..].copy_from_slice(&c.to_le_bytes());
        let e = JournalBlock::decode(&bad, 8192).unwrap_err();
        assert!(
            e.to_string().contains("unknown op 9") && e.to_string().contains("8192"),
            "{e}"
        );
    }

    #[test]
    fn volume_table_round_trip() {
        let v = VolumeEntry {
            id: 5,
            flags: VOLUME_SNAPSHOT,
            size: 10 << 30,
            parent: 2,
            parent_limit: 1 << 30,
            name: "db1@monday".into(),
            uuid: [1; 16],
        };
        let mut entries = vec![None; VOLUMES_PER_BLOCK];
        entries[3] = Some(v);
        let t = VolumeTableBlock { index: 0, entries };
        let b = t.encode().unwrap();
        assert_eq!(VolumeTableBlock::decode(&b, 0).unwrap(), t);
        assert!(
            VolumeTableBlock::decode(&b, 1).is_err(),
            "block number is checked"
        );
    }

    #[test]
    fn owner_block_round_trip_and_corruption() {
        let mut owners = vec![Owner::Free; OWNERS_PER_BLOCK];
        owners[0] = Owner::Vol { vol: 1, index: 7 };
        owners[5] = Owner::Dirty;
        owners[OWNERS_PER_BLOCK - 1] = Owner::Vol {
            vol: 9,
            index: u32::MAX,
        };
        let t = OwnerBlock { index: 3, owners };
        let b = t.encode();
        assert_eq!(OwnerBlock::decode(&b, 3).unwrap(), t);
        assert!(OwnerBlock::decode(&b, 4).is_err());
        let mut bad = b;
        bad[OWNER_HDR + 8 * 2] = 5; // volume 0, index 5
        let c = crc32c(&bad[..CRC_AT]);
        bad[CRC_AT..].copy_from_slice(&c.to_le_bytes());
        let e = OwnerBlock::decode(&bad, 3).unwrap_err().to_string();
        assert!(
            e.contains("owner table block 3") && e.contains("entry 2"),
            "{e}"
        );
    }

    #[test]
    fn tiny_pool_is_refused() {
        assert!(layout([0; 16], 64 << 10, 65536, 1 << 20, 1).is_err());
    }
}
