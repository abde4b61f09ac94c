//! Command parsing: one framed line (CRLF already stripped) to a typed [`Command`].
//!
//! Owns the grammar of RFC 5321 §4.1 and of the ESMTP parameters we support: SIZE (RFC 1870),
//! BODY (RFC 6152, RFC 3030), SMTPUTF8 (RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461), AUTH=
//! (RFC 4954), BDAT (RFC 3030), ATRN (RFC 2645 §5.2.1) and ETRN (RFC 1985).
//!
//! Invariants of a parsed command:
//! - Mailbox domains are lowercased; local parts are kept as sent (quotes included).
//! - A non-ASCII mailbox is only returned when UTF-8 was allowed: for MAIL by its own SMTPUTF8
//!   parameter, for RCPT by the caller's flag (the transaction's SMTPUTF8).
//! - ATRN domains are [`DomainName`]s with at least two labels.
//!
//! The parser is purely syntactic. Whether a command is allowed *now* (sequencing, advertised
//! extensions, limits) is the state machine's business.
//!
//! Deliberate leniency, as in Postfix: verbs and keywords are case-insensitive, spaces after
//! `FROM:`/`TO:` and between parameters are tolerated, a source route (`<@a,@b:u@d>`) is
//! accepted and dropped, and local parts are not held to the 64-octet limit (VERP and SRS
//! addresses exceed it in the wild). Angle brackets around paths are required.

use std::fmt;

use crate::proto::reply::Reply;
use crate::types::{BodyType, DomainName, Mailbox, Notify, Ret};

/// One parsed SMTP command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `EHLO <domain or address literal>`.
    Ehlo(String),
    /// `HELO <domain or address literal>`.
    Helo(String),
    /// `MAIL FROM:<path> [params]`.
    Mail {
        /// The reverse-path; `None` is the null path `<>`.
        sender: Option<Mailbox>,
        /// The ESMTP parameters.
        params: MailParams,
    },
    /// `RCPT TO:<path> [params]`. A bare `<postmaster>` has an empty `domain`.
    Rcpt {
        /// The forward-path.
        mailbox: Mailbox,
        /// NOTIFY=, if given.
        notify: Option<Notify>,
        /// ORCPT=, verbatim.
        orcpt: Option<String>,
    },
    /// `DATA`.
    Data,
    /// `BDAT <size> [LAST]`.
    Bdat {
        /// Octets in the chunk that follows the command line.
        size: u64,
        /// This is the last chunk of the message.
        last: bool,
    },
    /// `RSET`.
    Rset,
    /// `NOOP [anything]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY <string>`.
    Vrfy(String),
    /// `HELP [topic]`.
    Help,
    /// `STARTTLS`.
    StartTls,
    /// `AUTH <mechanism> [initial-response]`.
    Auth {
        /// The SASL mechanism name, uppercased.
        mechanism: String,
        /// The initial response, verbatim (base64 or `=`).
        initial: Option<String>,
    },
    /// `ATRN [domain *("," domain)]`; empty for a bare ATRN.
    Atrn(Vec<DomainName>),
    /// `ETRN <node>`, verbatim (`@domain`, `#queue` or a domain).
    Etrn(String),
}

/// ESMTP parameters of MAIL FROM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailParams {
    /// SIZE= (RFC 1870), the declared message size.
    pub size: Option<u64>,
    /// BODY= (RFC 6152, RFC 3030).
    pub body: BodyType,
    /// SMTPUTF8 (RFC 6531) was given.
    pub smtputf8: bool,
    /// RET= (RFC 3461).
    pub ret: Option<Ret>,
    /// ENVID= (RFC 3461), verbatim xtext.
    pub envid: Option<String>,
    /// AUTH= (RFC 4954), verbatim xtext or `<>`.
    pub auth: Option<String>,
}

