//! The receiver's HTTP/1.1 client to the local app: a keep-alive
//! connection pool per core, request heads rebuilt from ANPX meta (exact
//! target and header list when negotiated), responses read whole
//! (Content-Length, chunked, or until close).
//!
//! Never hands a connection to the next request unless the last response
//! ended exactly where both sides agree it did ([`reusable`]) and nothing
//! has arrived on it since ([`pending`]): bytes an app writes past its
//! response must reach no client.

use std::cell::{Cell, RefCell};
use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

use super::app_conn::{AppStream, AppTarget};
use super::sink::ResponseSink;
use crate::http::headers::HopByHop;
use crate::http::{self, ChunkedDecoder, ChunkedStep, ResponseBody};
use crate::protocol::anpx::binmeta::{self, Builder};
use crate::protocol::anpx::{string_to_latin1, RequestMeta};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to upstream {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("TLS with upstream {addr} failed: {why}")]
    Tls { addr: String, why: String },
    #[error("upstream io: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before a complete response")]
    Closed,
    #[error("upstream sent an invalid response: {0}")]
    BadResponse(String),
    #[error("upstream response body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request cannot be sent upstream: {0}")]
    BadRequest(&'static str),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("request aborted before its body was complete")]
    Aborted,
    #[error("tunnel to the gateway is gone")]
    TunnelGone,
}

/// A response read buffer with less room than this before a head is read
/// is given [`READ_BUF`] (small responses use what is left of one).
const READ_MIN: usize = 16 * 1024;
/// A whole request body up to this size goes with its head in one write.
const ONE_WRITE_BODY: usize = 256 * 1024;
/// Room given for a head read: a 64 KiB response with its head fits in
/// one read, so it leaves as chunk 0 and a short final chunk sent
/// together, which the gateway writes to its client with one `writev`.
const READ_BUF: usize = 72 * 1024;
/// Response reads waiting at once on a core up to which each gets
/// [`READ_BUF`] of room, and read buffers kept for reuse. Past it (a slow
/// app with hundreds of calls waiting) a read gets [`READ_MIN`]: a call
/// waiting on the app holds 16 KiB, not 72 (a 64 KiB response then takes
/// two reads).
const FULL_READS: usize = 64;

pub struct Upstream {
    target: AppTarget,
    idle: RefCell<Vec<AppStream>>,
    max_idle: usize,
    /// Response read buffers, reused: one that comes back empty keeps its
    /// allocation, which `reserve` reclaims once the body pieces split
    /// from it have been written to the tunnel (no allocation per response
    /// in steady state). Taken oldest first: the one most likely to have
    /// had its pieces written.
    bufs: RefCell<std::collections::VecDeque<BytesMut>>,
    /// Request head buffers, reused.
    heads: RefCell<Vec<Vec<u8>>>,
    /// Response reads under way (`FULL_READS`).
    reading: Cell<usize>,
    limits: http::Limits,
}

/// One response read under way, counted in `Upstream::reading` while it
/// lives.
struct Reading<'a>(&'a Cell<usize>);

impl<'a> Reading<'a> {
    fn start(n: &'a Cell<usize>) -> Self {
        n.set(n.get() + 1);
        Reading(n)
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|b| http::headers::is_tchar(*b))
}

const PATH_SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'%');
const QUERY_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The request-target: the exact one when the gateway sent it, otherwise
/// rebuilt from the decoded path and query (plain ANPX v1).
fn request_target(meta: &RequestMeta) -> Result<Vec<u8>, UpstreamError> {
    Ok(match &meta.raw_target {
        Some(raw) => {
            string_to_latin1(raw).ok_or(UpstreamError::BadRequest("raw_target not latin-1"))?
        }
        None => {
            let mut t = percent_encoding::utf8_percent_encode(&meta.path, PATH_SET).to_string();
            for (i, (k, v)) in meta.query.iter().enumerate() {
                t.push(if i == 0 { '?' } else { '&' });
                t.extend(percent_encoding::utf8_percent_encode(k, QUERY_SET));
                t.push('=');
                t.extend(percent_encoding::utf8_percent_encode(v, QUERY_SET));
            }
            t.into_bytes()
        }
    })
}

/// A JSON meta (a gateway without `binmeta`) in the binary form the rest
/// of the receiver reads: the exact target and header list when sent
/// (their values Latin-1 code points, PROTOCOL.md §7.1), else the target
/// rebuilt and the flat map.
pub fn from_json_meta(meta: &RequestMeta) -> Result<binmeta::Request, UpstreamError> {
    let target = request_target(meta)?;
    let exact = meta.header_list.is_some();
    let list = meta.header_list.as_ref().unwrap_or(&meta.headers);
    let mut b = Builder::request(meta.method.as_bytes(), &target, 512);
    for (name, value) in list {
        match exact.then(|| string_to_latin1(value)).flatten() {
            Some(v) => b.field(name.as_bytes(), &v),
            None => b.field(name.as_bytes(), value.as_bytes()),
        }
    }
    Ok(b.finish_request())
}

