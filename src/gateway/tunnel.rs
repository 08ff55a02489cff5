//! One receiver's tunnel on one core: its in-flight table, its writer
//! queue, and the reader task that pairs ANPX responses with waiting
//! requests by `request_id`. Many requests share a tunnel at once.
//!
//! With a `stream` peer (PROTOCOL.md §7) a request body goes up as it
//! arrives ([`Uploader`]) within a per-request credit window, and a response
//! is handed to the client connection as soon as its chunk 0 (the meta)
//! arrives; its body follows through a [`BodyStream`] whose consumer returns
//! credit as it writes to the client. A slow client therefore stalls only
//! its own request, and memory per request stays within one window.
//! With a plain v1 peer, messages are reassembled whole.
//!
//! A response that names an unknown request, or fails to decode, is
//! refused, logged and counted ([`FrameRefusals`]); nothing reaches the
//! wrong client. A refused frame that names a request in flight on this
//! tunnel (bad CRC, chunk out of order) fails that request with 502: its
//! response can no longer be whole. WebSocket-level abuse (unmasked,
//! oversized or endlessly fragmented frames, a ping flood) fails the whole
//! tunnel with the matching close code.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Splitable};

use super::core::{CoreCtx, CrossBody, ProxyRequest, ProxyResponse, ProxyResult};
use super::error::ProxyError;
use super::refusals::{FrameRefusal, FrameRefusals};
use super::routes::IdentityName;
use crate::protocol::anpx::{
    self, binmeta, FrameType, Message, MetaRef, Reassembler, ResponseMeta,
};
use crate::protocol::features::Features;
use crate::protocol::stream::{self, Incoming, SharedWindow, StreamEncoder, DEFAULT_WINDOW};
use crate::tunnel::demux::{Decision, Demux, Opener};
use crate::tunnel::engine::{self, Ended, FrameSink};
use crate::ws::conn::{OutTx, Outgoing};
use crate::ws::error::CLOSE_POLICY;

/// A response head, and how its body arrives.
#[derive(Debug)]
pub struct RespHead {
    pub meta: binmeta::Response,
    pub body: RespBody,
}

#[derive(Debug)]
pub enum RespBody {
    Full(Bytes),
    Stream(BodyStream),
}

/// One step of a streamed response body.
#[derive(Debug)]
pub enum BodyEvent {
    Data(Bytes),
    End,
    Failed(ProxyError),
}

/// The response's hand-over from the tunnel reader to the request that
/// waits for it: the head, then a streamed body's pieces, each through a
/// pooled queue (`pool::queue`: no allocation per request, where
/// `local_sync`'s oneshot and channel took one and about two).
type Head = Result<RespHead, ProxyError>;
type HeadTx = crate::pool::queue::Tx<Head>;
type HeadRx = crate::pool::queue::Rx<Head>;
type BodyTx = crate::pool::queue::Tx<BodyEvent>;
type BodyRx = crate::pool::queue::Rx<BodyEvent>;
crate::pooled_queue_item!(Result<RespHead, ProxyError>);
crate::pooled_queue_item!(BodyEvent);

struct Entry {
    /// Until the head is delivered.
    head: Option<HeadTx>,
    /// While a streamed body is delivered.
    body: Option<BodyTx>,
    /// Upload window: credit the receiver returned for the request body.
    upload: SharedWindow,
    /// An upgraded stream (`gateway/passthrough.rs`) whose client-to-app
    /// direction is still open: the entry outlives the response's last
    /// chunk (a half-close) so the upload's credit still finds it.
    upload_open: bool,
}

pub struct Tunnel {
    pub id: u64,
    pub identity: IdentityName,
    /// The receiver instance that opened it (`X-ANPX-Instance`).
    pub instance: String,
    pub features: Features,
    out: OutTx,
    /// Requests in flight, with where their response stands (chunk order,
    /// window): `crate::tunnel::demux`.
    inflight: RefCell<Demux<u64, Entry>>,
    closed: Cell<bool>,
    /// Requests it carried since the core's last scale tick, and the ticks
    /// in a row it carried too few to keep (`scale`, `core::scale_tick`).
    pub carried: Cell<u32>,
    pub quiet_ticks: Cell<u32>,
}

pub use crate::protocol::request_id::{format_request_id, parse_request_id};

/// The sending half of a request in flight: streams the body up.
pub struct Uploader {
    tunnel: Rc<Tunnel>,
    id: u64,
    rid: [u8; 16],
    enc: StreamEncoder,
    window: SharedWindow,
    wait: Duration,
    done: bool,
    /// An upgraded stream's upload: its last piece may end the entry.
    duplex: bool,
}

/// The receiving half: waits for the response head.
pub struct Waiter {
    tunnel: Rc<Tunnel>,
    id: u64,
    rx: Option<HeadRx>,
}

impl Tunnel {
    fn admit(&self, ctx: &CoreCtx) -> Result<(u64, HeadRx, SharedWindow), ProxyError> {
        if self.closed.get() {
            return Err(ProxyError::TunnelClosed);
        }
        let limit = ctx.settings.max_inflight_per_tunnel;
        if self.inflight.borrow().len() >= limit {
            return Err(ProxyError::TunnelBusy(limit));
        }
        let id = ctx.next_request_id();
        self.carried.set(self.carried.get().saturating_add(1));
        let (tx, rx) = crate::pool::queue::channel();
        let upload = SharedWindow::new(DEFAULT_WINDOW);
        self.inflight.borrow_mut().expect(
            id,
            Entry {
                head: Some(tx),
                body: None,
                upload: upload.clone(),
                upload_open: false,
            },
        );
        Ok((id, rx, upload))
    }

