//! The public gateway: `workers` monoio runtimes, one per core, each with
//! its own `SO_REUSEPORT` listener, serving HTTP/1.1 clients and accepting
//! receiver tunnels at `tunnel_path` (DESIGN.md, "Data path").

pub(crate) mod accept;
pub(crate) mod admin;
pub(crate) mod admission;
pub(crate) mod body;
pub(crate) mod conn;
pub(crate) mod conn_limits;
pub(crate) mod core;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod head;
pub(crate) mod instances;
pub(crate) mod metrics;
pub(crate) mod observe;
pub(crate) mod pace;
pub(crate) mod passthrough;
pub(crate) mod proxy_protocol;
pub(crate) mod ratelimit;
pub(crate) mod refusals;
/// The route table lives in the registry (layering: lower layers never
/// import the gateway); re-exported under its old path.
pub use crate::registry::routes;
pub use crate::registry::routes::build_routes;
pub(crate) mod respond;
pub(crate) mod takeover;
pub(crate) mod tunnel;
pub(crate) mod tunnel_upgrade;
pub(crate) mod upgrades;

use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context as _;

use self::core::{CoreCtx, CoreMsg, Shared};
use crate::auth::{Authenticator, DidAuth, TokenAuth};
use crate::config::Config;

/// A running gateway's facts, for callers that embed it.
pub struct Started {
    pub addr: SocketAddr,
    /// The public port speaks HTTPS/WSS.
    pub tls: bool,
    /// The tunnel-only port (`tunnel_port`) and whether it speaks TLS.
    pub tunnel: Option<(SocketAddr, bool)>,
    pub workers: usize,
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub shared: Arc<Shared>,
}

/// Binds the listeners and starts the worker threads.
pub fn start(cfg: Config) -> anyhow::Result<Started> {
    let cfg = Arc::new(cfg);
    let workers = cfg.gateway_workers();
    // Files and URLs, exactly as `anp-proxy check` checks them.
    let plan = crate::preflight::gateway(&cfg)?;
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let bound = accept::bind(&cfg, workers, plan.acceptors)?;
    let addr = bound.addr;
    // The registry is read here, before any runtime starts (blocking), then
    // by its poller thread; never on a core.
    let mut registry = crate::registry::Registry::open(&cfg).context("route registry")?;
    let snapshot = crate::registry::reload::snapshot(&mut registry).context("route registry")?;
    let routes = Arc::new(crate::registry::reload::route_table(&cfg, &snapshot.rows));
    tracing::info!(registry = %registry.describe(), rows = snapshot.rows.len(), routes = routes.len(), "routes loaded");
    let mut auth = Authenticator::new(TokenAuth::new(&cfg.gateway.auth.tokens));
    if cfg.gateway.auth.did_wba_enabled {
        auth = auth.with_did(DidAuth::for_gateway(&cfg)?);
    }
    let mut inboxes = Vec::with_capacity(workers);
    let mut inbox_rx = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = futures_channel::mpsc::unbounded::<CoreMsg>();
        inboxes.push(tx);
        inbox_rx.push(rx);
    }
    let shared = Arc::new(Shared::new(cfg.clone(), auth, routes, inboxes));
    // Before the cores start: each takes its own handle at start.
    if let Some(sink) = crate::access_log::AccessSink::open(&cfg.logging, &cfg.base_dir)
        .context("access log (logging.log_dir)")?
    {
        shared.obs.set_access_log(sink);
    }
    let (refresh_tx, refresh_rx) = std::sync::mpsc::channel();
    shared.set_registry_refresh(refresh_tx);
    let poller_shared = Arc::downgrade(&shared);
    let stats = shared.registry_stats.get_or_init(Default::default).clone();
    crate::registry::reload::spawn_poller(
        registry,
        cfg.clone(),
        snapshot,
        shared.routes().table,
        stats,
        refresh_rx,
        move |u| poller_shared.upgrade().is_some_and(|s| s.publish_routes(u)),
    )
    .context("cannot spawn registry thread")?;
    let mut threads = Vec::with_capacity(workers);
    let (tls, tunnel) = (bound.tls, bound.tunnel);
    // Each worker says when its runtime is up; `start` returns (and the
    // ready line is printed) only then.
    let (up_tx, up_rx) = std::sync::mpsc::channel::<usize>();
    for (index, (listeners, rx)) in bound.per_worker.into_iter().zip(inbox_rx).enumerate() {
        let shared = shared.clone();
        let acceptors = bound.acceptors.clone();
        let up = up_tx.clone();
        let h = crate::runtime::spawn_core(format!("anp-gw-{index}"), move || async move {
            let _ = up.send(index);
            worker_main(index, shared, acceptors, listeners, rx).await
        })
        .context("cannot spawn worker thread")?;
        threads.push(h);
    }
    drop(up_tx);
    for _ in 0..workers {
        up_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .context("a worker runtime did not start")?;
    }
    Ok(Started {
        addr,
        tls,
        tunnel,
        workers,
        threads,
        shared,
    })
}

