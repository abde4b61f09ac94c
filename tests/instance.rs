//! One server per data directory and per port: a second `turnpike serve` on the same data
//! directory, or on a port the first one serves (SO_REUSEPORT would let its bind succeed),
//! exits non-zero with a message naming the first server's PID and data directory, and the
//! first one keeps serving.

mod common;

use std::process::Command;

use common::{output_text, run_bounded, turnpike_bin, SmtpClient, TestServer, START_TIMEOUT};

fn serve(data_dir: &std::path::Path, config: &std::path::Path) -> std::process::Output {
    let mut cmd = Command::new(turnpike_bin());
    cmd.arg("--data-dir")
        .arg(data_dir)
        .arg("--config")
        .arg(config)
        .args(["serve", "--io", "epoll"]);
    // A second server that wrongly started would run until killed: the bound fails the test.
    run_bounded(&mut cmd, None, START_TIMEOUT * 2)
}

fn still_serving(server: &TestServer) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("QUIT", 221);
}

#[test]
fn a_second_server_on_the_same_data_dir_names_the_first() {
    let first = TestServer::start("", &[("alice", &["alice.test"])]);
    let pid = first.pid().unwrap();
    let out = serve(first.data_dir(), first.config_path());
    let text = output_text(&out);
    assert!(!out.status.success(), "second server started: {text}");
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    assert!(
        text.contains(&first.data_dir().display().to_string()),
        "{text}"
    );
    still_serving(&first);
}

#[test]
fn a_second_server_on_the_same_port_names_the_first() {
    let first = TestServer::start("", &[("alice", &["alice.test"])]);
    let pid = first.pid().unwrap();
    let mx = first.addr("mx");
    let odmr = first.addr("odmr");
    let other = tempdir("second");
    let config = other.join("turnpike.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"mx2.test\"\n\n[listen]\nmx = [\"{mx}\"]\nodmr = \
             [\"{odmr}\"]\nsubmission = []\nsubmissions = []\nmetrics = []\n"
        ),
    )
    .unwrap();
    let out = serve(&other, &config);
    let text = output_text(&out);
    assert!(!out.status.success(), "second server started: {text}");
    assert!(text.contains(&mx.to_string()), "{text}");
    assert!(text.contains(&format!("pid {pid}")), "{text}");
    assert!(
        text.contains(&first.data_dir().display().to_string()),
        "{text}"
    );
    still_serving(&first);
    std::fs::remove_dir_all(other).unwrap();
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "turnpike-instance-{tag}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    ));
    std::fs::create_dir(&d).unwrap();
    d
}
