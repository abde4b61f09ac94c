//! SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 2034, RFC 3463).
//!
//! Owns the reply wire format: `code SP text CRLF`, or for several lines `code-text CRLF` on
//! every line but the last. When a reply carries an enhanced status it is repeated on each
//! line, as RFC 2034 §4 requires. RFC 2034 §3 exempts the greeting and the HELO/EHLO replies
//! (and 3xx replies are not covered), so those are built with `status: None`.
//!
//! Invariant: whatever text a reply holds, its encoding is exactly one reply. CR and LF in the
//! text (say, from a queue id or hostname) are replaced by spaces, so a reply can never inject
//! another one.
//!
//! The constructors at the bottom are the replies every machine needs. Texts are short and
//! plain; nothing in the protocol layer depends on them.

use std::borrow::Cow;
use std::fmt;

/// An RFC 3463 enhanced status code `class.subject.detail`, e.g. `5.5.2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedStatus {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    /// The subject, e.g. 5 for "mail delivery protocol status".
    pub subject: u16,
    /// The detail within the subject.
    pub detail: u16,
}

impl EnhancedStatus {
    /// Builds `class.subject.detail`.
    pub const fn new(class: u8, subject: u16, detail: u16) -> Self {
        EnhancedStatus {
            class,
            subject,
            detail,
        }
    }
}

impl fmt::Display for EnhancedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One SMTP reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// The enhanced status, written at the start of every line when present.
    pub status: Option<EnhancedStatus>,
    /// The text lines; an empty list writes the code (and status) alone.
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(
        code: u16,
        status: Option<EnhancedStatus>,
        text: impl Into<Cow<'static, str>>,
    ) -> Self {
        Reply {
            code,
            status,
            lines: vec![text.into()],
        }
    }

    /// A one-line reply with the enhanced status `class.subject.detail`.
    pub fn with_status(
        code: u16,
        (class, subject, detail): (u8, u16, u16),
        text: impl Into<Cow<'static, str>>,
    ) -> Self {
        Reply::new(
            code,
            Some(EnhancedStatus::new(class, subject, detail)),
            text,
        )
    }

    /// True for 2xx and 3xx replies.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// True for 4xx replies: the peer may try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// True for 5xx replies: trying again will not help.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Appends the wire form to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let code = self.code.min(999);
        let digits = [
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ];
        let status = self.status.map(|s| s.to_string());
        let count = self.lines.len().max(1);
        for i in 0..count {
            out.extend_from_slice(&digits);
            out.push(if i + 1 < count { b'-' } else { b' ' });
            let text = self.lines.get(i).map(|l| l.as_ref()).unwrap_or("");
            if let Some(status) = &status {
                out.extend_from_slice(status.as_bytes());
                if !text.is_empty() {
                    out.push(b' ');
                }
            }
            out.extend(
                text.bytes()
                    .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // For logs: the wire form with CRLFs shown as " | ".
        let bytes = self.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        f.write_str(text.trim_end().replace("\r\n", " | ").as_str())
    }
}

/// `220 <host> ESMTP turnpike`: the greeting (no enhanced status, RFC 2034 §3).
pub fn greeting(host: &str) -> Reply {
    Reply::new(220, None, format!("{host} ESMTP turnpike"))
}

/// `250 2.0.0 Ok`.
pub fn ok() -> Reply {
    Reply::with_status(250, (2, 0, 0), "Ok")
}

/// `221 2.0.0 Bye`.
pub fn closing() -> Reply {
    Reply::with_status(221, (2, 0, 0), "Bye")
}

/// `500 5.5.2 Syntax error, command unrecognized`.
pub fn unrecognized() -> Reply {
    Reply::with_status(500, (5, 5, 2), "Syntax error, command unrecognized")
}

/// `502 5.5.1 Command not implemented`.
pub fn not_implemented() -> Reply {
    Reply::with_status(502, (5, 5, 1), "Command not implemented")
}

