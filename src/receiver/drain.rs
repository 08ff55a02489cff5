//! The receiver's graceful shutdown (SIGTERM/SIGINT): each core is told
//! once, by the signal thread, to shut down by a deadline
//! (`shutdown_grace` after the signal). Its slots stop reconnecting, and
//! every live tunnel [`leave`]s: it tells the gateway it is draining
//! (PROTOCOL.md §7.4) so no new request is sent to it, lets the requests
//! in flight finish, then closes with 1001. What is still in flight when
//! the deadline passes is abandoned, and logged. A tunnel to a gateway
//! address that left DNS (`fleet.rs`) leaves the same way.
//!
//! Never: locks, or anything on the request path. A core learns of the
//! shutdown through its own [`Flag`]; the only cross-thread traffic is one
//! [`DrainOrder`] in and one report out per core.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fleet::CoreGateway;
use super::tunnel::CoreRx;
use crate::protocol::control::{DRAINING_MESSAGE, DRAINING_PING};
use crate::sync::Flag;
use crate::ws::conn::{OutTx, Outgoing};

/// The signal thread's word to one core: shut down by `until`, then say
/// so on `done` (with the core's index).
pub struct DrainOrder {
    pub until: Instant,
    pub done: std::sync::mpsc::Sender<usize>,
}

/// A core's side of the shutdown, in its [`CoreRx`].
#[derive(Default)]
pub struct CoreDrain {
    /// Raised when the order comes: slots stop reconnecting, tunnels leave.
    pub draining: Flag,
    /// The order's deadline (set before `draining` is raised).
    until: Cell<Option<Instant>>,
    /// Tunnels of this core that are connected and serving.
    live: Cell<usize>,
}

impl CoreDrain {
    /// A tunnel starts serving; [`Self::tunnel_ended`] when it stops.
    pub fn tunnel_started(&self) {
        self.live.set(self.live.get() + 1);
    }

    pub fn tunnel_ended(&self) {
        self.live.set(self.live.get() - 1);
    }

    fn until(&self) -> Instant {
        self.until.get().unwrap_or_else(Instant::now)
    }
}

/// How often a shutting-down core looks at what is left. Polls: this runs
/// once per process life, never on the request path.
const POLL: Duration = Duration::from_millis(10);

/// Waits for this core's order (none comes if the process never gets a
/// signal), raises the flag, and reports once every tunnel here has
/// closed, or `tunnel_close_grace` after the deadline at the latest (a
/// gateway that does not answer our Close).
pub async fn shut_down(
    ctx: Rc<CoreRx>,
    order: futures_channel::oneshot::Receiver<DrainOrder>,
    core: usize,
) {
    let Ok(order) = order.await else {
        return;
    };
    let d = &ctx.drain;
    d.until.set(Some(order.until));
    d.draining.raise();
    let give_up = order.until + ctx.engine.close_grace;
    while d.live.get() > 0 && Instant::now() < give_up {
        monoio::time::sleep(POLL).await;
    }
    if d.live.get() > 0 {
        tracing::warn!(
            core,
            tunnels = d.live.get(),
            "tunnels still open after shutdown_grace and tunnel_close_grace"
        );
    }
    let _ = order.done.send(core);
}

/// One tunnel's part in a shutdown, shared by its sink and [`leave`].
#[derive(Default)]
pub struct Leaving {
    /// The gateway answered the ping sent after the notice: it has read
    /// the notice, and every request it sent before is here (§7.4).
    pub heard: Flag,
    /// The tunnel ended, for whatever reason: nothing left to do.
    pub ended: Flag,
}

impl Leaving {
    /// The sink saw a pong: ours, if it carries [`DRAINING_PING`].
    pub fn pong(&self, payload: &[u8]) {
        if payload == DRAINING_PING {
            self.heard.raise();
        }
    }
}

/// Runs beside a tunnel until it ends. When the core drains: the notice
/// and its ping go to the gateway; once its requests in flight (`in_flight`)
/// are done, or the deadline passes, the tunnel is closed with 1001.
pub async fn leave(
    ctx: Rc<CoreRx>,
    gw: Rc<CoreGateway>,
    out: OutTx,
    state: Rc<Leaving>,
    index: usize,
    in_flight: impl Fn() -> usize,
) {
    // The receiver shuts down, or this gateway's address left DNS (then
    // the tunnel has `shutdown_grace` to finish, like a shutdown).
    let until = monoio::select! {
        _ = ctx.drain.draining.wait() => ctx.drain.until(),
        _ = gw.gone.wait() => Instant::now() + ctx.shutdown_grace,
        _ = state.ended.wait() => return,
    };
    let _ = out.send(Outgoing::Text(DRAINING_MESSAGE.to_vec()));
    let _ = out.send(Outgoing::Ping(Bytes::from_static(DRAINING_PING)));
    tracing::info!(
        tunnel = index,
        in_flight = in_flight(),
        "shutting down: told the gateway this tunnel is draining"
    );
    let left = until.saturating_duration_since(Instant::now());
    let heard = monoio::select! {
        _ = state.heard.wait() => true,
        _ = state.ended.wait() => false,
        _ = monoio::time::sleep(left) => false,
    };
    if heard {
        tracing::info!(
            tunnel = index,
            in_flight = in_flight(),
            "draining: the gateway sends no new requests on this tunnel"
        );
    }
    while in_flight() > 0 && !state.ended.is_set() && Instant::now() < until {
        monoio::time::sleep(POLL).await;
    }
    if state.ended.is_set() {
        return;
    }
    match in_flight() {
        0 => tracing::info!(tunnel = index, "drained: closing the tunnel"),
        n => tracing::warn!(
            tunnel = index,
            abandoned = n,
            "shutdown_grace is over: requests in flight abandoned; closing the tunnel"
        ),
    }
    let _ = out.send(Outgoing::Close(1001, "receiver shutting down".into()));
}
