//! The few replies the relay reads itself, outside the [`Reversed`] machine: the answers to
//! STARTTLS (RFC 3207) and AUTH (RFC 4954) toward a smarthost or MX. Pure parsing, no I/O.
//!
//! [`Reversed`]: crate::proto::reversed::Reversed

use std::borrow::Cow;

use crate::proto::reply::{split_reply_line, split_status, Reply};

/// Longest reply accepted here (these replies are a line or two).
const MAX_REPLY: usize = 16 * 1024;

/// What [`parse`] found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// No complete reply yet.
    More,
    /// A whole reply and the bytes it used.
    Reply(Reply, usize),
    /// Not an RFC 5321 §4.2 reply (or too long): the session must end.
    Malformed,
}

/// Parses one complete, possibly multi-line reply from the front of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut pos = 0;
    let mut reply: Option<Reply> = None;
    loop {
        let Some(nl) = memchr::memchr(b'\n', &buf[pos..]) else {
            return if buf.len() > MAX_REPLY {
                Parsed::Malformed
            } else {
                Parsed::More
            };
        };
        let line = &buf[pos..pos + nl];
        let Some(line) = line.strip_suffix(b"\r") else {
            return Parsed::Malformed;
        };
        pos += nl + 1;
        let Some((code, last, text)) = split_reply_line(line) else {
            return Parsed::Malformed;
        };
        let r = reply.get_or_insert_with(|| Reply {
            code,
            status: None,
            lines: Vec::new(),
        });
        if r.code != code {
            return Parsed::Malformed;
        }
        let (status, rest) = split_status(code, text);
        if r.lines.is_empty() {
            r.status = status;
        }
        let text = if status.is_some() && status == r.status {
            rest
        } else {
            text
        };
        r.lines
            .push(Cow::Owned(String::from_utf8_lossy(text).into_owned()));
        if last {
            return Parsed::Reply(reply.take().expect("set above"), pos);
        }
    }
}

/// One line for logs and reports: `550 5.1.1 No such user`.
pub fn one_line(r: &Reply) -> String {
    let status = r.status.map(|s| format!(" {s}")).unwrap_or_default();
    format!("{}{status} {}", r.code, r.lines.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reply::EnhancedStatus;

    #[test]
    fn single_and_multi_line_replies_at_every_split() {
        let wire = b"250-mx.example\r\n250-STARTTLS\r\n250 2.0.0 PIPELINING\r\nrest";
        for cut in 0..wire.len() {
            if cut < wire.len() - 4 {
                assert_eq!(parse(&wire[..cut]), Parsed::More, "cut {cut}");
            }
        }
        let Parsed::Reply(r, used) = parse(wire) else {
            panic!("no reply")
        };
        assert_eq!(used, wire.len() - 4);
        assert_eq!(r.code, 250);
        assert_eq!(r.lines.len(), 3);
        let Parsed::Reply(r, _) = parse(b"535 5.7.8 Authentication failed\r\n") else {
            panic!()
        };
        assert_eq!(r.status, Some(EnhancedStatus::new(5, 7, 8)));
        assert_eq!(one_line(&r), "535 5.7.8 Authentication failed");
    }

    #[test]
    fn malformed_replies_end_the_session() {
        for bad in [
            &b"2500 x\r\n"[..],
            b"hello\r\n",
            b"250 ok\n",
            b"250-a\r\n251 b\r\n",
            b"650 x\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Parsed::Malformed,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
