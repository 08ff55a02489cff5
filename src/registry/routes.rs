//! The route table: path prefix → identity, matched by longest
//! **path-segment** prefix (`/alice` owns `/alice` and `/alice/x`, never
//! `/alicex`). Each core holds its own copy; lookups are lock-free and
//! allocation-free: one hash probe per path segment.

use std::collections::HashMap;
use std::sync::Arc;

/// Who owns a prefix: the identity name (token name or DID).
pub type IdentityName = Arc<str>;

#[derive(Debug, Clone)]
pub struct Route {
    /// The prefix as configured (normalised: no trailing `/`, `""` = root).
    pub prefix: Arc<str>,
    pub identity: IdentityName,
}

#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    by_prefix: HashMap<Arc<str>, Route>,
    /// How many prefixes each identity owns: a tunnel upgrade asks whether
    /// its identity owns any, and with 100,000 routes a walk over
    /// `by_prefix` per upgrade would cost more than the handshake.
    owned: HashMap<IdentityName, usize>,
}

/// Normalises a configured prefix: trailing `/` and a final `/ad.json`
/// (DESIGN.md: a `proxy_path` ending in `/ad.json` serves its parent).
pub fn normalize_prefix(p: &str) -> &str {
    let p = p.strip_suffix("/ad.json").unwrap_or(p);
    p.trim_end_matches('/')
}

impl RouteTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `prefix` for `identity`; returns the previous owner if any.
    pub fn insert(&mut self, prefix: &str, identity: IdentityName) -> Option<IdentityName> {
        let key: Arc<str> = normalize_prefix(prefix).into();
        *self.owned.entry(identity.clone()).or_insert(0) += 1;
        let route = Route {
            prefix: key.clone(),
            identity,
        };
        let prev = self.by_prefix.insert(key, route).map(|r| r.identity)?;
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

    /// Who owns exactly `prefix` (after normalisation), if anyone.
    pub fn owner(&self, prefix: &str) -> Option<&IdentityName> {
        self.by_prefix
            .get(normalize_prefix(prefix))
            .map(|r| &r.identity)
    }

    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// The route owning `path` (already percent-decoded, without query).
    pub fn lookup(&self, path: &str) -> Option<&Route> {
        let mut p = path.trim_end_matches('/');
        loop {
            if let Some(r) = self.by_prefix.get(p) {
                return Some(r);
            }
            match p.rfind('/') {
                Some(i) => p = &p[..i],
                None => return None,
            }
        }
    }

    /// Prefixes owned by `identity` (a walk over every route: not for
    /// per-upgrade use, see [`RouteTable::owns_any`]).
    pub fn prefixes_of<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.by_prefix
            .values()
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
