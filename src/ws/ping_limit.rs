//! A budget of pings per second for a peer (RFC 6455 §5.5.2 obliges an
//! endpoint to answer every ping, so a peer that floods them makes us
//! write as fast as it reads; past the budget the caller fails the
//! connection with 1008, policy violation). Sans-IO: the caller passes the
//! clock, so this is tested without one.

use std::time::{Duration, Instant};

/// At most `max` pings in any one-second window that starts at the first
/// ping after the previous window ended.
#[derive(Debug)]
pub struct PingBudget {
    max: usize,
    window_start: Option<Instant>,
    used: usize,
}

const WINDOW: Duration = Duration::from_secs(1);

impl PingBudget {
    pub fn new(max_per_second: usize) -> Self {
        Self {
            max: max_per_second,
            window_start: None,
            used: 0,
        }
    }

    /// Counts one ping received at `now`; false when it is over budget.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.window_start {
            Some(s) if now.saturating_duration_since(s) < WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.used = 0;
            }
        }
        self.used += 1;
        self.used <= self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_per_window() {
        let t0 = Instant::now();
        let mut b = PingBudget::new(3);
        assert!(b.allow(t0));
        assert!(b.allow(t0 + Duration::from_millis(10)));
        assert!(b.allow(t0 + Duration::from_millis(20)));
        assert!(!b.allow(t0 + Duration::from_millis(30)));
        // A new window starts once a second has passed.
        let t1 = t0 + Duration::from_millis(1000);
        assert!(b.allow(t1));
        assert!(b.allow(t1));
        assert!(b.allow(t1));
        assert!(!b.allow(t1));
    }
}
