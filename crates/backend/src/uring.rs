//! One io_uring per queue. Commands live in a slot table from `submit` until their
//! completion is reaped, so the iovec arrays and buffers the kernel reads stay valid.
//!
//! A queue dropped with commands still in the kernel (its frontend connection panicked,
//! or the daemon is shutting down) first asks the kernel to cancel them and waits for
//! their completions (at most [`DRAIN_WAIT`]); whatever is still in the kernel then is
//! leaked on purpose, buffers and all, and logged, so the kernel can never write into
//! memory that was freed.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use nvmux_core::eventfd::EventFd;
use nvmux_core::{AlignedBuf, BlockQueue, Error, IoCommand, Opcode, Result, Status};

/// Alignment O_DIRECT needs for buffers we cannot prove aligned (a bounce buffer is used).
const DIO_ALIGN: usize = 512;

#[derive(Default)]
struct Slot {
    cmd: Option<IoCommand>,
    /// An aligned copy for a misaligned O_DIRECT transfer (rare: guest buffers are
    /// normally sector-aligned).
    bounce: Option<AlignedBuf>,
    /// Bytes already transferred (a short read or write is resubmitted for the rest).
    done: u64,
    /// For write zeroes: using punch-hole because zero-range was refused.
    punch: bool,
}

// SAFETY: the raw pointers in Bounce/IoCommand are owned by the slot and used only by the
// thread that owns the queue.
unsafe impl Send for Slot {}

pub(crate) struct UringQueue {
    ring: IoUring,
    _file: Arc<File>,
    bs: u32,
    direct: bool,
    zero_range: Arc<AtomicBool>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    backlog: VecDeque<IoCommand>,
    failed: VecDeque<(IoCommand, Status)>,
    /// Bytes of the bounce buffers of commands in flight (see [`BOUNCE_BUDGET`]).
    bounce_bytes: usize,
    /// Slots whose command the filesystem refused for alignment (EINVAL) and that wait for
    /// bounce-buffer budget to be retried.
    bounce_wait: VecDeque<u32>,
    unsubmitted: u32,
    in_flight: usize,
    efd: EventFd,
    /// Reaped CQEs (user data, result), reused across polls.
    cqes: Vec<(u64, i32)>,
    /// How long `drop` waits for commands still in the kernel.
    drain_wait: Duration,
}

const FIXED: types::Fixed = types::Fixed(0);

/// How long a queue being dropped waits for the kernel to hand back its commands.
pub(crate) const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// User data of cancel requests (slot indices are far below it).
const CANCEL_TAG: u64 = u64::MAX;

/// Commands left in the kernel (and their buffers leaked) by queues that were dropped.
static LEAKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Commands whose buffers were leaked on purpose because the kernel did not hand them
/// back within [`DRAIN_WAIT`] of their queue being dropped.
pub fn leaked_commands() -> u64 {
    LEAKED.load(Ordering::Relaxed)
}

/// Bounce-buffer bytes one queue may have in flight. Misaligned guest buffers are copied
/// through bounce buffers for O_DIRECT, and a guest chooses how many and how large (up to
/// 32 MiB each, with up to a queue's depth in flight): beyond this budget commands wait
/// (back-pressure) until a bounce buffer is released. One command always fits.
pub const BOUNCE_BUDGET: usize = 64 << 20;

/// A read or write of one contiguous buffer.
fn rw_entry(write: bool, p: *mut u8, n: u32, off: u64, rw_flags: i32) -> io_uring::squeue::Entry {
    if write {
        opcode::Write::new(FIXED, p, n)
            .offset(off)
            .rw_flags(rw_flags)
            .build()
    } else {
        opcode::Read::new(FIXED, p, n).offset(off).build()
    }
}

