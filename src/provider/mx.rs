//! The MX session driver: binds one [`proto::inbound::Inbound`] machine to one connection.
//!
//! The loop is the one every driver here follows: feed all buffered input to the machine, carry
//! out the actions it asks for (store a message, start TLS, close), flush its replies only when
//! it needs more input (so a pipelined batch gets its replies in one write, RFC 2920), then read
//! with the idle timeout. The machine never sees a socket, the driver never parses SMTP.
//!
//! A 250 for a message is written only after [`Core::store`] returned, and that returns only
//! after the journal's group commit fdatasync'ed the record.

use std::net::SocketAddr;
use std::rc::Rc;

use crate::proto::inbound::{Action, Inbound};
use crate::runtime::conn::Conn;

use super::core::Core;

/// Bytes asked for per socket read. Small messages fit whole; big ones stream through.
const READ_CHUNK: usize = 64 * 1024;

/// Why a session ended, for the log line.
#[derive(Debug)]
enum End {
    Quit,
    PeerClosed,
    IdleTimeout,
    SessionTimeout,
    Io(std::io::Error),
}

/// Serves one MX connection until QUIT, timeout or error.
pub async fn serve(core: Rc<Core>, conn: Conn, peer: SocketAddr) {
    let session_limit = core.shared.config.limits.session_timeout;
    let mut conn = conn;
    let ended = match tokio::time::timeout(session_limit, run(&core, &mut conn, peer)).await {
        Ok(end) => end,
        Err(_) => End::SessionTimeout,
    };
    if let End::SessionTimeout = ended {
        let (_, _) = conn
            .write_owned(b"421 4.4.2 Session time limit reached, closing connection\r\n".to_vec())
            .await;
    }
    conn.close().await;
    match ended {
        End::Quit | End::PeerClosed => tracing::debug!(%peer, ?ended, "mx session ended"),
        End::Io(e) => tracing::info!(%peer, error = %e, "mx session ended by an I/O error"),
        _ => tracing::info!(%peer, ?ended, "mx session ended"),
    }
}

async fn run(core: &Rc<Core>, conn: &mut Conn, peer: SocketAddr) -> End {
    let idle = core.shared.config.limits.idle_timeout;
    let mut machine = Inbound::new(core.inbound_config(conn.is_tls()));
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut pos = 0usize;
    loop {
        let used = machine.handle_input(&input[pos..], &**core);
        pos += used;
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Deliver(incoming) => {
                    let result = core.store(incoming, peer).await;
                    machine.stored(result);
                }
                Action::StartTls => {
                    if let Err(e) = flush_logged(core, conn, &mut machine, peer).await {
                        return End::Io(e);
                    }
                    // RFC 3207 §4.2: plaintext pipelined after STARTTLS must not be acted on
                    // once the channel is secure (the command-injection class).
                    if pos < input.len() {
                        tracing::warn!(%peer, bytes = input.len() - pos, "discarding plaintext pipelined after STARTTLS");
                    }
                    input.clear();
                    pos = 0;
                    let Some(tls) = core.shared.tls.clone() else {
                        return End::Io(std::io::Error::other("STARTTLS without a TLS config"));
                    };
                    if let Err(e) = conn.start_tls_server(tls).await {
                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                        return End::Io(e);
                    }
                    machine.tls_started();
                }
                Action::Close => {
                    let _ = flush_logged(core, conn, &mut machine, peer).await;
                    return End::Quit;
                }
            }
        }
        if machine.is_closed() {
            let _ = flush_logged(core, conn, &mut machine, peer).await;
            return End::Quit;
        }
        // Keep the unread tail at the front so the buffer never grows without bound.
        if pos > 0 && (pos == input.len() || pos > READ_CHUNK) {
            input.drain(..pos);
            pos = 0;
        }
        if used > 0 && pos < input.len() {
            // The machine made progress and has input left: give it another turn before
            // flushing, so a pipelined batch is answered in one write.
            continue;
        }
        if let Err(e) = flush_logged(core, conn, &mut machine, peer).await {
            return End::Io(e);
        }
        match tokio::time::timeout(idle, conn.read_append(&mut input, READ_CHUNK)).await {
            Ok(Ok(0)) => return End::PeerClosed,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return End::Io(e),
            Err(_) => {
                machine.timed_out();
                let _ = flush_logged(core, conn, &mut machine, peer).await;
                return End::IdleTimeout;
            }
        }
    }
}

/// Like [`flush`], and logs every 4xx/5xx reply line: a refusal is always explained in the
/// log, whatever part of the machine produced it.
async fn flush_logged(
    core: &Core,
    conn: &mut Conn,
    machine: &mut Inbound,
    peer: SocketAddr,
) -> std::io::Result<()> {
    for line in machine.output().split(|b| *b == b'\n') {
        if matches!(line.first(), Some(b'4' | b'5')) && line.get(3) == Some(&b' ') {
            let text = String::from_utf8_lossy(line);
            if let Some(code) = text.get(..3).and_then(|c| c.parse().ok()) {
                core.metrics.borrow_mut().reply_sent(code);
            }
            tracing::info!(%peer, reply = %text.trim_end(), "refused");
        }
    }
    flush(conn, machine).await
}

/// Writes the machine's queued replies, reusing its output buffer.
async fn flush(conn: &mut Conn, machine: &mut Inbound) -> std::io::Result<()> {
    if machine.output().is_empty() {
        return Ok(());
    }
    let out = std::mem::take(machine.output());
    let (res, mut out) = conn.write_owned(out).await;
    out.clear();
    *machine.output() = out;
    res
}
