//! Commands parked on another thread's work (an allocation, a claim, a journal commit),
//! and the mailbox that brings them back to their queue. Shared by the pool (which
//! holds and wakes them) and thin volumes' queues (which park them and take them back),
//! so that neither module imports the other's internals.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nvmux_core::eventfd::signal_fd;
use nvmux_core::Status;

/// Completions and retries posted to a queue from other threads.
pub(crate) struct Mailbox {
    pub(crate) items: Mutex<Vec<(u64, Status)>>,
    /// Set after a post, so an empty mailbox costs the queue no lock.
    pub(crate) posted: AtomicBool,
    /// The queue's completion eventfd, or a duplicate of it: a late post after the queue
    /// is gone still writes to a valid eventfd, never to a reused descriptor number.
    pub(crate) fd: OwnedFd,
}

impl Mailbox {
    pub(crate) fn post(&self, token: u64, st: Status) {
        self.items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((token, st));
        self.posted.store(true, Ordering::Release);
        self.signal();
    }

    pub(crate) fn signal(&self) {
        signal_fd(self.fd.as_raw_fd());
    }
}

/// A command waiting for something another thread does (an allocation, a claim, a
/// journal commit). `wake` sends it back to its queue.
pub(crate) struct Parked {
    pub(crate) mb: Arc<Mailbox>,
    pub(crate) token: u64,
    /// When it parked: the pool's watchdog fails it after the command timeout.
    pub(crate) since: std::time::Instant,
}

impl Parked {
    pub(crate) fn wake(self, st: Status) {
        self.mb.post(self.token, st);
    }

    /// It waited too long: complete the command with an error instead of what it waits
    /// for (the caller has taken it out of the list it waited in, so it is woken once).
    pub(crate) fn expire(self) {
        self.mb
            .post((self.token & !KIND) | COMPLETE, Status::ABORTED);
    }
}

/// Token kinds in a mailbox (low two bits; the command's index above them): run the
/// command again, complete it with the status, or resume its completion after a test
/// delay.
pub(crate) const RETRY: u64 = 0;
pub(crate) const COMPLETE: u64 = 1;
pub(crate) const RESUME: u64 = 2;
pub(crate) const KIND: u64 = 3;
