//! `nvmux-vfiouser-probe --socket PATH [--mem MIB] [--grow-to MIB] [--queues N] [--workers N]`:
//! a test server for the VM scenario (`tests/vm/run.sh --only vfio-user`) that serves a
//! memory disk over vfio-user as a PCI NVMe controller, with the crate's export
//! ([`nvmux_vfiouser::VfioUserExport`]: the same controller the daemon's
//! `export add --type vfio-user` serves), outside the daemon. `--grow-to`: the disk
//! shows `--mem` MiB at first and grows to `--grow-to` MiB on SIGUSR1 (a namespace
//! resize: the controller raises a Namespace Attribute Changed event). Status counters
//! are printed on SIGUSR2 and at exit (SIGTERM/SIGINT).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::{WorkerConfig, WorkerPool};
use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo};
use nvmux_vfiouser::{ExportConfig, VfioUserExport};

/// A memory disk whose visible capacity grows on demand (its backing is the larger size).
struct Growable {
    inner: nvmux_backend::MemoryDevice,
    info: DeviceInfo,
    bytes: AtomicU64,
}

impl BlockDevice for Growable {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, depth: u32) -> nvmux_core::Result<Box<dyn BlockQueue>> {
        self.inner.open_queue(depth)
    }
    fn describe(&self) -> String {
        format!("growable {}", self.inner.describe())
    }
    fn capacity_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: nvmux-vfiouser-probe --socket PATH [--mem MIB] [--grow-to MIB] [--queues N] [--workers N]"
    );
    std::process::exit(2);
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let (mut socket, mut mem, mut grow, mut queues, mut workers) =
        (None, 64u64, 0u64, 4u16, 2usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = || {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| usage())
        };
        match a.as_str() {
            "--socket" => {}
            "--mem" => mem = num(),
            "--grow-to" => grow = num(),
            "--queues" => queues = num() as u16,
            "--workers" => workers = num() as usize,
            // Accepted for the older command line (the vectors follow the queues now).
            "--vectors" => {
                num();
            }
            _ => usage(),
        }
        if a == "--socket" {
            socket = args.next().map(PathBuf::from);
        }
    }
    let Some(socket) = socket.filter(|s| !s.as_os_str().is_empty()) else {
        usage()
    };
    // SIGUSR1 (grow), SIGUSR2 (status), SIGTERM/SIGINT (stop) are taken by sigwait below:
    // block them before any thread starts, so every thread inherits the mask.
    // SAFETY: plain libc signal-set calls on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let big = (grow.max(mem)) << 20;
    let inner = match nvmux_backend::MemoryDevice::new(big, 512, false) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("nvmux-vfiouser-probe: memory disk: {e}");
            std::process::exit(1);
        }
    };
    let mut info = inner.info().clone();
    info.num_blocks = (mem << 20) / 512;
    let dev = Arc::new(Growable {
        inner,
        info,
        bytes: AtomicU64::new(mem << 20),
    });
    let pool = match WorkerPool::new(&WorkerConfig {
        threads: workers.max(1),
        ..WorkerConfig::default()
    }) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nvmux-vfiouser-probe: workers: {e}");
            std::process::exit(1);
        }
    };
    let cfg = ExportConfig {
        socket: socket.clone(),
        perms: nvmux_core::unixsock::SocketPerms::default(),
        num_queues: queues,
        serial: "probe0".into(),
        read_only: false,
    };
    let exp = match VfioUserExport::start(
        dev.clone(),
        cfg,
        pool.workers().to_vec(),
        Arc::new(DiskStats::default()),
    ) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nvmux-vfiouser-probe: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!("vfio-user: serving {}", socket.display());
    loop {
        let mut sig = 0;
        // SAFETY: sigwait on the set blocked above, writing one int.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        match sig {
            libc::SIGUSR1 if grow > mem => {
                dev.bytes.store(grow << 20, Ordering::Release);
                tracing::info!("probe: disk grown to {grow} MiB");
                exp.capacity_changed();
            }
            libc::SIGUSR2 => tracing::info!("probe: status {:?}", exp.status()),
            libc::SIGTERM | libc::SIGINT => break,
            _ => {}
        }
    }
    tracing::info!("probe: status {:?}", exp.status());
    exp.stop();
}
