//! The inbound SMTP server state machine: the provider as MX ([`Mode::Mx`]), and the provider's
//! ODMR listener up to the turnaround ([`Mode::Odmr`], RFC 2645 §5). RFC 5321 with PIPELINING
//! (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES
//! (RFC 2034), CHUNKING (RFC 3030), STARTTLS (RFC 3207) and DSN parameters (RFC 3461).
//!
//! Owns the session: which command is allowed when, every reply, the limits, and the hand-off
//! of accepted messages. It is sans-IO: bytes in, reply bytes and [`Action`]s out, no clock.
//!
//! # Contract
//!
//! The driver owns the socket and the read buffer, and loops:
//!
//! 1. Write [`Inbound::output`] to the peer, then clear it (it starts with the 220 greeting).
//! 2. Read, append to its buffer, call [`Inbound::handle_input`] and drop the number of bytes
//!    it returns from the front of the buffer. Unconsumed bytes are an incomplete line, or
//!    input that arrived after a point where the machine must wait for the driver; present
//!    them again (with more appended) on the next call.
//! 3. Call [`Inbound::poll_action`] until it returns `None` and obey each action:
//!    - [`Action::StoreChunk`] (only with [`InboundConfig::body_chunk`] set): append these body
//!      bytes to the message being received; the first chunk of a transaction starts it. If
//!      they cannot be stored, call [`Inbound::abandon_body`] with the reply to give at its
//!      end. Hand the buffer back with [`Inbound::recycle`] once written (optional).
//!    - [`Action::DiscardChunks`]: the message whose chunks were handed out will not be
//!      delivered (refused as it came in, reset, or the session is closing): drop them.
//!    - [`Action::Deliver`]: store the message durably (the chunks handed out so far, then
//!      [`Incoming::body`]), then call [`Inbound::stored`] with the queue id or an error reply.
//!      Until then the machine consumes no input, so nothing the client pipelined after the
//!      message is answered before the message is (RFC 5321 §4.1.4: a 250 after DATA means we
//!      own the message).
//!    - [`Action::StartTls`]: flush the output (it ends with the 220), **discard every
//!      buffered plaintext byte** (RFC 3207 §6, the STARTTLS injection class), run the handshake,
//!      then call [`Inbound::tls_started`].
//!    - [`Action::Close`]: flush the output and close the connection.
//! 4. On an idle timeout, call [`Inbound::timed_out`] (or [`Inbound::data_too_slow`] when
//!    [`Inbound::is_reading_body`] and the transfer missed its minimum rate) and go to step 1;
//!    it queues a Close.
//!
//! In ODMR mode ([`Inbound::new_odmr`]) the driver also:
//!
//! - passes a [`SessionContext`] (random bytes, Unix time) at construction and calls
//!   [`Inbound::set_context`] after [`Inbound::tls_started`] with the RFC 9266 exporter bytes
//!   and the client certificate identity;
//! - calls [`Inbound::handle_odmr_input`] (it takes the [`Credentials`] AUTH verifies against)
//!   instead of `handle_input`;
//! - after the actions, calls [`Inbound::poll_event`]. At most one [`OdmrEvent`] is pending
//!   and, like an action, it stops the machine until answered:
//!   - [`OdmrEvent::AuthSucceeded`] / [`OdmrEvent::AuthFailed`]: the credentials have been
//!     checked but nothing is answered yet. Ask the per-core [`crate::proto::throttle`]
//!     (`check` with the account), then record the success or failure there, sleep the
//!     [`Delay`](crate::proto::throttle::Verdict::Delay) if any, and call
//!     [`Inbound::auth_checked`] with the refusal (or `None`). So a locked account gets
//!     `454` even with the right password, and guessing learns nothing.
//!   - [`OdmrEvent::Atrn`]: check authorization, scan the queue, take the domain leases, then
//!     call [`Inbound::atrn_decided`].
//!   - [`OdmrEvent::Reverse`]: flush the output (it ends with the `250`), then run the
//!     reversed session on the same connection, TLS kept. Read the customer's greeting only
//!     after that flush; the inbound machine is done.
//!
//! After any action, go back to step 1 and then call `handle_input` with the bytes still
//! buffered, even if no new ones arrived.
//!
//! # States
//!
//! Named for what they await. `Reading*`, `AwaitStored` and `AwaitTls` consume no commands.
//!
//! ```text
//!                    +-----------+   EHLO/HELO    +-----------+
//! 220 greeting ----> | AwaitHelo | -------------> | AwaitMail | <--------------------------+
//!                    +-----------+                +-----------+                            |
//!                       ^     |                     |   ^   | MAIL                         |
//!        tls_started()  |     | STARTTLS (from      |   |   v                              |
//!                       |     v  AwaitMail too)     |   |  +-----------+  RCPT (loops)     |
//!                    +----------+                   |   |  | AwaitRcpt | -----+            |
//!                    | AwaitTls | <-----------------+   |  +-----------+ <----+            |
//!                    +----------+     RSET, EHLO, HELO  |    | DATA    | BDAT    ^         |
//!                                     -----------------+    v         v         | not LAST|
//!                                                  ReadingData    ReadingBdat --+          |
//!                                                       | CRLF.CRLF      | LAST chunk      |
//!                                                       v                v                 |
//!                                                    refused? --- yes --> 5xx reply -------+
//!                                                       | no                               |
//!                                                       v                                  |
//!                                                  AwaitStored --- stored() ---------------+
//!
//! any state --- QUIT, error or progress limit, sync violation, timed_out() ---> Closed
//! ```
//!
//! In ODMR and submission mode the mail states above are reached only once authenticated
//! (MAIL, RCPT, DATA and BDAT are `530 5.7.0` before); a stored message returns to AwaitMail,
//! from where ODMR's ATRN works as below. RFC 2645's Initial, Authenticated and Reversed
//! states are:
//!
//! ```text
//!  Initial (session.account = None)              Authenticated (account = Some)
//! +-----------+ EHLO  +-----------+  AUTH   +----------------+  334 / line   (loops)
//! | AwaitHelo | ----> | AwaitMail | ------> | Authenticating | <------------+
//! +-----------+       +-----------+         +----------------+ -------------+
//!                       ^  ^    ^  SCRAM v=    |          | success / 535
//!                       |  |    |  (334) +--------------+ |
//!                       |  |    |        | AwaitAuthAck | | empty line
//!                       |  |    |        +--------------+ v
//!                       |  |    +--- auth_checked() -- AwaitAuthCheck  (AuthSucceeded /
//!                       |  |         235, 535, 454                       AuthFailed event)
//!                       |  |  ATRN (authenticated, nothing pipelined)
//!                       |  +--- 450/451/453 ---+
//!                       |                      v
//!                       |               +-----------+ atrn_decided(Accepted): 250
//!                       +-------------- | AwaitAtrn | ------------------------------> Reversed
//!                                       +-----------+  (Reverse event; machine done)
//! ```
//!
//! # Policy decisions (each has a test)
//!
//! - Sequencing errors are `503 5.5.1` (MAIL before EHLO/HELO, nested MAIL, RCPT before MAIL,
//!   DATA/BDAT before RCPT, DATA or RCPT after a BDAT chunk).
//! - Command-line framing errors are `500 5.5.2` (line too long, bare LF, bare CR); an
//!   over-long line is discarded through its LF.
//! - Pipelining sync points (RFC 2920 §3.1, and Postfix 3.9's `smtpd_forbid_unauth_pipelining`
//!   default): input buffered after EHLO, HELO, DATA or STARTTLS, or after any command while
//!   PIPELINING has not been offered to this client, is answered `554 5.5.0` and the
//!   connection is closed. For STARTTLS this is the RFC 3207 injection defence: we refuse to
//!   start TLS at all rather than silently dropping the bytes. QUIT, NOOP and VRFY are not
//!   policed (nothing can be smuggled through them); BDAT is followed by its chunk by design.
//! - Message content (DATA or BDAT) must use CRLF only. A bare LF or CR rejects the message
//!   with `550 5.5.2`, with a distinct text when a smuggled end-of-data was seen; the session
//!   continues because the real end of data was honoured. Then `552 5.3.4` if over the size
//!   limit, then `554 5.4.6` if it has `max_hops` or more `Received:` fields.
//! - Those verdicts are taken as the bytes come in: from the first byte that decides one, the
//!   rest of the message is read and dropped (nothing is buffered, chunks already handed out
//!   are discarded). DATA still answers after its end; a BDAT chunk that decides a refusal is
//!   answered with it at once, and the transaction is over (RFC 3030 §2). BDAT chunks the
//!   client pipelined behind it are read and discarded up to its LAST one, each answered with
//!   the same reply, which counts as one error, not one per chunk.
//! - 8-bit content without BODY=8BITMIME is accepted (liberal, like every MTA); non-ASCII
//!   addresses without SMTPUTF8 are `553 5.6.7`. Text lines over 1000 octets are not refused.
//! - Errors: every 4xx/5xx reply counts. Once more than `max_errors` have been sent, `421
//!   4.7.0` and Close.
//! - Progress: a successful MAIL, RCPT, DATA (354), accepted BDAT chunk or stored message
//!   resets the no-progress counter; every other command line (and every framing error)
//!   increments it. Once it exceeds `max_commands_without_progress`, `421 4.7.0` and Close.
//!   So a client cannot idle with NOOP/RSET/VRFY/HELP/EHLO or garbage forever.
//! - BDAT without CHUNKING (or before EHLO) is refused, but its chunk is still read and
//!   discarded so that the chunk bytes are never parsed as commands. Replies to a BDAT always
//!   come after its chunk has been read (RFC 3030 §2).
//! - AUTH, ATRN and ETRN are `502 5.5.1` in MX mode.
//!
//! ODMR mode (RFC 2645 §5, RFC 4954; codes as in PROTOCOL.md §1):
//!
//! - EHLO lists the MX's extensions (PIPELINING if configured, SIZE, 8BITMIME, SMTPUTF8,
//!   ENHANCEDSTATUSCODES, CHUNKING, DSN), `AUTH` with the configured mechanisms usable now
//!   ([`Mechanism::check`]: PLAIN and LOGIN only under TLS unless `allow_plaintext_auth`;
//!   CRAM-MD5 and SCRAM-SHA-256 also without TLS unless `cram_md5_requires_tls`; -PLUS only
//!   with exporter bytes; EXTERNAL only with a client certificate), `ATRN`, and STARTTLS before TLS.
//! - AUTH before EHLO, after a success, or inside a transaction: `503 5.5.1`. A mechanism not
//!   configured: `504 5.5.4`; configured but needing TLS: `538 5.7.11`. The exchange's own
//!   replies are those of [`crate::proto::sasl`]. `235 2.7.0` only after the throttle agreed.
//! - Every `535` and every account refusal counts as an authentication failure; reaching
//!   `max_auth_failures` sends `421 4.7.0` and closes. A throttle refusal of the address
//!   sends `421 4.7.0` and closes at once.
//! - STARTTLS forgets the login (RFC 3207 §4.2) like everything else learnt before it.
//! - ATRN: input pipelined behind it (in the same input, or presented while the decision is
//!   pending) is `554 5.5.0` and Close, checked first (turnaround injection, PROTOCOL.md
//!   §3.4); inside a transaction `503 5.5.1`; not authenticated `530 5.7.0`; bad syntax
//!   `501 5.5.4`; otherwise the [`AtrnDecision`] picks 250/450/451/453.
//! - HELO, VRFY, ETRN, EXPN: `502 5.5.1`. QUIT, NOOP, RSET, HELP and STARTTLS work as in MX
//!   mode.
//! - Submitted mail (after `235`): MAIL, RCPT, DATA and BDAT as in MX mode, except that the
//!   [`Directory`] is asked [`Directory::check_sender`] at MAIL and
//!   [`Directory::check_submit_rcpt`] at RCPT with the account (sender policy, rate limits,
//!   routing); before `235` all four are `530 5.7.0` (BDAT's chunk is still consumed). The
//!   [`Incoming`] carries the account; the `with` type ends in `A` (RFC 3848).
//!
//! Submission mode ([`Inbound::new_submission`], RFC 6409 / RFC 8314) is ODMR mode without
//! ATRN (`502 5.5.1`, and not in EHLO); HELO and VRFY work as in MX mode.

use std::collections::VecDeque;
use std::mem;

use crate::proto::command::{Command, MailParams};
use crate::proto::data::{ChunkAccumulator, DataOutcome, DataScanner, Progress};
use crate::proto::frame::{Frame, FrameError, Framer};
use crate::proto::reply::{self, Reply};
use crate::proto::sasl::{self, Credentials, Mechanism, SaslContext, SaslExchange, SaslStep};
use crate::proto::throttle::Refusal;
use crate::proto::trace::Protocol;
use crate::types::{BodyType, DomainName, Envelope, Mailbox, Notify, Recipient};

/// Limits and offered extensions of an inbound listener.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// Our host name, in the greeting, EHLO reply and 421s.
    pub hostname: String,
    /// SIZE limit in octets (advertised, checked at MAIL and at end of data).
    pub max_message_size: u64,
    /// Recipients per message; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Longest command line, CRLF included (RFC 5321 minimum: 512).
    pub max_line_length: usize,
    /// Commands tolerated in a row without progress (see the module doc).
    pub max_commands_without_progress: u32,
    /// Error replies tolerated; one more closes the session.
    pub max_errors: u32,
    /// Messages with this many `Received:` fields or more are refused as looping.
    pub max_hops: usize,
    /// Offer STARTTLS (when TLS is not already active).
    pub tls_available: bool,
    /// The connection is already encrypted (implicit TLS).
    pub tls_active: bool,
    /// Offer CHUNKING (BDAT).
    pub chunking: bool,
    /// Offer SMTPUTF8.
    pub smtputf8: bool,
    /// Offer PIPELINING.
    pub pipelining: bool,
    /// Stream bodies: once this many body bytes are buffered they go out as an
    /// [`Action::StoreChunk`], so a session never holds more than about one chunk of a message.
    /// A message that ends within one chunk comes whole in [`Incoming::body`]. `None` (the
    /// default): the whole body comes in [`Incoming::body`].
    pub body_chunk: Option<usize>,
}

impl InboundConfig {
    /// Conservative defaults for `hostname`: 25 MiB messages, 100 recipients (the RFC 5321
    /// §4.5.3.1.8 minimum), 512-octet lines, 20 idle commands, 10 errors, 100 hops, every
    /// extension but STARTTLS offered.
    pub fn new(hostname: impl Into<String>) -> Self {
        InboundConfig {
            hostname: hostname.into(),
            max_message_size: 25 << 20,
            max_recipients: 100,
            max_line_length: 512,
            max_commands_without_progress: 20,
            max_errors: 10,
            max_hops: 100,
            tls_available: false,
            tls_active: false,
            chunking: true,
            smtputf8: true,
            pipelining: true,
            body_chunk: None,
        }
    }
}

/// Sender and recipient policy, consulted for every syntactically valid MAIL and RCPT.
pub trait Directory {
    /// Decides whether `rcpt` is accepted from an unauthenticated client (the MX);
    /// `declared_size` is MAIL's SIZE=, if any.
    fn check_rcpt(&self, rcpt: &Mailbox, declared_size: Option<u64>) -> RcptVerdict;

    /// Authenticated submission (ODMR before ATRN, submission ports): may `account` start a
    /// message from `sender` (`None` is `<>`)? `Err` refuses with that reply (`553 5.7.1` for
    /// an address that is not the account's, `450 4.7.1` over its message rate). The default
    /// refuses: a directory that does not implement submission takes none.
    fn check_sender(&self, account: &str, sender: Option<&Mailbox>) -> Result<(), Reply> {
        let _ = (account, sender);
        Err(Reply::with_status(
            553,
            (5, 7, 1),
            "Submission is not available here",
        ))
    }

    /// Authenticated submission: decides whether `rcpt` is accepted into `account`'s message,
    /// which has `accepted` recipients so far. The default applies [`Directory::check_rcpt`].
    fn check_submit_rcpt(
        &self,
        account: &str,
        rcpt: &Mailbox,
        accepted: usize,
        declared_size: Option<u64>,
    ) -> RcptVerdict {
        let _ = (account, accepted);
        self.check_rcpt(rcpt, declared_size)
    }
}

/// The answer of a [`Directory`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptVerdict {
    /// Accept: the machine answers `250 2.1.5`.
    Accept,
    /// Refuse with this reply (e.g. `550 5.7.1` relay denied, `452 4.2.2` over quota).
    Reject(Reply),
}

/// Something the driver must do; see the module-level contract.
#[must_use]
#[derive(Debug)]
pub enum Action {
    /// The next bytes of the body being received (canonical CRLF, unstuffed, in order, without
    /// our `Received:` field): append them to this transaction's message. The first chunk of a
    /// transaction starts a new message; [`Action::Deliver`] completes it and
    /// [`Action::DiscardChunks`] drops it.
    StoreChunk(Vec<u8>),
    /// Drop the chunks handed out for the current transaction: it ends without a delivery.
    DiscardChunks,
    /// Store this message durably (after the chunks handed out before it), then call
    /// [`Inbound::stored`].
    Deliver(Incoming),
    /// Flush output, discard buffered plaintext, handshake, then call [`Inbound::tls_started`].
    StartTls,
    /// Flush output and close the connection.
    Close,
}

/// An accepted message, waiting to be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The envelope with every accepted recipient.
    pub envelope: Envelope,
    /// Canonical CRLF body, unstuffed, without our `Received:` field; with chunks handed out
    /// ([`Action::StoreChunk`]), only the bytes that follow the last one.
    pub body: Vec<u8>,
    /// The EHLO/HELO name, for the `Received:` field.
    pub helo: String,
    /// The RFC 3848 "with" type for the `Received:` field ("ESMTP", "ESMTPS", ...).
    pub protocol: &'static str,
    /// The authenticated account that submitted it (ODMR and submission mode), for the
    /// `Received:` field and the per-account rate limits.
    pub account: Option<String>,
}

