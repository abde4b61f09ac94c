//! The local submission listener of the office: plain SMTP from the office's users (or their
//! MTA) into the [`Outbox`], run by the `turnpike pull --every` daemon.
//!
//! It is the sans-IO [`Inbound`] machine in MX mode with a [`Directory`] that takes any
//! recipient with a routable domain: this is an outgoing queue, so every destination is
//! fine. Who may use it is decided at connect time by the client's address
//! (`[outbox] allow`, loopback by default): anyone else gets `554 5.7.1` and the connection
//! is closed, with a log line. No AUTH: the network is the credential, as for a local MTA's
//! `mynetworks`.
//!
//! The 250 after DATA/BDAT is sent only once [`Outbox::queue_as`] resolved, that is once the
//! message (with our `Received:` field naming the client) is fdatasync'ed in the journal. A
//! journal failure answers `451 4.3.0`, so the client keeps the message.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::outbox::{Network, Outbox};
use crate::proto::inbound::{Action, Directory, Inbound, InboundConfig, RcptVerdict};
use crate::proto::reply::Reply;
use crate::proto::trace::{self, Trace};
use crate::runtime::conn::Conn;
use crate::runtime::io::{IoKind, Listener, Stream};
use crate::types::{DomainName, Mailbox};

/// Stall timeout of a client of the listener.
const IDLE: Duration = Duration::from_secs(300);

/// What each listener session needs.
#[derive(Clone)]
pub struct ListenerConfig {
    /// Our name in the greeting and the `Received:` field.
    pub hostname: String,
    /// Client networks allowed to submit.
    pub allow: Vec<Network>,
    /// Largest message, in octets.
    pub max_message_size: u64,
}

impl ListenerConfig {
    /// True when `ip` may submit.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(ip))
    }
}

