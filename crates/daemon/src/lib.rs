//! The nvmux daemon: the only room that wires the others together.
//!
//! It holds the desired state (disks and exports), persists it to `state.json` in the
//! data directory (written to a temporary file, fsynced and renamed, so a crash leaves
//! either the old or the new state), serves the HTTP/JSON API on a Unix socket, runs the
//! worker threads, and publishes metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nvmux_backend::{FileDevice, FileOptions, MemoryDevice, NullDevice};
use nvmux_core::stats::DiskStats;
use nvmux_core::worker::{WorkerConfig, WorkerPool};
use nvmux_core::{BlockDevice, Error, ErrorKind, Result};
use nvmux_func::keys::KeyProvider;
use nvmux_vhost::{ExportConfig, VhostBlkExport};
use serde::{Deserialize, Serialize};

pub mod api;
pub mod client;
pub mod config;
pub mod http;
pub mod metrics;
pub mod nbd;
pub mod nvmf;
pub mod ops;
pub mod pools;
pub mod routing;
pub mod upgrade;

pub use config::Config;

/// Version of `state.json`.
pub const STATE_VERSION: u32 = 1;

/// Where a disk's blocks live.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum BackendSpec {
    /// A regular file or a block device, through io_uring.
    File {
        path: PathBuf,
        /// Try O_DIRECT (falls back to buffered I/O where refused).
        #[serde(default = "yes")]
        direct: bool,
        /// nvmux created this file in its data directory and deletes it with the disk.
        #[serde(default)]
        owned: bool,
    },
    /// Completes everything at once; for measuring the software path.
    Null,
    /// RAM; contents are lost when the daemon stops.
    Memory,
    /// A thin volume in a pool.
    Thin {
        pool: String,
        volume: String,
        /// The disk created the volume and deletes it with the disk.
        #[serde(default)]
        owned: bool,
    },
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub backend: BackendSpec,
    pub size: u64,
    pub block_size: u32,
    #[serde(default)]
    pub read_only: bool,
    /// Encryption (the `crypt` function), if the disk has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crypt: Option<CryptSpec>,
    /// Rate limits and fair-share weight (the `qos` function), if any are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosSpec>,
    /// The disk's functions, outermost first. `None`: the default chain, `qos` then
    /// `crypt` (if encrypted). See [`DiskSpec::functions`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<Vec<Function>>,
    /// The disk's classifier (an eBPF program that routes each command), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier: Option<routing::ClassifierSpec>,
    /// The disk's external function socket, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<routing::ExternalSpec>,
    /// The operator's opt-in: a classifier (or external function) may complete a FLUSH
    /// that the disk's device has not flushed (acknowledged flushes without durability).
    /// Off by default: such a FLUSH goes down the chain anyway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_flush_complete: bool,
}

/// A storage function a disk's chain can hold.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Function {
    /// Rate limits and fair sharing of the host device.
    Qos,
    /// AES-XTS-256 encryption.
    Crypt,
}

impl Function {
    pub fn name(self) -> &'static str {
        match self {
            Function::Qos => "qos",
            Function::Crypt => "crypt",
        }
    }

    /// Parse a comma-separated chain, outermost first; `none` is the empty chain.
    pub fn parse_chain(s: &str) -> Result<Vec<Function>> {
        if s.trim() == "none" {
            return Ok(Vec::new());
        }
        s.split(',')
            .map(|f| match f.trim() {
                "qos" => Ok(Function::Qos),
                "crypt" => Ok(Function::Crypt),
                other => Err(err(
                    ErrorKind::InvalidArgument,
                    format!("unknown function {other:?} in chain {s:?}: the functions are qos and crypt (or `none`)"),
                )),
            })
            .collect()
    }
}

impl DiskSpec {
    /// The disk's chain, outermost first, as it is built.
    pub fn functions(&self) -> Vec<Function> {
        match &self.chain {
            Some(c) => c.clone(),
            None if self.crypt.is_some() => vec![Function::Qos, Function::Crypt],
            None => vec![Function::Qos],
        }
    }

    fn has(&self, f: Function) -> bool {
        self.functions().contains(&f)
    }

    /// A chain names each function at most once, and holds `crypt` exactly when the disk
    /// is encrypted (without it the guest would see ciphertext).
    fn check_chain(&self) -> Result<()> {
        let fs = self.functions();
        let bad = |m: String| {
            Err(err(
                ErrorKind::InvalidArgument,
                format!("disk {:?}: {m}", self.name),
            ))
        };
        for (i, f) in fs.iter().enumerate() {
            if fs[..i].contains(f) {
                return bad(format!("the chain names {} twice", f.name()));
            }
        }
        match (self.crypt.is_some(), fs.contains(&Function::Crypt)) {
            (true, false) => bad("an encrypted disk's chain must hold crypt".into()),
            (false, true) => {
                bad("crypt in the chain needs an encrypted disk (create it with encrypt)".into())
            }
            _ => Ok(()),
        }
    }
}

/// A disk's rate limits: each `None` (or 0) is unlimited.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QosSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_read: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_write: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_read: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_write: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps_total: Option<u64>,
    /// Burst allowance as time at the limit, in ms (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_ms: Option<u64>,
    /// The disk's weight in fair sharing of its backend (1–10000, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl QosSpec {
    /// The weight, defaulted.
    fn weight(&self) -> u32 {
        self.weight.unwrap_or(nvmux_func::fair::DEFAULT_WEIGHT)
    }

    /// Check the limits and the weight together, before anything changes.
    fn check(&self) -> Result<()> {
        self.limits().validate()?;
        nvmux_func::fair::check_weight(self.weight())
    }

    fn limits(&self) -> nvmux_func::Limits {
        nvmux_func::Limits {
            read_iops: self.iops_read,
            write_iops: self.iops_write,
            total_iops: self.iops_total,
            read_bps: self.bps_read,
            write_bps: self.bps_write,
            total_bps: self.bps_total,
            burst_ms: self.burst_ms,
        }
    }
}

/// An encrypted disk's cipher and where its key is. The wrapped data key itself lives in
/// the keystore (`<data_dir>/keystore`), never in `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CryptSpec {
    /// Always `aes-xts-plain64` (AES-XTS-256) today.
    pub cipher: String,
    /// The keystore slot that holds the wrapped data key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// The slot's random id (32 hex digits): the slot must carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Encryption sector size in bytes: 512 (default, dm-crypt's) or 4096.
    #[serde(default = "default_sector", skip_serializing_if = "is_default_sector")]
    pub sector_size: u32,
    /// With 4096-byte sectors: IVs count 4096-byte sectors (dm-crypt's
    /// `iv_large_sectors`) instead of 512-byte units (dm-crypt's default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub iv_large_sectors: bool,
    /// The check value of the KEK that wraps the key (first 8 bytes of AES-256(KEK, 0)),
    /// hex: shown by the API, read from the keystore, not stored in `state.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kek_check: Option<String>,
    /// The wrapped key of a `state.json` written before the keystore: read once, moved to
    /// the keystore at start, never written or shown.
    #[serde(default, skip_serializing)]
    pub wrapped_key: Option<String>,
}

fn default_sector() -> u32 {
    512
}

fn is_default_sector(s: &u32) -> bool {
    *s == 512
}

impl CryptSpec {
    fn layout(&self) -> nvmux_func::crypt::Layout {
        nvmux_func::crypt::Layout {
            sector: self.sector_size as usize,
            iv_large_sectors: self.iv_large_sectors,
        }
    }

    /// The keystore slot and id, or an error naming the disk.
    fn slot_ref(&self, disk: &str) -> Result<(u32, nvmux_func::keystore::KeyId)> {
        let id = self
            .key_id
            .as_deref()
            .and_then(nvmux_func::keys::from_hex)
            .and_then(|v| v.try_into().ok());
        match (self.slot, id) {
            (Some(s), Some(id)) => Ok((s, id)),
            _ => Err(err(
                ErrorKind::InvalidArgument,
                format!("disk {disk:?}: state.json names no keystore slot for its key (slot and key_id)"),
            )),
        }
    }
}

/// The only cipher today.
pub const CIPHER: &str = "aes-xts-plain64";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ExportKind {
    VhostUserBlk {
        socket: PathBuf,
        #[serde(default = "one_queue")]
        num_queues: u16,
        /// The other vhost-user-blk export of the same disk this one pairs with for a live
        /// migration on one host: the rings of only one of the two run at a time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration_peer: Option<String>,
    },
    /// NBD, on a Unix socket or a TCP address (loopback, or any address with TLS);
    /// exports on the same address share one listener (and its TLS) and differ by export
    /// name.
    Nbd {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
        export_name: String,
        #[serde(default)]
        read_only: bool,
        /// TLS credentials; TLS is then required (see `nbd::NbdTls`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<nbd::NbdTls>,
    },
}

