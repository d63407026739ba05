//! Guest memory as a vhost-user front-end hands it over, and what the front-end can do to
//! it afterwards.
//!
//! Each region arrives as a file descriptor plus an offset and a size (SET_MEM_TABLE,
//! ADD_MEM_REGION). Before anything is mapped, [`check_region`] refuses a region that is
//! empty, wraps, or reaches past the end of its file (`fstat`), and a descriptor that is
//! not a regular file (memfd, tmpfs, hugetlbfs and ordinary files are regular files; a
//! character device or a socket has no size to check against, so it is refused).
//!
//! The front-end keeps its descriptor and may shrink the file later. Whether the file is
//! sealed against shrinking (`F_SEAL_SHRINK`, QEMU's `memory-backend-memfd` default) is
//! recorded and logged, but every region is registered with the SIGBUS recovery of
//! [`nvmux_core::sigbus`] all the same: a sealed file can still fault (a hole punched in a
//! hugetlbfs file with an empty huge page pool, or in a full tmpfs). A region whose pages
//! go away becomes anonymous zero pages and raises its memory table's *faulted* flag; the
//! queues check it after every poll and fail the device (see `vring.rs`).
//!
//! Ownership: vm-memory's [`GuestRegionMmap`] unmaps on drop, and the SIGBUS registry must
//! forget a range *before* it is unmapped. A [`Memory`] therefore holds, for every region
//! it maps, the region's [`RegionGuard`] too, in a field declared (and so dropped) before
//! the map. Regions and guards are shared between successive tables (ADD_MEM_REGION builds
//! a new table from the old one) in pairs, so the last reference to a guard always goes
//! just before the last reference to its region.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvmux_core::sigbus;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// Guest memory one memory table may map (the sum of its regions' sizes): 16 TiB.
/// Mappings cost address space, not memory (a front-end's files may be sparse), but the
/// daemon has 128 TiB of it: without a bound one front-end could take it all, and every
/// later mmap or allocation of the daemon would fail.
pub const MAX_TABLE_BYTES: u64 = 16 << 40;
/// Guest memory all front-ends together may map: 64 TiB, half the address space.
pub const MAX_MAPPED_BYTES: u64 = 64 << 40;

/// Bytes of guest memory mapped now, by every export.
static MAPPED: AtomicU64 = AtomicU64::new(0);

/// Guest memory mapped now by every export (bytes).
pub fn mapped_bytes() -> u64 {
    MAPPED.load(Ordering::Relaxed)
}

/// Reserve `size` bytes of the daemon-wide mapping budget.
fn reserve(size: u64) -> Result<(), Refusal> {
    let mut cur = MAPPED.load(Ordering::Relaxed);
    loop {
        let new = cur.checked_add(size).filter(|&n| n <= MAX_MAPPED_BYTES).ok_or_else(|| {
            format!(
                "mapping {size:#x} more bytes of guest memory would exceed the daemon's {MAX_MAPPED_BYTES:#x} ({cur:#x} mapped by all exports)"
            )
        })?;
        match MAPPED.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return Ok(()),
            Err(c) => cur = c,
        }
    }
}

/// Check a table's total size against [`MAX_TABLE_BYTES`].
pub fn check_table_size(sizes: impl IntoIterator<Item = u64>) -> Result<(), Refusal> {
    let mut total = 0u64;
    for s in sizes {
        total = total.saturating_add(s);
    }
    if total > MAX_TABLE_BYTES {
        return Err(format!(
            "a memory table of {total:#x} bytes (at most {MAX_TABLE_BYTES:#x})"
        ));
    }
    Ok(())
}

/// One region as the front-end describes it.
#[derive(Clone, Copy, Debug)]
pub struct RegionDesc {
    pub gpa: u64,
    pub size: u64,
    /// The front-end's virtual address of the region (vring addresses use these).
    pub uaddr: u64,
    pub offset: u64,
}

