//! Pool and thin volume tests on a real pool file (io_uring, O_DIRECT where the
//! filesystem allows it).

use std::path::PathBuf;
use std::sync::Arc;

use nvmux_core::{BlockDevice, BlockQueue, IoCommand, Opcode, SgList, Status};

use crate::pool::{check, Pool, PoolOptions};
use crate::thin::ThinDevice;

/// Open the pool at `p` with its data device as the daemon does: the backend's
/// io_uring file device on the same file (a dev-dependency: the room itself takes any
/// `BlockDevice`).
fn open(p: &std::path::Path) -> nvmux_core::Result<Arc<Pool>> {
    let data = nvmux_backend::FileDevice::open(
        p,
        &nvmux_backend::FileOptions {
            create: false,
            ..Default::default()
        },
    )?;
    Pool::open(p, Arc::new(data))
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> (Dir, PathBuf) {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("nvmux-vol-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("pool.img");
    (Dir(d), p)
}

fn new_pool(name: &str, size: u64) -> (Dir, PathBuf, Arc<Pool>) {
    let (d, p) = tmp(name);
    Pool::create(
        &p,
        &PoolOptions {
            size: Some(size),
            ..Default::default()
        },
    )
    .unwrap();
    let pool = open(&p).unwrap();
    (d, p, pool)
}

fn run(q: &mut dyn BlockQueue, cmd: IoCommand) -> Status {
    q.submit(cmd);
    q.kick();
    for _ in 0..2_000_000 {
        let mut out = None;
        q.poll(&mut |_, s| out = Some(s));
        if let Some(s) = out {
            return s;
        }
        std::thread::yield_now();
    }
    panic!("command did not complete");
}

fn io(q: &mut dyn BlockQueue, op: Opcode, off: u64, buf: &mut [u8]) -> Status {
    let mut sg = SgList::default();
    if op.has_data() {
        sg.push(buf.as_mut_ptr(), buf.len());
    }
    run(
        q,
        IoCommand::new(op, off / 512, (buf.len() / 512) as u32, 1, sg),
    )
}

fn zeroes(q: &mut dyn BlockQueue, op: Opcode, off: u64, len: u64) -> Status {
    run(
        q,
        IoCommand::new(op, off / 512, (len / 512) as u32, 1, SgList::default()),
    )
}

fn write(q: &mut dyn BlockQueue, off: u64, len: usize, byte: u8) {
    let mut b = vec![byte; len];
    assert_eq!(io(q, Opcode::Write, off, &mut b), Status::SUCCESS);
}

fn read(q: &mut dyn BlockQueue, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xeeu8; len];
    assert_eq!(io(q, Opcode::Read, off, &mut b), Status::SUCCESS);
    b
}

fn flush(q: &mut dyn BlockQueue) {
    assert_eq!(
        run(q, IoCommand::new(Opcode::Flush, 0, 0, 1, SgList::default())),
        Status::SUCCESS
    );
}

const MB: u64 = 1 << 20;

/// Check a pool once its last user has let go (a flusher may hold it a moment longer
/// after a drop without close).
fn check_when_free(p: &std::path::Path) -> crate::pool::CheckReport {
    for _ in 0..500 {
        match check(p) {
            Err(e) if e.kind == nvmux_core::ErrorKind::Busy => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r.unwrap(),
        }
    }
    panic!("pool stayed locked");
}

#[test]
fn thin_volume_reads_back_and_holes_read_zero() {
    let (_d, _p, pool) = new_pool("basic", 64 * MB);
    pool.create_volume("a", Some(16 * MB), None).unwrap();
    let dev = ThinDevice::open(&pool, "a").unwrap();
    let mut q = dev.open_queue(8).unwrap();
    let q = &mut *q;
    assert!(read(q, 0, 8192).iter().all(|&b| b == 0));
    write(q, 4096, 4096, 0x11);
    // Across a cluster boundary (64 KiB), both halves new.
    write(q, 65536 - 2048, 4096, 0x22);
    let r = read(q, 0, 3 * 65536);
    assert!(r[..4096].iter().all(|&b| b == 0));
    assert!(r[4096..8192].iter().all(|&b| b == 0x11));
    assert!(r[8192..65536 - 2048].iter().all(|&b| b == 0));
    assert!(r[65536 - 2048..65536 + 2048].iter().all(|&b| b == 0x22));
    assert!(r[65536 + 2048..].iter().all(|&b| b == 0));
    // Out of range and past the end.
    let mut b = vec![0u8; 4096];
    assert_eq!(
        io(q, Opcode::Read, 16 * MB - 2048, &mut b),
        Status::LBA_OUT_OF_RANGE
    );
    let u = pool.usage();
    assert_eq!(u.volumes[0].allocated_bytes, 2 * 65536);
    flush(q);
    // Discard the first cluster, zero part of the second.
    assert_eq!(zeroes(q, Opcode::Deallocate, 0, 65536), Status::SUCCESS);
    assert_eq!(zeroes(q, Opcode::WriteZeroes, 65536, 1024), Status::SUCCESS);
    let r = read(q, 0, 2 * 65536);
    assert!(r[..65536 + 1024].iter().all(|&b| b == 0));
    assert!(r[65536 + 1024..65536 + 2048].iter().all(|&b| b == 0x22));
    assert_eq!(pool.usage().volumes[0].allocated_bytes, 65536);
}

#[test]
fn data_survives_close_and_reopen_and_check_is_clean() {
    let (_d, p, pool) = new_pool("reopen", 64 * MB);
    pool.create_volume("a", Some(8 * MB), None).unwrap();
    {
        let dev = ThinDevice::open(&pool, "a").unwrap();
        let mut q = dev.open_queue(8).unwrap();
        for i in 0..20u64 {
            write(&mut *q, i * 300 * 1024, 4096, i as u8 + 1);
        }
        flush(&mut *q);
    }
    pool.close().unwrap();
    drop(pool);
    let r = check_when_free(&p);
    assert!(r.ok(), "{r:?}");
    assert_eq!(r.volumes, 1);
    let pool = open(&p).unwrap();
    let dev = ThinDevice::open(&pool, "a").unwrap();
    let mut q = dev.open_queue(8).unwrap();
    for i in 0..20u64 {
        assert!(read(&mut *q, i * 300 * 1024, 4096)
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn flushed_writes_survive_without_close() {
    // No close, no checkpoint: only the journal holds the mappings.
    let (_d, p, pool) = new_pool("crash", 64 * MB);
    pool.create_volume("a", Some(8 * MB), None).unwrap();
    {
        let dev = ThinDevice::open(&pool, "a").unwrap();
        let mut q = dev.open_queue(8).unwrap();
        for i in 0..50u64 {
            write(&mut *q, i * 128 * 1024, 4096, 0x40 + i as u8);
        }
        flush(&mut *q);
    }
    // Simulate a crash: drop the pool without close (no checkpoint, nothing more
    // committed; the flusher just stops).
    drop(pool);
    let r = check_when_free(&p);
    assert!(r.ok(), "{r:?}");
    let pool = open(&p).unwrap();
    let dev = ThinDevice::open(&pool, "a").unwrap();
    let mut q = dev.open_queue(8).unwrap();
    for i in 0..50u64 {
        assert!(read(&mut *q, i * 128 * 1024, 4096)
            .iter()
            .all(|&b| b == 0x40 + i as u8));
    }
}

#[test]
fn snapshots_keep_content_and_clones_diverge() {
    let (_d, _p, pool) = new_pool("snap", 64 * MB);
    pool.create_volume("vm", Some(4 * MB), None).unwrap();
    let dev = ThinDevice::open(&pool, "vm").unwrap();
    let mut q = dev.open_queue(8).unwrap();
    write(&mut *q, 0, 65536, 0xaa);
    write(&mut *q, 65536, 4096, 0xbb);
    pool.snapshot("vm", "vm@1").unwrap();
    // The attached device goes on writing to the live volume.
    write(&mut *q, 1024, 1024, 0xcc); // partial: copy-on-write
    write(&mut *q, 65536, 65536, 0xdd); // whole cluster: no copy
    assert_eq!(
        zeroes(&mut *q, Opcode::Deallocate, 2 * 65536, 65536),
        Status::SUCCESS
    );
    let live = read(&mut *q, 0, 3 * 65536);
    assert!(live[..1024].iter().all(|&b| b == 0xaa));
    assert!(live[1024..2048].iter().all(|&b| b == 0xcc));
    assert!(live[2048..65536].iter().all(|&b| b == 0xaa));
    assert!(live[65536..2 * 65536].iter().all(|&b| b == 0xdd));
    let snap = ThinDevice::open(&pool, "vm@1").unwrap();
    assert!(snap.info().read_only);
    let mut sq = snap.open_queue(8).unwrap();
    let s = read(&mut *sq, 0, 3 * 65536);
    assert!(s[..65536].iter().all(|&b| b == 0xaa));
    assert!(s[65536..65536 + 4096].iter().all(|&b| b == 0xbb));
    let mut b = vec![0u8; 4096];
    assert_eq!(
        io(&mut *sq, Opcode::Write, 0, &mut b),
        Status::WRITE_PROTECTED
    );
    // A clone starts as the snapshot and diverges from it.
    pool.create_volume("clone", None, Some("vm@1")).unwrap();
    let cl = ThinDevice::open(&pool, "clone").unwrap();
    let mut cq = cl.open_queue(8).unwrap();
    assert_eq!(read(&mut *cq, 0, 65536), s[..65536].to_vec());
    write(&mut *cq, 0, 4096, 0x77);
    assert!(read(&mut *cq, 0, 4096).iter().all(|&b| b == 0x77));
    assert!(read(&mut *sq, 0, 4096).iter().all(|&b| b == 0xaa));
    assert!(read(&mut *q, 0, 1024).iter().all(|&b| b == 0xaa));
    // Deleting the snapshot hides it while the volume and the clone read through it.
    pool.delete("vm@1", false, &mut |_, _| {}).unwrap();
    assert!(pool.volume("vm@1").is_none());
    assert!(read(&mut *cq, 4096, 4096).iter().all(|&b| b == 0xaa));
    drop(cq);
    pool.delete("clone", false, &mut |_, _| {}).unwrap();
    // With one child left, the hidden snapshot merged into the live volume.
    assert_eq!(pool.usage().volumes.len(), 1);
    let live2 = read(&mut *q, 0, 3 * 65536);
    assert_eq!(live, live2);
}

#[test]
fn a_new_volume_never_reads_a_deleted_ones_data() {
    let (_d, _p, pool) = new_pool("iso", 16 * MB);
    pool.create_volume("a", Some(8 * MB), None).unwrap();
    {
        let dev = ThinDevice::open(&pool, "a").unwrap();
        let mut q = dev.open_queue(8).unwrap();
        let mut off = 0;
        while off < 8 * MB {
            write(&mut *q, off, 65536, 0x5a);
            off += 65536;
        }
        flush(&mut *q);
    }
    let before = pool.usage();
    let mut last = (0, 0);
    pool.delete("a", true, &mut |done, total| last = (done, total))
        .unwrap();
    assert!(
        last.0 == last.1 && last.1 >= 8 * MB,
        "erase progress ends at the bytes erased: {last:?}"
    );
    // B takes the clusters A had (the pool is too small to avoid them).
    pool.create_volume("b", Some(8 * MB), None).unwrap();
    let dev = ThinDevice::open(&pool, "b").unwrap();
    let mut q = dev.open_queue(8).unwrap();
    let mut off = 0;
    while off < 8 * MB {
        assert!(read(&mut *q, off, 65536).iter().all(|&b| b == 0));
        // A partial write to a reused cluster: the rest must still read zero.
        write(&mut *q, off + 512, 512, 0x01);
        let r = read(&mut *q, off, 65536);
        assert!(r[..512].iter().all(|&b| b == 0) && r[1024..].iter().all(|&b| b == 0));
        off += 65536;
    }
    assert!(pool.usage().used_clusters >= before.used_clusters);
}

#[test]
fn full_pool_reports_capacity_exceeded() {
    let (_d, _p, pool) = new_pool("full", 4 * MB);
    pool.create_volume("big", Some(64 * MB), None).unwrap();
    let dev = ThinDevice::open(&pool, "big").unwrap();
    let mut q = dev.open_queue(8).unwrap();
    let mut b = vec![1u8; 65536];
    let mut st = Status::SUCCESS;
    for i in 0..200u64 {
        st = io(&mut *q, Opcode::Write, i * 65536, &mut b);
        if !st.is_ok() {
            break;
        }
    }
    assert_eq!(st, Status::CAPACITY_EXCEEDED);
}

#[test]
fn resize_grows_and_shrink_needs_force() {
    let (_d, _p, pool) = new_pool("resize", 64 * MB);
    pool.create_volume("a", Some(MB), None).unwrap();
    let dev = ThinDevice::open(&pool, "a").unwrap();
    let mut q = dev.open_queue(8).unwrap();
    write(&mut *q, MB - 4096, 4096, 9);
    pool.resize("a", 2 * MB, false, false).unwrap();
    write(&mut *q, 2 * MB - 4096, 4096, 8);
    assert!(
        pool.resize("a", MB, false, false).is_err(),
        "shrink without --force"
    );
    assert!(
        pool.resize("a", MB, true, false).is_err(),
        "data past the new end needs --discard-data"
    );
    pool.resize("a", MB, true, true).unwrap();
    pool.resize("a", 2 * MB, false, false).unwrap();
    assert!(read(&mut *q, 2 * MB - 4096, 4096).iter().all(|&b| b == 0));
    assert!(read(&mut *q, MB - 4096, 4096).iter().all(|&b| b == 9));
}

#[test]
fn check_finds_a_flipped_byte_and_open_refuses() {
    let (_d, p, pool) = new_pool("corrupt", 64 * MB);
    pool.create_volume("a", Some(MB), None).unwrap();
    pool.close().unwrap();
    drop(pool);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    let mut sb = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut sb, 0).unwrap();
    let s0 = crate::format::Superblock::decode(&sb, 0).ok();
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut sb, 4096).unwrap();
    let s1 = crate::format::Superblock::decode(&sb, 1).ok();
    let sb = [s0, s1]
        .into_iter()
        .flatten()
        .max_by_key(|s| s.generation)
        .unwrap();
    // Flip a byte in the active volume table block.
    let at = sb.table_block_at(sb.active_tables, 0) + 100;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    b[0] ^= 0x40;
    std::os::unix::fs::FileExt::write_all_at(&f, &b, at).unwrap();
    let r = check(&p).unwrap();
    assert!(!r.ok());
    let msg = r.errors.join("\n");
    assert!(
        msg.contains("volume table block 0") && msg.contains("checksum"),
        "{msg}"
    );
    let e = open(&p)
        .err()
        .expect("a damaged pool is refused")
        .to_string();
    assert!(
        e.contains("damaged") && e.contains("volume table block 0"),
        "{e}"
    );
}

/// Holds the completions of a real queue while `hold` is set: the device "stops
/// answering" without any I/O really being left in the kernel.
struct Gate {
    inner: Box<dyn BlockQueue>,
    held: Vec<(IoCommand, Status)>,
    hold: Arc<std::sync::atomic::AtomicBool>,
}

impl BlockQueue for Gate {
    fn submit(&mut self, cmd: IoCommand) {
        self.inner.submit(cmd)
    }
    fn kick(&mut self) {
        self.inner.kick()
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let held = &mut self.held;
        self.inner.poll(&mut |c, s| held.push((c, s)));
        if self.hold.load(std::sync::atomic::Ordering::SeqCst) {
            return 0;
        }
        let n = self.held.len();
        for (c, s) in self.held.drain(..) {
            done(c, s);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.completion_fd()
    }
}

/// A thin queue dropped while its device still holds an allocating write never
/// releases the cluster the write goes to (it would be zeroed and handed to another
/// volume while the write may still land in it), and the same drop with the device
/// answering does release it.
#[test]
fn a_dropped_queue_never_releases_a_cluster_with_a_write_in_flight() {
    let (_d, _p, pool) = new_pool("stuck-drop", 64 << 20);
    pool.create_volume("v", Some(8 << 20), None).unwrap();
    let dev = ThinDevice::open(&pool, "v").unwrap();
    let cs = pool.cluster_size();
    for stuck in [true, false] {
        let hold = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let inner = pool.data.open_queue(8).unwrap();
        let mut q = dev
            .queue_over(Box::new(Gate {
                inner,
                held: Vec::new(),
                hold: hold.clone(),
            }))
            .unwrap();
        q.drain_wait = std::time::Duration::from_millis(200);
        // Claimed clusters ready: the write takes the last one.
        while pool.lock_state().claimed.is_empty() {
            pool.ensure_claimed();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let nc = *pool.lock_state().claimed.last().unwrap();
        let x = if stuck { 3 } else { 5 };
        let mut buf = vec![0x5au8; 4096];
        let mut sg = SgList::default();
        sg.push(buf.as_mut_ptr(), buf.len());
        q.submit(IoCommand::new(Opcode::Write, x * cs / 512, 8, 1, sg));
        q.kick();
        let vol = {
            let s = pool.lock_state();
            assert_eq!(s.allocating.len(), 1, "the write allocates");
            s.allocating.keys().next().unwrap().0
        };
        if !stuck {
            // The device answers again before the drop: the write completes and installs.
            hold.store(false, std::sync::atomic::Ordering::SeqCst);
            let mut got = None;
            for _ in 0..2_000_000 {
                q.poll(&mut |_, s| got = Some(s));
                if got.is_some() {
                    break;
                }
                std::thread::yield_now();
            }
            assert_eq!(got, Some(Status::SUCCESS));
        }
        drop(q);
        let s = pool.lock_state();
        assert!(
            s.allocating.is_empty(),
            "allocation registrations are cleared"
        );
        assert!(
            !s.to_zero.contains(&nc),
            "cluster {nc} was released while a write to it may be in flight"
        );
        assert!(!s.claimed.contains(&nc));
        if stuck {
            assert_eq!(s.lookup(vol, x, cs), None, "not installed either");
        } else {
            assert_eq!(s.lookup(vol, x, cs), Some((nc, true)), "installed");
        }
        drop(s);
        std::mem::forget(buf); // the stuck write's buffer stays the kernel's, as the queue left it
    }
}

#[test]
fn a_data_device_smaller_than_the_pool_is_refused() {
    let (_d, p) = tmp("small-data");
    Pool::create(
        &p,
        &PoolOptions {
            size: Some(64 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let small = nvmux_backend::NullDevice::new(1 << 20, 4096, false).unwrap();
    let e = Pool::open(&p, Arc::new(small))
        .err()
        .expect("a device smaller than the pool is refused")
        .to_string();
    assert!(e.contains("data device holds 1048576 bytes"), "{e}");
    // The refused open left the pool as it was: it opens with its own file.
    open(&p).unwrap();
}
