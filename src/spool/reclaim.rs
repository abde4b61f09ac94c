//! Segment liveness: which segments of one journal directory still matter, and which can go.
//!
//! The [`Ledger`] is the one piece of bookkeeping shared by recovery and the writer. Recovery
//! replays every record of a directory into it in journal order; the writer applies each
//! record to it once the record's batch is fdatasync'ed. Both therefore hold the same state
//! for the same journal prefix.
//!
//! It tracks, per segment: bytes written, live parts and live bytes of the messages whose
//! current copy is in it, and `refs`, the segments that its `DONE`/`EXPIRE` records point to
//! (the segment holding the message's copy when the record was placed).
//!
//! # Invariants
//!
//! - A `DONE` is placed in the same directory as its `MSG`, in the same or a newer segment, so
//!   `refs` of a segment only name older segments (or itself): no cycles.
//! - A segment may be deleted when it is not the current one, holds no live part, and every
//!   segment its `DONE`/`EXPIRE` records refer to is already deleted (or is itself). Deleting
//!   it earlier could resurrect a part whose `DONE` disappeared with it.
//! - A compaction copy carries exactly the parts that are live and not *doomed* (a `DONE` is
//!   queued but not yet durable) when it is queued. `DONE`s queued before it land before it,
//!   `DONE`s queued after it land after it and refer to the copy's segment.
//! - Likewise a copy leaves out every recipient a `SETTLE` finished or is finishing (settled
//!   at queue time), so a `SETTLE` never has to outlive the copy it applied to; a `SETTLE`
//!   pins the segment of the copy it narrowed, like a `DONE`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::record::SEGMENT_HEADER_LEN;
use crate::types::{DomainName, MessageId};

/// Liveness of one segment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SegState {
    /// End of the valid records (the file may be longer: preallocation).
    pub written: u64,
    /// Live parts whose current copy is in this segment.
    pub live_parts: u64,
    /// Total length of the `MSG` records in this segment that still have a live part.
    pub live_bytes: u64,
    /// Older segments that this segment's `DONE`/`EXPIRE` records refer to.
    pub refs: BTreeSet<u64>,
}

/// One live domain part of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LivePart {
    pub domain: DomainName,
    pub expired: bool,
}

/// Where the current copy of a message with live parts is, and which parts are live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MsgState {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub parts: Vec<LivePart>,
    /// Parts with a `DONE` queued but not yet durable.
    doomed: Vec<DomainName>,
    /// Envelope indices of recipients a `SETTLE` finished (queued or durable).
    settled: Vec<u32>,
}

/// Liveness bookkeeping of one journal directory.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ledger {
    segments: BTreeMap<u64, SegState>,
    messages: HashMap<MessageId, MsgState>,
}

impl Ledger {
    pub(crate) fn add_segment(&mut self, seq: u64, written: u64) {
        self.segments.entry(seq).or_default().written = written;
    }

    pub(crate) fn set_written(&mut self, seq: u64, written: u64) {
        if let Some(s) = self.segments.get_mut(&seq) {
            s.written = written;
        }
    }

    #[cfg(test)]
    pub(crate) fn segment(&self, seq: u64) -> Option<&SegState> {
        self.segments.get(&seq)
    }

    pub(crate) fn segments(&self) -> impl Iterator<Item = (u64, &SegState)> {
        self.segments.iter().map(|(k, v)| (*k, v))
    }

    pub(crate) fn message(&self, id: MessageId) -> Option<&MsgState> {
        self.messages.get(&id)
    }

    pub(crate) fn messages(&self) -> impl Iterator<Item = (MessageId, &MsgState)> {
        self.messages.iter().map(|(k, v)| (*k, v))
    }

    fn seg_mut(&mut self, seq: u64) -> &mut SegState {
        self.segments.entry(seq).or_default()
    }