    /// A response for `request_id`, not in flight, answers a request this
    /// tunnel issued and ended (`Demux::ended`): late, not a peer's fault.
    fn ended_here(&self, request_id: &str) -> bool {
        parse_request_id(request_id).is_some_and(|id| self.inflight.borrow().ended(&id))
    }

    /// Starts a request. With `complete` the whole body is `first` and the
    /// message goes at once; otherwise (only for `stream` peers) chunk 0
    /// goes now and the [`Uploader`] sends the rest.
    pub fn start(
        self: &Rc<Self>,
        ctx: &CoreCtx,
        meta: binmeta::Request,
        first: Bytes,
        complete: bool,
    ) -> Result<(Uploader, Waiter), ProxyError> {
        debug_assert!(complete || self.features.stream);
        let (id, rx, window) = self.admit(ctx)?;
        let mut rid = [0u8; 16];
        // Our own peers take the meta as built; others get JSON with
        // only the keys they negotiated.
        let json;
        let meta = if self.features.binmeta {
            meta.as_bytes()
        } else {
            json = super::forward::request_json(&meta, self.features.exact);
            &json[..]
        };
        let mut enc = StreamEncoder::with_crc(FrameType::Request, self.features.body_crc());
        format_request_id(id, &mut rid);
        // On the stack: no allocation per request for the id.
        let rids = std::str::from_utf8(&rid).unwrap_or_default();
        let sent = if complete {
            let mut sent = true;
            anpx::encode_message_with(
                FrameType::Request,
                rids,
                Some(MetaRef::Request(meta)),
                &first,
                ctx.settings.chunk_size,
                self.features.body_crc(),
                |f| sent = sent && self.out.send(Outgoing::Binary(f)).is_ok(),
            );
            sent
        } else {
            // The first piece was taken within one window by the caller.
            let (head, split) = enc.head_parts(rids, MetaRef::Request(meta), &first, false);
            window.take_now(first.len());
            self.out
                .send(Outgoing::Parts {
                    head,
                    split,
                    body: first,
                })
                .is_ok()
        };
        if !sent {
            // Taken out, then dropped: no borrow is held while an entry's
            // channels wake their tasks (crate::sync explains the class).
            let gone = self.inflight.borrow_mut().remove(&id);
            drop(gone);
            return Err(ProxyError::TunnelClosed);
        }
        Ok((
            Uploader {
                tunnel: self.clone(),
                id,
                rid,
                enc,
                window,
                wait: ctx.settings.timeout,
                done: complete,
                duplex: false,
            },
            Waiter {
                tunnel: self.clone(),
                id,
                rx: Some(rx),
            },
        ))
    }

    /// Starts an upgrade request (WebSocket pass-through, PROTOCOL.md
    /// §7.6): chunk 0 with the meta and no body, the message left open.
    /// Its body is the client-to-app byte stream; the entry lives until
    /// both directions have ended (or one fails). `wait`: how long an
    /// upload piece may wait for credit.
    pub fn start_duplex(
        self: &Rc<Self>,
        ctx: &CoreCtx,
        meta: binmeta::Request,
        wait: Duration,
    ) -> Result<(Uploader, Waiter), ProxyError> {
        debug_assert!(self.features.upgrade);
        let (mut up, waiter) = self.start(ctx, meta, Bytes::new(), false)?;
        if let Some(e) = self.inflight.borrow_mut().get_mut(&up.id) {
            e.upload_open = true;
        }
        up.duplex = true;
        up.wait = wait;
        Ok((up, waiter))
    }

    /// The client-to-app direction of an upgraded stream ended: the entry
    /// goes once the response has ended too.
    fn upload_done(&self, id: u64) {
        let mut map = self.inflight.borrow_mut();
        let finished = match map.get_mut(&id) {
            Some(e) => {
                e.upload_open = false;
                e.head.is_none() && e.body.is_none()
            }
            None => false,
        };
        let gone = if finished { map.remove(&id) } else { None };
        drop(map);
        drop(gone);
    }

    /// Sends a whole request and waits for its response head (the cross-
    /// core path, and a plain v1 peer); the body follows as
    /// [`cross_response`] says.
    pub async fn call(self: &Rc<Self>, ctx: &CoreCtx, req: ProxyRequest) -> ProxyResult {
        let (_up, mut waiter) = self.start(ctx, req.meta, req.body, true)?;
        self.head_across(ctx, &mut waiter, std::future::ready(Ok(())))
            .await
    }

    /// The response head of `waiter`'s request, as it crosses back
    /// ([`cross_response`]), while `upload` sends the rest of its body (or
    /// nothing); a head that comes first ends the upload. Dropped before
    /// the head arrives (its client left, `conn.rs`, or the core that
    /// handed it over stopped waiting, `core.rs`), or failed by the
    /// upload, the request is aborted at the receiver, as
    /// `Waiter::abandon` does; after the head, `BodyStream`'s drop does
    /// the same.
    async fn head_across(
        &self,
        ctx: &CoreCtx,
        waiter: &mut Waiter,
        upload: impl std::future::Future<Output = Result<(), ProxyError>>,
    ) -> ProxyResult {
        let request_id = waiter.id;
        let abandon = CancelOnDrop {
            tunnel: self,
            id: request_id,
        };
        let early = monoio::select! {
            r = upload => {
                r?;
                None
            },
            h = waiter.head() => Some(h),
        };
        let head = match early {
            Some(h) => h,
            None => waiter.wait(ctx.settings.timeout).await,
        };
        abandon.disarm();
        Ok(cross_response(head?, request_id))
    }

