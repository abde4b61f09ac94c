//! Delivery through an MDA command (procmail, maildrop, dovecot-lda, a script), once per
//! recipient, the message on standard input.
//!
//! The command runs without a shell, in a clean environment: only `PATH`, `HOME`, `TZ`,
//! `LANG`, `LC_ALL` and `LOGNAME` are passed on from ours (which may hold the provider's
//! password), plus the envelope. The envelope reaches it two ways: the environment
//! variables `SENDER` (empty for the null sender), `RECIPIENT`, `LOCAL` and `DOMAIN` (the
//! names Postfix's local(8) uses), and the placeholders `{sender}`, `{recipient}`, `{local}`
//! and `{domain}` in arguments, each replaced inside the argument it appears in (one argument
//! stays one argument, whatever the address holds).
//!
//! The exit status decides (sendmail's sysexits.h, as Postfix maps it):
//!
//! | exit                              | reply        |
//! |-----------------------------------|--------------|
//! | 0                                 | 250 2.0.0    |
//! | 75 EX_TEMPFAIL, 71 EX_OSERR       | 451 4.3.0    |
//! | 67 EX_NOUSER                      | 550 5.1.1    |
//! | 68 EX_NOHOST                      | 550 5.1.2    |
//! | 65 EX_DATAERR                     | 554 5.6.0    |
//! | 73 EX_CANTCREAT                   | 554 5.2.0    |
//! | 77 EX_NOPERM                      | 554 5.7.0    |
//! | 78 EX_CONFIG                      | 554 5.3.5    |
//! | any other non-zero                | 554 5.3.0    |
//! | killed by a signal, timed out, or could not be started | 451 4.3.0 / 4.4.2 |
//!
//! The first line the command wrote to standard error (up to 200 characters) is appended to
//! the reply text, so the sender's delivery report shows the MDA's own reason.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::proto::reply::Reply;
use crate::types::Mailbox;

/// The variables of our own environment an MDA inherits; everything else is dropped.
const PASSED_ENV: [&str; 6] = ["PATH", "HOME", "TZ", "LANG", "LC_ALL", "LOGNAME"];

/// A configured MDA command.
#[derive(Clone, Debug)]
pub struct Mda {
    argv: Vec<String>,
}

impl Mda {
    /// Checks `argv`: not empty, and a program given by path must exist.
    pub fn new(argv: &[String]) -> Result<Mda, String> {
        let Some(program) = argv.first() else {
            return Err("empty MDA command".into());
        };
        if program.contains('/') && !Path::new(program).is_file() {
            return Err(format!("MDA program {program} does not exist"));
        }
        Ok(Mda {
            argv: argv.to_vec(),
        })
    }

    /// Runs the command for one recipient with `parts` (concatenated) on standard input.
    pub async fn run(
        &self,
        sender: Option<&Mailbox>,
        rcpt: &Mailbox,
        parts: &[&[u8]],
        timeout: Duration,
    ) -> Reply {
        let sender = sender.map(|s| s.to_string()).unwrap_or_default();
        let vars = [
            ("{sender}", sender.as_str()),
            ("{recipient}", &rcpt.to_string()),
            ("{local}", rcpt.local.as_str()),
            ("{domain}", rcpt.domain.as_str()),
        ];
        let args: Vec<String> = self.argv[1..]
            .iter()
            .map(|a| vars.iter().fold(a.clone(), |a, (k, v)| a.replace(k, v)))
            .collect();
        let mut cmd = Command::new(&self.argv[0]);
        // A clean environment: ours may hold the provider password (`password_env`).
        cmd.env_clear();
        for name in PASSED_ENV {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        let spawned = cmd
            .args(&args)
            .env("SENDER", &sender)
            .env("RECIPIENT", rcpt.to_string())
            .env("LOCAL", &rcpt.local)
            .env("DOMAIN", &rcpt.domain)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(program = %self.argv[0], error = %e, "cannot start MDA");
                return Reply::with_status(451, (4, 3, 0), "Cannot start the local MDA");
            }
        };
        // Threads feed and drain the pipes, so a command that does not read its input (or
        // writes much to stderr) can neither block this task nor deadlock with it.
        let input: Vec<u8> = parts.concat();
        let mut stdin = child.stdin.take().expect("piped");
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&input); // EPIPE: the exit status will tell
        });
        let mut stderr = child.stderr.take().expect("piped");
        let drainer = std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = (&mut stderr).take(4096).read_to_end(&mut text);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            text
        });
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::error!(program = %self.argv[0], error = %e, "cannot wait for MDA");
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let _ = feeder.join();
        let stderr = drainer.join().unwrap_or_default();
        let Some(status) = status else {
            tracing::warn!(program = %self.argv[0], %rcpt, "MDA timed out; killed");
            return Reply::with_status(451, (4, 4, 2), "Local MDA timed out");
        };
        let reply = exit_reply(status, &stderr);
        if !reply.is_positive() {
            tracing::warn!(program = %self.argv[0], %rcpt, %status, "MDA failed");
        }
        reply
    }
}

