//! The bodies of the fuzz targets, shared by the cargo-fuzz crate in `tests/fuzz` and by the
//! stable `tests/fuzz_corpus.rs`, which replays the checked-in corpus on every `cargo test`.
//!
//! Each function takes arbitrary bytes, must never panic on them, and asserts the invariants
//! the module docs promise. A failed assertion here is a bug in `proto`, not in the input.

use crate::proto::command::Command;
use crate::proto::data::{DataScanner, Progress};
use crate::proto::frame::{Frame, Framer};
use std::collections::VecDeque;

use crate::proto::inbound::{
    Action, AtrnDecision, Directory, Inbound, InboundConfig, Mode, OdmrConfig, OdmrEvent,
    RcptVerdict, SessionContext,
};
use crate::proto::reply::Reply;
use crate::proto::reversed::{self, Outgoing, Reversed, ReversedConfig};
use crate::proto::sasl::{
    ClientCredentials, ClientError, ClientStep, Credentials, Mechanism, SaslClient, SaslContext,
    SaslExchange, SaslStep, ScramSecrets,
};
use crate::proto::stuff;
use crate::proto::throttle::Refusal;
use crate::types::{Envelope, Mailbox, MessageId, Notify, Recipient, Ret};

/// Frames `data` into lines and parses each one as a command, with and without UTF-8.
pub fn command(data: &[u8]) {
    let mut framer = Framer::new(512);
    let mut rest = data;
    while !rest.is_empty() {
        let consumed = match framer.next_line(rest) {
            Frame::Incomplete => {
                check_command(rest);
                break;
            }
            Frame::Line { line, consumed } => {
                assert!(!line.contains(&b'\r') && !line.contains(&b'\n'));
                assert_eq!(&rest[line.len()..consumed], b"\r\n");
                check_command(line);
                consumed
            }
            Frame::Skipped { consumed } | Frame::Invalid { consumed, .. } => consumed,
        };
        assert!(
            consumed > 0 && consumed <= rest.len(),
            "framer must make progress"
        );
        rest = &rest[consumed..];
    }
}

fn check_command(line: &[u8]) {
    for utf8 in [false, true] {
        match Command::parse(line, utf8) {
            Ok(Command::Mail { sender, params }) => {
                if let Some(m) = sender {
                    check_mailbox(&m);
                    assert!(!m.domain.is_empty());
                    assert!(params.smtputf8 || !m.is_utf8());
                }
            }
            Ok(Command::Rcpt { mailbox, .. }) => {
                check_mailbox(&mailbox);
                assert!(utf8 || !mailbox.is_utf8());
            }
            Ok(Command::Atrn(domains)) => assert!(domains.iter().all(|d| d.label_count() >= 2)),
            Ok(_) => {}
            Err(e) => {
                let wire = e.reply().to_bytes();
                assert!(e.reply().is_permanent());
                assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
            }
        }
    }
}

fn check_mailbox(m: &Mailbox) {
    assert_eq!(m.domain, m.domain.to_lowercase());
    assert!(!m.local.is_empty());
}

/// Scans `data` as DATA content whole and split at a data-derived offset (the results must be
/// identical), and round-trips it through the dot-stuffer.
pub fn data(data: &[u8]) {
    let limit = 4096;
    let whole = scan(&[data], limit);
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    assert_eq!(
        scan(&[&data[..cut], &data[cut..]], limit),
        whole,
        "split at {cut}"
    );
    let (body, consumed, outcome) = &whole;
    if let Some(n) = *consumed {
        assert!(data[..n] == *b".\r\n" || data[..n].ends_with(b"\r\n.\r\n"));
    }
    assert!(body.len() as u64 <= limit);
    assert_eq!(outcome.oversize, outcome.size > limit);
    // Unfinished content may end mid-CRLF, so the body is only judged once the end was seen.
    if consumed.is_some() && outcome.is_canonical() {
        assert!(!outcome.smuggling);
        assert_canonical(body);
    }

    // Stuffing any bytes gives canonical wire that scans back to the (normalised) body.
    let wire = stuff::stuff(data);
    let (round, consumed, outcome) = scan(&[&wire], u64::MAX);
    assert_eq!(consumed, Some(wire.len()));
    assert!(outcome.is_canonical() && !outcome.smuggling);
    if is_canonical(data) && (data.is_empty() || data.ends_with(b"\r\n")) {
        assert_eq!(round, data);
    }
}

