//! The gateway's listeners and accept loops: the public port, and with
//! `tunnel_port` a second port that takes only tunnel upgrades, each as
//! one `SO_REUSEPORT` socket per worker, each optionally TLS. An accepted
//! socket is counted against `max_connections`, shaken hands with (TLS,
//! under `header_timeout`), and handed to [`conn::serve_conn`] on this
//! core. Never touches another core's state.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use monoio_rustls::TlsAcceptor;

use super::conn::{self, Accepts};
use super::core::CoreCtx;
use crate::config::{Config, TlsConfig};
use crate::tls::server::{self as tls_server, Section};

/// One worker's socket on one port, and how to serve what it accepts.
pub struct Listener {
    pub socket: std::net::TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub accepts: Accepts,
}

/// Everything bound at start: the addresses to print and, per worker, its
/// listeners.
pub struct Bound {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The tunnel port's address and whether it speaks TLS.
    pub tunnel: Option<(SocketAddr, bool)>,
    pub per_worker: Vec<Vec<Listener>>,
}

fn acceptor(section: Section, t: &TlsConfig, cfg: &Config) -> anyhow::Result<Option<TlsAcceptor>> {
    if !t.enabled {
        return Ok(None);
    }
    let sc = tls_server::server_config(section, t, &cfg.base_dir)?;
    Ok(Some(TlsAcceptor::from(sc)))
}

/// Loads the TLS configurations (failing start on a bad file) and binds
/// `workers` sockets on each port.
pub fn bind(cfg: &Config, workers: usize) -> anyhow::Result<Bound> {
    let g = &cfg.gateway;
    let public_tls = acceptor(Section::Gateway, &g.tls, cfg)?;
    let addr = crate::net::resolve(&g.host, g.port)
        .with_context(|| format!("gateway.host `{}`", g.host))?;
    let (addr, public) = crate::net::bind_workers(addr, workers)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let public_accepts = if g.tunnel_port.is_some() {
        Accepts::Requests
    } else {
        Accepts::All
    };
    let mut per_worker: Vec<Vec<Listener>> = public
        .into_iter()
        .map(|socket| {
            vec![Listener {
                socket,
                tls: public_tls.clone(),
                accepts: public_accepts,
            }]
        })
        .collect();
    let mut tunnel = None;
    if let Some(port) = g.tunnel_port {
        let (section, t) = match &g.tunnel_tls {
            Some(t) => (Section::Tunnel, t),
            None => (Section::Gateway, &g.tls),
        };
        let tls = acceptor(section, t, cfg)?;
        let taddr = crate::net::resolve(&g.host, port)
            .with_context(|| format!("gateway.host `{}`", g.host))?;
        let (taddr, sockets) = crate::net::bind_workers(taddr, workers)
            .with_context(|| format!("cannot listen on {taddr} (gateway.tunnel_port)"))?;
        for (w, socket) in per_worker.iter_mut().zip(sockets) {
            w.push(Listener {
                socket,
                tls: tls.clone(),
                accepts: Accepts::Tunnels,
            });
        }
        tunnel = Some((taddr, tls.is_some()));
    }
    Ok(Bound {
        addr,
        tls: public_tls.is_some(),
        tunnel,
        per_worker,
    })
}

/// Accepts on one listener of core `ctx.index` forever. `seq` numbers
/// connections on this core across its listeners.
pub async fn accept_loop(ctx: Rc<CoreCtx>, l: Listener, seq: Rc<Cell<u64>>) {
    let listener = match monoio::net::TcpListener::from_std(l.socket) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    let max = ctx.shared.config.gateway.max_connections;
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
        seq.set(seq.get() + 1);
        let conn_id = ((ctx.index as u64) << 48) | seq.get();
        let ctx = ctx.clone();
        let tls = l.tls.clone();
        let accepts = l.accepts;
        monoio::spawn(async move {
            match tls {
                None => conn::serve_conn(ctx.clone(), stream, peer, conn_id, false, accepts).await,
                Some(acceptor) => {
                    // Boxed: a TLS session's state is large and would
                    // otherwise size every plain connection's task too.
                    Box::pin(async {
                        // The handshake shares the head's deadline: a client
                        // that stalls it holds a connection slot no longer.
                        let limit = ctx.settings.header_timeout;
                        if let Some(s) = tls_server::accept(&acceptor, stream, peer, limit).await {
                            conn::serve_conn(ctx.clone(), s, peer, conn_id, true, accepts).await;
                        }
                    })
                    .await
                }
            }
            ctx.shared
                .counters
                .connections
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
}
