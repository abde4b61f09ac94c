//! The typed TOML configuration (`turnpike.toml`) and its embedded defaults.
//!
//! What this owns: turning the operator's file into typed values once, at startup (STYLE
//! convention 4, "parse, don't validate"). Durations become [`Duration`], sizes become byte counts,
//! addresses become [`SocketAddr`]s and quota keys become [`DomainName`]s; nothing downstream
//! re-parses a string.
//!
//! Invariants:
//!
//! - Zero configuration works: every key has a default, and [`Config::default()`] is exactly
//!   what an empty file parses to.
//! - Every error names the file, the key as a dotted path and what is wrong, e.g.
//!   `turnpike.toml: limits.max_message_size: expected a size like "50MiB", got "fifty"`.
//! - Unknown keys are errors, named with the keys that would have been accepted, so a typo never
//!   silently leaves a default in force.
//! - There is no switch to turn fsync off: held mail must survive power loss once a 250 was sent.
//!
//! File format (every key optional; the values shown are the defaults):
//!
//! ```toml
//! [server]
//! hostname = "mx.example.net"        # default: the system host name, else "localhost"
//! data_dir = "./turnpike-data"       # the CLI's --data-dir overrides this
//! cores = 0                          # 0 = every online core
//! io = "auto"                        # "auto" | "uring" | "epoll"
//!
//! [listen]                           # each is one address or a list; [] disables the service
//! mx = ["127.0.0.1:2525"]
//! odmr = ["127.0.0.1:3366"]
//! odmrs = ["127.0.0.1:3367"]         # ODMR over implicit TLS (fetchmail's `ssl`)
//! submission = ["127.0.0.1:2587"]     # STARTTLS
//! submissions = ["127.0.0.1:2465"]    # implicit TLS
//! metrics = ["127.0.0.1:9366"]
//!
//! [tls]                              # both or neither; neither = a self-signed certificate
//! cert = "/etc/turnpike/cert.pem"    # generated in <data_dir>/tls/ on first run
//! key = "/etc/turnpike/key.pem"
//!
//! [limits]
//! max_message_size = "50MiB"
//! max_recipients = 100
//! max_line_length = 2048
//! max_commands_without_progress = 20
//! max_errors = 10
//! max_hops = 50
//! idle_timeout = "5m"
//! session_timeout = "30m"
//! max_connections_per_ip = 20
//! max_connections = 10000
//! trusted_networks = ["127.0.0.0/8", "::1"]  # exempt from max_connections_per_ip
//!
//! [spool]
//! segment_size = "64MiB"
//! max_hold = "30d"
//! default_quota = "2GiB"             # held bytes per domain
//! compact_live_ratio = 0.5
//! scrub_rate = "4MiB"                # per second and core, re-checking older segments; 0 = off
//! scrub_interval = "1d"              # pause between two scrub passes
//! # fsync = true                     # accepted; false is refused (always fsync before 250)
//!
//! [submission]                       # per-account rate limits of authenticated submission
//! period = "1h"                      # the window the counts below apply to
//! messages_per_period = 200          # more: 450 4.7.1 at MAIL; 0 = no limit
//! recipients_per_period = 1000       # more: 452 4.5.3 at RCPT; 0 = no limit
//! recipients_per_message = 50        # more: 452 4.5.3 at RCPT; 0 = no limit
//!
//! [quota]                            # per-domain overrides of spool.default_quota
//! "example.com" = "10GiB"
//! ```
//!
//! Durations are a whole number followed by `s`, `m`, `h` or `d`. Sizes are a whole number of
//! bytes, optionally followed by a unit: `KB`, `MB`, `GB`, `TB` (powers of 1000) or `KiB`, `MiB`,
//! `GiB`, `TiB` (powers of 1024); letter case of the unit does not matter. Relative paths are
//! relative to the working directory.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::types::{DomainName, Network};

/// The whole configuration, as typed values. `Config::default()` is the zero-config setup.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// `[server]`: identity, data directory and threading.
    pub server: ServerSettings,
    /// `[listen]`: the addresses of each service.
    pub listen: ListenSettings,
    /// `[tls]`: where the certificate and key come from.
    pub tls: TlsSettings,
    /// `[limits]`: every per-session and per-host limit (DESIGN "Bad input").
    pub limits: Limits,
    /// `[spool]`: the held-mail journal.
    pub spool: SpoolSettings,
    /// `[odmr]`: the ODMR listener's authentication and ATRN policy.
    pub odmr: OdmrSettings,
    /// `[submission]`: per-account rate limits of authenticated submission.
    pub submission: SubmissionSettings,
    /// `[quota]`: held-bytes limits for particular domains, overriding
    /// [`SpoolSettings::default_quota`].
    pub quota: BTreeMap<DomainName, u64>,
    /// `[relay]`: how the outbound queue (mail for domains not hosted here) leaves.
    pub relay: RelaySettings,
}

/// `[relay]`: delivery of the outbound queue (docs/relay.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// Where outbound mail goes.
    pub mode: RelayMode,
    /// The DNS server for MX lookups (`None`: the system's /etc/resolv.conf).
    pub resolver: Option<SocketAddr>,
    /// The port MX hosts are contacted on (25; tests point it elsewhere).
    pub mx_port: u16,
    /// Delay before the first retry of a deferred destination; doubled per failed attempt.
    pub first_retry: Duration,
    /// The longest delay between two attempts.
    pub max_retry_interval: Duration,
    /// A message still undelivered this long after it was received is reported to its sender
    /// as failed and dropped.
    pub give_up_after: Duration,
    /// Longest wait for a TCP connection to a destination.
    pub connect_timeout: Duration,
}

/// Where outbound mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayMode {
    /// The outbound queue waits (reports and mail for foreign domains stay queued).
    Off,
    /// Directly to each domain's MX hosts (RFC 5321 §5.1), opportunistic STARTTLS.
    Mx,
    /// Everything to one relay host.
    Smarthost(Smarthost),
}

/// A smarthost and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smarthost {
    /// `host:port`.
    pub host: String,
    /// The port.
    pub port: u16,
    /// TLS policy.
    pub tls: SmarthostTls,
    /// AUTH user name; with `password_file`, AUTH PLAIN (or LOGIN) after TLS.
    pub username: Option<String>,
    /// File whose first line is the AUTH password.
    pub password_file: Option<PathBuf>,
    /// PEM certificate(s) the smarthost's certificate must chain to; without it the
    /// certificate is not verified (encrypted, not authenticated).
    pub ca_file: Option<PathBuf>,
}

/// TLS toward the smarthost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmarthostTls {
    /// STARTTLS must be offered and succeed, else the mail waits.
    StarttlsRequired,
    /// STARTTLS when offered.
    Opportunistic,
    /// TLS from the first byte (port 465 style).
    Implicit,
    /// Plain text.
    None,
}

impl Smarthost {
    /// Parses `host:port` (the `--smarthost` form) with the default TLS policy
    /// (opportunistic) and no AUTH.
    pub fn parse(s: &str) -> Option<Smarthost> {
        let (host, port) = s.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some(Smarthost {
            host: host.to_string(),
            port: port.parse().ok()?,
            tls: SmarthostTls::Opportunistic,
            username: None,
            password_file: None,
            ca_file: None,
        })
    }
}

