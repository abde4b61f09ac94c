//! The outgoing relay end to end: the outbound queue delivered to a smarthost (Postfix's
//! smtp-sink), to an MX found through a DNS server this test runs on 127.0.0.1, retries after
//! the destination comes up, reports for permanent refusals, `turnpike queue retry/bounce`, and
//! SIGKILL while delivering.
//!
//! The smarthost test takes the customer's path: swaks submits on the submission port. The
//! others create outbound mail by appending it to the stopped server's journal through the
//! spool API, which gives them any sender (a foreign one, to see reports relayed) and several
//! messages at once without AUTH round trips: a message to a domain that is not hosted is
//! exactly what the relay must deliver, however it arrived.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{queue_entry, require_program, TestServer};
use turnpike::spool::{recover, IoKind, JournalConfig, JournalHandle};
use turnpike::types::{Envelope, Mailbox, MessageId, Recipient};

const ACME: (&str, &[&str]) = ("acme", &["acme.example"]);

// ---- outbound mail -------------------------------------------------------------------------

fn mailbox(a: &str) -> Mailbox {
    let (l, d) = a.split_once('@').expect("address");
    Mailbox {
        local: l.into(),
        domain: d.into(),
    }
}

/// Stops the server, appends each `(sender, recipients, body)` to journal core-0 as received
/// mail, and starts it again. Returns the message ids.
fn seed(server: &mut TestServer, msgs: &[(&str, &[&str], &[u8])]) -> Vec<MessageId> {
    server.stop();
    let dir = server.data_dir().to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ids = tokio::task::LocalSet::new().block_on(&rt, async {
        let mut rec = recover(&dir).unwrap();
        let j = JournalHandle::open(JournalConfig::new(&dir, 0, IoKind::Epoll), rec.take_dir(0))
            .await
            .unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).unwrap();
        let mut ids = Vec::new();
        for (n, (from, to, body)) in msgs.iter().enumerate() {
            let env = Envelope {
                sender: Some(mailbox(from)),
                recipients: to
                    .iter()
                    .map(|r| Recipient {
                        mailbox: mailbox(r),
                        notify: None,
                        orcpt: None,
                    })
                    .collect(),
                ..Envelope::default()
            };
            let id = MessageId::new(
                now.as_millis() as u64,
                0,
                (u64::from_le_bytes(seed) >> 20) + n as u64,
            );
            j.append_message(id, now.as_secs(), &env, body)
                .await
                .unwrap();
            ids.push(id);
        }
        j.close().await;
        ids
    });
    server.restart();
    ids
}

fn wait_until(what: &str, secs: u64, server: &TestServer, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; queue: {}",
            server.queue_json()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn outbound_row(server: &TestServer, dest: &str) -> Option<serde_json::Value> {
    let q = server.queue_json();
    q["outbound"]
        .as_array()?
        .iter()
        .find(|r| r["destination"] == dest)
        .cloned()
}

/// The body as sent, minus a `Received:` line in front (mail received over SMTP carries ours;
/// the seeded mail here has none).
fn without_our_trace(body: &[u8]) -> &[u8] {
    if !body.starts_with(b"Received: ") {
        return body;
    }
    let mut at = 0;
    // The Received: field and its folded continuation lines.
    loop {
        let nl = at + body[at..].windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        at = nl;
        if !matches!(body.get(at), Some(b' ' | b'\t')) {
            return &body[at..];
        }
    }
}

// ---- a scripted SMTP sink ------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Got {
    from: String,
    rcpts: Vec<String>,
    /// The message as the client meant it (dot-unstuffed, CRLF kept).
    body: Vec<u8>,
}

type Policy = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// An SMTP server on `listener`: ESMTP with PIPELINING and 8BITMIME, RCPT answered by `policy`,
/// every accepted message recorded. `before_250` runs after a body arrived (it may block).
struct Sink {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
}

impl Sink {
    fn start(
        listener: TcpListener,
        policy: Policy,
        before_250: Arc<dyn Fn() + Send + Sync>,
    ) -> Sink {
        Sink::start_with(listener, None, policy, before_250)
    }

    /// With `tls`, TLS from the first byte (a port-465 style server).
    fn start_with(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        policy: Policy,
        before_250: Arc<dyn Fn() + Send + Sync>,
    ) -> Sink {
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (g, policy, hook) = (g.clone(), policy.clone(), before_250.clone());
                let tls = tls.clone();
                thread::spawn(move || {
                    let _ = serve(conn, tls, &g, &policy, &*hook);
                });
            }
        });
        Sink { addr, got }
    }

    fn accepting() -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        Sink::start(l, Arc::new(|_| "250 2.1.5 Ok".into()), Arc::new(|| {}))
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

fn serve(
    conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    got: &Mutex<Vec<Got>>,
    policy: &Policy,
    before_250: &(dyn Fn() + Send + Sync),
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    match tls {
        None => converse(conn, got, policy, before_250),
        Some(config) => {
            let tls = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
            converse(rustls::StreamOwned::new(tls, conn), got, policy, before_250)
        }
    }
}

