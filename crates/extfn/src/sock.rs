//! Fixed-size messages with descriptors (SCM_RIGHTS) on a Unix stream socket.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::proto::MSG_SIZE;

/// Most descriptors one message carries.
const MAX_FDS: usize = 4;

fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Send one message with `fds` attached, without blocking (`WouldBlock` if the socket
/// buffer is full) and without SIGPIPE.
pub fn send_with_fds(sock: RawFd, msg: &[u8; MSG_SIZE], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: MSG_SIZE,
    };
    let mut cbuf = vec![0u64; cmsg_space().div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer in it refers to a live local buffer,
    // and the CMSG macros stay inside `cbuf` (sized with CMSG_SPACE for MAX_FDS).
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            mh.msg_control = cbuf.as_mut_ptr().cast();
            mh.msg_controllen = libc::CMSG_SPACE(bytes as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
        let r = libc::sendmsg(sock, &mh, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r as usize != MSG_SIZE {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
        }
    }
    Ok(())
}

/// Receive one message (and its descriptors) without blocking. `Ok((0, _))` is end of
/// file. A message cut short by the peer is an error.
pub fn recv_with_fds(sock: RawFd, msg: &mut [u8; MSG_SIZE]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: MSG_SIZE,
    };
    let mut cbuf = vec![0u64; cmsg_space().div_ceil(8)];
    let mut fds = Vec::new();
    // SAFETY: as in send_with_fds; the kernel fills at most msg_controllen bytes, and the
    // CMSG walk stays inside what it reported. Each received descriptor is new and ours.
    let n = unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr().cast();
        mh.msg_controllen = (cbuf.len() * 8) as _;
        let r = libc::recvmsg(
            sock,
            &mut mh,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC | libc::MSG_WAITALL,
        );
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
        if mh.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many descriptors in one message",
            ));
        }
        r as usize
    };
    if n != 0 && n != MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "message cut short",
        ));
    }
    Ok((n, fds))
}
