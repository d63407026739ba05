//! The classifier's context (version 1) and the values a program returns.
//!
//! The layout is the C struct `nvmux_ctx` of `examples/classifiers/nvmux_classifier.h`,
//! byte for byte; `docs/classifiers.md` documents it. A program reads any byte of it and
//! writes only the fields [`WRITABLE`] lists (the verifier enforces both).

/// Version of the context layout, in `Ctx::version`.
pub const CTX_VERSION: u32 = 1;
/// Size of the context in bytes.
pub const CTX_SIZE: usize = 64;

/// `Ctx::event`: a new command.
pub const EV_SUBMIT: u32 = 0;
/// `Ctx::event`: the path the program chose completed the command.
pub const EV_COMPLETE: u32 = 1;

/// `Ctx::flags`: force unit access.
pub const F_FUA: u8 = 0x01;

/// Run the program again when the chosen path completes the command.
pub const HOOK: u64 = 0x100;

/// Where a command goes: the low byte of a program's return value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Route {
    /// The disk's function chain (qos, crypt): the default.
    Chain = 0,
    /// The fast path: the disk's data path without its optional functions (qos). It
    /// keeps `crypt`, which defines what the blocks hold.
    Fast = 1,
    /// The disk's external function process.
    External = 2,
    /// Complete now with `Ctx::status`.
    Complete = 3,
}

impl Route {
    pub const ALL: [Route; 4] = [Route::Chain, Route::Fast, Route::External, Route::Complete];

    pub fn name(self) -> &'static str {
        match self {
            Route::Chain => "chain",
            Route::Fast => "fast",
            Route::External => "external",
            Route::Complete => "complete",
        }
    }
}

/// A program's return value, decoded: a route and whether it wants the completion hook.
/// `None` for a value with unknown bits set.
pub fn decode_verdict(r0: u64) -> Option<(Route, bool)> {
    if r0 & !(HOOK | 0xff) != 0 {
        return None;
    }
    let route = match r0 & 0xff {
        0 => Route::Chain,
        1 => Route::Fast,
        2 => Route::External,
        3 => Route::Complete,
        _ => return None,
    };
    Some((route, r0 & HOOK != 0))
}

/// The context a program sees, `struct nvmux_ctx` in C.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct Ctx {
    pub version: u32,
    pub event: u32,
    pub opcode: u8,
    pub flags: u8,
    pub route: u8,
    pub hops: u8,
    pub nsid: u32,
    pub slba: u64,
    pub nlb: u32,
    /// NVMe status, `(SCT << 8) | SC`.
    pub status: u16,
    pub queue: u16,
    pub disk_blocks: u64,
    pub block_size: u32,
    pub reserved0: u32,
    pub cookie: u64,
    pub reserved1: u64,
}

const _: () = assert!(std::mem::size_of::<Ctx>() == CTX_SIZE);

/// A field of the context a program may write: (offset, size, name).
pub const WRITABLE: [(usize, usize, &str); 5] = [
    (9, 1, "flags"),
    (16, 8, "slba"),
    (24, 4, "nlb"),
    (28, 2, "status"),
    (48, 8, "cookie"),
];

/// The name of the context field at byte `off`, for verifier messages.
pub fn field_at(off: usize) -> &'static str {
    const FIELDS: [(usize, &str); 16] = [
        (0, "version"),
        (4, "event"),
        (8, "opcode"),
        (9, "flags"),
        (10, "route"),
        (11, "hops"),
        (12, "nsid"),
        (16, "slba"),
        (24, "nlb"),
        (28, "status"),
        (30, "queue"),
        (32, "disk_blocks"),
        (40, "block_size"),
        (44, "reserved0"),
        (48, "cookie"),
        (56, "reserved1"),
    ];
    FIELDS
        .iter()
        .rev()
        .find(|(o, _)| *o <= off)
        .map_or("?", |(_, n)| n)
}

/// True if a store of `size` bytes at `off` lies inside one writable field.
pub fn store_allowed(off: usize, size: usize) -> bool {
    WRITABLE
        .iter()
        .any(|&(o, s, _)| off >= o && off + size <= o + s)
}

impl Ctx {
    /// The status as an NVMe status.
    pub fn nvme_status(&self) -> nvmux_core::Status {
        nvmux_core::Status::new(((self.status >> 8) & 0x7) as u8, self.status as u8)
    }

    pub fn encode_status(s: nvmux_core::Status) -> u16 {
        ((s.sct as u16 & 0x7) << 8) | s.sc as u16
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8; CTX_SIZE] {
        // SAFETY: Ctx is repr(C), exactly CTX_SIZE bytes (checked above), with no padding
        // (every field is laid out back to back) and every bit pattern valid for its
        // integer fields.
        unsafe { &mut *(self as *mut Ctx).cast::<[u8; CTX_SIZE]>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_header() {
        let c = Ctx::default();
        let base = &c as *const Ctx as usize;
        let at = |p: *const u8| p as usize - base;
        assert_eq!(at((&c.opcode) as *const u8), 8);
        assert_eq!(at((&c.slba) as *const u64 as *const u8), 16);
        assert_eq!(at((&c.nlb) as *const u32 as *const u8), 24);
        assert_eq!(at((&c.status) as *const u16 as *const u8), 28);
        assert_eq!(at((&c.queue) as *const u16 as *const u8), 30);
        assert_eq!(at((&c.disk_blocks) as *const u64 as *const u8), 32);
        assert_eq!(at((&c.block_size) as *const u32 as *const u8), 40);
        assert_eq!(at((&c.cookie) as *const u64 as *const u8), 48);
        // The header is the contract: every offset comment there matches.
        let h = include_str!("../../../examples/classifiers/nvmux_classifier.h");
        for (name, off) in [
            ("version", 0),
            ("event", 4),
            ("opcode", 8),
            ("flags", 9),
            ("route", 10),
            ("hops", 11),
            ("nsid", 12),
            ("slba", 16),
            ("nlb", 24),
            ("status", 28),
            ("queue", 30),
            ("disk_blocks", 32),
            ("block_size", 40),
            ("cookie", 48),
        ] {
            let line = h
                .lines()
                .find(|l| l.contains(&format!(" {name};")))
                .unwrap_or_else(|| panic!("{name} not in the header"));
            assert!(
                line.contains(&format!("/* {off:2} ")) || line.contains(&format!("/* {off} ")),
                "{name}: {line}"
            );
            assert_eq!(field_at(off), name);
        }
    }

    #[test]
    fn verdicts() {
        assert_eq!(decode_verdict(0), Some((Route::Chain, false)));
        assert_eq!(decode_verdict(2 | HOOK), Some((Route::External, true)));
        assert_eq!(decode_verdict(4), None);
        assert_eq!(decode_verdict(1 << 20), None);
        assert!(store_allowed(16, 8));
        assert!(store_allowed(28, 2));
        assert!(!store_allowed(28, 4));
        assert!(!store_allowed(8, 1));
    }
}
