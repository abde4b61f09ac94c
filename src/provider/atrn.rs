//! The provider's ATRN decision (RFC 2645 §5.2.1): who may have what, and is anything there.
//!
//! Order of checks, each with its reply:
//! 1. Authorisation, all or nothing: any requested domain the account does not own refuses
//!    the whole request (450 4.7.1) and nothing is leased or delivered. A bare ATRN means
//!    every domain of the account.
//! 2. Leases: each domain is leased on its shard core, so two sessions never deliver the
//!    same domain at once. A domain leased by another live session refuses the request
//!    (451 4.3.0) and every lease taken so far is given back.
//! 3. Mail: the shard answers with the domain's held parts from its in-memory index (one
//!    lookup per domain, never a scan of the journal). Nothing held: 453 4.3.0.
//!
//! Leases live in a [`Leases`] value whose drop gives them back, so every way a session ends
//! (QUIT, error, disconnect, panic) releases them.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use crate::spool::HeldPart;
use crate::types::DomainName;

use super::core::{Core, LeaseAnswer, MeshMsg};

/// How long a session waits for the shard cores to answer a lease request.
const LEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of an ATRN request.
#[derive(Debug)]
pub enum Verdict {
    /// Leased, with mail: turn the line around.
    Granted(Leases),
    /// Requested domains the account does not own (the whole request is refused).
    NotAuthorized(Vec<DomainName>),
    /// Authorised, leased, but nothing is held.
    NoMail,
    /// Another session holds this domain.
    Busy(DomainName),
    /// The shard cores did not answer (shutting down, overloaded).
    Unavailable,
}

/// Domains leased to one session, with the parts held for them at lease time.
#[derive(Debug)]
pub struct Leases {
    core: Rc<Core>,
    session: u64,
    by_shard: BTreeMap<usize, Vec<DomainName>>,
    /// Held parts per leased domain, oldest first.
    pub parts: Vec<(DomainName, Vec<HeldPart>)>,
    /// For a lingering (push) session: parts held after the lease, as they arrive.
    pub pushed: Option<tokio::sync::mpsc::UnboundedReceiver<HeldPart>>,
}

impl Leases {
    /// The session these leases belong to.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// True when a leased domain is `domain`.
    pub fn covers(&self, domain: &DomainName) -> bool {
        self.parts.iter().any(|(d, _)| d == domain)
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        for (shard, domains) in std::mem::take(&mut self.by_shard) {
            self.core.shared.mesh.send(
                shard,
                MeshMsg::Release {
                    session: self.session,
                    domains,
                },
            );
        }
    }
}

/// Decides an ATRN for `account` asking for `requested` (empty = bare ATRN).
pub async fn decide(
    core: &Rc<Core>,
    session: u64,
    account: &str,
    requested: &[DomainName],
) -> Verdict {
    let owned: Vec<DomainName> = core.hosted.borrow().domains_of(account).to_vec();
    let mut wanted: Vec<DomainName> = if requested.is_empty() {
        owned.clone()
    } else {
        let foreign: Vec<DomainName> = requested
            .iter()
            .filter(|d| !owned.contains(d))
            .cloned()
            .collect();
        if !foreign.is_empty() {
            return Verdict::NotAuthorized(foreign);
        }
        requested.to_vec()
    };
    wanted.sort();
    wanted.dedup();
    if wanted.is_empty() {
        return Verdict::NoMail;
    }

    let by_shard = core.by_shard(wanted);
    let linger = core.hosted.borrow().lingers(account);
    let (push, pushed) = match linger {
        true => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let mut waiting = Vec::new();
    for (shard, domains) in &by_shard {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let msg = MeshMsg::Lease {
            session,
            domains: domains.clone(),
            reply: tx,
            push: push.clone(),
        };
        core.shared.mesh.send(*shard, msg);
        waiting.push(rx);
    }
    // From here on, whatever was granted is released by this value's drop.
    let mut leases = Leases {
        core: core.clone(),
        session,
        by_shard,
        parts: Vec::new(),
        pushed,
    };
    let mut busy = None;
    for rx in waiting {
        match tokio::time::timeout(LEASE_TIMEOUT, rx).await {
            Ok(Ok(LeaseAnswer::Granted(parts))) => leases.parts.extend(parts),
            Ok(Ok(LeaseAnswer::Busy(d))) => busy = Some(d),
            _ => return Verdict::Unavailable,
        }
    }
    if let Some(d) = busy {
        return Verdict::Busy(d);
    }
    // A lingering account is served even with nothing held yet: RFC 2645 §5.2.1 allows a
    // 250 with nothing to send, and the session then waits for mail.
    if !linger && leases.parts.iter().all(|(_, p)| p.is_empty()) {
        return Verdict::NoMail;
    }
    Verdict::Granted(leases)
}
