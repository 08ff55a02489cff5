//! Admission on one core: the rate limits ([`super::ratelimit`]), then a
//! place in flight for the request's identity, `max_inflight_per_identity`
//! at a time, `max_inflight_per_core` for all identities together. A
//! request that finds no place waits in its identity's queue (at most
//! `max_queue_per_identity`, at most `queue_timeout`); one more is shed at
//! once (503 + Retry-After), so a receiver that stopped answering costs
//! its clients nothing beyond its limit and queue. The connection of a
//! shed request (503), or of one over a rate limit (429), is then not read
//! for a while ([`Admission::pause_after`], [`Admission::pause`]): a
//! client resending at once would otherwise make the core read and refuse
//! at the offered rate, and the requests in flight would turn over slower
//! the more it refused. A pause ends at once when the core's drain begins
//! (it also waits on the `draining` flag).
//!
//! **Fair shares.** When a place frees, the waiting identities are served
//! round-robin, one request each in turn (deficit round-robin with every
//! request costing one), never first-come-first-served across identities:
//! a flood to one identity queues behind its own requests, not in front
//! of another's.
//!
//! A request holds its place ([`Place`]) from admission until its
//! response head arrives or it fails; streamed bodies after the head do
//! not count.
//!
//! Never: a lock, an atomic, another core's state; a `RefCell` borrow held
//! while a waker is woken or a value with a `Drop` is dropped (see
//! `crate::sync`); losing a place: a waiter granted and cancelled in the
//! same tick hands its place on.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::error::{ProxyError, Shed};
use super::ratelimit::{RateCounters, RateLimiter, Request};
use crate::config::GatewayConfig;
use crate::sync::Flag;

/// The concurrency limits (reloadable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_identity: usize,
    pub queue: usize,
    pub queue_timeout: Duration,
    /// 0: none.
    pub per_core: usize,
    /// How long a connection just answered 503 by admission is not read
    /// (`shed_pause`; a 429's pause is capped by it, `pause_after`); None:
    /// read on at once.
    pub shed_pause: Option<Duration>,
}

