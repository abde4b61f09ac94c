//! The per-domain index of held parts, kept in memory on each domain's shard core.
//!
//! It is rebuilt at start from [`Recovered::parts`](super::Recovered::parts) and updated as
//! messages are held ([`HeldPart::for_message`]), delivered or bounced
//! ([`DomainIndex::remove`]), partly finished ([`DomainIndex::settle`]), expired ([`DomainIndex::mark_expired`]) and relocated by
//! compaction ([`DomainIndex::relocate`]). It does no I/O and reads no clock: time comes in as
//! unix seconds.
//!
//! Invariants: a domain has an entry only while it holds at least one part, so "is there mail
//! for D?" is one hash lookup; each domain's totals always equal the sum over its parts; parts
//! are ordered by `(received_at, id)`, oldest first.

use std::collections::{BTreeMap, HashMap};

use super::journal::Location;
use super::record::parts_of;
use crate::types::{DomainName, Envelope, Mailbox, MessageId, Recipient};

/// One domain part of a held message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldPart {
    /// The message.
    pub id: MessageId,
    /// The hosted domain this part is for.
    pub domain: DomainName,
    /// Where the message's record is.
    pub location: Location,
    /// When the message was accepted, unix seconds.
    pub received_at: u64,
    /// The envelope sender (`None` for `<>`), for the operator's view and for bounces.
    pub sender: Option<Mailbox>,
    /// The recipients of this domain still held, in RCPT order.
    pub recipients: Vec<Recipient>,
    /// For each of `recipients`, its index in the stored envelope (what a `SETTLE` names).
    pub indices: Vec<u32>,
    /// Body size in bytes.
    pub bytes: u64,
    /// The part passed the maximum hold and waits for its bounce.
    pub expired: bool,
}

impl HeldPart {
    /// The parts of a message just appended at `location`, one per hosted domain.
    pub fn for_message(
        id: MessageId,
        received_at: u64,
        envelope: &Envelope,
        location: Location,
    ) -> Vec<HeldPart> {
        parts_of(envelope)
            .into_iter()
            .map(|p| HeldPart {
                id,
                domain: p.domain,
                location,
                received_at,
                sender: envelope.sender.clone(),
                recipients: p
                    .recipients
                    .iter()
                    .map(|i| envelope.recipients[*i as usize].clone())
                    .collect(),
                indices: p.recipients,
                bytes: location.body_len,
                expired: false,
            })
            .collect()
    }
}

/// Totals of one domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// Held parts (messages, from the domain's point of view).
    pub messages: u64,
    /// Body bytes held for the domain (the quota measure).
    pub bytes: u64,
    /// `received_at` of the oldest part.
    pub oldest: Option<u64>,
    /// Parts marked expired.
    pub expired: u64,
}

#[derive(Default)]
struct Queue {
    by_age: BTreeMap<(u64, MessageId), HeldPart>,
    received: HashMap<MessageId, u64>,
    bytes: u64,
    expired: u64,
}

impl Queue {
    fn key(&self, id: MessageId) -> Option<(u64, MessageId)> {
        self.received.get(&id).map(|r| (*r, id))
    }
}

/// The held parts of the domains this core owns.
#[derive(Default)]
pub struct DomainIndex {
    domains: HashMap<DomainName, Queue>,
    /// Parts whose stored copy is damaged or gone: out of the delivery queues (never offered
    /// to a session), kept for the operator to bounce or delete.
    quarantine: BTreeMap<(MessageId, DomainName), Quarantined>,
}

/// A part taken out of delivery because its stored copy cannot be read intact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The part, as it was held.
    pub part: HeldPart,
    /// What was wrong ("body checksum mismatch", "segment missing", ...).
    pub reason: String,
    /// When it was quarantined, unix seconds.
    pub since: u64,
}

impl DomainIndex {
    /// An empty index.
    pub fn new() -> Self {
        DomainIndex::default()
    }

    /// Adds a part; a part with the same `(id, domain)` is replaced and returned.
    pub fn insert(&mut self, part: HeldPart) -> Option<HeldPart> {
        let old = self.remove(part.id, &part.domain);
        let q = self.domains.entry(part.domain.clone()).or_default();
        q.bytes += part.bytes;
        q.expired += u64::from(part.expired);
        q.received.insert(part.id, part.received_at);
        q.by_age.insert((part.received_at, part.id), part);
        old
    }

    /// Removes the `domain` part of `id` (after its DONE is durable), also from quarantine.
    pub fn remove(&mut self, id: MessageId, domain: &DomainName) -> Option<HeldPart> {
        if let Some(q) = self.quarantine.remove(&(id, domain.clone())) {
            return Some(q.part);
        }
        self.take(id, domain)
    }

