//! bench day's exactly-once check: every message the MX accepted must reach the right
//! account exactly once, byte-identical, or be refused by that customer (5xx) exactly once and
//! then never be offered again.
//!
//! The ledger learns each message before it is sent ([`Ledger::expect`]: its bench id, the
//! account owning its recipients, its SHA-256), then what the MX said ([`Ledger::mx_settled`])
//! and every time a customer was offered it ([`Ledger::offered`]) and how the customer
//! answered ([`Ledger::answered`]). [`Ledger::verify`] judges the run. Messages are matched by
//! the `X-Bench-Id` header; a delivered body is compared after the `Received:` fields that
//! servers put in front are stripped.
//!
//! Allowed, by SMTP's own rules: a message whose connection was lost after its body went
//! out but before the MX's reply may arrive once or not at all (`uncertain`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::types::Mailbox;

use super::message;
use super::report::Verification;

/// What the MX said about a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mx {
    /// Not answered yet.
    Pending,
    /// 250: the provider holds it.
    Accepted,
    /// Refused, or never sent: it must never arrive.
    Refused,
    /// The connection was lost after the body: it may arrive once.
    Uncertain,
}

#[derive(Debug)]
struct Entry {
    account: String,
    digest: [u8; 32],
    mx: Mx,
    accepted_at: Option<Instant>,
    /// Customer 250s.
    delivered: u32,
    /// Customer 5xx.
    refused: u32,
    /// Offers after a 250 or 5xx.
    offered_after_final: u32,
    corrupted: bool,
    misdelivered: bool,
}

/// How a customer answered an offered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 250.
    Delivered,
    /// 4xx: it must come again.
    Deferred,
    /// 5xx: the provider bounces it.
    Refused,
}

/// What an offered message is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offer {
    /// A message of this run, seen for the first time since its last 4xx (or ever).
    Expected(String),
    /// A message of this run offered again after a 250 or 5xx: a duplicate.
    Duplicate(String),
    /// A bench message of this run the ledger never sent, or one the MX refused.
    Unexpected(String),
    /// A bench message of another run (left over in the hold).
    Foreign,
    /// Not a bench message: a delivery status notification or other mail.
    Report,
}

/// The ledger of one run.
#[derive(Debug)]
pub struct Ledger {
    run_id: String,
    /// account -> the domains it owns.
    domains: HashMap<String, HashSet<String>>,
    entries: HashMap<String, Entry>,
    unexpected: Vec<String>,
    foreign: u64,
}

impl Ledger {
    /// A ledger for `run_id`, with each account's domains.
    pub fn new(run_id: &str, accounts: &BTreeMap<String, Vec<String>>) -> Ledger {
        Ledger {
            run_id: run_id.into(),
            domains: accounts
                .iter()
                .map(|(a, d)| {
                    (
                        a.clone(),
                        d.iter().map(|d| d.to_ascii_lowercase()).collect(),
                    )
                })
                .collect(),
            entries: HashMap::new(),
            unexpected: Vec::new(),
            foreign: 0,
        }
    }

    /// A message about to be sent: `id` (`<run>.<seq>`), the account it is for, its bytes'
    /// SHA-256.
    pub fn expect(&mut self, id: &str, account: &str, digest: [u8; 32]) {
        self.entries.insert(
            id.to_string(),
            Entry {
                account: account.into(),
                digest,
                mx: Mx::Pending,
                accepted_at: None,
                delivered: 0,
                refused: 0,
                offered_after_final: 0,
                corrupted: false,
                misdelivered: false,
            },
        );
    }

    /// The MX's verdict: accepted (250), or not; `lost_after_body` when the connection was
    /// lost with the body sent and no reply.
    pub fn mx_settled(&mut self, id: &str, accepted: bool, lost_after_body: bool, now: Instant) {
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        e.mx = match (accepted, lost_after_body) {
            (true, _) => Mx::Accepted,
            (false, true) => Mx::Uncertain,
            (false, false) => Mx::Refused,
        };
        if accepted {
            e.accepted_at = Some(now);
        }
    }

