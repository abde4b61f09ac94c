//! The `turnpike` command: `serve`, `account`, `queue`, and the customer's `pull`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use turnpike::accounts::Accounts;
use turnpike::config::{self as config, Config, IoBackend};
use turnpike::control;
use turnpike::customer::session;
use turnpike::provider::server::{self, IoChoice};
use turnpike::types::DomainName;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// On-Demand Mail Relay (RFC 2645): hold mail for customers' domains and hand it over on ATRN.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Data directory (journal, accounts, TLS material, control socket). Overrides the config.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TOML configuration file. Without one, the embedded loopback defaults apply.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the provider: MX, ODMR and submission listeners.
    Serve {
        /// I/O driver: io_uring, epoll, or probe and pick (auto). Default: the config's
        /// `server.io`, which defaults to auto.
        #[arg(long, value_enum)]
        io: Option<IoArg>,
        /// Number of cores (threads) to run; default: the config, else all online CPUs.
        #[arg(long)]
        cores: Option<usize>,
        /// Relay all outbound mail through this host (HOST:PORT), overriding `[relay]`.
        #[arg(long, value_name = "HOST:PORT")]
        smarthost: Option<String>,
    },
    /// Manage customer accounts and the domains they own.
    Account {
        #[command(subcommand)]
        action: AccountAction,
    },
    /// Load generators and test customers for benchmarks.
    Bench {
        #[command(subcommand)]
        action: BenchAction,
    },
    /// Customer side: collect held mail from the provider (ODMR) and deliver it. Exit codes
    /// in docs/customer.md; --config FILE is the pull configuration, not the provider's.
    Pull(PullArgs),
    /// Show held mail per domain (asks the running server, or reads the journal).
    Queue {
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<QueueAction>,
    },
}

/// `turnpike pull`: with `--config FILE`, or with the first-run flags.
#[derive(clap::Args)]
struct PullArgs {
    /// Run as a daemon: a session every DURATION (e.g. 5m; without a value the config's
    /// schedule.every, else 5m), jittered, backing off while sessions fail; stops cleanly on
    /// SIGTERM/SIGINT. Without --every: one session, and the exit code says how it went.
    #[arg(long, value_name = "DURATION", num_args = 0..=1, default_missing_value = "")]
    every: Option<String>,
    /// The provider's ODMR address, HOST:PORT (without --config).
    #[arg(long, value_name = "HOST:PORT")]
    provider: Option<String>,
    /// Account name (without --config).
    #[arg(long)]
    account: Option<String>,
    /// File whose first line is the password (without --config).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// starttls, implicit (the provider's odmrs port) or none (loopback only, unless
    /// --insecure-plaintext).
    #[arg(long, value_parser = ["starttls", "implicit", "none"])]
    tls: Option<String>,
    /// Trust anchors for the provider's certificate (default: the system bundle).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The name the provider's certificate must carry (default: the host of --provider).
    #[arg(long)]
    server_name: Option<String>,
    /// Deliver every recipient into this maildir (without --config).
    #[arg(long, value_name = "DIR")]
    maildir: Option<PathBuf>,
    /// A domain to ask for (repeat); none = bare ATRN.
    #[arg(long = "domain")]
    domains: Vec<String>,
    /// Our host name in EHLO (default: this machine's).
    #[arg(long)]
    hostname: Option<String>,
    /// auto, scram-sha-256, plain, cram-md5 or external.
    #[arg(long)]
    mechanism: Option<String>,
    /// Allow --tls none toward a provider that is not on this machine.
    #[arg(long)]
    insecure_plaintext: bool,
    /// How long to wait for the ATRN reply (at least 10m).
    #[arg(long, value_name = "DURATION")]
    atrn_timeout: Option<String>,
    /// Stall timeout for every other read and write (default 5m).
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum IoArg {
    Auto,
    Uring,
    Epoll,
}

#[derive(Subcommand)]
enum AccountAction {
    /// Add an account owning one or more domains; the password is read from standard input.
    Add {
        /// Account name (the SASL user name).
        name: String,
        /// A domain this account owns (repeat for more).
        #[arg(long = "domain", required = true)]
        domains: Vec<String>,
        /// Read the password from standard input (the only way: never on the command line).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// Do not store a CRAM-MD5 key (fetchmail speaks only CRAM-MD5).
        #[arg(long)]
        no_cram_md5: bool,
        /// Push delivery: keep the session open after ATRN and deliver new mail at once.
        #[arg(long)]
        linger: bool,
    },
    /// Turn push delivery (linger) on or off for an account.
    Linger {
        /// Account name.
        name: String,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Which sender addresses an account may submit mail from: its own domains (the default)
    /// or any address.
    Senders {
        /// Account name.
        name: String,
        /// own or any.
        #[arg(value_parser = ["own", "any"])]
        policy: String,
    },
    /// Pin a TLS client certificate to an account, or unpin it (SASL EXTERNAL).
    Cert {
        /// Account name.
        name: String,
        /// Let the certificate(s) in this PEM file authenticate as the account.
        #[arg(
            long,
            value_name = "PEM",
            conflicts_with = "remove",
            required_unless_present = "remove"
        )]
        add: Option<PathBuf>,
        /// Stop this fingerprint (sha256:HEX, as `account list` shows it) from authenticating.
        #[arg(long, value_name = "FINGERPRINT")]
        remove: Option<String>,
    },
    /// List accounts, their domains and pinned client certificates.
    List,
    /// Remove an account.
    Remove {
        /// Account name.
        name: String,
    },
}

