//! The private receiver: keeps `tunnels` WebSocket tunnels open to every
//! gateway of its fleet (`fleet.rs`; spread over one monoio runtime per
//! core), turns each ANPX
//! request into an HTTP call to the local app, and sends the response back
//! with the same `request_id` (DESIGN.md, "Receiver"). SIGTERM/SIGINT
//! shut it down gracefully (`drain.rs`).

pub(crate) mod admin;
pub(crate) mod app_conn;
pub mod backoff;
pub(crate) mod drain;
pub mod fleet;
pub(crate) mod sink;
pub(crate) mod tunnel;
pub(crate) mod upstream;
pub(crate) mod url;
pub(crate) mod workers;

use std::io::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use self::drain::{CoreDrain, DrainOrder};
use self::tunnel::CoreRx;
use self::upstream::Upstream;
use crate::config::{secs, Config};

/// How many tunnels to keep to one gateway: configured, or learnt from its
/// 101; and which slots run (all cores together). With `scale` the 101
/// says one, and the gateway asks for more later ([`Self::grow`]).
pub struct TunnelCount {
    value: AtomicUsize,
    waiters: Mutex<Vec<futures_channel::oneshot::Sender<()>>>,
    /// Slot indices running (dialling, connected or waiting to redial).
    /// Locked when a slot starts or ends: never on the request path.
    running: Mutex<std::collections::BTreeSet<usize>>,
}

impl TunnelCount {
    fn new(configured: usize) -> Self {
        Self {
            value: AtomicUsize::new(configured),
            waiters: Mutex::new(Vec::new()),
            running: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<usize>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slot `index` starts running.
    pub fn started(&self, index: usize) {
        self.running().insert(index);
    }

    /// Slot `index` ended (shutdown, gateway gone, released).
    pub fn ended(&self, index: usize) {
        self.running().remove(&index);
    }

    /// The gateway wants `want` tunnels in all (`scale`, PROTOCOL.md §7.8):
    /// the indices of the slots to start so that that many run (the lowest
    /// free ones, so they spread over cores as at start), counted as
    /// running already. None when enough run, or beyond [`MAX_TUNNELS`].
    pub fn grow(&self, want: usize) -> Vec<usize> {
        let mut running = self.running();
        let mut new = Vec::new();
        let mut next = 0;
        while running.len() < want.min(MAX_TUNNELS) {
            while running.contains(&next) {
                next += 1;
            }
            running.insert(next);
            new.push(next);
        }
        new
    }

    /// The gateway said how many it wants (ignored if configured).
    pub fn offer(&self, n: usize) {
        if self
            .value
            .compare_exchange(0, n, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            for tx in w.drain(..) {
                let _ = tx.send(());
            }
        }
    }

    pub async fn get(&self) -> usize {
        loop {
            let v = self.value.load(Ordering::Acquire);
            if v > 0 {
                return v;
            }
            let (tx, rx) = futures_channel::oneshot::channel();
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(tx);
            if self.value.load(Ordering::Acquire) > 0 {
                continue;
            }
            let _ = rx.await;
        }
    }
}

/// The tunnel engine's settings from `[receiver]` (client role: masks).
fn engine_config(r: &crate::config::ReceiverConfig) -> crate::tunnel::EngineConfig {
    crate::tunnel::EngineConfig {
        role: crate::ws::Role::Client,
        vectored: false,
        zero_mask: false,
        ping_interval: secs(r.ping_interval),
        limits: crate::ws::Limits {
            max_frame_payload: r.tunnel_max_message_size,
            max_message: r.tunnel_max_message_size,
            max_fragments: r.tunnel_max_fragments,
        },
        max_pings_per_second: r.max_pings_per_second,
        close_grace: r.tunnel_close_grace.or_zero(),
    }
}

/// Where a generated instance id is kept, next to the config file.
const INSTANCE_FILE: &str = ".anp-proxy-instance";

/// The receiver's `X-ANPX-Instance`: `configured`, else the one kept in
/// [`INSTANCE_FILE`] under `dir`, else a new random one written there (so a
/// restarted receiver is the same instance to the gateway). A directory
/// that cannot be written gets a per-process id, with a warning.
fn instance_id(configured: &str, dir: &std::path::Path) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let path = dir.join(INSTANCE_FILE);
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if crate::protocol::features::valid_instance(s.as_bytes()) {
            return s.to_owned();
        }
        tracing::warn!(path = %path.display(), "instance file is not a valid id; writing a new one");
    }
    let id: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    if let Err(e) = std::fs::write(&path, format!("{id}\n")) {
        tracing::warn!(path = %path.display(), error = %e,
            "cannot keep the instance id; this process uses a new one (set receiver.instance_id)");
    }
    id
}

/// Most tunnel slots a receiver starts when the gateway decides.
const MAX_TUNNELS: usize = 64;

