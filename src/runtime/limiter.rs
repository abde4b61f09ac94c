//! Connection admission: a global cap and a per-client-address cap, shared by all cores.
//! Trusted networks (loopback by default, like Postfix's `$mynetworks`) are exempt from the
//! per-address cap, so a provider's relays and load generators are not refused; the global
//! cap still counts them. A connection counts only while its session runs.
//!
//! Touched once at accept and once at close, never per command, so a mutex is fine here; the
//! hot path stays lock-free. A [`Permit`] gives its slot back when dropped, so every exit path
//! of a session releases it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::types::Network;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server-wide connection cap is reached.
    ServerFull,
    /// This client address already has its maximum number of connections.
    PerAddress,
}

/// Counts open connections per address and in total.
pub struct Limiter {
    max_total: usize,
    max_per_ip: u32,
    trusted: Vec<Network>,
    state: Mutex<(usize, HashMap<IpAddr, u32>)>,
}

/// One admitted connection; releases its slot on drop.
pub struct Permit {
    limiter: Arc<Limiter>,
    /// The address counted against the per-address cap; `None` for a trusted one.
    ip: Option<IpAddr>,
}

impl Limiter {
    /// A limiter with the given caps; addresses in `trusted` have no per-address cap.
    pub fn new(max_total: usize, max_per_ip: u32, trusted: Vec<Network>) -> Arc<Limiter> {
        Arc::new(Limiter {
            max_total,
            max_per_ip,
            trusted,
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 >= self.max_total {
            return Err(Refusal::ServerFull);
        }
        let counted = !self.trusted.iter().any(|n| n.contains(ip));
        if counted {
            let n = st.1.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return Err(Refusal::PerAddress);
            }
            *n += 1;
        }
        st.0 += 1;
        Ok(Permit {
            limiter: self.clone(),
            ip: counted.then_some(ip),
        })
    }

    /// Open connections in total.
    pub fn open(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.limiter.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 -= 1;
        let Some(ip) = self.ip else { return };
        if let Some(n) = st.1.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                st.1.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_total_and_releases_on_drop() {
        let l = Limiter::new(3, 2, Vec::new());
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = l.admit(a).unwrap();
        let _p2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(Refusal::PerAddress));
        let _p3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(Refusal::ServerFull));
        drop(p1);
        assert_eq!(l.open(), 2);
        assert!(l.admit(a).is_ok());
    }

    #[test]
    fn trusted_networks_have_no_per_address_cap_but_count_in_the_total() {
        let l = Limiter::new(4, 1, Network::loopback());
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.9".parse().unwrap();
        let remote: IpAddr = "192.0.2.1".parse().unwrap();
        let p1 = l.admit(local).unwrap();
        let _p2 = l.admit(local).unwrap();
        let _p3 = l.admit(mapped).unwrap();
        let _p4 = l.admit(remote).unwrap();
        assert_eq!(l.admit(local).err(), Some(Refusal::ServerFull));
        drop(p1);
        assert_eq!(l.admit(remote).err(), Some(Refusal::PerAddress));
        assert!(l.admit(local).is_ok());
    }
}
