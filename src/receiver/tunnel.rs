//! One tunnel slot of the receiver: dial the gateway, authenticate on the
//! upgrade, serve ANPX requests until the tunnel drops, then reconnect when
//! `backoff.rs` says (a draining gateway's spread, a refusal's
//! `Retry-After`, or exponential backoff with jitter). Says in its log why a connection was
//! refused. Once the receiver shuts down (`drain.rs`), or its gateway's
//! address is gone from DNS (`fleet.rs`), a slot lets its tunnel leave and
//! does not reconnect. A slot belongs to one gateway of the fleet: its
//! backoff, and the gateway's tunnel count and status, are that gateway's.

use std::cell::RefCell;
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use super::backoff::{self, Backoff};
// WebSocket pass-through (src/receiver/passthrough.rs): declared here
// rather than in receiver/mod.rs, which only this module uses it from.
#[path = "passthrough.rs"]
mod passthrough;
use super::drain::{self, CoreDrain, Leaving};
use super::fleet::{CoreGateway, FleetMsg};
use super::sink::ResponseSink;
use super::upstream::{ReqBody, ReqEvent, Upstream, UpstreamError};
use super::url::Url;
use super::workers::Workers;
use crate::auth::didwba::{self, DidSigner};
use crate::config::AuthScheme;
use crate::protocol::anpx::{self, binmeta, FrameType, Message, Reassembler, RequestMeta};
use crate::protocol::features::{Features, FEATURES_HEADER, INSTANCE_HEADER, TUNNELS_HEADER};
use crate::protocol::stream::{self, Incoming, RequestId, SharedWindow, DEFAULT_WINDOW};
use crate::tls::client::GatewayStream;
use crate::tunnel::demux::{Decision, Demux, Opener};
use crate::tunnel::engine::{self, Ended, FrameSink};
use crate::ws;
use crate::ws::conn::{OutTx, Outgoing};

/// Everything one receiver core shares among its tunnel slots.
pub struct CoreRx {
    pub token: String,
    /// `X-ANPX-Instance` on every upgrade (`receiver.instance_id`).
    pub instance: String,
    /// The `X-ANPX-Features` offered (no `scale` with a pinned `tunnels`).
    pub offer: Features,
    /// Every core's fleet inbox, this one's included: a slot the gateway
    /// asks for starts on the core its index falls to.
    pub cores: Vec<futures_channel::mpsc::UnboundedSender<FleetMsg>>,
    /// When set, the tunnel proves this DID instead of sending `token`.
    pub did: Option<std::sync::Arc<DidSigner>>,
    pub auth_scheme: AuthScheme,
    pub upstream: Upstream,
    /// `max_concurrent` for this core (cancel-safe: `crate::sync`).
    pub permits: crate::sync::Permits,
    pub chunk_size: usize,
    /// The tunnel engine's limits and timers (`[receiver]` keys).
    pub engine: crate::tunnel::EngineConfig,
    /// `max_inflight_per_tunnel`: whole messages being reassembled.
    pub max_inflight: usize,
    /// `connect_timeout`: TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// `handshake_timeout`: from connected to the gateway's 101.
    pub handshake_timeout: Duration,
    pub upstream_timeout: Option<Duration>,
    pub max_body: usize,
    pub reconnect_max: Duration,
    /// `shutdown_grace`: also what a tunnel to a gateway address gone from
    /// DNS gets to finish its requests.
    pub shutdown_grace: Duration,
    /// SIGTERM/SIGINT: this core's shutdown (`receiver/drain.rs`).
    pub drain: CoreDrain,
    /// This core's request counters (read by a scrape: `admin.rs`).
    pub counters: Counters,
    /// The tasks that serve its requests (`workers.rs`).
    pub workers: Workers<Job>,
}

/// Idle request workers a core keeps (`workers.rs`): about 4 KiB each.
pub const WORKERS_IDLE_KEEP: usize = 64;

/// A request for a worker: what [`handle_request`] needs.
pub struct Job {
    out: OutTx,
    reqs: Reqs,
    meta: binmeta::Request,
    body: ReqBody,
    sink: ResponseSink,
    /// The request's window: its cancel latch is raised when the entry
    /// leaves the table.
    cancel: SharedWindow,
}

/// A core's request counters: plain cells, this core's alone.
#[derive(Default)]
pub struct Counters {
    /// Requests (and upgraded streams) started.
    pub requests: std::cell::Cell<u64>,
    /// Calls to the app that failed (the gateway got an error frame).
    pub upstream_errors: std::cell::Cell<u64>,
    pub in_flight: std::cell::Cell<u64>,
}

/// Counts one request in flight for as long as it lives.
struct InFlight<'a>(&'a Counters);

impl<'a> InFlight<'a> {
    fn start(c: &'a Counters) -> Self {
        c.requests.set(c.requests.get() + 1);
        c.in_flight.set(c.in_flight.get() + 1);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.set(self.0.in_flight.get() - 1);
    }
}

