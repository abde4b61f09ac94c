//! Authenticated submission end to end over real sockets (RFC 6409, RFC 8314, RFC 4954): swaks
//! as the customer's mail client on the submission ports (2587 STARTTLS, 2465 implicit TLS) and
//! on the ODMR port before ATRN; routing into another hosted domain's hold or the outbound
//! queue; the sender policy; the per-account rate limits; the MX still refusing relay.
//!
//! Mail routed into a hold is fetched back with ATRN by a scripted customer ([`receive_all`])
//! and compared byte for byte with what swaks sent, apart from the provider's `Received:`
//! field. Every refusal is followed by a check that the server and the held mail are intact.

mod common;

use std::fs;
use std::io::{BufRead, Read, Write};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{
    find_program, output_text, password_for, queue_entry, require_program, run_bounded, SmtpClient,
    TestServer,
};

/// PLAIN, LOGIN and CRAM-MD5 without TLS too (on every AUTH listener), so scripted peers and
/// swaks can authenticate without TLS where the test is not about TLS.
const PLAINTEXT: &str = "[odmr]\nallow_plaintext_auth = true\n";

const ACME: (&str, &[&str]) = ("acme", &["acme.example"]);
const BETA: (&str, &[&str]) = ("beta", &["beta.example"]);

const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(5);

/// A message with CRLF line endings and a line starting with a dot (stuffed by swaks on the
/// wire, so the end-of-data handling is exercised too).
fn message(tag: &str) -> String {
    let mut m = format!(
        "From: <user@acme.example>\r\nTo: <b@beta.example>\r\nSubject: submitted {tag}\r\n\
         Message-Id: <{tag}@laptop.test>\r\n\r\n"
    );
    for line in 0..40 {
        m.push_str(&format!("line {line} of {tag}, some filler text\r\n"));
    }
    m.push_str(".a line that starts with a dot\r\nlast line\r\n");
    m
}

/// Where swaks connects and how.
enum Via {
    /// The submission port (587 role): plain, or STARTTLS when `tls`.
    Submission { tls: bool },
    /// The submissions port (465 role): TLS from the first byte.
    Submissions,
    /// The ODMR port, before any ATRN.
    Odmr,
}

/// Runs swaks as `acme` (AUTH `mech`) from `from` to `to` with the message file `data`.
fn swaks(server: &TestServer, via: Via, mech: &str, from: &str, to: &[&str], data: &str) -> Output {
    let (addr, tls) = match via {
        Via::Submission { tls } => (server.addr("submission"), tls.then_some("--tls")),
        Via::Submissions => (server.addr("submissions"), Some("--tlsc")),
        Via::Odmr => (server.addr("odmr"), None),
    };
    // swaks sends CRLF . CRLF after the file's content, so the file leaves out the message's
    // final CRLF: what goes over the wire is then exactly `data`.
    let file = server
        .data_dir()
        .join(format!("swaks-{}.eml", from.replace('@', "-")));
    fs::write(&file, data.strip_suffix("\r\n").expect("data ends in CRLF")).unwrap();
    let mut cmd = Command::new(find_program("swaks").expect("swaks"));
    cmd.args(["--server", &addr.ip().to_string()])
        .args(["--port", &addr.port().to_string()])
        .args(["--helo", "laptop.test"])
        .args(["--auth", mech])
        .args(["--auth-user", "acme"])
        .args(["--auth-password", &password_for("acme")])
        .args(["--from", from])
        .args(["--to", &to.join(",")])
        .args(["--data", &format!("@{}", file.display())])
        .args(["--timeout", "10"]);
    if let Some(flag) = tls {
        cmd.arg(flag);
    }
    run_bounded(&mut cmd, None, CLIENT_TIMEOUT)
}

#[track_caller]
fn assert_swaks_ok(out: &Output) {
    assert!(
        out.status.success(),
        "swaks failed: {}\n{}",
        out.status,
        output_text(out)
    );
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        transcript
            .lines()
            .any(|l| l.starts_with("<-  235") || l.starts_with("<~  235")),
        "no 235 to AUTH in {transcript}"
    );
}

