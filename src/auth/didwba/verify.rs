//! The DID-WBA verifier, sans-IO: [`Verifier::precheck`] does everything
//! that needs no DID document — format, service domain, time window, "does
//! this DID own any route?", nonce not seen — so a bad or useless proof
//! never causes a fetch; [`Verifier::finish`] takes the document and checks
//! its id, key binding, the verification method (listed under
//! `authentication`) and the signature, then records the nonce.
//!
//! The nonce is recorded only after the signature verified (junk cannot
//! fill the cache) and recorded atomically (two copies of one proof racing
//! through `finish` cannot both pass). Never touches the network or a file.

use std::sync::Mutex;

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::did::{self, DidWba};
use super::document;
use super::error::DidAuthError;
use super::header::{self, DidWbaHeader};
use super::keys::{PublicKey, RsLayout, B64URL};
use super::nonce::NonceCache;
use super::sigs::{self, RequestParts, SignatureInput};
use super::{binding, time};
use base64::Engine as _;

/// Verifier settings (from `[gateway.auth]`).
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Public domain names (lowercase). Empty: the upgrade's Host.
    pub service_domains: Vec<String>,
    /// Oldest accepted proof, seconds before now.
    pub window_past: u64,
    /// Furthest accepted proof, seconds after now (clock skew).
    pub window_future: u64,
    pub nonce_cache_size: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            service_domains: Vec::new(),
            window_past: 300,
            window_future: 60,
            nonce_cache_size: 100_000,
        }
    }
}

/// The upgrade request as the verifier sees it.
#[derive(Debug, Clone, Copy)]
pub struct DidRequest<'a> {
    pub method: &'a str,
    /// Request-target as received (origin-form `/ws`).
    pub target: &'a str,
    pub host: Option<&'a str>,
    /// Whether the connection is TLS (wss/https) or not (ws/http).
    pub tls: bool,
    pub headers: &'a [(&'a str, &'a [u8])],
}

impl<'a> DidRequest<'a> {
    fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    fn header_str(&self, name: &str) -> Result<Option<&'a str>, DidAuthError> {
        self.header(name)
            .map(|v| {
                std::str::from_utf8(v)
                    .map_err(|_| DidAuthError::Malformed(format!("{name} is not UTF-8")))
            })
            .transpose()
    }
}

/// Which DID-WBA scheme a request carries, if any: RFC 9421 headers win
/// over `Authorization: DIDWba` (as in anp's verifier).
pub fn carries_did_proof(headers: &[(&str, &[u8])]) -> bool {
    headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("signature-input")
            || n.eq_ignore_ascii_case("signature")
            || (n.eq_ignore_ascii_case("authorization")
                && v.trim_ascii_start().len() >= 6
                && v.trim_ascii_start()[..6].eq_ignore_ascii_case(b"didwba"))
    })
}

#[derive(Debug)]
enum Proof<'a> {
    DidWba {
        header: DidWbaHeader<'a>,
        service: &'a str,
    },
    HttpSig {
        input: SignatureInput<'a>,
        signature: Vec<u8>,
        fragment: &'a str,
    },
}

/// A proof that passed every check needing no document.
#[derive(Debug)]
pub struct Prechecked<'a> {
    did: DidWba<'a>,
    nonce: &'a str,
    timestamp: i64,
    proof: Proof<'a>,
}

impl<'a> Prechecked<'a> {
    pub fn did(&self) -> &DidWba<'a> {
        &self.did
    }

    pub fn nonce(&self) -> &'a str {
        self.nonce
    }
}

#[derive(Debug)]
pub struct Verifier {
    cfg: VerifierConfig,
    nonces: Mutex<NonceCache>,
}

/// `Host` without its port (and without IPv6 brackets).
pub fn host_without_port(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.split(':').next().unwrap_or("")
}

impl Verifier {
    pub fn new(cfg: VerifierConfig) -> Self {
        let nonces = Mutex::new(NonceCache::new(cfg.nonce_cache_size));
        Self { cfg, nonces }
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.cfg
    }

