//! One public HTTP/1.1 client connection on one core: read a head, route
//! it, read its body, send it through a tunnel, write the response; repeat
//! while keep-alive holds. Pipelined requests are answered in order
//! because they are served one after another. The tunnel upgrade at
//! `tunnel_path` leaves this loop for [`super::tunnel::run_tunnel`].

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};

use super::core::{Busy, CoreCtx, CoreMsg, ProxyRequest, TunnelHandoff, TunnelOwner};
use super::error::{error_kind, error_reply, ProxyError};
use super::forward::{build_request_meta, write_response_head, Framing};
use super::instances::Placement;
use super::observe::Exchange;
use super::pace::{Pace, Stall};
use super::tunnel::run_tunnel;
use super::tunnel::{BodyEvent, RespBody, RespHead, Tunnel, Uploader};
use super::upgrades::{names_tunnel_path, UpgradeSlot};
use crate::auth::UpgradeRequest;
use crate::config::DuplicateTunnels;
use crate::http::{self, BodyKind, ChunkedDecoder, ChunkedStep, RequestHead};
use crate::protocol::anpx::ResponseMeta;
use crate::protocol::features::{
    valid_instance, Features, FEATURES_HEADER, INSTANCE_HEADER, TUNNELS_HEADER,
};
use crate::protocol::stream;

/// Bodies at most this large are copied behind the head so the response
/// leaves in one write; larger ones go as a second write without a copy.
const COALESCE_BODY: usize = 16 * 1024;

enum ReadOutcome {
    Data,
    Eof,
    TimedOut,
}

async fn read_more<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    deadline: Option<Instant>,
) -> ReadOutcome {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let b = std::mem::take(buf);
    let (res, b) = match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            match monoio::time::timeout(left, crate::net::read_append(io, b)).await {
                Ok(r) => r,
                Err(_) => return ReadOutcome::TimedOut,
            }
        }
        None => crate::net::read_append(io, b).await,
    };
    *buf = b;
    match res {
        Ok(0) | Err(_) => ReadOutcome::Eof,
        Ok(_) => ReadOutcome::Data,
    }
}

/// One read of request-body bytes under the body's pace: 408
/// (`BodyTimeout`) when it stalls, 400 when the client leaves mid-body.
async fn read_paced<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    pace: &mut Pace,
) -> Result<(), ProxyError> {
    let before = buf.len();
    let limit = pace.deadline(Instant::now());
    match read_more(io, buf, limit.map(|(d, _)| d)).await {
        ReadOutcome::Data => {
            pace.add(buf.len() - before);
            Ok(())
        }
        ReadOutcome::Eof => Err(ProxyError::BadRequest("client went away mid-body")),
        ReadOutcome::TimedOut => Err(ProxyError::BodyTimeout(
            limit.map_or(Stall::Gap, |(_, why)| why),
        )),
    }
}

fn deadline(d: Option<Duration>) -> Option<Instant> {
    d.map(|d| Instant::now() + d)
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// When an upgrade whose head began at `start` must have its 101.
fn handshake_deadline(ctx: &CoreCtx, start: Instant) -> Option<Instant> {
    crate::config::secs(ctx.shared.config.gateway.handshake_timeout).map(|d| start + d)
}

/// Takes a pending-upgrade slot for `peer`, or answers 429/503 with
/// Retry-After (the longest a slot can stay taken) and returns `None`.
async fn upgrade_slot<S: AsyncWriteRent>(
    ctx: &CoreCtx,
    io: &mut S,
    out: &mut Vec<u8>,
    peer: SocketAddr,
) -> Option<UpgradeSlot> {
    match ctx.shared.upgrades.try_acquire(peer.ip()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(%peer, reason = e.reason(), error = %e, status = e.status(), "tunnel upgrade refused");
            let retry = ctx.shared.config.gateway.handshake_timeout.ceil().max(1.0) as u64;
            refuse(io, out, e.status(), e.reason(), &e.to_string(), Some(retry)).await;
            None
        }
    }
}

/// A client transport whose socket can be handed to another core's runtime
/// (plain TCP can; a TLS session keeps its state on this core).
pub trait Movable: Sized {
    const MOVABLE: bool;
    fn into_owned_fd(self) -> Result<std::os::fd::OwnedFd, Self>;

    /// Waits until the socket has something to read, holding no buffer
    /// (an idle keep-alive connection then costs no read buffer).
    /// Transports that buffer internally (TLS) return at once.
    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> {
        std::future::ready(Ok(()))
    }
}

