//! Request metrics: per-core counters kept in `Cell`/`RefCell` on the core
//! ([`CoreMetrics`], part of the core's `CoreObs`), copied into a `Send`
//! [`Snapshot`] when the admin thread asks through the core's inbox
//! (`CoreMsg::Metrics`), merged into [`Totals`] and rendered as Prometheus
//! text or `/stats` JSON. Auth failures happen on the tunnel upgrade, a cold
//! path: they are counted once per process in [`AuthFailures`] (a mutex).
//!
//! Never: an atomic or a lock per request; an allocation per request once
//! a route has been seen.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

use super::routes::Route;

/// Status classes, in label order.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Upper bounds of `anp_request_duration_seconds` buckets (seconds).
pub const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Latency is recorded in microseconds, 1 µs .. 1 h (longer saturates),
/// two significant digits (buckets 1 % wide): ~26 KiB per core.
const LATENCY_MAX_US: u64 = 3_600_000_000;
const LATENCY_SIGFIG: u8 = 2;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
        .expect("static histogram bounds are valid")
}

/// Index into [`CLASSES`] of an HTTP status.
pub fn class_index(status: u16) -> usize {
    (usize::from(status / 100)).clamp(1, 5) - 1
}

/// A route prefix as shown in metrics and the access log: the root
/// prefix (stored as `""`) is `/`, so `""` can mean "no route".
pub fn display_prefix(p: &str) -> &str {
    if p.is_empty() {
        "/"
    } else {
        p
    }
}

/// One (route prefix, identity) pair seen by this core.
struct Slot {
    prefix: Arc<str>,
    identity: Arc<str>,
    /// The next slot with the same prefix (another identity owned it at
    /// some point: a registry change).
    next: Option<u32>,
    by_class: [u64; 5],
}

/// A core's counters. Only that core touches them.
pub struct CoreMetrics {
    in_flight: Cell<u64>,
    bytes_in: Cell<u64>,
    bytes_out: Cell<u64>,
    duration_sum_us: Cell<u64>,
    latency: RefCell<Histogram<u64>>,
    slots: RefCell<Vec<Slot>>,
    /// prefix → its first slot.
    by_prefix: RefCell<crate::FastMap<Arc<str>, u32>>,
    /// Requests that matched no route (404, `/health`, refused heads).
    unrouted: RefCell<[u64; 5]>,
    /// Upgraded (WebSocket pass-through) streams open now, and opened
    /// since start, on this core.
    upgraded_open: Cell<u64>,
    upgraded_total: Cell<u64>,
    /// Keep-alive reads for a next head cut after `HOT_READ`
    /// (`conn.rs::Rhythm`).
    hot_reads_cut: Cell<u64>,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self {
            in_flight: Cell::new(0),
            bytes_in: Cell::new(0),
            bytes_out: Cell::new(0),
            duration_sum_us: Cell::new(0),
            latency: RefCell::new(new_histogram()),
            slots: RefCell::new(Vec::new()),
            by_prefix: RefCell::new(crate::FastMap::default()),
            unrouted: RefCell::new([0; 5]),
            upgraded_open: Cell::new(0),
            upgraded_total: Cell::new(0),
            hot_reads_cut: Cell::new(0),
        }
    }
}

impl CoreMetrics {
    pub fn request_started(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
    }

    pub fn request_ended(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
    }

    /// An upgraded stream began (its 101 was written).
    pub fn upgraded_opened(&self) {
        self.upgraded_open.set(self.upgraded_open.get() + 1);
        self.upgraded_total.set(self.upgraded_total.get() + 1);
    }

    /// A keep-alive read posted for the next head was cut: the client
    /// was quiet for `HOT_READ`.
    pub fn hot_read_cut(&self) {
        self.hot_reads_cut.set(self.hot_reads_cut.get() + 1);
    }

    /// An upgraded stream ended.
    pub fn upgraded_closed(&self) {
        self.upgraded_open
            .set(self.upgraded_open.get().saturating_sub(1));
    }

