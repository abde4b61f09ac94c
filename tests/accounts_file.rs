//! The accounts file and the verifiers: round trips through disk, atomic saves, the
//! one-owner-per-domain rule, and the RFC 7677 / RFC 2195 examples.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use turnpike::accounts::{Accounts, AccountsErrorKind, CramMd5Key, ScramVerifier};
use turnpike::types::DomainName;

mod common;
use common::Scratch;

fn domains(list: &[&str]) -> Vec<DomainName> {
    list.iter().map(|d| DomainName::parse(d).unwrap()).collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

const RFC2195_CHALLENGE: &[u8] = b"<1896.697170952@postoffice.reston.mci.net>";
const RFC2195_DIGEST: &str = "b913a602c7eda7a495b4e6e7334d3890";

#[test]
fn missing_file_is_empty() {
    let dir = Scratch::new();
    let accounts = Accounts::load(&dir.path("accounts.toml")).unwrap();
    assert!(accounts.is_empty());
    assert_eq!(accounts.hosted_domains().count(), 0);
}

#[test]
fn round_trip_through_disk() {
    let dir = Scratch::new();
    let path = dir.path("accounts.toml");
    let mut accounts = Accounts::default();
    accounts
        .add(
            "tim",
            domains(&["example.com", "Example.ORG"]),
            "tanstaaftanstaaf",
            true,
        )
        .unwrap();
    accounts
        .add("alice", domains(&["alice.example"]), "pencil", false)
        .unwrap();
    accounts.save(&path).unwrap();

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("tanstaaftanstaaf") && !text.contains("pencil"),
        "{text}"
    );
    assert!(text.contains("name = \"tim\""), "{text}");

    let loaded = Accounts::load(&path).unwrap();
    assert_eq!(loaded, accounts);
    let names: Vec<&str> = loaded.iter().map(|a| a.name().as_str()).collect();
    assert_eq!(names, ["alice", "tim"]);
    let hosted: Vec<&str> = loaded.hosted_domains().map(DomainName::as_str).collect();
    assert_eq!(hosted, ["alice.example", "example.com", "example.org"]);

    let tim = loaded
        .account_for_domain(&domains(&["example.org"])[0])
        .unwrap();
    assert_eq!(tim.name().as_str(), "tim");
    assert_eq!(tim.domains(), domains(&["example.com", "example.org"]));
    assert!(tim.cram_md5_verify(RFC2195_CHALLENGE, RFC2195_DIGEST));

    let alice = loaded.account("alice").unwrap();
    assert!(alice.cram_md5().is_none());
    assert!(!alice.cram_md5_verify(RFC2195_CHALLENGE, RFC2195_DIGEST));
    assert!(loaded
        .account_for_domain(&domains(&["other.example"])[0])
        .is_none());
}

#[test]
fn save_is_atomic_and_private() {
    let dir = Scratch::new();
    let path = dir.path("accounts.toml");
    // A pre-existing, world-readable file is replaced, not rewritten in place.
    std::fs::write(&path, "").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut accounts = Accounts::default();
    accounts
        .add("tim", domains(&["example.com"]), "secret", true)
        .unwrap();
    accounts.save(&path).unwrap();
    accounts
        .add("bob", domains(&["bob.example"]), "secret2", true)
        .unwrap();
    accounts.save(&path).unwrap();

    assert_eq!(
        dir.entries(),
        ["accounts.toml"],
        "a temporary file was left behind"
    );
    assert_eq!(mode(&path), 0o600);
    assert_eq!(Accounts::load(&path).unwrap().len(), 2);
}

#[test]
fn save_creates_the_data_dir() {
    let dir = Scratch::new();
    let path = dir.path("data/accounts.toml");
    let mut accounts = Accounts::default();
    accounts
        .add("tim", domains(&["example.com"]), "secret", true)
        .unwrap();
    accounts.save(&path).unwrap();
    assert_eq!(Accounts::load(&path).unwrap(), accounts);
}

#[test]
fn save_failure_names_the_file() {
    let dir = Scratch::new();
    std::fs::write(dir.path("plainfile"), "").unwrap();
    let path = dir.path("plainfile/accounts.toml");
    let err = Accounts::default().save(&path).unwrap_err();
    assert_eq!(err.file(), Some(path.as_path()));
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", path.display())),
        "{err}"
    );
}

#[test]
fn a_domain_has_one_owner() {
    let mut accounts = Accounts::default();
    accounts
        .add(
            "alice",
            domains(&["shared.example", "a.example"]),
            "pw1",
            true,
        )
        .unwrap();
    let err = accounts
        .add(
            "bob",
            domains(&["b.example", "shared.example"]),
            "pw2",
            true,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "account \"bob\": domain shared.example already belongs to account \"alice\""
    );
    assert!(
        matches!(err.kind(), AccountsErrorKind::DomainTaken { owner, .. } if owner.as_str() == "alice")
    );
    // Nothing of the refused account was recorded.
    assert!(accounts.account("bob").is_none());
    assert!(accounts
        .account_for_domain(&domains(&["b.example"])[0])
        .is_none());

    // Removing the owner frees the domain.
    let removed = accounts.remove("alice").unwrap();
    assert_eq!(removed.name().as_str(), "alice");
    assert_eq!(accounts.hosted_domains().count(), 0);
    accounts
        .add(
            "bob",
            domains(&["b.example", "shared.example"]),
            "pw2",
            true,
        )
        .unwrap();
    let owner = accounts
        .account_for_domain(&domains(&["shared.example"])[0])
        .unwrap();
    assert_eq!(owner.name().as_str(), "bob");
}