/// Runs the receiver in the foreground until SIGTERM or SIGINT has shut
/// it down (a second one exits at once, status 1); a fatal start error
/// returns.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    // Installed before any core starts: from its first `connected` line
    // on, a signal shuts the receiver down instead of killing it, and a
    // SIGHUP (which would kill it by default) is answered.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    let r = cfg.receiver.clone();
    // URLs, TLS files and the DID key, exactly as `anp-proxy check` checks
    // them (crate::preflight); a bad one stops the start with its key named.
    let plan = crate::preflight::receiver(&cfg)?;
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let (gateways, upstream, did) = (plan.gateways, plan.upstream, plan.did);
    if let Some(signer) = &did {
        tracing::info!(did = signer.did(), scheme = ?r.auth_scheme, "receiver proves its DID on the upgrade");
    }
    let instance = instance_id(&r.instance_id, &cfg.base_dir);
    tracing::info!(instance = %instance, "receiver instance");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let slots = if r.tunnels > 0 {
        r.tunnels
    } else {
        MAX_TUNNELS
    };
    let threads = cores.min(slots).min(r.max_concurrent).max(1);
    tracing::info!(gateways = %r.gateway_url, upstream = %r.upstream, tunnels = r.tunnels, threads, "receiver starting");
    // A pinned `tunnels = N` keeps N: no `scale` (PROTOCOL.md §7.8).
    let mut offer = crate::protocol::features::Features::SUPPORTED;
    offer.scale = r.tunnels == 0;
    let mut orders = Vec::with_capacity(threads);
    // Every core can start a slot on any other (`FleetMsg::Grow`).
    let (fleet, inboxes): (Vec<_>, Vec<_>) = (0..threads)
        .map(|_| futures_channel::mpsc::unbounded::<fleet::FleetMsg>())
        .unzip();
    for (t, fleet_rx) in inboxes.into_iter().enumerate() {
        let (order_tx, order_rx) = futures_channel::oneshot::channel::<DrainOrder>();
        orders.push(order_tx);
        let cores = fleet.clone();
        let upstream = upstream.clone();
        let r = r.clone();
        let did = did.clone();
        let instance = instance.clone();
        // max_concurrent split over cores; the sum is exactly the limit.
        let permits = r.max_concurrent / threads + usize::from(t < r.max_concurrent % threads);
        let h = crate::runtime::spawn_core(format!("anp-rx-{t}"), move || async move {
            let ctx = Rc::new(core_rx(&r, instance, offer, cores, did, upstream, permits));
            monoio::spawn(drain::shut_down(ctx.clone(), order_rx, t));
            // Each gateway's slots start when the resolver finds it.
            fleet::run_core(ctx, fleet_rx, t, threads, slots).await;
            // Idle until the process exits.
            std::future::pending::<()>().await;
        })
        .context("cannot spawn receiver thread")?;
        // Not joined: a core never returns, and a panic ends the process.
        drop(h);
    }
    let admin = r
        .admin_enabled
        .then(|| start_admin(&r, fleet.clone()))
        .flatten();
    fleet::spawn_resolver(
        gateways,
        r.gateway_resolve_interval.duration(),
        r.tunnels,
        fleet,
    )
    .context("cannot spawn the gateway resolver thread")?;
    let grace = r.shutdown_grace.or_zero();
    serve_signals(
        signals,
        orders,
        admin,
        grace,
        r.tunnel_close_grace.or_zero(),
    )
}

/// One core's receiver state, from the `[receiver]` keys and what the
/// start worked out: its share of `max_concurrent` (`permits`), the
/// fleet's inboxes (`cores`), the identity it proves.
fn core_rx(
    r: &crate::config::ReceiverConfig,
    instance: String,
    offer: crate::protocol::features::Features,
    cores: Vec<futures_channel::mpsc::UnboundedSender<fleet::FleetMsg>>,
    did: Option<std::sync::Arc<crate::auth::didwba::DidSigner>>,
    upstream: crate::receiver::app_conn::AppTarget,
    permits: usize,
) -> CoreRx {
    CoreRx {
        token: r.token.clone(),
        instance,
        offer,
        cores,
        did,
        auth_scheme: r.auth_scheme,
        upstream: Upstream::new(
            upstream,
            permits.max(1),
            r.max_response_head_size,
            r.max_response_headers,
        ),
        permits: crate::sync::Permits::new(permits),
        workers: workers::Workers::new(tunnel::WORKERS_IDLE_KEEP),
        chunk_size: r.chunk_size,
        engine: engine_config(r),
        max_inflight: r.max_inflight_per_tunnel,
        connect_timeout: r.connect_timeout.or_zero(),
        handshake_timeout: r.handshake_timeout.or_zero(),
        upstream_timeout: secs(r.upstream_timeout),
        max_body: r.max_body_size,
        reconnect_max: secs(r.reconnect_max_delay).unwrap_or(std::time::Duration::from_secs(30)),
        shutdown_grace: r.shutdown_grace.or_zero(),
        drain: CoreDrain::default(),
        counters: Default::default(),
    }
}

