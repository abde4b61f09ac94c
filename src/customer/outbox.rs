//! The customer's outgoing mail queue: what the office's users submitted to the local
//! listener ([`super::outbox_listener`]), kept until the provider has answered 250 for it.
//!
//! What this owns: the `[outbox]` settings ([`OutboxConfig`]) and the queue ([`Outbox`]), a
//! spool journal of its own under `[outbox] spool` (the provider's record format, see
//! docs/spool-format.md), always core 0: `<spool>/journal/core-0/*.seg`.
//!
//! Invariants:
//! - **Queued means durable.** [`Outbox::queue`] resolves only after the `MSG` record is
//!   fdatasync'ed; the listener answers 250 only then.
//! - **Gone only after an answer.** A message leaves the queue through a durable `DONE` for
//!   each of its domain parts, written only after the provider's 250 (or its 5xx, once the
//!   sender has its report); anything else keeps it for the next session. A crash between
//!   the provider's 250 and our `DONE` sends it once more (a duplicate, never a loss).
//! - **Some recipients still to go** (a 4xx for them, 250 for the others): their copy is
//!   queued again as a new `MSG` holding only them, durably, before the old one is marked
//!   done, so nobody gets the message twice and nobody loses it.
//! - **One writer.** The journal directory is locked (`<spool>/lock`, `flock`) while open, so
//!   a one-shot `turnpike pull` next to a running daemon leaves the queue to the daemon.
//!
//! Everything runs on the single thread of `turnpike pull` (inside its `LocalSet`): the
//! listener's sessions and the upload share the [`Outbox`] through an `Rc`; no borrow of the
//! in-memory queue is held across an await.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::dsn::{self, DsnAction, Report, ReportRecipient};
use crate::proto::inbound::Incoming;
use crate::proto::reply::{EnhancedStatus, Reply};
use crate::spool::{self, IoKind, JournalConfig, JournalHandle, Location, Outcome, Reader};
pub use crate::types::Network;
use crate::types::{DomainName, Envelope, Mailbox, MessageId, Recipient};

/// Segments of the outbox journal: small (an office's queue), never preallocated.
const SEGMENT_SIZE: u64 = 4 << 20;

/// The `[outbox]` section of the pull configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Where the local submission listener listens (empty: no listener).
    pub listen: Vec<SocketAddr>,
    /// The journal directory.
    pub spool: PathBuf,
    /// Client networks allowed to submit (default: loopback only).
    pub allow: Vec<Network>,
    /// Largest message taken, in octets (advertised as SIZE).
    pub max_message_size: u64,
    /// The provider's submission port (`host`, `port`), for when its ODMR port does not take
    /// mail; same TLS mode, trust and credentials as the ODMR connection.
    pub submission: Option<(String, u16)>,
}

/// Why the outbox could not be opened.
#[derive(Debug)]
pub enum OutboxError {
    /// Another process (a `turnpike pull` daemon) has the outbox open.
    Locked(PathBuf),
    /// The directory or the lock file could not be made.
    Io(PathBuf, std::io::Error),
    /// Recovery or opening the journal failed.
    Spool(spool::Error),
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboxError::Locked(p) => write!(
                f,
                "outbox {} is in use by another turnpike pull (the daemon uploads it)",
                p.display()
            ),
            OutboxError::Io(p, e) => write!(f, "outbox {}: {e}", p.display()),
            OutboxError::Spool(e) => write!(f, "outbox journal: {e}"),
        }
    }
}

impl std::error::Error for OutboxError {}

/// One queued message, as the upload sees it.
#[derive(Clone, Debug)]
pub struct Queued {
    /// Its id in the outbox journal.
    pub id: MessageId,
    /// When the listener took it, unix seconds.
    pub received_at: u64,
    /// The envelope; `recipients` are those still to upload.
    pub envelope: Envelope,
    location: Location,
    /// The live domain parts (each gets a `DONE` when the message is finished).
    domains: Vec<DomainName>,
}