fn one_queue() -> u16 {
    1
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub disk: String,
    #[serde(flatten)]
    pub kind: ExportKind,
    /// Exports on a Unix socket: who the socket belongs to, `USER[:GROUP]` as given
    /// (names or numbers). Absent: the daemon's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Exports on a Unix socket: the socket's mode, four octal digits. Absent (a
    /// state.json from before modes): 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

impl ExportSpec {
    /// The socket's owner and mode, resolved now (user and group names may change).
    pub fn perms(&self) -> Result<nvmux_core::unixsock::SocketPerms> {
        nvmux_core::unixsock::SocketPerms::parse(self.owner.as_deref(), self.mode.as_deref())
            .map_err(|e| {
                err(
                    e.kind,
                    format!("export {:?}: socket owner/mode: {}", self.name, e.msg),
                )
            })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    version: u32,
    #[serde(default)]
    pools: Vec<pools::PoolSpec>,
    disks: Vec<DiskSpec>,
    exports: Vec<ExportSpec>,
    #[serde(default)]
    subsystems: Vec<nvmf::SubsystemSpec>,
}

/// `POST /v1/disks` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskCreate {
    pub name: String,
    /// `file` (default), `null` or `memory`.
    #[serde(default)]
    pub backend: Option<String>,
    /// File or block device; default `<data_dir>/disks/<name>.img`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Bytes. Required unless an existing file gives it.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub block_size: Option<u32>,
    #[serde(default)]
    pub read_only: bool,
    /// Default true.
    #[serde(default)]
    pub direct: Option<bool>,
    /// Make the disk a thin volume in this pool.
    #[serde(default)]
    pub pool: Option<String>,
    /// With `pool`: clone this snapshot (the size defaults to the snapshot's).
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// With `pool`: attach this existing volume or snapshot instead of creating one.
    #[serde(default)]
    pub volume: Option<String>,
    /// Encrypt the disk (AES-XTS-256) with a new random data key wrapped by the KEK.
    #[serde(default)]
    pub encrypt: bool,
    /// With `encrypt`: the encryption sector size, 512 (default) or 4096 (needs a block
    /// size of 4096), as dm-crypt's `sector_size`.
    #[serde(default)]
    pub sector_size: Option<u32>,
    /// With `encrypt` and `sector_size` 4096: IVs count 4096-byte sectors, as dm-crypt's
    /// `iv_large_sectors` (and LUKS2); default false, as dm-crypt's plain mode.
    #[serde(default)]
    pub iv_large_sectors: bool,
    /// Rate limits and weight from the start.
    #[serde(default)]
    pub qos: Option<QosSpec>,
    /// The function chain, outermost first (default: qos, then crypt if encrypted).
    #[serde(default)]
    pub chain: Option<Vec<Function>>,
}

/// `POST /v1/exports` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExportCreate {
    /// Default: the disk's name.
    #[serde(default)]
    pub name: Option<String>,
    pub disk: String,
    /// `vhost-user-blk` (default) or `nbd`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The Unix socket (vhost-user-blk: required; nbd: this or `listen`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub num_queues: Option<u16>,
    /// vhost-user-blk: pair with this export of the same disk for a live migration on one
    /// host (the source QEMU on one, the destination on the other); the rings of only one
    /// of the two run at a time.
    #[serde(default)]
    pub migration_peer: Option<String>,
    /// nbd: a TCP address, e.g. `127.0.0.1:10809` (port 0: any free port): loopback, or
    /// any address with `tls`.
    #[serde(default)]
    pub listen: Option<String>,
    /// nbd: the export name clients ask for (default: the export's name).
    #[serde(default)]
    pub export_name: Option<String>,
    /// nbd: refuse writes (EPERM) even if the disk is writable.
    #[serde(default)]
    pub read_only: bool,
    /// nbd: TLS credentials (`{"psk_file": ...}` or `{"x509_dir": ..., "verify_peer": ...}`);
    /// TLS is then required.
    #[serde(default)]
    pub tls: Option<nbd::NbdTls>,
    /// Unix socket exports: give the socket to `USER[:GROUP]` (names or numbers), e.g.
    /// `libvirt-qemu`, so that a front-end running as that user may connect.
    #[serde(default)]
    pub owner: Option<String>,
    /// Unix socket exports: the socket's mode, octal (default 0600, or 0660 when the
    /// owner names a group).
    #[serde(default)]
    pub mode: Option<String>,
}

/// A disk as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskView {
    #[serde(flatten)]
    pub spec: DiskSpec,
    /// `ok`, or why the disk could not be opened.
    pub status: String,
    pub device: String,
    /// The function chain as built, outermost first.
    pub functions: Vec<Function>,
    pub exports: Vec<String>,
}

struct Disk {
    spec: DiskSpec,
    /// The disk's rate limiter, shared by every device opened for it (live changes).
    qos: Arc<nvmux_func::Qos>,
    /// The disk's router (classifier, external function), shared likewise.
    router: Arc<nvmux_router::Router>,
    dev: std::result::Result<Arc<dyn BlockDevice>, String>,
    stats: Arc<DiskStats>,
}

struct Export {
    spec: ExportSpec,
    handle: std::result::Result<Handle, String>,
}

/// A running export.
enum Handle {
    Vhost(VhostBlkExport),
    Nbd(nbd::NbdHandle),
}

impl Handle {
    fn connected(&self) -> bool {
        match self {
            Handle::Vhost(h) => h.connected(),
            Handle::Nbd(h) => h.export.connections() > 0,
        }
    }
}

#[derive(Default)]
struct Inner {
    pools: BTreeMap<String, pools::PoolEntry>,
    disks: BTreeMap<String, Disk>,
    exports: BTreeMap<String, Export>,
    subsystems: BTreeMap<String, nvmf::SubsystemEntry>,
}

/// The running daemon.
pub struct Daemon {
    cfg: Config,
    inner: Mutex<Inner>,
    workers: WorkerPool,
    started: Instant,
    /// Exports spread their queues over the workers starting at a rotating offset, so
    /// many single-queue VMs do not all land on worker 0.
    next_worker: std::sync::atomic::AtomicUsize,
    /// Long-running operations, readable without the state lock.
    ops: ops::Ops,
    /// The key-encryption key's source.
    keys: Mutex<Arc<dyn KeyProvider>>,
    /// The wrapped data keys (`<data_dir>/keystore`). Lock order: `inner`, then this.
    keystore: Mutex<nvmux_func::keystore::Keystore>,
    /// The NVMe/TCP target (subsystems, listeners, connections).
    nvmf: nvmux_nvmf::Target,
    /// The one budget of network buffers (`network.memory_budget`), shared by every
    /// network frontend (NVMe/TCP, NBD).
    net_mem: Arc<nvmux_core::budget::MemBudget>,
    /// NBD listeners by address (with their named exports), outside the state lock.
    nbd: Mutex<BTreeMap<String, nbd::NbdListener>>,
    /// Fair-share groups by host device id; a group lives while a disk uses it.
    groups: Mutex<std::collections::HashMap<u64, std::sync::Weak<nvmux_func::ShareGroup>>>,
    /// Held for the daemon's lifetime: one daemon per data directory.
    lock_file: std::fs::File,
    /// The API server (`serve` sets it): a takeover hands its socket over.
    api: Mutex<Option<api::ApiServer>>,
    /// An upgrade is under way (one at a time).
    upgrading: std::sync::atomic::AtomicBool,
    /// The process exits once the reply to `POST /v1/upgrade` is written: the new
    /// process serves.
    pub(crate) exit_after_reply: std::sync::atomic::AtomicBool,
}

/// Take an exclusive lock on `<data_dir>/nvmux.lock`, or fail if another daemon holds it.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let p = dir.join("nvmux.lock");
    // After a takeover: the old process's lock (flock belongs to the open file, which the
    // two processes share).
    if let Some(fd) = nvmux_core::unixsock::take_inherited(&upgrade::lock_key(&p)) {
        return Ok(std::fs::File::from(fd));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(format!("open {}", p.display()), e))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(err(
            ErrorKind::Busy,
            format!("{} is in use by another nvmux daemon", dir.display()),
        ));
    }
    Ok(f)
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> Error {
    Error::new(kind, msg)
}

/// An export may only replace a stale socket or a symlink: not another file, not the API
/// socket (compared as files, whatever the spelling of the path), not a socket someone
/// listens on.
fn check_export_socket(path: &Path, api: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        let same_as_api =
            std::fs::metadata(api).is_ok_and(|a| a.dev() == m.dev() && a.ino() == m.ino());
        if same_as_api {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("{} is the API socket; choose another path", path.display()),
            ));
        }
    }
    claim_socket(path)
}

/// The owner and mode a new export's socket gets, as stored in its spec: checked (names
/// resolved) now. NBD exports that share a socket share its owner and mode: a later export
/// takes the listener's unless it asks for the same ones.
fn export_socket_perms(
    g: &Inner,
    kind: &ExportKind,
    req: &ExportCreate,
) -> Result<(Option<String>, Option<String>)> {
    use nvmux_core::unixsock::{format_mode, SocketPerms};
    let Some(sock) = kind.socket() else {
        if req.owner.is_some() || req.mode.is_some() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "owner and mode are for exports on a Unix socket; a TCP listener has neither",
            ));
        }
        return Ok((None, None));
    };
    let perms = SocketPerms::parse(req.owner.as_deref(), req.mode.as_deref())?;
    if let Some(other) = g
        .exports
        .values()
        .find(|e| e.spec.kind.socket() == Some(sock))
    {
        let theirs = (other.spec.owner.clone(), other.spec.mode.clone());
        let same = other.spec.perms().is_ok_and(|p| p == perms);
        if (req.owner.is_some() || req.mode.is_some()) && !same {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!(
                    "socket {} is shared with export {:?} (owner {}, mode {}): give the same owner and mode, or none",
                    sock.display(),
                    other.spec.name,
                    other.spec.owner.as_deref().unwrap_or("the daemon's user"),
                    other.spec.mode.as_deref().unwrap_or("0600"),
                ),
            ));
        }
        return Ok(theirs);
    }
    Ok((req.owner.clone(), Some(format_mode(perms.mode))))
}

/// `sector_size` and `iv_large_sectors` belong to encrypted disks.
pub(crate) fn check_crypt_options(req: &DiskCreate) -> Result<()> {
    if !req.encrypt && (req.sector_size.is_some() || req.iv_large_sectors) {
        return Err(err(
            ErrorKind::InvalidArgument,
            "sector_size and iv_large_sectors are encryption options: add encrypt",
        ));
    }
    Ok(())
}

/// Names: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn check_name(what: &str, n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorKind::InvalidArgument,
            format!("{what} name {n:?} is invalid: use 1-64 of A-Z a-z 0-9 . _ - (not starting with . or -)"),
        ))
    }
}

