//! The RBD backend against a real Ceph cluster: the one whose config `NVMUX_CEPH_CONF`
//! names (`tests/ceph/cluster.sh up` starts one). Without it every test prints
//! "skipped: NVMUX_CEPH_CONF not set" and passes. Images are named per process and test
//! and removed at the end.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_backend::rbd::{
    librbd_version, ImageRef, RbdCluster, RbdConfig, RbdDevice, RbdOptions, RETRYABLE,
};
use nvmux_core::alloc_count::{thread_allocs, CountingAlloc, MixedLoad};
use nvmux_core::{BlockDevice, BlockQueue, ErrorKind, IoCommand, Opcode, SgList, Status};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const MIB: u64 = 1 << 20;

fn cluster() -> Option<Arc<RbdCluster>> {
    let Some(conf) = std::env::var_os("NVMUX_CEPH_CONF") else {
        eprintln!("skipped: NVMUX_CEPH_CONF not set");
        return None;
    };
    let cfg = RbdConfig {
        conf: Some(conf.into()),
        op_timeout: Duration::from_secs(30),
        ..RbdConfig::default()
    };
    Some(RbdCluster::connect(&cfg).expect("connect to the test cluster"))
}

/// A test's own image of `size` bytes, created now and removed (with the snapshots the
/// test registers) when the returned [`Cleanup`] goes; `None` without a cluster.
fn new_image(test: &str, size: u64) -> Option<(Arc<RbdCluster>, ImageRef, Cleanup)> {
    let c = cluster()?;
    let img = image(test);
    let mut cl = Cleanup::new(&c);
    cl.image(&img);
    c.create_image(&img, size).unwrap();
    Some((c, img, cl))
}

fn image(test: &str) -> ImageRef {
    ImageRef {
        pool: "rbd".into(),
        namespace: String::new(),
        image: format!("nvmux-t{}-{test}", std::process::id()),
    }
}

/// Removes images (and their snapshots) at the end of a test, even a failed one.
struct Cleanup {
    c: Arc<RbdCluster>,
    /// (image, snapshots), removed last to first.
    items: Vec<(ImageRef, Vec<String>)>,
}

