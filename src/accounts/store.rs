//! The accounts the server consults: every [`Account`] by name, by domain and by client
//! certificate, with the rules that keep them consistent.
//!
//! Invariants: a domain belongs to at most one account, every account owns at least one
//! domain, a certificate fingerprint is pinned to at most one account. Changes that would
//! break one are refused with an error naming both accounts. Reading and writing the file is
//! [`super::file`]'s.

use std::collections::BTreeMap;

use super::error::{AccountsError, AccountsErrorKind};
use super::name::{normalise_fingerprint, AccountName};
use super::verifier::{CramMd5Key, ScramVerifier};
use crate::types::DomainName;

/// One customer: its name, the domains whose mail it may take with ATRN, and its verifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub(super) name: AccountName,
    pub(super) domains: Vec<DomainName>,
    pub(super) scram: ScramVerifier,
    pub(super) cram_md5: Option<CramMd5Key>,
    pub(super) linger: bool,
    pub(super) any_sender: bool,
    pub(super) client_certs: Vec<String>,
}

impl Account {
    /// Submitted mail may come from any sender address, not only from the account's domains
    /// (off by default: RFC 6409 §8.1 lets the submission server enforce the sender).
    pub fn any_sender(&self) -> bool {
        self.any_sender
    }

    /// Push delivery: after ATRN drains the queue, the provider keeps the reversed session
    /// open and delivers new mail as it arrives (DESIGN.md "linger").
    pub fn linger(&self) -> bool {
        self.linger
    }

    /// Fingerprints (`sha256:<hex>`, see [`crate::tls::fingerprint`]) of the TLS client
    /// certificates that authenticate as this account with SASL EXTERNAL; sorted.
    pub fn client_certs(&self) -> &[String] {
        &self.client_certs
    }

    /// The account (and SASL authentication) name.
    pub fn name(&self) -> &AccountName {
        &self.name
    }

    /// The domains this account owns, sorted, never empty.
    pub fn domains(&self) -> &[DomainName] {
        &self.domains
    }

    /// True when `domain` is one of this account's.
    pub fn owns(&self, domain: &DomainName) -> bool {
        self.domains.binary_search(domain).is_ok()
    }

    /// The SCRAM-SHA-256 verifier.
    pub fn scram(&self) -> &ScramVerifier {
        &self.scram
    }

    /// The CRAM-MD5 key, when CRAM-MD5 is enabled for this account.
    pub fn cram_md5(&self) -> Option<&CramMd5Key> {
        self.cram_md5.as_ref()
    }

    /// Checks a CRAM-MD5 response (RFC 2195 §2): `response_hex` is the digest part of the
    /// customer's answer to `challenge` (the decoded challenge bytes, angle brackets included).
    /// False when CRAM-MD5 is disabled for this account. The comparison is constant-time.
    pub fn cram_md5_verify(&self, challenge: &[u8], response_hex: &str) -> bool {
        self.cram_md5
            .as_ref()
            .is_some_and(|k| k.verify(challenge, response_hex))
    }
}

/// Every account, indexed by name and by domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    by_name: BTreeMap<AccountName, Account>,
    owner: BTreeMap<DomainName, AccountName>,
    cert_owner: BTreeMap<String, AccountName>,
}

impl Accounts {
    /// Adds an account with verifiers for `password`; CRAM-MD5 only when `cram_md5` is true.
    /// Refused when the name is invalid or taken, `domains` is empty, the password is empty, or
    /// a domain already belongs to another account (the error names both accounts).
    pub fn add(
        &mut self,
        name: &str,
        domains: Vec<DomainName>,
        password: &str,
        cram_md5: bool,
    ) -> Result<(), AccountsError> {
        let name = AccountName::parse(name)
            .map_err(|e| AccountsError::new(AccountsErrorKind::Name(e)).for_account(name))?;
        let named = |kind| AccountsError::new(kind).for_account(name.as_str());
        if password.is_empty() {
            return Err(named(AccountsErrorKind::EmptyPassword));
        }
        if domains.is_empty() {
            return Err(named(AccountsErrorKind::NoDomains));
        }
        // Checked before the (deliberately slow) key derivation.
        self.check_new(&name, &domains)?;
        let scram =
            ScramVerifier::generate(password).map_err(|e| named(AccountsErrorKind::Random(e)))?;
        let cram_md5 = cram_md5.then(|| CramMd5Key::from_password(password));
        self.insert(Account::new(name, domains, scram, cram_md5)?)
    }

    /// Turns push delivery (linger) on or off for the account `name`.
    pub fn set_linger(&mut self, name: &str, linger: bool) -> Result<(), AccountsError> {
        self.existing_mut(name)?.linger = linger;
        Ok(())
    }

