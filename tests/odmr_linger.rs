//! Linger (push delivery) over real sockets: a customer whose account lingers stays connected
//! after ATRN; mail held meanwhile is delivered at once; the provider keeps the session alive
//! with NOOP and ends it at `odmr.linger_max`.

mod common;

use std::time::{Duration, Instant};

use common::{password_for, SmtpClient, TestServer};
use turnpike::customer::session::{self, Mechanism, SessionConfig, Sink, Tls};
use turnpike::proto::inbound::Incoming;
use turnpike::proto::reply::Reply;
use turnpike::runtime::io::IoKind;

struct Collect(Vec<(Instant, Vec<u8>)>);

impl Sink for Collect {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        self.0.push((Instant::now(), message.body));
        Ok(())
    }
}

fn hold(server: &TestServer, to: &str, body: &str) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.send_mail("sender@client.test", &[to], body);
    c.cmd("QUIT", 221);
}

#[test]
fn lingering_session_gets_new_mail_at_once_and_ends_at_linger_max() {
    let server = TestServer::start(
        "[odmr]\nallow_plaintext_auth = true\nlinger_max = \"3s\"\nlinger_keepalive = \"1s\"\n",
        &[("push", &["push.example"])],
    );
    let out = server.cli(&["account", "linger", "push", "on"], None);
    assert!(out.status.success(), "{}", common::output_text(&out));

    let cfg = SessionConfig {
        provider: server.addr("odmr"),
        hostname: "customer.test".into(),
        tls: Tls::None,
        account: "push".into(),
        password: password_for("push"),
        mechanism: Mechanism::Plain,
        domains: Vec::new(),
        atrn_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(10),
    };
    // The account reload reaches the cores over the mesh; retry the (empty) ATRN briefly
    // until it is served as a lingering one (453 means the reload has not landed yet).
    let started = Instant::now();
    let customer = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut sink = Collect(Vec::new());
            let run = turnpike::runtime::io::block_on(IoKind::Epoll, async {
                session::run(IoKind::Epoll, &cfg, &mut sink).await
            })
            .unwrap();
            match run {
                Ok(_) => return (sink.0, Instant::now()),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("retrying: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("customer session failed: {e}"),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(1200));
    let held_at = Instant::now();
    hold(&server, "one@push.example", "Subject: one\r\n\r\nfirst\r\n");
    hold(
        &server,
        "two@push.example",
        "Subject: two\r\n\r\nsecond\r\n",
    );
    let (got, ended) = customer.join().unwrap();

    assert_eq!(got.len(), 2, "both messages pushed during the session");
    assert!(got[0].1.ends_with(b"Subject: one\r\n\r\nfirst\r\n"));
    assert!(got[1].1.ends_with(b"Subject: two\r\n\r\nsecond\r\n"));
    for (at, _) in &got {
        assert!(
            *at >= held_at && at.duration_since(held_at) < Duration::from_secs(2),
            "not pushed at once"
        );
    }
    let lasted = ended.duration_since(started);
    assert!(
        lasted >= Duration::from_millis(2500),
        "ended before linger_max: {lasted:?}"
    );
    assert!(
        lasted < Duration::from_secs(9),
        "did not end at linger_max: {lasted:?}"
    );
    let queue = server.queue_json();
    assert_eq!(common::queue_entry(&queue, "push.example"), None, "{queue}");
    assert!(server.logs().contains("delivered=2"), "{}", server.logs());
}
