//! The one report every bench writes: a human summary on stdout, `--json FILE` (schema
//! `turnpike-bench/1`, documented field by field in docs/benchmarks.md) and the data behind
//! `--plot`.
//!
//! A report is a list of phases (one for `bench mx` and `bench sink`, one per part of the day
//! for `bench day`), each with its counts, rates, errors by reply code and latency
//! percentiles; a timeline of fixed intervals for throughput over time; the CPU the bench
//! itself used; the server's CPU and RSS when a server process was sampled; and, for
//! `bench day`, the exactly-once verification.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The `schema` value of this version of the report.
pub const SCHEMA: &str = "turnpike-bench/1";

/// Latency names used in [`Phase::latency_us`].
pub mod latency {
    /// TCP connect started -> the server's greeting read (bench mx, day senders).
    pub const CONNECT_TO_GREETING: &str = "connect_to_greeting";
    /// Last body byte written -> the reply that settles the message.
    pub const END_OF_DATA_TO_REPLY: &str = "end_of_data_to_reply";
    /// Open loop: scheduled arrival -> the message actually started (the generator's lag).
    pub const ARRIVAL_LAG: &str = "arrival_lag";
    /// bench day: ATRN sent -> its reply.
    pub const ATRN_REPLY: &str = "atrn_reply";
    /// bench day: the MX's 250 -> the customer's 250 (time held at the counter).
    pub const HELD_TO_DELIVERED: &str = "held_to_delivered";
}

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// `mx`, `sink` or `day`.
    pub bench: String,
    /// Unix time of the start, milliseconds.
    pub started_unix_ms: u64,
    /// Wall-clock seconds from start to end.
    pub elapsed_s: f64,
    /// The options the run was started with, as text.
    pub settings: BTreeMap<String, String>,
    /// The phases, in order.
    pub phases: Vec<Phase>,
    /// Throughput over time.
    pub timeline: Timeline,
    /// Latency percentiles over all phases, by name.
    pub latency_us: BTreeMap<String, Percentiles>,
    /// CPU used by the bench process itself.
    pub client: Cpu,
    /// The sampled server process, if any.
    pub server: Option<Server>,
    /// bench day: the exactly-once check.
    pub verification: Option<Verification>,
}

/// One phase of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Phase {
    /// Name (`mx`, `sink`, or the part of the day).
    pub name: String,
    /// Seconds from the run's start to the phase's start.
    pub start_s: f64,
    /// Length in seconds.
    pub elapsed_s: f64,
    /// SMTP connections opened (bench mx, day senders) or accepted (bench sink).
    pub connections: u64,
    /// Messages started (the first command of their transaction was written).
    pub attempted: u64,
    /// Messages accepted (250 for at least one recipient; the sink: stored nowhere, answered
    /// 250).
    pub messages: u64,
    /// Octets of the accepted messages.
    pub bytes: u64,
    /// `messages / elapsed_s`.
    pub msgs_per_s: f64,
    /// `bytes / elapsed_s / 10^6`.
    pub mb_per_s: f64,
    /// Failures by reply code (`"451"`, `"550"`), or by kind when there was no reply
    /// (`connect`, `timeout`, `closed`, `protocol`, `tls`, `lost`: the connection dropped
    /// with the message in flight).
    pub errors: BTreeMap<String, u64>,
    /// Latency percentiles in microseconds, by name (see [`latency`]).
    pub latency_us: BTreeMap<String, Percentiles>,
    /// bench day: what the customers received in this phase.
    pub delivery: Option<Delivery>,
    /// The server's CPU and memory during this phase, if sampled.
    pub server: Option<ServerPhase>,
}

/// Percentiles of one latency, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// A histogram for microsecond latencies up to an hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` in microseconds (at least 1, the histogram's floor; clamped at its ceiling).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = d.as_micros().clamp(1, 3_600_000_000) as u64;
    let _ = h.record(us);
}

/// What customers received during a phase of bench day.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Delivery {
    /// Customer sessions started.
    pub sessions: u64,
    /// ATRN replies by code (`250`, `453`, ...), or the failure before ATRN (`auth`, `io`).
    pub atrn: BTreeMap<String, u64>,
    /// Messages the customers answered 250.
    pub delivered: u64,
    /// Octets of those.
    pub delivered_bytes: u64,
    /// Messages the customers answered 4xx (they must come again).
    pub deferred: u64,
    /// Messages the customers answered 5xx (the provider bounces them).
    pub refused: u64,
    /// Delivery status notifications received (bounces, not bench messages).
    pub reports: u64,
    /// Outgoing messages the customers queued for upload before ATRN.
    pub submitted: u64,
    /// Messages delivered per second of reversed-session time (from ATRN's 250 to the end
    /// of the session, summed over sessions).
    pub drain_msgs_per_s: f64,
}