type Scan = (Vec<u8>, Option<usize>, crate::proto::data::DataOutcome);

fn scan(pieces: &[&[u8]], limit: u64) -> Scan {
    let mut scanner = DataScanner::new(limit);
    let mut body = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        match scanner.feed(piece, &mut body) {
            Progress::NeedMore => offset += piece.len(),
            Progress::Finished { consumed } => {
                assert!(consumed <= piece.len());
                return (body, Some(offset + consumed), scanner.outcome());
            }
        }
    }
    (body, None, scanner.outcome())
}

fn is_canonical(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, &c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

fn assert_canonical(b: &[u8]) {
    assert!(
        is_canonical(b),
        "non-canonical body {:?}",
        String::from_utf8_lossy(b)
    );
}

/// Accepts every recipient, and every sender of a submission except `<>`.
struct AcceptAll;

impl Directory for AcceptAll {
    fn check_rcpt(&self, _rcpt: &Mailbox, _declared_size: Option<u64>) -> RcptVerdict {
        RcptVerdict::Accept
    }

    fn check_sender(&self, account: &str, sender: Option<&Mailbox>) -> Result<(), Reply> {
        assert_eq!(account, "user");
        match sender {
            Some(_) => Ok(()),
            None => Err(Reply::with_status(450, (4, 7, 1), "Rate limit")),
        }
    }
}

/// One account, "user" with password "pencil" (16 SCRAM iterations, to keep fuzzing fast),
/// also for CRAM-MD5 (digest of anything: the fuzzer cannot compute HMAC-MD5, so the check
/// accepts the all-zero digest to reach the success paths) and certificate "CN=gw".
struct FuzzCreds;

impl Credentials for FuzzCreds {
    fn scram(&self, user: &str) -> Option<ScramSecrets> {
        (user == "user").then(|| ScramSecrets::derive(b"pencil", b"salt", 16))
    }
    fn cram_md5(&self, user: &str, _challenge: &[u8], digest_hex: &str) -> bool {
        user == "user" && digest_hex == "00000000000000000000000000000000"
    }
    fn external(&self, cert_identity: &str) -> Option<String> {
        (cert_identity == "CN=gw").then(|| "user".into())
    }
}

/// Drives an [`Inbound`] machine with `data` as the client's input, in pieces whose size is
/// taken from the first byte, obeying every action like a real driver: once as the MX, once
/// as the ODMR listener and once as a submission listener. Bodies stream in chunks whose size
/// comes from the second byte (or come whole when it is even); the chunks plus the delivered
/// tail must form one canonical body within the limit, and no chunk may outlive its
/// transaction.
pub fn inbound(data: &[u8]) {
    inbound_in(data, Mode::Mx);
    inbound_in(data, Mode::Odmr);
    inbound_in(data, Mode::Submission);
}

fn inbound_in(data: &[u8], mode: Mode) {
    let cfg = InboundConfig {
        max_message_size: 2048,
        max_recipients: 5,
        max_line_length: 128,
        tls_available: true,
        body_chunk: data
            .get(1)
            .filter(|b| *b % 2 == 1)
            .map(|b| usize::from(b / 2 % 64) + 1),
        ..InboundConfig::new("mx.example")
    };
    let chunk = cfg.body_chunk;
    let piece = data.first().map_or(1, |&b| usize::from(b % 32) + 1);
    let context = |tls: bool| SessionContext {
        random: [9; 32],
        unix_time: 1_700_000_000,
        tls_exporter: tls.then_some([0xab; 32]),
        peer_identity: tls.then(|| "CN=gw".into()),
    };
    let odmr = OdmrConfig {
        scram_iterations: 16,
        max_auth_failures: 5,
        // Reach the password checks without a handshake (STARTTLS is exercised too).
        allow_plaintext_auth: true,
        ..OdmrConfig::new([3; 32])
    };
    let mut m = match mode {
        Mode::Odmr => Inbound::new_odmr(cfg, odmr, context(false)),
        Mode::Submission => Inbound::new_submission(cfg, odmr, context(false)),
        _ => Inbound::new(cfg),
    };
    let mut reversed = false;
    let mut buf = Vec::new();
    let mut output = Vec::new();
    let mut deliveries = 0u64;
    // The body chunks of the transaction in progress, as a driver would have stored them.
    let mut stored: Vec<u8> = Vec::new();
    let mut streaming = false;
    for input in data.chunks(piece) {
        buf.extend_from_slice(input);
        loop {
            let n = m.handle_odmr_input(&buf, &AcceptAll, &FuzzCreds);
            assert!(n <= buf.len());
            buf.drain(..n);
            output.append(m.output());
            let mut acted = false;
            while let Some(event) = m.poll_event() {
                assert_ne!(m.mode(), Mode::Mx);
                acted = true;
                match event {
                    OdmrEvent::AuthSucceeded { account } => {
                        assert_eq!(account, "user");
                        m.auth_checked(None);
                        assert_eq!(m.account(), Some("user"));
                    }
                    OdmrEvent::AuthFailed { account } => {
                        // Every other failure is throttled at the account, one in seven closes.
                        let refusal = match account.as_deref().map(str::len) {
                            Some(n) if n % 7 == 0 => Some(Refusal::Ip),
                            Some(n) if n % 2 == 0 => Some(Refusal::Account),
                            _ => None,
                        };
                        m.auth_checked(refusal);
                        assert!(m.account().is_none());
                    }
                    OdmrEvent::Atrn { account, domains } => {
                        assert_eq!(m.mode(), Mode::Odmr);
                        assert_eq!(m.account(), Some(account.as_str()));
                        let decision = match domains.len() % 4 {
                            0 => AtrnDecision::Accepted,
                            1 => AtrnDecision::NoMail,
                            2 => AtrnDecision::NotAuthorized(domains),
                            _ => AtrnDecision::Unavailable,
                        };
                        m.atrn_decided(decision);
                    }
                    OdmrEvent::Reverse => {
                        // The turnaround never leaves customer bytes behind.
                        assert!(m.is_reversed() && buf.is_empty());
                        reversed = true;
                    }
                }
                output.append(m.output());
            }
            while let Some(action) = m.poll_action() {
                acted = true;
                match action {
                    Action::StoreChunk(bytes) => {
                        assert!(m.receiving().is_some(), "a chunk outside a message");
                        let c = chunk.expect("chunks only when configured");
                        assert!(bytes.len() >= c && bytes.len() <= c + piece, "chunk size");
                        stored.extend_from_slice(&bytes);
                        streaming = true;
                        assert!(stored.len() <= 2048, "chunks past the size limit");
                        m.recycle(bytes);
                    }
                    Action::DiscardChunks => {
                        assert!(streaming, "discard without chunks");
                        stored.clear();
                        streaming = false;
                    }
                    Action::Deliver(mut incoming) => {
                        if let Some(c) = chunk {
                            assert!(incoming.body.len() <= c + piece, "tail bigger than a chunk");
                        }
                        stored.append(&mut incoming.body);
                        incoming.body = std::mem::take(&mut stored);
                        streaming = false;
                        assert_canonical(&incoming.body);
                        assert!(incoming.body.len() <= 2048);
                        assert!(!incoming.envelope.recipients.is_empty());
                        // Mail on the AUTH listeners only from an authenticated account.
                        let authenticated = m.mode() != Mode::Mx;
                        assert_eq!(incoming.account.is_some(), authenticated);
                        deliveries += 1;
                        m.stored(Ok(MessageId::new(0, 0, deliveries).to_string()));
                    }
                    Action::StartTls => {
                        buf.clear();
                        m.tls_started();
                        m.set_context(context(true));
                    }
                    Action::Close => {
                        assert!(m.is_closed());
                        assert!(!streaming, "chunks left behind at Close");
                    }
                }
                output.append(m.output());
            }
            if !acted || buf.is_empty() || m.is_closed() || reversed {
                break;
            }
        }
        if reversed {
            assert_eq!(m.handle_input(b"220 customer\r\n", &AcceptAll), 0);
            return check_replies(&output);
        }
        // The driver never has to hold more than one line, or one line plus one read.
        assert!(
            buf.len() <= 128 + piece,
            "driver buffer grew to {}",
            buf.len()
        );
        if m.is_closed() {
            assert_eq!(m.handle_input(b"NOOP\r\n", &AcceptAll), 0);
            break;
        }
    }
    m.timed_out();
    output.append(m.output());
    assert!(m.is_closed());
    check_replies(&output);
}

/// Every output line is `ddd` then `-` or ` `, and every reply ends with a final line.
fn check_replies(out: &[u8]) {
    assert!(out.ends_with(b"\r\n"));
    for line in out[..out.len() - 1].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").expect("every line ends in CRLF");
        assert!(line.len() >= 4, "short reply line {line:?}");
        assert!(line[..3].iter().all(u8::is_ascii_digit));
        assert!(line[3] == b' ' || line[3] == b'-');
        assert!(!line.contains(&b'\r'));
    }
}