/// Why a line is not a valid command. Each variant maps to exactly one reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// Not a verb we know: `500 5.5.2`.
    UnknownCommand,
    /// A verb of RFC 5321 we deliberately do not implement (EXPN, TURN, ...): `502 5.5.1`.
    NotImplemented,
    /// Wrong arguments for a known verb: `501 5.5.4`.
    Syntax,
    /// The MAIL reverse-path does not parse: `501 5.1.7`.
    BadSender,
    /// The RCPT forward-path does not parse: `501 5.1.3`.
    BadRecipient,
    /// An unknown MAIL/RCPT parameter: `555 5.5.4`.
    UnknownParameter,
    /// A non-ASCII address without SMTPUTF8: `553 5.6.7`.
    Utf8Address,
}

impl ParseError {
    /// The reply that answers this error.
    pub fn reply(self) -> Reply {
        match self {
            ParseError::UnknownCommand => crate::proto::reply::unrecognized(),
            ParseError::NotImplemented => crate::proto::reply::not_implemented(),
            ParseError::Syntax => {
                Reply::with_status(501, (5, 5, 4), "Syntax error in parameters or arguments")
            }
            ParseError::BadSender => {
                Reply::with_status(501, (5, 1, 7), "Bad sender address syntax")
            }
            ParseError::BadRecipient => {
                Reply::with_status(501, (5, 1, 3), "Bad recipient address syntax")
            }
            ParseError::UnknownParameter => Reply::with_status(
                555,
                (5, 5, 4),
                "Parameter not recognized or not implemented",
            ),
            ParseError::Utf8Address => {
                Reply::with_status(553, (5, 6, 7), "Non-ASCII address requires SMTPUTF8")
            }
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ParseError::UnknownCommand => "unrecognized command",
            ParseError::NotImplemented => "command not implemented",
            ParseError::Syntax => "syntax error in arguments",
            ParseError::BadSender => "bad sender address syntax",
            ParseError::BadRecipient => "bad recipient address syntax",
            ParseError::UnknownParameter => "unknown parameter",
            ParseError::Utf8Address => "non-ASCII address without SMTPUTF8",
        })
    }
}

impl std::error::Error for ParseError {}

impl Command {
    /// Parses one command line. `utf8_rcpt` allows a non-ASCII RCPT address (the transaction
    /// was opened with SMTPUTF8); MAIL decides that from its own parameters.
    pub fn parse(line: &[u8], utf8_rcpt: bool) -> Result<Command, ParseError> {
        let (verb, rest) = match line.iter().position(|&b| b == b' ') {
            Some(sp) => (&line[..sp], &line[sp + 1..]),
            None => (line, &line[line.len()..]),
        };
        let verb = Verb::parse(verb)?;
        let Ok(args) = std::str::from_utf8(rest) else {
            return Err(verb.arg_error());
        };
        // Trailing blanks are common from hand-typed sessions and harmless.
        let args = args.trim_end_matches([' ', '\t']);
        match verb {
            Verb::Ehlo => parse_helo_arg(args).map(Command::Ehlo),
            Verb::Helo => parse_helo_arg(args).map(Command::Helo),
            Verb::Mail => parse_mail(args),
            Verb::Rcpt => parse_rcpt(args, utf8_rcpt),
            Verb::Data => no_args(args, Command::Data),
            Verb::Bdat => parse_bdat(args),
            Verb::Rset => no_args(args, Command::Rset),
            Verb::Noop => Ok(Command::Noop),
            Verb::Quit => no_args(args, Command::Quit),
            Verb::Vrfy => required(args).map(|a| Command::Vrfy(a.to_string())),
            Verb::Help => Ok(Command::Help),
            Verb::StartTls => no_args(args, Command::StartTls),
            Verb::Auth => parse_auth(args),
            Verb::Atrn => parse_atrn(args),
            Verb::Etrn => required(args).map(|a| Command::Etrn(a.to_string())),
        }
    }

    /// The verb, uppercase, for logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat { .. } => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Vrfy(_) => "VRFY",
            Command::Help => "HELP",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
            Command::Atrn(_) => "ATRN",
            Command::Etrn(_) => "ETRN",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Ehlo,
    Helo,
    Mail,
    Rcpt,
    Data,
    Bdat,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    Auth,
    Atrn,
    Etrn,
}

