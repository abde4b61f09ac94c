//! Slow clients (issue 9 item 7c): a command line must be complete within `idle_timeout`
//! however its bytes trickle in, and a DATA or BDAT transfer must keep `min_data_rate`. Each
//! case drips bytes at a client that would have held the session for ever when every byte
//! restarted the idle timer, on every inbound listener (MX, ODMR, submission); short timeouts
//! keep the test quick.

mod common;

use std::io::ErrorKind;
use std::thread;
use std::time::{Duration, Instant};

use common::{SmtpClient, TestServer};

/// 2 s to complete a command line; a transfer must average 200 bytes per second.
const CONFIG: &str = "[limits]\nidle_timeout = \"2s\"\nmin_data_rate = 200\n\
    [odmr]\nallow_plaintext_auth = true\n";

/// How long a drip may go on before the test calls the server stuck (a deadlock guard, far
/// above the 2 s the server should take).
const GUARD: Duration = Duration::from_secs(20);

/// Sends `bytes` one at a time, `gap` apart, until the server answers; returns the reply,
/// how many bytes went out before it, and asserts the server then closes the connection.
#[track_caller]
fn drip(c: &mut SmtpClient, bytes: &[u8], gap: Duration) -> ((u16, String), usize) {
    let started = Instant::now();
    for (i, b) in bytes.iter().enumerate() {
        c.send_bytes(std::slice::from_ref(b));
        thread::sleep(gap);
        if let Some(reply) = poll_reply(c) {
            c.expect_closed();
            return (reply, i + 1);
        }
        assert!(started.elapsed() < GUARD, "the server let the drip go on");
    }
    panic!("every byte was sent and the server never gave up");
}

/// A reply if one has arrived (the socket's read timeout set short for the look).
fn poll_reply(c: &mut SmtpClient) -> Option<(u16, String)> {
    match c.read_reply_within(Duration::from_millis(10)) {
        Ok(r) => Some(r),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("reading a reply: {e}"),
    }
}

#[track_caller]
fn assert_timeout(reply: &(u16, String), what: &str) {
    assert_eq!(reply.0, 421, "{reply:?}");
    assert!(reply.1.starts_with("4.4.2 "), "{reply:?}");
    assert!(reply.1.contains(what), "{reply:?}");
}

/// One byte every 300 ms of an EHLO line: refused once the 2 s are up, long before the line
/// could be complete, on the MX, ODMR and submission listeners.
#[test]
fn a_command_line_that_trickles_in_times_out_on_every_listener() {
    let server = TestServer::start(CONFIG, &[("acme", &["acme.example"])]);
    let line = b"EHLO a-very-slow-client.example.net\r\n";
    for service in ["mx", "odmr", "submission"] {
        let mut c = SmtpClient::connect(server.addr(service));
        c.expect(220);
        let (reply, sent) = drip(&mut c, line, Duration::from_millis(300));
        assert_timeout(&reply, "timeout");
        assert!(sent < line.len(), "{service}: the line was completed");
    }
    assert!(server.logs().contains("IdleTimeout"), "{}", server.logs());
}

/// A body at about 20 bytes per second (below the configured 200): the transfer is cut off
/// with 421 and nothing is stored.
#[test]
fn a_data_transfer_below_the_minimum_rate_is_cut_off() {
    let server = TestServer::start(CONFIG, &[("acme", &["acme.example"])]);
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO slow.example", 250);
    c.cmd("MAIL FROM:<s@slow.example>", 250);
    c.cmd("RCPT TO:<u@acme.example>", 250);
    c.cmd("DATA", 354);
    let body = "Subject: slow\r\n\r\n".to_string() + &"x".repeat(400) + "\r\n.\r\n";
    let (reply, _) = drip(&mut c, body.as_bytes(), Duration::from_millis(50));
    assert_timeout(&reply, "too slow");
    assert!(
        common::queue_entry(&server.queue_json(), "acme.example").is_none(),
        "a cut-off message was stored"
    );
}

/// The same for a BDAT chunk.
#[test]
fn a_bdat_chunk_below_the_minimum_rate_is_cut_off() {
    let server = TestServer::start(CONFIG, &[("acme", &["acme.example"])]);
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO slow.example", 250);
    c.cmd("MAIL FROM:<s@slow.example>", 250);
    c.cmd("RCPT TO:<u@acme.example>", 250);
    let chunk = "Subject: slow\r\n\r\n".to_string() + &"y".repeat(400) + "\r\n";
    c.send(&format!("BDAT {} LAST", chunk.len()));
    let (reply, _) = drip(&mut c, chunk.as_bytes(), Duration::from_millis(50));
    assert_timeout(&reply, "too slow");
    assert!(common::queue_entry(&server.queue_json(), "acme.example").is_none());
}

/// Commands that each arrive whole, and a body fast enough, are fine however long the session
/// lasts in total: the deadline is per request.
#[test]
fn complete_commands_and_a_fast_enough_body_are_not_cut_off() {
    let server = TestServer::start(CONFIG, &[("acme", &["acme.example"])]);
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO patient.example", 250);
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(1200));
        c.cmd("NOOP", 250);
    }
    c.cmd("MAIL FROM:<s@patient.example>", 250);
    c.cmd("RCPT TO:<u@acme.example>", 250);
    c.cmd("DATA", 354);
    // 3 s of body at about 2,000 bytes per second: well above the minimum rate, and longer
    // than the 2 s a command line gets.
    let chunk = "z".repeat(198) + "\r\n";
    for _ in 0..30 {
        c.send_bytes(chunk.as_bytes());
        thread::sleep(Duration::from_millis(100));
    }
    c.send_bytes(b".\r\n");
    c.expect(250);
    c.cmd("QUIT", 221);
}
