//! One ODMR session from the customer's side (RFC 2645 §4): connect, greet, optionally
//! STARTTLS (verifying the provider's certificate before any credential is sent), AUTH, ATRN,
//! then turn around and receive the held mail as an SMTP server.
//!
//! After the turnaround the customer *is* an SMTP server, so the receiving side is the same
//! sans-IO [`Inbound`] machine the provider's MX uses, driven over the same connection (TLS
//! roles do not change: the customer stays the TLS client). Every message goes to a
//! [`Sink`]; the customer's 250 is sent only after the sink returned, so a message the sink
//! did not take stays held at the provider.
//!
//! Turnaround injection (PROTOCOL.md §3.4): the customer sends its 220 only after reading the
//! 250 to ATRN, and no byte read before it is carried across; bytes that arrive together with
//! the 250 are a protocol error.
//!
//! Steps, each with its own failure ([`SessionError`] says which, `turnpike pull` turns it
//! into an exit code):
//!
//! ```text
//! connect --(implicit TLS)--> 220 --> EHLO --(STARTTLS, EHLO)--> AUTH --> upload --> ATRN
//!   Unreachable              Tls                 Tls          AuthRefused  (none   AtrnRefused
//!                                                                          yet)      | 250
//!                                       receive: 220, EHLO/MAIL/RCPT/DATA... QUIT <--+
//! ```
//!
//! Every read has a stall timeout (`idle_timeout`), except the ATRN reply, which RFC 2645
//! §5.2.1 says to await for at least ten minutes (`atrn_timeout`). Every write has the stall
//! timeout too, so a provider that stops reading cannot hang the customer.
//!
//! The sink writes our `Received:` field (naming the provider's address, which it gets from
//! `turnpike pull` before each session); the loop guard ([`InboundConfig::max_hops`]) refuses
//! a message that already has too many. A lingering provider (push, `turnpike account
//! linger`) keeps the reversed session open and sends NOOPs; the session simply keeps
//! receiving until the provider's QUIT.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::borrow::Cow;
use std::net::ToSocketAddrs;

use crate::proto::inbound::{Action, Directory, Inbound, InboundConfig, Incoming, RcptVerdict};
use crate::proto::reply::{EnhancedStatus, Reply};
use crate::proto::sasl::{self, ClientCredentials, ClientStep, SaslClient};
use crate::proto::stuff;
use crate::runtime::conn::Conn;
use crate::runtime::io::{IoKind, Stream};
use crate::spool::Outcome;
use crate::types::{BodyType, DomainName, Mailbox, Notify, Recipient, Ret};

use super::outbox::{self, reply_text, Outbox, Queued, Refused};

/// How the customer authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// The strongest the provider offers in EHLO: EXTERNAL (when the TLS configuration holds
    /// a client certificate), then, with a password, SCRAM-SHA-256, PLAIN (inside TLS only),
    /// CRAM-MD5.
    Auto,
    /// RFC 5802 / RFC 7677 SCRAM-SHA-256; the provider's signature is verified.
    ScramSha256,
    /// RFC 4616 PLAIN, sent as chosen, even without TLS (the operator's explicit choice).
    Plain,
    /// RFC 2195 CRAM-MD5 (what fetchmail speaks).
    CramMd5,
    /// RFC 4422 EXTERNAL: the TLS client certificate of the [`Tls`] configuration.
    External,
}

/// Whether and how the session is encrypted.
#[derive(Clone)]
pub enum Tls {
    /// No TLS (loopback tests, or an explicit operator opt-in).
    None,
    /// STARTTLS after the first EHLO, verifying the provider as `server_name`.
    StartTls {
        /// Trust anchors for the provider's certificate (and our client certificate, if any).
        config: Arc<rustls::ClientConfig>,
        /// The name the certificate must carry.
        server_name: rustls::pki_types::ServerName<'static>,
    },
    /// TLS from the first byte (the provider's `listen.odmrs`), verifying as `server_name`.
    Implicit {
        /// Trust anchors for the provider's certificate (and our client certificate, if any).
        config: Arc<rustls::ClientConfig>,
        /// The name the certificate must carry.
        server_name: rustls::pki_types::ServerName<'static>,
    },
}

impl Tls {
    /// True when the TLS configuration carries a client certificate (for EXTERNAL).
    fn has_client_cert(&self) -> bool {
        match self {
            Tls::None => false,
            Tls::StartTls { config, .. } | Tls::Implicit { config, .. } => {
                config.client_auth_cert_resolver.has_certs()
            }
        }
    }
}

