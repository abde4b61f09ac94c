//! The customer's delivery targets against real programs: maildirs on disk, an MDA script,
//! Dovecot's LMTP server, Postfix's smtp-sink (SMTP and LMTP), and targets that are down.
//!
//! Each test drives a [`Deliverer`] through its [`Sink`] interface, exactly as the customer
//! session does after ATRN, and asserts what the target ended up holding and which reply
//! the provider would have been sent. The runtime is the one the customer runs on
//! (`TURNPIKE_TEST_IO=epoll` selects epoll; otherwise io_uring where the kernel allows it).

mod common;

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{find_program, listening_port, require_program};
use turnpike::customer::deliver::{Deliverer, DeliveryConfig};
use turnpike::customer::session::Sink;
use turnpike::proto::inbound::Incoming;
use turnpike::proto::reply::Reply;
use turnpike::runtime::io::{block_on, IoKind};
use turnpike::types::{Envelope, Mailbox, Recipient};

const PROVIDER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn io_kind() -> IoKind {
    match common::io_driver().as_deref() {
        Some("epoll") => IoKind::Epoll,
        _ => IoKind::detect().unwrap_or(IoKind::Epoll),
    }
}

/// Delivers `message` on a fresh runtime of the customer's kind.
fn deliver(d: &mut Deliverer, message: Incoming) -> Result<(), Reply> {
    block_on(io_kind(), d.deliver(message)).expect("runtime")
}

fn mailbox(s: &str) -> Mailbox {
    let (local, domain) = s.split_once('@').unwrap();
    Mailbox {
        local: local.into(),
        domain: domain.into(),
    }
}