    /// Takes the `domain` part of `id` out of its delivery queue.
    fn take(&mut self, id: MessageId, domain: &DomainName) -> Option<HeldPart> {
        let q = self.domains.get_mut(domain)?;
        let key = q.key(id)?;
        q.received.remove(&id);
        let part = q.by_age.remove(&key)?;
        q.bytes -= part.bytes;
        q.expired -= u64::from(part.expired);
        if q.by_age.is_empty() {
            self.domains.remove(domain);
        }
        Some(part)
    }

    /// Moves the `domain` part of `id` from its delivery queue into quarantine (its stored copy
    /// failed a checksum or is gone). True when it was newly quarantined; false if it is
    /// unknown or already there.
    pub fn quarantine(
        &mut self,
        id: MessageId,
        domain: &DomainName,
        reason: &str,
        now: u64,
    ) -> bool {
        let Some(part) = self.take(id, domain) else {
            return false;
        };
        self.quarantine.insert(
            (id, domain.clone()),
            Quarantined {
                part,
                reason: reason.to_string(),
                since: now,
            },
        );
        true
    }

    /// Every quarantined part, by message id.
    pub fn quarantined(&self) -> impl Iterator<Item = &Quarantined> {
        self.quarantine.values()
    }

    /// The quarantined parts of message `id`.
    pub fn quarantined_of(&self, id: MessageId) -> Vec<&Quarantined> {
        // The quarantine is small (damage is rare): a scan is fine.
        self.quarantine
            .iter()
            .filter(|((i, _), _)| *i == id)
            .map(|(_, q)| q)
            .collect()
    }

    /// Points the `domain` part of `id` at a compaction copy. False if the part is unknown
    /// (it was finished meanwhile).
    pub fn relocate(&mut self, id: MessageId, domain: &DomainName, location: Location) -> bool {
        match self.part_mut(id, domain) {
            Some(p) => {
                p.location = location;
                true
            }
            None => false,
        }
    }

    /// Drops the recipients with these envelope `indices` from the `domain` part of `id` (after
    /// its SETTLE is durable); the part stays held for the others. False if the part is
    /// unknown.
    pub fn settle(&mut self, id: MessageId, domain: &DomainName, indices: &[u32]) -> bool {
        let Some(p) = self.part_mut(id, domain) else {
            return false;
        };
        let mut kept = 0;
        for k in 0..p.indices.len() {
            if !indices.contains(&p.indices[k]) {
                p.indices.swap(kept, k);
                p.recipients.swap(kept, k);
                kept += 1;
            }
        }
        p.indices.truncate(kept);
        p.recipients.truncate(kept);
        true
    }

    /// Flags the `domain` part of `id` as expired (after its EXPIRE is durable). False if the
    /// part is unknown.
    pub fn mark_expired(&mut self, id: MessageId, domain: &DomainName) -> bool {
        let Some(q) = self.domains.get_mut(domain) else {
            return false;
        };
        let Some(key) = q.key(id) else { return false };
        let Some(p) = q.by_age.get_mut(&key) else {
            return false;
        };
        if !p.expired {
            p.expired = true;
            q.expired += 1;
        }
        true
    }

    fn part_mut(&mut self, id: MessageId, domain: &DomainName) -> Option<&mut HeldPart> {
        let q = self.domains.get_mut(domain)?;
        let key = q.key(id)?;
        q.by_age.get_mut(&key)
    }

    /// The `domain` part of `id`.
    pub fn get(&self, id: MessageId, domain: &DomainName) -> Option<&HeldPart> {
        let q = self.domains.get(domain)?;
        q.by_age.get(&q.key(id)?)
    }

    /// Is there mail for `domain`? One hash lookup.
    pub fn has_mail(&self, domain: &DomainName) -> bool {
        self.domains.contains_key(domain)
    }

