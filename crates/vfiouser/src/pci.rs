//! A PCI Express function for an NVMe controller: its configuration space and the
//! [`VfioDevice`] that serves it (regions: BAR0 and the config space; interrupts: INTx
//! and MSI-X).
//!
//! Configuration space (4 KiB, extended space empty):
//!
//! | offset | what |
//! |---|---|
//! | 0x00 | vendor [`VENDOR_ID`], device [`DEVICE_ID`] (see docs/vfio-user.md: not assigned by the PCI-SIG; the guest's nvme driver binds on the class code) |
//! | 0x08 | revision 0, class 0x010802 (mass storage, NVM, NVMe) |
//! | 0x10 | BAR0: 64-bit memory, non-prefetchable, [`crate::nvme::BAR0_SIZE`] |
//! | 0x2c | subsystem vendor/id = vendor/device |
//! | 0x34 | capabilities at 0x40 |
//! | 0x3d | interrupt pin A |
//! | 0x40 | power management (D0/D3hot, No_Soft_Reset) |
//! | 0x50 | MSI-X: table in BAR0 at 0x2000, PBA in BAR0 at 0x3000 |
//! | 0x60 | PCI Express v2, endpoint, 2.5 GT/s x1 |
//!
//! Writes change only the bits a real function lets software write (command register,
//! BAR0 address bits, interrupt line, MSI-X enable/mask, PM state, PCIe control
//! registers); status bits are not write-1-to-clear here (nothing sets them).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::device::{
    IrqInfo, Irqs, RegionInfo, VfioDevice, IRQ_ERR, IRQ_INTX, IRQ_MSIX, IRQ_REQ, NUM_IRQS,
};
use crate::dma::DmaSpace;
use crate::nvme::{NvmeRegs, PciNvmeDevice, BAR0_SIZE, MSIX_PBA, MSIX_TABLE};
use crate::proto::{
    Errno, SetIrqs, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, EINVAL, IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE, REGION_READ, REGION_WRITE,
};

/// PCI vendor id: 0x4e56 ("NV"), not assigned to anyone in the PCI ID database Debian 12
/// ships (see docs/vfio-user.md). Linux's nvme driver matches the class code, and no
/// quirk of its table matches this id.
pub const VENDOR_ID: u16 = 0x4e56;
/// PCI device id: the nvmux NVMe controller.
pub const DEVICE_ID: u16 = 0x0001;
/// Class code: mass storage (01), non-volatile memory (08), NVMe (02).
pub const CLASS_NVME: u32 = 0x01_08_02;
/// Configuration space size.
pub const CONFIG_SIZE: usize = 4096;

/// VFIO PCI region indexes.
pub const REGION_BAR0: u32 = 0;
pub const REGION_ROM: u32 = 6;
pub const REGION_CONFIG: u32 = 7;
pub const NUM_REGIONS: u32 = 9;

const CAP_PM: usize = 0x40;
const CAP_MSIX: usize = 0x50;
const CAP_EXP: usize = 0x60;

/// A function's configuration space with its write masks.
pub struct PciConfig {
    bytes: Box<[u8; CONFIG_SIZE]>,
    wmask: Box<[u8; CONFIG_SIZE]>,
}

