//! Worker threads with adaptive polling.
//!
//! A worker owns a set of [`WorkSource`]s (virtqueues, later NVMe/TCP queue pairs and NBD
//! connections) and loops over them. While work arrives it busy-polls: no system call,
//! no notification. After `poll_idle` without work it asks every source to re-enable its
//! notifications, then sleeps in `epoll_wait` on the sources' file descriptors (kick
//! eventfds, io_uring completion eventfds) and its own wake eventfd. An idle worker
//! therefore costs no CPU, and a loaded one costs no system call per request. The
//! spell is skipped when no source's backend gains from it ([`WorkSource::busy_poll`]:
//! an RBD disk's completions are an OSD round trip away and come from librbd's threads,
//! which need the CPU the spell would burn).
//!
//! A source stays on one worker for its whole life, so its state needs no lock.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::eventfd::{drain_fd, EventFd};

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
    /// The socket of [`WorkSource::socket_fd`] became readable or writable (an edge).
    /// A source with a socket reads it only after such an edge, or while its last read
    /// filled its buffer: an idle connection costs no system call per loop.
    fn socket_ready(&mut self, _ready: Readiness) {}
    /// Whether the worker should keep polling after this source's last piece of work
    /// (see [`BlockQueue::busy_poll`](crate::BlockQueue::busy_poll)). Asked when a busy
    /// period ends; the worker skips its idle spell when no source wants it.
    fn busy_poll(&self) -> bool {
        true
    }
    /// What the source serves, for log lines ("nbd connection 127.0.0.1:40000 to vm1").
    fn describe(&self) -> String {
        "work source".into()
    }
}

/// What epoll reported for a source's socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    pub readable: bool,
    pub writable: bool,
    /// The peer closed (or the socket failed): reads will end in 0 or an error, and no
    /// further edge announces that, so the source reads until it sees it.
    pub hup: bool,
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
    /// Sources that panicked (each was dropped; the worker went on with the others).
    pub panics: AtomicU64,
    /// Heap allocations this worker thread has made (0 unless the process counts them:
    /// see [`crate::alloc_count`]). Serving I/O must not move it.
    pub allocs: AtomicU64,
}

struct Shared {
    wake: EventFd,
    incoming: Mutex<Vec<Box<dyn WorkSource>>>,
    pending: AtomicBool,
    stop: AtomicBool,
    stats: WorkerStats,
}

impl Shared {
    fn wake(&self) {
        self.wake.signal();
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
    /// Whose turn it is: shared by every [`crate::engine::Placement`] of this pool, so
    /// the queues of every frontend take turns on the same workers.
    pub(crate) turn: Arc<std::sync::atomic::AtomicUsize>,
}

impl WorkerPool {
    pub fn new(cfg: &WorkerConfig) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..cfg.threads.max(1) {
            let shared = Arc::new(Shared {
                wake: EventFd::new()?,
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
        Ok(WorkerPool {
            handles,
            threads,
            turn: Arc::default(),
        })
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

/// An idle-polling worker reads the clock on one empty pass in this many.
const IDLE_CLOCK_EVERY: u32 = 8;

const WAKE_TOKEN: u64 = u64::MAX;
/// Token of the socket epoll set inside the main one.
const SOCKETS_TOKEN: u64 = u64::MAX - 1;

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

fn epoll_create() -> Option<OwnedFd> {
    // SAFETY: epoll_create1 has no preconditions; checked below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        tracing::error!(
            "worker: epoll_create1 failed: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: ep is a fresh descriptor we own.
    Some(unsafe { OwnedFd::from_raw_fd(ep) })
}

struct Attached {
    src: Box<dyn WorkSource>,
    fds: Vec<RawFd>,
    socket: Option<RawFd>,
    /// The source panicked: it is dropped at the end of this pass.
    poisoned: bool,
}

const SOCKET_EVENTS: u32 =
    (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;

/// The text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// Run `f` on a source; a panic poisons that source only (it is logged, counted, and the
/// source is dropped), never the worker and its other sources.
fn guarded<R: Default>(
    a: &mut Attached,
    stats: &WorkerStats,
    what: &str,
    f: impl FnOnce(&mut dyn WorkSource) -> R,
) -> R {
    if a.poisoned {
        return R::default();
    }
    let src = &mut *a.src;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(src))) {
        Ok(r) => r,
        Err(p) => {
            a.poisoned = true;
            stats.panics.fetch_add(1, Ordering::Relaxed);
            let desc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.src.describe()))
                .unwrap_or_else(|_| "work source".into());
            tracing::error!(
                "panic in {what} of {desc}: {}; it is closed, the worker goes on",
                panic_text(&*p)
            );
            R::default()
        }
    }
}

/// Drop a source, containing a panic in its destructor.
fn drop_source(a: Attached) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(a))).is_err() {
        tracing::error!("panic while dropping a work source");
    }
}

