//! One tunnel slot of the receiver: dial the gateway, authenticate on the
//! upgrade, serve ANPX requests until the tunnel drops, then reconnect with
//! exponential backoff and jitter. Says in its log why a connection was
//! refused.

use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use local_sync::semaphore::Semaphore;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use super::upstream::Upstream;
use super::url::Url;
use super::TunnelCount;
use crate::auth::didwba::{self, DidSigner};
use crate::config::AuthScheme;
use crate::protocol::anpx::{self, FrameType, Message, MetaRef, Reassembler, RequestMeta};
use crate::protocol::features::{Features, FEATURES_HEADER, TUNNELS_HEADER};
use crate::ws::conn::{run_writer, ConnError, OutTx, Outgoing, WsReader};
use crate::ws::{self, Decoder, Event, Role};

/// Everything one receiver core shares among its tunnel slots.
pub struct CoreRx {
    pub gateway: Url,
    pub token: String,
    /// When set, the tunnel proves this DID instead of sending `token`.
    pub did: Option<std::sync::Arc<DidSigner>>,
    pub auth_scheme: AuthScheme,
    pub upstream: Upstream,
    pub permits: Rc<Semaphore>,
    pub chunk_size: usize,
    pub ping_interval: Option<Duration>,
    pub upstream_timeout: Option<Duration>,
    pub max_body: usize,
    pub reconnect_max: Duration,
    pub count: std::sync::Arc<TunnelCount>,
}

#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("gateway refused the tunnel: {status} {body}")]
    Refused { status: u16, body: String },
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("tunnel ended: {0}")]
    Ended(String),
    #[error("timed out during the handshake")]
    Timeout,
}

/// Keeps tunnel `index` up forever.
pub async fn run_slot(ctx: Rc<CoreRx>, index: usize) {
    if index > 0 {
        // Slots past the first wait to learn how many the gateway wants.
        let want = ctx.count.get().await;
        if index >= want {
            return;
        }
    }
    let base = Duration::from_millis(250);
    let mut delay = base;
    loop {
        let started = Instant::now();
        match connect_and_serve(&ctx, index).await {
            Ok(()) => {}
            Err(e @ TunnelError::Refused { .. }) => {
                tracing::error!(tunnel = index, error = %e, "tunnel refused")
            }
            Err(e) => tracing::warn!(tunnel = index, error = %e, "tunnel down"),
        }
        if started.elapsed() > Duration::from_secs(10) {
            delay = base; // it was up for a while: reconnect promptly
        }
        // Full jitter in [delay/2, delay): receivers don't reconnect in step.
        let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        tracing::info!(tunnel = index, after = ?jittered, "reconnecting");
        monoio::time::sleep(jittered).await;
        delay = (delay * 2).min(ctx.reconnect_max);
    }
}

/// The upgrade's proof of identity: a bearer token, or a DID-WBA proof
/// with a fresh nonce and time for this attempt (`service` = the gateway
/// URL's host without port; `@target-uri` = the ws URL as dialled).
fn auth_headers(ctx: &CoreRx, host: &str) -> Vec<(&'static str, String)> {
    let Some(signer) = &ctx.did else {
        return vec![("Authorization", format!("Bearer {}", ctx.token))];
    };
    let nonce = didwba::sign::fresh_nonce();
    let now = didwba::time::now_unix();
    match ctx.auth_scheme {
        AuthScheme::DidWba => vec![(
            "Authorization",
            signer.didwba_header(
                ctx.gateway.host_name(),
                &nonce,
                &didwba::time::format_utc(now),
            ),
        )],
        AuthScheme::HttpSignatures => {
            let scheme = if ctx.gateway.tls { "wss" } else { "ws" };
            let uri = format!("{scheme}://{host}{}", ctx.gateway.path);
            let (input, sig) = signer.http_signature("GET", &uri, host, now, &nonce);
            vec![("Signature-Input", input), ("Signature", sig)]
        }
    }
}

async fn connect_and_serve(ctx: &Rc<CoreRx>, index: usize) -> Result<(), TunnelError> {
    let addr = ctx.gateway.authority();
    let connect = TcpStream::connect(addr.as_str());
    let mut io = match monoio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(TunnelError::Connect { addr, source }),
        Err(_) => return Err(TunnelError::Timeout),
    };
    let _ = io.set_nodelay(true);
    let key = ws::client_key();
    let host = ctx.gateway.host_header();
    let mut headers = auth_headers(ctx, &host);
    headers.push((FEATURES_HEADER, Features::SUPPORTED.to_header_value()));
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut req = Vec::with_capacity(1024);
    ws::write_client_request(&mut req, &host, &ctx.gateway.path, &key, &headers);
    let (r, _) = io.write_all(req).await;
    r.map_err(|e| TunnelError::Handshake(e.to_string()))?;

    // Read the answer: 101, or a refusal whose body says why.
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let deadline = Instant::now() + Duration::from_secs(30);
    let resp = loop {
        match ws::parse_server_response(&buf, &key) {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(e) => return Err(TunnelError::Handshake(e.to_string())),
        }
        read_some(&mut io, &mut buf, deadline).await?;
    };
    if !resp.is_upgrade() {
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
    ctx.count.offer(want);
    let _ = buf.split_to(resp.head_len);
    tracing::info!(tunnel = index, gateway = %addr, features = %features.to_header_value(), "tunnel connected");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "anp-proxy receiver tunnel {index} connected to {}://{}{}",
            if ctx.gateway.tls { "wss" } else { "ws" },
            ctx.gateway.authority(),
            ctx.gateway.path
        );
        let _ = out.flush();
    }
    serve(ctx, io, buf, index).await
}

