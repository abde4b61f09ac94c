//! The journal's byte format: segment headers and the `MSG`, `DONE`, `EXPIRE` and `SETTLE`
//! records.
//!
//! This module owns encoding and decoding only; it does no I/O. `docs/spool-format.md` is the
//! normative description, and the constants here are its source of truth.
//!
//! # Segment file
//!
//! `<data>/journal/core-<N>/<seq:016x>.seg` starts with a 32-byte header:
//!
//! ```text
//! 0  8  magic "TPSPOOL\0"
//! 8  2  format version (1), little endian like every integer below
//! 10 2  core N
//! 12 4  reserved, zero
//! 16 8  seq (equals the file name)
//! 24 4  CRC-32 (IEEE) of bytes 0..24
//! 28 4  reserved, zero
//! ```
//!
//! Records follow back to back. A byte 0 where a record kind is expected (the zeroed,
//! preallocated tail of a segment) or the end of the file ends the segment cleanly.
//!
//! # Record
//!
//! ```text
//! 0  1  kind: 1 MSG, 2 DONE, 3 EXPIRE, 4 SETTLE
//! 1  1  record version (1)
//! 2  2  reserved, zero
//! 4  4  meta_len
//! 8  8  body_len (0 for DONE, EXPIRE and SETTLE)
//! 16 4  body CRC-32 (0 when body_len is 0)
//! 20 4  head CRC-32 over bytes 0..20 followed by the meta bytes
//! 24 .. meta (meta_len bytes), then body (body_len bytes)
//! ```
//!
//! The head checksum covers the envelope, so recovery verifies everything it keeps in memory
//! while it skips bodies by length without reading them.
//!
//! Invariants: every decoded `MSG` has part recipient indices inside its recipient list, and
//! every domain in a record parses as a [`DomainName`]. Decoding never panics on any input.

use super::Error;
use crate::types::{BodyType, DomainName, Envelope, Mailbox, MessageId, Notify, Recipient, Ret};

/// Length of the segment file header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// Length of the fixed part of every record header (before the meta bytes).
pub const RECORD_HEADER_LEN: u64 = 24;
/// Segment and record format version written by this build.
pub const FORMAT_VERSION: u16 = 1;
/// Version of the envelope encoding inside a `MSG` meta.
const ENVELOPE_VERSION: u8 = 1;
/// Largest meta section a reader accepts; anything bigger is treated as corruption.
pub(crate) const MAX_META_LEN: u32 = 16 << 20;
const SEGMENT_MAGIC: [u8; 8] = *b"TPSPOOL\0";

pub(crate) const KIND_MSG: u8 = 1;
pub(crate) const KIND_DONE: u8 = 2;
pub(crate) const KIND_EXPIRE: u8 = 3;
/// Some recipients of a part are finished, the others stay held (added after the first
/// release of format 1: older builds stop reading a segment at the first one).
pub(crate) const KIND_SETTLE: u8 = 4;

/// Encodes the 32-byte header of segment `seq` of `core`.
pub(crate) fn encode_segment_header(core: u16, seq: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&core.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header and returns its `(core, seq)`.
pub(crate) fn decode_segment_header(h: &[u8]) -> Result<(u16, u64), &'static str> {
    if h.len() < SEGMENT_HEADER_LEN as usize {
        return Err("segment header truncated");
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    if crc32fast::hash(&h[0..24]) != le_u32(&h[24..28]) {
        return Err("segment header checksum mismatch");
    }
    if h[28..32] != [0; 4] {
        return Err("segment header reserved bytes not zero");
    }
    if u16::from_le_bytes([h[8], h[9]]) != FORMAT_VERSION {
        return Err("unsupported segment format version");
    }
    Ok((u16::from_le_bytes([h[10], h[11]]), le_u64(&h[16..24])))
}

/// What happened to one domain part; the payload of a `DONE` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The customer accepted it (2xx) during a reversal.
    Delivered,
    /// The customer rejected it permanently (5xx); a DSN went to the sender.
    Bounced,
    /// It was held longer than the maximum; a DSN went to the sender.
    ExpiredBounced,
    /// An operator removed it (`turnpike queue delete`); no DSN.
    Removed,
}

