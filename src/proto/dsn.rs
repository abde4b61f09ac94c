//! Delivery status notifications: RFC 3464 reports in an RFC 6522 `multipart/report`, with
//! RFC 3461 envelope data (ENVID, ORCPT, RET) and RFC 3834 `Auto-Submitted`.
//!
//! Owns the wire format of the bounces and delay warnings the provider sends (PROTOCOL.md §1:
//! the provider keeps the duty to generate delivery failure notices). [`build`] is pure: the
//! clock (`now_unix`) and the randomness (`boundary_seed`) are arguments, so the output is a
//! function of the input and tests can compare bytes.
//!
//! # Format
//!
//! ```text
//! From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>
//! To: <{original sender}>
//! Subject: Undelivered Mail Returned to Sender | Delayed Mail (still being retried) | ...
//! Date, Message-ID, Auto-Submitted: auto-replied, MIME-Version: 1.0
//! Content-Type: multipart/report; report-type=delivery-status; boundary="..."
//!
//! --boundary   text/plain: what happened, for people
//! --boundary   message/delivery-status: RFC 3464 §2.2 per-message fields, then one
//!              blank-line-separated block of §2.3 per-recipient fields per recipient
//! --boundary   message/rfc822 (RET=FULL) or text/rfc822-headers (RET=HDRS)
//! --boundary--
//! ```
//!
//! # Invariants and decisions
//!
//! - **Never bounce a bounce.** A null reverse-path (`<>`) gets no report: [`build`] returns
//!   `None` for it (RFC 3461 §6.2, RFC 5321 §4.5.5), so the rule cannot be forgotten by a
//!   caller. The report itself must be sent with `MAIL FROM:<>`.
//! - **RET=HDRS is the default** ([`default_ret`]) when the sender gave no RET. RFC 3461 §4.3
//!   leaves the choice to the MTA; returning headers only keeps bounces of big held messages
//!   small and, since bounces go to possibly forged senders, limits backscatter to the
//!   header block. `headers` means everything up to and including the first empty line.
//! - Every line we write ends in CRLF and is under 998 octets (RFC 5322 §2.1.1): fields are
//!   folded at spaces, and a single over-long word is cut (only a diagnostic can have one).
//!   CR, LF and other controls in reported texts become spaces. The embedded original is
//!   copied verbatim (it is canonical CRLF, as stored); if it has a line of 998 octets or
//!   more, the full body is replaced by its headers, and if those have one too, the third part
//!   is left out (RFC 6522 §3 makes it optional).
//! - The boundary is `=_tp_` + 16 hex digits derived from `boundary_seed` + `_` + an attempt
//!   counter. If it occurs anywhere in the original or in our own parts, the next attempt is
//!   taken, deterministically, so the original can never end its own part early.
//! - Non-ASCII addresses or diagnostics switch the status part to
//!   `message/global-delivery-status` with `utf-8` address types (RFC 6533 §3, §6); such a
//!   report needs a customer path that offers SMTPUTF8.
//! - An 8-bit original makes the report 8-bit: send it with `BODY=8BITMIME` ([`is_eight_bit`]).

use std::fmt::Write as _;

use crate::proto::reply::EnhancedStatus;
use crate::proto::trace::rfc5322_date;
use crate::types::{BodyType, Envelope, Mailbox, Recipient, Ret};

/// Longest line we write, CRLF excluded (RFC 5322 §2.1.1 allows 998).
const MAX_LINE: usize = 998;
/// Where fields are folded when they can be (RFC 5322 §2.1.1 "SHOULD" 78).
const FOLD_AT: usize = 78;

/// The RFC 3464 §2.3.3 `Action` of one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DsnAction {
    /// Permanently undeliverable.
    Failed,
    /// Not yet delivered, still being retried.
    Delayed,
    /// Delivered to the recipient (our case: the customer accepted it).
    Delivered,
    /// Relayed to a system that does not offer DSN.
    Relayed,
    /// Delivered and expanded to further recipients.
    Expanded,
}

