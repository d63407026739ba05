//! Our own split virtqueue (virtio 1.2, 2.7).
//!
//! The descriptor table, available ring and used ring are translated to host pointers once,
//! when the queue starts, and checked to lie inside one guest memory region. After that,
//! popping a chain is a few loads from host memory: no per-access region lookup. Data
//! buffer addresses inside descriptors are still untrusted and are translated and bounds
//! checked per request by the caller (`blk::parse`).
//!
//! Owning the ring (instead of virtio-queue) also lets a later restart-without-guest-impact
//! feature re-walk a chain from its head index (vhost-user INFLIGHT_SHMFD).

use std::sync::atomic::{fence, AtomicU16, Ordering};

use crate::blk::{GuestMem, Seg};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Used ring flag: "don't kick me" (without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;
/// Available ring flag: "don't interrupt me" (without EVENT_IDX).
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Longest chain accepted through an indirect table (descriptors).
const MAX_INDIRECT: u32 = 1024;

/// Why a chain was rejected. The chain is returned to the driver with nothing written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` index outside the table, or a chain longer than the table (a loop).
    BadNext,
    /// An indirect table that is misaligned, empty, too long, outside guest memory, or
    /// nested.
    BadIndirect,
}

/// The driver published more new entries than the queue holds: the ring is corrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingBroken;

pub struct SplitQueue {
    size: u16,
    desc: *const u8,
    avail: *mut u8,
    used: *mut u8,
    next_avail: u16,
    next_used: u16,
    /// Used index when we last decided about signalling.
    signalled_used: u16,
    event_idx: bool,
}

// SAFETY: the pointers refer to guest memory that the owner keeps mapped for the queue's
// lifetime; the queue is used by one thread at a time.
unsafe impl Send for SplitQueue {}

