//! `turnpike bench mx`: inbound SMTP load against any server, and the sending side of
//! `bench day`.
//!
//! Each of `sessions` tasks on one thread (so the generator never uses more than one core)
//! opens connections and drives the project's one SMTP client machine,
//! [`crate::proto::reversed::Reversed`], over [`Conn`]: greeting, EHLO, optional STARTTLS,
//! then up to `per_connection` messages, pipelined when asked (`--pipelining` pipelines
//! MAIL and RCPT; with `--chunking` as well, the machine's window sends MAIL, RCPT and
//! `BDAT n LAST` with the body in one write and keeps many messages in flight), then QUIT.
//!
//! What a session sends comes from a [`Workload`]: `bench mx` numbers messages and stops after
//! `--messages` or `--duration`, closed loop (each session sends as fast as replies come) or
//! open loop (`--rate`: message k is due at `k / rate` seconds, whether or not the server
//! kept up; the lag is reported as `arrival_lag`). `bench day` supplies its own workload.
//!
//! Measured: connect -> greeting; end of data (the last body byte written) -> the reply
//! that settles the message; errors by reply code. The driver uses the epoll runtime, whose
//! reads can be cancelled without losing bytes: an open-loop session waits for its next
//! arrival and for replies at the same time.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::reversed::{
    Action, BodyFraming, CloseReason, MessageOutcome, Outgoing, RcptOutcome, Reversed,
    ReversedConfig,
};
use crate::proto::stuff::DotStuffer;
use crate::relay::reply::{self, Parsed};
use crate::runtime::conn::Conn;
use crate::runtime::io::{IoKind, Stream};
use crate::types::{Envelope, Mailbox, Recipient};

use super::message::{MessageBody, SizeDist};
use super::report::latency;
use super::rng::Rng;
use super::stats::Recorder;