/// The `(messages, bytes)` of `domain` in `queue --json`, `(0, 0)` when absent.
fn held(server: &TestServer, domain: &str) -> (u64, u64) {
    queue_entry(&server.queue_json(), domain).unwrap_or((0, 0))
}

/// Polls until `domain` holds `messages` messages (the index is updated over the mesh).
#[track_caller]
fn wait_held(server: &TestServer, domain: &str, messages: u64) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = held(server, domain).0;
        if got == messages {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{domain} holds {got} messages, expected {messages}: {}",
            server.queue_json()
        );
        thread::sleep(Duration::from_millis(25));
    }
}

fn plain_token(account: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("\0{account}\0{}", password_for(account)))
}

/// EHLO and AUTH PLAIN as `account` on `service` (plaintext allowed): authenticated.
fn login(server: &TestServer, service: &str, account: &str) -> SmtpClient {
    let mut c = SmtpClient::connect(server.addr(service));
    c.expect(220);
    c.cmd("EHLO laptop.test", 250);
    c.cmd(&format!("AUTH PLAIN {}", plain_token(account)), 235);
    c
}

/// Sends `line`, asserts code and enhanced status; returns the text.
#[track_caller]
fn expect_status(c: &mut SmtpClient, line: &str, code: u16, status: &str) -> String {
    let text = c.cmd(line, code);
    assert!(
        text.starts_with(&format!("{status} ")),
        "{line:?}: expected {code} {status}, got {code} {text:?}"
    );
    text
}

/// ATRN as `account` on a fresh ODMR connection, then plays the customer's SMTP server
/// (CHUNKING offered) and returns every message body received, in order.
fn receive_all(server: &TestServer, account: &str) -> Vec<Vec<u8>> {
    let mut c = login(server, "odmr", account);
    expect_status(&mut c, "ATRN", 250, "2.0.0");
    let (mut reader, mut writer) = c.into_parts();
    let say = |w: &mut std::net::TcpStream, s: &str| {
        w.write_all(format!("{s}\r\n").as_bytes()).expect("write");
    };
    say(&mut writer, "220 customer.test ESMTP");
    let mut bodies = Vec::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("read") > 0, "closed");
        let line = line.trim_end().to_string();
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            say(&mut writer, "250-customer.test");
            say(&mut writer, "250-PIPELINING");
            say(&mut writer, "250-8BITMIME");
            say(&mut writer, "250 CHUNKING");
        } else if upper.starts_with("MAIL") || upper.starts_with("RCPT") {
            say(&mut writer, "250 2.1.0 Ok");
        } else if let Some(rest) = upper.strip_prefix("BDAT ") {
            let n: usize = rest.split(' ').next().unwrap().parse().unwrap();
            let mut body = vec![0; n];
            reader.read_exact(&mut body).expect("chunk");
            bodies.push(body);
            say(&mut writer, "250 2.0.0 Queued");
        } else if upper == "RSET" {
            // The provider's pipelined window may open a message with RSET (reversed.rs).
            say(&mut writer, "250 2.0.0 Reset");
        } else if upper == "QUIT" {
            say(&mut writer, "221 2.0.0 Bye");
            return bodies;
        } else {
            panic!("unexpected command from the provider: {line:?}");
        }
    }
}

/// Splits off the provider's `Received:` field (through its last folded line) and asserts it
/// names the authenticated account and the `with` type.
#[track_caller]
fn strip_received<'a>(body: &'a [u8], with: &str) -> &'a [u8] {
    let text = String::from_utf8_lossy(body);
    assert!(text.starts_with("Received: from laptop.test ("), "{text}");
    let mut end = 0;
    loop {
        end += body[end..].iter().position(|b| *b == b'\n').unwrap() + 1;
        if !matches!(body.get(end), Some(b' ' | b'\t')) {
            break;
        }
    }
    let field = String::from_utf8_lossy(&body[..end]);
    assert!(
        field.contains("\r\n\t(authenticated as acme)\r\n"),
        "{field}"
    );
    assert!(
        field.contains(&format!("by mx.test with {with} id ")),
        "{field}"
    );
    &body[end..]
}

// ---------------------------------------------------------------------------------------------

