//! nvmux backends.
//!
//! * [`FileDevice`]: a regular file or a block device, driven through io_uring. O_DIRECT
//!   where the filesystem accepts it (buffered I/O with a log line where it does not),
//!   flush as `fdatasync`, FUA as `RWF_DSYNC`, deallocate as punch-hole and write zeroes
//!   as zero-range (punch-hole where zero-range is unsupported, e.g. tmpfs).
//! * [`NullDevice`]: completes every command at once and moves no data. It measures the
//!   software path, like QEMU's `null-co` and SPDK's null bdev: reads leave the buffer
//!   untouched (the reader's own memory, so nothing leaks between tenants).
//! * [`record::RecordingDevice`]: logs every change that reaches the device below it,
//!   for the power-cut simulator (`nvmux powercut`).
//! * [`rbd::RbdDevice`]: a Ceph RBD image through librbd, loaded at run time (see
//!   [`rbd`] for the command mapping and the threading rule).
//! * [`MemoryDevice`]: RAM. A memfd served by the file path; its contents vanish with the
//!   daemon.
//!
//! Files on memory filesystems (tmpfs, ramfs, memfd) are served by synchronous copies in
//! the worker thread instead of io_uring, which would hand each request to an io-wq
//! kernel thread (see `sync.rs`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nvmux_core::{
    BlockDevice, BlockQueue, DeviceInfo, Error, ErrorKind, IoCommand, Opcode, Result, Status,
};

pub mod rbd;
pub mod record;
pub mod split;
mod sync;
mod uring;
pub use nvmux_core::fileops::{device_bytes, zero_range, zero_range_allocated};
pub use uring::leaked_commands;

/// Largest transfer of one command the backends accept (bytes).
pub const MAX_TRANSFER: u32 = 32 << 20;

fn check_block_size(bs: u32) -> Result<()> {
    if bs == 512 || bs == 4096 {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("block size {bs} is not supported (use 512 or 4096)"),
        ))
    }
}

fn check_size(size: u64, bs: u32, what: &str) -> Result<u64> {
    if size == 0 || !size.is_multiple_of(bs as u64) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("{what}: size {size} is not a positive multiple of the block size {bs}"),
        ));
    }
    Ok(size / bs as u64)
}

/// How to open a file backend.
#[derive(Clone, Debug)]
pub struct FileOptions {
    /// Logical block size; default 512 (or the device's own for a block device).
    pub block_size: Option<u32>,
    /// Size in bytes. A missing regular file is created with this size (sparse). An
    /// existing file smaller than this is grown; a larger one is refused.
    pub size: Option<u64>,
    pub read_only: bool,
    /// Try O_DIRECT first (default true).
    pub direct: bool,
    /// Create a missing regular file (default true). Reopening a known disk passes
    /// false, so a vanished image is an error, never a fresh empty disk.
    pub create: bool,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            block_size: None,
            size: None,
            read_only: false,
            direct: true,
            create: true,
        }
    }
}

/// A file or block device served through io_uring.
pub struct FileDevice {
    file: Arc<File>,
    path: PathBuf,
    info: DeviceInfo,
    direct: bool,
    block_dev: bool,
    /// Cleared when the filesystem rejects FALLOC_FL_ZERO_RANGE; then write zeroes punch.
    zero_range: Arc<AtomicBool>,
    /// On a memory filesystem (tmpfs, ramfs, memfd): the worker copies synchronously.
    memory_fs: bool,
    /// Sticky error state, shared by every device open on the same file.
    health: Arc<Health>,
}

/// The sticky error state of a file ("fsyncgate"): once a flush, or a write with a media
/// error, fails, nobody knows which written pages reached the disk (Linux marks the
/// pages of a failed writeback clean, so the next fsync succeeds). From then on every
/// flush and write of the file fails (*write fault*) until the daemon opens it again
/// (restart). Reads still work.
#[derive(Default)]
pub struct Health {
    failed: AtomicBool,
    why: std::sync::Mutex<Option<String>>,
    /// Test fault `fsync-error:<file name>`: the next flush fails.
    fault_flush: AtomicBool,
}

impl Health {
    /// Why the file is failed, if it is.
    pub fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.why
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_default(),
        )
    }

    fn fail(&self, path: &Path, why: String) {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            *w = Some(why.clone());
        }
        drop(w);
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!(
                path = %path.display(),
                "{why}: every later write and flush of this file fails until the daemon is restarted"
            );
        }
    }
}

/// Open files' health, by path: every device on one file shares it, and the daemon
/// asks it by path ([`failure_of`]).
fn health_registry(
) -> &'static std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<Health>>> {
    static R: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<PathBuf, std::sync::Weak<Health>>>,
    > = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

fn health_for(path: &Path) -> Arc<Health> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut r = health_registry().lock().unwrap_or_else(|e| e.into_inner());
    r.retain(|_, w| w.strong_count() > 0);
    if let Some(h) = r.get(&key).and_then(|w| w.upgrade()) {
        return h;
    }
    let h = Arc::new(Health::default());
    h.fault_flush.store(
        path.file_name()
            .is_some_and(|n| nvmux_core::fault::armed("fsync-error", &n.to_string_lossy())),
        Ordering::Release,
    );
    r.insert(key, Arc::downgrade(&h));
    h
}

