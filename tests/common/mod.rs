//! End-to-end harness shared by the integration tests.
//!
//! What this owns:
//! - [`TestServer`]: a real `turnpike serve` child process on `127.0.0.1:0` listeners, with its
//!   own temporary data directory, accounts created through the CLI, captured logs, and
//!   crash/restart controls. Drop always kills the child and removes the directory.
//! - [`SmtpClient`]: a blocking SMTP peer over [`TcpStream`] for RFC-style `C:`/`S:` transcripts.
//! - [`require_program`] and [`run_bounded`] for tests that drive real mail clients.
//!
//! Invariants: every wait is bounded; every process a test starts is stopped by `Drop`; only
//! loopback addresses are used. `TURNPIKE_TEST_IO=uring|epoll|auto` selects the server's I/O
//! driver (`--io`) so the same tests run under both drivers.
#![allow(dead_code)] // Each test binary uses a different subset of the harness.

pub mod customer;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the server may take to write `listening`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop()` waits after SIGTERM before it sends SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Read and write timeout of [`SmtpClient`] sockets.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for one CLI invocation (`account add`, `queue`).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The configuration every test server starts from; `config_extra` is merged over it.
const BASE_CONFIG: &str = r#"
[server]
hostname = "mx.test"

[listen]
mx = ["127.0.0.1:0"]
odmr = ["127.0.0.1:0"]
odmrs = ["127.0.0.1:0"]
submission = ["127.0.0.1:0"]
submissions = ["127.0.0.1:0"]
metrics = ["127.0.0.1:0"]

[limits]
idle_timeout = "2s"
"#;

/// Path of the server binary under test.
pub fn turnpike_bin() -> &'static str {
    env!("CARGO_BIN_EXE_turnpike")
}

/// The `--io` driver requested through `TURNPIKE_TEST_IO`, if any.
pub fn io_driver() -> Option<String> {
    std::env::var("TURNPIKE_TEST_IO")
        .ok()
        .filter(|v| !v.is_empty())
}

/// The password [`TestServer::start`] gives the account `name`.
pub fn password_for(name: &str) -> String {
    format!("pw-{name}-secret")
}

/// A running `turnpike serve` with its own data directory.
pub struct TestServer {
    data_dir: PathBuf,
    config_path: PathBuf,
    /// No `--config`: the embedded defaults, on their fixed loopback ports.
    zero_config: Option<ZeroConfigLock>,
    child: Option<Child>,
    addrs: Vec<(String, SocketAddr)>,
}

/// Held while a zero-config server runs: its ports are fixed (2525, 3366, 3367, ...), so two
/// such servers, in this test binary or another one run in parallel, must take turns.
struct ZeroConfigLock(File);

impl ZeroConfigLock {
    fn acquire() -> ZeroConfigLock {
        let path = std::env::temp_dir().join("turnpike-test-zero-config.lock");
        let file = File::create(&path).expect("create zero-config lock file");
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            use std::os::fd::AsRawFd;
            // SAFETY: flock(2) on a descriptor we own; no memory is shared with the kernel.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return ZeroConfigLock(file);
            }
            assert!(
                Instant::now() < deadline,
                "zero-config lock held for 10 minutes"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl TestServer {
    /// Creates a fresh data directory, writes the base config merged with `config_extra` (TOML;
    /// tables it shares with the base, such as `[limits]`, are merged key by key), adds each
    /// `(account, domains)` through `turnpike account add`, starts the server and waits for its
    /// `listening` file. Panics with the server's logs if any step fails.
    pub fn start(config_extra: &str, accounts: &[(&str, &[&str])]) -> TestServer {
        Self::start_in(unique_temp_dir(), config_extra, accounts)
    }

    /// [`start`](Self::start) with a data directory the test chose (an empty directory, for
    /// example on a small tmpfs); it is removed on drop like the default one.
    pub fn start_in(
        data_dir: PathBuf,
        config_extra: &str,
        accounts: &[(&str, &[&str])],
    ) -> TestServer {
        let config_path = data_dir.join("turnpike.toml");
        fs::write(&config_path, merged_config(config_extra)).expect("write test config");
        let mut server = TestServer {
            data_dir,
            config_path,
            zero_config: None,
            child: None,
            addrs: Vec::new(),
        };
        for (name, domains) in accounts {
            server.add_account(name, domains);
        }
        server.spawn();
        server
    }

    /// Like [`TestServer::start`], but exactly as a new user runs it: no configuration file
    /// at all (only `--data-dir`), so every default applies, including the fixed loopback
    /// ports. Such servers take turns (see [`ZeroConfigLock`]).
    pub fn start_zero_config(accounts: &[(&str, &[&str])]) -> TestServer {
        let lock = ZeroConfigLock::acquire();
        let data_dir = unique_temp_dir();
        let config_path = data_dir.join("no-such-turnpike.toml");
        let mut server = TestServer {
            data_dir,
            config_path,
            zero_config: Some(lock),
            child: None,
            addrs: Vec::new(),
        };
        for (name, domains) in accounts {
            server.add_account(name, domains);
        }
        server.spawn();
        server
    }

    /// Adds an account (password [`password_for`]`(name)`) through the CLI. Works while the
    /// server is stopped; whether a running server sees it is the server's contract, not ours.
    pub fn add_account(&self, name: &str, domains: &[&str]) {
        let mut args = vec!["account", "add", name];
        for d in domains {
            args.extend(["--domain", d]);
        }
        args.push("--password-stdin");
        let out = self.cli(&args, Some(password_for(name).as_bytes()));
        assert!(
            out.status.success(),
            "turnpike account add {name} failed: {}\n{}",
            out.status,
            output_text(&out)
        );
    }

    /// Runs `turnpike --data-dir DIR --config FILE <args>` to completion (bounded), feeding
    /// `stdin` if given.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = Command::new(turnpike_bin());
        cmd.arg("--data-dir").arg(&self.data_dir);
        if self.zero_config.is_none() {
            cmd.arg("--config").arg(&self.config_path);
        }
        cmd.args(args);
        run_bounded(&mut cmd, stdin, CLI_TIMEOUT)
    }

    /// `turnpike queue --json`, parsed. Panics (with logs) if the command fails.
    pub fn queue_json(&self) -> serde_json::Value {
        self.cli_json(&["queue", "--json"])
    }

    /// `turnpike queue show DOMAIN --json`, parsed. Panics (with logs) if the command fails.
    pub fn queue_show_json(&self, domain: &str) -> serde_json::Value {
        self.cli_json(&["queue", "show", domain, "--json"])
    }

    fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args, None);
        assert!(
            out.status.success(),
            "turnpike {args:?} failed: {}\n{}",
            out.status,
            output_text(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "turnpike {args:?} printed invalid JSON ({e}):\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// The Prometheus text of the server's metrics listener (`GET /metrics`).
    pub fn metrics(&self) -> String {
        let mut http = TcpStream::connect_timeout(&self.addr("metrics"), IO_TIMEOUT)
            .expect("connect to the metrics listener");
        http.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("metrics request");
        let mut text = String::new();
        http.read_to_string(&mut text).expect("metrics response");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text
    }

    /// The first listener address of `service` (`mx`, `odmr`, `submission`, `submissions`).
    pub fn addr(&self, service: &str) -> SocketAddr {
        self.addrs(service)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("service {service:?} not in listening file {:?}", self.addrs))
    }

    /// Every listener address of `service`, in file order.
    pub fn addrs(&self, service: &str) -> Vec<SocketAddr> {
        self.addrs
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, a)| *a)
            .collect()
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Path of the config file the server runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The OS process id of the running server, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the server wrote to stdout and stderr, over all its runs.
    pub fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.data_dir.join(name)).unwrap_or_default();
        format!(
            "---- turnpike stdout ({}) ----\n{}---- turnpike stderr ----\n{}---- end of logs ----",
            self.data_dir.display(),
            read("stdout.log"),
            read("stderr.log")
        )
    }

    /// SIGKILL, no chance to clean up: the crash case. The `listening` file stays behind.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
        self.addrs.clear();
    }

    /// SIGTERM, then waits up to [`STOP_TIMEOUT`]; SIGKILL if the server has not exited by
    /// then. Returns the exit status, or `None` if no server was running or it needed SIGKILL.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.addrs.clear();
        signal(&child, libc::SIGTERM);
        match wait_bounded(&mut child, STOP_TIMEOUT) {
            Some(status) => Some(status),
            None => {
                eprintln!("turnpike did not exit within {STOP_TIMEOUT:?} of SIGTERM; SIGKILL");
                signal(&child, libc::SIGKILL);
                let _ = child.wait();
                None
            }
        }
    }

    /// Stops the server (SIGTERM, see [`stop`](Self::stop)) if it runs, and starts it again on
    /// the same data directory and config. Listener ports change: read `addr()` again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let listening = self.data_dir.join("listening");
        // A killed server leaves its file behind; never read stale ports.
        match fs::remove_file(&listening) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove stale {}: {e}", listening.display()),
        }
        let log = |name: &str| -> File {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.data_dir.join(name))
                .expect("open server log file")
        };
        let mut cmd = Command::new(turnpike_bin());
        cmd.arg("--data-dir").arg(&self.data_dir);
        if self.zero_config.is_none() {
            cmd.arg("--config").arg(&self.config_path);
        }
        cmd.arg("serve");
        if let Some(io) = io_driver() {
            cmd.args(["--io", &io]);
        }
        cmd.stdin(Stdio::null())
            .stdout(log("stdout.log"))
            .stderr(log("stderr.log"));
        let child = cmd.spawn().expect("spawn turnpike serve");
        self.child = Some(child);
        self.addrs = self.wait_listening(&listening);
    }

    fn wait_listening(&mut self, path: &Path) -> Vec<(String, SocketAddr)> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = fs::read_to_string(path) {
                return parse_listening(&text)
                    .unwrap_or_else(|e| panic!("bad listening file: {e}\n{text}"));
            }
            let child = self.child.as_mut().expect("child");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "turnpike serve exited ({status}) before writing {}",
                    path.display()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "turnpike serve did not write {} within {START_TIMEOUT:?}",
                    path.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
        if thread::panicking() {
            // Every failing test shows the server's logs, once, and visibly: straight to the
            // stderr handle, which cargo test's capture does not intercept.
            let _ = writeln!(io::stderr(), "{}", self.logs());
        }
        if std::env::var_os("TURNPIKE_TEST_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.data_dir);
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped child, so
    // it cannot have been recycled for another process.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A directory that no other test (or test run) uses: created with `create_dir`, never `_all`,
/// so a collision is an error rather than a shared directory.
fn unique_temp_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for _ in 0..100 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "turnpike-test-{}-{n}-{nanos:08x}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
    }
    panic!("no free temp dir name")
}

/// A scratch directory of its own for a test (see [`unique_temp_dir`]), removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// A fresh, empty directory.
    pub fn new() -> Scratch {
        Scratch(unique_temp_dir())
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The names of its entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.0)
            .expect("readable scratch dir")
            .map(|e| {
                e.expect("readable entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn merged_config(extra: &str) -> String {
    let mut base: toml::Table = BASE_CONFIG.parse().expect("base config is TOML");
    let extra: toml::Table = extra
        .parse()
        .unwrap_or_else(|e| panic!("config_extra is not TOML: {e}\n{extra}"));
    merge_tables(&mut base, extra);
    toml::to_string(&base).expect("serialize config")
}

fn merge_tables(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge_tables(b, e),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn parse_listening(text: &str) -> Result<Vec<(String, SocketAddr)>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let (Some(service), Some(addr), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("line {line:?} is not `<service> <ip:port>`"));
        };
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{line:?}: {e}"))?;
        out.push((service.to_string(), addr));
    }
    if out.is_empty() {
        return Err("no listeners".into());
    }
    Ok(out)
}

/// Runs `cmd` to completion with stdout/stderr captured, killing it after `timeout` (and then
/// panicking). `stdin` is written and closed if given; otherwise stdin is `/dev/null`.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small inputs only (passwords); a full pipe buffer is not a concern.
        let _ = pipe.write_all(input);
    }
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = match wait_bounded(&mut child, timeout) {
        Some(status) => status,
        None => {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
            let out = out.join().unwrap_or_default();
            let err = err.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// stdout and stderr of `out`, labelled, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where `name` is installed: `$PATH`, then the sbin directories (where `smtp-source` lives
/// and which a non-root `$PATH` often lacks).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True if `name` is installed. Otherwise prints a SKIP line that cargo test's capture does not
/// swallow and returns false, except under `CI=true`, where a missing program is a failure.
pub fn require_program(name: &str) -> bool {
    if find_program(name).is_some() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name} is not installed, and CI=true requires it (see .ci/run)");
    }
    let test = thread::current().name().unwrap_or("?").to_string();
    // Straight to the stderr handle, not eprintln!: the test harness captures the macros.
    let _ = writeln!(
        io::stderr(),
        "SKIP: {test}: {name} not installed (apt-get install {}, or run \
         tests/support/install-mail-clients.sh)",
        debian_package(name)
    );
    false
}

/// True when the test runs as root. Otherwise prints a SKIP line naming `what` needs root,
/// and returns false, except under `CI=true` (the CI runs as root), where it fails.
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_fail(&format!("{what} needs root"));
    false
}

/// Prints a visible SKIP line for the current test, or panics under `CI=true`.
pub fn skip_or_fail(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}, and CI=true does not allow skipping");
    }
    let test = thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(io::stderr(), "SKIP: {test}: {why}");
}

/// A tmpfs of a fixed size mounted on a fresh temporary directory, unmounted (lazily, so a
/// process still holding files there cannot keep it) and removed on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a `size_mib` MiB tmpfs, or prints SKIP (fails under `CI=true`) and returns
    /// `None` where mounting is not permitted.
    pub fn mount(size_mib: u64) -> Option<Tmpfs> {
        let dir = unique_temp_dir();
        let out = run_bounded(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size_mib}m,mode=0700"),
                    "tmpfs",
                ])
                .arg(&dir),
            None,
            CLI_TIMEOUT,
        );
        if !out.status.success() {
            let _ = fs::remove_dir(&dir);
            skip_or_fail(&format!(
                "cannot mount a tmpfs ({})",
                output_text(&out).trim()
            ));
            return None;
        }
        Some(Tmpfs { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A fresh empty directory inside the mount.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        fs::create_dir(&d).expect("create dir on tmpfs");
        d
    }

    /// Bytes free for unprivileged files on the mount (statvfs `f_bavail`).
    pub fn free_bytes(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
        unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0, "statvfs");
            st.f_bavail as u64 * st.f_frsize as u64
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The Debian package that installs the program `name`, for the SKIP hint.
fn debian_package(name: &str) -> &str {
    match name {
        "smtp-source" | "smtp-sink" => "postfix",
        "dovecot" => "dovecot-lmtpd",
        other => other,
    }
}

/// A blocking SMTP peer. Every read and write times out after [`IO_TIMEOUT`].
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl SmtpClient {
    /// Connects to `addr`. Does not read the greeting: call `expect(220)`.
    pub fn connect(addr: SocketAddr) -> SmtpClient {
        SmtpClient::connect_with_timeout(addr, IO_TIMEOUT)
    }

    /// [`connect`](Self::connect) with another read/write timeout, for transfers so large
    /// that a reply may take longer than [`IO_TIMEOUT`].
    pub fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> SmtpClient {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        SmtpClient::over(stream, timeout)
    }

    /// Connects to `addr` from the loopback address `source` (127.0.0.2 and so on are all
    /// loopback on Linux): a second client address for tests about per-address limits.
    pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> SmtpClient {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::new(source, 0).into())
            .unwrap_or_else(|e| panic!("bind {source}: {e}"));
        sock.connect_timeout(&addr.into(), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {addr} from {source}: {e}"));
        SmtpClient::over(sock.into(), IO_TIMEOUT)
    }

    fn over(stream: TcpStream, timeout: Duration) -> SmtpClient {
        stream.set_read_timeout(Some(timeout)).expect("timeout");
        stream.set_write_timeout(Some(timeout)).expect("timeout");
        let _ = stream.set_nodelay(true);
        let writer = stream.try_clone().expect("clone stream");
        SmtpClient {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Reads one complete (possibly multi-line) reply: its code and its text lines (without
    /// the `NNN-`/`NNN ` prefixes) joined by `\n`. Errors on EOF, timeout or a malformed line.
    pub fn read_reply(&mut self) -> io::Result<(u16, String)> {
        let mut code = None;
        let mut text = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = self.reader.read_until(b'\n', &mut raw)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("connection closed mid-reply after {text:?}"),
                ));
            }
            let line = String::from_utf8_lossy(&raw);
            let Some(line) = line.strip_suffix("\r\n") else {
                return Err(bad_reply(&line, "does not end in CRLF"));
            };
            let bytes = line.as_bytes();
            if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
                return Err(bad_reply(line, "no 3-digit code"));
            }
            let this: u16 = line[..3].parse().expect("digits");
            if *code.get_or_insert(this) != this {
                return Err(bad_reply(line, "code changed inside a multi-line reply"));
            }
            match bytes.get(3) {
                None => {
                    text.push(String::new());
                    break;
                }
                Some(b' ') => {
                    text.push(line[4..].to_string());
                    break;
                }
                Some(b'-') => text.push(line[4..].to_string()),
                Some(_) => return Err(bad_reply(line, "4th byte is neither ' ' nor '-'")),
            }
        }
        Ok((code.expect("at least one line"), text.join("\n")))
    }

    /// [`read_reply`](Self::read_reply) waiting at most `wait` for its first byte (then the
    /// usual timeout): `WouldBlock`/`TimedOut` when nothing came.
    pub fn read_reply_within(&mut self, wait: Duration) -> io::Result<(u16, String)> {
        if self.reader.buffer().is_empty() {
            let usual = self.reader.get_ref().read_timeout()?;
            self.reader.get_ref().set_read_timeout(Some(wait))?;
            let peek = self.reader.fill_buf().map(|b| b.len());
            self.reader.get_ref().set_read_timeout(usual)?;
            if peek? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
        }
        self.read_reply()
    }

    /// Reads one reply and asserts its code; returns its text.
    #[track_caller]
    pub fn expect(&mut self, code: u16) -> String {
        match self.read_reply() {
            Ok((got, text)) => {
                assert_eq!(got, code, "expected {code}, got {got} {text:?}");
                text
            }
            Err(e) => panic!("expected {code}, got error: {e}"),
        }
    }

    /// Sends `line` followed by CRLF.
    pub fn send(&mut self, line: &str) {
        let mut buf = Vec::with_capacity(line.len() + 2);
        buf.extend_from_slice(line.as_bytes());
        buf.extend_from_slice(b"\r\n");
        self.send_bytes(&buf);
    }

    /// Sends raw bytes, exactly as given.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
    }

    /// Sends `line` and asserts the reply code; returns the reply text.
    #[track_caller]
    pub fn cmd(&mut self, line: &str, code: u16) -> String {
        self.send(line);
        self.expect(code)
    }

    /// One complete transaction: MAIL, RCPT for each recipient, DATA, then `body` (CRLF lines,
    /// dot-stuffed here) and the end-of-data mark. Asserts 250/250/354/250; returns the final
    /// reply text.
    #[track_caller]
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> String {
        self.cmd(&format!("MAIL FROM:<{from}>"), 250);
        for rcpt in to {
            self.cmd(&format!("RCPT TO:<{rcpt}>"), 250);
        }
        self.cmd("DATA", 354);
        let mut data = String::with_capacity(body.len() + 8);
        for line in body.split_inclusive("\r\n") {
            if line.starts_with('.') {
                data.push('.');
            }
            data.push_str(line);
        }
        if !data.is_empty() && !data.ends_with("\r\n") {
            data.push_str("\r\n");
        }
        data.push_str(".\r\n");
        self.send_bytes(data.as_bytes());
        self.expect(250)
    }

    /// Gives up the client and returns its buffered reader and its writer (same timeouts),
    /// for tests that take over the raw connection, e.g. after an ODMR turnaround. Bytes the
    /// server sent that were not read yet are still in the reader's buffer.
    pub fn into_parts(self) -> (BufReader<TcpStream>, TcpStream) {
        (self.reader, self.writer)
    }

    /// Asserts that the server closes the connection (EOF or reset) within [`IO_TIMEOUT`],
    /// discarding anything it still sends.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        let mut sink = [0u8; 4096];
        let deadline = Instant::now() + IO_TIMEOUT;
        while Instant::now() < deadline {
            match self.reader.read(&mut sink) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("expected the server to close: {e}"),
            }
        }
        panic!("server kept the connection open for {IO_TIMEOUT:?}");
    }
}

fn bad_reply(line: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed reply line {line:?}: {why}"),
    )
}

/// The value of the unlabelled sample `name` in Prometheus text, if present.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sum of `f(x)` over the entries of a JSON array (0 for a missing or non-array value).
pub fn json_sum(array: &serde_json::Value, f: impl Fn(&serde_json::Value) -> u64) -> u64 {
    array.as_array().map_or(0, |a| a.iter().map(f).sum())
}

/// The `queue --json` entry for `domain`, as (messages, bytes), or `None` if it is absent.
pub fn queue_entry(queue: &serde_json::Value, domain: &str) -> Option<(u64, u64)> {
    queue["domains"]
        .as_array()?
        .iter()
        .find(|d| d["domain"] == domain)
        .map(|d| {
            (
                d["messages"].as_u64().expect("messages is a number"),
                d["bytes"].as_u64().expect("bytes is a number"),
            )
        })
}

/// `BTreeMap` from message sender to the sorted recipients, for order-free comparisons of
/// `queue show` output.
pub fn senders_to_recipients(show: &serde_json::Value) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for m in show["messages"].as_array().expect("messages array") {
        let sender = m["sender"].as_str().expect("sender string").to_string();
        let mut rcpts: Vec<String> = m["recipients"]
            .as_array()
            .expect("recipients array")
            .iter()
            .map(|r| r.as_str().expect("recipient string").to_string())
            .collect();
        rcpts.sort();
        out.insert(sender, rcpts);
    }
    out
}

/// The TCP port a process listens on, found through /proc (the process was told port 0).
pub fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let listening = f.get(3) == Some(&"0A");
        if listening && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)) {
            u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok()
        } else {
            None
        }
    })
}

/// A TCP relay on a fixed loopback port that forwards each connection to whatever `target`
/// holds at accept time, so a customer keeps one provider address while the provider
/// restarts on new ports. `None` drops the client, which looks like an unreachable provider.
pub fn tcp_relay(target: Arc<Mutex<Option<SocketAddr>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Some(to) = *target.lock().unwrap() else {
                continue;
            };
            let Ok(upstream) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
                continue; // dropping the client looks like a dead provider
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                (upstream, client),
            ] {
                thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    addr
}

/// The resident set size (`VmRSS`) of process `pid`, in bytes.
pub fn vm_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

/// Samples a process's RSS every 10 ms on a thread of its own until [`RssSampler::stop`].
pub struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<(u64, u32)>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let (mut max, mut samples) = (0u64, 0u32);
            while !flag.load(Ordering::Relaxed) {
                max = max.max(vm_rss(pid));
                samples += 1;
                thread::sleep(Duration::from_millis(10));
            }
            (max.max(vm_rss(pid)), samples + 1)
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling; returns the largest RSS seen and the number of samples.
    pub fn stop(self) -> (u64, u32) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("RSS sampler thread")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_extra_merges_into_shared_tables() {
        let text = merged_config("[limits]\nmax_recipients = 3\n[quota]\n\"a.test\" = \"1MiB\"\n");
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["limits"]["idle_timeout"].as_str(), Some("2s"));
        assert_eq!(t["limits"]["max_recipients"].as_integer(), Some(3));
        assert_eq!(t["quota"]["a.test"].as_str(), Some("1MiB"));
        assert_eq!(t["server"]["hostname"].as_str(), Some("mx.test"));
    }

    #[test]
    fn listening_file_parses() {
        let l = parse_listening("mx 127.0.0.1:1\nodmr 127.0.0.1:2\nmx 127.0.0.1:3\n").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[2].0, "mx");
        assert!(parse_listening("mx\n").is_err());
        assert!(parse_listening("").is_err());
    }
}