/// A migration peer must be a running vhost-user-blk export of the same disk, not already
/// paired (one double export per disk).
fn check_migration_peer(g: &Inner, peer: &str, disk: &str) -> Result<()> {
    let Some(p) = g.exports.get(peer) else {
        return Err(err(
            ErrorKind::NotFound,
            format!("migration peer export {peer:?} does not exist"),
        ));
    };
    if !matches!(p.spec.kind, ExportKind::VhostUserBlk { .. }) || p.spec.disk != disk {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!(
                "migration peer {peer:?} must be a vhost-user-blk export of disk {disk:?} (it serves {:?} over {})",
                p.spec.disk,
                match p.spec.kind {
                    ExportKind::VhostUserBlk { .. } => "vhost-user-blk",
                    ExportKind::Nbd { .. } => "nbd",
                }
            ),
        ));
    }
    if let Some((n, _)) = g.exports.iter().find(|(_, x)| {
        matches!(&x.spec.kind, ExportKind::VhostUserBlk { migration_peer: Some(m), .. } if m == peer)
    }) {
        return Err(err(
            ErrorKind::AlreadyExists,
            format!("export {peer:?} is already paired with {n:?} (one double export per disk)"),
        ));
    }
    if let ExportKind::VhostUserBlk {
        migration_peer: Some(m),
        ..
    } = &p.spec.kind
    {
        return Err(err(
            ErrorKind::AlreadyExists,
            format!("export {peer:?} is already paired with {m:?} (one double export per disk)"),
        ));
    }
    if !matches!(p.handle, Ok(Handle::Vhost(_))) {
        return Err(err(
            ErrorKind::Io,
            format!("migration peer {peer:?} is not running; fix or re-create it first"),
        ));
    }
    Ok(())
}

/// Refuse an operation that rebuilds a disk's device while an export serves it.
fn not_exported(g: &Inner, name: &str) -> Result<()> {
    if let Some(e) = g.exports.values().find(|e| e.spec.disk == name) {
        return Err(err(
            ErrorKind::Busy,
            format!(
                "disk {name:?} is exported as {:?}; remove the export first",
                e.spec.name
            ),
        ));
    }
    if let Some((nqn, nsid)) = Daemon::namespaces_of(g, name).first() {
        return Err(err(
            ErrorKind::Busy,
            format!("disk {name:?} is namespace {nsid} of {nqn}; remove the namespace first"),
        ));
    }
    Ok(())
}

/// Open a disk's device: its backend, then its functions, then its router with the
/// classifier (a disk whose classifier does not load is not served: it may be a guard).
fn open_device(
    g: &Inner,
    spec: &DiskSpec,
    keys: &KeySource,
    qos: &Arc<nvmux_func::Qos>,
    router: &Arc<nvmux_router::Router>,
) -> Result<Arc<dyn BlockDevice>> {
    let dev = with_functions(open_backend(g, spec)?, spec, keys, qos, router)?;
    if let Some(c) = &spec.classifier {
        let p = routing::load_program(c).map_err(|e| {
            err(
                e.kind,
                format!("classifier {}: {}", c.object.display(), e.msg),
            )
        })?;
        router.set_program(Some(p));
    }
    Ok(dev)
}

/// The host device that holds a disk's data (a file's filesystem, a block device
/// itself, a pool's file), if it has one.
fn backend_device(g: &Inner, spec: &DiskSpec) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let path = match &spec.backend {
        BackendSpec::File { path, .. } => path.clone(),
        BackendSpec::Thin { pool, .. } => g.pools.get(pool)?.spec.path.clone(),
        BackendSpec::Null | BackendSpec::Memory => return None,
    };
    // A file that does not exist yet will live on its directory's filesystem.
    let m = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(_) => std::fs::metadata(path.parent()?).ok()?,
    };
    Some(if m.file_type().is_block_device() {
        m.rdev()
    } else {
        m.dev()
    })
}

/// Stack a disk's functions on its backend device in the order of its chain, outermost
/// first (default `qos → crypt → backend`), and the router on top. `qos` is a
/// pass-through while no limit is set and the host device is not saturated, so limits can
/// be set on a disk in use. The router's fast path is the same stack without the optional
/// functions (`qos`): it keeps `crypt`, which defines what the blocks hold.
pub(crate) fn with_functions(
    dev: Arc<dyn BlockDevice>,
    spec: &DiskSpec,
    keys: &KeySource,
    qos: &Arc<nvmux_func::Qos>,
    router: &Arc<nvmux_router::Router>,
) -> Result<Arc<dyn BlockDevice>> {
    spec.check_chain()?;
    router.set_allow_flush_complete(spec.allow_flush_complete);
    let stack = |fs: &[Function]| -> Result<Arc<dyn BlockDevice>> {
        let mut d = dev.clone();
        for f in fs.iter().rev() {
            d = match f {
                Function::Crypt => with_crypt(d, spec, keys)?,
                Function::Qos => Arc::new(nvmux_func::QosDevice::new(d, qos.clone())),
            };
        }
        Ok(d)
    };
    let chain = spec.functions();
    let fast = if chain.contains(&Function::Qos) {
        let essential: Vec<Function> = chain
            .iter()
            .copied()
            .filter(|f| *f != Function::Qos)
            .collect();
        Some(stack(&essential)?)
    } else {
        None
    };
    Ok(Arc::new(nvmux_router::RouterDevice::new(
        router.clone(),
        stack(&chain)?,
        fast,
    )))
}

/// What opening or creating an encrypted disk needs: the KEK's source and the keystore.
pub(crate) struct KeySource<'a> {
    pub kek: Arc<dyn KeyProvider>,
    pub store: &'a Mutex<nvmux_func::keystore::Keystore>,
}

impl KeySource<'_> {
    fn store(&self) -> MutexGuard<'_, nvmux_func::keystore::Keystore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Destroy a key: overwrite its slot (a disk being deleted, or a create that failed).
    fn destroy(&self, disk: &str, c: &CryptSpec) {
        if let Some(s) = c.slot {
            if let Err(e) = self.store().erase(s) {
                tracing::error!(
                    disk,
                    slot = s,
                    "could not erase the key's keystore slot: {e}"
                );
            }
        }
    }
}

/// A key slot taken for a disk being created: erased on drop unless kept.
pub(crate) struct NewKey<'a, 'b> {
    keys: &'a KeySource<'b>,
    disk: String,
    spec: Option<CryptSpec>,
}

impl NewKey<'_, '_> {
    pub fn spec(&self) -> Option<CryptSpec> {
        self.spec.clone()
    }
    /// The disk exists now (persisted): keep its key.
    pub fn keep(mut self) {
        self.spec = None;
    }
}

impl Drop for NewKey<'_, '_> {
    fn drop(&mut self) {
        if let Some(c) = &self.spec {
            self.keys.destroy(&self.disk, c);
        }
    }
}

fn with_crypt(
    dev: Arc<dyn BlockDevice>,
    spec: &DiskSpec,
    keys: &KeySource,
) -> Result<Arc<dyn BlockDevice>> {
    let Some(c) = &spec.crypt else {
        return Ok(dev);
    };
    let named = |e: Error| err(e.kind, format!("disk {:?}: {}", spec.name, e.msg));
    if c.cipher != CIPHER {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!(
                "disk {:?}: unknown cipher {:?} (nvmux knows {CIPHER})",
                spec.name, c.cipher
            ),
        ));
    }
    let (slot, id) = c.slot_ref(&spec.name)?;
    let wrapped = keys.store().get(slot, &id).map_err(named)?.key;
    let dek = nvmux_func::keys::unwrap(&*keys.kek, &wrapped).map_err(named)?;
    Ok(Arc::new(
        nvmux_func::CryptDevice::with_layout(dev, &dek, c.layout()).map_err(named)?,
    ))
}

/// A new random data key for `disk`, wrapped with the KEK and stored (synced) in a new
/// keystore slot; the slot is erased again unless the caller keeps it.
pub(crate) fn new_crypt_spec<'a, 'b>(
    disk: &str,
    keys: &'a KeySource<'b>,
    sector_size: Option<u32>,
    iv_large_sectors: bool,
) -> Result<NewKey<'a, 'b>> {
    let sector_size = sector_size.unwrap_or(512);
    if sector_size != 512 && sector_size != 4096 {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("encryption sector size {sector_size} is not supported (use 512 or 4096)"),
        ));
    }
    if iv_large_sectors && sector_size == 512 {
        return Err(err(
            ErrorKind::InvalidArgument,
            "iv_large_sectors needs sector_size 4096 (with 512-byte sectors it changes nothing)",
        ));
    }
    let dek = nvmux_func::keys::new_data_key()?;
    let w = nvmux_func::keys::wrap(&*keys.kek, &dek).map_err(|e| {
        err(
            e.kind,
            format!(
                "cannot encrypt disk {disk:?}: {} (set keys.kek_file in the config, or NVMUX_KEK)",
                e.msg
            ),
        )
    })?;
    let (slot, id) = keys.store().add(disk, &w)?;
    Ok(NewKey {
        keys,
        disk: disk.to_string(),
        spec: Some(CryptSpec {
            cipher: CIPHER.into(),
            slot: Some(slot),
            key_id: Some(nvmux_func::keys::to_hex(&id)),
            sector_size,
            iv_large_sectors,
            kek_check: Some(nvmux_func::keys::to_hex(&w.kek_check)),
            wrapped_key: None,
        }),
    })
}