impl Outcome {
    fn code(self) -> u8 {
        match self {
            Outcome::Delivered => 1,
            Outcome::Bounced => 2,
            Outcome::ExpiredBounced => 3,
            Outcome::Removed => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Outcome::Delivered,
            2 => Outcome::Bounced,
            3 => Outcome::ExpiredBounced,
            4 => Outcome::Removed,
            _ => return None,
        })
    }
}

/// One domain part of a stored message: the recipients of one domain, by index into the
/// envelope's recipient list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The hosted domain.
    pub domain: DomainName,
    /// Indices into `Envelope::recipients`, in RCPT order.
    pub recipients: Vec<u32>,
    /// The part passed the maximum hold and awaits its bounce (set on compaction copies).
    pub expired: bool,
}

/// Groups the envelope's recipients by domain, in order of first appearance. Recipients whose
/// domain is not a valid [`DomainName`] (address literals) belong to no part.
pub fn parts_of(env: &Envelope) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    for (i, r) in env.recipients.iter().enumerate() {
        let Ok(domain) = DomainName::parse(&r.mailbox.domain) else {
            continue;
        };
        let Ok(i) = u32::try_from(i) else { break };
        match parts.iter_mut().find(|p| p.domain == domain) {
            Some(p) => p.recipients.push(i),
            None => parts.push(Part {
                domain,
                recipients: vec![i],
                expired: false,
            }),
        }
    }
    parts
}

/// Sizes of one encoded record, relative to its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Encoded {
    /// Whole record length.
    pub len: u64,
    /// Offset of the body from the start of the record.
    pub body_rel: u64,
    /// Body length.
    pub body_len: u64,
    /// CRC-32 of the body.
    pub body_crc: u32,
}

/// Appends a `MSG` record to `out`. On error `out` is left as it was.
#[cfg(test)]
pub(crate) fn encode_msg(
    out: &mut Vec<u8>,
    id: MessageId,
    received_at: u64,
    env: &Envelope,
    parts: &[Part],
    body: &[u8],
) -> Result<Encoded, Error> {
    encode_msg_pieces(out, id, received_at, env, parts, &[body])
}

/// [`encode_msg`] with a body given in pieces (our `Received:` field, then the message), so
/// that no caller has to copy a body just to put a prefix in front of it.
pub(crate) fn encode_msg_pieces(
    out: &mut Vec<u8>,
    id: MessageId,
    received_at: u64,
    env: &Envelope,
    parts: &[Part],
    body: &[&[u8]],
) -> Result<Encoded, Error> {
    let body_len: usize = body.iter().map(|p| p.len()).sum();
    let mut crc = crc32fast::Hasher::new();
    body.iter().for_each(|p| crc.update(p));
    out.reserve(RECORD_HEADER_LEN as usize + 128 + body_len);
    let enc = encode_msg_head(
        out,
        id,
        received_at,
        env,
        parts,
        body_len as u64,
        crc.finalize(),
    )?;
    body.iter().for_each(|p| out.extend_from_slice(p));
    Ok(enc)
}

/// Appends the fixed header and the meta of a `MSG` record whose body (`body_len` bytes with
/// CRC-32 `body_crc`) is written elsewhere: by a streamed append, which writes the body while
/// it arrives and this head last. On error `out` is left as it was.
pub(crate) fn encode_msg_head(
    out: &mut Vec<u8>,
    id: MessageId,
    received_at: u64,
    env: &Envelope,
    parts: &[Part],
    body_len: u64,
    body_crc: u32,
) -> Result<Encoded, Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN as usize]);
    let r = encode_msg_meta(out, id, received_at, env, parts)
        .and_then(|()| finish_header(out, start, KIND_MSG, body_len, body_crc));
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Appends a `DONE` record to `out`.
pub(crate) fn encode_done(
    out: &mut Vec<u8>,
    id: MessageId,
    domain: &DomainName,
    outcome: Outcome,
) -> Encoded {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN as usize]);
    out.extend_from_slice(&id.0.to_le_bytes());
    put_domain(out, domain);
    out.push(outcome.code());
    finish_header(out, start, KIND_DONE, 0, 0).expect("DONE meta is small")
}