/// Canned customer reply lines for the grammar pass of [`reversed`]: one input byte picks one,
/// so the fuzzer reaches BDAT, DATA and RSET paths instead of dying at the greeting.
const CANNED_REPLIES: [&[u8]; 16] = [
    b"220 c ESMTP\r\n",
    b"250-c\r\n",
    b"250-PIPELINING\r\n",
    b"250-CHUNKING\r\n",
    b"250-SIZE 100\r\n",
    b"250-8BITMIME\r\n",
    b"250-DSN\r\n",
    b"250 SMTPUTF8\r\n",
    b"250 2.1.0 Ok\r\n",
    b"354 go\r\n",
    b"550 5.1.1 no\r\n",
    b"450 4.2.0 later\r\n",
    b"421 4.3.2 bye\r\n",
    b"221 bye\r\n",
    b"502 5.5.1 what\r\n",
    b"250 Ok\r\n",
];

/// The fixed queue the [`reversed`] target delivers.
fn fuzz_queue() -> VecDeque<Outgoing> {
    let rcpt = |local: &str, notify| Recipient {
        mailbox: Mailbox {
            local: local.into(),
            domain: "example.org".into(),
        },
        notify,
        orcpt: Some(format!("rfc822;{local}@example.org")),
    };
    let sender = Some(Mailbox {
        local: "a".into(),
        domain: "s.example".into(),
    });
    let success = Some(Notify {
        success: true,
        ..Notify::default()
    });
    let msg = |id: &str, envelope, size, eight_bit| Outgoing {
        id: id.into(),
        envelope,
        size,
        eight_bit,
        utf8_addresses: false,
    };
    VecDeque::from([
        msg(
            "three",
            Envelope {
                sender: sender.clone(),
                ret: Some(Ret::Hdrs),
                envid: Some("E1".into()),
                recipients: vec![rcpt("u", success), rcpt("v", None), rcpt("\u{3b4}", None)],
                ..Envelope::default()
            },
            50,
            false,
        ),
        msg(
            "eight",
            Envelope {
                sender: sender.clone(),
                recipients: vec![rcpt("w", None)],
                ..Envelope::default()
            },
            200,
            true,
        ),
        msg(
            "bounce",
            Envelope {
                sender: None,
                recipients: vec![rcpt("x", None)],
                ..Envelope::default()
            },
            0,
            false,
        ),
        // Over the pipelining limit: in the window its body waits for the RCPT replies.
        msg(
            "large",
            Envelope {
                sender: sender.clone(),
                recipients: vec![rcpt("y", None), rcpt("z", None)],
                ..Envelope::default()
            },
            reversed::PIPELINE_BODY_MAX + 1,
            false,
        ),
    ])
}

