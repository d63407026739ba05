//! Tests on real files (FileDevice) and memory devices. The one mock is `Flaky`, a wrapper
//! that makes a real device fail writes or reads on demand.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_backend::{FileDevice, FileOptions};
use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, IoCommand, Opcode, SgList, Status};

use crate::*;

const SIZE: u64 = 8 << 20;
const BS: usize = 512;

/// A test's own directory, removed when the test ends.
pub(crate) struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("nvmux-mirror-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn file_dev(path: &Path) -> Arc<dyn BlockDevice> {
    let o = FileOptions {
        size: Some(SIZE),
        ..FileOptions::default()
    };
    Arc::new(FileDevice::open(path, &o).unwrap())
}

/// A real device that fails writes (and reads) while told to.
struct Flaky {
    inner: Arc<dyn BlockDevice>,
    fail_writes: Arc<AtomicBool>,
    /// Reads to fail (counted down).
    fail_reads: Arc<AtomicU32>,
    spy: Option<Arc<Spy>>,
    /// Microseconds each write of 64 KiB or more (a region copy's) waits in `submit`
    /// (widens race windows).
    write_delay_us: u64,
}

/// Checks, for every write that reaches the leg, that the bitmap file already has the
/// bits of its regions set.
struct Spy {
    bitmap: PathBuf,
    region_blocks: u64,
    checked: AtomicU32,
    violations: AtomicU32,
}

struct FlakyQueue {
    inner: Box<dyn BlockQueue>,
    fail_writes: Arc<AtomicBool>,
    fail_reads: Arc<AtomicU32>,
    spy: Option<Arc<Spy>>,
    write_delay_us: u64,
    ready: VecDeque<(IoCommand, Status)>,
}

impl BlockDevice for Flaky {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn open_queue(&self, depth: u32) -> nvmux_core::Result<Box<dyn BlockQueue>> {
        Ok(Box::new(FlakyQueue {
            inner: self.inner.open_queue(depth)?,
            fail_writes: self.fail_writes.clone(),
            fail_reads: self.fail_reads.clone(),
            spy: self.spy.clone(),
            write_delay_us: self.write_delay_us,
            ready: VecDeque::with_capacity(depth as usize * 2),
        }))
    }
    fn describe(&self) -> String {
        "flaky".into()
    }
}

impl BlockQueue for FlakyQueue {
    fn submit(&mut self, cmd: IoCommand) {
        if cmd.opcode.is_write() && self.write_delay_us > 0 && cmd.nlb >= 128 {
            std::thread::sleep(Duration::from_micros(self.write_delay_us));
        }
        if let Some(spy) = self.spy.as_ref().filter(|_| cmd.opcode.is_write()) {
            let info = read_bitmap(&spy.bitmap).unwrap();
            let a = cmd.slba / spy.region_blocks;
            let b = (cmd.slba + cmd.nlb as u64 - 1) / spy.region_blocks;
            spy.checked.fetch_add(1, SeqCst);
            if !(a..=b).all(|r| info.dirty.contains(&r)) {
                spy.violations.fetch_add(1, SeqCst);
            }
        }
        if cmd.opcode.is_write() && self.fail_writes.load(SeqCst) {
            self.ready.push_back((cmd, Status::WRITE_FAULT));
        } else if cmd.opcode == Opcode::Read
            && self
                .fail_reads
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.ready.push_back((cmd, Status::UNRECOVERED_READ));
        } else {
            self.inner.submit(cmd);
        }
    }
    fn kick(&mut self) {
        self.inner.kick();
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        while let Some((c, s)) = self.ready.pop_front() {
            done(c, s);
            n += 1;
        }
        n + self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.ready.len()
    }
    fn completion_fd(&self) -> Option<RawFd> {
        self.inner.completion_fd()
    }
    fn may_sleep(&self) -> bool {
        self.ready.is_empty() && self.inner.may_sleep()
    }
}

struct Flags {
    fail_writes: Arc<AtomicBool>,
    fail_reads: Arc<AtomicU32>,
}

