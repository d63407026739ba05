//! Physical Region Page entries (NVMe 1.4, 4.3): the guest memory of a command's data,
//! every page checked against the client's DMA mappings before it is used.
//!
//! A transfer of `len` bytes starts at PRP1 (any dword-aligned offset) and runs to the
//! end of that page; if it needs one more page, PRP2 is that page; if it needs more,
//! PRP2 points to a PRP list (qword-aligned), whose last entry points to the next list
//! page when the list does not fit its page. Every entry but PRP1 must be page aligned.
//! The walk is bounded by the transfer length (at most [`MAX_PRP_BYTES`]), so a list
//! that loops back on itself ends when the length runs out.

use crate::dma::{DmaFault, DmaTable, GuestSlice};

/// The memory page size (CC.MPS = 0).
pub const PAGE: u64 = 4096;
/// The largest transfer a PRP walk accepts (MDTS 5: 32 pages).
pub const MAX_PRP_BYTES: usize = nvmux_nvmf::ctrl::MAX_TRANSFER;

/// Why a PRP walk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrpError {
    /// An entry with an offset where none is allowed (or PRP1 not dword aligned).
    Offset,
    /// A page (or list page) outside the mapped DMA, or without the needed access.
    Fault(DmaFault),
    /// The transfer is longer than [`MAX_PRP_BYTES`].
    TooLong,
}

impl PrpError {
    /// The command's completion status: PRP Offset Invalid, Data Transfer Error, or
    /// Invalid Field.
    pub fn status(self) -> nvmux_core::Status {
        match self {
            PrpError::Offset => nvmux_core::Status::new(0, 0x13),
            PrpError::Fault(_) => nvmux_core::Status::DATA_TRANSFER_ERROR,
            PrpError::TooLong => nvmux_core::Status::INVALID_FIELD,
        }
    }
}

impl From<DmaFault> for PrpError {
    fn from(f: DmaFault) -> Self {
        PrpError::Fault(f)
    }
}

/// Walk the pages of a `len`-byte transfer described by `prp1`/`prp2`, calling `f` with
/// each page-bounded piece of guest memory in order. `write`: the controller writes the
/// memory (data for the host), so the mapping must allow writes. Nothing is called for a
/// piece after the first error; pieces before it were handed out already (the caller
/// fails the command).
pub fn walk<'t>(
    t: &'t DmaTable,
    prp1: u64,
    prp2: u64,
    len: usize,
    write: bool,
    mut f: impl FnMut(GuestSlice<'t>),
) -> Result<(), PrpError> {
    if len == 0 {
        return Ok(());
    }
    if len > MAX_PRP_BYTES {
        return Err(PrpError::TooLong);
    }
    if prp1 & 3 != 0 {
        return Err(PrpError::Offset);
    }
    let first = len.min((PAGE - (prp1 % PAGE)) as usize);
    f(t.translate(prp1, first, write)?);
    let mut left = len - first;
    if left == 0 {
        return Ok(());
    }
    if left <= PAGE as usize {
        if !prp2.is_multiple_of(PAGE) {
            return Err(PrpError::Offset);
        }
        f(t.translate(prp2, left, write)?);
        return Ok(());
    }
    let mut list = prp2;
    // Every list page yields at least one data page, so the loop ends within
    // MAX_PRP_BYTES / PAGE + 1 rounds.
    for _ in 0..=(MAX_PRP_BYTES as u64 / PAGE) {
        if list & 7 != 0 {
            return Err(PrpError::Offset);
        }
        let n = ((PAGE - list % PAGE) / 8) as usize;
        let lp = t.translate(list, n * 8, false)?;
        for i in 0..n {
            let mut e = [0u8; 8];
            // The list page was translated whole: entry i lies inside it.
            lp.read_at(i * 8, &mut e);
            let e = u64::from_le_bytes(e);
            if i == n - 1 && left > PAGE as usize {
                // The last entry chains to the next list page.
                list = e;
                break;
            }
            if !e.is_multiple_of(PAGE) {
                return Err(PrpError::Offset);
            }
            let piece = left.min(PAGE as usize);
            f(t.translate(e, piece, write)?);
            left -= piece;
            if left == 0 {
                return Ok(());
            }
        }
    }
    Err(PrpError::TooLong)
}

/// Copy `data` to the guest memory of a `len`-byte transfer (zeros past `data`'s end),
/// for admin commands that return data (Identify, Get Log Page, Get Features).
pub fn write_all(
    t: &DmaTable,
    prp1: u64,
    prp2: u64,
    len: usize,
    data: &[u8],
) -> Result<(), PrpError> {
    let mut off = 0usize;
    walk(t, prp1, prp2, len, true, |g| {
        let n = g.len();
        let src = data.get(off..).unwrap_or(&[]);
        let k = src.len().min(n);
        g.write_at(0, &src[..k]);
        g.zero_from(k);
        off += n;
    })
}

/// Copy the first `out.len()` bytes of a transfer from guest memory (a Dataset
/// Management range list).
pub fn read_all(t: &DmaTable, prp1: u64, prp2: u64, out: &mut [u8]) -> Result<(), PrpError> {
    let mut off = 0usize;
    let len = out.len();
    walk(t, prp1, prp2, len, false, |g| {
        if let Some(dst) = out.get_mut(off..) {
            g.read_to(dst);
        }
        off += g.len();
    })
}
