//! The inbound session driver: binds one [`Inbound`] machine to one connection, on the MX
//! listener, the ODMR listener (RFC 2645: EHLO, AUTH, submitted mail, ATRN, then the reversal)
//! and the submission listeners (RFC 6409: EHLO, AUTH, submitted mail).
//!
//! The loop is the one every driver here follows: feed all buffered input to the machine, carry
//! out the actions it asks for (store a message, start TLS, close) and the ODMR decisions it
//! raises (throttle an AUTH, decide an ATRN), flush its replies only when it needs more input
//! (so a pipelined batch gets its replies in one write, RFC 2920), then read until the current
//! request's deadline ([`RequestClock`]: a whole command line within `idle_timeout`, a data
//! transfer at `min_data_rate` at least; a slowloris client cannot stretch either). The
//! machine never sees a socket, the driver never parses SMTP.
//!
//! Message bodies go to the journal through [`Ingest`]: small ones whole, big ones in chunks
//! while they arrive. A 250 for a message is written only after [`Ingest::deliver`] returned,
//! and that returns only after its record was fdatasync'ed. A 250 to ATRN is written only once
//! the leases are held and the index said there is mail; the reversal then runs on this
//! connection, outside the session time limit (it has its own per-reply timeouts).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::AtrnResult;
use crate::proto::inbound::{Action, AtrnDecision, Inbound, OdmrConfig, OdmrEvent, SessionContext};
use crate::proto::throttle::Verdict as Throttled;
use crate::runtime::conn::Conn;
use crate::runtime::deadline::RequestClock;

use super::atrn::{self, Leases, Verdict};
use super::core::{Core, MeshMsg};
use super::ingest::Ingest;
use super::{reversal, submit};

/// Bytes asked for per socket read. Small messages fit whole; big ones stream through.
const READ_CHUNK: usize = 64 * 1024;

/// Which listener a session came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Mail for hosted domains.
    Mx,
    /// ODMR: AUTH, submitted mail and ATRN.
    Odmr,
    /// Submission (587 STARTTLS, 465 implicit TLS): AUTH and submitted mail.
    Submission,
}

/// Why a session ended, for the log line.
#[derive(Debug)]
enum End {
    Quit,
    PeerClosed,
    IdleTimeout,
    DataTooSlow,
    SessionTimeout,
    Io(std::io::Error),
    /// ATRN was granted: run the reversal with these leases.
    Reverse(Leases),
}