/// The admin listener (`/health`, `/metrics`), if it can listen: the
/// receiver's work is its tunnels, so a port in use is a warning, not a
/// failed start.
fn start_admin(
    r: &crate::config::ReceiverConfig,
    cores: Vec<futures_channel::mpsc::UnboundedSender<fleet::FleetMsg>>,
) -> Option<crate::admin_http::Admin> {
    let started =
        crate::net::resolve(&r.admin_host, r.admin_port).and_then(|addr| admin::start(addr, cores));
    match started {
        Ok(a) => {
            tracing::info!(addr = %a.addr, "admin listening (/health, /metrics)");
            println!("anp-proxy receiver admin listening on http://{}", a.addr);
            let _ = std::io::stdout().flush();
            Some(a)
        }
        Err(e) => {
            tracing::warn!(host = %r.admin_host, port = r.admin_port, error = %e,
                "receiver admin listener not started (receiver.admin_port); running without it");
            None
        }
    }
}

/// The main thread's life after start: waits for SIGTERM/SIGINT. The
/// first starts the shutdown (`drain.rs`); a second one exits at once.
/// SIGHUP changes nothing: see [`no_reload`].
fn serve_signals(
    mut signals: signal_hook::iterator::Signals,
    orders: Vec<futures_channel::oneshot::Sender<DrainOrder>>,
    admin: Option<crate::admin_http::Admin>,
    grace: Duration,
    close_grace: Duration,
) -> anyhow::Result<()> {
    let handle = signals.handle();
    let mut orders = Some(orders);
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            no_reload();
            continue;
        }
        let Some(orders) = orders.take() else {
            tracing::warn!(
                signal = sig,
                "second signal while shutting down: exiting now"
            );
            std::process::exit(1);
        };
        // `/health` says `draining` (503) from now on, and the port goes
        // to a successor.
        if let Some(a) = &admin {
            a.close();
        }
        shut_down(orders, grace, close_grace, handle.clone());
    }
    Ok(())
}

/// SIGHUP (`kill -HUP`, a closed terminal, a gateway's reload sent to
/// every `anp-proxy`): the receiver's keys live in every core's state and
/// its tunnels, so it takes a new configuration by being replaced, which
/// `./manage.sh reload receiver` does without a gap (a new receiver first,
/// then this one drains). It keeps running as it is and says so, in the
/// log and in the stdout line a gateway's reload prints, for scripts.
fn no_reload() {
    use std::io::Write;
    let why = "a receiver applies a new configuration by being replaced: \
               `./manage.sh reload receiver` (or `restart receiver`) starts a new one, \
               then this one drains, without a gap";
    tracing::warn!("SIGHUP: configuration not reloaded; still running as it was: {why}");
    let mut out = std::io::stdout();
    let _ = writeln!(out, "anp-proxy reload failed: {why}");
    let _ = out.flush();
}

/// Tells every core to shut down within `grace`; a thread waits for their
/// reports (at the latest until the tunnels' `close_grace` and a margin
/// are over too), then ends the signal loop so `run` returns and the
/// process exits 0 with its logs written.
fn shut_down(
    orders: Vec<futures_channel::oneshot::Sender<DrainOrder>>,
    grace: Duration,
    close_grace: Duration,
    signals: signal_hook::iterator::Handle,
) {
    tracing::info!(grace = ?grace, "shutting down: finishing requests in flight, taking no new ones");
    let until = Instant::now() + grace;
    let (done_tx, done) = std::sync::mpsc::channel();
    let cores = orders
        .into_iter()
        .filter_map(|o| {
            o.send(DrainOrder {
                until,
                done: done_tx.clone(),
            })
            .ok()
        })
        .count();
    let _ = std::thread::Builder::new()
        .name("anp-rx-drain".into())
        .spawn(move || {
            let give_up = until + close_grace + Duration::from_secs(1);
            let mut reported = 0;
            while reported < cores {
                let left = give_up.saturating_duration_since(Instant::now());
                match done.recv_timeout(left) {
                    Ok(_) => reported += 1,
                    Err(_) => break,
                }
            }
            tracing::info!(cores, cores_done = reported, "receiver stopped; exiting");
            let _ = std::io::stdout().flush();
            signals.close();
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_starts_the_lowest_free_slots_up_to_the_want() {
        let c = TunnelCount::new(0);
        c.started(0);
        assert_eq!(c.grow(1), Vec::<usize>::new(), "one runs already");
        assert_eq!(c.grow(3), vec![1, 2]);
        assert_eq!(c.grow(3), Vec::<usize>::new(), "asked twice: no more");
        // Slot 1 was released; the next ask reuses its index (its core).
        c.ended(1);
        assert_eq!(c.grow(2), Vec::<usize>::new(), "two still run");
        assert_eq!(c.grow(3), vec![1]);
        assert_eq!(c.grow(1000).len(), MAX_TUNNELS - 3, "capped");
    }
}
