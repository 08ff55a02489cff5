//! ANP DID-WBA identity (DESIGN.md, "Identity and routes"): a receiver
//! proves a `did:wba` DID on the tunnel upgrade, with either scheme the
//! ANP SDKs speak —
//!
//! - `Authorization: DIDWba …` (agent-connect 0.3.7, anp 1.0.7
//!   `legacy_didwba`): [`header`];
//! - RFC 9421 `Signature-Input` / `Signature` (anp 1.0.7 default): [`sigs`].
//!
//! Layout: [`verify`] is the sans-IO verifier (cheap checks first, then the
//! document checks); [`resolve`] fetches documents (dir, base URL or HTTPS,
//! with limits and caches); [`DidAuth`] joins them for the gateway.
//! [`sign`] is the receiver's side and [`create`] is `anp-proxy did new`.
//! [`shared`] records spent nonces in the registry database, for a fleet.
//! Never runs on the request path: only on tunnel upgrades.

pub mod binding;
pub mod create;
pub mod did;
pub mod document;
pub mod error;
pub mod header;
pub mod keys;
pub mod nonce;
pub mod resolve;
pub mod shared;
pub mod sign;
pub mod sigs;
pub mod time;
pub mod verify;

use std::path::Path;
use std::time::Duration;

pub use error::DidAuthError;
pub use resolve::{Resolver, ResolverConfig, Source};
pub use sign::{DidSigner, SigningKey};
pub use verify::{DidRequest, Verifier, VerifierConfig};

use crate::config::{AuthConfig, Config};
use crate::registry::{Registry, RegistryError};

pub use shared::SharedNonces;

/// The gateway's DID-WBA verifier and document resolver, and the fleet's
/// shared nonce cache when `shared_nonces` is on.
#[derive(Debug)]
pub struct DidAuth {
    pub verifier: Verifier,
    pub resolver: Resolver,
    pub shared: Option<SharedNonces>,
}

/// Why the shared nonce cache did not start.
#[derive(Debug, thiserror::Error)]
pub enum SharedNoncesError {
    #[error("gateway.auth.shared_nonces: {0}")]
    Registry(#[from] RegistryError),
    #[error("gateway.auth.shared_nonces: cannot start its thread: {0}")]
    Thread(#[from] std::io::Error),
}

impl DidAuth {
    pub fn new(verifier: VerifierConfig, resolver: ResolverConfig) -> Self {
        Self {
            verifier: Verifier::new(verifier),
            resolver: Resolver::new(resolver),
            shared: None,
        }
    }

    /// The gateway's: [`Self::from_config`], and with
    /// `[gateway.auth] shared_nonces` the shared nonce cache over its own
    /// handle on the registry database (blocks: call before the cores run).
    pub fn for_gateway(cfg: &Config) -> Result<Self, SharedNoncesError> {
        let mut auth = Self::from_config(&cfg.gateway.auth, &cfg.base_dir);
        if cfg.gateway.auth.shared_nonces {
            let store = SharedNonces::start(Registry::open(cfg)?)?;
            tracing::info!(
                database = store.describe(),
                "DID nonces shared through the registry database"
            );
            auth.shared = Some(store);
        }
        Ok(auth)
    }

    /// From `[gateway.auth]`; relative paths resolve from `base_dir`.
    pub fn from_config(a: &AuthConfig, base_dir: &Path) -> Self {
        let source = if !a.did_documents_dir.is_empty() {
            Source::Dir(base_dir.join(&a.did_documents_dir))
        } else if !a.resolver_base_url.is_empty() {
            Source::BaseUrl(a.resolver_base_url.clone())
        } else {
            Source::Https
        };
        let secs = |v: f64| Duration::from_secs_f64(v.max(0.0));
        let (resolver_timeout, cache_ttl, negative_ttl) = (
            a.resolver_timeout.get(),
            a.document_cache_ttl.get(),
            a.document_negative_cache_ttl.get(),
        );
        Self::new(
            VerifierConfig {
                service_domains: a
                    .service_domains
                    .iter()
                    .map(|d| d.trim().to_ascii_lowercase())
                    .collect(),
                window_past: a.timestamp_window_past,
                window_future: a.timestamp_window_future,
                nonce_cache_size: a.nonce_cache_size,
            },
            ResolverConfig {
                source,
                connect_timeout: secs(resolver_timeout.min(3.0)),
                timeout: secs(resolver_timeout),
                max_size: a.document_max_size,
                allow_private: a.allow_private_resolver_targets,
                cache_ttl: secs(cache_ttl),
                negative_ttl: secs(negative_ttl),
                cache_size: a.document_cache_size,
            },
        )
    }

    /// Verifies the DID-WBA proof of an upgrade and returns the DID.
    /// `owns_routes` is asked before any document is fetched.
    pub async fn authenticate(
        &self,
        req: &DidRequest<'_>,
        owns_routes: &dyn Fn(&str) -> bool,
    ) -> Result<String, DidAuthError> {
        let now = time::now_unix();
        let pre = self.verifier.precheck(req, now, owns_routes)?;
        let doc = self.resolver.resolve(pre.did()).await?;
        // The fetch may have taken a while: judge the nonce at the time it
        // is recorded.
        self.verifier.finish(&pre, req, &doc, time::now_unix())?;
        // Then the fleet's: a proof another gateway took is a replay here.
        if let Some(shared) = &self.shared {
            shared
                .spend(pre.did().did, pre.nonce(), self.verifier.nonce_expiry(&pre))
                .await?;
        }
        Ok(pre.did().did.to_owned())
    }
}
