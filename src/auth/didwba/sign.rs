//! The receiver's side: prove a DID on the tunnel upgrade, with the DID
//! document and the PKCS#8 PEM private key the SDKs write. Builds either
//! the `Authorization: DIDWba …` header or the RFC 9421 `Signature-Input` /
//! `Signature` pair; the caller supplies a fresh nonce and time per
//! connection attempt.
//!
//! The `DIDWba` header says `v="1.0"` and signs `service`: agent-connect's
//! verifier ignores `v` and signs `service`; anp's treats `v` < 1.1 as
//! `service` too (and a missing `v` as 1.1 / `aud`), so this is the one
//! spelling both SDKs' verifiers accept.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use k256::ecdsa::signature::hazmat::PrehashSigner as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::document;
use super::header;
use super::keys::{PublicKey, B64STD, B64URL};

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("DID document: {0}")]
    Document(String),
    #[error("private key: {0}")]
    Key(String),
    #[error("the private key matches no `authentication` method of {0}")]
    NoMatchingMethod(String),
}

/// A private key of a kind the SDKs create.
pub enum SigningKey {
    Secp256k1(k256::ecdsa::SigningKey),
    P256(p256::ecdsa::SigningKey),
    Ed25519(ed25519_dalek::SigningKey),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, <secret>)", self.public().kind())
    }
}

impl SigningKey {
    /// A PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) of secp256k1, P-256 or
    /// Ed25519, unencrypted, as `cryptography`'s `PrivateFormat.PKCS8` writes.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, SignError> {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        if let Ok(k) = k256::SecretKey::from_pkcs8_pem(pem) {
            return Ok(SigningKey::Secp256k1(k.into()));
        }
        if let Ok(k) = p256::SecretKey::from_pkcs8_pem(pem) {
            return Ok(SigningKey::P256(k.into()));
        }
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Ok(SigningKey::Ed25519(k));
        }
        Err(SignError::Key(
            "not an unencrypted PKCS#8 PEM of secp256k1, P-256 or Ed25519".into(),
        ))
    }

    /// PKCS#8 PEM of this key.
    pub fn to_pkcs8_pem(&self) -> String {
        use k256::pkcs8::{EncodePrivateKey as _, LineEnding};
        let pem = match self {
            SigningKey::Secp256k1(k) => k256::SecretKey::from(k.as_nonzero_scalar())
                .to_pkcs8_pem(LineEnding::LF)
                .map(|p| p.to_string()),
            SigningKey::P256(k) => p256::SecretKey::from(k.as_nonzero_scalar())
                .to_pkcs8_pem(LineEnding::LF)
                .map(|p| p.to_string()),
            SigningKey::Ed25519(k) => return ed25519_pkcs8_v1_pem(k),
        };
        pem.unwrap_or_default()
    }

    pub fn public(&self) -> PublicKey {
        match self {
            SigningKey::Secp256k1(k) => PublicKey::Secp256k1(*k.verifying_key()),
            SigningKey::P256(k) => PublicKey::P256(*k.verifying_key()),
            SigningKey::Ed25519(k) => PublicKey::Ed25519(k.verifying_key()),
        }
    }

    /// Signs as the SDKs do: ECDSA over SHA-256(msg) as 64-byte r‖s
    /// (low-S), Ed25519 over msg.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer as _;
        let digest = Sha256::digest(msg);
        match self {
            SigningKey::Secp256k1(k) => {
                let s: Result<k256::ecdsa::Signature, _> = k.sign_prehash(&digest);
                s.map(|s| s.to_bytes().to_vec()).unwrap_or_default()
            }
            SigningKey::P256(k) => {
                let s: Result<p256::ecdsa::Signature, _> = k.sign_prehash(&digest);
                s.map(|s| {
                    let s = s.normalize_s().unwrap_or(s);
                    s.to_bytes().to_vec()
                })
                .unwrap_or_default()
            }
            SigningKey::Ed25519(k) => k.sign(msg).to_bytes().to_vec(),
        }
    }
}

