//! Compaction during a drain: the segments a reversal reads from are pinned, so copying their
//! messages forward never deletes a file under the session, and every message arrives once.
//!
//! Setup: one journal holds 100 KB messages for two customers, interleaved; bob's are drained,
//! so every older segment is about half dead. Alice's drain then pauses after her first
//! message while the operator runs `turnpike queue reclaim` (compaction of the oldest
//! segments, twice), and goes on.

mod common;

use std::collections::BTreeSet;

use common::customer::{atrn_drain, Answer, PLAINTEXT_AUTH};
use common::{SmtpClient, TestServer};

const SIZE: usize = 100_000;

fn body(n: u64) -> String {
    let mut b = format!("Subject: compact {n}\r\nX-N: {n}\r\n\r\n");
    let line = format!("{:=<76}\r\n", format!("message {n} "));
    while b.len() < SIZE {
        b.push_str(&line);
    }
    b
}

fn number_of(body: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(body);
    text.split("X-N: ")
        .nth(1)
        .and_then(|r| r.split("\r\n").next())
        .and_then(|n| n.parse().ok())
        .expect("delivered body names its number")
}

fn reclaim(server: &TestServer) -> serde_json::Value {
    let out = server.cli(&["queue", "reclaim", "--json"], None);
    assert!(out.status.success(), "{}", common::output_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn compaction_during_a_drain_loses_nothing() {
    let server = TestServer::start(
        &format!("{PLAINTEXT_AUTH}[spool]\nsegment_size = \"1MiB\"\ncompact_live_ratio = 0.9\n"),
        &[("alice", &["alice.test"]), ("bob", &["bob.test"])],
    );
    // One connection: one core, one journal, messages in arrival order.
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO loader.test", 250);
    let mut alice = BTreeSet::new();
    for n in 0..48u64 {
        let to = if n % 2 == 0 {
            "a@alice.test"
        } else {
            "b@bob.test"
        };
        c.send_mail("s@sender.test", &[to], &body(n));
        if n % 2 == 0 {
            alice.insert(n);
        }
    }
    c.cmd("QUIT", 221);

    let bob = atrn_drain(&server, "bob", "", |_, _| Answer::Accept);
    assert_eq!((bob.atrn.0, bob.accepted.len()), (250, 24), "bob's drain");

    let mut compacted = Vec::new();
    let d = atrn_drain(&server, "alice", "", |i, _| {
        if i == 0 {
            compacted.push(reclaim(&server));
            compacted.push(reclaim(&server));
        }
        Answer::Accept
    });
    let moved: u64 = compacted.iter().map(|r| r["moved"].as_u64().unwrap()).sum();
    let runs: u64 = compacted
        .iter()
        .map(|r| r["compacted"].as_u64().unwrap())
        .sum();
    assert!(
        runs >= 2 && moved > 0,
        "compaction did not run during the drain: {compacted:?}"
    );
    assert!(!d.cut, "the session was cut:\n{}", server.logs());
    let got: Vec<u64> = d.accepted.iter().map(|m| number_of(&m.body)).collect();
    let set: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(set.len(), got.len(), "delivered twice: {got:?}");
    assert_eq!(set, alice, "every message of alice arrives");
    assert!(
        !server.logs().contains("cannot read a held message"),
        "{}",
        server.logs()
    );
    assert_eq!(
        atrn_drain(&server, "alice", "", |_, _| Answer::Accept)
            .atrn
            .0,
        453
    );
    // Once the session is over, the pinned segments go.
    let after = reclaim(&server);
    assert!(after["deleted"].as_u64().unwrap() > 0, "{after}");
}
