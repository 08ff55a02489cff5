//! Token-bucket rate limits (`[[gateway.rate_limits]]`), sans-IO: rules
//! compiled from the config, one core's bucket table, the decision for one
//! request, and the 429's `RateLimit-Policy` / `RateLimit` fields.
//!
//! Owns: the buckets of one core. Never: a lock, an atomic or a clock of
//! its own (the caller passes `now`); another core's buckets.
//!
//! **How exact across cores.** Each core keeps full-size buckets (`rate`,
//! `burst`) for the requests it serves. A client connection lives on one
//! core, so a client on one keep-alive connection meets exactly the
//! configured limit; one spreading connections over all `workers` cores
//! can pass at most `workers × (burst + rate·t)` requests in `t` seconds,
//! and never fewer than `burst + rate·t` are allowed. We chose "never
//! stricter than configured" over dividing the rate by the core count,
//! which would refuse a single-connection client at `rate / workers`.
//!
//! **Bounded table.** At most `rate_limit_table_size` buckets per core.
//! When it is full, buckets that have refilled to `burst` are dropped
//! first (they mean the same as no bucket); if that frees less than an
//! eighth, the least recently used are dropped too (their keys get a full
//! bucket again: lenient, never stricter). Each sweep frees at least an
//! eighth of the table, so a flood of distinct addresses costs O(1)
//! amortized per request.
//!
//! The headers follow draft-ietf-httpapi-ratelimit-headers-09 (structured
//! fields, RFC 8941 lists of strings with parameters): `RateLimit-Policy:
//! "name";q=<burst>;w=<seconds to refill burst>` and `RateLimit:
//! "name";r=0;t=<seconds until one request is allowed>`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::{GatewayConfig, RateLimitRule, RateScope};

/// One compiled `[[gateway.rate_limits]]` entry.
#[derive(Debug, Clone)]
struct Rule {
    scope: RateScope,
    /// Path prefix (client_ip, route) or identity (identity); None: all.
    matches: Option<String>,
    rate: f64,
    burst: f64,
    v4_bits: u8,
    v6_bits: u8,
    /// `"name";q=…;w=…`, rendered once.
    policy: String,
    name: String,
}

impl Rule {
    fn new(r: &RateLimitRule) -> Rule {
        let name = r.policy_name().to_owned();
        let window = (f64::from(r.burst) / r.rate).ceil().max(1.0) as u64;
        Rule {
            scope: r.scope,
            matches: r.matches.clone(),
            rate: r.rate,
            burst: f64::from(r.burst),
            v4_bits: r.ip_prefix_v4,
            v6_bits: r.ip_prefix_v6,
            policy: format!("\"{name}\";q={};w={window}", r.burst),
            name,
        }
    }

    fn applies(&self, req: &Request<'_>) -> bool {
        let Some(m) = &self.matches else {
            return self.scope == RateScope::ClientIp || req.route.is_some();
        };
        match self.scope {
            RateScope::Identity => req.route.is_some_and(|(_, id)| id == m.as_str()),
            RateScope::ClientIp => under_prefix(req.path, m),
            RateScope::Route => req.route.is_some() && under_prefix(req.path, m),
        }
    }

    /// How long until a bucket holding `tokens` has a whole one: rounded
    /// up to the millisecond (the timer's grain), so that a request read
    /// after it finds the token; at least one.
    fn wait(&self, tokens: f64) -> Duration {
        let ms = ((1.0 - tokens) / self.rate * 1000.0).ceil();
        Duration::from_millis(ms.clamp(1.0, 1e12) as u64)
    }

    fn refill(&self, b: &Bucket, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + dt * self.rate).min(self.burst)
    }
}

