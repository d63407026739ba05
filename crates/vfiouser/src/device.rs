//! What a session asks of the device it serves, and the interrupts the device raises.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::dma::DmaSpace;
use crate::proto::{
    Errno, SetIrqs, EINVAL, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_MASK_ALL, IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_MASK,
    IRQ_SET_DATA_NONE,
};

/// A region as DEVICE_GET_REGION_INFO reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub size: u64,
    /// [`crate::proto::REGION_READ`] | [`crate::proto::REGION_WRITE`].
    pub flags: u32,
}

/// An interrupt index as DEVICE_GET_IRQ_INFO reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    pub count: u32,
    pub flags: u32,
}

/// A device served over vfio-user. The session checks a request's framing and that a
/// region access lies inside the region's size before it calls these.
pub trait VfioDevice: Send {
    /// DEVICE_GET_INFO flags ([`crate::proto::DEVICE_FLAGS_PCI`], ...).
    fn flags(&self) -> u32;
    fn num_regions(&self) -> u32;
    fn num_irqs(&self) -> u32;
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// Fill `buf` from `offset` of region `index` (inside the region).
    fn region_read(&mut self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Write `data` at `offset` of region `index` (inside the region).
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), Errno>;
    /// DEVICE_SET_IRQS (`fds`: the eventfds that came with it, owned).
    fn set_irqs(&mut self, req: &SetIrqs<'_>, fds: Vec<OwnedFd>) -> Result<(), Errno>;
    /// DEVICE_RESET, and the end of a connection.
    fn reset(&mut self);
    /// The client's DMA space (the session maps and unmaps into it).
    fn dma(&self) -> &Arc<DmaSpace>;
    /// Called on the control thread each time the session's task runs (a message came,
    /// or the owner woke the task): work the device owes outside any message.
    fn tick(&mut self) {}
    /// Before a DMA_UNMAP of `[iova, iova+size)` (`all`: every mapping) is carried out:
    /// the device stops using that memory (quiesces the queues that live there).
    fn before_unmap(&mut self, _iova: u64, _size: u64, _all: bool) {}
    /// The DMA_UNMAP was carried out (the device may resume).
    fn after_unmap(&mut self) {}
}

/// VFIO PCI interrupt indexes.
pub const IRQ_INTX: u32 = 0;
pub const IRQ_MSI: u32 = 1;
pub const IRQ_MSIX: u32 = 2;
pub const IRQ_ERR: u32 = 3;
pub const IRQ_REQ: u32 = 4;
pub const NUM_IRQS: u32 = 5;

#[derive(Default)]
struct Intx {
    trigger: Option<OwnedFd>,
    /// QEMU's resample descriptor (ACTION_UNMASK with DATA_EVENTFD), kept, not used.
    unmask: Option<OwnedFd>,
    masked: bool,
    /// The device asserts the line (re-signalled on unmask).
    asserted: bool,
}

/// The eventfds behind a PCI function's interrupts: INTx and MSI-X vectors. Shared with
/// the controller's queues, which signal them.
pub struct Irqs {
    msix: Mutex<Vec<Option<OwnedFd>>>,
    intx: Mutex<Intx>,
    /// The ERR and REQ notifiers QEMU registers (kept; nvmux never signals them).
    notifiers: Mutex<[Option<OwnedFd>; 2]>,
    nvectors: u32,
}

fn signal(fd: &OwnedFd) {
    nvmux_core::eventfd::signal_fd(fd.as_raw_fd());
}

impl Irqs {
    pub fn new(nvectors: u32) -> Irqs {
        Irqs {
            msix: Mutex::new((0..nvectors).map(|_| None).collect()),
            intx: Mutex::new(Intx::default()),
            notifiers: Mutex::new([None, None]),
            nvectors,
        }
    }

    pub fn msix_vectors(&self) -> u32 {
        self.nvectors
    }

    /// Signal MSI-X vector `v`; false when the client set no eventfd for it.
    pub fn signal_msix(&self, v: u32) -> bool {
        let g = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        match g.get(v as usize) {
            Some(Some(fd)) => {
                signal(fd);
                true
            }
            _ => false,
        }
    }

