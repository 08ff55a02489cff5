//! The admin listener (loopback by default, never the public port):
//! `GET /stats` (JSON), `GET /metrics` (Prometheus text) and `GET /health`
//! (JSON with the tunnel count and our pid). It runs on plain threads of its
//! own: reading counters is a cold path and must never take time from the
//! request cores. Request metrics live on each core (`gateway/metrics.rs`);
//! a scrape asks every core for a snapshot through its inbox
//! (`CoreMsg::Metrics`) and waits at most [`CORE_WAIT`] in all.
//!
//! One accept thread hands each connection to a thread of its own, at most
//! `admin_max_connections` at once (one more is answered 503 and closed),
//! each with `admin_header_timeout` to send its head: a silent client
//! holds one slot for that long, never the listener. The socket is bound
//! with `SO_REUSEPORT` like the public port, so a successor gateway can
//! listen on the same admin port before this one drains; a drain closes it
//! first ([`Admin::close`]). Never blocks a core; never touches a core's
//! state (only the copies the cores send).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::{CoreMsg, Shared};
use super::metrics::Totals;
use crate::config::Config;

/// Longest wait for the cores' snapshots in one scrape; a core that has
/// not answered by then is left out (`anp_metrics_cores`, `/stats`
/// `cores_answered`).
pub const CORE_WAIT: Duration = Duration::from_secs(2);

/// Largest admin request head, bytes (400 beyond).
const MAX_HEAD: usize = 16 * 1024;

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
#[derive(Debug, Clone, Copy)]
pub struct AdminSettings {
    /// `admin_header_timeout`: for the request head, and for the response.
    pub header_timeout: Duration,
    /// `admin_max_connections`.
    pub max_connections: usize,
}