#[derive(Subcommand)]
enum BenchAction {
    /// Act as a customer: AUTH + ATRN, accept everything, report msgs/s, MB/s, latency.
    Drain {
        /// The provider's ODMR address.
        #[arg(long, default_value = "127.0.0.1:3366")]
        provider: std::net::SocketAddr,
        /// Account name.
        #[arg(long)]
        account: String,
        /// File holding the password (first line).
        #[arg(long, value_name = "FILE")]
        password_file: PathBuf,
        /// A domain to ask for (repeat); none = bare ATRN.
        #[arg(long = "domain")]
        domains: Vec<String>,
        /// STARTTLS (verifying the provider) or none.
        #[arg(long, value_enum, default_value_t = TlsArg::Starttls)]
        tls: TlsArg,
        /// CA or self-signed certificate to trust; default: <data-dir>/tls/cert.pem.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Name the provider's certificate must carry.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// SASL mechanism.
        #[arg(long, value_enum, default_value_t = MechArg::Plain)]
        mechanism: MechArg,
    },
    /// Inbound SMTP load against any server: msgs/s, MB/s, errors by reply code, latency
    /// percentiles (connect to greeting, end of data to reply).
    Mx(Box<MxArgs>),
    /// An SMTP server that answers 250 to every message and stores nothing: the ceiling a load
    /// generator reaches on this host.
    Sink(SinkArgs),
    /// A provider's day compressed into minutes: senders, customers on their schedules
    /// (AUTH, upload, ATRN, a mix of 250/4xx/5xx, linger), every message checked delivered
    /// exactly once; exits 1 if the check fails.
    Day(Box<DayArgs>),
}

/// `--json`, `--plot` and the timeline interval, shared by the load generators.
#[derive(clap::Args)]
struct OutputArgs {
    /// Write the report as JSON (schema in docs/benchmarks.md).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw throughput over time and latency percentiles into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Timeline interval (e.g. 1s, 250ms).
    #[arg(long, default_value = "1s", value_parser = parse_bench_duration)]
    interval: std::time::Duration,
}

