//! Per-recipient outcomes of one delivery attempt, settled in the journal: shared by the ODMR
//! reversal and the outgoing relay (DESIGN.md "ATRN, step by step" 5).
//!
//! The rule is per recipient: 2xx is retired; 4xx (or no answer) stays held, for that
//! recipient alone; 5xx is reported to the sender (RFC 3464) and retired. Per domain part that
//! becomes at most one journal record:
//!
//! - every recipient finished: `DONE` (bounced if any was refused, else delivered);
//! - some finished, some still held: `SETTLE` for the finished ones, and the part stays held
//!   with only the others, so the next attempt carries only what is still held;
//! - none finished: nothing is written.
//!
//! A refused recipient counts as finished only once its report is stored; if that failed it
//! stays held and is tried again (a report is never lost by retiring its recipient first).

use tokio::sync::oneshot;

use crate::proto::reply::Reply;
use crate::proto::reversed::RcptOutcome;
use crate::spool::{HeldPart, Outcome};
use crate::types::{MessageId, Recipient};

use super::core::{Core, MeshMsg};

/// The answer a recipient gets when the peer never answered it (the session ended first).
fn no_answer() -> Reply {
    Reply::with_status(451, (4, 4, 0), "no answer for this recipient")
}

/// Each part's answers, one per recipient in the part's order. `owner` maps each envelope
/// recipient (the parts' recipients concatenated, as `outgoing_for` sends them) to its part;
/// `outcomes` is the client machine's `(envelope index, outcome)` list. A recipient without
/// an outcome is deferred.
pub(crate) fn answers(
    parts: &[HeldPart],
    owner: &[usize],
    outcomes: &[(usize, RcptOutcome)],
) -> Vec<Vec<RcptOutcome>> {
    let mut out: Vec<Vec<RcptOutcome>> = parts
        .iter()
        .map(|p| vec![RcptOutcome::Deferred(no_answer()); p.recipients.len()])
        .collect();
    let mut position = vec![0usize; parts.len()];
    let mut slot = Vec::with_capacity(owner.len());
    for p in owner {
        slot.push(position.get(*p).map(|n| (*p, *n)));
        if let Some(n) = position.get_mut(*p) {
            *n += 1;
        }
    }
    for (i, o) in outcomes {
        if let Some(Some((p, n))) = slot.get(*i) {
            if let Some(a) = out.get_mut(*p).and_then(|a| a.get_mut(*n)) {
                *a = o.clone();
            }
        }
    }
    out
}

/// Every refused recipient with its reply, over all parts: what the report is about.
pub(crate) fn failures(
    parts: &[HeldPart],
    answers: &[Vec<RcptOutcome>],
) -> Vec<(Recipient, Reply)> {
    let mut out = Vec::new();
    for (part, answers) in parts.iter().zip(answers) {
        for (r, a) in part.recipients.iter().zip(answers) {
            if let RcptOutcome::Failed(reply) = a {
                out.push((r.clone(), reply.clone()));
            }
        }
    }
    out
}

/// What one part's answers write to the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// Every recipient is finished: the part ends.
    Done(Outcome),
    /// These recipients (envelope index, outcome) are finished; the others stay held.
    Settle(Vec<(u32, Outcome)>),
    /// Nothing is finished.
    Held,
}

impl Settlement {
    /// True when some recipient of the part stays held.
    pub(crate) fn keeps_some(&self) -> bool {
        !matches!(self, Settlement::Done(_))
    }
}

/// The settlement of `part` for `answers` (one per recipient, see [`answers`]). `reported`
/// says whether the report for its refused recipients is stored; if not, they stay held.
pub(crate) fn settlement(part: &HeldPart, answers: &[RcptOutcome], reported: bool) -> Settlement {
    let mut finished = Vec::new();
    let mut held = 0;
    for (index, a) in part.indices.iter().zip(answers) {
        match a {
            RcptOutcome::Delivered => finished.push((*index, Outcome::Delivered)),
            RcptOutcome::Failed(_) if reported => finished.push((*index, Outcome::Bounced)),
            RcptOutcome::Failed(_) | RcptOutcome::Deferred(_) => held += 1,
        }
    }
    if held > 0 {
        return if finished.is_empty() {
            Settlement::Held
        } else {
            Settlement::Settle(finished)
        };
    }
    let bounced = finished.iter().any(|(_, o)| *o == Outcome::Bounced);
    Settlement::Done(if bounced {
        Outcome::Bounced
    } else {
        Outcome::Delivered
    })
}

