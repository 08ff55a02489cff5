//! WebSocket pass-through, the gateway's side (PROTOCOL.md §7.6): an
//! `Upgrade: websocket` request to a routed path whose tunnel negotiated
//! `upgrade` goes to the app with its `Upgrade` and `Sec-WebSocket-*`
//! fields; when the app answers 101, the client connection becomes a
//! full-duplex byte stream carried as that request's streamed bodies, both
//! ways, with the same per-request credit as any streamed body (so a
//! client or app that stops reading holds one window and stalls nobody).
//! Any other answer is an ordinary response, and the connection closes.
//!
//! Bytes are relayed, never parsed: WebSocket frames, pings, close codes
//! and extensions are the two ends' business. A half-close travels (the
//! client's EOF is the upload's last chunk, the app's EOF the response's);
//! a failure either way, a lost tunnel, or `upgrade_idle_timeout` without
//! a byte ends both. Each stream is counted (`anp_upgraded_streams_*`) and
//! access-logged once, at its end (status 101, bytes each way, duration).
//!
//! An upgrade for an identity whose tunnels are all on other cores moves
//! there, socket and all (plain TCP; a TLS one gets 503 like a request
//! with no tunnel). Never: a byte stream relayed across cores; touching an ordinary request's path (`conn.rs` calls in only for
//! `Upgrade: websocket`).

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};

use super::core::CoreCtx;
use super::error::{error_kind, error_reply, ProxyError};
use super::forward::{build_upgrade_meta, write_upgrade_head};
use super::respond::{write_error, write_out, write_response};
use super::routes::IdentityName;
use super::tunnel::{BodyEvent, BodyStream, RespBody, RespHead, Upload};
use crate::http::headers::Persist;
use crate::http::{BodyKind, RequestHead};
use crate::net::Movable;
use crate::protocol::stream::{self, DEFAULT_WINDOW};

/// Upgraded streams open per identity, all cores together
/// (`max_upgraded_per_identity`). Its mutex is taken when a stream opens
/// and when it closes, never per byte.
#[derive(Debug, Default)]
pub struct OpenStreams(Mutex<HashMap<IdentityName, usize>>);

/// One open stream, counted until dropped.
pub struct OpenSlot<'a> {
    streams: &'a OpenStreams,
    identity: IdentityName,
}

impl OpenStreams {
    /// A place for one more stream of `identity`, unless `max` (> 0) are
    /// open already.
    pub fn open(&self, identity: &IdentityName, max: usize) -> Option<OpenSlot<'_>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(identity.clone()).or_default();
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(OpenSlot {
            streams: self,
            identity: identity.clone(),
        })
    }

    /// Streams open for `identity` now.
    pub fn count(&self, identity: &str) -> usize {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(identity).copied().unwrap_or(0)
    }
}

impl Drop for OpenSlot<'_> {
    fn drop(&mut self) {
        let mut m = self.streams.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.identity);
            }
        }
    }
}

/// How an upgraded stream ended (the log line's `reason`).
#[derive(Debug)]
enum End {
    /// Both directions closed (EOF each way).
    Closed,
    /// No byte either way for `upgrade_idle_timeout`.
    Idle,
    /// The app side returned no credit for `upgrade_idle_timeout` while
    /// the client had bytes for it.
    Stalled,
    /// The client's connection failed (read or write error).
    Client(&'static str),
    /// The tunnel, the receiver or the app failed (or timed out waiting
    /// for credit).
    Peer(ProxyError),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("closed by both ends"),
            End::Idle => f.write_str("idle for upgrade_idle_timeout"),
            End::Stalled => f.write_str("app side read nothing for upgrade_idle_timeout"),
            End::Client(w) => write!(f, "client connection {w}"),
            End::Peer(ProxyError::TunnelClosed) => f.write_str("tunnel closed"),
            End::Peer(e) => write!(f, "{e}"),
        }
    }
}

