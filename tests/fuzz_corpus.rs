//! Replays the checked-in fuzz corpora (`tests/fuzz/corpus/<target>/*`) through the same target
//! bodies the cargo-fuzz crate uses, on the stable toolchain, as part of `cargo test`. The
//! targets assert their invariants themselves; a panic here is a protocol-core bug.

use std::fs;
use std::path::Path;

use turnpike::proto::fuzzing;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let mut replayed = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("readable corpus directory").path();
        if !path.is_file() {
            continue;
        }
        let input = fs::read(&path).expect("readable corpus file");
        let outcome = std::panic::catch_unwind(|| body(&input));
        assert!(
            outcome.is_ok(),
            "{target} target panicked on {}",
            path.display()
        );
        replayed += 1;
    }
    // The seeds are checked in; an empty directory means the corpus went missing.
    assert!(
        replayed >= 10,
        "only {replayed} {target} corpus files in {}",
        dir.display()
    );
}

#[test]
fn command_corpus() {
    replay("command", fuzzing::command);
}

#[test]
fn data_corpus() {
    replay("data", fuzzing::data);
}

#[test]
fn inbound_corpus() {
    replay("inbound", fuzzing::inbound);
}

#[test]
fn reversed_corpus() {
    replay("reversed", fuzzing::reversed);
}

#[test]
fn sasl_corpus() {
    replay("sasl", fuzzing::sasl);
}

#[test]
fn accounts_corpus() {
    replay("accounts", turnpike::accounts::fuzzing::parse);
}
