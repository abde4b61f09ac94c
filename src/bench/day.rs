//! `turnpike bench day`: a provider's day compressed into minutes, with every message checked.
//!
//! - **Senders**: `--senders` SMTP sessions (the [`super::mx`] sessions) deliver inbound mail
//!   to the customers' domains. Arrivals are a Poisson process whose rate follows the day
//!   (night 0.3x, morning 2x, midday 1x, evening 0.6x of `--rate`), with bursts: each second
//!   has a one-in-ten chance of running at 4x. Customers get mail in a Zipf-like mix (a few
//!   busy domains, a long tail).
//! - **Customers**: each account connects on its own schedule, every 1 to 15 simulated
//!   minutes (`--time-scale` simulated seconds per real second) with ±20% jitter, runs the
//!   customer session ([`crate::customer::session`]: AUTH, upload, ATRN, receive) and answers
//!   each message with the `--reply-mix` (250 / 4xx / 5xx). Accounts with linger stay in the
//!   reversed session while mail keeps coming and leave after `--linger-idle` of quiet. A
//!   share of the customers (`--submitters`) first queue outgoing mail for other customers'
//!   domains in their outbox; the session uploads it before ATRN.
//! - **Sweep**: after the day, no more inbound mail; every customer collects with 250 only,
//!   round after round, until a whole round finds nothing held and nothing left to upload.
//!
//! Reported per phase: inbound throughput, ATRN reply latency, held-to-delivered latency
//! (the MX's 250 to the customer's 250), drain rate, server CPU and RSS from /proc. Then the
//! [`Ledger`] judges: every accepted message delivered exactly once to the right account,
//! byte-identical, or refused once by it (5xx) and never offered again.
//!
//! Against a local `turnpike serve` (`--data-dir`) the bench makes its own accounts
//! (`bench-day-NNN`, domain `cNNN.day.bench`, a fresh password per run), tells the server
//! to reload, and finds the server's ports and pid itself. Against any other provider, give
//! `--accounts FILE`, `--mx` and `--odmr`.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::customer::outbox::Outbox;
use crate::customer::session::{self, Mechanism, SessionConfig, SessionError, Sink, Upload};
use crate::proto::inbound::Incoming;
use crate::proto::reply::Reply;
use crate::runtime::io::{block_on, IoKind};
use crate::types::{DomainName, Mailbox, MessageId};

use super::ledger::{Answer, Ledger, Offer};
use super::message::{MessageBody, SizeDist};
use super::mx::{self, Claim, ClientConfig, Planned, Settled, Workload};
use super::procstat;
use super::report::{self, latency, Cpu, Report};
use super::rng::Rng;
use super::stats::Recorder;

/// The parts of the day and their share of `--rate`.
pub const PHASES: [(&str, f64); 4] = [
    ("night", 0.3),
    ("morning", 2.0),
    ("midday", 1.0),
    ("evening", 0.6),
];
/// Chance that a second of the day is a burst, and the burst's rate factor.
const BURST: (f64, f64) = (0.1, 4.0);
/// Customers connect every 1 to 15 simulated minutes.
const SCHEDULE_S: (f64, f64) = (60.0, 900.0);
/// Stall timeout of non-lingering customer sessions.
const CUSTOMER_IDLE: Duration = Duration::from_secs(30);
/// The sender of inbound mail (not hosted: bounces to it leave through the relay).
const SENDER: (&str, &str) = ("sender", "senders.day.bench");

/// One customer account.
#[derive(Clone, Debug)]
pub struct DayAccount {
    /// Account name.
    pub name: String,
    /// Password.
    pub password: String,
    /// Its domains.
    pub domains: Vec<DomainName>,
    /// The provider keeps its sessions open (linger).
    pub linger: bool,
}

/// `--reply-mix`: the customers' answers and their weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplyMix(Vec<(u16, f64)>);

