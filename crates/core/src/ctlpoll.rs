//! Control-plane sockets on a few threads.
//!
//! A [`CtlTask`] is a small state machine that owns a few descriptors (a listening
//! socket, a control connection) and never blocks: it reads what is there, keeps what is
//! incomplete, and says which descriptors it waits on. A fixed set of control threads
//! (default 2, [`configure`]) runs every task of the process through one epoll each, so
//! 1000 vhost-user exports cost 2 threads, not 1000. A task is placed on the thread that
//! has the fewest tasks and stays there.
//!
//! A task runs when one of its descriptors is ready (edge-triggered: a task must consume
//! or remember what it saw), when it is woken ([`CtlHandle::wake`]), when its deadline
//! passes ([`CtlCx::set_deadline`]), or on the next turn when it asked to run again
//! ([`CtlCx::again`], to bound how long one task holds the thread). A panic in a task
//! removes that task only.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::eventfd::EventFd;
use crate::{Error, Result};

/// Control threads when nothing configured them.
pub const DEFAULT_THREADS: usize = 2;
/// Most control threads [`configure`] accepts.
pub const MAX_THREADS: usize = 64;

/// What a task wants after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep the task (it waits on its descriptors, a wake or its deadline).
    Keep,
    /// The task is finished: it is dropped (closing what it owns).
    Done,
}

/// A non-blocking state machine served by a control thread.
pub trait CtlTask: Send + 'static {
    /// Do what can be done now without blocking.
    fn run(&mut self, cx: &mut CtlCx<'_>) -> Next;
}

/// What a task may ask of its control thread during a run.
pub struct CtlCx<'a> {
    epfd: RawFd,
    id: u64,
    deadline: &'a mut Option<Instant>,
    again: &'a mut bool,
}

impl CtlCx<'_> {
    /// Watch `fd` for input and hang-up (edge-triggered). Watching a descriptor twice is
    /// harmless.
    pub fn watch(&mut self, fd: RawFd) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: self.id,
        };
        // SAFETY: epfd is the thread's live epoll descriptor and ev a valid event.
        let r = unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            // SAFETY: as above.
            if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) } == 0 {
                return Ok(());
            }
            return Err(std::io::Error::last_os_error());
        }
        Err(e)
    }

    /// Stop watching `fd` (call it before the descriptor is closed or handed away).
    pub fn unwatch(&mut self, fd: RawFd) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in watch; a descriptor that is not watched returns ENOENT, ignored.
        unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
    }

    /// Run again at `at` even if nothing happens (None: no deadline).
    pub fn set_deadline(&mut self, at: Option<Instant>) {
        *self.deadline = at;
    }

    /// Run again on the next turn (after the other ready tasks).
    pub fn again(&mut self) {
        *self.again = true;
    }
}

struct Entry {
    task: Box<dyn CtlTask>,
    deadline: Option<Instant>,
    done: Arc<Latch>,
}

#[derive(Default)]
struct Latch {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Latch {
    fn set(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
}

enum Msg {
    Add(u64, Box<dyn CtlTask>, Arc<Latch>),
    Wake(u64),
}

struct Shared {
    efd: EventFd,
    inbox: Mutex<Vec<Msg>>,
    tasks: AtomicUsize,
    thread: OnceLock<std::thread::ThreadId>,
}

impl Shared {
    fn post(&self, m: Msg) {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).push(m);
        self.efd.signal();
    }
}

/// The process's control threads.
pub struct CtlPoll {
    threads: Vec<Arc<Shared>>,
    next_id: AtomicU64,
}

static WANTED: AtomicUsize = AtomicUsize::new(DEFAULT_THREADS);
static GLOBAL: OnceLock<std::result::Result<CtlPoll, String>> = OnceLock::new();

/// Set how many control threads the process uses (before the first task is added;
/// later calls change nothing). Clamped to 1..=[`MAX_THREADS`].
pub fn configure(threads: usize) {
    WANTED.store(threads.clamp(1, MAX_THREADS), Ordering::Relaxed);
}

/// The process's control threads (started on first use).
pub fn global() -> Result<&'static CtlPoll> {
    GLOBAL
        .get_or_init(|| CtlPoll::start(WANTED.load(Ordering::Relaxed)).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| {
            Error::new(
                crate::ErrorKind::Io,
                format!("control threads could not start: {e}"),
            )
        })
}

/// A task on a control thread.
pub struct CtlHandle {
    id: u64,
    shared: Arc<Shared>,
    done: Arc<Latch>,
}

impl CtlHandle {
    /// Run the task soon (it looks at whatever its owner left for it).
    pub fn wake(&self) {
        self.shared.post(Msg::Wake(self.id));
    }

