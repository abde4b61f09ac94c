//! Outgoing mail through the customer: swaks submits to the `turnpike pull --every` daemon's
//! local listener while the provider is unreachable; the next session uploads it to
//! `turnpike serve` before ATRN, exactly once; a provider 5xx bounces to the local sender's
//! maildir; a client outside `[outbox] allow` is refused. Real processes, real sockets.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    find_program, output_text, password_for, queue_entry, require_program, run_bounded,
    senders_to_recipients, tcp_relay, TestServer,
};

fn scratch(server: &TestServer, name: &str) -> PathBuf {
    let dir = server.data_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A daemon config for `office` toward `address` (STARTTLS, the provider's certificate as
/// trust anchor), every second, with `extra` appended.
fn pull_config(server: &TestServer, dir: &Path, address: SocketAddr, extra: &str) -> PathBuf {
    let secret = dir.join("secret");
    std::fs::write(&secret, format!("{}\n", password_for("office"))).unwrap();
    let config = format!(
        r#"
[provider]
address = "{address}"
tls = "starttls"
server_name = "localhost"
ca = "{ca}"

[account]
name = "office"
password_file = "{secret}"

[session]
hostname = "gw.office.test"
idle_timeout = "10s"

[schedule]
every = "1s"
max_backoff = "2s"
{extra}
"#,
        ca = server.data_dir().join("tls/cert.pem").display(),
        secret = secret.display(),
    );
    let path = dir.join("pull.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The daemon; its process group is killed on drop, so a failing test leaves nothing behind.
struct Customer {
    child: Child,
    log: PathBuf,
}

impl Customer {
    fn spawn(config: &Path, log: &Path) -> Customer {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(common::turnpike_bin())
            .args(["pull", "--config", config.to_str().unwrap(), "--every"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Customer {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    #[track_caller]
    fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if done(&log) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\ncustomer log:\n{log}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The listener's address, from its start-up log line (it listens on port 0).
    fn listener(&self) -> SocketAddr {
        let mut addr = None;
        self.wait_for("the outbox listener", Duration::from_secs(10), |log| {
            addr = log
                .lines()
                .filter(|l| l.contains("outbox listening"))
                .find_map(|l| l.split("listen=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| strip_ansi(a).parse().ok());
            addr.is_some()
        });
        addr.unwrap()
    }

    /// SIGTERM, then the exit status (bounded).
    fn stop(&mut self) -> i32 {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Customer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = libc::pid_t::try_from(self.child.id()).unwrap();
            // SAFETY: kill(2) has no memory-safety preconditions; the group is our child's.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn swaks(listener: SocketAddr, from: &str, to: &str, subject: &str) -> std::process::Output {
    let mut cmd = Command::new(find_program("swaks").expect("swaks"));
    cmd.args(["--server", &listener.ip().to_string()])
        .args(["--port", &listener.port().to_string()])
        .args(["--helo", "desk1.office.test"])
        .args(["--from", from, "--to", to])
        .args(["--header", &format!("Subject: {subject}")])
        .args(["--body", "hello from the office\n"])
        .args(["--timeout", "10"]);
    run_bounded(&mut cmd, None, Duration::from_secs(30))
}

fn held(server: &TestServer, domain: &str) -> u64 {
    queue_entry(&server.queue_json(), domain).map_or(0, |(m, _)| m)
}

fn maildir_messages(maildir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(maildir.join("new")) else {
        return Vec::new();
    };
    entries
        .map(|e| String::from_utf8_lossy(&std::fs::read(e.unwrap().path()).unwrap()).into_owned())
        .collect()
}

#[test]
fn mail_queued_while_offline_is_uploaded_once_and_a_refusal_bounces_to_the_local_sender() {
    if !require_program("swaks") {
        return;
    }
    let server = TestServer::start("", &[("office", &["office.test"]), ("far", &["far.test"])]);
    let target = Arc::new(Mutex::new(None));
    let front = tcp_relay(target.clone());
    let dir = scratch(&server, "customer");
    let spool = dir.join("outbox");
    let office = dir.join("office-mail");
    let branch = dir.join("branch-mail");
    // branch.test is delivered here, but it is not the account's domain at the provider: a
    // sender there gets 553 5.7.1 from the provider's sender policy.
    let config = pull_config(
        &server,
        &dir,
        front,
        &format!(
            "[delivery.recipients]\n\"@office.test\" = {{ maildir = \"{}\" }}\n\
             \"@branch.test\" = {{ maildir = \"{}\" }}\n\
             [outbox]\nspool = \"{}\"\nlisten = \"127.0.0.1:0\"\n",
            office.display(),
            branch.display(),
            spool.display()
        ),
    );
    let mut customer = Customer::spawn(&config, &dir.join("pull.log"));
    let listener = customer.listener();

    // The provider is unreachable: both are only queued locally.
    let out = swaks(
        listener,
        "alice@office.test",
        "bob@far.test",
        "outgoing one",
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("250 2.0.0 Ok queued as"),
        "{}",
        output_text(&out)
    );
    let out = swaks(listener, "carol@branch.test", "dave@far.test", "not yours");
    assert!(out.status.success(), "{}", output_text(&out));
    customer.wait_for("a failed session", Duration::from_secs(10), |log| {
        log.contains("session failed")
    });
    assert_eq!(held(&server, "far.test"), 0);

    // The provider comes back: the next session uploads before ATRN.
    *target.lock().unwrap() = Some(server.addr("odmr"));
    customer.wait_for("the upload", Duration::from_secs(30), |log| {
        log.contains("outbox upload done")
    });
    customer.wait_for("the report", Duration::from_secs(10), |_| {
        !maildir_messages(&branch).is_empty()
    });
    assert_eq!(held(&server, "far.test"), 1, "{}", customer.log());
    let show = senders_to_recipients(&server.queue_show_json("far.test"));
    assert_eq!(show.len(), 1);
    assert_eq!(show["alice@office.test"], vec!["bob@far.test".to_string()]);

    // The refused one came back to its sender as an RFC 3464 report.
    let reports = maildir_messages(&branch);
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert!(
        report.contains("Delivered-To: carol@branch.test"),
        "{report}"
    );
    assert!(report.contains("report-type=delivery-status"), "{report}");
    assert!(
        report.contains("Final-Recipient: rfc822; dave@far.test"),
        "{report}"
    );
    assert!(report.contains("Status: 5.7.1"), "{report}");
    assert!(
        report.contains("Diagnostic-Code: smtp; 553 5.7.1"),
        "{report}"
    );
    assert!(report.contains("Subject: not yours"), "{report}");
    assert!(maildir_messages(&office).is_empty());

    // Exactly once: two more sessions upload nothing.
    let done = |log: &str| log.matches("session done").count();
    let before = done(&customer.log());
    customer.wait_for("two more sessions", Duration::from_secs(20), |log| {
        done(log) >= before + 2
    });
    assert_eq!(held(&server, "far.test"), 1);
    let log = customer.log();
    assert_eq!(log.matches("outgoing mail uploaded").count(), 1, "{log}");
    assert_eq!(log.matches("outbox upload done").count(), 1, "{log}");
    assert_eq!(customer.stop(), 0, "{}", customer.log());

    // And the local journal holds nothing any more.
    let recovered = turnpike::spool::recover(&spool).unwrap();
    assert!(recovered.parts.is_empty(), "{:?}", recovered.parts);
    assert!(recovered.damage.is_empty(), "{:?}", recovered.damage);
}

#[test]
fn a_client_outside_the_allowed_networks_is_refused_at_connect() {
    let server = TestServer::start("", &[("office", &["office.test"])]);
    let dir = scratch(&server, "customer");
    let spool = dir.join("outbox");
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        &format!(
            "[delivery]\ncatch_all = {{ maildir = \"{}\" }}\n\
             [outbox]\nspool = \"{}\"\nlisten = [\"127.0.0.1:0\"]\nallow = [\"192.0.2.0/24\"]\n",
            dir.join("Maildir").display(),
            spool.display()
        ),
    );
    let mut customer = Customer::spawn(&config, &dir.join("pull.log"));
    let listener = customer.listener();
    let stream = TcpStream::connect(listener).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("554 5.7.1 "), "{line:?}");
    line.clear();
    assert_eq!(
        reader.read_line(&mut line).unwrap(),
        0,
        "closed after the 554"
    );
    customer.wait_for("the refusal in the log", Duration::from_secs(10), |log| {
        log.contains("client not in outbox.allow")
    });
    assert_eq!(customer.stop(), 0, "{}", customer.log());
    assert!(turnpike::spool::recover(&spool).unwrap().parts.is_empty());
}

/// An older provider: AUTH PLAIN works, MAIL is `502` (no submission on its ODMR port), and
/// nothing is held. Counts the MAIL commands it refused.
fn old_provider(mails: Arc<Mutex<u32>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let mails = mails.clone();
            thread::spawn(move || {
                let _ = client.set_read_timeout(Some(Duration::from_secs(20)));
                let mut out = client.try_clone().unwrap();
                let mut reader = BufReader::new(client);
                let _ = out.write_all(b"220 old.test ESMTP\r\n");
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-old.test\r\n250 AUTH PLAIN\r\n",
                        "AUTH" => b"235 2.7.0 Authentication successful\r\n",
                        "MAIL" => {
                            *mails.lock().unwrap() += 1;
                            b"502 5.5.1 Command not implemented\r\n"
                        }
                        "ATRN" => b"453 4.3.0 You have no mail\r\n",
                        "QUIT" => {
                            let _ = out.write_all(b"221 2.0.0 Bye\r\n");
                            break;
                        }
                        _ => b"500 5.5.2 What?\r\n",
                    };
                    if out.write_all(reply).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
    addr
}

#[test]
fn an_odmr_port_without_mail_falls_back_to_the_providers_submission_port() {
    if !require_program("swaks") {
        return;
    }
    let server = TestServer::start(
        "[odmr]\nallow_plaintext_auth = true\n",
        &[("office", &["office.test"]), ("far", &["far.test"])],
    );
    let mails = Arc::new(Mutex::new(0));
    let old = old_provider(mails.clone());
    let dir = scratch(&server, "customer");
    let spool = dir.join("outbox");
    let secret = dir.join("secret");
    std::fs::write(&secret, format!("{}\n", password_for("office"))).unwrap();
    let config = dir.join("pull.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[provider]
address = "{old}"
tls = "none"
[account]
name = "office"
password_file = "{secret}"
mechanism = "plain"
[session]
hostname = "gw.office.test"
idle_timeout = "10s"
[schedule]
every = "1s"
[delivery]
catch_all = {{ maildir = "{maildir}" }}
[outbox]
spool = "{spool}"
listen = "127.0.0.1:0"
submission = "{submission}"
"#,
            secret = secret.display(),
            maildir = dir.join("Maildir").display(),
            spool = spool.display(),
            submission = server.addr("submission"),
        ),
    )
    .unwrap();
    let mut customer = Customer::spawn(&config, &dir.join("pull.log"));
    let listener = customer.listener();
    let out = swaks(listener, "alice@office.test", "bob@far.test", "via 587");
    assert!(out.status.success(), "{}", output_text(&out));
    customer.wait_for("the upload", Duration::from_secs(30), |log| {
        log.contains("outbox upload done")
    });
    // The old provider refused MAIL and cannot pass mail on: the provider holding it got it
    // over its submission port.
    assert_eq!(*mails.lock().unwrap(), 1, "tried the ODMR port first");
    assert_eq!(held(&server, "far.test"), 1, "{}", customer.log());
    let show = senders_to_recipients(&server.queue_show_json("far.test"));
    assert_eq!(show["alice@office.test"], vec!["bob@far.test".to_string()]);
    assert_eq!(customer.stop(), 0, "{}", customer.log());
    assert!(turnpike::spool::recover(&spool).unwrap().parts.is_empty());
}

#[test]
fn recipients_deferred_by_the_provider_follow_on_their_own_and_nobody_gets_it_twice() {
    if !require_program("swaks") {
        return;
    }
    // One recipient per message at the provider: the second RCPT gets 452 4.5.3.
    let server = TestServer::start(
        "[submission]\nrecipients_per_message = 1\n",
        &[("office", &["office.test"]), ("far", &["far.test"])],
    );
    let dir = scratch(&server, "customer");
    let spool = dir.join("outbox");
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        &format!(
            "[delivery]\ncatch_all = {{ maildir = \"{}\" }}\n\
             [outbox]\nspool = \"{}\"\nlisten = \"127.0.0.1:0\"\n",
            dir.join("Maildir").display(),
            spool.display()
        ),
    );
    let mut customer = Customer::spawn(&config, &dir.join("pull.log"));
    let listener = customer.listener();
    let out = swaks(
        listener,
        "alice@office.test",
        "bob@far.test,carol@far.test",
        "two",
    );
    assert!(out.status.success(), "{}", output_text(&out));
    customer.wait_for("both uploads", Duration::from_secs(30), |log| {
        log.matches("outgoing mail uploaded").count() >= 2
    });
    let done = |log: &str| log.matches("session done").count();
    let before = done(&customer.log());
    customer.wait_for("one more session", Duration::from_secs(10), |log| {
        done(log) > before
    });
    let show = server.queue_show_json("far.test");
    let mut got: Vec<Vec<String>> = show["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["sender"], "alice@office.test");
            m["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect()
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [["bob@far.test"], ["carol@far.test"]],
        "{}",
        customer.log()
    );
    let log = customer.log();
    assert!(log.contains("queued again on their own"), "{log}");
    assert_eq!(log.matches("outgoing mail uploaded").count(), 2, "{log}");
    assert!(
        maildir_messages(&dir.join("Maildir")).is_empty(),
        "a 4xx is no bounce"
    );
    assert_eq!(customer.stop(), 0, "{}", customer.log());
    assert!(turnpike::spool::recover(&spool).unwrap().parts.is_empty());
}
