//! Fuzz the NVMe/TCP host's parsing of controller PDUs (framing, lengths, offsets,
//! digests).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_nvmf::fuzzing::fuzz_host_pdu(data));
