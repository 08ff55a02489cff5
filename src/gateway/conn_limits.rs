//! Connections per client address (`max_connections_per_ip`), all cores
//! together, and the counts of connections refused at accept.
//!
//! Owns one map of open connections per address (IPv4, or IPv6 /64), a
//! `Mutex` taken when a connection is accepted and when it closes: per
//! connection, never per request. A refused connection is closed before
//! anything is read from it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::ratelimit::ip_key;

/// Why a connection was refused at accept (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    MaxConnections,
    PerIp,
}

impl ConnRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            ConnRefusal::MaxConnections => "max_connections",
            ConnRefusal::PerIp => "per_ip",
        }
    }
}

#[derive(Debug, Default)]
pub struct ConnLimits {
    /// 0: no per-address limit (reloadable).
    per_ip: AtomicUsize,
    open: Mutex<HashMap<u128, usize>>,
    refused_max: AtomicU64,
    refused_per_ip: AtomicU64,
}

/// One accepted connection's place in its address's count; given back
/// on drop.
pub struct IpSlot {
    limits: Arc<ConnLimits>,
    key: u128,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl ConnLimits {
    pub fn new(per_ip: usize) -> Arc<ConnLimits> {
        let l = ConnLimits::default();
        l.per_ip.store(per_ip, Ordering::Relaxed);
        Arc::new(l)
    }

    /// SIGHUP: applies to connections accepted from now on.
    pub fn set_per_ip(&self, per_ip: usize) {
        self.per_ip.store(per_ip, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u128, usize>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a connection from `ip`; None (counted) when the address
    /// has `max_connections_per_ip` open already. No limit: no slot, no
    /// lock.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Option<IpSlot>, ConnRefusal> {
        let limit = self.per_ip.load(Ordering::Relaxed);
        if limit == 0 {
            return Ok(None);
        }
        let key = ip_key(ip, 32, 64);
        let mut open = self.lock();
        let n = open.entry(key).or_default();
        if *n >= limit {
            drop(open);
            self.refused(ConnRefusal::PerIp);
            return Err(ConnRefusal::PerIp);
        }
        *n += 1;
        Ok(Some(IpSlot {
            limits: self.clone(),
            key,
        }))
    }

    pub fn refused(&self, why: ConnRefusal) {
        match why {
            ConnRefusal::MaxConnections => &self.refused_max,
            ConnRefusal::PerIp => &self.refused_per_ip,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, connections refused) for `/metrics`.
    pub fn refusals(&self) -> [(&'static str, u64); 2] {
        [
            (
                ConnRefusal::MaxConnections.reason(),
                self.refused_max.load(Ordering::Relaxed),
            ),
            (
                ConnRefusal::PerIp.reason(),
                self.refused_per_ip.load(Ordering::Relaxed),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_counts_come_back_on_drop() {
        let l = ConnLimits::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(ConnRefusal::PerIp));
        // Another address, and the same /64 for IPv6.
        assert!(l.admit("10.0.0.2".parse().unwrap()).is_ok());
        let _v6 = l.admit("2001:db8::1".parse().unwrap()).unwrap();
        let _v6b = l.admit("2001:db8::2".parse().unwrap()).unwrap();
        assert!(l.admit("2001:db8::3".parse().unwrap()).is_err());
        drop(s1);
        assert!(l.admit(a).is_ok());
        assert_eq!(l.refusals()[1], ("per_ip", 2));
        l.set_per_ip(0);
        assert!(l.admit(a).unwrap().is_none(), "no limit: no slot");
    }
}