/// How the binary starts the gateway (`anp-proxy gateway` flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// `--takeover`: join ports another process listens on (the successor
    /// in a restart) instead of refusing to start ([`takeover`]).
    pub takeover: bool,
}

/// Runs the gateway in the foreground until a signal ends it: SIGTERM or
/// SIGINT drain it (a second one exits at once), SIGHUP reloads
/// `config_path` (routes, tokens, certificates).
pub fn run(cfg: Config, config_path: &std::path::Path, opts: RunOptions) -> anyhow::Result<()> {
    if !opts.takeover {
        takeover::refuse_held_ports(&cfg)?;
    }
    // Installed first: a signal between the ready line and here would
    // otherwise kill the process, and the handler's descriptors exist
    // before anyone counts ours.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    let tunnel_path = cfg.gateway.tunnel_path.clone();
    let tokens = cfg.gateway.auth.tokens.len();
    let admin = cfg.clone();
    let started = start(cfg)?;
    // Everything listens before the first ready line: whoever waits for
    // it may count our sockets or call the admin port at once.
    let admin = if admin.gateway.admin_enabled {
        let addr = crate::net::resolve(&admin.gateway.admin_host, admin.gateway.admin_port)
            .with_context(|| format!("gateway.admin_host `{}`", admin.gateway.admin_host))?;
        let settings = admin::settings(&admin);
        let a = admin::start(started.shared.clone(), addr, settings)
            .with_context(|| format!("cannot listen on {addr} (gateway.admin_port)"))?;
        tracing::info!(addr = %a.addr, "admin listening (/stats, /metrics, /health)");
        Some(a)
    } else {
        None
    };
    tracing::info!(addr = %started.addr, workers = started.workers, tokens,
        driver = if monoio::utils::detect_uring() { "io_uring" } else { "legacy (epoll)" },
        "gateway listening");
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "anp-proxy gateway listening on {}://{} (tunnel path {}, {} workers)",
        if started.tls { "https" } else { "http" },
        started.addr,
        tunnel_path,
        started.workers
    );
    if let Some((taddr, ttls)) = started.tunnel {
        tracing::info!(addr = %taddr, tls = ttls, "tunnel port listening");
        let scheme = if ttls { "wss" } else { "ws" };
        let _ = writeln!(
            stdout,
            "anp-proxy gateway tunnels on {scheme}://{taddr}{tunnel_path}"
        );
    }
    if let Some(a) = &admin {
        let _ = writeln!(stdout, "anp-proxy admin listening on http://{}", a.addr);
    }
    let _ = stdout.flush();
    serve_signals(signals, &started.shared, admin.as_ref(), config_path)
}

/// The main thread's life after start: waits for signals.
fn serve_signals(
    mut signals: signal_hook::iterator::Signals,
    shared: &Arc<Shared>,
    admin: Option<&admin::Admin>,
    config_path: &std::path::Path,
) -> anyhow::Result<()> {
    use signal_hook::consts::SIGHUP;
    let handle = signals.handle();
    let mut draining = false;
    for sig in signals.forever() {
        match sig {
            SIGHUP => reload(shared, config_path),
            _ if draining => {
                tracing::warn!(signal = sig, "second signal while draining: exiting now");
                std::process::exit(1);
            }
            _ => {
                draining = true;
                // The successor (if any) serves admin from now on.
                if let Some(a) = admin {
                    a.close();
                }
                drain(shared.clone(), handle.clone());
            }
        }
    }
    Ok(())
}

/// Starts the drain on every core; a thread runs its two phases (every
/// core idle, then every tunnel closed), at the latest until
/// `shutdown_grace` and a margin are over, then ends the signal loop so
/// `run` returns and the process exits with its logs written.
fn drain(shared: Arc<Shared>, signals: signal_hook::iterator::Handle) {
    let grace = self::core::Settings::from_config(&shared.config).shutdown_grace;
    tracing::info!(grace = ?grace, "draining: accepting no more connections");
    let _ = std::thread::Builder::new()
        .name("anp-drain".into())
        .spawn(move || {
            let until = std::time::Instant::now() + grace + std::time::Duration::from_secs(5);
            let phase = |msg: fn(std::sync::mpsc::Sender<usize>) -> CoreMsg| {
                let (tx, rx) = std::sync::mpsc::channel();
                let cores = shared
                    .inboxes
                    .iter()
                    .filter(|i| i.unbounded_send(msg(tx.clone())).is_ok())
                    .count();
                let mut done = 0;
                while done < cores {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(_) => done += 1,
                        Err(_) => break,
                    }
                }
                (done, cores)
            };
            let idle = phase(CoreMsg::Drain);
            let closed = phase(CoreMsg::CloseTunnels);
            tracing::info!(
                cores_idle = idle.0,
                cores_closed = closed.0,
                cores = idle.1,
                "drained; exiting"
            );
            if let Some(a) = shared.obs.access_log() {
                a.close();
            }
            let _ = std::io::stdout().flush();
            signals.close();
        });
}

