//! Per-core state and request dispatch.
//!
//! [`CoreCtx`] is everything a request touches, owned by one runtime: the
//! route table copy (replaced whole when the registry changes,
//! [`CoreMsg::Routes`]), this core's tunnels and their in-flight tables, the
//! request-id sequence. No locks or atomics here on the request path.
//! [`Shared`] is the cross-core part, touched only on rare events: a tunnel
//! joining or leaving, and the counted fallback when this core has no
//! tunnel for a route (`cross_core_dispatch_total`).

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_channel::{mpsc as xmpsc, oneshot as xoneshot};

use super::error::ProxyError;
use super::instances::{Ask, Placement};
use super::routes::{IdentityName, RouteTable};
use super::tunnel::Tunnel;
use crate::auth::Authenticator;
use crate::config::{secs, Config};
use crate::protocol::anpx::binmeta;
use crate::registry::reload::{PollerMsg, RoutesUpdate};
use crate::sync::Flag;

/// A request ready for a tunnel. `Send`: it may cross to another core.
#[derive(Debug)]
pub struct ProxyRequest {
    pub meta: binmeta::Request,
    pub body: Bytes,
}

/// A response from the receiver, as it can cross cores (`Send`).
#[derive(Debug)]
pub struct ProxyResponse {
    pub meta: binmeta::Response,
    pub body: CrossBody,
    /// The ANPX `request_id` it travelled under (access log).
    pub request_id: u64,
}

pub type ProxyResult = Result<ProxyResponse, ProxyError>;

/// A [`ProxyResponse`]'s body: whole (a plain v1 peer sends it so), or
/// streamed from the core that holds the tunnel (`tunnel::forward_body`).
#[derive(Debug)]
pub enum CrossBody {
    Full(Bytes),
    Stream(super::tunnel::CrossPieces),
}

/// The answer to a request handed to another core (`CoreCtx::hand_over`):
/// that core's result, or `TunnelClosed` when it dropped the request
/// unanswered. Polled again after a `select!` it lost, it still waits.
pub struct CrossReply(xoneshot::Receiver<ProxyResult>);

impl std::future::Future for CrossReply {
    type Output = ProxyResult;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<ProxyResult> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ProxyError::TunnelClosed)))
    }
}

/// A request handed to another core because this one has no tunnel for it.
pub struct CrossRequest {
    pub identity: IdentityName,
    pub req: ProxyRequest,
    /// What follows `req`.
    pub rest: CrossRest,
    pub reply: xoneshot::Sender<ProxyResult>,
}

/// What follows a request handed to another core.
pub enum CrossRest {
    /// Nothing: its body is whole (`Tunnel::call`).
    Whole,
    /// The rest of a body still coming from the client, `req.body` being
    /// its first piece (`Tunnel::call_streamed`).
    Body(super::tunnel::CrossUpload),
    /// An upgraded stream's client-to-app bytes, each piece waiting for
    /// the app's credit at most `wait` (`Tunnel::call_duplex`).
    Duplex {
        up: super::tunnel::CrossUpload,
        wait: Duration,
    },
}

/// An accepted, authenticated tunnel moved to the core that lacks one for
/// its identity (DESIGN.md: tunnels are sharded by core). The socket moves
/// as a plain fd; the target core registers it, then sends the 101.
pub struct TunnelHandoff {
    pub fd: std::os::fd::OwnedFd,
    pub leftover: bytes::BytesMut,
    pub owner: TunnelOwner,
    pub features: crate::protocol::features::Features,
    pub peer: std::net::SocketAddr,
    pub handshake: Vec<u8>,
}

/// Whose a tunnel is: the identity it proved and the receiver instance
/// that opened it (`X-ANPX-Instance`; empty when the receiver sent none).
#[derive(Debug, Clone)]
pub struct TunnelOwner {
    pub identity: IdentityName,
    pub instance: String,
    /// Its receiver negotiated `scale` (PROTOCOL.md §7.8).
    pub scale: bool,
}

