//! The desired state: the specs of pools, disks, exports and subsystems as `state.json`
//! holds them, and how it is written (one atomic-write helper: temporary file, fsync,
//! rename, fsync of the directory) and checked against the keystore when read back.

use std::path::{Path, PathBuf};

use nvmux_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

use crate::{err, nbd, nvmf, pools, routing, Daemon, Inner};

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
    /// A namespace of a remote NVMe/TCP subsystem (nvmux's own initiator).
    Nvmf {
        subnqn: String,
        /// `HOST:PORT` of each path, in order of preference (ANA states override it).
        paths: Vec<String>,
        #[serde(default = "nsid_one")]
        nsid: u32,
        /// After the last path is lost, commands wait this long for one, then fail
        /// (default 30 s for a disk's backend, 2 s for a mirror leg).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loss_timeout_ms: Option<u64>,
        /// DH-HMAC-CHAP host secret (`DHHC-1:…`), and the controller's for
        /// bidirectional authentication.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dhchap_secret: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dhchap_ctrl_secret: Option<String>,
    },
    /// An image in a Ceph cluster (librbd), or one of its snapshots (read-only).
    Rbd {
        pool: String,
        /// The RADOS namespace; empty for the pool's default one.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        namespace: String,
        image: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<String>,
    },
}

impl BackendSpec {
    /// An `rbd` backend's image and snapshot.
    pub(crate) fn rbd_image(&self) -> Option<(nvmux_backend::rbd::ImageRef, Option<&str>)> {
        match self {
            BackendSpec::Rbd {
                pool,
                namespace,
                image,
                snapshot,
            } => Some((
                nvmux_backend::rbd::ImageRef {
                    pool: pool.clone(),
                    namespace: namespace.clone(),
                    image: image.clone(),
                },
                snapshot.as_deref(),
            )),
            _ => None,
        }
    }
}

fn nsid_one() -> u32 {
    1
}

/// A disk's mirror legs besides its backend (`docs/replication.md`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    /// The name of the leg that is the disk's `backend` (default `primary`).
    #[serde(default = "primary_leg")]
    pub primary: String,
    /// The other legs, in order of preference as a copy source.
    #[serde(default)]
    pub legs: Vec<LegSpec>,
    /// Bytes per second for full copies and resyncs; 0 is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_rate: Option<u64>,
}

pub(crate) fn primary_leg() -> String {
    "primary".into()
}

/// One mirror leg.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LegSpec {
    pub name: String,
    pub backend: BackendSpec,
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
    /// Mirror legs besides the backend (the `mirror` function), if any were added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSpec>,
}

/// A storage function a disk's chain can hold.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Function {
    /// Rate limits and fair sharing of the host device.
    Qos,
    /// AES-XTS-256 encryption.
    Crypt,
    /// Synchronous mirroring to the disk's legs, with a write-intent bitmap.
    Mirror,
}

impl Function {
    pub fn name(self) -> &'static str {
        match self {
            Function::Qos => "qos",
            Function::Crypt => "crypt",
            Function::Mirror => "mirror",
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
                "mirror" => Ok(Function::Mirror),
                other => Err(err(
                    ErrorKind::InvalidArgument,
                    format!("unknown function {other:?} in chain {s:?}: the functions are qos, crypt and mirror (or `none`)"),
                )),
            })
            .collect()
    }
}

impl DiskSpec {
    /// The disk's chain, outermost first, as it is built. The default ends in `mirror`,
    /// a pass-through while the disk has one leg, so that a live disk can gain legs
    /// (`disk mirror add`, `disk move`) as it can gain limits.
    pub fn functions(&self) -> Vec<Function> {
        match &self.chain {
            Some(c) => c.clone(),
            None if self.crypt.is_some() => vec![Function::Qos, Function::Crypt, Function::Mirror],
            None => vec![Function::Qos, Function::Mirror],
        }
    }

    /// The name of the leg that is the disk's backend.
    pub(crate) fn primary_name(&self) -> String {
        self.mirror
            .as_ref()
            .map_or_else(primary_leg, |m| m.primary.clone())
    }

    /// The mirror's legs besides the backend (none without a mirror).
    pub(crate) fn legs(&self) -> &[LegSpec] {
        self.mirror.as_ref().map_or(&[], |m| &m.legs)
    }

