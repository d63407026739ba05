//! Mirrors and remote disks: add and remove a disk's mirror legs live, show their state
//! and the remote paths. `disk move` is `mirror add` of the destination, a wait for its
//! copy, and `mirror remove` of the source (the CLI runs the three; docs/replication.md).

use std::path::PathBuf;
use std::sync::Arc;

use nvmux_backend::{FileDevice, FileOptions};
use nvmux_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

use crate::assembly::{remote_spec, Leg};
use crate::disks::nvmf_backend;
use crate::state::{primary_leg, LegSpec, MirrorSpec};
use crate::{check_name, err, BackendSpec, Daemon, Disk, Function, Inner};

/// `POST /v1/disks/{name}/mirror` body: the new leg.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegAdd {
    /// The leg's name (default `leg1`, `leg2`, …).
    #[serde(default)]
    pub name: Option<String>,
    /// A local file or block device (created with the disk's size if missing).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// A remote namespace: `NQN@HOST:PORT[,HOST:PORT...]`.
    #[serde(default)]
    pub remote: Option<String>,
    #[serde(default)]
    pub nsid: Option<u32>,
    /// Remote leg: how long its commands wait for a path before they fail and the leg is
    /// faulted (ms, default 2000).
    #[serde(default)]
    pub loss_timeout_ms: Option<u64>,
    #[serde(default)]
    pub dhchap_secret: Option<String>,
    #[serde(default)]
    pub dhchap_ctrl_secret: Option<String>,
    /// Bytes per second for the copy (and later resyncs); 0 is unlimited. Default: the
    /// disk's setting, else 256 MiB/s.
    #[serde(default)]
    pub sync_rate: Option<u64>,
}

/// A disk's mirror as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MirrorView {
    pub disk: String,
    pub region_size: u64,
    pub regions: u64,
    /// Regions whose legs may differ (set in the write-intent bitmap).
    pub dirty_regions: u64,
    /// Regions copied by resyncs (dirty regions only) since the daemon started.
    pub resynced_regions: u64,
    /// Full copies finished (new legs) since the daemon started.
    pub full_copies: u64,
    pub bitmap_writes: u64,
    pub read_retries: u64,
    pub read_repairs: u64,
    pub legs: Vec<LegView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LegView {
    pub name: String,
    /// `healthy`, `syncing` or `faulted`.
    pub state: String,
    /// Bytes copied and to copy of the leg's running sync (0 and 0 when none).
    pub sync_done: u64,
    pub sync_total: u64,
    pub in_flight: u64,
    pub errors: u64,
    /// What the leg is (`file /x.img`, `nvmf nqn…@addr`).
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteView>,
}

/// A remote namespace's initiator as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoteView {
    pub subnqn: String,
    pub nsid: u32,
    pub connected: bool,
    pub paths: Vec<PathView>,
    /// Times the active path changed.
    pub failovers: u64,
    pub reconnects: u64,
    /// From the loss of a path to the first command completed on the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_ms: Option<u64>,
    /// Commands failed because no path came back within the loss timeout.
    pub commands_failed: u64,
    /// Commands sent again after a connection was lost.
    pub commands_retried: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathView {
    pub addr: String,
    /// `live`, `connecting` or `down`.
    pub state: String,
    pub active: bool,
    /// The path's ANA state where the target reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ana: Option<String>,
}

pub(crate) fn remote_view(r: &nvmux_nvmf::host::RemoteDevice) -> RemoteView {
    use nvmux_nvmf::host::PathState;
    let s = r.status();
    RemoteView {
        subnqn: s.subnqn,
        nsid: s.nsid,
        connected: s.connected,
        paths: s
            .paths
            .iter()
            .map(|p| PathView {
                addr: p.addr.to_string(),
                state: match p.state {
                    PathState::Live => "live",
                    PathState::Connecting => "connecting",
                    PathState::Down => "down",
                }
                .into(),
                active: p.active,
                ana: p.ana.map(str::to_string),
            })
            .collect(),
        failovers: s.failovers,
        reconnects: s.reconnects,
        last_failover_ms: s.last_failover_ms,
        commands_failed: s.commands_failed,
        commands_retried: s.commands_retried,
    }
}

fn no_disk(name: &str) -> Error {
    err(ErrorKind::NotFound, format!("disk {name:?} does not exist"))
}

/// The disk's mirror, or why it has none.
fn mirror_of<'a>(d: &'a Disk, name: &str) -> Result<&'a Arc<nvmux_mirror::MirrorDevice>> {
    d.mirror.as_ref().ok_or_else(|| {
        let why = if d.spec.has(Function::Mirror) {
            "its device is not open"
        } else {
            "its chain has no mirror"
        };
        err(
            ErrorKind::InvalidArgument,
            format!("disk {name:?} cannot be mirrored: {why} (`nvmux disk chain {name} default` puts mirror back while the disk is not exported)"),
        )
    })
}

