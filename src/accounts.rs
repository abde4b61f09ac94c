//! Customer accounts: who may authenticate, with which secrets, and which domains they own.
//!
//! What this owns: the accounts file `<data_dir>/accounts.toml`, the rules for account names,
//! the one-owner-per-domain rule, and the password verifiers that the SASL exchanges
//! (`proto::sasl`) check against.
//!
//! Invariants:
//!
//! - No plaintext password is ever stored. Each account has a SCRAM-SHA-256 verifier
//!   (RFC 5802 §3, RFC 7677) and, unless disabled, a CRAM-MD5 key (RFC 2195) kept as the two
//!   HMAC-MD5 intermediate states (RFC 2104 §4), the form Dovecot's `CRAM-MD5` scheme uses.
//! - A domain belongs to at most one account; every account owns at least one domain.
//! - The file is written atomically (temp file, fsync, rename, fsync of the directory) with mode
//!   0600, so a crash leaves either the old file or the new one, never a torn one.
//!
//! On-disk format (TOML, one `[[account]]` table per account, in name order):
//!
//! ```toml
//! [[account]]
//! name = "tim"
//! domains = ["example.com", "example.org"]
//! cram_md5 = "<64 hex digits>"          # absent when CRAM-MD5 is disabled for the account
//! linger = true                         # absent when off: push delivery after ATRN
//! any_sender = true                     # absent when off: submit mail from any address
//!
//! [account.scram_sha256]
//! iterations = 4096
//! salt = "<base64>"
//! stored_key = "<base64 of 32 bytes>"
//! server_key = "<base64 of 32 bytes>"
//! ```
//!
//! A file with no account must say so: `no_accounts = true` at the top (what `turnpike account
//! remove` writes when it removes the last one). A file that lists no account without it (an
//! emptied or truncated file) is refused, so a reload keeps the accounts it had instead of
//! refusing every recipient.
//!
//! `cram_md5` is Dovecot's 32-byte context in hex: the MD5 state words (little-endian) after
//! absorbing `key ^ opad`, then those after absorbing `key ^ ipad`. Note that this key, unlike the
//! SCRAM verifier, is enough to answer any CRAM-MD5 challenge and is unsalted: it protects the
//! password from reuse elsewhere, not this server from someone who can read the file. That is
//! why the file is 0600 and why CRAM-MD5 can be turned off per account.
//!
//! Passwords are used as their UTF-8 bytes. SASLprep (RFC 4013) is not applied; it changes
//! nothing for printable ASCII passwords.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::line_column;
use crate::types::{DomainError, DomainName};

/// The SCRAM iteration count given to new verifiers, and the least one accepted (RFC 7677 §4).
pub const SCRAM_ITERATIONS: u32 = 4096;

/// Length of the random salt of a new SCRAM verifier, in bytes.
pub const SCRAM_SALT_LEN: usize = 16;

/// An account name: 1 to 64 characters from `a-z`, `0-9`, `.`, `_` and `-`, starting with a
/// letter or digit. Upper case is refused rather than folded, so that the name written in the
/// file is the one customers type.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountName(String);

impl AccountName {
    /// Longest name, in characters (all of them ASCII).
    pub const MAX_LEN: usize = 64;

    /// Checks `s` against the rules above.
    pub fn parse(s: &str) -> Result<AccountName, NameError> {
        let bytes = s.as_bytes();
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN {
            return Err(NameError::Length);
        }
        let allowed = |b: &u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-');
        if !bytes.iter().all(allowed) {
            return Err(NameError::Character);
        }
        if !bytes[0].is_ascii_alphanumeric() {
            return Err(NameError::Start);
        }
        Ok(AccountName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountName({})", self.0)
    }
}

/// Why a string is not an [`AccountName`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// Empty, or longer than [`AccountName::MAX_LEN`].
    Length,
    /// A character other than `a-z`, `0-9`, `.`, `_`, `-`.
    Character,
    /// Starts with `.`, `_` or `-`.
    Start,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameError::Length => "an account name has 1 to 64 characters",
            NameError::Character => "an account name uses only a-z, 0-9, '.', '_' and '-'",
            NameError::Start => "an account name starts with a letter or digit",
        })
    }
}

impl std::error::Error for NameError {}

/// One customer: its name, the domains whose mail it may take with ATRN, and its verifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    name: AccountName,
    domains: Vec<DomainName>,
    scram: ScramVerifier,
    cram_md5: Option<CramMd5Key>,
    linger: bool,
    any_sender: bool,
    client_certs: Vec<String>,
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

