//! `turnpike bench mx` against a real `turnpike serve`: the JSON report must match what the
//! server holds afterwards (`turnpike queue --json`), for one message per connection, for the
//! pipelined window with the realistic size mix over two domains, over STARTTLS, and for
//! refusals (errors by reply code, nothing accepted).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{output_text, queue_entry, run_bounded, turnpike_bin, TestServer};

const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `turnpike bench mx --target ADDR <args> --json FILE`; returns the parsed report.
fn bench_mx(target: &str, args: &[&str], dir: &Path) -> serde_json::Value {
    let json = dir.join(format!("mx-{}.json", std::process::id()));
    let mut cmd = Command::new(turnpike_bin());
    cmd.args(["bench", "mx", "--target", target, "--json"])
        .arg(&json)
        .args(args);
    let out = run_bounded(&mut cmd, None, BENCH_TIMEOUT);
    assert!(
        out.status.success(),
        "bench mx failed: {}",
        output_text(&out)
    );
    let text = std::fs::read_to_string(&json).expect("bench mx wrote its JSON report");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON report");
    assert_eq!(v["schema"], "turnpike-bench/1");
    assert_eq!(v["bench"], "mx");
    v
}

fn phase(v: &serde_json::Value) -> &serde_json::Value {
    let phases = v["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 1, "bench mx has one phase");
    &phases[0]
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn tempdir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tp-bench-mx-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn report_matches_what_the_server_holds() {
    let server = TestServer::start("", &[("bench", &["example.com"])]);
    let mx = server.addr("mx").to_string();
    let dir = tempdir("held");
    let plot = dir.join("mx.svg");
    bench_mx(&mx, &["--messages", "120", "--sessions", "4"], &dir);
    let v = bench_mx(
        &mx,
        &[
            "--messages",
            "120",
            "--sessions",
            "4",
            "--size",
            "4096",
            "--plot",
            plot.to_str().unwrap(),
        ],
        &dir,
    );
    let p = phase(&v);
    assert_eq!(u(&p["attempted"]), 120);
    assert_eq!(u(&p["messages"]), 120, "{p}");
    assert_eq!(u(&p["bytes"]), 120 * 4096);
    assert_eq!(
        u(&p["connections"]),
        120,
        "one connection per message by default"
    );
    assert!(p["errors"].as_object().unwrap().is_empty(), "{p}");
    let eod = &p["latency_us"]["end_of_data_to_reply"];
    assert_eq!(u(&eod["count"]), 120);
    assert!(u(&eod["p50"]) <= u(&eod["p99"]) && u(&eod["p99"]) <= u(&eod["max"]));
    assert_eq!(u(&p["latency_us"]["connect_to_greeting"]["count"]), 120);
    assert!(v["client"]["cpu_s"].as_f64().unwrap() > 0.0);
    // Both runs landed: 240 held, each with our Received: line in front.
    let (held, bytes) = queue_entry(&server.queue_json(), "example.com").expect("example.com held");
    assert_eq!(held, 240, "{}", server.logs());
    assert!(
        bytes > 240 * 4096 && bytes < 240 * (4096 + 1024),
        "held bytes {bytes}"
    );
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains("throughput"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pipelined_window_with_the_real_mix_over_two_domains() {
    let server = TestServer::start(
        "",
        &[
            ("bench", &["d0.example.com"]),
            ("other", &["d1.example.com"]),
        ],
    );
    let dir = tempdir("window");
    let v = bench_mx(
        &server.addr("mx").to_string(),
        &[
            "--messages",
            "60",
            "--sessions",
            "3",
            "--per-connection",
            "100",
            "--pipelining",
            "--chunking",
            "--size-dist",
            "real",
            "--recipients",
            "2",
            "--domains",
            "2",
            "--seed",
            "7",
        ],
        &dir,
    );
    let p = phase(&v);
    assert_eq!(u(&p["messages"]), 60, "{p}");
    assert_eq!(u(&p["connections"]), 3, "every session kept its connection");
    assert_eq!(v["settings"]["size"], "real");
    let q = server.queue_json();
    // Each message has one recipient in each domain: both hold all 60.
    for d in ["d0.example.com", "d1.example.com"] {
        let (held, bytes) = queue_entry(&q, d).unwrap_or_else(|| panic!("{d} holds nothing"));
        assert_eq!(held, 60, "{d}");
        assert!(
            bytes >= u(&p["bytes"]),
            "{d}: held {bytes} < sent {}",
            p["bytes"]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn starttls_delivers_everything() {
    let server = TestServer::start("", &[("bench", &["example.com"])]);
    let dir = tempdir("tls");
    let ca = server.data_dir().join("tls/cert.pem");
    let v = bench_mx(
        &server.addr("mx").to_string(),
        &[
            "--messages",
            "30",
            "--sessions",
            "2",
            "--per-connection",
            "10",
            "--tls",
            "starttls",
            "--ca",
            ca.to_str().unwrap(),
        ],
        &dir,
    );
    let p = phase(&v);
    assert_eq!(u(&p["messages"]), 30, "{p}\n{}", server.logs());
    assert_eq!(
        queue_entry(&server.queue_json(), "example.com").unwrap().0,
        30
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusals_are_counted_by_reply_code() {
    let server = TestServer::start("", &[("bench", &["example.com"])]);
    let dir = tempdir("refused");
    let v = bench_mx(
        &server.addr("mx").to_string(),
        &[
            "--messages",
            "7",
            "--to",
            "user@not-hosted.test",
            "--per-connection",
            "0",
        ],
        &dir,
    );
    let p = phase(&v);
    assert_eq!(u(&p["attempted"]), 7);
    assert_eq!(u(&p["messages"]), 0);
    assert_eq!(u(&p["errors"]["550"]), 7, "{p}");
    assert!(queue_entry(&server.queue_json(), "not-hosted.test").is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
