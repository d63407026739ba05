//! `nvmux powercut`: the power-cut simulator (docs/format.md, "The power-cut simulator").
//!
//! Modelled on dm-log-writes replay (xfstests) and CrashMonkey. For each workload:
//!
//! 1. **Record.** A real pool file (on `--dir`, /tmp by default: io_uring, O_DIRECT) is
//!    created, copied (the base image), and opened with [`Pool::open_recorded`]: every
//!    write, write zeroes, zeroed range and sync that reaches the file is logged with its
//!    payload, in completion order ([`nvmux_backend::record`]). The workload drives thin
//!    volumes (and the crypt function over one, and a plain file disk) through their real
//!    queues, and notes, against positions in that log, when each guest write was
//!    submitted and acknowledged, and when each flush, FUA write and control-plane
//!    operation completed.
//! 2. **Crash states.** A crash point is a position in the log. The state the device may
//!    be left in: the base image, every change logged before the start of the last sync
//!    that completed before the crash point, and a random subset of the changes after it
//!    (in flight during that sync or later), optionally torn to a subset of their 4 KiB
//!    sectors. Deterministic by seed.
//! 3. **Check each state** on a copy of the image (`--state-dir`, /dev/shm by default):
//!    the real `pool check`, the real [`Pool::open`] (journal replay), a read of every
//!    volume that must exist, compared block by block with what the guest may see, then
//!    close and `pool check` again.
//!
//! What a block may read after a crash at point p: the last write to it acknowledged
//! before a flush of its device (or a control-plane operation) that completed before p
//! was submitted, or a FUA write acknowledged before p, or any write after that one
//! that was submitted before p. Never zeros where that is not one of them, never another
//! write's data. Every guest write fills each 512-byte sector with its own id and LBA, so
//! a block read back says which write it came from.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvmux_backend::record::{Event, IoLog, RecordingDevice};
use nvmux_backend::{FileDevice, FileOptions};
use nvmux_core::{AlignedBuf, BlockDevice, BlockQueue, IoCommand, Opcode, SgList, Status};
use nvmux_func::xts::Xts;
use nvmux_func::CryptDevice;
use nvmux_volume::{Pool, PoolOptions, ThinDevice};

type Res<T> = std::result::Result<T, String>;

#[derive(clap::Args, Clone)]
pub struct PowercutArgs {
    /// Crash states to check, spread evenly over the workloads.
    #[arg(long, default_value_t = 1000)]
    pub states: u64,
    /// The long run: 100 000 states (unless --states asks for more).
    #[arg(long)]
    pub long: bool,
    /// Seed of every random choice (workloads and crash states); default: from the clock.
    #[arg(long, value_parser = parse_seed)]
    pub seed: Option<u64>,
    /// Run only these workloads (repeat or separate with commas): random, snapshot,
    /// resize, discard, reuse, crypt, small, small-large, file.
    #[arg(long, value_delimiter = ',')]
    pub workload: Vec<String>,
    /// Where the recorded pools live while a workload runs.
    #[arg(long, default_value = "/tmp")]
    pub dir: PathBuf,
    /// Where crash images are checked.
    #[arg(long, default_value = "/dev/shm")]
    pub state_dir: PathBuf,
    /// Never tear a write into a subset of its 4 KiB sectors.
    #[arg(long)]
    pub no_torn: bool,
    /// Stop at the first crash state that fails (default: check them all, report each).
    #[arg(long)]
    pub fail_fast: bool,
    /// Rounds of each workload: every round records the workload again with a new seed
    /// and checks its share of the states (default: 1, or 20 with --long).
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Threads checking crash states (each on its own image).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
}

/// A seed in decimal or, with `0x`, in hex (as the summary prints it).
fn parse_seed(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("seed {s:?}: {e}"))
}

const WORKLOADS: [&str; 9] = [
    "random",
    "snapshot",
    "resize",
    "discard",
    "reuse",
    "crypt",
    "small",
    "small-large",
    "file",
];

/// A failing crash state gives up after this many reported problems.
const MAX_PROBLEMS: usize = 5;
/// A command (or the drain before a control-plane operation) that takes longer than
/// this is reported as hung.
const HANG: Duration = Duration::from_secs(20);
const BLK: u64 = 4096;

// ---------------------------------------------------------------- randomness

/// SplitMix64: small, fast, and deterministic from its seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 512 bytes guest write `id` puts at volume sector `lba`.
fn fill_sector(id: u64, lba: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&lba.to_le_bytes());
    let mut s = mix(id ^ lba.rotate_left(32));
    for c in out[16..].chunks_mut(8) {
        s = mix(s.wrapping_add(0x9e37_79b9_7f4a_7c15));
        let n = c.len();
        c.copy_from_slice(&s.to_le_bytes()[..n]);
    }
}

/// Which write a 4 KiB block read back at volume block `blk` came from: `Some(0)` for
/// zeros, `Some(id)` for write `id`'s data, `None` for anything else (torn inside the
/// block, another block's data, garbage).
fn identify(blk: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(data[..8].try_into().ok()?);
    let mut want = [0u8; 512];
    for (i, s) in data.chunks(512).enumerate() {
        fill_sector(id, blk * 8 + i as u64, &mut want);
        if s != want {
            return None;
        }
    }
    Some(id)
}

// ---------------------------------------------------------------- the guest's model

/// One write (or zeroing) of a block as the guest saw it. Positions are log lengths.
#[derive(Clone, Copy, Debug)]
struct Wr {
    id: u64,
    /// Guest order: when it was acknowledged (`u64::MAX`: never, it failed).
    done_g: u64,
    sub_pos: usize,
    done_pos: usize,
    fua: bool,
}

