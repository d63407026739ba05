//! NVMe/TCP subsystems in the daemon: create and delete subsystems, add and remove
//! namespaces (disks), manage the host allow-list and the listener address. The specs
//! are persisted in `state.json`; the running objects live in [`nvmux_nvmf::Target`].

use std::collections::BTreeSet;
use std::net::SocketAddr;

use nvmux_core::{Error, ErrorKind, Result};
use nvmux_nvmf::ctrl::MAX_NSID;
use nvmux_nvmf::{Namespace, Subsystem};
use serde::{Deserialize, Serialize};

use crate::{err, Daemon, Inner};

/// The default listener: loopback, the IANA NVMe/TCP port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4420";

/// A namespace as `state.json` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub nsid: u32,
    pub disk: String,
    /// 32 hex digits; also the namespace UUID.
    pub nguid: String,
}

/// A subsystem as `state.json` keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubsystemSpec {
    pub nqn: String,
    pub serial: String,
    pub listen: String,
    #[serde(default)]
    pub allow_any_host: bool,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
}

pub(crate) struct SubsystemEntry {
    pub(crate) spec: SubsystemSpec,
    /// Why the subsystem is not served (its listener could not bind), if it is not.
    pub(crate) error: Option<String>,
}

/// `POST /v1/subsystems` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SubsystemCreate {
    pub nqn: String,
    /// `ADDR:PORT`; default 127.0.0.1:4420.
    #[serde(default)]
    pub listen: Option<String>,
    /// Controller serial number (at most 20 ASCII characters); default derived from the NQN.
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub allow_any_host: bool,
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// `POST /v1/subsystems/{nqn}/namespaces` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NamespaceCreate {
    pub disk: String,
    /// Default: the lowest free id.
    #[serde(default)]
    pub nsid: Option<u32>,
}

/// A namespace as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NamespaceView {
    #[serde(flatten)]
    pub spec: NamespaceSpec,
    /// Bytes, live.
    pub size: u64,
    pub block_size: u32,
}

/// A connected controller.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ControllerView {
    pub cntlid: u16,
    pub host: String,
    pub queues: Vec<u16>,
}

/// A subsystem as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubsystemView {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// The address the listener is bound to.
    pub listen: String,
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    pub namespaces: Vec<NamespaceView>,
    pub controllers: Vec<ControllerView>,
    /// `ok`, or why the subsystem is not served.
    pub status: String,
}

/// Check an NVMe Qualified Name (subsystem or host).
pub fn check_nqn(what: &str, n: &str) -> Result<()> {
    let ok = n.starts_with("nqn.")
        && n.len() <= 223
        && n.bytes().all(|b| b.is_ascii_graphic())
        && n != nvmux_nvmf::DISCOVERY_NQN;
    if ok {
        Ok(())
    } else {
        Err(err(
            ErrorKind::InvalidArgument,
            format!("{what} NQN {n:?} is invalid: it must start with \"nqn.\", be at most 223 printable ASCII characters without spaces, and not be the discovery NQN"),
        ))
    }
}

fn parse_listen(s: &str) -> Result<SocketAddr> {
    s.parse().map_err(|_| {
        err(
            ErrorKind::InvalidArgument,
            format!("listen address {s:?} is not ADDR:PORT (e.g. 127.0.0.1:4420 or [::1]:4420)"),
        )
    })
}

/// A stable default serial number: 16 hex digits of an FNV-1a hash of the NQN.
fn default_serial(nqn: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in nqn.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn parse_nguid(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, o) in b.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(b)
}

fn new_nguid() -> Result<String> {
    let mut b = [0u8; 16];
    nvmux_func::keys::random_bytes(&mut b)?;
    // Shaped as a version 4 UUID, since it is reported as the namespace UUID too.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn not_found(nqn: &str) -> Error {
    err(
        ErrorKind::NotFound,
        format!("subsystem {nqn:?} does not exist"),
    )
}

