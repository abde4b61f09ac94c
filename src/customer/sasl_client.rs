//! The customer's side of SMTP AUTH (RFC 4954): SCRAM-SHA-256 (RFC 5802, RFC 7677), PLAIN
//! (RFC 4616), CRAM-MD5 (RFC 2195) and EXTERNAL (RFC 4422 Appendix A), and the choice between
//! them from the provider's EHLO offer.
//!
//! Pure functions and one small state machine, no I/O: the session driver sends the lines and
//! passes the provider's `334` payloads back in. Payloads are base64 text without the `334 `.
//!
//! SCRAM exchange (no channel binding, gs2 header `n,,`):
//!
//! ```text
//! ScramClient::new --> AUTH SCRAM-SHA-256 <client-first>
//!   334 <server-first> --> server_first() --> <client-final with proof>
//!   334 <server-final> --> server_final()  --> verify v= (the provider knows our verifier)
//!                                           --> empty line --> 235
//! ```
//!
//! The server signature is checked before the session goes on: a provider that cannot prove
//! knowledge of the verifier is an impostor, even if it would answer 235.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Highest PBKDF2 iteration count we compute; a hostile provider could otherwise make us
/// spin for minutes.
const MAX_ITERATIONS: u32 = 1_000_000;

/// A mechanism the customer can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMechanism {
    /// RFC 5802 / RFC 7677 SCRAM-SHA-256 without channel binding.
    ScramSha256,
    /// RFC 4616 PLAIN.
    Plain,
    /// RFC 2195 CRAM-MD5.
    CramMd5,
    /// RFC 4422 EXTERNAL: the TLS client certificate is the credential.
    External,
}

impl ClientMechanism {
    /// The registered name.
    pub fn name(self) -> &'static str {
        match self {
            ClientMechanism::ScramSha256 => "SCRAM-SHA-256",
            ClientMechanism::Plain => "PLAIN",
            ClientMechanism::CramMd5 => "CRAM-MD5",
            ClientMechanism::External => "EXTERNAL",
        }
    }
}

/// The mechanisms listed in an EHLO reply's `AUTH` line (the lines without the `250-`).
pub fn offered_mechanisms(ehlo_lines: &[String]) -> Vec<String> {
    ehlo_lines
        .iter()
        .filter_map(|l| {
            let mut words = l.split_ascii_whitespace();
            let keyword = words.next()?;
            keyword
                .eq_ignore_ascii_case("AUTH")
                .then(|| words.map(|w| w.to_ascii_uppercase()).collect::<Vec<_>>())
        })
        .flatten()
        .collect()
}

/// The best mechanism the provider offers: EXTERNAL when we hold a client certificate, then
/// (with a password) SCRAM-SHA-256, PLAIN (only inside TLS), CRAM-MD5. `None` when nothing
/// fits.
pub fn choose(
    offered: &[String],
    tls: bool,
    have_client_cert: bool,
    have_password: bool,
) -> Option<ClientMechanism> {
    let has = |m: ClientMechanism| offered.iter().any(|o| o == m.name());
    [
        (ClientMechanism::External, have_client_cert),
        (ClientMechanism::ScramSha256, have_password),
        (ClientMechanism::Plain, have_password && tls),
        (ClientMechanism::CramMd5, have_password),
    ]
    .into_iter()
    .find(|&(m, allowed)| allowed && has(m))
    .map(|(m, _)| m)
}

/// The initial response of PLAIN: `NUL account NUL password`, base64.
pub fn plain_response(account: &str, password: &str) -> String {
    B64.encode(format!("\0{account}\0{password}"))
}

/// The response to a CRAM-MD5 challenge (base64 in, base64 out).
pub fn cram_md5_response(account: &str, password: &str, challenge_b64: &str) -> Option<String> {
    let challenge = B64.decode(challenge_b64.trim()).ok()?;
    let digest = crate::accounts::CramMd5Key::from_password(password).digest(&challenge);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Some(B64.encode(format!("{account} {hex}")))
}

