//! Classifier objects and raw programs: the ELF reader, the verifier, and, for what they
//! accept, a run under the interpreter (whose memory checks must never fire) and the JIT
//! (which must agree). See nvmux_router::fuzzing.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvmux_router::fuzzing::classifier_one(data);
});
