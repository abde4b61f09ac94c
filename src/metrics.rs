//! Metrics: per-core counters and latency histograms, merged on scrape, served as Prometheus
//! text.
//!
//! Each core owns a [`CoreMetrics`] and is the only writer of it, so the counters are plain
//! integers and the histograms plain [`hdrhistogram::Histogram`]s: recording costs an add, no
//! atomics and no shared cache lines. When the scraper wants numbers it asks every core for a
//! [`Snapshot`] (a `Send` copy), [`Snapshot::merge`]s them into one, and hands the result to
//! [`render`] together with the per-domain [`DomainGauge`]s and the [`ServerInfo`]. The text
//! is in the Prometheus exposition format 0.0.4; [`serve_http`] puts it behind a minimal
//! blocking HTTP/1.1 endpoint at `GET /metrics`.
//!
//! Latencies are recorded in microseconds (1 us to 1 h, 3 significant digits; longer values
//! are clamped to 1 h) and exposed as Prometheus summaries in seconds, with the quantiles
//! 0.5, 0.9, 0.99 and 0.999 plus `_sum` and `_count`. `_sum` is exact (kept beside the
//! histogram), the quantiles carry the histogram's 0.1% precision.

use std::fmt::{self, Write as _};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Lowest discernible latency, in microseconds.
const LATENCY_LOW_US: u64 = 1;
/// Highest trackable latency, in microseconds (one hour); longer values are clamped to it.
const LATENCY_HIGH_US: u64 = 3_600_000_000;
/// Significant decimal digits kept by the latency histograms.
const LATENCY_SIGFIG: u8 = 3;
/// The quantiles every summary exposes.
const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// The service a connection was accepted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Inbound SMTP for hosted domains.
    Mx,
    /// ODMR, where customers authenticate and send ATRN.
    Odmr,
    /// Message submission with STARTTLS.
    Submission,
    /// Message submission over implicit TLS.
    Submissions,
}

impl Service {
    /// Every service, in label order.
    pub const ALL: [Service; 4] = [
        Service::Mx,
        Service::Odmr,
        Service::Submission,
        Service::Submissions,
    ];

    /// The `service` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Service::Mx => "mx",
            Service::Odmr => "odmr",
            Service::Submission => "submission",
            Service::Submissions => "submissions",
        }
    }
}

/// The class of a refusing reply: transient (4xx) or permanent (5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyClass {
    /// 4xx: try again later.
    Transient,
    /// 5xx: do not try again.
    Permanent,
}

impl ReplyClass {
    /// Both classes, in label order.
    pub const ALL: [ReplyClass; 2] = [ReplyClass::Transient, ReplyClass::Permanent];

    /// The class of a reply code, or `None` if the code does not refuse (2xx, 3xx or
    /// out of range).
    pub fn of_code(code: u16) -> Option<ReplyClass> {
        match code {
            400..=499 => Some(ReplyClass::Transient),
            500..=599 => Some(ReplyClass::Permanent),
            _ => None,
        }
    }

    /// The `class` label value: `4xx` or `5xx`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyClass::Transient => "4xx",
            ReplyClass::Permanent => "5xx",
        }
    }
}

/// How an `ATRN` command was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AtrnResult {
    /// 250: the connection turns around.
    Accepted,
    /// 450: the customer may not request (one of) the domains asked for.
    NotAuthorized,
    /// 453: nothing is held for the domains asked for.
    NoMail,
    /// Another session is already draining one of the domains.
    Busy,
    /// The customer asked too often.
    RateLimited,
    /// The provider could not serve the request (shutting down, storage trouble).
    Unavailable,
    /// 501: the argument did not parse.
    Syntax,
    /// 530: `ATRN` before successful authentication.
    Unauthenticated,
    /// 250, but the session delivered nothing: every message it reached was damaged and
    /// quarantined (set after the reversal, for the domain gauge).
    Damaged,
}

impl AtrnResult {
    /// Every result, in label order.
    pub const ALL: [AtrnResult; 9] = [
        AtrnResult::Accepted,
        AtrnResult::NotAuthorized,
        AtrnResult::NoMail,
        AtrnResult::Busy,
        AtrnResult::RateLimited,
        AtrnResult::Unavailable,
        AtrnResult::Syntax,
        AtrnResult::Unauthenticated,
        AtrnResult::Damaged,
    ];

    /// The `result` label value (also suitable for [`DomainGauge::last_atrn_result`]).
    pub fn as_str(self) -> &'static str {
        match self {
            AtrnResult::Accepted => "accepted",
            AtrnResult::NotAuthorized => "not_authorized",
            AtrnResult::NoMail => "no_mail",
            AtrnResult::Busy => "busy",
            AtrnResult::RateLimited => "rate_limited",
            AtrnResult::Unavailable => "unavailable",
            AtrnResult::Syntax => "syntax",
            AtrnResult::Unauthenticated => "unauthenticated",
            AtrnResult::Damaged => "damaged",
        }
    }
}

/// What became of one message handed over in a reversed (post-`ATRN`) session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryOutcome {
    /// The customer accepted it; it leaves the journal.
    Delivered,
    /// The customer refused it transiently; it stays held.
    Deferred,
    /// The customer refused it permanently; it is bounced to its sender.
    Bounced,
}

/// A latency distribution: an HDR histogram in microseconds plus the exact sum.
#[derive(Clone)]
pub struct Latency {
    hist: Histogram<u64>,
    sum_us: u64,
}

