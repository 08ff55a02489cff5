//! The admin listener (loopback by default, never the public port):
//! `GET /stats` (JSON) and `GET /metrics` (Prometheus text). It runs on a
//! plain thread of its own: reading counters is a cold path and must never
//! take time from the request cores. Request metrics live on each core
//! (`gateway/metrics.rs`); a scrape asks every core for a snapshot through
//! its inbox (`CoreMsg::Metrics`) and waits at most [`CORE_WAIT`] in all.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::core::{CoreMsg, Shared};
use super::metrics::Totals;

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
    let mut totals = Totals::new(shared.workers);
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

/// Binds the admin listener; the thread serves until the process exits.
pub fn start(shared: Arc<Shared>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("anp-admin".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = serve(&shared, conn);
            }
        })?;
    Ok(local)
}

fn serve(shared: &Shared, mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let limits = crate::http::Limits::default();
    let head = loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match crate::http::parse_request_head(&buf, &limits) {
            Ok(Some(h)) => break h,
            Ok(None) if buf.len() < 16 * 1024 => continue,
            _ => return respond(&mut conn, 400, "text/plain", "bad request\n"),
        }
    };
    let target = head.target(&buf);
    let path = target.split('?').next().unwrap_or("");
    match (head.method(&buf), path) {
        ("GET", "/stats") => respond(&mut conn, 200, "application/json", &stats_json(shared)),
        ("GET", "/metrics") => respond(
            &mut conn,
            200,
            "text/plain; version=0.0.4",
            &metrics_text(shared),
        ),
        ("GET", "/health") => respond(&mut conn, 200, "application/json", "{\"status\":\"ok\"}"),
        _ => respond(&mut conn, 404, "text/plain", "not found\n"),
    }
}

fn respond(conn: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = crate::http::headers::reason_phrase(status);
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())
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
    let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    gauge(
        "anp_proxy_connections",
        "Open client connections.",
        "gauge",
        c.connections.load(Ordering::Relaxed) as u64,
    );
    gauge(
        "anp_proxy_tunnels",
        "Connected receiver tunnels.",
        "gauge",
        c.tunnels.load(Ordering::Relaxed) as u64,
    );
    gauge(
        "anp_proxy_cross_core_dispatch_total",
        "Requests served by a tunnel on another core.",
        "counter",
        c.cross_core_dispatch_total.load(Ordering::Relaxed),
    );
    gauge(
        "anp_proxy_tunnel_handoffs_total",
        "Accepted tunnels moved to another core.",
        "counter",
        c.tunnel_handoffs_total.load(Ordering::Relaxed),
    );
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
    s
}

fn gauge_line(s: &mut String, name: &str, help: &str, kind: &str, v: u64) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
}