impl ReplyMix {
    /// Parses `250=90,451=6,554=4` (weights, any scale; codes 250 or 4xx/5xx).
    pub fn parse(s: &str) -> Result<ReplyMix, String> {
        let mut v = Vec::new();
        for part in s.split(',') {
            let (code, w) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected CODE=WEIGHT"))?;
            let code: u16 = code
                .trim()
                .parse()
                .map_err(|_| format!("{code:?}: not a code"))?;
            let w: f64 = w
                .trim()
                .parse()
                .map_err(|_| format!("{w:?}: not a weight"))?;
            if !(code == 250 || (400..600).contains(&code)) || !w.is_finite() || w < 0.0 {
                return Err(format!(
                    "{part:?}: code must be 250, 4xx or 5xx, weight >= 0"
                ));
            }
            v.push((code, w));
        }
        if v.iter().map(|e| e.1).sum::<f64>() <= 0.0 {
            return Err("the weights add up to nothing".into());
        }
        Ok(ReplyMix(v))
    }

    fn pick(&self, rng: &mut Rng) -> u16 {
        let total: f64 = self.0.iter().map(|e| e.1).sum();
        let mut x = rng.unit() * total;
        for &(code, w) in &self.0 {
            if x < w {
                return code;
            }
            x -= w;
        }
        self.0[0].0
    }

    /// As given on the command line.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(c, w)| format!("{c}={w}")).collect();
        parts.join(",")
    }
}

/// Everything `bench day` needs.
#[derive(Clone)]
pub struct DayOptions {
    /// The provider's MX.
    pub mx: SocketAddr,
    /// The provider's ODMR listener.
    pub odmr: SocketAddr,
    /// The customers.
    pub accounts: Vec<DayAccount>,
    /// Parallel sending sessions.
    pub senders: usize,
    /// Messages per sending connection.
    pub per_connection: u64,
    /// Mean inbound messages per second at 1x.
    pub rate: f64,
    /// Length of the day (the four phases), real time.
    pub duration: Duration,
    /// Simulated seconds per real second (for the customers' schedules).
    pub time_scale: f64,
    /// Message sizes.
    pub sizes: SizeDist,
    /// The customers' answers during the day.
    pub mix: ReplyMix,
    /// Share of customers that upload outgoing mail before ATRN.
    pub submitters: f64,
    /// A lingering session ends after this long without mail.
    pub linger_idle: Duration,
    /// TLS of the customer sessions.
    pub tls: session::Tls,
    /// Their SASL mechanism.
    pub mechanism: Mechanism,
    /// Bound on the sweep after the day.
    pub sweep_timeout: Duration,
    /// Seed.
    pub seed: u64,
    /// Run id (in every X-Bench-Id).
    pub run_id: String,
    /// Timeline interval.
    pub interval: Duration,
    /// The server to sample.
    pub server_pid: Option<u32>,
    /// Where the customers' outboxes live (removed at the end).
    pub work_dir: PathBuf,
    /// The local server's data directory when the bench made the accounts: linger is
    /// turned off for the sweep (a lingering session holds its domains until the provider's
    /// next keep-alive notices the customer left).
    pub data_dir: Option<PathBuf>,
}

/// Why a day could not run.
#[derive(Debug)]
pub enum DayError {
    /// Setting up accounts or finding the server failed.
    Setup(String),
    /// Local I/O (runtime, outbox directories).
    Io(std::io::Error),
}

impl std::fmt::Display for DayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DayError::Setup(s) => write!(f, "bench day: {s}"),
            DayError::Io(e) => write!(f, "bench day: {e}"),
        }
    }
}

impl std::error::Error for DayError {}

impl From<std::io::Error> for DayError {
    fn from(e: std::io::Error) -> Self {
        DayError::Io(e)
    }
}

/// The server and customers found or made in a local data directory.
pub struct Local {
    /// MX address.
    pub mx: SocketAddr,
    /// ODMR address.
    pub odmr: SocketAddr,
    /// The accounts made for this run.
    pub accounts: Vec<DayAccount>,
    /// The server's pid, if found.
    pub pid: Option<u32>,
}

