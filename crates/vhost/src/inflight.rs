//! Inflight I/O tracking for split virtqueues (vhost-user `INFLIGHT_SHMFD`).
//!
//! The back-end keeps, in a shared memory region that the front-end (QEMU) holds, one bit
//! of state per descriptor head: "popped and not yet on the used ring". The region outlives
//! the daemon. When the daemon dies (`kill -9`, a crash) QEMU reconnects, hands the region
//! back (SET_INFLIGHT_FD), and the new daemon resubmits every request that was in flight,
//! so no request is lost and none that completed is run again, whatever order the block
//! layer (io_uring) completed them in.
//!
//! # Layout (QEMU `docs/interop/vhost-user.rst`, "Inflight I/O tracking", split rings)
//!
//! One region per queue, back to back; queue `i` starts at `i * queue_bytes(queue_size)`:
//!
//! ```text
//!  0  features        u64    (0: none defined)
//!  8  version         u16    1; 0 = a region no back-end has used yet
//! 10  desc_num        u16    descriptor entries (the queue size of the region)
//! 12  last_batch_head u16    head of the list of the last batch put on the used ring
//! 14  used_idx        u16    used->idx after the last batch was fully recorded
//! 16  desc[desc_num]  16 bytes each: inflight u8, padding[5], next u16, counter u64
//! ```
//!
//! A queue's region is `16 + 16 * queue_size` bytes rounded up to 64. That is the same
//! size libvhost-user computes (`16 * queue_size + 2` rounded up to 64 comes to the same
//! value for every size), so a region stays compatible with other back-ends' layout.
//!
//! # The protocol, and why a crash at any instruction is recoverable
//!
//! * Pop (request taken from the available ring): `desc[head].counter = counter++`, then
//!   `desc[head].inflight = 1`.
//! * Completion, per batch of requests put on the used ring together: for each head,
//!   `desc[head].next = last_batch_head; last_batch_head = head`; then the used index is
//!   published to the guest; then `desc[head].inflight = 0` for each; then
//!   `used_idx = used->idx`.
//! * Start (after a reconnect), see [`recover`]: if `used_idx != used->idx` the daemon
//!   died after publishing a batch and before recording it, and the batch is exactly the
//!   `used->idx - used_idx` heads of the list from `last_batch_head`: they are cleared.
//!   Every head still marked is then in flight; they are resubmitted in counter order and
//!   the available ring continues at `used->idx + in flight` (every popped entry is either
//!   on the used ring or marked).
//!
//! A crash before a batch is published leaves its heads marked (resubmitted: a redone
//! block request is harmless, the guest never saw it complete); a crash after leaves a
//! mismatch the list repairs. Completion order does not matter: only the batch's own heads
//! are cleared.
//!
//! **A fresh region (SPDK#3766).** A region no back-end used has `version == 0`, and its
//! `used_idx` and `last_batch_head` are zeros that say nothing. Comparing that `used_idx`
//! with a ring that already moved (a migrated or long-running guest) would "repair" a
//! batch that never existed and clear `desc[0]`, which may be in flight. So a region with
//! version 0 is initialised before its queue pops anything: `used_idx` set to the ring's
//! `used->idx`, then `version = 1`, and no repair or resubmission happens.
//!
//! # Trust
//!
//! The region comes from the front-end and its contents are untrusted: every index is
//! checked against the queue size before use, a list walk is bounded by the queue size,
//! flags other than 0/1 are cleared, and counters only order the resubmission. The
//! mapping is registered with the SIGBUS recovery ([`nvmux_core::sigbus`]) like guest
//! memory, so a front-end that truncates the file costs only its own tracking.
//!
//! Ordering: the crash model is process death (`kill -9`), so stores must reach memory in
//! program order as seen by the next process; the stores are atomics with `Release` where
//! the order matters (plain `mov`s on x86) and no fence instructions are needed.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use nvmux_core::sigbus;

use crate::split::SplitQueue;

/// Queues one region may describe (the export's `num-queues` limit).
pub const MAX_QUEUES: u16 = 64;
/// The only region version defined.
pub const VERSION: u16 = 1;

const HEADER: usize = 16;
const DESC: usize = 16;
const ALIGN: usize = 64;

const H_VERSION: usize = 8;
const H_DESC_NUM: usize = 10;
const H_LAST_BATCH: usize = 12;
const H_USED_IDX: usize = 14;

const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

/// Bytes of one queue's region for `queue_size` descriptors.
pub const fn queue_bytes(queue_size: u16) -> usize {
    (HEADER + DESC * queue_size as usize).next_multiple_of(ALIGN)
}

