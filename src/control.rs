//! The local control socket (`<data>/control.sock`) and the `turnpike queue` views.
//!
//! Protocol: the client writes one line (`summary`, `domain <name>`, `reclaim`, `reload`, ...), the server
//! answers with one JSON document and closes. The server side runs on its own thread and asks
//! the cores over the mesh, so it never touches a core's state directly. When no server is
//! running, `turnpike queue` builds the same views by reading the journal (recovery is
//! read-only), so the operator sees the same thing either way.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::provider::core::{MeshMsg, Query, QueryAnswer};
use crate::provider::quarantine::{Operation, Scope};
use crate::runtime::mesh::Mesh;
use crate::spool;
use crate::types::DomainName;

/// How long the control thread waits for the cores to answer.
const CORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Held mail per domain, as `turnpike queue` prints it.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueSummary {
    /// One row per domain with held mail, sorted by domain.
    pub domains: Vec<DomainRow>,
    /// The outbound queue by destination, with its retry schedule (only from a running
    /// server; the schedule is not journaled).
    #[serde(default)]
    pub outbound: Vec<crate::relay::OutboundRow>,
    /// Held parts whose stored copy is damaged, skipped until the operator bounces or
    /// deletes them (only from a running server).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<QuarantineRow>,
    /// Disk space and the journal writers' state, when a writer is short of space or stopped,
    /// or mail was refused for lack of space since start (only from a running server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageView>,
}

/// One quarantined part.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuarantineRow {
    /// Message id (what `turnpike queue bounce|delete` takes).
    pub id: String,
    /// The part's domain.
    pub domain: String,
    /// Stored size in bytes.
    pub size: u64,
    /// Arrival, unix seconds.
    pub received: u64,
    /// Envelope sender; empty for `<>`.
    pub sender: String,
    /// The part's recipients.
    pub recipients: Vec<String>,
    /// What is wrong with the stored copy.
    pub reason: String,
    /// When it was quarantined, unix seconds.
    pub since: u64,
}

/// Disk space for held mail and the state of each journal writer.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StorageView {
    /// Bytes free for the service user on the data directory's file system.
    pub free_bytes: Option<u64>,
    /// One row per journal writer (only from a running server).
    pub journals: Vec<JournalRow>,
}

/// One journal writer (`journal/core-N`).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JournalRow {
    /// The journal directory's core number.
    pub core: u16,
    /// `ok`, `short_of_space` (new mail refused with 452 4.3.1) or `poisoned` (a failed
    /// write or fdatasync; restart needed).
    pub state: String,
    /// Seconds the writer has been short of space.
    pub short_for_secs: Option<u64>,
    /// Messages refused for lack of space since start.
    pub refused: u64,
}

impl JournalRow {
    fn from_status(s: &spool::JournalStatus) -> JournalRow {
        let state = if s.poisoned {
            "poisoned"
        } else if s.short_for.is_some() {
            "short_of_space"
        } else {
            "ok"
        };
        JournalRow {
            core: s.core,
            state: state.to_string(),
            short_for_secs: s.short_for.map(|d| d.as_secs()),
            refused: s.no_space_refused,
        }
    }
}

/// One domain's totals.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainRow {
    /// The domain.
    pub domain: String,
    /// Held message parts.
    pub messages: u64,
    /// Held bytes.
    pub bytes: u64,
    /// Arrival of the oldest held part, unix seconds.
    pub oldest: u64,
}

/// The held messages of one domain, as `turnpike queue show DOMAIN` prints them.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainListing {
    /// The domain.
    pub domain: String,
    /// Held parts, oldest first.
    pub messages: Vec<MessageRow>,
}

/// One held message part.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRow {
    /// Message id (32 hex digits).
    pub id: String,
    /// Stored size in bytes (with our Received: line).
    pub size: u64,
    /// Arrival, unix seconds.
    pub received: u64,
    /// Envelope sender; empty for the null sender `<>`.
    pub sender: String,
    /// The recipients in this domain.
    pub recipients: Vec<String>,
    /// True when the part passed the maximum hold time and waits for its bounce.
    pub expired: bool,
}

fn summary_from(stats: impl IntoIterator<Item = (DomainName, spool::DomainStats)>) -> QueueSummary {
    let mut domains: Vec<DomainRow> = stats
        .into_iter()
        .filter(|(_, s)| s.messages > 0)
        .map(|(domain, s)| DomainRow {
            domain: domain.to_string(),
            messages: s.messages,
            bytes: s.bytes,
            oldest: s.oldest.unwrap_or(0),
        })
        .collect();
    domains.sort_by(|a, b| a.domain.cmp(&b.domain));
    QueueSummary {
        domains,
        outbound: Vec::new(),
        quarantined: Vec::new(),
        storage: None,
    }
}

