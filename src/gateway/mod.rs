//! The public gateway: `workers` monoio runtimes, one per core, each with
//! its own `SO_REUSEPORT` listener, serving HTTP/1.1 clients and accepting
//! receiver tunnels at `tunnel_path` (DESIGN.md, "Data path").

pub mod accept;
pub mod admin;
pub mod conn;
pub mod core;
pub mod error;
pub mod forward;
pub mod refusals;
pub mod routes;
pub mod tunnel;
pub mod upgrades;

use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Context as _;

use self::core::{CoreCtx, CoreMsg, Shared};
use self::routes::RouteTable;
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

/// Builds the route table from the configured identities.
pub fn build_routes(cfg: &Config) -> RouteTable {
    let mut t = RouteTable::new();
    let tokens = cfg
        .gateway
        .auth
        .tokens
        .iter()
        .map(|t| (t.name.as_str(), &t.paths));
    // A DID identity's name is the DID itself.
    let dids = cfg
        .gateway
        .auth
        .dids
        .iter()
        .map(|d| (d.did.as_str(), &d.paths));
    for (name, paths) in tokens.chain(dids) {
        let id: Arc<str> = name.into();
        for p in paths {
            if let Some(prev) = t.insert(p, id.clone()) {
                if prev != id {
                    tracing::warn!(path = %p, previous = %prev, now = %id, "prefix owned twice; last wins");
                }
            }
        }
    }
    t
}

/// Binds the listeners and starts the worker threads.
pub fn start(cfg: Config) -> anyhow::Result<Started> {
    let cfg = Arc::new(cfg);
    let workers = cfg.gateway_workers();
    let bound = accept::bind(&cfg, workers)?;
    let addr = bound.addr;
    // The registry is read here, before any runtime starts (blocking), then
    // by its poller thread; never on a core.
    let mut registry = crate::registry::Registry::open(&cfg).context("route registry")?;
    let rows = registry.list_all().context("route registry")?;
    let routes = Arc::new(crate::registry::reload::route_table(&cfg, &rows));
    tracing::info!(registry = %registry.describe(), rows = rows.len(), routes = routes.len(), "routes loaded");
    let mut auth = Authenticator::new(TokenAuth::new(&cfg.gateway.auth.tokens));
    if cfg.gateway.auth.did_wba_enabled {
        auth = auth.with_did(DidAuth::from_config(&cfg.gateway.auth, &cfg.base_dir));
    }
    let mut inboxes = Vec::with_capacity(workers);
    let mut inbox_rx = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, rx) = futures_channel::mpsc::unbounded::<CoreMsg>();
        inboxes.push(tx);
        inbox_rx.push(rx);
    }
    let shared = Arc::new(Shared::new(cfg.clone(), auth, routes, inboxes));
    let (refresh_tx, refresh_rx) = std::sync::mpsc::channel();
    shared.set_registry_refresh(refresh_tx);
    let poller_shared = Arc::downgrade(&shared);
    crate::registry::reload::spawn_poller(
        registry,
        cfg.clone(),
        rows,
        shared.routes().table,
        refresh_rx,
        move |u| poller_shared.upgrade().is_some_and(|s| s.publish_routes(u)),
    )
    .context("cannot spawn registry thread")?;
    let mut threads = Vec::with_capacity(workers);
    let (tls, tunnel) = (bound.tls, bound.tunnel);
    for (index, (listeners, rx)) in bound.per_worker.into_iter().zip(inbox_rx).enumerate() {
        let shared = shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("anp-gw-{index}"))
            .spawn(move || {
                let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot build runtime");
                        std::process::exit(1);
                    }
                };
                rt.block_on(worker_main(index, shared, listeners, rx));
            })
            .context("cannot spawn worker thread")?;
        threads.push(h);
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

/// Runs the gateway in the foreground until its workers end.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let tunnel_path = cfg.gateway.tunnel_path.clone();
    let tokens = cfg.gateway.auth.tokens.len();
    let admin = cfg.clone();
    let started = start(cfg)?;
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
    if admin.gateway.admin_enabled {
        let addr = crate::net::resolve(&admin.gateway.admin_host, admin.gateway.admin_port)
            .with_context(|| format!("gateway.admin_host `{}`", admin.gateway.admin_host))?;
        let local = admin::start(started.shared.clone(), addr)
            .with_context(|| format!("cannot listen on {addr} (gateway.admin_port)"))?;
        tracing::info!(addr = %local, "admin listening (/stats, /metrics)");
        let _ = writeln!(stdout, "anp-proxy admin listening on http://{local}");
    }
    let _ = stdout.flush();
    for t in started.threads {
        let _ = t.join();
    }
    Ok(())
}

async fn worker_main(
    index: usize,
    shared: Arc<Shared>,
    listeners: Vec<accept::Listener>,
    inbox: futures_channel::mpsc::UnboundedReceiver<CoreMsg>,
) {
    let ctx = Rc::new(CoreCtx::new(index, shared.clone()));
    monoio::spawn(ctx.clone().run_inbox(inbox));
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
}