impl UringQueue {
    pub(crate) fn new(
        file: Arc<File>,
        bs: u32,
        direct: bool,
        zero_range: Arc<AtomicBool>,
        depth: u32,
    ) -> Result<Self> {
        let depth = depth.clamp(1, 4096);
        let ring =
            IoUring::new(depth.next_power_of_two()).map_err(|e| Error::io("io_uring setup", e))?;
        ring.submitter()
            .register_files(&[file.as_raw_fd()])
            .map_err(|e| Error::io("io_uring register file", e))?;
        let efd = EventFd::new().map_err(|e| Error::io("io_uring completion eventfd", e))?;
        ring.submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(|e| Error::io("io_uring register eventfd", e))?;
        let mut slots = Vec::with_capacity(depth as usize);
        slots.resize_with(depth as usize, Slot::default);
        Ok(UringQueue {
            ring,
            _file: file,
            bs,
            direct,
            zero_range,
            slots,
            free: (0..depth).rev().collect(),
            backlog: VecDeque::with_capacity(depth as usize * 2),
            failed: VecDeque::with_capacity(16),
            bounce_bytes: 0,
            bounce_wait: VecDeque::new(),
            unsubmitted: 0,
            in_flight: 0,
            efd,
            cqes: Vec::with_capacity(depth as usize),
            drain_wait: DRAIN_WAIT,
        })
    }

    #[cfg(test)]
    pub(crate) fn set_drain_wait(&mut self, d: Duration) {
        self.drain_wait = d;
    }

