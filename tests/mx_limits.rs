//! The MX's limits and refusals over real sockets, against the real `turnpike serve` binary.
//!
//! One test per behaviour. Each one:
//! - asserts the exact reply code **and** enhanced status code (RFC 2034) of every refusal,
//!   taken from `src/proto/inbound.rs`, `src/provider/core.rs` and the admission code;
//! - holds a message before the bad input and checks that `turnpike queue --json` is exactly
//!   the same afterwards (the bad input neither added, dropped nor resized held mail);
//! - checks that the server still works: a fresh connection delivers a message with `250`.
//!
//! Every wait is bounded ([`common::IO_TIMEOUT`] on every socket read, bounded retries where
//! the server releases resources asynchronously).

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::{queue_entry, senders_to_recipients, SmtpClient, TestServer};

/// Hosted domain that receives the baseline message and the bad input.
const HOSTED: &str = "acme.example";
/// Second domain of the same account: used where `HOSTED` is meant to be refused (quota).
const OTHER: &str = "acme.test";

fn start(config_extra: &str) -> TestServer {
    TestServer::start(config_extra, &[("acme", &[HOSTED, OTHER])])
}

/// Reads one reply and asserts its code and that every line carries `status` (`"5.7.1"`).
/// Returns the text after the status of the last line.
#[track_caller]
fn expect_status(c: &mut SmtpClient, code: u16, status: &str) -> String {
    let text = match c.read_reply() {
        Ok((got, text)) => {
            assert_eq!(got, code, "expected {code} {status}, got {got} {text:?}");
            text
        }
        Err(e) => panic!("expected {code} {status}, got error: {e}"),
    };
    let prefix = format!("{status} ");
    for line in text.lines() {
        assert!(
            line.starts_with(&prefix),
            "expected {code} {status}, got {code} {text:?}"
        );
    }
    text.lines()
        .last()
        .unwrap_or_default()
        .trim_start_matches(&prefix)
        .to_string()
}

/// Sends `line` (CRLF appended) and asserts the reply's code and enhanced status code.
#[track_caller]
fn cmd_status(c: &mut SmtpClient, line: &str, code: u16, status: &str) -> String {
    c.send(line);
    expect_status(c, code, status)
}

/// Connects, reads the 220 greeting and says EHLO.
#[track_caller]
fn session(server: &TestServer) -> SmtpClient {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c
}

/// QUIT, 221, and the server closes.
#[track_caller]
fn quit(mut c: SmtpClient) {
    cmd_status(&mut c, "QUIT", 221, "2.0.0");
    c.expect_closed();
}

/// A CRLF message of at least `min_len` octets (no leading dots).
fn message(subject: &str, min_len: usize) -> String {
    let mut m = format!("From: <x@client.test>\r\nSubject: {subject}\r\n\r\n");
    let mut n = 0;
    while m.len() < min_len {
        m.push_str(&format!("line {n} of {subject}, filler filler filler\r\n"));
        n += 1;
    }
    m
}

/// Holds one message of about `len` octets for `HOSTED` and returns the queue snapshot.
#[track_caller]
fn hold_baseline(server: &TestServer, len: usize) -> serde_json::Value {
    let mut c = session(server);
    let text = c.send_mail(
        "before@client.test",
        &[&format!("alice@{HOSTED}")],
        &message("baseline", len),
    );
    assert!(text.starts_with("2.0.0 "), "{text:?}");
    quit(c);
    let queue = server.queue_json();
    let (messages, bytes) = queue_entry(&queue, HOSTED).expect("baseline held");
    assert_eq!(messages, 1, "{queue}");
    assert!(bytes >= len as u64, "{queue}");
    queue
}

/// The held mail is exactly what it was before the bad input.
#[track_caller]
fn assert_unchanged(server: &TestServer, before: &serde_json::Value) {
    let now = server.queue_json();
    assert_eq!(&now, before, "bad input changed the held mail");
}

