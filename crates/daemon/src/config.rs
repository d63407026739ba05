//! Daemon configuration (TOML). Every field has a default; with no file at all the
//! embedded default below is used. See docs/config.md for the table of fields.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The configuration used when `nvmux serve` gets no `--config`.
pub const EMBEDDED_DEFAULT: &str = r#"
# nvmux embedded default configuration
data_dir = "./nvmux-data"

[workers]
threads = 1
poll_idle_us = 50
"#;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where state.json, the API socket and default disk images live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// API socket path; default `<data_dir>/nvmux.sock`.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    #[serde(default)]
    pub workers: WorkersConfig,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub qos: QosConfig,
    /// Who may use the API socket (`[api]`).
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub nvmf: NvmfConfig,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    /// The Ceph cluster RBD disks live in (`[rbd]`).
    #[serde(default)]
    pub rbd: RbdConfig,
}

/// How nvmux reaches the Ceph cluster of its RBD disks (`[rbd]`). Every field is
/// optional: without them librados' own defaults apply (`$CEPH_CONF`, then
/// `/etc/ceph/ceph.conf`, the keyring that file names, client `admin`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdConfig {
    /// The cluster's ceph.conf.
    #[serde(default)]
    pub conf: Option<PathBuf>,
    /// The cephx client id (without `client.`); default `admin`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The client's keyring file.
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// Monitor addresses, overriding the conf file's.
    #[serde(default)]
    pub mon_host: Option<String>,
    /// An OSD or monitor operation that takes longer than this (ms) fails with a
    /// retryable error instead of waiting; 0 waits as long as librbd does (for ever).
    #[serde(default)]
    pub op_timeout_ms: Option<u64>,
}

/// Default of `rbd.op_timeout_ms`: an OSD outage shorter than this stalls I/O and then
/// completes; a longer one fails commands with a retryable status.
pub const RBD_OP_TIMEOUT_MS: u64 = 60_000;

impl RbdConfig {
    /// The backend's connection settings.
    pub fn backend(&self) -> nvmux_backend::rbd::RbdConfig {
        nvmux_backend::rbd::RbdConfig {
            conf: self.conf.clone(),
            client_id: self.client_id.clone().unwrap_or_else(|| "admin".into()),
            keyring: self.keyring.clone(),
            mon_host: self.mon_host.clone(),
            op_timeout: std::time::Duration::from_millis(
                self.op_timeout_ms.unwrap_or(RBD_OP_TIMEOUT_MS),
            ),
        }
    }
}

/// Thin pools (`[pool]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// A command parked in a pool (waiting for clusters, for an allocation of the same
    /// cluster, for a snapshot's quiesce, for a journal commit) longer than this (ms) is
    /// failed; a snapshot whose writes in flight do not drain within it is refused.
    #[serde(default = "thirty_seconds_ms")]
    pub command_timeout_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            command_timeout_ms: thirty_seconds_ms(),
        }
    }
}

/// A byte count in the file: an integer, or a string with a unit ("64M", "1GiB").
fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        N(u64),
        S(String),
    }
    match V::deserialize(d)? {
        V::N(n) => Ok(n),
        V::S(s) => nvmux_core::parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// Limits shared by the network frontends (NVMe/TCP and NBD).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Bytes of buffers all NVMe/TCP and NBD connections may hold together. A connection
    /// that cannot get more waits (stops reading) until some comes back.
    #[serde(default = "one_gib", deserialize_with = "size")]
    pub memory_budget: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            memory_budget: one_gib(),
        }
    }
}

fn one_gib() -> u64 {
    1 << 30
}

/// Limits of the NVMe/TCP target's listeners and connections.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmfConfig {
    /// Connections one listener holds at once (every host together). 0: no limit.
    #[serde(default = "nvmf_max_connections")]
    pub max_connections: u32,
    /// Connections one peer IP address holds at once on one listener. 0: no limit.
    #[serde(default = "nvmf_max_per_host")]
    pub max_connections_per_host: u32,
    /// Buffers one connection may hold (bytes).
    #[serde(default = "nvmf_memory_per_connection", deserialize_with = "size")]
    pub memory_per_connection: u64,
    /// From accept to a completed Fabrics Connect (and authentication), in ms.
    #[serde(default = "ten_seconds_ms")]
    pub handshake_timeout_ms: u64,
    /// A PDU started but not finished, or output the host does not take, for this long
    /// ends the connection (ms).
    #[serde(default = "thirty_seconds_ms")]
    pub stall_timeout_ms: u64,
    /// Who may use the discovery controller: "open" (every host), "allow-list" (hosts on
    /// some subsystem's allow-list) or "closed" (nobody).
    #[serde(default = "nvmf_discovery")]
    pub discovery: String,
    /// The host NQN nvmux's initiator presents to remote targets (remote disks and
    /// mirror legs). Default `nqn.2026-12.io.nvmux:host:<hostname>`.
    #[serde(default)]
    pub hostnqn: Option<String>,
}

