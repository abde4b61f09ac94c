//! What a running bench counts, on its one thread: per-phase counters, errors and latency
//! histograms, and fixed-interval buckets for the timeline. [`Recorder::finish`] turns them
//! into the report's phases and timeline.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::report::{self, Delivery, Percentiles, Phase, Point, Timeline};

/// Counters of one phase while it runs.
#[derive(Debug)]
pub struct PhaseAcc {
    /// The report's phase, filled as the phase runs (rates and latencies at the end).
    pub phase: Phase,
    hist: BTreeMap<&'static str, Histogram<u64>>,
    /// bench day: seconds customers spent in reversed sessions, for the drain rate.
    pub drain_s: f64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    messages: u64,
    bytes: u64,
    delivered: u64,
}

/// The counters of a run.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    interval: Duration,
    phases: Vec<PhaseAcc>,
    buckets: Vec<Bucket>,
}

impl Recorder {
    /// Starts counting at `start` in phase `first`, with timeline buckets of `interval`.
    pub fn new(start: Instant, interval: Duration, first: &str) -> Recorder {
        let mut r = Recorder {
            start,
            interval: interval.max(Duration::from_millis(10)),
            phases: Vec::new(),
            buckets: Vec::new(),
        };
        r.begin_phase(first, start);
        r
    }

    /// When the run started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Ends the current phase and starts `name` at `now`.
    pub fn begin_phase(&mut self, name: &str, now: Instant) {
        let start_s = now.duration_since(self.start).as_secs_f64();
        self.phases.push(PhaseAcc {
            phase: Phase {
                name: name.into(),
                start_s,
                ..Phase::default()
            },
            hist: BTreeMap::new(),
            drain_s: 0.0,
        });
    }

    /// The current phase.
    pub fn phase(&mut self) -> &mut PhaseAcc {
        self.phases.last_mut().expect("a phase always runs")
    }

    /// The current phase's delivery counters (bench day).
    pub fn delivery(&mut self) -> &mut Delivery {
        self.phase()
            .phase
            .delivery
            .get_or_insert_with(Delivery::default)
    }

    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        let i = (now.saturating_duration_since(self.start).as_secs_f64()
            / self.interval.as_secs_f64()) as usize;
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, Bucket::default());
        }
        &mut self.buckets[i]
    }

    /// A message of `bytes` octets was accepted at `now`.
    pub fn accepted(&mut self, bytes: u64, now: Instant) {
        let p = &mut self.phase().phase;
        p.messages += 1;
        p.bytes += bytes;
        let b = self.bucket(now);
        b.messages += 1;
        b.bytes += bytes;
    }

    /// bench day: a customer answered 250 for a message of `bytes` octets at `now`.
    pub fn delivered(&mut self, bytes: u64, now: Instant) {
        let d = self.delivery();
        d.delivered += 1;
        d.delivered_bytes += bytes;
        self.bucket(now).delivered += 1;
    }

    /// One failure of kind `key` (a reply code, or `connect`, `timeout`, ...).
    pub fn error(&mut self, key: impl Into<String>) {
        *self.phase().phase.errors.entry(key.into()).or_insert(0) += 1;
    }

    /// One latency sample.
    pub fn latency(&mut self, name: &'static str, d: Duration) {
        let h = self
            .phase()
            .hist
            .entry(name)
            .or_insert_with(report::histogram);
        report::record(h, d);
    }

    /// The phases, the timeline and the latency percentiles over the whole run, the last
    /// phase ending at `end`.
    pub fn finish(mut self, end: Instant) -> (Vec<Phase>, Timeline, BTreeMap<String, Percentiles>) {
        let mut overall: BTreeMap<&'static str, Histogram<u64>> = BTreeMap::new();
        for acc in &self.phases {
            for (name, h) in &acc.hist {
                let _ = overall.entry(name).or_insert_with(report::histogram).add(h);
            }
        }
        let overall = overall
            .iter()
            .map(|(name, h)| ((*name).to_string(), Percentiles::of(h)))
            .collect();
        let end_s = end.duration_since(self.start).as_secs_f64();
        let ends: Vec<f64> = self
            .phases
            .iter()
            .skip(1)
            .map(|p| p.phase.start_s)
            .chain([end_s])
            .collect();
        let names: Vec<(f64, String)> = self
            .phases
            .iter()
            .map(|p| (p.phase.start_s, p.phase.name.clone()))
            .collect();
        let phases = self
            .phases
            .drain(..)
            .zip(ends)
            .map(|(mut acc, end)| {
                let p = &mut acc.phase;
                p.elapsed_s = (end - p.start_s).max(0.0);
                p.finish_rates();
                for (name, h) in &acc.hist {
                    p.latency_us.insert((*name).into(), Percentiles::of(h));
                }
                if let Some(d) = p.delivery.as_mut() {
                    d.drain_msgs_per_s = if acc.drain_s > 0.0 {
                        d.delivered as f64 / acc.drain_s
                    } else {
                        0.0
                    };
                }
                acc.phase
            })
            .collect();
        let step = self.interval.as_secs_f64();
        let n = ((end_s / step).ceil() as usize).max(self.buckets.len());
        self.buckets.resize(n, Bucket::default());
        let points = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let t_s = (i + 1) as f64 * step;
                let phase = names
                    .iter()
                    .rev()
                    .find(|(s, _)| *s < t_s)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_default();
                Point {
                    t_s,
                    phase,
                    messages: b.messages,
                    bytes: b.bytes,
                    delivered: b.delivered,
                }
            })
            .collect();
        (
            phases,
            Timeline {
                interval_s: step,
                points,
            },
            overall,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_buckets() {
        let t0 = Instant::now();
        let mut r = Recorder::new(t0, Duration::from_millis(500), "a");
        r.accepted(100, t0 + Duration::from_millis(100));
        r.accepted(100, t0 + Duration::from_millis(700));
        r.latency(
            report::latency::END_OF_DATA_TO_REPLY,
            Duration::from_micros(250),
        );
        r.error("451");
        r.begin_phase("b", t0 + Duration::from_secs(1));
        r.delivered(50, t0 + Duration::from_millis(1200));
        r.phase().drain_s = 0.5;
        let (phases, tl, overall) = r.finish(t0 + Duration::from_secs(2));
        assert_eq!(overall["end_of_data_to_reply"].count, 1);
        assert_eq!(phases.len(), 2);
        assert_eq!(phases[0].messages, 2);
        assert!((phases[0].msgs_per_s - 2.0).abs() < 1e-6);
        assert_eq!(phases[0].errors["451"], 1);
        assert_eq!(phases[0].latency_us["end_of_data_to_reply"].count, 1);
        assert_eq!(phases[1].delivery.as_ref().unwrap().delivered, 1);
        assert!((phases[1].delivery.as_ref().unwrap().drain_msgs_per_s - 2.0).abs() < 1e-6);
        assert_eq!(tl.points.len(), 4);
        assert_eq!(
            tl.points.iter().map(|p| p.messages).collect::<Vec<_>>(),
            [1, 1, 0, 0]
        );
        assert_eq!(tl.points[2].delivered, 1);
        assert_eq!(tl.points[2].phase, "b");
    }
}
