//! The `Authorization: DIDWba …` header (agent-connect 0.3.7's
//! `generate_auth_header`, anp 1.0.7's `legacy_didwba` mode): parsing, and
//! the exact bytes its signature covers.
//!
//! ```text
//! DIDWba [v="1.1", ]did="did:wba:…", nonce="…", timestamp="2025-01-01T00:00:00Z",
//!        verification_method="key-1", signature="<base64url r‖s or Ed25519>"
//! ```
//! Signed content: JCS (RFC 8785) of `{"did","nonce","service"|"aud","timestamp"}`,
//! hashed with SHA-256 (`keys::verify_didwba` says how each key signs it).
//! `aud` replaces `service` when `v` ≥ 1.1 (anp 1.x); agent-connect 0.3.7
//! sends no `v` and signs `service`, so no `v` means 1.0 here (anp's own
//! parser defaults a missing `v` to 1.1, which refuses agent-connect's
//! headers; DESIGN.md keeps agent-connect working).

use serde_json::{Map, Value};

use super::error::DidAuthError;

/// The parameters of one `DIDWba` header, borrowed from its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DidWbaHeader<'a> {
    pub version: Option<&'a str>,
    pub did: &'a str,
    pub nonce: &'a str,
    pub timestamp: &'a str,
    pub verification_method: &'a str,
    pub signature: &'a str,
}

/// Longest nonce accepted (the SDKs send 32 hex digits).
pub const MAX_NONCE_LEN: usize = 128;

/// Parses a whole header value, scheme included (`DIDWba …`, scheme
/// compared case-insensitively). Parameters may come in any order, names
/// in any case; unknown ones are ignored; a repeated one is refused.
pub fn parse(value: &str) -> Result<DidWbaHeader<'_>, DidAuthError> {
    let bad = |why: &str| DidAuthError::Malformed(format!("DIDWba header: {why}"));
    let value = value.trim();
    let rest = match value.get(..6) {
        Some(s) if s.eq_ignore_ascii_case("didwba") => &value[6..],
        _ => return Err(bad("scheme is not DIDWba")),
    };
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(bad("scheme is not DIDWba"));
    }
    let mut fields: [Option<&str>; 6] = [None; 6];
    const NAMES: [&str; 6] = [
        "v",
        "did",
        "nonce",
        "timestamp",
        "verification_method",
        "signature",
    ];
    let mut s = rest;
    loop {
        s = s.trim_start_matches([' ', '\t', ',']);
        if s.is_empty() {
            break;
        }
        let name_len = s
            .bytes()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
            .count();
        if name_len == 0 {
            return Err(bad("expected a parameter name"));
        }
        let name = &s[..name_len];
        s = s[name_len..].trim_start_matches([' ', '\t']);
        s = s.strip_prefix('=').ok_or_else(|| bad("expected `=`"))?;
        s = s.trim_start_matches([' ', '\t']);
        let val;
        if let Some(q) = s.strip_prefix('"') {
            let end = q
                .find('"')
                .ok_or_else(|| bad("unterminated quoted value"))?;
            val = &q[..end];
            s = &q[end + 1..];
        } else {
            let end = s.find([',', ' ', '\t']).unwrap_or(s.len());
            val = &s[..end];
            s = &s[end..];
        }
        if let Some(i) = NAMES.iter().position(|n| n.eq_ignore_ascii_case(name)) {
            if fields[i].is_some() {
                return Err(bad(&format!("`{}` appears twice", NAMES[i])));
            }
            if val.is_empty() {
                return Err(bad(&format!("`{}` is empty", NAMES[i])));
            }
            fields[i] = Some(val);
        }
    }
    let need = |i: usize| fields[i].ok_or_else(|| bad(&format!("missing `{}`", NAMES[i])));
    let h = DidWbaHeader {
        version: fields[0],
        did: need(1)?,
        nonce: need(2)?,
        timestamp: need(3)?,
        verification_method: need(4)?,
        signature: need(5)?,
    };
    if h.nonce.len() > MAX_NONCE_LEN {
        return Err(bad("nonce longer than 128 bytes"));
    }
    if h.verification_method.contains('#') {
        return Err(bad("verification_method must be a fragment without `#`"));
    }
    Ok(h)
}

impl DidWbaHeader<'_> {
    /// The signed JSON's name for the service domain: `aud` from v1.1 on,
    /// `service` before (and when `v` is absent or not a number, as in
    /// anp's `float(version)` fallback).
    pub fn domain_field(&self) -> &'static str {
        match self.version.and_then(|v| v.trim().parse::<f64>().ok()) {
            Some(v) if v >= 1.1 => "aud",
            _ => "service",
        }
    }

    /// The bytes the signature covers (before hashing), for `service`.
    pub fn signed_content(&self, service: &str) -> Vec<u8> {
        signed_content(
            self.did,
            self.nonce,
            self.timestamp,
            self.domain_field(),
            service,
        )
    }
}

/// JCS of `{"did", "nonce", <domain_field>, "timestamp"}`.
pub fn signed_content(
    did: &str,
    nonce: &str,
    timestamp: &str,
    domain_field: &str,
    service: &str,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("nonce".into(), Value::from(nonce));
    m.insert("timestamp".into(), Value::from(timestamp));
    m.insert(domain_field.into(), Value::from(service));
    m.insert("did".into(), Value::from(did));
    // Serialising a map of strings cannot fail.
    serde_jcs::to_vec(&Value::Object(m)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const AC: &str = r#"DIDWba did="did:wba:example.com:user:alice", nonce="abc", timestamp="2025-01-01T00:00:00Z", verification_method="key-1", signature="c2ln""#;

    #[test]
    fn parses_agent_connect_shape() {
        let h = parse(AC).unwrap();
        assert_eq!(h.did, "did:wba:example.com:user:alice");
        assert_eq!(h.nonce, "abc");
        assert_eq!(h.verification_method, "key-1");
        assert_eq!(h.version, None);
        assert_eq!(h.domain_field(), "service");
        assert_eq!(
            String::from_utf8(h.signed_content("example.com")).unwrap(),
            r#"{"did":"did:wba:example.com:user:alice","nonce":"abc","service":"example.com","timestamp":"2025-01-01T00:00:00Z"}"#
        );
    }

    #[test]
    fn version_picks_aud() {
        let v = AC.replacen("DIDWba ", "DIDWba v=\"1.1\", ", 1);
        let h = parse(&v).unwrap();
        assert_eq!(h.domain_field(), "aud");
        let v = AC.replacen("DIDWba ", "didwba V=\"1.0\",", 1);
        assert_eq!(parse(&v).unwrap().domain_field(), "service");
        let v = AC.replacen("DIDWba ", "DIDWba v=\"x\", ", 1);
        assert_eq!(parse(&v).unwrap().domain_field(), "service");
    }

    #[test]
    fn refuses_malformed() {
        for h in [
            "Bearer abc",
            "DIDWbax did=\"a\"",
            &AC.replace("nonce=\"abc\", ", ""),
            &AC.replace("nonce=\"abc\"", "nonce=\"\""),
            &format!("{AC}, did=\"x\""),
            &AC.replace("signature=\"c2ln\"", "signature=\"c2ln"),
            &AC.replace("\"key-1\"", "\"did:x#key-1\""),
        ] {
            assert!(matches!(parse(h), Err(DidAuthError::Malformed(_))), "{h}");
        }
    }
}