/// Makes `customers` accounts in a running local server's data directory (`linger` share
/// of them lingering), has the server reload them, and finds its addresses and pid.
pub fn prepare_local(data_dir: &Path, customers: usize, linger: f64) -> Result<Local, DayError> {
    use crate::accounts::Accounts;
    let listening = crate::provider::server::read_listening(data_dir).ok_or_else(|| {
        DayError::Setup(format!(
            "{}/listening not found: is `turnpike serve` running on this data directory?",
            data_dir.display()
        ))
    })?;
    let addr = |s: &str| {
        listening
            .get(s)
            .copied()
            .ok_or_else(|| DayError::Setup(format!("the server has no {s} listener")))
    };
    let (mx, odmr) = (addr("mx")?, addr("odmr")?);
    let path = data_dir.join("accounts.toml");
    let setup = |e: &dyn std::fmt::Display| DayError::Setup(e.to_string());
    let mut accounts = Accounts::load(&path).map_err(|e| setup(&e))?;
    let password = super::new_run_id() + &super::new_run_id();
    let lingering = (customers as f64 * linger).round() as usize;
    let mut made = Vec::new();
    for i in 0..customers {
        let name = format!("bench-day-{i:03}");
        let domain = DomainName::parse(&format!("c{i:03}.day.bench")).map_err(|e| setup(&e))?;
        if accounts.account(&name).is_some() {
            accounts.remove(&name).map_err(|e| setup(&e))?;
        }
        accounts
            .add(&name, vec![domain.clone()], &password, true)
            .map_err(|e| setup(&e))?;
        accounts
            .set_linger(&name, i < lingering)
            .map_err(|e| setup(&e))?;
        made.push(DayAccount {
            name,
            password: password.clone(),
            domains: vec![domain],
            linger: i < lingering,
        });
    }
    accounts.save(&path).map_err(|e| setup(&e))?;
    match crate::control::request(data_dir, "reload") {
        Ok(Some(_)) => {}
        Ok(None) => return Err(DayError::Setup("no running server answered reload".into())),
        Err(e) => return Err(DayError::Setup(format!("reload: {e}"))),
    }
    Ok(Local {
        mx,
        odmr,
        accounts: made,
        pid: procstat::pid_from_data_dir(data_dir),
    })
}

/// Turns linger off for `accounts` in `data_dir` and has the server reload.
fn linger_off(data_dir: &Path, accounts: &[DayAccount]) -> Result<(), String> {
    let path = data_dir.join("accounts.toml");
    let mut all = crate::accounts::Accounts::load(&path).map_err(|e| e.to_string())?;
    for a in accounts.iter().filter(|a| a.linger) {
        all.set_linger(&a.name, false).map_err(|e| e.to_string())?;
    }
    all.save(&path).map_err(|e| e.to_string())?;
    crate::control::request(data_dir, "reload")
        .map_err(|e| e.to_string())?
        .ok_or("no running server answered reload")?;
    Ok(())
}

/// Parses `--accounts FILE`: one account per line, `NAME PASSWORD DOMAIN[,DOMAIN...]
/// [linger]`; `#` starts a comment.
pub fn parse_accounts(text: &str) -> Result<Vec<DayAccount>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = |what: &str| format!("line {}: {what}", n + 1);
        let (name, password, domains) = match f.as_slice() {
            [a, p, d] | [a, p, d, _] => (a, p, d),
            _ => return Err(bad("expected NAME PASSWORD DOMAIN[,DOMAIN...] [linger]")),
        };
        let linger = match f.get(3) {
            None => false,
            Some(&"linger") => true,
            Some(w) => return Err(bad(&format!("{w:?}: expected `linger` or nothing"))),
        };
        let domains = domains
            .split(',')
            .map(|d| DomainName::parse(d).map_err(|e| bad(&format!("{d}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(DayAccount {
            name: name.to_string(),
            password: password.to_string(),
            domains,
            linger,
        });
    }
    if out.is_empty() {
        return Err("no accounts".into());
    }
    Ok(out)
}

/// What the day's tasks share (one thread).
struct Day {
    opts: DayOptions,
    start: Instant,
    day_end: Instant,
    rec: Rc<RefCell<Recorder>>,
    ledger: RefCell<Ledger>,
    /// Next bench sequence number (inbound and submitted mail share it).
    seq: Cell<u64>,
    /// After the day: customers answer 250 only.
    sweep: Cell<bool>,
    rng: RefCell<Rng>,
}

