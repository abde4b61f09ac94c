//! The client's side of SMTP AUTH (RFC 4954), for everything that authenticates to another
//! server: the customer's ODMR session and the relay's smarthost session. Mechanisms:
//! SCRAM-SHA-256 (RFC 5802, RFC 7677, no channel binding), PLAIN (RFC 4616), LOGIN
//! (de-facto), CRAM-MD5 (RFC 2195) and EXTERNAL (RFC 4422 Appendix A); and the choice
//! between them from the server's EHLO offer.
//!
//! Sans-IO: the driver sends each line the machine returns (adding CRLF) and passes each
//! reply back as its code and text (for a `334`, the text is the base64 payload). Random bytes
//! (the SCRAM client nonce) come in through [`ClientCredentials`].
//!
//! ```text
//! start([mech, fallback..]) --> "AUTH <mech> [initial response]"
//!    504 and a fallback left --> "AUTH <fallback> ..."           (the relay's PLAIN -> LOGIN)
//!    334 <challenge> -------> Send(response)   (LOGIN: user, then password; CRAM-MD5: digest;
//!                                               SCRAM: client-final with the proof)
//!    SCRAM: 334 <server-final> --> verify v= --> Send("") --> 235 --> Authenticated
//!    235 ------------------> Authenticated     (SCRAM: only after v= was verified)
//!    4xx/5xx --------------> Refused           (the reply is the reason)
//!    a challenge we reject -> Cancel(error)    (send "*"; the server answers 501)
//! ```
//!
//! The SCRAM server signature is checked before the session goes on: a server that cannot
//! prove knowledge of the verifier is an impostor, even if it would answer 235, and a 235
//! without the signature fails the same way.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::cram_md5::CramMd5Key;
use super::mechanism::Mechanism;
use super::scram::{self, ClientKeys};

/// Highest PBKDF2 iteration count we compute; a hostile server could otherwise make us
/// spin for minutes.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// What the client authenticates with.
#[derive(Clone, Copy)]
pub struct ClientCredentials<'a> {
    /// The authentication identity (account or user name).
    pub user: &'a str,
    /// The password; empty when there is none (EXTERNAL needs none).
    pub password: &'a str,
    /// SCRAM's client nonce: printable ASCII without `,`, fresh from a CSPRNG for each
    /// exchange (the base64 of 18 random bytes will do). Unused by the other mechanisms.
    pub nonce: &'a str,
}

impl std::fmt::Debug for ClientCredentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The mechanisms listed in an EHLO reply's `AUTH` line (the lines without the `250-`),
/// upper-cased, in the server's order.
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

/// The best mechanism the server offers: EXTERNAL when we hold a client certificate, then
/// (with a password) SCRAM-SHA-256, PLAIN (only inside TLS), CRAM-MD5. `None` when nothing
/// fits.
pub fn choose(
    offered: &[String],
    tls: bool,
    have_client_cert: bool,
    have_password: bool,
) -> Option<Mechanism> {
    let has = |m: Mechanism| offered.iter().any(|o| o == m.name());
    [
        (Mechanism::External, have_client_cert),
        (Mechanism::ScramSha256, have_password),
        (Mechanism::Plain, have_password && tls),
        (Mechanism::CramMd5, have_password),
    ]
    .into_iter()
    .find(|&(m, allowed)| allowed && has(m))
    .map(|(m, _)| m)
}

/// Why the client abandoned an exchange. Each is permanent: the same server will answer the
/// same way next time, so the operator has to look.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// The server's challenge is not base64 or breaks the mechanism's grammar.
    Malformed(&'static str),
    /// The SCRAM nonce of the server does not extend ours (a replay or a broken server).
    NonceMismatch,
    /// The SCRAM iteration count is zero or above [`MAX_ITERATIONS`].
    Iterations(u32),
    /// The server answered SCRAM with `e=...`.
    ServerError(String),
    /// The SCRAM server signature is wrong: the server does not know our verifier.
    BadServerSignature,
    /// The server answered 235 to SCRAM without sending its signature first.
    NoServerSignature,
    /// A reply the exchange has no place for (a challenge after the last response, or a 235
    /// before the mechanism ran).
    Unexpected(u16),
    /// The mechanism is not one the client runs (SCRAM-SHA-256-PLUS needs channel binding).
    Unsupported(Mechanism),
}