/// What the [`reversed`] driver has seen.
#[derive(Default)]
struct ReversedLog {
    queue: VecDeque<Outgoing>,
    sent: Vec<Outgoing>,
    outcomes: Vec<String>,
    last: Option<reversed::Action>,
}

/// Obeys every queued action like a real driver; true if there were any.
fn obey(m: &mut Reversed, log: &mut ReversedLog) -> bool {
    let mut acted = false;
    while let Some(action) = m.poll_action() {
        acted = true;
        match &action {
            reversed::Action::NeedMessage => {
                assert!(!m.is_closed());
                match log.queue.pop_front() {
                    Some(o) => {
                        log.sent.push(o.clone());
                        m.send(o);
                    }
                    None => m.no_more(),
                }
            }
            reversed::Action::SendBody { id, .. } => {
                assert_eq!(log.sent.last().map(|o| &o.id), Some(id));
                m.body_sent();
            }
            reversed::Action::Delivered(o) => {
                assert!(!log.outcomes.contains(&o.id), "two outcomes for {}", o.id);
                let msg = log
                    .sent
                    .iter()
                    .find(|s| s.id == o.id)
                    .expect("a sent message");
                let indices: Vec<usize> = o.recipients.iter().map(|(i, _)| *i).collect();
                let want: Vec<usize> = (0..msg.envelope.recipients.len()).collect();
                assert_eq!(indices, want);
                log.outcomes.push(o.id.clone());
            }
            reversed::Action::Close(_) => assert!(m.is_closed()),
        }
        log.last = Some(action);
    }
    acted
}

