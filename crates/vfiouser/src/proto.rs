//! The vfio-user wire format (protocol 0.0 as QEMU 10.1+ speaks it, `hw/vfio-user/` and
//! `docs/interop/vfio-user.rst`): a 16-byte header, then a command's payload, all
//! little-endian. [`decode`] turns a whole request into a [`Request`], checking every
//! length, count and flag against the limits below before anything is reserved or
//! indexed; the reply encoders write into a caller's reusable buffer.

use crate::json::{self, Json};

/// The message header: id, command (u16 each), size (header included), flags, error.
pub const HDR: usize = 16;

/// Commands.
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    pub const DIRTY_PAGES: u16 = 14;
    pub const REGION_WRITE_MULTI: u16 = 15;
}

/// Header flags: the message type (low 4 bits), no-reply, error.
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const TYPE_REQUEST: u32 = 0;
pub const TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 0x10;
pub const FLAG_ERROR: u32 = 0x20;

/// The protocol version served (QEMU asks for 0.0 and refuses a higher minor).
pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 0;

/// Descriptors one message may carry (advertised as `max_msg_fds`; QEMU splits a
/// SET_IRQS with more eventfds into several messages).
pub const MAX_MSG_FDS: usize = 8;
/// Bytes of data one REGION_READ/WRITE may move (advertised as `max_data_xfer_size`).
pub const MAX_DATA_XFER: usize = 64 * 1024;
/// The largest request accepted: a REGION_WRITE of [`MAX_DATA_XFER`] bytes. A bigger
/// size in a header ends the connection before anything is read or reserved.
pub const MAX_MSG_SIZE: usize = HDR + 16 + MAX_DATA_XFER;
/// The VERSION capabilities string, NUL included.
pub const MAX_CAPS_JSON: usize = 4096;
/// DMA mappings one client may hold (advertised as `max_dma_maps`). QEMU with its RAM in
/// one memfd maps a handful; its own default is 65535.
pub const MAX_DMA_MAPS: usize = 1024;
/// The only DMA page size (advertised as `pgsizes`): mappings are 4 KiB aligned.
pub const PGSIZE: u64 = 4096;
/// A SET_IRQS payload (DATA_BOOL: one byte per vector) beyond its 20-byte head.
pub const MAX_IRQ_DATA: usize = 2048;

/// DMA_MAP flags.
pub const DMA_MAP_READ: u32 = 1;
pub const DMA_MAP_WRITE: u32 = 2;
/// DMA_UNMAP flags.
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1;
pub const DMA_UNMAP_ALL: u32 = 2;

/// DEVICE_GET_INFO flags.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// Region flags.
pub const REGION_READ: u32 = 1;
pub const REGION_WRITE: u32 = 2;

/// IRQ info flags.
pub const IRQ_INFO_EVENTFD: u32 = 1;
pub const IRQ_INFO_MASKABLE: u32 = 2;
pub const IRQ_INFO_AUTOMASKED: u32 = 4;
pub const IRQ_INFO_NORESIZE: u32 = 8;

/// SET_IRQS flags: one data type and one action.
pub const IRQ_SET_DATA_NONE: u32 = 1;
pub const IRQ_SET_DATA_BOOL: u32 = 2;
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
pub const IRQ_SET_ACTION_MASK: u32 = 8;
pub const IRQ_SET_ACTION_UNMASK: u32 = 16;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 32;
pub const IRQ_SET_DATA_MASK: u32 = 7;
pub const IRQ_SET_ACTION_MASK_ALL: u32 = 56;

/// A POSIX error number, as error replies carry it (positive).
pub type Errno = u32;
pub const EINVAL: Errno = libc::EINVAL as Errno;
pub const ENOTSUP: Errno = libc::ENOTSUP as Errno;
pub const ENOSYS: Errno = libc::ENOSYS as Errno;
pub const EEXIST: Errno = libc::EEXIST as Errno;
pub const ENOSPC: Errno = libc::ENOSPC as Errno;
pub const EFAULT: Errno = libc::EFAULT as Errno;
pub const EPROTO: Errno = libc::EPROTO as Errno;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

