//! virtio-blk protocol core: feature bits, the config space, and request parsing.
//!
//! Nothing here does I/O. A request is parsed from the list of descriptors of its chain
//! plus a [`GuestMem`] that translates guest addresses, so the parser runs in unit tests
//! and under the fuzzer on a plain byte vector.
//!
//! With VIRTIO_F_VERSION_1 a driver may lay a request out over descriptors any way it
//! likes, so the parser treats the chain as two byte streams: the device-readable part
//! (16-byte header, then write payload) and the device-writable part (read payload, then
//! the status byte as the very last byte).

use nvmux_core::{DeviceInfo, Opcode, SgList, Status};

// Feature bits (virtio 1.2, 5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the serial a GET_ID request returns.
pub const ID_BYTES: usize = 20;
/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SIZE: usize = 60;
/// Largest data transfer of one request. Larger requests fail with IOERR.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Largest number of data segments of one request: the `seg_max` the config space
/// advertises (it fits a 128-entry queue with the header and status descriptors, without
/// indirect descriptors). A request with more is refused (IOERR) before anything is
/// allocated for it, so a request's SG list, kept per slot, never grows past this.
pub const MAX_SEGMENTS: usize = 126;
/// Largest discard / write-zeroes range, in 512-byte sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// The virtio status byte for an NVMe status.
pub fn virtio_status(s: Status) -> u8 {
    if s.is_ok() {
        VIRTIO_BLK_S_OK
    } else if s == Status::INVALID_OPCODE {
        VIRTIO_BLK_S_UNSUPP
    } else {
        VIRTIO_BLK_S_IOERR
    }
}

/// Device features offered for a disk.
pub fn device_features(info: &DeviceInfo) -> u64 {
    let mut f = VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_BLK_SIZE
        | VIRTIO_BLK_F_TOPOLOGY
        | VIRTIO_BLK_F_MQ
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_RING_F_EVENT_IDX
        | VHOST_USER_F_PROTOCOL_FEATURES
        | VIRTIO_F_VERSION_1;
    if info.volatile_cache {
        // Without a volatile cache (null, memory) every write is as durable as it gets.
        f |= VIRTIO_BLK_F_FLUSH;
    }
    if info.read_only {
        f |= VIRTIO_BLK_F_RO;
    } else {
        if info.discard {
            f |= VIRTIO_BLK_F_DISCARD;
        }
        if info.write_zeroes {
            f |= VIRTIO_BLK_F_WRITE_ZEROES;
        }
    }
    f
}

