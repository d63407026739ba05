//! An owned private anonymous memory mapping, unmapped on drop: the one place that maps
//! such memory for key material (`nvmux_func::secret`) and JIT code (`nvmux_router`).

use crate::{Error, Result};

/// `len` bytes (rounded up to whole pages) of private anonymous memory, read-write until
/// [`protect`](Self::protect) says otherwise.
pub struct AnonMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this value; whoever shares it decides what is written
// when (both users write before sharing and only read afterwards).
unsafe impl Send for AnonMap {}
// SAFETY: as above.
unsafe impl Sync for AnonMap {}

/// The system's page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

impl AnonMap {
    /// Map at least `len` bytes; `what` names the memory in the error.
    pub fn new(len: usize, what: &str) -> Result<AnonMap> {
        let page = page_size();
        let len = len.max(1).div_ceil(page) * page;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io(
                format!("map memory for {what}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(AnonMap { ptr: p.cast(), len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The mapped length (whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `mprotect` the whole mapping (`libc::PROT_*` bits).
    pub fn protect(&self, prot: i32, what: &str) -> Result<()> {
        // SAFETY: our own mapping of `len` bytes.
        if unsafe { libc::mprotect(self.ptr.cast(), self.len, prot) } != 0 {
            return Err(Error::io(
                format!("protect {what}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// `madvise` the whole mapping.
    pub fn advise(&self, advice: i32, what: &str) -> Result<()> {
        // SAFETY: our own mapping of `len` bytes; advice does not invalidate it.
        if unsafe { libc::madvise(self.ptr.cast(), self.len, advice) } != 0 {
            return Err(Error::io(what, std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping; its users are gone (they borrow it or are dropped first).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_whole_pages_and_protects() {
        let m = AnonMap::new(10, "test").expect("map");
        assert_eq!(m.len(), page_size());
        // SAFETY: inside our read-write mapping.
        unsafe { m.as_ptr().write(7) };
        m.protect(libc::PROT_READ, "test").expect("protect");
        // SAFETY: still mapped, now read-only.
        assert_eq!(unsafe { m.as_ptr().read() }, 7);
    }
}
