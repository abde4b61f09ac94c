//! Service-level behaviour of the MX over real sockets: postmaster, account reloads, expiry,
//! restarts with fewer cores, and the queue view with the server stopped.

mod common;

use std::time::{Duration, Instant};

use common::{queue_entry, SmtpClient, TestServer};

const BODY: &str = "Subject: service test\r\n\r\nhello\r\n";

fn deliver(server: &TestServer, to: &str) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.send_mail("sender@client.test", &[to], BODY);
    c.cmd("QUIT", 221);
}

/// RFC 5321 §4.5.1: `RCPT TO:<Postmaster>` MUST be accepted, with or without our host name.
#[test]
fn postmaster_is_accepted_and_held_under_our_host_name() {
    let server = TestServer::start("", &[("acme", &["acme.example"])]);
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.cmd("MAIL FROM:<sender@client.test>", 250);
    c.cmd("RCPT TO:<Postmaster>", 250);
    c.cmd("RCPT TO:<postmaster@mx.test>", 250);
    c.cmd("DATA", 354);
    c.send_bytes(format!("{BODY}.\r\n").as_bytes());
    c.expect(250);
    c.cmd("QUIT", 221);
    let show = server.queue_show_json("mx.test");
    let rcpts = &show["messages"][0]["recipients"];
    assert_eq!(rcpts.as_array().map(|a| a.len()), Some(2), "{show}");
}

/// `turnpike account add` against a running server takes effect without a restart, and so
/// does SIGHUP after editing the accounts file.
#[test]
fn accounts_added_while_running_are_hosted_at_once() {
    let server = TestServer::start("", &[("acme", &["acme.example"])]);
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.cmd("MAIL FROM:<sender@client.test>", 250);
    c.cmd("RCPT TO:<info@newco.example>", 550);
    c.cmd("QUIT", 221);

    server.add_account("newco", &["newco.example"]);
    // The CLI pokes the server over the control socket; the reload is applied by each core's
    // mesh receiver, so allow a short, bounded wait.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = SmtpClient::connect(server.addr("mx"));
        c.expect(220);
        c.cmd("EHLO client.test", 250);
        c.cmd("MAIL FROM:<sender@client.test>", 250);
        c.send("RCPT TO:<info@newco.example>");
        let (code, text) = c.read_reply().unwrap();
        if code == 250 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "newco.example still refused: {code} {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    deliver(&server, "info@newco.example");
    assert_eq!(
        queue_entry(&server.queue_json(), "newco.example").map(|e| e.0),
        Some(1)
    );
}

/// A part held longer than `spool.max_hold` is bounced: an RFC 3464 report (status 5.4.7)
/// goes to the sender from `<>` (queued under the sender's domain, the outbound queue), and
/// the part leaves the hold. Both facts survive a restart (EXPIRE, report and DONE are
/// journaled).
#[test]
fn parts_past_max_hold_are_reported_to_the_sender_and_leave_the_hold() {
    let mut server = TestServer::start(
        "[spool]\nmax_hold = \"1s\"\n",
        &[("acme", &["acme.example"])],
    );
    deliver(&server, "info@acme.example");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let queue = server.queue_json();
        let held = queue_entry(&queue, "acme.example")
            .map(|e| e.0)
            .unwrap_or(0);
        let reports = queue_entry(&queue, "client.test").map(|e| e.0).unwrap_or(0);
        if held == 0 && reports == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not expired after 15 s: {queue}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = server.queue_show_json("client.test");
    assert_eq!(
        report["messages"][0]["sender"], "",
        "a report comes from <>: {report}"
    );
    assert_eq!(report["messages"][0]["recipients"][0], "sender@client.test");
    server.stop();
    let offline = server.queue_json();
    assert_eq!(queue_entry(&offline, "acme.example"), None, "{offline}");
    assert_eq!(
        queue_entry(&offline, "client.test").map(|e| e.0),
        Some(1),
        "{offline}"
    );
    // The report itself is a proper DSN naming the status.
    let recovered = turnpike::spool::recover(server.data_dir()).unwrap();
    let part = &recovered.parts[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reader = turnpike::spool::Reader::new(server.data_dir(), turnpike::spool::IoKind::Epoll);
    let body = String::from_utf8(rt.block_on(reader.read_body(&part.location)).unwrap()).unwrap();
    assert!(body.contains("report-type=delivery-status"), "{body}");
    assert!(body.contains("Status: 5.4.7"), "{body}");
    assert!(
        body.contains("Final-Recipient: rfc822; info@acme.example"),
        "{body}"
    );
    server.restart();
    // The expired part never comes back. (The report may itself expire under this test's 1 s
    // hold; a report from <> is then dropped without another report.)
    let after = server.queue_json();
    assert_eq!(queue_entry(&after, "acme.example"), None, "{after}");
    assert!(
        server.logs().contains("delivery report queued"),
        "no log line for the report"
    );
}

/// Restarting with fewer cores: the journals of the cores that are gone are adopted, all held
/// mail is still there, and new mail is still accepted.
#[test]
fn restart_with_fewer_cores_keeps_every_held_message() {
    let mut server = TestServer::start(
        "[server]\ncores = 2\n",
        &[("acme", &["acme.example", "acme.test"])],
    );
    for i in 0..20 {
        let to = if i % 2 == 0 {
            "a@acme.example"
        } else {
            "b@acme.test"
        };
        deliver(&server, to);
    }
    let before = server.queue_json();
    server.stop();
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    std::fs::write(
        server.config_path(),
        config.replace("cores = 2", "cores = 1"),
    )
    .unwrap();
    server.restart();
    assert_eq!(
        server.queue_json(),
        before,
        "held mail changed across the restart"
    );
    deliver(&server, "c@acme.example");
    let logs = server.logs();
    // 20 connections over two SO_REUSEPORT listeners: both cores wrote (all on one core has
    // a chance of 2^-19).
    assert!(
        server.data_dir().join("journal/core-1").exists(),
        "core 1 never wrote"
    );
    assert!(
        logs.contains("adopted the journal"),
        "core-1's journal was not adopted:\n{logs}"
    );
}

/// The queue view reads the journal when no server runs, and says the same as the server did.
#[test]
fn queue_view_is_the_same_online_and_offline() {
    let mut server = TestServer::start("", &[("acme", &["acme.example"])]);
    for _ in 0..3 {
        deliver(&server, "info@acme.example");
    }
    let online = (server.queue_json(), server.queue_show_json("acme.example"));
    server.stop();
    let offline = (server.queue_json(), server.queue_show_json("acme.example"));
    assert_eq!(online, offline);
    assert_eq!(queue_entry(&online.0, "acme.example").map(|e| e.0), Some(3));
}

/// The Prometheus endpoint answers with the merged per-core counters and per-domain gauges.
#[test]
fn metrics_endpoint_reports_held_mail_and_refusals() {
    use std::io::{Read, Write};
    let server = TestServer::start("", &[("acme", &["acme.example"])]);
    deliver(&server, "info@acme.example");
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.cmd("MAIL FROM:<sender@client.test>", 250);
    c.cmd("RCPT TO:<x@elsewhere.test>", 550);
    c.cmd("QUIT", 221);

    let mut http = std::net::TcpStream::connect(server.addr("metrics")).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
    };
    assert_eq!(value("turnpike_messages_held_total "), 1.0);
    assert_eq!(value("turnpike_replies_refused_total{class=\"5xx\"}"), 1.0);
    assert_eq!(
        value("turnpike_domain_held_messages{domain=\"acme.example\"}"),
        1.0
    );
    assert!(value("turnpike_accept_seconds_count") >= 1.0);
}
