//! What one core owns: its journal writer, its shard of the domain index, its copy of the
//! hosted-domain snapshot, and the mesh receiver that applies work other cores send it.
//!
//! Ownership rules (DESIGN.md "Cross-core mesh"): a message is written by the core whose session
//! received it; each domain part is indexed on the domain's shard core
//! (`shard_hash(domain) % cores`); nothing here is shared mutably across cores. The only
//! cross-core state is the mesh itself and the relaxed quota counters in [`Hosted`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::proto::inbound::{Directory, InboundConfig, Incoming, RcptVerdict};
use crate::proto::reply::Reply;
use crate::proto::trace;
use crate::runtime::limiter::Limiter;
use crate::runtime::mesh::Mesh;
use crate::runtime::IoKind;
use crate::spool;
use crate::types::{DomainName, Mailbox, MessageId};

use super::hosted::{CounterTable, Hosted};

/// Work one core sends another.
pub enum MeshMsg {
    /// A committed message part for a domain this core shards: index it.
    Held(spool::HeldPart),
    /// A snapshot of the queue for the control socket.
    Query(Query, std::sync::mpsc::Sender<QueryAnswer>),
    /// New hosted-domain snapshot after a reload.
    Reload(Arc<Hosted>),
    /// Stop accepting and wind down.
    Shutdown,
}

/// Questions the control socket asks every core.
#[derive(Clone, Debug)]
pub enum Query {
    /// Per-domain totals of this core's shard.
    Summary,
    /// The held parts of one domain (only its shard core answers with data).
    Domain(DomainName),
}

/// A core's answer to a [`Query`].
pub enum QueryAnswer {
    /// Totals per domain.
    Summary(Vec<(DomainName, spool::DomainStats)>),
    /// The parts of one domain.
    Domain(Vec<spool::HeldPart>),
}

/// State shared by all cores, read-only after start.
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// The cross-core mesh.
    pub mesh: Arc<Mesh<MeshMsg>>,
    /// Connection admission.
    pub limiter: Arc<Limiter>,
    /// TLS server config for STARTTLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Quota counters by domain.
    pub counters: Arc<CounterTable>,
    /// The I/O driver every core runs.
    pub io: IoKind,
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
    /// The index of the domains this core shards.
    pub index_shard: RefCell<spool::DomainIndex>,
    next_seq: Cell<u64>,
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
        index_shard: spool::DomainIndex,
    ) -> Rc<Core> {
        // Random start so ids stay unique across restarts even within one millisecond.
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Rc::new(Core {
            index,
            shared,
            hosted: RefCell::new(hosted),
            journal,
            index_shard: RefCell::new(index_shard),
            next_seq: Cell::new(u64::from_le_bytes(seed) >> 16),
            shutdown: tokio::sync::Notify::new(),
            stopping: Cell::new(false),
        })
    }

    /// The core that shards `domain`.
    pub fn shard_of(&self, domain: &DomainName) -> usize {
        (domain.shard_hash() % self.shared.mesh.cores() as u64) as usize
    }

    fn new_id(&self, now_ms: u64) -> MessageId {
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
        }
    }

    /// Writes an accepted message to this core's journal (returns after fdatasync), then
    /// hands each domain part to its shard core. The result feeds `Inbound::stored`.
    pub async fn store(&self, incoming: Incoming, peer: SocketAddr) -> Result<String, Reply> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let id = self.new_id(now.as_millis() as u64);
        let received = trace::received(&trace::Trace {
            host: self.shared.config.server.hostname.as_str(),
            helo: &incoming.helo,
            peer_ip: &peer.ip().to_string(),
            protocol: incoming.protocol,
            recipient: single_recipient(&incoming),
            id: &id.to_string(),
            unix_secs: now.as_secs(),
        });
        let mut body = Vec::with_capacity(received.len() + incoming.body.len());
        body.extend_from_slice(received.as_bytes());
        body.extend_from_slice(&incoming.body);
        drop(incoming.body);
        let received_at = now.as_secs();
        let env = &incoming.envelope;
        let stored = self
            .journal
            .append_message(id, received_at, env, &body)
            .await;
        drop(body);
        match stored {
            Ok(location) => {
                for part in spool::HeldPart::for_message(id, received_at, env, location) {
                    let shard = self.shard_of(&part.domain);
                    self.shared.mesh.send(shard, MeshMsg::Held(part));
                }
                tracing::info!(%id, %peer, sender = ?incoming.envelope.sender.as_ref().map(|m| m.to_string()), rcpts = incoming.envelope.recipients.len(), "held");
                Ok(id.to_string())
            }
            Err(e) => {
                tracing::error!(%id, %peer, error = %e, "journal append failed; answering 451");
                Err(Reply::with_status(
                    451,
                    (4, 3, 0),
                    "Temporary storage failure, try again later",
                ))
            }
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
                    self.index_shard.borrow_mut().insert(part);
                }
                MeshMsg::Query(q, reply) => {
                    let idx = self.index_shard.borrow();
                    let answer = match q {
                        Query::Summary => QueryAnswer::Summary(idx.all_stats()),
                        Query::Domain(d) => QueryAnswer::Domain(idx.parts(&d).cloned().collect()),
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
                }
                MeshMsg::Shutdown => {
                    self.stopping.set(true);
                    self.shutdown.notify_waiters();
                    return;
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

fn single_recipient(incoming: &Incoming) -> Option<&Mailbox> {
    match incoming.envelope.recipients.as_slice() {
        [one] => Some(&one.mailbox),
        _ => None,
    }
}

impl Directory for Core {
    fn check_rcpt(&self, rcpt: &Mailbox, declared_size: Option<u64>) -> RcptVerdict {
        let Ok(domain) = DomainName::parse(&rcpt.domain) else {
            return RcptVerdict::Reject(relay_refused(&rcpt.domain));
        };
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
}

fn relay_refused(domain: &str) -> Reply {
    Reply::with_status(
        550,
        (5, 7, 1),
        format!("Relaying denied: {domain} is not hosted here"),
    )
}
