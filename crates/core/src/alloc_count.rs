//! A counting global allocator: how many allocations each thread made.
//!
//! The `nvmux` binary installs [`CountingAlloc`] as its global allocator. Every worker
//! thread publishes its own count ([`thread_allocs`]) in its `WorkerStats`, so the
//! daemon can show — and the zero-allocation tests can assert — that serving I/O
//! allocates nothing. The cost is one thread-local increment per allocation; frees are not
//! counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting allocations (`alloc`, `alloc_zeroed`, `realloc`) per
/// thread.
pub struct CountingAlloc;

thread_local! {
    // Const-initialised and without a destructor: usable from inside the allocator.
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

#[inline]
fn bump() {
    // `try_with` fails only while the thread is being torn down; such allocations are not
    // counted (no worker serves I/O then).
    let _ = COUNT.try_with(|c| c.set(c.get().wrapping_add(1)));
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
