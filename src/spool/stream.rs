//! Streamed appends: a message too big to buffer goes to disk while it arrives.
//!
//! A [`StreamAppend`] writes one `MSG` record into a file of its own,
//! `<data>/journal/core-N/incoming-<id:032x>.part`, body first, in the order the bytes come.
//! Nothing in that file is part of the journal yet: recovery never reads `.part` files, and
//! the writer removes any it finds when it opens (they are messages a crash cut off, never
//! acknowledged). [`StreamAppend::commit`] makes it a segment:
//!
//! 1. fdatasync the body (the big sync happens here, on the session's own file, not in the
//!    core's group commit);
//! 2. the core's writer, in its own order, takes the next segment number `S`, writes the
//!    segment header and the record head (fixed header and meta) in front of the body,
//!    fdatasyncs, renames the file to `S.seg`, fsyncs the directory, and makes `S` its current
//!    segment (later records append after the big one; the previous current segment is cut at
//!    its last record). Only then does the commit resolve with the record's [`Location`].
//!
//! File layout, the same as any segment once renamed (`docs/spool-format.md`):
//!
//! ```text
//! 0                32 segment header (seq unknown until the commit: written last)
//! 32               24 record header  (body length and CRC unknown: written last)
//! 56         meta_len meta           (written last, with the envelope's final BODY= type)
//! 56+meta_len         body           (streamed)
//! ```
//!
//! # Invariants
//!
//! - An aborted, refused or crashed stream leaves nothing recovery could take for a message:
//!   only a `.part` file, which is removed (by [`StreamAppend::abort`], by `Drop`, or when the
//!   writer next opens).
//! - The body is durable before its head is written, and the head before the file gets a
//!   segment name; so a `.seg` file from a stream always holds one complete record.
//! - The segment number is taken when the record joins the journal, so it is the newest
//!   segment of the directory then, and every record appended after it (its `DONE` included)
//!   lands in it or a later one: the order rules of the format hold as for any append.

use std::path::{Path, PathBuf};

