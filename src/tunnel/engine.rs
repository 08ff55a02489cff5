//! The IO loop of one tunnel, the same for the gateway (server role, may
//! gather with `writev`) and the receiver (client role, masks).
//!
//! [`run`] reads WebSocket events until the tunnel ends and hands ANPX
//! frames, credit, a peer's draining notice and pongs to the role's
//! [`FrameSink`] (text is parsed by `protocol::control`); it answers
//! pings within the budget, sends pings every `ping_interval`, cuts a peer
//! silent for three intervals, and fails the tunnel with the close code a
//! protocol error calls for (RFC 6455 §7.4.1). It returns *before* waiting for the
//! writer, so the role can unregister the tunnel and fail what was in
//! flight at once; then [`Closing::finish`] gives the last frames (the
//! Close) at most `close_grace` to leave, and drops the socket and queue
//! with the writer after that: a peer that stopped reading cannot pin them.

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use local_sync::oneshot;
use monoio::io::{AsyncReadRent, AsyncWriteRent, Splitable};

use crate::protocol::control::{self, Control};
use crate::ws::conn::{run_writer, ConnError, OutRx, OutTx, Outgoing, WsReader};
use crate::ws::error::CLOSE_POLICY;
use crate::ws::ping_limit::PingBudget;
use crate::ws::{Decoder, Event, Masking, Role};

/// Limits and timers of one tunnel, from config (the `[gateway]` and
/// `[receiver]` keys share names where they mean the same).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Server (gateway) or client (receiver: masks every frame).
    pub role: Role,
    /// Plain TCP: bodies may go out as their own iovecs (`ws/conn.rs`).
    /// In the client role only with `zero_mask` (random masking copies).
    pub vectored: bool,
    /// Client role: the gateway negotiated `zeromask` (PROTOCOL.md §7.7),
    /// so frames carry the all-zero key. Set per tunnel.
    pub zero_mask: bool,
    /// Pings every this long; a peer silent for three is cut (1001).
    pub ping_interval: Option<Duration>,
    /// `tunnel_max_message_size`, `tunnel_max_fragments`.
    pub limits: crate::ws::Limits,
    /// `max_pings_per_second` the peer may send (1008 beyond).
    pub max_pings_per_second: usize,
    /// `tunnel_close_grace`: how long the last frames may take to leave.
    pub close_grace: Duration,
}

/// What a role does with what arrives on its tunnel.
pub trait FrameSink {
    /// One ANPX frame (a whole binary WebSocket message).
    fn frame(&mut self, msg: Bytes);
    /// The peer returned `bytes` of credit for `request_id` (`stream`).
    fn credit(&mut self, request_id: &str, bytes: usize);
    /// The peer is leaving (PROTOCOL.md §7.4): it wants no new requests;
    /// those in flight still complete. Only a receiver sends it, so a
    /// receiver's sink keeps this default: ignored, like any text (§6).
    fn draining(&mut self) {}
    /// The gateway wants `want` tunnels from this receiver (`scale`,
    /// PROTOCOL.md §7.8). Only a gateway sends it, so a gateway's sink
    /// keeps this default: ignored.
    fn tunnels(&mut self, _want: usize) {}
    /// A pong arrived with `payload` (an answer to one of the role's own
    /// pings; the engine's keepalive pings need no answer handled).
    fn pong(&mut self, _payload: &[u8]) {}
    /// Whether frames are expected soon (requests in flight): the reader
    /// then keeps its buffer while it waits. An idle tunnel's reader gives
    /// it back and waits for readiness holding none (`ws/conn.rs`).
    fn busy(&self) -> bool;
}

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The peer sent a Close (answered with 1000).
    Closed { code: Option<u16>, reason: String },
    /// The peer broke RFC 6455 or a limit; we closed with `code`.
    Protocol { code: u16, error: String },
    /// More than `max` pings in one second; we closed with 1008.
    PingFlood { max: usize },
    /// Nothing from the peer, not even a pong, for this long (1001).
    Idle(Duration),
    /// The connection failed or closed without a Close.
    Io(String),
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Closed { code, reason } => write!(f, "peer closed ({code:?} {reason})"),
            Ended::Protocol { code, error } => write!(f, "protocol error (close {code}): {error}"),
            Ended::PingFlood { max } => write!(
                f,
                "ping flood: more than {max} pings in one second (close {CLOSE_POLICY})"
            ),
            Ended::Idle(d) => write!(f, "no traffic for {d:?}"),
            Ended::Io(e) => f.write_str(e),
        }
    }
}

/// The writer of a tunnel whose reader has ended: see [`Closing::finish`].
pub struct Closing {
    out: OutTx,
    writer: monoio::task::JoinHandle<()>,
    stop: oneshot::Sender<()>,
    grace: Duration,
}

