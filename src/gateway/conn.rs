//! One public HTTP/1.1 client connection on one core: read a head, route
//! it, read its body, send it through a tunnel, write the response; repeat
//! while keep-alive holds. Pipelined requests are answered in order
//! because they are served one after another. The tunnel upgrade at
//! `tunnel_path` leaves this loop for [`super::tunnel::run_tunnel`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Splitable};

use super::body::{read_more, BodyReader, ReadOutcome};
use super::core::{Busy, CoreCtx, CrossRest, ProxyRequest};
use super::error::{error_kind, error_reply, ProxyError, UpgradeError};
use super::forward::build_request_meta;
use super::head::{HeadClock, HeadLimits, HeadTimeout};
use super::observe::Exchange;
use super::pace::Pace;
use super::respond::{push_header_num, write_error, write_out, write_response};
use super::tunnel::{RespBody, RespHead, Tunnel, Upload};
use super::tunnel_upgrade::{accept_tunnel, handshake_deadline, refuse, upgrade_slot};
use super::upgrades::{names_tunnel_path, UpgradeSlot};
use crate::http::headers::Persist;
use crate::http::{self, BodyKind, RequestHead};
use crate::net::Movable;
use crate::protocol::stream;

/// What a listener serves: both (the default), or, with `tunnel_port`,
/// public requests on one port and tunnel upgrades on the other (so the
/// tunnel port's client-certificate rules cannot be bypassed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    All,
    Requests,
    Tunnels,
}

/// Serves one client connection until it closes.
pub async fn serve_conn<S>(
    ctx: Rc<CoreCtx>,
    io: S,
    peer: SocketAddr,
    conn_id: u64,
    tls: bool,
    accepts: Accepts,
) where
    S: AsyncReadRent + AsyncWriteRent + Splitable + Movable + 'static,
    S::OwnedRead: AsyncReadRent + crate::net::Readable + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    let s = &ctx.settings;
    let clock = HeadClock::new(HeadLimits {
        header: s.header_timeout,
        keepalive: s.keepalive_timeout,
        handshake: crate::config::secs(ctx.shared.config.gateway.handshake_timeout),
    });
    let mut c = Client {
        ctx: ctx.clone(),
        io,
        peer,
        conn_id,
        tls,
        accepts,
        buf: BytesMut::new(),
        out: Vec::new(),
        busy: None,
        clock,
        hot_cancel: None,
        rhythm: Rhythm::default(),
        last_done: None,
        limited_backoff: 0,
    };
    loop {
        // 1. The head.
        let Some((head, upgrade)) = c.read_head().await else {
            break;
        };
        let started = c.clock.began().unwrap_or_else(Instant::now);
        c.clock.done();
        let head_buf = c.buf.split_to(head.head_len).freeze();
        let (raw_path, _) = head.path_query(&head_buf);
        // 2. The tunnel upgrade leaves the HTTP loop.
        if c.accepts != Accepts::Requests
            && raw_path == ctx.settings.tunnel_path.as_bytes()
            && head.upgrade
        {
            return c.into_tunnel(head, head_buf, upgrade, started).await;
        }
        // Named the tunnel path but is no upgrade: an ordinary request.
        drop(upgrade);
        // A public client's WebSocket also leaves the loop: pass-through
        // (gateway/passthrough.rs), or the 501 a peer without it gets.
        if c.accepts != Accepts::Tunnels && head.upgrade && is_websocket_upgrade(&head, &head_buf) {
            return c.into_passthrough(head, head_buf, started).await;
        }
        // 3. Everything else is counted and access-logged.
        if !c.serve_request(&head, &head_buf, started).await {
            break;
        }
    }
    c.close().await;
}

/// How long a closing TLS connection may take to write its close_notify
/// (a client that reads nothing could hold it otherwise).
const CLOSE_NOTIFY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// One client connection and what it holds between requests.
struct Client<S> {
    ctx: Rc<CoreCtx>,
    io: S,
    peer: SocketAddr,
    conn_id: u64,
    tls: bool,
    accepts: Accepts,
    /// Lent by the core's pool while a request is worked on, given back
    /// while the connection idles.
    buf: BytesMut,
    out: Vec<u8>,
    /// Set while a request is worked on; a drain waits for none.
    busy: Option<Busy>,
    clock: HeadClock,
    /// Stops `hot_wait`'s read once the client has been quiet for
    /// `HOT_READ`: kept from one request to the next (no allocation per
    /// request), dropped when the connection goes idle (it holds none).
    hot_cancel: Option<monoio::io::Canceller>,
    /// Whether the next wait for a head starts hot or cold.
    rhythm: Rhythm,
    /// When the last request was done (`CoreObs::finish` read the clock),
    /// taken by the next `read_head`: the hot wait's deadline runs from
    /// it, one clock read fewer per request.
    last_done: Option<Instant>,
    /// Doublings of the next 429's pause, kept by
    /// `Admission::pause_after`.
    limited_backoff: u32,
}