/// Bodies larger than this are written in chunks of this size instead of whole.
const CHUNK: usize = 256 * 1024;
/// Consecutive failed connections after which a session gives up.
const MAX_CONNECT_FAILURES: u32 = 20;
/// Pause after a failed connection.
const CONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// TLS toward the target.
#[derive(Clone)]
pub enum Tls {
    /// Plain text.
    None,
    /// STARTTLS after EHLO (the session fails if it is not offered).
    StartTls(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
    /// TLS from the first byte (port 465 style).
    Implicit(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    ),
}

/// How the sessions talk to the target.
#[derive(Clone)]
pub struct ClientConfig {
    /// The server.
    pub target: SocketAddr,
    /// Parallel sessions.
    pub sessions: usize,
    /// Messages per connection; 0 = unlimited.
    pub per_connection: u64,
    /// Pipeline MAIL and RCPT (RFC 2920) when offered.
    pub pipelining: bool,
    /// Use BDAT (RFC 3030) when offered.
    pub chunking: bool,
    /// TLS.
    pub tls: Tls,
    /// Our EHLO name.
    pub helo: String,
    /// Connect timeout, and the bound on every reply.
    pub timeout: Duration,
}

/// One message a workload hands to a session.
#[derive(Clone, Debug)]
pub struct Planned {
    /// The workload's number for it.
    pub seq: u64,
    /// Envelope.
    pub envelope: Envelope,
    /// The message.
    pub body: MessageBody,
    /// Open loop: when it was due.
    pub due: Option<Instant>,
}

/// What a workload has for a session right now.
pub enum Claim {
    /// Send this.
    Send(Planned),
    /// Nothing before this instant.
    Wait(Instant),
    /// The load is over.
    Done,
}

/// How one message ended.
#[derive(Clone, Debug)]
pub struct Settled {
    /// Recipients the server accepted (2xx after the data).
    pub accepted: usize,
    /// Reply codes of the recipients it did not accept (4xx, 5xx).
    pub refused: Vec<u16>,
    /// The connection was lost (or broke the protocol) before the final reply.
    pub lost: bool,
    /// Body bytes were written (with `lost`, the server may have it).
    pub body_sent: bool,
}

/// The source of messages for the sessions.
pub trait Workload {
    /// The next message, if one is due at `now`.
    fn claim(&self, now: Instant) -> Claim;
    /// The outcome of a claimed message (also for one never sent: a connection failed).
    fn settled(&self, planned: &Planned, outcome: &Settled, now: Instant);
}

/// Runs `cfg.sessions` sessions until the workload is done. Must run inside a `LocalSet`.
pub async fn run_sessions<W: Workload + 'static>(
    cfg: Rc<ClientConfig>,
    workload: Rc<W>,
    rec: Rc<RefCell<Recorder>>,
) {
    let tasks: Vec<_> = (0..cfg.sessions.max(1))
        .map(|_| tokio::task::spawn_local(session(cfg.clone(), workload.clone(), rec.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// One session: connections one after the other while there is work.
async fn session<W: Workload>(cfg: Rc<ClientConfig>, w: Rc<W>, rec: Rc<RefCell<Recorder>>) {
    let mut failures = 0;
    loop {
        // A real sender connects when it has mail: claim first.
        let first = match w.claim(Instant::now()) {
            Claim::Done => return,
            Claim::Wait(t) => {
                tokio::time::sleep_until(t.into()).await;
                continue;
            }
            Claim::Send(p) => p,
        };
        if connection(&cfg, &*w, &rec, first).await {
            failures = 0;
        } else {
            failures += 1;
            if failures >= MAX_CONNECT_FAILURES {
                tracing::warn!(target = %cfg.target, failures, "session gives up: cannot connect");
                return;
            }
            tokio::time::sleep(CONNECT_BACKOFF).await;
        }
    }
}

/// A message written to the connection.
struct Flight {
    planned: Planned,
    body_sent: bool,
    /// When its last body byte was written.
    end_of_data: Option<Instant>,
}

/// One connection. Returns false when it could not be opened at all.
async fn connection<W: Workload>(
    cfg: &ClientConfig,
    w: &W,
    rec: &RefCell<Recorder>,
    first: Planned,
) -> bool {
    let started = Instant::now();
    let connected = tokio::time::timeout(cfg.timeout, Stream::connect(IoKind::Epoll, cfg.target));
    let stream = match connected.await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) | Err(_) => {
            never_sent(w, rec, &first, "connect");
            return false;
        }
    };
    rec.borrow_mut().phase().phase.connections += 1;
    let mut conn = Conn::plain(stream);
    if let Tls::Implicit(tls, name) = &cfg.tls {
        if conn
            .start_tls_client(tls.clone(), name.clone())
            .await
            .is_err()
        {
            never_sent(w, rec, &first, "tls");
            return true;
        }
    }
    let mut d = Driver {
        cfg,
        rec,
        machine: Reversed::new(machine_config(cfg)),
        conn,
        pending: Some(first),
        flights: HashMap::new(),
        unstamped: Vec::new(),
        out: Vec::with_capacity(64 * 1024),
        input: Vec::with_capacity(16 * 1024),
        pos: 0,
        sent: 0,
        aborted: false,
    };
    d.run(w, started).await;
    true
}

fn machine_config(cfg: &ClientConfig) -> ReversedConfig {
    ReversedConfig {
        hostname: cfg.helo.clone(),
        pipelining: cfg.pipelining,
        chunking: cfg.chunking,
    }
}

/// A claimed message that never went out: counted as attempted and failed.
fn never_sent<W: Workload>(w: &W, rec: &RefCell<Recorder>, p: &Planned, why: &str) {
    {
        let mut r = rec.borrow_mut();
        r.phase().phase.attempted += 1;
        r.error(why);
    }
    let outcome = Settled {
        accepted: 0,
        refused: Vec::new(),
        lost: false,
        body_sent: false,
    };
    w.settled(p, &outcome, Instant::now());
}

struct Driver<'a> {
    cfg: &'a ClientConfig,
    rec: &'a RefCell<Recorder>,
    machine: Reversed,
    conn: Conn,
    /// The message claimed before connecting.
    pending: Option<Planned>,
    flights: HashMap<String, Flight>,
    /// Messages whose last body byte is in `out`, not yet written.
    unstamped: Vec<String>,
    /// What goes out next: commands and bodies, in order.
    out: Vec<u8>,
    input: Vec<u8>,
    pos: usize,
    sent: u64,
    /// We called `abort`: outcomes without a reply are losses, not replies.
    aborted: bool,
}

impl Driver<'_> {
    async fn run<W: Workload>(&mut self, w: &W, started: Instant) {
        let mut greeted = false;
        let mut need = false;
        let mut tls_done = !matches!(self.cfg.tls, Tls::StartTls(..));
        loop {
            self.pos += self.machine.handle_input(&self.input[self.pos..]);
            if !greeted && (!self.machine.output().is_empty() || self.machine.is_closed()) {
                greeted = true;
                self.rec
                    .borrow_mut()
                    .latency(latency::CONNECT_TO_GREETING, started.elapsed());
            }
            let mut closed = None;
            let actions: Vec<Action> = std::iter::from_fn(|| self.machine.poll_action()).collect();
            let protocol_text = actions.iter().find_map(|a| match a {
                Action::Close(r @ CloseReason::Protocol(_)) => Some(r.to_string()),
                _ => None,
            });
            for action in actions {
                match action {
                    Action::NeedMessage => need = true,
                    Action::SendBody { id, framing } => self.body(&id, framing).await,
                    Action::Delivered(o) => self.delivered(w, o, protocol_text.as_deref()),
                    Action::Close(reason) => closed = Some(reason),
                }
            }
            if let Some(reason) = closed {
                return self.close(w, reason).await;
            }
            let mut wait_until = None;
            if need {
                if !tls_done {
                    tls_done = true;
                    need = false;
                    if let Err(why) = self.start_tls().await {
                        self.rec.borrow_mut().error(why);
                        self.abort();
                    }
                    continue;
                }
                if self.cfg.per_connection > 0 && self.sent >= self.cfg.per_connection {
                    need = false;
                    self.machine.no_more();
                    continue;
                }
                let claim = match self.pending.take() {
                    Some(p) => Claim::Send(p),
                    None => w.claim(Instant::now()),
                };
                match claim {
                    Claim::Send(p) => {
                        need = false;
                        self.send(p);
                        continue;
                    }
                    Claim::Done => {
                        need = false;
                        self.machine.no_more();
                        continue;
                    }
                    Claim::Wait(t) if self.machine.in_flight() == 0 => {
                        if self.flush().await.is_err() {
                            self.abort();
                            continue;
                        }
                        tokio::time::sleep_until(t.into()).await;
                        continue;
                    }
                    Claim::Wait(t) => wait_until = Some(t),
                }
            }
            if self.pos > 0 && self.pos == self.input.len() {
                self.input.clear();
                self.pos = 0;
            }
            if self.flush().await.is_err() {
                self.abort();
                continue;
            }
            let read = tokio::time::timeout(
                self.cfg.timeout,
                self.conn.read_append(&mut self.input, 16 * 1024),
            );
            let result = match wait_until {
                // The next arrival may come before the replies: wait for whichever is first.
                Some(t) => tokio::select! {
                    r = read => Some(r),
                    _ = tokio::time::sleep_until(t.into()) => None,
                },
                None => Some(read.await),
            };
            match result {
                None | Some(Ok(Ok(1..))) => {}
                Some(Ok(Ok(0))) => {
                    self.rec.borrow_mut().error("closed");
                    self.abort();
                }
                Some(Ok(Err(_))) => {
                    self.rec.borrow_mut().error("io");
                    self.abort();
                }
                Some(Err(_)) => {
                    self.rec.borrow_mut().error("timeout");
                    self.abort();
                }
            }
        }
    }

    fn abort(&mut self) {
        self.aborted = true;
        self.machine.abort();
    }

    fn send(&mut self, p: Planned) {
        self.sent += 1;
        let now = Instant::now();
        {
            let mut r = self.rec.borrow_mut();
            r.phase().phase.attempted += 1;
            if let Some(due) = p.due {
                r.latency(latency::ARRIVAL_LAG, now.saturating_duration_since(due));
            }
        }
        let id = p.seq.to_string();
        let outgoing = Outgoing {
            id: id.clone(),
            envelope: p.envelope.clone(),
            size: p.body.len() as u64,
            eight_bit: false,
            utf8_addresses: false,
        };
        self.flights.insert(
            id,
            Flight {
                planned: p,
                body_sent: false,
                end_of_data: None,
            },
        );
        self.machine.send(outgoing);
    }

    /// Writes what is queued; stamps the end of data of the bodies it carried.
    async fn flush(&mut self) -> std::io::Result<()> {
        self.out.append(self.machine.output());
        if self.out.is_empty() {
            return Ok(());
        }
        self.conn.flush_buffer(&mut self.out).await?;
        let now = Instant::now();
        for id in self.unstamped.drain(..) {
            if let Some(f) = self.flights.get_mut(&id) {
                f.end_of_data = Some(now);
            }
        }
        Ok(())
    }

    /// Streams a body after the commands the machine queued.
    async fn body(&mut self, id: &str, framing: BodyFraming) {
        self.out.append(self.machine.output());
        let Some(f) = self.flights.get_mut(id) else {
            return self.abort();
        };
        f.body_sent = true;
        let body = f.planned.body.clone();
        let len = body.len();
        let mut stuffer = DotStuffer::new();
        let mut plain = Vec::new();
        let mut at = 0;
        while at < len {
            let to = (at + CHUNK).min(len);
            match framing {
                BodyFraming::Bdat => body.copy_range(at, to, &mut self.out),
                BodyFraming::Data => {
                    plain.clear();
                    body.copy_range(at, to, &mut plain);
                    stuffer.push(&plain, &mut self.out);
                }
            }
            at = to;
            if self.out.len() >= CHUNK && self.conn.flush_buffer(&mut self.out).await.is_err() {
                return self.abort();
            }
        }
        if framing == BodyFraming::Data {
            stuffer.finish(&mut self.out);
        }
        self.unstamped.push(id.to_string());
        self.machine.body_sent();
    }

    fn delivered<W: Workload>(&mut self, w: &W, o: MessageOutcome, protocol_text: Option<&str>) {
        let Some(f) = self.flights.remove(&o.id) else {
            return;
        };
        let now = Instant::now();
        let mut accepted = 0;
        let mut refused = Vec::new();
        let mut lost = false;
        for (_, outcome) in &o.recipients {
            match outcome {
                RcptOutcome::Delivered => accepted += 1,
                RcptOutcome::Deferred(r)
                    if self.aborted
                        || protocol_text
                            .is_some_and(|t| r.lines.first().is_some_and(|l| l == t)) =>
                {
                    lost = true
                }
                RcptOutcome::Deferred(r) | RcptOutcome::Failed(r) => refused.push(r.code),
            }
        }
        {
            let mut r = self.rec.borrow_mut();
            if accepted > 0 {
                r.accepted(f.planned.body.len() as u64, now);
            }
            for code in &refused {
                r.error(code.to_string());
            }
            if lost {
                r.error("lost");
            }
            if let (Some(t), false) = (f.end_of_data, lost) {
                r.latency(
                    latency::END_OF_DATA_TO_REPLY,
                    now.saturating_duration_since(t),
                );
            }
        }
        let settled = Settled {
            accepted,
            refused,
            lost,
            body_sent: f.body_sent,
        };
        w.settled(&f.planned, &settled, now);
    }

    async fn close<W: Workload>(&mut self, w: &W, reason: CloseReason) {
        let _ = self.flush().await;
        self.conn.close().await;
        let key = match &reason {
            CloseReason::Done | CloseReason::Aborted => None,
            CloseReason::Greeting(r) | CloseReason::ServiceClosing(r) | CloseReason::Refused(r) => {
                Some(r.code.to_string())
            }
            CloseReason::Protocol(_) => Some("protocol".to_string()),
        };
        match (self.pending.take(), key) {
            (Some(p), Some(key)) => never_sent(w, self.rec, &p, &key),
            (Some(p), None) => never_sent(w, self.rec, &p, "closed"),
            (None, Some(key)) => self.rec.borrow_mut().error(key),
            (None, None) => {}
        }
        // Every flight was reported by the machine before Close; anything left is a bug
        // in the accounting, reported as lost rather than hidden.
        let left: Vec<Flight> = self.flights.drain().map(|(_, f)| f).collect();
        for f in left {
            self.rec.borrow_mut().error("lost");
            let settled = Settled {
                accepted: 0,
                refused: Vec::new(),
                lost: true,
                body_sent: f.body_sent,
            };
            w.settled(&f.planned, &settled, Instant::now());
        }
    }

    /// STARTTLS on the machine's first request for a message, then a fresh machine that
    /// sends EHLO again (RFC 3207 §4.2: no new greeting).
    async fn start_tls(&mut self) -> Result<(), &'static str> {
        let Tls::StartTls(tls, name) = self.cfg.tls.clone() else {
            return Ok(());
        };
        if !self.machine.capabilities().starttls {
            return Err("tls");
        }
        self.flush().await.map_err(|_| "io")?;
        let (r, _) = self.conn.write_owned(b"STARTTLS\r\n".to_vec()).await;
        r.map_err(|_| "io")?;
        let code = loop {
            match reply::parse(&self.input[self.pos..]) {
                Parsed::Reply(r, _) => break r.code,
                Parsed::Malformed => return Err("protocol"),
                Parsed::More => {}
            }
            let read = self.conn.read_append(&mut self.input, 4096);
            match tokio::time::timeout(self.cfg.timeout, read).await {
                Ok(Ok(1..)) => {}
                _ => return Err("tls"),
            }
        };
        if code != 220 {
            return Err("tls");
        }
        self.conn
            .start_tls_client(tls, name)
            .await
            .map_err(|_| "tls")?;
        self.input.clear();
        self.pos = 0;
        self.machine = Reversed::new(machine_config(self.cfg));
        let _ = self.machine.handle_input(b"220 TLS started\r\n");
        Ok(())
    }
}

