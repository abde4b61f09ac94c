//! The bodies of the fuzz targets, shared by the cargo-fuzz crate in `tests/fuzz` and by the
//! stable `tests/fuzz_corpus.rs`, which replays the checked-in corpus on every `cargo test`.
//!
//! Each function takes arbitrary bytes, must never panic on them, and asserts the invariants
//! the module docs promise. A failed assertion here is a bug in `proto`, not in the input.

use crate::proto::command::Command;
use crate::proto::data::{DataScanner, Progress};
use crate::proto::frame::{Frame, Framer};
use crate::proto::inbound::{Action, Directory, Inbound, InboundConfig, RcptVerdict};
use crate::proto::stuff;
use crate::types::{Mailbox, MessageId};

/// Frames `data` into lines and parses each one as a command, with and without UTF-8.
pub fn command(data: &[u8]) {
    let mut framer = Framer::new(512);
    let mut rest = data;
    while !rest.is_empty() {
        let consumed = match framer.next_line(rest) {
            Frame::Incomplete => {
                check_command(rest);
                break;
            }
            Frame::Line { line, consumed } => {
                assert!(!line.contains(&b'\r') && !line.contains(&b'\n'));
                assert_eq!(&rest[line.len()..consumed], b"\r\n");
                check_command(line);
                consumed
            }
            Frame::Skipped { consumed } | Frame::Invalid { consumed, .. } => consumed,
        };
        assert!(
            consumed > 0 && consumed <= rest.len(),
            "framer must make progress"
        );
        rest = &rest[consumed..];
    }
}

fn check_command(line: &[u8]) {
    for utf8 in [false, true] {
        match Command::parse(line, utf8) {
            Ok(Command::Mail { sender, params }) => {
                if let Some(m) = sender {
                    check_mailbox(&m);
                    assert!(!m.domain.is_empty());
                    assert!(params.smtputf8 || !m.is_utf8());
                }
            }
            Ok(Command::Rcpt { mailbox, .. }) => {
                check_mailbox(&mailbox);
                assert!(utf8 || !mailbox.is_utf8());
            }
            Ok(Command::Atrn(domains)) => assert!(domains.iter().all(|d| d.label_count() >= 2)),
            Ok(_) => {}
            Err(e) => {
                let wire = e.reply().to_bytes();
                assert!(e.reply().is_permanent());
                assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1);
            }
        }
    }
}

fn check_mailbox(m: &Mailbox) {
    assert_eq!(m.domain, m.domain.to_lowercase());
    assert!(!m.local.is_empty());
}

/// Scans `data` as DATA content whole and split at a data-derived offset (the results must be
/// identical), and round-trips it through the dot-stuffer.
pub fn data(data: &[u8]) {
    let limit = 4096;
    let whole = scan(&[data], limit);
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    assert_eq!(
        scan(&[&data[..cut], &data[cut..]], limit),
        whole,
        "split at {cut}"
    );
    let (body, consumed, outcome) = &whole;
    if let Some(n) = *consumed {
        assert!(data[..n] == *b".\r\n" || data[..n].ends_with(b"\r\n.\r\n"));
    }
    assert!(body.len() as u64 <= limit);
    assert_eq!(outcome.oversize, outcome.size > limit);
    // Unfinished content may end mid-CRLF, so the body is only judged once the end was seen.
    if consumed.is_some() && outcome.is_canonical() {
        assert!(!outcome.smuggling);
        assert_canonical(body);
    }

    // Stuffing any bytes gives canonical wire that scans back to the (normalised) body.
    let wire = stuff::stuff(data);
    let (round, consumed, outcome) = scan(&[&wire], u64::MAX);
    assert_eq!(consumed, Some(wire.len()));
    assert!(outcome.is_canonical() && !outcome.smuggling);
    if is_canonical(data) && (data.is_empty() || data.ends_with(b"\r\n")) {
        assert_eq!(round, data);
    }
}

