//! `turnpike bench sink`: an SMTP server that answers 250 to every message and stores
//! nothing, as a ceiling for load generators (like Postfix's smtp-sink).
//!
//! It is the project's inbound machine ([`Inbound`], MX mode, every extension offered, every
//! recipient accepted) driven over [`Conn`] by the same per-core runtime as the server: one
//! pinned thread per core (`--cores`), each with its own `SO_REUSEPORT` listener. An accepted
//! message is counted and dropped; its 250 goes out at once. Replies of class 4 and 5 the
//! machine sends (bad commands, limits) are counted by code.
//!
//! It runs until `--messages` were accepted, `--duration` passed, or SIGINT/SIGTERM, then
//! prints the report. The phase's rate is measured over the active period: from the first
//! connection to the last accepted message.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::inbound::{Action, Directory, Inbound, InboundConfig, RcptVerdict};
use crate::runtime::conn::Conn;
use crate::runtime::io::{bind_reuseport, IoKind, Listener};
use crate::types::Mailbox;

use super::report::{self, Cpu, Phase, Point, Report, Timeline};

/// Idle time after which a sink session is closed (421).
const IDLE: Duration = Duration::from_secs(60);

/// Options of `bench sink`.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Where to listen (port 0: any free port; the address is printed).
    pub listen: SocketAddr,
    /// Core threads.
    pub cores: usize,
    /// I/O driver.
    pub io: IoKind,
    /// Stop after this many accepted messages.
    pub messages: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Timeline interval.
    pub interval: Duration,
}

/// Counters shared by the cores (relaxed atomics: each is touched once per message).
struct Counters {
    start: Instant,
    connections: AtomicU64,
    /// Sessions open now.
    active: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Nanoseconds after `start` (+1, 0 = none yet).
    first_connection_ns: AtomicU64,
    last_message_ns: AtomicU64,
    /// Replies sent by code, 400..=599.
    codes: Vec<AtomicU64>,
}

impl Counters {
    fn since_start(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64 + 1
    }
}

struct AcceptAll;

impl Directory for AcceptAll {
    fn check_rcpt(&self, _rcpt: &Mailbox, _size: Option<u64>) -> RcptVerdict {
        RcptVerdict::Accept
    }
}

fn machine_config() -> InboundConfig {
    let mut cfg = InboundConfig::new("sink.bench.turnpike");
    cfg.max_message_size = 64 << 20;
    cfg.max_recipients = 1000;
    cfg.max_line_length = 4096;
    cfg.max_errors = 100;
    cfg
}

/// Binds the listeners (one per core) and returns the address bound, before any thread runs.
pub fn bind(opts: &SinkOptions) -> std::io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let first = bind_reuseport(opts.listen)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..opts.cores.max(1) {
        listeners.push(bind_reuseport(addr)?);
    }
    Ok((addr, listeners))
}

/// Runs the sink on `listeners` until a stop condition; returns the report.
pub fn run(opts: &SinkOptions, listeners: Vec<std::net::TcpListener>) -> std::io::Result<Report> {
    let signals = block_stop_signals();
    let counters = Arc::new(Counters {
        start: Instant::now(),
        connections: AtomicU64::new(0),
        active: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        first_connection_ns: AtomicU64::new(0),
        last_message_ns: AtomicU64::new(0),
        codes: (400..600).map(|_| AtomicU64::new(0)).collect(),
    });
    let started_ms = report::unix_ms();
    let cpu0 = report::process_cpu_s();
    for (i, l) in listeners.into_iter().enumerate() {
        let c = counters.clone();
        let io = opts.io;
        crate::runtime::spawn_core(i, io, opts.cores > 1, move || async move {
            match Listener::from_std(io, l) {
                Ok(l) => accept_loop(l, c).await,
                Err(e) => tracing::error!(error = %e, "sink listener"),
            }
        })?;
    }
    let start = counters.start;
    let mut points = Vec::new();
    let mut last = (0, 0);
    let mut next_point = start + opts.interval;
    loop {
        let now = Instant::now();
        if now >= next_point {
            let (m, b) = (
                counters.messages.load(Ordering::Relaxed),
                counters.bytes.load(Ordering::Relaxed),
            );
            points.push(Point {
                t_s: next_point.duration_since(start).as_secs_f64(),
                phase: "sink".into(),
                messages: m - last.0,
                bytes: b - last.1,
                delivered: 0,
            });
            last = (m, b);
            next_point += opts.interval;
        }
        let done = opts
            .messages
            .is_some_and(|m| counters.messages.load(Ordering::Relaxed) >= m)
            || opts
                .duration
                .is_some_and(|d| now.duration_since(start) >= d);
        if done || wait_signal(&signals, Duration::from_millis(10)) {
            break;
        }
    }
    // Let the sessions in progress say QUIT (bounded): a sink that vanishes under its
    // clients would show up as their errors.
    let grace = Instant::now() + Duration::from_secs(2);
    while counters.active.load(Ordering::Relaxed) > 0 && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(5));
    }
    let end = Instant::now();
    let elapsed = end.duration_since(start).as_secs_f64();
    // The last, partial interval.
    let (m, b) = (
        counters.messages.load(Ordering::Relaxed),
        counters.bytes.load(Ordering::Relaxed),
    );
    if m > last.0 || points.is_empty() {
        points.push(Point {
            t_s: elapsed,
            phase: "sink".into(),
            messages: m - last.0,
            bytes: b - last.1,
            delivered: 0,
        });
    }
    let ns = |a: &AtomicU64| match a.load(Ordering::Relaxed) {
        0 => None,
        n => Some((n - 1) as f64 / 1e9),
    };
    let first = ns(&counters.first_connection_ns).unwrap_or(0.0);
    let last_msg = ns(&counters.last_message_ns).unwrap_or(elapsed);
    let mut phase = Phase {
        name: "sink".into(),
        start_s: first,
        elapsed_s: (last_msg - first).max(0.0),
        connections: counters.connections.load(Ordering::Relaxed),
        messages: counters.messages.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        ..Phase::default()
    };
    phase.attempted = phase.messages;
    for (i, c) in counters.codes.iter().enumerate() {
        let n = c.load(Ordering::Relaxed);
        if n > 0 {
            phase.errors.insert((400 + i).to_string(), n);
        }
    }
    phase.finish_rates();
    let mut r = Report::new("sink", started_ms);
    r.elapsed_s = elapsed;
    r.phases.push(phase);
    r.timeline = Timeline {
        interval_s: opts.interval.as_secs_f64(),
        points,
    };
    let cpu = report::process_cpu_s() - cpu0;
    r.client = Cpu {
        cpu_s: cpu,
        cpu_cores: cpu / elapsed.max(1e-9),
    };
    Ok(r)
}

