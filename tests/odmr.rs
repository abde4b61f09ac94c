//! The ODMR listener end to end over real sockets (RFC 2645, PROTOCOL.md §1): AUTH and ATRN
//! replies with their enhanced codes, which mail a reversal carries, per-recipient outcomes
//! and delivery reports, disconnects, SIZE, BDAT and DATA framing, and TLS across the
//! turnaround.
//!
//! Most tests script the customer by hand: [`SmtpClient`] up to the `250` to ATRN, then
//! [`Reversed`] plays the SMTP server on the same socket, answering the provider's commands
//! with chosen codes and reading the exact bytes it sends. Every read is bounded by the
//! harness's socket timeouts; every wait for the server's asynchronous bookkeeping (DONE
//! records, delivery reports) is a bounded poll.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{io_driver, password_for, queue_entry, SmtpClient, TestServer};
use turnpike::customer::session::{self, Mechanism, SessionConfig, SessionError, Sink, Tls};
use turnpike::proto::inbound::Incoming;
use turnpike::proto::reply::Reply;
use turnpike::runtime::io::{block_on, IoKind};
use turnpike::types::DomainName;

/// PLAIN without TLS, so the scripted customers need no TLS stack.
const PLAINTEXT: &str = "[odmr]\nallow_plaintext_auth = true\n";

/// How long a poll for the server's asynchronous bookkeeping may take.
const SETTLE: Duration = Duration::from_secs(5);

const ACME: (&str, &[&str]) = ("acme", &["acme.example", "acme.test", "acme.net"]);
const BETA: (&str, &[&str]) = ("beta", &["beta.example"]);
const GAMMA: (&str, &[&str]) = ("gamma", &["gamma.example"]);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Hands `body` (CRLF lines, unstuffed) to the MX for `to`.
fn mx_send(server: &TestServer, from: &str, to: &[&str], body: &str) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.send_mail(from, to, body);
    c.cmd("QUIT", 221);
}

fn plain_token(account: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{account}\0{password}"))
}

/// Connects to the ODMR listener, EHLO, AUTH PLAIN as `account`: authenticated.
fn login(server: &TestServer, account: &str) -> SmtpClient {
    let mut c = SmtpClient::connect(server.addr("odmr"));
    c.expect(220);
    let ehlo = c.cmd("EHLO customer.test", 250);
    assert!(
        ehlo.lines().any(|l| l == "ATRN"),
        "EHLO lacks ATRN: {ehlo:?}"
    );
    assert!(
        ehlo.lines().any(|l| l.starts_with("AUTH ")),
        "EHLO lacks AUTH: {ehlo:?}"
    );
    let text = c.cmd(
        &format!(
            "AUTH PLAIN {}",
            plain_token(account, &password_for(account))
        ),
        235,
    );
    assert!(text.starts_with("2.7.0"), "{text}");
    c
}

/// Sends `line` and asserts the code and the enhanced status code of the reply.
#[track_caller]
fn expect_status(c: &mut SmtpClient, line: &str, code: u16, status: &str) -> String {
    let text = c.cmd(line, code);
    assert!(
        text.starts_with(&format!("{status} ")),
        "{line:?}: expected {code} {status}, got {code} {text:?}"
    );
    text
}

/// Sends `ATRN[ arg]`, asserts `250 2.0.0` with nothing behind it, and takes over the socket.
#[track_caller]
fn atrn(mut c: SmtpClient, arg: &str) -> Reversed {
    let line = if arg.is_empty() {
        "ATRN".to_string()
    } else {
        format!("ATRN {arg}")
    };
    expect_status(&mut c, &line, 250, "2.0.0");
    let (reader, writer) = c.into_parts();
    assert!(
        reader.buffer().is_empty(),
        "bytes arrived together with the 250 to ATRN: {:?}",
        String::from_utf8_lossy(reader.buffer())
    );
    Reversed {
        reader,
        writer,
        wire: Vec::new(),
        commands: Vec::new(),
    }
}

