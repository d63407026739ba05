//! The client's DMA space: what DMA_MAP handed over, mapped into the daemon.
//!
//! Each DMA_MAP brings an IOVA range and, for memory the client can share (QEMU's guest
//! RAM in a memfd), a descriptor and an offset into it. The range is checked (4 KiB
//! aligned, not empty, no 64-bit wrap, inside the file, no overlap with another mapping,
//! at most [`MAX_DMA_MAPS`] mappings and [`MAX_DMA_BYTES`] bytes per client), then
//! mapped `MAP_SHARED` with the protection the flags allow and registered with the SIGBUS
//! recovery of [`nvmux_core::sigbus`] (the client may shrink its file under us). A range
//! without a descriptor is recorded but cannot be translated (nvmux does not implement
//! DMA_READ/DMA_WRITE messages).
//!
//! Ownership: a mapping is an `Arc<Mapping>` that unmaps on its last drop. A
//! [`DmaTable`] is an immutable, sorted set of mappings; DMA_MAP and DMA_UNMAP build a
//! new table and publish it in the [`DmaSpace`] with a new generation. A user (a queue of
//! the NVMe controller) takes a table with [`DmaSpace::load`] and may translate through
//! it for as long as it holds it: an unmap never leaves it a dangling pointer, the memory
//! stays mapped until the last table that holds it is dropped. To honour the protocol
//! (no access to unmapped memory after the DMA_UNMAP reply), users compare
//! [`DmaSpace::generation`] at each command boundary and reload; the controller will
//! quiesce its queues before replying to an unmap (documented in docs/vfio-user.md).

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvmux_core::sigbus;

use crate::proto::{Errno, EEXIST, EFAULT, EINVAL, ENOSPC};
pub use crate::proto::{MAX_DMA_MAPS, PGSIZE};

/// Bytes one client may have mapped (the sum of its mappings): 16 TiB, as a vhost-user
/// memory table. Mappings cost address space, not memory, but the daemon has 128 TiB of
/// it.
pub const MAX_DMA_BYTES: u64 = 16 << 40;

/// One mmap'd range of the client's memory. Unmapped on drop (after its SIGBUS
/// registration is dropped).
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    reg: Option<sigbus::Registration>,
}

// SAFETY: the mapping is plain shared memory; the pointer is only dereferenced through
// bounds-checked GuestSlice accessors, and the range stays mapped while the Arc lives.
unsafe impl Send for Mapping {}
// SAFETY: as above; concurrent access is to shared memory the guest also writes.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // The registration goes first: the SIGBUS handler must forget the range before
        // it is unmapped.
        drop(self.reg.take());
        // SAFETY: ptr/len are exactly the range this Mapping mmap'd; nothing else uses
        // it (the last Arc is being dropped).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Mapping {
    /// Map `size` bytes of `fd` at `offset`.
    fn new(fd: &OwnedFd, offset: u64, size: u64, writable: bool) -> Result<Mapping, String> {
        // SAFETY: fstat writes one stat struct for a descriptor we hold.
        let st = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
                return Err(format!(
                    "fstat of the DMA descriptor: {}",
                    std::io::Error::last_os_error()
                ));
            }
            st
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(format!(
                "the DMA descriptor is not a regular file (mode {:#o}); guest memory must be a memfd or a tmpfs/hugetlbfs file",
                st.st_mode
            ));
        }
        let end = offset
            .checked_add(size)
            .ok_or_else(|| format!("offset {offset:#x} + size {size:#x} overflows"))?;
        let file_size = st.st_size.max(0) as u64;
        if end > file_size {
            return Err(format!(
                "range [{offset:#x}, {end:#x}) of the file reaches past its end ({file_size:#x} bytes)"
            ));
        }
        let len = usize::try_from(size).map_err(|_| format!("size {size:#x} too large"))?;
        let off = libc::off_t::try_from(offset).map_err(|_| format!("offset {offset:#x}"))?;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping chosen by the kernel; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err("mmap returned a null address".into());
        };
        let mut m = Mapping {
            ptr,
            len,
            reg: None,
        };
        // SAFETY: [ptr, ptr+len) is our fresh mapping; the registration is dropped before
        // the range is unmapped (Drop above).
        m.reg = Some(
            unsafe { sigbus::register(ptr.as_ptr(), len, Arc::new(AtomicBool::new(false))) }
                .map_err(|e| format!("SIGBUS registration: {e}"))?,
        );
        Ok(m)
    }

    /// True once a SIGBUS in this range was turned into zero pages.
    pub fn faulted(&self) -> bool {
        self.reg.as_ref().is_some_and(|r| r.faulted())
    }
}

