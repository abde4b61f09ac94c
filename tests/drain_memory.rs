//! The reversal streams bodies from the journal: draining one large held message raises the
//! server's RSS by a few MB at most (issue "ATRN drain": bodies go journal -> socket in
//! 256 KiB chunks, a whole message is never in memory).
//!
//! One 50 MB message is held through the MX (which buffers it while receiving), the server is
//! restarted on the same journal (so no freed receive buffer can hide a whole-message read),
//! and the baseline is taken right before the drain. A thread samples the server's VmRSS every 10 ms during the
//! drain; the largest growth over the baseline must stay under [`MAX_GROWTH`].

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{password_for, queue_entry, vm_rss, RssSampler, TestServer};
use turnpike::customer::session::{self, Mechanism, SessionConfig, Sink, Tls};
use turnpike::proto::inbound::Incoming;
use turnpike::proto::reply::Reply;
use turnpike::runtime::io::IoKind;

/// Least payload bytes of the held message (CRLF lines, before the provider's Received: field).
const PAYLOAD: usize = 50_000_000;
/// Largest allowed RSS growth of the server while it drains that message.
const MAX_GROWTH: u64 = 8 * 1024 * 1024;
/// Bound for every socket operation of the test's own SMTP client (a debug server scans and
/// fdatasyncs 50 MB before its 250).
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// About 50 MB (at least [`PAYLOAD`] bytes) of numbered 79-byte lines, so a truncated,
/// reordered or duplicated chunk changes the tail the sink checks.
fn payload() -> Vec<u8> {
    let mut body = Vec::with_capacity(PAYLOAD + 128);
    body.extend_from_slice(b"Subject: drain memory\r\n\r\n");
    let mut n = 0u64;
    while body.len() < PAYLOAD {
        body.extend_from_slice(
            format!(
                "{n:010} abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-=+*\r\n"
            )
            .as_bytes(),
        );
        n += 1;
    }
    body
}

/// Reads one (possibly multi-line) reply and asserts its code.
fn expect(r: &mut BufReader<TcpStream>, code: &str) {
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("read reply");
        assert!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) != Some(&b'-') {
            return;
        }
    }
}

/// Sends one message over a plain SMTP session to the MX. No line starts with '.', so the
/// payload needs no dot-stuffing.
fn hold(server: &TestServer, body: &[u8]) {
    let stream = TcpStream::connect(server.addr("mx")).expect("connect mx");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    expect(&mut r, "220");
    for (cmd, code) in [
        ("EHLO client.test\r\n", "250"),
        ("MAIL FROM:<s@client.test>\r\n", "250"),
        ("RCPT TO:<user@example.com>\r\n", "250"),
        ("DATA\r\n", "354"),
    ] {
        w.write_all(cmd.as_bytes()).unwrap();
        expect(&mut r, code);
    }
    assert!(!body.split(|&b| b == b'\n').any(|l| l.starts_with(b".")));
    w.write_all(body).expect("send body");
    w.write_all(b".\r\n").unwrap();
    expect(&mut r, "250");
    w.write_all(b"QUIT\r\n").unwrap();
    let _ = r.read_to_end(&mut Vec::new());
}

/// Takes every message, keeps only counts and checks the body's tail against the payload.
struct CheckingSink<'a> {
    payload: &'a [u8],
    messages: u64,
    bytes: u64,
    tail_ok: bool,
}

impl Sink for CheckingSink<'_> {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        self.messages += 1;
        self.bytes += message.body.len() as u64;
        // The provider prepends its Received: field; everything after it is our payload.
        self.tail_ok =
            message.body.starts_with(b"Received: ") && message.body.ends_with(self.payload);
        Ok(())
    }
}

#[test]
fn draining_a_50mb_message_keeps_server_rss_flat() {
    let started = Instant::now();
    let mut server = TestServer::start(
        "[limits]\nmax_message_size = \"200MiB\"\nidle_timeout = \"60s\"\n\
         [odmr]\nallow_plaintext_auth = true\n",
        &[("acme", &["example.com"])],
    );
    let body = payload();
    hold(&server, &body);
    let (held, held_bytes) =
        queue_entry(&server.queue_json(), "example.com").expect("example.com is held");
    assert_eq!(held, 1, "one message held");
    assert!(held_bytes >= PAYLOAD as u64, "held {held_bytes} bytes");

    // Restart on the same journal: the MX buffered the whole message while receiving it, and
    // the allocator may keep those freed pages resident, where a regressed reversal that reads
    // the whole body could reuse them without any RSS growth. A fresh process has no such pool,
    // so growth here is what the drain itself needs. Then settle and take the baseline.
    server.restart();
    let pid = server.pid().expect("server pid after restart");
    let (held_again, _) =
        queue_entry(&server.queue_json(), "example.com").expect("still held after restart");
    assert_eq!(held_again, 1, "the held message survives the restart");
    thread::sleep(Duration::from_millis(200));
    let baseline = vm_rss(pid);
    let sampler = RssSampler::start(pid);

    let cfg = SessionConfig {
        provider: server.addr("odmr"),
        hostname: "customer.test".into(),
        tls: Tls::None,
        account: "acme".into(),
        password: password_for("acme"),
        mechanism: Mechanism::Plain,
        domains: Vec::new(),
        atrn_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
    };
    let mut sink = CheckingSink {
        payload: &body,
        messages: 0,
        bytes: 0,
        tail_ok: false,
    };
    let drain_started = Instant::now();
    let result = turnpike::runtime::io::block_on(
        IoKind::Epoll,
        session::run(IoKind::Epoll, &cfg, &mut sink),
    )
    .expect("runtime");
    let drain_time = drain_started.elapsed();
    let (max_rss, samples) = sampler.stop();
    let received = result.unwrap_or_else(|e| panic!("drain failed: {e}\n{}", server.logs()));

    assert_eq!(sink.messages, 1, "one message drained");
    assert_eq!(received.messages, 1);
    assert_eq!(sink.bytes, held_bytes, "drained length == held length");
    assert!(
        sink.tail_ok,
        "the drained body is the Received: field + the payload, intact"
    );
    let left = queue_entry(&server.queue_json(), "example.com").map_or(0, |(m, _)| m);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = left;
    while left != 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        left = queue_entry(&server.queue_json(), "example.com").map_or(0, |(m, _)| m);
    }
    assert_eq!(left, 0, "nothing held after the drain");

    let growth = max_rss.saturating_sub(baseline);
    eprintln!(
        "drain of {held_bytes} bytes in {drain_time:?}: server RSS baseline {} KiB, max {} KiB, \
         growth {} KiB over {samples} samples (limit {} KiB); test took {:?}",
        baseline / 1024,
        max_rss / 1024,
        growth / 1024,
        MAX_GROWTH / 1024,
        started.elapsed()
    );
    assert!(
        samples >= 3,
        "too few RSS samples ({samples}) to judge the drain"
    );
    assert!(
        growth < MAX_GROWTH,
        "server RSS grew by {} KiB while draining one {held_bytes}-byte message (limit {} KiB)",
        growth / 1024,
        MAX_GROWTH / 1024
    );
}