/// The (messages, bytes) of every domain in `queue --json`.
fn queue_map(server: &TestServer) -> BTreeMap<String, (u64, u64)> {
    let q = server.queue_json();
    q["domains"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    (
                        d["domain"].as_str().expect("domain").to_string(),
                        (
                            d["messages"].as_u64().expect("messages"),
                            d["bytes"].as_u64().expect("bytes"),
                        ),
                    )
                })
                .filter(|(_, (m, _))| *m > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `f` until it returns true, for at most [`SETTLE`].
#[track_caller]
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SETTLE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// `(sender, sorted recipients)` of every message `queue show DOMAIN` lists, sorted.
fn held(server: &TestServer, domain: &str) -> Vec<(String, Vec<String>)> {
    let show = server.queue_show_json(domain);
    let mut out: Vec<(String, Vec<String>)> = show["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let mut r: Vec<String> = m["recipients"]
                        .as_array()
                        .expect("recipients")
                        .iter()
                        .map(|r| r.as_str().expect("recipient").to_string())
                        .collect();
                    r.sort();
                    (m["sender"].as_str().expect("sender").to_string(), r)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Splits a delivered body into the provider's `Received:` field (through its final CRLF)
/// and the rest, asserting the field is there and is the provider's.
#[track_caller]
fn split_received(body: &[u8]) -> (&[u8], &[u8]) {
    assert!(
        body.starts_with(b"Received: from client.test ("),
        "body does not start with the provider's Received: field: {:?}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    );
    let mut end = 0;
    loop {
        let nl = body[end..]
            .iter()
            .position(|b| *b == b'\n')
            .expect("Received: field ends")
            + end
            + 1;
        assert_eq!(body[nl - 2], b'\r', "bare LF in the Received: field");
        end = nl;
        if !matches!(body.get(end), Some(b' ' | b'\t')) {
            break;
        }
    }
    let field = &body[..end];
    let text = String::from_utf8_lossy(field);
    assert!(text.contains("by mx.test with ESMTP"), "{text}");
    (field, &body[end..])
}

/// Asserts `body` is exactly one provider `Received:` field followed by `original`.
#[track_caller]
fn assert_relayed(body: &[u8], original: &str) {
    let (_, rest) = split_received(body);
    assert_eq!(
        String::from_utf8_lossy(rest),
        original,
        "body after the Received: field differs from what was sent to the MX"
    );
    assert_eq!(rest, original.as_bytes());
}

/// Undoes RFC 5321 §4.5.2 dot-stuffing of DATA content (terminator already removed).
fn unstuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    for line in raw.split_inclusive(|b| *b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

/// One message as the scripted customer saw it.
#[derive(Debug, Default)]
struct Got {
    mail: String,
    /// Every `RCPT TO:` address, in order.
    rcpts: Vec<String>,
    /// The addresses we answered 2xx.
    accepted: Vec<String>,
    /// `true` for `BDAT <n> LAST`, `false` for DATA.
    bdat: bool,
    /// The content as sent on the wire (stuffed for DATA, without the terminator).
    wire: Vec<u8>,
    /// The content unstuffed: what the customer would store.
    body: Vec<u8>,
}

/// The customer's side after the turnaround: an SMTP server scripted by the test.
struct Reversed {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// Every byte the provider sent after the 250 to ATRN.
    wire: Vec<u8>,
    /// Every command line the provider sent (bodies excluded).
    commands: Vec<String>,
}

impl Reversed {
    /// One line from the provider, CRLF stripped; panics on EOF or timeout.
    #[track_caller]
    fn line(&mut self) -> String {
        let mut raw = Vec::new();
        match self.reader.read_until(b'\n', &mut raw) {
            Ok(0) => panic!(
                "provider closed the connection; commands so far: {:?}",
                self.commands
            ),
            Ok(_) => {}
            Err(e) => panic!(
                "reading from the provider: {e}; commands so far: {:?}",
                self.commands
            ),
        }
        self.wire.extend_from_slice(&raw);
        let line = String::from_utf8(raw).expect("command is UTF-8");
        let line = line
            .strip_suffix("\r\n")
            .unwrap_or_else(|| panic!("command {line:?} does not end in CRLF"))
            .to_string();
        self.commands.push(line.clone());
        line
    }

    fn say(&mut self, reply: &str) {
        self.writer
            .write_all(format!("{reply}\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("writing {reply:?}: {e}"));
    }

    #[track_caller]
    fn exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        self.reader
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("reading {n} body bytes: {e}"));
        self.wire.extend_from_slice(&buf);
        buf
    }

    /// DATA content through the `.` line; returns it without the terminator, still stuffed.
    #[track_caller]
    fn data(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut raw)
                .unwrap_or_else(|e| panic!("reading DATA content: {e}"));
            assert!(n > 0, "provider closed the connection inside DATA");
            self.wire.extend_from_slice(&raw);
            if raw == b".\r\n" {
                return out;
            }
            assert!(raw.ends_with(b"\r\n"), "DATA line without CRLF: {raw:?}");
            out.extend_from_slice(&raw);
        }
    }

    /// Greets, reads `EHLO mx.test` and answers it with `caps`.
    #[track_caller]
    fn greet(&mut self, caps: &[&str]) {
        self.say("220 customer.test ESMTP");
        let ehlo = self.line();
        assert_eq!(ehlo, "EHLO mx.test", "the provider's first command");
        if caps.is_empty() {
            self.say("250 customer.test");
        } else {
            self.say("250-customer.test");
            for (i, cap) in caps.iter().enumerate() {
                let sep = if i + 1 == caps.len() { ' ' } else { '-' };
                self.say(&format!("250{sep}{cap}"));
            }
        }
    }

    /// Plays the server through QUIT: greets, offers `caps`, answers each RCPT with
    /// `rcpt(address)` (a full reply line), and accepts every message. Returns what came.
    #[track_caller]
    fn serve(&mut self, caps: &[&str], rcpt: impl Fn(&str) -> String) -> Vec<Got> {
        self.greet(caps);
        let mut got: Vec<Got> = Vec::new();
        loop {
            let line = self.line();
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("MAIL FROM:<") {
                got.push(Got {
                    mail: line.clone(),
                    ..Got::default()
                });
                self.say("250 2.1.0 Sender ok");
            } else if upper.starts_with("RCPT TO:<") {
                let addr = line["RCPT TO:<".len()..]
                    .split('>')
                    .next()
                    .expect("address")
                    .to_string();
                let reply = rcpt(&addr);
                let m = got.last_mut().expect("RCPT before MAIL");
                m.rcpts.push(addr.clone());
                if reply.starts_with('2') {
                    m.accepted.push(addr);
                }
                self.say(&reply);
            } else if upper == "DATA" {
                self.say("354 Go ahead");
                let wire = self.data();
                let m = got.last_mut().expect("DATA before MAIL");
                m.body = unstuff(&wire);
                m.wire = wire;
                self.say("250 2.0.0 Queued");
            } else if let Some(rest) = upper.strip_prefix("BDAT ") {
                let mut parts = rest.split(' ');
                let n: usize = parts.next().and_then(|n| n.parse().ok()).expect("size");
                assert_eq!(
                    parts.next(),
                    Some("LAST"),
                    "{line}: expected one LAST chunk"
                );
                let bytes = self.exact(n);
                let m = got.last_mut().expect("BDAT before MAIL");
                m.bdat = true;
                m.body = bytes.clone();
                m.wire = bytes;
                self.say("250 2.0.0 Queued");
            } else if upper == "RSET" {
                self.say("250 2.0.0 Reset");
            } else if upper == "QUIT" {
                self.say("221 2.0.0 Bye");
                return got;
            } else {
                panic!("unexpected command from the provider: {line:?}");
            }
        }
    }

    /// Asserts the provider closes the connection (bounded by the socket timeout).
    #[track_caller]
    fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "provider sent {rest:?} after QUIT"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected the provider to close: {e}"),
        }
    }
}

fn accept_all(_: &str) -> String {
    "250 2.1.5 Recipient ok".into()
}

const CAPS_ALL: &[&str] = &["PIPELINING", "8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES"];
const CAPS_DATA: &[&str] = &["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"];

// ---------------------------------------------------------------------------------------------
// 1. Replies before the turnaround
// ---------------------------------------------------------------------------------------------

/// RFC 2645 §5.2.1: ATRN needs AUTH first (530 5.7.0), and so does mail (530 5.7.0); our 501
/// 5.5.4 for bad syntax; after the refusals ATRN still works.
#[test]
fn atrn_before_auth_syntax_errors_and_mail_refused() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    mx_send(
        &server,
        "s@client.test",
        &["a@acme.example"],
        "Subject: x\r\n\r\nx\r\n",
    );
    let before = queue_map(&server);

    let mut c = SmtpClient::connect(server.addr("odmr"));
    c.expect(220);
    expect_status(&mut c, "ATRN", 530, "5.7.0");
    c.cmd("EHLO customer.test", 250);
    expect_status(&mut c, "ATRN", 530, "5.7.0");
    expect_status(&mut c, "MAIL FROM:<s@acme.example>", 530, "5.7.0");
    expect_status(&mut c, "RCPT TO:<a@acme.example>", 530, "5.7.0");
    c.cmd(
        &format!("AUTH PLAIN {}", plain_token("acme", &password_for("acme"))),
        235,
    );
    for bad in [
        "ATRN acme.example, acme.test",
        "ATRN localhost",
        "ATRN acme.example,,acme.test",
        "ATRN acme.example,",
    ] {
        expect_status(&mut c, bad, 501, "5.5.4");
    }
    assert_eq!(queue_map(&server), before, "a refused ATRN moved mail");
    // No transaction was opened, so ATRN is not "inside a transaction" and is granted.
    let mut rev = atrn(c, "acme.example");
    let got = rev.serve(CAPS_ALL, accept_all);
    assert_eq!(got.len(), 1);
    rev.expect_closed();
}

