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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use crate::proto::inbound::{Action, Directory, Inbound, InboundConfig, Incoming, RcptVerdict};
use crate::proto::reply::Reply;
use crate::runtime::conn::Conn;
use crate::runtime::io::{IoKind, Stream};
use crate::types::{DomainName, Mailbox};

/// How the customer authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616 PLAIN (only sent inside TLS unless `allow_plaintext` is set).
    Plain,
    /// RFC 2195 CRAM-MD5 (what fetchmail speaks).
    CramMd5,
}

/// Whether and how the session is encrypted.
#[derive(Clone)]
pub enum Tls {
    /// No TLS (loopback tests, or an explicit operator opt-in).
    None,
    /// STARTTLS after the first EHLO, verifying the provider as `server_name`.
    StartTls {
        /// Trust anchors for the provider's certificate.
        config: Arc<rustls::ClientConfig>,
        /// The name the certificate must carry.
        server_name: rustls::pki_types::ServerName<'static>,
    },
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
/// over (or refused); its result becomes our reply to the provider.
#[allow(async_fn_in_trait)]
pub trait Sink {
    /// Takes one message.
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply>;
}

/// Why a session ended without receiving.
#[derive(Debug)]
pub enum SessionError {
    /// Network or TLS failure.
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
    /// Body bytes of those messages.
    pub bytes: u64,
}

/// Accepts recipients only in the domains this session asked for (or any, for a bare ATRN),
/// so a provider bug can never make us take another customer's mail.
struct RequestedDomains<'a>(&'a [DomainName]);

impl Directory for RequestedDomains<'_> {
    fn check_rcpt(&self, rcpt: &Mailbox, _size: Option<u64>) -> RcptVerdict {
        if self.0.is_empty() || DomainName::parse(&rcpt.domain).is_ok_and(|d| self.0.contains(&d)) {
            return RcptVerdict::Accept;
        }
        RcptVerdict::Reject(Reply::with_status(
            550,
            (5, 7, 1),
            format!("{} was not requested in this session", rcpt.domain),
        ))
    }
}

/// Runs one session to its end.
pub async fn run(
    io: IoKind,
    cfg: &SessionConfig,
    sink: &mut impl Sink,
) -> Result<Received, SessionError> {
    let stream = Stream::connect(io, cfg.provider).await?;
    let mut c = Client {
        conn: Conn::plain(stream),
        buf: Vec::with_capacity(4096),
        idle: cfg.idle_timeout,
    };
    c.expect(220).await?;
    let mut caps = c.ehlo(&cfg.hostname).await?;
    if let Tls::StartTls {
        config,
        server_name,
    } = &cfg.tls
    {
        if !caps.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS")) {
            return Err(SessionError::Protocol(
                "provider does not offer STARTTLS".into(),
            ));
        }
        c.command("STARTTLS", 220).await?;
        if !c.buf.is_empty() {
            return Err(SessionError::Protocol(
                "data pipelined after the STARTTLS reply".into(),
            ));
        }
        c.conn
            .start_tls_client(config.clone(), server_name.clone())
            .await?;
        caps = c.ehlo(&cfg.hostname).await?;
    }
    let _ = caps;
    c.authenticate(cfg).await?;

    let atrn = if cfg.domains.is_empty() {
        "ATRN".to_string()
    } else {
        let list: Vec<&str> = cfg.domains.iter().map(|d| d.as_str()).collect();
        format!("ATRN {}", list.join(","))
    };
    c.send(&atrn).await?;
    let (code, text) = c.reply(cfg.atrn_timeout).await?;
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

struct Client {
    conn: Conn,
    buf: Vec<u8>,
    idle: Duration,
}

impl Client {
    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        let (r, _) = self
            .conn
            .write_owned(format!("{line}\r\n").into_bytes())
            .await;
        r
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
                    return Err(SessionError::Protocol(
                        "provider closed the connection".into(),
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(SessionError::Io(e)),
                Err(_) => {
                    return Err(SessionError::Protocol(
                        "timed out waiting for a reply".into(),
                    ))
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

    async fn authenticate(&mut self, cfg: &SessionConfig) -> Result<(), SessionError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (code, text) = match cfg.mechanism {
            Mechanism::Plain => {
                let token = b64.encode(format!("\0{}\0{}", cfg.account, cfg.password));
                self.send(&format!("AUTH PLAIN {token}")).await?;
                self.reply(self.idle).await?
            }
            Mechanism::CramMd5 => {
                self.send("AUTH CRAM-MD5").await?;
                let (code, challenge) = self.reply(self.idle).await?;
                if code != 334 {
                    return Err(SessionError::AuthRefused(format!("{code} {challenge}")));
                }
                let challenge = b64.decode(challenge.trim()).map_err(|_| {
                    SessionError::Protocol("CRAM-MD5 challenge is not base64".into())
                })?;
                let digest =
                    crate::accounts::CramMd5Key::from_password(&cfg.password).digest(&challenge);
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                self.send(&b64.encode(format!("{} {hex}", cfg.account)))
                    .await?;
                self.reply(self.idle).await?
            }
        };
        if code != 235 {
            return Err(SessionError::AuthRefused(format!("{code} {text}")));
        }
        Ok(())
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
        let mut machine = Inbound::new(machine_cfg);
        let directory = RequestedDomains(&cfg.domains);
        let mut got = Received::default();
        let mut input: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut pos = 0;
        loop {
            pos += machine.handle_input(&input[pos..], &directory);
            let mut acted = false;
            while let Some(action) = machine.poll_action() {
                acted = true;
                match action {
                    Action::Deliver(message) => {
                        let bytes = message.body.len() as u64;
                        let result = sink.deliver(message).await;
                        if result.is_ok() {
                            got.messages += 1;
                            got.bytes += bytes;
                        }
                        machine.stored(result.map(|()| format!("{}", got.messages)));
                    }
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
                Ok(Ok(0)) => return Ok(got),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(SessionError::Io(e)),
                Err(_) => {
                    machine.timed_out();
                    self.flush(&mut machine).await?;
                    return Ok(got);
                }
            }
        }
    }

    async fn flush(&mut self, machine: &mut Inbound) -> std::io::Result<()> {
        self.conn.flush_buffer(machine.output()).await
    }
}
