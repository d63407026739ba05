//! nvmux core: the one language every room speaks.
//!
//! * [`IoCommand`]: an NVMe NVM command-set command (read, write, flush, write zeroes,
//!   deallocate) with its scatter-gather list.
//! * [`Status`]: an NVMe completion status (status code type + status code).
//! * [`BlockDevice`] / [`BlockQueue`]: the asynchronous device abstraction. A device hands
//!   out one queue per worker; a queue is owned by one thread and takes no lock.
//! * [`worker`]: the adaptive poll-then-sleep worker threads that drive queues.
//! * [`stats`]: per-queue I/O counters and latency histograms, cheap on the hot path.
//!
//! ```text
//!  frontend (vhost, nvmf, nbd)            BlockQueue (one per worker)
//!  ──────────────────────────             ───────────────────────────
//!  parse wire request ─► IoCommand ─► submit() ... kick() ─► device
//!  map Status to wire ◄─ (IoCommand, Status) ◄─ poll() ◄──── completion
//! ```
//! The command (and the buffers its SG list points to) belongs to the queue from
//! `submit` until `poll` hands it back: a frontend can never reuse a buffer that the
//! kernel may still be writing.

use std::fmt;
use std::os::fd::RawFd;
use std::sync::Arc;

pub mod alloc_count;
pub mod anon;
pub mod budget;
pub mod crc32c;
pub mod ctlpoll;
pub mod engine;
pub mod eventfd;
pub mod fault;
pub mod fileops;
pub mod record;
pub mod sigbus;
pub mod stats;
pub mod unixsock;
pub mod worker;

/// The byte stream under a network frontend's connection (NVMe/TCP, NBD): a socket in
/// the daemon, an in-memory pipe in fuzz harnesses. Non-blocking: `WouldBlock` when
/// nothing can move now; `recv` of 0 is end of stream.
pub trait Wire: Send {
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn send(&mut self, buf: &[u8]) -> std::io::Result<usize>;
    /// Send from several buffers in order, in one system call where the wire allows
    /// (a socket's writev); by default the first non-empty buffer alone.
    fn send_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(b) => self.send(b),
            None => Ok(0),
        }
    }
    /// The socket to wait on, if there is one.
    fn fd(&self) -> Option<RawFd>;
}

macro_rules! socket_wire {
    ($t:ty) => {
        impl Wire for $t {
            fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                std::io::Read::read(self, buf)
            }
            fn send(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                std::io::Write::write(self, buf)
            }
            fn send_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
                std::io::Write::write_vectored(self, bufs)
            }
            fn fd(&self) -> Option<RawFd> {
                Some(std::os::fd::AsRawFd::as_raw_fd(self))
            }
        }
    };
}
socket_wire!(std::net::TcpStream);
socket_wire!(std::os::unix::net::UnixStream);

/// NVM command-set opcodes nvmux understands. Values are the NVMe opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Flush = 0x00,
    Write = 0x01,
    Read = 0x02,
    WriteZeroes = 0x08,
    /// Dataset Management with the deallocate attribute (one range per command).
    Deallocate = 0x09,
}

impl Opcode {
    /// True for commands that move data between the device and the SG list.
    pub fn has_data(self) -> bool {
        matches!(self, Opcode::Read | Opcode::Write)
    }
    /// True for commands that modify the medium.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Opcode::Write | Opcode::WriteZeroes | Opcode::Deallocate
        )
    }
}

/// An NVMe completion status: status code type and status code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
}

impl Status {
    pub const fn new(sct: u8, sc: u8) -> Self {
        Status { sct, sc }
    }
    pub const SUCCESS: Status = Status::new(0, 0x00);
    pub const INVALID_OPCODE: Status = Status::new(0, 0x01);
    pub const INVALID_FIELD: Status = Status::new(0, 0x02);
    pub const DATA_TRANSFER_ERROR: Status = Status::new(0, 0x04);
    pub const INTERNAL_ERROR: Status = Status::new(0, 0x06);
    pub const ABORTED: Status = Status::new(0, 0x07);
    pub const INVALID_NAMESPACE: Status = Status::new(0, 0x0b);
    /// The namespace cannot serve the command now (an external function is detached).
    pub const NAMESPACE_NOT_READY: Status = Status::new(0, 0x82);
    pub const LBA_OUT_OF_RANGE: Status = Status::new(0, 0x80);
    pub const CAPACITY_EXCEEDED: Status = Status::new(0, 0x81);
    /// Command specific: attempted write to a read-only range / namespace.
    pub const WRITE_PROTECTED: Status = Status::new(1, 0x82);
    /// Media error: write fault.
    pub const WRITE_FAULT: Status = Status::new(2, 0x80);
    /// Media error: unrecovered read error.
    pub const UNRECOVERED_READ: Status = Status::new(2, 0x81);

