//! Interop with Debian's fetchmail as the ODMR customer (RFC 2645).
//!
//! Mail for a customer domain is held through the MX; then fetchmail, in ODMR mode, connects
//! to `turnpike serve`'s ODMR listener, authenticates with CRAM-MD5 (the only mechanism its
//! ODMR mode has), sends `ATRN <domain>` and, after the 250, becomes a byte pipe between
//! turnpike (now the SMTP client) and its `smtphost`. That smtphost is [`Sink`], an SMTP
//! server written here: std sockets, one thread, bounded timeouts, and it records every
//! envelope and every body exactly as the wire carried it (DATA unstuffed, BDAT taken
//! verbatim). A Rust sink rather than Postfix's smtp-sink: it checks CRLF on every line,
//! records the envelope parameters, and needs no root/`-u nobody` dance.
//!
//! What must hold: the sink gets every held message once, byte-identical to what turnpike
//! stored (its `Received:` field followed by the body exactly as sent to the MX), with the
//! same envelope, and afterwards nothing is held for the domain.
//!
//! fetchmail's ODMR mode has no STARTTLS (its `--sslproto` STARTTLS upgrade exists for POP3
//! and IMAP only); its only TLS path is `--ssl`, TLS on connect to the `odmrs` service. Both
//! paths must work against the zero-config server, started here with no configuration file
//! at all: CRAM-MD5 without TLS (it never sends the password, and RFC 2645 makes it a MUST),
//! and `odmrs` on 127.0.0.1:3367 with the generated certificate. A configured server with
//! `cram_md5_requires_tls` still serves fetchmail over `odmrs`.
//!
//! Skips visibly without fetchmail, fails under `CI=true` (`tests/support/install-mail-clients.sh`
//! installs it).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::{
    find_program, output_text, password_for, queue_entry, require_program, run_bounded, SmtpClient,
    TestServer,
};

/// The customer's domain, its account, and a second customer whose mail must stay held.
const DOMAIN: &str = "odmr-fetch.test";
const ACCOUNT: &str = "fetchcust";
const OTHER_DOMAIN: &str = "other-cust.test";
const OTHER_ACCOUNT: &str = "othercust";

/// fetchmail's whole run: connect, AUTH, ATRN, the relayed session, exit.
const FETCHMAIL_TIMEOUT: Duration = Duration::from_secs(120);
/// fetchmail's own per-read server timeout (`timeout` in the rc file).
const FETCHMAIL_READ_TIMEOUT_SECS: u32 = 60;
/// Read/write timeout of the sink's sockets.
const SINK_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the queue may take to show the delivered mail as gone.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the server under test is set up.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// No configuration file: every default, fixed loopback ports.
    ZeroConfig,
    /// `[odmr] cram_md5_requires_tls = true` and an `odmrs` listener on a free port.
    CramOnlyInsideTls,
}

// ---------------------------------------------------------------------------------------------
// The held messages
// ---------------------------------------------------------------------------------------------

/// One message sent to the MX: envelope, MAIL parameters and the body exactly as meant (CRLF
/// lines, not dot-stuffed; [`hold`] stuffs it on the wire).
struct Held {
    /// Envelope sender; empty for the null sender `<>`. Unique per message: it is the key.
    sender: &'static str,
    recipients: Vec<String>,
    /// Appended to `MAIL FROM:<...>`, e.g. ` BODY=8BITMIME`.
    mail_params: &'static str,
    body: Vec<u8>,
}

impl Held {
    /// The recipients of [`DOMAIN`], sorted: what the customer must get.
    fn customer_recipients(&self) -> Vec<String> {
        let mut r: Vec<String> = self
            .recipients
            .iter()
            .filter(|r| r.ends_with(&format!("@{DOMAIN}")))
            .cloned()
            .collect();
        r.sort();
        r
    }
}

