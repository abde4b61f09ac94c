//! The CRAM-MD5 key (RFC 2195): HMAC-MD5 (RFC 2104) with the password as the key, kept as the
//! two precomputed MD5 states of RFC 2104 §4, the form Dovecot's `CRAM-MD5` scheme stores.
//!
//! Both ends use it: the provider verifies a customer's digest with the stored key, and the
//! customer computes its response from the password. The key is enough to answer any
//! challenge and is unsalted, so it protects the password from reuse elsewhere, not the
//! server from someone who can read where it is stored.
//!
//! Encoding ([`CramMd5Key::to_hex`], Dovecot's): the outer state words then the inner ones,
//! each little-endian, as 64 lowercase hex digits.

use std::fmt;

use super::ct::constant_time_eq;
use super::md5::{self, Md5};

/// A CRAM-MD5 key kept as the HMAC-MD5 intermediate states (RFC 2104 §4): the MD5 chaining
/// values after one block of `key ^ ipad` (inner) and of `key ^ opad` (outer).
#[derive(Clone, PartialEq, Eq)]
pub struct CramMd5Key {
    inner: [u32; 4],
    outer: [u32; 4],
}

impl CramMd5Key {
    /// Precomputes the states for `password` (its UTF-8 bytes are the HMAC key).
    pub fn from_password(password: &str) -> CramMd5Key {
        CramMd5Key::from_key(password.as_bytes())
    }

    /// Precomputes the states for an HMAC key of any length (longer than a block: hashed first).
    pub fn from_key(key: &[u8]) -> CramMd5Key {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..16].copy_from_slice(&md5::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| {
            let mut state = md5::INIT;
            md5::compress(&mut state, &block.map(|b| b ^ byte));
            state
        };
        CramMd5Key {
            inner: pad(0x36),
            outer: pad(0x5c),
        }
    }

    /// `HMAC-MD5(key, challenge)`, computed from the stored states.
    pub fn digest(&self, challenge: &[u8]) -> [u8; 16] {
        let mut inner = Md5::resume(self.inner, 1);
        inner.update(challenge);
        let mut outer = Md5::resume(self.outer, 1);
        outer.update(&inner.finalize());
        outer.finalize()
    }

    /// The digest of `challenge` as the 32 lowercase hex digits a CRAM-MD5 response carries.
    pub fn digest_hex(&self, challenge: &[u8]) -> String {
        hex_encode(&self.digest(challenge))
    }

    /// True when `response_hex` (32 hex digits, either case) is the digest of `challenge`.
    /// Constant-time in the digest comparison.
    pub fn verify(&self, challenge: &[u8], response_hex: &str) -> bool {
        match hex_decode(response_hex) {
            Some(response) => constant_time_eq(&response, &self.digest(challenge)),
            None => false,
        }
    }

    /// Dovecot's `CRAM-MD5` encoding: outer then inner state words, little-endian, as hex.
    pub fn to_hex(&self) -> String {
        let bytes: Vec<u8> = self
            .outer
            .iter()
            .chain(&self.inner)
            .flat_map(|w| w.to_le_bytes())
            .collect();
        hex_encode(&bytes)
    }

    /// Reads the encoding of [`CramMd5Key::to_hex`].
    pub fn from_hex(s: &str) -> Option<CramMd5Key> {
        let bytes = hex_decode(s)?;
        if bytes.len() != 32 {
            return None;
        }
        let mut words = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4")));
        let mut next4 = || [(); 4].map(|()| words.next().expect("8 words"));
        let outer = next4();
        let inner = next4();
        Some(CramMd5Key { inner, outer })
    }
}

impl fmt::Debug for CramMd5Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CramMd5Key(..)")
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use ::md5 as md5_crate;
    use hmac::{Hmac, Mac};

    use super::*;

    #[test]
    fn hmac_md5_from_stored_states_rfc2104_vectors() {
        // RFC 2104 §Appendix (test vectors 1-3) and RFC 2202 §2 (a key longer than a block).
        let table: [(Vec<u8>, Vec<u8>, &str); 5] = [
            (
                vec![0x0b; 16],
                b"Hi There".to_vec(),
                "9294727a3638bb1c13f48ef8158bfc9d",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "750c783e6ab0b503eaa86e310a5db738",
            ),
            (
                vec![0xaa; 16],
                vec![0xdd; 50],
                "56be34521d144c88dbb8c733f0e8b3f6",
            ),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "6b1ab7fe4bd7bf8f0b62e6ce61b9d0cd",
            ),
            (
                vec![0xaa; 80],
                b"Test Using Larger Than Block-Size Key and Larger Than One Block-Size Data"
                    .to_vec(),
                "6f630fad67cda0ee1fb1f562db3aa53e",
            ),
        ];
        for (key, data, want) in &table {
            let stored = CramMd5Key::from_key(key);
            assert_eq!(hex_encode(&stored.digest(data)), *want);
            assert_eq!(stored.digest_hex(data), *want);
            let mut reference = Hmac::<md5_crate::Md5>::new_from_slice(key).unwrap();
            reference.update(data);
            assert_eq!(
                stored.digest(data),
                <[u8; 16]>::from(reference.finalize().into_bytes())
            );
        }
    }

    #[test]
    fn hmac_md5_matches_the_hmac_crate_for_many_lengths() {
        for key_len in [0, 1, 15, 16, 63, 64, 65, 200] {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 13 + 1) as u8).collect();
            let stored = CramMd5Key::from_key(&key);
            for data_len in [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 500] {
                let data: Vec<u8> = (0..data_len).map(|i| (i * 31 + 5) as u8).collect();
                let mut reference = Hmac::<md5_crate::Md5>::new_from_slice(&key).unwrap();
                reference.update(&data);
                let want: [u8; 16] = reference.finalize().into_bytes().into();
                assert_eq!(stored.digest(&data), want, "key {key_len} data {data_len}");
            }
        }
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        assert_eq!(hex_decode("00ffA5"), Some(vec![0, 0xff, 0xa5]));
        assert_eq!(hex_encode(&[0, 0xff, 0xa5]), "00ffa5");
        for bad in ["0", "0g", "zz", "+1"] {
            assert_eq!(hex_decode(bad), None, "{bad:?}");
        }
    }
}
