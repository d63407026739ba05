//! NVMe/TCP subsystems in the daemon: create and delete subsystems, add and remove
//! namespaces (disks), manage the host allow-list (with each host's DH-HMAC-CHAP secrets)
//! and the listener address. The specs are persisted in `state.json` (mode 0600: it holds
//! the secrets, which the API never returns); the running objects live in
//! [`nvmux_nvmf::Target`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nvmux_core::budget::MemBudget;
use nvmux_core::{Error, ErrorKind, Result};
use nvmux_nvmf::auth::{DhGroup, HashFn, HostKeys, Policy, Secret};
use nvmux_nvmf::ctrl::MAX_NSID;
use nvmux_nvmf::{DiscoveryPolicy, Namespace, Subsystem, TargetConfig};
use serde::{Deserialize, Serialize};

use crate::{err, Config, Daemon, Inner};

/// The NVMe/TCP target's limits from the configuration (`[nvmf]`, `[network]`).
pub(crate) fn target_config(cfg: &Config, mem: &Arc<MemBudget>) -> TargetConfig {
    let n = &cfg.nvmf;
    TargetConfig {
        mem: mem.clone(),
        memory_per_connection: n.memory_per_connection as usize,
        max_connections: n.max_connections as usize,
        max_connections_per_host: n.max_connections_per_host as usize,
        handshake_timeout: Duration::from_millis(n.handshake_timeout_ms),
        stall_timeout: Duration::from_millis(n.stall_timeout_ms),
        discovery: DiscoveryPolicy::parse(&n.discovery).unwrap_or_default(),
    }
}

/// A host's DH-HMAC-CHAP secrets as `state.json` keeps them, in nvme-cli's `DHHC-1:`
/// form. Never returned by the API.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostSecrets {
    /// Authenticates the host.
    pub dhchap_secret: String,
    /// Authenticates the controller to the host (bidirectional authentication).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhchap_ctrl_secret: Option<String>,
}

/// A new random secret in `DHHC-1:` form: `transform` 0 (none) or 1/2/3 (SHA-256/384/512
/// over the NQN), `len` 32, 48 or 64 bytes (what `nvme gen-dhchap-key` makes).
pub fn generate_secret(transform: u8, len: usize) -> Result<String> {
    Secret::generate(transform, len)
        .map(|s| s.encode())
        .map_err(|e| err(ErrorKind::InvalidArgument, e))
}

fn check_secret(what: &str, host: &str, s: &str) -> Result<Secret> {
    Secret::parse(s).map_err(|e| {
        err(
            ErrorKind::InvalidArgument,
            format!("{what} for host {host:?} is not a valid DH-HMAC-CHAP secret: {e} (make one with `nvmux subsystem gen-secret` or `nvme gen-dhchap-key`)"),
        )
    })
}

/// Check hash and DH group names; an empty list means the default.
fn check_policy(hashes: &[String], groups: &[String]) -> Result<Policy> {
    let mut p = Policy::default();
    if !hashes.is_empty() {
        p.hashes = parse_names(hashes, HashFn::parse, |h| {
            format!("DH-HMAC-CHAP hash {h:?} is not sha256, sha384 or sha512")
        })?;
    }
    if !groups.is_empty() {
        p.dhgroups = parse_names(groups, DhGroup::parse, |g| {
            format!("DH group {g:?} is not null, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144 or ffdhe8192")
        })?;
    }
    let dup_h = p.hashes.len() != p.hashes.iter().collect::<BTreeSet<_>>().len();
    let dup_g = p.dhgroups.len() != p.dhgroups.iter().collect::<BTreeSet<_>>().len();
    if dup_h || dup_g {
        return Err(err(
            ErrorKind::InvalidArgument,
            "a DH-HMAC-CHAP hash or DH group is listed twice",
        ));
    }
    Ok(p)
}

/// Every name parsed, or the first that does not parse, with its message.
fn parse_names<T>(
    names: &[String],
    parse: impl Fn(&str) -> Option<T>,
    bad: impl Fn(&str) -> String,
) -> Result<Vec<T>> {
    names
        .iter()
        .map(|n| parse(n).ok_or_else(|| err(ErrorKind::InvalidArgument, bad(n))))
        .collect()
}