/// Writes the upstream request head, straight from the meta's bytes.
/// Refused: a method that is not a token, a target with spaces or
/// controls. Dropped: hop-by-hop fields and those the client's
/// `Connection` names (a v1 gateway may leave them in; ours has removed
/// them already), names that are not tokens, values that could split the
/// head, a second Host. `Host` is the target's when the client sent none
/// or `upstream_host` rewrites it.
pub fn write_request_head(
    out: &mut Vec<u8>,
    meta: &binmeta::Request,
    body: BodyLen,
    app: &AppTarget,
) -> Result<(), UpstreamError> {
    let method = meta.method();
    if !is_token(method) {
        return Err(UpstreamError::BadRequest("method is not a token"));
    }
    let target = meta.target();
    if target.is_empty() || target.iter().any(|b| *b <= b' ' || *b == 0x7f) {
        return Err(UpstreamError::BadRequest(
            "request-target has spaces or controls",
        ));
    }
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let hop = HopByHop::of(meta.fields());
    let mut has_host = false;
    let mut had_cl = false;
    for (name, value) in meta.fields() {
        if hop.drops(name) || !is_token(name) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            had_cl = true;
            continue; // recomputed below from the body actually sent
        }
        if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"host") {
            if has_host || app.rewrite_host {
                continue;
            }
            has_host = true;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(app.host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body {
        BodyLen::Known(n) if n > 0 || had_cl || matches!(method, b"POST" | b"PUT" | b"PATCH") => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyLen::Known(_) => {}
        BodyLen::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

enum Read {
    Data,
    Eof,
}

async fn read_more<S: AsyncReadRent>(io: &mut S, buf: &mut BytesMut) -> io::Result<Read> {
    crate::net::room_for_read(buf, 8 * 1024, 64 * 1024);
    read_upto(io, buf, usize::MAX).await
}

/// One read of `max` bytes at most into `buf`'s spare room (reserved by
/// the caller), after what it holds.
async fn read_upto<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> io::Result<Read> {
    let b = std::mem::take(buf);
    let (res, b) = crate::net::read_append_upto(io, b, max).await;
    *buf = b;
    match res? {
        0 => Ok(Read::Eof),
        _ => Ok(Read::Data),
    }
}

impl Upstream {
    /// `max_head`, `max_headers`: the app's response heads
    /// (`receiver.max_response_head_size`, `max_response_headers`).
    pub fn new(target: AppTarget, max_idle: usize, max_head: usize, max_headers: usize) -> Self {
        Self {
            target,
            idle: RefCell::new(Vec::new()),
            max_idle,
            bufs: RefCell::new(std::collections::VecDeque::new()),
            heads: RefCell::new(Vec::new()),
            reading: Cell::new(0),
            limits: http::Limits {
                // The status line: bounded by the head's size.
                max_request_line: max_head,
                max_head,
                max_headers,
            },
        }
    }

    async fn connect(&self) -> Result<AppStream, UpstreamError> {
        self.target.addr.connect().await
    }

    /// A connection of its own for an upgraded stream (WebSocket
    /// pass-through, `receiver/passthrough.rs`): never pooled, never reused.
    pub async fn dedicated(&self) -> Result<AppStream, UpstreamError> {
        self.connect().await
    }

    /// Where the app is and which `Host` it is sent.
    pub fn target(&self) -> &AppTarget {
        &self.target
    }

    /// Calls the app and sends the response to `sink` as it is read. A
    /// pooled connection that turns out stale (closed before any response
    /// byte) is retried once on a fresh one, when the body can be replayed.
    /// `credit(n)` is called as request body bytes reach the app.
    pub async fn call(
        &self,
        meta: &binmeta::Request,
        body: ReqBody,
        sink: &mut ResponseSink,
        credit: &mut dyn FnMut(usize),
    ) -> Result<(), UpstreamError> {
        match body {
            ReqBody::Full(body) => self.call_whole(meta, body, sink).await,
            // Boxed: the rarer path's state stays out of every request's
            // future (spawned per request: moved, so copied, whole).
            ReqBody::Stream(rx) => Box::pin(self.call_streamed(meta, rx, sink, credit)).await,
        }
    }

    /// A request whose body is all here: replayable, so a pooled
    /// connection that turns out stale is retried once on a fresh one,
    /// unless the app may have run it (it ended after the whole request
    /// was written) and the method is not idempotent (RFC 9110 §9.2.2: a
    /// POST is never sent twice).
    async fn call_whole(
        &self,
        meta: &binmeta::Request,
        body: Bytes,
        sink: &mut ResponseSink,
    ) -> Result<(), UpstreamError> {
        let is_head = meta.method() == b"HEAD";
        let mut head = self.take_head();
        let r = write_request_head(&mut head, meta, BodyLen::Known(body.len()), &self.target);
        if let Err(e) = r {
            self.give_head(head);
            return Err(e);
        }
        let replay = idempotent(meta.method());
        let r = self
            .call_whole_with(&mut head, body, is_head, replay, sink)
            .await;
        self.give_head(head);
        r
    }

    /// A request head buffer, reused (no allocation per request).
    fn take_head(&self) -> Vec<u8> {
        self.heads
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(1024))
    }

    fn give_head(&self, mut head: Vec<u8>) {
        let mut heads = self.heads.borrow_mut();
        if heads.len() < self.max_idle.max(1) && head.capacity() <= 64 * 1024 {
            head.clear();
            heads.push(head);
        }
    }

    async fn call_whole_with(
        &self,
        head: &mut Vec<u8>,
        body: Bytes,
        is_head: bool,
        replay: bool,
        sink: &mut ResponseSink,
    ) -> Result<(), UpstreamError> {
        if let Some(mut conn) = self.take_idle() {
            match self.send_full(&mut conn, head, &body).await {
                Ok(early) => match self.read_response(conn, is_head, early, sink).await {
                    // Written whole, then closed without a byte: a stale
                    // keep-alive connection, or an app that ran the
                    // request and died. Only an idempotent one runs again.
                    Err(Attempt::Stale) if !replay => return Err(UpstreamError::Closed),
                    Err(Attempt::Stale) => {}
                    Err(Attempt::Failed(e)) => return Err(e),
                    Ok(()) => return Ok(()),
                },
                Err(Attempt::Stale) => {}
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        // Boxed: a keep-alive request rarely dials, and the dial's state
        // (a TLS handshake's) is larger than the rest of the call's.
        let mut conn = Box::pin(self.connect()).await?;
        let early = self
            .send_full(&mut conn, head, &body)
            .await
            .map_err(Attempt::into_error)?;
        self.read_response(conn, is_head, early, sink)
            .await
            .map_err(Attempt::into_error)
    }

    /// A request whose body streams in: one attempt (it cannot be
    /// replayed), Content-Length kept, else chunked to the app.
    async fn call_streamed(
        &self,
        meta: &binmeta::Request,
        rx: crate::pool::queue::Rx<ReqEvent>,
        sink: &mut ResponseSink,
        credit: &mut dyn FnMut(usize),
    ) -> Result<(), UpstreamError> {
        let len = declared_length(meta);
        let framing = match len {
            Some(n) => BodyLen::Known(n),
            None => BodyLen::Chunked,
        };
        let mut head = self.take_head();
        write_request_head(&mut head, meta, framing, &self.target)?;
        let mut conn = match self.take_idle() {
            Some(c) => c,
            None => Box::pin(self.connect()).await?,
        };
        let (r, head) = conn.write_all(head).await;
        self.give_head(head);
        r?;
        let early = send_streamed_body(&mut conn, rx, len, credit).await?;
        self.read_response(conn, meta.method() == b"HEAD", early, sink)
            .await
            .map_err(Attempt::into_error)
    }

    /// A pooled connection that is quiet: one with bytes or EOF already
    /// waiting was written to (or closed) by the app while idle, so it is
    /// dropped, never handed to this request.
    fn take_idle(&self) -> Option<AppStream> {
        let mut idle = self.idle.borrow_mut();
        while let Some(conn) = idle.pop() {
            match pending(&conn) {
                Pending::Nothing => return Some(conn),
                // On TLS these are records: a close_notify, a ticket.
                Pending::Data if conn.is_tls() => {
                    tracing::debug!("idle TLS upstream connection had records waiting; dropped")
                }
                Pending::Data => tracing::warn!(
                    upstream = %self.target.addr,
                    "app wrote to an idle keep-alive connection (bytes past its last response); connection dropped unread"
                ),
                Pending::Closed => {
                    tracing::debug!("idle upstream connection closed by the app; dropped")
                }
            }
        }
        None
    }

    /// Writes a whole request. `Ok(true)`: the app had already answered
    /// (or written something) before the body went out.
    async fn send_full(
        &self,
        conn: &mut AppStream,
        head: &mut Vec<u8>,
        body: &Bytes,
    ) -> Result<bool, Attempt> {
        // Head and body in one write (`net::write_joined`): an app that
        // answers on the head alone (many do once the body is in their
        // buffer) has the body already, so the exchange leaves no doubt and
        // the connection is reused (with two writes a 1 KiB POST to such an
        // app dialled anew every other request). The head comes back for a
        // retry.
        if body.len() <= ONE_WRITE_BODY {
            let r = crate::net::write_joined(conn, head, body.clone(), b"").await;
            return match r {
                Ok(()) => Ok(false),
                // An app that answered on the head and hung up unread can
                // fail a write this large when its socket fills: its answer
                // is relayed (`answered_first`), never replayed as if the
                // connection had been stale. Nothing waiting: stale.
                Err(e) => answered_first(conn, e).map_err(|_| Attempt::Stale),
            };
        }
        // A very large one (whole messages from a plain v1 gateway) as a
        // second write, after a look for an early answer.
        let (r, h) = conn.write_all(std::mem::take(head)).await;
        *head = h;
        r.map_err(|_| Attempt::Stale)?;
        let mut early = false;
        if !body.is_empty() {
            early = pending(conn) != Pending::Nothing;
            let (r, _) = conn.write_all(body.clone()).await;
            if let Err(e) = r {
                return answered_first(conn, e).map_err(Attempt::Failed);
            }
        }
        Ok(early)
    }

    /// Reads the app's response and passes it on as it arrives: the head
    /// at once (with whatever body is already buffered), then the body.
    /// `early`: the app wrote before the request was all sent.
    async fn read_response(
        &self,
        mut conn: AppStream,
        is_head: bool,
        early: bool,
        sink: &mut ResponseSink,
    ) -> Result<(), Attempt> {
        let failed = |e: UpstreamError| Attempt::Failed(e);
        let _reading = Reading::start(&self.reading);
        let mut buf = self.bufs.borrow_mut().pop_front().unwrap_or_default();
        if buf.capacity() - buf.len() < READ_MIN {
            let many = self.reading.get() > FULL_READS;
            crate::net::reserve_live(&mut buf, if many { READ_MIN } else { READ_BUF });
        }
        let (resp, interim) = self.read_head(&mut conn, &mut buf, is_head).await?;
        let head_bytes = &buf[..resp.head_len];
        let meta = response_meta(&resp, head_bytes);
        let mut facts = ReuseFacts {
            keep_alive: resp.keep_alive,
            head_request: is_head,
            interim,
            early,
            // RFC 9110 §8.6, RFC 9112 §6.1: never in a 204.
            framed_204: resp.status == 204
                && (resp.header(head_bytes, "content-length").is_some()
                    || resp.header(head_bytes, "transfer-encoding").is_some()),
        };
        buf.advance(resp.head_len);
        let io = (&mut conn, &mut buf);
        match resp.body {
            ResponseBody::None => sink.head(meta, Bytes::new(), true).await,
            ResponseBody::ContentLength(n) => relay_length(io, n as usize, meta, sink).await,
            ResponseBody::Chunked => relay_chunked(io, meta, sink).await,
            ResponseBody::UntilClose => {
                facts.keep_alive = false;
                relay_until_close(io, meta, sink).await
            }
        }
        .map_err(failed)?;
        if reusable(&facts, buf.len()) {
            let mut idle = self.idle.borrow_mut();
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
        let mut bufs = self.bufs.borrow_mut();
        if bufs.len() < self.max_idle.clamp(1, FULL_READS) {
            buf.clear();
            bufs.push_back(buf);
        }
        Ok(())
    }

    /// Reads up to the final response head (interim responses are read
    /// and dropped: not forwarded, DESIGN.md); whether one came.
    async fn read_head(
        &self,
        conn: &mut AppStream,
        buf: &mut BytesMut,
        is_head: bool,
    ) -> Result<(http::ResponseHead, bool), Attempt> {
        let failed = |e: UpstreamError| Attempt::Failed(e);
        let mut interim = false;
        // A connection is stale (the request may be replayed on a fresh
        // one) only if the app sent nothing at all, not even an interim.
        let mut heard = false;
        loop {
            match http::parse_response_head(buf, &self.limits, is_head) {
                // We never ask to upgrade (Upgrade is hop-by-hop, never
                // forwarded): what follows a 101 is not HTTP (RFC 9110 §15.2.2).
                Ok(Some(h)) if h.status == 101 => {
                    return Err(failed(UpstreamError::BadResponse(
                        "101 Switching Protocols to a request that asked for no upgrade".into(),
                    )))
                }
                Ok(Some(h)) if h.is_interim() => {
                    interim = true;
                    let _ = buf.split_to(h.head_len);
                    continue;
                }
                Ok(Some(h)) => return Ok((h, interim)),
                Ok(None) => {}
                Err(e) => return Err(failed(UpstreamError::BadResponse(e.to_string()))),
            }
            match read_more(conn, buf).await {
                Ok(Read::Data) => heard = true,
                Ok(Read::Eof) | Err(_) if !heard => return Err(Attempt::Stale),
                Ok(Read::Eof) => return Err(failed(UpstreamError::Closed)),
                Err(e) => return Err(failed(e.into())),
            }
        }
    }
}

/// Writes a streamed request body to the app as its pieces come: as they
/// are with a Content-Length (`len`), else chunked. Whether the app wrote
/// before it had the whole body (one non-blocking peek per piece); a
/// failed write is looked at once more (`answered_first`).
async fn send_streamed_body(
    conn: &mut AppStream,
    rx: crate::pool::queue::Rx<ReqEvent>,
    len: Option<usize>,
    credit: &mut dyn FnMut(usize),
) -> Result<bool, UpstreamError> {
    match write_streamed_body(conn, rx, len, credit).await {
        Err(UpstreamError::Io(e)) => answered_first(conn, e),
        r => r,
    }
}

async fn write_streamed_body(
    conn: &mut AppStream,
    mut rx: crate::pool::queue::Rx<ReqEvent>,
    len: Option<usize>,
    credit: &mut dyn FnMut(usize),
) -> Result<bool, UpstreamError> {
    let chunked = len.is_none();
    let mut sent = 0usize;
    let mut early = false;
    // The size line, formatted into a reused buffer (no allocation per
    // chunk).
    let mut line: Vec<u8> = Vec::with_capacity(24);
    loop {
        let d = match rx.recv().await {
            Some(ReqEvent::Data(d)) => d,
            Some(ReqEvent::End) => break,
            // The tunnel or the client went away mid-upload: dropping the
            // connection aborts the app's request.
            None => return Err(UpstreamError::Aborted),
        };
        let n = d.len();
        if n == 0 {
            continue;
        }
        early = early || pending(conn) != Pending::Nothing;
        sent += n;
        if len.is_some_and(|l| sent > l) {
            return Err(UpstreamError::BadRequest(
                "request body longer than its Content-Length",
            ));
        }
        if chunked {
            line.clear();
            http::write_chunk_header(&mut line, n);
            let (r, l) = conn.write_all(line).await;
            line = l;
            r?;
        }
        let (r, _) = conn.write_all(d).await;
        r?;
        if chunked {
            let (r, _) = conn.write_all(&b"\r\n"[..]).await;
            r?;
        }
        credit(n);
    }
    if chunked {
        early = early || pending(conn) != Pending::Nothing;
        let (r, _) = conn.write_all(http::LAST_CHUNK).await;
        r?;
    } else if len.is_some_and(|l| sent != l) {
        return Err(UpstreamError::BadRequest(
            "request body shorter than its Content-Length",
        ));
    }
    Ok(early)
}

/// A read of a body of unknown length (chunked, or until the close) is
/// given this much: an event stream keeps its buffer between events, and
/// a thousand of them waiting hold 64 MiB, not the 256 MiB reads of
/// BODY_READ would.
const UNKNOWN_READ: usize = 64 * 1024;

/// The next read of a response body, `left` bytes of it still to come
/// (None: not known), reading no more than the gateway's window has free:
/// what a client has not taken yet waits in the app's socket, not here.
/// Read further ahead, a client that reads slowly held a whole read
/// (BODY_READ) here besides its window: 300 slow readers of 1 MiB
/// responses (`make bench-slowread`) cost the receiver 397 KiB of RSS
/// each, 197 KiB now (21 KiB of live heap).
/// When the window is short, `buf` (emptied: its pieces went out) gives
/// its memory back before the wait. `Read::Eof`: the app closed.
async fn read_body_within<S: AsyncReadRent>(
    conn: &mut S,
    buf: &mut BytesMut,
    sink: &ResponseSink,
    left: Option<usize>,
) -> Result<Read, UpstreamError> {
    let want = left.unwrap_or(UNKNOWN_READ).clamp(1, BODY_READ);
    let room = match sink.room_now(want) {
        Some(room) => room,
        None => {
            if buf.is_empty() {
                *buf = BytesMut::new();
            }
            sink.room(want).await?
        }
    };
    let max = room.min(want);
    match left {
        Some(_) => reserve_for(buf, max),
        // Room only when little is left (as for a head): a stream of small
        // events reads into what its buffer still has.
        None => crate::net::room_for_read(buf, 8 * 1024, UNKNOWN_READ),
    }
    Ok(read_upto(conn, buf, max).await?)
}

/// A Content-Length body of `n` bytes, the buffered part with the head.
async fn relay_length<S: AsyncReadRent>(
    (conn, buf): (&mut S, &mut BytesMut),
    n: usize,
    meta: binmeta::Response,
    sink: &mut ResponseSink,
) -> Result<(), UpstreamError> {
    if buf.len() >= n {
        let body = buf.split_to(n).freeze();
        return sink.head(meta, body, true).await;
    }
    let mut left = n - buf.len();
    sink.head(meta, buf.split().freeze(), false).await?;
    while left > 0 {
        // Room for all that is left, up to BODY_READ and the window's
        // free bytes: fewer, larger reads (each piece a slice of this
        // buffer, never copied again).
        if let Read::Eof = read_body_within(conn, buf, sink, Some(left)).await? {
            return Err(UpstreamError::Closed);
        }
        let take = buf.len().min(left);
        left -= take;
        let piece = buf.split_to(take).freeze();
        if left == 0 {
            // The final-chunk flag rides on the last piece.
            return sink.data_last(piece).await;
        }
        sink.data(piece).await?;
    }
    sink.end().await
}

/// Most bytes one read of a response body is given room for.
const BODY_READ: usize = 256 * 1024;

/// Makes room in `buf` (emptied by the pieces split off it) for the next
/// read of a body with `left` bytes to come: all of them, up to
/// [`BODY_READ`], at least 8 KiB.
fn reserve_for(buf: &mut BytesMut, left: usize) {
    let want = left.clamp(8 * 1024, BODY_READ);
    if buf.capacity() - buf.len() < want {
        crate::net::reserve_live(buf, want);
    }
}

/// A chunked body, decoded; what is buffered goes with the head (a small
/// response is often whole).
async fn relay_chunked<S: AsyncReadRent>(
    (conn, buf): (&mut S, &mut BytesMut),
    meta: binmeta::Response,
    sink: &mut ResponseSink,
) -> Result<(), UpstreamError> {
    let bad = |e: http::ChunkedError| UpstreamError::BadResponse(e.to_string());
    let mut dec = ChunkedDecoder::new(64 * 1024);
    let mut first = BytesMut::new();
    let done = loop {
        match dec.decode(buf).map_err(bad)? {
            ChunkedStep::Data(d) => first.extend_from_slice(&d),
            ChunkedStep::Done => break true,
            ChunkedStep::NeedMore => break false,
        }
    };
    sink.head(meta, first.freeze(), done).await?;
    if done {
        return Ok(());
    }
    loop {
        match dec.decode(buf).map_err(bad)? {
            ChunkedStep::Data(d) => sink.data(d).await?,
            ChunkedStep::Done => return sink.end().await,
            ChunkedStep::NeedMore => {
                // Undecoded bytes stay in `buf`: it is given back only
                // when empty.
                if let Read::Eof = read_body_within(conn, buf, sink, None).await? {
                    return Err(UpstreamError::Closed);
                }
            }
        }
    }
}

/// A body delimited by the connection's close (HTTP/1.0 style).
async fn relay_until_close<S: AsyncReadRent>(
    (conn, buf): (&mut S, &mut BytesMut),
    meta: binmeta::Response,
    sink: &mut ResponseSink,
) -> Result<(), UpstreamError> {
    sink.head(meta, buf.split().freeze(), false).await?;
    loop {
        match read_body_within(conn, buf, sink, None).await? {
            Read::Data => sink.data(buf.split().freeze()).await?,
            Read::Eof => return sink.end().await,
        }
    }
}

/// What happened on one request/response exchange that bears on whether
/// its connection may carry another.
#[derive(Debug, Clone, Copy, Default)]
struct ReuseFacts {
    /// The response's own verdict (`ResponseHead::keep_alive`): false for
    /// `Connection: close`, HTTP/1.0 without keep-alive, a close-delimited
    /// body, Content-Length beside Transfer-Encoding.
    keep_alive: bool,
    /// The request was HEAD: the app decides whether it writes a body, and
    /// some do, late.
    head_request: bool,
    /// A 1xx came first: the app speaks a part of HTTP whose framing it
    /// may get wrong (an unsolicited 103, a 100 we never asked for).
    interim: bool,
    /// The app wrote before it had the whole request: it may read the
    /// rest of the body as its next request.
    early: bool,
    /// A 204 with Content-Length or Transfer-Encoding, which it must not
    /// have: the app thinks it is sending a body.
    framed_204: bool,
}

/// Whether a connection goes back to the pool: only when the exchange left
/// no doubt where the response ended. A connection not reused costs one
/// connect; one reused wrongly hands an app's stray bytes to an unrelated
/// client as its response. `leftover`: bytes already read past the
/// response.
fn reusable(f: &ReuseFacts, leftover: usize) -> bool {
    f.keep_alive && leftover == 0 && !f.head_request && !f.interim && !f.early && !f.framed_204
}

/// What is waiting on an idle (or half-used) upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Nothing,
    /// Bytes the app wrote that nobody asked for (yet).
    Data,
    /// EOF or an error: the app closed or reset it.
    Closed,
}

/// A write of the request body to the app failed. If the app had
/// answered first (its bytes wait on the connection), that answer is
/// read and relayed, `Ok(true)` (early: the connection is not reused):
/// an app that refuses an upload early (413, 401) often closes without
/// reading the rest, so the write fails, yet the client is owed the
/// refusal, not a 502. Otherwise the write's error.
fn answered_first(conn: &AppStream, e: std::io::Error) -> Result<bool, UpstreamError> {
    match pending(conn) {
        Pending::Data => Ok(true),
        Pending::Nothing | Pending::Closed => Err(e.into()),
    }
}

/// What is waiting on an idle or busy upstream connection
/// (`net::peek_byte`).
fn pending(conn: &AppStream) -> Pending {
    match crate::net::peek_byte(conn) {
        crate::net::Peek::Empty => Pending::Nothing,
        crate::net::Peek::Byte(_) => Pending::Data,
        // Closed, or not provably quiet (EINTR, ECONNRESET…).
        crate::net::Peek::Closed | crate::net::Peek::Interrupted | crate::net::Peek::Error => {
            Pending::Closed
        }
    }
}

/// A request body as the receiver gets it from the gateway.
pub enum ReqBody {
    Full(Bytes),
    Stream(crate::pool::queue::Rx<ReqEvent>),
}

pub enum ReqEvent {
    Data(Bytes),
    End,
}

// A streamed request body's pieces travel in a pooled queue (`pool::queue`).
crate::pooled_queue_item!(ReqEvent);

/// How the upstream request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Known(usize),
    Chunked,
}

/// The Content-Length the client declared, as forwarded in the meta.
fn declared_length(meta: &binmeta::Request) -> Option<usize> {
    let (_, v) = meta
        .fields()
        .find(|(n, _)| n.eq_ignore_ascii_case(b"content-length"))?;
    std::str::from_utf8(v).ok()?.trim().parse().ok()
}

/// Methods that may run twice with the effect of once (RFC 9110 §9.2.2).
fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"PUT" | b"DELETE" | b"OPTIONS" | b"TRACE"
    )
}

enum Attempt {
    /// The connection ended before any response byte: a retry is safe
    /// unless the request was written whole and is not idempotent.
    Stale,
    Failed(UpstreamError),
}

impl Attempt {
    fn into_error(self) -> UpstreamError {
        match self {
            Attempt::Stale => UpstreamError::Closed,
            Attempt::Failed(e) => e,
        }
    }
}

/// ANPX response meta, straight from the head's bytes: the header lines
/// in order, without the hop-by-hop fields and those the app's
/// `Connection` names.
pub(super) fn response_meta(resp: &http::ResponseHead, buf: &[u8]) -> binmeta::Response {
    let fields = || {
        resp.headers
            .iter()
            .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()]))
    };
    let hop = HopByHop::of(fields());
    let mut b = Builder::response(resp.status, &buf[resp.reason.clone()], buf.len() + 64);
    for (name, value) in fields() {
        // With both Content-Length and Transfer-Encoding the length is
        // wrong (RFC 9112 §6.3): it must not travel on.
        if hop.drops(name)
            || (resp.content_length_ignored && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        b.field(name, value);
    }
    b.finish_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP app at `up:1` (nothing is dialled), `Host` rewritten when
    /// `rewrite` is not empty.
    fn target(rewrite: &str) -> AppTarget {
        let url = super::super::app_conn::parse("http://up:1").unwrap();
        AppTarget::new(url, rewrite, None).unwrap()
    }

    fn meta(raw: Option<&str>) -> RequestMeta {
        RequestMeta {
            method: "GET".into(),
            path: "/a b/中".into(),
            headers: vec![("host".into(), "gw".into())],
            query: vec![("q".into(), "1 2".into()), ("q".into(), "&".into())],
            raw_target: raw.map(Into::into),
            header_list: None,
        }
    }

    #[test]
    fn plain_v1_target_is_reencoded() {
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            &from_json_meta(&meta(None)).unwrap(),
            BodyLen::Known(0),
            &target(""),
        )
        .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("GET /a%20b/%E4%B8%AD?q=1%202&q=%26 HTTP/1.1\r\n"),
            "{s}"
        );
        assert!(s.contains("host: gw\r\n"));
    }

    #[test]
    fn host_is_the_targets_when_missing_or_rewritten() {
        let head = |m: &RequestMeta, t: &AppTarget| {
            let mut out = Vec::new();
            let m = from_json_meta(m).unwrap();
            write_request_head(&mut out, &m, BodyLen::Known(0), t).unwrap();
            String::from_utf8(out).unwrap()
        };
        let mut bare = meta(None);
        bare.headers.clear();
        assert!(head(&bare, &target("")).contains("\r\nhost: up:1\r\n"));
        let s = head(&meta(None), &target("app.internal"));
        assert!(s.contains("\r\nhost: app.internal\r\n"), "{s}");
        assert!(!s.contains("host: gw"), "{s}");
        assert_eq!(s.matches("host:").count(), 1, "{s}");
    }

    #[test]
    fn request_head_drops_what_a_v1_gateways_connection_names() {
        // The reference gateway relays the client's fields as they came.
        let mut m = meta(None);
        m.headers = vec![
            ("host".into(), "gw".into()),
            ("connection".into(), "keep-alive, X-Hop".into()),
            ("x-hop".into(), "secret".into()),
            ("x-kept".into(), "yes".into()),
        ];
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            &from_json_meta(&m).unwrap(),
            BodyLen::Known(0),
            &target(""),
        )
        .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.ends_with("\r\nhost: gw\r\nx-kept: yes\r\n\r\n"), "{s}");
        assert!(!s.contains("secret") && !s.contains("connection"), "{s}");
    }

    #[test]
    fn response_meta_drops_what_the_apps_connection_names() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\n\
            x-other: 2\r\nconnection: keep-alive, X-OTHER\r\nX-Kept: yes\r\n\
            Content-Length: 0\r\n\r\n";
        let resp = http::parse_response_head(raw, &http::Limits::default(), false)
            .unwrap()
            .unwrap();
        let m = response_meta(&resp, raw);
        let names: Vec<&[u8]> = m.fields().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"X-Kept"[..], b"Content-Length"]);
        let json = m.to_json_meta(false);
        let flat: Vec<&str> = json.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(flat, ["x-kept", "content-length"]);
    }

    #[test]
    fn a_connection_is_reused_only_after_an_exchange_without_doubt() {
        let clean = ReuseFacts {
            keep_alive: true,
            ..ReuseFacts::default()
        };
        assert!(reusable(&clean, 0));
        assert!(!reusable(&clean, 1), "bytes past the response already read");
        for doubt in [
            ReuseFacts {
                keep_alive: false,
                ..clean
            },
            ReuseFacts {
                head_request: true,
                ..clean
            },
            ReuseFacts {
                interim: true,
                ..clean
            },
            ReuseFacts {
                early: true,
                ..clean
            },
            ReuseFacts {
                framed_204: true,
                ..clean
            },
        ] {
            assert!(!reusable(&doubt, 0), "{doubt:?}");
        }
    }

    #[monoio::test_all]
    async fn pending_tells_quiet_from_data_and_eof_without_consuming() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conn = AppStream::Tcp(monoio::net::TcpStream::connect(addr).await.unwrap());
        let (mut app, _) = listener.accept().unwrap();
        assert_eq!(pending(&conn), Pending::Nothing);
        // Loopback: once write(2) returns, the bytes are in our queue.
        app.write_all(b"late").unwrap();
        assert_eq!(pending(&conn), Pending::Data);
        assert_eq!(
            pending(&conn),
            Pending::Data,
            "a peek leaves the bytes queued"
        );
        let mut conn = conn;
        let mut buf = BytesMut::with_capacity(16);
        assert!(matches!(
            read_more(&mut conn, &mut buf).await,
            Ok(Read::Data)
        ));
        assert_eq!(&buf[..], b"late");
        assert_eq!(pending(&conn), Pending::Nothing);
        drop(app);
        assert_eq!(pending(&conn), Pending::Closed);
    }

    #[test]
    fn exact_target_wins_and_controls_are_refused() {
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            &from_json_meta(&meta(Some("/x?a=%20&a"))).unwrap(),
            BodyLen::Known(3),
            &target(""),
        )
        .unwrap();
        assert!(out.starts_with(b"GET /x?a=%20&a HTTP/1.1\r\n"));
        assert!(String::from_utf8_lossy(&out).contains("content-length: 3\r\n"));
        let mut out = Vec::new();
        assert!(write_request_head(
            &mut out,
            &from_json_meta(&meta(Some("/x y"))).unwrap(),
            BodyLen::Known(0),
            &target("")
        )
        .is_err());
    }
}

