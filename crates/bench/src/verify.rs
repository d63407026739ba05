//! `nvmux bench verify`: a seeded write/verify load over vhost-user-blk (libblkio), for
//! VM-less data-integrity checks of any disk, in particular while paths fail over or
//! mirror legs come and go.
//!
//! Every 4 KiB unit written holds a header (magic, its own disk offset, a generation
//! number, the seed) and a body derived from those three, so a read can tell a correct
//! block from a stale, misdirected, torn or foreign one. The tool remembers the generation
//! each unit should hold (`map`), keeps `qd` requests in flight on each queue (never two
//! overlapping ones), checks every read, and at the end reads back every unit it wrote.
//!
//! A *stall* is a span with requests in flight and none completing: the longest one is
//! what a path failover looks like from the client.
//!
//! `--verify-only` writes nothing: it reads the whole disk and checks each unit against the
//! map a write run saved (`--map`), or, without a map, that each unit is either all zeros
//! or a well-formed block of this seed for its own offset.

use std::fmt;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};

use crate::client::{BlkioClient, Op, Req, Result};
use crate::workload::Rng;

/// The unit of content (and of the expected-generation map).
pub const UNIT: usize = 4096;
const MAGIC: &[u8; 8] = b"NVMXVRFY";
const MAP_MAGIC: &[u8; 8] = b"NVMXMAP1";
/// At most this many mismatch/error lines are printed (the counts stay exact).
const REPORT_MAX: u64 = 10;

/// What to run.
#[derive(Clone, Debug)]
pub struct VerifyArgs {
    pub socket: PathBuf,
    /// Run the mixed phase this long (ignored when `passes` is set).
    pub seconds: u64,
    /// Instead of `seconds`: write this many times the disk's size.
    pub passes: Option<u64>,
    /// Requests in flight per queue.
    pub qd: usize,
    pub queues: usize,
    /// Request sizes, each a multiple of 4 KiB; picked at random per request.
    pub block_sizes: Vec<usize>,
    pub seed: u64,
    pub verify_only: bool,
    /// Where a write run saves the map, and where `verify_only` loads it from.
    pub map: Option<PathBuf>,
    /// Give up when no request completes for this long (libblkio never notices a dead
    /// server).
    pub io_timeout: Duration,
}

/// What a run saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifySummary {
    pub writes: u64,
    pub reads: u64,
    /// Requests that completed with an error status.
    pub errors: u64,
    /// 4 KiB units that read back other than expected.
    pub mismatches: u64,
    pub max_latency: Duration,
    pub longest_stall: Duration,
}

impl VerifySummary {
    pub fn ok(&self) -> bool {
        self.errors == 0 && self.mismatches == 0
    }
}

impl fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "verify: {} writes, {} reads, {} errors, {} mismatches, max latency {} ms, longest stall {} ms",
            self.writes,
            self.reads,
            self.errors,
            self.mismatches,
            self.max_latency.as_millis(),
            self.longest_stall.as_millis()
        )
    }
}

fn body_seed(offset: u64, generation: u64, seed: u64) -> u64 {
    offset ^ generation.rotate_left(32) ^ seed.rotate_left(17) ^ 0x6e76_6d75_7876_7266
}

/// Fill one unit with the content of (`offset`, `generation`, `seed`).
pub fn fill_unit(buf: &mut [u8], offset: u64, generation: u64, seed: u64) {
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&offset.to_le_bytes());
    buf[16..24].copy_from_slice(&generation.to_le_bytes());
    buf[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut r = Rng::new(body_seed(offset, generation, seed));
    for w in buf[32..UNIT].chunks_exact_mut(8) {
        w.copy_from_slice(&r.next_u64().to_le_bytes());
    }
}

/// What one unit read back as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnitState {
    Zero,
    /// A well-formed block of this seed for this offset, of that generation.
    Valid(u64),
    /// Anything else: another offset's or seed's block, a torn or damaged one.
    Bad,
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