impl Day {
    fn next_id(&self) -> (u64, String) {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        (seq, format!("{}.{seq}", self.opts.run_id))
    }

    fn phase_len(&self) -> Duration {
        self.opts.duration / PHASES.len() as u32
    }
}

/// The senders' workload: arrivals that follow the day, for the customers' domains.
struct DayLoad {
    day: Rc<Day>,
    next_arrival: Cell<Instant>,
    /// Cumulative Zipf-like weights over the accounts.
    weights: Vec<f64>,
    sender: Mailbox,
}

impl DayLoad {
    fn rate_at(&self, t: Instant) -> f64 {
        let day = &self.day;
        let since = t.saturating_duration_since(day.start);
        let phase = (since.as_secs_f64() / day.phase_len().as_secs_f64().max(1e-9)) as usize;
        let base = day.opts.rate * PHASES[phase.min(PHASES.len() - 1)].1;
        // A second is a burst when its own hash says so: the same seconds every run.
        let mut r = Rng::new(day.opts.seed ^ since.as_secs().wrapping_mul(0x9e37_79b9));
        if r.unit() < BURST.0 {
            base * BURST.1
        } else {
            base
        }
    }
}

impl Workload for DayLoad {
    fn claim(&self, now: Instant) -> Claim {
        let at = self.next_arrival.get();
        if at >= self.day.day_end {
            return Claim::Done;
        }
        if at > now {
            return Claim::Wait(at);
        }
        let day = &self.day;
        let mut rng = day.rng.borrow_mut();
        let gap = rng.exp(1.0 / self.rate_at(at).max(1e-6));
        self.next_arrival.set(at + Duration::from_secs_f64(gap));
        let x = rng.unit() * self.weights.last().copied().unwrap_or(1.0);
        let i = self.weights.partition_point(|&w| w <= x);
        let account = &day.opts.accounts[i.min(day.opts.accounts.len() - 1)];
        let domain = &account.domains[rng.below(account.domains.len() as u64) as usize];
        let rcpt = Mailbox {
            local: format!("user{}", rng.below(5)),
            domain: domain.as_str().to_string(),
        };
        let size = day.opts.sizes.sample(&mut rng);
        drop(rng);
        let (seq, id) = day.next_id();
        let body = MessageBody::new(
            &day.opts.run_id,
            seq,
            size,
            &self.sender.to_string(),
            &[rcpt.to_string()],
        );
        day.ledger
            .borrow_mut()
            .expect(&id, &account.name, body.digest());
        Claim::Send(Planned {
            seq,
            envelope: mx::envelope(&self.sender, &[rcpt]),
            body,
            due: Some(at),
        })
    }

    fn settled(&self, planned: &Planned, o: &Settled, now: Instant) {
        let id = format!("{}.{}", self.day.opts.run_id, planned.seq);
        self.day
            .ledger
            .borrow_mut()
            .mx_settled(&id, o.accepted > 0, o.lost && o.body_sent, now);
    }
}

/// A customer's receiving side: checks each message with the ledger, answers by the mix.
struct DaySink<'a> {
    day: &'a Day,
    account: &'a str,
    atrn_code: Option<u16>,
    reversed_at: Option<Instant>,
    got_mail: bool,
}