impl<S> Client<S>
where
    S: AsyncReadRent + AsyncWriteRent + Splitable + Movable + 'static,
    S::OwnedRead: AsyncReadRent + crate::net::Readable + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    /// Reads the next request head: an idle keep-alive wait for its first
    /// byte (no buffer held), then reads under the head clock. A head
    /// that names the tunnel path takes a pending-upgrade slot first. None:
    /// the connection is over (closed, timed out or refused, answered).
    async fn read_head(&mut self) -> Option<(RequestHead, Option<UpgradeSlot>)> {
        let ctx = self.ctx.clone();
        // A tunnel upgrade holds a slot from its request line to its 101.
        let mut upgrade: Option<UpgradeSlot> = None;
        let last_done = self.last_done.take();
        loop {
            if self.clock.idle(!self.buf.is_empty()) {
                let ready = match self.hot_wait(last_done).await {
                    HotWait::Data => true,
                    HotWait::Over => false,
                    HotWait::Cold(limit) => {
                        let since = Instant::now();
                        let ready = self.wait_first_byte(limit).await;
                        self.rhythm.cold_ended(since.elapsed());
                        ready
                    }
                    HotWait::Expired(limit) => self.wait_first_byte(limit).await,
                };
                if !ready {
                    return None;
                }
            }
            let began = self.clock.begin(Instant::now());
            if upgrade.is_none()
                && self.accepts != Accepts::Requests
                && names_tunnel_path(&self.buf, &ctx.settings.tunnel_path)
            {
                upgrade = Some(upgrade_slot(&ctx, &mut self.io, &mut self.out, self.peer).await?);
            }
            match http::parse_request_head(&self.buf, &ctx.settings.head_limits) {
                Ok(Some(h)) => return Some((h, upgrade)),
                Ok(None) => {}
                Err(e) => {
                    self.refuse_head(ProxyError::Head(e), began).await;
                    return None;
                }
            }
            // Asked before the read: a timed-out read does not give the
            // buffer back.
            let head_begun = !self.buf.is_empty();
            let dl = self.clock.read_deadline(upgrade.is_some());
            match read_more(&mut self.io, &mut self.buf, dl).await {
                ReadOutcome::Data => {}
                ReadOutcome::Eof => return None,
                ReadOutcome::TimedOut => {
                    let why = self
                        .clock
                        .timed_out(head_begun, self.tls, upgrade.is_some());
                    self.head_timed_out(why, began).await;
                    return None;
                }
            }
        }
    }

    /// After a response, the next head is read at once into the buffer
    /// the connection still holds: one recv, where a wait for readable
    /// first costs a PollAdd and its completion more per request. A client
    /// quiet for `HOT_READ` has the read cancelled (what it had read is
    /// kept: `Readable::cancelable_read_append`) and waits on without a
    /// buffer (`wait_first_byte`), so an idle keep-alive connection still
    /// holds none. A connection that has sent nothing yet, on TLS (a
    /// read cannot be cut there), or whose client paces its requests
    /// further apart than `HOT_READ` ([`Rhythm`]) goes straight to
    /// `wait_first_byte`.
    async fn hot_wait(&mut self, last_done: Option<Instant>) -> HotWait {
        let limit = self.clock.idle_limit();
        if !self.rhythm.starts_hot() {
            return HotWait::Cold(limit);
        }
        // Buffers are held only from a connection's first request on
        // (`busy`). The last head's bytes went with its request: their
        // room, a pooled buffer's whole size, comes back without an
        // allocation (a buffer some slice still holds goes back to the
        // pool instead, as it always did).
        if self.busy.is_none() || !self.buf.try_reclaim(self.ctx.pool.read_size()) {
            return HotWait::Cold(limit);
        }
        let cancel = self
            .hot_cancel
            .get_or_insert_with(Default::default)
            .handle();
        let buf = std::mem::take(&mut self.buf);
        let read = match self.io.cancelable_read_append(buf, cancel) {
            Ok(read) => read,
            Err(buf) => {
                self.buf = buf;
                return HotWait::Cold(limit);
            }
        };
        drop(self.busy.take());
        let hot = limit.map_or(HOT_READ, |l| l.min(HOT_READ));
        let since = last_done.unwrap_or_else(Instant::now);
        let mut read = std::pin::pin!(read);
        let (res, buf) = match monoio::time::timeout_at((since + hot).into(), read.as_mut()).await {
            Ok(done) => done,
            Err(_) => {
                self.rhythm.hot_expired();
                self.ctx.obs.metrics.hot_read_cut();
                if let Some(c) = self.hot_cancel.take() {
                    drop(c.cancel());
                }
                read.await
            }
        };
        self.buf = buf;
        match res {
            Ok(0) => HotWait::Over,
            Ok(_) => {
                self.busy = Some(Busy::new(&self.ctx));
                HotWait::Data
            }
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                HotWait::Expired(limit.map(|l| l.saturating_sub(hot)))
            }
            Err(_) => HotWait::Over,
        }
    }

    /// Gives the buffers back and waits for the next head's first byte,
    /// at most `limit`. False: the connection is over.
    async fn wait_first_byte(&mut self, limit: Option<std::time::Duration>) -> bool {
        let ctx = &self.ctx;
        ctx.pool.give_read(std::mem::take(&mut self.buf));
        ctx.pool.give_write(std::mem::take(&mut self.out));
        drop(self.busy.take());
        let idle = self.io.wait_readable();
        let ready = match limit {
            Some(d) => matches!(monoio::time::timeout(d, idle).await, Ok(Ok(()))),
            None => idle.await.is_ok(),
        };
        if ready {
            self.buf = ctx.pool.take_read();
            self.out = ctx.pool.take_write();
            self.busy = Some(Busy::new(ctx));
        }
        ready
    }

    async fn head_timed_out(&mut self, why: HeadTimeout, began: Instant) {
        let peer = self.peer;
        match why {
            HeadTimeout::Quiet => {}
            // A TLS stream whose read was cut by the timeout must not be
            // written to (monoio-rustls: see ARCHITECTURE.md): close.
            HeadTimeout::TlsClose => {
                tracing::info!(%peer, "request head not complete in time (TLS): closed without 408");
            }
            HeadTimeout::Upgrade => {
                self.ctx.shared.upgrades.note_timeout();
                tracing::warn!(%peer, reason = "handshake_timeout", "tunnel upgrade refused: head not complete within handshake_timeout");
                let err = ProxyError::Upgrade(UpgradeError::HeadTimeout);
                refuse(&mut self.io, &mut self.out, &err).await;
            }
            HeadTimeout::Request => self.refuse_head(ProxyError::HeadTimeout, began).await,
        }
    }

    /// A head refused before it was complete (or parsed): answered, closed.
    async fn refuse_head(&mut self, err: ProxyError, began: Instant) {
        let peer = self.peer;
        tracing::info!(%peer, error = %err, "request refused");
        let w = write_error(&mut self.io, &mut self.out, &err, false, Persist::Close).await;
        let read = self.buf.len() as u64;
        self.ctx.obs.refused(began, peer, w.status, read, w.bytes);
    }

    /// The tunnel upgrade: the connection leaves the HTTP loop.
    async fn into_tunnel(
        mut self,
        head: RequestHead,
        head_buf: Bytes,
        upgrade: Option<UpgradeSlot>,
        began: Instant,
    ) {
        drop(self.busy.take());
        let ctx = self.ctx.clone();
        // An absolute-form target is only known to be an upgrade now.
        let slot = match upgrade {
            Some(s) => s,
            None => match upgrade_slot(&ctx, &mut self.io, &mut self.out, self.peer).await {
                Some(s) => s,
                None => return,
            },
        };
        let dl = handshake_deadline(&ctx, began);
        // Nothing of the HTTP loop is kept for the tunnel's life.
        ctx.pool.give_write(std::mem::take(&mut self.out));
        let (io, buf, peer, tls) = (self.io, self.buf, self.peer, self.tls);
        Box::pin(accept_tunnel(
            ctx, io, head, head_buf, buf, peer, tls, slot, dl,
        ))
        .await;
    }

    /// A WebSocket upgrade on a public path: the connection leaves the
    /// HTTP loop for `passthrough::serve`, which answers or relays it.
    async fn into_passthrough(mut self, head: RequestHead, head_buf: Bytes, started: Instant) {
        // A long-lived stream does not hold a drain (its tunnel's in-flight
        // entry does, until `shutdown_grace`).
        drop(self.busy.take());
        let from = super::passthrough::From {
            peer: self.peer,
            conn_id: self.conn_id,
            tls: self.tls,
            tunnels_elsewhere: self.accepts == Accepts::Requests,
            moved: false,
        };
        let (ctx, io, buf, out) = (self.ctx, self.io, self.buf, self.out);
        Box::pin(super::passthrough::serve(
            ctx, io, buf, out, head, head_buf, from, started,
        ))
        .await;
    }

    /// Serves one request; false when the connection must close.
    async fn serve_request(
        &mut self,
        head: &RequestHead,
        head_buf: &Bytes,
        started: Instant,
    ) -> bool {
        let ctx = self.ctx.clone();
        let peer = self.peer;
        let (raw_path, _) = head.path_query(head_buf);
        let method = head.method(head_buf);
        let is_head = method == "HEAD";
        let mut ex = ctx.obs.begin(started, head.head_len);
        // (A WebSocket upgrade never gets here: `passthrough::serve` answers
        // it, 501 included.)
        if self.accepts == Accepts::Tunnels {
            // The tunnel port serves nothing else.
            let err = ProxyError::NoRoute(String::from_utf8_lossy(raw_path).into_owned());
            tracing::info!(%peer, error = %err, "request refused");
            let w = write_error(&mut self.io, &mut self.out, &err, is_head, Persist::Close).await;
            ex.bytes_out += w.bytes;
            ctx.obs.finish(ex, peer, method, raw_path, w.status);
            return false;
        }
        if raw_path == b"/health" && matches!(method, "GET" | "HEAD") {
            // A body it does not read ends the connection.
            let persist = Persist::new(head.keep_alive && !has_body(head), head.version_minor == 0);
            let written = self.health(persist, is_head, &mut ex.bytes_out).await;
            ctx.obs.finish(ex, peer, method, raw_path, 200);
            return written && !persist.closes();
        }
        // Route, read the body, proxy. Boxed: one allocation per request
        // keeps this state (3.8 KiB, `-Zprint-type-sizes`) out of the
        // connection task, which an idle keep-alive connection holds. Box
        // `new` copies all of it, so the waits inside take their futures
        // pinned (`watch_when_late`): by value it was 7.3 KiB.
        let (ok, status, pause) = Box::pin(self.proxy(head, head_buf, &mut ex)).await;
        let done = ctx.obs.finish(ex, peer, method, raw_path, status);
        // Shed or rate-limited: the next request waits in the socket
        // (admission.rs; a drain ends the pause).
        match pause.filter(|_| ok && head.keep_alive) {
            Some(d) => super::admission::Admission::pause(d, &ctx.draining).await,
            None => self.last_done = Some(done),
        }
        ok && head.keep_alive
    }

    /// The connection ends here. A TLS client is sent close_notify first
    /// (RFC 8446 §6.1): without it a client cannot tell a response that
    /// ends at the close from a truncated one, and OpenSSL 3 reports
    /// "unexpected eof" (`ab` over HTTPS counted every answer as failed).
    async fn close(mut self) {
        if self.tls {
            let _ = monoio::time::timeout(CLOSE_NOTIFY_WAIT, self.io.shutdown()).await;
        }
    }

    /// The public `/health`: minimal on purpose, anyone can ask. The
    /// details (tunnel count, pid) are on the admin port's `/health`.
    async fn health(&mut self, persist: Persist, is_head: bool, sent: &mut u64) -> bool {
        let body = "ok\n";
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncache-control: no-store\r\n",
        );
        http::date::write_date_field(out);
        push_header_num(out, "content-length", body.len());
        persist.write_field(out);
        out.extend_from_slice(b"\r\n");
        if !is_head {
            out.extend_from_slice(body.as_bytes());
        }
        *sent += out.len() as u64;
        write_out(&mut self.io, out).await
    }

    /// Proxies one request and writes its response or the gateway's error
    /// reply: (the connection can go on, the status written, how long it
    /// is not read again after a refusal of admission).
    async fn proxy(
        &mut self,
        head: &RequestHead,
        head_buf: &Bytes,
        ex: &mut Exchange<'_>,
    ) -> (bool, u16, Option<std::time::Duration>) {
        let ctx = self.ctx.clone();
        let peer = self.peer;
        let is_head = head.method(head_buf) == "HEAD";
        let result = proxy_one(
            &ctx,
            &mut self.io,
            &mut self.buf,
            &mut self.out,
            head,
            head_buf,
            peer,
            self.conn_id,
            self.tls,
            ex,
        )
        .await;
        // A draining gateway answers what it has and closes.
        let keep_alive = head.keep_alive && !ctx.draining.is_set();
        match result {
            Ok((r, body_read)) => {
                let keep_alive = keep_alive && body_read;
                let http10 = head.version_minor == 0;
                let status = r.meta.status();
                let written = write_response(
                    &mut self.io,
                    &mut self.out,
                    r,
                    is_head,
                    keep_alive,
                    http10,
                    &ctx.settings,
                    &mut ex.bytes_out,
                )
                .await;
                // A cut response keeps the status its client was sent;
                // the access log's `error` says why it is short.
                let ok = written.unwrap_or_else(|cut| {
                    ex.cut(&cut);
                    false
                });
                let pause = ctx.admission.pause_after(None, &mut self.limited_backoff);
                (ok, status, pause)
            }
            Err((ProxyError::ClientGone(when), _)) => {
                // Nobody to answer: logged as that, not as a refusal.
                let e = ProxyError::ClientGone(when);
                tracing::info!(%peer, error = %e, side = e.side().as_str(), "client went away");
                ex.failed(&e, 499);
                (false, 499, None)
            }
            Err((e, body_read)) => {
                let reply = error_reply(&e);
                ex.failed(&e, reply.status);
                let close = reply.close || (!body_read && has_body(head)) || !keep_alive;
                let (raw_path, _) = head.path_query(head_buf);
                let path = String::from_utf8_lossy(raw_path);
                let side = e.side().as_str();
                // Shedding is the overload's expected answer: info, like 429.
                if reply.status >= 500 && !matches!(e, ProxyError::Shed(_)) {
                    tracing::warn!(%peer, %path, error = %e, kind = error_kind(&e), side, status = reply.status, "request failed");
                } else {
                    tracing::info!(%peer, %path, error = %e, kind = error_kind(&e), side, status = reply.status, "request refused");
                }
                let persist = Persist::new(!close, head.version_minor == 0);
                let w = write_error(&mut self.io, &mut self.out, &e, is_head, persist).await;
                ex.bytes_out += w.bytes;
                let pause = ctx
                    .admission
                    .pause_after(Some(&e), &mut self.limited_backoff);
                (w.ok && !close, w.status, pause)
            }
        }
    }
}