impl Latency {
    fn new() -> Latency {
        let hist = Histogram::new_with_bounds(LATENCY_LOW_US, LATENCY_HIGH_US, LATENCY_SIGFIG)
            .expect("constant histogram bounds are valid");
        Latency { hist, sum_us: 0 }
    }

    fn record(&mut self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .min(LATENCY_HIGH_US);
        self.hist.saturating_record(us);
        self.sum_us = self.sum_us.saturating_add(us);
    }

    fn merge(&mut self, other: &Latency) {
        // Both sides have the same bounds and every value was clamped into them, so adding
        // cannot fail; should it ever, keep the counts we have rather than lose the scrape.
        if let Err(e) = self.hist.add(&other.hist) {
            tracing::warn!(error = ?e, "metrics: could not merge latency histograms");
            return;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// The histogram, in microseconds.
    pub fn histogram(&self) -> &Histogram<u64> {
        &self.hist
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The exact sum of the recorded latencies, in microseconds (each clamped to 1 h).
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// The latency at `quantile` (0.0 to 1.0), in microseconds; 0 when nothing was recorded.
    pub fn quantile_us(&self, quantile: f64) -> u64 {
        self.hist.value_at_quantile(quantile)
    }
}

impl fmt::Debug for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Latency")
            .field("count", &self.count())
            .field("sum_us", &self.sum_us)
            .field("p50_us", &self.quantile_us(0.5))
            .field("max_us", &self.hist.max())
            .finish()
    }
}

/// A copy of one core's metrics (or the merge of several), sent to the scraper.
///
/// Each histogram holds about 190 KB of buckets, so a snapshot is a few hundred kilobytes:
/// cheap once per scrape, not something to take per message.
#[derive(Debug, Clone)]
pub struct Snapshot {
    connections_accepted: [u64; Service::ALL.len()],
    connections_refused: u64,
    messages_held: u64,
    bytes_held_in: u64,
    replies_refused: [u64; ReplyClass::ALL.len()],
    auth_success: u64,
    auth_failure: u64,
    atrn: [u64; AtrnResult::ALL.len()],
    delivered: u64,
    deferred: u64,
    bounced: u64,
    expired: u64,
    atrn_decision: Latency,
    delivery: Latency,
    accept: Latency,
    /// The store on a bad day: full disk, damage, scrub.
    pub store: StoreMetrics,
}

impl Default for Snapshot {
    fn default() -> Snapshot {
        Snapshot::new()
    }
}

fn add_all<const N: usize>(into: &mut [u64; N], from: &[u64; N]) {
    for (a, b) in into.iter_mut().zip(from) {
        *a = a.wrapping_add(*b);
    }
}

impl Snapshot {
    /// An empty snapshot: every counter zero, every histogram empty. The starting point of
    /// a merge.
    pub fn new() -> Snapshot {
        Snapshot {
            connections_accepted: [0; Service::ALL.len()],
            connections_refused: 0,
            messages_held: 0,
            bytes_held_in: 0,
            replies_refused: [0; ReplyClass::ALL.len()],
            auth_success: 0,
            auth_failure: 0,
            atrn: [0; AtrnResult::ALL.len()],
            delivered: 0,
            deferred: 0,
            bounced: 0,
            expired: 0,
            atrn_decision: Latency::new(),
            delivery: Latency::new(),
            accept: Latency::new(),
            store: StoreMetrics::default(),
        }
    }

    /// Adds `other`'s counters and histograms into `self`.
    pub fn merge(&mut self, other: &Snapshot) {
        add_all(&mut self.connections_accepted, &other.connections_accepted);
        self.connections_refused = self
            .connections_refused
            .wrapping_add(other.connections_refused);
        self.messages_held = self.messages_held.wrapping_add(other.messages_held);
        self.bytes_held_in = self.bytes_held_in.wrapping_add(other.bytes_held_in);
        add_all(&mut self.replies_refused, &other.replies_refused);
        self.auth_success = self.auth_success.wrapping_add(other.auth_success);
        self.auth_failure = self.auth_failure.wrapping_add(other.auth_failure);
        add_all(&mut self.atrn, &other.atrn);
        self.delivered = self.delivered.wrapping_add(other.delivered);
        self.deferred = self.deferred.wrapping_add(other.deferred);
        self.bounced = self.bounced.wrapping_add(other.bounced);
        self.expired = self.expired.wrapping_add(other.expired);
        self.atrn_decision.merge(&other.atrn_decision);
        self.delivery.merge(&other.delivery);
        self.accept.merge(&other.accept);
        self.store.merge(&other.store);
    }

    /// Connections accepted on `service`.
    pub fn connections_accepted(&self, service: Service) -> u64 {
        self.connections_accepted[service as usize]
    }

    /// Connections refused before a greeting (limits, shutdown), on any service.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused
    }

    /// Messages accepted and held (committed to the journal).
    pub fn messages_held(&self) -> u64 {
        self.messages_held
    }

    /// Bytes of the messages counted by [`Snapshot::messages_held`].
    pub fn bytes_held_in(&self) -> u64 {
        self.bytes_held_in
    }

    /// Refusing replies (4xx or 5xx) sent to clients.
    pub fn replies_refused(&self, class: ReplyClass) -> u64 {
        self.replies_refused[class as usize]
    }

    /// Successful authentications.
    pub fn auth_success(&self) -> u64 {
        self.auth_success
    }

    /// Failed authentications.
    pub fn auth_failure(&self) -> u64 {
        self.auth_failure
    }

    /// `ATRN` commands answered with `result`.
    pub fn atrn(&self, result: AtrnResult) -> u64 {
        self.atrn[result as usize]
    }

