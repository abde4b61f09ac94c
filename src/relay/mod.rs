//! The outgoing relay: delivers the outbound queue (parts for domains not hosted here: mail
//! the customers submit for foreign domains, and the delivery reports this server writes) to a
//! smarthost or straight to each domain's MX hosts. docs/relay.md is the operator's guide.
//!
//! What it owns, per core: the retry schedule of the outbound domains this core shards
//! (attempts, next attempt, last error) and which of them have a session in progress. The
//! parts themselves stay in the spool and the shard's [`DomainIndex`]: the relay is "a
//! reversal toward a remote MX instead of toward a customer", and settles parts the same way.
//!
//! - Per recipient, as in the reversal ([`outcome`]): 2xx retired; 5xx reported to the sender
//!   in an RFC 3464 report (never for mail from `<>`) and retired; 4xx (or no answer) stays
//!   queued for that recipient alone, and its domain backs off ([`backoff`]). A part ends with
//!   a DONE once nothing of it is queued, else a SETTLE records what is finished. A recipient
//!   still queued after `relay.give_up_after` at a failed attempt is reported and dropped.
//! - Exclusion: a domain with a session in progress is never picked again until that session's
//!   DONE records are retired from the index, so no part is sent twice by two sessions. A
//!   crash between the peer's 250 and our DONE sends the message again after the restart: a
//!   duplicate, which RFC 5321 §6.1 accepts, never a loss.
//! - Connection reuse: one session carries every due message of a destination (in smarthost
//!   mode, of every outbound domain of this core).
//! - The schedule is in memory only: after a restart every destination is tried at once.
//!
//! [`DomainIndex`]: crate::spool::DomainIndex
//! [`outcome`]: crate::provider::outcome

pub mod backoff;
pub mod reply;
pub mod route;
pub mod session;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{RelayMode, RelaySettings, SmarthostTls};
use crate::proto::reply::{EnhancedStatus, Reply};
use crate::proto::reversed::RcptOutcome;
use crate::provider::core::{Core, MeshMsg};
use crate::provider::outcome;
use crate::provider::report::{self, Failure};
use crate::spool::{self, Outcome};
use crate::types::{DomainName, MessageId, Recipient};

use session::{Policy, Queued};

/// How often the scheduler looks for due destinations when nothing wakes it.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Sessions one core runs at the same time.
const MAX_SESSIONS: usize = 16;
/// How long a session's end waits for its DONE records to be retired.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Operator requests, sent over the mesh to the cores.
pub enum Command {
    /// The schedule of this core's outbound domains.
    Status(std::sync::mpsc::Sender<Vec<OutboundRow>>),
    /// Attempt this domain now (to its shard core); answers the parts queued for it.
    Retry(DomainName, std::sync::mpsc::Sender<u64>),
    /// Report message `id`'s outbound parts on this core to the sender and drop them; answers
    /// how many parts were bounced (`None`: a part is in a session right now, try again).
    Bounce(MessageId, std::sync::mpsc::Sender<Option<u64>>),
}

/// One outbound destination as `turnpike queue` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutboundRow {
    /// The recipient domain.
    pub destination: String,
    /// Queued parts.
    pub messages: u64,
    /// Next attempt, unix seconds (0: as soon as possible).
    pub next_attempt: u64,
    /// Failed attempts since the last success.
    pub attempts: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
    /// A session is delivering it right now.
    pub active: bool,
}

/// The schedule of one outbound domain.
#[derive(Debug, Default, Clone)]
struct Schedule {
    attempts: u32,
    next_attempt: u64,
    last_error: Option<String>,
}

/// One core's relay state.
#[derive(Default)]
pub struct Relay {
    /// The outbound domains of this shard with queued mail (a superset: pruned at each scan).
    known: RefCell<BTreeSet<DomainName>>,
    /// `known` was filled from the index (false at start and after a reload).
    scanned: Cell<bool>,
    /// The relay runs on this core (`relay.mode` is not off).
    enabled: Cell<bool>,
    schedules: RefCell<HashMap<DomainName, Schedule>>,
    busy: RefCell<BTreeSet<DomainName>>,
    sessions: Cell<usize>,
    wake: tokio::sync::Notify,
}