    /// A `MSG` record (new, or a compaction copy) became durable at `seq`/`offset`.
    ///
    /// For a message already known, the new copy replaces the old one and keeps only the
    /// parts live in both (the copy never revives a part).
    pub(crate) fn place_msg(
        &mut self,
        id: MessageId,
        seq: u64,
        offset: u64,
        len: u64,
        parts: impl IntoIterator<Item = LivePart>,
    ) {
        let new: Vec<LivePart> = parts.into_iter().collect();
        let mut settled = Vec::new();
        let parts = match self.messages.remove(&id) {
            Some(old) => {
                settled = old.settled;
                let s = self.seg_mut(old.seq);
                s.live_parts -= old.parts.len() as u64;
                s.live_bytes -= old.len;
                let mut kept = Vec::new();
                for p in old.parts {
                    if let Some(n) = new.iter().find(|n| n.domain == p.domain) {
                        kept.push(LivePart {
                            domain: p.domain,
                            expired: p.expired || n.expired,
                        });
                    }
                }
                kept
            }
            None => {
                let mut kept: Vec<LivePart> = Vec::with_capacity(new.len());
                for n in new {
                    if !kept.iter().any(|k| k.domain == n.domain) {
                        kept.push(n);
                    }
                }
                kept
            }
        };
        if parts.is_empty() {
            return;
        }
        let s = self.seg_mut(seq);
        s.live_parts += parts.len() as u64;
        s.live_bytes += len;
        self.messages.insert(
            id,
            MsgState {
                seq,
                offset,
                len,
                parts,
                doomed: Vec::new(),
                settled,
            },
        );
    }

    /// A `DONE` for `(id, domain)` became durable in segment `seq`. Returns true when the
    /// message has no live part left.
    pub(crate) fn place_done(&mut self, seq: u64, id: MessageId, domain: &DomainName) -> bool {
        let Some(m) = self.messages.get_mut(&id) else {
            return true;
        };
        let msg_seq = m.seq;
        let before = m.parts.len();
        m.parts.retain(|p| p.domain != *domain);
        m.doomed.retain(|d| d != domain);
        let removed = (before - m.parts.len()) as u64;
        let dead = m.parts.is_empty();
        let len = m.len;
        if dead {
            self.messages.remove(&id);
        }
        let s = self.seg_mut(msg_seq);
        s.live_parts -= removed;
        if dead {
            s.live_bytes -= len;
        }
        if msg_seq != seq {
            self.seg_mut(seq).refs.insert(msg_seq);
        }
        dead
    }

    /// An `EXPIRE` for `(id, domain)` became durable in segment `seq`.
    pub(crate) fn place_expire(&mut self, seq: u64, id: MessageId, domain: &DomainName) {
        let Some(m) = self.messages.get_mut(&id) else {
            return;
        };
        let msg_seq = m.seq;
        for p in &mut m.parts {
            if p.domain == *domain {
                p.expired = true;
            }
        }
        if msg_seq != seq {
            self.seg_mut(seq).refs.insert(msg_seq);
        }
    }

    /// A `SETTLE` for `id` was queued (writer) or replayed (recovery): compaction must not copy
    /// these recipients any more.
    pub(crate) fn settle(&mut self, id: MessageId, recipients: impl IntoIterator<Item = u32>) {
        if let Some(m) = self.messages.get_mut(&id) {
            for i in recipients {
                if !m.settled.contains(&i) {
                    m.settled.push(i);
                }
            }
        }
    }

    /// A `SETTLE` for `id` became durable in segment `seq`: it pins the segment of the copy it
    /// narrowed until that copy is gone.
    pub(crate) fn place_settle(&mut self, seq: u64, id: MessageId) {
        let Some(m) = self.messages.get(&id) else {
            return;
        };
        let msg_seq = m.seq;
        if msg_seq != seq {
            self.seg_mut(seq).refs.insert(msg_seq);
        }
    }

    /// Envelope indices of the recipients of `id` that a `SETTLE` finished.
    pub(crate) fn settled(&self, id: MessageId) -> &[u32] {
        self.messages.get(&id).map_or(&[], |m| &m.settled)
    }

    /// A `DONE` for `(id, domain)` was queued: compaction must not copy that part any more.
    pub(crate) fn doom(&mut self, id: MessageId, domain: &DomainName) {
        if let Some(m) = self.messages.get_mut(&id) {
            if !m.doomed.contains(domain) {
                m.doomed.push(domain.clone());
            }
        }
    }

