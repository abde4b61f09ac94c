//! Reading held messages back by [`Location`]: the envelope, and the body in chunks.
//!
//! The reversal streams a body from its segment file to the socket without loading it whole:
//! [`Reader::body_stream`] hands out chunks and checks the body checksum when the last chunk
//! has been read. A [`Reader`] is per core (`!Send`) and keeps a few segment files open.
//!
//! Invariants: nothing is returned from a record whose head checksum does not match, and a
//! whole body ([`Reader::read_body`], the end of a [`BodyStream`]) is only returned when its
//! checksum matches. Ranges ([`Reader::read_body_range`]) are bounds-checked but not
//! checksummed: a range cannot be checked on its own.
//!
//! Sessions read at the locations they were given when they started; the segments behind
//! them are pinned ([`SegmentPins`](super::SegmentPins)) so compaction never deletes them in
//! the meantime. A segment deleted anyway (by hand) fails with `NotFound`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::file::{IoKind, SegmentFile};
use super::journal::{segment_path, Location};
use super::record::{decode_meta, FixedHeader, Meta, MsgMeta, RECORD_HEADER_LEN};
use super::Error;

/// Bytes per read when a body is verified before sending.
const VERIFY_CHUNK: usize = 256 << 10;

/// How many segment files one reader keeps open.
const OPEN_FILES: usize = 16;

/// Reads a whole `MSG` record of `len` bytes at `offset` into `buf`, checks both checksums and
/// returns its meta and the body's offset inside `buf`.
pub(crate) async fn read_msg_record(
    file: &SegmentFile,
    path: &Path,
    offset: u64,
    len: u64,
    buf: Vec<u8>,
) -> (Result<(MsgMeta, u64), Error>, Vec<u8>) {
    let corrupt = |reason| Error::Corrupt {
        path: path.to_owned(),
        offset,
        reason,
    };
    let Ok(n) = usize::try_from(len) else {
        return (Err(corrupt("record too large for memory")), buf);
    };
    if len < RECORD_HEADER_LEN {
        return (Err(corrupt("record shorter than its header")), buf);
    }
    let (r, buf) = file.read_exact_at(buf, offset, n).await;
    if let Err(e) = r {
        return (Err(Error::io("read record", Some(path.to_owned()), e)), buf);
    }
    let res = verify_msg_record(&buf, path, offset);
    (res, buf)
}

/// Checks one whole `MSG` record (`record` is exactly its bytes, read from `offset`): both
/// checksums and the meta; returns the meta and the body's offset inside `record`.
fn verify_msg_record(record: &[u8], path: &Path, offset: u64) -> Result<(MsgMeta, u64), Error> {
    let corrupt = |reason| Error::Corrupt {
        path: path.to_owned(),
        offset,
        reason,
    };
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    h.copy_from_slice(&record[..RECORD_HEADER_LEN as usize]);
    let fh = FixedHeader::parse(&h).map_err(|_| corrupt("bad record header"))?;
    if fh.record_len() != Some(record.len() as u64) {
        return Err(corrupt("record length does not match its location"));
    }
    let body_rel = RECORD_HEADER_LEN + u64::from(fh.meta_len);
    let meta = &record[RECORD_HEADER_LEN as usize..body_rel as usize];
    if !fh.verify(&h, meta) {
        return Err(corrupt("head checksum mismatch"));
    }
    let Meta::Msg(m) = decode_meta(fh.kind, meta).map_err(corrupt)? else {
        return Err(corrupt("not a MSG record"));
    };
    if crc32fast::hash(&record[body_rel as usize..]) != fh.body_crc {
        return Err(corrupt("body checksum mismatch"));
    }
    Ok((m, body_rel))
}

/// A message read whole: its meta and its verified body.
pub type WholeMessage = Result<(MsgMeta, Vec<u8>), Error>;

