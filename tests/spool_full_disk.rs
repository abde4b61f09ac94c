//! The store on a full disk (a 20 MiB tmpfs, 1 MiB segments, 50 KB messages):
//!
//! - new mail gets `452 4.3.1` at RCPT (or at the end of data when the disk fills during the
//!   message), never a 250 for a message that was not stored, never a poisoned writer;
//! - `turnpike queue` and the metrics say so (free bytes, refused count);
//! - an ATRN drains everything that got its 250, exactly once: the DONE records go into the
//!   reserve, the drained segments are deleted, and a second ATRN finds no mail;
//! - mail is accepted again without a restart once the drain freed space;
//! - a server started on a disk that is completely full (a filler file takes the rest) comes
//!   up, serves ATRN, and takes mail again once space returns.
//!
//! Needs root to mount the tmpfs (CI runs as root); skips visibly otherwise.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::customer::{atrn_drain, Answer, PLAINTEXT_AUTH};
use common::{metric, SmtpClient, TestServer, Tmpfs};

const BODY_SIZE: usize = 50_000;

/// Message `n`: a `X-Fill` header naming it, padded to about [`BODY_SIZE`].
fn body(n: u64) -> String {
    let mut b = format!("Subject: fill {n}\r\nX-Fill: {n}\r\n\r\n");
    let line = format!("{:-<76}\r\n", format!("message {n} "));
    while b.len() < BODY_SIZE {
        b.push_str(&line);
    }
    b
}

fn number_of(body: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(body);
    text.split("X-Fill: ")
        .nth(1)
        .and_then(|r| r.split("\r\n").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("delivered body without X-Fill"))
}

/// What became of one attempt to hand a message to the MX.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Stored,
    /// Refused with 452 4.3.1, at RCPT (`true`) or at the end of data.
    Full(bool),
}

/// One transaction on `c`. Any reply but 250 or `452 4.3.1` fails the test.
fn send(c: &mut SmtpClient, n: u64) -> Sent {
    c.cmd("MAIL FROM:<fill@sender.test>", 250);
    c.send(&format!("RCPT TO:<u{n}@alice.test>"));
    let (code, text) = c.read_reply().unwrap();
    if code == 452 {
        assert!(text.starts_with("4.3.1 "), "452 {text}");
        c.cmd("RSET", 250);
        return Sent::Full(true);
    }
    assert_eq!(code, 250, "RCPT: {code} {text}");
    c.cmd("DATA", 354);
    let mut data = body(n).into_bytes();
    data.extend_from_slice(b".\r\n");
    c.send_bytes(&data);
    let (code, text) = c.read_reply().unwrap();
    match code {
        250 => Sent::Stored,
        452 => {
            assert!(text.starts_with("4.3.1 "), "452 {text}");
            Sent::Full(false)
        }
        _ => panic!("end of data: {code} {text} (only 250 or 452 4.3.1 are right)"),
    }
}

/// Sends messages from `*next` on, over fresh connections (the kernel spreads them over the
/// cores, each with its own journal), until ten connections in a row are refused at their
/// first RCPT: every journal is full. Returns the numbers that got their 250.
fn fill(server: &TestServer, next: &mut u64) -> Vec<u64> {
    let mut stored = Vec::new();
    let mut refused_at_once = 0;
    for _ in 0..500 {
        let mut c = SmtpClient::connect(server.addr("mx"));
        c.expect(220);
        c.cmd("EHLO filler.test", 250);
        let mut first = true;
        loop {
            let n = *next;
            *next += 1;
            match send(&mut c, n) {
                Sent::Stored => stored.push(n),
                Sent::Full(at_rcpt) => {
                    refused_at_once = if first && at_rcpt {
                        refused_at_once + 1
                    } else {
                        0
                    };
                    break;
                }
            }
            first = false;
        }
        c.send("QUIT");
        if refused_at_once >= 10 {
            return stored;
        }
    }
    panic!("the disk never filled up ({} stored)", stored.len());
}

/// A fresh session's RCPT reply code.
fn rcpt_code(server: &TestServer) -> (u16, String) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO probe.test", 250);
    c.cmd("MAIL FROM:<probe@sender.test>", 250);
    c.send("RCPT TO:<probe@alice.test>");
    let r = c.read_reply().unwrap();
    c.send("QUIT");
    r
}

/// Drains alice.test and checks it delivered exactly `want`, each once.
fn drain_exactly(server: &TestServer, want: &[u64], what: &str) {
    let d = atrn_drain(server, "alice", "", |_, _| Answer::Accept);
    assert_eq!(d.atrn.0, 250, "{what}: ATRN {:?}", d.atrn);
    assert!(!d.cut, "{what}: the provider cut the session");
    let mut got: BTreeMap<u64, usize> = BTreeMap::new();
    for m in &d.accepted {
        *got.entry(number_of(&m.body)).or_default() += 1;
    }
    let twice: Vec<_> = got.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "{what}: delivered twice: {twice:?}");
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        want,
        "{what}: delivered set differs from the messages that got 250"
    );
    let again = atrn_drain(server, "alice", "", |_, _| Answer::Accept);
    assert_eq!(again.atrn.0, 453, "{what}: a second ATRN found mail again");
}