impl Queued {
    /// Body size in octets.
    pub fn size(&self) -> u64 {
        self.location.body_len
    }
}

/// The open queue.
pub struct Outbox {
    dir: PathBuf,
    journal: JournalHandle,
    reader: Reader,
    queue: RefCell<BTreeMap<MessageId, Queued>>,
    next_seq: Cell<u64>,
    _lock: File,
}

impl Outbox {
    /// Locks `dir`, recovers what is queued there and opens the journal for appends. Must run
    /// inside the `LocalSet` of `turnpike pull`.
    pub async fn open(dir: &Path, io: IoKind) -> Result<Outbox, OutboxError> {
        let lock = lock_dir(dir)?;
        let d = dir.to_path_buf();
        let mut recovered = tokio::task::spawn_blocking(move || spool::recover(&d))
            .await
            .map_err(|e| OutboxError::Io(dir.into(), std::io::Error::other(e)))?
            .map_err(OutboxError::Spool)?;
        for damage in &recovered.damage {
            tracing::warn!(path = %damage.path.display(), offset = damage.offset,
                reason = damage.reason, "outbox journal damaged; kept what was complete before");
        }
        let reader = Reader::new(dir, io);
        let mut queue: BTreeMap<MessageId, Queued> = BTreeMap::new();
        for part in std::mem::take(&mut recovered.parts) {
            if let Some(q) = queue.get_mut(&part.id) {
                q.domains.push(part.domain);
                continue;
            }
            let meta = reader
                .read_message(&part.location)
                .await
                .map_err(OutboxError::Spool)?;
            queue.insert(
                part.id,
                Queued {
                    id: part.id,
                    received_at: part.received_at,
                    envelope: meta.envelope,
                    location: part.location,
                    domains: vec![part.domain],
                },
            );
        }
        // Keep only the recipients of parts not yet done (a crash between two DONEs).
        for q in queue.values_mut() {
            let domains = q.domains.clone();
            q.envelope.recipients.retain(|r| {
                DomainName::parse(&r.mailbox.domain).is_ok_and(|d| domains.contains(&d))
            });
        }
        let dir_recovery = recovered.take_dir(0);
        let next_seq = dir_recovery
            .max_id()
            .map_or(1, |m| (m.0 as u64).wrapping_add(1));
        let mut cfg = JournalConfig::new(dir, 0, io);
        cfg.segment_size = SEGMENT_SIZE;
        cfg.preallocate = false;
        let journal = JournalHandle::open(cfg, dir_recovery)
            .await
            .map_err(OutboxError::Spool)?;
        if !queue.is_empty() {
            tracing::info!(queued = queue.len(), outbox = %dir.display(), "outgoing mail waiting for upload");
        }
        Ok(Outbox {
            dir: dir.to_path_buf(),
            journal,
            reader,
            queue: RefCell::new(queue),
            next_seq: Cell::new(next_seq),
            _lock: lock,
        })
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of queued messages.
    pub fn len(&self) -> usize {
        self.queue.borrow().len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    /// A snapshot of the queue, oldest first.
    pub fn pending(&self) -> Vec<Queued> {
        self.queue.borrow().values().cloned().collect()
    }

    /// Stores a message durably; only after `Ok` may the listener answer 250. Every recipient
    /// must have a valid domain (the listener refuses others at RCPT), or its part would not
    /// be kept.
    pub async fn queue(&self, envelope: &Envelope, body: &[u8]) -> Result<MessageId, spool::Error> {
        self.queue_as(self.next_id(), envelope, body).await
    }

    /// A fresh id for [`Outbox::queue_as`] (the listener names it in its `Received:` line).
    pub fn next_id(&self) -> MessageId {
        let seq = self.next_seq.get();
        self.next_seq.set(seq.wrapping_add(1));
        MessageId::new(now_millis(), 0, seq)
    }

    /// [`Outbox::queue`] under an id from [`Outbox::next_id`].
    pub async fn queue_as(
        &self,
        id: MessageId,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<MessageId, spool::Error> {
        let now = id.unix_millis();
        let location = self
            .journal
            .append_message(id, now / 1000, envelope, body)
            .await?;
        let domains = spool::parts_of(envelope)
            .into_iter()
            .map(|p| p.domain)
            .collect();
        self.queue.borrow_mut().insert(
            id,
            Queued {
                id,
                received_at: now / 1000,
                envelope: envelope.clone(),
                location,
                domains,
            },
        );
        Ok(id)
    }

    /// The message's body, as received (canonical CRLF, not dot-stuffed).
    pub async fn body(&self, q: &Queued) -> Result<Vec<u8>, spool::Error> {
        self.reader.read_body(&q.location).await
    }

    /// Marks the message done (durably, every part); it leaves the queue.
    pub async fn finish(&self, q: &Queued, outcome: Outcome) -> Result<(), spool::Error> {
        for domain in &q.domains {
            self.journal.append_done(q.id, domain, outcome).await?;
        }
        self.queue.borrow_mut().remove(&q.id);
        Ok(())
    }

    /// Queues `body` again for `keep` only (durably), then marks the old message done: the
    /// others have it already.
    pub async fn requeue(
        &self,
        q: &Queued,
        keep: Vec<Recipient>,
        body: &[u8],
    ) -> Result<MessageId, spool::Error> {
        let envelope = Envelope {
            recipients: keep,
            ..q.envelope.clone()
        };
        let id = self.queue(&envelope, body).await?;
        self.finish(q, Outcome::Delivered).await?;
        Ok(id)
    }

    /// Deletes journal segments that hold nothing queued any more (and compacts a mostly
    /// dead one: the messages it moved are looked up at their new place from now on).
    pub async fn reclaim(&self) {
        let report = match self.journal.reclaim().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "outbox journal reclaim failed; retried after the next session");
                return;
            }
        };
        let mut queue = self.queue.borrow_mut();
        for moved in report.relocated {
            if let Some(q) = queue.get_mut(&moved.id) {
                q.location = moved.location;
                q.domains = moved.domains;
            }
        }
        for seq in report.deleted.iter().chain(report.compacted.as_ref()) {
            self.reader.forget(0, *seq);
        }
    }