    /// The parts a compaction copy of `id` must carry: live and not doomed.
    pub(crate) fn copy_parts(&self, id: MessageId) -> Vec<LivePart> {
        match self.messages.get(&id) {
            Some(m) => m
                .parts
                .iter()
                .filter(|p| !m.doomed.contains(&p.domain))
                .cloned()
                .collect(),
            None => Vec::new(),
        }
    }

    /// Messages whose current copy is in segment `seq`, in record order.
    pub(crate) fn messages_in(&self, seq: u64) -> Vec<(MessageId, u64, u64)> {
        let mut v: Vec<(MessageId, u64, u64)> = self
            .messages
            .iter()
            .filter(|(_, m)| m.seq == seq)
            .map(|(id, m)| (*id, m.offset, m.len))
            .collect();
        v.sort_by_key(|(_, off, _)| *off);
        v
    }

    /// Segments that may be deleted now, oldest first (see the module invariants). `keep`
    /// names segments that must stay (pinned by a reader); segments that depend on them stay
    /// too.
    pub(crate) fn deletable(&self, current: Option<u64>, keep: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut gone = BTreeSet::new();
        for (seq, s) in &self.segments {
            if Some(*seq) == current || s.live_parts != 0 || keep(*seq) {
                continue;
            }
            let refs_gone = s
                .refs
                .iter()
                .all(|r| r == seq || gone.contains(r) || !self.segments.contains_key(r));
            if refs_gone {
                gone.insert(*seq);
            }
        }
        gone.into_iter().collect()
    }

    /// The oldest segment with live data, when it is worth compacting: not current, and live
    /// bytes below `ratio` of its record bytes. Dead segments before it are skipped (one that
    /// a reader pins stays a while).
    pub(crate) fn compaction_candidate(&self, current: Option<u64>, ratio: f64) -> Option<u64> {
        let (seq, s) = self.segments.iter().find(|(_, s)| s.live_parts > 0)?;
        if Some(*seq) == current {
            return None;
        }
        let used = s.written.saturating_sub(SEGMENT_HEADER_LEN);
        ((s.live_bytes as f64) < ratio * used as f64).then_some(*seq)
    }