fn flaky(inner: Arc<dyn BlockDevice>) -> (Arc<dyn BlockDevice>, Flags) {
    let f = Flags {
        fail_writes: Arc::new(AtomicBool::new(false)),
        fail_reads: Arc::new(AtomicU32::new(0)),
    };
    (
        Arc::new(Flaky {
            inner,
            fail_writes: f.fail_writes.clone(),
            fail_reads: f.fail_reads.clone(),
            spy: None,
            write_delay_us: 0,
        }),
        f,
    )
}

fn leg(name: &str, dev: &Arc<dyn BlockDevice>) -> Leg {
    Leg {
        name: name.into(),
        dev: dev.clone(),
    }
}

/// Drives one queue of a device synchronously (bounded waits).
pub(crate) struct Drv {
    q: Box<dyn BlockQueue>,
    fds: Vec<RawFd>,
}

impl Drv {
    pub(crate) fn new(dev: &dyn BlockDevice, depth: u32) -> Drv {
        let q = dev.open_queue(depth).unwrap();
        let mut fds = Vec::new();
        q.wait_fds(&mut fds);
        Drv { q, fds }
    }

    /// Poll until at least one completion arrived (or 30 s pass: panic).
    pub(crate) fn reap(&mut self, out: &mut Vec<(IoCommand, Status)>) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let n = self.q.poll(&mut |c, s| out.push((c, s)));
            if n > 0 {
                return;
            }
            assert!(Instant::now() < end, "no completion within 30 s");
            if self.q.take_fds_changed() {
                self.fds.clear();
                self.q.wait_fds(&mut self.fds);
            }
            if self.q.may_sleep() {
                let mut p: Vec<libc::pollfd> = self
                    .fds
                    .iter()
                    .map(|&fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: a valid pollfd array; bounded timeout.
                unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, 10) };
                for fd in &self.fds {
                    nvmux_core::eventfd::drain_fd(*fd);
                }
            }
        }
    }

    pub(crate) fn run(&mut self, cmd: IoCommand) -> (IoCommand, Status) {
        self.q.submit(cmd);
        self.q.kick();
        let mut out = Vec::new();
        while out.is_empty() {
            self.reap(&mut out);
        }
        out.pop().unwrap()
    }

    pub(crate) fn write(&mut self, lba: u64, data: &mut [u8]) -> Status {
        let mut sg = SgList::default();
        sg.push(data.as_mut_ptr(), data.len());
        let nlb = (data.len() / BS) as u32;
        self.run(IoCommand::new(Opcode::Write, lba, nlb, 0, sg)).1
    }

    pub(crate) fn read(&mut self, lba: u64, blocks: u32) -> (Vec<u8>, Status) {
        let mut v = vec![0u8; blocks as usize * BS];
        let mut sg = SgList::default();
        sg.push(v.as_mut_ptr(), v.len());
        let st = self.run(IoCommand::new(Opcode::Read, lba, blocks, 0, sg)).1;
        (v, st)
    }
}