/// Where the rings are (guest addresses).
#[derive(Clone, Copy, Debug)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl SplitQueue {
    /// Translate and check the rings. `size` must be a power of two ≤ 32768.
    pub fn new(mem: &dyn GuestMem, size: u16, a: RingAddrs, event_idx: bool) -> Option<SplitQueue> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return None;
        }
        if !a.desc.is_multiple_of(16) || !a.avail.is_multiple_of(2) || !a.used.is_multiple_of(4) {
            return None;
        }
        let n = size as usize;
        let desc = mem.host_ptr(a.desc, 16 * n)?;
        let avail = mem.host_ptr(a.avail, 6 + 2 * n)?;
        let used = mem.host_ptr(a.used, 6 + 8 * n)?;
        Some(SplitQueue {
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            next_used: 0,
            signalled_used: 0,
            event_idx,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }
    pub fn set_next_avail(&mut self, v: u16) {
        self.next_avail = v;
    }
    /// Continue after the used index the driver already sees (e.g. after a reconnect).
    pub fn sync_used_from_ring(&mut self) {
        self.next_used = self.used_idx().load(Ordering::Acquire);
        self.signalled_used = self.next_used;
    }

    /// The guest's used index as it stands in the ring.
    pub fn ring_used_idx(&self) -> u16 {
        u16::from_le(self.used_idx().load(Ordering::Acquire))
    }
    /// The guest's available index as it stands in the ring.
    pub fn ring_avail_idx(&self) -> u16 {
        u16::from_le(self.avail_idx().load(Ordering::Acquire))
    }
    /// The used index after the elements added so far (published or not).
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: `avail` is 2-aligned and covers 6 + 2*size bytes (checked in `new`).
        unsafe { &*(self.avail.add(2) as *const AtomicU16) }
    }
    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: `used` is 4-aligned and covers 6 + 8*size bytes (checked in `new`).
        unsafe { &*(self.used.add(2) as *const AtomicU16) }
    }
    fn read_u16(p: *const u8) -> u16 {
        // SAFETY: callers pass pointers inside the rings validated in `new`.
        u16::from_le(unsafe { std::ptr::read_volatile(p as *const u16) })
    }
    fn write_u16(p: *mut u8, v: u16) {
        // SAFETY: callers pass pointers inside the rings validated in `new`.
        unsafe { std::ptr::write_volatile(p as *mut u16, v.to_le()) }
    }

    /// Entries published by the driver and not yet popped.
    pub fn pending(&self) -> Result<u16, RingBroken> {
        let n =
            u16::from_le(self.avail_idx().load(Ordering::Acquire)).wrapping_sub(self.next_avail);
        if n > self.size {
            Err(RingBroken)
        } else {
            Ok(n)
        }
    }

    /// Pop the next chain into `segs`. `Ok(None)` when the ring is empty. A malformed chain
    /// gives `Some((head, Err(_)))`: hand it back with `add_used(head, 0)`.
    #[allow(clippy::type_complexity)]
    pub fn pop(
        &mut self,
        mem: &dyn GuestMem,
        segs: &mut Vec<Seg>,
    ) -> Result<Option<(u16, Result<(), ChainError>)>, RingBroken> {
        if self.pending()? == 0 {
            return Ok(None);
        }
        let slot = (self.next_avail % self.size) as usize;
        // SAFETY: slot < size, inside the available ring.
        let head = Self::read_u16(unsafe { self.avail.add(4 + 2 * slot) });
        self.next_avail = self.next_avail.wrapping_add(1);
        segs.clear();
        Ok(Some((head, self.walk(mem, head, segs))))
    }

    /// Walk the chain at `head` again (a request resubmitted after a restart, see
    /// `inflight.rs`): the guest keeps an in-flight chain untouched.
    pub fn rewalk(
        &self,
        mem: &dyn GuestMem,
        head: u16,
        segs: &mut Vec<Seg>,
    ) -> Result<(), ChainError> {
        segs.clear();
        self.walk(mem, head, segs)
    }

    fn read_desc(table: *const u8, i: usize) -> (u64, u32, u16, u16) {
        // SAFETY: callers check `i` against the table's validated length.
        let raw: [u8; 16] =
            unsafe { std::ptr::read_volatile(table.add(16 * i) as *const [u8; 16]) };
        (
            u64::from_le_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]),
            u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            u16::from_le_bytes([raw[12], raw[13]]),
            u16::from_le_bytes([raw[14], raw[15]]),
        )
    }

    fn walk(&self, mem: &dyn GuestMem, head: u16, segs: &mut Vec<Seg>) -> Result<(), ChainError> {
        let mut table = self.desc;
        let mut tsize = self.size as u32;
        let mut i = head as u32;
        let mut budget = tsize;
        let mut indirect = false;
        loop {
            if i >= tsize || budget == 0 {
                return Err(ChainError::BadNext);
            }
            budget -= 1;
            let (addr, len, flags, next) = Self::read_desc(table, i as usize);
            if flags & F_INDIRECT != 0 {
                // Only one level, never mixed with NEXT, a non-empty multiple of 16 bytes.
                if indirect
                    || flags & F_NEXT != 0
                    || len == 0
                    || len % 16 != 0
                    || len / 16 > MAX_INDIRECT
                {
                    return Err(ChainError::BadIndirect);
                }
                if addr % 16 != 0 {
                    return Err(ChainError::BadIndirect);
                }
                table = mem
                    .host_ptr(addr, len as usize)
                    .ok_or(ChainError::BadIndirect)?;
                tsize = len / 16;
                budget = tsize;
                i = 0;
                indirect = true;
                continue;
            }
            segs.push(Seg {
                addr,
                len,
                write: flags & F_WRITE != 0,
            });
            if flags & F_NEXT == 0 {
                return Ok(());
            }
            i = next as u32;
        }
    }

    /// Put one element on the used ring (not yet visible: call [`publish`](Self::publish)).
    pub fn add_used(&mut self, head: u16, len: u32) {
        let slot = (self.next_used % self.size) as usize;
        // SAFETY: slot < size: inside the used ring validated in `new`.
        unsafe {
            let e = self.used.add(4 + 8 * slot);
            std::ptr::write_volatile(e as *mut u32, (head as u32).to_le());
            std::ptr::write_volatile(e.add(4) as *mut u32, len.to_le());
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Make the used elements added so far visible to the driver.
    pub fn publish(&mut self) {
        self.used_idx()
            .store(self.next_used.to_le(), Ordering::Release);
    }

    /// Should the driver be interrupted for what was published since the last check?
    pub fn needs_notification(&mut self) -> bool {
        let new = self.next_used;
        let old = self.signalled_used;
        if new == old {
            return false;
        }
        // The used index store must be visible before we read the driver's wish.
        fence(Ordering::SeqCst);
        self.signalled_used = new;
        if self.event_idx {
            // used_event sits after the available ring.
            // SAFETY: inside the validated available ring (6 + 2*size bytes).
            let ev = Self::read_u16(unsafe { self.avail.add(4 + 2 * self.size as usize) });
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            Self::read_u16(self.avail) & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Ask the driver to kick us again. Returns true if entries are already pending (the
    /// caller must poll instead of sleeping).
    pub fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            // avail_event sits after the used ring.
            // SAFETY: inside the validated used ring (6 + 8*size bytes).
            Self::write_u16(
                unsafe { self.used.add(4 + 8 * self.size as usize) },
                self.next_avail,
            );
        } else {
            Self::write_u16(self.used, 0);
        }
        fence(Ordering::SeqCst);
        !matches!(self.pending(), Ok(0))
    }

    /// While polling, kicks are not needed.
    pub fn disable_notification(&mut self) {
        if !self.event_idx {
            Self::write_u16(self.used, USED_F_NO_NOTIFY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Mem(RefCell<Vec<u8>>);
    impl GuestMem for Mem {
        fn host_ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
            let mut v = self.0.borrow_mut();
            (gpa as usize).checked_add(len).filter(|&e| e <= v.len())?;
            Some(v[gpa as usize..].as_mut_ptr())
        }
    }
    const A: RingAddrs = RingAddrs {
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
    };

    fn mem() -> Mem {
        Mem(RefCell::new(vec![0u8; 0x8000]))
    }
    fn put_desc(m: &Mem, table: usize, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let mut v = m.0.borrow_mut();
        let o = table + 16 * i;
        v[o..o + 8].copy_from_slice(&addr.to_le_bytes());
        v[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
        v[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
        v[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
    }
    fn publish(m: &Mem, heads: &[u16]) {
        let mut v = m.0.borrow_mut();
        let idx = u16::from_le_bytes([v[0x1002], v[0x1003]]);
        for (k, h) in heads.iter().enumerate() {
            let o = 0x1004 + 2 * ((idx as usize + k) % 8);
            v[o..o + 2].copy_from_slice(&h.to_le_bytes());
        }
        v[0x1002..0x1004].copy_from_slice(&(idx + heads.len() as u16).to_le_bytes());
    }

    #[test]
    fn chains_direct_and_indirect() {
        let m = mem();
        let mut q = SplitQueue::new(&m, 8, A, true).unwrap();
        put_desc(&m, 0, 0, 0x3000, 16, F_NEXT, 1);
        put_desc(&m, 0, 1, 0x3100, 1, F_WRITE, 0);
        put_desc(&m, 0, 2, 0x4000, 32, F_INDIRECT, 0);
        put_desc(&m, 0x4000, 0, 0x3000, 16, F_NEXT, 1);
        put_desc(&m, 0x4000, 1, 0x3100, 1, F_WRITE, 0);
        publish(&m, &[0, 2]);
        let mut segs = Vec::new();
        let (h, r) = q.pop(&m, &mut segs).unwrap().unwrap();
        assert_eq!((h, r, segs.len()), (0, Ok(()), 2));
        let (h, r) = q.pop(&m, &mut segs).unwrap().unwrap();
        assert_eq!((h, r, segs.len()), (2, Ok(()), 2));
        assert!(segs[1].write);
        assert_eq!(q.pop(&m, &mut segs).unwrap(), None);
        q.add_used(0, 1);
        q.add_used(2, 1);
        q.publish();
        assert_eq!(
            u16::from_le_bytes([m.0.borrow()[0x2002], m.0.borrow()[0x2003]]),
            2
        );
        assert!(q.needs_notification(), "used_event 0 was crossed");
        assert!(!q.needs_notification(), "nothing new");
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        let mut q = SplitQueue::new(&m, 8, A, false).unwrap();
        put_desc(&m, 0, 0, 0x3000, 16, F_NEXT, 0); // loop onto itself
        put_desc(&m, 0, 1, 0x3000, 16, F_NEXT, 99); // next out of range
        put_desc(&m, 0, 2, 0x4000, 20, F_INDIRECT, 0); // length not a multiple of 16
        put_desc(&m, 0, 3, 0x10_0000, 32, F_INDIRECT, 0); // table outside memory
        put_desc(&m, 0, 4, 0x4000, 16, F_INDIRECT, 0); // nested indirect
        put_desc(&m, 0x4000, 0, 0x4000, 16, F_INDIRECT, 0);
        publish(&m, &[0, 1, 2, 3, 4, 200]);
        let mut segs = Vec::new();
        let want = [
            Err(ChainError::BadNext),
            Err(ChainError::BadNext),
            Err(ChainError::BadIndirect),
            Err(ChainError::BadIndirect),
            Err(ChainError::BadIndirect),
            Err(ChainError::BadNext), // head out of range
        ];
        for w in want {
            let (_, r) = q.pop(&m, &mut segs).unwrap().unwrap();
            assert_eq!(r, w);
        }
    }

    #[test]
    fn broken_ring_and_bad_addresses() {
        let m = mem();
        assert!(
            SplitQueue::new(&m, 6, A, false).is_none(),
            "not a power of two"
        );
        assert!(
            SplitQueue::new(&m, 8, RingAddrs { desc: 8, ..A }, false).is_none(),
            "misaligned"
        );
        assert!(
            SplitQueue::new(&m, 8, RingAddrs { used: 0x7ffc, ..A }, false).is_none(),
            "outside"
        );
        let mut q = SplitQueue::new(&m, 8, A, false).unwrap();
        m.0.borrow_mut()[0x1002..0x1004].copy_from_slice(&100u16.to_le_bytes());
        assert_eq!(q.pending(), Err(RingBroken));
        assert!(q.pop(&m, &mut Vec::new()).is_err());
    }
}
