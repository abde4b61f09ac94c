//! Delivery targets of the customer: where `turnpike pull` puts each received message before
//! it answers the provider 250.
//!
//! - [`config`]: the `[delivery]` section (recipient -> target map, catch-all).
//! - [`maildir`]: tmp/ then new/, fsynced, one file per recipient.
//! - [`smtp`]: LMTP (RFC 2033, one reply per recipient) and SMTP to a local MTA.
//! - [`mda`]: a pipe to an MDA command, sendmail exit codes.
//! - [`outcome`]: per-recipient replies -> the one reply per message the provider sees.
//! - [`ledger`]: recipients already delivered of a message the provider will send again.
//!
//! What each target receives: the body exactly as received, preceded by our `Received:` line
//! (naming the provider's address and the EHLO name it gave after the turnaround). Maildir
//! files and MDA input also start with `Return-Path: <sender>` and `Delivered-To: <recipient>`
//! as Postfix's local(8) writes them; LMTP and SMTP servers add their own. A message whose
//! header already holds `Delivered-To:` for the recipient is a mail loop and refused for that
//! recipient (`554 5.4.6`), before any target sees it.
//!
//! Mixed outcomes (see [`outcome`] for the table): the provider hears one reply per message.
//! When some recipients have the message and others failed temporarily we answer 4xx, so the
//! provider keeps the message and retries. With a `ledger` configured every delivered
//! recipient is recorded (fdatasynced) before we answer and skipped when the same message
//! comes again, so nobody gets it twice: not after a 4xx for the others, and not after a 250
//! that was lost with the connection. Without a ledger the retry delivers them again (logged
//! as a warning): a duplicate, never a loss. When the others failed permanently we answer 5xx
//! with a text naming who got it and who did not; the provider's delivery report quotes it to
//! the sender.

pub mod config;
pub mod ledger;
pub mod maildir;
pub mod mda;
pub mod outcome;
pub mod smtp;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use config::{DeliveryConfig, TargetConfig};

use crate::proto::inbound::{Incoming, RcptVerdict};
use crate::proto::reply::Reply;
use crate::proto::trace::{self, Trace};
use crate::types::{DomainName, Mailbox};

use super::session::Sink;
use ledger::Ledger;
use maildir::Maildir;
use outcome::Combined;

/// Why a delivery configuration cannot be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum DeliveryError {
    /// A key of `[delivery.recipients]` is not `user@domain` or `@domain`.
    BadRecipient {
        /// The key as written.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// A maildir could not be created or opened.
    Maildir {
        /// The maildir.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// An LMTP/SMTP address or MDA command is unusable.
    BadTarget {
        /// The target as written.
        target: String,
        /// What is wrong with it.
        why: String,
    },
    /// The ledger could not be opened.
    Ledger {
        /// The ledger file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::BadRecipient { key, why } => {
                write!(f, "delivery.recipients: {key:?}: {why}")
            }
            DeliveryError::Maildir { path, source } => {
                write!(f, "maildir {}: {source}", path.display())
            }
            DeliveryError::BadTarget { target, why } => {
                write!(f, "delivery target {target}: {why}")
            }
            DeliveryError::Ledger { path, source } => {
                write!(f, "delivery.ledger {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for DeliveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DeliveryError::Maildir { source, .. } | DeliveryError::Ledger { source, .. } => {
                Some(source)
            }
            _ => None,
        }
    }
}

/// One configured target, ready to deliver.
#[derive(Debug)]
enum Target {
    Maildir(Maildir),
    Lmtp(smtp::Endpoint),
    Smtp(smtp::Endpoint),
    Mda(mda::Mda),
}

impl Target {
    fn open(cfg: &TargetConfig) -> Result<Target, DeliveryError> {
        let bad = |why: String| DeliveryError::BadTarget {
            target: format!("{cfg:?}"),
            why,
        };
        Ok(match cfg {
            TargetConfig::Maildir(path) => Target::Maildir(Maildir::open(path).map_err(
                |source| DeliveryError::Maildir {
                    path: path.clone(),
                    source,
                },
            )?),
            TargetConfig::Lmtp(addr) => Target::Lmtp(smtp::Endpoint::parse(addr).map_err(bad)?),
            TargetConfig::Smtp(addr) => Target::Smtp(smtp::Endpoint::parse(addr).map_err(bad)?),
            TargetConfig::Mda(argv) => Target::Mda(mda::Mda::new(argv).map_err(bad)?),
        })
    }
}