    /// Wait up to `until` for the completion eventfd (or 100 ms at most).
    fn wait_completion(&self, until: Instant) {
        let ms = until
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(100) as i32;
        let mut p = libc::pollfd {
            fd: self.efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack; the eventfd is ours.
        unsafe { libc::poll(&mut p, 1, ms) };
        self.efd.drain();
    }

    /// Reap CQEs without acting on them: the commands of finished slots are dropped.
    fn discard_completions(&mut self) {
        let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
        for ud in done {
            if ud == CANCEL_TAG {
                continue;
            }
            if let Some(slot) = self.slots.get_mut(ud as usize) {
                if slot.cmd.take().is_some() {
                    slot.bounce = None;
                    self.in_flight -= 1;
                }
            }
        }
    }

    /// Build the SQE for slot `i` and push it.
    fn push_slot(&mut self, i: u32) {
        let slot = &mut self.slots[i as usize];
        let Some(cmd) = slot.cmd.as_ref() else { return };
        let off = cmd.byte_offset(self.bs) + slot.done;
        let entry = match cmd.opcode {
            Opcode::Read | Opcode::Write => {
                let write = cmd.opcode == Opcode::Write;
                let rw_flags = if write && cmd.fua { libc::RWF_DSYNC } else { 0 };
                if let Some(b) = slot.bounce.as_mut() {
                    let total = cmd.byte_len(self.bs) as usize;
                    let done = slot.done as usize;
                    let p = b.as_mut_slice()[done..total].as_mut_ptr();
                    rw_entry(write, p, (total - done) as u32, off, rw_flags)
                } else {
                    let segs = cmd.sg.segments();
                    if segs.len() == 1 {
                        let p = segs[0].iov_base.cast::<u8>();
                        rw_entry(write, p, segs[0].iov_len as u32, off, rw_flags)
                    } else if write {
                        opcode::Writev::new(FIXED, segs.as_ptr(), segs.len() as u32)
                            .offset(off)
                            .rw_flags(rw_flags)
                            .build()
                    } else {
                        opcode::Readv::new(FIXED, segs.as_ptr(), segs.len() as u32)
                            .offset(off)
                            .build()
                    }
                }
            }
            Opcode::Flush => opcode::Fsync::new(FIXED)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Opcode::WriteZeroes | Opcode::Deallocate => {
                let zero = cmd.opcode == Opcode::WriteZeroes && !slot.punch;
                let mode = if zero {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(FIXED, cmd.byte_len(self.bs))
                    .offset(off)
                    .mode(mode)
                    .build()
            }
        };
        let entry = entry.user_data(i as u64);
        // SAFETY: the SQE points at memory owned by slot `i` (iovec array, buffers kept
        // alive by the command's keepalive, or the bounce buffer), which stays in place
        // until its CQE is reaped in `poll`.
        unsafe {
            while self.ring.submission().push(&entry).is_err() {
                // SQ full: hand what we have to the kernel and retry.
                let _ = self.ring.submit();
            }
        }
        self.unsubmitted += 1;
    }

    /// Does `cmd` need a bounce buffer, and of how many bytes?
    fn bounce_len(&self, cmd: &IoCommand) -> Option<usize> {
        (cmd.opcode.has_data() && self.direct && !cmd.sg.is_aligned(DIO_ALIGN))
            .then(|| cmd.sg.len() as usize)
    }

    /// May a bounce buffer of `len` bytes be allocated now?
    fn bounce_fits(&self, len: usize) -> bool {
        self.bounce_bytes == 0 || self.bounce_bytes + len <= BOUNCE_BUDGET
    }

    /// Start `cmd` if a slot and (if it needs one) bounce budget are free, or give it back.
    fn try_start(&mut self, cmd: IoCommand) -> Result<(), IoCommand> {
        if self.free.is_empty() || self.bounce_len(&cmd).is_some_and(|l| !self.bounce_fits(l)) {
            return Err(cmd);
        }
        self.start(cmd);
        Ok(())
    }

    fn start(&mut self, cmd: IoCommand) {
        let budget = self.bounce_len(&cmd).is_none_or(|l| self.bounce_fits(l));
        let Some(i) = self.free.pop().filter(|_| budget) else {
            self.backlog.push_back(cmd);
            return;
        };
        let mut bounce = None;
        if let Some(len) = self.bounce_len(&cmd) {
            match AlignedBuf::try_new(len) {
                Some(mut b) => {
                    self.bounce_bytes += b.len();
                    if cmd.opcode == Opcode::Write {
                        // SAFETY: the frontend built the SG list from validated, mapped
                        // memory that stays mapped while the command is ours.
                        unsafe { cmd.sg.copy_to(&mut b.as_mut_slice()[..len]) };
                    }
                    bounce = Some(b);
                }
                None => {
                    self.free.push(i);
                    self.failed.push_back((cmd, Status::INTERNAL_ERROR));
                    return;
                }
            }
        }
        let punch = cmd.opcode == Opcode::WriteZeroes && !self.zero_range.load(Ordering::Relaxed);
        self.slots[i as usize] = Slot {
            cmd: Some(cmd),
            bounce,
            done: 0,
            punch,
        };
        self.in_flight += 1;
        self.push_slot(i);
    }

    /// Handle one CQE. Returns the finished command, or None if it was resubmitted.
    fn complete(&mut self, i: u32, res: i32) -> Option<(IoCommand, Status)> {
        let bs = self.bs;
        let slot = &mut self.slots[i as usize];
        let cmd = slot.cmd.as_mut()?;
        let status = if res < 0 {
            let errno = -res;
            if errno == libc::EOPNOTSUPP && cmd.opcode == Opcode::WriteZeroes && !slot.punch {
                // e.g. tmpfs: no ZERO_RANGE. Punching a hole also reads back as zeros.
                self.zero_range.store(false, Ordering::Relaxed);
                slot.punch = true;
                self.push_slot(i);
                return None;
            }
            if errno == libc::EINVAL
                && cmd.opcode.has_data()
                && self.direct
                && slot.bounce.is_none()
            {
                // The filesystem wants stricter alignment than we assumed: bounce it, when
                // the budget allows (the slot waits until then).
                slot.done = 0;
                self.bounce_wait.push_back(i);
                self.retry_bounces();
                return None;
            }
            Status::from_errno(errno, cmd.opcode)
        } else if cmd.opcode.has_data() {
            let total = cmd.byte_len(bs);
            let n = res as u64;
            if n == 0 {
                if cmd.opcode == Opcode::Read {
                    // Past the end of a file someone truncated: the rest reads as zeros.
                    let done = slot.done as usize;
                    let len = total as usize;
                    if let Some(b) = slot.bounce.as_mut() {
                        b.as_mut_slice()[done..len].fill(0);
                    } else {
                        let zeros = vec![0u8; len - done];
                        // SAFETY: the remaining segments are mapped, writable guest memory.
                        unsafe { cmd.sg.copy_from(&zeros) };
                    }
                    Status::SUCCESS
                } else {
                    Status::WRITE_FAULT
                }
            } else if slot.done + n < total {
                slot.done += n;
                if slot.bounce.is_none() {
                    cmd.sg.advance(n as usize);
                }
                self.push_slot(i);
                return None;
            } else {
                Status::SUCCESS
            }
        } else {
            Status::SUCCESS
        };
        let mut slot = std::mem::take(&mut self.slots[i as usize]);
        if let Some(b) = &slot.bounce {
            self.bounce_bytes -= b.len();
        }
        let cmd = slot.cmd.take()?;
        if status.is_ok() && cmd.opcode == Opcode::Read {
            if let Some(b) = slot.bounce.as_mut() {
                let len = cmd.sg.len() as usize;
                // SAFETY: the SG list's memory is mapped and writable (validated upstream).
                unsafe { cmd.sg.copy_from(&b.as_mut_slice()[..len]) };
            }
        }
        self.free.push(i);
        self.in_flight -= 1;
        Some((cmd, status))
    }
}

impl UringQueue {
    /// Give the slots waiting for a bounce buffer one, as far as the budget allows.
    fn retry_bounces(&mut self) {
        while let Some(&i) = self.bounce_wait.front() {
            let slot = &self.slots[i as usize];
            let Some(len) = slot.cmd.as_ref().map(|c| c.sg.len() as usize) else {
                self.bounce_wait.pop_front();
                continue;
            };
            if !self.bounce_fits(len) {
                break;
            }
            self.bounce_wait.pop_front();
            match AlignedBuf::try_new(len) {
                Some(mut b) => {
                    let slot = &mut self.slots[i as usize];
                    if let Some(cmd) = slot.cmd.as_ref() {
                        if cmd.opcode == Opcode::Write {
                            // SAFETY: as in `start`: the SG list's memory is mapped and ours.
                            unsafe { cmd.sg.copy_to(&mut b.as_mut_slice()[..len]) };
                        }
                    }
                    self.bounce_bytes += b.len();
                    slot.bounce = Some(b);
                    self.push_slot(i);
                }
                None => {
                    let mut slot = std::mem::take(&mut self.slots[i as usize]);
                    self.free.push(i);
                    self.in_flight -= 1;
                    if let Some(c) = slot.cmd.take() {
                        self.failed.push_back((c, Status::INTERNAL_ERROR));
                    }
                }
            }
        }
    }
}

impl BlockQueue for UringQueue {
    fn submit(&mut self, cmd: IoCommand) {
        self.start(cmd);
    }

    fn kick(&mut self) {
        if self.unsubmitted > 0 {
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit: {e}");
            }
            self.unsubmitted = 0;
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        while let Some((c, s)) = self.failed.pop_front() {
            done(c, s);
            n += 1;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        loop {
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if cqes.is_empty() {
                break;
            }
            for &(ud, res) in &cqes {
                if ud == CANCEL_TAG {
                    continue;
                }
                if let Some((c, s)) = self.complete(ud as u32, res) {
                    done(c, s);
                    n += 1;
                }
            }
        }
        self.cqes = cqes;
        self.retry_bounces();
        while let Some(c) = self.backlog.pop_front() {
            if let Err(c) = self.try_start(c) {
                self.backlog.push_front(c);
                break;
            }
        }
        while let Some((c, s)) = self.failed.pop_front() {
            done(c, s);
            n += 1;
        }
        self.kick();
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.backlog.len() + self.failed.len()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.efd.as_raw_fd())
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // Never started: nothing of theirs is in the kernel.
        self.backlog.clear();
        self.failed.clear();
        // Waiting for bounce budget: the kernel handed them back already (EINVAL).
        for i in std::mem::take(&mut self.bounce_wait) {
            if let Some(slot) = self.slots.get_mut(i as usize) {
                if slot.cmd.take().is_some() {
                    self.in_flight -= 1;
                }
            }
        }
        if self.in_flight == 0 {
            return;
        }
        let deadline = Instant::now() + self.drain_wait;
        let _ = self.ring.submit();
        // Ask the kernel to cancel what it can (a read of a pipe or socket, a request
        // waiting in io-wq); a transfer already under way finishes by itself.
        let busy: Vec<u64> = (0..self.slots.len() as u64)
            .filter(|&i| self.slots[i as usize].cmd.is_some())
            .collect();
        for i in busy {
            let e = opcode::AsyncCancel::new(i).build().user_data(CANCEL_TAG);
            // SAFETY: a cancel request points at no memory of ours.
            while unsafe { self.ring.submission().push(&e) }.is_err() {
                let _ = self.ring.submit();
            }
        }
        let _ = self.ring.submit();
        loop {
            self.discard_completions();
            if self.in_flight == 0 {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            self.wait_completion(deadline);
        }
        // The kernel still owns these commands' buffers (and the iovec arrays in their SG
        // lists): keep them allocated forever rather than let it write into freed memory.
        tracing::error!(
            commands = self.in_flight,
            "io_uring queue dropped with commands still in the kernel after {:?}; their buffers are leaked on purpose",
            self.drain_wait
        );
        LEAKED.fetch_add(self.in_flight as u64, Ordering::Relaxed);
        std::mem::forget(std::mem::take(&mut self.slots));
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;
    use nvmux_core::SgList;
    use std::os::unix::fs::OpenOptionsExt;

    /// Many large misaligned writes: bounce buffers stay within the budget (the rest wait),
    /// and every write completes with its data on the file.
    #[test]
    fn misaligned_writes_wait_for_bounce_budget() {
        let dir = std::env::temp_dir().join(format!("nvmux-bounce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        const N: usize = 8;
        const LEN: usize = 16 << 20;
        f.set_len((N * LEN) as u64).unwrap();
        let mut q =
            UringQueue::new(Arc::new(f), 512, true, Arc::new(AtomicBool::new(true)), 16).unwrap();
        // One buffer, one byte off alignment: every write needs a bounce buffer.
        let mut data = vec![0x5au8; LEN + 1];
        for i in 0..N {
            let mut sg = SgList::default();
            sg.push(data[1..].as_mut_ptr(), LEN);
            q.submit(IoCommand::new(
                Opcode::Write,
                (i * LEN / 512) as u64,
                (LEN / 512) as u32,
                i as u64,
                sg,
            ));
            assert!(q.bounce_bytes <= BOUNCE_BUDGET, "{} bytes", q.bounce_bytes);
        }
        q.kick();
        assert_eq!(
            q.bounce_bytes, BOUNCE_BUDGET,
            "as many as fit are in flight"
        );
        assert_eq!(q.in_flight(), N);
        let mut done = Vec::new();
        let t0 = std::time::Instant::now();
        while done.len() < N {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "writes did not complete"
            );
            q.poll(&mut |c, s| {
                assert!(s.is_ok(), "{s:?}");
                done.push(c.tag);
            });
            assert!(q.bounce_bytes <= BOUNCE_BUDGET, "{} bytes", q.bounce_bytes);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(q.bounce_bytes, 0);
        let back = std::fs::read(&p).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