/// Where the connection came in (for the 501's hint and the forwarding
/// fields).
pub(super) struct From {
    pub peer: SocketAddr,
    pub conn_id: u64,
    pub tls: bool,
    /// This port opens no tunnels (`tunnel_port` is set): the 501 says so.
    pub tunnels_elsewhere: bool,
    /// Handed over from another core already: served here or refused,
    /// never moved again.
    pub moved: bool,
}

/// An upgrade whose identity has no tunnel on the core that accepted it,
/// on its way to a core that has one (plain TCP only: a TLS session stays
/// where it was accepted). What was read of the connection goes with it.
pub struct UpgradeHandoff {
    fd: std::os::fd::OwnedFd,
    buf: BytesMut,
    head: RequestHead,
    head_buf: Bytes,
    peer: SocketAddr,
    conn_id: u64,
    tunnels_elsewhere: bool,
    started: Instant,
}

/// The core `route`'s identity has a tunnel on, when this one has none.
fn elsewhere(ctx: &CoreCtx, head: &RequestHead, head_buf: &[u8], hint: u64) -> Option<usize> {
    let (raw_path, _) = head.path_query(head_buf);
    let path = percent_encoding::percent_decode(raw_path).decode_utf8_lossy();
    let routes = ctx.routes();
    let route = super::conn::route_of(&routes, head, head_buf, &path)?;
    if ctx.local_tunnel(&route.identity, hint).is_some() {
        return None;
    }
    ctx.shared.remote_core(&route.identity, ctx.index, hint)
}

/// On the receiving core: the handed-over upgrade is served here.
pub(super) fn resume(ctx: Rc<CoreCtx>, h: UpgradeHandoff) {
    let std = std::net::TcpStream::from(h.fd);
    match monoio::net::TcpStream::from_std(std) {
        Ok(io) => {
            let from = From {
                peer: h.peer,
                conn_id: h.conn_id,
                tls: false,
                tunnels_elsewhere: h.tunnels_elsewhere,
                moved: true,
            };
            monoio::spawn(serve(
                ctx,
                io,
                h.buf,
                Vec::new(),
                h.head,
                h.head_buf,
                from,
                h.started,
            ));
        }
        Err(e) => {
            tracing::warn!(peer = %h.peer, error = %e, "handed-over WebSocket upgrade could not be registered")
        }
    }
}

/// Serves one `Upgrade: websocket` request to its end: refused, answered
/// like any request (the app said no), or relayed as a byte stream both
/// ways until it closes. The connection is over afterwards.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve<S>(
    ctx: Rc<CoreCtx>,
    mut io: S,
    buf: BytesMut,
    mut out: Vec<u8>,
    head: RequestHead,
    head_buf: Bytes,
    from: From,
    started: Instant,
) where
    S: AsyncReadRent + AsyncWriteRent + Splitable + Movable + 'static,
    S::OwnedRead: AsyncReadRent + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    // No tunnel of the identity on this core, one on another: a plain TCP
    // connection moves there, so its bytes cross no channel; counted as a
    // cross-core dispatch. A TLS session cannot move: its stream crosses
    // through channels (`open`, `Tunnel::call_duplex`).
    if S::MOVABLE && !from.moved {
        if let Some(core) = elsewhere(&ctx, &head, &head_buf, from.conn_id) {
            match io.into_owned_fd() {
                Ok(fd) => {
                    let h = UpgradeHandoff {
                        fd,
                        buf,
                        head,
                        head_buf,
                        peer: from.peer,
                        conn_id: from.conn_id,
                        tunnels_elsewhere: from.tunnels_elsewhere,
                        started,
                    };
                    return hand_off(&ctx, core, h);
                }
                Err(back) => io = back,
            }
        }
    }
    let (raw_path, _) = head.path_query(&head_buf);
    let ex = ctx.obs.begin(started, head.head_len);
    let mut rec = Record {
        ex,
        path: raw_path,
        peer: from.peer,
    };
    let opened = open(&ctx, &io, &head, &head_buf, &from, &mut rec.ex).await;
    let (up, answer, slot, place) = match opened {
        Ok(o) => o,
        Err(e) => return refused(&ctx, &mut io, &mut out, rec, &e).await,
    };
    // The app's answer: 101, or an ordinary response. A client that
    // leaves meanwhile cancels the request, as on the plain path.
    let resp = match answer {
        Answer::Here(mut waiter) => super::conn::wait_head(&io, &mut waiter, ctx.settings.timeout)
            .await
            .map(|(head, _)| head)
            .map_err(|(e, _)| e),
        Answer::Across(reply) => super::conn::dispatch_unless_gone(&io, std::pin::pin!(reply))
            .await
            .map(|r| super::conn::answer(r, &mut rec.ex)),
    };
    drop(place);
    let resp = match resp {
        Ok(r) if r.meta.status() == 101 => r,
        Ok(r) => return declined(&ctx, &mut io, &mut out, rec, r, up).await,
        Err(e) => {
            up.abort("upgrade failed");
            return refused(&ctx, &mut io, &mut out, rec, &e).await;
        }
    };
    relay_upgraded(&ctx, io, buf, out, rec, resp, up).await;
    // The identity's place among its streams, freed once the stream ended.
    drop(slot);
}

