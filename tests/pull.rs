//! `turnpike serve` <-> `turnpike pull`, both as real processes over real sockets: delivery to
//! maildirs over verified STARTTLS and implicit TLS, the exit codes, and the faults (provider
//! killed mid-session, customer killed before its 250, delivery target down).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    listening_port, output_text, password_for, queue_entry, run_bounded, tcp_relay, SmtpClient,
    TestServer,
};

/// Bound for one `turnpike pull` run.
const PULL_TIMEOUT: Duration = Duration::from_secs(60);

fn hold(server: &TestServer, to: &[&str], body: &str) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.send_mail("sender@client.test", to, body);
    c.cmd("QUIT", 221);
}

/// A scratch directory inside the server's data directory (removed with it).
fn scratch(server: &TestServer, name: &str) -> PathBuf {
    let dir = server.data_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_secret(dir: &Path, account: &str) -> PathBuf {
    let path = dir.join("secret");
    std::fs::write(&path, format!("{}\n", password_for(account))).unwrap();
    path
}

/// A pull config for `account` toward `address` over STARTTLS with the provider's
/// self-signed certificate as trust anchor; `extra` is appended (more sections).
fn pull_config(
    server: &TestServer,
    dir: &Path,
    address: SocketAddr,
    account: &str,
    extra: &str,
) -> PathBuf {
    let config = format!(
        r#"
[provider]
address = "{address}"
tls = "starttls"
server_name = "localhost"
ca = "{ca}"

[account]
name = "{account}"
password_file = "{secret}"

[session]
hostname = "gw.office.test"
idle_timeout = "10s"
{extra}
"#,
        ca = server.data_dir().join("tls/cert.pem").display(),
        secret = write_secret(dir, account).display(),
    );
    let path = dir.join("pull.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn pull(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(common::turnpike_bin());
    cmd.arg("pull").args(args);
    run_bounded(&mut cmd, None, PULL_TIMEOUT)
}

fn pull_config_file(config: &Path) -> std::process::Output {
    pull(&["--config", config.to_str().unwrap()])
}

#[track_caller]
fn assert_exit(out: &std::process::Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "turnpike pull exit status\n{}",
        output_text(out)
    );
}

/// Every file in `maildir/new`, as bytes.
fn maildir_messages(maildir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(maildir.join("new")) else {
        return Vec::new();
    };
    let mut out: Vec<Vec<u8>> = entries
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    out.sort();
    out
}

fn files_in(dir: &Path, prefix: &str) -> Vec<Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn held(server: &TestServer, domain: &str) -> u64 {
    queue_entry(&server.queue_json(), domain).map_or(0, |(m, _)| m)
}

/// Waits (bounded) until the provider holds `want` messages for `domain`.
#[track_caller]
fn wait_held(server: &TestServer, domain: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = held(server, domain);
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "provider holds {n} messages for {domain}, expected {want}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

const BODY_ONE: &str = "Subject: one\r\nX-Test: 1\r\n\r\nfirst line\r\n.leading dot\r\n\r\n";
const BODY_TWO: &str = "Subject: two\r\n\r\nfor two recipients\r\n\u{e9}t\u{e9} 8-bit\r\n";

#[test]
fn maildir_end_to_end_over_verified_starttls_one_file_per_recipient() {
    let server = TestServer::start("", &[("office", &["office.test"])]);
    hold(&server, &["alice@office.test"], BODY_ONE);
    hold(&server, &["alice@office.test", "bob@office.test"], BODY_TWO);
    wait_held(&server, "office.test", 2);

    let dir = scratch(&server, "customer");
    let alice = dir.join("alice");
    let bob = dir.join("bob");
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        "office",
        &format!(
            "[schedule]\nevery = \"1s\"\n\
             [delivery.recipients]\n\"alice@office.test\" = {{ maildir = \"{}\" }}\n\
             \"bob@office.test\" = {{ maildir = \"{}\" }}\n",
            alice.display(),
            bob.display()
        ),
    );
    // One session, although the file has a schedule: only --every makes a daemon.
    let out = pull_config_file(&config);
    assert_exit(&out, 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("received 2 messages"),
        "{}",
        output_text(&out)
    );

    let alice_got = maildir_messages(&alice);
    let bob_got = maildir_messages(&bob);
    assert_eq!(alice_got.len(), 2, "alice: one file per message");
    assert_eq!(bob_got.len(), 1, "bob: his own file of the shared message");
    let with_one = alice_got
        .iter()
        .find(|m| m.ends_with(BODY_ONE.as_bytes()))
        .expect("alice's first message, byte-identical body");
    assert!(alice_got.iter().any(|m| m.ends_with(BODY_TWO.as_bytes())));
    assert!(bob_got[0].ends_with(BODY_TWO.as_bytes()));
    // Our Received: names the provider's address and us; the provider's own follows it.
    let text = String::from_utf8_lossy(with_one);
    assert!(
        text.contains("Received: from mx.test ([127.0.0.1])\r\n\tby gw.office.test"),
        "{text}"
    );
    assert!(
        text.contains("with ESMTPS"),
        "TLS kept across the turnaround: {text}"
    );
    assert!(
        text.contains("Delivered-To: alice@office.test\r\n"),
        "{text}"
    );
    assert_eq!(
        held(&server, "office.test"),
        0,
        "nothing left at the provider"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mechanism=\"SCRAM-SHA-256\""),
        "auto picked SCRAM: {}",
        output_text(&out)
    );

    // The next run finds nothing: exit code 10, in plain words.
    let out = pull_config_file(&config);
    assert_exit(&out, 10);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no mail is held for us (453"),
        "{}",
        output_text(&out)
    );
}