/// A fresh connection still delivers a message to `domain` with 250, and it is held next to
/// (not instead of) what was held before.
#[track_caller]
fn assert_still_serves(server: &TestServer, before: &serde_json::Value, domain: &str) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    assert_still_serves_on(c, server, before, domain);
}

/// [`assert_still_serves`] over `c`, a fresh connection whose 220 has been read.
#[track_caller]
fn assert_still_serves_on(
    mut c: SmtpClient,
    server: &TestServer,
    before: &serde_json::Value,
    domain: &str,
) {
    c.cmd("EHLO client.test", 250);
    let body = message("after", 300);
    let text = c.send_mail("after@client.test", &[&format!("bob@{domain}")], &body);
    assert!(text.starts_with("2.0.0 "), "{text:?}");
    quit(c);
    let now = server.queue_json();
    let (m0, b0) = queue_entry(before, domain).unwrap_or((0, 0));
    let (m1, b1) = queue_entry(&now, domain).expect("new message held");
    assert_eq!(m1, m0 + 1, "before {before}\nnow {now}");
    assert!(b1 >= b0 + body.len() as u64, "before {before}\nnow {now}");
    for row in before["domains"].as_array().expect("domains") {
        let d = row["domain"].as_str().expect("domain");
        if d != domain {
            let after = now["domains"]
                .as_array()
                .and_then(|a| a.iter().find(|r| r["domain"] == d));
            assert_eq!(after, Some(row), "{d} changed: before {before}\nnow {now}");
        }
    }
}

#[test]
fn relay_to_non_hosted_domain_is_refused_550_571() {
    let server = start("");
    let before = hold_baseline(&server, 500);

    let mut c = session(&server);
    cmd_status(&mut c, "MAIL FROM:<someone@client.test>", 250, "2.1.0");
    for rcpt in [
        "user@elsewhere.test",
        "user@[192.0.2.1]",
        "user@[127.0.0.1]",
        "user@[IPv6:::1]",
        "user@sub.acme.example",
        "user@acme.example.evil.test",
    ] {
        let text = cmd_status(&mut c, &format!("RCPT TO:<{rcpt}>"), 550, "5.7.1");
        assert!(text.contains("not hosted"), "{rcpt}: {text:?}");
    }
    // No recipient was accepted, so there is nothing to send data to.
    cmd_status(&mut c, "DATA", 503, "5.5.1");
    cmd_status(&mut c, "RSET", 250, "2.0.0");
    quit(c);

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

#[test]
fn smuggled_end_of_data_refuses_the_whole_message_550_552() {
    let server = start("");
    let before = hold_baseline(&server, 500);

    let mut c = session(&server);
    for fake_end in ["\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\n", "\r\n.\r"] {
        cmd_status(&mut c, "MAIL FROM:<attacker@client.test>", 250, "2.1.0");
        cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 250, "2.1.5");
        c.cmd("DATA", 354);
        let payload = format!(
            "Subject: innocent\r\n\r\nhello{fake_end}\
             MAIL FROM:<ceo@{HOSTED}>\r\n\
             RCPT TO:<victim@{HOSTED}>\r\n\
             DATA\r\n\
             Subject: smuggled\r\n\r\nsmuggled body\r\n\
             .\r\n"
        );
        c.send_bytes(payload.as_bytes());
        let text = expect_status(&mut c, 550, "5.5.2");
        assert!(text.contains("smuggling"), "{fake_end:?}: {text:?}");
        // The next reply answers our next real command: the smuggled MAIL/RCPT/DATA were
        // never executed (they would have produced 250/250/354 first) and no transaction is
        // open (a MAIL would then be a nested MAIL, 503).
        cmd_status(&mut c, "HELP", 214, "2.0.0");
        cmd_status(&mut c, "MAIL FROM:<probe@client.test>", 250, "2.1.0");
        cmd_status(&mut c, "RSET", 250, "2.0.0");
    }
    // A bare LF in the content without any dot is refused as well (the other 550 5.5.2 text).
    cmd_status(&mut c, "MAIL FROM:<sender@client.test>", 250, "2.1.0");
    cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 250, "2.1.5");
    c.cmd("DATA", 354);
    c.send_bytes(b"Subject: lf\r\n\r\nbare\nline feed\r\n.\r\n");
    expect_status(&mut c, 550, "5.5.2");
    cmd_status(&mut c, "HELP", 214, "2.0.0");
    quit(c);

    assert_unchanged(&server, &before);
    let show = server.queue_show_json(HOSTED);
    assert_eq!(
        show["messages"].as_array().map(Vec::len),
        Some(1),
        "only the baseline is held: {show}"
    );
    assert_still_serves(&server, &before, HOSTED);
}

