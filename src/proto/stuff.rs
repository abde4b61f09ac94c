//! The outbound dot-stuffer (RFC 5321 §4.5.2): body chunks in, DATA wire bytes out.
//!
//! The inverse of [`crate::proto::data::DataScanner`]. Invariant: whatever bytes it is given,
//! its output is canonical (PROTOCOL.md §3, design rule 2: re-serialise every message, pass no
//! bare CR or LF through). A bare LF becomes CRLF, and so does a bare CR, so the peer can never
//! see an end-of-data look-alike from us. For a canonical body (the only kind the spool holds)
//! this normalisation never triggers and `scan(stuff(body)) == body` whenever the body is empty
//! or ends in CRLF; otherwise the scan yields the body plus the CRLF that [`DotStuffer::finish`]
//! had to add.
//!
//! Chunks may be split anywhere: the only state carried over is "at line start" and "a CR is
//! pending" (a CR at the end of a chunk whose LF may start the next one).

use memchr::memchr2;

/// A streaming dot-stuffer.
#[derive(Clone, Debug)]
pub struct DotStuffer {
    /// The next byte starts a line (true at the body start).
    line_start: bool,
    /// A CR ended the previous chunk and has not been written yet.
    pending_cr: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl DotStuffer {
    /// A stuffer at the start of a body.
    pub fn new() -> Self {
        DotStuffer {
            line_start: true,
            pending_cr: false,
        }
    }

    /// Stuffs one chunk of body, appending the wire form to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 64);
        while let Some((&b, rest)) = chunk.split_first() {
            if self.pending_cr {
                // Whether or not an LF follows, the line ends here with one CRLF.
                self.pending_cr = false;
                self.end_line(out);
                if b == b'\n' {
                    chunk = rest;
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.pending_cr = true;
                    chunk = rest;
                }
                b'\n' => {
                    self.end_line(out);
                    chunk = rest;
                }
                _ => {
                    if self.line_start && b == b'.' {
                        out.push(b'.');
                    }
                    // Copy the rest of the line in one go.
                    let n = memchr2(b'\r', b'\n', chunk).unwrap_or(chunk.len());
                    out.extend_from_slice(&chunk[..n]);
                    self.line_start = false;
                    chunk = &chunk[n..];
                }
            }
        }
    }

    /// Ends the body: completes an unfinished last line with CRLF and writes ".\r\n".
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.line_start {
            self.pending_cr = false;
            self.end_line(out);
        }
        out.extend_from_slice(b".\r\n");
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.line_start = true;
    }
}

/// Stuffs a whole body in one call, terminator included.
pub fn stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    let mut s = DotStuffer::new();
    s.push(body, &mut out);
    s.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::data::{DataScanner, Progress};

    fn stuff_pieces(pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = DotStuffer::new();
        for p in pieces {
            s.push(p, &mut out);
        }
        s.finish(&mut out);
        out
    }

    fn unstuff(wire: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        let mut scanner = DataScanner::new(u64::MAX);
        assert_eq!(
            scanner.feed(wire, &mut body),
            Progress::Finished {
                consumed: wire.len()
            }
        );
        assert!(
            scanner.outcome().is_canonical(),
            "stuffer produced non-canonical {wire:?}"
        );
        body
    }

    #[test]
    fn stuffing_table() {
        let cases: Vec<(&[u8], &[u8])> = vec![
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"..x\r\n.\r\n", b"...x\r\n..\r\n.\r\n"),
            (b"a.b\r\n.", b"a.b\r\n..\r\n.\r\n"),
            (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
            // Non-canonical input is normalised, never passed through.
            (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\rb\r", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r\r\n", b"a\r\n\r\n.\r\n"),
        ];
        for (body, wire) in cases {
            assert_eq!(stuff(body), wire, "{:?}", String::from_utf8_lossy(body));
            for cut in 0..=body.len() {
                assert_eq!(
                    stuff_pieces(&[&body[..cut], &body[cut..]]),
                    wire,
                    "cut {cut}"
                );
            }
            let singles: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(stuff_pieces(&singles), wire);
        }
    }

    #[test]
    fn round_trip_through_the_scanner_at_every_split() {
        let bodies: Vec<&[u8]> = vec![
            b"",
            b"Subject: x\r\n\r\nhello\r\n",
            b".\r\n",
            b"..\r\n.\r\n...\r\n",
            b"\r\n.\r\n\r\n",
            b".leading dot\r\ntrailing dot.\r\n. \r\n",
            b"8bit \xff\xfe\0\r\n",
            b"no final newline",
            b"ends with dot\r\n.",
        ];
        for body in bodies {
            let mut want = body.to_vec();
            if !want.is_empty() && !want.ends_with(b"\r\n") {
                want.extend_from_slice(b"\r\n");
            }
            for cut in 0..=body.len() {
                let wire = stuff_pieces(&[&body[..cut], &body[cut..]]);
                assert_eq!(
                    unstuff(&wire),
                    want,
                    "{:?} cut {cut}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn arbitrary_bytes_always_stuff_to_canonical_wire() {
        // Every 3-byte string over the interesting alphabet, split at every offset.
        let alphabet = [b'\r', b'\n', b'.', b'x'];
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    let body = [a, b, c];
                    let whole = stuff(&body);
                    unstuff(&whole);
                    for cut in 0..=3 {
                        assert_eq!(stuff_pieces(&[&body[..cut], &body[cut..]]), whole);
                    }
                }
            }
        }
    }
}
