//! The route table: path prefix → identity, matched by longest
//! **path-segment** prefix (`/alice` owns `/alice` and `/alice/x`, never
//! `/alicex`). A route may also name a host: `example.com/agents/alice`
//! (that host only), `*.agents.example.com` (every subdomain of it, at any
//! depth; not the name itself), so one gateway serves several domains.
//! The request's `Host` picks the table first: the exact host, then the
//! wildcards from the most specific; a host whose table has no prefix of
//! the path falls back to the path-only routes. Each core holds its own
//! copy; lookups are lock-free and allocation-free: one hash probe per
//! path segment (plus one per label of the host when host routes exist).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// Who owns a prefix: the identity name (token name or DID).
pub type IdentityName = Arc<str>;

#[derive(Debug, Clone)]
pub struct Route {
    /// The route as configured, in its canonical form ([`route_key`]):
    /// `/path` (no trailing `/`, `""` = root), or `host/path`.
    pub prefix: Arc<str>,
    pub identity: IdentityName,
}

/// Path prefix → route.
type Paths = crate::FastMap<Arc<str>, Route>;

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Routes for any host.
    by_prefix: Paths,
    /// Host routes by host: `example.com`, or `.example.com` for
    /// `*.example.com` (no host name starts with a dot).
    hosts: crate::FastMap<Box<str>, Paths>,
    host_routes: usize,
    /// How many prefixes each identity owns: a tunnel upgrade asks whether
    /// its identity owns any, and with 100,000 routes a walk over
    /// `by_prefix` per upgrade would cost more than the handshake.
    owned: HashMap<IdentityName, usize>,
}

/// Normalises a configured path prefix: trailing `/` and a final
/// `/ad.json` (DESIGN.md: a `proxy_path` ending in `/ad.json` serves its
/// parent).
pub fn normalize_prefix(p: &str) -> &str {
    let p = p.strip_suffix("/ad.json").unwrap_or(p);
    p.trim_end_matches('/')
}

/// A route split into its host (lowercase; `.example.com` for
/// `*.example.com`; `None`: any host) and its normalised path prefix.
fn split(route: &str) -> (Option<String>, &str) {
    if route.starts_with('/') {
        return (None, normalize_prefix(route));
    }
    let (host, path) = route.split_at(route.find('/').unwrap_or(route.len()));
    let host = host.strip_prefix('*').unwrap_or(host).to_ascii_lowercase();
    (Some(host), normalize_prefix(path))
}

/// The canonical form of a route, as tables and the registry compare
/// them: `/a/` and `/a/ad.json` are `/a`; `Example.COM/x/` is
/// `example.com/x`.
pub fn route_key(route: &str) -> Cow<'_, str> {
    match split(route) {
        (None, p) => Cow::Borrowed(p),
        (Some(h), p) => {
            let star = if h.starts_with('.') { "*" } else { "" };
            Cow::Owned(format!("{star}{h}{p}"))
        }
    }
}

/// `route` with its host part (if any) in lowercase, the path as written.
pub fn lowercase_host(route: &str) -> Cow<'_, str> {
    let host_end = route.find('/').unwrap_or(route.len());
    if route.starts_with('/') || !route[..host_end].bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(route);
    }
    Cow::Owned(route[..host_end].to_ascii_lowercase() + &route[host_end..])
}

/// Whether `route` is one the table can hold: `/path…`, or a host name
/// (letters, digits, `-`, `.`; with a dot, or `localhost`: `agents/alice`
/// is a path missing its `/`, not a host), optionally `*.` before it,
/// optionally followed by `/path…`. The error says what a route looks
/// like.
pub fn check_route(route: &str) -> Result<(), String> {
    if route.starts_with('/') {
        return Ok(());
    }
    let host = &route[..route.find('/').unwrap_or(route.len())];
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let dotted = name.contains('.') || name.eq_ignore_ascii_case("localhost");
    if !dotted || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "`{route}` is neither a path (`/agents/alice`) nor a host route \
             (`example.com/agents/alice`, `*.agents.example.com`)"
        ));
    }
    Ok(())
}

