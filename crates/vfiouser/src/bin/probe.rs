//! `nvmux-vfiouser-probe --socket PATH`: serve one PCI NVMe function over vfio-user whose
//! controller only logs what the guest does (enable, shutdown, doorbells, and the first
//! admin commands it reads from the guest's submission queue through the DMA mappings).
//! For the VM scenario `tests/vm/run.sh --only vfio-user`: it shows QEMU negotiating,
//! mapping guest memory and the guest's nvme driver enabling the controller. The NVMe
//! controller proper (completions, I/O) comes next.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use nvmux_vfiouser::device::Irqs;
use nvmux_vfiouser::dma::DmaSpace;
use nvmux_vfiouser::nvme::{Doorbell, EnableParams, PciNvmeDevice, Shutdown};
use nvmux_vfiouser::pci::NvmePci;
use nvmux_vfiouser::session::ServerTask;

struct Probe {
    dma: Arc<DmaSpace>,
    /// Admin SQ base and entries while enabled; the tail seen last.
    asq: Option<(u64, u16)>,
    tail: u16,
    logged: usize,
}

impl PciNvmeDevice for Probe {
    fn enable(&mut self, p: &EnableParams) -> Result<(), String> {
        tracing::info!(
            "nvme: CC.EN=1: admin SQ {:#x} ({} entries), CQ {:#x} ({} entries), IOSQES {} IOCQES {}",
            p.asq,
            p.asq_entries,
            p.acq,
            p.acq_entries,
            p.iosqes,
            p.iocqes
        );
        self.asq = Some((p.asq, p.asq_entries));
        self.tail = 0;
        Ok(())
    }
    fn disable(&mut self) {
        tracing::info!("nvme: controller disabled");
        self.asq = None;
    }
    fn shutdown(&mut self, kind: Shutdown) {
        tracing::info!("nvme: shutdown ({kind:?})");
    }
    fn doorbell(&mut self, db: Doorbell) {
        tracing::info!("nvme: doorbell {db:?}");
        let (Doorbell::SqTail { qid: 0, tail }, Some((asq, n))) = (db, self.asq) else {
            return;
        };
        // Read the new admin commands through the DMA table (bounded by the queue size).
        let t = self.dma.load();
        let mut i = self.tail;
        while i != tail && self.logged < 8 && i < n {
            let mut sqe = [0u8; 64];
            match t.translate(asq + i as u64 * 64, 64, false) {
                Ok(g) => {
                    g.read_to(&mut sqe);
                    tracing::info!(
                        "nvme: admin SQ entry {i}: opcode {:#04x} cid {} nsid {} cdw10 {:#x} prp1 {:#x}",
                        sqe[0],
                        u16::from_le_bytes([sqe[2], sqe[3]]),
                        u32::from_le_bytes([sqe[4], sqe[5], sqe[6], sqe[7]]),
                        u32::from_le_bytes([sqe[40], sqe[41], sqe[42], sqe[43]]),
                        u64::from_le_bytes(sqe[24..32].try_into().unwrap_or([0; 8])),
                    );
                }
                Err(e) => tracing::warn!(
                    "nvme: admin SQ entry {i} at {:#x}: {e:?}",
                    asq + i as u64 * 64
                ),
            }
            self.logged += 1;
            i = (i + 1) % n;
        }
        self.tail = tail;
    }
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
    let mut socket = None;
    let mut vectors = 8u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next().map(PathBuf::from),
            "--vectors" => vectors = args.next().and_then(|v| v.parse().ok()).unwrap_or(8),
            _ => {
                eprintln!("usage: nvmux-vfiouser-probe --socket PATH [--vectors N]");
                std::process::exit(2);
            }
        }
    }
    let Some(socket) = socket else {
        eprintln!("usage: nvmux-vfiouser-probe --socket PATH [--vectors N]");
        std::process::exit(2);
    };
    let _ = std::fs::remove_file(&socket);
    let l = match std::os::unix::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nvmux-vfiouser-probe: bind {}: {e}", socket.display());
            std::process::exit(1);
        }
    };
    let make = move || {
        let dma = Arc::new(DmaSpace::new());
        let irqs = Arc::new(Irqs::new(vectors));
        let probe = Probe {
            dma: dma.clone(),
            asq: None,
            tail: 0,
            logged: 0,
        };
        NvmePci::new(probe, irqs, dma, 8, 1023)
    };
    let task = ServerTask::new(l, socket.clone(), make, Arc::new(AtomicBool::new(false)));
    let poll = match nvmux_core::ctlpoll::global() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nvmux-vfiouser-probe: {e}");
            std::process::exit(1);
        }
    };
    let h = poll.add(Box::new(task));
    tracing::info!("vfio-user: serving {}", socket.display());
    h.wait_done();
}