#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("gateway refused the tunnel: {status} {body}")]
    Refused {
        status: u16,
        body: String,
        /// `Retry-After` of a 429/503: when to come back.
        retry_after: Option<Duration>,
    },
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("tunnel ended: {0}")]
    Ended(String),
    #[error("gateway going away (1001 {0})")]
    GoingAway(String),
    #[error("replaced by another receiver instance of this identity (4001 {0})")]
    Replaced(String),
    #[error("released by the gateway: its load no longer needs this tunnel (4002 {0})")]
    Released(String),
    #[error("timed out during the handshake")]
    Timeout,
    #[error("{0}")]
    Tls(#[from] crate::tls::client::HandshakeError),
}

impl TunnelError {
    /// A refusal's `Retry-After`: when the gateway asked us to come back.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            TunnelError::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A refusal that says to come back at once (`Retry-After: 0`): routine,
    /// not an error. A `scale` gateway says so to a TLS tunnel accepted on
    /// a core other than the one it was asked for (PROTOCOL.md §7.8).
    fn again_now(&self) -> bool {
        self.retry_after() == Some(Duration::ZERO)
    }
}

/// How a slot came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotStart {
    /// One of the slots every gateway gets at start: it runs if its index
    /// is below the count configured or learnt from the first 101.
    Initial,
    /// The gateway asked for more tunnels (`scale`); already counted as
    /// running by `TunnelCount::grow`.
    Grown,
}

/// Keeps tunnel `index` to gateway `gw` up until the receiver shuts down,
/// the gateway's address is gone, or the gateway releases it (`scale`).
pub async fn run_slot(ctx: Rc<CoreRx>, gw: Rc<CoreGateway>, index: usize, start: SlotStart) {
    if start == SlotStart::Initial {
        if index > 0 {
            // Slots past the first wait to learn how many the gateway wants.
            let want = monoio::select! {
                n = gw.gw.count.get() => n,
                _ = gw.gone.wait() => return,
            };
            if index >= want {
                return;
            }
        }
        gw.gw.count.started(index);
    }
    keep_up(&ctx, &gw, index).await;
    gw.gw.count.ended(index);
}

/// [`run_slot`]'s life once it runs: connect, serve, reconnect.
async fn keep_up(ctx: &Rc<CoreRx>, gw: &Rc<CoreGateway>, index: usize) {
    let gateway = gw.gw.label.as_str();
    let mut backoff = Backoff::new(ctx.reconnect_max);
    loop {
        if ctx.drain.draining.is_set() || gw.gone.is_set() {
            return;
        }
        let started = Instant::now();
        let result = connect_and_serve(ctx, gw, index).await;
        if ctx.drain.draining.is_set() {
            // Shutting down: the tunnel was closed on purpose.
            tracing::info!(
                tunnel = index,
                gateway = %gateway,
                "tunnel closed; receiver shutting down"
            );
            return;
        }
        if gw.gone.is_set() {
            tracing::info!(
                tunnel = index,
                gateway = %gateway,
                "tunnel closed; gateway address gone, not redialling"
            );
            return;
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset(); // it was up for a while: reconnect promptly
        }
        let ended = match result {
            Ok(()) => backoff::Ended::Down,
            Err(TunnelError::GoingAway(reason)) => {
                // A draining gateway: a successor on the same port takes
                // the tunnel; come back at a random moment within the
                // spread its reason asks for (PROTOCOL.md §7.3).
                let spread = crate::protocol::reconnect::spread_of(&reason);
                tracing::info!(tunnel = index, gateway = %gateway, reason = %reason, spread = ?spread, "tunnel closed by the gateway (going away)");
                backoff::Ended::GoingAway { spread }
            }
            Err(e @ TunnelError::Released(_)) => {
                tracing::info!(tunnel = index, gateway = %gateway, "{e}; not redialling");
                return;
            }
            Err(e @ TunnelError::Replaced(_)) => {
                // The gateway's `duplicate_tunnels = "replace"`: the newest
                // instance wins; fighting back would make both flap.
                tracing::error!(tunnel = index, gateway = %gateway, error = %e, "not reconnecting; exiting");
                eprintln!("anp-proxy: receiver {e}; exiting");
                std::process::exit(crate::protocol::features::EXIT_REPLACED);
            }
            Err(e) if e.again_now() => {
                tracing::info!(tunnel = index, gateway = %gateway, error = %e, "the gateway asks to dial again at once");
                backoff::Ended::Refused {
                    retry_after: e.retry_after(),
                }
            }
            Err(e @ TunnelError::Refused { .. }) => {
                tracing::error!(tunnel = index, gateway = %gateway, error = %e, "tunnel refused");
                backoff::Ended::Refused {
                    retry_after: e.retry_after(),
                }
            }
            Err(e) => {
                tracing::warn!(tunnel = index, gateway = %gateway, error = %e, "tunnel down");
                backoff::Ended::Down
            }
        };
        let pause = backoff.next(ended, rand::random::<f64>());
        tracing::info!(tunnel = index, after = ?pause, gateway = %gateway, "reconnecting");
        monoio::select! {
            _ = monoio::time::sleep(pause) => {}
            _ = ctx.drain.draining.wait() => return,
            _ = gw.gone.wait() => return,
        }
    }
}

