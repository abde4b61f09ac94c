//! The per-core journal writer: group commit, rotation, reclaim and compaction.
//!
//! One writer per core owns `<data>/journal/core-N/` and its current segment; nothing else
//! writes there. [`JournalHandle`] is a cheap `Rc` clone for the sessions of that core.
//!
//! # Group commit
//!
//! An append encodes its record into the pending batch buffer and waits. A flusher task
//! (`spawn_local`) takes everything pending that fits the current segment, writes it with one
//! positional write, issues ONE `fdatasync`, and only then resolves every waiter with its
//! [`Location`]. While one batch is on its way to disk the next one fills up, so the number of
//! fdatasyncs follows the disk, not the number of sessions.
//!
//! # Invariants
//!
//! - No append resolves `Ok` before its bytes are fdatasync'ed.
//! - After a failed write or fdatasync the writer is poisoned: every append fails with
//!   [`Error::Poisoned`] until restart (the page cache may have dropped the dirty pages, so a
//!   retry could "succeed" over lost data).
//! - A batch never spans two segments: the writer rotates before a batch that does not fit.
//!   Only the newest segment of a directory can therefore end in a torn batch.
//! - On open the writer truncates the previous newest segment to its last valid record (what
//!   recovery found) and always starts a NEW segment; it never appends after a torn tail.
//! - A record larger than the segment size gets a segment of its own.
//! - A segment is deleted only when the [`Ledger`](super::reclaim) says so; compaction copies
//!   are durable before the segment they came from is deleted.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use super::error::out_of_space;
use super::file::{private_dir, remove_durably, sync_dir, IoKind, SegmentFile};
use super::pins::SegmentPins;
use super::reader::read_msg_record;
use super::reclaim::{Ledger, LivePart};
use super::record::{self, encode_segment_header, Encoded, Outcome, Part, SEGMENT_HEADER_LEN};
use super::recovery::{encode_manifest, DirRecovery, MANIFEST, MANIFEST_TMP};
use super::stream::{self, Finished};
use super::Error;
use crate::types::{DomainName, Envelope, MessageId};

/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

/// The directory of core `core`'s journal.
pub fn journal_dir(data_dir: &Path, core: u16) -> PathBuf {
    data_dir.join("journal").join(format!("core-{core}"))
}

/// The path of segment `seq` of core `core`.
pub fn segment_path(data_dir: &Path, core: u16, seq: u64) -> PathBuf {
    journal_dir(data_dir, core).join(format!("{seq:016x}.seg"))
}

/// Where a record is stored; enough to stream its body with positional reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    /// The core whose journal directory holds the segment.
    pub core: u16,
    /// The segment's sequence number.
    pub seq: u64,
    /// Offset of the record in the segment file.
    pub offset: u64,
    /// Length of the whole record.
    pub len: u64,
    /// Offset of the body in the segment file.
    pub body_offset: u64,
    /// Body length (the message size).
    pub body_len: u64,
    /// CRC-32 of the body.
    pub body_crc: u32,
}

/// How a core's journal writer behaves.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The spool's data directory (`<data>`).
    pub data_dir: PathBuf,
    /// This core's number (`core-N`).
    pub core: u16,
    /// io_uring or the blocking-pool fallback.
    pub io: IoKind,
    /// Rotate when the next batch would not fit. Default [`DEFAULT_SEGMENT_SIZE`].
    pub segment_size: u64,
    /// `fallocate` each new segment to `segment_size`. Default true.
    pub preallocate: bool,
    /// Also write zeros over the preallocated range (faster fdatasyncs later, slower
    /// rotation). Default false.
    pub zero_fill: bool,
    /// Compact the oldest segment when its live bytes fall below this share. Default 0.5.
    pub compact_below: f64,
    /// Segments that readers still use; none of them is deleted. With a table, a compacted
    /// segment is also deleted only by a later [`JournalHandle::reclaim`] call, after the
    /// caller applied the relocations (see [`SegmentPins`]). Default none.
    pub pins: Option<std::sync::Arc<SegmentPins>>,
}

impl JournalConfig {
    /// The defaults for core `core` under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>, core: u16, io: IoKind) -> Self {
        JournalConfig {
            data_dir: data_dir.into(),
            core,
            io,
            segment_size: DEFAULT_SEGMENT_SIZE,
            preallocate: true,
            zero_fill: false,
            compact_below: 0.5,
            pins: None,
        }
    }

    /// Bytes at the end of every segment that only `DONE` and `EXPIRE` records may use: a
    /// sixteenth of the segment, 64 KiB to 4 MiB (about a thousand to seventy thousand
    /// `DONE`s), never more than an eighth of it. When the disk fills up, deliveries can
    /// still be recorded there (and so free space), while new messages are refused.
    pub fn reserve(&self) -> u64 {
        (self.segment_size / 16)
            .clamp(64 << 10, 4 << 20)
            .min(self.segment_size / 8)
    }
}

#[cfg(test)]
thread_local! {
    static FAKE_FULL_AT_OPEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Resolves once an appended record is durable, with its location.
type Appended = oneshot::Receiver<Result<Location, Error>>;

/// Record bytes compaction queues before it waits for them to be durable.
const COMPACT_CHUNK: u64 = 256 << 10;

/// How often a writer short of space tries again to allocate a segment for new messages.
const SPACE_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// Counters of one writer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records made durable.
    pub records: u64,
    /// Batch writes issued (one positional write each).
    pub batches: u64,
    /// fdatasync calls issued for batches (segment creation not counted).
    pub fsyncs: u64,
    /// Record bytes made durable.
    pub bytes: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Segments deleted by reclaim.
    pub segments_deleted: u64,
    /// Messages refused because the disk was full ([`Error::NoSpace`]).
    pub no_space_refused: u64,
}

/// How one writer is doing, for `turnpike queue` and the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalStatus {
    /// The journal directory (`core-N`).
    pub core: u16,
    /// A failed write or fdatasync stopped the writer; it needs a restart.
    pub poisoned: bool,
    /// Short of disk space (refusing new mail) for this long.
    pub short_for: Option<std::time::Duration>,
    /// Messages refused for lack of space since start.
    pub no_space_refused: u64,
}

/// A message that compaction moved; the runtime forwards it to the shard cores of `domains`
/// so their index points at the new copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocated {
    /// The message.
    pub id: MessageId,
    /// Its new location.
    pub location: Location,
    /// The live parts the new copy holds.
    pub domains: Vec<DomainName>,
}

/// What one [`JournalHandle::reclaim`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReclaimReport {
    /// Segments deleted, oldest first.
    pub deleted: Vec<u64>,
    /// The segment that was compacted, if any.
    pub compacted: Option<u64>,
    /// Messages copied forward by compaction.
    pub relocated: Vec<Relocated>,
    /// Messages compaction could not copy because their record is damaged: they stay where
    /// they are (quarantine them).
    pub damaged: Vec<super::ScrubFinding>,
}

/// A cloneable handle to this core's journal writer. `!Send`: it lives on its core.
#[derive(Clone)]
pub struct JournalHandle {
    shared: Rc<Shared>,
}

