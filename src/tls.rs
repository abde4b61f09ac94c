//! The provider's TLS identity: loading its certificate and key into a rustls configuration,
//! and generating a self-signed pair on first run so that zero-config STARTTLS works.
//!
//! What this owns: `<data_dir>/tls/cert.pem` and `<data_dir>/tls/key.pem` when the operator has
//! not configured `tls.cert`/`tls.key`, and every rustls `ServerConfig` the listeners use.
//!
//! Invariants:
//!
//! - rustls always runs on the `ring` provider, chosen explicitly (no process-wide default is
//!   installed or relied upon), with rustls's safe default protocol versions (TLS 1.2 and 1.3).
//! - Generated keys are written with mode 0600 inside a 0700 directory, via a temporary file
//!   and rename, key before certificate. The pair is reused only when both files exist, so a
//!   crash between the two writes just means a fresh pair on the next start.
//! - Every error names the file it concerns.
//!
//! Client certificates (SASL EXTERNAL): the ODMR and submission listeners *ask* for an optional
//! client certificate ([`ClientAuth::Pinned`]); the MX never does. Any certificate whose holder
//! proves possession of its key is accepted at the TLS layer; authorisation happens later, when
//! AUTH EXTERNAL maps the certificate's SHA-256 fingerprint ([`fingerprint`]) to an account. This
//! is pinning, like Postfix's `check_ccert_access`: no CA is needed, and expiry dates are not
//! checked (the operator removes a fingerprint to revoke it).

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsIdentity;
use crate::types::DomainName;

/// File name of the generated certificate inside `<data_dir>/tls/`.
pub const SELF_SIGNED_CERT: &str = "cert.pem";

/// File name of the generated private key inside `<data_dir>/tls/`.
pub const SELF_SIGNED_KEY: &str = "key.pem";

/// Returns the paths of the self-signed certificate and key in `<data_dir>/tls/`, generating
/// them first when either is missing.
///
/// The certificate is valid for `hostname`, `localhost` and `127.0.0.1` (subject alternative
/// names), with `hostname` as its common name, and uses an ECDSA P-256 key.
pub fn ensure_self_signed(
    data_dir: &Path,
    hostname: &DomainName,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let dir = data_dir.join("tls");
    let cert = dir.join(SELF_SIGNED_CERT);
    let key = dir.join(SELF_SIGNED_KEY);
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| TlsError::io(&dir, "cannot create the directory", e))?;

    let mut names = vec![hostname.as_str().to_owned()];
    for extra in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == extra) {
            names.push(extra.to_owned());
        }
    }
    let generate = || -> Result<(String, String), rcgen::Error> {
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hostname.as_str());
        let key_pair = rcgen::KeyPair::generate()?;
        let certificate = params.self_signed(&key_pair)?;
        Ok((certificate.pem(), key_pair.serialize_pem()))
    };
    let (cert_pem, key_pem) =
        generate().map_err(|e| TlsError::new(&cert, TlsErrorKind::Generate(e)))?;

    write_file(&key, key_pem.as_bytes(), 0o600)?;
    write_file(&cert, cert_pem.as_bytes(), 0o600)?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TlsError::io(&dir, "cannot sync the directory", e))?;
    tracing::info!(cert = %cert.display(), %hostname, "generated a self-signed TLS certificate");
    Ok((cert, key))
}

/// The certificate and key files for a configured identity: the operator's files as given, or
/// the self-signed pair in `<data_dir>/tls/` (generated on first run, see
/// [`ensure_self_signed`]).
pub fn identity_files(
    identity: &TlsIdentity,
    data_dir: &Path,
    hostname: &DomainName,
) -> Result<(PathBuf, PathBuf), TlsError> {
    match identity {
        TlsIdentity::Files { cert, key } => Ok((cert.clone(), key.clone())),
        TlsIdentity::SelfSigned => ensure_self_signed(data_dir, hostname),
    }
}

