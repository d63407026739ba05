//! A vhost-user-blk client on libblkio (no VM needed), for tests, the demo and benchmarks.
//!
//! libblkio never notices a dead server, so every wait here has a deadline: a server bug
//! fails the caller with an error instead of hanging it.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Default deadline for one synchronous request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub type Result<T> = std::result::Result<T, String>;

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// A connected libblkio `virtio-blk-vhost-user` instance with one buffer region.
pub struct BlkioClient {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
    /// How long `io` waits for a completion.
    pub timeout: Duration,
    // Keep the instance last so queues drop first.
    blkio: Blkio,
}

/// One request: what, where on the disk, how long, and where in the buffer region.
#[derive(Clone, Copy, Debug)]
pub struct Req {
    pub op: Op,
    pub offset: u64,
    pub len: usize,
    pub buf_off: usize,
}

/// Request kinds the client can issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl BlkioClient {
    /// Connect with `num_queues` queues (`poll`: polled queues instead of interrupt-driven)
    /// and a buffer region of `buf_bytes` (rounded up to 2 MiB).
    pub fn connect(socket: &Path, num_queues: usize, poll: bool, buf_bytes: usize) -> Result<Self> {
        Self::connect_opts(socket, num_queues, poll, buf_bytes, false)
    }

    /// [`connect`](Self::connect), optionally as a read-only client (libblkio refuses to
    /// start on a read-only device otherwise).
    pub fn connect_opts(
        socket: &Path,
        num_queues: usize,
        poll: bool,
        buf_bytes: usize,
        read_only: bool,
    ) -> Result<Self> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("libblkio"))?;
        b.set_str("path", &socket.to_string_lossy())
            .map_err(e("set path"))?;
        if read_only {
            b.set_bool("read-only", true).map_err(e("read-only"))?;
        }
        b.connect()
            .map_err(|er| format!("connect to {}: {er}", socket.display()))?;
        let n = num_queues.max(1) as i32;
        if poll {
            b.set_i32("num-queues", 0).map_err(e("num-queues"))?;
            b.set_i32("num-poll-queues", n)
                .map_err(e("num-poll-queues"))?;
        } else {
            b.set_i32("num-queues", n).map_err(e("num-queues"))?;
        }
        let out = b.start().map_err(e("start"))?;
        let queues = if poll { out.poll_queues } else { out.queues };
        let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(e("mem-region-alignment"))? as usize;
        let unit = align.max(2 << 20);
        let len = buf_bytes.max(1).div_ceil(unit) * unit;
        let region = b.alloc_mem_region(len).map_err(e("alloc_mem_region"))?;
        b.map_mem_region(&region).map_err(e("map_mem_region"))?;
        Ok(BlkioClient {
            queues,
            region,
            capacity,
            timeout: IO_TIMEOUT,
            blkio: b,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The shared buffer region (guest memory, from the server's point of view).
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of `len` bytes owned by this client, and no
        // request is in flight while the caller holds this borrow (requests are only
        // issued through &mut self methods that wait for completion).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// `len` bytes of the buffer region at `off`, or `None` when that is out of range.
    ///
    /// # Safety
    /// No request whose buffer overlaps `off..off + len` may be in flight while the slice
    /// lives (the server writes those bytes behind Rust's back). Requests on other parts of
    /// the region may be.
    pub unsafe fn buf_at(&mut self, off: usize, len: usize) -> Option<&mut [u8]> {
        if off.checked_add(len)? > self.region.len {
            return None;
        }
        // SAFETY: off + len is within the live mapping of region.len bytes owned by this
        // client; the caller guarantees no in-flight request uses this range.
        Some(unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) })
    }

    /// Submit what is queued on `q` and collect completions into `out`: with `wait`, wait
    /// up to that long for at least one (`Ok(0)` when none came in time); without, only
    /// take what has already completed. Interrupt-driven queues only (polled ones never
    /// wait).
    pub fn complete(
        &mut self,
        q: usize,
        out: &mut [MaybeUninit<Completion>],
        wait: Option<Duration>,
    ) -> Result<usize> {
        let queue = &mut self.queues[q];
        match wait {
            None => queue.do_io(out, 0, None, None).map_err(e("do_io")),
            Some(t) => {
                let mut t = t;
                match queue.do_io(out, 1, Some(&mut t), None) {
                    Ok(n) => Ok(n),
                    Err(er) if er.errno() == blkio::Errno::TIME => Ok(0),
                    // Nothing outstanding on this queue (its requests completed and were
                    // taken already): nothing to wait for.
                    Err(er) if er.to_string().contains("larger than total outstanding") => Ok(0),
                    Err(er) => Err(format!("do_io: {er}")),
                }
            }
        }
    }

    /// Queue one request on queue `q` without waiting.
    pub fn enqueue(&mut self, q: usize, r: Req, tag: usize, flags: ReqFlags) {
        let p = self.region.addr + r.buf_off;
        let queue = &mut self.queues[q];
        match r.op {
            Op::Read => queue.read(r.offset, p as *mut u8, r.len, tag, flags),
            Op::Write => queue.write(r.offset, p as *const u8, r.len, tag, flags),
            Op::Flush => queue.flush(tag, flags),
            Op::Discard => queue.discard(r.offset, r.len as u64, tag, flags),
            Op::WriteZeroes => queue.write_zeroes(r.offset, r.len as u64, tag, flags),
        }
    }

    /// Submit queued requests and wait for at least `min` completions, up to `timeout`.
    pub fn reap(
        &mut self,
        q: usize,
        out: &mut [MaybeUninit<Completion>],
        min: usize,
        timeout: Duration,
    ) -> Result<usize> {
        let mut t = timeout;
        let poll = self.queues[q].get_completion_fd().is_none();
        let start = Instant::now();
        loop {
            let n = if poll {
                self.queues[q].do_io(out, 0, None, None)
            } else {
                self.queues[q].do_io(out, min.min(out.len()), Some(&mut t), None)
            }
            .map_err(e("do_io"))?;
            if n >= min || !poll {
                if n < min {
                    return Err(format!(
                        "timed out after {timeout:?} waiting for the server"
                    ));
                }
                return Ok(n);
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "timed out after {timeout:?} waiting for the server"
                ));
            }
            std::hint::spin_loop();
        }
    }

    /// Issue one request and wait for it. Returns libblkio's `ret` (0 or -errno).
    pub fn io(
        &mut self,
        q: usize,
        op: Op,
        offset: u64,
        len: usize,
        buf_off: usize,
        flags: ReqFlags,
    ) -> Result<i32> {
        self.enqueue(
            q,
            Req {
                op,
                offset,
                len,
                buf_off,
            },
            1,
            flags,
        );
        let mut c = [MaybeUninit::<Completion>::uninit()];
        self.reap(q, &mut c, 1, self.timeout)?;
        // SAFETY: reap returned 1, so libblkio initialised c[0].
        let c = unsafe { c[0].assume_init_read() };
        Ok(c.ret)
    }

    /// Like [`io`](Self::io) but an error status becomes `Err`.
    pub fn io_ok(
        &mut self,
        q: usize,
        op: Op,
        offset: u64,
        len: usize,
        buf_off: usize,
        flags: ReqFlags,
    ) -> Result<()> {
        match self.io(q, op, offset, len, buf_off, flags)? {
            0 => Ok(()),
            r => Err(format!(
                "{op:?} at {offset} len {len}: {}",
                std::io::Error::from_raw_os_error(-r)
            )),
        }
    }
}

impl Drop for BlkioClient {
    fn drop(&mut self) {
        self.queues.clear();
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}