/// What one core's inbox carries (rare events only).
pub enum CoreMsg {
    Request(CrossRequest),
    Tunnel(TunnelHandoff),
    /// A WebSocket upgrade for an identity with no tunnel on the core that
    /// accepted it, moved to one that has (`gateway/passthrough.rs`).
    Upgrade(super::passthrough::UpgradeHandoff),
    /// A new route table from the registry poller (`registry::reload`).
    Routes(RoutesUpdate),
    /// SIGTERM/SIGINT, phase 1: stop accepting and finish what is in
    /// flight; the sender learns when this core is idle.
    Drain(std::sync::mpsc::Sender<usize>),
    /// Phase 2, once every core is idle (a request may cross cores): close
    /// this core's tunnels with 1001; the sender learns when they are gone.
    CloseTunnels(std::sync::mpsc::Sender<usize>),
    /// SIGHUP: new TLS acceptors for the listeners (certificates reloaded);
    /// the sender learns when this core has them.
    Tls(super::accept::Acceptors, std::sync::mpsc::Sender<usize>),
    /// The admin thread asks for this core's metrics (`gateway/metrics.rs`).
    Metrics(std::sync::mpsc::Sender<super::metrics::Snapshot>),
    /// SIGHUP: the rate limits and admission limits of the reloaded
    /// config (`gateway/admission.rs`). Sent before [`CoreMsg::Tls`], whose
    /// answer therefore also means these are in force.
    Limits(Arc<Config>),
    /// `duplicate_tunnels = "replace"`: close this core's tunnels of
    /// `identity` that another instance than `keep` opened.
    Evict {
        identity: IdentityName,
        keep: String,
    },
    /// `scale` (PROTOCOL.md §7.8): another core hands off enough of
    /// `identity`'s requests to want a tunnel of its own; ask the receiver,
    /// on a tunnel of it here, to keep `want`.
    WantTunnels {
        identity: IdentityName,
        want: usize,
    },
    /// `scale`: this core holds two or more of the identity's tunnels
    /// while another core has none; let one go (the other core's next ask
    /// brings one there).
    ReleaseOne(IdentityName),
}

/// Process-wide counters (cold path or per-event, never per byte).
#[derive(Debug, Default)]
pub struct Counters {
    pub cross_core_dispatch_total: AtomicU64,
    pub tunnel_handoffs_total: AtomicU64,
    /// `scale`: tunnels asked for, and quiet ones let go.
    pub scale_asks_total: AtomicU64,
    pub scale_releases_total: AtomicU64,
    pub connections: AtomicUsize,
    pub tunnels: AtomicUsize,
}

