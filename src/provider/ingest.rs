//! One inbound message on its way into this core's journal: MX, submission and mail submitted
//! on an ODMR session before ATRN all come through here.
//!
//! The session's [`Inbound`] machine hands a body over in [`BODY_CHUNK`]-sized pieces
//! (`Action::StoreChunk`) once it outgrows one chunk; a smaller message comes whole with its
//! `Action::Deliver`. So:
//!
//! - **Small messages** (up to one chunk) are appended whole, our `Received:` field and the
//!   body as two pieces of one record (no copy to join them), through the core's group commit.
//! - **Big messages** are streamed: at the first chunk the message gets its id and a file of
//!   its own ([`spool::StreamAppend`]), our `Received:` field is written first, then every
//!   chunk as it arrives; at the end of data the file is fdatasync'ed and becomes a journal
//!   segment. A session holds about one chunk of a message, whatever its size.
//!
//! Either way the `250` is sent only after the record is durable. A message refused while it
//! arrives (over the size limit, bare line endings, too many hops) or cut off (RSET, a closed
//! connection, a timeout) loses its file at once, and a failed write answers the message with
//! `452 4.3.1` (disk full) or `451 4.3.0` once its data ends; nothing of it is ever held.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::proto::inbound::{Inbound, Incoming};
use crate::proto::reply::Reply;
use crate::proto::trace;
use crate::spool::{self, StreamAppend};
use crate::types::{BodyType, Envelope, Mailbox, MessageId};

use super::core::{storage_reply, Core};

/// Body bytes a session buffers before it streams the message to disk: messages up to this
/// size are stored whole, through the group commit.
pub const BODY_CHUNK: usize = 256 * 1024;

/// The message of one session that is being streamed, if any.
#[derive(Default)]
pub struct Ingest {
    streaming: Option<Streaming>,
    /// A chunk came with no message to put it in (a machine contract breach): the message
    /// must not be stored without it.
    lost_chunk: bool,
}

struct Streaming {
    append: StreamAppend,
    received_at: u64,
    /// A byte with the high bit set went by (for BODY=8BITMIME, see [`store_whole`]).
    eight_bit: bool,
}

impl Ingest {
    /// An `Action::StoreChunk`: starts streaming the message at its first chunk, then appends.
    /// If the bytes cannot be written, the message is dropped and the machine told to answer
    /// its end with the reason.
    pub async fn chunk(
        &mut self,
        core: &Core,
        machine: &mut Inbound,
        bytes: Vec<u8>,
        peer: SocketAddr,
    ) {
        if self.streaming.is_none() {
            let Some(message) = machine.receiving() else {
                tracing::error!(%peer, bytes = bytes.len(), "body chunk outside a message; the message will be refused");
                self.lost_chunk = true;
                return;
            };
            match begin(core, &message, peer).await {
                Ok(s) => self.streaming = Some(s),
                Err(e) => return self.fail(core, machine, &e, peer).await,
            }
        }
        let Some(s) = self.streaming.as_mut() else {
            return;
        };
        s.eight_bit |= !bytes.is_ascii();
        let (r, buf) = s.append.write(bytes).await;
        machine.recycle(buf);
        if let Err(e) = r {
            self.fail(core, machine, &e, peer).await;
        }
    }

    /// An `Action::DiscardChunks`: the message will not be delivered; its file goes.
    pub async fn discard(&mut self) {
        self.lost_chunk = false;
        if let Some(s) = self.streaming.take() {
            tracing::debug!(id = %s.append.id(), bytes = s.append.body_len(), "incoming message dropped");
            s.append.abort().await;
        }
    }

    /// An `Action::Deliver`: stores the message (the streamed one, completed by the body's
    /// tail, or a whole small one) and returns the reply for `Inbound::stored`.
    pub async fn deliver(
        &mut self,
        core: &Core,
        incoming: Incoming,
        peer: SocketAddr,
    ) -> Result<String, Reply> {
        if std::mem::take(&mut self.lost_chunk) {
            self.discard().await;
            return Err(storage_reply(&spool::Error::Closed));
        }
        let Some(mut s) = self.streaming.take() else {
            return store_whole(core, incoming, peer).await;
        };
        let Incoming {
            mut envelope, body, ..
        } = incoming;
        let id = s.append.id();
        s.eight_bit |= !body.is_ascii();
        if !body.is_empty() {
            let (r, _) = s.append.write(body).await;
            if let Err(e) = r {
                s.append.abort().await;
                return Err(refusal(core, id, &e, peer));
            }
        }
        mark_eight_bit(&mut envelope, s.eight_bit);
        let started = Instant::now();
        match s.append.commit(&envelope).await {
            Ok(location) => {
                core.announce_held(id, s.received_at, &envelope, location, started);
                log_held(id, peer, &envelope, location.body_len, true);
                Ok(id.to_string())
            }
            Err(e) => Err(refusal(core, id, &e, peer)),
        }
    }