impl Header {
    /// The header at the start of `b` (None: fewer than 16 bytes).
    pub fn parse(b: &[u8]) -> Option<Header> {
        Some(Header {
            id: u16_at(b, 0)?,
            command: u16_at(b, 2)?,
            size: u32_at(b, 4)?,
            flags: u32_at(b, 8)?,
            error: u32_at(b, 12)?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.command.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.error.to_le_bytes());
    }

    pub fn is_request(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == TYPE_REQUEST
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// Check a header's size against the limits (before its body is read).
    pub fn check_size(&self) -> Result<usize, String> {
        let size = self.size as usize;
        if size < HDR {
            return Err(format!(
                "message size {size} is smaller than the {HDR}-byte header"
            ));
        }
        if size > MAX_MSG_SIZE {
            return Err(format!(
                "message size {size} exceeds the limit of {MAX_MSG_SIZE} bytes"
            ));
        }
        Ok(size)
    }
}

/// What the client said of itself in VERSION (the parts nvmux looks at).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCaps {
    /// Descriptors the client accepts per message from the server (default 1).
    pub max_msg_fds: u64,
    /// Data the client accepts per server request (default 1 MiB).
    pub max_data_xfer_size: u64,
    /// The client's IOMMU page sizes (default 4 KiB).
    pub pgsizes: u64,
    /// The client announced live-migration support (nvmux offers none).
    pub migration: bool,
}

impl Default for ClientCaps {
    fn default() -> Self {
        ClientCaps {
            max_msg_fds: 1,
            max_data_xfer_size: 1 << 20,
            pgsizes: PGSIZE,
            migration: false,
        }
    }
}

/// Parse the client's capabilities (`caps` without its NUL). Unknown members are
/// ignored; known ones of the wrong type refuse the version.
pub fn parse_caps(caps: &[u8]) -> Result<ClientCaps, String> {
    let mut c = ClientCaps::default();
    if caps.is_empty() {
        return Ok(c);
    }
    let v = json::parse(caps).map_err(|e| format!("capabilities are not JSON: {e}"))?;
    if !matches!(v, Json::Obj(_)) {
        return Err("capabilities are not a JSON object".into());
    }
    let Some(cap) = v.get("capabilities") else {
        return Ok(c);
    };
    if !matches!(cap, Json::Obj(_)) {
        return Err("\"capabilities\" is not an object".into());
    }
    let num = |k: &str| -> Result<Option<u64>, String> {
        match cap.get(k) {
            None => Ok(None),
            Some(Json::Num(n)) => Ok(Some(*n)),
            Some(_) => Err(format!("capability {k} is not a non-negative integer")),
        }
    };
    if let Some(n) = num("max_msg_fds")? {
        c.max_msg_fds = n;
    }
    if let Some(n) = num("max_data_xfer_size")? {
        c.max_data_xfer_size = n;
    }
    if let Some(n) = num("pgsizes")? {
        c.pgsizes = n;
    }
    c.migration = cap.get("migration").is_some();
    if c.pgsizes & PGSIZE == 0 {
        return Err(format!(
            "the client's page sizes {:#x} do not include 4 KiB, the only one nvmux maps",
            c.pgsizes
        ));
    }
    Ok(c)
}

/// The capabilities nvmux announces (NUL-terminated by the encoder). Short: QEMU
/// receives the reply into its own request's buffer. No `migration` (not offered) and
/// no `write_multiple` (REGION_WRITE_MULTI is not implemented).
pub fn server_caps() -> String {
    format!(
        "{{\"capabilities\":{{\"max_msg_fds\":{MAX_MSG_FDS},\"max_data_xfer_size\":{MAX_DATA_XFER},\"pgsizes\":{PGSIZE},\"max_dma_maps\":{MAX_DMA_MAPS}}}}}"
    )
}

/// SET_IRQS as decoded (the eventfds travel beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetIrqs<'a> {
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
    /// DATA_BOOL: one byte per vector; otherwise empty.
    pub data: &'a [u8],
}