impl Movable for monoio::net::TcpStream {
    const MOVABLE: bool = true;
    fn into_owned_fd(self) -> Result<std::os::fd::OwnedFd, Self> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // into_raw_fd deregisters the socket from this runtime and gives up
        // ownership without closing it; it panics only if the stream was
        // split (it is not: the whole stream is ours here).
        let fd = self.into_raw_fd();
        // SAFETY: `fd` is an open socket that nothing else owns any more.
        Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
    }

    fn wait_readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> {
        self.readable(false)
    }
}

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
    mut io: S,
    peer: SocketAddr,
    conn_id: u64,
    tls: bool,
    accepts: Accepts,
) where
    S: AsyncReadRent + AsyncWriteRent + Splitable + Movable + 'static,
    S::OwnedRead: AsyncReadRent + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    // Buffers are lent by the core's pool while a request is worked on and
    // given back while the connection idles.
    let mut buf = BytesMut::new();
    let mut out: Vec<u8> = Vec::new();
    // Set while a request is worked on; a drain waits for none.
    let mut busy: Option<Busy> = None;
    // Until its first head, a connection that sent nothing is held for
    // header_timeout, not keepalive_timeout (docs/OPERATIONS.md).
    let mut served = false;
    loop {
        // 1. The head: idle keep-alive wait for its first byte (no buffer
        // held), then header_timeout for the rest.
        let mut head_deadline: Option<Option<Instant>> = None;
        // When this request's first byte was read (metrics, access log).
        let mut started = Instant::now();
        let mut head_start = Instant::now();
        // A tunnel upgrade holds a slot from its request line to its 101.
        let mut upgrade: Option<UpgradeSlot> = None;
        let head = loop {
            if buf.is_empty() && head_deadline.is_none() {
                ctx.pool.give_read(std::mem::take(&mut buf));
                ctx.pool.give_write(std::mem::take(&mut out));
                drop(busy.take());
                let idle = io.wait_readable();
                let wait = if served {
                    ctx.settings.keepalive_timeout
                } else {
                    ctx.settings.header_timeout
                };
                let ready = match wait {
                    Some(d) => matches!(monoio::time::timeout(d, idle).await, Ok(Ok(()))),
                    None => idle.await.is_ok(),
                };
                if !ready {
                    return;
                }
                started = Instant::now();
                buf = ctx.pool.take_read();
                out = ctx.pool.take_write();
                busy = Some(Busy::new(&ctx));
                head_deadline = Some(deadline(ctx.settings.header_timeout));
                head_start = Instant::now();
            }
            if upgrade.is_none()
                && accepts != Accepts::Requests
                && names_tunnel_path(&buf, &ctx.settings.tunnel_path)
            {
                match upgrade_slot(&ctx, &mut io, &mut out, peer).await {
                    Some(s) => upgrade = Some(s),
                    None => return,
                }
            }
            match http::parse_request_head(&buf, &ctx.settings.head_limits) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => {
                    let err = ProxyError::Head(e);
                    tracing::info!(%peer, error = %err, "request refused");
                    let w = write_error(&mut io, &mut out, &err, false, true).await;
                    ctx.obs
                        .refused(started, peer, w.status, buf.len() as u64, w.bytes);
                    return;
                }
            }
            let mut dl = *head_deadline.get_or_insert_with(|| {
                head_start = Instant::now();
                deadline(ctx.settings.header_timeout)
            });
            if upgrade.is_some() {
                dl = earliest(dl, handshake_deadline(&ctx, head_start));
            }
            // Asked before the read: a timed-out read does not give the
            // buffer back.
            let head_begun = !buf.is_empty();
            match read_more(&mut io, &mut buf, dl).await {
                ReadOutcome::Data => {}
                ReadOutcome::Eof => return,
                ReadOutcome::TimedOut if !head_begun => return,
                // A TLS stream whose read was cut by the timeout must not
                // be written to (monoio-rustls: see ARCHITECTURE.md): close.
                ReadOutcome::TimedOut if tls => {
                    tracing::info!(%peer, "request head not complete in time (TLS): closed without 408");
                    return;
                }
                ReadOutcome::TimedOut if upgrade.is_some() => {
                    ctx.shared.upgrades.note_timeout();
                    tracing::warn!(%peer, reason = "handshake_timeout", "tunnel upgrade refused: head not complete within handshake_timeout");
                    refuse(
                        &mut io,
                        &mut out,
                        408,
                        "handshake_timeout",
                        "upgrade head not complete in time",
                        None,
                    )
                    .await;
                    return;
                }
                ReadOutcome::TimedOut => {
                    let err = ProxyError::HeadTimeout;
                    tracing::info!(%peer, error = %err, "request refused");
                    let w = write_error(&mut io, &mut out, &err, false, true).await;
                    ctx.obs
                        .refused(started, peer, w.status, buf.len() as u64, w.bytes);
                    return;
                }
            }
        };
        served = true;
        let head_buf = buf.split_to(head.head_len).freeze();
        let target = &head_buf[head.target.clone()];
        let (raw_path, _) = split_target(target);
        let is_head = head.method(&head_buf) == "HEAD";

        // 2. The tunnel upgrade leaves the HTTP loop.
        if accepts != Accepts::Requests
            && raw_path == ctx.settings.tunnel_path.as_bytes()
            && head.upgrade
        {
            drop(busy);
            // An absolute-form target is only known to be an upgrade now.
            let slot = match upgrade.take() {
                Some(s) => s,
                None => match upgrade_slot(&ctx, &mut io, &mut out, peer).await {
                    Some(s) => s,
                    None => return,
                },
            };
            let dl = handshake_deadline(&ctx, head_start);
            Box::pin(accept_tunnel(
                ctx, io, &head, &head_buf, buf, peer, tls, slot, dl,
            ))
            .await;
            return;
        }
        // Named the tunnel path but is no upgrade: an ordinary request.
        drop(upgrade);
        // Every request from here on is counted and access-logged.
        let method = head.method(&head_buf);
        let mut ex = ctx.obs.begin(started, head.head_len);
        if accepts == Accepts::Tunnels {
            // The tunnel port serves nothing else.
            let err = ProxyError::NoRoute(String::from_utf8_lossy(raw_path).into_owned());
            tracing::info!(%peer, error = %err, "request on the tunnel port refused");
            let w = write_error(&mut io, &mut out, &err, is_head, true).await;
            ex.bytes_out += w.bytes;
            ctx.obs.finish(ex, peer, method, raw_path, w.status);
            return;
        }
        if head.upgrade && is_websocket_upgrade(&head, &head_buf) {
            let err = ProxyError::upgrade_refused(
                &ctx.settings.tunnel_path,
                accepts == Accepts::Requests,
            );
            tracing::info!(%peer, error = %err, "request refused");
            let w = write_error(&mut io, &mut out, &err, is_head, true).await;
            ex.bytes_out += w.bytes;
            ctx.obs.finish(ex, peer, method, raw_path, w.status);
            return;
        }
        if raw_path == b"/health" && matches!(head.method(&head_buf), "GET" | "HEAD") {
            // Minimal on purpose: anyone can ask the public port. The
            // details (tunnel count, pid) are on the admin port's /health.
            let body = "ok\n";
            out.clear();
            out.extend_from_slice(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncache-control: no-store\r\n",
            );
            push_header_num(&mut out, "content-length", body.len());
            if !head.keep_alive {
                out.extend_from_slice(b"connection: close\r\n");
            }
            out.extend_from_slice(b"\r\n");
            if !is_head {
                out.extend_from_slice(body.as_bytes());
            }
            ex.bytes_out += out.len() as u64;
            let written = write_out(&mut io, &mut out).await;
            ctx.obs.finish(ex, peer, method, raw_path, 200);
            if !written || !head.keep_alive || has_body(&head) {
                return;
            }
            continue;
        }

        // 3. Route, read the body, proxy. Boxed: one allocation per
        // request keeps this (large) state out of the connection task, so
        // an idle keep-alive connection costs about 1 KiB, not 11 KiB.
        let keep_alive = head.keep_alive;
        let ok = Box::pin(async {
            let result = proxy_one(
                &ctx, &mut io, &mut buf, &mut out, &head, &head_buf, peer, conn_id, tls, &mut ex,
            )
            .await;
            let (resp, body_read) = match result {
                Ok(r) => (Ok(r), true),
                Err((e, body_read)) => (Err(e), body_read),
            };
            // A draining gateway answers what it has and closes.
            let keep_alive = keep_alive && !ctx.draining.is_set();
            let (ok, status) = match resp {
                Ok(r) => {
                    let http10 = head.version_minor == 0;
                    let status = r.meta.status;
                    let ok = write_response(
                        &mut io,
                        &mut out,
                        r,
                        is_head,
                        keep_alive,
                        http10,
                        &ctx.settings,
                        &mut ex.bytes_out,
                    )
                    .await;
                    (ok, status)
                }
                Err(e) => {
                    let reply = error_reply(&e);
                    ex.failed(&e, reply.status);
                    let close = reply.close || (!body_read && has_body(&head)) || !keep_alive;
                    let path = String::from_utf8_lossy(raw_path);
                    if reply.status >= 500 {
                        tracing::warn!(%peer, %path, error = %e, kind = error_kind(&e), status = reply.status, "request failed");
                    } else {
                        tracing::info!(%peer, %path, error = %e, kind = error_kind(&e), status = reply.status, "request refused");
                    }
                    let w = write_error(&mut io, &mut out, &e, is_head, close).await;
                    ex.bytes_out += w.bytes;
                    (w.ok && !close, w.status)
                }
            };
            ctx.obs.finish(ex, peer, method, raw_path, status);
            ok
        })
        .await;
        if !ok || !keep_alive {
            return;
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

/// Splits a request-target into raw path and raw query (without `?`).
/// Absolute-form (`http://host/p?q`) yields its path.
pub fn split_target(target: &[u8]) -> (&[u8], &[u8]) {
    let mut t = target;
    if !t.starts_with(b"/") {
        if let Some(i) = find(t, b"://") {
            let rest = &t[i + 3..];
            t = match rest.iter().position(|b| *b == b'/' || *b == b'?') {
                Some(j) => &rest[j..],
                None => b"/",
            };
        }
    }
    match t.iter().position(|b| *b == b'?') {
        Some(i) => (&t[..i], &t[i + 1..]),
        None => (t, &[]),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

type ProxyOutcome = Result<RespHead, (ProxyError, bool)>;

#[allow(clippy::too_many_arguments)]
async fn proxy_one<S: AsyncReadRent + AsyncWriteRent>(
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
    let target = &head_buf[head.target.clone()];
    let (raw_path, raw_query) = split_target(target);
    let path = percent_encoding::percent_decode(raw_path).decode_utf8_lossy();
    crate::fault::maybe_panic(&path);
    if has_dot_segment(&path) {
        return Err((ProxyError::BadRequest("dot-segment in path"), false));
    }
    let routes = ctx.routes();
    let Some(route) = routes.lookup(&path) else {
        return Err((ProxyError::NoRoute(path.into_owned()), false));
    };
    ex.set_route(route);
    let identity = route.identity.clone();
    if !ctx.wait_for_tunnel(&identity).await {
        return Err((ProxyError::NoTunnel(identity.to_string()), false));
    }
    let max = ctx.settings.max_body_size;
    if let BodyKind::ContentLength(n) = head.body {
        if n > max as u64 {
            return Err((ProxyError::BodyTooLarge(max), false));
        }
    }
    if head.expect_continue && has_body(head) {
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        ex.bytes_out += out.len() as u64;
        if !write_out(io, out).await {
            return Err((ProxyError::BadRequest("client went away"), false));
        }
    }
    // A `stream` tunnel on this core: the body goes up as it arrives.
    if let Some(t) = ctx
        .local_tunnel(&identity, conn_id)
        .filter(|t| t.features.stream)
    {
        let target = Target {
            path: &path,
            raw_path,
            raw_query,
            peer,
            tls,
        };
        return stream_request(ctx, io, buf, head, head_buf, &target, t, ex).await;
    }
    // Otherwise the whole body first (plain v1 peer, or the rare cross-core
    // path, which needs a `Send` request).
    let pace = Pace::new(ctx.settings.body_pace, Instant::now());
    let body = read_body(io, buf, &head.body, max, pace)
        .await
        .map_err(|e| (e, false))?;
    ex.bytes_in += body.len() as u64;
    let chunked = matches!(head.body, BodyKind::Chunked);
    let meta = build_request_meta(
        head,
        head_buf,
        &path,
        raw_path,
        raw_query,
        peer,
        tls,
        chunked.then_some(body.len()),
        ctx.settings.trust_forwarded,
    );
    ctx.dispatch(&identity, ProxyRequest { meta, body }, conn_id)
        .await
        .map(|r| {
            ex.request_id = Some(r.request_id);
            RespHead {
                meta: r.meta,
                body: RespBody::Full(r.body),
            }
        })
        .map_err(|e| (e, true))
}

/// Where a request came from and what it asked for.
struct Target<'a> {
    path: &'a str,
    raw_path: &'a [u8],
    raw_query: &'a [u8],
    peer: SocketAddr,
    tls: bool,
}

/// Sends a request to a `stream` tunnel, its body piece by piece as it
/// arrives from the client (bounded by the tunnel's credit window), then
/// waits for the response head. A client that goes away mid-upload aborts
/// the request at the receiver (`cancel`).
#[allow(clippy::too_many_arguments)]
async fn stream_request<S: AsyncReadRent>(
    ctx: &CoreCtx,
    io: &mut S,
    buf: &mut BytesMut,
    head: &RequestHead,
    head_buf: &Bytes,
    target: &Target<'_>,
    tunnel: Rc<Tunnel>,
    ex: &mut Exchange<'_>,
) -> ProxyOutcome {
    let max = ctx.settings.max_body_size;
    let buffer = ctx.settings.request_buffer_size;
    let mut pace = Pace::new(ctx.settings.body_pace, Instant::now());
    pace.add(buf.len());
    let piece = stream::piece_size(ctx.settings.chunk_size, "0123456789abcdef", 0);
    let mut dec = ChunkedDecoder::new(16 * 1024);
    // What of the body is already here decides between one message and a
    // stream.
    let mut first = BytesMut::new();
    let mut left = 0usize; // Content-Length bytes still to read
    let complete = match head.body {
        BodyKind::None => true,
        BodyKind::ContentLength(n) => {
            let n = n as usize;
            // Held here until whole or `request_buffer_size` of it came:
            // a slow client never holds a receiver's permit for a small
            // body (issue #15).
            while buf.len() < n.min(buffer) {
                read_paced(io, buf, &mut pace)
                    .await
                    .map_err(|e| (e, false))?;
            }
            let take = buf.len().min(n);
            first.extend_from_slice(&buf.split_to(take));
            left = n - take;
            left == 0
        }
        BodyKind::Chunked => loop {
            match dec.decode(buf) {
                Ok(ChunkedStep::Data(d)) => {
                    if first.len() + d.len() > max {
                        return Err((ProxyError::BodyTooLarge(max), false));
                    }
                    first.extend_from_slice(&d);
                }
                Ok(ChunkedStep::Done) => break true,
                Ok(ChunkedStep::NeedMore) if first.len() < buffer => {
                    read_paced(io, buf, &mut pace)
                        .await
                        .map_err(|e| (e, false))?;
                }
                Ok(ChunkedStep::NeedMore) => break false,
                Err(_) => return Err((ProxyError::BadRequest("invalid chunked body"), false)),
            }
        },
    };
    let chunked = matches!(head.body, BodyKind::Chunked);
    let meta = build_request_meta(
        head,
        head_buf,
        target.path,
        target.raw_path,
        target.raw_query,
        target.peer,
        target.tls,
        (chunked && complete).then_some(first.len()),
        ctx.settings.trust_forwarded,
    );
    let mut first = first.freeze();
    if complete {
        ex.bytes_in += first.len() as u64;
        let (_up, mut waiter) = tunnel
            .start(ctx, meta, first, true)
            .map_err(|e| (e, false))?;
        ex.request_id = Some(waiter.request_id());
        return waiter
            .wait(ctx.settings.timeout)
            .await
            .map_err(|e| (e, true));
    }
    let rest = if first.len() > piece {
        first.split_off(piece)
    } else {
        Bytes::new()
    };
    let mut sent = first.len() + rest.len();
    let (mut up, mut waiter) = tunnel
        .start(ctx, meta, first, false)
        .map_err(|e| (e, false))?;
    ex.request_id = Some(waiter.request_id());
    let mut pending = rest;
    let failed = 'upload: loop {
        // Forward what is decoded but not yet sent, a piece at a time.
        while !pending.is_empty() {
            let p = pending.split_to(pending.len().min(piece));
            if let Err(e) = send_paced(&mut up, &mut pace, p, false).await {
                break 'upload Some(e);
            }
        }
        // Then the next bytes from the client.
        let step: Result<Option<Bytes>, ProxyError> = match head.body {
            BodyKind::ContentLength(_) => {
                if left == 0 {
                    Ok(None)
                } else if !buf.is_empty() {
                    let p = buf.split_to(buf.len().min(left).min(piece)).freeze();
                    left -= p.len();
                    Ok(Some(p))
                } else {
                    match read_paced(io, buf, &mut pace).await {
                        Ok(()) => continue,
                        Err(e) => Err(e),
                    }
                }
            }
            _ => match dec.decode(buf) {
                Ok(ChunkedStep::Data(d)) => Ok(Some(d)),
                Ok(ChunkedStep::Done) => Ok(None),
                Ok(ChunkedStep::NeedMore) => match read_paced(io, buf, &mut pace).await {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
                Err(_) => Err(ProxyError::BadRequest("invalid chunked body")),
            },
        };
        match step {
            Ok(Some(p)) => {
                sent += p.len();
                if sent > max {
                    break Some(ProxyError::BodyTooLarge(max));
                }
                let last = matches!(head.body, BodyKind::ContentLength(_)) && left == 0;
                if p.len() > piece {
                    pending = p;
                    continue;
                }
                if let Err(e) = send_paced(&mut up, &mut pace, p, last).await {
                    break Some(e);
                }
                if last {
                    break None;
                }
            }
            Ok(None) => {
                if let Err(e) = up.send(Bytes::new(), true).await {
                    break Some(e);
                }
                break None;
            }
            Err(e) => break Some(e),
        }
    };
    ex.bytes_in += sent as u64;
    if let Some(e) = failed {
        tracing::info!(peer = %target.peer, error = %e, "upload aborted");
        up.abort(&e.to_string());
        return Err((e, false));
    }
    waiter
        .wait(ctx.settings.timeout)
        .await
        .map_err(|e| (e, true))
}

/// Sends a body piece up; the time spent waiting for the tunnel's credit
/// is not held against the client's pace (backpressure is not slowness).
async fn send_paced(
    up: &mut Uploader,
    pace: &mut Pace,
    piece: Bytes,
    last: bool,
) -> Result<(), ProxyError> {
    let t = Instant::now();
    let r = up.send(piece, last).await;
    pace.pause(t.elapsed());
    r
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|s| s == "." || s == "..")
}

/// Reads a whole request body (Content-Length or chunked) up to `max`.
async fn read_body<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    kind: &BodyKind,
    max: usize,
    mut pace: Pace,
) -> Result<Bytes, ProxyError> {
    pace.add(buf.len());
    match *kind {
        BodyKind::None | BodyKind::ContentLength(0) => Ok(Bytes::new()),
        BodyKind::ContentLength(n) => {
            let n = n as usize;
            if buf.len() < n {
                // Grow with the data, not with the claim: a client that
                // announces 64 MiB and sends nothing costs 1 MiB at most.
                buf.reserve((n - buf.len()).min(1 << 20));
            }
            while buf.len() < n {
                read_paced(io, buf, &mut pace).await?;
            }
            // Zero copy: the body is a slice of the read buffer.
            Ok(buf.split_to(n).freeze())
        }
        BodyKind::Chunked => {
            let mut dec = ChunkedDecoder::new(16 * 1024);
            // The chunks are joined into one buffer: a whole-message ANPX
            // frame needs the body contiguous.
            let mut body = BytesMut::new();
            loop {
                match dec.decode(buf) {
                    Ok(ChunkedStep::Data(d)) => {
                        if body.len() + d.len() > max {
                            return Err(ProxyError::BodyTooLarge(max));
                        }
                        body.extend_from_slice(&d);
                    }
                    Ok(ChunkedStep::Done) => return Ok(body.freeze()),
                    Ok(ChunkedStep::NeedMore) => read_paced(io, buf, &mut pace).await?,
                    Err(_) => return Err(ProxyError::BadRequest("invalid chunked body")),
                }
            }
        }
    }
}