/// The initial response of EXTERNAL: `=`, an empty authorization identity, so that the
/// provider acts as the account its certificate mapping names.
pub fn external_response() -> &'static str {
    "="
}

/// Why a SCRAM exchange was abandoned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScramError {
    /// The provider's message is not base64 or breaks the SCRAM grammar.
    Malformed(&'static str),
    /// The provider's nonce does not extend ours (a replay or a broken provider).
    NonceMismatch,
    /// The iteration count is zero or above our limit.
    Iterations(u32),
    /// The provider answered `e=...`.
    ServerError(String),
    /// The server signature is wrong: the provider does not know our verifier.
    BadServerSignature,
}

impl std::fmt::Display for ScramError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScramError::Malformed(what) => write!(f, "malformed SCRAM message: {what}"),
            ScramError::NonceMismatch => f.write_str("SCRAM nonce does not extend ours"),
            ScramError::Iterations(n) => write!(f, "unacceptable SCRAM iteration count {n}"),
            ScramError::ServerError(e) => write!(f, "provider reported SCRAM error {e:?}"),
            ScramError::BadServerSignature => {
                f.write_str("provider's SCRAM signature is wrong (it does not know our verifier)")
            }
        }
    }
}

impl std::error::Error for ScramError {}

/// A SCRAM-SHA-256 client exchange.
pub struct ScramClient {
    password: String,
    client_nonce: String,
    client_first_bare: String,
    expected_server_signature: Option<[u8; 32]>,
}

impl ScramClient {
    /// Starts an exchange for `user` with `nonce` (printable, no comma; the caller draws it
    /// from a CSPRNG). Returns the machine and the base64 initial response.
    pub fn new(user: &str, password: &str, nonce: &str) -> (ScramClient, String) {
        let name = user.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={name},r={nonce}");
        let first = B64.encode(format!("n,,{client_first_bare}"));
        let client = ScramClient {
            password: password.to_string(),
            client_nonce: nonce.to_string(),
            client_first_bare,
            expected_server_signature: None,
        };
        (client, first)
    }

    /// Takes the server-first message; returns the base64 client-final message.
    pub fn server_first(&mut self, payload_b64: &str) -> Result<String, ScramError> {
        let server_first = decode(payload_b64)?;
        if let Some(e) = server_first.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("m", _)) => return Err(ScramError::Malformed("mandatory extension")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() <= self.client_nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        let salt = B64
            .decode(salt.ok_or(ScramError::Malformed("no salt"))?)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or(ScramError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count is not a number"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(ScramError::Iterations(iterations));
        }

        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(self.password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(B64.encode(format!("{without_proof},p={}", B64.encode(proof))))
    }

    /// Checks the server-final message (`v=` signature).
    pub fn server_final(&self, payload_b64: &str) -> Result<(), ScramError> {
        let server_final = decode(payload_b64)?;
        if let Some(e) = server_final.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let v = server_final
            .strip_prefix("v=")
            .ok_or(ScramError::Malformed("no server signature"))?;
        let got = B64
            .decode(v)
            .map_err(|_| ScramError::Malformed("signature is not base64"))?;
        let want = self
            .expected_server_signature
            .ok_or(ScramError::Malformed("server-final before server-first"))?;
        // Not secret (the provider sent it), so a plain comparison is fine.
        if got != want {
            return Err(ScramError::BadServerSignature);
        }
        Ok(())
    }
}

fn decode(payload_b64: &str) -> Result<String, ScramError> {
    let bytes = B64
        .decode(payload_b64.trim())
        .map_err(|_| ScramError::Malformed("not base64"))?;
    String::from_utf8(bytes).map_err(|_| ScramError::Malformed("not UTF-8"))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::{CramMd5Key, ScramVerifier};
    use crate::proto::sasl::{
        Credentials, Mechanism, SaslContext, SaslExchange, SaslStep, ScramSecrets,
    };

    struct OneAccount {
        user: &'static str,
        verifier: ScramVerifier,
        cram: CramMd5Key,
        cert_identity: &'static str,
    }

    impl OneAccount {
        fn new(password: &str) -> OneAccount {
            OneAccount {
                user: "office",
                verifier: ScramVerifier::derive(password, b"pepper-salt-16by", 4096),
                cram: CramMd5Key::from_password(password),
                cert_identity: "office.example",
            }
        }
    }

    impl Credentials for OneAccount {
        fn scram(&self, user: &str) -> Option<ScramSecrets> {
            (user == self.user).then(|| ScramSecrets {
                salt: self.verifier.salt().to_vec(),
                iterations: self.verifier.iterations(),
                stored_key: *self.verifier.stored_key(),
                server_key: *self.verifier.server_key(),
            })
        }
        fn cram_md5(&self, user: &str, challenge: &[u8], digest_hex: &str) -> bool {
            user == self.user && self.cram.verify(challenge, digest_hex)
        }
        fn external(&self, cert_identity: &str) -> Option<String> {
            (cert_identity == self.cert_identity).then(|| self.user.to_string())
        }
    }

    fn ctx(peer_identity: Option<&str>) -> SaslContext<'_> {
        SaslContext {
            hostname: "mx.test",
            tls: true,
            allow_plaintext: false,
            cram_md5_requires_tls: false,
            random: b"0123456789abcdef0123456789abcdef",
            unix_time: 1_700_000_000,
            secret: b"server secret",
            fake_iterations: 4096,
            tls_exporter: None,
            peer_identity,
            plus_offered: false,
        }
    }