/// `turnpike bench mx`.
#[derive(clap::Args)]
struct MxArgs {
    /// The SMTP server, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:2525", value_name = "HOST:PORT")]
    target: String,
    /// Parallel SMTP sessions.
    #[arg(long, default_value_t = 10)]
    sessions: usize,
    /// Messages to send (default 10000 unless --duration is given).
    #[arg(long)]
    messages: Option<u64>,
    /// Send for this long (e.g. 30s, 2m) instead of a message count.
    #[arg(long, value_parser = parse_bench_duration)]
    duration: Option<std::time::Duration>,
    /// Open loop: start this many messages per second, whether or not the server keeps up.
    /// Without it: closed loop, each session sends as fast as the replies come.
    #[arg(long)]
    rate: Option<f64>,
    /// Message size (e.g. 4096, 4KiB, 1MB), headers included.
    #[arg(long, default_value = "4KiB", conflicts_with = "size_dist")]
    size: String,
    /// A size distribution instead of one size: `real` (1 KB to 10 MB, docs/benchmarks.md).
    #[arg(long, value_name = "real")]
    size_dist: Option<String>,
    /// The recipient, LOCAL@DOMAIN.
    #[arg(long, default_value = "user@example.com")]
    to: String,
    /// The sender (MAIL FROM and From:).
    #[arg(long, default_value = "sender@client.test")]
    from: String,
    /// Recipients per message (LOCAL0@, LOCAL1@, ... when more than one).
    #[arg(long, default_value_t = 1)]
    recipients: usize,
    /// Spread recipients over this many domains: d0.DOMAIN .. d<N-1>.DOMAIN (1: DOMAIN).
    #[arg(long, default_value_t = 1)]
    domains: usize,
    /// Messages per connection; 1 = a new connection per message, 0 = no limit.
    #[arg(long, default_value_t = 1)]
    per_connection: u64,
    /// Pipeline MAIL and RCPT (RFC 2920) when the server offers PIPELINING.
    #[arg(long)]
    pipelining: bool,
    /// Send BDAT (RFC 3030) when the server offers CHUNKING; with --pipelining, many messages
    /// travel in flight on each connection.
    #[arg(long)]
    chunking: bool,
    /// TLS: none, starttls or implicit.
    #[arg(long, value_enum, default_value_t = BenchTls::None)]
    tls: BenchTls,
    /// Verify the server's certificate against this CA or self-signed certificate (default:
    /// any certificate is accepted, as between MX hosts).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The name in SNI and, with --ca, the name the certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Our EHLO name.
    #[arg(long, default_value = "bench.localhost")]
    helo: String,
    /// Connect timeout and the bound on every reply.
    #[arg(long, default_value = "60s", value_parser = parse_bench_duration)]
    timeout: std::time::Duration,
    /// Sample this server process's CPU and RSS from /proc during the run.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seed for sizes and schedules.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The run id in every message's X-Bench-Id header (default: random).
    #[arg(long)]
    run_id: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

/// `turnpike bench day`.
#[derive(clap::Args)]
struct DayArgs {
    /// Customers (accounts bench-day-NNN made in the running server's data directory).
    #[arg(long, default_value_t = 20)]
    customers: usize,
    /// Instead: the accounts to use, one per line `NAME PASSWORD DOMAIN[,DOMAIN...] [linger]`
    /// (needs --mx and --odmr).
    #[arg(long, value_name = "FILE", requires_all = ["mx", "odmr"])]
    accounts: Option<PathBuf>,
    /// The provider's MX (default: from <data-dir>/listening).
    #[arg(long, value_name = "HOST:PORT")]
    mx: Option<std::net::SocketAddr>,
    /// The provider's ODMR listener (default: from <data-dir>/listening).
    #[arg(long, value_name = "HOST:PORT")]
    odmr: Option<std::net::SocketAddr>,
    /// Parallel sending SMTP sessions.
    #[arg(long, default_value_t = 8)]
    senders: usize,
    /// Messages per sending connection.
    #[arg(long, default_value_t = 10)]
    per_connection: u64,
    /// Mean inbound messages per second at midday (night 0.3x, morning 2x, evening 0.6x).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Length of the day, real time (four phases of a quarter each), then the sweep.
    #[arg(long, default_value = "2m", value_parser = parse_bench_duration)]
    duration: std::time::Duration,
    /// Simulated seconds per real second: customers connect every 1-15 simulated minutes.
    #[arg(long, default_value_t = 60.0)]
    time_scale: f64,
    /// Message size, or `real` for the realistic mix.
    #[arg(long, default_value = "real")]
    size_dist: String,
    /// The customers' answers during the day, CODE=WEIGHT,...
    #[arg(long, default_value = "250=90,451=7,554=3")]
    reply_mix: String,
    /// Share of the customers that upload outgoing mail before ATRN (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    submitters: f64,
    /// Share of the made accounts that linger (push); with --accounts, the file says.
    #[arg(long, default_value_t = 0.2)]
    linger: f64,
    /// A lingering customer leaves after this long without mail.
    #[arg(long, default_value = "3s", value_parser = parse_bench_duration)]
    linger_idle: std::time::Duration,
    /// Customer TLS: none or starttls (trusting --ca, default <data-dir>/tls/cert.pem).
    #[arg(long, value_enum, default_value_t = TlsArg::None)]
    tls: TlsArg,
    /// CA or certificate to trust for --tls starttls.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The name the provider's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Customer SASL mechanism.
    #[arg(long, value_enum, default_value_t = MechArg::CramMd5)]
    mechanism: MechArg,
    /// Bound on the sweep after the day.
    #[arg(long, default_value = "2m", value_parser = parse_bench_duration)]
    sweep_timeout: std::time::Duration,
    /// The server process to sample (default: the holder of <data-dir>/lock).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The run id in every X-Bench-Id (default: random).
    #[arg(long)]
    run_id: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
}

/// `turnpike bench sink`.
#[derive(clap::Args)]
struct SinkArgs {
    /// Where to listen; port 0 picks a free port (the address is printed first).
    #[arg(long, default_value = "127.0.0.1:2626")]
    listen: std::net::SocketAddr,
    /// Core threads, each with its own listener.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// I/O driver.
    #[arg(long, value_enum, default_value_t = IoArg::Auto)]
    io: IoArg,
    /// Stop after this many accepted messages.
    #[arg(long)]
    messages: Option<u64>,
    /// Stop after this long (otherwise at SIGINT/SIGTERM).
    #[arg(long, value_parser = parse_bench_duration)]
    duration: Option<std::time::Duration>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum BenchTls {
    None,
    Starttls,
    Implicit,
}

/// Durations for the bench options: `250ms`, or whole `s`/`m`/`h` as in the configuration.
fn parse_bench_duration(s: &str) -> Result<std::time::Duration, String> {
    if let Some(ms) = s.trim().strip_suffix("ms") {
        if let Ok(n) = ms.trim().parse::<u64>() {
            return Ok(std::time::Duration::from_millis(n));
        }
    }
    config::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration like 30s or 250ms"))
}

#[derive(Clone, Copy, ValueEnum)]
enum TlsArg {
    None,
    Starttls,
}

#[derive(Clone, Copy, ValueEnum)]
enum MechArg {
    Plain,
    CramMd5,
}

#[derive(Subcommand)]
enum QueueAction {
    /// List the held messages of one domain.
    Show {
        /// The domain.
        domain: String,
    },
    /// Attempt delivery of an outbound destination now (the running server).
    Retry {
        /// The recipient domain.
        destination: String,
    },
    /// Reclaim journal space now: delete segments with nothing live, compact the oldest
    /// mostly-dead one (the running server).
    Reclaim,
    /// Report a message to its sender as undeliverable and drop it: an outbound message, or
    /// a quarantined one (its stored copy is damaged).
    Bounce {
        /// The message id (as `turnpike queue show` or `turnpike queue` prints it).
        id: String,
    },
    /// Drop a quarantined message without a report.
    Delete {
        /// The message id (as `turnpike queue` prints it under QUARANTINED).
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The load generators run many sessions: their per-session lines would drown the report.
    let default_level = match cli.command {
        Command::Bench { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TURNPIKE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The customer's command has its own configuration (and exit codes); the provider's
    // configuration is never read for it.
    if let Command::Pull(args) = cli.command {
        return ExitCode::from(pull(cli.config.as_deref(), args));
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = cli.data_dir {
        config.server.data_dir = dir;
    }
    let data_dir = config.server.data_dir.clone();
    match cli.command {
        Command::Serve {
            io,
            cores,
            smarthost,
        } => {
            if let Some(h) = smarthost {
                let host = turnpike::config::Smarthost::parse(&h)
                    .ok_or_else(|| format!("--smarthost {h}: expected HOST:PORT"))?;
                config.relay.mode = turnpike::config::RelayMode::Smarthost(host);
            }
            let choice = match (io, config.server.io) {
                (Some(IoArg::Uring), _) | (None, IoBackend::Uring) => IoChoice::Uring,
                (Some(IoArg::Epoll), _) | (None, IoBackend::Epoll) => IoChoice::Epoll,
                _ => IoChoice::Auto,
            };
            server::serve(config, choice, cores)?;
        }
        Command::Account { action } => {
            turnpike::spool::private_dir(&data_dir)?;
            let path = data_dir.join("accounts.toml");
            let mut accounts = Accounts::load(&path)?;
            match action {
                AccountAction::Linger { name, state } => {
                    accounts.set_linger(&name, state == "on")?;
                    accounts.save(&path)?;
                    notify_server(&data_dir);
                    println!("account {name}: linger {state}");
                }
                AccountAction::Senders { name, policy } => {
                    accounts.set_any_sender(&name, policy == "any")?;
                    accounts.save(&path)?;
                    notify_server(&data_dir);
                    println!("account {name}: senders {policy}");
                }
                AccountAction::Add {
                    name,
                    domains,
                    password_stdin: _,
                    no_cram_md5,
                    linger,
                } => {
                    let domains = domains
                        .iter()
                        .map(|d| DomainName::parse(d).map_err(|e| format!("--domain {d}: {e}")))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut password = String::new();
                    std::io::stdin().read_to_string(&mut password)?;
                    let password = password.trim_end_matches(['\r', '\n']);
                    if password.is_empty() {
                        return Err("empty password on standard input".into());
                    }
                    accounts.add(&name, domains, password, !no_cram_md5)?;
                    if linger {
                        accounts.set_linger(&name, true)?;
                    }
                    accounts.save(&path)?;
                    notify_server(&data_dir);
                    println!("account {name} added");
                }
                AccountAction::Cert { name, add, remove } => {
                    if let Some(pem) = add {
                        for fingerprint in turnpike::tls::pem_fingerprints(&pem)? {
                            accounts.add_client_cert(&name, &fingerprint)?;
                            println!("account {name}: client certificate {fingerprint} pinned");
                        }
                    }
                    if let Some(fingerprint) = remove {
                        accounts.remove_client_cert(&name, &fingerprint)?;
                        println!("account {name}: client certificate {fingerprint} removed");
                    }
                    accounts.save(&path)?;
                    notify_server(&data_dir);
                }
                AccountAction::List => {
                    for a in accounts.iter() {
                        let domains: Vec<&str> = a.domains().iter().map(|d| d.as_str()).collect();
                        let mut line = format!("{}\t{}", a.name(), domains.join(","));
                        for cert in a.client_certs() {
                            line.push_str(&format!("\tcert={cert}"));
                        }
                        println!("{line}");
                    }
                }
                AccountAction::Remove { name } => {
                    accounts.remove(&name)?;
                    accounts.save(&path)?;
                    notify_server(&data_dir);
                    println!("account {name} removed");
                }
            }
        }
        Command::Bench {
            action:
                BenchAction::Drain {
                    provider,
                    account,
                    password_file,
                    domains,
                    tls,
                    ca,
                    server_name,
                    mechanism,
                },
        } => {
            let password = std::fs::read_to_string(&password_file)
                .map_err(|e| format!("{}: {e}", password_file.display()))?;
            let password = password.lines().next().unwrap_or("").to_string();
            let domains = domains
                .iter()
                .map(|d| DomainName::parse(d).map_err(|e| format!("--domain {d}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            let tls = match tls {
                TlsArg::None => session::Tls::None,
                TlsArg::Starttls => {
                    let ca = ca.unwrap_or_else(|| data_dir.join("tls/cert.pem"));
                    session::Tls::StartTls {
                        config: turnpike::tls::client_config_trusting(&ca)?,
                        server_name: rustls::pki_types::ServerName::try_from(server_name)
                            .map_err(|e| format!("--server-name: {e}"))?,
                    }
                }
            };
            let cfg = session::SessionConfig {
                provider,
                hostname: "drain.localhost".into(),
                tls,
                account,
                password,
                mechanism: match mechanism {
                    MechArg::Plain => session::Mechanism::Plain,
                    MechArg::CramMd5 => session::Mechanism::CramMd5,
                },
                domains,
                atrn_timeout: std::time::Duration::from_secs(600),
                idle_timeout: std::time::Duration::from_secs(300),
            };
            let report = turnpike::runtime::io::block_on(
                turnpike::runtime::io::IoKind::Epoll,
                turnpike::customer::drain::drain(turnpike::runtime::io::IoKind::Epoll, &cfg),
            )??;
            print!("{}", report.render());
        }
        Command::Bench {
            action: BenchAction::Mx(args),
        } => bench_mx(*args)?,
        Command::Bench {
            action: BenchAction::Sink(args),
        } => bench_sink(args)?,
        Command::Bench {
            action: BenchAction::Day(args),
        } => bench_day(*args, &data_dir, config.odmr.linger_keepalive)?,
        Command::Pull(_) => unreachable!("dispatched in main"),
        Command::Queue { json, action } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            match action {
                None => {
                    let s = control::queue_summary(&data_dir)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&s)?);
                    } else {
                        print!("{}", control::render_summary(&s, now));
                    }
                }
                Some(QueueAction::Retry { destination }) => {
                    let d = DomainName::parse(&destination)
                        .map_err(|e| format!("{destination}: {e}"))?;
                    let answer = control::request(&data_dir, &format!("retry {d}"))?
                        .ok_or("no running server (retry needs `turnpike serve`)")?;
                    let v: serde_json::Value = serde_json::from_str(&answer)?;
                    if json {
                        println!("{answer}");
                    } else {
                        println!("{d}: {} queued part(s), attempt now", v["retry"]);
                    }
                }
                Some(QueueAction::Bounce { id }) => {
                    turnpike::types::MessageId::parse(&id)
                        .ok_or_else(|| format!("{id}: not a message id"))?;
                    let answer = control::request(&data_dir, &format!("bounce {id}"))?
                        .ok_or("no running server (bounce needs `turnpike serve`)")?;
                    let v: serde_json::Value = serde_json::from_str(&answer)?;
                    if v["busy"] == true {
                        return Err(format!("{id} is being delivered right now; try again").into());
                    }
                    if json {
                        println!("{answer}");
                    } else if v["bounced"] == 0 {
                        return Err(format!(
                            "{id}: no such message in the outbound queue or in quarantine"
                        )
                        .into());
                    } else {
                        println!(
                            "{id}: {} part(s) reported to the sender and removed",
                            v["bounced"]
                        );
                    }
                }
                Some(QueueAction::Delete { id }) => {
                    turnpike::types::MessageId::parse(&id)
                        .ok_or_else(|| format!("{id}: not a message id"))?;
                    let answer = control::request(&data_dir, &format!("delete {id}"))?
                        .ok_or("no running server (delete needs `turnpike serve`)")?;
                    let v: serde_json::Value = serde_json::from_str(&answer)?;
                    if json {
                        println!("{}", answer.trim_end());
                    } else if v["deleted"] == 0 {
                        return Err(format!("{id}: no such message in quarantine").into());
                    } else {
                        println!("{id}: {} quarantined part(s) removed", v["deleted"]);
                    }
                }
                Some(QueueAction::Reclaim) => {
                    let answer = control::request(&data_dir, "reclaim")?
                        .ok_or("no running server (reclaim needs `turnpike serve`)")?;
                    let v: serde_json::Value = serde_json::from_str(&answer)?;
                    if json {
                        println!("{}", answer.trim_end());
                    } else {
                        println!(
                            "{} segment(s) deleted, {} compacted, {} message(s) moved",
                            v["deleted"], v["compacted"], v["moved"]
                        );
                    }
                }
                Some(QueueAction::Show { domain }) => {
                    let d = DomainName::parse(&domain).map_err(|e| format!("{domain}: {e}"))?;
                    let l = control::queue_domain(&data_dir, &d)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&l)?);
                    } else {
                        print!("{}", control::render_listing(&l, now));
                    }
                }
            }
        }
    }
    Ok(())
}

fn bench_mx(a: MxArgs) -> Result<(), Box<dyn std::error::Error>> {
    use std::net::ToSocketAddrs;
    use turnpike::bench::{message::SizeDist, mx};
    let target = a
        .target
        .to_socket_addrs()
        .map_err(|e| format!("--target {}: {e}", a.target))?
        .next()
        .ok_or_else(|| format!("--target {}: no address", a.target))?;
    let sizes = match &a.size_dist {
        Some(d) => SizeDist::parse(d),
        None => SizeDist::parse(&a.size).filter(|d| *d != SizeDist::Real),
    }
    .ok_or("--size/--size-dist: expected a size up to 10MB (4096, 4KiB, 1MB) or `real`")?;
    let mailbox = |what: &str, s: &str| {
        s.rsplit_once('@')
            .filter(|(l, d)| !l.is_empty() && DomainName::parse(d).is_ok())
            .map(|(l, d)| turnpike::types::Mailbox {
                local: l.to_string(),
                domain: d.to_ascii_lowercase(),
            })
            .ok_or_else(|| format!("{what} {s}: expected LOCAL@DOMAIN"))
    };
    let to = mailbox("--to", &a.to)?;
    let sender = mailbox("--from", &a.from)?;
    let name = rustls::pki_types::ServerName::try_from(a.server_name.clone())
        .map_err(|e| format!("--server-name: {e}"))?;
    let tls_config = || -> Result<_, Box<dyn std::error::Error>> {
        Ok(match &a.ca {
            Some(ca) => turnpike::tls::client_config_trusting(ca)?,
            None => turnpike::relay::tls::unverified(),
        })
    };
    let tls = match a.tls {
        BenchTls::None => mx::Tls::None,
        BenchTls::Starttls => mx::Tls::StartTls(tls_config()?, name),
        BenchTls::Implicit => mx::Tls::Implicit(tls_config()?, name),
    };
    if a.recipients == 0 || a.domains == 0 || a.sessions == 0 {
        return Err("--sessions, --recipients and --domains must be at least 1".into());
    }
    let messages = match (a.messages, a.duration) {
        (None, None) => Some(10_000),
        (m, _) => m,
    };
    let client = mx::ClientConfig {
        target,
        sessions: a.sessions,
        per_connection: a.per_connection,
        pipelining: a.pipelining,
        chunking: a.chunking,
        tls,
        helo: a.helo.clone(),
        timeout: a.timeout,
    };
    let recipients = mx::Recipients {
        local: to.local.clone(),
        domain: to.domain.clone(),
        per_message: a.recipients,
        domains: a.domains,
    };
    let run_id = a.run_id.clone().unwrap_or_else(turnpike::bench::new_run_id);
    let (duration, rate, seed) = (a.duration, a.rate, a.seed);
    let report = turnpike::bench::run_mx(
        client,
        move |start| {
            mx::MxLoad::new(
                start, messages, duration, rate, sizes, recipients, sender, run_id, seed,
            )
        },
        a.output.interval,
        a.server_pid,
    )?;
    write_outputs(&report, &a.output)
}

fn bench_sink(a: SinkArgs) -> Result<(), Box<dyn std::error::Error>> {
    use turnpike::bench::sink;
    let io = match a.io {
        IoArg::Uring => turnpike::runtime::io::IoKind::Uring,
        IoArg::Epoll => turnpike::runtime::io::IoKind::Epoll,
        IoArg::Auto => {
            turnpike::runtime::io::IoKind::detect().unwrap_or(turnpike::runtime::io::IoKind::Epoll)
        }
    };
    let opts = sink::SinkOptions {
        listen: a.listen,
        cores: a.cores.max(1),
        io,
        messages: a.messages,
        duration: a.duration,
        interval: a.output.interval,
    };
    let (addr, listeners) = sink::bind(&opts).map_err(|e| format!("--listen {}: {e}", a.listen))?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "bench sink listening on {addr} ({} core(s), {})",
            opts.cores,
            io.name()
        )?;
        out.flush()?;
    }
    let report = sink::run(&opts, listeners)?;
    write_outputs(&report, &a.output)
}