/// Which service the machine provides; chosen by the constructor ([`Inbound::new`] or
/// [`Inbound::new_odmr`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// The MX: takes mail for hosted domains. AUTH, ATRN and ETRN are `502`.
    Mx,
    /// The provider's ODMR listener (RFC 2645 §5): EHLO, AUTH, mail after AUTH, ATRN, QUIT.
    Odmr,
    /// A submission listener (RFC 6409): EHLO, AUTH, then mail from the account's addresses.
    Submission,
}

/// Settings of the ODMR mode that the MX does not have.
#[derive(Clone)]
pub struct OdmrConfig {
    /// The SASL mechanisms offered, in EHLO order (each only when usable in the session:
    /// see [`Mechanism::check`]).
    pub auth_mechanisms: Vec<Mechanism>,
    /// Allow PLAIN, LOGIN and CRAM-MD5 without TLS (RFC 4954 §4 wants this configurable).
    pub allow_plaintext_auth: bool,
    /// Offer CRAM-MD5 only under TLS (it never sends the password, so by default it runs
    /// without TLS too).
    pub cram_md5_requires_tls: bool,
    /// Failed authentications per session; reaching it sends `421 4.7.0` and closes.
    pub max_auth_failures: u32,
    /// A stable server secret from which unknown users' fake SCRAM salts are derived.
    pub auth_secret: [u8; 32],
    /// The iteration count shown to unknown SCRAM users (the store's default).
    pub scram_iterations: u32,
}

impl OdmrConfig {
    /// Every mechanism offered, plaintext ones only under TLS, 3 failures per session,
    /// 4096 SCRAM iterations.
    pub fn new(auth_secret: [u8; 32]) -> Self {
        OdmrConfig {
            auth_mechanisms: Mechanism::ALL.to_vec(),
            allow_plaintext_auth: false,
            cram_md5_requires_tls: false,
            max_auth_failures: 3,
            auth_secret,
            scram_iterations: 4096,
        }
    }
}

impl std::fmt::Debug for OdmrConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OdmrConfig")
            .field("auth_mechanisms", &self.auth_mechanisms)
            .field("allow_plaintext_auth", &self.allow_plaintext_auth)
            .field("cram_md5_requires_tls", &self.cram_md5_requires_tls)
            .field("max_auth_failures", &self.max_auth_failures)
            .field("scram_iterations", &self.scram_iterations)
            .finish_non_exhaustive()
    }
}

/// What the driver knows about the connection that the machine cannot compute: randomness,
/// time and TLS facts. Set at connection start and again after every TLS handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionContext {
    /// Fresh random bytes for this connection. Each AUTH attempt derives its own nonce and
    /// challenge from them (`SHA-256(random || attempt number)`).
    pub random: [u8; 32],
    /// Seconds since the Unix epoch (the CRAM-MD5 challenge).
    pub unix_time: u64,
    /// RFC 9266 `tls-exporter` bytes (TLS 1.3 only); enables SCRAM-SHA-256-PLUS.
    pub tls_exporter: Option<[u8; 32]>,
    /// The verified TLS client certificate's identity; enables EXTERNAL.
    pub peer_identity: Option<String>,
}

/// A decision the ODMR driver must take; see the module-level contract.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OdmrEvent {
    /// Credentials verified. Ask the failed-login throttle, then call
    /// [`Inbound::auth_checked`]; `235` is only sent then.
    AuthSucceeded {
        /// The authenticated account.
        account: String,
    },
    /// Credentials failed (the `535` is not sent yet). Record the failure in the throttle,
    /// wait for its delay, then call [`Inbound::auth_checked`].
    AuthFailed {
        /// The identity the client claimed, if it got that far.
        account: Option<String>,
    },
    /// Decide the ATRN (authorization, queue scan, domain lease; RFC 2645 §5.2.1), then call
    /// [`Inbound::atrn_decided`]. The customer waits at least 10 minutes for the answer.
    Atrn {
        /// The authenticated account.
        account: String,
        /// The requested domains; empty for a bare ATRN (every domain of the account).
        domains: Vec<DomainName>,
    },
    /// The `250` to ATRN is in the output: flush it, then run the reversed session on this
    /// connection (TLS state kept). This machine is done and consumes nothing more.
    Reverse,
}

/// The provider's answer to [`OdmrEvent::Atrn`] (RFC 2645 §5.2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AtrnDecision {
    /// At least one domain has mail and its lease is held: `250 2.0.0`, then reverse.
    Accepted,
    /// These requested domains are not the account's: `450 4.7.1`, nothing is sent.
    NotAuthorized(Vec<DomainName>),
    /// Authorized, nothing queued: `453 4.3.0`.
    NoMail,
    /// Another session holds this domain: `451 4.3.0`.
    Busy(DomainName),
    /// Too many requests: `450 4.7.0`.
    RateLimited,
    /// The mapping or the queue cannot be checked now: `451 4.3.0`.
    Unavailable,
}

impl AtrnDecision {
    /// The reply this decision sends.
    pub fn reply(&self) -> Reply {
        match self {
            AtrnDecision::Accepted => Reply::with_status(250, (2, 0, 0), "OK, turning around"),
            AtrnDecision::NotAuthorized(domains) => {
                let list: Vec<&str> = domains.iter().map(DomainName::as_str).collect();
                let text = format!("Not authorized for {}", list.join(","));
                Reply::with_status(450, (4, 7, 1), text)
            }
            AtrnDecision::NoMail => Reply::with_status(453, (4, 3, 0), "You have no mail"),
            AtrnDecision::Busy(d) => Reply::with_status(
                451,
                (4, 3, 0),
                format!("{d} is being served by another session", d = d.as_str()),
            ),
            AtrnDecision::RateLimited => {
                Reply::with_status(450, (4, 7, 0), "ATRN requested too often, try later")
            }
            AtrnDecision::Unavailable => {
                Reply::with_status(451, (4, 3, 0), "Unable to process ATRN request now")
            }
        }
    }
}

/// What the session learnt from EHLO/HELO, TLS and AUTH; forgotten on STARTTLS (RFC 3207
/// §4.2).
#[derive(Clone, Debug, Default)]
struct Session {
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    /// Set once `235` has been sent (RFC 2645 §5.1: authenticated only then).
    account: Option<String>,
}

/// One mail transaction, from MAIL to the end of the message.
#[derive(Debug)]
struct Transaction {
    envelope: Envelope,
    declared_size: Option<u64>,
    /// The body bytes not yet handed out as a chunk.
    body: Vec<u8>,
    /// Set once a BDAT chunk has been accepted: the transaction is in BDAT mode.
    chunks: Option<ChunkAccumulator>,
    /// The message will be refused whatever follows: its bytes are read and dropped.
    doomed: bool,
    /// The driver could not store a chunk ([`Inbound::abandon_body`]): the reply at the end.
    store_failure: Option<Reply>,
}

impl Transaction {
    fn new(envelope: Envelope, declared_size: Option<u64>) -> Self {
        Transaction {
            envelope,
            declared_size,
            body: Vec::new(),
            chunks: None,
            doomed: false,
            store_failure: None,
        }
    }

    /// How many of `available` input bytes to take in now: no more than fit in the current
    /// chunk (the intake never grows the body by more than its input), at least one.
    fn intake(&self, available: usize, chunk: Option<usize>) -> usize {
        match chunk {
            Some(c) if !self.doomed => available.min(c.saturating_sub(self.body.len()).max(1)),
            _ => available,
        }
    }

    /// The reply refusing this message as it stands, if its fate is already decided.
    fn refusal(&self, outcome: &DataOutcome, max_hops: usize) -> Option<Reply> {
        verdict(outcome, max_hops).or_else(|| self.store_failure.clone())
    }
}

#[derive(Debug)]
enum Phase {
    AwaitHelo,
    AwaitMail,
    AwaitRcpt(Box<Transaction>),
    ReadingData {
        txn: Box<Transaction>,
        scanner: DataScanner,
    },
    /// Reading a BDAT chunk. With `refusal` set the chunk is discarded and the reply sent
    /// after it; `txn` is then only kept to be restored.
    ReadingBdat {
        txn: Option<Box<Transaction>>,
        remaining: u64,
        size: u64,
        last: bool,
        refusal: Option<Reply>,
        /// `refusal` repeats the failure of a BDAT transaction for a chunk the client had
        /// pipelined behind the failed one: not counted as another error.
        repeat: bool,
    },
    AwaitStored,
    AwaitTls,
    /// Reading SASL response lines.
    Authenticating(Box<SaslExchange>),
    /// SCRAM's server-final was sent as a 334; reading the client's empty line.
    AwaitAuthAck {
        account: String,
    },
    /// [`OdmrEvent::AuthSucceeded`] or [`OdmrEvent::AuthFailed`] is out.
    AwaitAuthCheck {
        account: Option<String>,
        success: bool,
    },
    /// [`OdmrEvent::Atrn`] is out. `early` records input presented meanwhile.
    AwaitAtrn {
        early: bool,
    },
    Reversed,
    Closed,
}

/// The inbound SMTP server machine for one connection.
#[derive(Debug)]
pub struct Inbound {
    cfg: InboundConfig,
    /// The service; fixed by the constructor.
    mode: Mode,
    /// The AUTH settings; set in ODMR and submission mode.
    auth: Option<Box<OdmrConfig>>,
    context: SessionContext,
    phase: Phase,
    session: Session,
    framer: Framer,
    out: Vec<u8>,
    actions: VecDeque<Action>,
    /// Error replies sent so far.
    errors: u32,
    /// Command lines since the last progress.
    idle: u32,
    /// The pending ODMR decision, if any.
    event: Option<OdmrEvent>,
    /// AUTH commands seen (each derives its own random bytes).
    auth_attempts: u32,
    /// Failed authentications in this session.
    auth_failures: u32,
    /// [`Action::StoreChunk`] went out for the current transaction.
    streaming: bool,
    /// A chunk buffer the driver gave back, for the next chunk.
    spare: Vec<u8>,
    /// The reply that failed a BDAT transaction before its LAST chunk: later BDAT chunks up to
    /// the LAST one are discarded with it (RFC 3030 §2). Cleared by any other command.
    bdat_failed: Option<Reply>,
}

impl Inbound {
    /// A machine for a new connection; the 220 greeting is already in the output.
    pub fn new(cfg: InboundConfig) -> Self {
        let mut m = Inbound {
            framer: Framer::new(cfg.max_line_length),
            session: Session {
                tls: cfg.tls_active,
                ..Session::default()
            },
            cfg,
            mode: Mode::Mx,
            auth: None,
            context: SessionContext::default(),
            phase: Phase::AwaitHelo,
            out: Vec::with_capacity(512),
            actions: VecDeque::new(),
            errors: 0,
            idle: 0,
            event: None,
            auth_attempts: 0,
            auth_failures: 0,
            streaming: false,
            spare: Vec::new(),
            bdat_failed: None,
        };
        reply::greeting(&m.cfg.hostname).write_to(&mut m.out);
        m
    }

    /// A machine for a new connection of the provider's ODMR listener (RFC 2645 §5), with
    /// the driver's [`SessionContext`]; the 220 greeting is already in the output.
    pub fn new_odmr(cfg: InboundConfig, odmr: OdmrConfig, context: SessionContext) -> Self {
        let mut m = Inbound::new(cfg);
        m.mode = Mode::Odmr;
        m.auth = Some(Box::new(odmr));
        m.context = context;
        m
    }

    /// A machine for a new connection of a submission listener (RFC 6409: port 587 with
    /// STARTTLS, RFC 8314: port 465 with implicit TLS). `auth` holds the same AUTH settings as
    /// the ODMR listener's; the 220 greeting is already in the output.
    pub fn new_submission(cfg: InboundConfig, auth: OdmrConfig, context: SessionContext) -> Self {
        let mut m = Inbound::new_odmr(cfg, auth, context);
        m.mode = Mode::Submission;
        m
    }

    /// The service this machine provides.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Replaces the session context: after [`Inbound::tls_started`] (exporter bytes, client
    /// certificate), or to refresh the time.
    pub fn set_context(&mut self, context: SessionContext) {
        self.context = context;
    }

    /// The authenticated account (ODMR mode, once `235` has been sent).
    pub fn account(&self) -> Option<&str> {
        self.session.account.as_deref()
    }

    /// Consumes input and returns how many bytes were used. Stops early, leaving the rest for
    /// a later call, when it must wait for the driver (an action is pending) or needs more
    /// bytes to complete a line. In ODMR mode, use [`Inbound::handle_odmr_input`]; here every
    /// credential check fails.
    pub fn handle_input(&mut self, input: &[u8], dir: &dyn Directory) -> usize {
        self.handle_odmr_input(input, dir, &NoCredentials)
    }

