//! Every gateway of a fleet (DESIGN.md, "Scale beyond one machine"): the
//! receiver keeps one tunnel set to each `gateway_url`, and to each address
//! a URL's host name resolves to, so any gateway can serve any request for
//! this receiver's routes. Each such [`Gateway`] has its own tunnel count
//! (learnt from its 101), its slots' own backoff, and its own [`Status`]
//! (tunnels up, connects, failures) in the log.
//!
//! A resolver thread ([`spawn_resolver`]) looks the names up at start and
//! every `gateway_resolve_interval`, and tells every core which addresses
//! came ([`FleetMsg::Add`]) and went ([`FleetMsg::Remove`]) (of a name
//! with IPv4 addresses only those are used, else its IPv6 ones); a core's
//! [`run_core`] starts its share of a new gateway's slots and raises a
//! gone gateway's flag, after which its slots dial no more and its live
//! tunnels leave like a shutdown does (the notice, the requests in flight
//! finish, 1001). A failed lookup keeps the addresses known so far.
//!
//! Never: DNS on a core (lookups block; they run on the resolver's
//! thread), or anything on the request path (the status counters move
//! when a tunnel connects or ends).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures_util::StreamExt as _;

use super::tunnel::{run_slot, CoreRx, SlotStart};
use super::url::Url;
use super::TunnelCount;
use crate::sync::Flag;
use crate::tls::client::Dialer;

/// One address of one `gateway_url`: a tunnel set of its own. Shared by
/// every core (its slots are spread over them).
pub struct Gateway {
    /// The URL as configured: Host header, SNI, DID-WBA `service`, path.
    pub url: Url,
    /// Where its tunnels dial.
    pub addr: SocketAddr,
    /// Set for `wss://`.
    pub dialer: Option<Dialer>,
    /// How many tunnels this gateway wants (configured, or its 101 says).
    pub count: TunnelCount,
    pub status: Status,
    /// For logs: the URL, and the address when the host is a name.
    pub label: String,
}

impl Gateway {
    pub(crate) fn new(url: Url, addr: SocketAddr, dialer: Option<Dialer>, tunnels: usize) -> Self {
        let literal = url.host_name().parse::<IpAddr>().is_ok();
        let scheme = if url.tls { "wss" } else { "ws" };
        let label = if literal {
            format!("{scheme}://{}{}", url.authority(), url.path)
        } else {
            format!("{scheme}://{}{} ({addr})", url.authority(), url.path)
        };
        Self {
            url,
            addr,
            dialer,
            count: TunnelCount::new(tunnels),
            status: Status::default(),
            label,
        }
    }
}

impl Gateway {
    /// One `gateway status` line: the receiver's per-gateway metrics, in
    /// its log (at each tunnel connect and end, and on the resolver's
    /// rounds when they moved).
    pub fn log_status(&self) {
        let now = self.status.snapshot();
        tracing::info!(gateway = %self.label, tunnels_up = now.up, connects = now.connects,
            failures = now.failures, "gateway status");
    }
}

/// A gateway's connection state, summed over cores: moved only when one
/// of its tunnels connects, fails to, or ends.
#[derive(Default)]
pub struct Status {
    up: AtomicUsize,
    connects: AtomicU64,
    failures: AtomicU64,
}

/// What [`Status`] held at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusSnapshot {
    pub up: usize,
    pub connects: u64,
    pub failures: u64,
}

