//! The metadata journal: a circular log of [`Record`]s in the pool's journal region.
//!
//! * [`JournalWriter::commit`] writes the buffered records as one transaction (one or more
//!   blocks with consecutive sequence numbers, the last flagged `commit`) and syncs. A
//!   flush completes only after this, so every write acknowledged before a completed flush
//!   is durable.
//! * [`replay`] reads from the head the superblock names, and returns the records of every
//!   whole transaction, in order. It stops at the first block that is damaged, belongs to
//!   another pool, or does not carry the next sequence number: a torn or unsynced tail is
//!   never applied, and blocks left over from an earlier lap of the ring never match.
//! * A checkpoint (tables written in place and synced) lets the head move forward with
//!   [`JournalWriter::set_head`]; until then the ring refuses to overwrite live blocks
//!   ([`JournalError::Full`]).

use std::io;

use crate::format::{FormatError, JournalBlock, Record, Superblock, BLOCK, RECORDS_PER_BLOCK};

/// Byte-addressed access to the device holding the pool's metadata.
pub trait MetaIo {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every completed write durable.
    fn sync(&self) -> io::Result<()>;
}

impl MetaIo for std::fs::File {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, off)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal is full: a checkpoint must move its head before more can be written")]
    Full,
    #[error("journal I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Where the journal is and where its live part begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    pub offset: u64,
    pub blocks: u64,
    pub uuid: [u8; 16],
}

impl Ring {
    pub fn of(sb: &Superblock) -> Ring {
        Ring {
            offset: sb.journal_offset,
            blocks: sb.journal_bytes / BLOCK as u64,
            uuid: sb.uuid,
        }
    }
    fn at(&self, pos: u64) -> u64 {
        self.offset + (pos % self.blocks) * BLOCK as u64
    }
}

/// The result of a replay: the committed records, and where writing continues.
#[derive(Debug, PartialEq, Eq)]
pub struct Replayed {
    pub records: Vec<Record>,
    pub transactions: u64,
    /// Sequence number and ring position of the next block to write.
    pub next_seq: u64,
    pub next_pos: u64,
}

/// Read the journal from `(head_seq, head_pos)` and return every whole transaction.
pub fn replay(
    io: &dyn MetaIo,
    ring: Ring,
    head_seq: u64,
    head_pos: u64,
) -> Result<Replayed, JournalError> {
    let mut out = Replayed {
        records: Vec::new(),
        transactions: 0,
        next_seq: head_seq,
        next_pos: head_pos % ring.blocks,
    };
    let mut txn: Vec<Record> = Vec::new();
    let mut seq = head_seq;
    let mut pos = head_pos % ring.blocks;
    let mut buf = vec![0u8; BLOCK];
    for _ in 0..ring.blocks {
        io.read_at(ring.at(pos), &mut buf)?;
        let Ok(b) = JournalBlock::decode(&buf, pos * BLOCK as u64) else {
            break;
        };
        if b.pool_uuid != ring.uuid || b.seq != seq {
            break;
        }
        txn.extend_from_slice(&b.records);
        seq += 1;
        pos = (pos + 1) % ring.blocks;
        if b.commit {
            out.records.append(&mut txn);
            out.transactions += 1;
            out.next_seq = seq;
            out.next_pos = pos;
        }
    }
    Ok(out)
}

