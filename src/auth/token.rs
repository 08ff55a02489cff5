//! Shared-secret tokens (`[[gateway.auth.tokens]]`): the simple identity
//! for private deployments. A presented token is looked up by its SHA-256
//! digest (one hash and one probe, however many identities are
//! configured: a reconnect storm of 10,000 token tunnels once cost a
//! comparison with every entry per handshake), then compared with the
//! stored token in constant time. The lookup's timing depends only on the
//! digest, which says nothing usable about a token's bytes.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthError, Identity, IdentityKind};
use crate::config::TokenEntry;

#[derive(Default)]
pub struct TokenAuth {
    /// SHA-256(token) → (name, token). A token listed twice: the last wins.
    entries: HashMap<[u8; 32], (Arc<str>, Vec<u8>)>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field(
                "names",
                &self.entries.values().map(|e| &e.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl TokenAuth {
    pub fn new(entries: &[TokenEntry]) -> Self {
        Self {
            entries: entries
                .iter()
                .map(|e| {
                    let token = e.token.as_bytes().to_vec();
                    (digest(&token), (Arc::from(e.name.as_str()), token))
                })
                .collect(),
        }
    }

    pub fn verify(&self, presented: &[u8]) -> Result<Identity, AuthError> {
        let (name, token) = self
            .entries
            .get(&digest(presented))
            .ok_or(AuthError::UnknownToken)?;
        if !bool::from(token.as_slice().ct_eq(presented)) {
            return Err(AuthError::UnknownToken);
        }
        Ok(Identity {
            name: name.clone(),
            kind: IdentityKind::Token,
        })
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

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
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

    #[test]
    fn ten_thousand_identities_each_find_their_own() {
        let entries: Vec<TokenEntry> = (0..10_000)
            .map(|i| TokenEntry {
                name: format!("id{i}"),
                token: format!("tok-{i}"),
                paths: vec![],
            })
            .collect();
        let auth = TokenAuth::new(&entries);
        for i in [0, 1, 4242, 9999] {
            let got = auth.verify(format!("tok-{i}").as_bytes()).unwrap();
            assert_eq!(&*got.name, format!("id{i}"));
        }
        assert!(auth.verify(b"tok-10000").is_err());
    }
}
