//! Fuzz the vfio-user session: a client's byte stream, with descriptors, through a real
//! connection over a socketpair (header, sizes, every request's decoder, DMA_MAP of a
//! real memfd, region accesses, SET_IRQS).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_vfiouser::fuzzing::fuzz_msg(data));