/// Drives a [`Reversed`] machine with `data` as the customer's replies and a fixed queue of
/// four messages. The first byte picks the configuration (bit 0 pipelining, bit 1 chunking),
/// the piece size (bits 2-6) and, with bit 7, the grammar pass (each later byte one canned
/// reply line). It must never panic, must keep the driver's buffer bounded, must end (after
/// [`Reversed::abort`] if the input ran out) with Close, and must report every message it was
/// given exactly once, naming each recipient once.
pub fn reversed(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let cfg = ReversedConfig {
        hostname: "provider.example".into(),
        pipelining: flags & 1 != 0,
        chunking: flags & 2 != 0,
    };
    let rest = data.get(1..).unwrap_or(&[]);
    let input: Vec<u8> = if flags & 0x80 != 0 {
        rest.iter()
            .flat_map(|b| CANNED_REPLIES[usize::from(b % 16)].iter().copied())
            .collect()
    } else {
        rest.to_vec()
    };
    let piece = usize::from((flags >> 2) & 0x1f) + 1;
    let mut m = Reversed::new(cfg);
    let mut log = ReversedLog {
        queue: fuzz_queue(),
        ..ReversedLog::default()
    };
    let mut buf = Vec::new();
    for chunk in input.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let n = m.handle_input(&buf);
            assert!(n <= buf.len());
            buf.drain(..n);
            if !obey(&mut m, &mut log) || buf.is_empty() || m.is_closed() {
                break;
            }
        }
        assert!(
            buf.len() <= reversed::MAX_REPLY_LINE + 2 + piece,
            "driver buffer grew to {}",
            buf.len()
        );
        if m.is_closed() {
            assert_eq!(m.handle_input(b"250 Ok\r\n"), 0);
            break;
        }
    }
    // Out of input: the machine waits for a reply (or is done); the driver times it out.
    m.abort();
    obey(&mut m, &mut log);
    assert!(m.is_closed());
    assert!(matches!(log.last, Some(reversed::Action::Close(_))));
    assert_eq!(log.outcomes.len(), log.sent.len(), "every message reported");
    check_commands(m.output());
}

/// Every line the client wrote is one CRLF-terminated command with a known verb.
fn check_commands(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(out.ends_with(b"\r\n"));
    for line in out[..out.len() - 1].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").expect("every line ends in CRLF");
        assert!(!line.contains(&b'\r'));
        let verb = line.split(|&b| b == b' ').next().unwrap_or(b"");
        assert!(
            [
                &b"EHLO"[..],
                b"HELO",
                b"MAIL",
                b"RCPT",
                b"DATA",
                b"BDAT",
                b"RSET",
                b"QUIT"
            ]
            .contains(&verb),
            "unexpected command {:?}",
            String::from_utf8_lossy(line)
        );
    }
}

/// Runs one SASL exchange on `data`. The first byte picks the side (bit 0: the client), the
/// mechanism (bits 1-3), the grammar pass (bit 4: the target base64-encodes each line, so the
/// fuzzer works on the decoded grammars) and the session (bits 5-7). The rest is lines split
/// at LF: the client's responses for the provider's exchange (the first line, when not empty,
/// is the initial response), or the server's replies for the client (first byte of a line: the
/// code, the rest: the text, in which `%N` stands for the client's nonce).
///
/// Provider side: every challenge is base64, every success names the one account (with a
/// server-final exactly for SCRAM), every failure is a permanent 501/504/535/538 with an
/// enhanced status, and once the exchange is over every further line is a 501.
/// Client side: it never writes a line with CR or LF, it never authenticates with SCRAM (no
/// input can forge the server signature without the verifier), and once it is over every
/// further reply is out of place.
pub fn sasl(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let lines: Vec<&[u8]> = data
        .get(1..)
        .unwrap_or(&[])
        .split(|&b| b == b'\n')
        .collect();
    if flags & 1 == 0 {
        sasl_server(flags, &lines);
    } else {
        sasl_client(flags, &lines);
    }
}