/// A foreign domain anywhere in the list refuses the whole request with 450 4.7.1 and moves
/// nothing, not even the owned domain's mail; an owned domain with nothing held is 453 4.3.0.
#[test]
fn foreign_domain_refuses_all_and_empty_domain_is_453() {
    let server = TestServer::start(PLAINTEXT, &[ACME, BETA, GAMMA]);
    mx_send(
        &server,
        "s@client.test",
        &["a@acme.example"],
        "Subject: a\r\n\r\na\r\n",
    );
    mx_send(
        &server,
        "s@client.test",
        &["b@beta.example"],
        "Subject: b\r\n\r\nb\r\n",
    );
    let before = queue_map(&server);
    assert_eq!(before.len(), 2, "{before:?}");

    let mut c = login(&server, "acme");
    for req in [
        "ATRN acme.example,beta.example",
        "ATRN beta.example,acme.example",
        "ATRN beta.example",
        "ATRN acme.example,unhosted.example",
    ] {
        let text = expect_status(&mut c, req, 450, "4.7.1");
        assert!(!text.contains("acme.example"), "{req}: {text}");
    }
    expect_status(&mut c, "ATRN acme.test", 453, "4.3.0");
    expect_status(&mut c, "ATRN acme.test,acme.net", 453, "4.3.0");
    c.cmd("QUIT", 221);
    assert_eq!(queue_map(&server), before, "a refused ATRN moved mail");

    // An account with no mail at all.
    let mut c = login(&server, "gamma");
    expect_status(&mut c, "ATRN", 453, "4.3.0");
    c.cmd("QUIT", 221);
    assert_eq!(queue_map(&server), before);
}

/// Turnaround injection (PROTOCOL.md §3.4): bytes behind ATRN in the same write are refused
/// with 554 5.5.0, the connection closes, and nothing is delivered.
#[test]
fn input_pipelined_after_atrn_is_554_and_closes() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    mx_send(
        &server,
        "s@client.test",
        &["a@acme.example"],
        "Subject: a\r\n\r\na\r\n",
    );
    let before = queue_map(&server);
    for tail in ["NOOP\r\n", "220 customer.test ESMTP\r\n"] {
        let mut c = login(&server, "acme");
        c.send_bytes(format!("ATRN\r\n{tail}").as_bytes());
        let text = c.expect(554);
        assert!(text.starts_with("5.5.0 "), "{text}");
        c.expect_closed();
    }
    assert_eq!(queue_map(&server), before);
    // The refused request held no lease: the mail is still deliverable.
    let mut rev = atrn(login(&server, "acme"), "");
    assert_eq!(rev.serve(CAPS_ALL, accept_all).len(), 1);
}

