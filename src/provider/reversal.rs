//! The reversal (RFC 2645 §4, DESIGN.md "ATRN, step by step" 4-5): after its 250 to ATRN the
//! provider is the SMTP client on the same connection and delivers everything held for the
//! leased domains, driving the sans-IO [`Reversed`] machine.
//!
//! - Each message carries only the recipients of the leased domains, also when it was stored
//!   once for several domains (another customer's recipients never leak).
//! - When the customer offers PIPELINING and CHUNKING, messages travel in the machine's window:
//!   `[RSET] MAIL RCPT... BDAT n LAST` and the body go out together, many messages per
//!   write, replies matched in order. Small messages (up to
//!   [`crate::proto::reversed::PIPELINE_BODY_MAX`]) are read whole from the journal in
//!   batches, one read per run of back-to-back records. Larger bodies stream from the
//!   journal file to the socket in chunks (through rustls when TLS is on): raw after
//!   `BDAT <len> LAST`, or dot-stuffed on the fly after DATA's 354. A large message is never
//!   whole in memory.
//! - Per recipient ([`super::outcome`]): 2xx retired, 4xx stays held for that recipient alone,
//!   5xx reported to the sender and retired; a part ends with a DONE once none of its
//!   recipients is held, else a SETTLE records the finished ones. Whatever is not acknowledged
//!   when the connection drops stays held.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::metrics::DeliveryOutcome;
use crate::proto::reply::{EnhancedStatus, Reply};
use crate::proto::reversed::{
    Action, BodyFraming, CloseReason, MessageOutcome, Outgoing, Reversed, ReversedConfig,
    PIPELINE_BODY_MAX,
};
use crate::proto::stuff::DotStuffer;
use crate::runtime::conn::Conn;
use crate::spool::{self, HeldPart, Location};
use crate::types::{BodyType, Envelope, MessageId, Recipient};

use super::atrn::Leases;
use super::core::{Core, MeshMsg};
use super::outcome;
use super::report::{self, Failure};

/// How long the end of a session waits for its DONE records to be retired.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Body bytes read from the journal per chunk.
const BODY_CHUNK: usize = 256 * 1024;
/// The first chunk of a streamed body, which shares a write with the command before it.
const FIRST_CHUNK: usize = 32 * 1024;

/// Small messages read ahead from the journal at once (envelope and body of each).
const PREFETCH_MESSAGES: usize = 64;
/// Most bytes read from the journal in one read when prefetching.
const PREFETCH_BYTES: u64 = 1024 * 1024;

/// RFC 5321 §4.5.3.2 client timeouts are minutes; the longest (end of data) bounds every
/// read here.
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// One held message queued for this session, with its leased parts.
struct Queued {
    id: MessageId,
    location: Location,
    received_at: u64,
    /// The leased parts, each with the recipients still held for its domain.
    parts: Vec<HeldPart>,
}

/// What was sent for one message, to map the machine's per-recipient outcome back to parts.
struct InFlight {
    queued: Queued,
    envelope: Envelope,
    /// Envelope recipient index -> part index.
    owner: Vec<usize>,
    started: Instant,
    /// The whole body, when read ahead (small messages); else it streams from the journal.
    body: Option<Vec<u8>>,
}

/// A held message read from the journal: its stored envelope, and the body when small.
struct Loaded {
    meta: spool::MsgMeta,
    body: Option<Vec<u8>>,
}

/// Totals of one reversal, for the log line.
#[derive(Debug, Default)]
pub struct Summary {
    /// Messages whose every leased recipient was accepted.
    pub delivered: u64,
    /// Messages with at least one recipient deferred (still held).
    pub deferred: u64,
    /// Messages bounced (report queued to the sender).
    pub bounced: u64,
    /// Messages skipped because their stored copy is damaged (quarantined).
    pub quarantined: u64,
}