/// SIGHUP: re-reads the config file (the start's environment variables
/// and flags applied again on top: `Config::reload`); routes, tokens, TLS
/// certificates, rate limits, admission limits and `max_connections_per_ip`
/// take effect without dropping a connection. Other keys need a restart.
/// A file that does not load changes nothing (logged).
fn reload(shared: &Shared, path: &std::path::Path) {
    // One stdout line per SIGHUP, for operators and scripts to wait on.
    let failed = |why: String| {
        tracing::error!(error = %why, "reload failed; configuration kept");
        let mut out = std::io::stdout();
        let _ = writeln!(out, "anp-proxy reload failed: {why}");
        let _ = out.flush();
    };
    let cfg = match shared.config.reload() {
        Ok(c) => Arc::new(c),
        Err(e) => return failed(e.to_string()),
    };
    let acceptors = match crate::preflight::gateway(&cfg) {
        Ok(plan) => plan.acceptors,
        Err(e) => return failed(e.to_string()),
    };
    // The listeners stay as started: a file under which one of them would
    // speak TLS or not differently (including a tunnel port that shares
    // `[gateway.tls]` and is no longer named) is refused, never applied
    // as "no acceptor" on a running TLS port.
    if tls_layout(&cfg) != tls_layout(&shared.config) {
        return failed(
            "turning TLS on or off, or adding or removing tunnel_port, needs a restart".into(),
        );
    }
    shared
        .auth
        .set_tokens(TokenAuth::new(&cfg.gateway.auth.tokens));
    shared
        .conn_limits
        .set_per_ip(cfg.gateway.max_connections_per_ip);
    // Rate and admission limits: queued ahead of the TLS swap below, so
    // every core has them once it has answered that.
    for inbox in &shared.inboxes {
        let _ = inbox.unbounded_send(CoreMsg::Limits(cfg.clone()));
    }
    // The stdout line below means "in force": wait for every core to have
    // swapped its acceptors (bounded, should one be stuck).
    let (tx, rx) = std::sync::mpsc::channel();
    let cores = shared
        .inboxes
        .iter()
        .filter(|i| {
            i.unbounded_send(CoreMsg::Tls(acceptors.clone(), tx.clone()))
                .is_ok()
        })
        .count();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut swapped = 0;
    while swapped < cores {
        let left = until.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(_) => swapped += 1,
            Err(_) => break,
        }
    }
    if swapped < cores {
        tracing::warn!(
            swapped,
            cores,
            "reload: not every core took the new certificates yet"
        );
    }
    let routes = shared.reload_routes(cfg.clone());
    tracing::info!(
        tokens = cfg.gateway.auth.tokens.len(),
        dids = cfg.gateway.auth.dids.len(),
        routes_reloaded = routes,
        rate_limits = cfg.gateway.rate_limits.len(),
        "configuration reloaded (routes, tokens, certificates, limits)"
    );
    let mut out = std::io::stdout();
    let _ = writeln!(out, "anp-proxy reloaded {}", path.display());
    let _ = out.flush();
}

/// Whether each listener speaks TLS under `cfg`: the public port, and the
/// tunnel port if there is one (its own table, else the public one's, as
/// in [`accept::load_acceptors`]).
fn tls_layout(cfg: &Config) -> (bool, Option<bool>) {
    let g = &cfg.gateway;
    let tunnel = g
        .tunnel_port
        .map(|_| g.tunnel_tls.as_ref().map_or(g.tls.enabled, |t| t.enabled));
    (g.tls.enabled, tunnel)
}

async fn worker_main(
    index: usize,
    shared: Arc<Shared>,
    acceptors: accept::Acceptors,
    listeners: Vec<accept::Listener>,
    inbox: futures_channel::mpsc::UnboundedReceiver<CoreMsg>,
) {
    let ctx = Rc::new(CoreCtx::new(index, shared.clone(), acceptors));
    monoio::spawn(ctx.clone().run_inbox(inbox));
    monoio::spawn(ctx.clone().scale_tick());
    // The public port and, with `tunnel_port`, the tunnel port: one accept
    // loop each, numbering connections from one sequence.
    let seq = Rc::new(std::cell::Cell::new(0u64));
    let mut loops: Vec<_> = listeners
        .into_iter()
        .map(|l| monoio::spawn(accept::accept_loop(ctx.clone(), l, seq.clone())))
        .collect();
    while let Some(l) = loops.pop() {
        l.await;
    }
    // The listeners closed (a drain): connections and tunnels still run on
    // this runtime until the drain thread ends the process.
    std::future::pending::<()>().await;
}
