//! Maildir delivery (the qmail maildir spec, <https://cr.yp.to/proto/maildir.html>).
//!
//! One file per recipient: written to `tmp/` under a unique name (created with `O_EXCL`),
//! fsynced, hard-linked into `new/` (a link never replaces an existing file, unlike rename;
//! renamed where the file system has no hard links), the `new/` directory fsynced, and only
//! then is the delivery reported done. The `tmp/` name is removed afterwards; a crash in
//! between leaves a stray `tmp/` file, which readers clean up after 36 hours, never a lost or
//! half-written message in `new/`.
//!
//! Unique names: `<secs>.M<usec>P<pid>Q<seq>R<random>.<host>` (the modern form Dovecot and
//! Courier write), with `/` and `:` in the host name escaped as `\057` and `\072`. The file
//! in `new/` has no `:2,` info suffix; the reader adds it when it moves the file to `cur/`.
//!
//! Blocking file I/O on purpose: the customer runs one session per process, and the
//! provider waits for our reply anyway.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// An existing (or just created) maildir.
#[derive(Debug)]
pub struct Maildir {
    root: PathBuf,
    host: String,
    seq: u64,
    random: u64,
}

impl Maildir {
    /// Opens `root`, creating it and its `tmp`, `new` and `cur` (mode 0700) when missing.
    pub fn open(root: &Path) -> io::Result<Maildir> {
        for sub in ["", "tmp", "new", "cur"] {
            let dir = root.join(sub);
            match fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
            {
                Ok(()) => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
            }
        }
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Maildir {
            root: root.to_path_buf(),
            host: escape_host(&host_name()),
            seq: 0,
            random: u64::from_le_bytes(random),
        })
    }

    /// The maildir's top directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores one message made of `parts` (concatenated) and returns its path in `new/`.
    /// Returns only after the file and its directory entry are on disk.
    pub fn store(&mut self, parts: &[&[u8]]) -> io::Result<PathBuf> {
        loop {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.seq += 1;
            let name = unique_name(
                now.as_secs(),
                now.subsec_micros(),
                std::process::id(),
                self.seq,
                self.random,
                &self.host,
            );
            let tmp = self.root.join("tmp").join(&name);
            let mut file = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            };
            let written = parts
                .iter()
                .try_for_each(|p| file.write_all(p))
                .and_then(|()| file.sync_all());
            drop(file);
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            let new = self.root.join("new").join(&name);
            match fs::hard_link(&tmp, &new) {
                Ok(()) => {
                    let _ = fs::remove_file(&tmp);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let _ = fs::remove_file(&tmp);
                    continue;
                }
                // File systems without hard links: rename, which Dovecot also uses; the name
                // is unique, so there is nothing to overwrite.
                Err(_) if !new.exists() => fs::rename(&tmp, &new).inspect_err(|_| {
                    let _ = fs::remove_file(&tmp);
                })?,
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
            }
            File::open(self.root.join("new"))?.sync_all()?;
            return Ok(new);
        }
    }
}

/// `<secs>.M<usec>P<pid>Q<seq>R<random>.<host>`; `host` must already be escaped.
pub fn unique_name(secs: u64, usec: u32, pid: u32, seq: u64, random: u64, host: &str) -> String {
    format!("{secs}.M{usec}P{pid}Q{seq}R{random:016x}.{host}")
}

/// Escapes the characters a maildir name cannot hold: `/` (path) and `:` (info separator).
pub fn escape_host(host: &str) -> String {
    let mut out = String::with_capacity(host.len());
    for c in host.chars() {
        match c {
            '/' => out.push_str("\\057"),
            ':' => out.push_str("\\072"),
            c if c.is_ascii_graphic() => out.push(c),
            _ => out.push('_'),
        }
    }
    if out.is_empty() {
        out.push_str("localhost");
    }
    out
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec() {
        let n = unique_name(1_700_000_000, 42, 1234, 7, 0xabc, "mail.example");
        assert_eq!(n, "1700000000.M42P1234Q7R0000000000000abc.mail.example");
        assert_eq!(escape_host("a/b:c"), "a\\057b\\072c");
        assert_eq!(escape_host("sp ace"), "sp_ace");
        assert_eq!(escape_host(""), "localhost");
        assert!(!n.contains(':') && !n.contains('/'));
    }

    #[test]
    fn stores_through_tmp_into_new() {
        let dir = std::env::temp_dir().join(format!("turnpike-maildir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut md = Maildir::open(&dir.join("box")).unwrap();
        let a = md.store(&[b"Subject: a\r\n", b"\r\nbody\r\n"]).unwrap();
        let b = md.store(&[b"Subject: b\r\n\r\n"]).unwrap();
        assert_ne!(a, b, "names are unique within one process");
        assert_eq!(a.parent().unwrap(), dir.join("box/new"));
        assert_eq!(fs::read(&a).unwrap(), b"Subject: a\r\n\r\nbody\r\n");
        assert_eq!(fs::read_dir(dir.join("box/tmp")).unwrap().count(), 0);
        assert!(dir.join("box/cur").is_dir());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&a).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