/// Serves one connection until QUIT, timeout or error (and, on ODMR, through the reversal).
pub async fn serve(core: Rc<Core>, conn: Conn, peer: SocketAddr, kind: Kind) {
    let session_limit = core.shared.config.limits.session_timeout;
    let mut conn = conn;
    let ended = match tokio::time::timeout(session_limit, run(&core, &mut conn, peer, kind)).await {
        Ok(end) => end,
        Err(_) => End::SessionTimeout,
    };
    match ended {
        End::Reverse(mut leases) => {
            reversal::run(&core, &mut conn, peer, &mut leases).await;
            drop(leases);
            conn.close().await;
            return;
        }
        End::SessionTimeout => {
            let text = b"421 4.4.2 Session time limit reached, closing connection\r\n";
            let _ = conn.write_owned(text.to_vec()).await;
        }
        _ => {}
    }
    conn.close().await;
    match ended {
        End::Quit | End::PeerClosed => tracing::debug!(%peer, ?kind, ?ended, "session ended"),
        End::Io(e) => tracing::info!(%peer, ?kind, error = %e, "session ended by an I/O error"),
        _ => tracing::info!(%peer, ?kind, ?ended, "session ended"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fresh randomness, time and TLS facts for the SASL exchanges of this connection.
fn context(conn: &Conn) -> SessionContext {
    let mut random = [0u8; 32];
    let _ = getrandom::fill(&mut random);
    SessionContext {
        random,
        unix_time: unix_now(),
        tls_exporter: conn.channel_binding(),
        peer_identity: conn.peer_fingerprint(),
    }
}

async fn run(core: &Rc<Core>, conn: &mut Conn, peer: SocketAddr, kind: Kind) -> End {
    let idle = core.shared.config.limits.idle_timeout;
    let hosted = core.hosted.borrow().clone();
    // The submission listeners authenticate exactly like the ODMR listener.
    let auth = || {
        let mut auth = OdmrConfig::new(core.shared.auth_secret);
        auth.allow_plaintext_auth = core.shared.config.odmr.allow_plaintext_auth;
        auth.cram_md5_requires_tls = core.shared.config.odmr.cram_md5_requires_tls;
        auth
    };
    let cfg = core.inbound_config(conn.is_tls());
    let mut machine = match kind {
        Kind::Mx => Inbound::new(cfg),
        Kind::Odmr => Inbound::new_odmr(cfg, auth(), context(conn)),
        Kind::Submission => Inbound::new_submission(cfg, auth(), context(conn)),
    };
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut pos = 0usize;
    // The message being streamed to the journal; dropping it (the session ends) removes it.
    let mut ingest = Ingest::default();
    let min_rate = core.shared.config.limits.min_data_rate;
    let mut clock = RequestClock::new(idle, min_rate, Instant::now());
    // A command was consumed or an action or decision carried out since the last read: the
    // session is ready for its next request, whose deadline starts now.
    let mut progressed = false;
    loop {
        let used = match kind {
            Kind::Mx => machine.handle_input(&input[pos..], &**core),
            Kind::Odmr | Kind::Submission => {
                machine.handle_odmr_input(&input[pos..], &**core, &*hosted)
            }
        };
        pos += used;
        progressed |= used > 0;
        while let Some(action) = machine.poll_action() {
            progressed = true;
            match action {
                Action::Deliver(incoming) => {
                    let submitted = incoming.account.clone();
                    let rcpts = incoming.envelope.recipients.len();
                    let result = ingest.deliver(core, incoming, peer).await;
                    if let (Some(account), Ok(id)) = (&submitted, &result) {
                        submit::record(core, account, rcpts);
                        tracing::info!(%peer, %account, %id, rcpts, "submitted");
                    }
                    machine.stored(result);
                }
                Action::StoreChunk(bytes) => ingest.chunk(core, &mut machine, bytes, peer).await,
                Action::DiscardChunks => ingest.discard().await,
                Action::StartTls => {
                    if let Err(e) = flush(core, conn, &mut machine, peer).await {
                        return End::Io(e);
                    }
                    // RFC 3207 §4.2: plaintext pipelined after STARTTLS must not be acted on
                    // once the channel is secure (the command-injection class).
                    if pos < input.len() {
                        let bytes = input.len() - pos;
                        tracing::warn!(%peer, bytes, "discarding plaintext pipelined after STARTTLS");
                    }
                    input.clear();
                    pos = 0;
                    // Only the authenticating listeners ask for a client certificate (EXTERNAL).
                    let tls = match kind {
                        Kind::Mx => core.shared.tls.clone(),
                        _ => core.shared.tls_client_certs.clone(),
                    };
                    let Some(tls) = tls else {
                        return End::Io(std::io::Error::other("STARTTLS without a TLS config"));
                    };
                    match tokio::time::timeout(idle, conn.start_tls_server(tls)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::info!(%peer, error = %e, "TLS handshake failed");
                            return End::Io(e);
                        }
                        Err(_) => return End::IdleTimeout,
                    }
                    machine.tls_started();
                    if kind != Kind::Mx {
                        machine.set_context(context(conn));
                    }
                }
                Action::Close => {
                    let _ = flush(core, conn, &mut machine, peer).await;
                    return End::Quit;
                }
            }
        }
        if let Some(event) = machine.poll_event() {
            progressed = true;
            match event {
                OdmrEvent::AuthSucceeded { account } => {
                    let refusal = throttle(core, peer, Some(&account), false).await;
                    if refusal.is_none() {
                        core.throttle
                            .borrow_mut()
                            .record_success(peer.ip(), &account);
                        core.metrics.borrow_mut().auth_succeeded();
                        tracing::info!(%peer, %account, "authenticated");
                    }
                    machine.auth_checked(refusal);
                }
                OdmrEvent::AuthFailed { account } => {
                    core.metrics.borrow_mut().auth_failed();
                    tracing::info!(%peer, account = account.as_deref().unwrap_or("-"), "authentication failed");
                    let refusal = throttle(core, peer, account.as_deref(), true).await;
                    machine.auth_checked(refusal);
                }
                OdmrEvent::Atrn { account, domains } => {
                    let started = Instant::now();
                    let (decision, leases, result) = decide(core, &account, &domains).await;
                    core.metrics
                        .borrow_mut()
                        .record_atrn(result, started.elapsed());
                    note_atrn(core, &account, &domains, result);
                    tracing::info!(%peer, %account, ?domains, result = result.as_str(), "ATRN");
                    machine.atrn_decided(decision);
                    if let Some(leases) = leases {
                        if let Err(e) = flush(core, conn, &mut machine, peer).await {
                            return End::Io(e);
                        }
                        return End::Reverse(leases);
                    }
                }
                OdmrEvent::Reverse => {
                    // Reached only if the leases were lost above; nothing to deliver then.
                    let _ = flush(core, conn, &mut machine, peer).await;
                    return End::Quit;
                }
            }
            continue;
        }
        if machine.is_closed() {
            let _ = flush(core, conn, &mut machine, peer).await;
            return End::Quit;
        }
        // Keep the unread tail at the front so the buffer never grows without bound.
        if pos > 0 && (pos == input.len() || pos > READ_CHUNK) {
            input.drain(..pos);
            pos = 0;
        }
        if used > 0 && pos < input.len() {
            // The machine made progress and has input left: give it another turn before
            // flushing, so a pipelined batch is answered in one write.
            continue;
        }
        if let Err(e) = flush(core, conn, &mut machine, peer).await {
            return End::Io(e);
        }
        if machine.is_reading_body() {
            // Body bytes consumed are not a new request: the transfer keeps its clock.
            if !clock.in_body() {
                clock.body(Instant::now());
            }
        } else if std::mem::take(&mut progressed) || clock.in_body() {
            clock.command(Instant::now());
        }
        let deadline = tokio::time::Instant::from_std(clock.deadline());
        let read = conn.read_append(&mut input, READ_CHUNK);
        match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(0)) => return End::PeerClosed,
            Ok(Ok(n)) => clock.received(n, Instant::now()),
            Ok(Err(e)) => return End::Io(e),
            Err(_) if machine.is_reading_body() => {
                machine.data_too_slow();
                let _ = flush(core, conn, &mut machine, peer).await;
                return End::DataTooSlow;
            }
            Err(_) => {
                machine.timed_out();
                let _ = flush(core, conn, &mut machine, peer).await;
                return End::IdleTimeout;
            }
        }
    }
}

