//! A pool: one file or block device carved into thin volumes.
//!
//! The whole metadata lives in memory while the pool is open: who owns each data cluster
//! (the owner table) and, derived from it, each volume's map from virtual to data
//! clusters. Changes reach the device in two ways (see docs/format.md, "Crash safety"):
//!
//! * **journal commit** (a guest flush or FUA write, and every cluster claim): the records
//!   changed since the last commit are appended to the journal, and the pool file is
//!   synced once, which also makes the data written before the flush durable;
//! * **checkpoint** (every control-plane change, a journal 3/4 full, and close): the table
//!   blocks changed since that copy was last written go to the *inactive* table copy, the
//!   file is synced, and the other superblock copy names that copy and the new journal head.
//!
//! Two rules keep tenants apart across crashes. A cluster handed to a volume was first
//! **claimed**: marked dirty in a committed journal record while still zero, so a crash
//! before its owner's mapping is durable leaves it dirty, and dirty clusters are zeroed
//! before anyone gets them. A **freed** cluster is zeroed only after its release is
//! durable and no I/O is in flight to it (per-cluster pins), and only then is it free.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nvmux_core::fileops::{device_bytes, zero_range, zero_range_allocated};
use nvmux_core::record::ChangeLog;
use nvmux_core::{BlockDevice, Error, ErrorKind, Result};

use crate::format::{
    self, current_superblock, FormatError, Owner, OwnerBlock, Record, Superblock, VolumeEntry,
    VolumeTableBlock, BLOCK, OWNERS_PER_BLOCK, VOLUMES_PER_BLOCK, VOLUME_HIDDEN, VOLUME_SNAPSHOT,
};
use crate::journal::{self, JournalError, JournalWriter, MetaIo, Ring};

/// Default cluster size (see docs/format.md for the measurement behind it).
pub const DEFAULT_CLUSTER: u32 = 64 << 10;
/// Default journal size.
pub const DEFAULT_JOURNAL: u64 = 16 << 20;
/// Default volume table size, in blocks (31 volumes each).
pub const DEFAULT_VOLTAB_BLOCKS: u64 = 64;

/// How to create a pool.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub cluster_size: u32,
    pub journal_bytes: u64,
    pub voltab_blocks: u64,
    /// Size for a new file (ignored for block devices, which use their whole size).
    pub size: Option<u64>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            cluster_size: DEFAULT_CLUSTER,
            journal_bytes: DEFAULT_JOURNAL,
            voltab_blocks: DEFAULT_VOLTAB_BLOCKS,
            size: None,
        }
    }
}

fn fmt_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidArgument,
        format!("pool {}: {e}", path.display()),
    )
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::io(format!("pool {}: {what}", path.display()), e)
}

fn jerr(path: &Path, e: JournalError) -> Error {
    match e {
        JournalError::Io(e) => io_err(path, "journal", e),
        other => fmt_err(path, other),
    }
}

/// Random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: getrandom writes at most N - got bytes into the rest of our buffer.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, 0) };
        if r > 0 {
            got += r as usize;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // getrandom cannot fail on Linux ≥ 3.17 with valid arguments.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    b
}

/// A volume's map from virtual cluster to data cluster + 1 (0: not mapped here), in chunks
/// allocated on first use, so a large thin volume costs memory only where it is written.
#[derive(Default)]
pub(crate) struct SparseMap {
    chunks: Vec<Option<Box<[u32; CHUNK]>>>,
    pub(crate) mapped: u64,
}

const CHUNK: usize = 4096;

impl SparseMap {
    pub(crate) fn get(&self, x: u64) -> Option<u64> {
        let c = self.chunks.get((x / CHUNK as u64) as usize)?.as_ref()?;
        match c[(x % CHUNK as u64) as usize] {
            0 => None,
            v => Some(v as u64 - 1),
        }
    }
    /// Set or clear a mapping; returns the previous one.
    pub(crate) fn set(&mut self, x: u64, pc: Option<u64>) -> Option<u64> {
        let ci = (x / CHUNK as u64) as usize;
        if ci >= self.chunks.len() {
            pc?;
            self.chunks.resize_with(ci + 1, || None);
        }
        let chunk = self.chunks[ci].get_or_insert_with(|| Box::new([0; CHUNK]));
        let slot = &mut chunk[(x % CHUNK as u64) as usize];
        let old = match *slot {
            0 => None,
            v => Some(v as u64 - 1),
        };
        *slot = pc.map_or(0, |p| p as u32 + 1);
        match (old.is_some(), pc.is_some()) {
            (false, true) => self.mapped += 1,
            (true, false) => self.mapped -= 1,
            _ => {}
        }
        old
    }
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.iter().enumerate().flat_map(|(ci, c)| {
            c.iter().flat_map(move |c| {
                c.iter()
                    .enumerate()
                    .filter(|(_, &v)| v != 0)
                    .map(move |(i, &v)| ((ci * CHUNK + i) as u64, v as u64 - 1))
            })
        })
    }
}

/// What an open device of a volume follows: the snapshot operation moves the live
/// volume to a new id, and resize changes its size, while the device stays attached.
pub struct VolHandle {
    pub(crate) id: AtomicU32,
    pub(crate) size: AtomicU64,
    pub(crate) deleted: AtomicBool,
    /// A snapshot is being taken: new writes park until it is done.
    pub(crate) quiesce: AtomicBool,
    /// Writes planned against the volume's current id and not yet installed.
    pub(crate) writes: AtomicU32,
}

impl VolHandle {
    fn new(id: u32, size: u64) -> Arc<VolHandle> {
        Arc::new(VolHandle {
            id: AtomicU32::new(id),
            size: AtomicU64::new(size),
            deleted: AtomicBool::new(false),
            quiesce: AtomicBool::new(false),
            writes: AtomicU32::new(0),
        })
    }
}

pub(crate) struct Vol {
    pub(crate) entry: VolumeEntry,
    pub(crate) slot: usize,
    pub(crate) map: SparseMap,
    pub(crate) handle: Arc<VolHandle>,
}

impl Vol {
    pub(crate) fn is_snapshot(&self) -> bool {
        self.entry.flags & VOLUME_SNAPSHOT != 0
    }
    fn hidden(&self) -> bool {
        self.entry.flags & VOLUME_HIDDEN != 0
    }
}

/// A bit per table block, for one table copy.
#[derive(Clone)]
struct BlockSet(Vec<u64>);

impl BlockSet {
    fn new(n: u64, all: bool) -> Self {
        let mut v = vec![if all { u64::MAX } else { 0 }; n.div_ceil(64) as usize];
        if all && !n.is_multiple_of(64) {
            if let Some(l) = v.last_mut() {
                *l = (1u64 << (n % 64)) - 1;
            }
        }
        BlockSet(v)
    }
    fn set(&mut self, i: u64) {
        self.0[(i / 64) as usize] |= 1 << (i % 64);
    }
    fn take(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, bits) in self.0.iter_mut().enumerate() {
            let mut b = std::mem::take(bits);
            while b != 0 {
                let t = b.trailing_zeros() as u64;
                out.push(w as u64 * 64 + t);
                b &= b - 1;
            }
        }
        out
    }
}

/// The in-memory metadata, under one lock.
pub(crate) struct State {
    /// Encoded [`Owner`] of every data cluster.
    pub(crate) owner: Vec<u64>,
    pub(crate) vols: HashMap<u32, Vol>,
    slots: Vec<Option<u32>>,
    next_id: u32,
    /// Where the claim scan continues.
    cursor: u64,
    pub(crate) free: u64,
    /// Claimed clusters: dirty on disk (committed), zero in fact, ready to hand out.
    pub(crate) claimed: Vec<u64>,
    /// Clusters being claimed right now (taken from `free`, not yet in `claimed`).
    pub(crate) claiming: u64,
    /// Released clusters waiting for their release to be durable, then zeroing.
    pub(crate) to_zero: Vec<u64>,
    /// Records not yet in the journal.
    pending: Vec<Record>,
    /// Per table copy: blocks whose on-disk content is older than memory.
    dirty: [BlockSet; 2],
    voltab_blocks: u64,
    /// Allocations in flight, by (volume, virtual cluster): later writes to the same
    /// cluster wait for them (see thin.rs).
    pub(crate) allocating: HashMap<(u32, u64), Vec<crate::park::Parked>>,
    /// Commands waiting for claimed clusters.
    pub(crate) claim_waiters: Vec<crate::park::Parked>,
    /// The most clusters one of `claim_waiters` needs at once.
    pub(crate) claim_want: u64,
    /// Writes parked while a snapshot of their volume is taken.
    pub(crate) quiesce_waiters: Vec<crate::park::Parked>,
    /// Mappings installed over copied (or replaced) snapshot data since the last
    /// commit: the next commit syncs the data before it writes the journal.
    pub(crate) cow_unsynced: bool,
}

