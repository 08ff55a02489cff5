//! How long a request body may take (sans-IO): a gap limit between reads
//! and a minimum average rate once a grace period has passed, the way
//! Apache's `mod_reqtimeout` bounds slow uploads (`body=…,MinRate=…`).
//!
//! Owns the arithmetic only; `gateway/conn.rs` asks it for the deadline of
//! each body read and answers 408 when that read times out. Never reads a
//! clock itself: every method takes `now`, so the rules are unit-tested
//! without waiting.

use std::time::{Duration, Instant};

/// Which rule cut an upload (for the log line and the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// No byte for `request_body_timeout`.
    Gap,
    /// Average below `request_body_min_rate` after the grace period.
    Rate,
}

/// The limits, from `[gateway]`.
#[derive(Debug, Clone, Copy)]
pub struct PaceLimits {
    /// `request_body_timeout`: longest pause between reads, and the grace
    /// period before the rate rule applies. None = no limit.
    pub gap: Option<Duration>,
    /// `request_body_min_rate`, bytes per second; 0 = no rate rule.
    pub min_rate: u64,
}

/// One body's clock: started when its head was parsed.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    limits: PaceLimits,
    start: Instant,
    received: u64,
}

impl Pace {
    pub fn new(limits: PaceLimits, start: Instant) -> Self {
        Self {
            limits,
            start,
            received: 0,
        }
    }

    /// `n` more body bytes arrived.
    pub fn add(&mut self, n: usize) {
        self.received = self.received.saturating_add(n as u64);
    }

    /// The gateway did not read for `d` (waiting for the tunnel's credit):
    /// that time is not the client's, so the rate clock stops for it.
    pub fn pause(&mut self, d: Duration) {
        self.start += d;
    }

    /// When the read that starts at `now` must have returned, and which
    /// rule that deadline comes from. None: no limit applies.
    ///
    /// The rate rule: by time `start + grace + t` the body must have
    /// `min_rate × t` bytes, so with `received` bytes the deadline is
    /// `start + grace + received / min_rate`.
    pub fn deadline(&self, now: Instant) -> Option<(Instant, Stall)> {
        let gap = self.limits.gap?;
        let by_gap = now + gap;
        if self.limits.min_rate == 0 {
            return Some((by_gap, Stall::Gap));
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.limits.min_rate as f64);
        let by_rate = self.start + gap + earned;
        if by_rate < by_gap {
            Some((by_rate, Stall::Rate))
        } else {
            Some((by_gap, Stall::Gap))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn pace(gap: u64, rate: u64) -> (Pace, Instant) {
        let t0 = Instant::now();
        let limits = PaceLimits {
            gap: Some(S * gap as u32),
            min_rate: rate,
        };
        (Pace::new(limits, t0), t0)
    }

    #[test]
    fn within_the_grace_only_the_gap_counts() {
        let (p, t0) = pace(10, 1000);
        // Nothing received yet: the rate deadline is start + grace, the
        // same instant as the first read's gap deadline.
        assert_eq!(p.deadline(t0).unwrap().0, t0 + 10 * S);
    }

    #[test]
    fn a_trickle_is_cut_by_the_rate_rule() {
        let (mut p, t0) = pace(10, 1000);
        // One byte every 2 s (the attack): never a 10 s gap, but at 9 s
        // in it has 5 bytes, worth 5 ms of credit.
        p.add(5);
        let (d, why) = p.deadline(t0 + 9 * S).unwrap();
        assert_eq!(why, Stall::Rate);
        assert_eq!(d, t0 + 10 * S + Duration::from_millis(5));
    }

    #[test]
    fn a_fast_upload_is_only_bounded_by_the_gap() {
        let (mut p, t0) = pace(10, 1000);
        p.add(1_000_000); // 1000 s of credit
        let (d, why) = p.deadline(t0 + 20 * S).unwrap();
        assert_eq!((d, why), (t0 + 30 * S, Stall::Gap));
    }

    #[test]
    fn waiting_for_credit_is_not_the_clients_time() {
        let (mut p, t0) = pace(10, 1000);
        p.add(5);
        p.pause(60 * S); // the app was slow to read
        let (d, why) = p.deadline(t0 + 65 * S).unwrap();
        assert_eq!(
            (d, why),
            (t0 + 70 * S + Duration::from_millis(5), Stall::Rate)
        );
    }

    #[test]
    fn no_limits() {
        let t0 = Instant::now();
        let p = Pace::new(
            PaceLimits {
                gap: None,
                min_rate: 1000,
            },
            t0,
        );
        assert!(p.deadline(t0).is_none());
        let (p, _) = pace(10, 0);
        assert_eq!(p.deadline(t0).unwrap().1, Stall::Gap);
    }
}