impl Status {
    /// A tunnel connected: how many are up now.
    pub fn connected(&self) -> usize {
        self.connects.fetch_add(1, Ordering::Relaxed);
        self.up.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// A connected tunnel ended: how many are still up.
    pub fn ended(&self) -> usize {
        self.up.fetch_sub(1, Ordering::AcqRel) - 1
    }

    /// An attempt failed before the tunnel was up.
    pub fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatusSnapshot {
        StatusSnapshot {
            up: self.up.load(Ordering::Acquire),
            connects: self.connects.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// The resolver's word to a core.
#[derive(Clone)]
pub enum FleetMsg {
    /// A new address: start this core's share of its slots.
    Add(Arc<Gateway>),
    /// An address gone from DNS: its slots stop, its tunnels leave.
    Remove(Arc<Gateway>),
    /// Start slot `index` of this gateway here: it asked for more tunnels
    /// (`scale`, PROTOCOL.md §7.8); counted as running already.
    Grow(Arc<Gateway>, usize),
    /// A scrape (`receiver/admin.rs`): this core's counters and the
    /// gateways it serves.
    Stats(std::sync::mpsc::Sender<CoreStats>),
}

/// One core's answer to a scrape.
pub struct CoreStats {
    pub requests: u64,
    pub upstream_errors: u64,
    pub in_flight: u64,
    pub gateways: Vec<Arc<Gateway>>,
}

/// One core's view of a gateway: the shared part, and the flag its slots
/// and tunnels on this core watch.
pub struct CoreGateway {
    pub gw: Arc<Gateway>,
    pub gone: Flag,
}

/// Which slots of a gateway core `core` of `threads` runs: `core`,
/// `core + threads`, … below `slots`.
pub fn slots_of(core: usize, threads: usize, slots: usize) -> impl Iterator<Item = usize> {
    (core..slots).step_by(threads.max(1))
}

/// A core's fleet: starts slots for gateways that come, flags the ones
/// that go. Ends when the resolver is gone (the process exits).
pub async fn run_core(
    ctx: Rc<CoreRx>,
    mut rx: UnboundedReceiver<FleetMsg>,
    core: usize,
    threads: usize,
    slots: usize,
) {
    let mut live: HashMap<*const Gateway, Rc<CoreGateway>> = HashMap::new();
    while let Some(msg) = rx.next().await {
        match msg {
            FleetMsg::Add(gw) => {
                let key = Arc::as_ptr(&gw);
                let cg = Rc::new(CoreGateway {
                    gw,
                    gone: Flag::default(),
                });
                for i in slots_of(core, threads, slots) {
                    monoio::spawn(run_slot(ctx.clone(), cg.clone(), i, SlotStart::Initial));
                }
                live.insert(key, cg);
            }
            FleetMsg::Grow(gw, index) => match live.get(&Arc::as_ptr(&gw)) {
                Some(cg) if !cg.gone.is_set() => {
                    monoio::spawn(run_slot(ctx.clone(), cg.clone(), index, SlotStart::Grown));
                }
                _ => gw.count.ended(index),
            },
            FleetMsg::Remove(gw) => {
                if let Some(cg) = live.remove(&Arc::as_ptr(&gw)) {
                    cg.gone.raise();
                }
            }
            FleetMsg::Stats(reply) => {
                let c = &ctx.counters;
                let _ = reply.send(CoreStats {
                    requests: c.requests.get(),
                    upstream_errors: c.upstream_errors.get(),
                    in_flight: c.in_flight.get(),
                    gateways: live.values().map(|cg| cg.gw.clone()).collect(),
                });
            }
        }
    }
}

/// The addresses of each URL right now, keyed by `(url index, address)`.
type Known = HashMap<(usize, SocketAddr), Arc<Gateway>>;

/// What changed between two lookups of one URL: addresses to add, and to
/// remove. A failed lookup (`None`) changes nothing.
pub fn diff(
    known: &BTreeSet<SocketAddr>,
    found: Option<&BTreeSet<SocketAddr>>,
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let Some(found) = found else {
        return (Vec::new(), Vec::new());
    };
    (
        found.difference(known).copied().collect(),
        known.difference(found).copied().collect(),
    )
}

/// The addresses `url`'s host resolves to (an IP literal: itself).
fn lookup(url: &Url) -> std::io::Result<BTreeSet<SocketAddr>> {
    if let Ok(ip) = url.host_name().parse::<IpAddr>() {
        return Ok(BTreeSet::from([SocketAddr::new(ip, url.port)]));
    }
    let found: BTreeSet<SocketAddr> = (url.host_name(), url.port).to_socket_addrs()?.collect();
    if found.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no addresses",
        ));
    }
    Ok(one_family(found))
}

/// A name's IPv4 addresses, or its IPv6 ones when it has none: a dual-stack
/// gateway published with A and AAAA records is one gateway, and two
/// tunnel sets to it (one per family) would double its tunnels; a name
/// like `localhost` that also resolves to `::1` would keep a set failing
/// against a gateway listening on 127.0.0.1 only.
fn one_family(found: BTreeSet<SocketAddr>) -> BTreeSet<SocketAddr> {
    if found.iter().any(SocketAddr::is_ipv4) {
        found.into_iter().filter(SocketAddr::is_ipv4).collect()
    } else {
        found
    }
}

/// Starts the resolver thread: looks every URL up now, then every
/// `interval` (`None`: never again, except names that have not resolved
/// yet, which are retried with backoff up to 30 s), and tells `cores`.
/// Each look also logs the status of every gateway whose counters moved.
pub fn spawn_resolver(
    urls: Vec<(Url, Option<Dialer>)>,
    interval: Option<Duration>,
    tunnels: usize,
    cores: Vec<UnboundedSender<FleetMsg>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("anp-rx-resolve".into())
        .spawn(move || resolve_loop(urls, interval, tunnels, cores))
        .map(drop)
}

fn resolve_loop(
    urls: Vec<(Url, Option<Dialer>)>,
    interval: Option<Duration>,
    tunnels: usize,
    cores: Vec<UnboundedSender<FleetMsg>>,
) {
    let mut r = Resolver::new(urls, interval, tunnels);
    let mut logged: HashMap<*const Gateway, StatusSnapshot> = HashMap::new();
    loop {
        for msg in r.round(&mut lookup) {
            if let FleetMsg::Remove(gw) = &msg {
                logged.remove(&Arc::as_ptr(gw));
            }
            for c in &cores {
                let _ = c.unbounded_send(msg.clone());
            }
        }
        log_status(&r.known, &mut logged);
        // This thread only waits for the next lookup; nothing waits on it.
        std::thread::sleep(r.pause());
    }
}

/// The resolver's state, sans-IO (the caller passes the lookup and does
/// the waiting): which addresses each URL has, and when to look again.
struct Resolver {
    urls: Vec<(Url, Option<Dialer>)>,
    interval: Option<Duration>,
    tunnels: usize,
    known: Known,
    first: bool,
    /// A name with no address yet is looked up again after this (from
    /// 1 s, doubling up to 30 s, never longer than `interval`).
    retry: Duration,
    unresolved: bool,
}

impl Resolver {
    fn new(urls: Vec<(Url, Option<Dialer>)>, interval: Option<Duration>, tunnels: usize) -> Self {
        Self {
            urls,
            interval,
            tunnels,
            known: HashMap::new(),
            first: true,
            retry: Duration::from_secs(1),
            unresolved: false,
        }
    }