    /// Flushes the journal and stops its writer.
    pub async fn close(&self) {
        self.journal.close().await;
    }
}

/// Takes `<dir>/lock` (creating `dir`), or says who holds it.
fn lock_dir(dir: &Path) -> Result<File, OutboxError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(|e| OutboxError::Io(dir.into(), e))?;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| OutboxError::Io(path.clone(), e))?;
    // SAFETY: flock(2) on a descriptor we own; no memory is shared with the kernel.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            OutboxError::Locked(dir.into())
        } else {
            OutboxError::Io(path, e)
        });
    }
    Ok(f)
}

/// A recipient the provider refused for good, with its reply.
#[derive(Clone, Debug)]
pub struct Refused {
    /// The recipient.
    pub recipient: Recipient,
    /// The provider's reply.
    pub reply: Reply,
}

/// The RFC 3464 report to the sender of `q` about `refused`, as a message ready for the
/// Deliverer (`MAIL FROM:<>`, the sender as the only recipient); `None` for the null sender
/// (never bounce a bounce). `original` is the stored body.
pub fn bounce(
    hostname: &str,
    provider: &str,
    q: &Queued,
    original: &[u8],
    refused: &[Refused],
    now_unix: u64,
) -> Option<Incoming> {
    let sender = q.envelope.sender.as_ref()?;
    let ret = dsn::default_ret(q.envelope.ret);
    let original = match ret {
        crate::types::Ret::Full => original,
        crate::types::Ret::Hdrs => {
            let end = memchr::memmem::find(original, b"\r\n\r\n").map_or(original.len(), |i| i + 4);
            &original[..end]
        }
    };
    let recipients = refused
        .iter()
        .map(|r| ReportRecipient {
            final_recipient: &r.recipient.mailbox,
            original_recipient: r.recipient.orcpt.as_deref(),
            action: DsnAction::Failed,
            status: r.reply.status.unwrap_or(EnhancedStatus::new(5, 0, 0)),
            diagnostic: Some(reply_text(&r.reply)),
            remote_mta: Some(provider),
        })
        .collect();
    let body = dsn::build(&Report {
        reporting_mta: hostname,
        arrival_unix: q.received_at,
        now_unix,
        envid: q.envelope.envid.as_deref(),
        original_sender: Some(sender),
        recipients,
        ret,
        original,
        boundary_seed: (q.id.0 as u64) ^ now_unix.rotate_left(32),
    })?;
    Some(Incoming {
        envelope: dsn::report_envelope(sender, &body),
        body,
        helo: hostname.to_string(),
        protocol: "ESMTP",
        account: None,
    })
}

