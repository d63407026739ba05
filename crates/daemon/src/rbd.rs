//! RBD disks (docs/rbd.md): the daemon's one connection to its Ceph cluster, the open
//! images, and what `disk create|resize|snapshot|clone` do to an image.
//!
//! The connection is made when the first RBD disk needs it (a daemon without RBD disks
//! never loads librados) and kept; a failed connect is tried again by the next request.
//! An image is open once per daemon: a disk whose chain is rebuilt reuses the open
//! device, because two handles on one image in one process would pass its exclusive
//! lock back and forth on every write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use nvmux_backend::rbd::{ImageRef, RbdCluster, RbdConfig, RbdDevice, RbdOptions};
use nvmux_core::{ErrorKind, Result};

use crate::{err, BackendSpec, Inner};

/// An image, or one of its snapshots.
type ImageKey = (ImageRef, Option<String>);

/// An image `disk create` made, with the cluster to remove it from again.
pub(crate) type Made = (Arc<RbdCluster>, ImageRef);

/// The cluster connection and the open images.
pub(crate) struct RbdConn {
    cfg: RbdConfig,
    cluster: Mutex<Option<Arc<RbdCluster>>>,
    open: Mutex<HashMap<ImageKey, Weak<RbdDevice>>>,
}

impl Default for RbdConn {
    fn default() -> Self {
        Self::new(crate::config::RbdConfig::default().backend())
    }
}

impl RbdConn {
    pub(crate) fn new(cfg: RbdConfig) -> Self {
        RbdConn {
            cfg,
            cluster: Mutex::new(None),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The cluster, connected on first use.
    pub(crate) fn cluster(&self) -> Result<Arc<RbdCluster>> {
        let mut c = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let conn = RbdCluster::connect(&self.cfg)
            .map_err(|e| err(e.kind, format!("ceph cluster: {}", e.msg)))?;
        tracing::info!(client = %self.cfg.client_id, "connected to the ceph cluster");
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// The open device of an image (or snapshot), opening it if nobody has.
    pub(crate) fn open(
        &self,
        img: &ImageRef,
        snap: Option<&str>,
        opts: &RbdOptions,
    ) -> Result<Arc<RbdDevice>> {
        let key = (img.clone(), snap.map(str::to_string));
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|_, w| w.strong_count() > 0);
        if let Some(d) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(d);
        }
        let cluster = self.cluster()?;
        let d = Arc::new(RbdDevice::open(&cluster, img, opts)?);
        open.insert(key, Arc::downgrade(&d));
        Ok(d)
    }

    /// The open device of an image (not of a snapshot), if one is open.
    pub(crate) fn device(&self, img: &ImageRef) -> Option<Arc<RbdDevice>> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&(img.clone(), None)).and_then(Weak::upgrade)
    }

    /// Every open image (snapshots left out: their size does not change).
    fn open_images(&self) -> Vec<(ImageRef, Arc<RbdDevice>)> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.iter()
            .filter(|((_, snap), _)| snap.is_none())
            .filter_map(|((img, _), w)| Some((img.clone(), w.upgrade()?)))
            .collect()
    }
}

/// How often the daemon asks librbd for the size of its open images.
pub(crate) const SIZE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl crate::Daemon {
    /// Follow resizes made outside nvmux (`rbd resize`, OpenStack, another tool): ask
    /// librbd for each open image's size, outside the state lock (it may wait for the
    /// cluster), and announce a change as `disk resize` does. A mirrored disk keeps its
    /// size (a mirror does not change size): the change is logged and left alone.
    pub(crate) fn follow_rbd_sizes(&self) {
        let images = self.lock().rbd.open_images();
        for (img, dev) in images {
            let size = match dev.refresh_size() {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(image = %img, "rbd size check: {}", e.msg);
                    continue;
                }
            };
            let mut g = self.lock();
            let disks: Vec<String> = g
                .disks
                .values()
                .filter(|d| matches!(d.spec.backend.rbd_image(), Some((i, None)) if i == img))
                .map(|d| d.spec.name.clone())
                .collect();
            for disk in disks {
                let Some(d) = g.disks.get_mut(&disk) else {
                    continue;
                };
                if d.spec.size == size {
                    continue;
                }
                if !d.spec.legs().is_empty() || d.mirror.as_ref().is_some_and(|m| !m.is_solo()) {
                    tracing::warn!(disk, image = %img, size, "rbd image resized outside nvmux; the disk is mirrored and keeps its size of {} bytes", d.spec.size);
                    continue;
                }
                let old = std::mem::replace(&mut d.spec.size, size);
                tracing::info!(disk, image = %img, old, size, "rbd image resized outside nvmux: the disk follows");
                if let Err(e) = self.persist(&g) {
                    tracing::error!(disk, "saving the new size: {e}");
                }
                self.announce_size(&g, &disk, size);
            }
        }
    }
}

