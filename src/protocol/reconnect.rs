//! What a draining gateway tells its receivers about coming back
//! (PROTOCOL.md §7.3), sans-IO: the reason of the 1001 Close carries the
//! gateway's tunnel count and the window over which receivers should
//! spread their reconnects, so that a restart with 10,000 tunnels does not
//! bring 10,000 handshakes within 100 ms.
//!
//! The reason is text for humans with `key=value` fields after `;`:
//! `gateway shutting down; tunnels=10000; spread_ms=2500`. A reason
//! without `spread_ms` (an older gateway) means the old 100 ms.

use std::time::Duration;

/// The spread when the gateway gives none, and the least it ever asks for.
pub const MIN_SPREAD: Duration = Duration::from_millis(100);

/// The most a gateway asks for: a receiver also caps it with its own
/// `reconnect_max_delay`.
pub const MAX_SPREAD: Duration = Duration::from_secs(60);

/// The handshake rate a gateway assumes for its successor when its own
/// is unpaced (`handshake_rate = 0`), per core.
pub const UNPACED_RATE: u32 = 2000;

/// How long `tunnels` reconnects take at `rate_per_core` handshakes a
/// second on each of `cores`: the window receivers spread over.
pub fn spread_for(tunnels: usize, rate_per_core: u32, cores: usize) -> Duration {
    let rate = if rate_per_core == 0 {
        UNPACED_RATE
    } else {
        rate_per_core
    };
    let per_second = (rate as f64 * cores.max(1) as f64).max(1.0);
    Duration::from_secs_f64(tunnels as f64 / per_second).clamp(MIN_SPREAD, MAX_SPREAD)
}

/// The 1001 reason a draining gateway sends (under 123 bytes, RFC 6455
/// §5.5: a control frame's payload is at most 125).
pub fn going_away_reason(tunnels: usize, spread: Duration) -> String {
    format!(
        "gateway shutting down; tunnels={tunnels}; spread_ms={}",
        spread.as_millis()
    )
}

/// The spread a 1001 reason asks for: `spread_ms`, at most [`MAX_SPREAD`];
/// [`MIN_SPREAD`] when absent or unreadable.
pub fn spread_of(reason: &str) -> Duration {
    reason
        .split(';')
        .filter_map(|f| f.trim().strip_prefix("spread_ms="))
        .find_map(|v| v.parse::<u64>().ok())
        .map(|ms| Duration::from_millis(ms).min(MAX_SPREAD))
        .unwrap_or(MIN_SPREAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_round_trips_and_fits_a_close_frame() {
        let spread = spread_for(10_000, 2000, 2);
        assert_eq!(spread, Duration::from_millis(2500));
        let r = going_away_reason(usize::MAX, MAX_SPREAD);
        assert!(r.len() <= 123, "{r}");
        let r = going_away_reason(10_000, spread);
        assert_eq!(r, "gateway shutting down; tunnels=10000; spread_ms=2500");
        assert_eq!(spread_of(&r), spread);
    }

    #[test]
    fn spread_is_bounded_both_ways() {
        assert_eq!(spread_for(0, 2000, 4), MIN_SPREAD);
        assert_eq!(spread_for(10, 0, 1), MIN_SPREAD);
        assert_eq!(spread_for(100_000_000, 1, 1), MAX_SPREAD);
        // Unpaced gateways assume UNPACED_RATE per core.
        assert_eq!(spread_for(4000, 0, 1), Duration::from_secs(2));
    }

    #[test]
    fn old_or_odd_reasons_mean_the_old_spread() {
        assert_eq!(spread_of("gateway shutting down"), MIN_SPREAD);
        assert_eq!(spread_of(""), MIN_SPREAD);
        assert_eq!(spread_of("x; spread_ms=abc"), MIN_SPREAD);
        assert_eq!(spread_of("x; spread_ms=99999999"), MAX_SPREAD);
        assert_eq!(spread_of("x;spread_ms=700"), Duration::from_millis(700));
    }
}