/// Moves a handed-over upgrade to `core`'s inbox (plain TCP only).
fn hand_off(ctx: &CoreCtx, core: usize, h: UpgradeHandoff) {
    let peer = h.peer;
    ctx.shared
        .counters
        .cross_core_dispatch_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(%peer, from = ctx.index, to = core, "WebSocket upgrade handed to another core");
    if ctx.shared.inboxes[core]
        .unbounded_send(super::core::CoreMsg::Upgrade(h))
        .is_err()
    {
        tracing::error!(%peer, "core inbox closed; upgrade dropped");
    }
}

/// The request's access-log record and what it names.
struct Record<'c, 'p> {
    ex: super::observe::Exchange<'c>,
    path: &'p [u8],
    peer: SocketAddr,
}

impl Record<'_, '_> {
    fn finish(self, ctx: &CoreCtx, status: u16) {
        ctx.obs.finish(self.ex, self.peer, "GET", self.path, status);
    }
}

/// Refused before the stream opened: the error reply, and the record.
async fn refused<S: AsyncWriteRent>(
    ctx: &CoreCtx,
    io: &mut S,
    out: &mut Vec<u8>,
    mut rec: Record<'_, '_>,
    e: &ProxyError,
) {
    let (status, bytes) = refuse(io, out, e, rec.path, rec.peer).await;
    rec.ex.failed(e, status);
    rec.ex.bytes_out += bytes;
    rec.finish(ctx, status);
}

/// The app declined: its answer goes to the client as it is, the
/// request's message is ended, and the connection closes.
async fn declined<S: AsyncWriteRent + crate::net::Readable>(
    ctx: &CoreCtx,
    io: &mut S,
    out: &mut Vec<u8>,
    mut rec: Record<'_, '_>,
    resp: RespHead,
    mut up: Upload,
) {
    let status = resp.meta.status();
    let s = &ctx.settings;
    let written =
        write_response(io, out, resp, false, false, false, s, &mut rec.ex.bytes_out).await;
    if let Err(cut) = written {
        rec.ex.cut(&cut);
    }
    let _ = up.send(Bytes::new(), true).await;
    up.abort("upgrade declined");
    rec.finish(ctx, status);
}

