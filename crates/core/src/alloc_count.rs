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