impl NvmfConfig {
    /// The initiator's host NQN, defaulted.
    pub fn hostnqn(&self) -> String {
        self.hostnqn.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into());
            format!("nqn.2026-12.io.nvmux:host:{host}")
        })
    }
}

impl Default for NvmfConfig {
    fn default() -> Self {
        NvmfConfig {
            max_connections: nvmf_max_connections(),
            max_connections_per_host: nvmf_max_per_host(),
            memory_per_connection: nvmf_memory_per_connection(),
            handshake_timeout_ms: ten_seconds_ms(),
            stall_timeout_ms: thirty_seconds_ms(),
            discovery: nvmf_discovery(),
            hostnqn: None,
        }
    }
}

fn nvmf_discovery() -> String {
    "allow-list".into()
}

fn nvmf_max_connections() -> u32 {
    2048
}
fn nvmf_max_per_host() -> u32 {
    256
}
fn nvmf_memory_per_connection() -> u64 {
    32 << 20
}
fn ten_seconds_ms() -> u64 {
    10_000
}
fn thirty_seconds_ms() -> u64 {
    30_000
}

/// Limits of the NBD listeners and connections.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// Connections one listener holds at once (negotiating or not). 0: no limit.
    #[serde(default = "nbd_max_connections")]
    pub max_connections: u32,
    /// Connections one peer holds at once on one listener: an IP address on TCP, a user id
    /// on a Unix socket. 0: no limit.
    #[serde(default = "nbd_max_per_host")]
    pub max_connections_per_host: u32,
    /// Buffers one connection may hold (bytes); at least the largest request (32 MiB).
    #[serde(default = "nbd_memory_per_connection", deserialize_with = "size")]
    pub memory_per_connection: u64,
    /// From accept to the end of the negotiation (TLS included), in ms.
    #[serde(default = "ten_seconds_ms")]
    pub handshake_timeout_ms: u64,
    /// A request started but not finished, or output the client does not take, for this
    /// long ends the connection (ms).
    #[serde(default = "thirty_seconds_ms")]
    pub stall_timeout_ms: u64,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            max_connections: nbd_max_connections(),
            max_connections_per_host: nbd_max_per_host(),
            memory_per_connection: nbd_memory_per_connection(),
            handshake_timeout_ms: ten_seconds_ms(),
            stall_timeout_ms: thirty_seconds_ms(),
        }
    }
}

fn nbd_max_connections() -> u32 {
    1024
}
fn nbd_max_per_host() -> u32 {
    64
}
fn nbd_memory_per_connection() -> u64 {
    64 << 20
}

// ---- [api]: the API socket's owner group, mode and allow-list ------------------------

/// A TOML value that may be a number or a string (ids and names; modes).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum NumOrText {
    Num(i64),
    Text(String),
}

/// `[api]`: who may use the API socket. Root and the daemon's own uid always may.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The socket's mode, a string of octal digits ("0660"). Default "0600", or "0660"
    /// when `group` is set.
    #[serde(default)]
    pub mode: Option<NumOrText>,
    /// The socket's group (a name or a gid). Its members may use the API.
    #[serde(default)]
    pub group: Option<NumOrText>,
    /// More users (names or uids) allowed to use the API.
    #[serde(default)]
    pub allow_uids: Vec<NumOrText>,
    /// Groups (names or gids) whose members (primary or supplementary group) may use the
    /// API.
    #[serde(default)]
    pub allow_gids: Vec<NumOrText>,
}

fn config_id(v: &NumOrText, key: &str, user: bool) -> Result<u32, String> {
    match v {
        NumOrText::Num(n) => u32::try_from(*n)
            .ok()
            .filter(|&n| n != u32::MAX)
            .ok_or_else(|| format!("{key}: {n} is not a valid id (0..4294967295)")),
        NumOrText::Text(t) => {
            let r = if user {
                nvmux_core::unixsock::user_id(t)
            } else {
                nvmux_core::unixsock::group_id(t)
            };
            r.map_err(|e| format!("{key}: {}", e.msg))
        }
    }
}

