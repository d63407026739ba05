//! `nvmux bench suite [--quick]`: the ICPE'22 study's evaluation for nvmux and its
//! competitors, from one command. One 1 GiB file on /dev/shm (no side gains from a page
//! cache the other lacks) is served at once by:
//!
//! | path | server | client |
//! |---|---|---|
//! | `bare` | – | fio io_uring O_DIRECT on the file |
//! | `nvmux-vhost` | nvmux, vhost-user-blk | libblkio |
//! | `qsd-vhost` | qemu-storage-daemon, vhost-user-blk (`cache.direct=on,aio=io_uring`) | libblkio |
//! | `nvmux-nbd` | nvmux, NBD on a Unix socket | fio's nbd engine |
//! | `qemu-nbd` | qemu-nbd (`--cache=none --aio=io_uring`, its best here) | fio's nbd engine |
//! | `nbdkit` | nbdkit's file plugin | fio's nbd engine |
//! | `nvmux-nvmf` | nvmux, NVMe/TCP on loopback | nvmux-bench's initiator |
//!
//! Servers run on CPU 0, clients on CPU 1. Each run reports IOPS, MB/s, p50/p95/p99
//! completion latency and the server process's CPU seconds. Sweeps (the matrix's slices
//! in `--quick`, the whole cross product otherwise): queue depth, block size, read/write
//! mix, jobs, and the multi-VM run (1 to 32 disks served at once, aggregate IOPS and
//! min/max fairness). Output: `report.json`, `report.md` and PNG plots in the output
//! directory.
//!
//! Last, the db_bench stage ([`crate::dbbench`]): RocksDB's db_bench in a QEMU/TCG
//! guest on ext4, on the same file through nvmux vhost-user, QSD vhost-user, nvmux
//! NVMe/TCP and QEMU's own virtio-blk. `--only dbbench` runs that stage alone.
//!
//! `--only vfio-user` runs the guest-path stage ([`crate::guestio`]) alone: one TCG
//! guest's 4 KiB random reads through vfio-user NVMe, vhost-user-blk and NVMe/TCP with
//! QEMU 11, and the host CPU per I/O of each.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::client::Op;
use crate::dbbench::{self, DbPath};
use crate::procs::{self, Fio, FioTarget, QsdTarget, ServerProc};
use crate::workload::{run_on, run_on_each, Measured, Workload};
use serde::Serialize;
use serde_json::json;

use crate::daemon::Daemon;
use crate::report::{prepare_file, Res};
use crate::run::BenchArgs;

const SIZE: u64 = 1 << 30;
/// Disks of the multi-VM run, each this large.
const VM_DISK: u64 = 64 << 20;
/// How often the targets' cell (4 KiB random read, QD32) is measured per path.
const TARGET_REPS: usize = 3;
/// Seconds per run of the targets' cell, at least.
const TARGET_SECS: u64 = 2;
const NQN: &str = "nqn.2026-12.io.nvmux:suite";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-00000005017e";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    Bare,
    NvmuxVhost,
    QsdVhost,
    NvmuxNbd,
    QemuNbd,
    Nbdkit,
    NvmuxNvmf,
}

use PathKind as P;

const PATHS: [P; 7] = [
    P::Bare,
    P::NvmuxVhost,
    P::QsdVhost,
    P::NvmuxNbd,
    P::QemuNbd,
    P::Nbdkit,
    P::NvmuxNvmf,
];

impl P {
    pub fn name(self) -> &'static str {
        match self {
            P::Bare => "bare",
            P::NvmuxVhost => "nvmux-vhost",
            P::QsdVhost => "qsd-vhost",
            P::NvmuxNbd => "nvmux-nbd",
            P::QemuNbd => "qemu-nbd",
            P::Nbdkit => "nbdkit",
            P::NvmuxNvmf => "nvmux-nvmf",
        }
    }
    /// Paths whose client runs several jobs.
    fn has_jobs(self) -> bool {
        matches!(
            self,
            P::Bare | P::NvmuxVhost | P::NvmuxNbd | P::QemuNbd | P::Nbdkit
        )
    }
}