/// Binds every address (before the first session, so a bad address stops the daemon at
/// start) and spawns one accept loop each with `spawn_local`. Returns the bound addresses
/// (port 0 resolved).
pub fn spawn(
    io: IoKind,
    addrs: &[SocketAddr],
    cfg: ListenerConfig,
    outbox: Rc<Outbox>,
) -> std::io::Result<Vec<SocketAddr>> {
    let mut bound = Vec::new();
    for addr in addrs {
        let std_listener = std::net::TcpListener::bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("outbox.listen {addr}: {e}")))?;
        let local = std_listener.local_addr()?;
        let listener = Listener::from_std(io, std_listener)?;
        tracing::info!(listen = %local, outbox = %outbox.dir().display(), "outbox listening");
        bound.push(local);
        let (cfg, outbox) = (cfg.clone(), Rc::clone(&outbox));
        tokio::task::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let (cfg, outbox) = (cfg.clone(), Rc::clone(&outbox));
                        tokio::task::spawn_local(async move {
                            if let Err(e) = serve(stream, peer, &cfg, &outbox).await {
                                tracing::info!(%peer, error = %e, "outbox session ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(listen = %local, error = %e, "outbox accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    Ok(bound)
}

/// Any recipient whose domain can be routed; the provider decides the rest.
struct AnyRecipient;

impl Directory for AnyRecipient {
    fn check_rcpt(&self, rcpt: &Mailbox, _declared_size: Option<u64>) -> RcptVerdict {
        match DomainName::parse(&rcpt.domain) {
            Ok(_) => RcptVerdict::Accept,
            // The journal keeps recipients by domain part: an address literal would have none.
            Err(_) => RcptVerdict::Reject(Reply::with_status(
                553,
                (5, 1, 3),
                format!("{} cannot be routed from here", rcpt.domain),
            )),
        }
    }
}

/// One client session.
async fn serve(
    stream: Stream,
    peer: SocketAddr,
    cfg: &ListenerConfig,
    outbox: &Outbox,
) -> std::io::Result<()> {
    let mut conn = Conn::plain(stream);
    if !cfg.allows(peer.ip()) {
        tracing::warn!(%peer, "outbox: client not in outbox.allow, refused");
        let reply = Reply::with_status(
            554,
            (5, 7, 1),
            format!("{} Your address may not submit mail here", cfg.hostname),
        );
        let _ = tokio::time::timeout(IDLE, conn.write_owned(reply.to_bytes())).await;
        conn.close().await;
        return Ok(());
    }
    let mut machine_cfg = InboundConfig::new(cfg.hostname.clone());
    machine_cfg.max_message_size = cfg.max_message_size;
    let mut machine = Inbound::new(machine_cfg);
    let mut input: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut pos = 0;
    loop {
        pos += machine.handle_input(&input[pos..], &AnyRecipient);
        while let Some(action) = machine.poll_action() {
            match action {
                Action::Deliver(message) => {
                    let id = outbox.next_id();
                    let received = trace::received(&Trace {
                        host: &cfg.hostname,
                        helo: &message.helo,
                        peer_ip: &peer.ip().to_string(),
                        protocol: message.protocol,
                        recipient: (message.envelope.recipients.len() == 1)
                            .then(|| &message.envelope.recipients[0].mailbox),
                        id: &id.to_string(),
                        account: None,
                        unix_secs: unix_now(),
                    });
                    let mut body = Vec::with_capacity(received.len() + message.body.len());
                    body.extend_from_slice(received.as_bytes());
                    body.extend_from_slice(&message.body);
                    let result = match outbox.queue_as(id, &message.envelope, &body).await {
                        Ok(id) => {
                            tracing::info!(%peer, %id, from = %super::outbox::sender_text(message.envelope.sender.as_ref()),
                                recipients = message.envelope.recipients.len(), bytes = body.len(),
                                "outgoing mail queued");
                            Ok(id.to_string())
                        }
                        Err(e) => {
                            tracing::error!(%peer, error = %e, "outbox journal write failed; message refused");
                            Err(Reply::with_status(
                                451,
                                (4, 3, 0),
                                "Cannot queue the message now, try again later",
                            ))
                        }
                    };
                    machine.stored(result);
                }
                // Bodies come whole: this listener leaves `body_chunk` off.
                Action::StoreChunk(_) | Action::DiscardChunks => {}
                Action::StartTls => {
                    // Not offered (tls_available is false), so the machine never asks.
                    machine.timed_out();
                }
                Action::Close => {
                    conn.flush_buffer(machine.output()).await?;
                    conn.close().await;
                    return Ok(());
                }
            }
        }
        if machine.is_closed() {
            conn.flush_buffer(machine.output()).await?;
            conn.close().await;
            return Ok(());
        }
        if pos > 0 && pos == input.len() {
            input.clear();
            pos = 0;
        }
        conn.flush_buffer(machine.output()).await?;
        match tokio::time::timeout(IDLE, conn.read_append(&mut input, 16 * 1024)).await {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => machine.timed_out(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_networks_may_submit_and_any_routable_recipient_is_taken() {
        let cfg = ListenerConfig {
            hostname: "gw.office.test".into(),
            allow: Network::loopback(),
            max_message_size: 1 << 20,
        };
        assert!(cfg.allows("127.0.0.1".parse().unwrap()));
        assert!(cfg.allows("::1".parse().unwrap()));
        assert!(!cfg.allows("192.168.1.5".parse().unwrap()));
        let code = |rcpt: &str| {
            let (local, domain) = rcpt.split_once('@').unwrap();
            let m = Mailbox {
                local: local.into(),
                domain: domain.into(),
            };
            match AnyRecipient.check_rcpt(&m, None) {
                RcptVerdict::Accept => 250,
                RcptVerdict::Reject(r) => r.code,
            }
        };
        assert_eq!(code("anyone@far.example"), 250);
        assert_eq!(code("x@[192.0.2.1]"), 553);
    }
}
