//! BAR0 of an NVMe controller (NVMe 1.4, section 3.1): the controller registers and
//! the doorbells, and the boundary the NVMe controller plugs into.
//!
//! Layout of BAR0 ([`BAR0_SIZE`], 16 KiB, 64-bit memory BAR):
//!
//! | offset | what |
//! |---|---|
//! | 0x0000..0x1000 | registers: CAP, VS, INTMS, INTMC, CC, CSTS, NSSR, AQA, ASQ, ACQ |
//! | 0x1000..0x2000 | doorbells, stride 4 (CAP.DSTRD = 0): SQ y tail at 0x1000 + 8y, CQ y head at 0x1004 + 8y |
//! | 0x2000..0x3000 | MSI-X table (16 bytes per vector) |
//! | 0x3000..0x4000 | MSI-X pending bit array |
//!
//! The register file keeps the registers' state and performs the transitions the
//! specification gives the controller: CC.EN 0→1 calls [`PciNvmeDevice::enable`]
//! (CSTS.RDY = 1 when it succeeds, CSTS.CFS = 1 when it fails), CC.EN 1→0 calls
//! [`PciNvmeDevice::disable`] (CSTS.RDY = 0), CC.SHN calls
//! [`PciNvmeDevice::shutdown`] (CSTS.SHST = complete). A doorbell write is decoded into
//! a [`Doorbell`]: a queue id past the controller's [`NvmeRegs::max_queues`] or a write
//! of the wrong width is a [`Doorbell::Invalid`] event (the controller decides what the
//! guest gets; it never indexes a table with it).

/// BAR0's size.
pub const BAR0_SIZE: u64 = 0x4000;
/// The first doorbell.
pub const DOORBELL_BASE: u64 = 0x1000;
/// Where the MSI-X table and PBA live in BAR0.
pub const MSIX_TABLE: u64 = 0x2000;
pub const MSIX_PBA: u64 = 0x3000;
/// Most MSI-X vectors (the table must fit 0x2000..0x3000: 256 vectors).
pub const MAX_MSIX_VECTORS: u32 = 256;
/// Most queues per kind (admin included; doorbells must fit 0x1000..0x2000: 512).
pub const MAX_QUEUES: u16 = 512;

/// Register offsets.
pub mod reg {
    pub const CAP: u64 = 0x00;
    pub const VS: u64 = 0x08;
    pub const INTMS: u64 = 0x0c;
    pub const INTMC: u64 = 0x10;
    pub const CC: u64 = 0x14;
    pub const CSTS: u64 = 0x1c;
    pub const NSSR: u64 = 0x20;
    pub const AQA: u64 = 0x24;
    pub const ASQ: u64 = 0x28;
    pub const ACQ: u64 = 0x30;
}

/// NVMe 1.4.
pub const VERSION_1_4: u32 = 0x0001_0400;

pub const CC_EN: u32 = 1;
pub const CSTS_RDY: u32 = 1;
pub const CSTS_CFS: u32 = 2;
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// What CC.EN 0→1 hands the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnableParams {
    /// Admin submission and completion queue base (guest IOVAs, 4 KiB aligned).
    pub asq: u64,
    pub acq: u64,
    /// Admin queue sizes in entries (AQA + 1; 2..=4096).
    pub asq_entries: u16,
    pub acq_entries: u16,
    /// Memory page size in bytes (4096 << CC.MPS).
    pub page_size: u32,
    /// I/O queue entry sizes as log2 (CC.IOSQES, CC.IOCQES; checked at queue creation).
    pub iosqes: u8,
    pub iocqes: u8,
}

/// CC.SHN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Normal,
    Abrupt,
}

/// A doorbell write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doorbell {
    /// New submission queue tail (the value is not checked against the queue's size:
    /// the controller knows it).
    SqTail { qid: u16, tail: u16 },
    /// New completion queue head.
    CqHead { qid: u16, head: u16 },
    /// A write the decoder refuses: queue id past the maximum, wrong width or alignment,
    /// or a value above 16 bits.
    Invalid { offset: u64, len: usize, value: u64 },
}

