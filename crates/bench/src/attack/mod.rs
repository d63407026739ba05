//! Hostile peers, and a victim that shows what another tenant sees meanwhile.
//!
//! Every attack here does to a daemon what an attacker on one of its endpoints would do,
//! waits a bounded time, and reports what the daemon did; none asserts, so a suite
//! decides what it expects:
//!
//! * [`nvmf`]: a hostile NVMe/TCP host (length fields at their maximum, R2T before
//!   Connect, H2CData games, floods, slow handshakes);
//! * [`nbd`]: a hostile NBD client over a Unix socket or TCP (floods, slow handshakes,
//!   clients that stop mid-request or stop reading, 4 GiB requests);
//! * [`local`]: hostile local peers (a vhost-user front-end that shrinks its guest
//!   memory, an external function that resizes its ring).
//!
//! This module has what they share: the [`Victim`] (verified I/O from another tenant,
//! over vhost-user with libblkio or over NVMe/TCP), the process probes ([`rss_bytes`],
//! [`fd_count`]), and the socket helpers ([`time_to_close`], [`trickle`], [`half_open`],
//! floods). The users are the integration tests (`crates/nvmux/tests/hostile.rs`, the
//! attacker suite, and `nvmf_hostile.rs`, `nbd_hostile.rs`, `nbd_tls.rs`, ...) and
//! `nvmux bench --hostile`, which reports the victim's IOPS during each attack against
//! its IOPS at rest.
//!
//! Nothing here waits for ever: every socket has a timeout, every loop a deadline.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::ReqFlags;

use crate::client::{BlkioClient, Op, Req};
use crate::nvmf::{Host, HostOpts, Sqe};

pub mod local;
pub mod nbd;
pub mod nvmf;

pub type Res<T> = std::result::Result<T, String>;

// ---- the victim ------------------------------------------------------------------------

/// Another tenant doing steady, verified I/O from a thread of its own while attacks run:
/// every block it reads back is compared with what it wrote there, and every error is
/// counted. Attacks pass when the victim went on without one.
///
/// Two kinds: [`Victim::vhost`] (libblkio on a vhost-user disk, 4 KiB random writes and
/// reads at queue depth 8; an I/O error is counted and the victim goes on) and
/// [`Victim::nvmf`] (an NVMe/TCP host, 4 KiB in-capsule and 64 KiB R2T writes read back,
/// and Keep Alive on the admin queue; its first error stops it).
pub struct Victim {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A snapshot of a victim's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VictimCount {
    pub ops: u64,
    pub errors: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    ops: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, e: String) {
        self.errors.fetch_add(1, Ordering::AcqRel);
        let mut g = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert(e);
    }
    fn done(&self, n: u64) {
        self.ops.fetch_add(n, Ordering::AcqRel);
    }
}

/// One kind of victim I/O: a round of verified operations. Errors it can go on after are
/// reported with [`Shared::fail`]; an `Err` ends the victim.
trait Load {
    fn round(&mut self, sh: &Shared) -> Res<()>;
}

impl Victim {
    /// Libblkio on the vhost-user socket `socket`. Blocks until the first round
    /// completed (or fails with why it could not).
    pub fn vhost(socket: &Path) -> Res<Victim> {
        let sock = socket.to_path_buf();
        Victim::spawn("victim", move || VhostLoad::connect(&sock))
    }

    /// An NVMe/TCP host connected (with `opts`, which must ask for an I/O queue) to
    /// `subnqn` as `hostnqn`, working on LBAs `first..first + 768` (512-byte blocks) of
    /// namespace 1. Blocks until the first round completed.
    pub fn nvmf(
        addr: SocketAddr,
        subnqn: &str,
        hostnqn: &str,
        opts: HostOpts,
        first: u64,
    ) -> Res<Victim> {
        let (sub, host) = (subnqn.to_string(), hostnqn.to_string());
        Victim::spawn("nvmf-victim", move || {
            let h = Host::connect_with(addr, &sub, &host, &opts)?;
            if h.io.is_empty() {
                return Err("the NVMe/TCP victim got no I/O queue".into());
            }
            Ok(NvmfLoad { h, first, seed: 1 })
        })
    }