    pub fn is_ok(self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// The NVMe status field as it appears in a completion queue entry (bits 1..15, without
    /// the phase tag): SC in bits 1..8, SCT in bits 9..11.
    pub fn to_cqe_bits(self) -> u16 {
        ((self.sc as u16) << 1) | (((self.sct & 0x7) as u16) << 9)
    }

    /// Map an errno from a backend system call to the closest NVMe status.
    pub fn from_errno(errno: i32, op: Opcode) -> Status {
        match errno {
            libc::ENOSPC | libc::EDQUOT => Status::CAPACITY_EXCEEDED,
            libc::EROFS | libc::EPERM | libc::EACCES => Status::WRITE_PROTECTED,
            libc::EOPNOTSUPP | libc::EINVAL => Status::INVALID_FIELD,
            libc::ECANCELED => Status::ABORTED,
            _ if op == Opcode::Read => Status::UNRECOVERED_READ,
            _ if op.is_write() => Status::WRITE_FAULT,
            _ => Status::INTERNAL_ERROR,
        }
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Status::SUCCESS => "success",
            Status::INVALID_OPCODE => "invalid opcode",
            Status::INVALID_FIELD => "invalid field",
            Status::DATA_TRANSFER_ERROR => "data transfer error",
            Status::INTERNAL_ERROR => "internal error",
            Status::ABORTED => "aborted",
            Status::INVALID_NAMESPACE => "invalid namespace",
            Status::NAMESPACE_NOT_READY => "namespace not ready",
            Status::LBA_OUT_OF_RANGE => "LBA out of range",
            Status::CAPACITY_EXCEEDED => "capacity exceeded",
            Status::WRITE_PROTECTED => "write to read-only",
            Status::WRITE_FAULT => "write fault",
            Status::UNRECOVERED_READ => "unrecovered read error",
            _ => "",
        };
        write!(f, "sct={:#x} sc={:#04x} ({name})", self.sct, self.sc)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One contiguous buffer segment (same layout as `struct iovec`).
pub type IoVec = libc::iovec;

/// A scatter-gather list. Frontends keep a pool of these and reuse them, so filling one
/// does not allocate once its capacity has grown to the largest request seen.
pub struct SgList {
    iov: Vec<IoVec>,
    len: u64,
}

// SAFETY: an SgList only carries addresses; the memory they point to is kept alive by the
// command's owner (`IoCommand::keepalive`), and a command is used by one thread at a time.
unsafe impl Send for SgList {}

impl Default for SgList {
    fn default() -> Self {
        Self::with_capacity(4)
    }
}

impl SgList {
    pub fn with_capacity(n: usize) -> Self {
        SgList {
            iov: Vec::with_capacity(n),
            len: 0,
        }
    }
    /// An empty list that has allocated nothing (for commands without data: it costs no
    /// allocation to make or to drop).
    pub const fn empty() -> Self {
        SgList {
            iov: Vec::new(),
            len: 0,
        }
    }
    /// Segments the list holds without allocating.
    pub fn capacity(&self) -> usize {
        self.iov.capacity()
    }
    pub fn clear(&mut self) {
        self.iov.clear();
        self.len = 0;
    }
    /// Append a segment. Zero-length segments are skipped.
    pub fn push(&mut self, base: *mut u8, len: usize) {
        if len == 0 {
            return;
        }
        self.iov.push(IoVec {
            iov_base: base.cast(),
            iov_len: len,
        });
        self.len += len as u64;
    }
    /// Total byte length.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn segments(&self) -> &[IoVec] {
        &self.iov
    }
    /// Drop the first `n` bytes (after a short transfer, to resubmit the rest).
    pub fn advance(&mut self, mut n: usize) {
        let mut drop = 0;
        for v in self.iov.iter_mut() {
            if n == 0 {
                break;
            }
            let take = n.min(v.iov_len);
            // SAFETY: take <= iov_len, so the new base stays inside the same segment.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(take) }.cast();
            v.iov_len -= take;
            self.len -= take as u64;
            n -= take;
            if v.iov_len == 0 {
                drop += 1;
            }
        }
        self.iov.drain(..drop);
    }
    /// True if every segment's address and length are multiples of `align`.
    pub fn is_aligned(&self, align: usize) -> bool {
        let mask = align - 1;
        self.iov
            .iter()
            .all(|v| (v.iov_base as usize) & mask == 0 && v.iov_len & mask == 0)
    }
    /// Copy from the segments into `dst` (which must be `len()` bytes or shorter).
    ///
    /// # Safety
    /// Every segment must point at readable memory of its length.
    pub unsafe fn copy_to(&self, dst: &mut [u8]) {
        let mut off = 0;
        for v in &self.iov {
            if off >= dst.len() {
                break;
            }
            let n = v.iov_len.min(dst.len() - off);
            // SAFETY: caller guarantees the segment is readable; dst has n bytes at off.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, dst[off..].as_mut_ptr(), n)
            };
            off += n;
        }
    }
    /// The `len` bytes starting `off` bytes into this list, as a list of their own
    /// (clamped to the end). Allocates; the I/O path uses [`SgList::slice_into`].
    pub fn slice(&self, off: u64, len: u64) -> SgList {
        let mut out = SgList::with_capacity(2);
        self.slice_into(off, len, &mut out);
        out
    }
    /// Like [`SgList::slice`], into `out` (cleared first), which keeps its capacity: no
    /// allocation once `out` has held as many segments.
    pub fn slice_into(&self, mut off: u64, mut len: u64, out: &mut SgList) {
        out.clear();
        for v in &self.iov {
            if len == 0 {
                break;
            }
            let l = v.iov_len as u64;
            if off >= l {
                off -= l;
                continue;
            }
            let n = (l - off).min(len);
            // The pointer stays inside segment `v` (off + n <= its length).
            out.push(
                v.iov_base.cast::<u8>().wrapping_add(off as usize),
                n as usize,
            );
            len -= n;
            off = 0;
        }
    }
    /// Fill the segments with zeroes.
    ///
    /// # Safety
    /// Every segment must point at writable memory of its length.
    pub unsafe fn zero(&self) {
        for v in &self.iov {
            // SAFETY: the caller guarantees the segment is writable.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
    }
    /// Copy `src` into the segments.
    ///
    /// # Safety
    /// Every segment must point at writable memory of its length.
    pub unsafe fn copy_from(&self, src: &[u8]) {
        let mut off = 0;
        for v in &self.iov {
            if off >= src.len() {
                break;
            }
            let n = v.iov_len.min(src.len() - off);
            // SAFETY: caller guarantees the segment is writable; src has n bytes at off.
            unsafe { std::ptr::copy_nonoverlapping(src[off..].as_ptr(), v.iov_base as *mut u8, n) };
            off += n;
        }
    }
}

/// A zero-filled, 4096-aligned heap buffer: what O_DIRECT needs from memory the guest did
/// not provide (bounce, copy-on-write and encryption buffers).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub const ALIGN: usize = 4096;

