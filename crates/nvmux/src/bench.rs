//! `nvmux bench`'s command line; the runs themselves live in the `nvmux-bench` crate
//! ([`nvmux_bench::run`]).

use std::path::PathBuf;

use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// `suite`: the evaluation suite (the ICPE'22 matrix on bare metal, nvmux vhost-user,
    /// NBD and NVMe/TCP, QSD, qemu-nbd and nbdkit; multi-VM scaling; JSON, markdown and
    /// PNG plots; last, db_bench in QEMU guests). With --quick, a slice of the matrix and
    /// a short db_bench in under 5 minutes.
    ///
    /// `verify`: a seeded write/verify load on the vhost-user-blk --socket (libblkio):
    /// blocks that encode (offset, generation, seed) at random offsets, every read
    /// checked, everything written read back at the end; prints one summary line
    /// (writes, reads, errors, mismatches, max latency, longest stall) and fails on any
    /// I/O error or mismatch. `--verify-only` re-reads (against --map if given).
    ///
    /// `nvmf-probe`: connect to the NVMe/TCP target --remote NQN@HOST:PORT with the
    /// built-in test initiator, identify the controller and namespace --nsid, read its
    /// ANA log, write and read back one block of the last 4 KiB (unless --read-only).
    #[arg(value_parser = ["suite", "verify", "nvmf-probe"])]
    what: Option<String>,
    /// Seconds per measurement (`verify`: how long the mixed phase runs).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// `verify`: instead of --seconds, write this many times the disk's size.
    #[arg(long)]
    passes: Option<u64>,
    /// `verify`: requests in flight per queue.
    #[arg(long, default_value_t = 16)]
    qd: usize,
    /// `verify`: libblkio queues.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// `verify`: request sizes (comma separated, multiples of 4k), picked at random.
    #[arg(long, default_value = "4k,64k")]
    bs: String,
    /// `verify`: the seed of offsets, sizes and block contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `verify`: write nothing; read the whole disk and check every 4 KiB block (against
    /// --map, else: zeros or a well-formed block of this seed for its offset).
    #[arg(long)]
    verify_only: bool,
    /// `verify`: the expected-content map a write run saves and --verify-only loads.
    #[arg(long)]
    map: Option<PathBuf>,
    /// `verify`: give up (fail) when nothing completes for this many seconds.
    #[arg(long, default_value_t = 30)]
    io_timeout: u64,
    /// `nvmf-probe`: the target, NQN@HOST:PORT.
    #[arg(long)]
    remote: Option<String>,
    /// `nvmf-probe`: the namespace.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// `nvmf-probe`: no write.
    #[arg(long)]
    read_only: bool,
    /// 2 seconds per measurement (with `suite`: the quick slice of the matrix, 1 s per run).
    #[arg(long)]
    quick: bool,
    /// Use a polled libblkio queue (the client busy-polls its completions).
    #[arg(long)]
    client_poll: bool,
    /// Where JSON results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Size of the test files.
    #[arg(long, default_value = "1G")]
    file_size: String,
    /// Skip qemu-storage-daemon and fio.
    #[arg(long)]
    no_baselines: bool,
    /// Only drive this existing vhost-user-blk socket (any server) and print the results.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Only run workloads whose name contains this, e.g. "randread QD32", or whose
    /// "backing workload" does, e.g. "null" or "null randread QD32". With `suite`,
    /// `dbbench` runs only the db_bench stage (RocksDB in a QEMU guest on four paths),
    /// `vfio-user` only the guest-path stage (4 KiB random reads of one QEMU 11 guest
    /// through vfio-user NVMe, vhost-user-blk and NVMe/TCP, with host CPU per I/O).
    #[arg(long)]
    only: Option<String>,
    /// Run the pool suite instead: thin volumes vs QSD qcow2 vs a raw-file disk.
    #[arg(long)]
    pool: bool,
    /// Run the encryption suite instead: encrypted vs plain nvmux disk vs QSD luks.
    #[arg(long, conflicts_with = "pool")]
    crypt: bool,
    /// Run the fairness suite instead: 4 disks on one pool saturated at once, vs QSD.
    #[arg(long, conflicts_with_all = ["pool", "crypt"])]
    fair: bool,
    /// Run the NVMe/TCP suite instead: NVMe/TCP (host initiator) vs vhost-user vs fio.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair"])]
    nvmf: bool,
    /// Run the router suite instead: no classifier vs the pass-through and example
    /// classifiers vs the external-function path, on one /dev/shm file disk.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf"])]
    router: bool,
    /// Run the hostile-peer suite instead: a victim disk's IOPS at rest and while each
    /// attack of the attacker suite runs (NVMe/TCP and NBD length fields, floods,
    /// slow handshakes, half-open and non-reading peers).
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router"])]
    hostile: bool,
    /// Run the NBD-over-TLS suite instead: nvmux and qemu-nbd, plaintext, TLS X.509 (fio)
    /// and TLS-PSK (nbdcopy), on one /dev/shm file.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router", "hostile"])]
    nbd_tls: bool,
    /// Measure the I/O pause instead: the longest completion latency a libblkio client
    /// sees during `nvmux upgrade` (5 times) and during SIGKILL plus a restart.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router", "hostile", "nbd_tls"])]
    restart: bool,
    /// Run the mirror suite instead: a disk on one /dev/shm file vs mirrored to a second
    /// one (the mirror's write cost), and a remote NVMe/TCP backend (a second nvmux
    /// daemon) vs the same disk served locally.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router", "hostile", "nbd_tls", "restart"])]
    mirror: bool,
    /// Run the RBD suite instead: one Ceph RBD image (the cluster of $CEPH_CONF) served
    /// by nvmux and by qemu-storage-daemon's rbd driver (both over vhost-user, libblkio
    /// client) and driven by fio's rbd engine (the bound); 4 KiB random read and write at
    /// QD1 and QD32, the librbd cache off for all three.
    #[arg(long, conflicts_with_all = ["pool", "crypt", "fair", "nvmf", "router", "hostile", "nbd_tls", "restart", "mirror"])]
    rbd: bool,
    /// With --rbd: the image, POOL/IMAGE (default rbd/nvmux-bench). Created when missing
    /// and marked as the bench's (image-meta key nvmux-bench); an existing image without
    /// that mark is refused, since the bench overwrites it.
    #[arg(long, requires = "rbd")]
    image: Option<String>,
    /// With --rbd: the image's size when the bench creates it (default 1G).
    #[arg(long, requires = "rbd")]
    size: Option<String>,
    /// With --router: the directory of the example classifiers' sources (default: the
    /// source tree's examples/classifiers).
    #[arg(long)]
    classifiers: Option<PathBuf>,
    /// With --fair: the daemon's qos.fair_depth for the "on" rows.
    #[arg(long, default_value_t = 64)]
    fair_depth: u32,
    /// With --pool: the pool's cluster size, e.g. 256K (default 64K).
    #[arg(long, default_value = "64K")]
    cluster_size: String,
    /// Rounds of the nvmux/QSD rows: each round measures nvmux, then QSD, on every
    /// workload (interleaved); the table shows the medians and the JSON every round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Idle figure: this many null disks, each exported over vhost-user with a libblkio
    /// client attached and idle, while the daemon's CPU is measured for 5 s (0: skip).
    #[arg(long, default_value_t = 100)]
    idle_clients: usize,
}