fn converse(
    stream: impl std::io::Read + Write,
    got: &Mutex<Vec<Got>>,
    policy: &Policy,
    before_250: &(dyn Fn() + Send + Sync),
) -> std::io::Result<()> {
    let mut r = BufReader::new(stream);
    macro_rules! w {
        () => {
            r.get_mut()
        };
    }
    w!().write_all(b"220 sink.test ESMTP\r\n")?;
    let (mut from, mut rcpts) = (String::new(), Vec::new());
    let require_auth = matches!(policy("?auth").as_str(), "required" | "login");
    // "login": a smarthost that knows LOGIN but not PLAIN.
    let login_only = policy("?auth") == "login";
    let starttls = policy("?starttls") == "broken";
    let mut authed = false;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            let tls = if starttls { "250-STARTTLS\r\n" } else { "" };
            format!("250-sink.test\r\n250-PIPELINING\r\n{tls}250-AUTH PLAIN LOGIN\r\n250 8BITMIME")
        } else if upper.starts_with("STARTTLS") {
            // A broken TLS stack: agrees, then speaks no TLS at all.
            w!().write_all(b"220 2.0.0 go ahead\r\nthis is not a TLS record\r\n")?;
            return Ok(());
        } else if login_only && upper.starts_with("AUTH PLAIN") {
            "504 5.5.4 Unrecognized authentication type".into()
        } else if upper.trim_end() == "AUTH LOGIN" {
            // User name, then password, each prompted and sent base64.
            let mut answers = Vec::new();
            for prompt in ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"] {
                w!().write_all(format!("{prompt}\r\n").as_bytes())?;
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 {
                    return Ok(());
                }
                answers.push(l.trim().to_string());
            }
            // "relay" and "s3cret".
            if answers == ["cmVsYXk=", "czNjcmV0"] {
                authed = true;
                "235 2.7.0 Authentication successful".into()
            } else {
                "535 5.7.8 Authentication credentials invalid".into()
            }
        } else if upper.starts_with("AUTH PLAIN ") {
            // "\0relay\0s3cret" in base64.
            if line[11..].trim() == "AHJlbGF5AHMzY3JldA==" {
                authed = true;
                "235 2.7.0 Authentication successful".into()
            } else {
                "535 5.7.8 Authentication credentials invalid".into()
            }
        } else if upper.starts_with("MAIL FROM:") && require_auth && !authed {
            "530 5.7.0 Authentication required".into()
        } else if upper.starts_with("MAIL FROM:") {
            from = line[10..].trim().to_string();
            rcpts.clear();
            "250 2.1.0 Ok".into()
        } else if upper.starts_with("RCPT TO:") {
            let addr = line[8..]
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string();
            let reply = policy(&addr);
            if reply.starts_with('2') {
                rcpts.push(addr);
            }
            reply
        } else if upper.starts_with("DATA") {
            w!().write_all(b"354 go ahead\r\n")?;
            let mut body = Vec::new();
            loop {
                let mut l = Vec::new();
                if r.read_until(b'\n', &mut l)? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                body.extend_from_slice(l.strip_prefix(b".").unwrap_or(&l));
            }
            before_250();
            got.lock().unwrap().push(Got {
                from: from.clone(),
                rcpts: rcpts.clone(),
                body,
            });
            "250 2.0.0 queued".into()
        } else if upper.starts_with("QUIT") {
            w!().write_all(b"221 bye\r\n")?;
            return Ok(());
        } else if upper.starts_with("RSET") || upper.starts_with("NOOP") {
            "250 Ok".into()
        } else {
            "502 5.5.2 not here".into()
        };
        w!().write_all(format!("{reply}\r\n").as_bytes())?;
    }
}

// ---- a DNS server on loopback --------------------------------------------------------------

/// Answers MX and A queries from `zone` (`(name, mx)` with `mx = None` for a null MX), A for
/// every `mx.*` name with 127.0.0.1, NXDOMAIN for the rest. Returns its address.
fn dns_server(zone: Vec<(&'static str, Option<&'static str>)>) -> SocketAddr {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::rdata::{A, MX};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::new();
            resp.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_op_code(q.op_code())
                .set_recursion_desired(q.recursion_desired())
                .set_recursion_available(true)
                .set_authoritative(true);
            let Some(query) = q.queries().first().cloned() else {
                continue;
            };
            let name = query.name().to_ascii().trim_end_matches('.').to_string();
            resp.add_query(query.clone());
            let mx = zone.iter().find(|(d, _)| *d == name);
            match (query.query_type(), mx) {
                (RecordType::MX, Some((_, target))) => {
                    let exchange = match target {
                        Some(t) => Name::from_ascii(format!("{t}.")).unwrap(),
                        None => Name::root(),
                    };
                    let rdata = RData::MX(MX::new(if target.is_some() { 10 } else { 0 }, exchange));
                    resp.add_answer(Record::from_rdata(query.name().clone(), 60, rdata));
                }
                (RecordType::A, _) if name.starts_with("mx.") => {
                    let rdata = RData::A(A::new(127, 0, 0, 1));
                    resp.add_answer(Record::from_rdata(query.name().clone(), 60, rdata));
                }
                // The name exists (an MX host, or a zone domain asked for another type).
                (_, Some(_)) => {}
                (_, None) if name.starts_with("mx.") => {}
                _ => {
                    resp.set_response_code(ResponseCode::NXDomain);
                }
            }
            if let Ok(bytes) = resp.to_vec() {
                let _ = sock.send_to(&bytes, peer);
            }
        }
    });
    addr
}