/// The 101 to the client, then both directions relayed until the stream
/// ends; counted, logged, and recorded with its bytes each way.
#[allow(clippy::too_many_arguments)]
async fn relay_upgraded<S>(
    ctx: &CoreCtx,
    mut io: S,
    buf: BytesMut,
    mut out: Vec<u8>,
    mut rec: Record<'_, '_>,
    resp: RespHead,
    mut up: Upload,
) where
    S: AsyncReadRent + AsyncWriteRent + Splitable + 'static,
    S::OwnedRead: AsyncReadRent + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    let RespHead { meta, body } = resp;
    let peer = rec.peer;
    let rid = rec.ex.request_id.unwrap_or_default();
    out.clear();
    write_upgrade_head(&mut out, &meta);
    rec.ex.bytes_out += out.len() as u64;
    if !write_out(&mut io, &mut out).await {
        up.abort("client went away");
        rec.ex
            .failed(&ProxyError::ClientGone("before the 101 was written"), 499);
        return rec.finish(ctx, 499);
    }
    ctx.pool.give_write(out);
    let m = &ctx.obs.metrics;
    m.upgraded_opened();
    tracing::debug!(%peer, request_id = rid, "upgraded stream open");
    let counts = Counts::default();
    let why = relay(ctx, io, buf, &mut up, body, &counts).await;
    up.abort(match &why {
        End::Closed => "closed",
        End::Idle | End::Stalled => "upgrade_idle_timeout",
        _ => "upgraded stream failed",
    });
    m.upgraded_closed();
    let (bytes_in, bytes_out) = (counts.up.get(), counts.down.get());
    rec.ex.bytes_in += bytes_in;
    rec.ex.bytes_out += bytes_out;
    let took = rec.ex.started().elapsed();
    tracing::info!(%peer, path = %String::from_utf8_lossy(rec.path), request_id = rid,
        duration_ms = took.as_millis() as u64, bytes_client_to_app = bytes_in,
        bytes_app_to_client = bytes_out, reason = %why, "upgraded stream closed");
    rec.finish(ctx, 101);
}

/// The gateway's error reply to a refused upgrade (the connection
/// closes): (status, bytes written).
async fn refuse<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    e: &ProxyError,
    path: &[u8],
    peer: SocketAddr,
) -> (u16, u64) {
    let status = error_reply(e).status;
    let path = String::from_utf8_lossy(path);
    let side = e.side().as_str();
    if let ProxyError::ClientGone(_) = e {
        // Nobody to answer (`write_error` writes nothing for it).
        tracing::info!(%peer, %path, error = %e, side, "client went away");
    } else if status >= 500 && status != 501 {
        tracing::warn!(%peer, %path, error = %e, kind = error_kind(e), side, status, "upgrade failed");
    } else {
        tracing::info!(%peer, %path, error = %e, kind = error_kind(e), side, status, "upgrade refused");
    }
    let w = write_error(io, out, e, false, Persist::Close).await;
    (w.status, w.bytes)
}

/// The request under way: where the client's bytes go, where the app's
/// answer comes from, its place among the identity's streams, and its
/// place in flight (held until the answer).
type Opened<'a> = (Upload, Answer, OpenSlot<'a>, super::admission::Place);

/// Where the app's answer to an upgrade comes from.
enum Answer {
    Here(super::tunnel::Waiter),
    Across(super::core::CrossReply),
}

