//! Command-line framing: splits a byte stream into CRLF-terminated lines (RFC 5321 §2.3.8).
//!
//! Owns the rules for where a command line ends, and nothing else:
//! - CRLF is the only terminator. A LF not preceded by CR is a *bare LF* and a CR anywhere but
//!   right before the final LF is a *bare CR*; both are reported as errors instead of being
//!   normalised, because lenient line endings are what SMTP smuggling exploits.
//! - A line (including its CRLF) longer than the limit is an error. The framer then discards
//!   input up to and including the next LF, across as many buffers as it takes, so a client
//!   cannot make us buffer an unbounded line (RFC 5321 §4.5.3.1.4 allows 512 octets).
//! - The framer never buffers: it looks at the caller's buffer and says how many bytes it
//!   consumed. [`Frame::Incomplete`] consumes nothing and is only returned while the buffer is
//!   shorter than the limit, so the caller's buffer stays bounded by the limit.

use memchr::memchr;

/// What the framer found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its CRLF; `consumed` covers the CRLF.
    Line {
        /// The line content, CRLF stripped.
        line: &'a [u8],
        /// Bytes of the buffer this line used, terminator included.
        consumed: usize,
    },
    /// No complete line yet and nothing consumed: call again with more bytes appended.
    Incomplete,
    /// Bytes dropped while discarding the tail of an over-long line; nothing to answer.
    Skipped {
        /// Bytes dropped.
        consumed: usize,
    },
    /// A malformed line; it has been consumed (or is being discarded) and must be answered.
    Invalid {
        /// Why the line was refused.
        error: FrameError,
        /// Bytes consumed, possibly only a prefix of the line (see [`Framer::is_discarding`]).
        consumed: usize,
    },
}

/// Why a line was refused by the framer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The line including its CRLF is longer than the limit.
    TooLong,
    /// A LF that is not preceded by CR.
    BareLf,
    /// A CR that is not followed by LF, inside an otherwise complete line.
    BareCr,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameError::TooLong => "line too long",
            FrameError::BareLf => "bare LF in command line",
            FrameError::BareCr => "bare CR in command line",
        })
    }
}

impl std::error::Error for FrameError {}

/// A line framer with a hard maximum line length and a discard mode for over-long lines.
#[derive(Debug, Clone)]
pub struct Framer {
    max_line: usize,
    discarding: bool,
}

impl Framer {
    /// A framer refusing lines longer than `max_line` octets, CRLF included. Values below 3 are
    /// raised to 3 so that at least an empty line fits.
    pub fn new(max_line: usize) -> Self {
        Framer {
            max_line: max_line.max(3),
            discarding: false,
        }
    }

    /// True while the tail of an over-long line is being dropped.
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Forgets a partially discarded line (used when the input stream is replaced, e.g. by TLS).
    pub fn reset(&mut self) {
        self.discarding = false;
    }