/// Classify one unit read from `offset`.
pub fn check_unit(buf: &[u8], offset: u64, seed: u64) -> UnitState {
    let buf = &buf[..UNIT];
    if &buf[0..8] != MAGIC {
        return if buf.iter().all(|&b| b == 0) {
            UnitState::Zero
        } else {
            UnitState::Bad
        };
    }
    if u64_at(buf, 8) != offset || u64_at(buf, 24) != seed {
        return UnitState::Bad;
    }
    let generation = u64_at(buf, 16);
    let mut r = Rng::new(body_seed(offset, generation, seed));
    for w in buf[32..].chunks_exact(8) {
        if u64_at(w, 0) != r.next_u64() {
            return UnitState::Bad;
        }
    }
    UnitState::Valid(generation)
}

#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    write: bool,
    offset: u64,
    len: usize,
    generation: u64,
    start: Option<Instant>,
}

struct Run {
    client: BlkioClient,
    seed: u64,
    qd: usize,
    max_bs: usize,
    block_sizes: Vec<usize>,
    capacity: u64,
    /// The generation each unit should hold; 0: unknown (not checked, except that a
    /// `strict` read wants zeros or a well-formed block).
    map: Vec<u64>,
    /// In-flight requests touching each unit.
    busy: Vec<u8>,
    slots: Vec<Slot>,
    next_gen: u64,
    rng: Rng,
    s: VerifySummary,
    inflight: usize,
    last_progress: Instant,
    io_timeout: Duration,
    strict: bool,
    written_bytes: u64,
    completions: Vec<MaybeUninit<Completion>>,
}

impl Run {
    fn units(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let a = (offset / UNIT as u64) as usize;
        a..a + len / UNIT
    }

    fn free(&self, offset: u64, len: usize) -> bool {
        self.units(offset, len).all(|u| self.busy[u] == 0)
    }

    /// Start one request in slot `i` (queue i / qd).
    fn start(&mut self, i: usize, write: bool, offset: u64, len: usize) {
        let q = i / self.qd;
        let buf_off = i * self.max_bs;
        let generation = if write {
            self.next_gen += 1;
            self.next_gen
        } else {
            0
        };
        if write {
            // SAFETY: slot i's buffer range is used by slot i's request only, and slot i
            // is idle (no request of it in flight).
            if let Some(b) = unsafe { self.client.buf_at(buf_off, len) } {
                for (k, u) in b.chunks_exact_mut(UNIT).enumerate() {
                    fill_unit(u, offset + (k * UNIT) as u64, generation, self.seed);
                }
            }
            self.written_bytes += len as u64;
        }
        for u in self.units(offset, len) {
            self.busy[u] += 1;
        }
        if self.inflight == 0 {
            self.last_progress = Instant::now();
        }
        self.inflight += 1;
        self.slots[i] = Slot {
            busy: true,
            write,
            offset,
            len,
            generation,
            start: Some(Instant::now()),
        };
        let op = if write { Op::Write } else { Op::Read };
        self.client.enqueue(
            q,
            Req {
                op,
                offset,
                len,
                buf_off,
            },
            i,
            ReqFlags::empty(),
        );
    }

    /// A random free range (None when eight tries hit in-flight ones).
    fn pick(&mut self) -> Option<(u64, usize)> {
        for _ in 0..8 {
            let bs =
                self.block_sizes[(self.rng.next_u64() % self.block_sizes.len() as u64) as usize];
            let span = self.capacity / bs as u64;
            if span == 0 {
                continue;
            }
            let offset = (self.rng.next_u64() % span) * bs as u64;
            if self.free(offset, bs) {
                return Some((offset, bs));
            }
        }
        None
    }