/// What one session needs.
#[derive(Clone)]
pub struct SessionConfig {
    /// The provider's ODMR address.
    pub provider: SocketAddr,
    /// Our name in EHLO and in the 220 after the turnaround.
    pub hostname: String,
    /// Encryption.
    pub tls: Tls,
    /// Account name.
    pub account: String,
    /// Password.
    pub password: String,
    /// SASL mechanism.
    pub mechanism: Mechanism,
    /// Domains to ask for; empty = bare ATRN (all of the account's).
    pub domains: Vec<DomainName>,
    /// How long to wait for the ATRN reply (RFC 2645: at least 10 minutes).
    pub atrn_timeout: Duration,
    /// Idle timeout for every other read.
    pub idle_timeout: Duration,
}

/// Where received messages go. `deliver` returns only once the message is durably handed
/// over (or refused); its result becomes our reply to the provider. The sink writes our
/// `Received:` field (it knows each recipient, for the `for` clause).
#[allow(async_fn_in_trait)]
pub trait Sink {
    /// Takes one message.
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply>;

    /// Whether a recipient (already in a requested domain) can be taken, answered at RCPT
    /// time so that the provider can bounce just that recipient. Default: yes.
    fn check_recipient(&self, _rcpt: &Mailbox) -> RcptVerdict {
        RcptVerdict::Accept
    }

    /// The provider answered ATRN with `code` after `waited` (for load generators that
    /// measure it). Default: nothing.
    fn atrn_answered(&mut self, _code: u16, _waited: Duration) {}
}

/// Why a session ended without receiving.
#[derive(Debug)]
pub enum SessionError {
    /// The provider could not be reached (connect refused, unreachable, timed out).
    Unreachable(std::io::Error),
    /// TLS could not be set up: handshake or certificate verification failed, or STARTTLS is
    /// not offered although it was required.
    Tls(String),
    /// The connection failed during the session.
    Io(std::io::Error),
    /// The provider said something we cannot work with.
    Protocol(String),
    /// AUTH was refused.
    AuthRefused(String),
    /// ATRN was answered with a non-250 code (450, 451, 453, 502, 530, ...).
    AtrnRefused {
        /// The reply code.
        code: u16,
        /// The reply text.
        text: String,
    },
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Unreachable(e) => write!(f, "provider unreachable: {e}"),
            SessionError::Tls(s) => write!(f, "TLS failure: {s}"),
            SessionError::Io(e) => write!(f, "connection failed: {e}"),
            SessionError::Protocol(s) => write!(f, "protocol error: {s}"),
            SessionError::AuthRefused(s) => write!(f, "authentication refused: {s}"),
            SessionError::AtrnRefused { code, text } => write!(f, "ATRN refused: {code} {text}"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<std::io::Error> for SessionError {
    fn from(e: std::io::Error) -> Self {
        SessionError::Io(e)
    }
}

/// What a session received.
#[derive(Debug, Default)]
pub struct Received {
    /// Messages accepted (sink returned Ok).
    pub messages: u64,
    /// Body bytes of those messages (with our `Received:` field).
    pub bytes: u64,
    /// Messages the sink refused (they stay held at the provider).
    pub refused: u64,
}

/// Accepts recipients only in the domains this session asked for (or any, for a bare ATRN),
/// so a provider bug can never make us take another customer's mail; then asks the sink
/// whether it has somewhere to put the recipient.
struct RecipientPolicy<'a, S> {
    requested: &'a [DomainName],
    sink: &'a S,
}

impl<S: Sink> Directory for RecipientPolicy<'_, S> {
    fn check_rcpt(&self, rcpt: &Mailbox, _size: Option<u64>) -> RcptVerdict {
        let requested = self.requested.is_empty()
            || DomainName::parse(&rcpt.domain).is_ok_and(|d| self.requested.contains(&d));
        if !requested {
            return RcptVerdict::Reject(Reply::with_status(
                550,
                (5, 7, 1),
                format!("{} was not requested in this session", rcpt.domain),
            ));
        }
        self.sink.check_recipient(rcpt)
    }
}

/// Outgoing mail to upload before ATRN (see [`run_with_outbox`]).
pub struct Upload<'a> {
    /// The queue.
    pub outbox: &'a Outbox,
    /// The provider's submission port (host, port), used when its ODMR port does not take
    /// mail; same TLS mode, trust and credentials as the ODMR connection.
    pub submission: Option<(String, u16)>,
}

/// Runs one session to its end.
pub async fn run(
    io: IoKind,
    cfg: &SessionConfig,
    sink: &mut impl Sink,
) -> Result<Received, SessionError> {
    run_with_outbox(io, cfg, sink, None).await
}

