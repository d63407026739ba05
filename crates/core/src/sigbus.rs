//! Surviving a SIGBUS in memory that someone else can pull away.
//!
//! The daemon maps memory it does not own: guest memory from a vhost-user front-end (a
//! memfd, a tmpfs or hugetlbfs file). If the owner truncates that file, or punches a hole
//! the kernel then cannot fill (a full tmpfs, an empty hugetlb pool), the next access to a
//! page past the end raises SIGBUS, which kills the process by default: one hostile
//! front-end would stop every tenant.
//!
//! A mapping that may go away like that is [`register`]ed here. The process-wide SIGBUS
//! handler ([`install`], done by the first `register`) looks the faulting address up in a
//! fixed table of registered mappings. If it falls inside one, the handler replaces that
//! whole mapping with anonymous zero pages (`mmap(MAP_FIXED | MAP_PRIVATE |
//! MAP_ANONYMOUS)` at the same address), raises the mapping's *faulted* flag, and returns:
//! the faulting access is retried and completes on a zero page. The owner of the mapping
//! checks the flag (a vhost-user queue does after every poll) and fails the device that
//! uses it. A SIGBUS at any other address restores the default action and re-raises the
//! signal, so a real bug still crashes with a core dump.
//!
//! # Async-signal safety
//! The handler allocates nothing and takes no lock: the table is a fixed array of entries
//! made of atomics. Each entry has a state (free, being filled, active, closing) and a
//! count of handlers inside it. A handler increments the count, then re-checks that the
//! entry is active before it touches the mapping; [`Registration`]'s drop marks the entry
//! closing and waits for the count to reach zero before it returns, so a handler never
//! `MAP_FIXED`s over a range that was unmapped and possibly reused for something else
//! (both sides use sequentially consistent operations: either the handler's increment is
//! seen by the waiting drop, or the handler sees the entry closing).
//!
//! The caller must drop the [`Registration`] **before** it unmaps the range.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Once};

use crate::{Error, ErrorKind, Result};

/// Mappings that can be registered at once (process-wide). vhost-user front-ends have at
/// most 32 regions each; a new memory table briefly coexists with the old one.
pub const MAX_MAPPINGS: usize = 8192;

const FREE: u32 = 0;
const FILLING: u32 = 1;
const ACTIVE: u32 = 2;
const CLOSING: u32 = 3;

struct Entry {
    state: AtomicU32,
    /// Handlers currently looking at this entry.
    users: AtomicU32,
    start: AtomicUsize,
    len: AtomicUsize,
    /// The owner's flag (kept alive by the Registration until the entry is free again).
    flag: AtomicPtr<AtomicBool>,
    /// The range has been replaced by anonymous memory.
    replaced: AtomicBool,
}

impl Entry {
    const fn new() -> Entry {
        Entry {
            state: AtomicU32::new(FREE),
            users: AtomicU32::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            flag: AtomicPtr::new(std::ptr::null_mut()),
            replaced: AtomicBool::new(false),
        }
    }
}

static TABLE: [Entry; MAX_MAPPINGS] = [const { Entry::new() }; MAX_MAPPINGS];
/// Recoveries so far (all mappings), for tests and logs.
static RECOVERED: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A registered mapping. Dropping it unregisters the range (waiting for a handler that is
/// running on it to finish); drop it before unmapping.
pub struct Registration {
    idx: usize,
    flag: Arc<AtomicBool>,
}

impl Registration {
    /// True once a SIGBUS in this range was turned into zero pages.
    pub fn faulted(&self) -> bool {
        self.flag.load(SeqCst)
    }
    /// The flag the handler raises.
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.flag
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &TABLE[self.idx];
        f.debug_struct("Registration")
            .field("start", &(e.start.load(SeqCst) as *const u8))
            .field("len", &e.len.load(SeqCst))
            .field("faulted", &self.faulted())
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let e = &TABLE[self.idx];
        e.state.store(CLOSING, SeqCst);
        // A handler that incremented `users` before our store may still replace the range;
        // one that increments after it sees CLOSING and leaves. Wait for the former.
        while e.users.load(SeqCst) != 0 {
            std::thread::yield_now();
        }
        e.flag.store(std::ptr::null_mut(), SeqCst);
        e.start.store(0, SeqCst);
        e.len.store(0, SeqCst);
        e.replaced.store(false, SeqCst);
        e.state.store(FREE, SeqCst);
    }
}