pub(crate) struct Rng(u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `ops` random reads and writes (1..=64 blocks) at QD 16, no two in flight overlapping;
/// every read is checked against `shadow`, which every write updates.
fn random_io(dev: &dyn BlockDevice, ops: u32, seed: u64, shadow: &mut [u8]) {
    const QD: usize = 16;
    let blocks = (shadow.len() / BS) as u64;
    let mut d = Drv::new(dev, QD as u32);
    let mut rng = Rng(seed | 1);
    let mut bufs: Vec<Vec<u8>> = (0..QD).map(|_| vec![0u8; 64 * BS]).collect();
    let mut busy: Vec<Option<(u64, u64, bool)>> = vec![None; QD];
    let mut issued = 0;
    let mut done = 0;
    let mut out = Vec::new();
    while done < ops {
        while issued < ops {
            let Some(slot) = busy.iter().position(|b| b.is_none()) else {
                break;
            };
            let n = rng.next() % 64 + 1;
            let lba = rng.next() % (blocks - n);
            if busy
                .iter()
                .flatten()
                .any(|&(a, m, _)| lba < a + m && a < lba + n)
            {
                // Overlaps a command in flight: reap first (a small range may be full).
                if busy.iter().any(|b| b.is_some()) {
                    break;
                }
                continue;
            }
            let write = rng.next().is_multiple_of(2);
            let buf = &mut bufs[slot];
            let len = n as usize * BS;
            if write {
                for b in buf[..len].iter_mut() {
                    *b = rng.next() as u8;
                }
                shadow[lba as usize * BS..][..len].copy_from_slice(&buf[..len]);
            }
            let mut sg = SgList::default();
            sg.push(buf.as_mut_ptr(), len);
            let op = if write { Opcode::Write } else { Opcode::Read };
            d.q.submit(IoCommand::new(op, lba, n as u32, slot as u64, sg));
            busy[slot] = Some((lba, n, write));
            issued += 1;
        }
        d.q.kick();
        out.clear();
        d.reap(&mut out);
        for (c, st) in out.drain(..) {
            assert!(st.is_ok(), "{st:?}");
            let slot = c.tag as usize;
            let (lba, n, write) = busy[slot].take().unwrap();
            if !write {
                let len = n as usize * BS;
                assert!(
                    bufs[slot][..len] == shadow[lba as usize * BS..][..len],
                    "read at {lba} (+{n}) differs"
                );
            }
            done += 1;
        }
    }
}

fn wait_for(what: &str, max: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + max;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn state(m: &MirrorDevice, name: &str) -> LegState {
    m.status()
        .legs
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.state)
        .unwrap()
}

fn assert_files_equal(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
        panic!("{} and {} differ at byte {i}", a.display(), b.display());
    }
}

fn cfg() -> MirrorConfig {
    MirrorConfig {
        region_size: 64 << 10,
        sync_rate: 0,
        clear_delay: Duration::from_millis(50),
        probe_interval: Duration::from_millis(20),
        ..MirrorConfig::default()
    }
}

#[test]
fn random_io_on_three_legs_keeps_them_equal() {
    let d = tmpdir("random");
    let paths: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| d.join(n)).collect();
    let devs: Vec<_> = paths.iter().map(|p| file_dev(p)).collect();
    let mut c = cfg();
    c.assume_clean = vec!["b".into(), "c".into()];
    let m = MirrorDevice::open(
        vec![leg("a", &devs[0]), leg("b", &devs[1]), leg("c", &devs[2])],
        &d.join("bitmap"),
        c,
    )
    .unwrap();
    let mut shadow = vec![0u8; SIZE as usize];
    random_io(&*m, 3000, 7, &mut shadow);
    let st = m.status();
    assert!(st.legs.iter().all(|l| l.state == LegState::Healthy));
    assert!(st.bitmap_writes > 0, "bits were set before writes");
    m.shutdown();
    assert_files_equal(&paths[0], &paths[1]);
    assert_files_equal(&paths[0], &paths[2]);
    assert!(std::fs::read(&paths[0]).unwrap() == shadow);
    let info = read_bitmap(&d.join("bitmap")).unwrap();
    assert_eq!(info.regions, SIZE / (64 << 10));
    assert_eq!(info.legs.len(), 3);
}

#[test]
fn a_leg_that_fails_writes_is_faulted_durably_and_reads_go_elsewhere() {
    let d = tmpdir("fault");
    let a = file_dev(&d.join("a"));
    let (b, flags) = flaky(file_dev(&d.join("b")));
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    c.probe_interval = Duration::from_secs(3600);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    let mut shadow = vec![0u8; SIZE as usize];
    random_io(&*m, 300, 3, &mut shadow);
    flags.fail_writes.store(true, SeqCst);
    random_io(&*m, 500, 4, &mut shadow);
    assert_eq!(state(&m, "b"), LegState::Faulted);
    let st = m.status();
    let lb = st.legs.iter().find(|l| l.name == "b").unwrap();
    assert!(lb.errors > 0 && lb.faulted_at.is_some());
    // Durable: the file says so while the mirror runs.
    let info = read_bitmap(&d.join("bitmap")).unwrap();
    let rb = info.legs.iter().find(|l| l.name == "b").unwrap();
    assert_eq!(rb.state, LegState::Faulted);
    assert!(
        !info.dirty.is_empty(),
        "no bit is cleared while a leg is faulted"
    );
    // Reads are served by a (b's file misses the writes since the fault).
    let mut dr = Drv::new(&*m, 4);
    let (data, st) = dr.read(0, (SIZE / BS as u64 / 4) as u32 / 8);
    assert!(st.is_ok());
    assert!(data[..] == shadow[..data.len()]);
    drop(dr);
    m.shutdown();
    drop(m);
    // Reopen: b is still faulted.
    let mut c = cfg();
    c.probe_interval = Duration::from_secs(3600);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    assert_eq!(state(&m, "b"), LegState::Faulted);
    m.shutdown();
}

