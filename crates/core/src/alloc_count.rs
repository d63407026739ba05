//! A counting global allocator: how many allocations each thread made.
//!
//! The `nvmux` binary installs [`CountingAlloc`] as its global allocator. Every worker
//! thread publishes its own count ([`thread_allocs`]) in its `WorkerStats`, so the
//! daemon can show — and the zero-allocation tests can assert — that serving I/O
//! allocates nothing. The cost is one thread-local increment per allocation; frees are not
//! counted.
//!
//! **Finding an allocation.** A thread that calls [`trace_this_thread`] (every worker does
//! when `NVMUX_ALLOC_TRACE` is set in the daemon's environment) prints a backtrace to
//! stderr for each allocation it makes, numbered by its count, so that an allocation a
//! zero-allocation test reports can be traced to its source. Off, it costs one
//! thread-local load per allocation (nothing per I/O: the hot path does not allocate).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting allocations (`alloc`, `alloc_zeroed`, `realloc`) per
/// thread.
pub struct CountingAlloc;

thread_local! {
    // Const-initialised and without a destructor: usable from inside the allocator.
    static COUNT: Cell<u64> = const { Cell::new(0) };
    // 0: not traced; 1: traced; 2: traced, and inside the tracer (its own allocations are
    // not traced).
    static TRACE: Cell<u8> = const { Cell::new(0) };
}

/// The environment variable that makes worker threads trace their allocations.
pub const TRACE_ENV: &str = "NVMUX_ALLOC_TRACE";

#[inline]
fn bump() {
    // `try_with` fails only while the thread is being torn down; such allocations are not
    // counted (no worker serves I/O then).
    let _ = COUNT.try_with(|c| c.set(c.get().wrapping_add(1)));
    if TRACE.try_with(|t| t.get() == 1).unwrap_or(false) {
        trace();
    }
}

/// Print where the calling thread's allocation comes from (see the module's doc).
#[cold]
#[inline(never)]
fn trace() {
    TRACE.with(|t| t.set(2));
    let n = thread_allocs();
    let bt = std::backtrace::Backtrace::force_capture();
    let th = std::thread::current();
    eprintln!(
        "alloc_count: allocation {n} on thread {}:\n{bt}",
        th.name().unwrap_or("?")
    );
    TRACE.with(|t| t.set(1));
}

/// Trace the calling thread's allocations from now on if [`TRACE_ENV`] is set (a debug
/// aid: a backtrace per allocation on stderr).
pub fn trace_this_thread() {
    if std::env::var_os(TRACE_ENV).is_some() {
        TRACE.with(|t| t.set(1));
    }
}