fn run(sh: Arc<Shared>, poll_idle: Duration, cpu: Option<usize>) {
    if let Some(c) = cpu {
        pin_to(c);
    }
    crate::alloc_count::trace_this_thread();
    let (Some(ep_owned), Some(sock_ep_owned)) = (epoll_create(), epoll_create()) else {
        return;
    };
    let ep = ep_owned.as_raw_fd();
    // Sockets sit in their own (edge-triggered) epoll set, itself in the main set: a busy
    // worker asks it for edges with one non-blocking epoll_wait per pass, and a sleeping
    // worker wakes when it has some.
    let sock_ep = sock_ep_owned.as_raw_fd();
    epoll_ctl_ev(
        ep,
        libc::EPOLL_CTL_ADD,
        sock_ep,
        libc::EPOLLIN as u32,
        SOCKETS_TOKEN,
    );
    let wake_fd = sh.wake.as_raw_fd();
    epoll_ctl_ev(
        ep,
        libc::EPOLL_CTL_ADD,
        wake_fd,
        libc::EPOLLIN as u32,
        WAKE_TOKEN,
    );
    let mut sources: Vec<Attached> = Vec::new();
    // Socket fd -> index in `sources`, rebuilt when the list changes.
    let mut by_socket: std::collections::HashMap<RawFd, usize> = Default::default();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut sock_events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    // Clock reads happen only when a poll finds nothing: a loaded worker reads the clock
    // once per busy period, not once per loop iteration.
    let mut busy_since: Option<Instant> = None;
    let mut idle_since: Option<Instant> = None;
    let mut empty_passes: u32 = 0;
    // Whether this idle spell polls (asked of the sources when it starts).
    let mut spin = true;
    loop {
        sh.stats
            .allocs
            .store(crate::alloc_count::thread_allocs(), Ordering::Relaxed);
        let mut changed = false;
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
                    epoll_ctl_ev(sock_ep, libc::EPOLL_CTL_ADD, s, SOCKET_EVENTS, s as u64);
                }
                sources.push(Attached {
                    src,
                    fds,
                    socket,
                    poisoned: false,
                });
            }
            changed = true;
        }
        if sh.stop.load(Ordering::Acquire) {
            break;
        }
        if changed {
            by_socket = sources
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.socket.map(|s| (s, i)))
                .collect();
        }
        let mut n = 0;
        if !by_socket.is_empty() {
            // SAFETY: sock_events is a valid buffer of sock_events.len() entries.
            let r = unsafe {
                libc::epoll_wait(
                    sock_ep,
                    sock_events.as_mut_ptr(),
                    sock_events.len() as i32,
                    0,
                )
            };
            for ev in sock_events.iter().take(r.max(0) as usize) {
                let fd = ev.u64 as RawFd;
                let Some(&i) = by_socket.get(&fd) else {
                    continue;
                };
                let e = ev.events;
                let hup = (libc::EPOLLHUP | libc::EPOLLERR | libc::EPOLLRDHUP) as u32;
                let ready = Readiness {
                    readable: e & (libc::EPOLLIN as u32 | hup) != 0,
                    writable: e & (libc::EPOLLOUT as u32 | hup) != 0,
                    hup: e & hup != 0,
                };
                guarded(&mut sources[i], &sh.stats, "socket_ready", |s| {
                    s.socket_ready(ready)
                });
                n += 1;
            }
        }
        for a in sources.iter_mut() {
            n += guarded(a, &sh.stats, "poll", |s| s.poll());
            if guarded(a, &sh.stats, "take_fds_changed", |s| s.take_fds_changed()) {
                for &fd in &a.fds {
                    epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd);
                }
                a.fds = guarded(a, &sh.stats, "wait_fds", |s| s.wait_fds());
                for &fd in &a.fds {
                    epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd);
                }
            }
        }
        if sources.iter().any(|a| a.poisoned || guarded_finished(a)) {
            let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut sources)
                .into_iter()
                .partition(|a| a.poisoned || guarded_finished(a));
            sources = keep;
            for a in gone {
                for &fd in &a.fds {
                    epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd);
                }
                if let Some(s) = a.socket {
                    epoll_ctl(sock_ep, libc::EPOLL_CTL_DEL, s);
                }
                drop_source(a);
            }
            changed = true;
            n += 1;
        }
        if changed {
            by_socket = sources
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.socket.map(|s| (s, i)))
                .collect();
            sh.stats
                .sources
                .store(sources.len() as u64, Ordering::Relaxed);
        }
        if n > 0 {
            empty_passes = 0;
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
        // While idle-polling, read the clock on every IDLE_CLOCK_EVERY-th empty pass only
        // (the first one ends the busy period): a pass over a few queues takes tens of
        // nanoseconds, about what a clock read costs.
        empty_passes = empty_passes.wrapping_add(1);
        if busy_since.is_none() && empty_passes % IDLE_CLOCK_EVERY != 1 {
            std::hint::spin_loop();
            continue;
        }
        let now = Instant::now();
        if let Some(b) = busy_since.take() {
            sh.stats
                .busy_ns
                .fetch_add(now.duration_since(b).as_nanos() as u64, Ordering::Relaxed);
        }
        let since = match idle_since {
            Some(s) => s,
            None => {
                // A busy period ended: spin only if some source's backend pays for it.
                spin = sources
                    .iter_mut()
                    .any(|a| guarded(a, &sh.stats, "busy_poll", |s| s.busy_poll()));
                *idle_since.insert(now)
            }
        };
        if spin && now.duration_since(since) < poll_idle {
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
            can_sleep &= guarded(a, &sh.stats, "prepare_sleep", |s| s.prepare_sleep());
        }
        if can_sleep && !sh.pending.load(Ordering::Acquire) && !sources.iter().any(|a| a.poisoned) {
            sh.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            // Sleep until an fd fires, or until the earliest deadline (milliseconds,
            // rounded up so the source is due when the worker wakes).
            let timeout = sources
                .iter_mut()
                .filter_map(|a| guarded(a, &sh.stats, "next_deadline", |s| s.next_deadline()))
                .min()
                .map_or(-1, |d| {
                    let us = d.saturating_duration_since(Instant::now()).as_micros();
                    us.div_ceil(1000).min(i32::MAX as u128) as i32
                });
            sh.stats
                .allocs
                .store(crate::alloc_count::thread_allocs(), Ordering::Relaxed);
            // SAFETY: events is a valid buffer of events.len() entries.
            let r =
                unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout) };
            for ev in events.iter().take(r.max(0) as usize) {
                match ev.u64 {
                    // Socket edges are collected at the top of the next pass.
                    SOCKETS_TOKEN => {}
                    WAKE_TOKEN => {
                        sh.wake.drain();
                    }
                    fd => {
                        drain_fd(fd as RawFd);
                    }
                }
            }
        }
        for a in sources.iter_mut() {
            guarded(a, &sh.stats, "after_sleep", |s| s.after_sleep());
        }
    }
    for a in sources {
        drop_source(a);
    }
    drop(sock_ep_owned);
    drop(ep_owned);
}