/// Runs one session to its end, uploading the outbox's mail between AUTH and ATRN. Bounces
/// for mail the provider refused for good go to `sink` when the sender is one of its
/// recipients.
pub async fn run_with_outbox(
    io: IoKind,
    cfg: &SessionConfig,
    sink: &mut impl Sink,
    upload: Option<&Upload<'_>>,
) -> Result<Received, SessionError> {
    let (mut c, caps) = open(io, cfg, cfg.provider).await?;
    if let Some(upload) = upload {
        if !upload.outbox.is_empty() {
            let done = c.upload(cfg, &caps, upload.outbox, sink).await?;
            if done == UploadEnd::MailNotTaken {
                upload_via_submission(io, cfg, upload, sink).await;
            }
        }
        // Also after a restart with nothing queued: the segments of earlier runs go.
        upload.outbox.reclaim().await;
    }

    let atrn = if cfg.domains.is_empty() {
        "ATRN".to_string()
    } else {
        let list: Vec<&str> = cfg.domains.iter().map(|d| d.as_str()).collect();
        format!("ATRN {}", list.join(","))
    };
    let asked = std::time::Instant::now();
    c.send(&atrn).await?;
    let (code, text) = c.reply(cfg.atrn_timeout).await?;
    sink.atrn_answered(code, asked.elapsed());
    if code != 250 {
        let _ = c.send("QUIT").await;
        return Err(SessionError::AtrnRefused { code, text });
    }
    if !c.buf.is_empty() {
        return Err(SessionError::Protocol(
            "bytes arrived together with the ATRN reply".into(),
        ));
    }
    c.receive(cfg, sink).await
}

/// The provider's ODMR port answered MAIL with 500/502 (a provider without submission on
/// it): upload over its submission port, if configured; otherwise the mail waits.
async fn upload_via_submission(
    io: IoKind,
    cfg: &SessionConfig,
    upload: &Upload<'_>,
    sink: &mut impl Sink,
) {
    let queued = upload.outbox.len();
    let Some((host, port)) = &upload.submission else {
        tracing::warn!(
            queued,
            "the provider's ODMR port does not take mail; outgoing mail \
            stays queued (set [outbox] submission to the provider's submission port)"
        );
        return;
    };
    let result = async {
        let addr = (host.as_str(), *port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                SessionError::Unreachable(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{host} has no address"),
                ))
            })?;
        let (mut c, caps) = open(io, cfg, addr).await?;
        let end = c.upload(cfg, &caps, upload.outbox, sink).await?;
        let _ = c.command("QUIT", 221).await;
        Ok::<_, SessionError>(end)
    }
    .await;
    match result {
        Ok(UploadEnd::Done) => {}
        Ok(UploadEnd::MailNotTaken) => {
            tracing::warn!(queued, submission = %format!("{host}:{port}"),
            "the provider's submission port does not take mail either; outgoing mail stays queued")
        }
        Err(e) => tracing::warn!(queued, submission = %format!("{host}:{port}"), error = %e,
            "upload over the submission port failed; outgoing mail stays queued"),
    }
}

/// Connects to `addr` and goes up to an authenticated session: implicit TLS or STARTTLS (as
/// configured), EHLO, AUTH. Returns the client and the EHLO capabilities.
async fn open(
    io: IoKind,
    cfg: &SessionConfig,
    addr: SocketAddr,
) -> Result<(Client, Vec<String>), SessionError> {
    let stream = match tokio::time::timeout(cfg.idle_timeout, Stream::connect(io, addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(SessionError::Unreachable(e)),
        Err(_) => {
            return Err(SessionError::Unreachable(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", cfg.idle_timeout),
            )))
        }
    };
    let mut c = Client {
        conn: Conn::plain(stream),
        buf: Vec::with_capacity(4096),
        idle: cfg.idle_timeout,
    };
    if let Tls::Implicit {
        config,
        server_name,
    } = &cfg.tls
    {
        c.handshake(config, server_name).await?;
    }
    c.expect(220).await?;
    let mut caps = c.ehlo(&cfg.hostname).await?;
    if let Tls::StartTls {
        config,
        server_name,
    } = &cfg.tls
    {
        // Never fall back to plaintext: a missing STARTTLS is what a downgrade looks like.
        if !caps.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS")) {
            return Err(SessionError::Tls("provider does not offer STARTTLS".into()));
        }
        c.command("STARTTLS", 220).await?;
        if !c.buf.is_empty() {
            return Err(SessionError::Protocol(
                "data pipelined after the STARTTLS reply".into(),
            ));
        }
        c.handshake(config, server_name).await?;
        caps = c.ehlo(&cfg.hostname).await?;
    }
    c.authenticate(cfg, &caps).await?;
    Ok((c, caps))
}

struct Client {
    conn: Conn,
    buf: Vec<u8>,
    idle: Duration,
}