    /// Messages the customer accepted in a reversed session.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Messages the customer refused transiently (still held).
    pub fn deferred(&self) -> u64 {
        self.deferred
    }

    /// Messages the customer refused permanently (bounced).
    pub fn bounced(&self) -> u64 {
        self.bounced
    }

    /// Messages dropped from the journal because they were held too long.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// From `ATRN` received to its reply decided.
    pub fn atrn_decision(&self) -> &Latency {
        &self.atrn_decision
    }

    /// Per message handed over in a reversed session, from `MAIL FROM` to the final reply.
    pub fn delivery(&self) -> &Latency {
        &self.delivery
    }

    /// From end of data to the `250` (group commit latency).
    pub fn accept(&self) -> &Latency {
        &self.accept
    }
}

/// How the held-mail store is doing: counters the cores bump, and gauges each core sets just
/// before it answers a scrape (merged by summing, so a gauge counts cores or parts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreMetrics {
    /// Refusals because the disk was full (`452 4.3.1` at RCPT or at the end of data).
    pub storage_refused: u64,
    /// Finished parts whose DONE record could not be written (they come back after a
    /// restart: at-least-once).
    pub dones_unrecorded: u64,
    /// Gauge: journal writers short of disk space (refusing new mail).
    pub journals_short: u64,
    /// Gauge: journal writers poisoned by a failed write or fdatasync (restart needed).
    pub journals_poisoned: u64,
    /// Gauge: bytes free for the service user on the data directory's file system, set by
    /// the scraper.
    pub free_bytes: Option<u64>,
    /// Parts quarantined because their stored copy failed its checksum.
    pub quarantined_total: u64,
    /// Gauge: parts in quarantine now.
    pub quarantined: u64,
    /// Body bytes the background scrub verified.
    pub scrub_bytes: u64,
    /// Messages the background scrub found damaged.
    pub scrub_damaged: u64,
    /// Complete scrub passes over a journal's older segments.
    pub scrub_passes: u64,
    /// Gauge: when the last scrub pass ended, unix seconds (latest over the cores).
    pub scrub_last_pass: Option<u64>,
}

impl StoreMetrics {
    fn merge(&mut self, o: &StoreMetrics) {
        self.storage_refused = self.storage_refused.wrapping_add(o.storage_refused);
        self.dones_unrecorded = self.dones_unrecorded.wrapping_add(o.dones_unrecorded);
        self.journals_short += o.journals_short;
        self.journals_poisoned += o.journals_poisoned;
        self.free_bytes = self.free_bytes.max(o.free_bytes);
        self.quarantined_total = self.quarantined_total.wrapping_add(o.quarantined_total);
        self.quarantined += o.quarantined;
        self.scrub_bytes = self.scrub_bytes.wrapping_add(o.scrub_bytes);
        self.scrub_damaged = self.scrub_damaged.wrapping_add(o.scrub_damaged);
        self.scrub_passes = self.scrub_passes.wrapping_add(o.scrub_passes);
        self.scrub_last_pass = self.scrub_last_pass.max(o.scrub_last_pass);
    }
}

fn render_store(out: &mut String, s: &StoreMetrics) {
    counter(
        out,
        "turnpike_storage_refused_total",
        "Mail refused because the disk was full (452 4.3.1).",
        s.storage_refused,
    );
    counter(
        out,
        "turnpike_done_unrecorded_total",
        "Finished parts whose DONE record could not be written (offered again after a restart).",
        s.dones_unrecorded,
    );
    let gauges = [
        (
            "turnpike_journal_short_of_space",
            "Journal writers short of disk space, refusing new mail.",
            s.journals_short,
        ),
        (
            "turnpike_journal_poisoned",
            "Journal writers stopped by a failed write or fdatasync; restart needed.",
            s.journals_poisoned,
        ),
        (
            "turnpike_quarantined_parts",
            "Held parts in quarantine (stored copy damaged), waiting for the operator.",
            s.quarantined,
        ),
    ];
    for (name, help, v) in gauges {
        header(out, name, "gauge", help);
        sample(out, name, &[], v);
    }
    if let Some(free) = s.free_bytes {
        let name = "turnpike_spool_free_bytes";
        header(
            out,
            name,
            "gauge",
            "Bytes free for the service user on the data directory's file system.",
        );
        sample(out, name, &[], free);
    }
    counter(
        out,
        "turnpike_quarantined_total",
        "Held parts quarantined because their stored copy failed its checksum.",
        s.quarantined_total,
    );
    counter(
        out,
        "turnpike_scrub_bytes_total",
        "Stored body bytes verified by the background scrub.",
        s.scrub_bytes,
    );
    counter(
        out,
        "turnpike_scrub_damaged_total",
        "Held messages the background scrub found damaged.",
        s.scrub_damaged,
    );
    counter(
        out,
        "turnpike_scrub_passes_total",
        "Complete scrub passes over the older journal segments.",
        s.scrub_passes,
    );
    if let Some(t) = s.scrub_last_pass {
        let name = "turnpike_scrub_last_pass_timestamp_seconds";
        header(out, name, "gauge", "When the last scrub pass ended (Unix).");
        sample(out, name, &[], t);
    }
}

/// One core's metrics. Only the owning core writes them; the scraper gets a
/// [`CoreMetrics::snapshot`].
#[derive(Debug, Clone, Default)]
pub struct CoreMetrics {
    s: Snapshot,
}