/// Register `len` bytes at `start` (a mapping the caller owns and keeps mapped until the
/// returned registration is dropped). `flag` is raised when a SIGBUS in the range was
/// recovered; several mappings may share one flag.
///
/// # Safety
/// `start..start + len` must be a mapping of the caller's that nothing else in the process
/// uses except through the caller, and that may be replaced by anonymous memory at any
/// time while registered. It must stay mapped until the registration is dropped.
pub unsafe fn register(start: *mut u8, len: usize, flag: Arc<AtomicBool>) -> Result<Registration> {
    install()?;
    let page = page_size();
    if len == 0
        || !(start as usize).is_multiple_of(page)
        || (start as usize).checked_add(len).is_none()
    {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("SIGBUS registry: range {start:p}+{len:#x} is empty, unaligned or wraps"),
        ));
    }
    for (idx, e) in TABLE.iter().enumerate() {
        if e.state
            .compare_exchange(FREE, FILLING, SeqCst, SeqCst)
            .is_ok()
        {
            e.start.store(start as usize, SeqCst);
            e.len.store(len, SeqCst);
            e.replaced.store(false, SeqCst);
            e.flag.store(Arc::as_ptr(&flag).cast_mut(), SeqCst);
            e.state.store(ACTIVE, SeqCst);
            return Ok(Registration { idx, flag });
        }
    }
    Err(Error::new(
        ErrorKind::Busy,
        format!(
            "SIGBUS registry is full ({MAX_MAPPINGS} mappings): too many guest memory regions in this daemon"
        ),
    ))
}

/// Mappings whose SIGBUS was recovered since the process started.
pub fn recovered() -> usize {
    RECOVERED.load(SeqCst)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// Install the process-wide SIGBUS handler (idempotent; [`register`] calls it).
pub fn install() -> Result<()> {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; we fill handler, flags and
        // mask, and the handler has the SA_SIGINFO signature.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, SeqCst);
            }
        }
    });
    if INSTALLED.load(SeqCst) {
        Ok(())
    } else {
        Err(Error::io(
            "install the SIGBUS handler",
            std::io::Error::other("sigaction failed"),
        ))
    }
}