#[test]
fn add_and_remove_refusals_name_the_account() {
    let mut accounts = Accounts::default();
    accounts
        .add("tim", domains(&["example.com"]), "pw", true)
        .unwrap();
    let table: Vec<(Result<(), _>, &str)> = vec![
        (
            accounts.add("tim", domains(&["other.example"]), "pw", true),
            "account \"tim\": an account of that name exists",
        ),
        (
            accounts.add("Tim", domains(&["other.example"]), "pw", true),
            "account \"Tim\": an account name uses only a-z, 0-9, '.', '_' and '-'",
        ),
        (
            accounts.add("new", Vec::new(), "pw", true),
            "account \"new\": an account needs at least one domain",
        ),
        (
            accounts.add("new", domains(&["new.example"]), "", true),
            "account \"new\": the password is empty",
        ),
        (
            accounts.remove("nobody").map(drop),
            "account \"nobody\": no such account",
        ),
    ];
    for (result, want) in table {
        assert_eq!(result.unwrap_err().to_string(), want);
    }
    assert_eq!(accounts.len(), 1);
}

#[test]
fn load_errors_name_the_file_and_account() {
    let dir = Scratch::new();
    let path = dir.path("accounts.toml");
    let mut good = Accounts::default();
    good.add("alice", domains(&["shared.example"]), "pw", true)
        .unwrap();
    good.add("bob", domains(&["bob.example"]), "pw", true)
        .unwrap();
    good.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let file = path.display().to_string();

    let table = [
        (
            text.replace("\"bob.example\"", "\"shared.example\""),
            format!("{file}: account \"bob\": domain shared.example already belongs to account \"alice\""),
        ),
        (
            text.replace("\"bob.example\"", "\"bob_example\""),
            format!(
                "{file}: account \"bob\": domain \"bob_example\": domain name is not letters, \
                 digits and hyphens"
            ),
        ),
        (
            text.replace("name = \"bob\"", "name = \"-bob\""),
            format!("{file}: account \"-bob\": an account name starts with a letter or digit"),
        ),
        (
            text.replacen("iterations = 4096", "iterations = 10", 1),
            format!("{file}: account \"alice\": scram_sha256.iterations: fewer than 4096 iterations"),
        ),
        (
            text.replacen("stored_key = \"", "stored_key = \"!", 1),
            format!("{file}: account \"alice\": scram_sha256.stored_key: not base64 of 32 bytes"),
        ),
        (
            text.replacen("cram_md5 = \"", "cram_md5 = \"ab", 1),
            format!("{file}: account \"alice\": cram_md5: not 64 hex digits"),
        ),
    ];
    for (broken, want) in table {
        std::fs::write(&path, &broken).unwrap();
        let err = Accounts::load(&path).unwrap_err();
        assert_eq!(err.to_string(), want, "file was:\n{broken}");
        assert_eq!(err.file(), Some(path.as_path()));
    }

    std::fs::write(
        &path,
        "[[account]]\nname = \"x\"\ndomains = [\"x.example\"]\npassword = \"no\"\n",
    )
    .unwrap();
    let err = Accounts::load(&path).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{file}: line ")), "{err}");
    assert!(err.contains("password"), "{err}");
}

#[test]
fn scram_verifier_reproduces_rfc7677_example() {
    // RFC 7677 §3: user "user", password "pencil".
    let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    let verifier = ScramVerifier::derive("pencil", &salt, 4096);
    let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
         r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
         c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    let proof = BASE64
        .decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        .unwrap();
    let server_signature = BASE64
        .decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
        .unwrap();

    assert!(verifier.verify_client_proof(auth_message.as_bytes(), &proof));
    assert_eq!(
        verifier
            .server_signature(auth_message.as_bytes())
            .as_slice(),
        server_signature
    );
    assert_eq!(verifier.salt(), salt);
    assert_eq!(verifier.iterations(), 4096);

    let mut tampered = proof.clone();
    tampered[31] ^= 1;
    assert!(!verifier.verify_client_proof(auth_message.as_bytes(), &tampered));
    assert!(!verifier.verify_client_proof(auth_message.as_bytes(), &proof[..31]));
    assert!(!verifier.verify_client_proof(b"n=user,r=other", &proof));
    let wrong_password = ScramVerifier::derive("pencil2", &salt, 4096);
    assert!(!wrong_password.verify_client_proof(auth_message.as_bytes(), &proof));
}

