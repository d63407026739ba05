//! The `crypt` function: a `BlockDevice` that stores AES-XTS-256 ciphertext on the device
//! below it, in dm-crypt's `aes-xts-plain64` layout with 512-byte sectors, or 4096-byte
//! sectors (dm-crypt's `sector_size:4096`, with or without `iv_large_sectors`).
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
//! IV sector numbers count 512-byte units from the start of the device below (or, with
//! `iv_large_sectors`, whole encryption sectors), so a tool with the key can decrypt its
//! image with `aes-xts-plain64` and nothing else: no header.
//!
//! The XTS key schedule lives in [`Locked`] memory: out of core dumps, locked in RAM where
//! allowed, wiped when the device goes.

use std::os::fd::RawFd;
use std::sync::Arc;

use nvmux_core::{
    AlignedBuf, BlockDevice, BlockQueue, DeviceInfo, IoCommand, Opcode, Result, SgList, Status,
};

use crate::secret::Locked;
use crate::xts::{Xts, KEY_BYTES};

/// The default encryption sector: 512 bytes, dm-crypt's default, so every disk block size
/// works.
pub const SECTOR: usize = 512;
/// The largest encryption sector (dm-crypt's limit too).
pub const MAX_SECTOR: usize = 4096;

/// How sectors are numbered and sized: dm-crypt's `sector_size` and `iv_large_sectors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Encryption sector in bytes: 512 or 4096. The disk's block size must be a multiple.
    pub sector: usize,
    /// IVs count whole sectors instead of 512-byte units.
    pub iv_large_sectors: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            sector: SECTOR,
            iv_large_sectors: false,
        }
    }
}

impl Layout {
    /// IV increment from one sector to the next.
    fn iv_step(&self) -> u64 {
        if self.iv_large_sectors {
            1
        } else {
            (self.sector / 512) as u64
        }
    }
    /// IV of the sector at byte `off` (a multiple of the sector size).
    fn iv_at(&self, off: u64) -> u64 {
        off / self.sector as u64 * self.iv_step()
    }
}

/// XTS with its layout: what a queue needs to encrypt and decrypt.
struct Cipher {
    xts: Locked<Xts>,
    layout: Layout,
}
/// Bounce-buffer bytes one queue may hold (in flight plus spare). A guest decides how
/// many writes it has in flight and how large each is (up to the frontend's request
/// limit, 32 MiB), so without a budget a full 1024-entry queue of large writes would ask
/// for 32 GiB. Writes beyond the budget wait in the queue (back-pressure) until a bounce
/// buffer comes back; one write always fits, so the queue always progresses.
pub const BOUNCE_BUDGET: usize = 64 << 20;
/// Encrypted write bytes after which the queue below is kicked in the middle of a batch.
/// A frontend hands over a whole batch (up to the queue depth) before its one kick, and
/// encryption makes submission slow (about 2 µs per 4 KiB), so without it the disk idles
/// while the last writes of a batch are encrypted (at QD32, 32 × 2 µs). 32 KiB: the
/// disk gets work after about 16 µs, for one extra `io_uring_enter` per 8 writes of
/// 4 KiB.
const KICK_BYTES: usize = 32 << 10;
/// Read bytes one `poll` decrypts before it returns (the rest wait for the next poll).
/// The frontend publishes and signals a poll's completions together, so decrypting a
/// whole QD32 batch first (32 × 1-2 µs) would delay the first read's completion by the
/// last one's decryption; in steps of 32 KiB the guest gets its first reads after about
/// 16 µs, for one more signal per step.
const DECRYPT_BYTES: usize = 32 << 10;

pub struct CryptDevice {
    inner: Arc<dyn BlockDevice>,
    info: DeviceInfo,
    cipher: Arc<Cipher>,
}