    /// Wait until the task returned [`Next::Done`] (or panicked) and was dropped. Must
    /// not be called from a control thread (a task waiting on itself or a neighbour
    /// would wait forever): there it returns at once.
    pub fn wait_done(&self) {
        if self.shared.thread.get() == Some(&std::thread::current().id()) {
            return;
        }
        let mut g = self.done.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            g = self.done.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// [`CtlHandle::wait_done`], for at most `timeout`; true when it finished.
    pub fn wait_done_for(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.done.done.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .done
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl CtlPoll {
    fn start(n: usize) -> std::io::Result<CtlPoll> {
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let efd = EventFd::new()?;
            // SAFETY: epoll_create1 has no memory-safety preconditions; the result is
            // checked and owned below.
            let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if epfd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: WAKE,
            };
            // SAFETY: both descriptors are live; ev is a valid event.
            if unsafe {
                libc::epoll_ctl(
                    epfd.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    efd.as_raw_fd(),
                    &mut ev,
                )
            } < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let shared = Arc::new(Shared {
                efd,
                inbox: Mutex::new(Vec::new()),
                tasks: AtomicUsize::new(0),
                thread: OnceLock::new(),
            });
            let s2 = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("nvmux-ctl{i}"))
                .spawn(move || thread_main(epfd, s2))?;
            let _ = shared.thread.set(t.thread().id());
            threads.push(shared);
        }
        Ok(CtlPoll {
            threads,
            next_id: AtomicU64::new(1),
        })
    }

    /// How many control threads there are.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Tasks per control thread.
    pub fn load(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.tasks.load(Ordering::Relaxed))
            .collect()
    }

    /// Hand `task` to the least loaded control thread; it runs once at once (to watch
    /// its descriptors) and then as its events say.
    pub fn add(&self, task: Box<dyn CtlTask>) -> CtlHandle {
        let shared = self
            .threads
            .iter()
            .min_by_key(|t| t.tasks.load(Ordering::Relaxed))
            .cloned()
            .unwrap_or_else(|| self.threads[0].clone());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let done = Arc::new(Latch::default());
        shared.tasks.fetch_add(1, Ordering::Relaxed);
        shared.post(Msg::Add(id, task, done.clone()));
        CtlHandle { id, shared, done }
    }
}

/// The epoll token of a thread's own eventfd (task ids start at 1).
const WAKE: u64 = 0;
/// Most tasks run in one turn of the loop before epoll is asked again.
const EVENTS: usize = 64;

