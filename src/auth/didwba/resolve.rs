//! DID → DID document. The first configured source answers:
//! `did_documents_dir` (`DIR/example.com/user/alice/did.json`), else
//! `resolver_base_url` (replaces `https://{domain}`), else the DID's real
//! HTTPS location.
//!
//! Network fetches are the cold path (once per tunnel connect, at most):
//! a blocking `ureq` client on its own std thread, awaited through a
//! oneshot so the core's runtime never blocks. Limits: connect and total
//! timeouts, a body cap (64 KiB by default; `Content-Length` or the bytes
//! read beyond it refuse), no redirects, and a resolver hook that refuses
//! private, loopback, link-local and other non-public addresses unless
//! `allow_private_resolver_targets` is set. Results are cached: documents
//! for `document_cache_ttl`, failures for `document_negative_cache_ttl`.
//! Files are read inline (small, local, capped) and not cached, so an
//! edited document takes effect at once.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::did::DidWba;
use super::error::DidAuthError;

/// Where documents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    BaseUrl(String),
    Https,
}

#[derive(Debug, Clone)]
pub struct ResolverConfig {
    pub source: Source,
    /// Connect timeout, and the limit for the whole fetch.
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_size: usize,
    pub allow_private: bool,
    pub cache_ttl: Duration,
    pub negative_ttl: Duration,
    pub cache_size: usize,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            source: Source::Https,
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(5),
            max_size: 64 * 1024,
            allow_private: false,
            cache_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            cache_size: 10_000,
        }
    }
}

type CacheEntry = (Instant, Result<Arc<Value>, DidAuthError>);

#[derive(Debug)]
pub struct Resolver {
    cfg: ResolverConfig,
    cache: Mutex<HashMap<String, CacheEntry>>,
}

/// Where one DID's document is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Url(String),
}

impl Resolver {
    pub fn new(cfg: ResolverConfig) -> Self {
        Self {
            cfg,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn location(&self, did: &DidWba<'_>) -> Location {
        match &self.cfg.source {
            Source::Dir(dir) => Location::File(did.file_in(dir)),
            Source::BaseUrl(base) => Location::Url(format!(
                "{}{}",
                base.trim_end_matches('/'),
                did.document_path()
            )),
            Source::Https => Location::Url(did.https_url()),
        }
    }

    /// The document of `did` (parsed JSON; its `id` is checked by the verifier).
    pub async fn resolve(&self, did: &DidWba<'_>) -> Result<Arc<Value>, DidAuthError> {
        let url = match self.location(did) {
            Location::File(path) => return read_file(&path, self.cfg.max_size).map(Arc::new),
            Location::Url(url) => url,
        };
        if let Some(hit) = self.cached(did.did) {
            return hit;
        }
        let (tx, rx) = futures_channel::oneshot::channel();
        let cfg = self.cfg.clone();
        let fetch_url = url.clone();
        let spawned = std::thread::Builder::new()
            .name("anp-did-fetch".into())
            .spawn(move || {
                let _ = tx.send(fetch_blocking(&fetch_url, &cfg));
            });
        let res = match spawned {
            Ok(_) => rx.await.unwrap_or_else(|_| {
                Err(DidAuthError::DocumentUnavailable(
                    "fetch thread ended".into(),
                ))
            }),
            Err(e) => Err(DidAuthError::DocumentUnavailable(format!(
                "cannot start fetch thread: {e}"
            ))),
        };
        let res = res.and_then(|bytes| parse_document(&bytes)).map(Arc::new);
        if let Err(e) = &res {
            tracing::warn!(did = did.did, %url, reason = e.reason(), error = %e, "DID document fetch failed");
        }
        self.store(did.did, &res);
        res
    }

    fn cached(&self, did: &str) -> Option<Result<Arc<Value>, DidAuthError>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (at, res) = cache.get(did)?;
        let ttl = if res.is_ok() {
            self.cfg.cache_ttl
        } else {
            self.cfg.negative_ttl
        };
        (at.elapsed() < ttl).then(|| res.clone())
    }

    fn store(&self, did: &str, res: &Result<Arc<Value>, DidAuthError>) {
        let ttl = if res.is_ok() {
            self.cfg.cache_ttl
        } else {
            self.cfg.negative_ttl
        };
        if ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.cfg.cache_size {
            let (pos, neg) = (self.cfg.cache_ttl, self.cfg.negative_ttl);
            cache.retain(|_, (at, r)| at.elapsed() < if r.is_ok() { pos } else { neg });
            if cache.len() >= self.cfg.cache_size {
                return; // full of live entries: serve uncached rather than evict
            }
        }
        cache.insert(did.to_owned(), (Instant::now(), res.clone()));
    }
}

fn read_file(path: &std::path::Path, max: usize) -> Result<Value, DidAuthError> {
    let file = std::fs::File::open(path)
        .map_err(|e| DidAuthError::DocumentUnavailable(format!("{}: {e}", path.display())))?;
    let mut buf = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| DidAuthError::DocumentUnavailable(format!("{}: {e}", path.display())))?;
    if buf.len() > max {
        return Err(DidAuthError::DocumentTooLarge(max));
    }
    parse_document(&buf)
}