/// Delivers the leased domains' mail over `conn`, then returns (leases are released by the
/// caller dropping them).
pub async fn run(
    core: &Rc<Core>,
    conn: &mut Conn,
    peer: SocketAddr,
    leases: &mut Leases,
) -> Summary {
    let mut queue = build_queue(leases);
    let odmr = &core.shared.config.odmr;
    let linger_until = tokio::time::Instant::now() + odmr.linger_max;
    let cfg = ReversedConfig {
        hostname: core.shared.config.server.hostname.to_string(),
        pipelining: true,
        chunking: true,
    };
    let mut machine = Reversed::new(cfg);
    let mut in_flight: HashMap<String, InFlight> = HashMap::new();
    let mut summary = Summary::default();
    let mut input = Vec::with_capacity(16 * 1024);
    let mut pos = 0;
    let mut next_tag = 0u64;
    // Messages read ahead from the journal, in queue order.
    let mut loaded: VecDeque<(Queued, Result<Loaded, spool::Error>)> = VecDeque::new();
    // Commands and small bodies, written in one go before the next read.
    let mut wire: Vec<u8> = Vec::with_capacity(64 * 1024);
    // A held message could not be read: send nothing more, end the session.
    let mut ending = false;
    // Acknowledgements that delivered parts left the index. The leases are released only after
    // them, so an ATRN right after this session can never be offered the same parts again.
    let mut retiring = Vec::new();
    loop {
        pos += machine.handle_input(&input[pos..]);
        while let Some(action) = machine.poll_action() {
            match action {
                Action::NeedMessage => {
                    // A message whose stored copy is damaged is quarantined and skipped: the
                    // drain goes on with the next one.
                    let next = loop {
                        if loaded.is_empty() && !ending {
                            load_ahead(core, &mut queue, &mut loaded).await;
                        }
                        let next = match loaded.pop_front() {
                            Some(l) if !ending => Some(l),
                            // Messages in flight: let them settle first (the machine asks again).
                            _ if machine.in_flight() > 0 => {
                                machine.no_more();
                                None
                            }
                            _ if ending => {
                                wait_retired(std::mem::take(&mut retiring)).await;
                                machine.no_more();
                                None
                            }
                            // Push mode: wait for new mail for the leased domains, keeping the
                            // session alive with NOOP, until linger_max.
                            _ => match leases.pushed.as_mut() {
                                None => {
                                    // Everything delivered is retired before our QUIT, so the
                                    // customer's next ATRN finds neither the parts nor (after
                                    // the 221) the leases.
                                    wait_retired(std::mem::take(&mut retiring)).await;
                                    machine.no_more();
                                    None
                                }
                                Some(pushed) => {
                                    let keepalive = odmr.linger_keepalive;
                                    match linger(pushed, keepalive, linger_until).await {
                                        Lingered::Mail(part) => {
                                            let q = Queued {
                                                id: part.id,
                                                location: part.location,
                                                received_at: part.received_at,
                                                parts: vec![*part],
                                            };
                                            let l = load(core, &q).await;
                                            Some((q, l))
                                        }
                                        Lingered::Keepalive => {
                                            machine.keepalive();
                                            None
                                        }
                                        Lingered::Done => {
                                            wait_retired(std::mem::take(&mut retiring)).await;
                                            machine.no_more();
                                            None
                                        }
                                    }
                                }
                            },
                        };
                        match next {
                            Some((q, Err(e))) if e.is_damage() => {
                                skip_damaged(core, peer, &q, &e);
                                summary.quarantined += 1;
                            }
                            other => break other,
                        }
                    };
                    match next {
                        Some((q, Ok(l))) => {
                            let (outgoing, flight) = prepare(q, l, next_tag);
                            next_tag += 1;
                            in_flight.insert(outgoing.id.clone(), flight);
                            machine.send(outgoing);
                        }
                        Some((_, Err(e))) => {
                            // Unreadable record: keep it held, tell the operator, end.
                            tracing::error!(%peer, error = %e, "cannot read a held message; it stays held");
                            ending = true;
                            if machine.in_flight() == 0 {
                                wait_retired(std::mem::take(&mut retiring)).await;
                            }
                            machine.no_more();
                        }
                        None => {}
                    }
                }
                Action::SendBody { id, framing } => {
                    let Some(flight) = in_flight.get_mut(&id) else {
                        machine.abort();
                        continue;
                    };
                    // The pending commands (ending with `BDAT n LAST`) go out in the same
                    // write as the body, or its first chunk.
                    wire.append(machine.output());
                    if let Some(body) = flight.body.take() {
                        // Read ahead whole: no journal read here.
                        match framing {
                            BodyFraming::Bdat => wire.extend_from_slice(&body),
                            BodyFraming::Data => {
                                let mut stuffer = DotStuffer::new();
                                stuffer.push(&body, &mut wire);
                                stuffer.finish(&mut wire);
                            }
                        }
                        machine.body_sent();
                        continue;
                    }
                    let head = std::mem::take(&mut wire);
                    let loc = &flight.queued.location;
                    match send_body(core, conn, loc, framing, head).await {
                        Ok(()) => machine.body_sent(),
                        Err(e) => {
                            tracing::warn!(%peer, id = %flight.queued.id, error = %e, "body transfer failed; message stays held");
                            machine.abort();
                        }
                    }
                }
                Action::Delivered(outcome) => {
                    if let Some(flight) = in_flight.remove(&outcome.id) {
                        settle(core, flight, outcome, &mut summary, &mut retiring).await;
                    }
                }
                Action::Close(reason) => {
                    let _ = flush(conn, &mut wire, &mut machine).await;
                    match reason {
                        CloseReason::Done => {
                            tracing::info!(%peer, delivered = summary.delivered, deferred = summary.deferred, bounced = summary.bounced, quarantined = summary.quarantined, "reversal finished");
                        }
                        other => {
                            tracing::info!(%peer, reason = %other, delivered = summary.delivered, "reversal ended early; undelivered mail stays held");
                        }
                    }
                    wait_retired(retiring).await;
                    if summary.delivered == 0 && summary.quarantined > 0 {
                        note_damaged(core, leases);
                    }
                    return summary;
                }
            }
        }
        if pos > 0 && pos == input.len() {
            input.clear();
            pos = 0;
        } else if pos > 64 * 1024 {
            input.drain(..pos);
            pos = 0;
        }
        if flush(conn, &mut wire, &mut machine).await.is_err() {
            machine.abort();
            continue;
        }
        match tokio::time::timeout(REPLY_TIMEOUT, conn.read_append(&mut input, 16 * 1024)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => machine.abort(),
        }
    }
}