    /// `len` bytes (at least 1), or `None` if the allocation fails.
    pub fn try_new(len: usize) -> Option<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        std::ptr::NonNull::new(ptr).map(|ptr| AlignedBuf { ptr, layout })
    }

    /// Like `try_new`, but out of memory aborts, as a `Vec` does.
    pub fn new(len: usize) -> AlignedBuf {
        Self::try_new(len).unwrap_or_else(|| {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len.max(1), Self::ALIGN)
                    .unwrap_or(std::alloc::Layout::new::<u8>()),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (allocated zeroed in `try_new`) while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points at `len()` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    /// `len` bytes from `off` as an SG list (clamped to the buffer).
    pub fn sg(&self, off: usize, len: usize) -> SgList {
        let off = off.min(self.len());
        let mut sg = SgList::with_capacity(1);
        sg.push(
            self.ptr.as_ptr().wrapping_add(off),
            len.min(self.len() - off),
        );
        sg
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `try_new` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Keeps the memory an SG list points into alive until the command completes (for
/// example a guest memory mapping that the VM may replace meanwhile).
pub type KeepAlive = Arc<dyn Send + Sync>;

/// One I/O command with NVMe NVM semantics.
pub struct IoCommand {
    pub opcode: Opcode,
    /// Namespace id (1-based, as in NVMe). Frontends with one disk per connection use 1.
    pub nsid: u32,
    /// Starting LBA, in units of the device's block size.
    pub slba: u64,
    /// Number of blocks (a count, not NVMe's 0-based NLB field). 0 for Flush.
    pub nlb: u32,
    /// Force unit access: the write is durable when it completes.
    pub fua: bool,
    /// The frontend's own request id, handed back untouched at completion. Frontends
    /// use values below [`IoCommand::ROUTER_TAG`]; the router marks commands it tracks
    /// with that bit while they are below it, and restores the tag before completion.
    pub tag: u64,
    /// Data buffers (Read, Write only).
    pub sg: SgList,
    /// Keeps `sg`'s memory mapped until the command completes.
    pub keepalive: Option<KeepAlive>,
}

impl IoCommand {
    /// The tag bit the router reserves (see `tag`).
    pub const ROUTER_TAG: u64 = 1 << 63;

    pub fn new(opcode: Opcode, slba: u64, nlb: u32, tag: u64, sg: SgList) -> Self {
        IoCommand {
            opcode,
            nsid: 1,
            slba,
            nlb,
            fua: false,
            tag,
            sg,
            keepalive: None,
        }
    }

    /// Check the command against the device: range, data length, read-only. Every frontend
    /// calls this before `submit`, so no backend sees an out-of-range LBA.
    pub fn validate(&self, info: &DeviceInfo) -> Result<(), Status> {
        Self::validate_range(self.opcode, self.slba, self.nlb, info)?;
        if self.opcode.has_data() && self.sg.len() != self.nlb as u64 * info.block_size as u64 {
            return Err(Status::DATA_TRANSFER_ERROR);
        }
        Ok(())
    }

    /// The part of [`IoCommand::validate`] that needs no data buffer: read-only, block
    /// count and range. A frontend engine runs it when a command is admitted (before its
    /// buffer is filled) and checks the data length when it is submitted.
    pub fn validate_range(
        op: Opcode,
        slba: u64,
        nlb: u32,
        info: &DeviceInfo,
    ) -> Result<(), Status> {
        if op.is_write() && info.read_only {
            return Err(Status::WRITE_PROTECTED);
        }
        if op == Opcode::Flush {
            return Ok(());
        }
        if nlb == 0 {
            return Err(Status::INVALID_FIELD);
        }
        match slba.checked_add(nlb as u64) {
            Some(end) if end <= info.num_blocks => Ok(()),
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    }

    /// Byte offset of the first block.
    pub fn byte_offset(&self, block_size: u32) -> u64 {
        self.slba * block_size as u64
    }
    /// Byte length covered by the command.
    pub fn byte_len(&self, block_size: u32) -> u64 {
        self.nlb as u64 * block_size as u64
    }
}

/// What a device is and can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    pub num_blocks: u64,
    pub read_only: bool,
    /// Deallocate is supported (and makes the range read as zeros).
    pub discard: bool,
    pub write_zeroes: bool,
    /// The device has a volatile write cache, so Flush matters.
    pub volatile_cache: bool,
    /// Largest data transfer of one command, in bytes.
    pub max_transfer: u32,
}

impl DeviceInfo {
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }
}

/// Error kinds callers can match on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Unsupported,
    Io,
    Busy,
}

/// A library error: a kind plus a message that says what failed and on which object.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Error {
    pub kind: ErrorKind,
    pub msg: String,
    #[source]
    pub source: Option<std::io::Error>,
}

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            source: None,
        }
    }
    pub fn io(msg: impl fmt::Display, e: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            msg: format!("{msg}: {e}"),
            source: Some(e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A block device: hands out queues, one per worker thread.
pub trait BlockDevice: Send + Sync {
    fn info(&self) -> &DeviceInfo;
    /// Open a queue for one worker thread, with room for `depth` commands in flight.
    fn open_queue(&self, depth: u32) -> Result<Box<dyn BlockQueue>>;
    /// A short description for logs, e.g. `file /tmp/a.img (O_DIRECT)`.
    fn describe(&self) -> String;
    /// Current size in bytes. A device that can be resized while open (a thin volume)
    /// reports its live size here; `info()` holds the size at open.
    fn capacity_bytes(&self) -> u64 {
        self.info().size_bytes()
    }
}

/// One queue of a device, driven by exactly one thread.
///
/// `submit` takes ownership of a command; `poll` hands back each command with its status.
/// A queue accepts any number of submissions (commands past its depth wait in a backlog
/// allocated up front), so a frontend never has to handle "queue full".
pub trait BlockQueue: Send {
    /// Queue a command. It reaches the device at the next `kick`.
    fn submit(&mut self, cmd: IoCommand);
    /// Send queued commands to the device (at most one system call per batch).
    fn kick(&mut self);
    /// Reap completions. Returns how many were handed to `done`.
    fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize;
    /// Commands submitted and not yet handed back.
    fn in_flight(&self) -> usize;
    /// A file descriptor that becomes readable when completions are pending, for workers
    /// that sleep. `None` when every command completes within `kick` (null, memory).
    fn completion_fd(&self) -> Option<RawFd>;
    /// When the queue next has something to do without being told (a rate limiter whose
    /// held commands may go then): a sleeping worker wakes at this time to `poll`.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        None
    }
    /// Every descriptor a sleeping worker must watch for this queue: by default its
    /// `completion_fd`. A queue over several devices (the router's) reports one for each.
    /// Asked when the frontend's source is attached, and after `take_fds_changed`.
    fn wait_fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.completion_fd());
    }
    /// True once after `wait_fds` changed (the queue opened a device it uses lazily);
    /// the frontend then asks for them again.
    fn take_fds_changed(&mut self) -> bool {
        false
    }
    /// Whether a worker should busy-poll this queue after its last piece of work (the
    /// `poll_idle` spell) rather than sleep at once. True for devices whose completions
    /// come within microseconds. False for a backend whose commands take a network round
    /// trip (hundreds of microseconds) and whose completions come from its own library's
    /// threads (librbd): there the spell never finds a completion, and the CPU it burns
    /// is the CPU those threads (and, on a small host, the cluster) need.
    fn busy_poll(&self) -> bool {
        true
    }
    /// False while commands are complete but handed back only by a later `poll`, with no
    /// descriptor or deadline to wake a sleeping worker for them (null and synchronous
    /// backends): the worker must poll again instead of sleeping.
    fn may_sleep(&self) -> bool {
        self.completion_fd().is_some() || self.in_flight() == 0 || self.next_deadline().is_some()
    }
}