/// Where recipients go: exact address, then `@domain`, then the catch-all.
#[derive(Debug, Default)]
struct Routes {
    exact: HashMap<String, usize>,
    domains: HashMap<String, usize>,
    catch_all: Option<usize>,
}

impl Routes {
    fn find(&self, rcpt: &Mailbox) -> Option<usize> {
        self.exact
            .get(&rcpt.to_string().to_lowercase())
            .or_else(|| self.domains.get(&rcpt.domain.to_lowercase()))
            .copied()
            .or(self.catch_all)
    }
}

/// What our `Received:` line says about this end.
#[derive(Clone, Debug)]
struct Stamp {
    host: String,
    provider: IpAddr,
}

/// The customer's delivery: takes each received message to its recipients' targets.
#[derive(Debug)]
pub struct Deliverer {
    targets: Vec<Target>,
    routes: Routes,
    timeout: Duration,
    ledger: Option<Ledger>,
    stamp: Stamp,
    id_prefix: String,
    seq: u64,
}

impl Deliverer {
    /// Checks the configuration and opens every target (maildirs are created when missing).
    pub fn from_config<'a>(cfg: &'a DeliveryConfig) -> Result<Deliverer, DeliveryError> {
        let mut targets: Vec<Target> = Vec::new();
        let mut seen: Vec<&TargetConfig> = Vec::new();
        let mut index_of = |t: &'a TargetConfig| -> Result<usize, DeliveryError> {
            // The same target under several keys is opened once, so an LMTP server gets all
            // its recipients of a message in one transaction.
            if let Some(i) = seen.iter().position(|s| *s == t) {
                return Ok(i);
            }
            targets.push(Target::open(t)?);
            seen.push(t);
            Ok(targets.len() - 1)
        };
        let mut routes = Routes::default();
        for (key, target) in &cfg.recipients {
            let bad = |why: &str| DeliveryError::BadRecipient {
                key: key.clone(),
                why: why.into(),
            };
            let Some((local, domain)) = key.rsplit_once('@') else {
                return Err(bad("expected user@domain or @domain"));
            };
            let domain = DomainName::parse(domain)
                .map_err(|e| bad(&format!("bad domain: {e}")))?
                .as_str()
                .to_string();
            let i = index_of(target)?;
            let clash = if local.is_empty() {
                routes.domains.insert(domain, i)
            } else {
                routes
                    .exact
                    .insert(format!("{}@{domain}", local.to_lowercase()), i)
            };
            if clash.is_some() {
                return Err(bad("listed twice (keys are case-insensitive)"));
            }
        }
        if let Some(t) = &cfg.catch_all {
            routes.catch_all = Some(index_of(t)?);
        }
        let ledger = match &cfg.ledger {
            Some(path) => Some(Ledger::open(path, cfg.ledger_keep, unix_secs()).map_err(
                |source| DeliveryError::Ledger {
                    path: path.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let mut random = [0u8; 4];
        let _ = getrandom::fill(&mut random);
        Ok(Deliverer {
            targets,
            routes,
            timeout: cfg.timeout,
            ledger,
            stamp: Stamp {
                host: "localhost".into(),
                provider: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            },
            id_prefix: format!("{:08x}", u32::from_le_bytes(random)),
            seq: 0,
        })
    }

    /// Sets what our `Received:` line names: our host name (the `by` clause) and the
    /// provider's address (the `from` clause). Call before each session.
    pub fn set_session(&mut self, hostname: &str, provider: IpAddr) {
        self.stamp = Stamp {
            host: hostname.to_string(),
            provider,
        };
    }

    /// Whether a recipient has a target, for the RCPT reply: refusing an unknown recipient
    /// there lets the provider bounce just that one, instead of a mixed outcome after DATA.
    pub fn check_recipient(&self, rcpt: &Mailbox) -> RcptVerdict {
        match self.routes.find(rcpt) {
            Some(_) => RcptVerdict::Accept,
            None => RcptVerdict::Reject(no_route(rcpt)),
        }
    }

    fn next_id(&mut self) -> String {
        self.seq += 1;
        format!("{}.{}", self.id_prefix, self.seq)
    }

    /// Delivers `message` to the recipients at `idx` (all routed to `target`), one reply each.
    async fn deliver_group(
        &mut self,
        target: usize,
        message: &Incoming,
        idx: &[usize],
        id: &str,
        now: u64,
    ) -> Vec<Reply> {
        let rcpts: Vec<&Mailbox> = idx
            .iter()
            .map(|&i| &message.envelope.recipients[i].mailbox)
            .collect();
        let stamp = self.stamp.clone();
        let received = |rcpt: Option<&Mailbox>| {
            trace::received(&Trace {
                host: &stamp.host,
                helo: &message.helo,
                peer_ip: &stamp.provider.to_string(),
                protocol: message.protocol,
                recipient: rcpt,
                id,
                account: None,
                unix_secs: now,
            })
        };
        let sender = message.envelope.sender.as_ref();
        let timeout = self.timeout;
        let lmtp = matches!(self.targets[target], Target::Lmtp(_));
        match &mut self.targets[target] {
            Target::Maildir(md) => rcpts
                .iter()
                .map(|rcpt| {
                    let head = local_head(sender, rcpt, &received(Some(rcpt)));
                    match md.store(&[head.as_bytes(), &message.body]) {
                        Ok(path) => {
                            tracing::debug!(%rcpt, file = %path.display(), "stored in maildir");
                            Reply::with_status(250, (2, 0, 0), "Delivered to maildir")
                        }
                        Err(e) => {
                            tracing::error!(%rcpt, maildir = %md.root().display(), error = %e, "maildir delivery failed");
                            maildir_failure(&e)
                        }
                    }
                })
                .collect(),
            Target::Lmtp(ep) | Target::Smtp(ep) => {
                let one = (rcpts.len() == 1).then(|| rcpts[0]);
                let head = received(one);
                smtp::deliver(ep, lmtp, &stamp.host, message, &rcpts, &head, timeout).await
            }
            Target::Mda(m) => {
                let mut out = Vec::with_capacity(rcpts.len());
                for rcpt in &rcpts {
                    let head = local_head(sender, rcpt, &received(Some(rcpt)));
                    out.push(m.run(sender, rcpt, &[head.as_bytes(), &message.body], timeout).await);
                }
                out
            }
        }
    }
}

impl Sink for Deliverer {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        let now = unix_secs();
        let id = self.next_id();
        let recipients = &message.envelope.recipients;
        let key = self
            .ledger
            .as_ref()
            .map(|_| ledger::message_key(message.envelope.sender.as_ref(), &message.body));
        let mut replies: Vec<Option<Reply>> = vec![None; recipients.len()];
        let mut from_ledger = vec![false; recipients.len()];
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, r) in recipients.iter().enumerate() {
            let rcpt = &r.mailbox;
            if let (Some(l), Some(k)) = (&self.ledger, &key) {
                if l.contains(k, rcpt) {
                    tracing::info!(%id, %rcpt, "already delivered in an earlier session; not again");
                    replies[i] = Some(Reply::with_status(250, (2, 0, 0), "Already delivered"));
                    from_ledger[i] = true;
                    continue;
                }
            }
            if has_delivered_to(&message.body, rcpt) {
                tracing::warn!(%id, %rcpt, "mail loop: Delivered-To already present");
                replies[i] = Some(Reply::with_status(
                    554,
                    (5, 4, 6),
                    "Mail loop: already delivered to this recipient",
                ));
                continue;
            }
            match self.routes.find(rcpt) {
                Some(t) => match groups.iter_mut().find(|(g, _)| *g == t) {
                    Some((_, idx)) => idx.push(i),
                    None => groups.push((t, vec![i])),
                },
                None => replies[i] = Some(no_route(rcpt)),
            }
        }
        for (target, idx) in &groups {
            let got = self.deliver_group(*target, &message, idx, &id, now).await;
            for (&i, reply) in idx.iter().zip(got) {
                replies[i] = Some(reply);
            }
        }
        let outcomes: Vec<(Mailbox, Reply)> = recipients
            .iter()
            .zip(replies)
            .map(|(r, reply)| {
                let reply = reply.expect("every recipient has a reply");
                (r.mailbox.clone(), reply)
            })
            .collect();
        for (rcpt, reply) in &outcomes {
            if !reply.is_positive() {
                tracing::warn!(%id, %rcpt, code = reply.code, text = %reply.lines.join(" "), "recipient not delivered");
            }
        }
        // Remember who has it before answering: should the provider send it again (our reply
        // lost, or a 4xx for the others), those recipients are not given a second copy.
        let fresh: Vec<&Mailbox> = outcomes
            .iter()
            .zip(&from_ledger)
            .filter(|((_, r), skipped)| r.is_positive() && !**skipped)
            .map(|((m, _), _)| m)
            .collect();
        if let (Some(l), Some(k), false) = (&mut self.ledger, &key, fresh.is_empty()) {
            if let Err(e) = l.record(k, &fresh, now) {
                tracing::error!(%id, ledger = %l.path().display(), error = %e, "cannot record delivered recipients; a resend would deliver to them again");
            }
        }
        match outcome::combine(&outcomes) {
            Combined::Delivered => {
                tracing::info!(%id, recipients = outcomes.len(), bytes = message.body.len(), "delivered");
                Ok(())
            }
            Combined::Partial(reply) => {
                if self.ledger.is_none() {
                    tracing::warn!(%id, delivered = fresh.len(), "partial delivery without a ledger: the provider's retry will deliver to these recipients again");
                }
                Err(reply)
            }
            Combined::Failed(reply) => Err(reply),
        }
    }
}

