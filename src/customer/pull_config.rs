//! The configuration of `turnpike pull`: a TOML file (`--config FILE`) or, for a first run,
//! command-line flags. Parsed once into [`PullConfig`]; every error names the file (or flag),
//! the key and the problem.
//!
//! ```toml
//! [provider]
//! address = "mx.provider.example:366"     # host:port of the ODMR (or odmrs) listener
//! tls = "starttls"                        # starttls | implicit | none
//! # server_name = "mx.provider.example"   # name the certificate must carry; default: host
//! # ca = "/etc/ssl/certs/ca-certificates.crt"   # trust anchors (the default)
//! # pin_sha256 = "AB:CD:..."              # or: accept exactly this certificate
//! # client_cert = "/etc/turnpike/office.crt"    # for SASL EXTERNAL
//! # client_key = "/etc/turnpike/office.key"
//! # insecure_plaintext = false            # needed for tls = "none" off loopback
//!
//! [account]
//! name = "office"
//! password_file = "/etc/turnpike/pull.secret"   # first line; or password_env = "VAR"
//! # mechanism = "auto"                    # auto | scram-sha-256 | plain | cram-md5 | external
//!
//! [session]
//! # hostname = "gw.office.example"        # default: this machine's host name
//! # domains = ["office.example"]          # default: bare ATRN (all of the account's)
//! # atrn_timeout = "10m"                  # RFC 2645: at least 10 minutes
//! # idle_timeout = "5m"                   # every other read and write
//!
//! [schedule]                              # for the daemon (--every without a value)
//! # every = "5m"
//! # max_backoff = "1h"                    # longest wait while the provider is unreachable
//!
//! [delivery]                              # see docs/customer.md, "Delivery targets"
//! catch_all = { maildir = "/srv/mail/office" }
//! ```
//!
//! Secrets never come from the command line (they would show in `ps`): a file or an
//! environment variable.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use toml::{Table, Value};

use super::deliver::DeliveryConfig;
use super::session::{Mechanism, SessionConfig, Tls};
use crate::config::parse_duration;
use crate::types::DomainName;

/// Where trust anchors come from when neither `ca` nor `pin_sha256` is given (Debian's
/// ca-certificates bundle).
pub const DEFAULT_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// RFC 2645 §5.2.1: the customer waits at least this long for the ATRN reply.
pub const MIN_ATRN_TIMEOUT: Duration = Duration::from_secs(600);

/// How the connection to the provider is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// STARTTLS after the first EHLO (the ODMR port, 366).
    StartTls,
    /// TLS from the first byte (the provider's `listen.odmrs`).
    Implicit,
    /// No encryption: loopback, or with `insecure_plaintext`.
    None,
}

/// How the provider's certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Chain to these trust anchors and carry the server name.
    Ca(PathBuf),
    /// Be exactly this certificate (SHA-256 of its DER encoding), whatever its name or issuer.
    Pin([u8; 32]),
}

/// Where the secret comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    /// The first line of this file.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// None (EXTERNAL needs no password).
    None,
}

/// Everything `turnpike pull` needs, checked.
#[derive(Clone, Debug)]
pub struct PullConfig {
    /// Where the settings came from, for messages (`FILE` or `command line`).
    pub origin: String,
    /// The provider's host (name or IP literal).
    pub host: String,
    /// The provider's port.
    pub port: u16,
    /// Encryption.
    pub tls: TlsMode,
    /// The name the provider's certificate must carry.
    pub server_name: String,
    /// Certificate check.
    pub trust: Trust,
    /// Client certificate and key (PEM), for EXTERNAL.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Account name.
    pub account: String,
    /// Where the password is.
    pub secret: Secret,
    /// SASL mechanism (or the preference order, for `auto`).
    pub mechanism: Mechanism,
    /// Domains for ATRN; empty = bare ATRN.
    pub domains: Vec<DomainName>,
    /// Our name in EHLO and the 220 after the turnaround.
    pub hostname: String,
    /// How long to wait for the ATRN reply.
    pub atrn_timeout: Duration,
    /// Stall timeout of every other read and write.
    pub idle_timeout: Duration,
    /// Daemon interval for `--every` without a value (`[schedule] every`); one session per
    /// run without `--every`, whatever this says.
    pub every: Option<Duration>,
    /// Longest wait between attempts while sessions fail.
    pub max_backoff: Duration,
    /// Where messages go.
    pub delivery: DeliveryConfig,
}