/// After a replay stopped at `(seq, pos)`: is the block there damaged while a later one
/// that continues the sequence was written after it was durable? Then committed
/// transactions were lost to corruption, not to a torn tail, and the message says where.
pub fn damage_after(io: &dyn MetaIo, ring: Ring, seq: u64, pos: u64) -> Option<String> {
    let mut buf = vec![0u8; BLOCK];
    let valid = |buf: &mut Vec<u8>, p: u64, s: u64| -> bool {
        io.read_at(ring.at(p), buf).is_ok()
            && JournalBlock::decode(buf, (p % ring.blocks) * BLOCK as u64)
                .is_ok_and(|b| b.pool_uuid == ring.uuid && b.seq == s)
    };
    // Walk the (uncommitted) blocks that still carry the sequence, to the first that
    // does not.
    let mut s = seq;
    let mut p = pos;
    for _ in 0..ring.blocks {
        if !valid(&mut buf, p, s) {
            break;
        }
        s += 1;
        p += 1;
    }
    // Blocks that continue the sequence past the damaged one: corruption only if one
    // of them was written after the damaged block was durable (`prior_durable`).
    // Transactions written without a sync (see `write_unsynced`) reach the disk in any
    // order: a later one kept and an earlier one lost is a torn tail.
    let mut durable_after = false;
    for k in 1..ring.blocks {
        if !valid(&mut buf, p + k, s + k) {
            break;
        }
        if JournalBlock::decode(&buf, ((p + k) % ring.blocks) * BLOCK as u64)
            .is_ok_and(|b| b.prior_durable)
        {
            durable_after = true;
            break;
        }
    }
    if durable_after {
        io.read_at(ring.at(p), &mut buf).ok()?;
        let why = match JournalBlock::decode(&buf, (p % ring.blocks) * BLOCK as u64) {
            Err(e) => e.to_string(),
            Ok(b) => format!("sequence {} where {s} was expected", b.seq),
        };
        return Some(format!(
            "journal block at journal offset {} is damaged while later blocks are intact: {why}",
            (p % ring.blocks) * BLOCK as u64
        ));
    }
    None
}

/// Appends transactions to the ring.
pub struct JournalWriter {
    ring: Ring,
    head_pos: u64,
    next_seq: u64,
    next_pos: u64,
    pending: Vec<Record>,
    /// Every block written so far is durable (nothing written since the last sync).
    synced: bool,
}

impl JournalWriter {
    /// Continue after a replay (or on a fresh pool: `next` = the head).
    pub fn new(ring: Ring, head_pos: u64, next_seq: u64, next_pos: u64) -> Self {
        JournalWriter {
            ring,
            head_pos: head_pos % ring.blocks,
            next_seq,
            next_pos: next_pos % ring.blocks,
            pending: Vec::new(),
            // What replay read may be only in the page cache (after a kill -9).
            synced: false,
        }
    }

    pub fn push(&mut self, r: Record) {
        self.pending.push(r);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Blocks in use between the head and the write position.
    pub fn used_blocks(&self) -> u64 {
        (self.next_pos + self.ring.blocks - self.head_pos) % self.ring.blocks
    }

    /// Sequence number and position a checkpoint taken now would record as the new head.
    pub fn position(&self) -> (u64, u64) {
        (self.next_seq, self.next_pos)
    }

    /// Write the pending records as one transaction and sync. Nothing pending: no-op.
    pub fn commit(&mut self, io: &dyn MetaIo) -> Result<(), JournalError> {
        self.write(io, true)
    }

    /// Write the pending records as one transaction, without syncing: it survives the
    /// process (the page cache holds it; replay applies it after a `kill -9`), and
    /// reaches the device at the next sync, or earlier in any order with the other
    /// unsynced blocks. Nothing pending: no-op.
    pub fn write_unsynced(&mut self, io: &dyn MetaIo) -> Result<(), JournalError> {
        self.write(io, false)
    }

    /// Everything written so far is durable (the caller synced the device).
    pub fn mark_synced(&mut self) {
        self.synced = true;
    }

    fn write(&mut self, io: &dyn MetaIo, sync: bool) -> Result<(), JournalError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = self.pending.len().div_ceil(RECORDS_PER_BLOCK) as u64;
        // One block always stays free, so a full ring is never mistaken for an empty one.
        if self.used_blocks() + n >= self.ring.blocks {
            return Err(JournalError::Full);
        }
        let chunks: Vec<&[Record]> = self.pending.chunks(RECORDS_PER_BLOCK).collect();
        let last = chunks.len() - 1;
        for (i, c) in chunks.into_iter().enumerate() {
            let b = JournalBlock {
                seq: self.next_seq + i as u64,
                pool_uuid: self.ring.uuid,
                commit: i == last,
                // The first block after a sync, and the commit block of a multi-block
                // transaction (synced before it, below), vouch for every block before.
                prior_durable: (i == 0 && self.synced) || (i == last && last > 0),
                records: c.to_vec(),
            };
            if i == last && last > 0 {
                // The blocks before the commit block are durable before it is written,
                // as jbd2 does: a commit block on the disk then proves its transaction
                // whole, and damage before it is corruption (`damage_after`), never a
                // transaction torn by a power cut.
                io.sync()?;
            }
            io.write_at(self.ring.at(self.next_pos + i as u64), &b.encode()?)?;
        }
        self.synced = false;
        if sync {
            io.sync()?;
            self.synced = true;
        }
        self.next_seq += n;
        self.next_pos = (self.next_pos + n) % self.ring.blocks;
        self.pending.clear();
        Ok(())
    }

