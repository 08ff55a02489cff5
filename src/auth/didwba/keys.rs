//! Public keys of DID documents and how each one verifies a signature.
//!
//! Key shapes accepted (those the SDKs write, plus their documented
//! siblings): `EcdsaSecp256k1VerificationKey2019` with a secp256k1
//! `publicKeyJwk` (agent-connect; coordinates may be shorter than 32
//! bytes there, they are left-padded) or compressed `publicKeyMultibase`;
//! `EcdsaSecp256r1VerificationKey2019` with a P-256 JWK (anp's `key-2`);
//! `Multikey` / `Ed25519VerificationKey2018|2020` with `publicKeyMultibase`
//! (`z` + base58btc, with or without the 0xed01 multicodec prefix),
//! `publicKeyBase58` or an OKP JWK; `JsonWebKey2020` with any of those JWKs.
//!
//! Signatures: ECDSA is verified over SHA-256 of the message (the SDKs call
//! `sign(message, ECDSA(SHA256()))`), from IEEE P1363 `r‖s`; k256/p256
//! refuse high-S signatures, which OpenSSL produces half the time, so `s`
//! is normalised first (an equivalent signature, not a weaker check).
//! Ed25519 uses `verify_strict` (no small-order keys or signatures).

use base64::Engine as _;
use k256::ecdsa::signature::hazmat::PrehashVerifier as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::DidAuthError;

/// base64url, padding optional on input, none on output.
pub(crate) const B64URL: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Standard base64 (RFC 9421 byte sequences), padding optional on input.
pub(crate) const B64STD: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Secp256k1(k256::ecdsa::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// How an ECDSA `r‖s` may be laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsLayout {
    /// Exactly 64 bytes (RFC 9421, data integrity proofs, anp 1.x).
    Fixed,
    /// agent-connect 0.3.7 drops leading zero bytes of r and s; its own
    /// verifier splits at len/2. Shorter signatures are tried at that
    /// split first, then at the other splits that keep both halves ≤ 32.
    Trimmed,
}

fn unsupported(why: impl Into<String>) -> DidAuthError {
    DidAuthError::UnsupportedKey(why.into())
}

