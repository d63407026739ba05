//! Fuzz a whole NVMe/TCP connection: PDUs, command capsules, admin and I/O commands,
//! R2T/H2CData, over a 1 MiB memory namespace.
#![no_main]
use std::sync::Arc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(dev) = nvmux_backend::MemoryDevice::new(1 << 20, 512, false) {
        nvmux_nvmf::fuzzing::fuzz_conn(data, Arc::new(dev));
    }
});
