//! The inbound SMTP server state machine (the provider as MX): RFC 5321 with PIPELINING
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
//!    - [`Action::Deliver`]: store the message durably, then call [`Inbound::stored`] with the
//!      queue id or an error reply. Until then the machine consumes no input, so nothing the
//!      client pipelined after the message is answered before the message is (RFC 5321 §4.1.4:
//!      a 250 after DATA means we own the message).
//!    - [`Action::StartTls`]: flush the output (it ends with the 220), **discard every
//!      buffered plaintext byte** (RFC 3207 §6, the STARTTLS injection class), run the handshake,
//!      then call [`Inbound::tls_started`].
//!    - [`Action::Close`]: flush the output and close the connection.
//! 4. On an idle timeout, call [`Inbound::timed_out`] and go to step 1; it queues a Close.
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
//! - AUTH, ATRN and ETRN are `502 5.5.1` in MX mode (the ODMR mode will implement them).

use std::collections::VecDeque;
use std::mem;

use crate::proto::command::{Command, MailParams};
use crate::proto::data::{ChunkAccumulator, DataOutcome, DataScanner, Progress};
use crate::proto::frame::{Frame, FrameError, Framer};
use crate::proto::reply::{self, Reply};
use crate::proto::trace::Protocol;
use crate::types::{BodyType, Envelope, Mailbox, Notify, Recipient};

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
        }
    }
}

/// Recipient policy, consulted for every syntactically valid RCPT.
pub trait Directory {
    /// Decides whether `rcpt` is accepted; `declared_size` is MAIL's SIZE=, if any.
    fn check_rcpt(&self, rcpt: &Mailbox, declared_size: Option<u64>) -> RcptVerdict;
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
    /// Store this message durably, then call [`Inbound::stored`].
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
    /// Canonical CRLF body, unstuffed, without our `Received:` field.
    pub body: Vec<u8>,
    /// The EHLO/HELO name, for the `Received:` field.
    pub helo: String,
    /// The RFC 3848 "with" type for the `Received:` field ("ESMTP", "ESMTPS", ...).
    pub protocol: &'static str,
}

/// Which service the machine provides. Only the MX service exists so far; the ODMR listener
/// will add a mode in which AUTH and ATRN are implemented, dispatched in `Inbound::command`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Mx,
}

/// What the session learnt from EHLO/HELO and TLS; forgotten on STARTTLS (RFC 3207 §4.2).
#[derive(Clone, Debug, Default)]
struct Session {
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
}

/// One mail transaction, from MAIL to the end of the message.
#[derive(Debug)]
struct Transaction {
    envelope: Envelope,
    declared_size: Option<u64>,
    body: Vec<u8>,
    /// Set once a BDAT chunk has been accepted: the transaction is in BDAT mode.
    chunks: Option<ChunkAccumulator>,
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
    },
    AwaitStored,
    AwaitTls,
    Closed,
}