/// A configuration problem: where, which key, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullConfigError {
    /// The file, or `command line`.
    pub origin: String,
    /// The key (`provider.address`) or flag (`--provider`), if one is to blame.
    pub key: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for PullConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.problem)
    }
}

impl std::error::Error for PullConfigError {}

/// The flags of a first run without a config file (`turnpike pull --provider ...`).
#[derive(Clone, Debug, Default)]
pub struct PullFlags {
    /// `--provider HOST:PORT`.
    pub provider: Option<String>,
    /// `--account NAME`.
    pub account: Option<String>,
    /// `--password-file FILE`.
    pub password_file: Option<PathBuf>,
    /// `--tls starttls|implicit|none`.
    pub tls: Option<String>,
    /// `--ca FILE`.
    pub ca: Option<PathBuf>,
    /// `--server-name NAME`.
    pub server_name: Option<String>,
    /// `--maildir DIR`.
    pub maildir: Option<PathBuf>,
    /// `--domain D` (repeatable).
    pub domains: Vec<String>,
    /// `--hostname NAME`.
    pub hostname: Option<String>,
    /// `--mechanism M`.
    pub mechanism: Option<String>,
    /// `--insecure-plaintext`.
    pub insecure_plaintext: bool,
    /// `--atrn-timeout D`.
    pub atrn_timeout: Option<String>,
    /// `--idle-timeout D`.
    pub idle_timeout: Option<String>,
}

const SECTIONS: &[&str] = &["provider", "account", "session", "schedule", "delivery"];
const PROVIDER_KEYS: &[&str] = &[
    "address",
    "tls",
    "server_name",
    "ca",
    "pin_sha256",
    "client_cert",
    "client_key",
    "insecure_plaintext",
];
const ACCOUNT_KEYS: &[&str] = &["name", "password_file", "password_env", "mechanism"];
const SESSION_KEYS: &[&str] = &["hostname", "domains", "atrn_timeout", "idle_timeout"];
const SCHEDULE_KEYS: &[&str] = &["every", "max_backoff"];

