//! SASL EXTERNAL over real sockets: a customer authenticates on the ODMR listener with a TLS
//! client certificate that `turnpike account cert` pinned to its account, then ATRN turns the
//! connection around. Also: an unpinned certificate gets 535, a client without a certificate
//! is not offered EXTERNAL, and an authorisation identity must name the certificate's account.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use common::{output_text, SmtpClient, TestServer, IO_TIMEOUT};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const GW: (&str, &[&str]) = ("gw", &["gw.example"]);

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A client certificate and its key, as rcgen makes them (self-signed, like a customer would).
struct ClientIdentity {
    pem: String,
    der: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn client_identity(name: &str) -> ClientIdentity {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    ClientIdentity {
        pem: cert.pem(),
        der: cert.der().clone(),
        key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    }
}

/// A client trusting the provider's self-signed certificate, presenting `identity` if given.
fn client_config(
    server: &TestServer,
    identity: Option<&ClientIdentity>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(server.data_dir().join("tls/cert.pem")).unwrap();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.der.clone()], id.key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// Reads one (possibly multi-line) reply: the code and the lines' texts joined by newlines.
fn read_reply(r: &mut impl BufRead) -> (u16, String) {
    let mut text = Vec::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "connection closed");
        let line = line.trim_end();
        text.push(line[4.min(line.len())..].to_owned());
        if line.as_bytes().get(3) != Some(&b'-') {
            return (line[..3].parse().unwrap(), text.join("\n"));
        }
    }
}

/// Connects to `addr`, says EHLO, STARTTLS, and returns the TLS stream after the second EHLO
/// together with that EHLO's reply text.
fn starttls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> (BufReader<TlsStream>, String) {
    let mut c = SmtpClient::connect(addr);
    c.expect(220);
    c.cmd("EHLO customer.test", 250);
    c.cmd("STARTTLS", 220);
    let (_, socket) = c.into_parts();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = rustls::ClientConnection::new(config, name).unwrap();
    let mut s = BufReader::new(rustls::StreamOwned::new(tls, socket));
    let ehlo = command(&mut s, "EHLO customer.test");
    assert_eq!(ehlo.0, 250, "{ehlo:?}");
    (s, ehlo.1)
}

fn command(s: &mut BufReader<TlsStream>, line: &str) -> (u16, String) {
    s.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .unwrap();
    s.get_mut().flush().unwrap();
    read_reply(s)
}

fn pin(server: &TestServer, account: &str, pem: &Path) -> String {
    let out = server.cli(
        &["account", "cert", account, "--add", pem.to_str().unwrap()],
        None,
    );
    assert!(out.status.success(), "{}", output_text(&out));
    output_text(&out)
}

fn offers_external(ehlo: &str) -> bool {
    ehlo.lines()
        .any(|l| l.starts_with("AUTH ") && l.split(' ').any(|m| m == "EXTERNAL"))
}

#[test]
fn pinned_client_certificate_authenticates_and_atrn_reverses() {
    let server = TestServer::start("", &[GW]);
    let id = client_identity("gw.example");
    let pem = server.data_dir().join("gw-client.pem");
    std::fs::write(&pem, &id.pem).unwrap();
    let said = pin(&server, "gw", &pem);
    assert!(said.contains("sha256:"), "{said}");
    let listed = output_text(&server.cli(&["account", "list"], None));
    assert!(listed.contains("cert=sha256:"), "{listed}");

    let mut mx = SmtpClient::connect(server.addr("mx"));
    mx.expect(220);
    mx.cmd("EHLO sender.test", 250);
    mx.send_mail(
        "a@sender.test",
        &["bob@gw.example"],
        "Subject: ext\r\n\r\nhello\r\n",
    );
    mx.cmd("QUIT", 221);

    let (mut s, ehlo) = starttls(server.addr("odmr"), client_config(&server, Some(&id)));
    assert!(offers_external(&ehlo), "EXTERNAL not offered: {ehlo:?}");
    let (code, text) = command(&mut s, "AUTH EXTERNAL =");
    assert_eq!((code, &text[..5]), (235, "2.7.0"), "{text}");
    let (code, text) = command(&mut s, "ATRN");
    assert_eq!(code, 250, "{text}");

    // The turnaround: we are the SMTP server now, and the provider delivers gw.example's mail.
    s.get_mut().write_all(b"220 gw.example ESMTP\r\n").unwrap();
    s.get_mut().flush().unwrap();
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    assert!(line.starts_with("EHLO "), "{line:?}");
    s.get_mut().write_all(b"250 gw.example\r\n").unwrap();
    s.get_mut().flush().unwrap();
    line.clear();
    s.read_line(&mut line).unwrap();
    assert_eq!(line, "MAIL FROM:<a@sender.test>\r\n");
}

