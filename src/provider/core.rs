//! What one core owns: its journal writer, its shard of the domain index, its copy of the
//! hosted-domain snapshot, and the mesh receiver that applies work other cores send it.
//!
//! Ownership rules (DESIGN.md "Cross-core mesh"): a message is written by the core whose session
//! received it; each domain part is indexed on the domain's shard core
//! (`shard_hash(domain) % cores`); nothing here is shared mutably across cores. The only
//! cross-core state is the mesh itself and the relaxed quota counters in [`Hosted`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::metrics;
use crate::proto::inbound::{Directory, InboundConfig, RcptVerdict};
use crate::proto::reply::Reply;
use crate::runtime::limiter::Limiter;
use crate::runtime::mesh::Mesh;
use crate::runtime::IoKind;
use crate::spool;
use crate::types::{DomainName, Envelope, Mailbox, MessageId};

use super::hosted::{CounterTable, Hosted};
use super::report;
use crate::proto::reply::EnhancedStatus;

/// How long reclaim waits for the shard cores to apply relocations.
const RELOCATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often journals short of disk space are reclaimed.
const SPACE_RECLAIM: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a DONE may wait for the disk before its part leaves the index anyway.
const DONE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// Work one core sends another.
pub enum MeshMsg {
    /// A committed message part for a domain this core shards: index it.
    Held(spool::HeldPart),
    /// To the writer core of the part's message: it passed the maximum hold. Append its
    /// EXPIRE, queue the report to the sender, then its DONE.
    Expire(spool::HeldPart),
    /// To the shard core: expiring this part failed half-way; try again at the next scan.
    ExpireFailed {
        /// The message.
        id: MessageId,
        /// The part.
        domain: DomainName,
    },
    /// To the shard core: the EXPIRE is durable; mark the part expired (it awaits its bounce).
    Expired {
        /// The message.
        id: MessageId,
        /// The expired part.
        domain: DomainName,
    },
    /// To the shard core: compaction copied the message; its part now lives at `location`.
    Relocated {
        /// The message.
        id: MessageId,
        /// The part.
        domain: DomainName,
        /// The new copy.
        location: spool::Location,
        /// Dropped once the index points at the copy: then the old segment may go.
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// To a shard core: lease these domains (all on this shard) for ATRN session `session`
    /// and return their held parts; all or nothing.
    Lease {
        /// The asking session.
        session: u64,
        /// Domains this shard owns.
        domains: Vec<DomainName>,
        /// Where the answer goes.
        reply: tokio::sync::oneshot::Sender<LeaseAnswer>,
        /// For a lingering session: where parts held later for these domains are pushed.
        push: Option<tokio::sync::mpsc::UnboundedSender<spool::HeldPart>>,
    },
    /// To a shard core: the session is over; its leases end.
    Release {
        /// The session that held them.
        session: u64,
        /// The leased domains on this shard.
        domains: Vec<DomainName>,
    },
    /// To the writer core of `id`: the part for `domain` is finished; append its DONE, then
    /// retire it on the shard core.
    Done {
        /// The message.
        id: MessageId,
        /// The finished part.
        domain: DomainName,
        /// How it ended.
        outcome: spool::Outcome,
        /// Answered once the part left the index (dropped if the DONE could not be written).
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// To the shard core: the part's DONE is durable; drop it from the index.
    Retire {
        /// The message.
        id: MessageId,
        /// The finished part.
        domain: DomainName,
        /// How it ended.
        outcome: spool::Outcome,
        /// Answered once the part left the index (dropped if the DONE could not be written).
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// To the writer core of `id`: these recipients (envelope index, outcome) of the `domain`
    /// part are finished and the others stay held; append its SETTLE, then narrow the part
    /// on the shard core.
    Settle {
        /// The message.
        id: MessageId,
        /// The part.
        domain: DomainName,
        /// The finished recipients.
        recipients: Vec<(u32, spool::Outcome)>,
        /// Answered once the index follows (dropped if the SETTLE could not be written).
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// To the shard core: the part's SETTLE is durable; drop these recipients from it.
    Settled {
        /// The message.
        id: MessageId,
        /// The part.
        domain: DomainName,
        /// Envelope indices of the finished recipients.
        indices: Vec<u32>,
        /// Answered once the part is narrowed.
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// To a shard core: an ATRN for these domains was answered with `result`.
    AtrnNoted {
        /// The domains asked for (this shard's).
        domains: Vec<DomainName>,
        /// How it was answered.
        result: metrics::AtrnResult,
        /// When, unix seconds.
        at: u64,
    },
    /// To a shard core: a delivery attempt for a part of `domain` was deferred (4xx).
    Deferred {
        /// The domain.
        domain: DomainName,
    },
    /// Metrics scrape: this core's counters and histograms, and gauges for its shard.
    Metrics(std::sync::mpsc::Sender<(metrics::Snapshot, Vec<metrics::DomainGauge>)>),
    /// A snapshot of the queue for the control socket.
    Query(Query, std::sync::mpsc::Sender<QueryAnswer>),
    /// To the shard core: the stored copy of this part is damaged or gone; quarantine it.
    Quarantine {
        /// The message.
        id: MessageId,
        /// The part.
        domain: DomainName,
        /// What was found.
        reason: String,
    },
    /// The operator's request about one message, to every core (each acts on its shard);
    /// answered with the number of parts it finished.
    Operator {
        /// The message.
        id: MessageId,
        /// Bounce or delete.
        op: super::quarantine::Operation,
        /// Which parts.
        scope: super::quarantine::Scope,
        /// Where the count goes.
        reply: std::sync::mpsc::Sender<usize>,
    },
    /// The operator asks for reclaim now: delete dead segments and compact, in this core's
    /// journals; answered with (segments deleted, segments compacted, messages moved).
    Reclaim(std::sync::mpsc::Sender<(usize, usize, usize)>),
    /// New hosted-domain snapshot after a reload.
    Reload(Arc<Hosted>),
    /// An operator's request to this core's outbound relay.
    Relay(crate::relay::Command),
    /// Stop accepting and wind down.
    Shutdown,
}

/// A shard core's answer to [`MeshMsg::Lease`].
#[derive(Debug)]
pub enum LeaseAnswer {
    /// Every domain is now leased to the session; their held parts, oldest first.
    Granted(Vec<(DomainName, Vec<spool::HeldPart>)>),
    /// This domain is leased by another live session; nothing was leased.
    Busy(DomainName),
}

/// Questions the control socket asks every core.
#[derive(Clone, Debug)]
pub enum Query {
    /// Per-domain totals of this core's shard.
    Summary,
    /// The held parts of one domain (only its shard core answers with data).
    Domain(DomainName),
    /// The state of this core's journal writers (disk full, poisoned).
    Storage,
    /// The quarantined parts of this core's shard.
    Quarantined,
}

/// A core's answer to a [`Query`].
pub enum QueryAnswer {
    /// Totals per domain.
    Summary(Vec<(DomainName, spool::DomainStats)>),
    /// The parts of one domain.
    Domain(Vec<spool::HeldPart>),
    /// This core's journal writers.
    Storage(Vec<spool::JournalStatus>),
    /// Quarantined parts.
    Quarantined(Vec<spool::Quarantined>),
}

/// State shared by all cores, read-only after start.
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The cross-core mesh.
    pub mesh: Arc<Mesh<MeshMsg>>,
    /// Connection admission.
    pub limiter: Arc<Limiter>,
    /// TLS server config of the MX (no client certificate requested).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS server config of the authenticating listeners (ODMR, submission): the same
    /// identity, plus an optional client certificate for SASL EXTERNAL.
    pub tls_client_certs: Option<Arc<rustls::ServerConfig>>,
    /// Quota counters by domain.
    pub counters: Arc<CounterTable>,
    /// The I/O driver every core runs.
    pub io: IoKind,
    /// Server secret for fake SCRAM salts of unknown users (stable across restarts).
    pub auth_secret: [u8; 32],
    /// Last ATRN per account, for `odmr.min_atrn_interval`. Touched once per ATRN.
    pub last_atrn: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Source of ATRN session ids (lease owners).
    pub sessions: std::sync::atomic::AtomicU64,
    /// Per-account submission counts for the `[submission]` rate limits (all cores).
    pub submit_rates: std::sync::Mutex<super::submit::Rates>,
    /// Segments that sessions read from: the journals delete none of them.
    pub pins: Arc<spool::SegmentPins>,
}

impl Shared {
    /// A new ATRN session id.
    pub fn next_session(&self) -> u64 {
        self.sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// False when `account` asked for ATRN less than `odmr.min_atrn_interval` ago (then
    /// `450 4.7.0`, RFC 2645 §5.2.1); records this request otherwise.
    pub fn atrn_allowed(&self, account: &str) -> bool {
        let min = self.config.odmr.min_atrn_interval;
        if min.is_zero() {
            return true;
        }
        let now = std::time::Instant::now();
        let mut last = self.last_atrn.lock().unwrap_or_else(|p| p.into_inner());
        if last
            .get(account)
            .is_some_and(|t| now.duration_since(*t) < min)
        {
            return false;
        }
        last.insert(account.to_string(), now);
        true
    }
}

/// One core's state. Lives in an `Rc` on that core's thread.
pub struct Core {
    /// This core's index.
    pub index: usize,
    /// State shared by all cores.
    pub shared: Arc<Shared>,
    /// This core's copy of the hosted-domain snapshot.
    pub hosted: RefCell<Arc<Hosted>>,
    /// This core's journal writer.
    pub journal: spool::JournalHandle,
    /// Reads held messages (any core's journal) for reversals on this core.
    pub reader: spool::Reader,
    /// Writers of journals this core adopted: directories of cores that no longer run (the
    /// server restarted with fewer cores). DONE/EXPIRE for their messages are appended there.
    adopted: HashMap<u16, spool::JournalHandle>,
    /// The index of the domains this core shards.
    pub index_shard: RefCell<spool::DomainIndex>,
    next_seq: Cell<u64>,
    /// Parts of this shard whose expiry is in progress on their writer core.
    expiring: RefCell<std::collections::HashSet<(MessageId, DomainName)>>,
    /// Domain -> ATRN session holding it, for the domains this core shards.
    leases: RefCell<HashMap<DomainName, u64>>,
    /// Lingering sessions: where newly held parts of their leased domains go.
    pushes: RefCell<HashMap<u64, tokio::sync::mpsc::UnboundedSender<spool::HeldPart>>>,
    /// Per ATRN session: the segments its parts are in, pinned until its leases end.
    lease_pins: RefCell<HashMap<u64, Vec<spool::PinGuard>>>,
    /// Failed-login throttle for sessions on this core.
    pub throttle: RefCell<crate::proto::throttle::Throttle>,
    /// This core's counters and latency histograms.
    pub metrics: RefCell<metrics::CoreMetrics>,
    /// ATRN and delivery history of the domains this core shards, for the metrics gauges.
    activity: RefCell<HashMap<DomainName, Activity>>,
    /// The outgoing relay's schedule for the outbound domains this core shards.
    pub relay: crate::relay::Relay,
    shutdown: tokio::sync::Notify,
    stopping: Cell<bool>,
}

impl Core {
    /// Assembles a core's state.
    pub fn new(
        index: usize,
        shared: Arc<Shared>,
        hosted: Arc<Hosted>,
        journal: spool::JournalHandle,
        adopted: HashMap<u16, spool::JournalHandle>,
        index_shard: spool::DomainIndex,
    ) -> Rc<Core> {
        // Random start so ids stay unique across restarts even within one millisecond.
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let reader = spool::Reader::new(shared.config.server.data_dir.clone(), shared.io);
        let throttle = crate::proto::throttle::Throttle::new(throttle_config(&shared.config.odmr));
        Rc::new(Core {
            index,
            reader,
            shared,
            hosted: RefCell::new(hosted),
            journal,
            adopted,
            index_shard: RefCell::new(index_shard),
            next_seq: Cell::new(u64::from_le_bytes(seed) >> 16),
            leases: RefCell::new(HashMap::new()),
            pushes: RefCell::new(HashMap::new()),
            lease_pins: RefCell::new(HashMap::new()),
            expiring: RefCell::new(Default::default()),
            metrics: RefCell::new(metrics::CoreMetrics::new()),
            throttle: RefCell::new(throttle),
            activity: RefCell::new(HashMap::new()),
            relay: Default::default(),
            shutdown: tokio::sync::Notify::new(),
            stopping: Cell::new(false),
        })
    }

    /// The core that appends DONE/EXPIRE records for message `id`: the one that wrote it, or
    /// the one that adopted its journal.
    pub fn writer_of(&self, id: MessageId) -> usize {
        usize::from(id.core()) % self.shared.mesh.cores()
    }

    /// The journal writer that holds message `id`, if this core is its writer.
    fn journal_of(&self, id: MessageId) -> Option<&spool::JournalHandle> {
        if usize::from(id.core()) == self.index {
            Some(&self.journal)
        } else {
            self.adopted.get(&id.core())
        }
    }

    /// This core's journal writer and the ones it adopted.
    pub fn journals(&self) -> impl Iterator<Item = &spool::JournalHandle> {
        std::iter::once(&self.journal).chain(self.adopted.values())
    }

    /// `domains` grouped by the core that shards each one.
    pub fn by_shard(
        &self,
        domains: impl IntoIterator<Item = DomainName>,
    ) -> std::collections::BTreeMap<usize, Vec<DomainName>> {
        let mut by_shard = std::collections::BTreeMap::<usize, Vec<DomainName>>::new();
        for d in domains {
            by_shard.entry(self.shard_of(&d)).or_default().push(d);
        }
        by_shard
    }

    /// The core that shards `domain`.
    pub fn shard_of(&self, domain: &DomainName) -> usize {
        (domain.shard_hash() % self.shared.mesh.cores() as u64) as usize
    }

    /// A fresh message id of this core.
    pub(crate) fn new_id(&self, now_ms: u64) -> MessageId {
        let seq = self.next_seq.get();
        self.next_seq.set(seq.wrapping_add(1));
        MessageId::new(now_ms, self.index as u16, seq)
    }

    /// The protocol machine's settings for a new session on this core.
    pub fn inbound_config(&self, tls_active: bool) -> InboundConfig {
        let c = &self.shared.config;
        InboundConfig {
            hostname: c.server.hostname.to_string(),
            max_message_size: c.limits.max_message_size,
            max_recipients: c.limits.max_recipients as usize,
            max_line_length: c.limits.max_line_length,
            max_commands_without_progress: c.limits.max_commands_without_progress,
            max_errors: c.limits.max_errors,
            max_hops: c.limits.max_hops as usize,
            tls_available: self.shared.tls.is_some(),
            tls_active,
            chunking: true,
            smtputf8: true,
            pipelining: true,
            body_chunk: Some(super::ingest::BODY_CHUNK),
        }
    }

    /// The refusal for new mail while this core's journal cannot take it (the disk is full,
    /// or the writer is poisoned), checked at RCPT so the client learns it before DATA.
    pub fn storage_refusal(&self) -> Option<Reply> {
        let err = if self.journal.is_poisoned() {
            spool::Error::Poisoned
        } else if self.journal.short_of_space() {
            self.metrics.borrow_mut().store_mut().storage_refused += 1;
            spool::Error::NoSpace { op: "RCPT" }
        } else {
            return None;
        };
        Some(storage_reply(&err))
    }

    /// Stores a message this server wrote itself (a delivery report) through the same durable
    /// path as received mail. Parts for hosted domains wait for ATRN; the others form the
    /// outbound queue (shown by `turnpike queue`) until the relay delivers them.
    pub async fn store_generated(
        &self,
        envelope: &Envelope,
        body: Vec<u8>,
    ) -> Result<MessageId, spool::Error> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = self.new_id(now.as_millis() as u64);
        self.hold(id, now.as_secs(), envelope, body).await?;
        Ok(id)
    }

    /// Appends to this core's journal (group commit: returns after fdatasync) and indexes each
    /// domain part on its shard core.
    async fn hold(
        &self,
        id: MessageId,
        received_at: u64,
        env: &Envelope,
        body: Vec<u8>,
    ) -> Result<(), spool::Error> {
        let started = std::time::Instant::now();
        let location = self
            .journal
            .append_message(id, received_at, env, &body)
            .await?;
        drop(body);
        self.announce_held(id, received_at, env, location, started);
        Ok(())
    }

    /// A message is durable in this core's journal at `location` (appended since
    /// `started`): counts it and indexes each domain part on its shard core.
    pub(crate) fn announce_held(
        &self,
        id: MessageId,
        received_at: u64,
        env: &Envelope,
        location: spool::Location,
        started: std::time::Instant,
    ) {
        let mut m = self.metrics.borrow_mut();
        m.message_held(location.body_len);
        m.record_accept(started.elapsed());
        drop(m);
        for part in spool::HeldPart::for_message(id, received_at, env, location) {
            let shard = self.shard_of(&part.domain);
            self.shared.mesh.send(shard, MeshMsg::Held(part));
        }
    }

    /// Applies mesh messages for this core until shutdown.
    pub async fn run_mesh(self: Rc<Self>) {
        let mut counters: HashMap<DomainName, Arc<super::hosted::DomainCounters>> = HashMap::new();
        loop {
            match self.shared.mesh.recv(self.index).await {
                MeshMsg::Held(part) => {
                    let c = counters
                        .entry(part.domain.clone())
                        .or_insert_with(|| self.shared.counters.counters(&part.domain));
                    c.add(part.bytes);
                    let session = self.leases.borrow().get(&part.domain).copied();
                    if let Some((s, push)) =
                        session.and_then(|s| Some((s, self.pushes.borrow().get(&s).cloned()?)))
                    {
                        let pin = self.shared.pins.hold([&part.location]);
                        self.lease_pins.borrow_mut().entry(s).or_default().push(pin);
                        let _ = push.send(part.clone());
                    }
                    if crate::relay::is_outbound(&self, &part.domain) {
                        self.relay.queued(&part.domain);
                    }
                    self.index_shard.borrow_mut().insert(part);
                }
                MeshMsg::Expire(part) => {
                    let core = self.clone();
                    tokio::task::spawn_local(async move { core.expire(part).await });
                }
                MeshMsg::ExpireFailed { id, domain } => {
                    self.expiring.borrow_mut().remove(&(id, domain));
                }
                MeshMsg::Expired { id, domain } => {
                    if self.index_shard.borrow_mut().mark_expired(id, &domain) {
                        tracing::info!(%id, %domain, "held past the maximum hold; expired, awaiting bounce");
                    }
                }
                MeshMsg::Relocated {
                    id,
                    domain,
                    location,
                    ack,
                } => {
                    self.index_shard
                        .borrow_mut()
                        .relocate(id, &domain, location);
                    drop(ack);
                }
                MeshMsg::Lease {
                    session,
                    domains,
                    reply,
                    push,
                } => {
                    let answer = self.lease(session, &domains);
                    if let (LeaseAnswer::Granted(_), Some(push)) = (&answer, push) {
                        self.pushes.borrow_mut().insert(session, push);
                    }
                    let _ = reply.send(answer);
                }
                MeshMsg::Release { session, domains } => {
                    self.pushes.borrow_mut().remove(&session);
                    self.lease_pins.borrow_mut().remove(&session);
                    let mut leases = self.leases.borrow_mut();
                    for d in domains {
                        if leases.get(&d) == Some(&session) {
                            leases.remove(&d);
                        }
                    }
                }
                MeshMsg::Done {
                    id,
                    domain,
                    outcome,
                    ack,
                } => {
                    let core = self.clone();
                    tokio::task::spawn_local(async move {
                        core.append_done(id, domain, outcome, ack).await
                    });
                }
                MeshMsg::Settle {
                    id,
                    domain,
                    recipients,
                    ack,
                } => {
                    let core = self.clone();
                    tokio::task::spawn_local(async move {
                        core.append_settle(id, domain, recipients, ack).await
                    });
                }
                MeshMsg::Settled {
                    id,
                    domain,
                    indices,
                    ack,
                } => {
                    let _ack = AckOnDrop(ack);
                    self.index_shard.borrow_mut().settle(id, &domain, &indices);
                }
                MeshMsg::AtrnNoted {
                    domains,
                    result,
                    at,
                } => {
                    let mut activity = self.activity.borrow_mut();
                    for d in domains {
                        let a = activity.entry(d).or_default();
                        a.last_atrn = Some((at, result));
                    }
                }
                MeshMsg::Deferred { domain } => {
                    self.activity
                        .borrow_mut()
                        .entry(domain)
                        .or_default()
                        .deferred += 1;
                }
                MeshMsg::Metrics(reply) => {
                    let mut snapshot = self.metrics.borrow().snapshot();
                    for j in self.journals() {
                        snapshot.store.journals_short += u64::from(j.short_of_space());
                        snapshot.store.journals_poisoned += u64::from(j.is_poisoned());
                    }
                    snapshot.store.quarantined =
                        self.index_shard.borrow().quarantined().count() as u64;
                    let _ = reply.send((snapshot, self.domain_gauges()));
                }
                MeshMsg::Retire {
                    id,
                    domain,
                    outcome,
                    ack,
                } => {
                    // However this ends, the part is out of the index before the ack.
                    let _ack = AckOnDrop(ack);
                    {
                        let mut activity = self.activity.borrow_mut();
                        let a = activity.entry(domain.clone()).or_default();
                        match outcome {
                            spool::Outcome::Delivered => a.delivered += 1,
                            spool::Outcome::Bounced | spool::Outcome::ExpiredBounced => {
                                a.bounced += 1
                            }
                            _ => {}
                        }
                    }
                    self.expiring.borrow_mut().remove(&(id, domain.clone()));
                    if let Some(part) = self.index_shard.borrow_mut().remove(id, &domain) {
                        counters
                            .entry(domain.clone())
                            .or_insert_with(|| self.shared.counters.counters(&domain))
                            .remove(part.bytes);
                    }
                }
                MeshMsg::Query(q, reply) => {
                    let idx = self.index_shard.borrow();
                    let answer = match q {
                        Query::Summary => QueryAnswer::Summary(idx.all_stats()),
                        Query::Domain(d) => QueryAnswer::Domain(idx.parts(&d).cloned().collect()),
                        Query::Storage => {
                            QueryAnswer::Storage(self.journals().map(|j| j.status()).collect())
                        }
                        Query::Quarantined => {
                            QueryAnswer::Quarantined(super::quarantine::listing(&self))
                        }
                    };
                    let _ = reply.send(answer);
                }
                MeshMsg::Reload(h) => {
                    tracing::debug!(
                        core = self.index,
                        domains = h.len(),
                        "hosted domains reloaded"
                    );
                    *self.hosted.borrow_mut() = h;
                    self.relay.rescan();
                }
                MeshMsg::Relay(cmd) => crate::relay::handle(&self, cmd),
                MeshMsg::Quarantine { id, domain, reason } => {
                    super::quarantine::apply(&self, id, &domain, &reason);
                }
                MeshMsg::Operator {
                    id,
                    op,
                    scope,
                    reply,
                } => {
                    let core = self.clone();
                    tokio::task::spawn_local(async move {
                        let n = super::quarantine::operate(&core, id, op, scope).await;
                        let _ = reply.send(n);
                    });
                }
                MeshMsg::Reclaim(reply) => {
                    let core = self.clone();
                    tokio::task::spawn_local(async move {
                        let _ = reply.send(core.reclaim_journals().await);
                    });
                }
                MeshMsg::Shutdown => {
                    self.stopping.set(true);
                    self.shutdown.notify_waiters();
                    return;
                }
            }
        }
    }

    /// Parts of this shard to expire now: past the maximum hold, plus parts marked expired
    /// whose report never got through (after a crash or a failure), minus those in progress.
    fn expiry_candidates(&self, now: u64, max_hold: u64) -> Vec<spool::HeldPart> {
        let index = self.index_shard.borrow();
        let mut expiring = self.expiring.borrow_mut();
        let mut out = Vec::new();
        for (id, domain) in index.due_for_expiry(now, max_hold) {
            if let Some(p) = index.get(id, &domain) {
                out.push(p.clone());
            }
        }
        for (domain, stats) in index.all_stats() {
            if stats.expired > 0 {
                out.extend(index.parts(&domain).filter(|p| p.expired).cloned());
            }
        }
        // A part the relay is delivering right now is settled by the relay.
        out.retain(|p| !self.relay.is_busy(&p.domain));
        out.retain(|p| expiring.insert((p.id, p.domain.clone())));
        out
    }

    /// Gauges for every domain this core shards that holds mail or has history.
    fn domain_gauges(&self) -> Vec<metrics::DomainGauge> {
        let index = self.index_shard.borrow();
        let activity = self.activity.borrow();
        let mut gauges: HashMap<DomainName, metrics::DomainGauge> = HashMap::new();
        for (d, s) in index.all_stats() {
            let g = gauges
                .entry(d.clone())
                .or_insert_with(|| metrics::DomainGauge::new(d.as_str()));
            g.held_messages = s.messages;
            g.held_bytes = s.bytes;
            g.oldest_unix = s.oldest;
        }
        for (d, a) in activity.iter() {
            let g = gauges
                .entry(d.clone())
                .or_insert_with(|| metrics::DomainGauge::new(d.as_str()));
            g.last_atrn_unix = a.last_atrn.map(|(t, _)| t);
            g.last_atrn_result = a.last_atrn.map(|(_, r)| r.as_str());
            g.delivered = a.delivered;
            g.deferred = a.deferred;
            g.bounced = a.bounced;
        }
        gauges.into_values().collect()
    }

    /// Leases `domains` (all sharded here) to `session`, all or nothing.
    fn lease(&self, session: u64, domains: &[DomainName]) -> LeaseAnswer {
        let mut leases = self.leases.borrow_mut();
        if let Some(busy) = domains
            .iter()
            .find(|d| leases.get(*d).is_some_and(|s| *s != session))
        {
            return LeaseAnswer::Busy(busy.clone());
        }
        let index = self.index_shard.borrow();
        let mut granted = Vec::with_capacity(domains.len());
        for d in domains {
            leases.insert(d.clone(), session);
            granted.push((d.clone(), index.parts(d).cloned().collect::<Vec<_>>()));
        }
        // In the same step as the locations are handed out: compaction may move these
        // messages during the session, but the segments it reads stay until it ends.
        let locations = granted
            .iter()
            .flat_map(|(_, p)| p.iter().map(|p| &p.location));
        let pin = self.shared.pins.hold(locations);
        self.lease_pins
            .borrow_mut()
            .entry(session)
            .or_default()
            .push(pin);
        LeaseAnswer::Granted(granted)
    }

    async fn append_done(
        &self,
        id: MessageId,
        domain: DomainName,
        outcome: spool::Outcome,
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let Some(journal) = self.journal_of(id) else {
            tracing::error!(%id, core = self.index, "DONE routed to a core without its journal");
            return;
        };
        let shard = self.shard_of(&domain);
        let retire = |ack| MeshMsg::Retire {
            id,
            domain: domain.clone(),
            outcome,
            ack,
        };
        let mut ack = Some(ack);
        let durable = journal.append_done(id, &domain, outcome);
        tokio::pin!(durable);
        let res = tokio::select! {
            r = &mut durable => r,
            _ = tokio::time::sleep(DONE_PATIENCE) => {
                // The DONE waits for disk space. The customer has the message: take the part
                // out of the index now, so the next ATRN does not send it again.
                tracing::warn!(%id, %domain, "DONE waits for disk space; the part leaves the index now");
                self.shared.mesh.send(shard, retire(ack.take().flatten()));
                durable.await
            }
        };
        if let Err(e) = &res {
            // The part is finished in this process (never offered again until a restart),
            // but its record is not on disk: after a restart it is held again, a duplicate at
            // worst, never a loss.
            self.metrics.borrow_mut().store_mut().dones_unrecorded += 1;
            tracing::error!(%id, %domain, error = %e, "could not record DONE; the part leaves the index but stays on disk and will be offered again after a restart");
        }
        if let Some(ack) = ack {
            self.shared.mesh.send(shard, retire(ack));
        }
    }

    /// Appends a SETTLE (on the writer core of `id`), then narrows the part on its shard.
    async fn append_settle(
        &self,
        id: MessageId,
        domain: DomainName,
        recipients: Vec<(u32, spool::Outcome)>,
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let Some(journal) = self.journal_of(id) else {
            tracing::error!(%id, core = self.index, "SETTLE routed to a core without its journal");
            return;
        };
        let shard = self.shard_of(&domain);
        let settled = |ack| MeshMsg::Settled {
            id,
            domain: domain.clone(),
            indices: recipients.iter().map(|(i, _)| *i).collect(),
            ack,
        };
        let mut ack = Some(ack);
        let durable = journal.append_settle(id, &domain, &recipients);
        tokio::pin!(durable);
        // As for a DONE: a SETTLE that waits for disk space, or fails, still narrows the part
        // in this process, so the finished recipients are not sent again before a restart.
        let res = tokio::select! {
            r = &mut durable => r,
            _ = tokio::time::sleep(DONE_PATIENCE) => {
                tracing::warn!(%id, %domain, "SETTLE waits for disk space; the part is narrowed now");
                self.shared.mesh.send(shard, settled(ack.take().flatten()));
                durable.await
            }
        };
        if let Err(e) = &res {
            self.metrics.borrow_mut().store_mut().dones_unrecorded += 1;
            tracing::error!(%id, %domain, error = %e, "could not record SETTLE; the recipients leave the index but stay on disk and will be offered again after a restart");
        }
        if let Some(ack) = ack {
            self.shared.mesh.send(shard, settled(ack));
        }
    }

    /// Expires a part (on its writer core): EXPIRE record, report to the sender, DONE. Each
    /// step is durable before the next, so a crash in between resumes from the EXPIRE mark.
    async fn expire(&self, part: spool::HeldPart) {
        let (id, domain) = (part.id, part.domain.clone());
        let shard = self.shard_of(&domain);
        let failed = |why: &str| {
            tracing::error!(%id, %domain, why, "expiry not finished; retried at the next scan");
            let msg = MeshMsg::ExpireFailed {
                id,
                domain: domain.clone(),
            };
            self.shared.mesh.send(shard, msg);
        };
        let Some(journal) = self.journal_of(id) else {
            return failed("routed to a core without its journal");
        };
        if !part.expired {
            if let Err(e) = journal.append_expire(id, &domain).await {
                return failed(&e.to_string());
            }
            let msg = MeshMsg::Expired {
                id,
                domain: domain.clone(),
            };
            self.shared.mesh.send(shard, msg);
        }
        let envelope = match self.reader.read_message(&part.location).await {
            Ok(meta) => meta.envelope,
            Err(e) => return failed(&e.to_string()),
        };
        let days = self.shared.config.spool.max_hold.as_secs() / 86_400;
        let failures: Vec<report::Failure> = part
            .recipients
            .iter()
            .map(|r| report::Failure {
                recipient: r.clone(),
                status: EnhancedStatus::new(5, 4, 7),
                diagnostic: format!(
                    "held {days} days for {domain} without being collected (ATRN); giving up"
                ),
            })
            .collect();
        let loc = &part.location;
        let reported =
            report::queue_failure(self, id, loc, part.received_at, &envelope, &failures).await;
        if !reported {
            return failed("report not stored");
        }
        self.metrics.borrow_mut().message_expired();
        self.append_done(id, domain, spool::Outcome::ExpiredBounced, None)
            .await;
    }

    /// Periodic work: expire parts held too long (this core's shard) and reclaim journal
    /// space (this core's journals), until shutdown.
    pub async fn run_maintenance(self: Rc<Self>, every: std::time::Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // While a journal is short of space, deleting what deliveries finished is what brings
        // new mail back: reclaim every second then, not at the slow pace.
        let mut space_tick = tokio::time::interval(SPACE_RECLAIM);
        space_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = space_tick.tick() => {
                    if self.journals().any(|j| j.short_of_space()) {
                        self.reclaim_journals().await;
                    }
                    continue;
                }
                _ = self.stopped() => return,
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let max_hold = self.shared.config.spool.max_hold.as_secs();
            for part in self.expiry_candidates(now, max_hold) {
                self.shared
                    .mesh
                    .send(self.writer_of(part.id), MeshMsg::Expire(part));
            }
            self.reclaim_journals().await;
        }
    }

    /// Deletes dead segments and compacts, in this core's journals; tells the shard cores
    /// where compaction moved their parts. Returns (deleted, compacted, moved).
    async fn reclaim_journals(&self) -> (usize, usize, usize) {
        let mut totals = (0, 0, 0);
        for journal in self.journals() {
            match journal.reclaim().await {
                Ok(mut report) => {
                    totals.0 += report.deleted.len();
                    totals.1 += usize::from(report.compacted.is_some());
                    totals.2 += report.relocated.len();
                    for f in std::mem::take(&mut report.damaged) {
                        super::quarantine::quarantine(self, f.id, f.domains, &f.reason);
                    }
                    if !report.deleted.is_empty() || report.compacted.is_some() {
                        tracing::info!(
                            core = self.index,
                            deleted = report.deleted.len(),
                            compacted = ?report.compacted,
                            moved = report.relocated.len(),
                            "journal space reclaimed"
                        );
                    }
                    let mut applied = Vec::new();
                    for moved in report.relocated {
                        for domain in moved.domains {
                            let shard = self.shard_of(&domain);
                            let (ack, done) = tokio::sync::oneshot::channel();
                            applied.push(done);
                            let msg = MeshMsg::Relocated {
                                id: moved.id,
                                domain,
                                location: moved.location,
                                ack: Some(ack),
                            };
                            self.shared.mesh.send(shard, msg);
                        }
                    }
                    // The compacted segment is deleted by a later reclaim, and only once every
                    // shard hands out the new locations (sessions that got the old ones hold
                    // pins on it).
                    let all = async {
                        for done in applied {
                            let _ = done.await;
                        }
                    };
                    if tokio::time::timeout(RELOCATE_TIMEOUT, all).await.is_err() {
                        tracing::warn!(core = self.index, "shards slow to apply relocations");
                    }
                }
                Err(e) => {
                    tracing::warn!(core = self.index, error = %e, "journal reclaim failed")
                }
            }
        }
        totals
    }

    /// The background scrub of this core's journals (see [`spool::Scrub`]): re-checks the
    /// held mail of older segments at `spool.scrub_rate` bytes per second, quarantines what
    /// fails, reports each pass in the log and the metrics, pauses `spool.scrub_interval`
    /// between passes. The first pass starts a minute after start (sooner with a shorter
    /// interval).
    pub async fn run_scrub(self: Rc<Self>) {
        let rate = self.shared.config.spool.scrub_rate;
        if rate == 0 {
            return;
        }
        let interval = self.shared.config.spool.scrub_interval;
        // A quarter of a second's worth per step: reads stay small next to the sessions.
        let budget = (rate / 4).max(64 << 10);
        let mut pause = interval.min(std::time::Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.stopped() => return,
            }
            pause = interval;
            for journal in self.journals() {
                let mut scrub = spool::Scrub::default();
                loop {
                    let step = journal.scrub_step(&mut scrub, budget).await;
                    {
                        let mut m = self.metrics.borrow_mut();
                        let s = m.store_mut();
                        s.scrub_bytes += step.bytes;
                        s.scrub_damaged += step.damaged.len() as u64;
                    }
                    for f in step.damaged {
                        super::quarantine::quarantine(&self, f.id, f.domains, &f.reason);
                    }
                    if let Some(pass) = step.pass_done {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs();
                        let mut m = self.metrics.borrow_mut();
                        m.store_mut().scrub_passes += 1;
                        m.store_mut().scrub_last_pass = Some(now);
                        tracing::info!(
                            core = self.index,
                            journal = journal.status().core,
                            messages = pass.messages,
                            bytes = pass.bytes,
                            damaged = pass.damaged,
                            "journal scrub pass finished"
                        );
                        break;
                    }
                    let wait = std::time::Duration::from_secs_f64(step.bytes as f64 / rate as f64);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stopped() => return,
                    }
                }
            }
        }
    }

    /// Resolves when this core was told to stop.
    pub async fn stopped(&self) {
        if self.stopping.get() {
            return;
        }
        self.shutdown.notified().await;
    }
}

/// The failed-login throttle's limits from `[odmr]`.
fn throttle_config(o: &crate::config::OdmrSettings) -> crate::proto::throttle::ThrottleConfig {
    crate::proto::throttle::ThrottleConfig {
        initial_delay: o.auth_failure_delay,
        max_delay: o.auth_max_delay,
        account_max_delay: o.auth_account_max_delay,
        max_client_failures: o.auth_failures_per_client,
        max_ip_failures: o.auth_failures_per_address,
        ..Default::default()
    }
}

/// Sends a retirement acknowledgement when dropped, i.e. after the index was updated.
struct AckOnDrop(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for AckOnDrop {
    fn drop(&mut self) {
        if let Some(ack) = self.0.take() {
            let _ = ack.send(());
        }
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Core({})", self.index)
    }
}

/// What happened to one domain since start, kept on its shard core.
#[derive(Debug, Default, Clone, Copy)]
struct Activity {
    last_atrn: Option<(u64, metrics::AtrnResult)>,
    delivered: u64,
    deferred: u64,
    bounced: u64,
}

/// The SMTP reply for a journal append that failed: a full disk is `452 4.3.1` (RFC 3463:
/// mail system full), anything else `451 4.3.0`.
pub fn storage_reply(e: &spool::Error) -> Reply {
    if e.is_no_space() {
        Reply::with_status(
            452,
            (4, 3, 1),
            "Insufficient system storage, try again later",
        )
    } else {
        Reply::with_status(451, (4, 3, 0), "Temporary storage failure, try again later")
    }
}

impl Directory for Core {
    fn check_rcpt(&self, rcpt: &Mailbox, declared_size: Option<u64>) -> RcptVerdict {
        if let Some(refusal) = self.storage_refusal() {
            return RcptVerdict::Reject(refusal);
        }
        let Ok(domain) = DomainName::parse(&rcpt.domain) else {
            return RcptVerdict::Reject(relay_refused(&rcpt.domain));
        };
        // RFC 5321 §4.5.1: <Postmaster> (which the machine qualifies with our host name) MUST
        // be accepted. It is held under our own name, like a hosted domain, until the
        // operator's account collects it.
        if rcpt.local.eq_ignore_ascii_case("postmaster")
            && domain == self.shared.config.server.hostname
        {
            return RcptVerdict::Accept;
        }
        let hosted = self.hosted.borrow();
        let Some(entry) = hosted.get(&domain) else {
            return RcptVerdict::Reject(relay_refused(domain.as_str()));
        };
        let size = declared_size.unwrap_or(0);
        if size > entry.quota {
            return RcptVerdict::Reject(Reply::with_status(
                552,
                (5, 2, 2),
                format!("Message larger than the hold quota of {domain}"),
            ));
        }
        let held = entry
            .counters
            .held_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if held.saturating_add(size) > entry.quota {
            return RcptVerdict::Reject(Reply::with_status(
                452,
                (4, 2, 2),
                format!("Held mail for {domain} is over quota, try again later"),
            ));
        }
        RcptVerdict::Accept
    }

    fn check_sender(&self, account: &str, sender: Option<&Mailbox>) -> Result<(), Reply> {
        super::submit::check_sender(self, account, sender)
    }

    fn check_submit_rcpt(
        &self,
        account: &str,
        rcpt: &Mailbox,
        accepted: usize,
        declared_size: Option<u64>,
    ) -> RcptVerdict {
        if let Some(refusal) = self.storage_refusal() {
            return RcptVerdict::Reject(refusal);
        }
        super::submit::check_rcpt(self, account, rcpt, accepted, declared_size)
    }
}

fn relay_refused(domain: &str) -> Reply {
    Reply::with_status(
        550,
        (5, 7, 1),
        format!("Relaying denied: {domain} is not hosted here"),
    )
}
