//! The nvmux command line: `serve` runs the daemon; the other commands are thin clients
//! of its HTTP/JSON API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nvmux_daemon::client::ApiClient;
use serde_json::{json, Value};

mod bench;
mod demo;
mod image;
mod powercut;

#[derive(Parser)]
#[command(
    name = "nvmux",
    version,
    about = "Share NVMe drives and files among VMs as fast virtual disks"
)]
struct Cli {
    /// API socket of the daemon.
    #[arg(
        long,
        global = true,
        env = "NVMUX_API",
        default_value = "./nvmux-data/nvmux.sock"
    )]
    api: PathBuf,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon (until SIGINT or SIGTERM).
    Serve(ServeArgs),
    /// Create, list, show and delete disks; snapshots, clones and resize of pool disks.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Pools: one file or block device carved into thin volumes.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Serve disks to VMs and tools.
    #[command(subcommand)]
    Export(ExportCmd),
    /// NVMe/TCP subsystems: NQNs whose namespaces are disks, host allow-lists, listeners.
    #[command(subcommand)]
    Subsystem(SubsystemCmd),
    /// The key-encryption key (KEK) of encrypted disks.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Check a classifier object offline, as `disk set-classifier` would (no daemon):
    /// load it, verify it, JIT-compile it, and print its maps and instructions.
    CheckClassifier {
        /// The object file (`clang -O2 -target bpf -c prog.c -o prog.o`).
        object: PathBuf,
        /// The program's section (default: the object's only program).
        #[arg(long)]
        section: Option<String>,
        /// Also print every instruction.
        #[arg(long)]
        disassemble: bool,
    },
    /// Replace the running daemon by a new binary without a reconnect: listening
    /// sockets, vhost-user sessions (guest memory, rings) and the API socket move to
    /// the new process; NBD and NVMe/TCP connections are drained and closed (clients
    /// reconnect). If the new binary fails before it takes over, the running daemon
    /// keeps serving. See docs/operations.md, "Upgrade".
    Upgrade {
        /// The new binary (default: the running daemon's own executable).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Time the new binary has for each step (start, health check, start-up), e.g.
        /// 30s or 500ms.
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Per-disk I/O statistics and per-worker load.
    Stats {
        /// Only this disk.
        disk: Option<String>,
    },
    /// Print the Prometheus metrics text.
    Metrics,
    /// Benchmark nvmux against qemu-storage-daemon and bare-metal fio (see docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Start a daemon on the embedded default, export a disk and drive it with libblkio.
    Demo(demo::DemoArgs),
    /// The power-cut simulator: record pool workloads, rebuild the states a power cut
    /// could leave the device in, and check each (pool check, journal replay, every
    /// acknowledged write reads back). No daemon needed.
    Powercut(powercut::PowercutArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file (default: the embedded default; see docs/config.md).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override the data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override the API socket path (default <data-dir>/nvmux.sock).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Override the number of worker threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Override keys.kek_file: the file holding the key-encryption key of encrypted
    /// disks (32 raw bytes or 64 hex digits).
    #[arg(long)]
    kek_file: Option<PathBuf>,
    /// Take over from the running daemon that started this process through this
    /// private socket (`nvmux upgrade` passes it; not for interactive use).
    #[arg(long, hide = true)]
    takeover: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Re-wrap every encrypted disk's data key under a new KEK and use it from now on
    /// (no data is touched). Then set keys.kek_file to the new file before the next start.
    Rotate {
        /// File holding the new KEK (32 raw bytes or 64 hex digits).
        #[arg(long)]
        kek_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Create a disk.
    Create {
        name: String,
        /// file, null, memory, nvmf (a remote NVMe/TCP namespace: give --remote) or rbd (a
        /// Ceph RBD image: give --image).
        #[arg(long, default_value = "file")]
        backend: String,
        /// rbd backend: the image, POOL[/NAMESPACE]/IMAGE, created with --size when it does
        /// not exist (or cloned, with --from-snapshot); POOL[/NAMESPACE]/IMAGE@SNAP serves a
        /// snapshot, read-only. The cluster is the daemon's `[rbd]` config (default:
        /// $CEPH_CONF or /etc/ceph/ceph.conf, client admin).
        #[arg(long)]
        image: Option<String>,
        /// nvmf backend: the remote namespace, NQN@HOST:PORT[,HOST:PORT...] (paths in order
        /// of preference; the target's ANA states override it). Size and block size come
        /// from the namespace.
        #[arg(long)]
        remote: Option<String>,
        /// nvmf backend: the namespace id (default 1).
        #[arg(long)]
        nsid: Option<u32>,
        /// nvmf backend: once every path is lost, commands wait this long for one and then
        /// fail, e.g. 30s (the default) or 500ms.
        #[arg(long)]
        loss_timeout: Option<String>,
        /// nvmf backend: DH-HMAC-CHAP host secret (DHHC-1:...).
        #[arg(long, env = "NVMUX_DHCHAP_SECRET", hide_env_values = true)]
        dhchap_secret: Option<String>,
        /// nvmf backend: the controller's DH-HMAC-CHAP secret (bidirectional authentication).
        #[arg(long, env = "NVMUX_DHCHAP_CTRL_SECRET", hide_env_values = true)]
        dhchap_ctrl_secret: Option<String>,
        /// File or block device (file backend). Default: <data-dir>/disks/<name>.img.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Size, e.g. 10G. Required unless an existing file gives it.
        #[arg(long)]
        size: Option<String>,
        /// Logical block size: 512 or 4096 (default: the device's own, else 512).
        #[arg(long)]
        block_size: Option<u32>,
        #[arg(long)]
        read_only: bool,
        /// Use buffered I/O instead of O_DIRECT.
        #[arg(long)]
        buffered: bool,
        /// Make the disk a thin volume in this pool.
        #[arg(long)]
        pool: Option<String>,
        /// With --pool: clone this snapshot (size defaults to the snapshot's). With
        /// --backend rbd: clone this RBD snapshot, POOL[/NAMESPACE]/IMAGE@SNAP, into --image.
        #[arg(long)]
        from_snapshot: Option<String>,
        /// With --pool: attach this existing volume or snapshot (a snapshot is read-only).
        #[arg(long, requires = "pool", conflicts_with_all = ["size", "from_snapshot"])]
        volume: Option<String>,
        /// Encrypt with AES-XTS-256 (aes-xts-plain64) under a new random data key, wrapped
        /// by the daemon's KEK (keys.kek_file in its config, or $NVMUX_KEK).
        #[arg(long)]
        encrypt: bool,
        /// With --encrypt: the encryption sector size, 512 (default) or 4096 (needs
        /// --block-size 4096), as dm-crypt's sector_size (cryptsetup --sector-size).
        #[arg(long, requires = "encrypt")]
        sector_size: Option<u32>,
        /// With --sector-size 4096: IVs count 4096-byte sectors instead of 512-byte units,
        /// as dm-crypt's iv_large_sectors (cryptsetup --iv-large-sectors, LUKS2).
        #[arg(long, requires = "sector_size")]
        iv_large_sectors: bool,
        /// The function chain, outermost first: a comma-separated list of qos and crypt,
        /// or `none` (default: qos, then crypt if encrypted). See docs/ARCHITECTURE.md.
        #[arg(long)]
        chain: Option<String>,
    },
    /// Mirror legs: add one to a live disk (a background full copy), remove one, show them.
    /// See docs/replication.md.
    #[command(subcommand)]
    Mirror(MirrorCmd),
    /// Move a live disk to a remote NVMe/TCP namespace: add it as a mirror leg, wait for
    /// the copy (with a progress bar), then remove the disk's other legs. Guests keep
    /// running; the old data stays where it was.
    Move {
        /// The disk.
        name: String,
        /// The destination namespace: NQN@HOST:PORT[,HOST:PORT...].
        #[arg(long)]
        to: String,
        /// The destination's namespace id (default 1).
        #[arg(long)]
        nsid: Option<u32>,
        /// Copy rate, e.g. 100M (bytes per second; default 256M; 0 is unlimited).
        #[arg(long)]
        rate: Option<String>,
        /// Give up (and take the new leg out again) after this long, e.g. 30m (default: never).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Set a disk's function chain, outermost first, e.g. `qos,crypt` or `crypt,qos`;
    /// `default` for the default, `none` for no functions. The disk must not be exported.
    Chain {
        /// The disk.
        name: String,
        /// Comma-separated functions, outermost first (qos, crypt), or `none`, or
        /// `default`.
        chain: String,
    },
    /// Set a disk's rate limits (replacing all of them; omitted ones are unlimited). They
    /// apply at once, also to exported disks. With no limit given, limits are removed.
    Qos {
        name: String,
        /// Read operations per second.
        #[arg(long)]
        iops_read: Option<u64>,
        /// Write operations per second.
        #[arg(long)]
        iops_write: Option<u64>,
        /// Read plus write operations per second.
        #[arg(long)]
        iops: Option<u64>,
        /// Read bytes per second, e.g. 100M.
        #[arg(long)]
        bps_read: Option<String>,
        /// Write bytes per second, e.g. 100M.
        #[arg(long)]
        bps_write: Option<String>,
        /// Read plus write bytes per second, e.g. 200M.
        #[arg(long)]
        bps: Option<String>,
        /// Burst allowance: how long the disk may run at full speed after an idle
        /// period, as time at the limit (default 100 ms).
        #[arg(long)]
        burst_ms: Option<u64>,
        /// Weight in fair sharing of the host device with other disks (1-10000, default
        /// 100): a disk of weight 200 gets twice the share of one of weight 100 when the
        /// device is saturated.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Crypto-erase an encrypted disk: destroy its data key and give it a new one. The old
    /// contents become unreadable at once, whatever the disk's size.
    Erase {
        name: String,
        /// Destroy the key (the only erase that keeps the disk; `disk delete --erase`
        /// zeroes and deletes).
        #[arg(long, required = true)]
        crypto: bool,
    },
    /// List disks.
    List,
    /// Show one disk.
    Show { name: String },
    /// Delete a disk (it must not be exported). A file nvmux created is removed too; a
    /// pool disk's volume is deleted (its clusters are zeroed before anyone reuses them).
    Delete {
        name: String,
        /// Zero what the disk owned before returning (file: the whole image; pool disk:
        /// its clusters), and report how long it took.
        #[arg(long)]
        erase: bool,
    },
    /// Take an instant read-only snapshot of a pool disk, or an RBD snapshot
    /// (IMAGE@SNAPSHOT, protected) of an rbd disk.
    Snapshot { disk: String, snapshot: String },
    /// Create a writable disk from a snapshot (copy-on-write): a pool snapshot with
    /// --pool, or an RBD snapshot (POOL[/NAMESPACE]/IMAGE@SNAP) cloned into a new image
    /// with --image.
    #[command(group(clap::ArgGroup::new("into").required(true).args(["pool", "image"])))]
    Clone {
        snapshot: String,
        disk: String,
        #[arg(long)]
        pool: Option<String>,
        /// The new RBD image, POOL[/NAMESPACE]/IMAGE.
        #[arg(long)]
        image: Option<String>,
        /// Size (default: the snapshot's).
        #[arg(long)]
        size: Option<String>,
    },
    /// Load a classifier (an eBPF object built with `clang -O2 -target bpf -c`) into a
    /// disk, replacing its program at once, also while the disk is in use: each command
    /// from then on is routed by it. A program that fails verification is refused with the
    /// verifier's reason, and the disk keeps its old one. `--none` removes the program.
    /// See docs/classifiers.md and examples/classifiers/.
    SetClassifier {
        name: String,
        /// The object file.
        #[arg(required_unless_present = "none")]
        object: Option<PathBuf>,
        /// The program's section (default: the object's only program).
        #[arg(long)]
        section: Option<String>,
        /// Set a map value before the program takes over: MAP:KEY=WORD[,WORD...], each
        /// WORD a u64 (decimal or 0x hex, stored little-endian). Repeatable.
        #[arg(long = "map", value_name = "MAP:KEY=WORDS")]
        maps: Vec<String>,
        /// Remove the disk's classifier: every command takes the function chain.
        #[arg(long, conflicts_with_all = ["object", "section", "maps"])]
        none: bool,
    },
    /// Show a disk's classifier, its maps, route counters and external function.
    Classifier { name: String },
    /// Whether a disk's classifier (or external function) may complete a FLUSH that the
    /// device has not flushed. `deny` (the default for every disk): such a FLUSH is sent
    /// to the device anyway, so an acknowledged flush is always durable. `allow`: the
    /// guest's flushes are acknowledged as the program decides, without durability (only
    /// for disks whose data may be lost, e.g. scratch or a cache). Kept across restarts.
    FlushPolicy {
        name: String,
        #[arg(value_parser = ["allow", "deny"])]
        policy: String,
    },
    /// Set one value of a map of a disk's classifier, live (kept across restarts).
    MapSet {
        name: String,
        map: String,
        key: u32,
        /// The value as u64 words (decimal or 0x hex, stored little-endian).
        #[arg(required = true, num_args = 1..)]
        words: Vec<String>,
    },
    /// Give a disk an external function socket: a separate process (see nvmux-fn-audit
    /// and docs/external-functions.md) attaches there and serves the commands the disk's
    /// classifier routes to it. `--none` removes it.
    SetExternal {
        name: String,
        /// The Unix socket the function process connects to.
        #[arg(long, required_unless_present = "none")]
        socket: Option<PathBuf>,
        /// What happens to its commands while no function is attached, or when it dies
        /// with commands in flight: `fail` (Namespace Not Ready) or `chain` (through the
        /// disk's function chain instead).
        #[arg(long, default_value = "fail")]
        on_failure: String,
        /// Ring entries per disk queue (a power of two up to 1024).
        #[arg(long, default_value_t = 64)]
        depth: u32,
        /// Largest command the function takes, e.g. 1M (a multiple of 4K); larger ones are
        /// handled as by --on-failure.
        #[arg(long, default_value = "1M")]
        max_io: String,
        /// Give the socket to USER[:GROUP] (names or numbers), so that an unprivileged
        /// function process may attach (default: the daemon's user only).
        #[arg(long)]
        owner: Option<String>,
        /// The socket's mode, octal (default 0600, or 0660 when --owner names a group).
        #[arg(long)]
        mode: Option<String>,
        #[arg(long, conflicts_with = "socket")]
        none: bool,
    },
    /// Copy an image into a disk, creating the disk (sized to the image) if it does not
    /// exist. Any format qemu-img reads (raw, qcow2, vmdk, ...), from a file or a URL
    /// qemu-img opens (nbd://, and http(s):// where qemu-img has its curl driver). The
    /// disk is exported over NBD on a private socket while qemu-img converts.
    Import {
        name: String,
        /// The image file or URL.
        source: String,
        /// The source's format (default: what `qemu-img info` detects).
        #[arg(long)]
        format: Option<String>,
        /// Create the disk as a thin volume in this pool.
        #[arg(long)]
        pool: Option<String>,
        /// Create the disk this large (default: the image's virtual size).
        #[arg(long)]
        size: Option<String>,
    },
    /// Copy a disk out to an image file (raw by default, or --format qcow2, ...), over a
    /// read-only NBD export of the disk.
    Export {
        name: String,
        /// The image file to write.
        dest: PathBuf,
        #[arg(long, default_value = "raw")]
        format: String,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Grow a pool or rbd disk (online: attached guests are told), or shrink it with --force.
    Resize {
        disk: String,
        size: String,
        /// Allow shrinking.
        #[arg(long)]
        force: bool,
        /// When shrinking, drop data stored past the new end.
        #[arg(long, requires = "force")]
        discard_data: bool,
    },
}

#[derive(Subcommand)]
enum MirrorCmd {
    /// Add a leg to a disk. It gets every write at once and a background full copy
    /// (rate-limited); it serves reads once the copy is done.
    Add {
        /// The disk.
        disk: String,
        /// A local file or block device (created with the disk's size if missing).
        #[arg(long, conflicts_with = "remote", required_unless_present = "remote")]
        file: Option<PathBuf>,
        /// A remote namespace: NQN@HOST:PORT[,HOST:PORT...].
        #[arg(long)]
        remote: Option<String>,
        /// Remote leg: the namespace id (default 1).
        #[arg(long, requires = "remote")]
        nsid: Option<u32>,
        /// Remote leg: how long its commands wait for a lost target before the leg is
        /// faulted, e.g. 2s (the default).
        #[arg(long, requires = "remote")]
        loss_timeout: Option<String>,
        /// The leg's name (default leg1, leg2, ...).
        #[arg(long)]
        name: Option<String>,
        /// Copy rate, e.g. 100M (bytes per second; default 256M; 0 is unlimited).
        #[arg(long)]
        rate: Option<String>,
        /// Wait until the copy is done, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Remove a leg (not the last healthy one). Its data stays where it is.
    Remove {
        /// The disk.
        disk: String,
        /// The leg (`nvmux disk mirror status` lists them).
        leg: String,
    },
    /// Show a disk's legs, their state and copy progress, and its write-intent bitmap.
    Status {
        /// The disk.
        disk: String,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Format a file or block device as a pool (or --import an existing pool).
    Create {
        name: String,
        /// File (created if missing) or block device.
        #[arg(long)]
        path: PathBuf,
        /// Size of a new pool file, e.g. 100G.
        #[arg(long)]
        size: Option<String>,
        /// Allocation unit: a power of two from 4K to 1M (default 64K).
        #[arg(long)]
        cluster_size: Option<String>,
        /// Open an existing pool instead of formatting.
        #[arg(long)]
        import: bool,
    },
    /// List pools.
    List,
    /// Show a pool's usage and volumes (snapshots included).
    Show { name: String },
    /// Verify a pool offline, like fsck (the daemon must not have it open).
    Check {
        /// The pool's file or block device.
        path: PathBuf,
    },
    /// Close a pool and forget it (its disks must be deleted first; the data stays).
    Remove { name: String },
    /// Delete a volume or snapshot that no disk attaches.
    DeleteVolume { pool: String, volume: String },
}

#[derive(Subcommand)]
enum SubsystemCmd {
    /// Create an NVMe/TCP subsystem and start listening for it.
    Create {
        /// Subsystem NQN, e.g. nqn.2026-11.io.example:disk1.
        nqn: String,
        /// Listener address (a host reaches the subsystem and the discovery controller
        /// there).
        #[arg(long, default_value = nvmux_daemon::nvmf::DEFAULT_LISTEN)]
        listen: String,
        /// Controller serial number, at most 20 characters (default: derived from the NQN).
        #[arg(long)]
        serial: Option<String>,
        /// Let every host connect (default: only hosts added with allow-host).
        #[arg(long)]
        allow_any_host: bool,
        /// Every host must authenticate with DH-HMAC-CHAP (hosts need a secret).
        #[arg(long)]
        require_auth: bool,
        /// DH-HMAC-CHAP hashes the controller may pick, most preferred first
        /// (default sha256,sha384,sha512).
        #[arg(long, value_delimiter = ',')]
        dhchap_hashes: Vec<String>,
        /// DH groups the controller may pick, most preferred first
        /// (default ffdhe2048,ffdhe3072,ffdhe4096,ffdhe6144,ffdhe8192,null).
        #[arg(long, value_delimiter = ',')]
        dhchap_dhgroups: Vec<String>,
    },
    /// List subsystems.
    List,
    /// Show a subsystem: namespaces (NSID, disk, NGUID, size), hosts, controllers.
    Show { nqn: String },
    /// Delete a subsystem (connected hosts are disconnected; the disks stay).
    Delete { nqn: String },
    /// Add a disk as a namespace (connected hosts get a namespace-changed event).
    AddNs {
        nqn: String,
        disk: String,
        /// Namespace id (default: the lowest free one).
        #[arg(long)]
        nsid: Option<u32>,
    },
    /// Remove a namespace (connected hosts get a namespace-changed event).
    RemoveNs { nqn: String, nsid: u32 },
    /// Allow a host NQN to connect (`any`: every host), optionally with DH-HMAC-CHAP
    /// secrets: then the host must authenticate every queue
    /// (`nvme connect --dhchap-secret ... [--dhchap-ctrl-secret ...]`).
    AllowHost {
        nqn: String,
        host: String,
        /// The host's secret (DHHC-1:...), or `generate` for a new one (printed once).
        #[arg(long)]
        dhchap_secret: Option<String>,
        /// The controller's secret for bidirectional authentication, or `generate`.
        #[arg(long)]
        dhchap_ctrl_secret: Option<String>,
        /// Drop the host's secrets (it no longer authenticates).
        #[arg(long, conflicts_with_all = ["dhchap_secret", "dhchap_ctrl_secret"])]
        no_dhchap: bool,
    },
    /// Authentication settings of a subsystem: require it of every host, choose hashes
    /// and DH groups.
    Auth {
        nqn: String,
        /// Every host must authenticate.
        #[arg(long, conflicts_with = "no_require")]
        require: bool,
        /// Hosts without a secret may connect again.
        #[arg(long)]
        no_require: bool,
        /// Hashes, most preferred first (sha256, sha384, sha512; `default` for the default).
        #[arg(long, value_delimiter = ',')]
        dhchap_hashes: Option<Vec<String>>,
        /// DH groups, most preferred first (null, ffdhe2048 ... ffdhe8192; `default`).
        #[arg(long, value_delimiter = ',')]
        dhchap_dhgroups: Option<Vec<String>>,
    },
    /// Print a new DH-HMAC-CHAP secret in nvme-cli's DHHC-1 form (made here, not by the
    /// daemon), for allow-host --dhchap-secret and nvme connect --dhchap-secret.
    GenSecret {
        /// Key transform: none, sha256, sha384 or sha512 (the DHHC-1 header's 00..03).
        #[arg(long, default_value = "sha256")]
        hmac: String,
        /// Key length in bytes: 32, 48 or 64.
        #[arg(long, default_value_t = 32)]
        length: usize,
    },
    /// Remove a host NQN from the allow-list (connected hosts stay connected).
    DenyHost { nqn: String, host: String },
    /// Move the subsystem to another listener address (ADDR:PORT).
    Listen { nqn: String, addr: String },
}

#[derive(Subcommand)]
// Parsed once per command line: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum ExportCmd {
    /// Export a disk: over vhost-user-blk on a Unix socket (VMs, libblkio), as a PCI NVMe
    /// controller on a vfio-user socket (`--type vfio-user`: QEMU 10.1+ `-device
    /// vfio-user-pci,socket=PATH`, the guest's own nvme driver), or over NBD on a Unix
    /// socket or a TCP address (`--type nbd`: qemu-img, nbdcopy, fio, nbdinfo, the Linux
    /// nbd client), with TLS if asked (required then). NBD exports on one socket or
    /// address share it (and its TLS) and differ by export name.
    Add {
        disk: String,
        /// Unix socket path (vhost-user-blk: QEMU, Cloud Hypervisor, libblkio; vfio-user:
        /// QEMU's `-device vfio-user-pci,socket=PATH`; nbd: `nbd+unix:///NAME?socket=PATH`).
        #[arg(long, required_unless_present = "listen")]
        socket: Option<PathBuf>,
        /// nbd: listen on this TCP address instead, e.g. 127.0.0.1:10809 (port 0 picks a
        /// free port). Without TLS only loopback addresses are accepted.
        #[arg(long, conflicts_with = "socket")]
        listen: Option<String>,
        /// nbd: require TLS with this pre-shared key file (psktool format,
        /// `identity:hexkey` per line, as qemu-nbd's tls-creds-psk and nbdkit --tls-psk).
        #[arg(long, value_name = "FILE", conflicts_with = "tls_x509_dir")]
        tls_psk_file: Option<PathBuf>,
        /// nbd: require TLS with the X.509 credentials in DIR (server-cert.pem,
        /// server-key.pem, ca-cert.pem, as qemu's tls-creds-x509).
        #[arg(long, value_name = "DIR")]
        tls_x509_dir: Option<PathBuf>,
        /// nbd with --tls-x509-dir: require a client certificate signed by DIR/ca-cert.pem.
        #[arg(long, requires = "tls_x509_dir")]
        tls_verify_peer: bool,
        /// Number of queues, 1-64: virtqueues (vhost-user-blk, default 1), or NVMe I/O
        /// queue pairs offered to the guest (vfio-user, default 4).
        #[arg(long)]
        queues: Option<u16>,
        /// Export name (default: the disk's name).
        #[arg(long)]
        name: Option<String>,
        /// nbd: the name clients ask for (default: the export name).
        #[arg(long)]
        export_name: Option<String>,
        /// nbd: refuse writes (EPERM), even on a writable disk.
        #[arg(long)]
        read_only: bool,
        /// Export type: vhost-user-blk, vfio-user or nbd.
        #[arg(long = "type", default_value = "vhost-user-blk")]
        kind: String,
        /// Give the socket to USER[:GROUP] (names or numbers), e.g. libvirt-qemu, so that
        /// a front-end running as that user may connect (default: the daemon's user).
        #[arg(long)]
        owner: Option<String>,
        /// The socket's mode, octal, e.g. 0660 (default 0600, or 0660 when --owner names
        /// a group).
        #[arg(long)]
        mode: Option<String>,
        /// vhost-user-blk: pair with EXPORT, another vhost-user-blk export of the same
        /// disk, for a live migration on this host (source QEMU on one socket, destination
        /// QEMU on the other). The rings of only one of the two run at a time: the
        /// destination's queues start once the source's stopped (waiting up to 5 s, then
        /// failing). One pair per disk. See docs/operations.md, "Live migration".
        #[arg(long, value_name = "EXPORT")]
        migration_peer: Option<String>,
    },
    /// List exports.
    List,
    /// Remove an export (disconnects its client).
    Remove { name: String },
}

/// Counts allocations per thread, so workers can show that serving I/O allocates nothing.
#[global_allocator]
static ALLOC: nvmux_core::alloc_count::CountingAlloc = nvmux_core::alloc_count::CountingAlloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The simulator opens thousands of pools: only errors, unless asked.
    let quiet = matches!(cli.cmd, Cmd::Powercut(_));
    let filter =
        std::env::var("NVMUX_LOG").unwrap_or_else(|_| if quiet { "error" } else { "info" }.into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

/// What every client command needs: the API client, and whether to print its JSON.
struct Ctx {
    api: ApiClient,
    json: bool,
}

impl Ctx {
    /// Print the API's JSON with `--json`, else `table` of it.
    fn show(&self, v: &Value, table: &dyn Fn(&Value)) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            table(v);
        }
    }
}

fn run(cli: Cli) -> Res {
    let cx = Ctx {
        api: ApiClient::new(&cli.api),
        json: cli.json,
    };
    match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Upgrade { binary, timeout } => upgrade(&cx, binary, &timeout),
        Cmd::Disk(c) => disk_cmd(&cx, c),
        Cmd::Pool(c) => pool_cmd(&cx, c),
        Cmd::Export(c) => export_cmd(&cx, c),
        Cmd::Subsystem(c) => subsystem_cmd(&cx, c),
        Cmd::Keys(c) => keys_cmd(&cx, c),
        Cmd::CheckClassifier {
            object,
            section,
            disassemble,
        } => check_classifier(&object, section.as_deref(), disassemble),
        Cmd::Stats { disk } => {
            let v = cx.api.get("/v1/stats")?;
            cx.show(&v, &|v| stats_table(v, disk.as_deref()));
            Ok(())
        }
        Cmd::Metrics => {
            let (code, text) = cx.api.call_raw("GET", "/metrics", None)?;
            if code != 200 {
                return Err(format!("metrics: HTTP {code}").into());
            }
            print!("{text}");
            Ok(())
        }
        Cmd::Bench(a) => bench::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Powercut(a) => powercut::run(a),
    }
}

/// `nvmux serve`: the daemon, with the command line's settings over the config file's.
fn serve(a: ServeArgs) -> Res {
    let mut cfg = nvmux_daemon::Config::load(a.config.as_deref())?;
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if let Some(s) = a.api_socket {
        cfg.api_socket = Some(s);
    }
    if let Some(w) = a.workers {
        cfg.workers.threads = w;
    }
    if let Some(k) = a.kek_file {
        cfg.keys.kek_file = Some(std::path::absolute(&k).unwrap_or(k));
    }
    nvmux_daemon::serve_with(cfg, a.takeover)?;
    Ok(())
}

/// `nvmux upgrade`.
fn upgrade(cx: &Ctx, binary: Option<PathBuf>, timeout: &str) -> Res {
    let (api, show) = (&cx.api, |v: &Value, table: &dyn Fn(&Value)| {
        cx.show(v, table)
    });
    let ms = parse_duration_ms(timeout)?;
    let binary = binary.map(|p| std::path::absolute(&p).unwrap_or(p));
    let v = api.post("/v1/upgrade", &json!({"binary": binary, "timeout_ms": ms}))?;
    show(&v, &|v| {
        println!(
            "upgraded: pid {} serves now ({}); {} vhost-user sessions and {} sockets handed over, {} NBD/NVMe-TCP connections closed; longest vhost-user pause {:.1} ms",
            v["pid"],
            v["binary"].as_str().unwrap_or(""),
            v["sessions"],
            v["listeners"],
            v["closed_connections"],
            v["pause_ms"].as_f64().unwrap_or(0.0)
        )
    });
    Ok(())
}

/// `nvmux disk ...`.
fn disk_cmd(cx: &Ctx, c: DiskCmd) -> Res {
    let api = &cx.api;
    let show = |v: &Value, table: &dyn Fn(&Value)| cx.show(v, table);
    match c {
        DiskCmd::Create {
            name,
            backend,
            path,
            size,
            block_size,
            read_only,
            buffered,
            pool,
            from_snapshot,
            volume,
            encrypt,
            sector_size,
            iv_large_sectors,
            chain,
            remote,
            nsid,
            loss_timeout,
            dhchap_secret,
            dhchap_ctrl_secret,
            image,
        } => {
            let size = size.map(|s| nvmux_core::parse_size(&s)).transpose()?;
            if image.is_some() != (backend == "rbd") {
                return Err("--backend rbd needs --image, and --image needs --backend rbd".into());
            }
            if from_snapshot.is_some() && pool.is_none() && backend != "rbd" {
                return Err("--from-snapshot needs --pool or --backend rbd".into());
            }
            let loss_timeout_ms = loss_timeout.map(|t| parse_duration_ms(&t)).transpose()?;
            let chain = chain
                .map(|c| nvmux_daemon::Function::parse_chain(&c))
                .transpose()?;
            // The daemon may run in another directory: send absolute paths.
            let path = path.map(|p| std::path::absolute(&p).unwrap_or(p));
            let body = if pool.is_some() {
                json!({"name": name, "pool": pool, "size": size, "from_snapshot": from_snapshot,
                   "volume": volume, "block_size": block_size, "read_only": read_only,
                   "encrypt": encrypt, "sector_size": sector_size,
                   "iv_large_sectors": iv_large_sectors, "chain": chain})
            } else if backend == "nvmf" {
                json!({"name": name, "backend": backend, "remote": remote, "nsid": nsid,
                   "loss_timeout_ms": loss_timeout_ms, "dhchap_secret": dhchap_secret,
                   "dhchap_ctrl_secret": dhchap_ctrl_secret, "read_only": read_only,
                   "encrypt": encrypt, "sector_size": sector_size,
                   "iv_large_sectors": iv_large_sectors, "chain": chain, "size": size,
                   "block_size": block_size})
            } else if backend == "rbd" {
                json!({"name": name, "backend": backend, "image": image, "size": size,
                   "from_snapshot": from_snapshot, "block_size": block_size,
                   "read_only": read_only, "encrypt": encrypt, "sector_size": sector_size,
                   "iv_large_sectors": iv_large_sectors, "chain": chain})
            } else {
                if remote.is_some() || nsid.is_some() || loss_timeout_ms.is_some() {
                    return Err("--remote, --nsid and --loss-timeout need --backend nvmf".into());
                }
                json!({"name": name, "backend": backend, "path": path, "size": size,
                   "block_size": block_size, "read_only": read_only, "direct": !buffered,
                   "encrypt": encrypt, "sector_size": sector_size,
                   "iv_large_sectors": iv_large_sectors, "chain": chain})
            };
            let v = api.post("/v1/disks", &body)?;
            show(&v, &|v| {
                println!(
                    "created disk {} ({})",
                    v["name"].as_str().unwrap_or(""),
                    describe_disk(v)
                )
            });
        }
        DiskCmd::Qos {
            name,
            iops_read,
            iops_write,
            iops,
            bps_read,
            bps_write,
            bps,
            burst_ms,
            weight,
        } => {
            let size = |s: Option<String>| s.map(|s| nvmux_core::parse_size(&s)).transpose();
            let body = json!({
                "iops_read": iops_read, "iops_write": iops_write, "iops_total": iops,
                "bps_read": size(bps_read)?, "bps_write": size(bps_write)?, "bps_total": size(bps)?,
                "burst_ms": burst_ms, "weight": weight,
            });
            let v = api.post(&format!("/v1/disks/{name}/qos"), &body)?;
            show(&v, &|v| match v.get("qos") {
                Some(q) => println!("disk {name}: limits {}", compact(q)),
                None => println!("disk {name}: no limits"),
            });
        }
        DiskCmd::Mirror(c) => mirror_cmd(cx, c)?,
        DiskCmd::Move {
            name,
            to,
            nsid,
            rate,
            timeout,
        } => disk_move(cx, &name, &to, nsid, rate, timeout)?,
        DiskCmd::Chain { name, chain } => {
            let chain = match chain.trim() {
                "default" => None,
                c => Some(nvmux_daemon::Function::parse_chain(c)?),
            };
            let v = api.post(
                &format!("/v1/disks/{name}/chain"),
                &json!({ "chain": chain }),
            )?;
            show(&v, &|v| {
                println!("disk {name}: chain {}", compact(&v["functions"]))
            });
        }
        DiskCmd::SetClassifier {
            name,
            object,
            section,
            maps,
            none,
        } => {
            let v = if none {
                api.delete(&format!("/v1/disks/{name}/classifier"))?
            } else {
                let object = object.map(|p| std::path::absolute(&p).unwrap_or(p));
                let maps = maps
                    .iter()
                    .map(|m| parse_map_arg(m))
                    .collect::<Result<Vec<_>, _>>()?;
                api.post(
                    &format!("/v1/disks/{name}/classifier"),
                    &json!({ "object": object, "section": section, "maps": maps }),
                )?
            };
            show(&v, &print_routing);
        }
        DiskCmd::FlushPolicy { name, policy } => {
            let v = api.post(
                &format!("/v1/disks/{name}/flush-policy"),
                &json!({ "allow_flush_complete": policy == "allow" }),
            )?;
            show(&v, &print_routing);
        }
        DiskCmd::Classifier { name } => {
            let v = api.get(&format!("/v1/disks/{name}/classifier"))?;
            show(&v, &print_routing);
        }
        DiskCmd::MapSet {
            name,
            map,
            key,
            words,
        } => {
            let words = words
                .iter()
                .map(|w| parse_word(w))
                .collect::<Result<Vec<_>, _>>()?;
            let v = api.post(
                &format!("/v1/disks/{name}/classifier/maps/{map}"),
                &json!({ "key": key, "words": words }),
            )?;
            show(&v, &print_routing);
        }
        DiskCmd::SetExternal {
            name,
            socket,
            on_failure,
            depth,
            max_io,
            owner,
            mode,
            none,
        } => {
            let v = if none {
                api.delete(&format!("/v1/disks/{name}/external"))?
            } else {
                let socket = socket.map(|p| std::path::absolute(&p).unwrap_or(p));
                let max_io = nvmux_core::parse_size(&max_io)?;
                api.post(
                &format!("/v1/disks/{name}/external"),
                &json!({ "socket": socket, "on_failure": on_failure, "depth": depth, "max_io": max_io, "owner": owner, "mode": mode }),
            )?
            };
            show(&v, &print_routing);
        }
        DiskCmd::Import {
            name,
            source,
            format,
            pool,
            size,
        } => {
            let size = size.map(|s| nvmux_core::parse_size(&s)).transpose()?;
            let local = std::path::Path::new(&source);
            let source = if source.contains("://") || local.is_absolute() {
                source
            } else {
                std::path::absolute(local)
                    .map(|p| p.display().to_string())
                    .unwrap_or(source)
            };
            let msg = image::import(
                api,
                &name,
                &source,
                format.as_deref(),
                pool.as_deref(),
                size,
            )?;
            println!("{msg}");
        }
        DiskCmd::Export {
            name,
            dest,
            format,
            force,
        } => {
            let dest = std::path::absolute(&dest).unwrap_or(dest);
            println!("{}", image::export(api, &name, &dest, &format, force)?);
        }
        DiskCmd::Erase { name, crypto: _ } => {
            let v = api.post(&format!("/v1/disks/{name}/crypto-erase"), &json!({}))?;
            show(&v, &|v| {
                println!(
                    "crypto-erased disk {name}: data key destroyed and replaced in {:.3} s",
                    v["seconds"].as_f64().unwrap_or(0.0)
                )
            });
        }
        DiskCmd::List => {
            let v = api.get("/v1/disks")?;
            show(&v, &|v| {
                disk_table(v.as_array().map(|a| a.as_slice()).unwrap_or(&[]))
            });
        }
        DiskCmd::Show { name } => {
            let v = api.get(&format!("/v1/disks/{name}"))?;
            show(&v, &|v| {
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!("{k:>12}: {}", compact(val));
                }
            });
        }
        DiskCmd::Delete { name, erase } => {
            let v = if erase {
                let route = format!("/v1/disks/{name}?erase=1");
                with_progress(
                    api,
                    &format!("disk/{name}"),
                    &format!("erasing {name}"),
                    || api.delete(&route),
                )?
            } else {
                api.delete(&format!("/v1/disks/{name}"))?
            };
            show(&v, &|v| {
                if erase {
                    println!(
                        "erased {} and deleted disk {name} in {:.3} s",
                        nvmux_core::format_size(v["erased_bytes"].as_u64().unwrap_or(0)),
                        v["seconds"].as_f64().unwrap_or(0.0)
                    )
                } else {
                    println!("deleted disk {name}")
                }
            });
        }
        DiskCmd::Snapshot { disk, snapshot } => {
            let v = api.post(
                &format!("/v1/disks/{disk}/snapshot"),
                &json!({ "snapshot": snapshot }),
            )?;
            show(&v, &|v| match v["snapshot"].as_str() {
                Some(full) => println!("snapshot {full} of disk {disk} taken"),
                None => println!("snapshot {snapshot} of disk {disk} taken"),
            });
        }
        DiskCmd::Clone {
            snapshot,
            disk,
            pool,
            image,
            size,
        } => {
            let size = size.map(|s| nvmux_core::parse_size(&s)).transpose()?;
            let body = match image {
                Some(image) => json!({"name": disk, "backend": "rbd", "image": image,
                    "from_snapshot": snapshot, "size": size}),
                None => {
                    json!({"name": disk, "pool": pool, "from_snapshot": snapshot, "size": size})
                }
            };
            let v = api.post("/v1/disks", &body)?;
            show(&v, &|v| {
                println!(
                    "created disk {disk} from snapshot {snapshot} ({})",
                    describe_disk(v)
                )
            });
        }
        DiskCmd::Resize {
            disk,
            size,
            force,
            discard_data,
        } => {
            let bytes = nvmux_core::parse_size(&size)?;
            let v = api.post(
                &format!("/v1/disks/{disk}/resize"),
                &json!({"size": bytes, "force": force, "discard_data": discard_data}),
            )?;
            show(&v, &|v| println!("disk {disk} is now {}", describe_disk(v)));
        }
    }
    Ok(())
}

/// `nvmux pool ...`.
fn pool_cmd(cx: &Ctx, c: PoolCmd) -> Res {
    let api = &cx.api;
    let show = |v: &Value, table: &dyn Fn(&Value)| cx.show(v, table);
    match c {
        PoolCmd::Create {
            name,
            path,
            size,
            cluster_size,
            import,
        } => {
            let size = size.map(|s| nvmux_core::parse_size(&s)).transpose()?;
            let cs = cluster_size
                .map(|s| nvmux_core::parse_size(&s))
                .transpose()?;
            let path = std::path::absolute(&path).unwrap_or(path);
            let v = api.post(
            "/v1/pools",
            &json!({"name": name, "path": path, "size": size, "cluster_size": cs, "import": import}),
        )?;
            show(&v, &|v| {
                let u = &v["usage"];
                println!(
                    "{} pool {name} on {}: {} of data in {} clusters",
                    if import { "imported" } else { "created" },
                    path.display(),
                    nvmux_core::format_size(u["capacity_bytes"].as_u64().unwrap_or(0)),
                    nvmux_core::format_size(u["cluster_size"].as_u64().unwrap_or(0)),
                )
            });
        }
        PoolCmd::List => {
            let v = api.get("/v1/pools")?;
            show(&v, &|v| {
                println!(
                    "{:<16} {:>10} {:>10} {:>6} {:>8} PATH",
                    "NAME", "CAPACITY", "USED", "USE%", "VOLUMES"
                );
                for p in v.as_array().into_iter().flatten() {
                    let u = &p["usage"];
                    let cap = u["capacity_bytes"].as_u64().unwrap_or(0);
                    let used = u["used_bytes"].as_u64().unwrap_or(0);
                    println!(
                        "{:<16} {:>10} {:>10} {:>5.1}% {:>8} {}{}",
                        p["name"].as_str().unwrap_or(""),
                        nvmux_core::format_size(cap),
                        nvmux_core::format_size(used),
                        used as f64 * 100.0 / cap.max(1) as f64,
                        u["volumes"].as_array().map_or(0, |a| a.len()),
                        p["path"].as_str().unwrap_or(""),
                        match p["status"].as_str() {
                            Some("ok") | None => String::new(),
                            Some(s) => format!("  [{s}]"),
                        }
                    );
                }
            });
        }
        PoolCmd::Show { name } => {
            let v = api.get(&format!("/v1/pools/{name}"))?;
            show(&v, &pool_table);
        }
        PoolCmd::Check { path } => {
            let r = nvmux_daemon::pools::check_path(&path)?;
            if cx.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                println!(
                "{}: {} volumes, {} clusters used, {} free, {} awaiting zeroing, {} journal transactions replayed",
                path.display(),
                r.volumes,
                r.used_clusters,
                r.free_clusters,
                r.dirty_clusters,
                r.journal_transactions
            );
                for n in &r.notes {
                    println!("note: {n}");
                }
                for e in &r.errors {
                    println!("ERROR: {e}");
                }
                println!(
                    "{}",
                    if r.ok() {
                        "pool is consistent"
                    } else {
                        "pool is DAMAGED"
                    }
                );
            }
            if !r.ok() {
                return Err(format!("pool {} failed the check", path.display()).into());
            }
        }
        PoolCmd::Remove { name } => {
            let v = api.delete(&format!("/v1/pools/{name}"))?;
            show(&v, &|_| {
                println!("removed pool {name} (its data is left as is)")
            });
        }
        PoolCmd::DeleteVolume { pool, volume } => {
            let v = api.delete(&format!("/v1/pools/{pool}/volumes/{volume}"))?;
            show(&v, &|_| {
                println!("deleted volume {volume} from pool {pool}")
            });
        }
    }
    Ok(())
}

/// `nvmux export ...`.
fn export_cmd(cx: &Ctx, c: ExportCmd) -> Res {
    let api = &cx.api;
    let show = |v: &Value, table: &dyn Fn(&Value)| cx.show(v, table);
    match c {
        ExportCmd::Add {
            disk,
            socket,
            listen,
            tls_psk_file,
            tls_x509_dir,
            tls_verify_peer,
            queues,
            name,
            export_name,
            read_only,
            kind,
            owner,
            mode,
            migration_peer,
        } => {
            let abs = |s: PathBuf| std::path::absolute(&s).unwrap_or(s);
            let socket = socket.map(abs);
            let tls = match (tls_psk_file.map(abs), tls_x509_dir.map(abs)) {
                (None, None) => serde_json::Value::Null,
                (psk, x509) => {
                    json!({"psk_file": psk, "x509_dir": x509, "verify_peer": tls_verify_peer})
                }
            };
            let queues = match (kind.as_str(), queues) {
                ("vhost-user-blk", None) => Some(1),
                (_, q) => q,
            };
            let v = api.post(
            "/v1/exports",
            &json!({"name": name, "disk": disk, "type": kind, "socket": socket, "num_queues": queues,
                    "listen": listen, "export_name": export_name, "read_only": read_only,
                    "owner": owner, "mode": mode, "tls": tls, "migration_peer": migration_peer}),
        )?;
            show(&v, &|v| {
                let extra = match v["type"].as_str() {
                    Some("nbd") => {
                        let mut notes = Vec::new();
                        if v["read_only"].as_bool() == Some(true) {
                            notes.push("read-only");
                        }
                        if v["tls"]["psk_file"].is_string() {
                            notes.push("TLS-PSK required");
                        } else if v["tls"]["verify_peer"].as_bool() == Some(true) {
                            notes.push("TLS X.509 and a client certificate required");
                        } else if v["tls"]["x509_dir"].is_string() {
                            notes.push("TLS X.509 required");
                        }
                        if notes.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", notes.join(", "))
                        }
                    }
                    _ => match v["migration_peer"].as_str() {
                        Some(p) => format!(" ({} queues, migration peer of {p})", v["num_queues"]),
                        None => format!(" ({} queues)", v["num_queues"]),
                    },
                };
                let perms = match (v["owner"].as_str(), v["mode"].as_str()) {
                    (Some(o), Some(m)) => format!(", socket owner {o}, mode {m}"),
                    (None, Some(m)) => format!(", socket mode {m}"),
                    _ => String::new(),
                };
                println!(
                    "exported disk {} as {} on {}{extra}{perms}",
                    v["disk"].as_str().unwrap_or(""),
                    v["type"].as_str().unwrap_or(""),
                    v["address"].as_str().unwrap_or(""),
                )
            });
        }
        ExportCmd::List => {
            let v = api.get("/v1/exports")?;
            show(&v, &|v| {
                println!(
                    "{:<16} {:<16} {:<16} {:>6} {:<9} {:<4} {:<14} ADDRESS",
                    "NAME", "DISK", "TYPE", "QUEUES", "CLIENT", "MODE", "OWNER"
                );
                for e in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {:<16} {:<16} {:>6} {:<9} {:<4} {:<14} {}",
                        e["name"].as_str().unwrap_or(""),
                        e["disk"].as_str().unwrap_or(""),
                        e["type"].as_str().unwrap_or(""),
                        if e["num_queues"].is_null() {
                            "-".to_string()
                        } else {
                            compact(&e["num_queues"])
                        },
                        match (e["connections"].as_u64(), e["connected"].as_bool()) {
                            (Some(n), _) if n > 0 => format!("{n} conn"),
                            (None, Some(true)) => "connected".to_string(),
                            _ => "-".to_string(),
                        },
                        e["mode"].as_str().unwrap_or("-"),
                        e["owner"].as_str().unwrap_or("-"),
                        e["address"].as_str().unwrap_or("")
                    );
                }
            });
        }
        ExportCmd::Remove { name } => {
            let v = api.delete(&format!("/v1/exports/{name}"))?;
            show(&v, &|_| println!("removed export {name}"));
        }
    }
    Ok(())
}