fn thread_main(epfd: OwnedFd, shared: Arc<Shared>) {
    let ep = epfd.as_raw_fd();
    let mut tasks: HashMap<u64, Entry> = HashMap::new();
    let mut ready: Vec<u64> = Vec::new();
    let mut again: Vec<u64> = Vec::new();
    let mut with_deadline = 0usize;
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        let timeout_ms: i32 = if !again.is_empty() {
            0
        } else if with_deadline > 0 {
            let now = Instant::now();
            let next = tasks.values().filter_map(|e| e.deadline).min();
            match next {
                None => -1,
                Some(t) => {
                    let d = t.saturating_duration_since(now);
                    // Round up, so that the deadline has passed when we wake.
                    let ms = d.as_micros().div_ceil(1000);
                    ms.min(i32::MAX as u128) as i32
                }
            }
        } else {
            -1
        };
        // SAFETY: events is a valid buffer of EVENTS entries for the call's duration.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), EVENTS as i32, timeout_ms) };
        ready.clear();
        std::mem::swap(&mut ready, &mut again);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("control thread: epoll_wait: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut woke = false;
        for ev in events.iter().take(n.max(0) as usize) {
            let id = ev.u64;
            if id == WAKE {
                woke = true;
            } else {
                ready.push(id);
            }
        }
        if woke {
            shared.efd.drain();
            let msgs = std::mem::take(&mut *shared.inbox.lock().unwrap_or_else(|e| e.into_inner()));
            for m in msgs {
                match m {
                    Msg::Add(id, task, done) => {
                        tasks.insert(
                            id,
                            Entry {
                                task,
                                deadline: None,
                                done,
                            },
                        );
                        ready.push(id);
                    }
                    Msg::Wake(id) => ready.push(id),
                }
            }
        }
        if with_deadline > 0 {
            let now = Instant::now();
            for (id, e) in tasks.iter() {
                if e.deadline.is_some_and(|t| t <= now) {
                    ready.push(*id);
                }
            }
        }
        ready.sort_unstable();
        ready.dedup();
        for &id in ready.iter() {
            let Some(e) = tasks.get_mut(&id) else {
                continue;
            };
            let had_deadline = e.deadline.is_some();
            let mut run_again = false;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut cx = CtlCx {
                    epfd: ep,
                    id,
                    deadline: &mut e.deadline,
                    again: &mut run_again,
                };
                e.task.run(&mut cx)
            }));
            let next = match r {
                Ok(n) => n,
                Err(_) => {
                    tracing::error!("a control task panicked; it is removed");
                    Next::Done
                }
            };
            let has_deadline = e.deadline.is_some();
            match (had_deadline, has_deadline) {
                (false, true) => with_deadline += 1,
                (true, false) => with_deadline -= 1,
                _ => {}
            }
            if next == Next::Done {
                if let Some(e) = tasks.remove(&id) {
                    if e.deadline.is_some() {
                        with_deadline -= 1;
                    }
                    let done = e.done.clone();
                    drop(e);
                    shared.tasks.fetch_sub(1, Ordering::Relaxed);
                    done.set();
                }
            } else if run_again {
                again.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Echoes whole lines, keeps partial ones, drops the peer after a deadline.
    struct Echo {
        s: UnixStream,
        buf: Vec<u8>,
        watched: bool,
        since: Option<Instant>,
        out: Arc<Mutex<Vec<String>>>,
    }

    impl CtlTask for Echo {
        fn run(&mut self, cx: &mut CtlCx<'_>) -> Next {
            if !self.watched {
                self.s.set_nonblocking(true).unwrap();
                cx.watch(self.s.as_raw_fd()).unwrap();
                self.watched = true;
            }
            let mut b = [0u8; 64];
            loop {
                match self.s.read(&mut b) {
                    Ok(0) => return Next::Done,
                    Ok(n) => self.buf.extend_from_slice(&b[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => return Next::Done,
                }
            }
            while let Some(p) = self.buf.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=p).collect();
                self.out
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&line).into());
            }
            if self.buf.is_empty() {
                self.since = None;
                cx.set_deadline(None);
            } else {
                let since = *self.since.get_or_insert_with(Instant::now);
                let at = since + Duration::from_millis(200);
                if Instant::now() >= at {
                    cx.unwatch(self.s.as_raw_fd());
                    return Next::Done;
                }
                cx.set_deadline(Some(at));
            }
            Next::Keep
        }
    }

    #[test]
    fn a_stalled_peer_does_not_hold_up_the_others_and_times_out() {
        let poll = CtlPoll::start(1).unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let (mut slow, a) = UnixStream::pair().unwrap();
        let (mut fast, b) = UnixStream::pair().unwrap();
        let mk = |s| {
            Box::new(Echo {
                s,
                buf: Vec::new(),
                watched: false,
                since: None,
                out: out.clone(),
            })
        };
        let ha = poll.add(mk(a));
        let hb = poll.add(mk(b));
        // Half a line from the slow peer, then whole lines from the other.
        slow.write_all(b"hal").unwrap();
        for i in 0..10 {
            fast.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        let t0 = Instant::now();
        while out.lock().unwrap().len() < 10 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.lock().unwrap().len(), 10);
        // The stalled peer is dropped by its deadline; the other stays.
        assert!(ha.wait_done_for(Duration::from_secs(5)));
        let mut b = [0u8; 1];
        assert_eq!(slow.read(&mut b).unwrap(), 0, "the stalled peer is closed");
        assert!(!hb.wait_done_for(Duration::from_millis(50)));
        drop(fast);
        assert!(hb.wait_done_for(Duration::from_secs(5)));
        assert_eq!(poll.load(), vec![0]);
    }

    #[test]
    fn tasks_spread_over_threads_and_wake() {
        struct Count(Arc<AtomicUsize>);
        impl CtlTask for Count {
            fn run(&mut self, _cx: &mut CtlCx<'_>) -> Next {
                if self.0.fetch_add(1, Ordering::SeqCst) >= 1 {
                    Next::Done
                } else {
                    Next::Keep
                }
            }
        }
        let poll = CtlPoll::start(2).unwrap();
        let c: Vec<_> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let hs: Vec<_> = c
            .iter()
            .map(|c| poll.add(Box::new(Count(c.clone()))))
            .collect();
        let t0 = Instant::now();
        while c.iter().any(|c| c.load(Ordering::SeqCst) == 0)
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(poll.load(), vec![2, 2]);
        for h in &hs {
            h.wake();
        }
        for h in &hs {
            assert!(h.wait_done_for(Duration::from_secs(5)));
        }
        assert_eq!(poll.load(), vec![0, 0]);
    }
}
