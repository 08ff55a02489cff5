//! Shared-secret tokens (`[[gateway.auth.tokens]]`): the simple identity
//! for private deployments. Compared in constant time; every entry is
//! compared so timing does not say which one matched.

use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::{AuthError, Identity, IdentityKind};
use crate::config::TokenEntry;

#[derive(Default)]
pub struct TokenAuth {
    entries: Vec<(Arc<str>, Vec<u8>)>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field(
                "names",
                &self.entries.iter().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TokenAuth {
    pub fn new(entries: &[TokenEntry]) -> Self {
        Self {
            entries: entries
                .iter()
                .map(|e| (Arc::from(e.name.as_str()), e.token.as_bytes().to_vec()))
                .collect(),
        }
    }

    pub fn verify(&self, presented: &[u8]) -> Result<Identity, AuthError> {
        let mut found: Option<&Arc<str>> = None;
        for (name, token) in &self.entries {
            if bool::from(token.as_slice().ct_eq(presented)) {
                found = Some(name);
            }
        }
        found
            .map(|name| Identity {
                name: name.clone(),
                kind: IdentityKind::Token,
            })
            .ok_or(AuthError::UnknownToken)
    }
}

/// A new token for `anp-proxy token new`: 32 random bytes (256 bits, from
/// `rand`'s thread-local CSPRNG, seeded by the OS) as 43 base64url
/// characters, safe in TOML, a shell variable and an HTTP header alike.
pub fn generate() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_distinct_and_plain() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn matches_only_exact_token() {
        let auth = TokenAuth::new(&[TokenEntry {
            name: "alice".into(),
            token: "alice-secret".into(),
            paths: vec![],
        }]);
        assert_eq!(&*auth.verify(b"alice-secret").unwrap().name, "alice");
        assert_eq!(
            auth.verify(b"alice-secre").unwrap_err(),
            AuthError::UnknownToken
        );
        assert_eq!(
            auth.verify(b"alice-secret2").unwrap_err(),
            AuthError::UnknownToken
        );
        assert_eq!(auth.verify(b"").unwrap_err(), AuthError::UnknownToken);
    }
}