/// Sends the part's record to the writer core of `id`. The receiver resolves once the shard's
/// index follows (the part gone, or narrowed to what is still held); it is dropped unanswered
/// if the record could not be written, and then the part stays as it was. `None` for
/// [`Settlement::Held`].
pub(crate) fn record(
    core: &Core,
    id: MessageId,
    part: &HeldPart,
    settlement: Settlement,
) -> Option<oneshot::Receiver<()>> {
    let (ack, retired) = oneshot::channel();
    let msg = match settlement {
        Settlement::Held => return None,
        Settlement::Done(outcome) => MeshMsg::Done {
            id,
            domain: part.domain.clone(),
            outcome,
            ack: Some(ack),
        },
        Settlement::Settle(recipients) => {
            tracing::info!(%id, domain = %part.domain, finished = recipients.len(), held = part.indices.len() - recipients.len(), "part partly settled; only the rest stays held");
            MeshMsg::Settle {
                id,
                domain: part.domain.clone(),
                recipients,
                ack: Some(ack),
            }
        }
    };
    core.shared.mesh.send(core.writer_of(id), msg);
    Some(retired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Location;
    use crate::types::{DomainName, Mailbox};

    fn part(domain: &str, locals: &[&str], indices: &[u32]) -> HeldPart {
        HeldPart {
            id: MessageId(1),
            domain: DomainName::parse(domain).unwrap(),
            location: Location {
                core: 0,
                seq: 1,
                offset: 32,
                len: 100,
                body_offset: 90,
                body_len: 10,
                body_crc: 0,
            },
            received_at: 0,
            sender: None,
            recipients: locals
                .iter()
                .map(|l| Recipient {
                    mailbox: Mailbox {
                        local: (*l).into(),
                        domain: domain.into(),
                    },
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            indices: indices.to_vec(),
            bytes: 10,
            expired: false,
        }
    }

    fn ok() -> RcptOutcome {
        RcptOutcome::Delivered
    }
    fn later() -> RcptOutcome {
        RcptOutcome::Deferred(Reply::with_status(451, (4, 3, 0), "later"))
    }
    fn gone() -> RcptOutcome {
        RcptOutcome::Failed(Reply::with_status(550, (5, 1, 1), "gone"))
    }

    #[test]
    fn answers_map_envelope_order_back_to_parts_and_missing_is_deferred() {
        let parts = [
            part("a.example", &["x", "y"], &[0, 3]),
            part("b.example", &["z"], &[1]),
        ];
        // Envelope: x, y (part 0), z (part 1); the machine answered y and z only.
        let owner = [0, 0, 1];
        let got = answers(&parts, &owner, &[(1, gone()), (2, ok())]);
        assert!(matches!(&got[0][0], RcptOutcome::Deferred(r) if r.code == 451));
        assert_eq!(got[0][1], gone());
        assert_eq!(got[1], [ok()]);
        let f = failures(&parts, &got);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].0.mailbox.local, "y");
        // Indices out of range are ignored, never a panic.
        let got = answers(&parts, &[0, 7], &[(5, ok()), (1, ok())]);
        assert_eq!(got[0].len(), 2);
    }

    #[test]
    fn the_rule_per_recipient() {
        let p = part("a.example", &["ok", "later", "gone"], &[4, 5, 6]);
        let cases = [
            (
                vec![ok(), ok(), ok()],
                true,
                Settlement::Done(Outcome::Delivered),
            ),
            (
                vec![ok(), gone(), ok()],
                true,
                Settlement::Done(Outcome::Bounced),
            ),
            (
                vec![ok(), later(), gone()],
                true,
                Settlement::Settle(vec![(4, Outcome::Delivered), (6, Outcome::Bounced)]),
            ),
            // The report could not be stored: the refused recipient stays held too.
            (
                vec![ok(), later(), gone()],
                false,
                Settlement::Settle(vec![(4, Outcome::Delivered)]),
            ),
            (vec![gone(), gone(), gone()], false, Settlement::Held),
            (vec![later(), later(), later()], true, Settlement::Held),
        ];
        for (answers, reported, want) in cases {
            let got = settlement(&p, &answers, reported);
            assert_eq!(got, want, "{answers:?} reported={reported}");
            assert_eq!(got.keeps_some(), !matches!(want, Settlement::Done(_)));
        }
    }
}