/// Check a region's geometry and return its size in bytes.
pub fn region_bytes(num_queues: u16, queue_size: u16) -> Result<usize, String> {
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(format!(
            "inflight region for {num_queues} queues (1..={MAX_QUEUES})"
        ));
    }
    if queue_size == 0 || queue_size > crate::MAX_QUEUE_SIZE {
        return Err(format!(
            "inflight region for queues of {queue_size} descriptors (1..={})",
            crate::MAX_QUEUE_SIZE
        ));
    }
    Ok(num_queues as usize * queue_bytes(queue_size))
}

/// One queue's part of a region: `cap` descriptor entries at `base`.
#[derive(Clone, Copy)]
pub struct QueueMem {
    base: *mut u8,
    cap: u16,
}

// SAFETY: the memory is shared with another process by design and accessed only through
// atomics; the owner keeps it mapped while a QueueMem is used (see `Tracker::_keep`).
unsafe impl Send for QueueMem {}

impl QueueMem {
    /// # Safety
    /// `base` must be 8-aligned and point to `queue_bytes(cap)` bytes that stay mapped and
    /// writable while the returned value (or a copy) is used, and that are accessed by this
    /// process only through `QueueMem`.
    pub unsafe fn new(base: *mut u8, cap: u16) -> QueueMem {
        QueueMem { base, cap }
    }
    pub fn cap(&self) -> u16 {
        self.cap
    }
    fn at<T>(&self, off: usize) -> &T {
        debug_assert!(off + std::mem::size_of::<T>() <= queue_bytes(self.cap));
        // SAFETY: every caller passes a header offset or a descriptor offset for an index
        // < cap, inside the queue_bytes(cap) bytes `new` was promised; offsets are aligned
        // to the field size (base is 8-aligned, entries are 16 bytes).
        unsafe { &*(self.base.add(off) as *const T) }
    }
    fn h16(&self, off: usize) -> &AtomicU16 {
        self.at(off)
    }
    fn inflight(&self, i: u16) -> &AtomicU8 {
        self.at(HEADER + DESC * i as usize + D_INFLIGHT)
    }
    fn next(&self, i: u16) -> &AtomicU16 {
        self.at(HEADER + DESC * i as usize + D_NEXT)
    }
    fn counter(&self, i: u16) -> &AtomicU64 {
        self.at(HEADER + DESC * i as usize + D_COUNTER)
    }
}