fn sasl_server(flags: u8, lines: &[&[u8]]) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mech = Mechanism::ALL[usize::from(flags >> 1 & 7) % Mechanism::ALL.len()];
    let tls = flags & 0x20 != 0;
    let ctx = SaslContext {
        hostname: "mx.example",
        tls,
        allow_plaintext: flags & 0x40 != 0,
        cram_md5_requires_tls: flags & 0xc0 == 0xc0,
        random: &[9; 32],
        unix_time: 1_700_000_000,
        secret: b"fuzz secret",
        fake_iterations: 16,
        tls_exporter: tls.then_some(&[0xab; 32][..]),
        peer_identity: tls.then_some("CN=gw"),
        plus_offered: flags & 0x80 != 0,
    };
    let lines: Vec<String> = lines
        .iter()
        .map(|l| match flags & 0x10 {
            0 => String::from_utf8_lossy(l).into_owned(),
            _ => b64.encode(l),
        })
        .collect();
    let (first, rest) = lines
        .split_first()
        .map_or((None, &[][..]), |(f, r)| (Some(f), r));
    let initial = first.map(String::as_str).filter(|l| !l.is_empty());
    let (mut ex, mut step) = SaslExchange::start(mech, initial, &ctx, &FuzzCreds);
    if let Err(refusal) = mech.check(&ctx) {
        assert_eq!(step, SaslStep::Failure(refusal));
    }
    let mut over = false;
    for line in rest {
        match &step {
            SaslStep::Challenge(payload) => {
                assert!(!over, "a challenge after the end");
                assert!(b64.decode(payload).is_ok(), "challenge {payload:?}");
            }
            SaslStep::Success {
                account,
                server_final,
            } => {
                assert!(!over, "a success after the end");
                assert_eq!(account, "user");
                let scram = matches!(mech, Mechanism::ScramSha256 | Mechanism::ScramSha256Plus);
                assert_eq!(server_final.is_some(), scram);
                if let Some(v) = server_final {
                    assert!(b64.decode(v).expect("base64").starts_with(b"v="));
                }
                over = true;
            }
            SaslStep::Failure(reply) => {
                assert!([501, 504, 535, 538].contains(&reply.code), "{reply:?}");
                assert!(reply.is_permanent() && reply.status.is_some(), "{reply:?}");
                if over {
                    assert_eq!(reply.code, 501);
                }
                over = true;
            }
        }
        step = ex.step(line, &FuzzCreds);
    }
}

fn sasl_client(flags: u8, lines: &[&[u8]]) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    const MECHANISMS: [Mechanism; 6] = [
        Mechanism::Plain,
        Mechanism::Login,
        Mechanism::CramMd5,
        Mechanism::ScramSha256,
        Mechanism::External,
        Mechanism::ScramSha256Plus,
    ];
    const CODES: [u16; 8] = [334, 334, 334, 235, 504, 535, 538, 250];
    let mech = MECHANISMS[usize::from(flags >> 1 & 7) % MECHANISMS.len()];
    let mechanisms = match flags & 0x20 {
        0 => vec![mech],
        _ => vec![mech, Mechanism::Login],
    };
    let nonce = "fuzzNonce";
    let creds = ClientCredentials {
        user: "user",
        password: "pencil",
        nonce,
    };
    let (mut client, first) = SaslClient::start(&mechanisms, creds);
    assert!(first.starts_with("AUTH ") && !first.contains(['\r', '\n']));
    let mut over = false;
    for line in lines {
        let code = line.first().map_or(334, |&b| CODES[usize::from(b % 8)]);
        let raw = String::from_utf8_lossy(line.get(1..).unwrap_or(&[])).replace("%N", nonce);
        let text = match flags & 0x10 {
            0 => raw,
            _ => b64.encode(raw),
        };
        let step = client.handle_reply(code, &text);
        if over {
            assert_eq!(step, ClientStep::Failed(ClientError::Unexpected(code)));
            continue;
        }
        match step {
            ClientStep::Send(line) => assert!(!line.contains(['\r', '\n']), "{line:?}"),
            ClientStep::Authenticated => {
                assert_ne!(
                    client.mechanism(),
                    Mechanism::ScramSha256,
                    "SCRAM authenticated without the server's proof"
                );
                over = true;
            }
            ClientStep::Refused | ClientStep::Cancel(_) | ClientStep::Failed(_) => over = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_accept_edge_inputs() {
        for input in [
            &b""[..],
            b"\r\n",
            b"\n",
            b"\r",
            b".\r\n",
            b"\xff\xfe",
            b"EHLO x\r\nDATA\r\n",
        ] {
            command(input);
            data(input);
            inbound(input);
            reversed(input);
            sasl(input);
        }
    }
}
