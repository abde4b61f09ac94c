//! One outgoing SMTP session toward one host (an MX or the smarthost): connect, optional
//! implicit TLS or STARTTLS (RFC 3207), optional AUTH PLAIN/LOGIN (RFC 4954), then every queued
//! message over the same connection through the [`Reversed`] client machine the ODMR reversal
//! uses (EHLO/HELO, PIPELINING, BDAT or DATA with dot-stuffing, SIZE/8BITMIME/SMTPUTF8
//! prechecks, per-recipient outcomes), then QUIT.
//!
//! STARTTLS and AUTH happen while the machine waits for its first message: the machine has
//! read the greeting and the EHLO reply, and only then does the driver know what the peer
//! offers. After STARTTLS a fresh machine is started and given a stand-in greeting, because the
//! peer sends no new one and RFC 3207 §4.2 requires a new EHLO, which the machine then sends.
//!
//! This module only talks; it returns what happened per message and the caller settles parts
//! (DONE, reports, retry schedule). Nothing here removes mail from the queue.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use base64::Engine as _;

use crate::config::SmarthostTls;
use crate::proto::reply::Reply;
use crate::proto::reversed::{
    Action, BodyFraming, MessageOutcome, Outgoing, Reversed, ReversedConfig,
};
use crate::proto::stuff::DotStuffer;
use crate::provider::core::Core;
use crate::runtime::conn::Conn;
use crate::runtime::io::Stream;
use crate::spool::{self, Location};
use crate::types::{Envelope, MessageId};

use super::reply::{self, Parsed};
use super::route::Target;

/// RFC 5321 §4.5.3.2 timeouts are minutes; the longest (end of data) bounds every read.
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);
/// Greeting and EHLO-phase replies (RFC 5321 §4.5.3.2.1: 5 minutes).
const OPENING_TIMEOUT: Duration = Duration::from_secs(300);
/// Body bytes read from the journal per chunk.
const BODY_CHUNK: usize = 256 * 1024;

/// One queued message for this destination, with its parts (recipient domain -> recipients).
#[derive(Clone, Debug)]
pub struct Queued {
    /// The message.
    pub id: MessageId,
    /// Where it is stored.
    pub location: Location,
    /// Arrival, unix seconds.
    pub received_at: u64,
    /// The parts this session delivers, each with its recipients still queued.
    pub parts: Vec<spool::HeldPart>,
}

/// What a session did with one message.
pub struct Attempted {
    /// The message.
    pub queued: Queued,
    /// The envelope as sent (its recipients are the parts', in order).
    pub envelope: Envelope,
    /// Envelope recipient index -> part index.
    pub owner: Vec<usize>,
    /// The machine's per-recipient outcome.
    pub outcome: MessageOutcome,
}

/// Where each message's outcome goes as soon as the peer answered it, so that a crash later
/// in the session cannot make already accepted messages be sent again.
pub(crate) trait Outcomes {
    /// One message's outcome.
    async fn message(&mut self, target: &Target, attempted: Attempted);
}

/// How the session went.
pub struct SessionEnd {
    /// Messages never offered (the session failed first): try them at the next host.
    pub untried: Vec<Queued>,
    /// Why the session ended early, if it did (connection, TLS, AUTH, greeting).
    pub error: Option<String>,
    /// The STARTTLS handshake failed (the caller may try again in plain text).
    pub tls_failed: bool,
}

/// TLS and AUTH for one session.
#[derive(Clone)]
pub struct Policy {
    /// TLS handling.
    pub tls: SmarthostTls,
    /// TLS client settings.
    pub tls_config: std::sync::Arc<rustls::ClientConfig>,
    /// AUTH user and password.
    pub auth: Option<(String, String)>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
}