impl ClientError {
    /// Never: see the type's docs.
    pub fn is_transient(&self) -> bool {
        false
    }

    /// Always: see the type's docs.
    pub fn is_permanent(&self) -> bool {
        true
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Malformed(what) => write!(f, "malformed SASL challenge: {what}"),
            ClientError::NonceMismatch => f.write_str("SCRAM nonce does not extend ours"),
            ClientError::Iterations(n) => write!(f, "unacceptable SCRAM iteration count {n}"),
            ClientError::ServerError(e) => write!(f, "server reported SCRAM error {e:?}"),
            ClientError::BadServerSignature => {
                f.write_str("server's SCRAM signature is wrong (it does not know our verifier)")
            }
            ClientError::NoServerSignature => {
                f.write_str("server accepted SCRAM without sending its signature")
            }
            ClientError::Unexpected(code) => {
                write!(f, "unexpected {code} reply in the middle of the exchange")
            }
            ClientError::Unsupported(m) => write!(f, "{} is not supported as a client", m.name()),
        }
    }
}

impl std::error::Error for ClientError {}

/// What the driver does next.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum ClientStep {
    /// Send this line (the driver adds CRLF), then pass the next reply to
    /// [`SaslClient::handle_reply`].
    Send(String),
    /// 235: authenticated (for SCRAM, the server also proved it knows our verifier).
    Authenticated,
    /// The server refused; its reply is the reason. The exchange is over.
    Refused,
    /// We reject the server's challenge: send `*` to cancel (RFC 4954 §4; the server answers
    /// 501), then fail with this error.
    Cancel(ClientError),
    /// The exchange is broken with nothing left to cancel; fail with this error.
    Failed(ClientError),
}

/// One client exchange in progress.
#[derive(Debug)]
pub struct SaslClient {
    user: String,
    password: String,
    nonce: String,
    mechanism: Mechanism,
    /// Mechanisms still to try, in order, if the server answers 504 to the current one.
    fallbacks: Vec<Mechanism>,
    state: State,
}

#[derive(Debug)]
enum State {
    /// `AUTH <mechanism>` is sent; its first reply is next.
    Started,
    /// LOGIN: the user name is sent; the password prompt is next.
    LoginUser,
    /// SCRAM: the client-final message is sent; the server-final is next.
    ScramFinal {
        server_signature: [u8; 32],
    },
    /// The last response is sent; the outcome is next.
    AwaitOutcome,
    Done,
}

impl SaslClient {
    /// Starts with the first of `mechanisms` (the others are fallbacks, tried in order while
    /// the server answers `504` to the `AUTH` command). Returns the machine and the first line
    /// to send: `AUTH <mechanism>` with its initial response, if it has one.
    ///
    /// # Panics
    ///
    /// When `mechanisms` is empty.
    pub fn start(mechanisms: &[Mechanism], creds: ClientCredentials<'_>) -> (SaslClient, String) {
        let (&first, fallbacks) = mechanisms.split_first().expect("at least one mechanism");
        let mut client = SaslClient {
            user: creds.user.to_string(),
            password: creds.password.to_string(),
            nonce: creds.nonce.to_string(),
            mechanism: first,
            fallbacks: fallbacks.iter().rev().copied().collect(),
            state: State::Started,
        };
        let line = client.auth_command();
        (client, line)
    }

