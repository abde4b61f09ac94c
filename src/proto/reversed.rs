//! The reversed-session SMTP client machine: the provider delivering held mail to the customer
//! after ATRN (RFC 2645 §5.3), over the same connection, as an RFC 5321 client with PIPELINING
//! (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), CHUNKING (RFC 3030),
//! DSN (RFC 3461) and ENHANCEDSTATUSCODES (RFC 2034, RFC 3463).
//!
//! Owns the client side of the conversation: which command is sent when, how every reply is
//! parsed and what it means for each recipient. It is sans-IO: reply bytes in, command bytes and
//! [`Action`]s out. It never holds a message body: the driver streams the stored bytes itself
//! when told to (`Action::SendBody`), so a message of any size costs the machine nothing.
//!
//! # Contract
//!
//! The driver owns the socket (TLS, if any, is already up and is never restarted: STARTTLS in
//! the customer's EHLO reply is ignored, PROTOCOL.md §1.2) and a read buffer, and loops:
//!
//! 1. Write [`Reversed::output`] to the customer, then clear it.
//! 2. Read, append to the buffer, call [`Reversed::handle_input`] and drop the number of bytes
//!    it returns from the front of the buffer. Unconsumed bytes are an incomplete reply line or
//!    bytes that arrived while no reply is awaited; present them again on the next call.
//! 3. Call [`Reversed::poll_action`] until it returns `None` and obey each action:
//!    - [`Action::NeedMessage`]: call [`Reversed::send`] with the next held message (only the
//!      recipients of the domains this session leased), or [`Reversed::no_more`] when the
//!      queue is drained (the machine then sends QUIT and closes after the reply). In the
//!      window (below) NeedMessage also comes while earlier messages are in flight
//!      ([`Reversed::in_flight`]); `no_more` then only stops the asking, and NeedMessage
//!      comes once more when every message is reported, so the driver can settle its
//!      bookkeeping before it calls `no_more` again (QUIT), `keepalive` or `send`.
//!    - [`Action::SendBody`]: write the output (for BDAT it already ends with
//!      `BDAT <size> LAST`), then stream the stored body (buffering it behind the output and
//!      writing later is fine: only the byte order matters): untouched for
//!      [`BodyFraming::Bdat`]; through [`crate::proto::stuff::DotStuffer`] (push every chunk,
//!      then `finish`, which writes the `.` terminator) for [`BodyFraming::Data`]. Then call
//!      [`Reversed::body_sent`].
//!    - [`Action::Delivered`]: record the per-recipient outcome of one message (2xx: DONE
//!      delivered; 4xx: stays held; 5xx: DSN to the sender, DONE bounced).
//!    - [`Action::Close`]: write the output and close the connection.
//! 4. After any action or call, go back to step 1 and call `handle_input` with the bytes still
//!    buffered, even if no new ones arrived.
//!
//! **Abort.** If the connection fails, or a timeout of RFC 5321 §4.5.3.2 expires (the driver
//! owns the clock), call [`Reversed::abort`]. The message in flight, if any, is then reported
//! with every recipient that had no final answer as `Deferred`: nothing the customer has not
//! acknowledged is ever taken out of the hold. If the connection died after the body was sent
//! but before the final reply, the customer may have taken the message and will get it again
//! on the next ATRN: a duplicate, never a loss (RFC 1047).
//!
//! Every message given to [`Reversed::send`] gets exactly one [`Action::Delivered`] that names
//! every index of its `envelope.recipients` exactly once, whatever the customer does.
//!
//! # States
//!
//! Named for what they await.
//!
//! ```text
//!  new() -> AwaitGreeting --220--> AwaitEhlo --2xx--> Ready <--------------------------------+
//!                |  not 220          |   5xx                  | send()                       |
//!                v                   v                        v                              |
//!              Close            AwaitHelo --2xx--> Ready  prechecks --refused--> Delivered --+
//!                                                             | ok                           |
//!                                         MAIL (+ every RCPT when pipelining)                |
//!                                                             v                              |
//!                                               AwaitEnvelope (MAIL, RCPT... replies)        |
//!                                  none accepted |            | some accepted                |
//!                            Delivered, RSET     |   DATA     |   BDAT <n> LAST              |
//!                                                v     v      v                              |
//!                                       AwaitRset  AwaitGoAhead --354--> SendingBody         |
//!                                                |                           | body_sent()   |
//!                                                |                           v               |
//!                                                |                       AwaitFinal --reply--+
//!                                                +--------2xx------------------------------->+
//!  Ready --no_more()--> QUIT --> AwaitQuit --reply--> Close
//!
//!  With PIPELINING and CHUNKING, after EHLO: Window. Each send() writes
//!  [RSET] MAIL RCPT... BDAT n LAST (+ the body from the driver) and, while the window has
//!  room, NeedMessage comes again at once; replies are matched to the oldest flight's
//!  commands in order, and each flight is reported when its last reply is in.
//!
//!  any state --- 421, malformed reply, unexpected reply, abort() ---> Close
//! ```
//!
//! # Decisions (each has a test)
//!
//! - **Bounce, not downgrade.** A message with 8-bit content for a customer that did not offer
//!   8BITMIME is refused locally with `554 5.6.3` (RFC 6152 §3 allows either). Downgrading
//!   means rewriting MIME parts to quoted-printable or base64, which breaks DKIM signatures
//!   and needs a MIME parser in the hot path, and any customer MTA from this century offers
//!   8BITMIME. The same for non-ASCII addresses without SMTPUTF8 (`553 5.6.7`, RFC 6531 §3.2)
//!   and for a message over the customer's SIZE (`552 5.3.4`, RFC 1870 §6). These refusals
//!   send no bytes. `SIZE 0` means "no limit" (RFC 1870 §4).
//! - **The window: BDAT is pipelined with the envelope, and messages behind each other.**
//!   When the customer offers PIPELINING and CHUNKING (and both are allowed), MAIL, every
//!   RCPT and `BDAT <size> LAST` go out in one write with the body behind them (RFC 2920,
//!   RFC 3030 §4.2 allows BDAT in a pipeline), and the next message follows before the
//!   replies are in: up to [`WINDOW_MESSAGES`] messages, [`WINDOW_BYTES`] body bytes and
//!   [`WINDOW_COMMANDS`] commands. Replies are matched strictly in command order. A body over
//!   [`PIPELINE_BODY_MAX`] waits for its RCPT replies (no large transfer for a refused
//!   envelope) and nothing is written behind its envelope until then.
//! - In the window, a message whose recipients were all refused had its BDAT sent anyway: the
//!   customer must read the chunk and refuse it (503/554, RFC 3030 §4.2), and that reply is
//!   consumed without effect. Its transaction may stay open on the customer's side, so a
//!   message written while the previous one's recipients are unknown (or all refused) starts
//!   with RSET. One short command, never a round trip.
//! - Without the window (no PIPELINING or no CHUNKING): DATA or BDAT is sent only after every
//!   RCPT reply is in, and only if at least one recipient was accepted; otherwise RSET. DATA
//!   always waits for its 354.
//! - With PIPELINING offered (and allowed by [`ReversedConfig::pipelining`]), MAIL and all
//!   RCPTs go in one write; otherwise one command per round trip. After a refused MAIL the
//!   pipelined RCPT replies are read and ignored.
//! - DSN parameters (RET, ENVID, NOTIFY, ORCPT) are sent only to a customer offering DSN. The
//!   outcome says whether they were ([`MessageOutcome::dsn_relayed`]): if not, a recipient
//!   that asked for NOTIFY=SUCCESS is owed a "relayed" DSN by the caller (RFC 3461 §4.1).
//! - A reply that is not a well-formed RFC 5321 §4.2 reply (not three digits, bare LF or CR, a
//!   line over 4096 octets, a continuation with another code, more than 256 lines) or a reply
//!   class that makes no sense where it came (a 354 to MAIL, a 2xx to DATA) closes the session
//!   with [`CloseReason::Protocol`]; recipients without a final answer are `Deferred`.
//! - `421` at any point closes the session ([`CloseReason::ServiceClosing`]); recipients of
//!   the current message without a final answer are `Deferred` with that reply.
//! - A 5xx to EHLO falls back to HELO (RFC 5321 §4.1.4, §3.2), with no extensions.
//! - Enhanced status codes are parsed whenever a reply line starts with one whose class
//!   matches the reply code's first digit, offered or not (RFC 3463 §2).

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::fmt::Write as _;

use crate::proto::frame::{Frame, FrameError, Framer};
use crate::proto::reply::{split_reply_line, split_status, EnhancedStatus, Reply};
use crate::types::{BodyType, Envelope, Mailbox, Notify, Ret};

/// Longest reply line accepted, CRLF excluded (RFC 5321 §4.5.3.1.5 asks for 512; we are lax).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply.
pub const MAX_REPLY_LINES: usize = 256;

/// In the window, a body up to this size is written right behind its envelope (`BDAT n LAST`
/// pipelined); a larger one waits for its RCPT replies, so a refused envelope never costs a
/// large transfer, and is streamed in chunks.
pub const PIPELINE_BODY_MAX: u64 = 64 * 1024;
/// Most messages in the window (written, final reply not yet in).
pub const WINDOW_MESSAGES: usize = 64;
/// Most pipelined body bytes in the window (a message is always let into an empty window).
pub const WINDOW_BYTES: u64 = 1024 * 1024;
/// Most commands awaiting a reply in the window. Their replies must fit in our socket receive
/// buffer while we are busy writing, or both sides could block on a full buffer (RFC 2920
/// §3.1): 256 short replies are a few KiB.
pub const WINDOW_COMMANDS: usize = 256;

/// What the provider offers and allows in the reversed session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReversedConfig {
    /// Our name in EHLO/HELO.
    pub hostname: String,
    /// Pipeline MAIL and RCPT when the customer offers PIPELINING.
    pub pipelining: bool,
    /// Use BDAT when the customer offers CHUNKING.
    pub chunking: bool,
}

/// One held message offered to the machine after [`Action::NeedMessage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The caller's handle, opaque to the machine, echoed in actions.
    pub id: String,
    /// The envelope, with only the recipients this session may deliver (the caller filters
    /// by leased domain).
    pub envelope: Envelope,
    /// Octets of the stored body (canonical CRLF, unstuffed, our `Received:` in front).
    pub size: u64,
    /// The body has octets above 127.
    pub eight_bit: bool,
    /// Some address is non-ASCII (the machine also checks the envelope itself).
    pub utf8_addresses: bool,
}

/// How the driver must frame the body after [`Action::SendBody`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// `BDAT <size> LAST` is already in the output: send the stored bytes untouched.
    Bdat,
    /// The customer answered 354: send the body through the dot-stuffer and its terminator.
    Data,
}

/// The customer's answer for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The customer took responsibility (2xx after the body).
    Delivered,
    /// A transient failure: keep the recipient held.
    Deferred(Reply),
    /// A permanent failure: bounce (DSN to the sender).
    Failed(Reply),
}

/// The outcome of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageOutcome {
    /// [`Outgoing::id`].
    pub id: String,
    /// `(index in envelope.recipients, outcome)`, every index exactly once, in order.
    pub recipients: Vec<(usize, RcptOutcome)>,
    /// DSN parameters were passed on to the customer (it offered DSN).
    pub dsn_relayed: bool,
}

