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
use std::io::{self, BufReader, Read, Seek, SeekFrom};
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

/// A damaged stretch of a segment that recovery skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Offset of the first byte not accepted.
    pub offset: u64,
    /// Bytes skipped: up to the next intact record, or to the end of the file.
    pub skipped: u64,
    /// What was wrong there.
    pub reason: &'static str,
    /// The kind of record the stretch starts with, when its kind byte is readable (`DONE`
    /// matters: the parts it finished are held again).
    pub kind: Option<&'static str>,
}

/// A segment file that the journal's manifest lists but that is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingSegment {
    /// The journal directory (core).
    pub core: u16,
    /// The segment's sequence number.
    pub seq: u64,
    /// Live parts it held when the manifest was last written (a later DONE may have
    /// finished some): the parts lost with it, at most.
    pub live_parts: u64,
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
    /// Held messages (in `parts`) whose stored body fails its checksum: quarantine them.
    pub damaged: Vec<MessageId>,
    /// Segments the manifest lists that are gone (their parts are lost).
    pub missing: Vec<MissingSegment>,
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
        let d = recover_dir(core, &dir, &mut out)?;
        out.dirs.insert(core, d);
    }
    Ok(out)
}

/// The manifest of a journal directory: the segments the writer holds and their live parts
/// when it was last written (see `docs/spool-format.md`). Advisory: it only serves to notice
/// segments that disappeared.
pub(crate) const MANIFEST: &str = "manifest";
pub(crate) const MANIFEST_TMP: &str = "manifest.tmp";
const MANIFEST_HEAD: &str = "turnpike journal manifest 1";

/// Encodes a manifest: one `seq live_parts` line per segment, oldest first.
pub(crate) fn encode_manifest(segments: impl IntoIterator<Item = (u64, u64)>) -> String {
    let mut out = format!("{MANIFEST_HEAD}\n");
    for (seq, live) in segments {
        out += &format!("{seq:016x} {live}\n");
    }
    out
}

/// Reads `<dir>/manifest`; an absent or unreadable one lists nothing (logged).
fn read_manifest(dir: &Path) -> Vec<(u64, u64)> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "journal manifest unreadable; missing segments cannot be noticed");
            return Vec::new();
        }
    };
    let mut lines = text.lines();
    if lines.next() != Some(MANIFEST_HEAD) {
        tracing::warn!(path = %path.display(), "journal manifest has an unknown format; ignored");
        return Vec::new();
    }
    let mut out: Vec<(u64, u64)> = lines
        .filter_map(|l| {
            let (seq, live) = l.split_once(' ')?;
            Some((u64::from_str_radix(seq, 16).ok()?, live.parse().ok()?))
        })
        .collect();
    out.sort_unstable();
    out
}

/// What recovery keeps per message while scanning: its latest copy.
struct Latest {
    location: Location,
    received_at: u64,
    sender: Option<Mailbox>,
    /// Per part: the domain and its recipients with their envelope indices.
    parts: Vec<(DomainName, Vec<(u32, Recipient)>)>,
}

fn recover_dir(core: u16, dir: &Path, out: &mut Recovered) -> Result<DirRecovery, Error> {
    let parts_out = &mut out.parts;
    let damage = &mut out.damage;
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
            None if name == MANIFEST || name == MANIFEST_TMP => {}
            None => {
                tracing::warn!(path = %entry.path().display(), "ignoring unexpected file in journal directory")
            }
        }
    }
    segs.sort_unstable();
    let mut rec = DirRecovery::empty(core);
    let listed = read_manifest(dir);
    for (seq, live_parts) in &listed {
        // One that held nothing live cost nothing (a deletion the manifest did not catch up
        // with, at worst).
        if *live_parts > 0 && segs.binary_search(seq).is_err() {
            tracing::error!(dir = %dir.display(), seq = format!("{seq:016x}"), live_parts, "journal segment missing: the manifest lists it, the file is gone; up to this many held parts are lost with it");
            out.missing.push(MissingSegment {
                core,
                seq: *seq,
                live_parts: *live_parts,
            });
        }
    }
    // Never reuse the number of a segment that vanished.
    let newest = segs.last().copied().max(listed.last().map(|(s, _)| *s));
    rec.next_seq = newest.map_or(1, |s| s.saturating_add(1));
    let mut latest: HashMap<MessageId, Latest> = HashMap::new();
    let mut damaged: Vec<(MessageId, Location)> = Vec::new();
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
        let scan = scan_segment(&path, core, seq, is_newest, &mut on_record)?;
        damage.extend(scan.damage);
        damaged.extend(scan.damaged_msgs);
        if scan.bad_header && scan.records == 0 {
            // A newest segment without a valid header is a creation torn by a crash: it
            // holds nothing and the writer's reclaim may delete it. An older one is real
            // damage: leave the file alone for an operator to look at.
            if is_newest {
                rec.ledger.add_segment(seq, 0);
            }
        } else {
            rec.ledger.add_segment(seq, scan.valid_end);
            if is_newest {
                rec.tail = Some(Tail {
                    seq,
                    valid_end: scan.valid_end,
                });
            }
        }
    }
    // A damaged body copied forward by compaction is not damaged in its later copy.
    damaged.retain(|(id, at)| latest.get(id).is_some_and(|l| l.location == *at));
    for (id, at) in &damaged {
        tracing::error!(%id, path = %dir.join(format!("{:016x}.seg", at.seq)).display(), offset = at.offset, "held message with a damaged body; it will be quarantined");
    }
    out.damaged.extend(damaged.iter().map(|(id, _)| *id));
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

