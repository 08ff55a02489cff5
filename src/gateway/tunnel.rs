//! One receiver's tunnel on one core: its in-flight table, its writer
//! queue, and the reader task that pairs ANPX responses with waiting
//! requests by `request_id`. Many requests share a tunnel at once.
//!
//! A response that names an unknown request, or fails reassembly, is
//! refused and logged; nothing reaches the wrong client.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use local_sync::oneshot;
use monoio::io::{AsyncReadRent, AsyncWriteRent, Splitable};

use super::core::{CoreCtx, ProxyRequest, ProxyResponse, ProxyResult};
use super::error::ProxyError;
use super::routes::IdentityName;
use crate::protocol::anpx::{self, FrameType, Message, MetaRef, Reassembler};
use crate::protocol::features::Features;
use crate::ws::conn::{run_writer, ConnError, OutTx, Outgoing, WsReader};
use crate::ws::frame::{Decoder, Event, Role};

pub struct Tunnel {
    pub id: u64,
    pub identity: IdentityName,
    pub features: Features,
    pub peer: SocketAddr,
    out: OutTx,
    inflight: RefCell<HashMap<u64, oneshot::Sender<ProxyResult>>>,
    closed: Cell<bool>,
}

/// `request_id` on the wire: 16 lowercase hex digits of a u64 (core index
/// in the top bits). Formatted on the stack: no allocation per request.
pub fn format_request_id(id: u64, buf: &mut [u8; 16]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((id >> (60 - 4 * i)) & 0xf) as usize];
    }
    std::str::from_utf8(buf).unwrap_or("0000000000000000")
}

pub fn parse_request_id(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

impl Tunnel {
    /// Sends one request and waits for its response, bounded by `timeout`.
    pub async fn call(&self, ctx: &CoreCtx, mut req: ProxyRequest) -> ProxyResult {
        if self.closed.get() {
            return Err(ProxyError::TunnelClosed);
        }
        let limit = ctx.settings.max_inflight_per_tunnel;
        if self.inflight.borrow().len() >= limit {
            return Err(ProxyError::TunnelBusy(limit));
        }
        if !self.features.exact {
            // Plain v1 peer: never send keys it did not negotiate.
            req.meta.raw_target = None;
            req.meta.header_list = None;
        }
        let id = ctx.next_request_id();
        let mut idbuf = [0u8; 16];
        let rid = format_request_id(id, &mut idbuf);
        let mut json = Vec::with_capacity(512);
        req.meta.to_json(&mut json);
        let mut frames = Vec::with_capacity(1);
        anpx::encode_message(
            FrameType::Request,
            rid,
            Some(MetaRef::Request(&json)),
            &req.body,
            ctx.settings.chunk_size,
            &mut frames,
        );
        let (tx, rx) = oneshot::channel();
        self.inflight.borrow_mut().insert(id, tx);
        for f in frames {
            if self.out.send(Outgoing::Binary(f)).is_err() {
                self.inflight.borrow_mut().remove(&id);
                return Err(ProxyError::TunnelClosed);
            }
        }
        match monoio::time::timeout(ctx.settings.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProxyError::TunnelClosed),
            Err(_) => {
                self.inflight.borrow_mut().remove(&id);
                Err(ProxyError::Timeout)
            }
        }
    }

    fn complete(&self, request_id: &str, result: ProxyResult) -> bool {
        let Some(id) = parse_request_id(request_id) else {
            return false;
        };
        match self.inflight.borrow_mut().remove(&id) {
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }

    fn close(&self) {
        self.closed.set(true);
        // Dropping the senders fails every waiting request with 502.
        self.inflight.borrow_mut().clear();
    }
}

/// Runs an accepted, authenticated tunnel until it ends.
pub async fn run_tunnel<S>(
    ctx: Rc<CoreCtx>,
    io: S,
    leftover: BytesMut,
    identity: IdentityName,
    features: Features,
    peer: SocketAddr,
    handshake: Vec<u8>,
) where
    S: Splitable + 'static,
    S::OwnedRead: AsyncReadRent + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    let (r, w) = io.into_split();
    let (out, rx) = local_sync::mpsc::unbounded::channel();
    monoio::spawn(async move {
        if let Err(e) = run_writer(w, rx, Role::Server).await {
            tracing::debug!(error = %e, "tunnel writer ended");
        }
    });
    let tunnel = Rc::new(Tunnel {
        id: ctx.next_tunnel_id(),
        identity: identity.clone(),
        features,
        peer,
        out: out.clone(),
        inflight: RefCell::new(HashMap::new()),
        closed: Cell::new(false),
    });
    // Registered before the 101 leaves: once the receiver sees it, every
    // core can route through this tunnel.
    ctx.register_tunnel(tunnel.clone());
    let _ = out.send(Outgoing::Raw(handshake));
    tracing::info!(identity = %identity, %peer, core = ctx.index, tunnel = tunnel.id,
        features = %features.to_header_value(), "tunnel connected");

    let ping = ctx.settings.ping_interval;
    if let Some(every) = ping {
        let out = out.clone();
        let t = tunnel.clone();
        monoio::spawn(async move {
            loop {
                monoio::time::sleep(every).await;
                if t.closed.get() || out.send(Outgoing::Ping(Bytes::new())).is_err() {
                    break;
                }
            }
        });
    }
    let chunk = ctx.settings.chunk_size;
    let limits = crate::ws::frame::Limits {
        // Receivers may use a chunk size of their own up to 1 MiB.
        max_frame_payload: chunk.max(1 << 20) + 1024,
        max_message: chunk.max(1 << 20) + 1024,
        max_fragments: 1024,
    };
    let idle = ping.map(|p| p * 3);
    let mut reader = WsReader::new(r, leftover, Decoder::new(Role::Server, limits), idle);
    let mut reasm = Reassembler::new(anpx::Limits {
        max_message_size: ctx.settings.max_body_size + 64 * 1024,
        max_assemblies: ctx.settings.max_inflight_per_tunnel,
    });
    let why = loop {
        match reader.next().await {
            Ok(Event::Binary(msg)) => on_frame(&tunnel, &mut reasm, msg),
            Ok(Event::Text(_)) | Ok(Event::Pong(_)) => {} // activity only (PROTOCOL.md §6)
            Ok(Event::Ping(p)) => {
                let _ = out.send(Outgoing::Pong(p));
            }
            Ok(Event::Close { code, reason }) => {
                let _ = out.send(Outgoing::Close(1000, String::new()));
                break format!("receiver closed ({code:?} {reason})");
            }
            Err(ConnError::Ws(e)) => {
                let _ = out.send(Outgoing::Close(e.close_code(), e.to_string()));
                break format!("protocol error: {e}");
            }
            Err(ConnError::Idle(d)) => {
                let _ = out.send(Outgoing::Close(1001, "ping timeout".into()));
                break format!("no traffic for {d:?}");
            }
            Err(e) => break e.to_string(),
        }
    };
    ctx.unregister_tunnel(&tunnel);
    let lost = tunnel.inflight.borrow().len();
    tunnel.close();
    tracing::info!(identity = %identity, %peer, tunnel = tunnel.id, in_flight_failed = lost,
        reason = %why, "tunnel disconnected");
}

