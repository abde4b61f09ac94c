//! `turnpike pull`: collect the held mail from the provider and deliver it, once or as a
//! daemon (`--every`).
//!
//! What this owns: turning a [`PullConfig`] into sessions, the exit code of a single run
//! ([`ExitStatus`]), and the daemon's timing (interval with jitter, exponential backoff while
//! sessions fail, a clean stop on SIGTERM/SIGINT).
//!
//! A stop signal during a session abandons it at once: the message being received gets no
//! 250, so the provider keeps it and hands it over again next time (a duplicate at worst,
//! never a loss). Between sessions the daemon simply exits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::deliver::{Deliverer, DeliveryError};
use super::pull_config::{PullConfig, PullConfigError, TlsMode};
use super::session::{self, Received, SessionError, Sink};
use crate::proto::inbound::{Incoming, RcptVerdict};
use crate::proto::reply::Reply;
use crate::runtime::io::IoKind;
use crate::types::Mailbox;

/// What a single `turnpike pull` run ended with; its [`code`](ExitStatus::code) is the
/// process exit code (docs/customer.md lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitStatus {
    /// 0: the session completed and every message received was delivered.
    Received,
    /// 2: the configuration (file or flags) is unusable.
    Config,
    /// 10: nothing is held (453, or a 250 followed by no message).
    NothingHeld,
    /// 11: ATRN refused with 450 (a domain is not the account's, or asked too soon).
    AtrnRefused,
    /// 12: ATRN answered 451 (the provider cannot serve these domains right now).
    AtrnUnavailable,
    /// 13: ATRN answered 502 (not an ODMR port, or ATRN disabled there).
    AtrnNotImplemented,
    /// 14: ATRN answered 530 (the provider does not consider us authenticated).
    AtrnNeedsAuth,
    /// 15: ATRN answered some other code.
    AtrnOther,
    /// 20: authentication was refused (or no usable mechanism, or SCRAM failed).
    AuthRefused,
    /// 30: the provider could not be reached.
    Unreachable,
    /// 31: TLS could not be set up (handshake, certificate, STARTTLS missing).
    Tls,
    /// 32: the session broke after connecting (connection lost, protocol error, stall).
    SessionFailed,
    /// 40: some messages were refused by the delivery targets; they stay held.
    DeliveryDeferred,
}

impl ExitStatus {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Received => 0,
            ExitStatus::Config => 2,
            ExitStatus::NothingHeld => 10,
            ExitStatus::AtrnRefused => 11,
            ExitStatus::AtrnUnavailable => 12,
            ExitStatus::AtrnNotImplemented => 13,
            ExitStatus::AtrnNeedsAuth => 14,
            ExitStatus::AtrnOther => 15,
            ExitStatus::AuthRefused => 20,
            ExitStatus::Unreachable => 30,
            ExitStatus::Tls => 31,
            ExitStatus::SessionFailed => 32,
            ExitStatus::DeliveryDeferred => 40,
        }
    }

    /// Classifies a session's result.
    pub fn of(result: &Result<Received, SessionError>) -> ExitStatus {
        match result {
            Ok(got) if got.refused > 0 => ExitStatus::DeliveryDeferred,
            Ok(got) if got.messages == 0 => ExitStatus::NothingHeld,
            Ok(_) => ExitStatus::Received,
            Err(SessionError::Unreachable(_)) => ExitStatus::Unreachable,
            Err(SessionError::Tls(_)) => ExitStatus::Tls,
            Err(SessionError::Io(_) | SessionError::Protocol(_)) => ExitStatus::SessionFailed,
            Err(SessionError::AuthRefused(_)) => ExitStatus::AuthRefused,
            Err(SessionError::AtrnRefused { code, .. }) => match code {
                453 => ExitStatus::NothingHeld,
                450 => ExitStatus::AtrnRefused,
                451 => ExitStatus::AtrnUnavailable,
                502 => ExitStatus::AtrnNotImplemented,
                530 => ExitStatus::AtrnNeedsAuth,
                _ => ExitStatus::AtrnOther,
            },
        }
    }

    /// True when the daemon should back off before the next attempt.
    fn is_failure(self) -> bool {
        !matches!(
            self,
            ExitStatus::Received | ExitStatus::NothingHeld | ExitStatus::DeliveryDeferred
        )
    }
}

