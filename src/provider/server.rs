//! `turnpike serve`: start-up, the core threads, signals and shutdown.
//!
//! Order matters for "nothing lost": the journal is recovered before any listener accepts, every
//! listener is bound before any core starts (a bad address fails start-up, not a thread), and
//! `<data>/listening` appears only when every core is accepting, so scripts and tests can wait
//! for it instead of sleeping.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crate::accounts::Accounts;
use crate::config::Config;
use crate::runtime::conn::Conn;
use crate::runtime::io::{bind_reuseport, Listener};
use crate::runtime::limiter::{Limiter, Refusal};
use crate::runtime::mesh::Mesh;
use crate::runtime::{self, IoKind};
use crate::spool;

use super::core::{Core, MeshMsg, Shared};
use super::hosted::{CounterTable, Hosted};
use super::instance::{check_ports_free, InstanceLock};
use super::session::{self, Kind};

/// How often each core runs expiry and journal reclaim: a quarter of the maximum hold, within
/// these bounds (so expiry is never late by more than a quarter of the hold).
const MAINTENANCE_MIN: Duration = Duration::from_secs(1);
const MAINTENANCE_MAX: Duration = Duration::from_secs(10);

/// The services a listener can carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// Port 25: mail for hosted domains.
    Mx,
    /// Port 366: ODMR (AUTH + ATRN), STARTTLS offered.
    Odmr,
    /// ODMR over implicit TLS (fetchmail's `--ssl`).
    Odmrs,
    /// Port 587: authenticated submission (RFC 6409), STARTTLS offered.
    Submission,
    /// Port 465: authenticated submission over implicit TLS (RFC 8314).
    Submissions,
}

impl Service {
    fn metrics_label(self) -> crate::metrics::Service {
        match self {
            Service::Mx => crate::metrics::Service::Mx,
            Service::Odmr | Service::Odmrs => crate::metrics::Service::Odmr,
            Service::Submission => crate::metrics::Service::Submission,
            Service::Submissions => crate::metrics::Service::Submissions,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Service::Mx => "mx",
            Service::Odmr => "odmr",
            Service::Odmrs => "odmrs",
            Service::Submission => "submission",
            Service::Submissions => "submissions",
        }
    }
}

/// How to pick the I/O driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoChoice {
    /// io_uring if the kernel allows it, else epoll.
    Auto,
    /// io_uring or fail.
    Uring,
    /// epoll.
    Epoll,
}

