//! A tunnel upgrade on the public (or tunnel) port, from its head to the
//! running tunnel: the pending-upgrade slot and the core's handshake turn
//! (`upgrades.rs`), authentication
//! under `handshake_timeout` (tokens, DID-WBA: `crate::auth`), the
//! `duplicate_tunnels` decision, placement on the core with the fewest
//! tunnels of the identity and the hand-off of the socket to it, the 101,
//! and every refusal with its status. Never serves an HTTP request.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Splitable};

use super::core::{CoreCtx, CoreMsg, TunnelHandoff, TunnelOwner};
use super::error::{error_reply, ProxyError, UpgradeError};
use super::instances::Placement;
use super::respond::write_error;
use super::tunnel::run_tunnel;
use super::upgrades::{UpgradeRefusal, UpgradeSlot};
use crate::auth::UpgradeRequest;
use crate::config::DuplicateTunnels;
use crate::http::headers::Persist;
use crate::http::RequestHead;
use crate::net::Movable;
use crate::protocol::features::{
    valid_instance, Features, FEATURES_HEADER, INSTANCE_HEADER, TUNNELS_HEADER,
};

/// When an upgrade whose head began at `start` must have its 101.
pub(super) fn handshake_deadline(ctx: &CoreCtx, start: Instant) -> Option<Instant> {
    crate::config::secs(ctx.shared.config.gateway.handshake_timeout).map(|d| start + d)
}

/// Takes a pending-upgrade slot for `peer`, or answers 429/503 with
/// Retry-After (the longest a slot can stay taken; for the global cap with
/// paced handshakes, the time the pace takes to drain the queue) and
/// returns `None`.
pub(super) async fn upgrade_slot<S: AsyncWriteRent>(
    ctx: &CoreCtx,
    io: &mut S,
    out: &mut Vec<u8>,
    peer: SocketAddr,
) -> Option<UpgradeSlot> {
    match ctx.shared.upgrades.try_acquire(peer.ip()) {
        Ok(s) => Some(s),
        Err(e) => {
            let g = &ctx.shared.config.gateway;
            let longest = g.handshake_timeout.ceil().max(1.0) as u32;
            // A full queue in a reconnect storm drains at the handshake
            // pace: come back when it has (sooner than the longest a slot
            // can stay taken), not all at that same later second.
            let retry = match e {
                UpgradeRefusal::Global(n) if g.handshake_rate > 0 => {
                    let rate = g.handshake_rate as f64 * ctx.shared.workers as f64;
                    ((n as f64 / rate).ceil() as u32).clamp(1, longest)
                }
                _ => longest,
            };
            let err = ProxyError::Upgrade(UpgradeError::Pending(e, retry));
            tracing::warn!(%peer, reason = e.reason(), error = %e, status = error_reply(&err).status, "tunnel upgrade refused");
            refuse(io, out, &err).await;
            None
        }
    }
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
/// queued, whatever the outcome. Phases: this core's handshake turn,
/// authentication within the deadline, placement on a core, the 101.
#[allow(clippy::too_many_arguments)]
pub(super) async fn accept_tunnel<S>(
    ctx: Rc<CoreCtx>,
    mut io: S,
    head: RequestHead,
    head_buf: Bytes,
    leftover: BytesMut,
    peer: SocketAddr,
    tls: bool,
    slot: UpgradeSlot,
    deadline: Option<Instant>,
) where
    S: AsyncReadRent + AsyncWriteRent + Splitable + Movable + 'static,
    S::OwnedRead: AsyncReadRent + crate::net::Readable + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
{
    let mut out = Vec::with_capacity(512);
    let turn = match handshake_turn(&ctx, peer) {
        Ok(t) => t,
        Err(err) => return refuse(&mut io, &mut out, &err).await,
    };
    let checked = authenticate_in_time(&ctx, &head, &head_buf, peer, tls, turn, deadline).await;
    // The head's buffer is not kept for the tunnel's life.
    drop((head, head_buf));
    let Accepted {
        accept,
        identity,
        features,
        instance,
    } = match checked {
        Ok(a) => a,
        Err(e) => {
            ctx.shared.obs.auth_failures.record(e.reason());
            return refuse(&mut io, &mut out, &ProxyError::Upgrade(e)).await;
        }
    };
    let owner = TunnelOwner {
        identity: identity.name.clone(),
        instance,
        scale: features.scale,
    };
    let target = match place(&ctx, &owner, peer, S::MOVABLE) {
        Ok(core) => core,
        Err(err) => return refuse(&mut io, &mut out, &err).await,
    };
    write_accept(&mut out, &accept, features, ctx.shared.workers);
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
            hand_off(&ctx, target, h);
        }
        return;
    }
    // run_tunnel queues the 101 before its first await.
    drop(slot);
    run_tunnel(ctx, io, leftover, owner, features, peer, out, tls).await;
}

/// This core's handshake turn (`handshake_rate`): a reconnect storm is
/// served at a steady pace; too long a queue is refused with when to come
/// back.
fn handshake_turn(ctx: &CoreCtx, peer: SocketAddr) -> Result<Duration, ProxyError> {
    ctx.shared.upgrades.pace(ctx.index).map_err(|e| {
        let retry = match e {
            UpgradeRefusal::Paced(secs) => secs,
            _ => 1,
        };
        let err = ProxyError::Upgrade(UpgradeError::Pending(e, retry));
        tracing::warn!(%peer, reason = e.reason(), error = %e, status = error_reply(&err).status, "tunnel upgrade refused");
        err
    })
}

