//! A `nvmux serve` child process for benchmarks and the demo: spawned pinned to a CPU,
//! waited for until its API socket answers, stopped with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Command;

use nvmux_daemon::client::ApiClient;
use serde_json::json;

use crate::procs::{self, ServerProc};
use crate::report::Res;

/// A `nvmux serve` child process.
pub struct Daemon {
    proc: ServerProc,
    api: ApiClient,
}

impl Daemon {
    /// Start `nvmux serve --data-dir DIR [--config CFG]`, pinned to `cpu`.
    pub fn start(dir: &Path, config: Option<&str>, cpu: Option<usize>) -> Res<Daemon> {
        Daemon::start_env(dir, config, cpu, &[])
    }
    /// [`start`](Self::start) with these environment variables set for the child (e.g.
    /// `CEPH_CONF`, which librados reads when the config names no cluster).
    pub fn start_env(
        dir: &Path,
        config: Option<&str>,
        cpu: Option<usize>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Res<Daemon> {
        let exe = std::env::current_exe()?;
        let sock = dir.join("nvmux.sock");
        let log = dir.join("daemon.log");
        let mut cmd = Command::new(exe);
        cmd.arg("serve").arg("--data-dir").arg(dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(c) = config {
            let p = dir.join("nvmux.toml");
            std::fs::write(&p, c)?;
            cmd.arg("--config").arg(p);
        }
        let mut proc = procs::spawn_pinned("nvmux serve", cmd, cpu, &log)?;
        procs::wait_for_socket(&mut proc, &sock, &log)?;
        Ok(Daemon {
            proc,
            api: ApiClient::new(&sock),
        })
    }
    /// The daemon every bench run uses: `<work>/nvmux`, one worker thread on `cpu`.
    pub fn start_bench(work: &Path, cpu: Option<usize>, extra_cfg: &str) -> Res<(PathBuf, Daemon)> {
        Daemon::start_bench_env(work, cpu, extra_cfg, &[])
    }
    /// [`start_bench`](Self::start_bench) with environment variables for the child.
    pub fn start_bench_env(
        work: &Path,
        cpu: Option<usize>,
        extra_cfg: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Res<(PathBuf, Daemon)> {
        let ddir = work.join("nvmux");
        std::fs::create_dir_all(&ddir)?;
        let cfg = format!(
            "data_dir = {:?}\n{extra_cfg}\n[workers]\nthreads = 1\npoll_idle_us = 50\ncpus = [{}]\n",
            ddir,
            cpu.unwrap_or(0)
        );
        let d = Daemon::start_env(&ddir, Some(&cfg), cpu, env)?;
        Ok((ddir, d))
    }
    pub fn api(&self) -> &ApiClient {
        &self.api
    }
    /// An NVMe/TCP subsystem `nqn` on a free loopback port, open to `host`, with `disk` as
    /// its namespace 1; returns the address it listens on.
    pub fn nvmf_subsystem(&self, nqn: &str, host: &str, disk: &str) -> Res<std::net::SocketAddr> {
        let sub = self.api.post(
            "/v1/subsystems",
            &json!({"nqn": nqn, "listen": "127.0.0.1:0", "hosts": [host]}),
        )?;
        self.api.post(
            &format!("/v1/subsystems/{nqn}/namespaces"),
            &json!({ "disk": disk }),
        )?;
        Ok(sub["listen"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or("the subsystem has no listen address")?)
    }
    pub fn cpu_seconds(&self) -> f64 {
        self.proc.cpu_seconds()
    }
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
    /// SIGTERM and wait; returns how it exited.
    pub fn stop(self) -> String {
        match self.proc.stop() {
            Some(s) if s.success() => "exit 0".into(),
            Some(s) => format!("{s}"),
            None => "unknown".into(),
        }
    }
}
