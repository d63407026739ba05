//! Unit tests of the frontend engine, on a mock device (completes what was kicked at the
//! next poll, with a status chosen per LBA).

use super::*;
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

// ---- a per-thread allocation counter (this test binary's global allocator) ---------------

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; the counter is a const-initialised
// thread-local Cell, which itself never allocates.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

// ---- the mock device --------------------------------------------------------------------

/// A command the mock saw: (opcode, slba, nlb, nsid, sg length).
type Submitted = (Opcode, u64, u32, u32, u64);

struct Mock {
    info: DeviceInfo,
    /// Live size in bytes (grows under the engine).
    size: AtomicU64,
    /// `capacity_bytes` calls.
    size_reads: AtomicU64,
    /// Commands at this LBA fail with a write fault.
    bad_lba: AtomicU64,
    log: Mutex<Vec<Submitted>>,
    logging: std::sync::atomic::AtomicBool,
}

impl Mock {
    fn new(blocks: u64, read_only: bool) -> Arc<Mock> {
        Arc::new(Mock {
            info: DeviceInfo {
                block_size: 512,
                num_blocks: blocks,
                read_only,
                discard: true,
                write_zeroes: true,
                volatile_cache: false,
                max_transfer: 1 << 20,
            },
            size: AtomicU64::new(blocks * 512),
            size_reads: AtomicU64::new(0),
            bad_lba: AtomicU64::new(u64::MAX),
            log: Mutex::new(Vec::new()),
            logging: std::sync::atomic::AtomicBool::new(true),
        })
    }
}

struct MockQueue {
    dev: Arc<Mock>,
    queued: VecDeque<IoCommand>,
    kicked: VecDeque<IoCommand>,
}

impl BlockDevice for Mock {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> crate::Result<Box<dyn BlockQueue>> {
        // The mock needs its Arc; tests open queues through `MockDev`.
        let _ = depth;
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            "use MockDev",
        ))
    }
    fn describe(&self) -> String {
        "mock".into()
    }
    fn capacity_bytes(&self) -> u64 {
        self.size_reads.fetch_add(1, Ordering::Relaxed);
        self.size.load(Ordering::Relaxed)
    }
}

/// The device handed to the engine: opens queues on the shared mock.
struct MockDev(Arc<Mock>);

impl BlockDevice for MockDev {
    fn info(&self) -> &DeviceInfo {
        &self.0.info
    }
    fn open_queue(&self, depth: u32) -> crate::Result<Box<dyn BlockQueue>> {
        Ok(Box::new(MockQueue {
            dev: self.0.clone(),
            queued: VecDeque::with_capacity(depth as usize),
            kicked: VecDeque::with_capacity(depth as usize),
        }))
    }
    fn describe(&self) -> String {
        "mock".into()
    }
    fn capacity_bytes(&self) -> u64 {
        self.0.capacity_bytes()
    }
}