/// `nvmux keys ...`.
fn keys_cmd(cx: &Ctx, c: KeysCmd) -> Res {
    let api = &cx.api;
    let show = |v: &Value, table: &dyn Fn(&Value)| cx.show(v, table);
    match c {
        KeysCmd::Rotate { kek_file } => {
            let kek_file = std::path::absolute(&kek_file).unwrap_or(kek_file);
            let v = api.post("/v1/keys/rotate", &json!({ "kek_file": kek_file }))?;
            show(&v, &|v| {
                println!(
                "re-wrapped {} data key(s) under {}; set keys.kek_file to it before the next start",
                v["rewrapped"].as_u64().unwrap_or(0),
                kek_file.display()
            )
            });
        }
    }
    Ok(())
}

/// `nvmux check-classifier`: load, verify and compile a classifier object offline.
fn check_classifier(object: &std::path::Path, section: Option<&str>, disassemble: bool) -> Res {
    let bytes = std::fs::read(object).map_err(|e| format!("{}: {e}", object.display()))?;
    let obj = nvmux_router::elf::load(&bytes, section)
        .map_err(|e| format!("{}: {}", object.display(), e.msg))?;
    if disassemble {
        let mut i = 0;
        while i < obj.insns.len() {
            println!("{i:5}: {}", nvmux_router::verifier::describe(&obj.insns[i]));
            i += if obj.insns[i][0] == nvmux_router::elf::LD_DW_IMM {
                2
            } else {
                1
            };
        }
    }
    let p = nvmux_router::Program::from_insns(obj.insns, obj.maps, obj.section)
        .map_err(|e| format!("{}: refused: {}", object.display(), e.msg))?;
    println!(
        "{}: section {}, {} instructions, verified, {}",
        object.display(),
        p.info.section,
        p.info.instructions,
        if p.info.jit {
            "JIT-compiled"
        } else {
            "interpreted"
        }
    );
    for m in &p.info.maps {
        println!(
            "  map {} (array, {} x {} bytes)",
            m.name, m.max_entries, m.value_size
        );
    }
    Ok(())
}