/// A session's result in plain words, for the log and the terminal.
pub fn describe(result: &Result<Received, SessionError>) -> String {
    match result {
        Ok(got) if got.refused > 0 => format!(
            "received {} messages ({} bytes); {} refused by delivery, still held at the provider",
            got.messages, got.bytes, got.refused
        ),
        Ok(got) if got.messages == 0 => "no mail is held for us".to_string(),
        Ok(got) => format!("received {} messages ({} bytes)", got.messages, got.bytes),
        Err(SessionError::AtrnRefused { code, text }) => {
            let words = match code {
                453 => "no mail is held for us",
                450 => {
                    "the provider refused ATRN: a requested domain is not this account's, \
                     or we asked again too soon"
                }
                451 => {
                    "the provider cannot serve ATRN now (another session holds the domains, \
                     or its account data is unavailable); try again later"
                }
                502 => "ATRN is not available on this port: check provider.address",
                530 => "the provider says we are not authenticated",
                _ => "the provider refused ATRN",
            };
            format!("{words} ({code} {text})")
        }
        Err(e) => e.to_string(),
    }
}

/// Why `turnpike pull` could not start.
#[derive(Debug)]
pub enum PullError {
    /// The configuration is unusable.
    Config(PullConfigError),
    /// A delivery target could not be opened.
    Delivery(DeliveryError),
    /// The runtime could not start.
    Runtime(std::io::Error),
}

impl fmt::Display for PullError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PullError::Config(e) => e.fmt(f),
            PullError::Delivery(e) => write!(f, "delivery: {e}"),
            PullError::Runtime(e) => write!(f, "cannot start the runtime: {e}"),
        }
    }
}

impl std::error::Error for PullError {}

/// Everything checked and opened once, before the first session.
pub struct Puller {
    config: PullConfig,
    password: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    deliverer: Deliverer,
}

impl Puller {
    /// Reads the secret, loads the TLS material and opens the delivery targets; every
    /// failure here is a configuration error (exit 2), never a failed session.
    pub fn new(config: PullConfig) -> Result<Puller, PullError> {
        let password = config.password().map_err(PullError::Config)?;
        let tls = match config.tls {
            TlsMode::None => None,
            _ => Some(config.tls_client_config().map_err(PullError::Config)?),
        };
        let deliverer = Deliverer::from_config(&config.delivery).map_err(PullError::Delivery)?;
        Ok(Puller {
            config,
            password,
            tls,
            deliverer,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &PullConfig {
        &self.config
    }

    /// Runs one session.
    pub async fn once(&mut self, io: IoKind) -> Result<Received, SessionError> {
        let session = self
            .config
            .session(self.tls.as_ref(), &self.password)
            .map_err(SessionError::Unreachable)?;
        self.deliverer
            .set_session(&self.config.hostname, session.provider.ip());
        let mut sink = DeliverySink(&mut self.deliverer);
        session::run(io, &session, &mut sink).await
    }

    /// Runs sessions every `every` (with ±10% jitter, and exponential backoff up to
    /// `max_backoff` while they fail) until SIGTERM or SIGINT.
    pub async fn every(&mut self, io: IoKind, every: Duration) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut failures: u32 = 0;
        tracing::info!(?every, provider = %format!("{}:{}", self.config.host, self.config.port),
            "pull daemon started");
        loop {
            let result = tokio::select! {
                r = self.once(io) => r,
                _ = term.recv() => return stopped("SIGTERM", true),
                _ = int.recv() => return stopped("SIGINT", true),
            };
            let status = ExitStatus::of(&result);
            failures = if status.is_failure() {
                failures.saturating_add(1)
            } else {
                0
            };
            let wait = jittered(next_wait(every, self.config.max_backoff, failures));
            let next = format!("{:.1}s", wait.as_secs_f64());
            if status.is_failure() {
                tracing::warn!(
                    exit = status.code(),
                    failures,
                    next,
                    "session failed: {}",
                    describe(&result)
                );
            } else {
                tracing::info!(next, "session done: {}", describe(&result));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = term.recv() => return stopped("SIGTERM", false),
                _ = int.recv() => return stopped("SIGINT", false),
            }
        }
    }
}

fn stopped(signal: &str, mid_session: bool) -> std::io::Result<()> {
    if mid_session {
        tracing::info!(
            signal,
            "stopping mid-session; the message in hand (if any) stays held at the provider"
        );
    } else {
        tracing::info!(signal, "stopping");
    }
    Ok(())
}

/// The wait before the next session: `every` after a success; after `failures` failures in a
/// row, `every` doubled per failure, capped at `max_backoff` (but never below `every`).
pub fn next_wait(every: Duration, max_backoff: Duration, failures: u32) -> Duration {
    let cap = max_backoff.max(every);
    every
        .checked_mul(1u32 << failures.min(20))
        .map_or(cap, |d| d.min(cap))
}

/// `wait` moved by up to ±10%, so that many customers on the same schedule spread out.
fn jittered(wait: Duration) -> Duration {
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let unit = f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX); // 0..=1
    wait.mul_f64(0.9 + 0.2 * unit)
}

/// The deliverer as the session sees it: recipients are checked at RCPT time.
struct DeliverySink<'a>(&'a mut Deliverer);