    /// Lets the account `name` submit mail from any address (`true`) or only from its own
    /// domains (`false`, the default).
    pub fn set_any_sender(&mut self, name: &str, any: bool) -> Result<(), AccountsError> {
        self.existing_mut(name)?.any_sender = any;
        Ok(())
    }

    /// Lets the TLS client certificate with `fingerprint` authenticate as `name` (SASL
    /// EXTERNAL). Refused when the fingerprint is malformed or pinned to another account.
    pub fn add_client_cert(&mut self, name: &str, fingerprint: &str) -> Result<(), AccountsError> {
        let named = |kind| AccountsError::new(kind).for_account(name);
        let fingerprint = normalise_fingerprint(fingerprint)
            .ok_or_else(|| named(AccountsErrorKind::Fingerprint(fingerprint.to_owned())))?;
        let account = self.account_mut(name)?;
        if let Some(owner) = self.cert_owner.get(&fingerprint) {
            if *owner != account {
                let owner = owner.clone();
                return Err(named(AccountsErrorKind::CertTaken { fingerprint, owner }));
            }
            return Ok(());
        }
        let certs = &mut self
            .by_name
            .get_mut(&account)
            .expect("checked")
            .client_certs;
        certs.push(fingerprint.clone());
        certs.sort();
        self.cert_owner.insert(fingerprint, account);
        Ok(())
    }

    /// Stops the certificate with `fingerprint` from authenticating as `name`.
    pub fn remove_client_cert(
        &mut self,
        name: &str,
        fingerprint: &str,
    ) -> Result<(), AccountsError> {
        let named = |kind| AccountsError::new(kind).for_account(name);
        let fingerprint = normalise_fingerprint(fingerprint)
            .ok_or_else(|| named(AccountsErrorKind::Fingerprint(fingerprint.to_owned())))?;
        let account = self.account_mut(name)?;
        let certs = &mut self
            .by_name
            .get_mut(&account)
            .expect("checked")
            .client_certs;
        let Some(at) = certs.iter().position(|c| *c == fingerprint) else {
            return Err(named(AccountsErrorKind::NoSuchCert(fingerprint)));
        };
        certs.remove(at);
        self.cert_owner.remove(&fingerprint);
        Ok(())
    }

    /// The account a client certificate fingerprint is pinned to (SASL EXTERNAL).
    pub fn account_for_cert(&self, fingerprint: &str) -> Option<&Account> {
        self.cert_owner
            .get(fingerprint)
            .and_then(|name| self.by_name.get(name))
    }

    /// The existing account `name`, or `NoSuchAccount`.
    fn existing_mut(&mut self, name: &str) -> Result<&mut Account, AccountsError> {
        AccountName::parse(name)
            .ok()
            .and_then(|n| self.by_name.get_mut(&n))
            .ok_or_else(|| AccountsError::new(AccountsErrorKind::NoSuchAccount).for_account(name))
    }

    /// The name of an existing account, or `NoSuchAccount`.
    fn account_mut(&self, name: &str) -> Result<AccountName, AccountsError> {
        AccountName::parse(name)
            .ok()
            .filter(|n| self.by_name.contains_key(n))
            .ok_or_else(|| AccountsError::new(AccountsErrorKind::NoSuchAccount).for_account(name))
    }

    /// Removes the account `name` and frees its domains and certificates.
    pub fn remove(&mut self, name: &str) -> Result<Account, AccountsError> {
        let account = AccountName::parse(name)
            .ok()
            .and_then(|n| self.by_name.remove(&n))
            .ok_or_else(|| {
                AccountsError::new(AccountsErrorKind::NoSuchAccount).for_account(name)
            })?;
        for domain in &account.domains {
            self.owner.remove(domain);
        }
        for cert in &account.client_certs {
            self.cert_owner.remove(cert);
        }
        Ok(account)
    }