    /// The slot of `route` (created the first time this core sees that
    /// prefix with that identity: the only allocation, once per route).
    pub fn slot(&self, route: &Route) -> u32 {
        let first = self.by_prefix.borrow().get(&*route.prefix).copied();
        let mut slots = self.slots.borrow_mut();
        let mut at = first;
        let mut last = None;
        while let Some(i) = at {
            let s = &slots[i as usize];
            if Arc::ptr_eq(&s.identity, &route.identity) || s.identity == route.identity {
                return i;
            }
            last = Some(i);
            at = s.next;
        }
        let i = slots.len() as u32;
        slots.push(Slot {
            prefix: route.prefix.clone(),
            identity: route.identity.clone(),
            next: None,
            by_class: [0; 5],
        });
        match last {
            Some(l) => slots[l as usize].next = Some(i),
            None => {
                self.by_prefix.borrow_mut().insert(route.prefix.clone(), i);
            }
        }
        i
    }

    /// Calls `f` with the prefix and identity of `slot`.
    pub fn with_slot<R>(&self, slot: u32, f: impl FnOnce(&str, &str) -> R) -> R {
        let slots = self.slots.borrow();
        let s = &slots[slot as usize];
        f(display_prefix(&s.prefix), &s.identity)
    }

    /// Counts one finished request.
    pub fn record(
        &self,
        slot: Option<u32>,
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
        took: Duration,
    ) {
        let c = class_index(status);
        match slot {
            Some(i) => self.slots.borrow_mut()[i as usize].by_class[c] += 1,
            None => self.unrouted.borrow_mut()[c] += 1,
        }
        self.bytes_in
            .set(self.bytes_in.get().wrapping_add(bytes_in));
        self.bytes_out
            .set(self.bytes_out.get().wrapping_add(bytes_out));
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.duration_sum_us
            .set(self.duration_sum_us.get().wrapping_add(us));
        self.latency.borrow_mut().saturating_record(us.max(1));
    }

    /// A copy for the admin thread (cold: a few KiB per core per scrape).
    pub fn snapshot(&self, core: usize) -> Snapshot {
        let mut routes: BTreeMap<String, [u64; 5]> = BTreeMap::new();
        for s in self.slots.borrow().iter() {
            let p = display_prefix(&s.prefix);
            add5(routes.entry(p.to_string()).or_default(), &s.by_class);
        }
        let unrouted = *self.unrouted.borrow();
        if unrouted.iter().any(|n| *n > 0) {
            add5(routes.entry(String::new()).or_default(), &unrouted);
        }
        Snapshot {
            core,
            in_flight: self.in_flight.get(),
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            duration_sum_us: self.duration_sum_us.get(),
            latency: self.latency.borrow().clone(),
            routes,
            admission: Default::default(),
            upgraded_open: self.upgraded_open.get(),
            upgraded_total: self.upgraded_total.get(),
            hot_reads_cut: self.hot_reads_cut.get(),
        }
    }
}

fn add5(to: &mut [u64; 5], from: &[u64; 5]) {
    for (t, f) in to.iter_mut().zip(from) {
        *t += f;
    }
}

/// One core's counters at one moment (crosses to the admin thread).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub core: usize,
    pub in_flight: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_sum_us: u64,
    pub latency: Histogram<u64>,
    /// Route prefix (`""` = no route) → requests per status class.
    pub routes: BTreeMap<String, [u64; 5]>,
    /// Rate limits, shedding, per-identity gauges (`admission.rs`).
    pub admission: super::admission::AdmissionSnapshot,
    /// Upgraded streams open now, and opened since start.
    pub upgraded_open: u64,
    pub upgraded_total: u64,
    pub hot_reads_cut: u64,
}

/// Admission totals over all cores.
#[derive(Debug, Clone, Default)]
pub struct AdmissionTotals {
    /// identity → (in flight, queued), all cores.
    pub identities: BTreeMap<String, (u64, u64)>,
    /// queue_full, queue_timeout.
    pub shed: [u64; 2],
    /// client_ip, route, identity.
    pub limited: [u64; 3],
    pub buckets: u64,
    pub evicted_idle: u64,
    pub evicted_active: u64,
}