/// The server process during one phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerPhase {
    /// CPU seconds (user + system, all threads).
    pub cpu_s: f64,
    /// `cpu_s / elapsed_s`: cores kept busy.
    pub cpu_cores: f64,
    /// Largest RSS sampled, octets.
    pub rss_peak_bytes: u64,
    /// Mean RSS sampled, octets.
    pub rss_mean_bytes: u64,
}

/// Fixed-interval counts over the whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Timeline {
    /// Interval length in seconds.
    pub interval_s: f64,
    /// One point per interval, in order.
    pub points: Vec<Point>,
}

/// One interval of the timeline.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Point {
    /// End of the interval, seconds from the start.
    pub t_s: f64,
    /// The phase running at the end of the interval.
    pub phase: String,
    /// Messages accepted in the interval.
    pub messages: u64,
    /// Octets accepted in the interval.
    pub bytes: u64,
    /// bench day: messages delivered to customers in the interval.
    pub delivered: u64,
}

/// CPU used by a process over the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cpu {
    /// User + system seconds.
    pub cpu_s: f64,
    /// `cpu_s / elapsed_s`: cores kept busy on average.
    pub cpu_cores: f64,
}

/// The sampled server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Server {
    /// Its process id.
    pub pid: u32,
    /// CPU over the run.
    pub cpu: Cpu,
    /// Largest RSS sampled, octets.
    pub rss_peak_bytes: u64,
    /// Samples, in order.
    pub samples: Vec<ServerSample>,
}

/// One /proc sample of the server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerSample {
    /// Seconds from the run's start.
    pub t_s: f64,
    /// CPU seconds used so far (user + system) since the run started.
    pub cpu_s: f64,
    /// Resident set size, octets.
    pub rss_bytes: u64,
}

/// bench day's exactly-once check.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verification {
    /// True when nothing below is wrong.
    pub ok: bool,
    /// Messages the MX accepted (250).
    pub accepted: u64,
    /// Of those, delivered exactly once, to the right account, byte-identical.
    pub delivered_once: u64,
    /// Of those, refused by the customer (5xx) exactly once and never offered again.
    pub refused_once: u64,
    /// Accepted but never delivered (nor refused) by the end of the run: bench ids.
    pub missing: Vec<String>,
    /// Offered again after the customer's 250 or 5xx: bench ids.
    pub duplicates: Vec<String>,
    /// Delivered to an account that does not own its recipients: bench ids.
    pub misdelivered: Vec<String>,
    /// Delivered with different bytes than were sent: bench ids.
    pub corrupted: Vec<String>,
    /// Carried a bench id of this run that was never sent, or one the MX refused.
    pub unexpected: Vec<String>,
    /// Sent with the connection lost before the MX's reply: delivery is allowed once or
    /// not at all.
    pub uncertain: u64,
    /// Bench messages of other runs (left over in the hold), taken and not judged.
    pub foreign: u64,
}

impl Report {
    /// An empty report for `bench`.
    pub fn new(bench: &str, started_unix_ms: u64) -> Report {
        Report {
            schema: SCHEMA.into(),
            bench: bench.into(),
            started_unix_ms,
            elapsed_s: 0.0,
            settings: BTreeMap::new(),
            phases: Vec::new(),
            timeline: Timeline::default(),
            latency_us: BTreeMap::new(),
            client: Cpu::default(),
            server: None,
            verification: None,
        }
    }

