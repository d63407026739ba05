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
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            threads: 1,
            poll_idle_us: 50,
            cpus: Vec::new(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./nvmux-data")
}
fn one() -> usize {
    1
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
        if self.workers.poll_idle_us > 1_000_000 {
            return Err(format!(
                "workers.poll_idle_us = {} is out of range (0..=1000000)",
                self.workers.poll_idle_us
            ));
        }
        self.api.access()?;
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
        assert!(Config::parse("[workers]\nthreads = 0").is_err());
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