/// What scanning one segment found.
struct Scan {
    /// End of the last record accepted (where the writer may seal a newest segment).
    valid_end: u64,
    /// Every damaged stretch, in file order.
    damage: Vec<Damage>,
    /// `MSG` records whose head is intact but whose body fails its checksum, with valid
    /// records after them: held (they were acknowledged), to be quarantined.
    damaged_msgs: Vec<(MessageId, Location)>,
    /// The segment header is unusable; `records` says whether anything was proven intact.
    bad_header: bool,
    /// Records accepted.
    records: u64,
}

/// Reads one segment, calling `on_record` for every valid record in order.
///
/// The common case streams record heads (and, with `verify_bodies`, bodies) from a buffered
/// reader. At the first thing that is not a clean record, the rest of the file is read into
/// memory and scanned with [`resync`]: every record from there on must pass both checksums.
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
    let mut scan = Scan {
        valid_end: SEGMENT_HEADER_LEN,
        damage: Vec::new(),
        damaged_msgs: Vec::new(),
        bad_header: false,
        records: 0,
    };

    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    if file_len < SEGMENT_HEADER_LEN {
        scan.bad_header = true;
        scan.valid_end = 0;
        scan.damage
            .push(damage(path, 0, file_len, "segment header truncated"));
        return Ok(scan);
    }
    r.read_exact(&mut h)
        .map_err(|e| ioerr("read segment header", e))?;
    match decode_segment_header(&h) {
        Ok((c, s)) if c == core && s == seq => {}
        Ok(_) => {
            // Someone else's segment under our name: none of its records are ours.
            scan.bad_header = true;
            scan.valid_end = 0;
            let d = damage(
                path,
                0,
                file_len,
                "segment header names another core or seq",
            );
            scan.damage.push(d);
            return Ok(scan);
        }
        Err(reason) => {
            // The header is damaged, not the records: keep every record that proves
            // itself (both checksums) from the first record position on.
            scan.bad_header = true;
            scan.damage
                .push(damage(path, 0, SEGMENT_HEADER_LEN, reason));
            let rest = read_rest(&mut r, file_len - SEGMENT_HEADER_LEN)
                .map_err(|e| ioerr("read segment", e))?;
            resync(
                path,
                core,
                seq,
                &rest,
                SEGMENT_HEADER_LEN,
                &mut scan,
                on_record,
            );
            return Ok(scan);
        }
    }

    let mut pos = SEGMENT_HEADER_LEN;
    let mut meta = Vec::new();
    let mut body = vec![0u8; 64 << 10];
    loop {
        let left = file_len - pos;
        if left == 0 {
            break;
        }
        let mut fixed = [0u8; RECORD_HEADER_LEN as usize];
        if left < RECORD_HEADER_LEN {
            let rest = &mut fixed[..left as usize];
            r.read_exact(rest).map_err(|e| ioerr("read record", e))?;
            if !rest.iter().all(|b| *b == 0) {
                scan.damage
                    .push(damage(path, pos, left, "torn record header at end of file"));
            }
            break;
        }
        r.read_exact(&mut fixed)
            .map_err(|e| ioerr("read record", e))?;
        let problem = match FixedHeader::parse(&fixed) {
            Err(HeaderError::End) => break,
            Err(HeaderError::Bad(reason)) => Some(reason),
            Ok(fh) => match fh.record_len().filter(|l| *l <= left) {
                None => Some("record extends past the end of the file"),
                Some(len) => {
                    meta.resize(fh.meta_len as usize, 0);
                    r.read_exact(&mut meta)
                        .map_err(|e| ioerr("read record", e))?;
                    if !fh.verify(&fixed, &meta) {
                        Some("head checksum mismatch")
                    } else {
                        match decode_meta(fh.kind, &meta) {
                            Err(reason) => Some(reason),
                            Ok(decoded) => {
                                let mut body_ok = true;
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
                                    body_ok = crc.finalize() == fh.body_crc;
                                } else if fh.body_len > 0 {
                                    // `len <= left` bounds the body, and a file is smaller
                                    // than i64::MAX.
                                    r.seek_relative(fh.body_len as i64)
                                        .map_err(|e| ioerr("skip record body", e))?;
                                }
                                if body_ok {
                                    on_record(location(core, seq, pos, len, &fh), decoded);
                                    scan.records += 1;
                                    pos += len;
                                    scan.valid_end = pos;
                                    continue;
                                }
                                Some("body checksum mismatch")
                            }
                        }
                    }
                }
            },
        };
        if problem.is_some() {
            // From here on, in memory: resync past the damage (the record at `pos` is looked
            // at again there, whole).
            r.seek(SeekFrom::Start(pos))
                .map_err(|e| ioerr("seek segment", e))?;
            let rest = read_rest(&mut r, file_len - pos).map_err(|e| ioerr("read segment", e))?;
            resync(path, core, seq, &rest, pos, &mut scan, on_record);
            break;
        }
    }
    Ok(scan)
}

