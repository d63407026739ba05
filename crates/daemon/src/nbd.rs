//! NBD exports: disks served by the `nbd` room's listeners. Exports that name the same
//! socket or address share one listener, and so its TLS settings and limits, and are told
//! apart by their export names (`nbdinfo --list` shows them all).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nvmux_core::stats::DiskStats;
use nvmux_core::{BlockDevice, ErrorKind, Result};
use nvmux_nbd::{Listen, NbdServer, ServerConfig, TlsCreds, TlsServer};
use serde::{Deserialize, Serialize};

use crate::{err, Daemon, ExportCreate, ExportKind, Handle, Inner};

/// A running NBD export: where its listener is, and the export it holds there.
pub(crate) struct NbdHandle {
    key: String,
    name: String,
    pub export: Arc<nvmux_nbd::Export>,
}

/// One NBD listener and the TLS settings its exports share.
pub(crate) struct NbdListener {
    pub(crate) srv: NbdServer,
    tls: Option<NbdTls>,
}

/// TLS of an NBD export (API and `state.json`): exactly one of `psk_file` (psktool's
/// `identity:hexkey` lines, as `qemu-nbd --object tls-creds-psk` and `nbdkit --tls-psk`
/// read them) and `x509_dir` (`server-cert.pem`, `server-key.pem`, `ca-cert.pem`, as
/// `tls-creds-x509` and `nbdkit --tls-certificates` lay them out). With TLS, the listener
/// requires it of every client (NBD's FORCEDTLS mode).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NbdTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_dir: Option<PathBuf>,
    /// X.509: require a client certificate signed by `ca-cert.pem`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify_peer: bool,
}

impl NbdTls {
    /// The credentials, or why these settings are not valid.
    pub fn creds(&self) -> Result<TlsCreds> {
        match (&self.psk_file, &self.x509_dir) {
            (Some(_), _) if self.verify_peer => Err(err(
                ErrorKind::InvalidArgument,
                "tls.verify_peer is for X.509 (x509_dir); a PSK already authenticates the client",
            )),
            (Some(f), None) => Ok(TlsCreds::Psk { file: f.clone() }),
            (None, Some(d)) => Ok(TlsCreds::X509 {
                dir: d.clone(),
                verify_peer: self.verify_peer,
            }),
            _ => Err(err(
                ErrorKind::InvalidArgument,
                "tls needs exactly one of psk_file (a psktool key file) and x509_dir (a directory with server-cert.pem and server-key.pem)",
            )),
        }
    }

    fn describe(this: Option<&NbdTls>) -> String {
        match this.map(|t| t.creds()) {
            None => "no TLS".into(),
            Some(Ok(c)) => c.to_string(),
            Some(Err(_)) => "invalid TLS settings".into(),
        }
    }
}

/// `GET /v1/nbd`: the NBD listeners (the memory budget they share with NVMe/TCP is in
/// `GET /v1/stats`, `network`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NbdView {
    pub listeners: Vec<NbdListenerView>,
}

/// One NBD listener: its address, TLS, limits and counters.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NbdListenerView {
    /// The socket path, or the TCP address with its bound port.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NbdTls>,
    /// The export names served there.
    pub exports: Vec<String>,
    /// The largest read or write a connection takes (the advertised maximum block size).
    pub max_io: u32,
    /// Connections held now, negotiating or transmitting.
    pub connections: u64,
    pub negotiating: u64,
    /// Connections closed at accept (beyond `max_connections` or
    /// `max_connections_per_host`).
    pub refused: u64,
    pub handshake_timeouts: u64,
    pub negotiation_errors: u64,
    pub tls_failures: u64,
    pub stalls: u64,
    pub memory_waits: u64,
}

impl ExportKind {
    /// The Unix socket the export listens on, if it has one.
    pub fn socket(&self) -> Option<&PathBuf> {
        match self {
            ExportKind::VhostUserBlk { socket, .. } | ExportKind::VfioUser { socket, .. } => {
                Some(socket)
            }
            ExportKind::Nbd { socket, .. } => socket.as_ref(),
        }
    }