impl BlockQueue for MockQueue {
    fn submit(&mut self, cmd: IoCommand) {
        if self.dev.logging.load(Ordering::Relaxed) {
            self.dev.log.lock().unwrap().push((
                cmd.opcode,
                cmd.slba,
                cmd.nlb,
                cmd.nsid,
                cmd.sg.len(),
            ));
        }
        self.queued.push_back(cmd);
    }
    fn kick(&mut self) {
        while let Some(c) = self.queued.pop_front() {
            self.kicked.push_back(c);
        }
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        while let Some(c) = self.kicked.pop_front() {
            let st = if c.slba == self.dev.bad_lba.load(Ordering::Relaxed) {
                Status::WRITE_FAULT
            } else {
                Status::SUCCESS
            };
            done(c, st);
            n += 1;
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.queued.len() + self.kicked.len()
    }
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A codec's request state: a cookie and a buffer the SG list points into.
#[derive(Default)]
struct Req {
    cookie: u64,
    buf: Vec<u8>,
}

fn engine(blocks: u64, ro: bool, cap: usize) -> (Engine<Req>, Arc<Mock>, Arc<DiskStats>, DiskId) {
    let m = Mock::new(blocks, ro);
    let stats = Arc::new(DiskStats::default());
    let mut e = Engine::new(cap);
    let d = e
        .add_disk(Arc::new(MockDev(m.clone())), &stats, 1, cap as u32)
        .unwrap();
    (e, m, stats, d)
}

/// Allocate, prepare and submit a read of `nlb` blocks at `slba` into the slot's buffer.
fn read(
    e: &mut Engine<Req>,
    d: DiskId,
    slba: u64,
    nlb: u32,
    cookie: u64,
) -> Result<SlotId, Status> {
    let i = e.alloc().ok_or(Status::INTERNAL_ERROR)?;
    if let Err(st) = e.prepare(i, d, Opcode::Read, slba, nlb, false) {
        e.release(i);
        return Err(st);
    }
    let (req, sg) = e.slot_mut(i).parts();
    req.cookie = cookie;
    let len = nlb as usize * 512;
    if req.buf.len() < len {
        req.buf.resize(len, 0);
    }
    sg.push(req.buf.as_mut_ptr(), len);
    e.submit(i)?;
    Ok(i)
}

#[test]
fn slots_are_bounded_reused_and_keep_their_state() {
    let (mut e, _m, _s, _d) = engine(100, false, 3);
    let a = e.alloc().unwrap();
    let b = e.alloc().unwrap();
    let c = e.alloc().unwrap();
    assert_eq!(e.alloc(), None, "capacity is fixed");
    assert_eq!(e.busy(), 3);
    e.slot_mut(b).data.cookie = 7;
    e.release(b);
    assert!(e.has_free());
    let b2 = e.alloc().unwrap();
    assert_eq!(b2, b);
    assert_eq!(
        e.slot(b2).data.cookie,
        7,
        "the codec's state is kept for reuse"
    );
    e.release(a);
    e.release(c);
    e.release(b2);
    e.release(b2); // twice is harmless
    assert_eq!(e.busy(), 0);
    assert!(e.get(99).is_none());
    // alloc_where prefers a slot whose state fits.
    for _ in 0..3 {
        let i = e.alloc().unwrap();
        e.slot_mut(i).data.buf = vec![0; i as usize * 1000];
    }
    for i in 0..3 {
        e.release(i);
    }
    let big = e.alloc_where(|r| r.buf.len() >= 2000).unwrap();
    assert_eq!(big, 2);
}

#[test]
fn validation_uses_live_capacity_and_rereads_it_only_when_out_of_range() {
    let (mut e, m, _s, d) = engine(100, false, 8);
    let i = e.alloc().unwrap();
    assert_eq!(e.prepare(i, d, Opcode::Read, 98, 2, false), Ok(()));
    assert_eq!(
        m.size_reads.load(Ordering::Relaxed),
        0,
        "in range: no re-read"
    );
    assert_eq!(
        e.prepare(i, d, Opcode::Read, 99, 2, false),
        Err(Status::LBA_OUT_OF_RANGE)
    );
    assert_eq!(m.size_reads.load(Ordering::Relaxed), 1);
    assert_eq!(
        e.prepare(i, d, Opcode::Write, u64::MAX, 2, false),
        Err(Status::LBA_OUT_OF_RANGE)
    );
    assert_eq!(
        e.prepare(i, d, Opcode::Write, 0, 0, false),
        Err(Status::INVALID_FIELD)
    );
    // The disk grows: the command that was out of range now fits.
    m.size.store(200 * 512, Ordering::Relaxed);
    assert_eq!(e.prepare(i, d, Opcode::Read, 99, 2, false), Ok(()));
    assert_eq!(e.info(d).unwrap().num_blocks, 200);
    let reads = m.size_reads.load(Ordering::Relaxed);
    assert_eq!(e.prepare(i, d, Opcode::Read, 150, 2, false), Ok(()));
    assert_eq!(m.size_reads.load(Ordering::Relaxed), reads);
    // Flush needs no range; unknown disks are refused.
    assert_eq!(e.prepare(i, d, Opcode::Flush, 0, 0, false), Ok(()));
    assert_eq!(
        e.prepare(i, 9, Opcode::Read, 0, 1, false),
        Err(Status::INVALID_NAMESPACE)
    );

    let (mut e, _m, _s, d) = engine(100, true, 8);
    let i = e.alloc().unwrap();
    assert_eq!(
        e.prepare(i, d, Opcode::Write, 0, 1, false),
        Err(Status::WRITE_PROTECTED)
    );
    assert_eq!(
        e.prepare(i, d, Opcode::Deallocate, 0, 1, false),
        Err(Status::WRITE_PROTECTED)
    );
    assert_eq!(e.prepare(i, d, Opcode::Read, 0, 1, false), Ok(()));
}

#[test]
fn submit_checks_the_data_length() {
    let (mut e, m, _s, d) = engine(100, false, 8);
    let i = e.alloc().unwrap();
    e.prepare(i, d, Opcode::Write, 0, 2, true).unwrap();
    let mut buf = vec![0u8; 1024];
    e.slot_mut(i).sg_mut().push(buf.as_mut_ptr(), 512);
    assert_eq!(e.submit(i), Err(Status::DATA_TRANSFER_ERROR));
    assert_eq!(e.in_flight(), 0);
    e.prepare(i, d, Opcode::Write, 0, 2, true).unwrap();
    e.slot_mut(i).sg_mut().push(buf.as_mut_ptr(), 1024);
    assert_eq!(e.submit(i), Ok(()));
    assert_eq!(e.in_flight(), 1);
    assert_eq!(
        m.log.lock().unwrap().last().copied(),
        Some((Opcode::Write, 0, 2, 1, 1024))
    );
}

#[test]
fn completions_record_stats_and_return_the_sg_list() {
    let (mut e, m, stats, d) = engine(100, false, 8);
    e.round();
    let a = read(&mut e, d, 0, 2, 11).unwrap();
    let b = read(&mut e, d, 4, 1, 12).unwrap();
    let f = e.alloc().unwrap();
    e.prepare(f, d, Opcode::Flush, 0, 0, false).unwrap();
    e.submit(f).unwrap();
    m.bad_lba.store(4, Ordering::Relaxed);
    assert_eq!(e.reap(), 0, "nothing kicked yet");
    assert_eq!(e.in_flight(), 3);
    e.kick();
    e.publish();
    assert_eq!(stats.snapshot().in_flight, 3);
    e.round();
    assert_eq!(e.reap(), 3);
    assert_eq!(e.in_flight(), 0);
    let mut got = Vec::new();
    while let Some((i, st)) = e.next_completion() {
        got.push((e.slot(i).data.cookie, i, st));
    }
    got.sort_by_key(|g| g.1);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], (11, a, Status::SUCCESS));
    assert_eq!(got[1], (12, b, Status::WRITE_FAULT));
    assert_eq!(got[2].2, Status::SUCCESS);
    // The SG list came back to its slot (same allocation, reused next time).
    assert!(e.slot(a).sg.capacity() >= 1);
    assert_eq!(e.slot(a).sg.len(), 1024);
    for i in [a, b, f] {
        e.release(i);
    }
    e.publish();
    let s = stats.snapshot();
    assert_eq!(s.read.ops, 2);
    assert_eq!(s.read.bytes, 1024, "a failed read moves no bytes");
    assert_eq!(s.read.errors, 1);
    assert_eq!(s.other.ops, 1);
    assert_eq!(s.in_flight, 0);
    // set_class: an emulated command counts under its own class.
    let w = e.alloc().unwrap();
    e.prepare(w, d, Opcode::Write, 10, 1, false).unwrap();
    let mut z = vec![0u8; 512];
    e.slot_mut(w).sg_mut().push(z.as_mut_ptr(), 512);
    e.set_class(w, OpClass::Other);
    e.submit(w).unwrap();
    e.kick();
    e.reap();
    assert!(e.next_completion().is_some());
    e.release(w);
    let s = stats.snapshot();
    assert_eq!((s.write.ops, s.other.ops, s.other.bytes), (0, 2, 0));
}

