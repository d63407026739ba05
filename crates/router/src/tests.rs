//! Router unit tests over real memory devices (one for the chain, one for the fast path,
//! so where data lands shows which path a command took), and an external function served
//! in-process by the SDK over a real socket and ring.

use super::*;
use nvmux_backend::MemoryDevice;
use nvmux_core::SgList;
use std::time::{Duration, Instant};

fn asm(src: &str) -> Vec<[u8; 8]> {
    let b = rbpf::assembler::assemble(src).expect("assemble");
    b.chunks_exact(8).map(|c| c.try_into().unwrap()).collect()
}

fn prog(src: &str) -> Arc<Program> {
    Arc::new(Program::from_insns(asm(src), Vec::new(), "test".into()).expect("load"))
}

struct Rig {
    router: Arc<Router>,
    chain: Arc<MemoryDevice>,
    fast: Arc<MemoryDevice>,
    q: Box<dyn BlockQueue>,
}

fn rig() -> Rig {
    let chain = Arc::new(MemoryDevice::new(1 << 20, 512, false).unwrap());
    let fast = Arc::new(MemoryDevice::new(1 << 20, 512, false).unwrap());
    let router = Router::new("t");
    let dev = RouterDevice::new(router.clone(), chain.clone(), Some(fast.clone()));
    let q = dev.open_queue(16).unwrap();
    Rig {
        router,
        chain,
        fast,
        q,
    }
}

fn io(q: &mut dyn BlockQueue, op: Opcode, slba: u64, buf: &mut [u8], tag: u64) -> (u64, Status) {
    let mut sg = SgList::default();
    sg.push(buf.as_mut_ptr(), buf.len());
    q.submit(IoCommand::new(op, slba, (buf.len() / 512) as u32, tag, sg));
    q.kick();
    wait(q, 1).pop().expect("one completion")
}

