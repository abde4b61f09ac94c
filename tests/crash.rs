//! kill -9 crash run: a server is killed at random moments while it takes mail (inbound), while
//! a customer drains it (drain), and while it drains and compacts at once (compaction). After
//! each kill the journal is checked (every held message is exactly one a client sent, complete;
//! none held twice), the server is restarted on it, and the run goes on. At the end everything
//! is drained. It reports:
//!
//! - lost: messages that got a 250 from the MX and were neither delivered nor held: must be 0;
//! - corrupt: delivered or held bodies that differ from what was sent: must be 0;
//! - duplicates: messages the customer accepted twice. Each is the at-least-once window of a
//!   kill: accepted (the customer's 250 sent) within the last moments before the kill, before
//!   the provider read that reply or made its DONE durable. A duplicate from a session that
//!   was not killed is a bug: must be 0. The report shows how long before its kill each
//!   duplicate was accepted.
//!
//! 40 kills by default; `TURNPIKE_CRASH_ITERATIONS=1000 cargo test --release --test crash --
//! --nocapture` for the long run (its report is the last line; `TURNPIKE_CRASH_REPORT=FILE`
//! also writes it there). `TURNPIKE_CRASH_SEED=N` replays a run (the seed is printed).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::customer::{atrn_drain_at, Answer, PLAINTEXT_AUTH};
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

/// Message `n` goes to `crash.test`, every third one to `other.test`: draining only
/// `crash.test` leaves segments half live, which is what compaction works on.
fn recipient_of(n: u64) -> String {
    if n % 3 == 0 {
        format!("u{}@other.test", n % 7)
    } else {
        format!("u{}@crash.test", n % 7)
    }
}

/// The test number in a stored or delivered body, and whether the body is exactly ours
/// behind the provider's Received: field.
fn identify(body: &[u8]) -> Option<(u64, bool)> {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let n: u64 = text
        .split("Message-Id: <")
        .nth(1)?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    let expected = body_for(n);
    let intact = body.ends_with(&expected) && {
        let trace = &body[..body.len() - expected.len()];
        trace.starts_with(b"Received: ") && !trace.windows(4).any(|w| w == b"\r\n\r\n")
    };
    Some((n, intact))
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

/// Where a round's kill fell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Inbound,
    Drain,
    Compaction,
}

#[derive(Default)]
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
    /// Each acceptance by the customer: test number -> (round, when).
    delivered: Mutex<BTreeMap<u64, Vec<(usize, Instant)>>>,
    corrupt: AtomicU64,
}

/// One MX client: sends messages until told to stop or the server dies.
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
            || cmd(&mut w, &mut r, &format!("RCPT TO:<{}>", recipient_of(n)))? != 250
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