/// Why a region was refused (the message goes to the log; the front-end gets a NACK).
pub type Refusal = String;

/// What [`check_region`] learned about the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileFacts {
    pub file_size: u64,
    /// F_SEAL_SHRINK is set: the file cannot shrink.
    pub sealed_shrink: bool,
}

/// Check a region against its descriptor before mapping it.
pub fn check_region(d: &RegionDesc, file: &File) -> Result<FileFacts, Refusal> {
    if d.size == 0 {
        return Err("a memory region of size 0".into());
    }
    let end_of = |base: u64, what: &str| {
        base.checked_add(d.size).ok_or_else(|| {
            format!(
                "memory region {what} {base:#x} + size {:#x} overflows 64 bits",
                d.size
            )
        })
    };
    end_of(d.gpa, "guest address")?;
    end_of(d.uaddr, "front-end address")?;
    let file_end = end_of(d.offset, "mmap offset")?;
    if usize::try_from(d.size).is_err() {
        return Err(format!(
            "memory region of {:#x} bytes does not fit the address space",
            d.size
        ));
    }
    // SAFETY: fstat writes a stat struct for a descriptor we hold.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(file.as_raw_fd(), &mut st) != 0 {
            return Err(format!(
                "fstat of the region's descriptor: {}",
                std::io::Error::last_os_error()
            ));
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(format!(
            "the region's descriptor is not a regular file (mode {:#o}); guest memory must be a memfd, a tmpfs/hugetlbfs file or an ordinary file",
            st.st_mode
        ));
    }
    let file_size = st.st_size.max(0) as u64;
    if file_end > file_size {
        return Err(format!(
            "memory region [{:#x}, {file_end:#x}) of its file reaches past the file's end ({file_size:#x} bytes)",
            d.offset
        ));
    }
    // SAFETY: F_GET_SEALS on a descriptor we hold; EINVAL for files that cannot be sealed.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    Ok(FileFacts {
        file_size,
        sealed_shrink: seals > 0 && seals & libc::F_SEAL_SHRINK != 0,
    })
}