// SAFETY: every method forwards to the system allocator with the caller's arguments
// unchanged, so `System`'s guarantees are ours; counting touches only a thread-local
// `Cell` and never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded as is (see the impl's comment).
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations made so far by the calling thread (0 when [`CountingAlloc`] is not the
/// global allocator).
#[inline]
pub fn thread_allocs() -> u64 {
    COUNT.try_with(|c| c.get()).unwrap_or(0)
}

/// A mixed I/O load for zero-allocation tests: reads, writes (every `fua_every`-th command
/// a FUA write, if asked), write zeroes and flushes on one queue at a fixed depth, each
/// command's buffer and scatter list reused, so that the test's own side allocates
/// nothing once running and whatever [`thread_allocs`] counts comes from the queue.
/// Command `k` is a flush if `k % 16 == 0`, write zeroes if 1, else a write (even) or a
/// read (odd), of `8 + (k % sizes) * 8` blocks at block `(k * 97) % 2000 * 8`.
pub struct MixedLoad {
    q: Box<dyn crate::BlockQueue>,
    bufs: Vec<Vec<u8>>,
    sgs: Vec<Option<crate::SgList>>,
    fds: Vec<std::os::fd::RawFd>,
    pfds: Vec<libc::pollfd>,
    done: Vec<(usize, crate::Status)>,
    k: u64,
    block_size: u32,
    sizes: u64,
    fua_every: Option<u64>,
}

impl MixedLoad {
    /// `depth` commands in flight on `q`, of 8, 16, ... (`sizes` of them) blocks of
    /// `block_size` bytes.
    pub fn new(
        q: Box<dyn crate::BlockQueue>,
        depth: usize,
        block_size: u32,
        sizes: u64,
        fua_every: Option<u64>,
    ) -> MixedLoad {
        let sizes = sizes.max(1);
        let largest = (8 + (sizes - 1) as usize * 8) * block_size as usize;
        let mut l = MixedLoad {
            q,
            bufs: (0..depth).map(|_| vec![0x5a; largest]).collect(),
            sgs: (0..depth)
                .map(|_| Some(crate::SgList::with_capacity(4)))
                .collect(),
            fds: Vec::with_capacity(16),
            pfds: Vec::with_capacity(16),
            done: Vec::with_capacity(depth * 2),
            k: 0,
            block_size,
            sizes,
            fua_every,
        };
        l.refresh_fds();
        l
    }

    /// The queue, for what a test checks after the load.
    pub fn queue(&mut self) -> &mut dyn crate::BlockQueue {
        self.q.as_mut()
    }

    fn refresh_fds(&mut self) {
        self.fds.clear();
        self.q.wait_fds(&mut self.fds);
        self.pfds.clear();
        for &fd in &self.fds {
            self.pfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
    }

    fn submit(&mut self, slot: usize) {
        use crate::Opcode;
        let k = self.k;
        self.k += 1;
        let mut sg = self.sgs[slot].take().unwrap_or_default();
        sg.clear();
        let op = match k % 16 {
            0 => Opcode::Flush,
            1 => Opcode::WriteZeroes,
            n if n % 2 == 0 => Opcode::Write,
            _ => Opcode::Read,
        };
        let (slba, nlb) = if op == Opcode::Flush {
            (0, 0)
        } else {
            ((k * 97) % 2000 * 8, 8 + (k % self.sizes) as u32 * 8)
        };
        if op.has_data() {
            sg.push(
                self.bufs[slot].as_mut_ptr(),
                nlb as usize * self.block_size as usize,
            );
        }
        let mut cmd = crate::IoCommand::new(op, slba, nlb, slot as u64, sg);
        cmd.fua = op == Opcode::Write && self.fua_every.is_some_and(|f| k.is_multiple_of(f));
        self.q.submit(cmd);
    }

    /// Run `n` commands (at least the depth) to completion: each that completes is
    /// replaced by the next. Fails on a command that does not succeed, or when they
    /// are not all done within `timeout`.
    pub fn run(&mut self, n: u64, timeout: std::time::Duration) -> Result<(), String> {
        let end = std::time::Instant::now() + timeout;
        let mut issued = 0u64;
        let mut completed = 0u64;
        for s in 0..self.bufs.len() {
            self.submit(s);
            issued += 1;
        }
        self.q.kick();
        while completed < issued {
            if std::time::Instant::now() >= end {
                return Err(format!(
                    "{completed} of {issued} commands done within {timeout:?}"
                ));
            }
            let (sgs, done) = (&mut self.sgs, &mut self.done);
            let got = self.q.poll(&mut |c, st| {
                sgs[c.tag as usize] = Some(c.sg);
                done.push((c.tag as usize, st));
            });
            if got == 0 && self.q.may_sleep() {
                if self.q.take_fds_changed() {
                    self.refresh_fds();
                }
                // SAFETY: a valid pollfd array; bounded timeout.
                unsafe { libc::poll(self.pfds.as_mut_ptr(), self.pfds.len() as _, 10) };
                for &fd in &self.fds {
                    crate::eventfd::drain_fd(fd);
                }
            }
            while let Some((slot, st)) = self.done.pop() {
                if !st.is_ok() {
                    return Err(format!("command {slot} failed: {st:?}"));
                }
                completed += 1;
                if issued < n {
                    self.submit(slot);
                    issued += 1;
                }
            }
            self.q.kick();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_this_threads_allocations() {
        // The test binary does not install the allocator, so drive it directly.
        let a = CountingAlloc;
        let before = thread_allocs();
        let l = Layout::from_size_align(64, 8).unwrap();
        // SAFETY: a valid non-zero layout; the block is freed with the same layout.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null());
            let p = a.realloc(p, l, 128);
            assert!(!p.is_null());
            a.dealloc(p, Layout::from_size_align(128, 8).unwrap());
        }
        assert_eq!(thread_allocs() - before, 2);
        let other = std::thread::spawn(|| {
            let a = CountingAlloc;
            let l = Layout::from_size_align(16, 8).unwrap();
            // SAFETY: as above.
            unsafe { a.dealloc(a.alloc(l), l) };
            thread_allocs()
        })
        .join()
        .unwrap();
        assert_eq!(other, 1, "each thread counts its own");
        assert_eq!(thread_allocs() - before, 2);
    }
}