/// Port 2587 with the default policy: PLAIN only inside TLS (538 before STARTTLS), then
/// STARTTLS + AUTH PLAIN. One message to a hosted domain and a foreign one is stored once with
/// a part for each: beta.example's hold and the outbound queue.
#[test]
fn swaks_starttls_plain_routes_hosted_and_foreign() {
    if !require_program("swaks") {
        return;
    }
    let server = TestServer::start("", &[ACME, BETA]);
    let data = message("starttls");

    let out = swaks(
        &server,
        Via::Submission { tls: false },
        "PLAIN",
        "user@acme.example",
        &["b@beta.example"],
        &data,
    );
    // PLAIN is not offered before TLS, so swaks does not even try; a client that tries
    // anyway gets 538.
    assert!(!out.status.success(), "PLAIN without TLS was accepted");
    let text = output_text(&out);
    // Only the mechanisms that never send the password are offered before TLS.
    assert!(
        text.contains("<-  250-AUTH SCRAM-SHA-256 CRAM-MD5\n"),
        "{text}"
    );
    assert!(text.contains("requested type not available"), "{text}");
    let mut c = SmtpClient::connect(server.addr("submission"));
    c.expect(220);
    c.cmd("EHLO laptop.test", 250);
    expect_status(
        &mut c,
        &format!("AUTH PLAIN {}", plain_token("acme")),
        538,
        "5.7.11",
    );
    expect_status(&mut c, "MAIL FROM:<user@acme.example>", 530, "5.7.0");
    c.cmd("QUIT", 221);

    let out = swaks(
        &server,
        Via::Submission { tls: true },
        "PLAIN",
        "user@acme.example",
        &["b@beta.example", "x@foreign.example"],
        &data,
    );
    assert_swaks_ok(&out);
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        transcript.contains("AUTH "),
        "EHLO lacks AUTH: {transcript}"
    );
    assert!(!transcript.contains("ATRN"), "ATRN offered: {transcript}");
    wait_held(&server, "beta.example", 1);
    wait_held(&server, "foreign.example", 1);
    let (_, bytes) = held(&server, "beta.example");
    assert!(bytes > data.len() as u64, "held {bytes} bytes");
    // One message, two parts.
    let beta = server.queue_show_json("beta.example");
    let foreign = server.queue_show_json("foreign.example");
    assert_eq!(beta["messages"][0]["id"], foreign["messages"][0]["id"]);
    assert_eq!(beta["messages"][0]["sender"], "user@acme.example");
    assert_eq!(held(&server, "acme.example").0, 0);
}

/// CRAM-MD5 on 2587 and on the ODMR port before ATRN (plaintext allowed): beta fetches both
/// with ATRN and gets exactly what swaks sent, behind one Received: field naming acme.
#[test]
fn swaks_cram_md5_on_2587_and_odmr_reaches_beta_byte_identical() {
    if !require_program("swaks") {
        return;
    }
    let server = TestServer::start(PLAINTEXT, &[ACME, BETA]);
    let first = message("cram-2587");
    let second = message("cram-odmr");
    let out = swaks(
        &server,
        Via::Submission { tls: false },
        "CRAM-MD5",
        "first@acme.example",
        &["b@beta.example"],
        &first,
    );
    assert_swaks_ok(&out);
    let out = swaks(
        &server,
        Via::Odmr,
        "CRAM-MD5",
        "second@acme.example",
        &["b@beta.example"],
        &second,
    );
    assert_swaks_ok(&out);
    wait_held(&server, "beta.example", 2);

    let bodies = receive_all(&server, "beta");
    assert_eq!(bodies.len(), 2);
    let mut got: Vec<String> = bodies
        .iter()
        .map(|b| String::from_utf8_lossy(strip_received(b, "ESMTPA")).into_owned())
        .collect();
    got.sort();
    let mut want = [first, second];
    want.sort();
    assert_eq!(got, want);
}