impl Verb {
    fn parse(verb: &[u8]) -> Result<Verb, ParseError> {
        const VERBS: [(&[u8], Verb); 15] = [
            (b"EHLO", Verb::Ehlo),
            (b"HELO", Verb::Helo),
            (b"MAIL", Verb::Mail),
            (b"RCPT", Verb::Rcpt),
            (b"DATA", Verb::Data),
            (b"BDAT", Verb::Bdat),
            (b"RSET", Verb::Rset),
            (b"NOOP", Verb::Noop),
            (b"QUIT", Verb::Quit),
            (b"VRFY", Verb::Vrfy),
            (b"HELP", Verb::Help),
            (b"STARTTLS", Verb::StartTls),
            (b"AUTH", Verb::Auth),
            (b"ATRN", Verb::Atrn),
            (b"ETRN", Verb::Etrn),
        ];
        const UNIMPLEMENTED: [&[u8]; 5] = [b"EXPN", b"TURN", b"SEND", b"SOML", b"SAML"];
        if let Some((_, v)) = VERBS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(verb))
        {
            return Ok(*v);
        }
        if UNIMPLEMENTED
            .iter()
            .any(|name| name.eq_ignore_ascii_case(verb))
        {
            return Err(ParseError::NotImplemented);
        }
        Err(ParseError::UnknownCommand)
    }

    fn arg_error(self) -> ParseError {
        match self {
            Verb::Mail => ParseError::BadSender,
            Verb::Rcpt => ParseError::BadRecipient,
            _ => ParseError::Syntax,
        }
    }
}

fn no_args(args: &str, cmd: Command) -> Result<Command, ParseError> {
    if args.is_empty() {
        Ok(cmd)
    } else {
        Err(ParseError::Syntax)
    }
}

fn required(args: &str) -> Result<&str, ParseError> {
    let args = args.trim_start_matches(' ');
    if args.is_empty() {
        Err(ParseError::Syntax)
    } else {
        Ok(args)
    }
}

/// One token of visible characters: a domain, an address literal, or (being liberal, as every
/// MTA is) whatever name the client believes it has. Spaces and controls are refused so that
/// the name can later be written into a `Received:` header safely.
fn parse_helo_arg(args: &str) -> Result<String, ParseError> {
    let arg = required(args)?;
    if arg.chars().all(|c| !c.is_ascii() || c.is_ascii_graphic()) {
        Ok(arg.to_string())
    } else {
        Err(ParseError::Syntax)
    }
}

fn parse_mail(args: &str) -> Result<Command, ParseError> {
    let rest = strip_prefix_ci(args, "FROM:").ok_or(ParseError::Syntax)?;
    let (path, rest) = parse_path(rest.trim_start_matches(' ')).ok_or(ParseError::BadSender)?;
    let mut params = MailParams::default();
    let mut seen = Vec::new();
    for (key, value) in parse_params(rest)? {
        if seen.contains(&key) {
            return Err(ParseError::Syntax);
        }
        seen.push(key.clone());
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => params.size = Some(parse_decimal(v)?),
            ("BODY", Some(v)) => {
                params.body = match v.to_ascii_uppercase().as_str() {
                    "7BIT" => BodyType::SevenBit,
                    "8BITMIME" => BodyType::EightBitMime,
                    "BINARYMIME" => BodyType::BinaryMime,
                    _ => return Err(ParseError::Syntax),
                }
            }
            ("SMTPUTF8", None) => params.smtputf8 = true,
            ("RET", Some(v)) => {
                params.ret = match v.to_ascii_uppercase().as_str() {
                    "FULL" => Some(Ret::Full),
                    "HDRS" => Some(Ret::Hdrs),
                    _ => return Err(ParseError::Syntax),
                }
            }
            // RFC 3461 §4.4: at most 100 characters of xtext.
            ("ENVID", Some(v)) if v.len() <= 100 && is_xtext(v) => {
                params.envid = Some(v.to_string())
            }
            ("AUTH", Some(v)) if v == "<>" || is_xtext(v) => params.auth = Some(v.to_string()),
            ("SIZE" | "BODY" | "SMTPUTF8" | "RET" | "ENVID" | "AUTH", _) => {
                return Err(ParseError::Syntax)
            }
            _ => return Err(ParseError::UnknownParameter),
        }
    }
    let sender = match path {
        Path::Null => None,
        Path::Mailbox(m) if !m.domain.is_empty() => Some(m),
        Path::Mailbox(_) => return Err(ParseError::BadSender),
    };
    if sender.as_ref().is_some_and(Mailbox::is_utf8) && !params.smtputf8 {
        return Err(ParseError::Utf8Address);
    }
    Ok(Command::Mail { sender, params })
}