impl Sink for DaySink<'_> {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        let now = Instant::now();
        self.got_mail = true;
        let day = self.day;
        let rcpts: Vec<Mailbox> = message
            .envelope
            .recipients
            .iter()
            .map(|r| r.mailbox.clone())
            .collect();
        let offer = day
            .ledger
            .borrow_mut()
            .offered(self.account, &rcpts, &message.body);
        let mut rec = day.rec.borrow_mut();
        let id = match offer {
            Offer::Expected(id) => id,
            Offer::Duplicate(id) => {
                // Take it (a refusal would only bring it back) and let the ledger judge.
                day.ledger
                    .borrow_mut()
                    .answered(&id, Answer::Delivered, now);
                rec.error("duplicate");
                return Ok(());
            }
            Offer::Report => {
                rec.delivery().reports += 1;
                return Ok(());
            }
            Offer::Unexpected(_) => {
                rec.error("unexpected");
                return Ok(());
            }
            Offer::Foreign => return Ok(()),
        };
        let code = if day.sweep.get() {
            250
        } else {
            day.opts.mix.pick(&mut day.rng.borrow_mut())
        };
        let mut ledger = day.ledger.borrow_mut();
        match code / 100 {
            2 => {
                if let Some(held) = ledger.answered(&id, Answer::Delivered, now) {
                    rec.latency(latency::HELD_TO_DELIVERED, held);
                }
                rec.delivered(message.body.len() as u64, now);
                Ok(())
            }
            4 => {
                ledger.answered(&id, Answer::Deferred, now);
                rec.delivery().deferred += 1;
                Err(Reply::with_status(
                    code,
                    (4, 3, 0),
                    "bench day: try again later",
                ))
            }
            _ => {
                ledger.answered(&id, Answer::Refused, now);
                rec.delivery().refused += 1;
                Err(Reply::with_status(code, (5, 3, 0), "bench day: refused"))
            }
        }
    }

    fn atrn_answered(&mut self, code: u16, waited: Duration) {
        let mut rec = self.day.rec.borrow_mut();
        rec.latency(latency::ATRN_REPLY, waited);
        *rec.delivery().atrn.entry(code.to_string()).or_insert(0) += 1;
        self.atrn_code = Some(code);
        if code == 250 {
            self.reversed_at = Some(Instant::now());
        }
    }
}

/// A customer and its outgoing mail.
struct Customer {
    index: usize,
    account: DayAccount,
    outbox: Option<Outbox>,
    /// Submitted and not yet uploaded: (bench id, outbox id).
    submitted: RefCell<Vec<(String, MessageId)>>,
}

/// How one customer session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// ATRN was answered 453: nothing held.
    NothingHeld,
    /// Anything else (mail received, a failure).
    Other,
}