impl Relay {
    /// Asks the scheduler to look now (an operator's retry, a session ended).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// New outbound mail for `domain` was indexed on this shard.
    pub fn queued(&self, domain: &DomainName) {
        if !self.enabled.get() {
            return;
        }
        if !self.known.borrow().contains(domain) {
            self.known.borrow_mut().insert(domain.clone());
        }
        self.wake();
    }

    /// The hosted domains changed: find the outbound domains again at the next scan.
    pub fn rescan(&self) {
        self.scanned.set(false);
        self.wake();
    }

    /// True while a session delivers `domain` (expiry leaves such parts alone).
    pub fn is_busy(&self, domain: &DomainName) -> bool {
        self.busy.borrow().contains(domain)
    }
}

/// True when `domain`'s mail leaves through the relay: not hosted, and not our own name
/// (postmaster mail is held for the operator).
pub fn is_outbound(core: &Core, domain: &DomainName) -> bool {
    core.hosted.borrow().get(domain).is_none() && *domain != core.shared.config.server.hostname
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The relay's settings and connections, shared by the sessions of one core.
struct Setup {
    settings: RelaySettings,
    resolver: hickory_resolver::TokioResolver,
    policy_mx: Policy,
    policy_smarthost: Option<Policy>,
}

/// Runs the relay of one core until shutdown. Returns at once when `relay.mode` is off.
pub async fn run(core: Rc<Core>) {
    let settings = core.shared.config.relay.clone();
    if settings.mode == RelayMode::Off {
        if core.index == 0 {
            tracing::warn!(
                "relay off: outbound mail stays queued (set [relay] mode or --smarthost)"
            );
        }
        return;
    }
    let setup = match setup(settings) {
        Ok(s) => Rc::new(s),
        Err(e) => {
            tracing::error!(core = core.index, error = %e, "relay cannot start; outbound mail stays queued");
            return;
        }
    };
    core.relay.enabled.set(true);
    if core.index == 0 {
        match &setup.settings.mode {
            RelayMode::Smarthost(h) => {
                tracing::info!(smarthost = %h.host, port = h.port, tls = ?h.tls, "relay to smarthost")
            }
            _ => {
                tracing::info!(resolver = ?setup.settings.resolver, port = setup.settings.mx_port, "relay by MX lookup")
            }
        }
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SCAN_INTERVAL) => {}
            _ = core.relay.wake.notified() => {}
            _ = core.stopped() => return,
        }
        for group in due(&core, &setup) {
            let (core, setup) = (core.clone(), setup.clone());
            core.relay.sessions.set(core.relay.sessions.get() + 1);
            // Compaction must not delete a segment this attempt reads from.
            let locations = group
                .iter()
                .flat_map(|(_, p)| p.iter().map(|p| &p.location));
            let pin = core.shared.pins.hold(locations);
            tokio::task::spawn_local(async move {
                let _pin = pin;
                deliver(&core, &setup, group).await;
                core.relay.sessions.set(core.relay.sessions.get() - 1);
                core.relay.wake();
            });
        }
    }
}

