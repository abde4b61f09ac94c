//! kill -9 crash test: a server taking a stream of messages is killed at random moments; after
//! each kill, every message that got a 250 must be held byte-identical, and nothing may be
//! half-present (every held message is exactly one that a client sent, complete).
//!
//! 50 kills by default; `TURNPIKE_CRASH_ITERATIONS=1000 cargo test --release --test crash` for
//! the long run. `TURNPIKE_CRASH_SEED=N` replays a run (the seed is printed).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestServer;
use turnpike::spool::{self, IoKind, Reader};

const CLIENTS: usize = 4;

/// xorshift64*: deterministic from the printed seed, no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The canonical body of message `n` (CRLF lines, some starting with a dot, sizes from a few
/// hundred bytes to ~200 KB so batches and segment rotation both happen).
fn body_for(n: u64) -> Vec<u8> {
    let mut rng = Rng(n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut body =
        format!("Message-Id: <{n}.crash@test>\r\nSubject: crash {n}\r\n\r\n").into_bytes();
    let target = match rng.below(20) {
        0 => 50_000 + rng.below(150_000),
        _ => 200 + rng.below(8_000),
    } as usize;
    while body.len() < target {
        let len = 1 + rng.below(120) as usize;
        if rng.below(10) == 0 {
            body.push(b'.');
        }
        body.extend((0..len).map(|i| b'a' + ((n as usize + i) % 26) as u8));
        body.extend_from_slice(b"\r\n");
    }
    body
}

fn read_reply(r: &mut BufReader<TcpStream>) -> std::io::Result<u16> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.len() < 4 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        if line.as_bytes()[3] == b' ' {
            return line[..3]
                .parse()
                .map_err(|_| std::io::ErrorKind::InvalidData.into());
        }
    }
}

struct Ledger {
    next: AtomicU64,
    stop: AtomicBool,
    /// Every message whose body we started to send.
    sent: Mutex<HashSet<u64>>,
    /// Every message that got a 250 after its data.
    acked: Mutex<HashSet<u64>>,
    /// Held messages whose body was already compared byte for byte: id -> test number. Later
    /// kills only check they are still there (bodies never change), so a long run stays
    /// linear instead of re-reading every body after every kill.
    verified: Mutex<HashMap<turnpike::types::MessageId, u64>>,
}

/// One client: sends messages until told to stop or the server dies.
fn client(addr: SocketAddr, ledger: &Ledger) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let cmd = |w: &mut TcpStream, r: &mut BufReader<TcpStream>, line: &str| {
        w.write_all(line.as_bytes())?;
        w.write_all(b"\r\n")?;
        read_reply(r)
    };
    if read_reply(&mut r)? != 220 || cmd(&mut w, &mut r, "EHLO crash.test")? != 250 {
        return Ok(());
    }
    while !ledger.stop.load(Ordering::Relaxed) {
        let n = ledger.next.fetch_add(1, Ordering::Relaxed);
        if cmd(&mut w, &mut r, "MAIL FROM:<load@crash.test>")? != 250
            || cmd(&mut w, &mut r, &format!("RCPT TO:<u{}@crash.test>", n % 7))? != 250
            || cmd(&mut w, &mut r, "DATA")? != 354
        {
            return Ok(());
        }
        ledger.sent.lock().unwrap().insert(n);
        let mut wire = Vec::new();
        for line in body_for(n).split_inclusive(|b| *b == b'\n') {
            if line.starts_with(b".") {
                wire.push(b'.');
            }
            wire.extend_from_slice(line);
        }
        wire.extend_from_slice(b".\r\n");
        w.write_all(&wire)?;
        if read_reply(&mut r)? == 250 {
            ledger.acked.lock().unwrap().insert(n);
        }
    }
    Ok(())
}