impl PullConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<PullConfig, PullConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PullConfigError {
            origin: origin.clone(),
            key: None,
            problem: format!("cannot read the file: {e}"),
        })?;
        PullConfig::parse(&origin, &text)
    }

    /// Parses config text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<PullConfig, PullConfigError> {
        let p = Parser { origin };
        let table: Table = text.parse().map_err(|e: toml::de::Error| {
            p.err(None, format!("invalid TOML: {}", e.message().trim()))
        })?;
        p.known("", &table, SECTIONS)?;
        let empty = Table::new();
        let section = |name: &str| -> Result<&Table, PullConfigError> {
            match table.get(name) {
                None => Ok(&empty),
                Some(Value::Table(t)) => Ok(t),
                Some(v) => Err(p.invalid(name, "a table", v)),
            }
        };
        let provider = section("provider")?;
        let account = section("account")?;
        let session = section("session")?;
        let schedule = section("schedule")?;
        p.known("provider.", provider, PROVIDER_KEYS)?;
        p.known("account.", account, ACCOUNT_KEYS)?;
        p.known("session.", session, SESSION_KEYS)?;
        p.known("schedule.", schedule, SCHEDULE_KEYS)?;

        let address = p
            .string(provider, "provider.address")?
            .ok_or_else(|| p.missing("provider.address", "the provider's host:port"))?;
        let (host, port) =
            split_host_port(&address).map_err(|why| p.err(Some("provider.address"), why))?;
        let tls = match p.string(provider, "provider.tls")? {
            None => TlsMode::StartTls,
            Some(s) => parse_tls(&s).map_err(|why| p.err(Some("provider.tls"), why))?,
        };
        let insecure = p.boolean(provider, "provider.insecure_plaintext")?;
        check_plaintext(tls, &host, insecure).map_err(|why| p.err(Some("provider.tls"), why))?;
        let server_name = p
            .string(provider, "provider.server_name")?
            .unwrap_or_else(|| host.clone());
        check_server_name(&server_name).map_err(|why| {
            p.err(
                Some(if provider.contains_key("server_name") {
                    "provider.server_name"
                } else {
                    "provider.address"
                }),
                why,
            )
        })?;
        let ca = p.string(provider, "provider.ca")?.map(PathBuf::from);
        let pin = p.string(provider, "provider.pin_sha256")?;
        let trust = match (ca, pin) {
            (Some(_), Some(_)) => {
                return Err(p.err(
                    Some("provider.pin_sha256"),
                    "give either ca or pin_sha256, not both",
                ))
            }
            (_, Some(pin)) => Trust::Pin(
                parse_fingerprint(&pin).map_err(|why| p.err(Some("provider.pin_sha256"), why))?,
            ),
            (Some(ca), None) => Trust::Ca(ca),
            (None, None) => Trust::Ca(PathBuf::from(DEFAULT_CA)),
        };
        let client_cert = match (
            p.string(provider, "provider.client_cert")?,
            p.string(provider, "provider.client_key")?,
        ) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            (Some(_), None) => {
                return Err(p.missing("provider.client_key", "the client certificate's key"))
            }
            (None, Some(_)) => {
                return Err(p.missing("provider.client_cert", "the certificate for the key"))
            }
        };

        let name = p
            .string(account, "account.name")?
            .ok_or_else(|| p.missing("account.name", "the account name"))?;
        let mechanism = match p.string(account, "account.mechanism")? {
            None => Mechanism::Auto,
            Some(m) => parse_mechanism(&m).map_err(|why| p.err(Some("account.mechanism"), why))?,
        };
        let secret = match (
            p.string(account, "account.password_file")?,
            p.string(account, "account.password_env")?,
        ) {
            (Some(_), Some(_)) => {
                return Err(p.err(
                    Some("account.password_env"),
                    "give either password_file or password_env, not both",
                ))
            }
            (Some(f), None) => Secret::File(PathBuf::from(f)),
            (None, Some(v)) => Secret::Env(v),
            // A certificate alone is a credential: EXTERNAL, or `auto` (which then only
            // tries EXTERNAL).
            (None, None)
                if mechanism == Mechanism::External
                    || (mechanism == Mechanism::Auto && client_cert.is_some()) =>
            {
                Secret::None
            }
            (None, None) => {
                return Err(p.missing(
                    "account.password_file",
                    "where the password is (or password_env)",
                ))
            }
        };
        if mechanism == Mechanism::External && (client_cert.is_none() || tls == TlsMode::None) {
            return Err(p.err(
                Some("account.mechanism"),
                "external needs TLS and provider.client_cert/client_key",
            ));
        }

        let hostname = match p.string(session, "session.hostname")? {
            Some(h) => h,
            None => local_hostname(),
        };
        let domains = match session.get("domains") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => atrn_domain(s)
                        .map_err(|why| p.err(Some("session.domains"), format!("{s:?}: {why}"))),
                    other => Err(p.invalid("session.domains", "a list of domain names", other)),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(p.invalid("session.domains", "a list of domain names", v)),
        };
        let atrn_timeout = p
            .duration(session, "session.atrn_timeout")?
            .unwrap_or(MIN_ATRN_TIMEOUT);
        if atrn_timeout < MIN_ATRN_TIMEOUT {
            return Err(p.err(
                Some("session.atrn_timeout"),
                "RFC 2645 requires waiting at least 10m for the ATRN reply",
            ));
        }
        let idle_timeout = p
            .duration(session, "session.idle_timeout")?
            .unwrap_or(Duration::from_secs(300));
        let every = p.duration(schedule, "schedule.every")?;
        let max_backoff = p
            .duration(schedule, "schedule.max_backoff")?
            .unwrap_or(Duration::from_secs(3600));

        let delivery = match table.get("delivery") {
            None => {
                return Err(p.missing(
                    "delivery",
                    "a [delivery] section (where received mail goes)",
                ))
            }
            Some(v) => v
                .clone()
                .try_into::<DeliveryConfig>()
                .map_err(|e| p.err(Some("delivery"), e.message().trim().to_string()))?,
        };

        Ok(PullConfig {
            origin: origin.to_string(),
            host,
            port,
            tls,
            server_name,
            trust,
            client_cert,
            account: name,
            secret,
            mechanism,
            domains,
            hostname,
            atrn_timeout,
            idle_timeout,
            every,
            max_backoff,
            delivery,
        })
    }

    /// Builds the configuration from first-run flags.
    pub fn from_flags(flags: &PullFlags) -> Result<PullConfig, PullConfigError> {
        let origin = "command line";
        let err = |flag: &str, why: String| PullConfigError {
            origin: origin.into(),
            key: Some(flag.into()),
            problem: why,
        };
        let need = |v: &Option<String>, flag: &str| {
            v.clone()
                .ok_or_else(|| err(flag, "required without --config".into()))
        };
        let address = need(&flags.provider, "--provider")?;
        let (host, port) = split_host_port(&address).map_err(|why| err("--provider", why))?;
        let tls = parse_tls(&need(&flags.tls, "--tls")?).map_err(|why| err("--tls", why))?;
        check_plaintext(tls, &host, flags.insecure_plaintext).map_err(|why| err("--tls", why))?;
        let server_name = flags.server_name.clone().unwrap_or_else(|| host.clone());
        check_server_name(&server_name).map_err(|why| err("--server-name", why))?;
        let account = need(&flags.account, "--account")?;
        let password_file = flags
            .password_file
            .clone()
            .ok_or_else(|| err("--password-file", "required without --config".into()))?;
        let maildir = flags
            .maildir
            .clone()
            .ok_or_else(|| err("--maildir", "required without --config".into()))?;
        let mechanism = match &flags.mechanism {
            None => Mechanism::Auto,
            Some(m) => parse_mechanism(m).map_err(|why| err("--mechanism", why))?,
        };
        let domains = flags
            .domains
            .iter()
            .map(|d| atrn_domain(d).map_err(|why| err("--domain", format!("{d:?}: {why}"))))
            .collect::<Result<_, _>>()?;
        let duration = |v: &Option<String>, flag: &str, default: Duration| match v {
            None => Ok(default),
            Some(s) => parse_duration(s).ok_or_else(|| {
                err(
                    flag,
                    format!("{s:?} is not a duration like \"30s\", \"5m\""),
                )
            }),
        };
        let atrn_timeout = duration(&flags.atrn_timeout, "--atrn-timeout", MIN_ATRN_TIMEOUT)?;
        if atrn_timeout < MIN_ATRN_TIMEOUT {
            return Err(err(
                "--atrn-timeout",
                "RFC 2645 requires waiting at least 10m for the ATRN reply".into(),
            ));
        }
        Ok(PullConfig {
            origin: origin.into(),
            host,
            port,
            tls,
            server_name,
            trust: Trust::Ca(
                flags
                    .ca
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_CA)),
            ),
            client_cert: None,
            account,
            secret: Secret::File(password_file),
            mechanism,
            domains,
            hostname: flags.hostname.clone().unwrap_or_else(local_hostname),
            atrn_timeout,
            idle_timeout: duration(
                &flags.idle_timeout,
                "--idle-timeout",
                Duration::from_secs(300),
            )?,
            every: None,
            max_backoff: Duration::from_secs(3600),
            delivery: DeliveryConfig::maildir(maildir),
        })
    }

    /// Reads the secret (file or environment). Called once at start-up, so a missing file is
    /// a configuration error, not a failed session.
    pub fn password(&self) -> Result<String, PullConfigError> {
        let key = if self.origin == "command line" {
            ("--password-file", "account.password_env")
        } else {
            ("account.password_file", "account.password_env")
        };
        let err = |k: &str, why: String| PullConfigError {
            origin: self.origin.clone(),
            key: Some(k.into()),
            problem: why,
        };
        let password = match &self.secret {
            Secret::None => return Ok(String::new()),
            Secret::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| err(key.0, format!("{}: {e}", path.display())))?;
                text.lines().next().unwrap_or("").to_string()
            }
            Secret::Env(var) => std::env::var(var)
                .map_err(|e| err(key.1, format!("environment variable {var}: {e}")))?,
        };
        if password.is_empty() {
            return Err(err(
                if matches!(self.secret, Secret::Env(_)) {
                    key.1
                } else {
                    key.0
                },
                "the password is empty".into(),
            ));
        }
        Ok(password)
    }

    /// The rustls client configuration: trust anchors or the pin, and the client certificate.
    pub fn tls_client_config(&self) -> Result<Arc<ClientConfig>, PullConfigError> {
        let err = |k: &str, why: String| PullConfigError {
            origin: self.origin.clone(),
            key: Some(k.into()),
            problem: why,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| err("provider.tls", e.to_string()))?;
        let ca_key = if self.origin == "command line" {
            "--ca"
        } else {
            "provider.ca"
        };
        let builder = match &self.trust {
            Trust::Ca(path) => {
                let mut roots = RootCertStore::empty();
                let certs = read_pem_certs(path).map_err(|why| err(ca_key, why))?;
                let (added, _ignored) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(err(
                        ca_key,
                        format!("{}: no usable certificate", path.display()),
                    ));
                }
                builder.with_root_certificates(roots)
            }
            Trust::Pin(fingerprint) => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                        fingerprint: *fingerprint,
                        provider,
                    }))
            }
        };
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_pem_certs(cert).map_err(|why| err("provider.client_cert", why))?;
                let key_der = std::fs::File::open(key)
                    .map_err(|e| e.to_string())
                    .and_then(|f| {
                        rustls_pemfile::private_key(&mut std::io::BufReader::new(f))
                            .map_err(|e| e.to_string())
                    })
                    .and_then(|k| k.ok_or_else(|| "no private key in the file".to_string()))
                    .map_err(|why| {
                        err("provider.client_key", format!("{}: {why}", key.display()))
                    })?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| err("provider.client_key", e.to_string()))?
            }
        };
        Ok(Arc::new(config))
    }

    /// The session settings for one attempt. Resolves the provider's name now (a dynamic
    /// provider address may change between sessions); a failure is an unreachable provider.
    pub fn session(
        &self,
        tls_config: Option<&Arc<ClientConfig>>,
        password: &str,
    ) -> Result<SessionConfig, std::io::Error> {
        let provider = resolve(&self.host, self.port)?;
        let tls = match (self.tls, tls_config) {
            (TlsMode::None, _) | (_, None) => Tls::None,
            (mode, Some(config)) => {
                let server_name = ServerName::try_from(self.server_name.clone())
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                if mode == TlsMode::Implicit {
                    Tls::Implicit {
                        config: config.clone(),
                        server_name,
                    }
                } else {
                    Tls::StartTls {
                        config: config.clone(),
                        server_name,
                    }
                }
            }
        };
        Ok(SessionConfig {
            provider,
            hostname: self.hostname.clone(),
            tls,
            account: self.account.clone(),
            password: password.to_string(),
            mechanism: self.mechanism,
            domains: self.domains.clone(),
            atrn_timeout: self.atrn_timeout,
            idle_timeout: self.idle_timeout,
        })
    }
}