/// The upgrade's proof of identity: a bearer token, or a DID-WBA proof
/// with a fresh nonce and time for this attempt (`service` = the gateway
/// URL's host without port; `@target-uri` = the ws URL as dialled).
fn auth_headers(ctx: &CoreRx, gateway: &Url, host: &str) -> Vec<(&'static str, String)> {
    let Some(signer) = &ctx.did else {
        return vec![("Authorization", format!("Bearer {}", ctx.token))];
    };
    let nonce = didwba::sign::fresh_nonce();
    let now = didwba::time::now_unix();
    match ctx.auth_scheme {
        AuthScheme::DidWba => vec![(
            "Authorization",
            signer.didwba_header(gateway.host_name(), &nonce, &didwba::time::format_utc(now)),
        )],
        AuthScheme::HttpSignatures => {
            let scheme = if gateway.tls { "wss" } else { "ws" };
            let uri = format!("{scheme}://{host}{}", gateway.path);
            let (input, sig) = signer.http_signature("GET", &uri, host, now, &nonce);
            vec![("Signature-Input", input), ("Signature", sig)]
        }
    }
}

async fn connect_and_serve(
    ctx: &Rc<CoreRx>,
    gw: &Rc<CoreGateway>,
    index: usize,
) -> Result<(), TunnelError> {
    // The handshake's locals (request, headers, response) are not kept for
    // the tunnel's life.
    let (io, buf, features) = match connect(ctx, gw, index).await {
        Ok(c) => c,
        Err(e) => {
            gw.gw.status.failed();
            return Err(e);
        }
    };
    if gw.gw.status.connected() == 1 {
        tracing::info!(gateway = %gw.gw.label, "gateway up: first tunnel connected");
    }
    gw.gw.log_status();
    let result = serve(ctx, gw, io, buf, index, features).await;
    if gw.gw.status.ended() == 0 {
        tracing::warn!(gateway = %gw.gw.label, "gateway down: no tunnel connected to it");
    }
    gw.gw.log_status();
    result
}

/// Dials and upgrades: the stream, bytes read past the 101, the features.
async fn connect(
    ctx: &Rc<CoreRx>,
    gw: &CoreGateway,
    index: usize,
) -> Result<(GatewayStream, BytesMut, Features), TunnelError> {
    let gateway = &gw.gw.url;
    let addr = gw.gw.addr;
    let connect = TcpStream::connect(addr);
    let io = match monoio::time::timeout(ctx.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(TunnelError::Connect {
                addr: addr.to_string(),
                source,
            })
        }
        Err(_) => return Err(TunnelError::Timeout),
    };
    let _ = io.set_nodelay(true);
    let mut io = match &gw.gw.dialer {
        None => GatewayStream::Plain(io),
        Some(d) => match monoio::time::timeout(ctx.connect_timeout, d.handshake(io)).await {
            Ok(r) => r?,
            Err(_) => return Err(TunnelError::Timeout),
        },
    };
    let key = ws::client_key();
    let host = gateway.host_header();
    let mut headers = auth_headers(ctx, gateway, &host);
    headers.push((FEATURES_HEADER, ctx.offer.to_header_value()));
    headers.push((INSTANCE_HEADER, ctx.instance.clone()));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut req = Vec::with_capacity(1024);
    ws::write_client_request(&mut req, &host, &gateway.path, &key, &headers);
    let (r, _) = io.write_all(req).await;
    r.map_err(|e| TunnelError::Handshake(e.to_string()))?;

    // Read the answer: 101, or a refusal whose body says why.
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let deadline = Instant::now() + ctx.handshake_timeout;
    let resp = loop {
        match ws::parse_server_response(&buf, &key) {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(e) => return Err(TunnelError::Handshake(e.to_string())),
        }
        read_some(&mut io, &mut buf, deadline).await?;
    };
    if !resp.is_upgrade() {
        let retry_after = resp
            .header("retry-after")
            .and_then(backoff::parse_retry_after);
        let _ = buf.split_to(resp.head_len);
        let want = match resp.body_hint {
            ws::BodyHint::Length(n) => n.min(4096),
            ws::BodyHint::None => 0,
            _ => 4096,
        };
        while buf.len() < want {
            if read_some(&mut io, &mut buf, deadline).await.is_err() {
                break;
            }
        }
        let body = String::from_utf8_lossy(&buf[..buf.len().min(want)]).into_owned();
        return Err(TunnelError::Refused {
            status: resp.status,
            body,
            retry_after,
        });
    }
    let features = resp
        .header(FEATURES_HEADER)
        .map(|v| Features::parse(v.as_bytes()))
        .unwrap_or_default()
        .intersect(Features::SUPPORTED);
    let want = resp
        .header(TUNNELS_HEADER)
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, 64);
    gw.gw.count.offer(want);
    let _ = buf.split_to(resp.head_len);
    tracing::info!(tunnel = index, gateway = %gw.gw.label, features = %features.to_header_value(), "tunnel connected");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "anp-proxy receiver tunnel {index} connected to {}",
            gw.gw.label
        );
        let _ = out.flush();
    }
    Ok((io, buf, features))
}