#[test]
fn generated_scram_verifiers_use_fresh_salts() {
    let a = ScramVerifier::generate("pencil").unwrap();
    let b = ScramVerifier::generate("pencil").unwrap();
    assert_eq!(a.salt().len(), 16);
    assert_ne!(a.salt(), b.salt());
    assert_ne!(a.stored_key(), b.stored_key());
    assert_eq!(a.iterations(), 4096);
    assert_eq!(ScramVerifier::derive("pencil", a.salt(), 4096), a);
}

#[test]
fn cram_md5_rfc2195_example() {
    let key = CramMd5Key::from_password("tanstaaftanstaaf");
    assert!(key.verify(RFC2195_CHALLENGE, RFC2195_DIGEST));
    assert!(key.verify(RFC2195_CHALLENGE, &RFC2195_DIGEST.to_ascii_uppercase()));
    assert!(!key.verify(RFC2195_CHALLENGE, "b913a602c7eda7a495b4e6e7334d3891"));
    assert!(!key.verify(RFC2195_CHALLENGE, &RFC2195_DIGEST[..30]));
    assert!(!key.verify(RFC2195_CHALLENGE, "not hex at all, but 32 chars lng"));
    assert!(!key.verify(
        b"<1897.697170952@postoffice.reston.mci.net>",
        RFC2195_DIGEST
    ));
    assert!(!CramMd5Key::from_password("tanstaaf").verify(RFC2195_CHALLENGE, RFC2195_DIGEST));

    // The stored form survives its hex encoding.
    let hex = key.to_hex();
    assert_eq!(hex.len(), 64);
    let back = CramMd5Key::from_hex(&hex).unwrap();
    assert!(back.verify(RFC2195_CHALLENGE, RFC2195_DIGEST));
    assert_eq!(back, key);
}

#[test]
fn cram_md5_key_is_dovecot_compatible() {
    // `doveadm pw -s CRAM-MD5 -p password`, as recorded in postfixadmin's tests.
    let dovecot = "9186d855e11eba527a7a52ca82b313e180d62234f0acc9051b527243d41e2740";
    assert_eq!(CramMd5Key::from_password("password").to_hex(), dovecot);
    let imported = CramMd5Key::from_hex(dovecot).unwrap();
    let want = {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<md5::Md5>::new_from_slice(b"password").unwrap();
        mac.update(RFC2195_CHALLENGE);
        mac.finalize().into_bytes()
    };
    assert_eq!(
        imported.digest(RFC2195_CHALLENGE).as_slice(),
        want.as_slice()
    );
}

#[test]
fn any_sender_round_trips_and_defaults_to_own() {
    let dir = Scratch::new();
    let path = dir.path("accounts.toml");
    let mut accounts = Accounts::default();
    accounts
        .add("tim", domains(&["example.com"]), "pencil", false)
        .unwrap();
    accounts
        .add("alice", domains(&["alice.example"]), "pencil", false)
        .unwrap();
    assert!(!accounts.account("tim").unwrap().any_sender());
    accounts.set_any_sender("tim", true).unwrap();
    assert!(accounts.set_any_sender("nobody", true).is_err());
    accounts.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.matches("any_sender = true").count(), 1, "{text}");

    let mut loaded = Accounts::load(&path).unwrap();
    assert!(loaded.account("tim").unwrap().any_sender());
    assert!(!loaded.account("alice").unwrap().any_sender());
    loaded.set_any_sender("tim", false).unwrap();
    loaded.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("any_sender"), "{text}");
}

/// `sudo turnpike account add` must not take the file away from the service user: a rewrite
/// keeps the file's owner and group (mode 0600), and a new file takes the data dir's owner.
#[test]
fn save_keeps_the_owner_of_the_file() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED save_keeps_the_owner_of_the_file: needs root to chown the test file");
        return;
    }
    let (uid, gid) = (65534, 65534);
    let owner = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    };
    let dir = Scratch::new();
    let path = dir.path("accounts.toml");
    let mut accounts = Accounts::default();
    accounts
        .add("tim", domains(&["example.com"]), "secret", true)
        .unwrap();
    accounts.save(&path).unwrap();
    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    accounts
        .add("bob", domains(&["bob.example"]), "secret2", true)
        .unwrap();
    accounts.save(&path).unwrap();
    assert_eq!(owner(&path), (uid, gid), "the rewrite changed the owner");
    assert_eq!(mode(&path), 0o600);
    assert_eq!(Accounts::load(&path).unwrap().len(), 2);

    // A first file in a data dir that belongs to the service user is the service user's.
    let data = dir.path("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
    let fresh = data.join("accounts.toml");
    accounts.save(&fresh).unwrap();
    assert_eq!(
        owner(&fresh),
        (uid, gid),
        "a new file should take the dir's owner"
    );
    assert_eq!(mode(&fresh), 0o600);
    assert_eq!(dir.entries(), ["accounts.toml", "data"]);
}