impl Default for RelaySettings {
    fn default() -> RelaySettings {
        RelaySettings {
            mode: RelayMode::Off,
            resolver: None,
            mx_port: 25,
            first_retry: Duration::from_secs(5 * 60),
            max_retry_interval: Duration::from_secs(60 * 60),
            give_up_after: Duration::from_secs(5 * DAY),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// The name this host uses in greetings, EHLO and Received: lines. Defaults to the system
    /// host name (`gethostname(2)`), or `localhost` when that is not a valid domain name.
    pub hostname: DomainName,
    /// Where the journal, accounts file and generated certificate live.
    pub data_dir: PathBuf,
    /// How many cores to run on; 0 means every online core.
    pub cores: usize,
    /// Which I/O driver to use.
    pub io: IoBackend,
}

/// The I/O driver (`server.io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum IoBackend {
    /// io_uring when the kernel allows it, epoll otherwise.
    #[default]
    Auto,
    /// io_uring only; starting fails where it is blocked.
    Uring,
    /// epoll only.
    Epoll,
}

impl IoBackend {
    /// The spelling used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            IoBackend::Auto => "auto",
            IoBackend::Uring => "uring",
            IoBackend::Epoll => "epoll",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[listen]`: each service binds every address in its list; an empty list disables it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSettings {
    /// Inbound SMTP for hosted domains (port 25 in production).
    pub mx: Vec<SocketAddr>,
    /// ODMR, where customers authenticate and send ATRN (port 366 in production).
    pub odmr: Vec<SocketAddr>,
    /// ODMR over implicit TLS (TLS from the first byte: fetchmail's `--ssl`, service
    /// `odmrs`). No port is registered for it; 127.0.0.1:3367 by default.
    pub odmrs: Vec<SocketAddr>,
    /// Message submission with STARTTLS (port 587 in production).
    pub submission: Vec<SocketAddr>,
    /// Message submission over implicit TLS (port 465 in production).
    pub submissions: Vec<SocketAddr>,
    /// The Prometheus text endpoint.
    pub metrics: Vec<SocketAddr>,
}

/// `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// Where the provider's certificate and key come from.
    pub identity: TlsIdentity,
}

/// The provider's TLS certificate source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsIdentity {
    /// Neither `tls.cert` nor `tls.key` is set: use (and on first run generate) a self-signed
    /// certificate in `<data_dir>/tls/` (see [`crate::tls::ensure_self_signed`]).
    #[default]
    SelfSigned,
    /// Both are set.
    Files {
        /// PEM certificate chain, leaf first.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
}

/// `[limits]`: every limit is explicit, so every violation gets a precise reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest message accepted, in bytes (advertised as SIZE).
    pub max_message_size: u64,
    /// Most recipients per message.
    pub max_recipients: u32,
    /// Longest command or text line in octets, CRLF included (at least 1000, RFC 5321
    /// §4.5.3.1.6).
    pub max_line_length: usize,
    /// Commands in a row that do not advance a transaction (NOOP, RSET, VRFY...) before the
    /// session is closed.
    pub max_commands_without_progress: u32,
    /// Failed commands per session before it is closed.
    pub max_errors: u32,
    /// Most Received: headers before a message is refused as looping.
    pub max_hops: u32,
    /// Longest wait for a complete command line (counted from the end of the previous
    /// command, so bytes that trickle in do not extend it), and the slack of a data transfer.
    pub idle_timeout: Duration,
    /// Least average rate of a DATA or BDAT transfer, in bytes per second (0: none): each byte
    /// received extends the transfer's deadline (`idle_timeout` after it started) by
    /// 1/rate seconds, as Postfix's `smtpd_min_data_rate` does.
    pub min_data_rate: u32,
    /// Longest whole session.
    pub session_timeout: Duration,
    /// Simultaneous connections from one IP address.
    pub max_connections_per_ip: u32,
    /// Simultaneous connections in total.
    pub max_connections: u32,
    /// Client networks exempt from `max_connections_per_ip` (Postfix exempts `$mynetworks`
    /// the same way): the provider's own relays, monitoring and load generators. Loopback by
    /// default. `max_connections` still applies to them.
    pub trusted_networks: Vec<Network>,
}

/// `[odmr]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OdmrSettings {
    /// Offer PLAIN and LOGIN, which send the password itself, on a connection without TLS
    /// (RFC 4954 §4 wants it configurable; off by default: passwords only inside TLS).
    pub allow_plaintext_auth: bool,
    /// Offer CRAM-MD5 only inside TLS. Off by default: CRAM-MD5 never puts the password on
    /// the wire, RFC 2645 makes it a MUST, and fetchmail's ODMR mode has nothing else and no
    /// STARTTLS (Dovecot and Exim offer it without TLS too).
    pub cram_md5_requires_tls: bool,
    /// The shortest interval between two ATRN requests of one account; more often is
    /// answered `450 4.7.0` (RFC 2645 §5.2.1 allows it). Zero turns the limit off.
    pub min_atrn_interval: Duration,
    /// How long a lingering (push) session stays open after its queue drained.
    pub linger_max: Duration,
    /// How often a lingering session sends NOOP, well inside the customer's idle timeout
    /// (RFC 5321: at least 5 minutes).
    pub linger_keepalive: Duration,
    /// Failed-login throttle (on the submission ports too): the delay after the first
    /// failure, doubled per failure up to `auth_max_delay`; zero: no delays.
    pub auth_failure_delay: Duration,
    /// The longest such delay.
    pub auth_max_delay: Duration,
    /// The most an account's failures from every address together delay a login, so that
    /// guessing from elsewhere never locks its owner out.
    pub auth_account_max_delay: Duration,
    /// Failures for one account from one client address before that address gets `454
    /// 4.7.0` for it (15 minutes).
    pub auth_failures_per_client: u32,
    /// Failures from one address, any account, before it gets `421 4.7.0` (15 minutes).
    pub auth_failures_per_address: u32,
}

impl Default for OdmrSettings {
    fn default() -> OdmrSettings {
        OdmrSettings {
            allow_plaintext_auth: false,
            cram_md5_requires_tls: false,
            min_atrn_interval: Duration::ZERO,
            linger_max: Duration::from_secs(3600),
            linger_keepalive: Duration::from_secs(60),
            auth_failure_delay: Duration::from_millis(500),
            auth_max_delay: Duration::from_secs(8),
            auth_account_max_delay: Duration::from_secs(2),
            auth_failures_per_client: 10,
            auth_failures_per_address: 30,
        }
    }
}

/// `[submission]`: how much one account may submit (ODMR before ATRN and the submission
/// ports together). Counts are per account, over a fixed window of `period`; 0 turns a limit
/// off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmissionSettings {
    /// The window the per-period counts apply to.
    pub period: Duration,
    /// Messages per period; one more is refused `450 4.7.1` at MAIL.
    pub messages_per_period: u32,
    /// Recipients per period; one more is refused `452 4.5.3` at RCPT.
    pub recipients_per_period: u32,
    /// Recipients per message; one more is refused `452 4.5.3` at RCPT.
    pub recipients_per_message: u32,
}

