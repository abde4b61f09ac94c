//! `turnpike bench sink`: a real client (Postfix's smtp-source) and `turnpike bench mx` send
//! to it; its report must count exactly what they sent, its refusals by code, and it must
//! stop by itself after `--messages`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{find_program, output_text, require_program, run_bounded, turnpike_bin, SmtpClient};

/// A `bench sink` child; killed on drop if still running.
struct Sink {
    child: Child,
    addr: SocketAddr,
    json: PathBuf,
}

impl Sink {
    fn start(args: &[&str]) -> Sink {
        let json = std::env::temp_dir().join(format!(
            "tp-sink-{}-{}.json",
            std::process::id(),
            args.join("_")
        ));
        let mut child = Command::new(turnpike_bin())
            .args(["bench", "sink", "--listen", "127.0.0.1:0", "--json"])
            .arg(&json)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn bench sink");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading: the summary goes to stdout at the end.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("bench sink printed its address");
        // "bench sink listening on 127.0.0.1:PORT (...)"
        let addr = line
            .split_whitespace()
            .nth(4)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Sink { child, addr, json }
    }

    /// Waits (bounded) for the sink to exit by itself; returns its report.
    fn report(mut self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "bench sink exited with {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bench sink did not stop by itself"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&self.json).expect("sink JSON report");
        let _ = std::fs::remove_file(&self.json);
        serde_json::from_str(&text).expect("valid JSON")
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn counts_what_smtp_source_and_bench_mx_sent() {
    if !require_program("smtp-source") {
        return;
    }
    let sink = Sink::start(&["--messages", "150", "--cores", "2"]);
    let addr = sink.addr.to_string();
    let mut cmd = Command::new(find_program("smtp-source").unwrap());
    cmd.args([
        "-s",
        "5",
        "-m",
        "50",
        "-l",
        "2000",
        "-f",
        "a@client.test",
        "-t",
    ])
    .args(["u@example.com", &addr]);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(60));
    assert!(out.status.success(), "smtp-source: {}", output_text(&out));
    let json = std::env::temp_dir().join(format!("tp-sink-mx-{}.json", std::process::id()));
    let mut cmd = Command::new(turnpike_bin());
    cmd.args([
        "bench",
        "mx",
        "--target",
        &addr,
        "--messages",
        "100",
        "--size",
        "3000",
    ])
    .args([
        "--sessions",
        "4",
        "--per-connection",
        "0",
        "--pipelining",
        "--chunking",
        "--json",
    ])
    .arg(&json);
    let out = run_bounded(&mut cmd, None, Duration::from_secs(60));
    assert!(out.status.success(), "bench mx: {}", output_text(&out));
    let mx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(u(&mx["phases"][0]["messages"]), 100);
    assert!(
        mx["phases"][0]["errors"].as_object().unwrap().is_empty(),
        "{mx}"
    );
    let r = sink.report();
    assert_eq!(r["bench"], "sink");
    let p = &r["phases"][0];
    assert_eq!(u(&p["messages"]), 150, "{p}");
    // smtp-source: one connection per message; bench mx: its 4 sessions keep theirs.
    assert_eq!(u(&p["connections"]), 50 + 4, "{p}");
    // bench mx's bytes are exact; smtp-source's 50 messages carry its own headers too.
    assert!(u(&p["bytes"]) > 100 * 3000 + 50 * 2000, "{p}");
    assert!(p["errors"].as_object().unwrap().is_empty(), "{p}");
    let timeline: u64 = r["timeline"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| u(&p["messages"]))
        .sum();
    assert_eq!(timeline, 150);
}

#[test]
fn refusals_are_counted_and_the_session_survives() {
    let sink = Sink::start(&["--messages", "1"]);
    let mut c = SmtpClient::connect(sink.addr);
    c.expect(220);
    c.cmd("EHLO t.test", 250);
    c.cmd("RCPT TO:<x@y.test>", 503);
    c.cmd("BOGUS", 500);
    c.send_mail("a@b.test", &["c@d.test"], "Subject: hi\r\n\r\nhello\r\n");
    c.cmd("QUIT", 221);
    let r = sink.report();
    let p = &r["phases"][0];
    assert_eq!(u(&p["messages"]), 1);
    assert_eq!(u(&p["errors"]["503"]), 1, "{p}");
    assert_eq!(u(&p["errors"]["500"]), 1, "{p}");
}