/// Maps an MDA's exit status (and the first line of its stderr) to a reply.
pub fn exit_reply(status: ExitStatus, stderr: &[u8]) -> Reply {
    let detail = first_line(stderr);
    let (code, st, what) = match (status.code(), status.signal()) {
        (Some(0), _) => (250, (2, 0, 0), "Delivered by MDA"),
        (Some(75), _) => (451, (4, 3, 0), "MDA: temporary failure"),
        (Some(71), _) => (451, (4, 3, 0), "MDA: system resource problem"),
        (Some(67), _) => (550, (5, 1, 1), "MDA: user unknown"),
        (Some(68), _) => (550, (5, 1, 2), "MDA: host name unknown"),
        (Some(65), _) => (554, (5, 6, 0), "MDA: data format error"),
        (Some(73), _) => (554, (5, 2, 0), "MDA: cannot create output file"),
        (Some(77), _) => (554, (5, 7, 0), "MDA: permission denied"),
        (Some(78), _) => (554, (5, 3, 5), "MDA: local configuration error"),
        (Some(_), _) => (554, (5, 3, 0), "MDA failed"),
        (None, _) => (451, (4, 3, 0), "MDA killed by a signal"),
    };
    let text = match (status.code(), detail.is_empty()) {
        (Some(0), _) | (_, true) => format!("{what} ({status})"),
        (_, false) => format!("{what} ({status}): {detail}"),
    };
    Reply::with_status(code, st, text)
}

/// The first non-empty line of `bytes`, printable ASCII only, at most 200 characters.
fn first_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn exit_codes_map_to_reply_classes() {
        let table = [
            (0, 250, "2.0.0"),
            (75, 451, "4.3.0"),
            (71, 451, "4.3.0"),
            (67, 550, "5.1.1"),
            (68, 550, "5.1.2"),
            (65, 554, "5.6.0"),
            (77, 554, "5.7.0"),
            (78, 554, "5.3.5"),
            (1, 554, "5.3.0"),
            (100, 554, "5.3.0"),
        ];
        for (exit, code, status) in table {
            let r = exit_reply(exited(exit), b"");
            assert_eq!(r.code, code, "exit {exit}");
            assert_eq!(r.status.unwrap().to_string(), status, "exit {exit}");
        }
        let killed = exit_reply(ExitStatus::from_raw(9), b"");
        assert_eq!(killed.code, 451);
        let with_reason = exit_reply(exited(67), b"no such user: bob\nmore");
        assert!(with_reason.lines[0].ends_with(": no such user: bob"));
    }

    #[test]
    fn stderr_line_is_sanitised() {
        assert_eq!(
            first_line(b"\n  \n bad\x1b[31m user \r\nnext"),
            "bad?[31m user"
        );
        assert_eq!(first_line(&[b'x'; 500]).len(), 200);
    }

    #[test]
    fn rejects_missing_programs() {
        assert!(Mda::new(&[]).is_err());
        let e = Mda::new(&["/no/such/mda".into()]).unwrap_err();
        assert!(e.contains("/no/such/mda"));
        assert!(
            Mda::new(&["procmail".into()]).is_ok(),
            "found through PATH at run time"
        );
    }
}