impl CryptDevice {
    /// Encrypt `inner` with the XTS key `key` (key1 || key2) in 512-byte sectors.
    pub fn new(inner: Arc<dyn BlockDevice>, key: &[u8; KEY_BYTES]) -> Result<Self> {
        Self::with_layout(inner, key, Layout::default())
    }

    /// Encrypt `inner` with `key` in the given layout. The device's block size must be a
    /// multiple of the sector size.
    pub fn with_layout(
        inner: Arc<dyn BlockDevice>,
        key: &[u8; KEY_BYTES],
        layout: Layout,
    ) -> Result<Self> {
        let mut info = inner.info().clone();
        if !(layout.sector == SECTOR || layout.sector == MAX_SECTOR) {
            return Err(nvmux_core::Error::new(
                nvmux_core::ErrorKind::InvalidArgument,
                format!(
                    "encryption sector size {} is not supported (use 512 or 4096)",
                    layout.sector
                ),
            ));
        }
        if !(info.block_size as usize).is_multiple_of(layout.sector) {
            return Err(nvmux_core::Error::new(
                nvmux_core::ErrorKind::InvalidArgument,
                format!(
                    "encryption sectors of {} bytes need a disk block size that is a multiple of it; {} has {}-byte blocks (create the disk with --block-size 4096)",
                    layout.sector,
                    inner.describe(),
                    info.block_size
                ),
            ));
        }
        info.discard = false;
        info.write_zeroes = false;
        Ok(CryptDevice {
            inner,
            info,
            cipher: Arc::new(Cipher {
                xts: Locked::new(Xts::new(key))?,
                layout,
            }),
        })
    }
}

impl BlockDevice for CryptDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        Ok(Box::new(CryptQueue {
            inner: self.inner.open_queue(depth)?,
            cipher: self.cipher.clone(),
            bs: self.info.block_size as u64,
            slots: Vec::with_capacity(depth as usize),
            free: Vec::with_capacity(depth as usize),
            bounces: Vec::with_capacity(depth as usize),
            bounce_in_flight: 0,
            waiting: std::collections::VecDeque::with_capacity(depth as usize),
            sgs: (0..depth).map(|_| SgList::with_capacity(1)).collect(),
            pending: Vec::with_capacity(16),
            unkicked: 0,
            held: std::collections::VecDeque::with_capacity(depth as usize),
        }))
    }
    fn describe(&self) -> String {
        let l = &self.cipher.layout;
        match (l.sector, l.iv_large_sectors) {
            (SECTOR, _) => format!("aes-xts-plain64 over {}", self.inner.describe()),
            (s, false) => format!(
                "aes-xts-plain64 sector_size={s} over {}",
                self.inner.describe()
            ),
            (s, true) => format!(
                "aes-xts-plain64 sector_size={s} iv_large_sectors over {}",
                self.inner.describe()
            ),
        }
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
    cipher: Arc<Cipher>,
    bs: u64,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Spare bounce buffers, reused so that steady-state writes do not allocate.
    bounces: Vec<AlignedBuf>,
    /// Bytes of the bounce buffers of writes in flight.
    bounce_in_flight: usize,
    /// Writes waiting for bounce-buffer budget (at most the queue's depth: the frontend
    /// never has more commands than that).
    waiting: std::collections::VecDeque<IoCommand>,
    /// SG lists for the bounced writes sent down, handed back with their completions.
    sgs: Vec<SgList>,
    /// Scratch for `decrypt_sg` (pieces of a sector split across segments).
    pending: Vec<(*mut u8, usize)>,
    /// Bytes encrypted and submitted below since the last kick.
    unkicked: usize,
    /// Completions taken from the queue below but not yet handed back: a poll decrypts
    /// at most `DECRYPT_BYTES` (at most the queue's depth of them).
    held: std::collections::VecDeque<(IoCommand, Status)>,
}

