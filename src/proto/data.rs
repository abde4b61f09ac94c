//! Message content intake: the DATA end-of-data scanner and unstuffer (RFC 5321 §4.1.4,
//! §4.5.2), and the raw BDAT chunk accumulator (RFC 3030).
//!
//! Both produce the same thing: the canonical message (CRLF line endings, dots unstuffed, no
//! terminator) appended to a caller-owned `Vec`, plus a [`DataOutcome`] that the state machine
//! turns into a verdict. Neither ever stops early on bad content; they record it and keep going
//! to the real end, so what follows the message is always read as the next command and never
//! as a fragment of the body (and vice versa).
//!
//! End of data (the SMTP smuggling defence, PROTOCOL.md §3): **only** CRLF "." CRLF ends DATA,
//! where the start of the body counts as just after a CRLF (so ".\r\n" as the first line is an
//! empty message). Every other line ending is recorded:
//! - `bare_lf`: a LF not preceded by CR; `bare_cr`: a CR not followed by LF;
//! - `smuggling`: a lone "." between line endings of which at least one is bare (`LF.LF`,
//!   `LF.CRLF`, `CRLF.LF`, `CR.CR`, `CRLF.CR`, ...) – the sequences other MTAs have taken as the
//!   end of data. It always comes with `bare_lf` or `bare_cr`.
//!
//! The inbound machine rejects a message with any of these (see `inbound`), so the body bytes of
//! such a message only need to be bounded, not meaningful.
//!
//! Size: `size` counts every unstuffed octet, including those past the limit; appending stops
//! at the limit, and stops altogether after `discard_body` (a message already refused), while
//! the scan goes on to the real end. The caller may take the appended bytes out of `out` at any
//! time (that is how bodies stream): the intake keeps its own count, never `out.len()`.
//!
//! Loop guard: `Received:` header fields are counted in the header section, which ends at the
//! first empty line (RFC 5322 §2.1). Only lines beginning exactly `Received:` (any case) count;
//! the obsolete form with blanks before the colon does not.
//!
//! The scanner is a resumable state machine in the style of hyper's `ChunkedState`: it carries
//! the few bytes of context it needs across calls, so input may be split at any byte.

use memchr::{memchr2, memchr2_iter};

/// What the content intake found, for the state machine's verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataOutcome {
    /// Octets of the canonical message (unstuffed, without terminator), all of them, even
    /// those past the limit.
    pub size: u64,
    /// `size` is over the limit; the appended body is truncated at the limit.
    pub oversize: bool,
    /// A LF not preceded by CR was seen.
    pub bare_lf: bool,
    /// A CR not followed by LF was seen.
    pub bare_cr: bool,
    /// A non-standard end-of-data look-alike was seen (implies `bare_lf` or `bare_cr`).
    pub smuggling: bool,
    /// `Received:` fields in the header section.
    pub received: u32,
}

impl DataOutcome {
    /// True when every line ended in CRLF.
    pub fn is_canonical(&self) -> bool {
        !(self.bare_lf || self.bare_cr)
    }
}

/// Progress of [`DataScanner::feed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// All input was consumed; the terminator has not been seen yet.
    NeedMore,
    /// The terminator was seen. `consumed` counts the input bytes up to and including it; the
    /// rest of the input belongs to the next command.
    Finished {
        /// Bytes of this call's input that were part of the message.
        consumed: usize,
    },
}

/// Where the scanner is, named for what the last bytes were.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the body start or right after CRLF.
    LineStart,
    /// CRLF "." : a terminator if CRLF follows, else a stuffing dot.
    Dot,
    /// CRLF "." CR : the end if LF follows.
    DotCr,
    /// Inside a line.
    Text,
    /// After a CR (already emitted) inside a line.
    Cr,
    /// Right after a bare LF or bare CR: where a lenient MTA would see a line start.
    Loose,
    /// A "." right after a bare line ending: a smuggled terminator if CR or LF follows.
    LooseDot,
    /// The terminator was consumed.
    Done,
}