impl DsnAction {
    fn as_str(self) -> &'static str {
        match self {
            DsnAction::Failed => "failed",
            DsnAction::Delayed => "delayed",
            DsnAction::Delivered => "delivered",
            DsnAction::Relayed => "relayed",
            DsnAction::Expanded => "expanded",
        }
    }
}

/// One recipient of a report.
#[derive(Clone, Debug)]
pub struct ReportRecipient<'a> {
    /// The recipient as we tried it (`Final-Recipient`).
    pub final_recipient: &'a Mailbox,
    /// The ORCPT value, verbatim `addr-type;xtext` (`Original-Recipient`).
    pub original_recipient: Option<&'a str>,
    /// What happened.
    pub action: DsnAction,
    /// The RFC 3463 status.
    pub status: EnhancedStatus,
    /// The remote reply, e.g. the customer's `550 5.1.1 No such user` (`Diagnostic-Code`).
    pub diagnostic: Option<String>,
    /// The remote host that gave it (`Remote-MTA`).
    pub remote_mta: Option<&'a str>,
}

/// Everything a report says.
#[derive(Clone, Debug)]
pub struct Report<'a> {
    /// Our host name (`Reporting-MTA`, `From:`, `Message-ID`).
    pub reporting_mta: &'a str,
    /// When we accepted the message (`Arrival-Date`).
    pub arrival_unix: u64,
    /// Now (`Date:`).
    pub now_unix: u64,
    /// ENVID, verbatim xtext (`Original-Envelope-Id`).
    pub envid: Option<&'a str>,
    /// The reverse-path; the report goes there. `None` (`<>`): no report.
    pub original_sender: Option<&'a Mailbox>,
    /// The recipients reported on.
    pub recipients: Vec<ReportRecipient<'a>>,
    /// How much of the original to return.
    pub ret: Ret,
    /// The stored message, canonical CRLF.
    pub original: &'a [u8],
    /// Caller-provided randomness for the boundary and the Message-ID.
    pub boundary_seed: u64,
}

/// RET as stored, with our default for "absent": headers only (see the module doc).
pub fn default_ret(ret: Option<Ret>) -> Ret {
    ret.unwrap_or(Ret::Hdrs)
}

/// The envelope a report built by [`build`] travels in: from the null sender (RFC 5321 §4.5.5,
/// so it never causes another report) to `sender`, the original message's sender.
pub fn report_envelope(sender: &Mailbox, body: &[u8]) -> Envelope {
    Envelope {
        sender: None,
        body: if is_eight_bit(body) {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        },
        smtputf8: sender.is_utf8(),
        recipients: vec![Recipient {
            mailbox: sender.clone(),
            notify: None,
            orcpt: None,
        }],
        ..Envelope::default()
    }
}

/// True when `report` holds octets above 127 (send it with BODY=8BITMIME).
pub fn is_eight_bit(report: &[u8]) -> bool {
    report.iter().any(|b| *b > 127)
}

