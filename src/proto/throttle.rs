//! The failed-login throttle: slows down and then refuses password guessing, per client
//! address, per account and address, and (only slowing down) per account. Sans-IO: time is an
//! argument (Unix seconds), and the caller does the waiting. The provider keeps one per core
//! (addresses and accounts are spread over the cores by the kernel, so a guesser is throttled
//! on every core it lands on).
//!
//! Policy, per key (an IP address; an account name lowercased with an IP address; an account
//! name lowercased):
//! - Failures count while each comes within `window` seconds of the previous one; a quiet
//!   `window` forgets the key.
//! - After `k` counted failures of a key, attempts are delayed by `initial_delay * 2^(k-1)`,
//!   at most `max_delay`; the largest delay of the keys applies. The account's own key (its
//!   failures from every address) delays by at most `account_max_delay`, and never refuses:
//!   whoever guesses from elsewhere can slow the owner down a little, never lock them out.
//! - At `max_ip_failures` the address is refused ([`Refusal::Ip`]: `421 4.7.0` and close); at
//!   `max_client_failures` for one account from one address, that address is refused for that
//!   account ([`Refusal::Account`]: `454 4.7.0`, a temporary failure, even with the right
//!   password, so guessing gains nothing). The owner from another address is not affected.
//! - A success forgets the account's failures (from that address and overall), not the
//!   address's (one valid account must not launder guesses at others).
//! - Memory is bounded by `max_entries`: when full, stale keys are dropped, then the key whose
//!   last failure is oldest. That scan is linear, and only runs on a failure for a new key.
//!   Account names are truncated to 255 octets for the key.

use core::net::IpAddr;
use std::collections::HashMap;
use std::time::Duration;

use crate::proto::reply::Reply;

/// Throttle limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// The delay after the first failure.
    pub initial_delay: Duration,
    /// The delay doubles per failure up to this.
    pub max_delay: Duration,
    /// The most an account's failures from all addresses together delay an attempt.
    pub account_max_delay: Duration,
    /// Failures of one account from one address after which that address is refused for the
    /// account, for a window.
    pub max_client_failures: u32,
    /// Failures after which the address is refused for a window.
    pub max_ip_failures: u32,
    /// Seconds after the last failure for which a key is remembered.
    pub window: u64,
    /// Keys kept at most.
    pub max_entries: usize,
}

impl Default for ThrottleConfig {
    /// 0.5 s doubling to 8 s (2 s at most for the account as a whole); 10 failures lock an
    /// account at one address and 30 lock the address, for 15 minutes; 4096 keys.
    fn default() -> Self {
        ThrottleConfig {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            account_max_delay: Duration::from_secs(2),
            max_client_failures: 10,
            max_ip_failures: 30,
            window: 15 * 60,
            max_entries: 4096,
        }
    }
}

/// What to do with an authentication attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Answer at once.
    Allow,
    /// Answer after this delay.
    Delay(Duration),
    /// Do not honour the attempt.
    Refuse(Refusal),
}

/// Which key is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The account from this address: `454 4.7.0`, the session goes on.
    Account,
    /// The client address: `421 4.7.0` and close.
    Ip,
}

impl Refusal {
    /// The reply for this refusal; `hostname` starts a 421's text.
    pub fn reply(self, hostname: &str) -> Reply {
        match self {
            Refusal::Account => Reply::with_status(
                454,
                (4, 7, 0),
                "Temporary authentication failure, try again later",
            ),
            Refusal::Ip => Reply::with_status(
                421,
                (4, 7, 0),
                format!("{hostname} Too many authentication failures, closing connection"),
            ),
        }
    }

    /// True when the connection must be closed after the reply.
    pub fn closes(self) -> bool {
        self == Refusal::Ip
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Client(IpAddr, String),
    Account(String),
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last_failure: u64,
}

/// The per-core failed-login table.
#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleConfig,
    entries: HashMap<Key, Entry>,
}

impl Throttle {
    /// An empty table.
    pub fn new(cfg: ThrottleConfig) -> Self {
        Throttle {
            cfg,
            entries: HashMap::new(),
        }
    }

