//! Newtypes shared by every layer: domain names, mailboxes, message ids and the envelope.
//!
//! Parse, don't validate: a [`DomainName`] is always lowercase LDH (RFC 5321 §4.1.2), so code
//! that holds one never re-checks it. Envelopes are what the spool stores next to a body and what
//! the reversal sends back out, so they carry every ESMTP parameter that must survive the hold
//! (SIZE is recomputed, BODY/SMTPUTF8/RET/ENVID/NOTIFY/ORCPT are kept).

use std::fmt;
use std::net::IpAddr;

/// A DNS domain name as used in SMTP: lowercase, LDH labels, 1..=253 octets.
///
/// Address literals (`[192.0.2.1]`) and internationalised U-labels are not `DomainName`s; callers
/// treat them as "not hosted here".
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

/// Why a string is not a [`DomainName`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainError {
    /// Empty, longer than 253 octets, or a label longer than 63.
    Length,
    /// A character other than letters, digits, hyphen and dot, or a hyphen at a label edge.
    Syntax,
}

impl fmt::Display for DomainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainError::Length => f.write_str("domain name or label too long or empty"),
            DomainError::Syntax => f.write_str("domain name is not letters, digits and hyphens"),
        }
    }
}

impl std::error::Error for DomainError {}

impl DomainName {
    /// Parses and lowercases `s`. One trailing dot (the DNS root) is accepted and dropped.
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() || s.len() > 253 {
            return Err(DomainError::Length);
        }
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(DomainError::Length);
            }
            let bytes = label.as_bytes();
            if !bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            {
                return Err(DomainError::Syntax);
            }
            if bytes[0] == b'-' || bytes[bytes.len() - 1] == b'-' {
                return Err(DomainError::Syntax);
            }
        }
        Ok(DomainName(s.to_ascii_lowercase()))
    }

    /// The name as a lowercase string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Number of dot-separated labels (RFC 2645 §5.2.1 wants at least two in ATRN).
    pub fn label_count(&self) -> usize {
        self.0.split('.').count()
    }

    /// A stable hash used to pick the shard core that owns this domain's queue. FNV-1a, so it
    /// does not change between builds or runs (unlike `DefaultHasher`).
    pub fn shard_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainName({})", self.0)
    }
}

/// A mailbox `local@domain` as written in a path. The local part is kept as sent (it may be a
/// quoted string, or UTF-8 under SMTPUTF8); the domain is kept lowercase but not otherwise
/// validated, because a sender may use an address literal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// The local part, exactly as sent (quotes included).
    pub local: String,
    /// The domain part, lowercased.
    pub domain: String,
}

impl Mailbox {
    /// True when local part or domain holds non-ASCII octets (needs SMTPUTF8 on the wire).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// A message's identity: `[48 bits unix millis][16 bits core][64 bits per-core sequence]`.
/// Ids sort by creation time and are unique across cores and restarts (the sequence is seeded
/// randomly at start).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u128);

impl MessageId {
    /// Builds an id from its parts.
    pub fn new(unix_millis: u64, core: u16, seq: u64) -> Self {
        let t = u128::from(unix_millis & 0xffff_ffff_ffff);
        MessageId((t << 80) | (u128::from(core) << 64) | u128::from(seq))
    }

    /// The core whose journal holds the message.
    pub fn core(self) -> u16 {
        (self.0 >> 64) as u16
    }

    /// Creation time in unix milliseconds.
    pub fn unix_millis(self) -> u64 {
        (self.0 >> 80) as u64
    }

    /// Parses the 32-hex-digit form printed by `Display`.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(MessageId)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// The declared body type (RFC 6152 BODY=, RFC 3030 BINARYMIME).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BodyType {
    /// No BODY parameter, or BODY=7BIT.
    #[default]
    SevenBit,
    /// BODY=8BITMIME.
    EightBitMime,
    /// BODY=BINARYMIME (only with BDAT).
    BinaryMime,
}

/// DSN RET= (RFC 3461 §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// Return the full message in a failure report.
    Full,
    /// Return only the headers.
    Hdrs,
}

/// DSN NOTIFY= flags (RFC 3461 §4.1), as a small bit set. `NEVER` is the empty set with
/// `never` true.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Notify {
    /// NOTIFY=NEVER.
    pub never: bool,
    /// SUCCESS requested.
    pub success: bool,
    /// FAILURE requested.
    pub failure: bool,
    /// DELAY requested.
    pub delay: bool,
}

/// One accepted recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The forward-path mailbox.
    pub mailbox: Mailbox,
    /// NOTIFY=, if given.
    pub notify: Option<Notify>,
    /// ORCPT=, if given, kept verbatim (`addr-type;xtext`).
    pub orcpt: Option<String>,
}

/// The SMTP envelope of one message, as accepted.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Envelope {
    /// MAIL FROM path; `None` is the null reverse-path `<>` (bounces).
    pub sender: Option<Mailbox>,
    /// BODY=.
    pub body: BodyType,
    /// SMTPUTF8 was given on MAIL.
    pub smtputf8: bool,
    /// RET=.
    pub ret: Option<Ret>,
    /// ENVID=, verbatim xtext.
    pub envid: Option<String>,
    /// Accepted recipients in RCPT order.
    pub recipients: Vec<Recipient>,
}

/// An IP network `address/prefix`: `[outbox] allow`, `limits.trusted_networks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `192.168.1.0/24`, `::1/128` or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Network, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Network { addr, prefix })
    }

    /// The loopback networks: the default of `[outbox] allow` and `limits.trusted_networks`.
    pub fn loopback() -> Vec<Network> {
        vec![
            Network::parse("127.0.0.0/8").expect("literal"),
            Network::parse("::1/128").expect("literal"),
        ]
    }

    /// True when `ip` is inside (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(a.to_bits()), u128::from(b.to_bits()), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits(), b.to_bits(), 128),
            _ => return false,
        };
        let shift = bits - u32::from(self.prefix);
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names_are_lowercase_ldh() {
        assert_eq!(
            DomainName::parse("Example.COM.").unwrap().as_str(),
            "example.com"
        );
        assert_eq!(DomainName::parse("a-b.c1").unwrap().label_count(), 2);
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "[1.2.3.4]",
            "ex ample.com",
        ] {
            assert!(DomainName::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(DomainName::parse(&"a".repeat(64)), Err(DomainError::Length));
    }

    #[test]
    fn message_id_round_trips() {
        let id = MessageId::new(1_700_000_000_123, 7, 0xdead_beef);
        assert_eq!(id.core(), 7);
        assert_eq!(id.unix_millis(), 1_700_000_000_123);
        assert_eq!(MessageId::parse(&id.to_string()), Some(id));
        assert!(MessageId::new(2, 0, 0) > MessageId::new(1, 9, u64::MAX));
    }

    #[test]
    fn shard_hash_is_stable() {
        // FNV-1a of "example.com": must never change, it decides which core owns a domain.
        assert_eq!(
            DomainName::parse("example.com").unwrap().shard_hash(),
            0x5768_4663_4e27_14c6
        );
    }
}