async fn read_some<S: AsyncReadRent>(
    io: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Result<(), TunnelError> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    let b = std::mem::take(buf);
    let left = deadline.saturating_duration_since(Instant::now());
    let (res, b) = monoio::time::timeout(left, crate::net::read_append(io, b))
        .await
        .map_err(|_| TunnelError::Timeout)?;
    *buf = b;
    match res {
        Ok(0) => Err(TunnelError::Handshake(
            "gateway closed the connection".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(TunnelError::Handshake(e.to_string())),
    }
}

async fn serve(
    ctx: &Rc<CoreRx>,
    io: TcpStream,
    leftover: BytesMut,
    index: usize,
) -> Result<(), TunnelError> {
    let (r, w) = io.into_split();
    let (out, rx) = local_sync::mpsc::unbounded::channel();
    monoio::spawn(async move {
        let _ = run_writer(w, rx, Role::Client).await;
    });
    let alive = Rc::new(std::cell::Cell::new(true));
    if let Some(every) = ctx.ping_interval {
        let out = out.clone();
        let alive = alive.clone();
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(every).await;
                if !alive.get() || out.send(Outgoing::Ping(Bytes::new())).is_err() {
                    break;
                }
            }
        });
    }
    // Frames from the gateway: up to the largest chunk size it may use.
    let limits = ws::Limits {
        max_frame_payload: 16 * 1024 * 1024 + 1024,
        max_message: 16 * 1024 * 1024 + 1024,
        max_fragments: 1024,
    };
    let idle = ctx.ping_interval.map(|p| p * 3);
    let mut reader = WsReader::new(r, leftover, Decoder::new(Role::Client, limits), idle);
    let mut reasm = Reassembler::new(anpx::Limits {
        max_message_size: ctx.max_body + 64 * 1024,
        max_assemblies: 4096,
    });
    let result = loop {
        match reader.next().await {
            Ok(Event::Binary(msg)) => match reasm.push(msg) {
                Ok(Some(Message::Request {
                    request_id,
                    meta,
                    body,
                })) => {
                    let ctx = ctx.clone();
                    let out = out.clone();
                    monoio::spawn(handle_request(ctx, out, request_id, meta, body));
                }
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
                        let _ = out.send(Outgoing::Binary(anpx::encode_error(rid, &e.to_string())));
                    }
                }
            },
            Ok(Event::Ping(p)) => {
                let _ = out.send(Outgoing::Pong(p));
            }
            Ok(Event::Text(_)) | Ok(Event::Pong(_)) => {}
            Ok(Event::Close { code, reason }) => {
                let _ = out.send(Outgoing::Close(1000, String::new()));
                break Err(TunnelError::Ended(format!(
                    "gateway closed ({code:?} {reason})"
                )));
            }
            Err(ConnError::Ws(e)) => {
                let _ = out.send(Outgoing::Close(e.close_code(), e.to_string()));
                break Err(TunnelError::Ended(e.to_string()));
            }
            Err(e) => break Err(TunnelError::Ended(e.to_string())),
        }
    };
    alive.set(false);
    result
}

/// Calls the app for one request and sends the response (or an error
/// frame) back on the tunnel.
async fn handle_request(
    ctx: Rc<CoreRx>,
    out: OutTx,
    request_id: String,
    meta: RequestMeta,
    body: Bytes,
) {
    // Never more than max_concurrent upstream calls at once; excess waits.
    let _permit = match ctx.permits.clone().acquire_owned().await {
        Ok(p) => p,
        Err(_) => return,
    };
    let call = ctx.upstream.call(&meta, &body);
    let res = match ctx.upstream_timeout {
        Some(d) => match monoio::time::timeout(d, call).await {
            Ok(r) => r,
            Err(_) => Err(super::upstream::UpstreamError::Timeout(d)),
        },
        None => call.await,
    };
    match res {
        Ok((rmeta, rbody)) => {
            let mut json = Vec::with_capacity(512);
            rmeta.to_json(&mut json);
            let mut frames = Vec::with_capacity(1);
            anpx::encode_message(
                FrameType::Response,
                &request_id,
                Some(MetaRef::Response(&json)),
                &rbody,
                ctx.chunk_size,
                &mut frames,
            );
            for f in frames {
                if out.send(Outgoing::Binary(f)).is_err() {
                    return;
                }
            }
        }
        Err(e) => {
            tracing::warn!(%request_id, method = %meta.method, path = %meta.path, error = %e, "upstream call failed");
            let _ = out.send(Outgoing::Binary(anpx::encode_error(
                &request_id,
                &e.to_string(),
            )));
        }
    }
}
