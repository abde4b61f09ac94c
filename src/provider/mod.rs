//! Drivers that bind the protocol machines to connections, and the server that runs them.
//!
//! - [`server`]: start-up, listeners, core threads, signals.
//! - [`atrn`]: the ATRN decision: authorisation, leases, "is there mail".
//! - [`core`]: what one core owns (journal writer, index shard, hosted snapshot).
//! - [`hosted`]: the hosted-domain snapshot and quota counters.
//! - [`ingest`]: one inbound message into the journal, whole or streamed while it arrives.
//! - [`instance`]: one server per data directory and per port (the lock, the port probe).
//! - [`outcome`]: per-recipient outcomes of a delivery attempt, settled as DONE or SETTLE
//!   (shared by the reversal and the relay).
//! - [`quarantine`]: held parts whose stored copy is damaged; the operator's bounce/delete.
//! - [`report`]: RFC 3464 delivery reports (refusals, expiry).
//! - [`reversal`]: delivering held mail after ATRN.
//! - [`session`]: the session driver for the MX, ODMR and submission listeners.
//! - [`submit`]: authenticated submission policy: senders, rate limits, routing.

pub mod atrn;
pub mod core;
pub mod hosted;
pub mod ingest;
pub mod instance;
pub(crate) mod outcome;
pub mod quarantine;
pub mod report;
pub mod reversal;
pub mod server;
pub mod session;
pub mod submit;
