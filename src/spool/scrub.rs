//! The background scrub: re-reads held mail in the older segments of a journal and checks
//! both checksums of every record, at a low rate, so damage is found (and the parts
//! quarantined) before a customer's session reaches it.
//!
//! Recovery reads only record heads in the older segments, and a reader checks a body only
//! when it delivers it, so bit rot in a message that waits for weeks would otherwise stay
//! unseen. The scrub walks the segments that are not the current one, oldest first, one
//! [`JournalHandle::scrub_step`] at a time; the caller paces the steps (bytes per second) and
//! acts on what each step found.
//!
//! Invariants: the scrub only reads; a message that was finished or moved since the step
//! chose it is skipped (it is checked where it lives now, at its turn); a finding names the
//! message and its live parts at that moment.

use std::path::Path;

use super::file::SegmentFile;
use super::journal::{segment_path, JournalHandle};
use super::record::{FixedHeader, RECORD_HEADER_LEN};
use super::Error;
use crate::types::{DomainName, MessageId};

/// Bytes per read while verifying a body.
const CHUNK: usize = 256 << 10;

/// A held message to check: id, record offset, record length.
pub(crate) type Held = (MessageId, u64, u64);

/// Where a scrub pass stands, kept by the caller between steps.
#[derive(Debug, Default)]
pub struct Scrub {
    /// The segment being checked, and the messages of it still to check.
    segment: Option<(u64, Vec<Held>)>,
    /// The last segment finished in this pass.
    done_through: u64,
    pass: ScrubPass,
}

/// Totals of one pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubPass {
    /// Messages checked.
    pub messages: u64,
    /// Record bytes read.
    pub bytes: u64,
    /// Messages found damaged.
    pub damaged: u64,
}

/// A held message the scrub found damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubFinding {
    /// The message.
    pub id: MessageId,
    /// Its live parts (quarantine them).
    pub domains: Vec<DomainName>,
    /// The segment holding the record.
    pub seq: u64,
    /// Offset of the record in the segment.
    pub offset: u64,
    /// What did not match.
    pub reason: String,
}

/// What one step did.
#[derive(Debug, Default)]
pub struct ScrubStep {
    /// Record bytes read.
    pub bytes: u64,
    /// Damaged messages found.
    pub damaged: Vec<ScrubFinding>,
    /// Set when this step ended a pass: its totals.
    pub pass_done: Option<ScrubPass>,
}

impl JournalHandle {
    /// Checks held messages of the older segments, continuing where `scrub` stands, until
    /// about `budget` bytes were read (at least one message). A pass that finds nothing to
    /// check ends at once.
    pub async fn scrub_step(&self, scrub: &mut Scrub, budget: u64) -> ScrubStep {
        let mut step = ScrubStep::default();
        while step.bytes < budget.max(1) {
            if scrub.segment.as_ref().is_none_or(|(_, m)| m.is_empty()) {
                if let Some((seq, _)) = scrub.segment.take() {
                    scrub.done_through = seq;
                }
                match self.scrub_next_segment(scrub.done_through) {
                    Some((seq, mut msgs)) => {
                        msgs.reverse(); // popped from the back: oldest offset first
                        scrub.segment = Some((seq, msgs));
                        continue;
                    }
                    None => {
                        step.pass_done = Some(std::mem::take(&mut scrub.pass));
                        scrub.done_through = 0;
                        return step;
                    }
                }
            }
            let Some((seq, msgs)) = scrub.segment.as_mut() else {
                continue;
            };
            let seq = *seq;
            let (id, offset, len) = msgs.pop().expect("not empty");
            let Some(domains) = self.scrub_still_at(id, seq, offset) else {
                continue;
            };
            let path = segment_path(self.data_dir(), self.core(), seq);
            step.bytes += len;
            scrub.pass.bytes += len;
            scrub.pass.messages += 1;
            if let Err(e) = verify_record(&path, self.io(), offset, len).await {
                if !e.is_damage() {
                    tracing::warn!(core = self.core(), seq, offset, error = %e, "scrub could not read a record; trying again next pass");
                    continue;
                }
                // Finished or moved while it was read: not held there any more.
                if self.scrub_still_at(id, seq, offset).is_none() {
                    continue;
                }
                scrub.pass.damaged += 1;
                tracing::error!(core = self.core(), %id, seq, offset, error = %e, "scrub found a damaged held message");
                step.damaged.push(ScrubFinding {
                    id,
                    domains,
                    seq,
                    offset,
                    reason: e.to_string(),
                });
            }
        }
        step
    }
}

/// Reads the record of `len` bytes at `offset` and checks its head and body checksums.
async fn verify_record(path: &Path, io: super::IoKind, offset: u64, len: u64) -> Result<(), Error> {
    let corrupt = |reason| Error::Corrupt {
        path: path.to_owned(),
        offset,
        reason,
    };
    let file = SegmentFile::open_read(path, io)
        .await
        .map_err(|e| Error::io("open segment", Some(path.to_owned()), e))?;
    let (r, head) = file
        .read_exact_at(Vec::new(), offset, RECORD_HEADER_LEN as usize)
        .await;
    r.map_err(|e| Error::io("read record", Some(path.to_owned()), e))?;
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    h.copy_from_slice(&head);
    let fh = FixedHeader::parse(&h).map_err(|_| corrupt("bad record header"))?;
    if fh.record_len() != Some(len) {
        return Err(corrupt("record length does not match its location"));
    }
    let (r, meta) = file
        .read_exact_at(Vec::new(), offset + RECORD_HEADER_LEN, fh.meta_len as usize)
        .await;
    r.map_err(|e| Error::io("read record", Some(path.to_owned()), e))?;
    if !fh.verify(&h, &meta) {
        return Err(corrupt("head checksum mismatch"));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut pos = offset + RECORD_HEADER_LEN + u64::from(fh.meta_len);
    let mut left = fh.body_len;
    let mut buf = Vec::with_capacity(CHUNK.min(left as usize));
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        let (r, b) = file.read_exact_at(buf, pos, n).await;
        r.map_err(|e| Error::io("read record body", Some(path.to_owned()), e))?;
        crc.update(&b);
        buf = b;
        pos += n as u64;
        left -= n as u64;
    }
    if crc.finalize() != fh.body_crc {
        return Err(corrupt("body checksum mismatch"));
    }
    Ok(())
}
