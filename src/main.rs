//! The `turnpike` command: `serve`, `account`, `queue`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use turnpike::accounts::Accounts;
use turnpike::config::{Config, IoBackend};
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
    /// Show held mail per domain (asks the running server, or reads the journal).
    Queue {
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<QueueAction>,
    },
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
    /// Report an outbound message to its sender as undeliverable and drop it.
    Bounce {
        /// The message id (as `turnpike queue show` prints it).
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
            std::fs::create_dir_all(&data_dir)?;
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
                        return Err(format!("{id}: no such message in the outbound queue").into());
                    } else {
                        println!(
                            "{id}: {} part(s) reported to the sender and removed",
                            v["bounced"]
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

/// Tells a running server to reload the accounts file (no-op when none runs).
fn notify_server(data_dir: &std::path::Path) {
    match control::request(data_dir, "reload") {
        Ok(Some(_)) => eprintln!("running server told to reload accounts"),
        Ok(None) => {}
        Err(e) => eprintln!("warning: could not reach the running server: {e}"),
    }
}