impl AdmissionTotals {
    fn add(&mut self, a: &super::admission::AdmissionSnapshot) {
        for (id, f, q) in &a.identities {
            let e = self.identities.entry(id.clone()).or_default();
            e.0 += f;
            e.1 += q;
        }
        for (t, f) in self.shed.iter_mut().zip(a.shed) {
            *t += f;
        }
        for (t, f) in self.limited.iter_mut().zip(a.rates.limited) {
            *t += f;
        }
        self.buckets += a.rates.buckets;
        self.evicted_idle += a.rates.evicted_idle;
        self.evicted_active += a.rates.evicted_active;
    }

    /// Prometheus text (appended to `s`).
    pub fn render(&self, s: &mut String) {
        let _ = writeln!(s, "# HELP anp_rate_limited_total Requests answered 429 by a rate limit, by scope.\n# TYPE anp_rate_limited_total counter");
        for (scope, n) in ["client_ip", "route", "identity"].iter().zip(self.limited) {
            let _ = writeln!(s, "anp_rate_limited_total{{scope=\"{scope}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP anp_shed_total Requests answered 503 at once by admission, by reason.\n# TYPE anp_shed_total counter");
        for (reason, n) in ["queue_full", "queue_timeout"].iter().zip(self.shed) {
            let _ = writeln!(s, "anp_shed_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(s, "# HELP anp_identity_in_flight Requests of an identity holding a place in flight (all cores).\n# TYPE anp_identity_in_flight gauge");
        for (id, (f, _)) in &self.identities {
            let _ = writeln!(s, "anp_identity_in_flight{{identity={}}} {f}", label(id));
        }
        let _ = writeln!(s, "# HELP anp_identity_queue_depth Requests of an identity waiting for a place in flight (all cores).\n# TYPE anp_identity_queue_depth gauge");
        for (id, (_, q)) in &self.identities {
            let _ = writeln!(s, "anp_identity_queue_depth{{identity={}}} {q}", label(id));
        }
        let _ = writeln!(s, "# HELP anp_rate_limit_buckets Token buckets held (all cores).\n# TYPE anp_rate_limit_buckets gauge\nanp_rate_limit_buckets {}", self.buckets);
        let _ = writeln!(s, "# HELP anp_rate_limit_evictions_total Buckets dropped from a full table: refilled ones (idle) and least recently used ones (active).\n# TYPE anp_rate_limit_evictions_total counter\nanp_rate_limit_evictions_total{{kind=\"idle\"}} {}\nanp_rate_limit_evictions_total{{kind=\"active\"}} {}", self.evicted_idle, self.evicted_active);
    }
}

/// All cores' snapshots added up.
#[derive(Debug, Clone)]
pub struct Totals {
    /// Cores that answered.
    pub cores_answered: usize,
    pub in_flight: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_sum_us: u64,
    pub latency: Histogram<u64>,
    pub routes: BTreeMap<String, [u64; 5]>,
    pub admission: AdmissionTotals,
    pub upgraded_open: u64,
    pub upgraded_total: u64,
    pub hot_reads_cut: u64,
}

impl Totals {
    pub fn new() -> Self {
        Self {
            cores_answered: 0,
            in_flight: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_sum_us: 0,
            latency: new_histogram(),
            routes: BTreeMap::new(),
            admission: AdmissionTotals::default(),
            upgraded_open: 0,
            upgraded_total: 0,
            hot_reads_cut: 0,
        }
    }

    pub fn add(&mut self, s: &Snapshot) {
        self.cores_answered += 1;
        self.in_flight += s.in_flight;
        self.bytes_in = self.bytes_in.wrapping_add(s.bytes_in);
        self.bytes_out = self.bytes_out.wrapping_add(s.bytes_out);
        self.duration_sum_us = self.duration_sum_us.wrapping_add(s.duration_sum_us);
        // Same bounds everywhere: cannot fail.
        let _ = self.latency.add(&s.latency);
        for (route, counts) in &s.routes {
            add5(self.routes.entry(route.clone()).or_default(), counts);
        }
        self.admission.add(&s.admission);
        self.upgraded_open += s.upgraded_open;
        self.upgraded_total += s.upgraded_total;
        self.hot_reads_cut += s.hot_reads_cut;
    }

    pub fn requests_total(&self) -> u64 {
        self.routes.values().flat_map(|c| c.iter()).sum()
    }

    /// Latency at quantile `q`, in milliseconds (0 with no requests).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            return 0.0;
        }
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// Cumulative counts for [`BUCKETS`] (`le` semantics), from the merged
    /// histogram. A value is counted under a bound when its histogram
    /// bucket (1 % wide) lies at or below it.
    pub fn bucket_counts(&self) -> [u64; BUCKETS.len()] {
        let mut out = [0u64; BUCKETS.len()];
        for v in self.latency.iter_recorded() {
            let top = v.value_iterated_to();
            let n = v.count_since_last_iteration();
            for (i, le) in BUCKETS.iter().enumerate() {
                if top as f64 <= le * 1e6 {
                    out[i] += n;
                }
            }
        }
        out
    }
}

/// Refused tunnel upgrades by reason (`AuthError::reason`, plus
/// `bad_handshake`), for the whole process. Cold path: one lock per
/// refused upgrade.
#[derive(Debug, Default)]
pub struct AuthFailures(Mutex<BTreeMap<&'static str, u64>>);

impl AuthFailures {
    pub fn record(&self, reason: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A Prometheus label value: quoted, `\`, `"` and newlines escaped.
pub fn label(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The request metrics in Prometheus text format (appended to `s`).
pub fn render_prometheus(s: &mut String, t: &Totals, auth: &BTreeMap<&'static str, u64>) {
    let _ = writeln!(
        s,
        "# HELP anp_requests_total HTTP requests answered, by route prefix (\"\" = none matched) and status class.\n# TYPE anp_requests_total counter"
    );
    for (route, counts) in &t.routes {
        for (class, n) in CLASSES.iter().zip(counts) {
            if *n > 0 {
                let _ = writeln!(
                    s,
                    "anp_requests_total{{route={},class=\"{class}\"}} {n}",
                    label(route)
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "# HELP anp_request_duration_seconds Time from a request's first byte to its last response byte.\n# TYPE anp_request_duration_seconds histogram"
    );
    for (le, n) in BUCKETS.iter().zip(t.bucket_counts()) {
        let _ = writeln!(s, "anp_request_duration_seconds_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        s,
        "anp_request_duration_seconds_bucket{{le=\"+Inf\"}} {}\nanp_request_duration_seconds_sum {}\nanp_request_duration_seconds_count {}",
        t.latency.len(),
        t.duration_sum_us as f64 / 1e6,
        t.latency.len()
    );
    let _ = writeln!(
        s,
        "# HELP anp_bytes_in_total Request bytes received from clients (heads and bodies).\n# TYPE anp_bytes_in_total counter\nanp_bytes_in_total {}",
        t.bytes_in
    );
    let _ = writeln!(
        s,
        "# HELP anp_bytes_out_total Response bytes written to clients (heads and bodies).\n# TYPE anp_bytes_out_total counter\nanp_bytes_out_total {}",
        t.bytes_out
    );
    let _ = writeln!(
        s,
        "# HELP anp_requests_in_flight Requests received and not yet answered.\n# TYPE anp_requests_in_flight gauge\nanp_requests_in_flight {}",
        t.in_flight
    );
    let _ = writeln!(
        s,
        "# HELP anp_auth_failures_total Refused tunnel upgrades, by reason.\n# TYPE anp_auth_failures_total counter"
    );
    for (reason, n) in auth {
        let _ = writeln!(s, "anp_auth_failures_total{{reason={}}} {n}", label(reason));
    }
    let _ = writeln!(
        s,
        "# HELP anp_upgraded_streams_open Upgraded (WebSocket pass-through) streams open now.\n# TYPE anp_upgraded_streams_open gauge\nanp_upgraded_streams_open {}",
        t.upgraded_open
    );
    let _ = writeln!(
        s,
        "# HELP anp_upgraded_streams_total Upgraded (WebSocket pass-through) streams opened (101 written).\n# TYPE anp_upgraded_streams_total counter\nanp_upgraded_streams_total {}",
        t.upgraded_total
    );
    let _ = writeln!(
        s,
        "# HELP anp_keepalive_reads_cut_total Reads posted for a keep-alive connection's next request and cut after 5 ms without one; a client that paced its requests like that is then waited for without a read.\n# TYPE anp_keepalive_reads_cut_total counter\nanp_keepalive_reads_cut_total {}",
        t.hot_reads_cut
    );
    t.admission.render(s);
    let _ = writeln!(
        s,
        "# HELP anp_metrics_cores Cores whose counters are included in this scrape (a core that did not answer in time is left out).\n# TYPE anp_metrics_cores gauge\nanp_metrics_cores {}",
        t.cores_answered
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(p: &str, id: &str) -> Route {
        Route {
            prefix: p.into(),
            identity: id.into(),
        }
    }

    #[test]
    fn classes() {
        assert_eq!(CLASSES[class_index(101)], "1xx");
        assert_eq!(CLASSES[class_index(204)], "2xx");
        assert_eq!(CLASSES[class_index(404)], "4xx");
        assert_eq!(CLASSES[class_index(599)], "5xx");
        assert_eq!(CLASSES[class_index(99)], "1xx");
        assert_eq!(CLASSES[class_index(999)], "5xx");
    }

    #[test]
    fn slots_split_by_identity_and_merge_by_prefix() {
        let m = CoreMetrics::default();
        let a = m.slot(&route("/a", "alice"));
        assert_eq!(
            m.slot(&route("/a", "alice")),
            a,
            "same prefix and identity, same slot"
        );
        let b = m.slot(&route("/a", "bob"));
        assert_ne!(a, b);
        m.with_slot(b, |p, id| assert_eq!((p, id), ("/a", "bob")));
        m.record(Some(a), 200, 10, 20, Duration::from_millis(3));
        m.record(Some(b), 503, 1, 2, Duration::from_millis(1));
        m.record(None, 404, 5, 5, Duration::from_micros(10));
        let snap = m.snapshot(0);
        let mut t = Totals::new();
        t.add(&snap);
        t.add(&snap);
        assert_eq!(t.routes["/a"], [0, 2, 0, 0, 2]);
        assert_eq!(t.routes[""], [0, 0, 0, 2, 0]);
        assert_eq!(t.requests_total(), 6);
        assert_eq!(t.latency.len(), 6);
        assert_eq!((t.bytes_in, t.bytes_out), (32, 54));
        let b = t.bucket_counts();
        assert_eq!(b[0], 2, "10 µs is under 0.5 ms");
        assert_eq!(b[4], 6, "everything is under 10 ms");
        assert_eq!(b[2], 4, "1 ms is under 2.5 ms, 3 ms is not");
        let mut s = String::new();
        render_prometheus(&mut s, &t, &BTreeMap::from([("unknown_token", 3)]));
        assert!(
            s.contains("anp_requests_total{route=\"/a\",class=\"5xx\"} 2\n"),
            "{s}"
        );
        assert!(
            s.contains("anp_requests_total{route=\"\",class=\"4xx\"} 2\n"),
            "{s}"
        );
        assert!(s.contains("anp_request_duration_seconds_count 6\n"), "{s}");
        assert!(
            s.contains("anp_auth_failures_total{reason=\"unknown_token\"} 3\n"),
            "{s}"
        );
    }

    #[test]
    fn label_escapes() {
        assert_eq!(label("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }
}
