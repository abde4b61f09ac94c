//! Authenticated submission policy (RFC 6409): which senders an account may use, how much it may
//! send, and where each recipient goes. Used by the ODMR listener before ATRN and by the
//! submission listeners (587 STARTTLS, 465 implicit TLS), through the [`Directory`] methods
//! `check_sender` and `check_submit_rcpt` of [`Core`].
//!
//! Rules:
//!
//! - Sender: `<>` or an address in one of the account's domains, unless the account allows any
//!   sender (`turnpike account senders NAME any`). Otherwise `553 5.7.1` (RFC 6409 §8.1).
//! - Rates (`[submission]`): per account over a fixed window of `period`, shared by all cores.
//!   A message counts once stored, with its recipients. MAIL once the window holds
//!   `messages_per_period` messages: `450 4.7.1`. RCPT beyond `recipients_per_message`, or
//!   beyond `recipients_per_period` (the window's plus this message's): `452 4.5.3`. Sessions
//!   running in parallel may overshoot by what they have in flight; the limits are soft.
//! - Routing: a recipient in a hosted domain (or our own postmaster) goes into that domain's
//!   hold under the MX's quota rules; any other recipient is accepted into the outbound queue
//!   (a part for its domain, delivered by the relay). One message with both kinds is stored once.
//!
//! Every refusal is logged here with the account, on top of the session's "refused" line.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::config::SubmissionSettings;
use crate::proto::inbound::{Directory, RcptVerdict};
use crate::proto::reply::Reply;
use crate::types::{DomainName, Mailbox};

use super::core::Core;

/// Decides MAIL FROM for `account`: the sender policy, then the message rate.
pub fn check_sender(core: &Core, account: &str, sender: Option<&Mailbox>) -> Result<(), Reply> {
    if let Some(sender) = sender {
        let hosted = core.hosted.borrow();
        let allowed = hosted.any_sender(account)
            || DomainName::parse(&sender.domain).is_ok_and(|d| hosted.may_send_from(account, &d));
        if !allowed {
            tracing::info!(%account, %sender, "submission refused: sender not in the account's domains");
            return Err(Reply::with_status(
                553,
                (5, 7, 1),
                format!("Sender address <{sender}> is not owned by {account}"),
            ));
        }
    }
    let limits = &core.shared.config.submission;
    let rates = core.shared.submit_rates.lock();
    let verdict =
        rates
            .unwrap_or_else(|p| p.into_inner())
            .check_message(limits, account, Instant::now());
    if verdict.is_err() {
        tracing::warn!(%account, limit = limits.messages_per_period, period = ?limits.period, "submission refused: message rate limit");
    }
    verdict
}

/// Decides RCPT for `account`'s message, which has `accepted` recipients so far: the
/// recipient limits, then the route (hosted hold or outbound queue).
pub fn check_rcpt(
    core: &Core,
    account: &str,
    rcpt: &Mailbox,
    accepted: usize,
    declared_size: Option<u64>,
) -> RcptVerdict {
    let limits = &core.shared.config.submission;
    let rate = core
        .shared
        .submit_rates
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check_recipient(limits, account, accepted, Instant::now());
    if let Err(r) = rate {
        tracing::warn!(%account, %rcpt, accepted, "submission refused: recipient limit");
        return RcptVerdict::Reject(r);
    }
    let Ok(domain) = DomainName::parse(&rcpt.domain) else {
        // Address literals and domains that are not LDH names: no route we could take.
        return RcptVerdict::Reject(Reply::with_status(
            553,
            (5, 1, 3),
            format!("Recipient domain {} cannot be routed", rcpt.domain),
        ));
    };
    let ours = domain == core.shared.config.server.hostname;
    if ours || core.hosted.borrow().get(&domain).is_some() {
        // Into a hold: exactly the MX's rules (quota, our postmaster).
        return core.check_rcpt(rcpt, declared_size);
    }
    RcptVerdict::Accept
}

/// Counts a stored message of `account` with `recipients` recipients against its rates.
pub fn record(core: &Core, account: &str, recipients: usize) {
    let limits = &core.shared.config.submission;
    core.shared
        .submit_rates
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(limits, account, recipients, Instant::now());
}

/// What each account submitted in its current window.
#[derive(Debug, Default)]
pub struct Rates {
    windows: HashMap<String, Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    messages: u64,
    recipients: u64,
}