impl Sink for DeliverySink<'_> {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        self.0.deliver(message).await
    }

    fn check_recipient(&self, rcpt: &Mailbox) -> RcptVerdict {
        self.0.check_recipient(rcpt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let m = Duration::from_secs(60);
        let cap = Duration::from_secs(3600);
        assert_eq!(next_wait(m * 5, cap, 0), m * 5);
        assert_eq!(next_wait(m * 5, cap, 1), m * 10);
        assert_eq!(next_wait(m * 5, cap, 3), m * 40);
        assert_eq!(next_wait(m * 5, cap, 4), cap);
        assert_eq!(next_wait(m * 5, cap, u32::MAX), cap);
        // A cap below the interval never shortens it.
        assert_eq!(next_wait(m * 120, cap, 3), m * 120);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let base = Duration::from_secs(300);
        for _ in 0..200 {
            let j = jittered(base);
            assert!(j >= base.mul_f64(0.9) && j <= base.mul_f64(1.1), "{j:?}");
        }
    }

    #[test]
    fn every_outcome_has_its_own_code() {
        let io = |k| SessionError::Io(std::io::Error::new(k, "x"));
        let atrn = |code| SessionError::AtrnRefused {
            code,
            text: "x".into(),
        };
        let got = |messages, refused| Received {
            messages,
            bytes: 0,
            refused,
        };
        let cases: Vec<(Result<Received, SessionError>, u8)> = vec![
            (Ok(got(3, 0)), 0),
            (Ok(got(0, 0)), 10),
            (Err(atrn(453)), 10),
            (Err(atrn(450)), 11),
            (Err(atrn(451)), 12),
            (Err(atrn(502)), 13),
            (Err(atrn(530)), 14),
            (Err(atrn(554)), 15),
            (Err(SessionError::AuthRefused("535".into())), 20),
            (
                Err(SessionError::Unreachable(
                    std::io::ErrorKind::ConnectionRefused.into(),
                )),
                30,
            ),
            (Err(SessionError::Tls("bad cert".into())), 31),
            (Err(io(std::io::ErrorKind::UnexpectedEof)), 32),
            (Err(SessionError::Protocol("x".into())), 32),
            (Ok(got(2, 1)), 40),
        ];
        for (result, code) in &cases {
            assert_eq!(ExitStatus::of(result).code(), *code, "{result:?}");
        }
        assert!(describe(&Err(atrn(453))).starts_with("no mail is held for us (453"));
        assert!(describe(&Err(atrn(450))).contains("not this account's"));
    }
}
