//! The customer end of ODMR: a server with no fixed address that collects its held mail.
//!
//! - [`deliver`]: the delivery targets (Maildir, LMTP, SMTP, MDA) behind a [`session::Sink`].
//! - [`drain`]: `turnpike bench drain`, a counting test customer.
//! - [`pull`]: `turnpike pull`, one session or a daemon, with its exit codes.
//! - [`pull_config`]: its TOML file and first-run flags.
//! - [`sasl_client`]: the customer's AUTH mechanisms (SCRAM-SHA-256, PLAIN, CRAM-MD5,
//!   EXTERNAL) and the choice between them.
//! - [`session`]: one ODMR session (TLS, AUTH, ATRN, then receive as an SMTP server).

pub mod deliver;
pub mod drain;
pub mod pull;
pub mod pull_config;
pub mod sasl_client;
pub mod session;