struct Parser<'a> {
    origin: &'a str,
}

impl Parser<'_> {
    fn err(&self, key: Option<&str>, problem: impl Into<String>) -> PullConfigError {
        PullConfigError {
            origin: self.origin.to_string(),
            key: key.map(str::to_string),
            problem: problem.into(),
        }
    }

    fn missing(&self, key: &str, what: &str) -> PullConfigError {
        self.err(Some(key), format!("missing: {what}"))
    }

    fn invalid(&self, key: &str, expected: &str, got: &Value) -> PullConfigError {
        self.err(
            Some(key),
            format!("expected {expected}, got {}", got.type_str()),
        )
    }

    fn known(&self, prefix: &str, table: &Table, keys: &[&str]) -> Result<(), PullConfigError> {
        match table.keys().find(|k| !keys.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(self.err(
                Some(&format!("{prefix}{k}")),
                format!("unknown key (expected one of: {})", keys.join(", ")),
            )),
        }
    }

    fn leaf(key: &str) -> &str {
        key.rsplit('.').next().unwrap_or(key)
    }

    fn string(&self, t: &Table, key: &str) -> Result<Option<String>, PullConfigError> {
        match t.get(Parser::leaf(key)) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(self.err(Some(key), "must not be empty")),
            Some(v) => Err(self.invalid(key, "a string", v)),
        }
    }

    fn boolean(&self, t: &Table, key: &str) -> Result<bool, PullConfigError> {
        match t.get(Parser::leaf(key)) {
            None => Ok(false),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.invalid(key, "true or false", v)),
        }
    }

    fn duration(&self, t: &Table, key: &str) -> Result<Option<Duration>, PullConfigError> {
        match self.string(t, key)? {
            None => Ok(None),
            Some(s) => match parse_duration(&s) {
                Some(d) if !d.is_zero() => Ok(Some(d)),
                _ => Err(self.err(
                    Some(key),
                    format!("{s:?} is not a duration like \"30s\", \"5m\", \"2h\""),
                )),
            },
        }
    }
}

fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{address:?} has no host"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{address:?}: {port:?} is not a port number"))?;
    Ok((host.to_string(), port))
}

/// A domain for ATRN: RFC 2645 §5.2.1 wants at least two labels.
fn atrn_domain(s: &str) -> Result<DomainName, String> {
    let d = DomainName::parse(s).map_err(|e| e.to_string())?;
    if !d.as_str().contains('.') {
        return Err("ATRN needs a domain of at least two labels (RFC 2645)".into());
    }
    Ok(d)
}

fn parse_tls(s: &str) -> Result<TlsMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "starttls" => Ok(TlsMode::StartTls),
        "implicit" => Ok(TlsMode::Implicit),
        "none" => Ok(TlsMode::None),
        _ => Err(format!("{s:?}: expected starttls, implicit or none")),
    }
}

fn parse_mechanism(s: &str) -> Result<Mechanism, String> {
    match s.to_ascii_lowercase().as_str() {
        "auto" => Ok(Mechanism::Auto),
        "scram-sha-256" => Ok(Mechanism::ScramSha256),
        "plain" => Ok(Mechanism::Plain),
        "cram-md5" => Ok(Mechanism::CramMd5),
        "external" => Ok(Mechanism::External),
        _ => Err(format!(
            "{s:?}: expected auto, scram-sha-256, plain, cram-md5 or external"
        )),
    }
}