/// Builds the complete report message, or `None` when the sender is the null path.
pub fn build(r: &Report<'_>) -> Option<Vec<u8>> {
    let sender = r.original_sender?;
    let global = sender.is_utf8()
        || r.recipients.iter().any(|rc| {
            rc.final_recipient.is_utf8()
                || rc.diagnostic.as_deref().is_some_and(|d| !d.is_ascii())
                || rc.original_recipient.is_some_and(|o| !o.is_ascii())
        });
    let text = human_part(r);
    let status = status_part(r, global);
    let original = original_part(r.ret, r.original);
    let mut attempt = 0u64;
    let boundary = loop {
        let b = boundary(r.boundary_seed, attempt);
        let clash = |part: &[u8]| contains(part, b.as_bytes());
        if !clash(&text) && !clash(&status) && !original.as_ref().is_some_and(|(_, p)| clash(p)) {
            break b;
        }
        attempt += 1;
    };

    let mut out = Vec::with_capacity(2048 + original.as_ref().map_or(0, |(_, p)| p.len()));
    let mta = clean(r.reporting_mta);
    field(
        &mut out,
        "From",
        &format!("Mail Delivery System <MAILER-DAEMON@{mta}>"),
    );
    field(&mut out, "To", &format!("<{}>", clean(&sender.to_string())));
    field(&mut out, "Subject", subject(&r.recipients));
    field(&mut out, "Date", &rfc5322_date(r.now_unix));
    let id = splitmix(r.boundary_seed ^ 0x6d73_6769_645f_7470);
    field(
        &mut out,
        "Message-ID",
        &format!("<dsn.{}.{id:016x}@{mta}>", r.now_unix),
    );
    field(&mut out, "Auto-Submitted", "auto-replied");
    field(&mut out, "MIME-Version", "1.0");
    field(
        &mut out,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    out.extend_from_slice(b"\r\nThis is a MIME-encapsulated message.\r\n");

    let eight = !text.is_ascii();
    let text_type = if eight {
        "text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
    } else {
        "text/plain; charset=us-ascii"
    };
    let status_type = if global {
        "message/global-delivery-status"
    } else {
        "message/delivery-status"
    };
    let mut parts: Vec<(&str, &[u8])> = vec![(text_type, &text), (status_type, &status)];
    if let Some((ctype, bytes)) = &original {
        parts.push((ctype, bytes));
    }
    // RFC 2046 §5.1.1: the CRLF before a delimiter belongs to the delimiter, so each part's
    // content (the original in particular) is exactly what sits between two delimiters.
    for (ctype, body) in parts {
        out.extend_from_slice(b"\r\n--");
        out.extend_from_slice(boundary.as_bytes());
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(ctype.as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    }
    out.extend_from_slice(b"\r\n--");
    out.extend_from_slice(boundary.as_bytes());
    out.extend_from_slice(b"--\r\n");
    Some(out)
}

fn subject(rcpts: &[ReportRecipient<'_>]) -> &'static str {
    if rcpts.iter().any(|r| r.action == DsnAction::Failed) {
        "Undelivered Mail Returned to Sender"
    } else if rcpts.iter().any(|r| r.action == DsnAction::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    }
}

/// The text/plain part.
fn human_part(r: &Report<'_>) -> Vec<u8> {
    let mut t = Vec::new();
    let mta = clean(r.reporting_mta);
    let what = match subject(&r.recipients) {
        "Undelivered Mail Returned to Sender" => {
            "Your message could not be delivered to one or more recipients. It is returned \
             below (or its headers are). This is permanent; do not resend it unchanged."
        }
        "Delayed Mail (still being retried)" => {
            "Your message has not been delivered yet to one or more recipients. Their mail \
             server has not collected it; delivery will be retried. You do not need to \
             resend it."
        }
        _ => "Your message was delivered as requested.",
    };
    line(&mut t, &format!("This is the mail system at {mta}."));
    line(&mut t, "");
    wrap(&mut t, what);
    line(&mut t, "");
    line(
        &mut t,
        &format!("The message arrived on {}.", rfc5322_date(r.arrival_unix)),
    );
    line(&mut t, "");
    for rc in &r.recipients {
        let mut s = format!(
            "<{}>: {} ({})",
            clean(&rc.final_recipient.to_string()),
            rc.action.as_str(),
            rc.status
        );
        if let Some(d) = &rc.diagnostic {
            let _ = write!(s, ": {}", clean(d));
        }
        wrap(&mut t, &s);
    }
    t
}

/// The message/delivery-status part (RFC 3464 §2.1-2.3).
fn status_part(r: &Report<'_>, global: bool) -> Vec<u8> {
    let mut s = Vec::new();
    field(
        &mut s,
        "Reporting-MTA",
        &format!("dns; {}", clean(r.reporting_mta)),
    );
    if let Some(e) = r.envid {
        field(&mut s, "Original-Envelope-Id", &clean(&xtext_decode(e)));
    }
    field(&mut s, "Arrival-Date", &rfc5322_date(r.arrival_unix));
    for rc in &r.recipients {
        s.extend_from_slice(b"\r\n");
        if let Some(o) = rc.original_recipient {
            let (kind, addr) = o.split_once(';').unwrap_or(("rfc822", o));
            field(
                &mut s,
                "Original-Recipient",
                &format!(
                    "{}; {}",
                    clean(kind.trim()),
                    clean(&xtext_decode(addr.trim()))
                ),
            );
        }
        let kind = if global && rc.final_recipient.is_utf8() {
            "utf-8"
        } else {
            "rfc822"
        };
        field(
            &mut s,
            "Final-Recipient",
            &format!("{kind}; {}", clean(&rc.final_recipient.to_string())),
        );
        field(&mut s, "Action", rc.action.as_str());
        field(&mut s, "Status", &rc.status.to_string());
        if let Some(m) = rc.remote_mta {
            field(&mut s, "Remote-MTA", &format!("dns; {}", clean(m)));
        }
        if let Some(d) = &rc.diagnostic {
            field(&mut s, "Diagnostic-Code", &format!("smtp; {}", clean(d)));
        }
    }
    s
}

/// The third part: its content type and bytes, or `None` when nothing fits the line limit.
fn original_part(ret: Ret, original: &[u8]) -> Option<(&'static str, Vec<u8>)> {
    let headers = headers_of(original);
    let fits = |b: &[u8]| b.split(|&c| c == b'\n').all(|l| l.len() <= MAX_LINE + 1);
    match ret {
        Ret::Full if fits(original) => Some(("message/rfc822", original.to_vec())),
        _ if fits(headers) => Some(("text/rfc822-headers", headers.to_vec())),
        _ => None,
    }
}

/// The header block: through the first empty line (its CRLF included), or everything.
fn headers_of(m: &[u8]) -> &[u8] {
    if m.starts_with(b"\r\n") {
        return &m[..2];
    }
    match m.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &m[..i + 4],
        None => m,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The boundary for `attempt` (see the module doc).
fn boundary(seed: u64, attempt: u64) -> String {
    format!("=_tp_{:016x}_{attempt}", splitmix(seed))
}

/// SplitMix64: spreads a caller's seed (which may be a counter) over all 64 bits.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// RFC 3461 §4 xtext decoding; malformed escapes are kept as they are.
fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'+', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Controls (CR and LF included) to spaces, so a value can never start a new line.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn line(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes `name: value`, folded at spaces near 78 columns, every line under 998 octets.
fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    let mut col = name.len() + 1;
    out.extend_from_slice(name.as_bytes());
    out.push(b':');
    for (i, word) in value.split(' ').enumerate() {
        if i > 0 || !word.is_empty() {
            if col + 1 + word.len() > FOLD_AT && col > name.len() + 1 {
                out.extend_from_slice(b"\r\n");
                col = 0;
            }
            out.push(b' ');
            col += 1;
        }
        col = put_word(out, word, col);
    }
    out.extend_from_slice(b"\r\n");
}

/// Wraps a paragraph of text at 76 columns.
fn wrap(out: &mut Vec<u8>, text: &str) {
    let mut col = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if col > 0 && col + 1 + word.len() > 76 {
            out.extend_from_slice(b"\r\n");
            col = 0;
        }
        if col > 0 {
            out.push(b' ');
            col += 1;
        }
        col = put_word(out, word, col);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a word, cutting it (CRLF + space) if it would pass the hard line limit.
fn put_word(out: &mut Vec<u8>, word: &str, mut col: usize) -> usize {
    for c in word.chars() {
        if col + c.len_utf8() > MAX_LINE - 2 {
            out.extend_from_slice(b"\r\n ");
            col = 1;
        }
        let mut buf = [0u8; 4];
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        col += c.len_utf8();
    }
    col
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Mailbox {
        let (local, domain) = s.rsplit_once('@').expect("an address");
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    const ORIGINAL: &[u8] = b"Received: from a by mx.example; Tue, 14 Nov 2023 22:13:20 +0000\r\n\
From: a@s.example\r\nSubject: hello\r\n\r\nbody line\r\n--not-our-boundary\r\n.\r\n";

    /// A parsed report: unfolded top-level headers and the MIME parts as (type, content).
    struct Parsed {
        headers: Vec<(String, String)>,
        boundary: String,
        parts: Vec<(String, Vec<u8>)>,
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// RFC 5322 header block to unfolded fields.
    fn fields(block: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for line in block.split("\r\n").filter(|l| !l.is_empty()) {
            if line.starts_with(' ') || line.starts_with('\t') {
                out.last_mut()
                    .expect("a field to continue")
                    .1
                    .push_str(line);
            } else {
                let (n, v) = line.split_once(':').expect("name: value");
                out.push((n.to_string(), v.trim_start().to_string()));
            }
        }
        out
    }

    fn parse(m: &[u8]) -> Parsed {
        // Wire rules first: CRLF only, every line under 998 octets.
        for (i, &b) in m.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(m[i - 1], b'\r', "bare LF at {i}");
            }
            if b == b'\r' {
                assert_eq!(m.get(i + 1), Some(&b'\n'), "bare CR at {i}");
            }
        }
        assert!(m.split(|&b| b == b'\n').all(|l| l.len() <= MAX_LINE + 1));
        let split = m.windows(4).position(|w| w == b"\r\n\r\n").expect("a body");
        let headers = fields(std::str::from_utf8(&m[..split]).expect("ascii headers"));
        let ctype = header(&headers, "Content-Type").expect("content type");
        assert!(ctype.starts_with("multipart/report; report-type=delivery-status;"));
        let boundary = ctype
            .split("boundary=\"")
            .nth(1)
            .and_then(|b| b.split('"').next())
            .expect("a boundary")
            .to_string();
        let body = &m[split + 2..];
        let delim = format!("\r\n--{boundary}");
        let mut pieces = Vec::new();
        let mut rest = body;
        while let Some(i) = rest
            .windows(delim.len())
            .position(|w| w == delim.as_bytes())
        {
            pieces.push(&rest[..i]);
            rest = &rest[i + delim.len()..];
        }
        assert_eq!(rest, b"--\r\n", "close delimiter last");
        let parts = pieces[1..]
            .iter()
            .map(|p| {
                let p = p.strip_prefix(b"\r\n").expect("CRLF after the delimiter");
                let end = p
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .expect("part headers");
                let h = fields(std::str::from_utf8(&p[..end]).expect("ascii"));
                let t = header(&h, "Content-Type").expect("part type").to_string();
                (t, p[end + 4..].to_vec())
            })
            .collect();
        Parsed {
            headers,
            boundary,
            parts,
        }
    }

    /// The per-message block and the per-recipient blocks of a delivery-status part.
    fn status_blocks(p: &[u8]) -> Vec<Vec<(String, String)>> {
        std::str::from_utf8(p)
            .expect("utf-8")
            .split("\r\n\r\n")
            .map(fields)
            .collect()
    }

    fn report<'a>(sender: &'a Mailbox, rcpts: Vec<ReportRecipient<'a>>, ret: Ret) -> Report<'a> {
        Report {
            reporting_mta: "mx.example",
            arrival_unix: 1_700_000_000,
            now_unix: 1_700_003_600,
            envid: Some("QQ+2B1"),
            original_sender: Some(sender),
            recipients: rcpts,
            ret,
            original: ORIGINAL,
            boundary_seed: 42,
        }
    }

    #[test]
    fn failure_report_parses_back_with_every_field() {
        let sender = mb("a@s.example");
        let (u, v) = (mb("u@example.org"), mb("v@example.org"));
        let rcpts = vec![
            ReportRecipient {
                final_recipient: &u,
                original_recipient: Some("rfc822;U+2Bx@example.org"),
                action: DsnAction::Failed,
                status: EnhancedStatus::new(5, 1, 1),
                diagnostic: Some("550 5.1.1 No such user".into()),
                remote_mta: Some("customer.example"),
            },
            ReportRecipient {
                final_recipient: &v,
                original_recipient: None,
                action: DsnAction::Delayed,
                status: EnhancedStatus::new(4, 2, 0),
                diagnostic: None,
                remote_mta: None,
            },
        ];
        let r = report(&sender, rcpts, Ret::Full);
        let m = build(&r).expect("a report");
        assert_eq!(build(&r), Some(m.clone()), "deterministic");
        let p = parse(&m);
        let h = &p.headers;
        assert_eq!(
            header(h, "From"),
            Some("Mail Delivery System <MAILER-DAEMON@mx.example>")
        );
        assert_eq!(header(h, "To"), Some("<a@s.example>"));
        assert_eq!(
            header(h, "Subject"),
            Some("Undelivered Mail Returned to Sender")
        );
        assert_eq!(header(h, "Date"), Some("Tue, 14 Nov 2023 23:13:20 +0000"));
        assert_eq!(header(h, "Auto-Submitted"), Some("auto-replied"));
        assert_eq!(header(h, "MIME-Version"), Some("1.0"));
        assert!(header(h, "Message-ID").is_some_and(|id| id.ends_with("@mx.example>")));
        assert!(!contains(ORIGINAL, p.boundary.as_bytes()));

        let types: Vec<&str> = p.parts.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            [
                "text/plain; charset=us-ascii",
                "message/delivery-status",
                "message/rfc822"
            ]
        );
        let text = String::from_utf8_lossy(&p.parts[0].1);
        assert!(text.contains("<u@example.org>: failed (5.1.1): 550 5.1.1 No such user"));

        let blocks = status_blocks(&p.parts[1].1);
        assert_eq!(blocks.len(), 3, "{blocks:?}");
        let f = |b: usize, n: &str| header(&blocks[b], n).map(str::to_string);
        assert_eq!(f(0, "Reporting-MTA").as_deref(), Some("dns; mx.example"));
        assert_eq!(f(0, "Original-Envelope-Id").as_deref(), Some("QQ+1"));
        assert_eq!(
            f(0, "Arrival-Date").as_deref(),
            Some("Tue, 14 Nov 2023 22:13:20 +0000")
        );
        assert_eq!(
            f(1, "Original-Recipient").as_deref(),
            Some("rfc822; U+x@example.org")
        );
        assert_eq!(
            f(1, "Final-Recipient").as_deref(),
            Some("rfc822; u@example.org")
        );
        assert_eq!(f(1, "Action").as_deref(), Some("failed"));
        assert_eq!(f(1, "Status").as_deref(), Some("5.1.1"));
        assert_eq!(f(1, "Remote-MTA").as_deref(), Some("dns; customer.example"));
        assert_eq!(
            f(1, "Diagnostic-Code").as_deref(),
            Some("smtp; 550 5.1.1 No such user")
        );
        assert_eq!(f(2, "Action").as_deref(), Some("delayed"));
        assert_eq!(f(2, "Status").as_deref(), Some("4.2.0"));
        assert_eq!(f(2, "Diagnostic-Code"), None);
        // The original is returned byte for byte.
        assert_eq!(p.parts[2].1, ORIGINAL);
    }

    #[test]
    fn hdrs_returns_the_header_block_and_subjects_follow_the_actions() {
        let sender = mb("a@s.example");
        let u = mb("u@example.org");
        let rc = |action| ReportRecipient {
            final_recipient: &u,
            original_recipient: None,
            action,
            status: EnhancedStatus::new(4, 0, 0),
            diagnostic: None,
            remote_mta: None,
        };
        let cases = [
            (DsnAction::Delayed, "Delayed Mail (still being retried)"),
            (DsnAction::Relayed, "Successful Mail Delivery Report"),
            (DsnAction::Failed, "Undelivered Mail Returned to Sender"),
        ];
        for (action, subject) in cases {
            let m = build(&report(&sender, vec![rc(action)], Ret::Hdrs)).expect("a report");
            let p = parse(&m);
            assert_eq!(header(&p.headers, "Subject"), Some(subject));
            assert_eq!(p.parts[2].0, "text/rfc822-headers");
            let end = ORIGINAL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            assert_eq!(p.parts[2].1, &ORIGINAL[..end]);
        }
        assert_eq!(default_ret(None), Ret::Hdrs);
        assert_eq!(default_ret(Some(Ret::Full)), Ret::Full);
    }

    #[test]
    fn a_bounce_is_never_bounced() {
        let sender = mb("a@s.example");
        let mut r = report(&sender, Vec::new(), Ret::Full);
        r.original_sender = None;
        assert_eq!(build(&r), None);
    }

    #[test]
    fn the_original_cannot_break_out_of_its_part() {
        let sender = mb("a@s.example");
        let u = mb("u@example.org");
        for seed in [0u64, 42, u64::MAX] {
            // The original holds the first two boundaries this seed would pick.
            let mut original = b"Subject: trap\r\n\r\n".to_vec();
            for attempt in 0..2 {
                original.extend_from_slice(format!("--{}\r\n", boundary(seed, attempt)).as_bytes());
                original
                    .extend_from_slice(format!("--{}--\r\n", boundary(seed, attempt)).as_bytes());
            }
            let mut r = report(
                &sender,
                vec![ReportRecipient {
                    final_recipient: &u,
                    original_recipient: None,
                    action: DsnAction::Failed,
                    status: EnhancedStatus::new(5, 0, 0),
                    diagnostic: None,
                    remote_mta: None,
                }],
                Ret::Full,
            );
            r.original = &original;
            r.boundary_seed = seed;
            let p = parse(&build(&r).expect("a report"));
            assert_eq!(p.boundary, boundary(seed, 2));
            assert_eq!(p.parts.len(), 3);
            assert_eq!(p.parts[2].1, original);
        }
    }

    #[test]
    fn hostile_and_huge_values_stay_inside_their_lines() {
        let sender = mb("a@s.example");
        let u = mb("u@example.org");
        let long_word = "x".repeat(5000);
        let diagnostic =
            format!("550 5.7.1 evil\r\nBcc: victim@example.net\r\n\r\n{long_word} end");
        let mut original = b"Subject: long\r\n\r\n".to_vec();
        original.extend_from_slice(&[b'y'; 1200]);
        original.extend_from_slice(b"\r\n");
        let mut r = report(
            &sender,
            vec![ReportRecipient {
                final_recipient: &u,
                original_recipient: Some("rfc822;a+0D+0AB:+20c"),
                action: DsnAction::Failed,
                status: EnhancedStatus::new(5, 7, 1),
                diagnostic: Some(diagnostic),
                remote_mta: Some("c.example\r\nX: y"),
            }],
            Ret::Full,
        );
        r.original = &original;
        let m = build(&r).expect("a report");
        let p = parse(&m);
        let text = String::from_utf8_lossy(&m);
        assert!(!text
            .split("\r\n")
            .any(|l| l.starts_with("Bcc:") || l.starts_with("X:")));
        // The 1200-octet body line cannot be returned: headers only.
        assert_eq!(
            p.parts[2],
            (
                "text/rfc822-headers".into(),
                b"Subject: long\r\n\r\n".to_vec()
            )
        );
        let blocks = status_blocks(&p.parts[1].1);
        assert_eq!(blocks.len(), 2, "the diagnostic added no block: {blocks:?}");
        let diag = header(&blocks[1], "Diagnostic-Code").expect("kept");
        assert!(diag.starts_with("smtp; 550 5.7.1 evil  Bcc: victim@example.net"));
        assert!(diag.ends_with(" end"));
    }

    #[test]
    fn utf8_addresses_use_global_delivery_status() {
        let sender = mb("jörg@s.example");
        let u = mb("δ@example.org");
        let r = report(
            &sender,
            vec![ReportRecipient {
                final_recipient: &u,
                original_recipient: None,
                action: DsnAction::Failed,
                status: EnhancedStatus::new(5, 1, 1),
                diagnostic: None,
                remote_mta: None,
            }],
            Ret::Hdrs,
        );
        let m = build(&r).expect("a report");
        assert!(is_eight_bit(&m));
        let text = String::from_utf8(m).expect("utf-8");
        assert!(text.contains("\r\nContent-Type: message/global-delivery-status\r\n"));
        assert!(text.contains("\r\nFinal-Recipient: utf-8; δ@example.org\r\n"));
        assert!(text.contains("\r\nTo: <jörg@s.example>\r\n"));
    }
}
