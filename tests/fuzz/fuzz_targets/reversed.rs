//! Fuzz target: `turnpike::proto::fuzzing::reversed` (the body is shared with tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    turnpike::proto::fuzzing::reversed(data);
});