/// Waits for the turn, then authenticates, all before `deadline`. No IO
/// on the client's stream inside: dropping this at the deadline leaves
/// the stream usable for the 408.
async fn authenticate_in_time(
    ctx: &CoreCtx,
    head: &RequestHead,
    head_buf: &Bytes,
    peer: SocketAddr,
    tls: bool,
    turn: Duration,
    deadline: Option<Instant>,
) -> Result<Accepted, UpgradeError> {
    let checked = async {
        if !turn.is_zero() {
            monoio::time::sleep(turn).await;
        }
        authenticate_upgrade(ctx, head, head_buf, peer, tls).await
    };
    let Some(d) = deadline else {
        return checked.await;
    };
    match monoio::time::timeout(d.saturating_duration_since(Instant::now()), checked).await {
        Ok(r) => r,
        Err(_) => {
            ctx.shared.upgrades.note_timeout();
            tracing::warn!(%peer, reason = "handshake_timeout", "tunnel upgrade refused: not authenticated within handshake_timeout");
            Err(UpgradeError::HandshakeTimeout)
        }
    }
}

/// Tunnels are sharded by core: this one goes where its identity has the
/// fewest, so requests on every core find a local tunnel. Refused when
/// another receiver instance holds the identity (`duplicate_tunnels =
/// "refuse"`).
fn place(
    ctx: &CoreCtx,
    owner: &TunnelOwner,
    peer: SocketAddr,
    movable: bool,
) -> Result<usize, ProxyError> {
    match ctx.shared.place_tunnel(owner, ctx.index, movable) {
        Placement::Placed { core, others } => {
            if !others.is_empty() {
                second_instance(ctx, owner, &others, peer);
            }
            Ok(core)
        }
        Placement::Refused { others } => {
            ctx.shared.obs.auth_failures.record("duplicate_instance");
            tracing::warn!(%peer, identity = %owner.identity, instance = %owner.instance, connected = ?others,
                reason = "duplicate_instance", "tunnel upgrade refused: another receiver instance holds this identity's tunnels (duplicate_tunnels = refuse)");
            Err(ProxyError::Upgrade(UpgradeError::DuplicateInstance))
        }
        Placement::Elsewhere { asked } => {
            tracing::info!(%peer, identity = %owner.identity, core = ctx.index, asked,
                reason = "tunnel_core", "tunnel upgrade refused (503, Retry-After: 0): scale asked for a tunnel on another core, and a TLS tunnel cannot move there; the receiver dials again");
            Err(ProxyError::Upgrade(UpgradeError::OtherCore(asked)))
        }
    }
}

/// The 101: how many tunnels to keep and the features in force. With
/// `scale` the receiver starts with one; more come when load asks for
/// them (PROTOCOL.md §7.8).
fn write_accept(out: &mut Vec<u8>, accept: &str, features: Features, workers: usize) {
    let feat = features.to_header_value();
    let tunnels = if features.scale { 1 } else { workers }.to_string();
    let mut extra: Vec<(&str, &str)> = vec![(TUNNELS_HEADER, tunnels.as_str())];
    if !feat.is_empty() {
        extra.push((FEATURES_HEADER, feat.as_str()));
    }
    crate::ws::handshake::write_101(out, accept, &extra);
}

/// Moves an accepted tunnel's socket to core `target`, which registers it
/// and sends its 101 (the socket goes as a plain fd).
fn hand_off(ctx: &CoreCtx, target: usize, h: TunnelHandoff) {
    let peer = h.peer;
    ctx.shared
        .counters
        .tunnel_handoffs_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(%peer, identity = %h.owner.identity, from = ctx.index, to = target, "tunnel handed to another core");
    if ctx.shared.inboxes[target]
        .unbounded_send(CoreMsg::Tunnel(h))
        .is_err()
    {
        tracing::error!(%peer, "core inbox closed; tunnel dropped");
    }
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
) -> Result<Accepted, UpgradeError> {
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
            return Err(UpgradeError::BadHandshake(e.to_string()));
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
    let owns_routes = |name: &str| ctx.routes().owns_any(name);
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
        UpgradeError::Auth(e)
    };
    let identity = identity.map_err(refused)?;
    let owned =
        owns_routes(&identity.name) || (ctx.refresh_routes().await && owns_routes(&identity.name));
    if !owned {
        return Err(refused(crate::auth::AuthError::NoRoutes(
            identity.name.to_string(),
        )));
    }
    let mut features = get(FEATURES_HEADER)
        .map(Features::parse)
        .unwrap_or_default()
        .intersect(Features::SUPPORTED);
    // `tunnel_scale_up = 0`: every receiver keeps `workers` tunnels.
    features.scale &= ctx.shared.config.gateway.tunnel_scale_up > 0;
    // `tunnel_body_crc = true`: every frame's body CRC is checked.
    features.nocrc &= !ctx.shared.config.gateway.tunnel_body_crc;
    let instance = match get(INSTANCE_HEADER) {
        None => String::new(),
        Some(v) if valid_instance(v) => String::from_utf8_lossy(v).into_owned(),
        Some(_) => {
            tracing::warn!(%peer, reason = "bad_instance", "tunnel upgrade refused: invalid X-ANPX-Instance");
            return Err(UpgradeError::BadInstance);
        }
    };
    Ok(Accepted {
        accept,
        identity,
        features,
        instance,
    })
}

/// Answers a refused upgrade (status from [`error_reply`], the one map)
/// and closes the connection.
pub(super) async fn refuse<S: AsyncWriteRent>(io: &mut S, out: &mut Vec<u8>, err: &ProxyError) {
    write_error(io, out, err, false, Persist::Close).await;
    let _ = io.shutdown().await;
}