/// Why the session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// QUIT was answered (any well-formed reply ends the session).
    Done,
    /// The customer's greeting was not 220.
    Greeting(Reply),
    /// The customer sent 421.
    ServiceClosing(Reply),
    /// EHLO and HELO, or a RSET, were refused.
    Refused(Reply),
    /// The customer broke the protocol.
    Protocol(ProtocolError),
    /// The driver called [`Reversed::abort`].
    Aborted,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Done => f.write_str("session done"),
            CloseReason::Greeting(r) => write!(f, "customer greeting refused: {r}"),
            CloseReason::ServiceClosing(r) => write!(f, "customer closing: {r}"),
            CloseReason::Refused(r) => write!(f, "customer refused the session: {r}"),
            CloseReason::Protocol(e) => write!(f, "protocol error: {e}"),
            CloseReason::Aborted => f.write_str("aborted by the driver"),
        }
    }
}

/// How the customer broke the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A reply line failed framing (bare LF/CR, over [`MAX_REPLY_LINE`]).
    Framing(FrameError),
    /// A reply line does not start with three digits followed by SP, `-` or its end.
    Malformed,
    /// A continuation line has a different code than the first line.
    CodeMismatch,
    /// More than [`MAX_REPLY_LINES`] lines in one reply.
    TooManyLines,
    /// A reply code that makes no sense for the command it answers.
    Unexpected(u16),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Framing(e) => write!(f, "reply framing: {e}"),
            ProtocolError::Malformed => f.write_str("malformed reply line"),
            ProtocolError::CodeMismatch => f.write_str("multi-line reply changed its code"),
            ProtocolError::TooManyLines => f.write_str("too many lines in one reply"),
            ProtocolError::Unexpected(c) => write!(f, "unexpected reply code {c}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Something the driver must do; see the module-level contract.
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Call [`Reversed::send`] with the next message, or [`Reversed::no_more`].
    NeedMessage,
    /// Write the output, stream the body of message `id` with this framing, then call
    /// [`Reversed::body_sent`].
    SendBody {
        /// [`Outgoing::id`].
        id: String,
        /// How to frame it.
        framing: BodyFraming,
    },
    /// The final outcome of one message.
    Delivered(MessageOutcome),
    /// Write the output and close the connection.
    Close(CloseReason),
}

/// What the customer offered in its EHLO reply (RFC 5321 §4.1.1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The session is ESMTP (EHLO was accepted).
    pub esmtp: bool,
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE was offered (RFC 1870).
    pub size: bool,
    /// The SIZE limit; `None` when absent or 0 (no limit).
    pub size_limit: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eight_bit_mime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// CHUNKING (RFC 3030).
    pub chunking: bool,
    /// BINARYMIME (RFC 3030).
    pub binary_mime: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// STARTTLS (RFC 3207): noted, never used in the reversal.
    pub starttls: bool,
}

impl Capabilities {
    /// Parses the lines of a 250 EHLO reply (the first line is the greeting name).
    pub fn parse(reply: &Reply) -> Self {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => {
                    caps.size = true;
                    caps.size_limit = words
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .filter(|&n| n > 0);
                }
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "CHUNKING" => caps.chunking = true,
                "BINARYMIME" => caps.binary_mime = true,
                "DSN" => caps.dsn = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "STARTTLS" => caps.starttls = true,
                _ => {}
            }
        }
        caps
    }
}

/// Incremental reply parser: complete lines in, whole [`Reply`]s out.
#[derive(Debug, Clone)]
struct ReplyParser {
    framer: Framer,
    partial: Option<Reply>,
}

enum Parsed {
    /// Nothing complete yet; `consumed` bytes were used (whole lines of a multi-line reply).
    More {
        consumed: usize,
    },
    Reply {
        reply: Reply,
        consumed: usize,
    },
    Error(ProtocolError),
}

impl ReplyParser {
    fn new() -> Self {
        ReplyParser {
            framer: Framer::new(MAX_REPLY_LINE + 2),
            partial: None,
        }
    }

    fn parse(&mut self, buf: &[u8]) -> Parsed {
        let mut pos = 0;
        loop {
            let (line, consumed) = match self.framer.next_line(&buf[pos..]) {
                Frame::Incomplete => return Parsed::More { consumed: pos },
                Frame::Line { line, consumed } => (line, consumed),
                Frame::Invalid { error, .. } => {
                    return Parsed::Error(ProtocolError::Framing(error))
                }
                // Only after an Invalid, which ends the session.
                Frame::Skipped { .. } => return Parsed::Error(ProtocolError::Malformed),
            };
            pos += consumed;
            let Some((code, last, text)) = split_reply_line(line) else {
                return Parsed::Error(ProtocolError::Malformed);
            };
            let reply = self.partial.get_or_insert_with(|| Reply {
                code,
                status: None,
                lines: Vec::new(),
            });
            if reply.code != code {
                return Parsed::Error(ProtocolError::CodeMismatch);
            }
            if reply.lines.len() >= MAX_REPLY_LINES {
                return Parsed::Error(ProtocolError::TooManyLines);
            }
            let (status, rest) = split_status(code, text);
            if reply.lines.is_empty() {
                reply.status = status;
            }
            // A line whose status differs from the first line's keeps it as text.
            let text = if status.is_some() && status == reply.status {
                rest
            } else {
                text
            };
            reply
                .lines
                .push(Cow::Owned(String::from_utf8_lossy(text).into_owned()));
            if last {
                let reply = self.partial.take().expect("set above");
                return Parsed::Reply {
                    reply,
                    consumed: pos,
                };
            }
        }
    }
}

/// The message in flight.
#[derive(Debug)]
struct Txn {
    id: String,
    /// The RCPT lines still to be written (one at a time without pipelining).
    rcpt_lines: VecDeque<Vec<u8>>,
    /// Per recipient: `None` until the RCPT reply; `Some(Ok(()))` accepted at RCPT.
    results: Vec<Option<Result<(), RcptOutcome>>>,
    /// The MAIL reply, once in; `Err` when MAIL was refused.
    mail: Option<Result<(), Reply>>,
    /// RCPT replies received so far.
    rcpt_replies: usize,
    size: u64,
    dsn_relayed: bool,
}

impl Txn {
    /// The outcome: recipients without a final answer (accepted at RCPT, or never answered)
    /// get `pending`.
    fn outcome(self, pending: &RcptOutcome) -> MessageOutcome {
        let recipients = self
            .results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let o = match r {
                    Some(Err(o)) => o,
                    Some(Ok(())) | None => pending.clone(),
                };
                (i, o)
            })
            .collect();
        MessageOutcome {
            id: self.id,
            recipients,
            dsn_relayed: self.dsn_relayed,
        }
    }

    fn any_accepted(&self) -> bool {
        self.results.iter().any(|r| matches!(r, Some(Ok(()))))
    }
}

#[derive(Debug)]
enum Phase {
    AwaitGreeting,
    AwaitEhlo,
    AwaitHelo,
    /// NeedMessage was issued; waiting for `send` or `no_more`.
    Ready,
    /// MAIL and RCPT replies outstanding.
    AwaitEnvelope(Box<Txn>),
    /// DATA sent, waiting for 354.
    AwaitGoAhead(Box<Txn>),
    /// The driver is streaming the body.
    SendingBody(Box<Txn>),
    /// The reply after the body.
    AwaitFinal(Box<Txn>),
    AwaitRset,
    /// A keep-alive NOOP sent while idle (linger), waiting for its reply.
    AwaitNoop,
    /// PIPELINING and CHUNKING: messages travel in a window ([`Reversed::pipe`]), whose
    /// `asked` flag plays the part of `Ready`.
    Window,
    AwaitQuit,
    Closed,
}

/// Where the body of a windowed message stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    /// Large: `BDAT` waits until every envelope reply is in.
    Waiting,
    /// `SendBody` was issued; the driver has not called `body_sent` yet.
    Streaming,
    /// Written; the BDAT reply is due unless `bdat_answered`.
    Sent,
    /// Never sent (no recipient accepted).
    Skipped,
}

/// One message in the window. Its replies come in command order: RSET (if sent first), MAIL,
/// each RCPT, BDAT.
#[derive(Debug)]
struct Flight {
    txn: Box<Txn>,
    rset_due: bool,
    body: Body,
    bdat_answered: bool,
    /// The answer for the recipients accepted at RCPT, from the BDAT reply.
    settled: Option<RcptOutcome>,
    /// Commands written for it (for [`WINDOW_COMMANDS`]).
    commands: usize,
    /// Pipelined body bytes (for [`WINDOW_BYTES`]).
    bytes: u64,
}

/// The reply a flight awaits next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    Rset,
    Mail,
    Rcpt,
    Bdat,
}

impl Flight {
    fn envelope_complete(&self) -> bool {
        self.txn.mail.is_some() && self.txn.rcpt_replies >= self.txn.results.len()
    }

    fn next_due(&self) -> Option<Due> {
        if self.rset_due {
            Some(Due::Rset)
        } else if self.txn.mail.is_none() {
            Some(Due::Mail)
        } else if self.txn.rcpt_replies < self.txn.results.len() {
            Some(Due::Rcpt)
        } else if matches!(self.body, Body::Streaming | Body::Sent) && !self.bdat_answered {
            Some(Due::Bdat)
        } else {
            None
        }
    }
}

/// The window of messages in flight (PIPELINING and CHUNKING).
#[derive(Debug, Default)]
struct Pipe {
    /// Oldest first; replies are matched to the front.
    flights: VecDeque<Flight>,
    /// A NeedMessage is outstanding.
    asked: bool,
    /// `no_more` came while messages were in flight: ask once more when they are all settled.
    finishing: bool,
    /// The customer may hold an open transaction after our last command (a MAIL whose
    /// recipients were all refused, or whose replies are not in yet): the next MAIL goes
    /// behind a RSET.
    txn_open: bool,
    commands: usize,
    bytes: u64,
}

impl Pipe {
    /// Another message may be written now.
    fn has_room(&self) -> bool {
        let Some(back) = self.flights.back() else {
            return true;
        };
        !matches!(back.body, Body::Waiting | Body::Streaming)
            && self.flights.len() < WINDOW_MESSAGES
            && self.commands < WINDOW_COMMANDS
            && self.bytes < WINDOW_BYTES
    }

    /// A reply is due that may already have arrived.
    fn awaits_reply(&self) -> bool {
        self.flights.front().is_some_and(|f| match f.next_due() {
            Some(Due::Bdat) => f.body == Body::Sent,
            due => due.is_some(),
        })
    }
}

/// The reversed-session client machine for one connection.
#[derive(Debug)]
pub struct Reversed {
    cfg: ReversedConfig,
    phase: Phase,
    caps: Capabilities,
    parser: ReplyParser,
    out: Vec<u8>,
    actions: VecDeque<Action>,
    pipe: Pipe,
}

impl Reversed {
    /// A machine for a freshly reversed connection; it first awaits the customer's 220.
    pub fn new(cfg: ReversedConfig) -> Self {
        Reversed {
            cfg,
            phase: Phase::AwaitGreeting,
            caps: Capabilities::default(),
            parser: ReplyParser::new(),
            out: Vec::with_capacity(512),
            actions: VecDeque::new(),
            pipe: Pipe::default(),
        }
    }

    /// Consumes reply bytes and returns how many were used. Stops early, leaving the rest for
    /// a later call, when no reply is awaited (the machine waits for the driver) or a line is
    /// incomplete.
    pub fn handle_input(&mut self, input: &[u8]) -> usize {
        let mut pos = 0;
        while pos < input.len() && self.awaits_reply() {
            match self.parser.parse(&input[pos..]) {
                Parsed::More { consumed } => {
                    pos += consumed;
                    break;
                }
                Parsed::Reply { reply, consumed } => {
                    pos += consumed;
                    self.on_reply(reply);
                }
                Parsed::Error(e) => {
                    // The session ends; the rest of the input is meaningless.
                    pos = input.len();
                    self.fail(CloseReason::Protocol(e));
                }
            }
        }
        pos
    }