impl Limits {
    pub fn from_config(g: &GatewayConfig) -> Limits {
        Limits {
            per_identity: g.max_inflight_per_identity.max(1),
            queue: g.max_queue_per_identity,
            queue_timeout: g.queue_timeout.duration().unwrap_or(Duration::from_secs(5)),
            per_core: g.max_inflight_per_core,
            shed_pause: g.shed_pause.duration(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitState {
    Waiting,
    Granted,
}

struct Waiter {
    state: Cell<WaitState>,
    waker: Cell<Option<Waker>>,
}

/// One identity's share of this core.
struct Ident {
    name: Box<str>,
    inflight: usize,
    queue: VecDeque<Rc<Waiter>>,
    /// In `State::ring` (it has waiters, or had when last looked at).
    in_ring: bool,
}

/// The scheduler, sans-IO: counts and queues; hands out places.
struct State {
    limits: Limits,
    total: usize,
    /// Identities seen on this core (bounded by the route table's).
    idents: Vec<Ident>,
    index: crate::FastMap<Box<str>, usize>,
    /// Identities with waiters, in turn order.
    ring: VecDeque<usize>,
    shed: [u64; 2],
}

/// What [`State::try_enter`] decided.
enum Enter {
    Now,
    Queued(Rc<Waiter>),
    Shed,
}

impl State {
    fn ident(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let i = self.idents.len();
        self.idents.push(Ident {
            name: name.into(),
            inflight: 0,
            queue: VecDeque::new(),
            in_ring: false,
        });
        self.index.insert(name.into(), i);
        i
    }

    fn core_full(&self) -> bool {
        self.limits.per_core > 0 && self.total >= self.limits.per_core
    }

    fn try_enter(&mut self, i: usize) -> Enter {
        let per_identity = self.limits.per_identity;
        let core_full = self.core_full();
        let id = &mut self.idents[i];
        if id.queue.is_empty() && id.inflight < per_identity && !core_full {
            id.inflight += 1;
            self.total += 1;
            return Enter::Now;
        }
        if id.queue.len() >= self.limits.queue {
            self.shed[0] += 1;
            return Enter::Shed;
        }
        let w = Rc::new(Waiter {
            state: Cell::new(WaitState::Waiting),
            waker: Cell::new(None),
        });
        id.queue.push_back(w.clone());
        if !id.in_ring {
            id.in_ring = true;
            self.ring.push_back(i);
        }
        Enter::Queued(w)
    }

    /// A place of identity `i` is free again.
    fn leave(&mut self, i: usize) {
        self.idents[i].inflight -= 1;
        self.total -= 1;
    }

    /// A waiter that gave up before it was granted.
    fn forget(&mut self, i: usize, w: &Rc<Waiter>) {
        self.idents[i].queue.retain(|x| !Rc::ptr_eq(x, w));
    }

    /// Grants free places to waiters, identities in turn; returns the
    /// wakers to wake once the borrow has ended.
    fn grant(&mut self, wake: &mut Vec<Waker>) {
        let per_identity = self.limits.per_identity;
        while !self.core_full() {
            let mut chosen = None;
            for _ in 0..self.ring.len() {
                let Some(i) = self.ring.pop_front() else {
                    break;
                };
                let id = &mut self.idents[i];
                if id.queue.is_empty() {
                    id.in_ring = false;
                    continue;
                }
                if id.inflight < per_identity {
                    chosen = Some(i);
                    break;
                }
                // At its own limit: keeps its turn for later.
                self.ring.push_back(i);
            }
            let Some(i) = chosen else {
                return;
            };
            let id = &mut self.idents[i];
            let w = id.queue.pop_front().expect("non-empty queue");
            w.state.set(WaitState::Granted);
            id.inflight += 1;
            self.total += 1;
            if id.queue.is_empty() {
                id.in_ring = false;
            } else {
                self.ring.push_back(i);
            }
            if let Some(wk) = w.waker.take() {
                wake.push(wk);
            }
        }
    }
}

/// A core's admission: rate limits and places in flight.
pub struct Admission {
    state: Rc<RefCell<State>>,
    rates: RefCell<RateLimiter>,
}

/// Per-identity gauges and shed counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct AdmissionSnapshot {
    /// identity → (in flight, queued) on this core.
    pub identities: Vec<(String, u64, u64)>,
    /// Shed requests: queue full, queue timeout.
    pub shed: [u64; 2],
    pub rates: RateCounters,
}

/// A place in flight; freed (and handed to the next waiter) when dropped.
pub struct Place {
    state: Rc<RefCell<State>>,
    ident: usize,
}

impl Drop for Place {
    fn drop(&mut self) {
        release(&self.state, self.ident);
    }
}

fn release(state: &RefCell<State>, ident: usize) {
    let mut wake = Vec::new();
    {
        let mut s = state.borrow_mut();
        s.leave(ident);
        s.grant(&mut wake);
    }
    for w in wake {
        w.wake();
    }
}

impl Admission {
    pub fn new(g: &GatewayConfig) -> Admission {
        Admission {
            state: Rc::new(RefCell::new(State {
                limits: Limits::from_config(g),
                total: 0,
                idents: Vec::new(),
                index: crate::FastMap::default(),
                ring: VecDeque::new(),
                shed: [0; 2],
            })),
            rates: RefCell::new(RateLimiter::new(g)),
        }
    }

    /// SIGHUP: new limits (raised ones admit waiters at once).
    pub fn reconfigure(&self, g: &GatewayConfig) {
        self.rates.borrow_mut().reconfigure(g);
        let mut wake = Vec::new();
        {
            let mut s = self.state.borrow_mut();
            s.limits = Limits::from_config(g);
            s.grant(&mut wake);
        }
        for w in wake {
            w.wake();
        }
    }

    /// The rate limits for `req` (refused: 429).
    pub fn rate_check(&self, req: &Request<'_>) -> Result<(), ProxyError> {
        let mut r = self.rates.borrow_mut();
        if r.is_empty() {
            return Ok(());
        }
        r.check(req, Instant::now())
            .map_err(|l| ProxyError::RateLimited(Box::new(l)))
    }

    /// A place in flight for `identity`: at once, after a wait in its
    /// queue, or refused (503: queue full, or `queue_timeout` passed).
    pub async fn enter(&self, identity: &str) -> Result<Place, ProxyError> {
        let (ident, entered, timeout) = {
            let mut s = self.state.borrow_mut();
            let i = s.ident(identity);
            (i, s.try_enter(i), s.limits.queue_timeout)
        };
        let waiter = match entered {
            Enter::Now => {
                return Ok(Place {
                    state: self.state.clone(),
                    ident,
                })
            }
            Enter::Shed => return Err(ProxyError::Shed(Shed::QueueFull)),
            Enter::Queued(w) => w,
        };
        let wait = Wait {
            state: self.state.clone(),
            ident,
            waiter,
            claimed: false,
        };
        match monoio::time::timeout(timeout, wait).await {
            Ok(place) => Ok(place),
            Err(_) => {
                self.state.borrow_mut().shed[1] += 1;
                Err(ProxyError::Shed(Shed::QueueTimeout))
            }
        }
    }

    /// How long the connection of a request answered with `e` (None: not
    /// refused, the app's answer) is not read again (it stays open): after
    /// a 503 of admission, `shed_pause`; after a 429, until its bucket has
    /// a token again, doubled `backoff` times, at most its `Retry-After`
    /// and `shed_pause`; None for any other answer, or with `shed_pause =
    /// 0`. Its next request waits in the socket meanwhile, instead of
    /// being read, parsed and refused at once, which under a flood that
    /// resends at once (an open loop, a client retrying without waiting)
    /// would take the core from the requests in flight: their places turn
    /// over slower, goodput falls with every refusal (docs/OPERATIONS.md,
    /// "What overload costs").
    ///
    /// Why a 429 starts from the bucket's own wait and not its
    /// `Retry-After` (whole seconds, at least 1): a client over its limit
    /// on many connections is then served at the configured rate. Paused
    /// for the whole `Retry-After`, its connections fell into step and sat
    /// out seconds in which the bucket refilled for nobody: `rate = 2000`
    /// served 620 requests a second to `oha -c 64` (4,064 with no pause).
    /// Why it doubles: the connections that wake together for one token
    /// and lose it back off. `backoff` is the connection's, kept here: one
    /// more for each 429, one fewer for any other answer, so a connection
    /// that keeps losing tokens to others settles at pauses about as long
    /// as its share of the rate leaves between its requests: refused about
    /// as often as served, and never more than once per pause at the cap
    /// (1,000 connections of one address at `rate = 100` are refused about
    /// 1,000 times a second, not 100,000).
    pub fn pause_after(&self, e: Option<&ProxyError>, backoff: &mut u32) -> Option<Duration> {
        let Some(ProxyError::RateLimited(l)) = e else {
            *backoff = backoff.saturating_sub(1);
            return match e {
                Some(ProxyError::Shed(_)) => self.state.borrow().limits.shed_pause,
                _ => None,
            };
        };
        let pause = l.wait.saturating_mul(1 << (*backoff).min(20));
        *backoff = backoff.saturating_add(1);
        let cap = self.state.borrow().limits.shed_pause?;
        let told = Duration::from_secs(u64::from(l.retry_after()));
        Some(pause.min(told).min(cap))
    }

    /// Waits `d` ([`Admission::pause_after`]), or less: until the core's
    /// drain begins (`draining`), so that a paused connection never holds
    /// a graceful stop; a pause that starts after that does not wait.
    pub async fn pause(d: Duration, draining: &Flag) {
        monoio::select! {
            () = monoio::time::sleep(d) => {}
            () = draining.wait() => {}
        }
    }

    pub fn snapshot(&self) -> AdmissionSnapshot {
        let s = self.state.borrow();
        AdmissionSnapshot {
            identities: s
                .idents
                .iter()
                .map(|i| (i.name.to_string(), i.inflight as u64, i.queue.len() as u64))
                .collect(),
            shed: s.shed,
            rates: self.rates.borrow().counters(),
        }
    }
}

/// Waits in the queue for a place. Dropped before it was granted: leaves
/// the queue; dropped after it was granted but before it saw it: hands
/// the place on.
struct Wait {
    state: Rc<RefCell<State>>,
    ident: usize,
    waiter: Rc<Waiter>,
    claimed: bool,
}

impl Future for Wait {
    type Output = Place;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Place> {
        if self.waiter.state.get() == WaitState::Granted {
            self.claimed = true;
            return Poll::Ready(Place {
                state: self.state.clone(),
                ident: self.ident,
            });
        }
        self.waiter.waker.set(Some(cx.waker().clone()));
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if self.claimed {
            return;
        }
        match self.waiter.state.get() {
            WaitState::Granted => release(&self.state, self.ident),
            WaitState::Waiting => {
                self.state.borrow_mut().forget(self.ident, &self.waiter);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(extra: &str) -> Admission {
        let text = format!("[gateway]\n{extra}");
        let cfg = crate::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        Admission::new(&cfg.gateway)
    }

    fn gauges(a: &Admission, who: &str) -> (u64, u64) {
        a.snapshot()
            .identities
            .iter()
            .find(|(n, _, _)| n == who)
            .map(|(_, f, q)| (*f, *q))
            .unwrap_or_default()
    }

    /// Limit 1, queue 2: the fourth is shed at once; places pass on in
    /// order as they free.
    #[monoio::test(timer_enabled = true)]
    async fn limit_then_queue_then_shed() {
        let a = Rc::new(admission(
            "max_inflight_per_identity = 1\nmax_queue_per_identity = 2\nqueue_timeout = 60\n",
        ));
        let p1 = a.enter("alice").await.unwrap();
        let order = Rc::new(RefCell::new(Vec::new()));
        let mut tasks = Vec::new();
        for n in [2, 3] {
            let (a, order) = (a.clone(), order.clone());
            tasks.push(monoio::spawn(async move {
                let p = a.enter("alice").await.unwrap();
                order.borrow_mut().push(n);
                p
            }));
        }
        // Let both tasks queue.
        crate::sync::yield_until("both queue", || gauges(&a, "alice").1 == 2).await;
        assert!(matches!(
            a.enter("alice").await,
            Err(ProxyError::Shed(Shed::QueueFull))
        ));
        // Another identity is not affected.
        let b = a.enter("bob").await.unwrap();
        assert_eq!(gauges(&a, "alice"), (1, 2));
        drop(p1);
        let p2 = tasks.remove(0).await;
        assert_eq!(*order.borrow(), vec![2]);
        drop(p2);
        let p3 = tasks.remove(0).await;
        assert_eq!(*order.borrow(), vec![2, 3]);
        drop((p3, b));
        assert_eq!(gauges(&a, "alice"), (0, 0));
        assert_eq!(a.snapshot().shed, [1, 0]);
    }

    #[monoio::test(timer_enabled = true)]
    async fn a_queued_request_gives_up_after_queue_timeout() {
        let a = admission(
            "max_inflight_per_identity = 1\nmax_queue_per_identity = 4\nqueue_timeout = 0.05\n",
        );
        let _p = a.enter("alice").await.unwrap();
        assert!(matches!(
            a.enter("alice").await,
            Err(ProxyError::Shed(Shed::QueueTimeout))
        ));
        assert_eq!(
            gauges(&a, "alice"),
            (1, 0),
            "the timed-out waiter left the queue"
        );
        assert_eq!(a.snapshot().shed, [0, 1]);
    }

    /// The core-wide limit admits waiting identities in turn: with A's
    /// queue long and B's short, B's requests are not served after all
    /// of A's but alternately.
    #[monoio::test(timer_enabled = true)]
    async fn waiting_identities_are_served_in_turn() {
        let a = Rc::new(admission(
            "max_inflight_per_core = 1\nmax_inflight_per_identity = 100\nqueue_timeout = 60\n",
        ));
        let first = a.enter("A").await.unwrap();
        let order = Rc::new(RefCell::new(Vec::new()));
        let mut tasks = Vec::new();
        let arrivals = ["A1", "A2", "A3", "A4", "B1", "B2"];
        for name in arrivals {
            let (adm, order) = (a.clone(), order.clone());
            let who = &name[..1];
            tasks.push(monoio::spawn(async move {
                let p = adm.enter(who).await.unwrap();
                order.borrow_mut().push(name);
                // Hold the place until the next yield, then pass it on.
                crate::sync::yield_now().await;
                drop(p);
            }));
            // Queue in this exact order.
            crate::sync::yield_until("it queues", || {
                gauges(&a, "A").1 + gauges(&a, "B").1 == tasks.len() as u64
            })
            .await;
        }
        drop(first);
        for t in tasks {
            t.await;
        }
        assert_eq!(*order.borrow(), vec!["A1", "B1", "A2", "B2", "A3", "A4"]);
    }

    fn limited(wait_ms: u64) -> ProxyError {
        ProxyError::RateLimited(Box::new(super::super::ratelimit::Limited {
            scope: crate::config::RateScope::ClientIp,
            policy_name: "p".into(),
            policy: String::new(),
            state: String::new(),
            wait: Duration::from_millis(wait_ms),
        }))
    }

    /// 503 of admission: `shed_pause`; 429: until the bucket has a token,
    /// doubled once more for each 429 and once fewer for each other
    /// answer, at most its Retry-After and `shed_pause`; anything else, or
    /// `shed_pause = 0`: no pause.
    #[test]
    fn how_long_a_refused_connection_is_not_read() {
        let s = |n| Some(Duration::from_secs(n));
        let ms = |n| Some(Duration::from_millis(n));
        let a = admission("shed_pause = 30\n");
        let shed = |why| Some(ProxyError::Shed(why));
        let mut backoff = 0;
        assert_eq!(
            a.pause_after(shed(Shed::QueueFull).as_ref(), &mut backoff),
            s(30)
        );
        assert_eq!(
            a.pause_after(shed(Shed::QueueTimeout).as_ref(), &mut backoff),
            s(30)
        );
        assert_eq!(
            a.pause_after(Some(&ProxyError::Timeout), &mut backoff),
            None
        );
        assert_eq!(a.pause_after(None, &mut backoff), None);
        assert_eq!(backoff, 0);
        // A bucket with a token again in 5 ms: 5, 10, 20 ... ms, the
        // Retry-After (1 s) from the ninth refusal in a row on.
        let l = limited(5);
        let pauses: Vec<_> = (0..10)
            .map(|_| a.pause_after(Some(&l), &mut backoff))
            .collect();
        assert_eq!(&pauses[..4], &[ms(5), ms(10), ms(20), ms(40)]);
        assert_eq!(&pauses[7..], &[ms(640), s(1), s(1)]);
        // Each other answer takes one doubling back: after three served
        // and a 503, the next 429 pauses 5 ms x 2^6.
        for e in [None, None, None, shed(Shed::QueueFull)] {
            a.pause_after(e.as_ref(), &mut backoff);
        }
        assert_eq!(a.pause_after(Some(&l), &mut backoff), ms(320));
        // A slow rate: the bucket's wait is its Retry-After; `shed_pause`
        // caps both.
        let mut backoff = 0;
        let slow = limited(1_900);
        assert_eq!(a.pause_after(Some(&slow), &mut backoff), ms(1_900));
        assert_eq!(a.pause_after(Some(&slow), &mut backoff), s(2));
        assert_eq!(a.pause_after(Some(&limited(999_500)), &mut 0), s(30));
        // Many refusals in a row do not overflow.
        let mut many = u32::MAX;
        assert_eq!(a.pause_after(Some(&l), &mut many), s(1));
        let off = admission("shed_pause = 0\n");
        assert_eq!(
            off.pause_after(shed(Shed::QueueFull).as_ref(), &mut 0),
            None
        );
        assert_eq!(off.pause_after(Some(&l), &mut 0), None);
        // The default: at most 1 s, the 503's Retry-After.
        assert_eq!(
            admission("").pause_after(Some(&limited(6_500)), &mut 0),
            s(1)
        );
    }

    /// A pause ends when the drain begins (not when its hour is over);
    /// one that starts after that does not wait; a pause leaves no waker
    /// behind however it ends.
    #[monoio::test(timer_enabled = true)]
    async fn a_drain_ends_every_pause_at_once() {
        let draining = Rc::new(Flag::default());
        Admission::pause(Duration::from_millis(1), &draining).await;
        assert_eq!(draining.waiting(), 0, "a pause that ran out left its waker");
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let d = draining.clone();
            tasks.push(monoio::spawn(async move {
                Admission::pause(Duration::from_secs(3600), &d).await;
            }));
        }
        crate::sync::yield_until("three pause", || draining.waiting() == 3).await;
        draining.raise();
        for t in tasks {
            t.await;
        }
        assert_eq!(draining.waiting(), 0);
        Admission::pause(Duration::from_secs(3600), &draining).await;
    }

    /// A waiter granted a place and dropped in the same tick hands it on.
    #[monoio::test(timer_enabled = true)]
    async fn a_granted_then_cancelled_waiter_passes_its_place_on() {
        let a = Rc::new(admission(
            "max_inflight_per_identity = 1\nmax_queue_per_identity = 4\nqueue_timeout = 60\n",
        ));
        let p = a.enter("alice").await.unwrap();
        let mut cancelled = Box::pin(a.enter("alice"));
        // Poll once so it queues.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(cancelled.as_mut().poll(&mut cx).is_pending());
        let a2 = a.clone();
        let next = monoio::spawn(async move { a2.enter("alice").await.map(|_| ()) });
        crate::sync::yield_until("both queue", || gauges(&a, "alice").1 == 2).await;
        drop(p); // grants `cancelled`, which never looks
        drop(cancelled); // hands the place to `next`
        next.await.unwrap();
        assert_eq!(gauges(&a, "alice"), (0, 0));
    }
}