#[test]
fn a_returning_leg_resyncs_only_the_dirty_regions() {
    let d = tmpdir("return");
    let a = file_dev(&d.join("a"));
    let (b, flags) = flaky(file_dev(&d.join("b")));
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    let regions = m.status().regions;
    let mut shadow = vec![0u8; SIZE as usize];
    random_io(&*m, 300, 5, &mut shadow);
    wait_for("bits to clear", Duration::from_secs(10), || {
        m.status().dirty_regions == 0
    });
    flags.fail_writes.store(true, SeqCst);
    // Writes to the first 10 regions only, while b fails.
    let mut dr = Drv::new(&*m, 4);
    let rb = (64 << 10) / BS;
    for r in 0..10u64 {
        let mut buf = vec![r as u8 + 1; 8 * BS];
        assert!(dr.write(r * rb as u64 + 3, &mut buf).is_ok());
        shadow[(r as usize * rb + 3) * BS..][..8 * BS].copy_from_slice(&buf);
    }
    assert_eq!(state(&m, "b"), LegState::Faulted);
    // Writes continue while it is away.
    for r in 20..25u64 {
        let mut buf = vec![0xa0 + r as u8; 4 * BS];
        assert!(dr.write(r * rb as u64, &mut buf).is_ok());
        shadow[(r as usize * rb) * BS..][..4 * BS].copy_from_slice(&buf);
    }
    drop(dr);
    assert!(m.status().dirty_regions >= 15);
    flags.fail_writes.store(false, SeqCst);
    wait_for("b to be healthy", Duration::from_secs(30), || {
        state(&m, "b") == LegState::Healthy
    });
    let st = m.status();
    assert!(
        st.resynced_regions > 0 && st.resynced_regions < regions,
        "resynced {} of {regions}",
        st.resynced_regions
    );
    assert_eq!(st.full_copies, 0);
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
    assert!(std::fs::read(d.join("a")).unwrap() == shadow);
}

#[test]
fn a_crash_during_a_full_copy_resumes_and_converges() {
    let d = tmpdir("crash");
    let a = file_dev(&d.join("a"));
    let b = file_dev(&d.join("b"));
    let bm = d.join("bitmap");
    // A single-leg mirror with data on it.
    let m = MirrorDevice::open(vec![leg("a", &a)], &bm, cfg()).unwrap();
    let mut shadow = vec![0u8; SIZE as usize];
    random_io(&*m, 400, 9, &mut shadow);
    m.shutdown();
    drop(m);
    // b joins: a full copy at 2 MiB/s (about 4 s for 8 MiB); crash after 1.5 s.
    let mut c = cfg();
    c.sync_rate = 2 << 20;
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &bm, c).unwrap();
    assert_eq!(state(&m, "b"), LegState::Syncing);
    wait_for("a persisted cursor", Duration::from_secs(20), || {
        read_bitmap(&bm).unwrap().legs[1].cursor > 0
    });
    let done = m.status().legs[1].sync_done;
    assert!(done > 0 && done < SIZE, "copied {done}");
    // Writes during the copy, some of them in flight... then the crash.
    random_io(&*m, 200, 10, &mut shadow);
    m.crash_for_test();
    drop(m);
    let info = read_bitmap(&bm).unwrap();
    let rb = info.legs.iter().find(|l| l.name == "b").unwrap();
    assert_eq!(rb.state, LegState::Syncing);
    assert!(
        rb.cursor > 0 && rb.cursor < info.regions,
        "cursor {}",
        rb.cursor
    );
    assert!(!info.dirty.is_empty());
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &bm, cfg()).unwrap();
    wait_for("b to be healthy", Duration::from_secs(30), || {
        state(&m, "b") == LegState::Healthy
    });
    wait_for("the full copy to count", Duration::from_secs(5), || {
        m.status().full_copies == 1
    });
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
    assert!(std::fs::read(d.join("a")).unwrap() == shadow);
}