    /// Frames the next line at the start of `buf`.
    pub fn next_line<'a>(&mut self, buf: &'a [u8]) -> Frame<'a> {
        if buf.is_empty() {
            return Frame::Incomplete;
        }
        if self.discarding {
            return match memchr(b'\n', buf) {
                Some(lf) => {
                    self.discarding = false;
                    Frame::Skipped { consumed: lf + 1 }
                }
                None => Frame::Skipped {
                    consumed: buf.len(),
                },
            };
        }
        // Only the first `max_line` bytes can hold the LF of an acceptable line.
        let window = &buf[..buf.len().min(self.max_line)];
        let Some(lf) = memchr(b'\n', window) else {
            if buf.len() < self.max_line {
                return Frame::Incomplete;
            }
            // Too long: drop through the LF if it is already here, else keep dropping later.
            let consumed = match memchr(b'\n', &buf[self.max_line..]) {
                Some(rel) => self.max_line + rel + 1,
                None => {
                    self.discarding = true;
                    buf.len()
                }
            };
            return Frame::Invalid {
                error: FrameError::TooLong,
                consumed,
            };
        };
        let consumed = lf + 1;
        if lf == 0 || buf[lf - 1] != b'\r' {
            return Frame::Invalid {
                error: FrameError::BareLf,
                consumed,
            };
        }
        let line = &buf[..lf - 1];
        if memchr(b'\r', line).is_some() {
            return Frame::Invalid {
                error: FrameError::BareCr,
                consumed,
            };
        }
        Frame::Line { line, consumed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a stream of frames means, independent of how the input was split.
    #[derive(Debug, PartialEq, Eq)]
    enum Event {
        Line(Vec<u8>),
        Error(FrameError),
    }

    /// Drives a framer the way a connection driver does: a buffer that keeps unconsumed bytes
    /// and receives the input in the given pieces.
    fn drive(max: usize, pieces: &[&[u8]]) -> (Vec<Event>, usize) {
        let mut framer = Framer::new(max);
        let mut buf = Vec::new();
        let mut events = Vec::new();
        let mut high_water = 0;
        for piece in pieces {
            buf.extend_from_slice(piece);
            high_water = high_water.max(buf.len());
            loop {
                match framer.next_line(&buf) {
                    Frame::Line { line, consumed } => {
                        events.push(Event::Line(line.to_vec()));
                        buf.drain(..consumed);
                    }
                    Frame::Incomplete => break,
                    Frame::Skipped { consumed } => {
                        buf.drain(..consumed);
                    }
                    Frame::Invalid { error, consumed } => {
                        events.push(Event::Error(error));
                        buf.drain(..consumed);
                    }
                }
            }
        }
        (events, high_water)
    }

    fn line(s: &str) -> Event {
        Event::Line(s.as_bytes().to_vec())
    }

    #[test]
    fn frames_split_at_every_offset_identically() {
        let long = format!("NOOP {}\r\n", "x".repeat(40));
        let cases: Vec<(String, Vec<Event>)> = vec![
            (
                "EHLO a\r\nQUIT\r\n".into(),
                vec![line("EHLO a"), line("QUIT")],
            ),
            ("\r\n".into(), vec![line("")]),
            (
                "a\nb\r\n".into(),
                vec![Event::Error(FrameError::BareLf), line("b")],
            ),
            ("\n".into(), vec![Event::Error(FrameError::BareLf)]),
            (
                "a\rb\r\nc\r\n".into(),
                vec![Event::Error(FrameError::BareCr), line("c")],
            ),
            ("a\r\r\n".into(), vec![Event::Error(FrameError::BareCr)]),
            (
                format!("{long}NOOP\r\n"),
                vec![Event::Error(FrameError::TooLong), line("NOOP")],
            ),
            // 32 octets including CRLF is exactly the limit; 33 is one too many.
            (
                format!("{}\r\n", "y".repeat(30)),
                vec![line(&"y".repeat(30))],
            ),
            (
                format!("{}\r\nQ\r\n", "y".repeat(31)),
                vec![Event::Error(FrameError::TooLong), line("Q")],
            ),
            // A CR at the limit whose LF comes later must not be taken as a terminator.
            (
                format!("{}\r\nQ\r\n", "z".repeat(32)),
                vec![Event::Error(FrameError::TooLong), line("Q")],
            ),
            ("partial".into(), vec![]),
        ];
        for (input, want) in &cases {
            let bytes = input.as_bytes();
            assert_eq!(&drive(32, &[bytes]).0, want, "whole {input:?}");
            for cut in 0..=bytes.len() {
                let (got, _) = drive(32, &[&bytes[..cut], &bytes[cut..]]);
                assert_eq!(&got, want, "{input:?} split at {cut}");
            }
            let singles: Vec<&[u8]> = bytes.chunks(1).collect();
            let (got, high) = drive(32, &singles);
            assert_eq!(&got, want, "{input:?} byte by byte");
            assert!(high <= 32, "byte-by-byte feeding buffered {high} octets");
        }
    }

    #[test]
    fn discarding_spans_buffers_and_ends_at_lf() {
        let mut f = Framer::new(8);
        assert_eq!(
            f.next_line(b"0123456789"),
            Frame::Invalid {
                error: FrameError::TooLong,
                consumed: 10
            }
        );
        assert!(f.is_discarding());
        assert_eq!(f.next_line(b"abc"), Frame::Skipped { consumed: 3 });
        assert_eq!(f.next_line(b"d\nRSET\r\n"), Frame::Skipped { consumed: 2 });
        assert!(!f.is_discarding());
        assert_eq!(
            f.next_line(b"RSET\r\n"),
            Frame::Line {
                line: b"RSET",
                consumed: 6
            }
        );
    }

    #[test]
    fn incomplete_consumes_nothing() {
        let mut f = Framer::new(512);
        assert_eq!(f.next_line(b""), Frame::Incomplete);
        assert_eq!(f.next_line(b"MAIL FROM:<a@b>\r"), Frame::Incomplete);
    }
}