#[test]
fn bare_lf_or_cr_in_command_line_is_500_552() {
    let server = start("");
    let before = hold_baseline(&server, 500);

    let mut c = session(&server);
    c.send_bytes(b"NOOP\n");
    expect_status(&mut c, 500, "5.5.2");
    cmd_status(&mut c, "HELP", 214, "2.0.0");
    // A MAIL ended by a bare LF is refused and not executed: the RCPT after it, in the same
    // write, is out of sequence.
    c.send_bytes(format!("MAIL FROM:<a@client.test>\nRCPT TO:<alice@{HOSTED}>\r\n").as_bytes());
    expect_status(&mut c, 500, "5.5.2");
    expect_status(&mut c, 503, "5.5.1");
    // A bare CR inside a line.
    c.send_bytes(b"NOOP\rHELP\r\n");
    expect_status(&mut c, 500, "5.5.2");
    cmd_status(&mut c, "HELP", 214, "2.0.0");
    // The session still works.
    cmd_status(&mut c, "MAIL FROM:<a@client.test>", 250, "2.1.0");
    cmd_status(&mut c, "RSET", 250, "2.0.0");
    quit(c);

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

#[test]
fn oversize_message_is_552_534_at_mail_and_at_end_of_data() {
    let server = start("[limits]\nmax_message_size = \"10KiB\"\n");
    let before = hold_baseline(&server, 2000);

    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    let ehlo = c.cmd("EHLO client.test", 250);
    assert!(ehlo.lines().any(|l| l == "SIZE 10240"), "{ehlo:?}");

    // Declared too big.
    cmd_status(
        &mut c,
        "MAIL FROM:<big@client.test> SIZE=20000",
        552,
        "5.3.4",
    );
    cmd_status(
        &mut c,
        "MAIL FROM:<big@client.test> SIZE=10241",
        552,
        "5.3.4",
    );
    // Exactly the limit is fine (and the refused MAILs left no transaction open).
    cmd_status(
        &mut c,
        "MAIL FROM:<big@client.test> SIZE=10240",
        250,
        "2.1.0",
    );
    cmd_status(&mut c, "RSET", 250, "2.0.0");

    // Undeclared and too big: refused after the end of data, and the whole body was read as
    // data (the next reply answers our next command).
    cmd_status(&mut c, "MAIL FROM:<big@client.test>", 250, "2.1.0");
    cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 250, "2.1.5");
    c.cmd("DATA", 354);
    let body = message("oversize", 20_000);
    c.send_bytes(body.as_bytes());
    c.send_bytes(b".\r\n");
    expect_status(&mut c, 552, "5.3.4");
    cmd_status(&mut c, "HELP", 214, "2.0.0");
    quit(c);

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

#[test]
fn fourth_recipient_is_452_453_and_the_message_with_three_is_held() {
    let server = start("[limits]\nmax_recipients = 3\n");
    let before = hold_baseline(&server, 500);

    let mut c = session(&server);
    cmd_status(&mut c, "MAIL FROM:<many@client.test>", 250, "2.1.0");
    for n in 1..=3 {
        cmd_status(&mut c, &format!("RCPT TO:<r{n}@{HOSTED}>"), 250, "2.1.5");
    }
    cmd_status(&mut c, &format!("RCPT TO:<r4@{HOSTED}>"), 452, "4.5.3");
    cmd_status(&mut c, &format!("RCPT TO:<r5@{OTHER}>"), 452, "4.5.3");
    c.cmd("DATA", 354);
    c.send_bytes(message("three", 300).as_bytes());
    c.send_bytes(b".\r\n");
    expect_status(&mut c, 250, "2.0.0");
    quit(c);

    // The baseline is intact and the new message is held with exactly three recipients.
    let now = server.queue_json();
    let (m0, b0) = queue_entry(&before, HOSTED).expect("baseline");
    let (m1, b1) = queue_entry(&now, HOSTED).expect("held");
    assert_eq!(m1, m0 + 1, "{now}");
    assert!(b1 > b0, "{now}");
    assert_eq!(queue_entry(&now, OTHER), None, "{now}");
    let show = server.queue_show_json(HOSTED);
    let held = senders_to_recipients(&show);
    assert_eq!(held.len(), 2, "{show}");
    assert_eq!(held["before@client.test"], [format!("alice@{HOSTED}")]);
    assert_eq!(
        held["many@client.test"],
        [1, 2, 3].map(|n| format!("r{n}@{HOSTED}")),
        "{show}"
    );
    assert_still_serves(&server, &now, HOSTED);
}

#[test]
fn overlong_command_line_is_500_552_and_the_session_goes_on() {
    let server = start("[limits]\nmax_line_length = 1000\n");
    let before = hold_baseline(&server, 500);

    let mut c = session(&server);
    // Exactly the limit, CRLF included, is a line.
    let at_limit = format!("NOOP {}", "x".repeat(1000 - 2 - 5));
    assert_eq!(at_limit.len() + 2, 1000);
    cmd_status(&mut c, &at_limit, 250, "2.0.0");
    // One octet more is refused.
    let over = format!("NOOP {}", "x".repeat(1000 - 2 - 5 + 1));
    cmd_status(&mut c, &over, 500, "5.5.2");
    cmd_status(&mut c, "HELP", 214, "2.0.0");
    // A much longer line (a MAIL, so that executing any part of it would show) gets exactly
    // one reply and is discarded through its end.
    let long = format!("MAIL FROM:<{}@client.test>", "a".repeat(5000));
    cmd_status(&mut c, &long, 500, "5.5.2");
    cmd_status(&mut c, "HELP", 214, "2.0.0");
    // No MAIL was executed: RCPT is out of sequence, and a real MAIL is not nested.
    cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 503, "5.5.1");
    cmd_status(&mut c, "MAIL FROM:<a@client.test>", 250, "2.1.0");
    cmd_status(&mut c, "RSET", 250, "2.0.0");
    quit(c);

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

#[test]
fn idle_client_gets_421_442_and_is_closed() {
    let server = start("[limits]\nidle_timeout = \"1s\"\n");
    let before = hold_baseline(&server, 500);

    // Idle between commands. IO_TIMEOUT (5 s) bounds the wait.
    let mut c = session(&server);
    let t = Instant::now();
    expect_status(&mut c, 421, "4.4.2");
    let waited = t.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&waited),
        "421 after {waited:?}"
    );
    c.expect_closed();

    // Idle in the middle of DATA: the half-sent message is not held.
    let mut c = session(&server);
    cmd_status(&mut c, "MAIL FROM:<slow@client.test>", 250, "2.1.0");
    cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 250, "2.1.5");
    c.cmd("DATA", 354);
    c.send_bytes(b"Subject: never finished\r\n\r\nhalf a line");
    let t = Instant::now();
    expect_status(&mut c, 421, "4.4.2");
    let waited = t.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&waited),
        "421 after {waited:?}"
    );
    c.expect_closed();

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