#[test]
fn ranges_fan_out_and_complete_once_with_the_first_error() {
    let (mut e, m, stats, d) = engine(100, false, 4);
    let i = e.alloc().unwrap();
    // One range out of range: nothing goes out.
    assert_eq!(
        e.submit_ranges(i, d, Opcode::Deallocate, &[(0, 8), (99, 2)]),
        Err(Status::LBA_OUT_OF_RANGE)
    );
    assert_eq!(e.in_flight(), 0);
    assert!(m.log.lock().unwrap().is_empty());
    assert_eq!(
        e.submit_ranges(i, d, Opcode::Read, &[(0, 8)]),
        Err(Status::INVALID_FIELD)
    );
    assert_eq!(e.submit_ranges(i, d, Opcode::Deallocate, &[(0, 0)]), Ok(0));
    m.bad_lba.store(20, Ordering::Relaxed);
    assert_eq!(
        e.submit_ranges(
            i,
            d,
            Opcode::Deallocate,
            &[(0, 8), (10, 0), (20, 4), (30, 1)]
        ),
        Ok(3)
    );
    assert_eq!(e.slot(i).pending(), 3);
    e.kick();
    e.reap();
    assert_eq!(e.next_completion(), Some((i, Status::WRITE_FAULT)));
    assert_eq!(e.next_completion(), None);
    e.release(i);
    assert_eq!(stats.snapshot().other.ops, 1, "one slot, one completion");
    let log = m.log.lock().unwrap();
    assert_eq!(log.len(), 3);
    assert!(log.iter().all(|c| c.0 == Opcode::Deallocate && c.4 == 0));
}