struct Shared {
    cfg: JournalConfig,
    dir: PathBuf,
    state: RefCell<State>,
    wake: Rc<Notify>,
    /// One manifest write at a time (the flusher rotates while reclaim deletes).
    manifest: tokio::sync::Mutex<()>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the flusher notice that every handle is gone.
        self.wake.notify_one();
    }
}

struct State {
    poisoned: bool,
    closed: bool,
    /// Set while the disk is full: new messages are refused until a probe finds space.
    short: Option<Short>,
    /// Segments reclaim is deleting: never listed in the manifest again.
    deleting: std::collections::BTreeSet<u64>,
    current: Option<Current>,
    next_seq: u64,
    /// Encoded records waiting for the flusher, back to back.
    buf: Vec<u8>,
    /// A recycled buffer for the next batch.
    spare: Vec<u8>,
    pending: VecDeque<Pending>,
    ledger: Ledger,
    stats: JournalStats,
    reclaiming: bool,
    flusher: Option<JoinHandle<()>>,
    /// Committed streams waiting to become segments, in commit order.
    adopting: VecDeque<(Finished, oneshot::Sender<Result<Location, Error>>)>,
    #[cfg(test)]
    fail_next_sync: bool,
    /// Test hook: segment creation fails with ENOSPC, as on a full disk.
    #[cfg(test)]
    fake_full: bool,
}

struct Current {
    file: SegmentFile,
    seq: u64,
    end: u64,
    /// The segment was allocated whole: it takes messages up to `segment_size - reserve`.
    /// A segment made while the disk was full takes only `DONE`/`EXPIRE` records.
    msgs: bool,
}

/// The disk is full: since when, and when to try allocating a segment again.
#[derive(Clone, Copy)]
struct Short {
    since: std::time::Instant,
    next_probe: tokio::time::Instant,
}

/// How much of a new segment to allocate up front.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Alloc {
    /// The whole segment (when `preallocate`): it takes messages.
    Full,
    /// What is left on a full disk: the reserve if it can be had, else nothing; it takes
    /// only `DONE`/`EXPIRE` records, so deliveries are recorded and space comes back.
    ReserveOnly,
}

struct Pending {
    /// Offset of the record in `State::buf`.
    start: usize,
    enc: Encoded,
    what: Placed,
    reply: oneshot::Sender<Result<Location, Error>>,
}

enum Placed {
    Msg { id: MessageId, parts: Vec<LivePart> },
    Done { id: MessageId, domain: DomainName },
    Expire { id: MessageId, domain: DomainName },
    Settle { id: MessageId },
}

impl Pending {
    fn is_msg(&self) -> bool {
        matches!(self.what, Placed::Msg { .. })
    }
}

enum Step {
    Idle,
    Worked,
    Exit,
}

impl State {
    fn check(&self) -> Result<(), Error> {
        if self.poisoned {
            Err(Error::Poisoned)
        } else if self.closed {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn fail_pending(&mut self) {
        self.buf.clear();
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Err(if self.poisoned {
                Error::Poisoned
            } else {
                Error::Closed
            }));
        }
    }

    /// True when a new message must be refused right away: the disk is full and the next
    /// probe for space is not due yet.
    fn refuses_messages(&self) -> bool {
        self.short
            .is_some_and(|s| tokio::time::Instant::now() < s.next_probe)
    }

    /// Marks the disk full (logged once per episode) and schedules the next probe.
    fn enter_short(&mut self, core: u16, why: &Error) {
        let next_probe = tokio::time::Instant::now() + SPACE_PROBE;
        match &mut self.short {
            Some(s) => s.next_probe = next_probe,
            None => {
                tracing::warn!(core, error = %why, "journal short of disk space: new mail is refused (452 4.3.1) until space returns; deliveries are still recorded");
                self.short = Some(Short {
                    since: std::time::Instant::now(),
                    next_probe,
                });
            }
        }
    }

    fn leave_short(&mut self, core: u16) {
        if let Some(s) = self.short.take() {
            tracing::info!(core, after = ?s.since.elapsed(), "journal has disk space again: accepting new mail");
        }
    }

    /// Refuses every queued message (not `DONE`/`EXPIRE`) with [`Error::NoSpace`], keeping the
    /// order of the rest.
    fn refuse_pending_msgs(&mut self) {
        if !self.pending.iter().any(Pending::is_msg) {
            return;
        }
        let old = std::mem::take(&mut self.buf);
        for p in std::mem::take(&mut self.pending) {
            if p.is_msg() {
                self.stats.no_space_refused += 1;
                let _ = p.reply.send(Err(Error::NoSpace {
                    op: "append message",
                }));
                continue;
            }
            let mut p = p;
            let start = self.buf.len();
            self.buf
                .extend_from_slice(&old[p.start..p.start + p.enc.len as usize]);
            p.start = start;
            self.pending.push_back(p);
        }
    }

    /// Puts the `DONE`/`EXPIRE` records of a batch that found no space back at the front of
    /// the queue (their bytes are in `batch`); its messages are refused.
    fn requeue_front(&mut self, taken: Vec<Pending>, batch: &[u8]) {
        let mut buf = Vec::with_capacity(batch.len() + self.buf.len());
        let mut front = VecDeque::new();
        for mut p in taken {
            if p.is_msg() {
                self.stats.no_space_refused += 1;
                let _ = p.reply.send(Err(Error::NoSpace { op: "write batch" }));
                continue;
            }
            let start = buf.len();
            buf.extend_from_slice(&batch[p.start..p.start + p.enc.len as usize]);
            p.start = start;
            front.push_back(p);
        }
        let shift = buf.len();
        buf.extend_from_slice(&self.buf);
        for p in self.pending.iter_mut() {
            p.start += shift;
        }
        front.extend(self.pending.drain(..));
        self.pending = front;
        self.buf = buf;
    }
}

