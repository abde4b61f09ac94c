//! The retry schedule of a deferred destination: exponential backoff between a first retry
//! delay and a ceiling, and the give-up age after which a message is reported as failed.
//!
//! Kept in memory only: after a restart every queued destination is tried again at once,
//! then backs off afresh. The give-up age is measured from the message's arrival time, which
//! is journaled, so a restart never extends a message's life.

use std::time::Duration;

/// Delay before attempt `attempts + 1`, after `attempts` failed ones (at least one):
/// `first * 2^(attempts-1)`, capped at `max`.
pub fn delay(attempts: u32, first: Duration, max: Duration) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    first.saturating_mul(1u32 << exp).min(max)
}

/// True when a message received at `received_at` (unix seconds) has waited `give_up` or
/// longer at `now`.
pub fn gave_up(received_at: u64, now: u64, give_up: Duration) -> bool {
    now.saturating_sub(received_at) >= give_up.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_ceiling() {
        let (f, m) = (Duration::from_secs(300), Duration::from_secs(3600));
        let got: Vec<u64> = (1..=6).map(|a| delay(a, f, m).as_secs()).collect();
        assert_eq!(got, [300, 600, 1200, 2400, 3600, 3600]);
        assert_eq!(delay(1000, f, m), m, "no overflow for many attempts");
    }

    #[test]
    fn give_up_counts_from_arrival() {
        let five_days = Duration::from_secs(5 * 86_400);
        assert!(!gave_up(1_000, 1_000 + 5 * 86_400 - 1, five_days));
        assert!(gave_up(1_000, 1_000 + 5 * 86_400, five_days));
        assert!(!gave_up(2_000, 1_000, five_days), "clock behind arrival");
    }
}