impl Daemon {
    /// Build a namespace object for a spec from the disk's live device.
    fn namespace(g: &Inner, ns: &NamespaceSpec) -> Result<Namespace> {
        let d = g.disks.get(&ns.disk).ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("disk {:?} does not exist", ns.disk),
            )
        })?;
        let dev = d.dev.as_ref().map_err(|e| {
            err(
                ErrorKind::Io,
                format!("disk {:?} is unavailable: {e}", ns.disk),
            )
        })?;
        let nguid = parse_nguid(&ns.nguid).ok_or_else(|| {
            err(
                ErrorKind::InvalidArgument,
                format!("namespace {} has a malformed NGUID {:?}", ns.nsid, ns.nguid),
            )
        })?;
        Ok(Namespace {
            nsid: ns.nsid,
            disk: ns.disk.clone(),
            dev: dev.clone(),
            stats: d.stats.clone(),
            nguid,
        })
    }

    /// Start serving a subsystem spec: the subsystem, its namespaces, its listener.
    /// Namespaces whose disk is unavailable are skipped with an error in the log.
    pub(crate) fn start_subsystem(&self, g: &Inner, spec: &SubsystemSpec) -> Result<SocketAddr> {
        let sub = Subsystem::new(&spec.nqn, &spec.serial);
        sub.set_hosts(spec.allow_any_host, spec.hosts.iter().cloned().collect());
        for ns in &spec.namespaces {
            match Self::namespace(g, ns).and_then(|n| {
                sub.add_namespace(n)
                    .map_err(|e| err(ErrorKind::InvalidArgument, e))
            }) {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(subsystem = %spec.nqn, nsid = ns.nsid, "namespace not served: {e}")
                }
            }
        }
        let addr = parse_listen(&spec.listen)?;
        self.nvmf.add(sub, addr).map_err(|e| err(ErrorKind::Io, e))
    }

    fn subsystem_view(&self, e: &SubsystemEntry) -> SubsystemView {
        let s = &e.spec;
        let live = self.nvmf.subsystem(&s.nqn);
        let ns = live.as_ref().map(|l| l.namespaces()).unwrap_or_default();
        SubsystemView {
            nqn: s.nqn.clone(),
            serial: s.serial.clone(),
            model: nvmux_nvmf::ctrl::MODEL.into(),
            listen: self
                .nvmf
                .listen_addr(&s.nqn)
                .map_or(s.listen.clone(), |a| a.to_string()),
            allow_any_host: s.allow_any_host,
            hosts: s.hosts.clone(),
            namespaces: s
                .namespaces
                .iter()
                .map(|n| {
                    let (size, block_size) = ns
                        .get(&n.nsid)
                        .map_or((0, 0), |x| (x.dev.capacity_bytes(), x.block_size()));
                    NamespaceView {
                        spec: n.clone(),
                        size,
                        block_size,
                    }
                })
                .collect(),
            controllers: live
                .map(|l| {
                    l.controllers()
                        .iter()
                        .map(|c| ControllerView {
                            cntlid: c.cntlid,
                            host: c.host.clone(),
                            queues: c.qids(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            status: match &e.error {
                None => "ok".into(),
                Some(er) => format!("error: {er}"),
            },
        }
    }

    pub fn subsystems(&self) -> Vec<SubsystemView> {
        let g = self.lock();
        g.subsystems
            .values()
            .map(|e| self.subsystem_view(e))
            .collect()
    }

    pub fn subsystem(&self, nqn: &str) -> Result<SubsystemView> {
        let g = self.lock();
        let e = g.subsystems.get(nqn).ok_or_else(|| not_found(nqn))?;
        Ok(self.subsystem_view(e))
    }

    pub fn create_subsystem(&self, req: SubsystemCreate) -> Result<SubsystemView> {
        check_nqn("subsystem", &req.nqn)?;
        for h in &req.hosts {
            check_nqn("host", h)?;
        }
        let serial = match req.serial {
            Some(s) if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("serial {s:?} must be 1 to 20 printable ASCII characters"),
                ))
            }
            Some(s) => s,
            None => default_serial(&req.nqn),
        };
        let listen = req.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
        parse_listen(&listen)?;
        let mut g = self.lock();
        if g.subsystems.contains_key(&req.nqn) {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!("subsystem {:?} already exists", req.nqn),
            ));
        }
        let mut spec = SubsystemSpec {
            nqn: req.nqn.clone(),
            serial,
            listen,
            allow_any_host: req.allow_any_host,
            hosts: req
                .hosts
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
            namespaces: Vec::new(),
        };
        let bound = self.start_subsystem(&g, &spec)?;
        // Port 0 asked for any port: persist the one we got, so hosts find it after a restart.
        spec.listen = bound.to_string();
        g.subsystems
            .insert(req.nqn.clone(), SubsystemEntry { spec, error: None });
        if let Err(e) = self.persist(&g) {
            g.subsystems.remove(&req.nqn);
            self.nvmf.remove(&req.nqn);
            return Err(e);
        }
        tracing::info!(subsystem = %req.nqn, listen = %bound, "subsystem created");
        Ok(self.subsystem_view(&g.subsystems[&req.nqn]))
    }

    pub fn delete_subsystem(&self, nqn: &str) -> Result<()> {
        let mut g = self.lock();
        let e = g.subsystems.remove(nqn).ok_or_else(|| not_found(nqn))?;
        if let Err(er) = self.persist(&g) {
            g.subsystems.insert(nqn.to_string(), e);
            return Err(er);
        }
        self.nvmf.remove(nqn);
        tracing::info!(
            subsystem = nqn,
            "subsystem deleted; its connections are closed"
        );
        Ok(())
    }

    /// Apply a change to a subsystem's spec: persist it, or roll back and fail.
    fn update_subsystem(
        &self,
        g: &mut Inner,
        nqn: &str,
        f: impl FnOnce(&mut SubsystemSpec) -> Result<()>,
    ) -> Result<SubsystemSpec> {
        let e = g.subsystems.get_mut(nqn).ok_or_else(|| not_found(nqn))?;
        let old = e.spec.clone();
        f(&mut e.spec)?;
        if let Err(er) = self.persist(g) {
            if let Some(e) = g.subsystems.get_mut(nqn) {
                e.spec = old;
            }
            return Err(er);
        }
        Ok(g.subsystems[nqn].spec.clone())
    }

    pub fn add_namespace(&self, nqn: &str, req: NamespaceCreate) -> Result<NamespaceView> {
        let mut g = self.lock();
        let spec = &g.subsystems.get(nqn).ok_or_else(|| not_found(nqn))?.spec;
        let nsid = match req.nsid {
            Some(n) if n == 0 || n > MAX_NSID => {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("namespace id {n} is outside 1..={MAX_NSID}"),
                ))
            }
            Some(n) if spec.namespaces.iter().any(|x| x.nsid == n) => {
                return Err(err(
                    ErrorKind::AlreadyExists,
                    format!("namespace {n} already exists in {nqn}"),
                ))
            }
            Some(n) => n,
            None => (1..=MAX_NSID)
                .find(|n| !spec.namespaces.iter().any(|x| x.nsid == *n))
                .ok_or_else(|| err(ErrorKind::InvalidArgument, format!("{nqn} is full")))?,
        };
        if let Some(x) = spec.namespaces.iter().find(|x| x.disk == req.disk) {
            return Err(err(
                ErrorKind::AlreadyExists,
                format!(
                    "disk {:?} is already namespace {} of {nqn}",
                    req.disk, x.nsid
                ),
            ));
        }
        let ns = NamespaceSpec {
            nsid,
            disk: req.disk.clone(),
            nguid: new_nguid()?,
        };
        let obj = Self::namespace(&g, &ns)?;
        let view = NamespaceView {
            size: obj.dev.capacity_bytes(),
            block_size: obj.block_size(),
            spec: ns.clone(),
        };
        let ns2 = ns.clone();
        self.update_subsystem(&mut g, nqn, |s| {
            s.namespaces.push(ns2);
            s.namespaces.sort_by_key(|n| n.nsid);
            Ok(())
        })?;
        if let Some(sub) = self.nvmf.subsystem(nqn) {
            if let Err(e) = sub.add_namespace(obj) {
                tracing::error!(subsystem = nqn, "{e}");
            }
        }
        tracing::info!(subsystem = nqn, nsid, disk = %req.disk, "namespace added");
        Ok(view)
    }

    pub fn remove_namespace(&self, nqn: &str, nsid: u32) -> Result<()> {
        let mut g = self.lock();
        self.update_subsystem(&mut g, nqn, |s| {
            let n = s.namespaces.len();
            s.namespaces.retain(|x| x.nsid != nsid);
            if s.namespaces.len() == n {
                return Err(err(
                    ErrorKind::NotFound,
                    format!("namespace {nsid} does not exist in {nqn}"),
                ));
            }
            Ok(())
        })?;
        if let Some(sub) = self.nvmf.subsystem(nqn) {
            sub.remove_namespace(nsid);
        }
        tracing::info!(subsystem = nqn, nsid, "namespace removed");
        Ok(())
    }

    /// Add (`allow`) or remove a host NQN; `any` allows every host.
    pub fn set_host(&self, nqn: &str, host: &str, allow: bool) -> Result<SubsystemView> {
        if host != "any" {
            check_nqn("host", host)?;
        }
        let mut g = self.lock();
        let spec = self.update_subsystem(&mut g, nqn, |s| {
            if host == "any" {
                s.allow_any_host = allow;
            } else if allow {
                if !s.hosts.iter().any(|h| h == host) {
                    s.hosts.push(host.to_string());
                    s.hosts.sort();
                }
            } else {
                let n = s.hosts.len();
                s.hosts.retain(|h| h != host);
                if n == s.hosts.len() {
                    return Err(err(
                        ErrorKind::NotFound,
                        format!("host {host:?} is not on the allow-list of {nqn}"),
                    ));
                }
            }
            Ok(())
        })?;
        if let Some(sub) = self.nvmf.subsystem(nqn) {
            sub.set_hosts(spec.allow_any_host, spec.hosts.iter().cloned().collect());
        }
        self.nvmf.changed();
        tracing::info!(
            subsystem = nqn,
            host,
            allow,
            "host access changed (connected hosts stay connected)"
        );
        Ok(self.subsystem_view(&g.subsystems[nqn]))
    }

    pub fn set_listen(&self, nqn: &str, listen: &str) -> Result<SubsystemView> {
        let addr = parse_listen(listen)?;
        let mut g = self.lock();
        if !g.subsystems.contains_key(nqn) {
            return Err(not_found(nqn));
        }
        let bound = self
            .nvmf
            .set_listen(nqn, addr)
            .map_err(|e| err(ErrorKind::Io, e))?;
        self.update_subsystem(&mut g, nqn, |s| {
            s.listen = bound.to_string();
            Ok(())
        })?;
        tracing::info!(subsystem = nqn, listen = %bound, "subsystem listener changed");
        Ok(self.subsystem_view(&g.subsystems[nqn]))
    }

    /// Namespaces that serve `disk`, as (subsystem, nsid).
    pub(crate) fn namespaces_of(g: &Inner, disk: &str) -> Vec<(String, u32)> {
        g.subsystems
            .values()
            .flat_map(|e| {
                e.spec
                    .namespaces
                    .iter()
                    .filter(|n| n.disk == disk)
                    .map(|n| (e.spec.nqn.clone(), n.nsid))
            })
            .collect()
    }

    /// A disk's size changed: hosts get a namespace-attribute-changed event.
    pub(crate) fn notify_namespaces(&self, g: &Inner, disk: &str) {
        for (nqn, nsid) in Self::namespaces_of(g, disk) {
            if let Some(s) = self.nvmf.subsystem(&nqn) {
                s.ns_changed(nsid);
                tracing::info!(disk, subsystem = %nqn, nsid, "hosts notified of the new size");
            }
        }
    }
}