    /// The next thing the driver must do, if any.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Commands to send. The driver writes them and clears the buffer.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// What the customer offered (all false before its EHLO reply, or after HELO).
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// True once a Close has been queued.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Offers the next message after [`Action::NeedMessage`]. Called at any other time, the
    /// message is reported at once with every recipient `Deferred` (`451 4.3.0`), so the
    /// caller's accounting always sees one outcome per message.
    pub fn send(&mut self, msg: Outgoing) {
        if !self.is_ready() {
            let r = Reply::with_status(451, (4, 3, 0), "Session not ready for a message");
            let outcome = all(&msg, RcptOutcome::Deferred(r));
            self.actions.push_back(Action::Delivered(outcome));
            return;
        }
        if msg.envelope.recipients.is_empty() {
            self.actions
                .push_back(Action::Delivered(all(&msg, RcptOutcome::Delivered)));
            self.actions.push_back(Action::NeedMessage);
            return;
        }
        if let Some(refusal) = self.precheck(&msg) {
            let outcome = all(&msg, RcptOutcome::Failed(refusal));
            self.actions.push_back(Action::Delivered(outcome));
            self.actions.push_back(Action::NeedMessage);
            return;
        }
        let (mail, rcpts, dsn) = self.envelope_lines(&msg);
        let mut txn = Txn {
            id: msg.id,
            rcpt_lines: rcpts.into(),
            results: vec![None; msg.envelope.recipients.len()],
            mail: None,
            rcpt_replies: 0,
            size: msg.size,
            dsn_relayed: dsn,
        };
        if matches!(self.phase, Phase::Window) {
            return self.send_windowed(Box::new(txn), &mail);
        }
        self.out.extend_from_slice(&mail);
        if self.pipelining() {
            for line in txn.rcpt_lines.drain(..) {
                self.out.extend_from_slice(&line);
            }
        }
        self.phase = Phase::AwaitEnvelope(Box::new(txn));
    }

    /// The queue is drained: sends QUIT. Ignored unless a message was asked for.
    ///
    /// In the window (PIPELINING and CHUNKING), with messages still in flight it sends nothing
    /// yet: [`Action::NeedMessage`] comes once more when they are all settled, so the driver
    /// can finish its bookkeeping (or find new mail) first, then call `send`, `keepalive` or
    /// `no_more` again.
    pub fn no_more(&mut self) {
        if matches!(self.phase, Phase::Window) && self.pipe.asked {
            self.pipe.asked = false;
            if !self.pipe.flights.is_empty() {
                self.pipe.finishing = true;
                return;
            }
            self.phase = Phase::Ready;
        }
        if matches!(self.phase, Phase::Ready) {
            self.out.extend_from_slice(b"QUIT\r\n");
            self.phase = Phase::AwaitQuit;
        }
    }

    /// Messages written and not yet reported ([`Action::Delivered`]).
    pub fn in_flight(&self) -> usize {
        match &self.phase {
            Phase::Window => self.pipe.flights.len(),
            Phase::AwaitEnvelope(_)
            | Phase::AwaitGoAhead(_)
            | Phase::SendingBody(_)
            | Phase::AwaitFinal(_) => 1,
            _ => 0,
        }
    }

    /// While idle (after [`Action::NeedMessage`], nothing to send yet): sends `NOOP` so the
    /// customer's idle timer (RFC 5321 §4.5.3.2: 5 minutes) does not end a lingering session.
    /// A 2xx reply issues [`Action::NeedMessage`] again; anything else closes. Ignored in any
    /// other state.
    pub fn keepalive(&mut self) {
        if matches!(self.phase, Phase::Window) && self.pipe.asked && self.pipe.flights.is_empty() {
            self.pipe.asked = false;
            self.phase = Phase::Ready;
        }
        if matches!(self.phase, Phase::Ready) {
            self.out.extend_from_slice(b"NOOP\r\n");
            self.phase = Phase::AwaitNoop;
        }
    }