/// The running subsystem's view of who may connect and how, from its spec. A host whose
/// stored secret no longer parses is left out (it cannot connect), with an error logged.
fn apply_access(sub: &Subsystem, spec: &SubsystemSpec) {
    let mut hosts: BTreeSet<String> = spec.hosts.iter().cloned().collect();
    let mut keys = BTreeMap::new();
    for (h, sec) in &spec.host_secrets {
        let parsed = Secret::parse(&sec.dhchap_secret).and_then(|host| {
            let ctrl = sec
                .dhchap_ctrl_secret
                .as_deref()
                .map(Secret::parse)
                .transpose()?;
            Ok(HostKeys { host, ctrl })
        });
        match parsed {
            Ok(k) => {
                keys.insert(h.clone(), Arc::new(k));
            }
            Err(e) => {
                tracing::error!(subsystem = %spec.nqn, host = %h, "stored DH-HMAC-CHAP secret unusable ({e}): the host cannot connect until it is set again");
                hosts.remove(h);
            }
        }
    }
    let policy = check_policy(&spec.dhchap_hashes, &spec.dhchap_dhgroups).unwrap_or_else(|e| {
        tracing::error!(subsystem = %spec.nqn, "DH-HMAC-CHAP policy ignored: {e}");
        Policy::default()
    });
    sub.set_hosts(spec.allow_any_host, hosts);
    sub.set_host_keys(keys);
    sub.set_auth(spec.require_auth, policy);
}

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
    /// DH-HMAC-CHAP secrets of hosts on `hosts` (a host with a secret must authenticate).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_secrets: BTreeMap<String, HostSecrets>,
    /// Every host must authenticate (hosts without a secret are refused).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_auth: bool,
    /// Hashes the controller may pick, most preferred first (empty: the default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dhchap_hashes: Vec<String>,
    /// DH groups the controller may pick, most preferred first (empty: the default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dhchap_dhgroups: Vec<String>,
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
    /// Every host must authenticate with DH-HMAC-CHAP.
    #[serde(default)]
    pub require_auth: bool,
    /// Hashes the controller may pick, most preferred first.
    #[serde(default)]
    pub dhchap_hashes: Vec<String>,
    /// DH groups the controller may pick, most preferred first.
    #[serde(default)]
    pub dhchap_dhgroups: Vec<String>,
}

/// `POST /v1/subsystems/{nqn}/hosts` body.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HostAllow {
    /// Host NQN, or `any`.
    pub host: String,
    /// The host's DH-HMAC-CHAP secret (`DHHC-1:...`): the host must authenticate.
    #[serde(default)]
    pub dhchap_secret: Option<String>,
    /// The controller's secret for this host: bidirectional authentication.
    #[serde(default)]
    pub dhchap_ctrl_secret: Option<String>,
    /// Drop the host's secrets (it no longer authenticates).
    #[serde(default)]
    pub remove_dhchap: bool,
}

/// `POST /v1/subsystems/{nqn}/auth` body: what is absent stays as it is.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SubsystemAuth {
    #[serde(default)]
    pub require_auth: Option<bool>,
    /// Empty: back to the default.
    #[serde(default)]
    pub dhchap_hashes: Option<Vec<String>>,
    #[serde(default)]
    pub dhchap_dhgroups: Option<Vec<String>>,
}

/// A host's authentication as the API shows it (whether secrets are set, never them).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostAuthView {
    pub host: String,
    /// The host must authenticate (it has a DH-HMAC-CHAP secret).
    pub dhchap: bool,
    /// The controller authenticates itself to the host too, when the host asks.
    pub bidirectional: bool,
}

/// NVMe/TCP counters (`GET /v1/stats`, `nvmf`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NvmfStatsView {
    pub discovery: String,
    pub listeners: Vec<ListenerView>,
    pub handshake_timeouts: u64,
    pub stall_timeouts: u64,
    pub kato_expired: u64,
    pub protocol_errors: u64,
    pub auth_succeeded: u64,
    pub auth_failed: u64,
    /// Times a connection waited for buffer memory.
    pub memory_waits: u64,
}