    /// Where clients connect, for logs and the CLI.
    pub fn address(&self) -> String {
        match self {
            ExportKind::VhostUserBlk { socket, .. } | ExportKind::VfioUser { socket, .. } => {
                socket.display().to_string()
            }
            ExportKind::Nbd {
                socket: Some(s),
                export_name,
                tls,
                ..
            } => {
                let sch = if tls.is_some() { "nbds" } else { "nbd" };
                format!("{sch}+unix:///{export_name}?socket={}", s.display())
            }
            ExportKind::Nbd {
                listen: Some(a),
                export_name,
                tls,
                ..
            } => {
                let sch = if tls.is_some() { "nbds" } else { "nbd" };
                format!("{sch}://{a}/{export_name}")
            }
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
            "an nbd export needs exactly one of socket (a Unix socket path) and listen (a TCP ADDR:PORT: loopback, or any address with tls)",
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
        if let Some(t) = &req.tls {
            t.creds()?;
        }
        let kind = ExportKind::Nbd {
            socket: req.socket.clone(),
            listen: req.listen.clone(),
            export_name,
            read_only: req.read_only,
            tls: req.tls.clone(),
        };
        let l = listen_of(&kind)?;
        if let (Listen::Tcp(a), None) = (&l, &req.tls) {
            if !a.ip().is_loopback() {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("NBD on {a}: without TLS, NBD gives anyone who reaches the port the whole disk, so nvmux listens on loopback addresses (127.0.0.1, ::1) and Unix sockets only; give the export tls settings (a PSK file or an X.509 directory) to listen on {a}"),
                ));
            }
        }
        let servers = self.nbd.lock().unwrap_or_else(|e| e.into_inner());
        match servers.get(&key_of(&l)) {
            Some(s) => check_same_tls(&l, s, req.tls.as_ref())?,
            None => {
                drop(servers);
                if let Listen::Unix(p) = &l {
                    self.check_new_socket(g, p)?;
                }
            }
        }
        Ok(kind)
    }

    /// The NBD listeners (`GET /v1/nbd`).
    pub fn nbd_view(&self) -> NbdView {
        let listeners = self
            .nbd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|l| {
                let st = l.srv.stats();
                NbdListenerView {
                    address: l.srv.listen().to_string(),
                    tls: l.tls.clone(),
                    exports: l.srv.names(),
                    max_io: l.srv.max_io(),
                    connections: st.connections,
                    negotiating: st.negotiating,
                    refused: st.refused,
                    handshake_timeouts: st.handshake_timeouts,
                    negotiation_errors: st.negotiation_errors,
                    tls_failures: st.tls_failures,
                    stalls: st.stalls,
                    memory_waits: st.memory_waits,
                }
            })
            .collect();
        NbdView { listeners }
    }

    /// The listener settings `[nbd]` gives, with TLS.
    fn nbd_server_config(&self, tls: Option<Arc<TlsServer>>) -> ServerConfig {
        let c = &self.cfg.nbd;
        ServerConfig {
            max_connections: c.max_connections as usize,
            max_connections_per_host: c.max_connections_per_host as usize,
            memory_per_connection: usize::try_from(c.memory_per_connection).unwrap_or(usize::MAX),
            budget: self.net_mem.clone(),
            handshake_timeout: Duration::from_millis(c.handshake_timeout_ms),
            stall_timeout: Duration::from_millis(c.stall_timeout_ms),
            tls,
        }
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
            tls,
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
        let started = if let (true, Some(s)) = (fixed_port, servers.get(&key)) {
            check_same_tls(&l, s, tls.as_ref())?;
            false
        } else {
            // Credentials are read now, with errors that name the file.
            let server_tls = match tls {
                Some(t) => Some(TlsServer::load(&t.creds()?)?),
                None => None,
            };
            if let Listen::Unix(p) = &l {
                if !nvmux_core::unixsock::is_inherited(&nvmux_core::unixsock::unix_key(p)) {
                    crate::claim_socket(p)?;
                }
            }
            let summary = server_tls.as_ref().map(|t| t.summary().to_string());
            let srv = NbdServer::start(
                l,
                perms,
                self.workers.placement(),
                self.nbd_server_config(server_tls),
            )?;
            key = key_of(srv.listen());
            if let (Listen::Tcp(a), Some(slot)) = (srv.listen(), listen.as_mut()) {
                *slot = a.to_string();
            }
            tracing::info!(listen = %srv.listen(), tls = summary.as_deref().unwrap_or("none"), max_io = srv.max_io(), "nbd: listening");
            servers.insert(
                key.clone(),
                NbdListener {
                    srv,
                    tls: tls.clone(),
                },
            );
            true
        };
        let srv = &servers
            .get(&key)
            .ok_or_else(|| err(ErrorKind::Io, "NBD listener vanished"))?
            .srv;
        if let Err(e) = srv.add(export.clone()) {
            if started {
                if let Some(s) = servers.remove(&key) {
                    s.srv.stop();
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
            Handle::VfioUser(v) => v.stop(),
            Handle::Nbd(n) => {
                let mut servers = self.nbd.lock().unwrap_or_else(|e| e.into_inner());
                let empty = servers.get(&n.key).map(|s| {
                    s.srv.remove(&n.name);
                    s.srv.is_empty()
                });
                if empty == Some(true) {
                    if let Some(s) = servers.remove(&n.key) {
                        s.srv.stop();
                    }
                }
            }
        }
    }
}

/// Exports on one address share its listener, so they share its TLS settings.
fn check_same_tls(l: &Listen, s: &NbdListener, tls: Option<&NbdTls>) -> Result<()> {
    if s.tls.as_ref() == tls {
        return Ok(());
    }
    Err(err(
        ErrorKind::InvalidArgument,
        format!(
            "the NBD listener on {l} serves its exports with {}, and this export asks for {}: exports on one address share its TLS settings; give this export the same tls, or another address",
            NbdTls::describe(s.tls.as_ref()),
            NbdTls::describe(tls)
        ),
    ))
}