    /// [`Inbound::handle_input`] with the account store that AUTH verifies against.
    pub fn handle_odmr_input(
        &mut self,
        input: &[u8],
        dir: &dyn Directory,
        creds: &dyn Credentials,
    ) -> usize {
        let mut pos = 0;
        while pos < input.len() && self.actions.is_empty() && self.event.is_none() {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::AwaitStored
                | Phase::AwaitTls
                | Phase::AwaitAuthCheck { .. }
                | Phase::Reversed
                | Phase::Closed => break,
                Phase::AwaitAtrn { early } => {
                    // The customer must wait for the ATRN reply (RFC 2920 §3.1, RFC 2645).
                    *early = true;
                    break;
                }
                Phase::ReadingData { txn, scanner } => {
                    let take = txn.intake(rest.len(), self.cfg.body_chunk);
                    // A chunk goes out only while the message goes on, so that the driver
                    // always meets it with the transaction open ([`Inbound::receiving`]).
                    match scanner.feed(&rest[..take], &mut txn.body) {
                        Progress::NeedMore => {
                            pos += take;
                            self.body_taken();
                        }
                        Progress::Finished { consumed } => {
                            pos += consumed;
                            self.end_of_data();
                        }
                    }
                }
                Phase::ReadingBdat {
                    txn,
                    remaining,
                    refusal,
                    ..
                } => {
                    let mut n = rest
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    if let (Some(txn), None) = (txn, refusal) {
                        n = txn.intake(n, self.cfg.body_chunk);
                        if let Some(chunks) = txn.chunks.as_mut() {
                            chunks.push(&rest[..n], &mut txn.body);
                        }
                    }
                    *remaining -= n as u64;
                    pos += n;
                    let done = *remaining == 0;
                    let last = matches!(self.phase, Phase::ReadingBdat { last: true, .. });
                    if !(done && last) {
                        self.body_taken();
                    }
                    if done {
                        self.end_of_chunk();
                    }
                }
                Phase::AwaitHelo
                | Phase::AwaitMail
                | Phase::AwaitRcpt(_)
                | Phase::Authenticating(_)
                | Phase::AwaitAuthAck { .. } => match self.framer.next_line(rest) {
                    Frame::Incomplete => break,
                    Frame::Skipped { consumed } => pos += consumed,
                    Frame::Invalid { error, consumed } => {
                        pos += consumed;
                        self.frame_error(error);
                    }
                    Frame::Line { line, consumed } => {
                        pos += consumed;
                        if matches!(
                            self.phase,
                            Phase::Authenticating(_) | Phase::AwaitAuthAck { .. }
                        ) {
                            self.auth_line(line, creds);
                        } else {
                            self.command(line, pos < input.len(), dir, creds);
                        }
                    }
                },
            }
            self.settle_chunks();
        }
        pos
    }

    /// The next thing the driver must do, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The message being received, without its body: what [`Action::Deliver`] will carry
    /// (envelope, HELO name, "with" type, account), for a driver that starts storing it at the
    /// first [`Action::StoreChunk`] (whenever one is polled, this is `Some`). `None` outside a
    /// mail transaction.
    pub fn receiving(&self) -> Option<Incoming> {
        let txn = match &self.phase {
            Phase::AwaitRcpt(txn) | Phase::ReadingData { txn, .. } => txn,
            Phase::ReadingBdat { txn: Some(txn), .. } => txn,
            _ => return None,
        };
        Some(self.incoming(txn.envelope.clone(), Vec::new()))
    }

    /// Gives a written [`Action::StoreChunk`] buffer back, so the next chunk needs no new
    /// allocation. Optional.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        let Some(chunk) = self.cfg.body_chunk else {
            return;
        };
        // A buffer far larger than a chunk is not worth keeping for the session's lifetime.
        if buf.capacity() >= chunk && buf.capacity() <= chunk.saturating_mul(2) {
            buf.clear();
            self.spare = buf;
        }
    }

    /// The driver could not store a chunk of the message being received (disk full, I/O
    /// error) and has dropped what it had: the rest of the message is read and dropped, and
    /// its end is answered with `reply` (unless the message is refused for its content).
    /// Ignored outside a message.
    pub fn abandon_body(&mut self, reply: Reply) {
        let txn = match &mut self.phase {
            Phase::AwaitRcpt(txn) | Phase::ReadingData { txn, .. } => txn,
            Phase::ReadingBdat { txn: Some(txn), .. } => txn,
            _ => return,
        };
        txn.store_failure.get_or_insert(reply);
        txn.doomed = true;
        txn.body = Vec::new();
        // The driver dropped the chunks itself.
        self.streaming = false;
    }

    /// The pending ODMR decision, if any. At most one is pending, and the machine consumes no
    /// input until it is answered.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<OdmrEvent> {
        self.event.take()
    }

    /// Answers [`OdmrEvent::AuthSucceeded`] or [`OdmrEvent::AuthFailed`] with the throttle's
    /// refusal, if any. `None`: `235 2.7.0` or `535 5.7.8` as verified. `Some(Account)`: `454
    /// 4.7.0` whatever the credentials were. `Some(Ip)`: `421 4.7.0` and Close. Ignored when
    /// no such event is pending.
    pub fn auth_checked(&mut self, refusal: Option<Refusal>) {
        let Phase::AwaitAuthCheck { account, success } =
            mem::replace(&mut self.phase, Phase::AwaitMail)
        else {
            return;
        };
        match refusal {
            Some(r) if r.closes() => {
                self.reply(r.reply(&self.cfg.hostname));
                return self.close();
            }
            Some(r) => {
                self.auth_failures = self.auth_failures.saturating_add(1);
                self.reply(r.reply(&self.cfg.hostname));
            }
            None if success => {
                self.session.account = account;
                self.idle = 0;
                self.reply(Reply::with_status(
                    235,
                    (2, 7, 0),
                    "Authentication successful",
                ));
            }
            None => {
                self.auth_failures = self.auth_failures.saturating_add(1);
                self.reply(sasl::bad_credentials());
            }
        }
        let max = self.auth.as_ref().map_or(u32::MAX, |o| o.max_auth_failures);
        if self.auth_failures >= max && self.session.account.is_none() {
            let why = "Too many authentication failures";
            reply::shutting_down(&self.cfg.hostname, why).write_to(&mut self.out);
            return self.close();
        }
        self.check_limits();
    }

    /// Answers [`OdmrEvent::Atrn`]. Ignored when no ATRN is pending.
    pub fn atrn_decided(&mut self, decision: AtrnDecision) {
        let Phase::AwaitAtrn { early } = mem::replace(&mut self.phase, Phase::AwaitMail) else {
            return;
        };
        if early {
            return self.atrn_pipelined();
        }
        self.reply(decision.reply());
        if decision == AtrnDecision::Accepted {
            self.phase = Phase::Reversed;
            self.event = Some(OdmrEvent::Reverse);
            return;
        }
        self.check_limits();
    }

    /// True once ATRN was accepted: the connection now belongs to the reversed session.
    pub fn is_reversed(&self) -> bool {
        matches!(self.phase, Phase::Reversed)
    }

    /// Replies to send. The driver writes them and clears the buffer.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Answers the pending [`Action::Deliver`]: `Ok(queue id)` sends `250 2.0.0 Ok queued as
    /// <id>`, `Err(reply)` sends that reply. Ignored when no delivery is pending.
    pub fn stored(&mut self, result: Result<String, Reply>) {
        if !matches!(self.phase, Phase::AwaitStored) {
            return;
        }
        self.phase = Phase::AwaitMail;
        match result {
            Ok(id) => {
                self.idle = 0;
                self.reply(Reply::with_status(
                    250,
                    (2, 0, 0),
                    format!("Ok queued as {id}"),
                ));
            }
            Err(r) => self.reply(r),
        }
        self.check_limits();
    }

    /// The TLS handshake after [`Action::StartTls`] succeeded. Everything learnt before is
    /// forgotten and the client must send EHLO again (RFC 3207 §4.2); no new greeting is sent.
    pub fn tls_started(&mut self) {
        if !matches!(self.phase, Phase::AwaitTls) {
            return;
        }
        self.session = Session {
            tls: true,
            ..Session::default()
        };
        self.framer.reset();
        self.phase = Phase::AwaitHelo;
    }

    /// The idle timer fired: queues `421 4.4.2` and a Close.
    pub fn timed_out(&mut self) {
        if self.is_closed() {
            return;
        }
        let text = format!("{} Idle timeout, closing connection", self.cfg.hostname);
        self.reply(Reply::with_status(421, (4, 4, 2), text));
        self.close();
    }

    /// True while a DATA or BDAT body is being read: the driver holds the transfer to the
    /// minimum data rate then, and each command line to the idle timeout otherwise.
    pub fn is_reading_body(&self) -> bool {
        matches!(
            self.phase,
            Phase::ReadingData { .. } | Phase::ReadingBdat { .. }
        )
    }

    /// A DATA or BDAT transfer fell below the minimum data rate: queues `421 4.4.2` and a
    /// Close; nothing of the message is kept.
    pub fn data_too_slow(&mut self) {
        if self.is_closed() {
            return;
        }
        let text = format!(
            "{} Data transfer too slow, closing connection",
            self.cfg.hostname
        );
        self.reply(Reply::with_status(421, (4, 4, 2), text));
        self.close();
    }

    /// True once the session has ended (a Close action has been queued).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    fn reply(&mut self, r: Reply) {
        if r.code >= 400 {
            self.errors = self.errors.saturating_add(1);
        }
        r.write_to(&mut self.out);
    }

    fn close(&mut self) {
        // A decision still pending (say, a timeout during ATRN) is moot once closed.
        self.event = None;
        self.phase = Phase::Closed;
        self.settle_chunks();
        self.actions.push_back(Action::Close);
    }

    /// True while a mail transaction (MAIL accepted, message not yet handed over) is open.
    fn in_transaction(&self) -> bool {
        matches!(
            self.phase,
            Phase::AwaitRcpt(_)
                | Phase::ReadingData { .. }
                | Phase::ReadingBdat { txn: Some(_), .. }
        )
    }

    /// Chunks went out for a transaction that has ended without a delivery (refused, reset by
    /// RSET/EHLO, closing): tell the driver to drop them, before anything of a next one.
    fn settle_chunks(&mut self) {
        if self.streaming && !self.in_transaction() {
            self.streaming = false;
            self.actions.push_back(Action::DiscardChunks);
        }
    }

    /// After body bytes were taken in: a message whose refusal is already decided keeps
    /// nothing more (and its chunks are dropped); a full chunk goes out to the driver.
    fn body_taken(&mut self) {
        let max_hops = self.cfg.max_hops;
        let chunk = self.cfg.body_chunk;
        let txn = match &mut self.phase {
            Phase::ReadingData { txn, scanner } => {
                if !txn.doomed && txn.refusal(&scanner.outcome(), max_hops).is_some() {
                    txn.doomed = true;
                }
                if txn.doomed {
                    scanner.discard_body();
                }
                txn
            }
            Phase::ReadingBdat {
                txn: Some(txn),
                refusal: None,
                ..
            } => {
                let outcome = txn.chunks.as_ref().map(ChunkAccumulator::outcome);
                if outcome.is_some_and(|o| !txn.doomed && txn.refusal(&o, max_hops).is_some()) {
                    txn.doomed = true;
                }
                if txn.doomed {
                    if let Some(chunks) = txn.chunks.as_mut() {
                        chunks.discard_body();
                    }
                }
                txn
            }
            _ => return,
        };
        if txn.doomed {
            if txn.body.capacity() > 0 {
                // Free the buffer at once: a refused message costs no memory from here on.
                txn.body = Vec::new();
            }
            if mem::take(&mut self.streaming) {
                self.actions.push_back(Action::DiscardChunks);
            }
            return;
        }
        let Some(chunk) = chunk.filter(|c| txn.body.len() >= *c) else {
            return;
        };
        let next = match mem::take(&mut self.spare) {
            b if b.capacity() >= chunk => b,
            _ => Vec::with_capacity(chunk),
        };
        let full = mem::replace(&mut txn.body, next);
        self.streaming = true;
        self.actions.push_back(Action::StoreChunk(full));
    }

    /// Enforces the error and no-progress limits after a reply.
    fn check_limits(&mut self) {
        if self.is_closed() {
            return;
        }
        let why = if self.errors > self.cfg.max_errors {
            "Too many errors"
        } else if self.idle > self.cfg.max_commands_without_progress {
            "Too many commands without progress"
        } else {
            return;
        };
        reply::shutting_down(&self.cfg.hostname, why).write_to(&mut self.out);
        self.close();
    }

    /// The phase a reset transaction returns to.
    fn idle_phase(&self) -> Phase {
        if self.session.helo.is_some() {
            Phase::AwaitMail
        } else {
            Phase::AwaitHelo
        }
    }

    fn frame_error(&mut self, error: FrameError) {
        self.idle = self.idle.saturating_add(1);
        if matches!(
            self.phase,
            Phase::Authenticating(_) | Phase::AwaitAuthAck { .. }
        ) {
            // A broken line ends the exchange; the client starts over with AUTH.
            self.phase = Phase::AwaitMail;
        }
        let text = match error {
            FrameError::TooLong => "Line too long",
            FrameError::BareLf => "Bare LF received, lines must end in CRLF",
            FrameError::BareCr => "Bare CR received, lines must end in CRLF",
        };
        self.reply(Reply::with_status(500, (5, 5, 2), text));
        self.check_limits();
    }

    fn command(
        &mut self,
        line: &[u8],
        more_input: bool,
        dir: &dyn Directory,
        creds: &dyn Credentials,
    ) {
        self.idle = self.idle.saturating_add(1);
        let utf8 = matches!(&self.phase, Phase::AwaitRcpt(t) if t.envelope.smtputf8);
        let cmd = match Command::parse(line, utf8) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.reply(e.reply());
                self.check_limits();
                return;
            }
        };
        let odmr = self.mode == Mode::Odmr;
        // ODMR and submission: mail only from an authenticated account (RFC 6409 §4.3).
        let needs_auth = self.auth.is_some() && self.session.account.is_none();
        if more_input && odmr && matches!(cmd, Command::Atrn(_)) {
            return self.atrn_pipelined();
        }
        if more_input && self.must_end_group(&cmd) {
            let what = if matches!(cmd, Command::StartTls) {
                " after STARTTLS"
            } else {
                ""
            };
            let text = format!("Protocol synchronization error: input pipelined{what}");
            self.reply(Reply::with_status(554, (5, 5, 0), text));
            self.close();
            return;
        }
        if !matches!(cmd, Command::Bdat { .. }) {
            // The chunks a client pipelined behind a failed BDAT end at its next command.
            self.bdat_failed = None;
        }
        match cmd {
            Command::Ehlo(name) => self.ehlo(name, true),
            Command::Helo(_) | Command::Vrfy(_) if odmr => self.reply(reply::not_implemented()),
            Command::Mail { .. } | Command::Rcpt { .. } | Command::Data if needs_auth => {
                self.reply(auth_required())
            }
            Command::Helo(name) => self.ehlo(name, false),
            Command::Mail { sender, params } => self.mail(sender, params, dir),
            Command::Rcpt {
                mailbox,
                notify,
                orcpt,
            } => self.rcpt(mailbox, notify, orcpt, dir),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.phase = self.idle_phase();
                self.reply(reply::ok());
            }
            Command::Noop => self.reply(reply::ok()),
            Command::Quit => {
                self.reply(reply::closing());
                self.close();
            }
            Command::Vrfy(_) => self.reply(Reply::with_status(
                252,
                (2, 5, 0),
                "Cannot verify, but will accept and attempt delivery",
            )),
            Command::Help if odmr => self.reply(Reply::with_status(
                214,
                (2, 0, 0),
                "Commands: EHLO AUTH MAIL RCPT DATA BDAT ATRN STARTTLS RSET NOOP QUIT HELP",
            )),
            Command::Help if self.mode == Mode::Submission => self.reply(Reply::with_status(
                214,
                (2, 0, 0),
                "Commands: EHLO HELO AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            )),
            Command::Help => self.reply(Reply::with_status(
                214,
                (2, 0, 0),
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            )),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } if self.auth.is_some() => {
                self.auth(&mechanism, initial, creds)
            }
            Command::Atrn(domains) if odmr => self.atrn(domains),
            Command::Auth { .. } | Command::Atrn(_) | Command::Etrn(_) => {
                self.reply(reply::not_implemented())
            }
        }
        self.check_limits();
    }

    /// RFC 2920 §3.1: commands after which the client must wait for our reply.
    fn must_end_group(&self, cmd: &Command) -> bool {
        match cmd {
            Command::StartTls | Command::Ehlo(_) | Command::Helo(_) | Command::Data => true,
            Command::Bdat { .. } | Command::Quit | Command::Noop | Command::Vrfy(_) => false,
            _ => !(self.session.esmtp && self.cfg.pipelining),
        }
    }

    fn ehlo(&mut self, name: String, esmtp: bool) {
        // RFC 5321 §4.1.4: EHLO/HELO reset any transaction.
        self.session.helo = Some(name);
        self.session.esmtp = esmtp;
        self.phase = Phase::AwaitMail;
        let host = self.cfg.hostname.clone();
        if !esmtp {
            self.reply(Reply::new(250, None, host));
            return;
        }
        let c = &self.cfg;
        let size = format!("SIZE {}", c.max_message_size);
        let starttls = c.tls_available && !self.session.tls;
        let mut lines: Vec<std::borrow::Cow<'static, str>> = vec![host.into()];
        let offers: [(bool, std::borrow::Cow<'static, str>); 6] = [
            (c.pipelining, "PIPELINING".into()),
            (true, size.into()),
            (true, "8BITMIME".into()),
            (c.smtputf8, "SMTPUTF8".into()),
            (true, "ENHANCEDSTATUSCODES".into()),
            (c.chunking, "CHUNKING".into()),
        ];
        lines.extend(offers.into_iter().filter(|(on, _)| *on).map(|(_, ext)| ext));
        if let Some(auth) = &self.auth {
            let random = [0; 32];
            let ctx = self.sasl_context(auth, &random);
            let mechs: Vec<&str> = auth
                .auth_mechanisms
                .iter()
                .filter(|m| m.check(&ctx).is_ok())
                .map(|m| m.name())
                .collect();
            lines.push("DSN".into());
            if !mechs.is_empty() {
                lines.push(format!("AUTH {}", mechs.join(" ")).into());
            }
            if self.mode == Mode::Odmr {
                lines.push("ATRN".into());
            }
            if starttls {
                lines.push("STARTTLS".into());
            }
        } else {
            if starttls {
                lines.push("STARTTLS".into());
            }
            lines.push("DSN".into());
        }
        self.reply(Reply {
            code: 250,
            status: None,
            lines,
        });
    }

    fn mail(&mut self, sender: Option<Mailbox>, params: MailParams, dir: &dyn Directory) {
        match self.phase {
            Phase::AwaitHelo => return self.reply(reply::bad_sequence("Send EHLO or HELO first")),
            Phase::AwaitRcpt(_) => return self.reply(reply::bad_sequence("Nested MAIL command")),
            _ => {}
        }
        let unoffered = if !self.session.esmtp && params != MailParams::default() {
            Some("ESMTP parameters require EHLO")
        } else if params.smtputf8 && !self.cfg.smtputf8 {
            Some("SMTPUTF8 not offered")
        } else if params.body == BodyType::BinaryMime {
            Some("BODY=BINARYMIME not offered")
        } else {
            None
        };
        if let Some(why) = unoffered {
            return self.reply(Reply::with_status(555, (5, 5, 4), why));
        }
        if params.size.is_some_and(|s| s > self.cfg.max_message_size) {
            return self.reply(too_big());
        }
        if let Some(account) = &self.session.account {
            if let Err(r) = dir.check_sender(account, sender.as_ref()) {
                return self.reply(r);
            }
        }
        let envelope = Envelope {
            sender,
            body: params.body,
            smtputf8: params.smtputf8,
            ret: params.ret,
            envid: params.envid,
            recipients: Vec::new(),
        };
        self.phase = Phase::AwaitRcpt(Box::new(Transaction::new(envelope, params.size)));
        self.idle = 0;
        self.reply(Reply::with_status(250, (2, 1, 0), "Ok"));
    }

    fn rcpt(
        &mut self,
        mut mailbox: Mailbox,
        notify: Option<Notify>,
        orcpt: Option<String>,
        dir: &dyn Directory,
    ) {
        let txn = match &self.phase {
            Phase::AwaitHelo => return self.reply(reply::bad_sequence("Send EHLO or HELO first")),
            Phase::AwaitRcpt(txn) => txn,
            _ => return self.reply(reply::bad_sequence("Need MAIL command")),
        };
        if txn.chunks.is_some() {
            return self.reply(reply::bad_sequence("RCPT not allowed during BDAT transfer"));
        }
        if !self.session.esmtp && (notify.is_some() || orcpt.is_some()) {
            return self.reply(Reply::with_status(
                555,
                (5, 5, 4),
                "ESMTP parameters require EHLO",
            ));
        }
        if txn.envelope.recipients.len() >= self.cfg.max_recipients {
            return self.reply(Reply::with_status(452, (4, 5, 3), "Too many recipients"));
        }
        if mailbox.domain.is_empty() {
            // `<postmaster>` (RFC 5321 §4.1.1.3) is our own postmaster.
            mailbox.domain = self.cfg.hostname.trim_end_matches('.').to_lowercase();
        }
        let verdict = match &self.session.account {
            Some(account) => dir.check_submit_rcpt(
                account,
                &mailbox,
                txn.envelope.recipients.len(),
                txn.declared_size,
            ),
            None => dir.check_rcpt(&mailbox, txn.declared_size),
        };
        match verdict {
            RcptVerdict::Accept => {
                if let Phase::AwaitRcpt(txn) = &mut self.phase {
                    txn.envelope.recipients.push(Recipient {
                        mailbox,
                        notify,
                        orcpt,
                    });
                }
                self.idle = 0;
                self.reply(Reply::with_status(250, (2, 1, 5), "Ok"));
            }
            RcptVerdict::Reject(r) => self.reply(r),
        }
    }

    fn data(&mut self) {
        match &self.phase {
            Phase::AwaitHelo => return self.reply(reply::bad_sequence("Send EHLO or HELO first")),
            Phase::AwaitRcpt(t) if t.chunks.is_some() => {
                return self.reply(reply::bad_sequence("DATA not allowed after BDAT"))
            }
            Phase::AwaitRcpt(t) if !t.envelope.recipients.is_empty() => {}
            Phase::AwaitRcpt(_) => return self.reply(reply::bad_sequence("Need RCPT command")),
            _ => return self.reply(reply::bad_sequence("Need MAIL command")),
        }
        let Phase::AwaitRcpt(txn) = mem::replace(&mut self.phase, Phase::AwaitMail) else {
            unreachable!("checked above");
        };
        let scanner = DataScanner::new(self.cfg.max_message_size);
        self.phase = Phase::ReadingData { txn, scanner };
        self.idle = 0;
        self.reply(Reply::new(354, None, "End data with <CR><LF>.<CR><LF>"));
    }

    fn bdat(&mut self, size: u64, last: bool) {
        if let (Some(failed), Phase::AwaitMail) = (&self.bdat_failed, &self.phase) {
            // RFC 3030 §2: a chunk pipelined behind a failed one; read it and drop it.
            let refusal = Some(failed.clone());
            if last {
                self.bdat_failed = None;
            }
            self.phase = Phase::ReadingBdat {
                txn: None,
                remaining: size,
                size,
                last,
                refusal,
                repeat: true,
            };
            if size == 0 {
                self.end_of_chunk();
            }
            return;
        }
        let refusal = match &self.phase {
            _ if self.auth.is_some() && self.session.account.is_none() => Some(auth_required()),
            Phase::AwaitHelo => Some(reply::bad_sequence("Send EHLO first")),
            _ if !(self.session.esmtp && self.cfg.chunking) => {
                Some(Reply::with_status(502, (5, 5, 1), "CHUNKING not offered"))
            }
            Phase::AwaitRcpt(t) if t.envelope.recipients.is_empty() => {
                Some(reply::bad_sequence("Need RCPT command"))
            }
            Phase::AwaitRcpt(_) => None,
            _ => Some(reply::bad_sequence("Need MAIL command")),
        };
        let mut txn = match mem::replace(&mut self.phase, Phase::AwaitMail) {
            Phase::AwaitRcpt(txn) => Some(txn),
            _ => None,
        };
        if refusal.is_none() {
            if let Some(t) = txn.as_mut() {
                t.chunks
                    .get_or_insert_with(|| ChunkAccumulator::new(self.cfg.max_message_size));
            }
        }
        self.phase = Phase::ReadingBdat {
            txn,
            remaining: size,
            size,
            last,
            refusal,
            repeat: false,
        };
        if size == 0 {
            self.end_of_chunk();
        }
    }

    fn end_of_chunk(&mut self) {
        let Phase::ReadingBdat {
            txn,
            size,
            last,
            refusal,
            repeat,
            ..
        } = mem::replace(&mut self.phase, Phase::AwaitMail)
        else {
            return;
        };
        if let Some(r) = refusal {
            self.phase = match txn {
                Some(txn) => Phase::AwaitRcpt(txn),
                None => self.idle_phase(),
            };
            if repeat {
                r.write_to(&mut self.out);
            } else {
                self.reply(r);
            }
            return self.check_limits();
        }
        let Some(mut txn) = txn else { return };
        let outcome = txn.chunks.as_ref().map(ChunkAccumulator::outcome);
        let refused = outcome.and_then(|o| txn.refusal(&o, self.cfg.max_hops));
        if let (false, Some(r)) = (last, refused) {
            // Refused before its LAST chunk: say so now, the client need not send the rest
            // (RFC 3030 §2). The transaction is over; chunks already pipelined are dropped.
            self.phase = self.idle_phase();
            self.bdat_failed = Some(r.clone());
            self.reply(r);
            return self.check_limits();
        }
        if !last {
            self.phase = Phase::AwaitRcpt(txn);
            self.idle = 0;
            return self.reply(Reply::with_status(
                250,
                (2, 0, 0),
                format!("{size} octets received"),
            ));
        }
        let mut chunks = txn
            .chunks
            .take()
            .unwrap_or_else(|| ChunkAccumulator::new(0));
        let outcome = chunks.finish(&mut txn.body);
        self.end_of_message(*txn, outcome);
    }

    fn end_of_data(&mut self) {
        let Phase::ReadingData { txn, scanner } = mem::replace(&mut self.phase, Phase::AwaitMail)
        else {
            return;
        };
        self.end_of_message(*txn, scanner.outcome());
    }

    fn end_of_message(&mut self, txn: Transaction, outcome: DataOutcome) {
        if let Some(r) = txn.refusal(&outcome, self.cfg.max_hops) {
            self.phase = Phase::AwaitMail;
            self.settle_chunks();
            self.reply(r);
            return self.check_limits();
        }
        let Transaction { envelope, body, .. } = txn;
        self.phase = Phase::AwaitStored;
        // The delivery completes the chunks handed out so far.
        self.streaming = false;
        let incoming = self.incoming(envelope, body);
        self.actions.push_back(Action::Deliver(incoming));
    }

    /// An [`Incoming`] of this session.
    fn incoming(&self, envelope: Envelope, body: Vec<u8>) -> Incoming {
        let protocol = Protocol {
            esmtp: self.session.esmtp,
            tls: self.session.tls,
            auth: self.session.account.is_some(),
            utf8: envelope.smtputf8,
        };
        Incoming {
            envelope,
            body,
            helo: self.session.helo.clone().unwrap_or_default(),
            protocol: protocol.with_type(),
            account: self.session.account.clone(),
        }
    }

    fn starttls(&mut self) {
        let refusal = if !self.cfg.tls_available {
            Some(Reply::with_status(502, (5, 5, 1), "STARTTLS not offered"))
        } else if self.session.tls {
            Some(reply::bad_sequence("TLS already active"))
        } else if !self.session.esmtp {
            Some(reply::bad_sequence("Send EHLO first"))
        } else if matches!(self.phase, Phase::AwaitRcpt(_)) {
            Some(reply::bad_sequence("Mail transaction in progress"))
        } else {
            None
        };
        if let Some(r) = refusal {
            return self.reply(r);
        }
        self.reply(Reply::with_status(220, (2, 0, 0), "Ready to start TLS"));
        self.phase = Phase::AwaitTls;
        self.actions.push_back(Action::StartTls);
    }

    /// The SASL context of this session; `random` is the attempt's random bytes.
    fn sasl_context<'a>(&'a self, odmr: &'a OdmrConfig, random: &'a [u8]) -> SaslContext<'a> {
        let mut ctx = SaslContext {
            hostname: &self.cfg.hostname,
            tls: self.session.tls,
            allow_plaintext: odmr.allow_plaintext_auth,
            cram_md5_requires_tls: odmr.cram_md5_requires_tls,
            random,
            unix_time: self.context.unix_time,
            secret: &odmr.auth_secret,
            fake_iterations: odmr.scram_iterations,
            tls_exporter: self.context.tls_exporter.as_ref().map(|e| &e[..]),
            peer_identity: self.context.peer_identity.as_deref(),
            plus_offered: false,
        };
        let plus = Mechanism::ScramSha256Plus;
        ctx.plus_offered = odmr.auth_mechanisms.contains(&plus) && plus.check(&ctx).is_ok();
        ctx
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>, creds: &dyn Credentials) {
        let refusal = if self.session.helo.is_none() {
            Some(reply::bad_sequence("Send EHLO first"))
        } else if self.session.account.is_some() {
            Some(reply::bad_sequence("Already authenticated"))
        } else if matches!(self.phase, Phase::AwaitRcpt(_)) {
            Some(reply::bad_sequence("Mail transaction in progress"))
        } else {
            None
        };
        if let Some(r) = refusal {
            return self.reply(r);
        }
        let Some(odmr) = self.auth.as_deref() else {
            return self.reply(reply::not_implemented());
        };
        let Some(mech) = Mechanism::parse(mechanism).filter(|m| odmr.auth_mechanisms.contains(m))
        else {
            return self.reply(sasl::unknown_mechanism());
        };
        self.auth_attempts = self.auth_attempts.wrapping_add(1);
        let random = attempt_random(&self.context.random, self.auth_attempts);
        let ctx = self.sasl_context(odmr, &random);
        let (exchange, step) = SaslExchange::start(mech, initial.as_deref(), &ctx, creds);
        self.sasl_step(Box::new(exchange), step);
    }

    /// A response line while authenticating.
    fn auth_line(&mut self, line: &[u8], creds: &dyn Credentials) {
        // Not UTF-8 is not base64 either; the exchange reports it.
        let text = std::str::from_utf8(line).unwrap_or("\u{fffd}");
        match mem::replace(&mut self.phase, Phase::AwaitMail) {
            Phase::Authenticating(mut exchange) => {
                let step = exchange.step(text, creds);
                self.sasl_step(exchange, step);
            }
            Phase::AwaitAuthAck { account } => match text {
                "" => self.auth_outcome(Some(account), true),
                "*" => self.reply(Reply::with_status(
                    501,
                    (5, 0, 0),
                    "Authentication cancelled",
                )),
                _ => self.reply(Reply::with_status(
                    501,
                    (5, 5, 2),
                    "Malformed authentication response",
                )),
            },
            other => self.phase = other,
        }
        self.check_limits();
    }

    fn sasl_step(&mut self, exchange: Box<SaslExchange>, step: SaslStep) {
        match step {
            SaslStep::Challenge(payload) => {
                self.reply(Reply::new(334, None, payload));
                self.phase = Phase::Authenticating(exchange);
            }
            SaslStep::Success {
                account,
                server_final: Some(payload),
            } => {
                // RFC 4954 §4: additional data with success goes in a 334.
                self.reply(Reply::new(334, None, payload));
                self.phase = Phase::AwaitAuthAck { account };
            }
            SaslStep::Success {
                account,
                server_final: None,
            } => self.auth_outcome(Some(account), true),
            SaslStep::Failure(r) if r.code == 535 => {
                self.auth_outcome(exchange.identity().map(str::to_string), false)
            }
            SaslStep::Failure(r) => self.reply(r),
        }
    }

    /// Verification is over; the throttle decides what the client is told.
    fn auth_outcome(&mut self, account: Option<String>, success: bool) {
        self.event = Some(match (&account, success) {
            (Some(a), true) => OdmrEvent::AuthSucceeded { account: a.clone() },
            _ => OdmrEvent::AuthFailed {
                account: account.clone(),
            },
        });
        self.phase = Phase::AwaitAuthCheck { account, success };
    }

    fn atrn(&mut self, domains: Vec<DomainName>) {
        if matches!(self.phase, Phase::AwaitRcpt(_)) {
            return self.reply(reply::bad_sequence("Mail transaction in progress"));
        }
        let Some(account) = self.session.account.clone() else {
            return self.reply(auth_required());
        };
        self.idle = 0;
        self.phase = Phase::AwaitAtrn { early: false };
        self.event = Some(OdmrEvent::Atrn { account, domains });
    }

    /// Input after ATRN before its reply: the turnaround-injection defence (PROTOCOL.md §3.4).
    fn atrn_pipelined(&mut self) {
        self.reply(Reply::with_status(
            554,
            (5, 5, 0),
            "ATRN must not be pipelined",
        ));
        self.close();
    }
}