fn headers(n: usize, from: &str, to: &[String], extra: &str) -> String {
    let from = if from.is_empty() {
        "MAILER-DAEMON@sender.test"
    } else {
        from
    };
    format!(
        "From: <{from}>\r\nTo: {}\r\nSubject: fetchmail interop {n}\r\n\
         Message-Id: <fetchmail-{n}@sender.test>\r\n{extra}\r\n",
        to.iter()
            .map(|t| format!("<{t}>"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn rcpt(local: &str, domain: &str) -> String {
    format!("{local}@{domain}")
}

/// Six shapes: plain text; lines starting with '.' (and a body ending in a lone "."); 8-bit
/// (UTF-8 and a raw Latin-1 byte) with BODY=8BITMIME; ~300 KB; two customer recipients plus
/// one of another customer; the null sender.
fn held_messages() -> Vec<Held> {
    let mut out = Vec::new();

    let to = vec![rcpt("alice", DOMAIN)];
    let mut body = headers(1, "plain@sender.test", &to, "").into_bytes();
    body.extend_from_slice(b"Hello,\r\n\r\nthis is a plain text message.\r\n");
    out.push(Held {
        sender: "plain@sender.test",
        recipients: to,
        mail_params: "",
        body,
    });

    let to = vec![rcpt("bob", DOMAIN)];
    let mut body = headers(2, "dots@sender.test", &to, "").into_bytes();
    body.extend_from_slice(
        b".a line starting with a dot\r\n..two dots\r\n.\r\nthe line above is a lone dot\r\n\
          ...\r\n. space after a dot\r\n.\r\n",
    );
    out.push(Held {
        sender: "dots@sender.test",
        recipients: to,
        mail_params: "",
        body,
    });

    let to = vec![rcpt("carol", DOMAIN)];
    let mut body = headers(
        3,
        "eightbit@sender.test",
        &to,
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n",
    )
    .into_bytes();
    body.extend_from_slice("Grüße aus Köln, ½ € — ünïcödé ✓\r\n".as_bytes());
    body.extend_from_slice(b"a raw Latin-1 byte: caf\xe9\r\n");
    body.extend_from_slice(b"high bytes: \x80\x9f\xa0\xff\r\n");
    out.push(Held {
        sender: "eightbit@sender.test",
        recipients: to,
        mail_params: " BODY=8BITMIME",
        body,
    });

    let to = vec![rcpt("dave", DOMAIN)];
    let mut body = headers(4, "big@sender.test", &to, "").into_bytes();
    let mut line = 0;
    while body.len() < 300 * 1024 {
        body.extend_from_slice(
            format!("{line:06} the quick brown fox jumps over the lazy dog, again and again.\r\n")
                .as_bytes(),
        );
        if line % 997 == 0 {
            body.extend_from_slice(b".a stuffed line inside the big body\r\n");
        }
        line += 1;
    }
    out.push(Held {
        sender: "big@sender.test",
        recipients: to,
        mail_params: "",
        body,
    });

    let to = vec![
        rcpt("erin", DOMAIN),
        rcpt("frank", DOMAIN),
        rcpt("grace", OTHER_DOMAIN),
    ];
    let mut body = headers(5, "multi@sender.test", &to, "").into_bytes();
    body.extend_from_slice(b"one copy for erin and frank; grace's domain is not asked for.\r\n");
    out.push(Held {
        sender: "multi@sender.test",
        recipients: to,
        mail_params: "",
        body,
    });

    let to = vec![rcpt("alice", DOMAIN)];
    let mut body = headers(6, "", &to, "").into_bytes();
    body.extend_from_slice(b"a notice with the null sender.\r\n");
    out.push(Held {
        sender: "",
        recipients: to,
        mail_params: "",
        body,
    });

    out
}

/// Dot-stuffs `body` (CRLF lines, ending in CRLF) and appends the end-of-data mark.
fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 8);
    for line in body.split_inclusive(|b| *b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Sends every message to the MX on one session; each must get its 250.
fn hold(server: &TestServer, messages: &[Held]) {
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO sender.test", 250);
    for m in messages {
        c.cmd(&format!("MAIL FROM:<{}>{}", m.sender, m.mail_params), 250);
        for r in &m.recipients {
            c.cmd(&format!("RCPT TO:<{r}>"), 250);
        }
        c.cmd("DATA", 354);
        c.send_bytes(&dot_stuff(&m.body));
        c.expect(250);
    }
    c.cmd("QUIT", 221);
}

// ---------------------------------------------------------------------------------------------
// The SMTP sink behind fetchmail
// ---------------------------------------------------------------------------------------------

/// One message as the sink received it.
#[derive(Debug)]
struct Delivered {
    /// The address inside `MAIL FROM:<...>` (empty for `<>`).
    sender: String,
    /// What followed the address on the MAIL line (`SIZE=...`, `BODY=...`).
    mail_params: Vec<String>,
    /// The addresses of the RCPT commands, in order.
    recipients: Vec<String>,
    /// The content: DATA unstuffed without its end mark, or the BDAT chunks joined.
    body: Vec<u8>,
    /// "DATA" or "BDAT".
    framing: &'static str,
}

#[derive(Debug, Default)]
struct SinkLog {
    sessions: usize,
    messages: Vec<Delivered>,
    /// Commands received and reply codes sent (no message content), for failure messages.
    transcript: String,
    /// Protocol violations seen (bare LF, commands out of order, ...).
    errors: Vec<String>,
}

/// A minimal ESMTP server on 127.0.0.1:0. Offers PIPELINING, 8BITMIME, SIZE and, if asked,
/// CHUNKING. Serves connections one at a time on its own thread until [`Sink::finish`].
struct Sink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<SinkLog>>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start(chunking: bool) -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind sink");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("sink addr");
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(SinkLog::default()));
        let thread = {
            let (stop, log) = (stop.clone(), log.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            log.lock().unwrap().sessions += 1;
                            if let Err(e) = serve_sink(stream, chunking, &log) {
                                log.lock().unwrap().errors.push(format!("session: {e}"));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => {
                            log.lock().unwrap().errors.push(format!("accept: {e}"));
                            return;
                        }
                    }
                }
            })
        };
        Sink {
            addr,
            stop,
            log,
            thread: Some(thread),
        }
    }

    /// Stops accepting, waits for the thread (a session in progress ends at the latest after
    /// [`SINK_IO_TIMEOUT`] of silence) and returns what was received.
    fn finish(mut self) -> SinkLog {
        self.stop_thread();
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// Current transaction of a sink session.
#[derive(Default)]
struct Txn {
    sender: Option<(String, Vec<String>)>,
    recipients: Vec<String>,
    bdat: Vec<u8>,
}

fn serve_sink(stream: TcpStream, chunking: bool, log: &Mutex<SinkLog>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SINK_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SINK_IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let note = |s: String| log.lock().unwrap().transcript.push_str(&s);
    let error = |s: String| log.lock().unwrap().errors.push(s);
    let mut reply = |text: &str| -> io::Result<()> {
        note(format!("S: {}\n", text.trim_end().replace("\r\n", "\n   ")));
        writer.write_all(text.as_bytes())
    };

    reply("220 sink.test ESMTP fetchmail interop sink\r\n")?;
    let mut txn = Txn::default();
    loop {
        let mut raw = Vec::new();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            error("connection closed without QUIT".into());
            return Ok(());
        }
        let Some(line) = raw.strip_suffix(b"\r\n") else {
            error(format!(
                "command line without CRLF: {:?}",
                String::from_utf8_lossy(&raw)
            ));
            return Ok(());
        };
        let line = String::from_utf8_lossy(line).into_owned();
        note(format!("C: {line}\n"));
        let verb = line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                txn = Txn::default();
                let chunk = if chunking { "250-CHUNKING\r\n" } else { "" };
                reply(&format!(
                    "250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 52428800\r\n\
                     {chunk}250 ENHANCEDSTATUSCODES\r\n"
                ))?;
            }
            "HELO" => {
                txn = Txn::default();
                reply("250 sink.test\r\n")?;
            }
            "MAIL" => match parse_path(&line, "MAIL FROM:") {
                Some(parsed) if txn.sender.is_none() => {
                    txn.sender = Some(parsed);
                    reply("250 2.1.0 ok\r\n")?;
                }
                _ => {
                    error(format!("bad or out-of-order {line:?}"));
                    reply("503 5.5.1 bad MAIL\r\n")?;
                }
            },
            "RCPT" => match parse_path(&line, "RCPT TO:") {
                Some((addr, _)) if txn.sender.is_some() => {
                    txn.recipients.push(addr);
                    reply("250 2.1.5 ok\r\n")?;
                }
                _ => {
                    error(format!("bad or out-of-order {line:?}"));
                    reply("503 5.5.1 bad RCPT\r\n")?;
                }
            },
            "DATA" => {
                if txn.sender.is_none() || txn.recipients.is_empty() || !txn.bdat.is_empty() {
                    error(format!("DATA out of order: {line:?}"));
                    reply("503 5.5.1 no valid recipients\r\n")?;
                    continue;
                }
                reply("354 go ahead\r\n")?;
                let body = read_data(&mut reader, &error)?;
                note(format!("   <{} content bytes>\n", body.len()));
                deliver(log, &mut txn, body, "DATA");
                reply("250 2.0.0 queued\r\n")?;
            }
            "BDAT" => {
                let mut args = line.split(' ').skip(1);
                let size = args.next().and_then(|s| s.parse::<usize>().ok());
                let last = args.next().is_some_and(|a| a.eq_ignore_ascii_case("LAST"));
                let Some(size) = size else {
                    error(format!("bad {line:?}"));
                    reply("501 5.5.4 bad BDAT\r\n")?;
                    continue;
                };
                let mut chunk = vec![0u8; size];
                reader.read_exact(&mut chunk)?;
                if !chunking || txn.sender.is_none() || txn.recipients.is_empty() {
                    error(format!("BDAT out of order or not offered: {line:?}"));
                    reply("503 5.5.1 bad BDAT\r\n")?;
                    continue;
                }
                txn.bdat.extend_from_slice(&chunk);
                if last {
                    let body = std::mem::take(&mut txn.bdat);
                    deliver(log, &mut txn, body, "BDAT");
                }
                reply(&format!("250 2.0.0 {size} octets\r\n"))?;
            }
            "RSET" => {
                txn = Txn::default();
                reply("250 2.0.0 ok\r\n")?;
            }
            "NOOP" => reply("250 2.0.0 ok\r\n")?,
            "QUIT" => {
                reply("221 2.0.0 bye\r\n")?;
                return Ok(());
            }
            _ => {
                error(format!("unexpected command {line:?}"));
                reply("502 5.5.1 not implemented\r\n")?;
            }
        }
    }
}