async fn read_some<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<(), TunnelError> {
    let res = crate::net::read_by(io, buf, Some(deadline))
        .await
        .map_err(|_| TunnelError::Timeout)?;
    match res {
        Ok(0) => Err(TunnelError::Handshake(
            "gateway closed the connection".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(match crate::tls::client::HandshakeError::from_io(&e) {
            Some(t) => TunnelError::Tls(t),
            None => TunnelError::Handshake(e.to_string()),
        }),
    }
}

async fn serve<S>(
    ctx: &Rc<CoreRx>,
    gw: &Rc<CoreGateway>,
    io: S,
    leftover: BytesMut,
    index: usize,
    features: Features,
) -> Result<(), TunnelError>
where
    S: Splitable,
    S::OwnedRead: AsyncReadRent + crate::net::Readable + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    let (out, rx) = engine::queue();
    let reqs: Reqs = Rc::new(RefCell::new(Demux::new(Opener::Peer, usize::MAX)));
    let leaving = Rc::new(Leaving::default());
    let mut sink = ReceiverFrames {
        ctx: ctx.clone(),
        gw: gw.clone(),
        out: out.clone(),
        reqs: reqs.clone(),
        features,
        index,
        reasm: Reassembler::new(anpx::Limits {
            max_message_size: ctx.max_body + 64 * 1024,
            max_assemblies: ctx.max_inflight,
        }),
        leaving: leaving.clone(),
    };
    ctx.drain.tunnel_started();
    let in_flight = {
        let reqs = reqs.clone();
        move || reqs.borrow().len()
    };
    monoio::spawn(drain::leave(
        ctx.clone(),
        gw.clone(),
        out.clone(),
        leaving.clone(),
        index,
        in_flight,
    ));
    // Per tunnel: a gateway that negotiated `zeromask` gets frames with the
    // all-zero key, and on plain TCP their bodies go out where they are
    // (one `writev`, no copy); over TLS rustls copies anyway.
    let mut engine = ctx.engine.clone();
    engine.zero_mask = features.zeromask;
    engine.vectored = features.zeromask && gw.gw.dialer.is_none();
    let (ended, closing) = engine::run(io, leftover, out, rx, &engine, &mut sink).await;
    leaving.ended.raise();
    // Dropping the entries cancels the upstream calls still running: their
    // responses have nowhere to go. Taken out first: no borrow is held
    // while their channels wake tasks.
    let gone: Vec<(RequestId, RxReq)> = reqs.borrow_mut().drain();
    drop(gone);
    closing.finish().await;
    ctx.drain.tunnel_ended();
    Err(match ended {
        Ended::Closed {
            code: Some(1001),
            reason,
        } => TunnelError::GoingAway(reason),
        Ended::Closed {
            code: Some(crate::protocol::features::CLOSE_REPLACED),
            reason,
        } => TunnelError::Replaced(reason),
        Ended::Closed {
            code: Some(crate::protocol::features::CLOSE_RELEASED),
            reason,
        } => TunnelError::Released(reason),
        Ended::Closed { code, reason } => {
            TunnelError::Ended(format!("gateway closed ({code:?} {reason})"))
        }
        other => TunnelError::Ended(other.to_string()),
    })
}

/// The receiver's side of a tunnel: requests start upstream calls.
struct ReceiverFrames {
    ctx: Rc<CoreRx>,
    /// The gateway this tunnel goes to (`scale` grows its slots).
    gw: Rc<CoreGateway>,
    out: OutTx,
    reqs: Reqs,
    features: Features,
    index: usize,
    /// Whole messages from a plain v1 gateway.
    reasm: Reassembler,
    /// This tunnel's part in a shutdown (`receiver/drain.rs`).
    leaving: Rc<Leaving>,
}

impl FrameSink for ReceiverFrames {
    fn frame(&mut self, msg: Bytes) {
        if self.features.stream {
            self.stream_frame(msg);
        } else {
            self.whole_frame(msg);
        }
    }

    /// Credit for a response body (`stream`).
    fn credit(&mut self, request_id: &str, bytes: usize) {
        let window = self.reqs.borrow().get(request_id).map(|r| r.window.clone());
        if let Some(w) = window {
            w.add(bytes.min(DEFAULT_WINDOW));
        }
    }

    /// Request bodies and credit come while requests are in flight.
    fn busy(&self) -> bool {
        !self.reqs.borrow().is_empty()
    }

    /// The answer to our draining ping, or to a keepalive one.
    fn pong(&mut self, payload: &[u8]) {
        self.leaving.pong(payload);
    }

    /// The gateway wants `want` tunnels (`scale`, PROTOCOL.md §7.8): the
    /// missing slots start, each on the core its index falls to, as at
    /// start. Ignored with a pinned `tunnels` (not offered then) and while
    /// shutting down.
    fn tunnels(&mut self, want: usize) {
        if !self.ctx.offer.scale || self.ctx.drain.draining.is_set() || self.gw.gone.is_set() {
            return;
        }
        let new = self.gw.gw.count.grow(want);
        if new.is_empty() {
            return;
        }
        tracing::info!(gateway = %self.gw.gw.label, want, opening = ?new, "the gateway asks for more tunnels");
        let cores = &self.ctx.cores;
        for index in new {
            let msg = FleetMsg::Grow(self.gw.gw.clone(), index);
            if cores[index % cores.len()].unbounded_send(msg).is_err() {
                self.gw.gw.count.ended(index);
            }
        }
    }
}

impl ReceiverFrames {
    /// A plain v1 gateway: whole requests through the reassembler.
    fn whole_frame(&mut self, msg: Bytes) {
        let index = self.index;
        match self.reasm.push(msg) {
            Ok(Some(Message::Request {
                request_id,
                meta,
                body,
            })) => match super::upstream::from_json_meta(&meta) {
                Ok(meta) => start_request(
                    &self.ctx,
                    &self.out,
                    &self.reqs,
                    self.features,
                    RequestId::from(request_id),
                    meta,
                    ReqBody::Full(body),
                    None,
                ),
                Err(e) => {
                    tracing::warn!(tunnel = index, %request_id, error = %e, "invalid request meta refused");
                    let _ = self.out.send(Outgoing::Binary(anpx::encode_error(
                        &request_id,
                        &e.to_string(),
                    )));
                }
            },
            Ok(Some(Message::Error {
                request_id,
                message,
            })) => {
                tracing::debug!(tunnel = index, %request_id, %message, "gateway error frame");
            }
            Ok(Some(Message::Response { request_id, .. })) => {
                tracing::warn!(tunnel = index, %request_id, "gateway sent a response frame; refused");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(tunnel = index, error = %e, "invalid ANPX frame refused");
                if let Some(rid) = e.request_id() {
                    let _ = self
                        .out
                        .send(Outgoing::Binary(anpx::encode_error(rid, &e.to_string())));
                }
            }
        }
    }
}

/// A request this tunnel is serving.
struct RxReq {
    /// Where streamed body pieces go, until the last one.
    body: Option<crate::pool::queue::Tx<ReqEvent>>,
    /// Credit the gateway returned for the response body; its cancel
    /// latch is raised when the entry leaves the table (dropped: cancelled
    /// by the gateway, refused, or the tunnel ended), which abandons the
    /// upstream call.
    window: SharedWindow,
}

impl Drop for RxReq {
    fn drop(&mut self) {
        self.window.cancel();
    }
}

/// The requests this tunnel serves, with where their request messages
/// stand (`crate::tunnel::demux`; the gateway opens them).
type Reqs = Rc<RefCell<Demux<RequestId, RxReq>>>;

impl ReceiverFrames {
    /// `stream` gateway: requests start at chunk 0; bodies follow. What a
    /// frame means is the demultiplexer's decision; this acts on it.
    fn stream_frame(&mut self, msg: Bytes) {
        let index = self.index;
        let mut inc = match stream::classify(&msg, FrameType::Request, self.features.body_crc()) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(tunnel = index, error = %e, "invalid ANPX frame refused");
                return;
            }
        };
        let decision = self.reqs.borrow_mut().decide(&mut inc);
        match (decision, inc) {
            (Decision::Open { key, complete }, Incoming::Whole { meta, body, .. })
            | (Decision::Open { key, complete }, Incoming::Start { meta, body, .. }) => {
                self.open(key, complete, meta, body)
            }
            (Decision::Data { key, last }, Incoming::More { body, .. }) => {
                let mut map = self.reqs.borrow_mut();
                let Some(r) = map.get_mut(&key) else {
                    return;
                };
                if let Some(tx) = r.body.as_ref() {
                    if !body.is_empty() {
                        tx.send(ReqEvent::Data(body));
                    }
                    if last {
                        tx.send(ReqEvent::End);
                    }
                }
                if last {
                    r.body = None;
                }
            }
            (Decision::PeerError { key }, Incoming::Error { message, .. }) => {
                // `cancel`: the client went away; abort the upstream call.
                // Dropped outside the borrow: that cancels the call.
                let gone = self.reqs.borrow_mut().remove(&key);
                if gone.is_some() {
                    tracing::info!(tunnel = index, request_id = %key, %message, "request cancelled by the gateway");
                }
                drop(gone);
            }
            (Decision::Refuse { fail, what, .. }, inc) => {
                // The frame's id, or (taken by the demux) the failed one.
                let request_id = fail.as_deref().unwrap_or(inc.request_id());
                tracing::warn!(tunnel = index, request_id, frame = ?inc_kind(&inc), what, "ANPX frame refused");
                if let Some(key) = fail {
                    // Dropping the entry abandons the upstream call; the
                    // error frame lets the gateway answer 502 now, not 504.
                    let gone = self.reqs.borrow_mut().remove(&key);
                    drop(gone);
                    let _ = self
                        .out
                        .send(Outgoing::Binary(anpx::encode_error(&key, what)));
                }
            }
            (Decision::Late { what }, _) => {
                tracing::debug!(tunnel = index, what, "late frame dropped");
            }
            (d, inc) => debug_assert!(false, "decision {d:?} for {inc:?}"),
        }
    }

    /// A new request: its upstream call starts now, with the body whole
    /// (`complete`) or fed piece by piece as it comes.
    fn open(&mut self, key: RequestId, complete: bool, meta: Bytes, body: Bytes) {
        // Binary from our own gateways (`binmeta`), JSON from any other.
        let parsed = if binmeta::is_binary(&meta) {
            binmeta::Request::parse(meta).map_err(|e| e.to_string())
        } else {
            RequestMeta::from_json(&meta)
                .map_err(|e| e.to_string())
                .and_then(|m| super::upstream::from_json_meta(&m).map_err(|e| e.to_string()))
        };
        let meta = match parsed {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(tunnel = self.index, request_id = %key, error = %e, "invalid request meta refused");
                let _ = self
                    .out
                    .send(Outgoing::Binary(anpx::encode_error(&key, &e)));
                return;
            }
        };
        let (tx, body) = if complete {
            (None, ReqBody::Full(body))
        } else {
            let (tx, rx) = crate::pool::queue::channel();
            if !body.is_empty() {
                tx.send(ReqEvent::Data(body));
            }
            (Some(tx), ReqBody::Stream(rx))
        };
        start_request(
            &self.ctx,
            &self.out,
            &self.reqs,
            self.features,
            key,
            meta,
            body,
            tx,
        );
    }
}