    /// The mechanism in use (after a fallback, the fallback).
    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Feeds the server's reply: its code and text (for a `334`, the base64 payload; for a
    /// multi-line reply, the lines joined).
    pub fn handle_reply(&mut self, code: u16, text: &str) -> ClientStep {
        let state = std::mem::replace(&mut self.state, State::Done);
        match (state, code) {
            (State::Done, _) => ClientStep::Failed(ClientError::Unexpected(code)),
            (State::Started, 504) if !self.fallbacks.is_empty() => {
                self.mechanism = self.fallbacks.pop().expect("not empty");
                self.state = State::Started;
                ClientStep::Send(self.auth_command())
            }
            (State::Started, 334) => self.first_challenge(text),
            (State::Started, 235) => match self.mechanism {
                Mechanism::Plain | Mechanism::External => ClientStep::Authenticated,
                Mechanism::ScramSha256 => ClientStep::Failed(ClientError::NoServerSignature),
                _ => ClientStep::Failed(ClientError::Unexpected(235)),
            },
            (State::LoginUser, 334) => {
                self.state = State::AwaitOutcome;
                ClientStep::Send(B64.encode(&self.password))
            }
            (State::ScramFinal { server_signature }, 334) => {
                match check_server_final(text, &server_signature) {
                    Ok(()) => {
                        self.state = State::AwaitOutcome;
                        ClientStep::Send(String::new())
                    }
                    Err(e) => ClientStep::Cancel(e),
                }
            }
            (State::ScramFinal { .. }, 235) => ClientStep::Failed(ClientError::NoServerSignature),
            (State::AwaitOutcome, 235) => ClientStep::Authenticated,
            (State::AwaitOutcome, 334) => ClientStep::Cancel(ClientError::Unexpected(334)),
            (State::LoginUser, 235) => ClientStep::Failed(ClientError::Unexpected(235)),
            (_, _) => ClientStep::Refused,
        }
    }

    /// `AUTH <mechanism> [initial response]` for the current mechanism.
    fn auth_command(&mut self) -> String {
        let name = self.mechanism.name();
        match self.mechanism {
            Mechanism::Plain => {
                let response = B64.encode(format!("\0{}\0{}", self.user, self.password));
                format!("AUTH {name} {response}")
            }
            // `=`: an empty authorization identity, so the server acts as the account its
            // certificate mapping names.
            Mechanism::External => format!("AUTH {name} ="),
            Mechanism::ScramSha256 => {
                let first = B64.encode(format!("n,,{}", self.client_first_bare()));
                format!("AUTH {name} {first}")
            }
            _ => format!("AUTH {name}"),
        }
    }

    fn client_first_bare(&self) -> String {
        format!("n={},r={}", scram::encode_saslname(&self.user), self.nonce)
    }

    /// The answer to the first `334` of the current mechanism.
    fn first_challenge(&mut self, text: &str) -> ClientStep {
        match self.mechanism {
            Mechanism::Login => {
                self.state = State::LoginUser;
                ClientStep::Send(B64.encode(&self.user))
            }
            Mechanism::CramMd5 => {
                let Ok(challenge) = B64.decode(text.trim()) else {
                    return ClientStep::Cancel(ClientError::Malformed(
                        "CRAM-MD5 challenge is not base64",
                    ));
                };
                let digest = CramMd5Key::from_password(&self.password).digest_hex(&challenge);
                self.state = State::AwaitOutcome;
                ClientStep::Send(B64.encode(format!("{} {digest}", self.user)))
            }
            Mechanism::ScramSha256 => {
                let bare = self.client_first_bare();
                match scram_client_final(&bare, &self.nonce, &self.password, text) {
                    Ok((client_final, server_signature)) => {
                        self.state = State::ScramFinal { server_signature };
                        ClientStep::Send(client_final)
                    }
                    Err(e) => ClientStep::Cancel(e),
                }
            }
            // PLAIN and EXTERNAL sent everything with the command.
            Mechanism::Plain | Mechanism::External => {
                ClientStep::Cancel(ClientError::Unexpected(334))
            }
            m => ClientStep::Cancel(ClientError::Unsupported(m)),
        }
    }
}