#[test]
fn a_crash_while_mirrored_resyncs_the_dirty_regions() {
    let d = tmpdir("crash2");
    let a = file_dev(&d.join("a"));
    let b = file_dev(&d.join("b"));
    let bm = d.join("bitmap");
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    c.clear_delay = Duration::from_secs(3600);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &bm, c).unwrap();
    let mut dr = Drv::new(&*m, 4);
    let mut buf = vec![7u8; 16 * BS];
    assert!(dr.write(1000, &mut buf).is_ok());
    drop(dr);
    m.crash_for_test();
    drop(m);
    let info = read_bitmap(&bm).unwrap();
    let r = 1000 * BS as u64 / (64 << 10);
    assert_eq!(info.dirty, vec![r], "the written region's bit is durable");
    // The crash left the legs different there (b missed the write).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("b"))
        .unwrap();
    f.write_all_at(&[0x55u8; 4096], 1000 * BS as u64).unwrap();
    drop(f);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &bm, cfg()).unwrap();
    wait_for("the crash resync", Duration::from_secs(10), || {
        m.status().resynced_regions == 1
    });
    wait_for("bits to clear", Duration::from_secs(10), || {
        m.status().dirty_regions == 0
    });
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
}

#[test]
fn add_leg_under_concurrent_writes_copies_everything() {
    let d = tmpdir("add");
    let a = file_dev(&d.join("a"));
    let b = file_dev(&d.join("b"));
    let mut c = cfg();
    c.sync_rate = 8 << 20;
    let m = MirrorDevice::open(vec![leg("a", &a)], &d.join("bitmap"), c).unwrap();
    let mut shadow = vec![0u8; SIZE as usize];
    random_io(&*m, 300, 11, &mut shadow);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let m = m.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(SeqCst) {
                random_io(&*m, 100, 100 + n as u64, &mut shadow);
                n += 1;
            }
            (shadow, n)
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    m.add_leg(leg("b", &b)).unwrap();
    assert!(m.add_leg(leg("b", &b)).is_err(), "names are unique");
    wait_for("b to be healthy", Duration::from_secs(60), || {
        state(&m, "b") == LegState::Healthy
    });
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, SeqCst);
    let (shadow, rounds) = writer.join().unwrap();
    assert!(rounds > 1);
    assert_eq!(m.status().full_copies, 1);
    // Removing: not the last healthy leg.
    m.remove_leg("b").unwrap();
    assert!(m.remove_leg("a").is_err(), "the last healthy leg stays");
    assert_eq!(read_bitmap(&d.join("bitmap")).unwrap().legs.len(), 1);
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
    assert!(std::fs::read(d.join("a")).unwrap() == shadow);
}

#[test]
fn a_failed_read_is_retried_and_repaired() {
    let d = tmpdir("repair");
    let (a, flags) = flaky(file_dev(&d.join("a")));
    let b = file_dev(&d.join("b"));
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    let mut dr = Drv::new(&*m, 4);
    let mut buf = vec![0x3cu8; 8 * BS];
    assert!(dr.write(64, &mut buf).is_ok());
    // a's copy goes bad (behind the mirror's back) and its next read fails.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("a"))
        .unwrap();
    f.write_all_at(&[0u8; 8 * BS], 64 * BS as u64).unwrap();
    drop(f);
    flags.fail_reads.store(1, SeqCst);
    let (data, st) = dr.read(64, 8);
    assert!(st.is_ok());
    assert!(data == buf, "served by b");
    let s = m.status();
    assert_eq!((s.read_retries, s.read_repairs), (1, 1));
    assert_eq!(state(&m, "a"), LegState::Healthy);
    drop(dr);
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
}

