//! Key-bound DIDs (anp 1.x): the last segment `e1_<t>` / `k1_<t>` commits
//! to a key by its RFC 7638 thumbprint `t`. Checked the way anp 1.0.7's
//! `validate_did_document_binding` does:
//!
//! - `e1_`: the document must carry a `DataIntegrityProof` with cryptosuite
//!   `eddsa-jcs-2022`, made by an Ed25519 method listed under
//!   `assertionMethod`, with `proofPurpose` `assertionMethod`; the proof
//!   must verify (W3C Data Integrity as anp computes it:
//!   Ed25519 over `SHA-256(JCS(proof options)) ‖ SHA-256(JCS(document
//!   without proof))`; a `z…` base58 `proofValue` adds the document's
//!   `@context` to the options, a base64url one does not), and that key's
//!   thumbprint must equal `t`.
//! - `k1_`: some method listed under `authentication` must be a secp256k1
//!   key whose thumbprint equals `t`. (anp also waves through a k1 document
//!   carrying a legacy `EcdsaSecp256k1Signature2019` authentication proof
//!   without checking either proof or thumbprint; that shortcut is not
//!   copied here.)

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::did::{Binding, DidWba};
use super::document;
use super::error::DidAuthError;
use super::keys::{PublicKey, RsLayout, B64URL};
use base64::Engine as _;

pub fn check(did: &DidWba<'_>, doc: &Value) -> Result<(), DidAuthError> {
    match did.binding() {
        None => Ok(()),
        Some(Binding::E1(t)) => check_e1(doc, t),
        Some(Binding::K1(t)) => check_k1(doc, t),
    }
}

fn bind_err(why: impl Into<String>) -> DidAuthError {
    DidAuthError::KeyBinding(why.into())
}

fn check_e1(doc: &Value, thumb: &str) -> Result<(), DidAuthError> {
    let proof = doc
        .get("proof")
        .and_then(Value::as_object)
        .ok_or_else(|| bind_err("e1 document without a proof"))?;
    let s = |k: &str| proof.get(k).and_then(Value::as_str).unwrap_or("");
    if s("type") != "DataIntegrityProof" || s("cryptosuite") != "eddsa-jcs-2022" {
        return Err(bind_err(
            "e1 proof is not DataIntegrityProof/eddsa-jcs-2022",
        ));
    }
    let vm_id = s("verificationMethod");
    if vm_id.is_empty() || !document::is_authorized(doc, "assertionMethod", vm_id) {
        return Err(bind_err("e1 proof key is not an assertionMethod"));
    }
    let vm = document::find_method(doc, vm_id).ok_or_else(|| bind_err("e1 proof key not found"))?;
    let ty = vm.get("type").and_then(Value::as_str).unwrap_or("");
    if !matches!(
        ty,
        "Multikey" | "Ed25519VerificationKey2020" | "Ed25519VerificationKey2018"
    ) {
        return Err(bind_err("e1 proof key is not an Ed25519 method"));
    }
    let key = PublicKey::from_method(vm).map_err(|e| bind_err(e.to_string()))?;
    if !matches!(key, PublicKey::Ed25519(_)) {
        return Err(bind_err("e1 proof key is not Ed25519"));
    }
    verify_data_integrity(doc, proof, &key)?;
    if key.jwk_thumbprint() != thumb {
        return Err(bind_err("e1 thumbprint does not match the proof key"));
    }
    Ok(())
}

fn check_k1(doc: &Value, thumb: &str) -> Result<(), DidAuthError> {
    for id in document::authorized_ids(doc, "authentication") {
        let Some(vm) = document::find_method(doc, &id) else {
            continue;
        };
        if let Ok(k @ PublicKey::Secp256k1(_)) = PublicKey::from_method(vm) {
            if k.jwk_thumbprint() == thumb {
                return Ok(());
            }
        }
    }
    Err(bind_err("no authentication key matches the k1 thumbprint"))
}

/// anp 1.0.7 `verify_w3c_proof(doc, key, expected_purpose="assertionMethod")`
/// for the Ed25519 suite.
fn verify_data_integrity(
    doc: &Value,
    proof: &Map<String, Value>,
    key: &PublicKey,
) -> Result<(), DidAuthError> {
    let s = |k: &str| proof.get(k).and_then(Value::as_str).unwrap_or("");
    for k in [
        "type",
        "proofValue",
        "proofPurpose",
        "verificationMethod",
        "created",
    ] {
        if s(k).is_empty() {
            return Err(bind_err(format!("proof without `{k}`")));
        }
    }
    if s("proofPurpose") != "assertionMethod" {
        return Err(bind_err("proof purpose is not assertionMethod"));
    }
    let value = s("proofValue");
    let mut options: Map<String, Value> = proof
        .iter()
        .filter(|(k, _)| *k != "proofValue")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let doc_obj = doc
        .as_object()
        .ok_or_else(|| bind_err("document is not an object"))?;
    let unsigned: Map<String, Value> = doc_obj
        .iter()
        .filter(|(k, _)| *k != "proof")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let multibase = value
        .strip_prefix('z')
        .and_then(|b| bs58::decode(b).into_vec().ok())
        .filter(|d| d.len() == 64 && bs58::encode(d).into_string() == value[1..]);
    let sig = match multibase {
        Some(sig) => {
            if let Some(ctx) = unsigned.get("@context") {
                options.insert("@context".into(), ctx.clone());
            }
            sig
        }
        None => B64URL
            .decode(value)
            .map_err(|_| bind_err("proofValue is neither base58btc nor base64url"))?,
    };
    let jcs = |m: Map<String, Value>| serde_jcs::to_vec(&Value::Object(m)).unwrap_or_default();
    let mut to_sign = Vec::with_capacity(64);
    to_sign.extend_from_slice(&Sha256::digest(jcs(options)));
    to_sign.extend_from_slice(&Sha256::digest(jcs(unsigned)));
    key.verify(&to_sign, &sig, RsLayout::Fixed)
        .map_err(|_| bind_err("document proof does not verify"))
}