/// Connects and reads the greeting; retries (bounded) while the server answers `421 4.7.0`,
/// because a closed session gives its admission slot back just after the socket is closed.
#[track_caller]
fn connect_admitted(addr: SocketAddr) -> SmtpClient {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut c = SmtpClient::connect(addr);
        match c.read_reply() {
            Ok((220, _)) => return c,
            Ok((421, text)) if text.starts_with("4.7.0 ") && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            other => panic!("expected 220, got {other:?}"),
        }
    }
}

#[test]
fn third_connection_from_one_address_is_421_470() {
    // Loopback is a trusted network by default (no per-address cap): trust nothing here.
    let server = start("[limits]\nmax_connections_per_ip = 2\ntrusted_networks = []\n");
    let before = hold_baseline(&server, 500);
    let mx = server.addr("mx");

    let mut c1 = connect_admitted(mx);
    let c2 = connect_admitted(mx);
    // Both slots are held by open sessions: the third connection is refused at once.
    for _ in 0..2 {
        let mut c3 = SmtpClient::connect(mx);
        let text = expect_status(&mut c3, 421, "4.7.0");
        assert!(text.contains("Too many connections"), "{text:?}");
        c3.expect_closed();
    }
    // The admitted sessions are unaffected.
    c1.cmd("EHLO client.test", 250);
    cmd_status(&mut c1, "NOOP", 250, "2.0.0");
    // Closing one frees a slot.
    quit(c2);
    let mut c4 = connect_admitted(mx);
    c4.cmd("EHLO client.test", 250);
    // And the cap holds again with c1 and c4 open.
    let mut c5 = SmtpClient::connect(mx);
    expect_status(&mut c5, 421, "4.7.0");
    c5.expect_closed();
    quit(c4);
    quit(c1);

    assert_unchanged(&server, &before);
    // Two fresh connections are admitted again once c1 and c4 are gone, and still deliver.
    let c6 = connect_admitted(mx);
    let c7 = connect_admitted(mx);
    assert_still_serves_on(c6, &server, &before, HOSTED);
    quit(c7);
}

