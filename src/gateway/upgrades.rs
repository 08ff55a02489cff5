//! Caps on tunnel upgrades that have not been answered yet: their head is
//! still arriving, or they are being authenticated (a DID proof may wait on
//! a document fetch). An unauthenticated client could otherwise hold any
//! number of them open for free.
//!
//! A slot is taken when a request line names `tunnel_path` (or, for an
//! absolute-form target, when the upgrade head is complete) and released by
//! [`UpgradeSlot`]'s `Drop` on every exit: refused, timed out, handed to
//! another core, or once the 101 is queued on the tunnel. At most
//! `max_pending_upgrades_per_ip` slots per client address (more: 429) and
//! `max_pending_upgrades` in all (more: 503), both with `Retry-After`.
//!
//! Cold path only (one lock per upgrade attempt, never per request), so a
//! `Mutex` in [`super::core::Shared`] is the simple, right tool.
//! Never: touch a socket or a core's state.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why an upgrade got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRefusal {
    /// This client address already holds `max_pending_upgrades_per_ip`.
    #[error("{0} tunnel upgrades from this address are already pending")]
    PerIp(usize),
    /// The process already holds `max_pending_upgrades`.
    #[error("{0} tunnel upgrades are already pending")]
    Global(usize),
}

impl UpgradeRefusal {
    /// Stable name, for logs, the refusal body and `/metrics`.
    pub fn reason(&self) -> &'static str {
        match self {
            UpgradeRefusal::PerIp(_) => "pending_upgrades_per_ip",
            UpgradeRefusal::Global(_) => "pending_upgrades",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// The pending-upgrade counts, shared by all cores.
#[derive(Debug)]
pub struct UpgradeLimiter {
    per_ip: usize,
    global: usize,
    state: Mutex<State>,
    refused_per_ip: AtomicU64,
    refused_global: AtomicU64,
    timed_out: AtomicU64,
}

/// One pending upgrade; dropping it frees the slot.
#[derive(Debug)]
pub struct UpgradeSlot {
    limiter: Arc<UpgradeLimiter>,
    ip: IpAddr,
}

impl UpgradeLimiter {
    pub fn new(per_ip: usize, global: usize) -> Arc<Self> {
        Arc::new(Self {
            per_ip,
            global,
            state: Mutex::new(State::default()),
            refused_per_ip: AtomicU64::new(0),
            refused_global: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        })
    }

    /// Takes a slot for `ip`, or says which cap is full (and counts it).
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<UpgradeSlot, UpgradeRefusal> {
        // An IPv4 client reaching a dual-stack socket is one client.
        let ip = ip.to_canonical();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mine = s.by_ip.get(&ip).copied().unwrap_or(0);
        let refusal = if mine >= self.per_ip {
            Some(UpgradeRefusal::PerIp(self.per_ip))
        } else if s.total >= self.global {
            Some(UpgradeRefusal::Global(self.global))
        } else {
            None
        };
        if let Some(r) = refusal {
            drop(s);
            let c = match r {
                UpgradeRefusal::PerIp(_) => &self.refused_per_ip,
                UpgradeRefusal::Global(_) => &self.refused_global,
            };
            c.fetch_add(1, Ordering::Relaxed);
            return Err(r);
        }
        s.total += 1;
        *s.by_ip.entry(ip).or_insert(0) += 1;
        Ok(UpgradeSlot {
            limiter: self.clone(),
            ip,
        })
    }

    /// Upgrades pending now (admin listener).
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Counts an upgrade closed at `handshake_timeout`.
    pub fn note_timeout(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text for `/metrics`.
    pub fn write_metrics(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "# HELP anp_proxy_pending_upgrades Tunnel upgrades not answered yet.\n\
             # TYPE anp_proxy_pending_upgrades gauge\nanp_proxy_pending_upgrades {}",
            self.pending()
        );
        let _ = writeln!(
            s,
            "# HELP anp_proxy_upgrades_refused_total Tunnel upgrades refused before \
             authentication, by reason.\n# TYPE anp_proxy_upgrades_refused_total counter"
        );
        for (reason, c) in [
            ("pending_upgrades_per_ip", &self.refused_per_ip),
            ("pending_upgrades", &self.refused_global),
            ("handshake_timeout", &self.timed_out),
        ] {
            let _ = writeln!(
                s,
                "anp_proxy_upgrades_refused_total{{reason=\"{reason}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
    }
}

impl Drop for UpgradeSlot {
    fn drop(&mut self) {
        let mut s = self.limiter.state.lock().unwrap_or_else(|e| e.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.by_ip.remove(&self.ip);
            }
        }
    }
}

/// Whether the start of a request head already says it is a tunnel upgrade:
/// `GET <tunnel_path>` followed by a space or `?`. Pure; a few byte
/// compares, so the connection loop can ask after every read of a head.
pub fn names_tunnel_path(head: &[u8], tunnel_path: &str) -> bool {
    let Some(rest) = head.strip_prefix(b"GET ") else {
        return false;
    };
    let Some(after) = rest.strip_prefix(tunnel_path.as_bytes()) else {
        return false;
    };
    matches!(after.first(), Some(b' ' | b'?'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_ip_cap_then_release() {
        let l = UpgradeLimiter::new(2, 10);
        let a = l.try_acquire(ip("10.0.0.1")).unwrap();
        let _b = l.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            l.try_acquire(ip("10.0.0.1")).unwrap_err(),
            UpgradeRefusal::PerIp(2)
        );
        // Another address is not affected.
        let _c = l.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(l.pending(), 3);
        drop(a);
        assert_eq!(l.pending(), 2);
        let _d = l.try_acquire(ip("10.0.0.1")).unwrap();
    }

    #[test]
    fn global_cap_and_mapped_addresses() {
        let l = UpgradeLimiter::new(5, 2);
        let _a = l.try_acquire(ip("10.0.0.1")).unwrap();
        let _b = l.try_acquire(ip("::ffff:10.0.0.1")).unwrap();
        let e = l.try_acquire(ip("10.0.0.3")).unwrap_err();
        assert_eq!(e, UpgradeRefusal::Global(2));
        assert_eq!(e.reason(), "pending_upgrades");
        let l = UpgradeLimiter::new(1, 10);
        let _a = l.try_acquire(ip("10.0.0.1")).unwrap();
        let e = l.try_acquire(ip("::ffff:10.0.0.1")).unwrap_err();
        assert_eq!(e.reason(), "pending_upgrades_per_ip");
    }

    #[test]
    fn names_tunnel_path_needs_the_whole_path() {
        assert!(names_tunnel_path(b"GET /ws HTTP/1.1\r\n", "/ws"));
        assert!(names_tunnel_path(b"GET /ws?x=1 ", "/ws"));
        assert!(!names_tunnel_path(b"GET /ws", "/ws"));
        assert!(!names_tunnel_path(b"GET /wsx HTTP/1.1", "/ws"));
        assert!(!names_tunnel_path(b"POST /ws HTTP/1.1", "/ws"));
        assert!(!names_tunnel_path(b"GET /alice HTTP/1.1", "/ws"));
    }
}