/// A SCRAM-SHA-256 verifier (RFC 5802 §3): what the provider keeps instead of the password.
///
/// `SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, iterations)`,
/// `StoredKey = SHA-256(HMAC(SaltedPassword, "Client Key"))`,
/// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ScramVerifier {
    /// Derives the verifier of `password` with a fresh random salt of [`SCRAM_SALT_LEN`] bytes
    /// and [`SCRAM_ITERATIONS`] iterations.
    pub fn generate(password: &str) -> Result<ScramVerifier, getrandom::Error> {
        let mut salt = [0u8; SCRAM_SALT_LEN];
        getrandom::fill(&mut salt)?;
        Ok(ScramVerifier::derive(password, &salt, SCRAM_ITERATIONS))
    }

    /// Derives the verifier of `password` with the given salt and iteration count.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac_sha256(&salted, b"Client Key");
        ScramVerifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// The salt (sent base64-encoded as `s=` in server-first-message).
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// The iteration count (sent as `i=`).
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// `StoredKey`.
    pub fn stored_key(&self) -> &[u8; 32] {
        &self.stored_key
    }

    /// `ServerKey`.
    pub fn server_key(&self) -> &[u8; 32] {
        &self.server_key
    }

    /// Checks the customer's `ClientProof` (the decoded `p=`) for `auth_message`
    /// (client-first-message-bare `,` server-first-message `,` client-final-message-without-proof):
    /// `ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)` must hash to `StoredKey`.
    /// Constant-time.
    pub fn verify_client_proof(&self, auth_message: &[u8], client_proof: &[u8]) -> bool {
        if client_proof.len() != 32 {
            return false;
        }
        let signature = hmac_sha256(&self.stored_key, auth_message);
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(client_proof.iter().zip(signature))
        {
            *k = p ^ s;
        }
        constant_time_eq(&Sha256::digest(client_key), &self.stored_key)
    }

    /// `ServerSignature = HMAC(ServerKey, AuthMessage)`, sent base64-encoded as `v=`.
    pub fn server_signature(&self, auth_message: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.server_key, auth_message)
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// A CRAM-MD5 key kept as the HMAC-MD5 intermediate states (RFC 2104 §4): the MD5 chaining
/// values after one block of `key ^ ipad` (inner) and of `key ^ opad` (outer).
#[derive(Clone, PartialEq, Eq)]
pub struct CramMd5Key {
    inner: [u32; 4],
    outer: [u32; 4],
}

impl CramMd5Key {
    /// Precomputes the states for `password`.
    pub fn from_password(password: &str) -> CramMd5Key {
        CramMd5Key::from_key(password.as_bytes())
    }

    /// Precomputes the states for an HMAC key of any length (longer than a block: hashed first).
    fn from_key(key: &[u8]) -> CramMd5Key {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..16].copy_from_slice(&md5::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| {
            let mut state = md5::INIT;
            md5::compress(&mut state, &block.map(|b| b ^ byte));
            state
        };
        CramMd5Key {
            inner: pad(0x36),
            outer: pad(0x5c),
        }
    }

    /// `HMAC-MD5(key, challenge)`, computed from the stored states.
    pub fn digest(&self, challenge: &[u8]) -> [u8; 16] {
        let mut inner = md5::Md5::resume(self.inner, 1);
        inner.update(challenge);
        let mut outer = md5::Md5::resume(self.outer, 1);
        outer.update(&inner.finalize());
        outer.finalize()
    }

    /// True when `response_hex` (32 hex digits, either case) is the digest of `challenge`.
    /// Constant-time in the digest comparison.
    pub fn verify(&self, challenge: &[u8], response_hex: &str) -> bool {
        match hex_decode(response_hex) {
            Some(response) => constant_time_eq(&response, &self.digest(challenge)),
            None => false,
        }
    }

    /// Dovecot's `CRAM-MD5` encoding: outer then inner state words, little-endian, as hex.
    pub fn to_hex(&self) -> String {
        let bytes: Vec<u8> = self
            .outer
            .iter()
            .chain(&self.inner)
            .flat_map(|w| w.to_le_bytes())
            .collect();
        hex_encode(&bytes)
    }

