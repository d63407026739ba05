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
    #[arg(value_parser = ["suite"])]
    what: Option<String>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
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
            classifiers: a.classifiers,
            fair_depth: a.fair_depth,
            cluster_size: a.cluster_size,
            rounds: a.rounds,
            idle_clients: a.idle_clients,
        }
    }
}