/// The `rbd` backend of `disk create`: the image named by `image` (`POOL[/NS]/IMAGE`, or
/// `…@SNAP` for a snapshot, read-only). A missing image is created with `size`, or
/// cloned from `from_snapshot`. Returns the backend and the image this call created (for
/// the caller to remove again should the disk not come up).
pub(crate) fn create_backend(
    g: &Inner,
    image: &str,
    size: Option<u64>,
    from_snapshot: Option<&str>,
) -> Result<(BackendSpec, Option<Made>)> {
    let (img, snap) = ImageRef::parse(image)?;
    if let Some(other) = g.disks.values().find(|d| {
        d.spec
            .backend
            .rbd_image()
            .is_some_and(|(i, s)| i == img && s == snap.as_deref())
    }) {
        return Err(err(
            ErrorKind::AlreadyExists,
            format!("rbd image {image} is already disk {:?}", other.spec.name),
        ));
    }
    let cluster = g.rbd.cluster()?;
    let info = cluster.image_info(&img)?;
    let mut made = None;
    if let Some(parent) = from_snapshot {
        let (pimg, psnap) = ImageRef::parse(parent)?;
        let Some(psnap) = psnap else {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("--from-snapshot {parent:?} names no snapshot: use POOL[/NS]/IMAGE@SNAP"),
            ));
        };
        if snap.is_some() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "a clone is a writable image: give --image without @SNAP",
            ));
        }
        if info.is_some() {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!("rbd image {img} already exists; a clone needs a new image name"),
            ));
        }
        cluster.clone_image(&pimg, &psnap, &img)?;
        made = Some((cluster.clone(), img.clone()));
        // A clone starts with its parent's size; another one is a resize (to the same
        // size, a no-op in librbd).
        if let Some(Err(e)) = size.map(|s| cluster.resize_image(&img, s)) {
            let _ = cluster.remove_image(&img);
            return Err(e);
        }
    } else {
        match (info, snap.as_deref()) {
            (None, Some(s)) => {
                return Err(err(
                    ErrorKind::NotFound,
                    format!("rbd image {img} does not exist, so it has no snapshot {s:?}"),
                ))
            }
            (None, None) => {
                let Some(size) = size else {
                    return Err(err(
                        ErrorKind::NotFound,
                        format!("rbd image {img} does not exist; give a size to create it"),
                    ));
                };
                cluster.create_image(&img, size)?;
                made = Some((cluster.clone(), img.clone()));
            }
            (Some(i), s) => {
                if let Some(s) = s {
                    if !i.snapshots.iter().any(|x| x == s) {
                        return Err(err(
                            ErrorKind::NotFound,
                            format!("rbd image {img} has no snapshot {s:?}"),
                        ));
                    }
                }
                if size.is_some_and(|want| want != i.size) {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        format!(
                            "rbd image {img} exists with {} bytes; leave out the size, or change it with `nvmux disk resize` after creating the disk",
                            i.size
                        ),
                    ));
                }
            }
        }
    }
    Ok((
        BackendSpec::Rbd {
            pool: img.pool.clone(),
            namespace: img.namespace.clone(),
            image: img.image.clone(),
            snapshot: snap,
        },
        made,
    ))
}

/// Resize an RBD disk's image: through the open device when there is one (its size, and
/// so the guests', follows at once), else through the cluster.
pub(crate) fn resize(g: &Inner, img: &ImageRef, size: u64) -> Result<()> {
    match g.rbd.device(img) {
        Some(d) => d.resize(size),
        None => g.rbd.cluster()?.resize_image(img, size),
    }
}