/// Waits (bounded) until a new RCPT is accepted again, without a restart, and every core's
/// journal has left its short-of-space state (each core probes for space on its own, about
/// once a second; a session lands on either core).
fn wait_accepting(server: &TestServer, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, text) = rcpt_code(server);
        if code == 250 && !journal_states(server).iter().any(|s| s == "short_of_space") {
            return;
        }
        assert!(code == 250 || code == 452, "{what}: {text}");
        assert!(
            Instant::now() < deadline,
            "{what}: still refusing 30 s after the drain\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The state of every journal writer that `turnpike queue --json` shows; none when the
/// storage section is left out because every writer is fine and nothing was refused.
fn journal_states(server: &TestServer) -> Vec<String> {
    let q = server.queue_json();
    let Some(journals) = q.get("storage").map(|s| &s["journals"]) else {
        return Vec::new();
    };
    journals
        .as_array()
        .expect("storage.journals in queue --json")
        .iter()
        .map(|j| j["state"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn full_disk_refuses_with_452_drains_once_and_recovers_without_restart() {
    let Some(fs) = Tmpfs::mount(20) else { return };
    let mut server = TestServer::start_in(
        fs.subdir("data"),
        &format!("{PLAINTEXT_AUTH}[spool]\nsegment_size = \"1MiB\"\n"),
        &[("alice", &["alice.test"])],
    );
    let mut next = 0;

    // 1. Fill the disk: only 250 or 452 4.3.1.
    let mut stored = fill(&server, &mut next);
    assert!(stored.len() > 100, "only {} stored", stored.len());
    let (code, text) = rcpt_code(&server);
    assert_eq!((code, &text[..6]), (452, "4.3.1 "), "RCPT on a full disk");

    // 2. The operator sees it.
    let states = journal_states(&server);
    assert!(
        states.iter().any(|s| s == "short_of_space") && !states.iter().any(|s| s == "poisoned"),
        "{states:?}"
    );
    let q = server.queue_json();
    assert!(q["storage"]["free_bytes"].as_u64().is_some(), "{q}");
    let refused: u64 = q["storage"]["journals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["refused"].as_u64().unwrap())
        .sum();
    assert!(refused >= 1, "{q}");
    let text = server.cli(&["queue"], None);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("SHORT OF SPACE"), "{text}");
    let m = server.metrics();
    assert!(
        metric(&m, "turnpike_storage_refused_total").unwrap() >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "turnpike_journal_short_of_space").unwrap() >= 1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "turnpike_journal_poisoned"), Some(0.0), "{m}");
    assert!(metric(&m, "turnpike_spool_free_bytes").is_some(), "{m}");

    // 3. Deliveries go on, each message once; then mail is accepted again, no restart.
    let first_fill = stored.len();
    drain_exactly(&server, &stored, "drain on a full disk");
    let drained = Instant::now();
    wait_accepting(&server, "after the drain");
    let back_after = drained.elapsed();
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO again.test", 250);
    assert_eq!(send(&mut c, next), Sent::Stored);
    stored = vec![next];
    next += 1;
    c.cmd("QUIT", 221);

    // 4. Start on a disk that is completely full. (A restart first lets reclaim delete the
    // segments the drain emptied, so nothing frees space by itself after the next start.)
    server.restart();
    stored.extend(fill(&server, &mut next));
    server.stop();
    let filler = fs.path().join("filler");
    let out = common::run_bounded(
        std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display())),
        None,
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "dd should stop at a full disk");
    assert!(
        fs.free_bytes() < 64 << 10,
        "{} bytes still free",
        fs.free_bytes()
    );
    server.restart();
    assert!(
        !journal_states(&server).iter().any(|s| s == "poisoned"),
        "{}",
        server.logs()
    );
    let states = journal_states(&server);
    assert!(
        states.iter().all(|s| s == "short_of_space"),
        "after a start on a full disk: {states:?}"
    );
    let (code, _) = rcpt_code(&server);
    assert_eq!(code, 452, "RCPT right after a start on a full disk");
    drain_exactly(&server, &stored, "drain after a start on a full disk");
    std::fs::remove_file(&filler).unwrap();
    wait_accepting(&server, "after the filler was removed");
    eprintln!(
        "full disk: {first_fill} messages of {BODY_SIZE} bytes stored before 452 4.3.1, all \
         drained once, accepted again {back_after:?} after the drain; {} stored before the \
         restart on a full disk, all drained once",
        stored.len()
    );
    let logs = server.logs();
    assert!(!logs.contains("poisoned"), "{logs}");
    if std::env::var_os("TURNPIKE_TEST_SHOW_LOGS").is_some() {
        eprintln!("{logs}");
    }
}