fn parse_rcpt(args: &str, utf8: bool) -> Result<Command, ParseError> {
    let rest = strip_prefix_ci(args, "TO:").ok_or(ParseError::Syntax)?;
    let (path, rest) = parse_path(rest.trim_start_matches(' ')).ok_or(ParseError::BadRecipient)?;
    let mailbox = match path {
        Path::Mailbox(m) if !m.domain.is_empty() || m.local.eq_ignore_ascii_case("postmaster") => m,
        _ => return Err(ParseError::BadRecipient),
    };
    let (mut notify, mut orcpt) = (None, None);
    for (key, value) in parse_params(rest)? {
        match (key.as_str(), value) {
            ("NOTIFY", Some(v)) if notify.is_none() => notify = Some(parse_notify(v)?),
            ("ORCPT", Some(v)) if orcpt.is_none() && is_orcpt(v) => orcpt = Some(v.to_string()),
            ("NOTIFY" | "ORCPT", _) => return Err(ParseError::Syntax),
            _ => return Err(ParseError::UnknownParameter),
        }
    }
    if mailbox.is_utf8() && !utf8 {
        return Err(ParseError::Utf8Address);
    }
    Ok(Command::Rcpt {
        mailbox,
        notify,
        orcpt,
    })
}

fn parse_bdat(args: &str) -> Result<Command, ParseError> {
    let mut words = args.split(' ');
    let size = parse_decimal(words.next().unwrap_or(""))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(ParseError::Syntax),
    };
    if words.next().is_some() {
        return Err(ParseError::Syntax);
    }
    Ok(Command::Bdat { size, last })
}

fn parse_auth(args: &str) -> Result<Command, ParseError> {
    let mut words = required(args)?.split(' ');
    let mechanism = words.next().unwrap_or("");
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if mechanism.is_empty() || mechanism.len() > 20 || !mechanism.chars().all(valid) {
        return Err(ParseError::Syntax);
    }
    let initial = words.next().map(str::to_string);
    if words.next().is_some() || initial.as_deref() == Some("") {
        return Err(ParseError::Syntax);
    }
    Ok(Command::Auth {
        mechanism: mechanism.to_ascii_uppercase(),
        initial,
    })
}

/// RFC 2645 §5.2.1: `"ATRN" [SP domain *("," domain)]`, no spaces, two labels or more.
fn parse_atrn(args: &str) -> Result<Command, ParseError> {
    if args.is_empty() {
        return Ok(Command::Atrn(Vec::new()));
    }
    args.split(',')
        .map(|d| match DomainName::parse(d) {
            // DomainName accepts a trailing root dot; the ATRN grammar does not.
            Ok(name) if name.label_count() >= 2 && !d.ends_with('.') => Ok(name),
            _ => Err(ParseError::Syntax),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Command::Atrn)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn parse_decimal(s: &str) -> Result<u64, ParseError> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::Syntax);
    }
    s.parse().map_err(|_| ParseError::Syntax)
}

