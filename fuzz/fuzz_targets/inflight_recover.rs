//! Fuzz the recovery of a hostile vhost-user inflight region (INFLIGHT_SHMFD).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_vhost::fuzzing::fuzz_inflight(data));
