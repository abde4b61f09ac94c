//! Fuzz target: `turnpike::proto::fuzzing::sasl` (the body is shared with tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    turnpike::proto::fuzzing::sasl(data);
});