/// Runs the provider until SIGTERM or SIGINT. SIGHUP reloads the accounts file.
pub fn serve(config: Config, io_choice: IoChoice, cores: Option<usize>) -> io::Result<()> {
    let data_dir = config.server.data_dir.clone();
    spool::private_dir(&data_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", data_dir.display())))?;
    let _lock = InstanceLock::acquire(&data_dir)?;

    // Signals go to the main thread only: block them before any thread starts (threads
    // inherit the mask), then wait for them with sigwait below.
    let signals = block_signals();

    let io = match io_choice {
        IoChoice::Epoll => IoKind::Epoll,
        IoChoice::Uring => IoKind::detect().map_err(|e| {
            io::Error::other(format!(
                "--io uring requested but io_uring is unavailable: {e}"
            ))
        })?,
        IoChoice::Auto => match IoKind::detect() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, falling back to epoll");
                IoKind::Epoll
            }
        },
    };
    let cores = cores
        .filter(|n| *n > 0)
        .unwrap_or_else(|| match config.server.cores {
            0 => runtime::online_cores(),
            n => n,
        });

    let (cert, key) =
        crate::tls::identity_files(&config.tls.identity, &data_dir, &config.server.hostname)
            .map_err(io::Error::other)?;
    let server_tls = |client_auth| {
        crate::tls::server_config(&cert, &key, client_auth)
            .map(Some)
            .map_err(io::Error::other)
    };
    let tls = server_tls(crate::tls::ClientAuth::None)?;
    let tls_client_certs = server_tls(crate::tls::ClientAuth::Pinned)?;

    let accounts_path = data_dir.join("accounts.toml");
    let accounts = Accounts::load(&accounts_path).map_err(io::Error::other)?;
    let counters = Arc::new(CounterTable::default());
    let hosted = Arc::new(Hosted::build(&accounts, &config, &counters));
    if hosted.is_empty() {
        tracing::warn!(
            "no hosted domains yet: every RCPT will be refused until `turnpike account add`"
        );
    }

    let mut recovered = spool::recover(&data_dir).map_err(io::Error::other)?;
    tracing::info!(
        parts = recovered.parts.len(),
        damaged_stretches = recovered.damage.len(),
        damaged_messages = recovered.damaged.len(),
        missing_segments = recovered.missing.len(),
        "journal recovered"
    );

    check_ports_free(configured_addrs(&config))?;
    let listeners = bind_all(&config, cores)?;
    let mesh = Arc::new(Mesh::new(cores));
    let shared = Arc::new(Shared {
        limiter: Limiter::new(
            config.limits.max_connections as usize,
            config.limits.max_connections_per_ip,
            config.limits.trusted_networks.clone(),
        ),
        config,
        mesh: mesh.clone(),
        tls,
        tls_client_certs,
        counters,
        io,
        auth_secret: auth_secret(&data_dir)?,
        last_atrn: Default::default(),
        sessions: Default::default(),
        submit_rates: Default::default(),
        pins: Default::default(),
    });

    // Split recovered parts by shard core, and the writers' state by core.
    let mut shards: Vec<spool::DomainIndex> =
        (0..cores).map(|_| spool::DomainIndex::new()).collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for part in recovered.parts.iter().cloned() {
        let shard = (part.domain.shard_hash() % cores as u64) as usize;
        shared.counters.counters(&part.domain).add(part.bytes);
        let (id, domain) = (part.id, part.domain.clone());
        shards[shard].insert(part);
        if recovered.damaged.contains(&id) {
            let why = "body checksum mismatch (found at recovery)";
            shards[shard].quarantine(id, &domain, why, now);
            tracing::error!(%id, %domain, "held message quarantined at start: its stored body is damaged");
        }
    }

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    let mut threads = Vec::new();
    let mut per_core_listeners = listeners.per_core;
    for (index, shard) in shards.into_iter().enumerate().rev() {
        let my_listeners = per_core_listeners.pop().unwrap_or_default();
        let shared = shared.clone();
        let hosted = hosted.clone();
        let ready = ready_tx.clone();
        let mut journal_cfg = spool::JournalConfig::new(&data_dir, index as u16, io);
        journal_cfg.segment_size = shared.config.spool.segment_size;
        journal_cfg.compact_below = shared.config.spool.compact_live_ratio;
        journal_cfg.pins = Some(shared.pins.clone());
        let writer_state = recovered.take_dir(index as u16);
        // Journals of cores that no longer run (fewer cores than last time) are adopted by
        // core `n % cores`, which appends their DONE/EXPIRE records from now on.
        let orphans: Vec<u16> = recovered
            .dirs
            .keys()
            .copied()
            .filter(|n| usize::from(*n) >= cores && usize::from(*n) % cores == index)
            .collect();
        let adopted_state: Vec<(spool::JournalConfig, spool::DirRecovery)> = orphans
            .into_iter()
            .map(|n| {
                let mut cfg = journal_cfg.clone();
                cfg.core = n;
                (cfg, recovered.take_dir(n))
            })
            .collect();
        let handle = runtime::spawn_core(index, io, true, move || async move {
            let journal = match spool::JournalHandle::open(journal_cfg, writer_state).await {
                Ok(j) => j,
                Err(e) => {
                    let _ = ready.send(Err(format!("core {index}: journal: {e}")));
                    return;
                }
            };
            let mut adopted = HashMap::new();
            for (cfg, state) in adopted_state {
                let n = cfg.core;
                match spool::JournalHandle::open(cfg, state).await {
                    Ok(j) => {
                        tracing::info!(
                            core = index,
                            adopted = n,
                            "adopted the journal of a core that no longer runs"
                        );
                        adopted.insert(n, j);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("core {index}: journal core-{n}: {e}")));
                        return;
                    }
                }
            }
            let core = Core::new(index, shared, hosted, journal, adopted, shard);
            tokio::task::spawn_local(core.clone().run_mesh());
            let every =
                (core.shared.config.spool.max_hold / 4).clamp(MAINTENANCE_MIN, MAINTENANCE_MAX);
            tokio::task::spawn_local(core.clone().run_maintenance(every));
            tokio::task::spawn_local(core.clone().run_scrub());
            tokio::task::spawn_local(crate::relay::run(core.clone()));
            for (service, l) in my_listeners {
                match Listener::from_std(core.shared.io, l) {
                    Ok(l) => {
                        tokio::task::spawn_local(accept_loop(core.clone(), service, l));
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("core {index}: listener: {e}")));
                        return;
                    }
                }
            }
            let _ = ready.send(Ok(index));
            core.stopped().await;
            // Give sessions in flight a moment to finish their current command.
            tokio::time::sleep(Duration::from_millis(200)).await;
        })?;
        threads.push(handle);
    }
    drop(ready_tx);
    for _ in 0..cores {
        match ready_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Err(_) => return Err(io::Error::other("a core thread died during start-up")),
        }
    }

    let control = crate::control::spawn_server(&data_dir, mesh.clone())?;
    let mut metrics_addrs = Vec::new();
    for addr in &shared.config.listen.metrics {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {addr} (metrics): {e}"))
        })?;
        metrics_addrs.push(listener.local_addr()?);
        let mesh = mesh.clone();
        let dir = data_dir.clone();
        crate::metrics::serve_http(listener, move || scrape(&mesh, io, &dir))?;
    }
    let mut bound: Vec<(&str, SocketAddr)> = listeners
        .bound
        .iter()
        .map(|(s, a)| (s.name(), *a))
        .collect();
    bound.extend(metrics_addrs.iter().map(|a| ("metrics", *a)));
    write_listening(&data_dir, &bound)?;
    for (service, addr) in &bound {
        tracing::info!(service, %addr, "listening");
    }
    tracing::info!(cores, io = io.name(), data_dir = %data_dir.display(), "turnpike serving");

    loop {
        match wait_signal(&signals) {
            libc::SIGHUP => match Accounts::load(&accounts_path) {
                Ok(accounts) => {
                    let snapshot =
                        Arc::new(Hosted::build(&accounts, &shared.config, &shared.counters));
                    tracing::info!(domains = snapshot.len(), "accounts reloaded");
                    for core in 0..cores {
                        mesh.send(core, MeshMsg::Reload(snapshot.clone()));
                    }
                }
                Err(e) => tracing::error!(error = %e, "reload failed; keeping the old accounts"),
            },
            sig => {
                tracing::info!(signal = sig, "shutting down");
                break;
            }
        }
    }
    let _ = std::fs::remove_file(data_dir.join("listening"));
    for core in 0..cores {
        mesh.send(core, MeshMsg::Shutdown);
    }
    for t in threads {
        let _ = t.join();
    }
    drop(control);
    Ok(())
}

