//! Disks: create, delete (with erase), change their functions and limits, crypto-erase,
//! rotate the KEK.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nvmux_backend::{FileDevice, FileOptions};
use nvmux_core::stats::DiskStats;
use nvmux_core::{BlockDevice, Error, ErrorKind, Result};
use nvmux_func::keys::KeyProvider;
use serde::{Deserialize, Serialize};

use crate::assembly::{
    bitmap_path, new_crypt_spec, open_backend, open_base, with_functions, KeySource, Leg, NewKey,
};
use crate::{
    check_name, err, ops, pools, BackendSpec, Daemon, Disk, DiskSpec, DiskView, Function, Inner,
    QosSpec,
};

/// `POST /v1/disks` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DiskCreate {
    pub name: String,
    /// `file` (default), `null`, `memory`, `nvmf` or `rbd`.
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
    /// The function chain, outermost first (default: qos, then crypt if encrypted, then
    /// mirror).
    #[serde(default)]
    pub chain: Option<Vec<Function>>,
    /// `nvmf` backend: the remote namespace, `NQN@HOST:PORT[,HOST:PORT...]`.
    #[serde(default)]
    pub remote: Option<String>,
    /// `nvmf` backend: the namespace id (default 1).
    #[serde(default)]
    pub nsid: Option<u32>,
    /// `nvmf` backend: how long commands wait for a path once every path is lost (ms,
    /// default 30000).
    #[serde(default)]
    pub loss_timeout_ms: Option<u64>,
    /// `nvmf` backend: DH-HMAC-CHAP host secret, and the controller's (bidirectional).
    #[serde(default)]
    pub dhchap_secret: Option<String>,
    #[serde(default)]
    pub dhchap_ctrl_secret: Option<String>,
    /// `rbd` backend: the image, `POOL[/NAMESPACE]/IMAGE`, or `…@SNAPSHOT` for a
    /// snapshot (read-only). A missing image is created with `size`, or cloned from
    /// `from_snapshot` (`POOL[/NAMESPACE]/IMAGE@SNAPSHOT`).
    #[serde(default)]
    pub image: Option<String>,
}

/// The `nvmf` backend a request names: `remote` parsed into the subsystem and its paths.
pub(crate) fn nvmf_backend(
    remote: &str,
    nsid: Option<u32>,
    loss_timeout_ms: Option<u64>,
    dhchap_secret: Option<String>,
    dhchap_ctrl_secret: Option<String>,
) -> Result<BackendSpec> {
    let (subnqn, paths) = nvmux_nvmf::host::parse_remote(remote)?;
    if nsid == Some(0) || nsid == Some(u32::MAX) {
        return Err(err(
            ErrorKind::InvalidArgument,
            "nsid must be a namespace id from 1 (0 and 0xffffffff are not)",
        ));
    }
    Ok(BackendSpec::Nvmf {
        subnqn,
        paths: paths.iter().map(|p| p.to_string()).collect(),
        nsid: nsid.unwrap_or(1),
        loss_timeout_ms,
        dhchap_secret,
        dhchap_ctrl_secret,
    })
}

/// The checks of a create request that hold for every backend (file, null, memory,
/// pool): a block size of 512 or 4096, and `sector_size` and `iv_large_sectors` only on
/// an encrypted disk.
fn check_request(req: &DiskCreate) -> Result<()> {
    if let Some(b) = req.block_size.filter(|&b| b != 512 && b != 4096) {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("block size {b} is not supported (use 512 or 4096)"),
        ));
    }
    if !req.encrypt && (req.sector_size.is_some() || req.iv_large_sectors) {
        return Err(err(
            ErrorKind::InvalidArgument,
            "sector_size and iv_large_sectors are encryption options: add encrypt",
        ));
    }
    Ok(())
}