    /// A request handed over from another core whose body is still on
    /// its way from the client there: `req.body` is chunk 0's piece and
    /// `rest` brings the others as the client sends them, so an upload
    /// crossing cores is streamed as on its own core, never gathered whole
    /// (up to `max_body_size` held per request, and the app seeing nothing
    /// until the client's last byte). As there, an answer that comes
    /// before the body's end ends the upload. A plain v1 peer takes a
    /// message only whole: it is gathered here, as the client's core would.
    pub async fn call_streamed(
        self: &Rc<Self>,
        ctx: &CoreCtx,
        req: ProxyRequest,
        mut rest: CrossUpload,
    ) -> ProxyResult {
        if !self.features.stream {
            let req = gather_rest(req, &mut rest).await?;
            return self.call(ctx, req).await;
        }
        let (mut up, mut waiter) = self.start(ctx, req.meta, req.body, false)?;
        let upload = upload_rest(&mut up, &mut rest);
        self.head_across(ctx, &mut waiter, upload).await
    }

    /// An upgrade handed over from another core whose client's TLS
    /// session cannot move (a plain TCP one moves instead,
    /// `passthrough::hand_off`): the request goes as `start_duplex` sends
    /// it, the app's answer goes back as any response crossing cores
    /// does (a 101's bytes streamed, `forward_body`), and the client's
    /// bytes follow through `up` for as long as the stream lasts (each
    /// piece waiting for credit at most `wait`). Its end (the client's
    /// EOF) is the upload's last piece; a channel closed without it ends
    /// the stream at the receiver.
    pub async fn call_duplex(
        self: &Rc<Self>,
        ctx: &CoreCtx,
        req: ProxyRequest,
        mut up: CrossUpload,
        wait: Duration,
    ) -> ProxyResult {
        if !self.features.upgrade {
            // A plain v1 (or older) receiver: it cannot carry the stream.
            return Err(ProxyError::upgrade_refused(
                &ctx.settings.tunnel_path,
                false,
            ));
        }
        let (mut sending, mut waiter) = self.start_duplex(ctx, req.meta, wait)?;
        let resp = self
            .head_across(ctx, &mut waiter, std::future::ready(Ok(())))
            .await?;
        // The stream is open (or the app answered otherwise): the
        // client's bytes go up as they come, for as long as it lasts.
        monoio::spawn(async move {
            if let Err(e) = upload_rest(&mut sending, &mut up).await {
                sending.abort(&e.to_string());
            }
        });
        Ok(resp)
    }

    /// Forgets a request; tells a `cancel` peer the client went away.
    fn cancel(&self, id: u64, why: &str) {
        let gone = self.inflight.borrow_mut().remove(&id);
        if gone.is_some() && self.features.cancel && !self.closed.get() {
            let mut rid = [0u8; 16];
            let f = anpx::encode_error(format_request_id(id, &mut rid), why);
            let _ = self.out.send(Outgoing::Binary(f));
        }
    }

    fn send_credit(&self, id: u64, n: usize) {
        self.inflight.borrow_mut().credited(&id, n);
        let mut rid = [0u8; 16];
        let m = stream::credit_message(format_request_id(id, &mut rid), n);
        let _ = self.out.send(Outgoing::Text(m));
    }

    /// Requests in flight here (a drain waits for none).
    pub fn inflight_len(&self) -> usize {
        self.inflight.borrow().len()
    }

    /// Drain: admit nothing more and close the WebSocket with 1001 (going
    /// away), so the receiver reconnects, to a successor gateway if one
    /// listens on the port; `reason` says over how long (PROTOCOL.md §7.3).
    pub fn going_away(&self, reason: &str) {
        self.closed.set(true);
        let _ = self.out.send(Outgoing::Close(1001, reason.into()));
    }

    /// `scale`: asks the receiver to keep `want` tunnels (PROTOCOL.md §7.8).
    pub fn ask_for_tunnels(&self, want: usize) {
        let _ = self
            .out
            .send(Outgoing::Text(crate::protocol::control::tunnels_message(
                want,
            )));
    }

    /// `scale`: the tunnel was let go and nothing is in flight on it any
    /// more: close it with `CLOSE_RELEASED` (4002), so its receiver ends
    /// the slot instead of redialling (PROTOCOL.md §7.8).
    pub fn release(&self) {
        self.closed.set(true);
        let _ = self.out.send(Outgoing::Close(
            crate::protocol::features::CLOSE_RELEASED,
            "released: load no longer needs this tunnel".into(),
        ));
    }

    /// `duplicate_tunnels = "replace"`: another instance of this identity
    /// took over; close with `CLOSE_REPLACED` (4001) after what is queued.
    pub fn evict(&self) {
        self.closed.set(true);
        tracing::warn!(identity = %self.identity, instance = %self.instance, tunnel = self.id,
            "tunnel closed: replaced by another receiver instance (duplicate_tunnels = replace)");
        let _ = self.out.send(Outgoing::Close(
            crate::protocol::features::CLOSE_REPLACED,
            "replaced by another receiver instance".into(),
        ));
    }