impl Client {
    async fn handshake(
        &mut self,
        config: &Arc<rustls::ClientConfig>,
        server_name: &rustls::pki_types::ServerName<'static>,
    ) -> Result<(), SessionError> {
        let handshake = self
            .conn
            .start_tls_client(config.clone(), server_name.clone());
        match tokio::time::timeout(self.idle, handshake).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SessionError::Tls(format!("handshake failed: {e}"))),
            Err(_) => Err(SessionError::Tls(format!(
                "handshake stalled for {:?}",
                self.idle
            ))),
        }
    }

    async fn send(&mut self, line: &str) -> Result<(), SessionError> {
        let write = self.conn.write_owned(format!("{line}\r\n").into_bytes());
        match tokio::time::timeout(self.idle, write).await {
            Ok((r, _)) => r.map_err(SessionError::Io),
            Err(_) => Err(stalled_write()),
        }
    }

    /// Reads one (possibly multi-line) reply: code and the text lines.
    async fn reply_lines(&mut self, wait: Duration) -> Result<(u16, Vec<String>), SessionError> {
        let mut lines = Vec::new();
        loop {
            while let Some(end) = memchr::memmem::find(&self.buf, b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
                let sep = line.as_bytes().get(3).copied();
                match (code, sep) {
                    (Some(code), Some(b' ') | None) => {
                        lines.push(line.get(4..).unwrap_or("").to_string());
                        return Ok((code, lines));
                    }
                    (Some(_), Some(b'-')) => lines.push(line[4..].to_string()),
                    _ => return Err(SessionError::Protocol(format!("bad reply line {line:?}"))),
                }
            }
            if self.buf.len() > 64 * 1024 {
                return Err(SessionError::Protocol("reply too long".into()));
            }
            match tokio::time::timeout(wait, self.conn.read_append(&mut self.buf, 4096)).await {
                Ok(Ok(0)) => {
                    return Err(SessionError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "provider closed the connection",
                    )))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(SessionError::Io(e)),
                Err(_) => {
                    return Err(SessionError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no reply within {wait:?}"),
                    )))
                }
            }
        }
    }

    async fn reply(&mut self, wait: Duration) -> Result<(u16, String), SessionError> {
        let (code, lines) = self.reply_lines(wait).await?;
        Ok((code, lines.join(" / ")))
    }

    async fn expect(&mut self, want: u16) -> Result<Vec<String>, SessionError> {
        let (code, lines) = self.reply_lines(self.idle).await?;
        if code != want {
            return Err(SessionError::Protocol(format!(
                "expected {want}, got {code} {}",
                lines.join(" / ")
            )));
        }
        Ok(lines)
    }

    async fn command(&mut self, line: &str, want: u16) -> Result<Vec<String>, SessionError> {
        self.send(line).await?;
        self.expect(want).await
    }

    async fn ehlo(&mut self, hostname: &str) -> Result<Vec<String>, SessionError> {
        let lines = self.command(&format!("EHLO {hostname}"), 250).await?;
        Ok(lines.into_iter().skip(1).collect())
    }

    async fn authenticate(
        &mut self,
        cfg: &SessionConfig,
        caps: &[String],
    ) -> Result<(), SessionError> {
        let mechanism = match cfg.mechanism {
            Mechanism::Auto => {
                let offered = sasl::client::offered_mechanisms(caps);
                sasl::client::choose(
                    &offered,
                    self.conn.is_tls(),
                    cfg.tls.has_client_cert(),
                    !cfg.password.is_empty(),
                )
                .ok_or_else(|| {
                    SessionError::AuthRefused(format!(
                        "the provider offers no mechanism we may use here (offered: {}{})",
                        if offered.is_empty() {
                            "none".to_string()
                        } else {
                            offered.join(" ")
                        },
                        if self.conn.is_tls() {
                            ""
                        } else {
                            "; PLAIN is only sent inside TLS"
                        }
                    ))
                })?
            }
            Mechanism::ScramSha256 => sasl::Mechanism::ScramSha256,
            Mechanism::Plain => sasl::Mechanism::Plain,
            Mechanism::CramMd5 => sasl::Mechanism::CramMd5,
            Mechanism::External => sasl::Mechanism::External,
        };
        let mut random = [0u8; 18];
        getrandom::fill(&mut random)
            .map_err(|e| SessionError::Io(io::Error::other(e.to_string())))?;
        let nonce = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, random);
        let creds = ClientCredentials {
            user: &cfg.account,
            password: &cfg.password,
            nonce: &nonce,
        };
        let (mut client, mut line) = SaslClient::start(&[mechanism], creds);
        loop {
            self.send(&line).await?;
            let (code, text) = self.reply(self.idle).await?;
            match client.handle_reply(code, &text) {
                ClientStep::Send(next) => line = next,
                ClientStep::Authenticated => break,
                ClientStep::Refused => {
                    return Err(SessionError::AuthRefused(format!("{code} {text}")))
                }
                ClientStep::Cancel(e) => {
                    let _ = self.send("*").await;
                    return Err(SessionError::AuthRefused(e.to_string()));
                }
                ClientStep::Failed(e) => return Err(SessionError::AuthRefused(e.to_string())),
            }
        }
        tracing::info!(mechanism = mechanism.name(), "authenticated");
        Ok(())
    }

    /// Uploads the queued outgoing mail (authenticated submission, before ATRN on the ODMR
    /// session). Per message: the provider's 250 marks it done; a 4xx keeps it (a 4xx to
    /// MAIL, such as the rate limit, also ends this session's upload); a 5xx bounces to the
    /// sender and marks it done once the report is delivered. See [`apply`].
    async fn upload(
        &mut self,
        cfg: &SessionConfig,
        caps: &[String],
        outbox: &Outbox,
        sink: &mut impl Sink,
    ) -> Result<UploadEnd, SessionError> {
        let mut tally = Tally::default();
        for q in outbox.pending() {
            let body = match outbox.body(&q).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(id = %q.id, error = %e, "cannot read queued outgoing mail; it stays queued");
                    tally.kept += 1;
                    continue;
                }
            };
            let result = self.transfer(caps, &q, &body).await?;
            let stop = result.stop;
            if result.not_taken {
                tracing::info!(id = %q.id, "the provider does not take mail on this port (MAIL answered 500/502)");
                return Ok(UploadEnd::MailNotTaken);
            }
            apply(cfg, outbox, sink, &q, &body, result, &mut tally).await;
            if stop {
                break;
            }
        }
        tracing::info!(
            uploaded = tally.uploaded,
            bounced = tally.bounced,
            kept = tally.kept,
            queued = outbox.len(),
            "outbox upload done"
        );
        Ok(UploadEnd::Done)
    }

    /// One message: MAIL, RCPT each, then BDAT (with CHUNKING) or DATA. Connection failures
    /// and `421` are errors (the message stays queued); every other reply is in the result.
    async fn transfer(
        &mut self,
        caps: &[String],
        q: &Queued,
        body: &[u8],
    ) -> Result<Transfer, SessionError> {
        let dsn = offers(caps, "DSN");
        let chunking = offers(caps, "CHUNKING");
        let env = &q.envelope;
        let mut t = Transfer::default();
        let everyone = |t: &mut Transfer, reply: &Reply, rcpts: &[Recipient]| {
            for r in rcpts {
                if reply.is_permanent() {
                    t.refused.push(Refused {
                        recipient: r.clone(),
                        reply: reply.clone(),
                    });
                } else {
                    t.deferred.push((r.clone(), reply.clone()));
                }
            }
        };
        if env.body == BodyType::BinaryMime && !chunking {
            let reply = Reply::with_status(
                451,
                (4, 3, 0),
                "BINARYMIME needs CHUNKING, which this provider port does not offer",
            );
            everyone(&mut t, &reply, &env.recipients);
            return Ok(t);
        }
        let mut mail = format!("MAIL FROM:<{}>", sender_path(env.sender.as_ref()));
        if offers(caps, "SIZE") {
            mail.push_str(&format!(" SIZE={}", body.len()));
        }
        match env.body {
            BodyType::SevenBit => {}
            BodyType::EightBitMime => mail.push_str(" BODY=8BITMIME"),
            BodyType::BinaryMime => mail.push_str(" BODY=BINARYMIME"),
        }
        if env.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        if dsn {
            match env.ret {
                Some(Ret::Full) => mail.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => mail.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &env.envid {
                mail.push_str(&format!(" ENVID={envid}"));
            }
        }
        let reply = self.request(&mail).await?;
        if matches!(reply.code, 500 | 502) {
            t.not_taken = true;
            return Ok(t);
        }
        if !reply.is_positive() {
            t.stop = reply.is_transient();
            log_refusal(q, None, &reply);
            everyone(&mut t, &reply, &env.recipients);
            return Ok(t);
        }
        let mut accepted: Vec<Recipient> = Vec::new();
        for r in &env.recipients {
            let mut rcpt = format!("RCPT TO:<{}>", r.mailbox);
            if dsn {
                if let Some(n) = r.notify {
                    rcpt.push_str(&format!(" NOTIFY={}", notify_param(n)));
                }
                if let Some(orcpt) = &r.orcpt {
                    rcpt.push_str(&format!(" ORCPT={orcpt}"));
                }
            }
            let reply = self.request(&rcpt).await?;
            if reply.is_positive() {
                accepted.push(r.clone());
            } else {
                log_refusal(q, Some(&r.mailbox), &reply);
                everyone(&mut t, &reply, std::slice::from_ref(r));
            }
        }
        if accepted.is_empty() {
            self.command("RSET", 250).await?;
            return Ok(t);
        }
        let reply = if chunking {
            let mut wire = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
            wire.extend_from_slice(body);
            self.send_bytes(wire).await?;
            self.final_reply().await?
        } else {
            let reply = self.request("DATA").await?;
            if reply.code != 354 {
                reply
            } else {
                self.send_bytes(stuff::stuff(body)).await?;
                self.final_reply().await?
            }
        };
        if reply.is_positive() {
            t.delivered = accepted.len();
            tracing::info!(id = %q.id, recipients = accepted.len(), bytes = body.len(),
                provider = %reply_text(&reply), "outgoing mail uploaded");
        } else {
            log_refusal(q, None, &reply);
            everyone(&mut t, &reply, &accepted);
        }
        Ok(t)
    }

    /// Sends a command and reads its reply (`421` is an error: the provider is closing).
    async fn request(&mut self, line: &str) -> Result<Reply, SessionError> {
        self.send(line).await?;
        self.final_reply().await
    }

    async fn final_reply(&mut self) -> Result<Reply, SessionError> {
        let (code, lines) = self.reply_lines(self.idle).await?;
        if code == 421 {
            return Err(SessionError::Protocol(format!(
                "provider closing: 421 {}",
                lines.join(" / ")
            )));
        }
        Ok(parse_reply(code, lines))
    }

    async fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<(), SessionError> {
        match tokio::time::timeout(self.idle, self.conn.write_owned(bytes)).await {
            Ok((r, _)) => r.map_err(SessionError::Io),
            Err(_) => Err(stalled_write()),
        }
    }

    /// The reversed session: we are the SMTP server now.
    async fn receive(
        mut self,
        cfg: &SessionConfig,
        sink: &mut impl Sink,
    ) -> Result<Received, SessionError> {
        let mut machine_cfg = InboundConfig::new(cfg.hostname.clone());
        machine_cfg.max_message_size = u64::MAX / 2;
        machine_cfg.max_recipients = 10_000;
        machine_cfg.max_line_length = 4096;
        machine_cfg.max_commands_without_progress = 1_000;
        // The TLS session (if any) carries on across the turnaround; the `with` type says so.
        machine_cfg.tls_active = self.conn.is_tls();
        let mut machine = Inbound::new(machine_cfg);
        let mut got = Received::default();
        let mut input: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut pos = 0;
        loop {
            let directory = RecipientPolicy {
                requested: &cfg.domains,
                sink: &*sink,
            };
            pos += machine.handle_input(&input[pos..], &directory);
            let mut acted = false;
            while let Some(action) = machine.poll_action() {
                acted = true;
                match action {
                    Action::Deliver(message) => {
                        let id = format!("{:x}.{}", unix_now(), got.messages + 1);
                        let bytes = message.body.len() as u64;
                        let result = sink.deliver(message).await;
                        match &result {
                            Ok(()) => {
                                got.messages += 1;
                                got.bytes += bytes;
                            }
                            Err(reply) => {
                                got.refused += 1;
                                tracing::warn!(
                                    code = reply.code,
                                    reply = %reply.lines.join(" "),
                                    "delivery refused a message; it stays held at the provider"
                                );
                            }
                        }
                        machine.stored(result.map(|()| id));
                    }
                    // Bodies come whole: this listener leaves `body_chunk` off.
                    Action::StoreChunk(_) | Action::DiscardChunks => {}
                    Action::StartTls => {
                        return Err(SessionError::Protocol(
                            "provider asked for STARTTLS after ATRN".into(),
                        ))
                    }
                    Action::Close => {
                        self.flush(&mut machine).await?;
                        self.conn.close().await;
                        return Ok(got);
                    }
                }
            }
            if machine.is_closed() {
                self.flush(&mut machine).await?;
                return Ok(got);
            }
            if acted && pos < input.len() {
                // The machine stops at a message until it is stored: the provider may have
                // pipelined more behind it (its window), which is already here.
                continue;
            }
            if pos > 0 && pos == input.len() {
                input.clear();
                pos = 0;
            } else if pos >= 64 * 1024 {
                input.drain(..pos);
                pos = 0;
            }
            self.flush(&mut machine).await?;
            match tokio::time::timeout(self.idle, self.conn.read_append(&mut input, 64 * 1024))
                .await
            {
                Ok(Ok(0)) => {
                    // Without QUIT: the provider died or the line dropped. What was delivered
                    // is safe; the rest is still held, and the session counts as failed.
                    return Err(SessionError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "provider closed the connection without QUIT after {} messages",
                            got.messages
                        ),
                    )));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(SessionError::Io(e)),
                Err(_) => {
                    tracing::warn!(idle = ?self.idle, "provider stalled after the turnaround");
                    machine.timed_out();
                    self.flush(&mut machine).await?;
                    return Err(SessionError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "provider silent for {:?} after the turnaround ({} messages taken)",
                            self.idle, got.messages
                        ),
                    )));
                }
            }
        }
    }

    async fn flush(&mut self, machine: &mut Inbound) -> Result<(), SessionError> {
        match tokio::time::timeout(self.idle, self.conn.flush_buffer(machine.output())).await {
            Ok(r) => r.map_err(SessionError::Io),
            Err(_) => Err(stalled_write()),
        }
    }
}