    /// Drop records not yet written (a checkpoint about to write the tables holds them).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
    }

    /// A checkpoint made everything before ring position `pos` durable in the tables (and
    /// the superblock now names `pos` as the head): those blocks may be overwritten.
    pub fn set_head(&mut self, pos: u64) {
        self.head_pos = pos % self.ring.blocks;
        self.synced = true;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A device that loses unsynced writes on `crash`, optionally keeping some of their
    /// 512-byte sectors (a torn write).
    pub(crate) struct CrashIo {
        durable: RefCell<Vec<u8>>,
        volatile: RefCell<Vec<u8>>,
        dirty: RefCell<Vec<u64>>, // sector numbers written since the last sync
    }

    impl CrashIo {
        pub(crate) fn new(len: usize) -> Self {
            CrashIo {
                durable: RefCell::new(vec![0; len]),
                volatile: RefCell::new(vec![0; len]),
                dirty: RefCell::new(Vec::new()),
            }
        }
        /// Lose unsynced sectors, except those for which `keep(i)` is true.
        pub(crate) fn crash(&self, keep: impl Fn(usize) -> bool) {
            let mut d = self.durable.borrow_mut();
            let mut v = self.volatile.borrow_mut();
            for (i, &s) in self.dirty.borrow().iter().enumerate() {
                let r = s as usize * 512..s as usize * 512 + 512;
                if keep(i) {
                    d[r.clone()].copy_from_slice(&v[r]);
                }
            }
            v.copy_from_slice(&d);
            self.dirty.borrow_mut().clear();
        }
    }

    impl MetaIo for CrashIo {
        fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            let v = self.volatile.borrow();
            buf.copy_from_slice(&v[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, off: u64, buf: &[u8]) -> io::Result<()> {
            self.volatile.borrow_mut()[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            let first = off / 512;
            let last = (off + buf.len() as u64 - 1) / 512;
            self.dirty.borrow_mut().extend(first..=last);
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            self.durable
                .borrow_mut()
                .copy_from_slice(&self.volatile.borrow());
            self.dirty.borrow_mut().clear();
            Ok(())
        }
    }

    const UUID: [u8; 16] = [5; 16];

    fn ring(blocks: u64) -> Ring {
        Ring {
            offset: 8192,
            blocks,
            uuid: UUID,
        }
    }

    fn map(i: u64) -> Record {
        Record {
            cluster: i + 100,
            owner: crate::format::Owner::Vol {
                vol: 1,
                index: i as u32,
            },
        }
    }

    #[test]
    fn committed_transactions_survive_a_crash() {
        let io = CrashIo::new(8192 + 16 * BLOCK);
        let r = ring(16);
        let mut w = JournalWriter::new(r, 0, 1, 0);
        for t in 0..3 {
            for i in 0..(t * 100 + 1) {
                w.push(map(i));
            }
            w.commit(&io).unwrap();
        }
        // An uncommitted transaction in flight when the power goes.
        w.push(map(999));
        io.crash(|_| false);
        let got = replay(&io, r, 1, 0).unwrap();
        assert_eq!(got.transactions, 3);
        assert_eq!(got.records.len(), 1 + 101 + 201);
        assert_eq!(got.records[0], map(0));
        assert_eq!(got.next_seq, w.position().0);
        assert_eq!(got.next_pos, w.position().1);
    }

    #[test]
    fn a_torn_multi_block_transaction_is_not_applied() {
        let io = CrashIo::new(8192 + 16 * BLOCK);
        let r = ring(16);
        let mut w = JournalWriter::new(r, 0, 1, 0);
        w.push(map(1));
        w.commit(&io).unwrap();
        // The next transaction spans three blocks; make its writes unsynced by writing the
        // blocks by hand as commit would, then tear: keep only the first block's sectors.
        let recs: Vec<Record> = (0..(RECORDS_PER_BLOCK as u64 * 2 + 5)).map(map).collect();
        for (i, c) in recs.chunks(RECORDS_PER_BLOCK).enumerate() {
            let b = JournalBlock {
                seq: 2 + i as u64,
                pool_uuid: UUID,
                commit: i == 2,
                prior_durable: false,
                records: c.to_vec(),
            };
            io.write_at(r.at(1 + i as u64), &b.encode().unwrap())
                .unwrap();
        }
        io.crash(|sector| sector < 8); // the first block (8 sectors) reached the disk
        let got = replay(&io, r, 1, 0).unwrap();
        assert_eq!(
            got.records,
            vec![map(1)],
            "only the whole first transaction"
        );
        assert_eq!(
            (got.next_seq, got.next_pos),
            (2, 1),
            "writing resumes over the torn tail"
        );
        // A torn single block (half its sectors) fails its checksum and ends replay too.
        let b = JournalBlock {
            seq: 2,
            pool_uuid: UUID,
            commit: true,
            prior_durable: false,
            records: vec![map(7)],
        };
        io.write_at(r.at(1), &b.encode().unwrap()).unwrap();
        io.crash(|sector| sector % 2 == 0);
        assert_eq!(replay(&io, r, 1, 0).unwrap().records, vec![map(1)]);
    }

    /// Transactions written without a sync (allocating writes between flushes) reach the
    /// disk in any order: a later one kept and an earlier one lost is a torn tail, not
    /// corruption; after a sync, damage before a later block is corruption.
    #[test]
    fn unsynced_transactions_torn_out_of_order_are_a_torn_tail() {
        let io = CrashIo::new(8192 + 16 * BLOCK);
        let r = ring(16);
        let mut w = JournalWriter::new(r, 0, 1, 0);
        w.push(map(1));
        w.commit(&io).unwrap();
        w.push(map(2));
        w.write_unsynced(&io).unwrap();
        w.push(map(3));
        w.write_unsynced(&io).unwrap();
        // A kill -9: the page cache keeps both.
        assert_eq!(
            replay(&io, r, 1, 0).unwrap().records,
            vec![map(1), map(2), map(3)]
        );
        // A power cut that kept only the second unsynced block (position 2).
        io.crash(|sector| (16..24).contains(&sector));
        let got = replay(&io, r, 1, 0).unwrap();
        assert_eq!(got.records, vec![map(1)]);
        assert_eq!(damage_after(&io, r, got.next_seq, got.next_pos), None);
        // Synced, then rot in the first: the block written after the sync proves it.
        let mut w = JournalWriter::new(r, 0, got.next_seq, got.next_pos);
        w.push(map(4));
        w.commit(&io).unwrap();
        w.push(map(5));
        w.commit(&io).unwrap();
        let mut z = vec![0u8; BLOCK];
        io.read_at(r.at(1), &mut z).unwrap();
        z[100] ^= 1;
        io.write_at(r.at(1), &z).unwrap();
        io.sync().unwrap();
        let got = replay(&io, r, 1, 0).unwrap();
        assert!(damage_after(&io, r, got.next_seq, got.next_pos)
            .is_some_and(|m| m.contains("damaged while later blocks are intact")));
    }

    /// Found by the power-cut simulator: a multi-block transaction whose blocks reached
    /// the disk out of order (the first lost, a later one kept) was taken for corruption
    /// and the pool refused to open. A torn transaction's blocks carry no
    /// `prior_durable`, so that is a torn tail; the commit block of a multi-block
    /// transaction is written after a sync and carries it, so damage before it is
    /// corruption.
    #[test]
    fn a_transaction_torn_out_of_order_is_a_torn_tail_and_damage_before_a_commit_is_not() {
        let io = CrashIo::new(8192 + 16 * BLOCK);
        let r = ring(16);
        let mut w = JournalWriter::new(r, 0, 1, 0);
        w.push(map(1));
        w.commit(&io).unwrap();
        // A three-block transaction cut before its first sync: only its second block
        // reached the disk.
        for (i, c) in (0..(RECORDS_PER_BLOCK as u64 * 2 + 5))
            .map(map)
            .collect::<Vec<_>>()
            .chunks(RECORDS_PER_BLOCK)
            .enumerate()
        {
            let b = JournalBlock {
                seq: 2 + i as u64,
                pool_uuid: UUID,
                commit: i == 2,
                prior_durable: false,
                records: c.to_vec(),
            };
            io.write_at(r.at(1 + i as u64), &b.encode().unwrap())
                .unwrap();
        }
        io.crash(|sector| (8..16).contains(&sector));
        let got = replay(&io, r, 1, 0).unwrap();
        assert_eq!(got.records, vec![map(1)]);
        assert_eq!(damage_after(&io, r, got.next_seq, got.next_pos), None);
        // The writer syncs before the commit block: whole after a commit.
        for i in 0..(RECORDS_PER_BLOCK as u64 * 2 + 5) {
            w.push(map(i));
        }
        w.commit(&io).unwrap();
        assert_eq!(replay(&io, r, 1, 0).unwrap().transactions, 2);
        // Rot in the first block of the committed three-block transaction: corruption
        // (its commit block was written after that block was durable).
        let mut z = vec![0u8; BLOCK];
        io.read_at(r.at(1), &mut z).unwrap();
        z[100] ^= 1;
        io.write_at(r.at(1), &z).unwrap();
        io.sync().unwrap();
        let got = replay(&io, r, 1, 0).unwrap();
        assert_eq!(got.transactions, 1);
        assert!(damage_after(&io, r, got.next_seq, got.next_pos)
            .is_some_and(|m| m.contains("damaged while later blocks are intact")));
    }

    #[test]
    fn wraps_around_and_refuses_to_overwrite_live_blocks() {
        let io = CrashIo::new(8192 + 8 * BLOCK);
        let r = ring(8);
        let mut w = JournalWriter::new(r, 0, 1, 0);
        for i in 0..7 {
            w.push(map(i));
            w.commit(&io).unwrap();
        }
        // 7 of 8 blocks are live; the last one always stays free.
        assert_eq!(w.used_blocks(), 7);
        w.push(map(50));
        assert!(matches!(w.commit(&io), Err(JournalError::Full)));
        // A checkpoint moves the head to the current position; the ring wraps.
        let (seq, pos) = w.position();
        w.set_head(pos);
        w.commit(&io).unwrap(); // the refused record is still pending and now fits
        for i in 100..104 {
            w.push(map(i));
            w.commit(&io).unwrap();
        }
        let got = replay(&io, r, seq, pos).unwrap();
        assert_eq!(
            got.records,
            vec![map(50), map(100), map(101), map(102), map(103)]
        );
        assert_eq!(got.next_pos, w.position().1);
        assert!(
            got.next_pos < pos,
            "the write position wrapped around the ring"
        );
    }

    #[test]
    fn stale_blocks_and_other_pools_are_ignored() {
        let io = CrashIo::new(8192 + 8 * BLOCK);
        let r = ring(8);
        // Blocks from another pool that lived on this device before.
        let other = Ring { uuid: [9; 16], ..r };
        let mut w0 = JournalWriter::new(other, 0, 1, 0);
        w0.push(map(1));
        w0.commit(&io).unwrap();
        assert_eq!(replay(&io, r, 1, 0).unwrap().transactions, 0);
        // Our own block from an earlier lap carries an older sequence number.
        let mut w = JournalWriter::new(r, 3, 40, 3);
        w.push(map(2));
        w.commit(&io).unwrap(); // seq 40 at position 3
        assert_eq!(
            replay(&io, r, 48, 3).unwrap().transactions,
            0,
            "seq 40 is not the awaited 48"
        );
        assert_eq!(replay(&io, r, 40, 3).unwrap().records, vec![map(2)]);
    }
}