impl Customer {
    /// Queues 1 to 3 outgoing messages for other customers' domains.
    async fn submit(&self, day: &Day) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        let accounts = &day.opts.accounts;
        if accounts.len() < 2 {
            return;
        }
        let n = 1 + day.rng.borrow_mut().below(3);
        for _ in 0..n {
            let (to, size, local) = {
                let mut rng = day.rng.borrow_mut();
                let mut j = rng.below(accounts.len() as u64 - 1) as usize;
                if j >= self.index {
                    j += 1;
                }
                let size = day.opts.sizes.sample(&mut rng).min(1_000_000);
                (&accounts[j], size, format!("user{}", rng.below(5)))
            };
            let rcpt = Mailbox {
                local,
                domain: to.domains[0].as_str().to_string(),
            };
            let sender = Mailbox {
                local: "office".into(),
                domain: self.account.domains[0].as_str().to_string(),
            };
            let (seq, id) = day.next_id();
            let body = MessageBody::new(
                &day.opts.run_id,
                seq,
                size,
                &sender.to_string(),
                &[rcpt.to_string()],
            );
            day.ledger.borrow_mut().expect(&id, &to.name, body.digest());
            match outbox
                .queue(&mx::envelope(&sender, &[rcpt]), &body.to_vec())
                .await
            {
                Ok(oid) => {
                    self.submitted.borrow_mut().push((id, oid));
                    day.rec.borrow_mut().delivery().submitted += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bench day: outbox queue failed");
                    day.ledger
                        .borrow_mut()
                        .mx_settled(&id, false, false, Instant::now());
                }
            }
        }
    }

    /// One ODMR session: upload, ATRN, receive.
    async fn session(&self, day: &Day) -> Ended {
        let o = &day.opts;
        let cfg = SessionConfig {
            provider: o.odmr,
            hostname: format!("{}.customer.bench", self.account.name),
            tls: o.tls.clone(),
            account: self.account.name.clone(),
            password: self.account.password.clone(),
            mechanism: o.mechanism,
            domains: Vec::new(),
            atrn_timeout: Duration::from_secs(600),
            idle_timeout: if self.account.linger {
                o.linger_idle
            } else {
                CUSTOMER_IDLE
            },
        };
        let mut sink = DaySink {
            day,
            account: &self.account.name,
            atrn_code: None,
            reversed_at: None,
            got_mail: false,
        };
        day.rec.borrow_mut().delivery().sessions += 1;
        let upload = self.outbox.as_ref().map(|outbox| Upload {
            outbox,
            submission: None,
        });
        // Last resort against a session that never ends (a provider whose keep-alive comes
        // sooner than our idle timeout): cut it when the sweep's time is up.
        let bound = (day.day_end + o.sweep_timeout).saturating_duration_since(Instant::now());
        let run = session::run_with_outbox(IoKind::Epoll, &cfg, &mut sink, upload.as_ref());
        let result = tokio::time::timeout(bound, run).await;
        let now = Instant::now();
        let Ok(result) = result else {
            tracing::warn!(account = %self.account.name, "bench day: customer session cut at the sweep's deadline");
            let mut rec = day.rec.borrow_mut();
            rec.error("customer cut");
            if let Some(t) = sink.reversed_at {
                rec.phase().drain_s += now.saturating_duration_since(t).as_secs_f64();
            }
            drop(rec);
            self.settle_uploads(day, now);
            return Ended::Other;
        };
        self.settle_uploads(day, now);
        let mut rec = day.rec.borrow_mut();
        if let Some(t) = sink.reversed_at {
            rec.phase().drain_s += now.saturating_duration_since(t).as_secs_f64();
        }
        let failure = match &result {
            Ok(_) | Err(SessionError::AtrnRefused { .. }) => None,
            // A lingering session ends when the customer's idle timer fires.
            Err(SessionError::Io(e))
                if self.account.linger
                    && sink.atrn_code == Some(250)
                    && e.kind() == std::io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(SessionError::AuthRefused(_)) => Some("auth"),
            Err(SessionError::Unreachable(_)) => Some("unreachable"),
            Err(SessionError::Tls(_)) => Some("tls"),
            Err(SessionError::Protocol(_)) => Some("protocol"),
            Err(SessionError::Io(_)) => Some("io"),
        };
        if let Some(key) = failure {
            if sink.atrn_code.is_none() {
                *rec.delivery().atrn.entry(key.to_string()).or_insert(0) += 1;
            }
            rec.error(format!("customer {key}"));
            if let Err(e) = &result {
                tracing::warn!(account = %self.account.name, error = %e, "bench day: customer session failed");
            }
        }
        match (sink.atrn_code, sink.got_mail) {
            (Some(453), false) => Ended::NothingHeld,
            _ => Ended::Other,
        }
    }

    /// Messages no longer in the outbox were taken by the provider (250).
    fn settle_uploads(&self, day: &Day, now: Instant) {
        let Some(outbox) = &self.outbox else {
            return;
        };
        let pending: HashSet<MessageId> = outbox.pending().iter().map(|q| q.id).collect();
        self.submitted.borrow_mut().retain(|(id, oid)| {
            if pending.contains(oid) {
                return true;
            }
            day.ledger.borrow_mut().mx_settled(id, true, false, now);
            false
        });
    }

    /// The customer's day: sessions on its schedule until the day ends.
    async fn day(&self, day: &Day, submitter: bool) {
        let (interval, mut next) = {
            let mut rng = day.rng.borrow_mut();
            let sim = SCHEDULE_S.0 + rng.unit() * (SCHEDULE_S.1 - SCHEDULE_S.0);
            let interval = Duration::from_secs_f64(sim / day.opts.time_scale.max(1e-6));
            (interval, day.start + interval.mul_f64(rng.unit()))
        };
        while next < day.day_end {
            tokio::time::sleep_until(next.into()).await;
            if submitter {
                self.submit(day).await;
            }
            self.session(day).await;
            let jitter = 0.8 + 0.4 * day.rng.borrow_mut().unit();
            next = (next + interval.mul_f64(jitter)).max(Instant::now());
        }
    }
}