fn has_body(head: &RequestHead) -> bool {
    !matches!(head.body, BodyKind::None | BodyKind::ContentLength(0))
}

fn is_websocket_upgrade(head: &RequestHead, buf: &[u8]) -> bool {
    head.headers.iter().any(|h| {
        buf[h.name.clone()].eq_ignore_ascii_case(b"upgrade")
            && http::headers::token_list_contains(&buf[h.value.clone()], "websocket")
    })
}

/// A response or a failure, each with whether the request's body was all
/// read from the client (a connection with body bytes left unread
/// closes).
type ProxyOutcome = Result<(RespHead, bool), (ProxyError, bool)>;

/// The route of a request: by `Host` and path when host routes exist
/// (the head's `Host` is looked at only then), by path otherwise.
pub(super) fn route_of<'r>(
    routes: &'r super::routes::RouteTable,
    head: &RequestHead,
    head_buf: &[u8],
    path: &str,
) -> Option<&'r super::routes::Route> {
    let host = match routes.has_host_routes() {
        true => head.header(head_buf, "host"),
        false => None,
    };
    routes.lookup_at(host, path)
}

#[allow(clippy::too_many_arguments)]
async fn proxy_one<S: AsyncReadRent + AsyncWriteRent + Movable>(
    ctx: &CoreCtx,
    io: &mut S,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    head: &RequestHead,
    head_buf: &Bytes,
    peer: SocketAddr,
    conn_id: u64,
    tls: bool,
    ex: &mut Exchange<'_>,
) -> ProxyOutcome {
    let (raw_path, _) = head.path_query(head_buf);
    let path = percent_encoding::percent_decode(raw_path).decode_utf8_lossy();
    crate::fault::maybe_panic(&path);
    if has_dot_segment(&path) {
        return Err((ProxyError::BadRequest("dot-segment in path"), false));
    }
    let routes = ctx.routes();
    let route = route_of(&routes, head, head_buf, &path);
    // Rate limits (gateway/admission.rs): before anything else is spent.
    let rated = super::ratelimit::Request {
        peer: peer.ip(),
        path: &path,
        route: route.map(|r| (&*r.prefix, &*r.identity)),
    };
    ctx.admission.rate_check(&rated).map_err(|e| (e, false))?;
    let Some(route) = route else {
        return Err((ProxyError::NoRoute(path.into_owned()), false));
    };
    ex.set_route(route);
    // Borrowed from this core's table (`routes` lives to the end): no
    // atomic reference count touched per request.
    let identity = &route.identity;
    tunnel_unless_gone(ctx, io, identity)
        .await
        .map_err(|e| (e, false))?;
    // A place in flight for the identity (its queue, fair turns, or 503
    // at once); held until the response head is here or the request fails.
    let _place = enter_unless_gone(ctx, io, identity)
        .await
        .map_err(|e| (e, false))?;
    let max = ctx.settings.max_body_size;
    if let BodyKind::ContentLength(n) = head.body {
        if n > max as u64 {
            return Err((ProxyError::BodyTooLarge(max), false));
        }
    }
    continue_if_asked(io, out, head, ex)
        .await
        .map_err(|e| (e, false))?;
    let req = Outbound {
        head,
        head_buf,
        peer,
        tls,
        head_began: ex.started(),
    };
    // A `stream` tunnel on this core: the body goes up as it arrives.
    if let Some(t) = ctx
        .local_tunnel(identity, conn_id)
        .filter(|t| t.features.stream)
    {
        return stream_request(ctx, io, buf, &req, t, ex).await;
    }
    whole_request(ctx, io, buf, &req, identity, conn_id, ex).await
}