    /// The identity and instance it was counted under.
    pub fn owner(&self) -> super::core::TunnelOwner {
        super::core::TunnelOwner {
            identity: self.identity.clone(),
            instance: self.instance.clone(),
            scale: self.features.scale,
        }
    }

    fn close(&self) {
        self.closed.set(true);
        // Dropping the senders fails every waiting request with 502;
        // closing the windows wakes blocked uploads. Taken out first: no
        // borrow is held while they wake their tasks (crate::sync).
        let gone: Vec<(u64, Entry)> = self.inflight.borrow_mut().drain();
        for (_, e) in gone {
            e.upload.close();
            if let Some(tx) = e.body {
                tx.send(BodyEvent::Failed(ProxyError::TunnelClosed));
            }
        }
    }
}

impl Uploader {
    /// Sends the next body piece once the window allows it.
    pub async fn send(&mut self, piece: Bytes, last: bool) -> Result<(), ProxyError> {
        debug_assert!(!self.done);
        let n = piece.len().min(DEFAULT_WINDOW);
        if n > 0 {
            match monoio::time::timeout(self.wait, self.window.take(n)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ProxyError::TunnelClosed),
                Err(_) => return Err(ProxyError::Timeout),
            }
        }
        let rid = std::str::from_utf8(&self.rid).unwrap_or_default();
        // The piece (a slice of the client connection's read buffer) goes
        // to the writer as it is: no copy on the way to the socket.
        let (head, split) = self.enc.body_parts(rid, &piece, last);
        let f = Outgoing::Parts {
            head,
            split,
            body: piece,
        };
        if self.tunnel.closed.get() || self.tunnel.out.send(f).is_err() {
            return Err(ProxyError::TunnelClosed);
        }
        self.done = last;
        if last && self.duplex {
            self.tunnel.upload_done(self.id);
        }
        Ok(())
    }

    /// The client failed mid-upload: abort the request at the receiver.
    pub fn abort(mut self, why: &str) {
        self.done = true;
        self.tunnel.cancel(self.id, why);
    }
}

impl Waiter {
    /// The request's id (16 hex digits on the wire).
    pub fn request_id(&self) -> u64 {
        self.id
    }

    /// The client left before the response head: forget the request and
    /// abort it at the receiver (`cancel` peers), so no work goes on for
    /// nobody (`gateway/conn.rs::wait_head`).
    pub fn abandon(&self) {
        self.tunnel.cancel(self.id, "client went away");
    }

    /// Waits for the response head, at most `timeout`; past it the
    /// request is cancelled at the receiver.
    pub async fn wait(&mut self, timeout: Duration) -> Result<RespHead, ProxyError> {
        match monoio::time::timeout(timeout, self.head()).await {
            Ok(r) => r,
            Err(_) => Err(self.time_out()),
        }
    }

    /// `timeout` passed without the head: the request is cancelled at the
    /// receiver; the error to answer with.
    pub fn time_out(&self) -> ProxyError {
        self.tunnel.cancel(self.id, "gateway timeout");
        ProxyError::Timeout
    }

    /// The response head, however long it takes: raced against the
    /// upload of the request body (`conn.rs::stream_request`), which has
    /// its own bounds, or bounded by the caller (`wait`,
    /// `conn.rs::wait_head`). Dropped before the head comes, the request
    /// is still in flight.
    pub async fn head(&mut self) -> Result<RespHead, ProxyError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(ProxyError::TunnelClosed);
        };
        let r = rx.recv().await.unwrap_or(Err(ProxyError::TunnelClosed));
        self.rx = None;
        r
    }
}

/// A streamed response body on its way to the client.
pub struct BodyStream {
    src: BodySrc,
    consumed: usize,
    finished: bool,
}

/// Where a streamed body's pieces come from.
enum BodySrc {
    /// This core's tunnel: credit goes back on it, and a body dropped
    /// unfinished is cancelled there.
    Tunnel {
        rx: BodyRx,
        tunnel: Rc<Tunnel>,
        id: u64,
    },
    /// A tunnel on another core, through [`forward_body`]'s channel: its
    /// bound is the backpressure, and dropping it cancels over there.
    Remote(CrossPieces),
}

/// The pieces of a body streamed from another core (`CrossBody::Stream`).
pub type CrossPieces = futures_channel::mpsc::Receiver<BodyEvent>;

/// Pieces in the channel between two cores at once: with the tunnel's
/// credit window (returned as pieces enter it) what a body crossing cores
/// holds in memory stays bounded, and the client's pace reaches the app.
const CROSS_PIECES: usize = 4;