type Res = Result<(), Box<dyn std::error::Error>>;

/// `nvmux bench ...`: `verify` and `nvmf-probe` here, the rest in the bench crate.
pub fn run(a: BenchArgs) -> Res {
    match a.what.as_deref() {
        Some("verify") => verify(&a),
        Some("nvmf-probe") => nvmf_probe(&a),
        _ => Ok(nvmux_bench::run::run(a.into())?),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 1usize << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("bad size {s:?}"))
}

fn verify(a: &BenchArgs) -> Res {
    let socket = a.socket.clone().ok_or("bench verify needs --socket")?;
    let block_sizes =
        a.bs.split(',')
            .map(parse_size)
            .collect::<Result<Vec<_>, _>>()?;
    let args = nvmux_bench::verify::VerifyArgs {
        socket,
        seconds: a.seconds,
        passes: a.passes,
        qd: a.qd,
        queues: a.queues,
        block_sizes,
        seed: a.seed,
        verify_only: a.verify_only,
        map: a.map.clone(),
        io_timeout: std::time::Duration::from_secs(a.io_timeout.max(1)),
    };
    let s = nvmux_bench::verify::run_verify(&args)?;
    println!("{s}");
    if s.ok() {
        Ok(())
    } else {
        Err(format!("{} I/O errors, {} mismatches", s.errors, s.mismatches).into())
    }
}

/// NQN@HOST:PORT -> (NQN, address).
fn parse_remote(r: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (nqn, addr) = r
        .rsplit_once('@')
        .ok_or_else(|| format!("{r:?}: want NQN@HOST:PORT"))?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    Ok((nqn.to_string(), addr))
}