#[test]
fn stop_drains_then_retires() {
    let (mut e, _m, stats, d) = engine(100, false, 4);
    let a = read(&mut e, d, 0, 1, 1).unwrap();
    e.stop();
    assert!(e.stopping());
    assert_eq!(e.alloc(), None, "a stopping queue takes no new command");
    assert!(!e.has_free());
    assert!(!e.drained());
    e.kick();
    e.reap();
    assert!(!e.drained(), "a completion waits to be taken");
    assert_eq!(e.next_completion().map(|c| c.0), Some(a));
    e.release(a);
    assert!(e.drained());
    e.retire();
    e.retire();
    assert_eq!(stats.snapshot().read.ops, 1);
    drop(e);
    assert_eq!(stats.snapshot().read.ops, 1, "retired once");
}

#[test]
fn a_retired_disk_goes_once_its_commands_are_done() {
    let m1 = Mock::new(100, false);
    let m2 = Mock::new(100, false);
    let s1 = Arc::new(DiskStats::default());
    let s2 = Arc::new(DiskStats::default());
    let mut e: Engine<Req> = Engine::new(8);
    let d1 = e
        .add_disk(Arc::new(MockDev(m1.clone())), &s1, 1, 8)
        .unwrap();
    let d2 = e
        .add_disk(Arc::new(MockDev(m2.clone())), &s2, 2, 8)
        .unwrap();
    assert!(e.take_fds_changed());
    assert!(!e.take_fds_changed());
    assert_eq!(e.disk_for(2), Some(d2));
    let a = read(&mut e, d2, 0, 1, 1).unwrap();
    assert_eq!(
        m2.log.lock().unwrap()[0].3,
        2,
        "the command carries the disk's nsid"
    );
    e.retire_disk(d2);
    assert_eq!(e.disk_for(2), None);
    assert!(e.info(d2).is_some(), "kept while its command is out");
    let i = e.alloc().unwrap();
    assert_eq!(
        e.prepare(i, d2, Opcode::Read, 0, 1, false),
        Err(Status::INVALID_NAMESPACE)
    );
    e.release(i);
    e.kick();
    e.reap();
    assert_eq!(e.next_completion().map(|c| c.0), Some(a));
    e.release(a);
    assert!(e.info(d2).is_none(), "dropped once idle");
    assert!(e.take_fds_changed());
    assert_eq!(s2.snapshot().read.ops, 1);
    // The slot of a dropped disk is reused for a new one.
    let m3 = Mock::new(10, false);
    let s3 = Arc::new(DiskStats::default());
    let d3 = e.add_disk(Arc::new(MockDev(m3)), &s3, 3, 8).unwrap();
    assert_eq!(d3, d2);
    assert_eq!(e.disks().count(), 2);
    let _ = d1;
}