    /// Cheap checks, in order: Host and service domain, proof format, DID
    /// syntax, time window, routes, nonce not seen.
    pub fn precheck<'a>(
        &self,
        req: &DidRequest<'a>,
        now: i64,
        owns_routes: &dyn Fn(&str) -> bool,
    ) -> Result<Prechecked<'a>, DidAuthError> {
        let host = req.host.ok_or(DidAuthError::MissingHost)?;
        let service = host_without_port(host);
        if service.is_empty() {
            return Err(DidAuthError::MissingHost);
        }
        if !self.cfg.service_domains.is_empty()
            && !self
                .cfg
                .service_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(service))
        {
            return Err(DidAuthError::ServiceDomain(service.to_owned()));
        }

        let sig_input = req.header_str("signature-input")?;
        let sig = req.header_str("signature")?;
        let (did_str, nonce, timestamp, expires, proof) = if sig_input.is_some() || sig.is_some() {
            let (input, signature) = match (sig_input, sig) {
                (Some(i), Some(s)) => sigs::select(i, s)?,
                _ => {
                    return Err(DidAuthError::Malformed(
                        "Signature-Input and Signature must come together".into(),
                    ))
                }
            };
            let keyid = input
                .keyid
                .ok_or_else(|| DidAuthError::Malformed("Signature-Input without keyid".into()))?;
            let (did_str, fragment) = keyid
                .split_once('#')
                .ok_or_else(|| DidAuthError::Malformed("keyid is not `did#fragment`".into()))?;
            if fragment.is_empty() {
                return Err(DidAuthError::Malformed(
                    "keyid has an empty fragment".into(),
                ));
            }
            let created = input
                .created
                .ok_or_else(|| DidAuthError::Malformed("Signature-Input without created".into()))?;
            let nonce = input
                .nonce
                .filter(|n| !n.is_empty() && n.len() <= header::MAX_NONCE_LEN)
                .ok_or_else(|| {
                    DidAuthError::Malformed("Signature-Input without a usable nonce".into())
                })?;
            if !input
                .components
                .iter()
                .any(|c| *c == "@authority" || *c == "@target-uri")
            {
                return Err(DidAuthError::Malformed(
                    "signature must cover @authority or @target-uri".into(),
                ));
            }
            let expires = input.expires;
            (
                did_str,
                nonce,
                created,
                expires,
                Proof::HttpSig {
                    input,
                    signature,
                    fragment,
                },
            )
        } else {
            let auth = req
                .header_str("authorization")?
                .ok_or_else(|| DidAuthError::Malformed("no DID-WBA proof".into()))?;
            let h = header::parse(auth)?;
            let ts = time::parse_utc(h.timestamp).ok_or_else(|| {
                DidAuthError::InvalidTimestamp(did::truncate(h.timestamp).to_owned())
            })?;
            (
                h.did,
                h.nonce,
                ts,
                None,
                Proof::DidWba { header: h, service },
            )
        };

        let did = did::parse(did_str)?;
        if timestamp > now.saturating_add(self.cfg.window_future as i64) {
            return Err(DidAuthError::InFuture(timestamp.saturating_sub(now) as u64));
        }
        if now.saturating_sub(timestamp) > self.cfg.window_past as i64 {
            return Err(DidAuthError::Expired(now.saturating_sub(timestamp) as u64));
        }
        if let Some(e) = expires {
            if e < now {
                return Err(DidAuthError::SignatureExpired((now - e) as u64));
            }
        }
        if !owns_routes(did.did) {
            return Err(DidAuthError::NoRoutes(did.did.to_owned()));
        }
        if self
            .nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen(did.did, nonce, now)
        {
            return Err(DidAuthError::NonceReplayed);
        }
        Ok(Prechecked {
            did,
            nonce,
            timestamp,
            proof,
        })
    }

    /// Until when `p`'s nonce must be remembered: after that its timestamp
    /// is outside the window, which refuses a replay by itself.
    pub fn nonce_expiry(&self, p: &Prechecked<'_>) -> i64 {
        p.timestamp.saturating_add(self.cfg.window_past as i64 + 1)
    }

    /// Checks the proof against the DID's document, then spends the nonce.
    pub fn finish(
        &self,
        p: &Prechecked<'_>,
        req: &DidRequest<'_>,
        doc: &Value,
        now: i64,
    ) -> Result<(), DidAuthError> {
        let did = p.did.did;
        if document::doc_id(doc) != Some(did) {
            return Err(DidAuthError::DocumentInvalid(format!(
                "document id {:?} is not the DID",
                document::doc_id(doc).map(did::truncate)
            )));
        }
        binding::check(&p.did, doc)?;
        let fragment = match &p.proof {
            Proof::DidWba { header, .. } => header.verification_method,
            Proof::HttpSig { fragment, .. } => fragment,
        };
        let method_id = format!("{did}#{fragment}");
        let vm = document::find_method(doc, &method_id)
            .ok_or_else(|| DidAuthError::UnknownVerificationMethod(fragment.to_owned()))?;
        if !document::is_authorized(doc, "authentication", &method_id) {
            return Err(DidAuthError::NotAuthentication(fragment.to_owned()));
        }
        let key = PublicKey::from_method(vm)?;
        match &p.proof {
            Proof::DidWba { header, service } => {
                let sig = B64URL
                    .decode(header.signature)
                    .map_err(|_| DidAuthError::BadSignature)?;
                let hash = Sha256::digest(header.signed_content(service));
                key.verify(&hash, &sig, RsLayout::Trimmed)?;
            }
            Proof::HttpSig {
                input, signature, ..
            } => verify_http(input, signature, req, &key)?,
        }
        let expires = self.nonce_expiry(p);
        self.nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(did, p.nonce, expires, now)
    }
}

fn verify_http(
    input: &SignatureInput<'_>,
    signature: &[u8],
    req: &DidRequest<'_>,
    key: &PublicKey,
) -> Result<(), DidAuthError> {
    if input
        .components
        .iter()
        .any(|c| c.eq_ignore_ascii_case("content-digest"))
    {
        let cd = req
            .header_str("content-digest")?
            .ok_or(DidAuthError::ContentDigest)?;
        if !sigs::content_digest_is_empty_body(cd) {
            return Err(DidAuthError::ContentDigest);
        }
    }
    let host = req.host.unwrap_or("");
    // The client signed the URL it dialled, spelt ws(s):// or http(s)://;
    // the request only tells us its host and target, so both are tried.
    let candidates: Vec<String> = if req.target.starts_with('/') {
        let (a, b) = if req.tls {
            ("wss", "https")
        } else {
            ("ws", "http")
        };
        vec![
            format!("{a}://{host}{}", req.target),
            format!("{b}://{host}{}", req.target),
        ]
    } else {
        vec![req.target.to_owned()]
    };
    let covers_uri = input.components.contains(&"@target-uri");
    for uri in candidates.iter().take(if covers_uri { 2 } else { 1 }) {
        let parts = RequestParts {
            method: req.method,
            target_uri: uri,
            authority: host,
            request_target: req.target,
            headers: req.headers,
        };
        let base = sigs::signature_base(input, &parts)?;
        if key.verify(&base, signature, RsLayout::Fixed).is_ok() {
            return Ok(());
        }
    }
    Err(DidAuthError::BadSignature)
}
