//! Hand-over to an LMTP server (RFC 2033) or a local MTA over SMTP (RFC 5321).
//!
//! One connection per message and target: greeting, `LHLO`/`EHLO` (SMTP falls back to
//! `HELO`), `MAIL FROM` (with `BODY=8BITMIME` / `SMTPUTF8` when the message needs them and the
//! server offers them), one `RCPT TO` per recipient, `DATA` with the dot-stuffed message (or
//! `BDAT LAST` for a BINARYMIME body, when the server offers CHUNKING), `QUIT`.
//!
//! Replies map back per recipient: a refused `RCPT` is that recipient's reply; after the
//! data, LMTP gives one reply per accepted recipient, in `RCPT` order, and SMTP one reply for
//! all of them. Anything that goes wrong with the server as a whole (cannot connect, bad
//! greeting, timeout, connection lost) is a temporary failure (`451 4.4.1` / `4.4.2`) for
//! every recipient still open, so the provider keeps the message. A connection lost after
//! the data was sent may mean the server delivered: the retry can then duplicate, never lose.
//!
//! Addresses: `unix:/path` or `/path` is a unix socket; anything else is `host:port`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::proto::inbound::Incoming;
use crate::proto::reply::{EnhancedStatus, Reply};
use crate::proto::stuff;
use crate::types::{BodyType, Mailbox};

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// A unix-domain socket.
    Unix(PathBuf),
    /// `host:port`, resolved at each connect.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:/path`, `/path` or `host:port`.
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:").or(s.starts_with('/').then_some(s)) {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: a unix socket needs an absolute path"));
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Ok(Endpoint::Tcp(s.to_string()))
            }
            _ => Err(format!("{s:?} is not host:port, unix:/path or /path")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => f.write_str(a),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

/// Delivers `message`, preceded by `head`, to `rcpts`; one reply per recipient, in order.
pub async fn deliver(
    ep: &Endpoint,
    lmtp: bool,
    hostname: &str,
    message: &Incoming,
    rcpts: &[&Mailbox],
    head: &str,
    timeout: Duration,
) -> Vec<Reply> {
    let kind = if lmtp { "LMTP" } else { "SMTP" };
    let mut replies: Vec<Option<Reply>> = vec![None; rcpts.len()];
    let talk = conversation(ep, lmtp, hostname, message, rcpts, head, &mut replies);
    let failure = match tokio::time::timeout(timeout, talk).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            tracing::warn!(server = %ep, error = %e, "{kind} delivery failed");
            Some(Reply::with_status(
                451,
                (4, 4, 1),
                format!("Local {kind} server unavailable: {e}"),
            ))
        }
        Err(_) => {
            tracing::warn!(server = %ep, ?timeout, "{kind} delivery timed out");
            Some(Reply::with_status(
                451,
                (4, 4, 2),
                format!("Local {kind} server timed out"),
            ))
        }
    };
    replies
        .into_iter()
        .map(|r| match (r, &failure) {
            (Some(r), _) => r,
            (None, Some(f)) => f.clone(),
            (None, None) => Reply::with_status(451, (4, 3, 0), format!("No {kind} reply")),
        })
        .collect()
}

/// The conversation; fills `replies` as answers arrive. An `Err` leaves the rest empty.
async fn conversation(
    ep: &Endpoint,
    lmtp: bool,
    hostname: &str,
    message: &Incoming,
    rcpts: &[&Mailbox],
    head: &str,
    replies: &mut [Option<Reply>],
) -> std::io::Result<()> {
    let stream: Box<dyn Io> = match ep {
        Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
        Endpoint::Tcp(a) => Box::new(tokio::net::TcpStream::connect(a.as_str()).await?),
    };
    let mut c = Client {
        io: BufReader::new(stream),
    };
    let greeting = c.reply().await?;
    if greeting.code != 220 {
        return Err(unexpected("greeting", &greeting));
    }
    let hello = if lmtp { "LHLO" } else { "EHLO" };
    let mut ext = c.command(&format!("{hello} {hostname}")).await?;
    if !lmtp && ext.code != 250 {
        ext = c.command(&format!("HELO {hostname}")).await?;
    }
    if ext.code != 250 {
        return Err(unexpected(hello, &ext));
    }
    let offers = |name: &str| {
        ext.lines.iter().skip(1).any(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(name))
        })
    };
    let env = &message.envelope;
    let binary = env.body == BodyType::BinaryMime;
    if binary && !(offers("CHUNKING") && offers("BINARYMIME")) {
        let r = Reply::with_status(554, (5, 6, 3), "Local server cannot take a binary body");
        replies.iter_mut().for_each(|s| *s = Some(r.clone()));
        return c.quit().await;
    }
    let mut mail = format!(
        "MAIL FROM:<{}>",
        env.sender
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    match env.body {
        BodyType::EightBitMime if offers("8BITMIME") => mail.push_str(" BODY=8BITMIME"),
        BodyType::BinaryMime => mail.push_str(" BODY=BINARYMIME"),
        _ => {}
    }
    if env.smtputf8 && offers("SMTPUTF8") {
        mail.push_str(" SMTPUTF8");
    }
    let r = c.command(&mail).await?;
    if r.code != 250 {
        // A sender refused for good is refused for every recipient; anything else is the
        // server's trouble, not the message's.
        if !r.is_permanent() {
            return Err(unexpected("MAIL", &r));
        }
        replies.iter_mut().for_each(|s| *s = Some(r.clone()));
        return c.quit().await;
    }
    let mut accepted = Vec::new();
    for (i, rcpt) in rcpts.iter().enumerate() {
        let r = c.command(&format!("RCPT TO:<{rcpt}>")).await?;
        if r.is_positive() {
            accepted.push(i);
        } else {
            replies[i] = Some(r);
        }
    }
    if accepted.is_empty() {
        return c.quit().await;
    }
    let mut payload = Vec::with_capacity(head.len() + message.body.len() + 64);
    if binary {
        let size = head.len() + message.body.len();
        payload.extend_from_slice(format!("BDAT {size} LAST\r\n").as_bytes());
        payload.extend_from_slice(head.as_bytes());
        payload.extend_from_slice(&message.body);
    } else {
        let r = c.command("DATA").await?;
        if r.code != 354 {
            for &i in &accepted {
                replies[i] = Some(r.clone());
            }
            return c.quit().await;
        }
        let mut s = stuff::DotStuffer::new();
        s.push(head.as_bytes(), &mut payload);
        s.push(&message.body, &mut payload);
        s.finish(&mut payload);
    }
    c.io.get_mut().write_all(&payload).await?;
    c.io.get_mut().flush().await?;
    if lmtp {
        for &i in &accepted {
            replies[i] = Some(c.reply().await?);
        }
    } else {
        let r = c.reply().await?;
        for &i in &accepted {
            replies[i] = Some(r.clone());
        }
    }
    c.quit().await
}

