//! An external function's completion queue as a broken or hostile function leaves it: the
//! daemon's reaper completes only entries in flight, each once. See nvmux_router::fuzzing.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvmux_router::fuzzing::ext_ring_one(data);
});