/// Everything before the app's answer: the route, its tunnel on this core
/// (which must have negotiated `upgrade`), the identity's stream limit and
/// a place in flight, then chunk 0 of the request.
async fn open<'a, S: Movable>(
    ctx: &'a CoreCtx,
    io: &S,
    head: &RequestHead,
    head_buf: &[u8],
    from: &From,
    ex: &mut super::observe::Exchange<'_>,
) -> Result<Opened<'a>, ProxyError> {
    let s = &ctx.settings;
    if head.method(head_buf) != "GET" || !matches!(head.body, BodyKind::None) {
        // RFC 6455 §4.1: the opening handshake is a GET without a body.
        return Err(ProxyError::BadRequest(
            "a WebSocket upgrade must be a GET without a body",
        ));
    }
    let (raw_path, _) = head.path_query(head_buf);
    let path = percent_encoding::percent_decode(raw_path).decode_utf8_lossy();
    if super::conn::has_dot_segment(&path) {
        return Err(ProxyError::BadRequest("dot-segment in path"));
    }
    let routes = ctx.routes();
    let route = super::conn::route_of(&routes, head, head_buf, &path);
    let rated = super::ratelimit::Request {
        peer: from.peer.ip(),
        path: &path,
        route: route.map(|r| (&*r.prefix, &*r.identity)),
    };
    ctx.admission.rate_check(&rated)?;
    // No route: refused as before pass-through existed (a receiver that
    // dialled the wrong path learns where tunnels are opened).
    let Some(route) = route else {
        return Err(ProxyError::upgrade_refused(
            &s.tunnel_path,
            from.tunnels_elsewhere,
        ));
    };
    ex.set_route(route);
    let identity = route.identity.clone();
    super::conn::tunnel_unless_gone(ctx, io, &identity).await?;
    // No tunnel here: a plain TCP connection was moved to a core with one
    // (`serve`); a TLS one cannot move, and its stream crosses through
    // channels instead (`Tunnel::call_duplex`, which checks `upgrade`).
    let local = ctx.local_tunnel(&identity, from.conn_id);
    if local.as_ref().is_some_and(|t| !t.features.upgrade) {
        // A plain v1 (or older) receiver: it cannot carry the stream.
        return Err(ProxyError::upgrade_refused(&s.tunnel_path, false));
    }
    let max = s.max_upgraded_per_identity;
    let Some(slot) = ctx.shared.upgraded.open(&identity, max) else {
        tracing::warn!(identity = %identity, max, path = %path,
            "upgraded stream refused: max_upgraded_per_identity streams are open");
        return Err(ProxyError::UpgradedLimit(max));
    };
    let place = super::conn::enter_unless_gone(ctx, io, &identity).await?;
    let meta = build_upgrade_meta(head, head_buf, from.peer, from.tls, s.trust_forwarded);
    // An upload piece waits for credit at most the idle limit: an app that
    // reads nothing for that long ends the stream like silence would.
    let wait = s
        .upgrade_idle_timeout
        .unwrap_or(Duration::from_secs(100 * 86_400));
    if let Some(tunnel) = local {
        let (up, waiter) = tunnel.start_duplex(ctx, meta, wait)?;
        ex.request_id = Some(waiter.request_id());
        return Ok((Upload::Here(up), Answer::Here(waiter), slot, place));
    }
    let (tx, rx) = super::tunnel::cross_upload();
    let req = super::core::ProxyRequest {
        meta,
        body: Bytes::new(),
    };
    let rest = super::core::CrossRest::Duplex { up: rx, wait };
    let reply = ctx.hand_over(&identity, req, rest, from.conn_id)?;
    Ok((Upload::Across(tx), Answer::Across(reply), slot, place))
}

/// Bytes relayed each way, and when the last one moved.
struct Counts {
    up: Cell<u64>,
    down: Cell<u64>,
    seen: Cell<Instant>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            up: Cell::new(0),
            down: Cell::new(0),
            seen: Cell::new(Instant::now()),
        }
    }
}

/// Relays both directions until both have closed, one fails, or the
/// stream idles out. `early`: bytes the client sent after its head.
async fn relay<S>(
    ctx: &CoreCtx,
    io: S,
    early: BytesMut,
    up: &mut Upload,
    body: RespBody,
    counts: &Counts,
) -> End
where
    S: Splitable,
    S::OwnedRead: AsyncReadRent,
    S::OwnedWrite: AsyncWriteRent,
{
    let (rd, wr) = io.into_split();
    let piece =
        stream::piece_size(ctx.settings.chunk_size, "0123456789abcdef", 0).min(DEFAULT_WINDOW);
    let to_app = client_to_app(rd, early, up, counts, piece);
    let to_client = app_to_client(wr, body, counts);
    let idle = ctx.settings.upgrade_idle_timeout;
    monoio::select! {
        r = crate::sync::both(to_app, to_client) => match r {
            Ok(()) => End::Closed,
            Err(e) => e,
        },
        () = idle_out(&counts.seen, idle) => End::Idle,
    }
}

