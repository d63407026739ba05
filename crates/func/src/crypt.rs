//! The `crypt` function: a `BlockDevice` that stores AES-XTS-256 ciphertext on the device
//! below it, in dm-crypt's `aes-xts-plain64` layout with 512-byte sectors.
//!
//! * Reads go to the device straight into the caller's buffers and are decrypted there
//!   when they complete (the data is the caller's to see).
//! * Writes are encrypted into a bounce buffer of the queue and written from there, never
//!   in the caller's memory: a guest may still be reading the buffer it asked us to
//!   write.
//! * Flush passes through. Discard and write-zeroes are not offered (`info()`): the
//!   device below would return zeros, which decrypt to noise, and discards would show
//!   which blocks are in use. A command of either kind that arrives anyway passes through
//!   and leaves that range reading as noise, as dm-crypt with `allow_discards` does.
//!
//! Sector numbers count 512-byte units from the start of the device below, so a tool
//! with the key can decrypt its image with `aes-xts-plain64` and nothing else: no header.

use std::os::fd::RawFd;
use std::sync::Arc;

use nvmux_core::{
    AlignedBuf, BlockDevice, BlockQueue, DeviceInfo, IoCommand, Opcode, Result, SgList, Status,
};

use crate::xts::{Xts, KEY_BYTES};

/// Encryption sector: 512 bytes, dm-crypt's default, so every disk block size works.
pub const SECTOR: usize = 512;

pub struct CryptDevice {
    inner: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    xts: Arc<Xts>,
}

impl CryptDevice {
    /// Encrypt `inner` with the XTS key `key` (key1 || key2).
    pub fn new(inner: Arc<dyn BlockDevice>, key: &[u8; KEY_BYTES]) -> Self {
        let mut info = inner.info().clone();
        info.discard = false;
        info.write_zeroes = false;
        CryptDevice {
            inner,
            info,
            xts: Arc::new(Xts::new(key)),
        }
    }
}

impl BlockDevice for CryptDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        Ok(Box::new(CryptQueue {
            inner: self.inner.open_queue(depth)?,
            xts: self.xts.clone(),
            bs: self.info.block_size as u64,
            slots: Vec::with_capacity(depth as usize),
            free: Vec::new(),
            bounces: Vec::new(),
        }))
    }
    fn describe(&self) -> String {
        format!("aes-xts-plain64 over {}", self.inner.describe())
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

enum Slot {
    /// A read (or a pass-through command) in flight: the caller's tag.
    Direct { tag: u64 },
    /// A write in flight from a bounce buffer: the caller's command, handed back at the end.
    Bounced { cmd: IoCommand, bounce: AlignedBuf },
}

struct CryptQueue {
    inner: Box<dyn BlockQueue>,
    xts: Arc<Xts>,
    bs: u64,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Spare bounce buffers, reused so that steady-state writes do not allocate.
    bounces: Vec<AlignedBuf>,
}

impl CryptQueue {
    fn slot(&mut self, s: Slot) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(s);
                i as u64
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u64
            }
        }
    }

    fn bounce(&mut self, len: usize) -> AlignedBuf {
        match self.bounces.iter().position(|b| b.len() >= len) {
            Some(i) => self.bounces.swap_remove(i),
            None => AlignedBuf::new(len.next_power_of_two().max(AlignedBuf::ALIGN)),
        }
    }
}