/// `100 Continue`, written before the body is read when the client asked
/// for it (RFC 9110 §10.1.1).
async fn continue_if_asked<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    head: &RequestHead,
    ex: &mut Exchange<'_>,
) -> Result<(), ProxyError> {
    if !(head.expect_continue && has_body(head)) {
        return Ok(());
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
    ex.bytes_out += out.len() as u64;
    match write_out(io, out).await {
        true => Ok(()),
        false => Err(ProxyError::ClientGone("before 100 Continue was written")),
    }
}

/// A request for a plain v1 tunnel here, or for a tunnel on another
/// core, through `CoreCtx::dispatch` (the request crosses as a `Send`
/// value). A v1 peer takes the body whole. Another core gets a body up to
/// `request_buffer_size` whole, a larger one streamed (`across_cores`).
/// The response comes back whole or, from another core's `stream`
/// tunnel, piece by piece.
async fn whole_request<S: AsyncReadRent + AsyncWriteRent + Movable>(
    ctx: &CoreCtx,
    io: &mut S,
    buf: &mut BytesMut,
    req: &Outbound<'_>,
    identity: &crate::registry::routes::IdentityName,
    conn_id: u64,
    ex: &mut Exchange<'_>,
) -> ProxyOutcome {
    let want = match ctx.local_tunnel(identity, conn_id) {
        Some(_) => usize::MAX,
        None => ctx.settings.request_buffer_size,
    };
    let (reader, first, complete) = first_part(ctx, io, buf, req, want)
        .await
        .map_err(|e| (e, false))?;
    if !complete {
        return across_cores(ctx, io, buf, reader, first, req.peer, identity, conn_id, ex).await;
    }
    ex.bytes_in += first.body.len() as u64;
    let call = pin!(ctx.dispatch(identity, first, conn_id));
    dispatch_unless_gone(io, call)
        .await
        .map(|r| (answer(r, ex), true))
        .map_err(|e| (e, true))
}

/// A request whose body goes on past what was gathered, for a tunnel on
/// another core: handed over with its first piece, the rest following as
/// the client sends it (`Tunnel::call_streamed` takes it there), so memory
/// stays bounded and the app sees the body as it comes, as on the tunnel's
/// own core. An answer before the body's end ends the upload there, and
/// the client's connection closes with the rest unread.
#[allow(clippy::too_many_arguments)]
async fn across_cores<S: AsyncReadRent + AsyncWriteRent + Movable>(
    ctx: &CoreCtx,
    io: &mut S,
    buf: &mut BytesMut,
    mut reader: BodyReader,
    mut req: ProxyRequest,
    peer: SocketAddr,
    identity: &crate::registry::routes::IdentityName,
    conn_id: u64,
    ex: &mut Exchange<'_>,
) -> ProxyOutcome {
    let (piece, rest) = first_piece(ctx, &mut req.body);
    let (tx, pieces) = super::tunnel::cross_upload();
    let mut reply = ctx
        .hand_over(identity, req, CrossRest::Body(pieces), conn_id)
        .map_err(|e| (e, false))?;
    let mut up = Upload::Across(tx);
    let sent = monoio::select! {
        r = upload(&mut reader, &mut up, io, buf, rest, piece) => r,
        r = &mut reply => {
            ex.bytes_in += reader.taken() as u64;
            return r.map(|r| (answer(r, ex), false)).map_err(|e| (e, false));
        }
    };
    ex.bytes_in += reader.taken() as u64;
    let whole = match sent {
        Ok(()) => true,
        // The tunnel's core stopped taking the body (its answer came
        // first, or the request failed): its reply says which, and the
        // connection closes with the rest of the body unread.
        Err(ProxyError::TunnelClosed) => false,
        // The client failed mid-body: the channel, dropped unfinished,
        // aborts the request over there.
        Err(e) => {
            tracing::info!(%peer, error = %e, "upload aborted");
            up.abort(&e.to_string());
            return Err((e, false));
        }
    };
    dispatch_unless_gone(io, pin!(reply))
        .await
        .map(|r| (answer(r, ex), whole))
        .map_err(|e| (e, whole))
}

/// A response from `CoreCtx::dispatch` (or a core a request crossed to),
/// as the client's connection writes it.
pub(super) fn answer(r: super::core::ProxyResponse, ex: &mut Exchange<'_>) -> RespHead {
    ex.request_id = Some(r.request_id);
    let body = match r.body {
        super::core::CrossBody::Full(b) => RespBody::Full(b),
        super::core::CrossBody::Stream(rx) => {
            RespBody::Stream(super::tunnel::BodyStream::remote(rx))
        }
    };
    RespHead { meta: r.meta, body }
}

/// A request on its way out: its head, and where it came from.
struct Outbound<'a> {
    head: &'a RequestHead,
    head_buf: &'a Bytes,
    peer: SocketAddr,
    tls: bool,
    /// When the head's first byte was read (`Exchange::started`).
    head_began: Instant,
}