/// How an upload over one connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UploadEnd {
    /// Every queued message was tried (or a 4xx to MAIL ended the upload for now).
    Done,
    /// MAIL was answered 500/502: this port takes no mail.
    MailNotTaken,
}

/// What the provider said about one message's recipients.
#[derive(Debug, Default)]
struct Transfer {
    /// Recipients that have the message (the provider's 250 after the data).
    delivered: usize,
    /// Refused for good (5xx): the sender gets a report.
    refused: Vec<Refused>,
    /// Refused for now (4xx): they stay queued.
    deferred: Vec<(Recipient, Reply)>,
    /// MAIL was answered 500/502.
    not_taken: bool,
    /// A 4xx to MAIL (a rate limit, a full queue): stop uploading in this session.
    stop: bool,
}

#[derive(Debug, Default)]
struct Tally {
    uploaded: u64,
    bounced: u64,
    kept: u64,
}

/// Turns a [`Transfer`] into journal records. A refused recipient is done only once its
/// sender has the report (or the sender is not ours to report to, which is logged loudly);
/// recipients still to go are queued again on their own; nothing changes when nobody got it.
async fn apply(
    cfg: &SessionConfig,
    outbox: &Outbox,
    sink: &mut impl Sink,
    q: &Queued,
    body: &[u8],
    t: Transfer,
    tally: &mut Tally,
) {
    let mut keep: Vec<Recipient> = t.deferred.into_iter().map(|(r, _)| r).collect();
    let bounced = !t.refused.is_empty() && bounce_to_sender(cfg, sink, q, body, &t.refused).await;
    if !t.refused.is_empty() && !bounced {
        keep.extend(t.refused.iter().map(|r| r.recipient.clone()));
    }
    let total = q.envelope.recipients.len();
    let journal = if keep.len() == total {
        tally.kept += 1;
        return;
    } else if keep.is_empty() {
        let outcome = if t.delivered > 0 {
            Outcome::Delivered
        } else {
            Outcome::Bounced
        };
        outbox.finish(q, outcome).await.map(|()| None)
    } else {
        let n = keep.len();
        outbox
            .requeue(q, keep, body)
            .await
            .map(Some)
            .map(|id| id.map(|id| (id, n)))
    };
    match journal {
        Ok(None) => {}
        Ok(Some((id, n))) => {
            tally.kept += 1;
            tracing::info!(old = %q.id, new = %id, recipients = n, "recipients still to upload queued again on their own");
        }
        Err(e) => {
            tracing::error!(id = %q.id, error = %e, "cannot record the upload in the outbox journal; the message may be sent again");
        }
    }
    if t.delivered > 0 {
        tally.uploaded += 1;
    }
    if bounced {
        tally.bounced += 1;
    }
}