/// Reads stored messages of any core's journal; one per core thread.
pub struct Reader {
    data_dir: PathBuf,
    io: IoKind,
    open: RefCell<VecDeque<((u16, u64), SegmentFile)>>,
    /// The buffer of [`Reader::read_messages`], kept between calls: a fresh one per batch
    /// costs page faults and zeroed pages.
    scratch: RefCell<Vec<u8>>,
}

/// Largest scratch buffer kept between batched reads.
const SCRATCH_KEEP: usize = 4 << 20;

impl Reader {
    /// A reader for the spool under `data_dir`, using `io` for its reads.
    pub fn new(data_dir: impl Into<PathBuf>, io: IoKind) -> Self {
        Reader {
            data_dir: data_dir.into(),
            io,
            open: RefCell::new(VecDeque::new()),
            scratch: RefCell::new(Vec::new()),
        }
    }

    async fn file(&self, core: u16, seq: u64) -> Result<SegmentFile, Error> {
        {
            let mut open = self.open.borrow_mut();
            if let Some(i) = open.iter().position(|(k, _)| *k == (core, seq)) {
                let entry = open.remove(i).expect("index from position");
                let f = entry.1.clone();
                open.push_front(entry);
                return Ok(f);
            }
        }
        let path = segment_path(&self.data_dir, core, seq);
        let f = SegmentFile::open_read(&path, self.io)
            .await
            .map_err(|e| Error::io("open segment", Some(path), e))?;
        let mut open = self.open.borrow_mut();
        open.push_front(((core, seq), f.clone()));
        open.truncate(OPEN_FILES);
        Ok(f)
    }

    /// Closes the cached descriptor of a segment (after compaction moved its messages), so
    /// the disk space of a deleted segment is returned.
    pub fn forget(&self, core: u16, seq: u64) {
        self.open.borrow_mut().retain(|(k, _)| *k != (core, seq));
    }

    /// Reads and verifies the record's header and envelope (not the body).
    pub async fn read_message(&self, loc: &Location) -> Result<MsgMeta, Error> {
        let path = || segment_path(&self.data_dir, loc.core, loc.seq);
        let corrupt = |reason| Error::Corrupt {
            path: path(),
            offset: loc.offset,
            reason,
        };
        let head_len = loc
            .body_offset
            .checked_sub(loc.offset)
            .filter(|n| *n >= RECORD_HEADER_LEN && *n <= loc.len)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(Error::InvalidLocation {
                reason: "body offset outside the record",
            })?;
        let file = self.file(loc.core, loc.seq).await?;
        let (r, buf) = file.read_exact_at(Vec::new(), loc.offset, head_len).await;
        r.map_err(|e| Error::io("read record header", Some(path()), e))?;
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        h.copy_from_slice(&buf[..RECORD_HEADER_LEN as usize]);
        let fh = FixedHeader::parse(&h).map_err(|_| corrupt("bad record header"))?;
        let meta = &buf[RECORD_HEADER_LEN as usize..];
        if fh.meta_len as usize != meta.len() || fh.body_len != loc.body_len {
            return Err(corrupt("record does not match its location"));
        }
        if !fh.verify(&h, meta) {
            return Err(corrupt("head checksum mismatch"));
        }
        match decode_meta(fh.kind, meta).map_err(corrupt)? {
            Meta::Msg(m) => Ok(m),
            _ => Err(corrupt("not a MSG record")),
        }
    }

