//! Server processes for baselines (qemu-storage-daemon, fio) and CPU accounting.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Result;

/// CPU seconds (user + system, all threads) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / tck)
}

/// Pin the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data, set up locally and passed by pointer.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A child process that is killed when dropped.
pub struct ServerProc {
    pub name: String,
    pub child: Child,
}

impl ServerProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid()).unwrap_or(0.0)
    }
    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// SIGTERM, then wait up to 10 s, then SIGKILL.
    pub fn stop(mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawn `cmd` pinned to `cpu` (if given), with output to `log`.
pub fn spawn_pinned(
    name: &str,
    mut cmd: Command,
    cpu: Option<usize>,
    log: &Path,
) -> Result<ServerProc> {
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .stdin(Stdio::null());
    if let Some(c) = cpu {
        pin_command(&mut cmd, c);
    }
    let child = cmd.spawn().map_err(|e| format!("start {name}: {e}"))?;
    Ok(ServerProc {
        name: name.to_string(),
        child,
    })
}

/// Pin the process `cmd` starts (and every thread and child it makes) to `cpu`.
pub fn pin_command(cmd: &mut Command, cpu: usize) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe sched_setaffinity on a stack-local set.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

/// What [`output_timeout`] collected.
#[derive(Debug)]
pub struct Finished {
    /// How the command exited; `None` when it ran past the deadline and was killed.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
    /// The last `n` lines of stderr (for error messages).
    pub fn stderr_tail(&self, n: usize) -> String {
        let t = String::from_utf8_lossy(&self.stderr);
        let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Have the process `cmd` starts get `sig` when the thread that starts it ends (the
/// bench killed by a signal leaves no baseline server or fio behind).
pub fn die_with_parent(cmd: &mut Command, sig: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls the
    // async-signal-safe prctl with integer arguments.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }
}

/// Run `cmd` to its end with stdout and stderr captured; past `timeout` it is killed
/// (single-process commands: a child it forks is not waited for). It also dies with the
/// calling thread.
pub fn output_timeout(mut cmd: Command, timeout: Duration, what: &str) -> Result<Finished> {
    use std::io::Read;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd, libc::SIGKILL);
    let mut child = cmd.spawn().map_err(|e| format!("start {what}: {e}"))?;
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    Ok(Finished {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// CPU seconds (user + system) of this process's children that have been waited for.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a plain struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wait until `path` exists (a server's socket), or the process dies, or 20 s pass.
pub fn wait_for_socket(p: &mut ServerProc, path: &Path, log: &Path) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if !p.alive() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "{} exited before listening on {}:\n{tail}",
                p.name,
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "{} did not listen on {} within 20 s",
        p.name,
        path.display()
    ))
}

/// What qemu-storage-daemon serves.
#[derive(Clone, Debug)]
pub enum QsdTarget {
    /// `driver=file` with `cache.direct=on,aio=io_uring` (its best configuration).
    File(PathBuf),
    /// `driver=null-co`.
    Null { size: u64 },
    /// `driver=qcow2` over `driver=file` with `cache.direct=on,aio=io_uring`.
    Qcow2(PathBuf),
    /// `driver=luks` over `driver=file` with `cache.direct=on,aio=io_uring`, unlocked
    /// with `secret`.
    Luks { path: PathBuf, secret: String },
}

/// Start qemu-storage-daemon exporting `target` over vhost-user-blk on `sock`.
pub fn start_qsd(
    target: &QsdTarget,
    sock: &Path,
    num_queues: u16,
    cpu: Option<usize>,
    log: &Path,
) -> Result<ServerProc> {
    let _ = std::fs::remove_file(sock);
    let blockdev = match target {
        QsdTarget::File(p) => format!(
            "driver=file,node-name=n0,filename={},cache.direct=on,aio=io_uring",
            p.display()
        ),
        QsdTarget::Null { size } => format!("driver=null-co,node-name=n0,size={size}"),
        QsdTarget::Qcow2(p) => format!(
            "driver=qcow2,node-name=n0,file.driver=file,file.filename={},file.cache.direct=on,file.aio=io_uring",
            p.display()
        ),
        QsdTarget::Luks { path, .. } => format!(
            "driver=luks,node-name=n0,key-secret=sec0,file.driver=file,file.filename={},file.cache.direct=on,file.aio=io_uring",
            path.display()
        ),
    };
    let mut cmd = Command::new("qemu-storage-daemon");
    if let QsdTarget::Luks { secret, .. } = target {
        cmd.arg("--object")
            .arg(format!("secret,id=sec0,data={secret}"));
    }
    cmd.arg("--blockdev").arg(blockdev).arg("--export").arg(format!(
        "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
        sock.display()
    ));
    let mut p = spawn_pinned("qemu-storage-daemon", cmd, cpu, log)?;
    wait_for_socket(&mut p, sock, log)?;
    Ok(p)
}

/// Where fio does its I/O.
#[derive(Clone, Debug)]
pub enum FioTarget {
    /// A file, with io_uring and O_DIRECT: the bare-metal bound.
    File(PathBuf),
    /// An NBD URI, with fio's nbd engine (libnbd).
    Nbd(String),
}

/// One fio run: `rw` (randread, randwrite, randrw), block size, depth per job, jobs.
#[derive(Clone, Debug)]
pub struct Fio {
    pub target: FioTarget,
    pub rw: String,
    pub bs: usize,
    pub qd: usize,
    pub jobs: usize,
    /// Read percentage for randrw.
    pub read_pct: u8,
    pub seconds: u64,
    pub cpu: Option<usize>,
}

impl Fio {
    pub fn new(target: FioTarget, rw: &str, bs: usize, qd: usize, seconds: u64) -> Fio {
        Fio {
            target,
            rw: rw.into(),
            bs,
            qd,
            jobs: 1,
            read_pct: 50,
            seconds,
            cpu: None,
        }
    }

    /// Run it; reads and writes of a mix are summed (IOPS) and their latencies merged by
    /// taking the read side's percentiles when there are reads, else the write side's.
    pub fn run(&self) -> Result<crate::workload::Measured> {
        let mut cmd = Command::new("fio");
        cmd.args([
            "--name=j",
            &format!("--rw={}", self.rw),
            &format!("--bs={}", self.bs),
            &format!("--iodepth={}", self.qd),
            &format!("--numjobs={}", self.jobs),
            &format!("--rwmixread={}", self.read_pct),
            "--group_reporting",
            "--time_based",
            &format!("--runtime={}", self.seconds),
            "--randrepeat=0",
            "--norandommap",
            "--output-format=json",
        ]);
        match &self.target {
            FioTarget::File(f) => {
                cmd.arg(format!("--filename={}", f.display()))
                    .args(["--ioengine=io_uring", "--direct=1"]);
            }
            FioTarget::Nbd(u) => {
                cmd.args(["--ioengine=nbd", &format!("--uri={u}")]);
            }
        }
        if let Some(c) = self.cpu {
            cmd.arg(format!("--cpus_allowed={c}"));
        }
        let out = cmd.output().map_err(|e| format!("run fio: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "fio failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse_fio_json(&String::from_utf8_lossy(&out.stdout), self.jobs)
    }
}

/// What fio's `--output-format=json` output (`--group_reporting`, `jobs` jobs) measured:
/// reads and writes summed (IOPS); the latencies of the read side when there are reads,
/// else of the write side. Text before the JSON (fio's warnings) is skipped.
pub fn parse_fio_json(text: &str, jobs: usize) -> Result<crate::workload::Measured> {
    let start = text.find('{').ok_or("fio printed no JSON")?;
    let v: serde_json::Value =
        serde_json::from_str(&text[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let j = &v["jobs"][0];
    if j.is_null() {
        return Err("fio JSON: no job".into());
    }
    let (r, w) = (&j["read"], &j["write"]);
    let iops = r["iops"].as_f64().unwrap_or(0.0) + w["iops"].as_f64().unwrap_or(0.0);
    let ios = r["total_ios"].as_u64().unwrap_or(0) + w["total_ios"].as_u64().unwrap_or(0);
    let lat = if r["total_ios"].as_u64().unwrap_or(0) > 0 {
        r
    } else {
        w
    };
    let pct = |k: &str| lat["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(crate::workload::Measured {
        ios,
        seconds: j["job_runtime"].as_f64().unwrap_or(0.0) / 1000.0 / jobs.max(1) as f64,
        iops,
        p50_us: pct("50.000000"),
        p95_us: pct("95.000000"),
        p99_us: pct("99.000000"),
    })
}

/// Bare-metal bound: fio with io_uring and O_DIRECT on the file itself.
pub fn run_fio(
    file: &Path,
    rw: &str,
    bs: usize,
    qd: usize,
    seconds: u64,
    cpu: Option<usize>,
) -> Result<crate::workload::Measured> {
    let mut f = Fio::new(FioTarget::File(file.to_path_buf()), rw, bs, qd, seconds);
    f.cpu = cpu;
    f.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_after_warnings() {
        let text = r#"fio: a warning first
{"fio version": "fio-3.33", "jobs": [{"jobname": "j", "job_runtime": 3000,
  "read": {"iops": 0.0, "total_ios": 0, "clat_ns": {}},
  "write": {"iops": 812.5, "total_ios": 2437,
    "clat_ns": {"percentile": {"50.000000": 1171456, "95.000000": 1500000, "99.000000": 1777664}}}}]}"#;
        let m = parse_fio_json(text, 1).unwrap();
        assert_eq!(m.ios, 2437);
        assert_eq!(m.iops, 812.5);
        assert_eq!(m.seconds, 3.0);
        assert!((m.p50_us - 1171.456).abs() < 1e-9, "{m:?}");
        assert!((m.p99_us - 1777.664).abs() < 1e-9, "{m:?}");
        assert!(parse_fio_json("no json here", 1).is_err());
        assert!(parse_fio_json(r#"{"jobs": []}"#, 1).is_err());
    }

    #[test]
    fn commands_past_their_deadline_are_killed() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let f = output_timeout(c, Duration::from_millis(200), "sleep").unwrap();
        assert!(f.status.is_none());
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err1 >&2; echo err2 >&2; exit 3"]);
        let f = output_timeout(c, Duration::from_secs(20), "sh").unwrap();
        assert_eq!(f.status.and_then(|s| s.code()), Some(3));
        assert_eq!(f.stdout, b"out\n");
        assert_eq!(f.stderr_tail(1), "err2");
        assert!(!f.success());
    }
}