/// A barrier: writes to `vol` (every volume for `None`) acknowledged before guest time
/// `g` are durable in any crash state cut at `pos` or later.
#[derive(Clone, Copy)]
struct Barrier {
    vol: Option<usize>,
    g: u64,
    pos: usize,
}

#[derive(Clone)]
struct MVol {
    name: String,
    crypt: bool,
    /// Per 4 KiB block, the writes in acknowledgement order.
    blocks: Vec<Vec<Wr>>,
    /// Positions of the operation that created it (0, 0: before recording began).
    created: (usize, usize),
    deleted: Option<(usize, usize)>,
    /// (op start, op end, old size, new size).
    resizes: Vec<(usize, usize, u64, u64)>,
    size0: u64,
    size: u64,
}

#[derive(Default)]
struct Model {
    vols: Vec<MVol>,
    barriers: Vec<Barrier>,
    g: u64,
}

impl Model {
    fn tick(&mut self) -> u64 {
        self.g += 1;
        self.g
    }
    fn add_vol(&mut self, name: &str, size: u64, crypt: bool, created: (usize, usize)) -> usize {
        self.vols.push(MVol {
            name: name.to_string(),
            crypt,
            blocks: vec![Vec::new(); (size / BLK) as usize],
            created,
            deleted: None,
            resizes: Vec::new(),
            size0: size,
            size,
        });
        self.vols.len() - 1
    }
}

/// What a volume may read at block `b` in a crash state cut at `p`: `Err` with the
/// reason when `got` is not allowed.
fn allowed(h: &[Wr], p: usize, durable_g: u64, got: u64) -> std::result::Result<(), String> {
    let d = h
        .iter()
        .rposition(|w| w.done_g < durable_g || (w.fua && w.done_g != u64::MAX && w.done_pos <= p));
    let base = d.map_or(0, |i| h[i].id);
    if got == base {
        return Ok(());
    }
    let from = d.map_or(0, |i| i + 1);
    if h[from..].iter().any(|w| w.id == got && w.sub_pos < p) {
        return Ok(());
    }
    let later: Vec<String> = h[from..]
        .iter()
        .filter(|w| w.sub_pos < p)
        .map(|w| format!("#{}", w.id))
        .collect();
    Err(format!(
        "read {} where the durable content is {}{}",
        name_of(got),
        name_of(base),
        if later.is_empty() {
            String::new()
        } else {
            format!(" (or a later write: {})", later.join(" "))
        }
    ))
}

fn name_of(id: u64) -> String {
    if id == 0 {
        "zeros".into()
    } else {
        format!("write #{id}")
    }
}

// ---------------------------------------------------------------- recording

struct Recording {
    workload: &'static str,
    base: Vec<u8>,
    events: Vec<Event>,
    model: Model,
    /// The recorded device is a pool (else a plain file disk).
    pool: bool,
    key: [u8; 64],
    /// Problems the workload itself met (a hang, a failed command).
    problems: Vec<String>,
    writes: u64,
}

enum Kind {
    Write {
        first: u64,
        n: u64,
        id: u64,
        fua: bool,
    },
    Zero {
        first: u64,
        n: u64,
    },
    Flush,
}

struct InFlight {
    dev: usize,
    kind: Kind,
    sub_pos: usize,
    sub_g: u64,
    _buf: Option<AlignedBuf>,
}

struct GDev {
    vol: usize,
    q: Box<dyn BlockQueue>,
    bs: u64,
    zeroes: bool,
}

struct Driver {
    log: Arc<IoLog>,
    m: Model,
    rng: Rng,
    devs: Vec<GDev>,
    flight: Vec<Option<InFlight>>,
    next_id: u64,
    problems: Vec<String>,
    writes: u64,
    workload: &'static str,
}

impl Driver {
    fn pos(&self) -> usize {
        self.log.len()
    }

    fn busy(&self, vol: usize, first: u64, n: u64) -> bool {
        self.flight.iter().flatten().any(|f| {
            self.devs[f.dev].vol == vol
                && match f.kind {
                    Kind::Write { first: a, n: k, .. } | Kind::Zero { first: a, n: k } => {
                        a < first + n && first < a + k
                    }
                    Kind::Flush => false,
                }
        })
    }

