//! The `Received:` trace field (RFC 5321 §4.4, RFC 5322 §3.6.7) with RFC 3848 / RFC 6531
//! "with" protocol types, built from pure inputs.
//!
//! Shape (each clause on its own folded line, so no line comes near the 998-octet limit of
//! RFC 5322 §2.1.1):
//!
//! ```text
//! Received: from client.example ([192.0.2.1])
//!     (authenticated as acme)             <- only for submitted mail
//!     by mx.example with ESMTPSA id 0123abcd
//!     for <user@example.org>;
//!     Tue, 14 Nov 2023 22:13:20 +0000
//! ```
//!
//! Invariants: the result is 7-bit ASCII with CRLF line endings and no line over 998 octets.
//! Peer-supplied text (the HELO name) is reduced to visible ASCII without comment or
//! field-syntax characters and truncated to 255 octets, so it cannot forge other trace clauses.
//! The `for` clause is written only for exactly one recipient (more would leak the envelope,
//! RFC 5321 §7.2) and dropped if its line would be too long. The date is formatted here in UTC
//! from unix seconds: the clock is the caller's business.

use crate::types::Mailbox;

/// What the session negotiated, for the `with` clause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protocol {
    /// EHLO was used (not HELO).
    pub esmtp: bool,
    /// The session ran over TLS.
    pub tls: bool,
    /// The client authenticated.
    pub auth: bool,
    /// The message was sent with SMTPUTF8.
    pub utf8: bool,
}

impl Protocol {
    /// The registered "with" type: SMTP, `ESMTP[S][A]` (RFC 3848) or `UTF8SMTP[S][A]` (RFC 6531).
    pub fn with_type(self) -> &'static str {
        if !self.esmtp {
            return "SMTP";
        }
        match (self.utf8, self.tls, self.auth) {
            (false, false, false) => "ESMTP",
            (false, false, true) => "ESMTPA",
            (false, true, false) => "ESMTPS",
            (false, true, true) => "ESMTPSA",
            (true, false, false) => "UTF8SMTP",
            (true, false, true) => "UTF8SMTPA",
            (true, true, false) => "UTF8SMTPS",
            (true, true, true) => "UTF8SMTPSA",
        }
    }
}

/// Everything a `Received:` field says.
#[derive(Clone, Copy, Debug)]
pub struct Trace<'a> {
    /// Our host name (the `by` clause).
    pub host: &'a str,
    /// The name the client gave in EHLO/HELO.
    pub helo: &'a str,
    /// The client's IP address, textual (`192.0.2.1` or `2001:db8::1`).
    pub peer_ip: &'a str,
    /// The `with` type, e.g. from [`Protocol::with_type`].
    pub protocol: &'a str,
    /// The recipient, if the message has exactly one.
    pub recipient: Option<&'a Mailbox>,
    /// Our queue / message id.
    pub id: &'a str,
    /// The authenticated account that submitted the message (RFC 4954 §7 recommends
    /// recording it), as a comment after the `from` clause.
    pub account: Option<&'a str>,
    /// When the message was accepted, in unix seconds.
    pub unix_secs: u64,
}

/// Builds the full header field, `Received: ...` through the final CRLF.
pub fn received(t: &Trace<'_>) -> String {
    let ip = clean(t.peer_ip, 64);
    let literal = if ip.contains(':') {
        format!("[IPv6:{ip}]")
    } else {
        format!("[{ip}]")
    };
    let account = t
        .account
        .map(|a| format!("\r\n\t(authenticated as {})", clean(a, 255)))
        .unwrap_or_default();
    let mut out = format!(
        "Received: from {} ({literal}){account}\r\n\tby {} with {} id {}",
        clean(t.helo, 255),
        clean(t.host, 255),
        clean(t.protocol, 32),
        clean(t.id, 128),
    );
    if let Some(rcpt) = t.recipient {
        let addr = rcpt.to_string();
        // Quoted local parts may hold spaces and quotes; those are fine inside <>, but CR/LF,
        // controls and non-ASCII (SMTPUTF8) are not allowed in a 7-bit header.
        if addr.len() <= 900 && addr.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            out.push_str("\r\n\tfor <");
            out.push_str(&addr);
            out.push('>');
        }
    }
    out.push_str(";\r\n\t");
    out.push_str(&rfc5322_date(t.unix_secs));
    out.push_str("\r\n");
    out
}