/// Takes the base64 server-first message; returns the base64 client-final message and the
/// server signature a genuine server will send.
fn scram_client_final(
    client_first_bare: &str,
    client_nonce: &str,
    password: &str,
    payload_b64: &str,
) -> Result<(String, [u8; 32]), ClientError> {
    let server_first = decode(payload_b64)?;
    if let Some(e) = server_first.strip_prefix("e=") {
        return Err(ClientError::ServerError(e.to_string()));
    }
    let mut nonce = None;
    let mut salt = None;
    let mut iterations = None;
    for attr in server_first.split(',') {
        match attr.split_once('=') {
            Some(("r", v)) => nonce = Some(v),
            Some(("s", v)) => salt = Some(v),
            Some(("i", v)) => iterations = Some(v),
            Some(("m", _)) => return Err(ClientError::Malformed("mandatory extension")),
            _ => {}
        }
    }
    let nonce = nonce.ok_or(ClientError::Malformed("no nonce"))?;
    if !nonce.starts_with(client_nonce) || nonce.len() <= client_nonce.len() {
        return Err(ClientError::NonceMismatch);
    }
    let salt = B64
        .decode(salt.ok_or(ClientError::Malformed("no salt"))?)
        .map_err(|_| ClientError::Malformed("salt is not base64"))?;
    let iterations: u32 = iterations
        .ok_or(ClientError::Malformed("no iteration count"))?
        .parse()
        .map_err(|_| ClientError::Malformed("iteration count is not a number"))?;
    if iterations == 0 || iterations > MAX_ITERATIONS {
        return Err(ClientError::Iterations(iterations));
    }
    let without_proof = format!("c=biws,r={nonce}");
    let auth_message = scram::auth_message(client_first_bare, &server_first, &without_proof);
    let keys = ClientKeys::derive(password.as_bytes(), &salt, iterations);
    let proof = keys.client_proof(auth_message.as_bytes());
    let client_final = B64.encode(format!("{without_proof},p={}", B64.encode(proof)));
    Ok((client_final, keys.server_signature(auth_message.as_bytes())))
}

/// Checks the base64 server-final message (`v=` signature).
fn check_server_final(payload_b64: &str, want: &[u8; 32]) -> Result<(), ClientError> {
    let server_final = decode(payload_b64)?;
    if let Some(e) = server_final.strip_prefix("e=") {
        return Err(ClientError::ServerError(e.to_string()));
    }
    let v = server_final
        .strip_prefix("v=")
        .ok_or(ClientError::Malformed("no server signature"))?;
    let got = B64
        .decode(v)
        .map_err(|_| ClientError::Malformed("signature is not base64"))?;
    // Not secret (the server sent it), so a plain comparison is fine.
    if got != want {
        return Err(ClientError::BadServerSignature);
    }
    Ok(())
}