/// Recipient addresses: `--to LOCAL@DOMAIN`, `--recipients K`, `--domains D`.
#[derive(Clone, Debug)]
pub struct Recipients {
    /// Local part.
    pub local: String,
    /// Domain (with D > 1: `d0.DOMAIN` .. `d<D-1>.DOMAIN`).
    pub domain: String,
    /// Recipients per message.
    pub per_message: usize,
    /// Domains to spread them over.
    pub domains: usize,
}

impl Recipients {
    /// The hosted domains the load goes to.
    pub fn domain_names(&self) -> Vec<String> {
        if self.domains <= 1 {
            return vec![self.domain.clone()];
        }
        (0..self.domains)
            .map(|i| format!("d{i}.{}", self.domain))
            .collect()
    }

    /// The recipients of message `seq`: recipient j goes to domain `(seq * K + j) % D`, local
    /// part `LOCAL` (or `LOCAL<j>` with K > 1).
    pub fn for_message(&self, seq: u64, names: &[String]) -> Vec<Mailbox> {
        let k = self.per_message.max(1);
        (0..k)
            .map(|j| {
                let d = (seq as usize * k + j) % names.len();
                let local = if k == 1 {
                    self.local.clone()
                } else {
                    format!("{}{j}", self.local)
                };
                Mailbox {
                    local,
                    domain: names[d].clone(),
                }
            })
            .collect()
    }
}

