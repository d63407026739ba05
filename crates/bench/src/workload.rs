//! Random-I/O workloads driven through a [`BlkioClient`] queue.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Completion, ReqFlags};
use serde::{Deserialize, Serialize};

use crate::client::{BlkioClient, Op, Req, Result};

/// Latency histogram resolution and range: 100 ns buckets up to 20 ms.
const LAT_RES_NS: u64 = 100;
const LAT_BUCKETS: usize = 200_000;

#[derive(Clone, Debug)]
pub struct Workload {
    /// Read or Write; with `read_pct`, the mix's kinds are read and write.
    pub op: Op,
    /// A random mix: this percentage of commands are reads, the rest writes.
    pub read_pct: Option<u8>,
    pub block_size: usize,
    pub queue_depth: usize,
    pub duration: Duration,
    pub queue: usize,
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measured {
    pub ios: u64,
    pub seconds: f64,
    pub iops: f64,
    pub p50_us: f64,
    #[serde(default)]
    pub p95_us: f64,
    pub p99_us: f64,
}

/// A latency histogram with fixed buckets (no allocation while recording).
pub struct LatHist {
    b: Vec<u32>,
    n: u64,
}

impl Default for LatHist {
    fn default() -> Self {
        LatHist {
            b: vec![0; LAT_BUCKETS + 1],
            n: 0,
        }
    }
}

impl LatHist {
    pub fn record(&mut self, d: Duration) {
        let i = ((d.as_nanos() as u64) / LAT_RES_NS).min(LAT_BUCKETS as u64) as usize;
        self.b[i] += 1;
        self.n += 1;
    }
    /// Percentile in µs (bucket upper bound).
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let want = ((self.n as f64) * p).ceil().max(1.0) as u64;
        let mut acc = 0u64;
        for (i, &c) in self.b.iter().enumerate() {
            acc += c as u64;
            if acc >= want {
                return ((i as u64 + 1) * LAT_RES_NS) as f64 / 1000.0;
            }
        }
        (LAT_BUCKETS as u64 * LAT_RES_NS) as f64 / 1000.0
    }
}

/// A small, fast PRNG (xorshift64*), seeded for repeatable offsets.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Workload {
    /// This workload as a random mix with `read_pct`% reads.
    pub fn mixed(mut self, read_pct: u8) -> Workload {
        self.read_pct = Some(read_pct.min(100));
        self
    }

    /// The kind of the next command.
    pub fn pick(&self, rng: &mut Rng) -> Op {
        match self.read_pct {
            Some(p) if (rng.next_u64() % 100) < p as u64 => Op::Read,
            Some(_) => Op::Write,
            None => self.op,
        }
    }

    /// `bs`-byte random `op` at `qd` on queue 0 for `secs` seconds.
    pub fn random(op: Op, bs: usize, qd: usize, secs: u64) -> Workload {
        Workload {
            op,
            read_pct: None,
            block_size: bs,
            queue_depth: qd,
            duration: Duration::from_secs(secs),
            queue: 0,
        }
    }
}

/// Connect a one-queue client to `sock` and run `w` on it.
pub fn run_on(sock: &Path, w: &Workload) -> Result<Measured> {
    let mut c = BlkioClient::connect(sock, 1, false, w.queue_depth.max(1) * w.block_size)?;
    run(&mut c, w)
}

/// Run `w` on every socket at once, one client thread each; results in socket order.
pub fn run_on_each<P: AsRef<Path> + Sync>(socks: &[P], w: &Workload) -> Result<Vec<Measured>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = socks
            .iter()
            .map(|sock| s.spawn(move || run_on(sock.as_ref(), w)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    })
}

/// Run `w` on queue `w.queue`. The client's buffer must hold `queue_depth * block_size`.
pub fn run(c: &mut BlkioClient, w: &Workload) -> Result<Measured> {
    let bs = w.block_size;
    let qd = w.queue_depth.max(1);
    if c.buf().len() < qd * bs {
        return Err(format!("buffer region too small for QD{qd} x {bs}"));
    }
    let blocks = c.capacity() / bs as u64;
    if blocks == 0 {
        return Err("disk smaller than one block".into());
    }
    if w.op == Op::Write || w.read_pct.is_some() {
        let buf = c.buf();
        for (i, b) in buf[..qd * bs].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
    }
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut started = vec![Instant::now(); qd];
    let mut hist = LatHist::default();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let t0 = Instant::now();
    let end = t0 + w.duration;
    let issue = |c: &mut BlkioClient, rng: &mut Rng, slot: usize| {
        let offset = (rng.next_u64() % blocks) * bs as u64;
        let r = Req {
            op: w.pick(rng),
            offset,
            len: bs,
            buf_off: slot * bs,
        };
        c.enqueue(w.queue, r, slot, ReqFlags::empty());
    };
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        issue(c, &mut rng, slot);
    }
    let mut outstanding = qd;
    let mut ios = 0u64;
    while outstanding > 0 {
        let n = c.reap(w.queue, &mut comps, 1, Duration::from_secs(10))?;
        let now = Instant::now();
        let more = now < end;
        for comp in comps.iter().take(n) {
            // SAFETY: reap reported n initialised completions.
            let comp = unsafe { comp.assume_init_read() };
            if comp.ret != 0 {
                return Err(format!(
                    "{:?} failed: {}",
                    w.op,
                    std::io::Error::from_raw_os_error(-comp.ret)
                ));
            }
            let slot = comp.user_data;
            hist.record(now - started[slot]);
            ios += 1;
            if more {
                started[slot] = now;
                issue(c, &mut rng, slot);
            } else {
                outstanding -= 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(Measured {
        ios,
        seconds: secs,
        iops: ios as f64 / secs,
        p50_us: hist.percentile_us(0.50),
        p95_us: hist.percentile_us(0.95),
        p99_us: hist.percentile_us(0.99),
    })
}
