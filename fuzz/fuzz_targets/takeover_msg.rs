//! Fuzz the takeover channel's message parser (`nvmux upgrade`): type, payload and a
//! number of descriptors.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_vhost::handover::fuzz_one(data));