    fn spawn<L: Load>(
        name: &str,
        connect: impl FnOnce() -> Res<L> + Send + 'static,
    ) -> Res<Victim> {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::channel::<Res<()>>();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut ready = Some(tx);
                let mut load = match connect() {
                    Ok(l) => l,
                    Err(e) => {
                        sh.fail(e.clone());
                        let _ = ready.take().map(|r| r.send(Err(e)));
                        return;
                    }
                };
                while !sh.stop.load(Ordering::Acquire) {
                    if let Err(e) = load.round(&sh) {
                        sh.fail(e.clone());
                        let _ = ready.take().map(|r| r.send(Err(e)));
                        return;
                    }
                    let _ = ready.take().map(|r| r.send(Ok(())));
                }
            })
            .map_err(|e| format!("victim thread: {e}"))?;
        let v = Victim {
            shared,
            thread: Some(thread),
        };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(v),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the victim's first round did not complete in 30 s".into()),
        }
    }

    pub fn count(&self) -> VictimCount {
        VictimCount {
            ops: self.shared.ops.load(Ordering::Acquire),
            errors: self.shared.errors.load(Ordering::Acquire),
        }
    }

    /// The first error the victim saw, if any.
    pub fn first_error(&self) -> Option<String> {
        self.shared
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Operations completed per second over `d`, sampled now.
    pub fn iops_over(&self, d: Duration) -> f64 {
        let a = self.count().ops;
        let t0 = Instant::now();
        std::thread::sleep(d);
        let b = self.count().ops;
        (b - a) as f64 / t0.elapsed().as_secs_f64()
    }

    /// Wait until `n` more operations completed (the victim still makes progress);
    /// false if it stopped or `timeout` passed first.
    pub fn progresses(&self, n: u64, timeout: Duration) -> bool {
        let base = self.count().ops;
        let t0 = Instant::now();
        while self.count().ops < base + n {
            if t0.elapsed() > timeout || self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return self.count().ops >= base + n;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stop; the number of operations, or the first error if there was one.
    pub fn finish(mut self) -> Res<u64> {
        self.halt();
        let c = self.count();
        match self.first_error() {
            None => Ok(c.ops),
            Some(e) => Err(format!("{e} ({} errors)", c.errors)),
        }
    }

    /// Stop and return the final counts.
    pub fn stop(mut self) -> VictimCount {
        self.halt();
        self.count()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        self.halt();
    }
}

const VICTIM_QD: usize = 8;
const BLOCK: usize = 4096;

/// The contents of block `lba` after its `gen`-th write: the first 16 bytes name it.
fn victim_block(lba: u64, gen: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&lba.to_le_bytes());
    out[8..16].copy_from_slice(&gen.to_le_bytes());
    let mut x =
        lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ gen.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
    for b in out[16..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// The libblkio victim: QD distinct random blocks written, then read back and checked.
struct VhostLoad {
    c: BlkioClient,
    gens: Vec<u64>,
    rng: u64,
    expect: Vec<u8>,
    out: Vec<std::mem::MaybeUninit<blkio::Completion>>,
}

impl VhostLoad {
    fn connect(sock: &Path) -> Res<VhostLoad> {
        let mut c = BlkioClient::connect(sock, 1, false, 2 * VICTIM_QD * BLOCK)
            .map_err(|e| format!("victim: connect {}: {e}", sock.display()))?;
        c.timeout = Duration::from_secs(30);
        let blocks = (c.capacity() / BLOCK as u64).max(1);
        Ok(VhostLoad {
            c,
            gens: vec![0; blocks as usize],
            rng: 0x2545_f491_4f6c_dd1d,
            expect: vec![0; BLOCK],
            out: (0..VICTIM_QD)
                .map(|_| std::mem::MaybeUninit::uninit())
                .collect(),
        })
    }
}

impl Load for VhostLoad {
    fn round(&mut self, sh: &Shared) -> Res<()> {
        let blocks = self.gens.len() as u64;
        let mut lbas = Vec::with_capacity(VICTIM_QD);
        while lbas.len() < VICTIM_QD.min(blocks as usize) {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let l = self.rng % blocks;
            if !lbas.contains(&l) {
                lbas.push(l);
            }
        }
        for (i, &l) in lbas.iter().enumerate() {
            self.gens[l as usize] += 1;
            victim_block(
                l,
                self.gens[l as usize],
                &mut self.c.buf()[i * BLOCK..(i + 1) * BLOCK],
            );
        }
        for phase in [Op::Write, Op::Read] {
            for (i, &l) in lbas.iter().enumerate() {
                let buf_off = match phase {
                    Op::Write => i * BLOCK,
                    _ => (VICTIM_QD + i) * BLOCK,
                };
                let r = Req {
                    op: phase,
                    offset: l * BLOCK as u64,
                    len: BLOCK,
                    buf_off,
                };
                self.c.enqueue(0, r, i, ReqFlags::empty());
            }
            let mut got = 0;
            while got < lbas.len() {
                let want = lbas.len() - got;
                // libblkio cannot recover a queue it lost track of: an error here ends it.
                let n = self
                    .c
                    .reap(0, &mut self.out[..want], want, Duration::from_secs(30))
                    .map_err(|e| format!("victim {phase:?}: {e}"))?;
                for o in self.out.iter().take(n) {
                    // SAFETY: reap initialised the first n completions.
                    let r = unsafe { o.assume_init_read() };
                    if r.ret != 0 {
                        sh.fail(format!(
                            "{phase:?} failed: {}",
                            std::io::Error::from_raw_os_error(-r.ret)
                        ));
                    } else {
                        sh.done(1);
                    }
                }
                got += n;
            }
        }
        for (i, &l) in lbas.iter().enumerate() {
            victim_block(l, self.gens[l as usize], &mut self.expect);
            let o = (VICTIM_QD + i) * BLOCK;
            if self.c.buf()[o..o + BLOCK] != self.expect[..] {
                sh.fail(format!(
                    "block {l}: read back differs from what was written"
                ));
            }
        }
        Ok(())
    }
}

/// The NVMe/TCP victim: a 4 KiB in-capsule write and a 64 KiB R2T write, each read back
/// and compared, then a Keep Alive.
struct NvmfLoad {
    h: Host,
    first: u64,
    seed: u64,
}

impl Load for NvmfLoad {
    fn round(&mut self, sh: &Shared) -> Res<()> {
        for (nlb, off) in [(8u32, 0u64), (128, 512)] {
            self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let seed = self.seed;
            let lba = self.first + off + (seed >> 33) % 256;
            let data: Vec<u8> = (0..nlb as usize * 512)
                .map(|i| (seed as usize).wrapping_add(i * 7) as u8)
                .collect();
            let q = &mut self.h.io[0];
            let (c, _) = q.cmd(Sqe::write(1, lba, nlb), Some(&data), 0)?;
            if !c.ok() {
                return Err(format!("victim write at LBA {lba}: status {:#x}", c.status));
            }
            let (c, back) = q.cmd(Sqe::read(1, lba, nlb), None, data.len())?;
            if !c.ok() {
                return Err(format!("victim read at LBA {lba}: status {:#x}", c.status));
            }
            if back != data {
                return Err(format!("victim read at LBA {lba}: wrong data"));
            }
            sh.done(2);
        }
        // Keep-alive traffic on the admin queue too.
        let (c, _) = self.h.admin.cmd(Sqe::new(0x18, 0), None, 0)?;
        if !c.ok() {
            return Err(format!("victim keep alive: status {:#x}", c.status));
        }
        Ok(())
    }
}

// ---- process probes ----------------------------------------------------------------------

/// Resident memory of a process, in bytes (VmRSS, from /proc).
pub fn rss_bytes(pid: u32) -> Res<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS"))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Res<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}

/// Raise this process's open-file limit to its hard limit (floods hold many sockets).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write a plain struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

// ---- sockets -----------------------------------------------------------------------------

/// A connection to the daemon (TCP, Unix, or [`nbd::Stream`]): bytes both ways and a
/// read timeout the helpers here set for their deadlines.
pub trait Conn: Read + Write {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}

/// A shared TCP stream (as [`crate::nvmf::Queue::stream`] gives it).
impl Conn for &TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}

impl Conn for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
}

/// How long the daemon keeps `s` open while the client sends nothing: the time to the
/// end of stream (or a reset), or `None` if it was still open after `max`. What the
/// daemon sends meanwhile is read and dropped. Leaves a read timeout set on `s`.
pub fn time_to_close<S: Conn + ?Sized>(s: &mut S, max: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut b = vec![0u8; 64 << 10];
    loop {
        let left = max.checked_sub(t0.elapsed())?;
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
}

/// Slowloris: send `bytes` one at a time, one every `every`, watching for the close in
/// between, then wait. Returns how long after `since` (the connect) the daemon ended the
/// connection, or `None` if it was still open `give_up` after `since`.
pub fn trickle<S: Conn + ?Sized>(
    s: &mut S,
    since: Instant,
    bytes: &[u8],
    every: Duration,
    give_up: Duration,
) -> Option<Duration> {
    for b in bytes {
        let left = give_up.checked_sub(since.elapsed())?;
        if s.write_all(std::slice::from_ref(b)).is_err() {
            return Some(since.elapsed());
        }
        if time_to_close(s, every.min(left)).is_some() {
            return Some(since.elapsed());
        }
    }
    let left = give_up.checked_sub(since.elapsed())?;
    time_to_close(s, left).map(|_| since.elapsed())
}

/// `n` half-open TCP connections: connected, then silence. Returns how many the daemon
/// had closed by `within` (it should close them all at its handshake timeout).
pub fn half_open(addr: SocketAddr, n: usize, within: Duration) -> Res<usize> {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        open.push(
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("connect {addr}: {e}"))?,
        );
    }
    let t0 = Instant::now();
    let mut closed = 0;
    while t0.elapsed() < within && !open.is_empty() {
        open.retain_mut(|s| time_to_close(s, Duration::from_millis(1)).is_none());
        closed = n - open.len();
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(closed)
}

/// What a connection flood got.
pub struct Flood<S> {
    /// The connections the daemon admitted (they got its first answer); still open.
    pub held: Vec<S>,
    /// Connections the daemon closed at once, or never answered.
    pub refused: usize,
    /// Connections that could not even be opened (connect failed).
    pub failed: usize,
}

/// Open `n` connections one after the other; keep those `admitted` says the daemon took.
fn flood<S>(
    n: usize,
    mut connect: impl FnMut() -> Res<S>,
    mut admitted: impl FnMut(&mut S) -> bool,
) -> Flood<S> {
    let mut f = Flood {
        held: Vec::new(),
        refused: 0,
        failed: 0,
    };
    for _ in 0..n {
        match connect() {
            Ok(mut s) => {
                if admitted(&mut s) {
                    f.held.push(s);
                } else {
                    f.refused += 1;
                }
            }
            Err(_) => f.failed += 1,
        }
    }
    f
}