/// Reads ahead from the front of `queue`: a batch of small messages whole (few journal reads),
/// or one large message's envelope.
async fn load_ahead(
    core: &Core,
    queue: &mut VecDeque<Queued>,
    loaded: &mut VecDeque<(Queued, Result<Loaded, spool::Error>)>,
) {
    let mut batch = Vec::new();
    let mut bytes = 0u64;
    while let Some(q) = queue.front() {
        let small = q.location.body_len <= PIPELINE_BODY_MAX;
        if !small || batch.len() >= PREFETCH_MESSAGES || bytes + q.location.len > PREFETCH_BYTES {
            if batch.is_empty() {
                let q = queue.pop_front().expect("front exists");
                let l = load(core, &q).await;
                loaded.push_back((q, l));
                return;
            }
            break;
        }
        bytes += q.location.len;
        batch.push(queue.pop_front().expect("front exists"));
    }
    let locs: Vec<Location> = batch.iter().map(|q| q.location).collect();
    let results = core.reader.read_messages(&locs, PREFETCH_BYTES).await;
    for (q, r) in batch.into_iter().zip(results) {
        let l = r.map(|(meta, body)| Loaded {
            meta,
            body: Some(body),
        });
        loaded.push_back((q, l));
    }
}

/// Reads one held message: whole when small, else only its envelope.
async fn load(core: &Core, q: &Queued) -> Result<Loaded, spool::Error> {
    if q.location.body_len <= PIPELINE_BODY_MAX {
        let mut r = core
            .reader
            .read_messages(std::slice::from_ref(&q.location), PREFETCH_BYTES)
            .await;
        let (meta, body) = r.pop().expect("one result per location")?;
        return Ok(Loaded {
            meta,
            body: Some(body),
        });
    }
    let meta = core.reader.read_message(&q.location).await?;
    // Checked before anything is sent: a damaged body found at its end would have to be cut
    // off mid-transfer, and with it the whole session.
    core.reader.verify_body(&q.location).await?;
    Ok(Loaded { meta, body: None })
}

/// A held message that cannot be read intact: quarantine its leased parts (their shard cores
/// log it and keep them for the operator) and go on without it.
fn skip_damaged(core: &Core, peer: SocketAddr, q: &Queued, e: &spool::Error) {
    tracing::error!(%peer, id = %q.id, error = %e, "held message damaged; quarantined and skipped");
    let domains = q.parts.iter().map(|p| p.domain.clone());
    super::quarantine::quarantine(core, q.id, domains, &e.to_string());
}