    /// A customer of `account` is offered `bytes` for `recipients`: classifies it and checks
    /// account and content.
    pub fn offered(&mut self, account: &str, recipients: &[Mailbox], bytes: &[u8]) -> Offer {
        let Some(id) = message::bench_id(bytes) else {
            return Offer::Report;
        };
        if id.rsplit_once('.').map(|(run, _)| run) != Some(self.run_id.as_str()) {
            self.foreign += 1;
            return Offer::Foreign;
        }
        let id = id.to_string();
        let owned = self.domains.get(account);
        let Some(e) = self.entries.get_mut(&id) else {
            self.unexpected.push(id.clone());
            return Offer::Unexpected(id);
        };
        if matches!(e.mx, Mx::Refused) {
            self.unexpected.push(id.clone());
            return Offer::Unexpected(id);
        }
        let right_account = e.account == account
            && recipients
                .iter()
                .all(|r| owned.is_some_and(|d| d.contains(&r.domain.to_ascii_lowercase())));
        if !right_account {
            e.misdelivered = true;
        }
        if message::digest(message::strip_trace(bytes)) != e.digest {
            e.corrupted = true;
        }
        if e.delivered + e.refused > 0 {
            e.offered_after_final += 1;
            return Offer::Duplicate(id);
        }
        Offer::Expected(id)
    }

    /// How the customer answered an [`Offer::Expected`] or [`Offer::Duplicate`] message;
    /// returns how long it was held (MX 250 to now) for a first delivery.
    pub fn answered(&mut self, id: &str, answer: Answer, now: Instant) -> Option<Duration> {
        let e = self.entries.get_mut(id)?;
        let first = e.delivered + e.refused == 0;
        match answer {
            Answer::Delivered => e.delivered += 1,
            Answer::Refused => e.refused += 1,
            Answer::Deferred => return None,
        }
        if !first || answer != Answer::Delivered {
            return None;
        }
        // Delivered before our sender saw the 250 (both run on this thread): held ~0.
        Some(
            e.accepted_at
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
        )
    }