/// A whole, checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Version {
        major: u16,
        minor: u16,
        caps: ClientCaps,
    },
    DmaMap {
        flags: u32,
        offset: u64,
        iova: u64,
        size: u64,
    },
    DmaUnmap {
        flags: u32,
        iova: u64,
        size: u64,
    },
    GetInfo,
    GetRegionInfo {
        argsz: u32,
        index: u32,
    },
    GetIrqInfo {
        index: u32,
    },
    SetIrqs(SetIrqs<'a>),
    RegionRead {
        offset: u64,
        region: u32,
        count: u32,
    },
    RegionWrite {
        offset: u64,
        region: u32,
        data: &'a [u8],
    },
    Reset,
}

/// Why a request was refused: the errno of the error reply, a message for the log, and
/// whether the connection ends (a malformed message) or only the request fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub errno: Errno,
    pub msg: String,
    pub fatal: bool,
}

impl Refused {
    pub fn fatal(errno: Errno, msg: impl Into<String>) -> Refused {
        Refused {
            errno,
            msg: msg.into(),
            fatal: true,
        }
    }
    pub fn soft(errno: Errno, msg: impl Into<String>) -> Refused {
        Refused {
            errno,
            msg: msg.into(),
            fatal: false,
        }
    }
}

fn name(c: u16) -> &'static str {
    match c {
        cmd::VERSION => "VERSION",
        cmd::DMA_MAP => "DMA_MAP",
        cmd::DMA_UNMAP => "DMA_UNMAP",
        cmd::DEVICE_GET_INFO => "DEVICE_GET_INFO",
        cmd::DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        cmd::DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        cmd::DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        cmd::DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        cmd::REGION_READ => "REGION_READ",
        cmd::REGION_WRITE => "REGION_WRITE",
        cmd::DMA_READ => "DMA_READ",
        cmd::DMA_WRITE => "DMA_WRITE",
        cmd::DEVICE_RESET => "DEVICE_RESET",
        cmd::DIRTY_PAGES => "DIRTY_PAGES",
        cmd::REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
        _ => "unknown",
    }
}

/// The command's name, for logs.
pub fn command_name(c: u16) -> &'static str {
    name(c)
}