impl AdminSettings {
    pub fn from_config(c: &Config) -> Self {
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
}

/// What the accept thread and [`Admin::close`] share.
struct Inner {
    shared: Arc<Shared>,
    settings: AdminSettings,
    /// Connections being served (threads alive).
    active: AtomicUsize,
    /// Raised by [`Admin::close`]: the accept thread ends on its next wakeup.
    closing: AtomicBool,
}

/// A running admin listener.
pub struct Admin {
    pub addr: SocketAddr,
    /// A second descriptor of the listening socket, to close it from the
    /// signal thread while the accept thread is blocked in `accept`.
    listener: TcpListener,
    inner: Arc<Inner>,
}

/// Binds the admin listener (`SO_REUSEADDR` + `SO_REUSEPORT`) and starts
/// its accept thread, which serves until [`Admin::close`] or the process
/// exits.
pub fn start(
    shared: Arc<Shared>,
    addr: SocketAddr,
    settings: AdminSettings,
) -> std::io::Result<Admin> {
    let listener = crate::net::bind_reuseport(addr)?;
    listener.set_nonblocking(false)?;
    let local = listener.local_addr()?;
    let accepting = listener.try_clone()?;
    let inner = Arc::new(Inner {
        shared,
        settings,
        active: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
    });
    let i = inner.clone();
    std::thread::Builder::new()
        .name("anp-admin".into())
        .spawn(move || accept_loop(&i, accepting))?;
    Ok(Admin {
        addr: local,
        listener,
        inner,
    })
}

impl Admin {
    /// Stops listening (a drain): takes the connections the kernel already
    /// queued (they are served), then shuts the socket, which wakes the
    /// accept thread. A successor on the same port gets every new one.
    pub fn close(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        let mut swept = 0usize;
        // O_NONBLOCK is on the open file, shared with the accept thread's
        // descriptor; its `accept` already blocking keeps blocking until
        // the shutdown below, which is all it needs to see next.
        if self.listener.set_nonblocking(true).is_ok() {
            while let Ok((conn, peer)) = self.listener.accept() {
                swept += 1;
                admit(&self.inner, conn, peer);
            }
        }
        let _ = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Both);
        tracing::info!(addr = %self.addr, swept, "admin listener closed (draining)");
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: TcpListener) {
    loop {
        let accepted = listener.accept();
        if inner.closing.load(Ordering::SeqCst) {
            // Woken by the shutdown, or raced it: serve what we got.
            if let Ok((conn, peer)) = accepted {
                admit(inner, conn, peer);
            }
            return;
        }
        match accepted {
            Ok((conn, peer)) => admit(inner, conn, peer),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One admin connection being served; released when its thread ends.
struct Slot(Arc<Inner>);

impl Slot {
    fn take(inner: &Arc<Inner>) -> Option<Slot> {
        let max = inner.settings.max_connections;
        inner
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(inner.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `conn` on a thread of its own, or answers 503 when
/// `admin_max_connections` are being served.
fn admit(inner: &Arc<Inner>, conn: TcpStream, peer: SocketAddr) {
    let timeout = inner.settings.header_timeout;
    // Blocking with timeouts (a connection taken by `Admin::close` came
    // from a non-blocking listener; Linux does not pass the flag on, but
    // say it anyway).
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(timeout));
    let Some(slot) = Slot::take(inner) else {
        tracing::warn!(
            %peer,
            admin_max_connections = inner.settings.max_connections,
            "admin connection refused (503): admin_max_connections connections are being served"
        );
        refuse(conn);
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("anp-admin-conn".into())
        .spawn(move || {
            let mut conn = conn;
            if let Err(e) = serve(&slot.0, &mut conn, timeout) {
                tracing::debug!(%peer, error = %e, "admin connection failed");
            }
            // The slot is free before the client sees the close: a client
            // that read to the end may count on it.
            drop(slot);
            drop(conn);
        });
    if let Err(e) = spawned {
        // The closure, its slot and the connection are dropped.
        tracing::warn!(%peer, error = %e, "admin connection dropped: cannot spawn its thread");
    }
}

/// 503 and close, on the accept thread: the answer fits in an empty socket
/// buffer, so the write does not wait on the client.
fn refuse(mut conn: TcpStream) {
    let _ = respond(
        &mut conn,
        503,
        "text/plain",
        "admin busy: admin_max_connections reached\n",
    );
    let _ = conn.shutdown(Shutdown::Write);
    // Read what already arrived (nonblocking), so the close sends a FIN
    // after the answer rather than a reset.
    if conn.set_nonblocking(true).is_ok() {
        let mut sink = [0u8; 1024];
        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
    }
}

fn serve(inner: &Inner, conn: &mut TcpStream, timeout: Duration) -> std::io::Result<()> {
    let shared = &*inner.shared;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let limits = crate::http::Limits::default();
    let head = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = if left.is_zero() {
            Err(std::io::ErrorKind::TimedOut.into())
        } else {
            conn.set_read_timeout(Some(left))?;
            conn.read(&mut chunk)
        };
        let n = match n {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                tracing::info!(
                    peer = ?conn.peer_addr().ok(),
                    timeout = ?timeout,
                    "admin connection closed (408): no request head within admin_header_timeout"
                );
                return respond(conn, 408, "text/plain", "request head timeout\n");
            }
            Err(e) => return Err(e),
        };
        buf.extend_from_slice(&chunk[..n]);
        match crate::http::parse_request_head(&buf, &limits) {
            Ok(Some(h)) => break h,
            Ok(None) if buf.len() < MAX_HEAD => continue,
            _ => return respond(conn, 400, "text/plain", "bad request\n"),
        }
    };
    let target = head.target(&buf);
    let path = target.split('?').next().unwrap_or("");
    match (head.method(&buf), path) {
        ("GET", "/stats") => respond(conn, 200, "application/json", &stats_json(shared)),
        ("GET", "/metrics") => respond(
            conn,
            200,
            "text/plain; version=0.0.4",
            &metrics_text(shared),
        ),
        ("GET", "/health") => {
            // Once a drain has begun: 503, so whatever still asks here (a
            // connection accepted before the listener closed) stops sending.
            let draining = inner.closing.load(Ordering::SeqCst);
            let status = if draining { 503 } else { 200 };
            respond(
                conn,
                status,
                "application/json",
                &health_json(shared, draining),
            )
        }
        _ => respond(conn, 404, "text/plain", "not found\n"),
    }
}

fn respond(conn: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = crate::http::headers::reason_phrase(status);
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())
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