/// State shared by all cores. Locked only on tunnel join/leave and on the
/// counted cross-core fallback.
pub struct Shared {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    /// The route table in force; cores copy it at start, then follow
    /// [`CoreMsg::Routes`]. Locked only on those rare events.
    routes: Mutex<RoutesUpdate>,
    /// The registry thread's "read now" queue (none in embedders that
    /// start no registry).
    registry_refresh: OnceLock<std::sync::mpsc::Sender<PollerMsg>>,
    /// What the registry poller read (`/metrics`); set when it starts.
    pub registry_stats: OnceLock<Arc<crate::registry::reload::PollStats>>,
    /// identity → tunnels per core and per receiver instance.
    tunnel_book: Mutex<super::instances::TunnelBook>,
    pub inboxes: Vec<xmpsc::UnboundedSender<CoreMsg>>,
    pub counters: Counters,
    /// Access-log sink and auth failure counts (`gateway/observe.rs`).
    pub obs: super::observe::SharedObs,
    pub workers: usize,
    /// Pending tunnel upgrades per client IP and in all (cold path).
    pub upgrades: Arc<super::upgrades::UpgradeLimiter>,
    /// ANPX frames refused, by reason (error path).
    pub anpx_refused: super::refusals::FrameRefusals,
    /// Connections per client address, refusals at accept (per connection).
    pub conn_limits: Arc<super::conn_limits::ConnLimits>,
    /// Upgraded (WebSocket pass-through) streams open per identity, all
    /// cores (a `Mutex` taken when one opens and when it closes).
    pub upgraded: super::passthrough::OpenStreams,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        auth: Authenticator,
        routes: Arc<RouteTable>,
        inboxes: Vec<xmpsc::UnboundedSender<CoreMsg>>,
    ) -> Self {
        let workers = inboxes.len();
        let g = &config.gateway;
        // Half the handshake's time may go to waiting for its turn.
        let max_wait = crate::config::secs(g.handshake_timeout)
            .map_or(std::time::Duration::from_secs(5), |d| d / 2);
        let upgrades = super::upgrades::UpgradeLimiter::paced(
            g.max_pending_upgrades_per_ip,
            g.max_pending_upgrades,
            workers,
            super::upgrades::Pace::new(g.handshake_rate, g.handshake_burst, max_wait),
        );
        let conn_limits =
            super::conn_limits::ConnLimits::new(config.gateway.max_connections_per_ip);
        Self {
            config,
            auth,
            routes: Mutex::new(RoutesUpdate {
                generation: 0,
                table: routes,
            }),
            registry_refresh: OnceLock::new(),
            registry_stats: OnceLock::new(),
            tunnel_book: Mutex::new(super::instances::TunnelBook::new(workers)),
            inboxes,
            counters: Counters::default(),
            obs: Default::default(),
            workers,
            upgrades,
            anpx_refused: Default::default(),
            conn_limits,
            upgraded: Default::default(),
        }
    }

    /// The route table in force (cold path: core start, reloads).
    pub fn routes(&self) -> RoutesUpdate {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes `routes` the table in force and sends it to every core.
    /// False when no core is listening any more.
    pub fn publish_routes(&self, routes: RoutesUpdate) -> bool {
        *self.routes.lock().unwrap_or_else(|e| e.into_inner()) = routes.clone();
        let mut delivered = false;
        for tx in &self.inboxes {
            delivered |= tx.unbounded_send(CoreMsg::Routes(routes.clone())).is_ok();
        }
        delivered
    }

    /// Connects cores to the registry thread's "read now" queue (once).
    pub fn set_registry_refresh(&self, tx: std::sync::mpsc::Sender<PollerMsg>) {
        let _ = self.registry_refresh.set(tx);
    }

    /// SIGHUP: the registry thread rebuilds the route table with `cfg`'s
    /// own identities and publishes it to every core.
    pub fn reload_routes(&self, cfg: Arc<Config>) -> bool {
        self.registry_refresh
            .get()
            .is_some_and(|tx| tx.send(PollerMsg::Reload(cfg)).is_ok())
    }

    /// Admits a tunnel of `owner` under `duplicate_tunnels` and chooses
    /// the core it should live on: the one with the fewest tunnels of that
    /// identity, preferring `here` on a tie (or always `here` when the
    /// connection cannot move). Counts it there.
    pub fn place_tunnel(&self, owner: &TunnelOwner, here: usize, movable: bool) -> Placement {
        let policy = self.config.gateway.duplicate_tunnels;
        let placed = self.book().place(
            &owner.identity,
            &owner.instance,
            owner.scale,
            here,
            movable,
            policy,
            std::time::Instant::now(),
        );
        if matches!(placed, Placement::Placed { .. }) {
            self.counters.tunnels.fetch_add(1, Ordering::Relaxed);
        }
        placed
    }

    fn book(&self) -> std::sync::MutexGuard<'_, super::instances::TunnelBook> {
        self.tunnel_book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tunnel_left(&self, owner: &TunnelOwner, core: usize) {
        self.book()
            .left(&owner.identity, &owner.instance, owner.scale, core);
        self.counters.tunnels.fetch_sub(1, Ordering::Relaxed);
    }

    /// `scale`: core `core` hands off enough of `identity`'s requests that
    /// a tunnel of its own would pay: asks the receiver for one more
    /// through a core that holds one, or has a core holding two let one
    /// go (`TunnelBook::ask` decides). Cold path: at most once per
    /// identity and core per scale tick.
    fn ask_tunnel(&self, identity: &IdentityName, core: usize) {
        let ask = self.book().ask(identity, core, std::time::Instant::now());
        let (to, msg) = match ask {
            None => return,
            Some(Ask::More { holder, want }) => {
                self.counters
                    .scale_asks_total
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(identity = %identity, core, want,
                    "scale: this core hands off enough requests to want a tunnel; asking the receiver for one more");
                let identity = identity.clone();
                (holder, CoreMsg::WantTunnels { identity, want })
            }
            Some(Ask::Move { from }) => {
                tracing::info!(identity = %identity, core, from,
                    "scale: this core hands off enough requests to want a tunnel, and another holds two; letting one of those go");
                (from, CoreMsg::ReleaseOne(identity.clone()))
            }
        };
        let _ = self.inboxes[to].unbounded_send(msg);
    }

    /// `scale`: takes a quiet tunnel on `core` out of the book, unless it
    /// is its identity's last (false).
    fn release_tunnel(&self, owner: &TunnelOwner, core: usize) -> bool {
        let released = self.book().release(&owner.identity, &owner.instance, core);
        if released {
            self.counters.tunnels.fetch_sub(1, Ordering::Relaxed);
            self.counters
                .scale_releases_total
                .fetch_add(1, Ordering::Relaxed);
        }
        released
    }

    /// A core other than `not` with a tunnel for `identity`, spread by `hint`.
    pub(super) fn remote_core(&self, identity: &str, not: usize, hint: u64) -> Option<usize> {
        self.book().remote_core(identity, not, hint)
    }

    /// identity → tunnels per core (admin listener; cold path).
    pub fn tunnels_by_identity(&self) -> Vec<(IdentityName, Vec<usize>)> {
        self.book().per_core()
    }

    /// identity → (receiver instance, tunnels) (admin listener; cold path).
    pub fn instances_by_identity(&self) -> Vec<(IdentityName, Vec<(String, usize)>)> {
        self.book().instances()
    }

    /// Total tunnels per identity (for logs and `/health`).
    pub fn tunnel_count(&self) -> usize {
        self.counters.tunnels.load(Ordering::Relaxed)
    }
}