/// A reply as one line: `553 5.7.1 text`.
pub fn reply_text(r: &Reply) -> String {
    match r.status {
        Some(s) => format!("{} {s} {}", r.code, r.lines.join(" ")),
        None => format!("{} {}", r.code, r.lines.join(" ")),
    }
}

/// The sender of a queued message as a mailbox, for logs (`<>` for the null sender).
pub fn sender_text(sender: Option<&Mailbox>) -> String {
    sender.map_or_else(|| "<>".to_string(), |m| m.to_string())
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::io::block_on;

    fn mailbox(s: &str) -> Mailbox {
        let (local, domain) = s.split_once('@').unwrap();
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    fn envelope(from: &str, to: &[&str]) -> Envelope {
        Envelope {
            sender: Some(mailbox(from)),
            recipients: to
                .iter()
                .map(|t| Recipient {
                    mailbox: mailbox(t),
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            ..Envelope::default()
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).unwrap();
        std::env::temp_dir().join(format!("turnpike-{tag}-{:016x}", u64::from_le_bytes(r)))
    }

    #[test]
    fn networks_match_by_prefix() {
        let cases = [
            ("127.0.0.0/8", "127.1.2.3", true),
            ("127.0.0.0/8", "128.0.0.1", false),
            ("192.168.1.0/24", "192.168.1.77", true),
            ("192.168.1.0/24", "192.168.2.1", false),
            ("10.0.0.1", "10.0.0.1", true),
            ("10.0.0.1", "10.0.0.2", false),
            ("0.0.0.0/0", "8.8.8.8", true),
            ("::1/128", "::1", true),
            ("::1/128", "127.0.0.1", false),
            ("fd00::/8", "fd12::5", true),
            ("127.0.0.0/8", "::ffff:127.0.0.1", true),
        ];
        for (net, ip, want) in cases {
            let n = Network::parse(net).unwrap();
            assert_eq!(n.contains(ip.parse().unwrap()), want, "{net} {ip}");
        }
        for bad in ["", "10.0.0.0/33", "::/129", "host.example/8", "10.0.0.0/x"] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn queued_mail_survives_a_restart_until_finished_and_partial_requeues() {
        let dir = temp_dir("outbox");
        let body = b"Subject: hi\r\n\r\nhello\r\n".to_vec();
        block_on(IoKind::Epoll, async {
            let ob = Outbox::open(&dir, IoKind::Epoll).await.unwrap();
            // Only one writer at a time.
            assert!(matches!(
                Outbox::open(&dir, IoKind::Epoll).await,
                Err(OutboxError::Locked(_))
            ));
            ob.queue(
                &envelope("a@office.test", &["x@far.test", "y@other.test"]),
                &body,
            )
            .await
            .unwrap();
            ob.queue(&envelope("b@office.test", &["z@far.test"]), &body)
                .await
                .unwrap();
            assert_eq!(ob.len(), 2);
            ob.close().await;
        })
        .unwrap();
        block_on(IoKind::Epoll, async {
            let ob = Outbox::open(&dir, IoKind::Epoll).await.unwrap();
            let pending = ob.pending();
            assert_eq!(pending.len(), 2, "both recovered");
            assert_eq!(ob.body(&pending[0]).await.unwrap(), body);
            // The first: y@ still to go (a 4xx), x@ has it.
            let keep = vec![pending[0].envelope.recipients[1].clone()];
            ob.requeue(&pending[0], keep, &body).await.unwrap();
            // The second: done.
            ob.finish(&pending[1], Outcome::Delivered).await.unwrap();
            assert_eq!(ob.len(), 1);
            ob.close().await;
        })
        .unwrap();
        block_on(IoKind::Epoll, async {
            let ob = Outbox::open(&dir, IoKind::Epoll).await.unwrap();
            let pending = ob.pending();
            assert_eq!(pending.len(), 1);
            let rcpts: Vec<String> = pending[0]
                .envelope
                .recipients
                .iter()
                .map(|r| r.mailbox.to_string())
                .collect();
            assert_eq!(rcpts, ["y@other.test"]);
            ob.finish(&pending[0], Outcome::Bounced).await.unwrap();
            ob.reclaim().await;
            ob.close().await;
        })
        .unwrap();
        let rec = spool::recover(&dir).unwrap();
        assert!(rec.parts.is_empty(), "nothing left: {:?}", rec.parts);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reclaim_compacts_and_the_queue_follows_the_moved_messages() {
        let dir = temp_dir("outbox-compact");
        block_on(IoKind::Epoll, async {
            let ob = Outbox::open(&dir, IoKind::Epoll).await.unwrap();
            let big = vec![b'x'; 3 << 20];
            let small = b"Subject: keep me\r\n\r\nsmall\r\n".to_vec();
            let env = envelope("a@office.test", &["x@far.test"]);
            ob.queue(&env, &big).await.unwrap();
            ob.queue(&env, &small).await.unwrap();
            // Does not fit the first segment: a second one starts.
            ob.queue(&env, &big).await.unwrap();
            let pending = ob.pending();
            ob.finish(&pending[0], Outcome::Delivered).await.unwrap();
            let before = ob.pending()[0].location;
            ob.reclaim().await;
            let kept = ob.pending()[0].clone();
            assert_ne!(
                kept.location, before,
                "the small message was copied forward"
            );
            assert_eq!(ob.body(&kept).await.unwrap(), small);
            ob.close().await;
        })
        .unwrap();
        let rec = spool::recover(&dir).unwrap();
        assert_eq!(rec.parts.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bounce_reports_each_refused_recipient_to_the_sender() {
        let q = Queued {
            id: MessageId::new(1, 0, 1),
            received_at: 1_700_000_000,
            envelope: envelope("a@office.test", &["x@far.test"]),
            location: Location {
                core: 0,
                seq: 1,
                offset: 0,
                len: 0,
                body_offset: 0,
                body_len: 0,
                body_crc: 0,
            },
            domains: vec![],
        };
        let refused = [Refused {
            recipient: q.envelope.recipients[0].clone(),
            reply: Reply::with_status(553, (5, 7, 1), "not your address"),
        }];
        let original = b"Subject: hi\r\n\r\nsecret body\r\n";
        let m = bounce(
            "gw.office.test",
            "mx.test",
            &q,
            original,
            &refused,
            1_700_000_100,
        )
        .unwrap();
        assert_eq!(m.envelope.sender, None);
        assert_eq!(m.envelope.recipients[0].mailbox, mailbox("a@office.test"));
        let text = String::from_utf8(m.body).unwrap();
        assert!(
            text.contains("Final-Recipient: rfc822; x@far.test"),
            "{text}"
        );
        assert!(text.contains("Status: 5.7.1"), "{text}");
        assert!(
            text.contains("Diagnostic-Code: smtp; 553 5.7.1 not your address"),
            "{text}"
        );
        assert!(text.contains("Subject: hi"), "{text}");
        assert!(
            !text.contains("secret body"),
            "headers only by default: {text}"
        );
        // Never bounce a bounce.
        let mut null = q.clone();
        null.envelope.sender = None;
        assert!(bounce("gw", "mx", &null, original, &refused, 0).is_none());
    }
}