#[test]
fn bad_bitmap_files_are_refused_and_a_torn_header_falls_back() {
    let d = tmpdir("bitmap");
    let a = file_dev(&d.join("a"));
    let bm = d.join("bitmap");
    // Two legs: one alone would be a solo pass-through without a file.
    let b = file_dev(&d.join("b"));
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &bm, cfg()).unwrap();
    m.shutdown();
    drop(m);
    let good = read_bitmap(&bm).unwrap();
    // Region size mismatch.
    let mut c = cfg();
    c.region_size = 1 << 20;
    let e = MirrorDevice::open(vec![leg("a", &a)], &bm, c)
        .err()
        .unwrap();
    assert!(e.msg.contains("region size"), "{e}");
    // Legs smaller than the file's size.
    let small: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(
            &d.join("small"),
            &FileOptions {
                size: Some(SIZE / 2),
                ..FileOptions::default()
            },
        )
        .unwrap(),
    );
    let e = MirrorDevice::open(vec![leg("a", &small)], &bm, cfg())
        .err()
        .unwrap();
    assert!(e.msg.contains("legs hold"), "{e}");
    // Torn header: the newest copy is garbage; the other one is used.
    let f = std::fs::OpenOptions::new().write(true).open(&bm).unwrap();
    let newest = good.generation % 2;
    f.write_all_at(&[0xeeu8; 100], newest * 4096 + 20).unwrap();
    let older = read_bitmap(&bm).unwrap();
    assert_eq!(older.generation, good.generation - 1);
    let m = MirrorDevice::open(vec![leg("a", &a)], &bm, cfg()).unwrap();
    m.shutdown();
    drop(m);
    // Both copies garbage / bad magic.
    f.write_all_at(&[0u8; 8192], 0).unwrap();
    let e = read_bitmap(&bm).err().unwrap();
    assert!(e.msg.contains("magic"), "{e}");
    let e = MirrorDevice::open(vec![leg("a", &a)], &bm, cfg())
        .err()
        .unwrap();
    assert!(e.msg.contains("no valid header"), "{e}");
    // A truncated file.
    f.set_len(100).unwrap();
    assert!(read_bitmap(&bm).is_err());
}

#[test]
fn a_write_reaches_a_leg_only_after_its_bits_are_durable() {
    let d = tmpdir("durable");
    let bm = d.join("bitmap");
    let spy = Arc::new(Spy {
        bitmap: bm.clone(),
        region_blocks: (64 << 10) / BS as u64,
        checked: AtomicU32::new(0),
        violations: AtomicU32::new(0),
    });
    let mk = |n: &str| -> Arc<dyn BlockDevice> {
        Arc::new(Flaky {
            inner: file_dev(&d.join(n)),
            fail_writes: Arc::new(AtomicBool::new(false)),
            fail_reads: Arc::new(AtomicU32::new(0)),
            spy: Some(spy.clone()),
            write_delay_us: 0,
        })
    };
    let (a, b) = (mk("a"), mk("b"));
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    c.clear_delay = Duration::from_millis(1);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &bm, c).unwrap();
    let mut shadow = vec![0u8; SIZE as usize];
    for round in 0..4 {
        random_io(&*m, 200, 20 + round, &mut shadow);
        // Let bits clear, so the next round sets them again.
        wait_for("bits to clear", Duration::from_secs(10), || {
            m.status().dirty_regions == 0
        });
    }
    assert!(spy.checked.load(SeqCst) > 300);
    assert_eq!(spy.violations.load(SeqCst), 0);
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
}