/// Run a long API call and, while it runs and stderr is a terminal, draw a progress bar
/// from `GET /v1/operations` for the operation on `target`.
fn with_progress<T: Send>(
    api: &ApiClient,
    target: &str,
    label: &str,
    call: impl FnOnce() -> T + Send,
) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return call();
    }
    std::thread::scope(|s| {
        let h = s.spawn(call);
        let mut drawn = false;
        while !h.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let Ok(ops) = api.get("/v1/operations") else {
                continue;
            };
            let Some(op) = ops
                .as_array()
                .into_iter()
                .flatten()
                .find(|o| o["target"] == target)
            else {
                continue;
            };
            let done = op["done_bytes"].as_u64().unwrap_or(0);
            let total = op["total_bytes"].as_u64().unwrap_or(0).max(1);
            nvmux_bench::report::draw_bar(label, done, total);
            drawn = true;
        }
        if drawn {
            eprint!("\r\x1b[K");
        }
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn pool_table(v: &Value) {
    let u = &v["usage"];
    let f = |k: &str| nvmux_core::format_size(u[k].as_u64().unwrap_or(0));
    println!(
        "pool {} on {} ({})",
        v["name"].as_str().unwrap_or(""),
        v["path"].as_str().unwrap_or(""),
        v["status"].as_str().unwrap_or("")
    );
    println!(
        "  capacity {}, used {}, cluster {}, uuid {}",
        f("capacity_bytes"),
        f("used_bytes"),
        f("cluster_size"),
        u["uuid"].as_str().unwrap_or("")
    );
    println!(
        "  {:<24} {:<9} {:>10} {:>10} PARENT",
        "VOLUME", "KIND", "SIZE", "ALLOCATED"
    );
    for vol in u["volumes"].as_array().into_iter().flatten() {
        if vol["hidden"].as_bool() == Some(true) {
            continue;
        }
        println!(
            "  {:<24} {:<9} {:>10} {:>10} {}",
            vol["name"].as_str().unwrap_or(""),
            if vol["snapshot"].as_bool() == Some(true) {
                "snapshot"
            } else {
                "volume"
            },
            nvmux_core::format_size(vol["size"].as_u64().unwrap_or(0)),
            nvmux_core::format_size(vol["allocated_bytes"].as_u64().unwrap_or(0)),
            vol["parent"].as_str().unwrap_or("-")
        );
    }
}

/// A u64 in decimal or 0x hex.
fn parse_word(w: &str) -> Result<u64, String> {
    let w = w.trim();
    match w.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => w.parse(),
    }
    .map_err(|_| format!("{w:?} is not a number (decimal or 0x hex)"))
}