impl Cleanup {
    fn new(c: &Arc<RbdCluster>) -> Cleanup {
        Cleanup {
            c: c.clone(),
            items: Vec::new(),
        }
    }
    fn image(&mut self, img: &ImageRef) {
        self.items.push((img.clone(), Vec::new()));
    }
    fn snap(&mut self, img: &ImageRef, s: &str) {
        if let Some(e) = self.items.iter_mut().find(|(i, _)| i == img) {
            e.1.push(s.into());
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (img, snaps) in self.items.iter().rev() {
            for s in snaps {
                let _ = self.c.remove_snapshot(img, s);
            }
            let _ = self.c.remove_image(img);
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn sg_of(buf: &mut [u8], segs: usize) -> SgList {
    let mut sg = SgList::with_capacity(segs);
    let n = buf.len();
    let step = n.div_ceil(segs);
    let mut off = 0;
    while off < n {
        let l = step.min(n - off);
        sg.push(buf[off..].as_mut_ptr(), l);
        off += l;
    }
    sg
}

/// Poll `q` until `want` completions arrived (sleeping on its descriptors), at most 60 s.
fn collect(q: &mut dyn BlockQueue, want: usize, out: &mut Vec<(u64, Status)>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fds: Vec<RawFd> = Vec::with_capacity(4);
    q.wait_fds(&mut fds);
    let mut got = 0;
    while got < want {
        got += q.poll(&mut |c, s| out.push((c.tag, s)));
        if got >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {got} of {want} completions within 60 s"
        );
        poll_in(&fds, 100);
    }
}

/// `poll` for `fds` to be readable, at most `ms` milliseconds: how many are (0: none
/// within the time, -1: the call failed).
fn poll_in(fds: &[RawFd], ms: i32) -> i32 {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: valid pollfds on the heap for the call.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as _, ms) }
}

/// Run one command to completion.
fn run1(q: &mut dyn BlockQueue, cmd: IoCommand) -> Status {
    q.submit(cmd);
    q.kick();
    let mut out = Vec::new();
    collect(q, 1, &mut out);
    out[0].1
}

fn read(q: &mut dyn BlockQueue, off: u64, len: usize, bs: u32) -> Vec<u8> {
    let mut b = vec![0xeeu8; len];
    let sg = sg_of(&mut b, 1);
    let s = run1(
        q,
        IoCommand::new(
            Opcode::Read,
            off / bs as u64,
            (len / bs as usize) as u32,
            0,
            sg,
        ),
    );
    assert_eq!(s, Status::SUCCESS, "read at {off}");
    b
}

fn write(q: &mut dyn BlockQueue, off: u64, data: &mut [u8], bs: u32) -> Status {
    let nlb = (data.len() / bs as usize) as u32;
    let sg = sg_of(data, 1);
    run1(
        q,
        IoCommand::new(Opcode::Write, off / bs as u64, nlb, 0, sg),
    )
}

fn open(c: &Arc<RbdCluster>, img: &ImageRef) -> RbdDevice {
    RbdDevice::open(c, img, &RbdOptions::default()).expect("open image")
}

#[test]
fn parse_image_refs() {
    let (r, s) = ImageRef::parse("rbd/disk1").unwrap();
    assert_eq!(
        (r.pool.as_str(), r.namespace.as_str(), r.image.as_str()),
        ("rbd", "", "disk1")
    );
    assert_eq!(s, None);
    assert_eq!(r.to_string(), "rbd/disk1");
    let (r, s) = ImageRef::parse("p/ns/img@snap1").unwrap();
    assert_eq!(
        (r.pool.as_str(), r.namespace.as_str(), r.image.as_str()),
        ("p", "ns", "img")
    );
    assert_eq!(s.as_deref(), Some("snap1"));
    assert_eq!(r.to_string(), "p/ns/img");
    for bad in [
        "",
        "img",
        "/img",
        "p/",
        "p//img",
        "a/b/c/d",
        "p/img@",
        "p/img@a@b",
        "p/i\0",
    ] {
        let e = ImageRef::parse(bad).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{bad:?}");
    }
}

#[test]
fn admin_create_info_resize_snapshot_clone_remove() {
    let Some(c) = cluster() else { return };
    let img = image("admin");
    let child = image("admin-clone");
    let mut cl = Cleanup::new(&c);
    assert_eq!(c.image_info(&img).unwrap(), None);
    cl.image(&img);
    c.create_image(&img, 64 * MIB).unwrap();
    let e = c.create_image(&img, 64 * MIB).unwrap_err();
    assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
    assert!(e.msg.contains(&img.image), "{e}");
    let i = c.image_info(&img).unwrap().expect("image exists");
    assert_eq!(i.size, 64 * MIB);
    assert_eq!(i.object_size, 4 * MIB);
    assert_eq!(
        i.features & 0x3d,
        0x3d,
        "default features: {:#x}",
        i.features
    );
    assert_eq!(i.parent, None);
    assert!(i.snapshots.is_empty());

    c.resize_image(&img, 96 * MIB).unwrap();
    assert_eq!(c.image_info(&img).unwrap().unwrap().size, 96 * MIB);

    cl.snap(&img, "s1");
    c.create_snapshot(&img, "s1").unwrap();
    assert_eq!(
        c.image_info(&img).unwrap().unwrap().snapshots,
        vec!["s1".to_string()]
    );
    cl.image(&child);
    c.clone_image(&img, "s1", &child).unwrap();
    let ci = c.image_info(&child).unwrap().unwrap();
    assert_eq!(ci.parent, Some(format!("{img}@s1")));
    assert_eq!(ci.size, 96 * MIB);

    // The snapshot has a clone; the image has a snapshot.
    let e = c.remove_snapshot(&img, "s1").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");
    let e = c.remove_image(&img).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy, "{e}");

    c.remove_image(&child).unwrap();
    assert_eq!(c.image_info(&child).unwrap(), None);
    c.remove_snapshot(&img, "s1").unwrap();
    assert!(c.image_info(&img).unwrap().unwrap().snapshots.is_empty());
    c.remove_image(&img).unwrap();
    assert_eq!(c.image_info(&img).unwrap(), None);
    let e = c.remove_image(&img).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    let e = c.create_snapshot(&img, "s2").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
}