/// Whether a listener asks for a client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAuth {
    /// No client certificate is requested (the MX).
    #[default]
    None,
    /// An optional client certificate is requested and accepted when its holder proves
    /// possession of the key; it identifies an account only through its pinned fingerprint.
    Pinned,
}

/// The identity SASL EXTERNAL maps to an account: `sha256:` and the lowercase hex SHA-256 of
/// the certificate's DER encoding (what `openssl x509 -noout -fingerprint -sha256` prints, without
/// the colons).
pub fn fingerprint(cert_der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(cert_der);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The fingerprints of the certificates in a PEM file (for `turnpike account cert`).
pub fn pem_fingerprints(path: &Path) -> Result<Vec<String>, TlsError> {
    Ok(read_certs(path)?.iter().map(|c| fingerprint(c)).collect())
}

/// Accepts any client certificate whose signature over the handshake verifies; see the module
/// docs for why the chain is not checked.
#[derive(Debug)]
struct PinnedClientCerts {
    provider: Arc<CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for PinnedClientCerts {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The provider's rustls configuration from a PEM certificate chain (leaf first) and a PEM
/// private key (PKCS#8, PKCS#1 or SEC1), without client certificates.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    server_config(cert, key, ClientAuth::None)
}

/// As [`load_server_config`], with an explicit client-certificate policy.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certs(cert)?;
    let private_key = read_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(cert, TlsErrorKind::Rustls(e)))?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Pinned => builder.with_client_cert_verifier(Arc::new(PinnedClientCerts {
            provider: provider(),
        })),
    };
    let config = builder
        .with_single_cert(chain, private_key)
        .map_err(|error| {
            TlsError::new(
                cert,
                TlsErrorKind::KeyRejected {
                    key: key.to_path_buf(),
                    error,
                },
            )
        })?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts exactly the certificates in `cert_pem_path` (for
/// example a provider's self-signed certificate). Used by tests, and by a customer that pins
/// its provider's certificate.
pub fn client_config_trusting(cert_pem_path: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(cert_pem_path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::new(cert_pem_path, TlsErrorKind::Rustls(e)))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(cert_pem_path, TlsErrorKind::Rustls(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The one crypto provider turnpike uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = File::open(path).map_err(|e| TlsError::io(path, "cannot open", e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::io(path, "cannot read PEM", e))?;
    if certs.is_empty() {
        return Err(TlsError::new(path, TlsErrorKind::NoCertificate));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = File::open(path).map_err(|e| TlsError::io(path, "cannot open", e))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| TlsError::io(path, "cannot read PEM", e))?
        .ok_or_else(|| TlsError::new(path, TlsErrorKind::NoPrivateKey))
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // A leftover from a crashed run with the same pid would make create_new fail.
    let _ = fs::remove_file(&tmp);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        TlsError::io(path, "cannot write", e)
    })
}

/// A TLS setup failure and the file it concerns.
#[derive(Debug)]
pub struct TlsError {
    file: PathBuf,
    kind: TlsErrorKind,
}

/// What went wrong (see [`TlsError`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// Reading, writing or syncing failed, or the PEM is malformed.
    Io {
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// The file holds no PEM certificate.
    NoCertificate,
    /// The file holds no PEM private key.
    NoPrivateKey,
    /// rustls refused the key for this certificate (mismatch or unsupported algorithm).
    KeyRejected {
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        error: rustls::Error,
    },
    /// rustls refused a certificate or configuration.
    Rustls(rustls::Error),
    /// Generating the self-signed certificate failed.
    Generate(rcgen::Error),
}

impl TlsError {
    fn new(file: &Path, kind: TlsErrorKind) -> TlsError {
        TlsError {
            file: file.to_path_buf(),
            kind,
        }
    }

    fn io(file: &Path, action: &'static str, source: io::Error) -> TlsError {
        TlsError::new(file, TlsErrorKind::Io { action, source })
    }

    /// The file concerned (for [`TlsErrorKind::KeyRejected`], the certificate).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// What went wrong.
    pub fn kind(&self) -> &TlsErrorKind {
        &self.kind
    }
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        match &self.kind {
            TlsErrorKind::Io { action, source } => write!(f, "{action}: {source}"),
            TlsErrorKind::NoCertificate => f.write_str("no PEM certificate in the file"),
            TlsErrorKind::NoPrivateKey => f.write_str("no PEM private key in the file"),
            TlsErrorKind::KeyRejected { key, error } => {
                write!(
                    f,
                    "cannot be used with the key in {}: {error}",
                    key.display()
                )
            }
            TlsErrorKind::Rustls(e) => write!(f, "rejected by rustls: {e}"),
            TlsErrorKind::Generate(e) => write!(f, "cannot generate a certificate: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            TlsErrorKind::Io { source, .. } => Some(source),
            TlsErrorKind::KeyRejected { error, .. } => Some(error),
            TlsErrorKind::Rustls(e) => Some(e),
            TlsErrorKind::Generate(e) => Some(e),
            TlsErrorKind::NoCertificate | TlsErrorKind::NoPrivateKey => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, Connection, ServerConnection};

    use super::*;

    /// A unique scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "turnpike-test-{tag}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn host(name: &str) -> DomainName {
        DomainName::parse(name).unwrap()
    }

    /// Moves every pending TLS record from `from` to `to` and lets `to` process them.
    fn transfer(from: &mut Connection, to: &mut Connection) -> Result<(), rustls::Error> {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rest = &wire[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(())
    }

    /// Runs a whole handshake in memory; the error is the first side's refusal.
    fn handshake(client: &mut Connection, server: &mut Connection) -> Result<(), rustls::Error> {
        for _ in 0..10 {
            transfer(client, server)?;
            transfer(server, client)?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn pair(cert: &Path, key: &Path, name: &str) -> (Connection, Connection) {
        let server = ServerConnection::new(load_server_config(cert, key).unwrap()).unwrap();
        let client = ClientConnection::new(
            client_config_trusting(cert).unwrap(),
            ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap();
        (client.into(), server.into())
    }

    #[test]
    fn self_signed_certificate_validates_for_localhost() {
        let dir = Scratch::new("tls-handshake");
        let (cert, key) = ensure_self_signed(&dir.0, &host("mx.example.net")).unwrap();
        assert_eq!(cert, dir.0.join("tls/cert.pem"));
        assert_eq!(key, dir.0.join("tls/key.pem"));

        for name in ["localhost", "mx.example.net", "127.0.0.1"] {
            let (mut client, mut server) = pair(&cert, &key, name);
            handshake(&mut client, &mut server).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                client.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );

            // Application data crosses in both directions.
            client
                .writer()
                .write_all(b"EHLO customer.example\r\n")
                .unwrap();
            transfer(&mut client, &mut server).unwrap();
            let mut got = [0u8; 23];
            server.reader().read_exact(&mut got).unwrap();
            assert_eq!(&got, b"EHLO customer.example\r\n");
            server.writer().write_all(b"250 ok\r\n").unwrap();
            transfer(&mut server, &mut client).unwrap();
            let mut got = [0u8; 8];
            client.reader().read_exact(&mut got).unwrap();
            assert_eq!(&got, b"250 ok\r\n");
        }
    }

    #[test]
    fn certificate_does_not_validate_for_other_names() {
        let dir = Scratch::new("tls-wrongname");
        let (cert, key) = ensure_self_signed(&dir.0, &host("localhost")).unwrap();
        let (mut client, mut server) = pair(&cert, &key, "example.org");
        let err = handshake(&mut client, &mut server).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
                    | rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForNameContext { .. }
                    )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_client_trusting_another_certificate_refuses() {
        let ours = Scratch::new("tls-ours");
        let theirs = Scratch::new("tls-theirs");
        let (cert, key) = ensure_self_signed(&ours.0, &host("localhost")).unwrap();
        let (other_cert, _) = ensure_self_signed(&theirs.0, &host("localhost")).unwrap();
        let server = ServerConnection::new(load_server_config(&cert, &key).unwrap()).unwrap();
        let client = ClientConnection::new(
            client_config_trusting(&other_cert).unwrap(),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let err = handshake(&mut client.into(), &mut server.into()).unwrap_err();
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "{err:?}"
        );
    }

    #[test]
    fn generated_pair_is_private_and_reused() {
        let dir = Scratch::new("tls-reuse");
        let (cert, key) = ensure_self_signed(&dir.0, &host("localhost")).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir.0.join("tls")), 0o700);
        let cert_pem = fs::read(&cert).unwrap();
        let key_pem = fs::read(&key).unwrap();

        let again = ensure_self_signed(&dir.0, &host("other.example")).unwrap();
        assert_eq!(again, (cert.clone(), key.clone()));
        assert_eq!(
            fs::read(&cert).unwrap(),
            cert_pem,
            "certificate was regenerated"
        );
        assert_eq!(fs::read(&key).unwrap(), key_pem, "key was regenerated");

        // A key without its certificate (a crash between the writes) gets a fresh pair.
        fs::remove_file(&cert).unwrap();
        ensure_self_signed(&dir.0, &host("localhost")).unwrap();
        assert_ne!(fs::read(&key).unwrap(), key_pem);
        load_server_config(&cert, &key).unwrap();

        let mut names: Vec<_> = fs::read_dir(dir.0.join("tls"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["cert.pem", "key.pem"],
            "temporary files left behind"
        );
    }

    #[test]
    fn identity_files_follow_the_config() {
        let dir = Scratch::new("tls-identity");
        let files = TlsIdentity::Files {
            cert: "/etc/c.pem".into(),
            key: "/etc/k.pem".into(),
        };
        let got = identity_files(&files, &dir.0, &host("localhost")).unwrap();
        assert_eq!(
            got,
            (PathBuf::from("/etc/c.pem"), PathBuf::from("/etc/k.pem"))
        );
        assert!(
            !dir.0.join("tls").exists(),
            "nothing is generated for configured files"
        );

        let (cert, key) =
            identity_files(&TlsIdentity::SelfSigned, &dir.0, &host("localhost")).unwrap();
        assert_eq!(cert, dir.0.join("tls/cert.pem"));
        load_server_config(&cert, &key).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let dir = Scratch::new("tls-errors");
        let (cert, key) = ensure_self_signed(&dir.0, &host("localhost")).unwrap();
        let (other_cert, _) = {
            let other = dir.0.join("other");
            ensure_self_signed(&other, &host("localhost")).unwrap()
        };
        let missing = dir.0.join("missing.pem");
        let empty = dir.0.join("empty.pem");
        fs::write(&empty, "not PEM at all\n").unwrap();

        let cases = [
            (
                load_server_config(&missing, &key).unwrap_err(),
                &missing,
                "cannot open: ",
            ),
            (
                load_server_config(&cert, &missing).unwrap_err(),
                &missing,
                "cannot open: ",
            ),
            (
                load_server_config(&empty, &key).unwrap_err(),
                &empty,
                "no PEM certificate in the file",
            ),
            (
                load_server_config(&cert, &empty).unwrap_err(),
                &empty,
                "no PEM private key in the file",
            ),
            (
                load_server_config(&key, &key).unwrap_err(),
                &key,
                "no PEM certificate in the file",
            ),
            (
                load_server_config(&cert, &cert).unwrap_err(),
                &cert,
                "no PEM private key in the file",
            ),
            (
                load_server_config(&other_cert, &key).unwrap_err(),
                &other_cert,
                "cannot be used with the key in ",
            ),
            (
                client_config_trusting(&empty).unwrap_err(),
                &empty,
                "no PEM certificate in the file",
            ),
        ];
        for (err, file, what) in cases {
            assert_eq!(err.file(), file.as_path());
            let want = format!("{}: {what}", file.display());
            assert!(
                err.to_string().starts_with(&want),
                "{err} does not start with {want}"
            );
        }
    }
}