impl std::fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = match &self.src {
            BodySrc::Tunnel { id, .. } => Some(*id),
            BodySrc::Remote(_) => None,
        };
        f.debug_struct("BodyStream")
            .field("id", &id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl BodyStream {
    /// A body streamed from a tunnel on another core.
    pub fn remote(pieces: CrossPieces) -> Self {
        BodyStream {
            src: BodySrc::Remote(pieces),
            consumed: 0,
            finished: false,
        }
    }

    pub async fn next(&mut self) -> BodyEvent {
        let ev = match &mut self.src {
            BodySrc::Tunnel { rx, .. } => rx.recv().await,
            BodySrc::Remote(rx) => futures_util::StreamExt::next(rx).await,
        }
        .unwrap_or(BodyEvent::Failed(ProxyError::TunnelClosed));
        if !matches!(ev, BodyEvent::Data(_)) {
            self.finished = true;
        }
        ev
    }

    /// `n` bytes reached the client: return credit in batches of a
    /// quarter window (one control message per 64 KiB).
    pub fn consumed(&mut self, n: usize) {
        let BodySrc::Tunnel { tunnel, id, .. } = &self.src else {
            return;
        };
        self.consumed += n;
        if self.consumed >= DEFAULT_WINDOW / 4 && !self.finished {
            tunnel.send_credit(*id, self.consumed);
            self.consumed = 0;
        }
    }
}

/// Moves a streamed body, piece by piece, from this core's tunnel to the
/// core whose client asked for it (`Tunnel::call` across cores). A piece's
/// credit goes back once it is in the channel, so the channel's bound and
/// the tunnel's window are all that is held; when the client's core drops
/// its end, the next piece fails to go and `s`, dropped unfinished,
/// cancels the request at the receiver.
async fn forward_body(mut s: BodyStream, mut tx: futures_channel::mpsc::Sender<BodyEvent>) {
    loop {
        let ev = s.next().await;
        let (n, last) = match &ev {
            BodyEvent::Data(d) => (d.len(), false),
            _ => (0, true),
        };
        // Once there is room in the channel (the client's core has taken
        // what was in it); an error once that core dropped its end.
        if futures_util::SinkExt::send(&mut tx, ev).await.is_err() || last {
            return;
        }
        s.consumed(n);
    }
}

/// A response head as it crosses to the core whose client asked: a whole
/// body as it is; a streamed one (only a request from another core is
/// called so on a `stream` tunnel: this core streams its own, `conn.rs`)
/// goes there piece by piece, never gathered here (an SSE stream would
/// reach its client only at its end, a download past `max_body_size` not
/// at all).
fn cross_response(head: RespHead, request_id: u64) -> ProxyResponse {
    let body = match head.body {
        RespBody::Full(body) => CrossBody::Full(body),
        RespBody::Stream(s) => {
            let (tx, rx) = futures_channel::mpsc::channel(CROSS_PIECES);
            monoio::spawn(forward_body(s, tx));
            CrossBody::Stream(rx)
        }
    };
    ProxyResponse {
        meta: head.meta,
        body,
        request_id,
    }
}

/// One piece of a request body on its way from the client's core to the
/// tunnel's ([`Tunnel::call_streamed`]); `last` marks the body's end, so
/// a channel that closes without it means the client failed mid-body.
#[derive(Debug)]
pub struct UpPiece {
    pub data: Bytes,
    pub last: bool,
}

/// Where a request body's pieces (or an upgraded stream's client-to-app
/// bytes) go: the tunnel on this core, or the channel to the core that has
/// one (`Tunnel::call_streamed`, `Tunnel::call_duplex`).
pub enum Upload {
    Here(Uploader),
    Across(CrossUploadTx),
}

impl Upload {
    /// The next piece, `last` marking the end, once there is room
    /// (credit here; room in the channel, which the credit drains, across).
    pub async fn send(&mut self, piece: Bytes, last: bool) -> Result<(), ProxyError> {
        match self {
            Upload::Here(up) => up.send(piece, last).await,
            Upload::Across(tx) => futures_util::SinkExt::send(tx, UpPiece { data: piece, last })
                .await
                .map_err(|_| ProxyError::TunnelClosed),
        }
    }

    /// Ends the request at the receiver (nothing once it ended there).
    /// Across cores, the channel dropped without its last piece does it.
    pub fn abort(self, why: &str) {
        if let Upload::Here(up) = self {
            up.abort(why);
        }
    }
}

/// The rest of a request body crossing cores, and its sending end.
pub type CrossUpload = futures_channel::mpsc::Receiver<UpPiece>;
pub type CrossUploadTx = futures_channel::mpsc::Sender<UpPiece>;

/// A channel for a body crossing cores, bounded as a response's is
/// (`CROSS_PIECES`): the tunnel's credit reaches the client's reads.
pub fn cross_upload() -> (CrossUploadTx, CrossUpload) {
    futures_channel::mpsc::channel(CROSS_PIECES)
}

/// Sends the pieces of a crossing body up as they come, the last one
/// marked; the channel closed before it is a client gone mid-body.
async fn upload_rest(up: &mut Uploader, rest: &mut CrossUpload) -> Result<(), ProxyError> {
    use futures_util::StreamExt;
    while let Some(p) = rest.next().await {
        up.send(p.data, p.last).await?;
        if p.last {
            return Ok(());
        }
    }
    Err(ProxyError::ClientGone("mid-body"))
}

/// The rest of a crossing body gathered for a plain v1 peer, which takes a
/// message only whole (as the client's core gathers one for a v1 tunnel of
/// its own). A chunked body gets its length now that it is known.
async fn gather_rest(
    req: ProxyRequest,
    rest: &mut CrossUpload,
) -> Result<ProxyRequest, ProxyError> {
    use futures_util::StreamExt;
    // A copy, on the rare path only: a crossing upload to a plain v1 peer.
    let mut body = BytesMut::from(&req.body[..]);
    loop {
        match rest.next().await {
            Some(p) => {
                body.extend_from_slice(&p.data);
                if p.last {
                    break;
                }
            }
            None => return Err(ProxyError::ClientGone("mid-body")),
        }
    }
    let sized = req
        .meta
        .fields()
        .any(|(n, _)| n.eq_ignore_ascii_case(b"content-length"));
    let meta = match sized {
        true => req.meta,
        false => req.meta.with_field(
            b"content-length",
            itoa::Buffer::new().format(body.len()).as_bytes(),
        ),
    };
    Ok(ProxyRequest {
        meta,
        body: body.freeze(),
    })
}

/// Cancels request `id` at the receiver when dropped, unless disarmed.
struct CancelOnDrop<'a> {
    tunnel: &'a Tunnel,
    id: u64,
}