#[cfg(test)]
thread_local! {
    /// Stores left before the simulated crash (tests only): once 0, stores are dropped.
    static STORES_LEFT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// May this store happen? (Always, outside the crash tests.)
#[inline(always)]
fn alive() -> bool {
    #[cfg(test)]
    {
        STORES_LEFT.with(|c| match c.get() {
            None => true,
            Some(0) => false,
            Some(n) => {
                c.set(Some(n - 1));
                true
            }
        })
    }
    #[cfg(not(test))]
    {
        true
    }
}

fn st8(a: &AtomicU8, v: u8, o: Ordering) {
    if alive() {
        a.store(v, o)
    }
}
fn st16(a: &AtomicU16, v: u16, o: Ordering) {
    if alive() {
        a.store(v.to_le(), o)
    }
}
fn st64(a: &AtomicU64, v: u64, o: Ordering) {
    if alive() {
        a.store(v.to_le(), o)
    }
}
fn ld16(a: &AtomicU16) -> u16 {
    u16::from_le(a.load(Ordering::Relaxed))
}

/// Marks requests in flight and clears them, on one queue's region (the worker's hot
/// path: plain stores, no allocation).
pub struct Tracker {
    q: QueueMem,
    /// Heads at or above this are not tracked (the ring's size).
    size: u16,
    counter: u64,
    /// `last_batch_head` as last stored (read from the region once, at start: the hot
    /// path only writes the region).
    last: u16,
    /// Heads of the batch being put on the used ring (capacity: the ring's size).
    batch: Vec<u16>,
    _keep: Option<Arc<Region>>,
}

impl Tracker {
    /// A tracker for a queue of `size` entries (≤ `q.cap()`), numbering from `counter`.
    pub fn new(q: QueueMem, size: u16, counter: u64, keep: Option<Arc<Region>>) -> Tracker {
        Tracker {
            q,
            size: size.min(q.cap),
            counter,
            last: ld16(q.h16(H_LAST_BATCH)),
            batch: Vec::with_capacity(size as usize),
            _keep: keep,
        }
    }

    /// A head was popped from the available ring.
    #[inline]
    pub fn popped(&mut self, head: u16) {
        if head >= self.size {
            // A malformed head (the chain is refused at once): nothing to track.
            return;
        }
        st64(self.q.counter(head), self.counter, Ordering::Relaxed);
        self.counter = self.counter.wrapping_add(1);
        // Release: the counter is stored before the flag.
        st8(self.q.inflight(head), 1, Ordering::Release);
    }

    /// The batch holds as many heads as the ring: publish before adding another (a
    /// guest can complete more than a ring's worth of chains between two publishes, e.g.
    /// malformed chains or GET_ID requests published while the queue pops).
    #[inline]
    pub fn batch_full(&self) -> bool {
        self.batch.len() >= self.size as usize
    }

    /// A head is being put on the used ring (before [`published`](Self::published)).
    /// Check [`batch_full`](Self::batch_full) first: a head beyond a full batch is not
    /// recorded (it would stay marked, and be resubmitted after a crash).
    #[inline]
    pub fn used(&mut self, head: u16) {
        if head >= self.size || self.batch_full() {
            return;
        }
        st16(self.q.next(head), self.last, Ordering::Relaxed);
        st16(self.q.h16(H_LAST_BATCH), head, Ordering::Release);
        self.last = head;
        self.batch.push(head);
    }

    /// The used index `used_idx` was stored in the guest's used ring: the batch is done.
    #[inline]
    pub fn published(&mut self, used_idx: u16) {
        if self.batch.is_empty() {
            return;
        }
        // The guest's used index (stored before this call) precedes the clearing.
        fence(Ordering::Release);
        for &h in &self.batch {
            st8(self.q.inflight(h), 0, Ordering::Relaxed);
        }
        st16(self.q.h16(H_USED_IDX), used_idx, Ordering::Release);
        self.batch.clear();
    }
}

/// What [`recover`] found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Heads to resubmit, oldest (lowest counter) first.
    pub resubmit: Vec<u16>,
    /// Where the available ring continues (`used->idx` + in flight), when anything was in
    /// flight; `None`: keep the front-end's base.
    pub next_avail: Option<u16>,
    /// The next counter value.
    pub counter: u64,
    /// The region was fresh (version 0) and was initialised.
    pub fresh: bool,
    /// A region of an unknown version, reinitialised (its contents are lost).
    pub unknown_version: Option<u16>,
    /// Heads of the last batch cleared because `used_idx` lagged `used->idx`.
    pub batch_fixed: u16,
    /// Entries ignored and cleared: heads at or above the ring's size, flags not 0 or 1.
    pub ignored: u32,
    /// More heads marked than the guest ever made available: nothing is resubmitted.
    pub inconsistent: bool,
}

/// Bring one queue's region in line with the ring before the queue starts, and list what
/// to resubmit. `vring_size` is the ring's size (≤ `q.cap()`); `ring_used` and
/// `ring_avail` are the guest's `used->idx` and `avail->idx`. Whatever the region holds,
/// this touches only `q`'s bytes, runs in O(cap log cap) and leaves a consistent region.
pub fn recover(q: &QueueMem, vring_size: u16, ring_used: u16, ring_avail: u16) -> Recovered {
    let mut r = Recovered::default();
    let size = vring_size.min(q.cap);
    let version = ld16(q.h16(H_VERSION));
    if version != VERSION {
        // Fresh (or unknown): no entry means anything. Clear them all, record where the
        // ring is, and only then claim the region (a crash before that leaves it fresh).
        if version != 0 {
            r.unknown_version = Some(version);
        }
        r.fresh = version == 0;
        for i in 0..q.cap {
            if q.inflight(i).load(Ordering::Relaxed) != 0 {
                st8(q.inflight(i), 0, Ordering::Relaxed);
            }
        }
        st16(q.h16(H_DESC_NUM), q.cap, Ordering::Relaxed);
        st16(q.h16(H_LAST_BATCH), 0, Ordering::Relaxed);
        st16(q.h16(H_USED_IDX), ring_used, Ordering::Relaxed);
        st16(q.h16(H_VERSION), VERSION, Ordering::Release);
        return r;
    }
    if ld16(q.h16(H_DESC_NUM)) != q.cap {
        st16(q.h16(H_DESC_NUM), q.cap, Ordering::Relaxed);
    }
    // 1. The last batch reached the guest but was not recorded: clear its heads.
    let region_used = ld16(q.h16(H_USED_IDX));
    if region_used != ring_used {
        let n = ring_used.wrapping_sub(region_used).min(size);
        let mut h = ld16(q.h16(H_LAST_BATCH));
        for _ in 0..n {
            if h >= q.cap {
                r.ignored += 1;
                break;
            }
            if q.inflight(h).load(Ordering::Relaxed) != 0 {
                st8(q.inflight(h), 0, Ordering::Relaxed);
            }
            r.batch_fixed += 1;
            h = ld16(q.next(h));
        }
        st16(q.h16(H_USED_IDX), ring_used, Ordering::Release);
    }
    // 2. Everything still marked is in flight.
    let mut found: Vec<(u64, u16)> = Vec::new();
    for i in 0..q.cap {
        let f = q.inflight(i).load(Ordering::Relaxed);
        if f == 0 {
            continue;
        }
        if f != 1 || i >= size {
            r.ignored += 1;
            st8(q.inflight(i), 0, Ordering::Relaxed);
            continue;
        }
        found.push((u64::from_le(q.counter(i).load(Ordering::Relaxed)), i));
    }
    found.sort_unstable();
    r.counter = found.last().map_or(0, |&(c, _)| c.saturating_add(1));
    // The guest made `ring_avail - ring_used` entries available past the used ones;
    // more marked heads than that cannot be (a stale or forged region).
    if found.len() > ring_avail.wrapping_sub(ring_used) as usize {
        r.inconsistent = true;
        for &(_, h) in &found {
            st8(q.inflight(h), 0, Ordering::Relaxed);
        }
        return r;
    }
    if !found.is_empty() {
        r.next_avail = Some(ring_used.wrapping_add(found.len() as u16));
        r.resubmit = found.into_iter().map(|(_, h)| h).collect();
    }
    r
}