#[cfg(test)]
mod split_tests {
    use crate::http;

    #[test]
    fn response_head_prefixes_are_incomplete_not_errors() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi";
        let limits = http::Limits::default();
        for i in 0..full.len() - 2 {
            let r = http::parse_response_head(&full[..i], &limits, false);
            assert!(
                matches!(r, Ok(None) | Ok(Some(_))),
                "prefix {i}: {:?}",
                r.err()
            );
        }
    }
}

/// Reading a response body paced by the gateway's window.
#[cfg(test)]
mod window_tests {
    use super::*;
    use crate::protocol::stream::{SharedWindow, DEFAULT_WINDOW};
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    /// An app whose body never ends: every read is filled at once with
    /// `pattern`, repeated. Counts the bytes it handed out.
    struct Endless {
        pattern: Vec<u8>,
        at: usize,
        given: std::rc::Rc<Cell<usize>>,
    }

    impl AsyncReadRent for Endless {
        async fn read<T: monoio::buf::IoBufMut>(
            &mut self,
            mut buf: T,
        ) -> monoio::BufResult<usize, T> {
            let n = buf.bytes_total();
            for i in 0..n {
                let b = self.pattern[self.at];
                self.at = (self.at + 1) % self.pattern.len();
                // SAFETY: `n` bytes from `write_ptr` are the buffer's own.
                unsafe { buf.write_ptr().add(i).write(b) };
            }
            // SAFETY: the `n` bytes were written above.
            unsafe { buf.set_init(n) };
            self.given.set(self.given.get() + n);
            (Ok(n), buf)
        }

