//! Segment pins: a segment that a session still reads from is never deleted under it.
//!
//! A session (an ATRN reversal, an outbound relay attempt) gets the [`Location`]s of its
//! parts once, when it starts, from the domain's shard core. Compaction may copy those
//! messages forward meanwhile and the shard learns the new locations, but the session keeps
//! reading where it was told. So the shard pins every segment it hands out a location in, in
//! the same step (no gap in which the segment could go), and unpins them when the session
//! ends; the journal writer deletes no pinned segment (reclaim tries again later).
//!
//! Invariants: a pin is taken on the shard core while it answers from its index, and the
//! writer deletes a compacted segment only after every shard applied the relocations (so no
//! location in it is handed out after its last pin is gone). The table is the one piece of
//! cross-core state here: a mutex touched once per session start and end and once per reclaim,
//! never per message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Location;

/// Pin counts per segment (`(core, seq)`), shared by every core of a server.
#[derive(Debug, Default)]
pub struct SegmentPins {
    counts: Mutex<HashMap<(u16, u64), u32>>,
}

impl SegmentPins {
    /// A table with nothing pinned.
    pub fn new() -> SegmentPins {
        SegmentPins::default()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<(u16, u64), u32>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins each segment of `segments` once more.
    pub fn pin(&self, segments: &[(u16, u64)]) {
        let mut c = self.counts();
        for s in segments {
            *c.entry(*s).or_default() += 1;
        }
    }

    /// Gives back one pin of each segment of `segments`.
    pub fn unpin(&self, segments: &[(u16, u64)]) {
        let mut c = self.counts();
        for s in segments {
            if let Some(n) = c.get_mut(s) {
                *n -= 1;
                if *n == 0 {
                    c.remove(s);
                }
            }
        }
    }

    /// The pinned segments of journal `core`.
    pub fn pinned(&self, core: u16) -> Vec<u64> {
        self.counts()
            .keys()
            .filter(|(c, _)| *c == core)
            .map(|(_, s)| *s)
            .collect()
    }
}

/// Pins held until dropped: see [`SegmentPins::hold`].
#[derive(Debug)]
pub struct PinGuard {
    pins: Arc<SegmentPins>,
    segments: Vec<(u16, u64)>,
}

impl SegmentPins {
    /// Pins the segments of `locations` (each once) until the guard is dropped.
    pub fn hold<'a>(
        self: &Arc<Self>,
        locations: impl IntoIterator<Item = &'a Location>,
    ) -> PinGuard {
        let mut segments: Vec<(u16, u64)> =
            locations.into_iter().map(|l| (l.core, l.seq)).collect();
        segments.sort_unstable();
        segments.dedup();
        self.pin(&segments);
        PinGuard {
            pins: Arc::clone(self),
            segments,
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        self.pins.unpin(&self.segments);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_count_per_segment() {
        let p = SegmentPins::new();
        p.pin(&[(0, 1), (0, 2), (1, 1)]);
        p.pin(&[(0, 1)]);
        let mut v = p.pinned(0);
        v.sort();
        assert_eq!(v, vec![1, 2]);
        p.unpin(&[(0, 1), (0, 2)]);
        assert_eq!(p.pinned(0), vec![1]);
        p.unpin(&[(0, 1), (0, 1)]);
        assert!(p.pinned(0).is_empty());
        assert_eq!(p.pinned(1), vec![1]);
    }

    #[test]
    fn a_guard_pins_each_segment_once_until_dropped() {
        let p = Arc::new(SegmentPins::new());
        let at = |seq| Location {
            core: 2,
            seq,
            offset: 32,
            len: 10,
            body_offset: 40,
            body_len: 2,
            body_crc: 0,
        };
        let g = p.hold(&[at(5), at(5), at(6)]);
        let mut v = p.pinned(2);
        v.sort();
        assert_eq!(v, vec![5, 6]);
        drop(g);
        assert!(p.pinned(2).is_empty());
    }
}