/// Verifies nothing: the credentials of [`Inbound::handle_input`].
struct NoCredentials;

impl Credentials for NoCredentials {
    fn scram(&self, _user: &str) -> Option<sasl::ScramSecrets> {
        None
    }
    fn cram_md5(&self, _user: &str, _challenge: &[u8], _digest_hex: &str) -> bool {
        false
    }
    fn external(&self, _cert_identity: &str) -> Option<String> {
        None
    }
}

/// The random bytes of AUTH attempt `n`: distinct per attempt, so a CRAM-MD5 challenge or a
/// SCRAM nonce is never reused within a connection.
fn attempt_random(random: &[u8; 32], n: u32) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(random);
    h.update(n.to_be_bytes());
    h.finalize().into()
}

/// `530 5.7.0` (RFC 4954 §6): mail or ATRN before AUTH on the ODMR and submission listeners.
fn auth_required() -> Reply {
    Reply::with_status(530, (5, 7, 0), "Authentication required")
}

/// `552 5.3.4`: over the SIZE limit (at MAIL or at the end of the message).
fn too_big() -> Reply {
    Reply::with_status(552, (5, 3, 4), "Message size exceeds fixed limit")
}

/// The reply refusing a complete message, or `None` to deliver it.
fn verdict(o: &DataOutcome, max_hops: usize) -> Option<Reply> {
    if o.smuggling {
        let text = "Message refused: bare line ending around a lone dot (SMTP smuggling)";
        Some(Reply::with_status(550, (5, 5, 2), text))
    } else if !o.is_canonical() {
        let text = "Message refused: bare CR or LF, lines must end in CRLF";
        Some(Reply::with_status(550, (5, 5, 2), text))
    } else if o.oversize {
        Some(too_big())
    } else if usize::try_from(o.received).unwrap_or(usize::MAX) >= max_hops {
        Some(Reply::with_status(
            554,
            (5, 4, 6),
            "Too many hops, mail loop detected",
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts example.org (and our postmaster), refuses `full@` with 452 and the rest as relay.
    struct Dir;

    impl Directory for Dir {
        fn check_rcpt(&self, rcpt: &Mailbox, _declared: Option<u64>) -> RcptVerdict {
            match (rcpt.local.as_str(), rcpt.domain.as_str()) {
                ("full", _) => {
                    RcptVerdict::Reject(Reply::with_status(452, (4, 2, 2), "Mailbox full"))
                }
                (_, "example.org" | "mx.example") => RcptVerdict::Accept,
                _ => RcptVerdict::Reject(Reply::with_status(550, (5, 7, 1), "Relay access denied")),
            }
        }

        /// "user" sends from example.org (or `<>`); `limited@` is over its message rate.
        fn check_sender(&self, account: &str, sender: Option<&Mailbox>) -> Result<(), Reply> {
            match sender.map(|s| (s.local.as_str(), s.domain.as_str())) {
                Some(("limited", _)) => {
                    Err(Reply::with_status(450, (4, 7, 1), "Message rate limit"))
                }
                None | Some((_, "example.org")) if account == "user" => Ok(()),
                _ => Err(Reply::with_status(553, (5, 7, 1), "Not your address")),
            }
        }

        /// Three recipients per message; example.org is hosted (MX rules), the rest outbound.
        fn check_submit_rcpt(
            &self,
            _account: &str,
            rcpt: &Mailbox,
            accepted: usize,
            declared: Option<u64>,
        ) -> RcptVerdict {
            if accepted >= 3 {
                return RcptVerdict::Reject(Reply::with_status(452, (4, 5, 3), "Rate limit"));
            }
            match rcpt.domain.as_str() {
                "example.org" | "mx.example" => self.check_rcpt(rcpt, declared),
                _ => RcptVerdict::Accept,
            }
        }
    }

    /// What a session produced, independent of how the input was split.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Run {
        output: String,
        delivered: Vec<Incoming>,
        tls_started: bool,
        closed: bool,
        events: Vec<OdmrEvent>,
        reversed: bool,
    }

    /// How to build the machine under test.
    struct Setup {
        cfg: InboundConfig,
        odmr: Option<(OdmrConfig, SessionContext)>,
        /// With `odmr` set: a submission machine with those AUTH settings instead.
        submission: bool,
    }

    impl Setup {
        fn machine(&self) -> Inbound {
            match &self.odmr {
                None => Inbound::new(self.cfg.clone()),
                Some((o, ctx)) if self.submission => {
                    Inbound::new_submission(self.cfg.clone(), o.clone(), ctx.clone())
                }
                Some((o, ctx)) => Inbound::new_odmr(self.cfg.clone(), o.clone(), ctx.clone()),
            }
        }
    }

    /// "user" (and "locked", "banned") with password "pencil", SCRAM salt "salt" and 16
    /// iterations (cheap enough for every-offset replays); CRAM-MD5 for "user" only; the
    /// certificate "CN=gw.customer.example" maps to "user".
    struct Creds;

    fn test_secrets() -> sasl::ScramSecrets {
        sasl::ScramSecrets::derive(b"pencil", b"salt", 16)
    }

    fn cram_digest(challenge: &[u8]) -> String {
        sasl::CramMd5Key::from_password("pencil").digest_hex(challenge)
    }

    impl Credentials for Creds {
        fn scram(&self, user: &str) -> Option<sasl::ScramSecrets> {
            matches!(user, "user" | "locked" | "banned").then(test_secrets)
        }
        fn cram_md5(&self, user: &str, challenge: &[u8], digest_hex: &str) -> bool {
            user == "user" && digest_hex == cram_digest(challenge)
        }
        fn external(&self, cert_identity: &str) -> Option<String> {
            (cert_identity == "CN=gw.customer.example").then(|| "user".into())
        }
    }

    /// The throttle as the test driver plays it: "locked" is a locked account, "banned"
    /// comes from a locked address.
    fn throttle(event: &OdmrEvent) -> Option<Refusal> {
        let account = match event {
            OdmrEvent::AuthSucceeded { account } => Some(account.as_str()),
            OdmrEvent::AuthFailed { account } => account.as_deref(),
            _ => None,
        };
        match account {
            Some("locked") => Some(Refusal::Account),
            Some("banned") => Some(Refusal::Ip),
            _ => None,
        }
    }

    /// The ATRN decision as the test driver plays it, by the first requested domain.
    fn decide(domains: &[DomainName]) -> AtrnDecision {
        let d = |s: &str| DomainName::parse(s).unwrap();
        match domains.first().map(DomainName::as_str) {
            Some("other.example") => AtrnDecision::NotAuthorized(vec![d("other.example")]),
            Some("empty.example") => AtrnDecision::NoMail,
            Some("busy.example") => AtrnDecision::Busy(d("busy.example")),
            Some("often.example") => AtrnDecision::RateLimited,
            Some("down.example") => AtrnDecision::Unavailable,
            _ => AtrnDecision::Accepted,
        }
    }

    /// A driver as the runtime implements it: a read buffer that keeps unconsumed bytes, every
    /// action obeyed, and input re-presented after each action. `flights` are the client's
    /// writes, each sent only once the previous one has been fully answered.
    ///
    /// With `body_chunk` set, the chunks are stored as a driver would and each delivery gets
    /// them back in front of its body, so a run does not depend on the chunk size; the chunk
    /// contract is asserted on the way (sizes, DiscardChunks only after chunks, none left over).
    fn drive(setup: &Setup, flights: &[Vec<&[u8]>]) -> Run {
        let mut m = setup.machine();
        let mut run = Run::default();
        let mut buf: Vec<u8> = Vec::new();
        let chunk = setup.cfg.body_chunk;
        let mut stored: Option<Vec<u8>> = None;
        let take_output = |m: &mut Inbound, run: &mut Run| {
            run.output.push_str(&String::from_utf8_lossy(m.output()));
            m.output().clear();
        };
        take_output(&mut m, &mut run);
        'flights: for pieces in flights {
            for piece in pieces {
                buf.extend_from_slice(piece);
                loop {
                    let n = m.handle_odmr_input(&buf, &Dir, &Creds);
                    buf.drain(..n);
                    take_output(&mut m, &mut run);
                    let mut acted = false;
                    while let Some(event) = m.poll_event() {
                        acted = true;
                        match &event {
                            OdmrEvent::AuthSucceeded { .. } | OdmrEvent::AuthFailed { .. } => {
                                m.auth_checked(throttle(&event))
                            }
                            OdmrEvent::Atrn { domains, .. } => m.atrn_decided(decide(domains)),
                            OdmrEvent::Reverse => run.reversed = true,
                        }
                        run.events.push(event);
                        take_output(&mut m, &mut run);
                        if run.reversed {
                            assert!(buf.is_empty(), "input left at the turnaround");
                            break 'flights;
                        }
                    }
                    while let Some(action) = m.poll_action() {
                        acted = true;
                        match action {
                            Action::StoreChunk(bytes) => {
                                assert!(m.receiving().is_some(), "a chunk outside a message");
                                let c = chunk.expect("chunks only when configured");
                                // A held-back CR and its follower may come out together.
                                assert!(
                                    (c..=c + 2).contains(&bytes.len()),
                                    "chunk of {}",
                                    bytes.len()
                                );
                                stored
                                    .get_or_insert_with(Vec::new)
                                    .extend_from_slice(&bytes);
                                m.recycle(bytes);
                            }
                            Action::DiscardChunks => {
                                assert!(stored.take().is_some(), "DiscardChunks without chunks");
                            }
                            Action::Deliver(mut incoming) => {
                                if let Some(c) = chunk {
                                    assert!(incoming.body.len() <= c + 2, "tail over a chunk");
                                }
                                if let Some(mut body) = stored.take() {
                                    body.append(&mut incoming.body);
                                    incoming.body = body;
                                }
                                let fail = incoming
                                    .envelope
                                    .recipients
                                    .iter()
                                    .any(|r| r.mailbox.local == "tempfail");
                                run.delivered.push(incoming);
                                m.stored(if fail {
                                    Err(Reply::with_status(451, (4, 3, 0), "Storage failed"))
                                } else {
                                    Ok(format!("Q{}", run.delivered.len()))
                                });
                            }
                            Action::StartTls => {
                                // RFC 3207: plaintext read before the handshake is dropped.
                                buf.clear();
                                run.tls_started = true;
                                m.tls_started();
                                if let Some((_, ctx)) = &setup.odmr {
                                    m.set_context(context(true, ctx.unix_time));
                                }
                            }
                            Action::Close => {
                                assert!(stored.is_none(), "chunks left over at Close");
                                run.closed = true;
                                take_output(&mut m, &mut run);
                                break 'flights;
                            }
                        }
                        take_output(&mut m, &mut run);
                    }
                    if !acted || buf.is_empty() {
                        break;
                    }
                }
            }
        }
        assert_eq!(run.closed, m.is_closed());
        run
    }

    /// A transcript: `C:` lines are client lines (CRLF appended); consecutive `C:` lines form
    /// one flight (one write). `S:` lines are the server's replies. `\n` inside a `C:` line is
    /// written as a bare LF and `\r` as a bare CR.
    struct Transcript {
        flights: Vec<Vec<u8>>,
        expected: String,
    }

    fn parse(script: &str) -> Transcript {
        let mut t = Transcript {
            flights: Vec::new(),
            expected: String::new(),
        };
        let mut in_flight = false;
        for line in script
            .lines()
            .map(str::trim_start)
            .filter(|l| !l.is_empty())
        {
            if let Some(c) = line.strip_prefix("C:") {
                if !in_flight {
                    t.flights.push(Vec::new());
                    in_flight = true;
                }
                let c = c
                    .strip_prefix(' ')
                    .unwrap_or(c)
                    .replace("\\n", "\n")
                    .replace("\\r", "\r");
                let flight = t.flights.last_mut().unwrap();
                flight.extend_from_slice(c.as_bytes());
                flight.extend_from_slice(b"\r\n");
            } else if let Some(s) = line.strip_prefix("S:") {
                in_flight = false;
                t.expected.push_str(s.strip_prefix(' ').unwrap_or(s));
                t.expected.push_str("\r\n");
            } else {
                panic!("bad transcript line {line:?}");
            }
        }
        t
    }

    /// Runs the transcript with every flight whole, then with each flight split at every
    /// offset, then byte by byte; all runs must produce the same replies and deliveries.
    fn check(cfg: &InboundConfig, script: &str) -> Run {
        check_in(
            &Setup {
                cfg: cfg.clone(),
                odmr: None,
                submission: false,
            },
            script,
        )
    }

    /// [`check`] for any machine.
    fn check_in(cfg: &Setup, script: &str) -> Run {
        let t = parse(script);
        let whole: Vec<Vec<&[u8]>> = t.flights.iter().map(|f| vec![f.as_slice()]).collect();
        let run = drive(cfg, &whole);
        assert_eq!(run.output, t.expected, "transcript:\n{script}");
        for (k, flight) in t.flights.iter().enumerate() {
            for cut in 0..=flight.len() {
                let mut split = whole.clone();
                split[k] = vec![&flight[..cut], &flight[cut..]];
                assert_eq!(
                    drive(cfg, &split),
                    run,
                    "flight {k} split at {cut}:\n{script}"
                );
            }
        }
        let singles: Vec<Vec<&[u8]>> = t.flights.iter().map(|f| f.chunks(1).collect()).collect();
        assert_eq!(drive(cfg, &singles), run, "byte by byte:\n{script}");
        if cfg.cfg.body_chunk.is_none() {
            // Streaming bodies changes nothing the client or the store sees.
            for chunk in [1, 3] {
                let streamed = Setup {
                    cfg: InboundConfig {
                        body_chunk: Some(chunk),
                        ..cfg.cfg.clone()
                    },
                    odmr: cfg.odmr.clone(),
                    submission: cfg.submission,
                };
                assert_eq!(
                    drive(&streamed, &whole),
                    run,
                    "chunks of {chunk}:\n{script}"
                );
                for (k, flight) in t.flights.iter().enumerate() {
                    for cut in 0..=flight.len() {
                        let mut split = whole.clone();
                        split[k] = vec![&flight[..cut], &flight[cut..]];
                        assert_eq!(
                            drive(&streamed, &split),
                            run,
                            "chunks of {chunk}, flight {k} split at {cut}:\n{script}"
                        );
                    }
                }
                assert_eq!(
                    drive(&streamed, &singles),
                    run,
                    "chunks of {chunk}, byte by byte"
                );
            }
        }
        run
    }

    /// Runs a transcript with each flight whole only: for sync-point violations, whose outcome
    /// by definition depends on what had arrived when the command was read.
    fn check_whole(cfg: &InboundConfig, script: &str) -> Run {
        check_whole_in(
            &Setup {
                cfg: cfg.clone(),
                odmr: None,
                submission: false,
            },
            script,
        )
    }

    /// [`check_whole`] for any machine.
    fn check_whole_in(cfg: &Setup, script: &str) -> Run {
        let t = parse(script);
        let whole: Vec<Vec<&[u8]>> = t.flights.iter().map(|f| vec![f.as_slice()]).collect();
        let run = drive(cfg, &whole);
        assert_eq!(run.output, t.expected, "transcript:\n{script}");
        run
    }

    fn cfg() -> InboundConfig {
        InboundConfig {
            max_message_size: 1000,
            ..InboundConfig::new("mx.example")
        }
    }

    const EHLO: &str = "
        S: 220 mx.example ESMTP turnpike
        C: EHLO client.example
        S: 250-mx.example
        S: 250-PIPELINING
        S: 250-SIZE 1000
        S: 250-8BITMIME
        S: 250-SMTPUTF8
        S: 250-ENHANCEDSTATUSCODES
        S: 250-CHUNKING
        S: 250 DSN";

    fn session(rest: &str) -> String {
        format!("{EHLO}\n{rest}")
    }

    fn mb(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn pipelined_transaction_with_data() {
        let run = check(
            &cfg(),
            &session(
                "C: MAIL FROM:<a@sender.example> SIZE=20 BODY=8BITMIME RET=HDRS ENVID=E1
                 C: RCPT TO:<u@Example.ORG> NOTIFY=SUCCESS ORCPT=rfc822;u@example.org
                 C: RCPT TO:<x@elsewhere.example>
                 C: RCPT TO:<full@example.org>
                 C: RCPT TO:<Postmaster>
                 C: DATA
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 550 5.7.1 Relay access denied
                 S: 452 4.2.2 Mailbox full
                 S: 250 2.1.5 Ok
                 S: 354 End data with <CR><LF>.<CR><LF>
                 C: Subject: hi
                 C:
                 C: ..dot
                 C: .
                 C: QUIT
                 S: 250 2.0.0 Ok queued as Q1
                 S: 221 2.0.0 Bye",
            ),
        );
        assert!(run.closed);
        let [msg] = &run.delivered[..] else {
            panic!("one delivery expected")
        };
        assert_eq!(msg.body, b"Subject: hi\r\n\r\n.dot\r\n");
        assert_eq!(
            (msg.helo.as_str(), msg.protocol),
            ("client.example", "ESMTP")
        );
        let env = &msg.envelope;
        assert_eq!(env.sender, Some(mb("a", "sender.example")));
        assert_eq!(
            (env.body, env.ret, env.envid.as_deref()),
            (
                BodyType::EightBitMime,
                Some(crate::types::Ret::Hdrs),
                Some("E1")
            )
        );
        let rcpts: Vec<&Mailbox> = env.recipients.iter().map(|r| &r.mailbox).collect();
        assert_eq!(
            rcpts,
            [&mb("u", "example.org"), &mb("Postmaster", "mx.example")]
        );
        assert_eq!(
            env.recipients[0].orcpt.as_deref(),
            Some("rfc822;u@example.org")
        );
        assert!(env.recipients[0]
            .notify
            .is_some_and(|n| n.success && !n.failure));
    }

    #[test]
    fn pipelined_bdat_session_in_one_flight() {
        // Everything after EHLO in a single write, as a CHUNKING+PIPELINING client may send it.
        let run = check(
            &cfg(),
            &session(
                "C: MAIL FROM:<>
                 C: RCPT TO:<u@example.org>
                 C: BDAT 10
                 C: Subject:
                 C: BDAT 3 LAST
                 C: x
                 C: RSET
                 C: MAIL FROM:<b@c.example>
                 C: RCPT TO:<v@example.org>
                 C: BDAT 0 LAST
                 C: NOOP
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 250 2.0.0 10 octets received
                 S: 250 2.0.0 Ok queued as Q1
                 S: 250 2.0.0 Ok
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 250 2.0.0 Ok queued as Q2
                 S: 250 2.0.0 Ok",
            ),
        );
        // "Subject:\r\n" + "x\r\n": the chunk boundary split nothing but the count.
        assert_eq!(run.delivered[0].body, b"Subject:\r\nx\r\n");
        assert_eq!(run.delivered[0].envelope.sender, None);
        assert_eq!(run.delivered[1].body, b"");
        assert!(!run.closed);
    }

    #[test]
    fn bdat_appends_final_crlf_and_refuses_bare_line_endings() {
        let run = check(
            &cfg(),
            &session(
                "C: MAIL FROM:<a@b.example>
                 C: RCPT TO:<u@example.org>
                 C: BDAT 3 LAST
                 C: abcNOOP
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 250 2.0.0 Ok queued as Q1
                 S: 250 2.0.0 Ok
                 C: MAIL FROM:<a@b.example>
                 C: RCPT TO:<u@example.org>
                 C: BDAT 5 LAST
                 C: a\\nb
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 550 5.5.2 Message refused: bare CR or LF, lines must end in CRLF",
            ),
        );
        // BDAT 3 carried "abc", completed with CRLF; NOOP was the next command.
        assert_eq!(run.delivered.len(), 1);
        assert_eq!(run.delivered[0].body, b"abc\r\n");
    }

    #[test]
    fn bdat_refusals_still_consume_the_chunk() {
        check(
            &cfg(),
            &session(
                "C: BDAT 6
                 C: QUIT
                 S: 503 5.5.1 Need MAIL command
                 C: MAIL FROM:<a@b.example>
                 C: BDAT 4 LAST
                 C: xx
                 S: 250 2.1.0 Ok
                 S: 503 5.5.1 Need RCPT command
                 C: RCPT TO:<u@example.org>
                 C: BDAT 3
                 C: a
                 C: RCPT TO:<v@example.org>
                 C: DATA
                 S: 250 2.1.5 Ok
                 S: 250 2.0.0 3 octets received
                 S: 503 5.5.1 RCPT not allowed during BDAT transfer
                 S: 503 5.5.1 DATA not allowed after BDAT
                 C: RSET
                 S: 250 2.0.0 Ok",
            ),
        );
        let no_chunking = InboundConfig {
            chunking: false,
            ..cfg()
        };
        check(
            &no_chunking,
            "S: 220 mx.example ESMTP turnpike
             C: HELO c
             S: 250 mx.example
             C: BDAT 6 LAST
             C: QUIT
             S: 502 5.5.1 CHUNKING not offered",
        );
    }

    /// What a streaming driver saw, action by action, with the input consumed at that point.
    #[derive(Debug, Default)]
    struct Streamed {
        /// `("chunk" | "discard" | "deliver" | "close", bytes consumed so far, body bytes)`.
        log: Vec<(&'static str, usize, usize)>,
        /// The bodies delivered, chunks in front.
        delivered: Vec<Vec<u8>>,
        output: String,
        /// The most body bytes the machine held at once (chunk being filled).
        max_held: usize,
        /// Bytes of chunks the driver held for the open transaction, at most.
        max_stored: usize,
    }

    /// Feeds `input` in `piece`-sized reads to an MX machine with `cfg`, after an EHLO of its
    /// own; `abandon_after` plays a driver whose disk fails after that many chunks.
    fn stream(
        cfg: &InboundConfig,
        input: &[u8],
        piece: usize,
        abandon_after: Option<usize>,
    ) -> Streamed {
        let mut m = ehlo_sent(cfg);
        let mut got = Streamed::default();
        let (mut buf, mut consumed, mut stored, mut chunks) = (Vec::new(), 0, Vec::new(), 0);
        // The client waits for the 354 after each DATA (a sync point): one flight each.
        let mut flights = Vec::new();
        let mut rest = input;
        while let Some(at) = rest.windows(6).position(|w| w == b"DATA\r\n") {
            flights.push(&rest[..at + 6]);
            rest = &rest[at + 6..];
        }
        flights.push(rest);
        for read in flights.iter().flat_map(|f| f.chunks(piece)) {
            buf.extend_from_slice(read);
            loop {
                let n = m.handle_input(&buf, &Dir);
                buf.drain(..n);
                consumed += n;
                got.max_held = got.max_held.max(held(&m));
                let mut acted = false;
                while let Some(a) = m.poll_action() {
                    acted = true;
                    match a {
                        Action::StoreChunk(bytes) => {
                            chunks += 1;
                            let r = m.receiving().expect("a message is being received");
                            assert_eq!((r.helo.as_str(), r.protocol), ("c", "ESMTP"));
                            assert_eq!(r.envelope.recipients[0].mailbox.local, "u");
                            got.log.push(("chunk", consumed, bytes.len()));
                            if abandon_after.is_some_and(|k| chunks > k) {
                                stored.clear();
                                m.abandon_body(Reply::with_status(452, (4, 3, 1), "Disk full"));
                            } else {
                                stored.extend_from_slice(&bytes);
                            }
                            got.max_stored = got.max_stored.max(stored.len());
                        }
                        Action::DiscardChunks => {
                            got.log.push(("discard", consumed, stored.len()));
                            stored.clear();
                        }
                        Action::Deliver(mut inc) => {
                            stored.append(&mut inc.body);
                            got.log.push(("deliver", consumed, stored.len()));
                            got.delivered.push(mem::take(&mut stored));
                            m.stored(Ok("Q".into()));
                        }
                        Action::StartTls => unreachable!("not offered"),
                        Action::Close => got.log.push(("close", consumed, stored.len())),
                    }
                }
                got.output.push_str(&String::from_utf8_lossy(m.output()));
                m.output().clear();
                if !acted || buf.is_empty() {
                    break;
                }
            }
        }
        got
    }

    /// A machine past the greeting and EHLO, its output cleared.
    fn ehlo_sent(cfg: &InboundConfig) -> Inbound {
        let mut m = Inbound::new(cfg.clone());
        assert_eq!(m.handle_input(b"EHLO c\r\n", &Dir), 8);
        m.output().clear();
        m
    }

    /// Body bytes the machine holds right now.
    fn held(m: &Inbound) -> usize {
        match &m.phase {
            Phase::AwaitRcpt(t) | Phase::ReadingData { txn: t, .. } => t.body.capacity(),
            Phase::ReadingBdat { txn: Some(t), .. } => t.body.capacity(),
            _ => 0,
        }
    }

    fn streaming_cfg(limit: u64, chunk: usize) -> InboundConfig {
        InboundConfig {
            max_message_size: limit,
            body_chunk: Some(chunk),
            ..InboundConfig::new("mx.example")
        }
    }

    /// `n` lines of 10 octets ("0123456:\r\n"-like, the first starting with a dot).
    fn lines(n: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for i in 0..n {
            b.extend_from_slice(format!("{:08}\r\n", i).as_bytes());
        }
        b[0] = b'.';
        b
    }

    #[test]
    fn data_bodies_stream_in_chunks_that_add_up_to_the_message() {
        let body = lines(300);
        let mut input = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n".to_vec();
        // Dot-stuff the first line, as a client must.
        input.push(b'.');
        input.extend_from_slice(&body);
        input.extend_from_slice(b".\r\nQUIT\r\n");
        for piece in [1, 7, 64, 1000, input.len()] {
            let got = stream(&streaming_cfg(10_000, 256), &input, piece, None);
            assert!(
                got.delivered == [body.clone()],
                "piece {piece}: {:?}",
                got.log
            );
            let chunks = got.log.iter().filter(|l| l.0 == "chunk").count();
            assert_eq!(chunks, body.len() / 256, "piece {piece}");
            assert!(got.log.iter().all(|l| l.0 != "discard"));
            assert!(
                got.max_held <= 2 * 256,
                "machine held {} bytes",
                got.max_held
            );
            assert!(
                got.output
                    .ends_with("250 2.0.0 Ok queued as Q\r\n221 2.0.0 Bye\r\n"),
                "{}",
                got.output
            );
        }
    }

    #[test]
    fn data_over_the_limit_is_dropped_as_it_arrives_and_the_session_goes_on() {
        let mut input = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n".to_vec();
        let head = input.len();
        input.extend_from_slice(&lines(1000)[1..]);
        let crossing = head + 2000;
        input.extend_from_slice(
            b".\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nsmall\r\n.\r\n",
        );
        for piece in [1, 100, 4096] {
            let got = stream(&streaming_cfg(2000, 256), &input, piece, None);
            // The chunks stop at the limit and are dropped as soon as it is crossed, long
            // before the end of the 10 kB message.
            let discard = got
                .log
                .iter()
                .find(|l| l.0 == "discard")
                .expect("discarded");
            assert!(
                discard.1 <= crossing + piece,
                "dropped at {} of {}",
                discard.1,
                input.len()
            );
            assert!(got.max_stored <= 2000);
            assert!(
                got.max_held <= 2 * 256,
                "machine held {} bytes",
                got.max_held
            );
            assert_eq!(got.delivered, [b"small\r\n".to_vec()]);
            assert!(got
                .output
                .contains("552 5.3.4 Message size exceeds fixed limit\r\n"));
        }
    }

    #[test]
    fn a_bdat_chunk_over_the_limit_is_refused_at_once_and_the_rest_discarded() {
        // The 552 comes right after the chunk that crossed the limit; the chunks pipelined
        // behind it (up to LAST) are read and dropped with the same reply, and cost no
        // error each: with max_errors 1 the session is still open for the next message.
        let cfg = InboundConfig {
            max_errors: 1,
            ..streaming_cfg(2000, 256)
        };
        let mut input =
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nBDAT 1500\r\n".to_vec();
        input.extend_from_slice(&lines(150));
        input.extend_from_slice(b"BDAT 1000\r\n");
        input.extend_from_slice(&lines(100));
        input.extend_from_slice(b"BDAT 3000\r\n");
        input.extend_from_slice(&lines(300));
        input.extend_from_slice(b"BDAT 4 LAST\r\nabcd");
        input.extend_from_slice(
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nBDAT 7 LAST\r\nsmall\r\n",
        );
        for piece in [1, 33, input.len()] {
            let got = stream(&cfg, &input, piece, None);
            let replies: Vec<&str> = got.output.lines().collect();
            assert_eq!(
                replies,
                [
                    "250 2.1.0 Ok",
                    "250 2.1.5 Ok",
                    "250 2.0.0 1500 octets received",
                    "552 5.3.4 Message size exceeds fixed limit",
                    "552 5.3.4 Message size exceeds fixed limit",
                    "552 5.3.4 Message size exceeds fixed limit",
                    "250 2.1.0 Ok",
                    "250 2.1.5 Ok",
                    "250 2.0.0 Ok queued as Q",
                ],
                "piece {piece}: {}",
                got.output
            );
            assert_eq!(got.delivered, [b"small\r\n".to_vec()]);
            assert_eq!(got.log.iter().filter(|l| l.0 == "discard").count(), 1);
            assert!(got.max_stored <= 2000);
        }
    }

    #[test]
    fn a_failed_store_drops_the_rest_and_answers_the_drivers_reply() {
        let mut input = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n".to_vec();
        input.extend_from_slice(&lines(100)[1..]);
        input.extend_from_slice(
            b".\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nBDAT 600\r\n",
        );
        input.extend_from_slice(&lines(60));
        input.extend_from_slice(b"BDAT 0 LAST\r\nRSET\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nok\r\n.\r\n");
        for piece in [1, 50, input.len()] {
            let got = stream(&streaming_cfg(10_000, 128), &input, piece, Some(1));
            let replies: Vec<&str> = got.output.lines().collect();
            assert_eq!(
                replies,
                [
                    "250 2.1.0 Ok",
                    "250 2.1.5 Ok",
                    "354 End data with <CR><LF>.<CR><LF>",
                    "452 4.3.1 Disk full",
                    "250 2.1.0 Ok",
                    "250 2.1.5 Ok",
                    "452 4.3.1 Disk full",
                    "452 4.3.1 Disk full",
                    "250 2.0.0 Ok",
                    "250 2.1.0 Ok",
                    "250 2.1.5 Ok",
                    "354 End data with <CR><LF>.<CR><LF>",
                    "250 2.0.0 Ok queued as Q",
                ],
                "piece {piece}: {}",
                got.output
            );
            assert_eq!(got.delivered, [b"ok\r\n".to_vec()]);
            // Every chunk after the failure was handed to a driver that had given up: none.
            assert!(got.max_held <= 2 * 128);
        }
    }

    #[test]
    fn chunks_of_a_transaction_that_ends_undelivered_are_discarded_first() {
        // RSET between BDAT chunks, then a new transaction: its chunks must not be appended
        // to the old ones (its last 100 bytes come as the delivery's tail: a chunk goes out
        // only while the message goes on). A session closing mid-DATA discards first.
        let mut input =
            b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nBDAT 300\r\n".to_vec();
        input.extend_from_slice(&lines(30));
        input.extend_from_slice(
            b"RSET\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nBDAT 300 LAST\r\n",
        );
        let second = lines(30);
        input.extend_from_slice(&second);
        input.extend_from_slice(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n");
        input.extend_from_slice(&lines(30)[1..]);
        input.extend_from_slice(b"QUIT\r\n");
        for piece in [1, 64, input.len()] {
            let got = stream(&streaming_cfg(10_000, 100), &input, piece, None);
            assert!(
                got.delivered == [second.clone()],
                "piece {piece}: {:?}",
                got.log
            );
            let kinds: Vec<&str> = got.log.iter().map(|l| l.0).collect();
            assert_eq!(
                kinds,
                [
                    "chunk", "chunk", "chunk", "discard", "chunk", "chunk", "deliver", "chunk",
                    "chunk", "chunk"
                ],
                "piece {piece}"
            );
            // The third message never ends; the idle timeout closes the session.
            let mut m = ehlo_sent(&streaming_cfg(10_000, 100));
            let head = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n";
            assert_eq!(m.handle_input(head, &Dir), head.len());
            let body = &lines(30)[1..];
            let mut rest = body;
            let mut last = Vec::new();
            while !rest.is_empty() {
                let n = m.handle_input(rest, &Dir);
                rest = &rest[n..];
                while let Some(a) = m.poll_action() {
                    last.push(if matches!(a, Action::StoreChunk(_)) {
                        "chunk"
                    } else {
                        "other"
                    });
                }
            }
            assert_eq!(last, ["chunk", "chunk"]);
            m.timed_out();
            while let Some(a) = m.poll_action() {
                last.push(match a {
                    Action::StoreChunk(_) => "chunk",
                    Action::DiscardChunks => "discard",
                    Action::Close => "close",
                    _ => "other",
                });
            }
            assert_eq!(
                last.iter().rev().take(2).collect::<Vec<_>>(),
                [&"close", &"discard"]
            );
        }
    }

    #[test]
    fn sequencing_errors() {
        check(
            &cfg(),
            "S: 220 mx.example ESMTP turnpike
             C: MAIL FROM:<a@b.example>
             S: 503 5.5.1 Send EHLO or HELO first
             C: RCPT TO:<u@example.org>
             S: 503 5.5.1 Send EHLO or HELO first
             C: DATA
             S: 503 5.5.1 Send EHLO or HELO first
             C: HELO c
             S: 250 mx.example
             C: RCPT TO:<u@example.org>
             S: 503 5.5.1 Need MAIL command
             C: DATA
             S: 503 5.5.1 Need MAIL command
             C: MAIL FROM:<a@b.example>
             S: 250 2.1.0 Ok
             C: MAIL FROM:<a@b.example>
             S: 503 5.5.1 Nested MAIL command
             C: DATA
             S: 503 5.5.1 Need RCPT command
             C: RSET
             S: 250 2.0.0 Ok
             C: DATA
             S: 503 5.5.1 Need MAIL command",
        );
    }

    #[test]
    fn helo_gives_plain_smtp_without_esmtp_parameters() {
        let run = check(
            &cfg(),
            "S: 220 mx.example ESMTP turnpike
             C: HELO client
             S: 250 mx.example
             C: MAIL FROM:<a@b.example> SIZE=10
             S: 555 5.5.4 ESMTP parameters require EHLO
             C: MAIL FROM:<a@b.example>
             S: 250 2.1.0 Ok
             C: RCPT TO:<u@example.org> NOTIFY=NEVER
             S: 555 5.5.4 ESMTP parameters require EHLO
             C: RCPT TO:<u@example.org>
             S: 250 2.1.5 Ok
             C: DATA
             S: 354 End data with <CR><LF>.<CR><LF>
             C: hello
             C: .
             S: 250 2.0.0 Ok queued as Q1",
        );
        assert_eq!(run.delivered[0].protocol, "SMTP");
    }

    #[test]
    fn mail_parameter_replies() {
        let no_utf8 = InboundConfig {
            smtputf8: false,
            ..cfg()
        };
        check(
            &no_utf8,
            "S: 220 mx.example ESMTP turnpike
             C: EHLO c
             S: 250-mx.example
             S: 250-PIPELINING
             S: 250-SIZE 1000
             S: 250-8BITMIME
             S: 250-ENHANCEDSTATUSCODES
             S: 250-CHUNKING
             S: 250 DSN
             C: MAIL FROM:<a@b.example> SIZE=1001
             C: MAIL FROM:<a@b.example> SMTPUTF8
             C: MAIL FROM:<a@b.example> BODY=BINARYMIME
             C: MAIL FROM:<jörg@b.example>
             C: MAIL FROM:<a@b.example> X-FOO=1
             C: MAIL FROM:<a b@b.example>
             C: MAIL FROM:<a@b.example> SIZE=x
             S: 552 5.3.4 Message size exceeds fixed limit
             S: 555 5.5.4 SMTPUTF8 not offered
             S: 555 5.5.4 BODY=BINARYMIME not offered
             S: 553 5.6.7 Non-ASCII address requires SMTPUTF8
             S: 555 5.5.4 Parameter not recognized or not implemented
             S: 501 5.1.7 Bad sender address syntax
             S: 501 5.5.4 Syntax error in parameters or arguments",
        );
    }

    #[test]
    fn smtputf8_transaction() {
        let run = check(
            &cfg(),
            &session(
                "C: MAIL FROM:<jörg@bücher.example> SMTPUTF8
                 C: RCPT TO:<δοκιμή@example.org>
                 C: RCPT TO:<x@y.example
                 C: DATA
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 501 5.1.3 Bad recipient address syntax
                 S: 354 End data with <CR><LF>.<CR><LF>
                 C: caf\u{e9}
                 C: .
                 S: 250 2.0.0 Ok queued as Q1
                 C: MAIL FROM:<a@b.example>
                 C: RCPT TO:<δοκιμή@example.org>
                 S: 250 2.1.0 Ok
                 S: 553 5.6.7 Non-ASCII address requires SMTPUTF8",
            ),
        );
        assert_eq!(run.delivered[0].protocol, "UTF8SMTP");
        assert!(run.delivered[0].envelope.smtputf8);
    }

    #[test]
    fn simple_commands() {
        check(
            &cfg(),
            "S: 220 mx.example ESMTP turnpike
             C: NOOP
             S: 250 2.0.0 Ok
             C: VRFY someone
             S: 252 2.5.0 Cannot verify, but will accept and attempt delivery
             C: HELP
             S: 214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS
             C: RSET
             S: 250 2.0.0 Ok
             C: EXPN list
             S: 502 5.5.1 Command not implemented
             C: AUTH PLAIN
             S: 502 5.5.1 Command not implemented
             C: ATRN example.org
             S: 502 5.5.1 Command not implemented
             C: ETRN example.org
             S: 502 5.5.1 Command not implemented
             C: FROB
             S: 500 5.5.2 Syntax error, command unrecognized
             C: EHLO
             S: 501 5.5.4 Syntax error in parameters or arguments
             C: STARTTLS
             S: 502 5.5.1 STARTTLS not offered
             C: QUIT
             S: 221 2.0.0 Bye",
        );
    }

    #[test]
    fn command_line_framing_errors() {
        let long = format!("C: NOOP {}", "x".repeat(600));
        check(
            &cfg(),
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 {long}
                 S: 500 5.5.2 Line too long
                 C: NOOP\\nNOOP
                 S: 500 5.5.2 Bare LF received, lines must end in CRLF
                 S: 250 2.0.0 Ok
                 C: NO\\rOP
                 S: 500 5.5.2 Bare CR received, lines must end in CRLF
                 C: NOOP
                 S: 250 2.0.0 Ok"
            ),
        );
    }

    #[test]
    fn message_verdicts() {
        let hops = InboundConfig {
            max_hops: 2,
            ..cfg()
        };
        let txn = "C: MAIL FROM:<a@b.example>
                   C: RCPT TO:<u@example.org>
                   C: DATA
                   S: 250 2.1.0 Ok
                   S: 250 2.1.5 Ok
                   S: 354 End data with <CR><LF>.<CR><LF>";
        let run = check(
            &hops,
            &session(&format!(
                "{txn}
                 C: bare\\nlf
                 C: .
                 S: 550 5.5.2 Message refused: bare CR or LF, lines must end in CRLF
                 {txn}
                 C: x\\n.\\nMAIL FROM:<evil@forged.example>
                 C: .
                 S: 550 5.5.2 Message refused: bare line ending around a lone dot (SMTP smuggling)
                 {txn}
                 C: {big}
                 C: .
                 S: 552 5.3.4 Message size exceeds fixed limit
                 {txn}
                 C: Received: one
                 C: Received: two
                 C: .
                 S: 554 5.4.6 Too many hops, mail loop detected
                 {txn}
                 C: Received: one
                 C:
                 C: Received: in body
                 C: .
                 S: 250 2.0.0 Ok queued as Q1
                 ",
                big = "y".repeat(1000),
            )),
        );
        assert_eq!(run.delivered.len(), 1);
    }

    #[test]
    fn storage_failure_is_relayed_and_transaction_reset() {
        check(
            &cfg(),
            &session(
                "C: MAIL FROM:<a@b.example>
                 C: RCPT TO:<tempfail@example.org>
                 C: DATA
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 354 End data with <CR><LF>.<CR><LF>
                 C: x
                 C: .
                 C: RCPT TO:<u@example.org>
                 S: 451 4.3.0 Storage failed
                 S: 503 5.5.1 Need MAIL command",
            ),
        );
    }

    #[test]
    fn too_many_recipients() {
        let two = InboundConfig {
            max_recipients: 2,
            ..cfg()
        };
        let run = check(
            &two,
            "S: 220 mx.example ESMTP turnpike
             C: EHLO c
             S: 250-mx.example
             S: 250-PIPELINING
             S: 250-SIZE 1000
             S: 250-8BITMIME
             S: 250-SMTPUTF8
             S: 250-ENHANCEDSTATUSCODES
             S: 250-CHUNKING
             S: 250 DSN
             C: MAIL FROM:<a@b.example>
             C: RCPT TO:<u1@example.org>
             C: RCPT TO:<u2@example.org>
             C: RCPT TO:<u3@example.org>
             C: BDAT 3 LAST
             C: x
             S: 250 2.1.0 Ok
             S: 250 2.1.5 Ok
             S: 250 2.1.5 Ok
             S: 452 4.5.3 Too many recipients
             S: 250 2.0.0 Ok queued as Q1",
        );
        assert_eq!(run.delivered[0].envelope.recipients.len(), 2);
    }

    #[test]
    fn pipelining_sync_violations_close_the_session() {
        // Message content sent before the 354 (the smuggling prerequisite).
        let run = check_whole(
            &cfg(),
            &session(
                "C: MAIL FROM:<a@b.example>
                 C: RCPT TO:<u@example.org>
                 C: DATA
                 C: early body
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 554 5.5.0 Protocol synchronization error: input pipelined",
            ),
        );
        assert!(run.closed && run.delivered.is_empty());
        // Commands pipelined behind EHLO, and in a session where PIPELINING was not offered.
        check_whole(
            &cfg(),
            "S: 220 mx.example ESMTP turnpike
             C: EHLO c
             C: MAIL FROM:<a@b.example>
             S: 554 5.5.0 Protocol synchronization error: input pipelined",
        );
        check_whole(
            &cfg(),
            "S: 220 mx.example ESMTP turnpike
             C: HELO c
             S: 250 mx.example
             C: MAIL FROM:<a@b.example>
             C: RCPT TO:<u@example.org>
             S: 554 5.5.0 Protocol synchronization error: input pipelined",
        );
        let no_pipelining = InboundConfig {
            pipelining: false,
            ..cfg()
        };
        check_whole(
            &no_pipelining,
            "S: 220 mx.example ESMTP turnpike
             C: EHLO c
             S: 250-mx.example
             S: 250-SIZE 1000
             S: 250-8BITMIME
             S: 250-SMTPUTF8
             S: 250-ENHANCEDSTATUSCODES
             S: 250-CHUNKING
             S: 250 DSN
             C: RSET
             C: NOOP
             S: 554 5.5.0 Protocol synchronization error: input pipelined",
        );
    }

    #[test]
    fn starttls_resets_the_session() {
        let tls = InboundConfig {
            tls_available: true,
            ..cfg()
        };
        let ehlo_tls = "C: EHLO c
             S: 250-mx.example
             S: 250-PIPELINING
             S: 250-SIZE 1000
             S: 250-8BITMIME
             S: 250-SMTPUTF8
             S: 250-ENHANCEDSTATUSCODES
             S: 250-CHUNKING
             S: 250-STARTTLS
             S: 250 DSN";
        let run = check_whole(
            &tls,
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 C: STARTTLS
                 S: 503 5.5.1 Send EHLO first
                 {ehlo_tls}
                 C: MAIL FROM:<a@b.example>
                 C: STARTTLS
                 S: 250 2.1.0 Ok
                 S: 503 5.5.1 Mail transaction in progress
                 C: RSET
                 S: 250 2.0.0 Ok
                 C: STARTTLS
                 S: 220 2.0.0 Ready to start TLS
                 C: MAIL FROM:<a@b.example>
                 S: 503 5.5.1 Send EHLO or HELO first
                 C: EHLO c
                 S: 250-mx.example
                 S: 250-PIPELINING
                 S: 250-SIZE 1000
                 S: 250-8BITMIME
                 S: 250-SMTPUTF8
                 S: 250-ENHANCEDSTATUSCODES
                 S: 250-CHUNKING
                 S: 250 DSN
                 C: STARTTLS
                 S: 503 5.5.1 TLS already active
                 C: MAIL FROM:<a@b.example>
                 C: RCPT TO:<u@example.org>
                 C: BDAT 3 LAST
                 C: x
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 250 2.0.0 Ok queued as Q1"
            ),
        );
        assert!(run.tls_started);
        assert_eq!(run.delivered[0].protocol, "ESMTPS");
        // Plaintext pipelined behind STARTTLS: refuse TLS altogether (injection defence).
        let run = check_whole(
            &tls,
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 {ehlo_tls}
                 C: STARTTLS
                 C: MAIL FROM:<injected@evil.example>
                 S: 554 5.5.0 Protocol synchronization error: input pipelined after STARTTLS"
            ),
        );
        assert!(run.closed && !run.tls_started);
    }

    #[test]
    fn error_limit_closes_with_421() {
        let strict = InboundConfig {
            max_errors: 2,
            ..cfg()
        };
        let run = check(
            &strict,
            "S: 220 mx.example ESMTP turnpike
             C: FROB
             S: 500 5.5.2 Syntax error, command unrecognized
             C: RCPT TO:<u@example.org>
             S: 503 5.5.1 Send EHLO or HELO first
             C: DATA
             S: 503 5.5.1 Send EHLO or HELO first
             S: 421 4.7.0 mx.example Too many errors, closing connection
             C: NOOP",
        );
        assert!(run.closed);
    }

    #[test]
    fn no_progress_limit_closes_with_421() {
        let strict = InboundConfig {
            max_commands_without_progress: 3,
            ..cfg()
        };
        check(
            &strict,
            "S: 220 mx.example ESMTP turnpike
             C: HELO c
             S: 250 mx.example
             C: NOOP
             S: 250 2.0.0 Ok
             C: MAIL FROM:<a@b.example>
             S: 250 2.1.0 Ok
             C: RSET
             S: 250 2.0.0 Ok
             C: NOOP
             S: 250 2.0.0 Ok
             C: VRFY x
             S: 252 2.5.0 Cannot verify, but will accept and attempt delivery
             C: HELP
             S: 214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS
             S: 421 4.7.0 mx.example Too many commands without progress, closing connection",
        );
    }

    #[test]
    fn timeout_and_closed_machine() {
        let mut m = Inbound::new(cfg());
        m.output().clear();
        assert_eq!(m.handle_input(b"EHLO c\r\n", &Dir), 8);
        m.output().clear();
        assert_eq!(m.handle_input(b"MAIL FROM:<a@b.example>\r\nRCPT", &Dir), 25);
        m.timed_out();
        assert_eq!(
            String::from_utf8_lossy(m.output()),
            "250 2.1.0 Ok\r\n421 4.4.2 mx.example Idle timeout, closing connection\r\n"
        );
        assert!(matches!(m.poll_action(), Some(Action::Close)));
        assert!(m.poll_action().is_none());
        assert!(m.is_closed());
        assert_eq!(m.handle_input(b"RCPT TO:<u@example.org>\r\n", &Dir), 0);
        m.timed_out();
        assert!(m.poll_action().is_none());
    }

    #[test]
    fn a_slow_body_is_cut_off_and_nothing_is_delivered() {
        for (start, body) in [
            (&b"DATA\r\n"[..], &b"Subject: x\r\n\r\npart"[..]),
            (&b"BDAT 100 LAST\r\n"[..], &b"Subject: x\r\n"[..]),
        ] {
            let mut m = Inbound::new(cfg());
            assert_eq!(m.handle_input(b"EHLO c\r\n", &Dir), 8);
            let input = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n";
            assert_eq!(m.handle_input(input, &Dir), input.len());
            assert!(!m.is_reading_body());
            assert_eq!(m.handle_input(start, &Dir), start.len());
            assert!(m.is_reading_body());
            assert_eq!(m.handle_input(body, &Dir), body.len());
            assert!(m.is_reading_body());
            m.output().clear();
            m.data_too_slow();
            assert_eq!(
                String::from_utf8_lossy(m.output()),
                "421 4.4.2 mx.example Data transfer too slow, closing connection\r\n"
            );
            assert!(matches!(m.poll_action(), Some(Action::Close)));
            assert!(m.poll_action().is_none(), "no Deliver");
            assert!(!m.is_reading_body());
            m.data_too_slow();
            assert!(m.poll_action().is_none());
        }
    }

    #[test]
    fn deliver_holds_pipelined_input_until_stored() {
        let mut m = Inbound::new(cfg());
        let input = b"EHLO c\r\n";
        assert_eq!(m.handle_input(input, &Dir), input.len());
        let input = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n";
        assert_eq!(m.handle_input(input, &Dir), input.len());
        m.output().clear();
        let input = b"hi\r\n.\r\nQUIT\r\n";
        assert_eq!(m.handle_input(input, &Dir), 7, "QUIT must wait for the 250");
        assert!(m.output().is_empty());
        assert_eq!(m.handle_input(b"QUIT\r\n", &Dir), 0);
        let Some(Action::Deliver(incoming)) = m.poll_action() else {
            panic!("no delivery")
        };
        assert_eq!(incoming.body, b"hi\r\n");
        m.stored(Ok("ABC".into()));
        assert_eq!(m.handle_input(b"QUIT\r\n", &Dir), 6);
        assert_eq!(
            String::from_utf8_lossy(m.output()),
            "250 2.0.0 Ok queued as ABC\r\n221 2.0.0 Bye\r\n"
        );
    }

    fn context(tls: bool, unix_time: u64) -> SessionContext {
        SessionContext {
            random: [1; 32],
            unix_time,
            tls_exporter: tls.then_some([0xab; 32]),
            peer_identity: tls.then(|| "CN=gw.customer.example".into()),
        }
    }

    fn odmr_setup(tls: bool, allow_plaintext_auth: bool) -> Setup {
        Setup {
            cfg: InboundConfig {
                tls_available: true,
                tls_active: tls,
                ..cfg()
            },
            odmr: Some((
                OdmrConfig {
                    scram_iterations: 16,
                    allow_plaintext_auth,
                    ..OdmrConfig::new([7; 32])
                },
                context(tls, 1_700_000_000),
            )),
            submission: false,
        }
    }

    const ODMR_EHLO: &str = "
        S: 220 mx.example ESMTP turnpike
        C: EHLO customer.example
        S: 250-mx.example
        S: 250-PIPELINING
        S: 250-SIZE 1000
        S: 250-8BITMIME
        S: 250-SMTPUTF8
        S: 250-ENHANCEDSTATUSCODES
        S: 250-CHUNKING
        S: 250-DSN
        S: 250-AUTH SCRAM-SHA-256-PLUS SCRAM-SHA-256 EXTERNAL CRAM-MD5 PLAIN LOGIN
        S: 250 ATRN";

    fn b64(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn odmr_session(rest: &str) -> String {
        format!("{ODMR_EHLO}\n{rest}")
    }

    fn dn(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    #[test]
    fn odmr_auth_then_atrn_reverses() {
        let run = check_in(
            &odmr_setup(true, false),
            &odmr_session(&format!(
                "C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: ATRN example.org,Example.NET
                 S: 250 2.0.0 OK, turning around",
                plain = b64("\0user\0pencil")
            )),
        );
        assert!(run.reversed && !run.closed);
        let account = String::from("user");
        assert_eq!(
            run.events,
            [
                OdmrEvent::AuthSucceeded {
                    account: account.clone()
                },
                OdmrEvent::Atrn {
                    account,
                    domains: vec![dn("example.org"), dn("example.net")]
                },
                OdmrEvent::Reverse,
            ]
        );
    }

    #[test]
    fn odmr_offers_depend_on_tls() {
        let ehlo = |auth: &str| {
            format!(
                "C: EHLO c
                 S: 250-mx.example
                 S: 250-PIPELINING
                 S: 250-SIZE 1000
                 S: 250-8BITMIME
                 S: 250-SMTPUTF8
                 S: 250-ENHANCEDSTATUSCODES
                 S: 250-CHUNKING
                 S: 250-DSN
                 S: 250-AUTH {auth}
                 S: 250-ATRN
                 S: 250 STARTTLS"
            )
        };
        let plain = b64("\0user\0pencil");
        // Mechanisms that send the password hidden and refused with 538 (CRAM-MD5 and SCRAM
        // never do, so they are offered); after STARTTLS all are offered.
        let run = check_whole_in(
            &odmr_setup(false, false),
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 {ehlo}
                 C: AUTH PLAIN {plain}
                 S: 538 5.7.11 Encryption required for requested authentication mechanism
                 C: AUTH LOGIN
                 S: 538 5.7.11 Encryption required for requested authentication mechanism
                 C: AUTH SCRAM-SHA-256-PLUS
                 S: 538 5.7.11 Encryption required for requested authentication mechanism
                 C: AUTH EXTERNAL =
                 S: 504 5.5.4 Unrecognized authentication type
                 C: STARTTLS
                 S: 220 2.0.0 Ready to start TLS
                 {ehlo_tls}
                 C: AUTH EXTERNAL =
                 S: 235 2.7.0 Authentication successful",
                ehlo = ehlo("SCRAM-SHA-256 CRAM-MD5"),
                ehlo_tls = ODMR_EHLO.replace("S: 220 mx.example ESMTP turnpike", ""),
            ),
        );
        // cram_md5_requires_tls: CRAM-MD5 too is hidden and refused until STARTTLS.
        let mut strict = odmr_setup(false, false);
        if let Some((odmr, _)) = strict.odmr.as_mut() {
            odmr.cram_md5_requires_tls = true;
        }
        check_whole_in(
            &strict,
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 {ehlo}
                 C: AUTH CRAM-MD5
                 S: 538 5.7.11 Encryption required for requested authentication mechanism",
                ehlo = ehlo("SCRAM-SHA-256"),
            ),
        );
        assert!(run.tls_started);
        // Allowed without TLS: offered and accepted; STARTTLS then forgets the login.
        check_whole_in(
            &odmr_setup(false, true),
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 {ehlo}
                 C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: STARTTLS
                 S: 220 2.0.0 Ready to start TLS
                 C: EHLO c
                 S: 250-mx.example
                 S: 250-PIPELINING
                 S: 250-SIZE 1000
                 S: 250-8BITMIME
                 S: 250-SMTPUTF8
                 S: 250-ENHANCEDSTATUSCODES
                 S: 250-CHUNKING
                 S: 250-DSN
                 S: 250-AUTH SCRAM-SHA-256-PLUS SCRAM-SHA-256 EXTERNAL CRAM-MD5 PLAIN LOGIN
                 S: 250 ATRN
                 C: ATRN
                 S: 530 5.7.0 Authentication required",
                ehlo = ehlo("SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"),
            ),
        );
    }

    #[test]
    fn odmr_auth_replies() {
        check_in(
            &odmr_setup(true, false),
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 C: AUTH PLAIN {plain}
                 S: 503 5.5.1 Send EHLO first
                 {ehlo}
                 C: AUTH GSSAPI
                 S: 504 5.5.4 Unrecognized authentication type
                 C: AUTH PLAIN
                 S: 334 {empty}
                 C: *
                 S: 501 5.0.0 Authentication cancelled
                 C: AUTH PLAIN %%%
                 S: 501 5.5.2 Invalid base64 data
                 C: AUTH PLAIN {malformed}
                 S: 501 5.5.2 Malformed authentication response
                 C: AUTH PLAIN {wrong}
                 S: 535 5.7.8 Authentication credentials invalid
                 C: AUTH LOGIN
                 S: 334 VXNlcm5hbWU6
                 C: {user}
                 S: 334 UGFzc3dvcmQ6
                 C: {pencil}
                 S: 235 2.7.0 Authentication successful
                 C: AUTH PLAIN {plain}
                 S: 503 5.5.1 Already authenticated",
                ehlo = ODMR_EHLO.replace("S: 220 mx.example ESMTP turnpike", ""),
                plain = b64("\0user\0pencil"),
                malformed = b64("user"),
                wrong = b64("\0user\0wrong"),
                user = b64("user"),
                pencil = b64("pencil"),
                empty = "",
            ),
        );
    }

    #[test]
    fn odmr_cram_md5_and_scram_plus_exchanges() {
        let enc = |b: &[u8]| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(b)
        };
        // Attempt 1: CRAM-MD5, with the challenge derived from the context's random bytes.
        let r1 = attempt_random(&[1; 32], 1);
        let n = u64::from_be_bytes(r1[..8].try_into().unwrap());
        let challenge = format!("<{n}.1700000000@mx.example>");
        // Attempt 2 (after a failure): SCRAM-SHA-256-PLUS bound to the exporter bytes.
        let r2 = attempt_random(&[1; 32], 2);
        let bare = "n=user,r=cnonce";
        let server_first = format!("r=cnonce{},s={},i=16", enc(&r2), enc(b"salt"));
        let mut cbind = b"p=tls-exporter,,".to_vec();
        cbind.extend_from_slice(&[0xab; 32]);
        let without_proof = format!("c={},r=cnonce{}", enc(&cbind), enc(&r2));
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let keys = sasl::scram::ClientKeys::derive(b"pencil", b"salt", 16);
        let proof = keys.client_proof(auth_message.as_bytes());
        let server_signature = keys.server_signature(auth_message.as_bytes());
        let run = check_in(
            &odmr_setup(true, false),
            &odmr_session(&format!(
                "C: AUTH CRAM-MD5
                 S: 334 {challenge_b64}
                 C: {bad_response}
                 S: 535 5.7.8 Authentication credentials invalid
                 C: AUTH SCRAM-SHA-256-PLUS {client_first}
                 S: 334 {server_first_b64}
                 C: {client_final}
                 S: 334 {server_final}
                 C:
                 S: 235 2.7.0 Authentication successful",
                challenge_b64 = b64(&challenge),
                bad_response = b64(&format!("user {}", cram_digest(b"<other>"))),
                client_first = b64(&format!("p=tls-exporter,,{bare}")),
                server_first_b64 = b64(&server_first),
                client_final = b64(&format!("{without_proof},p={}", enc(&proof))),
                server_final = b64(&format!("v={}", enc(&server_signature))),
            )),
        );
        assert_eq!(
            run.events[0],
            OdmrEvent::AuthFailed {
                account: Some("user".into())
            }
        );
        // And the good CRAM-MD5 response, on a fresh connection.
        check_in(
            &odmr_setup(true, false),
            &odmr_session(&format!(
                "C: AUTH CRAM-MD5
                 S: 334 {challenge_b64}
                 C: {response}
                 S: 235 2.7.0 Authentication successful",
                challenge_b64 = b64(&challenge),
                response = b64(&format!("user {}", cram_digest(challenge.as_bytes()))),
            )),
        );
    }

    #[test]
    fn odmr_auth_failure_limit_and_throttle() {
        let run = check_in(
            &odmr_setup(true, false),
            &odmr_session(&format!(
                "C: AUTH PLAIN {wrong}
                 S: 535 5.7.8 Authentication credentials invalid
                 C: AUTH PLAIN {locked}
                 S: 454 4.7.0 Temporary authentication failure, try again later
                 C: AUTH PLAIN {unknown}
                 S: 535 5.7.8 Authentication credentials invalid
                 S: 421 4.7.0 mx.example Too many authentication failures, closing connection",
                wrong = b64("\0user\0wrong"),
                locked = b64("\0locked\0pencil"),
                unknown = b64("\0nobody\0pencil"),
            )),
        );
        assert!(run.closed);
        assert_eq!(
            run.events,
            [
                OdmrEvent::AuthFailed {
                    account: Some("user".into())
                },
                OdmrEvent::AuthSucceeded {
                    account: "locked".into()
                },
                OdmrEvent::AuthFailed {
                    account: Some("nobody".into())
                },
            ]
        );
        let run = check_in(
            &odmr_setup(true, false),
            &odmr_session(&format!(
                "C: AUTH PLAIN {banned}
                 S: 421 4.7.0 mx.example Too many authentication failures, closing connection",
                banned = b64("\0banned\0wrong"),
            )),
        );
        assert!(run.closed);
    }

    #[test]
    fn odmr_atrn_replies() {
        let run = check_in(
            &odmr_setup(true, false),
            &odmr_session(
                "C: ATRN example.org
                 S: 530 5.7.0 Authentication required
                 C: AUTH EXTERNAL =
                 S: 235 2.7.0 Authentication successful
                 C: ATRN a.example, b.example
                 S: 501 5.5.4 Syntax error in parameters or arguments
                 C: ATRN localhost
                 S: 501 5.5.4 Syntax error in parameters or arguments
                 C: ATRN a.example,
                 S: 501 5.5.4 Syntax error in parameters or arguments
                 C: ATRN other.example,example.org
                 S: 450 4.7.1 Not authorized for other.example
                 C: ATRN empty.example
                 S: 453 4.3.0 You have no mail
                 C: ATRN busy.example
                 S: 451 4.3.0 busy.example is being served by another session
                 C: ATRN often.example
                 S: 450 4.7.0 ATRN requested too often, try later
                 C: ATRN down.example
                 S: 451 4.3.0 Unable to process ATRN request now
                 C: ATRN
                 S: 250 2.0.0 OK, turning around",
            ),
        );
        assert!(run.reversed);
        assert_eq!(
            run.events.iter().rev().nth(1),
            Some(&OdmrEvent::Atrn {
                account: "user".into(),
                domains: vec![]
            })
        );
    }

    #[test]
    fn odmr_refuses_mail_before_auth_and_other_commands() {
        check_in(
            &odmr_setup(true, false),
            &odmr_session(
                "C: HELO c
                 S: 502 5.5.1 Command not implemented
                 C: MAIL FROM:<a@b.example>
                 S: 530 5.7.0 Authentication required
                 C: RCPT TO:<u@example.org>
                 S: 530 5.7.0 Authentication required
                 C: DATA
                 S: 530 5.7.0 Authentication required
                 C: BDAT 6 LAST
                 C: QUIT
                 S: 530 5.7.0 Authentication required
                 C: VRFY x
                 S: 502 5.5.1 Command not implemented
                 C: ETRN example.org
                 S: 502 5.5.1 Command not implemented
                 C: HELP
                 S: 214 2.0.0 Commands: EHLO AUTH MAIL RCPT DATA BDAT ATRN STARTTLS RSET NOOP QUIT HELP
                 C: NOOP
                 S: 250 2.0.0 Ok
                 C: RSET
                 S: 250 2.0.0 Ok
                 C: QUIT
                 S: 221 2.0.0 Bye",
            ),
        );
    }

    #[test]
    fn odmr_atrn_is_a_sync_point() {
        let plain = b64("\0user\0pencil");
        for script in [
            format!(
                "C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: ATRN
                 C: 220 injected greeting
                 S: 554 5.5.0 ATRN must not be pipelined"
            ),
            "C: ATRN example.org
             C: NOOP
             S: 554 5.5.0 ATRN must not be pipelined"
                .to_string(),
        ] {
            let run = check_whole_in(&odmr_setup(true, false), &odmr_session(&script));
            assert!(run.closed && !run.reversed);
        }
        // Bytes presented while the decision is pending: refused at the turnaround.
        let mut m = odmr_setup(true, false).machine();
        assert_eq!(m.handle_odmr_input(b"EHLO c\r\n", &Dir, &Creds), 8);
        let input = format!("AUTH PLAIN {plain}\r\n");
        assert_eq!(
            m.handle_odmr_input(input.as_bytes(), &Dir, &Creds),
            input.len()
        );
        assert!(matches!(
            m.poll_event(),
            Some(OdmrEvent::AuthSucceeded { .. })
        ));
        m.auth_checked(None);
        assert_eq!(m.account(), Some("user"));
        assert_eq!(m.handle_odmr_input(b"ATRN\r\n", &Dir, &Creds), 6);
        assert!(matches!(m.poll_event(), Some(OdmrEvent::Atrn { .. })));
        assert_eq!(m.handle_odmr_input(b"220 early\r\n", &Dir, &Creds), 0);
        m.output().clear();
        m.atrn_decided(AtrnDecision::Accepted);
        assert_eq!(m.output(), b"554 5.5.0 ATRN must not be pipelined\r\n");
        assert!(matches!(m.poll_action(), Some(Action::Close)));
        assert!(m.is_closed() && !m.is_reversed() && m.poll_event().is_none());
        // A timeout while the decision is pending withdraws it.
        let mut m = odmr_setup(true, false).machine();
        let _ = m.handle_odmr_input(b"EHLO c\r\n", &Dir, &Creds);
        let _ = m.handle_odmr_input(input.as_bytes(), &Dir, &Creds);
        assert!(m.poll_event().is_some());
        m.auth_checked(None);
        assert_eq!(m.handle_odmr_input(b"ATRN\r\n", &Dir, &Creds), 6);
        m.timed_out();
        assert!(m.poll_event().is_none() && m.is_closed());
        m.atrn_decided(AtrnDecision::Accepted);
        assert!(!m.is_reversed());
    }

    #[test]
    fn odmr_auth_and_atrn_inside_a_transaction() {
        // MAIL is refused on the ODMR port for now, so the transaction is set up directly.
        let txn = || Phase::AwaitRcpt(Box::new(Transaction::new(Envelope::default(), None)));
        let plain = b64("\0user\0pencil");
        let mut m = odmr_setup(true, false).machine();
        let _ = m.handle_odmr_input(b"EHLO c\r\n", &Dir, &Creds);
        m.phase = txn();
        m.output().clear();
        let input = format!("AUTH PLAIN {plain}\r\n");
        let _ = m.handle_odmr_input(input.as_bytes(), &Dir, &Creds);
        assert_eq!(m.output(), b"503 5.5.1 Mail transaction in progress\r\n");
        m.phase = Phase::AwaitMail;
        let _ = m.handle_odmr_input(input.as_bytes(), &Dir, &Creds);
        assert!(m.poll_event().is_some());
        m.auth_checked(None);
        m.phase = txn();
        m.output().clear();
        let _ = m.handle_odmr_input(b"ATRN\r\n", &Dir, &Creds);
        assert_eq!(m.output(), b"503 5.5.1 Mail transaction in progress\r\n");
        assert_eq!(m.mode(), Mode::Odmr);
        assert_eq!(Inbound::new(cfg()).mode(), Mode::Mx);
    }

    // -----------------------------------------------------------------------------------------
    // Authenticated submission: ODMR before ATRN, and the submission listeners
    // -----------------------------------------------------------------------------------------

    fn submission_setup(tls: bool, allow_plaintext_auth: bool) -> Setup {
        Setup {
            submission: true,
            ..odmr_setup(tls, allow_plaintext_auth)
        }
    }

    const SUBMISSION_EHLO_TLS: &str = "
        S: 220 mx.example ESMTP turnpike
        C: EHLO laptop.example
        S: 250-mx.example
        S: 250-PIPELINING
        S: 250-SIZE 1000
        S: 250-8BITMIME
        S: 250-SMTPUTF8
        S: 250-ENHANCEDSTATUSCODES
        S: 250-CHUNKING
        S: 250-DSN
        S: 250 AUTH SCRAM-SHA-256-PLUS SCRAM-SHA-256 EXTERNAL CRAM-MD5 PLAIN LOGIN";

    #[test]
    fn odmr_takes_mail_after_auth_then_atrn_still_works() {
        let run = check_in(
            &odmr_setup(true, false),
            &odmr_session(&format!(
                "C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: MAIL FROM:<me@example.org>
                 C: RCPT TO:<u@example.org>
                 C: RCPT TO:<x@foreign.example>
                 C: DATA
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 250 2.1.5 Ok
                 S: 354 End data with <CR><LF>.<CR><LF>
                 C: Subject: out
                 C:
                 C: body
                 C: .
                 S: 250 2.0.0 Ok queued as Q1
                 C: MAIL FROM:<>
                 C: RCPT TO:<y@foreign.example>
                 C: BDAT 5 LAST
                 C: x\\ny
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 550 5.5.2 Message refused: bare CR or LF, lines must end in CRLF
                 C: MAIL FROM:<>
                 C: RCPT TO:<y@foreign.example>
                 C: BDAT 4 LAST
                 C: ok
                 S: 250 2.1.0 Ok
                 S: 250 2.1.5 Ok
                 S: 250 2.0.0 Ok queued as Q2
                 C: ATRN
                 S: 250 2.0.0 OK, turning around",
                plain = b64("\0user\0pencil")
            )),
        );
        assert!(run.reversed && !run.closed);
        assert_eq!(run.delivered.len(), 2);
        let first = &run.delivered[0];
        assert_eq!(first.account.as_deref(), Some("user"));
        assert_eq!(first.protocol, "ESMTPSA");
        assert_eq!(first.body, b"Subject: out\r\n\r\nbody\r\n");
        let rcpts: Vec<String> = first
            .envelope
            .recipients
            .iter()
            .map(|r| r.mailbox.to_string())
            .collect();
        assert_eq!(rcpts, ["u@example.org", "x@foreign.example"]);
        assert_eq!(run.delivered[1].envelope.sender, None);
        assert_eq!(run.delivered[1].body, b"ok\r\n");
    }

    #[test]
    fn odmr_atrn_inside_a_submitted_transaction_is_503() {
        check_in(
            &odmr_setup(true, false),
            &odmr_session(&format!(
                "C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: MAIL FROM:<me@example.org>
                 S: 250 2.1.0 Ok
                 C: ATRN
                 S: 503 5.5.1 Mail transaction in progress
                 C: RSET
                 S: 250 2.0.0 Ok
                 C: ATRN
                 S: 250 2.0.0 OK, turning around",
                plain = b64("\0user\0pencil")
            )),
        );
    }

    #[test]
    fn submission_policy_replies_leave_the_session_usable() {
        for setup in [odmr_setup(true, false), submission_setup(true, false)] {
            let run = check_in(
                &setup,
                &format!(
                    "S: 220 mx.example ESMTP turnpike
                     C: EHLO c
                     {ehlo}
                     C: AUTH PLAIN {plain}
                     S: 235 2.7.0 Authentication successful
                     C: MAIL FROM:<someone@elsewhere.example>
                     S: 553 5.7.1 Not your address
                     C: MAIL FROM:<limited@example.org>
                     S: 450 4.7.1 Message rate limit
                     C: MAIL FROM:<me@example.org>
                     C: RCPT TO:<a@example.org>
                     C: RCPT TO:<b@one.example>
                     C: RCPT TO:<full@example.org>
                     C: RCPT TO:<c@two.example>
                     C: RCPT TO:<d@three.example>
                     C: DATA
                     S: 250 2.1.0 Ok
                     S: 250 2.1.5 Ok
                     S: 250 2.1.5 Ok
                     S: 452 4.2.2 Mailbox full
                     S: 250 2.1.5 Ok
                     S: 452 4.5.3 Rate limit
                     S: 354 End data with <CR><LF>.<CR><LF>
                     C: x
                     C: .
                     S: 250 2.0.0 Ok queued as Q1",
                    // Everything but the greeting, whatever the mode offers.
                    ehlo = {
                        let r = drive(&setup, &[vec![b"EHLO c\r\n".as_slice()]]).output;
                        r.lines()
                            .skip(1)
                            .map(|l| format!("S: {l}\n"))
                            .collect::<String>()
                    },
                    plain = b64("\0user\0pencil"),
                ),
            );
            let rcpts: Vec<String> = run.delivered[0]
                .envelope
                .recipients
                .iter()
                .map(|r| r.mailbox.to_string())
                .collect();
            assert_eq!(rcpts, ["a@example.org", "b@one.example", "c@two.example"]);
        }
    }

    #[test]
    fn submission_offers_auth_not_atrn_and_wants_auth_for_mail() {
        let plain = b64("\0user\0pencil");
        check_in(
            &submission_setup(true, false),
            &format!(
                "{SUBMISSION_EHLO_TLS}
                 C: MAIL FROM:<me@example.org>
                 S: 530 5.7.0 Authentication required
                 C: RCPT TO:<a@example.org>
                 S: 530 5.7.0 Authentication required
                 C: BDAT 3 LAST
                 C: x
                 S: 530 5.7.0 Authentication required
                 C: ATRN
                 S: 502 5.5.1 Command not implemented
                 C: HELP
                 S: 214 2.0.0 Commands: EHLO HELO AUTH MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS
                 C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: MAIL FROM:<me@example.org>
                 S: 250 2.1.0 Ok
                 C: RCPT TO:<a@anywhere.example>
                 S: 250 2.1.5 Ok
                 C: QUIT
                 S: 221 2.0.0 Bye"
            ),
        );
        // HELO works too, and AUTH after it (RFC 6409 does not require EHLO).
        check_in(
            &submission_setup(true, false),
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 C: HELO laptop.example
                 S: 250 mx.example
                 C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: MAIL FROM:<me@example.org>
                 S: 250 2.1.0 Ok"
            ),
        );
    }

    #[test]
    fn submission_starttls_and_plaintext_policy() {
        let plain = b64("\0user\0pencil");
        let ehlo = |auth: &str| {
            format!(
                "C: EHLO c
                 S: 250-mx.example
                 S: 250-PIPELINING
                 S: 250-SIZE 1000
                 S: 250-8BITMIME
                 S: 250-SMTPUTF8
                 S: 250-ENHANCEDSTATUSCODES
                 S: 250-CHUNKING
                 S: 250-DSN
                 S: 250-AUTH {auth}
                 S: 250 STARTTLS"
            )
        };
        // Port 587 before STARTTLS: plaintext mechanisms hidden and refused; after it, offered.
        let run = check_whole_in(
            &submission_setup(false, false),
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 {ehlo}
                 C: AUTH PLAIN {plain}
                 S: 538 5.7.11 Encryption required for requested authentication mechanism
                 C: MAIL FROM:<me@example.org>
                 S: 530 5.7.0 Authentication required
                 C: STARTTLS
                 S: 220 2.0.0 Ready to start TLS
                 {ehlo_tls}
                 C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful",
                ehlo = ehlo("SCRAM-SHA-256 CRAM-MD5"),
                ehlo_tls = SUBMISSION_EHLO_TLS
                    .replace("S: 220 mx.example ESMTP turnpike", "")
                    .replace("EHLO laptop.example", "EHLO c"),
            ),
        );
        assert!(run.tls_started);
        // Plaintext allowed: AUTH before STARTTLS works, and STARTTLS forgets it.
        check_whole_in(
            &submission_setup(false, true),
            &format!(
                "S: 220 mx.example ESMTP turnpike
                 {ehlo}
                 C: AUTH PLAIN {plain}
                 S: 235 2.7.0 Authentication successful
                 C: STARTTLS
                 S: 220 2.0.0 Ready to start TLS
                 C: EHLO c
                 S: 250-mx.example
                 S: 250-PIPELINING
                 S: 250-SIZE 1000
                 S: 250-8BITMIME
                 S: 250-SMTPUTF8
                 S: 250-ENHANCEDSTATUSCODES
                 S: 250-CHUNKING
                 S: 250-DSN
                 S: 250 AUTH SCRAM-SHA-256-PLUS SCRAM-SHA-256 EXTERNAL CRAM-MD5 PLAIN LOGIN
                 C: MAIL FROM:<me@example.org>
                 S: 530 5.7.0 Authentication required",
                ehlo = ehlo("SCRAM-SHA-256 CRAM-MD5 PLAIN LOGIN"),
            ),
        );
        assert_eq!(
            submission_setup(true, false).machine().mode(),
            Mode::Submission
        );
    }

    #[test]
    fn submission_auth_failures_close_like_odmr() {
        let run = check_in(
            &submission_setup(true, false),
            &format!(
                "{SUBMISSION_EHLO_TLS}
                 C: AUTH PLAIN {wrong}
                 S: 535 5.7.8 Authentication credentials invalid
                 C: AUTH PLAIN {locked}
                 S: 454 4.7.0 Temporary authentication failure, try again later
                 C: AUTH PLAIN {wrong}
                 S: 535 5.7.8 Authentication credentials invalid
                 S: 421 4.7.0 mx.example Too many authentication failures, closing connection",
                wrong = b64("\0user\0wrong"),
                locked = b64("\0locked\0pencil"),
            ),
        );
        assert!(run.closed && run.delivered.is_empty());
    }
}