pub fn parse_document(bytes: &[u8]) -> Result<Value, DidAuthError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| DidAuthError::DocumentInvalid(format!("not JSON: {e}")))?;
    if !v.is_object() {
        return Err(DidAuthError::DocumentInvalid("not a JSON object".into()));
    }
    Ok(v)
}

/// Whether an address is one a public DID document may live at.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10 shared address space
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24 protocol assignments
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15 benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b)) // NAT64 can reach private v4
        }
    }
}

/// ureq's name resolution, filtered to public addresses unless allowed.
struct GuardedResolver {
    allow_private: bool,
    refused: Arc<AtomicBool>,
}

impl ureq::Resolver for GuardedResolver {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        let all: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        if self.allow_private {
            return Ok(all);
        }
        let public: Vec<SocketAddr> = all.iter().copied().filter(|a| is_public(a.ip())).collect();
        if public.is_empty() && !all.is_empty() {
            self.refused.store(true, Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "address is not public",
            ));
        }
        Ok(public)
    }
}

/// One GET of `url` with every limit applied. Runs on its own thread.
pub fn fetch_blocking(url: &str, cfg: &ResolverConfig) -> Result<Vec<u8>, DidAuthError> {
    let refused = Arc::new(AtomicBool::new(false));
    let agent = ureq::AgentBuilder::new()
        .resolver(GuardedResolver {
            allow_private: cfg.allow_private,
            refused: refused.clone(),
        })
        .redirects(0)
        .timeout_connect(cfg.connect_timeout)
        .timeout(cfg.timeout)
        .user_agent(concat!("anp-proxy/", env!("CARGO_PKG_VERSION")))
        .build();
    let resp = match agent.get(url).set("Accept", "application/json").call() {
        Ok(r) => r,
        Err(ureq::Error::Status(code, _)) => {
            return Err(DidAuthError::DocumentUnavailable(format!(
                "{url}: HTTP {code}"
            )))
        }
        Err(ureq::Error::Transport(t)) => {
            if refused.load(Ordering::Relaxed) {
                return Err(DidAuthError::PrivateAddress(url.to_owned()));
            }
            return Err(DidAuthError::DocumentUnavailable(format!("{url}: {t}")));
        }
    };
    if resp.status() != 200 {
        return Err(DidAuthError::DocumentUnavailable(format!(
            "{url}: HTTP {} (redirects are not followed)",
            resp.status()
        )));
    }
    if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        if len > cfg.max_size as u64 {
            return Err(DidAuthError::DocumentTooLarge(cfg.max_size));
        }
    }
    let mut buf = Vec::with_capacity(4096);
    resp.into_reader()
        .take(cfg.max_size as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| DidAuthError::DocumentUnavailable(format!("{url}: {e}")))?;
    if buf.len() > cfg.max_size {
        return Err(DidAuthError::DocumentTooLarge(cfg.max_size));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a} must be refused");
        }
        for a in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a} must pass");
        }
    }

    #[test]
    fn guarded_resolver_refuses_loopback_unless_allowed() {
        let refused = Arc::new(AtomicBool::new(false));
        let r = GuardedResolver {
            allow_private: false,
            refused: refused.clone(),
        };
        assert!(ureq::Resolver::resolve(&r, "127.0.0.1:80").is_err());
        assert!(refused.load(Ordering::Relaxed));
        let r = GuardedResolver {
            allow_private: true,
            refused: Arc::new(AtomicBool::new(false)),
        };
        assert_eq!(
            ureq::Resolver::resolve(&r, "127.0.0.1:80").unwrap().len(),
            1
        );
    }
}