/// The body's first part, up to `want` bytes (the whole body when it is
/// no longer), and the request meta built for it; the reader goes on with
/// the rest. Whether it is the whole body decides between one message and
/// a stream (`stream_request`, `whole_request`).
async fn first_part<S: AsyncReadRent>(
    ctx: &CoreCtx,
    io: &mut S,
    buf: &mut BytesMut,
    req: &Outbound<'_>,
    want: usize,
) -> Result<(BodyReader, ProxyRequest, bool), ProxyError> {
    let s = &ctx.settings;
    // A request without a body has nothing to pace: no clock read.
    let start = match req.head.body {
        BodyKind::None | BodyKind::ContentLength(0) => req.head_began,
        BodyKind::ContentLength(_) | BodyKind::Chunked => Instant::now(),
    };
    let pace = Pace::new(s.body_pace, start);
    let mut reader = BodyReader::new(&req.head.body, pace, s.max_body_size, buf.len());
    let (body, complete) = reader.gather(io, buf, want).await?;
    // A whole chunked body goes on with its length (`content-length`).
    let chunked = matches!(req.head.body, BodyKind::Chunked);
    let meta = build_request_meta(
        req.head,
        req.head_buf,
        req.peer,
        req.tls,
        (chunked && complete).then_some(body.len()),
        s.trust_forwarded,
    );
    Ok((reader, ProxyRequest { meta, body }, complete))
}