#[test]
fn over_quota_is_452_422_and_size_over_quota_is_552_522() {
    let server = start("[quota]\n\"acme.example\" = \"1KiB\"\n");
    // Held bytes were 0 when this was accepted; now they are over the 1 KiB quota.
    let before = hold_baseline(&server, 1500);
    let (_, held) = queue_entry(&before, HOSTED).expect("baseline");
    assert!(held > 1024, "{before}");

    let mut c = session(&server);
    cmd_status(&mut c, "MAIL FROM:<more@client.test>", 250, "2.1.0");
    let text = cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 452, "4.2.2");
    assert!(text.contains("quota"), "{text:?}");
    // Other domains of the same account are not affected.
    cmd_status(&mut c, &format!("RCPT TO:<alice@{OTHER}>"), 250, "2.1.5");
    cmd_status(&mut c, "RSET", 250, "2.0.0");
    // A declared size larger than the whole quota can never fit: permanent.
    cmd_status(
        &mut c,
        "MAIL FROM:<more@client.test> SIZE=2000",
        250,
        "2.1.0",
    );
    cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 552, "5.2.2");
    cmd_status(&mut c, &format!("RCPT TO:<alice@{OTHER}>"), 250, "2.1.5");
    cmd_status(&mut c, "RSET", 250, "2.0.0");
    quit(c);

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, OTHER);
}

#[test]
fn size_over_quota_is_552_522_even_with_nothing_held() {
    let server = start("[quota]\n\"acme.example\" = \"1KiB\"\n");
    let before = hold_baseline(&server, 300);
    let (_, held) = queue_entry(&before, HOSTED).expect("baseline");
    assert!(held < 1024, "{before}");

    let mut c = session(&server);
    cmd_status(
        &mut c,
        "MAIL FROM:<more@client.test> SIZE=2000",
        250,
        "2.1.0",
    );
    cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 552, "5.2.2");
    cmd_status(&mut c, "RSET", 250, "2.0.0");
    quit(c);

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

const STRICT: &str = "[limits]\nmax_errors = 3\nmax_commands_without_progress = 5\n";