    fn finish(&mut self, i: usize, ret: i32, now: Instant) {
        let Some(sl) = self.slots.get(i).copied().filter(|s| s.busy) else {
            self.s.errors += 1;
            eprintln!("verify: completion for an unknown request (tag {i})");
            return;
        };
        self.slots[i].busy = false;
        self.inflight -= 1;
        if let Some(t) = sl.start {
            self.s.max_latency = self.s.max_latency.max(now - t);
        }
        let units = self.units(sl.offset, sl.len);
        for u in units.clone() {
            self.busy[u] -= 1;
        }
        if sl.write {
            self.s.writes += 1;
        } else {
            self.s.reads += 1;
        }
        if ret != 0 {
            self.s.errors += 1;
            if self.s.errors <= REPORT_MAX {
                eprintln!(
                    "verify: {} at {} len {}: {}",
                    if sl.write { "write" } else { "read" },
                    sl.offset,
                    sl.len,
                    std::io::Error::from_raw_os_error(-ret)
                );
            }
            if sl.write {
                // The units may hold the old or the new content (or a mix): unknown.
                for u in units {
                    self.map[u] = 0;
                }
            }
            return;
        }
        if sl.write {
            for u in units {
                self.map[u] = sl.generation;
            }
            return;
        }
        let buf_off = i * self.max_bs;
        let (seed, strict) = (self.seed, self.strict);
        // SAFETY: slot i's request just completed, so nothing writes its buffer range.
        let Some(b) = (unsafe { self.client.buf_at(buf_off, sl.len) }) else {
            return;
        };
        for (k, u) in units.enumerate() {
            let want = self.map[u];
            if want == 0 && !strict {
                continue;
            }
            let off = sl.offset + (k * UNIT) as u64;
            let got = check_unit(&b[k * UNIT..(k + 1) * UNIT], off, seed);
            let good = match (want, got) {
                (0, UnitState::Zero | UnitState::Valid(_)) => true,
                (w, UnitState::Valid(g)) => g == w,
                _ => false,
            };
            if !good {
                self.s.mismatches += 1;
                if self.s.mismatches <= REPORT_MAX {
                    eprintln!(
                        "verify: MISMATCH at offset {off}: wanted {}, read {got:?}",
                        if want == 0 {
                            "zeros or any generation".to_string()
                        } else {
                            format!("generation {want}")
                        }
                    );
                }
            }
        }
    }

    /// Submit what is queued, then collect completions (waiting a little when `block`).
    fn pump(&mut self, block: bool) -> Result<()> {
        let nq = self.client.num_queues();
        let mut got = 0;
        for q in 0..nq {
            let wait = (block && nq == 1).then_some(Duration::from_millis(50));
            let mut out = std::mem::take(&mut self.completions);
            let n = self.client.complete(q, &mut out, wait);
            let now = Instant::now();
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.completions = out;
                    return Err(e);
                }
            };
            for c in &out[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_read() };
                self.finish(c.user_data, c.ret, now);
            }
            self.completions = out;
            if n > 0 {
                self.s.longest_stall = self.s.longest_stall.max(now - self.last_progress);
                self.last_progress = now;
            }
            got += n;
        }
        if got == 0 && self.inflight > 0 {
            let waited = self.last_progress.elapsed();
            if waited > self.io_timeout {
                self.s.longest_stall = self.s.longest_stall.max(waited);
                return Err(format!(
                    "{} requests in flight and none completed for {} s: giving up",
                    self.inflight,
                    waited.as_secs()
                ));
            }
            if block && nq > 1 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }

    fn idle_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| !s.busy)
    }

    /// The mixed phase: random reads and writes until `done` says stop.
    fn mixed(&mut self, done: &dyn Fn(&Run) -> bool) -> Result<()> {
        while !done(self) {
            while let Some(i) = self.idle_slot() {
                let write = self.rng.next_u64() & 1 == 0;
                let Some((off, len)) = self.pick() else { break };
                self.start(i, write, off, len);
                if done(self) {
                    break;
                }
            }
            self.pump(true)?;
        }
        self.drain()
    }

    fn drain(&mut self) -> Result<()> {
        while self.inflight > 0 {
            self.pump(true)?;
        }
        Ok(())
    }

    /// Read every unit of the disk (with `only_known`: the ranges holding written units).
    fn read_all(&mut self, only_known: bool) -> Result<()> {
        let step = self.max_bs as u64;
        let mut off = 0u64;
        while off < self.capacity || self.inflight > 0 {
            while off < self.capacity {
                let Some(i) = self.idle_slot() else { break };
                let len = step.min(self.capacity - off) as usize / UNIT * UNIT;
                if len == 0 {
                    off = self.capacity;
                    break;
                }
                let known = self.units(off, len).any(|u| self.map[u] != 0);
                if !only_known || known {
                    self.start(i, false, off, len);
                }
                off += len as u64;
            }
            self.pump(true)?;
        }
        Ok(())
    }
}

