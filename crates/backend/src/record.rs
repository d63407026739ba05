//! A recording layer for the power-cut simulator (`nvmux powercut`), after Linux's
//! dm-log-writes: every change that reaches a device is appended to an [`IoLog`] in
//! completion order, with its payload, so that any state the device could be left in by
//! a power cut can be rebuilt afterwards from a copy of the device taken before.
//!
//! * [`RecordingDevice`] wraps any [`BlockDevice`] (a pool's data device, a file disk):
//!   a write is logged when its queue hands back its successful completion (with its
//!   payload, and whether it was FUA), write zeroes and deallocate as a zeroed range,
//!   and a flush as a [`Event::FlushStart`] when it is submitted and an
//!   [`Event::FlushEnd`] when it completes. Writes that complete between the two were in
//!   flight at the flush: the flush does not cover them.
//! * Code that writes a device synchronously (a pool's metadata: `pwrite`, `fallocate`,
//!   `fdatasync`) logs through [`IoLog::write`], [`IoLog::zero`] and
//!   [`IoLog::flush_start`] / [`IoLog::flush_end`] after each call returns.
//!
//! The log is for tests and the simulator: it holds every payload in memory.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use nvmux_core::record::ChangeLog;
use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, IoCommand, Opcode, Result, Status};

/// One change that reached the device.
#[derive(Clone, Debug)]
pub enum Event {
    /// `data` was written at byte `off`; with `fua` it was durable when it completed.
    Write {
        off: u64,
        data: Arc<[u8]>,
        fua: bool,
    },
    /// `len` bytes at `off` now read as zeros (write zeroes, deallocate, a punched or
    /// zeroed range).
    Zero { off: u64, len: u64 },
    /// A flush (fsync) was issued: it makes durable every change logged before this.
    FlushStart { id: u64 },
    /// The flush `id` completed (successfully: failed flushes are logged as nothing).
    FlushEnd { id: u64 },
}

/// The shared, append-only log of one device.
#[derive(Default)]
pub struct IoLog {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    next_flush: u64,
}

impl IoLog {
    pub fn new() -> Arc<IoLog> {
        Arc::new(IoLog::default())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Events logged so far: a position in the log.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn write(&self, off: u64, data: &[u8], fua: bool) {
        self.lock().events.push(Event::Write {
            off,
            data: data.into(),
            fua,
        });
    }

    pub fn zero(&self, off: u64, len: u64) {
        if len > 0 {
            self.lock().events.push(Event::Zero { off, len });
        }
    }

    /// A flush is issued now; pass the id to [`IoLog::flush_end`] when it succeeds.
    pub fn flush_start(&self) -> u64 {
        let mut g = self.lock();
        let id = g.next_flush;
        g.next_flush += 1;
        g.events.push(Event::FlushStart { id });
        id
    }

    pub fn flush_end(&self, id: u64) {
        self.lock().events.push(Event::FlushEnd { id });
    }

    /// A copy of the events logged so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }
}

impl ChangeLog for IoLog {
    fn write(&self, off: u64, data: &[u8], fua: bool) {
        IoLog::write(self, off, data, fua)
    }
    fn zero(&self, off: u64, len: u64) {
        IoLog::zero(self, off, len)
    }
    fn flush_start(&self) -> u64 {
        IoLog::flush_start(self)
    }
    fn flush_end(&self, id: u64) {
        IoLog::flush_end(self, id)
    }
}

/// A device whose every completed change is logged (see the module documentation).
pub struct RecordingDevice {
    inner: Arc<dyn BlockDevice>,
    log: Arc<IoLog>,
}

impl RecordingDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, log: Arc<IoLog>) -> Self {
        RecordingDevice { inner, log }
    }
}

