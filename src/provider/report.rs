//! Delivery reports the provider writes itself (RFC 3464): for recipients the customer refused
//! during a reversal, and for parts held past `spool.max_hold`.
//!
//! A report goes to the original envelope sender from the null sender `<>`, and is stored
//! through the same durable path as received mail: to a hosted domain it waits for that
//! customer's ATRN, to any other domain it waits in the outbound queue. Mail from `<>` never
//! gets a report (never bounce a bounce). RET=HDRS unless the sender asked for RET=FULL.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::dsn::{self, DsnAction, Report, ReportRecipient};
use crate::proto::reply::EnhancedStatus;
use crate::spool::{self, Location};
use crate::types::{Envelope, MessageId, Recipient, Ret};

use super::core::Core;

/// One recipient the report is about.
pub struct Failure {
    /// The recipient as held.
    pub recipient: Recipient,
    /// Why (e.g. 5.1.1 from the customer, 4.4.7 for expiry).
    pub status: EnhancedStatus,
    /// The remote reply or our explanation.
    pub diagnostic: String,
}

/// Builds and stores a failure report for message `id`. Returns false only when a report was
/// owed but could not be stored (the caller then keeps the part held and retries).
pub async fn queue_failure(
    core: &Core,
    id: MessageId,
    location: &Location,
    received_at: u64,
    envelope: &Envelope,
    failures: &[Failure],
) -> bool {
    if envelope.sender.is_none() {
        tracing::info!(%id, "failed mail from the null sender: no report (never bounce a bounce)");
        return true;
    }
    let ret = dsn::default_ret(envelope.ret);
    let original = match read_original(core, location, ret).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(%id, error = %e, "cannot read the original for its report; reporting without it");
            Vec::new()
        }
    };
    queue_report(core, id, received_at, envelope, failures, original).await
}

/// [`queue_failure`] with the returned content given (empty: none, e.g. when the stored copy
/// is damaged).
pub async fn queue_report(
    core: &Core,
    id: MessageId,
    received_at: u64,
    envelope: &Envelope,
    failures: &[Failure],
    original: Vec<u8>,
) -> bool {
    let Some(sender) = envelope.sender.as_ref() else {
        tracing::info!(%id, "failed mail from the null sender: no report (never bounce a bounce)");
        return true;
    };
    let ret = dsn::default_ret(envelope.ret);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let hostname = core.shared.config.server.hostname.to_string();
    let recipients = failures
        .iter()
        .map(|f| ReportRecipient {
            final_recipient: &f.recipient.mailbox,
            original_recipient: f.recipient.orcpt.as_deref(),
            action: DsnAction::Failed,
            status: f.status,
            diagnostic: Some(f.diagnostic.clone()),
            remote_mta: None,
        })
        .collect();
    let report = Report {
        reporting_mta: &hostname,
        arrival_unix: received_at,
        now_unix: now.as_secs(),
        envid: envelope.envid.as_deref(),
        original_sender: Some(sender),
        recipients,
        ret,
        original: &original,
        boundary_seed: now.as_nanos() as u64 ^ id.0 as u64,
    };
    let Some(body) = dsn::build(&report) else {
        return true;
    };
    let report_env = dsn::report_envelope(sender, &body);
    match core.store_generated(&report_env, body).await {
        Ok(report_id) => {
            tracing::info!(%id, report = %report_id, to = %sender, "delivery report queued");
            true
        }
        Err(e) => {
            tracing::error!(%id, error = %e, "could not queue the delivery report");
            false
        }
    }
}

/// The part of the original a report returns: headers only for RET=HDRS (read just enough),
/// the whole message for RET=FULL.
async fn read_original(core: &Core, loc: &Location, ret: Ret) -> Result<Vec<u8>, spool::Error> {
    if ret == Ret::Full {
        return core.reader.read_body(loc).await;
    }
    let n = loc.body_len.min(256 * 1024) as usize;
    let head = core.reader.read_body_range(loc, 0, n, Vec::new()).await?;
    let end = memchr::memmem::find(&head, b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(head.len());
    Ok(head[..end].to_vec())
}
