//! The `mirror` function: a [`BlockDevice`] over N legs (any backend) that keeps them
//! equal, with a persistent, crash-safe write-intent bitmap (in the spirit of md raid1 and
//! dm-mirror bitmaps; no code taken from them).
//!
//! # I/O semantics
//! * **Writes, flushes, discards and write zeroes** go to every Healthy and Syncing leg;
//!   the command completes when all of them did. Its status is success if at least one leg
//!   that was Healthy when the command was issued succeeded, else the error of the last
//!   failing leg. A leg that fails one of these commands is Faulted and gets no more I/O.
//!   With no Healthy leg, the command fails (write fault).
//! * **Reads** go to one Healthy leg: the one with the fewest outstanding commands on this
//!   queue (ties: the lower leg slot). A failed read is retried on the next Healthy leg
//!   (`read_retries`); when a retry succeeds, the data is written back to the legs that
//!   failed (read repair, `read_repairs`); a leg whose repair write fails is Faulted.
//!   Syncing legs never serve reads. While the dirty regions found at open (a crash while
//!   mirrored) are being resynced, reads of those regions go to the source leg only.
//! * **Write-intent bitmap**: one bit per region (`region_size`, default 1 MiB). Before a
//!   write (or write zeroes / discard) is issued to any leg, the bits of its regions are
//!   durable in the bitmap file. A bit already durable costs nothing; otherwise the queue
//!   sets the bit in memory, parks the command and wakes the bitmap writer thread, which
//!   writes the changed 4 KiB bitmap pages and `fdatasync`s once for every bit set
//!   meanwhile (group commit), then signals each queue's eventfd (part of `wait_fds`).
//!   Bits clear lazily: a region's bit is cleared (written with the next bitmap write,
//!   without a sync) when no write is in flight on it, `clear_delay` has passed since its
//!   last write, every leg is Healthy and no crash resync is pending.
//! * **Leg faults are durable before they are relied on**: a write that failed on some leg
//!   is acknowledged only after the leg table that says Faulted is durable in the bitmap
//!   file, so after a crash a faulted leg is never a copy source.
//! * **Resync** (the sync thread, with its own queues on the legs, bounded waits): a leg
//!   that comes back after a fault copies only the regions dirty in the bitmap (written
//!   while it was away, or in flight when it failed) — `resynced_regions`. A new leg gets a
//!   full copy with a persistent cursor in the leg table (a crash resumes from the cursor;
//!   the regions dirty meanwhile are copied after it). A region copy never overwrites newer
//!   guest data: it reads the region's write generation and waits for no write in flight,
//!   copies, and is done only if the generation did not move (else it copies again). When
//!   guest writes keep a region from a clean pass, the sync thread sets a barrier on it:
//!   queues hold new writes to that region (not yet counted in flight) until the copy is
//!   done, so a resync always makes progress. Copies are rate-limited by `sync_rate`. A leg whose copy is done becomes Healthy, durably.
//!   After an open with dirty bits and two or more Healthy legs (a crash while mirrored),
//!   the dirty regions are copied from the first Healthy leg to the other Healthy legs.
//! * After `shutdown` (or drop), queues still open fail writes that need a new bit.
//! * **Faulted legs** are probed every `probe_interval` (a one-block read); on success the
//!   leg goes Syncing (new writes first, then the dirty regions), then Healthy.
//! * **Size**: the minimum of the legs' capacities at the first open; the bitmap covers
//!   that size. Growing a mirror is not supported (a leg larger than the mirror is fine;
//!   a mirror whose legs shrank below the file's size is refused).
//! * **Solo**: a mirror opened with one leg and no bitmap file (every disk of the daemon's
//!   default chain) is a pass-through: no file, no thread, no per-region array; writes
//!   only count themselves. `add_leg` turns it into a mirror: it allocates the arrays,
//!   creates the bitmap file, stops untracked writes (it waits until every write issued
//!   in solo mode has completed, so the full copy cannot miss one), starts the threads.
//! * Legs live in fixed slots (0..8); the preferred source is the Healthy leg in the
//!   lowest slot, which is `legs[0]` of `open` unless legs were removed and added since.
//! * A read repair that may have raced a guest write of the same regions (a write was in
//!   flight or issued between the retry read and the end of the repair) faults the
//!   repaired leg, so it resyncs those regions instead of keeping older data (rare).
//!
//! # Bitmap file format (version 1, all integers little-endian)
//! ```text
//! page 0 (4 KiB)  header copy A   | the header is written alternately to page
//! page 1 (4 KiB)  header copy B   | generation % 2; on open the valid copy with the
//!                                 | higher generation wins (a torn write loses one copy)
//! page 2..        bitmap: bit i = byte 8192 + i/8, bit i%8 (LSB first) = region i;
//!                 ceil(regions / 8) bytes rounded up to whole 4 KiB pages, no checksum
//!                 (a torn bitmap page only holds bits being set or cleared; a stray
//!                 set bit costs one region copy)
//!
//! header:
//!   0   magic "NVMXMBM1"        8 bytes
//!   8   version u32 (1)
//!   12  leg count u32 (<= 8)
//!   16  region_size u64 (power of two, >= 512)
//!   24  regions u64 (= ceil(size / region_size))
//!   32  generation u64 (incremented by every header write)
//!   40  size u64 (bytes covered by the bitmap)
//!   48  leg table: 8 entries of 88 bytes:
//!         +0  name [u8; 64], NUL-padded UTF-8
//!         +64 state u8 (0 healthy, 1 syncing, 2 faulted), +65..72 reserved (0)
//!         +72 sync cursor u64 (regions below it are copied; = regions when no full copy)
//!         +80 faulted-at u64 (seconds since the Unix epoch, 0 = never)
//!   752 CRC32C (nvmux_core::crc32c) of bytes 0..752, u32
//!   rest of the page: zero
//! ```
//! A file with a bad magic, no valid header, a region size other than configured, or a
//! size the legs cannot hold is refused with an error that says which.