/// A page-aligned shared mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping of `len` bytes, no longer registered (Region drops its
        // registration first) and no longer used (the last Arc<Region> is going).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The inflight region of one connection, mapped.
pub struct Region {
    /// Declared before `map`: unregistered from the SIGBUS recovery before the unmap.
    reg: sigbus::Registration,
    map: Mapping,
    num_queues: u16,
    queue_size: u16,
    /// The file range the region was created or opened with (what a takeover hands on
    /// with the descriptor, so the new process opens the same range).
    mmap_size: u64,
    mmap_offset: u64,
    /// Kept so the region can be handed on (a dup of the front-end's descriptor).
    file: File,
}

// SAFETY: the raw pointer refers to a shared mapping owned by the Region and accessed only
// through atomics.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// GET_INFLIGHT_FD: a new zeroed region for `num_queues` queues of `queue_size`,
    /// sealed against shrinking and growing, mapped. Returns it and the descriptor to send.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Arc<Region>, File), String> {
        let len = region_bytes(num_queues, queue_size)?;
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"nvmux-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(format!(
                "inflight region: memfd_create: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a descriptor we just created and own.
        let file = unsafe { File::from_raw_fd(fd) };
        // A new memfd reads as zeros up to its length.
        file.set_len(len as u64)
            .map_err(|e| format!("inflight region: resize to {len} bytes: {e}"))?;
        // SAFETY: fcntl on our descriptor with integer flags.
        let r = unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        if r != 0 {
            return Err(format!(
                "inflight region: seal: {}",
                std::io::Error::last_os_error()
            ));
        }
        let send = file
            .try_clone()
            .map_err(|e| format!("inflight region: dup: {e}"))?;
        let region = Self::map(file, 0, len as u64, len, num_queues, queue_size)?;
        Ok((region, send))
    }

    /// SET_INFLIGHT_FD: the front-end hands a region back. Everything is checked against
    /// the limits and the file before anything is mapped.
    pub fn open(
        num_queues: u16,
        queue_size: u16,
        mmap_size: u64,
        mmap_offset: u64,
        file: File,
    ) -> Result<Arc<Region>, String> {
        let len = region_bytes(num_queues, queue_size)?;
        let max = region_bytes(MAX_QUEUES, crate::MAX_QUEUE_SIZE)?;
        if mmap_size < len as u64 || mmap_size > max as u64 {
            return Err(format!(
                "inflight region of {mmap_size} bytes for {num_queues} queues of {queue_size} (needs {len}, at most {max})"
            ));
        }
        if !mmap_offset.is_multiple_of(page_size() as u64) {
            return Err(format!(
                "inflight region offset {mmap_offset:#x} is not page aligned"
            ));
        }
        let end = mmap_offset
            .checked_add(mmap_size)
            .ok_or_else(|| format!("inflight region offset {mmap_offset:#x} + size overflows"))?;
        // SAFETY: fstat writes a stat struct for a descriptor we hold.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(file.as_raw_fd(), &mut st) != 0 {
                return Err(format!(
                    "inflight region: fstat: {}",
                    std::io::Error::last_os_error()
                ));
            }
            st
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(format!(
                "inflight region descriptor is not a regular file (mode {:#o})",
                st.st_mode
            ));
        }
        let file_size = st.st_size.max(0) as u64;
        if end > file_size {
            return Err(format!(
                "inflight region [{mmap_offset:#x}, {end:#x}) reaches past its file's end ({file_size:#x})"
            ));
        }
        Self::map(file, mmap_offset, mmap_size, len, num_queues, queue_size)
    }

    fn map(
        file: File,
        offset: u64,
        mmap_size: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<Region>, String> {
        // SAFETY: a fresh shared mapping of a regular file range checked by the caller;
        // the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "inflight region: mmap {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let map = Mapping { ptr: p.cast(), len };
        // SAFETY: our fresh page-aligned mapping of `len` bytes; the registration is
        // dropped before the mapping (field order of Region), and the region is accessed
        // only through atomics, which zero pages put in by the recovery do not disturb.
        let reg = unsafe { sigbus::register(map.ptr, len, Arc::new(AtomicBool::new(false))) }
            .map_err(|e| format!("inflight region: {e}"))?;
        Ok(Arc::new(Region {
            reg,
            map,
            num_queues,
            queue_size,
            mmap_size,
            mmap_offset: offset,
            file,
        }))
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
    /// Size of the file range the region lives in (as GET/SET_INFLIGHT_FD gave it).
    pub fn mmap_size(&self) -> u64 {
        self.mmap_size
    }
    /// Offset of that range in the region's file.
    pub fn mmap_offset(&self) -> u64 {
        self.mmap_offset
    }
    /// The front-end truncated the file under us (a SIGBUS was recovered).
    pub fn faulted(&self) -> bool {
        self.reg.faulted()
    }
    /// The region's file (for handing the region on).
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Queue `i`'s part, if the region has one.
    pub fn queue(&self, i: usize) -> Option<QueueMem> {
        if i >= self.num_queues as usize {
            return None;
        }
        let off = i * queue_bytes(self.queue_size);
        debug_assert!(off + queue_bytes(self.queue_size) <= self.map.len);
        // SAFETY: off + queue_bytes ≤ len (region_bytes); page-aligned base + a multiple
        // of 64; the Tracker holding the QueueMem keeps an Arc<Region>.
        Some(unsafe { QueueMem::new(self.map.ptr.add(off), self.queue_size) })
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Queue start: recover queue `index` from the region and return its tracker and the heads
/// to resubmit (oldest first). Sets the queue's next available index when requests were in
/// flight. `None` (logged): the queue runs without tracking.
pub(crate) fn start_queue(
    region: &Arc<Region>,
    index: usize,
    q: &mut SplitQueue,
    name: &str,
) -> Option<(Tracker, Vec<u16>)> {
    if region.faulted() {
        tracing::error!(export = %name, queue = index, "the inflight region's file was truncated by the front-end; this queue runs without inflight tracking");
        return None;
    }
    let Some(qm) = region.queue(index) else {
        tracing::warn!(export = %name, queue = index, regions = region.num_queues(), "the inflight region has no part for this queue; it runs without inflight tracking");
        return None;
    };
    if q.size() > qm.cap() {
        tracing::warn!(export = %name, queue = index, size = q.size(), region = qm.cap(), "the inflight region is for smaller queues; this queue runs without inflight tracking");
        return None;
    }
    let used = q.ring_used_idx();
    let r = recover(&qm, q.size(), used, q.ring_avail_idx());
    if let Some(v) = r.unknown_version {
        tracing::warn!(export = %name, queue = index, version = v, "inflight region of an unknown version; reinitialised (requests in flight before, if any, are not resubmitted)");
    }
    if r.ignored > 0 {
        tracing::warn!(export = %name, queue = index, entries = r.ignored, "inflight region entries with heads beyond the queue or bad flags ignored");
    }
    if r.inconsistent {
        tracing::error!(export = %name, queue = index, "the inflight region marks more requests than the guest made available; nothing resubmitted");
    }
    if let Some(n) = r.next_avail {
        tracing::info!(export = %name, queue = index, resubmit = r.resubmit.len(), last_batch_fixed = r.batch_fixed, used, next_avail = n, "resubmitting requests that were in flight");
        q.set_next_avail(n);
    } else if r.batch_fixed > 0 {
        tracing::info!(export = %name, queue = index, last_batch_fixed = r.batch_fixed, used, "inflight region: last batch recorded");
    }
    let t = Tracker::new(qm, q.size(), r.counter, Some(region.clone()));
    Some((t, r.resubmit))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue region in ordinary memory (8-aligned).
    struct Buf(Vec<u64>);
    impl Buf {
        fn new(cap: u16) -> Buf {
            Buf(vec![0; queue_bytes(cap) / 8])
        }
        fn q(&mut self, cap: u16) -> QueueMem {
            // SAFETY: the Vec holds queue_bytes(cap) bytes, 8-aligned, and outlives the use.
            unsafe { QueueMem::new(self.0.as_mut_ptr().cast(), cap) }
        }
        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: viewing the u64 buffer as bytes.
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 8) }
        }
    }

    /// A model ring: the guest made `avail` entries available, we popped `popped` of them
    /// (heads `head_of(pos)`), and published `used` entries.
    struct Model {
        used: u16,
        avail: u16,
    }

    fn crash_after(n: Option<usize>) {
        STORES_LEFT.with(|c| c.set(n));
    }

    /// Run the operations with a crash after `budget` stores; return the ring's used index
    /// and the set of heads the guest saw completed.
    fn run(
        buf: &mut Buf,
        cap: u16,
        budget: Option<usize>,
        ops: &[Op],
        m: &mut Model,
        seen: &mut Vec<u16>,
    ) -> usize {
        const LOTS: usize = 1 << 30;
        let q = buf.q(cap);
        let r = recover(&q, cap, m.used, m.avail);
        assert!(r.resubmit.is_empty());
        let mut t = Tracker::new(q, cap, r.counter, None);
        crash_after(Some(budget.unwrap_or(LOTS)));
        let mut pending: Vec<u16> = Vec::new();
        for op in ops {
            match op {
                Op::Pop(h) => t.popped(*h),
                Op::Used(h) => {
                    t.used(*h);
                    pending.push(*h);
                }
                Op::Publish => {
                    // The guest's used->idx store is one store in program order too.
                    if alive() {
                        m.used = m.used.wrapping_add(pending.len() as u16);
                        seen.append(&mut pending);
                    }
                    pending.clear();
                    t.published(m.used);
                }
            }
        }
        let left = STORES_LEFT.with(|c| c.get()).unwrap_or(0);
        crash_after(None);
        budget.unwrap_or(LOTS) - left
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Pop(u16),
        Used(u16),
        Publish,
    }

    /// Out-of-order completion: pop 0..6, complete 3 and 1 in one batch, then 5, then 0
    /// and 4; 2 never completes. Crash after every possible store: what the guest saw
    /// completed plus what is resubmitted must be exactly the popped heads, once each, and
    /// the available ring must continue right after the popped ones.
    #[test]
    fn crash_at_every_store_out_of_order() {
        use Op::*;
        let ops = [
            Pop(0),
            Pop(1),
            Pop(2),
            Pop(3),
            Pop(4),
            Pop(5),
            Used(3),
            Used(1),
            Publish,
            Used(5),
            Publish,
            Used(0),
            Used(4),
            Publish,
        ];
        let cap = 8;
        // A full run counts the stores.
        let total = {
            let mut buf = Buf::new(cap);
            let mut m = Model { used: 0, avail: 6 };
            run(&mut buf, cap, None, &ops, &mut m, &mut Vec::new())
        };
        assert!(total > 20, "{total} stores");
        for budget in 0..=total {
            let mut buf = Buf::new(cap);
            let mut m = Model { used: 0, avail: 6 };
            let mut seen = Vec::new();
            run(&mut buf, cap, Some(budget), &ops, &mut m, &mut seen);
            let r = recover(&buf.q(cap), cap, m.used, m.avail);
            // The new daemon runs the resubmitted heads, then pops on from next_avail
            // (QEMU's base is used->idx when nothing was in flight); with the guest's
            // completions that must be every head made available, exactly once. (The
            // available ring holds the popped heads in pop order.)
            let avail: Vec<u16> = ops
                .iter()
                .filter_map(|o| if let Pop(h) = o { Some(*h) } else { None })
                .collect();
            let na = r.next_avail.unwrap_or(m.used);
            let n = r.resubmit.len() as u16;
            assert_eq!(na, m.used + n, "crash after {budget}");
            let mut all: Vec<u16> = seen
                .iter()
                .chain(r.resubmit.iter())
                .chain(avail[na as usize..].iter())
                .copied()
                .collect();
            all.sort();
            assert_eq!(
                all,
                [0, 1, 2, 3, 4, 5],
                "crash after {budget} stores: seen {seen:?}, resubmit {:?}, next_avail {na}",
                r.resubmit
            );
            // Resubmitted in pop order (heads were popped in ascending order).
            let mut sorted = r.resubmit.clone();
            sorted.sort();
            assert_eq!(r.resubmit, sorted, "crash after {budget}");
            // Recovering again changes nothing.
            let again = recover(&buf.q(cap), cap, m.used, m.avail);
            assert_eq!(again.resubmit, r.resubmit);
            assert_eq!(again.batch_fixed, 0);
            if budget == total {
                assert_eq!((seen.len(), r.resubmit.as_slice()), (5, &[2u16][..]));
            }
        }
    }

    /// A head completed in one batch and popped again must survive the repair of a later
    /// batch whose list links to it.
    #[test]
    fn reused_head_in_an_older_batch() {
        let cap = 4;
        let mut buf = Buf::new(cap);
        let q = buf.q(cap);
        let _ = recover(&q, cap, 0, 0);
        let mut t = Tracker::new(q, cap, 0, None);
        t.popped(1);
        t.used(1);
        t.published(1);
        t.popped(1); // the guest reused head 1
        t.popped(2);
        t.used(2); // 2.next = 1
                   // used->idx became 2, then the process died.
        let r = recover(&buf.q(cap), cap, 2, 3);
        assert_eq!(r.batch_fixed, 1);
        assert_eq!(r.resubmit, [1]);
        assert_eq!(r.next_avail, Some(3));
    }

    #[test]
    fn batch_is_bounded_by_the_ring() {
        let cap = 4;
        let mut buf = Buf::new(cap);
        let q = buf.q(cap);
        let _ = recover(&q, cap, 0, 0);
        let mut t = Tracker::new(q, cap, 0, None);
        for h in 0..4 {
            t.popped(h);
            assert!(!t.batch_full());
            t.used(h);
        }
        assert!(t.batch_full());
        t.published(4);
        assert!(!t.batch_full());
        assert_eq!(recover(&buf.q(cap), cap, 4, 4), Recovered::default());
    }

    #[test]
    fn full_run_leaves_only_the_unfinished_head() {
        use Op::*;
        let cap = 4;
        let mut buf = Buf::new(cap);
        let mut m = Model { used: 0, avail: 3 };
        let mut seen = Vec::new();
        let ops = [Pop(2), Pop(0), Pop(1), Used(1), Publish, Used(2), Publish];
        run(&mut buf, cap, None, &ops, &mut m, &mut seen);
        assert_eq!(seen, [1, 2]);
        let r = recover(&buf.q(cap), cap, m.used, m.avail);
        assert_eq!(r.resubmit, [0]);
        assert_eq!(r.next_avail, Some(3));
        assert!(r.counter >= 2);
    }

    #[test]
    fn crash_between_publish_and_clear_fixes_the_batch() {
        let cap = 8;
        let mut buf = Buf::new(cap);
        let q = buf.q(cap);
        let _ = recover(&q, cap, 0, 0);
        let mut t = Tracker::new(q, cap, 0, None);
        for h in [4, 6, 7] {
            t.popped(h);
        }
        t.used(7);
        t.used(4);
        // The guest's used->idx became 2, then the process died.
        let r = recover(&buf.q(cap), cap, 2, 3);
        assert_eq!(r.batch_fixed, 2);
        assert_eq!(r.resubmit, [6]);
        assert_eq!(r.next_avail, Some(3));
    }

    /// SPDK#3766: a fresh region (zeros) on a ring that already moved must not clear
    /// desc[0], and a request popped at head 0 afterwards must be resubmitted.
    #[test]
    fn fresh_region_does_not_clear_desc0() {
        let cap = 8;
        let mut buf = Buf::new(cap);
        let q = buf.q(cap);
        let r = recover(&q, cap, 100, 100);
        assert!(r.fresh);
        assert_eq!(r.next_avail, None);
        let mut t = Tracker::new(q, cap, r.counter, None);
        t.popped(0);
        // The daemon dies with head 0 in flight, nothing completed.
        let r = recover(&buf.q(cap), cap, 100, 101);
        assert_eq!(r.batch_fixed, 0);
        assert_eq!(r.resubmit, [0]);
        assert_eq!(r.next_avail, Some(101));
    }

    #[test]
    fn fresh_region_with_garbage_is_cleared() {
        let cap = 8;
        let mut buf = Buf::new(cap);
        for (i, b) in buf.bytes().iter_mut().enumerate().skip(16) {
            *b = i as u8 | 1;
        }
        buf.bytes()[8] = 0; // version 0
        buf.bytes()[9] = 0;
        let r = recover(&buf.q(cap), cap, 5, 9);
        assert!(r.fresh);
        let r = recover(&buf.q(cap), cap, 5, 9);
        assert_eq!(r, Recovered::default());
    }

    #[test]
    fn hostile_contents() {
        let cap = 16;
        let mut buf = Buf::new(cap);
        let _ = recover(&buf.q(cap), cap, 0, 0);
        {
            let b = buf.bytes();
            // used_idx far behind, last_batch_head out of range.
            b[12..14].copy_from_slice(&999u16.to_le_bytes());
            b[14..16].copy_from_slice(&40000u16.to_le_bytes());
            // desc 3: flag 7 (not 0/1); desc 5: in flight with a maximal counter.
            b[16 + 16 * 3] = 7;
            b[16 + 16 * 5] = 1;
            b[16 + 16 * 5 + 8..16 + 16 * 5 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
            // desc 12: in flight, but the ring below only has 8 entries.
            b[16 + 16 * 12] = 1;
        }
        let r = recover(&buf.q(cap), 8, 3, 5);
        assert_eq!(r.resubmit, [5]);
        assert_eq!(r.counter, u64::MAX);
        assert_eq!(r.next_avail, Some(4));
        assert_eq!(r.ignored, 3); // bad last_batch_head, bad flag, head 12
                                  // A list that loops is bounded by the queue size.
        let mut buf = Buf::new(cap);
        let _ = recover(&buf.q(cap), cap, 0, 0);
        {
            let b = buf.bytes();
            b[12..14].copy_from_slice(&2u16.to_le_bytes());
            b[16 + 16 * 2 + 6..16 + 16 * 2 + 8].copy_from_slice(&2u16.to_le_bytes());
        }
        let r = recover(&buf.q(cap), cap, 60000, 60000);
        assert!(r.batch_fixed <= cap);
        // More marked than the guest made available: nothing resubmitted.
        let mut buf = Buf::new(cap);
        let _ = recover(&buf.q(cap), cap, 0, 0);
        for i in 0..4 {
            buf.bytes()[16 + 16 * i] = 1;
        }
        let r = recover(&buf.q(cap), cap, 0, 2);
        assert!(r.inconsistent);
        assert!(r.resubmit.is_empty());
        assert_eq!(recover(&buf.q(cap), cap, 0, 2).resubmit, Vec::<u16>::new());
    }

    #[test]
    fn unknown_version_is_reinitialised() {
        let cap = 4;
        let mut buf = Buf::new(cap);
        buf.bytes()[8] = 9;
        buf.bytes()[16] = 1;
        let r = recover(&buf.q(cap), cap, 0, 1);
        assert_eq!(r.unknown_version, Some(9));
        assert!(r.resubmit.is_empty());
        assert_eq!(recover(&buf.q(cap), cap, 0, 1), Recovered::default());
    }

    #[test]
    fn geometry_and_layout() {
        assert_eq!(queue_bytes(128), 2112);
        // libvhost-user's formula gives the same sizes.
        for qs in 1..=1024u16 {
            let lvu = (16 * qs as usize + 2).next_multiple_of(64);
            assert_eq!(queue_bytes(qs), lvu, "queue size {qs}");
        }
        assert!(region_bytes(0, 128).is_err());
        assert!(region_bytes(65, 128).is_err());
        assert!(region_bytes(1, 0).is_err());
        assert!(region_bytes(1, 2048).is_err());
        assert_eq!(region_bytes(4, 128), Ok(4 * 2112));
    }

    #[test]
    fn memfd_region_round_trip() {
        let (r, f) = Region::create(2, 128).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 2 * 2112);
        // Shrinking is refused by the seal.
        assert!(f.set_len(10).is_err());
        let q = r.queue(1).unwrap();
        let _ = recover(&q, 128, 0, 0);
        let mut t = Tracker::new(q, 128, 0, Some(r.clone()));
        t.popped(77);
        drop(t);
        drop(r);
        // The front-end hands it back: the mark is there.
        let r = Region::open(2, 128, 2 * 2112, 0, f.try_clone().unwrap()).unwrap();
        let rec = recover(&r.queue(1).unwrap(), 128, 0, 1);
        assert_eq!(rec.resubmit, [77]);
        assert!(r.queue(2).is_none());
        // Bad geometry or a region past the file's end is refused before mapping.
        assert!(Region::open(2, 128, 100, 0, f.try_clone().unwrap()).is_err());
        assert!(Region::open(2, 128, 2 * 2112, 4096, f.try_clone().unwrap()).is_err());
        assert!(Region::open(2, 128, 2 * 2112, 1, f.try_clone().unwrap()).is_err());
        assert!(Region::open(3, 128, 3 * 2112, 0, f.try_clone().unwrap()).is_err());
        assert!(Region::open(2, 128, u64::MAX, 0, f.try_clone().unwrap()).is_err());
        assert!(Region::open(100, 128, 2 * 2112, 0, f.try_clone().unwrap()).is_err());
        let dir = std::fs::File::open("/").unwrap();
        assert!(Region::open(1, 1, 64, 0, dir).is_err());
    }
}
