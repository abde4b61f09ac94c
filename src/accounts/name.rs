//! Names: account names and TLS client certificate fingerprints, parsed once into the forms
//! the store keeps.
//!
//! An account name is 1 to 64 characters from `a-z`, `0-9`, `.`, `_` and `-`, starting with a
//! letter or digit; upper case is refused rather than folded, so that the name written in the
//! file is the one customers type. A fingerprint is `sha256:` and 64 lowercase hex digits.

use std::fmt;

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

/// Normalises a TLS client certificate fingerprint to `sha256:` and 64 lowercase hex digits.
/// Colons between the hex pairs (as `openssl x509 -fingerprint` prints them) and upper case are
/// accepted; `None` for anything else.
pub fn normalise_fingerprint(text: &str) -> Option<String> {
    let lower = text.trim().to_ascii_lowercase();
    let hex: String = lower
        .strip_prefix("sha256:")
        .or_else(|| lower.strip_prefix("sha256 fingerprint="))?
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(normalise_fingerprint(&ok).unwrap(), want, "{ok:?}");
        }
        for bad in [
            hex.clone(),
            format!("sha1:{hex}"),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}zz", &hex[2..]),
        ] {
            assert_eq!(normalise_fingerprint(&bad), None, "{bad:?}");
        }
    }
}