impl Default for SubmissionSettings {
    fn default() -> SubmissionSettings {
        SubmissionSettings {
            period: Duration::from_secs(3600),
            messages_per_period: 200,
            recipients_per_period: 1000,
            recipients_per_message: 50,
        }
    }
}

/// `[spool]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolSettings {
    /// Size at which a journal segment file is rotated, in bytes.
    pub segment_size: u64,
    /// How long a message part is held before it is bounced to its sender.
    pub max_hold: Duration,
    /// Held bytes allowed per domain unless `[quota]` says otherwise.
    pub default_quota: u64,
    /// A segment whose live bytes fall below this fraction of its size is compacted
    /// (strictly between 0 and 1).
    pub compact_live_ratio: f64,
    /// Bytes per second (per core) the background scrub re-reads to verify the checksums of
    /// held mail in older segments; 0 turns it off.
    pub scrub_rate: u64,
    /// Pause between the end of one scrub pass and the start of the next.
    pub scrub_interval: Duration,
}

impl Config {
    /// Reads and parses the file at `path`. Errors name `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, ConfigErrorKind::Read(e)))?;
        Config::parse(&text, path)
    }

    /// Parses `source`, the text of the file `file` (used only to name it in errors).
    pub fn parse(source: &str, file: &Path) -> Result<Config, ConfigError> {
        let table: Table = source.parse().map_err(|e: toml::de::Error| {
            let (line, column) = e.span().map_or((0, 0), |s| line_column(source, s.start));
            let message = e.message().trim_end().to_owned();
            ConfigError::new(
                file,
                None,
                ConfigErrorKind::Syntax {
                    line,
                    column,
                    message,
                },
            )
        })?;
        Parser { file }.config(&table)
    }

    /// Replaces `server.data_dir` (the CLI's `--data-dir` wins over the file).
    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> Config {
        self.server.data_dir = dir.into();
        self
    }

    /// The held-bytes quota of `domain`: its `[quota]` entry, else `spool.default_quota`.
    pub fn quota_for(&self, domain: &DomainName) -> u64 {
        self.quota
            .get(domain)
            .copied()
            .unwrap_or(self.spool.default_quota)
    }
}

impl Default for ServerSettings {
    fn default() -> ServerSettings {
        ServerSettings {
            hostname: system_hostname(),
            data_dir: PathBuf::from("./turnpike-data"),
            cores: 0,
            io: IoBackend::Auto,
        }
    }
}

impl Default for ListenSettings {
    fn default() -> ListenSettings {
        let local = |port| vec![SocketAddr::from(([127, 0, 0, 1], port))];
        ListenSettings {
            mx: local(2525),
            odmr: local(3366),
            submission: local(2587),
            submissions: local(2465),
            odmrs: local(3367),
            metrics: local(9366),
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_size: 50 * MIB,
            max_recipients: 100,
            max_line_length: 2048,
            max_commands_without_progress: 20,
            max_errors: 10,
            max_hops: 50,
            idle_timeout: Duration::from_secs(5 * 60),
            min_data_rate: 500,
            session_timeout: Duration::from_secs(30 * 60),
            max_connections_per_ip: 20,
            trusted_networks: Network::loopback(),
            max_connections: 10_000,
        }
    }
}

impl Default for SpoolSettings {
    fn default() -> SpoolSettings {
        SpoolSettings {
            segment_size: 64 * MIB,
            max_hold: Duration::from_secs(30 * DAY),
            default_quota: 2 * 1024 * MIB,
            compact_live_ratio: 0.5,
            scrub_rate: 4 * MIB,
            scrub_interval: Duration::from_secs(DAY),
        }
    }
}

const MIB: u64 = 1024 * 1024;
const DAY: u64 = 24 * 60 * 60;

/// The system host name if it is a valid [`DomainName`], else `localhost`.
fn system_hostname() -> DomainName {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call; gethostname
    // writes at most `len` bytes into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        // POSIX leaves truncated names unterminated; treat "no NUL" as unusable.
        buf.iter()
            .position(|&b| b == 0)
            .and_then(|end| std::str::from_utf8(&buf[..end]).ok())
    } else {
        None
    };
    name.and_then(|n| DomainName::parse(n).ok())
        .unwrap_or_else(|| DomainName::parse("localhost").expect("\"localhost\" is a domain name"))
}

/// Why the configuration could not be loaded: which file, which key and what is wrong.
#[derive(Debug)]
pub struct ConfigError {
    file: PathBuf,
    key: Option<String>,
    kind: ConfigErrorKind,
}

/// What is wrong, without the file and key (see [`ConfigError`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Read(io::Error),
    /// The file is not valid TOML. `line` and `column` count from 1 (0 when unknown).
    Syntax {
        /// Line of the offending input.
        line: usize,
        /// Column (in characters) of the offending input.
        column: usize,
        /// The TOML parser's description.
        message: String,
    },
    /// The key is not one this section accepts.
    UnknownKey {
        /// The keys the section does accept.
        expected: &'static [&'static str],
    },
    /// The value has the wrong type or form.
    Invalid {
        /// What an acceptable value looks like.
        expected: String,
        /// The value as written in the file.
        got: String,
    },
    /// The value is well-formed but not allowed (out of range, conflicting with another key).
    Rejected(String),
}

impl ConfigError {
    fn new(file: &Path, key: Option<String>, kind: ConfigErrorKind) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            key,
            kind,
        }
    }

    /// The configuration file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The offending key as a dotted path (`limits.max_message_size`), when one is to blame.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// What is wrong.
    pub fn kind(&self) -> &ConfigErrorKind {
        &self.kind
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        match &self.kind {
            ConfigErrorKind::Read(e) => write!(f, "cannot read the file: {e}"),
            ConfigErrorKind::Syntax {
                line,
                column,
                message,
            } => {
                write!(f, "line {line}, column {column}: invalid TOML: {message}")
            }
            ConfigErrorKind::UnknownKey { expected } => {
                write!(f, "unknown key (expected one of: {})", expected.join(", "))
            }
            ConfigErrorKind::Invalid { expected, got } => {
                write!(f, "expected {expected}, got {got}")
            }
            ConfigErrorKind::Rejected(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ConfigErrorKind::Read(e) => Some(e),
            _ => None,
        }
    }
}