/// Which kind of frame (for a refusal's log line).
fn inc_kind(inc: &Incoming) -> &'static str {
    match inc {
        Incoming::Whole { .. } => "whole",
        Incoming::Start { .. } => "chunk 0",
        Incoming::More { .. } => "chunk",
        Incoming::Error { .. } => "error",
    }
}

#[allow(clippy::too_many_arguments)]
fn start_request(
    ctx: &Rc<CoreRx>,
    out: &OutTx,
    reqs: &Reqs,
    features: Features,
    request_id: RequestId,
    meta: binmeta::Request,
    body: ReqBody,
    body_tx: Option<crate::pool::queue::Tx<ReqEvent>>,
) {
    let window = SharedWindow::new(DEFAULT_WINDOW);
    let cancel = window.clone();
    let complete = body_tx.is_none();
    reqs.borrow_mut().insert(
        request_id.clone(),
        RxReq {
            body: body_tx,
            window: window.clone(),
        },
        complete,
    );
    let sink = ResponseSink::new(
        out.clone(),
        request_id,
        features,
        window,
        ctx.chunk_size,
        ctx.max_body,
    );
    // WebSocket pass-through (PROTOCOL.md §7.6): an upgrade request of a
    // gateway that negotiated it; its body is the client's byte stream.
    let body = match body {
        ReqBody::Stream(rx) if features.upgrade && passthrough::is_upgrade(&meta) => {
            let (ctx, out, reqs) = (ctx.clone(), out.clone(), reqs.clone());
            monoio::spawn(async move {
                let rid = RequestId::from(sink.request_id());
                passthrough::serve(ctx, out, meta, rx, sink, cancel).await;
                let gone = reqs.borrow_mut().remove(&rid);
                drop(gone);
            });
            return;
        }
        body => body,
    };
    let job = Job {
        out: out.clone(),
        reqs: reqs.clone(),
        meta,
        body,
        sink,
        cancel,
    };
    if ctx.workers.submit(job) {
        monoio::spawn(worker(ctx.clone()));
    }
}