/// Accepts connections on one listener of one core until shutdown.
async fn accept_loop(core: Rc<Core>, service: Service, listener: Listener) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = core.stopped() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, service = service.name(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut conn = Conn::plain(stream);
        let permit = match core.shared.limiter.admit(peer.ip()) {
            Ok(p) => p,
            Err(refusal) => {
                core.metrics.borrow_mut().connection_refused();
                let text: &[u8] = match refusal {
                    Refusal::PerAddress => {
                        b"421 4.7.0 Too many connections from your address, try again later\r\n"
                    }
                    Refusal::ServerFull => b"421 4.3.2 Too many connections, try again later\r\n",
                };
                tracing::info!(%peer, ?refusal, "connection refused");
                tokio::task::spawn_local(async move {
                    let _ = conn.write_owned(text.to_vec()).await;
                    conn.close().await;
                });
                continue;
            }
        };
        core.metrics
            .borrow_mut()
            .connection_accepted(service.metrics_label());
        let core = core.clone();
        tokio::task::spawn_local(async move {
            let _permit = permit;
            let kind = match service {
                Service::Odmr | Service::Odmrs => Kind::Odmr,
                Service::Submission | Service::Submissions => Kind::Submission,
                Service::Mx => Kind::Mx,
            };
            if matches!(service, Service::Odmrs | Service::Submissions) {
                if service == Service::Odmrs {
                    // fetchmail's --ssl is what uses this listener; see Conn::set_line_records.
                    conn.set_line_records(true);
                }
                // An authenticating listener: the client may present a certificate (EXTERNAL).
                let Some(tls) = core.shared.tls_client_certs.clone() else {
                    return;
                };
                if let Err(e) = conn.start_tls_server(tls).await {
                    tracing::info!(%peer, error = %e, "implicit TLS handshake failed");
                    return;
                }
            }
            session::serve(core, conn, peer, kind).await;
        });
    }
}