    /// Vectors with an eventfd.
    pub fn msix_set(&self) -> usize {
        let g = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().filter(|f| f.is_some()).count()
    }

    /// Assert INTx: signalled unless masked; masked automatically until the client
    /// unmasks it (AUTOMASKED, as VFIO's INTx).
    pub fn assert_intx(&self) {
        let mut g = self.intx.lock().unwrap_or_else(|e| e.into_inner());
        g.asserted = true;
        if !g.masked {
            if let Some(fd) = &g.trigger {
                signal(fd);
                g.masked = true;
            }
        }
    }

    /// De-assert INTx.
    pub fn deassert_intx(&self) {
        self.intx.lock().unwrap_or_else(|e| e.into_inner()).asserted = false;
    }

    /// Forget every eventfd (device reset, client gone).
    pub fn clear(&self) {
        for f in self
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            *f = None;
        }
        *self.intx.lock().unwrap_or_else(|e| e.into_inner()) = Intx::default();
        *self.notifiers.lock().unwrap_or_else(|e| e.into_inner()) = [None, None];
    }

    /// How many vectors index `index` has (0: not offered).
    pub fn count(&self, index: u32) -> u32 {
        match index {
            IRQ_INTX | IRQ_ERR | IRQ_REQ => 1,
            IRQ_MSIX => self.nvectors,
            _ => 0,
        }
    }