impl CoreMetrics {
    /// Zeroed metrics.
    pub fn new() -> CoreMetrics {
        CoreMetrics { s: Snapshot::new() }
    }

    /// A connection was accepted on `service`.
    pub fn connection_accepted(&mut self, service: Service) {
        self.s.connections_accepted[service as usize] += 1;
    }

    /// A connection was refused before its greeting.
    pub fn connection_refused(&mut self) {
        self.s.connections_refused += 1;
    }

    /// A message of `bytes` was committed and is now held.
    pub fn message_held(&mut self, bytes: u64) {
        self.s.messages_held += 1;
        self.s.bytes_held_in = self.s.bytes_held_in.wrapping_add(bytes);
    }

    /// A refusing reply of `class` was sent.
    pub fn reply_refused(&mut self, class: ReplyClass) {
        self.s.replies_refused[class as usize] += 1;
    }

    /// A reply with `code` was sent; counted only if it refuses (4xx or 5xx).
    pub fn reply_sent(&mut self, code: u16) {
        if let Some(class) = ReplyClass::of_code(code) {
            self.reply_refused(class);
        }
    }

    /// An authentication succeeded.
    pub fn auth_succeeded(&mut self) {
        self.s.auth_success += 1;
    }

    /// An authentication failed.
    pub fn auth_failed(&mut self) {
        self.s.auth_failure += 1;
    }

    /// An `ATRN` was answered with `result`, `elapsed` after it was received.
    pub fn record_atrn(&mut self, result: AtrnResult, elapsed: Duration) {
        self.s.atrn[result as usize] += 1;
        self.s.atrn_decision.record(elapsed);
    }

    /// A message was handed over in a reversed session with `outcome`, taking `elapsed`.
    pub fn record_delivery(&mut self, outcome: DeliveryOutcome, elapsed: Duration) {
        match outcome {
            DeliveryOutcome::Delivered => self.s.delivered += 1,
            DeliveryOutcome::Deferred => self.s.deferred += 1,
            DeliveryOutcome::Bounced => self.s.bounced += 1,
        }
        self.s.delivery.record(elapsed);
    }

    /// A message was bounced outside a reversed session (no delivery latency to record).
    pub fn message_bounced(&mut self) {
        self.s.bounced += 1;
    }

    /// A held message expired.
    pub fn message_expired(&mut self) {
        self.s.expired += 1;
    }

    /// A message was acknowledged `elapsed` after its end of data (group commit latency).
    pub fn record_accept(&mut self, elapsed: Duration) {
        self.s.accept.record(elapsed);
    }

    /// The store's counters, for the core to bump.
    pub fn store_mut(&mut self) -> &mut StoreMetrics {
        &mut self.s.store
    }

    /// A copy to send to the scraper.
    pub fn snapshot(&self) -> Snapshot {
        self.s.clone()
    }

    /// The live numbers, read in place.
    pub fn current(&self) -> &Snapshot {
        &self.s
    }
}

/// Per-domain state, gathered by the caller from the domain index at scrape time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainGauge {
    /// The hosted domain.
    pub domain: String,
    /// Messages held for it now.
    pub held_messages: u64,
    /// Bytes held for it now.
    pub held_bytes: u64,
    /// When its oldest held message arrived (Unix seconds); `None` when nothing is held.
    pub oldest_unix: Option<u64>,
    /// When it last sent `ATRN` (Unix seconds), if ever since start.
    pub last_atrn_unix: Option<u64>,
    /// How that `ATRN` was answered (see [`AtrnResult::as_str`]).
    pub last_atrn_result: Option<&'static str>,
    /// Messages delivered to it since start (monotonic; rendered as a counter).
    pub delivered: u64,
    /// Delivery deferrals since start (monotonic; rendered as a counter).
    pub deferred: u64,
    /// Messages bounced since start (monotonic; rendered as a counter).
    pub bounced: u64,
}

impl DomainGauge {
    /// A domain with nothing held and no history yet.
    pub fn new(domain: impl Into<String>) -> Self {
        DomainGauge {
            domain: domain.into(),
            held_messages: 0,
            held_bytes: 0,
            oldest_unix: None,
            last_atrn_unix: None,
            last_atrn_result: None,
            delivered: 0,
            deferred: 0,
            bounced: 0,
        }
    }
}

/// Facts about the running server, rendered as `turnpike_build_info` and `turnpike_cores`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerInfo<'a> {
    /// The crate version.
    pub version: &'a str,
    /// The I/O driver in use (`io_uring` or `epoll`).
    pub io_driver: &'a str,
    /// How many cores serve.
    pub cores: usize,
}

/// Escapes a label value per the text format: `\` , `"` and newline.
fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a family.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one sample line; `labels` are (name, unescaped value) pairs.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label(v, out);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    sample(out, name, &[], value);
}

fn summary(out: &mut String, name: &str, help: &str, latency: &Latency) {
    header(out, name, "summary", help);
    for q in QUANTILES {
        let q_label = q.to_string();
        if latency.count() == 0 {
            sample(out, name, &[("quantile", &q_label)], "NaN");
        } else {
            let secs = latency.quantile_us(q) as f64 / 1e6;
            sample(out, name, &[("quantile", &q_label)], secs);
        }
    }
    let sum = latency.sum_us() as f64 / 1e6;
    sample(out, &format!("{name}_sum"), &[], sum);
    sample(out, &format!("{name}_count"), &[], latency.count());
}