async fn write_out<S: AsyncWriteRent>(io: &mut S, out: &mut Vec<u8>) -> bool {
    let v = std::mem::take(out);
    let (res, mut v) = io.write_all(v).await;
    v.clear();
    *out = v;
    res.is_ok()
}

/// [`write_out`], adding the bytes handed to the socket to `sent`.
async fn write_counted<S: AsyncWriteRent>(io: &mut S, out: &mut Vec<u8>, sent: &mut u64) -> bool {
    *sent += out.len() as u64;
    write_out(io, out).await
}

fn push_header_num(out: &mut Vec<u8>, name: &str, n: usize) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(itoa_buf(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn itoa_buf(n: usize) -> String {
    n.to_string()
}

/// Writes a proxied response; true if the connection can serve another
/// request. A streamed body is written as it arrives, returning credit to
/// the tunnel as each piece reaches the client; if it fails midway the
/// connection is closed without the final chunk, so the client sees it.
/// Bytes handed to the socket are added to `sent_total`.
#[allow(clippy::too_many_arguments)]
async fn write_response<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: RespHead,
    is_head: bool,
    keep_alive: bool,
    http10: bool,
    settings: &super::core::Settings,
    sent_total: &mut u64,
) -> bool {
    out.clear();
    let status = resp.meta.status;
    let no_body = is_head || status == 204 || status == 304 || (100..200).contains(&status);
    let mut stream = match resp.body {
        RespBody::Full(body) => {
            let framing = if no_body {
                Framing::None
            } else {
                Framing::Length(body.len() as u64)
            };
            write_response_head(out, &resp.meta, framing, !keep_alive);
            if no_body || body.is_empty() {
                return write_counted(io, out, sent_total).await && keep_alive;
            }
            if body.len() <= COALESCE_BODY {
                out.extend_from_slice(&body);
                return write_counted(io, out, sent_total).await && keep_alive;
            }
            if !write_counted(io, out, sent_total).await {
                return false;
            }
            *sent_total += body.len() as u64;
            let (res, _) = io.write_all(body).await;
            return res.is_ok() && keep_alive;
        }
        RespBody::Stream(s) => s,
    };
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = app_content_length(&resp.meta) {
        Framing::Length(n)
    } else if !http10 {
        Framing::Chunked
    } else {
        Framing::Close
    };
    let close = !keep_alive || framing == Framing::Close;
    write_response_head(out, &resp.meta, framing, close);
    if !write_counted(io, out, sent_total).await {
        return false;
    }
    let mut sent: u64 = 0;
    loop {
        let ev = match monoio::time::timeout(settings.stream_idle_timeout, stream.next()).await {
            Ok(ev) => ev,
            Err(_) => {
                tracing::info!("response stream idle too long; closing");
                return false;
            }
        };
        match ev {
            BodyEvent::Data(d) => {
                if no_body || d.is_empty() {
                    stream.consumed(d.len());
                    continue;
                }
                let n = d.len();
                sent += n as u64;
                if let Framing::Length(total) = framing {
                    if sent > total {
                        tracing::warn!("receiver sent more than its Content-Length; closing");
                        return false;
                    }
                }
                out.clear();
                if framing == Framing::Chunked {
                    out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                }
                if n <= COALESCE_BODY {
                    out.extend_from_slice(&d);
                    if framing == Framing::Chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                    if !write_counted(io, out, sent_total).await {
                        return false;
                    }
                } else {
                    if !out.is_empty() && !write_counted(io, out, sent_total).await {
                        return false;
                    }
                    *sent_total += d.len() as u64;
                    let (res, _) = io.write_all(d).await;
                    if res.is_err() {
                        return false;
                    }
                    if framing == Framing::Chunked {
                        out.extend_from_slice(b"\r\n");
                        if !write_counted(io, out, sent_total).await {
                            return false;
                        }
                    }
                }
                stream.consumed(n);
            }
            BodyEvent::End => {
                return match framing {
                    Framing::Chunked => {
                        out.clear();
                        out.extend_from_slice(http::LAST_CHUNK);
                        write_counted(io, out, sent_total).await && !close
                    }
                    Framing::Length(total) => sent == total && !close,
                    Framing::None => !close,
                    Framing::Close => false,
                };
            }
            BodyEvent::Failed(e) => {
                tracing::warn!(error = %e, "response failed mid-body; closing the client connection");
                return false;
            }
        }
    }
}

/// The app's Content-Length, when it sent a valid one.
fn app_content_length(meta: &ResponseMeta) -> Option<u64> {
    let list = meta.header_list.as_ref().unwrap_or(&meta.headers);
    let mut found = None;
    for (n, v) in list {
        if n.eq_ignore_ascii_case("content-length") {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: u64 = v.parse().ok()?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

/// What [`write_error`] did.
struct ErrorWritten {
    /// The write succeeded.
    ok: bool,
    status: u16,
    /// Bytes handed to the socket.
    bytes: u64,
}

/// Writes the gateway's own error reply.
async fn write_error<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    err: &ProxyError,
    is_head: bool,
    close: bool,
) -> ErrorWritten {
    let r = error_reply(err);
    out.clear();
    http::headers::write_status_line(out, r.status, http::headers::reason_phrase(r.status));
    out.extend_from_slice(b"content-type: application/json\r\n");
    push_header_num(out, "content-length", r.body.len());
    if let Some(s) = r.retry_after {
        push_header_num(out, "retry-after", s as usize);
    }
    if close || r.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !is_head {
        out.extend_from_slice(r.body.as_bytes());
    }
    let bytes = out.len() as u64;
    ErrorWritten {
        ok: write_out(io, out).await,
        status: r.status,
        bytes,
    }
}

/// A refusal decided while authenticating an upgrade (already logged).
struct Refused {
    status: u16,
    reason: &'static str,
    message: String,
}

/// What authentication decided for an upgrade.
struct Accepted {
    accept: String,
    identity: crate::auth::Identity,
    features: Features,
    /// `X-ANPX-Instance`, empty when not sent.
    instance: String,
}

/// Authenticates a tunnel upgrade under `handshake_timeout` (408 past it)
/// and, on success, runs the tunnel. `slot` is held until the 101 is
/// queued, whatever the outcome.
#[allow(clippy::too_many_arguments)]
async fn accept_tunnel<S>(
    ctx: Rc<CoreCtx>,
    mut io: S,
    head: &RequestHead,
    head_buf: &Bytes,
    leftover: BytesMut,
    peer: SocketAddr,
    tls: bool,
    slot: UpgradeSlot,
    deadline: Option<Instant>,
) where
    S: AsyncReadRent + AsyncWriteRent + Splitable + Movable + 'static,
    S::OwnedRead: AsyncReadRent + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    let mut out = Vec::with_capacity(512);
    // No IO on `io` inside: dropping it at the deadline leaves the stream
    // usable for the 408.
    let checked = authenticate_upgrade(&ctx, head, head_buf, peer, tls);
    let decided = match deadline {
        Some(d) => {
            monoio::time::timeout(d.saturating_duration_since(Instant::now()), checked).await
        }
        None => Ok(checked.await),
    };
    let Accepted {
        accept,
        identity,
        features,
        instance,
    } = match decided {
        Ok(Ok(a)) => a,
        Ok(Err(r)) => {
            ctx.shared.obs.auth_failures.record(r.reason);
            refuse(&mut io, &mut out, r.status, r.reason, &r.message, None).await;
            return;
        }
        Err(_) => {
            ctx.shared.upgrades.note_timeout();
            ctx.shared.obs.auth_failures.record("handshake_timeout");
            tracing::warn!(%peer, reason = "handshake_timeout", "tunnel upgrade refused: not authenticated within handshake_timeout");
            let msg = "upgrade not authenticated in time";
            refuse(&mut io, &mut out, 408, "handshake_timeout", msg, None).await;
            return;
        }
    };
    let owner = TunnelOwner {
        identity: identity.name.clone(),
        instance,
    };
    // Tunnels are sharded by core: this one goes where its identity has the
    // fewest, so requests on every core find a local tunnel.
    let target = match ctx.shared.place_tunnel(&owner, ctx.index, S::MOVABLE) {
        Placement::Placed { core, others } => {
            if !others.is_empty() {
                second_instance(&ctx, &owner, &others, peer);
            }
            core
        }
        Placement::Refused { others } => {
            ctx.shared.obs.auth_failures.record("duplicate_instance");
            tracing::warn!(%peer, identity = %owner.identity, instance = %owner.instance, connected = ?others,
                reason = "duplicate_instance", "tunnel upgrade refused: another receiver instance holds this identity's tunnels (duplicate_tunnels = refuse)");
            let msg = "another receiver instance is connected for this identity";
            refuse(&mut io, &mut out, 409, "duplicate_instance", msg, None).await;
            return;
        }
    };
    let feat = features.to_header_value();
    let tunnels = ctx.shared.workers.to_string();
    let mut extra: Vec<(&str, &str)> = vec![(TUNNELS_HEADER, tunnels.as_str())];
    if !feat.is_empty() {
        extra.push((FEATURES_HEADER, feat.as_str()));
    }
    crate::ws::handshake::write_101(&mut out, &accept, &extra);
    if target != ctx.index {
        if let Ok(fd) = io.into_owned_fd() {
            let h = TunnelHandoff {
                fd,
                leftover,
                owner,
                features,
                peer,
                handshake: out,
            };
            ctx.shared
                .counters
                .tunnel_handoffs_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%peer, identity = %identity.name, from = ctx.index, to = target, "tunnel handed to another core");
            if ctx.shared.inboxes[target]
                .unbounded_send(CoreMsg::Tunnel(h))
                .is_err()
            {
                tracing::error!(%peer, "core inbox closed; tunnel dropped");
            }
        }
        return;
    }
    // run_tunnel queues the 101 before its first await.
    drop(slot);
    run_tunnel(ctx, io, leftover, owner, features, peer, out, tls).await;
}

/// A second receiver instance joined an identity under `share` or
/// `replace`: say so at warn level; `replace` closes the others' tunnels
/// on every core.
fn second_instance(ctx: &CoreCtx, owner: &TunnelOwner, others: &[String], peer: SocketAddr) {
    let policy = ctx.shared.config.gateway.duplicate_tunnels;
    tracing::warn!(%peer, identity = %owner.identity, instance = %owner.instance, connected = ?others, ?policy,
        "a second receiver instance opened a tunnel for this identity");
    if policy == DuplicateTunnels::Replace {
        for inbox in &ctx.shared.inboxes {
            let _ = inbox.unbounded_send(CoreMsg::Evict {
                identity: owner.identity.clone(),
                keep: owner.instance.clone(),
            });
        }
    }
}

/// The handshake checks and authentication of an upgrade, without IO on
/// the client's stream (a DID document fetch runs on its own thread).
async fn authenticate_upgrade(
    ctx: &CoreCtx,
    head: &RequestHead,
    head_buf: &Bytes,
    peer: SocketAddr,
    tls: bool,
) -> Result<Accepted, Refused> {
    let headers: Vec<(&str, &[u8])> = head
        .headers
        .iter()
        .map(|h| {
            (
                std::str::from_utf8(&head_buf[h.name.clone()]).unwrap_or(""),
                &head_buf[h.value.clone()],
            )
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    let method = head.method(head_buf);
    let accept = match crate::ws::handshake::server_accept_key(&headers, method) {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(%peer, error = %e, "tunnel upgrade refused: bad handshake");
            return Err(Refused {
                status: 400,
                reason: "bad_handshake",
                message: e.to_string(),
            });
        }
    };
    let req = UpgradeRequest {
        method,
        target: std::str::from_utf8(&head_buf[head.target.clone()]).unwrap_or(""),
        host: head
            .host
            .clone()
            .and_then(|r| std::str::from_utf8(&head_buf[r]).ok()),
        authorization: get("authorization"),
        peer,
        headers: &headers,
        tls,
    };
    let owns_routes = |name: &str| ctx.routes().prefixes_of(name).next().is_some();
    let identity = match ctx.shared.auth.authenticate(&req, &owns_routes).await {
        // A route registered since the last poll applies to a new tunnel
        // at once: read the registry, then decide again (a DID proof
        // refused for want of routes has not spent its nonce).
        Err(e) if e.is_no_routes() && ctx.refresh_routes().await => {
            ctx.shared.auth.authenticate(&req, &owns_routes).await
        }
        r => r,
    };
    let refused = |e: crate::auth::AuthError| {
        tracing::warn!(%peer, reason = e.reason(), error = %e, "tunnel upgrade refused");
        Refused {
            status: e.status(),
            reason: e.reason(),
            message: e.to_string(),
        }
    };
    let identity = identity.map_err(refused)?;
    let owned =
        owns_routes(&identity.name) || (ctx.refresh_routes().await && owns_routes(&identity.name));
    if !owned {
        return Err(refused(crate::auth::AuthError::NoRoutes(
            identity.name.to_string(),
        )));
    }
    let features = get(FEATURES_HEADER)
        .map(Features::parse)
        .unwrap_or_default()
        .intersect(Features::SUPPORTED);
    let instance = match get(INSTANCE_HEADER) {
        None => String::new(),
        Some(v) if valid_instance(v) => String::from_utf8_lossy(v).into_owned(),
        Some(_) => {
            tracing::warn!(%peer, reason = "bad_instance", "tunnel upgrade refused: invalid X-ANPX-Instance");
            return Err(Refused {
                status: 400,
                reason: "bad_instance",
                message: "X-ANPX-Instance must be 1 to 64 of A-Z a-z 0-9 . _ -".into(),
            });
        }
    };
    Ok(Accepted {
        accept,
        identity,
        features,
        instance,
    })
}

async fn refuse<S: AsyncWriteRent>(
    io: &mut S,
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    message: &str,
    retry_after: Option<u64>,
) {
    let body = serde_json::json!({ "error": reason, "message": message }).to_string();
    out.clear();
    http::headers::write_status_line(out, status, http::headers::reason_phrase(status));
    out.extend_from_slice(b"content-type: application/json\r\nconnection: close\r\n");
    push_header_num(out, "content-length", body.len());
    if let Some(s) = retry_after {
        push_header_num(out, "retry-after", s as usize);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    write_out(io, out).await;
    let _ = io.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_target_forms() {
        assert_eq!(split_target(b"/a/b?x=1&y"), (&b"/a/b"[..], &b"x=1&y"[..]));
        assert_eq!(split_target(b"/a"), (&b"/a"[..], &b""[..]));
        assert_eq!(split_target(b"http://h:1/p?q"), (&b"/p"[..], &b"q"[..]));
        assert_eq!(split_target(b"http://h:1"), (&b"/"[..], &b""[..]));
        assert_eq!(split_target(b"*"), (&b"*"[..], &b""[..]));
    }

    #[test]
    fn dot_segments() {
        assert!(has_dot_segment("/a/../b"));
        assert!(has_dot_segment("/a/./b"));
        assert!(has_dot_segment("/a/.."));
        assert!(!has_dot_segment("/a/..b/.c"));
    }
}