// ---- Postfix smtp-sink -----------------------------------------------------------------------

struct SmtpSink {
    child: Child,
    addr: SocketAddr,
    dump: PathBuf,
}

impl SmtpSink {
    /// `smtp-sink` on 127.0.0.1:0, dumping each message into its own file; `extra` adds options
    /// (e.g. `-f RCPT` to refuse recipients).
    fn start(dir: &Path, extra: &[&str]) -> SmtpSink {
        // Beside the data directory, not in it: the server keeps that one 0700, and smtp-sink
        // writes as nobody.
        let mut name = dir.file_name().unwrap().to_os_string();
        name.push("-sink");
        let dump = dir.with_file_name(name);
        std::fs::create_dir_all(&dump).unwrap();
        // smtp-sink drops root for -u nobody; let that user write the dumps.
        std::fs::set_permissions(&dump, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut cmd = Command::new(common::find_program("smtp-sink").unwrap());
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-u", "nobody"]);
        }
        cmd.args(extra)
            .arg("-d")
            .arg(dump.join("msg."))
            .args(["127.0.0.1:0", "16"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn smtp-sink");
        let addr = listening_port_of(child.id());
        SmtpSink { child, addr, dump }
    }

    fn messages(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = std::fs::read_dir(&self.dump)
            .map(|rd| {
                rd.flatten()
                    .map(|e| std::fs::read(e.path()).unwrap())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dump);
    }
}

/// The TCP port process `pid` listens on (it was started on port 0): its socket inodes looked
/// up in /proc/net/tcp.
fn listening_port_of(pid: u32) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(port) = common::listening_port(pid) {
            return SocketAddr::from(([127, 0, 0, 1], port));
        }
        assert!(
            Instant::now() < deadline,
            "smtp-sink (pid {pid}) is not listening"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

// ---- tests ---------------------------------------------------------------------------------

/// A message a customer submits (swaks, STARTTLS + AUTH, port 2587) for two foreign domains
/// reaches the smarthost (Postfix's smtp-sink) with its body intact: the dump holds the
/// message after smtp-sink's own X-/Received: lines and our Received: line.
#[test]
fn smarthost_smtp_sink_receives_the_message_intact() {
    if !require_program("smtp-sink") || !require_program("swaks") {
        return;
    }
    let mut server = TestServer::start("", &[ACME]);
    let sink = SmtpSink::start(server.data_dir(), &[]);
    let config = format!(
        "{}\n[relay]\nsmarthost = \"{}\"\n",
        std::fs::read_to_string(server.config_path()).unwrap(),
        sink.addr
    );
    std::fs::write(server.config_path(), config).unwrap();
    server.restart();
    let body = b"From: boss@acme.example\r\nTo: someone@foreign.example\r\nSubject: out\r\n\r\nline one\r\n.leading dot\r\n\r\nlast line\r\n";
    // The customer submits with swaks (STARTTLS, AUTH PLAIN) on the submission port; swaks
    // ends the data with CRLF . CRLF, so the file leaves out the final CRLF.
    let file = server.data_dir().join("out.eml");
    std::fs::write(&file, &body[..body.len() - 2]).unwrap();
    let submission = server.addr("submission");
    let out = common::run_bounded(
        Command::new(common::find_program("swaks").unwrap())
            .args(["--server", &submission.ip().to_string()])
            .args(["--port", &submission.port().to_string()])
            .args(["--tls", "--auth", "PLAIN", "--auth-user", "acme"])
            .args(["--auth-password", &common::password_for("acme")])
            .args(["--from", "boss@acme.example"])
            .args(["--to", "someone@foreign.example,other@far.example"])
            .args(["--data", &format!("@{}", file.display())]),
        None,
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "swaks: {}", common::output_text(&out));
    // smtp-sink may finish writing a dump file after its 250: wait for both recipients there.
    let dumped_rcpts = || -> usize {
        sink.messages()
            .iter()
            .map(|m| String::from_utf8_lossy(m).matches("X-Rcpt-Args: ").count())
            .sum()
    };
    wait_until("the smarthost to get the message", 20, &server, || {
        let q = server.queue_json();
        queue_entry(&q, "foreign.example").is_none()
            && queue_entry(&q, "far.example").is_none()
            && dumped_rcpts() == 2
    });
    // Each domain's part is delivered by its shard core: one or two transactions (two when
    // the domains live on different cores), together naming both recipients once.
    let dumped = sink.messages();
    assert!((1..=2).contains(&dumped.len()), "{}", dumped.len());
    let mut rcpts = Vec::new();
    for d in &dumped {
        let text = String::from_utf8(d.clone()).unwrap();
        assert!(text.contains("X-Mail-Args: <boss@acme.example>"), "{text}");
        rcpts.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("X-Rcpt-Args: "))
                .map(String::from),
        );
        // smtp-sink writes LF line ends; compare line by line after the trace fields.
        let start = text
            .find("From: boss@acme.example")
            .expect("our header in the dump");
        assert!(
            text[..start].contains("by mx.test with ESMTPSA"),
            "our Received: line: {text}"
        );
        let want = String::from_utf8(body.to_vec())
            .unwrap()
            .replace("\r\n", "\n");
        assert_eq!(
            text[start..].trim_end_matches('\n'),
            want.trim_end_matches('\n')
        );
    }
    rcpts.sort();
    assert_eq!(rcpts, ["<other@far.example>", "<someone@foreign.example>"]);
    assert!(queue_entry(&server.queue_json(), "far.example").is_none());
    assert!(server.logs().contains("relay attempt"));
}

/// Direct MX delivery: the MX of relay.test is found through the test's DNS server, the
/// message arrives byte for byte (dot-stuffing undone by the sink). A null MX (RFC 7505) is a
/// permanent failure: the hosted sender gets a report in its hold.
#[test]
fn mx_lookup_through_a_loopback_dns_server() {
    let sink = Sink::accepting();
    let dns = dns_server(vec![
        ("relay.test", Some("mx.relay.test")),
        ("nullmx.test", None),
    ]);
    let config = format!(
        "[relay]\nmode = \"mx\"\nresolver = \"{dns}\"\nmx_port = {}\nfirst_retry = \"1s\"\n",
        sink.addr.port()
    );
    let mut server = TestServer::start(&config, &[ACME]);
    let body = b"Subject: via mx\r\n\r\n.\r\n..two dots\r\nend\r\n";
    seed(
        &mut server,
        &[
            ("boss@acme.example", &["alice@relay.test"], body),
            (
                "boss@acme.example",
                &["bob@nullmx.test"],
                b"Subject: nowhere\r\n\r\nx\r\n",
            ),
        ],
    );
    wait_until("delivery and the null-MX report", 20, &server, || {
        let q = server.queue_json();
        sink.got().len() == 1
            && queue_entry(&q, "relay.test").is_none()
            && queue_entry(&q, "nullmx.test").is_none()
            && queue_entry(&q, "acme.example").is_some()
    });
    let got = &sink.got()[0];
    assert_eq!(got.from, "<boss@acme.example>");
    assert_eq!(got.rcpts, ["alice@relay.test"]);
    assert_eq!(without_our_trace(&got.body), body);
    let report = server.queue_show_json("acme.example");
    assert_eq!(report["messages"][0]["sender"], "", "{report}");
    assert_eq!(report["messages"][0]["recipients"][0], "boss@acme.example");
    assert!(server.logs().contains("null MX"), "logged");
}

/// The destination refuses connections, then comes up: the message is delivered at a retry,
/// and `turnpike queue` showed the failed attempt meanwhile.
#[test]
fn destination_down_then_up_is_delivered_after_a_retry() {
    // Bound but not listening: connections are refused, and the port stays ours.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let config = format!("[relay]\nsmarthost = \"{addr}\"\nfirst_retry = \"2s\"\n");
    let mut server = TestServer::start(&config, &[ACME]);
    seed(
        &mut server,
        &[(
            "boss@acme.example",
            &["x@down.example"],
            b"Subject: later\r\n\r\nhi\r\n",
        )],
    );
    wait_until("a failed attempt", 20, &server, || {
        outbound_row(&server, "down.example").is_some_and(|r| r["attempts"].as_u64() >= Some(1))
    });
    let row = outbound_row(&server, "down.example").unwrap();
    assert!(
        row["last_error"].as_str().unwrap().contains("connect"),
        "{row}"
    );
    let table = server.cli(&["queue"], None);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("down.example"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    sock.listen(16).unwrap();
    let sink = Sink::start(
        sock.into(),
        Arc::new(|_| "250 2.1.5 Ok".into()),
        Arc::new(|| {}),
    );
    wait_until("delivery after the retry", 30, &server, || {
        sink.got().len() == 1 && queue_entry(&server.queue_json(), "down.example").is_none()
    });
    assert!(outbound_row(&server, "down.example").is_none());
    let metrics = scrape(&server);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    assert!(value("turnpike_domain_deferred_total{domain=\"down.example\"}") >= 1.0);
    assert_eq!(
        value("turnpike_domain_delivered_total{domain=\"down.example\"}"),
        1.0
    );
}

/// A 5xx for the recipient: the part leaves the queue and an RFC 3464 report from `<>` waits in
/// the (hosted) sender's hold. A report to a foreign sender would itself be relayed; a refused
/// report (null sender) gets no report of its own.
#[test]
fn permanent_refusal_reports_to_the_senders_hold() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink = Sink::start(
        l,
        Arc::new(|a: &str| {
            if a.starts_with("gone@") {
                "550 5.1.1 No such user".into()
            } else {
                "250 2.1.5 Ok".into()
            }
        }),
        Arc::new(|| {}),
    );
    let config = format!("[relay]\nsmarthost = \"{}\"\n", sink.addr);
    let mut server = TestServer::start(&config, &[ACME]);
    seed(
        &mut server,
        &[
            (
                "boss@acme.example",
                &["gone@far.example"],
                b"Subject: a\r\n\r\na\r\n",
            ),
            (
                "gone@foreign.example",
                &["gone@far2.example"],
                b"Subject: b\r\n\r\nb\r\n",
            ),
        ],
    );
    // The second refusal's report goes to gone@foreign.example, is relayed, refused again
    // (550), and being from <> it ends there.
    wait_until("the reports", 20, &server, || {
        let q = server.queue_json();
        queue_entry(&q, "far.example").is_none()
            && queue_entry(&q, "far2.example").is_none()
            && queue_entry(&q, "foreign.example").is_none()
            && queue_entry(&q, "acme.example").is_some()
    });
    let show = server.queue_show_json("acme.example");
    assert_eq!(show["messages"].as_array().unwrap().len(), 1, "{show}");
    assert_eq!(show["messages"][0]["sender"], "");
    assert!(sink.got().is_empty(), "nothing was accepted");
    assert!(server.logs().contains("never bounce a bounce"));
}

/// Issue 9 item 6 in the relay: one part (three recipients at one destination) answered 250 /
/// 451 / 550. The 250 recipient is not sent again, the 550 one is reported once, and after a
/// SIGKILL and a restart the next attempt carries only the 451 recipient.
#[test]
fn mixed_outcomes_in_one_part_retry_only_the_deferred_recipient() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let asked = Arc::new(Mutex::new(Vec::<String>::new()));
    let later_ok = Arc::new(Mutex::new(false));
    let (a, ok) = (asked.clone(), later_ok.clone());
    let sink = Sink::start(
        l,
        Arc::new(move |addr: &str| {
            if !addr.starts_with('?') {
                a.lock().unwrap().push(addr.to_string());
            }
            match addr {
                "ok@far.example" => "250 2.1.5 Ok".into(),
                "later@far.example" if *ok.lock().unwrap() => "250 2.1.5 Ok".into(),
                "later@far.example" => "451 4.3.0 Try again later".into(),
                "gone@far.example" => "550 5.1.1 No such user".into(),
                _ => "250 Ok".into(),
            }
        }),
        Arc::new(|| {}),
    );
    let config = format!(
        "[relay]\nsmarthost = \"{}\"\nfirst_retry = \"1h\"\n",
        sink.addr
    );
    let mut server = TestServer::start(&config, &[ACME]);
    let body: &[u8] = b"Subject: three answers\r\n\r\nhi\r\n";
    seed(
        &mut server,
        &[(
            "boss@acme.example",
            &["ok@far.example", "later@far.example", "gone@far.example"],
            body,
        )],
    );
    let held = |server: &TestServer| -> Vec<String> {
        let show = server.queue_show_json("far.example");
        show["messages"]
            .as_array()
            .map(|a| {
                a.iter()
                    .flat_map(|m| m["recipients"].as_array().unwrap().clone())
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_until("the first attempt to be settled", 20, &server, || {
        held(&server) == ["later@far.example"]
            && queue_entry(&server.queue_json(), "acme.example").is_some()
    });
    assert_eq!(sink.got().len(), 1);
    assert_eq!(sink.got()[0].rcpts, ["ok@far.example"]);
    let report = server.queue_show_json("acme.example");
    assert_eq!(report["messages"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["messages"][0]["sender"], "");

    // A crash, then the destination takes the deferred recipient.
    *later_ok.lock().unwrap() = true;
    server.kill9();
    server.restart();
    assert_eq!(held(&server), ["later@far.example"], "after the restart");
    wait_until("the retry after the restart", 20, &server, || {
        sink.got().len() == 2 && queue_entry(&server.queue_json(), "far.example").is_none()
    });
    let got = sink.got();
    assert_eq!(got[1].rcpts, ["later@far.example"]);
    assert_eq!(without_our_trace(&got[1].body), body);
    assert_eq!(
        *asked.lock().unwrap(),
        [
            "ok@far.example",
            "later@far.example",
            "gone@far.example",
            "later@far.example"
        ],
        "the second attempt offers only what is still queued"
    );
    let report = server.queue_show_json("acme.example");
    assert_eq!(
        report["messages"].as_array().unwrap().len(),
        1,
        "the 550 was reported exactly once: {report}"
    );
}

/// `queue retry DEST` attempts at once instead of after the backoff; `queue bounce ID` reports
/// a queued message to its sender and drops it.
#[test]
fn queue_retry_and_bounce() {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let config = format!("[relay]\nsmarthost = \"{addr}\"\nfirst_retry = \"1h\"\n");
    let mut server = TestServer::start(&config, &[ACME]);
    let ids = seed(
        &mut server,
        &[
            (
                "boss@acme.example",
                &["a@retry.example"],
                b"Subject: r\r\n\r\nr\r\n",
            ),
            (
                "boss@acme.example",
                &["b@bounce.example"],
                b"Subject: b\r\n\r\nb\r\n",
            ),
        ],
    );
    wait_until("the first failed attempt", 20, &server, || {
        ["retry.example", "bounce.example"]
            .iter()
            .all(|d| outbound_row(&server, d).is_some_and(|r| r["attempts"].as_u64() == Some(1)))
    });
    let out = server.cli(&["queue", "bounce", &ids[1].to_string()], None);
    assert!(out.status.success(), "{}", common::output_text(&out));
    wait_until("the bounce", 10, &server, || {
        let q = server.queue_json();
        queue_entry(&q, "bounce.example").is_none() && queue_entry(&q, "acme.example").is_some()
    });
    // Bouncing it again: nothing left to bounce.
    let again = server.cli(&["queue", "bounce", &ids[1].to_string()], None);
    assert!(!again.status.success());

    sock.listen(16).unwrap();
    let sink = Sink::start(
        sock.into(),
        Arc::new(|_| "250 2.1.5 Ok".into()),
        Arc::new(|| {}),
    );
    thread::sleep(Duration::from_secs(2));
    assert!(sink.got().is_empty(), "no attempt before the 1 h backoff");
    let out = server.cli(&["queue", "retry", "retry.example"], None);
    assert!(out.status.success(), "{}", common::output_text(&out));
    wait_until("delivery after queue retry", 15, &server, || {
        sink.got().len() == 1 && queue_entry(&server.queue_json(), "retry.example").is_none()
    });
    assert_eq!(sink.got()[0].rcpts, ["a@retry.example"]);
}

/// SIGKILL while the relay is delivering: every message is delivered after the restart or was
/// delivered before; only the message whose body was in flight at the kill may arrive twice
/// (its 250 was not recorded: RFC 5321 §6.1 duplicates, never a loss).
#[test]
fn sigkill_while_delivering_loses_nothing() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let stall = Arc::new(Mutex::new(true));
    let count = Arc::new(Mutex::new(0u32));
    let (s, c) = (stall.clone(), count.clone());
    // The third body stalls before its 250 until the test lets go.
    let sink = Sink::start(
        l,
        Arc::new(|_| "250 2.1.5 Ok".into()),
        Arc::new(move || {
            let n = {
                let mut c = c.lock().unwrap();
                *c += 1;
                *c
            };
            if n == 3 {
                let deadline = Instant::now() + Duration::from_secs(20);
                while *s.lock().unwrap() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }),
    );
    let config = format!(
        "[relay]\nsmarthost = \"{}\"\nfirst_retry = \"1s\"\n",
        sink.addr
    );
    let mut server = TestServer::start(&config, &[ACME]);
    let msgs: Vec<(String, Vec<u8>)> = (0..6)
        .map(|n| {
            (
                format!("u{n}@kill.example"),
                format!("Subject: kill {n}\r\n\r\nbody {n}\r\n").into_bytes(),
            )
        })
        .collect();
    let rcpts: Vec<[&str; 1]> = msgs.iter().map(|(r, _)| [r.as_str()]).collect();
    let seeded: Vec<(&str, &[&str], &[u8])> = msgs
        .iter()
        .zip(&rcpts)
        .map(|((_, b), r)| ("boss@acme.example", &r[..], b.as_slice()))
        .collect();
    seed(&mut server, &seeded);
    let deadline = Instant::now() + Duration::from_secs(20);
    while *count.lock().unwrap() < 3 {
        assert!(Instant::now() < deadline, "the third body never arrived");
        thread::sleep(Duration::from_millis(20));
    }
    // The first two parts leave the index only once their DONE records are on disk; kill
    // after that, while the third is in flight.
    wait_until("the first two DONE records", 20, &server, || {
        queue_entry(&server.queue_json(), "kill.example").map(|e| e.0) == Some(4)
    });
    server.kill9();
    *stall.lock().unwrap() = false;
    server.restart();
    wait_until(
        "everything delivered after the restart",
        30,
        &server,
        || queue_entry(&server.queue_json(), "kill.example").is_none(),
    );
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    for g in sink.got() {
        *seen.entry(g.rcpts[0].clone()).or_default() += 1;
    }
    for (r, _) in &msgs {
        assert!(seen.contains_key(r), "{r} lost: {seen:?}");
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.len() <= 1,
        "only the in-flight message may repeat: {seen:?}"
    );
    assert!(seen.values().all(|n| *n <= 2), "{seen:?}");
}

/// A smarthost sink whose AUTH is `auth` (the sink's `?auth` policy), and a server relaying
/// to it as user "relay" with `password` in its `password_file`, holding one message for
/// `rcpt`. Returns the sink, the server and the password file.
fn smarthost_with_auth(
    auth: &'static str,
    password: &str,
    rcpt: &str,
) -> (Sink, TestServer, std::path::PathBuf) {
    let policy: Policy = Arc::new(move |a: &str| {
        if a == "?auth" {
            auth.into()
        } else {
            "250 2.1.5 Ok".into()
        }
    });
    let sink = Sink::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        policy,
        Arc::new(|| {}),
    );
    let mut server = TestServer::start("", &[ACME]);
    let pw = server.data_dir().join("relay-password");
    std::fs::write(&pw, format!("{password}\n")).unwrap();
    let config = format!(
        "{}\n[relay]\nsmarthost = \"{}\"\nsmarthost_tls = \"none\"\nusername = \"relay\"\n\
         password_file = \"{}\"\nfirst_retry = \"1s\"\n",
        std::fs::read_to_string(server.config_path()).unwrap(),
        sink.addr,
        pw.display()
    );
    std::fs::write(server.config_path(), config).unwrap();
    seed(
        &mut server,
        &[("boss@acme.example", &[rcpt], b"Subject: a\r\n\r\na\r\n")],
    );
    (sink, server, pw)
}

/// A smarthost that requires AUTH: the relay authenticates with `username` and the first line
/// of `password_file`, then delivers; a wrong password keeps the mail queued with the 535 shown.
#[test]
fn smarthost_auth_plain() {
    let (sink, mut server, pw) = smarthost_with_auth("required", "wrong", "x@auth.example");
    wait_until("the refused AUTH", 20, &server, || {
        outbound_row(&server, "auth.example").is_some_and(|r| {
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("535 5.7.8"))
        })
    });
    assert!(sink.got().is_empty());
    std::fs::write(&pw, "s3cret\n").unwrap();
    server.restart();
    wait_until("delivery after AUTH", 20, &server, || {
        sink.got().len() == 1 && queue_entry(&server.queue_json(), "auth.example").is_none()
    });
}

/// A smarthost that answers 504 to AUTH PLAIN and knows LOGIN: the relay falls back to LOGIN
/// (user name, then password) and delivers.
#[test]
fn smarthost_auth_login_fallback() {
    let (sink, server, _) = smarthost_with_auth("login", "s3cret", "x@login.example");
    wait_until("delivery after AUTH LOGIN", 20, &server, || {
        sink.got().len() == 1 && queue_entry(&server.queue_json(), "login.example").is_none()
    });
}

/// Turnpike to turnpike: one server's relay finds the other as the MX of far.example (through
/// the loopback DNS server), upgrades with STARTTLS (opportunistic: the self-signed
/// certificate is accepted) and the other holds the message for its customer, received over
/// TLS (`with ESMTPS` in its Received: line).
#[test]
fn opportunistic_starttls_to_another_turnpike_as_mx() {
    let far = TestServer::start("", &[("far", &["far.example"])]);
    let dns = dns_server(vec![("far.example", Some("mx.far.example"))]);
    let config = format!(
        "[relay]\nmode = \"mx\"\nresolver = \"{dns}\"\nmx_port = {}\n",
        far.addr("mx").port()
    );
    let mut server = TestServer::start(&config, &[ACME]);
    let body = b"Subject: tls\r\n\r\nover TLS\r\n";
    seed(
        &mut server,
        &[("boss@acme.example", &["someone@far.example"], body)],
    );
    wait_until("the other server to hold it", 20, &server, || {
        queue_entry(&far.queue_json(), "far.example").is_some()
            && queue_entry(&server.queue_json(), "far.example").is_none()
    });
    let held = far.queue_show_json("far.example");
    assert_eq!(held["messages"][0]["sender"], "boss@acme.example", "{held}");
    let recovered = recover(far.data_dir()).unwrap();
    let part = &recovered.parts[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reader = turnpike::spool::Reader::new(far.data_dir(), IoKind::Epoll);
    let stored = rt.block_on(reader.read_body(&part.location)).unwrap();
    let text = String::from_utf8_lossy(&stored);
    assert!(text.contains("with ESMTPS"), "received over TLS: {text}");
    assert!(
        text.contains("from mx.test"),
        "EHLO with our host name: {text}"
    );
    assert!(stored.ends_with(body));
}

/// An MX that offers STARTTLS but whose TLS is broken: opportunistic TLS falls back to plain
/// text at once rather than keeping the mail back. A smarthost with `starttls-required` that
/// does not offer STARTTLS keeps the mail queued with the reason shown.
#[test]
fn broken_or_missing_starttls() {
    let policy: Policy = Arc::new(|a: &str| {
        if a == "?starttls" {
            "broken".into()
        } else {
            "250 2.1.5 Ok".into()
        }
    });
    let broken = Sink::start(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        policy,
        Arc::new(|| {}),
    );
    let dns = dns_server(vec![("broken.test", Some("mx.broken.test"))]);
    let config = format!(
        "[relay]\nmode = \"mx\"\nresolver = \"{dns}\"\nmx_port = {}\n",
        broken.addr.port()
    );
    let mut server = TestServer::start(&config, &[ACME]);
    seed(
        &mut server,
        &[(
            "boss@acme.example",
            &["x@broken.test"],
            b"Subject: p\r\n\r\np\r\n",
        )],
    );
    wait_until("plain-text delivery", 20, &server, || {
        broken.got().len() == 1 && queue_entry(&server.queue_json(), "broken.test").is_none()
    });
    assert!(server.logs().contains("trying again in plain text"));

    let plain = Sink::accepting();
    let mut server = TestServer::start(
        &format!(
            "[relay]\nsmarthost = \"{}\"\nsmarthost_tls = \"starttls-required\"\n",
            plain.addr
        ),
        &[ACME],
    );
    seed(
        &mut server,
        &[(
            "boss@acme.example",
            &["x@strict.example"],
            b"Subject: s\r\n\r\ns\r\n",
        )],
    );
    wait_until("the refusal to send in clear", 20, &server, || {
        outbound_row(&server, "strict.example").is_some_and(|r| {
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("does not offer STARTTLS"))
        })
    });
    assert!(plain.got().is_empty());
}

/// A message still undeliverable `give_up_after` after its arrival is reported to its sender
/// (5.4.7, with the last error) and dropped.
#[test]
fn give_up_after_reports_and_drops() {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let config =
        format!("[relay]\nsmarthost = \"{addr}\"\nfirst_retry = \"1s\"\ngive_up_after = \"2s\"\n");
    let mut server = TestServer::start(&config, &[ACME]);
    seed(
        &mut server,
        &[(
            "boss@acme.example",
            &["x@never.example"],
            b"Subject: n\r\n\r\nn\r\n",
        )],
    );
    wait_until("the give-up report", 20, &server, || {
        let q = server.queue_json();
        queue_entry(&q, "never.example").is_none() && queue_entry(&q, "acme.example").is_some()
    });
    let recovered = recover(server.data_dir()).unwrap();
    let report = recovered
        .parts
        .iter()
        .find(|p| p.domain.as_str() == "acme.example")
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reader = turnpike::spool::Reader::new(server.data_dir(), IoKind::Epoll);
    let body = rt.block_on(reader.read_body(&report.location)).unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("Status: 5.4.7"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; x@never.example"),
        "{text}"
    );
    assert!(
        text.contains("connect to"),
        "the last error is in the report: {text}"
    );
    drop(sock);
}

/// The reports the server writes itself leave through the relay: a part held past
/// `spool.max_hold` for a customer who never collected it is reported to its foreign sender,
/// and that report (from `<>`) reaches the smarthost.
#[test]
fn expiry_reports_to_a_foreign_sender_are_relayed() {
    let sink = Sink::accepting();
    let config = format!(
        "[spool]\nmax_hold = \"1s\"\n[relay]\nsmarthost = \"{}\"\n",
        sink.addr
    );
    let server = TestServer::start(&config, &[ACME]);
    let mut c = common::SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO client.test", 250);
    c.send_mail(
        "sender@client.test",
        &["info@acme.example"],
        "Subject: never collected\r\n\r\nhello\r\n",
    );
    c.cmd("QUIT", 221);
    wait_until("the relayed report", 30, &server, || {
        let q = server.queue_json();
        sink.got().len() == 1
            && queue_entry(&q, "acme.example").is_none()
            && queue_entry(&q, "client.test").is_none()
    });
    let got = &sink.got()[0];
    assert_eq!(got.from, "<>", "a report comes from the null sender");
    assert_eq!(got.rcpts, ["sender@client.test"]);
    let text = String::from_utf8_lossy(&got.body);
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(text.contains("Status: 5.4.7"), "{text}");
}

/// `starttls-required` with `ca_file`: the smarthost's certificate must chain to the file. The
/// right CA (the other turnpike's self-signed certificate, which names 127.0.0.1) delivers; a
/// wrong one keeps the mail queued with the TLS error, never falling back to plain text.
#[test]
fn smarthost_certificate_is_verified_with_ca_file() {
    let far = TestServer::start("", &[("far", &["far.example"])]);
    let stranger = TestServer::start("", &[]);
    let smarthost = far.addr("mx");
    let config = |ca: &Path| {
        format!(
            "[relay]\nsmarthost = \"{smarthost}\"\nsmarthost_tls = \"starttls-required\"\n\
             ca_file = \"{}\"\nfirst_retry = \"1s\"\n",
            ca.display()
        )
    };
    let wrong = config(&stranger.data_dir().join("tls/cert.pem"));
    let mut server = TestServer::start(&wrong, &[ACME]);
    seed(
        &mut server,
        &[(
            "boss@acme.example",
            &["someone@far.example"],
            b"Subject: v\r\n\r\nv\r\n",
        )],
    );
    wait_until("the TLS verification failure", 20, &server, || {
        outbound_row(&server, "far.example").is_some_and(|r| {
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS with"))
        })
    });
    assert!(queue_entry(&far.queue_json(), "far.example").is_none());
    assert!(!server.logs().contains("trying again in plain text"));

    let right = config(&far.data_dir().join("tls/cert.pem"));
    std::fs::write(server.config_path(), common_base(&server) + &right).unwrap();
    server.restart();
    wait_until("verified delivery", 20, &server, || {
        queue_entry(&far.queue_json(), "far.example").is_some()
            && queue_entry(&server.queue_json(), "far.example").is_none()
    });
}

/// The server's config without its `[relay]` table (to swap relay settings between runs).
fn common_base(server: &TestServer) -> String {
    let text = std::fs::read_to_string(server.config_path()).unwrap();
    let mut table: toml::Table = text.parse().unwrap();
    table.remove("relay");
    toml::to_string(&table).unwrap()
}

/// `smarthost_tls = "implicit"`: TLS from the first byte (a port-465 style smarthost), here
/// verified against the sink's self-signed certificate through `ca_file`.
#[test]
fn smarthost_implicit_tls() {
    let mut server = TestServer::start("", &[ACME]);
    let dir = server.data_dir().join("sink-tls");
    let host = turnpike::types::DomainName::parse("sink.test").unwrap();
    let (cert, key) = turnpike::tls::ensure_self_signed(&dir, &host).unwrap();
    let tls = turnpike::tls::load_server_config(&cert, &key).unwrap();
    let sink = Sink::start_with(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Some(tls),
        Arc::new(|_| "250 2.1.5 Ok".into()),
        Arc::new(|| {}),
    );
    let relay = format!(
        "[relay]\nsmarthost = \"{}\"\nsmarthost_tls = \"implicit\"\nca_file = \"{}\"\n",
        sink.addr,
        cert.display()
    );
    std::fs::write(server.config_path(), common_base(&server) + &relay).unwrap();
    let body = b"Subject: implicit\r\n\r\nover TLS from the start\r\n";
    seed(
        &mut server,
        &[("boss@acme.example", &["x@tls.example"], body)],
    );
    wait_until("delivery over implicit TLS", 20, &server, || {
        sink.got().len() == 1 && queue_entry(&server.queue_json(), "tls.example").is_none()
    });
    assert_eq!(sink.got()[0].body, body);
}

/// The Prometheus text of the server's metrics listener.
fn scrape(server: &TestServer) -> String {
    use std::io::Read;
    let mut http = TcpStream::connect(server.addr("metrics")).unwrap();
    http.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}