/// Appends a `SETTLE` record to `out`: the listed recipients (indices into the envelope's
/// recipient list) of the `domain` part of `id` are finished, each with its outcome; the
/// part's other recipients stay held. `recipients` is not empty.
pub(crate) fn encode_settle(
    out: &mut Vec<u8>,
    id: MessageId,
    domain: &DomainName,
    recipients: &[(u32, Outcome)],
) -> Result<Encoded, Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN as usize]);
    out.extend_from_slice(&id.0.to_le_bytes());
    put_domain(out, domain);
    let Ok(n) = u32::try_from(recipients.len()) else {
        out.truncate(start);
        return Err(Error::TooLarge {
            what: "settled recipients",
        });
    };
    out.extend_from_slice(&n.to_le_bytes());
    for (i, outcome) in recipients {
        out.extend_from_slice(&i.to_le_bytes());
        out.push(outcome.code());
    }
    let r = finish_header(out, start, KIND_SETTLE, 0, 0);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

/// Appends an `EXPIRE` record to `out`.
pub(crate) fn encode_expire(out: &mut Vec<u8>, id: MessageId, domain: &DomainName) -> Encoded {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_LEN as usize]);
    out.extend_from_slice(&id.0.to_le_bytes());
    put_domain(out, domain);
    finish_header(out, start, KIND_EXPIRE, 0, 0).expect("EXPIRE meta is small")
}

/// Fills in the fixed header of the record starting at `start`, whose meta ends at
/// `out.len()`.
fn finish_header(
    out: &mut [u8],
    start: usize,
    kind: u8,
    body_len: u64,
    body_crc: u32,
) -> Result<Encoded, Error> {
    let meta_len = out.len() - start - RECORD_HEADER_LEN as usize;
    let meta_len32 = u32::try_from(meta_len)
        .ok()
        .filter(|l| *l <= MAX_META_LEN)
        .ok_or(Error::TooLarge { what: "envelope" })?;
    let h = &mut out[start..];
    h[0] = kind;
    h[1] = FORMAT_VERSION as u8;
    h[4..8].copy_from_slice(&meta_len32.to_le_bytes());
    h[8..16].copy_from_slice(&body_len.to_le_bytes());
    h[16..20].copy_from_slice(&body_crc.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[0..20]);
    hasher.update(&h[RECORD_HEADER_LEN as usize..]);
    let head_crc = hasher.finalize();
    h[20..24].copy_from_slice(&head_crc.to_le_bytes());
    let body_rel = RECORD_HEADER_LEN + meta_len as u64;
    Ok(Encoded {
        len: body_rel + body_len,
        body_rel,
        body_len,
        body_crc,
    })
}

