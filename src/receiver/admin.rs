//! The receiver's admin listener (`[receiver] admin_*`, loopback by
//! default): `GET /health` and `GET /metrics`, on the listener the gateway
//! uses too (`crate::admin_http`: its own threads, never a core's time).
//!
//! Request counters live on each core (`tunnel::Counters`, plain cells); a
//! scrape asks every core through its fleet inbox (`FleetMsg::Stats`) and
//! waits at most [`CORE_WAIT`] in all. Tunnel counts per gateway come from
//! the gateways' shared status (`fleet::Status`, moved only when a tunnel
//! connects, fails to, or ends).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::mpsc::UnboundedSender;

use super::fleet::{CoreStats, FleetMsg, Gateway};
use crate::admin_http::{Admin, AdminSettings, Reply};

/// Longest wait for the cores' answers in one scrape.
pub const CORE_WAIT: Duration = Duration::from_secs(2);

/// The cores' counters summed, and every gateway any core serves.
#[derive(Default)]
struct Totals {
    cores: usize,
    requests: u64,
    upstream_errors: u64,
    in_flight: u64,
    /// By label: one entry per gateway address.
    gateways: BTreeMap<String, Arc<Gateway>>,
}

fn collect(cores: &[UnboundedSender<FleetMsg>]) -> Totals {
    let (tx, rx) = std::sync::mpsc::channel::<CoreStats>();
    let asked = cores
        .iter()
        .filter(|c| c.unbounded_send(FleetMsg::Stats(tx.clone())).is_ok())
        .count();
    drop(tx);
    let mut t = Totals::default();
    let deadline = Instant::now() + CORE_WAIT;
    for _ in 0..asked {
        let Ok(s) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break;
        };
        t.cores += 1;
        t.requests += s.requests;
        t.upstream_errors += s.upstream_errors;
        t.in_flight += s.in_flight;
        for gw in s.gateways {
            t.gateways.entry(gw.label.clone()).or_insert(gw);
        }
    }
    t
}

/// `/health`: 200 `ok` while at least one tunnel is up; 503 `no_tunnel`
/// when none is (the gateway cannot reach this app now), `draining` once a
/// shutdown has begun.
fn health(t: &Totals, draining: bool) -> Reply {
    let gateways: Vec<serde_json::Value> = t
        .gateways
        .values()
        .map(|g| serde_json::json!({"gateway": g.label, "tunnels": g.status.snapshot().up}))
        .collect();
    let up: usize = t.gateways.values().map(|g| g.status.snapshot().up).sum();
    let status = match (draining, up) {
        (true, _) => "draining",
        (false, 0) => "no_tunnel",
        (false, _) => "ok",
    };
    let body = serde_json::json!({
        "status": status,
        "tunnels": up,
        "gateways": gateways,
        "pid": std::process::id(),
    });
    Reply::json(if status == "ok" { 200 } else { 503 }, body.to_string())
}

/// `/metrics`, Prometheus text.
fn metrics(t: &Totals, threads: usize) -> String {
    let mut s = String::new();
    let mut family = |name: &str, help: &str, kind: &str, rows: &[(String, u64)]| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
    };
    let per_gw = |f: &dyn Fn(&Gateway) -> u64| -> Vec<(String, u64)> {
        t.gateways
            .values()
            .map(|g| (format!("{{gateway=\"{}\"}}", escape(&g.label)), f(g)))
            .collect()
    };
    family(
        "anp_receiver_tunnels",
        "Tunnels up, by gateway address.",
        "gauge",
        &per_gw(&|g| g.status.snapshot().up as u64),
    );
    family(
        "anp_receiver_tunnel_connects_total",
        "Tunnels that connected, by gateway address (beyond the first of each slot: reconnects).",
        "counter",
        &per_gw(&|g| g.status.snapshot().connects),
    );
    family(
        "anp_receiver_tunnel_connect_failures_total",
        "Tunnel attempts that failed before the 101, by gateway address.",
        "counter",
        &per_gw(&|g| g.status.snapshot().failures),
    );
    let one = |v: u64| vec![(String::new(), v)];
    family(
        "anp_receiver_requests_total",
        "Requests (and upgraded streams) the gateways sent.",
        "counter",
        &one(t.requests),
    );
    family(
        "anp_receiver_upstream_errors_total",
        "Calls to the app that failed (the gateway answered 502 or 504).",
        "counter",
        &one(t.upstream_errors),
    );
    family(
        "anp_receiver_requests_in_flight",
        "Requests being served now.",
        "gauge",
        &one(t.in_flight),
    );
    family(
        "anp_receiver_metrics_cores",
        "Cores that answered this scrape.",
        "gauge",
        &one(t.cores as u64),
    );
    family(
        "anp_receiver_cores",
        "Cores the receiver runs.",
        "gauge",
        &one(threads as u64),
    );
    s
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Starts the listener; `cores` are the cores' fleet inboxes.
pub fn start(addr: SocketAddr, cores: Vec<UnboundedSender<FleetMsg>>) -> std::io::Result<Admin> {
    let threads = cores.len();
    let handler = move |method: &str, path: &str, draining: bool| match (method, path) {
        ("GET", "/health") => health(&collect(&cores), draining),
        ("GET", "/metrics") => Reply::metrics(metrics(&collect(&cores), threads)),
        _ => Reply::not_found(),
    };
    let settings = AdminSettings {
        header_timeout: Duration::from_secs(2),
        max_connections: 16,
    };
    crate::admin_http::start(addr, settings, Arc::new(handler))
}