impl State {
    pub(crate) fn has_to_zero(&self) -> bool {
        !self.to_zero.is_empty()
    }
    /// Does `vol` read cluster `x` through to a snapshot that maps it?
    pub(crate) fn inherits(&self, vol: u32, x: u64, cluster: u64) -> bool {
        self.vols.get(&vol).is_some_and(|v| {
            v.entry.parent != 0
                && x < v.entry.parent_limit.div_ceil(cluster)
                && self.lookup(v.entry.parent, x, cluster).is_some()
        })
    }
    fn mark(&mut self, table_block: u64) {
        self.dirty[0].set(table_block);
        self.dirty[1].set(table_block);
    }
    fn mark_slot(&mut self, slot: usize) {
        self.mark((slot / VOLUMES_PER_BLOCK) as u64);
    }
    /// Change a cluster's owner (memory, journal record, dirty table block).
    pub(crate) fn set_owner(&mut self, c: u64, o: Owner) {
        self.owner[c as usize] = o.encode();
        self.pending.push(Record {
            cluster: c,
            owner: o,
        });
        self.mark(self.voltab_blocks + c / OWNERS_PER_BLOCK as u64);
    }
    /// Release a cluster a volume no longer maps: it is zeroed once that is durable.
    pub(crate) fn release(&mut self, c: u64) {
        self.set_owner(c, Owner::Dirty);
        self.to_zero.push(c);
    }
    /// Map `(vol, x)` to `c`, releasing what it mapped before.
    pub(crate) fn install(&mut self, vol: u32, x: u64, c: u64) {
        let Some(v) = self.vols.get_mut(&vol) else {
            // The volume vanished while the write was in flight: give the cluster back.
            self.release(c);
            return;
        };
        let old = v.map.set(x, Some(c));
        self.set_owner(
            c,
            Owner::Vol {
                vol,
                index: x as u32,
            },
        );
        if let Some(o) = old.filter(|&o| o != c) {
            self.release(o);
        }
    }
    /// Unmap `(vol, x)`, releasing its cluster.
    pub(crate) fn unmap(&mut self, vol: u32, x: u64) {
        if let Some(old) = self.vols.get_mut(&vol).and_then(|v| v.map.set(x, None)) {
            self.release(old);
        }
    }
    /// Resolve `(vol, x)` through the parent chain: the data cluster holding it, and
    /// whether `vol` owns it itself.
    pub(crate) fn lookup(&self, vol: u32, x: u64, cluster: u64) -> Option<(u64, bool)> {
        let mut id = vol;
        let mut own = true;
        let mut limit = u64::MAX;
        loop {
            let v = self.vols.get(&id)?;
            if x >= limit {
                return None;
            }
            if let Some(c) = v.map.get(x) {
                return Some((c, own));
            }
            if v.entry.parent == 0 {
                return None;
            }
            limit = limit.min(v.entry.parent_limit.div_ceil(cluster));
            id = v.entry.parent;
            own = false;
        }
    }
    fn by_name(&self, name: &str) -> Option<u32> {
        self.vols
            .iter()
            .find(|(_, v)| v.entry.name == name && !v.hidden())
            .map(|(&id, _)| id)
    }
    fn id_of(&self, name: &str) -> Result<u32> {
        self.by_name(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no volume {name:?} in this pool"),
            )
        })
    }
    fn children(&self, id: u32) -> Vec<u32> {
        self.vols
            .iter()
            .filter(|(_, v)| v.entry.parent == id)
            .map(|(&i, _)| i)
            .collect()
    }
    fn new_slot(&mut self) -> Result<usize> {
        self.slots.iter().position(|s| s.is_none()).ok_or_else(|| {
            Error::new(
                ErrorKind::Busy,
                format!("the volume table is full ({} volumes)", self.slots.len()),
            )
        })
    }
    fn new_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if id != 0 && id != u32::MAX && !self.vols.contains_key(&id) {
                return id;
            }
        }
    }
    fn add_vol(&mut self, entry: VolumeEntry, handle: Option<Arc<VolHandle>>) -> Result<u32> {
        let slot = self.new_slot()?;
        let id = entry.id;
        let handle = handle.unwrap_or_else(|| VolHandle::new(id, entry.size));
        handle.id.store(id, Ordering::Release);
        self.slots[slot] = Some(id);
        self.mark_slot(slot);
        self.vols.insert(
            id,
            Vol {
                entry,
                slot,
                map: SparseMap::default(),
                handle,
            },
        );
        Ok(id)
    }
    fn remove_vol(&mut self, id: u32) -> Option<Vol> {
        let v = self.vols.remove(&id)?;
        self.slots[v.slot] = None;
        self.mark_slot(v.slot);
        v.handle.deleted.store(true, Ordering::Release);
        Some(v)
    }
}

/// The superblock and the journal writer: whoever holds this may write metadata.
struct Meta {
    sb: Superblock,
    /// Superblock copy (0 or 1) that holds `sb`.
    sb_copy: u32,
    journal: JournalWriter,
}

/// What the background flusher has been asked to do.
#[derive(Default)]
struct FlushReq {
    /// Flush or FUA completions waiting for the next commit.
    waiters: Vec<crate::park::Parked>,
    /// Completions of writes that changed a mapping, waiting for the journal write that
    /// records it (not a sync): see [`Pool::write_journal`].
    recorded: Vec<crate::park::Parked>,
    /// More claimed clusters are wanted.
    claim: bool,
    /// Released clusters may be waiting for a commit and zeroing.
    kick: bool,
    stop: bool,
}

/// The flusher's mailbox, apart from the pool so the idle flusher holds no reference
/// to the pool.
#[derive(Default)]
struct FlushShared {
    req: Mutex<FlushReq>,
    cv: Condvar,
}

/// A pool opened for serving.
pub struct Pool {
    pub(crate) path: PathBuf,
    file: PoolFile,
    pub(crate) data: Arc<dyn BlockDevice>,
    pub(crate) cluster_size: u64,
    pub(crate) n_clusters: u64,
    pub(crate) data_offset: u64,
    uuid: [u8; 16],
    pub(crate) state: Mutex<State>,
    /// I/O in flight per data cluster: a released cluster is zeroed only at 0.
    pub(crate) pins: Box<[AtomicU32]>,
    meta: Mutex<Meta>,
    flush: Arc<FlushShared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    block_dev: bool,
    /// Set by the first failed data write, metadata write or sync: from then on writes
    /// and flushes fail until the pool is opened again (daemon restart). See
    /// docs/format.md, "Data safety".
    pub(crate) failed: AtomicBool,
    /// Why it failed (the first error).
    failure: Mutex<Option<String>>,
    /// Flush and FUA completions the flusher is committing for right now.
    committing: Mutex<Vec<crate::park::Parked>>,
    /// A command parked longer than this (ms) is failed (see `expire_waiters`).
    command_timeout_ms: AtomicU64,
    /// Commands failed that way.
    timed_out: AtomicU64,
    /// Test fault `pool-commit-error:<file name>`: the next commit's sync fails.
    fault_commit: AtomicBool,
    /// Test-only (`NVMUX_TEST_FAULTS=pool-cow-unordered:*`, read at open): copied data
    /// is not synced before the journal commit that maps it, the bug the power-cut
    /// simulator's negative control must catch.
    pub(crate) cow_unordered: bool,
}

/// The pool's device as its metadata code uses it (`pwrite`, `fallocate`, `fdatasync`
/// on the file), logging every change to a [`ChangeLog`] when the pool is recorded.
struct PoolFile {
    file: File,
    log: Option<Arc<dyn ChangeLog>>,
}

impl PoolFile {
    fn zero(&self, block_dev: bool, off: u64, len: u64) -> std::io::Result<()> {
        zero_pool(&self.file, block_dev, off, len)?;
        if let Some(l) = &self.log {
            l.zero(off, len);
        }
        Ok(())
    }
}

impl MetaIo for PoolFile {
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        MetaIo::read_at(&self.file, off, buf)
    }
    fn write_at(&self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        MetaIo::write_at(&self.file, off, buf)?;
        if let Some(l) = &self.log {
            l.write(off, buf, false);
        }
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        let id = self.log.as_ref().map(|l| l.flush_start());
        self.file.sync_data()?;
        if let (Some(l), Some(id)) = (&self.log, id) {
            l.flush_end(id);
        }
        Ok(())
    }
}

/// Default for [`Pool::set_command_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 30_000;