fn decode(payload_b64: &str) -> Result<String, ClientError> {
    let bytes = B64
        .decode(payload_b64.trim())
        .map_err(|_| ClientError::Malformed("not base64"))?;
    String::from_utf8(bytes).map_err(|_| ClientError::Malformed("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::command::Command;
    use crate::proto::frame::{Frame, Framer};
    use crate::proto::reply::{split_reply_line, Reply};
    use crate::proto::sasl::server::{Credentials, SaslExchange, SaslStep};
    use crate::proto::sasl::{SaslContext, ScramSecrets};

    /// The provider's store: "office" with one password, also for CRAM-MD5, and the
    /// certificate "office.example".
    struct OneAccount {
        user: &'static str,
        verifier: ScramSecrets,
        cram: CramMd5Key,
        cert_identity: &'static str,
    }

    impl OneAccount {
        fn new(password: &str) -> OneAccount {
            OneAccount::with_iterations(password, 4096)
        }

        /// Few iterations keep the every-offset replays cheap.
        fn with_iterations(password: &str, iterations: u32) -> OneAccount {
            OneAccount {
                user: "office",
                verifier: ScramSecrets::derive(
                    password.as_bytes(),
                    b"pepper-salt-16by",
                    iterations,
                ),
                cram: CramMd5Key::from_password(password),
                cert_identity: "office.example",
            }
        }
    }

    impl Credentials for OneAccount {
        fn scram(&self, user: &str) -> Option<ScramSecrets> {
            (user == self.user).then(|| self.verifier.clone())
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

    fn creds<'a>(user: &'a str, password: &'a str, nonce: &'a str) -> ClientCredentials<'a> {
        ClientCredentials {
            user,
            password,
            nonce,
        }
    }

    /// The line after `AUTH SCRAM-SHA-256 `.
    fn initial_response(line: &str) -> &str {
        line.rsplit(' ').next().unwrap()
    }

    /// Runs our client against the provider's SCRAM server; returns the final outcome.
    fn scram_against_provider(client_password: &str, server_password: &str) -> SaslStep {
        let store = OneAccount::new(server_password);
        let (mut client, line) = SaslClient::start(
            &[Mechanism::ScramSha256],
            creds("office", client_password, "c-nonce-Xy12"),
        );
        let (mut server, step) = SaslExchange::start(
            Mechanism::ScramSha256,
            Some(initial_response(&line)),
            &ctx(None),
            &store,
        );
        let SaslStep::Challenge(server_first) = step else {
            panic!("expected server-first, got {step:?}");
        };
        let ClientStep::Send(final_msg) = client.handle_reply(334, &server_first) else {
            panic!("no client-final");
        };
        let step = server.step(&final_msg, &store);
        if let SaslStep::Success {
            server_final: Some(v),
            ..
        } = &step
        {
            assert_eq!(client.handle_reply(334, v), ClientStep::Send(String::new()));
            assert_eq!(client.handle_reply(235, "ok"), ClientStep::Authenticated);
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
        let (mut client, line) = SaslClient::start(
            &[Mechanism::ScramSha256],
            creds("office", "hunter2", "nonce1"),
        );
        let (_, step) = SaslExchange::start(
            Mechanism::ScramSha256,
            Some(initial_response(&line)),
            &ctx(None),
            &impostor,
        );
        let SaslStep::Challenge(server_first) = step else {
            panic!("{step:?}");
        };
        assert!(matches!(
            client.handle_reply(334, &server_first),
            ClientStep::Send(_)
        ));
        let forged = B64.encode(format!("v={}", B64.encode([7u8; 32])));
        assert_eq!(
            client.handle_reply(334, &forged),
            ClientStep::Cancel(ClientError::BadServerSignature)
        );
    }

    #[test]
    fn scram_refuses_bad_server_first_messages() {
        let cases: &[(&str, ClientError)] = &[
            ("r=other,s=c2FsdA==,i=4096", ClientError::NonceMismatch),
            ("r=abc,s=c2FsdA==,i=4096", ClientError::NonceMismatch),
            ("r=abcX,s=c2FsdA==,i=0", ClientError::Iterations(0)),
            (
                "r=abcX,s=c2FsdA==,i=99999999",
                ClientError::Iterations(99_999_999),
            ),
            ("r=abcX,i=4096", ClientError::Malformed("no salt")),
            (
                "r=abcX,s=c2FsdA==",
                ClientError::Malformed("no iteration count"),
            ),
            (
                "e=unknown-user",
                ClientError::ServerError("unknown-user".into()),
            ),
            (
                "r=abcX,s=c2FsdA==,i=x",
                ClientError::Malformed("iteration count is not a number"),
            ),
            (
                "r=abcX,s=%%,i=4096",
                ClientError::Malformed("salt is not base64"),
            ),
            ("s=c2FsdA==,i=4096", ClientError::Malformed("no nonce")),
            (
                "m=ext,r=abcX,s=c2FsdA==,i=4096",
                ClientError::Malformed("mandatory extension"),
            ),
        ];
        for (msg, want) in cases {
            let (mut client, _) =
                SaslClient::start(&[Mechanism::ScramSha256], creds("u", "p", "abc"));
            assert_eq!(
                client.handle_reply(334, &B64.encode(msg)),
                ClientStep::Cancel(want.clone()),
                "{msg}"
            );
        }
        let (mut client, _) = SaslClient::start(&[Mechanism::ScramSha256], creds("u", "p", "abc"));
        assert_eq!(
            client.handle_reply(334, "not base64!"),
            ClientStep::Cancel(ClientError::Malformed("not base64"))
        );
    }

    #[test]
    fn scram_escapes_the_user_name() {
        let (_, line) = SaslClient::start(&[Mechanism::ScramSha256], creds("a,b=c", "p", "n"));
        assert_eq!(
            B64.decode(initial_response(&line)).unwrap(),
            b"n,,n=a=2Cb=3Dc,r=n"
        );
    }

    #[test]
    fn plain_and_cram_md5_are_accepted_by_the_provider() {
        let store = OneAccount::new("hunter2");
        let (_, line) = SaslClient::start(&[Mechanism::Plain], creds("office", "hunter2", ""));
        let (_, step) = SaslExchange::start(
            Mechanism::Plain,
            Some(initial_response(&line)),
            &ctx(None),
            &store,
        );
        assert!(matches!(step, SaslStep::Success { .. }), "{step:?}");

        let (mut client, line) =
            SaslClient::start(&[Mechanism::CramMd5], creds("office", "hunter2", ""));
        assert_eq!(line, "AUTH CRAM-MD5");
        let (mut server, step) = SaslExchange::start(Mechanism::CramMd5, None, &ctx(None), &store);
        let SaslStep::Challenge(challenge) = step else {
            panic!("{step:?}");
        };
        let ClientStep::Send(response) = client.handle_reply(334, &challenge) else {
            panic!("no response");
        };
        let step = server.step(&response, &store);
        assert!(matches!(step, SaslStep::Success { .. }), "{step:?}");
    }

    #[test]
    fn external_is_accepted_for_a_mapped_certificate_only() {
        let store = OneAccount::new("hunter2");
        let (_, line) = SaslClient::start(&[Mechanism::External], creds("office", "", ""));
        assert_eq!(line, "AUTH EXTERNAL =");
        let with_cert = ctx(Some("office.example"));
        let (_, step) = SaslExchange::start(Mechanism::External, Some("="), &with_cert, &store);
        assert!(matches!(step, SaslStep::Success { .. }), "{step:?}");
        let other_cert = ctx(Some("stranger.example"));
        let (_, step) = SaslExchange::start(Mechanism::External, Some("="), &other_cert, &store);
        assert!(matches!(step, SaslStep::Failure(_)), "{step:?}");
    }

    #[test]
    fn choice_follows_the_preference_and_the_offer() {
        use Mechanism::*;
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

    /// (mechanisms, the server's replies, the lines the client sends after the AUTH command,
    /// the final step)
    type Transcript = (
        &'static [Mechanism],
        Vec<(u16, String)>,
        Vec<String>,
        ClientStep,
    );

    /// Scripted servers: what the client sends, and how it ends, for each reply sequence.
    #[test]
    fn transcripts() {
        use Mechanism::*;
        let b64 = |s: &str| B64.encode(s);
        let r = |replies: &[(u16, &str)]| -> Vec<(u16, String)> {
            replies.iter().map(|&(c, t)| (c, t.to_string())).collect()
        };
        let (user, password) = (b64("relay"), b64("s3cret"));
        let digest = CramMd5Key::from_password("s3cret").digest_hex(b"<1.2@mx.test>");
        let cram_response = b64(&format!("relay {digest}"));
        let login = [(334, "VXNlcm5hbWU6"), (334, "UGFzc3dvcmQ6"), (235, "ok")];
        let cases: Vec<Transcript> = vec![
            (
                &[Plain],
                r(&[(235, "2.7.0 ok")]),
                vec![],
                ClientStep::Authenticated,
            ),
            (
                &[Plain],
                r(&[(535, "5.7.8 no")]),
                vec![],
                ClientStep::Refused,
            ),
            (
                &[Plain],
                r(&[(334, "")]),
                vec![],
                ClientStep::Cancel(ClientError::Unexpected(334)),
            ),
            // The relay: PLAIN unknown to the peer, LOGIN instead.
            (
                &[Plain, Login],
                r(&[[(504, "5.5.4 unknown")].as_slice(), &login].concat()),
                vec!["AUTH LOGIN".into(), user.clone(), password.clone()],
                ClientStep::Authenticated,
            ),
            (
                &[Plain, Login],
                r(&[(504, "x"), (504, "y")]),
                vec!["AUTH LOGIN".into()],
                ClientStep::Refused,
            ),
            (
                &[Plain],
                r(&[(504, "5.5.4 unknown")]),
                vec![],
                ClientStep::Refused,
            ),
            (
                &[Login],
                r(&login),
                vec![user.clone(), password.clone()],
                ClientStep::Authenticated,
            ),
            (
                &[Login],
                r(&[(334, "VXNlcm5hbWU6"), (535, "no")]),
                vec![user.clone()],
                ClientStep::Refused,
            ),
            (
                &[Login],
                r(&[(538, "5.7.11 TLS first")]),
                vec![],
                ClientStep::Refused,
            ),
            (
                &[Login],
                r(&[(334, "x"), (235, "early")]),
                vec![user.clone()],
                ClientStep::Failed(ClientError::Unexpected(235)),
            ),
            (
                &[Login],
                r(&[(334, "x"), (334, "y"), (334, "z")]),
                vec![user.clone(), password.clone()],
                ClientStep::Cancel(ClientError::Unexpected(334)),
            ),
            (
                &[CramMd5],
                r(&[(334, &b64("<1.2@mx.test>")), (235, "ok")]),
                vec![cram_response],
                ClientStep::Authenticated,
            ),
            (
                &[CramMd5],
                r(&[(334, "!!")]),
                vec![],
                ClientStep::Cancel(ClientError::Malformed("CRAM-MD5 challenge is not base64")),
            ),
            (
                &[CramMd5],
                r(&[(235, "ok")]),
                vec![],
                ClientStep::Failed(ClientError::Unexpected(235)),
            ),
            (
                &[ScramSha256],
                r(&[(235, "2.7.0 trust me")]),
                vec![],
                ClientStep::Failed(ClientError::NoServerSignature),
            ),
            (
                &[ScramSha256],
                r(&[(535, "5.7.8 no")]),
                vec![],
                ClientStep::Refused,
            ),
            (
                &[External],
                r(&[(235, "ok")]),
                vec![],
                ClientStep::Authenticated,
            ),
            (&[External], r(&[(535, "no")]), vec![], ClientStep::Refused),
            (
                &[ScramSha256Plus],
                r(&[(334, "")]),
                vec![],
                ClientStep::Cancel(ClientError::Unsupported(ScramSha256Plus)),
            ),
        ];
        for (mechs, replies, sent, want) in cases {
            let (mut client, _) = SaslClient::start(mechs, creds("relay", "s3cret", "nonce"));
            let mut lines = Vec::new();
            let mut last = None;
            for (i, (code, text)) in replies.iter().enumerate() {
                match client.handle_reply(*code, text) {
                    ClientStep::Send(line) => lines.push(line),
                    end => {
                        assert_eq!(i, replies.len() - 1, "{mechs:?}: ended early: {end:?}");
                        last = Some(end);
                    }
                }
            }
            assert_eq!(lines, sent, "{mechs:?} {replies:?}");
            assert_eq!(last, Some(want), "{mechs:?} {replies:?}");
            // Once over, every further reply is out of place.
            assert_eq!(
                client.handle_reply(250, "more"),
                ClientStep::Failed(ClientError::Unexpected(250))
            );
        }
    }

    /// One SMTP line, as the receiving side's framer sees it when it arrives in two reads cut
    /// `cut` bytes in.
    fn over_the_wire(wire: &[u8], cut: usize) -> Vec<u8> {
        let cut = cut.min(wire.len());
        let mut framer = Framer::new(2048);
        let mut buf = wire[..cut].to_vec();
        if cut < wire.len() {
            assert_eq!(framer.next_line(&buf), Frame::Incomplete, "cut at {cut}");
            buf.extend_from_slice(&wire[cut..]);
        }
        match framer.next_line(&buf) {
            Frame::Line { line, consumed } => {
                assert_eq!(consumed, wire.len());
                line.to_vec()
            }
            other => panic!("{other:?} for {wire:?}"),
        }
    }

    /// The client and the provider's exchange over the wire: the client's lines framed and
    /// parsed as commands, the provider's replies framed and split as replies, every message
    /// cut at `cut`. Returns the client's final step and what the provider concluded.
    fn pair(
        mechs: &[Mechanism],
        client_password: &str,
        server: &SaslContext<'_>,
        cut: usize,
    ) -> (ClientStep, Option<String>) {
        let store = OneAccount::with_iterations("hunter2", 16);
        let nonce = "rOprNGfwEbeRWgbNEkqO";
        let (mut client, first) = SaslClient::start(mechs, creds("office", client_password, nonce));
        let mut to_server = format!("{first}\r\n").into_bytes();
        let mut exchange: Option<SaslExchange> = None;
        let mut pending_success: Option<String> = None;
        let mut account = None;
        loop {
            let line = String::from_utf8(over_the_wire(&to_server, cut)).unwrap();
            let reply = if let Some(who) = pending_success.take() {
                assert_eq!(line, "", "the empty response after the server-final");
                account = Some(who);
                Reply::new(235, None, "2.7.0 Authentication successful")
            } else {
                let step = match exchange.as_mut() {
                    Some(ex) => ex.step(&line, &store),
                    None => {
                        let Ok(Command::Auth { mechanism, initial }) =
                            Command::parse(line.as_bytes(), false)
                        else {
                            panic!("not an AUTH command: {line:?}");
                        };
                        match Mechanism::parse(&mechanism) {
                            Some(m) if server_offers(m) => {
                                let (ex, step) =
                                    SaslExchange::start(m, initial.as_deref(), server, &store);
                                exchange = Some(ex);
                                step
                            }
                            _ => SaslStep::Failure(super::super::unknown_mechanism()),
                        }
                    }
                };
                match step {
                    SaslStep::Challenge(payload) => Reply::new(334, None, payload),
                    SaslStep::Success {
                        account: who,
                        server_final: Some(v),
                    } => {
                        pending_success = Some(who);
                        Reply::new(334, None, v)
                    }
                    SaslStep::Success { account: who, .. } => {
                        account = Some(who);
                        Reply::new(235, None, "2.7.0 Authentication successful")
                    }
                    SaslStep::Failure(r) => {
                        exchange = None;
                        r
                    }
                }
            };
            let wire = reply.to_bytes();
            let line = over_the_wire(&wire, cut);
            let (code, last, text) = split_reply_line(&line).expect("a reply line");
            assert!(last);
            match client.handle_reply(code, std::str::from_utf8(text).unwrap()) {
                ClientStep::Send(line) => to_server = format!("{line}\r\n").into_bytes(),
                ClientStep::Cancel(e) => {
                    let ex = exchange.as_mut().expect("an exchange to cancel");
                    let SaslStep::Failure(r) = ex.step("*", &store) else {
                        panic!("* must cancel")
                    };
                    assert_eq!(r.code, 501);
                    return (ClientStep::Cancel(e), account);
                }
                end => return (end, account),
            }
        }
    }

    /// The provider of [`pair`] does not run LOGIN, so the relay's fallback is exercised.
    fn server_offers(m: Mechanism) -> bool {
        m != Mechanism::Login
    }

    #[test]
    fn client_and_provider_agree_over_the_wire_at_every_split() {
        use Mechanism::*;
        let tls = SaslContext {
            fake_iterations: 16,
            ..ctx(Some("office.example"))
        };
        // (mechanisms, password, the client's end, the account the provider authenticated)
        let cases = [
            (
                &[ScramSha256][..],
                "hunter2",
                ClientStep::Authenticated,
                Some("office"),
            ),
            (&[ScramSha256], "wrong", ClientStep::Refused, None),
            (
                &[Plain],
                "hunter2",
                ClientStep::Authenticated,
                Some("office"),
            ),
            (&[Plain], "wrong", ClientStep::Refused, None),
            (
                &[CramMd5],
                "hunter2",
                ClientStep::Authenticated,
                Some("office"),
            ),
            (&[CramMd5], "wrong", ClientStep::Refused, None),
            (&[External], "", ClientStep::Authenticated, Some("office")),
            (
                &[Login, Plain],
                "hunter2",
                ClientStep::Authenticated,
                Some("office"),
            ),
            (&[Login], "hunter2", ClientStep::Refused, None),
        ];
        for (mechs, password, want, who) in cases {
            // Past the longest message (SCRAM's client-final, 162 bytes), every cut is the same.
            for cut in 0..200 {
                let (end, account) = pair(mechs, password, &tls, cut);
                assert_eq!(end, want, "{mechs:?} {password} cut at {cut}");
                assert_eq!(account.as_deref(), who, "{mechs:?} {password} cut at {cut}");
            }
        }
    }
}