#[test]
fn a_write_that_fails_on_every_leg_fails_and_then_nothing_is_healthy() {
    let d = tmpdir("allfail");
    // Memory legs complete at once: an acknowledgement that did not wait for the bitmap
    // writer would beat it.
    let mem = || -> Arc<dyn BlockDevice> {
        Arc::new(nvmux_backend::MemoryDevice::new(SIZE, BS as u32, false).unwrap())
    };
    let (a, fa) = flaky(mem());
    let (b, fb) = flaky(mem());
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    c.probe_interval = Duration::from_secs(3600);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    let mut dr = Drv::new(&*m, 4);
    let mut buf = vec![1u8; 4 * BS];
    assert!(dr.write(8, &mut buf).is_ok());
    fb.fail_writes.store(true, SeqCst);
    assert!(dr.write(8, &mut buf).is_ok(), "a still has it");
    // Acknowledged only once the fault is durable.
    let info = read_bitmap(&d.join("bitmap")).unwrap();
    assert_eq!(info.legs[1].state, LegState::Faulted);
    fa.fail_writes.store(true, SeqCst);
    assert_eq!(dr.write(8, &mut buf), Status::WRITE_FAULT);
    assert_eq!(state(&m, "a"), LegState::Faulted);
    assert!(
        !dr.write(16, &mut buf).is_ok(),
        "no healthy leg: writes fail"
    );
    let (_, st) = dr.read(8, 4);
    assert!(!st.is_ok(), "no healthy leg: reads fail");
    drop(dr);
    m.shutdown();
    drop(m);
    let e = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), cfg())
        .err()
        .unwrap();
    assert!(e.msg.contains("no leg is healthy"), "{e}");
}