/// The NVMe controller behind BAR0. Called from the session's control thread with the
/// register file's lock held; calls must not block on the guest.
///
/// The controller is built with the function's [`crate::dma::DmaSpace`] (to reach the
/// queues and PRPs) and [`crate::device::Irqs`] (to signal MSI-X vectors / INTx).
pub trait PciNvmeDevice: Send {
    /// CC.EN went 0→1 with valid admin queue registers. Ok: CSTS.RDY = 1. Err (why, for
    /// the log): CSTS.CFS = 1, as a controller fatal status.
    fn enable(&mut self, p: &EnableParams) -> Result<(), String>;
    /// CC.EN went 1→0 (controller reset) or the function was reset: stop every queue,
    /// forget them. CSTS.RDY = 0 afterwards.
    fn disable(&mut self);
    /// CC.SHN was written while enabled: finish (Normal) or drop (Abrupt) outstanding
    /// work; CSTS.SHST reports complete when this returns.
    fn shutdown(&mut self, kind: Shutdown);
    /// A doorbell was written while enabled (ignored otherwise).
    fn doorbell(&mut self, db: Doorbell);
    /// Work owed outside any register access (an asynchronous event to deliver).
    fn tick(&mut self) {}
    /// A DMA_UNMAP of `[iova, iova+size)` (`all`: everything) is about to happen: stop
    /// touching that memory first (quiesce the queues that live there).
    fn before_unmap(&mut self, _iova: u64, _size: u64, _all: bool) {}
    /// The DMA_UNMAP was carried out: resume.
    fn after_unmap(&mut self) {}
    /// The controller met a fatal error (a doorbell past a queue's size, a queue in
    /// memory that went away): the register file shows CSTS.CFS until the next reset.
    fn fatal(&self) -> bool {
        false
    }
}

/// The register file's state.
#[derive(Debug, Clone)]
pub struct NvmeRegs {
    cap: u64,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
    max_queues: u16,
    /// Writes the register file ignored (wrong width, read-only register).
    pub ignored_writes: u64,
}

/// CAP for `mqes` (maximum queue entries - 1): CQR (contiguous queues required), TO 15 s,
/// DSTRD 0, CSS NVM, MPSMIN = MPSMAX = 4 KiB.
pub fn cap_value(mqes: u16) -> u64 {
    let to = 30u64; // units of 500 ms
    mqes as u64 | (1 << 16) | (to << 24) | (1 << 37)
}

impl NvmeRegs {
    /// `max_queues`: queues per kind, admin included (clamped to 2..=[`MAX_QUEUES`]);
    /// `mqes`: largest I/O queue in entries - 1 (at least 1).
    pub fn new(max_queues: u16, mqes: u16) -> NvmeRegs {
        NvmeRegs {
            cap: cap_value(mqes.max(1)),
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            intms: 0,
            max_queues: max_queues.clamp(2, MAX_QUEUES),
            ignored_writes: 0,
        }
    }

    pub fn max_queues(&self) -> u16 {
        self.max_queues
    }
    pub fn cc(&self) -> u32 {
        self.cc
    }
    pub fn csts(&self) -> u32 {
        self.csts
    }
    pub fn enabled(&self) -> bool {
        self.cc & CC_EN != 0
    }
    /// Set CSTS.CFS (the controller met a fatal error; cleared by CC.EN 1→0).
    pub fn set_fatal(&mut self) {
        self.csts |= CSTS_CFS;
    }
    /// INTMS: the vectors masked for INTx/MSI (not used with MSI-X).
    pub fn intms(&self) -> u32 {
        self.intms
    }

