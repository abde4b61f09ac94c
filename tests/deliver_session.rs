//! The delivery targets behind a real ODMR session: `turnpike serve` holds mail, the
//! customer session (`customer::session::run`) collects it with a [`Deliverer`] as its sink.
//!
//! Asserts the two promises the provider relies on: a message is answered 250 only once every
//! recipient's maildir file is on disk (and then leaves the hold), and a target that is down
//! gets the provider a 4xx, so the message stays held and comes again next session.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{io_driver, password_for, queue_entry, SmtpClient, TestServer};
use turnpike::customer::deliver::{Deliverer, DeliveryConfig};
use turnpike::customer::session::{self, Mechanism, Received, SessionConfig, Sink, Tls};
use turnpike::proto::inbound::Incoming;
use turnpike::proto::reply::Reply;
use turnpike::runtime::io::{block_on, IoKind};

const PLAINTEXT: &str = "[odmr]\nallow_plaintext_auth = true\n";
const ACME: (&str, &[&str]) = ("acme", &["acme.example"]);

fn customer_io() -> IoKind {
    match io_driver().as_deref() {
        Some("epoll") => IoKind::Epoll,
        _ => IoKind::detect().unwrap_or(IoKind::Epoll),
    }
}

fn mx_send(server: &TestServer, from: &str, to: &[&str], body: &str) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.send_mail(from, to, body);
    c.cmd("QUIT", 221);
}

fn deliverer(server: &TestServer, delivery: &str) -> Deliverer {
    let cfg: DeliveryConfig = toml::from_str(delivery).expect("delivery config");
    let mut d = Deliverer::from_config(&cfg).expect("from_config");
    d.set_session("customer.test", server.addr("odmr").ip());
    d
}

fn pull(server: &TestServer, delivery: &str) -> Received {
    pull_into(server, &mut deliverer(server, delivery))
}

fn pull_into(server: &TestServer, sink: &mut impl Sink) -> Received {
    let session = SessionConfig {
        provider: server.addr("odmr"),
        hostname: "customer.test".into(),
        tls: Tls::None,
        account: "acme".into(),
        password: password_for("acme"),
        mechanism: Mechanism::Plain,
        domains: Vec::new(),
        atrn_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(10),
    };
    block_on(customer_io(), session::run(customer_io(), &session, sink))
        .expect("runtime")
        .unwrap_or_else(|e| panic!("customer session failed: {e}"))
}

/// Delivers for real, then answers as if the 250 never reached the provider (the connection
/// broke, or the customer was killed right after the delivery).
struct LostReply<'a>(&'a mut Deliverer);

impl Sink for LostReply<'_> {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        self.0.deliver(message).await?;
        Err(Reply::with_status(451, (4, 4, 2), "reply lost (simulated)"))
    }
}

fn held(server: &TestServer) -> Option<(u64, u64)> {
    queue_entry(&server.queue_json(), "acme.example")
}

