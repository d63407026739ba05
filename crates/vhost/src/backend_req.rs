//! The back-end request channel (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`), used to send
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` after a resize.
//!
//! The `vhost` crate (0.18) parses SET_BACKEND_REQ_FD and hands the socket to the handler
//! wrapped in a `Backend` that can only send shared-object and shmem messages. So the
//! connection thread peeks at each request header before the crate reads it; when the
//! request is SET_BACKEND_REQ_FD it peeks once more with room for a descriptor. Linux
//! installs a duplicate of a descriptor that is peeked at (`MSG_PEEK` with SCM_RIGHTS), so
//! we get our own handle on the channel while the crate consumes the message as usual.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// FrontendReq::SET_BACKEND_REQ_FD.
const SET_BACKEND_REQ_FD: u32 = 21;
/// BackendReq::CONFIG_CHANGE_MSG.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;

/// If the next request on `conn` is SET_BACKEND_REQ_FD, return a duplicate of the
/// descriptor it carries. Blocks until a request header (or end of stream) arrives.
pub(crate) fn peek_backend_req_fd(conn: &UnixStream) -> Option<UnixStream> {
    let fd = conn.as_raw_fd();
    let mut hdr = [0u8; 12];
    // SAFETY: `hdr` is a writable buffer of the length passed. Without a control buffer
    // the kernel drops (never installs) any descriptors attached to the peeked bytes.
    let n = unsafe { libc::recv(fd, hdr.as_mut_ptr().cast(), hdr.len(), libc::MSG_PEEK) };
    if n < 4 || u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) != SET_BACKEND_REQ_FD {
        return None;
    }
    // Room for a few descriptors: a misbehaving client may attach more than one.
    const MAX_FDS: usize = 4;
    let mut cbuf = [0u64; 8]; // u64 for cmsghdr alignment; 64 bytes >= CMSG_SPACE(16)
    let mut iov = libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: hdr.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields set below point to
    // live buffers of the given lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<i32>()) as u32) };
    msg.msg_controllen = (space as usize).min(std::mem::size_of_val(&cbuf));
    // SAFETY: `msg` describes the buffers above, which outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return None;
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel just filled, within
    // msg_controllen; each SCM_RIGHTS payload holds (len - CMSG_LEN(0)) / 4 descriptors
    // that the kernel installed for us, so we own them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const i32;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for k in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(k))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // Extra descriptors (if any) are closed when `fds` drops.
    let first = fds.into_iter().next()?;
    Some(UnixStream::from(first))
}

/// Tell the front-end that the config space changed (it re-reads it with GET_CONFIG and
/// raises the guest's config interrupt). No reply is requested: the front-end answers
/// GET_CONFIG on the main channel, which this thread must not wait behind.
pub(crate) fn send_config_change(chan: &mut UnixStream) -> std::io::Result<()> {
    chan.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut msg = [0u8; 12];
    msg[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
    msg[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    // size (bytes 8..12) is 0: the message has no payload.
    chan.write_all(&msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    fn send_with_fd(sock: &UnixStream, data: &[u8], fd: Option<&UnixStream>) {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        };
        let mut cbuf = [0u64; 4];
        // SAFETY: test-only sendmsg with buffers that outlive the call.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if let Some(f) = fd {
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, f.as_fd().as_raw_fd());
            }
            assert_eq!(
                libc::sendmsg(sock.as_raw_fd(), &msg, 0),
                data.len() as isize
            );
        }
    }

    #[test]
    fn peek_duplicates_the_channel_and_leaves_the_message() {
        let (front, back) = UnixStream::pair().unwrap();
        let (chan_front, chan_back) = UnixStream::pair().unwrap();
        // Another request first: not ours, nothing taken.
        let mut other = [0u8; 12];
        other[0] = 1; // GET_FEATURES
        send_with_fd(&front, &other, None);
        assert!(peek_backend_req_fd(&back).is_none());
        let mut buf = [0u8; 12];
        (&back).read_exact(&mut buf).unwrap();
        assert_eq!(buf, other);

        let mut set = [0u8; 12];
        set[0] = SET_BACKEND_REQ_FD as u8;
        set[4] = 1;
        send_with_fd(&front, &set, Some(&chan_back));
        drop(chan_back);
        let mut dup = peek_backend_req_fd(&back).expect("descriptor");
        // The message (and its descriptor) is still there for the real reader.
        (&back).read_exact(&mut buf).unwrap();
        assert_eq!(buf, set);
        send_config_change(&mut dup).unwrap();
        let mut got = [0u8; 12];
        (&chan_front).read_exact(&mut got).unwrap();
        assert_eq!(got, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
