//! Fuzz the vfio-user NVMe controller: admin and I/O commands, doorbell writes and the
//! guest memory it reads (PRP lists, shadow doorbells), on real worker threads.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_vfiouser::fuzzing::fuzz_nvme(data));
