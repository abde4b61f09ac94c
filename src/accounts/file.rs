//! The accounts file `<data_dir>/accounts.toml`: its TOML format, and the atomic rewrite.
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
//! The file is written atomically (temp file, fsync, rename, fsync of the directory) with mode
//! 0600, so a crash leaves either the old file or the new one, never a torn one. The rewrite
//! keeps the owner and group of the file it replaces (a first file takes the data dir's), so a
//! `turnpike account` run as root leaves the file readable by the service user. Where the owner
//! cannot be kept, the save fails and the old file stays.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::error::{AccountsError, AccountsErrorKind};
use super::name::{normalise_fingerprint, AccountName};
use super::store::{Account, Accounts};
use super::verifier::{CramMd5Key, ScramVerifier, SCRAM_ITERATIONS};
use crate::config::line_column;
use crate::types::DomainName;

/// Reading and writing; the in-memory rules are in [`super::store`].
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
            no_accounts: self.is_empty(),
            account: self.iter().map(Account::to_raw).collect(),
        };
        text.push_str(&toml::to_string(&raw).expect("accounts serialize to TOML"));
        text
    }
}

/// The file's form of one account, both ways.
impl Account {
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
        let scram = ScramVerifier::from_parts(
            salt,
            s.iterations,
            key32("scram_sha256.stored_key", &s.stored_key)?,
            key32("scram_sha256.server_key", &s.server_key)?,
        );
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
            .map(|c| {
                normalise_fingerprint(c)
                    .ok_or_else(|| named(AccountsErrorKind::Fingerprint(c.to_owned())))
            })
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
            name: self.name.as_str().to_owned(),
            domains: self.domains.iter().map(|d| d.as_str().to_owned()).collect(),
            cram_md5: self.cram_md5.as_ref().map(CramMd5Key::to_hex),
            scram_sha256: RawScram {
                iterations: self.scram.iterations(),
                salt: BASE64.encode(self.scram.salt()),
                stored_key: BASE64.encode(self.scram.stored_key()),
                server_key: BASE64.encode(self.scram.server_key()),
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

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content. The new
/// file has mode 0600 and the owner and group of the file it replaces (or, for a first file, of
/// the directory), so that an administrator running `turnpike account` as root does not take
/// the file away from the service user.
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
    let owner = Owner::wanted(path, dir);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ("cannot write the file", e))
        .and_then(|mut f| {
            owner
                .apply(&f)
                .map_err(|e| ("cannot give the file its owner back", e))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| ("cannot write the file", e))
        });
    let renamed =
        written.and_then(|()| fs::rename(&tmp, path).map_err(|e| ("cannot write the file", e)));
    if let Err((what, e)) = renamed {
        let _ = fs::remove_file(&tmp);
        return Err(fail(what, e));
    }
    // The rename is durable only once the directory entry is on disk.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("cannot sync the directory", e))
}

/// Who the rewritten file belongs to.
enum Owner {
    /// The file it replaces: this owner is kept, or the save fails and the old file stays.
    Kept(u32, u32),
    /// A first file takes the directory's owner where we may give it (we are root); where we
    /// may not, it stays ours.
    Inherited(u32, u32),
    /// Nothing to go by (the metadata could not be read): the file stays ours.
    Ours,
}

impl Owner {
    fn wanted(path: &Path, dir: &Path) -> Owner {
        match (fs::metadata(path), fs::metadata(dir)) {
            (Ok(m), _) => Owner::Kept(m.uid(), m.gid()),
            (Err(e), Ok(d)) if e.kind() == io::ErrorKind::NotFound => {
                Owner::Inherited(d.uid(), d.gid())
            }
            _ => Owner::Ours,
        }
    }

    fn apply(&self, file: &File) -> io::Result<()> {
        let (uid, gid, must) = match *self {
            Owner::Kept(uid, gid) => (uid, gid, true),
            Owner::Inherited(uid, gid) => (uid, gid, false),
            Owner::Ours => return Ok(()),
        };
        let now = file.metadata()?;
        if (now.uid(), now.gid()) == (uid, gid) {
            return Ok(());
        }
        match std::os::unix::fs::fchown(file, Some(uid), Some(gid)) {
            Err(e) if !must => {
                tracing::debug!(error = %e, "a new accounts file keeps our owner");
                Ok(())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::two_accounts;
    use super::*;

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