async fn accept_loop(listener: Listener, c: Arc<Counters>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                c.connections.fetch_add(1, Ordering::Relaxed);
                let _ = c.first_connection_ns.compare_exchange(
                    0,
                    c.since_start(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                tokio::task::spawn_local(serve(Conn::plain(stream), c.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "sink accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// One session, counted in `active` while it runs.
async fn serve(conn: Conn, c: Arc<Counters>) {
    c.active.fetch_add(1, Ordering::Relaxed);
    session(conn, &c).await;
    c.active.fetch_sub(1, Ordering::Relaxed);
}

/// Drives one inbound machine: every message is answered 250 and dropped.
async fn session(mut conn: Conn, c: &Counters) {
    let mut m = Inbound::new(machine_config());
    let mut input: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut pos = 0;
    let mut n = 0u64;
    let mut chunked = 0u64;
    loop {
        pos += m.handle_input(&input[pos..], &AcceptAll);
        let mut acted = false;
        let mut close = false;
        while let Some(action) = m.poll_action() {
            acted = true;
            match action {
                // Only with a chunk size configured (not here); counted all the same.
                Action::StoreChunk(chunk) => chunked += chunk.len() as u64,
                Action::DiscardChunks => chunked = 0,
                Action::Deliver(msg) => {
                    n += 1;
                    let bytes = std::mem::take(&mut chunked) + msg.body.len() as u64;
                    c.messages.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(bytes, Ordering::Relaxed);
                    c.last_message_ns
                        .fetch_max(c.since_start(), Ordering::Relaxed);
                    m.stored(Ok(format!("sink.{n}")));
                }
                // STARTTLS is not offered; a client that sends it anyway got a 454 already.
                Action::StartTls | Action::Close => close = true,
            }
        }
        if close || m.is_closed() {
            count_codes(m.output(), c);
            let _ = conn.flush_buffer(m.output()).await;
            conn.close().await;
            return;
        }
        if acted && pos < input.len() {
            continue;
        }
        if pos > 0 && pos == input.len() {
            input.clear();
            pos = 0;
        } else if pos >= 64 * 1024 {
            input.drain(..pos);
            pos = 0;
        }
        // Counted once, as the replies leave.
        count_codes(m.output(), c);
        if conn.flush_buffer(m.output()).await.is_err() {
            return;
        }
        match tokio::time::timeout(IDLE, conn.read_append(&mut input, 64 * 1024)).await {
            Ok(Ok(1..)) => {}
            Ok(_) => return,
            Err(_) => m.timed_out(),
        }
    }
}

/// Counts the 4xx and 5xx reply lines (last line of each reply) in `out`.
fn count_codes(out: &[u8], c: &Counters) {
    for line in out.split(|b| *b == b'\n') {
        if let [d @ (b'4' | b'5'), x, y, b' ', ..] = line {
            if x.is_ascii_digit() && y.is_ascii_digit() {
                let code = usize::from(d - b'0') * 100
                    + usize::from(x - b'0') * 10
                    + usize::from(y - b'0');
                c.codes[code - 400].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts) so that
/// [`wait_signal`] receives them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask calls on a zeroed sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `timeout` for one of `set`; true if one came.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: sigtimedwait with a valid set and timespec; no siginfo wanted.
    unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) > 0 }
}