/// Serves requests until enough workers are idle (`workers.rs`). The
/// request's state lives in this task, which serves one after another:
/// no task and no box per request.
async fn worker(ctx: Rc<CoreRx>) {
    while let Some(job) = ctx.workers.next().await {
        handle_request(&ctx, job).await;
    }
}

/// Calls the app for one request and sends the response (or an error
/// frame) back on the tunnel.
async fn handle_request(ctx: &CoreRx, job: Job) {
    let Job {
        out,
        reqs,
        meta,
        body,
        mut sink,
        cancel,
    } = job;
    let request_id = RequestId::from(sink.request_id());
    // The path without the query (it may carry secrets): for the log.
    let target = String::from_utf8_lossy(meta.target());
    let path = target.split('?').next().unwrap_or_default();
    crate::fault::maybe_panic(path);
    let _counted = InFlight::start(&ctx.counters);
    // In the worker's own state: no spawn copies it (a spawned task per
    // request copied its ~4 KiB twice, so it was boxed).
    let work = std::pin::pin!(async {
        // Never more than max_concurrent upstream calls at once; excess waits.
        let _permit = ctx.permits.acquire().await;
        let mut credit = |n: usize| {
            let _ = out.send(Outgoing::Text(stream::credit_message(&request_id, n)));
        };
        // Pinned here: `timeout` takes its future by value, and this one
        // (~2 KiB) would be copied into it at every request.
        let call = std::pin::pin!(ctx.upstream.call(&meta, body, &mut sink, &mut credit));
        match ctx.upstream_timeout {
            Some(d) => match monoio::time::timeout(d, call).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::Timeout(d)),
            },
            None => call.await,
        }
    });
    let result = monoio::select! {
        r = work => Some(r),
        _ = cancel.cancelled() => None,
    };
    match call_end(result) {
        CallEnd::Done => {}
        CallEnd::Abandoned => tracing::debug!(%request_id, "upstream call abandoned"),
        CallEnd::Failed(e) => {
            tracing::warn!(%request_id, method = %String::from_utf8_lossy(meta.method()), path = %path, error = %e, "upstream call failed");
            report_failure(ctx, &out, &request_id, &e);
        }
    }
    let gone = reqs.borrow_mut().remove(&request_id);
    drop(gone);
}

