//! `DidAuthError`: every way a DID-WBA proof can be refused, with the one
//! table that turns it into a status (401 bad proof, 403 valid identity
//! that may not attach, 503 when the gateway itself cannot decide) and a
//! stable snake_case reason for the JSON body, the log and metrics.

/// Why a DID-WBA proof was refused. `String` payloads are details for the
/// log and the JSON body's `message`; `reason()` never changes with them.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DidAuthError {
    #[error("malformed DID-WBA proof: {0}")]
    Malformed(String),
    #[error("not a did:wba DID: {0}")]
    InvalidDid(String),
    #[error("timestamp `{0}` is not an ISO 8601 UTC time")]
    InvalidTimestamp(String),
    #[error("proof created {0} s ago, older than the allowed window")]
    Expired(u64),
    #[error("proof created {0} s in the future, beyond the allowed skew")]
    InFuture(u64),
    #[error("signature expired {0} s ago (its `expires` parameter)")]
    SignatureExpired(u64),
    #[error("nonce already used")]
    NonceReplayed,
    #[error("too many nonces in flight; try again later")]
    NonceCacheFull,
    /// The shared nonce cache (the registry database) could not record it.
    #[error("shared nonce cache unavailable: {0}")]
    NonceStore(String),
    #[error("service domain `{0}` is not one this gateway serves")]
    ServiceDomain(String),
    #[error("missing Host header")]
    MissingHost,
    #[error("DID `{0}` owns no routes")]
    NoRoutes(String),
    #[error("DID document unavailable: {0}")]
    DocumentUnavailable(String),
    #[error("DID document larger than {0} bytes")]
    DocumentTooLarge(usize),
    #[error("DID document host resolves to a private, loopback or link-local address: {0}")]
    PrivateAddress(String),
    #[error("invalid DID document: {0}")]
    DocumentInvalid(String),
    #[error("key-bound DID does not match its document: {0}")]
    KeyBinding(String),
    #[error("verification method `{0}` not in the DID document")]
    UnknownVerificationMethod(String),
    #[error("verification method `{0}` is not listed under `authentication`")]
    NotAuthentication(String),
    #[error("unsupported verification method: {0}")]
    UnsupportedKey(String),
    #[error("Content-Digest does not match the (empty) body")]
    ContentDigest,
    #[error("signature does not verify")]
    BadSignature,
}

impl DidAuthError {
    /// Stable reason name for the JSON body, logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DidAuthError::Malformed(_) => "malformed_proof",
            DidAuthError::InvalidDid(_) => "invalid_did",
            DidAuthError::InvalidTimestamp(_) => "invalid_timestamp",
            DidAuthError::Expired(_) => "timestamp_expired",
            DidAuthError::InFuture(_) => "timestamp_in_future",
            DidAuthError::SignatureExpired(_) => "signature_expired",
            DidAuthError::NonceReplayed => "nonce_replayed",
            DidAuthError::NonceCacheFull => "nonce_cache_full",
            DidAuthError::NonceStore(_) => "nonce_store_unavailable",
            DidAuthError::ServiceDomain(_) => "service_domain_mismatch",
            DidAuthError::MissingHost => "missing_host",
            DidAuthError::NoRoutes(_) => "no_routes",
            DidAuthError::DocumentUnavailable(_) => "did_document_unavailable",
            DidAuthError::DocumentTooLarge(_) => "did_document_too_large",
            DidAuthError::PrivateAddress(_) => "did_document_private_address",
            DidAuthError::DocumentInvalid(_) => "did_document_invalid",
            DidAuthError::KeyBinding(_) => "key_binding_mismatch",
            DidAuthError::UnknownVerificationMethod(_) => "unknown_verification_method",
            DidAuthError::NotAuthentication(_) => "verification_method_not_authorized",
            DidAuthError::UnsupportedKey(_) => "unsupported_key_type",
            DidAuthError::ContentDigest => "content_digest_mismatch",
            DidAuthError::BadSignature => "invalid_signature",
        }
    }
}
