//! Pools in the daemon: create, list, show, check and forget pools; thin disks,
//! snapshots, clones, resize and volume deletion.

use std::path::{Path, PathBuf};
use std::sync::{Arc, MutexGuard};

use nvmux_core::{parse_size, Error, ErrorKind, Result};
use nvmux_volume::{CheckReport, Pool, PoolOptions, PoolUsage, ThinDevice};
use serde::{Deserialize, Serialize};

use crate::{check_name, err, BackendSpec, Daemon, DiskCreate, DiskSpec, DiskView, Inner};

/// A pool as `state.json` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    pub path: PathBuf,
}

/// Open the pool at `path` for serving, its volumes' data going through the backend's
/// io_uring file device on the same file (the only place a pool meets a backend).
pub fn open_pool(path: &Path) -> Result<Arc<Pool>> {
    let data = nvmux_backend::FileDevice::open(
        path,
        &nvmux_backend::FileOptions {
            create: false,
            ..Default::default()
        },
    )?;
    Pool::open(path, Arc::new(data))
}

pub(crate) struct PoolEntry {
    pub(crate) spec: PoolSpec,
    pub(crate) pool: std::result::Result<Arc<Pool>, String>,
}

/// `POST /v1/pools` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PoolCreate {
    pub name: String,
    /// File (created if missing) or block device.
    pub path: PathBuf,
    /// Bytes, for a new file (e.g. "100G" is accepted as a string too).
    #[serde(default)]
    pub size: Option<SizeArg>,
    /// Cluster size in bytes (power of two, 4 KiB to 1 MiB); default 64 KiB.
    #[serde(default)]
    pub cluster_size: Option<SizeArg>,
    /// Open an existing pool instead of formatting.
    #[serde(default)]
    pub import: bool,
}

/// A size given as a number of bytes or a string with a unit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl SizeArg {
    pub fn bytes(&self) -> Result<u64> {
        match self {
            SizeArg::Bytes(b) => Ok(*b),
            SizeArg::Text(t) => parse_size(t),
        }
    }
}

/// A pool as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PoolView {
    pub name: String,
    pub path: PathBuf,
    /// `ok`, or why the pool could not be opened.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<PoolUsage>,
}

/// `POST /v1/disks/{name}/snapshot` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot: String,
}

/// What `POST /v1/disks/{name}/snapshot` answers: the pool with its new snapshot
/// volume, or the RBD snapshot's full name.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum SnapshotTaken {
    Pool(PoolView),
    Rbd {
        disk: String,
        /// `POOL[/NAMESPACE]/IMAGE@SNAPSHOT`: what a clone names.
        snapshot: String,
    },
}

/// `POST /v1/disks/{name}/resize` body.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    pub size: SizeArg,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub discard_data: bool,
}

pub(crate) fn get_pool(g: &Inner, name: &str) -> Result<Arc<Pool>> {
    let p = g
        .pools
        .get(name)
        .ok_or_else(|| err(ErrorKind::NotFound, format!("pool {name:?} does not exist")))?;
    p.pool
        .clone()
        .map_err(|e| err(ErrorKind::Io, format!("pool {name:?} is unavailable: {e}")))
}

/// Zero a file disk's image (punching holes where the filesystem can) in 64 MiB steps,
/// calling `progress(done_bytes, total_bytes)` after each, and sync it.
pub(crate) fn erase_file(path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<u64> {
    let ctx = |e| Error::io(format!("erase {}", path.display()), e);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(ctx)?;
    let len = nvmux_backend::device_bytes(&f).map_err(ctx)?;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(64 << 20);
        nvmux_backend::zero_range(&f, done, n).map_err(ctx)?;
        done += n;
        progress(done, len);
    }
    f.sync_all().map_err(ctx)?;
    Ok(len)
}

/// Offline check of the pool at `path` (refused while a daemon serves it).
pub fn check_path(path: &Path) -> Result<CheckReport> {
    nvmux_volume::check(path)
}

