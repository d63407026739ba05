//! An eventfd: a counter in the kernel that threads and processes signal and poll.
//!
//! One type for the wake-ups of workers, listeners and queues, so that the raw
//! `libc::eventfd`, `libc::write` and `libc::read` calls (and their `SAFETY` arguments)
//! live here once. Signalling is one `write` system call and allocates nothing, so it is
//! used on hot paths as it is. (`nvmux-extfn`, which depends on nothing of ours so that
//! a third party's function links only it, keeps its own one-line signal.)

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// A non-blocking, close-on-exec eventfd, closed on drop.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd with the counter at 0 (`EFD_NONBLOCK | EFD_CLOEXEC`).
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Add 1 to the counter: pollers of the descriptor wake. Never blocks; a counter at
    /// its maximum (2^64 - 2, never reached by wake-ups) leaves it as it is, still
    /// readable, which is all a wake-up needs.
    #[inline]
    pub fn signal(&self) {
        signal_fd(self.0.as_raw_fd());
    }

    /// Reset the counter to 0 and return what it held (0 if nothing was signalled).
    #[inline]
    pub fn drain(&self) -> u64 {
        drain_fd(self.0.as_raw_fd())
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Take over an eventfd made elsewhere (a peer's kick or call descriptor received
    /// over a socket) and make it non-blocking, so that draining it never blocks.
    pub fn adopt(fd: OwnedFd) -> io::Result<EventFd> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; flags are plain integers.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }
}

/// Add 1 to the counter of the eventfd `fd` (one this process holds open, such as a
/// peer's kick or call descriptor).
#[inline]
pub fn signal_fd(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local u64; a descriptor that is not open fails with
    // EBADF and nothing happens.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Reset the counter of the non-blocking eventfd `fd` (one this process holds open, such
/// as a queue's completion descriptor a worker slept on) and return what it held.
#[inline]
pub fn drain_fd(fd: RawFd) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a local u64; a non-blocking eventfd at 0 fails with
    // EAGAIN (a descriptor that is not open, with EBADF) and leaves `v` at 0.
    let n = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if n == 8 {
        v
    } else {
        0
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl IntoRawFd for EventFd {
    fn into_raw_fd(self) -> RawFd {
        self.0.into_raw_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_then_drain() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.drain(), 0, "a new eventfd is at 0 and does not block");
        e.signal();
        e.signal();
        signal_fd(e.as_raw_fd());
        assert_eq!(e.drain(), 3);
        assert_eq!(e.drain(), 0);
    }

    #[test]
    fn an_adopted_descriptor_does_not_block() {
        // SAFETY: eventfd takes no pointers; a blocking one, as a peer may send.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor that nothing else owns.
        let e = EventFd::adopt(unsafe { OwnedFd::from_raw_fd(fd) }).unwrap();
        assert_eq!(e.drain(), 0, "would have blocked without O_NONBLOCK");
        signal_fd(e.as_raw_fd());
        assert_eq!(e.drain(), 1);
    }

    #[test]
    fn signal_wakes_a_poller() {
        let e = EventFd::new().unwrap();
        let mut p = libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0);
        e.signal();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 1);
        assert_ne!(p.revents & libc::POLLIN, 0);
    }
}