fn save_map(path: &Path, seed: u64, map: &[u64]) -> Result<()> {
    let mut b = Vec::with_capacity(24 + map.len() * 8);
    b.extend_from_slice(MAP_MAGIC);
    b.extend_from_slice(&seed.to_le_bytes());
    b.extend_from_slice(&(map.len() as u64).to_le_bytes());
    for g in map {
        b.extend_from_slice(&g.to_le_bytes());
    }
    std::fs::write(path, b).map_err(|e| format!("write {}: {e}", path.display()))
}

fn load_map(path: &Path, seed: u64, units: usize) -> Result<Vec<u64>> {
    let b = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    if b.len() < 24 || &b[0..8] != MAP_MAGIC {
        return Err(format!("{}: not a verify map", path.display()));
    }
    if u64_at(&b, 8) != seed {
        return Err(format!(
            "{}: written with seed {}, not {seed}",
            path.display(),
            u64_at(&b, 8)
        ));
    }
    let n = u64_at(&b, 16);
    if n != units as u64 || b.len() as u64 != 24 + n * 8 {
        return Err(format!(
            "{}: a map of {n} units, the disk has {units}",
            path.display()
        ));
    }
    Ok(b[24..].chunks_exact(8).map(|w| u64_at(w, 0)).collect())
}

/// Run the load (or, with `verify_only`, the read-back) and return what it saw. I/O errors
/// and mismatches are counted in the summary, and so are the requests still in flight
/// when the run gives up (no completion for `io_timeout`, or a failed connection). Errors
/// are bad arguments, a failed connect, or an unreadable or unwritable map.
pub fn run_verify(a: &VerifyArgs) -> Result<VerifySummary> {
    let mut sizes = a.block_sizes.clone();
    sizes.retain(|&b| b > 0);
    if sizes.is_empty() || sizes.iter().any(|b| b % UNIT != 0) {
        return Err(format!("block sizes must be multiples of {UNIT}"));
    }
    if !(1..=1024).contains(&a.qd) || !(1..=64).contains(&a.queues) {
        return Err("--qd must be 1..=1024 and --queues 1..=64".into());
    }
    let max_bs = sizes.iter().copied().max().unwrap_or(UNIT);
    if max_bs > 16 << 20 {
        return Err("block sizes up to 16 MiB".into());
    }
    let client = BlkioClient::connect(&a.socket, a.queues, false, a.queues * a.qd * max_bs)?;
    let queues = client.num_queues();
    let capacity = client.capacity() / UNIT as u64 * UNIT as u64;
    if capacity < max_bs as u64 {
        return Err(format!(
            "the disk ({capacity} bytes) is smaller than one request"
        ));
    }
    let units = (capacity / UNIT as u64) as usize;
    let map = match (&a.map, a.verify_only) {
        (Some(p), true) => load_map(p, a.seed, units)?,
        _ => vec![0; units],
    };
    let mut r = Run {
        client,
        seed: a.seed,
        qd: a.qd,
        max_bs,
        block_sizes: sizes,
        capacity,
        map,
        busy: vec![0; units],
        slots: vec![Slot::default(); queues * a.qd],
        next_gen: 0,
        rng: Rng::new(a.seed ^ 0x5eed),
        s: VerifySummary::default(),
        inflight: 0,
        last_progress: Instant::now(),
        io_timeout: a.io_timeout,
        strict: a.verify_only,
        written_bytes: 0,
        completions: (0..a.qd.max(1)).map(|_| MaybeUninit::uninit()).collect(),
    };
    let result = if a.verify_only {
        r.read_all(false)
    } else {
        r.write_run(a).and_then(|()| r.read_all(true))
    };
    if let Err(e) = result {
        // No progress for io_timeout, or the connection failed: what is still in flight
        // counts as failed, and the summary says what was seen until then.
        eprintln!("verify: {e}");
        r.s.errors += r.inflight.max(1) as u64;
        let s = r.s.clone();
        // Tearing the libblkio instance down talks to the server, which may be the one
        // that stopped answering: leave it to the process's exit instead.
        std::mem::forget(r);
        return Ok(s);
    }
    if let (Some(p), false) = (&a.map, a.verify_only) {
        save_map(p, a.seed, &r.map)?;
    }
    Ok(r.s)
}