impl Daemon {
    pub(crate) fn mirror_view(d: &Disk) -> Option<MirrorView> {
        let m = d.mirror.as_ref()?;
        let s = m.status();
        let describe = |name: &str| -> String {
            let primary = d.spec.primary_name();
            let b = if name == primary {
                Some(&d.spec.backend)
            } else {
                d.spec
                    .legs()
                    .iter()
                    .find(|l| l.name == name)
                    .map(|l| &l.backend)
            };
            b.map(describe_backend).unwrap_or_default()
        };
        Some(MirrorView {
            disk: d.spec.name.clone(),
            region_size: s.region_size,
            regions: s.regions,
            dirty_regions: s.dirty_regions,
            resynced_regions: s.resynced_regions,
            full_copies: s.full_copies,
            bitmap_writes: s.bitmap_writes,
            read_retries: s.read_retries,
            read_repairs: s.read_repairs,
            legs: s
                .legs
                .iter()
                .map(|l| LegView {
                    name: l.name.clone(),
                    state: l.state.as_str().into(),
                    sync_done: l.sync_done,
                    sync_total: l.sync_total,
                    in_flight: l.in_flight,
                    errors: l.errors,
                    device: describe(&l.name),
                    remote: d
                        .remotes
                        .iter()
                        .find(|(n, _)| *n == l.name)
                        .map(|(_, r)| remote_view(r)),
                })
                .collect(),
        })
    }

    /// The disk's primary leg's initiator, when its backend is remote.
    pub(crate) fn remote_of(d: &Disk) -> Option<RemoteView> {
        let primary = d.spec.primary_name();
        d.remotes
            .iter()
            .find(|(n, _)| *n == primary)
            .map(|(_, r)| remote_view(r))
    }

    pub fn mirror_status(&self, name: &str) -> Result<MirrorView> {
        let g = self.lock();
        let d = g.disks.get(name).ok_or_else(|| no_disk(name))?;
        mirror_of(d, name)?;
        Self::mirror_view(d).ok_or_else(|| no_disk(name))
    }