/// `MAIL FROM:<addr> params` / `RCPT TO:<addr> params` -> (addr, params).
fn parse_path(line: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let head = line.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = line[prefix.len()..].strip_prefix('<')?;
    let end = rest.find('>')?;
    let params = rest[end + 1..]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    Some((rest[..end].to_string(), params))
}

/// Reads DATA content up to the `.` line, unstuffing; every line must end in CRLF.
fn read_data(reader: &mut impl BufRead, error: &impl Fn(String)) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut bare_lf_reported = false;
    loop {
        let mut raw = Vec::new();
        if reader.read_until(b'\n', &mut raw)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside DATA",
            ));
        }
        if raw == b".\r\n" {
            return Ok(body);
        }
        if !raw.ends_with(b"\r\n") && !bare_lf_reported {
            bare_lf_reported = true;
            error(format!(
                "DATA line without CRLF at content offset {}: {:?}",
                body.len(),
                String::from_utf8_lossy(&raw)
            ));
        }
        let line = raw.strip_prefix(b".").unwrap_or(&raw);
        body.extend_from_slice(line);
    }
}

fn deliver(log: &Mutex<SinkLog>, txn: &mut Txn, body: Vec<u8>, framing: &'static str) {
    let done = std::mem::take(txn);
    let (sender, mail_params) = done.sender.expect("checked by the caller");
    log.lock().unwrap().messages.push(Delivered {
        sender,
        mail_params,
        recipients: done.recipients,
        body,
        framing,
    });
}

