//! Throughput of the protocol core's hot paths: command framing, command parsing, DATA
//! scanning (4 KB, 1 MB and a dot-heavy body), outbound dot-stuffing, and the inbound machine
//! taking one whole transaction (MAIL, RCPT, DATA and the body in 64 KiB reads, as the
//! provider's driver runs it: bodies stream in 256 KiB chunks). Reported in bytes so criterion
//! prints GB/s.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turnpike::proto::command::Command;
use turnpike::proto::data::{DataScanner, Progress};
use turnpike::proto::frame::{Frame, Framer};
use turnpike::proto::inbound::{Action, Directory, Inbound, InboundConfig, RcptVerdict};
use turnpike::proto::stuff;
use turnpike::types::Mailbox;

const COMMANDS: [&str; 4] = [
    "MAIL FROM:<sender@example.net> SIZE=123456 BODY=8BITMIME",
    "RCPT TO:<user@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;user@example.org",
    "RCPT TO:<another.user@example.org>",
    "DATA",
];

/// A plausible message of about `size` octets: headers, then 72-column text lines.
fn message(size: usize) -> Vec<u8> {
    let mut m = b"Received: from a.example ([192.0.2.1])\r\n\tby mx.example with ESMTP\r\n\
                  From: a@example.net\r\nTo: u@example.org\r\nSubject: benchmark\r\n\r\n"
        .to_vec();
    let line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m
}

/// Every line starts with a dot: the worst case for the scanner's line-start state.
fn dotty(size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(size);
    while m.len() < size {
        m.extend_from_slice(b".a.b.c\r\n");
    }
    m
}

fn framing(c: &mut Criterion) {
    let mut input = Vec::new();
    while input.len() < 64 * 1024 {
        for cmd in COMMANDS {
            input.extend_from_slice(cmd.as_bytes());
            input.extend_from_slice(b"\r\n");
        }
    }
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.bench_function("pipelined_64k", |b| {
        b.iter(|| {
            let mut framer = Framer::new(512);
            let mut rest = black_box(&input[..]);
            let mut lines = 0usize;
            while let Frame::Line { consumed, .. } = framer.next_line(rest) {
                rest = &rest[consumed..];
                lines += 1;
            }
            lines
        })
    });
    g.finish();
}

fn parsing(c: &mut Criterion) {
    let bytes: usize = COMMANDS.iter().map(|l| l.len()).sum();
    let mut g = c.benchmark_group("command");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("mail_rcpt_rcpt_data", |b| {
        b.iter(|| {
            for line in COMMANDS {
                black_box(Command::parse(black_box(line.as_bytes()), false).is_ok());
            }
        })
    });
    g.finish();
}

fn scanning(c: &mut Criterion) {
    let mut g = c.benchmark_group("data_scan");
    let bodies = [
        ("4k", message(4 * 1024)),
        ("1m", message(1 << 20)),
        ("dot_heavy_1m", dotty(1 << 20)),
    ];
    for (name, body) in &bodies {
        let wire = stuff::stuff(body);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        let mut out = Vec::with_capacity(wire.len());
        g.bench_function(*name, |b| {
            b.iter(|| {
                out.clear();
                let mut scanner = DataScanner::new(u64::MAX);
                let done = scanner.feed(black_box(&wire), &mut out);
                assert_eq!(
                    done,
                    Progress::Finished {
                        consumed: wire.len()
                    }
                );
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("dot_stuff");
    for (name, body) in &bodies {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(*name, |b| b.iter(|| stuff::stuff(black_box(body))));
    }
    g.finish();
}

/// Takes every recipient.
struct AnyRecipient;

impl Directory for AnyRecipient {
    fn check_rcpt(&self, _rcpt: &Mailbox, _declared_size: Option<u64>) -> RcptVerdict {
        RcptVerdict::Accept
    }
}

/// Feeds `input` to `m` as a driver would, obeying every action; returns the body bytes
/// handed over (chunks and deliveries).
fn feed(m: &mut Inbound, input: &[u8]) -> usize {
    let mut rest = input;
    let mut bytes = 0;
    loop {
        let n = m.handle_input(rest, &AnyRecipient);
        rest = &rest[n..];
        while let Some(action) = m.poll_action() {
            match action {
                Action::Deliver(incoming) => {
                    bytes += incoming.body.len();
                    m.stored(Ok("q".into()));
                }
                Action::StoreChunk(chunk) => {
                    bytes += chunk.len();
                    m.recycle(chunk);
                }
                _ => {}
            }
        }
        if rest.is_empty() {
            return bytes;
        }
    }
}

fn inbound(c: &mut Criterion) {
    let cfg = InboundConfig {
        max_message_size: 64 << 20,
        body_chunk: Some(256 * 1024),
        ..InboundConfig::new("mx.example")
    };
    let mut g = c.benchmark_group("inbound");
    for (name, body) in [("4k", message(4 * 1024)), ("1m", message(1 << 20))] {
        let wire = stuff::stuff(&body);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut m = Inbound::new(cfg.clone());
                feed(&mut m, b"EHLO client.example\r\n");
                feed(
                    &mut m,
                    b"MAIL FROM:<a@example.net>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n",
                );
                let got: usize = black_box(&wire)
                    .chunks(64 * 1024)
                    .map(|p| feed(&mut m, p))
                    .sum();
                assert_eq!(got, body.len());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, framing, parsing, scanning, inbound);
criterion_main!(benches);