fn listing_from(
    domain: &DomainName,
    parts: impl IntoIterator<Item = spool::HeldPart>,
) -> DomainListing {
    let mut messages: Vec<MessageRow> = parts
        .into_iter()
        .map(|p| MessageRow {
            id: p.id.to_string(),
            size: p.bytes,
            received: p.received_at,
            sender: p.sender.as_ref().map(|m| m.to_string()).unwrap_or_default(),
            recipients: p.recipients.iter().map(|r| r.mailbox.to_string()).collect(),
            expired: p.expired,
        })
        .collect();
    messages.sort_by(|a, b| (a.received, &a.id).cmp(&(b.received, &b.id)));
    DomainListing {
        domain: domain.to_string(),
        messages,
    }
}

/// Removes the socket file when the server stops.
pub struct ControlGuard(PathBuf);

impl Drop for ControlGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts the control socket thread.
pub fn spawn_server(data_dir: &Path, mesh: Arc<Mesh<MeshMsg>>) -> io::Result<ControlGuard> {
    let path = data_dir.join("control.sock");
    // A stale socket from a killed server; the data-dir lock proves no server owns it now.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let data_dir = data_dir.to_path_buf();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("turnpike-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = answer(s, &mesh, &data_dir) {
                            tracing::debug!(error = %e, "control request failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "control accept failed"),
                }
            }
        })?;
    Ok(ControlGuard(path))
}

fn answer(stream: UnixStream, mesh: &Mesh<MeshMsg>, data_dir: &Path) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let line = line.trim();
    let json = if line == "summary" {
        let (tx, rx) = std::sync::mpsc::channel();
        for core in 0..mesh.cores() {
            mesh.send(core, MeshMsg::Query(Query::Summary, tx.clone()));
        }
        let mut stats = Vec::new();
        for _ in 0..mesh.cores() {
            if let Ok(QueryAnswer::Summary(s)) = rx.recv_timeout(CORE_ANSWER_TIMEOUT) {
                stats.extend(s);
            }
        }
        let mut summary = summary_from(stats);
        summary.outbound = ask_all(mesh, |tx| MeshMsg::Relay(crate::relay::Command::Status(tx)))
            .into_iter()
            .flatten()
            .collect();
        summary
            .outbound
            .sort_by(|a, b| a.destination.cmp(&b.destination));
        let mut journals: Vec<JournalRow> = ask_all(mesh, |tx| MeshMsg::Query(Query::Storage, tx))
            .into_iter()
            .flat_map(|a| match a {
                QueryAnswer::Storage(s) => s,
                _ => Vec::new(),
            })
            .map(|s| JournalRow::from_status(&s))
            .collect();
        journals.sort_by_key(|j| j.core);
        summary.quarantined = ask_all(mesh, |tx| MeshMsg::Query(Query::Quarantined, tx))
            .into_iter()
            .flat_map(|a| match a {
                QueryAnswer::Quarantined(q) => q,
                _ => Vec::new(),
            })
            .map(|q| QuarantineRow {
                id: q.part.id.to_string(),
                domain: q.part.domain.to_string(),
                size: q.part.bytes,
                received: q.part.received_at,
                sender: q
                    .part
                    .sender
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                recipients: q
                    .part
                    .recipients
                    .iter()
                    .map(|r| r.mailbox.to_string())
                    .collect(),
                reason: q.reason,
                since: q.since,
            })
            .collect();
        summary
            .quarantined
            .sort_by(|a, b| (&a.id, &a.domain).cmp(&(&b.id, &b.domain)));
        // Shown when there is something to see: a writer short of space or stopped, or mail
        // refused for lack of space since start.
        if journals.iter().any(|j| j.state != "ok" || j.refused > 0) {
            summary.storage = Some(StorageView {
                free_bytes: spool::free_bytes(data_dir).ok(),
                journals,
            });
        }
        serde_json::to_string(&summary)?
    } else if let Some(name) = line.strip_prefix("retry ") {
        let domain =
            DomainName::parse(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let shard = (domain.shard_hash() % mesh.cores() as u64) as usize;
        let (tx, rx) = std::sync::mpsc::channel();
        mesh.send(
            shard,
            MeshMsg::Relay(crate::relay::Command::Retry(domain, tx)),
        );
        let queued = rx.recv_timeout(CORE_ANSWER_TIMEOUT).unwrap_or(0);
        format!("{{\"retry\":{queued}}}")
    } else if let Some(id) = line.strip_prefix("bounce ") {
        let id = crate::types::MessageId::parse(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a message id"))?;
        let answers = ask_all(mesh, |tx| {
            MeshMsg::Relay(crate::relay::Command::Bounce(id, tx))
        });
        if answers.iter().any(Option::is_none) {
            "{\"bounced\":null,\"busy\":true}".to_string()
        } else {
            let n: u64 = answers.into_iter().flatten().sum();
            let q = operate(mesh, id, Operation::Bounce);
            format!("{{\"bounced\":{}}}", n + q)
        }
    } else if let Some(id) = line.strip_prefix("delete ") {
        let id = crate::types::MessageId::parse(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a message id"))?;
        format!("{{\"deleted\":{}}}", operate(mesh, id, Operation::Delete))
    } else if let Some(name) = line.strip_prefix("domain ") {
        let domain =
            DomainName::parse(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let shard = (domain.shard_hash() % mesh.cores() as u64) as usize;
        let (tx, rx) = std::sync::mpsc::channel();
        mesh.send(shard, MeshMsg::Query(Query::Domain(domain.clone()), tx));
        let parts = match rx.recv_timeout(CORE_ANSWER_TIMEOUT) {
            Ok(QueryAnswer::Domain(p)) => p,
            _ => Vec::new(),
        };
        serde_json::to_string(&listing_from(&domain, parts))?
    } else if line == "reclaim" {
        let (mut deleted, mut compacted, mut moved) = (0, 0, 0);
        for (d, c, m) in ask_all(mesh, MeshMsg::Reclaim) {
            deleted += d;
            compacted += c;
            moved += m;
        }
        format!("{{\"deleted\":{deleted},\"compacted\":{compacted},\"moved\":{moved}}}")
    } else if line == "reload" {
        // The main thread owns reloads; SIGHUP is how it is told.
        // SAFETY: sending a signal to our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
        "{\"reload\":\"requested\"}".to_string()
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown request {line:?}"),
        ));
    };
    (&stream).write_all(json.as_bytes())?;
    (&stream).write_all(b"\n")
}

/// Applies an operator's [`Operation`] to message `id` on every core; the parts finished.
/// Quarantined parts only, for now (the scope other held mail will use is the same request).
fn operate(mesh: &Mesh<MeshMsg>, id: crate::types::MessageId, op: Operation) -> u64 {
    ask_all(mesh, |reply| MeshMsg::Operator {
        id,
        op,
        scope: Scope::Quarantined,
        reply,
    })
    .into_iter()
    .map(|n| n as u64)
    .sum()
}

/// Asks every core and collects the answers that came in time.
fn ask_all<T>(mesh: &Mesh<MeshMsg>, msg: impl Fn(std::sync::mpsc::Sender<T>) -> MeshMsg) -> Vec<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    for core in 0..mesh.cores() {
        mesh.send(core, msg(tx.clone()));
    }
    drop(tx);
    let deadline = std::time::Instant::now() + CORE_ANSWER_TIMEOUT;
    let mut out = Vec::new();
    for _ in 0..mesh.cores() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(a) => out.push(a),
            Err(_) => break,
        }
    }
    out
}