impl Daemon {
    pub fn create_pool(&self, req: PoolCreate) -> Result<PoolView> {
        check_name("pool", &req.name)?;
        let mut g = self.lock();
        if g.pools.contains_key(&req.name) {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!("pool {:?} already exists", req.name),
            ));
        }
        if let Some(o) = g.pools.values().find(|p| p.spec.path == req.path) {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!("{} is already pool {:?}", req.path.display(), o.spec.name),
            ));
        }
        if !req.import {
            let mut opts = PoolOptions::default();
            if let Some(s) = &req.size {
                opts.size = Some(s.bytes()?);
            }
            if let Some(c) = &req.cluster_size {
                let c = c.bytes()?;
                opts.cluster_size = u32::try_from(c).map_err(|_| {
                    err(
                        ErrorKind::InvalidArgument,
                        format!("cluster size {c} is too large"),
                    )
                })?;
            }
            Pool::create(&req.path, &opts)?;
        }
        let pool = open_pool(&req.path)?;
        pool.set_command_timeout(self.config().pool.command_timeout_ms);
        let spec = PoolSpec {
            name: req.name.clone(),
            path: req.path.clone(),
        };
        g.pools.insert(
            req.name.clone(),
            PoolEntry {
                spec,
                pool: Ok(pool),
            },
        );
        if let Err(e) = self.persist(&g) {
            if let Some(PoolEntry { pool: Ok(p), .. }) = g.pools.remove(&req.name) {
                let _ = p.close();
            }
            return Err(e);
        }
        tracing::info!(pool = %req.name, path = %req.path.display(), "pool added");
        Ok(pool_view(&g.pools[&req.name]))
    }

    pub fn pools(&self) -> Vec<PoolView> {
        self.lock().pools.values().map(pool_view).collect()
    }

    pub fn pool(&self, name: &str) -> Result<PoolView> {
        let g = self.lock();
        g.pools
            .get(name)
            .map(pool_view)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("pool {name:?} does not exist")))
    }

    /// Close a pool and forget it (its file or device is left as is).
    pub fn remove_pool(&self, name: &str) -> Result<()> {
        let mut g = self.lock();
        if !g.pools.contains_key(name) {
            return Err(err(
                ErrorKind::NotFound,
                format!("pool {name:?} does not exist"),
            ));
        }
        let users: Vec<String> = g
            .disks
            .values()
            .filter(|d| matches!(&d.spec.backend, BackendSpec::Thin { pool, .. } if pool == name))
            .map(|d| d.spec.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(err(
                ErrorKind::Busy,
                format!("pool {name:?} holds disks {users:?}; delete them first"),
            ));
        }
        let e = g.pools.remove(name);
        if let Err(er) = self.persist(&g) {
            if let Some(e) = e {
                g.pools.insert(name.to_string(), e);
            }
            return Err(er);
        }
        if let Some(PoolEntry { pool: Ok(p), .. }) = e {
            p.close()?;
        }
        Ok(())
    }

    pub(crate) fn create_thin_disk(
        &self,
        mut g: MutexGuard<'_, Inner>,
        req: DiskCreate,
    ) -> Result<DiskView> {
        let pool_name = req.pool.clone().unwrap_or_default();
        if req.path.is_some() || req.backend.as_deref().is_some_and(|b| b != "thin") {
            return Err(err(
                ErrorKind::InvalidArgument,
                "a pool disk takes no --path or --backend",
            ));
        }
        let pool = get_pool(&g, &pool_name)?;
        if req.encrypt && (req.volume.is_some() || req.from_snapshot.is_some()) {
            return Err(err(
                ErrorKind::Unsupported,
                "an encrypted disk cannot be a clone or an attached volume yet: its data would need the origin's key",
            ));
        }
        let keys = self.key_source();
        let new_key = crate::disks::new_key_for(&req, &keys)?;
        let crypt = new_key.as_ref().and_then(crate::NewKey::spec);
        let (volume, owned) = match &req.volume {
            Some(v) => {
                if req.size.is_some() || req.from_snapshot.is_some() {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "--volume attaches an existing volume: no --size or --from-snapshot",
                    ));
                }
                if g.disks.values().any(|d| matches!(&d.spec.backend, BackendSpec::Thin { pool, volume, .. } if *pool == pool_name && volume == v)) {
                    return Err(err(ErrorKind::AlreadyExists, format!("volume {v:?} is already a disk")));
                }
                (v.clone(), false)
            }
            None => {
                if req.size.is_none() && req.from_snapshot.is_none() {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "a pool disk needs --size (or --from-snapshot)",
                    ));
                }
                pool.create_volume(&req.name, req.size, req.from_snapshot.as_deref())?;
                (req.name.clone(), true)
            }
        };
        let undo = |pool: &Pool| {
            if owned {
                let _ = pool.delete(&volume, false, &mut |_, _| {});
            }
        };
        let thin = match ThinDevice::open(&pool, &volume) {
            Ok(d) => d,
            Err(e) => {
                undo(&pool);
                return Err(e);
            }
        };
        // A pool disk's block is its pool device's: 512, or 4096 on a 4Kn device.
        let bs = nvmux_core::BlockDevice::info(&thin).block_size;
        if req.block_size.is_some_and(|b| b != bs) {
            undo(&pool);
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("disks of pool {pool_name:?} have {bs}-byte blocks (its device's logical block)"),
            ));
        }
        let (size, ro) = (thin.size(), nvmux_core::BlockDevice::info(&thin).read_only);
        let spec = DiskSpec {
            name: req.name.clone(),
            backend: BackendSpec::Thin {
                pool: pool_name,
                volume: volume.clone(),
                owned,
            },
            size,
            block_size: bs,
            read_only: req.read_only || ro,
            crypt,
            qos: req.qos,
            chain: req.chain.clone(),
            classifier: None,
            external: None,
            allow_flush_complete: false,
            mirror: None,
        };
        let open = |_: &Inner, _: &DiskSpec| {
            Ok(crate::assembly::Leg {
                dev: Arc::new(thin),
                remote: None,
            })
        };
        self.install_disk(&mut g, spec, &keys, new_key, open, &|| undo(&pool))
    }

    fn thin_of(&self, g: &Inner, disk: &str) -> Result<(String, Arc<Pool>, String)> {
        let d = g
            .disks
            .get(disk)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("disk {disk:?} does not exist")))?;
        match &d.spec.backend {
            BackendSpec::Thin { pool, volume, .. } => {
                Ok((pool.clone(), get_pool(g, pool)?, volume.clone()))
            }
            _ => Err(err(
                ErrorKind::Unsupported,
                format!("disk {disk:?} is neither in a pool nor on rbd: snapshots and resize need one of those"),
            )),
        }
    }

    /// Snapshot a pool disk (`snapshot` becomes a read-only volume in the pool) or an RBD
    /// disk (an RBD snapshot `IMAGE@snapshot`, protected, so it can be cloned).
    pub fn snapshot_disk(&self, disk: &str, snapshot: &str) -> Result<SnapshotTaken> {
        check_name("snapshot", snapshot)?;
        let g = self.lock();
        if g.disks.get(disk).is_some_and(|d| d.spec.crypt.is_some()) {
            return Err(err(
                ErrorKind::Unsupported,
                format!("disk {disk:?} is encrypted: snapshots of encrypted disks are not supported yet (a clone would need the disk's key)"),
            ));
        }
        if let Some((img, snap)) = g.disks.get(disk).and_then(|d| d.spec.backend.rbd_image()) {
            if snap.is_some() {
                return Err(err(
                    ErrorKind::Unsupported,
                    format!("disk {disk:?} is an rbd snapshot already; snapshot its image"),
                ));
            }
            let cluster = g.rbd.cluster()?;
            // librbd quiesces the image's writes (ours included: the request goes to the
            // holder of its exclusive lock) for the snapshot; the API does not wait with it.
            drop(g);
            cluster.create_snapshot(&img, snapshot)?;
            tracing::info!(disk, snapshot, image = %img, "rbd snapshot taken");
            return Ok(SnapshotTaken::Rbd {
                disk: disk.to_string(),
                snapshot: format!("{img}@{snapshot}"),
            });
        }
        let (name, pool, volume) = self.thin_of(&g, disk)?;
        // The snapshot waits for the volume's writes in flight (up to
        // pool.command_timeout_ms): the rest of the API does not wait with it.
        drop(g);
        pool.snapshot(&volume, snapshot)?;
        tracing::info!(disk, snapshot, "snapshot taken");
        let g = self.lock();
        g.pools
            .get(&name)
            .map(|p| SnapshotTaken::Pool(pool_view(p)))
            .ok_or_else(|| {
                err(
                    ErrorKind::NotFound,
                    format!("pool {name:?} was removed while the snapshot was taken"),
                )
            })
    }

    /// Resize a pool disk (see docs/api.md for what attached guests see).
    pub fn resize_disk(&self, disk: &str, req: Resize) -> Result<DiskView> {
        let size = req.size.bytes()?;
        let mut g = self.lock();
        // What is resized: an RBD image, or a thin volume.
        let (rbd, thin) = match g.disks.get(disk).and_then(|d| d.spec.backend.rbd_image()) {
            Some((img, Some(s))) => {
                return Err(err(
                    ErrorKind::Unsupported,
                    format!("disk {disk:?} is snapshot {img}@{s}, which is read-only"),
                ))
            }
            Some((img, None)) => (Some(img), None),
            None => (None, Some(self.thin_of(&g, disk)?)),
        };
        if let Some(d) = g.disks.get(disk) {
            if !d.spec.legs().is_empty() {
                return Err(err(
                    ErrorKind::Unsupported,
                    format!(
                        "disk {disk:?} is mirrored (legs {}): a mirror does not change size; remove its other legs first",
                        d.spec.legs().iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if d.mirror.as_ref().is_some_and(|m| !m.is_solo()) {
                return Err(err(
                    ErrorKind::Busy,
                    format!("disk {disk:?} was mirrored since the daemon started, and its mirror keeps a fixed size until the daemon restarts"),
                ));
            }
        }
        if let Some(img) = &rbd {
            // The open image's size is live, as a thin volume's: exports and the devices
            // above it follow without a rebuild.
            let now = g.disks.get(disk).map_or(0, |d| d.spec.size);
            if size < now && !req.force {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("shrinking disk {disk:?} from {now} to {size} bytes drops the data past the new end; add --force"),
                ));
            }
            crate::rbd::resize(&g, img, size)?;
            if let Some(d) = g.disks.get_mut(disk) {
                d.spec.size = size;
            }
        }
        if let Some((_, pool, volume)) = thin {
            pool.resize(&volume, size, req.force, req.discard_data)?;
            // Running exports keep the device they started with: it shares the volume's
            // live size, which their queues and config space read. The new handle gives
            // `info()` the new size for exports added from now on.
            // A disk with the mirror pass-through keeps its mirror (the one its exports
            // use, which `disk mirror add` changes); its leg is the volume, whose size is
            // live.
            let thin: Arc<dyn nvmux_core::BlockDevice> =
                Arc::new(ThinDevice::open(&pool, &volume)?);
            if let Some(d) = g.disks.get_mut(disk) {
                d.spec.size = size;
                let base = match &d.mirror {
                    Some(m) => m.clone(),
                    None => thin,
                };
                d.dev = crate::with_functions(base, &d.spec, &self.key_source(), &d.qos, &d.router)
                    .map_err(|e| e.to_string());
            }
        }
        self.persist(&g)?;
        tracing::info!(disk, size, "disk resized");
        self.announce_size(&g, disk, size);
        Ok(Daemon::view(&g, &g.disks[disk]))
    }

    /// Tell whatever serves `disk` that its size is now `size`: external functions, NVMe
    /// hosts (a namespace-changed event), vfio-user and vhost-user clients (a
    /// config-change message).
    pub(crate) fn announce_size(&self, g: &Inner, disk: &str, size: u64) {
        if let Some(e) = g.disks.get(disk).and_then(|d| d.router.external()) {
            e.set_num_blocks(size / 512);
        }
        self.notify_namespaces(g, disk);
        // Attached VMs learn the new size through the config-change message.
        for e in g.exports.values().filter(|e| e.spec.disk == disk) {
            if let Ok(crate::Handle::VfioUser(h)) = &e.handle {
                // The controller re-reads the capacity and raises a Namespace Attribute
                // Changed event (now if the guest has an AER outstanding, else at its next).
                h.capacity_changed();
                tracing::info!(disk, export = %e.spec.name, "vfio-user controller told of the new size");
            }
            if let Ok(crate::Handle::Vhost(h)) = &e.handle {
                match h.notify_config_change() {
                    Ok(true) => {
                        tracing::info!(disk, export = %e.spec.name, "client notified of the new size")
                    }
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(disk, export = %e.spec.name, "config-change notification failed: {err}")
                    }
                }
            }
        }
    }

    /// Delete a volume or snapshot that no disk attaches.
    pub fn delete_volume(&self, pool_name: &str, volume: &str) -> Result<()> {
        let g = self.lock();
        if let Some(d) = g.disks.values().find(|d| matches!(&d.spec.backend, BackendSpec::Thin { pool, volume: v, .. } if pool == pool_name && v == volume)) {
            return Err(err(
                ErrorKind::Busy,
                format!("volume {volume:?} is disk {:?}; delete the disk instead", d.spec.name),
            ));
        }
        let pool = get_pool(&g, pool_name)?;
        pool.delete(volume, false, &mut |_, _| {})
    }
}

fn pool_view(p: &PoolEntry) -> PoolView {
    PoolView {
        name: p.spec.name.clone(),
        path: p.spec.path.clone(),
        status: match &p.pool {
            Ok(_) => "ok".into(),
            Err(e) => format!("error: {e}"),
        },
        usage: p.pool.as_ref().ok().map(|p| p.usage()),
    }
}

/// Parse a size argument for the CLI.
pub fn size_arg(s: &str) -> Result<SizeArg> {
    parse_size(s).map(SizeArg::Bytes)
}
