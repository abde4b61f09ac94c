//! The sans-IO SMTP protocol core: framing, command parsing, replies, the DATA scanner, the
//! outbound dot-stuffer, trace headers and the inbound server state machine.
//!
//! Invariants, checked in review and by a CI grep: nothing under `proto/` touches sockets, files,
//! async runtimes or the clock. Bytes come in as slices, replies go out into caller-owned
//! buffers, and time (where it matters, e.g. the `Received:` date) is an argument. That keeps
//! every machine here deterministic, so tests can replay any input split at any byte offset.
//!
//! Modules, bottom up:
//! - [`frame`]: CRLF line framing with a hard length limit (RFC 5321 §2.3.8, §4.5.3.1).
//! - [`command`]: one command line to a typed [`command::Command`] (RFC 5321 §4.1).
//! - [`reply`]: replies with enhanced status codes (RFC 2034, RFC 3463) to wire bytes.
//! - [`data`]: the resumable end-of-DATA scanner and unstuffer, with smuggling detection.
//! - [`stuff`]: the outbound dot-stuffer, the inverse of [`data`].
//! - [`trace`]: the `Received:` header (RFC 5321 §4.4, RFC 3848).
//! - [`sasl`]: both ends of the SMTP AUTH mechanisms (RFC 4954, RFC 4422): policy, the
//!   provider's exchanges, the one client exchange, the SCRAM and CRAM-MD5 math.
//! - [`throttle`]: the failed-login throttle, per address and per account.
//! - [`inbound`]: the server state machine (MX and ODMR modes) that drives all of the above.
//! - [`reversed`]: the client machine the provider runs after ATRN (RFC 2645 §5.3).
//! - [`dsn`]: RFC 3464 delivery status notifications (bounces and delay reports).
//! - [`fuzzing`]: the bodies of the fuzz targets, shared with the corpus-replay test.

pub mod command;
pub mod data;
pub mod dsn;
pub mod frame;
pub mod fuzzing;
pub mod inbound;
pub mod reply;
pub mod reversed;
pub mod sasl;
pub mod stuff;
pub mod throttle;
pub mod trace;