/// Sends one request to a running server; `Ok(None)` when no server is listening.
pub fn request(data_dir: &Path, line: &str) -> io::Result<Option<String>> {
    let path = data_dir.join("control.sock");
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    (&stream).write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    BufReader::new(&stream).read_line(&mut out)?;
    Ok(Some(out))
}

/// The queue summary, from the running server or, if none runs, from the journal.
pub fn queue_summary(data_dir: &Path) -> io::Result<QueueSummary> {
    if let Some(json) = request(data_dir, "summary")? {
        return serde_json::from_str(&json).map_err(io::Error::other);
    }
    let recovered = spool::recover(data_dir).map_err(io::Error::other)?;
    let mut index = spool::DomainIndex::new();
    for part in recovered.parts {
        index.insert(part);
    }
    Ok(summary_from(index.all_stats()))
}

/// One domain's held messages, from the running server or from the journal.
pub fn queue_domain(data_dir: &Path, domain: &DomainName) -> io::Result<DomainListing> {
    if let Some(json) = request(data_dir, &format!("domain {domain}"))? {
        return serde_json::from_str(&json).map_err(io::Error::other);
    }
    let recovered = spool::recover(data_dir).map_err(io::Error::other)?;
    let parts = recovered.parts.into_iter().filter(|p| &p.domain == domain);
    Ok(listing_from(domain, parts))
}

/// Renders the summary like `mailq`: one row per domain and a total line.
pub fn render_summary(s: &QueueSummary, now: u64) -> String {
    let mut out = render_domains(s, now);
    if !s.quarantined.is_empty() {
        out += "\nQUARANTINED (stored copy damaged; turnpike queue bounce|delete ID)\n";
        out += &format!(
            "{:<32} {:<24} {:>10} {:>8}  REASON\n",
            "ID", "DOMAIN", "SIZE", "AGE"
        );
        for q in &s.quarantined {
            out += &format!(
                "{:<32} {:<24} {:>10} {:>8}  {}\n",
                q.id,
                q.domain,
                q.size,
                age(now.saturating_sub(q.received)),
                q.reason
            );
        }
    }
    if let Some(st) = &s.storage {
        out += &render_storage(st);
    }
    out
}