/// One DMA_MAP.
#[derive(Clone)]
pub struct DmaEntry {
    pub iova: u64,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// None: the client sent no descriptor (not translatable).
    pub map: Option<Arc<Mapping>>,
}

impl DmaEntry {
    fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaFault {
    /// No mapping holds the whole range.
    Unmapped,
    /// The mapping holds it, but without a descriptor (no shared memory).
    NotShared,
    /// A write to a read-only mapping (or a read of a write-only one).
    Protection,
}

/// An immutable set of mappings, sorted by IOVA and non-overlapping.
#[derive(Clone, Default)]
pub struct DmaTable {
    entries: Vec<DmaEntry>,
    bytes: u64,
}

/// A bounds-checked range of guest memory, valid while its table is borrowed.
pub struct GuestSlice<'a> {
    ptr: NonNull<u8>,
    len: usize,
    _t: std::marker::PhantomData<&'a DmaTable>,
}

impl GuestSlice<'_> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The host address (for zero-copy I/O while the table is held).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Copy the range into `buf` (its first `min(len)` bytes).
    pub fn read_to(&self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.len);
        // SAFETY: [ptr, ptr+len) is mapped while the table is borrowed, and n <= len.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), buf.as_mut_ptr(), n) };
        n
    }
    /// Copy `buf.len()` bytes (at most what is left) from offset `off` of the range.
    pub fn read_at(&self, off: usize, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.len.saturating_sub(off));
        // SAFETY: off + n <= len, so [ptr+off, ptr+off+n) is inside the mapped range.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), buf.as_mut_ptr(), n) };
        n
    }
    /// Copy `data` (at most what is left) to offset `off` of the range.
    pub fn write_at(&self, off: usize, data: &[u8]) -> usize {
        let n = data.len().min(self.len.saturating_sub(off));
        // SAFETY: off + n <= len, inside the mapped range; translate checked the mapping
        // is writable when the slice was asked for with `write`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), n) };
        n
    }
    /// Zero the range from offset `off` to its end.
    pub fn zero_from(&self, off: usize) {
        if off < self.len {
            // SAFETY: [ptr+off, ptr+len) is inside the mapped range.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off), 0, self.len - off) };
        }
    }
    /// The 32-bit word at `off` as an atomic (a doorbell, an event index, a completion
    /// entry's last dword), if it lies inside the range and is 4-byte aligned.
    pub fn atomic_u32(&self, off: usize) -> Option<&std::sync::atomic::AtomicU32> {
        if off.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in range (checked above); the pointer is checked for alignment below.
        let p = unsafe { self.ptr.as_ptr().add(off) };
        if !(p as usize).is_multiple_of(4) {
            return None;
        }
        // SAFETY: 4 aligned bytes of shared memory mapped while the table is borrowed
        // (the lifetime ties the reference to this slice); other agents (the guest) access
        // it concurrently, which is what atomics are for.
        Some(unsafe { std::sync::atomic::AtomicU32::from_ptr(p.cast()) })
    }
    /// Copy `data` into the range (its first `min(len)` bytes).
    pub fn write_from(&self, data: &[u8]) -> usize {
        let n = data.len().min(self.len);
        // SAFETY: as in read_to; translate checked the mapping is writable.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), n) };
        n
    }
}

impl DmaTable {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn entries(&self) -> &[DmaEntry] {
        &self.entries
    }

    /// The entry holding `iova`, if any.
    fn find(&self, iova: u64) -> Option<&DmaEntry> {
        let i = self.entries.partition_point(|e| e.iova <= iova);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (iova < e.end()).then_some(e)
    }