    /// Runs our client against the provider's SCRAM server; returns the final outcome.
    fn scram_against_provider(client_password: &str, server_password: &str) -> SaslStep {
        let creds = OneAccount::new(server_password);
        let (mut client, first) = ScramClient::new("office", client_password, "c-nonce-Xy12");
        let (mut server, step) =
            SaslExchange::start(Mechanism::ScramSha256, Some(&first), &ctx(None), &creds);
        let SaslStep::Challenge(server_first) = step else {
            panic!("expected server-first, got {step:?}");
        };
        let final_msg = client.server_first(&server_first).unwrap();
        let step = server.step(&final_msg, &creds);
        if let SaslStep::Success {
            server_final: Some(v),
            ..
        } = &step
        {
            client.server_final(v).unwrap();
        }
        step
    }

    #[test]
    fn scram_succeeds_against_the_provider_and_verifies_its_signature() {
        let step = scram_against_provider("hunter2", "hunter2");
        assert!(
            matches!(
                step,
                SaslStep::Success {
                    server_final: Some(_),
                    ..
                }
            ),
            "{step:?}"
        );
    }

    #[test]
    fn scram_with_a_wrong_password_is_refused_by_the_provider() {
        let step = scram_against_provider("wrong", "hunter2");
        let SaslStep::Failure(reply) = step else {
            panic!("expected failure, got {step:?}");
        };
        assert_eq!(reply.code, 535);
    }

    #[test]
    fn scram_detects_an_impostor_signature() {
        // The impostor has a verifier for another password: its v= cannot match ours.
        let impostor = OneAccount::new("other password");
        let (mut client, first) = ScramClient::new("office", "hunter2", "nonce1");
        let (_, step) =
            SaslExchange::start(Mechanism::ScramSha256, Some(&first), &ctx(None), &impostor);
        let SaslStep::Challenge(server_first) = step else {
            panic!("{step:?}");
        };
        client.server_first(&server_first).unwrap();
        let forged = B64.encode(format!("v={}", B64.encode([7u8; 32])));
        assert_eq!(
            client.server_final(&forged),
            Err(ScramError::BadServerSignature)
        );
    }

