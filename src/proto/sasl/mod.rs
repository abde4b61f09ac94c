//! SMTP AUTH's SASL exchanges (RFC 4954, RFC 4422), both ends, sans-IO.
//!
//! One file per concern:
//!
//! - [`mechanism`]: the mechanism list and the policy of which may run in a session
//!   ([`Mechanism::check`]: TLS requirements, channel binding, certificates).
//! - [`server`]: the provider's exchanges, PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-256(-PLUS) and
//!   EXTERNAL, checked against the [`Credentials`] the store implements.
//! - [`client`]: the one client exchange, used by the customer's ODMR session and by the
//!   relay: mechanism choice from the server's offer, SCRAM with the server-signature check,
//!   PLAIN, LOGIN, CRAM-MD5 and EXTERNAL.
//! - [`scram`]: the SCRAM-SHA-256 math (salted password, keys, proofs, signatures), written
//!   once for the server, the client and the accounts' verifiers.
//! - [`cram_md5`]: the CRAM-MD5 key as HMAC-MD5 states, on the resumable MD5 of `md5`
//!   (private), which the `md-5` crate cannot provide.
//!
//! Nothing here reads a clock, a socket or the random generator: nonces, challenges' random
//! bytes and the time come in as arguments.

pub mod client;
pub mod cram_md5;
mod ct;
mod md5;
pub mod mechanism;
pub mod scram;
pub mod server;

pub use client::{ClientCredentials, ClientError, ClientStep, SaslClient};
pub use cram_md5::CramMd5Key;
pub use mechanism::{unknown_mechanism, Mechanism, SaslContext};
pub use scram::ScramSecrets;
pub use server::{bad_credentials, Credentials, SaslExchange, SaslStep};
