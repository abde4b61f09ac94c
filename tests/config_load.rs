//! `Config::load` against real files: a full example, errors naming the path, a missing file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use turnpike::config::{Config, ConfigErrorKind, IoBackend, TlsIdentity};
use turnpike::types::DomainName;

/// Every section and key, none left at its default.
const FULL_EXAMPLE: &str = r#"
# turnpike.toml: every key, none at its default
[server]
hostname = "mx.example.net"
data_dir = "/var/lib/turnpike"
cores = 8
io = "uring"

[listen]
mx = ["0.0.0.0:25", "[::]:25"]
odmr = ["0.0.0.0:366"]
submission = "0.0.0.0:587"
submissions = ["0.0.0.0:465"]
metrics = "127.0.0.1:9100"

[tls]
cert = "/etc/turnpike/fullchain.pem"
key = "/etc/turnpike/privkey.pem"

[limits]
max_message_size = "64MB"
max_recipients = 500
max_line_length = 4096
max_commands_without_progress = 30
max_errors = 5
max_hops = 30
idle_timeout = "300s"
session_timeout = "2h"
max_connections_per_ip = 50
max_connections = 20000

[spool]
segment_size = "128MiB"
max_hold = "14d"
default_quota = 1073741824
compact_live_ratio = 0.25
fsync = true

[submission]
period = "10m"
messages_per_period = 40
recipients_per_period = 0
recipients_per_message = 20

[quota]
"example.com" = "10GiB"
"Example.ORG" = "512MiB"
"#;

/// A unique scratch directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "turnpike-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn domain(s: &str) -> DomainName {
    DomainName::parse(s).unwrap()
}

#[test]
fn full_example_loads_every_key() {
    let dir = Scratch::new("full");
    let c = Config::load(&dir.write("turnpike.toml", FULL_EXAMPLE)).unwrap();

    assert_eq!(c.server.hostname, domain("mx.example.net"));
    assert_eq!(c.server.data_dir, Path::new("/var/lib/turnpike"));
    assert_eq!(c.server.cores, 8);
    assert_eq!(c.server.io, IoBackend::Uring);

    let addrs = |list: &[&str]| list.iter().map(|a| a.parse().unwrap()).collect::<Vec<_>>();
    assert_eq!(c.listen.mx, addrs(&["0.0.0.0:25", "[::]:25"]));
    assert_eq!(c.listen.odmr, addrs(&["0.0.0.0:366"]));
    assert_eq!(c.listen.submission, addrs(&["0.0.0.0:587"]));
    assert_eq!(c.listen.submissions, addrs(&["0.0.0.0:465"]));
    assert_eq!(c.listen.metrics, addrs(&["127.0.0.1:9100"]));

    assert_eq!(
        c.tls.identity,
        TlsIdentity::Files {
            cert: "/etc/turnpike/fullchain.pem".into(),
            key: "/etc/turnpike/privkey.pem".into(),
        }
    );

    assert_eq!(c.limits.max_message_size, 64_000_000);
    assert_eq!(c.limits.max_recipients, 500);
    assert_eq!(c.limits.max_line_length, 4096);
    assert_eq!(c.limits.max_commands_without_progress, 30);
    assert_eq!(c.limits.max_errors, 5);
    assert_eq!(c.limits.max_hops, 30);
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(300));
    assert_eq!(c.limits.session_timeout, Duration::from_secs(7200));
    assert_eq!(c.limits.max_connections_per_ip, 50);
    assert_eq!(c.limits.max_connections, 20_000);

    assert_eq!(c.spool.segment_size, 128 << 20);
    assert_eq!(c.spool.max_hold, Duration::from_secs(14 * 86_400));
    assert_eq!(c.spool.default_quota, 1 << 30);
    assert_eq!(c.spool.compact_live_ratio, 0.25);

    assert_eq!(c.submission.period, Duration::from_secs(600));
    assert_eq!(c.submission.messages_per_period, 40);
    assert_eq!(c.submission.recipients_per_period, 0);
    assert_eq!(c.submission.recipients_per_message, 20);

    assert_eq!(c.quota.len(), 2);
    assert_eq!(c.quota_for(&domain("example.com")), 10 << 30);
    assert_eq!(c.quota_for(&domain("example.org")), 512 << 20);
    assert_eq!(c.quota_for(&domain("example.net")), 1 << 30);
}

#[test]
fn empty_file_loads_as_the_default() {
    let dir = Scratch::new("empty");
    let c = Config::load(&dir.write("turnpike.toml", "# nothing\n")).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn errors_name_the_path_that_was_loaded() {
    let dir = Scratch::new("errors");
    let path = dir.write("site.toml", "[limits]\nmax_message_size = \"fifty\"\n");
    let err = Config::load(&path).unwrap_err();
    assert_eq!(err.file(), path);
    assert_eq!(err.key(), Some("limits.max_message_size"));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: limits.max_message_size: expected a size like \"50MiB\", got \"fifty\"",
            path.display()
        )
    );
}

#[test]
fn missing_file_is_a_read_error_naming_it() {
    let dir = Scratch::new("missing");
    let path = dir.0.join("absent.toml");
    let err = Config::load(&path).unwrap_err();
    assert!(
        matches!(err.kind(), ConfigErrorKind::Read(e) if e.kind() == std::io::ErrorKind::NotFound)
    );
    assert!(err
        .to_string()
        .starts_with(&format!("{}: cannot read the file: ", path.display())));
    assert!(std::error::Error::source(&err).is_some());
}