impl Closing {
    /// Queues a Close (1001 unless one was already sent, which ends the
    /// writer first) and waits at most `close_grace` for the writer; past
    /// it the writer is stopped, and the socket and queue go with it.
    pub async fn finish(self) {
        let _ = self.out.send(Outgoing::Close(1001, String::new()));
        drop(self.out);
        if monoio::time::timeout(self.grace, self.writer)
            .await
            .is_err()
        {
            let _ = self.stop.send(());
        }
    }
}

/// A new tunnel's outgoing queue: the role sends on `OutTx` (its handshake
/// reply, frames, credit) before and while [`run`] drives it.
pub fn queue() -> (OutTx, OutRx) {
    crate::ws::queue::channel()
}

/// Runs the tunnel on `io` until it ends; `leftover` holds bytes read past
/// the handshake. `out`/`rx` come from [`queue`].
pub async fn run<S, F>(
    io: S,
    leftover: BytesMut,
    out: OutTx,
    rx: OutRx,
    cfg: &EngineConfig,
    sink: &mut F,
) -> (Ended, Closing)
where
    S: Splitable,
    S::OwnedRead: AsyncReadRent + crate::net::Readable + 'static,
    S::OwnedWrite: AsyncWriteRent + 'static,
    F: FrameSink,
{
    let (r, w) = io.into_split();
    // The writer ends when a Close is sent, or when `stop` fires.
    let (stop, stopped) = oneshot::channel::<()>();
    let masking = match cfg.role {
        Role::Server => Masking::Unmasked,
        Role::Client if cfg.zero_mask => Masking::Zero,
        Role::Client => Masking::Random,
    };
    let vectored = cfg.vectored;
    let writer = monoio::spawn(async move {
        monoio::select! {
            r = run_writer(w, rx, masking, vectored) => if let Err(e) = r {
                tracing::debug!(error = %e, "tunnel writer ended");
            },
            _ = stopped => tracing::debug!("tunnel writer stopped"),
        }
    });
    let alive = Rc::new(Cell::new(true));
    if let Some(every) = cfg.ping_interval {
        monoio::spawn(pinger(out.clone(), alive.clone(), every));
    }
    let idle = cfg.ping_interval.map(|p| p * 3);
    let decoder = Decoder::new(cfg.role, cfg.limits);
    let mut reader = WsReader::new(r, leftover, decoder, idle);
    let ended = read_loop(&mut reader, &out, cfg.max_pings_per_second, sink).await;
    alive.set(false);
    let closing = Closing {
        out,
        writer,
        stop,
        grace: cfg.close_grace,
    };
    (ended, closing)
}

/// Pings every `every` until the tunnel ends.
async fn pinger(out: OutTx, alive: Rc<Cell<bool>>, every: Duration) {
    loop {
        monoio::time::sleep(every).await;
        if !alive.get() || out.send(Outgoing::Ping(Bytes::new())).is_err() {
            return;
        }
    }
}

async fn read_loop<R: AsyncReadRent + crate::net::Readable, F: FrameSink>(
    reader: &mut WsReader<R>,
    out: &OutTx,
    max_pings: usize,
    sink: &mut F,
) -> Ended {
    let mut pings = PingBudget::new(max_pings);
    loop {
        match reader.next(sink.busy()).await {
            Ok(Event::Binary(msg)) => sink.frame(msg),
            // Credit (`stream`) and the draining notice; any other text is
            // activity only (§6).
            Ok(Event::Text(t)) => match control::parse(&t) {
                Some(Control::Credit { request_id, bytes }) => sink.credit(&request_id, bytes),
                Some(Control::Draining) => sink.draining(),
                Some(Control::Tunnels { want }) => sink.tunnels(want),
                None => {}
            },
            Ok(Event::Pong(p)) => sink.pong(&p),
            Ok(Event::Ping(p)) => {
                if !pings.allow(Instant::now()) {
                    let _ = out.send(Outgoing::Close(CLOSE_POLICY, "ping flood".into()));
                    return Ended::PingFlood { max: max_pings };
                }
                let _ = out.send(Outgoing::Pong(p));
            }
            Ok(Event::Close { code, reason }) => {
                let _ = out.send(Outgoing::Close(1000, String::new()));
                return Ended::Closed {
                    code,
                    reason: reason.to_string(),
                };
            }
            Err(ConnError::Ws(e)) => {
                let code = e.close_code();
                let _ = out.send(Outgoing::Close(code, e.to_string()));
                return Ended::Protocol {
                    code,
                    error: e.to_string(),
                };
            }
            Err(ConnError::Idle(d)) => {
                let _ = out.send(Outgoing::Close(1001, "ping timeout".into()));
                return Ended::Idle(d);
            }
            Err(e) => return Ended::Io(e.to_string()),
        }
    }
}