impl ApiConfig {
    /// The socket's permissions and the allow-list, with names resolved (getpwnam_r,
    /// getgrnam_r).
    pub fn access(&self) -> Result<crate::api::ApiAccess, String> {
        use nvmux_core::unixsock::{parse_mode, SocketPerms, DEFAULT_MODE, GROUP_MODE};
        let gid = self
            .group
            .as_ref()
            .map(|g| config_id(g, "api.group", false))
            .transpose()?;
        let mode = match &self.mode {
            None if gid.is_some() => GROUP_MODE,
            None => DEFAULT_MODE,
            Some(NumOrText::Text(m)) => {
                parse_mode(m).map_err(|e| format!("api.mode: {}", e.msg))?
            }
            Some(NumOrText::Num(n)) => {
                return Err(format!(
                "api.mode = {n}: write the mode as a string of octal digits, e.g. mode = \"0660\""
            ))
            }
        };
        if mode & 0o200 == 0 {
            return Err(format!(
                "api.mode = \"{mode:04o}\" does not let the socket's owner (the daemon's user) connect: include 0200"
            ));
        }
        let allow_uids = self
            .allow_uids
            .iter()
            .map(|u| config_id(u, "api.allow_uids", true))
            .collect::<Result<Vec<_>, _>>()?;
        let mut allow_gids = self
            .allow_gids
            .iter()
            .map(|g| config_id(g, "api.allow_gids", false))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(g) = gid {
            if !allow_gids.contains(&g) {
                allow_gids.push(g);
            }
        }
        Ok(crate::api::ApiAccess {
            perms: SocketPerms {
                uid: None,
                gid,
                mode,
            },
            allow_uids,
            allow_gids,
        })
    }
}

// ---- end of [api] ----------------------------------------------------------------------

/// Fair sharing of a host device between the disks on it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosConfig {
    /// How many commands of the disks on one host device may be in flight at once. When
    /// more are ready, slots go to disks by weight (SFQ(D)). 0 turns fair sharing off.
    #[serde(default = "sixty_four")]
    pub fair_depth: u32,
}

impl Default for QosConfig {
    fn default() -> Self {
        QosConfig { fair_depth: 64 }
    }
}

fn sixty_four() -> u32 {
    64
}