fn encode_msg_meta(
    out: &mut Vec<u8>,
    id: MessageId,
    received_at: u64,
    env: &Envelope,
    parts: &[Part],
) -> Result<(), Error> {
    out.extend_from_slice(&id.0.to_le_bytes());
    out.extend_from_slice(&received_at.to_le_bytes());
    out.push(ENVELOPE_VERSION);
    match &env.sender {
        None => out.push(0),
        Some(m) => {
            out.push(1);
            put_mailbox(out, m)?;
        }
    }
    out.push(match env.body {
        BodyType::SevenBit => 0,
        BodyType::EightBitMime => 1,
        BodyType::BinaryMime => 2,
    });
    out.push(u8::from(env.smtputf8));
    out.push(match env.ret {
        None => 0,
        Some(Ret::Full) => 1,
        Some(Ret::Hdrs) => 2,
    });
    put_opt_str(out, env.envid.as_deref(), "ENVID")?;
    let n =
        u32::try_from(env.recipients.len()).map_err(|_| Error::TooLarge { what: "recipients" })?;
    out.extend_from_slice(&n.to_le_bytes());
    for r in &env.recipients {
        put_mailbox(out, &r.mailbox)?;
        out.push(match r.notify {
            None => 0,
            Some(n) => {
                0x80 | u8::from(n.never)
                    | u8::from(n.success) << 1
                    | u8::from(n.failure) << 2
                    | u8::from(n.delay) << 3
            }
        });
        put_opt_str(out, r.orcpt.as_deref(), "ORCPT")?;
    }
    let n = u16::try_from(parts.len()).map_err(|_| Error::TooLarge { what: "parts" })?;
    out.extend_from_slice(&n.to_le_bytes());
    for p in parts {
        out.push(u8::from(p.expired));
        put_domain(out, &p.domain);
        let n = u32::try_from(p.recipients.len()).map_err(|_| Error::TooLarge {
            what: "part recipients",
        })?;
        out.extend_from_slice(&n.to_le_bytes());
        for i in &p.recipients {
            if *i as usize >= env.recipients.len() {
                return Err(Error::TooLarge {
                    what: "part recipient index",
                });
            }
            out.extend_from_slice(&i.to_le_bytes());
        }
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str, what: &'static str) -> Result<(), Error> {
    let n = u16::try_from(s.len()).map_err(|_| Error::TooLarge { what })?;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>, what: &'static str) -> Result<(), Error> {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s, what)?;
        }
    }
    Ok(())
}

fn put_mailbox(out: &mut Vec<u8>, m: &Mailbox) -> Result<(), Error> {
    put_str(out, &m.local, "mailbox local part")?;
    put_str(out, &m.domain, "mailbox domain")
}

fn put_domain(out: &mut Vec<u8>, d: &DomainName) {
    // A DomainName is at most 253 octets, so one length byte is enough.
    out.push(d.as_str().len() as u8);
    out.extend_from_slice(d.as_str().as_bytes());
}

/// The fixed 24 bytes in front of every record, parsed but not yet checksummed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FixedHeader {
    pub kind: u8,
    pub meta_len: u32,
    pub body_len: u64,
    pub body_crc: u32,
    pub head_crc: u32,
}

/// Why the bytes at a record position do not start a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    /// A zero kind byte: the zeroed tail of a segment (clean end).
    End,
    /// Anything else: torn or corrupt.
    Bad(&'static str),
}

impl FixedHeader {
    pub(crate) fn parse(h: &[u8; RECORD_HEADER_LEN as usize]) -> Result<Self, HeaderError> {
        if h[0] == 0 {
            return Err(if h.iter().all(|b| *b == 0) {
                HeaderError::End
            } else {
                HeaderError::Bad("zero record kind with non-zero header")
            });
        }
        if !matches!(h[0], KIND_MSG | KIND_DONE | KIND_EXPIRE | KIND_SETTLE) {
            return Err(HeaderError::Bad("unknown record kind"));
        }
        if u16::from(h[1]) != FORMAT_VERSION || h[2] != 0 || h[3] != 0 {
            return Err(HeaderError::Bad("unsupported record version"));
        }
        let fh = FixedHeader {
            kind: h[0],
            meta_len: le_u32(&h[4..8]),
            body_len: le_u64(&h[8..16]),
            body_crc: le_u32(&h[16..20]),
            head_crc: le_u32(&h[20..24]),
        };
        if fh.meta_len > MAX_META_LEN {
            return Err(HeaderError::Bad("meta length out of range"));
        }
        if fh.kind != KIND_MSG && (fh.body_len != 0 || fh.body_crc != 0) {
            return Err(HeaderError::Bad("body on a record that has none"));
        }
        Ok(fh)
    }

