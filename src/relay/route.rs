//! Where a destination's mail goes: the smarthost, or the domain's MX hosts (RFC 5321 §5.1).
//!
//! MX mode: MX records sorted by preference (equal preferences shuffled, §5.1 asks to spread
//! load), each host's A and AAAA addresses in turn; a domain without MX records is its own
//! mail host (its A/AAAA, the "implicit MX"). A single MX with the root as exchange is a null
//! MX (RFC 7505): the domain accepts no mail, a permanent failure (`556 5.1.10`). A name that
//! does not exist is permanent too (`5.1.2`); every other lookup failure is temporary.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;

use crate::config::{RelaySettings, Smarthost};
use crate::types::DomainName;

/// One host to try, with the name it was found under (for logs, SNI and verification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The MX or smarthost name.
    pub host: String,
    /// One of its addresses, with the SMTP port.
    pub addr: SocketAddr,
}

/// Why a destination could not be routed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteError {
    /// True when retrying cannot help (null MX, no such domain).
    pub permanent: bool,
    /// Enhanced status for the report.
    pub status: (u8, u16, u16),
    /// What happened, for logs and reports.
    pub why: String,
}

/// Builds the resolver: `relay.resolver` when set, else the system configuration.
pub fn resolver(settings: &RelaySettings) -> Result<TokioResolver, String> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match settings.resolver {
        Some(addr) => {
            let group = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                provider,
            )
        }
        None => TokioResolver::builder(provider).map_err(|e| format!("system resolver: {e}"))?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.attempts = 2;
    opts.timeout = std::time::Duration::from_secs(5);
    Ok(builder.build())
}

/// The smarthost's addresses (a literal IP, or a name resolved through `resolver`).
pub async fn smarthost(
    resolver: &TokioResolver,
    host: &Smarthost,
) -> Result<Vec<Target>, RouteError> {
    if let Ok(ip) = host.host.parse::<IpAddr>() {
        return Ok(vec![Target {
            host: host.host.clone(),
            addr: SocketAddr::new(ip, host.port),
        }]);
    }
    let ips = addresses(resolver, &host.host).await?;
    Ok(ips
        .into_iter()
        .map(|ip| Target {
            host: host.host.clone(),
            addr: SocketAddr::new(ip, host.port),
        })
        .collect())
}

/// The MX hosts of `domain`, in the order to try them.
pub async fn mx(
    resolver: &TokioResolver,
    domain: &DomainName,
    port: u16,
) -> Result<Vec<Target>, RouteError> {
    let fqdn = format!("{}.", domain.as_str());
    let hosts: Vec<String> = match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(mx) => {
            let mut records: Vec<(u16, String)> = mx
                .iter()
                .map(|r| (r.preference(), r.exchange().to_ascii()))
                .collect();
            if records.len() == 1 && records[0].1.trim_end_matches('.').is_empty() {
                return Err(RouteError {
                    permanent: true,
                    status: (5, 1, 10),
                    why: format!("{domain} publishes a null MX (RFC 7505): it accepts no mail"),
                });
            }
            shuffle_equal(&mut records);
            records.into_iter().map(|(_, h)| h).collect()
        }
        Err(e) if e.is_nx_domain() => return Err(no_domain(domain)),
        // No MX records: the domain itself is the mail host (RFC 5321 §5.1).
        Err(e) if e.is_no_records_found() => vec![fqdn],
        Err(e) => return Err(temporary(format!("MX lookup for {domain} failed: {e}"))),
    };
    let mut targets = Vec::new();
    let mut last_err = None;
    for host in hosts {
        match addresses(resolver, &host).await {
            Ok(ips) => targets.extend(ips.into_iter().map(|ip| Target {
                host: host.trim_end_matches('.').to_string(),
                addr: SocketAddr::new(ip, port),
            })),
            Err(e) => last_err = Some(e),
        }
    }
    if targets.is_empty() {
        let mut e = last_err.unwrap_or_else(|| temporary(format!("no address for {domain}")));
        // A missing MX host is the domain's problem for now, not proof it takes no mail.
        e.permanent = false;
        e.status = (4, 4, 4);
        return Err(e);
    }
    Ok(targets)
}

async fn addresses(resolver: &TokioResolver, host: &str) -> Result<Vec<IpAddr>, RouteError> {
    match resolver.lookup_ip(host).await {
        Ok(ips) => Ok(ips.iter().collect()),
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => Err(RouteError {
            permanent: false,
            status: (4, 4, 4),
            why: format!("no address for {host}"),
        }),
        Err(e) => Err(temporary(format!("address lookup for {host} failed: {e}"))),
    }
}

fn no_domain(domain: &DomainName) -> RouteError {
    RouteError {
        permanent: true,
        status: (5, 1, 2),
        why: format!("{domain} does not exist (DNS NXDOMAIN)"),
    }
}

fn temporary(why: String) -> RouteError {
    RouteError {
        permanent: false,
        status: (4, 4, 3),
        why,
    }
}

/// Sorts by preference, shuffling hosts of equal preference.
fn shuffle_equal(records: &mut [(u16, String)]) {
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let mut x = u64::from_le_bytes(seed) | 1;
    let mut keyed: Vec<(u16, u64, String)> = records
        .iter()
        .map(|(p, h)| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (*p, x, h.clone())
        })
        .collect();
    keyed.sort();
    for (slot, (p, _, h)) in records.iter_mut().zip(keyed) {
        *slot = (p, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preference_order_is_kept_across_shuffles() {
        for _ in 0..20 {
            let mut r = vec![
                (20, "b".to_string()),
                (10, "a1".to_string()),
                (30, "c".to_string()),
                (10, "a2".to_string()),
            ];
            shuffle_equal(&mut r);
            let prefs: Vec<u16> = r.iter().map(|x| x.0).collect();
            assert_eq!(prefs, [10, 10, 20, 30]);
            assert!(r[0].1.starts_with('a') && r[1].1.starts_with('a'));
        }
    }
}