fn message(sender: &str, rcpts: &[&str], body: &[u8]) -> Incoming {
    Incoming {
        envelope: Envelope {
            sender: (!sender.is_empty()).then(|| mailbox(sender)),
            recipients: rcpts
                .iter()
                .map(|r| Recipient {
                    mailbox: mailbox(r),
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            ..Envelope::default()
        },
        body: body.to_vec(),
        helo: "provider.test".into(),
        protocol: "ESMTPS",
        account: None,
    }
}

/// A held message as the provider sends it: its own Received: line first, CRLF throughout,
/// a line that needs dot-stuffing on the wire.
fn held_body(tag: &str) -> Vec<u8> {
    format!(
        "Received: from sender.example ([198.51.100.1])\r\n\tby mx.provider.test with ESMTP id \
         {tag};\r\n\tTue, 14 Nov 2023 22:13:20 +0000\r\nFrom: <s@sender.example>\r\nSubject: \
         {tag}\r\n\r\nfirst line\r\n.leading dot\r\n\r\nlast line\r\n"
    )
    .into_bytes()
}

fn deliverer(toml_text: &str) -> Deliverer {
    let cfg: DeliveryConfig = toml::from_str(toml_text).expect("delivery config");
    let mut d = Deliverer::from_config(&cfg).expect("from_config");
    d.set_session("customer.test", PROVIDER);
    d
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "turnpike-deliver-{name}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The regular files in `dir`, sorted by name.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// What our Received: line must say: the provider's EHLO name and address, our name.
fn assert_our_received(text: &str) {
    assert!(
        text.contains(
            "Received: from provider.test ([192.0.2.7])\r\n\tby customer.test with ESMTPS id "
        ),
        "no Received: naming the provider:\n{text}"
    );
}

/// A child process stopped (SIGTERM, then SIGKILL) and reaped on drop.
struct Daemon {
    child: Child,
    name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `ready` holds.
fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn maildir_holds_one_byte_identical_file_per_recipient() {
    let tmp = TempDir::new("maildir");
    let mut d = deliverer(&format!(
        r#"
        catch_all = {{ maildir = "{t}/all" }}
        [recipients]
        "alice@example.com" = {{ maildir = "{t}/alice" }}
        "#,
        t = tmp.path().display()
    ));
    let body = held_body("m1");
    let got = deliver(
        &mut d,
        message(
            "s@sender.example",
            &["alice@example.com", "bob@example.com", "carol@example.com"],
            &body,
        ),
    );
    assert_eq!(got, Ok(()));

    let alice = files(&tmp.path().join("alice/new"));
    let all = files(&tmp.path().join("all/new"));
    assert_eq!((alice.len(), all.len()), (1, 2), "one file per recipient");
    assert!(files(&tmp.path().join("alice/tmp")).is_empty());
    for (path, rcpt) in [
        (&alice[0], "alice@example.com"),
        (&all[0], ""),
        (&all[1], ""),
    ] {
        let bytes = fs::read(path).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("Return-Path: <s@sender.example>\r\nDelivered-To: "));
        if !rcpt.is_empty() {
            assert!(text.contains(&format!("Delivered-To: {rcpt}\r\n")));
            assert!(text.contains(&format!("\tfor <{rcpt}>;")));
        }
        assert_our_received(&text);
        assert!(
            bytes.ends_with(&body),
            "the held body must follow our header fields byte for byte"
        );
        // Our three fields and then exactly the body: nothing else was added or changed.
        let ours = text.find("Received: from sender.example").unwrap();
        assert_eq!(bytes.len() - ours, body.len());
    }
    let bob_and_carol: Vec<String> = all
        .iter()
        .map(|p| {
            let t = fs::read_to_string(p).unwrap();
            t.lines().nth(1).unwrap().to_string()
        })
        .collect();
    assert!(bob_and_carol.contains(&"Delivered-To: bob@example.com".to_string()));
    assert!(bob_and_carol.contains(&"Delivered-To: carol@example.com".to_string()));

    // A message that already went through this recipient's delivery is a loop.
    let looped = fs::read(&alice[0]).unwrap();
    let r = deliver(
        &mut d,
        message("s@sender.example", &["alice@example.com"], &looped),
    )
    .unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (554, "5.4.6".into())
    );
    assert_eq!(files(&tmp.path().join("alice/new")).len(), 1);
}

#[test]
fn unrouted_recipients_are_refused_and_mixed_permanent_outcomes_say_so() {
    let tmp = TempDir::new("unrouted");
    let mut d = deliverer(&format!(
        "[recipients]\n\"alice@example.com\" = {{ maildir = \"{}/alice\" }}\n",
        tmp.path().display()
    ));
    let r = deliver(&mut d, message("", &["zed@example.com"], &held_body("u1"))).unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (550, "5.1.1".into())
    );

    let r = deliver(
        &mut d,
        message(
            "",
            &["alice@example.com", "zed@example.com"],
            &held_body("u2"),
        ),
    )
    .unwrap_err();
    assert!(r.is_permanent(), "{r:?}");
    assert!(r.lines[0].contains("<zed@example.com>"), "{r:?}");
    assert!(
        r.lines[0].contains("delivered to <alice@example.com>"),
        "{r:?}"
    );
    let got = files(&tmp.path().join("alice/new"));
    assert_eq!(got.len(), 1);
    assert!(fs::read_to_string(&got[0])
        .unwrap()
        .starts_with("Return-Path: <>\r\n"));
}

/// An MDA that stores stdin as `<dir>/<recipient>.<pid>` and its arguments next to it;
/// local part `temp` fails with EX_TEMPFAIL until `<dir>/fixed` exists, `nouser` with
/// EX_NOUSER.
const MDA_SCRIPT: &str = r#"#!/bin/sh
dir="$1"
case "$LOCAL" in
  temp) [ -e "$dir/fixed" ] || { echo "mailbox locked by another process" >&2; exit 75; } ;;
  nouser) echo "no such user here" >&2; exit 67 ;;
esac
cat > "$dir/$RECIPIENT.$$" || exit 74
printf '%s|%s|%s|%s\n' "$2" "$3" "$SENDER" "$DOMAIN" > "$dir/$RECIPIENT.$$.args"
env | cut -d= -f1 | sort | tr '\n' ' ' > "$dir/$RECIPIENT.$$.env"
exit 0
"#;

