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
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`, forgetting entries older than `keep`.
    pub fn open(path: &Path, keep: Duration, now_secs: u64) -> io::Result<Ledger> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let oldest = now_secs.saturating_sub(keep.as_secs());
        let mut entries = HashMap::new();
        let mut kept = String::new();
        for line in text.lines() {
            let mut f = line.splitn(3, ' ');
            let (Some(secs), Some(key), Some(rcpt)) = (f.next(), f.next(), f.next()) else {
                continue; // a torn last line from a crash: the entry was never relied upon
            };
            let Ok(secs) = secs.parse::<u64>() else {
                continue;
            };
            if secs >= oldest && key.len() == 64 {
                entries.insert((key.to_string(), rcpt.to_string()), secs);
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if kept.len() != text.len() {
            let tmp = path.with_extension("compact");
            let mut f = File::create(&tmp)?;
            f.write_all(kept.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Ledger {
            path: path.to_path_buf(),
            file,
            entries,
        })
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
        self.file.sync_data()
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
        fs::remove_dir_all(&dir).unwrap();
    }
}