impl CancelOnDrop<'_> {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.tunnel.cancel(self.id, "client went away");
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        if let BodySrc::Tunnel { tunnel, id, .. } = &self.src {
            if !self.finished {
                // The client went away (or the write failed) mid-body.
                tunnel.cancel(*id, "client went away");
            }
        }
    }
}

/// Runs an accepted tunnel on the engine (`crate::tunnel`) until it ends:
/// registered on this core before its 101 leaves, unregistered with its
/// in-flight requests failed (502) as soon as it ends.
#[allow(clippy::too_many_arguments)]
pub async fn run_tunnel<S>(
    ctx: Rc<CoreCtx>,
    io: S,
    leftover: BytesMut,
    owner: super::core::TunnelOwner,
    features: Features,
    peer: SocketAddr,
    handshake: Vec<u8>,
    tls: bool,
) where
    S: Splitable + 'static,
    S::OwnedRead: AsyncReadRent + crate::net::Readable + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    let (out, rx) = engine::queue();
    let identity = owner.identity;
    let tunnel = Rc::new(Tunnel {
        id: ctx.next_tunnel_id(),
        identity: identity.clone(),
        instance: owner.instance,
        features,
        out: out.clone(),
        inflight: RefCell::new(Demux::new(Opener::Us, MAX_UNACKED)),
        closed: Cell::new(false),
        carried: Cell::new(0),
        quiet_ticks: Cell::new(0),
    });
    // Registered before the 101 leaves: once the receiver sees it, every
    // core can route through this tunnel.
    ctx.register_tunnel(tunnel.clone());
    let _ = out.send(Outgoing::Raw(handshake));
    tracing::info!(identity = %identity, instance = %tunnel.instance, %peer, core = ctx.index, tunnel = tunnel.id,
        features = %features.to_header_value(), "tunnel connected");
    let mut cfg = ctx.settings.tunnel.clone();
    cfg.vectored = !tls;
    let mut sink = GatewayFrames {
        tunnel: tunnel.clone(),
        reasm: Reassembler::new(anpx::Limits {
            max_message_size: ctx.settings.max_body_size + 64 * 1024,
            max_assemblies: ctx.settings.max_inflight_per_tunnel,
        }),
        refused: &ctx.shared.anpx_refused,
        ctx: &ctx,
    };
    let (why, closing) = engine::run(io, leftover, out, rx, &cfg, &mut sink).await;
    match &why {
        Ended::PingFlood { max } => {
            tracing::warn!(identity = %identity, %peer, tunnel = tunnel.id, close_code = CLOSE_POLICY,
                reason = %format_args!("more than {max} pings in one second"), "tunnel failed: ping flood")
        }
        Ended::Protocol { code, error } => {
            tracing::warn!(identity = %identity, %peer, tunnel = tunnel.id, close_code = code,
                %error, "tunnel failed: WebSocket protocol error")
        }
        _ => {}
    }
    ctx.unregister_tunnel(&tunnel);
    let lost = tunnel.inflight.borrow().len();
    tunnel.close();
    tracing::info!(identity = %identity, %peer, tunnel = tunnel.id, in_flight_failed = lost,
        reason = %why, "tunnel disconnected");
    closing.finish().await;
}

/// The gateway's side of a tunnel: responses complete requests in flight.
struct GatewayFrames<'a> {
    tunnel: Rc<Tunnel>,
    /// Whole messages of a plain v1 peer.
    reasm: Reassembler,
    refused: &'a FrameRefusals,
    ctx: &'a CoreCtx,
}

impl FrameSink for GatewayFrames<'_> {
    fn frame(&mut self, msg: Bytes) {
        if self.tunnel.features.stream {
            on_stream_frame(&self.tunnel, self.refused, msg);
        } else {
            on_frame(&self.tunnel, &mut self.reasm, self.refused, msg);
        }
    }

    /// Credit for an upload.
    fn credit(&mut self, request_id: &str, bytes: usize) {
        let window = parse_request_id(request_id).and_then(|id| {
            let map = self.tunnel.inflight.borrow();
            map.get(&id).map(|e| e.upload.clone())
        });
        if let Some(w) = window {
            w.add(bytes.min(DEFAULT_WINDOW));
        }
    }

    /// Responses are due while requests are in flight.
    fn busy(&self) -> bool {
        self.tunnel.inflight_len() > 0
    }

    /// The receiver is leaving (PROTOCOL.md §7.4): new requests go to
    /// other tunnels; the ones in flight here complete.
    fn draining(&mut self) {
        let t = &self.tunnel;
        if self.ctx.tunnel_draining(t) {
            tracing::info!(identity = %t.identity, instance = %t.instance, tunnel = t.id,
                in_flight = t.inflight_len(), "receiver draining: tunnel takes no new requests");
        }
    }
}

