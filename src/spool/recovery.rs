//! Recovery: rebuild the held parts and the writers' bookkeeping from the journal files.
//!
//! Blocking `std::fs` code, run before the core runtimes start and by the offline
//! `turnpike queue` command. It scans every `<data>/journal/core-N/` directory and every
//! segment in sequence order, reading record headers and envelopes and skipping bodies by
//! length. Body checksums are verified only in the newest segment of each directory, the only
//! one that can end in a torn batch (the writer rotates before a batch and seals the previous
//! newest segment when it opens).
//!
//! # Invariants
//!
//! - A segment is read up to its first bad or torn record and not one byte further: nothing
//!   after damage is ever treated as a record. Damage is logged with `tracing::warn!` and
//!   reported in [`Recovered::damage`]; it is never an error and never a panic.
//! - Every record that was completely written before the damage is recovered.
//! - The live parts are the parts of each message's latest copy that no `DONE` ended, each
//!   without the recipients a `SETTLE` finished. A message copied forward by compaction
//!   appears twice; the later copy's location wins.
//! - Only real I/O failures (a directory or file that cannot be read) are errors.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use super::index::HeldPart;
use super::journal::Location;
use super::reclaim::{Ledger, LivePart};
use super::record::{
    decode_meta, decode_segment_header, FixedHeader, HeaderError, Meta, RECORD_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
use super::Error;
use crate::types::{DomainName, Mailbox, MessageId, Recipient};

/// Where recovery found damage and stopped reading a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Offset of the first byte not accepted.
    pub offset: u64,
    /// What was wrong there.
    pub reason: &'static str,
}

/// One segment as recovery left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Sequence number.
    pub seq: u64,
    /// End of its last valid record.
    pub written: u64,
    /// Live parts whose current copy is in it.
    pub live_parts: u64,
    /// Bytes of its `MSG` records that still have a live part.
    pub live_bytes: u64,
}

/// The newest segment of a directory: where its valid records end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tail {
    pub seq: u64,
    pub valid_end: u64,
}

/// What recovery learned about one `core-N` directory; hand it to
/// [`JournalHandle::open`](super::JournalHandle::open) on core N.
#[derive(Clone, Debug)]
pub struct DirRecovery {
    core: u16,
    ledger: Ledger,
    next_seq: u64,
    tail: Option<Tail>,
    max_id: Option<MessageId>,
}

impl DirRecovery {
    /// The state of a directory that does not exist yet.
    pub fn empty(core: u16) -> Self {
        DirRecovery {
            core,
            ledger: Ledger::default(),
            next_seq: 1,
            tail: None,
            max_id: None,
        }
    }

    /// The core this directory belongs to.
    pub fn core(&self) -> u16 {
        self.core
    }

    /// The largest message id in any record of the directory: seed the core's id sequence
    /// above `max_id().0 as u64` so new ids never collide with held ones.
    pub fn max_id(&self) -> Option<MessageId> {
        self.max_id
    }

    /// The sequence number the writer's next segment gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Liveness of every segment, oldest first.
    pub fn segments(&self) -> Vec<SegmentSummary> {
        self.ledger
            .segments()
            .map(|(seq, s)| SegmentSummary {
                seq,
                written: s.written,
                live_parts: s.live_parts,
                live_bytes: s.live_bytes,
            })
            .collect()
    }

    pub(crate) fn into_writer_parts(self) -> (Ledger, u64, Option<Tail>) {
        (self.ledger, self.next_seq, self.tail)
    }
}

/// The result of [`recover`].
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every live domain part, in journal order. Route each to the shard core of its domain
    /// (`domain.shard_hash() % cores`) and insert it into that core's
    /// [`DomainIndex`](super::DomainIndex).
    pub parts: Vec<HeldPart>,
    /// Per journal directory, keyed by core number.
    pub dirs: BTreeMap<u16, DirRecovery>,
    /// Where segments were found damaged.
    pub damage: Vec<Damage>,
}

impl Recovered {
    /// Removes and returns core `core`'s directory state ([`DirRecovery::empty`] if it had
    /// none).
    pub fn take_dir(&mut self, core: u16) -> DirRecovery {
        self.dirs
            .remove(&core)
            .unwrap_or_else(|| DirRecovery::empty(core))
    }
}

/// Scans the whole journal under `data_dir` (see the module docs). A missing journal
/// directory is an empty spool.
pub fn recover(data_dir: &Path) -> Result<Recovered, Error> {
    let root = data_dir.join("journal");
    let mut out = Recovered::default();
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("list journal", Some(root), e)),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list journal", Some(root.clone()), e))?;
        let name = entry.file_name();
        let core = name
            .to_str()
            .and_then(|n| n.strip_prefix("core-"))
            .and_then(|n| n.parse().ok());
        match core {
            Some(core) if entry.path().is_dir() => dirs.push((core, entry.path())),
            _ => {
                tracing::warn!(path = %entry.path().display(), "ignoring unexpected entry in journal directory")
            }
        }
    }
    dirs.sort();
    for (core, dir) in dirs {
        let d = recover_dir(core, &dir, &mut out.parts, &mut out.damage)?;
        out.dirs.insert(core, d);
    }
    Ok(out)
}