#[test]
fn too_many_errors_is_421_470_and_close() {
    let server = start(STRICT);
    let before = hold_baseline(&server, 500);

    let mut c = session(&server);
    // max_errors = 3: the fourth error reply is followed by 421 and the close.
    for _ in 0..3 {
        cmd_status(&mut c, "BOGUS", 500, "5.5.2");
    }
    cmd_status(&mut c, "BOGUS", 500, "5.5.2");
    let text = expect_status(&mut c, 421, "4.7.0");
    assert!(text.contains("Too many errors"), "{text:?}");
    c.expect_closed();

    // Errors count whatever produced them, including refused recipients and framing errors.
    let mut c = session(&server);
    cmd_status(&mut c, "MAIL FROM:<a@client.test>", 250, "2.1.0");
    cmd_status(&mut c, "RCPT TO:<x@elsewhere.test>", 550, "5.7.1");
    c.send_bytes(b"NOOP\n");
    expect_status(&mut c, 500, "5.5.2");
    cmd_status(&mut c, "RCPT TO:<y@elsewhere.test>", 550, "5.7.1");
    cmd_status(&mut c, "MAIL FROM:<a@client.test>", 503, "5.5.1");
    expect_status(&mut c, 421, "4.7.0");
    c.expect_closed();

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

#[test]
fn too_many_commands_without_progress_is_421_470_and_close() {
    let server = start(STRICT);
    let before = hold_baseline(&server, 500);

    // max_commands_without_progress = 5: EHLO is the first; the sixth is answered, then 421.
    let mut c = session(&server);
    cmd_status(&mut c, "NOOP", 250, "2.0.0");
    cmd_status(&mut c, "RSET", 250, "2.0.0");
    cmd_status(&mut c, "VRFY postmaster", 252, "2.5.0");
    cmd_status(&mut c, "HELP", 214, "2.0.0");
    // MAIL is progress and resets the count.
    cmd_status(&mut c, "MAIL FROM:<a@client.test>", 250, "2.1.0");
    for _ in 0..5 {
        cmd_status(&mut c, "NOOP", 250, "2.0.0");
    }
    cmd_status(&mut c, "NOOP", 250, "2.0.0");
    let text = expect_status(&mut c, 421, "4.7.0");
    assert!(text.contains("without progress"), "{text:?}");
    c.expect_closed();

    assert_unchanged(&server, &before);
    assert_still_serves(&server, &before, HOSTED);
}

/// A message with `hops` `Received:` fields in its header section.
fn with_hops(hops: usize) -> String {
    let mut m = String::new();
    for n in 0..hops {
        m.push_str(&format!(
            "Received: from hop{n}.test by hop{}.test; Mon, 1 Jan 2024 00:00:0{n} +0000\r\n",
            n + 1
        ));
    }
    m.push_str("Subject: loop\r\n\r\nbody\r\n");
    m
}

#[test]
fn max_hops_received_fields_is_554_546() {
    let server = start("[limits]\nmax_hops = 5\n");
    let before = hold_baseline(&server, 500);

    let mut c = session(&server);
    for hops in [5, 8] {
        cmd_status(&mut c, "MAIL FROM:<loop@client.test>", 250, "2.1.0");
        cmd_status(&mut c, &format!("RCPT TO:<alice@{HOSTED}>"), 250, "2.1.5");
        c.cmd("DATA", 354);
        c.send_bytes(with_hops(hops).as_bytes());
        c.send_bytes(b".\r\n");
        expect_status(&mut c, 554, "5.4.6");
        cmd_status(&mut c, "HELP", 214, "2.0.0");
    }
    quit(c);
    assert_unchanged(&server, &before);

    // One below the limit is delivered.
    let mut c = session(&server);
    let text = c.send_mail(
        "hops@client.test",
        &[&format!("alice@{HOSTED}")],
        &with_hops(4),
    );
    assert!(text.starts_with("2.0.0 "), "{text:?}");
    quit(c);
    let now = server.queue_json();
    assert_eq!(queue_entry(&now, HOSTED).map(|e| e.0), Some(2), "{now}");
    assert_still_serves(&server, &now, HOSTED);
}