#[test]
fn first_run_flags_deliver_into_a_maildir_over_implicit_tls() {
    let server = TestServer::start(
        "[listen]\nodmrs = [\"127.0.0.1:0\"]\n",
        &[("office", &["office.test"])],
    );
    hold(&server, &["carol@office.test"], BODY_ONE);
    wait_held(&server, "office.test", 1);
    let dir = scratch(&server, "customer");
    let maildir = dir.join("Maildir");
    let out = pull(&[
        "--provider",
        &server.addr("odmrs").to_string(),
        "--account",
        "office",
        "--password-file",
        write_secret(&dir, "office").to_str().unwrap(),
        "--tls",
        "implicit",
        "--ca",
        server.data_dir().join("tls/cert.pem").to_str().unwrap(),
        "--server-name",
        "localhost",
        "--maildir",
        maildir.to_str().unwrap(),
        "--domain",
        "office.test",
    ]);
    assert_exit(&out, 0);
    let got = maildir_messages(&maildir);
    assert_eq!(got.len(), 1);
    assert!(got[0].ends_with(BODY_ONE.as_bytes()));
    assert_eq!(held(&server, "office.test"), 0);
}

#[test]
fn exit_codes_for_refusals_and_failures() {
    let server = TestServer::start(
        "",
        &[("office", &["office.test"]), ("other", &["other.test"])],
    );
    hold(&server, &["x@office.test"], BODY_ONE);
    wait_held(&server, "office.test", 1);
    let dir = scratch(&server, "customer");
    let maildir = format!(
        "[delivery]\ncatch_all = {{ maildir = \"{}\" }}\n",
        dir.join("Maildir").display()
    );
    let odmr = server.addr("odmr");

    // 450: a domain that is not the account's; nothing is delivered, not even its own.
    let config = pull_config(
        &server,
        &dir,
        odmr,
        "office",
        &format!("domains = [\"office.test\", \"other.test\"]\n{maildir}"),
    );
    let out = pull_config_file(&config);
    assert_exit(&out, 11);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not this account's"));
    assert_eq!(held(&server, "office.test"), 1);

    // 20: wrong password.
    let config = pull_config(&server, &dir, odmr, "office", &maildir);
    std::fs::write(dir.join("secret"), "wrong password\n").unwrap();
    let out = pull_config_file(&config);
    assert_exit(&out, 20);

    // 31: the certificate does not carry the name we check.
    let config = pull_config(&server, &dir, odmr, "office", &maildir);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "server_name = \"localhost\"",
            "server_name = \"elsewhere.test\"",
        ),
    )
    .unwrap();
    let out = pull_config_file(&config);
    assert_exit(&out, 31);

    // 30: nobody listens there.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = pull_config(&server, &dir, closed, "office", &maildir);
    let out = pull_config_file(&config);
    assert_exit(&out, 30);
    assert!(String::from_utf8_lossy(&out.stderr).contains("provider unreachable"));

    // 2: configuration errors name the file and the key.
    let config = pull_config(
        &server,
        &dir,
        odmr,
        "office",
        &format!("atrn_timeout = \"1m\"\n{maildir}"),
    );
    let out = pull_config_file(&config);
    assert_exit(&out, 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: session.atrn_timeout:", config.display())),
        "{err}"
    );
    let out = pull(&["--provider", "mx.example:366", "--tls", "none"]);
    assert_exit(&out, 2);

    // Nothing was taken by any of these.
    assert_eq!(held(&server, "office.test"), 1);
}