    pub(crate) fn has(&self, f: Function) -> bool {
        self.functions().contains(&f)
    }

    /// A chain names each function at most once, and holds `crypt` exactly when the disk
    /// is encrypted (without it the guest would see ciphertext).
    pub(crate) fn check_chain(&self) -> Result<()> {
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
        if fs
            .iter()
            .position(|f| *f == Function::Mirror)
            .is_some_and(|i| i + 1 != fs.len())
        {
            return bad(
                "mirror must be the last (innermost) function of the chain: it stands on the legs"
                    .into(),
            );
        }
        if !self.legs().is_empty() && !fs.contains(&Function::Mirror) {
            return bad("the disk has mirror legs, so its chain must end in mirror".into());
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
    pub(crate) fn weight(&self) -> u32 {
        self.weight.unwrap_or(nvmux_func::fair::DEFAULT_WEIGHT)
    }

    /// Check the limits and the weight together, before anything changes.
    pub(crate) fn check(&self) -> Result<()> {
        self.limits().validate()?;
        nvmux_func::fair::check_weight(self.weight())
    }

    pub(crate) fn limits(&self) -> nvmux_func::Limits {
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
    pub(crate) fn layout(&self) -> nvmux_func::crypt::Layout {
        nvmux_func::crypt::Layout {
            sector: self.sector_size as usize,
            iv_large_sectors: self.iv_large_sectors,
        }
    }

    /// The keystore slot and id, or an error naming the disk.
    pub(crate) fn slot_ref(&self, disk: &str) -> Result<(u32, nvmux_func::keystore::KeyId)> {
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
    /// A PCI NVMe controller on a vfio-user socket (QEMU 10.1+ `-device vfio-user-pci`):
    /// one namespace, the disk; read-only when the disk is.
    VfioUser {
        socket: PathBuf,
        /// I/O queue pairs offered to the guest, 1..=64.
        #[serde(default = "four_queues")]
        num_queues: u16,
    },
}

fn one_queue() -> u16 {
    1
}

fn four_queues() -> u16 {
    nvmux_vfiouser::export::DEFAULT_QUEUES
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
pub(crate) struct State {
    pub(crate) version: u32,
    #[serde(default)]
    pub(crate) pools: Vec<pools::PoolSpec>,
    pub(crate) disks: Vec<DiskSpec>,
    pub(crate) exports: Vec<ExportSpec>,
    #[serde(default)]
    pub(crate) subsystems: Vec<nvmf::SubsystemSpec>,
}

/// Write `bytes` to `path` atomically: to `<path>.tmp` with mode `mode`, fsync, rename
/// over `path`, fsync the directory. A crash leaves the old file or the new one, and at
/// worst a stale `<path>.tmp`. The mode is set explicitly: a temporary file left by a
/// crash keeps its old mode when reopened.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(d) = path.parent() {
            std::fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| Error::io(format!("write {}", path.display()), e))
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

impl Daemon {
    pub(crate) fn state_path(&self) -> PathBuf {
        self.cfg.data_dir.join("state.json")
    }

    /// Copies of `state.json` left by a crash (`state.json.tmp`, `state.json.old`) may
    /// hold wrapped keys of the format before the keystore: overwrite and remove them.
    pub(crate) fn scrub_leftovers(&self, state: &Path) {
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
    pub(crate) fn migrate_keys(&self, disks: &mut [DiskSpec]) -> Result<usize> {
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
    pub(crate) fn check_keystore(&self, disks: &[DiskSpec]) {
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

    /// Write `state.json` and overwrite the bytes of the one it replaces (which held
    /// wrapped keys): the old file is kept under a second name across the rename, then
    /// zeroed, synced and removed. A crash in between leaves `state.json.old`, scrubbed
    /// at the next start.
    pub(crate) fn persist_replacing_secrets(&self, g: &Inner) -> Result<()> {
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

    pub(crate) fn persist(&self, g: &Inner) -> Result<()> {
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
        let text = serde_json::to_vec_pretty(&st)
            .map_err(|e| err(ErrorKind::Io, format!("serialize state: {e}")))?;
        // Mode 0600: the file holds DH-HMAC-CHAP secrets (see format.md).
        write_atomic(&self.state_path(), &text, 0o600)
    }
}