/// The storage lines: free space, and every journal writer that is not fine.
fn render_storage(st: &StorageView) -> String {
    let mut out = String::new();
    if let Some(free) = st.free_bytes {
        out += &format!("\nStorage: {} free\n", human_bytes(free));
    }
    for j in &st.journals {
        match j.state.as_str() {
            "short_of_space" => {
                out += &format!(
                    "journal core-{}: SHORT OF SPACE for {}: new mail refused (452 4.3.1), {} \
                     refused; deliveries still recorded\n",
                    j.core,
                    age(j.short_for_secs.unwrap_or(0)),
                    j.refused
                )
            }
            "poisoned" => {
                out += &format!(
                    "journal core-{}: STOPPED after a failed write or fdatasync: new mail gets \
                     451; restart the server (see the log)\n",
                    j.core
                )
            }
            _ if j.refused > 0 => {
                out += &format!(
                    "journal core-{}: ok ({} refused for lack of space since start)\n",
                    j.core, j.refused
                )
            }
            _ => {}
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n < 10 << 10 => format!("{n} bytes"),
        n if n < 10 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 10 << 30 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
    }
}

fn render_domains(s: &QueueSummary, now: u64) -> String {
    if s.domains.is_empty() {
        return "Hold is empty.\n".to_string();
    }
    let mut out = format!(
        "{:<40} {:>9} {:>12}  {}\n",
        "DOMAIN", "MESSAGES", "BYTES", "OLDEST"
    );
    let (mut msgs, mut bytes) = (0, 0);
    for d in &s.domains {
        msgs += d.messages;
        bytes += d.bytes;
        out += &format!(
            "{:<40} {:>9} {:>12}  {}\n",
            d.domain,
            d.messages,
            d.bytes,
            age(now.saturating_sub(d.oldest))
        );
    }
    out += &format!(
        "-- {msgs} held message parts, {bytes} bytes in {} domains\n",
        s.domains.len()
    );
    if !s.outbound.is_empty() {
        out += &format!(
            "\n{:<40} {:>9} {:>8}  {:<10} LAST ERROR\n",
            "OUTBOUND DESTINATION", "MESSAGES", "ATTEMPTS", "NEXT"
        );
        for o in &s.outbound {
            let next = if o.active {
                "now".to_string()
            } else if o.next_attempt <= now {
                "due".to_string()
            } else {
                format!("in {}", age(o.next_attempt - now))
            };
            out += &format!(
                "{:<40} {:>9} {:>8}  {:<10} {}\n",
                o.destination,
                o.messages,
                o.attempts,
                next,
                o.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    out
}

/// Renders one domain's messages, oldest first.
pub fn render_listing(l: &DomainListing, now: u64) -> String {
    if l.messages.is_empty() {
        return format!("No mail held for {}.\n", l.domain);
    }
    let mut out = format!(
        "{:<32} {:>10} {:>8}  SENDER -> RECIPIENTS\n",
        "ID", "SIZE", "AGE"
    );
    for m in &l.messages {
        let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
        out += &format!(
            "{:<32} {:>10} {:>8}  {} -> {}{}\n",
            m.id,
            m.size,
            age(now.saturating_sub(m.received)),
            sender,
            m.recipients.join(", "),
            if m.expired {
                "  (expired, awaiting bounce)"
            } else {
                ""
            }
        );
    }
    out
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(7200), "2h");
        assert_eq!(age(3 * 86_400), "3d");
    }

    #[test]
    fn outbound_destinations_show_their_schedule() {
        let s = QueueSummary {
            domains: vec![DomainRow {
                domain: "far.example".into(),
                messages: 2,
                bytes: 300,
                oldest: 1_000,
            }],
            outbound: vec![crate::relay::OutboundRow {
                destination: "far.example".into(),
                messages: 2,
                next_attempt: 1_600,
                attempts: 3,
                last_error: Some("connect to 192.0.2.7:25: Connection refused".into()),
                active: false,
            }],
            quarantined: Vec::new(),
            storage: None,
        };
        let text = render_summary(&s, 1_000);
        let row = text.lines().last().unwrap();
        assert!(text.contains("OUTBOUND DESTINATION"), "{text}");
        assert!(row.starts_with("far.example"), "{row}");
        assert!(row.contains(" 3  in 10m "), "{row}");
        assert!(row.ends_with("Connection refused"), "{row}");
    }

    #[test]
    fn empty_hold_says_so() {
        assert_eq!(
            render_summary(&QueueSummary::default(), 0),
            "Hold is empty.\n"
        );
    }
}