use super::error::out_of_space;
use super::file::{sync_dir, SegmentFile};
use super::journal::{journal_dir, segment_path, JournalConfig, JournalHandle, Location};
use super::record::{self, encode_segment_header, Part, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use super::Error;
use crate::types::{Envelope, MessageId};

/// File name suffix of streams in progress.
const PART_SUFFIX: &str = ".part";

/// The file a stream for `id` writes before it is committed.
fn part_path(dir: &Path, id: MessageId) -> PathBuf {
    dir.join(format!("incoming-{:032x}{PART_SUFFIX}", id.0))
}

/// True for the name of a stream's file (left behind by a crash): not a segment.
pub(crate) fn is_part_file(name: &str) -> bool {
    name.starts_with("incoming-") && name.ends_with(PART_SUFFIX)
}

/// Removes the streams a crash left in `dir` (blocking; the writer calls it when it opens).
/// Returns how many there were.
pub(crate) fn remove_leftovers(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(is_part_file) {
            std::fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// One message being written to its own file while it arrives; see the module docs.
///
/// Dropping it without [`commit`](StreamAppend::commit) removes the file.
pub struct StreamAppend {
    journal: JournalHandle,
    id: MessageId,
    received_at: u64,
    parts: Vec<Part>,
    meta_len: u64,
    file: Option<SegmentFile>,
    path: PathBuf,
    body_len: u64,
    crc: crc32fast::Hasher,
}

/// A stream whose body is durable, handed to the writer to become a segment.
pub(crate) struct Finished {
    pub(crate) id: MessageId,
    pub(crate) file: SegmentFile,
    pub(crate) path: PathBuf,
    /// Segment header + record head + meta, less the seq (filled in by `publish`).
    head: Vec<u8>,
    pub(crate) parts: Vec<Part>,
    pub(crate) body_len: u64,
    pub(crate) body_crc: u32,
    pub(crate) record_len: u64,
}

impl JournalHandle {
    /// Starts a streamed `MSG` record for `id` (see the [module docs](self)): creates its
    /// file. `envelope` must have the recipients it will be committed with; only its `BODY=`
    /// type may still change (it does not change the record's size).
    pub async fn begin_stream(
        &self,
        id: MessageId,
        received_at: u64,
        envelope: &Envelope,
    ) -> Result<StreamAppend, Error> {
        self.own(id)?;
        self.check_open()?;
        let parts = record::parts_of(envelope);
        let mut head = Vec::new();
        let enc = record::encode_msg_head(&mut head, id, received_at, envelope, &parts, 0, 0)?;
        let cfg = self.config();
        let path = part_path(&journal_dir(&cfg.data_dir, cfg.core), id);
        let file = SegmentFile::create_new(&path, cfg.io)
            .await
            .map_err(|e| io_error("create streamed message", &path, e))?;
        Ok(StreamAppend {
            journal: self.clone(),
            id,
            received_at,
            parts,
            meta_len: enc.body_rel - RECORD_HEADER_LEN,
            file: Some(file),
            path,
            body_len: 0,
            crc: crc32fast::Hasher::new(),
        })
    }
}

impl StreamAppend {
    /// Offset of the body in the file.
    fn body_offset(&self) -> u64 {
        SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + self.meta_len
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// Body bytes written so far.
    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// Appends `buf` to the body and hands the buffer back. After an error the stream is
    /// unusable: [`abort`](Self::abort) it.
    pub async fn write(&mut self, buf: Vec<u8>) -> (Result<(), Error>, Vec<u8>) {
        let Some(file) = &self.file else {
            return (Err(Error::Closed), buf);
        };
        let pos = self.body_offset() + self.body_len;
        let (r, buf) = file.write_all_at(buf, pos).await;
        if let Err(e) = r {
            self.file = None;
            return (Err(io_error("write streamed message", &self.path, e)), buf);
        }
        self.crc.update(&buf);
        self.body_len += buf.len() as u64;
        (Ok(()), buf)
    }

    /// Makes the message durable and part of the journal (see the module docs), and returns
    /// where its record is. `envelope` is the one given to `begin_stream`, possibly with
    /// another `BODY=` type. On error the file is removed and nothing was stored.
    pub async fn commit(mut self, envelope: &Envelope) -> Result<Location, Error> {
        let Some(file) = self.file.take() else {
            return Err(Error::Closed);
        };
        let mut head = encode_segment_header(0, 0).to_vec();
        let body_crc = self.crc.clone().finalize();
        let enc = record::encode_msg_head(
            &mut head,
            self.id,
            self.received_at,
            envelope,
            &self.parts,
            self.body_len,
            body_crc,
        )?;
        if enc.body_rel - RECORD_HEADER_LEN != self.meta_len {
            self.remove().await;
            return Err(Error::InvalidLocation {
                reason: "streamed message's envelope changed size",
            });
        }
        if let Err(e) = file.sync_data().await {
            let e = io_error("fdatasync streamed message", &self.path, e);
            self.remove().await;
            return Err(e);
        }
        let finished = Finished {
            id: self.id,
            file,
            path: self.path.clone(),
            head,
            parts: std::mem::take(&mut self.parts),
            body_len: self.body_len,
            body_crc,
            record_len: enc.len,
        };
        // From here the writer owns the file: it renames it, or removes it on failure.
        self.path = PathBuf::new();
        self.journal.adopt(finished).await
    }

    /// Gives the message up: its file is removed.
    pub async fn abort(mut self) {
        self.remove().await;
    }

    async fn remove(&mut self) {
        self.file = None;
        let path = std::mem::take(&mut self.path);
        remove_quietly(path).await;
    }
}

impl Drop for StreamAppend {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        if path.as_os_str().is_empty() {
            return;
        }
        // A session that ended mid-message. Freeing a big file's blocks can take a while, so
        // off the core thread when there is a runtime to take it.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || remove_logged(&path))),
            Err(_) => remove_logged(&path),
        }
    }
}

/// A full disk is [`Error::NoSpace`] (`452 4.3.1`), like for any append.
fn io_error(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    if out_of_space(&e) {
        Error::NoSpace { op }
    } else {
        Error::io(op, Some(path.to_owned()), e)
    }
}

async fn remove_quietly(path: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || remove_logged(&path)).await;
}

fn remove_logged(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove an unfinished incoming message");
    }
}

impl Finished {
    /// Gives a finished stream up (the writer refuses appends): its file is removed.
    pub(crate) async fn discard(self) {
        remove_quietly(self.path).await;
    }