        async fn readv<T: monoio::buf::IoVecBufMut>(
            &mut self,
            buf: T,
        ) -> monoio::BufResult<usize, T> {
            (Err(io::ErrorKind::Unsupported.into()), buf)
        }
    }

    #[derive(Clone, Copy)]
    enum Framing {
        Length,
        Chunked,
    }

    /// A sink to a `stream` gateway under `window`, and its frames.
    fn stream_sink(window: &SharedWindow) -> (ResponseSink, crate::ws::conn::OutRx) {
        let (tx, rx) = crate::ws::queue::channel();
        let f = crate::protocol::features::Features {
            stream: true,
            binmeta: true,
            ..Default::default()
        };
        let id = "0000000000000001".into();
        let sink = ResponseSink::new(tx, id, f, window.clone(), 65536, 1 << 30);
        (sink, rx)
    }

    /// Relays an endless body framed as `framing` while the test credits
    /// the window step by step; after each step, the bytes read from the
    /// app are at most the window, what was credited, and `slack`.
    async fn read_paced_by_the_window(framing: Framing, slack: usize) {
        let window = SharedWindow::new(DEFAULT_WINDOW);
        let (mut sink, mut rx) = stream_sink(&window);
        let pattern = match framing {
            Framing::Length => vec![b'x'; 4096],
            Framing::Chunked => [&b"1000\r\n"[..], &[b'x'; 4096], b"\r\n"].concat(),
        };
        let given = std::rc::Rc::new(Cell::new(0));
        let mut app = Endless {
            pattern,
            at: 0,
            given: given.clone(),
        };
        let mut buf = BytesMut::new();
        let meta = Builder::response(200, b"OK", 16).finish_response();
        let io = (&mut app, &mut buf);
        let mut relay: std::pin::Pin<Box<dyn Future<Output = Result<(), UpstreamError>> + '_>> =
            match framing {
                Framing::Length => Box::pin(relay_length(io, 64 << 20, meta, &mut sink)),
                Framing::Chunked => Box::pin(relay_chunked(io, meta, &mut sink)),
            };
        let mut cx = Context::from_waker(Waker::noop());
        let mut sent = 0;
        for credit in [0, DEFAULT_WINDOW / 2, DEFAULT_WINDOW / 2, DEFAULT_WINDOW] {
            window.add(credit);
            sent += credit;
            // The app is always ready: the relay runs until the window stops it.
            assert!(relay.as_mut().poll(&mut cx).is_pending());
            let allowed = DEFAULT_WINDOW + sent + slack;
            assert!(
                given.get() <= allowed,
                "read {} bytes from the app with {allowed} allowed",
                given.get()
            );
            let mut framed = 0;
            while let Ok(m) = rx.try_recv() {
                framed += match m {
                    crate::ws::conn::Outgoing::Parts { body, .. } => body.len(),
                    other => panic!("not a body frame: {other:?}"),
                };
            }
            assert!(framed > 0, "the credit was used");
        }
    }