    /// DEVICE_SET_IRQS with the semantics of the kernel's VFIO_DEVICE_SET_IRQS.
    pub fn set(&self, req: &SetIrqs<'_>, mut fds: Vec<OwnedFd>) -> Result<(), Errno> {
        let data = req.flags & IRQ_SET_DATA_MASK;
        let action = req.flags & IRQ_SET_ACTION_MASK_ALL;
        let max = self.count(req.index);
        let end = req.start.checked_add(req.count).ok_or(EINVAL)?;
        // count 0 with DATA_NONE | TRIGGER: disable the whole index.
        if req.count == 0 {
            if data == IRQ_SET_DATA_NONE && action == IRQ_SET_ACTION_TRIGGER {
                match req.index {
                    IRQ_INTX => {
                        let mut g = self.intx.lock().unwrap_or_else(|e| e.into_inner());
                        g.trigger = None;
                        g.unmask = None;
                    }
                    IRQ_MSIX => {
                        for f in self
                            .msix
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .iter_mut()
                        {
                            *f = None;
                        }
                    }
                    IRQ_ERR | IRQ_REQ => {
                        let mut g = self.notifiers.lock().unwrap_or_else(|e| e.into_inner());
                        g[(req.index - IRQ_ERR) as usize] = None;
                    }
                    _ if req.index < NUM_IRQS => {}
                    _ => return Err(EINVAL),
                }
                return Ok(());
            }
            return Err(EINVAL);
        }
        if end > max {
            return Err(EINVAL);
        }
        // Which vectors a DATA_NONE/DATA_BOOL action applies to.
        let pick = |i: u32| -> bool {
            match data {
                IRQ_SET_DATA_BOOL => req
                    .data
                    .get((i - req.start) as usize)
                    .is_some_and(|&b| b != 0),
                _ => true,
            }
        };
        match (req.index, action) {
            (IRQ_INTX, IRQ_SET_ACTION_TRIGGER) => {
                let mut g = self.intx.lock().unwrap_or_else(|e| e.into_inner());
                match data {
                    IRQ_SET_DATA_EVENTFD => g.trigger = fds.pop(),
                    _ => {
                        if pick(0) {
                            if let Some(fd) = &g.trigger {
                                signal(fd);
                            }
                        }
                    }
                }
                Ok(())
            }
            (IRQ_INTX, IRQ_SET_ACTION_MASK) => {
                if data == IRQ_SET_DATA_EVENTFD {
                    return Err(EINVAL);
                }
                if pick(0) {
                    self.intx.lock().unwrap_or_else(|e| e.into_inner()).masked = true;
                }
                Ok(())
            }
            (IRQ_INTX, IRQ_SET_ACTION_UNMASK) => {
                let mut g = self.intx.lock().unwrap_or_else(|e| e.into_inner());
                if data == IRQ_SET_DATA_EVENTFD {
                    g.unmask = fds.pop();
                } else if pick(0) {
                    g.masked = false;
                    if g.asserted {
                        if let Some(fd) = &g.trigger {
                            signal(fd);
                            g.masked = true;
                        }
                    }
                }
                Ok(())
            }
            (IRQ_MSIX, IRQ_SET_ACTION_TRIGGER) => {
                let mut g = self.msix.lock().unwrap_or_else(|e| e.into_inner());
                if data == IRQ_SET_DATA_EVENTFD {
                    let mut it = fds.into_iter();
                    let have = it.len() != 0;
                    for i in req.start..end {
                        if let Some(slot) = g.get_mut(i as usize) {
                            *slot = if have { it.next() } else { None };
                        }
                    }
                } else {
                    for i in req.start..end {
                        if pick(i) {
                            if let Some(Some(fd)) = g.get(i as usize) {
                                signal(fd);
                            }
                        }
                    }
                }
                Ok(())
            }
            (IRQ_ERR | IRQ_REQ, IRQ_SET_ACTION_TRIGGER) => {
                if data == IRQ_SET_DATA_EVENTFD {
                    let mut g = self.notifiers.lock().unwrap_or_else(|e| e.into_inner());
                    g[(req.index - IRQ_ERR) as usize] = fds.pop();
                }
                Ok(())
            }
            // MSI-X masking is done by the client (QEMU emulates the table), as with
            // the kernel's vfio-pci.
            _ => Err(EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmux_core::eventfd::EventFd;

    fn req(flags: u32, index: u32, start: u32, count: u32) -> SetIrqs<'static> {
        SetIrqs {
            flags,
            index,
            start,
            count,
            data: &[],
        }
    }

    fn dup(e: &EventFd) -> OwnedFd {
        e.as_fd().try_clone_to_owned().unwrap()
    }
    use std::os::fd::AsFd;

    #[test]
    fn msix_and_intx() {
        let irqs = Irqs::new(4);
        let (a, b) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        irqs.set(
            &req(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                IRQ_MSIX,
                1,
                2,
            ),
            vec![dup(&a), dup(&b)],
        )
        .unwrap();
        assert!(!irqs.signal_msix(0));
        assert!(irqs.signal_msix(2));
        assert_eq!(b.drain(), 1);
        // Out of range vectors, unknown index.
        assert_eq!(
            irqs.set(
                &req(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_MSIX, 3, 2),
                vec![]
            ),
            Err(EINVAL)
        );
        assert_eq!(
            irqs.set(
                &req(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 9, 0, 1),
                vec![]
            ),
            Err(EINVAL)
        );
        // Unset vector 1 (no descriptors), then disable the index.
        irqs.set(
            &req(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                IRQ_MSIX,
                1,
                1,
            ),
            vec![],
        )
        .unwrap();
        assert!(!irqs.signal_msix(1));
        irqs.set(
            &req(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, IRQ_MSIX, 0, 0),
            vec![],
        )
        .unwrap();
        assert_eq!(irqs.msix_set(), 0);
        // INTx is masked after it fires, re-fires on unmask while asserted.
        let i = EventFd::new().unwrap();
        irqs.set(
            &req(
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                IRQ_INTX,
                0,
                1,
            ),
            vec![dup(&i)],
        )
        .unwrap();
        irqs.assert_intx();
        irqs.assert_intx();
        assert_eq!(i.drain(), 1);
        irqs.set(
            &req(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, IRQ_INTX, 0, 1),
            vec![],
        )
        .unwrap();
        assert_eq!(i.drain(), 1);
        irqs.deassert_intx();
        irqs.set(
            &req(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, IRQ_INTX, 0, 1),
            vec![],
        )
        .unwrap();
        assert_eq!(i.drain(), 0);
    }
}