    async fn fail(
        &mut self,
        core: &Core,
        machine: &mut Inbound,
        e: &spool::Error,
        peer: SocketAddr,
    ) {
        let id = self.streaming.as_ref().map(|s| s.append.id());
        if let Some(s) = self.streaming.take() {
            s.append.abort().await;
        }
        let reply = match id {
            Some(id) => refusal(core, id, e, peer),
            None => {
                if e.is_no_space() {
                    core.metrics.borrow_mut().store_mut().storage_refused += 1;
                }
                tracing::warn!(%peer, error = %e, "cannot start storing an incoming message");
                storage_reply(e)
            }
        };
        machine.abandon_body(reply);
    }
}

/// Gives the message its id and its file, and writes our `Received:` field first.
async fn begin(
    core: &Core,
    message: &Incoming,
    peer: SocketAddr,
) -> Result<Streaming, spool::Error> {
    let now = unix_now();
    let id = core.new_id(now.as_millis() as u64);
    let received = received_field(core, message, id, now.as_secs(), peer);
    let mut append = core
        .journal
        .begin_stream(id, now.as_secs(), &message.envelope)
        .await?;
    let (r, _) = append.write(received.into_bytes()).await;
    if let Err(e) = r {
        append.abort().await;
        return Err(e);
    }
    Ok(Streaming {
        append,
        received_at: now.as_secs(),
        eight_bit: false,
    })
}

/// Appends a message that came whole to this core's journal (returns after fdatasync), then
/// hands each domain part to its shard core.
async fn store_whole(
    core: &Core,
    mut incoming: Incoming,
    peer: SocketAddr,
) -> Result<String, Reply> {
    let eight_bit = !incoming.body.is_ascii();
    mark_eight_bit(&mut incoming.envelope, eight_bit);
    let now = unix_now();
    let id = core.new_id(now.as_millis() as u64);
    let received = received_field(core, &incoming, id, now.as_secs(), peer);
    let started = Instant::now();
    let pieces = [received.as_bytes(), incoming.body.as_slice()];
    let appended = core
        .journal
        .append_message_pieces(id, now.as_secs(), &incoming.envelope, &pieces)
        .await;
    match appended {
        Ok(location) => {
            core.announce_held(id, now.as_secs(), &incoming.envelope, location, started);
            log_held(id, peer, &incoming.envelope, location.body_len, false);
            Ok(id.to_string())
        }
        Err(e) => Err(refusal(core, id, &e, peer)),
    }
}

/// Records what the body really is: 8-bit content sent without BODY=8BITMIME is stored as
/// 8BITMIME, so the reversal never sends it to a customer without 8BITMIME.
fn mark_eight_bit(envelope: &mut Envelope, eight_bit: bool) {
    if envelope.body == BodyType::SevenBit && eight_bit {
        envelope.body = BodyType::EightBitMime;
    }
}

/// Our `Received:` field for `message`, which gets id `id` at `unix_secs`.
fn received_field(
    core: &Core,
    message: &Incoming,
    id: MessageId,
    unix_secs: u64,
    peer: SocketAddr,
) -> String {
    trace::received(&trace::Trace {
        host: core.shared.config.server.hostname.as_str(),
        helo: &message.helo,
        peer_ip: &peer.ip().to_string(),
        protocol: message.protocol,
        recipient: single_recipient(&message.envelope),
        id: &id.to_string(),
        account: message.account.as_deref(),
        unix_secs,
    })
}

fn single_recipient(envelope: &Envelope) -> Option<&Mailbox> {
    match envelope.recipients.as_slice() {
        [one] => Some(&one.mailbox),
        _ => None,
    }
}

fn log_held(id: MessageId, peer: SocketAddr, envelope: &Envelope, bytes: u64, streamed: bool) {
    let sender = envelope.sender.as_ref().map(|m| m.to_string());
    let rcpts = envelope.recipients.len();
    tracing::info!(%id, %peer, ?sender, rcpts, bytes, streamed, "held");
}

/// Logs a failed store of message `id` (counting a full disk in the metrics) and returns the
/// reply that says so.
fn refusal(core: &Core, id: MessageId, e: &spool::Error, peer: SocketAddr) -> Reply {
    if e.is_no_space() {
        core.metrics.borrow_mut().store_mut().storage_refused += 1;
        tracing::warn!(%id, %peer, error = %e, "disk full; message refused with 452");
    } else {
        tracing::error!(%id, %peer, error = %e, "journal append failed; message refused with 451");
    }
    storage_reply(e)
}

fn unix_now() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
