//! The admin listener (loopback by default, never the public port):
//! `GET /stats` (JSON), `GET /metrics` (Prometheus text) and `GET /health`
//! (JSON with the tunnel count and our pid). It runs on plain threads of its
//! own: reading counters is a cold path and must never take time from the
//! request cores. Request metrics live on each core (`gateway/metrics.rs`);
//! a scrape asks every core for a snapshot through its inbox
//! (`CoreMsg::Metrics`) and waits at most [`CORE_WAIT`] in all.
//!
//! The listener itself (threads, `admin_max_connections`,
//! `admin_header_timeout`, `SO_REUSEPORT`, the close on a drain) is
//! `crate::admin_http`, shared with the receiver. Never blocks a core;
//! never touches a core's state (only the copies the cores send).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::core::{CoreMsg, Shared};
use super::metrics::Totals;
use crate::admin_http::Reply;
pub use crate::admin_http::{Admin, AdminSettings};
use crate::config::Config;

/// Longest wait for the cores' snapshots in one scrape; a core that has
/// not answered by then is left out (`anp_metrics_cores`, `/stats`
/// `cores_answered`).
pub const CORE_WAIT: Duration = Duration::from_secs(2);

/// Asks every core for its counters and adds them up.
pub fn collect(shared: &Shared) -> Totals {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut asked = 0;
    for inbox in &shared.inboxes {
        if inbox.unbounded_send(CoreMsg::Metrics(tx.clone())).is_ok() {
            asked += 1;
        }
    }
    drop(tx);
    let mut totals = Totals::new();
    let deadline = std::time::Instant::now() + CORE_WAIT;
    for _ in 0..asked {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(snap) => totals.add(&snap),
            Err(_) => break,
        }
    }
    totals
}

/// The admin keys of `[gateway]`, as the listener uses them.
pub fn settings(c: &Config) -> AdminSettings {
    let g = &c.gateway;
    AdminSettings {
        // Validated > 0 (config.rs); the fallback is the default.
        header_timeout: g
            .admin_header_timeout
            .duration()
            .unwrap_or(Duration::from_secs(2)),
        max_connections: g.admin_max_connections,
    }
}

/// Starts the gateway's admin listener: `/stats`, `/metrics`, `/health`.
pub fn start(
    shared: Arc<Shared>,
    addr: SocketAddr,
    settings: AdminSettings,
) -> std::io::Result<Admin> {
    let handler = move |method: &str, path: &str, draining: bool| match (method, path) {
        ("GET", "/stats") => Reply::json(200, stats_json(&shared)),
        ("GET", "/metrics") => Reply::metrics(metrics_text(&shared)),
        // Once a drain has begun: 503, so whatever still asks here (a
        // connection accepted before the listener closed) stops sending.
        ("GET", "/health") => Reply::json(
            if draining { 503 } else { 200 },
            health_json(&shared, draining),
        ),
        _ => Reply::not_found(),
    };
    crate::admin_http::start(addr, settings, Arc::new(handler))
}

/// `/health` on the admin port: the details the public `/health` keeps to
/// itself. `pid` tells which process answered (during a takeover both
/// gateways listen on this port). `status` is `ok` while the gateway
/// accepts, `draining` once its drain has begun (answered 503).
pub fn health_json(shared: &Shared, draining: bool) -> String {
    serde_json::json!({
        "status": if draining { "draining" } else { "ok" },
        "tunnels": shared.tunnel_count(),
        "pid": std::process::id(),
    })
    .to_string()
}