/// A failed maildir write is always temporary (the admin can fix it; the provider keeps the
/// message meanwhile); a full disk or quota says so.
fn maildir_failure(e: &std::io::Error) -> Reply {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => Reply::with_status(452, (4, 3, 1), "Local disk full"),
        Some(libc::EDQUOT) => Reply::with_status(452, (4, 2, 2), "Mailbox over quota"),
        _ => Reply::with_status(451, (4, 3, 0), "Local mailbox write failed"),
    }
}

fn no_route(rcpt: &Mailbox) -> Reply {
    Reply::with_status(
        550,
        (5, 1, 1),
        format!("<{rcpt}>: no delivery target for this recipient"),
    )
}

/// `Return-Path:` and `Delivered-To:` (as Postfix's local(8) writes them), then `received`.
fn local_head(sender: Option<&Mailbox>, rcpt: &Mailbox, received: &str) -> String {
    let sender = sender.map(|s| s.to_string()).unwrap_or_default();
    format!(
        "Return-Path: <{}>\r\nDelivered-To: {}\r\n{received}",
        one_line(&sender),
        one_line(&rcpt.to_string())
    )
}

/// Envelope text can never carry CR/LF, but a header must not be broken by it either way.
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// True when the header section holds `Delivered-To: <rcpt>` (case-insensitive), the loop
/// marker a local delivery leaves.
fn has_delivered_to(body: &[u8], rcpt: &Mailbox) -> bool {
    let want = rcpt.to_string().to_lowercase();
    for line in body.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return false; // end of the header section
        }
        let Some(value) = line
            .get(..13)
            .filter(|n| n.eq_ignore_ascii_case(b"Delivered-To:"))
            .map(|_| &line[13..])
        else {
            continue;
        };
        let value = String::from_utf8_lossy(value).trim().to_lowercase();
        let value = value.trim_start_matches('<').trim_end_matches('>');
        if value == want {
            return true;
        }
    }
    false
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Mailbox {
        let (local, domain) = s.split_once('@').unwrap();
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn routes_exact_then_domain_then_catch_all() {
        let dir = std::env::temp_dir().join(format!("turnpike-routes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg: DeliveryConfig = toml::from_str(&format!(
            r#"
            catch_all = {{ maildir = "{d}/all" }}
            [recipients]
            "Alice@Example.com" = {{ maildir = "{d}/alice" }}
            "@example.org" = {{ smtp = "127.0.0.1:2525" }}
            "bob@example.org" = {{ maildir = "{d}/alice" }}
            "#,
            d = dir.display()
        ))
        .unwrap();
        let d = Deliverer::from_config(&cfg).unwrap();
        assert_eq!(d.targets.len(), 3, "same maildir opened once");
        let alice = d.routes.find(&mb("alice@EXAMPLE.COM")).unwrap();
        let org = d.routes.find(&mb("eve@example.org")).unwrap();
        let all = d.routes.find(&mb("zed@other.net")).unwrap();
        assert_eq!(d.routes.find(&mb("bob@example.org")), Some(alice));
        assert!(matches!(d.targets[alice], Target::Maildir(ref m) if m.root().ends_with("alice")));
        assert!(matches!(d.targets[org], Target::Smtp(_)));
        assert!(matches!(d.targets[all], Target::Maildir(ref m) if m.root().ends_with("all")));
        assert!(dir.join("alice/new").is_dir() && dir.join("all/cur").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();

        let no_catch_all: DeliveryConfig =
            toml::from_str("[recipients]\n\"@example.org\" = { smtp = \"127.0.0.1:25\" }\n")
                .unwrap();
        let d = Deliverer::from_config(&no_catch_all).unwrap();
        assert!(matches!(
            d.check_recipient(&mb("x@example.com")),
            RcptVerdict::Reject(r) if r.code == 550
        ));
        assert!(matches!(
            d.check_recipient(&mb("x@example.org")),
            RcptVerdict::Accept
        ));
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = |text: &str| {
            let cfg: DeliveryConfig = toml::from_str(text).unwrap();
            Deliverer::from_config(&cfg).unwrap_err().to_string()
        };
        let e = err("[recipients]\n\"nobody\" = { smtp = \"127.0.0.1:25\" }\n");
        assert!(e.contains("\"nobody\"") && e.contains("user@domain"), "{e}");
        let e = err("[recipients]\n\"a@b_c.com\" = { smtp = \"127.0.0.1:25\" }\n");
        assert!(e.contains("bad domain"), "{e}");
        let e = err("[recipients]\n\"a@x.com\" = { smtp = \"127.0.0.1:25\" }\n\
             \"A@X.com\" = { smtp = \"127.0.0.1:26\" }\n");
        assert!(e.contains("listed twice"), "{e}");
        let e = err("catch_all = { maildir = \"/proc/no/such/maildir\" }\n");
        assert!(e.contains("/proc/no/such/maildir"), "{e}");
    }

    #[test]
    fn loop_detection_reads_only_the_header() {
        let body =
            b"Subject: x\r\nDelivered-To: <A@example.com>\r\n\r\nDelivered-To: b@example.com\r\n";
        assert!(has_delivered_to(body, &mb("a@example.com")));
        assert!(!has_delivered_to(body, &mb("b@example.com")));
        assert!(!has_delivered_to(
            b"Delivered-To:\r\n\r\n",
            &mb("a@example.com")
        ));
    }

    #[test]
    fn maildir_failures_are_temporary() {
        let full = maildir_failure(&std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            (full.code, full.status.unwrap().to_string()),
            (452, "4.3.1".into())
        );
        let quota = maildir_failure(&std::io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(quota.status.unwrap().to_string(), "4.2.2");
        let denied = maildir_failure(&std::io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(denied.code, 451);
    }

    #[test]
    fn local_head_fields() {
        let h = local_head(None, &mb("a@example.com"), "Received: x\r\n");
        assert_eq!(
            h,
            "Return-Path: <>\r\nDelivered-To: a@example.com\r\nReceived: x\r\n"
        );
    }
}