/// Figures for `pool show` and metrics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PoolUsage {
    pub uuid: String,
    pub cluster_size: u64,
    pub clusters: u64,
    pub used_clusters: u64,
    pub free_clusters: u64,
    /// Claimed or awaiting zeroing.
    pub reserved_clusters: u64,
    /// Why the pool is failed (writes and flushes fail until it is reopened), or None.
    pub failed: Option<String>,
    /// Commands failed because they waited longer than the command timeout.
    pub commands_timed_out: u64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub volumes: Vec<VolumeInfo>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub id: u32,
    pub uuid: String,
    pub size: u64,
    pub snapshot: bool,
    /// Deleted by the user, kept because clones read through it.
    pub hidden: bool,
    /// Name of the snapshot this volume reads through to.
    pub parent: Option<String>,
    /// Bytes of clusters this volume owns.
    pub allocated_bytes: u64,
}

pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Lock the pool file: one server at a time, and no offline check while it serves.
fn flock(f: &File, path: &Path, mode: i32) -> Result<()> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "pool {} is in use by a running nvmux daemon",
                path.display()
            ),
        ));
    }
    Ok(())
}

fn open_rw(path: &Path, create: bool) -> Result<(File, bool)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| io_err(path, "open", e))?;
    let m = f.metadata().map_err(|e| io_err(path, "stat", e))?;
    Ok((f, m.file_type().is_block_device()))
}

fn device_size(f: &File, path: &Path) -> Result<u64> {
    device_bytes(f).map_err(|e| io_err(path, "size", e))
}

/// Decoded metadata of a pool, as read from the device (for open and check).
struct Loaded {
    sb: Superblock,
    sb_copy: u32,
    sb_errors: Vec<FormatError>,
    entries: Vec<Option<VolumeEntry>>,
    owner: Vec<u64>,
    replay: journal::Replayed,
    /// Problems in the inactive table copy (repaired at open by rewriting it).
    inactive_errors: Vec<FormatError>,
}

/// A table copy: volume entries by slot, and encoded owners.
type Tables = (Vec<Option<VolumeEntry>>, Vec<u64>);

fn read_tables(
    io: &File,
    sb: &Superblock,
    copy: u32,
) -> std::result::Result<Tables, Vec<FormatError>> {
    let mut errs = Vec::new();
    let mut entries = Vec::new();
    let mut owner = Vec::with_capacity(sb.n_clusters as usize);
    let mut buf = vec![0u8; BLOCK];
    let nv = sb.voltab_blocks();
    for i in 0..nv + sb.owner_blocks() {
        let (what, idx) = if i < nv {
            ("volume table", i)
        } else {
            ("owner table", i - nv)
        };
        let r = io
            .read_at(sb.table_block_at(copy, i), &mut buf)
            .map_err(|e| FormatError::Field {
                block: format!("{what} block {idx}"),
                field: "read",
                offset: 0,
                why: e.to_string(),
            })
            .and_then(|()| {
                if i < nv {
                    VolumeTableBlock::decode(&buf, idx as u32).map(|t| entries.extend(t.entries))
                } else {
                    OwnerBlock::decode(&buf, idx as u32)
                        .map(|t| owner.extend(t.owners.iter().map(|o| o.encode())))
                }
            });
        if let Err(e) = r {
            errs.push(e.in_table_copy(copy));
            // Keep later blocks at their positions.
            if i < nv {
                entries.extend(std::iter::repeat_n(None, VOLUMES_PER_BLOCK));
            } else {
                owner.extend(std::iter::repeat_n(0, OWNERS_PER_BLOCK));
            }
        }
    }
    owner.truncate(sb.n_clusters as usize);
    if errs.is_empty() {
        Ok((entries, owner))
    } else {
        Err(errs)
    }
}