/// How an upstream call (or an upgraded stream) ended, for the log and
/// the counters.
#[derive(Debug)]
enum CallEnd {
    Done,
    /// The gateway let the request go (its client left, mid-upload or
    /// before the answer) or the tunnel went: nothing an operator of this
    /// receiver can act on, and a client can cause it at will. A cancel
    /// drops the body queue and raises the cancel latch together, so the
    /// call may see either first: `Aborted` (its body ended) is the same
    /// end as the latch (`None`).
    Abandoned,
    /// The app or the receiver failed: warned, counted, and reported.
    Failed(UpstreamError),
}

fn call_end(result: Option<Result<(), UpstreamError>>) -> CallEnd {
    match result {
        Some(Ok(())) => CallEnd::Done,
        Some(Err(UpstreamError::TunnelGone | UpstreamError::Aborted)) | None => CallEnd::Abandoned,
        Some(Err(e)) => CallEnd::Failed(e),
    }
}

/// A call (or an upgraded stream) that failed: counted, and the gateway
/// told with an error frame (it answers the client 502, or 504).
fn report_failure(ctx: &CoreRx, out: &OutTx, request_id: &str, e: &UpstreamError) {
    let c = &ctx.counters.upstream_errors;
    c.set(c.get() + 1);
    let _ = out.send(Outgoing::Binary(anpx::encode_error(
        request_id,
        &e.to_string(),
    )));
}

/// The receiver's per-request state machine (`on_stream_frame`, the
/// request table, permits, `handle_request`) driven with random frames
/// and random cancellations against a real local app, on a real runtime:
/// no panic, and once everything is cancelled nothing is left behind: no
/// request entry, no permit (issue #15).
#[cfg(test)]
mod tests {
    use super::*;

    /// A client leaving is never an upstream failure, whichever of the
    /// cancel's two signals the call saw first; what the app or the
    /// receiver did wrong is.
    #[test]
    fn a_request_let_go_is_abandoned_not_failed() {
        assert!(matches!(call_end(Some(Ok(()))), CallEnd::Done));
        for r in [
            None,
            Some(Err(UpstreamError::Aborted)),
            Some(Err(UpstreamError::TunnelGone)),
        ] {
            assert!(matches!(call_end(r), CallEnd::Abandoned));
        }
        assert!(matches!(
            call_end(Some(Err(UpstreamError::Closed))),
            CallEnd::Failed(UpstreamError::Closed)
        ));
    }
}

#[cfg(test)]
mod cancel_props {
    use super::*;
    use crate::protocol::anpx::MetaRef;
    use crate::ws::Role;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::SocketAddr;