#[test]
fn unpinned_certificate_is_refused_and_no_certificate_is_not_offered_external() {
    let server = TestServer::start("", &[GW]);
    let pinned = client_identity("gw.example");
    let pem = server.data_dir().join("gw-client.pem");
    std::fs::write(&pem, &pinned.pem).unwrap();
    pin(&server, "gw", &pem);

    let stranger = client_identity("gw.example");
    let (mut s, ehlo) = starttls(server.addr("odmr"), client_config(&server, Some(&stranger)));
    assert!(offers_external(&ehlo), "{ehlo:?}");
    let (code, text) = command(&mut s, "AUTH EXTERNAL =");
    assert_eq!((code, &text[..5]), (535, "5.7.8"), "{text}");

    let (mut s, ehlo) = starttls(server.addr("odmr"), client_config(&server, None));
    assert!(
        !offers_external(&ehlo),
        "EXTERNAL offered without a certificate: {ehlo:?}"
    );
    let (code, text) = command(&mut s, "AUTH EXTERNAL =");
    assert_eq!((code, &text[..5]), (504, "5.5.4"), "{text}");
    assert!(
        server.logs().contains("authentication failed"),
        "the refused EXTERNAL is logged: {}",
        server.logs()
    );
}

#[test]
fn authorization_identity_must_name_the_certificates_account() {
    let server = TestServer::start("", &[GW, ("other", &["other.example"])]);
    let id = client_identity("gw.example");
    let pem = server.data_dir().join("gw-client.pem");
    std::fs::write(&pem, &id.pem).unwrap();
    pin(&server, "gw", &pem);

    // base64("other") as the authorisation identity: the certificate is gw's, so no.
    let (mut s, _) = starttls(server.addr("odmr"), client_config(&server, Some(&id)));
    let (code, _) = command(&mut s, "AUTH EXTERNAL b3RoZXI=");
    assert_eq!(code, 535);
    // base64("gw") is fine.
    let (mut s, _) = starttls(server.addr("odmr"), client_config(&server, Some(&id)));
    let (code, text) = command(&mut s, "AUTH EXTERNAL Z3c=");
    assert_eq!(code, 235, "{text}");

    // Pinning the same certificate to a second account is refused, naming the owner.
    let out = server.cli(
        &["account", "cert", "other", "--add", pem.to_str().unwrap()],
        None,
    );
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("already belongs to account \"gw\""),
        "{}",
        output_text(&out)
    );

    // Unpinning takes effect in the running server (SIGHUP via the control socket).
    let fingerprint = turnpike::tls::pem_fingerprints(&pem).unwrap().remove(0);
    let out = server.cli(&["account", "cert", "gw", "--remove", &fingerprint], None);
    assert!(out.status.success(), "{}", output_text(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (mut s, _) = starttls(server.addr("odmr"), client_config(&server, Some(&id)));
        let (code, _) = command(&mut s, "AUTH EXTERNAL =");
        if code == 535 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "unpinned certificate still accepted"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