/// Runs one session to `target` for `queue`, handing every outcome to `outcomes` at once.
pub(crate) async fn run(
    core: &Core,
    target: &Target,
    policy: &Policy,
    queue: Vec<Queued>,
    outcomes: &mut impl Outcomes,
) -> SessionEnd {
    let mut queue: VecDeque<Queued> = queue.into();
    let mut end = SessionEnd {
        untried: Vec::new(),
        error: None,
        tls_failed: false,
    };
    let connected = tokio::time::timeout(
        policy.connect_timeout,
        Stream::connect(core.shared.io, target.addr),
    )
    .await;
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(end, queue, format!("connect to {}: {e}", target.addr)),
        Err(_) => return fail(end, queue, format!("connect to {}: timed out", target.addr)),
    };
    let mut conn = Conn::plain(stream);
    if policy.tls == SmarthostTls::Implicit {
        if let Err(e) = start_tls(&mut conn, policy, target).await {
            return fail(end, queue, format!("TLS with {}: {e}", target.addr));
        }
    }
    let cfg = ReversedConfig {
        hostname: core.shared.config.server.hostname.to_string(),
        pipelining: true,
        chunking: true,
    };
    let mut machine = Reversed::new(cfg.clone());
    let mut opened = false;
    let mut in_flight: HashMap<String, (Queued, Envelope, Vec<usize>)> = HashMap::new();
    let mut input = Vec::with_capacity(16 * 1024);
    let mut pos = 0;
    let mut next_tag = 0u64;
    loop {
        pos += machine.handle_input(&input[pos..]);
        while let Some(action) = machine.poll_action() {
            match action {
                Action::NeedMessage if !opened => {
                    let step = open(
                        &mut conn,
                        &mut machine,
                        &cfg,
                        policy,
                        target,
                        &mut input,
                        &mut pos,
                    );
                    match step.await {
                        Ok(Opened::Ready) => {
                            opened = true;
                            next(
                                core,
                                &mut machine,
                                &mut queue,
                                &mut in_flight,
                                &mut next_tag,
                            )
                            .await;
                        }
                        Ok(Opened::Restarted) => {}
                        Err(OpenError { why, tls_failed }) => {
                            machine.abort();
                            end.error = Some(why);
                            end.tls_failed = tls_failed;
                        }
                    }
                }
                Action::NeedMessage => {
                    next(
                        core,
                        &mut machine,
                        &mut queue,
                        &mut in_flight,
                        &mut next_tag,
                    )
                    .await;
                }
                Action::SendBody { id, framing } => {
                    let Some((q, _, _)) = in_flight.get(&id) else {
                        machine.abort();
                        continue;
                    };
                    let head = std::mem::take(machine.output());
                    match send_body(core, &mut conn, &q.location, framing, head).await {
                        Ok(()) => machine.body_sent(),
                        Err(e) => {
                            tracing::warn!(host = %target.host, addr = %target.addr, id = %q.id, error = %e, "body transfer failed; message stays queued");
                            machine.abort();
                        }
                    }
                }
                Action::Delivered(outcome) => {
                    if let Some((queued, envelope, owner)) = in_flight.remove(&outcome.id) {
                        let a = Attempted {
                            queued,
                            envelope,
                            owner,
                            outcome,
                        };
                        outcomes.message(target, a).await;
                    }
                }
                Action::Close(reason) => {
                    let _ = conn.flush_buffer(machine.output()).await;
                    conn.close().await;
                    if end.error.is_none()
                        && !matches!(reason, crate::proto::reversed::CloseReason::Done)
                    {
                        end.error = Some(format!("{} ({}): {reason}", target.host, target.addr));
                    }
                    end.untried.extend(queue);
                    return end;
                }
            }
        }
        if pos > 0 && pos == input.len() {
            input.clear();
            pos = 0;
        }
        if conn.flush_buffer(machine.output()).await.is_err() {
            machine.abort();
            continue;
        }
        let wait = if opened {
            REPLY_TIMEOUT
        } else {
            OPENING_TIMEOUT
        };
        match tokio::time::timeout(wait, conn.read_append(&mut input, 16 * 1024)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => machine.abort(),
        }
    }
}