    /// Judges the run.
    pub fn verify(&self) -> Verification {
        let mut v = Verification {
            unexpected: self.unexpected.clone(),
            ..Verification::default()
        };
        let mut ids: Vec<&String> = self.entries.keys().collect();
        ids.sort_by_key(|id| id.rsplit_once('.').and_then(|(_, n)| n.parse::<u64>().ok()));
        for id in ids {
            let e = &self.entries[id];
            let answers = e.delivered + e.refused;
            if e.corrupted {
                v.corrupted.push(id.clone());
            }
            if e.misdelivered {
                v.misdelivered.push(id.clone());
            }
            if answers > 1 || e.offered_after_final > 0 {
                v.duplicates.push(id.clone());
            }
            match e.mx {
                Mx::Accepted => {
                    v.accepted += 1;
                    match (e.delivered, e.refused) {
                        (0, 0) => v.missing.push(id.clone()),
                        (1, 0) if !e.corrupted && !e.misdelivered => v.delivered_once += 1,
                        (0, 1) if e.offered_after_final == 0 => v.refused_once += 1,
                        _ => {}
                    }
                }
                Mx::Uncertain => v.uncertain += 1,
                Mx::Pending | Mx::Refused => {}
            }
        }
        v.foreign = self.foreign;
        v.ok = v.missing.is_empty()
            && v.duplicates.is_empty()
            && v.misdelivered.is_empty()
            && v.corrupted.is_empty()
            && v.unexpected.is_empty();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::message::MessageBody;

    fn setup() -> (Ledger, Vec<Vec<u8>>) {
        let accounts = BTreeMap::from([
            ("a".to_string(), vec!["a.test".to_string()]),
            ("b".to_string(), vec!["b.test".to_string()]),
        ]);
        let mut l = Ledger::new("run", &accounts);
        let bodies = (0..3)
            .map(|seq| {
                let m = MessageBody::new("run", seq, 500, "s@x.test", &["u@a.test".into()]);
                l.expect(&format!("run.{seq}"), "a", m.digest());
                l.mx_settled(&format!("run.{seq}"), true, false, Instant::now());
                let mut v = b"Received: from x\r\n\tby mx; now\r\n".to_vec();
                v.extend(m.to_vec());
                v
            })
            .collect();
        (l, bodies)
    }

    fn rcpt(domain: &str) -> Vec<Mailbox> {
        vec![Mailbox {
            local: "u".into(),
            domain: domain.into(),
        }]
    }

    #[test]
    fn exactly_once_passes() {
        let (mut l, b) = setup();
        let now = Instant::now();
        assert_eq!(
            l.offered("a", &rcpt("a.test"), &b[0]),
            Offer::Expected("run.0".into())
        );
        assert!(l.answered("run.0", Answer::Deferred, now).is_none());
        assert_eq!(
            l.offered("a", &rcpt("a.test"), &b[0]),
            Offer::Expected("run.0".into())
        );
        assert!(l.answered("run.0", Answer::Delivered, now).is_some());
        l.offered("a", &rcpt("a.test"), &b[1]);
        l.answered("run.1", Answer::Refused, now);
        l.offered("a", &rcpt("a.test"), &b[2]);
        l.answered("run.2", Answer::Delivered, now);
        assert_eq!(
            l.offered("a", &[], b"Subject: dsn\r\n\r\nx\r\n"),
            Offer::Report
        );
        let v = l.verify();
        assert!(v.ok, "{v:?}");
        assert_eq!((v.accepted, v.delivered_once, v.refused_once), (3, 2, 1));
    }

    #[test]
    fn detects_missing_duplicate_misdelivered_corrupted_unexpected() {
        let (mut l, b) = setup();
        let now = Instant::now();
        // run.0 twice.
        l.offered("a", &rcpt("a.test"), &b[0]);
        l.answered("run.0", Answer::Delivered, now);
        assert_eq!(
            l.offered("a", &rcpt("a.test"), &b[0]),
            Offer::Duplicate("run.0".into())
        );
        l.answered("run.0", Answer::Delivered, now);
        // run.1 to the wrong account, one byte changed.
        let mut bad = b[1].clone();
        let last = bad.len() - 3;
        bad[last] ^= 1;
        l.offered("b", &rcpt("b.test"), &bad);
        l.answered("run.1", Answer::Delivered, now);
        // run.2 never comes; run.9 was never sent.
        let stray = MessageBody::new("run", 9, 500, "s@x.test", &["u@a.test".into()]).to_vec();
        assert_eq!(
            l.offered("a", &rcpt("a.test"), &stray),
            Offer::Unexpected("run.9".into())
        );
        let other = MessageBody::new("old", 1, 500, "s@x.test", &["u@a.test".into()]).to_vec();
        assert_eq!(l.offered("a", &rcpt("a.test"), &other), Offer::Foreign);
        let v = l.verify();
        assert!(!v.ok);
        assert_eq!(v.duplicates, ["run.0"]);
        assert_eq!(v.misdelivered, ["run.1"]);
        assert_eq!(v.corrupted, ["run.1"]);
        assert_eq!(v.missing, ["run.2"]);
        assert_eq!(v.unexpected, ["run.9"]);
        assert_eq!(v.foreign, 1);
    }

    #[test]
    fn refused_by_the_mx_must_not_arrive_and_lost_may() {
        let accounts = BTreeMap::from([("a".to_string(), vec!["a.test".to_string()])]);
        let mut l = Ledger::new("r", &accounts);
        let m0 = MessageBody::new("r", 0, 300, "s@x.test", &["u@a.test".into()]);
        let m1 = MessageBody::new("r", 1, 300, "s@x.test", &["u@a.test".into()]);
        l.expect("r.0", "a", m0.digest());
        l.expect("r.1", "a", m1.digest());
        l.mx_settled("r.0", false, false, Instant::now());
        l.mx_settled("r.1", false, true, Instant::now());
        let v = l.verify();
        assert!(v.ok && v.uncertain == 1 && v.accepted == 0, "{v:?}");
        l.offered("a", &rcpt("a.test"), &m0.to_vec());
        assert_eq!(l.verify().unexpected, ["r.0"]);
    }
}