impl PciConfig {
    /// The NVMe function's configuration space, with `msix_vectors` MSI-X vectors
    /// (1..=[`crate::nvme::MAX_MSIX_VECTORS`]).
    pub fn nvme(msix_vectors: u32) -> PciConfig {
        let mut c = PciConfig {
            bytes: Box::new([0; CONFIG_SIZE]),
            wmask: Box::new([0; CONFIG_SIZE]),
        };
        c.set16(0x00, VENDOR_ID);
        c.set16(0x02, DEVICE_ID);
        // Command: I/O, memory, bus master, parity, SERR, INTx disable.
        c.wmask16(0x04, 0x0547);
        c.set16(0x06, 0x0010); // status: capabilities list
        c.bytes[0x08] = 0; // revision
        c.bytes[0x09] = (CLASS_NVME & 0xff) as u8;
        c.bytes[0x0a] = ((CLASS_NVME >> 8) & 0xff) as u8;
        c.bytes[0x0b] = (CLASS_NVME >> 16) as u8;
        c.wmask[0x0c] = 0xff; // cache line size
        c.wmask[0x0d] = 0xff; // latency timer
                              // BAR0: 64-bit memory; address bits above the size are writable.
        c.set32(0x10, 0x4);
        c.wmask32(0x10, !(BAR0_SIZE as u32 - 1) & 0xffff_fff0);
        c.wmask32(0x14, 0xffff_ffff);
        c.set16(0x2c, VENDOR_ID);
        c.set16(0x2e, DEVICE_ID);
        c.bytes[0x34] = CAP_PM as u8;
        c.wmask[0x3c] = 0xff; // interrupt line
        c.bytes[0x3d] = 1; // INTA#
                           // Power management v3, No_Soft_Reset; PMCSR power state writable.
        c.bytes[CAP_PM] = 0x01;
        c.bytes[CAP_PM + 1] = CAP_MSIX as u8;
        c.set16(CAP_PM + 2, 0x0003);
        c.set16(CAP_PM + 4, 0x0008);
        c.wmask16(CAP_PM + 4, 0x0003);
        // MSI-X: table size N-1, enable and function mask writable.
        let n = msix_vectors.clamp(1, crate::nvme::MAX_MSIX_VECTORS);
        c.bytes[CAP_MSIX] = 0x11;
        c.bytes[CAP_MSIX + 1] = CAP_EXP as u8;
        c.set16(CAP_MSIX + 2, (n - 1) as u16);
        c.wmask16(CAP_MSIX + 2, 0xc000);
        c.set32(CAP_MSIX + 4, MSIX_TABLE as u32); // BIR 0
        c.set32(CAP_MSIX + 8, MSIX_PBA as u32); // BIR 0
                                                // PCI Express v2 endpoint.
        c.bytes[CAP_EXP] = 0x10;
        c.bytes[CAP_EXP + 1] = 0;
        c.set16(CAP_EXP + 2, 0x0002);
        c.set32(CAP_EXP + 4, 0x0000_8000); // devcap: role-based error reporting, MPS 128
        c.wmask16(CAP_EXP + 8, 0x7cff); // devctl (no FLR bit: FLR not offered)
        c.set32(CAP_EXP + 0x0c, 0x0000_0011); // linkcap: 2.5 GT/s, x1
        c.wmask16(CAP_EXP + 0x10, 0x01c3); // linkctl
        c.set16(CAP_EXP + 0x12, 0x0011); // linksta: 2.5 GT/s, x1
        c.wmask16(CAP_EXP + 0x28, 0x041f); // devctl2
        c
    }