impl PublicKey {
    /// The key of one `verificationMethod` entry.
    pub fn from_method(vm: &Value) -> Result<PublicKey, DidAuthError> {
        let ty = vm
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| unsupported("verification method without `type`"))?;
        let jwk = vm.get("publicKeyJwk");
        let multibase = vm.get("publicKeyMultibase").and_then(Value::as_str);
        let base58 = vm.get("publicKeyBase58").and_then(Value::as_str);
        let key = match ty {
            "EcdsaSecp256k1VerificationKey2019" => match (jwk, multibase) {
                (Some(j), _) => from_jwk(j, Some("secp256k1"))?,
                (None, Some(m)) => PublicKey::Secp256k1(
                    k256::ecdsa::VerifyingKey::from_sec1_bytes(&multibase_bytes(m)?)
                        .map_err(|_| unsupported("bad secp256k1 multibase key"))?,
                ),
                _ => return Err(unsupported(format!("{ty} without a key"))),
            },
            "EcdsaSecp256r1VerificationKey2019" => match (jwk, multibase) {
                (Some(j), _) => from_jwk(j, Some("P-256"))?,
                (None, Some(m)) => PublicKey::P256(
                    p256::ecdsa::VerifyingKey::from_sec1_bytes(&multibase_bytes(m)?)
                        .map_err(|_| unsupported("bad P-256 multibase key"))?,
                ),
                _ => return Err(unsupported(format!("{ty} without a key"))),
            },
            "Multikey" | "Ed25519VerificationKey2018" | "Ed25519VerificationKey2020" => {
                match (jwk, base58, multibase) {
                    (Some(j), _, _) => match from_jwk(j, Some("Ed25519"))? {
                        k @ PublicKey::Ed25519(_) => k,
                        _ => return Err(unsupported("non-Ed25519 JWK")),
                    },
                    (None, Some(b), _) => ed25519(
                        &bs58::decode(b)
                            .into_vec()
                            .map_err(|_| unsupported("bad publicKeyBase58"))?,
                    )?,
                    (None, None, Some(m)) => multikey(&multibase_bytes(m)?, ty == "Multikey")?,
                    _ => return Err(unsupported(format!("{ty} without a key"))),
                }
            }
            "JsonWebKey2020" => from_jwk(
                jwk.ok_or_else(|| unsupported("JsonWebKey2020 without publicKeyJwk"))?,
                None,
            )?,
            other => return Err(unsupported(format!("type `{other}`"))),
        };
        Ok(key)
    }

    /// Verifies `sig` over `msg` as the SDKs sign: ECDSA over SHA-256(msg),
    /// Ed25519 over msg itself.
    pub fn verify(&self, msg: &[u8], sig: &[u8], layout: RsLayout) -> Result<(), DidAuthError> {
        match self {
            PublicKey::Ed25519(k) => {
                let sig: [u8; 64] = sig.try_into().map_err(|_| DidAuthError::BadSignature)?;
                k.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
                    .map_err(|_| DidAuthError::BadSignature)
            }
            PublicKey::Secp256k1(k) => {
                let digest = Sha256::digest(msg);
                for rs in rs_candidates(sig, layout) {
                    if let Ok(s) = k256::ecdsa::Signature::from_slice(&rs) {
                        let s = s.normalize_s().unwrap_or(s);
                        if k.verify_prehash(&digest, &s).is_ok() {
                            return Ok(());
                        }
                    }
                }
                Err(DidAuthError::BadSignature)
            }
            PublicKey::P256(k) => {
                let digest = Sha256::digest(msg);
                for rs in rs_candidates(sig, layout) {
                    if let Ok(s) = p256::ecdsa::Signature::from_slice(&rs) {
                        let s = s.normalize_s().unwrap_or(s);
                        if k.verify_prehash(&digest, &s).is_ok() {
                            return Ok(());
                        }
                    }
                }
                Err(DidAuthError::BadSignature)
            }
        }
    }

    /// The RFC 7638 JWK thumbprint: base64url(SHA-256) of the required
    /// members in lexicographic order, no whitespace; EC coordinates as
    /// fixed 32 bytes (anp's `compute_jwk_fingerprint`).
    pub fn jwk_thumbprint(&self) -> String {
        let json = match self {
            PublicKey::Ed25519(k) => format!(
                r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
                B64URL.encode(k.as_bytes())
            ),
            PublicKey::Secp256k1(k) => {
                let p = k.to_encoded_point(false);
                ec_thumb_json("secp256k1", p.as_bytes())
            }
            PublicKey::P256(k) => {
                let p = k.to_encoded_point(false);
                ec_thumb_json("P-256", p.as_bytes())
            }
        };
        B64URL.encode(Sha256::digest(json.as_bytes()))
    }

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PublicKey::Secp256k1(_) => "secp256k1",
            PublicKey::P256(_) => "P-256",
            PublicKey::Ed25519(_) => "Ed25519",
        }
    }
}

fn ec_thumb_json(crv: &str, uncompressed: &[u8]) -> String {
    format!(
        r#"{{"crv":"{crv}","kty":"EC","x":"{}","y":"{}"}}"#,
        B64URL.encode(&uncompressed[1..33]),
        B64URL.encode(&uncompressed[33..65])
    )
}

fn rs_candidates(sig: &[u8], layout: RsLayout) -> Vec<[u8; 64]> {
    let place = |r: &[u8], s: &[u8]| {
        let mut out = [0u8; 64];
        out[32 - r.len()..32].copy_from_slice(r);
        out[64 - s.len()..].copy_from_slice(s);
        out
    };
    match (sig.len(), layout) {
        (64, _) => vec![place(&sig[..32], &sig[32..])],
        (n, RsLayout::Trimmed) if (2..64).contains(&n) => {
            let mut v = Vec::with_capacity(3);
            let half = n / 2;
            let mut splits = vec![half];
            splits.extend((n.saturating_sub(32).max(1)..=32.min(n - 1)).filter(|i| *i != half));
            for i in splits {
                if i <= 32 && n - i <= 32 {
                    v.push(place(&sig[..i], &sig[i..]));
                }
            }
            v
        }
        _ => Vec::new(),
    }
}