fn setup(settings: RelaySettings) -> Result<Setup, String> {
    let resolver = route::resolver(&settings)?;
    let policy_mx = Policy {
        tls: SmarthostTls::Opportunistic,
        tls_config: tls::unverified(),
        auth: None,
        connect_timeout: settings.connect_timeout,
    };
    let policy_smarthost = match &settings.mode {
        RelayMode::Smarthost(h) => {
            let tls_config = match &h.ca_file {
                Some(ca) => crate::tls::client_config_trusting(ca).map_err(|e| e.to_string())?,
                None => tls::unverified(),
            };
            let auth = match (&h.username, &h.password_file) {
                (Some(u), Some(f)) => {
                    let text = std::fs::read_to_string(f)
                        .map_err(|e| format!("relay.password_file {}: {e}", f.display()))?;
                    Some((u.clone(), text.lines().next().unwrap_or("").to_string()))
                }
                _ => None,
            };
            Some(Policy {
                tls: h.tls,
                tls_config,
                auth,
                connect_timeout: settings.connect_timeout,
            })
        }
        _ => None,
    };
    Ok(Setup {
        settings,
        resolver,
        policy_mx,
        policy_smarthost,
    })
}

/// The destinations to attempt now, each with its queued parts, grouped by session: one
/// group per domain (MX), or one group for everything (smarthost). Marks them busy.
fn due(core: &Core, setup: &Setup) -> Vec<Vec<(DomainName, Vec<spool::HeldPart>)>> {
    let free = MAX_SESSIONS.saturating_sub(core.relay.sessions.get());
    if free == 0 {
        return Vec::new();
    }
    let now = now();
    let index = core.index_shard.borrow();
    let mut schedules = core.relay.schedules.borrow_mut();
    let mut busy = core.relay.busy.borrow_mut();
    let mut known = core.relay.known.borrow_mut();
    if !core.relay.scanned.replace(true) {
        // At start and after a reload: find the outbound domains among everything held.
        known.extend(
            index
                .all_stats()
                .into_iter()
                .filter(|(d, _)| is_outbound(core, d))
                .map(|(d, _)| d),
        );
    }
    known.retain(|d| index.has_mail(d) || busy.contains(d));
    let mut due = Vec::new();
    for domain in known.iter().cloned() {
        if busy.contains(&domain) || !is_outbound(core, &domain) {
            continue;
        }
        let s = schedules.entry(domain.clone()).or_default();
        if s.next_attempt > now {
            continue;
        }
        let parts: Vec<spool::HeldPart> = index
            .parts(&domain)
            .filter(|p| !p.expired)
            .cloned()
            .collect();
        if !parts.is_empty() {
            due.push((domain, parts));
        }
    }
    // Forget schedules of domains whose mail is gone.
    schedules.retain(|d, _| index.has_mail(d) || busy.contains(d));
    let groups: Vec<Vec<_>> = match setup.settings.mode {
        RelayMode::Smarthost(_) if !due.is_empty() => vec![due],
        RelayMode::Smarthost(_) => Vec::new(),
        _ => due.into_iter().map(|d| vec![d]).take(free).collect(),
    };
    for g in &groups {
        for (d, _) in g {
            busy.insert(d.clone());
        }
    }
    groups
}