/// 1-based line and character column of byte offset `at` in `source`, for TOML errors here and
/// in the accounts file.
pub(crate) fn line_column(source: &str, at: usize) -> (usize, usize) {
    let before = &source[..at.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

const TOP_KEYS: &[&str] = &[
    "server",
    "listen",
    "tls",
    "limits",
    "spool",
    "odmr",
    "submission",
    "quota",
    "relay",
];
const SUBMISSION_KEYS: &[&str] = &[
    "period",
    "messages_per_period",
    "recipients_per_period",
    "recipients_per_message",
];
const RELAY_KEYS: &[&str] = &[
    "mode",
    "smarthost",
    "smarthost_tls",
    "username",
    "password_file",
    "ca_file",
    "resolver",
    "mx_port",
    "first_retry",
    "max_retry_interval",
    "give_up_after",
    "connect_timeout",
];
const ODMR_KEYS: &[&str] = &[
    "allow_plaintext_auth",
    "cram_md5_requires_tls",
    "min_atrn_interval",
    "linger_max",
    "linger_keepalive",
    "auth_failure_delay",
    "auth_max_delay",
    "auth_account_max_delay",
    "auth_failures_per_client",
    "auth_failures_per_address",
];
const SERVER_KEYS: &[&str] = &["hostname", "data_dir", "cores", "io"];
const LISTEN_KEYS: &[&str] = &[
    "mx",
    "odmr",
    "odmrs",
    "submission",
    "submissions",
    "metrics",
];
const TLS_KEYS: &[&str] = &["cert", "key"];
const LIMITS_KEYS: &[&str] = &[
    "max_message_size",
    "max_recipients",
    "max_line_length",
    "max_commands_without_progress",
    "max_errors",
    "max_hops",
    "idle_timeout",
    "min_data_rate",
    "session_timeout",
    "max_connections_per_ip",
    "max_connections",
    "trusted_networks",
];
const SPOOL_KEYS: &[&str] = &[
    "segment_size",
    "max_hold",
    "default_quota",
    "compact_live_ratio",
    "scrub_rate",
    "scrub_interval",
    "fsync",
];

/// Walks the parsed TOML table into a [`Config`], starting from the defaults. Each accessor
/// takes the dotted path of the value so that errors can name it.
struct Parser<'f> {
    file: &'f Path,
}

impl Parser<'_> {
    fn config(&self, top: &Table) -> Result<Config, ConfigError> {
        self.known_keys("", top, TOP_KEYS)?;
        let mut config = Config::default();
        if let Some(t) = self.section(top, "server")? {
            self.server(t, &mut config.server)?;
        }
        if let Some(t) = self.section(top, "listen")? {
            self.listen(t, &mut config.listen)?;
        }
        if let Some(t) = self.section(top, "tls")? {
            config.tls = self.tls(t)?;
        }
        if let Some(t) = self.section(top, "limits")? {
            self.limits(t, &mut config.limits)?;
        }
        if let Some(t) = self.section(top, "spool")? {
            self.spool(t, &mut config.spool)?;
        }
        if let Some(t) = self.section(top, "odmr")? {
            self.known_keys("odmr", t, ODMR_KEYS)?;
            if let Some(v) = t.get("allow_plaintext_auth") {
                config.odmr.allow_plaintext_auth = self.boolean("odmr.allow_plaintext_auth", v)?;
            }
            if let Some(v) = t.get("cram_md5_requires_tls") {
                config.odmr.cram_md5_requires_tls =
                    self.boolean("odmr.cram_md5_requires_tls", v)?;
            }
            if let Some(v) = t.get("min_atrn_interval") {
                config.odmr.min_atrn_interval =
                    self.duration_or_zero("odmr.min_atrn_interval", v)?;
            }
            if let Some(v) = t.get("linger_max") {
                config.odmr.linger_max = self.duration("odmr.linger_max", v)?;
            }
            if let Some(v) = t.get("linger_keepalive") {
                config.odmr.linger_keepalive = self.duration("odmr.linger_keepalive", v)?;
            }
            let o = &mut config.odmr;
            let delays = [
                ("auth_failure_delay", &mut o.auth_failure_delay),
                ("auth_max_delay", &mut o.auth_max_delay),
                ("auth_account_max_delay", &mut o.auth_account_max_delay),
            ];
            for (name, field) in delays {
                if let Some(v) = t.get(name) {
                    *field = self.duration_or_zero(&format!("odmr.{name}"), v)?;
                }
            }
            let counts = [
                ("auth_failures_per_client", &mut o.auth_failures_per_client),
                (
                    "auth_failures_per_address",
                    &mut o.auth_failures_per_address,
                ),
            ];
            for (name, field) in counts {
                if let Some(v) = t.get(name) {
                    let key = format!("odmr.{name}");
                    *field = self.integer(&key, v, 1, i64::from(u32::MAX))? as u32;
                }
            }
        }
        if let Some(t) = self.section(top, "submission")? {
            self.submission(t, &mut config.submission)?;
        }
        if let Some(t) = self.section(top, "quota")? {
            config.quota = self.quota(t)?;
        }
        if let Some(t) = self.section(top, "relay")? {
            self.relay(t, &mut config.relay)?;
        }
        Ok(config)
    }

    fn server(&self, t: &Table, s: &mut ServerSettings) -> Result<(), ConfigError> {
        self.known_keys("server", t, SERVER_KEYS)?;
        if let Some(v) = t.get("hostname") {
            let key = "server.hostname";
            let name = self.string(key, v, "a host name")?;
            s.hostname = DomainName::parse(name).map_err(|e| {
                self.invalid(
                    key,
                    format!("a host name (letters, digits, hyphens, dots; {e})"),
                    v,
                )
            })?;
        }
        if let Some(v) = t.get("data_dir") {
            s.data_dir = self.path("server.data_dir", v)?;
        }
        if let Some(v) = t.get("cores") {
            s.cores = self.integer("server.cores", v, 0, 4096)? as usize;
        }
        if let Some(v) = t.get("io") {
            let key = "server.io";
            let expected = "one of \"auto\", \"uring\", \"epoll\"";
            s.io = match self.string(key, v, expected)? {
                "auto" => IoBackend::Auto,
                "uring" => IoBackend::Uring,
                "epoll" => IoBackend::Epoll,
                _ => return Err(self.invalid(key, expected, v)),
            };
        }
        Ok(())
    }

    fn listen(&self, t: &Table, l: &mut ListenSettings) -> Result<(), ConfigError> {
        self.known_keys("listen", t, LISTEN_KEYS)?;
        let fields = [
            ("mx", &mut l.mx, 2525),
            ("odmr", &mut l.odmr, 3366),
            ("odmrs", &mut l.odmrs, 3367),
            ("submission", &mut l.submission, 2587),
            ("submissions", &mut l.submissions, 2465),
            ("metrics", &mut l.metrics, 9366),
        ];
        for (name, field, example_port) in fields {
            if let Some(v) = t.get(name) {
                *field = self.addresses(&format!("listen.{name}"), v, example_port)?;
            }
        }
        Ok(())
    }

    fn tls(&self, t: &Table) -> Result<TlsSettings, ConfigError> {
        self.known_keys("tls", t, TLS_KEYS)?;
        let cert = t
            .get("cert")
            .map(|v| self.path("tls.cert", v))
            .transpose()?;
        let key = t.get("key").map(|v| self.path("tls.key", v)).transpose()?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => TlsIdentity::Files { cert, key },
            (None, None) => TlsIdentity::SelfSigned,
            (Some(_), None) => return Err(self.rejected("tls.key", "missing: tls.cert is set")),
            (None, Some(_)) => return Err(self.rejected("tls.cert", "missing: tls.key is set")),
        };
        Ok(TlsSettings { identity })
    }

    fn limits(&self, t: &Table, l: &mut Limits) -> Result<(), ConfigError> {
        self.known_keys("limits", t, LIMITS_KEYS)?;
        let u32_max = i64::from(u32::MAX);
        if let Some(v) = t.get("max_message_size") {
            l.max_message_size = self.size("limits.max_message_size", v, 1)?;
        }
        let counts = [
            ("max_recipients", &mut l.max_recipients),
            (
                "max_commands_without_progress",
                &mut l.max_commands_without_progress,
            ),
            ("max_errors", &mut l.max_errors),
            ("max_hops", &mut l.max_hops),
            ("max_connections_per_ip", &mut l.max_connections_per_ip),
            ("max_connections", &mut l.max_connections),
        ];
        for (name, field) in counts {
            if let Some(v) = t.get(name) {
                *field = self.integer(&format!("limits.{name}"), v, 1, u32_max)? as u32;
            }
        }
        if let Some(v) = t.get("max_line_length") {
            // RFC 5321 §4.5.3.1.6: a server must take text lines of 1000 octets with CRLF.
            let key = "limits.max_line_length";
            l.max_line_length = self.integer(key, v, 1000, 1 << 20)? as usize;
        }
        if let Some(v) = t.get("idle_timeout") {
            l.idle_timeout = self.duration("limits.idle_timeout", v)?;
        }
        if let Some(v) = t.get("min_data_rate") {
            l.min_data_rate = self.integer("limits.min_data_rate", v, 0, u32_max)? as u32;
        }
        if let Some(v) = t.get("session_timeout") {
            l.session_timeout = self.duration("limits.session_timeout", v)?;
        }
        if let Some(v) = t.get("trusted_networks") {
            l.trusted_networks = self.networks("limits.trusted_networks", v)?;
        }
        Ok(())
    }

    fn submission(&self, t: &Table, s: &mut SubmissionSettings) -> Result<(), ConfigError> {
        self.known_keys("submission", t, SUBMISSION_KEYS)?;
        if let Some(v) = t.get("period") {
            s.period = self.duration("submission.period", v)?;
        }
        let counts = [
            ("messages_per_period", &mut s.messages_per_period),
            ("recipients_per_period", &mut s.recipients_per_period),
            ("recipients_per_message", &mut s.recipients_per_message),
        ];
        for (name, field) in counts {
            if let Some(v) = t.get(name) {
                let key = format!("submission.{name}");
                *field = self.integer(&key, v, 0, i64::from(u32::MAX))? as u32;
            }
        }
        Ok(())
    }

    fn spool(&self, t: &Table, s: &mut SpoolSettings) -> Result<(), ConfigError> {
        self.known_keys("spool", t, SPOOL_KEYS)?;
        if let Some(v) = t.get("segment_size") {
            s.segment_size = self.size("spool.segment_size", v, MIB)?;
        }
        if let Some(v) = t.get("max_hold") {
            s.max_hold = self.duration("spool.max_hold", v)?;
        }
        if let Some(v) = t.get("default_quota") {
            s.default_quota = self.size("spool.default_quota", v, 0)?;
        }
        if let Some(v) = t.get("compact_live_ratio") {
            let key = "spool.compact_live_ratio";
            let expected = "a number between 0 and 1 (exclusive)";
            let ratio = match v {
                Value::Float(f) => *f,
                _ => return Err(self.invalid(key, expected, v)),
            };
            if !(ratio > 0.0 && ratio < 1.0) {
                return Err(self.invalid(key, expected, v));
            }
            s.compact_live_ratio = ratio;
        }
        if let Some(v) = t.get("scrub_rate") {
            s.scrub_rate = self.size("spool.scrub_rate", v, 0)?;
        }
        if let Some(v) = t.get("scrub_interval") {
            s.scrub_interval = self.duration("spool.scrub_interval", v)?;
        }
        if let Some(v) = t.get("fsync") {
            // Accepted so that `fsync = true` documents intent; there is deliberately no way
            // to turn it off (no 250 before the data is on disk).
            match v {
                Value::Boolean(true) => {}
                Value::Boolean(false) => {
                    return Err(self.rejected(
                        "spool.fsync",
                        "cannot be turned off: held mail must be on disk before the 250",
                    ))
                }
                _ => return Err(self.invalid("spool.fsync", "true", v)),
            }
        }
        Ok(())
    }

    fn relay(&self, t: &Table, r: &mut RelaySettings) -> Result<(), ConfigError> {
        self.known_keys("relay", t, RELAY_KEYS)?;
        let smarthost = match t.get("smarthost") {
            Some(v) => {
                let s = self.string("relay.smarthost", v, "\"host:port\"")?;
                let host = Smarthost::parse(s)
                    .ok_or_else(|| self.invalid("relay.smarthost", "\"host:port\"", v))?;
                Some(host)
            }
            None => None,
        };
        let mode = match t.get("mode") {
            None if smarthost.is_some() => "smarthost",
            None => "off",
            Some(v) => {
                let expected = "one of \"off\", \"mx\", \"smarthost\"";
                match self.string("relay.mode", v, expected)? {
                    m @ ("off" | "mx" | "smarthost") => m,
                    _ => return Err(self.invalid("relay.mode", expected, v)),
                }
            }
        };
        r.mode = match (mode, smarthost) {
            ("off", _) => RelayMode::Off,
            ("mx", _) => RelayMode::Mx,
            (_, None) => return Err(self.rejected("relay.smarthost", "missing: mode is smarthost")),
            (_, Some(mut host)) => {
                if let Some(v) = t.get("smarthost_tls") {
                    let key = "relay.smarthost_tls";
                    let expected =
                        "one of \"starttls-required\", \"opportunistic\", \"implicit\", \"none\"";
                    host.tls = match self.string(key, v, expected)? {
                        "starttls-required" => SmarthostTls::StarttlsRequired,
                        "opportunistic" => SmarthostTls::Opportunistic,
                        "implicit" => SmarthostTls::Implicit,
                        "none" => SmarthostTls::None,
                        _ => return Err(self.invalid(key, expected, v)),
                    };
                }
                if let Some(v) = t.get("username") {
                    host.username = Some(self.string("relay.username", v, "a user name")?.into());
                }
                if let Some(v) = t.get("password_file") {
                    host.password_file = Some(self.path("relay.password_file", v)?);
                }
                if let Some(v) = t.get("ca_file") {
                    host.ca_file = Some(self.path("relay.ca_file", v)?);
                }
                if host.username.is_some() != host.password_file.is_some() {
                    return Err(
                        self.rejected("relay.username", "username and password_file go together")
                    );
                }
                RelayMode::Smarthost(host)
            }
        };
        if let Some(v) = t.get("resolver") {
            let one = self.addresses("relay.resolver", v, 53)?.into_iter().next();
            r.resolver = Some(one.ok_or_else(|| self.invalid("relay.resolver", "an address", v))?);
        }
        if let Some(v) = t.get("mx_port") {
            r.mx_port = self.integer("relay.mx_port", v, 1, 65535)? as u16;
        }
        if let Some(v) = t.get("first_retry") {
            r.first_retry = self.duration("relay.first_retry", v)?;
        }
        if let Some(v) = t.get("max_retry_interval") {
            r.max_retry_interval = self.duration("relay.max_retry_interval", v)?;
        }
        if let Some(v) = t.get("give_up_after") {
            r.give_up_after = self.duration("relay.give_up_after", v)?;
        }
        if let Some(v) = t.get("connect_timeout") {
            r.connect_timeout = self.duration("relay.connect_timeout", v)?;
        }
        Ok(())
    }

    fn quota(&self, t: &Table) -> Result<BTreeMap<DomainName, u64>, ConfigError> {
        let mut quotas = BTreeMap::new();
        let mut spelled: BTreeMap<DomainName, &str> = BTreeMap::new();
        for (name, v) in t {
            let key = join("quota", name);
            let domain = DomainName::parse(name)
                .map_err(|e| self.rejected(&key, format!("not a domain name: {e}")))?;
            if let Some(first) = spelled.insert(domain.clone(), name) {
                let why = format!("{domain} is already given a quota as {first:?}");
                return Err(self.rejected(&key, why));
            }
            quotas.insert(domain, self.size(&key, v, 0)?);
        }
        Ok(quotas)
    }

    fn known_keys(
        &self,
        prefix: &str,
        t: &Table,
        expected: &'static [&'static str],
    ) -> Result<(), ConfigError> {
        match t.keys().find(|k| !expected.contains(&k.as_str())) {
            Some(k) => Err(self.err(&join(prefix, k), ConfigErrorKind::UnknownKey { expected })),
            None => Ok(()),
        }
    }

    fn section<'t>(&self, top: &'t Table, name: &str) -> Result<Option<&'t Table>, ConfigError> {
        match top.get(name) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(t)),
            Some(v) => Err(self.invalid(name, format!("a table ([{name}])"), v)),
        }
    }

    fn string<'v>(&self, key: &str, v: &'v Value, expected: &str) -> Result<&'v str, ConfigError> {
        v.as_str().ok_or_else(|| self.invalid(key, expected, v))
    }

    fn path(&self, key: &str, v: &Value) -> Result<PathBuf, ConfigError> {
        match self.string(key, v, "a path")? {
            "" => Err(self.invalid(key, "a path", v)),
            s => Ok(PathBuf::from(s)),
        }
    }

    fn integer(&self, key: &str, v: &Value, min: i64, max: i64) -> Result<u64, ConfigError> {
        match v {
            Value::Integer(n) if (min..=max).contains(n) => Ok(*n as u64),
            _ => Err(self.invalid(key, format!("an integer from {min} to {max}"), v)),
        }
    }

    fn size(&self, key: &str, v: &Value, min: u64) -> Result<u64, ConfigError> {
        let bytes = match v {
            Value::Integer(n) => u64::try_from(*n).ok(),
            Value::String(s) => parse_size(s),
            _ => None,
        };
        match bytes {
            Some(b) if b >= min => Ok(b),
            Some(_) => Err(self.rejected(key, format!("must be at least {min} bytes"))),
            None => Err(self.invalid(key, "a size like \"50MiB\"", v)),
        }
    }

    fn duration(&self, key: &str, v: &Value) -> Result<Duration, ConfigError> {
        match self.duration_or_zero(key, v)? {
            d if d.is_zero() => Err(self.rejected(key, "must be longer than zero")),
            d => Ok(d),
        }
    }

    /// A duration where zero is meaningful ("off").
    fn duration_or_zero(&self, key: &str, v: &Value) -> Result<Duration, ConfigError> {
        let expected = "a duration like \"5m\" (units ms, s, m, h, d)";
        v.as_str()
            .and_then(parse_duration)
            .ok_or_else(|| self.invalid(key, expected, v))
    }

    fn addresses(&self, key: &str, v: &Value, port: u16) -> Result<Vec<SocketAddr>, ConfigError> {
        let expected = format!("an address like \"127.0.0.1:{port}\" or a list of them");
        let one = |key: &str, item: &Value| {
            item.as_str()
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .ok_or_else(|| self.invalid(key, expected.clone(), item))
        };
        match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| one(&format!("{key}[{i}]"), item))
                .collect(),
            _ => Ok(vec![one(key, v)?]),
        }
    }

    fn boolean(&self, key: &str, v: &Value) -> Result<bool, ConfigError> {
        v.as_bool()
            .ok_or_else(|| self.invalid(key, "true or false", v))
    }

    /// One network (`"10.0.0.0/8"`, `"::1"`) or a list of them.
    fn networks(&self, key: &str, v: &Value) -> Result<Vec<Network>, ConfigError> {
        let expected = "a network like \"10.0.0.0/8\" or an address, or a list of them";
        let one = |key: &str, item: &Value| match item.as_str() {
            Some(s) => Network::parse(s).map_err(|why| self.rejected(key, why)),
            None => Err(self.invalid(key, expected, item)),
        };
        match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| one(&format!("{key}[{i}]"), item))
                .collect(),
            _ => Ok(vec![one(key, v)?]),
        }
    }

    fn err(&self, key: &str, kind: ConfigErrorKind) -> ConfigError {
        ConfigError::new(self.file, Some(key.to_owned()), kind)
    }

    fn invalid(&self, key: &str, expected: impl Into<String>, got: &Value) -> ConfigError {
        let got = describe(got);
        self.err(
            key,
            ConfigErrorKind::Invalid {
                expected: expected.into(),
                got,
            },
        )
    }

    fn rejected(&self, key: &str, why: impl Into<String>) -> ConfigError {
        self.err(key, ConfigErrorKind::Rejected(why.into()))
    }
}