#[test]
fn solo_mirror_has_no_file_until_a_leg_is_added_and_misses_no_write() {
    let d = tmpdir("solo");
    let a = file_dev(&d.join("a"));
    let bm = d.join("sub").join("bitmap");
    let m = MirrorDevice::open(vec![leg("a", &a)], &bm, cfg()).unwrap();
    assert!(!bm.exists(), "a solo mirror writes no bitmap");
    assert!(
        m.threads.lock().unwrap().is_empty(),
        "a solo mirror runs no thread"
    );
    let mut dr = Drv::new(&*m, 8);
    let mut buf: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    assert!(dr.write(8, &mut buf).is_ok());
    assert_eq!(m.status().dirty_regions, 0);
    // A second leg: the file appears, the copy carries what was written solo.
    let b = file_dev(&d.join("b"));
    m.add_leg(leg("b", &b)).unwrap();
    assert!(bm.exists());
    let t0 = std::time::Instant::now();
    while state(&m, "b") != LegState::Healthy {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "copy did not finish"
        );
        // Writes during the copy reach both legs.
        assert!(dr.write(16, &mut buf).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    drop(dr);
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
}

/// Guest writes land in the region a resync is copying (each on a block of its own, so
/// no later write hides a stale copy), with the copy's writes slowed down: the copy must
/// never leave older data on the returning leg.
#[test]
fn a_resync_never_overwrites_newer_guest_data() {
    let d = tmpdir("race");
    let a = file_dev(&d.join("a"));
    let fail = Arc::new(AtomicBool::new(false));
    let b: Arc<dyn BlockDevice> = Arc::new(Flaky {
        inner: file_dev(&d.join("b")),
        fail_writes: fail.clone(),
        fail_reads: Arc::new(AtomicU32::new(0)),
        spy: None,
        write_delay_us: 3000,
    });
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    c.probe_interval = Duration::from_millis(200);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    let region = 64u64 << 10;
    let rb = region / BS as u64;
    let regions = (SIZE / region) as usize;
    // b goes away; every region is written (so the resync copies them all, in order).
    fail.store(true, SeqCst);
    let mut dr = Drv::new(&*m, 4);
    for r in 0..regions as u64 {
        let mut buf = vec![0xeeu8; BS];
        assert!(dr.write(r * rb, &mut buf).is_ok());
    }
    assert_eq!(state(&m, "b"), LegState::Faulted);
    fail.store(false, SeqCst);
    let mut next = vec![1u64; regions];
    let mut writes = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while state(&m, "b") != LegState::Healthy {
        assert!(Instant::now() < end, "the resync did not finish");
        let l = &m.status().legs[1];
        if l.state != LegState::Syncing {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // The region being copied: the write lands on both legs between the copy's read
        // and its (slow) write.
        let r = (l.sync_done / region) as usize;
        if r >= regions || next[r] >= rb {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let lba = r as u64 * rb + next[r];
        next[r] += 1;
        let mut buf = vec![(lba % 251) as u8 + 1; BS];
        assert!(dr.write(lba, &mut buf).is_ok());
        writes += 1;
    }
    assert!(writes > 20, "{writes} writes during the resync");
    assert_eq!(m.status().resynced_regions, regions as u64);
    drop(dr);
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
}

/// A read repair racing a guest write of the same region faults the repaired leg (which
/// then resyncs), instead of leaving it with older data.
#[test]
fn a_read_repair_that_races_a_write_resyncs_the_leg() {
    let d = tmpdir("repairrace");
    let (a, flags) = flaky(file_dev(&d.join("a")));
    let b = file_dev(&d.join("b"));
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    c.probe_interval = Duration::from_secs(3600);
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    let mut dr = Drv::new(&*m, 4);
    let mut rbuf = vec![0u8; 8 * BS];
    let mut wbuf = vec![0x77u8; 8 * BS];
    flags.fail_reads.store(1, SeqCst);
    // The read (fails on a, retried on b, repaired) and a write to blocks next to it, in
    // the same region, in flight together.
    let mut sg = SgList::default();
    sg.push(rbuf.as_mut_ptr(), rbuf.len());
    dr.q.submit(IoCommand::new(Opcode::Read, 0, 8, 1, sg));
    let mut sg = SgList::default();
    sg.push(wbuf.as_mut_ptr(), wbuf.len());
    dr.q.submit(IoCommand::new(Opcode::Write, 8, 8, 2, sg));
    dr.q.kick();
    let mut out = Vec::new();
    while out.len() < 2 {
        dr.reap(&mut out);
    }
    assert!(out.iter().all(|(_, st)| st.is_ok()));
    assert_eq!(state(&m, "a"), LegState::Faulted);
    let info = read_bitmap(&d.join("bitmap")).unwrap();
    assert_eq!(
        info.legs[0].state,
        LegState::Faulted,
        "durable before the ack"
    );
    assert!(info.dirty.contains(&0));
    drop(dr);
    m.shutdown();
    drop(m);
    // It comes back and resyncs.
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), cfg()).unwrap();
    wait_for("a to be healthy", Duration::from_secs(30), || {
        state(&m, "a") == LegState::Healthy
    });
    assert!(m.status().resynced_regions >= 1);
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
}

/// Writes that never stop on one region (QD 16) cannot starve its resync: the sync thread
/// holds new writes to it back until the copy is done.
#[test]
fn a_resync_finishes_under_writes_that_never_stop() {
    let d = tmpdir("starve");
    let a = file_dev(&d.join("a"));
    let (b, flags) = flaky(file_dev(&d.join("b")));
    let mut c = cfg();
    c.assume_clean = vec!["b".into()];
    let m = MirrorDevice::open(vec![leg("a", &a), leg("b", &b)], &d.join("bitmap"), c).unwrap();
    flags.fail_writes.store(true, SeqCst);
    let mut dr = Drv::new(&*m, 4);
    let mut buf = vec![9u8; 4 * BS];
    assert!(dr.write(0, &mut buf).is_ok());
    drop(dr);
    assert_eq!(state(&m, "b"), LegState::Faulted);
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let m = m.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            // The first region only, 16 writes and reads in flight all the time.
            let mut shadow = vec![0u8; 64 << 10];
            let mut dr = Drv::new(&*m, 4);
            let (data, st) = dr.read(0, (64 << 10) as u32 / BS as u32);
            assert!(st.is_ok());
            shadow.copy_from_slice(&data);
            drop(dr);
            let mut n = 0;
            while !stop.load(SeqCst) {
                random_io(&*m, 200, 500 + n, &mut shadow);
                n += 1;
            }
            shadow
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    flags.fail_writes.store(false, SeqCst);
    wait_for("b to be healthy", Duration::from_secs(30), || {
        state(&m, "b") == LegState::Healthy
    });
    stop.store(true, SeqCst);
    let shadow = hammer.join().unwrap();
    m.shutdown();
    assert_files_equal(&d.join("a"), &d.join("b"));
    assert!(std::fs::read(d.join("a")).unwrap()[..shadow.len()] == shadow[..]);
}
