//! The head phase of one client connection, sans-IO: how long an idle
//! connection is kept before a head begins, and the deadline of each read
//! while a head arrives (`header_timeout`, and for a tunnel upgrade also
//! `handshake_timeout`, both from the head's first byte). Takes the clock
//! as an argument, so every rule is unit-tested without waiting;
//! `conn.rs` does the reading.

use std::time::{Duration, Instant};

/// The limits, from `[gateway]`.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub header: Option<Duration>,
    pub keepalive: Option<Duration>,
    pub handshake: Option<Duration>,
}

/// What a read that timed out while a head arrived means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadTimeout {
    /// Nothing of a head had come: close quietly.
    Quiet,
    /// A TLS stream cut mid-read must not be written to: close.
    TlsClose,
    /// An upgrade not complete within `handshake_timeout`: 408, refused.
    Upgrade,
    /// A request head not complete within `header_timeout`: 408.
    Request,
}

/// One connection's head clock.
#[derive(Debug, Clone)]
pub struct HeadClock {
    limits: HeadLimits,
    /// A head has been served on this connection (keep-alive from now on).
    served: bool,
    /// When the head being read began (its first byte, or the bytes a
    /// pipelined request left in the buffer).
    began: Option<Instant>,
}

impl HeadClock {
    pub fn new(limits: HeadLimits) -> Self {
        Self {
            limits,
            served: false,
            began: None,
        }
    }

    /// Must the connection wait, holding no buffer, for a head's first
    /// byte? (Not when a pipelined head is already buffered.)
    pub fn idle(&self, buffered: bool) -> bool {
        self.began.is_none() && !buffered
    }

    /// How long to wait for that first byte: a connection that has sent
    /// nothing yet gets `header_timeout`, a keep-alive one
    /// `keepalive_timeout`.
    pub fn idle_limit(&self) -> Option<Duration> {
        if self.served {
            self.limits.keepalive
        } else {
            self.limits.header
        }
    }

    /// A head begins at `now` (unless it already had).
    pub fn begin(&mut self, now: Instant) -> Instant {
        *self.began.get_or_insert(now)
    }

    /// The deadline of the next read of this head; `upgrade`: it names the
    /// tunnel path.
    pub fn read_deadline(&self, upgrade: bool) -> Option<Instant> {
        let began = self.began?;
        let header = self.limits.header.map(|d| began + d);
        let handshake = self.limits.handshake.filter(|_| upgrade).map(|d| began + d);
        match (header, handshake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the head now being read began (metrics, the access log, the
    /// upgrade's handshake deadline).
    pub fn began(&self) -> Option<Instant> {
        self.began
    }

    /// A read timed out; `head_begun`: bytes of the head had come.
    pub fn timed_out(&self, head_begun: bool, tls: bool, upgrade: bool) -> HeadTimeout {
        match () {
            _ if !head_begun => HeadTimeout::Quiet,
            _ if tls => HeadTimeout::TlsClose,
            _ if upgrade => HeadTimeout::Upgrade,
            _ => HeadTimeout::Request,
        }
    }

    /// The head is complete: the next one is a keep-alive one.
    pub fn done(&mut self) {
        self.served = true;
        self.began = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn clock() -> HeadClock {
        HeadClock::new(HeadLimits {
            header: Some(10 * S),
            keepalive: Some(60 * S),
            handshake: Some(5 * S),
        })
    }

    #[test]
    fn a_silent_new_connection_gets_header_timeout_then_keepalive() {
        let mut c = clock();
        assert!(c.idle(false));
        assert_eq!(c.idle_limit(), Some(10 * S));
        c.begin(Instant::now());
        c.done();
        assert_eq!(c.idle_limit(), Some(60 * S));
        // A pipelined head already buffered: no idle wait.
        assert!(!c.idle(true));
    }

    #[test]
    fn deadlines_run_from_the_first_byte() {
        let mut c = clock();
        let t0 = Instant::now();
        assert_eq!(c.read_deadline(false), None);
        c.begin(t0);
        c.begin(t0 + 3 * S); // a later read does not move it
        assert_eq!(c.read_deadline(false), Some(t0 + 10 * S));
        assert_eq!(c.read_deadline(true), Some(t0 + 5 * S));
        assert_eq!(c.began(), Some(t0));
    }

    #[test]
    fn what_a_timeout_means() {
        let c = clock();
        assert_eq!(c.timed_out(false, true, true), HeadTimeout::Quiet);
        assert_eq!(c.timed_out(true, true, true), HeadTimeout::TlsClose);
        assert_eq!(c.timed_out(true, false, true), HeadTimeout::Upgrade);
        assert_eq!(c.timed_out(true, false, false), HeadTimeout::Request);
    }

    #[test]
    fn no_limits() {
        let mut c = HeadClock::new(HeadLimits {
            header: None,
            keepalive: None,
            handshake: None,
        });
        c.begin(Instant::now());
        assert_eq!(c.read_deadline(true), None);
        assert_eq!(c.idle_limit(), None);
    }
}