/// Decrypt the sectors that `sg` holds, starting at 512-byte sector `first`, in place.
/// A sector split across segments is gathered into a stack buffer and scattered back.
///
/// # Safety
/// Every segment must point at writable memory of its length.
unsafe fn decrypt_sg(xts: &Xts, sg: &SgList, first: u64) {
    let mut sector = first;
    let mut part = [0u8; SECTOR];
    let mut have = 0; // bytes of a split sector gathered in `part`
    let mut pending: Vec<(*mut u8, usize)> = Vec::new();
    for v in sg.segments() {
        let base = v.iov_base.cast::<u8>();
        let mut off = 0;
        while off < v.iov_len {
            if have == 0 && v.iov_len - off >= SECTOR {
                // Whole sectors in this segment: in place.
                let n = (v.iov_len - off) / SECTOR * SECTOR;
                // SAFETY: `off + n` <= the segment's length; the caller guarantees it is
                // writable.
                let s = unsafe { std::slice::from_raw_parts_mut(base.add(off), n) };
                xts.decrypt(s, SECTOR, sector);
                sector += (n / SECTOR) as u64;
                off += n;
                continue;
            }
            let n = (SECTOR - have).min(v.iov_len - off);
            // SAFETY: as above, `off + n` is inside the segment.
            unsafe { std::ptr::copy_nonoverlapping(base.add(off), part[have..].as_mut_ptr(), n) };
            // SAFETY: as above.
            pending.push((unsafe { base.add(off) }, n));
            have += n;
            off += n;
            if have == SECTOR {
                xts.decrypt(&mut part, SECTOR, sector);
                let mut at = 0;
                for (p, n) in pending.drain(..) {
                    // SAFETY: each (p, n) was a writable piece of a segment.
                    unsafe { std::ptr::copy_nonoverlapping(part[at..].as_ptr(), p, n) };
                    at += n;
                }
                sector += 1;
                have = 0;
            }
        }
    }
}

impl BlockQueue for CryptQueue {
    fn submit(&mut self, mut cmd: IoCommand) {
        let sectors_per_block = self.bs / SECTOR as u64;
        if cmd.opcode == Opcode::Write {
            // The frontend validated the SG list against nlb; the block size is a
            // multiple of the sector, so this is whole sectors.
            let len = (cmd.nlb as u64 * self.bs) as usize;
            let mut b = self.bounce(len);
            let buf = &mut b.as_mut_slice()[..len];
            // SAFETY: a write command's segments are readable for their length.
            unsafe { cmd.sg.copy_to(buf) };
            self.xts.encrypt(buf, SECTOR, cmd.slba * sectors_per_block);
            let sg = b.sg(0, len);
            let (slba, nlb, fua, nsid) = (cmd.slba, cmd.nlb, cmd.fua, cmd.nsid);
            let tag = self.slot(Slot::Bounced { cmd, bounce: b });
            let mut w = IoCommand::new(Opcode::Write, slba, nlb, tag, sg);
            w.fua = fua;
            w.nsid = nsid;
            self.inner.submit(w);
            return;
        }
        let tag = self.slot(Slot::Direct { tag: cmd.tag });
        cmd.tag = tag;
        self.inner.submit(cmd);
    }

    fn kick(&mut self) {
        self.inner.kick();
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let CryptQueue {
            inner,
            xts,
            bs,
            slots,
            free,
            bounces,
        } = self;
        let spb = *bs / SECTOR as u64;
        inner.poll(&mut |mut c, st| {
            let i = c.tag as usize;
            let Some(slot) = slots.get_mut(i).and_then(|s| s.take()) else {
                return;
            };
            free.push(i);
            match slot {
                Slot::Direct { tag } => {
                    if c.opcode == Opcode::Read && st.is_ok() {
                        // SAFETY: a read command's segments are writable for their length.
                        unsafe { decrypt_sg(xts, &c.sg, c.slba * spb) };
                    }
                    c.tag = tag;
                    done(c, st);
                }
                Slot::Bounced { cmd, bounce } => {
                    bounces.push(bounce);
                    done(cmd, st);
                }
            }
        })
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.inner.next_deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sectors_decrypt_like_whole_ones() {
        let xts = Xts::new(&[3u8; KEY_BYTES]);
        let plain: Vec<u8> = (0..2048).map(|i| (i * 7) as u8).collect();
        let mut ct = plain.clone();
        xts.encrypt(&mut ct, SECTOR, 40);
        // Segments of awkward sizes: 100, 700, 1, 1247.
        let mut buf = ct.clone();
        let mut sg = SgList::default();
        let p = buf.as_mut_ptr();
        let mut at = 0;
        for n in [100usize, 700, 1, 1247] {
            // SAFETY: test: pieces of `buf`, in bounds.
            sg.push(unsafe { p.add(at) }, n);
            at += n;
        }
        // SAFETY: the segments cover `buf`, which is writable.
        unsafe { decrypt_sg(&xts, &sg, 40) };
        assert_eq!(buf, plain);
    }
}
