//! The SCRAM-SHA-256 math (RFC 5802 §3, RFC 7677), written once for the provider's exchange,
//! the client's exchange and the accounts' stored verifiers.
//!
//! ```text
//! SaltedPassword  = PBKDF2-HMAC-SHA-256(password, salt, i)
//! ClientKey       = HMAC(SaltedPassword, "Client Key")
//! StoredKey       = SHA-256(ClientKey)
//! ServerKey       = HMAC(SaltedPassword, "Server Key")
//! AuthMessage     = client-first-message-bare "," server-first-message ","
//!                   client-final-message-without-proof
//! ClientSignature = HMAC(StoredKey, AuthMessage)
//! ClientProof     = ClientKey XOR ClientSignature
//! ServerSignature = HMAC(ServerKey, AuthMessage)
//! ```
//!
//! The provider keeps only `(salt, i, StoredKey, ServerKey)`, the [`ScramSecrets`]: enough to
//! check a proof and to prove itself, not enough to log in. The client derives [`ClientKeys`]
//! from the password. Also here: the `saslname` escaping both sides apply to user names.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::ct::constant_time_eq;

/// The SCRAM-SHA-256 verifier of one account (RFC 5802 §3), as the store keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecrets {
    /// The salt, sent base64-encoded as `s=`.
    pub salt: Vec<u8>,
    /// The PBKDF2 iteration count, sent as `i=`.
    pub iterations: u32,
    /// `StoredKey = H(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: [u8; 32],
    /// `ServerKey = HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl ScramSecrets {
    /// The verifier of `password` with `salt` and `iterations`.
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ScramSecrets {
        let keys = ClientKeys::derive(password, salt, iterations);
        ScramSecrets {
            salt: salt.to_vec(),
            iterations,
            stored_key: keys.stored_key,
            server_key: keys.server_key,
        }
    }

    /// True when `password` derives this verifier's `StoredKey` (PLAIN and LOGIN are checked
    /// this way, so no plaintext is stored for them). Costs one PBKDF2 run; constant-time.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let keys = ClientKeys::derive(password, &self.salt, self.iterations);
        constant_time_eq(&keys.stored_key, &self.stored_key)
    }

    /// Checks the client's `ClientProof` (the decoded `p=`) for `auth_message`:
    /// `ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)` must hash to `StoredKey`.
    /// Constant-time.
    pub fn verify_client_proof(&self, auth_message: &[u8], client_proof: &[u8]) -> bool {
        if client_proof.len() != 32 {
            return false;
        }
        let signature = hmac_sha256(&self.stored_key, auth_message);
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(client_proof.iter().zip(signature))
        {
            *k = p ^ s;
        }
        constant_time_eq(&Sha256::digest(client_key), &self.stored_key)
    }

    /// `ServerSignature = HMAC(ServerKey, AuthMessage)`, sent base64-encoded as `v=`.
    pub fn server_signature(&self, auth_message: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.server_key, auth_message)
    }
}

impl std::fmt::Debug for ScramSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecrets")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

/// What a client derives from its password for one exchange.
#[derive(Clone)]
pub struct ClientKeys {
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl ClientKeys {
    /// `ClientKey`, `StoredKey` and `ServerKey` of `password` with `salt` and `iterations`.
    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> ClientKeys {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
        let client_key = hmac_sha256(&salted, b"Client Key");
        ClientKeys {
            client_key,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// `ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage)`, sent base64-encoded as `p=`.
    pub fn client_proof(&self, auth_message: &[u8]) -> [u8; 32] {
        let signature = hmac_sha256(&self.stored_key, auth_message);
        let mut proof = self.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        proof
    }

    /// The `ServerSignature` a genuine provider sends for `auth_message`.
    pub fn server_signature(&self, auth_message: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.server_key, auth_message)
    }
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys(..)")
    }
}

/// `AuthMessage` (RFC 5802 §3).
pub fn auth_message(client_first_bare: &str, server_first: &str, without_proof: &str) -> String {
    format!("{client_first_bare},{server_first},{without_proof}")
}

/// `HMAC-SHA-256(key, data)`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// RFC 5802 `saslname` escaping: `,` becomes `=2C` and `=` becomes `=3D`.
pub fn encode_saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// RFC 5802 `saslname`: `=2C` is `,` and `=3D` is `=`; any other `=` or a bare `,` is invalid.
pub fn decode_saslname(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(['=', ',']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("=2C") {
            out.push(',');
        } else if tail.starts_with("=3D") {
            out.push('=');
        } else {
            return None;
        }
        rest = &tail[3..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;

    use super::*;

    /// RFC 7677 §3: user "user", password "pencil"; the proof and signature of the example.
    #[test]
    fn rfc7677_example_from_both_ends() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let auth = auth_message(
            "n=user,r=rOprNGfwEbeRWgbNEkqO",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,\
             i=4096",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        );
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let signature = "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

        let client = ClientKeys::derive(b"pencil", &salt, 4096);
        assert_eq!(B64.encode(client.client_proof(auth.as_bytes())), proof);
        assert_eq!(
            B64.encode(client.server_signature(auth.as_bytes())),
            signature
        );

        let server = ScramSecrets::derive(b"pencil", &salt, 4096);
        let p = B64.decode(proof).unwrap();
        assert!(server.verify_client_proof(auth.as_bytes(), &p));
        assert_eq!(
            B64.encode(server.server_signature(auth.as_bytes())),
            signature
        );
        assert!(server.verify_password(b"pencil"));
        assert!(!server.verify_password(b"pencil2"));
        let mut tampered = p.clone();
        tampered[0] ^= 1;
        assert!(!server.verify_client_proof(auth.as_bytes(), &tampered));
        assert!(!server.verify_client_proof(auth.as_bytes(), &p[..31]));
    }

    #[test]
    fn saslnames_escape_and_round_trip() {
        let table = [
            ("user", Some("user")),
            ("a=2Cb=3Dc", Some("a,b=c")),
            ("=2C=3D", Some(",=")),
            ("us=er", None),
            ("a,b", None),
            ("=2", None),
            ("", Some("")),
        ];
        for (wire, want) in table {
            assert_eq!(decode_saslname(wire).as_deref(), want, "{wire:?}");
        }
        for name in ["a,b=c", "plain", "==,,", ""] {
            assert_eq!(
                decode_saslname(&encode_saslname(name)).as_deref(),
                Some(name)
            );
        }
    }
}
