//! `turnpike bench drain`: a fast test customer. It runs one ODMR session, accepts every
//! message at once (nothing is written anywhere), checks that each is well formed, and reports
//! messages per second, megabytes per second and per-message latency percentiles.
//!
//! "Latency" here is the time from the previous message's acceptance (or the ATRN reply) to
//! this one's: what the provider's reversal costs per message, as the customer sees it.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::proto::inbound::Incoming;
use crate::proto::reply::Reply;
use crate::runtime::io::IoKind;

use super::session::{self, Received, SessionConfig, SessionError, Sink};

/// What a drain measured.
#[derive(Debug)]
pub struct DrainReport {
    /// Messages and bytes received.
    pub received: Received,
    /// Wall-clock time from connect to the end of the session.
    pub elapsed: Duration,
    /// Per-message latency in microseconds.
    pub latency_us: Histogram<u64>,
    /// Messages that failed the well-formedness check (refused with 554).
    pub malformed: u64,
}

impl DrainReport {
    /// A human-readable summary.
    pub fn render(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let q = |p: f64| Duration::from_micros(self.latency_us.value_at_quantile(p));
        format!(
            "received {} messages, {} bytes in {:.3} s\n\
             rate     {:.0} msgs/s, {:.1} MB/s\n\
             latency  p50 {:?}  p90 {:?}  p99 {:?}  max {:?}\n\
             malformed {}\n",
            self.received.messages,
            self.received.bytes,
            secs,
            self.received.messages as f64 / secs,
            self.received.bytes as f64 / secs / 1e6,
            q(0.5),
            q(0.9),
            q(0.99),
            Duration::from_micros(self.latency_us.max()),
            self.malformed,
        )
    }
}

struct CountingSink {
    last: Instant,
    latency_us: Histogram<u64>,
    malformed: u64,
}

impl Sink for CountingSink {
    async fn deliver(&mut self, message: Incoming) -> Result<(), Reply> {
        let now = Instant::now();
        let us = now
            .duration_since(self.last)
            .as_micros()
            .min(u128::from(u64::MAX)) as u64;
        let _ = self.latency_us.record(us.max(1));
        self.last = now;
        // The provider stores our Received: line first and a canonical CRLF body.
        if !message.body.starts_with(b"Received: ") || !message.body.ends_with(b"\r\n") {
            self.malformed += 1;
            return Err(Reply::with_status(554, (5, 6, 0), "Malformed held message"));
        }
        Ok(())
    }
}

/// Runs one drain session.
pub async fn drain(io: IoKind, cfg: &SessionConfig) -> Result<DrainReport, SessionError> {
    let started = Instant::now();
    let mut sink = CountingSink {
        last: started,
        latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
        malformed: 0,
    };
    let received = session::run(io, cfg, &mut sink).await?;
    Ok(DrainReport {
        received,
        elapsed: started.elapsed(),
        latency_us: sink.latency_us,
        malformed: sink.malformed,
    })
}