    /// `len` bytes at `iova`, all inside one mapping that allows the access.
    pub fn translate(
        &self,
        iova: u64,
        len: usize,
        write: bool,
    ) -> Result<GuestSlice<'_>, DmaFault> {
        let e = self.find(iova).ok_or(DmaFault::Unmapped)?;
        let end = iova.checked_add(len as u64).ok_or(DmaFault::Unmapped)?;
        if end > e.end() {
            return Err(DmaFault::Unmapped);
        }
        if (write && !e.writable) || (!write && !e.readable) {
            return Err(DmaFault::Protection);
        }
        let m = e.map.as_ref().ok_or(DmaFault::NotShared)?;
        let off = (iova - e.iova) as usize;
        // off + len <= e.size == m.len, so the pointer stays inside the mapping.
        let ptr = NonNull::new(m.ptr.as_ptr().wrapping_add(off)).ok_or(DmaFault::Unmapped)?;
        Ok(GuestSlice {
            ptr,
            len,
            _t: std::marker::PhantomData,
        })
    }

    /// A table with `e` added (checked: alignment, overlap, limits).
    fn with(&self, e: DmaEntry) -> Result<DmaTable, (Errno, String)> {
        if self.entries.len() >= MAX_DMA_MAPS {
            return Err((
                ENOSPC,
                format!(
                    "{} DMA mappings already (at most {MAX_DMA_MAPS})",
                    self.entries.len()
                ),
            ));
        }
        let bytes = self
            .bytes
            .checked_add(e.size)
            .filter(|&b| b <= MAX_DMA_BYTES)
            .ok_or_else(|| {
                (
                    ENOSPC,
                    format!(
                        "mapping {:#x} more bytes would exceed {MAX_DMA_BYTES:#x} ({:#x} mapped)",
                        e.size, self.bytes
                    ),
                )
            })?;
        let i = self.entries.partition_point(|x| x.iova < e.iova);
        let overlaps =
            |x: Option<&DmaEntry>| x.is_some_and(|x| x.iova < e.end() && e.iova < x.end());
        if overlaps(i.checked_sub(1).and_then(|j| self.entries.get(j)))
            || overlaps(self.entries.get(i))
        {
            return Err((
                EEXIST,
                format!(
                    "DMA range [{:#x}, {:#x}) overlaps an existing mapping",
                    e.iova,
                    e.end()
                ),
            ));
        }
        let mut entries = Vec::with_capacity(self.entries.len() + 1);
        entries.extend_from_slice(&self.entries[..i]);
        entries.push(e);
        entries.extend_from_slice(&self.entries[i..]);
        Ok(DmaTable { entries, bytes })
    }
}

/// The published table of one client, shared by its session and the controller's
/// queues.
pub struct DmaSpace {
    cur: Mutex<Arc<DmaTable>>,
    gen: AtomicU64,
}

impl Default for DmaSpace {
    fn default() -> Self {
        DmaSpace::new()
    }
}

impl DmaSpace {
    pub fn new() -> DmaSpace {
        DmaSpace {
            cur: Mutex::new(Arc::new(DmaTable::default())),
            gen: AtomicU64::new(0),
        }
    }