    fn slot(&mut self, f: InFlight) -> u64 {
        match self.flight.iter().position(|x| x.is_none()) {
            Some(i) => {
                self.flight[i] = Some(f);
                i as u64
            }
            None => {
                self.flight.push(Some(f));
                self.flight.len() as u64 - 1
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.flight.iter().flatten().count()
    }

    /// Submit a write of `n` blocks at block `first` of device `dev`.
    fn write(&mut self, dev: usize, first: u64, n: u64, fua: bool) {
        let vol = self.devs[dev].vol;
        if self.busy(vol, first, n) {
            return;
        }
        self.next_id += 1;
        let id = self.next_id;
        let mut buf = AlignedBuf::new((n * BLK) as usize);
        for (i, sec) in buf.as_mut_slice().chunks_mut(512).enumerate() {
            fill_sector(id, first * 8 + i as u64, sec);
        }
        let bs = self.devs[dev].bs;
        let mut cmd = IoCommand::new(
            Opcode::Write,
            first * BLK / bs,
            (n * BLK / bs) as u32,
            0,
            buf.sg(0, buf.len()),
        );
        cmd.fua = fua;
        let f = InFlight {
            dev,
            kind: Kind::Write { first, n, id, fua },
            sub_pos: self.pos(),
            sub_g: self.m.tick(),
            _buf: Some(buf),
        };
        cmd.tag = self.slot(f);
        self.devs[dev].q.submit(cmd);
        self.devs[dev].q.kick();
        self.writes += 1;
    }

    fn zero(&mut self, dev: usize, first: u64, n: u64, dealloc: bool) {
        let vol = self.devs[dev].vol;
        if !self.devs[dev].zeroes || self.busy(vol, first, n) {
            return;
        }
        let bs = self.devs[dev].bs;
        let op = if dealloc {
            Opcode::Deallocate
        } else {
            Opcode::WriteZeroes
        };
        let mut cmd = IoCommand::new(
            op,
            first * BLK / bs,
            (n * BLK / bs) as u32,
            0,
            SgList::default(),
        );
        let f = InFlight {
            dev,
            kind: Kind::Zero { first, n },
            sub_pos: self.pos(),
            sub_g: self.m.tick(),
            _buf: None,
        };
        cmd.tag = self.slot(f);
        self.devs[dev].q.submit(cmd);
        self.devs[dev].q.kick();
    }

    fn flush(&mut self, dev: usize) {
        let mut cmd = IoCommand::new(Opcode::Flush, 0, 0, 0, SgList::default());
        let f = InFlight {
            dev,
            kind: Kind::Flush,
            sub_pos: self.pos(),
            sub_g: self.m.tick(),
            _buf: None,
        };
        cmd.tag = self.slot(f);
        self.devs[dev].q.submit(cmd);
        self.devs[dev].q.kick();
    }

    /// Reap completions; returns how many.
    fn poll(&mut self) -> usize {
        let mut got = Vec::new();
        for (i, d) in self.devs.iter_mut().enumerate() {
            d.q.poll(&mut |c, s| got.push((i, c.tag, s)));
            d.q.kick();
        }
        for &(_, tag, st) in &got {
            let Some(f) = self.flight.get_mut(tag as usize).and_then(|f| f.take()) else {
                continue;
            };
            let pos = self.pos();
            let g = self.m.tick();
            let vol = self.devs[f.dev].vol;
            let ok = st.is_ok();
            if !ok && st != Status::CAPACITY_EXCEEDED {
                self.problems.push(format!(
                    "{}: a command on {:?} failed: {st}",
                    self.workload, self.m.vols[vol].name
                ));
            }
            let done_g = if ok { g } else { u64::MAX };
            match f.kind {
                Kind::Write { first, n, id, fua } => {
                    let mv = &mut self.m.vols[vol];
                    for b in first..first + n {
                        mv.blocks[b as usize].push(Wr {
                            id,
                            done_g,
                            sub_pos: f.sub_pos,
                            done_pos: pos,
                            fua,
                        });
                    }
                }
                Kind::Zero { first, n } => {
                    let mv = &mut self.m.vols[vol];
                    for b in first..first + n {
                        mv.blocks[b as usize].push(Wr {
                            id: 0,
                            done_g,
                            sub_pos: f.sub_pos,
                            done_pos: pos,
                            fua: false,
                        });
                    }
                }
                Kind::Flush if ok => self.m.barriers.push(Barrier {
                    vol: Some(vol),
                    g: f.sub_g,
                    pos,
                }),
                Kind::Flush => {}
            }
        }
        got.len()
    }

    /// Wait until at most `n` commands are in flight; false (and a problem noted) if
    /// that takes longer than [`HANG`].
    fn drain_to(&mut self, n: usize, what: &str) -> bool {
        let t = Instant::now();
        while self.in_flight() > n {
            if self.poll() == 0 {
                if t.elapsed() > HANG {
                    self.problems.push(format!(
                        "{}: {} commands still in flight after {} s ({what}): a command that never completes",
                        self.workload,
                        self.in_flight(),
                        HANG.as_secs()
                    ));
                    return false;
                }
                std::thread::yield_now();
            }
        }
        true
    }

    /// Run a control-plane operation with nothing in flight; on success it is a barrier
    /// for every volume. Returns its (start, end) positions.
    fn control(
        &mut self,
        what: &str,
        op: impl FnOnce() -> nvmux_core::Result<()>,
    ) -> Option<(usize, usize)> {
        if !self.drain_to(0, what) {
            return None;
        }
        let start = self.pos();
        match op() {
            Ok(()) => {
                let end = self.pos();
                let g = self.m.tick();
                self.m.barriers.push(Barrier {
                    vol: None,
                    g,
                    pos: end,
                });
                Some((start, end))
            }
            Err(e) => {
                self.problems
                    .push(format!("{}: {what} failed: {e}", self.workload));
                None
            }
        }
    }

    /// A random write, zeroing or flush on one of `devs`, keeping up to `qd` in flight.
    fn step(&mut self, devs: &[usize], qd: usize, max_blocks: u64, zero_pct: u64) -> bool {
        if !self.drain_to(qd - 1, "waiting for a queue slot") {
            return false;
        }
        let dev = devs[self.rng.below(devs.len() as u64) as usize];
        let vol = self.devs[dev].vol;
        let nb = self.m.vols[vol].size / BLK;
        let n = 1 + self.rng.below(max_blocks.min(nb));
        let first = self.rng.below(nb - n + 1);
        let r = self.rng.below(100);
        if r < 10 {
            self.flush(dev);
        } else if r < 10 + zero_pct {
            let dealloc = self.rng.chance(50);
            self.zero(dev, first, n, dealloc);
        } else {
            let fua = self.rng.chance(8);
            self.write(dev, first, n, fua);
        }
        true
    }
}

fn temp_path(dir: &Path, what: &str, seed: u64) -> PathBuf {
    dir.join(format!(
        "nvmux-powercut-{}-{what}-{seed:x}",
        std::process::id()
    ))
}

struct Removed(PathBuf);
impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn thin_dev(pool: &Arc<Pool>, name: &str, crypt: Option<&[u8; 64]>) -> Res<Arc<dyn BlockDevice>> {
    let t: Arc<dyn BlockDevice> =
        Arc::new(ThinDevice::open(pool, name).map_err(|e| format!("open volume {name}: {e}"))?);
    Ok(match crypt {
        Some(k) => Arc::new(CryptDevice::new(t, k).map_err(|e| format!("crypt over {name}: {e}"))?),
        None => t,
    })
}

fn gdev(d: &Arc<dyn BlockDevice>, vol: usize) -> Res<GDev> {
    Ok(GDev {
        vol,
        q: d.open_queue(64).map_err(|e| format!("open queue: {e}"))?,
        bs: d.info().block_size as u64,
        zeroes: d.info().write_zeroes && d.info().discard,
    })
}

const MIB: u64 = 1 << 20;

/// Run workload `w` once on a recorded device.
fn record(w: &'static str, dir: &Path, seed: u64) -> Res<Recording> {
    let path = temp_path(dir, w, seed);
    let _rm = Removed(path.clone());
    let _ = std::fs::remove_file(&path);
    let mut rng = Rng(seed);
    let mut key = [0u8; 64];
    for c in key.chunks_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
    let log = IoLog::new();
    let mut d = Driver {
        log: log.clone(),
        m: Model::default(),
        rng,
        devs: Vec::new(),
        flight: Vec::new(),
        next_id: 0,
        problems: Vec::new(),
        writes: 0,
        workload: w,
    };
    if w == "file" {
        let size = 4 * MIB;
        std::fs::write(&path, vec![0u8; size as usize]).map_err(|e| format!("{e}"))?;
        let base = std::fs::read(&path).map_err(|e| format!("{e}"))?;
        let fd: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open(&path, &FileOptions::default()).map_err(|e| e.to_string())?);
        let rec: Arc<dyn BlockDevice> = Arc::new(RecordingDevice::new(fd, log.clone()));
        let v = d.m.add_vol("file", size, false, (0, 0));
        d.devs.push(gdev(&rec, v)?);
        for _ in 0..400 {
            if !d.step(&[0], 16, 16, 10) {
                break;
            }
        }
        d.drain_to(0, "end of the workload");
        let model = std::mem::take(&mut d.m);
        return Ok(Recording {
            workload: w,
            base,
            events: log.events(),
            model,
            pool: false,
            key,
            problems: d.problems,
            writes: d.writes,
        });
    }
    let (pool_size, cluster) = match w {
        "small" => (8 * MIB, 64 << 10),
        // 4 KiB clusters: ~1900 of them, so a 4 MiB write is 1024 owner records
        // (multi-block transactions) in a 256 KiB journal (64 blocks), and needs more
        // claimed clusters than a claim batch keeps ready.
        "small-large" => (8 * MIB, 4 << 10),
        "random" => (24 * MIB, 64 << 10),
        _ => (24 * MIB, 16 << 10),
    };
    Pool::create(
        &path,
        &PoolOptions {
            cluster_size: cluster,
            size: Some(pool_size),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let base = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let data = FileDevice::open(
        &path,
        &FileOptions {
            create: false,
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let data = Arc::new(RecordingDevice::new(Arc::new(data), log.clone()));
    let pool = Pool::open_recorded(&path, data, log.clone()).map_err(|e| e.to_string())?;
    let r = run_pool_workload(w, &pool, &mut d, &key);
    d.drain_to(0, "end of the workload");
    d.devs.clear();
    if let Err(e) = r {
        d.problems.push(format!("{w}: {e}"));
    }
    if let Err(e) = pool.close() {
        d.problems.push(format!("{w}: close: {e}"));
    }
    drop(pool);
    let model = std::mem::take(&mut d.m);
    Ok(Recording {
        workload: w,
        base,
        events: log.events(),
        model,
        pool: true,
        key,
        problems: d.problems,
        writes: d.writes,
    })
}

fn run_pool_workload(w: &str, pool: &Arc<Pool>, d: &mut Driver, key: &[u8; 64]) -> Res<()> {
    let p = pool.clone();
    let vol =
        |d: &mut Driver, name: &str, size: u64, crypt: bool, from: Option<&str>| -> Res<usize> {
            let pos = d.control(&format!("create {name}"), || {
                p.create_volume(name, Some(size), from)
            });
            let Some(pos) = pos else {
                return Err(format!("could not create {name}"));
            };
            let mut v = d.m.add_vol(name, size, crypt, pos);
            if let Some(src) = from {
                let s =
                    d.m.vols
                        .iter()
                        .rposition(|m| m.name == src && m.deleted.is_none());
                if let Some(s) = s {
                    let blocks = d.m.vols[s].blocks.clone();
                    d.m.vols[v].blocks = blocks;
                }
            }
            let dev = thin_dev(&p, name, crypt.then_some(key))?;
            d.devs.push(gdev(&dev, v)?);
            v = d.devs.len() - 1;
            Ok(v)
        };
    match w {
        "random" | "small" | "small-large" => {
            // The small pool's volume is larger than the pool: it fills up.
            let size = if w == "random" { 8 * MIB } else { 10 * MIB };
            let v = vol(d, "v", size, false, None)?;
            let (max, qd) = match w {
                "small" => (128, 32),
                "small-large" => (1024, 8),
                _ => (16, 32),
            };
            for _ in 0..600 {
                if !d.step(&[v], qd, max, 0) {
                    break;
                }
            }
        }
        "snapshot" | "crypt" => {
            let crypt = w == "crypt";
            let v = vol(d, "v", 4 * MIB, crypt, None)?;
            let mut devs = vec![v];
            for _ in 0..200 {
                d.step(&devs, 16, 32, 0);
            }
            for n in 0..4 {
                let snap = format!("s{n}");
                let vi = d.devs[v].vol;
                let Some(pos) = d.control(&format!("snapshot v as {snap}"), || {
                    pool.snapshot("v", &snap)
                }) else {
                    break;
                };
                // The snapshot keeps what the volume held; the volume goes on.
                let mut s = d.m.vols[vi].clone();
                s.name = snap.clone();
                s.created = pos;
                s.resizes.clear();
                s.size0 = s.size;
                d.m.vols.push(s);
                if n % 2 == 1 && !crypt {
                    let c = vol(d, &format!("c{n}"), 4 * MIB, false, Some(&snap))?;
                    devs.push(c);
                }
                for _ in 0..120 {
                    if !d.step(&devs, 16, 6, 0) {
                        break;
                    }
                }
            }
        }
        "discard" => {
            let v = vol(d, "v", 4 * MIB, false, None)?;
            for _ in 0..150 {
                d.step(&[v], 16, 32, 0);
            }
            let vi = d.devs[v].vol;
            if let Some(pos) = d.control("snapshot", || pool.snapshot("v", "s")) {
                let mut s = d.m.vols[vi].clone();
                s.name = "s".into();
                s.created = pos;
                d.m.vols.push(s);
            }
            for _ in 0..400 {
                if !d.step(&[v], 16, 32, 35) {
                    break;
                }
            }
        }
        "resize" => {
            let v = vol(d, "v", 2 * MIB, false, None)?;
            let vi = d.devs[v].vol;
            for round in 0..6 {
                for _ in 0..80 {
                    if !d.step(&[v], 16, 24, 0) {
                        break;
                    }
                }
                let old = d.m.vols[vi].size;
                let new = if round % 2 == 0 {
                    old + MIB
                } else {
                    // Shrink into the middle of a cluster: the tail is zeroed.
                    old - MIB - 12 * 1024
                };
                let Some(pos) = d.control(&format!("resize v to {new}"), || {
                    pool.resize("v", new, true, true)
                }) else {
                    break;
                };
                let g = d.m.g;
                let mv = &mut d.m.vols[vi];
                if new < old {
                    for h in mv.blocks.iter_mut().skip((new / BLK) as usize) {
                        h.push(Wr {
                            id: 0,
                            done_g: g,
                            sub_pos: pos.0,
                            done_pos: pos.1,
                            fua: false,
                        });
                    }
                } else if mv.blocks.len() < (new / BLK) as usize {
                    mv.blocks.resize((new / BLK) as usize, Vec::new());
                }
                mv.resizes.push((pos.0, pos.1, old, new));
                mv.size = new;
            }
        }
        "reuse" => {
            let mut names: Vec<(String, usize)> = Vec::new();
            for n in 0..2 {
                let name = format!("a{n}");
                let v = vol(d, &name, 3 * MIB, false, None)?;
                names.push((name, v));
            }
            for round in 0..6 {
                let devs: Vec<usize> = names.iter().map(|x| x.1).collect();
                for _ in 0..120 {
                    if !d.step(&devs, 16, 32, 0) {
                        break;
                    }
                }
                // Delete one and create another in its clusters.
                let (name, dv) = names.remove(0);
                let vi = d.devs[dv].vol;
                d.drain_to(0, "delete");
                // The device is dropped before its volume goes.
                d.devs[dv].q = Box::new(Idle);
                let Some(pos) = d.control(&format!("delete {name}"), || {
                    pool.delete(&name, round % 2 == 1, &mut |_, _| {})
                }) else {
                    break;
                };
                d.m.vols[vi].deleted = Some(pos);
                let new = format!("b{round}");
                let v = vol(d, &new, 3 * MIB, false, None)?;
                names.push((new, v));
            }
        }
        _ => return Err(format!("unknown workload {w:?}")),
    }
    Ok(())
}

/// A queue that has nothing: stands in for a device whose volume was deleted.
struct Idle;
impl BlockQueue for Idle {
    fn submit(&mut self, _: IoCommand) {}
    fn kick(&mut self) {}
    fn poll(&mut self, _: &mut dyn FnMut(IoCommand, Status)) -> usize {
        0
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

// ---------------------------------------------------------------- crash states

/// One crash state: cut at `p`, keeping `keep` of the changes after the durable point.
struct CrashState {
    p: usize,
    seed: u64,
}

/// Start of the sync whose completion makes everything before it durable, for a cut at
/// `p`: the latest such start among syncs that completed before `p`.
fn durable_point(events: &[Event], starts: &[usize], p: usize) -> usize {
    let mut best = 0;
    for (i, e) in events[..p].iter().enumerate() {
        if let Event::FlushEnd { id } = e {
            if let Some(&s) = starts.get(*id as usize) {
                if s < i {
                    best = best.max(s);
                }
            }
        }
    }
    best
}

fn apply(img: &mut [u8], e: &Event, torn: Option<&mut Rng>) {
    match e {
        Event::Write { off, data, .. } => {
            let off = *off as usize;
            match torn {
                Some(r) if data.len() > BLK as usize => {
                    for (i, c) in data.chunks(BLK as usize).enumerate() {
                        if r.chance(50) {
                            let o = off + i * BLK as usize;
                            if o + c.len() <= img.len() {
                                img[o..o + c.len()].copy_from_slice(c);
                            }
                        }
                    }
                }
                _ => {
                    if off + data.len() <= img.len() {
                        img[off..off + data.len()].copy_from_slice(data);
                    }
                }
            }
        }
        Event::Zero { off, len } => {
            let a = (*off as usize).min(img.len());
            let b = (*off + *len).min(img.len() as u64) as usize;
            img[a..b].fill(0);
        }
        _ => {}
    }
}

/// Check `n` crash states of one recording; returns (states checked, failures).
fn check_states(
    rec: &Recording,
    n: u64,
    seed: u64,
    a: &PowercutArgs,
    progress: &(dyn Fn(usize) + Sync),
    failures: &mut Vec<String>,
) -> Res<u64> {
    let ev = &rec.events;
    let mut starts = Vec::new();
    for (i, e) in ev.iter().enumerate() {
        if let Event::FlushStart { id } = e {
            if starts.len() <= *id as usize {
                starts.resize(*id as usize + 1, usize::MAX);
            }
            starts[*id as usize] = i;
        }
    }
    let flush_ends: Vec<usize> = ev
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::FlushEnd { .. }))
        .map(|(i, _)| i)
        .collect();
    let mut rng = Rng(seed);
    let mut states: Vec<CrashState> = (0..n)
        .map(|_| {
            // Half of the cuts fall just before a sync completes, where the most is in
            // flight; the rest anywhere.
            let p = if !flush_ends.is_empty() && rng.chance(50) {
                flush_ends[rng.below(flush_ends.len() as u64) as usize]
            } else {
                1 + rng.below(ev.len() as u64) as usize
            };
            CrashState {
                p: p.min(ev.len()),
                seed: rng.next(),
            }
        })
        .collect();
    states.sort_by_key(|s| s.p);
    // `--jobs` threads, each over a run of cuts in log order.
    let per = states.len().div_ceil(a.jobs.max(1)).max(1);
    let starts = &starts;
    let results: Vec<Res<(u64, Vec<String>)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = states
            .chunks(per)
            .enumerate()
            .map(|(k, run)| sc.spawn(move || check_run(rec, run, starts, seed, k, a, progress)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a checking thread panicked".into()))
            })
            .collect()
    });
    let mut done = 0;
    for r in results {
        let (n, f) = r?;
        done += n;
        failures.extend(f);
    }
    Ok(done)
}

/// Check the crash states `run` (sorted by cut) on image file number `k`.
fn check_run(
    rec: &Recording,
    run: &[CrashState],
    starts: &[usize],
    seed: u64,
    k: usize,
    a: &PowercutArgs,
    progress: &(dyn Fn(usize) + Sync),
) -> Res<(u64, Vec<String>)> {
    let ev = &rec.events;
    let mut failures = Vec::new();
    // The image at the durable point, advanced as the cuts move forward.
    let mut durable = rec.base.clone();
    let mut applied = 0;
    let img_path = temp_path(&a.state_dir, &format!("{}-{k}", rec.workload), seed);
    let _rm = Removed(img_path.clone());
    let mut done = 0;
    for st in run {
        let dp = durable_point(ev, starts, st.p);
        while applied < dp {
            apply(&mut durable, &ev[applied], None);
            applied += 1;
        }
        let mut img = durable.clone();
        let mut r = Rng(st.seed);
        let keep_pct = match r.below(4) {
            0 => 0,
            1 => 100,
            2 => 50,
            _ => r.below(101),
        };
        let torn_ok = !a.no_torn && r.chance(30);
        let mut kept = 0;
        for e in &ev[dp..st.p] {
            let must = matches!(e, Event::Write { fua: true, .. });
            if must || r.chance(keep_pct) {
                kept += 1;
                let torn = torn_ok && !must && r.chance(30);
                apply(&mut img, e, if torn { Some(&mut r) } else { None });
            }
        }
        std::fs::write(&img_path, &img).map_err(|e| format!("{}: {e}", img_path.display()))?;
        let what = format!(
            "{} (seed {seed:#x}) crash state at log position {} of {} (durable up to {dp}, {kept} of {} later changes kept, keep {keep_pct}%{})",
            rec.workload,
            st.p,
            ev.len(),
            st.p - dp,
            if torn_ok { ", torn sectors" } else { "" }
        );
        let probs = if rec.pool {
            check_pool_state(rec, &img_path, st.p)
        } else {
            check_file_state(rec, &img, st.p)
        };
        if !probs.is_empty() {
            if let Some(dir) = std::env::var_os("NVMUX_POWERCUT_KEEP") {
                keep_failure(Path::new(&dir), rec, &img, st.p, dp, failures.len());
            }
            failures.push(format!("{what}:\n    {}", probs.join("\n    ")));
            if a.fail_fast {
                return Ok((done + 1, failures));
            }
        }
        done += 1;
        progress(failures.len());
    }
    Ok((done, failures))
}

/// Debugging aid (`NVMUX_POWERCUT_KEEP=DIR`): keep a failing crash image and a text
/// dump of the log it was cut from.
fn keep_failure(dir: &Path, rec: &Recording, img: &[u8], p: usize, dp: usize, n: usize) {
    let base = dir.join(format!("powercut-{}-{n}", rec.workload));
    let _ = std::fs::write(base.with_extension("img"), img);
    let mut t = format!("cut {p}, durable up to {dp}\n");
    for (i, e) in rec.events.iter().enumerate() {
        let _ = match e {
            Event::Write { off, data, fua } => writeln!(
                t,
                "{i} write {off} {} fua={fua} id={}",
                data.len(),
                u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]))
            ),
            Event::Zero { off, len } => writeln!(t, "{i} zero {off} {len}"),
            Event::FlushStart { id } => writeln!(t, "{i} flush-start {id}"),
            Event::FlushEnd { id } => writeln!(t, "{i} flush-end {id}"),
        };
    }
    let _ = std::fs::write(base.with_extension("log"), t);
}