    /// Add a leg to a live disk: it gets every write from now on and a background full
    /// copy; healthy when the copy is done.
    pub fn add_mirror_leg(&self, name: &str, req: LegAdd) -> Result<MirrorView> {
        let (spec, leg_name, backend, remote) = {
            let g = self.lock();
            let d = g.disks.get(name).ok_or_else(|| no_disk(name))?;
            mirror_of(d, name)?;
            if d.spec.read_only {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("disk {name:?} is read-only: a mirror leg would never be written"),
                ));
            }
            let taken: Vec<String> = std::iter::once(d.spec.primary_name())
                .chain(d.spec.legs().iter().map(|l| l.name.clone()))
                .collect();
            let leg_name = match req.name.clone() {
                Some(n) => {
                    check_name("mirror leg", &n)?;
                    if taken.contains(&n) {
                        return Err(err(
                            ErrorKind::AlreadyExists,
                            format!("disk {name:?} already has a leg {n:?}"),
                        ));
                    }
                    n
                }
                None => (1..)
                    .map(|i| format!("leg{i}"))
                    .find(|n| !taken.contains(n))
                    .unwrap_or_default(),
            };
            let backend = match (&req.file, &req.remote) {
                (Some(path), None) => {
                    if req.nsid.is_some()
                        || req.loss_timeout_ms.is_some()
                        || req.dhchap_secret.is_some()
                    {
                        return Err(err(
                            ErrorKind::InvalidArgument,
                            "nsid, loss_timeout_ms and dhchap secrets are options of a remote leg",
                        ));
                    }
                    if let Some(other) = in_use(&g, path) {
                        return Err(err(
                            ErrorKind::AlreadyExists,
                            format!("{} is already used by disk {other:?}", path.display()),
                        ));
                    }
                    BackendSpec::File {
                        path: path.clone(),
                        direct: true,
                        owned: false,
                    }
                }
                (None, Some(r)) => nvmf_backend(
                    r,
                    req.nsid,
                    req.loss_timeout_ms,
                    req.dhchap_secret.clone(),
                    req.dhchap_ctrl_secret.clone(),
                )?,
                _ => {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        "a mirror leg is either a file (file) or a remote namespace (remote)",
                    ))
                }
            };
            let remote = remote_spec(&g, &backend, true)?;
            (d.spec.clone(), leg_name, backend, remote)
        };
        // Connecting to a remote target may take seconds: not under the state lock.
        let leg = match remote {
            Some(r) => {
                let dev = nvmux_nvmf::host::RemoteDevice::connect(r)
                    .map_err(|e| err(e.kind, format!("mirror leg {leg_name:?}: {}", e.msg)))?;
                crate::assembly::remote_leg(dev)
            }
            None => {
                let BackendSpec::File { path, .. } = &backend else {
                    return Err(err(ErrorKind::InvalidArgument, "unknown leg kind"));
                };
                let f = FileDevice::open(
                    path,
                    &FileOptions {
                        block_size: Some(spec.block_size),
                        size: (!path.exists()).then_some(spec.size),
                        read_only: false,
                        direct: true,
                        create: true,
                    },
                )?;
                Leg {
                    dev: Arc::new(f),
                    remote: None,
                }
            }
        };
        let info = leg.dev.info().clone();
        if info.size_bytes() < spec.size || info.block_size != spec.block_size {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!(
                    "leg {leg_name:?} holds {} bytes in blocks of {}; disk {name:?} needs at least {} in blocks of {}",
                    info.size_bytes(),
                    info.block_size,
                    spec.size,
                    spec.block_size
                ),
            ));
        }
        let mut g = self.lock();
        let d = g.disks.get_mut(name).ok_or_else(|| no_disk(name))?;
        let m = mirror_of(d, name)?.clone();
        if let Some(r) = req.sync_rate {
            m.set_sync_rate(r);
        }
        m.add_leg(nvmux_mirror::Leg {
            name: leg_name.clone(),
            dev: leg.dev,
        })?;
        let ms = d.spec.mirror.get_or_insert_with(|| MirrorSpec {
            primary: primary_leg(),
            ..Default::default()
        });
        ms.legs.push(LegSpec {
            name: leg_name.clone(),
            backend,
        });
        if req.sync_rate.is_some() {
            ms.sync_rate = req.sync_rate;
        }
        if let Some(r) = leg.remote {
            d.remotes.push((leg_name.clone(), r));
        }
        if let Err(e) = self.persist(&g) {
            if let Some(d) = g.disks.get_mut(name) {
                let _ = m.remove_leg(&leg_name);
                if let Some(ms) = &mut d.spec.mirror {
                    ms.legs.retain(|l| l.name != leg_name);
                }
                d.remotes.retain(|(n, _)| *n != leg_name);
            }
            return Err(e);
        }
        tracing::info!(disk = name, leg = %leg_name, "mirror leg added; full copy started");
        let d = g.disks.get(name).ok_or_else(|| no_disk(name))?;
        Self::mirror_view(d).ok_or_else(|| no_disk(name))
    }

    /// Remove a leg (not the last healthy one). Removing the disk's backend leg makes the
    /// next leg the backend. The leg's data stays where it is.
    pub fn remove_mirror_leg(&self, name: &str, leg: &str) -> Result<MirrorView> {
        let mut g = self.lock();
        let d = g.disks.get_mut(name).ok_or_else(|| no_disk(name))?;
        let m = mirror_of(d, name)?.clone();
        let old = d.spec.clone();
        let primary = old.primary_name();
        if leg != primary && !old.legs().iter().any(|l| l.name == leg) {
            return Err(err(
                ErrorKind::NotFound,
                format!("disk {name:?} has no mirror leg {leg:?}"),
            ));
        }
        m.remove_leg(leg)?;
        let ms = d.spec.mirror.get_or_insert_with(MirrorSpec::default);
        if leg == primary {
            // The next leg becomes the disk's backend.
            let next = ms.legs.remove(0);
            ms.primary = next.name;
            d.spec.backend = next.backend;
        } else {
            ms.legs.retain(|l| l.name != leg);
        }
        let removed: Vec<_> = d
            .remotes
            .iter()
            .filter(|(n, _)| n == leg)
            .cloned()
            .collect();
        d.remotes.retain(|(n, _)| n != leg);
        if let Err(e) = self.persist(&g) {
            // The leg is out of the mirror already; the state file still names it, so the
            // next start opens it again (and copies it in full).
            tracing::error!(
                disk = name,
                leg,
                "mirror leg removed, but the state was not saved: {e}"
            );
            return Err(e);
        }
        for (_, r) in removed {
            r.shutdown();
        }
        tracing::info!(disk = name, leg, "mirror leg removed");
        let d = g.disks.get(name).ok_or_else(|| no_disk(name))?;
        Self::mirror_view(d).ok_or_else(|| no_disk(name))
    }
}

/// The disk that already uses `path` as its backend or a leg, if any.
fn in_use(g: &Inner, path: &std::path::Path) -> Option<String> {
    g.disks
        .values()
        .find(|d| {
            std::iter::once(&d.spec.backend)
                .chain(d.spec.legs().iter().map(|l| &l.backend))
                .any(|b| matches!(b, BackendSpec::File { path: p, .. } if p == path))
        })
        .map(|d| d.spec.name.clone())
}

/// One line for a backend (`file /x.img`, `nvmf nqn…@127.0.0.1:4420`).
pub(crate) fn describe_backend(b: &BackendSpec) -> String {
    match b {
        BackendSpec::File { path, .. } => format!("file {}", path.display()),
        BackendSpec::Null => "null".into(),
        BackendSpec::Memory => "memory".into(),
        BackendSpec::Thin { pool, volume, .. } => format!("thin {pool}/{volume}"),
        BackendSpec::Rbd { .. } => match b.rbd_image() {
            Some((img, Some(s))) => format!("rbd {img}@{s}"),
            Some((img, None)) => format!("rbd {img}"),
            None => "rbd".into(),
        },
        BackendSpec::Nvmf {
            subnqn,
            paths,
            nsid,
            ..
        } => format!("nvmf {subnqn}@{} ns {nsid}", paths.join(",")),
    }
}
