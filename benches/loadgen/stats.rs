//! What one load-generator thread measured, and the merge of all threads.
//! Each thread owns its `Stats` (no sharing on the hot path); they are
//! merged once, after the run.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// Why a request did not count as a success (a complete non-2xx
/// response is counted by [`Stats::bad_status`] instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// TCP connect failed or timed out.
    Connect,
    /// No complete response within `--timeout`.
    Timeout,
    /// Read/write error, early close, or an unparsable response.
    Io,
    /// Open loop: due to be sent, but every connection the generator may
    /// open (`--max-conns`) was busy; never sent (the generator's limit,
    /// not the server's answer).
    Unsent,
}

#[derive(Debug)]
pub struct Stats {
    /// Latency of successful requests, microseconds.
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub connect: u64,
    pub status: u64,
    pub timeout: u64,
    pub io: u64,
    pub unsent: u64,
    /// Requests due in the measured window (sent or not): the offered load.
    pub offered: u64,
    /// Latency of complete non-2xx responses (how fast a refusal comes).
    pub refused_hist: Histogram<u64>,
    pub body_bytes: u64,
    /// Non-2xx responses by status code.
    pub statuses: BTreeMap<u16, u64>,
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            // 1 µs .. 100 s at 3 significant digits.
            hist: Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds"),
            ok: 0,
            connect: 0,
            status: 0,
            timeout: 0,
            io: 0,
            unsent: 0,
            offered: 0,
            refused_hist: Histogram::new_with_bounds(1, 100_000_000, 3)
                .expect("valid histogram bounds"),
            body_bytes: 0,
            statuses: BTreeMap::new(),
        }
    }

    pub fn record(&mut self, micros: u64, body_bytes: usize) {
        self.hist.saturating_record(micros.max(1));
        self.ok += 1;
        self.body_bytes += body_bytes as u64;
    }

    pub fn error(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Connect => self.connect += 1,
            ErrorKind::Timeout => self.timeout += 1,
            ErrorKind::Io => self.io += 1,
            ErrorKind::Unsent => self.unsent += 1,
        }
    }

    pub fn bad_status(&mut self, status: u16) {
        self.status += 1;
        *self.statuses.entry(status).or_default() += 1;
    }

    /// A complete non-2xx response `micros` after its intended send.
    pub fn refused(&mut self, status: u16, micros: u64) {
        self.bad_status(status);
        self.refused_hist.saturating_record(micros.max(1));
    }

    pub fn errors(&self) -> u64 {
        self.connect + self.status + self.timeout + self.io + self.unsent
    }

    pub fn merge(&mut self, other: &Stats) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.ok += other.ok;
        self.connect += other.connect;
        self.status += other.status;
        self.timeout += other.timeout;
        self.io += other.io;
        self.unsent += other.unsent;
        self.offered += other.offered;
        self.refused_hist
            .add(&other.refused_hist)
            .expect("same histogram bounds");
        self.body_bytes += other.body_bytes;
        for (k, v) in &other.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
    }

    /// One JSON object; `secs` is the measured window.
    pub fn to_json(&self, secs: f64, extra: serde_json::Value) -> serde_json::Value {
        let h = &self.hist;
        let q = |p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        let r = &self.refused_hist;
        let qr = |p: f64| {
            if r.is_empty() {
                0
            } else {
                r.value_at_quantile(p)
            }
        };
        let mut v = serde_json::json!({
            "requests": self.ok,
            "seconds": secs,
            "rps": self.ok as f64 / secs,
            "mb_per_s": self.body_bytes as f64 / secs / 1e6,
            "p50_us": q(0.50),
            "p90_us": q(0.90),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "max_us": if h.is_empty() { 0 } else { h.max() },
            "mean_us": if h.is_empty() { 0.0 } else { h.mean() },
            "errors": self.errors(),
            "errors_by_kind": {
                "connect": self.connect,
                "status": self.status,
                "timeout": self.timeout,
                "io": self.io,
                "unsent": self.unsent,
            },
            "offered": self.offered,
            "offered_rps": self.offered as f64 / secs,
            "goodput_rps": self.ok as f64 / secs,
            "refused_p50_us": qr(0.50),
            "refused_p99_us": qr(0.99),
            "bad_statuses": self.statuses.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        });
        if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            obj.extend(extra);
        }
        v
    }

    /// The human summary, wrk-like.
    pub fn summary(&self, secs: f64) -> String {
        let h = &self.hist;
        let q = |p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        format!(
            "{:.0} req/s ({} in {:.2}s, {:.1} MB/s body)\n  latency us: p50 {} p90 {} p99 {} p99.9 {} max {}\n  errors: connect {} status {} {:?} timeout {} io {} unsent {}\n  refused (non-2xx) latency us: p50 {} p99 {}{}",
            self.ok as f64 / secs,
            self.ok,
            secs,
            self.body_bytes as f64 / secs / 1e6,
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            if h.is_empty() { 0 } else { h.max() },
            self.connect,
            self.status,
            self.statuses,
            self.timeout,
            self.io,
            self.unsent,
            self.refused_hist.value_at_quantile(0.5),
            self.refused_hist.value_at_quantile(0.99),
            if self.offered > 0 {
                format!(
                    "\n  offered {:.0} req/s, goodput (2xx) {:.0} req/s",
                    self.offered as f64 / secs,
                    self.ok as f64 / secs
                )
            } else {
                String::new()
            }
        )
    }
}