#[test]
fn mda_exit_codes_map_to_replies_and_the_ledger_prevents_duplicates() {
    let tmp = TempDir::new("mda");
    let script = tmp.path().join("mda.sh");
    fs::write(&script, MDA_SCRIPT).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let mut d = deliverer(&format!(
        r#"
        catch_all = {{ mda = ["/bin/sh", "{script}", "{out}", "{{recipient}}", "{{sender}}"] }}
        ledger = "{ledger}"
        timeout = "20s"
        "#,
        script = script.display(),
        out = out.display(),
        ledger = tmp.path().join("ledger").display(),
    ));
    let delivered = |rcpt: &str| {
        files(&out)
            .iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(&format!("{rcpt}."))
                    && !name.ends_with(".args")
                    && !name.ends_with(".env")
            })
            .count()
    };

    // Exit 0: delivered; stdin is our header fields plus the body; envelope in args and env.
    let body = held_body("mda1");
    assert_eq!(
        deliver(
            &mut d,
            message("s@sender.example", &["ok@example.com"], &body)
        ),
        Ok(())
    );
    let stored: Vec<PathBuf> = files(&out)
        .into_iter()
        .filter(|p| {
            let p = p.to_string_lossy();
            !p.ends_with(".args") && !p.ends_with(".env")
        })
        .collect();
    let text = fs::read_to_string(&stored[0]).unwrap();
    assert!(text.starts_with("Return-Path: <s@sender.example>\r\nDelivered-To: ok@example.com\r\n"));
    assert_our_received(&text);
    assert!(text.as_bytes().ends_with(&body));
    let args = fs::read_to_string(format!("{}.args", stored[0].display())).unwrap();
    assert_eq!(
        args,
        "ok@example.com|s@sender.example|s@sender.example|example.com\n"
    );
    // Nothing of the customer's own environment (it may hold the provider password) but a
    // few harmless variables; sh adds PWD (and maybe SHLVL) itself.
    let env = fs::read_to_string(format!("{}.env", stored[0].display())).unwrap();
    let allowed = [
        "PATH",
        "HOME",
        "TZ",
        "LANG",
        "LC_ALL",
        "LOGNAME",
        "SENDER",
        "RECIPIENT",
        "LOCAL",
        "DOMAIN",
        "PWD",
        "SHLVL",
        "OLDPWD",
        "_",
    ];
    for name in env.split_whitespace() {
        assert!(
            allowed.contains(&name),
            "MDA saw {name} from our environment: {env}"
        );
    }
    assert!(env.contains("RECIPIENT") && env.contains("PATH"), "{env}");

    // Exit 67 alone: the MDA's 5xx, with its own words.
    let r = deliver(
        &mut d,
        message("s@sender.example", &["nouser@example.com"], &body),
    )
    .unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (550, "5.1.1".into())
    );
    assert!(r.lines[0].contains("no such user here"), "{r:?}");

    // Exit 75 with a success beside it: 4xx (the provider keeps it), the success recorded.
    let body2 = held_body("mda2");
    let mixed = message(
        "s@sender.example",
        &["ok2@example.com", "temp@example.com"],
        &body2,
    );
    let r = deliver(&mut d, mixed.clone()).unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (451, "4.3.0".into())
    );
    assert!(r.lines[0].contains("<temp@example.com>"), "{r:?}");
    assert!(
        r.lines[0].contains("delivered to <ok2@example.com>"),
        "{r:?}"
    );
    assert_eq!(
        (delivered("ok2@example.com"), delivered("temp@example.com")),
        (1, 0)
    );

    // The provider retries the same message; still locked: no second copy for ok2.
    assert!(deliver(&mut d, mixed.clone()).unwrap_err().is_transient());
    assert_eq!(delivered("ok2@example.com"), 1);

    // The lock is gone; the retry (in a new session, a new Deliverer) completes it.
    fs::write(out.join("fixed"), b"").unwrap();
    drop(d);
    let mut d = deliverer(&format!(
        r#"
        catch_all = {{ mda = ["/bin/sh", "{script}", "{out}", "{{recipient}}", "{{sender}}"] }}
        ledger = "{ledger}"
        "#,
        script = script.display(),
        out = out.display(),
        ledger = tmp.path().join("ledger").display(),
    ));
    assert_eq!(deliver(&mut d, mixed), Ok(()));
    assert_eq!(
        (delivered("ok2@example.com"), delivered("temp@example.com")),
        (1, 1)
    );
}

