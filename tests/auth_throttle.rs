//! The failed-login throttle end to end (issue 9 item 7b): password guessing from one address
//! locks that address out of the account (`454 4.7.0`, even with the right password), while
//! the owner logs in from another address during the attack, slowed down by at most the
//! account's capped delay.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{password_for, SmtpClient, TestServer};

/// One core, so that every attempt meets the same throttle table (it is per core); short
/// delays and a small per-client limit, so the test is quick.
const CONFIG: &str = "[server]\ncores = 1\n\
    [odmr]\nallow_plaintext_auth = true\nauth_failure_delay = \"50ms\"\n\
    auth_max_delay = \"200ms\"\nauth_account_max_delay = \"300ms\"\n\
    auth_failures_per_client = 5\nauth_failures_per_address = 1000\n";

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const OWNER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn plain(password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0acme\0{password}"));
    format!("AUTH PLAIN {token}")
}

/// Opens an ODMR session from `from` and sends EHLO.
fn session(server: &TestServer, from: IpAddr) -> SmtpClient {
    let mut c = SmtpClient::connect_from(from, server.addr("odmr"));
    c.expect(220);
    c.cmd("EHLO customer.test", 250);
    c
}

#[test]
fn an_attack_from_one_address_does_not_lock_the_owner_out() {
    let server = Arc::new(TestServer::start(CONFIG, &[("acme", &["acme.example"])]));
    let stop = Arc::new(AtomicBool::new(false));
    let locked = Arc::new(AtomicU32::new(0));
    let attacker = {
        let (server, stop, locked) = (server.clone(), stop.clone(), locked.clone());
        thread::spawn(move || {
            let mut attempts = 0u32;
            while !stop.load(Ordering::Relaxed) && attempts < 500 {
                let mut c = session(&server, ATTACKER);
                // The server closes a session after its third failure; start a new one.
                for _ in 0..3 {
                    c.send(&plain("wrong guess"));
                    attempts += 1;
                    match c.read_reply() {
                        Ok((535, _)) => {}
                        Ok((454, text)) => {
                            assert!(text.starts_with("4.7.0"), "{text}");
                            locked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((421, _)) | Err(_) => break,
                        Ok(other) => panic!("unexpected reply to a wrong password: {other:?}"),
                    }
                }
            }
            attempts
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while locked.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the attacker was never throttled"
        );
        thread::sleep(Duration::from_millis(10));
    }

    // The attack goes on; the owner logs in from another address, more than once.
    for _ in 0..3 {
        let mut c = session(&server, OWNER);
        let started = Instant::now();
        let text = c.cmd(&plain(&password_for("acme")), 235);
        assert!(text.starts_with("2.7.0"), "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the owner waited {:?}",
            started.elapsed()
        );
        c.cmd("QUIT", 221);
    }
    // From the attacking address even the right password gets nothing.
    let mut c = session(&server, ATTACKER);
    let text = c.cmd(&plain(&password_for("acme")), 454);
    assert!(text.starts_with("4.7.0"), "{text}");
    c.cmd("QUIT", 221);

    stop.store(true, Ordering::Relaxed);
    let attempts = attacker.join().expect("attacker thread");
    assert!(attempts >= 6, "only {attempts} attempts");
    assert!(locked.load(Ordering::Relaxed) >= 1);
    assert!(server.logs().contains("login throttled"));
}
