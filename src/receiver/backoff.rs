//! When a receiver's tunnel slot dials again, sans-IO (the caller passes
//! the randomness): after a draining gateway's 1001, a random moment within
//! the spread its close reason asks for (PROTOCOL.md §7.3); after a refusal
//! that says when to come back (429/503 with `Retry-After`), that long plus
//! up to as much again; after anything else, exponential backoff with
//! jitter. Every delay is capped by `reconnect_max_delay`.
//!
//! Never: sleep, read a clock or a random source itself.

use std::time::Duration;

/// The first backoff step, and where it returns after a tunnel that was up
/// for a while or a gateway's orderly 1001.
pub const BASE: Duration = Duration::from_millis(250);

/// How the last attempt ended, as far as the next delay cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// 1001 from a draining gateway, with the spread its reason asked for.
    GoingAway { spread: Duration },
    /// The upgrade was refused; `retry_after` from the answer, if any.
    Refused { retry_after: Option<Duration> },
    /// Connect failure, handshake error, tunnel dropped.
    Down,
}

/// One slot's backoff state.
#[derive(Debug, Clone)]
pub struct Backoff {
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Self {
            max: max.max(BASE),
            step: BASE,
        }
    }

    /// The tunnel was up long enough to count as healthy: start over.
    pub fn reset(&mut self) {
        self.step = BASE;
    }

    /// The delay before the next attempt; `r` is uniform in `[0, 1)`.
    pub fn next(&mut self, ended: Ended, r: f64) -> Duration {
        let r = r.clamp(0.0, 1.0);
        match ended {
            Ended::GoingAway { spread } => {
                self.step = BASE;
                spread.min(self.max).mul_f64(r)
            }
            Ended::Refused {
                retry_after: Some(ra),
            } => {
                // The gateway said when; jitter after it so the refused do
                // not all return at that same second.
                self.step = (self.step * 2).min(self.max);
                ra.mul_f64(1.0 + r).min(self.max)
            }
            Ended::Refused { retry_after: None } | Ended::Down => {
                // Jitter in [step/2, step): receivers don't retry in step.
                let d = self.step.mul_f64(0.5 + r * 0.5);
                self.step = (self.step * 2).min(self.max);
                d
            }
        }
    }
}

/// `Retry-After` in delta-seconds (RFC 9110 §10.2.3); an HTTP date is not
/// something our gateway sends, and is ignored.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn going_away_spreads_within_the_hint_and_resets() {
        let mut b = Backoff::new(MAX);
        b.next(Ended::Down, 0.5);
        b.next(Ended::Down, 0.5);
        let spread = Duration::from_millis(2500);
        assert_eq!(b.next(Ended::GoingAway { spread }, 0.0), Duration::ZERO);
        assert_eq!(
            b.next(Ended::GoingAway { spread }, 0.5),
            Duration::from_millis(1250)
        );
        assert!(b.next(Ended::GoingAway { spread }, 0.999_999) < spread);
        // Reset: the next failure starts from BASE again.
        assert!(b.next(Ended::Down, 0.999) < BASE);
        // A spread longer than reconnect_max_delay is capped by it.
        let mut b = Backoff::new(Duration::from_secs(1));
        let long = Duration::from_secs(50);
        assert_eq!(
            b.next(Ended::GoingAway { spread: long }, 0.5),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn refused_with_retry_after_waits_at_least_that_long() {
        let mut b = Backoff::new(MAX);
        let ra = Some(Duration::from_secs(3));
        for r in [0.0, 0.3, 0.999] {
            let d = b.next(Ended::Refused { retry_after: ra }, r);
            assert!(
                d >= Duration::from_secs(3) && d < Duration::from_secs(6),
                "{d:?}"
            );
        }
        let huge = Some(Duration::from_secs(3600));
        assert_eq!(b.next(Ended::Refused { retry_after: huge }, 0.1), MAX);
    }

    #[test]
    fn failures_back_off_exponentially_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let steps: Vec<Duration> = (0..6).map(|_| b.next(Ended::Down, 0.0)).collect();
        let ms = |d: &Duration| d.as_millis();
        assert_eq!(
            steps.iter().map(ms).collect::<Vec<_>>(),
            [125, 250, 500, 1000, 1000, 1000]
        );
        b.reset();
        assert_eq!(b.next(Ended::Refused { retry_after: None }, 0.0), BASE / 2);
    }

    #[test]
    fn retry_after_parses_delta_seconds_only() {
        assert_eq!(parse_retry_after(" 10 "), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