/// Delivers the report about `refused` to the sender through the sink, when the sender is
/// one of its recipients. True when the sender has it (or nobody can: `<>`, or a sender we
/// do not deliver for, logged loudly).
async fn bounce_to_sender(
    cfg: &SessionConfig,
    sink: &mut impl Sink,
    q: &Queued,
    body: &[u8],
    refused: &[Refused],
) -> bool {
    let who: Vec<String> = refused
        .iter()
        .map(|r| r.recipient.mailbox.to_string())
        .collect();
    let Some(sender) = q.envelope.sender.as_ref() else {
        tracing::warn!(id = %q.id, refused = %who.join(", "), "outgoing mail from <> refused by the provider; no report (never bounce a bounce)");
        return true;
    };
    if let RcptVerdict::Reject(_) = sink.check_recipient(sender) {
        tracing::error!(id = %q.id, %sender, refused = %who.join(", "),
            reason = %reply_text(&refused[0].reply),
            "OUTGOING MAIL REFUSED by the provider and its sender is not a local recipient: \
             no report can be delivered; the message is dropped from the outbox");
        return true;
    }
    let provider = cfg.provider.ip().to_string();
    let Some(report) = outbox::bounce(&cfg.hostname, &provider, q, body, refused, unix_now())
    else {
        return true;
    };
    match sink.deliver(report).await {
        Ok(()) => {
            tracing::warn!(id = %q.id, %sender, refused = %who.join(", "),
                reason = %reply_text(&refused[0].reply), "outgoing mail refused by the provider; report delivered to the sender");
            true
        }
        Err(reply) => {
            tracing::error!(id = %q.id, %sender, error = %reply_text(&reply),
                "cannot deliver the report for refused outgoing mail; the message stays queued");
            false
        }
    }
}