use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvmux_core::eventfd::EventFd;
use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, Error, ErrorKind, Result};

mod bitmap;
mod queue;
mod sync;

pub use bitmap::{BitmapInfo, LegRecord, MAX_LEGS};

/// One leg of a mirror.
pub struct Leg {
    pub name: String,
    pub dev: Arc<dyn BlockDevice>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegState {
    Healthy,
    Syncing,
    Faulted,
}

impl LegState {
    pub fn as_str(self) -> &'static str {
        match self {
            LegState::Healthy => "healthy",
            LegState::Syncing => "syncing",
            LegState::Faulted => "faulted",
        }
    }
    fn to_u8(self) -> u8 {
        self as u8
    }
    fn from_u8(v: u8) -> LegState {
        match v {
            0 => LegState::Healthy,
            1 => LegState::Syncing,
            _ => LegState::Faulted,
        }
    }
}

#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// Bytes per bitmap bit; a power of two, at least the block size. Default 1 MiB.
    pub region_size: u64,
    /// Bytes/s for full copies and resyncs; 0 = unlimited. Default 256 MiB/s.
    pub sync_rate: u64,
    /// A clean region's bit is cleared this long after its last write. Default 2 s.
    pub clear_delay: Duration,
    /// How often a faulted leg is probed to come back. Default 1 s.
    pub probe_interval: Duration,
    /// Legs (by name) that are new to the bitmap file but already hold the mirror's data
    /// (a disk's single backend that becomes a mirror): they start Healthy instead of
    /// Syncing with a full copy. When the file is created, `legs[0]` is always taken as
    /// holding the data.
    pub assume_clean: Vec<String>,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            region_size: 1 << 20,
            sync_rate: 256 << 20,
            clear_delay: Duration::from_secs(2),
            probe_interval: Duration::from_secs(1),
            assume_clean: Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MirrorStatus {
    pub region_size: u64,
    pub regions: u64,
    pub dirty_regions: u64,
    pub legs: Vec<LegStatus>,
    /// Regions copied by dirty-region resyncs since open.
    pub resynced_regions: u64,
    pub full_copies: u64,
    /// Bitmap page writes and syncs.
    pub bitmap_writes: u64,
    pub read_repairs: u64,
    pub read_retries: u64,
}

#[derive(Clone, Debug)]
pub struct LegStatus {
    pub name: String,
    pub state: LegState,
    /// Bytes copied / to copy, for a progress bar (0/0 when no copy runs).
    pub sync_done: u64,
    pub sync_total: u64,
    /// Commands of this mirror in flight on the leg.
    pub in_flight: u64,
    pub errors: u64,
    pub faulted_at: Option<SystemTime>,
}

pub use bitmap::read_bitmap;

/// A leg as the queues and threads share it.
pub(crate) struct LegShared {
    pub name: String,
    pub dev: Arc<dyn BlockDevice>,
    pub state: AtomicU8,
    /// Being removed: gets no new command.
    pub removing: AtomicBool,
    pub in_flight: AtomicU64,
    pub errors: AtomicU64,
    pub faulted_at: AtomicU64,
    pub cursor: AtomicU64,
    pub sync_done: AtomicU64,
    pub sync_total: AtomicU64,
}

impl LegShared {
    pub fn state(&self) -> LegState {
        LegState::from_u8(self.state.load(SeqCst))
    }
    /// Count a command about to go to this leg; false (and nothing counted) when the leg
    /// is being removed.
    pub fn enter(&self) -> bool {
        self.in_flight.fetch_add(1, SeqCst);
        if self.removing.load(SeqCst) {
            self.in_flight.fetch_sub(1, SeqCst);
            return false;
        }
        true
    }
    pub fn leave(&self) {
        self.in_flight.fetch_sub(1, SeqCst);
    }
}

/// Counters shown by `status`.
#[derive(Default)]
pub(crate) struct Counters {
    pub resynced_regions: AtomicU64,
    pub full_copies: AtomicU64,
    pub bitmap_writes: AtomicU64,
    pub read_repairs: AtomicU64,
    pub read_retries: AtomicU64,
}

/// The bitmap writer's own state: what the file holds.
struct WriterState {
    file: File,
    /// Bitmap words as last written.
    disk: Vec<u64>,
    generation: u64,
    table_written: u64,
    page: Vec<u8>,
    snap: Vec<u64>,
}