impl BlockDevice for RecordingDevice {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        Ok(Box::new(RecordingQueue {
            inner: self.inner.open_queue(depth)?,
            log: self.log.clone(),
            bs: self.inner.info().block_size as u64,
            flushes: HashMap::new(),
            next: 0,
        }))
    }
    fn describe(&self) -> String {
        format!("{} (recorded)", self.inner.describe())
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

/// Flushes in flight are tagged with this bit and a number of ours; the caller's tag is
/// kept aside and restored at completion.
const FLUSH_TAG: u64 = 1 << 62;

struct RecordingQueue {
    inner: Box<dyn BlockQueue>,
    log: Arc<IoLog>,
    bs: u64,
    /// Our tag → (the caller's tag, the flush's log id).
    flushes: HashMap<u64, (u64, u64)>,
    next: u64,
}

impl BlockQueue for RecordingQueue {
    fn submit(&mut self, mut cmd: IoCommand) {
        if cmd.opcode == Opcode::Flush {
            let id = self.log.flush_start();
            let t = FLUSH_TAG | self.next;
            self.next = (self.next + 1) & (FLUSH_TAG - 1);
            self.flushes.insert(t, (cmd.tag, id));
            cmd.tag = t;
        }
        self.inner.submit(cmd);
    }
    fn kick(&mut self) {
        self.inner.kick();
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let log = &self.log;
        let flushes = &mut self.flushes;
        let bs = self.bs;
        self.inner.poll(&mut |mut cmd, st| {
            match cmd.opcode {
                Opcode::Flush => {
                    if let Some((tag, id)) = flushes.remove(&cmd.tag) {
                        cmd.tag = tag;
                        if st.is_ok() {
                            log.flush_end(id);
                        }
                    }
                }
                Opcode::Write if st.is_ok() => {
                    let mut data = vec![0u8; cmd.sg.len() as usize];
                    // SAFETY: the command's buffers stay valid until it is handed back to
                    // its owner, which happens just below; a write's buffers are readable.
                    unsafe { cmd.sg.copy_to(&mut data) };
                    log.write(cmd.slba * bs, &data, cmd.fua);
                }
                Opcode::WriteZeroes | Opcode::Deallocate if st.is_ok() => {
                    log.zero(cmd.slba * bs, cmd.nlb as u64 * bs);
                }
                _ => {}
            }
            done(cmd, st)
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
    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.inner.wait_fds(out)
    }
    fn take_fds_changed(&mut self) -> bool {
        self.inner.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.inner.busy_poll()
    }
    fn may_sleep(&self) -> bool {
        self.inner.may_sleep()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmux_core::{AlignedBuf, SgList};

    fn run(q: &mut dyn BlockQueue, cmd: IoCommand) -> Status {
        q.submit(cmd);
        q.kick();
        loop {
            let mut st = None;
            q.poll(&mut |_, s| st = Some(s));
            if let Some(s) = st {
                return s;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn logs_writes_zeroes_and_flushes_in_completion_order() {
        let log = IoLog::new();
        let mem: Arc<dyn BlockDevice> =
            Arc::new(crate::MemoryDevice::new(1 << 20, 512, false).unwrap());
        let dev = RecordingDevice::new(mem, log.clone());
        let mut q = dev.open_queue(4).unwrap();
        let mut b = AlignedBuf::new(4096);
        b.as_mut_slice().fill(7);
        let w = IoCommand::new(Opcode::Write, 8, 8, 1, b.sg(0, 4096));
        assert_eq!(run(&mut *q, w), Status::SUCCESS);
        let mut f = IoCommand::new(Opcode::Write, 16, 8, 2, b.sg(0, 4096));
        f.fua = true;
        assert_eq!(run(&mut *q, f), Status::SUCCESS);
        let z = IoCommand::new(Opcode::WriteZeroes, 0, 2, 3, SgList::default());
        assert_eq!(run(&mut *q, z), Status::SUCCESS);
        let fl = IoCommand::new(Opcode::Flush, 0, 0, 99, SgList::default());
        q.submit(fl);
        q.kick();
        let mut tag = None;
        while tag.is_none() {
            q.poll(&mut |c, _| tag = Some(c.tag));
        }
        assert_eq!(tag, Some(99), "the caller's tag comes back");
        let ev = log.events();
        assert_eq!(ev.len(), 5);
        assert!(
            matches!(&ev[0], Event::Write { off: 4096, data, fua: false } if data.len() == 4096 && data[0] == 7)
        );
        assert!(matches!(
            &ev[1],
            Event::Write {
                off: 8192,
                fua: true,
                ..
            }
        ));
        assert!(matches!(ev[2], Event::Zero { off: 0, len: 1024 }));
        assert!(matches!(ev[3], Event::FlushStart { id: 0 }));
        assert!(matches!(ev[4], Event::FlushEnd { id: 0 }));
    }
}