/// The latest barrier for `vol` in effect at cut `p`.
fn durable_g(m: &Model, vol: usize, p: usize) -> u64 {
    m.barriers
        .iter()
        .filter(|b| b.pos <= p && b.vol.is_none_or(|v| v == vol))
        .map(|b| b.g)
        .max()
        .unwrap_or(0)
}

fn check_blocks(
    m: &Model,
    vi: usize,
    p: usize,
    data: &[u8],
    first_blk: u64,
    xts: Option<&Xts>,
    probs: &mut Vec<String>,
) {
    let mv = &m.vols[vi];
    // Through the crypt function, a block never written reads as zeros decrypted.
    let zeros_through = |blk: u64, b: &[u8]| {
        xts.is_some_and(|x| {
            let mut z = vec![0u8; BLK as usize];
            x.decrypt(&mut z, 512, blk * 8);
            z == b
        })
    };
    let dg = durable_g(m, vi, p);
    for (i, b) in data.chunks(BLK as usize).enumerate() {
        if probs.len() >= MAX_PROBLEMS {
            return;
        }
        let blk = first_blk + i as u64;
        let h = mv.blocks.get(blk as usize).map_or(&[][..], |h| &h[..]);
        let id = identify(blk, b).or_else(|| zeros_through(blk, b).then_some(0));
        match id {
            None => probs.push(format!(
                "{:?} block {blk} (byte {}): holds neither zeros nor any one write's data",
                mv.name,
                blk * BLK
            )),
            Some(id) => {
                if let Err(why) = allowed(h, p, dg, id) {
                    probs.push(format!(
                        "{:?} block {blk} (byte {}): {why}: an acknowledged write is lost",
                        mv.name,
                        blk * BLK
                    ));
                }
            }
        }
    }
}

