//! Memory for key material that lives as long as a disk: kept out of core dumps
//! (`MADV_DONTDUMP`), locked in RAM where the process may lock memory (`mlock`, so it is
//! never written to swap), and wiped when it is dropped.
//!
//! Locking needs `RLIMIT_MEMLOCK` room (or `CAP_IPC_LOCK`); without it the value is still
//! excluded from core dumps and wiped, and the daemon logs once that keys may be swapped.
//! It never fails for that.

use std::sync::atomic::{AtomicBool, Ordering};

use nvmux_core::anon::AnonMap;
use nvmux_core::Result;

static LOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// A `T` in its own anonymous mapping, excluded from core dumps, locked if allowed, and
/// zeroed (after `T`'s own `Drop`) when dropped.
pub struct Locked<T> {
    ptr: *mut T,
    map: AnonMap,
    locked: bool,
}

// SAFETY: `Locked<T>` owns its `T` exclusively, like a `Box<T>`.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: shared access only hands out `&T`, like a `Box<T>`.
unsafe impl<T: Sync> Sync for Locked<T> {}

impl<T> Locked<T> {
    /// Move `v` into protected memory. (The caller's copy of `v` is moved from; types
    /// that hold keys should wipe themselves on drop, as the `aes` crate's do.)
    pub fn new(v: T) -> Result<Self> {
        let map = AnonMap::new(std::mem::size_of::<T>(), "key material")?;
        assert!(
            std::mem::align_of::<T>() <= nvmux_core::anon::page_size(),
            "Locked: alignment"
        );
        map.advise(libc::MADV_DONTDUMP, "exclude key material from core dumps")?;
        // SAFETY: our own mapping of `map.len()` bytes.
        let locked = unsafe { libc::mlock(map.as_ptr().cast(), map.len()) } == 0;
        if !locked && !LOCK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot lock key material in memory (raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK= in the systemd unit, or grant CAP_IPC_LOCK): data keys may be written to swap; they stay out of core dumps"
            );
        }
        let ptr = map.as_ptr().cast::<T>();
        // SAFETY: the mapping is page-aligned (enough for `T`, checked above), writable
        // and at least `size_of::<T>()` bytes.
        unsafe { ptr.write(v) };
        Ok(Locked { ptr, map, locked })
    }

    /// Whether the memory is locked (not swappable).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<T> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds an initialised `T` for the life of `self`.
        unsafe { &*self.ptr }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        let (p, len) = (self.map.as_ptr(), self.map.len());
        // SAFETY: `ptr` holds an initialised `T` that is dropped exactly once, here; then
        // the whole mapping (ours, `len` bytes) is zeroed and unlocked; `map` unmaps it.
        unsafe {
            std::ptr::drop_in_place(self.ptr);
            zeroize::Zeroize::zeroize(std::slice::from_raw_parts_mut(p, len));
            if self.locked {
                libc::munlock(p.cast(), len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_value_and_drops_it() {
        let rc = std::sync::Arc::new(());
        let l = Locked::new((rc.clone(), [7u8; 100])).unwrap();
        assert_eq!(l.1, [7u8; 100]);
        assert_eq!(std::sync::Arc::strong_count(&rc), 2);
        drop(l);
        assert_eq!(std::sync::Arc::strong_count(&rc), 1, "T dropped");
    }

    /// The mapping is marked "dd" (do not dump) in /proc/self/smaps.
    #[test]
    fn excluded_from_core_dumps() {
        let l = Locked::new([1u8; 64]).unwrap();
        let at = &*l as *const _ as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // Find the mapping (header "start-end perms ...") that holds `at`, then its flags.
        let mut inside = false;
        let mut flags = String::new();
        for line in smaps.lines() {
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            if let Some((a, b)) = range.and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            }) {
                inside = (a..b).contains(&at);
            } else if inside && line.starts_with("VmFlags:") {
                flags = line.to_string();
            }
        }
        assert!(flags.contains(" dd"), "{flags}");
    }
}