#[test]
fn missing_image_is_not_found() {
    let Some(c) = cluster() else { return };
    let img = image("missing");
    let e = RbdDevice::open(&c, &img, &RbdOptions::default()).expect_err("no such image");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.msg.contains(&img.image), "{e}");
    let bad_pool = ImageRef {
        pool: "no-such-pool".into(),
        ..img
    };
    let e = RbdDevice::open(&c, &bad_pool, &RbdOptions::default()).expect_err("no such pool");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
}

/// Random data at QD 32, mixed sizes and segment counts, FUA writes and flushes among
/// them; read back (also at QD 32) equal to a model.
#[test]
fn qd32_write_read_back() {
    let Some((c, img, _cl)) = new_image("qd32", 64 * MIB) else {
        return;
    };
    let dev = open(&c, &img);
    let bs = 512u32;
    assert_eq!(dev.info().block_size, bs);
    assert_eq!(dev.info().num_blocks, 64 * MIB / 512);
    assert!(dev.info().discard && dev.info().write_zeroes && dev.info().volatile_cache);
    let mut q = dev.open_queue(32).unwrap();
    let mut model = vec![0u8; (64 * MIB) as usize];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // 512 chunks of 128 KiB, each written once per round (disjoint while in flight).
    const CHUNK: u64 = 128 << 10;
    const N: usize = 512;
    let mut bufs: Vec<Vec<u8>> = Vec::with_capacity(N);
    let mut ranges = Vec::with_capacity(N);
    for k in 0..N {
        let chunk = (k as u64 * 97) % (64 * MIB / CHUNK);
        let blocks = 1 + rng.next() % (CHUNK / bs as u64);
        let start = rng.next() % (CHUNK / bs as u64 - blocks + 1);
        let off = chunk * CHUNK + start * bs as u64;
        let mut b = vec![0u8; (blocks * bs as u64) as usize];
        rng.fill(&mut b);
        model[off as usize..off as usize + b.len()].copy_from_slice(&b);
        ranges.push((off, b.len()));
        bufs.push(b);
    }
    let mut out = Vec::new();
    let mut next = 0;
    let mut flushes = 0;
    while next < N || q.in_flight() > 0 {
        while next < N && q.in_flight() < 32 {
            let (off, len) = ranges[next];
            let segs = 1 + next % 5;
            let sg = sg_of(&mut bufs[next], segs);
            let mut cmd = IoCommand::new(
                Opcode::Write,
                off / bs as u64,
                (len / bs as usize) as u32,
                next as u64,
                sg,
            );
            cmd.fua = next % 7 == 0;
            q.submit(cmd);
            if next % 50 == 0 {
                q.submit(IoCommand::new(
                    Opcode::Flush,
                    0,
                    0,
                    1 << 32,
                    SgList::empty(),
                ));
                flushes += 1;
            }
            next += 1;
        }
        q.kick();
        collect(q.as_mut(), 1, &mut out);
    }
    assert_eq!(out.len(), N + flushes);
    assert!(out.iter().all(|(_, s)| *s == Status::SUCCESS), "{out:?}");
    // Read back every range, and a few whole chunks, at QD 32.
    out.clear();
    let mut rbufs: Vec<Vec<u8>> = ranges.iter().map(|&(_, l)| vec![0xeeu8; l]).collect();
    let mut next = 0;
    while next < N || q.in_flight() > 0 {
        while next < N && q.in_flight() < 32 {
            let (off, len) = ranges[next];
            let sg = sg_of(&mut rbufs[next], 1 + next % 3);
            q.submit(IoCommand::new(
                Opcode::Read,
                off / bs as u64,
                (len / bs as usize) as u32,
                next as u64,
                sg,
            ));
            next += 1;
        }
        q.kick();
        collect(q.as_mut(), 1, &mut out);
    }
    assert_eq!(out.len(), N);
    assert!(out.iter().all(|(_, s)| *s == Status::SUCCESS), "{out:?}");
    for (k, &(off, len)) in ranges.iter().enumerate() {
        assert!(
            rbufs[k] == model[off as usize..off as usize + len],
            "range {k} at {off} (+{len}) differs"
        );
    }
    for chunk in [0u64, 97, 194, 291] {
        let off = (chunk % (64 * MIB / CHUNK)) * CHUNK;
        let b = read(q.as_mut(), off, CHUNK as usize, bs);
        assert!(
            b == model[off as usize..(off + CHUNK) as usize],
            "chunk at {off}"
        );
    }
    drop(q);
    drop(dev);
}