/// A region's registration with the SIGBUS recovery. Dropped before its region is
/// unmapped (see the module documentation).
pub(crate) struct RegionGuard {
    _reg: sigbus::Registration,
    pub sealed_shrink: bool,
    /// Bytes reserved in [`MAPPED`], given back on drop.
    size: u64,
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        MAPPED.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// A mapped region with its guard. The guard is declared first, so it is dropped (the
/// range unregistered) before the region (possibly the last reference: unmapped).
#[derive(Clone)]
pub(crate) struct Mapped {
    pub guard: Arc<RegionGuard>,
    pub region: Arc<GuestRegionMmap>,
}

/// Map one region and register it for SIGBUS recovery; `flag` is its table's faulted
/// flag.
pub(crate) fn map_region(
    d: &RegionDesc,
    file: File,
    flag: &Arc<AtomicBool>,
) -> Result<Mapped, Refusal> {
    let facts = check_region(d, &file)?;
    reserve(d.size)?;
    let unreserve = |e: String| {
        MAPPED.fetch_sub(d.size, Ordering::AcqRel);
        e
    };
    let r = GuestRegionMmap::from_range(
        GuestAddress(d.gpa),
        d.size as usize,
        Some(FileOffset::new(file, d.offset)),
    )
    .map_err(|e| unreserve(format!("mmap guest memory: {e}")))?;
    let ptr = r
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .map_err(|e| unreserve(format!("guest memory region: {e}")))?;
    // SAFETY: `r` is our fresh mapping of r.len() bytes; the guard is dropped before the
    // region (the field order of Mapped and Memory), so the range stays mapped while
    // registered. Nothing but guest-memory accesses use it. On error `r` is unmapped
    // here, never registered.
    let reg = unsafe { sigbus::register(ptr, r.len() as usize, flag.clone()) }
        .map_err(|e| unreserve(e.to_string()))?;
    tracing::debug!(
        gpa = format_args!("{:#x}", d.gpa),
        size = d.size,
        file_size = facts.file_size,
        sealed = facts.sealed_shrink,
        "guest memory region mapped ({})",
        if facts.sealed_shrink {
            "its file is sealed against shrinking"
        } else {
            "its file is not sealed: a shrink fails the device"
        }
    );
    Ok(Mapped {
        guard: Arc::new(RegionGuard {
            _reg: reg,
            sealed_shrink: facts.sealed_shrink,
            size: d.size,
        }),
        region: Arc::new(r),
    })
}

/// One memory table: the regions, their guards, and the table's faulted flag.
pub(crate) struct Memory {
    /// Declared before `regions` and `map`: dropped (unregistered) before the regions can
    /// be unmapped. `guards[i]` belongs to `regions[i]`.
    guards: Vec<Arc<RegionGuard>>,
    regions: Vec<Arc<GuestRegionMmap>>,
    pub map: GuestMemoryMmap,
    /// Raised by the SIGBUS handler when a region of this table lost its pages.
    pub faulted: Arc<AtomicBool>,
    /// The fault was counted and logged (once per table).
    reported: Arc<AtomicBool>,
}

impl Memory {
    pub fn empty() -> Memory {
        Memory {
            guards: Vec::new(),
            regions: Vec::new(),
            map: GuestMemoryMmap::new(),
            faulted: Arc::new(AtomicBool::new(false)),
            reported: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A new table (SET_MEM_TABLE) from mapped regions; its flag is `flag`, the one the
    /// regions were registered with.
    pub fn new(mut parts: Vec<Mapped>, flag: Arc<AtomicBool>) -> Result<Memory, Refusal> {
        parts.sort_by_key(|m| m.region.start_addr());
        Self::build(parts, flag, Arc::new(AtomicBool::new(false)))
    }

    fn build(
        parts: Vec<Mapped>,
        faulted: Arc<AtomicBool>,
        reported: Arc<AtomicBool>,
    ) -> Result<Memory, Refusal> {
        let mut guards = Vec::with_capacity(parts.len());
        let mut regions = Vec::with_capacity(parts.len());
        for m in parts {
            guards.push(m.guard);
            regions.push(m.region);
        }
        match GuestMemoryMmap::from_arc_regions(regions.clone()) {
            Ok(map) => Ok(Memory {
                guards,
                regions,
                map,
                faulted,
                reported,
            }),
            Err(e) => {
                // Unregister before the regions can be unmapped.
                drop(guards);
                drop(regions);
                Err(format!("guest memory regions overlap or are empty: {e}"))
            }
        }
    }

    fn parts(&self) -> Vec<Mapped> {
        self.regions
            .iter()
            .zip(self.guards.iter())
            .map(|(r, g)| Mapped {
                guard: g.clone(),
                region: r.clone(),
            })
            .collect()
    }

    /// This table plus one region (ADD_MEM_REGION); same flag.
    pub fn with_region(&self, part: Mapped) -> Result<Memory, Refusal> {
        let mut parts = self.parts();
        parts.push(part);
        parts.sort_by_key(|m| m.region.start_addr());
        Self::build(parts, self.faulted.clone(), self.reported.clone())
    }

    /// This table without the region at `gpa` of `size` bytes (REMOVE_MEM_REGION).
    pub fn without_region(&self, gpa: u64, size: u64) -> Result<Memory, Refusal> {
        let mut parts = self.parts();
        let before = parts.len();
        parts.retain(|m| !(m.region.start_addr().0 == gpa && m.region.len() == size));
        if parts.len() == before {
            return Err(format!(
                "no memory region at {gpa:#x} of {size:#x} bytes to remove"
            ));
        }
        if parts.is_empty() {
            return Ok(Memory {
                guards: Vec::new(),
                regions: Vec::new(),
                map: GuestMemoryMmap::new(),
                faulted: self.faulted.clone(),
                reported: self.reported.clone(),
            });
        }
        Self::build(parts, self.faulted.clone(), self.reported.clone())
    }

    pub fn faulted(&self) -> bool {
        self.faulted.load(Ordering::Acquire)
    }

    /// True the first time it is called after a fault of this table (count and log once).
    pub fn take_report(&self) -> bool {
        self.faulted() && !self.reported.swap(true, Ordering::AcqRel)
    }

    /// Each region's guest address, size, offset in its file and a duplicate of the
    /// file's descriptor (for a takeover: the new process maps the same memory).
    pub fn region_files(&self) -> Vec<(u64, u64, u64, std::io::Result<File>)> {
        self.regions
            .iter()
            .map(|r| {
                let (file, offset) = match r.file_offset() {
                    Some(fo) => (fo.file().try_clone(), fo.start()),
                    None => (Err(std::io::Error::other("region has no file")), 0),
                };
                (r.start_addr().0, r.len(), offset, file)
            })
            .collect()
    }

    /// Regions, and how many of them are sealed against shrinking.
    pub fn sealed_counts(&self) -> (usize, usize) {
        (
            self.guards.len(),
            self.guards.iter().filter(|g| g.sealed_shrink).count(),
        )
    }
}

/// The current memory table of a connection, swapped by the control thread and read by
/// the queues' workers, which cache it and look for a new one with one atomic load.
pub(crate) struct MemSlot {
    gen: AtomicU64,
    cur: Mutex<Arc<Memory>>,
}

impl MemSlot {
    pub fn new() -> MemSlot {
        MemSlot {
            gen: AtomicU64::new(0),
            cur: Mutex::new(Arc::new(Memory::empty())),
        }
    }
    pub fn load(&self) -> Arc<Memory> {
        self.cur.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn store(&self, m: Memory) {
        let old = std::mem::replace(
            &mut *self.cur.lock().unwrap_or_else(|e| e.into_inner()),
            Arc::new(m),
        );
        self.gen.fetch_add(1, Ordering::AcqRel);
        // The old table is unmapped here if nothing else holds it (outside the lock).
        drop(old);
    }
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }
}

/// Export-wide counters, shown in the API and in the metrics.
#[derive(Default)]
pub struct ExportCounters {
    /// Memory tables whose backing shrank under us (each failed the device once).
    pub memory_faults: AtomicU64,
    /// The current memory table faulted: the device is failed until the front-end sends a
    /// new table.
    pub device_failed: AtomicBool,
    /// Regions refused at SET_MEM_TABLE / ADD_MEM_REGION.
    pub regions_refused: AtomicU64,
    /// Regions of the current table, and how many are sealed against shrinking.
    pub regions: AtomicU64,
    pub regions_sealed: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64, seal: bool) -> File {
        let flags = libc::MFD_CLOEXEC | if seal { libc::MFD_ALLOW_SEALING } else { 0 };
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let fd = unsafe { libc::memfd_create(c"vhost-mem-test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let f: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        if seal {
            // SAFETY: fcntl on our memfd.
            assert_eq!(
                unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
                0
            );
        }
        f
    }

    fn desc(gpa: u64, size: u64, offset: u64) -> RegionDesc {
        RegionDesc {
            gpa,
            size,
            uaddr: 0x7f00_0000_0000 + gpa,
            offset,
        }
    }

    #[test]
    fn regions_are_checked_against_their_file() {
        let f = memfd(1 << 20, false);
        assert_eq!(
            check_region(&desc(0, 1 << 20, 0), &f),
            Ok(FileFacts {
                file_size: 1 << 20,
                sealed_shrink: false
            })
        );
        let e = check_region(&desc(0, 1 << 20, 4096), &f).unwrap_err();
        assert!(e.contains("past the file's end"), "{e}");
        let e = check_region(&desc(0, 2 << 20, 0), &f).unwrap_err();
        assert!(e.contains("past the file's end"), "{e}");
        assert!(check_region(&desc(0, 0, 0), &f)
            .unwrap_err()
            .contains("size 0"));
        assert!(check_region(&desc(0, 4096, u64::MAX - 10), &f)
            .unwrap_err()
            .contains("overflows"));
        assert!(check_region(&desc(u64::MAX - 10, 4096, 0), &f)
            .unwrap_err()
            .contains("overflows"));
        let s = memfd(1 << 20, true);
        assert!(
            check_region(&desc(0, 1 << 20, 0), &s)
                .unwrap()
                .sealed_shrink
        );
        // A pipe is not a file with a size.
        let mut p = [0; 2];
        // SAFETY: pipe writes two descriptors we then own.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors we own.
        let (r, _w): (File, File) = unsafe {
            (
                std::os::fd::FromRawFd::from_raw_fd(p[0]),
                std::os::fd::FromRawFd::from_raw_fd(p[1]),
            )
        };
        assert!(check_region(&desc(0, 4096, 0), &r)
            .unwrap_err()
            .contains("not a regular file"));
    }

    #[test]
    fn mapped_guest_memory_is_bounded() {
        assert!(check_table_size([MAX_TABLE_BYTES]).is_ok());
        assert!(check_table_size([MAX_TABLE_BYTES, 1]).is_err());
        assert!(check_table_size([u64::MAX, u64::MAX]).is_err());
        // The daemon-wide budget: a region that would overflow it is refused before
        // anything is mapped, and a mapped region gives its bytes back when it goes.
        let f = memfd(64 << 10, false);
        let flag = Arc::new(AtomicBool::new(false));
        let m = map_region(&desc(0, 64 << 10, 0), f.try_clone().unwrap(), &flag).unwrap();
        assert!(mapped_bytes() >= 64 << 10);
        assert!(reserve(MAX_MAPPED_BYTES).is_err());
        drop(m);
    }

    #[test]
    fn tables_fault_once_and_regions_survive_edits() {
        let f = memfd(64 << 10, false);
        let g = memfd(64 << 10, true);
        let flag = Arc::new(AtomicBool::new(false));
        let a = map_region(&desc(0, 64 << 10, 0), f.try_clone().unwrap(), &flag).unwrap();
        let m = Memory::new(vec![a], flag.clone()).unwrap();
        let b = map_region(&desc(1 << 20, 64 << 10, 0), g.try_clone().unwrap(), &flag).unwrap();
        let m2 = m.with_region(b).unwrap();
        assert_eq!(m2.sealed_counts(), (2, 1));
        // Overlap is refused, and nothing stays registered or mapped.
        let c = map_region(&desc(32 << 10, 64 << 10, 0), f.try_clone().unwrap(), &flag).unwrap();
        match m2.with_region(c) {
            Ok(_) => panic!("overlapping regions accepted"),
            Err(e) => assert!(e.contains("overlap"), "{e}"),
        }
        drop(m);
        // The first region is still mapped and registered through m2: shrink its file.
        f.set_len(0).unwrap();
        use vm_memory::GuestMemoryBackend;
        let r = m2.map.find_region(GuestAddress(0)).unwrap();
        let p = r
            .get_host_address(vm_memory::MemoryRegionAddress(4096))
            .unwrap();
        // SAFETY: inside the mapped region (recovered to a zero page).
        assert_eq!(unsafe { std::ptr::read_volatile(p) }, 0);
        assert!(m2.faulted());
        assert!(m2.take_report());
        assert!(!m2.take_report(), "reported once");
        let m3 = m2.without_region(0, 64 << 10).unwrap();
        assert_eq!(m3.sealed_counts(), (1, 1));
        assert!(m3.faulted(), "the table keeps its flag");
        assert!(m2.without_region(0, 4096).is_err());
    }
}