/// `[odmr] min_atrn_interval`: a second ATRN of the same account within the interval is 450
/// 4.7.0, on the same or another connection; other accounts are not affected.
#[test]
fn repeated_atrn_within_min_interval_is_450() {
    let server = TestServer::start(
        "[odmr]\nallow_plaintext_auth = true\nmin_atrn_interval = \"10s\"\n",
        &[ACME, BETA],
    );
    let mut c = login(&server, "acme");
    expect_status(&mut c, "ATRN", 453, "4.3.0");
    expect_status(&mut c, "ATRN", 450, "4.7.0");
    c.cmd("QUIT", 221);
    let mut c = login(&server, "acme");
    expect_status(&mut c, "ATRN acme.example", 450, "4.7.0");
    let mut b = login(&server, "beta");
    expect_status(&mut b, "ATRN", 453, "4.3.0");
}

/// RFC 4954: bad credentials are 535 5.7.8; the third failure in a session also gets 421 and
/// the connection closes.
#[test]
fn auth_failures_are_535_then_421() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    let mut c = SmtpClient::connect(server.addr("odmr"));
    c.expect(220);
    c.cmd("EHLO customer.test", 250);
    expect_status(
        &mut c,
        &format!("AUTH PLAIN {}", plain_token("acme", "wrong")),
        535,
        "5.7.8",
    );
    expect_status(
        &mut c,
        &format!("AUTH PLAIN {}", plain_token("nobody", "wrong")),
        535,
        "5.7.8",
    );
    expect_status(
        &mut c,
        &format!("AUTH PLAIN {}", plain_token("acme", "still-wrong")),
        535,
        "5.7.8",
    );
    let text = c.expect(421);
    assert!(text.starts_with("4.7.0 "), "{text}");
    c.expect_closed();
}

// ---------------------------------------------------------------------------------------------
// 2. What a reversal carries
// ---------------------------------------------------------------------------------------------