    /// Looks up what needs it and returns the changes, in order.
    fn round(
        &mut self,
        lookup: &mut dyn FnMut(&Url) -> std::io::Result<BTreeSet<SocketAddr>>,
    ) -> Vec<FleetMsg> {
        let mut out = Vec::new();
        let was_unresolved = self.unresolved;
        self.unresolved = false;
        for (i, (url, dialer)) in self.urls.iter().enumerate() {
            let have: BTreeSet<SocketAddr> = self
                .known
                .keys()
                .filter(|(j, _)| *j == i)
                .map(|(_, a)| *a)
                .collect();
            // After the first round: literals never change, and with no
            // interval a name is looked up again only until it resolves.
            let literal = url.host_name().parse::<IpAddr>().is_ok();
            let settled = literal || (self.interval.is_none() && !have.is_empty());
            if !self.first && settled {
                continue;
            }
            let found = match lookup(url) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(gateway = %url.authority(), error = %e,
                        kept = have.len(), "gateway lookup failed; addresses known so far kept");
                    self.unresolved |= have.is_empty();
                    None
                }
            };
            let (add, remove) = diff(&have, found.as_ref());
            for addr in add {
                let gw = Arc::new(Gateway::new(
                    url.clone(),
                    addr,
                    dialer.clone(),
                    self.tunnels,
                ));
                tracing::info!(gateway = %gw.label, "gateway address added: starting its tunnel set");
                self.known.insert((i, addr), gw.clone());
                out.push(FleetMsg::Add(gw));
            }
            for addr in remove {
                if let Some(gw) = self.known.remove(&(i, addr)) {
                    tracing::info!(gateway = %gw.label,
                        "gateway address no longer resolves: its tunnels leave, no redial");
                    out.push(FleetMsg::Remove(gw));
                }
            }
        }
        self.first = false;
        self.retry = match (self.unresolved, was_unresolved) {
            (false, _) => Duration::from_secs(1),
            (true, false) => Duration::from_secs(1),
            (true, true) => (self.retry * 2).min(Duration::from_secs(30)),
        };
        out
    }

    /// How long to wait before the next round.
    fn pause(&self) -> Duration {
        match (self.interval, self.unresolved) {
            (Some(iv), false) => iv,
            (Some(iv), true) => self.retry.min(iv),
            (None, true) => self.retry,
            // Nothing more to look up; status lines every 30 s.
            (None, false) => Duration::from_secs(30),
        }
    }
}