impl Rates {
    /// `Err(450 4.7.1)` when `account` may not start another message now.
    pub fn check_message(
        &mut self,
        limits: &SubmissionSettings,
        account: &str,
        now: Instant,
    ) -> Result<(), Reply> {
        let max = u64::from(limits.messages_per_period);
        match self.current(limits.period, account, now) {
            Some(w) if max > 0 && w.messages >= max => Err(Reply::with_status(
                450,
                (4, 7, 1),
                format!(
                    "Message rate limit of {max} per {} reached, try again later",
                    period_text(limits.period)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// `Err(452 4.5.3)` when `account`'s message, with `accepted` recipients so far, may not
    /// take another one.
    pub fn check_recipient(
        &mut self,
        limits: &SubmissionSettings,
        account: &str,
        accepted: usize,
        now: Instant,
    ) -> Result<(), Reply> {
        let per_message = limits.recipients_per_message as usize;
        if per_message > 0 && accepted >= per_message {
            return Err(Reply::with_status(
                452,
                (4, 5, 3),
                format!("Too many recipients: at most {per_message} per message"),
            ));
        }
        let max = u64::from(limits.recipients_per_period);
        let so_far = self
            .current(limits.period, account, now)
            .map_or(0, |w| w.recipients);
        if max > 0 && so_far + accepted as u64 >= max {
            return Err(Reply::with_status(
                452,
                (4, 5, 3),
                format!(
                    "Recipient rate limit of {max} per {} reached, try again later",
                    period_text(limits.period)
                ),
            ));
        }
        Ok(())
    }

    /// Counts a stored message with `recipients` recipients.
    pub fn record(
        &mut self,
        limits: &SubmissionSettings,
        account: &str,
        recipients: usize,
        now: Instant,
    ) {
        if self.current(limits.period, account, now).is_none() {
            // Keys are accounts, so the map is bounded by the accounts file; expired windows
            // are replaced in place.
            self.windows.insert(
                account.to_string(),
                Window {
                    start: now,
                    messages: 0,
                    recipients: 0,
                },
            );
        }
        if let Some(w) = self.windows.get_mut(account) {
            w.messages += 1;
            w.recipients += recipients as u64;
        }
    }

    /// The account's window if it is still open at `now`.
    fn current(&self, period: Duration, account: &str, now: Instant) -> Option<Window> {
        self.windows
            .get(account)
            .copied()
            .filter(|w| now.saturating_duration_since(w.start) < period)
    }
}

/// `1h`, `10m`, `30s`: the period as the config spells it.
fn period_text(period: Duration) -> String {
    let secs = period.as_secs();
    match secs {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SubmissionSettings {
        SubmissionSettings {
            period: Duration::from_secs(600),
            messages_per_period: 2,
            recipients_per_period: 5,
            recipients_per_message: 3,
        }
    }

    fn code(r: Result<(), Reply>) -> Option<(u16, String)> {
        r.err().map(|r| (r.code, r.lines.join(" ")))
    }

    #[test]
    fn message_limit_per_window_and_per_account() {
        let (l, t0) = (limits(), Instant::now());
        let mut r = Rates::default();
        assert!(r.check_message(&l, "acme", t0).is_ok());
        r.record(&l, "acme", 1, t0);
        r.record(&l, "acme", 1, t0 + Duration::from_secs(1));
        let refused = code(r.check_message(&l, "acme", t0 + Duration::from_secs(2)));
        assert_eq!(
            refused,
            Some((
                450,
                "Message rate limit of 2 per 10m reached, try again later".into()
            ))
        );
        assert!(r.check_message(&l, "beta", t0).is_ok(), "per account");
        // The window opened at t0 closes at t0 + period.
        assert!(r
            .check_message(&l, "acme", t0 + Duration::from_secs(599))
            .is_err());
        assert!(r
            .check_message(&l, "acme", t0 + Duration::from_secs(600))
            .is_ok());
        r.record(&l, "acme", 1, t0 + Duration::from_secs(600));
        assert!(r
            .check_message(&l, "acme", t0 + Duration::from_secs(601))
            .is_ok());
    }

    #[test]
    fn recipient_limits_per_message_and_per_window() {
        let (l, t0) = (limits(), Instant::now());
        let mut r = Rates::default();
        assert!(r.check_recipient(&l, "acme", 2, t0).is_ok());
        assert_eq!(
            code(r.check_recipient(&l, "acme", 3, t0)),
            Some((452, "Too many recipients: at most 3 per message".into()))
        );
        r.record(&l, "acme", 3, t0);
        // 3 in the window: a new message may take a 4th and 5th recipient, not a 6th.
        assert!(r.check_recipient(&l, "acme", 1, t0).is_ok());
        assert_eq!(
            code(r.check_recipient(&l, "acme", 2, t0)),
            Some((
                452,
                "Recipient rate limit of 5 per 10m reached, try again later".into()
            ))
        );
        let later = t0 + Duration::from_secs(600);
        assert!(r.check_recipient(&l, "acme", 2, later).is_ok());
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let l = SubmissionSettings {
            messages_per_period: 0,
            recipients_per_period: 0,
            recipients_per_message: 0,
            ..limits()
        };
        let t0 = Instant::now();
        let mut r = Rates::default();
        for _ in 0..100 {
            r.record(&l, "acme", 1000, t0);
        }
        assert!(r.check_message(&l, "acme", t0).is_ok());
        assert!(r.check_recipient(&l, "acme", 10_000, t0).is_ok());
    }

    #[test]
    fn period_texts() {
        assert_eq!(period_text(Duration::from_secs(3600)), "1h");
        assert_eq!(period_text(Duration::from_secs(86_400 * 2)), "2d");
        assert_eq!(period_text(Duration::from_secs(90)), "90s");
        assert_eq!(period_text(Duration::from_secs(120)), "2m");
    }
}
