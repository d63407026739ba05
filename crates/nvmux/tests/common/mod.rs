//! Shared helpers for integration tests: a real `nvmux serve` process on a private data
//! directory, its API client, and a watchdog so a server bug fails a test instead of
//! hanging CI (libblkio never notices a dead server).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nvmux_daemon::client::ApiClient;
use serde_json::{json, Value};

/// Abort the whole test process if it runs longer than `secs`.
pub fn watchdog(secs: u64) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        eprintln!("test watchdog: no progress after {secs} s; aborting");
        std::process::abort();
    });
}

pub struct TestDaemon {
    pub dir: PathBuf,
    child: Option<Child>,
    pub api: ApiClient,
}

/// Test directories this process made; removed when it exits, except those of a test that
/// failed (kept for their daemon.log; the next test process sweeps them once this one is
/// gone). `NVMUX_KEEP_TEST_DIRS=1` keeps them all.
static DIRS: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());

extern "C" fn remove_test_dirs() {
    if std::env::var_os("NVMUX_KEEP_TEST_DIRS").is_some() {
        return;
    }
    let dirs = DIRS.lock().map(|d| d.clone()).unwrap_or_default();
    for (d, keep) in dirs {
        if !keep {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Remove the `nvmux-it-*` directories of test processes that no longer run.
fn sweep_dead_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("nvmux-it-") else {
            continue;
        };
        // nvmux-it-{tag}-{pid}-{n}: the pid is the second field from the end.
        let pid = rest.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Mark `dir` to be kept after this process exits (its test failed).
fn keep_dir(dir: &Path) {
    if let Ok(mut d) = DIRS.lock() {
        for (p, keep) in d.iter_mut() {
            if p == dir {
                *keep = true;
            }
        }
    }
}

pub fn unique_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    static FIRST: std::sync::Once = std::sync::Once::new();
    FIRST.call_once(|| {
        sweep_dead_dirs();
        // SAFETY: registers a plain extern "C" function with no arguments; it runs once at
        // process exit and only touches the DIRS mutex and the file system.
        unsafe { libc::atexit(remove_test_dirs) };
    });
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("nvmux-it-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create test dir");
    if let Ok(mut dirs) = DIRS.lock() {
        dirs.push((d.clone(), false));
    }
    d
}

impl TestDaemon {
    pub fn start(tag: &str) -> TestDaemon {
        Self::start_in(unique_dir(tag))
    }

    pub fn start_in(dir: PathBuf) -> TestDaemon {
        Self::start_with(dir, &[])
    }

    /// Start with extra `nvmux serve` arguments (two workers unless they say otherwise).
    pub fn start_with(dir: PathBuf, extra: &[&str]) -> TestDaemon {
        Self::start_with_env(dir, extra, &[])
    }

    /// As `start_with`, with `env` set (or overridden) in the daemon's environment.
    pub fn start_with_env(dir: PathBuf, extra: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_nvmux"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&dir)
            .args(if extra.contains(&"--workers") {
                &[][..]
            } else {
                &["--workers", "2"][..]
            })
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nvmux serve");
        let sock = dir.join("nvmux.sock");
        let t0 = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon did not start: {}",
                Self::log_of(&dir)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        TestDaemon {
            api: ApiClient::new(&sock),
            dir,
            child: Some(child),
        }
    }

    fn log_of(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        Self::log_of(&self.dir)
    }

    /// True while the daemon process runs and answers its API.
    pub fn healthy(&mut self) -> bool {
        let alive = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)));
        alive && self.api.get("/v1/health").is_ok()
    }

    /// Create a pool `name` of `size` bytes in the daemon's directory; its file's path.
    pub fn pool(&self, name: &str, size: u64) -> PathBuf {
        let path = self.dir.join(format!("{name}.pool"));
        self.api
            .post(
                "/v1/pools",
                &json!({"name": name, "path": path, "size": size}),
            )
            .expect("create pool");
        path
    }

    /// Create a file disk and export it; returns (image path, vhost socket path).
    pub fn disk_and_export(
        &self,
        name: &str,
        size: u64,
        queues: u16,
        extra: Value,
    ) -> (PathBuf, PathBuf) {
        let img = self.dir.join(format!("{name}.img"));
        let mut body = json!({"name": name, "backend": "file", "path": img, "size": size});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        self.api.post("/v1/disks", &body).expect("create disk");
        let sock = self.dir.join(format!("{name}.sock"));
        self.api
            .post(
                "/v1/exports",
                &json!({"disk": name, "socket": sock, "num_queues": queues}),
            )
            .expect("export disk");
        (img, sock)
    }

    /// A file disk `name` of `size` bytes, its image in the data directory.
    pub fn file_disk(&self, name: &str, size: u64) -> PathBuf {
        let img = self.dir.join(format!("{name}.img"));
        self.api
            .post(
                "/v1/disks",
                &json!({"name": name, "backend": "file", "path": img, "size": size}),
            )
            .expect("create disk");
        img
    }

    /// An NBD export with the fields of `body`; the API's answer.
    pub fn nbd_export(&self, body: Value) -> Value {
        let mut b = json!({"type": "nbd"});
        for (k, v) in body.as_object().cloned().unwrap_or_default() {
            b[k] = v;
        }
        self.api.post("/v1/exports", &b).expect("nbd export")
    }

    /// An NVMe/TCP subsystem `nqn` on an ephemeral loopback port, with `hosts` on its
    /// allow-list and `disks` as its namespaces (1, 2, ...); the address it listens on.
    pub fn nvmf_subsystem(&self, nqn: &str, hosts: &[&str], disks: &[&str]) -> SocketAddr {
        let v = self
            .api
            .post(
                "/v1/subsystems",
                &json!({"nqn": nqn, "listen": "127.0.0.1:0"}),
            )
            .expect("subsystem");
        for h in hosts {
            self.api
                .post(&format!("/v1/subsystems/{nqn}/hosts"), &json!({"host": h}))
                .expect("allow host");
        }
        for d in disks {
            self.api
                .post(
                    &format!("/v1/subsystems/{nqn}/namespaces"),
                    &json!({"disk": d}),
                )
                .expect("namespace");
        }
        v["listen"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no bound address in {v}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Wait for a daemon someone killed (or kill it now) and reap it.
    pub fn wait_killed(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; panics if it does not exit 0 within 15 s.
    pub fn stop(mut self) {
        let mut c = self.child.take().expect("child");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                assert!(st.success(), "daemon exited with {st}: {}", self.log());
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "daemon did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            keep_dir(&self.dir);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Read `len` bytes at `off` straight from a backing file.
/// Write `data` at `off` through queue 0 of a libblkio client, then flush: the data is on
/// the disk when this returns.
pub fn write_flushed(c: &mut nvmux_bench::client::BlkioClient, off: u64, data: &[u8]) {
    use nvmux_bench::client::Op;
    c.buf()[..data.len()].copy_from_slice(data);
    c.io_ok(0, Op::Write, off, data.len(), 0, blkio::ReqFlags::empty())
        .expect("write");
    c.io_ok(0, Op::Flush, 0, 0, 0, blkio::ReqFlags::empty())
        .expect("flush");
}

pub fn read_file_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).expect("open image");
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, off).expect("read image");
    v
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A psktool-format key file `dir/keys.psk` with a random key for `identity`, mode 0600.
pub fn psk_file(dir: &Path, identity: &str) -> PathBuf {
    nvmux_bench::tls::psk_file(dir, identity).expect("a PSK file")
}

/// A CA with server and client certificates under `dir` (the `openssl` command).
pub fn x509(dir: &Path) -> nvmux_bench::tls::X509 {
    nvmux_bench::tls::x509(dir).expect("X.509 credentials (the openssl command)")
}

/// Run a client tool; (success, stdout and stderr).
pub fn run(cmd: &mut Command) -> (bool, String) {
    let o = cmd
        .output()
        .expect("run a client tool (scripts/test.sh installs them)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Run a client tool that must succeed; its output.
pub fn ok(cmd: &mut Command) -> String {
    let (s, t) = run(cmd);
    assert!(s, "{cmd:?} failed: {t}");
    t
}

/// Run a client tool that must fail; its output.
pub fn fails(cmd: &mut Command) -> String {
    let (s, t) = run(cmd);
    assert!(!s, "{cmd:?} should have failed: {t}");
    t
}

/// Compile a classifier (examples/classifiers/NAME.c or tests/classifiers/NAME.c) into
/// `out_dir` with clang.
pub fn compile_classifier(out_dir: &Path, name: &str) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ex = manifest.join("../../examples/classifiers");
    let src = [
        ex.join(format!("{name}.c")),
        manifest.join(format!("tests/classifiers/{name}.c")),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("no classifier {name}"));
    let out = out_dir.join(format!("{name}.o"));
    let st = Command::new("clang")
        .args(["-O2", "-target", "bpf", "-I"])
        .arg(&ex)
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run clang (install clang: scripts/test.sh does)");
    assert!(st.success(), "clang failed on {}", src.display());
    out
}

pub mod hostile_fn;