/// Delivers one group: route, sessions (next host while messages remain untried), settling
/// each message as soon as it has an outcome, then updates the schedule.
async fn deliver(core: &Core, setup: &Setup, group: Vec<(DomainName, Vec<spool::HeldPart>)>) {
    let domains: Vec<DomainName> = group.iter().map(|(d, _)| d.clone()).collect();
    let mut untried = merge(&group);
    let mut settle = Settle {
        core,
        setup,
        now: now(),
        retiring: Vec::new(),
        deferred: BTreeMap::new(),
        last_error: None,
    };
    let (routed, policy) = match &setup.settings.mode {
        RelayMode::Smarthost(h) => (
            route::smarthost(&setup.resolver, h).await,
            setup.policy_smarthost.as_ref().expect("smarthost mode"),
        ),
        _ => (
            route::mx(&setup.resolver, &domains[0], setup.settings.mx_port).await,
            &setup.policy_mx,
        ),
    };
    match routed {
        Err(e) if e.permanent => {
            tracing::warn!(destination = %domains[0], error = %e.why, "destination refuses mail; reporting to the senders");
            let reply = Reply::with_status(550, e.status, e.why.clone());
            for q in std::mem::take(&mut untried) {
                let answers = every(&q, RcptOutcome::Failed(reply.clone()));
                settle.apply(&q, answers, None).await;
            }
        }
        Err(e) => {
            tracing::info!(destination = %domains[0], error = %e.why, "destination not reachable now; will retry");
            settle.last_error = Some(e.why);
        }
        Ok(targets) => {
            for target in targets {
                if untried.is_empty() {
                    break;
                }
                let queue = std::mem::take(&mut untried);
                let mut end = session::run(core, &target, policy, queue, &mut settle).await;
                if end.tls_failed
                    && policy.tls == SmarthostTls::Opportunistic
                    && policy.auth.is_none()
                {
                    // Opportunistic means "TLS if it works": a broken TLS stack at the peer
                    // must not hold the mail back forever (credentials never go in clear).
                    tracing::info!(host = %target.host, addr = %target.addr, error = ?end.error, "TLS handshake failed; trying again in plain text");
                    let plain = Policy {
                        tls: SmarthostTls::None,
                        ..policy.clone()
                    };
                    let queue = std::mem::take(&mut end.untried);
                    end = session::run(core, &target, &plain, queue, &mut settle).await;
                }
                if let Some(e) = end.error {
                    tracing::info!(host = %target.host, addr = %target.addr, error = %e, "relay session failed");
                    settle.last_error = Some(e);
                }
                untried = end.untried;
            }
        }
    }
    let why = settle
        .last_error
        .clone()
        .unwrap_or_else(|| "not attempted".into());
    for q in untried {
        let answers = every(
            &q,
            RcptOutcome::Deferred(Reply::with_status(451, (4, 4, 0), "")),
        );
        settle.apply(&q, answers, Some(&why)).await;
    }
    let Settle {
        retiring,
        deferred,
        now,
        ..
    } = settle;
    wait_retired(retiring).await;
    let mut schedules = core.relay.schedules.borrow_mut();
    for d in &domains {
        let s = schedules.entry(d.clone()).or_default();
        match deferred.get(d) {
            Some(why) => {
                s.attempts += 1;
                let delay = backoff::delay(
                    s.attempts,
                    setup.settings.first_retry,
                    setup.settings.max_retry_interval,
                );
                s.next_attempt = now + delay.as_secs();
                s.last_error = Some(why.clone());
                tracing::info!(destination = %d, attempts = s.attempts, retry_in = ?delay, error = %why, "deferred");
                // turnpike_domain_deferred_total (delivered and bounced come with the DONE).
                let msg = MeshMsg::Deferred { domain: d.clone() };
                core.shared.mesh.send(core.index, msg);
            }
            None => *s = Schedule::default(),
        }
    }
    drop(schedules);
    let mut busy = core.relay.busy.borrow_mut();
    for d in &domains {
        busy.remove(d);
    }
}

/// Settles parts as their outcomes come in: DONE, reports, and which domains stay deferred.
struct Settle<'a> {
    core: &'a Core,
    setup: &'a Setup,
    now: u64,
    retiring: Vec<tokio::sync::oneshot::Receiver<()>>,
    deferred: BTreeMap<DomainName, String>,
    last_error: Option<String>,
}