fn read_rest(r: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    let mut rest = Vec::with_capacity(len as usize);
    r.take(len).read_to_end(&mut rest)?;
    Ok(rest)
}

fn damage(path: &Path, offset: u64, skipped: u64, reason: &'static str) -> Damage {
    Damage {
        path: path.to_owned(),
        offset,
        skipped,
        reason,
        kind: None,
    }
}

fn location(core: u16, seq: u64, pos: u64, len: u64, fh: &FixedHeader) -> Location {
    Location {
        core,
        seq,
        offset: pos,
        len,
        body_offset: pos + RECORD_HEADER_LEN + u64::from(fh.meta_len),
        body_len: fh.body_len,
        body_crc: fh.body_crc,
    }
}

/// A record that starts at `buf[at..]`, checked whole: both checksums and the meta.
struct Found {
    fh: FixedHeader,
    meta: Meta,
    len: u64,
    body_ok: bool,
}

fn record_at(buf: &[u8], at: usize) -> Result<Found, &'static str> {
    let rest = &buf[at..];
    if rest.len() < RECORD_HEADER_LEN as usize {
        return Err("torn record header at end of file");
    }
    let mut fixed = [0u8; RECORD_HEADER_LEN as usize];
    fixed.copy_from_slice(&rest[..RECORD_HEADER_LEN as usize]);
    let fh = match FixedHeader::parse(&fixed) {
        Ok(fh) => fh,
        Err(HeaderError::End) => return Err("zeros"),
        Err(HeaderError::Bad(reason)) => return Err(reason),
    };
    let len = fh
        .record_len()
        .filter(|l| *l <= rest.len() as u64)
        .ok_or("record extends past the end of the file")?;
    let meta_end = RECORD_HEADER_LEN as usize + fh.meta_len as usize;
    let meta = &rest[RECORD_HEADER_LEN as usize..meta_end];
    if !fh.verify(&fixed, meta) {
        return Err("head checksum mismatch");
    }
    let meta = decode_meta(fh.kind, meta)?;
    let body_ok = crc32fast::hash(&rest[meta_end..len as usize]) == fh.body_crc;
    Ok(Found {
        fh,
        meta,
        len,
        body_ok,
    })
}

/// Where the next intact record after damage at `from` starts: first where the damaged
/// header says (when its length can be read), else at the next byte from which a whole
/// record (both checksums) follows. Zero bytes never start a record.
fn next_intact(buf: &[u8], from: usize) -> Option<usize> {
    let intact = |q: usize| record_at(buf, q).is_ok_and(|f| f.body_ok);
    if buf.len() - from >= RECORD_HEADER_LEN as usize {
        let claimed = u32::from_le_bytes(buf[from + 4..from + 8].try_into().expect("4 bytes"))
            as usize
            + RECORD_HEADER_LEN as usize;
        let body = u64::from_le_bytes(buf[from + 8..from + 16].try_into().expect("8 bytes"));
        if let Some(q) = usize::try_from(body)
            .ok()
            .and_then(|b| from.checked_add(claimed)?.checked_add(b))
        {
            if q > from && q < buf.len() && intact(q) {
                return Some(q);
            }
        }
    }
    let mut q = from + 1;
    while q < buf.len() {
        match buf[q..].iter().position(|b| *b != 0) {
            None => return None,
            Some(skip) => q += skip,
        }
        if intact(q) {
            return Some(q);
        }
        q += 1;
    }
    None
}

