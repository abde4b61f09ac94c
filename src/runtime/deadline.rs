//! Request deadlines for inbound sessions: what stops a slowloris client.
//!
//! An idle timer that restarts on every read lets a client hold a session with one byte every
//! few seconds. Instead, following Postfix's `smtpd_per_request_deadline`, every request has a
//! deadline fixed when it starts:
//!
//! - A command line must be complete within `idle` of the moment the session became ready
//!   for it (the previous command was answered); bytes trickling in do not move it.
//! - A DATA or BDAT transfer starts with the same `idle` of slack, and every byte received
//!   extends it by `1 / min_rate` seconds (Postfix's `smtpd_min_data_rate`): a client at
//!   least that fast never runs out of time, one slower does. With `min_rate` 0 every read
//!   restarts the idle time instead (no minimum rate).
//!
//! Pure bookkeeping: time comes in as an argument, the driver does the waiting.

use std::time::{Duration, Instant};

/// The deadline of the request a session is waiting for.
#[derive(Clone, Copy, Debug)]
pub struct RequestClock {
    idle: Duration,
    min_rate: u32,
    started: Instant,
    /// Body bytes received since the transfer started; `None` while reading commands.
    body: Option<u64>,
}

impl RequestClock {
    /// A clock for a session that waits for its first command from `now`.
    pub fn new(idle: Duration, min_rate: u32, now: Instant) -> RequestClock {
        RequestClock {
            idle,
            min_rate,
            started: now,
            body: None,
        }
    }

    /// The session is ready for a new command line at `now`.
    pub fn command(&mut self, now: Instant) {
        self.started = now;
        self.body = None;
    }

    /// A DATA or BDAT transfer starts at `now`.
    pub fn body(&mut self, now: Instant) {
        self.started = now;
        self.body = Some(0);
    }

    /// True during a data transfer.
    pub fn in_body(&self) -> bool {
        self.body.is_some()
    }

    /// `n` bytes arrived at `now` during a data transfer (ignored while reading commands).
    pub fn received(&mut self, n: usize, now: Instant) {
        if let Some(b) = self.body.as_mut() {
            *b = b.saturating_add(n as u64);
            if self.min_rate == 0 {
                self.started = now;
            }
        }
    }

    /// When the current request runs out of time.
    pub fn deadline(&self) -> Instant {
        let earned = match (self.body, self.min_rate) {
            (Some(bytes), rate) if rate > 0 => {
                let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(rate);
                Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
            _ => Duration::ZERO,
        };
        // Absurd settings (days of idle time) saturate at a year rather than overflow.
        let year = Duration::from_secs(365 * 86_400);
        self.started
            .checked_add(self.idle.saturating_add(earned).min(year))
            .unwrap_or(self.started)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(300);

    #[test]
    fn a_command_line_has_idle_time_whatever_trickles_in() {
        let t0 = Instant::now();
        let mut c = RequestClock::new(IDLE, 500, t0);
        c.received(1, t0 + Duration::from_secs(100));
        c.received(1, t0 + Duration::from_secs(200));
        assert_eq!(
            c.deadline(),
            t0 + IDLE,
            "bytes of a command line earn nothing"
        );
        c.command(t0 + Duration::from_secs(10));
        assert_eq!(c.deadline(), t0 + Duration::from_secs(310));
        assert!(!c.in_body());
    }

    #[test]
    fn a_transfer_earns_time_by_the_byte() {
        let t0 = Instant::now();
        let mut c = RequestClock::new(IDLE, 500, t0);
        c.body(t0);
        assert!(c.in_body());
        assert_eq!(c.deadline(), t0 + IDLE);
        // 1 MB at any speed above 500 B/s stays ahead: it earned 2000 s.
        c.received(1_000_000, t0 + Duration::from_secs(60));
        assert_eq!(c.deadline(), t0 + IDLE + Duration::from_secs(2000));
        // One byte every 5 s earns 2 ms per byte: the slack runs out after about idle.
        let mut slow = RequestClock::new(IDLE, 500, t0);
        slow.body(t0);
        for i in 1..=60u64 {
            slow.received(1, t0 + Duration::from_secs(5 * i));
        }
        assert_eq!(slow.deadline(), t0 + IDLE + Duration::from_millis(120));
        // The next command starts a fresh clock.
        slow.command(t0 + Duration::from_secs(1));
        assert_eq!(slow.deadline(), t0 + Duration::from_secs(301));
    }

    #[test]
    fn without_a_minimum_rate_each_read_restarts_the_idle_time() {
        let t0 = Instant::now();
        let mut c = RequestClock::new(IDLE, 0, t0);
        c.body(t0);
        c.received(1, t0 + Duration::from_secs(250));
        assert_eq!(c.deadline(), t0 + Duration::from_secs(550));
        let mut huge = RequestClock::new(Duration::MAX, 1, t0);
        huge.body(t0);
        huge.received(usize::MAX, t0);
        let _ = huge.deadline(); // saturates, never panics on overflow of the sum
    }
}
