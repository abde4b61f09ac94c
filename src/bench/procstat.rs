//! The server's CPU and memory, sampled from /proc while a bench runs.
//!
//! A sampler thread reads `/proc/<pid>/stat` (user + system time of all threads) and
//! `/proc/<pid>/statm` (resident pages) every interval. It runs on its own thread so that
//! the bench's event loop neither delays nor is delayed by it. The server is found by
//! `--server-pid`, or from its data directory: the process holding the `flock` on
//! `<data>/lock` (`/proc/locks`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::report::{Cpu, Server, ServerPhase, ServerSample};

/// CPU seconds (user + system) and RSS octets of `pid` now, or `None` if it is gone.
pub fn read(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields after it follow the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split(' ').nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    Some((ticks as f64 / hz, pages * page))
}

/// The pid of the process that holds the `flock` on `<data_dir>/lock` (a running
/// `turnpike serve`), if any.
pub fn pid_from_data_dir(data_dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(data_dir.join("lock")).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, dev_ino) = (f.get(1)?, f.get(4)?, f.get(5)?);
        let ino: u64 = dev_ino.rsplit(':').next()?.parse().ok()?;
        (*kind == "FLOCK" && ino == inode)
            .then(|| pid.parse().ok())
            .flatten()
    })
}

/// A running sampler.
pub struct Sampler {
    pid: u32,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<ServerSample>>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling `pid` every `interval`, times relative to `start`. Fails if the
    /// process cannot be read.
    pub fn start(pid: u32, start: Instant, interval: Duration) -> std::io::Result<Sampler> {
        let (cpu0, _) = read(pid).ok_or_else(|| {
            std::io::Error::other(format!("server pid {pid}: cannot read /proc/{pid}"))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s2, v2) = (stop.clone(), samples.clone());
        let thread = std::thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || {
                let mut next = Instant::now();
                loop {
                    if let Some((cpu, rss)) = read(pid) {
                        let sample = ServerSample {
                            t_s: start.elapsed().as_secs_f64(),
                            cpu_s: cpu - cpu0,
                            rss_bytes: rss,
                        };
                        v2.lock().expect("sampler lock").push(sample);
                    }
                    if s2.load(Ordering::Relaxed) {
                        return;
                    }
                    next += interval;
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })?;
        Ok(Sampler {
            pid,
            stop,
            samples,
            thread: Some(thread),
        })
    }

    /// Takes one last sample, stops, and summarises over `elapsed_s`.
    pub fn finish(mut self, elapsed_s: f64) -> Server {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let samples = std::mem::take(&mut *self.samples.lock().expect("sampler lock"));
        let cpu_s = samples.last().map(|s| s.cpu_s).unwrap_or(0.0);
        Server {
            pid: self.pid,
            cpu: Cpu {
                cpu_s,
                cpu_cores: cpu_s / elapsed_s.max(1e-9),
            },
            rss_peak_bytes: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
            samples,
        }
    }
}

/// The server's figures between `from_s` and `to_s` (seconds from the start).
pub fn phase_figures(server: &Server, from_s: f64, to_s: f64) -> ServerPhase {
    let inside: Vec<&ServerSample> = server
        .samples
        .iter()
        .filter(|s| s.t_s >= from_s && s.t_s <= to_s)
        .collect();
    // CPU used in the phase: from the last sample at or before its start to the last in it.
    let before = server
        .samples
        .iter()
        .rev()
        .find(|s| s.t_s <= from_s)
        .map(|s| s.cpu_s)
        .unwrap_or(0.0);
    let end = inside.last().map(|s| s.cpu_s).unwrap_or(before);
    let cpu_s = (end - before).max(0.0);
    let rss: Vec<u64> = inside.iter().map(|s| s.rss_bytes).collect();
    ServerPhase {
        cpu_s,
        cpu_cores: cpu_s / (to_s - from_s).max(1e-9),
        rss_peak_bytes: rss.iter().copied().max().unwrap_or(0),
        rss_mean_bytes: if rss.is_empty() {
            0
        } else {
            rss.iter().sum::<u64>() / rss.len() as u64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let (cpu, rss) = read(std::process::id()).expect("own /proc entry");
        assert!(cpu >= 0.0);
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(read(u32::MAX).is_none());
    }

    #[test]
    fn finds_the_flock_holder() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("tp-procstat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(pid_from_data_dir(&dir), None);
        let f = std::fs::File::create(dir.join("lock")).unwrap();
        assert_eq!(pid_from_data_dir(&dir), None, "no lock held yet");
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        assert_eq!(pid_from_data_dir(&dir), Some(std::process::id()));
        drop(f);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn phase_cpu_is_the_difference() {
        let s = |t_s, cpu_s, rss_bytes| ServerSample {
            t_s,
            cpu_s,
            rss_bytes,
        };
        let server = Server {
            samples: vec![
                s(0.0, 0.0, 10),
                s(1.0, 0.5, 20),
                s(2.0, 1.5, 30),
                s(3.0, 1.6, 5),
            ],
            ..Server::default()
        };
        let p = phase_figures(&server, 1.0, 2.0);
        assert!((p.cpu_s - 1.0).abs() < 1e-9);
        assert_eq!(p.rss_peak_bytes, 30);
        assert_eq!(p.rss_mean_bytes, 25);
    }
}