#[test]
fn mda_that_hangs_is_killed_and_answered_4xx() {
    let tmp = TempDir::new("mda-hang");
    let mut d = deliverer(
        r#"
        catch_all = { mda = ["/bin/sleep", "30"] }
        timeout = "1s"
        "#,
    );
    let started = Instant::now();
    let r = deliver(&mut d, message("", &["a@example.com"], &held_body("h"))).unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (451, "4.4.2".into())
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tmp);
}

/// A Dovecot instance of the test's own: its config, sockets, users file and maildirs in a
/// temporary directory, LMTP on a unix socket, no system daemon involved.
struct Dovecot {
    _daemon: Daemon,
    dir: PathBuf,
}

impl Dovecot {
    /// Users: `alice` (no quota) and `bob` (quota of `bob_quota` bytes); nobody else exists.
    fn start(dir: &Path, bob_quota: u64) -> Dovecot {
        let (uid, gid) = if unsafe { libc::geteuid() } == 0 {
            ("nobody".to_string(), "nogroup".to_string())
        } else {
            (
                unsafe { libc::geteuid() }.to_string(),
                unsafe { libc::getegid() }.to_string(),
            )
        };
        let d = dir.display();
        fs::create_dir_all(dir.join("mail")).unwrap();
        // Mail is written as `uid`; let it into the tree.
        Command::new("chmod")
            .args(["0777", &dir.join("mail").to_string_lossy()])
            .status()
            .unwrap();
        Dovecot::write_users(dir, bob_quota);
        let conf = format!(
            r#"
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = turnpike-test-{pid}
protocols = lmtp
ssl = no
listen = 127.0.0.1
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 1
auth_username_format = %Ln
mail_plugins = quota
quota_full_tempfail = yes
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"#,
            pid = std::process::id()
        );
        fs::write(dir.join("dovecot.conf"), conf).unwrap();
        let child = Command::new(find_program("dovecot").unwrap())
            .args(["-F", "-c"])
            .arg(dir.join("dovecot.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dovecot");
        let daemon = Daemon {
            child,
            name: "dovecot",
        };
        let socket = dir.join("run/lmtp");
        wait_for("dovecot's LMTP socket", Duration::from_secs(15), || {
            socket.exists()
        });
        Dovecot {
            _daemon: daemon,
            dir: dir.to_path_buf(),
        }
    }

    fn write_users(dir: &Path, bob_quota: u64) {
        let d = dir.display();
        let users = format!(
            "alice:::::{d}/mail/alice::\nbob:::::{d}/mail/bob::userdb_quota_rule=*:bytes={bob_quota}\n"
        );
        // Dovecot re-reads a passwd-file whose mtime changed; write a new file and rename.
        let tmp = dir.join("users.new");
        fs::File::create(&tmp)
            .unwrap()
            .write_all(users.as_bytes())
            .unwrap();
        fs::rename(&tmp, dir.join("users")).unwrap();
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/lmtp")
    }

    fn inbox(&self, user: &str) -> Vec<PathBuf> {
        files(&self.dir.join(format!("mail/{user}/Maildir/new")))
    }
}

#[test]
fn lmtp_to_dovecot_maps_each_recipient_reply_back() {
    if !require_program("dovecot") {
        return;
    }
    let tmp = TempDir::new("dovecot");
    let dovecot = Dovecot::start(&tmp.path().join("dovecot"), 10);
    let cfg = format!(
        r#"
        ledger = "{ledger}"
        timeout = "30s"
        [recipients]
        "@example.com" = {{ lmtp = "unix:{socket}" }}
        "#,
        ledger = tmp.path().join("ledger").display(),
        socket = dovecot.socket().display(),
    );
    let mut d = deliverer(&cfg);

    // alice: saved; bob: over quota after DATA (452 4.2.2, per recipient); carol: no such
    // user at RCPT (550 5.1.1). The provider must hear a 4xx and keep the message.
    let body = held_body("lmtp1");
    let msg = message(
        "s@sender.example",
        &["alice@example.com", "bob@example.com", "carol@example.com"],
        &body,
    );
    let r = deliver(&mut d, msg).unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (451, "4.2.2".into()),
        "{r:?}"
    );
    assert!(r.lines[0].contains("<bob@example.com>"), "{r:?}");
    assert!(
        r.lines[0].contains("delivered to <alice@example.com>"),
        "{r:?}"
    );
    assert_eq!(dovecot.inbox("alice").len(), 1);
    assert!(dovecot.inbox("bob").is_empty());