fn fail(mut end: SessionEnd, queue: VecDeque<Queued>, why: String) -> SessionEnd {
    end.untried.extend(queue);
    end.error = Some(why);
    end
}

/// Hands the machine the next message, or tells it the queue is drained.
async fn next(
    core: &Core,
    machine: &mut Reversed,
    queue: &mut VecDeque<Queued>,
    in_flight: &mut HashMap<String, (Queued, Envelope, Vec<usize>)>,
    next_tag: &mut u64,
) {
    loop {
        let Some(q) = queue.pop_front() else {
            machine.no_more();
            return;
        };
        match prepare(core, &q, *next_tag).await {
            Ok((outgoing, envelope, owner)) => {
                *next_tag += 1;
                in_flight.insert(outgoing.id.clone(), (q, envelope, owner));
                machine.send(outgoing);
                return;
            }
            // Unreadable record: it stays queued (and the operator sees the error).
            Err(e) => {
                tracing::error!(id = %q.id, error = %e, "cannot read a queued message; it stays queued")
            }
        }
    }
}

/// The outcome of the opening steps the driver runs itself.
enum Opened {
    /// STARTTLS and AUTH (as configured) are done: send mail.
    Ready,
    /// TLS started; a fresh machine awaits its (stand-in) greeting and will send EHLO again.
    Restarted,
}

/// Why the opening failed.
struct OpenError {
    why: String,
    /// The TLS handshake after `220` to STARTTLS failed.
    tls_failed: bool,
}

impl From<String> for OpenError {
    fn from(why: String) -> OpenError {
        OpenError {
            why,
            tls_failed: false,
        }
    }
}

/// STARTTLS and AUTH, run when the machine first asks for a message.
async fn open(
    conn: &mut Conn,
    machine: &mut Reversed,
    cfg: &ReversedConfig,
    policy: &Policy,
    target: &Target,
    input: &mut Vec<u8>,
    pos: &mut usize,
) -> Result<Opened, OpenError> {
    let caps = machine.capabilities().clone();
    let want_tls = !conn.is_tls()
        && match policy.tls {
            SmarthostTls::StarttlsRequired => true,
            SmarthostTls::Opportunistic => caps.starttls,
            SmarthostTls::Implicit | SmarthostTls::None => false,
        };
    if want_tls {
        if !caps.starttls {
            let why = format!("{} does not offer STARTTLS, which is required", target.host);
            return Err(why.into());
        }
        let r = exchange(conn, b"STARTTLS\r\n".to_vec(), input, pos).await?;
        if r.code == 220 {
            start_tls(conn, policy, target)
                .await
                .map_err(|e| OpenError {
                    why: format!("TLS with {}: {e}", target.host),
                    tls_failed: true,
                })?;
            input.clear();
            *pos = 0;
            *machine = Reversed::new(cfg.clone());
            // RFC 3207 §4.2: no new greeting after TLS; the machine's EHLO follows at once.
            let used = machine.handle_input(b"220 TLS started\r\n");
            debug_assert_eq!(used, 17);
            return Ok(Opened::Restarted);
        }
        if policy.tls == SmarthostTls::StarttlsRequired {
            return Err(format!("STARTTLS refused: {}", reply::one_line(&r)).into());
        }
        tracing::info!(host = %target.host, reply = %reply::one_line(&r), "STARTTLS refused; continuing in plain text");
    }
    if let Some((user, password)) = &policy.auth {
        authenticate(conn, user, password, input, pos).await?;
    }
    Ok(Opened::Ready)
}

