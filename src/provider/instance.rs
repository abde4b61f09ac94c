//! One server per data directory and per port.
//!
//! Two `turnpike serve` processes on one data directory would append to the same journal
//! files; two on one port would split the mail between two spools (SO_REUSEPORT lets a second
//! bind succeed silently). So at start:
//!
//! - [`InstanceLock::acquire`] takes an exclusive `flock` on `<data>/lock` for the life of the
//!   process and writes our PID into it. A second server finds the lock taken and exits,
//!   naming the PID written there and the data directory.
//! - [`check_ports_free`] binds each configured address once *without* SO_REUSEPORT before
//!   the real listeners are made. Linux refuses that bind while any socket listens there, so a
//!   port already served by anyone is found; the error names the listening process and, when
//!   it is a turnpike server, its data directory (read from its open `lock` file in `/proc`).
//!
//! Invariant: the lock is released only by the process exiting (the kernel drops the flock),
//! so a crashed server never blocks the next start.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The held `<data>/lock`; dropping it (process exit) releases the data directory.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

impl InstanceLock {
    /// Locks `data_dir` for this process, or explains who holds it.
    pub fn acquire(data_dir: &Path) -> io::Result<InstanceLock> {
        let path: PathBuf = data_dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(crate::spool::FILE_MODE)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "a process that has not written its pid yet".to_string(),
            };
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "data directory {} is in use by another turnpike server ({holder}); \
                     stop it first, or give this one its own --data-dir",
                    data_dir.display()
                ),
            ));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(InstanceLock { _file: file })
    }
}

/// Fails when another socket already listens on one of `addrs` (port 0 is never checked).
pub fn check_ports_free<'a>(
    addrs: impl IntoIterator<Item = (&'a str, SocketAddr)>,
) -> io::Result<()> {
    for (service, addr) in addrs {
        if addr.port() == 0 {
            continue;
        }
        let probe = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        // SO_REUSEADDR only: a port in TIME_WAIT is free, one with a listener is not.
        probe.set_reuse_address(true)?;
        match probe.bind(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "cannot listen on {addr} ({service}): already in use by {}",
                        describe_listener(addr.port())
                    ),
                ));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} ({service}): {e}"),
                ))
            }
        }
    }
    Ok(())
}

/// "pid N (turnpike server of data directory D)", or as much of it as `/proc` tells us.
fn describe_listener(port: u16) -> String {
    let Some(pid) = listener_pid(port) else {
        return "another process (not visible to us)".to_string();
    };
    match lock_dir_of(pid) {
        Some(dir) => format!(
            "another turnpike server (pid {pid}, data directory {})",
            dir.display()
        ),
        None => {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            format!("pid {pid} ({})", cmd.trim())
        }
    }
}

/// The process with a TCP socket listening on `port`, found through `/proc/net/tcp{,6}` and
/// the socket inodes in `/proc/*/fd`.
fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ... inode (field 9); st 0A is LISTEN.
            let (Some(local), Some(st), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if *st == "0A" && p == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// The data directory of a turnpike server: the parent of the `lock` file it holds open.
fn lock_dir_of(pid: u32) -> Option<PathBuf> {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if target.file_name().is_some_and(|n| n == "lock") {
            return target.parent().map(Path::to_path_buf);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_first_pid() {
        let dir = std::env::temp_dir().join(format!("turnpike-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = InstanceLock::acquire(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join("lock")).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open conflicts even in
        // the same process.
        let e = InstanceLock::acquire(&dir).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        drop(first);
        InstanceLock::acquire(&dir).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_listening_port_is_found_with_its_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let e = check_ports_free([("mx", addr)]).unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        drop(l);
        check_ports_free([("mx", addr)]).unwrap();
    }
}
