//! The parts of the NVMe controller model that do not depend on the transport: the
//! Identify data of a namespace and its descriptor list, the common fields of the
//! Identify Controller data, the SMART / Health and Firmware Slot log pages, and the
//! feature values every nvmux controller reports. NVMe/TCP ([`crate::ctrl`]) and the
//! vfio-user PCIe controller (`nvmux-vfiouser`) both build their answers from here.

use nvmux_core::stats::DiskStats;
use nvmux_core::DeviceInfo;

/// The model number every nvmux controller reports (Identify Controller MN).
pub const MODEL: &str = "nvmux";
/// OAES / AEC bit for namespace attribute notices.
pub const AEC_NS_ATTR: u32 = 1 << 8;
/// Asynchronous event: notice, namespace attribute changed, log page 0x04 (dword 0 of the
/// Asynchronous Event Request's completion).
pub const AEN_NS_CHANGED: u32 = 0x02 | (0x04 << 16);
/// Temperature threshold the controllers report: 70 °C, in kelvin.
pub const TEMP_THRESHOLD: u32 = 273 + 70;

pub fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
/// An ASCII field padded with spaces (serial, model, firmware revision).
pub fn put_ascii(b: &mut [u8], o: usize, len: usize, s: &str) {
    let f = &mut b[o..o + len];
    f.fill(b' ');
    let n = s.len().min(len);
    f[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// The fields of Identify Controller (CNS 1) every nvmux controller shares: serial,
/// model, firmware revision, MDTS, version 1.4, OAES (namespace attribute notices when
/// `ns_notices`), the AER limit, firmware and log page attributes, and for an I/O
/// controller the queue entry sizes, MAXCMD, NN, ONCS (Dataset Management, Write
/// Zeroes) and a volatile write cache. `b` is the 4096-byte data structure.
pub struct CtrlIdent<'a> {
    pub serial: &'a str,
    pub cntlid: u16,
    pub mdts: u8,
    pub aerl: u8,
    pub maxcmd: u16,
    pub nn: u32,
    pub ns_notices: bool,
}

pub fn identify_ctrl_common(c: &CtrlIdent<'_>, b: &mut [u8]) {
    put_ascii(b, 4, 20, c.serial);
    put_ascii(b, 24, 40, MODEL);
    put_ascii(b, 64, 8, env!("CARGO_PKG_VERSION"));
    b[77] = c.mdts;
    put16(b, 78, c.cntlid);
    put32(b, 80, 0x0001_0400);
    put32(b, 92, if c.ns_notices { AEC_NS_ATTR } else { 0 }); // OAES
    b[111] = 1; // CNTRLTYPE: I/O controller
    b[258] = 3; // ACL
    b[259] = c.aerl; // AERL (0-based)
    b[260] = 0x03; // FRMW: slot 1 read-only, one slot
    b[261] = 0x04; // LPA: extended data for Get Log Page
    b[262] = 0; // ELPE: one error log entry
    b[512] = 0x66; // SQES
    b[513] = 0x44; // CQES
    put16(b, 514, c.maxcmd); // MAXCMD
    put32(b, 516, c.nn); // NN
    put16(b, 520, 1 << 2 | 1 << 3); // ONCS: dataset management, write zeroes
    b[525] = 0x01 | 0x02 << 1; // VWC present, flush of all namespaces not supported
    put32(b, 540, c.nn); // MNAN
                         // Power state 0: 9 W (centiwatts), as a placeholder nobody acts on.
    put16(b, 2048, 900);
}

/// Identify Namespace (CNS 0) of a disk of `blocks` blocks. `shared`: NMIC says the
/// namespace may be attached to more than one controller.
pub fn identify_ns(info: &DeviceInfo, blocks: u64, nguid: &[u8; 16], shared: bool, b: &mut [u8]) {
    put64(b, 0, blocks); // NSZE
    put64(b, 8, blocks); // NCAP
    put64(b, 16, blocks); // NUSE
    b[24] = 0x01 | 0x08; // NSFEAT: thin provisioning, NGUID/EUI64 never reused
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS: format 0
    b[30] = if shared { 0x01 } else { 0 }; // NMIC
    if info.discard {
        b[33] = 0x01 | 0x08; // DLFEAT: deallocated blocks read zeros; WZ may deallocate
    }
    if info.read_only {
        b[99] = 0x01; // NSATTR: write protected
    }
    b[104..120].copy_from_slice(nguid);
    // LBA format 0: no metadata, block size, best relative performance.
    b[128 + 2] = info.block_size.trailing_zeros() as u8;
}

/// Namespace Identification Descriptor list (CNS 3): NGUID, UUID (the NGUID again),
/// command set identifier (NVM).
pub fn ns_descriptors(nguid: &[u8; 16], b: &mut [u8]) {
    b[0] = 2;
    b[1] = 16;
    b[4..20].copy_from_slice(nguid);
    b[20] = 3;
    b[21] = 16;
    b[24..40].copy_from_slice(nguid);
    b[40] = 4;
    b[41] = 1;
    b[44] = 0;
}

/// SMART / Health Information (log page 2) over the disks' counters.
pub fn smart_log<'a>(disks: impl Iterator<Item = &'a DiskStats>) -> [u8; 512] {
    let mut p = [0u8; 512];
    put16(&mut p, 1, 273 + 35); // composite temperature 35 °C, in kelvin
    p[3] = 100; // available spare
    p[4] = 10; // threshold
    let (mut rd, mut wr, mut rops, mut wops) = (0u64, 0u64, 0u64, 0u64);
    for d in disks {
        let s = d.snapshot();
        rd += s.read.bytes;
        wr += s.write.bytes;
        rops += s.read.ops;
        wops += s.write.ops;
    }
    // Data units are thousands of 512-byte units, rounded up.
    let units = |b: u64| (b / 512).div_ceil(1000);
    put64(&mut p, 32, units(rd));
    put64(&mut p, 48, units(wr));
    put64(&mut p, 64, rops);
    put64(&mut p, 80, wops);
    p
}

/// Firmware Slot Information (log page 3): slot 1 active, nvmux's version.
pub fn firmware_log() -> [u8; 512] {
    let mut p = [0u8; 512];
    p[0] = 1; // AFI: slot 1 active
    put_ascii(&mut p, 8, 8, env!("CARGO_PKG_VERSION"));
    p
}

/// Get Features values both controllers answer the same way: arbitration (0x01), power
/// management (0x02), temperature threshold (0x04), error recovery (0x05), volatile write
/// cache (0x06: enabled), interrupt vector configuration (0x09), write atomicity (0x0a).
pub fn common_feature(fid: u32) -> Option<u32> {
    match fid {
        0x01 | 0x02 | 0x05 | 0x09 | 0x0a => Some(0),
        0x04 => Some(TEMP_THRESHOLD),
        0x06 => Some(1),
        _ => None,
    }
}
