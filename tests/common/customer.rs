//! A scripted ODMR customer: AUTH PLAIN, ATRN, then the SMTP server side of the reversal with
//! PIPELINING, CHUNKING and 8BITMIME, collecting what the provider delivers.
//!
//! A hook sees each message once its body is in and decides the answer, so a test can pause
//! mid-drain (compact, kill the server), refuse a message, or hang up. A provider that closes
//! the connection ends the drain early instead of panicking: crash tests expect that.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use base64::Engine as _;

use super::{password_for, TestServer};

/// Config the server needs for this customer's AUTH PLAIN without TLS.
pub const PLAINTEXT_AUTH: &str = "[odmr]\nallow_plaintext_auth = true\n";

/// One message as the customer received it.
#[derive(Debug, Clone, Default)]
pub struct Delivered {
    /// The `RCPT TO:` addresses, in order.
    pub rcpts: Vec<String>,
    /// The content, unstuffed (what a mail store would keep).
    pub body: Vec<u8>,
}

/// What the hook answers for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `250 2.0.0`.
    Accept,
    /// This reply line instead.
    Reply(String),
    /// Close the connection without answering.
    Hangup,
}

/// The result of one ATRN session.
#[derive(Debug, Default)]
pub struct Drain {
    /// The code and text of the reply to ATRN.
    pub atrn: (u16, String),
    /// Messages answered 2xx, in order.
    pub accepted: Vec<Delivered>,
    /// Every message whose body arrived, whatever the answer.
    pub received: usize,
    /// The provider closed the connection before QUIT.
    pub cut: bool,
}

/// Logs `account` in on the ODMR listener and sends `ATRN domains` (bare if empty). On 250,
/// plays the customer through QUIT, asking `hook(n, message)` for each message's answer.
pub fn atrn_drain(
    server: &TestServer,
    account: &str,
    domains: &str,
    hook: impl FnMut(usize, &Delivered) -> Answer,
) -> Drain {
    atrn_drain_at(server.addr("odmr"), account, domains, hook)
}

/// [`atrn_drain`] against the ODMR listener at `odmr` (for a thread that does not hold the
/// server). A provider that goes away at any point (a crash test kills it) ends the drain as
/// cut, never with a panic.
pub fn atrn_drain_at(
    odmr: std::net::SocketAddr,
    account: &str,
    domains: &str,
    mut hook: impl FnMut(usize, &Delivered) -> Answer,
) -> Drain {
    let mut drain = Drain::default();
    let Some(mut s) = Session::connect(odmr) else {
        drain.cut = true;
        return drain;
    };
    let token = base64::engine::general_purpose::STANDARD
        .encode(format!("\0{account}\0{}", password_for(account)));
    let line = if domains.is_empty() {
        "ATRN".to_string()
    } else {
        format!("ATRN {domains}")
    };
    let atrn = (|| {
        (s.reply()?.0 == 220).then_some(())?;
        s.say("EHLO customer.test")?;
        (s.reply()?.0 == 250).then_some(())?;
        s.say(&format!("AUTH PLAIN {token}"))?;
        let auth = s.reply()?;
        assert_eq!(auth.0, 235, "AUTH PLAIN {account}: {auth:?}");
        s.say(&line)?;
        s.reply()
    })();
    let Some(atrn) = atrn else {
        drain.cut = true;
        return drain;
    };
    drain.atrn = atrn;
    if drain.atrn.0 != 250 {
        let _ = s.say("QUIT");
        return drain;
    }
    if s.serve(&mut drain, &mut hook).is_none() {
        drain.cut = true;
    }
    drain
}

struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    fn connect(addr: std::net::SocketAddr) -> Option<Session> {
        let stream = TcpStream::connect_timeout(&addr, super::IO_TIMEOUT).ok()?;
        stream.set_read_timeout(Some(super::IO_TIMEOUT)).ok()?;
        stream.set_write_timeout(Some(super::IO_TIMEOUT)).ok()?;
        let _ = stream.set_nodelay(true);
        let writer = stream.try_clone().ok()?;
        Some(Session {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// One reply of the provider before the turnaround: its code and last line's text.
    fn reply(&mut self) -> Option<(u16, String)> {
        loop {
            let line = self.line()?;
            let code = line.get(..3)?.parse().ok()?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some((code, line.get(4..).unwrap_or("").to_string()));
            }
        }
    }

    fn line(&mut self) -> Option<String> {
        let mut raw = Vec::new();
        match self.reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(String::from_utf8_lossy(&raw).trim_end().to_string()),
        }
    }

    fn say(&mut self, line: &str) -> Option<()> {
        self.writer.write_all(format!("{line}\r\n").as_bytes()).ok()
    }

    /// `None` when the provider went away.
    fn serve(
        &mut self,
        drain: &mut Drain,
        hook: &mut impl FnMut(usize, &Delivered) -> Answer,
    ) -> Option<()> {
        self.say("220 customer.test ESMTP")?;
        let ehlo = self.line()?;
        assert!(
            ehlo.starts_with("EHLO "),
            "provider's first command: {ehlo}"
        );
        for cap in [
            "250-customer.test",
            "250-PIPELINING",
            "250-8BITMIME",
            "250-SMTPUTF8",
        ] {
            self.say(cap)?;
        }
        self.say("250 CHUNKING")?;
        let mut msg = Delivered::default();
        loop {
            let line = self.line()?;
            let upper = line.to_ascii_uppercase();
            if upper.starts_with("MAIL FROM:") {
                msg = Delivered::default();
                self.say("250 2.1.0 ok")?;
            } else if upper.starts_with("RCPT TO:<") {
                let addr = line["RCPT TO:<".len()..].split('>').next()?.to_string();
                msg.rcpts.push(addr);
                self.say("250 2.1.5 ok")?;
            } else if let Some(rest) = upper.strip_prefix("BDAT ") {
                let n: usize = rest.split(' ').next()?.parse().ok()?;
                assert!(rest.ends_with(" LAST"), "{line}: expected one LAST chunk");
                let mut body = vec![0u8; n];
                self.reader.read_exact(&mut body).ok()?;
                msg.body = body;
                self.finish(drain, hook, std::mem::take(&mut msg))?;
            } else if upper == "DATA" {
                self.say("354 go ahead")?;
                let mut body = Vec::new();
                loop {
                    let mut raw = Vec::new();
                    if self.reader.read_until(b'\n', &mut raw).ok()? == 0 {
                        return None;
                    }
                    if raw == b".\r\n" {
                        break;
                    }
                    body.extend_from_slice(raw.strip_prefix(b".").unwrap_or(&raw));
                }
                msg.body = body;
                self.finish(drain, hook, std::mem::take(&mut msg))?;
            } else if upper == "RSET" || upper == "NOOP" {
                self.say("250 2.0.0 ok")?;
            } else if upper == "QUIT" {
                self.say("221 2.0.0 bye")?;
                return Some(());
            } else {
                panic!("unexpected command from the provider: {line:?}");
            }
        }
    }

    fn finish(
        &mut self,
        drain: &mut Drain,
        hook: &mut impl FnMut(usize, &Delivered) -> Answer,
        msg: Delivered,
    ) -> Option<()> {
        let n = drain.received;
        drain.received += 1;
        match hook(n, &msg) {
            Answer::Accept => {
                self.say("250 2.0.0 queued")?;
                drain.accepted.push(msg);
            }
            Answer::Reply(r) => {
                if r.starts_with('2') {
                    drain.accepted.push(msg);
                }
                self.say(&r)?;
            }
            Answer::Hangup => return None,
        }
        Some(())
    }
}
