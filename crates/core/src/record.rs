//! The interface of a change log: the record of every change that reaches a device, kept
//! by the power-cut simulator (`nvmux powercut`). The log itself (`IoLog`) and the
//! `RecordingDevice` that feeds it from a block queue live in the backend; code that
//! writes a device synchronously (a pool's metadata) logs through this trait, so it
//! needs no backend.

/// Where synchronous changes to a device are logged, each after its call returned.
pub trait ChangeLog: Send + Sync {
    /// `data` was written at byte `off` (durable at once with `fua`).
    fn write(&self, off: u64, data: &[u8], fua: bool);
    /// `len` bytes at `off` now read as zeros.
    fn zero(&self, off: u64, len: u64);
    /// A flush (fsync) is issued now; its id goes to [`ChangeLog::flush_end`] when it
    /// succeeds.
    fn flush_start(&self) -> u64;
    /// The flush `id` completed successfully.
    fn flush_end(&self, id: u64);
}