/// The resumable DATA scanner: finds CRLF.CRLF, unstuffs, and records violations.
#[derive(Clone, Debug)]
pub struct DataScanner {
    state: State,
    limit: u64,
    outcome: DataOutcome,
    headers: HeaderCounter,
    /// Append nothing more (the message is refused already); scanning goes on.
    discard: bool,
}

impl DataScanner {
    /// A scanner that appends at most `limit` octets of body.
    pub fn new(limit: u64) -> Self {
        DataScanner {
            state: State::LineStart,
            limit,
            outcome: DataOutcome::default(),
            headers: HeaderCounter::default(),
            discard: false,
        }
    }

    /// From now on appends nothing (sizes and violations are still recorded): for a message
    /// whose refusal is already decided.
    pub fn discard_body(&mut self) {
        self.discard = true;
    }

    /// Scans `input`, appending unstuffed body bytes to `out`. After `Finished`, further calls
    /// consume nothing.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        if self.state == State::Done {
            return Progress::Finished { consumed: 0 };
        }
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Text {
                // Fast path: copy the run up to the next CR or LF in one go.
                let run = &input[i..];
                let n = memchr2(b'\r', b'\n', run).unwrap_or(run.len());
                self.emit(out, &run[..n]);
                i += n;
                if i == input.len() {
                    break;
                }
            }
            self.step(input[i], out);
            i += 1;
            if self.state == State::Done {
                self.outcome.received = self.headers.count;
                return Progress::Finished { consumed: i };
            }
        }
        Progress::NeedMore
    }

    /// True once the terminator has been consumed.
    pub fn is_finished(&self) -> bool {
        self.state == State::Done
    }

    /// What was found so far (complete once finished).
    pub fn outcome(&self) -> DataOutcome {
        DataOutcome {
            received: self.headers.count,
            ..self.outcome
        }
    }

    fn step(&mut self, b: u8, out: &mut Vec<u8>) {
        match self.state {
            State::LineStart if b == b'.' => self.state = State::Dot,
            State::LineStart | State::Text => self.text(b, out),
            State::Dot => match b {
                b'\r' => self.state = State::DotCr,
                b'\n' => {
                    // CRLF "." LF: the dot was stuffing, the LF is bare.
                    self.outcome.smuggling = true;
                    self.text(b, out);
                }
                // Any other byte: the dot was stuffing (RFC 5321 §4.5.2) and is dropped.
                _ => self.text(b, out),
            },
            State::DotCr if b == b'\n' => self.state = State::Done,
            State::DotCr => {
                // CRLF "." CR x: the dot was stuffing and the CR is bare.
                self.outcome.smuggling = true;
                self.outcome.bare_cr = true;
                self.emit(out, b"\r");
                self.loose(b, out);
            }
            State::Cr if b == b'\n' => {
                self.emit(out, b"\n");
                self.state = State::LineStart;
            }
            State::Cr => {
                self.outcome.bare_cr = true;
                self.loose(b, out);
            }
            State::Loose => self.loose(b, out),
            State::LooseDot => {
                if b == b'\r' || b == b'\n' {
                    self.outcome.smuggling = true;
                }
                self.text(b, out);
            }
            State::Done => {}
        }
    }

    fn text(&mut self, b: u8, out: &mut Vec<u8>) {
        self.emit(out, &[b]);
        self.state = match b {
            b'\r' => State::Cr,
            b'\n' => {
                self.outcome.bare_lf = true;
                State::Loose
            }
            _ => State::Text,
        };
    }

    fn loose(&mut self, b: u8, out: &mut Vec<u8>) {
        if b == b'.' {
            self.emit(out, b".");
            self.state = State::LooseDot;
        } else {
            self.text(b, out);
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        self.headers.track(bytes);
        let limit = if self.discard { 0 } else { self.limit };
        append_limited(out, bytes, &mut self.outcome, limit);
        self.outcome.oversize = self.outcome.size > self.limit;
    }
}