/// `path` is `prefix` or below it (segment boundary); `/` matches all.
fn under_prefix(path: &str, prefix: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    path.strip_prefix(p)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The client address cut to `bits` leading bits, as one number: IPv4
/// (and IPv4-mapped IPv6) as `::ffff:a.b.c.d`, so the two never collide.
pub(crate) fn ip_key(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> u128 {
    let v4 = match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    match v4 {
        Some(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4_bits)).unwrap_or(0);
            (0xffff_u128 << 32) | u128::from(u32::from(a) & mask)
        }
        None => {
            let IpAddr::V6(a) = ip else { unreachable!() };
            let mask = u128::MAX.checked_shl(128 - u32::from(v6_bits)).unwrap_or(0);
            u128::from(a) & mask
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One rule's buckets: by address number, or by name (route prefix or
/// identity; looked up by `&str`, allocated once when a bucket is made).
enum Table {
    Ip(HashMap<u128, Bucket>),
    Name(HashMap<Box<str>, Bucket>),
}

impl Table {
    fn len(&self) -> usize {
        match self {
            Table::Ip(m) => m.len(),
            Table::Name(m) => m.len(),
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&Bucket) -> bool) {
        match self {
            Table::Ip(m) => m.retain(|_, b| keep(b)),
            Table::Name(m) => m.retain(|_, b| keep(b)),
        }
    }

    fn times(&self, out: &mut Vec<Instant>) {
        match self {
            Table::Ip(m) => out.extend(m.values().map(|b| b.at)),
            Table::Name(m) => out.extend(m.values().map(|b| b.at)),
        }
    }
}

/// What a request is, for the rules.
pub struct Request<'a> {
    pub peer: IpAddr,
    /// The decoded path.
    pub path: &'a str,
    /// The matched route's (prefix, identity); None: no route owns it.
    pub route: Option<(&'a str, &'a str)>,
}

/// A request over a limit: what the 429 says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub scope: RateScope,
    /// The policy's name (the log says which entry refused).
    pub policy_name: String,
    /// `RateLimit-Policy` field value.
    pub policy: String,
    /// `RateLimit` field value.
    pub state: String,
    /// Until the refusing bucket has a token again.
    pub wait: Duration,
}

impl Limited {
    /// `Retry-After` (and the `RateLimit` field's `t`): the wait in whole
    /// seconds, rounded up, at least 1.
    pub fn retry_after(&self) -> u32 {
        retry_after_secs(self.wait)
    }
}

fn retry_after_secs(wait: Duration) -> u32 {
    wait.as_millis()
        .div_ceil(1000)
        .clamp(1, u128::from(u32::MAX)) as u32
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` ({})", self.policy_name, self.scope.as_str())
    }
}

/// Counters for `/metrics` (this core's).
#[derive(Debug, Clone, Copy, Default)]
pub struct RateCounters {
    /// Requests refused, by scope (client_ip, route, identity).
    pub limited: [u64; 3],
    /// Buckets dropped because the table was full: refilled ones (no
    /// effect) and least recently used ones (their limit restarts).
    pub evicted_idle: u64,
    pub evicted_active: u64,
    /// Buckets held now.
    pub buckets: u64,
}

fn scope_index(s: RateScope) -> usize {
    match s {
        RateScope::ClientIp => 0,
        RateScope::Route => 1,
        RateScope::Identity => 2,
    }
}

/// One core's rate limiter.
pub struct RateLimiter {
    rules: Vec<Rule>,
    tables: Vec<Table>,
    /// Buckets in all tables.
    len: usize,
    cap: usize,
    counters: RateCounters,
    /// The rules' config, to tell whether a reload changed them.
    source: Vec<RateLimitRule>,
}

impl RateLimiter {
    pub fn new(g: &GatewayConfig) -> RateLimiter {
        let rules: Vec<Rule> = g.rate_limits.iter().map(Rule::new).collect();
        let tables = rules
            .iter()
            .map(|r| match r.scope {
                RateScope::ClientIp => Table::Ip(HashMap::new()),
                _ => Table::Name(HashMap::new()),
            })
            .collect();
        RateLimiter {
            rules,
            tables,
            len: 0,
            cap: g.rate_limit_table_size.max(1),
            counters: RateCounters::default(),
            source: g.rate_limits.clone(),
        }
    }

    /// SIGHUP: new rules start with full buckets (a raised limit applies
    /// at once); unchanged rules keep their buckets. Counters carry over.
    pub fn reconfigure(&mut self, g: &GatewayConfig) {
        self.cap = g.rate_limit_table_size.max(1);
        if self.source == g.rate_limits {
            return;
        }
        let counters = self.counters;
        *self = RateLimiter::new(g);
        self.counters = counters;
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn counters(&self) -> RateCounters {
        RateCounters {
            buckets: self.len as u64,
            ..self.counters
        }
    }

    /// Takes one token from every bucket `req` falls under, or none if
    /// one of them is empty: then the rule that waits longest refuses.
    pub fn check(&mut self, req: &Request<'_>, now: Instant) -> Result<(), Limited> {
        if self.rules.is_empty() {
            return Ok(());
        }
        // Phase 1: would every bucket give a token?
        let mut worst: Option<(usize, Duration)> = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.applies(req) {
                continue;
            }
            let tokens = match self.bucket(i, req) {
                Some(b) => rule.refill(b, now),
                None => rule.burst,
            };
            if tokens < 1.0 {
                let wait = rule.wait(tokens);
                if worst.is_none_or(|(_, w)| wait > w) {
                    worst = Some((i, wait));
                }
            }
        }
        if let Some((i, wait)) = worst {
            let rule = &self.rules[i];
            self.counters.limited[scope_index(rule.scope)] += 1;
            let t = retry_after_secs(wait);
            return Err(Limited {
                scope: rule.scope,
                policy_name: rule.name.clone(),
                policy: rule.policy.clone(),
                state: format!("\"{}\";r=0;t={t}", rule.name),
                wait,
            });
        }
        // Phase 2: take them.
        for i in 0..self.rules.len() {
            if self.rules[i].applies(req) {
                self.take(i, req, now);
            }
        }
        Ok(())
    }

    fn bucket(&self, i: usize, req: &Request<'_>) -> Option<&Bucket> {
        let rule = &self.rules[i];
        match &self.tables[i] {
            Table::Ip(m) => m.get(&ip_key(req.peer, rule.v4_bits, rule.v6_bits)),
            Table::Name(m) => m.get(name_of(rule.scope, req)?),
        }
    }

    fn take(&mut self, i: usize, req: &Request<'_>, now: Instant) {
        let rule = &self.rules[i];
        let found = match &mut self.tables[i] {
            Table::Ip(m) => m.get_mut(&ip_key(req.peer, rule.v4_bits, rule.v6_bits)),
            Table::Name(m) => name_of(rule.scope, req).and_then(|n| m.get_mut(n)),
        };
        if let Some(b) = found {
            b.tokens = rule.refill(b, now) - 1.0;
            b.at = now;
            return;
        }
        if self.len >= self.cap {
            self.make_room(now);
        }
        let rule = &self.rules[i];
        let fresh = Bucket {
            tokens: rule.burst - 1.0,
            at: now,
        };
        let inserted = match &mut self.tables[i] {
            Table::Ip(m) => m
                .insert(ip_key(req.peer, rule.v4_bits, rule.v6_bits), fresh)
                .is_none(),
            Table::Name(m) => match name_of(rule.scope, req) {
                Some(n) => m.insert(n.into(), fresh).is_none(),
                None => false,
            },
        };
        self.len += usize::from(inserted);
    }

    /// Frees at least an eighth of the table: refilled buckets first,
    /// then the least recently used.
    fn make_room(&mut self, now: Instant) {
        let before = self.len;
        for (rule, table) in self.rules.iter().zip(&mut self.tables) {
            table.retain(|b| rule.refill(b, now) < rule.burst);
        }
        self.len = self.tables.iter().map(Table::len).sum();
        self.counters.evicted_idle += (before - self.len) as u64;
        let want = (self.cap / 8).max(1);
        let freed = before - self.len;
        if freed >= want || self.len == 0 {
            return;
        }
        let mut times = Vec::with_capacity(self.len);
        for t in &self.tables {
            t.times(&mut times);
        }
        let k = (want - freed).min(times.len()) - 1;
        let (_, cut, _) = times.select_nth_unstable(k);
        let cut = *cut;
        for t in &mut self.tables {
            t.retain(|b| b.at > cut);
        }
        let after = self.tables.iter().map(Table::len).sum();
        self.counters.evicted_active += (self.len - after) as u64;
        self.len = after;
    }
}

fn name_of<'a>(scope: RateScope, req: &Request<'a>) -> Option<&'a str> {
    let (prefix, identity) = req.route?;
    match scope {
        RateScope::Route => Some(prefix),
        RateScope::Identity => Some(identity),
        RateScope::ClientIp => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn limiter(toml: &str, table: usize) -> RateLimiter {
        let text = format!("[gateway]\nrate_limit_table_size = {table}\n{toml}");
        let cfg = crate::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
        RateLimiter::new(&cfg.gateway)
    }

    fn req<'a>(ip: &str, path: &'a str, route: Option<(&'a str, &'a str)>) -> Request<'a> {
        Request {
            peer: ip.parse().unwrap(),
            path,
            route,
        }
    }

    const ALICE: Option<(&str, &str)> = Some(("/alice", "alice"));
    const BOB: Option<(&str, &str)> = Some(("/bob", "bob"));

    #[test]
    fn burst_then_refused_then_refilled() {
        let mut l = limiter(
            "[[gateway.rate_limits]]\nscope = \"client_ip\"\nrate = 2.0\nburst = 3\n",
            100,
        );
        let t0 = Instant::now();
        let r = req("10.0.0.1", "/alice/x", ALICE);
        for _ in 0..3 {
            assert_eq!(l.check(&r, t0), Ok(()));
        }
        let e = l.check(&r, t0).unwrap_err();
        assert_eq!(e.retry_after(), 1);
        // The pause behind it: until the token is back, not the whole second.
        assert_eq!(e.wait, Duration::from_millis(500));
        assert_eq!(e.policy, "\"client_ip\";q=3;w=2");
        assert_eq!(e.state, "\"client_ip\";r=0;t=1");
        assert_eq!(l.counters().limited, [1, 0, 0]);
        // Another address has its own bucket.
        assert_eq!(l.check(&req("10.0.0.2", "/alice/x", ALICE), t0), Ok(()));
        // Half a second later one token is back (rate 2/s), not two.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.check(&r, t1), Ok(()));
        assert!(l.check(&r, t1).is_err());
    }

    #[test]
    fn retry_after_counts_the_missing_fraction() {
        let mut l = limiter(
            "[[gateway.rate_limits]]\nscope = \"client_ip\"\nrate = 0.1\nburst = 1\n",
            100,
        );
        let t0 = Instant::now();
        let r = req("10.0.0.1", "/", None);
        l.check(&r, t0).unwrap();
        assert_eq!(l.check(&r, t0).unwrap_err().retry_after(), 10);
        let e = l.check(&r, t0 + Duration::from_secs(4)).unwrap_err();
        assert_eq!(e.retry_after(), 6);
        assert_eq!(e.wait, Duration::from_secs(6));
        // A wait in fractions of a millisecond rounds up: a request read
        // after it finds the token.
        let e = l
            .check(&r, t0 + Duration::from_micros(9_999_999))
            .unwrap_err();
        assert_eq!((e.retry_after(), e.wait), (1, Duration::from_millis(1)));
        assert_eq!(
            l.check(&r, t0 + Duration::from_micros(9_999_999) + e.wait),
            Ok(())
        );
    }

    #[test]
    fn prefixes_group_addresses() {
        let mut l = limiter(
            "[[gateway.rate_limits]]\nscope = \"client_ip\"\nrate = 0.001\nburst = 1\nip_prefix_v4 = 24\n",
            100,
        );
        let t = Instant::now();
        l.check(&req("10.0.0.1", "/", None), t).unwrap();
        assert!(l.check(&req("10.0.0.200", "/", None), t).is_err());
        l.check(&req("10.0.1.1", "/", None), t).unwrap();
        // IPv6 /64 by default; an IPv4-mapped address is its IPv4 one.
        l.check(&req("2001:db8::1", "/", None), t).unwrap();
        assert!(l.check(&req("2001:db8::ffff:2", "/", None), t).is_err());
        l.check(&req("2001:db8:0:1::1", "/", None), t).unwrap();
        assert!(l.check(&req("::ffff:10.0.0.7", "/", None), t).is_err());
        assert_ne!(
            ip_key(IpAddr::V4(Ipv4Addr::new(0, 0, 0, 1)), 32, 128),
            ip_key(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 1)), 32, 128)
        );
    }

    #[test]
    fn route_and_identity_scopes_apply_where_they_match() {
        let mut l = limiter(
            "[[gateway.rate_limits]]\nscope = \"route\"\nmatch = \"/alice\"\nrate = 0.001\nburst = 1\n\
             [[gateway.rate_limits]]\nscope = \"identity\"\nmatch = \"bob\"\nrate = 0.001\nburst = 2\n",
            100,
        );
        let t = Instant::now();
        l.check(&req("10.0.0.1", "/alice/a", ALICE), t).unwrap();
        let e = l.check(&req("10.0.0.2", "/alice/b", ALICE), t).unwrap_err();
        assert_eq!(e.scope, RateScope::Route);
        // `/alicex` is not under `/alice`.
        l.check(&req("10.0.0.1", "/alicex", Some(("/alicex", "alice"))), t)
            .unwrap();
        l.check(&req("10.0.0.1", "/bob/1", BOB), t).unwrap();
        l.check(&req("10.0.0.1", "/bob/2", BOB), t).unwrap();
        let e = l.check(&req("10.0.0.1", "/bob/3", BOB), t).unwrap_err();
        assert_eq!(
            (e.scope, e.policy_name.as_str()),
            (RateScope::Identity, "identity")
        );
        assert_eq!(l.counters().limited, [0, 1, 1]);
    }

    #[test]
    fn a_refusal_takes_no_token_from_the_other_rules() {
        let mut l = limiter(
            "[[gateway.rate_limits]]\nscope = \"client_ip\"\nrate = 0.001\nburst = 2\n\
             [[gateway.rate_limits]]\nscope = \"identity\"\nrate = 0.001\nburst = 1\n",
            100,
        );
        let t = Instant::now();
        l.check(&req("10.0.0.1", "/alice", ALICE), t).unwrap();
        // alice's identity bucket is empty: refused, the address keeps its
        // second token for bob.
        assert!(l.check(&req("10.0.0.1", "/alice", ALICE), t).is_err());
        l.check(&req("10.0.0.1", "/bob", BOB), t).unwrap();
        assert!(l.check(&req("10.0.0.1", "/bob", BOB), t).is_err());
    }

    #[test]
    fn the_table_stays_bounded_under_a_flood_of_addresses() {
        let mut l = limiter(
            "[[gateway.rate_limits]]\nscope = \"client_ip\"\nrate = 0.001\nburst = 5\n",
            64,
        );
        let t = Instant::now();
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let r = Request {
                peer: ip,
                path: "/",
                route: None,
            };
            l.check(&r, t + Duration::from_micros(u64::from(i)))
                .unwrap();
            assert!(l.counters().buckets <= 64);
        }
        let c = l.counters();
        assert_eq!(c.evicted_active + c.evicted_idle + c.buckets, 10_000);
        // A bucket that has refilled is dropped first, as no loss.
        let mut l = limiter(
            "[[gateway.rate_limits]]\nscope = \"client_ip\"\nrate = 1000.0\nburst = 5\n",
            8,
        );
        for i in 0..8u32 {
            let r = Request {
                peer: IpAddr::V4(Ipv4Addr::from(i)),
                path: "/",
                route: None,
            };
            l.check(&r, t).unwrap();
        }
        let later = t + Duration::from_secs(1);
        l.check(&req("10.9.9.9", "/", None), later).unwrap();
        let c = l.counters();
        assert_eq!((c.evicted_idle, c.evicted_active, c.buckets), (8, 0, 1));
    }

    #[test]
    fn reload_keeps_buckets_of_unchanged_rules_only() {
        let text = "[[gateway.rate_limits]]\nscope = \"client_ip\"\nrate = 0.001\nburst = 1\n";
        let mut l = limiter(text, 100);
        let t = Instant::now();
        let r = req("10.0.0.1", "/", None);
        l.check(&r, t).unwrap();
        let same = crate::config::Config::parse(text, std::path::Path::new("t")).unwrap();
        l.reconfigure(&same.gateway);
        assert!(l.check(&r, t).is_err());
        let raised = crate::config::Config::parse(
            &text.replace("burst = 1", "burst = 3"),
            std::path::Path::new("t"),
        )
        .unwrap();
        l.reconfigure(&raised.gateway);
        for _ in 0..3 {
            l.check(&r, t).unwrap();
        }
        assert!(l.check(&r, t).is_err());
        assert_eq!(l.counters().limited, [2, 0, 0]);
    }
}