/// One measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub sweep: &'static str,
    pub path: &'static str,
    pub rw: &'static str,
    pub bs: usize,
    pub qd: usize,
    pub jobs: usize,
    pub disks: usize,
    pub iops: f64,
    pub mbps: f64,
    pub p50_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
    /// CPU seconds of the server process during the run's window (none for bare metal).
    pub server_cpu_s: Option<f64>,
    /// Seconds of I/O the client measured.
    pub seconds: f64,
    /// Wall-clock seconds over which `server_cpu_s` was sampled: the I/O and the client's
    /// start and end (connections, fio's setup). Server CPU load is their ratio.
    pub window_s: f64,
    /// Multi-VM: the slowest disk's IOPS over the fastest's.
    pub fairness: Option<f64>,
}

struct Servers {
    d: Daemon,
    img: PathBuf,
    vhost: Vec<PathBuf>,
    nbd: String,
    qsd: Option<(ServerProc, PathBuf)>,
    qemu_nbd: Option<(ServerProc, String)>,
    nbdkit: Option<(ServerProc, String)>,
    host: Option<crate::nvmf::Host>,
    nvmf_addr: std::net::SocketAddr,
    vm_socks: Vec<PathBuf>,
}

fn spawn_nbd_server(
    name: &str,
    mut cmd: std::process::Command,
    sock: &Path,
    cpu: Option<usize>,
    log: &Path,
) -> Res<ServerProc> {
    let _ = std::fs::remove_file(sock);
    cmd.stdin(std::process::Stdio::null());
    let mut p = procs::spawn_pinned(name, cmd, cpu, log)?;
    procs::wait_for_socket(&mut p, sock, log)?;
    Ok(p)
}

fn rw_name(op: Op, mixed: bool) -> &'static str {
    match (op, mixed) {
        (_, true) => "randrw",
        (Op::Read, _) => "randread",
        _ => "randwrite",
    }
}