/// Renders the merged metrics, the per-domain gauges and the server info in the Prometheus
/// text exposition format 0.0.4.
///
/// Every family gets one `# HELP` and one `# TYPE` line, even when it has no samples (no
/// domains). Domains are rendered in the order given.
pub fn render(merged: &Snapshot, domains: &[DomainGauge], info: &ServerInfo<'_>) -> String {
    let mut out = String::with_capacity(4096 + domains.len() * 640);
    let s = merged;

    header(
        &mut out,
        "turnpike_build_info",
        "gauge",
        "Always 1; the labels describe the running server.",
    );
    sample(
        &mut out,
        "turnpike_build_info",
        &[("version", info.version), ("io_driver", info.io_driver)],
        1,
    );
    header(
        &mut out,
        "turnpike_cores",
        "gauge",
        "Cores serving connections.",
    );
    sample(&mut out, "turnpike_cores", &[], info.cores);

    let name = "turnpike_connections_accepted_total";
    header(
        &mut out,
        name,
        "counter",
        "Connections accepted, by service.",
    );
    for service in Service::ALL {
        let v = s.connections_accepted(service);
        sample(&mut out, name, &[("service", service.as_str())], v);
    }
    counter(
        &mut out,
        "turnpike_connections_refused_total",
        "Connections refused before the greeting (limits, shutdown).",
        s.connections_refused,
    );
    counter(
        &mut out,
        "turnpike_messages_held_total",
        "Messages accepted and committed to the journal.",
        s.messages_held,
    );
    counter(
        &mut out,
        "turnpike_held_in_bytes_total",
        "Bytes of the messages accepted and committed to the journal.",
        s.bytes_held_in,
    );
    let name = "turnpike_replies_refused_total";
    header(
        &mut out,
        name,
        "counter",
        "Refusing replies sent, by class.",
    );
    for class in ReplyClass::ALL {
        sample(
            &mut out,
            name,
            &[("class", class.as_str())],
            s.replies_refused(class),
        );
    }
    let name = "turnpike_auth_total";
    header(
        &mut out,
        name,
        "counter",
        "Authentication attempts, by result.",
    );
    sample(&mut out, name, &[("result", "success")], s.auth_success);
    sample(&mut out, name, &[("result", "failure")], s.auth_failure);
    let name = "turnpike_atrn_total";
    header(
        &mut out,
        name,
        "counter",
        "ATRN commands answered, by result.",
    );
    for result in AtrnResult::ALL {
        sample(
            &mut out,
            name,
            &[("result", result.as_str())],
            s.atrn(result),
        );
    }
    counter(
        &mut out,
        "turnpike_messages_delivered_total",
        "Messages the customer accepted in a reversed session.",
        s.delivered,
    );
    counter(
        &mut out,
        "turnpike_messages_deferred_total",
        "Messages the customer refused transiently in a reversed session.",
        s.deferred,
    );
    counter(
        &mut out,
        "turnpike_messages_bounced_total",
        "Messages bounced to their sender.",
        s.bounced,
    );
    counter(
        &mut out,
        "turnpike_messages_expired_total",
        "Held messages that expired.",
        s.expired,
    );

    summary(
        &mut out,
        "turnpike_atrn_decision_seconds",
        "Time from ATRN received to its reply decided.",
        &s.atrn_decision,
    );
    summary(
        &mut out,
        "turnpike_delivery_seconds",
        "Time to hand over one message in a reversed session.",
        &s.delivery,
    );
    summary(
        &mut out,
        "turnpike_accept_seconds",
        "Time from end of data to 250 (group commit latency).",
        &s.accept,
    );

    type Field = fn(&DomainGauge) -> Option<u64>;
    let gauges: [(&str, &str, &str, Field); 7] = [
        (
            "turnpike_domain_held_messages",
            "gauge",
            "Messages held for the domain.",
            |d| Some(d.held_messages),
        ),
        (
            "turnpike_domain_held_bytes",
            "gauge",
            "Bytes held for the domain.",
            |d| Some(d.held_bytes),
        ),
        (
            "turnpike_domain_oldest_held_timestamp_seconds",
            "gauge",
            "Arrival time (Unix) of the oldest message held for the domain.",
            |d| d.oldest_unix,
        ),
        (
            "turnpike_domain_last_atrn_timestamp_seconds",
            "gauge",
            "Time (Unix) of the domain's last ATRN.",
            |d| d.last_atrn_unix,
        ),
        (
            "turnpike_domain_delivered_total",
            "counter",
            "Messages delivered to the domain.",
            |d| Some(d.delivered),
        ),
        (
            "turnpike_domain_deferred_total",
            "counter",
            "Delivery deferrals for the domain.",
            |d| Some(d.deferred),
        ),
        (
            "turnpike_domain_bounced_total",
            "counter",
            "Messages for the domain bounced to their sender.",
            |d| Some(d.bounced),
        ),
    ];
    for (name, kind, help, field) in gauges {
        header(&mut out, name, kind, help);
        for d in domains {
            if let Some(v) = field(d) {
                sample(&mut out, name, &[("domain", &d.domain)], v);
            }
        }
    }
    let name = "turnpike_domain_last_atrn_result";
    header(
        &mut out,
        name,
        "gauge",
        "Always 1; the result label is how the domain's last ATRN was answered.",
    );
    for d in domains {
        if let Some(result) = d.last_atrn_result {
            sample(
                &mut out,
                name,
                &[("domain", &d.domain), ("result", result)],
                1,
            );
        }
    }
    render_store(&mut out, &s.store);
    out
}

