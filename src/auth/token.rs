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

#[cfg(test)]
mod tests {
    use super::*;

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