/// An envelope from `sender` to `recipients`.
pub fn envelope(sender: &Mailbox, recipients: &[Mailbox]) -> Envelope {
    Envelope {
        sender: Some(sender.clone()),
        recipients: recipients
            .iter()
            .map(|m| Recipient {
                mailbox: m.clone(),
                notify: None,
                orcpt: None,
            })
            .collect(),
        ..Envelope::default()
    }
}

/// What `bench mx` sends.
pub struct MxLoad {
    /// Stop after this many messages.
    pub messages: Option<u64>,
    /// Stop at this instant.
    pub deadline: Option<Instant>,
    /// Open loop at this many messages per second.
    pub rate: Option<f64>,
    /// Sizes.
    pub sizes: SizeDist,
    /// Recipients.
    pub recipients: Recipients,
    /// MAIL FROM and From:.
    pub sender: Mailbox,
    /// The run's id, in every message's `X-Bench-Id`.
    pub run_id: String,
    start: Instant,
    names: Vec<String>,
    next: Cell<u64>,
    rng: RefCell<Rng>,
}

impl MxLoad {
    /// A load starting at `start`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        start: Instant,
        messages: Option<u64>,
        duration: Option<Duration>,
        rate: Option<f64>,
        sizes: SizeDist,
        recipients: Recipients,
        sender: Mailbox,
        run_id: String,
        seed: u64,
    ) -> MxLoad {
        MxLoad {
            messages,
            deadline: duration.map(|d| start + d),
            rate,
            sizes,
            names: recipients.domain_names(),
            recipients,
            sender,
            run_id,
            start,
            next: Cell::new(0),
            rng: RefCell::new(Rng::new(seed)),
        }
    }
}