fn load(io: &File, path: &Path) -> Result<Loaded> {
    let mut b0 = vec![0u8; BLOCK];
    let mut b1 = vec![0u8; BLOCK];
    io.read_at(0, &mut b0)
        .map_err(|e| io_err(path, "read superblock", e))?;
    io.read_at(BLOCK as u64, &mut b1)
        .map_err(|e| io_err(path, "read superblock", e))?;
    let (sb, sb_errors) = current_superblock(&b0, &b1).map_err(|errs| {
        fmt_err(
            path,
            format!(
                "not a usable nvmux pool: {}",
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
    })?;
    let sb_copy = match Superblock::decode(&b1, 1) {
        Ok(s1) if s1 == sb => 1,
        _ => 0,
    };
    let (entries, owner) = read_tables(io, &sb, sb.active_tables).map_err(|errs| {
        fmt_err(
            path,
            format!(
                "metadata is damaged, refusing to open (run `nvmux pool check`): {}",
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
    })?;
    let inactive_errors = read_tables(io, &sb, 1 - sb.active_tables)
        .err()
        .unwrap_or_default();
    let ring = Ring::of(&sb);
    let replay = journal::replay(
        io,
        ring,
        sb.journal_head_seq,
        sb.journal_head_offset / BLOCK as u64,
    )
    .map_err(|e| jerr(path, e))?;
    if let Some(e) = journal::damage_after(io, ring, replay.next_seq, replay.next_pos) {
        return Err(fmt_err(
            path,
            format!("metadata is damaged, refusing to open (run `nvmux pool check`): {e}"),
        ));
    }
    Ok(Loaded {
        sb,
        sb_copy,
        sb_errors,
        entries,
        owner,
        replay,
        inactive_errors,
    })
}

/// Build the in-memory state from loaded metadata; every inconsistency is an error.
fn build_state(l: &Loaded) -> std::result::Result<State, Vec<String>> {
    let sb = &l.sb;
    let mut errs = Vec::new();
    let voltab_blocks = sb.voltab_blocks();
    let table_blocks = voltab_blocks + sb.owner_blocks();
    let mut st = State {
        owner: l.owner.clone(),
        vols: HashMap::new(),
        slots: vec![None; l.entries.len()],
        next_id: 1,
        cursor: 0,
        free: 0,
        claimed: Vec::new(),
        claiming: 0,
        to_zero: Vec::new(),
        pending: Vec::new(),
        dirty: [
            BlockSet::new(table_blocks, false),
            BlockSet::new(table_blocks, false),
        ],
        voltab_blocks,
        allocating: HashMap::new(),
        claim_waiters: Vec::new(),
        claim_want: 0,
        quiesce_waiters: Vec::new(),
        cow_unsynced: false,
    };
    for (slot, e) in l.entries.iter().enumerate() {
        let Some(e) = e else { continue };
        if st.vols.contains_key(&e.id) {
            errs.push(format!(
                "volume table slot {slot}: volume id {} appears twice",
                e.id
            ));
            continue;
        }
        st.slots[slot] = Some(e.id);
        st.next_id = st.next_id.max(e.id.wrapping_add(1)).max(1);
        st.vols.insert(
            e.id,
            Vol {
                entry: e.clone(),
                slot,
                map: SparseMap::default(),
                handle: VolHandle::new(e.id, e.size),
            },
        );
    }
    for (id, v) in &st.vols {
        let p = v.entry.parent;
        if p != 0 && !st.vols.get(&p).is_some_and(|pv| pv.is_snapshot()) {
            errs.push(format!(
                "volume {:?} (id {id}): parent {p} is not a snapshot in this pool",
                v.entry.name
            ));
        }
    }
    for r in &l.replay.records {
        if r.cluster >= sb.n_clusters {
            errs.push(format!(
                "journal record for cluster {} past the last cluster {}",
                r.cluster, sb.n_clusters
            ));
            continue;
        }
        st.owner[r.cluster as usize] = r.owner.encode();
        st.dirty[sb.active_tables as usize]
            .set(voltab_blocks + r.cluster / OWNERS_PER_BLOCK as u64);
    }
    let cs = sb.cluster_size as u64;
    for c in 0..sb.n_clusters {
        match Owner::decode(st.owner[c as usize]) {
            Some(Owner::Free) => st.free += 1,
            Some(Owner::Dirty) | None => st.to_zero.push(c),
            Some(Owner::Vol { vol, index }) => {
                let Some(v) = st.vols.get_mut(&vol) else {
                    errs.push(format!(
                        "cluster {c} is owned by volume {vol}, which does not exist (leaked)"
                    ));
                    continue;
                };
                let x = index as u64;
                if x >= v.entry.size.div_ceil(cs) {
                    errs.push(format!(
                        "cluster {c}: volume {:?} cluster {x} lies past its end ({} bytes)",
                        v.entry.name, v.entry.size
                    ));
                    continue;
                }
                if let Some(other) = v.map.set(x, Some(c)) {
                    errs.push(format!(
                        "volume {:?} cluster {x} is mapped twice: to clusters {other} and {c}",
                        v.entry.name
                    ));
                }
            }
        }
    }
    // Every inactive-copy block is rewritten at the next checkpoint: it may be damaged or
    // stale in ways the dirty bits do not know after a restart.
    st.dirty[1 - sb.active_tables as usize] = BlockSet::new(table_blocks, true);
    if errs.is_empty() {
        Ok(st)
    } else {
        Err(errs)
    }
}

/// Result of an offline `pool check`.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// Damage or inconsistency: the pool will not open.
    pub errors: Vec<String>,
    /// Harmless findings (a torn superblock copy, clusters awaiting zeroing, damage in
    /// the inactive table copy that the next open rewrites).
    pub notes: Vec<String>,
    pub volumes: usize,
    pub used_clusters: u64,
    pub free_clusters: u64,
    pub dirty_clusters: u64,
    pub journal_transactions: u64,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Verify a pool offline, like fsck: every block's checksum and fields, both table
/// copies, the journal, and the cross-references (owners, maps, parents).
pub fn check(path: &Path) -> Result<CheckReport> {
    let f = std::fs::File::open(path).map_err(|e| io_err(path, "open", e))?;
    flock(&f, path, libc::LOCK_SH)?;
    let mut r = CheckReport::default();
    let mut b0 = vec![0u8; BLOCK];
    let mut b1 = vec![0u8; BLOCK];
    f.read_at(0, &mut b0)
        .map_err(|e| io_err(path, "read superblock", e))?;
    f.read_at(BLOCK as u64, &mut b1)
        .map_err(|e| io_err(path, "read superblock", e))?;
    let sb = match current_superblock(&b0, &b1) {
        Ok((sb, errs)) => {
            r.notes.extend(
                errs.iter()
                    .map(|e| format!("{e} (the other copy is current)")),
            );
            sb
        }
        Err(errs) => {
            r.errors.extend(errs.iter().map(|e| e.to_string()));
            return Ok(r);
        }
    };
    let active = read_tables(&f, &sb, sb.active_tables);
    if let Err(errs) = &active {
        r.errors.extend(errs.iter().map(|e| e.to_string()));
    }
    if let Err(errs) = read_tables(&f, &sb, 1 - sb.active_tables) {
        r.notes.extend(
            errs.iter()
                .map(|e| format!("{e} (inactive copy: rewritten at the next open)")),
        );
    }
    let ring = Ring::of(&sb);
    let replay = match journal::replay(
        &f,
        ring,
        sb.journal_head_seq,
        sb.journal_head_offset / BLOCK as u64,
    ) {
        Ok(rp) => rp,
        Err(e) => {
            r.errors.push(format!("journal: {e}"));
            return Ok(r);
        }
    };
    if let Some(e) = journal::damage_after(&f, ring, replay.next_seq, replay.next_pos) {
        r.errors.push(e);
    }
    r.journal_transactions = replay.transactions;
    let Ok((entries, owner)) = active else {
        return Ok(r);
    };
    let l = Loaded {
        sb_copy: 0,
        sb_errors: Vec::new(),
        inactive_errors: Vec::new(),
        sb,
        entries,
        owner,
        replay,
    };
    match build_state(&l) {
        Ok(st) => {
            r.volumes = st.vols.len();
            r.free_clusters = st.free;
            r.dirty_clusters = st.to_zero.len() as u64;
            r.used_clusters = st.vols.values().map(|v| v.map.mapped).sum();
            for (id, v) in &st.vols {
                if v.hidden() && st.children(*id).is_empty() {
                    r.errors.push(format!(
                        "deleted snapshot {:?} (id {id}) has no clones left but still holds {} clusters (leaked)",
                        v.entry.name, v.map.mapped
                    ));
                }
            }
            if r.dirty_clusters > 0 {
                r.notes.push(format!(
                    "{} clusters are released or claimed but not yet zeroed (normal after an unclean shutdown; zeroed at the next open)",
                    r.dirty_clusters
                ));
            }
        }
        Err(errs) => r.errors.extend(errs),
    }
    Ok(r)
}

/// Zero a byte range of a pool: discard on a block device; in a file, keep the space
/// allocated (see `create`).
fn zero_pool(f: &File, block_dev: bool, off: u64, len: u64) -> std::io::Result<()> {
    if block_dev {
        zero_range(f, off, len)
    } else {
        zero_range_allocated(f, off, len)
    }
}

/// What `create` and `open` need from the device: the path and whether it exists.
impl Pool {
    /// Format `path` (a file, created if missing, or a block device) as a new pool.
    pub fn create(path: &Path, opts: &PoolOptions) -> Result<()> {
        let exists = path.exists();
        let (f, block_dev) = open_rw(path, true)?;
        if !block_dev {
            let size = match (opts.size, exists) {
                (Some(s), _) => s,
                (None, true) => device_size(&f, path)?,
                (None, false) => {
                    let _ = std::fs::remove_file(path);
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("pool {}: a new pool file needs a size", path.display()),
                    ));
                }
            };
            if exists && device_size(&f, path)? > 0 {
                let mut magic = [0u8; 8];
                if f.read_at(0, &mut magic).is_ok() && magic == format::SUPER_MAGIC {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "{} already holds an nvmux pool; delete it first",
                            path.display()
                        ),
                    ));
                }
            }
            f.set_len(size).map_err(|e| io_err(path, "set size", e))?;
        }
        let size = device_size(&f, path)?;
        let sb = format::layout(
            random_bytes(),
            size,
            opts.cluster_size,
            // Small pools (tests, demos) get a journal in proportion.
            opts.journal_bytes.min((size / 32).max(64 << 10)),
            opts.voltab_blocks.min((size / 4096 / 64).max(1)),
        )
        .map_err(|e| fmt_err(path, e))?;
        // Every data cluster starts zero; metadata regions start empty. A pool file gets
        // its space reserved (allocated, reading zero) so that allocating a cluster costs
        // the host filesystem no block allocation and the pool never meets ENOSPC below
        // it; a block device is discarded to zeros.
        zero_pool(&f, block_dev, 0, sb.pool_bytes)
            .map_err(|e| io_err(path, "zero and reserve the pool's space", e))?;
        let empty_vt = VolumeTableBlock {
            index: 0,
            entries: vec![None; VOLUMES_PER_BLOCK],
        };
        for copy in 0..2 {
            for i in 0..sb.voltab_blocks() {
                let b = VolumeTableBlock {
                    index: i as u32,
                    ..empty_vt.clone()
                }
                .encode()
                .map_err(|e| fmt_err(path, e))?;
                f.write_at(sb.table_block_at(copy, i), &b)
                    .map_err(|e| io_err(path, "write volume table", e))?;
            }
            for i in 0..sb.owner_blocks() {
                let b = OwnerBlock::encode_raw(i as u32, &[]);
                f.write_at(sb.table_block_at(copy, sb.voltab_blocks() + i), &b)
                    .map_err(|e| io_err(path, "write owner table", e))?;
            }
        }
        MetaIo::sync(&f).map_err(|e| io_err(path, "sync", e))?;
        f.write_at(0, &sb.encode())
            .map_err(|e| io_err(path, "write superblock", e))?;
        MetaIo::sync(&f).map_err(|e| io_err(path, "sync", e))?;
        Ok(())
    }

    /// Open a pool for serving: replay its journal, zero what was left dirty, and
    /// checkpoint. A damaged pool is refused with where it is damaged.
    ///
    /// `data` is the block device the volumes' data goes through: the same file or
    /// block device as `path`, opened by the caller (the daemon opens the backend's
    /// io_uring `FileDevice` on it), so that this room needs no backend. The pool reads
    /// and writes its metadata through `path` itself, synchronously.
    pub fn open(path: &Path, data: Arc<dyn BlockDevice>) -> Result<Arc<Pool>> {
        Self::open_with(path, data, None)
    }

    /// Open a pool whose every change to its device is logged to `log` (the power-cut
    /// simulator): the metadata writes, zeroing and syncs as they return. `data` is
    /// expected to log the data path to the same log (the backend's `RecordingDevice`).
    pub fn open_recorded(
        path: &Path,
        data: Arc<dyn BlockDevice>,
        log: Arc<dyn ChangeLog>,
    ) -> Result<Arc<Pool>> {
        Self::open_with(path, data, Some(log))
    }

    fn open_with(
        path: &Path,
        data: Arc<dyn BlockDevice>,
        log: Option<Arc<dyn ChangeLog>>,
    ) -> Result<Arc<Pool>> {
        let (file, block_dev) = open_rw(path, false)?;
        flock(&file, path, libc::LOCK_EX)?;
        let l = load(&file, path)?;
        for e in &l.sb_errors {
            tracing::warn!("pool {}: {e} (using the other copy)", path.display());
        }
        for e in &l.inactive_errors {
            tracing::warn!(
                "pool {}: {e} (inactive table copy: rewritten now)",
                path.display()
            );
        }
        let st = build_state(&l).map_err(|errs| {
            fmt_err(
                path,
                format!(
                    "metadata is inconsistent, refusing to open (run `nvmux pool check`): {}",
                    errs.join("; ")
                ),
            )
        })?;
        let sb = l.sb.clone();
        let end = sb.data_offset + sb.n_clusters * sb.cluster_size as u64;
        if data.capacity_bytes() < end {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "pool {}: its data device holds {} bytes, less than the pool's {end}: pass the pool's own file or block device",
                    path.display(),
                    data.capacity_bytes()
                ),
            ));
        }
        let ring = Ring::of(&sb);
        let journal = JournalWriter::new(
            ring,
            sb.journal_head_offset / BLOCK as u64,
            l.replay.next_seq,
            l.replay.next_pos,
        );
        let n = sb.n_clusters;
        let pool = Arc::new(Pool {
            path: path.to_path_buf(),
            file: PoolFile { file, log },
            data,
            cluster_size: sb.cluster_size as u64,
            n_clusters: n,
            data_offset: sb.data_offset,
            uuid: sb.uuid,
            state: Mutex::new(st),
            pins: (0..n).map(|_| AtomicU32::new(0)).collect(),
            meta: Mutex::new(Meta {
                sb,
                sb_copy: l.sb_copy,
                journal,
            }),
            flush: Arc::new(FlushShared::default()),
            flusher: Mutex::new(None),
            block_dev,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            committing: Mutex::new(Vec::new()),
            command_timeout_ms: AtomicU64::new(DEFAULT_COMMAND_TIMEOUT_MS),
            timed_out: AtomicU64::new(0),
            fault_commit: AtomicBool::new(path.file_name().is_some_and(|n| {
                nvmux_core::fault::armed("pool-commit-error", &n.to_string_lossy())
            })),
            cow_unordered: nvmux_core::fault::armed("pool-cow-unordered", "*"),
        });
        // Zero what a crash left dirty, then record a clean starting point.
        pool.zero_released(pool.take_to_zero())?;
        pool.checkpoint()?;
        let p = Arc::downgrade(&pool);
        let sh = pool.flush.clone();
        let h = std::thread::Builder::new()
            .name("nvmux-pool-flush".into())
            .spawn(move || flusher(p, sh))
            .map_err(|e| io_err(path, "spawn flusher", e))?;
        *lock(&pool.flusher) = Some(h);
        let p = Arc::downgrade(&pool);
        std::thread::Builder::new()
            .name("nvmux-pool-watch".into())
            .spawn(move || watchdog(p))
            .map_err(|e| io_err(path, "spawn watchdog", e))?;
        Ok(pool)
    }

    /// Fail commands parked (waiting for clusters, an allocation, a snapshot, a commit)
    /// longer than `ms` milliseconds.
    pub fn set_command_timeout(&self, ms: u64) {
        self.command_timeout_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Why the pool is failed, if it is.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        Some(lock(&self.failure).clone().unwrap_or_default())
    }

    /// Commands failed because they waited longer than the command timeout.
    pub fn commands_timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    fn failed_err(&self) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "pool {} is failed after an I/O error ({}); its writes and flushes fail until it is reopened: restart the daemon once the device is healthy",
                self.path.display(),
                lock(&self.failure).clone().unwrap_or_default()
            ),
        )
    }

    /// Fail every parked command older than the command timeout, wherever it waits.
    fn expire_waiters(&self) {
        let limit =
            std::time::Duration::from_millis(self.command_timeout_ms.load(Ordering::Relaxed));
        let now = std::time::Instant::now();
        let mut out = Vec::new();
        let take = |v: &mut Vec<crate::park::Parked>, out: &mut Vec<crate::park::Parked>| {
            let mut i = 0;
            while i < v.len() {
                if now.saturating_duration_since(v[i].since) >= limit {
                    out.push(v.swap_remove(i));
                } else {
                    i += 1;
                }
            }
        };
        take(&mut lock(&self.flush.req).waiters, &mut out);
        take(&mut lock(&self.committing), &mut out);
        {
            let mut s = self.lock_state();
            let s = &mut *s;
            take(&mut s.claim_waiters, &mut out);
            take(&mut s.quiesce_waiters, &mut out);
            for w in s.allocating.values_mut() {
                take(w, &mut out);
            }
        }
        if out.is_empty() {
            return;
        }
        self.timed_out
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        tracing::error!(
            pool = %self.path.display(),
            commands = out.len(),
            timeout_ms = limit.as_millis() as u64,
            "commands waited longer than the pool command timeout and are failed"
        );
        for p in out {
            p.expire();
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn is_block_device(&self) -> bool {
        self.block_dev
    }
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Enter the failed state (sticky: a later sync that succeeds proves nothing about
    /// what the failed write or sync lost).
    pub(crate) fn fail(&self, e: &dyn std::fmt::Display) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(e.to_string());
        }
        drop(f);
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "pool {}: I/O failed, writes and flushes fail from now on until the pool is reopened (restart the daemon): {e}",
                self.path.display()
            );
        }
    }

    /// Append what changed to the journal and sync: everything acknowledged before this
    /// call is durable when it returns. A failed pool fails every commit.
    pub fn commit(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(self.failed_err());
        }
        let mut m = lock(&self.meta);
        if self.fault_commit.swap(false, Ordering::AcqRel) {
            let e = io_err(
                &self.path,
                "sync (injected test fault pool-commit-error)",
                std::io::Error::from_raw_os_error(libc::EIO),
            );
            self.fail(&e);
            return Err(e);
        }
        let recs = std::mem::take(&mut self.lock_state().pending);
        if recs.is_empty() {
            // Nothing changed in the metadata, but the data (and journal blocks written
            // unsynced) must still be durable.
            let r = MetaIo::sync(&self.file).map_err(|e| io_err(&self.path, "sync", e));
            match &r {
                Ok(()) => m.journal.mark_synced(),
                Err(e) => self.fail(e),
            }
            return r;
        }
        self.append(&mut m, recs, true)
    }

    /// Write the records changed since the last journal write as one transaction, without
    /// a sync: called before the completion of a write that changed a mapping is handed
    /// back, so a `kill -9` of the daemon loses no completed write (the page cache keeps
    /// the block, replay applies it). The sync stays with the guest's flush or FUA.
    /// Journal full (or ¾ full after the write): checkpoint, as a commit does.
    pub(crate) fn write_journal(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(self.failed_err());
        }
        let mut m = lock(&self.meta);
        let recs = std::mem::take(&mut self.lock_state().pending);
        if recs.is_empty() {
            return Ok(());
        }
        self.append(&mut m, recs, false)
    }

    fn append(&self, m: &mut Meta, recs: Vec<Record>, sync: bool) -> Result<()> {
        if std::mem::take(&mut self.lock_state().cow_unsynced) {
            // Data before metadata: a record maps a cluster that holds data copied from
            // (or replacing) a snapshot's. Without this sync the journal block could
            // reach the disk before the copy, and after a power cut the volume would read
            // zeros where it inherited data. Only transactions that carry such a mapping
            // pay (synced or not: an unsynced journal write must not overtake it either).
            if let Err(e) = MetaIo::sync(&self.file) {
                let e = io_err(&self.path, "sync copied data", e);
                self.fail(&e);
                return Err(e);
            }
        }
        for r in recs {
            m.journal.push(r);
        }
        let ring_blocks = m.sb.journal_bytes / BLOCK as u64;
        let written = if sync {
            m.journal.commit(&self.file)
        } else {
            m.journal.write_unsynced(&self.file)
        };
        let r = match written {
            Ok(()) if m.journal.used_blocks() * 4 < ring_blocks * 3 => Ok(()),
            Ok(()) | Err(JournalError::Full) => self.checkpoint_locked(m),
            Err(e) => Err(jerr(&self.path, e)),
        };
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    /// Write the changed table blocks to the inactive copy and flip the superblock to it.
    pub fn checkpoint(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(self.failed_err());
        }
        let mut m = lock(&self.meta);
        self.checkpoint_held(&mut m)
    }

    /// A checkpoint by a caller that already holds the metadata lock: a control-plane
    /// change made under it reaches the device whole (tables and volume entries flip
    /// together with the superblock), never half through a journal commit in between.
    fn checkpoint_held(&self, m: &mut Meta) -> Result<()> {
        let r = self.checkpoint_locked(m);
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    fn checkpoint_locked(&self, m: &mut Meta) -> Result<()> {
        let target = 1 - m.sb.active_tables;
        let (blocks, head) = {
            let mut s = self.lock_state();
            // The tables written below hold every change so far: the journal need not.
            // (Copied data is synced before the superblock names them, below.)
            s.pending.clear();
            s.cow_unsynced = false;
            m.journal.discard_pending();
            let head = m.journal.position();
            let idx = s.dirty[target as usize].take();
            let mut out = Vec::with_capacity(idx.len());
            for i in idx {
                let b = if i < s.voltab_blocks {
                    let lo = i as usize * VOLUMES_PER_BLOCK;
                    let entries = (lo..lo + VOLUMES_PER_BLOCK)
                        .map(|slot| {
                            s.slots[slot]
                                .and_then(|id| s.vols.get(&id))
                                .map(|v| v.entry.clone())
                        })
                        .collect();
                    VolumeTableBlock {
                        index: i as u32,
                        entries,
                    }
                    .encode()
                    .map_err(|e| fmt_err(&self.path, e))?
                } else {
                    let ob = i - s.voltab_blocks;
                    let lo = (ob as usize * OWNERS_PER_BLOCK).min(s.owner.len());
                    let hi = (lo + OWNERS_PER_BLOCK).min(s.owner.len());
                    OwnerBlock::encode_raw(ob as u32, &s.owner[lo..hi])
                };
                out.push((i, b));
            }
            (out, head)
        };
        for (i, b) in &blocks {
            self.file
                .write_at(m.sb.table_block_at(target, *i), b)
                .map_err(|e| io_err(&self.path, "write tables", e))?;
        }
        MetaIo::sync(&self.file).map_err(|e| io_err(&self.path, "sync", e))?;
        let mut sb = m.sb.clone();
        sb.generation += 1;
        sb.active_tables = target;
        sb.journal_head_seq = head.0;
        sb.journal_head_offset = head.1 * BLOCK as u64;
        let copy = 1 - m.sb_copy;
        self.file
            .write_at(copy as u64 * BLOCK as u64, &sb.encode())
            .map_err(|e| io_err(&self.path, "write superblock", e))?;
        MetaIo::sync(&self.file).map_err(|e| io_err(&self.path, "sync", e))?;
        m.sb = sb;
        m.sb_copy = copy;
        m.journal.set_head(head.1);
        Ok(())
    }

    fn take_to_zero(&self) -> Vec<u64> {
        std::mem::take(&mut self.lock_state().to_zero)
    }

    /// Zero released clusters `cands` (taken before a commit or checkpoint that made their
    /// release durable) that no I/O uses, then make them free. Busy ones wait.
    fn zero_released(&self, cands: Vec<u64>) -> Result<usize> {
        if cands.is_empty() {
            return Ok(0);
        }
        let (ready, busy): (Vec<u64>, Vec<u64>) = cands
            .into_iter()
            .partition(|&c| self.pins[c as usize].load(Ordering::Acquire) == 0);
        let r = self.zero_clusters(&ready, &mut |_, _| {});
        let mut s = self.lock_state();
        s.to_zero.extend(busy);
        if let Err(e) = r {
            s.to_zero.extend(ready);
            return Err(e);
        }
        for &c in &ready {
            s.set_owner(c, Owner::Free);
            s.free += 1;
        }
        Ok(ready.len())
    }

    /// Zero clusters on the device (runs of adjacent clusters in one call) and sync.
    /// Zero clusters, in runs of at most 64 MiB; `progress(done_bytes, total_bytes)`
    /// after each run.
    fn zero_clusters(&self, cl: &[u64], progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let mut v = cl.to_vec();
        v.sort_unstable();
        let cs = self.cluster_size;
        let total = v.len() as u64 * cs;
        let max_run = ((64 << 20) / cs).max(1) as usize;
        let mut i = 0;
        while i < v.len() {
            let mut j = i + 1;
            while j < v.len() && v[j] == v[j - 1] + 1 && j - i < max_run {
                j += 1;
            }
            let off = self.data_offset + v[i] * cs;
            if let Err(e) = self.file.zero(self.block_dev, off, (j - i) as u64 * cs) {
                let e = io_err(&self.path, "zero clusters", e);
                self.fail(&e);
                return Err(e);
            }
            i = j;
            progress(i as u64 * cs, total);
        }
        let r = MetaIo::sync(&self.file).map_err(|e| io_err(&self.path, "sync", e));
        if let Err(e) = &r {
            self.fail(e);
        }
        r
    }

    /// Claim up to `n` free clusters for allocation: they are marked dirty in a committed
    /// journal record before anyone writes to them.
    /// At least `at_least` are claimed when that many are free, even past the half of the
    /// free space a batch leaves unclaimed: a waiting command needs them.
    pub(crate) fn claim(&self, n: u64, at_least: u64) -> Result<()> {
        let got = {
            let mut s = self.lock_state();
            let mut got = Vec::new();
            let total = self.n_clusters;
            // Leave some free space unclaimed in a nearly full pool.
            let n = n.min(s.free.div_ceil(2)).max(at_least.min(s.free));
            let mut scanned = 0;
            while (got.len() as u64) < n && scanned < total && s.free > 0 {
                let c = s.cursor;
                s.cursor = (s.cursor + 1) % total;
                scanned += 1;
                if s.owner[c as usize] == 0 {
                    s.set_owner(c, Owner::Dirty);
                    s.free -= 1;
                    got.push(c);
                }
            }
            s.claiming += got.len() as u64;
            got
        };
        if got.is_empty() {
            return Ok(());
        }
        let r = self.commit();
        let mut s = self.lock_state();
        s.claiming -= got.len() as u64;
        match r {
            Ok(()) => {
                // Hand out low clusters first, so a volume's data stays roughly in order.
                s.claimed.extend(got.into_iter().rev());
                Ok(())
            }
            Err(e) => {
                s.to_zero.extend(got);
                Err(e)
            }
        }
    }

    pub(crate) fn claim_batch(&self) -> u64 {
        // Enough for a few milliseconds of allocating writes, bounded by the free space.
        (4096 * (64 << 10) / self.cluster_size).clamp(64, 4096)
    }

    fn request(&self, f: impl FnOnce(&mut FlushReq)) {
        f(&mut lock(&self.flush.req));
        self.flush.cv.notify_one();
    }

    /// Have the flusher commit and zero released clusters soon.
    pub(crate) fn kick(&self) {
        self.request(|r| r.kick = true);
    }

    /// Retry every command waiting for claimed clusters.
    pub(crate) fn wake_claim_waiters(&self) {
        let w = {
            let mut s = self.lock_state();
            // Each waiter states its need again when it runs.
            s.claim_want = 0;
            std::mem::take(&mut s.claim_waiters)
        };
        for x in w {
            x.wake(nvmux_core::Status::SUCCESS);
        }
    }

    /// Complete `p` after the next journal commit (a flush or FUA write).
    pub(crate) fn flush_after_commit(&self, p: crate::park::Parked) {
        self.request(|r| r.waiters.push(p));
    }

    /// Complete `p` (a write that changed a mapping) once the journal holds its record:
    /// the flusher writes what is pending for a whole batch of them in one go.
    pub(crate) fn complete_after_journal_write(&self, p: crate::park::Parked) {
        self.request(|r| r.recorded.push(p));
    }

    pub(crate) fn ensure_claimed(&self) {
        self.request(|r| r.claim = true);
    }

    /// Stop the flusher, commit and checkpoint. Claimed clusters that were never used go
    /// back to free (they are still zero).
    pub fn close(&self) -> Result<()> {
        self.request(|r| r.stop = true);
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
        {
            let mut s = self.lock_state();
            let cl = std::mem::take(&mut s.claimed);
            for c in cl {
                s.set_owner(c, Owner::Free);
                s.free += 1;
            }
        }
        let z = self.take_to_zero();
        self.commit()?;
        self.zero_released(z)?;
        self.checkpoint()
    }

    /// [`Pool::close`], then release the pool file's lock, whatever close returned: a
    /// takeover's new process (`nvmux upgrade`) opens the pool while this process, which
    /// does no more I/O, is still on its way out (after a failed close the new process
    /// recovers the pool as after a crash).
    pub fn close_and_unlock(&self) -> Result<()> {
        let r = self.close();
        // SAFETY: flock on a descriptor this pool owns; no memory is involved.
        unsafe { libc::flock(self.file.file.as_raw_fd(), libc::LOCK_UN) };
        r
    }

    // ---- control plane ----

    pub fn usage(&self) -> PoolUsage {
        let s = self.lock_state();
        let used: u64 = s.vols.values().map(|v| v.map.mapped).sum();
        let mut volumes: Vec<VolumeInfo> = s
            .vols
            .iter()
            .map(|(&id, v)| VolumeInfo {
                name: v.entry.name.clone(),
                id,
                uuid: uuid_string(&v.entry.uuid),
                size: v.entry.size,
                snapshot: v.is_snapshot(),
                hidden: v.hidden(),
                parent: s.vols.get(&v.entry.parent).map(|p| p.entry.name.clone()),
                allocated_bytes: v.map.mapped * self.cluster_size,
            })
            .collect();
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        PoolUsage {
            uuid: uuid_string(&self.uuid),
            cluster_size: self.cluster_size,
            clusters: self.n_clusters,
            used_clusters: used,
            free_clusters: s.free,
            reserved_clusters: self.n_clusters - used - s.free,
            failed: self.failure(),
            commands_timed_out: self.timed_out.load(Ordering::Relaxed),
            capacity_bytes: self.n_clusters * self.cluster_size,
            used_bytes: used * self.cluster_size,
            volumes,
        }
    }

    pub fn volume(&self, name: &str) -> Option<VolumeInfo> {
        self.usage()
            .volumes
            .into_iter()
            .find(|v| v.name == name && !v.hidden)
    }

    fn check_name(s: &State, name: &str) -> Result<()> {
        if name.is_empty() || name.len() > format::NAME_BYTES || name.contains('\0') {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "volume name {name:?} must be 1-{} bytes",
                    format::NAME_BYTES
                ),
            ));
        }
        if s.by_name(name).is_some() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("a volume named {name:?} already exists in this pool"),
            ));
        }
        Ok(())
    }

    fn check_size(size: u64) -> Result<()> {
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("volume size {size} must be a non-zero multiple of 4096"),
            ));
        }
        if size.div_ceil(DEFAULT_CLUSTER.min(format::MIN_CLUSTER) as u64) > u32::MAX as u64 * 16 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "volume size is too large",
            ));
        }
        Ok(())
    }

    /// Create a thin volume, empty or (with `from`) a clone of snapshot `from`. `size`
    /// None takes the snapshot's size.
    pub fn create_volume(&self, name: &str, size: Option<u64>, from: Option<&str>) -> Result<()> {
        {
            let mut s = self.lock_state();
            Self::check_name(&s, name)?;
            let (parent, psize) = match from {
                None => (0, 0),
                Some(snap) => {
                    let id = s.by_name(snap).ok_or_else(|| {
                        Error::new(
                            ErrorKind::NotFound,
                            format!("no snapshot {snap:?} in this pool"),
                        )
                    })?;
                    let v = &s.vols[&id];
                    if !v.is_snapshot() {
                        return Err(Error::new(
                            ErrorKind::InvalidArgument,
                            format!("{snap:?} is a volume, not a snapshot: snapshot it first"),
                        ));
                    }
                    (id, v.entry.size)
                }
            };
            let size = match (size, parent) {
                (Some(s), _) => s,
                (None, p) if p != 0 => psize,
                (None, _) => {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        "a new volume needs a size",
                    ))
                }
            };
            Self::check_size(size)?;
            if (size / self.cluster_size) > u32::MAX as u64 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "volume size is too large for this cluster size",
                ));
            }
            let id = s.new_id();
            s.add_vol(
                VolumeEntry {
                    id,
                    flags: 0,
                    size,
                    parent,
                    parent_limit: if parent != 0 { psize.min(size) } else { 0 },
                    name: name.to_string(),
                    uuid: random_bytes(),
                },
                None,
            )?;
        }
        self.checkpoint()
    }

    /// Take a snapshot `snap` of volume `name`: instant, read-only, and `name` goes on
    /// (attached devices included) as a volume reading through to it.
    ///
    /// The volume is quiesced around it: new writes park, and the writes already planned
    /// against its current id are waited for (up to the command timeout), so none
    /// installs its cluster into the snapshot after the live volume moved on (which lost
    /// it from the live volume: a later write to that cluster copied the old contents).
    pub fn snapshot(&self, name: &str, snap: &str) -> Result<()> {
        let handle = {
            let s = self.lock_state();
            let id = s.id_of(name)?;
            let h = s.vols[&id].handle.clone();
            if h.quiesce.swap(true, Ordering::AcqRel) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("a snapshot of {name:?} is being taken; try again"),
                ));
            }
            h
        };
        // Whatever happens below, writes resume.
        struct Resume<'a>(&'a Pool, &'a VolHandle);
        impl Drop for Resume<'_> {
            fn drop(&mut self) {
                let w = {
                    let mut s = self.0.lock_state();
                    self.1.quiesce.store(false, Ordering::Release);
                    std::mem::take(&mut s.quiesce_waiters)
                };
                for p in w {
                    p.wake(nvmux_core::Status::SUCCESS);
                }
            }
        }
        let _resume = Resume(self, &handle);
        let limit = self.command_timeout_ms.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(limit);
        while handle.writes.load(Ordering::Acquire) != 0 {
            if std::time::Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "{name:?}: writes in flight did not finish within {limit} ms (pool.command_timeout_ms); no snapshot was taken"
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        {
            let mut s = self.lock_state();
            let id = s.id_of(name)?;
            if s.vols[&id].is_snapshot() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{name:?} is already a snapshot (clone it to get a writable volume)"),
                ));
            }
            Self::check_name(&s, snap)?;
            s.new_slot()?;
            let new_id = s.new_id();
            let v = s
                .vols
                .get_mut(&id)
                .ok_or_else(|| Error::new(ErrorKind::NotFound, "volume vanished"))?;
            // The clusters stay with `id`, which becomes the snapshot; the live volume
            // moves to `new_id` with an empty map reading through to it.
            let live = VolumeEntry {
                id: new_id,
                flags: 0,
                size: v.entry.size,
                parent: id,
                parent_limit: v.entry.size,
                name: v.entry.name.clone(),
                uuid: v.entry.uuid,
            };
            let live_handle = v.handle.clone();
            v.entry.flags |= VOLUME_SNAPSHOT;
            v.entry.name = snap.to_string();
            v.entry.uuid = random_bytes();
            v.handle = VolHandle::new(id, v.entry.size);
            let slot = v.slot;
            s.mark_slot(slot);
            s.add_vol(live, Some(live_handle))?;
        }
        self.checkpoint()
    }

    /// Grow (online) or shrink a volume. Shrinking needs `force`, and if clusters past
    /// the new end hold data, also `discard_data`.
    pub fn resize(&self, name: &str, size: u64, force: bool, discard_data: bool) -> Result<()> {
        Self::check_size(size)?;
        // Held until the checkpoint: no journal commit may make the released clusters
        // durable before the new size is (a crash would leave the old size reading
        // zeros past the new end).
        let mut m = lock(&self.meta);
        {
            let mut s = self.lock_state();
            let id = s.id_of(name)?;
            let cs = self.cluster_size;
            let v = &s.vols[&id];
            if v.is_snapshot() {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{name:?} is a snapshot; snapshots cannot be resized"),
                ));
            }
            if size / cs > u32::MAX as u64 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "volume size is too large for this cluster size",
                ));
            }
            let old = v.entry.size;
            if size < old {
                if !force {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!("shrinking {name:?} from {old} to {size} bytes needs --force"),
                    ));
                }
                let first = size / cs; // the cluster holding the new end, if partial
                let beyond: Vec<(u64, u64)> = v.map.iter().filter(|&(x, _)| x >= first).collect();
                let data_past = beyond
                    .iter()
                    .any(|&(x, _)| x > first || size.is_multiple_of(cs));
                if data_past && !discard_data {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "{name:?} holds data past {size} bytes; add --discard-data to drop it"
                        ),
                    ));
                }
                let partial = (!size.is_multiple_of(cs)).then_some(first);
                // Keep the cluster holding the new end; its tail is zeroed below.
                for (x, _) in beyond.into_iter().filter(|&(x, _)| Some(x) != partial) {
                    s.unmap(id, x);
                }
                if let Some(x) = partial {
                    if let Some(c) = s.vols[&id].map.get(x) {
                        let off = self.data_offset + c * cs + size % cs;
                        self.file
                            .zero(self.block_dev, off, cs - size % cs)
                            .map_err(|e| io_err(&self.path, "zero the tail", e))?;
                    }
                }
            }
            let v = s
                .vols
                .get_mut(&id)
                .ok_or_else(|| Error::new(ErrorKind::NotFound, "volume vanished"))?;
            v.entry.size = size;
            v.entry.parent_limit = v.entry.parent_limit.min(size);
            v.handle.size.store(size, Ordering::Release);
            let slot = v.slot;
            s.mark_slot(slot);
        }
        self.checkpoint_held(&mut m)
    }

    /// Delete a volume or snapshot. A snapshot that clones still read through is hidden
    /// and freed when its last clone goes. With `erase`, the released clusters are zeroed
    /// before this returns (`progress(done_bytes, total_bytes)`).
    pub fn delete(
        &self,
        name: &str,
        erase: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        // Held until the checkpoint: no journal commit may make the released clusters
        // durable before the volume's removal is (a crash would leave the volume listed,
        // reading zeros).
        let mut m = lock(&self.meta);
        let erased = {
            let mut s = self.lock_state();
            let id = s.id_of(name)?;
            let kids = s.children(id);
            if kids.len() >= 2 {
                if erase {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("{name:?} has {} clones that read its data: it cannot be erased until they are deleted", kids.len()),
                    ));
                }
                let v = s
                    .vols
                    .get_mut(&id)
                    .ok_or_else(|| Error::new(ErrorKind::NotFound, "volume vanished"))?;
                v.entry.flags |= VOLUME_HIDDEN;
                // Free the name for reuse: hidden entries keep an internal one.
                v.entry.name = format!(".deleted-{id}");
                let slot = v.slot;
                s.mark_slot(slot);
                Vec::new()
            } else {
                if erase && kids.len() == 1 {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("{name:?} has a clone that reads its data: it cannot be erased until the clone is deleted"),
                    ));
                }
                self.drop_volume(&mut s, id)
            }
        };
        self.checkpoint_held(&mut m)?;
        drop(m);
        if erase {
            // The release is durable: zero now rather than in the background.
            let mut s = self.lock_state();
            s.to_zero.retain(|c| !erased.contains(c));
            drop(s);
            // I/O still in flight to a released cluster finishes within moments; a
            // pin that stays up belongs to a queue whose device stopped answering (its
            // clusters are kept forever, see ThinQueue's drop): erase fails rather than
            // wait for ever.
            let limit = self.command_timeout_ms.load(Ordering::Relaxed);
            let deadline = std::time::Instant::now() + std::time::Duration::from_millis(limit);
            for &c in &erased {
                while self.pins[c as usize].load(Ordering::Acquire) != 0 {
                    if std::time::Instant::now() >= deadline {
                        // Back to the background zeroing, which takes them once unpinned.
                        self.lock_state().to_zero.extend(erased.iter().copied());
                        return Err(Error::new(
                            ErrorKind::Busy,
                            format!("{name:?}: cluster {c} still has I/O in flight after {limit} ms (pool.command_timeout_ms); its data cannot be erased while the device holds it (the volume is deleted, the erase did not complete)"),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.zero_clusters(&erased, progress)?;
            let mut s = self.lock_state();
            for &c in &erased {
                s.set_owner(c, Owner::Free);
                s.free += 1;
            }
            drop(s);
            self.commit()?;
        } else {
            self.kick();
        }
        Ok(())
    }

    /// Remove volume `id` (which has at most one child): its clusters are released, or,
    /// with one child, merged into it. Then a hidden parent left with no child is dropped
    /// in turn, and one left with a single child is merged. Returns released clusters.
    fn drop_volume(&self, s: &mut State, id: u32) -> Vec<u64> {
        let mut released = Vec::new();
        let kids = s.children(id);
        let Some(v) = s.remove_vol(id) else {
            return released;
        };
        if let Some(&child) = kids.first() {
            // Merge: the child keeps what it maps; the rest moves to it.
            let limit = s.vols.get(&child).map_or(0, |c| c.entry.parent_limit);
            let cs = self.cluster_size;
            for (x, c) in v.map.iter() {
                let shadowed = s.vols.get(&child).is_none_or(|cv| cv.map.get(x).is_some());
                if shadowed || x >= limit.div_ceil(cs) {
                    s.release(c);
                    released.push(c);
                } else if let Some(cv) = s.vols.get_mut(&child) {
                    cv.map.set(x, Some(c));
                    s.set_owner(
                        c,
                        Owner::Vol {
                            vol: child,
                            index: x as u32,
                        },
                    );
                }
            }
            if let Some(cv) = s.vols.get_mut(&child) {
                cv.entry.parent = v.entry.parent;
                cv.entry.parent_limit = cv.entry.parent_limit.min(v.entry.parent_limit);
                let slot = cv.slot;
                s.mark_slot(slot);
            }
        } else {
            for (_, c) in v.map.iter() {
                s.release(c);
                released.push(c);
            }
        }
        let p = v.entry.parent;
        if p != 0 && s.vols.get(&p).is_some_and(|pv| pv.hidden()) && s.children(p).len() <= 1 {
            released.extend(self.drop_volume(s, p));
        }
        released
    }

    /// The handle a device of volume `name` follows.
    pub(crate) fn handle(&self, name: &str) -> Result<(Arc<VolHandle>, bool)> {
        let s = self.lock_state();
        let id = s
            .id_of(name)
            .map_err(|e| Error::new(e.kind, format!("{} ({})", e.msg, self.path.display())))?;
        let v = &s.vols[&id];
        Ok((v.handle.clone(), v.is_snapshot()))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // The flusher holds only a weak reference; make sure it is gone.
        self.request(|r| r.stop = true);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fails commands parked longer than the pool's command timeout; holds the pool only
/// while it looks.
fn watchdog(pool: std::sync::Weak<Pool>) {
    loop {
        let tick = match pool.upgrade() {
            Some(p) => {
                p.expire_waiters();
                p.command_timeout_ms.load(Ordering::Relaxed) / 8
            }
            None => return,
        };
        std::thread::sleep(std::time::Duration::from_millis(tick.clamp(10, 1000)));
    }
}

/// The flusher thread: group commits for flushes, claims, and background zeroing.
/// It sleeps on a condition variable, holding no reference to the pool, when idle.
fn flusher(pool: std::sync::Weak<Pool>, sh: Arc<FlushShared>) {
    loop {
        let (waiters, recorded, claim, kick, stop) = {
            let mut r = lock(&sh.req);
            while r.waiters.is_empty() && r.recorded.is_empty() && !r.claim && !r.kick && !r.stop {
                r = sh.cv.wait(r).unwrap_or_else(|e| e.into_inner());
            }
            (
                std::mem::take(&mut r.waiters),
                std::mem::take(&mut r.recorded),
                std::mem::take(&mut r.claim),
                std::mem::take(&mut r.kick),
                r.stop,
            )
        };
        let Some(p) = pool.upgrade() else {
            for w in waiters.into_iter().chain(recorded) {
                w.wake(nvmux_core::Status::ABORTED);
            }
            return;
        };
        if stop {
            for w in waiters.into_iter().chain(recorded) {
                w.wake(nvmux_core::Status::ABORTED);
            }
            return;
        }
        let zero = p.take_to_zero();
        let mut status = nvmux_core::Status::SUCCESS;
        let any = !waiters.is_empty();
        let any_recorded = !recorded.is_empty();
        // Where the watchdog can fail them if the commit never returns.
        lock(&p.committing).extend(waiters.into_iter().chain(recorded));
        if any || !zero.is_empty() || kick {
            // A commit also writes the records the `recorded` completions wait for.
            if let Err(e) = p.commit() {
                tracing::error!("{e}");
                status = nvmux_core::Status::WRITE_FAULT;
            }
        } else if any_recorded {
            if let Err(e) = p.write_journal() {
                tracing::error!("{e}");
                status = nvmux_core::Status::WRITE_FAULT;
            }
        }
        let waiters = std::mem::take(&mut *lock(&p.committing));
        for w in waiters {
            w.wake(status);
        }
        if claim {
            // Claim when few are left, or fewer than a waiting command needs; either
            // way the waiters run again (with enough, or to find there is no space).
            let (have, want) = {
                let s = p.lock_state();
                (s.claimed.len() as u64, s.claim_want)
            };
            if have < 64 || have < want {
                if let Err(e) = p.claim(p.claim_batch(), want.saturating_sub(have)) {
                    tracing::error!("{e}");
                }
            }
            p.wake_claim_waiters();
        }
        if status.is_ok() {
            if let Err(e) = p.zero_released(zero) {
                tracing::error!("{e}");
            }
        } else {
            p.lock_state().to_zero.extend(zero);
        }
        if p.lock_state().has_to_zero() {
            // Some are still in use by I/O in flight: look again shortly.
            drop(p);
            std::thread::sleep(std::time::Duration::from_millis(2));
            lock(&sh.req).kick = true;
        }
    }
}