/// A scripted provider: answers ATRN with `atrn_reply` after a successful AUTH PLAIN.
fn scripted_provider(atrn_reply: &'static str) -> (SocketAddr, thread::JoinHandle<Vec<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut heard = Vec::new();
        writer.write_all(b"220 fake.test ESMTP\r\n").unwrap();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return heard;
            }
            let line = line.trim_end().to_string();
            let reply: &[u8] = match line.split(' ').next().unwrap_or("") {
                "EHLO" => b"250-fake.test\r\n250-AUTH PLAIN\r\n250 ATRN\r\n",
                "AUTH" => b"235 2.7.0 ok\r\n",
                "ATRN" => atrn_reply.as_bytes(),
                "QUIT" => b"221 bye\r\n",
                _ => b"500 what\r\n",
            };
            heard.push(line);
            writer.write_all(reply).unwrap();
        }
    });
    (addr, handle)
}

#[test]
fn atrn_530_and_502_have_their_own_exit_codes() {
    for (reply, code, words) in [
        (
            "530 5.7.0 Authentication required\r\n",
            14,
            "not authenticated",
        ),
        ("502 5.5.1 Not here\r\n", 13, "not available on this port"),
        ("451 4.3.0 Busy\r\n", 12, "cannot serve ATRN now"),
    ] {
        let (addr, provider) = scripted_provider(reply);
        let dir = std::env::temp_dir().join(format!(
            "turnpike-pull-scripted-{}-{code}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), "pw\n").unwrap();
        let out = pull(&[
            "--provider",
            &addr.to_string(),
            "--account",
            "office",
            "--password-file",
            dir.join("secret").to_str().unwrap(),
            "--tls",
            "none",
            "--mechanism",
            "plain",
            "--maildir",
            dir.join("Maildir").to_str().unwrap(),
        ]);
        let heard = provider.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_exit(&out, code);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(words),
            "{}",
            output_text(&out)
        );
        assert_eq!(heard.get(2).map(String::as_str), Some("ATRN"), "{heard:?}");
        assert_eq!(heard.last().map(String::as_str), Some("QUIT"), "{heard:?}");
    }
}

#[test]
fn target_down_gives_the_provider_a_4xx_and_the_message_stays_held() {
    let server = TestServer::start("", &[("office", &["office.test"])]);
    hold(&server, &["x@office.test"], BODY_ONE);
    wait_held(&server, "office.test", 1);
    let dir = scratch(&server, "customer");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        "office",
        &format!("[delivery]\ntimeout = \"5s\"\ncatch_all = {{ smtp = \"{closed}\" }}\n"),
    );
    let out = pull_config_file(&config);
    assert_exit(&out, 40);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still held at the provider"),
        "{}",
        output_text(&out)
    );
    wait_held(&server, "office.test", 1);

    // Once the target is back (a maildir here), the message arrives.
    let maildir = dir.join("Maildir");
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        "office",
        &format!(
            "[delivery]\ncatch_all = {{ maildir = \"{}\" }}\n",
            maildir.display()
        ),
    );
    assert_exit(&pull_config_file(&config), 0);
    assert_eq!(maildir_messages(&maildir).len(), 1);
    assert_eq!(held(&server, "office.test"), 0);
}