/// AUTH PLAIN (RFC 4616), or LOGIN when PLAIN is not implemented by the peer.
async fn authenticate(
    conn: &mut Conn,
    user: &str,
    password: &str,
    input: &mut Vec<u8>,
    pos: &mut usize,
) -> Result<(), String> {
    let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
    let plain = b64(format!("\0{user}\0{password}").as_bytes());
    let r = exchange(
        conn,
        format!("AUTH PLAIN {plain}\r\n").into_bytes(),
        input,
        pos,
    )
    .await?;
    let r = if r.code == 504 {
        let r = exchange(conn, b"AUTH LOGIN\r\n".to_vec(), input, pos).await?;
        if r.code != 334 {
            return Err(format!("AUTH LOGIN refused: {}", reply::one_line(&r)));
        }
        let r = exchange(
            conn,
            format!("{}\r\n", b64(user.as_bytes())).into_bytes(),
            input,
            pos,
        )
        .await?;
        if r.code != 334 {
            return Err(format!("AUTH LOGIN refused: {}", reply::one_line(&r)));
        }
        exchange(
            conn,
            format!("{}\r\n", b64(password.as_bytes())).into_bytes(),
            input,
            pos,
        )
        .await?
    } else {
        r
    };
    if r.code != 235 {
        return Err(format!("authentication refused: {}", reply::one_line(&r)));
    }
    Ok(())
}

/// Sends one command and reads its reply.
async fn exchange(
    conn: &mut Conn,
    command: Vec<u8>,
    input: &mut Vec<u8>,
    pos: &mut usize,
) -> Result<Reply, String> {
    let (r, _) = conn.write_owned(command).await;
    r.map_err(|e| format!("write: {e}"))?;
    loop {
        match reply::parse(&input[*pos..]) {
            Parsed::Reply(r, used) => {
                *pos += used;
                return Ok(r);
            }
            Parsed::Malformed => return Err("malformed reply".into()),
            Parsed::More => {}
        }
        let read = tokio::time::timeout(OPENING_TIMEOUT, conn.read_append(input, 4096)).await;
        match read {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
            _ => return Err("connection closed or timed out".into()),
        }
    }
}

async fn start_tls(conn: &mut Conn, policy: &Policy, target: &Target) -> std::io::Result<()> {
    let name = super::tls::server_name(&target.host)
        .or_else(|| super::tls::server_name(&target.addr.ip().to_string()))
        .ok_or_else(|| std::io::Error::other("no usable TLS server name"))?;
    conn.start_tls_client(policy.tls_config.clone(), name).await
}

/// Reads the stored envelope and builds what the machine sends: only this session's recipients.
async fn prepare(
    core: &Core,
    q: &Queued,
    tag: u64,
) -> Result<(Outgoing, Envelope, Vec<usize>), spool::Error> {
    let meta = core.reader.read_message(&q.location).await?;
    Ok(crate::provider::reversal::outgoing_for(
        meta.envelope,
        &q.parts,
        q.location.body_len,
        tag,
    ))
}

/// Streams one body from the journal: raw after `BDAT n LAST` (already in `head`), or
/// dot-stuffed with its terminator after DATA's 354.
async fn send_body(
    core: &Core,
    conn: &mut Conn,
    location: &Location,
    framing: BodyFraming,
    head: Vec<u8>,
) -> Result<(), Box<dyn std::error::Error>> {
    conn.flush_buffer(&mut { head }).await?;
    let mut stream = core.reader.body_stream(*location, BODY_CHUNK);
    let mut stuffer = DotStuffer::new();
    let mut chunk = Vec::with_capacity(BODY_CHUNK);
    let mut wire = Vec::with_capacity(BODY_CHUNK + BODY_CHUNK / 8);
    while let Some(buf) = stream.next_chunk(std::mem::take(&mut chunk)).await? {
        match framing {
            BodyFraming::Bdat => {
                let (r, buf) = conn.write_owned(buf).await;
                r?;
                chunk = buf;
            }
            BodyFraming::Data => {
                wire.clear();
                stuffer.push(&buf, &mut wire);
                chunk = buf;
                let (r, out) = conn.write_owned(std::mem::take(&mut wire)).await;
                r?;
                wire = out;
            }
        }
        chunk.clear();
    }
    if let BodyFraming::Data = framing {
        wire.clear();
        stuffer.finish(&mut wire);
        let (r, _) = conn.write_owned(wire).await;
        r?;
    }
    Ok(())
}
