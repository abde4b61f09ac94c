//! The messages the load generators send: a unique id in a header, a body of an exact size
//! made of plain text lines, and the size distributions (`--size`, `--size-dist real`).
//!
//! Invariants: every message is valid RFC 5322 text with CRLF line endings only (no bare CR
//! or LF, so any server takes it), its total size is exactly what was asked (at least the
//! header), and it is fully determined by `(run, seq, size, envelope)`, so a receiver can be
//! checked byte for byte against [`MessageBody::digest`]. The id header is
//! `X-Bench-Id: <run>.<seq>` ([`bench_id`] finds it again).
//!
//! The filler is one shared static buffer; a message is its header plus a prefix of that
//! buffer plus a short tail, so generating a 10 MB message copies bytes and computes nothing.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use super::rng::Rng;

/// Length of a filler line, CRLF included.
const LINE: usize = 80;
/// Largest message any distribution produces (10 MB).
pub const MAX_SIZE: u64 = 10_000_000;

/// The static filler: lines of 78 printable characters and CRLF, [`MAX_SIZE`] long.
fn filler() -> &'static [u8] {
    static FILLER: OnceLock<Vec<u8>> = OnceLock::new();
    FILLER.get_or_init(|| {
        const WORDS: &[u8] = b"the quick brown fox jumps over the lazy dog while the mail waits \
            at the counter until its owner comes to collect it ";
        let lines = MAX_SIZE as usize / LINE + 1;
        let mut v = Vec::with_capacity(lines * LINE);
        for i in 0..lines {
            let start = (i * 7) % WORDS.len();
            v.extend((0..LINE - 2).map(|j| WORDS[(start + j) % WORDS.len()]));
            v.extend_from_slice(b"\r\n");
        }
        v
    })
}

/// One generated message: its header, a prefix of the filler and a tail.
#[derive(Clone, Debug)]
pub struct MessageBody {
    head: Vec<u8>,
    fill: usize,
    tail: &'static [u8],
}

impl MessageBody {
    /// The message `seq` of run `run`, `size` octets long (or just the header if that is
    /// longer), from `sender` to `recipients`.
    pub fn new(run: &str, seq: u64, size: u64, sender: &str, recipients: &[String]) -> Self {
        let want = usize::try_from(size.min(MAX_SIZE)).unwrap_or(0);
        let head = Self::header(run, seq, sender, recipients, "");
        if want.saturating_sub(head.len()) == 1 {
            // One octet cannot end with CRLF: put it in the subject instead.
            let head = Self::header(run, seq, sender, recipients, ".");
            return MessageBody {
                head,
                fill: 0,
                tail: b"",
            };
        }
        let rest = want.saturating_sub(head.len());
        let (fill, tail): (usize, &'static [u8]) = match rest {
            0 | 1 => (0, b""),
            n => {
                let m = n - 2;
                if m % LINE == LINE - 1 {
                    // The prefix would end on the CR of a line: end it one character early.
                    (m - 1, b"a\r\n")
                } else {
                    (m, b"\r\n")
                }
            }
        };
        MessageBody { head, fill, tail }
    }

    fn header(run: &str, seq: u64, sender: &str, recipients: &[String], pad: &str) -> Vec<u8> {
        format!(
            "From: <{sender}>\r\nTo: {}\r\nSubject: turnpike bench {run} message {seq}{pad}\r\n\
             Message-ID: <{seq}.{run}@bench.turnpike>\r\n\
             Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nX-Bench-Id: {run}.{seq}\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
            recipients
                .iter()
                .map(|r| format!("<{r}>"))
                .collect::<Vec<_>>()
                .join(", ")
        )
        .into_bytes()
    }

    /// Total octets.
    pub fn len(&self) -> usize {
        self.head.len() + self.fill + self.tail.len()
    }

    /// True for an empty message (never produced: the header is always there).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends octets `start..end` of the message to `out`.
    pub fn copy_range(&self, start: usize, end: usize, out: &mut Vec<u8>) {
        let end = end.min(self.len());
        let mut pos = start;
        let parts: [&[u8]; 3] = [&self.head, &filler()[..self.fill], self.tail];
        let mut base = 0;
        for part in parts {
            let (lo, hi) = (base, base + part.len());
            if pos < hi && pos < end {
                let to = end.min(hi);
                out.extend_from_slice(&part[pos - lo..to - lo]);
                pos = to;
            }
            base = hi;
        }
    }

    /// The whole message in one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.copy_range(0, self.len(), &mut v);
        v
    }

    /// SHA-256 of the whole message.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&self.head);
        h.update(&filler()[..self.fill]);
        h.update(self.tail);
        h.finalize().into()
    }
}

/// SHA-256 of `bytes`.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The `X-Bench-Id` value in the header of `message` (`<run>.<seq>`), if any.
pub fn bench_id(message: &[u8]) -> Option<&str> {
    let end = memchr::memmem::find(message, b"\r\n\r\n").unwrap_or(message.len());
    let head = &message[..end];
    let at = memchr::memmem::find(head, b"\r\nX-Bench-Id: ")? + 14;
    let len = memchr::memchr(b'\r', &head[at..]).unwrap_or(head.len() - at);
    std::str::from_utf8(&head[at..at + len]).ok()
}