fn nvmf_probe(a: &BenchArgs) -> Res {
    use nvmux_bench::nvmf::{Host, HostOpts, Sqe};
    let remote = a
        .remote
        .as_deref()
        .ok_or("bench nvmf-probe needs --remote NQN@HOST:PORT")?;
    let (nqn, addr) = parse_remote(remote)?;
    let hostnqn = "nqn.2014-08.org.nvmexpress:uuid:6e766d75-7800-4000-8000-0000000000b1";
    let opts = HostOpts {
        nr_io: 1,
        entries: 32,
        ..Default::default()
    };
    let mut h = Host::connect_with(addr, &nqn, hostnqn, &opts)?;
    let ctrl = h.identify(1, 0)?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    if ctrl.len() < 4096 {
        return Err("short identify controller".into());
    }
    let anacap = ctrl[343];
    println!(
        "nvmf-probe: {addr} {nqn}: controller {} model {:?} serial {:?} firmware {:?}, ANA capabilities {anacap:#x}",
        h.cntlid,
        text(&ctrl[24..64]),
        text(&ctrl[4..24]),
        text(&ctrl[64..72])
    );
    let ns = h.identify(0, a.nsid)?;
    if ns.len() < 4096 {
        return Err("short identify namespace".into());
    }
    let nsze = u64::from_le_bytes(ns[0..8].try_into().map_err(|_| "identify")?);
    let flbas = (ns[26] & 0x0f) as usize;
    let lbads = ns[128 + flbas * 4 + 2];
    if !(9..=16).contains(&lbads) || nsze == 0 {
        return Err(format!(
            "namespace {}: size {nsze}, LBA data size 2^{lbads}: not usable",
            a.nsid
        )
        .into());
    }
    let lba = 1u64 << lbads;
    let anagrpid = u32::from_le_bytes(ns[92..96].try_into().map_err(|_| "identify")?);
    println!(
        "nvmf-probe: namespace {}: {} bytes ({nsze} blocks of {lba}), ANA group {anagrpid}",
        a.nsid,
        nsze * lba
    );
    if anacap != 0 {
        // ANA log page (0x0c): 16-byte header, then 32-byte group descriptors (+ NSIDs).
        let numd = (4096 / 4 - 1) as u32;
        let page = h
            .admin
            .admin_read(Sqe::new(0x02, 0).cdw(10, 0x0c | numd << 16), 4096)?;
        let ngroups = u16::from_le_bytes([page[8], page[9]]) as usize;
        let mut off = 16;
        for _ in 0..ngroups.min(32) {
            if off + 32 > page.len() {
                break;
            }
            let grp = u32::from_le_bytes(page[off..off + 4].try_into().map_err(|_| "ana")?);
            let nns =
                u32::from_le_bytes(page[off + 4..off + 8].try_into().map_err(|_| "ana")?) as usize;
            let state = match page[off + 16] & 0x0f {
                1 => "optimized",
                2 => "non-optimized",
                3 => "inaccessible",
                4 => "persistent-loss",
                0xf => "change",
                _ => "unknown",
            };
            println!("nvmf-probe: ANA group {grp}: {state} ({nns} namespaces)");
            off += 32 + nns.min(1024) * 4;
        }
    }
    let q = h.io.get_mut(0).ok_or("no I/O queue granted")?;
    let nlb = (4096 / lba).max(1) as u32;
    let len = nlb as usize * lba as usize;
    let slba = nsze.saturating_sub(nlb as u64);
    let (c, before) = q.cmd(Sqe::read(a.nsid, slba, nlb), None, len)?;
    if !c.ok() {
        return Err(format!("read: status {:#x}", c.status).into());
    }
    if !a.read_only {
        let pattern: Vec<u8> = (0..len).map(|i| (i as u8) ^ 0xa5).collect();
        let (c, _) = q.cmd(Sqe::write(a.nsid, slba, nlb), Some(&pattern), 0)?;
        if !c.ok() {
            return Err(format!("write: status {:#x}", c.status).into());
        }
        let (c, back) = q.cmd(Sqe::read(a.nsid, slba, nlb), None, len)?;
        if !c.ok() || back != pattern {
            return Err("the block written did not read back".into());
        }
        let (c, _) = q.cmd(Sqe::write(a.nsid, slba, nlb), Some(&before), 0)?;
        if !c.ok() {
            return Err(format!("restoring write: status {:#x}", c.status).into());
        }
        println!("nvmf-probe: wrote, read back and restored {len} bytes at block {slba}");
    }
    h.shutdown()?;
    Ok(())
}

impl From<BenchArgs> for nvmux_bench::run::BenchArgs {
    fn from(a: BenchArgs) -> Self {
        nvmux_bench::run::BenchArgs {
            suite: a.what.as_deref() == Some("suite"),
            seconds: a.seconds,
            quick: a.quick,
            client_poll: a.client_poll,
            out: a.out,
            file_size: a.file_size,
            no_baselines: a.no_baselines,
            socket: a.socket,
            only: a.only,
            pool: a.pool,
            crypt: a.crypt,
            fair: a.fair,
            nvmf: a.nvmf,
            router: a.router,
            hostile: a.hostile,
            nbd_tls: a.nbd_tls,
            restart: a.restart,
            mirror: a.mirror,
            rbd: a.rbd,
            image: a.image,
            size: a.size,
            classifiers: a.classifiers,
            fair_depth: a.fair_depth,
            cluster_size: a.cluster_size,
            rounds: a.rounds,
            idle_clients: a.idle_clients,
        }
    }
}
