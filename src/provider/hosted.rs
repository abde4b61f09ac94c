//! Which domains this provider holds mail for, and how much each holds right now.
//!
//! A [`Hosted`] snapshot is built from the accounts file and the config, and handed to every core
//! over the mesh on start and on reload; sessions read their core's copy without locks. The
//! held-bytes counters that RCPT checks quotas against live in a [`CounterTable`] that survives
//! reloads: the domain's shard core updates them as it indexes and retires parts, every other
//! core only reads them (relaxed atomics; a quota is a soft limit checked at RCPT).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::accounts::Accounts;
use crate::config::Config;
use crate::proto::sasl::{Credentials, ScramSecrets};
use crate::types::DomainName;

/// Live totals for one domain's held mail.
#[derive(Debug, Default)]
pub struct DomainCounters {
    /// Bytes of held message parts (a message for two domains counts for both).
    pub held_bytes: AtomicU64,
    /// Number of held message parts.
    pub held_messages: AtomicU64,
}

impl DomainCounters {
    /// Records a part entering the hold.
    pub fn add(&self, bytes: u64) {
        self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.held_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a part leaving the hold.
    pub fn remove(&self, bytes: u64) {
        self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.held_messages.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The SASL machine checks credentials against this snapshot's verifiers (never plaintext).
impl Credentials for Hosted {
    fn scram(&self, user: &str) -> Option<ScramSecrets> {
        Some(self.accounts.account(user)?.scram().secrets().clone())
    }

    fn cram_md5(&self, user: &str, challenge: &[u8], digest_hex: &str) -> bool {
        self.accounts
            .account(user)
            .is_some_and(|a| a.cram_md5_verify(challenge, digest_hex))
    }

    /// `cert_identity` is the fingerprint of the certificate the client proved it holds
    /// (`Conn::peer_fingerprint`); `turnpike account cert` pins it to an account.
    fn external(&self, cert_identity: &str) -> Option<String> {
        self.accounts
            .account_for_cert(cert_identity)
            .map(|a| a.name().as_str().to_owned())
    }
}

/// Counters by domain, kept for the life of the process so reloads don't reset them.
#[derive(Default)]
pub struct CounterTable(Mutex<HashMap<DomainName, Arc<DomainCounters>>>);

impl CounterTable {
    /// The counters for `domain`, created on first use.
    pub fn counters(&self, domain: &DomainName) -> Arc<DomainCounters> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(domain.clone()).or_default().clone()
    }
}

/// One hosted domain.
#[derive(Debug, Clone)]
pub struct HostedDomain {
    /// The account that owns it.
    pub account: String,
    /// Maximum held bytes before RCPT answers 452.
    pub quota: u64,
    /// Live totals, shared with the shard core.
    pub counters: Arc<DomainCounters>,
}

/// The set of hosted domains at one moment.
#[derive(Debug, Default)]
pub struct Hosted {
    domains: HashMap<DomainName, HostedDomain>,
    accounts: Accounts,
}

impl Hosted {
    /// Builds the snapshot: every account's domains, with the configured quota.
    pub fn build(accounts: &Accounts, config: &Config, table: &CounterTable) -> Hosted {
        let mut domains = HashMap::new();
        for account in accounts.iter() {
            for domain in account.domains() {
                let quota = config.quota_for(domain);
                let entry = HostedDomain {
                    account: account.name().to_string(),
                    quota,
                    counters: table.counters(domain),
                };
                domains.insert(domain.clone(), entry);
            }
        }
        Hosted {
            domains,
            accounts: accounts.clone(),
        }
    }

    /// True when `account` asked for push delivery (linger).
    pub fn lingers(&self, account: &str) -> bool {
        self.accounts.account(account).is_some_and(|a| a.linger())
    }

    /// True when `account` may submit mail from an address in `domain`: one of its own
    /// domains, or any domain when the account allows any sender.
    pub fn may_send_from(&self, account: &str, domain: &DomainName) -> bool {
        self.accounts
            .account(account)
            .is_some_and(|a| a.any_sender() || a.owns(domain))
    }

    /// True when `account` may submit mail from any address (`turnpike account senders`).
    pub fn any_sender(&self, account: &str) -> bool {
        self.accounts
            .account(account)
            .is_some_and(|a| a.any_sender())
    }

    /// The domains `account` owns (empty for an unknown account).
    pub fn domains_of(&self, account: &str) -> &[DomainName] {
        self.accounts.account(account).map_or(&[], |a| a.domains())
    }

    /// The hosted domain, if it is one.
    pub fn get(&self, domain: &DomainName) -> Option<&HostedDomain> {
        self.domains.get(domain)
    }

    /// Number of hosted domains.
    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// True when no domain is hosted (a fresh install before `account add`).
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}
