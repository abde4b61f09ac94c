//! `turnpike bench day` against a real `turnpike serve`: a short day passes its exactly-once
//! check and leaves nothing held; and the check really fails when a customer cannot collect
//! (missing mail) and when a message is offered twice (a copy seeded into the hold).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::{
    output_text, password_for, queue_entry, run_bounded, turnpike_bin, SmtpClient, TestServer,
};

const DAY_TIMEOUT: Duration = Duration::from_secs(180);

/// A short keep-alive so that a customer that left a lingering session is noticed quickly.
const CONFIG: &str = "[odmr]\nlinger_keepalive = \"2s\"\n";

fn json_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tp-bench-day-{}-{test}.json", std::process::id()))
}

fn bench_day(server: &TestServer, args: &[&str], json: &PathBuf) -> (Output, serde_json::Value) {
    let mut cmd = Command::new(turnpike_bin());
    cmd.arg("--data-dir")
        .arg(server.data_dir())
        .arg("--config")
        .arg(server.config_path())
        .args(["bench", "day", "--json"])
        .arg(json)
        .args(args);
    let out = run_bounded(&mut cmd, None, DAY_TIMEOUT);
    let text = std::fs::read_to_string(json)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {}", output_text(&out)));
    let _ = std::fs::remove_file(json);
    (out, serde_json::from_str(&text).expect("valid JSON"))
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_short_day_delivers_everything_exactly_once() {
    let server = TestServer::start(CONFIG, &[]);
    let (out, r) = bench_day(
        &server,
        &[
            "--customers",
            "4",
            "--senders",
            "3",
            "--rate",
            "15",
            "--duration",
            "4s",
            "--time-scale",
            "300",
            "--size-dist",
            "6KB",
            "--linger",
            "0.25",
            "--submitters",
            "0.5",
            "--sweep-timeout",
            "60s",
        ],
        &json_path("ok"),
    );
    assert!(
        out.status.success(),
        "bench day failed: {}\n{}",
        output_text(&out),
        server.logs()
    );
    let v = &r["verification"];
    assert_eq!(v["ok"], true, "{v}");
    let accepted = u(&v["accepted"]);
    assert!(accepted > 10, "too little mail to judge: {v}");
    assert_eq!(
        u(&v["delivered_once"]) + u(&v["refused_once"]),
        accepted,
        "{v}"
    );
    let phases = r["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["night", "morning", "midday", "evening", "sweep"]);
    let inbound: u64 = phases.iter().map(|p| u(&p["messages"])).sum();
    // A phase in which no customer connected has no delivery figures.
    let delivered: u64 = phases
        .iter()
        .map(|p| p["delivery"]["delivered"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        delivered,
        u(&v["delivered_once"]),
        "every 250 was a first delivery"
    );
    assert!(inbound <= accepted, "uploaded mail is accepted too");
    assert!(phases
        .iter()
        .any(|p| p["latency_us"]["atrn_reply"]["count"].as_u64() > Some(0)));
    assert!(
        r["server"]["pid"].as_u64().is_some(),
        "server found from the data directory"
    );
    // The sweep collected everything: nothing is held for the customers' domains.
    let q = server.queue_json();
    for i in 0..4 {
        let d = format!("c{i:03}.day.bench");
        assert_eq!(
            queue_entry(&q, &d).map_or(0, |e| e.0),
            0,
            "{d} still holds mail: {q}"
        );
    }
}

#[test]
fn the_check_fails_on_missing_and_duplicate_mail() {
    let server = TestServer::start(
        CONFIG,
        &[("alice", &["a.day.test"]), ("bob", &["b.day.test"])],
    );
    // Copies of the run's first five messages, already held for alice before the day
    // starts: those the day sends to alice arrive twice, those it sends to bob reach alice.
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO seed.test", 250);
    for seq in 0..5 {
        c.send_mail(
            "seed@senders.test",
            &["user0@a.day.test"],
            &format!("From: <seed@senders.test>\r\nX-Bench-Id: dup.{seq}\r\n\r\nseeded copy\r\n"),
        );
    }
    c.cmd("QUIT", 221);
    // bob's password is wrong: his mail can never be collected.
    let accounts = std::env::temp_dir().join(format!("tp-day-accounts-{}", std::process::id()));
    std::fs::write(
        &accounts,
        format!(
            "alice {} a.day.test\nbob wrong-password b.day.test\n",
            password_for("alice")
        ),
    )
    .unwrap();
    let (out, r) = bench_day(
        &server,
        &[
            "--accounts",
            accounts.to_str().unwrap(),
            "--mx",
            &server.addr("mx").to_string(),
            "--odmr",
            &server.addr("odmr").to_string(),
            "--run-id",
            "dup",
            "--senders",
            "2",
            "--rate",
            "10",
            "--duration",
            "3s",
            "--time-scale",
            "300",
            "--size-dist",
            "3KB",
            "--reply-mix",
            "250=1",
            "--submitters",
            "0",
            "--sweep-timeout",
            "5s",
        ],
        &json_path("fail"),
    );
    let _ = std::fs::remove_file(&accounts);
    assert!(
        !out.status.success(),
        "a failed check must fail the command: {}",
        output_text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("verification: FAILED"));
    let v = &r["verification"];
    assert_eq!(v["ok"], false);
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        !list("missing").is_empty(),
        "bob's mail must be missing: {v}"
    );
    let seeded = |k: &str| {
        list(k)
            .iter()
            .filter(|id| ["dup.0", "dup.1", "dup.2", "dup.3", "dup.4"].contains(&id.as_str()))
            .count()
    };
    assert!(
        seeded("duplicates") > 0,
        "a seeded copy of alice's mail is a duplicate: {v}"
    );
    assert!(
        seeded("misdelivered") > 0,
        "a seeded copy of bob's mail reached alice: {v}"
    );
    assert_eq!(seeded("duplicates") + seeded("misdelivered"), 5, "{v}");
    let auth: u64 = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["delivery"]["atrn"]["auth"].as_u64())
        .sum();
    assert!(auth > 0, "bob's sessions fail at AUTH: {r}");
}