    /// Turns the durable stream into segment `seq` of `cfg`'s directory: writes its headers,
    /// fdatasyncs, renames it and fsyncs the directory. On error before the rename the file is
    /// removed; `Err((e, true))` means the rename happened and its durability is unknown.
    pub(crate) async fn publish(
        mut self,
        cfg: &JournalConfig,
        seq: u64,
    ) -> Result<(SegmentFile, u64), (Error, bool)> {
        self.head[..SEGMENT_HEADER_LEN as usize]
            .copy_from_slice(&encode_segment_header(cfg.core, seq));
        let head = std::mem::take(&mut self.head);
        let (r, _) = self.file.write_all_at(head, 0).await;
        let r = match r {
            Ok(()) => self.file.sync_data().await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            let e = io_error("write streamed message head", &self.path, e);
            remove_quietly(self.path).await;
            return Err((e, false));
        }
        let to = segment_path(&cfg.data_dir, cfg.core, seq);
        let from = self.path.clone();
        let target = to.clone();
        let renamed = tokio::task::spawn_blocking(move || std::fs::rename(from, target))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = renamed {
            remove_quietly(self.path).await;
            return Err((Error::io("rename streamed message", Some(to), e), false));
        }
        let dir = journal_dir(&cfg.data_dir, cfg.core);
        if let Err(e) = sync_dir(&dir).await {
            return Err((Error::io("fsync journal dir", Some(dir), e), true));
        }
        Ok((self.file, SEGMENT_HEADER_LEN + self.record_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testutil::temp_dir;
    use crate::spool::{recover, DirRecovery, IoKind, Reader};
    use crate::types::{DomainName, Mailbox, Recipient};

    fn run_local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    fn env(domain: &str) -> Envelope {
        Envelope {
            recipients: vec![Recipient {
                mailbox: Mailbox {
                    local: "a".into(),
                    domain: domain.into(),
                },
                notify: None,
                orcpt: None,
            }],
            ..Envelope::default()
        }
    }

    async fn streamed(j: &JournalHandle, id: u64, pieces: &[&[u8]]) -> Location {
        let mut s = j
            .begin_stream(MessageId(u128::from(id)), 7, &env("x.example"))
            .await
            .unwrap();
        for p in pieces {
            let (r, _) = s.write(p.to_vec()).await;
            r.unwrap();
        }
        s.commit(&env("x.example")).await.unwrap()
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(journal_dir(dir, 0))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_streamed_message_becomes_the_newest_segment_and_reads_back() {
        let dir = temp_dir("stream-commit");
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (loc, small_loc, done_loc) = run_local(async {
            let j = JournalHandle::open(
                JournalConfig::new(&dir, 0, IoKind::Epoll),
                DirRecovery::empty(0),
            )
            .await
            .unwrap();
            j.append_message(MessageId(1), 1, &env("x.example"), b"small one\r\n")
                .await
                .unwrap();
            let before = j.current_segment().unwrap();
            let loc = streamed(
                &j,
                2,
                &[b"Received: x\r\n", &big[..100_000], &big[100_000..]],
            )
            .await;
            assert!(loc.seq > before, "a new, newest segment");
            assert_eq!(
                j.current_segment(),
                Some(loc.seq),
                "it is the current one now"
            );
            assert_eq!(loc.body_len, 13 + big.len() as u64);
            // Later records land after it, in the same segment.
            let small = j
                .append_message(MessageId(3), 1, &env("x.example"), b"after\r\n")
                .await
                .unwrap();
            let d = DomainName::parse("x.example").unwrap();
            let done = j
                .append_done(MessageId(2), &d, record::Outcome::Delivered)
                .await
                .unwrap();
            let body = Reader::new(&dir, IoKind::Epoll)
                .read_body(&loc)
                .await
                .unwrap();
            assert_eq!(&body[..13], b"Received: x\r\n");
            assert_eq!(&body[13..], &big[..]);
            j.close().await;
            (loc, small, done)
        });
        assert_eq!((small_loc.seq, done_loc.seq), (loc.seq, loc.seq));
        assert!(
            // No `.part` left behind: only segments and the writer's manifest.
            files(&dir)
                .iter()
                .all(|f| f.ends_with(".seg") || f == "manifest"),
            "{:?}",
            files(&dir)
        );
        // Recovery: message 2 is done, 1 and 3 are held; the streamed record was verified.
        let r = recover(&dir).unwrap();
        assert!(r.damage.is_empty(), "{:?}", r.damage);
        let mut ids: Vec<u128> = r.parts.iter().map(|p| p.id.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 3]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn streams_committed_out_of_order_keep_every_done_after_its_message() {
        let dir = temp_dir("stream-order");
        let d = DomainName::parse("x.example").unwrap();
        run_local(async {
            let mut cfg = JournalConfig::new(&dir, 0, IoKind::Epoll);
            cfg.segment_size = 1 << 20;
            let j = JournalHandle::open(cfg, DirRecovery::empty(0))
                .await
                .unwrap();
            j.append_message(MessageId(1), 1, &env("x.example"), b"one\r\n")
                .await
                .unwrap();
            let first_seg = j.current_segment().unwrap();
            let mut a = j
                .begin_stream(MessageId(2), 1, &env("x.example"))
                .await
                .unwrap();
            let mut b = j
                .begin_stream(MessageId(3), 1, &env("x.example"))
                .await
                .unwrap();
            for s in [&mut a, &mut b] {
                let (r, _) = s.write(vec![b'x'; 2 << 20]).await;
                r.unwrap();
            }
            // B (begun second) commits first; A's segment then comes after B's.
            let lb = b.commit(&env("x.example")).await.unwrap();
            let la = a.commit(&env("x.example")).await.unwrap();
            assert!(first_seg < lb.seq && lb.seq < la.seq);
            // The replaced segment was cut at its last record.
            let first = segment_path(&dir, 0, first_seg);
            assert!(std::fs::metadata(&first).unwrap().len() < 1 << 10);
            for id in [2, 3] {
                let done = j
                    .append_done(MessageId(id), &d, record::Outcome::Delivered)
                    .await
                    .unwrap();
                assert!(
                    done.seq > la.seq,
                    "records bigger than a segment are alone in it"
                );
            }
            j.close().await;
        });
        let r = recover(&dir).unwrap();
        assert!(r.damage.is_empty(), "{:?}", r.damage);
        let ids: Vec<u128> = r.parts.iter().map(|p| p.id.0).collect();
        assert_eq!(
            ids,
            [1],
            "both streamed messages are done, the first is held"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn aborted_dropped_and_crashed_streams_leave_nothing_to_recover() {
        let dir = temp_dir("stream-abort");
        run_local(async {
            let j = JournalHandle::open(
                JournalConfig::new(&dir, 0, IoKind::Epoll),
                DirRecovery::empty(0),
            )
            .await
            .unwrap();
            let mut a = j
                .begin_stream(MessageId(1), 1, &env("x.example"))
                .await
                .unwrap();
            let (r, _) = a.write(b"some bytes\r\n".to_vec()).await;
            r.unwrap();
            a.abort().await;
            let mut b = j
                .begin_stream(MessageId(2), 1, &env("x.example"))
                .await
                .unwrap();
            let (r, _) = b.write(b"other bytes\r\n".to_vec()).await;
            r.unwrap();
            drop(b);
            // Dropping removes the file on the blocking pool; give it a moment.
            for _ in 0..100 {
                if files(&dir).iter().all(|f| !is_part_file(f)) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(
                files(&dir).iter().all(|f| !is_part_file(f)),
                "{:?}",
                files(&dir)
            );
            // A crash mid-stream: the file stays behind.
            let mut c = j
                .begin_stream(MessageId(3), 1, &env("x.example"))
                .await
                .unwrap();
            let (r, _) = c.write(b"cut off\r\n".to_vec()).await;
            r.unwrap();
            std::mem::forget(c);
            j.close().await;
        });
        assert_eq!(files(&dir).iter().filter(|f| is_part_file(f)).count(), 1);
        let r = recover(&dir).unwrap();
        assert!(r.parts.is_empty() && r.damage.is_empty());
        let mut r = r;
        run_local(async {
            let j = JournalHandle::open(JournalConfig::new(&dir, 0, IoKind::Epoll), r.take_dir(0))
                .await
                .unwrap();
            j.close().await;
        });
        assert!(
            files(&dir).iter().all(|f| !is_part_file(f)),
            "the writer removed it"
        );
        assert!(recover(&dir).unwrap().parts.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