type Scan = (Vec<u8>, Option<usize>, crate::proto::data::DataOutcome);

fn scan(pieces: &[&[u8]], limit: u64) -> Scan {
    let mut scanner = DataScanner::new(limit);
    let mut body = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        match scanner.feed(piece, &mut body) {
            Progress::NeedMore => offset += piece.len(),
            Progress::Finished { consumed } => {
                assert!(consumed <= piece.len());
                return (body, Some(offset + consumed), scanner.outcome());
            }
        }
    }
    (body, None, scanner.outcome())
}

fn is_canonical(b: &[u8]) -> bool {
    b.iter().enumerate().all(|(i, &c)| match c {
        b'\r' => b.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && b[i - 1] == b'\r',
        _ => true,
    })
}

fn assert_canonical(b: &[u8]) {
    assert!(
        is_canonical(b),
        "non-canonical body {:?}",
        String::from_utf8_lossy(b)
    );
}

/// Accepts every recipient.
struct AcceptAll;

impl Directory for AcceptAll {
    fn check_rcpt(&self, _rcpt: &Mailbox, _declared_size: Option<u64>) -> RcptVerdict {
        RcptVerdict::Accept
    }
}

/// Drives an [`Inbound`] machine with `data` as the client's input, in pieces whose size is
/// taken from the first byte, obeying every action like a real driver.
pub fn inbound(data: &[u8]) {
    let cfg = InboundConfig {
        max_message_size: 2048,
        max_recipients: 5,
        max_line_length: 128,
        tls_available: true,
        ..InboundConfig::new("mx.example")
    };
    let piece = data.first().map_or(1, |&b| usize::from(b % 32) + 1);
    let mut m = Inbound::new(cfg);
    let mut buf = Vec::new();
    let mut output = Vec::new();
    let mut deliveries = 0u64;
    for chunk in data.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let n = m.handle_input(&buf, &AcceptAll);
            assert!(n <= buf.len());
            buf.drain(..n);
            output.append(m.output());
            let mut acted = false;
            while let Some(action) = m.poll_action() {
                acted = true;
                match action {
                    Action::Deliver(incoming) => {
                        assert_canonical(&incoming.body);
                        assert!(incoming.body.len() <= 2048);
                        assert!(!incoming.envelope.recipients.is_empty());
                        deliveries += 1;
                        m.stored(Ok(MessageId::new(0, 0, deliveries).to_string()));
                    }
                    Action::StartTls => {
                        buf.clear();
                        m.tls_started();
                    }
                    Action::Close => assert!(m.is_closed()),
                }
                output.append(m.output());
            }
            if !acted || buf.is_empty() || m.is_closed() {
                break;
            }
        }
        // The driver never has to hold more than one line, or one line plus one read.
        assert!(
            buf.len() <= 128 + piece,
            "driver buffer grew to {}",
            buf.len()
        );
        if m.is_closed() {
            assert_eq!(m.handle_input(b"NOOP\r\n", &AcceptAll), 0);
            break;
        }
    }
    m.timed_out();
    output.append(m.output());
    assert!(m.is_closed());
    check_replies(&output);
}

/// Every output line is `ddd` then `-` or ` `, and every reply ends with a final line.
fn check_replies(out: &[u8]) {
    assert!(out.ends_with(b"\r\n"));
    for line in out[..out.len() - 1].split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").expect("every line ends in CRLF");
        assert!(line.len() >= 4, "short reply line {line:?}");
        assert!(line[..3].iter().all(u8::is_ascii_digit));
        assert!(line[3] == b' ' || line[3] == b'-');
        assert!(!line.contains(&b'\r'));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_accept_edge_inputs() {
        for input in [
            &b""[..],
            b"\r\n",
            b"\n",
            b"\r",
            b".\r\n",
            b"\xff\xfe",
            b"EHLO x\r\nDATA\r\n",
        ] {
            command(input);
            data(input);
            inbound(input);
        }
    }
}