/// A per-region array allocated when the mirror first has two legs (empty while solo).
pub(crate) struct LazyVec<T>(OnceLock<Vec<T>>);

impl<T> LazyVec<T> {
    fn new(v: Option<Vec<T>>) -> Self {
        let l = OnceLock::new();
        if let Some(v) = v {
            let _ = l.set(v);
        }
        LazyVec(l)
    }
    fn init(&self, v: Vec<T>) {
        let _ = self.0.set(v);
    }
}

impl<T> std::ops::Deref for LazyVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.0.get().map_or(&[], |v| v.as_slice())
    }
}

pub(crate) struct Inner {
    pub info: DeviceInfo,
    pub bs: u64,
    pub region_shift: u32,
    pub region_size: u64,
    pub regions: u64,
    /// Dirty bits in memory.
    pub bits: LazyVec<AtomicU64>,
    /// Bits known set in the file (durable).
    pub durable: LazyVec<AtomicU64>,
    pub inflight: LazyVec<AtomicU32>,
    pub gen: LazyVec<AtomicU32>,
    /// Milliseconds since `epoch` of each region's last write completion.
    pub last_write: LazyVec<AtomicU32>,
    /// One leg, no bitmap file, no threads: a pass-through (see the crate docs).
    pub solo: AtomicBool,
    /// Writes issued in solo mode and not completed.
    pub solo_writes: AtomicU64,
    /// The one leg of a mirror opened solo (its live size is the mirror's while solo).
    solo_leg: Option<Arc<dyn BlockDevice>>,
    pub epoch: Instant,
    pub legs: RwLock<Vec<Option<Arc<LegShared>>>>,
    pub legs_version: AtomicU64,
    pub table_version: AtomicU64,
    pub table_durable: AtomicU64,
    /// Dirty regions found at open with every leg Healthy still need copying.
    pub crash_resync: AtomicBool,
    /// A region whose new writes queues hold back (`u64::MAX`: none): the sync thread
    /// sets it when guest writes keep a region copy from finishing.
    pub barrier: AtomicU64,
    /// The bitmap file cannot be written: parked commands fail.
    pub bitmap_failed: AtomicBool,
    writer_wake: Mutex<bool>,
    writer_cv: Condvar,
    sync_wake: Mutex<bool>,
    sync_cv: Condvar,
    pub shutdown: AtomicBool,
    queues: Mutex<Vec<Weak<EventFd>>>,
    pub sync_rate: AtomicU64,
    pub clear_delay: Duration,
    pub probe_interval: Duration,
    pub counters: Counters,
    /// `None` while solo.
    writer: Mutex<Option<WriterState>>,
    path: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    pub fn region_of(&self, lba: u64) -> u64 {
        (lba * self.bs) >> self.region_shift
    }

    /// Regions `first..=last` a command touches (for commands with blocks).
    pub fn regions_of(&self, slba: u64, nlb: u32) -> (u64, u64) {
        let first = self.region_of(slba);
        let last = self.region_of(slba + nlb.max(1) as u64 - 1);
        (first, last.min(self.regions - 1))
    }

    pub fn bit(&self, r: u64) -> (usize, u64) {
        ((r / 64) as usize, 1u64 << (r % 64))
    }

    pub fn is_durable(&self, r: u64) -> bool {
        let (w, m) = self.bit(r);
        self.durable[w].load(SeqCst) & m != 0
    }

    pub fn is_dirty(&self, r: u64) -> bool {
        let (w, m) = self.bit(r);
        self.bits[w].load(SeqCst) & m != 0
    }

    pub fn set_bit(&self, r: u64) {
        let (w, m) = self.bit(r);
        self.bits[w].fetch_or(m, SeqCst);
    }