/// Port 2465: TLS from the first byte (swaks --tlsc), AUTH PLAIN; the Received: field says
/// ESMTPSA.
#[test]
fn swaks_implicit_tls_on_2465() {
    if !require_program("swaks") {
        return;
    }
    let server = TestServer::start(PLAINTEXT, &[ACME, BETA]);
    let data = message("tlsc");
    let out = swaks(
        &server,
        Via::Submissions,
        "PLAIN",
        "user@acme.example",
        &["b@beta.example"],
        &data,
    );
    assert_swaks_ok(&out);
    wait_held(&server, "beta.example", 1);
    let bodies = receive_all(&server, "beta");
    assert_eq!(bodies.len(), 1);
    assert_eq!(
        String::from_utf8_lossy(strip_received(&bodies[0], "ESMTPSA")),
        data
    );
}

/// On the ODMR session itself: submit, then ATRN on the same connection still turns around.
#[test]
fn odmr_session_submits_then_atrn() {
    let server = TestServer::start(PLAINTEXT, &[ACME, BETA]);
    // Something for acme to collect.
    let mut mx = SmtpClient::connect(server.addr("mx"));
    mx.expect(220);
    mx.cmd("EHLO client.test", 250);
    mx.send_mail(
        "s@client.test",
        &["a@acme.example"],
        "Subject: in\r\n\r\nin\r\n",
    );
    mx.cmd("QUIT", 221);
    wait_held(&server, "acme.example", 1);

    let mut c = SmtpClient::connect(server.addr("odmr"));
    c.expect(220);
    c.cmd("EHLO laptop.test", 250);
    expect_status(&mut c, "MAIL FROM:<a@acme.example>", 530, "5.7.0");
    c.cmd(&format!("AUTH PLAIN {}", plain_token("acme")), 235);
    c.send_mail(
        "a@acme.example",
        &["b@beta.example", "x@foreign.example"],
        "Subject: out\r\n\r\nout\r\n",
    );
    expect_status(&mut c, "MAIL FROM:<a@acme.example>", 250, "2.1.0");
    expect_status(&mut c, "ATRN", 503, "5.5.1");
    c.cmd("RSET", 250);
    expect_status(&mut c, "ATRN", 250, "2.0.0");
    let (mut reader, mut writer) = c.into_parts();
    writer.write_all(b"220 customer.test ESMTP\r\n").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("EHLO "), "{line:?}");
    drop((reader, writer));
    wait_held(&server, "beta.example", 1);
    wait_held(&server, "foreign.example", 1);
}

