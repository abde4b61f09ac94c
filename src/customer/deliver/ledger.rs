//! The delivered-recipients ledger: which recipients already have a message, in case the
//! provider sends it again.
//!
//! The provider sends a message again after a mixed outcome (some recipients delivered, some
//! failed temporarily, so it got a 4xx and keeps the whole message), and after a 250 that
//! never reached it (the connection broke, or we were killed right after delivering). Every
//! delivered recipient is recorded before we answer; when the message comes back, recorded
//! recipients are answered "already delivered" without a second delivery.
//!
//! Format: one line per recipient, `<unix secs> <key> <recipient>\n`, appended and
//! fdatasynced before the 4xx is sent. `key` is the SHA-256 of the envelope sender and the
//! body exactly as received; the provider's own `Received:` line (with its queue id and
//! time) is part of that body, so two different messages never share a key, while a resent
//! one always does. Entries older than the keep time (the provider's retry window) are
//! dropped when the ledger is opened; the file is then rewritten (temp file, rename).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::types::Mailbox;

/// An open ledger.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    file: File,
    entries: HashMap<(String, String), u64>,
    keep: Duration,
    /// Lines in the file, live or expired: a long-running `pull --every` compacts when most
    /// of them have expired.
    lines: usize,
    last_prune: u64,
}

/// How often a long-lived ledger forgets expired entries.
const PRUNE_EVERY_SECS: u64 = 60 * 60;

impl Ledger {
    /// Opens (or creates) the ledger at `path`, forgetting entries older than `keep`.
    pub fn open(path: &Path, keep: Duration, now_secs: u64) -> io::Result<Ledger> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut entries = HashMap::new();
        let mut lines = 0;
        for line in text.split_inclusive('\n') {
            // A torn last line (a crash mid-append) has no newline: its entry was never relied
            // upon. It is dropped here and the rewrite below keeps later appends off it.
            let Some(line) = line.strip_suffix('\n') else {
                continue;
            };
            let mut f = line.splitn(3, ' ');
            let (Some(secs), Some(key), Some(rcpt)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Ok(secs) = secs.parse::<u64>() else {
                continue;
            };
            if key.len() == 64 {
                entries.insert((key.to_string(), rcpt.to_string()), secs);
                lines += 1;
            }
        }
        let whole = text.is_empty() || text.ends_with('\n');
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let mut ledger = Ledger {
            path: path.to_path_buf(),
            file,
            entries,
            keep,
            lines,
            last_prune: now_secs,
        };
        ledger.forget_expired(now_secs);
        if !whole || ledger.lines != ledger.entries.len() {
            ledger.compact()?;
        }
        Ok(ledger)
    }

    /// Where the ledger lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when `rcpt` already has the message with this key.
    pub fn contains(&self, key: &str, rcpt: &Mailbox) -> bool {
        self.entries.contains_key(&(key.to_string(), normal(rcpt)))
    }

    /// Records that `rcpts` have the message; returns once the lines are on disk.
    pub fn record(&mut self, key: &str, rcpts: &[&Mailbox], now_secs: u64) -> io::Result<()> {
        let mut lines = String::new();
        for r in rcpts {
            let rcpt = normal(r);
            lines.push_str(&format!("{now_secs} {key} {rcpt}\n"));
            self.entries.insert((key.to_string(), rcpt), now_secs);
        }
        self.file.write_all(lines.as_bytes())?;
        self.file.sync_data()?;
        self.lines += rcpts.len();
        if now_secs >= self.last_prune + PRUNE_EVERY_SECS {
            self.last_prune = now_secs;
            self.forget_expired(now_secs);
            if self.lines > 2 * self.entries.len() + 1024 {
                self.compact()?;
            }
        }
        Ok(())
    }

    /// Number of live entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn forget_expired(&mut self, now_secs: u64) {
        let oldest = now_secs.saturating_sub(self.keep.as_secs());
        self.entries.retain(|_, secs| *secs >= oldest);
    }

    /// Rewrites the file with the live entries only (temp file, fsync, rename, dir fsync).
    fn compact(&mut self) -> io::Result<()> {
        let mut live: Vec<(&(String, String), &u64)> = self.entries.iter().collect();
        live.sort_by_key(|(_, secs)| **secs);
        let mut text = String::new();
        for ((key, rcpt), secs) in live {
            text.push_str(&format!("{secs} {key} {rcpt}\n"));
        }
        let tmp = self.path.with_extension("compact");
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines = self.entries.len();
        Ok(())
    }
}

/// The ledger key of a message: SHA-256 over the sender and the body, hex.
pub fn message_key(sender: Option<&Mailbox>, body: &[u8]) -> String {
    let mut h = Sha256::new();
    if let Some(s) = sender {
        h.update(s.to_string().as_bytes());
    }
    h.update([0u8]);
    h.update(body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Recipients compare case-insensitively; line breaks cannot occur in a parsed mailbox, but
/// are replaced anyway so one entry stays one line.
fn normal(m: &Mailbox) -> String {
    m.to_string().to_lowercase().replace(['\r', '\n'], "?")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> Mailbox {
        let (local, domain) = s.split_once('@').unwrap();
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn remembers_across_opens_and_forgets_old_entries() {
        let dir = std::env::temp_dir().join(format!("turnpike-ledger-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ledger");
        let keep = Duration::from_secs(100);
        let k1 = message_key(Some(&mb("s@x.org")), b"body 1\r\n");
        let k2 = message_key(None, b"body 1\r\n");
        assert_ne!(k1, k2);
        let a = mb("A@example.com");
        let b = mb("b@example.com");

        let mut l = Ledger::open(&path, keep, 1000).unwrap();
        l.record(&k1, &[&a], 1000).unwrap();
        l.record(&k2, &[&b], 1050).unwrap();
        assert!(l.contains(&k1, &mb("a@EXAMPLE.com")));
        assert!(!l.contains(&k2, &a));
        drop(l);

        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"1060 torn")
            .unwrap();
        let l = Ledger::open(&path, keep, 1120).unwrap();
        assert!(!l.contains(&k1, &a), "older than keep");
        assert!(l.contains(&k2, &b));
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("1050 {k2} b@example.com\n")
        );

        // A long-lived ledger: an hour later the old entry is forgotten; the file is
        // compacted once expired lines dominate.
        let mut l = Ledger::open(&path, keep, 1120).unwrap();
        l.record(&k1, &[&a], 1120 + PRUNE_EVERY_SECS).unwrap();
        assert_eq!(l.len(), 1, "k2 expired");
        assert!(l.contains(&k1, &a) && !l.contains(&k2, &b));
        let many: Vec<Mailbox> = (0..1100).map(|i| mb(&format!("u{i}@x.org"))).collect();
        let refs: Vec<&Mailbox> = many.iter().collect();
        let t0 = 1120 + 2 * PRUNE_EVERY_SECS;
        l.record(&k2, &refs, t0).unwrap();
        l.record(&k1, &[&b], t0 + PRUNE_EVERY_SECS + 200).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 1);
        l.record(&k1, &[&a], t0 + PRUNE_EVERY_SECS + 201).unwrap();
        drop(l);
        let l = Ledger::open(&path, keep, t0 + PRUNE_EVERY_SECS + 202).unwrap();
        assert!(l.contains(&k1, &a) && l.contains(&k1, &b) && l.len() == 2);
        fs::remove_dir_all(&dir).unwrap();
    }
}