/// A listener's connection counts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListenerView {
    pub listen: String,
    pub connections: usize,
    pub refused: u64,
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
    /// Which hosts must authenticate (DH-HMAC-CHAP), and bidirectionally.
    pub host_auth: Vec<HostAuthView>,
    /// Every host must authenticate.
    pub require_auth: bool,
    /// Hashes and DH groups the controller picks from, most preferred first.
    pub dhchap_hashes: Vec<String>,
    pub dhchap_dhgroups: Vec<String>,
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
        apply_access(&sub, spec);
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
            host_auth: s
                .host_secrets
                .iter()
                .map(|(h, k)| HostAuthView {
                    host: h.clone(),
                    dhchap: true,
                    bidirectional: k.dhchap_ctrl_secret.is_some(),
                })
                .collect(),
            require_auth: s.require_auth,
            dhchap_hashes: {
                let p = check_policy(&s.dhchap_hashes, &s.dhchap_dhgroups).unwrap_or_default();
                p.hashes.iter().map(|h| h.name().to_string()).collect()
            },
            dhchap_dhgroups: {
                let p = check_policy(&s.dhchap_hashes, &s.dhchap_dhgroups).unwrap_or_default();
                p.dhgroups.iter().map(|g| g.name().to_string()).collect()
            },
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
        check_policy(&req.dhchap_hashes, &req.dhchap_dhgroups)?;
        if req.require_auth && req.allow_any_host {
            return Err(err(
                ErrorKind::InvalidArgument,
                "a subsystem that requires authentication cannot admit any host: each host needs its own DH-HMAC-CHAP secret",
            ));
        }
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
            host_secrets: BTreeMap::new(),
            require_auth: req.require_auth,
            dhchap_hashes: req.dhchap_hashes.clone(),
            dhchap_dhgroups: req.dhchap_dhgroups.clone(),
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

    /// Add a host NQN to the allow-list (`any`: every host), with or without
    /// DH-HMAC-CHAP secrets. For a host already on the list, given secrets replace its
    /// secrets, `remove_dhchap` drops them, and otherwise they stay.
    pub fn allow_host(&self, nqn: &str, req: HostAllow) -> Result<SubsystemView> {
        let host = req.host.as_str();
        let any = host == "any";
        if !any {
            check_nqn("host", host)?;
        }
        let secret = req
            .dhchap_secret
            .as_deref()
            .map(|s| check_secret("the secret", host, s))
            .transpose()?;
        let ctrl = req
            .dhchap_ctrl_secret
            .as_deref()
            .map(|s| check_secret("the controller secret", host, s))
            .transpose()?;
        if any && (secret.is_some() || ctrl.is_some()) {
            return Err(err(
                ErrorKind::InvalidArgument,
                "secrets are set per host NQN, not for `any`",
            ));
        }
        if ctrl.is_some() && secret.is_none() {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!("a controller secret for host {host:?} needs a host secret too (--dhchap-secret): the controller authenticates itself only to a host that authenticated"),
            ));
        }
        if let (Some(h), Some(c)) = (&secret, &ctrl) {
            if h.encode() == c.encode() {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("the host and controller secrets of {host:?} must differ (one secret for both directions allows reflection attacks)"),
                ));
            }
        }
        if req.remove_dhchap && secret.is_some() {
            return Err(err(
                ErrorKind::InvalidArgument,
                "remove_dhchap and a new secret contradict each other",
            ));
        }
        let mut g = self.lock();
        let spec = self.update_subsystem(&mut g, nqn, |s| {
            if any {
                if s.require_auth {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        format!("{nqn} requires authentication: every host needs its own secret, so `any` cannot be allowed"),
                    ));
                }
                s.allow_any_host = true;
                return Ok(());
            }
            if !s.hosts.iter().any(|h| h == host) {
                s.hosts.push(host.to_string());
                s.hosts.sort();
            }
            if let Some(sec) = &req.dhchap_secret {
                s.host_secrets.insert(
                    host.to_string(),
                    HostSecrets {
                        dhchap_secret: sec.trim().to_string(),
                        dhchap_ctrl_secret: req.dhchap_ctrl_secret.as_ref().map(|c| c.trim().to_string()),
                    },
                );
            } else if req.remove_dhchap {
                if s.require_auth {
                    return Err(err(
                        ErrorKind::InvalidArgument,
                        format!("{nqn} requires authentication: host {host:?} cannot do without a secret (deny-host removes it)"),
                    ));
                }
                s.host_secrets.remove(host);
            }
            Ok(())
        })?;
        if let Some(sub) = self.nvmf.subsystem(nqn) {
            apply_access(&sub, &spec);
        }
        self.nvmf.changed();
        tracing::info!(
            subsystem = nqn,
            host,
            dhchap = spec.host_secrets.contains_key(host),
            bidirectional = spec
                .host_secrets
                .get(host)
                .is_some_and(|k| k.dhchap_ctrl_secret.is_some()),
            "host allowed (connected hosts keep their connections)"
        );
        Ok(self.subsystem_view(&g.subsystems[nqn]))
    }

    /// Remove a host NQN (and its secrets) from the allow-list; `any` stops admitting
    /// every host. Connected hosts stay connected.
    pub fn deny_host(&self, nqn: &str, host: &str) -> Result<SubsystemView> {
        if host != "any" {
            check_nqn("host", host)?;
        }
        let mut g = self.lock();
        let spec = self.update_subsystem(&mut g, nqn, |s| {
            if host == "any" {
                s.allow_any_host = false;
                return Ok(());
            }
            let n = s.hosts.len();
            s.hosts.retain(|h| h != host);
            s.host_secrets.remove(host);
            if n == s.hosts.len() {
                return Err(err(
                    ErrorKind::NotFound,
                    format!("host {host:?} is not on the allow-list of {nqn}"),
                ));
            }
            Ok(())
        })?;
        if let Some(sub) = self.nvmf.subsystem(nqn) {
            apply_access(&sub, &spec);
        }
        self.nvmf.changed();
        tracing::info!(
            subsystem = nqn,
            host,
            "host removed from the allow-list (connected hosts stay connected)"
        );
        Ok(self.subsystem_view(&g.subsystems[nqn]))
    }

    /// Require authentication of every host or not, and choose the hashes and DH groups.
    pub fn set_subsystem_auth(&self, nqn: &str, req: SubsystemAuth) -> Result<SubsystemView> {
        let mut g = self.lock();
        let spec = self.update_subsystem(&mut g, nqn, |s| {
            if let Some(h) = &req.dhchap_hashes {
                s.dhchap_hashes = h.clone();
            }
            if let Some(d) = &req.dhchap_dhgroups {
                s.dhchap_dhgroups = d.clone();
            }
            check_policy(&s.dhchap_hashes, &s.dhchap_dhgroups)?;
            if let Some(r) = req.require_auth {
                s.require_auth = r;
            }
            if s.require_auth && s.allow_any_host {
                return Err(err(
                    ErrorKind::InvalidArgument,
                    format!("{nqn} admits any host: deny-host {nqn} any first (each host needs its own secret)"),
                ));
            }
            Ok(())
        })?;
        if let Some(sub) = self.nvmf.subsystem(nqn) {
            apply_access(&sub, &spec);
        }
        tracing::info!(
            subsystem = nqn,
            require_auth = spec.require_auth,
            "authentication settings changed (connected hosts keep their connections)"
        );
        Ok(self.subsystem_view(&g.subsystems[nqn]))
    }

    /// NVMe/TCP counters and listener counts.
    pub fn nvmf_stats(&self) -> NvmfStatsView {
        let t = self.nvmf.stats();
        NvmfStatsView {
            discovery: self.nvmf.discovery_policy().name().into(),
            listeners: t
                .listeners
                .iter()
                .map(|l| ListenerView {
                    listen: l.addr.to_string(),
                    connections: l.open,
                    refused: l.refused,
                })
                .collect(),
            handshake_timeouts: t.handshake_timeouts,
            stall_timeouts: t.stall_timeouts,
            kato_expired: t.kato_expired,
            protocol_errors: t.protocol_errors,
            auth_succeeded: t.auth_ok,
            auth_failed: t.auth_failed,
            memory_waits: t.mem_waits,
        }
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