    let saved = fs::read_to_string(&dovecot.inbox("alice")[0]).unwrap();
    let saved = saved.replace("\r\n", "\n"); // Dovecot stores LF line ends
    assert!(saved.contains(
        "Received: from provider.test ([192.0.2.7])\n\tby customer.test with ESMTPS id "
    ));
    let body_lf = String::from_utf8(body.clone())
        .unwrap()
        .replace("\r\n", "\n");
    assert!(saved.ends_with(&body_lf), "{saved}");
    assert!(
        saved.contains("\n.leading dot\n"),
        "dot-stuffing undone by the server"
    );

    // bob gets room; the provider retries (carol was refused at RCPT by then, so it sends
    // alice and bob): alice is in the ledger and is not given a second copy.
    Dovecot::write_users(&tmp.path().join("dovecot"), 1_000_000);
    std::thread::sleep(Duration::from_millis(1100)); // passwd-file change needs a new mtime second
    Dovecot::write_users(&tmp.path().join("dovecot"), 1_000_000);
    let retry = message(
        "s@sender.example",
        &["alice@example.com", "bob@example.com"],
        &body,
    );
    assert_eq!(deliver(&mut d, retry), Ok(()));
    assert_eq!(dovecot.inbox("alice").len(), 1, "no duplicate for alice");
    assert_eq!(dovecot.inbox("bob").len(), 1);

    // A new message for both, in one LMTP transaction.
    let both = message(
        "",
        &["alice@example.com", "bob@example.com"],
        &held_body("lmtp2"),
    );
    assert_eq!(deliver(&mut d, both), Ok(()));
    assert_eq!(
        (dovecot.inbox("alice").len(), dovecot.inbox("bob").len()),
        (2, 2)
    );
    let log = fs::read_to_string(tmp.path().join("dovecot/dovecot.log")).unwrap_or_default();
    assert!(log.contains("saved mail to INBOX"), "{log}");
}

/// Postfix's smtp-sink on 127.0.0.1:0, dumping each transaction into `dump/`.
fn smtp_sink(dir: &Path, lmtp: bool) -> (Daemon, u16) {
    smtp_sink_with(dir, lmtp, &[])
}