/// `503 5.5.1 <why>`: bad sequence of commands.
pub fn bad_sequence(why: &'static str) -> Reply {
    Reply::with_status(503, (5, 5, 1), why)
}

/// `421 4.7.0 <host> <why>, closing connection`: the session is ending on our side.
pub fn shutting_down(host: &str, why: &str) -> Reply {
    Reply::with_status(421, (4, 7, 0), format!("{host} {why}, closing connection"))
}

/// `ddd[SP text]` or `ddd-[text]`: the code, whether this is the last line, and the text.
pub fn split_reply_line(line: &[u8]) -> Option<(u16, bool, &[u8])> {
    let digits = line.get(..3)?;
    if !(b'1'..=b'5').contains(&digits[0]) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match line.get(3) {
        None => Some((code, true, &[])),
        Some(b' ') => Some((code, true, &line[4..])),
        Some(b'-') => Some((code, false, &line[4..])),
        Some(_) => None,
    }
}

/// Splits a leading RFC 3463 `class.subject.detail` off `text` when its class matches `code`.
pub fn split_status(code: u16, text: &[u8]) -> (Option<EnhancedStatus>, &[u8]) {
    let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    let word = &text[..end];
    let parsed = std::str::from_utf8(word).ok().and_then(|w| {
        let mut it = w.split('.');
        let (c, s, d) = (it.next()?, it.next()?, it.next()?);
        let ok = |p: &str, max: usize| {
            !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
        };
        if it.next().is_some() || !(ok(c, 1) && ok(s, 3) && ok(d, 3)) {
            return None;
        }
        Some(EnhancedStatus::new(
            c.parse().ok()?,
            s.parse().ok()?,
            d.parse().ok()?,
        ))
    });
    match parsed {
        Some(st) if u16::from(st.class) == code / 100 && matches!(st.class, 2 | 4 | 5) => {
            (Some(st), text.get(end + 1..).unwrap_or(&[]))
        }
        _ => (None, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_line_wire_forms() {
        let cases: Vec<(Reply, &str)> = vec![
            (ok(), "250 2.0.0 Ok\r\n"),
            (greeting("mx.example"), "220 mx.example ESMTP turnpike\r\n"),
            (Reply::new(354, None, "Go ahead"), "354 Go ahead\r\n"),
            (
                Reply {
                    code: 250,
                    status: None,
                    lines: vec!["mx.example".into(), "PIPELINING".into(), "DSN".into()],
                },
                "250-mx.example\r\n250-PIPELINING\r\n250 DSN\r\n",
            ),
            (
                Reply {
                    code: 550,
                    status: Some(EnhancedStatus::new(5, 7, 1)),
                    lines: vec!["Relay".into(), "denied".into()],
                },
                "550-5.7.1 Relay\r\n550 5.7.1 denied\r\n",
            ),
            (
                Reply {
                    code: 250,
                    status: None,
                    lines: vec![],
                },
                "250 \r\n",
            ),
            (
                Reply {
                    code: 250,
                    status: Some(EnhancedStatus::new(2, 0, 0)),
                    lines: vec![],
                },
                "250 2.0.0\r\n",
            ),
        ];
        for (reply, wire) in cases {
            assert_eq!(String::from_utf8(reply.to_bytes()).unwrap(), wire);
        }
    }

    #[test]
    fn text_cannot_inject_a_second_reply() {
        let r = Reply::with_status(250, (2, 0, 0), "queued as x\r\n250 fake");
        assert_eq!(r.to_bytes(), b"250 2.0.0 queued as x  250 fake\r\n");
    }

    #[test]
    fn classes() {
        assert!(ok().is_positive() && !ok().is_transient() && !ok().is_permanent());
        assert!(shutting_down("h", "bye").is_transient());
        assert!(unrecognized().is_permanent());
        assert_eq!(
            bad_sequence("Need MAIL command").to_string(),
            "503 5.5.1 Need MAIL command"
        );
    }
}
