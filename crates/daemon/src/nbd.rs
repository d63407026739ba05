//! NBD exports: disks served by the `nbd` room's listeners. Exports that name the same
//! socket or address share one listener and are told apart by their export names
//! (`nbdinfo --list` shows them all).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use nvmux_core::stats::DiskStats;
use nvmux_core::{BlockDevice, ErrorKind, Result};
use nvmux_nbd::{Listen, NbdServer};

use crate::{err, Daemon, ExportCreate, ExportKind, Handle, Inner};

/// A running NBD export: where its listener is, and the export it holds there.
pub(crate) struct NbdHandle {
    key: String,
    name: String,
    pub export: Arc<nvmux_nbd::Export>,
}

impl ExportKind {
    /// The Unix socket the export listens on, if it has one.
    pub fn socket(&self) -> Option<&PathBuf> {
        match self {
            ExportKind::VhostUserBlk { socket, .. } => Some(socket),
            ExportKind::Nbd { socket, .. } => socket.as_ref(),
        }
    }

    /// Where clients connect, for logs and the CLI.
    pub fn address(&self) -> String {
        match self {
            ExportKind::VhostUserBlk { socket, .. } => socket.display().to_string(),
            ExportKind::Nbd {
                socket: Some(s),
                export_name,
                ..
            } => {
                format!("nbd+unix:///{export_name}?socket={}", s.display())
            }
            ExportKind::Nbd {
                listen: Some(a),
                export_name,
                ..
            } => format!("nbd://{a}/{export_name}"),
            ExportKind::Nbd { .. } => String::new(),
        }
    }
}

fn listen_of(kind: &ExportKind) -> Result<Listen> {
    match kind {
        ExportKind::Nbd { socket: Some(s), listen: None, .. } => Ok(Listen::Unix(s.clone())),
        ExportKind::Nbd { socket: None, listen: Some(a), .. } => a.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            err(
                ErrorKind::InvalidArgument,
                format!("listen address {a:?} is not ADDR:PORT (e.g. 127.0.0.1:10809)"),
            )
        }),
        _ => Err(err(
            ErrorKind::InvalidArgument,
            "an nbd export needs exactly one of socket (a Unix socket path) and listen (a loopback ADDR:PORT)",
        )),
    }
}

fn key_of(l: &Listen) -> String {
    match l {
        Listen::Unix(p) => format!("unix:{}", p.display()),
        Listen::Tcp(a) => format!("tcp:{a}"),
    }
}

impl Daemon {
    /// The export kind an `nbd` create request asks for, checked.
    pub(crate) fn nbd_kind(&self, g: &Inner, req: &ExportCreate, name: &str) -> Result<ExportKind> {
        if req.num_queues.is_some() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "num_queues is for vhost-user-blk exports",
            ));
        }
        let export_name = req.export_name.clone().unwrap_or_else(|| name.to_string());
        if export_name.is_empty() || export_name.len() > 4096 {
            return Err(err(
                ErrorKind::InvalidArgument,
                "an NBD export name has 1 to 4096 bytes",
            ));
        }
        let kind = ExportKind::Nbd {
            socket: req.socket.clone(),
            listen: req.listen.clone(),
            export_name,
            read_only: req.read_only,
        };
        let l = listen_of(&kind)?;
        if let Listen::Unix(p) = &l {
            let shared = self
                .nbd
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&key_of(&l));
            if !shared {
                self.check_new_socket(g, p)?;
            }
        }
        Ok(kind)
    }

    /// Serve `dev` as an NBD export; a TCP port 0 becomes the bound port in `kind`. A new
    /// Unix-socket listener gets `perms` (an existing one keeps its own).
    pub(crate) fn start_nbd(
        &self,
        disk: &str,
        dev: Arc<dyn BlockDevice>,
        stats: Arc<DiskStats>,
        kind: &mut ExportKind,
        perms: &nvmux_core::unixsock::SocketPerms,
    ) -> Result<NbdHandle> {
        let l = listen_of(kind)?;
        let ExportKind::Nbd {
            export_name,
            read_only,
            listen,
            ..
        } = kind
        else {
            return Err(err(ErrorKind::InvalidArgument, "not an nbd export"));
        };
        let export = nvmux_nbd::Export::new(
            export_name,
            &format!("nvmux disk {disk}"),
            dev,
            *read_only,
            stats,
        );
        let mut servers = self.nbd.lock().unwrap_or_else(|e| e.into_inner());
        let fixed_port = !matches!(&l, Listen::Tcp(a) if a.port() == 0);
        let mut key = key_of(&l);
        let started = if fixed_port && servers.contains_key(&key) {
            false
        } else {
            if let Listen::Unix(p) = &l {
                crate::claim_socket(p)?;
            }
            let srv = NbdServer::start(l, perms, self.workers.workers().to_vec())?;
            key = key_of(srv.listen());
            if let (Listen::Tcp(a), Some(slot)) = (srv.listen(), listen.as_mut()) {
                *slot = a.to_string();
            }
            servers.insert(key.clone(), srv);
            true
        };
        let srv = servers
            .get(&key)
            .ok_or_else(|| err(ErrorKind::Io, "NBD listener vanished"))?;
        if let Err(e) = srv.add(export.clone()) {
            if started {
                if let Some(s) = servers.remove(&key) {
                    s.stop();
                }
            }
            return Err(e);
        }
        Ok(NbdHandle {
            key,
            name: export.name.clone(),
            export,
        })
    }

    /// Stop a running export: a vhost-user export's listener, or an NBD export (and its
    /// listener with it when it was the last one there).
    pub(crate) fn stop_handle(&self, h: Handle) {
        match h {
            Handle::Vhost(v) => v.stop(),
            Handle::Nbd(n) => {
                let mut servers = self.nbd.lock().unwrap_or_else(|e| e.into_inner());
                let empty = servers.get(&n.key).map(|s| {
                    s.remove(&n.name);
                    s.is_empty()
                });
                if empty == Some(true) {
                    if let Some(s) = servers.remove(&n.key) {
                        s.stop();
                    }
                }
            }
        }
    }
}