fn on_frame(tunnel: &Tunnel, reasm: &mut Reassembler, msg: Bytes) {
    match reasm.push(msg) {
        Ok(None) => {}
        Ok(Some(Message::Response {
            request_id,
            meta,
            body,
        })) => {
            if !tunnel.complete(&request_id, Ok(ProxyResponse { meta, body })) {
                tracing::warn!(tunnel = tunnel.id, %request_id, "response for unknown request refused");
            }
        }
        Ok(Some(Message::Error {
            request_id,
            message,
        })) => {
            tracing::info!(tunnel = tunnel.id, %request_id, %message, "receiver error frame");
            if !tunnel.complete(&request_id, Err(ProxyError::Receiver(message))) {
                tracing::warn!(tunnel = tunnel.id, %request_id, "error frame for unknown request refused");
            }
        }
        Ok(Some(Message::Request { request_id, .. })) => {
            tracing::warn!(tunnel = tunnel.id, %request_id, "receiver sent a request frame; refused");
        }
        Err(e) => {
            tracing::warn!(tunnel = tunnel.id, error = %e, "invalid ANPX frame refused");
            if let Some(rid) = e.request_id() {
                tunnel.complete(rid, Err(ProxyError::BadResponse(e.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_round_trip() {
        let mut b = [0u8; 16];
        for id in [0u64, 1, (3 << 48) | 77, u64::MAX] {
            let s = format_request_id(id, &mut b).to_owned();
            assert_eq!(s.len(), 16);
            assert_eq!(parse_request_id(&s), Some(id));
        }
        assert_eq!(parse_request_id("xyz"), None);
        assert_eq!(
            parse_request_id("2265b1f5-91b7-4d8f-b358-1027c386bbc4"),
            None
        );
    }
}
