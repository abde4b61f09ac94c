//! `turnpike pull` with SASL EXTERNAL: the customer's client certificate, pinned to its
//! account with `turnpike account cert`, is its only credential (no password anywhere).

mod common;

use std::time::Duration;

use common::{output_text, run_bounded, SmtpClient, TestServer};

#[test]
fn external_with_a_pinned_client_certificate_collects_the_mail() {
    let server = TestServer::start("", &[("office", &["office.test"])]);
    let dir = server.data_dir().join("customer");
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["gw.office.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("office.crt"), dir.join("office.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let out = server.cli(
        &[
            "account",
            "cert",
            "office",
            "--add",
            cert_path.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", output_text(&out));
    std::thread::sleep(Duration::from_millis(300)); // the reload reaches the cores

    let maildir = dir.join("Maildir");
    let config = dir.join("pull.toml");
    let template = format!(
        "[provider]\naddress = \"{}\"\nserver_name = \"localhost\"\nca = \"{}\"\n\
         client_cert = \"{}\"\nclient_key = \"{}\"\n\
         [account]\nname = \"office\"\nmechanism = \"MECH\"\n\
         [delivery]\ncatch_all = {{ maildir = \"{}\" }}\n",
        server.addr("odmr"),
        server.data_dir().join("tls/cert.pem").display(),
        cert_path.display(),
        key_path.display(),
        maildir.display()
    );
    // Named, then chosen by `auto` (no password configured: EXTERNAL is the only candidate).
    for (n, mechanism) in ["external", "auto"].into_iter().enumerate() {
        let mut c = SmtpClient::connect(server.addr("mx"));
        c.expect(220);
        c.cmd("EHLO client.test", 250);
        c.send_mail(
            "s@client.test",
            &["a@office.test"],
            "Subject: x\r\n\r\nvia EXTERNAL\r\n",
        );
        c.cmd("QUIT", 221);

        std::fs::write(&config, template.replace("MECH", mechanism)).unwrap();
        let mut cmd = std::process::Command::new(common::turnpike_bin());
        cmd.args(["pull", "--config", config.to_str().unwrap()]);
        let out = run_bounded(&mut cmd, None, Duration::from_secs(60));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{mechanism}: {}",
            output_text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("mechanism=\"EXTERNAL\""),
            "{}",
            output_text(&out)
        );
        let files = std::fs::read_dir(maildir.join("new")).unwrap().count();
        assert_eq!(files, n + 1, "{mechanism}");
    }
}
