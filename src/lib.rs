//! turnpike: an On-Demand Mail Relay (ODMR, RFC 2645) engine.
//!
//! A provider (`turnpike serve`) is the MX for its customers' domains: it accepts their mail
//! and *holds* it durably in a per-core journal, like letters at a post office counter. When a
//! customer with a dynamic address connects to the ODMR port, authenticates and sends `ATRN`,
//! the connection turns around and the provider hands over everything held for it.
//!
//! # Layout
//!
//! Data flows from the socket inward; each layer knows only the one below it.
//!
//! - [`proto`]: the sans-IO protocol core. Framing, command parsing, replies, the DATA
//!   scanner and the server state machine. No sockets, no async, no filesystem, no clock.
//! - [`spool`]: the held-mail journal (per-core segment files, group commit, recovery) and the
//!   per-domain index that lives on each domain's shard core.
//! - [`accounts`]: customers, their domains and their secrets (verifiers, never passwords).
//! - [`config`]: the typed TOML configuration with its embedded defaults.
//! - [`runtime`]: one pinned thread per core, io_uring or epoll, SO_REUSEPORT listeners, the
//!   cross-core mesh and connections over owned buffers (plain or TLS).
//! - [`provider`]: drivers that bind the protocol machines to connections (MX, ODMR and
//!   submission services).
//! - [`relay`]: the outgoing relay (outbound queue to a smarthost or by MX lookup, retries).
//! - [`customer`]: the customer end: `turnpike pull` (config, schedule, exit codes), one ODMR
//!   session (TLS, AUTH, upload, ATRN, receive), the delivery targets and the outbox (the
//!   office's outgoing queue on a spool journal of its own, with its local listener).
//! - [`control`]: the local control socket behind `turnpike queue`.
//! - [`bench`]: the load generators `turnpike bench mx`, `bench sink` and `bench day` (on the
//!   client machine, the inbound machine and the customer session), with their report.
//! - [`metrics`]: per-core counters and latency histograms, merged on scrape and served as
//!   Prometheus text.
#![warn(missing_docs)]

pub mod accounts;
pub mod bench;
pub mod config;
pub mod control;
pub mod customer;
pub mod metrics;
pub mod proto;
pub mod provider;
pub mod relay;
pub mod runtime;
pub mod spool;
pub mod tls;
pub mod types;