/// One `gateway status` line per gateway whose counters moved since the
/// last one (the receiver's per-gateway metrics, in its log).
fn log_status(known: &Known, logged: &mut HashMap<*const Gateway, StatusSnapshot>) {
    let mut gws: Vec<&Arc<Gateway>> = known.values().collect();
    gws.sort_by(|a, b| a.label.cmp(&b.label));
    for gw in gws {
        let now = gw.status.snapshot();
        let key = Arc::as_ptr(gw);
        if logged.get(&key) == Some(&now) {
            continue;
        }
        logged.insert(key, now);
        gw.log_status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(addrs: &[&str]) -> BTreeSet<SocketAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn diff_follows_addresses_and_keeps_them_on_a_failed_lookup() {
        let known = set(&["10.0.0.1:80", "10.0.0.2:80"]);
        let (add, remove) = diff(&known, Some(&set(&["10.0.0.2:80", "10.0.0.3:80"])));
        assert_eq!(add, vec!["10.0.0.3:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(remove, vec!["10.0.0.1:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(diff(&known, None), (vec![], vec![]));
        assert_eq!(diff(&known, Some(&known)), (vec![], vec![]));
    }

    fn url(u: &str) -> Url {
        super::super::url::parse(u, ("ws", "wss")).unwrap()
    }

    /// What a round said, as (added, removed) address lists.
    fn changes(msgs: &[FleetMsg]) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for m in msgs {
            match m {
                FleetMsg::Add(g) => add.push(g.addr),
                FleetMsg::Remove(g) => remove.push(g.addr),
                FleetMsg::Stats(_) | FleetMsg::Grow(..) => {
                    panic!("the resolver only adds and removes")
                }
            }
        }
        (add, remove)
    }

    #[test]
    fn the_resolver_follows_a_name_and_leaves_literals_alone() {
        let urls = vec![
            (url("ws://gw.example:9/ws"), None),
            (url("ws://127.0.0.1:7/ws"), None),
        ];
        let mut r = Resolver::new(urls, Some(Duration::from_secs(30)), 2);
        // What the name resolves to, round by round (None: lookup fails).
        let mut script = vec![
            Some(set(&["10.0.0.1:9", "10.0.0.2:9"])),
            Some(set(&["10.0.0.2:9", "10.0.0.3:9"])),
            None,
            Some(set(&["10.0.0.3:9"])),
        ]
        .into_iter();
        let mut lookups = Vec::new();
        let mut lookup = |u: &Url| {
            lookups.push(u.host_name().to_owned());
            if u.host_name() == "127.0.0.1" {
                return Ok(set(&["127.0.0.1:7"]));
            }
            script
                .next()
                .unwrap()
                .ok_or_else(|| std::io::Error::other("SERVFAIL"))
        };
        let (add, remove) = changes(&r.round(&mut lookup));
        assert_eq!(
            add,
            ["10.0.0.1:9", "10.0.0.2:9", "127.0.0.1:7"].map(|a| a.parse().unwrap())
        );
        assert!(remove.is_empty());
        assert_eq!(r.pause(), Duration::from_secs(30));
        let (add, remove) = changes(&r.round(&mut lookup));
        assert_eq!(add, ["10.0.0.3:9".parse::<SocketAddr>().unwrap()]);
        assert_eq!(remove, ["10.0.0.1:9".parse::<SocketAddr>().unwrap()]);
        // A failed lookup changes nothing: the addresses known are kept.
        assert_eq!(changes(&r.round(&mut lookup)), (vec![], vec![]));
        assert_eq!(r.pause(), Duration::from_secs(30), "it had addresses");
        let (add, remove) = changes(&r.round(&mut lookup));
        assert!(add.is_empty());
        assert_eq!(remove, ["10.0.0.2:9".parse::<SocketAddr>().unwrap()]);
        assert_eq!(
            lookups.iter().filter(|h| *h == "127.0.0.1").count(),
            1,
            "a literal is looked at once: {lookups:?}"
        );
        // Each address has a gateway of its own: its own count and status.
        let gws: Vec<_> = r.known.values().collect();
        assert_eq!(gws.len(), 2);
        assert!(!std::ptr::eq(&gws[0].status, &gws[1].status));
    }

    #[test]
    fn a_name_that_never_resolved_is_retried_with_backoff() {
        let mut r = Resolver::new(vec![(url("ws://gw.example:9/ws"), None)], None, 0);
        let mut fail = |_: &Url| -> std::io::Result<BTreeSet<SocketAddr>> {
            Err(std::io::Error::other("NXDOMAIN"))
        };
        let pauses: Vec<Duration> = (0..7)
            .map(|_| {
                assert!(r.round(&mut fail).is_empty());
                r.pause()
            })
            .collect();
        assert_eq!(
            pauses.iter().map(Duration::as_secs).collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 30, 30]
        );
        let mut ok = |_: &Url| Ok(set(&["10.0.0.1:9"]));
        assert_eq!(r.round(&mut ok).len(), 1);
        // No interval: once resolved, it is not looked up again.
        let mut never = |_: &Url| -> std::io::Result<BTreeSet<SocketAddr>> { unreachable!() };
        assert!(r.round(&mut never).is_empty());
    }

    #[test]
    fn a_name_uses_one_address_family() {
        let both = set(&["10.0.0.1:9", "[2001:db8::1]:9", "10.0.0.2:9"]);
        assert_eq!(one_family(both), set(&["10.0.0.1:9", "10.0.0.2:9"]));
        let six = set(&["[2001:db8::1]:9", "[2001:db8::2]:9"]);
        assert_eq!(one_family(six.clone()), six);
    }

    #[test]
    fn slots_are_spread_over_cores_once_each() {
        let mut all: Vec<usize> = (0..3).flat_map(|c| slots_of(c, 3, 8)).collect();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        assert_eq!(slots_of(2, 4, 2).count(), 0, "more cores than slots");
    }

    #[test]
    fn literal_hosts_resolve_to_themselves_and_names_are_labelled() {
        let u = super::super::url::parse("ws://127.0.0.1:9/ws", ("ws", "wss")).unwrap();
        assert_eq!(lookup(&u).unwrap(), set(&["127.0.0.1:9"]));
        let gw = Gateway::new(u, "127.0.0.1:9".parse().unwrap(), None, 0);
        assert_eq!(gw.label, "ws://127.0.0.1:9/ws");
        let u = super::super::url::parse("ws://gw.example:9/ws", ("ws", "wss")).unwrap();
        let gw = Gateway::new(u, "10.0.0.7:9".parse().unwrap(), None, 0);
        assert_eq!(gw.label, "ws://gw.example:9/ws (10.0.0.7:9)");
    }

    #[test]
    fn status_counts_tunnels_up_connects_and_failures() {
        let s = Status::default();
        assert_eq!(s.connected(), 1);
        assert_eq!(s.connected(), 2);
        s.failed();
        assert_eq!(s.ended(), 1);
        assert_eq!(
            s.snapshot(),
            StatusSnapshot {
                up: 1,
                connects: 2,
                failures: 1
            }
        );
    }
}
