//! From one reply per recipient to the one reply per message the provider sees.
//!
//! | recipients                     | reply to the provider                              |
//! |--------------------------------|----------------------------------------------------|
//! | all 2xx                        | 250                                                |
//! | none 2xx, some 4xx             | the first 4xx (the provider keeps it and retries)  |
//! | none 2xx, all 5xx              | the first 5xx (the provider bounces)               |
//! | some 2xx, some 4xx             | 451 4.x, the delivered ones are remembered         |
//! | some 2xx, the others 5xx       | 550/554 5.x naming who failed and who got it       |
//!
//! A temporary failure always wins over a permanent one: after a retry the permanent case is
//! decided again with the facts of that moment. Texts name the recipient a reply belongs to,
//! because the provider's delivery report quotes our text to the sender.

use crate::proto::reply::{EnhancedStatus, Reply};
use crate::types::Mailbox;

/// The combined outcome of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Combined {
    /// Every recipient has it: answer 250.
    Delivered,
    /// Nobody got it, or someone did and the rest failed for good: answer with this reply.
    Failed(Reply),
    /// Some recipients have it, others failed temporarily: answer with this 4xx; the
    /// provider sends the message again, so the delivered recipients must be remembered.
    Partial(Reply),
}

/// The longest text we put in a reply line (the provider's DSN quotes it).
const MAX_TEXT: usize = 400;

/// Combines per-recipient replies, in RCPT order. An empty list is `Delivered`.
pub fn combine(outcomes: &[(Mailbox, Reply)]) -> Combined {
    let delivered: Vec<&Mailbox> = outcomes
        .iter()
        .filter(|(_, r)| r.is_positive())
        .map(|(m, _)| m)
        .collect();
    if delivered.len() == outcomes.len() {
        return Combined::Delivered;
    }
    let temporary = outcomes.iter().find(|(_, r)| r.is_transient());
    let permanent = outcomes.iter().find(|(_, r)| r.is_permanent());
    if delivered.is_empty() {
        let (rcpt, reply) = temporary.or(permanent).expect("some recipient failed");
        return Combined::Failed(about(rcpt, reply, reply.code, reply.status, ""));
    }
    let names: Vec<String> = delivered.iter().map(|m| format!("<{m}>")).collect();
    let note = format!(" (delivered to {})", names.join(", "));
    match (temporary, permanent) {
        (Some((rcpt, reply)), _) => Combined::Partial(about(
            rcpt,
            reply,
            451,
            Some(class_of(reply.status, 4)),
            &note,
        )),
        (None, Some((rcpt, reply))) => Combined::Failed(about(
            rcpt,
            reply,
            reply.code,
            Some(class_of(reply.status, 5)),
            &note,
        )),
        (None, None) => unreachable!("not all delivered, yet no failure"),
    }
}

/// `<rcpt>: <their text><note>` under `code` and `status`.
fn about(
    rcpt: &Mailbox,
    reply: &Reply,
    code: u16,
    status: Option<EnhancedStatus>,
    note: &str,
) -> Reply {
    let theirs: Vec<&str> = reply.lines.iter().map(|l| l.as_ref()).collect();
    let mut text = format!("<{rcpt}>: {}{note}", theirs.join(" "));
    if text.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    Reply::new(code, status, text)
}

/// `status` with its class forced to `class` (a recipient's own detail is kept), or the
/// generic `class.0.0`.
fn class_of(status: Option<EnhancedStatus>, class: u8) -> EnhancedStatus {
    match status {
        Some(s) => EnhancedStatus::new(class, s.subject, s.detail),
        None => EnhancedStatus::new(class, 0, 0),
    }
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

    fn ok() -> Reply {
        Reply::with_status(250, (2, 0, 0), "OK")
    }

    fn temp() -> Reply {
        Reply::with_status(452, (4, 2, 2), "Mailbox full")
    }

    fn perm() -> Reply {
        Reply::with_status(550, (5, 1, 1), "No such user")
    }

    #[test]
    fn table() {
        let a = mb("a@example.com");
        let b = mb("b@example.com");
        let c = mb("c@example.com");
        assert_eq!(combine(&[]), Combined::Delivered);
        assert_eq!(
            combine(&[(a.clone(), ok()), (b.clone(), ok())]),
            Combined::Delivered
        );

        // Nobody got it: a temporary failure wins so the provider retries.
        let Combined::Failed(r) = combine(&[(a.clone(), perm()), (b.clone(), temp())]) else {
            panic!()
        };
        assert_eq!(
            (r.code, r.status.unwrap().to_string()),
            (452, "4.2.2".into())
        );
        assert_eq!(r.lines[0], "<b@example.com>: Mailbox full");
        let Combined::Failed(r) = combine(&[(a.clone(), perm()), (b.clone(), perm())]) else {
            panic!()
        };
        assert_eq!(
            (r.code, r.status.unwrap().to_string()),
            (550, "5.1.1".into())
        );

        // Mixed with a temporary failure: 451, the delivered ones named.
        let Combined::Partial(r) =
            combine(&[(a.clone(), ok()), (b.clone(), temp()), (c.clone(), perm())])
        else {
            panic!()
        };
        assert_eq!(
            (r.code, r.status.unwrap().to_string()),
            (451, "4.2.2".into())
        );
        assert_eq!(
            r.lines[0],
            "<b@example.com>: Mailbox full (delivered to <a@example.com>)"
        );

        // Mixed with only permanent failures: a 5xx whose text tells the whole story.
        let Combined::Failed(r) = combine(&[(a.clone(), ok()), (c.clone(), perm())]) else {
            panic!()
        };
        assert_eq!(r.code, 550);
        assert!(r.is_permanent());
        assert!(r.lines[0].contains("delivered to <a@example.com>"), "{r:?}");
    }

    #[test]
    fn statusless_and_long_replies() {
        let a = mb("a@example.com");
        let b = mb("b@example.com");
        let bare = Reply::new(421, None, "x".repeat(1000));
        let Combined::Partial(r) = combine(&[(a, ok()), (b, bare)]) else {
            panic!()
        };
        assert_eq!(r.status.unwrap().to_string(), "4.0.0");
        assert!(r.lines[0].len() <= MAX_TEXT + 3);
    }
}