/// The session was turned around but delivered nothing, only damaged mail: say so in the
/// domains' last ATRN result rather than "accepted".
fn note_damaged(core: &Core, leases: &Leases) {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let domains = leases.parts.iter().map(|(d, _)| d.clone());
    for (shard, domains) in core.by_shard(domains) {
        let result = crate::metrics::AtrnResult::Damaged;
        let msg = MeshMsg::AtrnNoted {
            domains,
            result,
            at,
        };
        core.shared.mesh.send(shard, msg);
    }
}

/// Waits until every part this session finished has left its shard's index (bounded: a
/// DONE that could not be written leaves its part held, and its ack is dropped at once).
async fn wait_retired(retiring: Vec<tokio::sync::oneshot::Receiver<()>>) {
    let all = async {
        for r in retiring {
            let _ = r.await;
        }
    };
    if tokio::time::timeout(RETIRE_TIMEOUT, all).await.is_err() {
        tracing::warn!("parts not retired in time; releasing leases anyway");
    }
}

/// What a lingering session's wait ended with.
enum Lingered {
    /// A new part for a leased domain.
    Mail(Box<HeldPart>),
    /// Time for a NOOP.
    Keepalive,
    /// linger_max reached, or the push channel closed: QUIT.
    Done,
}

/// Waits (idle, after the queue drained) for pushed mail, the keep-alive interval or the
/// linger deadline, whichever comes first.
///
/// It deliberately does not read from the connection meanwhile: an io_uring read that loses
/// the race would still complete in the kernel and swallow the customer's next reply. A
/// customer that hung up is noticed at the next NOOP instead (at most one keep-alive later).
async fn linger(
    pushed: &mut tokio::sync::mpsc::UnboundedReceiver<spool::HeldPart>,
    keepalive: Duration,
    until: tokio::time::Instant,
) -> Lingered {
    tokio::select! {
        part = pushed.recv() => part.map_or(Lingered::Done, |p| Lingered::Mail(Box::new(p))),
        _ = tokio::time::sleep(keepalive) => Lingered::Keepalive,
        _ = tokio::time::sleep_until(until) => Lingered::Done,
    }
}

/// The session's work list: one entry per held message (merged across leased domains), oldest
/// first.
fn build_queue(leases: &Leases) -> VecDeque<Queued> {
    let mut by_id: BTreeMap<(u64, MessageId), Queued> = BTreeMap::new();
    for (domain, parts) in &leases.parts {
        for part in parts {
            if part.expired {
                continue; // waiting for its bounce, no longer deliverable
            }
            let entry = by_id
                .entry((part.received_at, part.id))
                .or_insert_with(|| Queued {
                    id: part.id,
                    location: part.location,
                    received_at: part.received_at,
                    parts: Vec::new(),
                });
            debug_assert_eq!(&part.domain, domain);
            entry.parts.push(part.clone());
        }
    }
    by_id.into_values().collect()
}

/// The stored envelope narrowed to the recipients of `parts`, what the client machine sends
/// for it (`tag` is its id), and for each envelope recipient the index of its part. Shared by
/// the reversal and the outgoing relay.
pub(crate) fn outgoing_for(
    mut envelope: Envelope,
    parts: &[HeldPart],
    body_len: u64,
    tag: u64,
) -> (Outgoing, Envelope, Vec<usize>) {
    let mut recipients = Vec::new();
    let mut owner = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        for r in &part.recipients {
            recipients.push(r.clone());
            owner.push(i);
        }
    }
    envelope.recipients = recipients;
    let utf8_addresses = envelope.sender.as_ref().is_some_and(|m| m.is_utf8())
        || envelope.recipients.iter().any(|r| r.mailbox.is_utf8());
    let outgoing = Outgoing {
        id: tag.to_string(),
        envelope: envelope.clone(),
        size: body_len,
        eight_bit: envelope.body != BodyType::SevenBit,
        utf8_addresses,
    };
    (outgoing, envelope, owner)
}

/// Builds what the machine sends from the stored envelope: only the leased recipients.
fn prepare(q: Queued, loaded: Loaded, tag: u64) -> (Outgoing, InFlight) {
    let (outgoing, envelope, owner) =
        outgoing_for(loaded.meta.envelope, &q.parts, q.location.body_len, tag);
    (
        outgoing,
        InFlight {
            queued: q,
            envelope,
            owner,
            started: Instant::now(),
            body: loaded.body,
        },
    )
}