/// `finished`, with a panic counting as finished.
fn guarded_finished(a: &Attached) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.src.finished())).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventfd::signal_fd;
    use std::sync::atomic::AtomicUsize;

    /// Work lives in shared state (as a virtqueue's does); the eventfd only wakes.
    struct Counter {
        fd: OwnedFd,
        sent: Arc<AtomicUsize>,
        seen: Arc<AtomicUsize>,
        busy_poll: bool,
    }
    impl WorkSource for Counter {
        fn busy_poll(&self) -> bool {
            self.busy_poll
        }
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

    /// A [`Counter`] on worker 0: its eventfd, and its `sent` and `seen` counts.
    fn attach_counter(
        pool: &WorkerPool,
        busy_poll: bool,
    ) -> (RawFd, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let fd: OwnedFd = EventFd::new().unwrap().into();
        let raw = fd.as_raw_fd();
        let seen = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicUsize::new(0));
        pool.worker(0).attach(Box::new(Counter {
            fd,
            sent: sent.clone(),
            seen: seen.clone(),
            busy_poll,
        }));
        (raw, sent, seen)
    }

    #[test]
    fn sleeps_and_wakes() {
        let mut pool = WorkerPool::new(&WorkerConfig::default()).unwrap();
        let (raw, sent, seen) = attach_counter(&pool, true);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            sent.fetch_add(1, Ordering::SeqCst);
            signal_fd(raw);
        }
        let t0 = Instant::now();
        while seen.load(Ordering::SeqCst) < 3 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        assert!(pool.worker(0).stats().sleeps.load(Ordering::Relaxed) >= 2);
        pool.shutdown();
    }

    /// With an idle spell of an hour, a worker whose only source wants busy-polling never
    /// sleeps while it has the source; one whose source does not (an RBD disk's) sleeps
    /// after every piece of work.
    #[test]
    fn the_idle_spell_is_skipped_when_no_source_wants_it() {
        for busy_poll in [true, false] {
            let cfg = WorkerConfig {
                poll_idle: Duration::from_secs(3600),
                ..WorkerConfig::default()
            };
            let mut pool = WorkerPool::new(&cfg).unwrap();
            let (raw, sent, seen) = attach_counter(&pool, busy_poll);
            let sleeps = || pool.worker(0).stats().sleeps.load(Ordering::Relaxed);
            let t0 = Instant::now();
            for i in 1..=2 {
                sent.fetch_add(1, Ordering::SeqCst);
                signal_fd(raw);
                while seen.load(Ordering::SeqCst) < i && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                assert_eq!(seen.load(Ordering::SeqCst), i);
            }
            if busy_poll {
                // At most the one sleep before the source was attached (no sources: no spell).
                assert!(sleeps() <= 1, "slept {} times while spinning", sleeps());
            } else {
                // Asleep after attaching and after each of the two events.
                while sleeps() < 3 && t0.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                assert!(sleeps() >= 3, "slept {} times", sleeps());
            }
            pool.shutdown();
        }
    }

    /// Panics on its third poll; counts its polls.
    struct Bomb {
        polls: Arc<AtomicUsize>,
    }
    impl WorkSource for Bomb {
        fn poll(&mut self) -> usize {
            if self.polls.fetch_add(1, Ordering::SeqCst) == 2 {
                panic!("bomb");
            }
            1
        }
        fn wait_fds(&self) -> Vec<RawFd> {
            Vec::new()
        }
        fn prepare_sleep(&mut self) -> bool {
            true
        }
        fn after_sleep(&mut self) {}
        fn finished(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_panicking_source_is_dropped_and_the_others_go_on() {
        let mut pool = WorkerPool::new(&WorkerConfig::default()).unwrap();
        let polls = Arc::new(AtomicUsize::new(0));
        pool.worker(0).attach(Box::new(Bomb {
            polls: polls.clone(),
        }));
        let (raw, sent, seen) = attach_counter(&pool, true);
        let t0 = Instant::now();
        while pool.worker(0).stats().panics.load(Ordering::Relaxed) == 0
            && t0.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(pool.worker(0).stats().panics.load(Ordering::Relaxed), 1);
        // The bomb is gone (never polled again); the counter still gets its events.
        for _ in 0..3 {
            sent.fetch_add(1, Ordering::SeqCst);
            signal_fd(raw);
            std::thread::sleep(Duration::from_millis(10));
        }
        while seen.load(Ordering::SeqCst) < 3 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        assert_eq!(polls.load(Ordering::SeqCst), 3);
        pool.shutdown();
    }

    /// Reads its socket only when told it is readable; counts bytes and edges.
    struct Reader {
        sock: std::os::unix::net::UnixStream,
        readable: bool,
        edges: Arc<AtomicUsize>,
        got: Arc<AtomicUsize>,
    }
    impl WorkSource for Reader {
        fn poll(&mut self) -> usize {
            if !self.readable {
                return 0;
            }
            let mut b = [0u8; 64];
            match std::io::Read::read(&mut self.sock, &mut b) {
                Ok(n) if n > 0 => {
                    self.got.fetch_add(n, Ordering::SeqCst);
                    1
                }
                _ => {
                    self.readable = false;
                    0
                }
            }
        }
        fn wait_fds(&self) -> Vec<RawFd> {
            Vec::new()
        }
        fn socket_fd(&self) -> Option<RawFd> {
            Some(self.sock.as_raw_fd())
        }
        fn socket_ready(&mut self, r: Readiness) {
            if r.readable {
                self.readable = true;
                self.edges.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn prepare_sleep(&mut self) -> bool {
            !self.readable
        }
        fn after_sleep(&mut self) {}
        fn finished(&self) -> bool {
            false
        }
    }

    #[test]
    fn socket_edges_reach_their_source_asleep_or_busy() {
        let mut pool = WorkerPool::new(&WorkerConfig::default()).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let edges = Arc::new(AtomicUsize::new(0));
        let got = Arc::new(AtomicUsize::new(0));
        pool.worker(0).attach(Box::new(Reader {
            sock: a,
            readable: false,
            edges: edges.clone(),
            got: got.clone(),
        }));
        let t0 = Instant::now();
        for i in 1..=5 {
            std::io::Write::write_all(&mut b, b"hello").unwrap();
            while got.load(Ordering::SeqCst) < 5 * i && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(got.load(Ordering::SeqCst), 5 * i);
            // Let the worker fall asleep between writes.
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(edges.load(Ordering::SeqCst) >= 5);
        assert!(pool.worker(0).stats().sleeps.load(Ordering::Relaxed) >= 4);
        pool.shutdown();
    }
}