/// A bare ATRN delivers every domain of the account; `ATRN d1` only d1's recipients of a
/// message stored once for d1 and d2; another account's recipients never appear at all.
#[test]
fn atrn_domain_list_selects_recipients_and_never_leaks() {
    let server = TestServer::start(PLAINTEXT, &[ACME, BETA]);
    let shared = "Subject: shared\r\n\r\nfor two domains\r\n";
    let mixed = "Subject: mixed\r\n\r\nfor two customers\r\n";
    mx_send(
        &server,
        "s@client.test",
        &["a@acme.example", "b@acme.test"],
        shared,
    );
    mx_send(
        &server,
        "s@client.test",
        &["c@acme.example", "z@beta.example"],
        mixed,
    );

    // ATRN acme.example: both messages, only their acme.example recipients.
    let mut rev = atrn(login(&server, "acme"), "acme.example");
    let got = rev.serve(CAPS_ALL, accept_all);
    rev.expect_closed();
    let rcpts: Vec<_> = got.iter().map(|g| g.rcpts.clone()).collect();
    assert_eq!(
        rcpts,
        [vec!["a@acme.example"], vec!["c@acme.example"]],
        "{:?}",
        rev.commands
    );
    assert_relayed(&got[0].body, shared);
    assert_relayed(&got[1].body, mixed);
    let wire = String::from_utf8_lossy(&rev.wire);
    assert!(!wire.contains("acme.test"), "{wire}");
    assert!(!wire.contains("beta.example"), "{wire}");

    wait_until("acme.example to be retired", || {
        !queue_map(&server).contains_key("acme.example")
    });
    assert_eq!(
        held(&server, "acme.test"),
        [("s@client.test".to_string(), vec!["b@acme.test".to_string()])]
    );
    assert_eq!(
        held(&server, "beta.example"),
        [(
            "s@client.test".to_string(),
            vec!["z@beta.example".to_string()]
        )]
    );

    // A bare ATRN: every domain of the account, still never beta's recipient.
    mx_send(
        &server,
        "s@client.test",
        &["n@acme.net"],
        "Subject: n\r\n\r\nn\r\n",
    );
    let mut rev = atrn(login(&server, "acme"), "");
    let got = rev.serve(CAPS_ALL, accept_all);
    let mut rcpts: Vec<_> = got.iter().flat_map(|g| g.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["b@acme.test", "n@acme.net"]);
    assert!(!String::from_utf8_lossy(&rev.wire).contains("beta.example"));
    wait_until("acme's domains to be retired", || {
        let q = queue_map(&server);
        q.keys().collect::<Vec<_>>() == ["beta.example"]
    });

    // beta gets exactly its recipient.
    let mut rev = atrn(login(&server, "beta"), "");
    let got = rev.serve(CAPS_ALL, accept_all);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["z@beta.example"]);
    assert_relayed(&got[0].body, mixed);
    wait_until("an empty queue", || queue_map(&server).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 3. One session per domain
// ---------------------------------------------------------------------------------------------

/// While a reversal for a domain runs, another ATRN for it (or a bare one) is 451 4.3.0 and
/// other domains are not locked; after the first finishes, a second ATRN (sent at once, or
/// after the queue view shows the mail gone when `settle`) must not deliver anything again.
fn concurrent_atrn(settle: bool) {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    const N: usize = 3;
    for i in 0..N {
        mx_send(
            &server,
            "s@client.test",
            &[&format!("u{i}@acme.example")],
            &format!("Subject: m{i}\r\n\r\nbody {i}\r\n"),
        );
    }
    let mut second = login(&server, "acme");
    let mut first = atrn(login(&server, "acme"), "acme.example");
    // The first reversal waits for our 220, holding the lease.
    expect_status(&mut second, "ATRN acme.example", 451, "4.3.0");
    expect_status(&mut second, "ATRN", 451, "4.3.0");
    // Only the leased domain is locked: acme.net is free (and empty).
    expect_status(&mut second, "ATRN acme.net", 453, "4.3.0");

    let got = first.serve(CAPS_ALL, accept_all);
    assert_eq!(got.len(), N);
    let mut delivered: Vec<String> = got.iter().flat_map(|g| g.accepted.clone()).collect();
    if settle {
        wait_until("the delivered mail to leave the queue", || {
            queue_map(&server).is_empty()
        });
    }

    // Ask again at once, while the first session is closing: busy (451) until its lease is
    // released, then nothing may be offered again (453), or what is offered must be new.
    let deadline = Instant::now() + SETTLE;
    let mut busy = 0;
    loop {
        second.send("ATRN acme.example");
        let (code, text) = second.read_reply().expect("reply to ATRN");
        match code {
            451 => {
                busy += 1;
                assert!(text.starts_with("4.3.0 "), "{text}");
                assert!(Instant::now() < deadline, "lease never released");
                if busy >= 8 {
                    // Stay under the session's error limit.
                    second = login(&server, "acme");
                    busy = 0;
                }
                thread::sleep(Duration::from_millis(1));
            }
            453 => {
                assert!(text.starts_with("4.3.0 "), "{text}");
                break;
            }
            250 => {
                let (reader, writer) = second.into_parts();
                let mut rev = Reversed {
                    reader,
                    writer,
                    wire: Vec::new(),
                    commands: Vec::new(),
                };
                let again = rev.serve(CAPS_ALL, accept_all);
                delivered.extend(again.iter().flat_map(|g| g.accepted.clone()));
                break;
            }
            other => panic!("unexpected reply to ATRN: {other} {text}"),
        }
    }
    delivered.sort();
    let expected: Vec<String> = (0..N).map(|i| format!("u{i}@acme.example")).collect();
    assert_eq!(delivered, expected, "a held message was delivered twice");
    wait_until("an empty queue", || queue_map(&server).is_empty());
}

#[test]
fn concurrent_atrn_for_a_busy_domain_is_451() {
    concurrent_atrn(true);
}

/// The same, with the second ATRN sent the moment the first session has said QUIT.
///
/// The reversal releases its leases (`Leases::drop`, src/provider/atrn.rs:68) as soon as the
/// session ends, but a delivered part leaves the shard's index only after its DONE record
/// was fsync'ed and `MeshMsg::Retire` came back (src/provider/core.rs:558-573, spawned from
/// `MeshMsg::Done` at :428). An ATRN in between is granted the same parts
/// (`Core::lease`, src/provider/core.rs:541-556) and the customer gets them again.
#[test]
fn atrn_right_after_a_reversal_does_not_redeliver() {
    concurrent_atrn(false);
}

// ---------------------------------------------------------------------------------------------
// 4. Per-recipient outcomes
// ---------------------------------------------------------------------------------------------

/// Per recipient: 2xx is retired, 4xx keeps that recipient held (alone, also when another
/// recipient of its part was accepted), 5xx is retired as bounced with an RFC 3464 report
/// from `<>` to the sender.
#[test]
fn per_recipient_outcomes_retire_hold_and_bounce() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    let m1 = "Subject: outcomes\r\n\r\none of each\r\n";
    let m2 = "Subject: split\r\n\r\nsame domain, two answers\r\n";
    mx_send(
        &server,
        "sender@client.test",
        &["ok@acme.example", "later@acme.net", "gone@acme.test"],
        m1,
    );
    mx_send(
        &server,
        "other@client2.test",
        &["ok2@acme.example", "later2@acme.example"],
        m2,
    );

    let mut rev = atrn(login(&server, "acme"), "");
    let got = rev.serve(CAPS_ALL, |addr| {
        match addr.split('@').next().expect("local part") {
            "ok" | "ok2" => "250 2.1.5 Ok",
            "later" | "later2" => "450 4.2.1 Mailbox busy, try later",
            "gone" => "550 5.1.1 No such user",
            other => panic!("unexpected recipient {other}"),
        }
        .to_string()
    });
    rev.expect_closed();
    assert_eq!(got.len(), 2, "{:?}", rev.commands);
    assert!(got.iter().all(|g| g.bdat), "some recipient was accepted");

    wait_until("the outcomes to be recorded", || {
        let q = queue_map(&server);
        !q.contains_key("acme.test") && q.contains_key("client.test")
    });
    let q = queue_map(&server);
    assert_eq!(
        q.keys().collect::<Vec<_>>(),
        ["acme.example", "acme.net", "client.test"],
        "{q:?}"
    );
    // acme.example: m1's part (all 250) is gone; of m2's part (one 250, one 450) only the
    // deferred recipient stays.
    wait_until("m2's accepted recipient to be retired", || {
        held(&server, "acme.example").len() == 1 && held(&server, "acme.example")[0].1.len() == 1
    });
    assert_eq!(
        held(&server, "acme.example"),
        [(
            "other@client2.test".to_string(),
            vec!["later2@acme.example".to_string()]
        )]
    );
    assert_eq!(
        held(&server, "acme.net"),
        [(
            "sender@client.test".to_string(),
            vec!["later@acme.net".to_string()]
        )]
    );
    // The report: from the null sender, to the original sender, nothing for deferrals.
    assert_eq!(
        held(&server, "client.test"),
        [(String::new(), vec!["sender@client.test".to_string()])]
    );
    assert!(!q.contains_key("client2.test"), "a deferral was reported");
}