// SAFETY: `pending` holds addresses only between the start and the end of one
// `decrypt_sg` call on the queue's thread; it is empty whenever the queue moves.
unsafe impl Send for CryptQueue {}

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

    /// A bounce buffer of at least `len` bytes, if the budget allows one now.
    fn bounce(&mut self, len: usize) -> Option<AlignedBuf> {
        let size = len.next_power_of_two().max(AlignedBuf::ALIGN);
        if self.bounce_in_flight > 0 && self.bounce_in_flight + size > BOUNCE_BUDGET {
            return None;
        }
        // Best fit: the smallest spare that holds it, so that small writes do not take
        // the buffers large ones need (a steady mix of sizes then never allocates).
        let fit = (0..self.bounces.len())
            .filter(|&i| self.bounces[i].len() >= len)
            .min_by_key(|&i| self.bounces[i].len());
        let b = match fit {
            Some(i) => self.bounces.swap_remove(i),
            None => {
                // Make room among the spares first (largest first).
                let mut spare: usize = self.bounces.iter().map(AlignedBuf::len).sum();
                while self.bounce_in_flight + spare + size > BOUNCE_BUDGET {
                    let Some(i) = (0..self.bounces.len()).max_by_key(|&i| self.bounces[i].len())
                    else {
                        break;
                    };
                    spare -= self.bounces.swap_remove(i).len();
                }
                AlignedBuf::try_new(size)?
            }
        };
        self.bounce_in_flight += b.len();
        Some(b)
    }

    /// Encrypt a write into a bounce buffer and send it down; hands the command back if
    /// the budget has no room for it now.
    fn submit_write(&mut self, cmd: IoCommand) -> Result<(), IoCommand> {
        // The frontend validated the SG list against nlb; the block size is a multiple of
        // the sector, so this is whole sectors.
        let len = (cmd.nlb as u64 * self.bs) as usize;
        let Some(mut b) = self.bounce(len) else {
            return Err(cmd);
        };
        let buf = &mut b.as_mut_slice()[..len];
        let l = self.cipher.layout;
        let (sec, step) = (l.sector, l.iv_step());
        let mut iv = l.iv_at(cmd.slba * self.bs);
        if cmd.sg.len() == len as u64 && cmd.sg.segments().iter().all(|v| v.iov_len % sec == 0) {
            // Whole sectors in every segment (the usual case: one segment): encrypt
            // straight from guest memory into the bounce buffer, one pass over the data.
            let mut at = 0;
            for v in cmd.sg.segments() {
                let n = v.iov_len;
                // SAFETY: a write command's segments are readable for their length, and
                // their lengths add up to `len` (checked above), so `at + n` <= `len`;
                // guest memory never overlaps our own bounce buffer.
                unsafe {
                    self.cipher.xts.encrypt_iv_from(
                        v.iov_base.cast::<u8>(),
                        &mut buf[at..at + n],
                        sec,
                        iv,
                        step,
                    )
                };
                at += n;
                iv += (n / sec) as u64 * step;
            }
        } else {
            // A sector split across segments: gather, then encrypt in place.
            // SAFETY: a write command's segments are readable for their length.
            unsafe { cmd.sg.copy_to(buf) };
            self.cipher.xts.encrypt_iv(buf, sec, iv, step);
        }
        let mut sg = self.sgs.pop().unwrap_or_default();
        sg.clear();
        sg.push(b.as_mut_ptr(), len);
        let (slba, nlb, fua, nsid) = (cmd.slba, cmd.nlb, cmd.fua, cmd.nsid);
        let tag = self.slot(Slot::Bounced { cmd, bounce: b });
        let mut w = IoCommand::new(Opcode::Write, slba, nlb, tag, sg);
        w.fua = fua;
        w.nsid = nsid;
        self.inner.submit(w);
        self.unkicked += len;
        if self.unkicked >= KICK_BYTES {
            self.unkicked = 0;
            self.inner.kick();
        }
        Ok(())
    }
}