impl Settle<'_> {
    /// Settles one message from its per-part answers (see [`outcome::answers`]): a report for
    /// every refused recipient first, then a DONE or SETTLE per part, and each part with a
    /// recipient still queued marks its domain deferred, with `why` (else the first 4xx) as
    /// the reason.
    async fn apply(&mut self, q: &Queued, mut answers: Vec<Vec<RcptOutcome>>, why: Option<&str>) {
        let reason = |answers: &[RcptOutcome]| {
            why.map(str::to_string).or_else(|| {
                answers.iter().find_map(|a| match a {
                    RcptOutcome::Deferred(r) => Some(reply::one_line(r)),
                    _ => None,
                })
            })
        };
        if backoff::gave_up(q.received_at, self.now, self.setup.settings.give_up_after) {
            let days = self.setup.settings.give_up_after.as_secs().div_ceil(86_400);
            for a in answers.iter_mut() {
                let last = reason(a).unwrap_or_default();
                for r in a
                    .iter_mut()
                    .filter(|r| matches!(r, RcptOutcome::Deferred(_)))
                {
                    *r = RcptOutcome::Failed(Reply::with_status(
                        554,
                        (5, 4, 7),
                        format!("undeliverable for {days} days, giving up; last error: {last}"),
                    ));
                }
            }
        }
        let failed = outcome::failures(&q.parts, &answers);
        let reported = failed.is_empty() || bounce(self.core, q, &failed).await;
        for (part, answers) in q.parts.iter().zip(&answers) {
            let settlement = outcome::settlement(part, answers, reported);
            if settlement.keeps_some() {
                let why = match reason(answers) {
                    Some(why) => why,
                    None => "refused, but its report could not be stored".to_string(),
                };
                self.deferred.insert(part.domain.clone(), why);
            }
            self.retiring
                .extend(outcome::record(self.core, q.id, part, settlement));
        }
    }
}

impl session::Outcomes for Settle<'_> {
    async fn message(&mut self, target: &route::Target, a: session::Attempted) {
        tracing::info!(
            id = %a.queued.id,
            host = %target.host,
            addr = %target.addr,
            outcome = %describe(&a.outcome.recipients),
            "relay attempt"
        );
        let answers = outcome::answers(&a.queued.parts, &a.owner, &a.outcome.recipients);
        for r in answers.iter().flatten() {
            if let RcptOutcome::Deferred(reply) = r {
                self.last_error = Some(reply::one_line(reply));
            }
        }
        self.apply(&a.queued, answers, None).await;
    }
}

/// The same answer for every recipient of every part of `q`.
fn every(q: &Queued, answer: RcptOutcome) -> Vec<Vec<RcptOutcome>> {
    q.parts
        .iter()
        .map(|p| vec![answer.clone(); p.recipients.len()])
        .collect()
}

/// One work item per message, merging its parts across the group's domains (a message for two
/// foreign domains goes once to a smarthost), oldest first.
fn merge(group: &[(DomainName, Vec<spool::HeldPart>)]) -> Vec<Queued> {
    let mut by_id: BTreeMap<(u64, MessageId), Queued> = BTreeMap::new();
    for (_, parts) in group {
        for p in parts {
            by_id
                .entry((p.received_at, p.id))
                .or_insert_with(|| Queued {
                    id: p.id,
                    location: p.location,
                    received_at: p.received_at,
                    parts: Vec::new(),
                })
                .parts
                .push(p.clone());
        }
    }
    by_id.into_values().collect()
}

fn describe(outcomes: &[(usize, RcptOutcome)]) -> String {
    let mut out = Vec::new();
    for (_, o) in outcomes {
        out.push(match o {
            RcptOutcome::Delivered => "delivered".to_string(),
            RcptOutcome::Deferred(r) => format!("deferred ({})", reply::one_line(r)),
            RcptOutcome::Failed(r) => format!("failed ({})", reply::one_line(r)),
        });
    }
    out.join(", ")
}

/// Queues the report for the refused recipients. False when it could not be stored (the part
/// then stays queued and is tried again).
async fn bounce(core: &Core, q: &Queued, failed: &[(Recipient, Reply)]) -> bool {
    let meta = match core.reader.read_message(&q.location).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(id = %q.id, error = %e, "cannot read a message to report it; it stays queued");
            return false;
        }
    };
    let failures: Vec<Failure> = failed
        .iter()
        .map(|(r, reply)| Failure {
            recipient: r.clone(),
            status: reply.status.unwrap_or(EnhancedStatus::new(5, 0, 0)),
            diagnostic: reply::one_line(reply),
        })
        .collect();
    report::queue_failure(
        core,
        q.id,
        &q.location,
        q.received_at,
        &meta.envelope,
        &failures,
    )
    .await
}

