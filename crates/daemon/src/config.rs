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
}

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
}