    /// The verdict for an attempt from `ip` for `account` (if known yet) at `now`.
    pub fn check(&self, ip: IpAddr, account: Option<&str>, now: u64) -> Verdict {
        let ip_failures = self.failures(&Key::Ip(ip), now);
        if ip_failures >= self.cfg.max_ip_failures {
            return Verdict::Refuse(Refusal::Ip);
        }
        let (client_failures, account_failures) = match account {
            None => (0, 0),
            Some(a) => {
                let name = account_name(a);
                (
                    self.failures(&Key::Client(ip, name.clone()), now),
                    self.failures(&Key::Account(name), now),
                )
            }
        };
        if client_failures >= self.cfg.max_client_failures {
            return Verdict::Refuse(Refusal::Account);
        }
        let delay = self.backoff(ip_failures.max(client_failures)).max(
            self.backoff(account_failures)
                .min(self.cfg.account_max_delay),
        );
        if delay.is_zero() {
            Verdict::Allow
        } else {
            Verdict::Delay(delay)
        }
    }

    /// Counts a failed attempt against `ip`, and against `account` from `ip` and overall.
    pub fn record_failure(&mut self, ip: IpAddr, account: Option<&str>, now: u64) {
        self.bump(Key::Ip(ip), now);
        if let Some(a) = account {
            let name = account_name(a);
            self.bump(Key::Client(ip, name.clone()), now);
            self.bump(Key::Account(name), now);
        }
    }