    /// The current table (hold it for as long as its slices are used).
    pub fn load(&self) -> Arc<DmaTable> {
        self.cur.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Bumped by every map and unmap: a user whose table is older reloads.
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    fn publish(&self, t: DmaTable) {
        *self.cur.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(t);
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    /// DMA_MAP. `fd` is owned (closed when this returns, the mapping keeps its pages).
    pub fn map(
        &self,
        flags: u32,
        iova: u64,
        size: u64,
        offset: u64,
        fd: Option<OwnedFd>,
    ) -> Result<(), (Errno, String)> {
        use crate::proto::{DMA_MAP_READ, DMA_MAP_WRITE};
        if flags & !(DMA_MAP_READ | DMA_MAP_WRITE) != 0 {
            return Err((EINVAL, format!("DMA_MAP flags {flags:#x}")));
        }
        if size == 0
            || !iova.is_multiple_of(PGSIZE)
            || !size.is_multiple_of(PGSIZE)
            || !offset.is_multiple_of(PGSIZE)
        {
            return Err((
                EINVAL,
                format!("DMA_MAP iova {iova:#x} size {size:#x} offset {offset:#x}: not 4 KiB aligned, or empty"),
            ));
        }
        if iova.checked_add(size).is_none() {
            return Err((
                EINVAL,
                format!("DMA_MAP iova {iova:#x} + size {size:#x} overflows"),
            ));
        }
        let cur = self.load();
        let readable = flags & DMA_MAP_READ != 0;
        let writable = flags & DMA_MAP_WRITE != 0;
        // Check the table's limits and overlaps before mapping anything.
        let probe = DmaEntry {
            iova,
            size,
            readable,
            writable,
            map: None,
        };
        cur.with(probe.clone())?;
        let map = match fd {
            Some(fd) => Some(Arc::new(
                Mapping::new(&fd, offset, size, writable).map_err(|e| (EFAULT, e))?,
            )),
            None => None,
        };
        let t = cur.with(DmaEntry { map, ..probe })?;
        self.publish(t);
        Ok(())
    }

    /// DMA_UNMAP of every mapping inside [iova, iova+size) (`all`: every mapping). A
    /// mapping only partly inside is refused (EINVAL), as the kernel's type1 IOMMU does;
    /// a range that holds no mapping unmaps nothing and succeeds, as there. Returns the
    /// bytes unmapped.
    pub fn unmap(&self, iova: u64, size: u64, all: bool) -> Result<u64, (Errno, String)> {
        let cur = self.load();
        if all {
            let n = cur.bytes;
            self.publish(DmaTable::default());
            return Ok(n);
        }
        let end = iova.checked_add(size).ok_or_else(|| {
            (
                EINVAL,
                format!("DMA_UNMAP iova {iova:#x} + size {size:#x} overflows"),
            )
        })?;
        let mut keep = Vec::with_capacity(cur.entries.len());
        let mut gone = 0u64;
        for e in &cur.entries {
            let inside = e.iova >= iova && e.end() <= end;
            let touches = e.iova < end && iova < e.end();
            if inside {
                gone += e.size;
            } else if touches {
                return Err((
                    EINVAL,
                    format!(
                        "DMA_UNMAP [{iova:#x}, {end:#x}) cuts the mapping [{:#x}, {:#x})",
                        e.iova,
                        e.end()
                    ),
                ));
            } else {
                keep.push(e.clone());
            }
        }
        if gone > 0 {
            self.publish(DmaTable {
                entries: keep,
                bytes: cur.bytes - gone,
            });
        }
        Ok(gone)
    }

    /// Forget every mapping (the client is gone).
    pub fn clear(&self) {
        self.publish(DmaTable::default());
    }
}

/// A memfd of `size` bytes, for tests.
#[cfg(test)]
pub(crate) fn tests_memfd(size: u64) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our descriptor.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    fd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(size: u64) -> OwnedFd {
        tests_memfd(size)
    }

    #[test]
    fn map_translate_unmap() {
        let s = DmaSpace::new();
        s.map(3, 0x10000, 0x4000, 0, Some(memfd(0x4000))).unwrap();
        let t = s.load();
        let g = t.translate(0x10ff0, 16, true).unwrap();
        assert_eq!(g.write_from(b"0123456789abcdef"), 16);
        let mut b = [0u8; 4];
        t.translate(0x10ff4, 4, false).unwrap().read_to(&mut b);
        assert_eq!(&b, b"4567");
        // Past the end, before the start, wrapping.
        assert_eq!(
            t.translate(0x13ff0, 17, false).err(),
            Some(DmaFault::Unmapped)
        );
        assert_eq!(
            t.translate(0xfff0, 4, false).err(),
            Some(DmaFault::Unmapped)
        );
        assert_eq!(
            t.translate(u64::MAX - 2, 8, false).err(),
            Some(DmaFault::Unmapped)
        );
        // Overlap, misalignment, past the file's end.
        assert_eq!(s.map(3, 0x13000, 0x2000, 0, None).unwrap_err().0, EEXIST);
        assert_eq!(s.map(3, 0x20001, 0x1000, 0, None).unwrap_err().0, EINVAL);
        assert_eq!(
            s.map(3, 0x20000, 0x2000, 0x4000, Some(memfd(0x4000)))
                .unwrap_err()
                .0,
            EFAULT
        );
        // A read-only mapping refuses writes; one without fd refuses everything.
        s.map(1, 0x40000, 0x1000, 0, Some(memfd(0x1000))).unwrap();
        s.map(3, 0x50000, 0x1000, 0, None).unwrap();
        let t2 = s.load();
        assert_eq!(
            t2.translate(0x40000, 8, true).err(),
            Some(DmaFault::Protection)
        );
        assert_eq!(
            t2.translate(0x50000, 8, false).err(),
            Some(DmaFault::NotShared)
        );
        // Cutting a mapping is refused; an unmapped range is a no-op.
        assert_eq!(s.unmap(0x11000, 0x1000, false).unwrap_err().0, EINVAL);
        assert_eq!(s.unmap(0x90000, 0x1000, false).unwrap(), 0);
        let g0 = s.generation();
        assert_eq!(s.unmap(0x10000, 0x4000, false).unwrap(), 0x4000);
        assert!(s.generation() > g0);
        // The old table still holds the memory: no dangling pointer.
        t.translate(0x10ff0, 4, false).unwrap().read_to(&mut b);
        assert_eq!(&b, b"0123");
        assert_eq!(
            s.load().translate(0x10ff0, 4, false).err(),
            Some(DmaFault::Unmapped)
        );
        s.unmap(0, 0, true).unwrap();
        assert!(s.load().is_empty());
    }

    #[test]
    fn too_many_maps() {
        let s = DmaSpace::new();
        for i in 0..MAX_DMA_MAPS as u64 {
            s.map(3, i * PGSIZE, PGSIZE, 0, None).unwrap();
        }
        let e = s
            .map(3, (MAX_DMA_MAPS as u64 + 1) * PGSIZE, PGSIZE, 0, None)
            .unwrap_err();
        assert_eq!(e.0, ENOSPC);
    }
}