/// Decrypt the sectors that `sg` holds, the first with IV `first`, in place. A sector
/// split across segments is gathered into a stack buffer and scattered back.
///
/// # Safety
/// Every segment must point at writable memory of its length.
unsafe fn decrypt_sg(
    xts: &Xts,
    layout: Layout,
    sg: &SgList,
    first: u64,
    pending: &mut Vec<(*mut u8, usize)>,
) {
    let (sec, step) = (layout.sector, layout.iv_step());
    let mut iv = first;
    let mut buf = [0u8; MAX_SECTOR];
    let part = &mut buf[..sec];
    let mut have = 0; // bytes of a split sector gathered in `part`
    pending.clear();
    for v in sg.segments() {
        let base = v.iov_base.cast::<u8>();
        let mut off = 0;
        while off < v.iov_len {
            if have == 0 && v.iov_len - off >= sec {
                // Whole sectors in this segment: in place.
                let n = (v.iov_len - off) / sec * sec;
                // SAFETY: `off + n` <= the segment's length; the caller guarantees it is
                // writable.
                let s = unsafe { std::slice::from_raw_parts_mut(base.add(off), n) };
                xts.decrypt_iv(s, sec, iv, step);
                iv += (n / sec) as u64 * step;
                off += n;
                continue;
            }
            let n = (sec - have).min(v.iov_len - off);
            // SAFETY: as above, `off + n` is inside the segment.
            unsafe { std::ptr::copy_nonoverlapping(base.add(off), part[have..].as_mut_ptr(), n) };
            // SAFETY: as above.
            pending.push((unsafe { base.add(off) }, n));
            have += n;
            off += n;
            if have == sec {
                xts.decrypt_iv(part, sec, iv, step);
                let mut at = 0;
                for (p, n) in pending.drain(..) {
                    // SAFETY: each (p, n) was a writable piece of a segment.
                    unsafe { std::ptr::copy_nonoverlapping(part[at..].as_ptr(), p, n) };
                    at += n;
                }
                iv += step;
                have = 0;
            }
        }
    }
}

impl BlockQueue for CryptQueue {
    fn submit(&mut self, mut cmd: IoCommand) {
        if cmd.opcode == Opcode::Write {
            if !self.waiting.is_empty() {
                self.waiting.push_back(cmd);
            } else if let Err(cmd) = self.submit_write(cmd) {
                self.waiting.push_back(cmd);
            }
            return;
        }
        let tag = self.slot(Slot::Direct { tag: cmd.tag });
        cmd.tag = tag;
        self.inner.submit(cmd);
    }

    fn kick(&mut self) {
        self.unkicked = 0;
        self.inner.kick();
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let CryptQueue {
            inner,
            cipher,
            bs,
            slots,
            free,
            bounces,
            bounce_in_flight,
            sgs,
            pending,
            held,
            ..
        } = self;
        let mut budget = DECRYPT_BYTES as u64;
        let mut one = |mut c: IoCommand, st: Status, budget: &mut u64| {
            let i = c.tag as usize;
            let Some(slot) = slots.get_mut(i).and_then(|s| s.take()) else {
                return;
            };
            free.push(i);
            match slot {
                Slot::Direct { tag } => {
                    if c.opcode == Opcode::Read && st.is_ok() {
                        *budget = budget.saturating_sub(c.sg.len());
                        // SAFETY: a read command's segments are writable for their length.
                        unsafe {
                            decrypt_sg(
                                &cipher.xts,
                                cipher.layout,
                                &c.sg,
                                cipher.layout.iv_at(c.slba * *bs),
                                pending,
                            )
                        };
                    }
                    c.tag = tag;
                    done(c, st);
                }
                Slot::Bounced { cmd, bounce } => {
                    sgs.push(std::mem::replace(&mut c.sg, SgList::with_capacity(0)));
                    *bounce_in_flight -= bounce.len();
                    bounces.push(bounce);
                    done(cmd, st);
                }
            }
        };
        let mut n = 0;
        // Completions held back by the previous poll first.
        while budget > 0 {
            let Some((c, st)) = held.pop_front() else {
                break;
            };
            one(c, st, &mut budget);
            n += 1;
        }
        if held.is_empty() {
            n += inner.poll(&mut |c, st| {
                if budget > 0 {
                    one(c, st, &mut budget);
                } else {
                    held.push_back((c, st));
                }
            });
        }
        // Writes that waited for budget go now, in order, as far as it allows.
        let mut sent = false;
        while let Some(cmd) = self.waiting.pop_front() {
            match self.submit_write(cmd) {
                Ok(()) => sent = true,
                Err(cmd) => {
                    self.waiting.push_front(cmd);
                    break;
                }
            }
        }
        if sent {
            self.inner.kick();
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.waiting.len() + self.held.len()
    }

    fn may_sleep(&self) -> bool {
        // Held completions come back only by another poll: nothing wakes a sleeper.
        self.held.is_empty() && self.inner.may_sleep()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }

    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.inner.wait_fds(out)
    }

