//! Fuzz a whole NBD connection: the fixed newstyle negotiation, then requests, replies and
//! write payloads, over a 1 MiB memory disk (and a read-only export of it).
#![no_main]
use std::sync::Arc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(dev) = nvmux_backend::MemoryDevice::new(1 << 20, 512, false) {
        nvmux_nbd::fuzzing::fuzz_conn(data, Arc::new(dev));
    }
});
