//! The public gateway: `workers` monoio runtimes, one per core, each with
//! its own `SO_REUSEPORT` listener, serving HTTP/1.1 clients and accepting
//! receiver tunnels at `tunnel_path` (DESIGN.md, "Data path").

pub mod conn;
pub mod core;
pub mod error;
pub mod forward;
pub mod routes;
pub mod tunnel;

use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;

use self::core::{CoreCtx, CoreMsg, Shared};
use self::routes::RouteTable;
use crate::auth::{Authenticator, DidAuth, TokenAuth};
use crate::config::Config;

/// A running gateway's facts, for callers that embed it.
pub struct Started {
    pub addr: SocketAddr,
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
    let addr = crate::net::resolve(&cfg.gateway.host, cfg.gateway.port)
        .with_context(|| format!("gateway.host `{}`", cfg.gateway.host))?;
    let (addr, listeners) = crate::net::bind_workers(addr, workers)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let routes = Arc::new(build_routes(&cfg));
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
    let mut threads = Vec::with_capacity(workers);
    for (index, (listener, rx)) in listeners.into_iter().zip(inbox_rx).enumerate() {
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
                rt.block_on(worker_main(index, shared, listener, rx));
            })
            .context("cannot spawn worker thread")?;
        threads.push(h);
    }
    Ok(Started {
        addr,
        workers,
        threads,
        shared,
    })
}

/// Runs the gateway in the foreground until its workers end.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let tunnel_path = cfg.gateway.tunnel_path.clone();
    let tokens = cfg.gateway.auth.tokens.len();
    let started = start(cfg)?;
    tracing::info!(addr = %started.addr, workers = started.workers, tokens,
        driver = if monoio::utils::detect_uring() { "io_uring" } else { "legacy (epoll)" },
        "gateway listening");
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "anp-proxy gateway listening on http://{} (tunnel path {}, {} workers)",
        started.addr, tunnel_path, started.workers
    );
    let _ = stdout.flush();
    for t in started.threads {
        let _ = t.join();
    }
    Ok(())
}

async fn worker_main(
    index: usize,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    inbox: futures_channel::mpsc::UnboundedReceiver<CoreMsg>,
) {
    let ctx = Rc::new(CoreCtx::new(index, shared.clone()));
    monoio::spawn(ctx.clone().run_inbox(inbox));
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    let max = shared.config.gateway.max_connections;
    let mut seq: u64 = 0;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let counters = &ctx.shared.counters;
        if counters.connections.fetch_add(1, Ordering::Relaxed) >= max {
            counters.connections.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(%peer, max_connections = max, "connection refused: max_connections reached");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        seq += 1;
        let conn_id = ((index as u64) << 48) | seq;
        let ctx = ctx.clone();
        monoio::spawn(async move {
            conn::serve_conn(ctx.clone(), stream, peer, conn_id, false).await;
            ctx.shared
                .counters
                .connections
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
}