/// Overwrite a file's bytes with zeros, sync, and remove it: for copies of `state.json`
/// that may hold wrapped keys of an older format (a replaced file's blocks would
/// otherwise keep them).
fn scrub_file(p: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
    let len = f.metadata()?.len();
    let zeros = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    drop(f);
    std::fs::remove_file(p)?;
    if let Some(d) = p.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

fn open_backend(g: &Inner, spec: &DiskSpec) -> Result<Arc<dyn BlockDevice>> {
    Ok(match &spec.backend {
        BackendSpec::Thin { pool, volume, .. } => {
            let p = pools::get_pool(g, pool)?;
            Arc::new(nvmux_volume::ThinDevice::open(&p, volume)?)
        }
        BackendSpec::File { path, direct, .. } => Arc::new(FileDevice::open(
            path,
            &FileOptions {
                block_size: Some(spec.block_size),
                size: Some(spec.size),
                read_only: spec.read_only,
                direct: *direct,
                create: false,
            },
        )?),
        BackendSpec::Null => Arc::new(NullDevice::new(spec.size, spec.block_size, spec.read_only)?),
        BackendSpec::Memory => Arc::new(MemoryDevice::new(
            spec.size,
            spec.block_size,
            spec.read_only,
        )?),
    })
}

impl Daemon {
    /// Start workers and restore the persisted state. Does not serve the API yet.
    pub fn start(cfg: Config) -> Result<Arc<Daemon>> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| Error::io(format!("data dir {}", cfg.data_dir.display()), e))?;
        // Before anything touches sockets or state: one daemon per data directory.
        let lock = lock_data_dir(&cfg.data_dir)?;
        nvmux_backend::probe_io_uring()?;
        nvmux_core::ctlpoll::configure(cfg.workers.control_threads);
        let workers = WorkerPool::new(&WorkerConfig {
            threads: cfg.workers.threads,
            poll_idle: std::time::Duration::from_micros(cfg.workers.poll_idle_us),
            cpus: cfg.workers.cpus.clone(),
        })
        .map_err(|e| Error::io("start worker threads", e))?;
        let cfg_keys = cfg.keys.kek_file.clone();
        let keystore = nvmux_func::keystore::Keystore::open(&cfg.data_dir.join("keystore"))?;
        let net_mem = nvmux_core::budget::MemBudget::new(cfg.network.memory_budget as usize);
        let nvmf = nvmux_nvmf::Target::new(
            workers.workers().to_vec(),
            nvmf::target_config(&cfg, &net_mem),
        );
        let d = Arc::new(Daemon {
            cfg,
            inner: Mutex::new(Inner::default()),
            workers,
            started: Instant::now(),
            next_worker: Default::default(),
            ops: ops::Ops::default(),
            keys: Mutex::new(match &cfg_keys {
                Some(p) => Arc::new(nvmux_func::keys::KekFile(p.clone())),
                None => Arc::new(nvmux_func::keys::KekEnv("NVMUX_KEK".into())),
            }),
            keystore: Mutex::new(keystore),
            groups: Default::default(),
            nbd: Default::default(),
            nvmf,
            net_mem,
            lock_file: lock,
            api: Mutex::new(None),
            upgrading: Default::default(),
            exit_after_reply: Default::default(),
        });
        d.restore()?;
        Ok(d)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state_path(&self) -> PathBuf {
        self.cfg.data_dir.join("state.json")
    }

    fn restore(&self) -> Result<()> {
        let p = self.state_path();
        self.scrub_leftovers(&p);
        let mut text = match std::fs::read_to_string(&p) {
            Ok(t) => {
                // An older nvmux wrote it with the umask's mode: it may hold secrets now.
                use std::os::unix::fs::PermissionsExt;
                if let Ok(m) = std::fs::metadata(&p) {
                    if m.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(path = %p.display(), "state file readable by others: mode set to 0600");
                        let _ =
                            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
                    }
                }
                t
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.check_keystore(&[]);
                return Ok(());
            }
            Err(e) => return Err(Error::io(format!("read {}", p.display()), e)),
        };
        let mut st: State = serde_json::from_str(&text).map_err(|e| {
            err(
                ErrorKind::InvalidArgument,
                format!(
                    "{} is corrupt: {e}; move it away to start empty",
                    p.display()
                ),
            )
        })?;
        if st.version != STATE_VERSION {
            return Err(err(
                ErrorKind::Unsupported,
                format!(
                    "{} has version {}, this nvmux reads version {STATE_VERSION}",
                    p.display(),
                    st.version
                ),
            ));
        }
        // It may hold wrapped keys (before the keystore): no copy stays in memory.
        zeroize::Zeroize::zeroize(&mut text);
        let migrated = self.migrate_keys(&mut st.disks)?;
        let mut g = self.lock();
        for spec in st.pools {
            let pool = nvmux_volume::Pool::open(&spec.path).map_err(|e| e.to_string());
            if let Ok(p) = &pool {
                p.set_command_timeout(self.cfg.pool.command_timeout_ms);
            }
            match &pool {
                Ok(_) => tracing::info!(pool = %spec.name, "pool opened"),
                Err(e) => tracing::error!(pool = %spec.name, "pool could not be opened: {e}"),
            }
            g.pools
                .insert(spec.name.clone(), pools::PoolEntry { spec, pool });
        }
        for spec in st.disks {
            // Limits that no longer validate are dropped with an error in the log, so the
            // disk still comes up.
            let qos = self.new_qos(&g, &spec).or_else(|e| {
                tracing::error!(disk = %spec.name, "qos settings ignored: {e}");
                let mut plain = spec.clone();
                plain.qos = None;
                self.new_qos(&g, &plain)
            })?;
            let router = nvmux_router::Router::new(&spec.name);
            let dev = open_device(&g, &spec, &self.key_source(), &qos, &router)
                .map_err(|e| e.to_string());
            match &dev {
                Ok(_) => tracing::info!(disk = %spec.name, "disk restored"),
                Err(e) => tracing::error!(disk = %spec.name, "disk could not be opened: {e}"),
            }
            if let (Some(x), Ok(d)) = (&spec.external, &dev) {
                let bs = d.info().block_size;
                match routing::start_external(&spec.name, x, bs, d.capacity_bytes() / bs as u64) {
                    Ok(e) => {
                        router.set_external(Some(e));
                    }
                    Err(e) => {
                        tracing::error!(disk = %spec.name, "external function socket not served: {e}")
                    }
                }
            }
            g.disks.insert(
                spec.name.clone(),
                Disk {
                    qos,
                    router,
                    spec,
                    dev,
                    stats: Arc::new(DiskStats::default()),
                },
            );
        }
        // Migration peers start after the exports whose ring gate they share.
        let mut exports = st.exports;
        exports.sort_by_key(|e| {
            matches!(
                &e.kind,
                ExportKind::VhostUserBlk {
                    migration_peer: Some(_),
                    ..
                }
            )
        });
        for mut spec in exports {
            let handle = self.start_export(&g, &mut spec).map_err(|e| e.to_string());
            match &handle {
                Ok(_) => tracing::info!(export = %spec.name, "export restored"),
                Err(e) => tracing::error!(export = %spec.name, "export could not be started: {e}"),
            }
            g.exports.insert(spec.name.clone(), Export { spec, handle });
        }
        for spec in st.subsystems {
            let error = match self.start_subsystem(&g, &spec) {
                Ok(a) => {
                    tracing::info!(subsystem = %spec.nqn, listen = %a, "subsystem restored");
                    None
                }
                Err(e) => {
                    tracing::error!(subsystem = %spec.nqn, "subsystem could not be started: {e}");
                    Some(e.to_string())
                }
            };
            g.subsystems
                .insert(spec.nqn.clone(), nvmf::SubsystemEntry { spec, error });
        }
        if migrated > 0 {
            self.persist_replacing_secrets(&g)?;
            tracing::info!(
                keys = migrated,
                "moved the wrapped data keys from state.json to the keystore; the old state.json was overwritten"
            );
        }
        let disks: Vec<DiskSpec> = g.disks.values().map(|d| d.spec.clone()).collect();
        drop(g);
        self.check_keystore(&disks);
        Ok(())
    }

    /// Copies of `state.json` left by a crash (`state.json.tmp`, `state.json.old`) may
    /// hold wrapped keys of the format before the keystore: overwrite and remove them.
    fn scrub_leftovers(&self, state: &Path) {
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        for ext in ["json.tmp", "json.old"] {
            let q = state.with_extension(ext);
            let Some(id) = ino(&q) else { continue };
            // `state.json.old` is a second name of state.json itself after a crash in
            // the middle of a migration: only the name goes.
            let r = if Some(id) == ino(state) {
                std::fs::remove_file(&q)
            } else {
                scrub_file(&q)
            };
            match r {
                Ok(()) => {
                    tracing::info!(path = %q.display(), "leftover state copy overwritten and removed")
                }
                Err(e) => {
                    tracing::warn!(path = %q.display(), "could not scrub leftover state copy: {e}")
                }
            }
        }
    }

    /// Move wrapped keys found in `state.json` (written before the keystore existed) into
    /// keystore slots. Returns how many moved; `state.json` must then be rewritten.
    fn migrate_keys(&self, disks: &mut [DiskSpec]) -> Result<usize> {
        let mut n = 0;
        for d in disks.iter_mut() {
            let Some(c) = &mut d.crypt else { continue };
            let Some(hex) = c.wrapped_key.take().map(zeroize::Zeroizing::new) else {
                continue;
            };
            let w =
                nvmux_func::keys::WrappedKey::from_hex(&hex, c.kek_check.as_deref().unwrap_or(""))
                    .map_err(|e| {
                        err(
                            e.kind,
                            format!("disk {:?} in state.json: {}", d.name, e.msg),
                        )
                    })?;
            drop(hex);
            let (slot, id) = self.keystore().add(&d.name, &w)?;
            c.slot = Some(slot);
            c.key_id = Some(nvmux_func::keys::to_hex(&id));
            n += 1;
        }
        Ok(n)
    }

    /// Fill in each encrypted disk's KEK check value from the keystore, erase slots that
    /// an earlier attempt left for a disk that has another slot now (a crash between a
    /// slot write and the state write), and warn about slots no disk uses.
    fn check_keystore(&self, disks: &[DiskSpec]) {
        let slots = match self.keystore().slots() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("keystore: {e}");
                return;
            }
        };
        let used = |s: &nvmux_func::keystore::Slot| {
            disks.iter().any(|d| {
                d.crypt
                    .as_ref()
                    .is_some_and(|c| c.slot_ref(&d.name).ok() == Some((s.index, s.id)))
            })
        };
        for s in &slots {
            if used(s) {
                continue;
            }
            if disks.iter().any(|d| d.name == s.owner) {
                match self.keystore().erase(s.index) {
                    Ok(()) => {
                        tracing::info!(slot = s.index, disk = %s.owner, "erased a stale keystore slot (the disk uses another)")
                    }
                    Err(e) => tracing::error!(
                        slot = s.index,
                        "could not erase a stale keystore slot: {e}"
                    ),
                }
            } else {
                tracing::warn!(slot = s.index, owner = %s.owner, "keystore slot holds the key of a disk that state.json does not have (a crash during create, or a state.json moved away); kept");
            }
        }
        let mut g = self.lock();
        for d in g.disks.values_mut() {
            let Some(c) = &mut d.spec.crypt else { continue };
            c.kek_check = slots
                .iter()
                .find(|s| c.slot_ref(&d.spec.name).ok() == Some((s.index, s.id)))
                .map(|s| nvmux_func::keys::to_hex(&s.key.kek_check));
        }
    }

    fn keystore(&self) -> MutexGuard<'_, nvmux_func::keystore::Keystore> {
        self.keystore.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key_source(&self) -> KeySource<'_> {
        KeySource {
            kek: self.keys(),
            store: &self.keystore,
        }
    }

    /// Write `state.json` and overwrite the bytes of the one it replaces (which held
    /// wrapped keys): the old file is kept under a second name across the rename, then
    /// zeroed, synced and removed. A crash in between leaves `state.json.old`, scrubbed
    /// at the next start.
    fn persist_replacing_secrets(&self, g: &Inner) -> Result<()> {
        let p = self.state_path();
        let old = p.with_extension("json.old");
        let _ = std::fs::remove_file(&old);
        let linked = std::fs::hard_link(&p, &old).is_ok();
        self.persist(g)?;
        if linked {
            scrub_file(&old).map_err(|e| Error::io(format!("overwrite {}", old.display()), e))?;
        }
        Ok(())
    }

    fn persist(&self, g: &Inner) -> Result<()> {
        let st = State {
            version: STATE_VERSION,
            pools: g.pools.values().map(|p| p.spec.clone()).collect(),
            disks: g
                .disks
                .values()
                .map(|d| {
                    let mut s = d.spec.clone();
                    if let Some(c) = &mut s.crypt {
                        // Shown by the API, read from the keystore; not stored.
                        c.kek_check = None;
                    }
                    s
                })
                .collect(),
            exports: g.exports.values().map(|e| e.spec.clone()).collect(),
            subsystems: g.subsystems.values().map(|e| e.spec.clone()).collect(),
        };
        let p = self.state_path();
        let tmp = p.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&st)
            .map_err(|e| err(ErrorKind::Io, format!("serialize state: {e}")))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            // Mode 0600: the file holds DH-HMAC-CHAP secrets (see format.md). A temporary
            // file left by a crash keeps its mode when reopened, so set it explicitly.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &p)?;
            std::fs::File::open(&self.cfg.data_dir)?.sync_all()
        };
        write().map_err(|e| Error::io(format!("write {}", p.display()), e))
    }

    /// Why a disk's backing is failed after an I/O error (sticky until it is opened
    /// again: see format.md, "Data safety"), if it is.
    fn failure(g: &Inner, d: &Disk) -> Option<String> {
        match &d.spec.backend {
            BackendSpec::Thin { pool, .. } => g
                .pools
                .get(pool)
                .and_then(|p| p.pool.as_ref().ok())
                .and_then(|p| p.failure()),
            BackendSpec::File { path, .. } => nvmux_backend::failure_of(path),
            _ => None,
        }
    }

    /// (disk, failed) for every disk, for metrics.
    pub(crate) fn disk_failures(&self) -> Vec<(String, bool)> {
        let g = self.lock();
        g.disks
            .values()
            .map(|d| (d.spec.name.clone(), Self::failure(&g, d).is_some()))
            .collect()
    }

    fn view(g: &Inner, d: &Disk) -> DiskView {
        let mut spec = d.spec.clone();
        if let Ok(dev) = &d.dev {
            // A thin volume's size changes with resize.
            spec.size = dev.capacity_bytes();
        }
        DiskView {
            spec,
            status: match (&d.dev, Self::failure(g, d)) {
                (Ok(_), Some(f)) => format!(
                    "failed: {f} (writes and flushes fail until the disk is reopened: restart the daemon)"
                ),
                (Ok(_), None) => "ok".into(),
                (Err(e), _) => format!("error: {e}"),
            },
            device: d.dev.as_ref().map(|d| d.describe()).unwrap_or_default(),
            functions: d.spec.functions(),
            exports: g
                .exports
                .values()
                .filter(|e| e.spec.disk == d.spec.name)
                .map(|e| e.spec.name.clone())
                .chain(
                    Daemon::namespaces_of(g, &d.spec.name)
                        .into_iter()
                        .map(|(nqn, nsid)| format!("{nqn}/ns{nsid}")),
                )
                .collect(),
        }
    }

    pub fn disks(&self) -> Vec<DiskView> {
        let g = self.lock();
        g.disks.values().map(|d| Self::view(&g, d)).collect()
    }

    pub fn disk(&self, name: &str) -> Result<DiskView> {
        let g = self.lock();
        let d = g
            .disks
            .get(name)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("disk {name:?} does not exist")))?;
        Ok(Self::view(&g, d))
    }

    pub fn create_disk(&self, req: DiskCreate) -> Result<DiskView> {
        check_name("disk", &req.name)?;
        let mut g = self.lock();
        if g.disks.contains_key(&req.name) {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!("disk {:?} already exists", req.name),
            ));
        }
        if req.pool.is_some() {
            return self.create_thin_disk(g, req);
        }
        if req.from_snapshot.is_some() || req.volume.is_some() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "--from-snapshot and --volume need --pool",
            ));
        }
        let bs = req.block_size.unwrap_or(512);
        if let Some(b) = req.block_size {
            if b != 512 && b != 4096 {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("block size {b} is not supported (use 512 or 4096)"),
                ));
            }
        }
        let backend = match req.backend.as_deref().unwrap_or("file") {
            "file" => {
                let (path, owned) = match &req.path {
                    Some(p) => (p.clone(), false),
                    None => {
                        let dir = self.cfg.data_dir.join("disks");
                        std::fs::create_dir_all(&dir)
                            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
                        (dir.join(format!("{}.img", req.name)), true)
                    }
                };
                if owned && path.exists() {
                    return Err(err(
                        ErrorKind::AlreadyExists,
                        format!("{} already exists; give --path to use it", path.display()),
                    ));
                }
                if let Some(other) = g.disks.values().find(
                    |d| matches!(&d.spec.backend, BackendSpec::File { path: p, .. } if *p == path),
                ) {
                    return Err(err(
                        ErrorKind::AlreadyExists,
                        format!("{} is already disk {:?}", path.display(), other.spec.name),
                    ));
                }
                BackendSpec::File {
                    path,
                    direct: req.direct.unwrap_or(true),
                    owned,
                }
            }
            "null" => BackendSpec::Null,
            "memory" => BackendSpec::Memory,
            other => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("backend {other:?} is unknown (use file, null or memory)"),
                ))
            }
        };
        if !matches!(backend, BackendSpec::File { .. }) && req.size.is_none() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "a null or memory disk needs a size",
            ));
        }
        check_crypt_options(&req)?;
        // A file disk without a size takes the existing file's size.
        let keys = self.key_source();
        let new_key = if req.encrypt {
            Some(new_crypt_spec(
                &req.name,
                &keys,
                req.sector_size,
                req.iv_large_sectors,
            )?)
        } else {
            None
        };
        let crypt = new_key.as_ref().and_then(NewKey::spec);
        let mut spec = DiskSpec {
            name: req.name.clone(),
            backend,
            size: req.size.unwrap_or(0),
            block_size: bs,
            read_only: req.read_only,
            crypt,
            qos: req.qos,
            chain: req.chain.clone(),
            classifier: None,
            external: None,
            allow_flush_complete: false,
        };
        spec.check_chain()?;
        let qos = self.new_qos(&g, &spec)?;
        let router = nvmux_router::Router::new(&spec.name);
        let opened: Result<Arc<dyn BlockDevice>> = match &spec.backend {
            BackendSpec::File { path, direct, .. } => FileDevice::open(
                path,
                &FileOptions {
                    block_size: req.block_size,
                    size: req.size,
                    read_only: req.read_only,
                    direct: *direct,
                    create: true,
                },
            )
            .map(|d| Arc::new(d) as Arc<dyn BlockDevice>),
            _ => open_backend(&g, &spec),
        }
        .and_then(|d| with_functions(d, &spec, &keys, &qos, &router));
        let dev = match opened {
            Ok(d) => d,
            Err(e) => {
                // Leave nothing behind: remove an image we were creating ourselves.
                if let BackendSpec::File {
                    path, owned: true, ..
                } = &spec.backend
                {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        spec.block_size = dev.info().block_size;
        spec.size = dev.info().size_bytes();
        tracing::info!(disk = %spec.name, device = %dev.describe(), size = spec.size, "disk created");
        g.disks.insert(
            spec.name.clone(),
            Disk {
                qos,
                router,
                spec,
                dev: Ok(dev),
                stats: Arc::new(DiskStats::default()),
            },
        );
        if let Err(e) = self.persist(&g) {
            // Leave nothing behind: drop the disk and an image we created.
            if let Some(d) = g.disks.remove(&req.name) {
                if let BackendSpec::File {
                    path, owned: true, ..
                } = d.spec.backend
                {
                    let _ = std::fs::remove_file(path);
                }
            }
            return Err(e);
        }
        if let Some(k) = new_key {
            k.keep();
        }
        let d = &g.disks[&req.name];
        Ok(Self::view(&g, d))
    }

    /// Crypto-erase: destroy an encrypted disk's data key and give the disk a new one.
    /// The new key, wrapped, overwrites the old one in its keystore slot, in place, and is
    /// synced before this returns: no file the daemon keeps holds the old key in any form
    /// (docs/security.md says against whom that holds). The disk stays, reading as noise
    /// until written. Returns the seconds it took.
    pub fn crypto_erase(&self, name: &str) -> Result<f64> {
        let t = Instant::now();
        let mut g = self.lock();
        let Some(d) = g.disks.get(name) else {
            return Err(err(
                ErrorKind::NotFound,
                format!("disk {name:?} does not exist"),
            ));
        };
        let Some(c) = d.spec.crypt.clone() else {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("disk {name:?} is not encrypted, so it has no key to destroy; `disk delete --erase` zeroes a disk"),
            ));
        };
        not_exported(&g, name)?;
        let named = |e: Error| err(e.kind, format!("disk {name:?}: {}", e.msg));
        let keys = self.key_source();
        let (slot, id) = c.slot_ref(name)?;
        let dek = nvmux_func::keys::new_data_key()?;
        let w = nvmux_func::keys::wrap(&*keys.kek, &dek).map_err(named)?;
        drop(dek);
        // The point of no return: the old key's only stored copy is overwritten.
        keys.store().replace(slot, &id, &w).map_err(named)?;
        let spec = {
            let mut s = d.spec.clone();
            if let Some(c) = &mut s.crypt {
                c.kek_check = Some(nvmux_func::keys::to_hex(&w.kek_check));
            }
            s
        };
        let dev = open_backend(&g, &spec)
            .and_then(|b| with_functions(b, &spec, &keys, &d.qos, &d.router));
        let Some(d) = g.disks.get_mut(name) else {
            return Err(err(ErrorKind::NotFound, format!("disk {name:?} vanished")));
        };
        d.spec = spec;
        // The old key's last copy in memory goes with the old device (its key schedule is
        // in locked memory, wiped on drop).
        let reopened = match dev {
            Ok(dev) => {
                d.dev = Ok(dev);
                Ok(())
            }
            Err(e) => {
                d.dev = Err(e.to_string());
                Err(err(
                    e.kind,
                    format!("disk {name:?}: its old key is destroyed, but the disk could not be opened with the new one: {}", e.msg),
                ))
            }
        };
        reopened?;
        let secs = t.elapsed().as_secs_f64();
        tracing::info!(
            disk = name,
            seconds = secs,
            "crypto-erased: data key destroyed and replaced"
        );
        Ok(secs)
    }

    /// A disk's qos function from its spec: its limits, and its membership of the
    /// fair-share group of the host device its data lives on.
    fn new_qos(&self, g: &Inner, spec: &DiskSpec) -> Result<Arc<nvmux_func::Qos>> {
        let q = spec.qos.unwrap_or_default();
        let named = |e: Error| err(e.kind, format!("disk {:?}: {}", spec.name, e.msg));
        q.check().map_err(named)?;
        let group = if spec.has(Function::Qos) {
            self.share_group(g, spec)
        } else {
            None
        };
        let share = group
            .map(|grp| grp.join(q.weight()))
            .transpose()
            .map_err(named)?;
        nvmux_func::Qos::new(q.limits(), share).map_err(named)
    }

    /// The fair-share group of the host device under a disk; `None` for disks without
    /// one (null, memory) or with fair sharing off (`qos.fair_depth = 0`).
    fn share_group(&self, g: &Inner, spec: &DiskSpec) -> Option<Arc<nvmux_func::ShareGroup>> {
        let depth = self.cfg.qos.fair_depth;
        if depth == 0 {
            return None;
        }
        let dev = backend_device(g, spec)?;
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.retain(|_, w| w.strong_count() > 0);
        if let Some(grp) = groups.get(&dev).and_then(std::sync::Weak::upgrade) {
            return Some(grp);
        }
        let grp = nvmux_func::ShareGroup::new(
            format!("{}:{}", libc::major(dev), libc::minor(dev)),
            depth,
        );
        groups.insert(dev, Arc::downgrade(&grp));
        Some(grp)
    }

    /// The KEK's current source.
    fn keys(&self) -> Arc<dyn KeyProvider> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// KEK rotation: re-wrap every key in the keystore under the KEK in `new_kek`, in
    /// place, and use that KEK from now on. Data is not touched. Every key is unwrapped
    /// and re-wrapped in memory before the first slot is written, so a KEK that does not
    /// unwrap them all changes nothing. A slot already wrapped by the new KEK is skipped,
    /// so a rotation interrupted by a crash finishes when run again with the old KEK still
    /// configured. Returns how many keys were re-wrapped. The configuration must then name
    /// the new KEK (`keys.kek_file`) before the next start.
    pub fn rotate_kek(&self, new_kek: &Path) -> Result<usize> {
        let mut g = self.lock();
        let old = self.keys();
        let new: Arc<dyn KeyProvider> = Arc::new(nvmux_func::keys::KekFile(new_kek.to_path_buf()));
        let new_k = new.kek()?;
        let new_check = nvmux_func::keywrap::check_value(&new_k);
        let mut store = self.keystore();
        let slots = store.slots()?;
        let mut rewrapped = Vec::new();
        let mut old_k = None;
        for s in &slots {
            if s.key.kek_check == new_check {
                continue;
            }
            if old_k.is_none() {
                old_k = Some(old.kek()?);
            }
            let Some(ok) = &old_k else { continue };
            let dek = nvmux_func::keys::unwrap_with(ok, &old.describe(), &s.key).map_err(|e| {
                err(
                    e.kind,
                    format!("disk {:?} (keystore slot {}): {}", s.owner, s.index, e.msg),
                )
            })?;
            rewrapped.push((s, nvmux_func::keys::wrap_with(&new_k, &dek)));
        }
        for (s, w) in &rewrapped {
            store.replace(s.index, &s.id, w)?;
        }
        drop(store);
        let check = nvmux_func::keys::to_hex(&new_check);
        for d in g.disks.values_mut() {
            if let Some(c) = &mut d.spec.crypt {
                if c.kek_check.is_some() {
                    c.kek_check = Some(check.clone());
                }
            }
        }
        *self.keys.lock().unwrap_or_else(|e| e.into_inner()) = new;
        tracing::info!(keys = rewrapped.len(), kek = %new_kek.display(), "KEK rotated; set keys.kek_file to the new KEK before the next start");
        Ok(rewrapped.len())
    }

    /// Replace a disk's rate limits; they apply at once to every queue of every export.
    pub fn set_qos(&self, name: &str, q: QosSpec) -> Result<DiskView> {
        let mut g = self.lock();
        let Some(d) = g.disks.get_mut(name) else {
            return Err(err(
                ErrorKind::NotFound,
                format!("disk {name:?} does not exist"),
            ));
        };
        let named = |e: Error| err(e.kind, format!("disk {name:?}: {}", e.msg));
        if !d.spec.has(Function::Qos) {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("disk {name:?} has no qos function in its chain; add it with `nvmux disk chain {name} qos,...`"),
            ));
        }
        q.check().map_err(named)?;
        let (l, weight) = (q.limits(), q.weight());
        let keep = !l.is_unlimited() || q.weight.is_some();
        let old = std::mem::replace(&mut d.spec.qos, keep.then_some(q));
        let old_limits = d.qos.limits();
        let old_weight = d.qos.share().map(|s| s.weight());
        d.qos.set(l)?;
        if let Some(s) = d.qos.share() {
            s.set_weight(weight)?;
        }
        if let Err(e) = self.persist(&g) {
            if let Some(d) = g.disks.get_mut(name) {
                d.spec.qos = old;
                let _ = d.qos.set(old_limits);
                if let (Some(s), Some(w)) = (d.qos.share(), old_weight) {
                    let _ = s.set_weight(w);
                }
            }
            return Err(e);
        }
        tracing::info!(disk = name, ?q, "qos set");
        Ok(Self::view(&g, &g.disks[name]))
    }

    /// Replace a disk's function chain (`None`: the default). The disk must not be
    /// exported: its device is rebuilt.
    pub fn set_chain(&self, name: &str, chain: Option<Vec<Function>>) -> Result<DiskView> {
        let mut g = self.lock();
        let Some(d) = g.disks.get(name) else {
            return Err(err(
                ErrorKind::NotFound,
                format!("disk {name:?} does not exist"),
            ));
        };
        not_exported(&g, name)?;
        let mut spec = d.spec.clone();
        spec.chain = chain;
        spec.check_chain()?;
        if !spec.has(Function::Qos) && spec.qos.is_some() {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("disk {name:?} has qos settings; clear them first (`nvmux disk qos {name}` with no options) or keep qos in the chain"),
            ));
        }
        let qos = self.new_qos(&g, &spec)?;
        let dev = with_functions(
            open_backend(&g, &spec)?,
            &spec,
            &self.key_source(),
            &qos,
            &d.router,
        )?;
        let Some(d) = g.disks.get_mut(name) else {
            return Err(err(ErrorKind::NotFound, format!("disk {name:?} vanished")));
        };
        let old = (
            std::mem::replace(&mut d.spec, spec),
            std::mem::replace(&mut d.dev, Ok(dev)),
            std::mem::replace(&mut d.qos, qos),
        );
        if let Err(e) = self.persist(&g) {
            if let Some(d) = g.disks.get_mut(name) {
                (d.spec, d.dev, d.qos) = old;
            }
            return Err(e);
        }
        let chain: Vec<&str> = g.disks[name]
            .spec
            .functions()
            .iter()
            .map(|f| f.name())
            .collect();
        tracing::info!(disk = name, chain = %chain.join(","), "function chain set");
        Ok(Self::view(&g, &g.disks[name]))
    }

    /// Long-running operations in progress (erase), with their progress.
    pub fn operations(&self) -> Vec<ops::OpView> {
        self.ops.list()
    }

    /// Delete a disk. `erase` first overwrites (files) or zeroes (thin volumes) what it
    /// owned; it returns the bytes erased.
    pub fn delete_disk(&self, name: &str, erase: bool) -> Result<u64> {
        let mut g = self.lock();
        let Some(d) = g.disks.get(name) else {
            return Err(err(
                ErrorKind::NotFound,
                format!("disk {name:?} does not exist"),
            ));
        };
        not_exported(&g, name)?;
        let owned_path = match &d.spec.backend {
            BackendSpec::File {
                path, owned: true, ..
            } => Some(path.clone()),
            _ => None,
        };
        let mut erased = 0;
        match &d.spec.backend {
            BackendSpec::Thin {
                pool,
                volume,
                owned,
            } => {
                if erase && !owned {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        format!("disk {name:?} attaches volume {volume:?}, which it did not create: delete without --erase, then delete the volume from the pool"),
                    ));
                }
                if *owned {
                    let p = pools::get_pool(&g, pool)?;
                    erased = p.volume(volume).map_or(0, |v| v.allocated_bytes);
                    let op = erase.then(|| self.ops.start("erase", format!("disk/{name}")));
                    p.delete(volume, erase, &mut |done, total| {
                        if let Some(op) = &op {
                            op.progress(done, total);
                        }
                    })?;
                }
            }
            BackendSpec::File { path, .. } if erase => {
                let op = self.ops.start("erase", format!("disk/{name}"));
                erased = pools::erase_file(path, &mut |done, total| op.progress(done, total))?;
            }
            _ if erase => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    "only file and pool disks can be erased",
                ))
            }
            _ => {}
        }
        let removed = g.disks.remove(name);
        // An encrypted disk's key goes first (its slot overwritten), so that no crash or
        // failed write below leaves the key behind for a disk that is gone.
        if let Some(c) = removed.as_ref().and_then(|r| r.spec.crypt.as_ref()) {
            self.key_source().destroy(name, c);
        }
        if let Err(e) = self.persist(&g) {
            if let Some(r) = removed {
                g.disks.insert(name.to_string(), r);
            }
            return Err(e);
        }
        if let Some(r) = &removed {
            if let Some(e) = r.router.set_external(None) {
                e.stop();
            }
            if let Some(c) = &r.spec.classifier {
                let _ = std::fs::remove_file(&c.object);
            }
        }
        drop(removed);
        if let Some(p) = owned_path {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(disk = name, "could not remove {}: {e}", p.display());
            }
        }
        tracing::info!(disk = name, erase, "disk deleted");
        Ok(erased)
    }

    fn start_export(&self, g: &Inner, spec: &mut ExportSpec) -> Result<Handle> {
        let d = g.disks.get(&spec.disk).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("disk {:?} does not exist", spec.disk),
            )
        })?;
        let dev = d.dev.as_ref().map_err(|e| {
            err(
                ErrorKind::Io,
                format!("disk {:?} is unavailable: {e}", spec.disk),
            )
        })?;
        let perms = spec.perms()?;
        match &spec.kind {
            ExportKind::VhostUserBlk {
                socket,
                num_queues,
                migration_peer,
            } => {
                // A migration peer shares its peer's ring gate (started first at a
                // restore); a peer that is gone leaves this export a gate of its own.
                let gate = match migration_peer.as_deref().map(|p| (p, g.exports.get(p))) {
                    None => None,
                    Some((
                        _,
                        Some(Export {
                            handle: Ok(Handle::Vhost(h)),
                            ..
                        }),
                    )) => Some(h.gate()),
                    Some((p, _)) => {
                        tracing::warn!(export = %spec.name, peer = p, "migration peer is not a running vhost-user-blk export; this export gets a gate of its own");
                        None
                    }
                };
                if !nvmux_core::unixsock::is_inherited(&nvmux_core::unixsock::unix_key(socket)) {
                    claim_socket(socket)?;
                }
                let mut workers = self.workers.workers().to_vec();
                let first = self
                    .next_worker
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let n = workers.len();
                workers.rotate_left(first % n);
                VhostBlkExport::start(
                    dev.clone(),
                    ExportConfig {
                        socket: socket.clone(),
                        num_queues: *num_queues,
                        serial: spec.disk.clone(),
                        perms,
                        gate,
                    },
                    workers,
                    d.stats.clone(),
                )
                .map(Handle::Vhost)
            }
            ExportKind::Nbd { .. } => self
                .start_nbd(
                    &spec.disk,
                    dev.clone(),
                    d.stats.clone(),
                    &mut spec.kind,
                    &perms,
                )
                .map(Handle::Nbd),
        }
    }

    pub fn exports(&self) -> Vec<ExportView> {
        let g = self.lock();
        g.exports.values().map(export_view).collect()
    }

    /// A socket path a new listener may bind: not the API socket, nothing but a stale
    /// socket there, and no other export on it.
    fn check_new_socket(&self, g: &Inner, socket: &Path) -> Result<()> {
        check_export_socket(socket, &self.cfg.api_socket())?;
        if let Some(e) = g
            .exports
            .values()
            .find(|e| e.spec.kind.socket().map(|p| p.as_path()) == Some(socket))
        {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!(
                    "socket {} is already used by export {:?}",
                    socket.display(),
                    e.spec.name
                ),
            ));
        }
        Ok(())
    }

    pub fn create_export(&self, req: ExportCreate) -> Result<ExportView> {
        let name = req.name.clone().unwrap_or_else(|| req.disk.clone());
        check_name("export", &name)?;
        let mut g = self.lock();
        if g.exports.contains_key(&name) {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!("export {name:?} already exists"),
            ));
        }
        let kind = match req.kind.as_deref().unwrap_or("vhost-user-blk") {
            "vhost-user-blk" => {
                let Some(socket) = req.socket.clone() else {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "a vhost-user-blk export needs a socket",
                    ));
                };
                if req.listen.is_some()
                    || req.export_name.is_some()
                    || req.read_only
                    || req.tls.is_some()
                {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "listen, export_name, read_only and tls are for nbd exports (a vhost-user-blk export is read-only when its disk is)",
                    ));
                }
                self.check_new_socket(&g, &socket)?;
                if let Some(p) = &req.migration_peer {
                    check_migration_peer(&g, p, &req.disk)?;
                }
                ExportKind::VhostUserBlk {
                    socket,
                    num_queues: req.num_queues.unwrap_or(1),
                    migration_peer: req.migration_peer.clone(),
                }
            }
            "nbd" if req.migration_peer.is_some() => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    "migration_peer is for vhost-user-blk exports",
                ))
            }
            "nbd" => self.nbd_kind(&g, &req, &name)?,
            other => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("export type {other:?} is unknown (use vhost-user-blk or nbd)"),
                ))
            }
        };
        let (owner, mode) = export_socket_perms(&g, &kind, &req)?;
        let mut spec = ExportSpec {
            name: name.clone(),
            disk: req.disk.clone(),
            kind,
            owner,
            mode,
        };
        let handle = self.start_export(&g, &mut spec)?;
        tracing::info!(export = %name, disk = %req.disk, at = %spec.kind.address(),
            owner = spec.owner.as_deref().unwrap_or("-"), mode = spec.mode.as_deref().unwrap_or("-"), "export added");
        g.exports.insert(
            name.clone(),
            Export {
                spec,
                handle: Ok(handle),
            },
        );
        if let Err(e) = self.persist(&g) {
            g.exports.remove(&name);
            return Err(e);
        }
        Ok(export_view(&g.exports[&name]))
    }

    pub fn delete_export(&self, name: &str) -> Result<()> {
        let mut g = self.lock();
        let e = g.exports.remove(name).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("export {name:?} does not exist"),
            )
        })?;
        // The pairing ends with either export: an export naming this one as its migration
        // peer forgets it (its running gate stays; a new peer may pair with it).
        let mut unpaired = Vec::new();
        for (n, x) in g.exports.iter_mut() {
            if let ExportKind::VhostUserBlk { migration_peer, .. } = &mut x.spec.kind {
                if migration_peer.as_deref() == Some(name) {
                    *migration_peer = None;
                    unpaired.push(n.clone());
                }
            }
        }
        if let Err(er) = self.persist(&g) {
            for n in &unpaired {
                if let Some(ExportKind::VhostUserBlk { migration_peer, .. }) =
                    g.exports.get_mut(n).map(|x| &mut x.spec.kind)
                {
                    *migration_peer = Some(name.to_string());
                }
            }
            g.exports.insert(name.to_string(), e);
            return Err(er);
        }
        drop(g);
        if let Ok(h) = e.handle {
            self.stop_handle(h);
        }
        tracing::info!(export = name, "export removed");
        Ok(())
    }

    /// Per-disk statistics and per-worker counters.
    pub fn stats(&self) -> StatsView {
        let g = self.lock();
        StatsView {
            uptime_s: self.started.elapsed().as_secs_f64(),
            disks: g
                .disks
                .values()
                .map(|d| {
                    let mut v = DiskStatsView::from(&d.stats.snapshot());
                    v.fair = d.qos.share().map(|s| s.stats());
                    (d.spec.name.clone(), v)
                })
                .collect(),
            workers: self
                .workers
                .workers()
                .iter()
                .map(WorkerView::from)
                .collect(),
            network: self.network_view(),
            nvmf: self.nvmf_stats(),
        }
    }

    /// The network frontends' shared buffer budget.
    pub fn network_view(&self) -> NetworkView {
        NetworkView {
            memory_budget: self.net_mem.limit() as u64,
            memory_used: self.net_mem.used() as u64,
            memory_waits: self.net_mem.waits(),
        }
    }

    pub(crate) fn for_each_disk_stats(
        &self,
        mut f: impl FnMut(&str, &nvmux_core::stats::Snapshot),
    ) {
        let g = self.lock();
        for d in g.disks.values() {
            f(&d.spec.name, &d.stats.snapshot());
        }
    }

    pub(crate) fn route_totals(&self) -> Vec<(String, nvmux_router::RouteTotals)> {
        let g = self.lock();
        g.disks
            .values()
            .map(|d| (d.spec.name.clone(), d.router.totals()))
            .collect()
    }

    pub(crate) fn worker_handles(&self) -> &[nvmux_core::worker::WorkerHandle] {
        self.workers.workers()
    }

    /// Stop every export (the state file keeps them for the next start).
    pub fn shutdown(&self) {
        self.nvmf.shutdown();
        let mut g = self.lock();
        let exports = std::mem::take(&mut g.exports);
        drop(g);
        for (_, e) in exports {
            if let Ok(h) = e.handle {
                self.stop_handle(h);
            }
        }
        // Devices hold queues on the pools: drop them, then close the pools cleanly.
        let mut g = self.lock();
        for d in g.disks.values() {
            if let Some(e) = d.router.set_external(None) {
                e.stop();
            }
        }
        g.disks.clear();
        for (name, p) in std::mem::take(&mut g.pools) {
            if let Ok(p) = p.pool {
                if let Err(e) = p.close() {
                    tracing::error!(pool = %name, "close: {e}");
                }
            }
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportView {
    #[serde(flatten)]
    pub spec: ExportSpec,
    pub status: String,
    /// A client is connected (nbd: at least one).
    pub connected: bool,
    /// nbd: connections in their transmission phase right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Where clients connect: the socket, or an NBD URI.
    pub address: String,
    /// vhost-user: the front-end's guest memory (faults, refused and sealed regions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_memory: Option<GuestMemoryView>,
    /// vhost-user: live migration (the ring gate shared with a migration peer, and the
    /// dirty log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationView>,
}

/// `migration` of a vhost-user export (see docs/api.md and docs/operations.md).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrationView {
    /// This export's side of its ring gate: 0, or 1 for the export created with
    /// `migration_peer`.
    pub side: u64,
    /// Exports sharing the gate (2 while a migration pair exists).
    pub paired_exports: u64,
    /// Rings of this export running now.
    pub rings_running: u64,
    /// Times the right to run rings moved from one connection to another (one per
    /// migration, and per reconnect).
    pub handoffs: u64,
    /// Ring starts that waited for the other export's rings to stop.
    pub waits: u64,
    /// Ring starts refused because the other export's rings did not stop in time.
    pub refused: u64,
    /// Rings started while a ring of the other export was still running: always 0.
    pub overlaps: u64,
    /// Dirty logging is on now (VHOST_F_LOG_ALL acked, a log set).
    pub dirty_log_active: bool,
    /// Dirty logs mapped (SET_LOG_BASE) and refused.
    pub dirty_logs_set: u64,
    pub dirty_logs_refused: u64,
    /// Dirty logs whose file shrank under the device (that migration is void).
    pub dirty_log_faults: u64,
}

fn migration_view(h: &VhostBlkExport) -> MigrationView {
    let g = h.gate_status();
    let l = h.log_status();
    MigrationView {
        side: g.side as u64,
        paired_exports: g.sides as u64,
        rings_running: g.rings_running as u64,
        handoffs: g.handoffs,
        waits: g.waits,
        refused: g.refused,
        overlaps: g.overlaps,
        dirty_log_active: l.active,
        dirty_logs_set: l.logs_set,
        dirty_logs_refused: l.logs_refused,
        dirty_log_faults: l.log_faults,
    }
}

/// `guest_memory` of a vhost-user export (see docs/security.md).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestMemoryView {
    /// Memory tables whose backing shrank under the device (each failed it once).
    pub faults: u64,
    /// The current memory table faulted: its queues are stopped until the front-end
    /// sends a new table (a reconnect does).
    pub device_failed: bool,
    /// Regions refused at SET_MEM_TABLE / ADD_MEM_REGION.
    pub regions_refused: u64,
    /// Regions of the current table.
    pub regions: u64,
    /// Of those, regions whose file is sealed against shrinking (F_SEAL_SHRINK).
    pub regions_sealed: u64,
}

