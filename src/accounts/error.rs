//! Why loading, saving or changing accounts failed: which file, which account, what is wrong.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::name::{AccountName, NameError};
use crate::types::{DomainError, DomainName};

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
    pub(super) fn new(kind: AccountsErrorKind) -> AccountsError {
        AccountsError {
            file: None,
            account: None,
            kind,
        }
    }

    pub(super) fn io(file: &Path, action: &'static str, source: io::Error) -> AccountsError {
        AccountsError::new(AccountsErrorKind::Io { action, source }).in_file(file)
    }

    pub(super) fn in_file(mut self, file: &Path) -> AccountsError {
        self.file = Some(file.to_path_buf());
        self
    }

    pub(super) fn for_account(mut self, name: &str) -> AccountsError {
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
