//! The gateway's listeners and accept loops: the public port, and with
//! `tunnel_port` a second port that takes only tunnel upgrades, each as
//! one `SO_REUSEPORT` socket per worker, each optionally TLS. An accepted
//! socket is counted against `max_connections` and `max_connections_per_ip`
//! (refused: closed at once, counted, logged at most once a second), shaken hands with (TLS,
//! under `header_timeout`), and handed to [`conn::serve_conn`] on this
//! core. On a listener with `proxy_protocol` the PROXY header is read
//! first (`proxy_protocol.rs`, under `header_timeout`) and the client
//! address it names is the connection's peer from then on: the per-IP
//! limit is applied to it once it is known (`max_connections` before, so
//! connections still sending their header are bounded too), and
//! `serve_conn` gets it, so `X-Forwarded-For`, `Forwarded`, the access log
//! and the rate limits see the client, not the balancer. Never touches
//! another core's state.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use monoio_rustls::TlsAcceptor;

use super::conn::{self, Accepts};
use super::conn_limits::ConnRefusal;
use super::core::CoreCtx;
use super::proxy_protocol::{self, ProxyHeaderError};
use crate::config::{Config, TlsConfig};
use crate::tls::server::{self as tls_server, Section};
use crate::tls::TlsSetupError;

/// One worker's socket on one port, and how to serve what it accepts.
pub struct Listener {
    pub socket: std::net::TcpListener,
    /// The tunnel port (TLS from [`Acceptors::tunnel`]) or the public one.
    pub tunnel_port: bool,
    pub accepts: Accepts,
    /// Every connection starts with a PROXY protocol header.
    pub proxy_protocol: bool,
}

/// The TLS acceptors of the two ports (`None`: plain TCP). Each core holds
/// a copy; SIGHUP sends new ones ([`super::core::CoreMsg::Tls`]), which
/// apply to connections accepted after it.
#[derive(Clone, Default)]
pub struct Acceptors {
    pub public: Option<TlsAcceptor>,
    pub tunnel: Option<TlsAcceptor>,
}

/// Loads the certificates and keys of both ports (failing on a bad file).
/// Called through [`crate::preflight::gateway`], which `check`, start and
/// reload share.
pub fn load_acceptors(cfg: &Config) -> Result<Acceptors, TlsSetupError> {
    let g = &cfg.gateway;
    let public = acceptor(Section::Gateway, &g.tls, cfg)?;
    let tunnel = match (&g.tunnel_port, &g.tunnel_tls) {
        (None, _) => None,
        (Some(_), Some(t)) => acceptor(Section::Tunnel, t, cfg)?,
        (Some(_), None) => public.clone(),
    };
    Ok(Acceptors { public, tunnel })
}

/// Everything bound at start: the addresses to print and, per worker, its
/// listeners.
pub struct Bound {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The tunnel port's address and whether it speaks TLS.
    pub tunnel: Option<(SocketAddr, bool)>,
    pub per_worker: Vec<Vec<Listener>>,
    pub acceptors: Acceptors,
}

fn acceptor(
    section: Section,
    t: &TlsConfig,
    cfg: &Config,
) -> Result<Option<TlsAcceptor>, TlsSetupError> {
    if !t.enabled {
        return Ok(None);
    }
    let sc = tls_server::server_config(section, t, &cfg.base_dir)?;
    Ok(Some(TlsAcceptor::from(sc)))
}

/// Binds `workers` sockets on each port; `acceptors` come from
/// [`crate::preflight::gateway`].
pub fn bind(cfg: &Config, workers: usize, acceptors: Acceptors) -> anyhow::Result<Bound> {
    let g = &cfg.gateway;
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
                tunnel_port: false,
                accepts: public_accepts,
                proxy_protocol: g.proxy_protocol,
            }]
        })
        .collect();
    let mut tunnel = None;
    if let Some(port) = g.tunnel_port {
        let taddr = crate::net::resolve(&g.host, port)
            .with_context(|| format!("gateway.host `{}`", g.host))?;
        let (taddr, sockets) = crate::net::bind_workers(taddr, workers)
            .with_context(|| format!("cannot listen on {taddr} (gateway.tunnel_port)"))?;
        for (w, socket) in per_worker.iter_mut().zip(sockets) {
            w.push(Listener {
                socket,
                tunnel_port: true,
                accepts: Accepts::Tunnels,
                proxy_protocol: g.tunnel_proxy_protocol,
            });
        }
        tunnel = Some((taddr, acceptors.tunnel.is_some()));
    }
    Ok(Bound {
        addr,
        tls: acceptors.public.is_some(),
        tunnel,
        per_worker,
        acceptors,
    })
}