/// Why the file at `path` is failed (see [`Health`]), if a device open on it is.
pub fn failure_of(path: &Path) -> Option<String> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let r = health_registry().lock().unwrap_or_else(|e| e.into_inner());
    r.get(&key)?.upgrade()?.failure()
}

/// A file queue that keeps its file's [`Health`]: it fails writes and flushes once the
/// file is failed, and fails the file on a failed flush or a write's media error.
struct StickyQueue {
    inner: Box<dyn BlockQueue>,
    health: Arc<Health>,
    path: Arc<PathBuf>,
    ready: VecDeque<(IoCommand, Status)>,
}

impl BlockQueue for StickyQueue {
    fn submit(&mut self, cmd: IoCommand) {
        let op = cmd.opcode;
        if op == Opcode::Flush || op.is_write() {
            if self.health.failed.load(Ordering::Acquire) {
                self.ready.push_back((cmd, Status::WRITE_FAULT));
                return;
            }
            if op == Opcode::Flush && self.health.fault_flush.swap(false, Ordering::AcqRel) {
                self.health.fail(
                    &self.path,
                    "fdatasync failed: EIO (injected test fault fsync-error)".into(),
                );
                self.ready.push_back((cmd, Status::WRITE_FAULT));
                return;
            }
        }
        self.inner.submit(cmd);
    }
    fn kick(&mut self) {
        self.inner.kick();
    }
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let mut n = 0;
        while let Some((c, s)) = self.ready.pop_front() {
            done(c, s);
            n += 1;
        }
        let (health, path) = (&self.health, &self.path);
        n + self.inner.poll(&mut |c, mut s| {
            let op = c.opcode;
            if !s.is_ok() && (op == Opcode::Flush || (op.is_write() && s == Status::WRITE_FAULT)) {
                health.fail(path, format!("a {op:?} failed: {s}"));
            } else if s.is_ok() && op == Opcode::Flush && health.failed.load(Ordering::Acquire) {
                // It may not cover what a failed write lost.
                s = Status::WRITE_FAULT;
            }
            done(c, s);
        })
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.ready.len()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.completion_fd()
    }
    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.inner.next_deadline()
    }
    fn wait_fds(&self, out: &mut Vec<std::os::fd::RawFd>) {
        self.inner.wait_fds(out)
    }
    fn take_fds_changed(&mut self) -> bool {
        self.inner.take_fds_changed()
    }
    fn busy_poll(&self) -> bool {
        self.inner.busy_poll()
    }
    fn may_sleep(&self) -> bool {
        self.ready.is_empty() && self.inner.may_sleep()
    }
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// True if `file` lives on tmpfs or ramfs (memfds are tmpfs files).
fn on_memory_fs(file: &File) -> bool {
    // SAFETY: statfs is plain data; fstatfs writes into it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out pointer.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    r == 0 && matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

const BLKSSZGET: libc::c_ulong = 0x1268;

impl FileDevice {
    pub fn open(path: &Path, opts: &FileOptions) -> Result<Self> {
        let ctx = |e: std::io::Error| Error::io(format!("file {}", path.display()), e);
        let meta = std::fs::metadata(path);
        let exists = meta.is_ok();
        let block_dev = meta
            .as_ref()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        // Validate an explicit size before anything is created.
        if let Some(sz) = opts.size {
            let bs = opts.block_size.unwrap_or(512);
            check_block_size(bs)?;
            check_size(sz, bs, &path.display().to_string())?;
        }
        if !exists && !opts.create {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "{} does not exist (refusing to create an empty disk in its place)",
                    path.display()
                ),
            ));
        }
        if !exists && opts.size.is_none() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "file {} does not exist; give a size to create it",
                    path.display()
                ),
            ));
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!opts.read_only);
            if !block_dev && !opts.read_only && opts.create {
                o.create(true);
            }
            o.custom_flags(if direct { libc::O_DIRECT } else { 0 } | libc::O_CLOEXEC);
            o.open(path)
        };
        let (file, direct) = match open(opts.direct) {
            Ok(f) => (f, opts.direct),
            Err(e) if opts.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "O_DIRECT refused by the filesystem; falling back to buffered I/O"
                );
                (open(false).map_err(ctx)?, false)
            }
            Err(e) => return Err(ctx(e)),
        };
        let cur_size = device_bytes(&file).map_err(ctx)?;
        let dev_bs = if block_dev {
            let mut bs: libc::c_int = 0;
            // SAFETY: the ioctl writes an int into the provided, valid location.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut bs) } != 0 {
                return Err(ctx(std::io::Error::last_os_error()));
            }
            Some(bs as u32)
        } else {
            None
        };
        let bs = opts.block_size.or(dev_bs).unwrap_or(512);
        check_block_size(bs)?;
        if let Some(d) = dev_bs {
            if bs < d {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "{}: block size {bs} is below the device's {d}",
                        path.display()
                    ),
                ));
            }
        }
        let size = match opts.size {
            None => cur_size,
            // Equal, or the whole file rounded down to the block size (how a file disk
            // without an explicit size was recorded).
            Some(want) if want == cur_size || want == cur_size - cur_size % bs as u64 => want,
            Some(want) if block_dev || want < cur_size => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                    "{} is {} bytes; refusing size {want} (omit the size to use the whole file)",
                    path.display(),
                    cur_size
                ),
                ))
            }
            Some(want) => {
                if opts.read_only {
                    return Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "{} is smaller than {want} bytes and read-only",
                            path.display()
                        ),
                    ));
                }
                file.set_len(want).map_err(ctx)?;
                want
            }
        };
        let num_blocks = check_size(size - size % bs as u64, bs, &path.display().to_string())?;
        let info = DeviceInfo {
            block_size: bs,
            num_blocks,
            read_only: opts.read_only,
            discard: !opts.read_only,
            write_zeroes: !opts.read_only,
            volatile_cache: true,
            max_transfer: MAX_TRANSFER,
        };
        let memory_fs = !block_dev && on_memory_fs(&file);
        Ok(FileDevice {
            file: Arc::new(file),
            path: path.to_path_buf(),
            info,
            direct,
            block_dev,
            zero_range: Arc::new(AtomicBool::new(true)),
            memory_fs,
            health: health_for(path),
        })
    }
}