/// Parse a size such as `64M`, `10GiB`, `4096` or `1.5G` (binary units).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("size {s:?}: unknown unit (use K, M, G or T)"),
            ))
        }
    };
    let v: f64 = num.parse().map_err(|_| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("size {s:?}: not a number"),
        )
    })?;
    let bytes = v * mult as f64;
    if !(bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("size {s:?} is out of range"),
        ));
    }
    Ok(bytes as u64)
}

/// Format a byte count with a binary unit (`64 MiB`).
pub fn format_size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{} {}", v as u64, U[i])
    } else {
        format!("{:.1} {}", v, U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            block_size: 512,
            num_blocks: 100,
            read_only: false,
            discard: true,
            write_zeroes: true,
            volatile_cache: true,
            max_transfer: 1 << 20,
        }
    }

    #[test]
    fn validate_range() {
        let mut buf = vec![0u8; 1024];
        let mut sg = SgList::default();
        sg.push(buf.as_mut_ptr(), 1024);
        let c = IoCommand::new(Opcode::Read, 98, 2, 0, sg);
        assert_eq!(c.validate(&info()), Ok(()));
        let c = IoCommand::new(Opcode::Read, 99, 2, 0, c.sg);
        assert_eq!(c.validate(&info()), Err(Status::LBA_OUT_OF_RANGE));
        let c = IoCommand::new(Opcode::Read, u64::MAX, 2, 0, c.sg);
        assert_eq!(c.validate(&info()), Err(Status::LBA_OUT_OF_RANGE));
        let c = IoCommand::new(Opcode::Read, 0, 3, 0, c.sg);
        assert_eq!(c.validate(&info()), Err(Status::DATA_TRANSFER_ERROR));
        let mut ro = info();
        ro.read_only = true;
        let c = IoCommand::new(Opcode::Write, 0, 2, 0, c.sg);
        assert_eq!(c.validate(&ro), Err(Status::WRITE_PROTECTED));
    }

    #[test]
    fn sg_advance() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut sg = SgList::default();
        sg.push(a.as_mut_ptr(), 8);
        sg.push(b.as_mut_ptr(), 8);
        sg.advance(10);
        assert_eq!(sg.len(), 6);
        assert_eq!(sg.segments().len(), 1);
        assert_eq!(sg.segments()[0].iov_base as usize, b.as_ptr() as usize + 2);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }

    #[test]
    fn cqe_bits() {
        assert_eq!(Status::LBA_OUT_OF_RANGE.to_cqe_bits(), 0x80 << 1);
        assert_eq!(Status::WRITE_FAULT.to_cqe_bits(), (0x80 << 1) | (2 << 9));
    }
}