/// Kills a process group we started (the customer and its MDA children).
fn kill_group(child: &mut Child) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; the group is our own child's.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.wait();
}

fn spawn_pull(args: &[&str], log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(log).unwrap();
    Command::new(common::turnpike_bin())
        .arg("pull")
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Kills the customer's process group on drop, so a failing test leaves nothing behind.
struct Customer(Child);

impl Drop for Customer {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            kill_group(&mut self.0);
        }
    }
}

#[track_caller]
fn wait_for(what: &str, timeout: Duration, log: &Path, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\ncustomer log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn customer_killed_before_its_250_gets_the_message_again_next_session() {
    let server = TestServer::start(
        "[limits]\nidle_timeout = \"60s\"\n",
        &[("office", &["office.test"])],
    );
    hold(&server, &["x@office.test"], BODY_ONE);
    wait_held(&server, "office.test", 1);
    let dir = scratch(&server, "customer");
    // A slow MDA: it announces itself, then sits on the message; the customer's 250 waits.
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        "office",
        r#"[delivery]
catch_all = { mda = ["/bin/sh", "-c", "touch \"$0/started\"; sleep 60; cat > \"$0/delivered\"", "DIR"] }
"#
        .replace("DIR", dir.to_str().unwrap())
        .as_str(),
    );
    let log = dir.join("pull.log");
    let mut customer = Customer(spawn_pull(&["--config", config.to_str().unwrap()], &log));
    wait_for("the MDA to start", Duration::from_secs(20), &log, || {
        dir.join("started").exists()
    });
    kill_group(&mut customer.0);
    assert!(!dir.join("delivered").exists());
    // The provider never got a 250: the message is still held.
    wait_held(&server, "office.test", 1);

    let maildir = dir.join("Maildir");
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        "office",
        &format!(
            "[delivery]\ncatch_all = {{ maildir = \"{}\" }}\n",
            maildir.display()
        ),
    );
    assert_exit(&pull_config_file(&config), 0);
    let got = maildir_messages(&maildir);
    assert_eq!(got.len(), 1, "the message came again, once");
    assert!(got[0].ends_with(BODY_ONE.as_bytes()));
    assert_eq!(held(&server, "office.test"), 0);
}