/// The new disk's data key, when it is to be encrypted (its keystore slot is erased
/// again unless the disk is kept).
pub(crate) fn new_key_for<'a, 'b>(
    req: &DiskCreate,
    keys: &'a KeySource<'b>,
) -> Result<Option<NewKey<'a, 'b>>> {
    if !req.encrypt {
        return Ok(None);
    }
    new_crypt_spec(&req.name, keys, req.sector_size, req.iv_large_sectors).map(Some)
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

impl Daemon {
    /// Why a disk's backing is failed after an I/O error (sticky until it is opened
    /// again: see format.md, "Data safety"), if it is.
    pub(crate) fn failure(g: &Inner, d: &Disk) -> Option<String> {
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

    pub(crate) fn view(g: &Inner, d: &Disk) -> DiskView {
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
            remote: Self::remote_of(d),
            mirror_status: Self::mirror_view(d).filter(|m| m.legs.len() > 1),
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
        check_request(&req)?;
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
        let rbd = req.backend.as_deref() == Some("rbd");
        if (req.from_snapshot.is_some() && !rbd) || req.volume.is_some() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "--from-snapshot needs --pool or --backend rbd, and --volume needs --pool",
            ));
        }
        if req.image.is_some() && !rbd {
            return Err(err(
                ErrorKind::InvalidArgument,
                "image is an option of the rbd backend",
            ));
        }
        let mut made_rbd = None;
        let bs = req.block_size.unwrap_or(512);
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
            "nvmf" => {
                let Some(remote) = &req.remote else {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "an nvmf disk needs remote: NQN@HOST:PORT[,HOST:PORT...]",
                    ));
                };
                if req.size.is_some() || req.block_size.is_some() {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "an nvmf disk takes its size and block size from the remote namespace",
                    ));
                }
                nvmf_backend(
                    remote,
                    req.nsid,
                    req.loss_timeout_ms,
                    req.dhchap_secret.clone(),
                    req.dhchap_ctrl_secret.clone(),
                )?
            }
            "rbd" => {
                let Some(image) = &req.image else {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "an rbd disk needs image: POOL[/NAMESPACE]/IMAGE[@SNAPSHOT]",
                    ));
                };
                let (b, made) =
                    crate::rbd::create_backend(&g, image, req.size, req.from_snapshot.as_deref())?;
                made_rbd = made;
                b
            }
            other => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("backend {other:?} is unknown (use file, null, memory, nvmf or rbd)"),
                ))
            }
        };
        let remote_opts = req.remote.is_some()
            || req.nsid.is_some()
            || req.loss_timeout_ms.is_some()
            || req.dhchap_secret.is_some()
            || req.dhchap_ctrl_secret.is_some();
        if remote_opts && !matches!(backend, BackendSpec::Nvmf { .. }) {
            return Err(err(
                ErrorKind::InvalidArgument,
                "remote, nsid, loss_timeout_ms and the dhchap secrets are options of the nvmf backend",
            ));
        }
        if matches!(backend, BackendSpec::Null | BackendSpec::Memory) && req.size.is_none() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "a null or memory disk needs a size",
            ));
        }
        // A file disk without a size takes the existing file's size.
        let keys = self.key_source();
        let new_key = new_key_for(&req, &keys)?;
        // A snapshot is read-only.
        let read_only = req.read_only
            || matches!(
                &backend,
                BackendSpec::Rbd {
                    snapshot: Some(_),
                    ..
                }
            );
        let spec = DiskSpec {
            name: req.name.clone(),
            backend,
            size: req.size.unwrap_or(0),
            block_size: bs,
            read_only,
            crypt: new_key.as_ref().and_then(NewKey::spec),
            qos: req.qos,
            chain: req.chain.clone(),
            classifier: None,
            external: None,
            allow_flush_complete: false,
            mirror: None,
        };
        // Leave nothing behind: an image we were creating ourselves goes on a failure.
        let made_image = match &spec.backend {
            BackendSpec::File {
                path, owned: true, ..
            } => Some(path.clone()),
            _ => None,
        };
        let undo = || {
            if let Some(p) = &made_image {
                let _ = std::fs::remove_file(p);
            }
            if let Some((cluster, img)) = &made_rbd {
                if let Err(e) = cluster.remove_image(img) {
                    tracing::warn!(image = %img, "the rbd image made for the disk could not be removed: {e}");
                }
            }
        };
        let (block_size, size, read_only) = (req.block_size, req.size, req.read_only);
        let open = |g: &Inner, spec: &DiskSpec| match &spec.backend {
            BackendSpec::File { path, direct, .. } => FileDevice::open(
                path,
                &FileOptions {
                    block_size,
                    size,
                    read_only,
                    direct: *direct,
                    create: true,
                },
            )
            .map(|d| Leg {
                dev: Arc::new(d),
                remote: None,
            }),
            _ => open_backend(g, spec),
        };
        self.install_disk(&mut g, spec, &keys, new_key, open, &undo)
    }

    /// Create a disk whose spec is settled, whatever its backend: check its chain, build
    /// its qos and router, open its device (`open`) and stack its functions, then record
    /// and persist it. On a failure `undo` takes back what the caller made for it (an
    /// image file, a volume), the new data key is erased (dropped unkept), and nothing is
    /// left behind.
    pub(crate) fn install_disk(
        &self,
        g: &mut Inner,
        mut spec: DiskSpec,
        keys: &KeySource,
        new_key: Option<NewKey>,
        open: impl FnOnce(&Inner, &DiskSpec) -> Result<Leg>,
        undo: &dyn Fn(),
    ) -> Result<DiskView> {
        // A new disk has no mirror history: a bitmap left by a deleted namesake goes.
        let bitmap = bitmap_path(&self.cfg.data_dir, &spec.name);
        if let Err(e) = std::fs::remove_file(&bitmap) {
            if e.kind() != std::io::ErrorKind::NotFound {
                undo();
                return Err(Error::io(format!("remove stale {}", bitmap.display()), e));
            }
        }
        let built = spec.check_chain().and_then(|()| {
            let qos = self.new_qos(g, &spec)?;
            let router = nvmux_router::Router::new(&spec.name);
            let base = open_base(g, &spec, open(g, &spec)?, &self.cfg.data_dir)?;
            let dev = with_functions(base.dev.clone(), &spec, keys, &qos, &router)?;
            Ok((qos, router, dev, base))
        });
        let (qos, router, dev, base) = match built {
            Ok(x) => x,
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        spec.block_size = dev.info().block_size;
        spec.size = dev.info().size_bytes();
        tracing::info!(disk = %spec.name, device = %dev.describe(), size = spec.size, "disk created");
        let name = spec.name.clone();
        g.disks.insert(
            name.clone(),
            Disk {
                qos,
                router,
                spec,
                dev: Ok(dev),
                mirror: base.mirror,
                remotes: base.remotes,
                stats: Arc::new(DiskStats::default()),
            },
        );
        if let Err(e) = self.persist(g) {
            g.disks.remove(&name);
            undo();
            return Err(e);
        }
        if let Some(k) = new_key {
            k.keep();
        }
        Ok(Self::view(g, &g.disks[&name]))
    }

    /// What a disk's functions are stacked on again when its chain is rebuilt: its mirror
    /// or its remote initiator (the same objects: exports and connections stay), else its
    /// backend opened again.
    fn base_of(&self, g: &Inner, d: &Disk, spec: &DiskSpec) -> Result<Arc<dyn BlockDevice>> {
        if let Some(m) = &d.mirror {
            return Ok(m.clone());
        }
        if let Some((_, r)) = d.remotes.first() {
            return Ok(crate::assembly::remote_leg(r.clone()).dev);
        }
        Ok(open_backend(g, spec)?.dev)
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
        let dev = self
            .base_of(&g, d, &spec)
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
        // The mirror stays the same object while the chain keeps it.
        let (base, mirror, remotes) = match (&d.mirror, spec.has(Function::Mirror)) {
            (Some(m), true) => (
                m.clone() as Arc<dyn BlockDevice>,
                Some(m.clone()),
                d.remotes.clone(),
            ),
            _ => {
                let b = open_base(&g, &spec, open_backend(&g, &spec)?, &self.cfg.data_dir)?;
                (b.dev, b.mirror, b.remotes)
            }
        };
        let dev = with_functions(base, &spec, &self.key_source(), &qos, &d.router)?;
        let Some(d) = g.disks.get_mut(name) else {
            return Err(err(ErrorKind::NotFound, format!("disk {name:?} vanished")));
        };
        let old = (
            std::mem::replace(&mut d.spec, spec),
            std::mem::replace(&mut d.dev, Ok(dev)),
            std::mem::replace(&mut d.qos, qos),
            std::mem::replace(&mut d.mirror, mirror),
            std::mem::replace(&mut d.remotes, remotes),
        );
        if let Err(e) = self.persist(&g) {
            if let Some(d) = g.disks.get_mut(name) {
                (d.spec, d.dev, d.qos, d.mirror, d.remotes) = old;
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
                    "only file and pool disks can be erased (an rbd image stays with its cluster: remove it with `rbd rm`)",
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
        let bitmap = bitmap_path(&self.cfg.data_dir, name);
        if let Err(e) = std::fs::remove_file(&bitmap) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(disk = name, "could not remove {}: {e}", bitmap.display());
            }
        }
        if let Some(p) = owned_path {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(disk = name, "could not remove {}: {e}", p.display());
            }
        }
        tracing::info!(disk = name, erase, "disk deleted");
        Ok(erased)
    }
}