    fn reg32(&self, off: u64) -> u32 {
        match off {
            0x00 => self.cap as u32,
            0x04 => (self.cap >> 32) as u32,
            0x08 => VERSION_1_4,
            reg::INTMS | reg::INTMC => self.intms,
            reg::CC => self.cc,
            reg::CSTS => self.csts,
            reg::AQA => self.aqa,
            0x28 => self.asq as u32,
            0x2c => (self.asq >> 32) as u32,
            0x30 => self.acq as u32,
            0x34 => (self.acq >> 32) as u32,
            _ => 0,
        }
    }

    /// Read `buf.len()` bytes at `off` of BAR0 (registers and doorbells; doorbells read
    /// as 0). Any width and alignment.
    pub fn read(&self, off: u64, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let o = off.saturating_add(i as u64);
            *b = if o < DOORBELL_BASE {
                (self.reg32(o & !3) >> ((o & 3) * 8)) as u8
            } else {
                0
            };
        }
    }

    /// Full controller reset (function reset, client gone): the controller is disabled
    /// and every register returns to its default.
    pub fn reset(&mut self, dev: &mut dyn PciNvmeDevice) {
        if self.enabled() || self.csts & CSTS_RDY != 0 {
            dev.disable();
        }
        self.cc = 0;
        self.csts = 0;
        self.aqa = 0;
        self.asq = 0;
        self.acq = 0;
        self.intms = 0;
    }

    /// Write `data` at `off` of BAR0's registers or doorbells. Registers take 4-byte
    /// aligned 4-byte writes and 8-byte aligned 8-byte writes (split in two halves);
    /// anything else is counted and ignored.
    pub fn write(&mut self, off: u64, data: &[u8], dev: &mut dyn PciNvmeDevice) {
        if off >= DOORBELL_BASE {
            self.doorbell(off, data, dev);
            return;
        }
        match data.len() {
            4 if off.is_multiple_of(4) => {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.write32(off, v, dev);
            }
            8 if off.is_multiple_of(8) => {
                let v = u64::from_le_bytes([
                    data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7],
                ]);
                self.write32(off, v as u32, dev);
                self.write32(off + 4, (v >> 32) as u32, dev);
            }
            _ => self.ignored_writes += 1,
        }
    }

    fn write32(&mut self, off: u64, v: u32, dev: &mut dyn PciNvmeDevice) {
        match off {
            reg::INTMS => self.intms |= v,
            reg::INTMC => self.intms &= !v,
            reg::CC => self.write_cc(v, dev),
            reg::AQA => self.aqa = v & 0x0fff_0fff,
            0x28 => self.asq = (self.asq & !0xffff_ffff) | (v & !0xfff) as u64,
            0x2c => self.asq = (self.asq & 0xffff_ffff) | ((v as u64) << 32),
            0x30 => self.acq = (self.acq & !0xffff_ffff) | (v & !0xfff) as u64,
            0x34 => self.acq = (self.acq & 0xffff_ffff) | ((v as u64) << 32),
            // NSSR: subsystem reset is not supported (CAP.NSSRS = 0).
            _ => self.ignored_writes += 1,
        }
    }

    fn write_cc(&mut self, v: u32, dev: &mut dyn PciNvmeDevice) {
        let old = self.cc;
        // Writable fields: EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES.
        self.cc = v & 0x00ff_fff1;
        let was = old & CC_EN != 0;
        let now = self.cc & CC_EN != 0;
        if !was && now {
            match self.enable_params() {
                Ok(p) => match dev.enable(&p) {
                    Ok(()) => self.csts = CSTS_RDY,
                    Err(e) => {
                        tracing::warn!("nvme: controller enable failed: {e}");
                        self.csts = CSTS_CFS;
                    }
                },
                Err(e) => {
                    tracing::warn!("nvme: CC.EN set with {e}");
                    self.csts = CSTS_CFS;
                }
            }
        } else if was && !now {
            dev.disable();
            self.csts = 0;
        }
        let shn = (self.cc >> 14) & 3;
        let old_shn = (old >> 14) & 3;
        if shn != 0 && old_shn == 0 {
            if self.csts & CSTS_RDY != 0 {
                dev.shutdown(if shn == 2 {
                    Shutdown::Abrupt
                } else {
                    Shutdown::Normal
                });
            }
            self.csts = (self.csts & !(3 << 2)) | CSTS_SHST_COMPLETE;
        } else if shn == 0 {
            self.csts &= !(3 << 2);
        }
    }

    fn enable_params(&self) -> Result<EnableParams, String> {
        let css = (self.cc >> 4) & 7;
        let mps = (self.cc >> 7) & 0xf;
        let asqs = (self.aqa & 0xfff) as u16;
        let acqs = ((self.aqa >> 16) & 0xfff) as u16;
        if css != 0 {
            return Err(format!("CC.CSS {css} (only the NVM command set, 0)"));
        }
        if mps != 0 {
            return Err(format!("CC.MPS {mps} (only 4 KiB pages, 0)"));
        }
        if asqs == 0 || acqs == 0 {
            return Err(format!("AQA {:#x}: admin queues of 1 entry", self.aqa));
        }
        if self.asq == 0 || self.acq == 0 {
            return Err(format!(
                "ASQ {:#x} ACQ {:#x}: an admin queue at address 0",
                self.asq, self.acq
            ));
        }
        Ok(EnableParams {
            asq: self.asq,
            acq: self.acq,
            asq_entries: asqs + 1,
            acq_entries: acqs + 1,
            page_size: 4096,
            iosqes: ((self.cc >> 16) & 0xf) as u8,
            iocqes: ((self.cc >> 20) & 0xf) as u8,
        })
    }

    /// Decode a doorbell write (ignored while the controller is not ready).
    fn doorbell(&mut self, off: u64, data: &[u8], dev: &mut dyn PciNvmeDevice) {
        let value = data
            .iter()
            .take(8)
            .enumerate()
            .fold(0u64, |a, (i, &b)| a | (b as u64) << (8 * i));
        let invalid = Doorbell::Invalid {
            offset: off,
            len: data.len(),
            value,
        };
        if self.csts & CSTS_RDY == 0 {
            self.ignored_writes += 1;
            return;
        }
        let rel = off - DOORBELL_BASE;
        if data.len() != 4 || !rel.is_multiple_of(4) || value > 0xffff {
            dev.doorbell(invalid);
            return;
        }
        let slot = rel / 4;
        let qid = slot / 2;
        if qid >= self.max_queues as u64 {
            dev.doorbell(invalid);
            return;
        }
        let (qid, v) = (qid as u16, value as u16);
        dev.doorbell(if slot.is_multiple_of(2) {
            Doorbell::SqTail { qid, tail: v }
        } else {
            Doorbell::CqHead { qid, head: v }
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records what the register file asked of it.
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub events: Vec<String>,
        pub fail_enable: bool,
    }

    impl PciNvmeDevice for Recorder {
        fn enable(&mut self, p: &EnableParams) -> Result<(), String> {
            self.events.push(format!(
                "enable asq={:#x} acq={:#x} {}x{}",
                p.asq, p.acq, p.asq_entries, p.acq_entries
            ));
            if self.fail_enable {
                Err("refused".into())
            } else {
                Ok(())
            }
        }
        fn disable(&mut self) {
            self.events.push("disable".into());
        }
        fn shutdown(&mut self, kind: Shutdown) {
            self.events.push(format!("shutdown {kind:?}"));
        }
        fn doorbell(&mut self, db: Doorbell) {
            self.events.push(format!("{db:?}"));
        }
    }

    fn w32(r: &mut NvmeRegs, off: u64, v: u32, d: &mut Recorder) {
        r.write(off, &v.to_le_bytes(), d);
    }
    fn r32(r: &NvmeRegs, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn enable_doorbells_shutdown() {
        let mut r = NvmeRegs::new(4, 1023);
        let mut d = Recorder::default();
        let mut cap = [0u8; 8];
        r.read(reg::CAP, &mut cap);
        let cap = u64::from_le_bytes(cap);
        assert_eq!(cap & 0xffff, 1023);
        assert_eq!((cap >> 37) & 1, 1, "CSS NVM");
        assert_eq!((cap >> 32) & 0xf, 0, "DSTRD 0");
        assert_eq!(r32(&r, reg::VS), VERSION_1_4);
        // Doorbells before the controller is ready are ignored.
        w32(&mut r, 0x1000, 1, &mut d);
        assert!(d.events.is_empty());
        w32(&mut r, reg::AQA, (31 << 16) | 31, &mut d);
        r.write(reg::ASQ, &0x1_0000_0000u64.to_le_bytes(), &mut d);
        w32(&mut r, reg::ACQ, 0x2000, &mut d);
        w32(&mut r, reg::CC, (6 << 16) | (4 << 20) | CC_EN, &mut d);
        assert_eq!(r32(&r, reg::CSTS) & CSTS_RDY, 1);
        assert_eq!(d.events[0], "enable asq=0x100000000 acq=0x2000 32x32");
        w32(&mut r, 0x1000, 5, &mut d); // SQ0 tail
        w32(&mut r, 0x1004, 3, &mut d); // CQ0 head
        w32(&mut r, 0x1000 + 8 * 3 + 4, 7, &mut d); // CQ3 head
        w32(&mut r, 0x1000 + 8 * 4, 1, &mut d); // SQ4: past max_queues
        r.write(0x1002, &[1, 0], &mut d); // a 2-byte doorbell
        w32(&mut r, 0x1ffc, 1, &mut d); // the last doorbell slot: far past the maximum
        assert_eq!(d.events[1], "SqTail { qid: 0, tail: 5 }");
        assert_eq!(d.events[2], "CqHead { qid: 0, head: 3 }");
        assert_eq!(d.events[3], "CqHead { qid: 3, head: 7 }");
        assert!(
            d.events[4].starts_with("Invalid { offset: 4128"),
            "{}",
            d.events[4]
        );
        assert!(d.events[5].starts_with("Invalid"));
        assert!(d.events[6].starts_with("Invalid"));
        // Shutdown, then disable.
        let cc = r.cc();
        w32(&mut r, reg::CC, cc | (1 << 14), &mut d);
        assert_eq!(r32(&r, reg::CSTS) & (3 << 2), CSTS_SHST_COMPLETE);
        assert_eq!(d.events[7], "shutdown Normal");
        w32(&mut r, reg::CC, 0, &mut d);
        assert_eq!(r32(&r, reg::CSTS), 0);
        assert_eq!(d.events[8], "disable");
        // Bad widths are ignored; INTMS/INTMC.
        r.write(reg::CC, &[1], &mut d);
        assert_eq!(r.cc(), 0);
        w32(&mut r, reg::INTMS, 0b101, &mut d);
        w32(&mut r, reg::INTMC, 0b001, &mut d);
        assert_eq!(r32(&r, reg::INTMS), 0b100);
    }

    #[test]
    fn bad_enable_sets_cfs() {
        let mut r = NvmeRegs::new(4, 63);
        let mut d = Recorder::default();
        w32(&mut r, reg::CC, CC_EN, &mut d); // AQA/ASQ/ACQ not set
        assert_eq!(r.csts() & CSTS_CFS, CSTS_CFS);
        assert!(d.events.is_empty());
        w32(&mut r, reg::CC, 0, &mut d);
        w32(&mut r, reg::AQA, 0x0001_0001, &mut d);
        w32(&mut r, reg::ASQ, 0x1000, &mut d);
        w32(&mut r, reg::ACQ, 0x2000, &mut d);
        d.fail_enable = true;
        w32(&mut r, reg::CC, CC_EN, &mut d);
        assert_eq!(r.csts(), CSTS_CFS);
    }
}