/// The inbound SMTP server machine for one connection.
#[derive(Debug)]
pub struct Inbound {
    cfg: InboundConfig,
    mode: Mode,
    phase: Phase,
    session: Session,
    framer: Framer,
    out: Vec<u8>,
    actions: VecDeque<Action>,
    /// Error replies sent so far.
    errors: u32,
    /// Command lines since the last progress.
    idle: u32,
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
            phase: Phase::AwaitHelo,
            out: Vec::with_capacity(512),
            actions: VecDeque::new(),
            errors: 0,
            idle: 0,
        };
        reply::greeting(&m.cfg.hostname).write_to(&mut m.out);
        m
    }

    /// Consumes input and returns how many bytes were used. Stops early, leaving the rest for
    /// a later call, when it must wait for the driver (an action is pending) or needs more
    /// bytes to complete a line.
    pub fn handle_input(&mut self, input: &[u8], dir: &dyn Directory) -> usize {
        let mut pos = 0;
        while pos < input.len() && self.actions.is_empty() {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::AwaitStored | Phase::AwaitTls | Phase::Closed => break,
                Phase::ReadingData { txn, scanner } => match scanner.feed(rest, &mut txn.body) {
                    Progress::NeedMore => pos = input.len(),
                    Progress::Finished { consumed } => {
                        pos += consumed;
                        self.end_of_data();
                    }
                },
                Phase::ReadingBdat {
                    txn,
                    remaining,
                    refusal,
                    ..
                } => {
                    let n = rest
                        .len()
                        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
                    if let (Some(txn), None) = (txn, refusal) {
                        if let Some(chunks) = txn.chunks.as_mut() {
                            chunks.push(&rest[..n], &mut txn.body);
                        }
                    }
                    *remaining -= n as u64;
                    pos += n;
                    if *remaining == 0 {
                        self.end_of_chunk();
                    }
                }
                Phase::AwaitHelo | Phase::AwaitMail | Phase::AwaitRcpt(_) => {
                    match self.framer.next_line(rest) {
                        Frame::Incomplete => break,
                        Frame::Skipped { consumed } => pos += consumed,
                        Frame::Invalid { error, consumed } => {
                            pos += consumed;
                            self.frame_error(error);
                        }
                        Frame::Line { line, consumed } => {
                            pos += consumed;
                            self.command(line, pos < input.len(), dir);
                        }
                    }
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
        self.phase = Phase::Closed;
        self.actions.push_back(Action::Close);
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
        let text = match error {
            FrameError::TooLong => "Line too long",
            FrameError::BareLf => "Bare LF received, lines must end in CRLF",
            FrameError::BareCr => "Bare CR received, lines must end in CRLF",
        };
        self.reply(Reply::with_status(500, (5, 5, 2), text));
        self.check_limits();
    }

    fn command(&mut self, line: &[u8], more_input: bool, dir: &dyn Directory) {
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
        match cmd {
            Command::Ehlo(name) => self.ehlo(name, true),
            Command::Helo(name) => self.ehlo(name, false),
            Command::Mail { sender, params } => self.mail(sender, params),
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
            Command::Help => self.reply(Reply::with_status(
                214,
                (2, 0, 0),
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS",
            )),
            Command::StartTls => self.starttls(),
            Command::Auth { .. } | Command::Atrn(_) | Command::Etrn(_) => match self.mode {
                Mode::Mx => self.reply(reply::not_implemented()),
            },
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
        let offers: [(bool, std::borrow::Cow<'static, str>); 8] = [
            (c.pipelining, "PIPELINING".into()),
            (true, size.into()),
            (true, "8BITMIME".into()),
            (c.smtputf8, "SMTPUTF8".into()),
            (true, "ENHANCEDSTATUSCODES".into()),
            (c.chunking, "CHUNKING".into()),
            (c.tls_available && !self.session.tls, "STARTTLS".into()),
            (true, "DSN".into()),
        ];
        let mut lines = vec![host.into()];
        lines.extend(offers.into_iter().filter(|(on, _)| *on).map(|(_, ext)| ext));
        self.reply(Reply {
            code: 250,
            status: None,
            lines,
        });
    }

    fn mail(&mut self, sender: Option<Mailbox>, params: MailParams) {
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
        let envelope = Envelope {
            sender,
            body: params.body,
            smtputf8: params.smtputf8,
            ret: params.ret,
            envid: params.envid,
            recipients: Vec::new(),
        };
        self.phase = Phase::AwaitRcpt(Box::new(Transaction {
            envelope,
            declared_size: params.size,
            body: Vec::new(),
            chunks: None,
        }));
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
        match dir.check_rcpt(&mailbox, txn.declared_size) {
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
        let refusal = match &self.phase {
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
            self.reply(r);
            return self.check_limits();
        }
        let Some(mut txn) = txn else { return };
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
        if let Some(r) = verdict(&outcome, self.cfg.max_hops) {
            self.phase = Phase::AwaitMail;
            self.reply(r);
            return self.check_limits();
        }
        let protocol = Protocol {
            esmtp: self.session.esmtp,
            tls: self.session.tls,
            auth: false,
            utf8: txn.envelope.smtputf8,
        };
        let Transaction { envelope, body, .. } = txn;
        self.phase = Phase::AwaitStored;
        self.actions.push_back(Action::Deliver(Incoming {
            envelope,
            body,
            helo: self.session.helo.clone().unwrap_or_default(),
            protocol: protocol.with_type(),
        }));
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
    }

    /// What a session produced, independent of how the input was split.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Run {
        output: String,
        delivered: Vec<Incoming>,
        tls_started: bool,
        closed: bool,
    }

    /// A driver as the runtime implements it: a read buffer that keeps unconsumed bytes, every
    /// action obeyed, and input re-presented after each action. `flights` are the client's
    /// writes, each sent only once the previous one has been fully answered.
    fn drive(cfg: &InboundConfig, flights: &[Vec<&[u8]>]) -> Run {
        let mut m = Inbound::new(cfg.clone());
        let mut run = Run::default();
        let mut buf: Vec<u8> = Vec::new();
        let take_output = |m: &mut Inbound, run: &mut Run| {
            run.output.push_str(&String::from_utf8_lossy(m.output()));
            m.output().clear();
        };
        take_output(&mut m, &mut run);
        'flights: for pieces in flights {
            for piece in pieces {
                buf.extend_from_slice(piece);
                loop {
                    let n = m.handle_input(&buf, &Dir);
                    buf.drain(..n);
                    take_output(&mut m, &mut run);
                    let mut acted = false;
                    while let Some(action) = m.poll_action() {
                        acted = true;
                        match action {
                            Action::Deliver(incoming) => {
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
                            }
                            Action::Close => {
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
        run
    }

    /// Runs a transcript with each flight whole only: for sync-point violations, whose outcome
    /// by definition depends on what had arrived when the command was read.
    fn check_whole(cfg: &InboundConfig, script: &str) -> Run {
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
}