fn bench_day(
    mut a: DayArgs,
    data_dir: &std::path::Path,
    keepalive: std::time::Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    use turnpike::bench::{day, message::SizeDist};
    let (mx, odmr, accounts, pid) = match &a.accounts {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("--accounts {}: {e}", file.display()))?;
            let accounts = day::parse_accounts(&text)
                .map_err(|e| format!("--accounts {}: {e}", file.display()))?;
            let (mx, odmr) = (
                a.mx.ok_or("--mx is required")?,
                a.odmr.ok_or("--odmr is required")?,
            );
            (mx, odmr, accounts, None)
        }
        None => {
            let local = day::prepare_local(data_dir, a.customers.max(1), a.linger)?;
            // A lingering customer must leave (idle timeout) before the provider's NOOP.
            if a.linger > 0.0 && a.linger_idle >= keepalive {
                a.linger_idle = keepalive / 2;
                eprintln!(
                    "bench day: --linger-idle lowered to {:?}, under the server's \
                     odmr.linger_keepalive ({keepalive:?})",
                    a.linger_idle
                );
            }
            (
                a.mx.unwrap_or(local.mx),
                a.odmr.unwrap_or(local.odmr),
                local.accounts,
                local.pid,
            )
        }
    };
    let tls = match a.tls {
        TlsArg::None => session::Tls::None,
        TlsArg::Starttls => {
            let ca =
                a.ca.clone()
                    .unwrap_or_else(|| data_dir.join("tls/cert.pem"));
            session::Tls::StartTls {
                config: turnpike::tls::client_config_trusting(&ca)?,
                server_name: rustls::pki_types::ServerName::try_from(a.server_name.clone())
                    .map_err(|e| format!("--server-name: {e}"))?,
            }
        }
    };
    let run_id = a.run_id.clone().unwrap_or_else(turnpike::bench::new_run_id);
    let opts = day::DayOptions {
        mx,
        odmr,
        accounts,
        senders: a.senders.max(1),
        per_connection: a.per_connection,
        rate: a.rate,
        duration: a.duration,
        time_scale: a.time_scale,
        sizes: SizeDist::parse(&a.size_dist)
            .ok_or("--size-dist: expected a size up to 10MB or `real`")?,
        mix: day::ReplyMix::parse(&a.reply_mix).map_err(|e| format!("--reply-mix: {e}"))?,
        submitters: a.submitters,
        linger_idle: a.linger_idle,
        tls,
        mechanism: match a.mechanism {
            MechArg::Plain => session::Mechanism::Plain,
            MechArg::CramMd5 => session::Mechanism::CramMd5,
        },
        sweep_timeout: a.sweep_timeout,
        seed: a.seed,
        work_dir: std::env::temp_dir().join(format!("turnpike-bench-day-{run_id}")),
        run_id,
        interval: a.output.interval,
        server_pid: a.server_pid.or(pid),
        data_dir: a.accounts.is_none().then(|| data_dir.to_path_buf()),
    };
    let report = day::run(opts)?;
    write_outputs(&report, &a.output)?;
    match &report.verification {
        Some(v) if v.ok => Ok(()),
        _ => Err("verification FAILED (see the report)".into()),
    }
}