/// `prefix.key`, quoting `key` as TOML would when it is not a bare key (`quota."a.b"`).
fn join(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

/// A value as the operator wrote it, for "got ..." in errors; tables are only named.
fn describe(v: &Value) -> String {
    match v {
        Value::Table(_) => "a table".to_owned(),
        _ => {
            let s = v.to_string();
            if s.chars().count() > 60 {
                format!("{}...", s.chars().take(57).collect::<String>())
            } else {
                s
            }
        }
    }
}

/// Parses `"500ms"`, `"300s"`, `"5m"`, `"2h"`, `"30d"`. No fractions, no compound forms.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let scale = match unit.trim_start() {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => DAY,
        _ => return None,
    };
    n.checked_mul(scale).map(Duration::from_secs)
}

/// Parses `"4096"`, `"64MB"` (10^6), `"50MiB"` (2^20), ... into bytes. Units are
/// case-insensitive; an optional space may separate number and unit.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = s.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(src, Path::new("turnpike.toml"))
    }

    fn error(src: &str) -> String {
        parse(src).expect_err("config accepted").to_string()
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(
            parse("[server]\n[limits]\n[quota]\n").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.server.data_dir, PathBuf::from("./turnpike-data"));
        assert_eq!(c.server.cores, 0);
        assert_eq!(c.server.io, IoBackend::Auto);
        assert_eq!(c.listen.mx, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.listen.odmr, vec!["127.0.0.1:3366".parse().unwrap()]);
        assert_eq!(c.listen.submission, vec!["127.0.0.1:2587".parse().unwrap()]);
        assert_eq!(
            c.listen.submissions,
            vec!["127.0.0.1:2465".parse().unwrap()]
        );
        assert_eq!(c.listen.metrics, vec!["127.0.0.1:9366".parse().unwrap()]);
        assert_eq!(c.listen.odmrs, vec!["127.0.0.1:3367".parse().unwrap()]);
        assert!(!c.odmr.allow_plaintext_auth);
        assert!(!c.odmr.cram_md5_requires_tls);
        assert_eq!(c.limits.trusted_networks, Network::loopback());
        assert_eq!(c.tls.identity, TlsIdentity::SelfSigned);
        assert_eq!(c.limits.max_message_size, 52_428_800);
        assert_eq!(c.limits.max_recipients, 100);
        assert_eq!(c.limits.max_line_length, 2048);
        assert_eq!(c.limits.max_commands_without_progress, 20);
        assert_eq!(c.limits.max_errors, 10);
        assert_eq!(c.limits.max_hops, 50);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.session_timeout, Duration::from_secs(1800));
        assert_eq!(c.limits.max_connections_per_ip, 20);
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.spool.segment_size, 67_108_864);
        assert_eq!(c.spool.max_hold, Duration::from_secs(2_592_000));
        assert_eq!(c.spool.default_quota, 2_147_483_648);
        assert_eq!(c.spool.compact_live_ratio, 0.5);
        assert_eq!(c.submission.period, Duration::from_secs(3600));
        assert_eq!(c.submission.messages_per_period, 200);
        assert_eq!(c.submission.recipients_per_period, 1000);
        assert_eq!(c.submission.recipients_per_message, 50);
        assert!(c.quota.is_empty());
        assert!(!c.server.hostname.as_str().is_empty());
    }

    #[test]
    fn durations() {
        let table = [
            ("300s", Some(300)),
            ("5m", Some(300)),
            ("2h", Some(7200)),
            ("30d", Some(2_592_000)),
            ("5 m", Some(300)),
            ("0s", Some(0)),
            ("5", None),
            ("m", None),
            ("-5m", None),
            ("1.5h", None),
            ("5w", None),
            ("5M", None),
            ("99999999999999999999d", None),
            ("213503982334602d", None),
        ];
        for (input, secs) in table {
            assert_eq!(
                parse_duration(input),
                secs.map(Duration::from_secs),
                "{input:?}"
            );
        }
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("0ms"), Some(Duration::ZERO));
        assert_eq!(parse_duration("5mss"), None);
    }

    #[test]
    fn throttle_and_data_rate_keys() {
        let c = Config::parse(
            "[odmr]\nauth_failure_delay = \"250ms\"\nauth_max_delay = \"0s\"\n\
             auth_account_max_delay = \"1s\"\nauth_failures_per_client = 4\n\
             auth_failures_per_address = 40\n[limits]\nmin_data_rate = 0\n",
            Path::new("turnpike.toml"),
        )
        .unwrap();
        assert_eq!(c.odmr.auth_failure_delay, Duration::from_millis(250));
        assert_eq!(c.odmr.auth_max_delay, Duration::ZERO);
        assert_eq!(c.odmr.auth_account_max_delay, Duration::from_secs(1));
        assert_eq!(
            (
                c.odmr.auth_failures_per_client,
                c.odmr.auth_failures_per_address
            ),
            (4, 40)
        );
        assert_eq!(c.limits.min_data_rate, 0);
        let d = Config::default();
        assert_eq!(d.limits.min_data_rate, 500);
        assert_eq!(d.odmr.auth_failures_per_client, 10);
    }

    #[test]
    fn sizes() {
        let table = [
            ("4096", Some(4096)),
            ("4096B", Some(4096)),
            ("64MB", Some(64_000_000)),
            ("50MiB", Some(52_428_800)),
            ("2GiB", Some(2_147_483_648)),
            ("1 kib", Some(1024)),
            ("3TB", Some(3_000_000_000_000)),
            ("fifty", None),
            ("50 MiBs", None),
            ("-1", None),
            ("1.5GiB", None),
            ("MiB", None),
            ("20000000TiB", None),
        ];
        for (input, bytes) in table {
            assert_eq!(parse_size(input), bytes, "{input:?}");
        }
    }

    #[test]
    fn every_error_names_file_key_and_problem() {
        let table: &[(&str, &str)] = &[
            (
                "[limits]\nmax_message_size = \"fifty\"",
                "turnpike.toml: limits.max_message_size: expected a size like \"50MiB\", \
                 got \"fifty\"",
            ),
            (
                "[limits]\nmax_msg_size = 1",
                "turnpike.toml: limits.max_msg_size: unknown key (expected one of: \
                 max_message_size, max_recipients, max_line_length, \
                 max_commands_without_progress, max_errors, max_hops, idle_timeout, \
                 min_data_rate, session_timeout, max_connections_per_ip, max_connections, \
                 trusted_networks)",
            ),
            (
                "[limits]\ntrusted_networks = [\"10.0.0.0/8\", \"10.1.0.0/33\"]",
                "turnpike.toml: limits.trusted_networks[1]: \"10.1.0.0/33\": the prefix length \
                 must be 0..=32",
            ),
            (
                "[limits]\ntrusted_networks = 10",
                "turnpike.toml: limits.trusted_networks: expected a network like \"10.0.0.0/8\" \
                 or an address, or a list of them, got 10",
            ),
            (
                "[odmr]\ncram_md5_requires_tls = 1",
                "turnpike.toml: odmr.cram_md5_requires_tls: expected true or false, got 1",
            ),
            (
                "[sevrer]\ncores = 1",
                "turnpike.toml: sevrer: unknown key (expected one of: server, listen, tls, \
                 limits, spool, odmr, submission, quota, relay)",
            ),
            (
                "[relay]\nmode = \"smarthost\"",
                "turnpike.toml: relay.smarthost: missing: mode is smarthost",
            ),
            (
                "[relay]\nsmarthost = \"mail.example\"",
                "turnpike.toml: relay.smarthost: expected \"host:port\", got \"mail.example\"",
            ),
            (
                "[relay]\nsmarthost = \"mail.example:587\"\nusername = \"u\"",
                "turnpike.toml: relay.username: username and password_file go together",
            ),
            (
                "[relay]\nmode = \"direct\"",
                "turnpike.toml: relay.mode: expected one of \"off\", \"mx\", \"smarthost\", \
                 got \"direct\"",
            ),
            (
                "[submission]\nmessages_per_period = -1",
                "turnpike.toml: submission.messages_per_period: expected an integer from 0 to \
                 4294967295, got -1",
            ),
            (
                "[submission]\nperiod = \"0s\"",
                "turnpike.toml: submission.period: must be longer than zero",
            ),
            (
                "[submission]\nmessages = 5",
                "turnpike.toml: submission.messages: unknown key (expected one of: period, \
                 messages_per_period, recipients_per_period, recipients_per_message)",
            ),
            (
                "[odmr]\nallow_plaintext_auth = \"yes\"",
                "turnpike.toml: odmr.allow_plaintext_auth: expected true or false, got \"yes\"",
            ),
            (
                "[odmr]\nlinger_max = \"0s\"",
                "turnpike.toml: odmr.linger_max: must be longer than zero",
            ),
            (
                "server = 3",
                "turnpike.toml: server: expected a table ([server]), got 3",
            ),
            (
                "[limits]\nidle_timeout = 300",
                "turnpike.toml: limits.idle_timeout: expected a duration like \"5m\" \
                 (units ms, s, m, h, d), got 300",
            ),
            (
                "[limits]\nsession_timeout = \"0m\"",
                "turnpike.toml: limits.session_timeout: must be longer than zero",
            ),
            (
                "[limits]\nmax_recipients = -1",
                "turnpike.toml: limits.max_recipients: expected an integer from 1 to \
                 4294967295, got -1",
            ),
            (
                "[limits]\nmax_line_length = 512",
                "turnpike.toml: limits.max_line_length: expected an integer from 1000 to \
                 1048576, got 512",
            ),
            (
                "[limits]\nmax_errors = \"10\"",
                "turnpike.toml: limits.max_errors: expected an integer from 1 to 4294967295, \
                 got \"10\"",
            ),
            (
                "[server]\nhostname = \"mx_1.example\"",
                "turnpike.toml: server.hostname: expected a host name (letters, digits, \
                 hyphens, dots; domain name is not letters, digits and hyphens), \
                 got \"mx_1.example\"",
            ),
            (
                "[server]\nio = \"kqueue\"",
                "turnpike.toml: server.io: expected one of \"auto\", \"uring\", \"epoll\", \
                 got \"kqueue\"",
            ),
            (
                "[server]\ncores = 1.5",
                "turnpike.toml: server.cores: expected an integer from 0 to 4096, got 1.5",
            ),
            (
                "[server]\ndata_dir = \"\"",
                "turnpike.toml: server.data_dir: expected a path, got \"\"",
            ),
            (
                "[listen]\nmx = [\"127.0.0.1:25\", \"localhost:25\"]",
                "turnpike.toml: listen.mx[1]: expected an address like \"127.0.0.1:2525\" or a \
                 list of them, got \"localhost:25\"",
            ),
            (
                "[listen]\nodmr = 366",
                "turnpike.toml: listen.odmr: expected an address like \"127.0.0.1:3366\" or a \
                 list of them, got 366",
            ),
            (
                "[tls]\ncert = \"c.pem\"",
                "turnpike.toml: tls.key: missing: tls.cert is set",
            ),
            (
                "[tls]\nkey = \"k.pem\"",
                "turnpike.toml: tls.cert: missing: tls.key is set",
            ),
            (
                "[tls]\nca = \"ca.pem\"",
                "turnpike.toml: tls.ca: unknown key (expected one of: cert, key)",
            ),
            (
                "[spool]\nsegment_size = \"4KiB\"",
                "turnpike.toml: spool.segment_size: must be at least 1048576 bytes",
            ),
            (
                "[spool]\ncompact_live_ratio = 1.0",
                "turnpike.toml: spool.compact_live_ratio: expected a number between 0 and 1 \
                 (exclusive), got 1.0",
            ),
            (
                "[spool]\nfsync = false",
                "turnpike.toml: spool.fsync: cannot be turned off: held mail must be on disk \
                 before the 250",
            ),
            (
                "[quota]\n\"exa_mple.com\" = \"1GiB\"",
                "turnpike.toml: quota.\"exa_mple.com\": not a domain name: domain name is not \
                 letters, digits and hyphens",
            ),
            (
                "[quota]\n\"example.com\" = \"lots\"",
                "turnpike.toml: quota.\"example.com\": expected a size like \"50MiB\", \
                 got \"lots\"",
            ),
            (
                "[quota]\n\"Example.com\" = \"1GiB\"\n\"example.com.\" = \"2GiB\"",
                "turnpike.toml: quota.\"example.com.\": example.com is already given a quota \
                 as \"Example.com\"",
            ),
            (
                "[limits]\nmax_hops = 5\n\n[limits\n",
                "turnpike.toml: line 4, column 8: invalid TOML: invalid table header\n\
                 expected `.`, `]`",
            ),
        ];
        for (src, want) in table {
            assert_eq!(&error(src), want, "for {src:?}");
        }
    }

    #[test]
    fn overrides_and_quota_lookup() {
        let c = parse(
            "[server]\nhostname = \"MX.Example.NET\"\ncores = 4\nio = \"epoll\"\n\
             [listen]\nmx = \"[::1]:25\"\nmetrics = []\n\
             [spool]\nfsync = true\n\
             [quota]\n\"Big.example\" = \"10GiB\"\n\"small.example\" = 0\n",
        )
        .unwrap();
        assert_eq!(c.server.hostname.as_str(), "mx.example.net");
        assert_eq!(c.server.cores, 4);
        assert_eq!(c.server.io, IoBackend::Epoll);
        assert_eq!(c.listen.mx, vec!["[::1]:25".parse().unwrap()]);
        assert!(c.listen.metrics.is_empty());
        let big = DomainName::parse("big.example").unwrap();
        let small = DomainName::parse("small.example").unwrap();
        let other = DomainName::parse("other.example").unwrap();
        assert_eq!(c.quota_for(&big), 10 << 30);
        assert_eq!(c.quota_for(&small), 0);
        assert_eq!(c.quota_for(&other), 2 << 30);
    }

    #[test]
    fn relay_settings() {
        let c = parse(
            "[relay]\nsmarthost = \"[::1]:2525\"\nsmarthost_tls = \"implicit\"\n\
             username = \"u\"\npassword_file = \"/p\"\nfirst_retry = \"1s\"\n\
             resolver = \"127.0.0.1:5353\"\nmx_port = 2500\n",
        )
        .unwrap();
        let RelayMode::Smarthost(h) = &c.relay.mode else {
            panic!("{:?}", c.relay.mode)
        };
        assert_eq!((h.host.as_str(), h.port), ("::1", 2525));
        assert_eq!(h.tls, SmarthostTls::Implicit);
        assert_eq!(h.username.as_deref(), Some("u"));
        assert_eq!(c.relay.first_retry, Duration::from_secs(1));
        assert_eq!(c.relay.resolver, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(c.relay.mx_port, 2500);
        assert_eq!(Config::default().relay.mode, RelayMode::Off);
        assert_eq!(
            parse("[relay]\nmode = \"mx\"").unwrap().relay.mode,
            RelayMode::Mx
        );
    }

    #[test]
    fn cli_data_dir_wins() {
        let c = parse("[server]\ndata_dir = \"/var/lib/turnpike\"").unwrap();
        assert_eq!(c.server.data_dir, PathBuf::from("/var/lib/turnpike"));
        let c = c.with_data_dir("/tmp/other");
        assert_eq!(c.server.data_dir, PathBuf::from("/tmp/other"));
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("a\nbé=c", 5), (2, 3));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