/// The message as the sender wrote it: `message` without the `Received:` fields that servers
/// put in front (with their continuation lines).
pub fn strip_trace(message: &[u8]) -> &[u8] {
    let mut rest = message;
    while rest.len() >= 9 && rest[..9].eq_ignore_ascii_case(b"received:") {
        // The field ends at a CRLF not followed by folding white space.
        let mut pos = 0;
        loop {
            match memchr::memmem::find(&rest[pos..], b"\r\n") {
                Some(i) => {
                    pos += i + 2;
                    if !matches!(rest.get(pos), Some(b' ' | b'\t')) {
                        break;
                    }
                }
                None => return &rest[rest.len()..],
            }
        }
        rest = &rest[pos..];
    }
    rest
}

/// How message sizes are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SizeDist {
    /// Every message this many octets.
    Fixed(u64),
    /// The realistic mix of [`REAL_MIX`].
    Real,
}

/// `--size-dist real`: (share in percent, smallest, largest octets). Within a band sizes are
/// log-uniform. Mean about 140 KB, median about 8 KB; documented in docs/benchmarks.md.
pub const REAL_MIX: &[(f64, u64, u64)] = &[
    (35.0, 1_000, 4_000),
    (30.0, 4_000, 16_000),
    (17.0, 16_000, 64_000),
    (10.0, 64_000, 256_000),
    (5.0, 256_000, 1_000_000),
    (2.5, 1_000_000, 4_000_000),
    (0.5, 4_000_000, MAX_SIZE),
];

impl SizeDist {
    /// Parses `--size-dist`: `real`, or a size as `--size` takes it.
    pub fn parse(s: &str) -> Option<SizeDist> {
        if s.eq_ignore_ascii_case("real") {
            return Some(SizeDist::Real);
        }
        crate::config::parse_size(s)
            .filter(|&n| n <= MAX_SIZE)
            .map(SizeDist::Fixed)
    }

    /// One size.
    pub fn sample(self, rng: &mut Rng) -> u64 {
        match self {
            SizeDist::Fixed(n) => n,
            SizeDist::Real => {
                let mut pick = rng.unit() * 100.0;
                for &(share, lo, hi) in REAL_MIX {
                    if pick < share {
                        let (lo, hi) = (lo as f64, hi as f64);
                        return (lo * (hi / lo).powf(rng.unit())) as u64;
                    }
                    pick -= share;
                }
                REAL_MIX[0].1
            }
        }
    }

    /// For reports: `4096` or `real`.
    pub fn describe(self) -> String {
        match self {
            SizeDist::Fixed(n) => n.to_string(),
            SizeDist::Real => "real".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_sizes_and_crlf_only() {
        let rcpts = vec!["user@example.com".to_string()];
        for size in (0..700).chain([4096, 65_536, 1_000_003, MAX_SIZE]) {
            let m = MessageBody::new("r1", 7, size, "s@client.test", &rcpts);
            let v = m.to_vec();
            let head = m.head.len() as u64;
            assert_eq!(v.len() as u64, size.max(head), "size {size}");
            assert!(v.ends_with(b"\r\n"), "size {size}");
            for (i, b) in v.iter().enumerate() {
                if *b == b'\n' {
                    assert_eq!(v[i - 1], b'\r', "bare LF at {i}, size {size}");
                }
                if *b == b'\r' {
                    assert_eq!(v.get(i + 1), Some(&b'\n'), "bare CR at {i}, size {size}");
                }
            }
            assert_eq!(m.digest(), digest(&v));
            assert_eq!(bench_id(&v), Some("r1.7"));
        }
    }

    #[test]
    fn copy_range_at_every_split() {
        let m = MessageBody::new("r", 1, 1000, "a@b.c", &["x@y.z".into()]);
        let whole = m.to_vec();
        for cut in 0..whole.len() {
            let mut v = Vec::new();
            m.copy_range(0, cut, &mut v);
            m.copy_range(cut, whole.len(), &mut v);
            assert_eq!(v, whole, "cut {cut}");
        }
    }

    #[test]
    fn strips_leading_received_fields_only() {
        let m = b"Received: from a\r\n\tby b; now\r\nReceived: x\r\nFrom: <a@b>\r\n\r\nReceived: body\r\n";
        assert_eq!(strip_trace(m), b"From: <a@b>\r\n\r\nReceived: body\r\n");
        assert_eq!(strip_trace(b"From: x\r\n"), b"From: x\r\n");
    }

    #[test]
    fn real_mix_spans_one_kb_to_ten_mb() {
        let total: f64 = REAL_MIX.iter().map(|b| b.0).sum();
        assert!((total - 100.0).abs() < 1e-9);
        let mut rng = Rng::new(1);
        let sizes: Vec<u64> = (0..20_000)
            .map(|_| SizeDist::Real.sample(&mut rng))
            .collect();
        assert!(sizes.iter().all(|&s| (1_000..=MAX_SIZE).contains(&s)));
        let small = sizes.iter().filter(|&&s| s < 4_000).count() as f64 / 200.0;
        assert!((30.0..40.0).contains(&small), "{small}% under 4 KB");
        assert!(sizes.iter().any(|&s| s > 4_000_000));
    }
}
