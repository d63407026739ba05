//! Fuzz NVMe/TCP PDU parsing (common header, lengths, offsets, digests).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_nvmf::fuzzing::fuzz_pdu(data));
