//! Interop with real mail clients: swaks and Postfix's smtp-source deliver into the MX, and
//! `turnpike queue` must show exactly what they sent.
//!
//! Each test skips visibly when its client is not installed, and fails under `CI=true`.
//! The Postfix daemon is never needed: smtp-source is a standalone client.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use common::{
    find_program, json_sum, output_text, queue_entry, require_program, run_bounded,
    senders_to_recipients, TestServer,
};

const DOMAIN: &str = "example.com";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for what the server may add to a message it holds (its Received: line).
const MAX_ADDED_BYTES: u64 = 2048;

fn hosted_server() -> TestServer {
    TestServer::start("", &[("acme", &[DOMAIN])])
}

fn swaks(server: &TestServer, from: &str, to: &[&str], data_file: Option<&str>) -> Output {
    let mx = server.addr("mx");
    let mut cmd = Command::new(find_program("swaks").expect("swaks"));
    cmd.args(["--server", &mx.ip().to_string()])
        .args(["--port", &mx.port().to_string()])
        .args(["--helo", "client.test"])
        .args(["--from", from])
        .args(["--to", &to.join(",")])
        .args(["--timeout", "10"]);
    if let Some(file) = data_file {
        cmd.args(["--data", &format!("@{file}")]);
    }
    run_bounded(&mut cmd, None, CLIENT_TIMEOUT)
}

/// A message with CRLF line endings, no leading dots, and a size that differs per `n`.
fn message(n: usize, from: &str, to: &[&str]) -> String {
    let mut m = format!(
        "From: <{from}>\r\nTo: {}\r\nSubject: interop {n}\r\nMessage-Id: <interop-{n}@client.test>\r\n\r\n",
        to.iter().map(|t| format!("<{t}>")).collect::<Vec<_>>().join(", ")
    );
    for line in 0..(20 * n) {
        m.push_str(&format!("line {line} of message {n}, some filler text\r\n"));
    }
    m
}

#[test]
fn swaks_messages_are_held_and_listed() {
    if !require_program("swaks") {
        return;
    }
    let server = hosted_server();
    let sends: [(&str, &[&str]); 3] = [
        ("one@client.test", &["alice@example.com"]),
        ("two@client.test", &["bob@example.com", "carol@example.com"]),
        ("three@client.test", &["alice@example.com"]),
    ];
    let mut sent_sizes = BTreeMap::new();
    for (n, (from, to)) in sends.iter().enumerate() {
        let body = message(n + 1, from, to);
        let file = server.data_dir().join(format!("swaks-{n}.eml"));
        fs::write(&file, &body).unwrap();
        let out = swaks(&server, from, to, Some(file.to_str().unwrap()));
        assert!(
            out.status.success(),
            "swaks {from} -> {to:?}: {}\n{}",
            out.status,
            output_text(&out)
        );
        // swaks' transcript must show the server's 250 after the end-of-data dot.
        let transcript = String::from_utf8_lossy(&out.stdout);
        assert!(
            transcript.lines().any(|l| l.starts_with("<-  250")),
            "{transcript}"
        );
        sent_sizes.insert(from.to_string(), body.len() as u64);
    }

    let queue = server.queue_json();
    let domains = queue["domains"].as_array().expect("domains array");
    assert_eq!(domains.len(), 1, "only {DOMAIN} holds mail: {queue}");
    let (messages, bytes) = queue_entry(&queue, DOMAIN).expect("example.com listed");
    assert_eq!(messages, 3, "{queue}");
    let sent: u64 = sent_sizes.values().sum();
    assert!(
        (sent..=sent + 3 * MAX_ADDED_BYTES).contains(&bytes),
        "held {bytes} bytes for {sent} sent: {queue}"
    );

    let show = server.queue_show_json(DOMAIN);
    assert_eq!(show["domain"], DOMAIN, "{show}");
    let expected: BTreeMap<String, Vec<String>> = sends
        .iter()
        .map(|(from, to)| {
            let mut to: Vec<String> = to.iter().map(|t| t.to_string()).collect();
            to.sort();
            (from.to_string(), to)
        })
        .collect();
    assert_eq!(senders_to_recipients(&show), expected, "{show}");
    let mut listed_total = 0;
    for m in show["messages"].as_array().unwrap() {
        let id = m["id"].as_str().expect("id");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "id {id:?}"
        );
        let size = m["size"].as_u64().expect("size");
        let sent = sent_sizes[m["sender"].as_str().unwrap()];
        assert!(
            (sent..=sent + MAX_ADDED_BYTES).contains(&size),
            "message of {sent} bytes held as {size}: {m}"
        );
        listed_total += size;
    }
    assert_eq!(listed_total, bytes, "show sizes add up to the queue total");
}

