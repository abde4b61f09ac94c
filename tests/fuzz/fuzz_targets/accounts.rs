//! Fuzz target: `turnpike::accounts::fuzzing::parse` (the body is shared with
//! tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    turnpike::accounts::fuzzing::parse(data);
});