/// Chunk 0's piece of a streamed body: `first` keeps at most one piece
/// (`stream::piece_size`); the piece size, and the rest of `first`.
fn first_piece(ctx: &CoreCtx, first: &mut Bytes) -> (usize, Bytes) {
    let piece = stream::piece_size(ctx.settings.chunk_size, "0123456789abcdef", 0);
    let rest = match first.len() > piece {
        true => first.split_off(piece),
        false => Bytes::new(),
    };
    (piece, rest)
}

/// Sends a request to a `stream` tunnel, its body piece by piece as it
/// arrives from the client (bounded by the tunnel's credit window), then
/// waits for the response head. A body up to `request_buffer_size` is
/// read whole first, so a slow client never holds a receiver's permit for
/// a small body. A client that goes away mid-upload aborts the request at
/// the receiver (`cancel`).
async fn stream_request<S: AsyncReadRent + Movable>(
    ctx: &CoreCtx,
    io: &mut S,
    buf: &mut BytesMut,
    req: &Outbound<'_>,
    tunnel: Rc<Tunnel>,
    ex: &mut Exchange<'_>,
) -> ProxyOutcome {
    let s = &ctx.settings;
    let (mut body, mut first, complete) = first_part(ctx, io, buf, req, s.request_buffer_size)
        .await
        .map_err(|e| (e, false))?;
    if complete {
        ex.bytes_in += first.body.len() as u64;
        let (_up, mut waiter) = tunnel
            .start(ctx, first.meta, first.body, true)
            .map_err(|e| (e, false))?;
        ex.request_id = Some(waiter.request_id());
        return wait_head(io, &mut waiter, s.timeout).await;
    }
    let (piece, rest) = first_piece(ctx, &mut first.body);
    let (up, mut waiter) = tunnel
        .start(ctx, first.meta, first.body, false)
        .map_err(|e| (e, false))?;
    let mut up = Upload::Here(up);
    ex.request_id = Some(waiter.request_id());
    // The app may answer before the body's end (a 413 or a 401 refusing
    // an upload, often closing without reading the rest): the head is
    // awaited while the body goes up, and one that comes first ends the
    // upload. The client gets that answer, and its connection closes
    // with the rest of its body unread.
    let sent = monoio::select! {
        r = upload(&mut body, &mut up, io, buf, rest, piece) => r,
        h = waiter.head() => {
            ex.bytes_in += body.taken() as u64;
            tracing::debug!(peer = %req.peer, "answered before the request body's end");
            return h.map(|h| (h, false)).map_err(|e| (e, false));
        }
    };
    ex.bytes_in += body.taken() as u64;
    if let Err(e) = sent {
        tracing::info!(peer = %req.peer, error = %e, "upload aborted");
        up.abort(&e.to_string());
        return Err((e, false));
    }
    wait_head(io, &mut waiter, s.timeout).await
}