impl Servers {
    fn start(work: &Path, srv: Option<usize>, max_jobs: usize, vms: usize) -> Res<Servers> {
        let img = PathBuf::from(format!("/dev/shm/nvmux-suite-{}.img", std::process::id()));
        prepare_file(&img, SIZE)?;
        let (ddir, d) = Daemon::start_bench(work, srv, "")?;
        d.api().post(
            "/v1/disks",
            &json!({"name": "d", "backend": "file", "path": img}),
        )?;
        // One vhost export per job (a disk may be exported several times; one client each).
        let mut vhost = Vec::new();
        for j in 0..max_jobs {
            let s = ddir.join(format!("d{j}.sock"));
            d.api().post(
                "/v1/exports",
                &json!({"name": format!("d{j}"), "disk": "d", "socket": s}),
            )?;
            vhost.push(s);
        }
        let nsock = ddir.join("nbd.sock");
        d.api().post("/v1/exports", &json!({"name": "nbd", "disk": "d", "type": "nbd", "socket": nsock, "export_name": "d"}))?;
        let nbd = format!("nbd+unix:///d?socket={}", nsock.display());
        let addr = d.nvmf_subsystem(NQN, HOST, "d")?;
        let host = match crate::nvmf::Host::connect(addr, NQN, HOST, 1, 128, false) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("NVMe/TCP: cannot connect: {e}");
                None
            }
        };
        let mut vm_socks = Vec::new();
        for i in 0..vms {
            let shm = PathBuf::from(format!(
                "/dev/shm/nvmux-suite-{}-vm{i}.img",
                std::process::id()
            ));
            prepare_file(&shm, VM_DISK)?;
            d.api().post(
                "/v1/disks",
                &json!({"name": format!("vm{i}"), "backend": "file", "path": shm}),
            )?;
            let s = ddir.join(format!("vm{i}.sock"));
            d.api().post(
                "/v1/exports",
                &json!({"disk": format!("vm{i}"), "socket": s}),
            )?;
            vm_socks.push(s);
        }
        let qsock = work.join("qsd.sock");
        let qsd = procs::start_qsd(
            &QsdTarget::File(img.clone()),
            &qsock,
            1,
            srv,
            &work.join("qsd.log"),
        )
        .ok()
        .map(|p| (p, qsock));
        let qn = work.join("qemu-nbd.sock");
        let mut c = std::process::Command::new("qemu-nbd");
        c.args([
            "-t",
            "-f",
            "raw",
            "-x",
            "d",
            "-e",
            "64",
            "--cache=none",
            "--aio=io_uring",
            "-k",
        ])
        .arg(&qn)
        .arg(&img);
        let qemu_nbd = spawn_nbd_server("qemu-nbd", c, &qn, srv, &work.join("qemu-nbd.log"))
            .ok()
            .map(|p| (p, format!("nbd+unix:///d?socket={}", qn.display())));
        let kn = work.join("nbdkit.sock");
        let mut c = std::process::Command::new("nbdkit");
        c.args(["-f", "-U"]).arg(&kn).arg("file").arg(&img);
        let nbdkit = spawn_nbd_server("nbdkit", c, &kn, srv, &work.join("nbdkit.log"))
            .ok()
            .map(|p| (p, format!("nbd+unix:///?socket={}", kn.display())));
        Ok(Servers {
            d,
            img,
            vhost,
            nbd,
            qsd,
            qemu_nbd,
            nbdkit,
            host,
            nvmf_addr: addr,
            vm_socks,
        })
    }

    /// What a path cannot do: NVMe/TCP queues hold 127 commands and carry at most 128 KiB
    /// per command (MQES, MDTS).
    fn supports(p: P, bs: usize, qd: usize) -> bool {
        p != P::NvmuxNvmf || (qd <= 127 && bs <= 128 << 10)
    }

    fn available(&self, p: P) -> bool {
        match p {
            P::QsdVhost => self.qsd.is_some(),
            P::QemuNbd => self.qemu_nbd.is_some(),
            P::Nbdkit => self.nbdkit.is_some(),
            P::NvmuxNvmf => self.host.is_some(),
            _ => true,
        }
    }

    fn cpu(&self, p: P) -> Option<f64> {
        match p {
            P::Bare => None,
            P::NvmuxVhost | P::NvmuxNbd | P::NvmuxNvmf => Some(self.d.cpu_seconds()),
            P::QsdVhost => self.qsd.as_ref().map(|q| q.0.cpu_seconds()),
            P::QemuNbd => self.qemu_nbd.as_ref().map(|q| q.0.cpu_seconds()),
            P::Nbdkit => self.nbdkit.as_ref().map(|q| q.0.cpu_seconds()),
        }
    }

    /// One run of plan `p` (its mix, block size, depth and jobs) for `secs` seconds.
    fn measure(&mut self, p: &Plan, secs: u64, cli: Option<usize>) -> Res<Measured> {
        let Plan {
            path,
            op,
            mixed,
            bs,
            qd,
            jobs,
            ..
        } = *p;
        let mut w = Workload::random(op, bs, qd, secs);
        if mixed {
            w = w.mixed(50);
        }
        let fio = |t: FioTarget| {
            let mut f = Fio::new(t, rw_name(op, mixed), bs, qd, secs);
            f.jobs = jobs;
            f.cpu = cli;
            f.run()
        };
        Ok(match path {
            P::Bare => fio(FioTarget::File(self.img.clone()))?,
            P::NvmuxNbd => fio(FioTarget::Nbd(self.nbd.clone()))?,
            P::QemuNbd => fio(FioTarget::Nbd(
                self.qemu_nbd.as_ref().ok_or("no qemu-nbd")?.1.clone(),
            ))?,
            P::Nbdkit => fio(FioTarget::Nbd(
                self.nbdkit.as_ref().ok_or("no nbdkit")?.1.clone(),
            ))?,
            P::QsdVhost => run_on(&self.qsd.as_ref().ok_or("no qsd")?.1, &w)?,
            P::NvmuxVhost if jobs <= 1 => run_on(&self.vhost[0], &w)?,
            P::NvmuxVhost => merge(&run_on_each(&self.vhost[..jobs], &w)?),
            P::NvmuxNvmf => {
                crate::nvmf::run_workload(self.host.as_mut().ok_or("no NVMe/TCP host")?, 1, &w)?
            }
        })
    }

    /// The db_bench stage's paths to the file: vhost export d0, QSD, NVMe/TCP, QEMU.
    fn dbbench_paths(&self) -> Vec<DbPath> {
        let mut v = vec![DbPath::NvmuxVhost(self.vhost[0].clone())];
        v.extend(self.qsd.as_ref().map(|q| DbPath::QsdVhost(q.1.clone())));
        v.push(DbPath::NvmuxNvmf {
            addr: self.nvmf_addr,
            nqn: NQN.into(),
            hostnqn: HOST.into(),
        });
        v.push(DbPath::Virtio(self.img.clone()));
        v
    }

    fn stop(self) {
        drop(self.host);
        for p in [
            self.qsd.map(|q| q.0),
            self.qemu_nbd.map(|q| q.0),
            self.nbdkit.map(|q| q.0),
        ]
        .into_iter()
        .flatten()
        {
            p.stop();
        }
        let _ = self.d.stop();
        let _ = std::fs::remove_file(&self.img);
        for i in 0..self.vm_socks.len() {
            let _ = std::fs::remove_file(format!(
                "/dev/shm/nvmux-suite-{}-vm{i}.img",
                std::process::id()
            ));
        }
    }
}

