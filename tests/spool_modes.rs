//! Held mail is for the service user only: with a umask of 000 (the worst an operator can
//! leave), every directory the server makes is 0700 and every file 0600, and an unprivileged
//! uid can neither list the journal nor read a segment, even where it could enter the
//! directories.
//!
//! One test in this binary on purpose: it changes the process umask.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::{SmtpClient, TestServer};

/// Files the test harness itself writes into the data directory (not the server's).
const HARNESS_FILES: [&str; 3] = ["turnpike.toml", "stdout.log", "stderr.log"];

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every path under `dir` (depth first), `dir` included.
fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    out.push(dir.to_path_buf());
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// `cat FILE` as uid/gid 65534 (`nobody`): its exit status and stderr.
fn cat_as_nobody(file: &Path) -> (bool, String) {
    let out = Command::new("cat")
        .arg(file)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run cat as nobody");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn data_dir_and_journal_are_private_whatever_the_umask() {
    // SAFETY: umask has no preconditions; this binary runs this one test only.
    let old = unsafe { libc::umask(0) };
    let server = TestServer::start("", &[("alice", &["alice.test"])]);
    let mut c = SmtpClient::connect(server.addr("mx"));
    c.expect(220);
    c.cmd("EHLO modes.test", 250);
    c.send_mail(
        "s@sender.test",
        &["u@alice.test"],
        "Subject: secret\r\n\r\nthe body\r\n",
    );
    c.cmd("QUIT", 221);
    // SAFETY: as above.
    unsafe { libc::umask(old) };

    let dir = server.data_dir();
    let mut paths = Vec::new();
    walk(dir, &mut paths);
    let mut segments = Vec::new();
    for p in &paths {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p != dir && HARNESS_FILES.contains(&name.as_str()) {
            continue;
        }
        let m = mode(p);
        if p.is_dir() {
            assert_eq!(m, 0o700, "{} is {m:o}", p.display());
        } else {
            assert_eq!(m, 0o600, "{} is {m:o}", p.display());
        }
        if name.ends_with(".seg") {
            segments.push(p.clone());
        }
    }
    for must in [
        "journal",
        "journal/core-0",
        "lock",
        "listening",
        "control.sock",
    ] {
        assert!(
            paths.contains(&dir.join(must)),
            "{must} missing from {paths:?}"
        );
    }
    assert!(!segments.is_empty(), "no segment written");

    if !common::require_root("reading the journal as an unprivileged uid") {
        return;
    }
    let seg = &segments[0];
    let (ok, err) = cat_as_nobody(seg);
    assert!(!ok, "nobody read {}", seg.display());
    assert!(err.contains("Permission denied"), "{err}");
    // Even with every directory on the way open for traversal, the file mode alone keeps the
    // segment private.
    let mut dirs: Vec<&Path> = seg.ancestors().skip(1).take(3).collect();
    dirs.reverse();
    for d in &dirs {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    let (ok, err) = cat_as_nobody(seg);
    for d in &dirs {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    assert!(
        !ok,
        "nobody read {} through open directories",
        seg.display()
    );
    assert!(err.contains("Permission denied"), "{err}");
}