/// Refusals on the submission port, each leaving the session, the server and the held mail
/// intact: 530 before AUTH, 553 for a foreign sender, 452 over the recipients per message and
/// per period, 450 over the messages per period; the MX still refuses relay with 550.
#[test]
fn refusals_are_precise_and_harmless() {
    let config = format!(
        "{PLAINTEXT}[submission]\nmessages_per_period = 2\nrecipients_per_message = 3\n\
         recipients_per_period = 4\n"
    );
    let server = TestServer::start(&config, &[ACME, BETA]);

    let mut c = SmtpClient::connect(server.addr("submission"));
    c.expect(220);
    let ehlo = c.cmd("EHLO laptop.test", 250);
    for ext in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
    ] {
        assert!(ehlo.lines().any(|l| l == ext), "EHLO lacks {ext}: {ehlo:?}");
    }
    assert!(ehlo.lines().any(|l| l.starts_with("SIZE ")), "{ehlo:?}");
    assert!(ehlo.lines().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert!(!ehlo.contains("ATRN"), "{ehlo:?}");
    expect_status(&mut c, "MAIL FROM:<a@acme.example>", 530, "5.7.0");
    expect_status(&mut c, "RCPT TO:<b@beta.example>", 530, "5.7.0");
    c.cmd(&format!("AUTH PLAIN {}", plain_token("acme")), 235);
    expect_status(&mut c, "MAIL FROM:<boss@beta.example>", 553, "5.7.1");
    expect_status(&mut c, "MAIL FROM:<a@acme.example>", 250, "2.1.0");
    for r in ["b1", "b2", "b3"] {
        expect_status(&mut c, &format!("RCPT TO:<{r}@beta.example>"), 250, "2.1.5");
    }
    expect_status(&mut c, "RCPT TO:<b4@beta.example>", 452, "4.5.3");
    c.cmd("DATA", 354);
    c.send_bytes(b"Subject: one\r\n\r\none\r\n.\r\n");
    c.expect(250);
    // Three recipients used of four per period: the next message gets one.
    expect_status(&mut c, "MAIL FROM:<>", 250, "2.1.0");
    expect_status(&mut c, "RCPT TO:<b5@beta.example>", 250, "2.1.5");
    expect_status(&mut c, "RCPT TO:<b6@beta.example>", 452, "4.5.3");
    c.cmd("DATA", 354);
    c.send_bytes(b"Subject: two\r\n\r\ntwo\r\n.\r\n");
    c.expect(250);
    expect_status(&mut c, "MAIL FROM:<a@acme.example>", 450, "4.7.1");
    c.cmd("NOOP", 250);
    c.cmd("QUIT", 221);
    wait_held(&server, "beta.example", 2);
    let show = server.queue_show_json("beta.example");
    let mut rcpts: Vec<usize> = show["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["recipients"].as_array().unwrap().len())
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, [1, 3]);

    // The limits are per account: beta may still send, to acme.
    let mut b = login(&server, "submission", "beta");
    b.send_mail(
        "b@beta.example",
        &["a@acme.example"],
        "Subject: b\r\n\r\nb\r\n",
    );
    b.cmd("QUIT", 221);
    wait_held(&server, "acme.example", 1);

    // The MX is unchanged: hosted mail accepted, relay refused.
    let mut mx = SmtpClient::connect(server.addr("mx"));
    mx.expect(220);
    mx.cmd("EHLO client.test", 250);
    expect_status(&mut mx, "MAIL FROM:<s@client.test>", 250, "2.1.0");
    expect_status(&mut mx, "RCPT TO:<x@foreign.example>", 550, "5.7.1");
    expect_status(&mut mx, "RCPT TO:<b@beta.example>", 250, "2.1.5");
    mx.cmd("DATA", 354);
    mx.send_bytes(b"Subject: mx\r\n\r\nmx\r\n.\r\n");
    mx.expect(250);
    mx.cmd("QUIT", 221);
    wait_held(&server, "beta.example", 3);
    assert_eq!(held(&server, "foreign.example").0, 0);

    let logs = server.logs();
    for needle in [
        "sender not in the account's domains",
        "recipient limit",
        "message rate limit",
    ] {
        assert!(logs.contains(needle), "no {needle:?} log line:\n{logs}");
    }
}

/// `turnpike account senders acme any` lets acme submit from any address once the running
/// server reloaded; `own` takes it back.
#[test]
fn sender_policy_is_per_account_and_reloads() {
    let server = TestServer::start(PLAINTEXT, &[ACME, BETA]);
    let try_foreign = |server: &TestServer| -> u16 {
        let mut c = login(server, "submission", "acme");
        c.send("MAIL FROM:<someone@elsewhere.example>");
        let (code, _) = c.read_reply().expect("reply to MAIL");
        c.cmd("QUIT", 221);
        code
    };
    assert_eq!(try_foreign(&server), 553);
    for (policy, want) in [("any", 250), ("own", 553)] {
        let out = server.cli(&["account", "senders", "acme", policy], None);
        assert!(out.status.success(), "{}", output_text(&out));
        let deadline = Instant::now() + SETTLE;
        while try_foreign(&server) != want {
            assert!(Instant::now() < deadline, "senders {policy} not applied");
            thread::sleep(Duration::from_millis(50));
        }
    }
    let accounts = fs::read_to_string(server.data_dir().join("accounts.toml")).unwrap();
    assert!(!accounts.contains("any_sender"), "{accounts}");
}