fn check_file_state(rec: &Recording, img: &[u8], p: usize) -> Vec<String> {
    let mut probs = Vec::new();
    check_blocks(&rec.model, 0, p, img, 0, None, &mut probs);
    probs
}

/// The sizes volume `mv` may have at cut `p`.
fn sizes_at(mv: &MVol, p: usize) -> Vec<u64> {
    let mut cur = mv.size0;
    let mut maybe = Vec::new();
    for &(s, e, old, new) in &mv.resizes {
        if e <= p {
            cur = new;
        } else if s < p {
            maybe.push(old);
            maybe.push(new);
            cur = old;
        }
    }
    maybe.push(cur);
    maybe
}

fn check_pool_state(rec: &Recording, path: &Path, p: usize) -> Vec<String> {
    let mut probs = Vec::new();
    match nvmux_volume::check(path) {
        Ok(r) if r.ok() => {}
        Ok(r) => probs.push(format!("pool check: {}", r.errors.join("; "))),
        Err(e) => probs.push(format!("pool check: {e}")),
    }
    let pool = match nvmux_daemon::pools::open_pool(path) {
        Ok(p) => p,
        Err(e) => {
            probs.push(format!("pool open (journal replay): {e}"));
            return probs;
        }
    };
    let m = &rec.model;
    for (vi, mv) in m.vols.iter().enumerate() {
        if probs.len() >= MAX_PROBLEMS {
            break;
        }
        let initial = mv.created == (0, 0);
        let must = (initial || p >= mv.created.1) && mv.deleted.is_none_or(|d| p <= d.0);
        let may = (initial || p > mv.created.0) && mv.deleted.is_none_or(|d| p < d.1);
        let info = pool.volume(&mv.name);
        // A later volume of the same name (none today) would make this ambiguous.
        let Some(info) = info else {
            if must {
                probs.push(format!("volume {:?} is missing", mv.name));
            }
            continue;
        };
        if !may {
            if mv.deleted.is_some() {
                probs.push(format!("deleted volume {:?} is back", mv.name));
            } else {
                probs.push(format!("volume {:?} exists before it was created", mv.name));
            }
            continue;
        }
        let sizes = sizes_at(mv, p);
        if !sizes.contains(&info.size) {
            probs.push(format!(
                "volume {:?} is {} bytes, expected one of {sizes:?}",
                mv.name, info.size
            ));
            continue;
        }
        let len = sizes.iter().copied().min().unwrap_or(0).min(info.size);
        if let Err(e) = read_check(rec, &pool, vi, len, p, &mut probs) {
            probs.push(format!("volume {:?}: {e}", mv.name));
        }
    }
    if let Err(e) = pool.close() {
        probs.push(format!("close after replay: {e}"));
    }
    drop(pool);
    // The pool's watchdog thread may hold the last reference for a moment after the drop
    // (it looks at the pool every few milliseconds), and with it the file's lock: a
    // check that finds the pool in use is tried again, for up to 2 s.
    let mut checked = nvmux_volume::check(path);
    let t0 = std::time::Instant::now();
    while checked
        .as_ref()
        .is_err_and(|e| e.kind == nvmux_core::ErrorKind::Busy)
        && t0.elapsed() < std::time::Duration::from_secs(2)
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
        checked = nvmux_volume::check(path);
    }
    match checked {
        Ok(r) if r.ok() => {}
        Ok(r) => probs.push(format!(
            "pool check after open and close: {}",
            r.errors.join("; ")
        )),
        Err(e) => probs.push(format!("pool check after open and close: {e}")),
    }
    probs
}