/// `MAP:KEY=W1,W2` for `disk set-classifier --map`.
fn parse_map_arg(s: &str) -> Result<Value, String> {
    let bad = || format!("--map {s:?}: use MAP:KEY=WORD[,WORD...], e.g. range:0=100,200");
    let (map, rest) = s.split_once(':').ok_or_else(bad)?;
    let (key, words) = rest.split_once('=').ok_or_else(bad)?;
    let key: u32 = key.trim().parse().map_err(|_| bad())?;
    let words = words
        .split(',')
        .map(parse_word)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(json!({ "map": map, "key": key, "words": words }))
}

fn print_routing(v: &Value) {
    let disk = v["disk"].as_str().unwrap_or("?");
    match v.get("program").filter(|p| !p.is_null()) {
        Some(p) => {
            println!(
                "disk {disk}: classifier {} (section {}, {} instructions, {})",
                p["source"].as_str().or(p["object"].as_str()).unwrap_or("?"),
                p["section"].as_str().unwrap_or("?"),
                p["instructions"],
                if p["jit"].as_bool() == Some(true) {
                    "JIT"
                } else {
                    "interpreted"
                }
            );
            for m in p["maps"].as_array().into_iter().flatten() {
                let vals: Vec<String> = m["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| {
                        let w: Vec<String> = x["words"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|w| w.to_string())
                            .collect();
                        format!("[{}] = {}", x["key"], w.join(" "))
                    })
                    .collect();
                println!(
                    "  map {} ({}, {} x {} bytes): {}",
                    m["name"].as_str().unwrap_or("?"),
                    m["type"].as_str().unwrap_or("?"),
                    m["max_entries"],
                    m["value_size"],
                    if vals.is_empty() {
                        "all zero".to_string()
                    } else {
                        vals.join(", ")
                    }
                );
            }
        }
        None => println!("disk {disk}: no classifier (every command takes the function chain)"),
    }
    let r = &v["routes"];
    println!(
        "  routes: chain {}, fast {}, external {}, complete {}; hooks {}, rewrites {}, errors {}, fallbacks {}",
        r["chain"], r["fast"], r["external"], r["complete"], r["hooks"], r["rewrites"], r["errors"], r["fallbacks"]
    );
    println!(
        "  flush: {} ({} forced to the device)",
        if v["allow_flush_complete"].as_bool() == Some(true) {
            "a classifier may complete FLUSH without the device (not durable)"
        } else {
            "always reaches the device"
        },
        r["flushes_forced"]
    );
    if let Some(x) = v.get("external").filter(|x| !x.is_null()) {
        let who = match x["status"].as_str() {
            Some("attached") => format!(
                "attached: {} (pid {})",
                x["function"].as_str().unwrap_or("?"),
                x["pid"]
            ),
            Some(s) => s.to_string(),
            None => "?".into(),
        };
        println!(
            "  external function: {} (on failure: {}, depth {}, max I/O {}): {who}; attaches {}, detaches {}",
            x["socket"].as_str().unwrap_or("?"),
            x["on_failure"].as_str().unwrap_or("?"),
            x["depth"],
            nvmux_core::format_size(x["max_io"].as_u64().unwrap_or(0)),
            x["attaches"],
            x["detaches"]
        );
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn describe_disk(v: &Value) -> String {
    let size = v["size"]
        .as_u64()
        .map(nvmux_core::format_size)
        .unwrap_or_default();
    format!(
        "{}, {size}, {}-byte blocks",
        v["device"].as_str().unwrap_or(""),
        v["block_size"]
    )
}

fn disk_table(disks: &[Value]) {
    println!(
        "{:<16} {:<8} {:>10} {:>6} {:<4} {:<12} DEVICE",
        "NAME", "BACKEND", "SIZE", "BS", "RO", "EXPORTS"
    );
    for d in disks {
        println!(
            "{:<16} {:<8} {:>10} {:>6} {:<4} {:<12} {}{}",
            d["name"].as_str().unwrap_or(""),
            d["backend"]["type"].as_str().unwrap_or(""),
            d["size"]
                .as_u64()
                .map(nvmux_core::format_size)
                .unwrap_or_default(),
            compact(&d["block_size"]),
            if d["read_only"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            d["exports"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default(),
            d["device"].as_str().unwrap_or(""),
            match d["status"].as_str() {
                Some("ok") | None => String::new(),
                Some(s) => format!("  [{s}]"),
            }
        );
    }
}

fn stats_table(v: &Value, only: Option<&str>) {
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8}",
        "DISK", "READS", "READ BYTES", "WRITES", "WRITE BYTES", "R p99 µs", "W p99 µs", "ERRORS"
    );
    for (name, d) in v["disks"].as_object().into_iter().flatten() {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let errors = ["read", "write", "other"]
            .iter()
            .map(|k| d[k]["errors"].as_u64().unwrap_or(0))
            .sum::<u64>();
        println!(
            "{:<16} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8}",
            name,
            compact(&d["read"]["ops"]),
            nvmux_core::format_size(d["read"]["bytes"].as_u64().unwrap_or(0)),
            compact(&d["write"]["ops"]),
            nvmux_core::format_size(d["write"]["bytes"].as_u64().unwrap_or(0)),
            compact(&d["read"]["p99_us"]),
            compact(&d["write"]["p99_us"]),
            errors
        );
    }
    if only.is_none() {
        for (i, w) in v["workers"].as_array().into_iter().flatten().enumerate() {
            println!(
                "worker {i}: busy {:.3} s, idle-poll {:.3} s, {} sleeps, {} queues",
                w["busy_s"].as_f64().unwrap_or(0.0),
                w["idle_poll_s"].as_f64().unwrap_or(0.0),
                w["sleeps"],
                w["sources"]
            );
        }
    }
}

fn print_subsystem(v: &Value) {
    println!("{}", v["nqn"].as_str().unwrap_or(""));
    println!(
        "  listen: {}   serial: {}   status: {}",
        v["listen"].as_str().unwrap_or(""),
        v["serial"].as_str().unwrap_or(""),
        v["status"].as_str().unwrap_or("")
    );
    let hosts: Vec<&str> = v["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str())
        .collect();
    let any = v["allow_any_host"].as_bool() == Some(true);
    let auth: std::collections::BTreeMap<&str, bool> = v["host_auth"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["host"].as_str()?, a["bidirectional"].as_bool()?)))
        .collect();
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| match auth.get(h) {
            Some(true) => format!("{h} (DH-HMAC-CHAP, bidirectional)"),
            Some(false) => format!("{h} (DH-HMAC-CHAP)"),
            None => h.to_string(),
        })
        .collect();
    println!(
        "  hosts: {}",
        if any {
            "any".to_string()
        } else if hosts.is_empty() {
            "none (add with allow-host)".to_string()
        } else {
            hosts.join(", ")
        }
    );
    let names = |k: &str| {
        v[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    println!(
        "  authentication: {}; hashes {}; DH groups {}",
        if v["require_auth"].as_bool() == Some(true) {
            "required of every host"
        } else {
            "hosts with a secret"
        },
        names("dhchap_hashes"),
        names("dhchap_dhgroups")
    );
    for n in v["namespaces"].as_array().into_iter().flatten() {
        println!(
            "  ns {:<4} disk {:<16} {:>10}  nguid {}",
            compact(&n["nsid"]),
            n["disk"].as_str().unwrap_or(""),
            nvmux_core::format_size(n["size"].as_u64().unwrap_or(0)),
            n["nguid"].as_str().unwrap_or("")
        );
    }
    for c in v["controllers"].as_array().into_iter().flatten() {
        println!(
            "  controller {} host {} queues {}",
            compact(&c["cntlid"]),
            c["host"].as_str().unwrap_or(""),
            compact(&c["queues"])
        );
    }
}

/// `nvmux subsystem ...`.
fn subsystem_cmd(cx: &Ctx, c: SubsystemCmd) -> Res {
    let api = &cx.api;
    let show = |v: &Value, table: &dyn Fn(&Value)| cx.show(v, table);
    let base = "/v1/subsystems";
    match c {
        SubsystemCmd::Create {
            nqn,
            listen,
            serial,
            allow_any_host,
            require_auth,
            dhchap_hashes,
            dhchap_dhgroups,
        } => {
            let v = api.post(
                base,
                &json!({"nqn": nqn, "listen": listen, "serial": serial, "allow_any_host": allow_any_host,
                        "require_auth": require_auth, "dhchap_hashes": dhchap_hashes,
                        "dhchap_dhgroups": dhchap_dhgroups}),
            )?;
            show(&v, &|v| {
                println!(
                    "created subsystem {} listening on {}",
                    v["nqn"].as_str().unwrap_or(""),
                    v["listen"].as_str().unwrap_or("")
                );
                if v["allow_any_host"].as_bool() != Some(true) {
                    println!("no host may connect yet: nvmux subsystem allow-host {nqn} HOSTNQN");
                }
            });
        }
        SubsystemCmd::List => {
            let v = api.get(base)?;
            show(&v, &|v| {
                for s in v.as_array().into_iter().flatten() {
                    print_subsystem(s);
                }
            });
        }
        SubsystemCmd::Show { nqn } => {
            let v = api.get(&format!("{base}/{nqn}"))?;
            show(&v, &print_subsystem);
        }
        SubsystemCmd::Delete { nqn } => {
            let v = api.delete(&format!("{base}/{nqn}"))?;
            show(&v, &|_| println!("deleted subsystem {nqn}"));
        }
        SubsystemCmd::AddNs { nqn, disk, nsid } => {
            let v = api.post(
                &format!("{base}/{nqn}/namespaces"),
                &json!({"disk": disk, "nsid": nsid}),
            )?;
            show(&v, &|v| {
                println!(
                    "added disk {disk} to {nqn} as namespace {} ({}, nguid {})",
                    compact(&v["nsid"]),
                    nvmux_core::format_size(v["size"].as_u64().unwrap_or(0)),
                    v["nguid"].as_str().unwrap_or("")
                )
            });
        }
        SubsystemCmd::RemoveNs { nqn, nsid } => {
            let v = api.delete(&format!("{base}/{nqn}/namespaces/{nsid}"))?;
            show(&v, &|_| println!("removed namespace {nsid} from {nqn}"));
        }
        SubsystemCmd::AllowHost {
            nqn,
            host,
            dhchap_secret,
            dhchap_ctrl_secret,
            no_dhchap,
        } => {
            // `generate`: made here, printed once, stored by the daemon (which never
            // returns secrets).
            let mut generated = serde_json::Map::new();
            let mut gen = |name: &str,
                           s: Option<String>|
             -> Result<Option<String>, Box<dyn std::error::Error>> {
                match s.as_deref() {
                    Some("generate") => {
                        let k = nvmux_daemon::nvmf::generate_secret(1, 32)?;
                        generated.insert(name.into(), Value::String(k.clone()));
                        Ok(Some(k))
                    }
                    _ => Ok(s),
                }
            };
            let secret = gen("dhchap_secret", dhchap_secret)?;
            let ctrl = gen("dhchap_ctrl_secret", dhchap_ctrl_secret)?;
            let v = api.post(
                &format!("{base}/{nqn}/hosts"),
                &json!({"host": host, "dhchap_secret": secret, "dhchap_ctrl_secret": ctrl,
                        "remove_dhchap": no_dhchap}),
            )?;
            if cx.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"subsystem": v, "generated": generated}))
                        .unwrap_or_default()
                );
            } else {
                let how = match (&secret, &ctrl) {
                    (Some(_), Some(_)) => " (DH-HMAC-CHAP, bidirectional)",
                    (Some(_), None) => " (DH-HMAC-CHAP)",
                    _ if no_dhchap => " (without authentication)",
                    _ => "",
                };
                println!("host {host} may connect to {nqn}{how}");
                for (k, flag) in [
                    ("dhchap_secret", "--dhchap-secret"),
                    ("dhchap_ctrl_secret", "--dhchap-ctrl-secret"),
                ] {
                    if let Some(Value::String(s)) = generated.get(k) {
                        println!("  generated: nvme connect ... {flag} {s}");
                    }
                }
            }
        }
        SubsystemCmd::Auth {
            nqn,
            require,
            no_require,
            dhchap_hashes,
            dhchap_dhgroups,
        } => {
            let list = |v: Option<Vec<String>>| {
                v.map(|l| {
                    if l.len() == 1 && l[0] == "default" {
                        Vec::new()
                    } else {
                        l
                    }
                })
            };
            let require_auth = if require {
                Some(true)
            } else if no_require {
                Some(false)
            } else {
                None
            };
            let v = api.post(
                &format!("{base}/{nqn}/auth"),
                &json!({"require_auth": require_auth, "dhchap_hashes": list(dhchap_hashes),
                        "dhchap_dhgroups": list(dhchap_dhgroups)}),
            )?;
            show(&v, &print_subsystem);
        }
        SubsystemCmd::GenSecret { hmac, length } => {
            let t = match hmac.as_str() {
                "none" | "0" => 0,
                "sha256" | "1" => 1,
                "sha384" | "2" => 2,
                "sha512" | "3" => 3,
                _ => return Err(format!("--hmac {hmac:?}: none, sha256, sha384 or sha512").into()),
            };
            println!("{}", nvmux_daemon::nvmf::generate_secret(t, length)?);
        }
        SubsystemCmd::DenyHost { nqn, host } => {
            let v = api.delete(&format!("{base}/{nqn}/hosts/{host}"))?;
            show(&v, &|_| {
                println!(
                    "host {host} removed from {nqn}'s allow-list (connected hosts stay connected)"
                )
            });
        }
        SubsystemCmd::Listen { nqn, addr } => {
            let v = api.post(&format!("{base}/{nqn}/listen"), &json!({"listen": addr}))?;
            show(&v, &|v| {
                println!(
                    "{nqn} now listens on {}",
                    v["listen"].as_str().unwrap_or("")
                )
            });
        }
    }
    Ok(())
}