    /// Writes the JSON report to `path`.
    pub fn write_json(&self, path: &std::path::Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    /// The human summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "turnpike bench {}: {:.2} s, client CPU {:.2} s ({:.0}% of a core)",
            self.bench,
            self.elapsed_s,
            self.client.cpu_s,
            self.client.cpu_cores * 100.0
        );
        for p in &self.phases {
            let _ = writeln!(
                s,
                "[{}] {:.2} s: {} of {} messages accepted, {:.0} msgs/s, {:.2} MB/s, {} connections",
                p.name, p.elapsed_s, p.messages, p.attempted, p.msgs_per_s, p.mb_per_s,
                p.connections
            );
            if !p.errors.is_empty() {
                let e: Vec<String> = p.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                let _ = writeln!(s, "  errors   {}", e.join(", "));
            }
            for (name, l) in &p.latency_us {
                if l.count == 0 {
                    continue;
                }
                let _ = writeln!(
                    s,
                    "  {name:<22} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
                    us(l.p50),
                    us(l.p90),
                    us(l.p99),
                    us(l.p999),
                    us(l.max),
                    l.count
                );
            }
            if let Some(d) = &p.delivery {
                let atrn: Vec<String> = d.atrn.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                let _ = writeln!(
                    s,
                    "  customers {} sessions (ATRN {}), delivered {} ({:.0} msgs/s while \
                     draining), deferred {}, refused {}, reports {}, submitted {}",
                    d.sessions,
                    atrn.join(", "),
                    d.delivered,
                    d.drain_msgs_per_s,
                    d.deferred,
                    d.refused,
                    d.reports,
                    d.submitted
                );
            }
            if let Some(sv) = &p.server {
                let _ = writeln!(
                    s,
                    "  server   CPU {:.2} s ({:.0}% of a core), RSS peak {:.1} MiB, mean {:.1} MiB",
                    sv.cpu_s,
                    sv.cpu_cores * 100.0,
                    mib(sv.rss_peak_bytes),
                    mib(sv.rss_mean_bytes)
                );
            }
        }
        if let Some(sv) = &self.server {
            let _ = writeln!(
                s,
                "server pid {}: CPU {:.2} s ({:.0}% of a core), RSS peak {:.1} MiB",
                sv.pid,
                sv.cpu.cpu_s,
                sv.cpu.cpu_cores * 100.0,
                mib(sv.rss_peak_bytes)
            );
        }
        if let Some(v) = &self.verification {
            let _ = writeln!(
                s,
                "verification: {} - {} accepted: {} delivered once, {} refused once, \
                 {} uncertain; missing {}, duplicates {}, misdelivered {}, corrupted {}, \
                 unexpected {}",
                if v.ok { "OK" } else { "FAILED" },
                v.accepted,
                v.delivered_once,
                v.refused_once,
                v.uncertain,
                v.missing.len(),
                v.duplicates.len(),
                v.misdelivered.len(),
                v.corrupted.len(),
                v.unexpected.len()
            );
            for (what, ids) in [
                ("missing", &v.missing),
                ("duplicate", &v.duplicates),
                ("misdelivered", &v.misdelivered),
                ("corrupted", &v.corrupted),
                ("unexpected", &v.unexpected),
            ] {
                if !ids.is_empty() {
                    let shown: Vec<&str> = ids.iter().take(10).map(String::as_str).collect();
                    let more = ids.len().saturating_sub(10);
                    let tail = if more > 0 {
                        format!(" (+{more})")
                    } else {
                        String::new()
                    };
                    let _ = writeln!(s, "  {what}: {}{tail}", shown.join(" "));
                }
            }
        }
        s
    }
}

impl Phase {
    /// Fills `msgs_per_s` and `mb_per_s` from the counts and `elapsed_s`.
    pub fn finish_rates(&mut self) {
        let secs = self.elapsed_s.max(1e-9);
        self.msgs_per_s = self.messages as f64 / secs;
        self.mb_per_s = self.bytes as f64 / secs / 1e6;
    }
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1}ms", v as f64 / 1000.0)
    } else {
        format!("{v}us")
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Unix time now in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// CPU seconds this process has used (user + system), from getrusage.
pub fn process_cpu_s() -> f64 {
    // SAFETY: getrusage fills a zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_round_trip() {
        let mut h = histogram();
        for i in 1..=1000 {
            record(&mut h, Duration::from_micros(i));
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert!((499..=501).contains(&p.p50), "{p:?}");
        assert!((989..=991).contains(&p.p99), "{p:?}");
        assert!(p.max >= 1000 && p.max <= 1001);
        let mut r = Report::new("mx", 1);
        let mut phase = Phase {
            name: "mx".into(),
            elapsed_s: 2.0,
            messages: 10,
            bytes: 4_000_000,
            ..Phase::default()
        };
        phase.finish_rates();
        phase
            .latency_us
            .insert(latency::END_OF_DATA_TO_REPLY.into(), p);
        r.phases.push(phase);
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.phases[0].msgs_per_s, 5.0);
        assert_eq!(back.phases[0].mb_per_s, 2.0);
        assert!(r.render().contains("10 of 0 messages accepted, 5 msgs/s"));
    }
}
