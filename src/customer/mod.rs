//! The customer end of ODMR: a server with no fixed address that collects its held mail.
//!
//! - [`deliver`]: the delivery targets (Maildir, LMTP, SMTP, MDA) behind a [`session::Sink`].
//! - [`drain`]: `turnpike bench drain`, a counting test customer.
//! - [`session`]: one ODMR session (TLS, AUTH, ATRN, then receive as an SMTP server).
//!
//! `turnpike pull` (scheduling, delivery to Maildir/LMTP/SMTP) builds on this in a later
//! issue; today the session drives `turnpike bench drain` and the end-to-end tests.

pub mod deliver;
pub mod drain;
pub mod session;