struct Bound {
    per_core: Vec<Vec<(Service, std::net::TcpListener)>>,
    bound: Vec<(Service, SocketAddr)>,
}

/// Binds one SO_REUSEPORT socket per core per address. Port 0 is resolved once (by the first
/// bind) and reused for the other cores, so tests can ask for any free port.
fn bind_all(config: &Config, cores: usize) -> io::Result<Bound> {
    let mut per_core: Vec<Vec<(Service, std::net::TcpListener)>> =
        (0..cores).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    let services = [
        (Service::Mx, &config.listen.mx),
        (Service::Odmr, &config.listen.odmr),
        (Service::Odmrs, &config.listen.odmrs),
        (Service::Submission, &config.listen.submission),
        (Service::Submissions, &config.listen.submissions),
    ];
    for (service, addrs) in services {
        for addr in addrs.iter() {
            let mut actual = *addr;
            for listeners in per_core.iter_mut() {
                let l = bind_reuseport(actual).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot listen on {actual} ({}): {e}", service.name()),
                    )
                })?;
                actual = l.local_addr()?;
                listeners.push((service, l));
            }
            bound.push((service, actual));
        }
    }
    Ok(Bound { per_core, bound })
}

/// Asks every core for its metrics, merges them, renders the Prometheus text.
fn scrape(mesh: &Mesh<MeshMsg>, io: IoKind, data_dir: &Path) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    for core in 0..mesh.cores() {
        mesh.send(core, MeshMsg::Metrics(tx.clone()));
    }
    let mut merged = crate::metrics::Snapshot::new();
    let mut gauges = Vec::new();
    for _ in 0..mesh.cores() {
        if let Ok((snapshot, domains)) = rx.recv_timeout(Duration::from_secs(5)) {
            merged.merge(&snapshot);
            gauges.extend(domains);
        }
    }
    gauges.sort_by(|a, b| a.domain.cmp(&b.domain));
    merged.store.free_bytes = spool::free_bytes(data_dir).ok();
    let info = crate::metrics::ServerInfo {
        version: env!("CARGO_PKG_VERSION"),
        io_driver: io.name(),
        cores: mesh.cores(),
    };
    crate::metrics::render(&merged, &gauges, &info)
}

fn write_listening(data_dir: &Path, bound: &[(&str, SocketAddr)]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text: String = bound.iter().map(|(s, a)| format!("{s} {a}\n")).collect();
    let tmp = data_dir.join("listening.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(spool::FILE_MODE)
        .open(&tmp)?
        .write_all(text.as_bytes())?;
    std::fs::rename(tmp, data_dir.join("listening"))
}

/// Every address the configuration asks us to listen on, with its service name.
fn configured_addrs(config: &Config) -> Vec<(&'static str, SocketAddr)> {
    let services = [
        (Service::Mx, &config.listen.mx),
        (Service::Odmr, &config.listen.odmr),
        (Service::Odmrs, &config.listen.odmrs),
        (Service::Submission, &config.listen.submission),
        (Service::Submissions, &config.listen.submissions),
    ];
    let mut out: Vec<(&'static str, SocketAddr)> = services
        .iter()
        .flat_map(|(s, addrs)| addrs.iter().map(move |a| (s.name(), *a)))
        .collect();
    out.extend(config.listen.metrics.iter().map(|a| ("metrics", *a)));
    out
}

/// Reads `<data>/listening` (written by a running server) into service -> address.
pub fn read_listening(data_dir: &Path) -> Option<HashMap<String, SocketAddr>> {
    let text = std::fs::read_to_string(data_dir.join("listening")).ok()?;
    let mut map = HashMap::new();
    for line in text.lines() {
        let (name, addr) = line.split_once(' ')?;
        map.insert(name.to_string(), addr.parse().ok()?);
    }
    Some(map)
}

/// The server's SASL secret (`<data>/auth-secret`, 32 random bytes, mode 0600), made on first
/// run. Stable across restarts so unknown users' fake SCRAM salts never change.
fn auth_secret(data_dir: &Path) -> io::Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("auth-secret");
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(secret) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(secret);
        }
        return Err(io::Error::other(format!(
            "{}: not a 32-byte secret",
            path.display()
        )));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| io::Error::other(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(&secret)?;
    f.sync_all()?;
    Ok(secret)
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-mask calls on a zeroed sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: sigwait with a valid, initialised set.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}
