//! Customer accounts: who may authenticate, with which secrets, and which domains they own.
//!
//! What this owns: the accounts file `<data_dir>/accounts.toml`, the rules for account names,
//! the one-owner-per-domain rule, and the password verifiers that the SASL exchanges
//! ([`crate::proto::sasl`]) check against. One file per concern:
//!
//! - [`name`]: account names and certificate fingerprints, validated.
//! - [`verifier`]: the SCRAM-SHA-256 verifier and the CRAM-MD5 key, on `proto::sasl`'s math.
//! - [`store`]: [`Accounts`], the in-memory set the server consults, and its invariants.
//! - [`file`]: the TOML format and the atomic rewrite.
//! - [`error`]: [`AccountsError`], naming the file and the account.
//! - [`fuzzing`]: the body of the accounts-file fuzz target.
//!
//! Invariants:
//!
//! - No plaintext password is ever stored. Each account has a SCRAM-SHA-256 verifier
//!   (RFC 5802 §3, RFC 7677) and, unless disabled, a CRAM-MD5 key (RFC 2195) kept as the two
//!   HMAC-MD5 intermediate states (RFC 2104 §4), the form Dovecot's `CRAM-MD5` scheme uses.
//! - A domain belongs to at most one account; every account owns at least one domain.
//! - The file is written atomically with mode 0600, so a crash leaves either the old file or
//!   the new one, never a torn one.

pub mod error;
pub mod file;
pub mod fuzzing;
pub mod name;
pub mod store;
pub mod verifier;

pub use error::{AccountsError, AccountsErrorKind};
pub use name::{AccountName, NameError};
pub use store::{Account, Accounts};
pub use verifier::{CramMd5Key, ScramVerifier, SCRAM_ITERATIONS, SCRAM_SALT_LEN};