/// Decode the body of a request whose header is `h` (`body` holds `h.size - 16` bytes),
/// which arrived with `nfds` descriptors.
pub fn decode<'a>(h: &Header, body: &'a [u8], nfds: usize) -> Result<Request<'a>, Refused> {
    let n = name(h.command);
    let short = |need: usize| {
        Refused::fatal(
            EINVAL,
            format!("{n} payload of {} bytes, {need} expected", body.len()),
        )
    };
    let exact = |need: usize| {
        if body.len() == need {
            Ok(())
        } else {
            Err(short(need))
        }
    };
    let max_fds = match h.command {
        cmd::DMA_MAP => 1,
        cmd::DEVICE_SET_IRQS => MAX_MSG_FDS,
        _ => 0,
    };
    if nfds > max_fds {
        return Err(Refused::fatal(
            EINVAL,
            format!("{n} carried {nfds} descriptors, at most {max_fds}"),
        ));
    }
    // `short` guards every field read below: u*_at only fail on a short body.
    match h.command {
        cmd::VERSION => {
            if body.len() < 4 {
                return Err(short(4));
            }
            let major = u16_at(body, 0).ok_or_else(|| short(4))?;
            let minor = u16_at(body, 2).ok_or_else(|| short(4))?;
            let caps = &body[4..];
            let caps = if caps.is_empty() {
                caps
            } else {
                if caps.len() > MAX_CAPS_JSON {
                    return Err(Refused::fatal(
                        EINVAL,
                        format!(
                            "VERSION capabilities of {} bytes (at most {MAX_CAPS_JSON})",
                            caps.len()
                        ),
                    ));
                }
                match caps.split_last() {
                    Some((0, s)) => s,
                    _ => {
                        return Err(Refused::fatal(
                            EINVAL,
                            "VERSION capabilities are not NUL-terminated",
                        ))
                    }
                }
            };
            if major != VERSION_MAJOR {
                return Err(Refused::fatal(
                    ENOTSUP,
                    format!("protocol version {major}.{minor}; nvmux serves {VERSION_MAJOR}.{VERSION_MINOR}"),
                ));
            }
            let caps = parse_caps(caps).map_err(|e| Refused::fatal(EINVAL, e))?;
            Ok(Request::Version { major, minor, caps })
        }
        cmd::DMA_MAP => {
            exact(32)?;
            let argsz = u32_at(body, 0).ok_or_else(|| short(32))?;
            if argsz != 32 {
                return Err(Refused::fatal(
                    EINVAL,
                    format!("DMA_MAP argsz {argsz}, 32 expected"),
                ));
            }
            Ok(Request::DmaMap {
                flags: u32_at(body, 4).ok_or_else(|| short(32))?,
                offset: u64_at(body, 8).ok_or_else(|| short(32))?,
                iova: u64_at(body, 16).ok_or_else(|| short(32))?,
                size: u64_at(body, 24).ok_or_else(|| short(32))?,
            })
        }
        cmd::DMA_UNMAP => {
            exact(24)?;
            let argsz = u32_at(body, 0).ok_or_else(|| short(24))?;
            if argsz != 24 {
                return Err(Refused::fatal(
                    EINVAL,
                    format!("DMA_UNMAP argsz {argsz}, 24 expected (no dirty bitmap)"),
                ));
            }
            Ok(Request::DmaUnmap {
                flags: u32_at(body, 4).ok_or_else(|| short(24))?,
                iova: u64_at(body, 8).ok_or_else(|| short(24))?,
                size: u64_at(body, 16).ok_or_else(|| short(24))?,
            })
        }
        cmd::DEVICE_GET_INFO => {
            exact(16)?;
            let argsz = u32_at(body, 0).ok_or_else(|| short(16))?;
            if argsz < 16 {
                return Err(Refused::fatal(
                    EINVAL,
                    format!("DEVICE_GET_INFO argsz {argsz}, at least 16 expected"),
                ));
            }
            Ok(Request::GetInfo)
        }
        cmd::DEVICE_GET_REGION_INFO => {
            exact(32)?;
            let argsz = u32_at(body, 0).ok_or_else(|| short(32))?;
            if argsz < 32 {
                return Err(Refused::fatal(
                    EINVAL,
                    format!("DEVICE_GET_REGION_INFO argsz {argsz}, at least 32 expected"),
                ));
            }
            Ok(Request::GetRegionInfo {
                argsz,
                index: u32_at(body, 8).ok_or_else(|| short(32))?,
            })
        }
        cmd::DEVICE_GET_IRQ_INFO => {
            exact(16)?;
            let argsz = u32_at(body, 0).ok_or_else(|| short(16))?;
            if argsz < 16 {
                return Err(Refused::fatal(
                    EINVAL,
                    format!("DEVICE_GET_IRQ_INFO argsz {argsz}, at least 16 expected"),
                ));
            }
            Ok(Request::GetIrqInfo {
                index: u32_at(body, 8).ok_or_else(|| short(16))?,
            })
        }
        cmd::DEVICE_SET_IRQS => {
            if body.len() < 20 {
                return Err(short(20));
            }
            if body.len() > 20 + MAX_IRQ_DATA {
                return Err(Refused::fatal(
                    EINVAL,
                    format!(
                        "DEVICE_SET_IRQS payload of {} bytes (at most {})",
                        body.len(),
                        20 + MAX_IRQ_DATA
                    ),
                ));
            }
            let argsz = u32_at(body, 0).ok_or_else(|| short(20))?;
            let flags = u32_at(body, 4).ok_or_else(|| short(20))?;
            let index = u32_at(body, 8).ok_or_else(|| short(20))?;
            let start = u32_at(body, 12).ok_or_else(|| short(20))?;
            let count = u32_at(body, 16).ok_or_else(|| short(20))?;
            let data_kind = flags & IRQ_SET_DATA_MASK;
            let action = flags & IRQ_SET_ACTION_MASK_ALL;
            if flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) != 0
                || data_kind.count_ones() != 1
                || action.count_ones() != 1
            {
                return Err(Refused::fatal(
                    EINVAL,
                    format!(
                        "DEVICE_SET_IRQS flags {flags:#x}: one data type and one action expected"
                    ),
                ));
            }
            if argsz as usize > body.len() || argsz < 20 {
                return Err(Refused::fatal(
                    EINVAL,
                    format!(
                        "DEVICE_SET_IRQS argsz {argsz} with a payload of {} bytes",
                        body.len()
                    ),
                ));
            }
            let data = &body[20..];
            match data_kind {
                IRQ_SET_DATA_BOOL
                    if data.len() != count as usize => {
                        return Err(Refused::fatal(
                            EINVAL,
                            format!(
                                "DEVICE_SET_IRQS DATA_BOOL with {} bytes for {count} vectors",
                                data.len()
                            ),
                        ));
                    }
                IRQ_SET_DATA_EVENTFD
                    // QEMU sends the descriptors beside the message; none means "unset
                    // these vectors" (its -1 entries).
                    if nfds != 0 && nfds != count as usize => {
                        return Err(Refused::fatal(
                            EINVAL,
                            format!("DEVICE_SET_IRQS with {nfds} eventfds for {count} vectors"),
                        ));
                    }
                _ => {}
            }
            if data_kind != IRQ_SET_DATA_EVENTFD && nfds != 0 {
                return Err(Refused::fatal(
                    EINVAL,
                    format!("DEVICE_SET_IRQS without DATA_EVENTFD carried {nfds} descriptors"),
                ));
            }
            Ok(Request::SetIrqs(SetIrqs {
                flags,
                index,
                start,
                count,
                data: if data_kind == IRQ_SET_DATA_BOOL {
                    data
                } else {
                    &[]
                },
            }))
        }
        cmd::REGION_READ => {
            exact(16)?;
            let count = u32_at(body, 12).ok_or_else(|| short(16))?;
            if count as usize > MAX_DATA_XFER {
                return Err(Refused::fatal(
                    EINVAL,
                    format!("REGION_READ of {count} bytes (at most {MAX_DATA_XFER})"),
                ));
            }
            Ok(Request::RegionRead {
                offset: u64_at(body, 0).ok_or_else(|| short(16))?,
                region: u32_at(body, 8).ok_or_else(|| short(16))?,
                count,
            })
        }
        cmd::REGION_WRITE => {
            if body.len() < 16 {
                return Err(short(16));
            }
            let count = u32_at(body, 12).ok_or_else(|| short(16))?;
            let data = &body[16..];
            if data.len() != count as usize {
                return Err(Refused::fatal(
                    EINVAL,
                    format!(
                        "REGION_WRITE count {count} with {} bytes of data",
                        data.len()
                    ),
                ));
            }
            Ok(Request::RegionWrite {
                offset: u64_at(body, 0).ok_or_else(|| short(16))?,
                region: u32_at(body, 8).ok_or_else(|| short(16))?,
                data,
            })
        }
        cmd::DEVICE_RESET => {
            exact(0)?;
            Ok(Request::Reset)
        }
        c => Err(Refused::soft(
            ENOSYS,
            format!("command {c} ({}) is not supported", name(c)),
        )),
    }
}