/// What recovery keeps per message while scanning: its latest copy.
struct Latest {
    location: Location,
    received_at: u64,
    sender: Option<Mailbox>,
    /// Per part: the domain and its recipients with their envelope indices.
    parts: Vec<(DomainName, Vec<(u32, Recipient)>)>,
}

fn recover_dir(
    core: u16,
    dir: &Path,
    parts_out: &mut Vec<HeldPart>,
    damage: &mut Vec<Damage>,
) -> Result<DirRecovery, Error> {
    let mut segs = Vec::new();
    for entry in
        std::fs::read_dir(dir).map_err(|e| Error::io("list journal dir", Some(dir.into()), e))?
    {
        let entry = entry.map_err(|e| Error::io("list journal dir", Some(dir.into()), e))?;
        let name = entry.file_name();
        let seq = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .filter(|n| n.len() == 16)
            .and_then(|n| u64::from_str_radix(n, 16).ok());
        match seq {
            Some(seq) => segs.push(seq),
            // A message that was arriving when the process stopped: never acknowledged, and
            // removed by the writer when it opens (see the stream module).
            None if name.to_str().is_some_and(super::stream::is_part_file) => {}
            None => {
                tracing::warn!(path = %entry.path().display(), "ignoring unexpected file in journal directory")
            }
        }
    }
    segs.sort_unstable();
    let mut rec = DirRecovery::empty(core);
    rec.next_seq = segs.last().map_or(1, |s| s.saturating_add(1));
    let mut latest: HashMap<MessageId, Latest> = HashMap::new();
    let newest = segs.last().copied();
    for seq in segs {
        let path = dir.join(format!("{seq:016x}.seg"));
        let is_newest = Some(seq) == newest;
        let mut on_record = |loc: Location, meta: Meta| {
            let id = match &meta {
                Meta::Msg(m) => m.id,
                Meta::Done { id, .. } | Meta::Expire { id, .. } | Meta::Settle { id, .. } => *id,
            };
            rec.max_id = rec.max_id.max(Some(id));
            match meta {
                Meta::Msg(m) => {
                    let live = m.parts.iter().map(|p| LivePart {
                        domain: p.domain.clone(),
                        expired: p.expired,
                    });
                    rec.ledger.place_msg(m.id, seq, loc.offset, loc.len, live);
                    let sender = m.envelope.sender.clone();
                    let parts = m
                        .parts
                        .into_iter()
                        .map(|p| {
                            let rcpts = p
                                .recipients
                                .iter()
                                .map(|i| (*i, m.envelope.recipients[*i as usize].clone()))
                                .collect();
                            (p.domain, rcpts)
                        })
                        .collect();
                    if rec.ledger.message(m.id).is_some() {
                        latest.insert(
                            m.id,
                            Latest {
                                location: loc,
                                received_at: m.received_at,
                                sender,
                                parts,
                            },
                        );
                    } else {
                        latest.remove(&m.id);
                    }
                }
                Meta::Done { id, domain, .. } => {
                    if rec.ledger.place_done(seq, id, &domain) {
                        latest.remove(&id);
                    }
                }
                Meta::Expire { id, domain } => rec.ledger.place_expire(seq, id, &domain),
                Meta::Settle { id, recipients, .. } => {
                    rec.ledger.settle(id, recipients.iter().map(|(i, _)| *i));
                    rec.ledger.place_settle(seq, id);
                }
            }
        };
        match scan_segment(&path, core, seq, is_newest, &mut on_record)? {
            Scan::Read {
                valid_end,
                damage: d,
            } => {
                rec.ledger.add_segment(seq, valid_end);
                if is_newest {
                    rec.tail = Some(Tail { seq, valid_end });
                }
                damage.extend(d);
            }
            Scan::BadHeader(d) => {
                // A newest segment without a valid header is a creation torn by a crash: it
                // holds nothing and the writer's reclaim may delete it. An older one is real
                // damage: leave the file alone for an operator to look at.
                if is_newest {
                    rec.ledger.add_segment(seq, 0);
                }
                damage.push(d);
            }
        }
    }
    for (id, m) in rec.ledger.messages() {
        let Some(l) = latest.get(&id) else { continue };
        let settled = rec.ledger.settled(id);
        for lp in &m.parts {
            let (indices, recipients) = l
                .parts
                .iter()
                .find(|(d, _)| *d == lp.domain)
                .map(|(_, r)| {
                    r.iter()
                        .filter(|(i, _)| !settled.contains(i))
                        .cloned()
                        .unzip()
                })
                .unwrap_or_default();
            parts_out.push(HeldPart {
                id,
                domain: lp.domain.clone(),
                location: l.location,
                received_at: l.received_at,
                sender: l.sender.clone(),
                recipients,
                indices,
                bytes: l.location.body_len,
                expired: lp.expired,
            });
        }
    }
    Ok(rec)
}