impl Run {
    fn write_run(&mut self, a: &VerifyArgs) -> Result<()> {
        let capacity = self.capacity;
        match a.passes {
            Some(p) => {
                let target = p.saturating_mul(capacity);
                self.mixed(&|r: &Run| r.written_bytes >= target)
            }
            None => {
                let end = Instant::now() + Duration::from_secs(a.seconds);
                self.mixed(&|_: &Run| Instant::now() >= end)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_roundtrip_and_detection() {
        let mut b = vec![0u8; UNIT];
        assert_eq!(check_unit(&b, 4096, 7), UnitState::Zero);
        fill_unit(&mut b, 8192, 3, 7);
        assert_eq!(check_unit(&b, 8192, 7), UnitState::Valid(3));
        // another offset (a misdirected write), another seed
        assert_eq!(check_unit(&b, 4096, 7), UnitState::Bad);
        assert_eq!(check_unit(&b, 8192, 8), UnitState::Bad);
        // a torn block: the second half of another generation
        let mut c = vec![0u8; UNIT];
        fill_unit(&mut c, 8192, 4, 7);
        b[2048..].copy_from_slice(&c[2048..]);
        assert_eq!(check_unit(&b, 8192, 7), UnitState::Bad);
        // one flipped bit in the body
        fill_unit(&mut b, 8192, 3, 7);
        b[4000] ^= 1;
        assert_eq!(check_unit(&b, 8192, 7), UnitState::Bad);
    }

    #[test]
    fn map_file_roundtrip_and_refusals() {
        let d = std::env::temp_dir().join(format!("nvmux-verify-map-{}", std::process::id()));
        let map = vec![0, 5, 9, 0, 1];
        save_map(&d, 42, &map).unwrap();
        assert_eq!(load_map(&d, 42, 5).unwrap(), map);
        assert!(load_map(&d, 43, 5).unwrap_err().contains("seed"));
        assert!(load_map(&d, 42, 6).unwrap_err().contains("units"));
        std::fs::write(&d, b"short").unwrap();
        assert!(load_map(&d, 42, 5).is_err());
        let _ = std::fs::remove_file(&d);
    }

    #[test]
    fn summary_line_format() {
        let s = VerifySummary {
            writes: 3,
            reads: 4,
            errors: 0,
            mismatches: 1,
            max_latency: Duration::from_millis(12),
            longest_stall: Duration::from_millis(2500),
        };
        assert_eq!(
            s.to_string(),
            "verify: 3 writes, 4 reads, 0 errors, 1 mismatches, max latency 12 ms, longest stall 2500 ms"
        );
        assert!(!s.ok());
    }
}