/// `keyword["=" value]` separated by spaces; keywords are returned uppercase.
fn parse_params(s: &str) -> Result<Vec<(String, Option<&str>)>, ParseError> {
    let mut out = Vec::new();
    if !s.is_empty() && !s.starts_with(' ') {
        // Something glued to the closing '>' of the path.
        return Err(ParseError::Syntax);
    }
    for word in s.split(' ').filter(|w| !w.is_empty()) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let key_ok = key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        // esmtp-value is any visible ASCII but '='; SMTPUTF8 widens it to UTF-8 (RFC 6531).
        let value_ok = value.is_none_or(|v| {
            !v.is_empty()
                && v.chars()
                    .all(|c| c != '=' && (!c.is_ascii() || c.is_ascii_graphic()))
        });
        if !key_ok || !value_ok {
            return Err(ParseError::Syntax);
        }
        out.push((key.to_ascii_uppercase(), value));
    }
    Ok(out)
}

fn parse_notify(v: &str) -> Result<Notify, ParseError> {
    let mut notify = Notify::default();
    if v.eq_ignore_ascii_case("NEVER") {
        notify.never = true;
        return Ok(notify);
    }
    for word in v.split(',') {
        match word.to_ascii_uppercase().as_str() {
            "SUCCESS" => notify.success = true,
            "FAILURE" => notify.failure = true,
            "DELAY" => notify.delay = true,
            _ => return Err(ParseError::Syntax),
        }
    }
    Ok(notify)
}

/// RFC 3461 xtext: visible ASCII except `+` and `=`, or `+` and two upper-case hex digits.
fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if i + 2 >= b.len() || !(hex(b[i + 1]) && hex(b[i + 2])) {
                    return false;
                }
                i += 3;
            }
            33..=126 if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    !b.is_empty()
}

/// ORCPT=`addr-type ";" xtext` (RFC 3461 §4.2). UTF-8 is tolerated in the address part
/// because RFC 6533 allows it under SMTPUTF8 and we keep the value verbatim anyway.
fn is_orcpt(v: &str) -> bool {
    match v.split_once(';') {
        Some((kind, addr)) => {
            !kind.is_empty()
                && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !addr.is_empty()
                && addr.len() <= 500
        }
        None => false,
    }
}

enum Path {
    Null,
    Mailbox(Mailbox),
}

/// Parses `<...>` at the start of `s`; returns the path and the text after `>`. `None` for
/// any syntax error. UTF-8 is accepted here; callers decide whether it was allowed.
fn parse_path(s: &str) -> Option<(Path, &str)> {
    let mut s = s.strip_prefix('<')?;
    if s.starts_with('@') {
        // A-d-l source route (RFC 5321 §4.1.2): `@a,@b:`. Obsolete; parsed and dropped.
        let colon = s.find(':')?;
        let route = &s[..colon];
        let valid = route.split(',').all(|hop| {
            hop.strip_prefix('@')
                .is_some_and(|d| d.len() <= 255 && domain_ok(d))
        });
        if !valid {
            return None;
        }
        s = &s[colon + 1..];
    }
    if let Some(rest) = s.strip_prefix('>') {
        return Some((Path::Null, rest));
    }
    let local_end = if s.starts_with('"') {
        quoted_end(s)?
    } else {
        s.find(['@', '>'])?
    };
    let local = &s[..local_end];
    let after_local = &s[local_end..];
    let (domain, rest) = if let Some(d) = after_local.strip_prefix('@') {
        let close = if d.starts_with('[') {
            d.find(']')? + 1
        } else {
            d.find('>')?
        };
        let rest = d[close..].strip_prefix('>')?;
        (&d[..close], rest)
    } else {
        // `<postmaster>`: no domain; only RCPT accepts it.
        (&after_local[..0], after_local.strip_prefix('>')?)
    };
    if !(local.starts_with('"') || dot_string_ok(local)) {
        return None;
    }
    if !domain.is_empty() && !domain_ok(domain) {
        return None;
    }
    let mailbox = Mailbox {
        local: local.to_string(),
        domain: domain.to_lowercase(),
    };
    Some((Path::Mailbox(mailbox), rest))
}