    fn take_fds_changed(&mut self) -> bool {
        self.inner.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.inner.busy_poll()
    }

    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.inner.next_deadline()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that holds commands until `release` is set, then completes them on poll.
    struct Held {
        info: DeviceInfo,
        q: Arc<std::sync::Mutex<Vec<IoCommand>>>,
        release: Arc<std::sync::atomic::AtomicBool>,
    }
    struct HeldQueue(
        Arc<std::sync::Mutex<Vec<IoCommand>>>,
        Arc<std::sync::atomic::AtomicBool>,
    );
    impl BlockDevice for Held {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }
        fn open_queue(&self, _depth: u32) -> Result<Box<dyn BlockQueue>> {
            Ok(Box::new(HeldQueue(self.q.clone(), self.release.clone())))
        }
        fn describe(&self) -> String {
            "held".into()
        }
        fn capacity_bytes(&self) -> u64 {
            self.info.size_bytes()
        }
    }
    impl BlockQueue for HeldQueue {
        fn submit(&mut self, cmd: IoCommand) {
            self.0.lock().unwrap().push(cmd);
        }
        fn kick(&mut self) {}
        fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
            if !self.1.load(std::sync::atomic::Ordering::Relaxed) {
                return 0;
            }
            let v: Vec<_> = self.0.lock().unwrap().drain(..).collect();
            let n = v.len();
            for c in v {
                done(c, Status::SUCCESS);
            }
            n
        }
        fn in_flight(&self) -> usize {
            self.0.lock().unwrap().len()
        }
        fn completion_fd(&self) -> Option<RawFd> {
            None
        }
    }

    /// A guest with many large writes in flight gets back-pressure, not 32 GiB of bounce
    /// buffers: the budget holds, and every write still completes once the device does.
    #[test]
    fn bounce_buffers_stay_within_the_budget() {
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let info = DeviceInfo {
            block_size: 512,
            num_blocks: 1 << 30,
            read_only: false,
            discard: false,
            write_zeroes: false,
            volatile_cache: false,
            max_transfer: 32 << 20,
        };
        let dev = CryptDevice::new(
            Arc::new(Held {
                info,
                q: held.clone(),
                release: release.clone(),
            }),
            &[7u8; KEY_BYTES],
        )
        .unwrap();
        let mut q = dev.open_queue(64).unwrap();
        let mut data = vec![0u8; 32 << 20];
        for i in 0..64u64 {
            let mut sg = SgList::default();
            sg.push(data.as_mut_ptr(), data.len());
            q.submit(IoCommand::new(Opcode::Write, i * 65536, 65536, i, sg));
        }
        q.kick();
        let per_budget = BOUNCE_BUDGET / (32 << 20);
        assert_eq!(
            held.lock().unwrap().len(),
            per_budget,
            "writes sent within the budget"
        );
        assert_eq!(q.in_flight(), 64, "the rest wait");
        release.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut tags = Vec::new();
        for _ in 0..1000 {
            q.poll(&mut |c, s| {
                assert!(s.is_ok());
                tags.push(c.tag);
            });
            assert!(held.lock().unwrap().len() <= per_budget, "over the budget");
            if tags.len() == 64 {
                break;
            }
        }
        tags.sort();
        assert_eq!(
            tags,
            (0..64).collect::<Vec<u64>>(),
            "every write completed, once"
        );
        assert_eq!(q.in_flight(), 0);
    }

    /// Reads complete in steps of `DECRYPT_BYTES` per poll: the rest are held (counted in
    /// flight, the worker told not to sleep) and each is decrypted and handed back once.
    #[test]
    fn reads_are_decrypted_in_steps_per_poll() {
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let release = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let info = DeviceInfo {
            block_size: 512,
            num_blocks: 1 << 20,
            read_only: false,
            discard: false,
            write_zeroes: false,
            volatile_cache: false,
            max_transfer: 1 << 20,
        };
        let key = [5u8; KEY_BYTES];
        let dev = CryptDevice::new(
            Arc::new(Held {
                info,
                q: held.clone(),
                release,
            }),
            &key,
        )
        .unwrap();
        let mut q = dev.open_queue(32).unwrap();
        // 32 reads of 4 KiB whose "disk" data is the ciphertext of a known pattern.
        let xts = Xts::new(&key);
        let plain: Vec<u8> = (0..4096).map(|i| (i * 3) as u8).collect();
        let mut bufs: Vec<Vec<u8>> = (0..32u64)
            .map(|i| {
                let mut b = plain.clone();
                xts.encrypt(&mut b, SECTOR, i * 8);
                b
            })
            .collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let mut sg = SgList::default();
            sg.push(b.as_mut_ptr(), b.len());
            q.submit(IoCommand::new(Opcode::Read, i as u64 * 8, 8, i as u64, sg));
        }
        q.kick();
        let per_poll = DECRYPT_BYTES / 4096;
        let mut tags = Vec::new();
        let mut polls = 0;
        while tags.len() < 32 && polls < 100 {
            let before = tags.len();
            q.poll(&mut |c, s| {
                assert!(s.is_ok());
                tags.push(c.tag);
            });
            polls += 1;
            assert!(
                tags.len() - before <= per_poll,
                "at most {per_poll} per poll"
            );
            assert_eq!(q.in_flight(), 32 - tags.len(), "held ones are in flight");
            assert_eq!(
                q.may_sleep(),
                tags.len() == 32,
                "no sleep while some are held"
            );
        }
        assert_eq!(polls, 32usize.div_ceil(per_poll));
        tags.sort();
        assert_eq!(tags, (0..32).collect::<Vec<u64>>(), "every read once");
        for b in &bufs {
            assert_eq!(b, &plain, "decrypted once, in place");
        }
    }

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
        unsafe { decrypt_sg(&xts, Layout::default(), &sg, 40, &mut Vec::new()) };
        assert_eq!(buf, plain);
        // 4096-byte sectors (IVs 8 apart) split across segments of 100, 5000, 1, 3091.
        let plain: Vec<u8> = (0..8192).map(|i| (i * 5) as u8).collect();
        let l = Layout {
            sector: 4096,
            iv_large_sectors: false,
        };
        let mut ct = plain.clone();
        xts.encrypt_iv(&mut ct, 4096, 16, 8);
        let mut sg = SgList::default();
        let p = ct.as_mut_ptr();
        let mut at = 0;
        for n in [100usize, 5000, 1, 3091] {
            // SAFETY: test: pieces of `ct`, in bounds.
            sg.push(unsafe { p.add(at) }, n);
            at += n;
        }
        // SAFETY: the segments cover `ct`, which is writable.
        unsafe { decrypt_sg(&xts, l, &sg, 16, &mut Vec::new()) };
        assert_eq!(ct, plain);
    }
}