/// Start a reply to `h` in `out` (cleared); [`finish_reply`] fills in its size.
pub fn begin_reply(h: &Header, out: &mut Vec<u8>) {
    out.clear();
    Header {
        id: h.id,
        command: h.command,
        size: 0,
        flags: TYPE_REPLY,
        error: 0,
    }
    .encode(out);
}

/// Set the size of the reply built in `out`.
pub fn finish_reply(out: &mut [u8]) {
    let n = out.len() as u32;
    if let Some(s) = out.get_mut(4..8) {
        s.copy_from_slice(&n.to_le_bytes());
    }
}

/// An error reply to `h` in `out`.
pub fn error_reply(h: &Header, errno: Errno, out: &mut Vec<u8>) {
    out.clear();
    Header {
        id: h.id,
        command: h.command,
        size: HDR as u32,
        flags: TYPE_REPLY | FLAG_ERROR,
        error: errno,
    }
    .encode(out);
}

pub fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Encode a request (for tests, the fuzz seeds and the client side of unit tests).
pub fn request(id: u16, command: u16, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HDR + body.len());
    Header {
        id,
        command,
        size: (HDR + body.len()) as u32,
        flags,
        error: 0,
    }
    .encode(&mut out);
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(command: u16, body: &[u8]) -> Header {
        Header {
            id: 1,
            command,
            size: (HDR + body.len()) as u32,
            flags: 0,
            error: 0,
        }
    }

    #[test]
    fn version_and_caps() {
        let caps =
            br#"{"capabilities":{"max_msg_fds":16,"pgsizes":4096,"migration":{"pgsize":4096}}}"#;
        let mut body = vec![0, 0, 0, 0];
        body.extend_from_slice(caps);
        body.push(0);
        let r = decode(&hdr(cmd::VERSION, &body), &body, 0).unwrap();
        let Request::Version { caps, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(caps.max_msg_fds, 16);
        assert!(caps.migration);
        // Not NUL-terminated, wrong major, 64 KiB pages only.
        let e = decode(
            &hdr(cmd::VERSION, &body[..body.len() - 1]),
            &body[..body.len() - 1],
            0,
        )
        .unwrap_err();
        assert!(e.fatal && e.msg.contains("NUL"), "{e:?}");
        let mut b2 = body.clone();
        b2[0] = 1;
        assert_eq!(
            decode(&hdr(cmd::VERSION, &b2), &b2, 0).unwrap_err().errno,
            ENOTSUP
        );
        let mut b3 = vec![0, 0, 0, 0];
        b3.extend_from_slice(b"{\"capabilities\":{\"pgsizes\":65536}}\0");
        assert!(decode(&hdr(cmd::VERSION, &b3), &b3, 0).is_err());
        // The server's capabilities are valid JSON that its own parser accepts.
        let s = server_caps();
        let c = parse_caps(s.as_bytes()).unwrap();
        assert_eq!(c.max_msg_fds, MAX_MSG_FDS as u64);
    }

    #[test]
    fn sizes_and_fds_are_checked() {
        let h = Header {
            size: 8,
            ..Default::default()
        };
        assert!(h.check_size().is_err());
        let h = Header {
            size: u32::MAX,
            ..Default::default()
        };
        assert!(h.check_size().is_err());
        // A REGION_READ with a descriptor, or too much data.
        let mut b = Vec::new();
        put_u64(&mut b, 0);
        put_u32(&mut b, 0);
        put_u32(&mut b, 4);
        assert!(decode(&hdr(cmd::REGION_READ, &b), &b, 1).unwrap_err().fatal);
        let mut b = Vec::new();
        put_u64(&mut b, 0);
        put_u32(&mut b, 0);
        put_u32(&mut b, (MAX_DATA_XFER + 1) as u32);
        assert!(decode(&hdr(cmd::REGION_READ, &b), &b, 0).unwrap_err().fatal);
        // REGION_WRITE count disagreeing with the data.
        let mut b = Vec::new();
        put_u64(&mut b, 0);
        put_u32(&mut b, 0);
        put_u32(&mut b, 8);
        b.extend_from_slice(&[1, 2, 3, 4]);
        assert!(
            decode(&hdr(cmd::REGION_WRITE, &b), &b, 0)
                .unwrap_err()
                .fatal
        );
        // SET_IRQS: 3 eventfds for 2 vectors; two actions.
        let mut b = Vec::new();
        put_u32(&mut b, 20);
        put_u32(&mut b, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER);
        put_u32(&mut b, 2);
        put_u32(&mut b, 0);
        put_u32(&mut b, 2);
        assert!(decode(&hdr(cmd::DEVICE_SET_IRQS, &b), &b, 3).is_err());
        assert!(decode(&hdr(cmd::DEVICE_SET_IRQS, &b), &b, 2).is_ok());
        b[4] = (IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER | IRQ_SET_ACTION_MASK) as u8;
        assert!(decode(&hdr(cmd::DEVICE_SET_IRQS, &b), &b, 0).is_err());
        // Unknown commands fail the request only.
        let e = decode(&hdr(99, &[]), &[], 0).unwrap_err();
        assert!(!e.fatal && e.errno == ENOSYS);
    }
}