    /// Reads the encoding of [`CramMd5Key::to_hex`].
    pub fn from_hex(s: &str) -> Option<CramMd5Key> {
        let bytes = hex_decode(s)?;
        if bytes.len() != 32 {
            return None;
        }
        let mut words = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4")));
        let mut next4 = || [(); 4].map(|()| words.next().expect("8 words"));
        let outer = next4();
        let inner = next4();
        Some(CramMd5Key { inner, outer })
    }
}

impl fmt::Debug for CramMd5Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CramMd5Key(..)")
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
    /// Reads the accounts file. A missing file is an empty set of accounts (first run); a file
    /// that lists no account is refused unless it says `no_accounts = true`.
    pub fn load(path: &Path) -> Result<Accounts, AccountsError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Accounts::default()),
            Err(e) => return Err(AccountsError::io(path, "cannot read the file", e)),
        };
        if let Ok(meta) = fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    "accounts file is readable by other users; it holds password verifiers"
                );
            }
        }
        Accounts::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parses the text of an accounts file (see the module docs for the format).
    pub fn parse(text: &str) -> Result<Accounts, AccountsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |s| line_column(text, s.start));
            let at_end = e.span().is_some_and(|s| s.start >= text.trim_end().len());
            AccountsError::new(AccountsErrorKind::Syntax {
                line,
                column,
                message: syntax_message(e.message(), at_end),
            })
        })?;
        match (raw.account.len(), raw.no_accounts) {
            (0, false) => return Err(AccountsError::new(AccountsErrorKind::NoAccounts)),
            (n @ 1.., true) => {
                return Err(AccountsError::new(AccountsErrorKind::NotEmpty {
                    accounts: n,
                }))
            }
            _ => {}
        }
        let mut accounts = Accounts::default();
        for raw in raw.account {
            accounts.insert(Account::from_raw(raw)?)?;
        }
        Ok(accounts)
    }

    /// Writes every account to `path` atomically, mode 0600: a temporary file in the same
    /// directory is written and fsynced, renamed over `path`, and the directory is fsynced.
    pub fn save(&self, path: &Path) -> Result<(), AccountsError> {
        write_atomically(path, self.to_text().as_bytes())
    }

    /// The file's text, as [`save`](Self::save) writes it.
    pub fn to_text(&self) -> String {
        let mut text = String::from(FILE_HEADER);
        let raw = RawFile {
            no_accounts: self.by_name.is_empty(),
            account: self.by_name.values().map(Account::to_raw).collect(),
        };
        text.push_str(&toml::to_string(&raw).expect("accounts serialize to TOML"));
        text
    }

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
        let account = AccountName::parse(name)
            .ok()
            .and_then(|n| self.by_name.get_mut(&n))
            .ok_or_else(|| {
                AccountsError::new(AccountsErrorKind::NoSuchAccount).for_account(name)
            })?;
        account.linger = linger;
        Ok(())
    }

    /// Lets the account `name` submit mail from any address (`true`) or only from its own
    /// domains (`false`, the default).
    pub fn set_any_sender(&mut self, name: &str, any: bool) -> Result<(), AccountsError> {
        let account = AccountName::parse(name)
            .ok()
            .and_then(|n| self.by_name.get_mut(&n))
            .ok_or_else(|| {
                AccountsError::new(AccountsErrorKind::NoSuchAccount).for_account(name)
            })?;
        account.any_sender = any;
        Ok(())
    }

    /// Lets the TLS client certificate with `fingerprint` authenticate as `name` (SASL
    /// EXTERNAL). Refused when the fingerprint is malformed or pinned to another account.
    pub fn add_client_cert(&mut self, name: &str, fingerprint: &str) -> Result<(), AccountsError> {
        let named = |kind| AccountsError::new(kind).for_account(name);
        let fingerprint = parse_fingerprint(fingerprint).map_err(named)?;
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
        let fingerprint = parse_fingerprint(fingerprint).map_err(named)?;
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

    fn insert(&mut self, account: Account) -> Result<(), AccountsError> {
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
    fn new(
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

    fn from_raw(raw: RawAccount) -> Result<Account, AccountsError> {
        let name = AccountName::parse(&raw.name)
            .map_err(|e| AccountsError::new(AccountsErrorKind::Name(e)).for_account(&raw.name))?;
        let named = |kind| AccountsError::new(kind).for_account(&raw.name);
        let domains = raw
            .domains
            .iter()
            .map(|d| {
                DomainName::parse(d).map_err(|error| {
                    named(AccountsErrorKind::Domain {
                        domain: d.clone(),
                        error,
                    })
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let secret = |field: &'static str, why: &'static str| {
            named(AccountsErrorKind::Secret { field, why })
        };
        let s = &raw.scram_sha256;
        if s.iterations < SCRAM_ITERATIONS {
            return Err(secret(
                "scram_sha256.iterations",
                "fewer than 4096 iterations",
            ));
        }
        let salt = BASE64
            .decode(&s.salt)
            .ok()
            .filter(|salt| !salt.is_empty())
            .ok_or_else(|| secret("scram_sha256.salt", "not non-empty base64"))?;
        let key32 = |field, text: &str| {
            BASE64
                .decode(text)
                .ok()
                .and_then(|k| <[u8; 32]>::try_from(k).ok())
                .ok_or_else(|| secret(field, "not base64 of 32 bytes"))
        };
        let scram = ScramVerifier {
            salt,
            iterations: s.iterations,
            stored_key: key32("scram_sha256.stored_key", &s.stored_key)?,
            server_key: key32("scram_sha256.server_key", &s.server_key)?,
        };
        let cram_md5 = match &raw.cram_md5 {
            None => None,
            Some(hex) => Some(
                CramMd5Key::from_hex(hex).ok_or_else(|| secret("cram_md5", "not 64 hex digits"))?,
            ),
        };
        let mut account = Account::new(name, domains, scram, cram_md5)?;
        account.linger = raw.linger;
        account.any_sender = raw.any_sender;
        account.client_certs = raw
            .client_certs
            .iter()
            .map(|c| parse_fingerprint(c).map_err(named))
            .collect::<Result<_, _>>()?;
        account.client_certs.sort();
        account.client_certs.dedup();
        Ok(account)
    }

    fn to_raw(&self) -> RawAccount {
        RawAccount {
            linger: self.linger,
            any_sender: self.any_sender,
            client_certs: self.client_certs.clone(),
            name: self.name.0.clone(),
            domains: self.domains.iter().map(|d| d.as_str().to_owned()).collect(),
            cram_md5: self.cram_md5.as_ref().map(CramMd5Key::to_hex),
            scram_sha256: RawScram {
                iterations: self.scram.iterations,
                salt: BASE64.encode(&self.scram.salt),
                stored_key: BASE64.encode(self.scram.stored_key),
                server_key: BASE64.encode(self.scram.server_key),
            },
        }
    }
}

const FILE_HEADER: &str = "\
# turnpike accounts: written by `turnpike account`, read at start.
# Secrets are SCRAM-SHA-256 verifiers and CRAM-MD5 HMAC states, never passwords;
# keep this file private (mode 0600).

";

/// The file as serde sees it; validated into [`Account`]s by [`Account::from_raw`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// Says that an empty list is meant (see the module docs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    no_accounts: bool,
    #[serde(default)]
    account: Vec<RawAccount>,
}

/// The TOML parser's description of a syntax error, on one line and never empty; `at_end`:
/// the error is where the file ends, which usually means it was cut short.
fn syntax_message(parser: &str, at_end: bool) -> String {
    let lines: Vec<&str> = parser
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut message = if lines.is_empty() {
        "expected a value".to_string()
    } else {
        lines.join("; ")
    };
    if at_end {
        message.push_str(" (the file ends here: it looks truncated)");
    }
    message
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: String,
    domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cram_md5: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    linger: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    any_sender: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    client_certs: Vec<String>,
    scram_sha256: RawScram,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScram {
    iterations: u32,
    salt: String,
    stored_key: String,
    server_key: String,
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AccountsError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{nanos}", std::process::id()));
    let fail = |what, e| AccountsError::io(path, what, e);

    fs::create_dir_all(dir).map_err(|e| fail("cannot create the directory", e))?;
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(fail("cannot write the file", e));
    }
    // The rename is durable only once the directory entry is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("cannot sync the directory", e))
}

/// Why loading, saving or changing accounts failed: which file, which account, what is wrong.
#[derive(Debug)]
pub struct AccountsError {
    file: Option<PathBuf>,
    account: Option<String>,
    kind: AccountsErrorKind,
}

/// What is wrong, without the file and account (see [`AccountsError`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum AccountsErrorKind {
    /// Reading, writing or syncing failed.
    Io {
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not valid TOML or does not have the accounts layout.
    Syntax {
        /// Line of the offending input, from 1 (0 when unknown).
        line: usize,
        /// Column of the offending input, from 1 (0 when unknown).
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// The account name breaks the [`AccountName`] rules.
    Name(NameError),
    /// A listed domain is not a valid domain name.
    Domain {
        /// The domain as written.
        domain: String,
        /// Why it is invalid.
        error: DomainError,
    },
    /// The account would own no domain.
    NoDomains,
    /// The file lists no account and does not say `no_accounts = true`.
    NoAccounts,
    /// The file says `no_accounts = true` but lists accounts.
    NotEmpty {
        /// How many it lists.
        accounts: usize,
    },
    /// An account with this name exists already.
    DuplicateAccount,
    /// The domain already belongs to another account.
    DomainTaken {
        /// The contested domain.
        domain: DomainName,
        /// The account that owns it.
        owner: AccountName,
    },
    /// A stored verifier is malformed.
    Secret {
        /// The field, as a dotted path inside the account.
        field: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An empty password was given.
    EmptyPassword,
    /// No account has this name.
    NoSuchAccount,
    /// A client certificate fingerprint is not `sha256:` and 64 hex digits.
    Fingerprint(String),
    /// The client certificate is pinned to another account already.
    CertTaken {
        /// The contested fingerprint.
        fingerprint: String,
        /// The account it is pinned to.
        owner: AccountName,
    },
    /// The account has no client certificate with this fingerprint.
    NoSuchCert(String),
    /// The system's random number generator failed (no salt could be made).
    Random(getrandom::Error),
}

impl AccountsError {
    fn new(kind: AccountsErrorKind) -> AccountsError {
        AccountsError {
            file: None,
            account: None,
            kind,
        }
    }

    fn io(file: &Path, action: &'static str, source: io::Error) -> AccountsError {
        AccountsError::new(AccountsErrorKind::Io { action, source }).in_file(file)
    }

    fn in_file(mut self, file: &Path) -> AccountsError {
        self.file = Some(file.to_path_buf());
        self
    }

    fn for_account(mut self, name: &str) -> AccountsError {
        self.account = Some(name.to_owned());
        self
    }

    /// The accounts file, when the error came from loading or saving one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The account concerned, as given (it may not be a valid name).
    pub fn account(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// What is wrong.
    pub fn kind(&self) -> &AccountsErrorKind {
        &self.kind
    }
}

impl fmt::Display for AccountsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        if let Some(account) = &self.account {
            write!(f, "account {account:?}: ")?;
        }
        match &self.kind {
            AccountsErrorKind::Io { action, source } => write!(f, "{action}: {source}"),
            AccountsErrorKind::Syntax {
                line,
                column,
                message,
            } => {
                write!(
                    f,
                    "line {line}, column {column}: invalid accounts file: {message}"
                )
            }
            AccountsErrorKind::Name(e) => e.fmt(f),
            AccountsErrorKind::Domain { domain, error } => write!(f, "domain {domain:?}: {error}"),
            AccountsErrorKind::NoDomains => f.write_str("an account needs at least one domain"),
            AccountsErrorKind::NoAccounts => f.write_str(
                "the file lists no account; if no account is meant, say so with \
                 `no_accounts = true` at the top (an emptied or truncated file is refused)",
            ),
            AccountsErrorKind::NotEmpty { accounts } => write!(
                f,
                "the file says `no_accounts = true` but lists {accounts} account(s)"
            ),
            AccountsErrorKind::DuplicateAccount => f.write_str("an account of that name exists"),
            AccountsErrorKind::DomainTaken { domain, owner } => {
                write!(
                    f,
                    "domain {domain} already belongs to account {:?}",
                    owner.as_str()
                )
            }
            AccountsErrorKind::Secret { field, why } => write!(f, "{field}: {why}"),
            AccountsErrorKind::EmptyPassword => f.write_str("the password is empty"),
            AccountsErrorKind::NoSuchAccount => f.write_str("no such account"),
            AccountsErrorKind::Fingerprint(v) => write!(
                f,
                "client certificate fingerprint {v:?} is not \"sha256:\" and 64 hex digits"
            ),
            AccountsErrorKind::CertTaken { fingerprint, owner } => write!(
                f,
                "client certificate {fingerprint} already belongs to account {:?}",
                owner.as_str()
            ),
            AccountsErrorKind::NoSuchCert(v) => write!(f, "no client certificate {v}"),
            AccountsErrorKind::Random(e) => write!(f, "cannot make a random salt: {e}"),
        }
    }
}

impl std::error::Error for AccountsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            AccountsErrorKind::Io { source, .. } => Some(source),
            AccountsErrorKind::Name(e) => Some(e),
            AccountsErrorKind::Domain { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Normalises a fingerprint to `sha256:` and 64 lowercase hex digits. Colons between the hex
/// pairs (as `openssl x509 -fingerprint` prints them) and upper case are accepted.
fn parse_fingerprint(text: &str) -> Result<String, AccountsErrorKind> {
    let bad = || AccountsErrorKind::Fingerprint(text.to_owned());
    let lower = text.trim().to_ascii_lowercase();
    let hex: String = lower
        .strip_prefix("sha256:")
        .or_else(|| lower.strip_prefix("sha256 fingerprint="))
        .ok_or_else(bad)?
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(format!("sha256:{hex}"))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Equality whose running time depends only on the lengths, not on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// MD5 (RFC 1321) with a resumable chaining state.
///
/// The `md-5` crate keeps its state private, and a CRAM-MD5 key is exactly such a state, so
/// this small implementation exists to start hashing from one. It is only ever fed the HMAC
/// padding blocks and SASL challenges, never anything performance-critical.
mod md5 {
    /// The initial chaining value (RFC 1321 §3.3).
    pub(super) const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

    /// `floor(abs(sin(i + 1)) * 2^32)` (RFC 1321 §3.4).
    const K: [u32; 64] = [
        0xd76a_a478,
        0xe8c7_b756,
        0x2420_70db,
        0xc1bd_ceee,
        0xf57c_0faf,
        0x4787_c62a,
        0xa830_4613,
        0xfd46_9501,
        0x6980_98d8,
        0x8b44_f7af,
        0xffff_5bb1,
        0x895c_d7be,
        0x6b90_1122,
        0xfd98_7193,
        0xa679_438e,
        0x49b4_0821,
        0xf61e_2562,
        0xc040_b340,
        0x265e_5a51,
        0xe9b6_c7aa,
        0xd62f_105d,
        0x0244_1453,
        0xd8a1_e681,
        0xe7d3_fbc8,
        0x21e1_cde6,
        0xc337_07d6,
        0xf4d5_0d87,
        0x455a_14ed,
        0xa9e3_e905,
        0xfcef_a3f8,
        0x676f_02d9,
        0x8d2a_4c8a,
        0xfffa_3942,
        0x8771_f681,
        0x6d9d_6122,
        0xfde5_380c,
        0xa4be_ea44,
        0x4bde_cfa9,
        0xf6bb_4b60,
        0xbebf_bc70,
        0x289b_7ec6,
        0xeaa1_27fa,
        0xd4ef_3085,
        0x0488_1d05,
        0xd9d4_d039,
        0xe6db_99e5,
        0x1fa2_7cf8,
        0xc4ac_5665,
        0xf429_2244,
        0x432a_ff97,
        0xab94_23a7,
        0xfc93_a039,
        0x655b_59c3,
        0x8f0c_cc92,
        0xffef_f47d,
        0x8584_5dd1,
        0x6fa8_7e4f,
        0xfe2c_e6e0,
        0xa301_4314,
        0x4e08_11a1,
        0xf753_7e82,
        0xbd3a_f235,
        0x2ad7_d2bb,
        0xeb86_d391,
    ];

    /// Per-round left rotations, four per round.
    const S: [[u32; 4]; 4] = [
        [7, 12, 17, 22],
        [5, 9, 14, 20],
        [4, 11, 16, 23],
        [6, 10, 15, 21],
    ];

    /// Absorbs one 64-byte block into `state`.
    pub(super) fn compress(state: &mut [u32; 4], block: &[u8; 64]) {
        let mut m = [0u32; 16];
        for (word, bytes) in m.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
        }
        let [mut a, mut b, mut c, mut d] = *state;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(K[i]).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(S[i / 16][i % 4]));
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }

    /// A streaming MD5 computation.
    pub(super) struct Md5 {
        state: [u32; 4],
        buf: [u8; 64],
        buffered: usize,
        /// Bytes absorbed so far, including those in `buf`.
        total: u64,
    }

    impl Md5 {
        /// A fresh hash.
        pub(super) fn new() -> Md5 {
            Md5::resume(INIT, 0)
        }

        /// Continues from `state`, reached after absorbing `blocks` whole 64-byte blocks.
        pub(super) fn resume(state: [u32; 4], blocks: u64) -> Md5 {
            Md5 {
                state,
                buf: [0; 64],
                buffered: 0,
                total: blocks * 64,
            }
        }

        pub(super) fn update(&mut self, mut data: &[u8]) {
            self.total = self.total.wrapping_add(data.len() as u64);
            while !data.is_empty() {
                let take = (64 - self.buffered).min(data.len());
                self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
                self.buffered += take;
                data = &data[take..];
                if self.buffered == 64 {
                    compress(&mut self.state, &self.buf);
                    self.buffered = 0;
                }
            }
        }

        pub(super) fn finalize(mut self) -> [u8; 16] {
            let bit_len = self.total.wrapping_mul(8);
            self.update(&[0x80]);
            while self.buffered != 56 {
                self.update(&[0]);
            }
            self.update(&bit_len.to_le_bytes());
            debug_assert_eq!(self.buffered, 0);
            let mut out = [0u8; 16];
            for (bytes, word) in out.chunks_exact_mut(4).zip(self.state) {
                bytes.copy_from_slice(&word.to_le_bytes());
            }
            out
        }
    }

    /// MD5 of `data` in one go.
    pub(super) fn digest(data: &[u8]) -> [u8; 16] {
        let mut h = Md5::new();
        h.update(data);
        h.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_rfc1321_test_suite() {
        // RFC 1321 appendix A.5.
        let table = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, want) in table {
            assert_eq!(
                hex_encode(&md5::digest(input.as_bytes())),
                want,
                "{input:?}"
            );
            // The same input fed in two pieces, split at every offset.
            for split in 0..=input.len() {
                let mut h = md5::Md5::new();
                h.update(&input.as_bytes()[..split]);
                h.update(&input.as_bytes()[split..]);
                assert_eq!(
                    hex_encode(&h.finalize()),
                    want,
                    "{input:?} split at {split}"
                );
            }
        }
    }

    #[test]
    fn md5_matches_the_md5_crate_around_block_boundaries() {
        use md5_crate::Digest as _;
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..data.len() {
            let want: [u8; 16] = md5_crate::Md5::digest(&data[..len]).into();
            assert_eq!(md5::digest(&data[..len]), want, "length {len}");
        }
    }

    use ::md5 as md5_crate;

    #[test]
    fn hmac_md5_from_stored_states_rfc2104_vectors() {
        // RFC 2104 §Appendix (test vectors 1-3) and RFC 2202 §2 (a key longer than a block).
        let table: [(Vec<u8>, Vec<u8>, &str); 5] = [
            (
                vec![0x0b; 16],
                b"Hi There".to_vec(),
                "9294727a3638bb1c13f48ef8158bfc9d",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "750c783e6ab0b503eaa86e310a5db738",
            ),
            (
                vec![0xaa; 16],
                vec![0xdd; 50],
                "56be34521d144c88dbb8c733f0e8b3f6",
            ),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd",
            ),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data"
                    .to_vec(),
                "6f630fad67cda0ee1fb1f562db3aa53e",
            ),
        ];
        for (key, data, want) in &table {
            let stored = CramMd5Key::from_key(key);
            assert_eq!(hex_encode(&stored.digest(data)), *want);
            let mut reference = Hmac::<md5_crate::Md5>::new_from_slice(key).unwrap();
            reference.update(data);
            assert_eq!(
                stored.digest(data),
                <[u8; 16]>::from(reference.finalize().into_bytes())
            );
        }
    }

    #[test]
    fn hmac_md5_matches_the_hmac_crate_for_many_lengths() {
        for key_len in [0, 1, 15, 16, 63, 64, 65, 200] {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 13 + 1) as u8).collect();
            let stored = CramMd5Key::from_key(&key);
            for data_len in [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 500] {
                let data: Vec<u8> = (0..data_len).map(|i| (i * 31 + 5) as u8).collect();
                let mut reference = Hmac::<md5_crate::Md5>::new_from_slice(&key).unwrap();
                reference.update(&data);
                let want: [u8; 16] = reference.finalize().into_bytes().into();
                assert_eq!(stored.digest(&data), want, "key {key_len} data {data_len}");
            }
        }
    }

    #[test]
    fn account_names() {
        for good in ["a", "tim", "0", "a.b_c-d", "9lives", &"x".repeat(64)] {
            assert!(AccountName::parse(good).is_ok(), "{good:?} refused");
        }
        let table = [
            ("", NameError::Length),
            (&*"x".repeat(65), NameError::Length),
            ("Tim", NameError::Character),
            ("tim@example.com", NameError::Character),
            ("a b", NameError::Character),
            ("é", NameError::Character),
            (".hidden", NameError::Start),
            ("-rf", NameError::Start),
            ("_x", NameError::Start),
        ];
        for (bad, want) in table {
            assert_eq!(AccountName::parse(bad), Err(want), "{bad:?}");
        }
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        assert_eq!(hex_decode("00ffA5"), Some(vec![0, 0xff, 0xa5]));
        assert_eq!(hex_encode(&[0, 0xff, 0xa5]), "00ffa5");
        for bad in ["0", "0g", "zz", "+1"] {
            assert_eq!(hex_decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn constant_time_eq_compares_content_and_length() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    fn two_accounts() -> Accounts {
        let mut a = Accounts::default();
        let domain = |d| vec![DomainName::parse(d).unwrap()];
        a.add("gw", domain("gw.example"), "pw1", false).unwrap();
        a.add("other", domain("other.example"), "pw2", false)
            .unwrap();
        a
    }

    #[test]
    fn fingerprints_are_normalised_or_refused() {
        let hex = "ab".repeat(32);
        let want = format!("sha256:{hex}");
        let colons = hex
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        for ok in [
            want.clone(),
            format!("SHA256:{}", hex.to_ascii_uppercase()),
            format!("sha256 Fingerprint={colons}"),
            format!("  sha256:{colons}\n"),
        ] {
            assert_eq!(parse_fingerprint(&ok).unwrap(), want, "{ok:?}");
        }
        for bad in [
            hex.clone(),
            format!("sha1:{hex}"),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}zz", &hex[2..]),
        ] {
            assert!(parse_fingerprint(&bad).is_err(), "{bad:?}");
        }
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
        let text = fs::read_to_string(&path).unwrap();
        let doubled = text.replacen(
            "name = \"other\"",
            &format!("name = \"other\"\nclient_certs = [\"{fp}\"]"),
            1,
        );
        fs::write(&path, doubled).unwrap();
        let err = Accounts::load(&path).unwrap_err();
        fs::remove_file(&path).unwrap();
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

    #[test]
    fn a_file_without_accounts_must_say_so() {
        let empty = Accounts::default();
        let text = empty.to_text();
        assert!(text.contains("no_accounts = true"), "{text}");
        assert_eq!(Accounts::parse(&text).unwrap(), empty);
        for bad in [
            "",
            "\n",
            "# only a comment\n",
            FILE_HEADER,
            "no_accounts = false\n",
        ] {
            let err = Accounts::parse(bad).unwrap_err();
            assert!(
                matches!(err.kind(), AccountsErrorKind::NoAccounts),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("no_accounts = true"), "{err}");
        }
        let both = format!("no_accounts = true\n{}", two_accounts().to_text());
        let err = Accounts::parse(&both).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the file says `no_accounts = true` but lists 2 account(s)"
        );
    }

    /// Cut at every byte: a prefix is a valid file with fewer accounts, or an error that names
    /// a line and column and says what is wrong (never an empty reason).
    #[test]
    fn a_truncated_file_is_refused_with_a_reason() {
        let full = two_accounts();
        let text = full.to_text();
        assert_eq!(Accounts::parse(&text).unwrap(), full);
        let mut refused = 0;
        for cut in (0..text.len()).filter(|c| text.is_char_boundary(*c)) {
            match Accounts::parse(&text[..cut]) {
                Ok(a) => assert!(
                    a.len() < full.len() || text[cut..].trim().is_empty(),
                    "cut at {cut}: {:?}",
                    &text[cut..]
                ),
                Err(e) => {
                    refused += 1;
                    let shown = e.to_string();
                    if let AccountsErrorKind::Syntax {
                        line,
                        column,
                        message,
                    } = e.kind()
                    {
                        assert!(*line >= 1 && *column >= 1, "cut at {cut}: {shown}");
                        assert!(!message.trim().is_empty(), "cut at {cut}: {shown}");
                        assert!(!message.contains('\n'), "cut at {cut}: {shown}");
                    }
                    assert!(!shown.trim_end().ends_with(':'), "cut at {cut}: {shown}");
                }
            }
        }
        assert!(refused > text.len() / 2);
        // The case reported: `name =` and then the end of the file.
        let cut = text.find("name = ").unwrap() + "name =".len();
        let e = Accounts::parse(&text[..cut]).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with("line ") && shown.contains("expected a value"),
            "{shown}"
        );
        assert!(shown.contains("truncated"), "{shown}");
    }
}