    /// Every account, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Account> {
        self.by_name.values()
    }

    /// The account called `name` (exact match; names are lower case).
    pub fn account(&self, name: &str) -> Option<&Account> {
        AccountName::parse(name)
            .ok()
            .and_then(|n| self.by_name.get(&n))
    }

    /// The account that owns `domain`, if it is hosted here.
    pub fn account_for_domain(&self, domain: &DomainName) -> Option<&Account> {
        self.owner
            .get(domain)
            .and_then(|name| self.by_name.get(name))
    }

    /// Every hosted domain, sorted.
    pub fn hosted_domains(&self) -> impl Iterator<Item = &DomainName> {
        self.owner.keys()
    }

    /// Number of accounts.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when there are no accounts.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Refuses a taken name or a domain owned by another account.
    fn check_new(&self, name: &AccountName, domains: &[DomainName]) -> Result<(), AccountsError> {
        let named = |kind| AccountsError::new(kind).for_account(name.as_str());
        if self.by_name.contains_key(name) {
            return Err(named(AccountsErrorKind::DuplicateAccount));
        }
        for domain in domains {
            if let Some(owner) = self.owner.get(domain) {
                let kind = AccountsErrorKind::DomainTaken {
                    domain: domain.clone(),
                    owner: owner.clone(),
                };
                return Err(named(kind));
            }
        }
        Ok(())
    }

    pub(super) fn insert(&mut self, account: Account) -> Result<(), AccountsError> {
        self.check_new(&account.name, &account.domains)?;
        let named = |kind| AccountsError::new(kind).for_account(account.name.as_str());
        for fingerprint in &account.client_certs {
            if let Some(owner) = self.cert_owner.get(fingerprint) {
                let kind = AccountsErrorKind::CertTaken {
                    fingerprint: fingerprint.clone(),
                    owner: owner.clone(),
                };
                return Err(named(kind));
            }
        }
        for fingerprint in &account.client_certs {
            self.cert_owner
                .insert(fingerprint.clone(), account.name.clone());
        }
        for domain in &account.domains {
            self.owner.insert(domain.clone(), account.name.clone());
        }
        self.by_name.insert(account.name.clone(), account);
        Ok(())
    }
}

impl Account {
    /// Sorts and de-duplicates `domains`; refuses an empty list.
    pub(super) fn new(
        name: AccountName,
        mut domains: Vec<DomainName>,
        scram: ScramVerifier,
        cram_md5: Option<CramMd5Key>,
    ) -> Result<Account, AccountsError> {
        domains.sort();
        domains.dedup();
        if domains.is_empty() {
            return Err(AccountsError::new(AccountsErrorKind::NoDomains).for_account(name.as_str()));
        }
        Ok(Account {
            name,
            domains,
            scram,
            cram_md5,
            linger: false,
            any_sender: false,
            client_certs: Vec::new(),
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn two_accounts() -> Accounts {
        let mut a = Accounts::default();
        let domain = |d| vec![DomainName::parse(d).unwrap()];
        a.add("gw", domain("gw.example"), "pw1", false).unwrap();
        a.add("other", domain("other.example"), "pw2", false)
            .unwrap();
        a
    }

    #[test]
    fn a_certificate_belongs_to_one_account_and_survives_save_and_load() {
        let mut a = two_accounts();
        let fp = format!("sha256:{}", "01".repeat(32));
        a.add_client_cert("gw", &fp).unwrap();
        a.add_client_cert("gw", &fp).unwrap(); // idempotent
        assert_eq!(
            a.account("gw").unwrap().client_certs(),
            std::slice::from_ref(&fp)
        );
        assert_eq!(a.account_for_cert(&fp).unwrap().name().as_str(), "gw");
        let err = a.add_client_cert("other", &fp).unwrap_err();
        assert!(
            matches!(err.kind(), AccountsErrorKind::CertTaken { .. }),
            "{err}"
        );
        assert!(matches!(
            a.add_client_cert("nobody", &fp).unwrap_err().kind(),
            AccountsErrorKind::NoSuchAccount
        ));

        let path = std::env::temp_dir().join(format!(
            "turnpike-accounts-cert-{}.toml",
            std::process::id()
        ));
        a.save(&path).unwrap();
        let loaded = Accounts::load(&path).unwrap();
        assert_eq!(loaded, a);
        assert_eq!(loaded.account_for_cert(&fp).unwrap().name().as_str(), "gw");

        // A file pinning one certificate to two accounts is refused on load, naming it.
        let text = std::fs::read_to_string(&path).unwrap();
        let doubled = text.replacen(
            "name = \"other\"",
            &format!("name = \"other\"\nclient_certs = [\"{fp}\"]"),
            1,
        );
        std::fs::write(&path, doubled).unwrap();
        let err = Accounts::load(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.to_string()
                .contains("already belongs to account \"gw\""),
            "{err}"
        );

        a.remove_client_cert("gw", &fp).unwrap();
        assert!(a.account_for_cert(&fp).is_none());
        assert!(matches!(
            a.remove_client_cert("gw", &fp).unwrap_err().kind(),
            AccountsErrorKind::NoSuchCert(_)
        ));
        a.add_client_cert("gw", &fp).unwrap();
        a.remove("gw").unwrap();
        assert!(
            a.account_for_cert(&fp).is_none(),
            "removing the account unpins"
        );
    }
}