enum Scan {
    Read {
        valid_end: u64,
        damage: Option<Damage>,
    },
    BadHeader(Damage),
}

/// Reads one segment, calling `on_record` for every valid record in order.
fn scan_segment(
    path: &Path,
    core: u16,
    seq: u64,
    verify_bodies: bool,
    on_record: &mut dyn FnMut(Location, Meta),
) -> Result<Scan, Error> {
    let ioerr = |op, e| Error::io(op, Some(path.to_owned()), e);
    let file = File::open(path).map_err(|e| ioerr("open segment", e))?;
    let file_len = file.metadata().map_err(|e| ioerr("stat segment", e))?.len();
    let mut r = BufReader::with_capacity(256 << 10, file);
    let damage = |offset, reason| {
        tracing::warn!(path = %path.display(), offset, reason, "journal segment damaged; records from here on are ignored");
        Damage {
            path: path.to_owned(),
            offset,
            reason,
        }
    };

    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    if file_len < SEGMENT_HEADER_LEN {
        return Ok(Scan::BadHeader(damage(0, "segment header truncated")));
    }
    r.read_exact(&mut h)
        .map_err(|e| ioerr("read segment header", e))?;
    match decode_segment_header(&h) {
        Ok((c, s)) if c == core && s == seq => {}
        Ok(_) => {
            return Ok(Scan::BadHeader(damage(
                0,
                "segment header names another core or seq",
            )))
        }
        Err(reason) => return Ok(Scan::BadHeader(damage(0, reason))),
    }

    let mut pos = SEGMENT_HEADER_LEN;
    let mut meta = Vec::new();
    let mut body = vec![0u8; 64 << 10];
    let stop = loop {
        let left = file_len - pos;
        if left == 0 {
            break None;
        }
        let mut fixed = [0u8; RECORD_HEADER_LEN as usize];
        if left < RECORD_HEADER_LEN {
            let rest = &mut fixed[..left as usize];
            r.read_exact(rest).map_err(|e| ioerr("read record", e))?;
            break if rest.iter().all(|b| *b == 0) {
                None
            } else {
                Some(damage(pos, "torn record header at end of file"))
            };
        }
        r.read_exact(&mut fixed)
            .map_err(|e| ioerr("read record", e))?;
        let fh = match FixedHeader::parse(&fixed) {
            Ok(fh) => fh,
            Err(HeaderError::End) => break None,
            Err(HeaderError::Bad(reason)) => break Some(damage(pos, reason)),
        };
        let Some(len) = fh.record_len().filter(|l| *l <= left) else {
            break Some(damage(pos, "record extends past the end of the file"));
        };
        meta.resize(fh.meta_len as usize, 0);
        r.read_exact(&mut meta)
            .map_err(|e| ioerr("read record", e))?;
        if !fh.verify(&fixed, &meta) {
            break Some(damage(pos, "head checksum mismatch"));
        }
        let decoded = match decode_meta(fh.kind, &meta) {
            Ok(m) => m,
            Err(reason) => break Some(damage(pos, reason)),
        };
        if verify_bodies && fh.body_len > 0 {
            let mut crc = crc32fast::Hasher::new();
            let mut n = fh.body_len;
            while n > 0 {
                let k = n.min(body.len() as u64) as usize;
                r.read_exact(&mut body[..k])
                    .map_err(|e| ioerr("read record body", e))?;
                crc.update(&body[..k]);
                n -= k as u64;
            }
            if crc.finalize() != fh.body_crc {
                break Some(damage(pos, "body checksum mismatch"));
            }
        } else if fh.body_len > 0 {
            // `len <= left` bounds the body, and a file is smaller than i64::MAX.
            r.seek_relative(fh.body_len as i64)
                .map_err(|e| ioerr("skip record body", e))?;
        }
        let body_offset = pos + RECORD_HEADER_LEN + u64::from(fh.meta_len);
        let loc = Location {
            core,
            seq,
            offset: pos,
            len,
            body_offset,
            body_len: fh.body_len,
            body_crc: fh.body_crc,
        };
        on_record(loc, decoded);
        pos += len;
    };
    Ok(Scan::Read {
        valid_end: pos,
        damage: stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_can_move_to_the_core_threads() {
        fn send<T: Send + 'static>() {}
        send::<Recovered>();
        send::<DirRecovery>();
        send::<HeldPart>();
        send::<Error>();
        send::<super::super::Relocated>();
    }
}