/// Accumulates the raw chunks of a BDAT transfer (RFC 3030): no stuffing, no terminator, but
/// the same canonical-CRLF check, size limit and `Received:` count as DATA.
#[derive(Clone, Debug)]
pub struct ChunkAccumulator {
    limit: u64,
    outcome: DataOutcome,
    headers: HeaderCounter,
    /// The last byte of the previous chunk was CR: its LF may start the next chunk.
    prev_cr: bool,
    /// The last two octets of the body so far.
    tail: [u8; 2],
    /// Append nothing more (the message is refused already); checking goes on.
    discard: bool,
}

impl ChunkAccumulator {
    /// An accumulator that appends at most `limit` octets.
    pub fn new(limit: u64) -> Self {
        ChunkAccumulator {
            limit,
            outcome: DataOutcome::default(),
            headers: HeaderCounter::default(),
            prev_cr: false,
            tail: [0; 2],
            discard: false,
        }
    }

    /// From now on appends nothing (sizes and violations are still recorded): for a message
    /// whose refusal is already decided.
    pub fn discard_body(&mut self) {
        self.discard = true;
    }

    /// Appends one piece of chunk data (chunks may be split anywhere).
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let Some(&last) = bytes.last() else { return };
        for p in memchr2_iter(b'\r', b'\n', bytes) {
            if bytes[p] == b'\n' {
                let after_cr = if p == 0 {
                    self.prev_cr
                } else {
                    bytes[p - 1] == b'\r'
                };
                self.outcome.bare_lf |= !after_cr;
            } else if p + 1 < bytes.len() && bytes[p + 1] != b'\n' {
                self.outcome.bare_cr = true;
            }
        }
        if self.prev_cr && bytes[0] != b'\n' {
            self.outcome.bare_cr = true;
        }
        self.prev_cr = last == b'\r';
        self.tail = if bytes.len() >= 2 {
            [bytes[bytes.len() - 2], last]
        } else {
            [self.tail[1], last]
        };
        self.headers.track(bytes);
        self.append(out, bytes);
    }

    fn append(&mut self, out: &mut Vec<u8>, bytes: &[u8]) {
        let limit = if self.discard { 0 } else { self.limit };
        append_limited(out, bytes, &mut self.outcome, limit);
        self.outcome.oversize = self.outcome.size > self.limit;
    }

    /// Ends the body: a trailing lone CR is bare, and a non-empty body that does not end in
    /// CRLF gets one (we store canonical messages only).
    pub fn finish(&mut self, out: &mut Vec<u8>) -> DataOutcome {
        if self.prev_cr {
            self.outcome.bare_cr = true;
            self.prev_cr = false;
        }
        if self.outcome.size > 0 && self.tail != *b"\r\n" {
            self.append(out, b"\r\n");
            self.tail = *b"\r\n";
        }
        self.outcome()
    }

    /// What was found so far.
    pub fn outcome(&self) -> DataOutcome {
        DataOutcome {
            received: self.headers.count,
            ..self.outcome
        }
    }
}

fn append_limited(out: &mut Vec<u8>, bytes: &[u8], outcome: &mut DataOutcome, limit: u64) {
    let room = limit.saturating_sub(outcome.size);
    let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
    out.extend_from_slice(&bytes[..take]);
    outcome.size = outcome.size.saturating_add(bytes.len() as u64);
    outcome.oversize = outcome.size > limit;
}

/// Counts `Received:` lines until the first empty line, from the emitted (canonical) bytes.
#[derive(Clone, Debug, Default)]
struct HeaderCounter {
    /// The header section has ended.
    done: bool,
    /// Bytes of the current line so far (saturating), CR included.
    len: usize,
    /// The first bytes of the current line.
    prefix: [u8; 9],
    prev_cr: bool,
    count: u32,
}