fn wait(q: &mut dyn BlockQueue, n: usize) -> Vec<(u64, Status)> {
    let mut out = Vec::new();
    let t0 = Instant::now();
    while out.len() < n {
        assert!(t0.elapsed() < Duration::from_secs(20), "no completion");
        q.poll(&mut |c, s| out.push((c.tag, s)));
        if out.len() < n {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    out
}

fn read_dev(d: &dyn BlockDevice, slba: u64) -> Vec<u8> {
    let mut q = d.open_queue(4).unwrap();
    let mut b = vec![0u8; 512];
    io(&mut *q, Opcode::Read, slba, &mut b, 1);
    b
}

#[test]
fn no_program_goes_through_the_chain() {
    let mut r = rig();
    let mut w = vec![7u8; 512];
    assert_eq!(
        io(&mut *r.q, Opcode::Write, 3, &mut w, 42),
        (42, Status::SUCCESS)
    );
    assert_eq!(read_dev(&*r.chain, 3), w);
    assert_eq!(read_dev(&*r.fast, 3), vec![0u8; 512]);
    assert_eq!(r.router.totals(), RouteTotals::default());
}

#[test]
fn routes_rewrites_and_statuses() {
    let mut r = rig();
    // Reads take the fast path, writes the chain.
    r.router.set_program(Some(prog(
        "ldxb r2, [r1+8]
         mov r0, 0
         jne r2, 2, +1
         mov r0, 1
         exit",
    )));
    let mut w = vec![9u8; 512];
    io(&mut *r.q, Opcode::Write, 5, &mut w, 1);
    assert_eq!(read_dev(&*r.chain, 5), w);
    let mut b = vec![0u8; 512];
    io(&mut *r.q, Opcode::Read, 5, &mut b, 2);
    assert_eq!(b, vec![0u8; 512], "the read went to the fast device");
    let t = r.router.totals();
    assert_eq!(t.routed[Route::Chain as usize], 1);
    assert_eq!(t.routed[Route::Fast as usize], 1);

    // Remap: slba += 100; a rewrite past the end is refused, never issued.
    r.router.set_program(Some(prog(
        "ldxdw r2, [r1+16]
         add r2, 100
         stxdw [r1+16], r2
         mov r0, 0
         exit",
    )));
    let mut w = vec![3u8; 512];
    assert_eq!(
        io(&mut *r.q, Opcode::Write, 1, &mut w, 3),
        (3, Status::SUCCESS)
    );
    assert_eq!(read_dev(&*r.chain, 101), w);
    assert_eq!(read_dev(&*r.chain, 1), vec![0u8; 512]);
    let last = (1 << 20) / 512 - 1;
    assert_eq!(
        io(&mut *r.q, Opcode::Write, last, &mut w, 4),
        (4, Status::LBA_OUT_OF_RANGE)
    );

    // Complete now with a status the program chose (write protected: sct 1, sc 0x82).
    r.router.set_program(Some(prog(
        "mov r2, 0x182
         stxh [r1+28], r2
         mov r0, 3
         exit",
    )));
    assert_eq!(
        io(&mut *r.q, Opcode::Write, 1, &mut w, 5),
        (5, Status::WRITE_PROTECTED)
    );
    // A bad verdict is an internal error.
    r.router.set_program(Some(prog("mov r0, 9\nexit")));
    assert_eq!(
        io(&mut *r.q, Opcode::Read, 1, &mut w, 6),
        (6, Status::INTERNAL_ERROR)
    );
    assert!(r.router.totals().errors >= 1);
    r.router.set_program(None);
    assert_eq!(
        io(&mut *r.q, Opcode::Read, 1, &mut w, 7),
        (7, Status::SUCCESS)
    );
}

#[test]
fn completion_hook_retries_and_keeps_its_program_across_a_swap() {
    let mut r = rig();
    // Submit: chain with hook. At completion: the first time, retry on the fast path
    // (with hook); the second time, complete with the status it got.
    r.router.set_program(Some(prog(
        "ldxw r2, [r1+4]
         jne r2, 0, +2
         mov r0, 0x100
         exit
         ldxb r3, [r1+11]
         jgt r3, 1, +2
         mov r0, 0x101
         exit
         mov r0, 3
         exit",
    )));
    let mut w = vec![5u8; 512];
    let mut sg = SgList::default();
    sg.push(w.as_mut_ptr(), 512);
    r.q.submit(IoCommand::new(Opcode::Write, 9, 1, 77, sg));
    r.q.kick();
    // Swap while the command is in flight: the old program's hook still decides.
    r.router.set_program(Some(prog("mov r0, 0\nexit")));
    let done = wait(&mut *r.q, 1);
    assert_eq!(done, vec![(77, Status::SUCCESS)]);
    assert_eq!(read_dev(&*r.chain, 9), w);
    assert_eq!(
        read_dev(&*r.fast, 9),
        w,
        "the hook retried it on the fast path"
    );
    let t = r.router.totals();
    assert_eq!(t.hooks, 2);

    // A program that always asks for another hop stops at MAX_HOPS.
    r.router.set_program(Some(prog("mov r0, 0x100\nexit")));
    assert_eq!(
        io(&mut *r.q, Opcode::Read, 1, &mut w, 8),
        (8, Status::INTERNAL_ERROR)
    );
}

/// (opcode, slba, nlb, first data byte) of each command the function saw.
type Seen = Arc<Mutex<Vec<(u8, u64, u32, u8)>>>;

/// Logs writes and answers reads with a fixed byte, in-process through the SDK.
struct Recorder {
    log: Seen,
}

impl nvmux_extfn::Function for Recorder {
    fn handle(&mut self, req: nvmux_extfn::Request<'_>) -> nvmux_extfn::Reply {
        let first = req.data.first().copied().unwrap_or(0);
        self.log
            .lock()
            .unwrap()
            .push((req.opcode, req.slba, req.nlb, first));
        if req.opcode == nvmux_extfn::OP_READ {
            req.data.fill(0xee);
        }
        nvmux_extfn::Reply::ok(req.cookie + 1)
    }
}

#[test]
fn external_function_round_trip_and_detach() {
    let dir = std::env::temp_dir().join(format!("nvmux-router-ext-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let sock = dir.join("fn.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut r = rig();
    let cfg = ExternalConfig {
        socket: sock.clone(),
        on_failure: OnFailure::Chain,
        depth: 8,
        max_io: 65536,
    };
    let ext = External::start(cfg, listener, "t", 512, 2048).unwrap();
    r.router.set_external(Some(ext.clone()));
    // Everything to the function first; back from it (cookie = 1) writes go to the chain.
    r.router.set_program(Some(prog(
        "ldxw r2, [r1+4]
         jne r2, 0, +2
         mov r0, 0x102
         exit
         ldxb r3, [r1+8]
         jne r3, 1, +2
         mov r0, 0
         exit
         mov r0, 3
         exit",
    )));
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    let s2 = sock.clone();
    let t =
        std::thread::spawn(move || nvmux_extfn::serve(&s2, "recorder", &mut Recorder { log: l2 }));
    let t0 = Instant::now();
    while !ext.status().attached {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "function did not attach"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut w = vec![0x42u8; 1024];
    assert_eq!(
        io(&mut *r.q, Opcode::Write, 10, &mut w, 1),
        (1, Status::SUCCESS)
    );
    assert_eq!(read_dev(&*r.chain, 10), vec![0x42u8; 512]);
    let mut b = vec![0u8; 512];
    assert_eq!(
        io(&mut *r.q, Opcode::Read, 10, &mut b, 2),
        (2, Status::SUCCESS)
    );
    assert_eq!(
        b,
        vec![0xeeu8; 512],
        "the read was answered by the function"
    );
    let seen: Vec<(u8, u64, u32)> = log
        .lock()
        .unwrap()
        .iter()
        .map(|e| (e.0, e.1, e.2))
        .collect();
    assert_eq!(seen, vec![(1, 10, 2), (2, 10, 1)]);
    assert_eq!(
        log.lock().unwrap()[0].3,
        0x42,
        "the function saw the write's data"
    );
    // Many at once: more than the ring's depth wait for free entries.
    let mut bufs: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; 512]).collect();
    for (i, buf) in bufs.iter_mut().enumerate() {
        let mut sg = SgList::default();
        sg.push(buf.as_mut_ptr(), 512);
        r.q.submit(IoCommand::new(
            Opcode::Write,
            100 + i as u64,
            1,
            10 + i as u64,
            sg,
        ));
    }
    r.q.kick();
    let mut done = wait(&mut *r.q, 20);
    done.sort_by_key(|d| d.0);
    assert_eq!(
        done,
        (0..20)
            .map(|i| (10 + i, Status::SUCCESS))
            .collect::<Vec<_>>()
    );
    assert_eq!(read_dev(&*r.chain, 119), vec![19u8; 512]);

    // Stopping the function's endpoint detaches it: writes now fall back to the chain.
    ext.stop();
    let _ = t.join();
    assert!(!ext.status().attached);
    let mut w = vec![0x77u8; 512];
    assert_eq!(
        io(&mut *r.q, Opcode::Write, 11, &mut w, 3),
        (3, Status::SUCCESS)
    );
    assert_eq!(read_dev(&*r.chain, 11), w);
    assert!(r.router.totals().fallbacks >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device over a memory device whose FLUSH fails (Write Fault) and is counted: shows
/// whether a FLUSH reached the device and whether its failure reached the frontend.
struct FailingFlush {
    inner: Arc<MemoryDevice>,
    flushes: Arc<AtomicU64>,
}

struct FailingFlushQueue {
    inner: Box<dyn BlockQueue>,
    flushes: Arc<AtomicU64>,
    failed: Vec<IoCommand>,
}

impl BlockDevice for FailingFlush {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        Ok(Box::new(FailingFlushQueue {
            inner: self.inner.open_queue(depth)?,
            flushes: self.flushes.clone(),
            failed: Vec::new(),
        }))
    }
    fn describe(&self) -> String {
        "failing-flush".into()
    }
}

impl BlockQueue for FailingFlushQueue {
    fn submit(&mut self, cmd: IoCommand) {
        if cmd.opcode == Opcode::Flush {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            self.failed.push(cmd);
        } else {
            self.inner.submit(cmd);
        }
    }
    fn kick(&mut self) {
        self.inner.kick();
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let n = self.failed.len();
        for c in self.failed.drain(..) {
            done(c, Status::WRITE_FAULT);
        }
        n + self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.failed.len() + self.inner.in_flight()
    }
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
}

#[test]
fn flush_reaches_the_device_unless_the_disk_allows_completing_it() {
    let flushes = Arc::new(AtomicU64::new(0));
    let dev = Arc::new(FailingFlush {
        inner: Arc::new(MemoryDevice::new(1 << 20, 512, false).unwrap()),
        flushes: flushes.clone(),
    });
    let router = Router::new("f");
    let mut q = RouterDevice::new(router.clone(), dev, None)
        .open_queue(16)
        .unwrap();
    let mut none: [u8; 0] = [];
    let mut flush =
        |q: &mut Box<dyn BlockQueue>, tag| io(&mut **q, Opcode::Flush, 0, &mut none, tag);

    // Completes every FLUSH with success at submission; everything else takes the chain.
    let complete_flush = prog(
        "ldxb r2, [r1+8]
         mov r0, 0
         jne r2, 0, +3
         mov r3, 0
         stxh [r1+28], r3
         mov r0, 3
         exit",
    );
    router.set_program(Some(complete_flush.clone()));
    assert_eq!(
        flush(&mut q, 1),
        (1, Status::WRITE_FAULT),
        "the device's answer"
    );
    assert_eq!(
        flushes.load(Ordering::Relaxed),
        1,
        "the FLUSH reached the device"
    );
    assert_eq!(router.totals().flushes_forced, 1);
    let mut w = vec![5u8; 512];
    assert_eq!(
        io(&mut *q, Opcode::Write, 2, &mut w, 2),
        (2, Status::SUCCESS)
    );

    // Through the chain with a hook that turns every status into success: the device's
    // failure stands.
    router.set_program(Some(prog(
        "ldxw r2, [r1+4]
         mov r0, 0x100
         jeq r2, 0, +3
         mov r3, 0
         stxh [r1+28], r3
         mov r0, 3
         exit",
    )));
    assert_eq!(flush(&mut q, 3), (3, Status::WRITE_FAULT));
    assert_eq!(flushes.load(Ordering::Relaxed), 2);
    assert_eq!(
        router.totals().flushes_forced,
        1,
        "it went to the device itself"
    );

    // The operator's opt-in: the program's word is final, the device sees nothing more.
    router.set_allow_flush_complete(true);
    assert_eq!(flush(&mut q, 4), (4, Status::SUCCESS));
    router.set_program(Some(complete_flush));
    assert_eq!(flush(&mut q, 5), (5, Status::SUCCESS));
    assert_eq!(
        flushes.load(Ordering::Relaxed),
        3,
        "only the hooked one reached it"
    );
    assert_eq!(router.totals().flushes_forced, 1);
    router.set_allow_flush_complete(false);
    assert_eq!(flush(&mut q, 6), (6, Status::WRITE_FAULT));
    assert_eq!(flushes.load(Ordering::Relaxed), 4);
}