    /// The parts held for `domain`, oldest first.
    pub fn parts<'a>(&'a self, domain: &DomainName) -> impl Iterator<Item = &'a HeldPart> + 'a {
        self.domains
            .get(domain)
            .into_iter()
            .flat_map(|q| q.by_age.values())
    }

    /// Totals for `domain` (all zero when nothing is held).
    pub fn stats(&self, domain: &DomainName) -> DomainStats {
        self.domains.get(domain).map(stats_of).unwrap_or_default()
    }

    /// Totals for every domain holding mail, sorted by domain name.
    pub fn all_stats(&self) -> Vec<(DomainName, DomainStats)> {
        let mut v: Vec<_> = self
            .domains
            .iter()
            .map(|(d, q)| (d.clone(), stats_of(q)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Body bytes held for `domain`, for the quota check at RCPT.
    pub fn held_bytes(&self, domain: &DomainName) -> u64 {
        self.domains.get(domain).map_or(0, |q| q.bytes)
    }

    /// Parts held at least `max_hold` seconds at `now` that are not yet marked expired,
    /// oldest first per domain. The caller appends an EXPIRE for each, sends the bounce, then
    /// a DONE.
    pub fn due_for_expiry(&self, now: u64, max_hold: u64) -> Vec<(MessageId, DomainName)> {
        let mut due = Vec::new();
        let Some(cutoff) = now.checked_sub(max_hold) else {
            return due;
        };
        for (d, q) in &self.domains {
            let old = q
                .by_age
                .range(..(cutoff, MessageId(u128::MAX)))
                .map(|(_, p)| p);
            due.extend(old.filter(|p| !p.expired).map(|p| (p.id, d.clone())));
        }
        due
    }

    /// Number of domains holding mail.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }
}

fn stats_of(q: &Queue) -> DomainStats {
    DomainStats {
        messages: q.by_age.len() as u64,
        bytes: q.bytes,
        oldest: q.by_age.keys().next().map(|(r, _)| *r),
        expired: q.expired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Mailbox;

    fn d(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn loc(seq: u64, body_len: u64) -> Location {
        Location {
            core: 0,
            seq,
            offset: 32,
            len: 100 + body_len,
            body_offset: 132,
            body_len,
            body_crc: 0,
        }
    }

    fn env(rcpts: &[&str]) -> Envelope {
        Envelope {
            recipients: rcpts
                .iter()
                .map(|r| {
                    let (l, dom) = r.split_once('@').unwrap();
                    Recipient {
                        mailbox: Mailbox {
                            local: l.into(),
                            domain: dom.into(),
                        },
                        notify: None,
                        orcpt: None,
                    }
                })
                .collect(),
            ..Envelope::default()
        }
    }

    #[test]
    fn parts_of_a_message_carry_only_their_domain_recipients() {
        let e = env(&["a@x.example", "b@y.example", "c@x.example", "d@[10.0.0.1]"]);
        let parts = HeldPart::for_message(MessageId(1), 50, &e, loc(1, 10));
        assert_eq!(parts.len(), 2);
        let locals = |p: &HeldPart| {
            p.recipients
                .iter()
                .map(|r| r.mailbox.local.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (parts[0].domain.as_str(), locals(&parts[0])),
            ("x.example", vec!["a".into(), "c".into()])
        );
        assert_eq!(
            (parts[1].domain.as_str(), locals(&parts[1])),
            ("y.example", vec!["b".into()])
        );
        assert!(parts.iter().all(|p| p.bytes == 10 && p.received_at == 50));
    }

    #[test]
    fn insert_list_remove_keep_totals() {
        let mut ix = DomainIndex::new();
        let x = d("x.example");
        assert!(!ix.has_mail(&x));
        for (id, at, bytes) in [
            (3u128, 300u64, 30u64),
            (1, 100, 10),
            (2, 200, 20),
            (4, 100, 40),
        ] {
            let e = env(&["a@x.example"]);
            for p in HeldPart::for_message(MessageId(id), at, &e, loc(1, bytes)) {
                assert!(ix.insert(p).is_none());
            }
        }
        assert!(ix.has_mail(&x));
        let order: Vec<u128> = ix.parts(&x).map(|p| p.id.0).collect();
        assert_eq!(order, vec![1, 4, 2, 3], "oldest first, ties by id");
        assert_eq!(
            ix.stats(&x),
            DomainStats {
                messages: 4,
                bytes: 100,
                oldest: Some(100),
                expired: 0
            }
        );
        assert_eq!(ix.held_bytes(&x), 100);
        assert_eq!(ix.remove(MessageId(1), &x).unwrap().bytes, 10);
        assert!(ix.remove(MessageId(1), &x).is_none());
        assert!(ix.remove(MessageId(2), &d("y.example")).is_none());
        assert_eq!(
            ix.stats(&x),
            DomainStats {
                messages: 3,
                bytes: 90,
                oldest: Some(100),
                expired: 0
            }
        );
        for id in [2, 3, 4] {
            ix.remove(MessageId(id), &x).unwrap();
        }
        assert!(!ix.has_mail(&x));
        assert_eq!(ix.domain_count(), 0);
        assert_eq!(ix.stats(&x), DomainStats::default());
    }

    #[test]
    fn reinsert_replaces_and_relocate_updates() {
        let mut ix = DomainIndex::new();
        let x = d("x.example");
        let p =
            HeldPart::for_message(MessageId(1), 10, &env(&["a@x.example"]), loc(1, 5)).remove(0);
        ix.insert(p.clone());
        assert_eq!(ix.insert(p.clone()), Some(p));
        assert_eq!(ix.stats(&x).bytes, 5);
        assert!(ix.relocate(MessageId(1), &x, loc(7, 5)));
        assert_eq!(ix.get(MessageId(1), &x).unwrap().location.seq, 7);
        assert!(!ix.relocate(MessageId(2), &x, loc(7, 5)));
    }

    #[test]
    fn a_quarantined_part_leaves_delivery_but_stays_known() {
        let mut ix = DomainIndex::new();
        let (x, y) = (d("x.example"), d("y.example"));
        let e = env(&["a@x.example", "b@y.example"]);
        for id in [1u128, 2] {
            for p in HeldPart::for_message(MessageId(id), 10, &e, loc(1, 5)) {
                ix.insert(p);
            }
        }
        assert!(ix.quarantine(MessageId(1), &x, "body checksum mismatch", 99));
        assert!(!ix.quarantine(MessageId(1), &x, "again", 100), "once");
        assert!(!ix.quarantine(MessageId(7), &x, "unknown", 100));
        let ids: Vec<u128> = ix.parts(&x).map(|p| p.id.0).collect();
        assert_eq!(ids, [2], "never offered to a session");
        assert_eq!(ix.stats(&x).messages, 1);
        assert_eq!(ix.quarantined_of(MessageId(1)).len(), 1);
        assert_eq!(
            ix.quarantined().next().unwrap().reason,
            "body checksum mismatch"
        );
        assert!(
            ix.get(MessageId(1), &y).is_some(),
            "the other domain's part is untouched"
        );
        // A DONE (operator bounce or delete) ends it like any part.
        assert_eq!(ix.remove(MessageId(1), &x).unwrap().id, MessageId(1));
        assert!(ix.quarantined().next().is_none());
        assert!(ix.quarantine(MessageId(2), &x, "x", 1));
        assert!(
            !ix.has_mail(&x),
            "only quarantined parts left: no mail to offer"
        );
    }

    #[test]
    fn settle_drops_only_the_named_recipients_in_order() {
        let mut ix = DomainIndex::new();
        let x = d("x.example");
        let e = env(&["a@x.example", "b@y.example", "c@x.example", "d@x.example"]);
        for p in HeldPart::for_message(MessageId(1), 10, &e, loc(1, 5)) {
            ix.insert(p);
        }
        assert_eq!(ix.get(MessageId(1), &x).unwrap().indices, [0, 2, 3]);
        assert!(ix.settle(MessageId(1), &x, &[0, 3, 1]));
        let p = ix.get(MessageId(1), &x).unwrap();
        assert_eq!(p.indices, [2]);
        assert_eq!(p.recipients[0].mailbox.local, "c");
        assert_eq!(ix.stats(&x).bytes, 5, "the body is still held");
        assert_eq!(ix.get(MessageId(1), &d("y.example")).unwrap().indices, [1]);
        assert!(!ix.settle(MessageId(2), &x, &[0]));
    }

    #[test]
    fn expiry_picks_old_unexpired_parts_and_stats_follow() {
        let mut ix = DomainIndex::new();
        let e = env(&["a@x.example", "b@y.example"]);
        for (id, at) in [(1u128, 100u64), (2, 200), (3, 300)] {
            for p in HeldPart::for_message(MessageId(id), at, &e, loc(1, 1)) {
                ix.insert(p);
            }
        }
        let mut due = ix.due_for_expiry(1200, 1000);
        due.sort();
        let want = vec![
            (MessageId(1), d("x.example")),
            (MessageId(1), d("y.example")),
            (MessageId(2), d("x.example")),
            (MessageId(2), d("y.example")),
        ];
        assert_eq!(due, want, "received at or before now - max_hold");
        assert!(ix.mark_expired(MessageId(1), &d("x.example")));
        assert!(ix.mark_expired(MessageId(1), &d("x.example")));
        assert_eq!(ix.stats(&d("x.example")).expired, 1);
        assert_eq!(ix.due_for_expiry(1200, 1000).len(), 3);
        assert!(
            ix.due_for_expiry(10, 1000).is_empty(),
            "no underflow before the epoch + hold"
        );
        let all = ix.all_stats();
        assert_eq!(
            all.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>(),
            ["x.example", "y.example"]
        );
        ix.remove(MessageId(1), &d("x.example"));
        assert_eq!(ix.stats(&d("x.example")).expired, 0);
    }
}