/// How long a keep-alive connection's read for its next head stays
/// posted, holding its buffers, before it is cancelled and the connection
/// waits without them (`Client::hot_wait`). A client that sends its next
/// request within this (a busy one) costs one recv per request.
const HOT_READ: std::time::Duration = std::time::Duration::from_millis(5);

/// What `Client::hot_wait` found.
enum HotWait {
    /// The next head's first bytes are in the buffer.
    Data,
    /// Closed, failed, or quiet past the keep-alive limit.
    Over,
    /// Wait on without a buffer, at most this long.
    Cold(Option<std::time::Duration>),
    /// The same after a hot read that was cancelled (`HOT_READ` passed).
    Expired(Option<std::time::Duration>),
}

/// Whether a keep-alive connection waits for its next head with a read
/// posted (hot) or holding nothing (cold). A client that stayed quiet past
/// [`HOT_READ`] paces its requests (one of thousands of connections, each
/// asking now and then): its next hot read would be cancelled too, a recv,
/// a timer and a cancel for nothing (clients pacing 15,000 requests/s over
/// 200 or 2,048 connections cost the gateway 12–23 % more per request).
/// Such a connection starts cold until a cold wait ends within `HOT_READ`
/// again.
#[derive(Debug, Default)]
struct Rhythm {
    quiet: bool,
}

impl Rhythm {
    fn starts_hot(&self) -> bool {
        !self.quiet
    }

    /// A hot read was cut after `HOT_READ`.
    fn hot_expired(&mut self) {
        self.quiet = true;
    }

    /// A wait that started cold ended after `waited`.
    fn cold_ended(&mut self, waited: std::time::Duration) {
        self.quiet = waited >= HOT_READ;
    }
}

/// How long a request waits for its response head before its client is
/// watched for a close (`wait_head`). Long enough that a loaded gateway's
/// usual answers come first (each watch is a PollAdd and its cancel: at
/// 5 ms, 2,048 closed-loop connections answered in ~60 ms armed one per
/// request), short beside any client timeout: a client that left is seen
/// this much later at most.
const WATCH_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// A whole request sent through `CoreCtx::dispatch` (a plain v1 tunnel,
/// or one on another core), watched as `wait_head` watches the streaming
/// path's (`watch_when_late`): a client that closes its connection drops
/// the call, which aborts it at the receiver (through the other core when
/// it crossed), so no work goes on for nobody.
pub(super) async fn dispatch_unless_gone<S: Movable>(
    io: &S,
    call: Pin<&mut impl Future<Output = super::core::ProxyResult>>,
) -> super::core::ProxyResult {
    match watch_when_late(io, call, None).await {
        Late::Done(r) => r,
        // Bounded where it runs (`Tunnel::call`'s wait for the head).
        Late::TimedOut => Err(ProxyError::Timeout),
        Late::Gone => Err(ProxyError::ClientGone("before the response head arrived")),
    }
}

/// How a wait that watches its client once late ended.
pub(super) enum Late<T> {
    Done(T),
    /// Its limit passed.
    TimedOut,
    /// The client closed its connection meanwhile.
    Gone,
}

/// `wait`, within `limit` if there is one, watching the client for a
/// close only once it has taken `WATCH_AFTER`: the watch is an io_uring
/// PollAdd and, when the wait ends, its cancel (two submissions) that a
/// wait over sooner never needs, and a client that leaves is seen
/// `WATCH_AFTER` later at most. Until then one timer runs, not two (each
/// is a clock read, a wheel entry and its removal). The wait for a
/// response head (`wait_head`), for a whole request's answer
/// (`dispatch_unless_gone`) and for a streamed body's next piece
/// (`respond.rs`, where an event stream pauses between events) all go
/// through here. The wait comes pinned by its caller, as in `unless_gone`:
/// an async fn stores a future argument taken by value twice (as itself
/// and once pinned), and each wrapper around it twice again, in the state
/// boxed per request (`serve_request`) and copied into its box.
pub(super) async fn watch_when_late<S: crate::net::Readable, T>(
    io: &S,
    mut wait: Pin<&mut impl Future<Output = T>>,
    limit: Option<std::time::Duration>,
) -> Late<T> {
    let first = limit.map_or(WATCH_AFTER, |l| WATCH_AFTER.min(l));
    if let Ok(r) = monoio::time::timeout(first, wait.as_mut()).await {
        return Late::Done(r);
    }
    let rest = async {
        match limit {
            Some(l) => monoio::time::timeout(l - first, wait).await.ok(),
            None => Some(wait.await),
        }
    };
    monoio::select! {
        r = rest => r.map_or(Late::TimedOut, Late::Done),
        () = io.closed_by_peer() => Late::Gone,
    }
}

