//! A guest's side of the NVMe controller, for tests (unit tests, the zero-allocation
//! test, fuzz targets): guest memory in a memfd mapped as the client's DMA space, BAR0
//! accesses as the session would make them, queues and commands built as a driver would.
//! Not for production use.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_core::stats::DiskStats;
use nvmux_core::worker::{WorkerConfig, WorkerPool};
use nvmux_core::BlockDevice;

use crate::ctrl::{Controller, CtrlShared, MQES};
use crate::device::{Irqs, VfioDevice};
use crate::dma::DmaSpace;
use crate::nvme::reg;
use crate::pci::{NvmePci, REGION_BAR0};

/// Guest memory layout (IOVAs).
pub const ASQ: u64 = 0x1000;
pub const ACQ: u64 = 0x2000;
pub const SHADOW_DB: u64 = 0x3000;
pub const SHADOW_EI: u64 = 0x4000;
pub const fn sq_base(qid: u16) -> u64 {
    0x10_0000 + qid as u64 * 0x1_0000
}
pub const fn cq_base(qid: u16) -> u64 {
    0x20_0000 + qid as u64 * 0x1_0000
}
/// Data buffers start here.
pub const DATA: u64 = 0x40_0000;
/// Guest memory size.
pub const MEM: u64 = 0x80_0000;
pub const ADMIN_ENTRIES: u16 = 32;

/// A memfd of `size` bytes.
pub fn memfd(size: u64) -> OwnedFd {
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"nvmux-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor, owned from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own descriptor.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
    fd
}

/// A 64-byte submission queue entry.
pub fn sqe(opcode: u8, cid: u16, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 6]) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[0] = opcode;
    b[2..4].copy_from_slice(&cid.to_le_bytes());
    b[4..8].copy_from_slice(&nsid.to_le_bytes());
    b[24..32].copy_from_slice(&prp1.to_le_bytes());
    b[32..40].copy_from_slice(&prp2.to_le_bytes());
    for (i, v) in cdw.iter().enumerate() {
        b[40 + i * 4..44 + i * 4].copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// A completion as the guest reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub dw0: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    /// Status code type and status code (phase and DNR stripped).
    pub sct: u8,
    pub sc: u8,
}

struct GuestQueue {
    sq: u64,
    sq_size: u16,
    tail: u16,
    cq: u64,
    cq_size: u16,
    head: u16,
    phase: bool,
}

/// The guest: its memory, the PCI function and the queues it created.
pub struct Guest {
    pub pci: NvmePci<Controller>,
    pub dma: Arc<DmaSpace>,
    pub shared: Arc<CtrlShared>,
    pub irqs: Arc<Irqs>,
    pub pool: WorkerPool,
    queues: Vec<Option<GuestQueue>>,
    /// Use the shadow doorbells (after Doorbell Buffer Config), as Linux does.
    pub shadow: bool,
}

impl Guest {
    /// A guest with `MEM` bytes of memory mapped at IOVA 0, and a controller offering
    /// `queues` I/O queues on `dev`, served by `workers` worker threads.
    pub fn new(dev: Arc<dyn BlockDevice>, queues: u16, workers: usize) -> Guest {
        let pool = WorkerPool::new(&WorkerConfig {
            threads: workers,
            ..WorkerConfig::default()
        })
        .expect("workers");
        let shared = Arc::new(CtrlShared::new(
            dev,
            "test-serial".into(),
            false,
            queues,
            pool.workers().to_vec(),
            Arc::new(DiskStats::default()),
        ));
        let dma = Arc::new(DmaSpace::new());
        dma.map(
            crate::proto::DMA_MAP_READ | crate::proto::DMA_MAP_WRITE,
            0,
            MEM,
            0,
            Some(memfd(MEM)),
        )
        .expect("DMA_MAP");
        let irqs = Arc::new(Irqs::new(queues as u32 + 1));
        let ctrl = Controller::new(shared.clone(), dma.clone(), irqs.clone());
        let pci = NvmePci::new(ctrl, irqs.clone(), dma.clone(), queues + 1, MQES);
        Guest {
            pci,
            dma,
            shared,
            irqs,
            pool,
            queues: (0..=queues).map(|_| None).collect(),
            shadow: false,
        }
    }

    pub fn write_mem(&self, iova: u64, data: &[u8]) {
        let t = self.dma.load();
        t.translate(iova, data.len(), true)
            .expect("guest memory")
            .write_from(data);
    }