/// Largest request head read; longer ones get 431.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request head, and to take the response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The scrape content type of the text format 0.0.4.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics` on `listener` from a new thread, answering each request with the
/// text `scrape` returns.
///
/// A deliberately tiny HTTP/1.1 server: one request per connection (`Connection: close`),
/// connections handled one at a time (so `scrape` need not be `Sync`), the request head
/// bounded to 8 KiB and 5 s. `GET` and `HEAD` of `/metrics` (any query string) get 200,
/// other paths 404, other methods 405, malformed requests 400, oversized ones 431. If
/// `scrape` panics the client gets 500 and the server keeps serving. The thread runs for
/// the life of the process; the error is only that of spawning it.
pub fn serve_http(
    listener: TcpListener,
    scrape: impl Fn() -> String + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = handle_connection(stream, &scrape) {
                            tracing::debug!(error = %e, "metrics: connection failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics: accept failed");
                        // Out of descriptors and the like: do not spin.
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET` (or `HEAD`, when `head_only`) of the given path, query stripped.
    Get { path: String, head_only: bool },
    /// Any other method.
    OtherMethod,
    /// Not an HTTP/1.x request line.
    Malformed,
}

fn parse_request(head: &[u8]) -> Request {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Malformed;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed;
    };
    if method.is_empty() || target.is_empty() || !version.starts_with("HTTP/1.") {
        return Request::Malformed;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::OtherMethod,
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    Request::Get {
        path: path.to_owned(),
        head_only,
    }
}

/// Reads the request head (through the blank line) within the size and time bounds.
/// `Ok(None)` means it grew past [`MAX_REQUEST`].
fn read_head(stream: &mut TcpStream, deadline: Instant) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(remaining))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Look for the end from a little before the new bytes, in case it straddles reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        let lf = head[from..]
            .windows(2)
            .position(|w| w == b"\n\n")
            .map(|i| from + i + 2);
        let crlf = head[from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| from + i + 4);
        let end = match (lf, crlf) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(end) = end {
            if end > MAX_REQUEST {
                return Ok(None);
            }
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

fn handle_connection(mut stream: TcpStream, scrape: &impl Fn() -> String) -> io::Result<()> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let head = match read_head(&mut stream, deadline) {
        Ok(Some(head)) => head,
        Ok(None) => {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                &[],
                "",
                false,
            );
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            return respond(&mut stream, "408 Request Timeout", &[], "", false);
        }
        Err(e) => return Err(e),
    };
    match parse_request(&head) {
        Request::Malformed => respond(&mut stream, "400 Bad Request", &[], "bad request\n", false),
        Request::OtherMethod => respond(
            &mut stream,
            "405 Method Not Allowed",
            &[("Allow", "GET, HEAD")],
            "method not allowed\n",
            false,
        ),
        Request::Get { path, head_only } if path == "/metrics" => {
            match panic::catch_unwind(AssertUnwindSafe(scrape)) {
                Ok(body) => respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Type", CONTENT_TYPE)],
                    &body,
                    head_only,
                ),
                Err(_) => {
                    tracing::error!("metrics: scrape panicked");
                    respond(&mut stream, "500 Internal Server Error", &[], "", head_only)
                }
            }
        }
        Request::Get { head_only, .. } => {
            respond(&mut stream, "404 Not Found", &[], "not found\n", head_only)
        }
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, &str)],
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    let mut has_type = false;
    for (k, v) in headers {
        has_type |= k.eq_ignore_ascii_case("content-type");
        let _ = write!(head, "{k}: {v}\r\n");
    }
    if !has_type {
        head.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    let _ = write!(
        head,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()?;
    // Closing with unread request bytes (a POST body) would reset the connection and could
    // destroy the response in flight: half-close, then drain briefly before dropping.
    stream.shutdown(Shutdown::Write)?;
    let drain_until = Instant::now() + Duration::from_millis(500);
    let mut sink = [0u8; 1024];
    let mut drained = 0;
    while drained < 64 * 1024 {
        let remaining = drain_until.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(remaining))?;
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn two_cores() -> (CoreMetrics, CoreMetrics) {
        let mut a = CoreMetrics::new();
        a.connection_accepted(Service::Mx);
        a.connection_accepted(Service::Mx);
        a.connection_accepted(Service::Odmr);
        a.connection_refused();
        a.message_held(1000);
        a.reply_refused(ReplyClass::Transient);
        a.reply_sent(250);
        a.reply_sent(554);
        a.auth_succeeded();
        a.record_atrn(AtrnResult::Accepted, ms(2));
        a.record_delivery(DeliveryOutcome::Delivered, ms(10));
        a.record_accept(ms(1));
        a.message_expired();

        let mut b = CoreMetrics::new();
        b.connection_accepted(Service::Mx);
        b.connection_accepted(Service::Submissions);
        b.message_held(500);
        b.message_held(24);
        b.reply_sent(421);
        b.auth_failed();
        b.auth_failed();
        b.record_atrn(AtrnResult::NoMail, ms(4));
        b.record_atrn(AtrnResult::Accepted, ms(6));
        b.record_delivery(DeliveryOutcome::Deferred, ms(20));
        b.record_delivery(DeliveryOutcome::Bounced, ms(30));
        b.message_bounced();
        for _ in 0..3 {
            b.record_accept(ms(3));
        }
        // Longer than the histogram's range: clamped, not lost.
        b.record_accept(Duration::from_secs(2 * 3600));
        (a, b)
    }

    #[test]
    fn merge_adds_counters_and_histograms() {
        let (a, b) = two_cores();
        let mut m = Snapshot::new();
        m.merge(&a.snapshot());
        m.merge(&b.snapshot());

        assert_eq!(m.connections_accepted(Service::Mx), 3);
        assert_eq!(m.connections_accepted(Service::Odmr), 1);
        assert_eq!(m.connections_accepted(Service::Submission), 0);
        assert_eq!(m.connections_accepted(Service::Submissions), 1);
        assert_eq!(m.connections_refused(), 1);
        assert_eq!(m.messages_held(), 3);
        assert_eq!(m.bytes_held_in(), 1524);
        assert_eq!(m.replies_refused(ReplyClass::Transient), 2);
        assert_eq!(m.replies_refused(ReplyClass::Permanent), 1);
        assert_eq!((m.auth_success(), m.auth_failure()), (1, 2));
        assert_eq!(m.atrn(AtrnResult::Accepted), 2);
        assert_eq!(m.atrn(AtrnResult::NoMail), 1);
        assert_eq!(m.atrn(AtrnResult::Busy), 0);
        assert_eq!(
            (m.delivered(), m.deferred(), m.bounced(), m.expired()),
            (1, 1, 2, 1)
        );

        assert_eq!(m.atrn_decision().count(), 3);
        assert_eq!(m.atrn_decision().sum_us(), 12_000);
        let median = m.atrn_decision().quantile_us(0.5);
        assert!((3_990..=4_010).contains(&median), "median {median}");
        assert_eq!(m.delivery().count(), 3);
        assert_eq!(m.delivery().sum_us(), 60_000);
        assert_eq!(m.accept().count(), 5);
        assert_eq!(m.accept().sum_us(), 10_000 + LATENCY_HIGH_US);
        let max = m.accept().quantile_us(1.0);
        assert!((LATENCY_HIGH_US..=LATENCY_HIGH_US + LATENCY_HIGH_US / 1000).contains(&max));

        // The sources are untouched, and merge order does not matter.
        assert_eq!(a.current().messages_held(), 1);
        let mut r = b.snapshot();
        r.merge(&a.snapshot());
        assert_eq!(render_default(&r), render_default(&m));
    }

    fn render_default(s: &Snapshot) -> String {
        let info = ServerInfo {
            version: "0.1.0",
            io_driver: "epoll",
            cores: 2,
        };
        render(s, &[], &info)
    }

    #[test]
    fn snapshot_is_send() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<Snapshot>();
    }

    /// Parses one sample line into (name, labels, value), undoing label escapes; panics on
    /// anything the text format does not allow.
    fn parse_sample(line: &str) -> (String, Vec<(String, String)>, f64) {
        let ident = |s: &str, colon: bool| {
            !s.is_empty()
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
        };
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = &line[..name_end];
        assert!(ident(name, true), "bad name: {line:?}");
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(mut r) = rest.strip_prefix('{') {
            loop {
                let eq = r
                    .find('=')
                    .unwrap_or_else(|| panic!("label without =: {line:?}"));
                let key = &r[..eq];
                assert!(ident(key, false), "bad label name {key:?} in {line:?}");
                let body = r[eq + 1..]
                    .strip_prefix('"')
                    .unwrap_or_else(|| panic!("unquoted value in {line:?}"));
                let mut value = String::new();
                let mut chars = body.char_indices();
                let close = loop {
                    match chars.next() {
                        None => panic!("unterminated value in {line:?}"),
                        Some((_, '\\')) => match chars.next().map(|x| x.1) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            c => panic!("bad escape {c:?} in {line:?}"),
                        },
                        Some((i, '"')) => break i,
                        Some((_, '\n')) => panic!("raw newline in {line:?}"),
                        Some((_, c)) => value.push(c),
                    }
                };
                labels.push((key.to_owned(), value));
                let after = &body[close + 1..];
                if let Some(more) = after.strip_prefix(',') {
                    r = more;
                } else if let Some(end) = after.strip_prefix('}') {
                    rest = end;
                    break;
                } else {
                    panic!("expected , or }} in {line:?}");
                }
            }
        }
        let value_text = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before value: {line:?}"));
        let value: f64 = value_text
            .parse()
            .unwrap_or_else(|_| panic!("bad value {value_text:?} in {line:?}"));
        (name.to_owned(), labels, value)
    }

    #[test]
    fn rendered_text_parses() {
        let (a, b) = two_cores();
        let mut m = a.snapshot();
        m.merge(&b.snapshot());
        let domains = vec![
            DomainGauge {
                domain: "example.org".into(),
                held_messages: 3,
                held_bytes: 4096,
                oldest_unix: Some(1_700_000_000),
                last_atrn_unix: Some(1_700_000_100),
                last_atrn_result: Some(AtrnResult::NoMail.as_str()),
                delivered: 7,
                deferred: 1,
                bounced: 0,
            },
            DomainGauge {
                domain: "we\"ird\\dom\nain".into(),
                held_messages: 0,
                held_bytes: 0,
                oldest_unix: None,
                last_atrn_unix: None,
                last_atrn_result: None,
                delivered: 0,
                deferred: 0,
                bounced: 2,
            },
        ];
        let info = ServerInfo {
            version: "1.2.3",
            io_driver: "io_uring",
            cores: 2,
        };
        let text = render(&m, &domains, &info);
        assert!(text.ends_with('\n'));

        let mut help: HashMap<String, usize> = HashMap::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_owned();
                *help.entry(name).or_default() += 1;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let name = it.next().unwrap().to_owned();
                let kind = it.next().unwrap().to_owned();
                assert!(
                    ["counter", "gauge", "summary"].contains(&kind.as_str()),
                    "{line}"
                );
                assert!(types.insert(name, kind).is_none(), "TYPE twice: {line}");
            } else {
                assert!(!line.starts_with('#'), "stray comment {line:?}");
                samples.push(parse_sample(line));
            }
        }
        assert_eq!(
            help.keys().collect::<std::collections::BTreeSet<_>>(),
            types.keys().collect(),
        );
        assert!(help.values().all(|&n| n == 1), "HELP twice: {help:?}");
        for (name, kind) in &types {
            assert!(name.starts_with("turnpike_"), "{name}");
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }

        // Every sample belongs to a declared family.
        let family_of = |name: &str| -> Option<String> {
            if types.contains_key(name) {
                return Some(name.to_owned());
            }
            for suffix in ["_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    if types.get(base).map(String::as_str) == Some("summary") {
                        return Some(base.to_owned());
                    }
                }
            }
            None
        };
        for (name, _, value) in &samples {
            assert!(family_of(name).is_some(), "undeclared {name}");
            assert!(
                value.is_finite() || value.is_nan(),
                "{name} has value {value}"
            );
        }

        let get = |name: &str, labels: &[(&str, &str)]| -> f64 {
            let found: Vec<_> = samples
                .iter()
                .filter(|(n, l, _)| {
                    n == name
                        && l.len() == labels.len()
                        && labels
                            .iter()
                            .all(|(k, v)| l.iter().any(|(k2, v2)| k2 == k && v2 == v))
                })
                .collect();
            assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
            found[0].2
        };
        assert_eq!(
            get("turnpike_connections_accepted_total", &[("service", "mx")]),
            3.0
        );
        assert_eq!(
            get("turnpike_replies_refused_total", &[("class", "5xx")]),
            1.0
        );
        assert_eq!(get("turnpike_atrn_total", &[("result", "accepted")]), 2.0);
        assert_eq!(
            get("turnpike_atrn_total", &[("result", "unauthenticated")]),
            0.0
        );
        assert_eq!(get("turnpike_held_in_bytes_total", &[]), 1524.0);
        assert_eq!(
            get(
                "turnpike_build_info",
                &[("version", "1.2.3"), ("io_driver", "io_uring")]
            ),
            1.0
        );
        assert_eq!(get("turnpike_atrn_decision_seconds_count", &[]), 3.0);
        assert!((get("turnpike_atrn_decision_seconds_sum", &[]) - 0.012).abs() < 1e-9);
        let p50 = get("turnpike_atrn_decision_seconds", &[("quantile", "0.5")]);
        assert!((p50 - 0.004).abs() < 0.00001, "{p50}");
        for q in ["0.5", "0.9", "0.99", "0.999"] {
            get("turnpike_delivery_seconds", &[("quantile", q)]);
        }

        // Label escaping round-trips, and the raw text carries the escapes.
        let weird = "we\"ird\\dom\nain";
        assert!(text.contains(r#"domain="we\"ird\\dom\nain""#), "{text}");
        assert_eq!(
            get("turnpike_domain_bounced_total", &[("domain", weird)]),
            2.0
        );
        assert_eq!(
            get("turnpike_domain_held_messages", &[("domain", weird)]),
            0.0
        );
        assert_eq!(
            get(
                "turnpike_domain_last_atrn_result",
                &[("domain", "example.org"), ("result", "no_mail")]
            ),
            1.0
        );
        assert_eq!(
            get(
                "turnpike_domain_oldest_held_timestamp_seconds",
                &[("domain", "example.org")]
            ),
            1_700_000_000.0
        );
        // Absent values are absent, not zero.
        assert!(!samples.iter().any(|(n, l, _)| {
            n == "turnpike_domain_oldest_held_timestamp_seconds" && l[0].1 == weird
        }));
    }

    #[test]
    fn empty_summaries_render_nan() {
        let text = render_default(&Snapshot::new());
        assert!(text.contains("turnpike_accept_seconds{quantile=\"0.99\"} NaN\n"));
        assert!(text.contains("turnpike_accept_seconds_count 0\n"));
        assert!(text.contains("turnpike_accept_seconds_sum 0\n"));
    }

    fn http(addr: std::net::SocketAddr, request: &str) -> (String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").expect("no head end");
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn http_round_trip() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _server = serve_http(listener, || "turnpike_up 1\n".to_owned()).unwrap();

        let (head, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(head.contains("Connection: close"));
        assert!(head.contains("Content-Length: 14"));
        assert_eq!(body, "turnpike_up 1\n");

        let (head, body) = http(addr, "GET /metrics?x=1 HTTP/1.0\n\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, "turnpike_up 1\n");

        let (head, body) = http(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, "");

        let (head, _) = http(addr, "GET /x HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 404 "), "{head}");

        let (head, _) = http(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
        assert!(head.contains("Allow: GET, HEAD"));

        let (head, _) = http(addr, "nonsense\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");

        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        let (head, _) = http(addr, &big);
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");

        // Still serving after all that.
        let (head, _) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    }

    #[test]
    fn scrape_panic_is_500_and_server_survives() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = std::cell::Cell::new(0u32);
        let _server = serve_http(listener, move || {
            calls.set(calls.get() + 1);
            if calls.get() == 1 {
                panic!("first scrape fails");
            }
            "ok\n".to_owned()
        })
        .unwrap();
        let (head, _) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 500 "), "{head}");
        let (head, body) = http(addr, "GET /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, "ok\n");
    }
}