/// Asks the core's failed-login throttle about this attempt (recording it first when it
/// failed) and waits out any delay it imposes.
async fn throttle(
    core: &Core,
    peer: SocketAddr,
    account: Option<&str>,
    failed: bool,
) -> Option<crate::proto::throttle::Refusal> {
    let now = unix_now();
    if failed {
        core.throttle
            .borrow_mut()
            .record_failure(peer.ip(), account, now);
    }
    let verdict = core.throttle.borrow().check(peer.ip(), account, now);
    match verdict {
        Throttled::Allow => None,
        Throttled::Delay(d) => {
            tokio::time::sleep(d).await;
            None
        }
        Throttled::Refuse(r) => {
            tracing::warn!(%peer, account = account.unwrap_or("-"), ?r, "login throttled");
            Some(r)
        }
    }
}

/// Runs the ATRN decision and maps it onto the machine's answer and the metrics label.
async fn decide(
    core: &Rc<Core>,
    account: &str,
    domains: &[crate::types::DomainName],
) -> (AtrnDecision, Option<Leases>, AtrnResult) {
    if !core.shared.atrn_allowed(account) {
        return (AtrnDecision::RateLimited, None, AtrnResult::RateLimited);
    }
    let session = core.shared.next_session();
    match atrn::decide(core, session, account, domains).await {
        Verdict::Granted(leases) => (AtrnDecision::Accepted, Some(leases), AtrnResult::Accepted),
        Verdict::NotAuthorized(d) => (
            AtrnDecision::NotAuthorized(d),
            None,
            AtrnResult::NotAuthorized,
        ),
        Verdict::NoMail => (AtrnDecision::NoMail, None, AtrnResult::NoMail),
        Verdict::Busy(d) => (AtrnDecision::Busy(d), None, AtrnResult::Busy),
        Verdict::Unavailable => (AtrnDecision::Unavailable, None, AtrnResult::Unavailable),
    }
}

/// Records the ATRN on each domain's shard core, for the per-domain metrics.
fn note_atrn(core: &Core, account: &str, domains: &[crate::types::DomainName], result: AtrnResult) {
    let asked: Vec<_> = if domains.is_empty() {
        core.hosted.borrow().domains_of(account).to_vec()
    } else {
        domains.to_vec()
    };
    let at = unix_now();
    for (shard, domains) in core.by_shard(asked) {
        core.shared.mesh.send(
            shard,
            MeshMsg::AtrnNoted {
                domains,
                result,
                at,
            },
        );
    }
}

/// Writes the machine's queued replies and logs every 4xx/5xx line: a refusal is always
/// explained in the log, whatever part of the machine produced it.
async fn flush(
    core: &Core,
    conn: &mut Conn,
    machine: &mut Inbound,
    peer: SocketAddr,
) -> std::io::Result<()> {
    if machine.output().is_empty() {
        return Ok(());
    }
    for line in machine.output().split(|b| *b == b'\n') {
        if matches!(line.first(), Some(b'4' | b'5')) && line.get(3) == Some(&b' ') {
            let text = String::from_utf8_lossy(line);
            if let Some(code) = text.get(..3).and_then(|c| c.parse().ok()) {
                core.metrics.borrow_mut().reply_sent(code);
            }
            tracing::info!(%peer, reply = %text.trim_end(), "refused");
        }
    }
    conn.flush_buffer(machine.output()).await
}