    /// Reads several messages whole: the envelope and the checksummed body of each, with one
    /// read per run of records that lie back to back in one segment (held mail usually does:
    /// each core appends in arrival order). For the reversal's small messages, where two
    /// reads per message (head, then body) cost more than the bytes. Results are in `locs`
    /// order; at most `max_read` bytes are read at once.
    pub async fn read_messages(&self, locs: &[Location], max_read: u64) -> Vec<WholeMessage> {
        // Read in file order (the queue interleaves the cores' journals), answer in `locs` order.
        let mut order: Vec<usize> = (0..locs.len()).collect();
        order.sort_by_key(|&i| (locs[i].core, locs[i].seq, locs[i].offset));
        let sorted: Vec<Location> = order.iter().map(|&i| locs[i]).collect();
        let mut results = Vec::with_capacity(locs.len());
        let mut i = 0;
        while i < sorted.len() {
            let first = &sorted[i];
            let mut end = i + 1;
            let mut total = first.len;
            while let Some(next) = sorted.get(end) {
                let prev = &sorted[end - 1];
                let adjacent = (next.core, next.seq) == (first.core, first.seq)
                    && prev.offset.checked_add(prev.len) == Some(next.offset);
                if !adjacent || total + next.len > max_read {
                    break;
                }
                total += next.len;
                end += 1;
            }
            self.read_run(&sorted[i..end], total, &mut results).await;
            i = end;
        }
        let mut out: Vec<Option<WholeMessage>> = (0..locs.len()).map(|_| None).collect();
        for (r, &i) in results.into_iter().zip(&order) {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.expect("one result per location"))
            .collect()
    }

    /// One read for back-to-back records `run` (`total` bytes), each then checked on its own.
    async fn read_run(&self, run: &[Location], total: u64, out: &mut Vec<WholeMessage>) {
        let path = segment_path(&self.data_dir, run[0].core, run[0].seq);
        let read = match (
            self.file(run[0].core, run[0].seq).await,
            usize::try_from(total),
        ) {
            (Ok(file), Ok(n)) => {
                let scratch = std::mem::take(&mut *self.scratch.borrow_mut());
                let (r, buf) = file.read_exact_at(scratch, run[0].offset, n).await;
                r.map(|()| buf)
                    .map_err(|e| Error::io("read records", Some(path.clone()), e))
            }
            (Err(e), _) => Err(e),
            (_, Err(_)) => Err(Error::InvalidLocation {
                reason: "records too large for memory",
            }),
        };
        let buf = match read {
            Ok(buf) => buf,
            Err(e) => {
                out.push(Err(e));
                for loc in &run[1..] {
                    // Each on its own, so one bad location does not fail its neighbours.
                    out.push(self.read_one(loc).await);
                }
                return;
            }
        };
        let mut at = 0usize;
        for loc in run {
            let record = &buf[at..at + loc.len as usize];
            at += loc.len as usize;
            out.push(self.split_record(record, loc, &path));
        }
        if buf.capacity() <= SCRATCH_KEEP {
            *self.scratch.borrow_mut() = buf;
        }
    }

    async fn read_one(&self, loc: &Location) -> WholeMessage {
        let path = segment_path(&self.data_dir, loc.core, loc.seq);
        let n = usize::try_from(loc.len).map_err(|_| Error::InvalidLocation {
            reason: "record too large for memory",
        })?;
        let file = self.file(loc.core, loc.seq).await?;
        let (r, buf) = file.read_exact_at(Vec::new(), loc.offset, n).await;
        r.map_err(|e| Error::io("read record", Some(path.clone()), e))?;
        self.split_record(&buf, loc, &path)
    }