// ---------------------------------------------------------------------------------------------
// fetchmail
// ---------------------------------------------------------------------------------------------

/// The rc file for one ODMR poll of `odmr` as [`ACCOUNT`], relaying to `sink`; with `tls`,
/// implicit TLS verifying the provider's certificate (`cert`) for the name `localhost`.
fn fetchmail_rc(odmr: SocketAddr, sink: SocketAddr, tls: Option<&Path>) -> String {
    let ssl = match tls {
        Some(cert) => format!(
            "\x20   ssl sslcertck sslcommonname \"localhost\" sslcertfile \"{}\"\n",
            cert.display()
        ),
        None => String::new(),
    };
    let poll = format!(
        "# written by tests/fetchmail.rs\n\
         poll {ip} protocol ODMR service {port} timeout {timeout}\n\
         \x20   user \"{ACCOUNT}\" password \"{password}\"\n\
         \x20   fetchdomains {DOMAIN}\n\
         \x20   smtphost \"{sink_ip}/{sink_port}\"\n",
        ip = odmr.ip(),
        port = odmr.port(),
        timeout = FETCHMAIL_READ_TIMEOUT_SECS,
        password = password_for(ACCOUNT),
        sink_ip = sink.ip(),
        sink_port = sink.port(),
    );
    poll + &ssl
}