    fn set16(&mut self, o: usize, v: u16) {
        self.bytes[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(&mut self, o: usize, v: u32) {
        self.bytes[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn wmask16(&mut self, o: usize, v: u16) {
        self.wmask[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn wmask32(&mut self, o: usize, v: u32) {
        self.wmask[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get16(&self, o: usize) -> u16 {
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }

    /// Bytes at `off` (the caller checked off + len <= CONFIG_SIZE).
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.bytes.get(off + i).copied().unwrap_or(0);
        }
    }

    /// Write through the masks (bytes outside the space are ignored).
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = off + i;
            if let (Some(b), Some(&m)) = (self.bytes.get_mut(o), self.wmask.get(o)) {
                *b = (*b & !m) | (v & m);
            }
        }
    }

    pub fn command(&self) -> u16 {
        self.get16(0x04)
    }
    /// The function may master DMA (command register bit 2).
    pub fn bus_master(&self) -> bool {
        self.command() & 0x4 != 0
    }
    pub fn intx_disabled(&self) -> bool {
        self.command() & 0x400 != 0
    }
    pub fn msix_enabled(&self) -> bool {
        self.get16(CAP_MSIX + 2) & 0x8000 != 0
    }

    /// Back to power-on values (keeps the read-only identity).
    pub fn reset(&mut self, msix_vectors: u32) {
        *self = PciConfig::nvme(msix_vectors);
    }
}

/// The NVMe PCI function served over vfio-user: configuration space, BAR0 (register
/// file, doorbells, MSI-X table) and interrupts, with the controller `C` behind BAR0.
pub struct NvmePci<C: PciNvmeDevice> {
    pub config: PciConfig,
    pub regs: NvmeRegs,
    pub ctrl: C,
    msix_table: Vec<u8>,
    irqs: Arc<Irqs>,
    dma: Arc<DmaSpace>,
}

impl<C: PciNvmeDevice> NvmePci<C> {
    /// A function whose controller `ctrl` was built with the same `irqs` and `dma`.
    /// `max_queues`: queues per kind, admin included; `mqes`: CAP.MQES.
    pub fn new(ctrl: C, irqs: Arc<Irqs>, dma: Arc<DmaSpace>, max_queues: u16, mqes: u16) -> Self {
        let n = irqs.msix_vectors().clamp(1, crate::nvme::MAX_MSIX_VECTORS);
        NvmePci {
            config: PciConfig::nvme(n),
            regs: NvmeRegs::new(max_queues, mqes),
            ctrl,
            msix_table: msix_table(n),
            irqs,
            dma,
        }
    }

    pub fn irqs(&self) -> &Arc<Irqs> {
        &self.irqs
    }

    fn nvectors(&self) -> u32 {
        self.irqs
            .msix_vectors()
            .clamp(1, crate::nvme::MAX_MSIX_VECTORS)
    }

    fn bar0_read(&self, off: u64, buf: &mut [u8]) {
        if off < MSIX_TABLE {
            self.regs.read(off, buf);
        } else if off < MSIX_PBA {
            let o = (off - MSIX_TABLE) as usize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.msix_table.get(o + i).copied().unwrap_or(0);
            }
        } else {
            // Pending bits: the client (QEMU) tracks pending vectors itself.
            buf.fill(0);
        }
    }

    fn bar0_write(&mut self, off: u64, data: &[u8]) {
        if off < MSIX_TABLE {
            // Doorbells go through even without bus mastering: the controller checks
            // [`PciConfig::bus_master`] itself before any DMA.
            self.regs.write(off, data, &mut self.ctrl);
            if self.ctrl.fatal() {
                self.regs.set_fatal();
            }
        } else if off < MSIX_PBA {
            let o = (off - MSIX_TABLE) as usize;
            for (i, &v) in data.iter().enumerate() {
                if let Some(b) = self.msix_table.get_mut(o + i) {
                    *b = v;
                }
            }
        }
    }
}

/// An MSI-X table with every vector masked (as at reset).
fn msix_table(n: u32) -> Vec<u8> {
    let mut t = vec![0u8; n as usize * 16];
    for e in t.chunks_mut(16) {
        e[12] = 1;
    }
    t
}

impl<C: PciNvmeDevice> VfioDevice for NvmePci<C> {
    fn flags(&self) -> u32 {
        DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET
    }
    fn num_regions(&self) -> u32 {
        NUM_REGIONS
    }
    fn num_irqs(&self) -> u32 {
        NUM_IRQS
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        match index {
            REGION_BAR0 => Some(RegionInfo {
                size: BAR0_SIZE,
                flags: REGION_READ | REGION_WRITE,
            }),
            REGION_CONFIG => Some(RegionInfo {
                size: CONFIG_SIZE as u64,
                flags: REGION_READ | REGION_WRITE,
            }),
            // BAR1 (BAR0's upper half) to BAR5, the ROM and VGA: absent (size 0).
            i if i < NUM_REGIONS => Some(RegionInfo { size: 0, flags: 0 }),
            _ => None,
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        match index {
            IRQ_INTX => Some(IrqInfo {
                count: 1,
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            }),
            IRQ_MSIX => Some(IrqInfo {
                count: self.nvectors(),
                flags: IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
            }),
            // Error and request notifiers: accepted, never signalled (QEMU warns
            // without them).
            IRQ_ERR | IRQ_REQ => Some(IrqInfo {
                count: 1,
                flags: IRQ_INFO_EVENTFD,
            }),
            i if i < NUM_IRQS => Some(IrqInfo { count: 0, flags: 0 }),
            _ => None,
        }
    }

    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        // A queue may have failed on its worker since the last message (CSTS.CFS).
        if index == REGION_BAR0 && self.ctrl.fatal() {
            self.regs.set_fatal();
        }
        match index {
            REGION_BAR0 => self.bar0_read(offset, buf),
            REGION_CONFIG => self.config.read(offset as usize, buf),
            _ => return Err(EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match index {
            REGION_BAR0 => self.bar0_write(offset, data),
            REGION_CONFIG => self.config.write(offset as usize, data),
            _ => return Err(EINVAL),
        }
        Ok(())
    }

    fn set_irqs(&mut self, req: &SetIrqs<'_>, fds: Vec<OwnedFd>) -> Result<(), Errno> {
        self.irqs.set(req, fds)
    }

    fn reset(&mut self) {
        self.regs.reset(&mut self.ctrl);
        let n = self.nvectors();
        self.config.reset(n);
        self.msix_table = msix_table(n);
        self.irqs.clear();
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    fn tick(&mut self) {
        self.ctrl.tick();
        if self.ctrl.fatal() {
            self.regs.set_fatal();
        }
    }

    fn before_unmap(&mut self, iova: u64, size: u64, all: bool) {
        self.ctrl.before_unmap(iova, size, all);
    }

    fn after_unmap(&mut self) {
        self.ctrl.after_unmap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::tests::Recorder;

    #[test]
    fn config_space() {
        let mut f = NvmePci::new(
            Recorder::default(),
            Arc::new(Irqs::new(8)),
            Arc::new(DmaSpace::new()),
            8,
            1023,
        );
        let mut b = [0u8; 64];
        f.region_read(REGION_CONFIG, 0, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), VENDOR_ID);
        assert_eq!(
            u32::from_le_bytes([b[8], b[9], b[10], b[11]]) >> 8,
            CLASS_NVME
        );
        // BAR sizing: all ones reads back the size mask with the type bits.
        f.region_write(REGION_CONFIG, 0x10, &[0xff; 4]).unwrap();
        f.region_read(REGION_CONFIG, 0x10, &mut b[..4]).unwrap();
        assert_eq!(
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            !(BAR0_SIZE as u32 - 1) | 4
        );
        // Read-only identity, writable command.
        f.region_write(REGION_CONFIG, 0, &[0, 0, 0, 0]).unwrap();
        f.region_write(REGION_CONFIG, 4, &[0x06, 0]).unwrap();
        f.region_read(REGION_CONFIG, 0, &mut b[..8]).unwrap();
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), VENDOR_ID);
        assert!(f.config.bus_master());
        // The capability chain: PM -> MSI-X -> PCIe.
        let mut cap = [0u8; 1];
        f.region_read(REGION_CONFIG, 0x34, &mut cap).unwrap();
        let mut ids = Vec::new();
        let mut p = cap[0] as u64;
        while p != 0 {
            let mut h = [0u8; 2];
            f.region_read(REGION_CONFIG, p, &mut h).unwrap();
            ids.push(h[0]);
            p = h[1] as u64;
        }
        assert_eq!(ids, [0x01, 0x11, 0x10]);
        // MSI-X table size 8 (N-1 = 7).
        f.region_read(REGION_CONFIG, 0x52, &mut b[..2]).unwrap();
        assert_eq!(u16::from_le_bytes([b[0], b[1]]) & 0x7ff, 7);
        // The MSI-X table is plain storage; reset masks it again.
        f.region_write(REGION_BAR0, MSIX_TABLE + 12, &[0, 0, 0, 0])
            .unwrap();
        f.region_read(REGION_BAR0, MSIX_TABLE + 12, &mut b[..1])
            .unwrap();
        assert_eq!(b[0], 0);
        f.reset();
        f.region_read(REGION_BAR0, MSIX_TABLE + 12, &mut b[..1])
            .unwrap();
        assert_eq!(b[0], 1);
        assert!(!f.config.bus_master());
    }
}
