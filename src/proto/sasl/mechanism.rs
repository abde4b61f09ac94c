//! The SASL mechanisms (RFC 4954, RFC 4422) and the policy of which may run in a session.
//!
//! One list serves both ends: the provider offers and runs what [`Mechanism::check`] allows,
//! and the client ([`super::client`]) chooses from the provider's offer with the same names.
//!
//! Policy (each has a test in [`super::server`]):
//!
//! - Unknown mechanism: `504 5.5.4`. A known one that cannot run in this session
//!   (SCRAM-SHA-256-PLUS without exporter bytes, EXTERNAL without a certificate identity):
//!   `504 5.5.4` too.
//! - PLAIN and LOGIN without TLS (unless `allow_plaintext`), CRAM-MD5 without TLS when
//!   `cram_md5_requires_tls` (and not `allow_plaintext`), and -PLUS without TLS:
//!   `538 5.7.11`. CRAM-MD5 and SCRAM never send the password, so they run without TLS by
//!   default (RFC 2645 makes CRAM-MD5 a MUST; fetchmail's ODMR mode has nothing else).

use crate::proto::reply::Reply;

/// The SASL mechanisms turnpike implements: the provider runs all of them, the client all
/// but SCRAM-SHA-256-PLUS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mechanism {
    /// RFC 4616: `authzid NUL authcid NUL password`.
    Plain,
    /// The de-facto LOGIN mechanism: username, then password, each prompted.
    Login,
    /// RFC 2195: HMAC-MD5 over a server challenge. RFC 2645 requires it for interoperability.
    CramMd5,
    /// RFC 5802 / RFC 7677 without channel binding.
    ScramSha256,
    /// RFC 5802 / RFC 7677 with `tls-exporter` channel binding (RFC 9266).
    ScramSha256Plus,
    /// RFC 4422 Appendix A: the identity of the TLS client certificate.
    External,
}

impl Mechanism {
    /// Every mechanism, strongest first: the default offer order.
    pub const ALL: [Mechanism; 6] = [
        Mechanism::ScramSha256Plus,
        Mechanism::ScramSha256,
        Mechanism::External,
        Mechanism::CramMd5,
        Mechanism::Plain,
        Mechanism::Login,
    ];

    /// Parses a mechanism name, case-insensitively.
    pub fn parse(name: &str) -> Option<Mechanism> {
        Mechanism::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(name))
    }

    /// The registered name, as advertised after `AUTH`.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
            Mechanism::CramMd5 => "CRAM-MD5",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
            Mechanism::External => "EXTERNAL",
        }
    }

    /// Whether this mechanism can run in `ctx`; the reply refusing it otherwise. The EHLO
    /// offer lists exactly the mechanisms for which this is `Ok`.
    pub fn check(self, ctx: &SaslContext<'_>) -> Result<(), Reply> {
        let needs_tls = match self {
            // They send the password itself.
            Mechanism::Plain | Mechanism::Login => !ctx.allow_plaintext,
            // The password never crosses the wire; TLS only by the operator's choice.
            Mechanism::CramMd5 => ctx.cram_md5_requires_tls && !ctx.allow_plaintext,
            // The channel binding is the TLS session.
            Mechanism::ScramSha256Plus => true,
            Mechanism::ScramSha256 | Mechanism::External => false,
        };
        if !ctx.tls && needs_tls {
            return Err(Reply::with_status(
                538,
                (5, 7, 11),
                "Encryption required for requested authentication mechanism",
            ));
        }
        let usable = match self {
            Mechanism::ScramSha256Plus => ctx.tls_exporter.is_some(),
            Mechanism::External => ctx.peer_identity.is_some(),
            _ => true,
        };
        if usable {
            Ok(())
        } else {
            Err(unknown_mechanism())
        }
    }
}

/// `504 5.5.4`: a mechanism we do not implement or do not offer now.
pub fn unknown_mechanism() -> Reply {
    Reply::with_status(504, (5, 5, 4), "Unrecognized authentication type")
}

/// What an exchange needs from the session; built by the caller for each `start`.
#[derive(Clone, Copy)]
pub struct SaslContext<'a> {
    /// Our host name, in the CRAM-MD5 challenge.
    pub hostname: &'a str,
    /// TLS is active on the connection.
    pub tls: bool,
    /// PLAIN, LOGIN and CRAM-MD5 may run without TLS.
    pub allow_plaintext: bool,
    /// CRAM-MD5 only inside TLS (unless `allow_plaintext`).
    pub cram_md5_requires_tls: bool,
    /// Fresh random bytes for this exchange (at least 16): the SCRAM server nonce is their
    /// base64, the CRAM-MD5 challenge number their first 8 bytes.
    pub random: &'a [u8],
    /// The current time, seconds since the Unix epoch (CRAM-MD5 challenge).
    pub unix_time: u64,
    /// A server secret (stable across restarts) from which fake SCRAM salts are derived.
    pub secret: &'a [u8],
    /// The iteration count shown to unknown SCRAM users; set it to the store's default.
    pub fake_iterations: u32,
    /// The `tls-exporter` channel binding (RFC 9266: 32 bytes of the exporter with label
    /// `EXPORTER-Channel-Binding` and an empty context), when TLS 1.3 is active.
    pub tls_exporter: Option<&'a [u8]>,
    /// The identity of the verified TLS client certificate, for EXTERNAL.
    pub peer_identity: Option<&'a str>,
    /// SCRAM-SHA-256-PLUS is offered in this session (a client's `y` flag is then a downgrade).
    pub plus_offered: bool,
}