/// RFC 8410 PKCS#8 v1 (the form `cryptography` writes and every reader
/// takes): a fixed DER prefix and the 32-byte seed.
fn ed25519_pkcs8_v1_pem(k: &ed25519_dalek::SigningKey) -> String {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(k.as_bytes());
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
}

/// A DID, the verification method to sign with, and its key.
pub struct DidSigner {
    did: String,
    fragment: String,
    key: SigningKey,
}

impl std::fmt::Debug for DidSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DidSigner")
            .field("did", &self.did)
            .field("fragment", &self.fragment)
            .field("key", &self.key)
            .finish()
    }
}

/// 16 random bytes as 32 hex digits (the SDKs' `secrets.token_hex(16)`).
pub fn fresh_nonce() -> String {
    let b: [u8; 16] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl DidSigner {
    pub fn load(document: &Path, private_key: &Path) -> Result<Self, SignError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| SignError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let doc: Value = serde_json::from_str(&read(document)?)
            .map_err(|e| SignError::Document(format!("{}: {e}", document.display())))?;
        let key = SigningKey::from_pkcs8_pem(&read(private_key)?)?;
        Self::new(&doc, key)
    }

    /// Picks the first `authentication` method whose public key is `key`'s.
    pub fn new(doc: &Value, key: SigningKey) -> Result<Self, SignError> {
        let did = document::doc_id(doc)
            .ok_or_else(|| SignError::Document("no `id`".into()))?
            .to_owned();
        super::did::parse(&did).map_err(|e| SignError::Document(e.to_string()))?;
        let public = key.public();
        for id in document::authorized_ids(doc, "authentication") {
            let Some(vm) = document::find_method(doc, &id) else {
                continue;
            };
            if PublicKey::from_method(vm).ok().as_ref() == Some(&public) {
                if let Some((_, frag)) = id.split_once('#') {
                    return Ok(Self {
                        fragment: frag.to_owned(),
                        did,
                        key,
                    });
                }
            }
        }
        Err(SignError::NoMatchingMethod(did))
    }

    pub fn did(&self) -> &str {
        &self.did
    }

    pub fn keyid(&self) -> String {
        format!("{}#{}", self.did, self.fragment)
    }

    /// `DIDWba v="1.0", did=…, nonce=…, timestamp=…, verification_method=…, signature=…`
    /// for `service` (the gateway's host name, no port).
    pub fn didwba_header(&self, service: &str, nonce: &str, timestamp: &str) -> String {
        let content = header::signed_content(&self.did, nonce, timestamp, "service", service);
        let sig = self.key.sign(&Sha256::digest(content));
        format!(
            "DIDWba v=\"1.0\", did=\"{}\", nonce=\"{nonce}\", timestamp=\"{timestamp}\", verification_method=\"{}\", signature=\"{}\"",
            self.did,
            self.fragment,
            B64URL.encode(sig)
        )
    }

    /// (`Signature-Input`, `Signature`) covering `@method`, `@target-uri`
    /// and `@authority`, valid from `created` for 300 s, as anp writes them.
    pub fn http_signature(
        &self,
        method: &str,
        target_uri: &str,
        authority: &str,
        created: i64,
        nonce: &str,
    ) -> (String, String) {
        let params = format!(
            "(\"@method\" \"@target-uri\" \"@authority\");created={created};expires={};nonce=\"{nonce}\";keyid=\"{}\"",
            created + 300,
            self.keyid()
        );
        let base = format!(
            "\"@method\": {}\n\"@target-uri\": {target_uri}\n\"@authority\": {authority}\n\"@signature-params\": {params}",
            method.to_ascii_uppercase()
        );
        let sig = self.key.sign(base.as_bytes());
        (
            format!("sig1={params}"),
            format!("sig1=:{}:", B64STD.encode(sig)),
        )
    }
}