/// Accepts on one listener of core `ctx.index` until the gateway drains.
/// `seq` numbers connections on this core across its listeners.
pub async fn accept_loop(ctx: Rc<CoreCtx>, l: Listener, seq: Rc<Cell<u64>>) {
    let listener = match monoio::net::TcpListener::from_std(l.socket) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    // One canceller for every accept; used once, when the drain starts.
    let canceller = monoio::io::Canceller::new();
    let log = Rc::new(RefusalLog::default());
    let how = How {
        tunnel_port: l.tunnel_port,
        accepts: l.accepts,
        proxy_protocol: l.proxy_protocol,
    };
    loop {
        let mut accept = std::pin::pin!(listener.cancelable_accept(canceller.handle()));
        let accepted = monoio::select! {
            r = &mut accept => r,
            _ = ctx.draining.wait() => {
                // Never drop a pending io_uring accept: one the kernel has
                // already completed would be lost with its descriptor (the
                // client waits, then is reset when the process exits).
                // Cancel it and await the outcome: ECANCELED, or a
                // connection to serve like the swept ones below.
                let _ = canceller.cancel();
                if let Ok((stream, peer)) = accept.await {
                    admit(&ctx, how, &log, &seq, stream, peer);
                }
                break;
            }
        };
        match accepted {
            Ok((stream, peer)) => admit(&ctx, how, &log, &seq, stream, peer),
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning;
                // the connection waits in the listen queue meanwhile.
                log.accept_failed(&e);
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    // Draining: take what the kernel already queued for this socket, so
    // closing it refuses nobody who got a SYN-ACK from us (a successor
    // gateway on the same port takes new connections). What lands here
    // between the last sweep and the shutdown, and handshakes still in
    // progress, the kernel moves to another listener of the port
    // (`net::migrate_on_close`, or net.ipv4.tcp_migrate_req = 1); without
    // either they would be reset.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
    let mut swept = 0usize;
    loop {
        // SAFETY: accept4 on a listening fd we own; a returned fd is ours.
        let nfd = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if nfd < 0 {
            break;
        }
        // SAFETY: nfd was just returned by accept4 and is owned by nobody else.
        let std = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(nfd) };
        let Ok(peer) = std.peer_addr() else { continue };
        match monoio::net::TcpStream::from_std(std) {
            Ok(stream) => {
                swept += 1;
                admit(&ctx, how, &log, &seq, stream, peer);
            }
            Err(e) => tracing::warn!(error = %e, "cannot register a swept connection"),
        }
    }
    // shutdown(2), not only close: a cancelled io_uring accept may still
    // hold the file, which would keep the socket listening (and queueing
    // connections nobody accepts). Shutdown stops it listening at once.
    // SAFETY: shutdown on a socket fd we own.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    drop(listener);
    tracing::info!(
        core = ctx.index,
        tunnel_port = l.tunnel_port,
        swept,
        "listener closed (draining)"
    );
}

/// Refusals at accept are logged at most once a second per accept loop
/// and kind (limits; PROXY headers) — a flood must not become a flood of
/// log lines; the line says how many were not logged since the last one.
/// The limit counts are on `/metrics`.
#[derive(Default)]
pub struct RefusalLog {
    limits: Turn,
    headers: Turn,
    /// Accepts that failed (out of descriptors: EMFILE, ENFILE).
    failures: Turn,
}

/// One kind's once-a-second turn.
#[derive(Default)]
struct Turn {
    last: Cell<Option<std::time::Instant>>,
    quiet: Cell<u64>,
}

impl Turn {
    /// Whether a refusal may be logged now, and how many were not since
    /// the last one that was.
    fn take(&self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self
            .last
            .get()
            .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_secs(1))
        {
            self.quiet.set(self.quiet.get() + 1);
            return None;
        }
        self.last.set(Some(now));
        Some(self.quiet.replace(0))
    }
}