/// Runs fetchmail once in the foreground with its own home (rc file 0600, pid file, id file
/// all inside `home`), bounded by [`FETCHMAIL_TIMEOUT`]. Returns the rc text and the output.
fn run_fetchmail(
    home: &Path,
    odmr: SocketAddr,
    sink: SocketAddr,
    tls: Option<&Path>,
) -> (String, Output) {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(home)
        .expect("create fetchmail home");
    let rc_path = home.join("fetchmailrc");
    let rc = fetchmail_rc(odmr, sink, tls);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&rc_path)
        .and_then(|mut f| f.write_all(rc.as_bytes()))
        .expect("write fetchmailrc");
    let mut cmd = Command::new(find_program("fetchmail").expect("fetchmail"));
    cmd.env("HOME", home)
        .env("FETCHMAILHOME", home)
        .env("LC_ALL", "C")
        .args(["--nodetach", "--nosyslog", "--verbose"])
        .arg("--fetchmailrc")
        .arg(&rc_path)
        .arg("--pidfile")
        .arg(home.join("fetchmail.pid"));
    let out = run_bounded(&mut cmd, None, FETCHMAIL_TIMEOUT);
    (rc, out)
}

/// `text`, cut in the middle if longer than `max` bytes (fetchmail -v logs whole BDAT
/// bodies, which would drown a failure message).
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut head = max / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - max / 2;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}\n[... {} bytes cut ...]\n{}",
        &text[..head],
        tail - head,
        &text[tail..]
    )
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// Holds the messages, runs fetchmail (over implicit TLS with `tls`) against a sink that does
/// (or does not) offer CHUNKING, and checks what arrived and what is left.
fn fetchmail_relays_held_mail(setup: Setup, chunking: bool, tls: bool) {
    if !require_program("fetchmail") {
        return;
    }
    let accounts: &[(&str, &[&str])] = &[(ACCOUNT, &[DOMAIN]), (OTHER_ACCOUNT, &[OTHER_DOMAIN])];
    let server = match setup {
        Setup::ZeroConfig => TestServer::start_zero_config(accounts),
        Setup::CramOnlyInsideTls => TestServer::start(
            "[listen]\nodmrs = [\"127.0.0.1:0\"]\n[odmr]\ncram_md5_requires_tls = true\n",
            accounts,
        ),
    };
    if setup == Setup::ZeroConfig {
        assert_eq!(server.addr("odmr").port(), 3366, "zero-config ODMR port");
        assert_eq!(server.addr("odmrs").port(), 3367, "zero-config odmrs port");
    }
    // Our Received: line names the server's host name: the test's in the configured setup,
    // the machine's (as the MX greets with it) at zero-config.
    let hostname = match setup {
        Setup::ZeroConfig => {
            let mut mx = SmtpClient::connect(server.addr("mx"));
            let banner = mx.expect(220);
            banner
                .split_whitespace()
                .next()
                .expect("host name in the banner")
                .to_string()
        }
        Setup::CramOnlyInsideTls => "mx.test".to_string(),
    };
    let messages = held_messages();
    hold(&server, &messages);

    // What turnpike stored, per sender: the size of each held body (Received: + original).
    let show = server.queue_show_json(DOMAIN);
    let stored: BTreeMap<String, u64> = show["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| {
            (
                m["sender"].as_str().expect("sender").to_string(),
                m["size"].as_u64().expect("size"),
            )
        })
        .collect();
    assert_eq!(stored.len(), messages.len(), "all held: {show}");

    let sink = Sink::start(chunking);
    let home = server.data_dir().join("fetchmail-home");
    let cert = server.data_dir().join("tls/cert.pem");
    let (rc, out) = match tls {
        true => run_fetchmail(&home, server.addr("odmrs"), sink.addr, Some(&cert)),
        false => run_fetchmail(&home, server.addr("odmr"), sink.addr, None),
    };
    let log = sink.finish();

    let context = || {
        format!(
            "fetchmail {}\nrc file:\n{rc}\n{}\n---- sink transcript ----\n{}\nsink errors: {:?}",
            out.status,
            clip(&output_text(&out), 16 * 1024),
            clip(&log.transcript, 16 * 1024),
            log.errors
        )
    };
    assert!(out.status.success(), "{}", context());
    assert!(log.errors.is_empty(), "{}", context());
    assert_eq!(log.sessions, 1, "{}", context());
    assert_eq!(log.messages.len(), messages.len(), "{}", context());

    let framing = if chunking { "BDAT" } else { "DATA" };
    for m in &messages {
        let got: Vec<&Delivered> = log
            .messages
            .iter()
            .filter(|d| d.sender == m.sender)
            .collect();
        assert_eq!(got.len(), 1, "sender <{}>: {}", m.sender, context());
        let d = got[0];
        let mut rcpts = d.recipients.clone();
        rcpts.sort();
        assert_eq!(rcpts, m.customer_recipients(), "<{}>: {d:?}", m.sender);
        assert_eq!(d.framing, framing, "<{}>", m.sender);
        if m.mail_params.contains("BODY=8BITMIME") {
            assert!(
                d.mail_params.iter().any(|p| p == "BODY=8BITMIME"),
                "8-bit message relayed without BODY=8BITMIME: {:?}",
                d.mail_params
            );
        }
        // Byte-identical to the stored body: same length as held, the original body as the
        // tail, and exactly one Received: field (turnpike's) in front of it.
        assert_eq!(
            d.body.len() as u64,
            stored[m.sender],
            "<{}>: relayed size differs from the held size",
            m.sender
        );
        assert!(
            d.body.ends_with(&m.body),
            "<{}>: relayed body does not end with the original ({} vs {} bytes); first \
             difference from the end at {:?}",
            m.sender,
            d.body.len(),
            m.body.len(),
            d.body
                .iter()
                .rev()
                .zip(m.body.iter().rev())
                .position(|(a, b)| a != b)
        );
        let prefix = String::from_utf8_lossy(&d.body[..d.body.len() - m.body.len()]);
        assert!(
            prefix.starts_with("Received: ") && prefix.ends_with("\r\n"),
            "<{}>: prefix {prefix:?}",
            m.sender
        );
        let mut lines = prefix.split_terminator("\r\n");
        lines.next();
        assert!(
            lines.all(|l| l.starts_with([' ', '\t'])),
            "<{}>: more than one field added: {prefix:?}",
            m.sender
        );
        assert!(prefix.contains(&format!("by {hostname}")), "{prefix:?}");
    }

    // Delivered mail is no longer held; the other customer's copy still is.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let queue = loop {
        let queue = server.queue_json();
        let left = queue_entry(&queue, DOMAIN).map_or(0, |(n, _)| n);
        if left == 0 || Instant::now() >= deadline {
            break queue;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        queue_entry(&queue, DOMAIN).map_or(0, |(n, _)| n),
        0,
        "still held after the relay: {queue}\n{}",
        context()
    );
    assert_eq!(
        queue_entry(&queue, OTHER_DOMAIN).map(|(n, _)| n),
        Some(1),
        "{queue}"
    );
}

/// fetchmail `proto ODMR` (CRAM-MD5, no TLS) against the server with no configuration file.
#[test]
fn fetchmail_odmr_at_zero_config_relays_held_mail_over_data() {
    fetchmail_relays_held_mail(Setup::ZeroConfig, false, false);
}

#[test]
fn fetchmail_odmr_at_zero_config_relays_held_mail_over_bdat() {
    fetchmail_relays_held_mail(Setup::ZeroConfig, true, false);
}

/// fetchmail `ssl` with certificate checking against the zero-config `odmrs` listener
/// (127.0.0.1:3367) and the certificate the server generated on first run.
#[test]
fn fetchmail_odmrs_at_zero_config_checks_our_certificate() {
    fetchmail_relays_held_mail(Setup::ZeroConfig, true, true);
}

/// With `cram_md5_requires_tls`, fetchmail still gets its mail over `odmrs`.
#[test]
fn fetchmail_odmrs_when_cram_md5_requires_tls() {
    fetchmail_relays_held_mail(Setup::CramOnlyInsideTls, false, true);
}