fn read_check(
    rec: &Recording,
    pool: &Arc<Pool>,
    vi: usize,
    len: u64,
    p: usize,
    probs: &mut Vec<String>,
) -> Res<()> {
    let mv = &rec.model.vols[vi];
    let dev = thin_dev(pool, &mv.name, mv.crypt.then_some(&rec.key))?;
    let mut q = dev.open_queue(4).map_err(|e| e.to_string())?;
    let xts = mv.crypt.then(|| Xts::new(&rec.key));
    let bs = dev.info().block_size as u64;
    const CHUNK: u64 = 256 << 10;
    let buf = AlignedBuf::new(CHUNK as usize);
    let mut off = 0;
    while off < len && probs.len() < MAX_PROBLEMS {
        let n = CHUNK.min(len - off);
        let cmd = IoCommand::new(
            Opcode::Read,
            off / bs,
            (n / bs) as u32,
            7,
            buf.sg(0, n as usize),
        );
        q.submit(cmd);
        q.kick();
        let t = Instant::now();
        let mut st = None;
        while st.is_none() {
            q.poll(&mut |_, s| st = Some(s));
            if st.is_none() {
                if t.elapsed() > HANG {
                    return Err(format!("a read at {off} did not complete"));
                }
                std::thread::yield_now();
            }
        }
        if st != Some(Status::SUCCESS) {
            return Err(format!("read at {off} failed: {st:?}"));
        }
        check_blocks(
            &rec.model,
            vi,
            p,
            &buf.as_slice()[..n as usize],
            off / BLK,
            xts.as_ref(),
            probs,
        );
        off += n;
    }
    Ok(())
}