fn unexpected(step: &str, r: &Reply) -> std::io::Error {
    std::io::Error::other(format!("{step}: {} {}", r.code, r.lines.join(" / ")))
}

struct Client {
    io: BufReader<Box<dyn Io>>,
}

impl Client {
    async fn command(&mut self, line: &str) -> std::io::Result<Reply> {
        let w = self.io.get_mut();
        w.write_all(line.as_bytes()).await?;
        w.write_all(b"\r\n").await?;
        w.flush().await?;
        self.reply().await
    }

    async fn quit(&mut self) -> std::io::Result<()> {
        // The delivery outcome is already known; a server that drops QUIT changes nothing.
        let _ = self.command("QUIT").await;
        Ok(())
    }

    /// Reads one reply; the enhanced status of the last line (if any) is parsed out.
    async fn reply(&mut self) -> std::io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = (&mut self.io)
                .take(4096)
                .read_until(b'\n', &mut raw)
                .await?;
            if n == 0 || !raw.ends_with(b"\n") {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed or reply line too long",
                ));
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
            let (Some(code), sep) = (code, line.as_bytes().get(3)) else {
                return Err(std::io::Error::other(format!("bad reply line {line:?}")));
            };
            lines.push(line.get(4..).unwrap_or("").to_string());
            if sep != Some(&b'-') {
                if lines.len() > 1000 {
                    return Err(std::io::Error::other("reply too long"));
                }
                return Ok(parse_reply(code, lines));
            }
        }
    }
}

/// Builds a [`Reply`] from a code and text lines, moving a leading enhanced status of the
/// form `c.s.d` (same class as the code) out of the text.
pub fn parse_reply(code: u16, lines: Vec<String>) -> Reply {
    let status = lines.last().and_then(|l| {
        let word = l.split_whitespace().next()?;
        let mut p = word.split('.');
        let class: u8 = p.next()?.parse().ok()?;
        let subject: u16 = p.next()?.parse().ok()?;
        let detail: u16 = p.next()?.parse().ok()?;
        (p.next().is_none() && u16::from(class) == code / 100)
            .then(|| EnhancedStatus::new(class, subject, detail))
    });
    let text: Vec<std::borrow::Cow<'static, str>> = lines
        .into_iter()
        .map(|l| {
            let t = match status {
                Some(s) => {
                    let prefix = s.to_string();
                    l.strip_prefix(&prefix)
                        .map(|r| r.trim_start().to_string())
                        .unwrap_or(l)
                }
                None => l,
            };
            t.into()
        })
        .collect();
    Reply {
        code,
        status,
        lines: text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("unix:/run/dovecot/lmtp"),
            Ok(Endpoint::Unix("/run/dovecot/lmtp".into()))
        );
        assert_eq!(
            Endpoint::parse("/run/lmtp"),
            Ok(Endpoint::Unix("/run/lmtp".into()))
        );
        assert_eq!(
            Endpoint::parse("localhost:24"),
            Ok(Endpoint::Tcp("localhost:24".into()))
        );
        assert_eq!(
            Endpoint::parse("[::1]:24"),
            Ok(Endpoint::Tcp("[::1]:24".into()))
        );
        for bad in ["unix:relative", "localhost", ":25", "host:0", "host:99999"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_keep_their_enhanced_status() {
        let r = parse_reply(550, vec!["5.1.1 <bob@x>: User doesn't exist".into()]);
        assert_eq!(r.status.unwrap().to_string(), "5.1.1");
        assert_eq!(r.lines[0], "<bob@x>: User doesn't exist");
        let r = parse_reply(250, vec!["2.0.0 <a@x> Saved".into()]);
        assert_eq!(r.status.unwrap().to_string(), "2.0.0");
        let plain = parse_reply(452, vec!["Mailbox full".into()]);
        assert_eq!(plain.status, None);
        let mismatch = parse_reply(250, vec!["5.0.0 odd".into()]);
        assert_eq!(mismatch.status, None);
        assert_eq!(mismatch.lines[0], "5.0.0 odd");
    }
}