/// [`smtp_sink`] with extra options (fault injection: `-q`, `-r`, `-Q`).
fn smtp_sink_with(dir: &Path, lmtp: bool, extra: &[&str]) -> (Daemon, u16) {
    let dump = dir.join("dump");
    fs::create_dir_all(&dump).unwrap();
    Command::new("chmod")
        .args(["0777", &dump.to_string_lossy()])
        .status()
        .unwrap();
    let mut cmd = Command::new(find_program("smtp-sink").unwrap());
    if unsafe { libc::geteuid() } == 0 {
        cmd.args(["-u", "nobody"]);
    }
    if lmtp {
        cmd.arg("-L");
    }
    let child = cmd
        .args(extra)
        .arg("-d")
        .arg(format!("{}/msg.", dump.display()))
        .args(["127.0.0.1:0", "16"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start smtp-sink");
    let pid = child.id();
    let daemon = Daemon {
        child,
        name: "smtp-sink",
    };
    let mut port = None;
    wait_for("smtp-sink to listen", Duration::from_secs(10), || {
        port = listening_port(pid);
        port.is_some()
    });
    (daemon, port.unwrap())
}

fn dumps(dir: &Path) -> Vec<String> {
    files(&dir.join("dump"))
        .iter()
        .map(|p| fs::read_to_string(p).unwrap())
        .collect()
}

#[test]
fn smtp_to_postfix_smtp_sink_carries_envelope_and_body() {
    if !require_program("smtp-sink") {
        return;
    }
    let tmp = TempDir::new("smtp-sink");
    let (_sink, port) = smtp_sink(tmp.path(), false);
    let mut d = deliverer(&format!(
        "catch_all = {{ smtp = \"127.0.0.1:{port}\" }}\ntimeout = \"20s\"\n"
    ));
    let body = held_body("smtp1");
    let msg = message(
        "s@sender.example",
        &["alice@example.com", "bob@example.org"],
        &body,
    );
    assert_eq!(deliver(&mut d, msg), Ok(()));
    let mut got = Vec::new();
    wait_for("smtp-sink's dump file", Duration::from_secs(5), || {
        got = dumps(tmp.path());
        got.len() == 1 && got[0].ends_with("last line\n\n")
    });
    let dump = &got[0];
    assert!(dump.contains("X-Helo-Args: customer.test\n"), "{dump}");
    assert!(dump.contains("X-Mail-Args: <s@sender.example>"), "{dump}");
    assert!(
        dump.contains("X-Rcpt-Args: <alice@example.com>\n"),
        "{dump}"
    );
    assert!(dump.contains("X-Rcpt-Args: <bob@example.org>\n"), "{dump}");
    // smtp-sink writes LF line ends; our Received: (no `for`: two recipients) then the body.
    let ours = dump
        .find("Received: from provider.test ([192.0.2.7])\n\tby customer.test with ESMTPS id ")
        .expect("our Received: line");
    let body_lf = String::from_utf8(body).unwrap().replace("\r\n", "\n");
    let after_ours = &dump[ours..];
    let held_at = after_ours.find("Received: from sender.example").unwrap();
    assert!(!after_ours[..held_at].contains("\tfor <"));
    // smtp-sink ends each dumped message with an empty line of its own.
    assert_eq!(
        &after_ours[held_at..],
        format!("{body_lf}\n"),
        "body arrives unchanged"
    );
}

#[test]
fn lmtp_over_tcp_to_smtp_sink() {
    if !require_program("smtp-sink") {
        return;
    }
    let tmp = TempDir::new("lmtp-sink");
    let (_sink, port) = smtp_sink(tmp.path(), true);
    let mut d = deliverer(&format!("catch_all = {{ lmtp = \"127.0.0.1:{port}\" }}\n"));
    let msg = message("", &["a@example.com", "b@example.com"], &held_body("l"));
    assert_eq!(deliver(&mut d, msg), Ok(()));
    wait_for("smtp-sink's dump file", Duration::from_secs(5), || {
        let got = dumps(tmp.path());
        got.len() == 1
            && got[0].contains("X-Rcpt-Args: <b@example.com>")
            && got[0].ends_with("last line\n\n")
    });
}

#[test]
fn targets_that_are_down_answer_4xx_so_the_provider_keeps_the_mail() {
    let tmp = TempDir::new("down");
    // A TCP port nobody listens on: bind port 0, note it, close it.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // A listener that accepts (the kernel does) but never greets.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let mda = tmp.path().join("mda-gone.sh");
    fs::write(&mda, "#!/bin/sh\nexit 0\n").unwrap();
    Command::new("chmod")
        .args(["0755", &mda.to_string_lossy()])
        .status()
        .unwrap();
    let mut d = deliverer(&format!(
        r#"
        timeout = "2s"
        [recipients]
        "smtp@example.com" = {{ smtp = "127.0.0.1:{closed}" }}
        "lmtp@example.com" = {{ lmtp = "unix:{t}/no-such-socket" }}
        "silent@example.com" = {{ lmtp = "127.0.0.1:{silent_port}" }}
        "mda@example.com" = {{ mda = ["{mda}"] }}
        "#,
        t = tmp.path().display(),
        mda = mda.display(),
    ));
    fs::remove_file(&mda).unwrap(); // configured, then uninstalled
    for (rcpt, status) in [
        ("smtp@example.com", "4.4.1"),
        ("lmtp@example.com", "4.4.1"),
        ("silent@example.com", "4.4.2"),
        ("mda@example.com", "4.3.0"),
    ] {
        let r = deliver(&mut d, message("", &[rcpt], &held_body("down"))).unwrap_err();
        assert_eq!(r.code / 100, 4, "{rcpt}: {r:?}");
        assert_eq!(r.status.unwrap().to_string(), status, "{rcpt}: {r:?}");
    }
    drop(silent);
}

#[test]
fn smtp_server_faults_are_temporary_for_every_open_recipient() {
    if !require_program("smtp-sink") {
        return;
    }
    let rcpts = ["a@example.com", "b@example.com"];
    // The connection drops after our end of data, before the reply: the server may or may
    // not have the message, so the provider must keep it (a duplicate beats a loss).
    let tmp = TempDir::new("sink-drop");
    let (_sink, port) = smtp_sink_with(tmp.path(), false, &["-q", "."]);
    let mut d = deliverer(&format!("catch_all = {{ smtp = \"127.0.0.1:{port}\" }}\n"));
    let r = deliver(&mut d, message("", &rcpts, &held_body("q"))).unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (451, "4.4.1".into()),
        "{r:?}"
    );

    // RCPT refused with a 4xx by the server: that reply, per recipient, no DATA.
    let tmp = TempDir::new("sink-rcpt");
    let (_sink, port) = smtp_sink_with(tmp.path(), true, &["-r", "RCPT"]);
    let mut d = deliverer(&format!("catch_all = {{ lmtp = \"127.0.0.1:{port}\" }}\n"));
    let r = deliver(&mut d, message("", &rcpts, &held_body("r"))).unwrap_err();
    assert!(r.is_transient(), "{r:?}");
    assert!(r.lines[0].starts_with("<a@example.com>: "), "{r:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(dumps(tmp.path())
        .iter()
        .all(|m| !m.contains("Received: from provider.test")));

    // 421 and disconnect at MAIL: the server's trouble, temporary for all.
    let tmp = TempDir::new("sink-421");
    let (_sink, port) = smtp_sink_with(tmp.path(), false, &["-Q", "MAIL"]);
    let mut d = deliverer(&format!("catch_all = {{ smtp = \"127.0.0.1:{port}\" }}\n"));
    let r = deliver(&mut d, message("", &rcpts, &held_body("m"))).unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (451, "4.4.1".into()),
        "{r:?}"
    );
    assert!(r.lines[0].contains("MAIL: 421"), "{r:?}");
}

#[test]
fn a_maildir_that_cannot_be_written_answers_4xx_and_leaves_no_debris() {
    let tmp = TempDir::new("broken-maildir");
    let mut d = deliverer(&format!(
        "catch_all = {{ maildir = \"{}/box\" }}\n",
        tmp.path().display()
    ));
    // Broken after start-up: new/ is no longer a directory (root ignores permissions, so
    // a mode change would not do).
    fs::remove_dir(tmp.path().join("box/new")).unwrap();
    fs::write(tmp.path().join("box/new"), b"not a directory").unwrap();
    let r = deliver(&mut d, message("", &["a@example.com"], &held_body("b"))).unwrap_err();
    assert_eq!(
        (r.code, r.status.unwrap().to_string()),
        (451, "4.3.0".into()),
        "{r:?}"
    );
    assert!(
        files(&tmp.path().join("box/tmp")).is_empty(),
        "tmp/ file removed"
    );
}