#[test]
fn steady_state_allocates_nothing_and_reads_the_clock_once_per_round() {
    let (mut e, m, _s, d) = engine(1 << 20, false, 32);
    m.logging.store(false, Ordering::Relaxed);
    let run = |e: &mut Engine<Req>, rounds: u64| {
        for r in 0..rounds {
            e.round();
            for k in 0..32u64 {
                read(e, d, (r * 32 + k) % 1000, 8, k).unwrap();
            }
            e.kick();
            e.reap();
            while let Some((i, st)) = e.next_completion() {
                assert!(st.is_ok());
                e.release(i);
            }
            e.publish();
            assert!(e.clock().is_some());
        }
    };
    run(&mut e, 4); // warm up: slots, their buffers and SG lists exist
    let before = allocs();
    run(&mut e, 1000);
    assert_eq!(allocs() - before, 0, "32 000 commands allocated");
    // The counter counts (so the 0 above means something).
    let v = std::hint::black_box(vec![1u8; 16]);
    assert_eq!(allocs() - before, 1);
    drop(v);
}

#[test]
fn placement_takes_turns() {
    let pool = WorkerPool::new(&crate::worker::WorkerConfig {
        threads: 3,
        ..Default::default()
    })
    .unwrap();
    let p = pool.placement();
    let q = p.clone();
    assert_eq!(p.next().unwrap().index, 0);
    assert_eq!(q.next().unwrap().index, 1, "clones share the turn");
    let s = p.spread();
    assert_eq!(s.iter().map(|w| w.index).collect::<Vec<_>>(), vec![2, 0, 1]);
    assert_eq!(p.next().unwrap().index, 0);
    // Another placement of the same pool (another frontend) takes the next turn.
    assert_eq!(pool.placement().next().unwrap().index, 1);
    assert!(Placement::new(Vec::new()).next().is_none());
}

#[test]
fn a_keepalive_travels_with_the_commands_and_is_dropped_at_release() {
    let (mut e, _m, _s, d) = engine(100, false, 4);
    let mem: Arc<Vec<u8>> = Arc::new(vec![0; 16]);
    let i = e.alloc().unwrap();
    e.prepare(i, d, Opcode::Flush, 0, 0, false).unwrap();
    e.set_keepalive(i, mem.clone());
    assert_eq!(Arc::strong_count(&mem), 2);
    e.submit(i).unwrap();
    assert_eq!(
        Arc::strong_count(&mem),
        2,
        "moved into the command, not cloned"
    );
    e.kick();
    e.reap();
    assert_eq!(e.next_completion(), Some((i, Status::SUCCESS)));
    assert_eq!(
        Arc::strong_count(&mem),
        2,
        "still held after the completion: the reply is written into what it keeps"
    );
    e.release(i);
    assert_eq!(Arc::strong_count(&mem), 1, "dropped at release");
    // A fan-out: every range holds it; the slot keeps one until release.
    let i = e.alloc().unwrap();
    e.set_keepalive(i, mem.clone());
    assert_eq!(
        e.submit_ranges(i, d, Opcode::Deallocate, &[(0, 1), (4, 1), (8, 1)]),
        Ok(3)
    );
    assert_eq!(Arc::strong_count(&mem), 5);
    e.kick();
    e.reap();
    assert_eq!(e.next_completion(), Some((i, Status::SUCCESS)));
    assert_eq!(Arc::strong_count(&mem), 2);
    e.release(i);
    assert_eq!(Arc::strong_count(&mem), 1);
}

