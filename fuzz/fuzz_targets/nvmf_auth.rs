//! Fuzz DH-HMAC-CHAP: the controller's state machine (Negotiate, Challenge, Reply,
//! Success1/2, Failure1/2) against a host the input scripts, with raw messages mixed in.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_nvmf::fuzzing::fuzz_auth(data));