/// Plaintext (password and mail in the clear) only toward this machine, unless forced.
fn check_plaintext(tls: TlsMode, host: &str, forced: bool) -> Result<(), String> {
    if tls != TlsMode::None || forced || is_loopback(host) {
        return Ok(());
    }
    Err(format!(
        "tls none toward {host} would send the password and the mail in the clear; \
         allowed only toward a loopback address unless insecure_plaintext \
         (--insecure-plaintext) is set"
    ))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn check_server_name(name: &str) -> Result<(), String> {
    ServerName::try_from(name.to_string())
        .map(|_| ())
        .map_err(|e| format!("{name:?} cannot be checked against a certificate: {e}"))
}

/// `AB:CD:...` (as `openssl x509 -fingerprint -sha256` prints it) or plain hex.
fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect();
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| format!("{s:?} is not a SHA-256 fingerprint (64 hex digits)"))
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} has no address"),
        )
    })
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Accepts exactly one certificate (by SHA-256 of its DER), whatever its name, issuer or
/// dates: the operator compared the fingerprint out of band. Handshake signatures are still
/// verified, so the peer must hold the certificate's key.
#[derive(Debug)]
struct PinnedCertificate {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[provider]
address = "mx.provider.example:366"
[account]
name = "office"
password_file = "/etc/turnpike/pull.secret"
[delivery]
catch_all = { maildir = "/srv/mail/office" }
"#;

    fn parse(text: &str) -> Result<PullConfig, PullConfigError> {
        PullConfig::parse("pull.toml", text)
    }

