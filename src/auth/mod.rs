//! Who is attaching a tunnel: the seam every identity scheme plugs into.
//!
//! The gateway hands the upgrade request's facts to [`Authenticator`] and
//! gets an [`Identity`] or an [`AuthError`] that names the reason (401 for
//! a bad proof, 403 for a valid identity without routes). Today: shared
//! tokens (`Authorization: Bearer …`, compared in constant time). DID-WBA
//! adds a variant here, not a new code path in the gateway.
//! Never honours the reference's unsigned `{"type":"authentication"}`.

pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;

pub use token::TokenAuth;

/// The facts of an upgrade request that identity schemes look at.
#[derive(Debug)]
pub struct UpgradeRequest<'a> {
    pub method: &'a str,
    pub target: &'a str,
    pub host: Option<&'a str>,
    pub authorization: Option<&'a [u8]>,
    pub peer: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    Token,
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
}

impl AuthError {
    /// 401 for a missing or bad proof, 403 for a valid identity that may
    /// not attach.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::NoRoutes(_) => 403,
            _ => 401,
        }
    }

    /// Stable reason name for the JSON body, logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_authorization",
            AuthError::UnsupportedScheme => "unsupported_scheme",
            AuthError::UnknownToken => "unknown_token",
            AuthError::NoRoutes(_) => "no_routes",
        }
    }
}

/// All configured identity schemes.
#[derive(Debug, Default)]
pub struct Authenticator {
    pub tokens: TokenAuth,
}

impl Authenticator {
    pub fn new(tokens: TokenAuth) -> Self {
        Self { tokens }
    }

    /// Proves the identity behind an upgrade request. Async so schemes that
    /// fetch documents (DID-WBA) fit the same seam.
    pub async fn authenticate(&self, req: &UpgradeRequest<'_>) -> Result<Identity, AuthError> {
        let value = req.authorization.ok_or(AuthError::Missing)?;
        let (scheme, rest) = split_scheme(value);
        if scheme.eq_ignore_ascii_case(b"bearer") {
            return self.tokens.verify(rest);
        }
        Err(AuthError::UnsupportedScheme)
    }
}

fn split_scheme(value: &[u8]) -> (&[u8], &[u8]) {
    let value = value.trim_ascii();
    match value.iter().position(|b| *b == b' ') {
        Some(i) => (&value[..i], value[i + 1..].trim_ascii()),
        None => (value, &[]),
    }
}