/// `30s`, `500ms`, `2m` or a plain number of seconds, in milliseconds.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else {
        (t, 1000)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("duration {s:?}: give e.g. 30s, 500ms or 2m"))
}

/// `nvmux disk mirror ...`.
fn mirror_cmd(cx: &Ctx, c: MirrorCmd) -> Res {
    let api = &cx.api;
    match c {
        MirrorCmd::Add {
            disk,
            file,
            remote,
            nsid,
            loss_timeout,
            name,
            rate,
            wait,
        } => {
            let file = file.map(|p| std::path::absolute(&p).unwrap_or(p));
            let loss_timeout_ms = loss_timeout.map(|t| parse_duration_ms(&t)).transpose()?;
            let rate = rate.map(|r| nvmux_core::parse_size(&r)).transpose()?;
            let v = api.post(
                &format!("/v1/disks/{disk}/mirror"),
                &json!({"name": name, "file": file, "remote": remote, "nsid": nsid,
                        "loss_timeout_ms": loss_timeout_ms, "sync_rate": rate}),
            )?;
            // The new leg is the last one.
            let leg = v["legs"]
                .as_array()
                .and_then(|l| l.last())
                .and_then(|l| l["name"].as_str())
                .unwrap_or("")
                .to_string();
            if wait {
                let t = std::time::Instant::now();
                let done = wait_synced(api, &disk, &leg, None)?;
                cx.show(&done, &|_| {
                    println!(
                        "disk {disk}: leg {leg} added and in sync ({:.1} s)",
                        t.elapsed().as_secs_f64()
                    )
                });
            } else {
                cx.show(&v, &|_| {
                    println!(
                        "disk {disk}: leg {leg} added; copying (`nvmux disk mirror status {disk}`)"
                    )
                });
            }
        }
        MirrorCmd::Remove { disk, leg } => {
            let v = api.delete(&format!("/v1/disks/{disk}/mirror/{leg}"))?;
            cx.show(&v, &|_| println!("disk {disk}: leg {leg} removed"));
        }
        MirrorCmd::Status { disk } => {
            let v = api.get(&format!("/v1/disks/{disk}/mirror"))?;
            cx.show(&v, &mirror_table);
        }
    }
    Ok(())
}

