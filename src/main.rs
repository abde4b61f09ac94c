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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TURNPIKE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
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