    pub fn read_mem(&self, iova: u64, out: &mut [u8]) {
        let t = self.dma.load();
        t.translate(iova, out.len(), false)
            .expect("guest memory")
            .read_to(out);
    }

    fn read_u32(&self, iova: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read_mem(iova, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        let _ = self.pci.region_write(REGION_BAR0, off, &v.to_le_bytes());
    }

    pub fn w64(&mut self, off: u64, v: u64) {
        let _ = self.pci.region_write(REGION_BAR0, off, &v.to_le_bytes());
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        let _ = self.pci.region_read(REGION_BAR0, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn csts(&mut self) -> u32 {
        self.r32(reg::CSTS)
    }

    /// Set up the admin queues and enable the controller (IOSQES 6, IOCQES 4).
    pub fn enable(&mut self) {
        let n = ADMIN_ENTRIES as u32 - 1;
        self.w32(reg::AQA, n << 16 | n);
        self.w64(reg::ASQ, ASQ);
        self.w64(reg::ACQ, ACQ);
        // Zero the admin completion queue (as a driver does).
        self.write_mem(ACQ, &[0u8; 4096]);
        self.w32(reg::CC, 6 << 16 | 4 << 20 | 1);
        self.queues[0] = Some(GuestQueue {
            sq: ASQ,
            sq_size: ADMIN_ENTRIES,
            tail: 0,
            cq: ACQ,
            cq_size: ADMIN_ENTRIES,
            head: 0,
            phase: true,
        });
    }

    /// Disable the controller (CC.EN = 0) and forget the queues.
    pub fn disable(&mut self) {
        self.w32(reg::CC, 0);
        for q in self.queues.iter_mut() {
            *q = None;
        }
    }

    /// Put `e` on queue `qid`'s SQ and ring its doorbell (through the shadow buffer
    /// when `shadow` is on and the queue is an I/O queue, trapping only when the event
    /// index asks for it, as Linux does).
    pub fn submit(&mut self, qid: u16, e: &[u8; 64]) {
        let (addr, old, new) = {
            let q = self.queues[qid as usize].as_mut().expect("queue");
            let addr = q.sq + q.tail as u64 * 64;
            let old = q.tail;
            q.tail = (q.tail + 1) % q.sq_size;
            (addr, old, q.tail)
        };
        self.write_mem(addr, e);
        self.ring_sq(qid, old, new);
    }

    /// Ring SQ `qid`'s tail doorbell moving from `old` to `new`.
    pub fn ring_sq(&mut self, qid: u16, old: u16, new: u16) {
        if self.shadow && qid > 0 {
            self.write_mem(SHADOW_DB + qid as u64 * 8, &(new as u32).to_le_bytes());
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let ei = self.read_u32(SHADOW_EI + qid as u64 * 8) as u16;
            let need = new.wrapping_sub(ei).wrapping_sub(1) < new.wrapping_sub(old);
            if !need {
                return;
            }
        }
        self.w32(0x1000 + qid as u64 * 8, new as u32);
    }

    /// The next completion of queue `qid`, waiting up to 5 s; its head doorbell is
    /// written.
    pub fn reap(&mut self, qid: u16) -> Option<Completion> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (addr, phase) = {
                let q = self.queues[qid as usize].as_ref()?;
                (q.cq + q.head as u64 * 16, q.phase)
            };
            let mut b = [0u8; 16];
            self.read_mem(addr, &mut b);
            let st = u16::from_le_bytes([b[14], b[15]]);
            if (st & 1 == 1) == phase {
                let c = Completion {
                    dw0: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    sqhd: u16::from_le_bytes([b[8], b[9]]),
                    sqid: u16::from_le_bytes([b[10], b[11]]),
                    cid: u16::from_le_bytes([b[12], b[13]]),
                    sct: ((st >> 9) & 7) as u8,
                    sc: (st >> 1) as u8,
                };
                let head = {
                    let q = self.queues[qid as usize].as_mut()?;
                    q.head = (q.head + 1) % q.cq_size;
                    if q.head == 0 {
                        q.phase = !q.phase;
                    }
                    q.head
                };
                if self.shadow && qid > 0 {
                    self.write_mem(SHADOW_DB + qid as u64 * 8 + 4, &(head as u32).to_le_bytes());
                } else {
                    self.w32(0x1004 + qid as u64 * 8, head as u32);
                }
                return Some(c);
            }
            if Instant::now() > deadline {
                return None;
            }
            // The session's task would call this on its next turn.
            self.pci.tick();
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// An admin command, waited for.
    pub fn admin(&mut self, e: &[u8; 64]) -> Completion {
        self.submit(0, e);
        self.reap(0).expect("admin completion")
    }

    /// Set Features Number of Queues, Doorbell Buffer Config (when `shadow`), and `n`
    /// I/O queue pairs of `size` entries (CQ vector = qid).
    pub fn setup_io(&mut self, n: u16, size: u16) {
        let c = self.admin(&sqe(
            0x09,
            1,
            0,
            0,
            0,
            [0x07, ((n as u32 - 1) << 16) | (n as u32 - 1), 0, 0, 0, 0],
        ));
        assert_eq!((c.sct, c.sc), (0, 0), "set features number of queues");
        if self.shadow {
            self.write_mem(SHADOW_DB, &[0u8; 4096]);
            self.write_mem(SHADOW_EI, &[0u8; 4096]);
            let c = self.admin(&sqe(0x7c, 2, 0, SHADOW_DB, SHADOW_EI, [0; 6]));
            assert_eq!((c.sct, c.sc), (0, 0), "doorbell buffer config");
        }
        for qid in 1..=n {
            let c = self.create_cq(qid, size, qid);
            assert_eq!((c.sct, c.sc), (0, 0), "create CQ {qid}");
            let c = self.create_sq(qid, size, qid);
            assert_eq!((c.sct, c.sc), (0, 0), "create SQ {qid}");
        }
    }

    pub fn create_cq(&mut self, qid: u16, size: u16, vector: u16) -> Completion {
        self.write_mem(cq_base(qid), &vec![0u8; size as usize * 16]);
        let c = self.admin(&sqe(
            0x05,
            3,
            0,
            cq_base(qid),
            0,
            [
                (size as u32 - 1) << 16 | qid as u32,
                (vector as u32) << 16 | 0b11,
                0,
                0,
                0,
                0,
            ],
        ));
        if c.sc == 0 && c.sct == 0 {
            self.queues[qid as usize] = Some(GuestQueue {
                sq: sq_base(qid),
                sq_size: 0,
                tail: 0,
                cq: cq_base(qid),
                cq_size: size,
                head: 0,
                phase: true,
            });
        }
        c
    }

    pub fn create_sq(&mut self, qid: u16, size: u16, cqid: u16) -> Completion {
        let c = self.admin(&sqe(
            0x01,
            4,
            0,
            sq_base(qid),
            0,
            [
                (size as u32 - 1) << 16 | qid as u32,
                (cqid as u32) << 16 | 1,
                0,
                0,
                0,
                0,
            ],
        ));
        if c.sc == 0 && c.sct == 0 {
            if let Some(Some(q)) = self.queues.get_mut(qid as usize) {
                q.sq_size = size;
            }
        }
        c
    }

    /// Read (`write` false) or write `nlb` blocks at `slba` with data at `buf`
    /// (PRPs built for it, a list at `list` when it spans more than two pages).
    pub fn rw_sqe(
        cid: u16,
        write: bool,
        slba: u64,
        nlb: u32,
        buf: u64,
        list: u64,
    ) -> ([u8; 64], Vec<u64>) {
        let len = nlb as u64 * 512;
        let first = 4096 - (buf % 4096);
        let mut pages = Vec::new();
        let mut a = buf + first;
        while a < buf + len {
            pages.push(a);
            a += 4096;
        }
        let prp2 = match pages.len() {
            0 => 0,
            1 => pages[0],
            _ => list,
        };
        let e = sqe(
            if write { 0x01 } else { 0x02 },
            cid,
            1,
            buf,
            prp2,
            [slba as u32, (slba >> 32) as u32, nlb - 1, 0, 0, 0],
        );
        (e, if pages.len() > 1 { pages } else { Vec::new() })
    }

    /// Submit an I/O command and wait for its completion.
    pub fn io(&mut self, qid: u16, e: &[u8; 64]) -> Completion {
        self.submit(qid, e);
        self.reap(qid).expect("I/O completion")
    }

    /// Write a PRP list at `list`.
    pub fn write_list(&self, list: u64, pages: &[u64]) {
        let mut b = Vec::with_capacity(pages.len() * 8);
        for p in pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        if !b.is_empty() {
            self.write_mem(list, &b);
        }
    }
}