/// Several clients' results as one: IOPS summed, latencies averaged.
fn merge(v: &[Measured]) -> Measured {
    let n = v.len().max(1) as f64;
    Measured {
        ios: v.iter().map(|m| m.ios).sum(),
        seconds: v.iter().map(|m| m.seconds).fold(0.0, f64::max),
        iops: v.iter().map(|m| m.iops).sum(),
        p50_us: v.iter().map(|m| m.p50_us).sum::<f64>() / n,
        p95_us: v.iter().map(|m| m.p95_us).sum::<f64>() / n,
        p99_us: v.iter().map(|m| m.p99_us).sum::<f64>() / n,
    }
}

/// A planned run.
#[derive(Clone, Copy)]
struct Plan {
    sweep: &'static str,
    path: P,
    op: Op,
    mixed: bool,
    bs: usize,
    qd: usize,
    jobs: usize,
}

fn plan(quick: bool) -> Vec<Plan> {
    let mut v = Vec::new();
    let k = 1024;
    let (qds, bss, jobs): (&[usize], &[usize], &[usize]) = if quick {
        (&[1, 8, 32, 128], &[4 * k, 64 * k, 1024 * k], &[1, 4, 16])
    } else {
        (
            &[1, 2, 4, 8, 16, 32, 64, 128],
            &[4 * k, 16 * k, 64 * k, 128 * k, 1024 * k],
            &[1, 2, 4, 8, 16, 32],
        )
    };
    let mixes: [(Op, bool); 3] = [(Op::Read, false), (Op::Write, false), (Op::Read, true)];
    for path in PATHS {
        if quick {
            for &qd in qds {
                v.push(Plan {
                    sweep: "qd",
                    path,
                    op: Op::Read,
                    mixed: false,
                    bs: 4 * k,
                    qd,
                    jobs: 1,
                });
            }
            for &bs in bss {
                v.push(Plan {
                    sweep: "bs",
                    path,
                    op: Op::Read,
                    mixed: false,
                    bs,
                    qd: 16,
                    jobs: 1,
                });
            }
            for (op, mixed) in &mixes[1..] {
                v.push(Plan {
                    sweep: "rw",
                    path,
                    op: *op,
                    mixed: *mixed,
                    bs: 4 * k,
                    qd: 32,
                    jobs: 1,
                });
            }
        } else {
            // The cross product: every mix, block size and depth.
            for (op, mixed) in mixes {
                for &bs in bss {
                    for &qd in qds {
                        v.push(Plan {
                            sweep: "matrix",
                            path,
                            op,
                            mixed,
                            bs,
                            qd,
                            jobs: 1,
                        });
                    }
                }
            }
        }
        if path.has_jobs() {
            for &j in jobs {
                v.push(Plan {
                    sweep: "jobs",
                    path,
                    op: Op::Read,
                    mixed: false,
                    bs: 4 * k,
                    qd: 4,
                    jobs: j,
                });
            }
        }
    }
    // The targets' cell, measured TARGET_REPS times with the paths interleaved, so that
    // one noisy second on this shared VM does not decide a verdict: the report takes
    // each path's median.
    for _ in 0..TARGET_REPS {
        for path in [
            P::NvmuxVhost,
            P::QsdVhost,
            P::NvmuxNbd,
            P::QemuNbd,
            P::Nbdkit,
        ] {
            v.push(Plan {
                sweep: "target",
                path,
                op: Op::Read,
                mixed: false,
                bs: 4 * k,
                qd: 32,
                jobs: 1,
            });
        }
    }
    v
}

fn row(p: &Plan, m: &Measured, cpu: Option<f64>) -> Row {
    Row {
        sweep: p.sweep,
        path: p.path.name(),
        rw: rw_name(p.op, p.mixed),
        bs: p.bs,
        qd: p.qd,
        jobs: p.jobs,
        disks: 1,
        iops: m.iops,
        mbps: m.iops * p.bs as f64 / 1e6,
        p50_us: m.p50_us,
        p95_us: m.p95_us,
        p99_us: m.p99_us,
        server_cpu_s: cpu,
        seconds: m.seconds,
        window_s: m.seconds,
        fairness: None,
    }
}