impl BlockDevice for FileDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        let inner: Box<dyn BlockQueue> = if self.memory_fs {
            Box::new(sync::SyncQueue::new(
                self.file.clone(),
                self.info.block_size,
                depth,
            ))
        } else {
            Box::new(uring::UringQueue::new(
                self.file.clone(),
                self.info.block_size,
                self.direct,
                self.zero_range.clone(),
                depth,
            )?)
        };
        Ok(Box::new(StickyQueue {
            inner,
            health: self.health.clone(),
            path: Arc::new(self.path.clone()),
            ready: VecDeque::new(),
        }))
    }
    fn describe(&self) -> String {
        format!(
            "{} {} ({})",
            if self.block_dev {
                "block device"
            } else {
                "file"
            },
            self.path.display(),
            if self.memory_fs {
                "memory filesystem, synchronous copy"
            } else if self.direct {
                "O_DIRECT, io_uring"
            } else {
                "buffered, io_uring"
            }
        )
    }
}

/// Completes every command at once; moves no data.
pub struct NullDevice {
    info: DeviceInfo,
}

impl NullDevice {
    pub fn new(size: u64, block_size: u32, read_only: bool) -> Result<Self> {
        check_block_size(block_size)?;
        let num_blocks = check_size(size, block_size, "null device")?;
        Ok(NullDevice {
            info: DeviceInfo {
                block_size,
                num_blocks,
                read_only,
                discard: !read_only,
                write_zeroes: !read_only,
                volatile_cache: false,
                max_transfer: MAX_TRANSFER,
            },
        })
    }
}

struct NullQueue {
    done: VecDeque<IoCommand>,
}

impl BlockQueue for NullQueue {
    fn submit(&mut self, cmd: IoCommand) {
        self.done.push_back(cmd);
    }
    fn kick(&mut self) {}
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
        let n = self.done.len();
        while let Some(c) = self.done.pop_front() {
            done(c, Status::SUCCESS);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

impl BlockDevice for NullDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        Ok(Box::new(NullQueue {
            done: VecDeque::with_capacity(depth as usize),
        }))
    }
    fn describe(&self) -> String {
        "null".into()
    }
}

/// RAM-backed device: a memfd served by the io_uring file path.
pub struct MemoryDevice {
    inner: FileDevice,
}

impl MemoryDevice {
    pub fn new(size: u64, block_size: u32, read_only: bool) -> Result<Self> {
        check_block_size(block_size)?;
        check_size(size, block_size, "memory device")?;
        // SAFETY: the name is a valid NUL-terminated string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"nvmux-memory".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io(
                "memory device: memfd_create",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size)
            .map_err(|e| Error::io("memory device: ftruncate", e))?;
        Ok(MemoryDevice {
            inner: FileDevice {
                file: Arc::new(file),
                path: PathBuf::from("memfd"),
                info: DeviceInfo {
                    block_size,
                    num_blocks: size / block_size as u64,
                    read_only,
                    discard: !read_only,
                    write_zeroes: !read_only,
                    volatile_cache: false,
                    max_transfer: MAX_TRANSFER,
                },
                direct: false,
                block_dev: false,
                zero_range: Arc::new(AtomicBool::new(false)),
                memory_fs: true,
                // Its own: RAM has no fsync to fail, and no path to share it by.
                health: Arc::new(Health::default()),
            },
        })
    }
}

impl BlockDevice for MemoryDevice {
    fn info(&self) -> &DeviceInfo {
        self.inner.info()
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>> {
        self.inner.open_queue(depth)
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Whether this kernel's io_uring works at all (for a clear error at start-up).
pub fn probe_io_uring() -> Result<()> {
    io_uring::IoUring::new(2)
        .map(|_| ())
        .map_err(|e| Error::io("io_uring is not available", e))
}

#[cfg(test)]
mod tests;