fn from_jwk(jwk: &Value, want_crv: Option<&str>) -> Result<PublicKey, DidAuthError> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    let kty = field("kty").ok_or_else(|| unsupported("JWK without `kty`"))?;
    let crv = field("crv").ok_or_else(|| unsupported("JWK without `crv`"))?;
    if let Some(w) = want_crv {
        if w != crv {
            return Err(unsupported(format!("JWK curve `{crv}`, expected `{w}`")));
        }
    }
    if jwk.get("d").is_some() {
        return Err(unsupported("JWK carries a private key"));
    }
    match (kty, crv) {
        ("EC", "secp256k1" | "P-256") => {
            let coord = |name: &str| -> Result<Vec<u8>, DidAuthError> {
                let b = B64URL
                    .decode(
                        field(name).ok_or_else(|| unsupported(format!("JWK without `{name}`")))?,
                    )
                    .map_err(|_| unsupported(format!("JWK `{name}` is not base64url")))?;
                if b.is_empty() || b.len() > 32 {
                    return Err(unsupported(format!(
                        "JWK `{name}` is not a 32-byte coordinate"
                    )));
                }
                Ok(b)
            };
            let (x, y) = (coord("x")?, coord("y")?);
            let mut sec1 = [0u8; 65];
            sec1[0] = 4;
            sec1[33 - x.len()..33].copy_from_slice(&x);
            sec1[65 - y.len()..].copy_from_slice(&y);
            if crv == "secp256k1" {
                k256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map(PublicKey::Secp256k1)
                    .map_err(|_| unsupported("secp256k1 JWK is not a curve point"))
            } else {
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&sec1)
                    .map(PublicKey::P256)
                    .map_err(|_| unsupported("P-256 JWK is not a curve point"))
            }
        }
        ("OKP", "Ed25519") => {
            let x = field("x").ok_or_else(|| unsupported("JWK without `x`"))?;
            // anp 1.x insists on the canonical unpadded encoding of 32 bytes.
            let b = B64URL
                .decode(x)
                .ok()
                .filter(|b| b.len() == 32 && B64URL.encode(b) == x);
            ed25519(&b.ok_or_else(|| unsupported("Ed25519 JWK `x` is not 32 canonical bytes"))?)
        }
        _ => Err(unsupported(format!("JWK kty `{kty}` crv `{crv}`"))),
    }
}

fn multibase_bytes(m: &str) -> Result<Vec<u8>, DidAuthError> {
    let b58 = m
        .strip_prefix('z')
        .ok_or_else(|| unsupported("multibase other than base58btc (`z…`)"))?;
    bs58::decode(b58)
        .into_vec()
        .map_err(|_| unsupported("bad base58btc"))
}

/// A `Multikey` value: multicodec-prefixed Ed25519 (0xed01), secp256k1
/// (0xe701) or P-256 (0x8024) public key; a bare 32 bytes is Ed25519
/// (agent-connect's `Ed25519VerificationKey2018` multibase).
fn multikey(b: &[u8], is_multikey: bool) -> Result<PublicKey, DidAuthError> {
    match b {
        [0xed, 0x01, rest @ ..] if rest.len() == 32 => ed25519(rest),
        [0xe7, 0x01, rest @ ..] if is_multikey => k256::ecdsa::VerifyingKey::from_sec1_bytes(rest)
            .map(PublicKey::Secp256k1)
            .map_err(|_| unsupported("bad secp256k1 Multikey")),
        [0x80, 0x24, rest @ ..] if is_multikey => p256::ecdsa::VerifyingKey::from_sec1_bytes(rest)
            .map(PublicKey::P256)
            .map_err(|_| unsupported("bad P-256 Multikey")),
        _ if b.len() == 32 => ed25519(b),
        _ => Err(unsupported("unrecognised multibase key")),
    }
}

fn ed25519(b: &[u8]) -> Result<PublicKey, DidAuthError> {
    let raw: [u8; 32] = b
        .try_into()
        .map_err(|_| unsupported("Ed25519 key is not 32 bytes"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw)
        .map(PublicKey::Ed25519)
        .map_err(|_| unsupported("Ed25519 key is not a curve point"))
}