/// Replace `e`'s range with zero pages if `addr` lies in it. Async-signal-safe.
fn try_recover(e: &Entry, addr: usize) -> bool {
    if e.state.load(SeqCst) != ACTIVE {
        return false;
    }
    e.users.fetch_add(1, SeqCst);
    let mut hit = false;
    if e.state.load(SeqCst) == ACTIVE {
        let start = e.start.load(SeqCst);
        let len = e.len.load(SeqCst);
        if addr >= start && addr - start < len {
            hit = true;
            if !e.replaced.load(SeqCst) {
                // SAFETY: the range is a live mapping of the registration's owner (the entry
                // is active and cannot be freed while `users` > 0); replacing it in place
                // with private anonymous pages keeps every pointer into it valid.
                let p = unsafe {
                    libc::mmap(
                        start as *mut libc::c_void,
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_FIXED
                            | libc::MAP_PRIVATE
                            | libc::MAP_ANONYMOUS
                            | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    hit = false;
                } else {
                    e.replaced.store(true, SeqCst);
                    RECOVERED.fetch_add(1, SeqCst);
                }
            }
            if hit {
                let f = e.flag.load(SeqCst);
                if !f.is_null() {
                    // SAFETY: the Registration keeps the flag's Arc alive until the entry is
                    // freed, which waits for `users` to drop to zero.
                    unsafe { (*f).store(true, SeqCst) };
                }
            }
        }
    }
    e.users.fetch_sub(1, SeqCst);
    hit
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: as above; si_code tells a fault (> 0) from a signal sent by a process.
    let from_kernel = unsafe { (*info).si_code } > 0;
    if from_kernel && TABLE.iter().any(|e| try_recover(e, addr)) {
        return;
    }
    // Not ours: die as if there were no handler (default action, core dump).
    // SAFETY: signal() and raise() are async-signal-safe; SIGBUS is blocked while this
    // handler runs, so the raised signal is delivered, with the default action, on return.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: usize) -> (std::fs::File, *mut u8) {
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"sigbus-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let f: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        f.set_len(len as u64).unwrap();
        // SAFETY: a shared mapping of our memfd; checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (f, p.cast())
    }

    #[test]
    fn a_truncated_mapping_turns_into_zero_pages_and_raises_its_flag() {
        let len = 64 << 10;
        let (f, p) = memfd(len);
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile(p.add(8192), 0x5au8) };
        let flag = Arc::new(AtomicBool::new(false));
        // SAFETY: our own mapping, unmapped only after the registration is dropped.
        let reg = unsafe { register(p, len, flag.clone()) }.unwrap();
        let before = recovered();
        f.set_len(0).unwrap();
        // SAFETY: inside our mapping; the page is gone, so this faults and is recovered.
        let v = unsafe { std::ptr::read_volatile(p.add(8192)) };
        assert_eq!(v, 0, "the access completes on a zero page");
        assert!(flag.load(SeqCst) && reg.faulted());
        assert!(recovered() > before);
        // The whole mapping is usable anonymous memory now (also the last page).
        // SAFETY: inside our mapping.
        unsafe {
            std::ptr::write_volatile(p.add(len - 1), 7u8);
            assert_eq!(std::ptr::read_volatile(p.add(len - 1)), 7);
        }
        drop(reg);
        // SAFETY: unmapping our mapping after unregistering it.
        unsafe { libc::munmap(p.cast(), len) };
    }

    #[test]
    fn registrations_are_reused_and_checked() {
        let flag = Arc::new(AtomicBool::new(false));
        // SAFETY: the ranges are refused before anything is registered.
        unsafe {
            assert!(register(
                std::ptr::null_mut::<u8>().wrapping_add(4096),
                0,
                flag.clone()
            )
            .is_err());
            assert!(register(
                std::ptr::null_mut::<u8>().wrapping_add(4097),
                4096,
                flag.clone()
            )
            .is_err());
        }
        let (_f, p) = memfd(4096);
        for _ in 0..3 * MAX_MAPPINGS / 2 {
            // SAFETY: our mapping; nothing faults.
            let r = unsafe { register(p, 4096, flag.clone()) }.unwrap();
            assert!(!r.faulted());
        }
        // SAFETY: our mapping, no registration left.
        unsafe { libc::munmap(p.cast(), 4096) };
    }

    /// Unregistering while other threads fault on other mappings: nothing is lost.
    #[test]
    fn concurrent_faults_and_unregisters() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..50 {
                        let (f, p) = memfd(16 << 10);
                        let flag = Arc::new(AtomicBool::new(false));
                        // SAFETY: our mapping, unmapped after the registration is gone.
                        let r = unsafe { register(p, 16 << 10, flag.clone()) }.unwrap();
                        f.set_len(4096).unwrap();
                        // SAFETY: inside our mapping (past the file's end: recovered).
                        let v = unsafe { std::ptr::read_volatile(p.add(8192)) };
                        assert_eq!(v, 0);
                        assert!(flag.load(SeqCst));
                        drop(r);
                        // SAFETY: unregistered first.
                        unsafe { libc::munmap(p.cast(), 16 << 10) };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A SIGBUS outside every registered mapping still kills the process (in a child).
    #[test]
    fn an_unregistered_fault_still_kills() {
        install().unwrap();
        let (f, p) = memfd(8192);
        // A registered mapping elsewhere must not catch it.
        let (_g, q) = memfd(8192);
        let flag = Arc::new(AtomicBool::new(false));
        // SAFETY: our mapping, kept until the end of the test.
        let reg = unsafe { register(q, 8192, flag.clone()) }.unwrap();
        f.set_len(0).unwrap();
        // SAFETY: fork; the child only reads memory and calls _exit (async-signal-safe).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: the page is gone: SIGBUS, not recovered, kills the child.
            unsafe {
                std::ptr::read_volatile(p.add(100));
                libc::_exit(0);
            }
        }
        let mut st = 0;
        // SAFETY: waiting for our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        assert!(libc::WIFSIGNALED(st), "the child exited with {st:#x}");
        assert_eq!(libc::WTERMSIG(st), libc::SIGBUS);
        assert!(!flag.load(SeqCst) && !reg.faulted());
        drop(reg);
        // SAFETY: our mappings.
        unsafe {
            libc::munmap(p.cast(), 8192);
            libc::munmap(q.cast(), 8192);
        }
    }
}