    pub fn now_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    pub fn legs_snapshot(&self) -> Vec<Arc<LegShared>> {
        self.legs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn all_healthy(&self) -> bool {
        self.legs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .all(|l| l.state() == LegState::Healthy)
    }

    pub fn wake_writer(&self) {
        *lock(&self.writer_wake) = true;
        self.writer_cv.notify_all();
    }

    pub fn wake_sync(&self) {
        *lock(&self.sync_wake) = true;
        self.sync_cv.notify_all();
    }

    /// Sleep until woken or `d` passes.
    pub fn sync_sleep(&self, d: Duration) {
        let g = lock(&self.sync_wake);
        let (mut g, _) = self
            .sync_cv
            .wait_timeout_while(g, d, |w| !*w && !self.shutdown.load(SeqCst))
            .unwrap_or_else(|e| e.into_inner());
        *g = false;
    }

    /// The leg table changed: returns the version that must be durable for it.
    pub fn table_changed(&self) -> u64 {
        let v = self.table_version.fetch_add(1, SeqCst) + 1;
        self.wake_writer();
        v
    }

    /// Wait (bounded) until table version `v` is durable.
    pub fn wait_table(&self, v: u64, max: Duration) -> bool {
        let end = Instant::now() + max;
        while self.table_durable.load(SeqCst) < v {
            if Instant::now() >= end
                || self.bitmap_failed.load(SeqCst)
                || self.shutdown.load(SeqCst)
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Fault a leg (from a Healthy or Syncing state). Returns the table version that must
    /// be durable before anything relies on the fault.
    pub fn fault_leg(&self, leg: &LegShared) -> u64 {
        let prev = leg.state.swap(LegState::Faulted.to_u8(), SeqCst);
        if prev != LegState::Faulted.to_u8() {
            leg.faulted_at.store(now_secs(), SeqCst);
            tracing::warn!(leg = %leg.name, "mirror leg faulted");
            self.table_changed()
        } else {
            self.table_version.load(SeqCst)
        }
    }

    fn register_queue(&self, efd: &Arc<EventFd>) {
        let mut q = lock(&self.queues);
        q.retain(|w| w.strong_count() > 0);
        q.push(Arc::downgrade(efd));
    }

    pub fn signal_queues(&self) {
        for w in lock(&self.queues).iter() {
            if let Some(e) = w.upgrade() {
                e.signal();
            }
        }
    }

    fn header(&self, generation: u64) -> bitmap::Header {
        let legs = self
            .legs_snapshot()
            .iter()
            .map(|l| LegRecord {
                name: l.name.clone(),
                state: l.state(),
                cursor: l.cursor.load(SeqCst),
                faulted_at: l.faulted_at.load(SeqCst),
            })
            .collect();
        bitmap::Header {
            region_size: self.region_size,
            regions: self.regions,
            size: self.info.size_bytes(),
            generation,
            legs,
        }
    }

    /// Clear the bits of idle regions (see the crate docs for when).
    fn clear_idle(&self) {
        if self.crash_resync.load(SeqCst) || !self.all_healthy() {
            return;
        }
        let now = self.now_ms();
        let delay = self.clear_delay.as_millis().min(u32::MAX as u128) as u32;
        for (w, word) in self.bits.iter().enumerate() {
            let mut b = word.load(SeqCst);
            while b != 0 {
                let i = b.trailing_zeros();
                b &= b - 1;
                let r = w as u64 * 64 + i as u64;
                let ri = r as usize;
                let m = 1u64 << i;
                if self.inflight[ri].load(SeqCst) != 0
                    || now.wrapping_sub(self.last_write[ri].load(SeqCst)) < delay
                {
                    continue;
                }
                let was = self.durable[w].fetch_and(!m, SeqCst) & m;
                word.fetch_and(!m, SeqCst);
                if self.inflight[ri].load(SeqCst) != 0 {
                    // A write started meanwhile and may have relied on the durable bit.
                    word.fetch_or(m, SeqCst);
                    self.durable[w].fetch_or(was, SeqCst);
                }
            }
        }
    }

    /// One writer pass: clear idle bits, write changed bitmap pages and the header when
    /// the leg table changed, sync when a bit was set or the header changed, publish.
    fn write_pass(&self, final_pass: bool) -> std::io::Result<()> {
        let mut guard = lock(&self.writer);
        let Some(ws) = guard.as_mut() else {
            return Ok(()); // solo: no file
        };
        if !final_pass {
            self.clear_idle();
        }
        let WriterState {
            file,
            disk,
            generation,
            table_written,
            page,
            snap,
        } = ws;
        for (s, b) in snap.iter_mut().zip(self.bits.iter()) {
            *s = b.load(SeqCst);
        }
        let tv = self.table_version.load(SeqCst);
        let mut need_sync = false;
        let mut writes = 0u64;
        let words_per_page = (bitmap::PAGE / 8) as usize;
        for (p, (sc, dc)) in snap
            .chunks(words_per_page)
            .zip(disk.chunks_mut(words_per_page))
            .enumerate()
        {
            if sc == dc {
                continue;
            }
            if sc.iter().zip(dc.iter()).any(|(s, d)| s & !d != 0) {
                need_sync = true;
            }
            page.fill(0);
            for (i, w) in sc.iter().enumerate() {
                page[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            file.write_all_at(page, bitmap::BITMAP_OFF + p as u64 * bitmap::PAGE)?;
            dc.copy_from_slice(sc);
            writes += 1;
        }
        if tv != *table_written || final_pass {
            let g = *generation + 1;
            self.header(g).encode(page);
            file.write_all_at(page, (g % 2) * bitmap::PAGE)?;
            *generation = g;
            *table_written = tv;
            need_sync = true;
            writes += 1;
        }
        if need_sync {
            file.sync_data()?;
            writes += 1;
        }
        self.counters.bitmap_writes.fetch_add(writes, SeqCst);
        // A bit set again after a lazy clear that never reached the file needs no write,
        // but its parked command still needs the wake-up.
        let mut changed = false;
        for (d, s) in self.durable.iter().zip(snap.iter()) {
            changed |= d.swap(*s, SeqCst) != *s;
        }
        self.table_durable.store(tv, SeqCst);
        drop(guard);
        if writes > 0 || changed {
            self.signal_queues();
        }
        Ok(())
    }
}

fn writer_main(inner: Arc<Inner>) {
    let tick = (inner.clear_delay / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    loop {
        {
            let g = lock(&inner.writer_wake);
            let (mut g, _) = inner
                .writer_cv
                .wait_timeout_while(g, tick, |w| !*w && !inner.shutdown.load(SeqCst))
                .unwrap_or_else(|e| e.into_inner());
            *g = false;
        }
        if inner.shutdown.load(SeqCst) {
            break;
        }
        match inner.write_pass(false) {
            Ok(()) => {
                inner.bitmap_failed.store(false, SeqCst);
            }
            Err(e) => {
                if !inner.bitmap_failed.swap(true, SeqCst) {
                    tracing::error!(path = %inner.path.display(), "mirror bitmap write failed: {e}");
                }
                inner.signal_queues();
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A mirror over N legs.
pub struct MirrorDevice {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

/// Check that a leg can join a mirror of block size `bs` and size `size`.
fn check_leg(leg: &Leg, bs: u32, size: u64, want: Option<&DeviceInfo>) -> Result<()> {
    check_leg_ro(leg, bs, size, want, false)
}

/// [`check_leg`]; `allow_ro`: a solo mirror may stand on a read-only device (a
/// snapshot): it will never get a second leg.
fn check_leg_ro(
    leg: &Leg,
    bs: u32,
    size: u64,
    want: Option<&DeviceInfo>,
    allow_ro: bool,
) -> Result<()> {
    bitmap::check_name(&leg.name)?;
    let i = leg.dev.info();
    if i.block_size != bs {
        return Err(invalid(format!(
            "mirror leg {}: block size {} differs from the mirror's {bs}",
            leg.name, i.block_size
        )));
    }
    if i.read_only && !allow_ro {
        return Err(invalid(format!("mirror leg {}: read-only", leg.name)));
    }
    if leg.dev.capacity_bytes() < size {
        return Err(invalid(format!(
            "mirror leg {}: {} bytes, smaller than the mirror's {size}",
            leg.name,
            leg.dev.capacity_bytes()
        )));
    }
    if let Some(w) = want {
        if (w.discard && !i.discard)
            || (w.write_zeroes && !i.write_zeroes)
            || i.max_transfer < w.max_transfer
            || (i.volatile_cache && !w.volatile_cache)
        {
            return Err(invalid(format!(
                "mirror leg {}: lacks discard, write zeroes or the transfer size the mirror \
                 offers, or has a volatile cache the mirror does not announce",
                leg.name
            )));
        }
    }
    Ok(())
}

impl MirrorDevice {
    /// Open (or create, when the file is missing) the bitmap file at `bitmap`, with the
    /// legs in order (legs[0] is the preferred source). Leg states come from the file's
    /// leg table, matched by name; a leg new to the file starts Syncing with a full copy
    /// unless it is in `cfg.assume_clean` (or is legs[0] of a new file). Legs of the file
    /// that are not given are forgotten (given again later, they get a full copy). Fails
    /// when no leg is Healthy. Starts the bitmap writer and the sync thread.
    pub fn open(legs: Vec<Leg>, bitmap: &Path, cfg: MirrorConfig) -> Result<Arc<MirrorDevice>> {
        if legs.is_empty() || legs.len() > MAX_LEGS {
            return Err(invalid(format!(
                "a mirror needs 1 to {MAX_LEGS} legs, not {}",
                legs.len()
            )));
        }
        for (i, l) in legs.iter().enumerate() {
            if legs[..i].iter().any(|o| o.name == l.name) {
                return Err(invalid(format!("mirror leg name {:?} given twice", l.name)));
            }
        }
        let bs = legs[0].dev.info().block_size;
        if !cfg.region_size.is_power_of_two() || cfg.region_size < bs as u64 {
            return Err(invalid(format!(
                "mirror region size {} must be a power of two and at least the block size {bs}",
                cfg.region_size
            )));
        }
        let ctx = |e| Error::io(format!("mirror bitmap {}", bitmap.display()), e);
        let exists = bitmap.exists();
        let solo = legs.len() == 1 && !exists;
        let file = if solo {
            None
        } else {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(bitmap)
                    .map_err(ctx)?,
            )
        };
        let min_cap = legs
            .iter()
            .map(|l| l.dev.capacity_bytes())
            .min()
            .unwrap_or(0);
        let (header, words, created) = if let (true, Some(file)) = (exists, &file) {
            let (h, w) = bitmap::load(file, bitmap)?;
            if h.region_size != cfg.region_size {
                return Err(invalid(format!(
                    "mirror bitmap {}: region size {} differs from the configured {}",
                    bitmap.display(),
                    h.region_size,
                    cfg.region_size
                )));
            }
            if h.size > min_cap || h.size % bs as u64 != 0 {
                return Err(invalid(format!(
                    "mirror bitmap {}: covers {} bytes, but the legs hold {min_cap} (block size {bs})",
                    bitmap.display(),
                    h.size
                )));
            }
            (h, w, false)
        } else {
            let size = min_cap / bs as u64 * bs as u64;
            if size == 0 {
                return Err(invalid("mirror: the legs have no capacity".into()));
            }
            let regions = size.div_ceil(cfg.region_size);
            if regions > bitmap::MAX_REGIONS {
                return Err(invalid(format!(
                    "mirror: {regions} regions is too many; use a larger region size"
                )));
            }
            let h = bitmap::Header {
                region_size: cfg.region_size,
                regions,
                size,
                generation: 0,
                legs: Vec::new(),
            };
            (h, vec![0u64; regions.div_ceil(64) as usize], true)
        };
        let size = header.size;
        let regions = header.regions;
        let mut info = DeviceInfo {
            block_size: bs,
            num_blocks: size / bs as u64,
            read_only: false,
            discard: true,
            write_zeroes: true,
            volatile_cache: false,
            max_transfer: u32::MAX,
        };
        for l in &legs {
            check_leg_ro(l, bs, size, None, solo)?;
            let i = l.dev.info();
            info.discard &= i.discard;
            info.write_zeroes &= i.write_zeroes;
            info.volatile_cache |= i.volatile_cache;
            info.max_transfer = info.max_transfer.min(i.max_transfer);
            info.read_only |= i.read_only;
        }
        // Solo: flushes are asked for whatever the leg, so that any leg can join later.
        info.volatile_cache |= solo;
        let solo_leg = if solo {
            Some(legs[0].dev.clone())
        } else {
            None
        };
        for r in &header.legs {
            if !legs.iter().any(|l| l.name == r.name) {
                tracing::warn!(leg = %r.name, "mirror bitmap: a leg of the file is not given; forgetting it");
            }
        }
        let mut slots: Vec<Option<Arc<LegShared>>> = vec![None; MAX_LEGS];
        for (i, l) in legs.into_iter().enumerate() {
            let rec = header.legs.iter().find(|r| r.name == l.name);
            let (state, cursor, faulted_at) = match rec {
                Some(r) => (r.state, r.cursor, r.faulted_at),
                None if (created && i == 0) || cfg.assume_clean.contains(&l.name) => {
                    (LegState::Healthy, regions, 0)
                }
                None => (LegState::Syncing, 0, 0),
            };
            slots[i] = Some(Arc::new(LegShared {
                name: l.name,
                dev: l.dev,
                state: AtomicU8::new(state.to_u8()),
                removing: AtomicBool::new(false),
                in_flight: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                faulted_at: AtomicU64::new(faulted_at),
                cursor: AtomicU64::new(if state == LegState::Healthy {
                    regions
                } else {
                    cursor
                }),
                sync_done: AtomicU64::new(0),
                sync_total: AtomicU64::new(0),
            }));
        }
        if !slots
            .iter()
            .flatten()
            .any(|l| l.state() == LegState::Healthy)
        {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "mirror bitmap {}: no leg is healthy (no copy holds all the data)",
                    bitmap.display()
                ),
            ));
        }
        if let (true, Some(file)) = (created, &file) {
            bitmap::create(file, bitmap, &header)?;
        }
        let any_dirty = words.iter().any(|&w| w != 0);
        let healthy = slots
            .iter()
            .flatten()
            .filter(|l| l.state() == LegState::Healthy)
            .count();
        let n = regions as usize;
        let nwords = words.len();
        let inner = Arc::new(Inner {
            bs: bs as u64,
            region_shift: cfg.region_size.trailing_zeros(),
            region_size: cfg.region_size,
            regions,
            bits: LazyVec::new((!solo).then(|| words.iter().map(|&w| AtomicU64::new(w)).collect())),
            durable: LazyVec::new(
                (!solo).then(|| words.iter().map(|&w| AtomicU64::new(w)).collect()),
            ),
            inflight: LazyVec::new((!solo).then(|| (0..n).map(|_| AtomicU32::new(0)).collect())),
            gen: LazyVec::new((!solo).then(|| (0..n).map(|_| AtomicU32::new(0)).collect())),
            last_write: LazyVec::new((!solo).then(|| (0..n).map(|_| AtomicU32::new(0)).collect())),
            solo: AtomicBool::new(solo),
            solo_writes: AtomicU64::new(0),
            solo_leg,
            epoch: Instant::now(),
            legs: RwLock::new(slots),
            legs_version: AtomicU64::new(1),
            table_version: AtomicU64::new(1),
            table_durable: AtomicU64::new(0),
            crash_resync: AtomicBool::new(any_dirty && healthy >= 2),
            barrier: AtomicU64::new(u64::MAX),
            bitmap_failed: AtomicBool::new(false),
            writer_wake: Mutex::new(false),
            writer_cv: Condvar::new(),
            sync_wake: Mutex::new(false),
            sync_cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            queues: Mutex::new(Vec::new()),
            sync_rate: AtomicU64::new(cfg.sync_rate),
            clear_delay: cfg.clear_delay,
            probe_interval: cfg.probe_interval,
            counters: Counters::default(),
            writer: Mutex::new(file.map(|file| WriterState {
                file,
                disk: words.clone(),
                generation: header.generation.max(1),
                table_written: 0,
                page: vec![0u8; bitmap::PAGE as usize],
                snap: vec![0u64; nwords],
            })),
            path: bitmap.to_path_buf(),
            info,
        });
        let dev = Arc::new(MirrorDevice {
            inner: inner.clone(),
            threads: Mutex::new(Vec::new()),
        });
        if !solo {
            // The leg table as opened (new legs, states) is durable before any I/O.
            inner
                .write_pass(true)
                .map_err(|e| Error::io(format!("mirror bitmap {}", bitmap.display()), e))?;
            dev.start_threads()?;
        }
        Ok(dev)
    }

    /// Start the bitmap writer and the sync thread.
    fn start_threads(&self) -> Result<()> {
        let mut threads = lock(&self.threads);
        let w = self.inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("mirror-bitmap".into())
                .spawn(move || writer_main(w))
                .map_err(|e| Error::io("mirror: spawn the bitmap writer", e))?,
        );
        let s = self.inner.clone();
        threads.push(
            std::thread::Builder::new()
                .name("mirror-sync".into())
                .spawn(move || sync::sync_main(s))
                .map_err(|e| Error::io("mirror: spawn the sync thread", e))?,
        );
        Ok(())
    }

    /// Leave solo mode: per-region arrays, the bitmap file (leg 0 healthy), no more
    /// untracked writes, the threads. Called with the first `add_leg`.
    fn unsolo(&self) -> Result<()> {
        let inner = &self.inner;
        let n = inner.regions as usize;
        let nwords = inner.regions.div_ceil(64) as usize;
        let ctx = |e| Error::io(format!("mirror bitmap {}", inner.path.display()), e);
        if let Some(dir) = inner.path.parent() {
            std::fs::create_dir_all(dir).map_err(ctx)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&inner.path)
            .map_err(ctx)?;
        let header = inner.header(0);
        bitmap::create(&file, &inner.path, &header)?;
        inner
            .bits
            .init((0..nwords).map(|_| AtomicU64::new(0)).collect());
        inner
            .durable
            .init((0..nwords).map(|_| AtomicU64::new(0)).collect());
        inner
            .inflight
            .init((0..n).map(|_| AtomicU32::new(0)).collect());
        inner.gen.init((0..n).map(|_| AtomicU32::new(0)).collect());
        inner
            .last_write
            .init((0..n).map(|_| AtomicU32::new(0)).collect());
        *lock(&inner.writer) = Some(WriterState {
            file,
            disk: vec![0u64; nwords],
            generation: 1,
            table_written: 0,
            page: vec![0u8; bitmap::PAGE as usize],
            snap: vec![0u64; nwords],
        });
        // Queues count a solo write before they look at `solo` again (see
        // `MirrorQueue::start`): once this store is seen no write goes untracked, and
        // every write that went so is counted in `solo_writes`.
        inner.solo.store(false, SeqCst);
        let end = Instant::now() + Duration::from_secs(30);
        while inner.solo_writes.load(SeqCst) != 0 {
            if Instant::now() >= end {
                return Err(Error::new(
                    ErrorKind::Busy,
                    "mirror: writes issued before the mirror started are still in flight after 30 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        inner
            .write_pass(true)
            .map_err(|e| Error::io(format!("mirror bitmap {}", inner.path.display()), e))?;
        self.start_threads()
    }

    /// A live disk gains a leg: it gets every new write at once and a background full
    /// copy (rate-limited); Healthy when the copy is done. Size must be >= the mirror's.
    pub fn add_leg(&self, leg: Leg) -> Result<()> {
        let inner = &self.inner;
        check_leg(
            &leg,
            inner.info.block_size,
            inner.info.size_bytes(),
            Some(&inner.info),
        )?;
        if inner.solo.load(SeqCst) {
            if inner.info.read_only {
                return Err(invalid("a read-only disk cannot be mirrored".into()));
            }
            if let Some(l) = &inner.solo_leg {
                if l.capacity_bytes() != inner.info.size_bytes() {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        "the disk changed size since it was opened, and a mirror covers a fixed size: \
                         restart the daemon before adding a leg",
                    ));
                }
            }
            self.unsolo()?;
        }
        {
            let mut legs = inner.legs.write().unwrap_or_else(|e| e.into_inner());
            if legs.iter().flatten().any(|l| l.name == leg.name) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("mirror leg {:?} exists", leg.name),
                ));
            }
            let Some(slot) = legs.iter().position(|l| l.is_none()) else {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("a mirror holds at most {MAX_LEGS} legs"),
                ));
            };
            legs[slot] = Some(Arc::new(LegShared {
                name: leg.name,
                dev: leg.dev,
                state: AtomicU8::new(LegState::Syncing.to_u8()),
                removing: AtomicBool::new(false),
                in_flight: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                faulted_at: AtomicU64::new(0),
                cursor: AtomicU64::new(0),
                sync_done: AtomicU64::new(0),
                sync_total: AtomicU64::new(0),
            }));
            inner.legs_version.fetch_add(1, SeqCst);
        }
        let v = inner.table_changed();
        inner.signal_queues();
        if !inner.wait_table(v, Duration::from_secs(10)) {
            tracing::warn!("mirror: the leg table with the new leg is not durable yet");
        }
        inner.wake_sync();
        Ok(())
    }

    /// Remove a leg (not the last healthy one): waits (bounded) until no command of this
    /// mirror is in flight on it, then drops it and forgets it in the leg table.
    pub fn remove_leg(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        let legs = inner.legs_snapshot();
        let Some(leg) = legs.iter().find(|l| l.name == name) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("mirror leg {name:?} not found"),
            ));
        };
        let other_healthy = legs
            .iter()
            .any(|l| l.name != name && l.state() == LegState::Healthy);
        if !other_healthy {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("mirror leg {name:?} is the last healthy leg"),
            ));
        }
        leg.removing.store(true, SeqCst);
        let end = Instant::now() + Duration::from_secs(10);
        while leg.in_flight.load(SeqCst) != 0 {
            if Instant::now() >= end {
                // It missed writes meanwhile: it must not look equal to the others.
                inner.fault_leg(leg);
                leg.removing.store(false, SeqCst);
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("mirror leg {name:?}: commands still in flight after 10 s; faulted"),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        {
            let mut slots = inner.legs.write().unwrap_or_else(|e| e.into_inner());
            for s in slots.iter_mut() {
                if s.as_ref().is_some_and(|l| Arc::ptr_eq(l, leg)) {
                    *s = None;
                }
            }
            inner.legs_version.fetch_add(1, SeqCst);
        }
        let v = inner.table_changed();
        inner.signal_queues();
        inner.wake_sync();
        if !inner.wait_table(v, Duration::from_secs(10)) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("mirror leg {name:?} removed, but the leg table is not durable yet"),
            ));
        }
        Ok(())
    }

    pub fn status(&self) -> MirrorStatus {
        let inner = &self.inner;
        let c = &inner.counters;
        let dirty = inner
            .bits
            .iter()
            .map(|w| w.load(SeqCst).count_ones() as u64)
            .sum();
        MirrorStatus {
            region_size: inner.region_size,
            regions: inner.regions,
            dirty_regions: dirty,
            legs: inner
                .legs_snapshot()
                .iter()
                .map(|l| {
                    let f = l.faulted_at.load(SeqCst);
                    LegStatus {
                        name: l.name.clone(),
                        state: l.state(),
                        sync_done: l.sync_done.load(SeqCst),
                        sync_total: l.sync_total.load(SeqCst),
                        in_flight: l.in_flight.load(SeqCst),
                        errors: l.errors.load(SeqCst),
                        faulted_at: (f != 0).then(|| UNIX_EPOCH + Duration::from_secs(f)),
                    }
                })
                .collect(),
            resynced_regions: c.resynced_regions.load(SeqCst),
            full_copies: c.full_copies.load(SeqCst),
            bitmap_writes: c.bitmap_writes.load(SeqCst),
            read_repairs: c.read_repairs.load(SeqCst),
            read_retries: c.read_retries.load(SeqCst),
        }
    }

    pub fn set_sync_rate(&self, bytes_per_s: u64) {
        self.inner.sync_rate.store(bytes_per_s, SeqCst);
        self.inner.wake_sync();
    }

    /// True while the mirror is a pass-through over one leg with no bitmap file.
    pub fn is_solo(&self) -> bool {
        self.inner.solo.load(SeqCst)
    }

    /// Stop the sync thread, flush the bitmap (also on Drop).
    pub fn shutdown(&self) {
        let inner = &self.inner;
        inner.shutdown.store(true, SeqCst);
        inner.wake_writer();
        inner.wake_sync();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        // Queues still open fail the writes that would need a new bit.
        inner.signal_queues();
        if let Err(e) = inner.write_pass(true) {
            tracing::error!(path = %inner.path.display(), "mirror bitmap: final write failed: {e}");
        }
    }
}