/// Formats unix seconds as an RFC 5322 date in UTC: `Tue, 14 Nov 2023 22:13:20 +0000`.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
    )
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian. This is
/// Howard Hinnant's `civil_from_days`, restricted to non-negative days.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Visible ASCII minus the characters that would end or nest a trace clause, truncated.
fn clean(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| match c {
            '(' | ')' | ';' | '\\' | '"' | '<' | '>' => '_',
            c if c.is_ascii_graphic() => c,
            _ => '?',
        })
        .take(max)
        .collect();
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let cases = [
            (0, "Thu, 01 Jan 1970 00:00:00 +0000"),
            (1_700_000_000, "Tue, 14 Nov 2023 22:13:20 +0000"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 +0000"),
            (951_868_799, "Tue, 29 Feb 2000 23:59:59 +0000"),
            (4_102_444_800, "Fri, 01 Jan 2100 00:00:00 +0000"),
            (1_709_251_199, "Thu, 29 Feb 2024 23:59:59 +0000"),
        ];
        for (secs, want) in cases {
            assert_eq!(rfc5322_date(secs), want, "{secs}");
        }
    }

    #[test]
    fn with_types() {
        let p = |esmtp, tls, auth, utf8| {
            Protocol {
                esmtp,
                tls,
                auth,
                utf8,
            }
            .with_type()
        };
        assert_eq!(p(false, false, false, false), "SMTP");
        assert_eq!(p(true, false, false, false), "ESMTP");
        assert_eq!(p(true, true, false, false), "ESMTPS");
        assert_eq!(p(true, false, true, false), "ESMTPA");
        assert_eq!(p(true, true, true, false), "ESMTPSA");
        assert_eq!(p(true, true, false, true), "UTF8SMTPS");
        assert_eq!(p(true, true, true, true), "UTF8SMTPSA");
    }

    #[test]
    fn received_field() {
        let rcpt = Mailbox {
            local: "user".into(),
            domain: "example.org".into(),
        };
        let t = Trace {
            host: "mx.example",
            helo: "client.example",
            peer_ip: "192.0.2.1",
            protocol: "ESMTPS",
            recipient: Some(&rcpt),
            id: "0123abcd",
            account: None,
            unix_secs: 1_700_000_000,
        };
        assert_eq!(
            received(&t),
            "Received: from client.example ([192.0.2.1])\r\n\tby mx.example with ESMTPS id \
             0123abcd\r\n\tfor <user@example.org>;\r\n\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
        );
        let v6 = Trace {
            peer_ip: "2001:db8::1",
            recipient: None,
            ..t
        };
        let field = received(&v6);
        assert!(field.starts_with("Received: from client.example ([IPv6:2001:db8::1])\r\n"));
        assert!(received(&v6).contains("id 0123abcd;\r\n\tTue"));
        let submitted = Trace {
            protocol: "ESMTPSA",
            account: Some("acme"),
            ..t
        };
        assert_eq!(
            received(&submitted),
            "Received: from client.example ([192.0.2.1])\r\n\t(authenticated as acme)\r\n\tby \
             mx.example with ESMTPSA id 0123abcd\r\n\tfor <user@example.org>;\r\n\tTue, 14 Nov \
             2023 22:13:20 +0000\r\n"
        );
    }

    #[test]
    fn hostile_inputs_stay_inside_their_clause() {
        let long_local = "x".repeat(2000);
        let rcpt = Mailbox {
            local: long_local,
            domain: "example.org".into(),
        };
        let helo = format!("evil (by forged.example); {}\u{e9}", "h".repeat(2000));
        let t = Trace {
            host: "mx.example",
            helo: &helo,
            peer_ip: "192.0.2.1",
            protocol: "ESMTP",
            recipient: Some(&rcpt),
            id: "id\r\nX-Injected: yes",
            account: Some("acme) (by forged.example"),
            unix_secs: 0,
        };
        let field = received(&t);
        assert!(field.is_ascii());
        assert!(
            !field.contains("for <"),
            "over-long recipient must be dropped"
        );
        assert!(!field.contains("(by forged"));
        assert!(!field.contains("\r\nX-Injected"));
        for line in field.split("\r\n") {
            assert!(line.len() <= 998, "line of {} octets", line.len());
            assert!(!line.contains('\r') && !line.contains('\n'));
        }
    }
}
