//! Assembly: the only place the rooms are wired together. A disk's device is its
//! backend with its functions and router stacked on top; an export is a frontend started
//! on a disk's device and the workers; the daemon itself is the workers, the keys, the
//! NVMe/TCP target and the state restored from `state.json`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nvmux_backend::{FileDevice, FileOptions, MemoryDevice, NullDevice};
use nvmux_core::stats::DiskStats;
use nvmux_core::worker::{WorkerConfig, WorkerPool};
use nvmux_core::{BlockDevice, Error, ErrorKind, Result};
use nvmux_func::keys::KeyProvider;
use nvmux_vhost::{ExportConfig, VhostBlkExport};

use crate::state::State;
use crate::{
    claim_socket, err, lock_data_dir, nvmf, ops, pools, routing, BackendSpec, Config, CryptSpec,
    Daemon, Disk, DiskSpec, Export, ExportKind, ExportSpec, Function, Handle, Inner, CIPHER,
    STATE_VERSION,
};

/// Open a disk's device: its backend, then its functions, then its router with the
/// classifier (a disk whose classifier does not load is not served: it may be a guard).
fn open_device(
    g: &Inner,
    spec: &DiskSpec,
    keys: &KeySource,
    qos: &Arc<nvmux_func::Qos>,
    router: &Arc<nvmux_router::Router>,
    data_dir: &std::path::Path,
) -> Result<(Arc<dyn BlockDevice>, Base)> {
    let base = open_base(g, spec, open_backend(g, spec)?, data_dir)?;
    let dev = with_functions(base.dev.clone(), spec, keys, qos, router)?;
    if let Some(c) = &spec.classifier {
        let p = routing::load_program(c).map_err(|e| {
            err(
                e.kind,
                format!("classifier {}: {}", c.object.display(), e.msg),
            )
        })?;
        router.set_program(Some(p));
    }
    Ok((dev, base))
}