#[test]
fn write_zeroes_and_deallocate_read_back_zeros() {
    let Some((c, img, _cl)) = new_image("zeroes", 16 * MIB) else {
        return;
    };
    let dev = RbdDevice::open(
        &c,
        &img,
        &RbdOptions {
            block_size: 4096,
            ..RbdOptions::default()
        },
    )
    .unwrap();
    let bs = 4096;
    assert_eq!(dev.info().num_blocks, 16 * MIB / 4096);
    let mut q = dev.open_queue(8).unwrap();
    let mut data = vec![0x5au8; 8 * MIB as usize];
    assert_eq!(write(q.as_mut(), 0, &mut data, bs), Status::SUCCESS);
    // Small unaligned pieces (inside an object) and a range spanning whole objects.
    let cases = [
        (Opcode::WriteZeroes, 4096u64, 8192u64),
        (Opcode::Deallocate, 65536, 4096),
        (Opcode::WriteZeroes, 3 * MIB, 2 * MIB),
        (Opcode::Deallocate, 5 * MIB + 4096, 2 * MIB),
    ];
    for &(op, off, len) in &cases {
        let s = run1(
            q.as_mut(),
            IoCommand::new(
                op,
                off / bs as u64,
                (len / bs as u64) as u32,
                0,
                SgList::empty(),
            ),
        );
        assert_eq!(s, Status::SUCCESS, "{op:?} at {off}");
    }
    let back = read(q.as_mut(), 0, 8 * MIB as usize, bs);
    let mut want = vec![0x5au8; 8 * MIB as usize];
    for &(_, off, len) in &cases {
        want[off as usize..(off + len) as usize].fill(0);
    }
    for (i, (a, b)) in back.chunks(4096).zip(want.chunks(4096)).enumerate() {
        assert!(a == b, "block {i} (offset {}) differs", i * 4096);
    }
    assert_eq!(
        run1(
            q.as_mut(),
            IoCommand::new(Opcode::Flush, 0, 0, 0, SgList::empty())
        ),
        Status::SUCCESS
    );
}

/// Two queues of one device, each driven by its own thread: both complete everything.
/// And a completion of one queue collected by the other reaches its owner.
#[test]
fn two_queues_cross_delivery() {
    let Some((c, img, _cl)) = new_image("twoq", 32 * MIB) else {
        return;
    };
    let dev = open(&c, &img);
    let bs = 512u32;

    // One thread: a write on q1, then only q2 is polled (it collects for q1), until q1's
    // descriptor says its completion is there.
    let mut q1 = dev.open_queue(4).unwrap();
    let mut q2 = dev.open_queue(4).unwrap();
    let mut data = vec![0x11u8; 65536];
    let sg = sg_of(&mut data, 2);
    q1.submit(IoCommand::new(Opcode::Write, 0, 128, 7, sg));
    q1.kick();
    let mut fds = Vec::new();
    q1.wait_fds(&mut fds);
    assert_eq!(fds.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert_eq!(q2.poll(&mut |_, _| panic!("q2 has no commands")), 0);
        let mut p = libc::pollfd {
            fd: fds[0],
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, 10) } == 1 && q1.in_flight() == 1 {
            let mut got = Vec::new();
            q1.poll(&mut |c, s| got.push((c.tag, s)));
            if !got.is_empty() {
                assert_eq!(got, vec![(7, Status::SUCCESS)]);
                break;
            }
        }
        assert!(Instant::now() < deadline, "q1's write never completed");
    }
    drop(q1);
    drop(q2);

    let dev = Arc::new(dev);
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut q = dev.open_queue(16).unwrap();
                let base = t * 16 * MIB;
                let mut rng = Rng(t + 1);
                let mut bufs: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 65536]).collect();
                for (k, b) in bufs.iter_mut().enumerate() {
                    rng.fill(b);
                    let sg = sg_of(b, 1);
                    q.submit(IoCommand::new(
                        Opcode::Write,
                        (base + k as u64 * 65536) / bs as u64,
                        128,
                        k as u64,
                        sg,
                    ));
                }
                q.kick();
                let mut out = Vec::new();
                collect(q.as_mut(), 64, &mut out);
                assert!(out.iter().all(|(_, s)| *s == Status::SUCCESS), "{out:?}");
                for (k, b) in bufs.iter().enumerate() {
                    let r = read(q.as_mut(), base + k as u64 * 65536, 65536, bs);
                    assert!(r == *b, "thread {t} block {k}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("queue thread");
    }
}

