//! The `[delivery]` section of the pull configuration: which target takes which recipient.
//!
//! ```toml
//! [delivery]
//! catch_all = { maildir = "/srv/mail/postmaster" }   # recipients not listed below
//! timeout = "5m"                                   # per LMTP/SMTP/MDA hand-over
//! ledger = "/var/lib/turnpike/delivered.ledger"    # see the module docs of `deliver`
//!
//! [delivery.recipients]
//! "alice@example.com" = { maildir = "/home/alice/Maildir" }
//! "bob@example.com"   = { lmtp = "unix:/run/dovecot/lmtp" }
//! "@example.org"      = { smtp = "127.0.0.1:25" }    # a whole domain
//! "carol@example.com" = { mda = ["/usr/bin/procmail", "-f", "{sender}", "-d", "carol"] }
//! ```
//!
//! Keys are matched case-insensitively: the exact address first, then `@domain`, then
//! `catch_all`. A recipient that matches nothing is refused (`550 5.1.1`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The `[delivery]` section.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Address (`user@domain`) or whole domain (`@domain`) -> target.
    #[serde(default)]
    pub recipients: BTreeMap<String, TargetConfig>,
    /// Where every other recipient goes; without it they are refused.
    #[serde(default)]
    pub catch_all: Option<TargetConfig>,
    /// Longest one LMTP/SMTP conversation or MDA run may take before it counts as a temporary
    /// failure.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// File remembering which recipients already have a message, so a message the provider
    /// sends again (after a mixed outcome or a lost 250) is not delivered to them twice.
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// How long ledger entries are kept: at least the provider's retry window (its
    /// `max_hold`, 30 days by default).
    #[serde(default = "default_ledger_keep", deserialize_with = "duration")]
    pub ledger_keep: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            recipients: BTreeMap::new(),
            catch_all: None,
            timeout: default_timeout(),
            ledger: None,
            ledger_keep: default_ledger_keep(),
        }
    }
}

impl DeliveryConfig {
    /// A configuration that puts every recipient into one maildir (`turnpike pull --maildir`).
    pub fn maildir(path: impl Into<PathBuf>) -> Self {
        DeliveryConfig {
            catch_all: Some(TargetConfig::Maildir(path.into())),
            ..DeliveryConfig::default()
        }
    }
}

/// One delivery target, written as a one-key inline table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum TargetConfig {
    /// A maildir (created if missing, with `tmp`, `new` and `cur`).
    Maildir(PathBuf),
    /// An LMTP server (RFC 2033): `unix:/path`, an absolute socket path, or `host:port`.
    Lmtp(String),
    /// An SMTP server, normally the local MTA: `host:port`.
    Smtp(String),
    /// An MDA command: program and arguments, run once per recipient without a shell.
    /// `{sender}`, `{recipient}`, `{local}` and `{domain}` in arguments are replaced.
    Mda(Vec<String>),
}

fn default_timeout() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_ledger_keep() -> Duration {
    Duration::from_secs(30 * 24 * 60 * 60)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    crate::config::parse_duration(&s).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration like \"30s\", \"5m\", \"2h\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DeliveryConfig, toml::de::Error> {
        #[derive(Deserialize)]
        struct File {
            delivery: DeliveryConfig,
        }
        toml::from_str::<File>(text).map(|f| f.delivery)
    }

    #[test]
    fn parses_every_target_kind() {
        let c = parse(
            r#"
            [delivery]
            catch_all = { maildir = "/srv/mail/all" }
            timeout = "30s"
            ledger = "/var/lib/turnpike/ledger"
            [delivery.recipients]
            "alice@example.com" = { maildir = "/home/alice/Maildir" }
            "bob@example.com" = { lmtp = "unix:/run/dovecot/lmtp" }
            "@example.org" = { smtp = "127.0.0.1:25" }
            "carol@example.com" = { mda = ["/usr/bin/procmail", "-d", "carol"] }
            "#,
        )
        .unwrap();
        assert_eq!(
            c.catch_all,
            Some(TargetConfig::Maildir("/srv/mail/all".into()))
        );
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.ledger_keep, Duration::from_secs(30 * 86_400));
        assert_eq!(c.recipients.len(), 4);
        assert_eq!(
            c.recipients["bob@example.com"],
            TargetConfig::Lmtp("unix:/run/dovecot/lmtp".into())
        );
        assert_eq!(
            c.recipients["@example.org"],
            TargetConfig::Smtp("127.0.0.1:25".into())
        );
        assert_eq!(
            c.recipients["carol@example.com"],
            TargetConfig::Mda(vec![
                "/usr/bin/procmail".into(),
                "-d".into(),
                "carol".into()
            ])
        );
    }

    #[test]
    fn defaults_and_errors() {
        let c = parse("[delivery]\n").unwrap();
        assert!(c.recipients.is_empty() && c.catch_all.is_none() && c.ledger.is_none());
        assert_eq!(c.timeout, Duration::from_secs(300));

        let unknown_kind = parse("[delivery]\ncatch_all = { mbox = \"/x\" }\n").unwrap_err();
        assert!(unknown_kind.to_string().contains("mbox"), "{unknown_kind}");
        let bad_key = parse("[delivery]\ncatchall = { maildir = \"/x\" }\n").unwrap_err();
        assert!(bad_key.to_string().contains("catchall"), "{bad_key}");
        let bad_time = parse("[delivery]\ntimeout = \"soon\"\n").unwrap_err();
        assert!(bad_time.to_string().contains("soon"), "{bad_time}");
    }
}