    fn split_record(&self, record: &[u8], loc: &Location, path: &Path) -> WholeMessage {
        if (record.len() as u64) < RECORD_HEADER_LEN {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                offset: loc.offset,
                reason: "record shorter than its header",
            });
        }
        let (meta, body_rel) = verify_msg_record(record, path, loc.offset)?;
        if loc.offset + body_rel != loc.body_offset
            || record.len() as u64 - body_rel != loc.body_len
        {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                offset: loc.offset,
                reason: "record does not match its location",
            });
        }
        Ok((meta, record[body_rel as usize..].to_vec()))
    }

    /// Reads `len` body bytes starting `offset` bytes into the body, into `buf` (recycled;
    /// its old contents are dropped). Not checksummed; see [`Reader::body_stream`].
    pub async fn read_body_range(
        &self,
        loc: &Location,
        offset: u64,
        len: usize,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>, Error> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > loc.body_len) {
            return Err(Error::InvalidLocation {
                reason: "range beyond the end of the body",
            });
        }
        let file = self.file(loc.core, loc.seq).await?;
        let (r, buf) = file.read_exact_at(buf, loc.body_offset + offset, len).await;
        r.map_err(|e| {
            Error::io(
                "read body",
                Some(segment_path(&self.data_dir, loc.core, loc.seq)),
                e,
            )
        })?;
        Ok(buf)
    }

    /// Reads the whole body into memory and verifies its checksum.
    pub async fn read_body(&self, loc: &Location) -> Result<Vec<u8>, Error> {
        let len = usize::try_from(loc.body_len).map_err(|_| Error::InvalidLocation {
            reason: "body too large for memory",
        })?;
        let buf = self.read_body_range(loc, 0, len, Vec::new()).await?;
        if crc32fast::hash(&buf) != loc.body_crc {
            return Err(Error::Corrupt {
                path: segment_path(&self.data_dir, loc.core, loc.seq),
                offset: loc.offset,
                reason: "body checksum mismatch",
            });
        }
        Ok(buf)
    }

    /// Reads the body through once and checks its checksum, without keeping it: a large body
    /// is verified before its transfer starts, so a damaged one is never half sent (a body
    /// cut off mid-transfer would cost the whole session).
    pub async fn verify_body(&self, loc: &Location) -> Result<(), Error> {
        let mut stream = self.body_stream(*loc, VERIFY_CHUNK);
        let mut buf = Vec::with_capacity(VERIFY_CHUNK.min(loc.body_len as usize));
        while let Some(b) = stream.next_chunk(buf).await? {
            buf = b;
        }
        Ok(())
    }

    /// Streams the body in chunks of at most `chunk` bytes, verifying the checksum at the end.
    pub fn body_stream(&self, loc: Location, chunk: usize) -> BodyStream<'_> {
        BodyStream {
            reader: self,
            loc,
            pos: 0,
            chunk: chunk.max(1),
            first: None,
            crc: crc32fast::Hasher::new(),
        }
    }
}

/// A body read chunk by chunk; see [`Reader::body_stream`].
///
/// The checksum can only be known once every byte went past, so a mismatch is reported by the
/// call that would return the last chunk. A caller that already sent earlier chunks must then
/// abort the transaction (drop the connection before the final `.` or the last BDAT byte).
pub struct BodyStream<'a> {
    reader: &'a Reader,
    loc: Location,
    pos: u64,
    chunk: usize,
    /// The size of the first chunk, when it differs.
    first: Option<usize>,
    crc: crc32fast::Hasher,
}

impl BodyStream<'_> {
    /// Makes the first chunk at most `n` bytes: a caller that copies it behind a command
    /// (one write for both) copies little, and the rest goes out in full-size chunks.
    pub fn with_first_chunk(mut self, n: usize) -> Self {
        self.first = Some(n.max(1));
        self
    }

    /// Body bytes not yet returned.
    pub fn remaining(&self) -> u64 {
        self.loc.body_len - self.pos
    }

    /// The next chunk in `buf` (recycled), or `None` after the last one.
    pub async fn next_chunk(&mut self, buf: Vec<u8>) -> Result<Option<Vec<u8>>, Error> {
        let left = self.remaining();
        if left == 0 {
            return Ok(None);
        }
        let n = left.min(self.first.take().unwrap_or(self.chunk) as u64) as usize;
        let buf = self
            .reader
            .read_body_range(&self.loc, self.pos, n, buf)
            .await?;
        self.crc.update(&buf);
        self.pos += n as u64;
        if self.pos == self.loc.body_len
            && std::mem::take(&mut self.crc).finalize() != self.loc.body_crc
        {
            return Err(Error::Corrupt {
                path: segment_path(&self.reader.data_dir, self.loc.core, self.loc.seq),
                offset: self.loc.offset,
                reason: "body checksum mismatch",
            });
        }
        Ok(Some(buf))
    }
}