impl Drop for MirrorDevice {
    fn drop(&mut self) {
        if !lock(&self.threads).is_empty() {
            self.shutdown();
        }
    }
}

impl BlockDevice for MirrorDevice {
    fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        let efd = Arc::new(EventFd::new().map_err(|e| Error::io("mirror queue eventfd", e))?);
        self.inner.register_queue(&efd);
        Ok(Box::new(queue::MirrorQueue::new(
            self.inner.clone(),
            depth.max(1),
            efd,
        )?))
    }
    fn capacity_bytes(&self) -> u64 {
        match (&self.inner.solo_leg, self.inner.solo.load(SeqCst)) {
            // Solo: the leg's live size (a thin volume that was resized).
            (Some(l), true) => l.capacity_bytes(),
            _ => self.inner.info.size_bytes(),
        }
    }
    fn describe(&self) -> String {
        let names: Vec<String> = self
            .inner
            .legs_snapshot()
            .iter()
            .map(|l| format!("{}={}", l.name, l.dev.describe()))
            .collect();
        format!("mirror [{}]", names.join(", "))
    }
}

/// Test hooks (crate tests): simulate a crash by stopping the threads without the final
/// bitmap write.
#[doc(hidden)]
impl MirrorDevice {
    pub fn crash_for_test(&self) {
        self.inner.shutdown.store(true, SeqCst);
        self.inner.wake_writer();
        self.inner.wake_sync();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

pub(crate) type Fd = RawFd;

#[cfg(test)]
mod tests;