/// Limits and timeouts read once into plain values for the hot path.
#[derive(Debug, Clone)]
pub struct Settings {
    pub timeout: Duration,
    pub keepalive_timeout: Option<Duration>,
    pub header_timeout: Option<Duration>,
    /// `request_body_timeout` and `request_body_min_rate`.
    pub body_pace: super::pace::PaceLimits,
    /// Request bodies up to this size are read whole before dispatch.
    pub request_buffer_size: usize,
    pub max_body_size: usize,
    pub chunk_size: usize,
    pub max_inflight_per_tunnel: usize,
    /// Longest pause inside a streamed response body.
    pub stream_idle_timeout: Duration,
    /// WebSocket pass-through: idle limit of an upgraded stream, and how
    /// many one identity may hold open (0 = no limit).
    pub upgrade_idle_timeout: Option<Duration>,
    pub max_upgraded_per_identity: usize,
    pub tunnel_path: String,
    pub trust_forwarded: bool,
    pub head_limits: crate::http::Limits,
    pub shutdown_grace: Duration,
    pub no_tunnel_wait: Option<Duration>,
    /// The tunnel engine's limits and timers (`vectored` set per tunnel).
    pub tunnel: crate::tunnel::EngineConfig,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        let g = &c.gateway;
        Self {
            timeout: secs(g.timeout).unwrap_or(Duration::from_secs(30)),
            keepalive_timeout: secs(g.keepalive_timeout),
            header_timeout: secs(g.header_timeout),
            body_pace: super::pace::PaceLimits {
                gap: secs(g.request_body_timeout),
                min_rate: g.request_body_min_rate,
            },
            request_buffer_size: g.request_buffer_size,
            max_body_size: g.max_body_size,
            chunk_size: g.chunk_size,
            max_inflight_per_tunnel: g.max_inflight_per_tunnel,
            stream_idle_timeout: secs(g.stream_idle_timeout).unwrap_or(Duration::from_secs(3600)),
            upgrade_idle_timeout: secs(g.upgrade_idle_timeout),
            max_upgraded_per_identity: g.max_upgraded_per_identity,
            tunnel_path: g.tunnel_path.clone(),
            trust_forwarded: g.trust_forwarded,
            head_limits: crate::http::Limits {
                max_request_line: g.max_request_line,
                max_head: g.max_head_size,
                max_headers: g.max_headers,
            },
            shutdown_grace: Duration::from_secs_f64(g.shutdown_grace.max(0.0)),
            no_tunnel_wait: secs(g.no_tunnel_wait),
            tunnel: {
                let max_message = g.tunnel_max_message_size.max(g.chunk_size + 1024);
                crate::tunnel::EngineConfig {
                    role: crate::ws::Role::Server,
                    vectored: true,
                    zero_mask: false,
                    ping_interval: secs(g.ping_interval),
                    limits: crate::ws::Limits {
                        max_frame_payload: max_message,
                        max_message,
                        max_fragments: g.tunnel_max_fragments,
                    },
                    max_pings_per_second: g.max_pings_per_second,
                    close_grace: Duration::from_secs_f64(g.tunnel_close_grace.max(0.0)),
                }
            },
        }
    }
}

/// One core's world.
pub struct CoreCtx {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub settings: Settings,
    /// This core's own copy: `Rc`, so taking it costs no atomic.
    routes: RefCell<Rc<RouteTable>>,
    /// Generation of `routes` ([`RoutesUpdate`]): older ones are ignored.
    routes_generation: Cell<u64>,
    tunnels: RefCell<crate::FastMap<IdentityName, Vec<Rc<Tunnel>>>>,
    /// Tunnels whose receiver is leaving (PROTOCOL.md §7.4): out of
    /// `tunnels` and the book, so no new request goes to them; kept here
    /// until they end, for a drain of this gateway to wait for and close.
    leaving: RefCell<Vec<Rc<Tunnel>>>,
    /// Read and write buffers lent to connections while they work.
    pub pool: crate::pool::BufPool,
    seq: Cell<u64>,
    next_tunnel_id: Cell<u64>,
    /// Raised once when the gateway drains (SIGTERM/SIGINT).
    pub draining: Flag,
    /// Client connections working on a request (not idle): a drain waits
    /// for them. A plain `Cell`: only this core touches it.
    pub busy: Cell<usize>,
    /// The listeners' TLS acceptors in force (replaced on SIGHUP).
    pub acceptors: RefCell<super::accept::Acceptors>,
    /// When this core last accepted a connection: a drain gives one just
    /// accepted (its request not yet read) a moment to send it.
    pub last_accept: Cell<std::time::Instant>,
    /// Request metrics and access log of this core.
    pub obs: super::observe::CoreObs,
    /// Rate limits and places in flight per identity (`admission.rs`).
    pub admission: super::admission::Admission,
    /// Requests per identity handed to another core since the last scale
    /// tick (`scale`): counted on the cross-core path only.
    handoffs: RefCell<crate::FastMap<IdentityName, u32>>,
}

/// Marks a client connection busy (counted in [`CoreCtx::busy`]) while it
/// works on a request; a drain waits until none is.
pub struct Busy(Rc<CoreCtx>);