    #[derive(Debug, Clone)]
    enum Op {
        /// Chunk 0 of request `id`; `whole`: the body ends there.
        Start { id: u8, whole: bool },
        /// The next body chunk; `skip`: one chunk is lost (out of order).
        More { id: u8, last: bool, skip: bool },
        /// The gateway's cancel (an error frame).
        Cancel(u8),
        /// Let the runtime run for `n` ms.
        Run(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, any::<bool>()).prop_map(|(id, whole)| Op::Start { id, whole }),
            (0u8..12, any::<bool>(), proptest::bool::weighted(0.1))
                .prop_map(|(id, last, skip)| Op::More { id, last, skip }),
            (0u8..12).prop_map(Op::Cancel),
            (0u8..4).prop_map(Op::Run),
        ]
    }

    /// An app that answers every request as soon as its head has come
    /// (without reading the body) and closes: bodies still being sent
    /// fail, which is one more way for a request to end.
    async fn app(listener: monoio::net::TcpListener) {
        while let Ok((mut s, _)) = listener.accept().await {
            monoio::spawn(async move {
                let mut buf = BytesMut::with_capacity(4096);
                loop {
                    let (r, b) = crate::net::read_append(&mut s, buf).await;
                    buf = b;
                    match r {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    }
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                    buf.reserve(4096);
                }
                let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                let _ = s.write_all(resp.to_vec()).await;
            });
        }
    }

    fn core(app: SocketAddr, permits: usize) -> Rc<CoreRx> {
        let up = super::super::app_conn::parse(&format!("http://{app}")).unwrap();
        let up = super::super::app_conn::AppTarget::new(up, "", None).unwrap();
        Rc::new(CoreRx {
            token: String::new(),
            instance: "prop".into(),
            offer: Features::SUPPORTED,
            cores: Vec::new(),
            did: None,
            auth_scheme: AuthScheme::DidWba,
            upstream: Upstream::new(up, permits, 256 * 1024, 1000),
            permits: crate::sync::Permits::new(permits),
            workers: Workers::new(WORKERS_IDLE_KEEP),
            chunk_size: 64 * 1024,
            engine: crate::tunnel::EngineConfig {
                role: Role::Client,
                vectored: false,
                zero_mask: false,
                ping_interval: None,
                limits: ws::Limits {
                    max_frame_payload: 1 << 20,
                    max_message: 1 << 20,
                    max_fragments: 16,
                },
                max_pings_per_second: 10,
                close_grace: Duration::from_secs(1),
            },
            max_inflight: 64,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            upstream_timeout: None,
            max_body: 1 << 20,
            reconnect_max: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(1),
            drain: CoreDrain::default(),
            counters: Default::default(),
        })
    }

    fn rid(id: u8) -> String {
        format!("{:016x}", id)
    }

    fn run_case(permits: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            monoio::spawn(app(listener));
            let ctx = core(addr, permits);
            let (out, _rx) = crate::tunnel::engine::queue();
            let reqs: Reqs = Rc::new(RefCell::new(Demux::new(Opener::Peer, usize::MAX)));
            let features = Features::SUPPORTED;
            let mut enc: HashMap<u8, anpx_stream::StreamEncoder> = HashMap::new();
            let mut meta = Vec::new();
            RequestMeta {
                method: "POST".into(),
                path: "/x".into(),
                headers: vec![],
                query: vec![],
                raw_target: None,
                header_list: None,
            }
            .to_json(&mut meta);
            let url = super::super::url::parse("ws://127.0.0.1:9/ws", ("ws", "wss")).unwrap();
            let gw = Rc::new(CoreGateway {
                gw: std::sync::Arc::new(super::super::fleet::Gateway::new(url, addr, None, 1)),
                gone: crate::sync::Flag::default(),
            });
            let mut frames = ReceiverFrames {
                ctx: ctx.clone(),
                gw,
                out: out.clone(),
                reqs: reqs.clone(),
                features,
                index: 0,
                reasm: Reassembler::new(anpx::Limits {
                    max_message_size: 1 << 20,
                    max_assemblies: 64,
                }),
                leaving: Rc::new(Leaving::default()),
            };
            let mut deliver = |f: BytesMut| frames.frame(f.freeze());
            for op in ops {
                match op {
                    Op::Start { id, whole } => {
                        let mut e = anpx_stream::StreamEncoder::new(FrameType::Request);
                        deliver(e.head(&rid(id), MetaRef::Request(&meta), b"hi", whole));
                        if !whole {
                            enc.insert(id, e);
                        }
                    }
                    Op::More { id, last, skip } => {
                        if let Some(e) = enc.get_mut(&id) {
                            if skip {
                                let _ = e.body(&rid(id), b"lost", false);
                            }
                            deliver(e.body(&rid(id), b"more", last));
                            if last {
                                enc.remove(&id);
                            }
                        }
                    }
                    Op::Cancel(id) => {
                        enc.remove(&id);
                        deliver(anpx::encode_error(&rid(id), "cancel"));
                    }
                    Op::Run(n) => monoio::time::sleep(Duration::from_millis(n as u64)).await,
                }
            }
            for id in 0..12 {
                deliver(anpx::encode_error(&rid(id), "cancel"));
            }
            let until = Instant::now() + Duration::from_secs(10);
            while (!reqs.borrow().is_empty() || ctx.permits.available() != permits)
                && Instant::now() < until
            {
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            prop_assert_eq!(reqs.borrow().len(), 0, "requests left in the table");
            prop_assert_eq!(ctx.permits.available(), permits, "permits lost");
            prop_assert_eq!(ctx.permits.waiting(), 0);
            Ok(())
        })
    }

    use crate::protocol::stream as anpx_stream;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn random_frames_and_cancellations_leave_nothing_behind(
            permits in 1usize..4,
            ops in proptest::collection::vec(op(), 1..80),
        ) {
            run_case(permits, ops)?;
        }
    }
}