#[test]
fn snapshot_opens_read_only_with_old_data() {
    let Some((c, img, mut cl)) = new_image("snap", 8 * MIB) else {
        return;
    };
    let dev = open(&c, &img);
    let mut q = dev.open_queue(4).unwrap();
    let bs = 512;
    let mut a = vec![0xaau8; 1 << 20];
    assert_eq!(write(q.as_mut(), 0, &mut a, bs), Status::SUCCESS);
    cl.snap(&img, "before");
    c.create_snapshot(&img, "before").unwrap();
    let mut b = vec![0xbbu8; 1 << 20];
    assert_eq!(write(q.as_mut(), 0, &mut b, bs), Status::SUCCESS);

    let snap = RbdDevice::open(
        &c,
        &img,
        &RbdOptions {
            snapshot: Some("before".into()),
            ..RbdOptions::default()
        },
    )
    .unwrap();
    assert!(snap.info().read_only);
    assert!(!snap.info().discard && !snap.info().write_zeroes);
    assert!(snap.describe().contains("@before"), "{}", snap.describe());
    assert!(snap.resize(16 * MIB).is_err());
    let mut sq = snap.open_queue(4).unwrap();
    assert!(read(sq.as_mut(), 0, 1 << 20, bs) == a);
    assert!(read(q.as_mut(), 0, 1 << 20, bs) == b);
    // A write that got past validation is refused by librbd.
    let mut w = vec![0xccu8; 4096];
    let s = write(sq.as_mut(), 0, &mut w, bs);
    assert_eq!(s, Status::WRITE_PROTECTED);
    assert!(read(sq.as_mut(), 0, 4096, bs).iter().all(|&x| x == 0xaa));
    assert_ne!(s, RETRYABLE);
}

#[test]
fn resize_grows_capacity() {
    let Some((c, img, _cl)) = new_image("resize", 8 * MIB) else {
        return;
    };
    let dev = open(&c, &img);
    let mut q = dev.open_queue(4).unwrap();
    assert_eq!(dev.capacity_bytes(), 8 * MIB);
    let bs = 512;
    let mut d = vec![0x42u8; 4096];
    // Past the end: refused.
    assert_eq!(
        write(q.as_mut(), 8 * MIB, &mut d, bs),
        Status::LBA_OUT_OF_RANGE
    );
    assert!(dev.resize(8 * MIB + 100).is_err());
    dev.resize(12 * MIB).unwrap();
    assert_eq!(dev.capacity_bytes(), 12 * MIB);
    assert_eq!(
        dev.info().num_blocks,
        8 * MIB / 512,
        "info() is the size at open"
    );
    assert_eq!(c.image_info(&img).unwrap().unwrap().size, 12 * MIB);
    assert_eq!(write(q.as_mut(), 8 * MIB, &mut d, bs), Status::SUCCESS);
    assert!(read(q.as_mut(), 8 * MIB, 4096, bs) == d);
    assert_eq!(
        write(q.as_mut(), 12 * MIB, &mut d, bs),
        Status::LBA_OUT_OF_RANGE
    );
    idle_queue_settles(q.as_mut());
}

/// With nothing in flight, a poll leaves the queue's descriptors quiet (a worker sleeping
/// on them does not spin), once librbd's last signals are in.
fn idle_queue_settles(q: &mut dyn BlockQueue) {
    assert_eq!(q.in_flight(), 0);
    let mut fds = Vec::new();
    q.wait_fds(&mut fds);
    for _ in 0..50 {
        assert_eq!(q.poll(&mut |_, _| panic!("nothing was submitted")), 0);
        if poll_in(&fds, 200) == 0 {
            return;
        }
    }
    panic!("an idle queue's descriptor stays readable");
}

