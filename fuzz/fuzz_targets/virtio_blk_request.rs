//! Fuzz the virtqueue descriptor walk and virtio-blk request parsing.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_vhost::fuzzing::fuzz_one(data));