/// Reads the journal of a stopped server and checks it against the ledger. Returns the number
/// of messages held.
fn check_journal(data_dir: &Path, ledger: &Ledger, iteration: usize) -> usize {
    let recovered = spool::recover(data_dir).expect("recovery must not fail on a crashed journal");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let reader = Reader::new(data_dir, IoKind::Epoll);
    let mut held: HashMap<u64, String> = HashMap::new();
    let mut seen_ids = HashSet::new();
    for part in &recovered.parts {
        if !seen_ids.insert(part.id) {
            continue; // one message, several domain parts: read it once
        }
        if let Some(n) = ledger.verified.lock().unwrap().get(&part.id).copied() {
            if let Some(other) = held.insert(n, part.id.to_string()) {
                panic!(
                    "iteration {iteration}: message {n} held twice ({other} and {})",
                    part.id
                );
            }
            continue;
        }
        let body = rt
            .block_on(reader.read_body(&part.location))
            .unwrap_or_else(|e| panic!("iteration {iteration}: held {} unreadable: {e}", part.id));
        let text = String::from_utf8_lossy(&body);
        let n: u64 = text
            .split("Message-Id: <")
            .nth(1)
            .and_then(|rest| rest.split('.').next())
            .and_then(|num| num.parse().ok())
            .unwrap_or_else(|| panic!("iteration {iteration}: held {} has no test id", part.id));
        let expected = body_for(n);
        assert!(
            body.ends_with(&expected),
            "iteration {iteration}: message {n} ({}) is not byte-identical: {} bytes held, {} sent",
            part.id,
            body.len(),
            expected.len()
        );
        let trace = &body[..body.len() - expected.len()];
        assert!(
            trace.starts_with(b"Received: ") && !trace.windows(4).any(|w| w == b"\r\n\r\n"),
            "iteration {iteration}: message {n} has unexpected bytes before the sent body"
        );
        assert!(
            ledger.sent.lock().unwrap().contains(&n),
            "iteration {iteration}: message {n} held but never sent"
        );
        if let Some(other) = held.insert(n, part.id.to_string()) {
            panic!(
                "iteration {iteration}: message {n} held twice ({other} and {})",
                part.id
            );
        }
        ledger.verified.lock().unwrap().insert(part.id, n);
    }
    let acked = ledger.acked.lock().unwrap();
    let mut lost: Vec<_> = acked.iter().filter(|n| !held.contains_key(n)).collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "iteration {iteration}: acknowledged but lost: {lost:?}"
    );
    held.len()
}

#[test]
fn kill9_never_loses_an_acknowledged_message() {
    let iterations: usize = std::env::var("TURNPIKE_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("TURNPIKE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test: {iterations} kills, TURNPIKE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut server = TestServer::start(
        "[spool]\nsegment_size = \"1MiB\"\n",
        &[("crash", &["crash.test"])],
    );
    let ledger = Arc::new(Ledger {
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        sent: Mutex::new(HashSet::new()),
        acked: Mutex::new(HashSet::new()),
        verified: Mutex::new(HashMap::new()),
    });
    let mut held = 0;
    for iteration in 0..iterations {
        let addr = server.addr("mx");
        ledger.stop.store(false, Ordering::Relaxed);
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let ledger = ledger.clone();
                std::thread::spawn(move || {
                    let _ = client(addr, &ledger);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20 + rng.below(300)));
        server.kill9();
        ledger.stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().unwrap();
        }
        held = check_journal(server.data_dir(), &ledger, iteration);
        server.restart();
    }
    let acked = ledger.acked.lock().unwrap().len();
    eprintln!(
        "crash test: {iterations} kills, {acked} messages acknowledged, {held} held, none lost"
    );
    assert!(
        acked > iterations,
        "too few messages got through ({acked}) to mean anything"
    );
    // The restarted server must serve what survived.
    let queue = server.queue_json();
    let messages = common::queue_entry(&queue, "crash.test")
        .map(|(m, _)| m)
        .unwrap_or(0);
    assert_eq!(
        messages as usize, held,
        "queue after restart disagrees with the journal"
    );
}