    /// The driver finished streaming the body after [`Action::SendBody`].
    pub fn body_sent(&mut self) {
        if matches!(self.phase, Phase::Window) {
            let streaming = self
                .pipe
                .flights
                .iter_mut()
                .rev()
                .find(|f| f.body == Body::Streaming);
            if let Some(f) = streaming {
                f.body = Body::Sent;
            }
            return self.window_advance();
        }
        self.phase = match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::SendingBody(txn) => Phase::AwaitFinal(txn),
            other => other,
        };
    }

    /// The connection failed or a timeout expired: reports the message in flight (recipients
    /// without a final answer `Deferred` with `451 4.4.2`) and queues Close. Idempotent.
    pub fn abort(&mut self) {
        if self.is_closed() {
            return;
        }
        let r = Reply::with_status(451, (4, 4, 2), "Connection lost or timed out");
        self.finish_txn(RcptOutcome::Deferred(r));
        self.close(CloseReason::Aborted);
    }

    fn awaits_reply(&self) -> bool {
        match self.phase {
            Phase::Ready | Phase::SendingBody(_) | Phase::Closed => false,
            Phase::Window => self.pipe.awaits_reply(),
            _ => true,
        }
    }

    /// A message may be sent now (a NeedMessage is outstanding).
    fn is_ready(&self) -> bool {
        match self.phase {
            Phase::Ready => true,
            Phase::Window => self.pipe.asked,
            _ => false,
        }
    }

    fn windowed(&self) -> bool {
        self.pipelining() && self.chunking()
    }

    fn pipelining(&self) -> bool {
        self.cfg.pipelining && self.caps.pipelining
    }

    fn chunking(&self) -> bool {
        self.cfg.chunking && self.caps.chunking
    }

    /// RFC 1870, RFC 6152, RFC 6531 checks: a refusal reply, or `None` to send.
    fn precheck(&self, msg: &Outgoing) -> Option<Reply> {
        let env = &msg.envelope;
        let unsendable = |s: &str| s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0));
        let bad_mailbox = |m: &Mailbox| unsendable(&m.local) || unsendable(&m.domain);
        if env.sender.as_ref().is_some_and(bad_mailbox)
            || env.envid.as_deref().is_some_and(unsendable)
            || env
                .recipients
                .iter()
                .any(|r| bad_mailbox(&r.mailbox) || r.orcpt.as_deref().is_some_and(unsendable))
        {
            return Some(Reply::with_status(
                554,
                (5, 6, 0),
                "Envelope cannot be serialised (CR, LF or NUL in a field)",
            ));
        }
        if self.caps.size_limit.is_some_and(|limit| msg.size > limit) {
            return Some(Reply::with_status(
                552,
                (5, 3, 4),
                "Message size exceeds the customer's SIZE limit",
            ));
        }
        if env.body == BodyType::BinaryMime && !(self.caps.binary_mime && self.chunking()) {
            return Some(Reply::with_status(
                554,
                (5, 6, 3),
                "Binary content and the customer does not offer BINARYMIME",
            ));
        }
        if msg.eight_bit && !self.caps.eight_bit_mime {
            return Some(Reply::with_status(
                554,
                (5, 6, 3),
                "8-bit content and the customer does not offer 8BITMIME",
            ));
        }
        if self.needs_utf8(msg) && !self.caps.smtputf8 {
            return Some(Reply::with_status(
                553,
                (5, 6, 7),
                "Non-ASCII address and the customer does not offer SMTPUTF8",
            ));
        }
        None
    }

    fn needs_utf8(&self, msg: &Outgoing) -> bool {
        let env = &msg.envelope;
        msg.utf8_addresses
            || env.smtputf8
            || env.sender.as_ref().is_some_and(Mailbox::is_utf8)
            || env.recipients.iter().any(|r| r.mailbox.is_utf8())
    }

    /// The MAIL line, the RCPT lines and whether DSN parameters were included.
    fn envelope_lines(&self, msg: &Outgoing) -> (Vec<u8>, Vec<Vec<u8>>, bool) {
        let env = &msg.envelope;
        let caps = &self.caps;
        let mut mail = String::from("MAIL FROM:<");
        if let Some(s) = &env.sender {
            let _ = write!(mail, "{s}");
        }
        mail.push('>');
        if caps.size {
            let _ = write!(mail, " SIZE={}", msg.size);
        }
        let body = match env.body {
            BodyType::BinaryMime => Some("BINARYMIME"),
            _ if caps.eight_bit_mime && (msg.eight_bit || env.body == BodyType::EightBitMime) => {
                Some("8BITMIME")
            }
            _ => None,
        };
        if let Some(b) = body {
            let _ = write!(mail, " BODY={b}");
        }
        if self.needs_utf8(msg) {
            mail.push_str(" SMTPUTF8");
        }
        if caps.dsn {
            match env.ret {
                Some(Ret::Full) => mail.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => mail.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(e) = &env.envid {
                let _ = write!(mail, " ENVID={e}");
            }
        }
        mail.push_str("\r\n");
        let rcpts = env
            .recipients
            .iter()
            .map(|r| {
                let mut line = format!("RCPT TO:<{}>", r.mailbox);
                if caps.dsn {
                    if let Some(n) = r.notify {
                        let _ = write!(line, " NOTIFY={}", notify_value(n));
                    }
                    if let Some(o) = &r.orcpt {
                        let _ = write!(line, " ORCPT={o}");
                    }
                }
                line.push_str("\r\n");
                line.into_bytes()
            })
            .collect();
        (mail.into_bytes(), rcpts, caps.dsn)
    }

    fn on_reply(&mut self, reply: Reply) {
        if reply.code == 421 {
            self.finish_txn(RcptOutcome::Deferred(reply.clone()));
            return self.close(CloseReason::ServiceClosing(reply));
        }
        match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::AwaitGreeting if reply.code == 220 => {
                self.out.extend_from_slice(b"EHLO ");
                self.out.extend_from_slice(self.cfg.hostname.as_bytes());
                self.out.extend_from_slice(b"\r\n");
                self.phase = Phase::AwaitEhlo;
            }
            Phase::AwaitGreeting => self.close(CloseReason::Greeting(reply)),
            Phase::AwaitEhlo if reply.code / 100 == 2 => {
                self.caps = Capabilities::parse(&reply);
                self.ready();
            }
            Phase::AwaitEhlo if reply.code / 100 == 5 => {
                self.out.extend_from_slice(b"HELO ");
                self.out.extend_from_slice(self.cfg.hostname.as_bytes());
                self.out.extend_from_slice(b"\r\n");
                self.phase = Phase::AwaitHelo;
            }
            Phase::AwaitHelo if reply.code / 100 == 2 => {
                self.caps = Capabilities::default();
                self.ready();
            }
            Phase::AwaitEhlo | Phase::AwaitHelo => self.close(CloseReason::Refused(reply)),
            Phase::AwaitEnvelope(txn) => self.envelope_reply(txn, reply),
            Phase::AwaitGoAhead(txn) => match reply.code / 100 {
                3 if reply.code == 354 => {
                    self.actions.push_back(Action::SendBody {
                        id: txn.id.clone(),
                        framing: BodyFraming::Data,
                    });
                    self.phase = Phase::SendingBody(txn);
                }
                4 | 5 => self.final_reply(*txn, reply),
                _ => {
                    self.phase = Phase::AwaitGoAhead(txn);
                    self.fail(CloseReason::Protocol(ProtocolError::Unexpected(reply.code)));
                }
            },
            Phase::AwaitFinal(txn) => match reply.code / 100 {
                2 | 4 | 5 => self.final_reply(*txn, reply),
                _ => {
                    self.phase = Phase::AwaitFinal(txn);
                    self.fail(CloseReason::Protocol(ProtocolError::Unexpected(reply.code)));
                }
            },
            Phase::AwaitRset if reply.code / 100 == 2 => self.ready(),
            Phase::AwaitRset => self.close(CloseReason::Refused(reply)),
            Phase::AwaitNoop if reply.code / 100 == 2 => self.ready(),
            Phase::AwaitNoop => self.close(CloseReason::Refused(reply)),
            Phase::AwaitQuit => self.close(CloseReason::Done),
            Phase::Window => {
                self.phase = Phase::Window;
                self.window_reply(reply);
            }
            // Not awaiting a reply: handle_input does not parse in these phases.
            p @ (Phase::Ready | Phase::SendingBody(_) | Phase::Closed) => self.phase = p,
        }
    }

    /// A reply to MAIL or to one RCPT.
    fn envelope_reply(&mut self, mut txn: Box<Txn>, reply: Reply) {
        let class = reply.code / 100;
        if !matches!(class, 2 | 4 | 5) {
            self.phase = Phase::AwaitEnvelope(txn);
            return self.fail(CloseReason::Protocol(ProtocolError::Unexpected(reply.code)));
        }
        if txn.mail.is_none() {
            if class == 2 {
                txn.mail = Some(Ok(()));
                if let Some(line) = txn.rcpt_lines.pop_front() {
                    self.out.extend_from_slice(&line);
                }
            } else {
                let outcome = if class == 4 {
                    RcptOutcome::Deferred(reply.clone())
                } else {
                    RcptOutcome::Failed(reply.clone())
                };
                txn.results
                    .iter_mut()
                    .for_each(|r| *r = Some(Err(outcome.clone())));
                txn.mail = Some(Err(reply));
                // Nothing more was written without pipelining, so nothing more will come.
                txn.rcpt_lines.clear();
            }
        } else {
            let i = txn.rcpt_replies;
            txn.rcpt_replies += 1;
            if matches!(txn.mail, Some(Ok(()))) {
                if let Some(slot) = txn.results.get_mut(i) {
                    *slot = Some(match class {
                        2 => Ok(()),
                        4 => Err(RcptOutcome::Deferred(reply)),
                        _ => Err(RcptOutcome::Failed(reply)),
                    });
                }
                if let Some(line) = txn.rcpt_lines.pop_front() {
                    self.out.extend_from_slice(&line);
                }
            }
        }
        // Replies still due: those to RCPTs already written.
        let written = txn.results.len() - txn.rcpt_lines.len();
        let due = match txn.mail {
            Some(Err(_)) if !self.pipelining() => 0,
            _ => written - txn.rcpt_replies,
        };
        if due > 0 {
            self.phase = Phase::AwaitEnvelope(txn);
            return;
        }
        match txn.mail {
            Some(Ok(())) if txn.any_accepted() => {
                if self.chunking() {
                    write_bdat(&mut self.out, txn.size);
                    self.actions.push_back(Action::SendBody {
                        id: txn.id.clone(),
                        framing: BodyFraming::Bdat,
                    });
                    self.phase = Phase::SendingBody(txn);
                } else {
                    self.out.extend_from_slice(b"DATA\r\n");
                    self.phase = Phase::AwaitGoAhead(txn);
                }
            }
            Some(Ok(())) => {
                // Every recipient refused: end the transaction without a body.
                let unused = RcptOutcome::Deferred(Reply::with_status(451, (4, 5, 0), "unused"));
                let outcome = txn.outcome(&unused);
                self.actions.push_back(Action::Delivered(outcome));
                self.out.extend_from_slice(b"RSET\r\n");
                self.phase = Phase::AwaitRset;
            }
            _ => {
                let unused = RcptOutcome::Deferred(Reply::with_status(451, (4, 5, 0), "unused"));
                let outcome = txn.outcome(&unused);
                self.actions.push_back(Action::Delivered(outcome));
                self.ready();
            }
        }
    }

    /// The reply after the body (or a 4xx/5xx to DATA) settles the accepted recipients.
    fn final_reply(&mut self, txn: Txn, reply: Reply) {
        let accepted = match reply.code / 100 {
            2 => RcptOutcome::Delivered,
            4 => RcptOutcome::Deferred(reply),
            _ => RcptOutcome::Failed(reply),
        };
        let outcome = txn.outcome(&accepted);
        self.actions.push_back(Action::Delivered(outcome));
        self.ready();
    }

    fn ready(&mut self) {
        if self.windowed() {
            self.phase = Phase::Window;
            self.pipe.asked = true;
        } else {
            self.phase = Phase::Ready;
        }
        self.actions.push_back(Action::NeedMessage);
    }

    /// Writes a message into the window: `[RSET] MAIL RCPT... [BDAT n LAST]`, the body (when
    /// small) to follow from the driver at once.
    fn send_windowed(&mut self, mut txn: Box<Txn>, mail: &[u8]) {
        let pipe = &mut self.pipe;
        pipe.asked = false;
        let rset_due = std::mem::replace(&mut pipe.txn_open, true);
        if rset_due {
            self.out.extend_from_slice(b"RSET\r\n");
        }
        self.out.extend_from_slice(mail);
        let mut commands = usize::from(rset_due) + 1 + txn.rcpt_lines.len();
        for line in txn.rcpt_lines.drain(..) {
            self.out.extend_from_slice(&line);
        }
        let (body, bytes) = if txn.size <= PIPELINE_BODY_MAX {
            write_bdat(&mut self.out, txn.size);
            commands += 1;
            self.actions.push_back(Action::SendBody {
                id: txn.id.clone(),
                framing: BodyFraming::Bdat,
            });
            (Body::Streaming, txn.size)
        } else {
            (Body::Waiting, 0)
        };
        pipe.commands += commands;
        pipe.bytes += bytes;
        pipe.flights.push_back(Flight {
            txn,
            rset_due,
            body,
            bdat_answered: false,
            settled: None,
            commands,
            bytes,
        });
    }

    /// A reply in the window: it answers the oldest command still due.
    fn window_reply(&mut self, reply: Reply) {
        let (code, class) = (reply.code, reply.code / 100);
        let Some(f) = self.pipe.flights.front_mut() else {
            return self.fail(CloseReason::Protocol(ProtocolError::Unexpected(reply.code)));
        };
        let due = f.next_due();
        let unexpected = match due {
            None => true,
            Some(Due::Rset) => {
                if class != 2 {
                    return self.fail(CloseReason::Refused(reply));
                }
                f.rset_due = false;
                false
            }
            Some(Due::Mail | Due::Rcpt | Due::Bdat) if !matches!(class, 2 | 4 | 5) => true,
            Some(Due::Mail) => {
                if class == 2 {
                    f.txn.mail = Some(Ok(()));
                } else {
                    let outcome = refusal(class, &reply);
                    f.txn
                        .results
                        .iter_mut()
                        .for_each(|r| *r = Some(Err(outcome.clone())));
                    f.txn.mail = Some(Err(reply));
                }
                false
            }
            Some(Due::Rcpt) => {
                let i = f.txn.rcpt_replies;
                f.txn.rcpt_replies += 1;
                if matches!(f.txn.mail, Some(Ok(()))) {
                    if let Some(slot) = f.txn.results.get_mut(i) {
                        *slot = Some(if class == 2 {
                            Ok(())
                        } else {
                            Err(refusal(class, &reply))
                        });
                    }
                }
                false
            }
            Some(Due::Bdat) => {
                f.bdat_answered = true;
                // With no recipient accepted the customer refuses the chunk (503/554) after
                // reading it: the recipients already have their answers.
                if matches!(f.txn.mail, Some(Ok(()))) && f.txn.any_accepted() {
                    f.settled = Some(match class {
                        2 => RcptOutcome::Delivered,
                        _ => refusal(class, &reply),
                    });
                }
                false
            }
        };
        if unexpected {
            return self.fail(CloseReason::Protocol(ProtocolError::Unexpected(code)));
        }
        if matches!(due, Some(Due::Mail | Due::Rcpt)) && f.envelope_complete() {
            self.envelope_done();
        }
        self.window_advance();
    }

    /// Every envelope reply of the oldest flight is in: a waiting large body goes now (or
    /// never), and we learn whether the customer still holds an open transaction.
    fn envelope_done(&mut self) {
        let only = self.pipe.flights.len() == 1;
        let Some(f) = self.pipe.flights.front_mut() else {
            return;
        };
        let mail_ok = matches!(f.txn.mail, Some(Ok(())));
        let accepted = mail_ok && f.txn.any_accepted();
        if f.body == Body::Waiting {
            if accepted {
                write_bdat(&mut self.out, f.txn.size);
                f.commands += 1;
                self.pipe.commands += 1;
                f.body = Body::Streaming;
                self.actions.push_back(Action::SendBody {
                    id: f.txn.id.clone(),
                    framing: BodyFraming::Bdat,
                });
            } else {
                f.body = Body::Skipped;
            }
        }
        if only {
            // Nothing was written after this message: its BDAT LAST ended the transaction
            // unless no recipient was accepted.
            self.pipe.txn_open = mail_ok && !accepted;
        }
    }

    /// Reports the settled flights at the front, then asks for more if the window has room.
    fn window_advance(&mut self) {
        while let Some(f) = self.pipe.flights.front() {
            if f.next_due().is_some() || matches!(f.body, Body::Waiting | Body::Streaming) {
                break;
            }
            let f = self.pipe.flights.pop_front().expect("front exists");
            self.pipe.commands -= f.commands;
            self.pipe.bytes -= f.bytes;
            let pending = f.settled.unwrap_or_else(|| {
                RcptOutcome::Deferred(Reply::with_status(451, (4, 5, 0), "unused"))
            });
            self.actions
                .push_back(Action::Delivered(f.txn.outcome(&pending)));
        }
        let pipe = &mut self.pipe;
        if pipe.finishing {
            if pipe.flights.is_empty() {
                pipe.finishing = false;
                pipe.asked = true;
                self.actions.push_back(Action::NeedMessage);
            }
        } else if !pipe.asked && pipe.has_room() {
            pipe.asked = true;
            self.actions.push_back(Action::NeedMessage);
        }
    }

    /// Reports the message in flight, if any: recipients without a final answer get `pending`.
    fn finish_txn(&mut self, pending: RcptOutcome) {
        if matches!(self.phase, Phase::Window) {
            let pipe = std::mem::take(&mut self.pipe);
            for f in pipe.flights {
                let p = f.settled.unwrap_or_else(|| pending.clone());
                self.actions.push_back(Action::Delivered(f.txn.outcome(&p)));
            }
            return;
        }
        let txn = match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::AwaitEnvelope(t)
            | Phase::AwaitGoAhead(t)
            | Phase::SendingBody(t)
            | Phase::AwaitFinal(t) => t,
            other => {
                self.phase = other;
                return;
            }
        };
        let outcome = txn.outcome(&pending);
        self.actions.push_back(Action::Delivered(outcome));
    }

    /// A protocol failure: the message in flight is deferred, then Close.
    fn fail(&mut self, reason: CloseReason) {
        let r = Reply::new(451, Some(EnhancedStatus::new(4, 5, 0)), reason.to_string());
        self.finish_txn(RcptOutcome::Deferred(r));
        self.close(reason);
    }

    fn close(&mut self, reason: CloseReason) {
        self.phase = Phase::Closed;
        self.actions.push_back(Action::Close(reason));
    }
}