/// The config space (`struct virtio_blk_config`, little-endian).
pub fn config_space(info: &DeviceInfo, num_queues: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let put32 = |c: &mut [u8; CONFIG_SIZE], off: usize, v: u32| {
        c[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    c[0..8].copy_from_slice(&(info.size_bytes() / 512).to_le_bytes()); // capacity
    put32(&mut c, 8, 0); // size_max (feature not offered)
    put32(&mut c, 12, MAX_SEGMENTS as u32); // seg_max
                                            // geometry (16..20) left zero
    put32(&mut c, 20, info.block_size); // blk_size
    c[24] = (info.block_size / 512).trailing_zeros() as u8; // physical_block_exp
    c[25] = 0; // alignment_offset
    c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size (blocks)
    put32(&mut c, 28, 0); // opt_io_size
    c[32] = 0; // writeback
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    put32(&mut c, 36, MAX_DISCARD_SECTORS); // max_discard_sectors
    put32(&mut c, 40, 1); // max_discard_seg
    put32(&mut c, 44, info.block_size / 512); // discard_sector_alignment
    put32(&mut c, 48, MAX_DISCARD_SECTORS); // max_write_zeroes_sectors
    put32(&mut c, 52, 1); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// Translates guest physical addresses to host pointers.
pub trait GuestMem {
    /// A host pointer to `len` bytes at `gpa`, if the whole range lies in guest memory.
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<*mut u8>;
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A command for the block device.
    Io(Opcode),
    /// Return the serial (handled by the frontend).
    GetId,
    /// An unknown request type: complete with UNSUPP.
    Unsupported(u32),
}

/// A parsed request. Data segments were pushed into the caller's [`SgList`].
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// Starting LBA in device blocks.
    pub lba: u64,
    /// Block count (0 for flush, get-id, unsupported).
    pub blocks: u32,
    /// Host address of the status byte.
    pub status: *mut u8,
    /// Bytes the device writes on success (read payload + status), for the used ring.
    pub used_len: u32,
    /// Parse-time failure to report through the status byte (bad range, bad address).
    pub error: Option<Status>,
}

/// Why a chain cannot even carry a status back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No writable byte at the end of the chain, or it lies outside guest memory.
    NoStatus,
}

/// Parse one chain. Data segments go into `sg` (cleared first).
pub fn parse(
    segs: &[Seg],
    mem: &dyn GuestMem,
    info: &DeviceInfo,
    sg: &mut SgList,
) -> Result<Request, ParseError> {
    sg.clear();
    // Split into readable and writable parts; a readable descriptor after a writable one
    // violates the spec.
    let mut readable: u64 = 0;
    let mut writable: u64 = 0;
    let mut order_ok = true;
    for s in segs {
        if s.write {
            writable += s.len as u64;
        } else {
            if writable > 0 {
                order_ok = false;
            }
            readable += s.len as u64;
        }
    }
    // The status byte: the last byte of the last writable descriptor.
    let last_w = segs
        .iter()
        .rev()
        .find(|s| s.write && s.len > 0)
        .ok_or(ParseError::NoStatus)?;
    if !order_ok || !segs.last().is_some_and(|s| s.write && s.len > 0) {
        return Err(ParseError::NoStatus);
    }
    let status = mem
        .host_ptr(
            last_w
                .addr
                .checked_add(last_w.len as u64 - 1)
                .ok_or(ParseError::NoStatus)?,
            1,
        )
        .ok_or(ParseError::NoStatus)?;
    let mut req = Request {
        kind: Kind::Unsupported(u32::MAX),
        lba: 0,
        blocks: 0,
        status,
        used_len: 1,
        error: None,
    };
    let fail = |mut r: Request, s: Status| {
        r.error = Some(s);
        Ok(r)
    };
    if readable < 16 {
        return fail(req, Status::INVALID_FIELD);
    }
    let mut hdr = [0u8; 16];
    match segs.first() {
        // The usual layout: the header alone (or first) in the first descriptor. A fixed
        // 16-byte load instead of a memmove call.
        Some(s) if !s.write && s.len >= 16 => match mem.host_ptr(s.addr, 16) {
            // SAFETY: host_ptr checked that 16 bytes at p lie in mapped guest memory; a
            // [u8; 16] has alignment 1.
            Some(p) => hdr = unsafe { std::ptr::read_volatile(p as *const [u8; 16]) },
            None => return fail(req, Status::DATA_TRANSFER_ERROR),
        },
        _ => {
            if !copy_in(segs, mem, 0, &mut hdr) {
                return fail(req, Status::DATA_TRANSFER_ERROR);
            }
        }
    }
    let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let bs = info.block_size as u64;
    let to_lba = |sector: u64| -> Option<u64> {
        let byte = sector.checked_mul(512)?;
        (byte % bs == 0).then_some(byte / bs)
    };
    req.kind = match rtype {
        VIRTIO_BLK_T_IN => Kind::Io(Opcode::Read),
        VIRTIO_BLK_T_OUT => Kind::Io(Opcode::Write),
        VIRTIO_BLK_T_FLUSH => Kind::Io(Opcode::Flush),
        VIRTIO_BLK_T_GET_ID => Kind::GetId,
        VIRTIO_BLK_T_DISCARD => Kind::Io(Opcode::Deallocate),
        VIRTIO_BLK_T_WRITE_ZEROES => Kind::Io(Opcode::WriteZeroes),
        t => {
            req.kind = Kind::Unsupported(t);
            return Ok(req);
        }
    };
    let payload_in = writable - 1; // bytes before the status byte
    let payload_out = readable - 16;
    match req.kind {
        Kind::Io(Opcode::Read) | Kind::Io(Opcode::Write) | Kind::GetId => {
            let (len, start, write_dir) = match req.kind {
                Kind::Io(Opcode::Write) => (payload_out, 16, false),
                _ => (payload_in, 0, true),
            };
            if req.kind == Kind::GetId {
                // The driver gives a 20-byte buffer; we fill at most that much.
                let len = len.min(ID_BYTES as u64);
                if !collect(segs, mem, write_dir, 0, len, sg) {
                    return fail(req, Status::DATA_TRANSFER_ERROR);
                }
                req.used_len = len as u32 + 1;
                return Ok(req);
            }
            if len == 0 || len % bs != 0 {
                return fail(req, Status::INVALID_FIELD);
            }
            if len > MAX_REQUEST_BYTES.min(info.max_transfer as u64) {
                return fail(req, Status::INVALID_FIELD);
            }
            let Some(lba) = to_lba(sector) else {
                return fail(req, Status::INVALID_FIELD);
            };
            req.lba = lba;
            req.blocks = (len / bs) as u32;
            if !collect(segs, mem, write_dir, start, len, sg) {
                sg.clear();
                return fail(req, Status::DATA_TRANSFER_ERROR);
            }
            if req.kind == Kind::Io(Opcode::Read) {
                req.used_len = len as u32 + 1;
            }
        }
        Kind::Io(Opcode::Flush) => {}
        Kind::Io(_) => {
            // discard / write zeroes: exactly one 16-byte range (we advertise max_seg 1).
            if payload_out != 16 {
                return fail(req, Status::INVALID_FIELD);
            }
            let mut r = [0u8; 16];
            if !copy_in(segs, mem, 16, &mut r) {
                return fail(req, Status::DATA_TRANSFER_ERROR);
            }
            let s = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
            let n = u32::from_le_bytes([r[8], r[9], r[10], r[11]]) as u64;
            let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
            // flags: bit 0 = unmap (write zeroes only); the rest are reserved.
            let allowed = if req.kind == Kind::Io(Opcode::WriteZeroes) {
                1
            } else {
                0
            };
            if flags & !allowed != 0 || n == 0 || n > MAX_DISCARD_SECTORS as u64 {
                return fail(req, Status::INVALID_FIELD);
            }
            match (to_lba(s), (n * 512) % bs) {
                (Some(lba), 0) => {
                    req.lba = lba;
                    req.blocks = ((n * 512) / bs) as u32;
                }
                _ => return fail(req, Status::INVALID_FIELD),
            }
        }
        Kind::Unsupported(_) => {}
    }
    Ok(req)
}

/// Copy `out.len()` readable bytes starting at readable offset `off`.
fn copy_in(segs: &[Seg], mem: &dyn GuestMem, off: u64, out: &mut [u8]) -> bool {
    let mut pos = 0u64; // offset in the readable stream
    let mut got = 0usize;
    for s in segs.iter().filter(|s| !s.write) {
        if got == out.len() {
            break;
        }
        let end = pos + s.len as u64;
        let at = off + got as u64;
        if end > at {
            // Segments are visited in order, so `at >= pos` here.
            let skip = at - pos;
            let n = ((s.len as u64 - skip) as usize).min(out.len() - got);
            let Some(p) = s.addr.checked_add(skip).and_then(|a| mem.host_ptr(a, n)) else {
                return false;
            };
            // SAFETY: host_ptr checked that n bytes at p lie in mapped guest memory.
            unsafe { std::ptr::copy_nonoverlapping(p, out[got..].as_mut_ptr(), n) };
            got += n;
        }
        pos = end;
    }
    got == out.len()
}

/// Push the host ranges of `len` bytes of the readable (`write == false`) or writable
/// stream, starting at stream offset `off`, into `sg`.
fn collect(
    segs: &[Seg],
    mem: &dyn GuestMem,
    write: bool,
    off: u64,
    len: u64,
    sg: &mut SgList,
) -> bool {
    let mut pos = 0u64;
    let mut need = len;
    let mut nseg = 0;
    for s in segs.iter().filter(|s| s.write == write) {
        if need == 0 {
            break;
        }
        let end = pos + s.len as u64;
        let at = off + (len - need);
        if end > at {
            let skip = at - pos;
            let n = (s.len as u64 - skip).min(need);
            let Some(p) = s
                .addr
                .checked_add(skip)
                .and_then(|a| mem.host_ptr(a, n as usize))
            else {
                return false;
            };
            nseg += 1;
            if nseg > MAX_SEGMENTS {
                return false;
            }
            sg.push(p, n as usize);
            need -= n;
        }
        pos = end;
    }
    need == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory: one region at gpa 0x1000.
    struct Mem(std::cell::RefCell<Vec<u8>>);
    const BASE: u64 = 0x1000;
    impl GuestMem for Mem {
        fn host_ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
            let off = gpa.checked_sub(BASE)? as usize;
            let mut v = self.0.borrow_mut();
            (off.checked_add(len)? <= v.len()).then(|| v[off..].as_mut_ptr())
        }
    }

    fn info() -> DeviceInfo {
        DeviceInfo {
            block_size: 512,
            num_blocks: 1000,
            read_only: false,
            discard: true,
            write_zeroes: true,
            volatile_cache: true,
            max_transfer: 1 << 20,
        }
    }

    fn mem_with_header(t: u32, sector: u64) -> Mem {
        let mut v = vec![0u8; 0x4000];
        v[0..4].copy_from_slice(&t.to_le_bytes());
        v[8..16].copy_from_slice(&sector.to_le_bytes());
        Mem(std::cell::RefCell::new(v))
    }

    fn seg(addr: u64, len: u32, write: bool) -> Seg {
        Seg { addr, len, write }
    }

    #[test]
    fn read_three_descriptors() {
        let m = mem_with_header(VIRTIO_BLK_T_IN, 8);
        let mut sg = SgList::default();
        let segs = [
            seg(BASE, 16, false),
            seg(BASE + 0x200, 1024, true),
            seg(BASE + 0x800, 1, true),
        ];
        let r = parse(&segs, &m, &info(), &mut sg).unwrap();
        assert_eq!(r.kind, Kind::Io(Opcode::Read));
        assert_eq!((r.lba, r.blocks, r.used_len, r.error), (8, 2, 1025, None));
        assert_eq!(sg.len(), 1024);
    }

    #[test]
    fn write_header_and_data_in_one_descriptor() {
        let m = mem_with_header(VIRTIO_BLK_T_OUT, 1);
        let mut sg = SgList::default();
        let segs = [seg(BASE, 16 + 512, false), seg(BASE + 0x800, 1, true)];
        let r = parse(&segs, &m, &info(), &mut sg).unwrap();
        assert_eq!(
            (r.kind, r.lba, r.blocks, r.error),
            (Kind::Io(Opcode::Write), 1, 1, None)
        );
        assert_eq!(
            sg.segments()[0].iov_base as usize,
            m.host_ptr(BASE + 16, 1).unwrap() as usize
        );
    }

    #[test]
    fn status_inside_data_descriptor() {
        let m = mem_with_header(VIRTIO_BLK_T_IN, 0);
        let mut sg = SgList::default();
        let segs = [seg(BASE, 16, false), seg(BASE + 0x200, 513, true)];
        let r = parse(&segs, &m, &info(), &mut sg).unwrap();
        assert_eq!((r.blocks, r.error), (1, None));
        assert_eq!(
            r.status as usize,
            m.host_ptr(BASE + 0x200 + 512, 1).unwrap() as usize
        );
    }

    #[test]
    fn bad_chains() {
        let m = mem_with_header(VIRTIO_BLK_T_IN, 0);
        let mut sg = SgList::default();
        // no writable status
        assert_eq!(
            parse(&[seg(BASE, 16, false)], &m, &info(), &mut sg),
            Err(ParseError::NoStatus)
        );
        // status outside guest memory
        let segs = [seg(BASE, 16, false), seg(0x10_0000, 1, true)];
        assert_eq!(
            parse(&segs, &m, &info(), &mut sg),
            Err(ParseError::NoStatus)
        );
        // data outside guest memory fails only the request
        let segs = [
            seg(BASE, 16, false),
            seg(0x10_0000, 512, true),
            seg(BASE + 0x800, 1, true),
        ];
        let r = parse(&segs, &m, &info(), &mut sg).unwrap();
        assert_eq!(r.error, Some(Status::DATA_TRANSFER_ERROR));
        // short header
        let segs = [seg(BASE, 8, false), seg(BASE + 0x800, 1, true)];
        assert_eq!(
            parse(&segs, &m, &info(), &mut sg).unwrap().error,
            Some(Status::INVALID_FIELD)
        );
        // data not a multiple of the block size
        let segs = [
            seg(BASE, 16, false),
            seg(BASE + 0x200, 100, true),
            seg(BASE + 0x800, 1, true),
        ];
        assert_eq!(
            parse(&segs, &m, &info(), &mut sg).unwrap().error,
            Some(Status::INVALID_FIELD)
        );
        // oversized
        let segs = [
            seg(BASE, 16, false),
            seg(BASE + 0x200, (MAX_REQUEST_BYTES + 512) as u32, true),
            seg(BASE + 0x800, 1, true),
        ];
        assert_eq!(
            parse(&segs, &m, &info(), &mut sg).unwrap().error,
            Some(Status::INVALID_FIELD)
        );
        // readable after writable
        let segs = [
            seg(BASE, 16, false),
            seg(BASE + 0x800, 1, true),
            seg(BASE, 16, false),
        ];
        assert_eq!(
            parse(&segs, &m, &info(), &mut sg),
            Err(ParseError::NoStatus)
        );
    }

    #[test]
    fn more_segments_than_seg_max_are_refused() {
        let m = mem_with_header(VIRTIO_BLK_T_IN, 0);
        let mut sg = SgList::default();
        for n in [MAX_SEGMENTS, MAX_SEGMENTS + 1] {
            let mut segs = vec![seg(BASE, 16, false)];
            for i in 0..n as u64 {
                segs.push(seg(BASE + 0x200 + (i % 16) * 512, 512, true));
            }
            segs.push(seg(BASE + 0x100, 1, true));
            let r = parse(&segs, &m, &info(), &mut sg).unwrap();
            if n <= MAX_SEGMENTS {
                assert_eq!(r.error, None);
                assert_eq!(sg.segments().len(), n);
            } else {
                assert_eq!(r.error, Some(Status::DATA_TRANSFER_ERROR));
                assert_eq!(sg.segments().len(), 0, "nothing kept of a refused request");
            }
        }
    }

    #[test]
    fn discard_range() {
        let m = mem_with_header(VIRTIO_BLK_T_DISCARD, 0);
        {
            let mut v = m.0.borrow_mut();
            v[0x100..0x108].copy_from_slice(&16u64.to_le_bytes());
            v[0x108..0x10c].copy_from_slice(&8u32.to_le_bytes());
        }
        let mut sg = SgList::default();
        let segs = [
            seg(BASE, 16, false),
            seg(BASE + 0x100, 16, false),
            seg(BASE + 0x800, 1, true),
        ];
        let r = parse(&segs, &m, &info(), &mut sg).unwrap();
        assert_eq!(
            (r.kind, r.lba, r.blocks, r.error),
            (Kind::Io(Opcode::Deallocate), 16, 8, None)
        );
    }

    #[test]
    fn four_k_blocks_need_aligned_sectors() {
        let mut i = info();
        i.block_size = 4096;
        let m = mem_with_header(VIRTIO_BLK_T_IN, 3);
        let mut sg = SgList::default();
        let segs = [
            seg(BASE, 16, false),
            seg(BASE + 0x1000, 4096, true),
            seg(BASE + 0x800, 1, true),
        ];
        assert_eq!(
            parse(&segs, &m, &i, &mut sg).unwrap().error,
            Some(Status::INVALID_FIELD)
        );
    }

    #[test]
    fn config_layout() {
        let c = config_space(&info(), 2);
        assert_eq!(
            u32::from_le_bytes(c[12..16].try_into().unwrap()),
            MAX_SEGMENTS as u32
        );
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 1000);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
    }
}