/// What became of a response head.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    /// No such request in flight on this tunnel.
    Unknown,
    /// The request already has its head: a second one is out of order.
    AlreadyStarted,
}

fn deliver_head(
    tunnel: &Tunnel,
    request_id: &str,
    result: Result<RespHead, ProxyError>,
) -> Delivery {
    let Some(id) = parse_request_id(request_id) else {
        return Delivery::Unknown;
    };
    let mut map = tunnel.inflight.borrow_mut();
    let Some(e) = map.get_mut(&id) else {
        return Delivery::Unknown;
    };
    let Some(tx) = e.head.take() else {
        return Delivery::AlreadyStarted;
    };
    // Done with the entry unless a body follows; taken out, and the head
    // sent, after the borrow ends.
    let gone = if e.body.is_none() {
        map.remove(&id)
    } else {
        None
    };
    drop(map);
    drop(gone);
    tx.send(result);
    Delivery::Delivered
}

/// Logs and counts a refused frame (nothing of it reaches a client).
fn refuse(
    tunnel: &Tunnel,
    counts: &FrameRefusals,
    why: FrameRefusal,
    request_id: &str,
    error: &dyn std::fmt::Display,
) {
    counts.count(why);
    tracing::warn!(tunnel = tunnel.id, identity = %tunnel.identity, reason = why.label(),
        request_id, %error, "ANPX frame refused");
}

/// A frame still in flight when its request ended here (a cancel, a
/// timeout): dropped, not counted.
fn late(tunnel: &Tunnel, request_id: &str, what: &str) {
    tracing::debug!(tunnel = tunnel.id, request_id, what, "late frame dropped");
}

/// Fails a request in flight on this tunnel with 502 because its response
/// can no longer arrive whole: the client gets a 502, or (head already
/// sent) a connection closed before the body's end. A `cancel` peer is told
/// to stop. False if no such request is in flight.
fn fail_request(tunnel: &Tunnel, id: u64, why: &str) -> bool {
    end_request(tunnel, id, ProxyError::BadResponse(why.into()), Some(why))
}

/// Plain v1 peer: whole messages through the reassembler.
fn on_frame(tunnel: &Tunnel, reasm: &mut Reassembler, counts: &FrameRefusals, msg: Bytes) {
    // Read before `push` takes the message: which request a frame whose
    // body CRC fails claims to belong to (a borrow, no copy).
    let claimed = anpx::unverified_request_id(&msg).and_then(parse_request_id);
    match reasm.push(msg) {
        Ok(None) => {}
        Ok(Some(Message::Response {
            request_id,
            meta,
            body,
        })) => {
            let head = RespHead {
                meta: binmeta::Response::from_json_meta(&meta),
                body: RespBody::Full(body),
            };
            let delivery = deliver_head(tunnel, &request_id, Ok(head));
            if delivery == Delivery::Unknown && tunnel.ended_here(&request_id) {
                late(tunnel, &request_id, "response for a request that ended");
            } else if delivery != Delivery::Delivered {
                let e = "response for a request not in flight on this tunnel";
                refuse(
                    tunnel,
                    counts,
                    FrameRefusal::UnknownRequest,
                    &request_id,
                    &e,
                );
            }
        }
        Ok(Some(Message::Error {
            request_id,
            message,
        })) => {
            tracing::info!(tunnel = tunnel.id, %request_id, %message, "receiver error frame");
            if deliver_head(tunnel, &request_id, Err(ProxyError::Receiver(message)))
                != Delivery::Delivered
            {
                // Not counted: it may cross a cancel or a timeout.
                tracing::info!(tunnel = tunnel.id, %request_id, "error frame for a request not in flight dropped");
            }
        }
        Ok(Some(Message::Request { request_id, .. })) => {
            let e = "receiver sent a request frame";
            refuse(tunnel, counts, FrameRefusal::WrongType, &request_id, &e);
        }
        Err(e) => {
            let why = FrameRefusal::of_reassembly(&e);
            match e.request_id() {
                Some(rid) => {
                    refuse(tunnel, counts, why, rid, &e);
                    deliver_head(tunnel, rid, Err(ProxyError::BadResponse(e.to_string())));
                }
                None => {
                    refuse(tunnel, counts, why, "-", &e);
                    if let Some(id) = claimed.filter(|_| why == FrameRefusal::Crc) {
                        let mut b = [0u8; 16];
                        reasm.forget(format_request_id(id, &mut b));
                        fail_request(tunnel, id, "corrupt frame (bad CRC)");
                    }
                }
            }
        }
    }
}

/// Most response bytes a receiver may send beyond the credit it got.
const MAX_UNACKED: usize = DEFAULT_WINDOW + 2 * (1 << 20);

