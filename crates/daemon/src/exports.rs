//! Exports: checks of a new export's socket, owner and migration peer; create and delete.

use std::path::{Path, PathBuf};

use nvmux_core::{ErrorKind, Result};
use serde::{Deserialize, Serialize};

use crate::views::export_view;
use crate::{
    check_name, claim_socket, err, nbd, Daemon, Export, ExportKind, ExportSpec, ExportView, Handle,
    Inner,
};

/// `POST /v1/exports` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExportCreate {
    /// Default: the disk's name.
    #[serde(default)]
    pub name: Option<String>,
    pub disk: String,
    /// `vhost-user-blk` (default), `nbd` or `vfio-user`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The Unix socket (vhost-user-blk, vfio-user: required; nbd: this or `listen`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// vhost-user-blk: virtqueues (default 1); vfio-user: NVMe I/O queue pairs offered to
    /// the guest (default 4); 1..=64.
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

/// An export may only replace a stale socket or a symlink: not another file, not the API
/// socket (compared as files, whatever the spelling of the path), not a socket someone
/// listens on.
pub(crate) fn check_export_socket(path: &Path, api: &Path) -> Result<()> {
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
                    ExportKind::VfioUser { .. } => "vfio-user",
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

impl Daemon {
    /// A new vfio-user export's kind: a socket checked as vhost-user's, and 1..=64 I/O
    /// queue pairs (default 4).
    fn vfio_user_kind(&self, g: &Inner, req: &ExportCreate) -> Result<ExportKind> {
        use nvmux_vfiouser::export::{DEFAULT_QUEUES, MAX_EXPORT_QUEUES};
        let Some(socket) = req.socket.clone() else {
            return Err(err(
                ErrorKind::InvalidArgument,
                "a vfio-user export needs a socket (QEMU's -device vfio-user-pci,socket=PATH)",
            ));
        };
        if req.listen.is_some()
            || req.export_name.is_some()
            || req.read_only
            || req.tls.is_some()
            || req.migration_peer.is_some()
        {
            return Err(err(
                ErrorKind::InvalidArgument,
                "listen, export_name, read_only and tls are for nbd exports, migration_peer for vhost-user-blk (a vfio-user export is read-only when its disk is)",
            ));
        }
        let num_queues = req.num_queues.unwrap_or(DEFAULT_QUEUES);
        if num_queues == 0 || num_queues > MAX_EXPORT_QUEUES {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!(
                    "num_queues {num_queues} is out of range: a vfio-user export offers 1 to {MAX_EXPORT_QUEUES} NVMe I/O queue pairs (default {DEFAULT_QUEUES})"
                ),
            ));
        }
        self.check_new_socket(g, &socket)?;
        Ok(ExportKind::VfioUser { socket, num_queues })
    }

    pub fn exports(&self) -> Vec<ExportView> {
        let g = self.lock();
        g.exports.values().map(export_view).collect()
    }

    /// A socket path a new listener may bind: not the API socket, nothing but a stale
    /// socket there, and no other export on it.
    pub(crate) fn check_new_socket(&self, g: &Inner, socket: &Path) -> Result<()> {
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
            "vfio-user" => self.vfio_user_kind(&g, &req)?,
            other => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!(
                        "export type {other:?} is unknown (use vhost-user-blk, nbd or vfio-user)"
                    ),
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
}
