//! Worker threads with adaptive polling.
//!
//! A worker owns a set of [`WorkSource`]s (virtqueues, later NVMe/TCP queue pairs and NBD
//! connections) and loops over them. While work arrives it busy-polls: no system call,
//! no notification. After `poll_idle` without work it asks every source to re-enable its
//! notifications, then sleeps in `epoll_wait` on the sources' file descriptors (kick
//! eventfds, io_uring completion eventfds) and its own wake eventfd. An idle worker
//! therefore costs no CPU, and a loaded one costs no system call per request.
//!
//! A source stays on one worker for its whole life, so its state needs no lock.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Something a worker drives.
pub trait WorkSource: Send {
    /// Process whatever is ready. Returns how many events were handled; 0 means idle.
    fn poll(&mut self) -> usize;
    /// File descriptors whose readability means "poll me". Asked once, at attach. They
    /// must be non-blocking eventfd-like counters: the worker reads 8 bytes to reset them.
    fn wait_fds(&self) -> Vec<RawFd>;
    /// About to sleep: re-enable notifications. Return `false` if work is already
    /// pending, and the worker polls again instead of sleeping.
    fn prepare_sleep(&mut self) -> bool;
    /// Woken up (or the sleep was abandoned): notifications may be suppressed again.
    fn after_sleep(&mut self);
    /// The source is done (its queue was stopped) and may be dropped.
    fn finished(&self) -> bool;
    /// When the source must be polled again even if none of its fds fires.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }
    /// A socket to wait on as well (edge-triggered, readable or writable, never read by
    /// the worker). Asked once, at attach.
    fn socket_fd(&self) -> Option<RawFd> {
        None
    }
    /// True once after `wait_fds` changed (a queue opened later); the worker then asks
    /// for them again.
    fn take_fds_changed(&mut self) -> bool {
        false
    }
}

/// Worker tuning.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Number of worker threads.
    pub threads: usize,
    /// How long a worker keeps polling after the last piece of work before it sleeps.
    pub poll_idle: Duration,
    /// CPUs to pin workers to (worker i gets `cpus[i % len]`); empty for no pinning.
    pub cpus: Vec<usize>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            threads: 1,
            poll_idle: Duration::from_micros(50),
            cpus: Vec::new(),
        }
    }
}

/// Counters a worker publishes.
#[derive(Default, Debug)]
pub struct WorkerStats {
    /// Time spent in loop iterations that found work.
    pub busy_ns: AtomicU64,
    /// Time spent polling without finding work (before going to sleep).
    pub idle_poll_ns: AtomicU64,
    /// Number of times the worker went to sleep.
    pub sleeps: AtomicU64,
    /// Sources attached now.
    pub sources: AtomicU64,
}

struct Shared {
    wake: OwnedFd,
    incoming: Mutex<Vec<Box<dyn WorkSource>>>,
    pending: AtomicBool,
    stop: AtomicBool,
    stats: WorkerStats,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our own eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// A handle to one worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
    pub index: usize,
}

impl WorkerHandle {
    /// Hand a source to this worker. It is polled from the worker's next loop iteration.
    pub fn attach(&self, src: Box<dyn WorkSource>) {
        self.shared
            .incoming
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(src);
        self.shared.pending.store(true, Ordering::Release);
        self.shared.wake();
    }
    /// Wake the worker (for example after setting a stop flag a source checks).
    pub fn wake(&self) {
        self.shared.wake();
    }
    pub fn stats(&self) -> &WorkerStats {
        &self.shared.stats
    }
}

