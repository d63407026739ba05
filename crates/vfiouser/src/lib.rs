//! nvmux's vfio-user server: the guest sees a PCI Express NVMe controller that nvmux
//! emulates in userspace, QEMU (10.1 and later, `-device vfio-user-pci,socket=…`) being
//! the client.
//!
//! - [`proto`]: the wire format (header, requests, replies) and its limits;
//! - [`session`]: one connection served without blocking, and the listening socket as a
//!   task on the control threads ([`nvmux_core::ctlpoll`]);
//! - [`dma`]: the client's DMA mappings, mapped and bounds-checked per access;
//! - [`device`]: the [`device::VfioDevice`] a session drives, and the interrupts
//!   ([`device::Irqs`]: INTx and MSI-X eventfds);
//! - [`pci`]: the PCI function of an NVMe controller (configuration space, BAR0);
//! - [`nvme`]: BAR0's register file and doorbells, and [`nvme::PciNvmeDevice`], the
//!   boundary the NVMe controller plugs into.
//!
//! The rust-vmm `vfio-user` crate is not used: see docs/ARCHITECTURE.md.

pub mod ctrl;
pub mod device;
pub mod dma;
pub mod export;
pub mod fuzzing;
mod json;
pub mod nvme;
pub mod pci;
pub mod proto;
pub mod prp;
pub mod queue;
pub mod session;
#[doc(hidden)]
pub mod testkit;

pub use export::{ExportConfig, ExportStatus, VfioUserExport};

#[cfg(test)]
mod ctrl_tests;
#[cfg(test)]
mod tests;