/// `/stats`: totals and tunnels per identity and core.
pub fn stats_json(shared: &Shared) -> String {
    let c = &shared.counters;
    let t = collect(shared);
    let routes: serde_json::Map<String, serde_json::Value> = t
        .routes
        .iter()
        .map(|(route, counts)| {
            let by_class: serde_json::Map<String, serde_json::Value> = super::metrics::CLASSES
                .iter()
                .zip(counts)
                .map(|(k, n)| (k.to_string(), serde_json::json!(n)))
                .collect();
            (route.clone(), serde_json::Value::Object(by_class))
        })
        .collect();
    let auth: serde_json::Map<String, serde_json::Value> = shared
        .obs
        .auth_failures
        .snapshot()
        .into_iter()
        .map(|(k, n)| (k.to_string(), serde_json::json!(n)))
        .collect();
    let per_identity: serde_json::Map<String, serde_json::Value> = shared
        .tunnels_by_identity()
        .into_iter()
        .map(|(id, cores)| (id.to_string(), serde_json::json!(cores)))
        .collect();
    // identity → {instance: tunnels}; "" = receivers that sent no instance.
    let instances: serde_json::Map<String, serde_json::Value> = shared
        .instances_by_identity()
        .into_iter()
        .map(|(id, list)| {
            let m: serde_json::Map<String, serde_json::Value> = list
                .into_iter()
                .map(|(i, n)| (i, serde_json::json!(n)))
                .collect();
            (id.to_string(), serde_json::Value::Object(m))
        })
        .collect();
    serde_json::json!({
        "workers": shared.workers,
        "connections": c.connections.load(Ordering::Relaxed),
        "tunnels": c.tunnels.load(Ordering::Relaxed),
        "tunnels_by_identity": per_identity,
        "instances_by_identity": instances,
        "cross_core_dispatch_total": c.cross_core_dispatch_total.load(Ordering::Relaxed),
        "tunnel_handoffs_total": c.tunnel_handoffs_total.load(Ordering::Relaxed),
        "tunnel_scale_asks_total": c.scale_asks_total.load(Ordering::Relaxed),
        "tunnel_scale_releases_total": c.scale_releases_total.load(Ordering::Relaxed),
        "requests_total": t.requests_total(),
        "requests_by_route": routes,
        "in_flight": t.in_flight,
        "bytes_in_total": t.bytes_in,
        "bytes_out_total": t.bytes_out,
        "latency_ms": {
            "p50": t.quantile_ms(0.5),
            "p90": t.quantile_ms(0.9),
            "p99": t.quantile_ms(0.99),
        },
        "auth_failures": auth,
        "access_log_dropped_batches": shared.obs.access_log().map(|a| a.dropped_batches()),
        "cores_answered": t.cores_answered,
    })
    .to_string()
}

/// `/metrics`: the same facts in Prometheus text format.
pub fn metrics_text(shared: &Shared) -> String {
    use std::fmt::Write as _;
    let c = &shared.counters;
    let mut s = String::new();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let process: [(&str, &str, &str, u64); 6] = [
        (
            "anp_proxy_connections",
            "Open client connections.",
            "gauge",
            c.connections.load(Ordering::Relaxed) as u64,
        ),
        (
            "anp_proxy_tunnels",
            "Connected receiver tunnels.",
            "gauge",
            c.tunnels.load(Ordering::Relaxed) as u64,
        ),
        (
            "anp_proxy_cross_core_dispatch_total",
            "Requests served by a tunnel on another core.",
            "counter",
            load(&c.cross_core_dispatch_total),
        ),
        (
            "anp_proxy_tunnel_handoffs_total",
            "Accepted tunnels moved to another core.",
            "counter",
            load(&c.tunnel_handoffs_total),
        ),
        (
            "anp_proxy_tunnel_scale_asks_total",
            "Times a core asked a receiver for one more tunnel (scale).",
            "counter",
            load(&c.scale_asks_total),
        ),
        (
            "anp_proxy_tunnel_scale_releases_total",
            "Quiet tunnels let go (scale, close 4002).",
            "counter",
            load(&c.scale_releases_total),
        ),
    ];
    for (name, help, kind, v) in process {
        gauge_line(&mut s, name, help, kind, v);
    }
    let _ = writeln!(s, "# HELP anp_proxy_identity_tunnels Tunnels per identity and core.\n# TYPE anp_proxy_identity_tunnels gauge");
    for (id, cores) in shared.tunnels_by_identity() {
        for (core, n) in cores.iter().enumerate() {
            let _ = writeln!(
                s,
                "anp_proxy_identity_tunnels{{identity={},core=\"{core}\"}} {n}",
                serde_json::to_string(&*id).unwrap_or_default()
            );
        }
    }
    super::metrics::render_prometheus(
        &mut s,
        &collect(shared),
        &shared.obs.auth_failures.snapshot(),
    );
    if let Some(a) = shared.obs.access_log() {
        gauge_line(
            &mut s,
            "anp_access_log_dropped_batches_total",
            "Access-log batches dropped because the writer thread fell behind.",
            "counter",
            a.dropped_batches(),
        );
    }
    shared.upgrades.write_metrics(&mut s);
    shared.anpx_refused.write_metrics(&mut s);
    if let Some(r) = shared.registry_stats.get() {
        r.write_metrics(&mut s);
    }
    let _ = writeln!(s, "# HELP anp_connections_refused_total Client connections closed at accept, by reason (max_connections, max_connections_per_ip).\n# TYPE anp_connections_refused_total counter");
    for (reason, n) in shared.conn_limits.refusals() {
        let _ = writeln!(
            s,
            "anp_connections_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
    s
}

fn gauge_line(s: &mut String, name: &str, help: &str, kind: &str, v: u64) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
}