/// The daemon's worker threads.
pub struct WorkerPool {
    handles: Vec<WorkerHandle>,
    threads: Vec<JoinHandle<()>>,
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory-safety preconditions; we check the result.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl WorkerPool {
    pub fn new(cfg: &WorkerConfig) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..cfg.threads.max(1) {
            let shared = Arc::new(Shared {
                wake: eventfd()?,
                incoming: Mutex::new(Vec::new()),
                pending: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                stats: WorkerStats::default(),
            });
            let cpu = (!cfg.cpus.is_empty()).then(|| cfg.cpus[i % cfg.cpus.len()]);
            let poll_idle = cfg.poll_idle;
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("nvmux-w{i}"))
                .spawn(move || run(s, poll_idle, cpu))?;
            handles.push(WorkerHandle { shared, index: i });
            threads.push(t);
        }
        Ok(WorkerPool { handles, threads })
    }

    /// The worker for queue number `i` (queues are spread round-robin).
    pub fn worker(&self, i: usize) -> &WorkerHandle {
        &self.handles[i % self.handles.len()]
    }

    pub fn workers(&self) -> &[WorkerHandle] {
        &self.handles
    }

    /// Stop all workers and wait for them. Sources still attached are dropped.
    pub fn shutdown(&mut self) {
        for h in &self.handles {
            h.shared.stop.store(true, Ordering::Release);
            h.shared.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(
                cpu,
                "could not pin worker: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

const WAKE_TOKEN: u64 = u64::MAX;
/// Token bit of sockets: the worker must not read them.
const SOCKET_TOKEN: u64 = 1 << 32;

fn epoll_ctl(ep: RawFd, op: i32, fd: RawFd) {
    epoll_ctl_ev(ep, op, fd, libc::EPOLLIN as u32, fd as u64)
}

fn epoll_ctl_ev(ep: RawFd, op: i32, fd: RawFd, events: u32, token: u64) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ep is our epoll fd; ev is a valid epoll_event for the call's duration.
    let r = unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) };
    if r != 0 {
        tracing::warn!(
            fd,
            op,
            "epoll_ctl failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reading 8 bytes into a valid u64; the fd is non-blocking.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

struct Attached {
    src: Box<dyn WorkSource>,
    fds: Vec<RawFd>,
    socket: Option<RawFd>,
}

const SOCKET_EVENTS: u32 =
    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

fn run(sh: Arc<Shared>, poll_idle: Duration, cpu: Option<usize>) {
    if let Some(c) = cpu {
        pin_to(c);
    }
    // SAFETY: epoll_create1 has no preconditions; checked below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        tracing::error!(
            "worker: epoll_create1 failed: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: ep is a fresh descriptor we own.
    let ep_owned = unsafe { OwnedFd::from_raw_fd(ep) };
    let wake_fd = sh.wake.as_raw_fd();
    {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: WAKE_TOKEN,
        };
        // SAFETY: registering our own eventfd on our own epoll fd.
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, wake_fd, &mut ev) };
    }
    let mut sources: Vec<Attached> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    // Clock reads happen only when a poll finds nothing: a loaded worker reads the clock
    // once per busy period, not once per loop iteration.
    let mut busy_since: Option<Instant> = None;
    let mut idle_since: Option<Instant> = None;
    loop {
        if sh.pending.swap(false, Ordering::Acquire) {
            let new: Vec<_> =
                std::mem::take(&mut *sh.incoming.lock().unwrap_or_else(|e| e.into_inner()));
            for src in new {
                let fds = src.wait_fds();
                for &fd in &fds {
                    epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd);
                }
                let socket = src.socket_fd();
                if let Some(s) = socket {
                    let token = SOCKET_TOKEN | s as u32 as u64;
                    epoll_ctl_ev(ep, libc::EPOLL_CTL_ADD, s, SOCKET_EVENTS, token);
                }
                sources.push(Attached { src, fds, socket });
            }
            sh.stats
                .sources
                .store(sources.len() as u64, Ordering::Relaxed);
        }
        if sh.stop.load(Ordering::Acquire) {
            break;
        }
        let mut n = 0;
        for a in sources.iter_mut() {
            n += a.src.poll();
            if a.src.take_fds_changed() {
                for &fd in &a.fds {
                    epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd);
                }
                a.fds = a.src.wait_fds();
                for &fd in &a.fds {
                    epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd);
                }
            }
        }
        if sources.iter().any(|a| a.src.finished()) {
            sources.retain(|a| {
                if a.src.finished() {
                    for &fd in &a.fds {
                        epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd);
                    }
                    if let Some(s) = a.socket {
                        epoll_ctl(ep, libc::EPOLL_CTL_DEL, s);
                    }
                    false
                } else {
                    true
                }
            });
            sh.stats
                .sources
                .store(sources.len() as u64, Ordering::Relaxed);
        }
        if n > 0 {
            if busy_since.is_none() {
                let now = Instant::now();
                if let Some(i) = idle_since.take() {
                    // A short idle spell that ended in work: count it as polling.
                    sh.stats
                        .idle_poll_ns
                        .fetch_add(now.duration_since(i).as_nanos() as u64, Ordering::Relaxed);
                }
                busy_since = Some(now);
            }
            continue;
        }
        let now = Instant::now();
        if let Some(b) = busy_since.take() {
            sh.stats
                .busy_ns
                .fetch_add(now.duration_since(b).as_nanos() as u64, Ordering::Relaxed);
        }
        let since = *idle_since.get_or_insert(now);
        if now.duration_since(since) < poll_idle {
            std::hint::spin_loop();
            continue;
        }
        sh.stats.idle_poll_ns.fetch_add(
            now.duration_since(since).as_nanos() as u64,
            Ordering::Relaxed,
        );
        idle_since = None;
        // Go to sleep, unless a source has work after re-enabling notifications.
        let mut can_sleep = true;
        for a in sources.iter_mut() {
            can_sleep &= a.src.prepare_sleep();
        }
        if can_sleep && !sh.pending.load(Ordering::Acquire) {
            sh.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            // Sleep until an fd fires, or until the earliest deadline (milliseconds,
            // rounded up so the source is due when the worker wakes).
            let timeout = sources
                .iter()
                .filter_map(|a| a.src.next_deadline())
                .min()
                .map_or(-1, |d| {
                    let us = d.saturating_duration_since(Instant::now()).as_micros();
                    us.div_ceil(1000).min(i32::MAX as u128) as i32
                });
            // SAFETY: events is a valid buffer of events.len() entries.
            let r =
                unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout) };
            for ev in events.iter().take(r.max(0) as usize) {
                let tok = ev.u64;
                if tok != WAKE_TOKEN && tok & SOCKET_TOKEN != 0 {
                    continue; // the source reads its socket itself
                }
                drain(if tok == WAKE_TOKEN {
                    wake_fd
                } else {
                    tok as RawFd
                });
            }
        }
        for a in sources.iter_mut() {
            a.src.after_sleep();
        }
    }
    drop(sources);
    drop(ep_owned);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Work lives in shared state (as a virtqueue's does); the eventfd only wakes.
    struct Counter {
        fd: OwnedFd,
        sent: Arc<AtomicUsize>,
        seen: Arc<AtomicUsize>,
    }
    impl WorkSource for Counter {
        fn poll(&mut self) -> usize {
            let sent = self.sent.load(Ordering::SeqCst);
            let seen = self.seen.load(Ordering::SeqCst);
            self.seen.store(sent, Ordering::SeqCst);
            sent - seen
        }
        fn wait_fds(&self) -> Vec<RawFd> {
            vec![self.fd.as_raw_fd()]
        }
        fn prepare_sleep(&mut self) -> bool {
            self.sent.load(Ordering::SeqCst) == self.seen.load(Ordering::SeqCst)
        }
        fn after_sleep(&mut self) {}
        fn finished(&self) -> bool {
            self.seen.load(Ordering::SeqCst) >= 3
        }
    }

    #[test]
    fn sleeps_and_wakes() {
        let mut pool = WorkerPool::new(&WorkerConfig::default()).unwrap();
        let fd = eventfd().unwrap();
        let raw = fd.as_raw_fd();
        let seen = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        pool.worker(0).attach(Box::new(Counter {
            fd,
            sent: sent.clone(),
            seen: seen.clone(),
        }));
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            sent.fetch_add(1, Ordering::SeqCst);
            let one: u64 = 1;
            // SAFETY: the fd stays open until the source sees all 3 events.
            unsafe { libc::write(raw, (&one as *const u64).cast(), 8) };
        }
        let t0 = Instant::now();
        while seen.load(Ordering::SeqCst) < 3 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        assert!(pool.worker(0).stats().sleeps.load(Ordering::Relaxed) >= 2);
        pool.shutdown();
    }
}