/// Issue 9 item 6, found with Exim as the customer: one part (three recipients of one domain)
/// answered 250 / 451 / 550. The 250 recipient is retired, the 550 one is reported once, and
/// only the 451 one stays held: after a SIGKILL and a restart the next session carries that
/// recipient alone, and a third ATRN finds nothing.
#[test]
fn mixed_outcomes_in_one_part_settle_each_recipient_across_a_restart() {
    let mut server = TestServer::start(PLAINTEXT, &[ACME]);
    let body = "Subject: three answers\r\n\r\none part, three recipients\r\n";
    mx_send(
        &server,
        "sender@client.test",
        &["ok@acme.example", "later@acme.example", "gone@acme.example"],
        body,
    );

    let mut rev = atrn(login(&server, "acme"), "");
    let got = rev.serve(CAPS_ALL, |addr| {
        match addr {
            "ok@acme.example" => "250 2.1.5 Ok",
            "later@acme.example" => "451 4.3.0 Try again later",
            "gone@acme.example" => "550 5.1.1 No such user",
            other => panic!("unexpected recipient {other}"),
        }
        .to_string()
    });
    rev.expect_closed();
    assert_eq!(got.len(), 1, "{:?}", rev.commands);
    assert_eq!(got[0].accepted, ["ok@acme.example"]);

    // Only the deferred recipient is held; the refused one is reported to the sender.
    wait_until("the per-recipient outcomes to be recorded", || {
        held(&server, "acme.example")
            == [(
                "sender@client.test".to_string(),
                vec!["later@acme.example".to_string()],
            )]
            && queue_map(&server).contains_key("client.test")
    });
    assert_eq!(
        held(&server, "client.test"),
        [(String::new(), vec!["sender@client.test".to_string()])],
        "one report, from <>, for the 550"
    );

    // What is recorded survives a crash: the journal, not only the index, knows.
    server.kill9();
    server.restart();
    assert_eq!(
        held(&server, "acme.example"),
        [(
            "sender@client.test".to_string(),
            vec!["later@acme.example".to_string()],
        )],
        "after the restart"
    );

    let mut rev = atrn(login(&server, "acme"), "");
    let again = rev.serve(CAPS_ALL, accept_all);
    rev.expect_closed();
    assert_eq!(again.len(), 1, "{:?}", rev.commands);
    assert_eq!(
        again[0].rcpts,
        ["later@acme.example"],
        "the next session sends only what is still held"
    );
    assert_relayed(&again[0].body, body);

    wait_until("acme.example to be empty", || {
        !queue_map(&server).contains_key("acme.example")
    });
    let mut c = login(&server, "acme");
    expect_status(&mut c, "ATRN", 453, "4.3.0");
    c.cmd("QUIT", 221);
    assert_eq!(
        held(&server, "client.test"),
        [(String::new(), vec!["sender@client.test".to_string()])],
        "the 550 was reported exactly once"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Disconnects
// ---------------------------------------------------------------------------------------------

/// A customer that goes away in the middle of DATA has taken nothing: the message stays held
/// (RFC 5321 §4.1.4), and the next ATRN delivers it whole.
#[test]
fn disconnect_mid_data_keeps_the_message_held() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    let mut body = String::from("Subject: big\r\n\r\n");
    for i in 0..4000 {
        body.push_str(&format!("line {i:05} {}\r\n", "x".repeat(60)));
    }
    mx_send(&server, "s@client.test", &["a@acme.example"], &body);
    let before = queue_map(&server);

    let mut rev = atrn(login(&server, "acme"), "");
    rev.greet(CAPS_DATA);
    assert!(rev.line().starts_with("MAIL FROM:<s@client.test>"));
    rev.say("250 2.1.0 Ok");
    assert_eq!(rev.line(), "RCPT TO:<a@acme.example>");
    rev.say("250 2.1.5 Ok");
    assert_eq!(rev.line(), "DATA");
    rev.say("354 Go ahead");
    let part = rev.exact(4096);
    assert!(part.starts_with(b"Received: "));
    let _ = rev.writer.shutdown(Shutdown::Both);
    drop(rev);

    wait_until("the provider to notice the disconnect", || {
        server.logs().contains("reversal ended early")
    });
    assert_eq!(
        queue_map(&server),
        before,
        "a half-sent message left the hold"
    );

    // The lease is released when the aborted session ends; retry briefly while it is busy.
    let deadline = Instant::now() + SETTLE;
    let mut rev = loop {
        let mut c = login(&server, "acme");
        c.send("ATRN");
        let (code, text) = c.read_reply().expect("reply to ATRN");
        match code {
            250 => {
                let (reader, writer) = c.into_parts();
                break Reversed {
                    reader,
                    writer,
                    wire: Vec::new(),
                    commands: Vec::new(),
                };
            }
            451 if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => panic!("ATRN after the disconnect: {code} {text}"),
        }
    };
    let got = rev.serve(CAPS_DATA, accept_all);
    assert_eq!(got.len(), 1);
    assert!(!got[0].bdat);
    assert_relayed(&got[0].body, &body);
    wait_until("an empty queue", || queue_map(&server).is_empty());
}

// ---------------------------------------------------------------------------------------------
// 6. SIZE
// ---------------------------------------------------------------------------------------------

/// RFC 1870 §6: a message over the customer's SIZE is not offered at all; it is bounced to
/// its sender and its part retired.
#[test]
fn message_over_customer_size_is_bounced_without_sending() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    let body = format!("Subject: big\r\n\r\n{}\r\n", "y".repeat(2048));
    mx_send(&server, "sender@client.test", &["a@acme.example"], &body);

    let mut rev = atrn(login(&server, "acme"), "");
    let got = rev.serve(&["SIZE 100", "PIPELINING", "8BITMIME"], accept_all);
    rev.expect_closed();
    assert!(got.is_empty(), "{:?}", rev.commands);
    assert_eq!(rev.commands, ["EHLO mx.test", "QUIT"]);

    wait_until("the bounce to be recorded", || {
        let q = queue_map(&server);
        !q.contains_key("acme.example") && q.contains_key("client.test")
    });
    assert_eq!(
        held(&server, "client.test"),
        [(String::new(), vec!["sender@client.test".to_string()])]
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Body framing
// ---------------------------------------------------------------------------------------------

const DOTS: &str = "Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\n. space\r\nend\r\n";

/// With CHUNKING the body goes as one `BDAT <n> LAST` of exactly the stored bytes: the
/// provider's `Received:` field, then the original, byte for byte (no stuffing).
#[test]
fn chunking_customer_gets_bdat_with_exact_stored_bytes() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    mx_send(&server, "s@client.test", &["a@acme.example"], DOTS);
    let stored = queue_entry(&server.queue_json(), "acme.example").expect("held");

    let mut rev = atrn(login(&server, "acme"), "");
    let got = rev.serve(CAPS_ALL, accept_all);
    assert_eq!(got.len(), 1);
    let bdat: Vec<_> = rev
        .commands
        .iter()
        .filter(|c| c.starts_with("BDAT"))
        .collect();
    let n = got[0].body.len();
    assert_eq!(bdat, [&format!("BDAT {n} LAST")]);
    assert!(!rev.commands.iter().any(|c| c == "DATA"));
    assert_eq!(n as u64, stored.1, "BDAT size vs. the queue's byte count");
    assert_relayed(&got[0].body, DOTS);
    // The Received: field names the one recipient.
    let (field, _) = split_received(&got[0].body);
    assert!(String::from_utf8_lossy(field).contains("for <a@acme.example>"));
}

/// Without CHUNKING the body goes after DATA's 354, dot-stuffed, and unstuffs to the stored
/// bytes.
#[test]
fn data_customer_gets_dot_stuffed_body() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    mx_send(&server, "s@client.test", &["a@acme.example"], DOTS);

    let mut rev = atrn(login(&server, "acme"), "");
    let got = rev.serve(CAPS_DATA, accept_all);
    assert_eq!(got.len(), 1);
    assert!(!got[0].bdat);
    assert!(!rev.commands.iter().any(|c| c.starts_with("BDAT")));
    let wire = String::from_utf8_lossy(&got[0].wire);
    assert!(
        wire.ends_with("\r\n..\r\n...two\r\n..leading\r\n.. space\r\nend\r\n"),
        "{wire}"
    );
    assert_relayed(&got[0].body, DOTS);
    // Without PIPELINING too: one command per round trip, same result.
    mx_send(&server, "s@client.test", &["b@acme.example"], DOTS);
    let mut rev = atrn(login(&server, "acme"), "");
    let got = rev.serve(&[], accept_all);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail, "MAIL FROM:<s@client.test>");
    assert_relayed(&got[0].body, DOTS);
}