/// `--quick`: the matrix's slices with 1 s runs (under 5 minutes here); else the whole
/// matrix with `--seconds` per run.
pub fn run(a: &BenchArgs, srv: Option<usize>, cli: Option<usize>) -> Res<()> {
    let quick = a.quick;
    let secs = if quick { 1 } else { a.seconds };
    let t0 = Instant::now();
    let work = std::env::temp_dir().join(format!("nvmux-bench-suite-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    // `--only dbbench` / `--only scale`: one stage alone.
    let only_db = a.only.as_deref() == Some("dbbench");
    // The scale stage (crates/bench/src/scale.rs).
    let scale_stage = |out: &std::path::Path| -> Res<String> {
        std::fs::create_dir_all(out)?;
        let exe = std::env::current_exe()?;
        Ok(crate::scale::suite_stage(&exe, &work, out, quick, srv)?)
    };
    // `--only vfio-user`: one TCG guest's 4 KiB random reads through vfio-user NVMe,
    // vhost-user-blk and NVMe/TCP (crates/bench/src/guestio.rs). Not part of the whole
    // suite: it needs the sid chroot's QEMU 11 and several minutes of guest boots.
    if a.only.as_deref() == Some("vfio-user") {
        let out = a.out.join("suite-vfio-user");
        let r = crate::guestio::run(quick, &out, srv, cli)?;
        let _ = std::fs::remove_dir_all(&work);
        println!("{}", r.markdown());
        eprintln!("report: {}", out.join("report.md").display());
        return if r.rows.is_empty() {
            Err("the vfio-user stage measured nothing".into())
        } else {
            Ok(())
        };
    }
    if a.only.as_deref() == Some("scale") {
        let out = a.out.join(if quick { "suite-quick" } else { "suite" });
        let md = scale_stage(&out)?;
        let _ = std::fs::remove_dir_all(&work);
        std::fs::write(out.join("scale.md"), &md)?;
        println!("{md}");
        return Ok(());
    }
    let plans = if only_db { Vec::new() } else { plan(quick) };
    let max_jobs = plans.iter().map(|p| p.jobs).max().unwrap_or(1);
    let vms: &[usize] = if only_db { &[] } else { &[1, 2, 4, 8, 16, 32] };
    eprintln!("starting nvmux, qemu-storage-daemon, qemu-nbd and nbdkit on one 1 GiB /dev/shm file, and {} small disks", vms.last().copied().unwrap_or(0));
    let mut s = Servers::start(&work, srv, max_jobs, vms.last().copied().unwrap_or(0))?;
    let mut missing: Vec<&str> = PATHS
        .iter()
        .filter(|p| !s.available(**p))
        .map(|p| p.name())
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        eprintln!(
            "not measured (server not available here): {}",
            missing.join(", ")
        );
    }
    let total = plans.len() + vms.len();
    let mut rows: Vec<Row> = Vec::new();
    let mut n = 0;
    for p in &plans {
        n += 1;
        if !s.available(p.path) || !Servers::supports(p.path, p.bs, p.qd) {
            continue;
        }
        let c0 = s.cpu(p.path);
        let w0 = Instant::now();
        let t = if p.sweep == "target" {
            secs.max(TARGET_SECS)
        } else {
            secs
        };
        let m = match s.measure(p, t, cli) {
            Ok(m) => m,
            Err(e) => {
                eprintln!(
                    "[{n:>3}/{total}] {:<12} {}: failed: {e}",
                    p.path.name(),
                    p.sweep
                );
                continue;
            }
        };
        let cpu = s.cpu(p.path).zip(c0).map(|(b, a)| b - a);
        let mut r = row(p, &m, cpu);
        r.window_s = w0.elapsed().as_secs_f64();
        progress(n, total, &r, t0);
        rows.push(r);
    }
    // Multi-VM: N disks at once, one libblkio client each, 4 KiB random reads at QD4.
    let w = Workload::random(Op::Read, 4096, 4, secs.max(2));
    for &k in vms {
        n += 1;
        let c0 = s.d.cpu_seconds();
        let w0 = Instant::now();
        let ms = run_on_each(&s.vm_socks[..k], &w)?;
        let window = w0.elapsed().as_secs_f64();
        let cpu = s.d.cpu_seconds() - c0;
        let lo = ms.iter().map(|m| m.iops).fold(f64::INFINITY, f64::min);
        let hi = ms.iter().map(|m| m.iops).fold(0.0, f64::max);
        let m = merge(&ms);
        let p = Plan {
            sweep: "multi-vm",
            path: P::NvmuxVhost,
            op: Op::Read,
            mixed: false,
            bs: 4096,
            qd: 4,
            jobs: 1,
        };
        let mut r = row(&p, &m, Some(cpu));
        r.disks = k;
        r.window_s = window;
        r.fairness = Some(if hi > 0.0 { lo / hi } else { 0.0 });
        progress(n, total, &r, t0);
        rows.push(r);
    }
    let db = dbbench::run(
        &dbbench::Vm::from_source_tree(),
        &s.dbbench_paths(),
        dbbench::Sizes::new(quick),
        cli,
        &work.join("dbbench"),
    );
    s.stop();
    let out = a.out.join(match (only_db, quick) {
        (true, _) => "suite-dbbench",
        (_, true) => "suite-quick",
        _ => "suite",
    });
    let scale_md = if only_db {
        String::new()
    } else {
        scale_stage(&out).unwrap_or_else(|e| {
            eprintln!("scale stage failed: {e}");
            format!("## Scale\n\nfailed: {e}\n")
        })
    };
    let db = db.map_err(|e| {
        eprintln!(
            "db_bench stage failed: {e} (logs kept in {})",
            work.display()
        );
        e
    });
    if db.is_ok() {
        let _ = std::fs::remove_dir_all(&work);
    }
    let db = db.ok();

    std::fs::create_dir_all(&out)?;
    if only_db {
        let md = db.as_ref().map_or(String::new(), |d| d.markdown());
        let report =
            json!({"kind": "suite-dbbench", "quick": quick, "machine": machine(), "dbbench": db});
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        std::fs::write(out.join("report.md"), &md)?;
        println!("{md}");
        return db
            .map(|_| ())
            .ok_or_else(|| "the db_bench stage failed".into());
    }
    let machine = machine();
    let report = json!({
        "kind": "suite",
        "quick": quick,
        "seconds_per_run": secs,
        "machine": machine,
        "wall_seconds": t0.elapsed().as_secs_f64(),
        "not_measured": missing,
        "rows": rows,
        "dbbench": db,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let plots = crate::plots::suite_plots(&rows, &out)?;
    let mut md = crate::plots::suite_markdown(
        &rows,
        &machine,
        secs,
        quick,
        &plots,
        t0.elapsed().as_secs_f64(),
    );
    md.push_str(&db.as_ref().map_or(String::new(), |d| d.markdown()));
    let md = format!("{md}\n{scale_md}");
    std::fs::write(out.join("report.md"), &md)?;
    println!("{md}");
    eprintln!(
        "suite took {:.0} s; report: {}, {}, plots: {}",
        t0.elapsed().as_secs_f64(),
        out.join("report.json").display(),
        out.join("report.md").display(),
        plots.join(", ")
    );
    Ok(())
}

fn progress(n: usize, total: usize, r: &Row, t0: Instant) {
    use std::io::IsTerminal;
    let what = if r.sweep == "multi-vm" {
        format!("{} disks", r.disks)
    } else {
        format!("{} {}K QD{} x{}", r.rw, r.bs / 1024, r.qd, r.jobs)
    };
    let line = format!(
        "[{n:>3}/{total}] {:<12} {:<26} {:>9.0} IOPS {:>8.1} MB/s  p99 {:>8.1} µs{}",
        r.path,
        what,
        r.iops,
        r.mbps,
        r.p99_us,
        r.fairness
            .map_or(String::new(), |f| format!("  min/max {f:.3}"))
    );
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
        eprintln!("{line}");
        crate::report::draw_bar(
            &format!("suite {:.0} s", t0.elapsed().as_secs_f64()),
            n as u64,
            total as u64,
        );
    } else {
        eprintln!("{line}");
    }
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    json!({
        "cpu": cpu,
        // SAFETY: sysconf has no memory-safety preconditions (the process is pinned to one
        // CPU here, so available_parallelism would say 1).
        "cpus": unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) },
        "memory_gib": (mem as f64 / 1048576.0).round(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}
