//! Synchronous operations on a file or block device that more than one room needs: its
//! size, and zeroing a byte range (the backend's file devices, a pool's metadata and
//! release-then-zero, the daemon's erase).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of a regular file or a block device.
pub fn device_bytes(file: &File) -> std::io::Result<u64> {
    let m = file.metadata()?;
    if !m.file_type().is_block_device() {
        return Ok(m.len());
    }
    let mut sz: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes a u64 into the provided, valid location.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut sz) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sz)
}

/// Zero `len` bytes at `off` synchronously: punch a hole (files, and block devices that
/// discard to zeroes), else zero the range, else write zeroes.
pub fn zero_range(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    zero_range_with(
        file,
        off,
        len,
        &[
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            libc::FALLOC_FL_ZERO_RANGE,
        ],
    )
}

/// Like [`zero_range`], but keep (or make) the range allocated where the filesystem can
/// (`FALLOC_FL_ZERO_RANGE`): a later write there needs no block allocation, and the space
/// stays reserved. Falls back to punching holes, then to writing zeros.
pub fn zero_range_allocated(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    zero_range_with(
        file,
        off,
        len,
        &[
            libc::FALLOC_FL_ZERO_RANGE,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        ],
    )
}

fn zero_range_with(file: &File, off: u64, len: u64, modes: &[i32]) -> std::io::Result<()> {
    for &mode in modes {
        // SAFETY: fallocate on the caller's descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
        ) {
            return Err(e);
        }
    }
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(file, &zeros[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
