//! A layer that splits commands larger than its device takes.
//!
//! A remote NVMe/TCP namespace takes at most its controller's MDTS per command (128 KiB
//! for an nvmux target, 1 MiB for most others), while a guest's virtio-blk requests go
//! up to 1280 KiB and files take 32 MiB. [`SplitDevice`] offers [`crate::MAX_TRANSFER`]
//! and cuts a larger read or write into pieces of the device's `max_transfer` (and a
//! write zeroes or discard into pieces of at most 65536 blocks, NVMe's 16-bit NLB),
//! sends them together and completes the command when the last piece is back, with the
//! first error any piece had. A command that fits goes through whole.
//!
//! Per queue, a slot table of `depth` parents and a pool of piece SG lists, both grown
//! only up to their high-water mark: no allocation per I/O after warm-up.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, IoCommand, Opcode, Result, SgList, Status};

/// Blocks of one write zeroes or discard piece (NVMe's NLB field is 16 bits).
const MAX_BLOCKS: u32 = 1 << 16;
/// Piece SG lists a queue keeps for reuse.
const MAX_SPARE: usize = 1024;

pub struct SplitDevice {
    inner: Arc<dyn BlockDevice>,
    info: DeviceInfo,
}

impl SplitDevice {
    /// `inner` behind a layer that takes commands up to [`crate::MAX_TRANSFER`].
    pub fn new(inner: Arc<dyn BlockDevice>) -> SplitDevice {
        let mut info = inner.info().clone();
        info.max_transfer = crate::MAX_TRANSFER.max(info.max_transfer);
        SplitDevice { inner, info }
    }
}

impl BlockDevice for SplitDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        let bs = self.info.block_size;
        let max = self.inner.info().max_transfer / bs * bs;
        let depth = depth.max(1) as usize;
        Ok(Box::new(SplitQueue {
            q: self.inner.open_queue(depth as u32)?,
            piece_blocks: (max / bs).clamp(1, MAX_BLOCKS),
            bs,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            backlog: VecDeque::with_capacity(depth * 2),
            spare: Vec::with_capacity(MAX_SPARE),
            comps: Vec::with_capacity(depth),
            in_flight: 0,
            done: VecDeque::with_capacity(depth),
        }))
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

struct Parent {
    cmd: IoCommand,
    /// Pieces still out.
    pending: u32,
    status: Status,
    /// The command went down whole (its SG list travels with the piece).
    whole: bool,
}

struct SplitQueue {
    q: Box<dyn BlockQueue>,
    piece_blocks: u32,
    bs: u32,
    slots: Vec<Option<Parent>>,
    free: Vec<u32>,
    backlog: VecDeque<IoCommand>,
    /// SG lists of finished pieces, reused.
    spare: Vec<SgList>,
    /// Completions reaped from the device, reused.
    comps: Vec<(IoCommand, Status)>,
    in_flight: usize,
    done: VecDeque<u32>,
}

impl SplitQueue {
    fn start(&mut self, s: u32, cmd: IoCommand) {
        let nlb = cmd.nlb;
        let blocks_per = if cmd.opcode.has_data() {
            self.piece_blocks
        } else {
            MAX_BLOCKS
        };
        if cmd.opcode == Opcode::Flush || nlb <= blocks_per {
            // Whole: the command itself goes down, its tag kept in the slot.
            let mut cmd = cmd;
            let sub = IoCommand {
                opcode: cmd.opcode,
                nsid: cmd.nsid,
                slba: cmd.slba,
                nlb: cmd.nlb,
                fua: cmd.fua,
                tag: s as u64,
                sg: std::mem::replace(&mut cmd.sg, SgList::empty()),
                keepalive: None,
            };
            self.slots[s as usize] = Some(Parent {
                cmd,
                pending: 1,
                status: Status::SUCCESS,
                whole: true,
            });
            self.q.submit(sub);
            return;
        }
        let mut pending = 0;
        let mut off = 0u32;
        while off < nlb {
            let n = blocks_per.min(nlb - off);
            let mut sg = self.spare.pop().unwrap_or_default();
            sg.clear();
            if cmd.opcode.has_data() {
                cmd.sg.slice_into(
                    off as u64 * self.bs as u64,
                    n as u64 * self.bs as u64,
                    &mut sg,
                );
            }
            let mut sub = IoCommand::new(cmd.opcode, cmd.slba + off as u64, n, s as u64, sg);
            sub.nsid = cmd.nsid;
            sub.fua = cmd.fua;
            self.q.submit(sub);
            pending += 1;
            off += n;
        }
        self.slots[s as usize] = Some(Parent {
            cmd,
            pending,
            status: Status::SUCCESS,
            whole: false,
        });
    }

    fn piece_done(&mut self, mut sub: IoCommand, st: Status) {
        let s = sub.tag as usize;
        let Some(Some(p)) = self.slots.get_mut(s) else {
            return;
        };
        if !st.is_ok() && p.status.is_ok() {
            p.status = st;
        }
        p.pending = p.pending.saturating_sub(1);
        if p.whole {
            // The command went whole: its SG list comes back to it.
            p.cmd.sg = std::mem::replace(&mut sub.sg, SgList::empty());
        } else if sub.sg.capacity() > 0 && self.spare.len() < MAX_SPARE {
            self.spare
                .push(std::mem::replace(&mut sub.sg, SgList::empty()));
        }
        if p.pending == 0 {
            self.done.push_back(s as u32);
        }
    }
}

