//! Reloading the accounts file on SIGHUP (issue 9 item 9): an emptied or truncated file keeps
//! the accounts the server had, with an ERROR that says what is wrong (line and column for a
//! syntax error); a file that says `no_accounts = true` is taken at its word.

mod common;

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use common::{SmtpClient, TestServer};

const ACME: (&str, &[&str]) = ("acme", &["acme.example"]);

fn sighup(server: &TestServer) {
    let pid = libc::pid_t::try_from(server.pid().expect("server runs")).expect("pid");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own running child.
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
}

/// Sends SIGHUP and waits (bounded) until the server logged the `n`-th reload outcome;
/// returns that log line.
#[track_caller]
fn reload(server: &TestServer, n: usize) -> String {
    sighup(server);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = server.logs();
        let outcomes: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("accounts reloaded") || l.contains("reload failed"))
            .collect();
        if outcomes.len() >= n {
            return outcomes[n - 1].to_string();
        }
        assert!(Instant::now() < deadline, "no reload outcome logged");
        thread::sleep(Duration::from_millis(20));
    }
}

/// The reply code to `RCPT TO:<user@acme.example>` on the MX.
fn rcpt_code(server: &TestServer) -> u16 {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.cmd("MAIL FROM:<s@client.test>", 250);
    c.send("RCPT TO:<user@acme.example>");
    let (code, _) = c.read_reply().expect("reply to RCPT");
    c.cmd("QUIT", 221);
    code
}

#[test]
fn bad_files_keep_the_old_accounts_and_an_explicit_empty_file_is_obeyed() {
    let server = TestServer::start("", &[ACME]);
    let path = server.data_dir().join("accounts.toml");
    let good = fs::read_to_string(&path).unwrap();
    assert_eq!(rcpt_code(&server), 250);

    // Emptied: refused, the old accounts stay.
    fs::write(&path, "").unwrap();
    let line = reload(&server, 1);
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("no_accounts = true"),
        "says how to mean it: {line}"
    );
    assert_eq!(rcpt_code(&server), 250, "acme.example is still hosted");

    // Truncated after `name =`: the reason names the place and what is wrong.
    let cut = good.find("name = ").unwrap() + "name =".len();
    fs::write(&path, &good[..cut]).unwrap();
    let line = reload(&server, 2);
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("line "), "{line}");
    assert!(line.contains("column "), "{line}");
    assert!(!line.contains("invalid accounts file: \""), "{line}");
    assert!(line.contains("expected a value"), "{line}");
    assert_eq!(rcpt_code(&server), 250);

    // Said explicitly: no accounts, so acme.example is no longer ours.
    fs::write(&path, "no_accounts = true\n").unwrap();
    let line = reload(&server, 3);
    assert!(line.contains("accounts reloaded"), "{line}");
    assert_eq!(rcpt_code(&server), 550);

    // And back.
    fs::write(&path, &good).unwrap();
    let line = reload(&server, 4);
    assert!(line.contains("accounts reloaded"), "{line}");
    assert_eq!(rcpt_code(&server), 250);
}

/// Removing the last account with the CLI writes the explicit marker, so the running server
/// follows the operator instead of refusing the file.
#[test]
fn removing_the_last_account_is_an_explicit_empty_file() {
    let server = TestServer::start("", &[ACME]);
    let out = server.cli(&["account", "remove", "acme"], None);
    assert!(out.status.success(), "{}", common::output_text(&out));
    let text = fs::read_to_string(server.data_dir().join("accounts.toml")).unwrap();
    assert!(text.contains("no_accounts = true"), "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while rcpt_code(&server) != 550 {
        assert!(Instant::now() < deadline, "the removal never took effect");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !server.logs().contains("reload failed"),
        "{}",
        server.logs()
    );
}