    #[test]
    fn minimal_file_gets_safe_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("mx.provider.example", 366));
        assert_eq!(c.tls, TlsMode::StartTls);
        assert_eq!(c.server_name, "mx.provider.example");
        assert_eq!(c.trust, Trust::Ca(PathBuf::from(DEFAULT_CA)));
        assert_eq!(c.mechanism, Mechanism::Auto);
        assert!(c.domains.is_empty(), "bare ATRN by default");
        assert_eq!(c.atrn_timeout, MIN_ATRN_TIMEOUT);
        assert_eq!(c.every, None);
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
[provider]
address = "[::1]:3367"
tls = "implicit"
server_name = "localhost"
pin_sha256 = "00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff"
[account]
name = "office"
password_env = "PULL_SECRET"
mechanism = "scram-sha-256"
[session]
hostname = "gw.office.example"
domains = ["office.example", "Branch.Example"]
atrn_timeout = "15m"
idle_timeout = "30s"
[schedule]
every = "5m"
max_backoff = "2h"
[delivery]
catch_all = { maildir = "/srv/mail/office" }
"#,
        )
        .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 3367));
        assert_eq!(c.tls, TlsMode::Implicit);
        assert!(matches!(c.trust, Trust::Pin(p) if p[1] == 0x11 && p[31] == 0xff));
        assert_eq!(c.secret, Secret::Env("PULL_SECRET".into()));
        assert_eq!(c.mechanism, Mechanism::ScramSha256);
        assert_eq!(c.domains[1].as_str(), "branch.example");
        assert_eq!(c.atrn_timeout, Duration::from_secs(900));
        assert_eq!(c.every, Some(Duration::from_secs(300)));
        assert_eq!(c.max_backoff, Duration::from_secs(7200));
    }

    #[test]
    fn errors_name_file_key_and_problem() {
        let with = |section: &str, line: &str| {
            MINIMAL.replacen(
                &format!("[{section}]\n"),
                &format!("[{section}]\n{line}\n"),
                1,
            )
        };
        let cases: Vec<(String, &str)> = vec![
            (
                with("provider", "tls = \"none\""),
                "pull.toml: provider.tls: tls none toward mx.provider.example would send",
            ),
            (
                with("provider", "tls = \"ssl\""),
                "pull.toml: provider.tls: \"ssl\": expected starttls, implicit or none",
            ),
            (
                with("provider", "colour = 1"),
                "pull.toml: provider.colour: unknown key",
            ),
            (
                MINIMAL.replace(":366", ""),
                "pull.toml: provider.address: \"mx.provider.example\" is not host:port",
            ),
            (
                with("provider", "pin_sha256 = \"12:34\""),
                "pull.toml: provider.pin_sha256: \"12:34\" is not a SHA-256 fingerprint",
            ),
            (
                with("provider", "client_cert = \"/c.pem\""),
                "pull.toml: provider.client_key: missing",
            ),
            (
                MINIMAL.replace("name = \"office\"\n", ""),
                "pull.toml: account.name: missing",
            ),
            (
                with("account", "password_env = \"X\""),
                "pull.toml: account.password_env: give either",
            ),
            (
                with("account", "mechanism = \"digest-md5\""),
                "pull.toml: account.mechanism: \"digest-md5\": expected auto",
            ),
            (
                with("account", "mechanism = \"external\""),
                "pull.toml: account.mechanism: external needs TLS",
            ),
            (
                format!("{MINIMAL}[session]\natrn_timeout = \"5m\"\n"),
                "pull.toml: session.atrn_timeout: RFC 2645 requires",
            ),
            (
                format!("{MINIMAL}[session]\ndomains = [\"localhost\"]\n"),
                "pull.toml: session.domains: \"localhost\": ATRN needs a domain of at least two",
            ),
            (
                format!("{MINIMAL}[schedule]\nevery = \"soon\"\n"),
                "pull.toml: schedule.every: \"soon\" is not a duration",
            ),
            (
                MINIMAL.replace(
                    "[delivery]\ncatch_all = { maildir = \"/srv/mail/office\" }\n",
                    "",
                ),
                "pull.toml: delivery: missing",
            ),
            (
                MINIMAL.replace("catch_all", "catchall"),
                "pull.toml: delivery: unknown field `catchall`",
            ),
            ("[provider\n".to_string(), "pull.toml: invalid TOML"),
        ];
        for (text, want) in cases {
            let got = parse(&text).expect_err(&text).to_string();
            assert!(got.starts_with(want), "got {got:?}\nwant {want:?}\n{text}");
        }
    }

    #[test]
    fn plaintext_is_allowed_toward_loopback_or_when_forced() {
        let loopback = MINIMAL
            .replace("mx.provider.example:366", "127.0.0.1:2366")
            .replace("[provider]\n", "[provider]\ntls = \"none\"\n");
        assert_eq!(parse(&loopback).unwrap().tls, TlsMode::None);
        let forced = MINIMAL.replace(
            "[provider]\n",
            "[provider]\ntls = \"none\"\ninsecure_plaintext = true\n",
        );
        assert_eq!(parse(&forced).unwrap().tls, TlsMode::None);
    }

    #[test]
    fn flags_need_the_essentials_and_refuse_remote_plaintext() {
        let mut flags = PullFlags {
            provider: Some("mx.example:366".into()),
            account: Some("office".into()),
            password_file: Some("/secret".into()),
            tls: Some("starttls".into()),
            maildir: Some("/srv/mail".into()),
            ..PullFlags::default()
        };
        let c = PullConfig::from_flags(&flags).unwrap();
        assert!(c.delivery.catch_all.is_some());
        assert_eq!(c.secret, Secret::File("/secret".into()));

        flags.tls = Some("none".into());
        let e = PullConfig::from_flags(&flags).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("--tls"));
        flags.insecure_plaintext = true;
        assert!(PullConfig::from_flags(&flags).is_ok());

        flags.maildir = None;
        let e = PullConfig::from_flags(&flags).unwrap_err().to_string();
        assert_eq!(e, "command line: --maildir: required without --config");
    }

    #[test]
    fn secrets_come_from_file_or_environment() {
        let dir = std::env::temp_dir().join(format!("turnpike-pull-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret\nignored second line\n").unwrap();
        let mut c = parse(MINIMAL).unwrap();
        c.secret = Secret::File(file.clone());
        assert_eq!(c.password().unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(c.password().unwrap_err().problem.contains("empty"));
        c.secret = Secret::File(dir.join("missing"));
        let e = c.password().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("account.password_file"));
        c.secret = Secret::Env("TURNPIKE_PULL_TEST_UNSET_VARIABLE".into());
        assert_eq!(
            c.password().unwrap_err().key.as_deref(),
            Some("account.password_env")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "ab".repeat(32);
        assert_eq!(parse_fingerprint(&hex).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint(&"ab".repeat(31)).is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn tls_material_loads_with_a_client_certificate_for_external() {
        let dir = std::env::temp_dir().join(format!("turnpike-pull-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["office.example".to_string()])
            .unwrap()
            .self_signed(&key_pair)
            .unwrap();
        let (cert_path, key_path) = (dir.join("office.crt"), dir.join("office.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();

        let text = MINIMAL.replace(
            "[provider]\n",
            &format!(
                "[provider]\nca = \"{c}\"\nclient_cert = \"{c}\"\nclient_key = \"{k}\"\n",
                c = cert_path.display(),
                k = key_path.display()
            ),
        );
        let text = text.replace(
            "password_file = \"/etc/turnpike/pull.secret\"",
            "mechanism = \"external\"",
        );
        let auto = parse(&text.replace("mechanism = \"external\"", "")).unwrap();
        assert_eq!(
            auto.secret,
            Secret::None,
            "auto with a certificate needs no password"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.secret, Secret::None, "EXTERNAL needs no password");
        assert_eq!(c.password().unwrap(), "");
        let tls = c.tls_client_config().unwrap();
        assert!(tls.client_auth_cert_resolver.has_certs());

        // Without the client certificate there is nothing to offer for EXTERNAL.
        let mut plain = c.clone();
        plain.client_cert = None;
        assert!(!plain
            .tls_client_config()
            .unwrap()
            .client_auth_cert_resolver
            .has_certs());
        // A key file without a key is named.
        plain.client_cert = Some((cert_path.clone(), cert_path.clone()));
        let e = plain.tls_client_config().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("provider.client_key"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