impl Busy {
    pub fn new(ctx: &Rc<CoreCtx>) -> Self {
        ctx.busy.set(ctx.busy.get() + 1);
        Self(ctx.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.set(self.0.busy.get() - 1);
    }
}

impl CoreCtx {
    pub fn new(index: usize, shared: Arc<Shared>, acceptors: super::accept::Acceptors) -> Self {
        let settings = Settings::from_config(&shared.config);
        let first = shared.routes();
        let routes = RefCell::new(Rc::new(RouteTable::clone(&first.table)));
        let routes_generation = Cell::new(first.generation);
        let obs = super::observe::CoreObs::new(&shared.obs);
        let admission = super::admission::Admission::new(&shared.config.gateway);
        Self {
            admission,
            index,
            shared,
            settings,
            routes,
            routes_generation,
            tunnels: RefCell::new(crate::FastMap::default()),
            leaving: RefCell::new(Vec::new()),
            pool: crate::pool::BufPool::new(4 * 1024, 4096),
            seq: Cell::new(0),
            next_tunnel_id: Cell::new(0),
            draining: Flag::default(),
            busy: Cell::new(0),
            acceptors: RefCell::new(acceptors),
            last_accept: Cell::new(std::time::Instant::now()),
            obs,
            handoffs: RefCell::new(crate::FastMap::default()),
        }
    }

    /// The route table in force on this core. Hold the `Rc` for as long as
    /// a borrowed [`super::routes::Route`] is used; a reload replaces the
    /// table, never mutates it.
    pub fn routes(&self) -> Rc<RouteTable> {
        self.routes.borrow().clone()
    }

    /// Installs a newer table (rare: a registry change); false when `u` is
    /// not newer than the one in force. Copied once per core so lookups
    /// never touch a shared refcount.
    fn set_routes(&self, u: &RoutesUpdate) -> bool {
        if u.generation <= self.routes_generation.get() {
            return false;
        }
        self.routes_generation.set(u.generation);
        *self.routes.borrow_mut() = Rc::new(RouteTable::clone(&u.table));
        true
    }