// ---------------------------------------------------------------------------------------------
// 8. TLS across the turnaround, with the Rust customer
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Collect(Vec<Incoming>);

impl Sink for Collect {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        self.0.push(message);
        Ok(())
    }
}

fn customer_io() -> IoKind {
    match io_driver().as_deref() {
        Some("uring") => IoKind::Uring,
        _ => IoKind::Epoll,
    }
}

fn tls_customer(server: &TestServer, trust: &std::path::Path) -> SessionConfig {
    SessionConfig {
        provider: server.addr("odmr"),
        hostname: "customer.test".into(),
        tls: Tls::StartTls {
            config: turnpike::tls::client_config_trusting(trust).expect("trust anchor"),
            server_name: rustls::pki_types::ServerName::try_from("localhost")
                .expect("server name")
                .to_owned(),
        },
        account: "acme".into(),
        password: password_for("acme"),
        mechanism: Mechanism::Plain,
        domains: Vec::new(),
        atrn_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(5),
    }
}

/// Holds `bodies` (recipient, content) from `s@client.test`, runs the Rust customer with
/// STARTTLS verifying the provider's own certificate, AUTH PLAIN inside TLS and a bare ATRN,
/// and asserts every message arrived byte-identical and the queue is empty afterwards.
fn tls_roundtrip(bodies: &[(&str, String)]) {
    // Default config: PLAIN is offered only inside TLS.
    let server = TestServer::start("", &[ACME]);
    for (to, body) in bodies {
        mx_send(&server, "s@client.test", &[to], body);
    }
    let cert = server.data_dir().join("tls").join("cert.pem");
    let cfg = tls_customer(&server, &cert);
    let mut sink = Collect::default();
    let received = block_on(customer_io(), session::run(customer_io(), &cfg, &mut sink))
        .expect("runtime")
        .unwrap_or_else(|e| panic!("customer session failed: {e}"));
    let got: Vec<String> = sink
        .0
        .iter()
        .flat_map(|m| m.envelope.recipients.iter().map(|r| r.mailbox.to_string()))
        .collect();
    assert_eq!(got.len(), bodies.len(), "received for {got:?}");
    assert_eq!(received.messages, bodies.len() as u64);
    for (to, body) in bodies {
        let m = sink
            .0
            .iter()
            .find(|m| {
                m.envelope
                    .recipients
                    .iter()
                    .any(|r| r.mailbox.to_string() == *to)
            })
            .unwrap_or_else(|| panic!("nothing for {to}"));
        assert_eq!(m.envelope.recipients.len(), 1);
        assert_eq!(
            m.envelope.sender.as_ref().map(|s| s.to_string()).as_deref(),
            Some("s@client.test")
        );
        assert_relayed(&m.body, body);
    }
    wait_until("an empty queue", || queue_map(&server).is_empty());
    let logs = server.logs();
    assert!(logs.contains("authenticated"), "no AUTH logged: {logs}");
}

