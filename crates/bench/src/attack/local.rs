//! Hostile local peers: a vhost-user front-end whose guest memory shrinks under the
//! daemon, and an external function that tries to resize the ring the daemon hands it.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nvmux_extfn::proto;

use super::Res;

// ---- vhost-user front-ends ------------------------------------------------------------

/// A vhost-user front-end whose guest memory (an unsealed memfd) shrinks under the
/// daemon: it sets up a queue, has one request served, truncates the memfd to nothing,
/// kicks, and holds the connection for `hold`. The daemon must fail that device only.
pub fn vhost_shrink_memory(sock: &Path, hold: Duration) -> Res<()> {
    use crate::vufront::{request, Guest, GuestOpts, DATA};
    let mut g = Guest::setup_with(sock, GuestOpts::default())?;
    let (used, status) = request(&mut g, 0, DATA, 4096);
    if (used, status) != (4097, 0) {
        return Err(format!(
            "the first read was not served: used {used}, status {status}"
        ));
    }
    g.resize_memory(0)
        .map_err(|e| format!("truncate guest memory: {e}"))?;
    g.kick.write(1).map_err(|e| format!("kick: {e}"))?;
    std::thread::sleep(hold);
    Ok(())
}

// ---- external functions --------------------------------------------------------------

/// What the hostile function tried, and the errno each attempt got (0: it worked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FnReport {
    /// F_GET_SEALS of the ring memfd.
    pub seals: i32,
    pub shrink: i32,
    pub grow: i32,
    pub seal_write: i32,
}

fn errno_of(r: libc::c_int) -> i32 {
    if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// A hostile external function: attach to a disk's function socket like any function,
/// and when the daemon hands over a ring, try to pull its memory away (shrink and grow
/// the memfd, add F_SEAL_WRITE so the daemon's stores would fault). Returns what the
/// kernel answered; the connection closes with the daemon's commands in flight.
pub fn extfn_resize_ring(sock: &Path) -> std::io::Result<FnReport> {
    let mut s = UnixStream::connect(sock)?;
    s.write_all(
        &proto::Hello {
            version: proto::VERSION,
            name: "hostile".into(),
        }
        .encode(),
    )?;
    let mut b = [0u8; proto::MSG_SIZE];
    s.read_exact(&mut b)?;
    match proto::Welcome::decode(&b) {
        Some(w) if w.status == proto::WELCOME_OK => {}
        _ => {
            return Err(std::io::Error::other(
                "the daemon refused the hostile function",
            ))
        }
    }
    loop {
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 1000) };
        let (n, fds) = match nvmux_extfn::sock::recv_with_fds(s.as_raw_fd(), &mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => r?,
        };
        if n == 0 {
            return Err(std::io::Error::other("the daemon closed the connection"));
        }
        let Some(m) = proto::RingMsg::decode(&b) else {
            continue;
        };
        if m.kind != proto::MSG_ADD_RING || fds.is_empty() {
            continue;
        }
        let fd = fds[0].as_raw_fd();
        // SAFETY: fcntl and ftruncate on a descriptor we received and hold.
        let r = unsafe {
            FnReport {
                seals: libc::fcntl(fd, libc::F_GET_SEALS),
                shrink: errno_of(libc::ftruncate(fd, 0)),
                grow: errno_of(libc::ftruncate(fd, (m.size * 2) as libc::off_t)),
                seal_write: errno_of(libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE)),
            }
        };
        return Ok(r);
    }
}