    pub(crate) fn remove_segment(&mut self, seq: u64) {
        self.segments.remove(&seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    fn live(ds: &[&str]) -> Vec<LivePart> {
        ds.iter()
            .map(|s| LivePart {
                domain: d(s),
                expired: false,
            })
            .collect()
    }

    #[test]
    fn done_records_kill_parts_and_pin_their_message_segment() {
        let mut l = Ledger::default();
        l.add_segment(1, 32);
        l.place_msg(MessageId(1), 1, 32, 100, live(&["a.example", "b.example"]));
        l.set_written(1, 132);
        l.add_segment(2, 32);
        assert_eq!(l.segment(1).unwrap().live_parts, 2);
        assert!(!l.place_done(2, MessageId(1), &d("a.example")));
        assert_eq!(l.segment(1).unwrap().live_parts, 1);
        assert_eq!(l.segment(1).unwrap().live_bytes, 100);
        assert!(l.place_done(2, MessageId(1), &d("b.example")));
        assert_eq!(
            l.segment(1).unwrap(),
            &SegState {
                written: 132,
                ..SegState::default()
            }
        );
        assert_eq!(l.segment(2).unwrap().refs, BTreeSet::from([1]));
        // Segment 2 holds the DONEs for segment 1: it can only go after segment 1.
        assert_eq!(l.deletable(Some(3), |_| false), vec![1, 2]);
        assert_eq!(l.deletable(Some(2), |_| false), vec![1]);
        assert!(
            l.deletable(Some(3), |s| s == 1).is_empty(),
            "a pinned segment stays, and so does the one holding its DONEs"
        );
        l.remove_segment(1);
        assert_eq!(l.deletable(Some(3), |_| false), vec![2]);
    }

    #[test]
    fn a_done_segment_stays_while_its_message_segment_stays() {
        let mut l = Ledger::default();
        l.add_segment(1, 32);
        l.place_msg(MessageId(1), 1, 32, 100, live(&["a.example"]));
        l.place_msg(MessageId(2), 1, 132, 100, live(&["a.example"]));
        l.set_written(1, 232);
        l.add_segment(2, 32);
        l.place_done(2, MessageId(1), &d("a.example"));
        assert!(
            l.deletable(Some(3), |_| false).is_empty(),
            "segment 1 still holds message 2"
        );
        assert_eq!(
            l.compaction_candidate(Some(3), 0.5),
            None,
            "100 of 200 bytes live"
        );
        assert_eq!(l.compaction_candidate(Some(3), 0.6), Some(1));
        assert_eq!(
            l.compaction_candidate(Some(1), 0.6),
            None,
            "never the current segment"
        );
    }

    #[test]
    fn copies_keep_only_parts_live_in_both_and_move_liveness() {
        let mut l = Ledger::default();
        l.add_segment(1, 32);
        l.place_msg(
            MessageId(1),
            1,
            32,
            100,
            live(&["a.example", "b.example", "c.example"]),
        );
        l.place_expire(1, MessageId(1), &d("c.example"));
        l.doom(MessageId(1), &d("a.example"));
        let copy = l.copy_parts(MessageId(1));
        assert_eq!(
            copy.iter().map(|p| p.domain.as_str()).collect::<Vec<_>>(),
            ["b.example", "c.example"]
        );
        assert!(copy[1].expired);
        l.add_segment(2, 32);
        // The queued DONE lands before the copy.
        l.place_done(2, MessageId(1), &d("a.example"));
        l.place_msg(MessageId(1), 2, 32, 90, copy);
        let m = l.message(MessageId(1)).unwrap();
        assert_eq!((m.seq, m.offset, m.len), (2, 32, 90));
        assert_eq!(m.parts.len(), 2);
        assert!(m.parts[1].expired);
        assert_eq!(l.segment(1).unwrap().live_parts, 0);
        assert_eq!(l.segment(1).unwrap().live_bytes, 0);
        assert_eq!(l.segment(2).unwrap().live_parts, 2);
        assert_eq!(l.messages_in(2), vec![(MessageId(1), 32, 90)]);
        assert_eq!(l.deletable(Some(2), |_| false), vec![1]);
    }

    #[test]
    fn settled_recipients_survive_a_copy_and_pin_the_copy_segment() {
        let mut l = Ledger::default();
        l.add_segment(1, 500);
        l.add_segment(2, 500);
        l.add_segment(3, 500);
        l.place_msg(MessageId(1), 1, 32, 100, live(&["a.example"]));
        l.settle(MessageId(1), [0, 2]);
        l.settle(MessageId(1), [2]);
        l.place_settle(2, MessageId(1));
        assert_eq!(l.settled(MessageId(1)), [0, 2]);
        assert_eq!(l.segment(2).unwrap().refs, BTreeSet::from([1]));
        // Compaction copies the message to segment 3: what was settled stays settled.
        l.place_msg(MessageId(1), 3, 32, 100, live(&["a.example"]));
        assert_eq!(l.settled(MessageId(1)), [0, 2]);
        assert_eq!(
            l.deletable(Some(3), |_| false),
            [1, 2],
            "the settle segment goes with the old copy"
        );
        assert!(l.settled(MessageId(9)).is_empty());
        l.place_settle(2, MessageId(9));
    }

    #[test]
    fn unknown_and_repeated_dones_are_harmless() {
        let mut l = Ledger::default();
        l.add_segment(1, 32);
        assert!(l.place_done(1, MessageId(9), &d("a.example")));
        l.place_expire(1, MessageId(9), &d("a.example"));
        l.place_msg(MessageId(1), 1, 32, 10, live(&["a.example", "a.example"]));
        assert_eq!(
            l.segment(1).unwrap().live_parts,
            1,
            "duplicate parts count once"
        );
        assert!(l.place_done(1, MessageId(1), &d("a.example")));
        assert!(l.place_done(1, MessageId(1), &d("a.example")));
        assert_eq!(l.segment(1).unwrap().live_parts, 0);
        assert!(l.segment(1).unwrap().refs.is_empty());
    }
}