/// A tunnel of `identity` (waiting up to `no_tunnel_wait` for one to
/// connect, `CoreCtx::wait_for_tunnel`), unless the client leaves first.
pub(super) async fn tunnel_unless_gone<S: Movable>(
    ctx: &CoreCtx,
    io: &S,
    identity: &str,
) -> Result<(), ProxyError> {
    let wait = async {
        match ctx.wait_for_tunnel(identity).await {
            true => Ok(()),
            false => Err(ProxyError::NoTunnel(identity.to_string())),
        }
    };
    unless_gone(io, pin!(wait), "while its request waited for a tunnel").await
}

/// A place in flight for `identity` (`Admission::enter`), unless the
/// client leaves first.
pub(super) async fn enter_unless_gone<S: Movable>(
    ctx: &CoreCtx,
    io: &S,
    identity: &str,
) -> Result<super::admission::Place, ProxyError> {
    let enter = pin!(ctx.admission.enter(identity));
    unless_gone(io, enter, "while its request waited for a place in flight").await
}

/// `wait`, unless the client closes its connection first: then the
/// request is dropped (`ClientGone`, `during` saying what it waited for)
/// and the connection with it, at once. Every wait before the request is
/// forwarded goes through here, so a client that gave up holds neither a
/// descriptor nor a place in a queue for the rest of a wait it no longer
/// sees the end of. A wait that is over at its first poll watches nothing
/// (the watch is an io_uring PollAdd and its cancel, and the future only
/// submits it when polled). That first poll has the task's own waker: a
/// monoio timer keeps the first waker it is polled with, so a first poll
/// with a stand-in (`now_or_never`) left `queue_timeout` and the
/// `no_tunnel_wait` ticks waking nobody.
async fn unless_gone<S: Movable, T>(
    io: &S,
    mut wait: Pin<&mut impl Future<Output = Result<T, ProxyError>>>,
    during: &'static str,
) -> Result<T, ProxyError> {
    use std::task::Poll;
    let mut gone = pin!(io.closed_by_peer());
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = wait.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        match gone.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(ProxyError::ClientGone(during))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Waits for the response head. A client that closes its connection
/// meanwhile cancels the request at the receiver: under overload, clients
/// that gave up would otherwise leave their requests running ahead of live
/// ones (each holding a receiver permit and an app call), and the work
/// done for nobody grows until no request is answered in time.
pub(super) async fn wait_head<S: Movable>(
    io: &S,
    waiter: &mut super::tunnel::Waiter,
    timeout: std::time::Duration,
) -> ProxyOutcome {
    let late = watch_when_late(io, pin!(waiter.head()), Some(timeout)).await;
    match late {
        Late::Done(r) => r.map(|h| (h, true)).map_err(|e| (e, true)),
        Late::TimedOut => Err((waiter.time_out(), true)),
        Late::Gone => {
            waiter.abandon();
            Err((
                ProxyError::ClientGone("before the response head arrived"),
                true,
            ))
        }
    }
}

/// The rest of a streamed upload after chunk 0: `pending` (gathered but
/// not sent yet), then each piece as the client sends it, the last one
/// marked.
async fn upload<S: AsyncReadRent>(
    body: &mut BodyReader,
    up: &mut Upload,
    io: &mut S,
    buf: &mut BytesMut,
    mut pending: Bytes,
    piece: usize,
) -> Result<(), ProxyError> {
    while !pending.is_empty() {
        let p = pending.split_to(pending.len().min(piece));
        let last = pending.is_empty() && body.finished();
        body.send(up, p, last).await?;
        if last {
            return Ok(());
        }
    }
    loop {
        match body.next(io, buf, piece).await? {
            Some(p) => {
                // Content-Length: the last piece is known as it is taken.
                let last = body.finished();
                body.send(up, p, last).await?;
                if last {
                    return Ok(());
                }
            }
            None => return body.send(up, Bytes::new(), true).await,
        }
    }
}

pub(super) fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client quiet past `HOT_READ` is waited for cold until it asks
    /// again within `HOT_READ` of a cold wait's start; one that asks at
    /// once stays hot.
    #[test]
    fn a_paced_client_is_waited_for_cold_until_it_asks_sooner() {
        let mut r = Rhythm::default();
        assert!(r.starts_hot(), "a connection starts hot");
        r.hot_expired();
        assert!(!r.starts_hot(), "after a cut hot read: cold");
        r.cold_ended(HOT_READ * 10);
        assert!(!r.starts_hot(), "still pacing: cold");
        r.cold_ended(HOT_READ / 5);
        assert!(r.starts_hot(), "asked within HOT_READ: hot again");
        r.cold_ended(HOT_READ);
        assert!(!r.starts_hot(), "HOT_READ itself is quiet");
    }

    #[test]
    fn dot_segments() {
        assert!(has_dot_segment("/a/../b"));
        assert!(has_dot_segment("/a/./b"));
        assert!(has_dot_segment("/a/.."));
        assert!(!has_dot_segment("/a/..b/.c"));
    }
}