fn wait_until_released(server: &TestServer) {
    let end = Instant::now() + Duration::from_secs(5);
    while held(server).is_some_and(|(n, _)| n > 0) {
        assert!(Instant::now() < end, "still held: {:?}", held(server));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "turnpike-deliver-session-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn held_mail_lands_in_maildirs_byte_identical_then_leaves_the_hold() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    let tmp = TempDir::new("maildir");
    let one = "Subject: one\r\n\r\nfor alice and bob\r\n.dot line\r\n";
    let two = "Subject: two\r\n\r\nfor carol\r\n";
    mx_send(
        &server,
        "s@client.test",
        &["alice@acme.example", "bob@acme.example"],
        one,
    );
    mx_send(&server, "s@client.test", &["carol@acme.example"], two);
    assert_eq!(held(&server).map(|(n, _)| n), Some(2));

    let got = pull(
        &server,
        &format!(
            "catch_all = {{ maildir = \"{t}/all\" }}\n[recipients]\n\
             \"alice@acme.example\" = {{ maildir = \"{t}/alice\" }}\n",
            t = tmp.0.display()
        ),
    );
    assert_eq!(got.messages, 2);
    wait_until_released(&server);

    let alice = files(&tmp.0.join("alice/new"));
    let all = files(&tmp.0.join("all/new"));
    assert_eq!((alice.len(), all.len()), (1, 2), "one file per recipient");
    let provider_ip = server.addr("odmr").ip();
    let mut seen = Vec::new();
    for path in alice.iter().chain(&all) {
        let text = fs::read_to_string(path).unwrap();
        let rcpt = text
            .lines()
            .nth(1)
            .and_then(|l| l.strip_prefix("Delivered-To: "))
            .expect("Delivered-To: second")
            .to_string();
        assert!(
            text.starts_with("Return-Path: <s@client.test>\r\n"),
            "{text}"
        );
        // Our trace field names the provider's address; the provider's own follows it.
        let ours =
            format!("Received: from mx.test ([{provider_ip}])\r\n\tby customer.test with ESMTP");
        assert!(text.contains(&ours), "{text}");
        assert!(text.contains(&format!("\tfor <{rcpt}>;")), "{text}");
        let after_ours = &text[text.find(&ours).unwrap() + ours.len()..];
        assert!(
            after_ours.contains("\r\nReceived: "),
            "the provider's Received: is kept"
        );
        let body = if rcpt == "carol@acme.example" {
            two
        } else {
            one
        };
        assert!(
            text.ends_with(body),
            "body byte-identical for {rcpt}:\n{text}"
        );
        seen.push(rcpt);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "alice@acme.example",
            "bob@acme.example",
            "carol@acme.example"
        ]
    );
}

#[test]
fn a_target_that_is_down_leaves_the_mail_held_for_the_next_session() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    let tmp = TempDir::new("down");
    let body = "Subject: patience\r\n\r\nwait for me\r\n";
    mx_send(&server, "s@client.test", &["dave@acme.example"], body);

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let got = pull(
        &server,
        &format!("catch_all = {{ lmtp = \"127.0.0.1:{closed}\" }}\ntimeout = \"5s\"\n"),
    );
    assert_eq!(
        got.messages, 0,
        "nothing taken while the LMTP server is down"
    );
    assert_eq!(held(&server).map(|(n, _)| n), Some(1), "still held");
    let logs = server.logs();
    assert!(
        logs.contains("delivered=0 deferred=1"),
        "the provider saw a 4xx:\n{logs}"
    );

    let got = pull(
        &server,
        &format!("catch_all = {{ maildir = \"{}/box\" }}\n", tmp.0.display()),
    );
    assert_eq!(got.messages, 1);
    wait_until_released(&server);
    let stored = files(&tmp.0.join("box/new"));
    assert_eq!(stored.len(), 1);
    assert!(fs::read_to_string(&stored[0]).unwrap().ends_with(body));
}

#[test]
fn a_message_sent_again_after_a_lost_250_is_not_delivered_twice() {
    let server = TestServer::start(PLAINTEXT, &[ACME]);
    let tmp = TempDir::new("resend");
    let body = "Subject: once\r\n\r\nonly once please\r\n";
    mx_send(
        &server,
        "s@client.test",
        &["erin@acme.example", "fred@acme.example"],
        body,
    );
    let delivery = format!(
        "catch_all = {{ maildir = \"{t}/box\" }}\nledger = \"{t}/ledger\"\n",
        t = tmp.0.display()
    );

    let mut first = deliverer(&server, &delivery);
    let got = pull_into(&server, &mut LostReply(&mut first));
    assert_eq!(got.messages, 0);
    assert_eq!(files(&tmp.0.join("box/new")).len(), 2, "delivered to both");
    assert_eq!(
        held(&server).map(|(n, _)| n),
        Some(1),
        "the provider did not hear 250"
    );
    drop(first);

    // Next session, a new process as far as the ledger is concerned.
    let got = pull(&server, &delivery);
    assert_eq!(
        got.messages, 1,
        "the message came again and was answered 250"
    );
    wait_until_released(&server);
    assert_eq!(files(&tmp.0.join("box/new")).len(), 2, "no second copy");
}