/// Sends the part's DONE to its writer core; the receiver resolves once it left the index.
fn done(
    core: &Core,
    id: MessageId,
    domain: &DomainName,
    outcome: Outcome,
) -> tokio::sync::oneshot::Receiver<()> {
    let (ack, retired) = tokio::sync::oneshot::channel();
    core.shared.mesh.send(
        core.writer_of(id),
        MeshMsg::Done {
            id,
            domain: domain.clone(),
            outcome,
            ack: Some(ack),
        },
    );
    retired
}

async fn wait_retired(retiring: Vec<tokio::sync::oneshot::Receiver<()>>) {
    let all = async {
        for r in retiring {
            let _ = r.await;
        }
    };
    if tokio::time::timeout(RETIRE_TIMEOUT, all).await.is_err() {
        tracing::warn!("relay: parts not retired in time");
    }
}

/// Applies an operator's [`Command`] on this core (called from the mesh loop).
pub fn handle(core: &Rc<Core>, cmd: Command) {
    match cmd {
        Command::Status(reply) => {
            let index = core.index_shard.borrow();
            let schedules = core.relay.schedules.borrow();
            let busy = core.relay.busy.borrow();
            let rows = index
                .all_stats()
                .into_iter()
                .filter(|(d, s)| s.messages > 0 && is_outbound(core, d))
                .map(|(d, s)| {
                    let sched = schedules.get(&d).cloned().unwrap_or_default();
                    OutboundRow {
                        destination: d.to_string(),
                        messages: s.messages,
                        next_attempt: sched.next_attempt,
                        attempts: sched.attempts,
                        last_error: sched.last_error,
                        active: busy.contains(&d),
                    }
                })
                .collect();
            let _ = reply.send(rows);
        }
        Command::Retry(domain, reply) => {
            let queued = core.index_shard.borrow().stats(&domain).messages;
            if let Some(s) = core.relay.schedules.borrow_mut().get_mut(&domain) {
                s.next_attempt = 0;
            }
            core.relay.wake();
            let _ = reply.send(queued);
        }
        Command::Bounce(id, reply) => {
            let parts: Vec<spool::HeldPart> = {
                let index = core.index_shard.borrow();
                index
                    .all_stats()
                    .into_iter()
                    .filter(|(d, _)| is_outbound(core, d))
                    .filter_map(|(d, _)| index.get(id, &d).cloned())
                    .collect()
            };
            if parts.iter().any(|p| core.relay.is_busy(&p.domain)) {
                let _ = reply.send(None);
                return;
            }
            if parts.is_empty() {
                let _ = reply.send(Some(0));
                return;
            }
            for p in &parts {
                core.relay.busy.borrow_mut().insert(p.domain.clone());
            }
            let core = core.clone();
            tokio::task::spawn_local(async move {
                let mut n = 0;
                let mut retiring = Vec::new();
                for p in &parts {
                    let q = Queued {
                        id: p.id,
                        location: p.location,
                        received_at: p.received_at,
                        parts: vec![p.clone()],
                    };
                    let host = core.shared.config.server.hostname.to_string();
                    let why = Reply::with_status(
                        550,
                        (5, 0, 0),
                        format!("returned to the sender by the postmaster of {host}"),
                    );
                    let failed: Vec<_> = p
                        .recipients
                        .iter()
                        .map(|r| (r.clone(), why.clone()))
                        .collect();
                    if bounce(&core, &q, &failed).await {
                        retiring.push(done(&core, p.id, &p.domain, Outcome::Bounced));
                        n += 1;
                        tracing::info!(%id, domain = %p.domain, "bounced by the operator");
                    }
                }
                wait_retired(retiring).await;
                for p in &parts {
                    core.relay.busy.borrow_mut().remove(&p.domain);
                }
                let _ = reply.send(Some(n));
            });
        }
    }
}