impl HeaderCounter {
    fn track(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.done {
                return;
            }
            if b == b'\n' {
                let content = self.len - usize::from(self.prev_cr);
                if content == 0 {
                    self.done = true;
                } else if self.len >= 9 && self.prefix.eq_ignore_ascii_case(b"received:") {
                    self.count = self.count.saturating_add(1);
                }
                self.len = 0;
            } else {
                if self.len < self.prefix.len() {
                    self.prefix[self.len] = b;
                }
                self.len = self.len.saturating_add(1);
            }
            self.prev_cr = b == b'\r';
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Result of one scan: body, total bytes consumed (None if never finished), outcome.
    type Scan = (Vec<u8>, Option<usize>, DataOutcome);

    fn scan(pieces: &[&[u8]], limit: u64) -> Scan {
        let mut s = DataScanner::new(limit);
        let mut body = Vec::new();
        let mut offset = 0;
        for piece in pieces {
            match s.feed(piece, &mut body) {
                Progress::NeedMore => offset += piece.len(),
                Progress::Finished { consumed } => {
                    assert!(s.is_finished());
                    assert_eq!(
                        s.feed(b"more", &mut body),
                        Progress::Finished { consumed: 0 }
                    );
                    return (body, Some(offset + consumed), s.outcome());
                }
            }
        }
        (body, None, s.outcome())
    }

    /// Whole, split at every offset, split at every pair of offsets (short inputs) and byte by
    /// byte must all agree.
    fn scan_every_way(input: &[u8], limit: u64) -> Scan {
        let whole = scan(&[input], limit);
        for cut in 0..=input.len() {
            let got = scan(&[&input[..cut], &input[cut..]], limit);
            assert_eq!(
                got,
                whole,
                "{:?} split at {cut}",
                String::from_utf8_lossy(input)
            );
        }
        if input.len() <= 40 {
            for a in 0..=input.len() {
                for b in a..=input.len() {
                    let got = scan(&[&input[..a], &input[a..b], &input[b..]], limit);
                    assert_eq!(got, whole, "split at {a} and {b}");
                }
            }
        }
        let singles: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(scan(&singles, limit), whole, "byte by byte");
        whole
    }

    struct Flags {
        lf: bool,
        cr: bool,
        smuggling: bool,
    }

    const LF: Flags = Flags {
        lf: true,
        cr: false,
        smuggling: false,
    };
    const CR: Flags = Flags {
        lf: false,
        cr: true,
        smuggling: false,
    };
    const LF_SMUGGLE: Flags = Flags {
        lf: true,
        cr: false,
        smuggling: true,
    };
    const CR_SMUGGLE: Flags = Flags {
        lf: false,
        cr: true,
        smuggling: true,
    };
    const CLEAN: Flags = Flags {
        lf: false,
        cr: false,
        smuggling: false,
    };

    #[test]
    fn end_of_data_unstuffing_and_violations() {
        let cases: Vec<(&str, &str, usize, Flags)> = vec![
            (".\r\n", "", 3, CLEAN),
            (".\r\nQUIT\r\n", "", 3, CLEAN),
            ("hi\r\n.\r\n", "hi\r\n", 7, CLEAN),
            ("hi\r\n.\r\nQUIT\r\n", "hi\r\n", 7, CLEAN),
            (
                "hi\r\n..\r\n.a\r\n\r\n.\r\n",
                "hi\r\n.\r\na\r\n\r\n",
                17,
                CLEAN,
            ),
            ("..\r\n...\r\n.\r\n", ".\r\n..\r\n", 12, CLEAN),
            ("a.\r\n. \r\n.\r\n", "a.\r\n \r\n", 11, CLEAN),
            (
                "8bit \u{e9} \0 ok\r\n.\r\n",
                "8bit \u{e9} \0 ok\r\n",
                17,
                CLEAN,
            ),
            ("bare\nlf\r\n.\r\n", "bare\nlf\r\n", 12, LF),
            ("bare\rcr\r\n.\r\n", "bare\rcr\r\n", 12, CR),
            ("crcr\r\r\n.\r\n", "crcr\r\r\n", 10, CR),
            ("a\r\n.\r\r\n.\r\n", "a\r\n\r\r\n", 10, CR_SMUGGLE),
            (
                "\r\na\rb\nc\r\n.d\r\n..\r\n\r\n.\r\n",
                "\r\na\rb\nc\r\nd\r\n.\r\n\r\n",
                22,
                Flags {
                    lf: true,
                    cr: true,
                    smuggling: false,
                },
            ),
        ];
        for (input, body, consumed, flags) in &cases {
            let (got_body, got_consumed, outcome) = scan_every_way(input.as_bytes(), 1 << 20);
            assert_eq!(String::from_utf8_lossy(&got_body), *body, "{input:?}");
            assert_eq!(got_consumed, Some(*consumed), "{input:?}");
            assert_eq!(
                (outcome.bare_lf, outcome.bare_cr),
                (flags.lf, flags.cr),
                "{input:?}"
            );
            assert_eq!(outcome.smuggling, flags.smuggling, "{input:?}");
            assert!(!outcome.oversize);
            assert_eq!(outcome.size, got_body.len() as u64);
        }
    }

    #[test]
    fn smuggled_terminators_do_not_end_data() {
        // The cases of smtp-proto's receiver tests, and their mirror images: a fake terminator
        // followed by commands. Everything up to the real CRLF.CRLF must stay in the message.
        let tail = "MAIL FROM:<hello@world.com>\r\nRCPT TO:<test@domain.com\r\nDATA\r\n\r\n.\r\n";
        let tail_body = "MAIL FROM:<hello@world.com>\r\nRCPT TO:<test@domain.com\r\nDATA\r\n\r\n";
        let cases: Vec<(&str, &str, Flags)> = vec![
            ("\n.\r\n", "\n.\r\n", LF_SMUGGLE),
            ("\n.\n", "\n.\n", LF_SMUGGLE),
            ("\r.\r\n", "\r.\r\n", CR_SMUGGLE),
            ("\r.\r", "\r.\r", CR_SMUGGLE),
            ("x\r\n.\n", "x\r\n\n", LF_SMUGGLE),
            ("x\r\n.\rY", "x\r\n\rY", CR_SMUGGLE),
            ("x\n.\r\n", "x\n.\r\n", LF_SMUGGLE),
            (
                "x\r.\n",
                "x\r.\n",
                Flags {
                    lf: true,
                    cr: true,
                    smuggling: true,
                },
            ),
            (".\n", "\n", LF_SMUGGLE),
            ("x\n\n", "x\n\n", LF),
        ];
        for (prefix, prefix_body, flags) in &cases {
            let input = format!("{prefix}{tail}QUIT\r\n");
            let (body, consumed, outcome) = scan_every_way(input.as_bytes(), 1 << 20);
            assert_eq!(
                String::from_utf8_lossy(&body),
                format!("{prefix_body}{tail_body}"),
                "{prefix:?}"
            );
            assert_eq!(consumed, Some(prefix.len() + tail.len()), "{prefix:?}");
            assert_eq!(
                (outcome.bare_lf, outcome.bare_cr),
                (flags.lf, flags.cr),
                "{prefix:?}"
            );
            assert_eq!(outcome.smuggling, flags.smuggling, "{prefix:?}");
            assert!(!outcome.is_canonical());
        }
    }

    #[test]
    fn unterminated_data_needs_more() {
        for input in [
            "",
            "abc",
            "abc\r\n",
            "abc\r\n.",
            "abc\r\n.\r",
            "\n.\n",
            "\r.\r",
        ] {
            let (_, consumed, _) = scan_every_way(input.as_bytes(), 100);
            assert_eq!(consumed, None, "{input:?}");
        }
    }

    #[test]
    fn size_limit_truncates_but_scans_to_the_end() {
        let (body, consumed, o) = scan_every_way(b"0123456789ABC\r\n..x\r\n.\r\nNEXT", 10);
        assert_eq!(body, b"0123456789");
        assert_eq!(consumed, Some(23));
        assert_eq!((o.size, o.oversize), (19, true));
        let (body, _, o) = scan_every_way(b"12345678\r\n.\r\n", 10);
        assert_eq!((body.len(), o.size, o.oversize), (10, 10, false));
    }

    #[test]
    fn received_fields_counted_in_header_section_only() {
        let msg =
            "Received: from a\r\n\tby b\r\nRECEIVED:x\r\nX-Received: no\r\nReceived : old\r\n\
                   Subject: hi\r\n\r\nReceived: in body\r\n.\r\n";
        assert_eq!(scan_every_way(msg.as_bytes(), 1 << 20).2.received, 2);
        // A stuffed dot does not hide a header, and no empty line means all lines are headers.
        assert_eq!(
            scan_every_way(b"Received: a\r\nReceived: b\r\n.\r\n", 100)
                .2
                .received,
            2
        );
        assert_eq!(
            scan_every_way(b"\r\nReceived: a\r\n.\r\n", 100).2.received,
            0
        );
    }

    #[test]
    fn body_taken_out_between_feeds_adds_up_and_discard_keeps_counting() {
        // A streaming caller empties `out` after every feed: the pieces must add up to the
        // whole body at every split, since the scanner counts on its own, not on `out.len()`.
        let input = b"Received: a\r\n\r\n..one\r\ntwo\r\n\r\n.\r\n";
        let (whole, _, want) = scan_every_way(input, 1 << 20);
        for cut in 0..=input.len() {
            let mut s = DataScanner::new(1 << 20);
            let (mut out, mut streamed) = (Vec::new(), Vec::new());
            for piece in [&input[..cut], &input[cut..]] {
                let _ = s.feed(piece, &mut out);
                streamed.append(&mut out);
            }
            assert_eq!(
                (streamed.as_slice(), s.outcome()),
                (whole.as_slice(), want),
                "cut {cut}"
            );
        }
        // After discard_body nothing more is appended, but size, limit and flags go on.
        for cut in 0..=input.len() {
            let mut s = DataScanner::new(12);
            let mut out = Vec::new();
            let _ = s.feed(&input[..cut], &mut out);
            let kept = out.len();
            s.discard_body();
            let p = s.feed(&input[cut..], &mut out);
            assert_eq!(out.len(), kept, "cut {cut}");
            assert_eq!(
                p,
                Progress::Finished {
                    consumed: input.len() - cut
                }
            );
            let o = s.outcome();
            assert_eq!(
                (o.size, o.oversize, o.received),
                (want.size, true, 1),
                "cut {cut}"
            );
        }
        let mut acc = ChunkAccumulator::new(100);
        let mut out = Vec::new();
        acc.push(b"ab\r\n", &mut out);
        acc.discard_body();
        acc.push(b"c\nd", &mut out);
        let o = acc.finish(&mut out);
        assert_eq!(out, b"ab\r\n");
        assert_eq!((o.size, o.bare_lf, o.oversize), (9, true, false));
    }

    fn accumulate(chunks: &[&[u8]], limit: u64) -> (Vec<u8>, DataOutcome) {
        let mut acc = ChunkAccumulator::new(limit);
        let mut body = Vec::new();
        for c in chunks {
            acc.push(c, &mut body);
        }
        let o = acc.finish(&mut body);
        (body, o)
    }

    #[test]
    fn bdat_chunks_checked_for_canonical_crlf_at_every_split() {
        let cases: Vec<(&[u8], &[u8], bool, bool)> = vec![
            (b"a\r\nb\r\n", b"a\r\nb\r\n", false, false),
            (b"a\r\nb", b"a\r\nb\r\n", false, false),
            (b"", b"", false, false),
            (b".\r\n", b".\r\n", false, false),
            (b"a\nb\r\n", b"a\nb\r\n", true, false),
            (b"\n", b"\n\r\n", true, false),
            (b"a\rb\r\n", b"a\rb\r\n", false, true),
            (b"a\r", b"a\r\r\n", false, true),
            (b"a\r\r\n", b"a\r\r\n", false, true),
        ];
        for (input, want, lf, cr) in cases {
            let whole = accumulate(&[input], 1 << 20);
            assert_eq!(whole.0, want, "{input:?}");
            assert_eq!((whole.1.bare_lf, whole.1.bare_cr), (lf, cr), "{input:?}");
            for cut in 0..=input.len() {
                assert_eq!(
                    accumulate(&[&input[..cut], &input[cut..]], 1 << 20),
                    whole,
                    "{input:?} at {cut}"
                );
            }
            let singles: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(accumulate(&singles, 1 << 20), whole);
        }
        let (body, o) = accumulate(&[b"Received: x\r\n\r\n0123456789"], 8);
        assert_eq!(
            (body.len(), o.oversize, o.received, o.size),
            (8, true, 1, 27)
        );
    }
}