/// The host device that holds a disk's data (a file's filesystem, a block device
/// itself, a pool's file), if it has one.
fn backend_device(g: &Inner, spec: &DiskSpec) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let path = match &spec.backend {
        BackendSpec::File { path, .. } => path.clone(),
        BackendSpec::Thin { pool, .. } => g.pools.get(pool)?.spec.path.clone(),
        BackendSpec::Null
        | BackendSpec::Memory
        | BackendSpec::Nvmf { .. }
        | BackendSpec::Rbd { .. } => return None,
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
                // `dev` is the mirror already (see `open_base`): one for both stacks.
                Function::Mirror => d,
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
    pub(crate) fn store(&self) -> MutexGuard<'_, nvmux_func::keystore::Keystore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Destroy a key: overwrite its slot (a disk being deleted, or a create that failed).
    pub(crate) fn destroy(&self, disk: &str, c: &CryptSpec) {
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

/// Open a disk's backend: its one leg, or the first of its mirror's legs.
pub(crate) fn open_backend(g: &Inner, spec: &DiskSpec) -> Result<Leg> {
    open_leg(g, spec, &spec.backend, false)
}

/// An opened leg: the device, and the initiator's handle when it is remote (for its
/// paths' status).
pub(crate) struct Leg {
    pub dev: Arc<dyn BlockDevice>,
    pub remote: Option<Arc<nvmux_nvmf::host::RemoteDevice>>,
}

/// A remote namespace as a leg: behind the layer that splits commands larger than its
/// controller's MDTS (a guest's requests go up to 1280 KiB).
pub(crate) fn remote_leg(dev: Arc<nvmux_nvmf::host::RemoteDevice>) -> Leg {
    Leg {
        dev: Arc::new(nvmux_backend::split::SplitDevice::new(dev.clone())),
        remote: Some(dev),
    }
}

/// What a disk's functions stand on (see [`open_base`]).
pub(crate) struct Base {
    pub dev: Arc<dyn BlockDevice>,
    pub mirror: Option<Arc<nvmux_mirror::MirrorDevice>>,
    /// The remote legs' initiators, by leg name.
    pub remotes: Vec<(String, Arc<nvmux_nvmf::host::RemoteDevice>)>,
}

/// The remote side of an `nvmf` backend, as the initiator takes it.
pub(crate) fn remote_spec(
    g: &Inner,
    b: &BackendSpec,
    mirror_leg: bool,
) -> Result<Option<nvmux_nvmf::host::RemoteSpec>> {
    let BackendSpec::Nvmf {
        subnqn,
        paths,
        nsid,
        loss_timeout_ms,
        dhchap_secret,
        dhchap_ctrl_secret,
    } = b
    else {
        return Ok(None);
    };
    let addrs = paths
        .iter()
        .map(|p| {
            p.parse().map_err(|_| {
                err(
                    ErrorKind::InvalidArgument,
                    format!("path {p:?} of {subnqn} is not an address such as 127.0.0.1:4420"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut r = nvmux_nvmf::host::RemoteSpec::new(subnqn, addrs, &g.hostnqn);
    r.nsid = *nsid;
    r.dhchap_secret = dhchap_secret.clone();
    r.dhchap_ctrl_secret = dhchap_ctrl_secret.clone();
    r.loss_timeout = std::time::Duration::from_millis(loss_timeout_ms.unwrap_or(if mirror_leg {
        MIRROR_LEG_LOSS_TIMEOUT_MS
    } else {
        DISK_LOSS_TIMEOUT_MS
    }));
    Ok(Some(r))
}

/// How long a remote disk's commands wait for a path before they fail.
pub(crate) const DISK_LOSS_TIMEOUT_MS: u64 = 30_000;
/// The same for a mirror leg: short, so that the mirror faults the leg and guest I/O
/// goes on with the others instead of stalling.
pub(crate) const MIRROR_LEG_LOSS_TIMEOUT_MS: u64 = 2_000;

/// Open one leg of a disk: its backend, or one of its mirror's other legs.
pub(crate) fn open_leg(
    g: &Inner,
    spec: &DiskSpec,
    backend: &BackendSpec,
    mirror_leg: bool,
) -> Result<Leg> {
    if let Some(r) = remote_spec(g, backend, mirror_leg)? {
        let dev = nvmux_nvmf::host::RemoteDevice::connect(r)
            .map_err(|e| err(e.kind, format!("disk {:?}: {}", spec.name, e.msg)))?;
        return Ok(remote_leg(dev));
    }
    let dev: Arc<dyn BlockDevice> = match backend {
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
        BackendSpec::Rbd { .. } => {
            let Some((img, snap)) = backend.rbd_image() else {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    "rbd backend without an image",
                ));
            };
            g.rbd.open(
                &img,
                snap,
                &nvmux_backend::rbd::RbdOptions {
                    read_only: spec.read_only || snap.is_some(),
                    snapshot: snap.map(str::to_string),
                    block_size: spec.block_size,
                },
            )?
        }
        // `remote_spec` answered above for every nvmf backend.
        BackendSpec::Nvmf { .. } => {
            return Err(err(
                ErrorKind::InvalidArgument,
                "nvmf backend without a remote",
            ))
        }
    };
    Ok(Leg { dev, remote: None })
}

/// The device the disk's functions stand on: its backend, or with `mirror` in its chain
/// the mirror over the backend and the other legs (pass-through while there is one).
/// A leg that cannot be opened (a remote target that is down) is left out with an error
/// in the log: the mirror serves from the others and the leg is added back by
/// `disk mirror add` or the next start.
pub(crate) fn open_base(
    g: &Inner,
    spec: &DiskSpec,
    backend: Leg,
    data_dir: &std::path::Path,
) -> Result<Base> {
    let primary = spec.primary_name();
    let mut remotes: Vec<_> = backend
        .remote
        .map(|r| (primary.clone(), r))
        .into_iter()
        .collect();
    if !spec.has(Function::Mirror) {
        return Ok(Base {
            dev: backend.dev,
            mirror: None,
            remotes,
        });
    }
    let mut legs = vec![nvmux_mirror::Leg {
        name: primary,
        dev: backend.dev,
    }];
    for l in spec.legs() {
        match open_leg(g, spec, &l.backend, true) {
            Ok(leg) => {
                remotes.extend(leg.remote.map(|r| (l.name.clone(), r)));
                legs.push(nvmux_mirror::Leg {
                    name: l.name.clone(),
                    dev: leg.dev,
                })
            }
            Err(e) => {
                tracing::error!(disk = %spec.name, leg = %l.name, "mirror leg could not be opened, serving without it: {e}")
            }
        }
    }
    let bitmap = bitmap_path(data_dir, &spec.name);
    if spec.legs().is_empty() {
        // One leg is the only copy: no history to keep, and the mirror is a pass-through
        // without a file (a bitmap left by a removed leg or an unfinished add goes).
        if let Err(e) = std::fs::remove_file(&bitmap) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(Error::io(format!("remove {}", bitmap.display()), e));
            }
        }
    }
    let mut cfg = nvmux_mirror::MirrorConfig::default();
    if let Some(r) = spec.mirror.as_ref().and_then(|m| m.sync_rate) {
        cfg.sync_rate = r;
    }
    let m = nvmux_mirror::MirrorDevice::open(legs, &bitmap, cfg)
        .map_err(|e| err(e.kind, format!("disk {:?}: mirror: {}", spec.name, e.msg)))?;
    Ok(Base {
        dev: m.clone(),
        mirror: Some(m),
        remotes,
    })
}

/// Where a disk's mirror keeps its write-intent bitmap.
pub(crate) fn bitmap_path(data_dir: &std::path::Path, disk: &str) -> std::path::PathBuf {
    data_dir.join("mirror").join(format!("{disk}.bitmap"))
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
        let nvmf =
            nvmux_nvmf::Target::new(workers.placement(), nvmf::target_config(&cfg, &net_mem));
        let hostnqn = cfg.nvmf.hostnqn();
        let rbd = crate::rbd::RbdConn::new(cfg.rbd.backend());
        let d = Arc::new(Daemon {
            cfg,
            inner: Mutex::new(Inner {
                hostnqn,
                rbd,
                ..Default::default()
            }),
            workers,
            started: Instant::now(),
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
        // Follows resizes of open RBD images made outside nvmux; it holds the daemon only
        // while it looks (a daemon without RBD disks costs one state-lock take a second).
        let w = Arc::downgrade(&d);
        std::thread::Builder::new()
            .name("nvmux-rbd-size".into())
            .spawn(move || loop {
                std::thread::sleep(crate::rbd::SIZE_CHECK_EVERY);
                let Some(d) = w.upgrade() else { return };
                d.follow_rbd_sizes();
            })
            .map_err(|e| Error::io("start the rbd size thread", e))?;
        Ok(d)
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
            let pool = crate::pools::open_pool(&spec.path).map_err(|e| e.to_string());
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
            let (dev, mirror, remotes) = match open_device(
                &g,
                &spec,
                &self.key_source(),
                &qos,
                &router,
                &self.cfg.data_dir,
            ) {
                Ok((d, b)) => (Ok(d), b.mirror, b.remotes),
                Err(e) => (Err(e.to_string()), None, Vec::new()),
            };
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
                    mirror,
                    remotes,
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

    pub(crate) fn keystore(&self) -> MutexGuard<'_, nvmux_func::keystore::Keystore> {
        self.keystore.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn key_source(&self) -> KeySource<'_> {
        KeySource {
            kek: self.keys(),
            store: &self.keystore,
        }
    }

    /// A disk's qos function from its spec: its limits, and its membership of the
    /// fair-share group of the host device its data lives on.
    pub(crate) fn new_qos(&self, g: &Inner, spec: &DiskSpec) -> Result<Arc<nvmux_func::Qos>> {
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
    pub(crate) fn keys(&self) -> Arc<dyn KeyProvider> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn start_export(&self, g: &Inner, spec: &mut ExportSpec) -> Result<Handle> {
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
                // Queue i of the export runs on workers[i % len], starting at the worker
                // whose turn it is (the pool's one placement, shared by every frontend).
                let workers = self.workers.placement().spread();
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
            ExportKind::VfioUser { socket, num_queues } => {
                claim_socket(socket)?;
                let workers = self.workers.placement().spread();
                nvmux_vfiouser::VfioUserExport::start(
                    dev.clone(),
                    nvmux_vfiouser::ExportConfig {
                        socket: socket.clone(),
                        perms,
                        num_queues: *num_queues,
                        serial: nvme_serial(&spec.name),
                        read_only: dev.info().read_only,
                    },
                    workers,
                    d.stats.clone(),
                )
                .map(Handle::VfioUser)
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
}

/// An NVMe serial number (20 bytes of ASCII at most) from an export's name (names are
/// ASCII, `check_name`): its first 20 characters.
pub(crate) fn nvme_serial(name: &str) -> String {
    name.chars().take(20).collect()
}
