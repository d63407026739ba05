//! Fuzz the pool metadata decoders (superblock, journal block, volume table block).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_volume::fuzz_metadata(data));