/// A customer draining `domains` of `account`, recording every acceptance in round `round`.
fn customer(odmr: SocketAddr, account: &str, domains: &str, round: usize, ledger: &Ledger) {
    atrn_drain_at(odmr, account, domains, |_, m| {
        match identify(&m.body) {
            Some((n, intact)) => {
                if !intact {
                    ledger.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                let mut d = ledger.delivered.lock().unwrap();
                d.entry(n).or_default().push((round, Instant::now()));
            }
            None => {
                ledger.corrupt.fetch_add(1, Ordering::Relaxed);
            }
        }
        Answer::Accept
    });
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
        let (n, intact) = identify(&body)
            .unwrap_or_else(|| panic!("iteration {iteration}: held {} has no test id", part.id));
        assert!(
            intact,
            "iteration {iteration}: message {n} ({}) is not byte-identical",
            part.id
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
    assert!(
        recovered.damaged.is_empty() && recovered.missing.is_empty(),
        "iteration {iteration}: a crash damaged held mail: {:?} {:?}",
        recovered.damaged,
        recovered.missing
    );
    let acked = ledger.acked.lock().unwrap();
    let delivered = ledger.delivered.lock().unwrap();
    let mut lost: Vec<_> = acked
        .iter()
        .filter(|n| !held.contains_key(n) && !delivered.contains_key(n))
        .collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "iteration {iteration}: acknowledged but neither held nor delivered: {lost:?}"
    );
    held.len()
}

/// Runs `turnpike queue reclaim` against the server until `stop`: compaction while it drains.
fn compactor(server_dir: &Path, config: &Path, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let _ = std::process::Command::new(common::turnpike_bin())
            .arg("--data-dir")
            .arg(server_dir)
            .arg("--config")
            .arg(config)
            .args(["queue", "reclaim"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn kill9_during_inbound_drains_and_compaction_loses_nothing() {
    let iterations: usize = std::env::var("TURNPIKE_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
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
        &format!("{PLAINTEXT_AUTH}[spool]\nsegment_size = \"1MiB\"\ncompact_live_ratio = 0.9\n"),
        &[("crash", &["crash.test"]), ("other", &["other.test"])],
    );
    let ledger = Arc::new(Ledger::default());
    let mut kills: BTreeMap<usize, (Phase, Instant)> = BTreeMap::new();
    let mut phases = [0usize; 3];
    let mut held = 0;
    for iteration in 0..iterations {
        let phase = match rng.below(3) {
            0 => Phase::Inbound,
            1 => Phase::Drain,
            _ => Phase::Compaction,
        };
        phases[phase as usize] += 1;
        let (mx, odmr) = (server.addr("mx"), server.addr("odmr"));
        ledger.stop.store(false, Ordering::Relaxed);
        let mut threads = Vec::new();
        let clients = if phase == Phase::Inbound { CLIENTS } else { 1 };
        for _ in 0..clients {
            let ledger = ledger.clone();
            threads.push(std::thread::spawn(move || {
                let _ = client(mx, &ledger);
            }));
        }
        let stop_compactor = Arc::new(AtomicBool::new(false));
        if phase != Phase::Inbound {
            let ledger2 = ledger.clone();
            // Mostly crash.test (other.test piles up, so segments stay half live), now and
            // then other.test, so the journal stays bounded.
            let (account, domain) = if iteration % 8 == 7 {
                ("other", "other.test")
            } else {
                ("crash", "crash.test")
            };
            threads.push(std::thread::spawn(move || {
                customer(odmr, account, domain, iteration, &ledger2);
            }));
        }
        if phase == Phase::Compaction {
            let (dir, cfg) = (
                server.data_dir().to_path_buf(),
                server.config_path().to_path_buf(),
            );
            let stop = stop_compactor.clone();
            threads.push(std::thread::spawn(move || compactor(&dir, &cfg, &stop)));
        }
        std::thread::sleep(Duration::from_millis(20 + rng.below(300)));
        let at = Instant::now();
        server.kill9();
        kills.insert(iteration, (phase, at));
        ledger.stop.store(true, Ordering::Relaxed);
        stop_compactor.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        held = check_journal(server.data_dir(), &ledger, iteration);
        server.restart();
    }
    // Deliver everything that is left, with no kill.
    let final_round = iterations;
    for (account, domain) in [("crash", "crash.test"), ("other", "other.test")] {
        customer(server.addr("odmr"), account, domain, final_round, &ledger);
    }
    let queue = server.queue_json();
    let left: u64 = common::json_sum(&queue["domains"], |d| d["messages"].as_u64().unwrap());
    assert_eq!(left, 0, "held after the final drain: {queue}");

    let acked = ledger.acked.lock().unwrap().clone();
    let delivered = ledger.delivered.lock().unwrap().clone();
    let lost: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|n| !delivered.contains_key(n))
        .collect();
    let corrupt = ledger.corrupt.load(Ordering::Relaxed);
    // Duplicates: every acceptance after the first. Its earlier acceptance was in a session
    // that a kill cut short; how long before that kill it came is the window.
    let mut dups = 0u64;
    let mut unexplained = Vec::new();
    let mut ages: Vec<Duration> = Vec::new();
    // Bodies still in flight when the provider died reach the customer just after the kill;
    // its 250 then goes to a dead connection (SMTP's own window).
    let mut after_kill = 0;
    // Per phase of the kill: duplicates accepted more than 20 ms before it.
    let mut late = [0usize; 3];
    for (n, acceptances) in &delivered {
        for pair in acceptances.windows(2) {
            dups += 1;
            let (round, when) = pair[0];
            match kills.get(&round) {
                Some((phase, kill)) if *kill >= when => {
                    if *kill - when > Duration::from_millis(20) {
                        late[*phase as usize] += 1;
                    }
                    ages.push(*kill - when)
                }
                Some(_) => after_kill += 1,
                None => unexplained.push(*n),
            }
        }
    }
    ages.sort();
    let within = |ms: u64| {
        ages.iter()
            .filter(|a| **a <= Duration::from_millis(ms))
            .count()
    };
    let report = format!(
        "crash run: {iterations} kills ({} inbound, {} drain, {} drain+compaction), seed {seed}; \
         {} acknowledged, {} delivered, {held} held at the last kill; lost {}, corrupt {corrupt}; \
         duplicates {dups} ({after_kill} accepted after their kill, {} <= 1 ms before it, {} <= 5 ms, \
         {} <= 20 ms, longest {:?}; over 20 ms: {} drain, {} drain+compaction), without a kill {}",
        phases[0],
        phases[1],
        phases[2],
        acked.len(),
        delivered.len(),
        lost.len(),
        within(1),
        within(5),
        within(20),
        ages.last().copied().unwrap_or_default(),
        late[Phase::Drain as usize],
        late[Phase::Compaction as usize],
        unexplained.len(),
    );
    eprintln!("{report}");
    if let Ok(path) = std::env::var("TURNPIKE_CRASH_REPORT") {
        std::fs::write(path, format!("{report}\n")).unwrap();
    }
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert_eq!(corrupt, 0, "corrupt bodies delivered");
    assert!(
        unexplained.is_empty(),
        "delivered twice without a kill in between: {unexplained:?}"
    );
    assert!(
        acked.len() > iterations,
        "too few messages got through ({}) to mean anything",
        acked.len()
    );
    assert!(
        delivered.len() * 2 > acked.len(),
        "the drains delivered too little to mean anything"
    );
}