/// `stream` peer: heads go to the client at once, bodies as they come.
/// What a frame means is the demultiplexer's decision; this acts on it.
fn on_stream_frame(tunnel: &Rc<Tunnel>, counts: &FrameRefusals, msg: Bytes) {
    let mut inc = match stream::classify(&msg, FrameType::Response, tunnel.features.body_crc()) {
        Ok(i) => i,
        Err(e) => return refuse_undecodable(tunnel, counts, &msg, &e),
    };
    let decision = tunnel.inflight.borrow_mut().decide(&mut inc);
    match (decision, inc) {
        (Decision::Head { key, complete }, Incoming::Whole { meta, body, .. })
        | (
            Decision::Head { key, complete },
            Incoming::Start {
                meta,
                body,
                last: _,
                ..
            },
        ) => stream_head(tunnel, counts, key, complete, meta, body),
        (Decision::Data { key, last }, Incoming::More { body, .. }) => {
            let mut map = tunnel.inflight.borrow_mut();
            let mut upload_open = false;
            let mut ended = None;
            if let Some(e) = map.get_mut(&key) {
                if let Some(tx) = e.body.as_ref() {
                    if !body.is_empty() {
                        tx.send(BodyEvent::Data(body));
                    }
                    if last {
                        tx.send(BodyEvent::End);
                    }
                }
                upload_open = e.upload_open;
                if last && upload_open {
                    // An upgraded stream's half-close: the upload goes on.
                    ended = e.body.take();
                }
            }
            let gone = if last && !upload_open {
                map.remove(&key)
            } else {
                None
            };
            drop(map);
            drop(gone);
            drop(ended);
        }
        (Decision::PeerError { key }, Incoming::Error { message, .. }) => {
            tracing::info!(tunnel = tunnel.id, request_id = key, %message, "receiver error frame");
            end_request(tunnel, key, ProxyError::Receiver(message), None);
        }
        (Decision::Refuse { why, fail, what }, inc) => {
            refuse(
                tunnel,
                counts,
                FrameRefusal::of_demux(why),
                inc.request_id(),
                &what,
            );
            if let Some(key) = fail {
                fail_request(tunnel, key, what);
            }
        }
        (Decision::Late { what }, inc) => late(tunnel, inc.request_id(), what),
        (d, inc) => {
            // `Open` is the receiver's (Opener::Peer); the others pair
            // with their frame kinds above.
            debug_assert!(false, "decision {d:?} for {inc:?}");
        }
    }
}

/// A frame that does not decode: refused; the request it claims (CRC) or
/// names (chunk 0 without meta) cannot be answered whole any more.
fn refuse_undecodable(
    tunnel: &Tunnel,
    counts: &FrameRefusals,
    msg: &Bytes,
    e: &stream::StreamError,
) {
    let why = FrameRefusal::of_stream(e);
    let rid = match e {
        stream::StreamError::MissingMeta(rid) => Some(rid.as_str()),
        _ if why == FrameRefusal::Crc => anpx::unverified_request_id(msg),
        _ => None,
    };
    refuse(tunnel, counts, why, rid.unwrap_or("-"), e);
    if let Some(id) = rid.and_then(parse_request_id) {
        fail_request(tunnel, id, &e.to_string());
    }
}

/// Chunk 0 (or a whole message) of request `key`: the head goes to the
/// waiting client with its body, whole or as a stream. A meta that does
/// not parse still ends its request (502).
fn stream_head(
    tunnel: &Rc<Tunnel>,
    counts: &FrameRefusals,
    key: u64,
    complete: bool,
    meta: Bytes,
    body: Bytes,
) {
    let mut rid = [0u8; 16];
    let rids = format_request_id(key, &mut rid);
    // Binary from our own receivers (`binmeta`), JSON from any other.
    let parsed = if binmeta::is_binary(&meta) {
        binmeta::Response::parse(meta)
    } else {
        ResponseMeta::from_json(&meta).map(|m| binmeta::Response::from_json_meta(&m))
    };
    let meta = match parsed {
        Ok(m) => m,
        Err(e) => {
            let e = ProxyError::BadResponse(e.to_string());
            refuse(tunnel, counts, FrameRefusal::Malformed, rids, &e);
            deliver_head(tunnel, rids, Err(e));
            return;
        }
    };
    let body = if complete {
        RespBody::Full(body)
    } else {
        let (tx, rx) = crate::pool::queue::channel();
        if !body.is_empty() {
            tx.send(BodyEvent::Data(body));
        }
        if let Some(e) = tunnel.inflight.borrow_mut().get_mut(&key) {
            e.body = Some(tx);
        }
        RespBody::Stream(BodyStream {
            src: BodySrc::Tunnel {
                rx,
                tunnel: tunnel.clone(),
                id: key,
            },
            consumed: 0,
            finished: false,
        })
    };
    deliver_head(tunnel, rids, Ok(RespHead { meta, body }));
}

/// Ends request `key` with `err`: its client gets the error (before the
/// head) or a cut body; with `tell_peer`, a `cancel` peer is told why.
fn end_request(tunnel: &Tunnel, key: u64, err: ProxyError, tell_peer: Option<&str>) -> bool {
    let gone = tunnel.inflight.borrow_mut().remove(&key);
    let Some(mut e) = gone else {
        return false;
    };
    e.upload.close();
    if let Some(tx) = e.head.take() {
        tx.send(Err(err));
    } else if let Some(tx) = e.body.take() {
        tx.send(BodyEvent::Failed(err));
    }
    if let Some(why) = tell_peer.filter(|_| tunnel.features.cancel && !tunnel.closed.get()) {
        let mut rid = [0u8; 16];
        let f = anpx::encode_error(format_request_id(key, &mut rid), why);
        let _ = tunnel.out.send(Outgoing::Binary(f));
    }
    true
}