    /// A client that takes nothing keeps the rest of a large response in
    /// the app: the receiver reads no more of the body than the gateway's
    /// window lets it send, and each credit lets that much more through.
    /// (Before, a whole read of BODY_READ more was taken and held.)
    #[monoio::test]
    async fn a_response_body_is_read_no_faster_than_the_gateway_takes_it() {
        read_paced_by_the_window(Framing::Length, 0).await;
    }

    /// The same for a chunked body, whose chunk lines are read besides
    /// its data (8 bytes per 4 KiB chunk: at most 1 KiB more per window,
    /// and a chunk's worth read before its line is decoded).
    #[monoio::test]
    async fn a_chunked_response_body_is_read_no_faster_than_the_gateway_takes_it() {
        read_paced_by_the_window(Framing::Chunked, 8 * 1024).await;
    }

    /// A read that must wait for the window waits holding no buffer (a
    /// slow reader's request keeps no read buffer here), reads nothing
    /// from the app meanwhile, and once credit comes reads no more than it.
    #[monoio::test]
    async fn a_read_waiting_for_the_window_holds_no_buffer() {
        let window = SharedWindow::new(DEFAULT_WINDOW);
        let (sink, _rx) = stream_sink(&window);
        assert_eq!(window.take_now(DEFAULT_WINDOW), DEFAULT_WINDOW);
        let given = std::rc::Rc::new(Cell::new(0));
        let mut app = Endless {
            pattern: vec![b'x'; 4096],
            at: 0,
            given: given.clone(),
        };
        let mut buf = BytesMut::with_capacity(BODY_READ);
        let mut cx = Context::from_waker(Waker::noop());
        {
            let read = read_body_within(&mut app, &mut buf, &sink, Some(4 << 20));
            let mut read = std::pin::pin!(read);
            assert!(read.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(buf.capacity(), 0, "the buffer went back before the wait");
        assert_eq!(given.get(), 0, "nothing read past the window");
        window.add(DEFAULT_WINDOW / 2);
        let read = read_body_within(&mut app, &mut buf, &sink, Some(4 << 20));
        let mut read = std::pin::pin!(read);
        assert!(matches!(
            read.as_mut().poll(&mut cx),
            Poll::Ready(Ok(Read::Data))
        ));
        assert_eq!(given.get(), DEFAULT_WINDOW / 2, "as much as the credit");
    }
}
