//! Load generators: `turnpike bench mx` (inbound SMTP load against any server),
//! `turnpike bench sink` (a server that answers 250 and stores nothing: the ceiling for a
//! load generator) and `turnpike bench day` (a provider's day compressed into minutes: senders,
//! customers on their schedules, every message checked delivered exactly once).
//! `turnpike bench drain` lives with the customer code ([`crate::customer::drain`]).
//!
//! Reuse, not new protocol code: the senders drive the one SMTP client machine
//! ([`crate::proto::reversed`]), the sink drives the inbound machine
//! ([`crate::proto::inbound`]), the day's customers run the customer session
//! ([`crate::customer::session`]), all over [`crate::runtime::conn::Conn`].
//!
//! Every bench writes the same [`report::Report`]: a human summary, `--json FILE` and
//! `--plot FILE.svg`. The schema and the `--size-dist real` mix are documented in
//! docs/benchmarks.md.
//!
//! - [`mx`]: the sending sessions and `bench mx`'s workload.
//! - [`sink`]: `bench sink`.
//! - [`day`]: `bench day`, with [`ledger`] (the exactly-once check).
//! - [`message`]: generated messages and size distributions.
//! - [`stats`], [`report`], [`plot`]: counting, the report, the SVG.
//! - [`procstat`]: the server's CPU and RSS from /proc.
//! - [`rng`]: the seeded generator behind sizes, arrivals and schedules.

pub mod day;
pub mod ledger;
pub mod message;
pub mod mx;
pub mod plot;
pub mod procstat;
pub mod report;
pub mod rng;
pub mod sink;
pub mod stats;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::runtime::io::{block_on, IoKind};

use self::mx::{ClientConfig, MxLoad};
use self::report::{Cpu, Report};
use self::stats::Recorder;

/// A fresh run id: 8 random hex digits.
pub fn new_run_id() -> String {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `bench mx` on the current thread (one core at most) and returns its report.
/// `server_pid`, if given, is sampled from /proc during the run.
pub fn run_mx(
    client: ClientConfig,
    load: impl FnOnce(Instant) -> MxLoad,
    interval: Duration,
    server_pid: Option<u32>,
) -> std::io::Result<Report> {
    let started_ms = report::unix_ms();
    let cpu0 = report::process_cpu_s();
    let start = Instant::now();
    let sampler = server_pid
        .map(|pid| procstat::Sampler::start(pid, start, Duration::from_millis(100)))
        .transpose()?;
    let rec = Rc::new(RefCell::new(Recorder::new(start, interval, "mx")));
    let load = Rc::new(load(start));
    let settings = mx_settings(&client, &load);
    block_on(
        IoKind::Epoll,
        mx::run_sessions(Rc::new(client), load, rec.clone()),
    )?;
    let end = Instant::now();
    let rec = Rc::try_unwrap(rec)
        .map_err(|_| std::io::Error::other("sessions still running"))?
        .into_inner();
    let (mut phases, timeline, latency_us) = rec.finish(end);
    let elapsed = end.duration_since(start).as_secs_f64();
    let mut r = Report::new("mx", started_ms);
    r.elapsed_s = elapsed;
    r.settings = settings;
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
    r.phases = phases;
    r.timeline = timeline;
    r.latency_us = latency_us;
    let cpu = report::process_cpu_s() - cpu0;
    r.client = Cpu {
        cpu_s: cpu,
        cpu_cores: cpu / elapsed.max(1e-9),
    };
    Ok(r)
}

fn mx_settings(c: &ClientConfig, l: &MxLoad) -> std::collections::BTreeMap<String, String> {
    let mut s = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: String| {
        s.insert(k.to_string(), v);
    };
    put("target", c.target.to_string());
    put("sessions", c.sessions.to_string());
    put("per_connection", c.per_connection.to_string());
    put("pipelining", c.pipelining.to_string());
    put("chunking", c.chunking.to_string());
    let tls = match c.tls {
        mx::Tls::None => "none",
        mx::Tls::StartTls(..) => "starttls",
        mx::Tls::Implicit(..) => "implicit",
    };
    put("tls", tls.into());
    if let Some(m) = l.messages {
        put("messages", m.to_string());
    }
    if let Some(d) = l.duration() {
        put("duration", format!("{}s", d.as_secs_f64()));
    }
    put(
        "rate",
        l.rate.map_or("closed loop".into(), |r| r.to_string()),
    );
    put("size", l.sizes.describe());
    put("recipients", l.recipients.per_message.to_string());
    put("domains", l.recipients.domains.to_string());
    put(
        "to",
        format!("{}@{}", l.recipients.local, l.recipients.domain),
    );
    put("run_id", l.run_id.clone());
    s
}