impl From<nvmux_vhost::MemoryStatus> for GuestMemoryView {
    fn from(m: nvmux_vhost::MemoryStatus) -> Self {
        GuestMemoryView {
            faults: m.memory_faults,
            device_failed: m.device_failed,
            regions_refused: m.regions_refused,
            regions: m.regions,
            regions_sealed: m.regions_sealed,
        }
    }
}

fn export_view(e: &Export) -> ExportView {
    ExportView {
        spec: e.spec.clone(),
        status: match &e.handle {
            Ok(_) => "ok".into(),
            Err(er) => format!("error: {er}"),
        },
        connected: e.handle.as_ref().map(|h| h.connected()).unwrap_or(false),
        connections: match &e.handle {
            Ok(Handle::Nbd(h)) => Some(h.export.connections()),
            _ => None,
        },
        address: e.spec.kind.address(),
        guest_memory: match &e.handle {
            Ok(Handle::Vhost(h)) => Some(h.memory_status().into()),
            _ => None,
        },
        migration: match &e.handle {
            Ok(Handle::Vhost(h)) => Some(migration_view(h)),
            _ => None,
        },
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClassView {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub mean_us: f64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl From<&nvmux_core::stats::ClassSnapshot> for ClassView {
    fn from(c: &nvmux_core::stats::ClassSnapshot) -> Self {
        ClassView {
            ops: c.ops,
            bytes: c.bytes,
            errors: c.errors,
            mean_us: if c.ops == 0 {
                0.0
            } else {
                c.lat_sum_ns as f64 / c.ops as f64 / 1000.0
            },
            p50_us: c.percentile_us(0.5),
            p99_us: c.percentile_us(0.99),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskStatsView {
    pub read: ClassView,
    pub write: ClassView,
    pub other: ClassView,
    pub in_flight: u64,
    /// Fair sharing of the disk's host device, if it takes part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fair: Option<nvmux_func::fair::ShareStats>,
}

impl From<&nvmux_core::stats::Snapshot> for DiskStatsView {
    fn from(s: &nvmux_core::stats::Snapshot) -> Self {
        DiskStatsView {
            read: (&s.read).into(),
            write: (&s.write).into(),
            other: (&s.other).into(),
            in_flight: s.in_flight,
            fair: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerView {
    pub busy_s: f64,
    pub idle_poll_s: f64,
    pub sleeps: u64,
    pub sources: u64,
    /// Queues and connections dropped because serving them panicked.
    #[serde(default)]
    pub panics: u64,
    /// Heap allocations made on this worker thread since it started (counted by the
    /// `nvmux` binary's allocator; serving I/O must not move it).
    #[serde(default)]
    pub allocs: u64,
}

impl From<&nvmux_core::worker::WorkerHandle> for WorkerView {
    fn from(w: &nvmux_core::worker::WorkerHandle) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let s = w.stats();
        WorkerView {
            busy_s: s.busy_ns.load(Relaxed) as f64 / 1e9,
            idle_poll_s: s.idle_poll_ns.load(Relaxed) as f64 / 1e9,
            sleeps: s.sleeps.load(Relaxed),
            sources: s.sources.load(Relaxed),
            panics: s.panics.load(Relaxed),
            allocs: s.allocs.load(Relaxed),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsView {
    pub uptime_s: f64,
    pub disks: BTreeMap<String, DiskStatsView>,
    pub workers: Vec<WorkerView>,
    /// Buffers of the network frontends (`network.memory_budget`).
    #[serde(default)]
    pub network: NetworkView,
    /// NVMe/TCP listeners and what connections met.
    #[serde(default)]
    pub nvmf: nvmf::NvmfStatsView,
}

/// The budget of network buffers shared by NVMe/TCP and NBD connections.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetworkView {
    /// `network.memory_budget` (bytes).
    pub memory_budget: u64,
    /// Bytes reserved by connections now.
    pub memory_used: u64,
    /// Times a reservation had to wait because the budget was full.
    pub memory_waits: u64,
}

/// Run the daemon until SIGINT or SIGTERM: restore state, serve the API, shut down.
pub fn serve(cfg: Config) -> Result<()> {
    serve_with(cfg, None)
}

/// [`serve`], or with `takeover`, take over from the daemon that started this process
/// (`nvmux upgrade`; see [`upgrade`]).
pub fn serve_with(cfg: Config, takeover: Option<PathBuf>) -> Result<()> {
    cfg.validate()
        .map_err(|e| err(ErrorKind::InvalidArgument, e))?;
    // Block the termination signals in every thread; one thread waits for them.
    // SAFETY: sigset manipulation on a local set; pthread_sigmask affects this thread and
    // the threads it spawns afterwards.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let sock = cfg.api_socket();
    let access = cfg
        .api
        .access()
        .map_err(|e| err(ErrorKind::InvalidArgument, e))?;
    let daemon = match takeover {
        Some(t) => upgrade::take_over(cfg, &t, &sock, &access)?,
        None => {
            let daemon = Daemon::start(cfg)?;
            let server = api::ApiServer::start(daemon.clone(), &sock, &access)?;
            *daemon.api.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
            daemon
        }
    };
    tracing::info!(api = %sock.display(), access = %access.describe(), "nvmux is serving");
    let mut sig: libc::c_int = 0;
    // SAFETY: sigwait reads our initialised set and writes the signal number to `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    tracing::info!(signal = sig, "shutting down");
    if let Some(server) = daemon.api.lock().unwrap_or_else(|e| e.into_inner()).take() {
        server.stop();
    }
    daemon.shutdown();
    Ok(())
}

/// Check that a listening socket may be created at `path`: nothing there, a stale socket
/// or a symlink (both are replaced by [`nvmux_core::unixsock::bind`], which never follows
/// a link). A regular file, a directory or a socket a live server answers on is refused.
pub fn claim_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(()); // nothing there yet
    };
    let t = m.file_type();
    if t.is_symlink() {
        tracing::warn!(
            "{} is a symlink; it will be replaced by the socket (its target is left alone)",
            path.display()
        );
        return Ok(());
    }
    if !t.is_socket() {
        return Err(err(
            ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(
            ErrorKind::AlreadyExists,
            format!(
                "{} is in use by a running server (another nvmux daemon?); choose another path",
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("disk", "db-1.a_b").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name("disk", bad).is_err(), "{bad:?}");
        }
    }
}