    /// Checks the head checksum against the fixed bytes and the meta bytes.
    pub(crate) fn verify(&self, h: &[u8; RECORD_HEADER_LEN as usize], meta: &[u8]) -> bool {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&h[0..20]);
        hasher.update(meta);
        hasher.finalize() == self.head_crc
    }

    /// Whole record length, or `None` on overflow.
    pub(crate) fn record_len(&self) -> Option<u64> {
        (RECORD_HEADER_LEN + u64::from(self.meta_len)).checked_add(self.body_len)
    }
}

/// A decoded `MSG` meta section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsgMeta {
    /// The message id.
    pub id: MessageId,
    /// When the message was accepted, unix seconds.
    pub received_at: u64,
    /// The whole envelope as accepted.
    pub envelope: Envelope,
    /// The domain parts this copy of the record holds.
    pub parts: Vec<Part>,
}

/// A decoded meta section of any record kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Meta {
    Msg(MsgMeta),
    Done {
        id: MessageId,
        domain: DomainName,
        outcome: Outcome,
    },
    Expire {
        id: MessageId,
        domain: DomainName,
    },
    Settle {
        id: MessageId,
        domain: DomainName,
        /// Envelope recipient index and outcome of each finished recipient.
        recipients: Vec<(u32, Outcome)>,
    },
}

/// Decodes a meta section whose head checksum already matched.
pub(crate) fn decode_meta(kind: u8, meta: &[u8]) -> Result<Meta, &'static str> {
    let mut c = Cursor { b: meta };
    let m = match kind {
        KIND_MSG => Meta::Msg(decode_msg(&mut c)?),
        KIND_DONE => {
            let id = MessageId(c.u128()?);
            let domain = c.domain()?;
            let outcome = Outcome::from_code(c.u8()?).ok_or("unknown DONE outcome")?;
            Meta::Done {
                id,
                domain,
                outcome,
            }
        }
        KIND_EXPIRE => Meta::Expire {
            id: MessageId(c.u128()?),
            domain: c.domain()?,
        },
        KIND_SETTLE => {
            let id = MessageId(c.u128()?);
            let domain = c.domain()?;
            let n = c.u32()? as usize;
            if n == 0 {
                return Err("SETTLE without recipients");
            }
            // Each entry is 5 bytes: bound the allocation by what is really there.
            let mut recipients = Vec::with_capacity(n.min(c.b.len() / 5));
            for _ in 0..n {
                let i = c.u32()?;
                let outcome = Outcome::from_code(c.u8()?).ok_or("unknown SETTLE outcome")?;
                recipients.push((i, outcome));
            }
            Meta::Settle {
                id,
                domain,
                recipients,
            }
        }
        _ => return Err("unknown record kind"),
    };
    if !c.b.is_empty() {
        return Err("trailing bytes in record meta");
    }
    Ok(m)
}

