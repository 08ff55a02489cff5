//! `anp-proxy did new DID --out DIR`: a fresh key and its DID document, in
//! the files and shapes the Python SDKs load (`DIDWbaAuthHeader(did.json,
//! key-1_private.pem)`):
//!
//! - secp256k1 (default): agent-connect 0.3.7's document —
//!   `EcdsaSecp256k1VerificationKey2019` with a JWK (`kty`, `crv`, `x`, `y`,
//!   `kid` = base64url SHA-256 of the compressed point; coordinates as fixed
//!   32 bytes, as anp writes them), listed under `authentication`;
//! - Ed25519 (`--ed25519`): anp 1.0.7's e1 shape — a `Multikey` with
//!   `publicKeyMultibase` (`z` + base58btc of 0xed01 ‖ key) under
//!   `authentication` and `assertionMethod`, and a `DataIntegrityProof`
//!   (`eddsa-jcs-2022`, base64url `proofValue`) so anp's binding check
//!   passes when the DID is key-bound;
//! - `--key-bound` appends the `e1_<thumbprint>` / `k1_<thumbprint>`
//!   segment anp uses, so the DID commits to its key.
//!
//! Writes `DIR/did.json` and `DIR/key-1_private.pem` (mode 0600); never
//! overwrites.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::did;
use super::keys::B64URL;
use super::sign::SigningKey;
use super::time;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Secp256k1,
    Ed25519,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Did(String),
    #[error("{0} exists; not overwriting")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `did new` wrote.
#[derive(Debug)]
pub struct Created {
    pub did: String,
    pub document: PathBuf,
    pub private_key: PathBuf,
}

/// A new random key of `kind`.
pub fn generate(kind: KeyKind) -> SigningKey {
    match kind {
        KeyKind::Secp256k1 => loop {
            let b: [u8; 32] = rand::random();
            if let Ok(k) = k256::ecdsa::SigningKey::from_slice(&b) {
                break SigningKey::Secp256k1(k);
            }
        },
        KeyKind::Ed25519 => {
            SigningKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&rand::random()))
        }
    }
}

/// The DID document for `did` and `key` (see the module docs), and the
/// DID itself (with the key-bound segment when asked).
pub fn document_for(
    did: &str,
    key: &SigningKey,
    key_bound: bool,
) -> Result<(String, Value), CreateError> {
    let parsed = did::parse(did).map_err(|e| CreateError::Did(e.to_string()))?;
    if parsed.binding().is_some() {
        return Err(CreateError::Did(
            "the DID already ends in a key-bound segment; give the DID without it and use --key-bound".into(),
        ));
    }
    let public = key.public();
    let did = match (key_bound, key) {
        (false, _) => did.to_owned(),
        (true, SigningKey::Ed25519(_)) => format!("{did}:e1_{}", public.jwk_thumbprint()),
        (true, SigningKey::Secp256k1(_)) => format!("{did}:k1_{}", public.jwk_thumbprint()),
        (true, SigningKey::P256(_)) => {
            return Err(CreateError::Did("P-256 keys cannot be key-bound".into()))
        }
    };
    if key_bound && parsed.path.is_empty() {
        return Err(CreateError::Did(
            "a key-bound DID needs at least one path segment before the binding".into(),
        ));
    }
    let vm_id = format!("{did}#key-1");
    let doc = match key {
        SigningKey::Ed25519(k) => {
            let mut mb = vec![0xed, 0x01];
            mb.extend_from_slice(k.verifying_key().as_bytes());
            let mut doc = json!({
                "@context": [
                    "https://www.w3.org/ns/did/v1",
                    "https://w3id.org/security/data-integrity/v2",
                    "https://w3id.org/security/multikey/v1"
                ],
                "id": did,
                "verificationMethod": [{
                    "id": vm_id,
                    "type": "Multikey",
                    "controller": did,
                    "publicKeyMultibase": format!("z{}", bs58::encode(mb).into_string()),
                }],
                "authentication": [vm_id],
                "assertionMethod": [vm_id],
            });
            let proof = data_integrity_proof(&doc, key, &vm_id);
            doc["proof"] = proof;
            doc
        }
        SigningKey::Secp256k1(k) => {
            let p = k_point(k);
            json!({
                "@context": [
                    "https://www.w3.org/ns/did/v1",
                    "https://w3id.org/security/suites/jws-2020/v1",
                    "https://w3id.org/security/suites/secp256k1-2019/v1"
                ],
                "id": did,
                "verificationMethod": [{
                    "id": vm_id,
                    "type": "EcdsaSecp256k1VerificationKey2019",
                    "controller": did,
                    "publicKeyJwk": p,
                }],
                "authentication": [vm_id],
            })
        }
        SigningKey::P256(_) => {
            return Err(CreateError::Did(
                "only secp256k1 and Ed25519 keys are created".into(),
            ))
        }
    };
    Ok((did, doc))
}

fn k_point(k: &k256::ecdsa::SigningKey) -> Value {
    let vk = k.verifying_key();
    let full = vk.to_encoded_point(false);
    let compressed = vk.to_encoded_point(true);
    json!({
        "kty": "EC",
        "crv": "secp256k1",
        "x": B64URL.encode(&full.as_bytes()[1..33]),
        "y": B64URL.encode(&full.as_bytes()[33..65]),
        "kid": B64URL.encode(Sha256::digest(compressed.as_bytes())),
    })
}

/// anp's `generate_w3c_proof(..., DataIntegrityProof, eddsa-jcs-2022)`:
/// Ed25519 over SHA-256(JCS(options)) ‖ SHA-256(JCS(document)).
fn data_integrity_proof(doc: &Value, key: &SigningKey, vm_id: &str) -> Value {
    let mut options = Map::new();
    options.insert("type".into(), "DataIntegrityProof".into());
    options.insert("created".into(), time::format_utc(time::now_unix()).into());
    options.insert("verificationMethod".into(), vm_id.into());
    options.insert("proofPurpose".into(), "assertionMethod".into());
    options.insert("cryptosuite".into(), "eddsa-jcs-2022".into());
    let jcs = |v: &Value| serde_jcs::to_vec(v).unwrap_or_default();
    let mut to_sign = Sha256::digest(jcs(&Value::Object(options.clone()))).to_vec();
    to_sign.extend_from_slice(&Sha256::digest(jcs(doc)));
    options.insert(
        "proofValue".into(),
        B64URL.encode(key.sign(&to_sign)).into(),
    );
    Value::Object(options)
}

/// Creates the key and document for `did` and writes them under `out`.
pub fn create(
    did: &str,
    out: &Path,
    kind: KeyKind,
    key_bound: bool,
) -> Result<Created, CreateError> {
    let key = generate(kind);
    let (did, doc) = document_for(did, &key, key_bound)?;
    let document = out.join("did.json");
    let private_key = out.join("key-1_private.pem");
    for p in [&document, &private_key] {
        if p.exists() {
            return Err(CreateError::Exists(p.clone()));
        }
    }
    let werr = |path: &Path| {
        let path = path.to_owned();
        move |source| CreateError::Write { path, source }
    };
    std::fs::create_dir_all(out).map_err(werr(out))?;
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    write_new(&private_key, key.to_pkcs8_pem().as_bytes(), 0o600).map_err(werr(&private_key))?;
    write_new(&document, text.as_bytes(), 0o644).map_err(werr(&document))?;
    Ok(Created {
        did,
        document,
        private_key,
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        o.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