/// The request's `Host` as host routes are keyed: port and a final dot
/// removed, lowercased into `buf`. `None` for what no host route can name
/// (an IPv6 literal, non-ASCII, longer than 253).
fn host_key<'b>(host: &[u8], buf: &'b mut [u8; 253]) -> Option<&'b str> {
    if host.first() == Some(&b'[') {
        return None;
    }
    let host = match host.iter().rposition(|b| *b == b':') {
        Some(i) if host[i + 1..].iter().all(u8::is_ascii_digit) => &host[..i],
        Some(_) => return None,
        None => host,
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    let out = buf.get_mut(..host.len())?;
    for (o, b) in out.iter_mut().zip(host) {
        if !b.is_ascii() {
            return None;
        }
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// The longest path-segment prefix of `path` in `t`.
fn walk<'t>(t: &'t Paths, path: &str) -> Option<&'t Route> {
    let mut p = path.trim_end_matches('/');
    loop {
        if let Some(r) = t.get(p) {
            return Some(r);
        }
        match p.rfind('/') {
            Some(i) => p = &p[..i],
            None => return None,
        }
    }
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `route` (a path prefix or a host route, see [`check_route`])
    /// for `identity`; returns the previous owner if any.
    pub fn insert(&mut self, route: &str, identity: IdentityName) -> Option<IdentityName> {
        let (host, path) = split(route);
        let prefix: Arc<str> = route_key(route).into();
        *self.owned.entry(identity.clone()).or_insert(0) += 1;
        let entry = Route { prefix, identity };
        let table = match host {
            None => &mut self.by_prefix,
            Some(h) => self.hosts.entry(h.into_boxed_str()).or_default(),
        };
        let prev = table.insert(path.into(), entry);
        if prev.is_none() && !route.starts_with('/') {
            self.host_routes += 1;
        }
        let prev = prev.map(|r| r.identity)?;
        if let Some(n) = self.owned.get_mut(&prev) {
            *n -= 1;
            if *n == 0 {
                self.owned.remove(&prev);
            }
        }
        Some(prev)
    }

    /// Whether `identity` owns at least one prefix (one hash probe).
    pub fn owns_any(&self, identity: &str) -> bool {
        self.owned.contains_key(identity)
    }

    /// Who owns exactly `route` (after normalisation), if anyone.
    pub fn owner(&self, route: &str) -> Option<&IdentityName> {
        let (host, path) = split(route);
        let table = match host {
            None => &self.by_prefix,
            Some(h) => self.hosts.get(h.as_str())?,
        };
        table.get(path).map(|r| &r.identity)
    }

    pub fn len(&self) -> usize {
        self.by_prefix.len() + self.host_routes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether any route names a host (only then does a lookup need the
    /// request's `Host`).
    pub fn has_host_routes(&self) -> bool {
        self.host_routes > 0
    }

    /// The route owning `path` (already percent-decoded, without query)
    /// for any host: path-only routes.
    pub fn lookup(&self, path: &str) -> Option<&Route> {
        walk(&self.by_prefix, path)
    }

    /// The route owning `path` on `host` (the request's `Host`, as sent):
    /// the host's own routes, then its wildcards from the most specific,
    /// then the path-only routes. Without host routes this is [`lookup`].
    ///
    /// [`lookup`]: RouteTable::lookup
    pub fn lookup_at(&self, host: Option<&[u8]>, path: &str) -> Option<&Route> {
        if self.host_routes > 0 {
            let mut buf = [0u8; 253];
            if let Some(h) = host.and_then(|h| host_key(h, &mut buf)) {
                let exact = std::iter::once(h);
                let wild = h.match_indices('.').map(|(i, _)| &h[i..]);
                for key in exact.chain(wild) {
                    if let Some(r) = self.hosts.get(key).and_then(|t| walk(t, path)) {
                        return Some(r);
                    }
                }
            }
        }
        self.lookup(path)
    }

    /// Routes owned by `identity`, in canonical form (a walk over every
    /// route: not for per-upgrade use, see [`RouteTable::owns_any`]).
    pub fn prefixes_of<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.by_prefix
            .values()
            .chain(self.hosts.values().flat_map(|t| t.values()))
            .filter(move |r| &*r.identity == identity)
            .map(|r| &*r.prefix)
    }
}

/// Builds the route table from the configured identities.
pub fn build_routes(cfg: &crate::config::Config) -> RouteTable {
    let mut t = RouteTable::new();
    let tokens = cfg
        .gateway
        .auth
        .tokens
        .iter()
        .map(|t| (t.name.as_str(), &t.paths));
    // A DID identity's name is the DID itself.
    let dids = cfg
        .gateway
        .auth
        .dids
        .iter()
        .map(|d| (d.did.as_str(), &d.paths));
    for (name, paths) in tokens.chain(dids) {
        let id: Arc<str> = name.into();
        for p in paths {
            if let Some(prev) = t.insert(p, id.clone()) {
                if prev != id {
                    tracing::warn!(path = %p, previous = %prev, now = %id, "prefix owned twice; last wins");
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &str)]) -> RouteTable {
        let mut t = RouteTable::new();
        for (p, id) in entries {
            t.insert(p, (*id).into());
        }
        t
    }

    fn owner<'a>(t: &'a RouteTable, path: &str) -> Option<&'a str> {
        t.lookup(path).map(|r| &*r.identity)
    }

    #[test]
    fn longest_segment_prefix_wins() {
        let t = table(&[("/alice", "a"), ("/alice/deep/", "d"), ("/bob/", "b")]);
        assert_eq!(owner(&t, "/alice"), Some("a"));
        assert_eq!(owner(&t, "/alice/"), Some("a"));
        assert_eq!(owner(&t, "/alice/x/y"), Some("a"));
        assert_eq!(owner(&t, "/alice/deep"), Some("d"));
        assert_eq!(owner(&t, "/alice/deep/er"), Some("d"));
        assert_eq!(owner(&t, "/alice/deeper"), Some("a"));
        assert_eq!(owner(&t, "/alicex"), None);
        assert_eq!(owner(&t, "/bob"), Some("b"));
        assert_eq!(owner(&t, "/"), None);
        assert_eq!(owner(&t, ""), None);
    }

    #[test]
    fn root_prefix_catches_all() {
        let t = table(&[("/", "root"), ("/a", "a")]);
        assert_eq!(owner(&t, "/zzz/q"), Some("root"));
        assert_eq!(owner(&t, "/"), Some("root"));
        assert_eq!(owner(&t, "/a/b"), Some("a"));
    }

    #[test]
    fn ad_json_serves_parent() {
        let t = table(&[("/agents/alice/ad.json", "alice")]);
        assert_eq!(owner(&t, "/agents/alice/ad.json"), Some("alice"));
        assert_eq!(owner(&t, "/agents/alice/tools/x"), Some("alice"));
        assert_eq!(owner(&t, "/agents/bob"), None);
    }

    #[test]
    fn ten_thousand_routes() {
        let mut t = RouteTable::new();
        for i in 0..10_000 {
            t.insert(&format!("/agents/a{i}/"), format!("id{i}").into());
        }
        assert_eq!(owner(&t, "/agents/a9999/x/y/z"), Some("id9999"));
        assert_eq!(owner(&t, "/agents/a10000/x"), None);
        assert_eq!(t.len(), 10_000);
    }

    #[test]
    fn host_routes_pick_by_host_then_fall_back_to_paths() {
        let t = table(&[
            ("/agents", "paths"),
            ("Alice.Example/agents/", "alice"),
            ("*.bob.example", "bob-any"),
            ("*.x.bob.example/api", "bob-x-api"),
            ("root.example", "root"),
        ]);
        let at = |host: &str, path: &str| {
            t.lookup_at(Some(host.as_bytes()), path)
                .map(|r| &*r.identity)
        };
        assert_eq!(at("alice.example", "/agents/q"), Some("alice"));
        assert_eq!(at("ALICE.example.:8080", "/agents"), Some("alice"));
        assert_eq!(at("alice.example", "/other"), None, "no fallback match");
        assert_eq!(at("other.example", "/agents/q"), Some("paths"));
        assert_eq!(at("a.bob.example", "/z"), Some("bob-any"));
        assert_eq!(at("deep.a.bob.example", "/"), Some("bob-any"));
        assert_eq!(at("bob.example", "/z"), None, "*. is not the name itself");
        assert_eq!(at("q.x.bob.example", "/api/v1"), Some("bob-x-api"));
        assert_eq!(at("q.x.bob.example", "/web"), Some("bob-any"));
        assert_eq!(at("root.example", "/anything"), Some("root"));
        assert_eq!(at("[::1]:80", "/agents"), Some("paths"));
        assert_eq!(
            t.lookup_at(None, "/agents").map(|r| &*r.identity),
            Some("paths")
        );
        assert_eq!(owner(&t, "/agents/x"), Some("paths"));
        assert_eq!(t.len(), 5);
        assert_eq!(t.owner("alice.example/agents").map(|i| &**i), Some("alice"));
        assert_eq!(
            t.prefixes_of("alice").collect::<Vec<_>>(),
            ["alice.example/agents"]
        );
        assert_eq!(
            t.prefixes_of("bob-any").collect::<Vec<_>>(),
            ["*.bob.example"]
        );
    }

    #[test]
    fn route_forms() {
        for ok in [
            "/",
            "/a/b",
            "example.com",
            "example.com/a",
            "*.ex-1.example.com/a/",
        ] {
            assert!(check_route(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b/x",
            "*example.com",
            "ex..com",
            "-a.com/x",
            "a_b.com",
            "http://x/y",
            "a.com:80/x",
            "agents/alice",
        ] {
            assert!(check_route(bad).is_err(), "{bad}");
        }
        assert_eq!(route_key("/a/ad.json"), "/a");
        assert_eq!(route_key("*.B.com/x/"), "*.b.com/x");
    }

    #[test]
    fn owns_any_follows_reassigned_prefixes() {
        let mut t = table(&[("/a", "x"), ("/b/", "x"), ("/c", "y")]);
        assert!(t.owns_any("x") && t.owns_any("y") && !t.owns_any("z"));
        // `/c/ad.json` is `/c`: y loses its only prefix to z.
        assert_eq!(t.insert("/c/ad.json", "z".into()).as_deref(), Some("y"));
        assert!(!t.owns_any("y") && t.owns_any("z"));
        // Re-inserting a prefix for its owner keeps the count right.
        t.insert("/a/", "x".into());
        t.insert("/b", "w".into());
        assert!(t.owns_any("x"));
        t.insert("/a", "w".into());
        assert!(!t.owns_any("x"));
        assert_eq!(t.prefixes_of("w").count(), 2);
    }
}