impl JournalHandle {
    /// Opens core `cfg.core`'s writer: seals the previous newest segment at its last valid
    /// record, creates a new segment and spawns the flusher with `spawn_local` (so this must
    /// run inside a `LocalSet`, which a tokio-uring runtime always is).
    ///
    /// `recovered` is this directory's part of [`recover`](super::recover)'s result, or
    /// [`DirRecovery::empty`] for a fresh spool.
    pub async fn open(cfg: JournalConfig, recovered: DirRecovery) -> Result<JournalHandle, Error> {
        if recovered.core() != cfg.core {
            return Err(Error::InvalidLocation {
                reason: "recovery result of another core",
            });
        }
        let dir = journal_dir(&cfg.data_dir, cfg.core);
        let d = dir.clone();
        tokio::task::spawn_blocking(move || {
            // Both levels: an older install may have left `journal/` open to everyone.
            private_dir(d.parent().expect("core dir has a parent"))?;
            private_dir(&d)
        })
        .await
        .map_err(|e| Error::io("create journal dir", None, std::io::Error::other(e)))?
        .map_err(|e| Error::io("create journal dir", Some(dir.clone()), e))?;
        let d = dir.clone();
        match tokio::task::spawn_blocking(move || stream::remove_leftovers(&d)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(
                    core = cfg.core,
                    n,
                    "removed messages a crash cut off while they arrived (never acknowledged)"
                )
            }
            Ok(Err(e)) => {
                return Err(Error::io(
                    "remove unfinished incoming messages",
                    Some(dir),
                    e,
                ))
            }
            Err(e) => {
                return Err(Error::io(
                    "remove unfinished incoming messages",
                    Some(dir),
                    std::io::Error::other(e),
                ))
            }
        }
        let (ledger, next_seq, tail) = recovered.into_writer_parts();
        if let Some(tail) = tail {
            // Cut the possibly torn (or merely preallocated) tail off, so that later
            // recoveries can trust this segment like any older one.
            let path = segment_path(&cfg.data_dir, cfg.core, tail.seq);
            let ctx = |e| Error::io("seal previous segment", Some(path.clone()), e);
            let f = tokio::task::spawn_blocking({
                let path = path.clone();
                move || {
                    let f = std::fs::OpenOptions::new().write(true).open(path)?;
                    if f.metadata()?.len() != tail.valid_end {
                        f.set_len(tail.valid_end)?;
                        f.sync_all()?;
                    }
                    Ok(())
                }
            })
            .await
            .map_err(|e| ctx(std::io::Error::other(e)))?;
            f.map_err(ctx)?;
        }
        let wake = Rc::new(Notify::new());
        let shared = Rc::new(Shared {
            cfg,
            dir,
            wake: Rc::clone(&wake),
            manifest: tokio::sync::Mutex::new(()),
            state: RefCell::new(State {
                poisoned: false,
                closed: false,
                short: None,
                deleting: Default::default(),
                current: None,
                next_seq,
                buf: Vec::new(),
                spare: Vec::new(),
                pending: VecDeque::new(),
                ledger,
                stats: JournalStats::default(),
                reclaiming: false,
                flusher: None,
                adopting: VecDeque::new(),
                #[cfg(test)]
                fail_next_sync: false,
                #[cfg(test)]
                fake_full: FAKE_FULL_AT_OPEN.with(|f| f.get()),
            }),
        });
        // A full disk does not stop the start: without a whole segment the writer takes only
        // DONE/EXPIRE records (so held mail can be delivered and space freed), and without
        // even that they wait for space; new mail is refused until a probe finds room.
        if let Err(e) = shared.rotate(Alloc::Full).await {
            if !e.is_no_space() {
                return Err(e);
            }
            shared.state.borrow_mut().enter_short(shared.cfg.core, &e);
            match shared.rotate(Alloc::ReserveOnly).await {
                Ok(()) => {}
                Err(e) if e.is_no_space() => {}
                Err(e) => return Err(e),
            }
        }
        let flusher = tokio::task::spawn_local(run_flusher(Rc::downgrade(&shared), wake));
        shared.state.borrow_mut().flusher = Some(flusher);
        Ok(JournalHandle { shared })
    }

    /// [`JournalHandle::open`] with the disk full from the start (test hook).
    #[cfg(test)]
    pub(crate) async fn open_full_disk_for_test(
        cfg: JournalConfig,
        recovered: DirRecovery,
    ) -> Result<JournalHandle, Error> {
        FAKE_FULL_AT_OPEN.with(|f| f.set(true));
        let j = Self::open(cfg, recovered).await;
        FAKE_FULL_AT_OPEN.with(|f| f.set(false));
        j
    }

    /// Appends a `MSG` record holding the envelope, its per-domain parts (see
    /// [`parts_of`](super::parts_of)) and the body, and resolves once it is durable.
    ///
    /// `received_at` is unix seconds. The body is stored as given (canonical CRLF, not
    /// dot-stuffed). Only after `Ok` may the session answer 250. `id.core()` must be this
    /// writer's core.
    pub async fn append_message(
        &self,
        id: MessageId,
        received_at: u64,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<Location, Error> {
        self.own(id)?;
        let parts = record::parts_of(envelope);
        let rx = self.enqueue_msg(id, received_at, envelope, &parts, body)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// [`append_message`](Self::append_message) with the body in pieces, stored back to back
    /// (our `Received:` field, then the message as received): no copy to join them.
    pub async fn append_message_pieces(
        &self,
        id: MessageId,
        received_at: u64,
        envelope: &Envelope,
        body: &[&[u8]],
    ) -> Result<Location, Error> {
        self.own(id)?;
        let parts = record::parts_of(envelope);
        let rx = self.enqueue_msg_pieces(id, received_at, envelope, &parts, body)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Appends a `DONE` record: the `domain` part of `id` is finished with `outcome`. Must be
    /// called on the writer of the core that wrote the message (`id.core()`); any other writer
    /// refuses it with [`Error::InvalidLocation`].
    pub async fn append_done(
        &self,
        id: MessageId,
        domain: &DomainName,
        outcome: Outcome,
    ) -> Result<Location, Error> {
        self.append_part_record(id, domain, Some(outcome)).await
    }

    /// Appends an `EXPIRE` record: the `domain` part of `id` passed the maximum hold and waits
    /// for its bounce; the message data stays until a `DONE`.
    pub async fn append_expire(
        &self,
        id: MessageId,
        domain: &DomainName,
    ) -> Result<Location, Error> {
        self.append_part_record(id, domain, None).await
    }

    /// Appends a `SETTLE` record: the listed recipients of the `domain` part of `id` (indices
    /// into the stored envelope's recipients, see [`HeldPart::indices`]) are finished, each
    /// with its outcome; the part stays held for its other recipients. Finish a part's last
    /// recipients with [`append_done`](Self::append_done) instead, so a part never lives on
    /// with no recipient. Same core rule as `append_done`.
    ///
    /// [`HeldPart::indices`]: super::HeldPart::indices
    pub async fn append_settle(
        &self,
        id: MessageId,
        domain: &DomainName,
        recipients: &[(u32, Outcome)],
    ) -> Result<Location, Error> {
        self.own(id)?;
        let rx = {
            let mut st = self.shared.state.borrow_mut();
            st.check()?;
            let start = st.buf.len();
            let enc = record::encode_settle(&mut st.buf, id, domain, recipients)?;
            // From now on compaction must not copy these recipients forward.
            st.ledger.settle(id, recipients.iter().map(|(i, _)| *i));
            self.push(&mut st, start, enc, Placed::Settle { id })
        };
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// A `DONE` (with an outcome) or an `EXPIRE` (without) for one part.
    async fn append_part_record(
        &self,
        id: MessageId,
        domain: &DomainName,
        outcome: Option<Outcome>,
    ) -> Result<Location, Error> {
        self.own(id)?;
        let rx = {
            let mut st = self.shared.state.borrow_mut();
            st.check()?;
            let start = st.buf.len();
            let domain_owned = domain.clone();
            let (enc, what) = match outcome {
                Some(outcome) => {
                    // From now on compaction must not copy this part forward.
                    st.ledger.doom(id, domain);
                    let enc = record::encode_done(&mut st.buf, id, domain, outcome);
                    (
                        enc,
                        Placed::Done {
                            id,
                            domain: domain_owned,
                        },
                    )
                }
                None => {
                    let enc = record::encode_expire(&mut st.buf, id, domain);
                    (
                        enc,
                        Placed::Expire {
                            id,
                            domain: domain_owned,
                        },
                    )
                }
            };
            self.push(&mut st, start, enc, what)
        };
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Refuses ids minted for another core: their records belong in that core's journal
    /// (a DONE in the wrong directory would not end the part on recovery).
    pub(super) fn own(&self, id: MessageId) -> Result<(), Error> {
        if id.core() == self.shared.cfg.core {
            Ok(())
        } else {
            Err(Error::InvalidLocation {
                reason: "message id belongs to another core's journal",
            })
        }
    }

    /// `Err` once the writer is poisoned or closed, and [`Error::NoSpace`] while it refuses new
    /// messages for a full disk.
    pub(super) fn check_open(&self) -> Result<(), Error> {
        let mut st = self.shared.state.borrow_mut();
        st.check()?;
        if st.refuses_messages() {
            st.stats.no_space_refused += 1;
            return Err(Error::NoSpace {
                op: "start streamed message",
            });
        }
        Ok(())
    }

    /// The writer's settings.
    pub(super) fn config(&self) -> &JournalConfig {
        &self.shared.cfg
    }

    /// Queues a committed stream to become this writer's next segment (see the `stream`
    /// module) and waits until it is.
    pub(super) async fn adopt(&self, finished: Finished) -> Result<Location, Error> {
        let refused = self.shared.state.borrow().check();
        if let Err(e) = refused {
            finished.discard().await;
            return Err(e);
        }
        let (reply, rx) = oneshot::channel();
        self.shared
            .state
            .borrow_mut()
            .adopting
            .push_back((finished, reply));
        self.shared.wake.notify_one();
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Counters since open.
    pub fn stats(&self) -> JournalStats {
        self.shared.state.borrow().stats
    }

    /// True after a failed write or fdatasync.
    pub fn is_poisoned(&self) -> bool {
        self.shared.state.borrow().poisoned
    }

    /// The writer's state for the operator.
    pub fn status(&self) -> JournalStatus {
        let st = self.shared.state.borrow();
        JournalStatus {
            core: self.shared.cfg.core,
            poisoned: st.poisoned,
            short_for: st.short.map(|s| s.since.elapsed()),
            no_space_refused: st.stats.no_space_refused,
        }
    }

    /// True while the disk is full: new messages are refused with [`Error::NoSpace`] (answer
    /// `452 4.3.1` at RCPT), `DONE`/`EXPIRE` records still go into the reserve.
    pub fn short_of_space(&self) -> bool {
        self.shared.state.borrow().short.is_some()
    }

    /// For the scrub: the oldest segment after `after` that is not the current one and
    /// holds live messages, with those messages `(id, offset, len)` in record order.
    pub(crate) fn scrub_next_segment(&self, after: u64) -> Option<(u64, Vec<super::scrub::Held>)> {
        let st = self.shared.state.borrow();
        let current = st.current.as_ref().map(|c| c.seq);
        let (seq, _) = st
            .ledger
            .segments()
            .find(|(seq, s)| *seq > after && Some(*seq) != current && s.live_parts > 0)?;
        Some((seq, st.ledger.messages_in(seq)))
    }

    /// For the scrub: the live parts of `id` if its current copy is still at `seq`/`offset`.
    pub(crate) fn scrub_still_at(
        &self,
        id: MessageId,
        seq: u64,
        offset: u64,
    ) -> Option<Vec<DomainName>> {
        let st = self.shared.state.borrow();
        let m = st.ledger.message(id)?;
        (m.seq == seq && m.offset == offset)
            .then(|| m.parts.iter().map(|p| p.domain.clone()).collect())
    }

    pub(crate) fn data_dir(&self) -> &Path {
        &self.shared.cfg.data_dir
    }

    pub(crate) fn core(&self) -> u16 {
        self.shared.cfg.core
    }

    pub(crate) fn io(&self) -> IoKind {
        self.shared.cfg.io
    }

    /// The sequence number of the segment being appended to.
    pub fn current_segment(&self) -> Option<u64> {
        self.shared.state.borrow().current.as_ref().map(|c| c.seq)
    }

    /// Sequence numbers of the segments this writer still keeps, oldest first.
    pub fn segments(&self) -> Vec<u64> {
        self.shared
            .state
            .borrow()
            .ledger
            .segments()
            .map(|(s, _)| s)
            .collect()
    }

    /// Flushes what is pending, stops the flusher and refuses further appends.
    pub async fn close(&self) {
        let flusher = {
            let mut st = self.shared.state.borrow_mut();
            st.closed = true;
            st.flusher.take()
        };
        self.shared.wake.notify_one();
        if let Some(f) = flusher {
            let _ = f.await;
        }
    }

    /// Deletes segments that hold nothing live, then compacts the oldest segment if less than
    /// `compact_below` of it is live: its live messages are copied forward (group-committed
    /// like any append, with only their live parts), then it is deleted.
    ///
    /// The runtime calls this periodically (for example every few seconds while DONEs flow)
    /// and forwards [`ReclaimReport::relocated`] to the shard cores. A concurrent call
    /// returns an empty report. A reader that finds a segment gone (`NotFound`) should look
    /// the message up again.
    pub async fn reclaim(&self) -> Result<ReclaimReport, Error> {
        {
            let mut st = self.shared.state.borrow_mut();
            st.check()?;
            if st.reclaiming {
                return Ok(ReclaimReport::default());
            }
            st.reclaiming = true;
        }
        let _guard = ReclaimGuard(&self.shared);
        let mut report = ReclaimReport::default();
        self.delete_dead(&mut report).await?;
        let candidate = {
            let st = self.shared.state.borrow();
            if st.short.is_some() {
                // Copies need the space that is missing; deleting dead segments is what helps.
                return Ok(report);
            }
            let current = st.current.as_ref().map(|c| c.seq);
            st.ledger
                .compaction_candidate(current, self.shared.cfg.compact_below)
        };
        if let Some(seq) = candidate {
            self.compact(seq, &mut report).await?;
            report.compacted = Some(seq);
            if self.shared.cfg.pins.is_none() {
                // Nobody but the caller reads it: it may go now. With readers, it goes at a
                // later call, once the caller told them where the messages went.
                self.delete_dead(&mut report).await?;
            }
        }
        Ok(report)
    }

    async fn compact(&self, seq: u64, report: &mut ReclaimReport) -> Result<(), Error> {
        let cfg = &self.shared.cfg;
        let path = segment_path(&cfg.data_dir, cfg.core, seq);
        let file = SegmentFile::open_read(&path, cfg.io)
            .await
            .map_err(|e| Error::io("open segment for compaction", Some(path.clone()), e))?;
        let ids = self.shared.state.borrow().ledger.messages_in(seq);
        let mut waiting = Vec::new();
        let mut in_flight = 0u64;
        let mut buf = Vec::new();
        for (id, offset, len) in ids {
            if in_flight >= COMPACT_CHUNK {
                // Let the copies so far become durable before queueing more: a DONE that
                // arrives meanwhile waits behind one chunk, not behind the whole segment.
                Self::collect_copies(std::mem::take(&mut waiting), report).await?;
                in_flight = 0;
            }
            let (res, b) = read_msg_record(&file, &path, offset, len, buf).await;
            buf = b;
            let (meta, body_rel) = match res {
                Ok(r) => r,
                Err(e) => {
                    // Leave the message (and so the segment) where it is; it stays readable
                    // as far as it ever was, and an operator can look at it.
                    tracing::error!(%id, seq, offset, error = %e, "journal compaction skips a damaged record");
                    if e.is_damage() {
                        if let Some(domains) = self.scrub_still_at(id, seq, offset) {
                            report.damaged.push(super::ScrubFinding {
                                id,
                                domains,
                                seq,
                                offset,
                                reason: e.to_string(),
                            });
                        }
                    }
                    continue;
                }
            };
            // No await between choosing the parts and queueing the copy: a DONE queued after
            // this point lands after the copy (see the reclaim module invariants).
            let (live, settled) = {
                let st = self.shared.state.borrow();
                (st.ledger.copy_parts(id), st.ledger.settled(id).to_vec())
            };
            if live.is_empty() || meta.id != id {
                continue;
            }
            // The copy carries only the recipients still held (see the reclaim invariants).
            let parts: Vec<Part> = live
                .iter()
                .filter_map(|lp| {
                    let p = meta.parts.iter().find(|p| p.domain == lp.domain)?;
                    Some(Part {
                        expired: lp.expired,
                        recipients: p
                            .recipients
                            .iter()
                            .copied()
                            .filter(|i| !settled.contains(i))
                            .collect(),
                        ..p.clone()
                    })
                })
                .collect();
            let body = &buf[body_rel as usize..];
            let rx = self.enqueue_msg(id, meta.received_at, &meta.envelope, &parts, body)?;
            in_flight += len;
            waiting.push((
                id,
                parts.into_iter().map(|p| p.domain).collect::<Vec<_>>(),
                rx,
            ));
        }
        Self::collect_copies(waiting, report).await
    }

    /// Waits for queued compaction copies and records where they landed.
    async fn collect_copies(
        waiting: Vec<(MessageId, Vec<DomainName>, Appended)>,
        report: &mut ReclaimReport,
    ) -> Result<(), Error> {
        for (id, domains, rx) in waiting {
            let location = rx.await.unwrap_or(Err(Error::Closed))?;
            report.relocated.push(Relocated {
                id,
                location,
                domains,
            });
        }
        Ok(())
    }

    async fn delete_dead(&self, report: &mut ReclaimReport) -> Result<(), Error> {
        let pinned = match &self.shared.cfg.pins {
            Some(p) => p.pinned(self.shared.cfg.core),
            None => Vec::new(),
        };
        let dead = {
            let st = self.shared.state.borrow();
            st.ledger
                .deletable(st.current.as_ref().map(|c| c.seq), |s| pinned.contains(&s))
        };
        let cfg = &self.shared.cfg;
        if !dead.is_empty() {
            // First the manifest without them: a crash between the two never reports a
            // deleted segment as lost.
            self.shared
                .state
                .borrow_mut()
                .deleting
                .extend(dead.iter().copied());
            self.shared.write_manifest().await;
        }
        for seq in dead {
            let path = segment_path(&cfg.data_dir, cfg.core, seq);
            match remove_durably(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Stop here: later segments may depend on this one being gone first.
                Err(e) => {
                    self.shared.state.borrow_mut().deleting.clear();
                    return Err(Error::io("delete segment", Some(path), e));
                }
            }
            let mut st = self.shared.state.borrow_mut();
            st.ledger.remove_segment(seq);
            st.deleting.remove(&seq);
            st.stats.segments_deleted += 1;
            report.deleted.push(seq);
        }
        Ok(())
    }

    fn enqueue_msg(
        &self,
        id: MessageId,
        received_at: u64,
        envelope: &Envelope,
        parts: &[Part],
        body: &[u8],
    ) -> Result<oneshot::Receiver<Result<Location, Error>>, Error> {
        self.enqueue_msg_pieces(id, received_at, envelope, parts, &[body])
    }

    fn enqueue_msg_pieces(
        &self,
        id: MessageId,
        received_at: u64,
        envelope: &Envelope,
        parts: &[Part],
        body: &[&[u8]],
    ) -> Result<oneshot::Receiver<Result<Location, Error>>, Error> {
        let mut st = self.shared.state.borrow_mut();
        st.check()?;
        if st.refuses_messages() {
            st.stats.no_space_refused += 1;
            return Err(Error::NoSpace {
                op: "append message",
            });
        }
        let start = st.buf.len();
        let enc = record::encode_msg_pieces(&mut st.buf, id, received_at, envelope, parts, body)?;
        let live = parts
            .iter()
            .map(|p| LivePart {
                domain: p.domain.clone(),
                expired: p.expired,
            })
            .collect();
        Ok(self.push(&mut st, start, enc, Placed::Msg { id, parts: live }))
    }

    fn push(
        &self,
        st: &mut State,
        start: usize,
        enc: Encoded,
        what: Placed,
    ) -> oneshot::Receiver<Result<Location, Error>> {
        let (reply, rx) = oneshot::channel();
        st.pending.push_back(Pending {
            start,
            enc,
            what,
            reply,
        });
        self.shared.wake.notify_one();
        rx
    }

    /// Test hook: new segments cannot be allocated, as on a full disk.
    #[cfg(test)]
    pub(crate) fn fake_disk_full(&self, full: bool) {
        self.shared.state.borrow_mut().fake_full = full;
    }

    /// Test hook: the next batch's fdatasync fails as if the disk had returned EIO.
    #[cfg(test)]
    pub(crate) fn fail_next_sync(&self) {
        self.shared.state.borrow_mut().fail_next_sync = true;
    }
}

struct ReclaimGuard<'a>(&'a Shared);

impl Drop for ReclaimGuard<'_> {
    fn drop(&mut self) {
        self.0.state.borrow_mut().reclaiming = false;
    }
}

async fn run_flusher(weak: Weak<Shared>, wake: Rc<Notify>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.adopt_next().await {
            continue;
        }
        let step = shared.flush_once().await;
        let probe = shared.state.borrow().short.map(|s| s.next_probe);
        drop(shared);
        match step {
            Step::Exit => return,
            Step::Worked => continue,
            Step::Idle => match probe {
                None => wake.notified().await,
                // Short of space: look again at the probe time even if nothing arrives.
                Some(at) => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
            },
        }
    }
}

impl Shared {
    /// Creates the next segment and makes it current. The header, the allocation and the
    /// directory entry are durable before any record goes in. On failure nothing changes:
    /// the half-made file is removed and the current segment stays current. A full disk is
    /// [`Error::NoSpace`].
    async fn rotate(&self, alloc: Alloc) -> Result<(), Error> {
        let seq = {
            let mut st = self.state.borrow_mut();
            st.next_seq += 1;
            st.next_seq - 1
        };
        #[cfg(test)]
        if self.state.borrow().fake_full {
            return Err(Error::NoSpace {
                op: "create segment",
            });
        }
        let cfg = &self.cfg;
        let path = segment_path(&cfg.data_dir, cfg.core, seq);
        let ctx = |op, e: std::io::Error| {
            if out_of_space(&e) {
                Error::NoSpace { op }
            } else {
                Error::io(op, Some(path.clone()), e)
            }
        };
        let file = SegmentFile::create_new(&path, cfg.io)
            .await
            .map_err(|e| ctx("create segment", e))?;
        let made = async {
            let msgs = match alloc {
                Alloc::Full => {
                    if cfg.preallocate {
                        file.preallocate(0, cfg.segment_size, cfg.zero_fill)
                            .await
                            .map_err(|e| ctx("preallocate segment", e))?;
                    }
                    true
                }
                Alloc::ReserveOnly => {
                    // Best effort: the records are written one by one anyway, and a write
                    // that finds no space waits for it.
                    let _ = file.preallocate(0, cfg.reserve(), false).await;
                    false
                }
            };
            let (r, _) = file
                .write_all_at(encode_segment_header(cfg.core, seq).to_vec(), 0)
                .await;
            r.map_err(|e| ctx("write segment header", e))?;
            file.sync_data()
                .await
                .map_err(|e| ctx("fdatasync new segment", e))?;
            sync_dir(&self.dir)
                .await
                .map_err(|e| Error::io("fsync journal dir", Some(self.dir.clone()), e))?;
            Ok::<bool, Error>(msgs)
        }
        .await;
        let msgs = match made {
            Ok(msgs) => msgs,
            Err(e) => {
                // Never leave an empty or torn newest segment behind a current one.
                return match remove_durably(&path).await {
                    Ok(()) => Err(e),
                    Err(r) if r.kind() == std::io::ErrorKind::NotFound => Err(e),
                    Err(r) => Err(Error::io(
                        "remove unfinished segment",
                        Some(path.clone()),
                        r,
                    )),
                };
            }
        };
        {
            let mut st = self.state.borrow_mut();
            st.ledger.add_segment(seq, SEGMENT_HEADER_LEN);
            st.current = Some(Current {
                file,
                seq,
                end: SEGMENT_HEADER_LEN,
                msgs,
            });
            st.stats.segments_created += 1;
        }
        tracing::debug!(core = cfg.core, seq, msgs, "journal segment opened");
        self.write_manifest().await;
        Ok(())
    }

    /// Makes the oldest committed stream a segment (see the `stream` module): it gets the
    /// next sequence number and becomes the current segment, so every record appended after
    /// it lands after it; the segment it replaces is cut at its last record. Runs between
    /// batches, in the flusher. Returns false when no stream waits.
    async fn adopt_next(&self) -> bool {
        let (next, refused) = {
            let mut st = self.state.borrow_mut();
            (st.adopting.pop_front(), st.check())
        };
        let Some((finished, reply)) = next else {
            return false;
        };
        if let Err(e) = refused {
            finished.discard().await;
            let _ = reply.send(Err(e));
            return true;
        }
        let seq = {
            let mut st = self.state.borrow_mut();
            st.next_seq += 1;
            st.next_seq - 1
        };
        let (id, body_len, body_crc, len) = (
            finished.id,
            finished.body_len,
            finished.body_crc,
            finished.record_len,
        );
        let live: Vec<LivePart> = finished
            .parts
            .iter()
            .map(|p| LivePart {
                domain: p.domain.clone(),
                expired: p.expired,
            })
            .collect();
        let (file, end) = match finished.publish(&self.cfg, seq).await {
            Ok(done) => done,
            Err((e, renamed)) => {
                if renamed {
                    // A complete record may or may not be in the directory now.
                    let mut st = self.state.borrow_mut();
                    self.poison(&mut st, &e);
                }
                let _ = reply.send(Err(e));
                return true;
            }
        };
        // Like a rotated segment, so the records that follow do not extend the file. Without
        // the room (a full disk) it takes only DONE/EXPIRE records, as a reserve segment.
        let mut msgs = true;
        if self.cfg.preallocate && end < self.cfg.segment_size {
            if let Err(e) = file
                .preallocate(end, self.cfg.segment_size, self.cfg.zero_fill)
                .await
            {
                tracing::warn!(core = self.cfg.core, seq, error = %e, "cannot preallocate a streamed segment");
                msgs = false;
            }
        }
        let old = {
            let mut st = self.state.borrow_mut();
            let old = st.current.replace(Current {
                file,
                seq,
                end,
                msgs,
            });
            st.ledger.add_segment(seq, end);
            st.ledger.place_msg(id, seq, SEGMENT_HEADER_LEN, len, live);
            st.stats.records += 1;
            st.stats.bytes += len;
            st.stats.segments_created += 1;
            old
        };
        let _ = reply.send(Ok(Location {
            core: self.cfg.core,
            seq,
            offset: SEGMENT_HEADER_LEN,
            len,
            body_offset: end - body_len,
            body_len,
            body_crc,
        }));
        tracing::debug!(
            core = self.cfg.core,
            seq,
            bytes = len,
            "streamed message became a segment"
        );
        self.write_manifest().await;
        if let Some(old) = old {
            // Its preallocated tail would otherwise hold disk space until it is deleted.
            if let Err(e) = old.file.set_len(old.end).await {
                tracing::warn!(core = self.cfg.core, seq = old.seq, error = %e, "cannot cut a replaced segment at its last record");
            }
        }
        true
    }

    /// Rewrites `<dir>/manifest` (atomically): the segments this writer keeps, minus those
    /// being deleted, with their live parts. Advisory, so that recovery notices a segment that
    /// disappeared: a failure is logged, never fatal.
    async fn write_manifest(&self) {
        let _one = self.manifest.lock().await;
        let text = {
            let st = self.state.borrow();
            encode_manifest(
                st.ledger
                    .segments()
                    .filter(|(seq, _)| !st.deleting.contains(seq))
                    .map(|(seq, s)| (seq, s.live_parts)),
            )
        };
        let dir = self.dir.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let tmp = dir.join(MANIFEST_TMP);
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(super::FILE_MODE)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_data()?;
            std::fs::rename(&tmp, dir.join(MANIFEST))?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(core = self.cfg.core, error = %e, "could not write the journal manifest")
            }
            Err(e) => {
                tracing::warn!(core = self.cfg.core, error = %e, "could not write the journal manifest")
            }
        }
    }

    fn poison(&self, st: &mut State, e: &Error) {
        if !st.poisoned {
            tracing::error!(core = self.cfg.core, error = %e, "journal writer poisoned; appends refused until restart");
        }
        st.poisoned = true;
        st.fail_pending();
    }

    /// Whether `p` fits the current segment `c` at `at` (the end of the batch so far):
    /// messages stop short of the reserve, and only in a segment allocated whole; a record
    /// alone in a fresh segment always fits (a big message gets a segment of its own).
    fn fits(&self, c: &Current, p: &Pending, at: u64) -> bool {
        let alone = at == SEGMENT_HEADER_LEN;
        let seg = self.cfg.segment_size;
        if p.is_msg() {
            c.msgs && (alone || at + p.enc.len <= seg.saturating_sub(self.cfg.reserve()))
        } else {
            alone || at + p.enc.len <= seg
        }
    }

    /// Makes room for the first pending record when the current segment cannot take it.
    /// `Some(step)` when the flusher should not write now.
    async fn make_room(&self) -> Option<Step> {
        let (is_msg, probe_due) = {
            let st = self.state.borrow();
            (
                st.pending[0].is_msg(),
                st.short
                    .is_none_or(|s| tokio::time::Instant::now() >= s.next_probe),
            )
        };
        if probe_due {
            match self.rotate(Alloc::Full).await {
                Ok(()) => {
                    self.state.borrow_mut().leave_short(self.cfg.core);
                    return None;
                }
                Err(e) if e.is_no_space() => {
                    self.state.borrow_mut().enter_short(self.cfg.core, &e);
                }
                Err(e) => {
                    self.poison(&mut self.state.borrow_mut(), &e);
                    return Some(Step::Worked);
                }
            }
        }
        // No whole segment to be had: messages are refused, DONE/EXPIRE records go into a
        // segment made of whatever space there is, or wait for some.
        self.state.borrow_mut().refuse_pending_msgs();
        if is_msg || self.state.borrow().pending.is_empty() {
            return Some(Step::Worked);
        }
        if !probe_due {
            return Some(Step::Idle);
        }
        match self.rotate(Alloc::ReserveOnly).await {
            Ok(()) => None,
            Err(e) if e.is_no_space() => Some(Step::Idle),
            Err(e) => {
                self.poison(&mut self.state.borrow_mut(), &e);
                Some(Step::Worked)
            }
        }
    }

    async fn flush_once(&self) -> Step {
        let idle_probe = {
            let st = self.state.borrow();
            if st.pending.is_empty() && st.closed {
                return Step::Exit;
            }
            st.pending.is_empty()
                && st
                    .short
                    .is_some_and(|s| tokio::time::Instant::now() >= s.next_probe)
        };
        if idle_probe {
            // Nothing to write, but new mail is refused: see whether space is back.
            match self.rotate(Alloc::Full).await {
                Ok(()) => self.state.borrow_mut().leave_short(self.cfg.core),
                Err(e) if e.is_no_space() => self.state.borrow_mut().enter_short(self.cfg.core, &e),
                Err(e) => self.poison(&mut self.state.borrow_mut(), &e),
            }
            return Step::Idle;
        }
        let fits = {
            let mut st = self.state.borrow_mut();
            if st.pending.is_empty() {
                return Step::Idle;
            }
            if st.poisoned {
                st.fail_pending();
                return Step::Worked;
            }
            match &st.current {
                None => false,
                Some(c) => self.fits(c, &st.pending[0], c.end),
            }
        };
        if !fits {
            if let Some(step) = self.make_room().await {
                let mut st = self.state.borrow_mut();
                if matches!(step, Step::Idle) && st.closed {
                    // Closing while DONE records wait for space: they are not durable.
                    st.fail_pending();
                    return Step::Exit;
                }
                return step;
            }
        }

        let (file, seq, base, batch, taken) = {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            let cur = st
                .current
                .as_ref()
                .expect("a current segment after rotation");
            let (file, seq, base) = (cur.file.clone(), cur.seq, cur.end);
            let mut n = 0;
            let mut at = base;
            for p in &st.pending {
                if !self.fits(cur, p, at) {
                    break;
                }
                at += p.enc.len;
                n += 1;
            }
            let batch = if n == st.pending.len() {
                let spare = std::mem::take(&mut st.spare);
                std::mem::replace(&mut st.buf, spare)
            } else {
                let cut = st.pending[n].start;
                let rest = st.buf.split_off(cut);
                for p in st.pending.iter_mut().skip(n) {
                    p.start -= cut;
                }
                std::mem::replace(&mut st.buf, rest)
            };
            let taken: Vec<Pending> = st.pending.drain(..n).collect();
            (file, seq, base, batch, taken)
        };

        let len = batch.len() as u64;
        self.state.borrow_mut().stats.batches += 1;
        let (res, mut batch) = file.write_all_at(batch, base).await;
        if let Err(e) = &res {
            if out_of_space(e) && batch.len() as u64 == len {
                return self.no_room_for_batch(&file, base, taken, &batch).await;
            }
        }
        let res = match res {
            Ok(()) => {
                let r = file.sync_data().await;
                self.state.borrow_mut().stats.fsyncs += 1;
                r
            }
            Err(e) => Err(e),
        };
        let mut st = self.state.borrow_mut();
        #[cfg(test)]
        let res = if std::mem::take(&mut st.fail_next_sync) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            res
        };
        match res {
            Ok(()) => {
                st.stats.records += taken.len() as u64;
                st.stats.bytes += len;
                if let Some(c) = st.current.as_mut() {
                    c.end = base + len;
                }
                st.ledger.set_written(seq, base + len);
                for p in taken {
                    let offset = base + p.start as u64;
                    let loc = Location {
                        core: self.cfg.core,
                        seq,
                        offset,
                        len: p.enc.len,
                        body_offset: offset + p.enc.body_rel,
                        body_len: p.enc.body_len,
                        body_crc: p.enc.body_crc,
                    };
                    match p.what {
                        Placed::Msg { id, parts } => {
                            st.ledger.place_msg(id, seq, offset, p.enc.len, parts)
                        }
                        Placed::Done { id, domain } => {
                            st.ledger.place_done(seq, id, &domain);
                        }
                        Placed::Expire { id, domain } => st.ledger.place_expire(seq, id, &domain),
                        Placed::Settle { id } => st.ledger.place_settle(seq, id),
                    }
                    let _ = p.reply.send(Ok(loc));
                }
                batch.clear();
                if batch.capacity() <= 16 << 20 {
                    st.spare = batch;
                }
            }
            Err(e) => {
                let path = segment_path(&self.cfg.data_dir, self.cfg.core, seq);
                let err = Error::io("write and fdatasync batch", Some(path.clone()), e);
                self.poison(&mut st, &err);
                let kind = match &err {
                    Error::Io { source, .. } => source.kind(),
                    _ => std::io::ErrorKind::Other,
                };
                for p in taken {
                    let e = std::io::Error::new(kind, err.to_string());
                    let _ = p.reply.send(Err(Error::io(
                        "write and fdatasync batch",
                        Some(path.clone()),
                        e,
                    )));
                }
            }
        }
        Step::Worked
    }

    /// The write of a batch found the disk full (`ENOSPC` from write(2): the pages that did
    /// not fit were never dirtied, so nothing is lost and the writer is not poisoned). The
    /// partly written tail is cut off and made durable, so no half batch can ever be read
    /// back; the segment takes no more messages; the batch's DONE/EXPIRE records go back to
    /// the front of the queue and its messages are refused.
    async fn no_room_for_batch(
        &self,
        file: &SegmentFile,
        base: u64,
        taken: Vec<Pending>,
        batch: &[u8],
    ) -> Step {
        let cut = async {
            file.set_len(base).await?;
            file.sync_data().await
        }
        .await;
        let mut st = self.state.borrow_mut();
        if let Err(e) = cut {
            let err = Error::io("cut a batch that found no space", None, e);
            st.requeue_front(taken, batch);
            self.poison(&mut st, &err);
            return Step::Worked;
        }
        if let Some(c) = st.current.as_mut() {
            c.msgs = false;
        }
        st.requeue_front(taken, batch);
        st.enter_short(self.cfg.core, &Error::NoSpace { op: "write batch" });
        Step::Worked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::testutil::temp_dir;
    use crate::types::{Mailbox, Recipient};

    fn run_local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    fn env() -> Envelope {
        Envelope {
            recipients: vec![Recipient {
                mailbox: Mailbox {
                    local: "a".into(),
                    domain: "x.example".into(),
                },
                notify: None,
                orcpt: None,
            }],
            ..Envelope::default()
        }
    }

    #[test]
    fn a_failed_fdatasync_poisons_the_writer() {
        let dir = temp_dir("journal-poison");
        run_local(async {
            let j = JournalHandle::open(
                JournalConfig::new(&dir, 0, IoKind::Epoll),
                DirRecovery::empty(0),
            )
            .await
            .unwrap();
            j.append_message(MessageId(1), 1, &env(), b"one")
                .await
                .unwrap();
            j.fail_next_sync();
            let err = j
                .append_message(MessageId(2), 1, &env(), b"two")
                .await
                .unwrap_err();
            assert!(
                matches!(err, Error::Io { ref source, .. } if source.raw_os_error().is_none()
                && source.kind() == std::io::Error::from_raw_os_error(libc::EIO).kind())
            );
            assert!(j.is_poisoned());
            for _ in 0..3 {
                let e = j
                    .append_message(MessageId(3), 1, &env(), b"three")
                    .await
                    .unwrap_err();
                assert!(matches!(e, Error::Poisoned), "{e}");
                let d = DomainName::parse("x.example").unwrap();
                let e = j
                    .append_done(MessageId(1), &d, Outcome::Delivered)
                    .await
                    .unwrap_err();
                assert!(matches!(e, Error::Poisoned));
            }
            assert!(matches!(j.reclaim().await, Err(Error::Poisoned)));
            let st = j.stats();
            assert_eq!(
                (st.batches, st.fsyncs, st.records),
                (2, 2, 1),
                "the failed batch is not durable"
            );
        });
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_disk_refuses_messages_keeps_recording_dones_and_recovers() {
        let dir = temp_dir("journal-full");
        let x = DomainName::parse("x.example").unwrap();
        run_local(async {
            let cfg = JournalConfig {
                segment_size: 64 << 10,
                ..JournalConfig::new(&dir, 0, IoKind::Epoll)
            };
            assert_eq!(cfg.reserve(), 8 << 10);
            let j = JournalHandle::open(cfg, DirRecovery::empty(0))
                .await
                .unwrap();
            j.fake_disk_full(true);
            let mut held = Vec::new();
            let err = loop {
                let id = MessageId(held.len() as u128 + 1);
                match j.append_message(id, 1, &env(), &[b'm'; 1000]).await {
                    Ok(_) => held.push(id),
                    Err(e) => break e,
                }
                assert!(held.len() < 100, "the segment never filled");
            };
            assert!(err.is_no_space(), "{err}");
            assert!(held.len() >= 40, "{} held", held.len());
            assert!(j.short_of_space() && !j.is_poisoned());
            let e = j
                .append_message(MessageId(999), 1, &env(), b"x")
                .await
                .unwrap_err();
            assert!(e.is_no_space(), "refused at once: {e}");
            // Every delivery is still recorded, in the reserve of the current segment.
            for id in &held {
                j.append_done(*id, &x, Outcome::Delivered).await.unwrap();
            }
            assert_eq!(j.segments().len(), 1, "no new segment on a full disk");
            assert!(j.status().no_space_refused >= 2);
            // Space returns: within a probe interval, messages are taken again.
            j.fake_disk_full(false);
            tokio::time::sleep(SPACE_PROBE + std::time::Duration::from_millis(300)).await;
            assert!(!j.short_of_space());
            j.append_message(MessageId(1000), 1, &env(), b"back")
                .await
                .unwrap();
            j.close().await;
        });
        let rec = crate::spool::recover(&dir).unwrap();
        assert!(rec.damage.is_empty(), "{:?}", rec.damage);
        let ids: Vec<MessageId> = rec.parts.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![MessageId(1000)], "every DONE was durable");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_writer_opens_on_a_full_disk_and_records_dones_when_space_returns() {
        let dir = temp_dir("journal-full-open");
        let x = DomainName::parse("x.example").unwrap();
        run_local(async {
            let j = JournalHandle::open(
                JournalConfig::new(&dir, 0, IoKind::Epoll),
                DirRecovery::empty(0),
            )
            .await
            .unwrap();
            j.append_message(MessageId(1), 1, &env(), b"one")
                .await
                .unwrap();
            j.close().await;
        });
        run_local(async {
            let mut rec = crate::spool::recover(&dir).unwrap();
            // Open as on a completely full disk: no segment at all can be made.
            let cfg = JournalConfig::new(&dir, 0, IoKind::Epoll);
            let j = JournalHandle::open_full_disk_for_test(cfg, rec.take_dir(0))
                .await
                .unwrap();
            assert!(j.short_of_space() && j.current_segment().is_none());
            let e = j
                .append_message(MessageId(2), 1, &env(), b"two")
                .await
                .unwrap_err();
            assert!(e.is_no_space());
            // The DONE waits for space instead of failing...
            let j2 = j.clone();
            let x2 = x.clone();
            let done = tokio::task::spawn_local(async move {
                j2.append_done(MessageId(1), &x2, Outcome::Delivered).await
            });
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            assert!(!done.is_finished(), "no space, no DONE");
            // ...and is written once space returns.
            j.fake_disk_full(false);
            done.await.unwrap().unwrap();
            assert!(!j.short_of_space());
            j.close().await;
        });
        let rec = crate::spool::recover(&dir).unwrap();
        assert!(rec.parts.is_empty(), "the DONE is durable");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_of_another_cores_messages_are_refused() {
        let dir = temp_dir("journal-core");
        run_local(async {
            let cfg = JournalConfig::new(&dir, 1, IoKind::Epoll);
            let j = JournalHandle::open(cfg, DirRecovery::empty(1))
                .await
                .unwrap();
            let theirs = MessageId::new(5, 0, 1);
            let x = DomainName::parse("x.example").unwrap();
            let e = j
                .append_done(theirs, &x, Outcome::Delivered)
                .await
                .unwrap_err();
            assert!(matches!(e, Error::InvalidLocation { .. }), "{e}");
            assert!(j.append_expire(theirs, &x).await.is_err());
            assert!(j.append_message(theirs, 1, &env(), b"x").await.is_err());
            let ours = MessageId::new(5, 1, 1);
            j.append_message(ours, 1, &env(), b"x").await.unwrap();
            j.append_done(ours, &x, Outcome::Delivered).await.unwrap();
            assert!(!j.is_poisoned());
        });
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn appends_after_close_are_refused_and_pending_ones_are_flushed() {
        let dir = temp_dir("journal-close");
        run_local(async {
            let j = JournalHandle::open(
                JournalConfig::new(&dir, 0, IoKind::Epoll),
                DirRecovery::empty(0),
            )
            .await
            .unwrap();
            let j2 = j.clone();
            let t = tokio::task::spawn_local(async move {
                j2.append_message(MessageId(1), 1, &env(), b"x").await
            });
            tokio::task::yield_now().await;
            j.close().await;
            assert!(
                t.await.unwrap().is_ok(),
                "queued before close, flushed by close"
            );
            let e = j
                .append_message(MessageId(2), 1, &env(), b"y")
                .await
                .unwrap_err();
            assert!(matches!(e, Error::Closed));
        });
        std::fs::remove_dir_all(dir).unwrap();
    }
}