fn mirror_table(v: &Value) {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    println!(
        "disk {}: {} regions of {}, {} dirty; resynced {} regions, {} full copies, {} bitmap writes, {} read retries, {} read repairs",
        v["disk"].as_str().unwrap_or(""),
        n("regions"),
        nvmux_core::format_size(n("region_size")),
        n("dirty_regions"),
        n("resynced_regions"),
        n("full_copies"),
        n("bitmap_writes"),
        n("read_retries"),
        n("read_repairs"),
    );
    println!(
        "  {:<12} {:<8} {:>16} {:>8} {:>7} DEVICE",
        "LEG", "STATE", "SYNC", "INFLIGHT", "ERRORS"
    );
    for l in v["legs"].as_array().into_iter().flatten() {
        let (done, total) = (
            l["sync_done"].as_u64().unwrap_or(0),
            l["sync_total"].as_u64().unwrap_or(0),
        );
        let sync = if total > 0 {
            format!(
                "{:.0}% of {}",
                done as f64 * 100.0 / total as f64,
                nvmux_core::format_size(total)
            )
        } else {
            "-".into()
        };
        let paths = l["remote"]["paths"]
            .as_array()
            .map(|p| {
                p.iter()
                    .map(|p| {
                        format!(
                            "{} {}{}",
                            p["addr"].as_str().unwrap_or(""),
                            p["state"].as_str().unwrap_or(""),
                            if p["active"].as_bool() == Some(true) {
                                " (active)"
                            } else {
                                ""
                            }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .map(|p| format!(" [{p}]"))
            .unwrap_or_default();
        println!(
            "  {:<12} {:<8} {:>16} {:>8} {:>7} {}{paths}",
            l["name"].as_str().unwrap_or(""),
            l["state"].as_str().unwrap_or(""),
            sync,
            l["in_flight"].as_u64().unwrap_or(0),
            l["errors"].as_u64().unwrap_or(0),
            l["device"].as_str().unwrap_or(""),
        );
    }
}

/// Wait until `leg` of `disk` is healthy, drawing its copy progress (a bar on a terminal,
/// a line per 10% otherwise). Fails if the leg is faulted or leaves, or at `deadline`.
fn wait_synced(
    api: &ApiClient,
    disk: &str,
    leg: &str,
    deadline: Option<std::time::Instant>,
) -> Result<Value, Box<dyn std::error::Error>> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut last_tenth = None;
    loop {
        let v = api.get(&format!("/v1/disks/{disk}/mirror"))?;
        let Some(l) = v["legs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == leg)
        else {
            return Err(format!("disk {disk}: leg {leg} is gone").into());
        };
        let (done, total) = (
            l["sync_done"].as_u64().unwrap_or(0),
            l["sync_total"].as_u64().unwrap_or(0),
        );
        match l["state"].as_str() {
            Some("healthy") => {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return Ok(v);
            }
            Some("faulted") => {
                if tty {
                    eprintln!();
                }
                return Err(format!(
                    "disk {disk}: leg {leg} failed during its copy (`nvmux disk mirror status {disk}`)"
                )
                .into());
            }
            _ => {}
        }
        if tty {
            nvmux_bench::report::draw_bar(&format!("copying {disk} to {leg}"), done, total);
        } else if let Some(tenth) = (done * 10).checked_div(total) {
            if last_tenth != Some(tenth) {
                eprintln!(
                    "copying {disk} to {leg}: {}% ({} of {})",
                    tenth * 10,
                    nvmux_core::format_size(done),
                    nvmux_core::format_size(total)
                );
                last_tenth = Some(tenth);
            }
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Err(format!("disk {disk}: leg {leg} not in sync before the timeout").into());
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// `nvmux disk move`: mirror add of the destination, wait for its copy, remove the rest.
fn disk_move(
    cx: &Ctx,
    disk: &str,
    to: &str,
    nsid: Option<u32>,
    rate: Option<String>,
    timeout: Option<String>,
) -> Res {
    let api = &cx.api;
    let t = std::time::Instant::now();
    let rate = rate.map(|r| nvmux_core::parse_size(&r)).transpose()?;
    let deadline = timeout
        .map(|s| parse_duration_ms(&s))
        .transpose()?
        .map(|ms| t + std::time::Duration::from_millis(ms));
    let before = api.get(&format!("/v1/disks/{disk}"))?;
    let v = api.post(
        &format!("/v1/disks/{disk}/mirror"),
        &json!({"remote": to, "nsid": nsid, "sync_rate": rate}),
    )?;
    let legs: Vec<String> = v["legs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["name"].as_str().map(str::to_string))
        .collect();
    let Some(new) = legs.last().cloned() else {
        return Err(format!("disk {disk}: the daemon shows no legs").into());
    };
    eprintln!("disk {disk}: destination {to} added as leg {new}; copying");
    if let Err(e) = wait_synced(api, disk, &new, deadline) {
        // Take the unfinished leg out again: the disk stays where it was.
        let _ = api.delete(&format!("/v1/disks/{disk}/mirror/{new}"));
        return Err(format!("{e}; the move was abandoned and leg {new} removed").into());
    }
    for old in legs.iter().filter(|l| **l != new) {
        api.delete(&format!("/v1/disks/{disk}/mirror/{old}"))?;
    }
    let after = api.get(&format!("/v1/disks/{disk}"))?;
    let old_backend = {
        let b = &before["backend"];
        match (b["type"].as_str(), b["path"].as_str(), b["volume"].as_str()) {
            (Some(t), Some(p), _) => format!("{t} {p}"),
            (Some(t), _, Some(v)) => format!("{t} {}/{v}", b["pool"].as_str().unwrap_or("")),
            (Some(t), _, _) => t.to_string(),
            _ => "its old backend".into(),
        }
    };
    cx.show(&after, &|v| {
        println!(
            "moved disk {disk} to {to} in {:.1} s ({}); the old data stays where it was ({})",
            t.elapsed().as_secs_f64(),
            nvmux_core::format_size(v["size"].as_u64().unwrap_or(0)),
            old_backend
        )
    });
    Ok(())
}