/// Prints the summary and writes `--json` and `--plot`.
fn write_outputs(
    report: &turnpike::bench::report::Report,
    out: &OutputArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    print!("{}", report.render());
    if let Some(path) = &out.json {
        report
            .write_json(path)
            .map_err(|e| format!("--json {}: {e}", path.display()))?;
    }
    if let Some(path) = &out.plot {
        turnpike::bench::plot::write_svg(report, path)?;
    }
    Ok(())
}

/// `turnpike pull`; returns the exit code (see `ExitStatus`).
fn pull(config: Option<&std::path::Path>, args: PullArgs) -> u8 {
    use turnpike::customer::pull::{self, ExitStatus, Puller};
    use turnpike::customer::pull_config::{PullConfig, PullFlags};
    use turnpike::runtime::io::{block_on, IoKind};

    let config_error = |e: &dyn std::fmt::Display| {
        eprintln!("turnpike pull: {e}");
        ExitStatus::Config.code()
    };
    // None: one session. Some(None): daemon at the configured interval. Some(Some(d)): at d.
    let every = match args
        .every
        .as_deref()
        .map(|s| (s, config::parse_duration(s)))
    {
        None => None,
        Some(("", _)) => Some(None),
        Some((_, Some(d))) if !d.is_zero() => Some(Some(d)),
        Some((s, _)) => {
            return config_error(&format!(
                "command line: --every: {s:?} is not a duration like \"5m\""
            ))
        }
    };
    let flags = PullFlags {
        provider: args.provider,
        account: args.account,
        password_file: args.password_file,
        tls: args.tls,
        ca: args.ca,
        server_name: args.server_name,
        maildir: args.maildir,
        domains: args.domains,
        hostname: args.hostname,
        mechanism: args.mechanism,
        insecure_plaintext: args.insecure_plaintext,
        atrn_timeout: args.atrn_timeout,
        idle_timeout: args.idle_timeout,
    };
    let loaded = match config {
        Some(path) => {
            let used_flags = flags.provider.is_some()
                || flags.account.is_some()
                || flags.password_file.is_some()
                || flags.tls.is_some()
                || flags.ca.is_some()
                || flags.server_name.is_some()
                || flags.maildir.is_some()
                || !flags.domains.is_empty()
                || flags.hostname.is_some()
                || flags.mechanism.is_some()
                || flags.insecure_plaintext
                || flags.atrn_timeout.is_some()
                || flags.idle_timeout.is_some();
            if used_flags {
                return config_error(&format!(
                    "command line: with --config {}, only --every may be given; \
                     put the other settings in the file",
                    path.display()
                ));
            }
            PullConfig::load(path)
        }
        None => PullConfig::from_flags(&flags),
    };
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => return config_error(&e),
    };
    let every = every.map(|every| {
        every
            .or(cfg.every)
            .unwrap_or(std::time::Duration::from_secs(300))
    });
    let mut puller = match Puller::new(cfg) {
        Ok(p) => p,
        Err(e) => return config_error(&e),
    };
    match every {
        Some(every) => match block_on(IoKind::Epoll, puller.every(IoKind::Epoll, every)) {
            Ok(Ok(())) => ExitStatus::Received.code(),
            Ok(Err(e)) | Err(e) => {
                eprintln!("turnpike pull: {e}");
                ExitStatus::SessionFailed.code()
            }
        },
        None => match block_on(IoKind::Epoll, puller.once(IoKind::Epoll)) {
            Ok(result) => {
                let status = ExitStatus::of(&result);
                if matches!(status, ExitStatus::Received | ExitStatus::NothingHeld) {
                    println!("turnpike pull: {}", pull::describe(&result));
                } else {
                    eprintln!("turnpike pull: {}", pull::describe(&result));
                }
                status.code()
            }
            Err(e) => {
                eprintln!("turnpike pull: cannot start the runtime: {e}");
                ExitStatus::SessionFailed.code()
            }
        },
    }
}

/// Tells a running server to reload the accounts file (no-op when none runs).
fn notify_server(data_dir: &std::path::Path) {
    match control::request(data_dir, "reload") {
        Ok(Some(_)) => eprintln!("running server told to reload accounts"),
        Ok(None) => {}
        Err(e) => eprintln!("warning: could not reach the running server: {e}"),
    }
}