fn decode_msg(c: &mut Cursor<'_>) -> Result<MsgMeta, &'static str> {
    let id = MessageId(c.u128()?);
    let received_at = c.u64()?;
    if c.u8()? != ENVELOPE_VERSION {
        return Err("unsupported envelope version");
    }
    let sender = match c.u8()? {
        0 => None,
        1 => Some(c.mailbox()?),
        _ => return Err("bad sender flag"),
    };
    let body = match c.u8()? {
        0 => BodyType::SevenBit,
        1 => BodyType::EightBitMime,
        2 => BodyType::BinaryMime,
        _ => return Err("bad body type"),
    };
    let smtputf8 = match c.u8()? {
        0 => false,
        1 => true,
        _ => return Err("bad SMTPUTF8 flag"),
    };
    let ret = match c.u8()? {
        0 => None,
        1 => Some(Ret::Full),
        2 => Some(Ret::Hdrs),
        _ => return Err("bad RET value"),
    };
    let envid = c.opt_str()?;
    let n = c.u32()? as usize;
    // Each recipient takes at least 6 bytes: bound the allocation by what is really there.
    let mut recipients = Vec::with_capacity(n.min(c.b.len() / 6));
    for _ in 0..n {
        let mailbox = c.mailbox()?;
        let flags = c.u8()?;
        let notify = match flags {
            0 => None,
            f if f & 0x70 == 0 && f & 0x80 != 0 => Some(Notify {
                never: f & 1 != 0,
                success: f & 2 != 0,
                failure: f & 4 != 0,
                delay: f & 8 != 0,
            }),
            _ => return Err("bad NOTIFY flags"),
        };
        let orcpt = c.opt_str()?;
        recipients.push(Recipient {
            mailbox,
            notify,
            orcpt,
        });
    }
    let np = c.u16()? as usize;
    let mut parts = Vec::with_capacity(np.min(c.b.len() / 6));
    for _ in 0..np {
        let expired = match c.u8()? {
            0 => false,
            1 => true,
            _ => return Err("bad part flags"),
        };
        let domain = c.domain()?;
        let n = c.u32()? as usize;
        let mut idx = Vec::with_capacity(n.min(c.b.len() / 4));
        for _ in 0..n {
            let i = c.u32()?;
            if i as usize >= recipients.len() {
                return Err("part recipient index out of range");
            }
            idx.push(i);
        }
        parts.push(Part {
            domain,
            recipients: idx,
            expired,
        });
    }
    let envelope = Envelope {
        sender,
        body,
        smtputf8,
        ret,
        envid,
        recipients,
    };
    Ok(MsgMeta {
        id,
        received_at,
        envelope,
        parts,
    })
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.b.len() < n {
            return Err("record meta truncated");
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(le_u32(self.take(4)?))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(le_u64(self.take(8)?))
    }

    fn u128(&mut self) -> Result<u128, &'static str> {
        let mut a = [0u8; 16];
        a.copy_from_slice(self.take(16)?);
        Ok(u128::from_le_bytes(a))
    }

    fn str(&mut self) -> Result<String, &'static str> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "string is not UTF-8")
    }

    fn opt_str(&mut self) -> Result<Option<String>, &'static str> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            _ => Err("bad optional-string flag"),
        }
    }

    fn mailbox(&mut self) -> Result<Mailbox, &'static str> {
        Ok(Mailbox {
            local: self.str()?,
            domain: self.str()?,
        })
    }

    fn domain(&mut self) -> Result<DomainName, &'static str> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "domain is not UTF-8")?;
        match DomainName::parse(s) {
            Ok(d) if d.as_str() == s => Ok(d),
            _ => Err("domain is not a canonical domain name"),
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(s: &str) -> Mailbox {
        let (l, d) = s.split_once('@').unwrap();
        Mailbox {
            local: l.into(),
            domain: d.into(),
        }
    }

    fn sample_envelope() -> Envelope {
        let rcpt = |s: &str, notify, orcpt: Option<&str>| Recipient {
            mailbox: mailbox(s),
            notify,
            orcpt: orcpt.map(String::from),
        };
        Envelope {
            sender: Some(mailbox("\"odd sender\"@sender.example")),
            body: BodyType::EightBitMime,
            smtputf8: true,
            ret: Some(Ret::Hdrs),
            envid: Some("QQ314159".into()),
            recipients: vec![
                rcpt("a@one.example", None, None),
                rcpt(
                    "b@two.example",
                    Some(Notify {
                        failure: true,
                        delay: true,
                        ..Notify::default()
                    }),
                    Some("rfc822;b@two.example"),
                ),
                rcpt(
                    "c@one.example",
                    Some(Notify {
                        never: true,
                        ..Notify::default()
                    }),
                    None,
                ),
                rcpt("d@[192.0.2.1]", None, None),
                rcpt("jörg@two.example", None, None),
            ],
        }
    }

    fn split(rec: &[u8]) -> ([u8; 24], &[u8]) {
        let mut h = [0u8; 24];
        h.copy_from_slice(&rec[..24]);
        (h, &rec[24..])
    }

    #[test]
    fn parts_group_by_domain_and_skip_literals() {
        let parts = parts_of(&sample_envelope());
        let got: Vec<(&str, Vec<u32>)> = parts
            .iter()
            .map(|p| (p.domain.as_str(), p.recipients.clone()))
            .collect();
        assert_eq!(
            got,
            vec![("one.example", vec![0, 2]), ("two.example", vec![1, 4])]
        );
    }

    #[test]
    fn msg_round_trips() {
        let env = sample_envelope();
        let mut parts = parts_of(&env);
        parts[1].expired = true;
        let id = MessageId::new(1_700_000_000_000, 3, 42);
        let body = b"Received: by test\r\n\r\nhello\r\n".to_vec();
        let mut out = vec![0xAA; 5];
        let enc = encode_msg(&mut out, id, 1_700_000_000, &env, &parts, &body).unwrap();
        let rec = &out[5..];
        assert_eq!(enc.len as usize, rec.len());
        assert_eq!(&rec[enc.body_rel as usize..], &body[..]);
        assert_eq!(enc.body_crc, crc32fast::hash(&body));
        let (h, rest) = split(rec);
        let fh = FixedHeader::parse(&h).unwrap();
        let meta = &rest[..fh.meta_len as usize];
        assert!(fh.verify(&h, meta));
        assert_eq!(fh.record_len(), Some(enc.len));
        let Meta::Msg(m) = decode_meta(fh.kind, meta).unwrap() else {
            panic!("not a MSG")
        };
        assert_eq!(
            m,
            MsgMeta {
                id,
                received_at: 1_700_000_000,
                envelope: env,
                parts
            }
        );
    }

    #[test]
    fn null_sender_and_minimal_envelope_round_trip() {
        let env = Envelope {
            recipients: vec![Recipient {
                mailbox: mailbox("x@y.example"),
                notify: None,
                orcpt: None,
            }],
            ..Envelope::default()
        };
        let mut out = Vec::new();
        let parts = parts_of(&env);
        encode_msg(&mut out, MessageId(7), 0, &env, &parts, b"").unwrap();
        let (h, rest) = split(&out);
        let fh = FixedHeader::parse(&h).unwrap();
        assert_eq!(fh.body_len, 0);
        let Meta::Msg(m) = decode_meta(fh.kind, &rest[..fh.meta_len as usize]).unwrap() else {
            panic!("not a MSG")
        };
        assert_eq!(m.envelope, env);
    }

    #[test]
    fn done_and_expire_round_trip() {
        let d = DomainName::parse("one.example").unwrap();
        let id = MessageId(99);
        for outcome in [
            Outcome::Delivered,
            Outcome::Bounced,
            Outcome::ExpiredBounced,
            Outcome::Removed,
        ] {
            let mut out = Vec::new();
            let enc = encode_done(&mut out, id, &d, outcome);
            assert_eq!(enc.len as usize, out.len());
            let (h, meta) = split(&out);
            let fh = FixedHeader::parse(&h).unwrap();
            assert!(fh.verify(&h, meta));
            assert_eq!(
                decode_meta(fh.kind, meta).unwrap(),
                Meta::Done {
                    id,
                    domain: d.clone(),
                    outcome
                }
            );
        }
        let mut out = Vec::new();
        encode_expire(&mut out, id, &d);
        let (h, meta) = split(&out);
        let fh = FixedHeader::parse(&h).unwrap();
        assert_eq!(
            decode_meta(fh.kind, meta).unwrap(),
            Meta::Expire { id, domain: d }
        );
    }

    #[test]
    fn settle_round_trips_and_refuses_empty_or_unknown_outcomes() {
        let d = DomainName::parse("one.example").unwrap();
        let id = MessageId(7);
        let recipients = vec![(0, Outcome::Delivered), (2, Outcome::Bounced)];
        let mut out = vec![9];
        let enc = encode_settle(&mut out, id, &d, &recipients).unwrap();
        let rec = &out[1..];
        assert_eq!(enc.len as usize, rec.len());
        let (h, meta) = split(rec);
        let fh = FixedHeader::parse(&h).unwrap();
        assert_eq!(fh.kind, KIND_SETTLE);
        assert!(fh.verify(&h, meta));
        assert_eq!(
            decode_meta(fh.kind, meta).unwrap(),
            Meta::Settle {
                id,
                domain: d.clone(),
                recipients
            }
        );
        for cut in 0..meta.len() {
            assert!(
                decode_meta(KIND_SETTLE, &meta[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = meta.to_vec();
        *bad.last_mut().unwrap() = 9;
        assert_eq!(
            decode_meta(KIND_SETTLE, &bad),
            Err("unknown SETTLE outcome")
        );
        let mut empty = Vec::new();
        encode_settle(&mut empty, id, &d, &[]).unwrap();
        assert_eq!(
            decode_meta(KIND_SETTLE, &empty[24..]),
            Err("SETTLE without recipients")
        );
    }

    #[test]
    fn segment_header_round_trips_and_rejects_damage() {
        let h = encode_segment_header(5, 0x1234);
        assert_eq!(decode_segment_header(&h), Ok((5, 0x1234)));
        for i in 0..32 {
            let mut bad = h;
            bad[i] ^= 0x01;
            assert!(decode_segment_header(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(decode_segment_header(&h[..31]).is_err());
    }

    #[test]
    fn every_meta_truncation_is_an_error_not_a_panic() {
        let env = sample_envelope();
        let mut out = Vec::new();
        encode_msg(&mut out, MessageId(1), 2, &env, &parts_of(&env), b"body").unwrap();
        let (h, rest) = split(&out);
        let fh = FixedHeader::parse(&h).unwrap();
        let meta = &rest[..fh.meta_len as usize];
        for cut in 0..meta.len() {
            assert!(
                decode_meta(KIND_MSG, &meta[..cut]).is_err(),
                "cut at {cut} decoded"
            );
        }
        let mut longer = meta.to_vec();
        longer.push(0);
        assert!(decode_meta(KIND_MSG, &longer).is_err());
    }

    #[test]
    fn every_single_bit_flip_in_header_or_meta_is_detected() {
        let env = sample_envelope();
        let mut out = Vec::new();
        let enc = encode_msg(&mut out, MessageId(1), 2, &env, &parts_of(&env), b"body").unwrap();
        for i in 0..enc.body_rel as usize {
            for bit in 0..8 {
                let mut bad = out.clone();
                bad[i] ^= 1 << bit;
                let (h, rest) = split(&bad);
                let ok = match FixedHeader::parse(&h) {
                    Err(_) => false,
                    Ok(fh) => {
                        (fh.meta_len as usize) <= rest.len()
                            && fh.verify(&h, &rest[..fh.meta_len as usize])
                    }
                };
                assert!(!ok, "flip of bit {bit} at byte {i} went unnoticed");
            }
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A cheap deterministic fuzz: random metas of every kind must decode or error, never panic.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..400usize {
            let mut meta = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                meta.push((x >> 24) as u8 % 4);
            }
            for kind in 0..5 {
                let _ = decode_meta(kind, &meta);
            }
        }
    }

    #[test]
    fn oversize_fields_are_refused() {
        let mut env = sample_envelope();
        env.envid = Some("x".repeat(70_000));
        let mut out = vec![1, 2, 3];
        let err = encode_msg(&mut out, MessageId(1), 2, &env, &parts_of(&env), b"").unwrap_err();
        assert!(matches!(err, Error::TooLarge { what: "ENVID" }));
        assert_eq!(
            out,
            vec![1, 2, 3],
            "a failed encode leaves the buffer untouched"
        );
    }
}