fn log_refusal(q: &Queued, rcpt: Option<&Mailbox>, reply: &Reply) {
    let rcpt = rcpt.map_or_else(|| "(all)".to_string(), |m| m.to_string());
    if reply.is_permanent() {
        tracing::warn!(id = %q.id, %rcpt, provider = %reply_text(reply), "provider refused outgoing mail");
    } else {
        tracing::info!(id = %q.id, %rcpt, provider = %reply_text(reply), "provider deferred outgoing mail; it stays queued");
    }
}

/// True when an EHLO line announces `keyword` (the first word, case-insensitive).
fn offers(caps: &[String], keyword: &str) -> bool {
    caps.iter().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
    })
}

/// A reply as read: the enhanced status (if the first line has one) split off.
fn parse_reply(code: u16, lines: Vec<String>) -> Reply {
    let first = lines.first().map(String::as_str).unwrap_or("");
    let status = first.split_once(' ').map_or(first, |(s, _)| s);
    let parsed = {
        let mut it = status.split('.');
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(c), Some(s), Some(d), None) => c
                .parse::<u8>()
                .ok()
                .zip(s.parse::<u16>().ok())
                .zip(d.parse::<u16>().ok())
                .map(|((c, s), d)| EnhancedStatus::new(c, s, d))
                .filter(|e| u16::from(e.class) == code / 100),
            _ => None,
        }
    };
    let text: Vec<String> = lines
        .iter()
        .map(|l| match parsed {
            Some(_) => l.split_once(' ').map_or("", |(_, t)| t).to_string(),
            None => l.clone(),
        })
        .collect();
    Reply {
        code,
        status: parsed,
        lines: text.into_iter().map(Cow::Owned).collect(),
    }
}

