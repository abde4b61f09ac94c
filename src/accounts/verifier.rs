//! The secrets an account keeps instead of its password: a SCRAM-SHA-256 verifier and,
//! unless disabled, a CRAM-MD5 key. Both are built on the math of [`crate::proto::sasl`];
//! this module adds what only the store needs: fresh salts from the OS and the limits a
//! stored verifier must meet.
//!
//! Passwords are used as their UTF-8 bytes. SASLprep (RFC 4013) is not applied; it changes
//! nothing for printable ASCII passwords.

use std::fmt;

use crate::proto::sasl::ScramSecrets;

pub use crate::proto::sasl::CramMd5Key;

/// The SCRAM iteration count given to new verifiers, and the least one accepted (RFC 7677 §4).
pub const SCRAM_ITERATIONS: u32 = 4096;

/// Length of the random salt of a new SCRAM verifier, in bytes.
pub const SCRAM_SALT_LEN: usize = 16;

/// A SCRAM-SHA-256 verifier (RFC 5802 §3): what the provider keeps instead of the password.
///
/// `SaltedPassword = PBKDF2-HMAC-SHA-256(password, salt, iterations)`,
/// `StoredKey = SHA-256(HMAC(SaltedPassword, "Client Key"))`,
/// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier(ScramSecrets);

impl ScramVerifier {
    /// Derives the verifier of `password` with a fresh random salt of [`SCRAM_SALT_LEN`] bytes
    /// and [`SCRAM_ITERATIONS`] iterations.
    pub fn generate(password: &str) -> Result<ScramVerifier, getrandom::Error> {
        let mut salt = [0u8; SCRAM_SALT_LEN];
        getrandom::fill(&mut salt)?;
        Ok(ScramVerifier::derive(password, &salt, SCRAM_ITERATIONS))
    }

    /// Derives the verifier of `password` with the given salt and iteration count.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        ScramVerifier(ScramSecrets::derive(password.as_bytes(), salt, iterations))
    }

    /// A verifier as stored: the caller has checked the salt and the iteration count.
    pub(super) fn from_parts(
        salt: Vec<u8>,
        iterations: u32,
        stored_key: [u8; 32],
        server_key: [u8; 32],
    ) -> ScramVerifier {
        ScramVerifier(ScramSecrets {
            salt,
            iterations,
            stored_key,
            server_key,
        })
    }

    /// The salt (sent base64-encoded as `s=` in server-first-message).
    pub fn salt(&self) -> &[u8] {
        &self.0.salt
    }

    /// The iteration count (sent as `i=`).
    pub fn iterations(&self) -> u32 {
        self.0.iterations
    }

    /// `StoredKey`.
    pub fn stored_key(&self) -> &[u8; 32] {
        &self.0.stored_key
    }

    /// `ServerKey`.
    pub fn server_key(&self) -> &[u8; 32] {
        &self.0.server_key
    }

    /// The verifier as the SASL exchanges take it.
    pub fn secrets(&self) -> &ScramSecrets {
        &self.0
    }

    /// Checks the customer's `ClientProof` (the decoded `p=`) for `auth_message`
    /// (client-first-message-bare `,` server-first-message `,` client-final-message-without-proof):
    /// `ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)` must hash to `StoredKey`.
    /// Constant-time.
    pub fn verify_client_proof(&self, auth_message: &[u8], client_proof: &[u8]) -> bool {
        self.0.verify_client_proof(auth_message, client_proof)
    }

    /// `ServerSignature = HMAC(ServerKey, AuthMessage)`, sent base64-encoded as `v=`.
    pub fn server_signature(&self, auth_message: &[u8]) -> [u8; 32] {
        self.0.server_signature(auth_message)
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.0.iterations)
            .finish_non_exhaustive()
    }
}
