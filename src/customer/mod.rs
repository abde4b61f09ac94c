//! The customer end of ODMR: a server with no fixed address that collects its held mail.
//!
//! - [`deliver`]: the delivery targets (Maildir, LMTP, SMTP, MDA) behind a [`session::Sink`].
//! - [`drain`]: `turnpike bench drain`, a counting test customer.
//! - [`outbox`]: the outgoing mail queue (a local journal) and its `[outbox]` settings.
//! - [`outbox_listener`]: the daemon's local submission listener feeding it.
//! - [`pull`]: `turnpike pull`, one session or a daemon, with its exit codes.
//! - [`pull_config`]: its TOML file and first-run flags.
//! - [`session`]: one ODMR session (TLS, AUTH, ATRN, then receive as an SMTP server).

pub mod deliver;
pub mod drain;
pub mod outbox;
pub mod outbox_listener;
pub mod pull;
pub mod pull_config;
pub mod session;