impl MxLoad {
    /// `--duration`, if the load has one.
    pub fn duration(&self) -> Option<Duration> {
        self.deadline.map(|d| d - self.start)
    }
}

impl Workload for MxLoad {
    fn claim(&self, now: Instant) -> Claim {
        let seq = self.next.get();
        if self.messages.is_some_and(|m| seq >= m) || self.deadline.is_some_and(|d| now >= d) {
            return Claim::Done;
        }
        let due = self
            .rate
            .map(|r| self.start + Duration::from_secs_f64(seq as f64 / r.max(1e-9)));
        if let Some(due) = due {
            if self.deadline.is_some_and(|d| due >= d) {
                return Claim::Done;
            }
            if due > now {
                return Claim::Wait(due);
            }
        }
        self.next.set(seq + 1);
        let size = self.sizes.sample(&mut self.rng.borrow_mut());
        let rcpts = self.recipients.for_message(seq, &self.names);
        let to: Vec<String> = rcpts.iter().map(|m| m.to_string()).collect();
        let body = MessageBody::new(&self.run_id, seq, size, &self.sender.to_string(), &to);
        Claim::Send(Planned {
            seq,
            envelope: envelope(&self.sender, &rcpts),
            body,
            due,
        })
    }

    fn settled(&self, _planned: &Planned, _outcome: &Settled, _now: Instant) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_spread_over_domains() {
        let r = Recipients {
            local: "user".into(),
            domain: "example.com".into(),
            per_message: 2,
            domains: 3,
        };
        let names = r.domain_names();
        assert_eq!(
            names,
            ["d0.example.com", "d1.example.com", "d2.example.com"]
        );
        let m: Vec<String> = r
            .for_message(1, &names)
            .iter()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(m, ["user0@d2.example.com", "user1@d0.example.com"]);
        let one = Recipients {
            per_message: 1,
            domains: 1,
            ..r
        };
        assert_eq!(
            one.for_message(5, &one.domain_names())[0].to_string(),
            "user@example.com"
        );
    }

    #[test]
    fn open_loop_waits_for_the_schedule() {
        let start = Instant::now();
        let load = MxLoad::new(
            start,
            Some(3),
            None,
            Some(10.0),
            SizeDist::Fixed(500),
            Recipients {
                local: "u".into(),
                domain: "example.com".into(),
                per_message: 1,
                domains: 1,
            },
            Mailbox {
                local: "s".into(),
                domain: "client.test".into(),
            },
            "run".into(),
            1,
        );
        assert!(matches!(load.claim(start), Claim::Send(p) if p.seq == 0 && p.body.len() == 500));
        match load.claim(start) {
            Claim::Wait(t) => assert_eq!(t, start + Duration::from_millis(100)),
            _ => panic!("message 1 is not due yet"),
        }
        let later = start + Duration::from_secs(1);
        assert!(matches!(load.claim(later), Claim::Send(p) if p.seq == 1));
        assert!(matches!(load.claim(later), Claim::Send(p) if p.seq == 2));
        assert!(matches!(load.claim(later), Claim::Done));
    }
}