/// Runs the day and returns its report (`verification.ok` says whether it passed).
pub fn run(opts: DayOptions) -> Result<Report, DayError> {
    block_on(IoKind::Epoll, run_day(opts))?
}

async fn run_day(opts: DayOptions) -> Result<Report, DayError> {
    let started_ms = report::unix_ms();
    let cpu0 = report::process_cpu_s();
    let start = Instant::now();
    let sampler = opts
        .server_pid
        .map(|pid| procstat::Sampler::start(pid, start, Duration::from_millis(100)))
        .transpose()?;
    let owners: BTreeMap<String, Vec<String>> = opts
        .accounts
        .iter()
        .map(|a| {
            let d = a.domains.iter().map(|d| d.as_str().to_string()).collect();
            (a.name.clone(), d)
        })
        .collect();
    let day = Rc::new(Day {
        ledger: RefCell::new(Ledger::new(&opts.run_id, &owners)),
        rec: Rc::new(RefCell::new(Recorder::new(
            start,
            opts.interval,
            PHASES[0].0,
        ))),
        start,
        day_end: start + opts.duration,
        seq: Cell::new(0),
        sweep: Cell::new(false),
        rng: RefCell::new(Rng::new(opts.seed)),
        opts,
    });
    let o = &day.opts;
    // Customers and their outboxes.
    let mut customers = Vec::new();
    let mut submitters = Vec::new();
    for (index, account) in o.accounts.iter().enumerate() {
        let submits = Rng::new(o.seed.wrapping_add(index as u64 * 7919)).unit() < o.submitters;
        let outbox = if submits {
            let dir = o.work_dir.join(format!("outbox-{}", account.name));
            std::fs::create_dir_all(&dir)?;
            Some(
                Outbox::open(&dir, IoKind::Epoll)
                    .await
                    .map_err(|e| DayError::Setup(e.to_string()))?,
            )
        } else {
            None
        };
        customers.push(Rc::new(Customer {
            index,
            account: account.clone(),
            outbox,
            submitted: RefCell::new(Vec::new()),
        }));
        submitters.push(submits);
    }
    // The phases switch on the clock.
    let phases = {
        let day = day.clone();
        tokio::task::spawn_local(async move {
            for (k, (name, _)) in PHASES.iter().enumerate().skip(1) {
                let at = day.start + day.phase_len() * k as u32;
                tokio::time::sleep_until(at.into()).await;
                day.rec.borrow_mut().begin_phase(name, Instant::now());
            }
        })
    };
    let weights: Vec<f64> = (0..o.accounts.len())
        .scan(0.0, |sum, i| {
            *sum += 1.0 / ((i + 1) as f64).powf(0.8);
            Some(*sum)
        })
        .collect();
    let load = Rc::new(DayLoad {
        day: day.clone(),
        next_arrival: Cell::new(start),
        weights,
        sender: Mailbox {
            local: SENDER.0.into(),
            domain: SENDER.1.into(),
        },
    });
    let client = Rc::new(ClientConfig {
        target: o.mx,
        sessions: o.senders,
        per_connection: o.per_connection,
        pipelining: true,
        chunking: true,
        tls: mx::Tls::None,
        helo: "senders.day.bench".into(),
        timeout: Duration::from_secs(60),
    });
    let senders = tokio::task::spawn_local(mx::run_sessions(client, load, day.rec.clone()));
    let tasks: Vec<_> = customers
        .iter()
        .zip(&submitters)
        .map(|(c, &s)| {
            let (c, day) = (c.clone(), day.clone());
            tokio::task::spawn_local(async move { c.day(&day, s).await })
        })
        .collect();
    let _ = senders.await;
    for t in tasks {
        let _ = t.await;
    }
    let _ = phases.await;
    // The sweep: collect everything, 250 only, until a round finds nothing.
    day.sweep.set(true);
    day.rec.borrow_mut().begin_phase("sweep", Instant::now());
    if let Some(dir) = &day.opts.data_dir {
        if let Err(e) = linger_off(dir, &day.opts.accounts) {
            tracing::warn!(error = %e, "bench day: could not turn linger off for the sweep");
        }
    }
    let sweep_end = Instant::now() + day.opts.sweep_timeout;
    loop {
        let round: Vec<_> = customers
            .iter()
            .map(|c| {
                let (c, day) = (c.clone(), day.clone());
                tokio::task::spawn_local(async move { c.session(&day).await })
            })
            .collect();
        let mut quiet = true;
        for t in round {
            quiet &= matches!(t.await, Ok(Ended::NothingHeld));
        }
        quiet &= customers.iter().all(|c| c.submitted.borrow().is_empty());
        if quiet || Instant::now() >= sweep_end {
            if !quiet {
                tracing::warn!("bench day: sweep timed out with mail still held");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Outgoing mail never uploaded was never accepted.
    for c in &customers {
        for (id, _) in c.submitted.borrow_mut().drain(..) {
            day.ledger
                .borrow_mut()
                .mx_settled(&id, false, false, Instant::now());
        }
        if let Some(outbox) = &c.outbox {
            outbox.close().await;
        }
    }
    let end = Instant::now();
    let elapsed = end.duration_since(start).as_secs_f64();
    let day = Rc::try_unwrap(day).map_err(|_| DayError::Setup("tasks still running".into()))?;
    let mut r = Report::new("day", started_ms);
    r.settings = settings(&day.opts);
    let rec = Rc::try_unwrap(day.rec).map_err(|_| DayError::Setup("tasks still running".into()))?;
    let (mut phases, timeline, latency_us) = rec.into_inner().finish(end);
    if let Some(s) = sampler {
        let server = s.finish(elapsed);
        for p in &mut phases {
            p.server = Some(procstat::phase_figures(
                &server,
                p.start_s,
                p.start_s + p.elapsed_s,
            ));
        }
        r.server = Some(server);
    }
    r.elapsed_s = elapsed;
    r.phases = phases;
    r.timeline = timeline;
    r.latency_us = latency_us;
    r.verification = Some(day.ledger.into_inner().verify());
    let cpu = report::process_cpu_s() - cpu0;
    r.client = Cpu {
        cpu_s: cpu,
        cpu_cores: cpu / elapsed.max(1e-9),
    };
    let _ = std::fs::remove_dir_all(&day.opts.work_dir);
    Ok(r)
}

fn settings(o: &DayOptions) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        s.insert(k.to_string(), v);
    };
    put("mx", o.mx.to_string());
    put("odmr", o.odmr.to_string());
    put("customers", o.accounts.len().to_string());
    put(
        "lingering",
        o.accounts.iter().filter(|a| a.linger).count().to_string(),
    );
    put("senders", o.senders.to_string());
    put("per_connection", o.per_connection.to_string());
    put("rate", o.rate.to_string());
    put("duration", format!("{}s", o.duration.as_secs_f64()));
    put("time_scale", o.time_scale.to_string());
    put("size", o.sizes.describe());
    put("reply_mix", o.mix.describe());
    put("submitters", o.submitters.to_string());
    put("linger_idle", format!("{}s", o.linger_idle.as_secs_f64()));
    put("seed", o.seed.to_string());
    put("run_id", o.run_id.clone());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_mix_and_accounts_file() {
        let m = ReplyMix::parse("250=90,451=6,554=4").unwrap();
        let mut rng = Rng::new(5);
        let picks: Vec<u16> = (0..10_000).map(|_| m.pick(&mut rng)).collect();
        let ok = picks.iter().filter(|&&c| c == 250).count();
        assert!((8_800..9_200).contains(&ok), "{ok}");
        assert!(picks.contains(&451) && picks.contains(&554));
        assert!(ReplyMix::parse("299=1").is_err());
        assert!(ReplyMix::parse("250=0").is_err());
        let a = parse_accounts("# c\nalice pw a.test,b.test linger\nbob pw2 c.test\n").unwrap();
        assert_eq!(a.len(), 2);
        assert!(a[0].linger && !a[1].linger);
        assert_eq!(a[0].domains.len(), 2);
        assert!(parse_accounts("alice pw").is_err());
        assert!(parse_accounts("alice pw a.test sometimes").is_err());
    }
}