/// Client to app: each read goes up as a body piece within the request's
/// window; the client's EOF is the last chunk (a half-close).
async fn client_to_app<R: AsyncReadRent>(
    mut rd: R,
    mut buf: BytesMut,
    up: &mut Upload,
    counts: &Counts,
    piece: usize,
) -> Result<(), End> {
    counts.up.set(buf.len() as u64);
    loop {
        while !buf.is_empty() {
            let p = buf.split_to(buf.len().min(piece)).freeze();
            up.send(p, false).await.map_err(upload_failed)?;
        }
        crate::net::reserve_live(&mut buf, piece);
        let (r, b) = crate::net::read_append(&mut rd, buf).await;
        buf = b;
        match r {
            Ok(0) => return up.send(Bytes::new(), true).await.map_err(upload_failed),
            Ok(n) => {
                counts.up.set(counts.up.get() + n as u64);
                counts.seen.set(Instant::now());
            }
            Err(_) => return Err(End::Client("read failed")),
        }
    }
}

/// Why an upload piece could not go: no credit in time, or the peer.
fn upload_failed(e: ProxyError) -> End {
    match e {
        ProxyError::Timeout => End::Stalled,
        e => End::Peer(e),
    }
}

/// App to client: each piece is written as it comes, credit returned once
/// it is in the client's socket; the app's EOF shuts our write side.
async fn app_to_client<W: AsyncWriteRent>(
    mut wr: W,
    body: RespBody,
    counts: &Counts,
) -> Result<(), End> {
    let mut stream: BodyStream = match body {
        RespBody::Stream(s) => s,
        RespBody::Full(b) => {
            // A whole 101 message: the app's side is already over.
            let n = b.len() as u64;
            if !b.is_empty() {
                let (r, _) = wr.write_all(b).await;
                r.map_err(|_| End::Client("write failed"))?;
            }
            counts.down.set(n);
            let _ = wr.shutdown().await;
            return Ok(());
        }
    };
    loop {
        match stream.next().await {
            BodyEvent::Data(d) => {
                let n = d.len();
                let (r, _) = wr.write_all(d).await;
                r.map_err(|_| End::Client("write failed"))?;
                counts.down.set(counts.down.get() + n as u64);
                counts.seen.set(Instant::now());
                stream.consumed(n);
            }
            BodyEvent::End => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
            BodyEvent::Failed(e) => return Err(End::Peer(e)),
        }
    }
}

/// Completes once no byte has moved for `idle` (never without a limit).
async fn idle_out(seen: &Cell<Instant>, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    loop {
        let at = seen.get() + idle;
        let now = Instant::now();
        if now >= at {
            return;
        }
        monoio::time::sleep(at - now).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_streams_are_counted_per_identity_and_capped() {
        let s = OpenStreams::default();
        let a: IdentityName = "alice".into();
        let b: IdentityName = "bob".into();
        let one = s.open(&a, 2).expect("first");
        let two = s.open(&a, 2).expect("second");
        assert!(s.open(&a, 2).is_none(), "a third over max 2");
        let other = s.open(&b, 2).expect("another identity has its own count");
        assert_eq!((s.count("alice"), s.count("bob")), (2, 1));
        drop(one);
        assert!(s.open(&a, 2).is_some(), "a place is free again");
        drop((two, other));
        assert_eq!(s.count("alice"), 0);
        let many: Vec<_> = (0..100)
            .map(|_| s.open(&a, 0).expect("0 = no limit"))
            .collect();
        assert_eq!(s.count("alice"), 100);
        drop(many);
        assert_eq!(s.count("alice"), 0);
    }
}