impl RefusalLog {
    /// A connection on a `proxy_protocol` listener without a valid header.
    fn bad_header(&self, peer: SocketAddr, why: &ProxyHeaderError) {
        let Some(not_logged) = self.headers.take() else {
            return;
        };
        tracing::warn!(%peer, reason = why.reason(), error = %why, not_logged,
            "connection refused: no valid PROXY protocol header");
    }

    /// An accept that failed: retried every 50 ms, so logged once a second
    /// at most (a process out of descriptors would log 20 lines a second
    /// per core).
    fn accept_failed(&self, e: &std::io::Error) {
        let Some(not_logged) = self.failures.take() else {
            return;
        };
        tracing::warn!(error = %e, not_logged, "accept failed; retrying in 50 ms (clients wait in the listen queue)");
    }

    fn refused(&self, peer: SocketAddr, why: ConnRefusal, limit: usize) {
        let Some(not_logged) = self.limits.take() else {
            return;
        };
        let key = match why {
            ConnRefusal::MaxConnections => "max_connections",
            ConnRefusal::PerIp => "max_connections_per_ip",
        };
        tracing::warn!(%peer, reason = why.reason(), limit, not_logged, "connection refused: {key} reached");
    }
}

/// How a listener's connections are served.
#[derive(Clone, Copy)]
struct How {
    tunnel_port: bool,
    accepts: Accepts,
    proxy_protocol: bool,
}

/// Counts an accepted connection against `max_connections` and
/// `max_connections_per_ip` and serves it on this core (on a
/// `proxy_protocol` listener: the per-IP count once the header named the
/// client).
fn admit(
    ctx: &Rc<CoreCtx>,
    how: How,
    log: &Rc<RefusalLog>,
    seq: &Cell<u64>,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
) {
    let g = &ctx.shared.config.gateway;
    let counters = &ctx.shared.counters;
    let limits = &ctx.shared.conn_limits;
    // The balancer's address says nothing about the client: counted per
    // IP only once the header is read.
    let per_ip = if how.proxy_protocol {
        None
    } else {
        match limits.admit(peer.ip()) {
            Ok(slot) => Some(slot),
            Err(why) => {
                log.refused(peer, why, g.max_connections_per_ip);
                drop(stream);
                return;
            }
        }
    };
    if counters.connections.fetch_add(1, Ordering::Relaxed) >= g.max_connections {
        counters.connections.fetch_sub(1, Ordering::Relaxed);
        limits.refused(ConnRefusal::MaxConnections);
        log.refused(peer, ConnRefusal::MaxConnections, g.max_connections);
        drop(stream);
        return;
    }
    let _ = stream.set_nodelay(true);
    // A client that stops reading is cut after send_timeout, so it cannot
    // hold its response's app call (and the receiver's permit) forever.
    if let Some(d) = crate::config::secs(g.send_timeout) {
        let _ = crate::net::set_send_timeout(&stream, d);
    }
    ctx.last_accept.set(std::time::Instant::now());
    seq.set(seq.get() + 1);
    let conn_id = ((ctx.index as u64) << 48) | seq.get();
    let ctx = ctx.clone();
    let log = log.clone();
    monoio::spawn(async move {
        let mut stream = stream;
        let mut peer = peer;
        let mut per_ip = per_ip;
        if how.proxy_protocol {
            let limit = ctx.settings.header_timeout;
            match proxy_protocol::read_header(&mut stream, peer, limit).await {
                Ok(client) => peer = client,
                Err(why) => {
                    log.bad_header(peer, &why);
                    drop(stream);
                    ctx.shared
                        .counters
                        .connections
                        .fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
            match ctx.shared.conn_limits.admit(peer.ip()) {
                Ok(slot) => per_ip = Some(slot),
                Err(why) => {
                    let g = &ctx.shared.config.gateway;
                    log.refused(peer, why, g.max_connections_per_ip);
                    drop(stream);
                    ctx.shared
                        .counters
                        .connections
                        .fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        serve(&ctx, how, stream, peer, conn_id).await;
        ctx.shared
            .counters
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        drop(per_ip);
    });
}

/// Serves one admitted connection, plain or after its TLS handshake.
async fn serve(
    ctx: &Rc<CoreCtx>,
    how: How,
    stream: monoio::net::TcpStream,
    peer: SocketAddr,
    conn_id: u64,
) {
    let accepts = how.accepts;
    let tls = {
        let a = ctx.acceptors.borrow();
        if how.tunnel_port {
            a.tunnel.clone()
        } else {
            a.public.clone()
        }
    };
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
}
