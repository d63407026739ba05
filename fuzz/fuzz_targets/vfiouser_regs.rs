//! Fuzz the NVMe PCI function's register file (BAR0 registers, doorbells, MSI-X table)
//! and configuration space with arbitrary accesses.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| nvmux_vfiouser::fuzzing::fuzz_regs(data));