fn sender_path(sender: Option<&Mailbox>) -> String {
    sender.map_or_else(String::new, |m| m.to_string())
}

/// RFC 3461 §4.1 NOTIFY value.
fn notify_param(n: Notify) -> String {
    if n.never {
        return "NEVER".into();
    }
    let mut v = Vec::new();
    if n.success {
        v.push("SUCCESS");
    }
    if n.failure {
        v.push("FAILURE");
    }
    if n.delay {
        v.push("DELAY");
    }
    v.join(",")
}

fn stalled_write() -> SessionError {
    SessionError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        "provider stopped reading (write stalled)",
    ))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that knows only `known@` recipients.
    struct KnownOnly;

    impl Sink for KnownOnly {
        async fn deliver(&mut self, _message: Incoming) -> Result<(), Reply> {
            Ok(())
        }
        fn check_recipient(&self, rcpt: &Mailbox) -> RcptVerdict {
            if rcpt.local == "known" {
                RcptVerdict::Accept
            } else {
                RcptVerdict::Reject(Reply::with_status(550, (5, 1, 1), "unknown"))
            }
        }
    }

    fn verdict(requested: &[&str], rcpt: &str) -> u16 {
        let requested: Vec<DomainName> = requested
            .iter()
            .map(|d| DomainName::parse(d).unwrap())
            .collect();
        let (local, domain) = rcpt.split_once('@').unwrap();
        let mailbox = Mailbox {
            local: local.into(),
            domain: domain.into(),
        };
        let policy = RecipientPolicy {
            requested: &requested,
            sink: &KnownOnly,
        };
        match policy.check_rcpt(&mailbox, None) {
            RcptVerdict::Accept => 250,
            RcptVerdict::Reject(r) => r.code,
        }
    }

    #[test]
    fn provider_replies_keep_their_enhanced_status() {
        let r = parse_reply(553, vec!["5.7.1 Sender not yours".into()]);
        assert_eq!(r.status, Some(EnhancedStatus::new(5, 7, 1)));
        assert_eq!(r.lines, ["Sender not yours"]);
        assert_eq!(reply_text(&r), "553 5.7.1 Sender not yours");
        // No status, or one of another class: the text stays whole.
        let r = parse_reply(502, vec!["Command not implemented".into()]);
        assert_eq!((r.status, r.lines.len()), (None, 1));
        let r = parse_reply(450, vec!["5.7.1 odd".into()]);
        assert_eq!(r.status, None);
        assert_eq!(r.lines, ["5.7.1 odd"]);
        let caps: Vec<String> = vec!["SIZE 1000".into(), "chunking".into()];
        assert!(offers(&caps, "SIZE") && offers(&caps, "CHUNKING") && !offers(&caps, "DSN"));
        let n = Notify {
            never: false,
            success: true,
            failure: true,
            delay: false,
        };
        assert_eq!(notify_param(n), "SUCCESS,FAILURE");
    }

    #[test]
    fn only_requested_domains_then_the_sinks_recipients() {
        assert_eq!(verdict(&["office.test"], "known@office.test"), 250);
        assert_eq!(verdict(&["office.test"], "known@OFFICE.test"), 250);
        assert_eq!(verdict(&["office.test"], "known@other.test"), 550);
        assert_eq!(verdict(&["office.test"], "stranger@office.test"), 550);
        // Bare ATRN: every domain the provider sends is the account's; the sink decides.
        assert_eq!(verdict(&[], "known@any.test"), 250);
        assert_eq!(verdict(&[], "stranger@any.test"), 550);
    }
}
