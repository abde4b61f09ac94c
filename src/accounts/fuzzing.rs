//! The body of the `accounts` fuzz target (the accounts file parser), shared by the cargo-fuzz
//! crate in `tests/fuzz` and the stable corpus replay in `tests/fuzz_corpus.rs`.

use super::error::AccountsErrorKind;
use super::store::Accounts;

/// A valid file with every field, the start of the grammar pass.
const CANNED: &str = r#"[[account]]
name = "gw"
domains = ["gw.example", "gw.example.org"]
cram_md5 = "9186d855e11eba527a7a52ca82b313e180d62234f0acc9051b527243d41e2740"
linger = true
client_certs = ["sha256:0101010101010101010101010101010101010101010101010101010101010101"]

[account.scram_sha256]
iterations = 4096
salt = "c2FsdHNhbHRzYWx0c2FsdA=="
stored_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
server_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="

[[account]]
name = "other"
domains = ["other.example"]
any_sender = true

[account.scram_sha256]
iterations = 10000
salt = "c2FsdA=="
stored_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
server_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
"#;

/// Parses `data` as an accounts file. With the first byte's top bit set (the grammar pass),
/// the file is the canned valid one with the bytes after the next two written over it at the
/// offset those two give; otherwise `data` itself (lossily UTF-8).
///
/// A file that parses survives its own round trip (written and read back, equal) and keeps
/// the one-owner rules; a refusal says what is wrong on one line, never with an empty reason,
/// and a syntax error names a line and a column.
pub fn parse(data: &[u8]) {
    let text = match data {
        [flags, hi, lo, patch @ ..] if flags & 0x80 != 0 => {
            let mut bytes = CANNED.as_bytes().to_vec();
            let at = usize::from(u16::from_be_bytes([*hi, *lo])) % (bytes.len() + 1);
            let end = (at + patch.len()).min(bytes.len());
            bytes.splice(at..end, patch.iter().copied());
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => String::from_utf8_lossy(data).into_owned(),
    };
    match Accounts::parse(&text) {
        Ok(accounts) => {
            let written = accounts.to_text();
            let back = Accounts::parse(&written).expect("our own text parses");
            assert_eq!(back, accounts);
            assert_eq!(back.to_text(), written);
            let mut owned = 0;
            for account in accounts.iter() {
                assert!(!account.domains().is_empty());
                for domain in account.domains() {
                    let owner = accounts.account_for_domain(domain).expect("an owner");
                    assert_eq!(owner.name(), account.name());
                    owned += 1;
                }
                for cert in account.client_certs() {
                    let owner = accounts.account_for_cert(cert).expect("an owner");
                    assert_eq!(owner.name(), account.name());
                }
            }
            assert_eq!(accounts.hosted_domains().count(), owned);
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.trim().is_empty());
            assert!(!shown.trim_end().ends_with(':'), "{shown}");
            assert!(!shown.contains('\n'), "{shown}");
            if let AccountsErrorKind::Syntax { line, column, .. } = e.kind() {
                assert!(*line >= 1 && *column >= 1, "{shown}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_file_is_valid_and_edge_inputs_pass() {
        assert_eq!(Accounts::parse(CANNED).unwrap().len(), 2);
        let mut edit = vec![0x80];
        edit.extend_from_slice(&(CANNED.find("4096").unwrap() as u16).to_be_bytes());
        edit.extend_from_slice(b"0010");
        parse(&edit);
        for input in [
            &b""[..],
            b"\xff",
            b"[[account]]",
            b"no_accounts = true\n",
            CANNED.as_bytes(),
        ] {
            parse(input);
        }
    }
}