/// Where the key-encryption key (KEK) of encrypted disks comes from.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// A file holding the KEK (32 raw bytes or 64 hex digits). Unset: the KEK is read from
    /// the environment variable `NVMUX_KEK` (64 hex digits) when a key is needed.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Number of I/O worker threads.
    #[serde(default = "one")]
    pub threads: usize,
    /// Busy-poll this long after the last request before sleeping (µs).
    #[serde(default = "fifty")]
    pub poll_idle_us: u64,
    /// CPUs to pin workers to (worker i → cpus[i % len]). Empty: no pinning.
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Control-plane threads: vhost-user listening sockets and control connections are
    /// served by this many epoll threads (see `nvmux_core::ctlpoll`).
    #[serde(default = "two")]
    pub control_threads: usize,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            threads: 1,
            poll_idle_us: 50,
            cpus: Vec::new(),
            control_threads: 2,
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./nvmux-data")
}
fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn fifty() -> u64 {
    50
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    /// Check ranges (also after command-line overrides).
    pub fn validate(&self) -> Result<(), String> {
        if self.workers.threads == 0 || self.workers.threads > 64 {
            return Err(format!(
                "workers.threads = {} is out of range (1..=64)",
                self.workers.threads
            ));
        }
        if let Some(c) = self.workers.cpus.iter().find(|&&c| c >= 1024) {
            return Err(format!("workers.cpus: CPU {c} is out of range (0..1024)"));
        }
        if self.workers.control_threads == 0
            || self.workers.control_threads > nvmux_core::ctlpoll::MAX_THREADS
        {
            return Err(format!(
                "workers.control_threads = {} is out of range (1..={})",
                self.workers.control_threads,
                nvmux_core::ctlpoll::MAX_THREADS
            ));
        }
        if self.workers.poll_idle_us > 1_000_000 {
            return Err(format!(
                "workers.poll_idle_us = {} is out of range (0..=1000000)",
                self.workers.poll_idle_us
            ));
        }
        self.api.access()?;
        let mb = self.network.memory_budget;
        if !(16 << 20..=1 << 40).contains(&mb) {
            return Err(format!(
                "network.memory_budget = {mb} is out of range (16 MiB..=1 TiB)"
            ));
        }
        let per = [
            ("nvmf", self.nvmf.memory_per_connection, 1 << 20),
            ("nbd", self.nbd.memory_per_connection, 33 << 20),
        ];
        for (sec, v, min) in per {
            if v < min || v > mb {
                return Err(format!(
                    "{sec}.memory_per_connection = {v} is out of range ({min}..=network.memory_budget = {mb})"
                ));
            }
        }
        let timeouts = [
            ("nvmf.handshake_timeout_ms", self.nvmf.handshake_timeout_ms),
            ("nvmf.stall_timeout_ms", self.nvmf.stall_timeout_ms),
            ("nbd.handshake_timeout_ms", self.nbd.handshake_timeout_ms),
            ("nbd.stall_timeout_ms", self.nbd.stall_timeout_ms),
            ("pool.command_timeout_ms", self.pool.command_timeout_ms),
        ];
        for (k, v) in timeouts {
            if !(100..=3_600_000).contains(&v) {
                return Err(format!("{k} = {v} is out of range (100..=3600000)"));
            }
        }
        if nvmux_nvmf::DiscoveryPolicy::parse(&self.nvmf.discovery).is_none() {
            return Err(format!(
                "nvmf.discovery = {:?} is not \"open\", \"allow-list\" or \"closed\"",
                self.nvmf.discovery
            ));
        }
        if self.qos.fair_depth > 65_536 {
            return Err(format!(
                "qos.fair_depth = {} is out of range (0..=65536)",
                self.qos.fair_depth
            ));
        }
        Ok(())
    }
    pub fn load(path: Option<&Path>) -> Result<Config, String> {
        match path {
            None => Config::parse(EMBEDDED_DEFAULT),
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| format!("config {}: {e}", p.display()))?;
                Config::parse(&t).map_err(|e| format!("config {}: {e}", p.display()))
            }
        }
    }
    pub fn api_socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("nvmux.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn embedded_default_parses() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.workers.threads, 1);
        assert_eq!(c.api_socket(), PathBuf::from("./nvmux-data/nvmux.sock"));
    }
    #[test]
    fn rejects_unknown_and_bad() {
        assert!(Config::parse("bogus = 1").is_err());
        assert!(Config::parse("[pool]\ncommand_timeout_ms = 99").is_err());
        assert!(Config::parse("[pool]\ncommand_timeout_ms = 3600001").is_err());
        assert!(Config::parse("[pool]\nbogus = 1").is_err());
        let c = Config::parse("[pool]\ncommand_timeout_ms = 500").unwrap();
        assert_eq!(c.pool.command_timeout_ms, 500);
        assert_eq!(
            Config::parse(EMBEDDED_DEFAULT)
                .unwrap()
                .pool
                .command_timeout_ms,
            30_000
        );
        assert!(Config::parse("[workers]\nthreads = 0").is_err());
        assert!(Config::parse("[network]\nmemory_budget = \"1M\"").is_err());
        assert!(Config::parse("[nbd]\nmemory_per_connection = \"16M\"").is_err());
        assert!(Config::parse("[nvmf]\nstall_timeout_ms = 0").is_err());
        assert!(Config::parse("[nvmf]\ndiscovery = \"maybe\"").is_err());
        assert_eq!(Config::parse("").unwrap().nvmf.discovery, "allow-list");
        assert!(Config::parse("[nvmf]\ndiscovery = \"closed\"").is_ok());
    }
    #[test]
    fn network_limits() {
        let c = Config::parse(
            "[network]\nmemory_budget = \"2G\"\n[nvmf]\nmax_connections = 10\nmemory_per_connection = 4194304\n[nbd]\nmax_connections_per_host = 0",
        )
        .unwrap();
        assert_eq!(c.network.memory_budget, 2 << 30);
        assert_eq!(c.nvmf.max_connections, 10);
        assert_eq!(c.nvmf.memory_per_connection, 4 << 20);
        assert_eq!(c.nbd.max_connections_per_host, 0);
        assert_eq!(c.nbd.memory_per_connection, 64 << 20);
    }

    #[test]
    fn api_section() {
        let a = Config::parse(EMBEDDED_DEFAULT)
            .unwrap()
            .api
            .access()
            .unwrap();
        assert_eq!(a.perms.mode, 0o600);
        assert_eq!(a.perms.gid, None);
        assert!(a.allow_uids.is_empty() && a.allow_gids.is_empty());
        let c = Config::parse(
            "[api]\ngroup = \"root\"\nallow_uids = [65534, \"root\"]\nallow_gids = [100]\n",
        )
        .unwrap();
        let a = c.api.access().unwrap();
        assert_eq!(a.perms.mode, 0o660, "a group makes the default 0660");
        assert_eq!(a.perms.gid, Some(0));
        assert_eq!(a.allow_uids, vec![65534, 0]);
        assert_eq!(a.allow_gids, vec![100, 0], "the socket's group is allowed");
        let a = Config::parse("[api]\nmode = \"0666\"")
            .unwrap()
            .api
            .access()
            .unwrap();
        assert_eq!(a.perms.mode, 0o666);
        for bad in [
            "[api]\nmode = 660",
            "[api]\nmode = \"0999\"",
            "[api]\nmode = \"0060\"",
            "[api]\ngroup = \"no-such-group-nvmux\"",
            "[api]\nallow_uids = [-1]",
            "[api]\nallow_uids = [\"no-such-user-nvmux\"]",
            "[api]\nallow_gids = [4294967296]",
            "[api]\nbogus = 1",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }
}