/// After a warm-up, thousands of reads, writes (some FUA), write zeroes and flushes at
/// QD 16 make no allocation on the submitting and polling thread (Rust heap; librbd's own
/// C++ allocations are not ours to count).
#[test]
fn zero_allocations_per_io() {
    let Some((c, img, _cl)) = new_image("zalloc", 16 * MIB) else {
        return;
    };
    let dev = open(&c, &img);
    const QD: usize = 16;
    let q = dev.open_queue(QD as u32).unwrap();
    // Commands of 8 to 32 blocks; every fifth command a FUA write if it is a write.
    let mut l = MixedLoad::new(q, QD, 512, 4, Some(5));
    l.run(500, Duration::from_secs(120)).unwrap();
    let before = thread_allocs();
    l.run(3000, Duration::from_secs(120)).unwrap();
    let after = thread_allocs();
    assert_eq!(after - before, 0, "allocations on the I/O thread");
    idle_queue_settles(l.queue());
}

/// A queue dropped with writes in flight waits for them (librbd must not touch freed
/// buffers); the device and the cluster connection outlive the caller's handles.
#[test]
fn queue_drop_waits_for_commands_in_flight() {
    let Some((c, img, cl)) = new_image("dropq", 16 * MIB) else {
        return;
    };
    let dev = open(&c, &img);
    let bs = 512u32;
    let mut bufs: Vec<Vec<u8>> = (0..32u8).map(|k| vec![k + 1; 256 << 10]).collect();
    let mut q = dev.open_queue(16).unwrap();
    for (k, b) in bufs.iter_mut().enumerate() {
        let sg = sg_of(b, 4);
        // 32 commands at depth 16: half wait in the backlog and are never started.
        let mut cmd = IoCommand::new(
            Opcode::Write,
            (k as u64 * (256 << 10)) / bs as u64,
            512,
            k as u64,
            sg,
        );
        cmd.fua = k % 2 == 0;
        q.submit(cmd);
    }
    q.kick();
    assert_eq!(q.in_flight(), 32);
    drop(q);
    // The buffers may go now; the first 16 (started) writes are on the image.
    drop(bufs);
    let mut q = dev.open_queue(4).unwrap();
    for k in 0..16u64 {
        let b = read(q.as_mut(), k * (256 << 10), 256 << 10, bs);
        assert!(
            b.iter().all(|&x| x == k as u8 + 1),
            "write {k} not on the image"
        );
    }
    drop(q);
    // The device holds the connection: dropping the test's handle first is fine.
    drop(cl);
    let weak = Arc::downgrade(&c);
    drop(c);
    assert!(
        weak.upgrade().is_some(),
        "the open image keeps the connection"
    );
    let mut q = dev.open_queue(4).unwrap();
    let mut d = vec![7u8; 4096];
    assert_eq!(write(q.as_mut(), 0, &mut d, bs), Status::SUCCESS);
    drop(q);
    drop(dev);
    assert!(
        weak.upgrade().is_none(),
        "the connection is shut down with the last image"
    );
    // The image itself (held open until now) is removed through a fresh connection.
    if let Some(c) = cluster() {
        c.remove_image(&img).unwrap();
    }
}

/// A cluster that is not there: connect fails within its mount timeout, with an error.
#[test]
fn connect_to_nothing_fails_in_bounded_time() {
    if let Err(e) = librbd_version() {
        // A host without Ceph: the clear error is the behaviour under test.
        assert_eq!(e.kind, ErrorKind::Unsupported);
        assert!(e.msg.contains("librbd not found"), "{e}");
        return;
    }
    if std::env::var_os("NVMUX_CEPH_CONF").is_none() {
        eprintln!("skipped: NVMUX_CEPH_CONF not set");
        return;
    }
    let dir = std::env::temp_dir().join(format!("nvmux-rbd-noconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("ceph.conf");
    std::fs::write(
        &conf,
        "[global]\nmon host = 127.0.0.1:1\nauth client required = none\n",
    )
    .unwrap();
    let t0 = Instant::now();
    let e = RbdCluster::connect(&RbdConfig {
        conf: Some(conf),
        ..RbdConfig::default()
    })
    .expect_err("nothing listens there");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "connect took {:?}",
        t0.elapsed()
    );
    assert!(e.msg.contains("connecting"), "{e}");
    let e = RbdCluster::connect(&RbdConfig {
        conf: Some(dir.join("missing.conf")),
        ..RbdConfig::default()
    })
    .expect_err("no such config");
    assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
