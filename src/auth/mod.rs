//! Who is attaching a tunnel: the seam every identity scheme plugs into.
//!
//! The gateway hands the upgrade request's facts to [`Authenticator`] and
//! gets an [`Identity`] or an [`AuthError`] that names the reason (401 for
//! a bad proof, 403 for a valid identity without routes). Schemes: shared
//! tokens (`Authorization: Bearer …`, compared in constant time) and ANP
//! DID-WBA (`Authorization: DIDWba …` or RFC 9421 signatures, [`didwba`]),
//! whose identity name is the DID itself.
//! Never honours the reference's unsigned `{"type":"authentication"}`.

pub mod didwba;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;

pub use didwba::{DidAuth, DidAuthError};
pub use token::TokenAuth;

/// The facts of an upgrade request that identity schemes look at.
#[derive(Debug)]
pub struct UpgradeRequest<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub host: Option<&'a str>,
    pub authorization: Option<&'a [u8]>,
    pub peer: SocketAddr,
    /// Every header of the request, in order (RFC 9421 signs some).
    pub headers: &'a [(&'a str, &'a [u8])],
    /// The connection is TLS (`wss`), not plain (`ws`).
    pub tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    Token,
    /// A `did:wba` DID; the identity's name is the DID.
    Did,
}

/// A proven identity: the name its routes are registered under.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: Arc<str>,
    pub kind: IdentityKind,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no Authorization header")]
    Missing,
    #[error("unsupported authorization scheme")]
    UnsupportedScheme,
    #[error("unknown token")]
    UnknownToken,
    #[error("identity `{0}` owns no routes")]
    NoRoutes(String),
    #[error(transparent)]
    Did(#[from] DidAuthError),
}

impl AuthError {
    /// The identity is proven (or its proof not yet checked) but owns no
    /// route: worth asking the registry again before refusing.
    pub fn is_no_routes(&self) -> bool {
        matches!(
            self,
            AuthError::NoRoutes(_) | AuthError::Did(DidAuthError::NoRoutes(_))
        )
    }

    /// Stable reason name for the JSON body, logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_authorization",
            AuthError::UnsupportedScheme => "unsupported_scheme",
            AuthError::UnknownToken => "unknown_token",
            AuthError::NoRoutes(_) => "no_routes",
            AuthError::Did(e) => e.reason(),
        }
    }
}

/// All configured identity schemes.
#[derive(Debug, Default)]
pub struct Authenticator {
    /// Replaced whole on SIGHUP; read on upgrades only (a cold path).
    tokens: std::sync::RwLock<Arc<TokenAuth>>,
    /// `None` when `did_wba_enabled = false`.
    pub did: Option<DidAuth>,
}

impl Authenticator {
    pub fn new(tokens: TokenAuth) -> Self {
        Self {
            tokens: std::sync::RwLock::new(Arc::new(tokens)),
            did: None,
        }
    }

    /// Makes `tokens` the shared secrets in force (SIGHUP). Tunnels already
    /// up stay up.
    pub fn set_tokens(&self, tokens: TokenAuth) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
    }

    pub fn with_did(mut self, did: DidAuth) -> Self {
        self.did = Some(did);
        self
    }

    /// Proves the identity behind an upgrade request. Async so schemes that
    /// fetch documents (DID-WBA) fit the same seam. `owns_routes` answers
    /// "does this identity own any route?"; DID-WBA asks it before any
    /// document fetch, so a DID without routes costs no network.
    ///
    /// Order (as anp's verifier): `Authorization: Bearer` → RFC 9421
    /// `Signature-Input`/`Signature` → `Authorization: DIDWba`.
    pub async fn authenticate(
        &self,
        req: &UpgradeRequest<'_>,
        owns_routes: &dyn Fn(&str) -> bool,
    ) -> Result<Identity, AuthError> {
        if let Some(value) = req.authorization {
            let (scheme, rest) = split_scheme(value);
            // Case-insensitive scheme and extra spaces around the token are
            // accepted on purpose: RFC 9110 §11.1 makes auth schemes
            // case-insensitive and RFC 6750 §2.1 tokens carry no spaces, so
            // nothing a client could mean differently is let through.
            if scheme.eq_ignore_ascii_case(b"bearer") {
                let tokens = self
                    .tokens
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                return tokens.verify(rest);
            }
        }
        if didwba::verify::carries_did_proof(req.headers) {
            let Some(did) = &self.did else {
                return Err(AuthError::UnsupportedScheme);
            };
            let dreq = didwba::DidRequest {
                method: req.method,
                target: req.target,
                host: req.host,
                tls: req.tls,
                headers: req.headers,
            };
            let name = did.authenticate(&dreq, owns_routes).await?;
            return Ok(Identity {
                name: name.into(),
                kind: IdentityKind::Did,
            });
        }
        match req.authorization {
            None => Err(AuthError::Missing),
            Some(_) => Err(AuthError::UnsupportedScheme),
        }
    }
}

fn split_scheme(value: &[u8]) -> (&[u8], &[u8]) {
    let value = value.trim_ascii();
    match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], value[i + 1..].trim_ascii()),
        None => (value, &[]),
    }
}