/// Scans `buf` (the segment from file offset `base` on) record by record, verifying every
/// one whole. A damaged stretch is
/// reported and skipped to the next intact record; a `MSG` whose body alone fails is kept
/// (and listed in `damaged_msgs`) when an intact record follows it, and is a torn tail when
/// nothing does.
fn resync(
    path: &Path,
    core: u16,
    seq: u64,
    buf: &[u8],
    base: u64,
    scan: &mut Scan,
    on_record: &mut dyn FnMut(Location, Meta),
) {
    let mut at = 0usize;
    let mut problem: Option<&'static str> = None;
    // A record with a damaged body, held back until we know whether anything follows it.
    let mut held_back: Option<(Location, Meta, MessageId)> = None;
    loop {
        if let Some(reason) = problem.take() {
            let next = next_intact(buf, at);
            let end = next.unwrap_or(buf.len());
            let mut d = damage(path, base + at as u64, (end - at) as u64, reason);
            d.kind = kind_name(buf[at]);
            log_damage(&d, next.is_some());
            scan.damage.push(d);
            match next {
                Some(q) => at = q,
                None => break,
            }
        }
        if at >= buf.len()
            || buf[at..]
                .iter()
                .take(RECORD_HEADER_LEN as usize)
                .all(|b| *b == 0)
        {
            break; // end of file, or the zeroed tail
        }
        match record_at(buf, at) {
            Err(reason) => problem = Some(reason),
            Ok(f) => {
                let loc = location(core, seq, base + at as u64, f.len, &f.fh);
                let id = match &f.meta {
                    Meta::Msg(m) => Some(m.id),
                    _ => None,
                };
                if let Some((l, m, id)) = held_back.take() {
                    // Something intact follows: the damaged one was written whole once.
                    let mut d = damage(path, l.offset, 0, "body checksum mismatch");
                    d.kind = Some("MSG");
                    scan.damage.push(d);
                    scan.damaged_msgs.push((id, l));
                    on_record(l, m);
                    scan.records += 1;
                }
                at += f.len as usize;
                if f.body_ok {
                    on_record(loc, f.meta);
                    scan.records += 1;
                    scan.valid_end = base + at as u64;
                } else if let Some(id) = id {
                    held_back = Some((loc, f.meta, id));
                }
            }
        }
    }
    if let Some((loc, _, id)) = held_back {
        // The last record, its body never complete: a torn tail, never acknowledged.
        let d = damage(path, loc.offset, loc.len, "body checksum mismatch");
        tracing::warn!(path = %path.display(), offset = loc.offset, %id, "journal segment ends in a torn message; it is dropped (never acknowledged)");
        scan.damage.push(d);
    }
}

/// The record kind a damaged stretch starts with, when its kind byte is readable.
fn kind_name(b: u8) -> Option<&'static str> {
    match b {
        1 => Some("MSG"),
        2 => Some("DONE"),
        3 => Some("EXPIRE"),
        4 => Some("SETTLE"),
        _ => None,
    }
}

fn log_damage(d: &Damage, resumed: bool) {
    let path = d.path.display();
    match (d.kind, resumed) {
        (Some("DONE") | Some("SETTLE"), _) => {
            tracing::error!(%path, offset = d.offset, skipped = d.skipped, reason = d.reason, "damaged DONE/SETTLE record skipped: the parts it finished are held again and may be delivered twice (at-least-once)")
        }
        (_, true) => {
            tracing::error!(%path, offset = d.offset, skipped = d.skipped, reason = d.reason, kind = d.kind.unwrap_or("unknown"), "journal segment damaged; skipped to the next intact record")
        }
        (_, false) => {
            tracing::warn!(%path, offset = d.offset, skipped = d.skipped, reason = d.reason, kind = d.kind.unwrap_or("unknown"), "journal segment damaged; nothing intact after it (a torn tail, or lost records)")
        }
    }
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