    /// Asks the registry thread to read the table now (a new tunnel's
    /// identity has no route in this core's copy) and installs what it
    /// answers. True when the table in force changed, so the caller may
    /// decide again. Never blocks the core: the read runs on the registry
    /// thread, coalesced and rate-limited there; waits at most 5 s.
    pub async fn refresh_routes(&self) -> bool {
        let Some(tx) = self.shared.registry_refresh.get() else {
            return false;
        };
        let (reply, answer) = xoneshot::channel();
        if tx.send(PollerMsg::Refresh(reply)).is_err() {
            return false;
        }
        match monoio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Ok(u)) => self.set_routes(&u),
            _ => false,
        }
    }

    /// A request id unique in the process: core index in the top 16 bits.
    pub fn next_request_id(&self) -> u64 {
        let s = self.seq.get().wrapping_add(1) & ((1 << 48) - 1);
        self.seq.set(s);
        ((self.index as u64) << 48) | s
    }

    pub fn next_tunnel_id(&self) -> u64 {
        let s = self.next_tunnel_id.get() + 1;
        self.next_tunnel_id.set(s);
        ((self.index as u64) << 48) | s
    }

    /// Adds a tunnel already counted by [`Shared::place_tunnel`].
    pub fn register_tunnel(&self, t: Rc<Tunnel>) {
        self.tunnels
            .borrow_mut()
            .entry(t.identity.clone())
            .or_default()
            .push(t);
    }

    /// A tunnel that ended: out of this core, and out of the book unless
    /// it had already left it when its receiver said it was leaving.
    pub fn unregister_tunnel(&self, t: &Rc<Tunnel>) {
        if self.take_tunnel(t) {
            self.shared.tunnel_left(&t.owner(), self.index);
            return;
        }
        self.leaving.borrow_mut().retain(|x| !Rc::ptr_eq(x, t));
    }

    /// Removes `t` from the tunnels new requests may use; false if it is
    /// not (or no longer) one of them.
    fn take_tunnel(&self, t: &Rc<Tunnel>) -> bool {
        let mut map = self.tunnels.borrow_mut();
        let Some(v) = map.get_mut(&t.identity) else {
            return false;
        };
        let Some(i) = v.iter().position(|x| Rc::ptr_eq(x, t)) else {
            return false;
        };
        v.remove(i);
        if v.is_empty() {
            map.remove(&t.identity);
        }
        true
    }

    /// The receiver of `t` is leaving (PROTOCOL.md §7.4): no new request
    /// goes to it from any core: it leaves `tunnels` (what
    /// [`Self::local_tunnel`] and [`Self::has_tunnel`] look at) and the
    /// book (what other cores look at). Its requests in flight still
    /// complete: responses arrive on the tunnel's own reader. If it was
    /// the identity's last tunnel, new requests take the no-tunnel path
    /// (`no_tunnel_wait`, then 503). False if it was already leaving.
    pub fn tunnel_draining(&self, t: &Rc<Tunnel>) -> bool {
        if !self.take_tunnel(t) {
            return false;
        }
        self.shared.tunnel_left(&t.owner(), self.index);
        self.leaving.borrow_mut().push(t.clone());
        true
    }

    /// A local tunnel for `identity`; a client connection sticks to one by
    /// hash of its id.
    pub fn local_tunnel(&self, identity: &str, hint: u64) -> Option<Rc<Tunnel>> {
        let map = self.tunnels.borrow();
        let v = map.get(identity)?;
        (!v.is_empty()).then(|| v[(hint as usize) % v.len()].clone())
    }

    /// Is any tunnel for `identity` connected anywhere? Local check first;
    /// the global map only when this core has none.
    pub fn has_tunnel(&self, identity: &str) -> bool {
        self.tunnels.borrow().contains_key(identity)
            || self.shared.remote_core(identity, self.index, 0).is_some()
    }

    /// [`Self::has_tunnel`], waiting up to `no_tunnel_wait` for one to
    /// connect (a receiver reconnecting, or this gateway just started or
    /// taking over from a draining one). Cold path: only requests for an
    /// identity with no tunnel anywhere get here, and they poll.
    pub async fn wait_for_tunnel(&self, identity: &str) -> bool {
        if self.has_tunnel(identity) {
            return true;
        }
        let Some(wait) = self.settings.no_tunnel_wait else {
            return false;
        };
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until {
            monoio::time::sleep(Duration::from_millis(20)).await;
            if self.has_tunnel(identity) {
                return true;
            }
        }
        false
    }

    /// Every tunnel on this core, leaving ones included (cold path).
    fn all_tunnels(&self) -> Vec<Rc<Tunnel>> {
        let mut all: Vec<Rc<Tunnel>> = self.tunnels.borrow().values().flatten().cloned().collect();
        all.extend(self.leaving.borrow().iter().cloned());
        all
    }

    /// Requests in flight on this core's tunnels, leaving ones included.
    fn tunnel_inflight(&self) -> usize {
        self.all_tunnels().iter().map(|t| t.inflight_len()).sum()
    }

    /// Phase 1 of the drain of this core: accept loops stop (they watch
    /// `draining`), then requests in flight finish within `shutdown_grace`.
    /// Polls: it runs once per process life.
    async fn drain(self: Rc<Self>, done: std::sync::mpsc::Sender<usize>) {
        self.draining.raise();
        let until = std::time::Instant::now() + self.settings.shutdown_grace;
        // Idle: no request being worked on, none in flight on a tunnel here,
        // and no connection accepted in the last FRESH (its first request
        // may still be on the wire).
        const FRESH: Duration = Duration::from_millis(500);
        let idle = |c: &Self| {
            c.busy.get() == 0 && c.tunnel_inflight() == 0 && c.last_accept.get().elapsed() > FRESH
        };
        while !idle(&self) && std::time::Instant::now() < until {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        if !idle(&self) {
            tracing::warn!(
                core = self.index,
                busy = self.busy.get(),
                tunnel_inflight = self.tunnel_inflight(),
                "shutdown_grace over; closing with requests in flight"
            );
        }
        let _ = done.send(self.index);
    }

    /// Phase 2: every tunnel here is closed with 1001 so its receiver
    /// reconnects (to a successor gateway, if one listens).
    async fn close_tunnels(self: Rc<Self>, done: std::sync::mpsc::Sender<usize>) {
        let tunnels = self.all_tunnels();
        // Every receiver comes back at once otherwise: the reason asks them
        // to spread over the time a successor paced like us needs for all
        // our tunnels (PROTOCOL.md §7.3).
        let total = self.shared.tunnel_count();
        let spread = crate::protocol::reconnect::spread_for(
            total,
            self.shared.config.gateway.handshake_rate,
            self.shared.workers,
        );
        let reason = crate::protocol::reconnect::going_away_reason(total, spread);
        for t in &tunnels {
            t.going_away(&reason);
        }
        // The receivers answer the close; give them a moment, not forever.
        let until = std::time::Instant::now() + Duration::from_secs(2);
        let open = |c: &Self| !c.tunnels.borrow().is_empty() || !c.leaving.borrow().is_empty();
        while open(&self) && std::time::Instant::now() < until {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(
            core = self.index,
            tunnels_closed = tunnels.len(),
            "core drained"
        );
        // The last access lines go to the writer before the process exits.
        self.obs.flush_access_log();
        let _ = done.send(self.index);
    }

    /// Sends `req` through a tunnel of `identity` and waits for the answer
    /// (bounded by `timeout`).
    pub async fn dispatch(
        &self,
        identity: &IdentityName,
        req: ProxyRequest,
        hint: u64,
    ) -> ProxyResult {
        if let Some(t) = self.local_tunnel(identity, hint) {
            return t.call(self, req).await;
        }
        self.hand_over(identity, req, CrossRest::Whole, hint)?.await
    }

    /// Rare path: no tunnel of `identity` on this core. The request
    /// crosses to a core that has one (counted); its answer comes back on
    /// the returned channel; what follows the request, through `rest`.
    pub fn hand_over(
        &self,
        identity: &IdentityName,
        req: ProxyRequest,
        rest: CrossRest,
        hint: u64,
    ) -> Result<CrossReply, ProxyError> {
        let Some(core) = self.shared.remote_core(identity, self.index, hint) else {
            return Err(ProxyError::NoTunnel(identity.to_string()));
        };
        self.shared
            .counters
            .cross_core_dispatch_total
            .fetch_add(1, Ordering::Relaxed);
        self.count_handoff(identity);
        let (tx, rx) = xoneshot::channel();
        let msg = CoreMsg::Request(CrossRequest {
            identity: identity.clone(),
            req,
            rest,
            reply: tx,
        });
        match self.shared.inboxes[core].unbounded_send(msg) {
            Ok(()) => Ok(CrossReply(rx)),
            Err(_) => Err(ProxyError::NoTunnel(identity.to_string())),
        }
    }

    /// A request of `identity` crossed to another core (`scale`).
    pub fn count_handoff(&self, identity: &IdentityName) {
        let mut map = self.handoffs.borrow_mut();
        match map.get_mut(identity) {
            Some(n) => *n = n.saturating_add(1),
            None => {
                map.insert(identity.clone(), 1);
            }
        }
    }

    /// Tunnels follow load (`scale`, PROTOCOL.md §7.8), decided once a
    /// second on each core from what it saw itself: an identity whose
    /// requests this core handed off at least `tunnel_scale_up` times
    /// gets a tunnel asked for here; a tunnel here that carried fewer than
    /// half of that, every second for `tunnel_scale_idle` seconds, is let
    /// go (never the identity's last). Runs for the process's life.
    pub async fn scale_tick(self: Rc<Self>) {
        let g = &self.shared.config.gateway;
        let up = g.tunnel_scale_up;
        if up == 0 {
            return;
        }
        let idle_ticks = g.tunnel_scale_idle.or_zero().as_secs_f64().ceil().max(1.0) as u32;
        loop {
            monoio::time::sleep(Duration::from_secs(1)).await;
            if self.draining.is_set() {
                return;
            }
            let hot: Vec<IdentityName> = self
                .handoffs
                .borrow_mut()
                .drain()
                .filter(|(_, n)| *n >= up)
                .map(|(id, _)| id)
                .collect();
            for id in hot {
                if !self.tunnels.borrow().contains_key(&id) {
                    self.shared.ask_tunnel(&id, self.index);
                }
            }
            // A quiet tunnel is offered for release when it has been quiet
            // `idle_ticks` seconds, and again every `idle_ticks` after that
            // while it is refused (its identity's last): with many cold
            // identities, the shared book is asked rarely.
            let mut quiet_ones = Vec::new();
            for t in self.tunnels.borrow().values().flatten() {
                if !t.features.scale {
                    continue;
                }
                let carried = t.carried.replace(0);
                let quiet = if carried.saturating_mul(2) < up {
                    t.quiet_ticks.get().saturating_add(1)
                } else {
                    0
                };
                t.quiet_ticks.set(quiet);
                if quiet >= idle_ticks && (quiet - idle_ticks).is_multiple_of(idle_ticks) {
                    quiet_ones.push(t.clone());
                }
            }
            for t in quiet_ones {
                if self.shared.release_tunnel(&t.owner(), self.index) {
                    self.release(t);
                }
            }
        }
    }

    /// A tunnel already taken out of the book by `release_tunnel`: no new
    /// request goes to it; once none is in flight it is closed with 4002.
    /// Polls: a release happens at most once a second per core.
    fn release(self: &Rc<Self>, t: Rc<Tunnel>) {
        if !self.take_tunnel(&t) {
            return;
        }
        self.leaving.borrow_mut().push(t.clone());
        tracing::info!(identity = %t.identity, instance = %t.instance, core = self.index, tunnel = t.id,
            in_flight = t.inflight_len(), "scale: tunnel let go (its load no longer needs it); closing once idle");
        monoio::spawn(async move {
            while t.inflight_len() > 0 {
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            t.release();
        });
    }

    /// Serves what other cores hand over: requests for tunnels that live
    /// here, tunnels placed here, and new route tables.
    pub async fn run_inbox(self: Rc<Self>, mut rx: xmpsc::UnboundedReceiver<CoreMsg>) {
        use futures_util::StreamExt;
        while let Some(m) = rx.next().await {
            let ctx = self.clone();
            match m {
                CoreMsg::Request(m) => ctx.serve_handed_request(m),
                CoreMsg::Evict { identity, keep } => {
                    let doomed: Vec<Rc<Tunnel>> = ctx
                        .tunnels
                        .borrow()
                        .get(&identity)
                        .into_iter()
                        .flatten()
                        .filter(|t| t.instance != keep)
                        .cloned()
                        .collect();
                    for t in doomed {
                        t.evict();
                    }
                }
                CoreMsg::WantTunnels { identity, want } => {
                    if let Some(t) = ctx.scale_tunnel(&identity, |v| v.next().cloned()) {
                        t.ask_for_tunnels(want);
                    }
                }
                CoreMsg::ReleaseOne(identity) => {
                    let t = ctx
                        .scale_tunnel(&identity, |v| v.min_by_key(|t| t.inflight_len()).cloned());
                    if let Some(t) = t {
                        if ctx.shared.release_tunnel(&t.owner(), ctx.index) {
                            ctx.release(t);
                        }
                    }
                }
                CoreMsg::Metrics(reply) => {
                    let mut snap = ctx.obs.metrics.snapshot(ctx.index);
                    snap.admission = ctx.admission.snapshot();
                    let _ = reply.send(snap);
                }
                CoreMsg::Limits(cfg) => {
                    ctx.admission.reconfigure(&cfg.gateway);
                    tracing::debug!(core = ctx.index, "limits replaced");
                }
                CoreMsg::Routes(u) => {
                    // Tunnels stay; an identity left without routes gets
                    // no requests (404) until it has some again.
                    if ctx.set_routes(&u) {
                        tracing::debug!(
                            core = ctx.index,
                            generation = u.generation,
                            routes = u.table.len(),
                            "route table replaced"
                        );
                    }
                }
                CoreMsg::Drain(done) => {
                    monoio::spawn(ctx.drain(done));
                }
                CoreMsg::CloseTunnels(done) => {
                    monoio::spawn(ctx.close_tunnels(done));
                }
                CoreMsg::Tls(a, done) => {
                    *ctx.acceptors.borrow_mut() = a;
                    tracing::debug!(core = ctx.index, "TLS acceptors replaced");
                    let _ = done.send(ctx.index);
                }
                CoreMsg::Upgrade(h) => super::passthrough::resume(ctx.clone(), h),
                CoreMsg::Tunnel(h) => ctx.adopt_tunnel(h),
            }
        }
    }

    /// A request another core handed over: through a tunnel here, else
    /// passed on once to a core that has one (a tunnel placed here but not
    /// yet registered, or just gone), else 503.
    fn serve_handed_request(self: Rc<Self>, m: CrossRequest) {
        let Some(t) = self.local_tunnel(&m.identity, 0) else {
            match self.shared.remote_core(&m.identity, self.index, 0) {
                Some(core) => {
                    let _ = self.shared.inboxes[core].unbounded_send(CoreMsg::Request(m));
                }
                None => {
                    let _ = m
                        .reply
                        .send(Err(ProxyError::NoTunnel(m.identity.to_string())));
                }
            }
            return;
        };
        monoio::spawn(async move {
            // The handing core drops its end when its client leaves
            // (`conn.rs::dispatch_unless_gone`): the call is dropped then,
            // which aborts it at the receiver (`Tunnel::call`).
            let CrossRequest {
                req,
                rest,
                mut reply,
                ..
            } = m;
            let call = async {
                match rest {
                    CrossRest::Whole => t.call(&self, req).await,
                    CrossRest::Body(rest) => t.call_streamed(&self, req, rest).await,
                    CrossRest::Duplex { up, wait } => t.call_duplex(&self, req, up, wait).await,
                }
            };
            let mut call = std::pin::pin!(call);
            let res = std::future::poll_fn(|cx| {
                use std::future::Future as _;
                use std::task::Poll;
                match call.as_mut().poll(cx) {
                    Poll::Ready(r) => Poll::Ready(Some(r)),
                    Poll::Pending => reply.poll_canceled(cx).map(|()| None),
                }
            })
            .await;
            if let Some(res) = res {
                let _ = reply.send(res);
            }
        });
    }

    /// A tunnel accepted on another core and placed here: its socket
    /// (plain TCP: only those move) joins this runtime.
    fn adopt_tunnel(self: Rc<Self>, h: TunnelHandoff) {
        let std = std::net::TcpStream::from(h.fd);
        match monoio::net::TcpStream::from_std(std) {
            Ok(io) => {
                monoio::spawn(super::tunnel::run_tunnel(
                    self,
                    io,
                    h.leftover,
                    h.owner,
                    h.features,
                    h.peer,
                    h.handshake,
                    false, // only plain TCP tunnels move
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "handed-over tunnel could not be registered");
                self.shared.tunnel_left(&h.owner, self.index);
            }
        }
    }

    /// One of this core's `scale` tunnels of `identity`, as `pick` chooses.
    fn scale_tunnel(
        &self,
        identity: &IdentityName,
        pick: impl FnOnce(&mut dyn Iterator<Item = &Rc<Tunnel>>) -> Option<Rc<Tunnel>>,
    ) -> Option<Rc<Tunnel>> {
        let map = self.tunnels.borrow();
        let mut it = map.get(identity)?.iter().filter(|t| t.features.scale);
        pick(&mut it)
    }
}