#[test]
fn complete_now_counts_a_request_that_needs_no_block_command() {
    let (mut e, m, stats, d) = engine(100, false, 4);
    e.round();
    // A request that failed to parse: counted as an error, no command sent.
    let bad = e.alloc().unwrap();
    e.complete_now(bad, d, OpClass::Read, Status::INVALID_FIELD);
    // One that failed validation after prepare.
    let oor = e.alloc().unwrap();
    let st = e.prepare(oor, d, Opcode::Read, 200, 1, false).unwrap_err();
    e.complete_now(oor, d, OpClass::of(Opcode::Read), st);
    // One the codec answers itself (virtio-blk GET_ID).
    let id = e.alloc().unwrap();
    e.complete_now(id, d, OpClass::Other, Status::SUCCESS);
    // A slot with a command in flight is not completed twice.
    let r = read(&mut e, d, 0, 1, 9).unwrap();
    e.complete_now(r, d, OpClass::Other, Status::SUCCESS);
    assert!(
        m.log.lock().unwrap().len() == 1,
        "only the read went to the device"
    );
    e.kick();
    e.reap();
    let mut got = Vec::new();
    while let Some(c) = e.next_completion() {
        got.push(c);
    }
    assert_eq!(
        got,
        vec![
            (bad, Status::INVALID_FIELD),
            (oor, Status::LBA_OUT_OF_RANGE),
            (id, Status::SUCCESS),
            (r, Status::SUCCESS)
        ]
    );
    for (i, _) in got {
        e.release(i);
    }
    assert_eq!(e.busy(), 0);
    let s = stats.snapshot();
    assert_eq!((s.read.ops, s.read.errors, s.read.bytes), (3, 2, 512));
    assert_eq!((s.other.ops, s.other.errors), (1, 0));
    // Steady state: immediate completions allocate nothing either.
    let before = allocs();
    for _ in 0..1000 {
        e.round();
        for _ in 0..4 {
            let i = e.alloc().unwrap();
            e.complete_now(i, d, OpClass::Other, Status::INVALID_OPCODE);
        }
        while let Some((i, _)) = e.next_completion() {
            e.release(i);
        }
    }
    assert_eq!(allocs() - before, 0);
}

#[test]
fn validate_live_rereads_the_size_only_out_of_range() {
    let m = Mock::new(100, false);
    let mut info = m.info.clone();
    assert_eq!(
        validate_live(Opcode::Read, 0, 100, &mut info, m.as_ref()),
        Ok(())
    );
    assert_eq!(m.size_reads.load(Ordering::Relaxed), 0);
    m.size.store(150 * 512, Ordering::Relaxed);
    assert_eq!(
        validate_live(Opcode::Write, 120, 30, &mut info, m.as_ref()),
        Ok(())
    );
    assert_eq!(
        (m.size_reads.load(Ordering::Relaxed), info.num_blocks),
        (1, 150)
    );
    assert_eq!(
        validate_live(Opcode::Write, 120, 31, &mut info, m.as_ref()),
        Err(Status::LBA_OUT_OF_RANGE)
    );
    assert_eq!(
        validate_live(Opcode::Read, 0, 0, &mut info, m.as_ref()),
        Err(Status::INVALID_FIELD),
        "a bad block count is not a reason to re-read"
    );
    assert_eq!(m.size_reads.load(Ordering::Relaxed), 2);
}
