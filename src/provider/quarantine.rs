//! Quarantine: held parts whose stored copy is damaged (a checksum fails) or gone (its segment
//! file is missing), and what the operator does with them.
//!
//! Whoever finds the damage (a reversal reading the message, the background scrub, compaction)
//! calls [`quarantine`]; each part's shard core moves it out of its delivery queue into the
//! index's quarantine, logs it at ERROR once and counts it. A quarantined part is never offered
//! to a session, so one bad message never stops the rest of a customer's mail. It stays on
//! disk until the operator decides:
//!
//! - `turnpike queue bounce ID`: a delivery report to the sender saying that the stored copy
//!   was damaged (without the damaged content), then a DONE (bounced);
//! - `turnpike queue delete ID`: a DONE (removed by an operator), no report.
//!
//! Both are [`Operation`]s keyed by message id and sent to every core ([`MeshMsg::Operator`]):
//! each applies it to the parts of the message it shards. They act on quarantined parts only
//! for now; the same request can take a wider [`Scope`] for all held mail.
//!
//! The quarantine lives in memory. After a restart a damaged part is found again by the next
//! reader or by the scrub (its checksum still fails), so nothing is lost by not journaling it.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::reply::EnhancedStatus;
use crate::spool::{self, HeldPart, Outcome};
use crate::types::{DomainName, Envelope, MessageId};

use super::core::{Core, MeshMsg};
use super::report::{self, Failure};

/// What the operator asks for one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Report the parts to the sender as undeliverable, then drop them.
    Bounce,
    /// Drop the parts without a report.
    Delete,
}

/// Which parts of the message an [`Operation`] may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Only parts in quarantine.
    Quarantined,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Quarantines the parts of message `id` for `domains` (on their shard cores).
pub fn quarantine(
    core: &Core,
    id: MessageId,
    domains: impl IntoIterator<Item = DomainName>,
    reason: &str,
) {
    for domain in domains {
        let msg = MeshMsg::Quarantine {
            id,
            domain: domain.clone(),
            reason: reason.to_string(),
        };
        core.shared.mesh.send(core.shard_of(&domain), msg);
    }
}

/// On the shard core: moves the part into quarantine (once), logs and counts it.
pub fn apply(core: &Core, id: MessageId, domain: &DomainName, reason: &str) {
    if core
        .index_shard
        .borrow_mut()
        .quarantine(id, domain, reason, now())
    {
        core.metrics.borrow_mut().store_mut().quarantined_total += 1;
        tracing::error!(%id, %domain, reason, "held message quarantined: its stored copy cannot be read intact; it is skipped until the operator bounces or deletes it (turnpike queue bounce|delete ID)");
    }
}

/// On each core: applies `op` to the parts of `id` this core shards within `scope`. Returns
/// how many parts it finished.
pub async fn operate(core: &Core, id: MessageId, op: Operation, scope: Scope) -> usize {
    let parts: Vec<(HeldPart, String)> = match scope {
        Scope::Quarantined => core
            .index_shard
            .borrow()
            .quarantined_of(id)
            .into_iter()
            .map(|q| (q.part.clone(), q.reason.clone()))
            .collect(),
    };
    let mut retiring = Vec::new();
    for (part, reason) in &parts {
        let outcome = match op {
            Operation::Delete => Outcome::Removed,
            Operation::Bounce => {
                if !report_damaged(core, part, reason).await {
                    continue; // stays quarantined; the operator may try again
                }
                Outcome::Bounced
            }
        };
        let (ack, retired) = tokio::sync::oneshot::channel();
        retiring.push(retired);
        let msg = MeshMsg::Done {
            id,
            domain: part.domain.clone(),
            outcome,
            ack: Some(ack),
        };
        core.shared.mesh.send(core.writer_of(id), msg);
        tracing::info!(%id, domain = %part.domain, ?op, "quarantined part finished by the operator");
    }
    for r in &mut retiring {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), r).await;
    }
    retiring.len()
}

/// The report for a damaged part: to the sender, with the reason, without the content.
async fn report_damaged(core: &Core, part: &HeldPart, reason: &str) -> bool {
    // The envelope is read back when only the body is damaged; otherwise what the index
    // holds (sender and this part's recipients) is enough for the report.
    let envelope = match core.reader.read_message(&part.location).await {
        Ok(meta) => meta.envelope,
        Err(_) => Envelope {
            sender: part.sender.clone(),
            recipients: part.recipients.clone(),
            ..Envelope::default()
        },
    };
    let host = core.shared.config.server.hostname.to_string();
    let failures: Vec<Failure> = part
        .recipients
        .iter()
        .map(|r| Failure {
            recipient: r.clone(),
            status: EnhancedStatus::new(5, 3, 0),
            diagnostic: format!(
                "the copy of this message stored at {host} was damaged ({reason}) and cannot \
                 be delivered; please send it again"
            ),
        })
        .collect();
    report::queue_report(
        core,
        part.id,
        part.received_at,
        &envelope,
        &failures,
        Vec::new(),
    )
    .await
}

/// For `turnpike queue`: the quarantined parts this core shards.
pub fn listing(core: &Core) -> Vec<spool::Quarantined> {
    core.index_shard.borrow().quarantined().cloned().collect()
}