/// `BDAT <size> LAST`.
fn write_bdat(out: &mut Vec<u8>, size: u64) {
    let _ = write!(ByteWriter(out), "BDAT {size} LAST\r\n");
}

/// `fmt::Write` into a byte buffer, without an intermediate `String`.
struct ByteWriter<'a>(&'a mut Vec<u8>);

impl fmt::Write for ByteWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A 4xx or 5xx answer as a recipient outcome.
fn refusal(class: u16, reply: &Reply) -> RcptOutcome {
    if class == 4 {
        RcptOutcome::Deferred(reply.clone())
    } else {
        RcptOutcome::Failed(reply.clone())
    }
}

/// An outcome giving every recipient of `msg` the same answer.
fn all(msg: &Outgoing, o: RcptOutcome) -> MessageOutcome {
    MessageOutcome {
        id: msg.id.clone(),
        recipients: (0..msg.envelope.recipients.len())
            .map(|i| (i, o.clone()))
            .collect(),
        dsn_relayed: false,
    }
}

/// `NEVER` or a comma list of `SUCCESS,FAILURE,DELAY` (RFC 3461 §4.1).
fn notify_value(n: Notify) -> String {
    if n.never || !(n.success || n.failure || n.delay) {
        return "NEVER".into();
    }
    let flags = [
        (n.success, "SUCCESS"),
        (n.failure, "FAILURE"),
        (n.delay, "DELAY"),
    ];
    flags
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, s)| *s)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::inbound::{self, Directory, Inbound, InboundConfig, Incoming, RcptVerdict};
    use crate::proto::stuff::DotStuffer;
    use crate::types::Recipient;

    fn mb(s: &str) -> Mailbox {
        let (local, domain) = s.rsplit_once('@').expect("an address");
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    fn rcpt(s: &str) -> Recipient {
        Recipient {
            mailbox: mb(s),
            notify: None,
            orcpt: None,
        }
    }

    /// A held message and its stored body.
    #[derive(Clone, Debug)]
    struct Msg {
        out: Outgoing,
        body: Vec<u8>,
    }

    fn msg(id: &str, sender: Option<&str>, rcpts: &[&str], body: &[u8]) -> Msg {
        Msg {
            out: Outgoing {
                id: id.into(),
                envelope: Envelope {
                    sender: sender.map(mb),
                    recipients: rcpts.iter().map(|r| rcpt(r)).collect(),
                    ..Envelope::default()
                },
                size: body.len() as u64,
                eight_bit: body.iter().any(|b| *b > 127),
                utf8_addresses: false,
            },
            body: body.to_vec(),
        }
    }

    fn dsn_msg() -> Msg {
        let mut m = msg("m1", Some("a@s.example"), &["u@example.org"], b"hi\r\n");
        m.out.envelope.ret = Some(Ret::Hdrs);
        m.out.envelope.envid = Some("E+2B1".into());
        m.out.envelope.recipients[0].notify = Some(Notify {
            success: true,
            failure: true,
            ..Notify::default()
        });
        m.out.envelope.recipients[0].orcpt = Some("rfc822;u@example.org".into());
        m
    }

    fn cfg(pipelining: bool, chunking: bool) -> ReversedConfig {
        ReversedConfig {
            hostname: "provider.example".into(),
            pipelining,
            chunking,
        }
    }

    /// Summarises an outcome: `id: ok defer450 fail550 ...` in recipient order.
    fn describe(o: &MessageOutcome) -> String {
        let mut s = format!("{}:", o.id);
        for (k, (i, r)) in o.recipients.iter().enumerate() {
            assert_eq!(k, *i, "recipient indices in order");
            match r {
                RcptOutcome::Delivered => s.push_str(" ok"),
                RcptOutcome::Deferred(r) => s.push_str(&format!(" defer{}", r.code)),
                RcptOutcome::Failed(r) => s.push_str(&format!(" fail{}", r.code)),
            }
        }
        if o.dsn_relayed {
            s.push_str(" +dsn");
        }
        s
    }

    /// What one side's driver saw, independent of how the input was split.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Run {
        transcript: Vec<String>,
        events: Vec<String>,
        outcomes: Vec<MessageOutcome>,
        closed: bool,
    }

    /// The provider's driver: obeys every action, streaming bodies into `wire`.
    struct Provider {
        m: Reversed,
        queue: VecDeque<Msg>,
        /// Every message given to the machine (several may be in flight).
        sent: Vec<Msg>,
        wire: Vec<u8>,
        buf: Vec<u8>,
        run: Run,
    }

    impl Provider {
        fn new(cfg: ReversedConfig, msgs: &[Msg]) -> Self {
            Provider {
                m: Reversed::new(cfg),
                queue: msgs.iter().cloned().collect(),
                sent: Vec::new(),
                wire: Vec::new(),
                buf: Vec::new(),
                run: Run::default(),
            }
        }

        /// Obeys the queued actions; true if there were any.
        fn pump(&mut self) -> bool {
            let mut acted = false;
            self.wire.append(self.m.output());
            while let Some(a) = self.m.poll_action() {
                acted = true;
                match a {
                    Action::NeedMessage => match self.queue.pop_front() {
                        Some(msg) => {
                            self.m.send(msg.out.clone());
                            self.sent.push(msg);
                        }
                        None => self.m.no_more(),
                    },
                    Action::SendBody { id, framing } => {
                        let msg = self.sent.last().expect("a message in flight");
                        // Only the newest message can be waiting for its body.
                        assert_eq!(msg.out.id, id);
                        self.wire.append(self.m.output());
                        match framing {
                            BodyFraming::Bdat => self.wire.extend_from_slice(&msg.body),
                            BodyFraming::Data => {
                                // Streamed in 7-byte pieces, as from disk.
                                let mut s = DotStuffer::new();
                                for piece in msg.body.chunks(7) {
                                    s.push(piece, &mut self.wire);
                                }
                                s.finish(&mut self.wire);
                            }
                        }
                        self.m.body_sent();
                    }
                    Action::Delivered(o) => {
                        self.run.events.push(describe(&o));
                        self.run.outcomes.push(o);
                    }
                    Action::Close(reason) => {
                        self.run.closed = true;
                        self.run.events.push(format!("close: {reason}"));
                    }
                }
                self.wire.append(self.m.output());
            }
            acted
        }

        fn feed(&mut self, piece: &[u8]) {
            self.buf.extend_from_slice(piece);
            loop {
                let n = self.m.handle_input(&self.buf);
                assert!(n <= self.buf.len());
                self.buf.drain(..n);
                if !self.pump() || self.buf.is_empty() || self.m.is_closed() {
                    break;
                }
            }
        }
    }

    fn lines(prefix: &str, bytes: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(bytes);
        let text = text.strip_suffix("\r\n").unwrap_or(&text).to_string();
        if bytes.is_empty() {
            return Vec::new();
        }
        text.split("\r\n")
            .map(|l| format!("{prefix} {l}"))
            .collect()
    }

    /// Drives the provider with the customer's flights, each piece handled before the next.
    fn drive(cfg: &ReversedConfig, msgs: &[Msg], flights: &[Vec<&[u8]>]) -> Run {
        let mut p = Provider::new(cfg.clone(), msgs);
        p.pump();
        for pieces in flights {
            let whole: Vec<u8> = pieces.concat();
            p.run.transcript.extend(lines("C:", &whole));
            for piece in pieces {
                p.feed(piece);
            }
            let wire = std::mem::take(&mut p.wire);
            p.run.transcript.extend(lines("P:", &wire));
        }
        assert_eq!(p.run.closed, p.m.is_closed());
        p.run
    }

    /// Customer flights of a `C:`/`P:` script, and the normalised expected transcript.
    fn parse(script: &str) -> (Vec<Vec<u8>>, Vec<String>) {
        let mut flights: Vec<Vec<u8>> = Vec::new();
        let mut expected = Vec::new();
        let mut in_flight = false;
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (who, rest) = line.split_at(2);
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            expected.push(format!("{who} {rest}"));
            match who {
                "C:" => {
                    if !in_flight {
                        flights.push(Vec::new());
                        in_flight = true;
                    }
                    let rest = rest.replace("\\n", "\n").replace("\\r", "\r");
                    let f = flights.last_mut().expect("pushed");
                    f.extend_from_slice(rest.as_bytes());
                    f.extend_from_slice(b"\r\n");
                }
                "P:" => in_flight = false,
                _ => panic!("bad script line {line:?}"),
            }
        }
        (flights, expected)
    }

    /// Runs the script whole, with every flight split at every offset, and byte by byte:
    /// every run must be the same. Returns the run's events.
    fn check(cfg: &ReversedConfig, msgs: &[Msg], script: &str) -> Vec<String> {
        let (flights, expected) = parse(script);
        let whole: Vec<Vec<&[u8]>> = flights.iter().map(|f| vec![f.as_slice()]).collect();
        let run = drive(cfg, msgs, &whole);
        // Bare CR/LF in a script show up on the customer side as they were written.
        let got: Vec<String> = run
            .transcript
            .iter()
            .map(|l| l.replace('\n', "\\n").replace('\r', "\\r"))
            .collect();
        let want: Vec<String> = expected
            .iter()
            .map(|l| l.replace('\n', "\\n").replace('\r', "\\r"))
            .collect();
        assert_eq!(got.join("\n"), want.join("\n"), "events {:?}", run.events);
        for (k, f) in flights.iter().enumerate() {
            for cut in 0..=f.len() {
                let mut split = whole.clone();
                split[k] = vec![&f[..cut], &f[cut..]];
                assert_eq!(drive(cfg, msgs, &split), run, "flight {k} cut {cut}");
            }
        }
        let singles: Vec<Vec<&[u8]>> = flights.iter().map(|f| f.chunks(1).collect()).collect();
        assert_eq!(drive(cfg, msgs, &singles), run, "byte by byte");
        run.events
    }

    const EHLO_ALL: &str = "
        C: 220 customer.example ESMTP
        P: EHLO provider.example
        C: 250-customer.example
        C: 250-PIPELINING
        C: 250-SIZE 1000
        C: 250-8BITMIME
        C: 250-SMTPUTF8
        C: 250-ENHANCEDSTATUSCODES
        C: 250-CHUNKING
        C: 250-STARTTLS
        C: 250 DSN";

    const EHLO_PLAIN: &str = "
        C: 220 customer.example ESMTP
        P: EHLO provider.example
        C: 250 customer.example";

    #[test]
    fn pipelined_bdat_with_dsn_parameters() {
        let events = check(
            &cfg(true, true),
            &[dsn_msg()],
            &format!(
                "{EHLO_ALL}
                 P: MAIL FROM:<a@s.example> SIZE=4 RET=HDRS ENVID=E+2B1
                 P: RCPT TO:<u@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@example.org
                 P: BDAT 4 LAST
                 P: hi
                 C: 250 2.1.0 Ok
                 C: 250 2.1.5 Ok
                 C: 250 2.0.0 Ok queued
                 P: QUIT
                 C: 221 2.0.0 Bye"
            ),
        );
        assert_eq!(events, ["m1: ok +dsn", "close: session done"]);
    }

    const EHLO_WINDOW: &str = "
        C: 220 c
        P: EHLO provider.example
        C: 250-c
        C: 250-PIPELINING
        C: 250 CHUNKING";

    #[test]
    fn window_pipelines_messages_and_matches_replies_in_order() {
        let m1 = msg(
            "m1",
            Some("a@s.example"),
            &["u@example.org", "v@example.org"],
            b"a\r\n",
        );
        let m2 = msg("m2", Some("a@s.example"), &["w@example.org"], b"b\r\n");
        let m3 = msg("m3", None, &["x@example.org", "y@example.org"], b"c\r\n");
        let m4 = msg("m4", None, &["z@example.org"], b"");
        let events = check(
            &cfg(true, true),
            &[m1, m2, m3, m4],
            &format!(
                "{EHLO_WINDOW}
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<u@example.org>
                 P: RCPT TO:<v@example.org>
                 P: BDAT 3 LAST
                 P: a
                 P: RSET
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<w@example.org>
                 P: BDAT 3 LAST
                 P: b
                 P: RSET
                 P: MAIL FROM:<>
                 P: RCPT TO:<x@example.org>
                 P: RCPT TO:<y@example.org>
                 P: BDAT 3 LAST
                 P: c
                 P: RSET
                 P: MAIL FROM:<>
                 P: RCPT TO:<z@example.org>
                 P: BDAT 0 LAST
                 C: 250 2.1.0 Ok
                 C: 250 2.1.5 Ok
                 C: 550 5.1.1 No such user
                 C: 250 2.0.0 Queued
                 C: 250 2.0.0 Ok
                 C: 250 2.1.0 Ok
                 C: 550 5.1.1 No such user
                 C: 554 5.5.1 No valid recipients
                 C: 250 2.0.0 Ok
                 C: 451 4.3.0 Try again
                 C: 503 5.5.1 Need MAIL
                 C: 503 5.5.1 Need MAIL
                 C: 503 5.5.1 Need MAIL
                 C: 250 Ok
                 C: 250 Ok
                 C: 452 4.2.2 Mailbox full
                 C: 503-5.5.1 Need RCPT
                 C: 503 5.5.1 Need RCPT
                 P: QUIT
                 C: 221 Bye"
            ),
        );
        assert_eq!(
            events,
            [
                "m1: ok fail550",
                "m2: fail550",
                "m3: defer451 defer451",
                "m4: defer452",
                "close: session done"
            ]
        );
    }

    #[test]
    fn window_large_bodies_wait_for_their_envelope() {
        let body = |c: u8| {
            let mut b = vec![c; PIPELINE_BODY_MAX as usize];
            b.extend_from_slice(b"\r\n");
            b
        };
        let big1 = msg("big1", Some("a@s.example"), &["u@example.org"], &body(b'x'));
        let small2 = msg("small2", Some("a@s.example"), &["v@example.org"], b"s\r\n");
        let big3 = msg("big3", Some("a@s.example"), &["n@example.org"], &body(b'y'));
        let small4 = msg("small4", Some("a@s.example"), &["w@example.org"], b"w\r\n");
        let big5 = msg("big5", Some("a@s.example"), &["b@example.org"], &body(b'z'));
        let n = PIPELINE_BODY_MAX + 2;
        let (x, z) = ("x".repeat(n as usize - 2), "z".repeat(n as usize - 2));
        let events = check(
            &cfg(true, true),
            &[big1, small2, big3, small4, big5],
            &format!(
                "{EHLO_WINDOW}
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<u@example.org>
                 C: 250 Ok
                 C: 250 Ok
                 P: BDAT {n} LAST
                 P: {x}
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<v@example.org>
                 P: BDAT 3 LAST
                 P: s
                 P: RSET
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<n@example.org>
                 C: 250 2.0.0 big1 queued
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 2.0.0 small2 queued
                 C: 250 Ok
                 C: 250 Ok
                 C: 550 5.1.1 No such user
                 P: RSET
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<w@example.org>
                 P: BDAT 3 LAST
                 P: w
                 P: RSET
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<b@example.org>
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 2.0.0 small4 queued
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 P: BDAT {n} LAST
                 P: {z}
                 C: 554 5.6.0 Content refused
                 P: QUIT
                 C: 221 Bye"
            ),
        );
        assert_eq!(
            events,
            [
                "big1: ok",
                "small2: ok",
                "big3: fail550",
                "small4: ok",
                "big5: fail554",
                "close: session done"
            ]
        );
    }

    #[test]
    fn window_failures_defer_every_message_in_flight() {
        let m = |id: &str| msg(id, Some("a@s.example"), &["u@example.org"], b"x\r\n");
        let head = "P: MAIL FROM:<a@s.example>
                    P: RCPT TO:<u@example.org>
                    P: BDAT 3 LAST
                    P: x
                    P: RSET
                    P: MAIL FROM:<a@s.example>
                    P: RCPT TO:<u@example.org>
                    P: BDAT 3 LAST
                    P: x";
        let cases: Vec<(&str, Vec<&str>)> = vec![
            (
                "C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 C: 421 4.3.2 Shutting down",
                vec![
                    "a: ok",
                    "b: defer421",
                    "close: customer closing: 421 4.3.2 Shutting down",
                ],
            ),
            (
                "C: 250 Ok
                 C: 250 Ok
                 C: 452 4.3.1 Full
                 C: 550 5.0.0 No reset for you",
                vec![
                    "a: defer452",
                    "b: defer451",
                    "close: customer refused the session: 550 5.0.0 No reset for you",
                ],
            ),
            (
                "C: 250 Ok
                 C: 250 Ok
                 C: 354 go on",
                vec![
                    "a: defer451",
                    "b: defer451",
                    "close: protocol error: unexpected reply code 354",
                ],
            ),
            (
                "C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 C: 250 Ok
                 P: QUIT
                 C: 250 extra",
                vec!["a: ok", "b: ok", "close: session done"],
            ),
        ];
        for (tail, want) in cases {
            let script = format!("{EHLO_WINDOW}\n{head}\n{tail}");
            assert_eq!(
                check(&cfg(true, true), &[m("a"), m("b")], &script),
                want,
                "{script}"
            );
        }
    }

    #[test]
    fn window_is_bounded_by_messages_and_bytes() {
        // WINDOW_MESSAGES + 1 small messages: the last waits for the first to be answered.
        let msgs: Vec<Msg> = (0..=WINDOW_MESSAGES)
            .map(|i| msg(&format!("m{i}"), None, &["u@example.org"], b"x\r\n"))
            .collect();
        let mut p = Provider::new(cfg(true, true), &msgs);
        p.feed(b"220 c\r\n250-c\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
        let wire = String::from_utf8_lossy(&std::mem::take(&mut p.wire)).into_owned();
        assert_eq!(wire.matches("MAIL FROM").count(), WINDOW_MESSAGES);
        assert_eq!(p.m.in_flight(), WINDOW_MESSAGES);
        p.feed(b"250 Ok\r\n250 Ok\r\n");
        assert!(
            p.wire.is_empty(),
            "no room before the first message is answered"
        );
        p.feed(b"250 Ok\r\n");
        let wire = String::from_utf8_lossy(&std::mem::take(&mut p.wire)).into_owned();
        assert_eq!(wire.matches("MAIL FROM").count(), 1, "{wire}");
        assert_eq!(p.run.events, ["m0: ok"]);
        // Bytes: 40 KiB bodies fill WINDOW_BYTES after 26 messages.
        let body = vec![b'y'; 40 * 1024];
        let msgs: Vec<Msg> = (0..40)
            .map(|i| msg(&format!("b{i}"), None, &["u@example.org"], &body))
            .collect();
        let mut p = Provider::new(cfg(true, true), &msgs);
        p.feed(b"220 c\r\n250-c\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
        let wire = String::from_utf8_lossy(&std::mem::take(&mut p.wire)).into_owned();
        let fit = WINDOW_BYTES.div_ceil(40 * 1024) as usize;
        assert_eq!(wire.matches("MAIL FROM").count(), fit);
    }

    #[test]
    fn window_no_more_waits_for_the_flights_then_asks_again() {
        let m = msg("m", None, &["u@example.org"], b"x\r\n");
        let mut r = Reversed::new(cfg(true, true));
        r.handle_input(b"220 c\r\n250-c\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
        assert_eq!(r.poll_action(), Some(Action::NeedMessage));
        r.send(m.out);
        assert!(matches!(r.poll_action(), Some(Action::SendBody { .. })));
        r.body_sent();
        assert_eq!(r.poll_action(), Some(Action::NeedMessage));
        // Nothing to send: QUIT must wait for the reply, and keepalive is ignored meanwhile.
        r.no_more();
        r.keepalive();
        r.output().clear();
        assert_eq!(r.in_flight(), 1);
        r.handle_input(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n");
        assert!(r.output().is_empty());
        assert!(matches!(r.poll_action(), Some(Action::Delivered(_))));
        assert_eq!(r.poll_action(), Some(Action::NeedMessage));
        assert_eq!(r.in_flight(), 0);
        r.keepalive();
        assert_eq!(r.output().as_slice(), b"NOOP\r\n");
        r.output().clear();
        r.handle_input(b"250 Ok\r\n");
        assert_eq!(r.poll_action(), Some(Action::NeedMessage));
        r.no_more();
        assert_eq!(r.output().as_slice(), b"QUIT\r\n");
    }

    #[test]
    fn dsn_parameters_only_when_offered_and_one_command_per_round_trip() {
        let two = msg("m2", None, &["u@example.org", "v@example.org"], b".x\r\n");
        let mut m = dsn_msg();
        m.out.envelope.recipients.push(rcpt("w@example.org"));
        let events = check(
            &cfg(true, true),
            &[m, two],
            &format!(
                "{EHLO_PLAIN}
                 P: MAIL FROM:<a@s.example>
                 C: 250 Ok
                 P: RCPT TO:<u@example.org>
                 C: 550 5.1.1 No such user
                 P: RCPT TO:<w@example.org>
                 C: 451-4.3.0 try
                 C: 451 4.3.0 later
                 P: RSET
                 C: 250 Ok
                 P: MAIL FROM:<>
                 C: 250 Ok
                 P: RCPT TO:<u@example.org>
                 C: 250 Ok
                 P: RCPT TO:<v@example.org>
                 C: 250 Ok
                 P: DATA
                 C: 354 go
                 P: ..x
                 P: .
                 C: 250 Ok
                 P: QUIT
                 C: 221 Bye"
            ),
        );
        assert_eq!(
            events,
            ["m1: fail550 defer451", "m2: ok ok", "close: session done"]
        );
    }

    #[test]
    fn pipelining_not_used_when_disabled_and_data_when_chunking_disabled() {
        let m = msg(
            "m1",
            Some("a@s.example"),
            &["u@example.org", "v@example.org"],
            b"x\r\n",
        );
        let events = check(
            &cfg(false, false),
            &[m],
            &format!(
                "{EHLO_ALL}
                 P: MAIL FROM:<a@s.example> SIZE=3
                 C: 250 2.1.0 Ok
                 P: RCPT TO:<u@example.org>
                 C: 250 2.1.5 Ok
                 P: RCPT TO:<v@example.org>
                 C: 452 4.5.3 Too many recipients
                 P: DATA
                 C: 354 go
                 P: x
                 P: .
                 C: 554 5.6.0 Content refused
                 P: QUIT
                 C: 221 Bye"
            ),
        );
        assert_eq!(events, ["m1: fail554 defer452 +dsn", "close: session done"]);
    }

    #[test]
    fn ehlo_refused_falls_back_to_helo_without_extensions() {
        let mut m = dsn_msg();
        m.out.envelope.body = BodyType::EightBitMime; // declared but 7-bit: sent plainly
        let events = check(
            &cfg(true, true),
            &[m],
            "C: 220 customer.example
             P: EHLO provider.example
             C: 502 5.5.1 What?
             P: HELO provider.example
             C: 250 customer.example
             P: MAIL FROM:<a@s.example>
             C: 250 Ok
             P: RCPT TO:<u@example.org>
             C: 250 Ok
             P: DATA
             C: 354 go
             P: hi
             P: .
             C: 451 4.3.0 Disk full
             P: QUIT
             C: 221 Bye",
        );
        assert_eq!(events, ["m1: defer451", "close: session done"]);
    }

    #[test]
    fn local_refusals_send_nothing() {
        let big = msg(
            "big",
            Some("a@s.example"),
            &["u@example.org"],
            &[b'x'; 1001],
        );
        let mut eight = msg(
            "8bit",
            Some("a@s.example"),
            &["u@example.org"],
            b"caf\xe9\r\n",
        );
        eight.out.envelope.body = BodyType::EightBitMime;
        let utf8_rcpt = msg(
            "utf8",
            Some("a@s.example"),
            &["δοκιμή@example.org"],
            b"x\r\n",
        );
        let mut utf8_flag = msg("flag", Some("a@s.example"), &["u@example.org"], b"x\r\n");
        utf8_flag.out.utf8_addresses = true;
        let no_rcpts = msg("none", Some("a@s.example"), &[], b"x\r\n");
        let fits = msg(
            "fits",
            Some("a@s.example"),
            &["u@example.org"],
            &[b'y'; 998],
        );
        let events = check(
            &cfg(true, true),
            &[big, eight, utf8_rcpt, utf8_flag, no_rcpts, fits],
            "C: 220 customer.example
             P: EHLO provider.example
             C: 250-customer.example
             C: 250-PIPELINING
             C: 250 SIZE 1000
             P: MAIL FROM:<a@s.example> SIZE=998
             P: RCPT TO:<u@example.org>
             C: 250 Ok
             C: 250 Ok
             P: DATA",
        );
        assert_eq!(
            events,
            [
                "big: fail552",
                "8bit: fail554",
                "utf8: fail553",
                "flag: fail553",
                "none:",
            ]
        );
    }

    #[test]
    fn size_zero_is_no_limit_and_8bit_utf8_parameters_are_sent_when_offered() {
        let mut m = msg(
            "m",
            Some("jörg@s.example"),
            &["δ@example.org"],
            b"caf\xc3\xa9\r\n",
        );
        m.out.envelope.smtputf8 = true;
        let events = check(
            &cfg(true, false),
            &[m],
            "C: 220 c
             P: EHLO provider.example
             C: 250-c
             C: 250-SIZE 0
             C: 250-8BITMIME
             C: 250 SMTPUTF8
             P: MAIL FROM:<jörg@s.example> SIZE=7 BODY=8BITMIME SMTPUTF8
             C: 250 Ok
             P: RCPT TO:<δ@example.org>
             C: 250 Ok
             P: DATA
             C: 354 go
             P: café
             P: .
             C: 250 Ok
             P: QUIT
             C: 221 Bye",
        );
        assert_eq!(events, ["m: ok", "close: session done"]);
    }

    #[test]
    fn refused_mail_in_a_pipeline_reads_and_ignores_the_rcpt_replies() {
        let a = msg(
            "a",
            Some("a@s.example"),
            &["u@example.org", "v@example.org"],
            b"x\r\n",
        );
        let b = msg("b", Some("b@s.example"), &["u@example.org"], b"x\r\n");
        let events = check(
            &cfg(true, true),
            &[a, b],
            "C: 220 c
             P: EHLO provider.example
             C: 250-c
             C: 250 PIPELINING
             P: MAIL FROM:<a@s.example>
             P: RCPT TO:<u@example.org>
             P: RCPT TO:<v@example.org>
             C: 550 5.7.1 Sender refused
             C: 503 5.5.1 Need MAIL
             C: 503 5.5.1 Need MAIL
             P: MAIL FROM:<b@s.example>
             P: RCPT TO:<u@example.org>
             C: 452 4.3.1 Busy
             C: 503 5.5.1 Need MAIL
             P: QUIT
             C: 221 Bye",
        );
        assert_eq!(
            events,
            ["a: fail550 fail550", "b: defer452", "close: session done"]
        );
    }

    #[test]
    fn service_closing_defers_the_rest() {
        let m = || {
            msg(
                "m",
                Some("a@s.example"),
                &["u@example.org", "v@example.org"],
                b"x\r\n",
            )
        };
        let cases: Vec<(&str, Vec<&str>)> = vec![
            (
                "C: 421 4.3.2 Shutting down",
                vec!["close: customer closing: 421 4.3.2 Shutting down"],
            ),
            (
                "C: 220 c
                 P: EHLO provider.example
                 C: 421 c going away",
                vec!["close: customer closing: 421 c going away"],
            ),
            (
                "C: 220 c
                 P: EHLO provider.example
                 C: 250-c
                 C: 250 PIPELINING
                 P: MAIL FROM:<a@s.example>
                 P: RCPT TO:<u@example.org>
                 P: RCPT TO:<v@example.org>
                 C: 250 Ok
                 C: 550 No
                 C: 421 Bye",
                vec!["m: fail550 defer421", "close: customer closing: 421 Bye"],
            ),
            (
                "C: 220 c
                 P: EHLO provider.example
                 C: 250 c
                 P: MAIL FROM:<a@s.example>
                 C: 250 Ok
                 P: RCPT TO:<u@example.org>
                 C: 250 Ok
                 P: RCPT TO:<v@example.org>
                 C: 250 Ok
                 P: DATA
                 C: 354 go
                 P: x
                 P: .
                 C: 421 4.4.1 Timeout",
                vec![
                    "m: defer421 defer421",
                    "close: customer closing: 421 4.4.1 Timeout",
                ],
            ),
        ];
        for (script, want) in cases {
            assert_eq!(check(&cfg(true, true), &[m()], script), want, "{script}");
        }
    }

    #[test]
    fn bad_greetings_and_refusals_close() {
        let cases: Vec<(&str, &str)> = vec![
            (
                "C: 554 No service",
                "close: customer greeting refused: 554 No service",
            ),
            (
                "C: 220 c
                 P: EHLO provider.example
                 C: 550 no
                 P: HELO provider.example
                 C: 550 still no",
                "close: customer refused the session: 550 still no",
            ),
            (
                "C: 220 c
                 P: EHLO provider.example
                 C: 450 later",
                "close: customer refused the session: 450 later",
            ),
        ];
        for (script, want) in cases {
            assert_eq!(check(&cfg(true, true), &[], script), [want], "{script}");
        }
    }

    #[test]
    fn garbage_replies_close_with_a_protocol_error_and_defer() {
        let long = format!("C: 250 {}", "x".repeat(MAX_REPLY_LINE));
        let many: String = (0..MAX_REPLY_LINES)
            .map(|_| "C: 250-x\n")
            .chain(std::iter::once("C: 250 x"))
            .collect();
        let cases: Vec<(String, &str)> = vec![
            ("C: hello".into(), "malformed reply line"),
            ("C: 22".into(), "malformed reply line"),
            ("C: 2200 x".into(), "malformed reply line"),
            ("C: 220x".into(), "malformed reply line"),
            ("C: 020 x".into(), "malformed reply line"),
            (
                "C: 220 a\\nb".into(),
                "reply framing: bare LF in command line",
            ),
            (
                "C: 220 a\\rb".into(),
                "reply framing: bare CR in command line",
            ),
            (
                "C: 220-a\nC: 250 b".into(),
                "multi-line reply changed its code",
            ),
            (long, "reply framing: line too long"),
            (many, "too many lines in one reply"),
        ];
        for (script, want) in &cases {
            let events = check(&cfg(true, true), &[], script);
            assert_eq!(
                events,
                [format!("close: protocol error: {want}")],
                "{script}"
            );
        }
        // Mid-message: the recipients are deferred, never delivered or failed.
        let m = msg("m", Some("a@s.example"), &["u@example.org"], b"x\r\n");
        let unexpected: Vec<(&str, &str)> = vec![
            ("C: 354 go on", "unexpected reply code 354"),
            (
                "C: 250 Ok\nC: 250 Ok\nP: DATA\nC: 250 no 354",
                "unexpected reply code 250",
            ),
            (
                "C: 250 Ok\nC: 250 Ok\nP: DATA\nC: 354 go\nP: x\nP: .\nC: 354 again",
                "unexpected reply code 354",
            ),
            (
                "C: 250 Ok\nP: RCPT TO:<u@example.org>\nC: 2",
                "malformed reply line",
            ),
        ];
        for (tail, want) in unexpected {
            let script = format!(
                "C: 220 c
                 P: EHLO provider.example
                 C: 250 c
                 P: MAIL FROM:<a@s.example>
                 {}",
                tail.replacen(
                    "C: 250 Ok\nC: 250 Ok",
                    "C: 250 Ok\nP: RCPT TO:<u@example.org>\nC: 250 Ok",
                    1
                )
            );
            let events = check(&cfg(false, false), std::slice::from_ref(&m), &script);
            assert_eq!(
                events,
                [
                    "m: defer451".to_string(),
                    format!("close: protocol error: {want}")
                ],
                "{script}"
            );
        }
    }

    #[test]
    fn abort_defers_everything_unanswered_and_is_idempotent() {
        let m = msg(
            "m",
            Some("a@s.example"),
            &["u@example.org", "v@example.org"],
            b"x\r\n",
        );
        let mut p = Provider::new(cfg(true, true), &[m]);
        p.feed(b"220 c\r\n250-c\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
        p.feed(b"250 Ok\r\n550 no\r\n250 Ok\r\n");
        assert!(p.run.events.is_empty());
        p.m.abort();
        p.m.abort();
        p.pump();
        assert_eq!(
            p.run.events,
            ["m: fail550 defer451", "close: aborted by the driver"]
        );
        // The deferral names the connection, with an enhanced code.
        let RcptOutcome::Deferred(r) = &p.run.outcomes[0].recipients[1].1 else {
            panic!("deferred expected")
        };
        assert_eq!(r.status, Some(EnhancedStatus::new(4, 4, 2)));
    }

    #[test]
    fn send_out_of_turn_is_reported_deferred() {
        let m = msg("m", Some("a@s.example"), &["u@example.org"], b"x\r\n");
        let mut r = Reversed::new(cfg(true, true));
        r.send(m.out);
        assert!(r.output().is_empty());
        let Some(Action::Delivered(o)) = r.poll_action() else {
            panic!("an outcome expected")
        };
        assert_eq!(describe(&o), "m: defer451");
    }

    #[test]
    fn replies_parse_with_enhanced_codes_and_capabilities() {
        let mut p = ReplyParser::new();
        let wire = b"250-2.1.0 first\r\n250-second\r\n250 2.1.0 third\r\n";
        let Parsed::Reply { reply, consumed } = p.parse(wire) else {
            panic!("a reply")
        };
        assert_eq!(consumed, wire.len());
        assert_eq!(reply.status, Some(EnhancedStatus::new(2, 1, 0)));
        assert_eq!(reply.lines, ["first", "second", "third"]);
        // A status whose class does not match the code is text.
        let Parsed::Reply { reply, .. } = p.parse(b"550 2.0.0 odd\r\n") else {
            panic!("a reply")
        };
        assert_eq!((reply.status, reply.lines[0].as_ref()), (None, "2.0.0 odd"));
        let Parsed::Reply { reply, .. } = p.parse(b"250\r\n") else {
            panic!("a reply")
        };
        assert_eq!((reply.code, reply.lines.len()), (250, 1));
        let caps = Capabilities::parse(&Reply {
            code: 250,
            status: None,
            lines: vec![
                "c".into(),
                "size 2048".into(),
                "pipelining".into(),
                "ENHANCEDSTATUSCODES".into(),
                "BINARYMIME".into(),
                "X-UNKNOWN".into(),
                "".into(),
            ],
        });
        assert!(caps.pipelining && caps.size && caps.enhanced_status_codes && caps.binary_mime);
        assert_eq!(caps.size_limit, Some(2048));
        assert!(!caps.dsn && !caps.chunking && !caps.starttls);
    }

    // ---- The pair: our provider client against our own inbound server, in memory. ----

    /// Accepts example.org; `nobody@` 550, `later@` 450; other domains are relaying (550).
    struct Dir;

    impl Directory for Dir {
        fn check_rcpt(&self, rcpt: &Mailbox, _size: Option<u64>) -> RcptVerdict {
            match (rcpt.local.as_str(), rcpt.domain.as_str()) {
                ("nobody", "example.org") => {
                    RcptVerdict::Reject(Reply::with_status(550, (5, 1, 1), "No such user"))
                }
                ("later", "example.org") => {
                    RcptVerdict::Reject(Reply::with_status(450, (4, 2, 0), "Try later"))
                }
                (_, "example.org") => RcptVerdict::Accept,
                _ => RcptVerdict::Reject(Reply::with_status(550, (5, 7, 1), "Relay denied")),
            }
        }
    }

    /// How bytes travel between the two machines.
    #[derive(Clone, Copy, Debug)]
    enum Split {
        Whole,
        /// Every transfer split in two at this offset.
        At(usize),
        Bytes,
    }

    fn pieces(bytes: &[u8], split: Split) -> Vec<&[u8]> {
        match split {
            Split::Whole => vec![bytes],
            Split::At(n) => {
                let n = n.min(bytes.len());
                vec![&bytes[..n], &bytes[n..]]
            }
            Split::Bytes => bytes.chunks(1).collect(),
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    struct PairRun {
        provider: Run,
        to_customer: Vec<u8>,
        received: Vec<Incoming>,
        customer_closed: bool,
    }

    fn pair(rcfg: &ReversedConfig, icfg: &InboundConfig, msgs: &[Msg], split: Split) -> PairRun {
        let mut p = Provider::new(rcfg.clone(), msgs);
        let mut c = Inbound::new(icfg.clone());
        let mut cbuf: Vec<u8> = Vec::new();
        let mut received = Vec::new();
        let mut all_to_customer = Vec::new();
        let mut customer_closed = false;
        for _round in 0..10_000 {
            // Customer -> provider.
            let replies = std::mem::take(c.output());
            for piece in pieces(&replies, split) {
                p.feed(piece);
            }
            p.pump();
            // Provider -> customer.
            let cmds = std::mem::take(&mut p.wire);
            all_to_customer.extend_from_slice(&cmds);
            for piece in pieces(&cmds, split) {
                if customer_closed {
                    break;
                }
                cbuf.extend_from_slice(piece);
                loop {
                    let n = c.handle_input(&cbuf, &Dir);
                    cbuf.drain(..n);
                    let mut acted = false;
                    while let Some(a) = c.poll_action() {
                        acted = true;
                        match a {
                            inbound::Action::Deliver(incoming) => {
                                received.push(incoming);
                                c.stored(Ok(format!("Q{}", received.len())));
                            }
                            inbound::Action::StartTls => panic!("never asked for"),
                            inbound::Action::StoreChunk(_) | inbound::Action::DiscardChunks => {
                                panic!("bodies come whole without body_chunk")
                            }
                            inbound::Action::Close => customer_closed = true,
                        }
                    }
                    if !acted || cbuf.is_empty() || customer_closed {
                        break;
                    }
                }
            }
            if replies.is_empty() && cmds.is_empty() {
                break;
            }
        }
        assert!(p.m.is_closed(), "provider finished: {:?}", p.run.events);
        PairRun {
            provider: p.run,
            to_customer: all_to_customer,
            received,
            customer_closed,
        }
    }

    fn pair_messages() -> Vec<Msg> {
        let mut m1 = dsn_msg();
        m1.out.id = "mixed".into();
        m1.body =
            b"Received: from x\r\nSubject: dots\r\n\r\n.\r\n..x\r\n.y\r\n\r\nend\r\n".to_vec();
        m1.out.size = m1.body.len() as u64;
        for r in [
            "nobody@example.org",
            "later@example.org",
            "v@example.org",
            "w@other.example",
        ] {
            m1.out.envelope.recipients.push(rcpt(r));
        }
        let refused = msg(
            "refused",
            Some("a@s.example"),
            &["nobody@example.org"],
            b"x\r\n",
        );
        let empty = msg("empty", None, &["u@example.org"], b"");
        let mut eight = msg(
            "8bit",
            Some("a@s.example"),
            &["u@example.org"],
            b"caf\xc3\xa9\r\n",
        );
        eight.out.envelope.body = BodyType::EightBitMime;
        let mut utf8 = msg(
            "utf8",
            Some("j\u{f6}rg@s.example"),
            &["δ@example.org"],
            b"x\r\n",
        );
        utf8.out.envelope.smtputf8 = true;
        let big = msg(
            "big",
            Some("a@s.example"),
            &["u@example.org"],
            &[b'z'; 5000],
        );
        vec![m1, refused, empty, eight, utf8, big]
    }

    #[test]
    fn pair_delivers_byte_identical_bodies_at_every_split() {
        let msgs = pair_messages();
        let combos = [
            (cfg(true, true), true, true),
            (cfg(true, true), true, false),
            (cfg(true, true), false, true),
            (cfg(true, true), false, false),
            (cfg(false, false), true, true),
        ];
        for (rcfg, pipelining, chunking) in combos {
            let icfg = InboundConfig {
                max_message_size: 4096,
                pipelining,
                chunking,
                ..InboundConfig::new("customer.example")
            };
            let run = pair(&rcfg, &icfg, &msgs, Split::Whole);
            let label = format!("{rcfg:?} server pipelining {pipelining} chunking {chunking}");
            let mut want = vec![
                "mixed: ok fail550 defer450 ok fail550 +dsn",
                "refused: fail550 +dsn",
                "empty: ok +dsn",
                "8bit: ok +dsn",
                "utf8: ok +dsn",
                "big: fail552",
                "close: session done",
            ];
            if rcfg.pipelining && rcfg.chunking && pipelining && chunking {
                // In the window the local refusal is reported while the others are in flight.
                let big = want.remove(5);
                want.insert(0, big);
            }
            assert_eq!(run.provider.events, want, "{label}");
            assert!(run.customer_closed, "{label}");
            // What the customer received is exactly what was stored, with the envelope kept.
            let sent: Vec<&Msg> = msgs
                .iter()
                .filter(|m| m.out.id != "refused" && m.out.id != "big")
                .collect();
            assert_eq!(run.received.len(), sent.len(), "{label}");
            for (got, want) in run.received.iter().zip(&sent) {
                assert_eq!(got.body, want.body, "{label} {}", want.out.id);
                let env = &want.out.envelope;
                assert_eq!(got.envelope.sender, env.sender);
                assert_eq!(got.envelope.smtputf8, env.smtputf8);
                assert_eq!(got.envelope.ret, env.ret);
                assert_eq!(got.envelope.envid, env.envid);
                let accepted: Vec<&Recipient> = env
                    .recipients
                    .iter()
                    .filter(|r| Dir.check_rcpt(&r.mailbox, None) == RcptVerdict::Accept)
                    .collect();
                let got_rcpts: Vec<&Recipient> = got.envelope.recipients.iter().collect();
                assert_eq!(got_rcpts, accepted, "{label}");
            }
            let uses_bdat = rcfg.chunking && chunking;
            let wire = String::from_utf8_lossy(&run.to_customer);
            assert_eq!(wire.contains("BDAT "), uses_bdat, "{label}");
            assert_eq!(wire.contains("\r\nDATA\r\n"), !uses_bdat, "{label}");
            let cut_max = run.to_customer.len().min(400);
            for cut in 0..=cut_max {
                assert_eq!(
                    pair(&rcfg, &icfg, &msgs, Split::At(cut)),
                    run,
                    "{label} cut {cut}"
                );
            }
            assert_eq!(
                pair(&rcfg, &icfg, &msgs, Split::Bytes),
                run,
                "{label} bytes"
            );
        }
    }

    #[test]
    fn pair_window_with_large_and_refused_messages() {
        let big = |id: &str, to: &str, c: u8| {
            let mut body = vec![c; PIPELINE_BODY_MAX as usize + 10];
            body.extend_from_slice(b"\r\n");
            msg(id, Some("a@s.example"), &[to], &body)
        };
        let msgs = vec![
            big("big-ok", "u@example.org", b'a'),
            msg("refused", None, &["nobody@example.org"], b"r\r\n"),
            msg(
                "small",
                None,
                &["v@example.org", "later@example.org"],
                b"s\r\n",
            ),
            big("big-refused", "nobody@example.org", b'b'),
            msg("after", None, &["w@example.org"], b"t\r\n"),
            big("big-last", "x@example.org", b'c'),
        ];
        let icfg = InboundConfig {
            max_message_size: 1 << 20,
            ..InboundConfig::new("customer.example")
        };
        let rcfg = cfg(true, true);
        let run = pair(&rcfg, &icfg, &msgs, Split::Whole);
        assert_eq!(
            run.provider.events,
            [
                "big-ok: ok +dsn",
                "refused: fail550 +dsn",
                "small: ok defer450 +dsn",
                "big-refused: fail550 +dsn",
                "after: ok +dsn",
                "big-last: ok +dsn",
                "close: session done",
            ]
        );
        let want: Vec<&[u8]> = [0, 2, 4, 5].iter().map(|&i| &msgs[i].body[..]).collect();
        let got: Vec<&[u8]> = run.received.iter().map(|m| &m.body[..]).collect();
        assert_eq!(got, want);
        // The refused large body was never sent.
        let refused_body = [b'b'; 64];
        assert!(
            !run.to_customer.windows(64).any(|w| w == refused_body),
            "refused body sent"
        );
        for cut in (0..=300).step_by(7) {
            assert_eq!(pair(&rcfg, &icfg, &msgs, Split::At(cut)), run, "cut {cut}");
        }
    }

    #[test]
    fn keepalive_noop_while_idle_then_ready_again() {
        for split in 0..=8 {
            let mut m = Reversed::new(ReversedConfig {
                hostname: "p.test".into(),
                pipelining: true,
                chunking: true,
            });
            m.handle_input(b"220 c.test ESMTP\r\n");
            m.output().clear();
            m.handle_input(b"250 c.test\r\n");
            assert!(matches!(m.poll_action(), Some(Action::NeedMessage)));
            m.keepalive();
            assert_eq!(m.output().as_slice(), b"NOOP\r\n");
            m.output().clear();
            let reply = b"250 2.0.0 Ok\r\n";
            // Fed like a driver: unconsumed bytes are presented again with the rest.
            let (a, _) = reply.split_at(split.min(reply.len()));
            let used = m.handle_input(a);
            assert_eq!(m.handle_input(&reply[used..]), reply.len() - used);
            assert!(
                matches!(m.poll_action(), Some(Action::NeedMessage)),
                "split {split}"
            );
            m.keepalive();
            m.output().clear();
            m.handle_input(b"502 5.5.1 no NOOP here\r\n");
            assert!(matches!(
                m.poll_action(),
                Some(Action::Close(CloseReason::Refused(_)))
            ));
        }
    }
}
