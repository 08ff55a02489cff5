//! The one way an end-to-end test waits for a fact it cannot be told
//! about on a channel or a stdout line (a counter on `/metrics`, a log
//! file, `/proc`, a process's exit): poll it, with a hang guard. Never a
//! sleep standing in for "long enough".

use std::time::{Duration, Instant};

/// How often [`wait_until`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` every 20 ms until it holds; panics with `what` once
/// `within` has passed. Returns how long it took (for printing, and for
/// tests whose promise is a bound on that time).
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < within,
            "expected {what} within {within:?}, it did not happen"
        );
        std::thread::sleep(POLL);
    }
    start.elapsed()
}