/// Index just past the closing quote of the quoted string at the start of `s`.
fn quoted_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        if c.is_ascii_control() {
            return None;
        }
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            return Some(i + 1);
        }
    }
    None
}

/// RFC 5322 atext plus dots (consecutive and edge dots tolerated: they exist in the wild and
/// are harmless to us). Non-ASCII is accepted as UTF-8 atext (RFC 6531).
fn dot_string_ok(local: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~.";
    !local.is_empty()
        && local
            .chars()
            .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || SPECIALS.contains(c))
}

/// A domain (LDH labels, UTF-8 labels tolerated) or an address literal `[...]`.
fn domain_ok(d: &str) -> bool {
    if d.len() > 255 {
        return false;
    }
    if let Some(inner) = d.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return false;
        };
        return !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'[' | b']' | b'\\'));
    }
    !d.is_empty()
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    fn mail(sender: Option<Mailbox>, params: MailParams) -> Result<Command, ParseError> {
        Ok(Command::Mail { sender, params })
    }

    fn rcpt(mailbox: Mailbox) -> Result<Command, ParseError> {
        Ok(Command::Rcpt {
            mailbox,
            notify: None,
            orcpt: None,
        })
    }

    #[test]
    fn verbs_and_simple_commands() {
        use ParseError::*;
        let cases: Vec<(&str, Result<Command, ParseError>)> = vec![
            (
                "EHLO mx.example.org",
                Ok(Command::Ehlo("mx.example.org".into())),
            ),
            ("ehlo [192.0.2.1]", Ok(Command::Ehlo("[192.0.2.1]".into()))),
            ("HeLo host ", Ok(Command::Helo("host".into()))),
            ("EHLO", Err(Syntax)),
            ("EHLO two words", Err(Syntax)),
            ("DATA", Ok(Command::Data)),
            ("data x", Err(Syntax)),
            ("RSET", Ok(Command::Rset)),
            ("NOOP whatever", Ok(Command::Noop)),
            ("QUIT", Ok(Command::Quit)),
            ("VRFY postmaster", Ok(Command::Vrfy("postmaster".into()))),
            ("VRFY", Err(Syntax)),
            ("HELP", Ok(Command::Help)),
            ("HELP mail", Ok(Command::Help)),
            ("StartTLS", Ok(Command::StartTls)),
            ("STARTTLS now", Err(Syntax)),
            (
                "BDAT 0 LAST",
                Ok(Command::Bdat {
                    size: 0,
                    last: true,
                }),
            ),
            (
                "bdat 1000",
                Ok(Command::Bdat {
                    size: 1000,
                    last: false,
                }),
            ),
            (
                "BDAT 10 last",
                Ok(Command::Bdat {
                    size: 10,
                    last: true,
                }),
            ),
            ("BDAT", Err(Syntax)),
            ("BDAT -1", Err(Syntax)),
            ("BDAT 10 LAST x", Err(Syntax)),
            ("BDAT 99999999999999999999999", Err(Syntax)),
            (
                "AUTH cram-md5",
                Ok(Command::Auth {
                    mechanism: "CRAM-MD5".into(),
                    initial: None,
                }),
            ),
            (
                "AUTH PLAIN AGZvbwBiYXI=",
                Ok(Command::Auth {
                    mechanism: "PLAIN".into(),
                    initial: Some("AGZvbwBiYXI=".into()),
                }),
            ),
            ("AUTH", Err(Syntax)),
            (
                "ETRN @example.org",
                Ok(Command::Etrn("@example.org".into())),
            ),
            ("ETRN", Err(Syntax)),
            ("EXPN staff", Err(NotImplemented)),
            ("TURN", Err(NotImplemented)),
            ("FOO", Err(UnknownCommand)),
            ("", Err(UnknownCommand)),
            ("MAILFROM:<a@b>", Err(UnknownCommand)),
        ];
        for (line, want) in cases {
            assert_eq!(Command::parse(line.as_bytes(), false), want, "{line:?}");
        }
    }

    #[test]
    fn atrn_domain_lists() {
        let d = |s: &str| DomainName::parse(s).unwrap();
        assert_eq!(Command::parse(b"ATRN", false), Ok(Command::Atrn(vec![])));
        assert_eq!(
            Command::parse(b"atrn Example.ORG,foo.example.net", false),
            Ok(Command::Atrn(vec![d("example.org"), d("foo.example.net")]))
        );
        for bad in [
            "ATRN localhost",
            "ATRN a.org, b.org",
            "ATRN a.org,",
            "ATRN ,a.org",
            "ATRN a_b.org",
            "ATRN a.org.",
            "ATRN [192.0.2.1]",
        ] {
            assert_eq!(
                Command::parse(bad.as_bytes(), false),
                Err(ParseError::Syntax),
                "{bad}"
            );
        }
    }

    #[test]
    fn mail_paths_and_parameters() {
        use ParseError::*;
        let p = MailParams::default;
        let cases: Vec<(&str, Result<Command, ParseError>)> = vec![
            (
                "MAIL FROM:<a@Example.ORG>",
                mail(Some(mb("a", "example.org")), p()),
            ),
            ("mail from: <a@b.c>", mail(Some(mb("a", "b.c")), p())),
            ("MAIL FROM:<>", mail(None, p())),
            (
                "MAIL FROM:<@r1.example,@r2.example:User@D.example>",
                mail(Some(mb("User", "d.example")), p()),
            ),
            (
                "MAIL FROM:<\"john doe\"@b.c>",
                mail(Some(mb("\"john doe\"", "b.c")), p()),
            ),
            (
                "MAIL FROM:<\"a>b\\\"c\"@b.c>",
                mail(Some(mb("\"a>b\\\"c\"", "b.c")), p()),
            ),
            (
                "MAIL FROM:<a@[192.0.2.1]>",
                mail(Some(mb("a", "[192.0.2.1]")), p()),
            ),
            (
                "MAIL FROM:<a@[IPv6:2001:db8::1]>",
                mail(Some(mb("a", "[ipv6:2001:db8::1]")), p()),
            ),
            (
                "MAIL FROM:<a@b.c> SIZE=1000 BODY=8bitmime RET=HDRS ENVID=QQ+2B1 AUTH=<>",
                mail(
                    Some(mb("a", "b.c")),
                    MailParams {
                        size: Some(1000),
                        body: BodyType::EightBitMime,
                        ret: Some(Ret::Hdrs),
                        envid: Some("QQ+2B1".into()),
                        auth: Some("<>".into()),
                        ..p()
                    },
                ),
            ),
            (
                "MAIL FROM:<jörg@bücher.example> SMTPUTF8",
                mail(
                    Some(mb("jörg", "bücher.example")),
                    MailParams {
                        smtputf8: true,
                        ..p()
                    },
                ),
            ),
            ("MAIL FROM:<jörg@example.org>", Err(Utf8Address)),
            (
                "MAIL FROM:<a@b.c>  SIZE=10  ",
                mail(
                    Some(mb("a", "b.c")),
                    MailParams {
                        size: Some(10),
                        ..p()
                    },
                ),
            ),
            ("MAIL FROM:<a@b.c> FOO=BAR", Err(UnknownParameter)),
            ("MAIL FROM:<a@b.c> SIZE=abc", Err(Syntax)),
            ("MAIL FROM:<a@b.c> SIZE=1 SIZE=2", Err(Syntax)),
            ("MAIL FROM:<a@b.c> BODY=9BIT", Err(Syntax)),
            ("MAIL FROM:<a@b.c> SMTPUTF8=yes", Err(Syntax)),
            ("MAIL FROM:<a@b.c> ENVID=a=b", Err(Syntax)),
            ("MAIL FROM:<a@b.c>SIZE=1", Err(Syntax)),
            ("MAIL FROM:a@b.c", Err(BadSender)),
            ("MAIL FROM:<a@b.c", Err(BadSender)),
            ("MAIL FROM:<a b@c.d>", Err(BadSender)),
            ("MAIL FROM:<a@-b.c>", Err(BadSender)),
            ("MAIL FROM:<a@b..c>", Err(BadSender)),
            ("MAIL FROM:<@b.c>", Err(BadSender)),
            ("MAIL FROM:<postmaster>", Err(BadSender)),
            ("MAIL FROM:<\"unterminated@b.c>", Err(BadSender)),
            ("MAIL TO:<a@b.c>", Err(Syntax)),
            ("MAIL", Err(Syntax)),
        ];
        for (line, want) in cases {
            assert_eq!(Command::parse(line.as_bytes(), false), want, "{line:?}");
        }
        assert_eq!(
            Command::parse(b"MAIL FROM:<\xff@b.c>", false),
            Err(BadSender)
        );
    }

    #[test]
    fn rcpt_paths_and_parameters() {
        use ParseError::*;
        let cases: Vec<(&str, bool, Result<Command, ParseError>)> = vec![
            (
                "RCPT TO:<u@Example.ORG>",
                false,
                rcpt(mb("u", "example.org")),
            ),
            (
                "rcpt to: <u@example.org>",
                false,
                rcpt(mb("u", "example.org")),
            ),
            ("RCPT TO:<Postmaster>", false, rcpt(mb("Postmaster", ""))),
            ("RCPT TO:<bob>", false, Err(BadRecipient)),
            ("RCPT TO:<>", false, Err(BadRecipient)),
            (
                "RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>",
                false,
                Err(Utf8Address),
            ),
            (
                "RCPT TO:<δοκιμή@Παράδειγμα.δοκιμή>",
                true,
                rcpt(mb("δοκιμή", "παράδειγμα.δοκιμή")),
            ),
            (
                "RCPT TO:<u@e.org> NOTIFY=SUCCESS,failure ORCPT=rfc822;u+40e.org",
                false,
                Ok(Command::Rcpt {
                    mailbox: mb("u", "e.org"),
                    notify: Some(Notify {
                        success: true,
                        failure: true,
                        ..Notify::default()
                    }),
                    orcpt: Some("rfc822;u+40e.org".into()),
                }),
            ),
            (
                "RCPT TO:<u@e.org> NOTIFY=never",
                false,
                Ok(Command::Rcpt {
                    mailbox: mb("u", "e.org"),
                    notify: Some(Notify {
                        never: true,
                        ..Notify::default()
                    }),
                    orcpt: None,
                }),
            ),
            ("RCPT TO:<u@e.org> NOTIFY=NEVER,SUCCESS", false, Err(Syntax)),
            ("RCPT TO:<u@e.org> ORCPT=nosemicolon", false, Err(Syntax)),
            ("RCPT TO:<u@e.org> SIZE=10", false, Err(UnknownParameter)),
            ("RCPT TO:u@e.org", false, Err(BadRecipient)),
            ("RCPT FROM:<u@e.org>", false, Err(Syntax)),
        ];
        for (line, utf8, want) in cases {
            assert_eq!(Command::parse(line.as_bytes(), utf8), want, "{line:?}");
        }
    }

    #[test]
    fn xtext() {
        for good in ["abc", "a+2Bb", "+3D"] {
            assert!(is_xtext(good), "{good}");
        }
        for bad in ["", "a+2", "a+", "a+zz", "a=b", "a b", "a+2b"] {
            assert!(!is_xtext(bad), "{bad}");
        }
    }

    #[test]
    fn every_error_maps_to_its_reply() {
        use ParseError::*;
        let codes: Vec<(ParseError, &str)> = vec![
            (UnknownCommand, "500 5.5.2"),
            (NotImplemented, "502 5.5.1"),
            (Syntax, "501 5.5.4"),
            (BadSender, "501 5.1.7"),
            (BadRecipient, "501 5.1.3"),
            (UnknownParameter, "555 5.5.4"),
            (Utf8Address, "553 5.6.7"),
        ];
        for (e, prefix) in codes {
            assert!(
                e.reply().to_string().starts_with(prefix),
                "{e:?}: {}",
                e.reply()
            );
        }
    }
}