/// Failed AUTH on a submission port counts like on the ODMR port: 535 each, then 421 and
/// close; the account still works from a fresh connection afterwards.
#[test]
fn failed_auth_on_submission_is_throttled_like_odmr() {
    let server = TestServer::start(PLAINTEXT, &[ACME, BETA]);
    let wrong = base64::engine::general_purpose::STANDARD.encode("\0acme\0wrong");
    let mut c = SmtpClient::connect(server.addr("submission"));
    c.expect(220);
    c.cmd("EHLO laptop.test", 250);
    for _ in 0..3 {
        expect_status(&mut c, &format!("AUTH PLAIN {wrong}"), 535, "5.7.8");
    }
    let text = c.expect(421);
    assert!(text.starts_with("4.7.0 "), "{text}");
    c.expect_closed();
    let logs = server.logs();
    assert!(logs.contains("authentication failed"), "{logs}");

    let mut ok = login(&server, "submission", "acme");
    ok.send_mail(
        "a@acme.example",
        &["b@beta.example"],
        "Subject: s\r\n\r\ns\r\n",
    );
    ok.cmd("QUIT", 221);
    wait_held(&server, "beta.example", 1);
}

/// A hosted recipient is under the MX's quota rules (552 5.2.2 for a declared size over the
/// domain's quota); an outbound recipient of the same message is not.
#[test]
fn hosted_recipients_follow_the_quota_outbound_ones_do_not() {
    let config = format!("{PLAINTEXT}[quota]\n\"beta.example\" = \"1KiB\"\n");
    let server = TestServer::start(&config, &[ACME, BETA]);
    let mut c = login(&server, "submission", "acme");
    expect_status(&mut c, "MAIL FROM:<a@acme.example> SIZE=5000", 250, "2.1.0");
    expect_status(&mut c, "RCPT TO:<b@beta.example>", 552, "5.2.2");
    expect_status(&mut c, "RCPT TO:<x@foreign.example>", 250, "2.1.5");
    c.cmd("DATA", 354);
    c.send_bytes(b"Subject: q\r\n\r\nq\r\n.\r\n");
    c.expect(250);
    c.cmd("QUIT", 221);
    wait_held(&server, "foreign.example", 1);
    assert_eq!(held(&server, "beta.example").0, 0);
}

/// Port 2465 with a TLS client certificate pinned to acme (`turnpike account cert`): AUTH
/// EXTERNAL, then a submitted message lands in beta's hold.
#[test]
fn client_certificate_on_2465_authenticates_with_external() {
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use std::io::BufReader;
    use std::sync::Arc;

    let server = TestServer::start("", &[ACME, BETA]);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["laptop.acme.example".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = server.data_dir().join("acme-client.pem");
    fs::write(&pem, cert.pem()).unwrap();
    let out = server.cli(
        &["account", "cert", "acme", "--add", pem.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", output_text(&out));

    let mut roots = rustls::RootCertStore::empty();
    let ca = fs::read(server.data_dir().join("tls/cert.pem")).unwrap();
    for c in rustls_pemfile::certs(&mut &ca[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    let socket = std::net::TcpStream::connect(server.addr("submissions")).unwrap();
    socket.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut s = BufReader::new(rustls::StreamOwned::new(tls, socket));
    let reply = |s: &mut BufReader<_>, line: Option<&str>| -> (u16, String) {
        if let Some(line) = line {
            let w: &mut rustls::StreamOwned<_, _> = s.get_mut();
            w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
            w.flush().unwrap();
        }
        let mut text = String::new();
        loop {
            let mut l = String::new();
            assert!(s.read_line(&mut l).unwrap() > 0, "closed");
            text.push_str(&l);
            if l.as_bytes().get(3) != Some(&b'-') {
                return (l[..3].parse().unwrap(), text);
            }
        }
    };
    assert_eq!(reply(&mut s, None).0, 220);
    let (code, ehlo) = reply(&mut s, Some("EHLO laptop.test"));
    assert_eq!(code, 250);
    assert!(ehlo.contains(" EXTERNAL"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(reply(&mut s, Some("AUTH EXTERNAL =")).0, 235);
    assert_eq!(reply(&mut s, Some("MAIL FROM:<me@acme.example>")).0, 250);
    assert_eq!(reply(&mut s, Some("RCPT TO:<b@beta.example>")).0, 250);
    assert_eq!(reply(&mut s, Some("DATA")).0, 354);
    let (code, text) = reply(&mut s, Some("Subject: cert\r\n\r\ncert\r\n."));
    assert_eq!(code, 250, "{text}");
    assert_eq!(reply(&mut s, Some("QUIT")).0, 221);
    wait_held(&server, "beta.example", 1);
}