impl BlockQueue for SplitQueue {
    fn submit(&mut self, cmd: IoCommand) {
        self.in_flight += 1;
        match self.free.pop() {
            Some(s) if self.backlog.is_empty() => self.start(s, cmd),
            Some(s) => {
                self.free.push(s);
                self.backlog.push_back(cmd);
            }
            None => self.backlog.push_back(cmd),
        }
    }
    fn kick(&mut self) {
        self.q.kick();
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        loop {
            let mut comps = std::mem::take(&mut self.comps);
            let pieces = self.q.poll(&mut |c, st| comps.push((c, st)));
            for (c, st) in comps.drain(..) {
                self.piece_done(c, st);
            }
            self.comps = comps;
            while let Some(s) = self.done.pop_front() {
                if let Some(p) = self.slots[s as usize].take() {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    n += 1;
                    done(p.cmd, p.status);
                }
                self.free.push(s);
            }
            let mut started = false;
            while !self.backlog.is_empty() {
                let Some(s) = self.free.pop() else { break };
                if let Some(c) = self.backlog.pop_front() {
                    self.start(s, c);
                    started = true;
                }
            }
            if started {
                self.q.kick();
            }
            if pieces == 0 || !started {
                break;
            }
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.in_flight
    }
    fn completion_fd(&self) -> Option<RawFd> {
        self.q.completion_fd()
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.q.next_deadline()
    }
    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        self.q.wait_fds(out)
    }
    fn take_fds_changed(&mut self) -> bool {
        self.q.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.q.busy_poll()
    }
    fn may_sleep(&self) -> bool {
        self.done.is_empty() && self.q.may_sleep()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryDevice;

    /// A memory device that takes at most 8 KiB per command, and counts what it gets.
    struct Small {
        mem: Arc<dyn BlockDevice>,
        info: DeviceInfo,
    }
    impl BlockDevice for Small {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }
        fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
            Ok(Box::new(SmallQ(self.mem.open_queue(depth)?)))
        }
        fn describe(&self) -> String {
            "small".into()
        }
    }
    struct SmallQ(Box<dyn BlockQueue>);
    impl BlockQueue for SmallQ {
        fn submit(&mut self, cmd: IoCommand) {
            assert!(cmd.sg.len() <= 8192, "a piece larger than the device takes");
            self.0.submit(cmd)
        }
        fn kick(&mut self) {
            self.0.kick()
        }
        fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
            self.0.poll(done)
        }
        fn in_flight(&self) -> usize {
            self.0.in_flight()
        }
        fn completion_fd(&self) -> Option<RawFd> {
            self.0.completion_fd()
        }
    }

    fn run(q: &mut dyn BlockQueue, cmd: IoCommand) -> (IoCommand, Status) {
        q.submit(cmd);
        q.kick();
        let mut out = None;
        for _ in 0..1000 {
            q.poll(&mut |c, s| out = Some((c, s)));
            if let Some(o) = out.take() {
                return o;
            }
        }
        panic!("no completion");
    }

    #[test]
    fn large_commands_are_split_and_reassembled() {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(1 << 20, 512, false).unwrap());
        let mut info = mem.info().clone();
        info.max_transfer = 8192;
        let dev = SplitDevice::new(Arc::new(Small { mem, info }));
        assert_eq!(dev.info().max_transfer, crate::MAX_TRANSFER);
        let mut q = dev.open_queue(4).unwrap();
        let mut data: Vec<u8> = (0..100 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut sg = SgList::default();
        sg.push(data.as_mut_ptr(), data.len());
        let (c, st) = run(&mut *q, IoCommand::new(Opcode::Write, 3, 200, 77, sg));
        assert!(st.is_ok());
        assert_eq!(c.tag, 77);
        assert_eq!(c.sg.len(), 100 * 1024);
        let mut back = vec![0u8; 100 * 1024];
        let mut sg = SgList::default();
        sg.push(back.as_mut_ptr(), back.len());
        let (c, st) = run(&mut *q, IoCommand::new(Opcode::Read, 3, 200, 78, sg));
        assert!(st.is_ok() && c.tag == 78);
        assert!(back == data);
        // A small one goes whole and keeps its tag and SG list.
        let mut sg = SgList::default();
        sg.push(back.as_mut_ptr(), 4096);
        let (c, st) = run(&mut *q, IoCommand::new(Opcode::Read, 3, 8, 1 << 63, sg));
        assert!(st.is_ok() && c.tag == 1 << 63 && c.sg.len() == 4096);
        // Write zeroes over more blocks than one NVMe command holds.
        let (c, st) = run(
            &mut *q,
            IoCommand::new(Opcode::WriteZeroes, 0, 2048, 5, SgList::empty()),
        );
        assert!(st.is_ok() && c.tag == 5 && c.nlb == 2048);
        assert_eq!(q.in_flight(), 0);
    }
}