#[test]
fn smtp_source_200_messages_over_10_sessions() {
    if !require_program("smtp-source") {
        return;
    }
    let server = hosted_server();
    let out = smtp_source(server.addr("mx"), 10, 200, 4096);
    assert!(
        out.status.success(),
        "smtp-source: {}\n{}\n{}",
        out.status,
        output_text(&out),
        server.logs()
    );
    let queue = server.queue_json();
    let (messages, bytes) = queue_entry(&queue, DOMAIN).expect("example.com listed");
    assert_eq!(messages, 200, "{queue}");
    // -l counts payload only; headers and our Received: line come on top.
    assert!(
        (200 * 4096..=200 * (4096 + 2 * MAX_ADDED_BYTES)).contains(&bytes),
        "{queue}"
    );
    let show = server.queue_show_json(DOMAIN);
    let held = show["messages"].as_array().expect("messages");
    assert_eq!(held.len(), 200);
    assert!(held.iter().all(|m| m["sender"] == "sender@client.test"
        && m["recipients"] == serde_json::json!(["user@example.com"])));
}

/// A load test against the server as a new user runs it (no configuration file): 50
/// parallel sessions from loopback, a new connection per message, are never refused with
/// `421 Too many connections` (loopback is a trusted network, exempt from the per-address
/// cap), and every message is held.
#[test]
fn smtp_source_50_sessions_into_the_zero_config_mx_get_no_421() {
    if !require_program("smtp-source") {
        return;
    }
    let server = TestServer::start_zero_config(&[("acme", &[DOMAIN])]);
    assert_eq!(server.addr("mx").port(), 2525, "zero-config MX port");
    let out = smtp_source(server.addr("mx"), 50, 5000, 4096);
    let text = output_text(&out);
    assert!(out.status.success(), "smtp-source: {}\n{text}", out.status);
    assert!(!text.contains("421"), "smtp-source saw a 421:\n{text}");
    let queue = server.queue_json();
    let (messages, _) = queue_entry(&queue, DOMAIN).expect("example.com listed");
    assert_eq!(messages, 5000, "{queue}");
}

fn smtp_source(mx: SocketAddr, sessions: u32, messages: u32, length: u32) -> Output {
    let mut cmd = Command::new(find_program("smtp-source").expect("smtp-source"));
    cmd.args(["-s", &sessions.to_string()])
        .args(["-m", &messages.to_string()])
        .args(["-l", &length.to_string()])
        .args(["-M", "client.test"])
        .args(["-f", "sender@client.test"])
        .args(["-t", "user@example.com"])
        .arg(mx.to_string());
    run_bounded(&mut cmd, None, CLIENT_TIMEOUT)
}

#[test]
fn swaks_to_non_hosted_domain_is_refused() {
    if !require_program("swaks") {
        return;
    }
    let server = hosted_server();
    let out = swaks(
        &server,
        "someone@client.test",
        &["user@elsewhere.test"],
        None,
    );
    // swaks exit code 24: no RCPT accepted.
    assert_eq!(out.status.code(), Some(24), "{}", output_text(&out));
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        transcript.lines().any(|l| l.starts_with("<** 550 5.7.1")),
        "{transcript}"
    );
    let queue = server.queue_json();
    assert!(queue["domains"].is_array(), "{queue}");
    let held = json_sum(&queue["domains"], |d| d["messages"].as_u64().unwrap_or(0));
    assert_eq!(held, 0, "nothing held: {queue}");
}