/// Streams one body from the journal: raw for BDAT, dot-stuffed with its terminator for DATA.
async fn send_body(
    core: &Core,
    conn: &mut Conn,
    location: &Location,
    framing: BodyFraming,
    mut head: Vec<u8>,
) -> Result<(), Box<dyn std::error::Error>> {
    // The first chunk is copied behind the pending command: keep it small.
    let mut stream = core
        .reader
        .body_stream(*location, BODY_CHUNK)
        .with_first_chunk(FIRST_CHUNK);
    let mut stuffer = DotStuffer::new();
    let mut chunk = Vec::with_capacity(BODY_CHUNK);
    let mut wire = Vec::with_capacity(BODY_CHUNK + BODY_CHUNK / 8);
    while let Some(buf) = stream.next_chunk(std::mem::take(&mut chunk)).await? {
        let out = match framing {
            BodyFraming::Bdat if head.is_empty() => buf,
            BodyFraming::Bdat => {
                head.extend_from_slice(&buf);
                chunk = buf;
                std::mem::take(&mut head)
            }
            BodyFraming::Data => {
                wire.clear();
                wire.append(&mut head);
                stuffer.push(&buf, &mut wire);
                chunk = buf;
                std::mem::take(&mut wire)
            }
        };
        let (r, out) = conn.write_owned(out).await;
        r?;
        match framing {
            BodyFraming::Bdat if chunk.capacity() == 0 => chunk = out,
            BodyFraming::Bdat => {}
            BodyFraming::Data => wire = out,
        }
        chunk.clear();
    }
    if matches!(framing, BodyFraming::Bdat) && !head.is_empty() {
        // An empty body: only the command goes out.
        let (r, _) = conn.write_owned(head).await;
        r?;
        return Ok(());
    }
    if let BodyFraming::Data = framing {
        wire.clear();
        wire.append(&mut head); // an empty body: the command, if any, was not sent yet
        stuffer.finish(&mut wire);
        let (r, _) = conn.write_owned(wire).await;
        r?;
    }
    Ok(())
}

/// Applies one message's per-recipient outcome to its parts: the report for the refused
/// recipients first (stored before anything is retired), then a DONE or SETTLE per part.
async fn settle(
    core: &Core,
    flight: InFlight,
    outcome: MessageOutcome,
    summary: &mut Summary,
    retiring: &mut Vec<tokio::sync::oneshot::Receiver<()>>,
) {
    let parts = &flight.queued.parts;
    let id = flight.queued.id;
    let answers = outcome::answers(parts, &flight.owner, &outcome.recipients);
    let failed = outcome::failures(parts, &answers);
    let reported = failed.is_empty() || bounce(core, &flight, &failed).await;
    let mut any_deferred = false;
    for (part, answers) in parts.iter().zip(&answers) {
        let settlement = outcome::settlement(part, answers, reported);
        if settlement.keeps_some() {
            any_deferred = true;
            let msg = MeshMsg::Deferred {
                domain: part.domain.clone(),
            };
            core.shared.mesh.send(core.shard_of(&part.domain), msg);
        }
        retiring.extend(outcome::record(core, id, part, settlement));
    }
    let elapsed = flight.started.elapsed();
    let any_failed = reported && !failed.is_empty();
    let result = if any_deferred {
        summary.deferred += 1;
        DeliveryOutcome::Deferred
    } else if any_failed {
        summary.bounced += 1;
        DeliveryOutcome::Bounced
    } else {
        summary.delivered += 1;
        DeliveryOutcome::Delivered
    };
    core.metrics.borrow_mut().record_delivery(result, elapsed);
    tracing::debug!(%id, ?result, "reversal outcome");
}

/// Queues an RFC 3464 failure report to the sender for the refused recipients. False when it
/// could not be stored (they then stay held).
async fn bounce(core: &Core, flight: &InFlight, failed: &[(Recipient, Reply)]) -> bool {
    let failures: Vec<Failure> = failed
        .iter()
        .map(|(recipient, reply)| Failure {
            recipient: recipient.clone(),
            status: reply.status.unwrap_or(EnhancedStatus::new(5, 0, 0)),
            diagnostic: format!("{} {}", reply.code, reply.lines.join(" ")),
        })
        .collect();
    let q = &flight.queued;
    report::queue_failure(
        core,
        q.id,
        &q.location,
        q.received_at,
        &flight.envelope,
        &failures,
    )
    .await
}

/// Writes the pending bodies and commands in one go.
async fn flush(conn: &mut Conn, wire: &mut Vec<u8>, machine: &mut Reversed) -> std::io::Result<()> {
    wire.append(machine.output());
    conn.flush_buffer(wire).await
}