/// Multi-line text of about `size` octets, CRLF lines of 78 characters.
fn text_body(subject: &str, size: usize) -> String {
    let mut body = format!("Subject: {subject}\r\n\r\n");
    let mut i = 0;
    while body.len() < size {
        body.push_str(&format!("{i:07} {}\r\n", "t".repeat(70)));
        i += 1;
    }
    body
}

/// STARTTLS, AUTH PLAIN inside TLS, ATRN, and the reversal over the same TLS session: every
/// held message arrives byte-identical and the queue is empty afterwards.
#[test]
fn tls_session_delivers_everything_byte_identical() {
    tls_roundtrip(&[
        ("a@acme.example", DOTS.to_string()),
        ("b@acme.test", "Subject: two\r\n\r\nsecond\r\n".to_string()),
        ("c@acme.net", text_body("three", 40_000)),
    ]);
}

/// The same with a body over 64 KiB: the reversal writes 256 KiB body chunks
/// (`reversal::BODY_CHUNK`) and `Conn::write_owned` hands each to rustls in one `write_all`,
/// which stops at rustls's 64 KiB send buffer, so the transfer fails with "failed to write
/// whole buffer", the session is aborted and the message (and everything queued after it)
/// is never delivered over TLS.
#[test]
fn tls_session_delivers_bodies_over_64k() {
    tls_roundtrip(&[
        ("a@acme.example", DOTS.to_string()),
        ("c@acme.net", text_body("big", 300_000)),
        (
            "b@acme.test",
            "Subject: after\r\n\r\nqueued after the big one\r\n".to_string(),
        ),
    ]);
}

/// Without TLS, the pipelined window: many small messages behind each other, a large one in
/// the middle (its body waits for its RCPT replies, then streams), more small ones after it.
/// Every message arrives byte-identical, in order, and the queue is empty afterwards.
#[test]
fn window_mixes_small_and_large_messages() {
    let server = TestServer::start("[odmr]\nallow_plaintext_auth = true\n", &[ACME]);
    let mut bodies = Vec::new();
    for i in 0..30 {
        let body = if i == 12 {
            text_body("big", 300_000)
        } else {
            format!("Subject: {i}\r\n\r\nsmall message {i}\r\n")
        };
        bodies.push((format!("r{i}@acme.example"), body));
    }
    for (to, body) in &bodies {
        mx_send(&server, "s@client.test", &[to.as_str()], body);
    }
    let mut cfg = tls_customer(&server, &server.data_dir().join("tls").join("cert.pem"));
    cfg.tls = Tls::None;
    let mut sink = Collect::default();
    let received = block_on(customer_io(), session::run(customer_io(), &cfg, &mut sink))
        .expect("runtime")
        .unwrap_or_else(|e| panic!("customer session failed: {e}"));
    assert_eq!(received.messages, bodies.len() as u64);
    assert_eq!(sink.0.len(), bodies.len());
    for (m, (to, body)) in sink.0.iter().zip(&bodies) {
        assert_eq!(m.envelope.recipients[0].mailbox.to_string(), *to);
        assert_relayed(&m.body, body);
    }
    assert!(queue_map(&server).is_empty(), "{:?}", queue_map(&server));
}

/// A customer that does not trust the provider's certificate stops at the handshake: no
/// AUTH is ever sent, and the mail stays held.
#[test]
fn tls_with_untrusted_certificate_fails_before_auth() {
    let server = TestServer::start("", &[ACME]);
    mx_send(&server, "s@client.test", &["a@acme.example"], DOTS);
    let before = queue_map(&server);
    let other = std::env::temp_dir().join(format!(
        "turnpike-odmr-othercert-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&other);
    let host = DomainName::parse("mx.test").expect("domain");
    let (other_cert, _) = turnpike::tls::ensure_self_signed(&other, &host).expect("generate");
    let cfg = tls_customer(&server, &other_cert);
    let mut sink = Collect::default();
    let result =
        block_on(customer_io(), session::run(customer_io(), &cfg, &mut sink)).expect("runtime");
    let _ = std::fs::remove_dir_all(&other);
    match result {
        Err(SessionError::Tls(e)) => {
            let text = e.to_ascii_lowercase();
            assert!(
                text.contains("certificate") || text.contains("unknown"),
                "handshake error: {e}"
            );
        }
        Err(e) => panic!("expected a TLS handshake failure, got {e}"),
        Ok(r) => panic!("session succeeded with an untrusted certificate: {r:?}"),
    }
    assert!(sink.0.is_empty());
    // The provider saw no AUTH at all: neither a success nor a failure is logged.
    thread::sleep(Duration::from_millis(200));
    let logs = server.logs();
    assert!(!logs.contains("authenticated"), "{logs}");
    assert!(!logs.contains("authentication failed"), "{logs}");
    assert_eq!(queue_map(&server), before);
}