    /// Forgets the account's failures (from `ip` and overall) after a successful login.
    pub fn record_success(&mut self, ip: IpAddr, account: &str) {
        let name = account_name(account);
        self.entries.remove(&Key::Client(ip, name.clone()));
        self.entries.remove(&Key::Account(name));
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The delay after `k` failures of one key.
    fn backoff(&self, k: u32) -> Duration {
        match k {
            0 => Duration::ZERO,
            k => {
                let factor = 1u32 << (k - 1).min(16);
                self.cfg
                    .initial_delay
                    .saturating_mul(factor)
                    .min(self.cfg.max_delay)
            }
        }
    }

    fn failures(&self, key: &Key, now: u64) -> u32 {
        self.entries
            .get(key)
            .filter(|e| !self.stale(e, now))
            .map_or(0, |e| e.failures)
    }

    fn stale(&self, e: &Entry, now: u64) -> bool {
        now.saturating_sub(e.last_failure) >= self.cfg.window
    }

    fn bump(&mut self, key: Key, now: u64) {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cfg.max_entries {
            self.make_room(now);
        }
        let window = self.cfg.window;
        let e = self.entries.entry(key).or_insert(Entry {
            failures: 0,
            last_failure: now,
        });
        if now.saturating_sub(e.last_failure) >= window {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = e.last_failure.max(now);
    }

    fn make_room(&mut self, now: u64) {
        let window = self.cfg.window;
        self.entries
            .retain(|_, e| now.saturating_sub(e.last_failure) < window);
        while self.entries.len() >= self.cfg.max_entries.max(1) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_failure)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
    }
}

/// The key form of an account name: lowercased, at most 255 octets.
fn account_name(account: &str) -> String {
    let mut end = account.len().min(255);
    while !account.is_char_boundary(end) {
        end -= 1;
    }
    account[..end].to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(core::net::Ipv4Addr::new(192, 0, 2, 1));
    const OTHER: IpAddr = IpAddr::V4(core::net::Ipv4Addr::new(192, 0, 2, 2));

    fn ms(n: u64) -> Verdict {
        Verdict::Delay(Duration::from_millis(n))
    }

    fn cfg() -> ThrottleConfig {
        ThrottleConfig {
            max_client_failures: 7,
            max_ip_failures: 9,
            window: 100,
            max_entries: 8,
            ..ThrottleConfig::default()
        }
    }

    #[test]
    fn delay_grows_then_account_at_that_address_then_ip_is_refused() {
        let mut t = Throttle::new(cfg());
        // Verdict for the attempt after `n` failures of "alice" from IP.
        let want = [
            Verdict::Allow,
            ms(500),
            ms(1000),
            ms(2000),
            ms(4000),
            ms(8000),
            ms(8000),
            Verdict::Refuse(Refusal::Account),
        ];
        for (n, w) in want.into_iter().enumerate() {
            assert_eq!(t.check(IP, Some("alice"), 10), w, "after {n} failures");
            if n + 1 < want.len() {
                t.record_failure(IP, Some("Alice"), 10);
            }
        }
        // The owner from another address is only slowed down, by the capped account delay.
        assert_eq!(t.check(OTHER, Some("alice"), 10), ms(2000));
        // The IP itself is only delayed for other accounts until its own limit.
        assert_eq!(t.check(IP, Some("bob"), 10), ms(8000));
        t.record_failure(IP, Some("bob"), 10);
        t.record_failure(IP, None, 10);
        assert_eq!(t.check(IP, Some("bob"), 10), Verdict::Refuse(Refusal::Ip));
        assert_eq!(t.check(IP, None, 10), Verdict::Refuse(Refusal::Ip));
        assert_eq!(t.check(OTHER, Some("bob"), 10), ms(500));
        // A quiet window forgets everything.
        assert_eq!(t.check(IP, Some("alice"), 110), Verdict::Allow);
        t.record_failure(IP, Some("alice"), 110);
        assert_eq!(t.check(IP, Some("alice"), 110), ms(500));
    }

    /// A guesser spread over many addresses never locks the account: each address is refused
    /// on its own, and the account as a whole costs at most `account_max_delay` per attempt.
    #[test]
    fn a_distributed_attack_cannot_lock_the_owner_out() {
        let mut t = Throttle::new(ThrottleConfig {
            max_entries: 4096,
            ..cfg()
        });
        let owner = IpAddr::V4(core::net::Ipv4Addr::new(198, 51, 100, 7));
        for host in 1..=50u8 {
            let ip = IpAddr::V4(core::net::Ipv4Addr::new(203, 0, 113, host));
            for _ in 0..7 {
                t.record_failure(ip, Some("alice"), 20);
            }
            assert_eq!(
                t.check(ip, Some("alice"), 20),
                Verdict::Refuse(Refusal::Account)
            );
            assert_eq!(t.check(owner, Some("alice"), 20), ms(2000), "after {host}");
        }
        // The owner's success lifts even that.
        t.record_success(owner, "alice");
        assert_eq!(t.check(owner, Some("alice"), 20), Verdict::Allow);
        // Other addresses stay refused for alice until their window passes.
        let ip = IpAddr::V4(core::net::Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(
            t.check(ip, Some("alice"), 20),
            Verdict::Refuse(Refusal::Account)
        );
        assert_eq!(t.check(ip, Some("alice"), 120), Verdict::Allow);
    }

    #[test]
    fn success_forgets_the_account_not_the_address() {
        let mut t = Throttle::new(cfg());
        for _ in 0..3 {
            t.record_failure(IP, Some("alice"), 1);
        }
        assert_eq!(t.check(OTHER, Some("alice"), 1), ms(2000));
        t.record_success(IP, "ALICE");
        assert_eq!(t.check(OTHER, Some("alice"), 1), Verdict::Allow);
        assert_eq!(t.check(IP, Some("alice"), 1), ms(2000));
    }

    #[test]
    fn memory_is_bounded_oldest_dropped() {
        let mut t = Throttle::new(cfg());
        for i in 0..20u64 {
            t.record_failure(OTHER, Some(&format!("user{i}")), i);
            assert!(t.len() <= 8);
        }
        assert_eq!(t.check(IP, Some("user0"), 20), Verdict::Allow);
        // OTHER's own failures (8 of the 20 kept) delay it; user19's account-wide key too.
        assert_eq!(t.check(IP, Some("user19"), 20), ms(500));
        // The busy address is kept: it is refreshed by every failure.
        assert_ne!(t.check(OTHER, None, 20), Verdict::Allow);
        let long = "é".repeat(300);
        t.record_failure(IP, Some(&long), 30);
        assert_eq!(t.check(IP, Some(&long[..254]), 30), ms(500));
        assert!(Refusal::Ip.closes() && !Refusal::Account.closes());
        assert_eq!(
            Refusal::Ip.reply("mx.example").to_bytes(),
            b"421 4.7.0 mx.example Too many authentication failures, closing connection\r\n"
        );
        assert_eq!(Refusal::Account.reply("x").code, 454);
    }

    #[test]
    fn zero_delays_turn_the_slowdown_off_but_not_the_limits() {
        let mut t = Throttle::new(ThrottleConfig {
            initial_delay: Duration::ZERO,
            ..cfg()
        });
        for _ in 0..6 {
            t.record_failure(IP, Some("alice"), 1);
            assert_eq!(t.check(IP, Some("alice"), 1), Verdict::Allow);
        }
        t.record_failure(IP, Some("alice"), 1);
        assert_eq!(
            t.check(IP, Some("alice"), 1),
            Verdict::Refuse(Refusal::Account)
        );
    }
}