#[test]
fn daemon_retries_after_the_provider_is_killed_mid_session_and_nothing_is_lost() {
    let mut server = TestServer::start("", &[("office", &["office.test"])]);
    let bodies: Vec<String> = (1..=4)
        .map(|i| format!("Subject: m{i}\r\n\r\nbody number {i}\r\n"))
        .collect();
    for b in &bodies {
        hold(&server, &["x@office.test"], b);
    }
    wait_held(&server, "office.test", 4);
    let target = Arc::new(Mutex::new(Some(server.addr("odmr"))));
    let front = tcp_relay(target.clone());

    let dir = scratch(&server, "customer");
    let out_dir = scratch(&server, "delivered");
    // Each delivery takes a second, so the provider can be killed while messages remain.
    let config = pull_config(
        &server,
        &dir,
        front,
        "office",
        r#"[schedule]
every = "1s"
[delivery]
catch_all = { mda = ["/bin/sh", "-c", "sleep 1; cat > \"$0/msg.$$\"", "DIR"] }
"#
        .replace("DIR", out_dir.to_str().unwrap())
        .as_str(),
    );
    let log = dir.join("pull.log");
    let mut customer = Customer(spawn_pull(
        &["--config", config.to_str().unwrap(), "--every"],
        &log,
    ));
    wait_for("the first delivery", Duration::from_secs(20), &log, || {
        !files_in(&out_dir, "msg.").is_empty()
    });
    server.kill9();
    thread::sleep(Duration::from_millis(1500));
    server.restart();
    *target.lock().unwrap() = Some(server.addr("odmr"));

    wait_for(
        "every message to be delivered",
        Duration::from_secs(45),
        &log,
        || {
            let got = files_in(&out_dir, "msg.");
            bodies
                .iter()
                .all(|b| got.iter().any(|m| m.ends_with(b.as_bytes())))
        },
    );
    wait_held(&server, "office.test", 0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("session failed"),
        "the kill was noticed:\n{text}"
    );

    // SIGTERM stops the daemon cleanly (exit 0).
    let pid = libc::pid_t::try_from(customer.0.id()).unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = customer.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn pinned_certificate_is_accepted_whatever_its_name_and_a_wrong_pin_is_a_tls_failure() {
    use sha2::{Digest, Sha256};
    let server = TestServer::start("", &[("office", &["office.test"])]);
    let pem = std::fs::read(server.data_dir().join("tls/cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    let pin: Vec<String> = Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    let dir = scratch(&server, "customer");
    let write = |pin: &str| {
        let config = pull_config(
            &server,
            &dir,
            server.addr("odmr"),
            "office",
            &format!(
                "[delivery]\ncatch_all = {{ maildir = \"{}\" }}\n",
                dir.join("Maildir").display()
            ),
        );
        let text = std::fs::read_to_string(&config).unwrap();
        let ca_line = text.lines().find(|l| l.starts_with("ca = ")).unwrap();
        let text = text
            .replace(ca_line, &format!("pin_sha256 = \"{pin}\""))
            .replace(
                "server_name = \"localhost\"",
                "server_name = \"elsewhere.test\"",
            );
        std::fs::write(&config, text).unwrap();
        config
    };
    // Right pin: verified (nothing held, so 10), although the name does not match.
    assert_exit(&pull_config_file(&write(&pin.join(":"))), 10);
    let mut wrong = pin.clone();
    wrong[0] = if wrong[0] == "00" {
        "01".into()
    } else {
        "00".into()
    };
    let out = pull_config_file(&write(&wrong.join(":")));
    assert_exit(&out, 31);
    assert!(!server.logs().contains("authentication failed"));
}

#[test]
fn daemon_backs_off_while_the_provider_is_unreachable_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("turnpike-pull-backoff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), "pw\n").unwrap();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let log = dir.join("pull.log");
    let mut customer = Customer(spawn_pull(
        &[
            "--provider",
            &closed.to_string(),
            "--account",
            "office",
            "--password-file",
            dir.join("secret").to_str().unwrap(),
            "--tls",
            "none",
            "--maildir",
            dir.join("Maildir").to_str().unwrap(),
            "--every",
            "1s",
        ],
        &log,
    ));
    // Attempts at about 0 s, 2 s (1 s doubled) and 6 s (then 4 s): three within 7.5 s.
    // Without backoff there would be seven or eight.
    thread::sleep(Duration::from_millis(7500));
    let pid = libc::pid_t::try_from(customer.0.id()).unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = customer.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "daemon ignored SIGTERM");
        thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status.code(), Some(0), "{text}");
    let attempts = text.matches("session failed: provider unreachable").count();
    assert!((2..=4).contains(&attempts), "{attempts} attempts:\n{text}");
    assert!(text.contains("failures=2"), "{text}");
    assert!(text.contains("exit=30"), "{text}");
}

#[test]
fn push_session_keeps_delivering_while_the_provider_lingers() {
    let server = TestServer::start(
        "[odmr]\nlinger_max = \"3s\"\nlinger_keepalive = \"1s\"\n",
        &[("office", &["office.test"])],
    );
    let out = server.cli(&["account", "linger", "office", "on"], None);
    assert!(out.status.success(), "{}", output_text(&out));
    // The reload reaches the cores over the mesh; give it a moment.
    thread::sleep(Duration::from_millis(500));
    hold(&server, &["early@office.test"], BODY_ONE);
    wait_held(&server, "office.test", 1);
    let dir = scratch(&server, "customer");
    let maildir = dir.join("Maildir");
    let config = pull_config(
        &server,
        &dir,
        server.addr("odmr"),
        "office",
        &format!(
            "[delivery]\ncatch_all = {{ maildir = \"{}\" }}\n",
            maildir.display()
        ),
    );
    let log = dir.join("pull.log");
    let started = Instant::now();
    let mut customer = Customer(spawn_pull(&["--config", config.to_str().unwrap()], &log));
    wait_for("the held message", Duration::from_secs(10), &log, || {
        maildir_messages(&maildir).len() == 1
    });
    // Mail that arrives during the session is pushed at once.
    let held_at = Instant::now();
    hold(&server, &["late@office.test"], BODY_TWO);
    wait_for("the pushed message", Duration::from_secs(3), &log, || {
        maildir_messages(&maildir).len() == 2
    });
    let pushed_after = held_at.elapsed();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = customer.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "session did not end at linger_max"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let lasted = started.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(pushed_after < Duration::from_secs(2), "{pushed_after:?}");
    assert!(
        lasted >= Duration::from_millis(2500),
        "ended early: {lasted:?}\n{text}"
    );
    assert!(maildir_messages(&maildir)
        .iter()
        .any(|m| m.ends_with(BODY_TWO.as_bytes())));
    assert_eq!(held(&server, "office.test"), 0);
}

/// Postfix's smtp-sink on 127.0.0.1:0 (`-L`: as an LMTP server), dumping each transaction
/// into `dump/`; killed on drop.
struct SmtpSink {
    child: Child,
    port: u16,
    dump: PathBuf,
}

impl SmtpSink {
    fn start(lmtp: bool) -> SmtpSink {
        use std::os::unix::fs::PermissionsExt;
        // Outside the provider's data directory (kept 0700): smtp-sink writes as nobody.
        let dump = std::env::temp_dir().join(format!(
            "turnpike-sink-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dump).unwrap();
        // smtp-sink drops root privileges to nobody, who must be able to write the dumps.
        std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut cmd = Command::new(common::find_program("smtp-sink").unwrap());
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        if lmtp {
            cmd.arg("-L");
        }
        let child = cmd
            .arg("-d")
            .arg(format!("{}/msg.", dump.display()))
            .args(["127.0.0.1:0", "16"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink");
        let mut sink = SmtpSink {
            child,
            port: 0,
            dump,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.port == 0 {
            assert!(Instant::now() < deadline, "smtp-sink did not listen");
            thread::sleep(Duration::from_millis(20));
            sink.port = listening_port(sink.child.id()).unwrap_or(0);
        }
        sink
    }

    fn dumps(&self) -> Vec<String> {
        std::fs::read_dir(&self.dump)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dump);
    }
}

#[test]
fn smtp_and_lmtp_targets_through_turnpike_pull_with_postfix_smtp_sink() {
    if !common::require_program("smtp-sink") {
        return;
    }
    let server = TestServer::start("", &[("office", &["office.test"])]);
    for (n, lmtp) in [false, true].into_iter().enumerate() {
        let dir = scratch(&server, &format!("customer-{n}"));
        let sink = SmtpSink::start(lmtp);
        let body = format!(
            "Subject: via {}\r\n\r\nline one\r\n",
            if lmtp { "LMTP" } else { "SMTP" }
        );
        hold(&server, &["dave@office.test", "erin@office.test"], &body);
        wait_held(&server, "office.test", 1);
        let kind = if lmtp { "lmtp" } else { "smtp" };
        let config = pull_config(
            &server,
            &dir,
            server.addr("odmr"),
            "office",
            &format!(
                "[delivery]\ntimeout = \"20s\"\ncatch_all = {{ {kind} = \"127.0.0.1:{}\" }}\n",
                sink.port
            ),
        );
        assert_exit(&pull_config_file(&config), 0);
        assert_eq!(held(&server, "office.test"), 0, "{kind}");
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() != 1 {
            assert!(Instant::now() < deadline, "{kind}: no dump: {got:?}");
            thread::sleep(Duration::from_millis(20));
            got = sink.dumps();
        }
        let dump = &got[0];
        // One transaction carrying both recipients; our Received: names the provider.
        assert!(dump.contains("X-Rcpt-Args: <dave@office.test>\n"), "{dump}");
        assert!(dump.contains("X-Rcpt-Args: <erin@office.test>\n"), "{dump}");
        assert!(
            dump.contains("Received: from mx.test ([127.0.0.1])\n\tby gw.office.test"),
            "{dump}"
        );
        // smtp-sink writes LF line ends and an empty line after each message.
        let body_lf = body.replace("\r\n", "\n");
        assert!(dump.ends_with(&format!("{body_lf}\n")), "{kind}: {dump}");
    }
}