    #[test]
    fn scram_refuses_bad_server_first_messages() {
        let cases: &[(&str, ScramError)] = &[
            ("r=other,s=c2FsdA==,i=4096", ScramError::NonceMismatch),
            ("r=abc,s=c2FsdA==,i=4096", ScramError::NonceMismatch),
            ("r=abcX,s=c2FsdA==,i=0", ScramError::Iterations(0)),
            (
                "r=abcX,s=c2FsdA==,i=99999999",
                ScramError::Iterations(99_999_999),
            ),
            ("r=abcX,i=4096", ScramError::Malformed("no salt")),
            (
                "r=abcX,s=c2FsdA==",
                ScramError::Malformed("no iteration count"),
            ),
            (
                "e=unknown-user",
                ScramError::ServerError("unknown-user".into()),
            ),
        ];
        for (msg, want) in cases {
            let (mut client, _) = ScramClient::new("u", "p", "abc");
            assert_eq!(
                &client.server_first(&B64.encode(msg)).unwrap_err(),
                want,
                "{msg}"
            );
        }
        let (mut client, _) = ScramClient::new("u", "p", "abc");
        assert_eq!(
            client.server_first("not base64!"),
            Err(ScramError::Malformed("not base64"))
        );
    }

    #[test]
    fn scram_escapes_the_user_name() {
        let (_, first) = ScramClient::new("a,b=c", "p", "n");
        assert_eq!(B64.decode(first).unwrap(), b"n,,n=a=2Cb=3Dc,r=n");
    }

    #[test]
    fn plain_and_cram_md5_are_accepted_by_the_provider() {
        let creds = OneAccount::new("hunter2");
        let initial = plain_response("office", "hunter2");
        let (_, step) = SaslExchange::start(Mechanism::Plain, Some(&initial), &ctx(None), &creds);
        assert!(matches!(step, SaslStep::Success { .. }), "{step:?}");

        let (mut server, step) = SaslExchange::start(Mechanism::CramMd5, None, &ctx(None), &creds);
        let SaslStep::Challenge(challenge) = step else {
            panic!("{step:?}");
        };
        let response = cram_md5_response("office", "hunter2", &challenge).unwrap();
        let step = server.step(&response, &creds);
        assert!(matches!(step, SaslStep::Success { .. }), "{step:?}");
    }

    #[test]
    fn external_is_accepted_for_a_mapped_certificate_only() {
        let creds = OneAccount::new("hunter2");
        let with_cert = ctx(Some("office.example"));
        let (_, step) = SaslExchange::start(
            Mechanism::External,
            Some(external_response()),
            &with_cert,
            &creds,
        );
        assert!(matches!(step, SaslStep::Success { .. }), "{step:?}");
        let other_cert = ctx(Some("stranger.example"));
        let (_, step) = SaslExchange::start(
            Mechanism::External,
            Some(external_response()),
            &other_cert,
            &creds,
        );
        assert!(matches!(step, SaslStep::Failure(_)), "{step:?}");
    }

    #[test]
    fn choice_follows_the_preference_and_the_offer() {
        use ClientMechanism::*;
        let offer = |s: &str| offered_mechanisms(&[format!("AUTH {s}"), "ATRN".to_string()]);
        let all = offer("SCRAM-SHA-256 PLAIN CRAM-MD5 EXTERNAL");
        let no_scram = offer("plain cram-md5");
        // (offer, tls, client cert, password) -> choice
        let cases = [
            (&all, true, true, true, Some(External)),
            (&all, true, false, true, Some(ScramSha256)),
            (&no_scram, true, false, true, Some(Plain)),
            (&no_scram, false, false, true, Some(CramMd5)),
            (&offer("PLAIN"), false, false, true, None),
            (&offered_mechanisms(&[]), true, true, true, None),
            // A certificate but no password: EXTERNAL or nothing.
            (&all, true, true, false, Some(External)),
            (&no_scram, true, true, false, None),
        ];
        for (offered, tls, cert, password, want) in cases {
            assert_eq!(
                choose(offered, tls, cert, password),
                want,
                "{offered:?} tls={tls} cert={cert} password={password}"
            );
        }
    }
}