// ---------------------------------------------------------------- the command

pub fn run(mut a: PowercutArgs) -> Result<(), Box<dyn std::error::Error>> {
    if a.long && a.states < 100_000 {
        a.states = 100_000;
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut wls: Vec<&'static str> = Vec::new();
    for w in &a.workload {
        match WORKLOADS.iter().find(|x| **x == w.as_str()) {
            Some(x) => wls.push(x),
            None => {
                return Err(format!(
                    "unknown workload {w:?}: choose from {}",
                    WORKLOADS.join(", ")
                )
                .into())
            }
        }
    }
    if wls.is_empty() {
        wls = WORKLOADS.to_vec();
    }
    let rounds = a.rounds.unwrap_or(if a.long { 20 } else { 1 }).max(1);
    let per = a.states.div_ceil(wls.len() as u64 * rounds).max(1);
    let total = per * wls.len() as u64 * rounds;
    println!(
        "power-cut simulator: seed {seed:#x}, {} workloads x {rounds} rounds, {per} crash states each ({total} in all); pools in {}, crash images in {}",
        wls.len(),
        a.dir.display(),
        a.state_dir.display()
    );
    let t0 = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let checked = AtomicU64::new(0);
    let mut summary = String::new();
    let last = Mutex::new(Instant::now());
    'outer: for round in 0..rounds {
        for (wi, w) in wls.iter().enumerate() {
            let s = mix(seed ^ ((round * 64 + wi as u64) << 8));
            let tr = Instant::now();
            let rec = record(w, &a.dir, s)?;
            let rec_time = tr.elapsed();
            problems.extend(rec.problems.iter().cloned());
            let before = failures.len();
            let tc = Instant::now();
            let before_total = failures.len();
            let progress = |failing: usize| {
                let c = checked.fetch_add(1, Ordering::Relaxed) + 1;
                let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
                if l.elapsed() > Duration::from_secs(2) {
                    *l = Instant::now();
                    eprintln!(
                        "  {w}: {c}/{total} crash states, {} failing, {:.0} s",
                        before_total + failing,
                        t0.elapsed().as_secs_f64()
                    );
                }
            };
            let n = check_states(&rec, per, s ^ 0x5eed, &a, &progress, &mut failures)?;
            let bad = failures.len() - before;
            let _ = writeln!(
                summary,
                "  {w:<9} round {round}: {} writes, {} logged changes, recorded in {:.1} s; {n} crash states in {:.1} s, {bad} failing",
                rec.writes,
                rec.events.len(),
                rec_time.as_secs_f64(),
                tc.elapsed().as_secs_f64()
            );
            if a.fail_fast && bad > 0 {
                break 'outer;
            }
        }
    }
    print!("{summary}");
    let checked = checked.load(Ordering::Relaxed);
    for f in failures.iter().take(20) {
        println!("FAIL {f}");
    }
    if failures.len() > 20 {
        println!("... and {} more failing states", failures.len() - 20);
    }
    for p in &problems {
        println!("PROBLEM {p}");
    }
    println!(
        "summary: {checked} crash states checked in {:.1} s, {} failing (lost acknowledged writes or pool check failures), {} workload problems",
        t0.elapsed().as_secs_f64(),
        failures.len(),
        problems.len()
    );
    if failures.is_empty() && problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} crash states failed and {} workload problems were found (seed {seed:#x})",
            failures.len(),
            problems.len()
        )
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_identify_their_write() {
        let mut b = vec![0u8; 4096];
        assert_eq!(identify(3, &b), Some(0));
        for (i, s) in b.chunks_mut(512).enumerate() {
            fill_sector(42, 3 * 8 + i as u64, s);
        }
        assert_eq!(identify(3, &b), Some(42));
        assert_eq!(identify(4, &b), None, "another block's data");
        b[600] ^= 1;
        assert_eq!(identify(3, &b), None);
    }

    #[test]
    fn what_a_block_may_read() {
        let w = |id, done_g, sub_pos, done_pos, fua| Wr {
            id,
            done_g,
            sub_pos,
            done_pos,
            fua,
        };
        let h = [
            w(1, 2, 0, 5, false),
            w(2, 4, 6, 9, false),
            w(3, 6, 10, 12, true),
        ];
        // Nothing durable yet: zeros, or anything submitted before the cut.
        assert!(allowed(&h, 8, 0, 0).is_ok());
        assert!(allowed(&h, 8, 0, 2).is_ok());
        assert!(allowed(&h, 8, 0, 3).is_err(), "submitted after the cut");
        // A flush submitted at guest time 3 covers write 1.
        assert!(allowed(&h, 8, 3, 0).is_err(), "write 1 was flushed");
        assert!(allowed(&h, 8, 3, 1).is_ok());
        // The FUA write 3 is durable once acknowledged.
        assert!(allowed(&h, 12, 3, 2).is_err());
        assert!(allowed(&h, 12, 3, 3).is_ok());
    }
}
