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
//! Once its head is in, an upgrade waits for its core's handshake turn
//! ([`Pace`], `handshake_rate` after `handshake_burst`) before it is
//! authenticated, so a reconnect storm is served at a steady rate instead
//! of being refused en masse; one that would wait over half of
//! `handshake_timeout` is refused (503, Retry-After = that wait).
//!
//! Cold path only (one lock per upgrade attempt, never per request), so a
//! `Mutex` in [`super::core::Shared`] is the simple, right tool.
//! Never: touch a socket or a core's state.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why an upgrade got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRefusal {
    /// This client address already holds `max_pending_upgrades_per_ip`.
    #[error("{0} tunnel upgrades from this address are already pending")]
    PerIp(usize),
    /// The process already holds `max_pending_upgrades`.
    #[error("{0} tunnel upgrades are already pending")]
    Global(usize),
    /// This core's handshake pace (`handshake_rate`) would make it wait
    /// longer than half of `handshake_timeout`: this many seconds.
    #[error("handshakes are paced; this one would wait {0} s")]
    Paced(u32),
}

impl UpgradeRefusal {
    /// Stable name, for logs, the refusal body and `/metrics`.
    pub fn reason(&self) -> &'static str {
        match self {
            UpgradeRefusal::PerIp(_) => "pending_upgrades_per_ip",
            UpgradeRefusal::Global(_) => "pending_upgrades",
            UpgradeRefusal::Paced(_) => "handshake_rate",
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
    /// One pace per core (`handshake_rate`), each locked only by its core.
    pace: Vec<Mutex<Pace>>,
    paced: AtomicU64,
    refused_paced: AtomicU64,
}

/// Handshake pacing for one core, sans-IO (the caller passes the clock):
/// the generic cell rate algorithm. `burst` handshakes start at once, then
/// one every `1/rate` s; an upgrade is told how long to wait for its turn,
/// or, when that would exceed `max_wait`, refused with that wait (its
/// Retry-After) without taking a turn.
#[derive(Debug, Clone)]
pub struct Pace {
    interval: Duration,
    /// `burst - 1` intervals: how far ahead of now the schedule may run
    /// free (the first of a burst is on time; the others are early).
    tolerance: Duration,
    max_wait: Duration,
    /// When the next turn is due if nobody used the burst.
    next: Option<Instant>,
}

impl Pace {
    /// `rate` 0: unpaced.
    pub fn new(rate: u32, burst: u32, max_wait: Duration) -> Self {
        let interval = if rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(1.0 / rate as f64)
        };
        Self {
            interval,
            tolerance: interval * burst.saturating_sub(1),
            max_wait,
            next: None,
        }
    }

    /// How long an upgrade arriving `now` waits for its turn, or `Err`
    /// with the wait it was refused for.
    pub fn admit(&mut self, now: Instant) -> Result<Duration, Duration> {
        if self.interval.is_zero() {
            return Ok(Duration::ZERO);
        }
        let next = self.next.map_or(now, |n| n.max(now));
        let start = next.checked_sub(self.tolerance).map_or(now, |s| s.max(now));
        let wait = start - now;
        if wait > self.max_wait {
            return Err(wait);
        }
        self.next = Some(next + self.interval);
        Ok(wait)
    }
}

/// One pending upgrade; dropping it frees the slot.
#[derive(Debug)]
pub struct UpgradeSlot {
    limiter: Arc<UpgradeLimiter>,
    ip: IpAddr,
}

impl UpgradeLimiter {
    pub fn new(per_ip: usize, global: usize) -> Arc<Self> {
        Self::paced(per_ip, global, 0, Pace::new(0, 0, Duration::ZERO))
    }

    /// With a handshake pace for each of `cores`.
    pub fn paced(per_ip: usize, global: usize, cores: usize, pace: Pace) -> Arc<Self> {
        Arc::new(Self {
            per_ip,
            global,
            state: Mutex::new(State::default()),
            refused_per_ip: AtomicU64::new(0),
            refused_global: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            pace: (0..cores).map(|_| Mutex::new(pace.clone())).collect(),
            paced: AtomicU64::new(0),
            refused_paced: AtomicU64::new(0),
        })
    }

    /// Core `core`'s turn for a handshake: how long to wait for it, or the
    /// refusal (counted; [`UpgradeRefusal::Paced`]) when the wait would be
    /// too long.
    pub fn pace(&self, core: usize) -> Result<Duration, UpgradeRefusal> {
        let Some(p) = self.pace.get(core) else {
            return Ok(Duration::ZERO);
        };
        let r = p
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(Instant::now());
        match r {
            Ok(wait) => {
                if !wait.is_zero() {
                    self.paced.fetch_add(1, Ordering::Relaxed);
                }
                Ok(wait)
            }
            Err(wait) => {
                self.refused_paced.fetch_add(1, Ordering::Relaxed);
                Err(UpgradeRefusal::Paced(
                    wait.as_secs_f64().ceil().max(1.0) as u32
                ))
            }
        }
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
                UpgradeRefusal::Global(_) | UpgradeRefusal::Paced(_) => &self.refused_global,
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
            ("handshake_rate", &self.refused_paced),
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

impl UpgradeLimiter {
    /// Upgrades that waited for their turn under `handshake_rate`.
    pub fn paced_total(&self) -> u64 {
        self.paced.load(Ordering::Relaxed)
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
    fn pace_lets_a_burst_through_then_spaces_turns() {
        let ms = Duration::from_millis;
        // 1000/s, a burst of 3, waits up to 5 ms.
        let mut p = Pace::new(1000, 3, ms(5));
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(p.admit(t0), Ok(Duration::ZERO));
        }
        // Then one turn per millisecond, queued behind each other.
        for k in 1..=5 {
            assert_eq!(p.admit(t0), Ok(ms(k)), "turn {k}");
        }
        // A sixth would wait 6 ms: refused, and takes no turn.
        assert_eq!(p.admit(t0), Err(ms(6)));
        assert_eq!(p.admit(t0), Err(ms(6)));
        // Time passing frees turns; a quiet spell refills the burst.
        assert_eq!(p.admit(t0 + ms(6)), Ok(Duration::ZERO));
        let later = t0 + ms(1000);
        for _ in 0..3 {
            assert_eq!(p.admit(later), Ok(Duration::ZERO));
        }
        assert_eq!(p.admit(later), Ok(ms(1)));
    }

    #[test]
    fn unpaced_never_waits() {
        let mut p = Pace::new(0, 0, Duration::ZERO);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(p.admit(t0), Ok(Duration::ZERO));
        }
        let l = UpgradeLimiter::paced(1, 1, 2, Pace::new(1, 1, Duration::ZERO));
        assert_eq!(l.pace(0), Ok(Duration::ZERO));
        assert_eq!(l.pace(0), Err(UpgradeRefusal::Paced(1)));
        // Each core has its own pace.
        assert_eq!(l.pace(1), Ok(Duration::ZERO));
        assert_eq!(l.pace(7), Ok(Duration::ZERO));
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
