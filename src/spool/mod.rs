//! The held-mail spool: a per-core journal on disk and a per-domain index in memory.
//!
//! Mail accepted for a hosted domain must survive `kill -9` and power loss from the moment its
//! 250 is sent until the customer's 2xx during an `ATRN` reversal (or a bounce). The spool
//! gives that guarantee cheaply enough for MX rates.
//!
//! # What it owns
//!
//! - **The journal** (`<data>/journal/core-N/<seq:016x>.seg`). Every core appends to its own
//!   segment files through a [`JournalHandle`]; nothing else writes there. Records are `MSG`
//!   (envelope, per-domain parts, body), `DONE` (one domain part finished), `SETTLE` (some
//!   recipients of a part finished, the others still held) and `EXPIRE` (a part passed the
//!   maximum hold and awaits its bounce). The byte format is in
//!   `docs/spool-format.md` and in the `record` module.
//! - **The index** ([`DomainIndex`]): per domain, the held parts with their [`Location`],
//!   totals and age, living on the domain's shard core (`shard_hash() % cores`).
//!
//! # Lifecycle of a message
//!
//! ```text
//!   DATA done ──append_message──▶ MSG durable ──▶ 250, index insert on the shard core(s)
//!   ATRN, customer 2xx/5xx ──append_done──▶ DONE durable ──▶ index remove
//!   ... and 4xx for others ──append_settle──▶ SETTLE durable ──▶ index settle (narrowed)
//!   held > max hold ──append_expire──▶ bounce ──append_done(ExpiredBounced)──▶ index remove
//!   reclaim() ──▶ dead segments deleted, oldest mostly-dead one compacted ──▶ Relocated
//! ```
//!
//! # Invariants
//!
//! - **No future resolves `Ok` before its record is fdatasync'ed.** Appends are group
//!   committed: one write and one fdatasync for everything pending on the core.
//! - **Poisoned means stopped.** After a failed write or fdatasync a writer refuses every
//!   append with [`Error::Poisoned`] until restart; callers answer `451 4.3.0`.
//! - **A `DONE` goes to the journal of the core that wrote the `MSG`** (`id.core()`); the
//!   runtime routes it there. So each directory replays on its own, in order.
//! - **Recovery never guesses.** It stops a segment at the first bad or torn record, never
//!   panics on bad data, and returns every record written completely before the damage.
//! - **Space comes back only when it is safe**: a segment is deleted when nothing in it is
//!   live and no older segment still needs its `DONE`s; compaction copies are durable before
//!   their source segment is deleted.
//!
//! # What the runtime calls
//!
//! At start, before the core threads: [`recover`] (blocking) returns [`Recovered`]: route
//! each of its [`HeldPart`]s to its domain's shard core and [`DomainIndex::insert`] it; give
//! each core its [`DirRecovery`] via [`Recovered::take_dir`] and seed the core's id sequence
//! above [`DirRecovery::max_id`].
//!
//! On each core (inside its tokio-uring runtime or tokio current-thread runtime + `LocalSet`):
//! [`JournalHandle::open`], then [`JournalHandle::append_message`] /
//! [`JournalHandle::append_done`] / [`JournalHandle::append_expire`] from sessions,
//! [`JournalHandle::reclaim`] on a timer (forward [`ReclaimReport::relocated`] to the shard
//! cores, which call [`DomainIndex::relocate`], and wait until they did before the next
//! reclaim), and a [`Reader`] to stream bodies during a reversal. Whoever hands out
//! locations to a session pins their segments in [`SegmentPins`] for the session's life. [`IoKind`] picks io_uring or the blocking-pool fallback for all file I/O.
//!
//! Not done here: adopting journal directories of cores that no longer exist (fewer cores
//! after a restart), and `O_DIRECT` reads for cold queues.

mod error;
mod file;
mod index;
mod journal;
mod pins;
mod reader;
mod reclaim;
mod record;
mod recovery;
mod scrub;
mod stream;

pub use error::Error;
pub use file::{free_bytes, private_dir, IoKind, SegmentFile, DIR_MODE, FILE_MODE};
pub use index::{DomainIndex, DomainStats, HeldPart, Quarantined};
pub use journal::{
    journal_dir, segment_path, JournalConfig, JournalHandle, JournalStats, JournalStatus, Location,
    ReclaimReport, Relocated, DEFAULT_SEGMENT_SIZE,
};
pub use pins::{PinGuard, SegmentPins};
pub use reader::{BodyStream, Reader};
pub use record::{parts_of, MsgMeta, Outcome, Part};
pub use recovery::{recover, Damage, DirRecovery, MissingSegment, Recovered, SegmentSummary};
pub use scrub::{Scrub, ScrubFinding, ScrubPass, ScrubStep};
pub use stream::StreamAppend;

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("getrandom");
        let d = std::env::temp_dir().join(format!("turnpike-{tag}-{:016x}", u64::from_le_bytes(r)));
        std::fs::create_dir_all(&d).expect("create temp dir");
        d
    }
}
