//! RFC 9421 HTTP Message Signatures as anp 1.0.7 writes them
//! (`anp.authentication.http_signatures.generate_http_signature_headers`):
//!
//! ```text
//! Signature-Input: sig1=("@method" "@target-uri" "@authority");created=…;expires=…;nonce="…";keyid="did:wba:…#key-1"
//! Signature: sig1=:<base64 of r‖s or Ed25519>:
//! ```
//! Parsing both dictionaries (§4.1, §4.2) and rebuilding the signature base
//! (§2.5): one `"<component>": <value>` line per covered component, then
//! `"@signature-params": ` followed by the inner list exactly as received.
//! Supported components: `@method`, `@target-uri`, `@authority`,
//! `@scheme`, `@path`, `@query`, `@request-target`, and header fields
//! (several values joined by `, `, §2.1). Component parameters (`;sf`,
//! `;key`, …) are refused.

use super::error::DidAuthError;
use super::keys::B64STD;
use base64::Engine as _;

/// One member of `Signature-Input`, borrowed from the header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInput<'a> {
    pub label: &'a str,
    pub components: Vec<&'a str>,
    /// The member's value as received: `("…" …);created=…;…`.
    pub params_raw: &'a str,
    pub created: Option<i64>,
    pub expires: Option<i64>,
    pub nonce: Option<&'a str>,
    pub keyid: Option<&'a str>,
}

/// The request facts a signature base is built from.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// Absolute URI the client is taken to have signed.
    pub target_uri: &'a str,
    /// `Host` as received.
    pub authority: &'a str,
    /// The request-target (origin-form: path and query).
    pub request_target: &'a str,
    pub headers: &'a [(&'a str, &'a [u8])],
}

fn bad(why: impl Into<String>) -> DidAuthError {
    DidAuthError::Malformed(format!("HTTP signature: {}", why.into()))
}

/// Splits a structured-field dictionary at top-level commas (outside
/// quotes, parentheses and `:` byte sequences).
fn split_members(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote, mut depth, mut bytes_seq) = (0, false, 0i32, false);
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if quote => i += 1,
            b'"' if !bytes_seq => quote = !quote,
            b'(' if !quote && !bytes_seq => depth += 1,
            b')' if !quote && !bytes_seq => depth -= 1,
            b':' if !quote => bytes_seq = !bytes_seq,
            b',' if !quote && depth == 0 && !bytes_seq => {
                out.push(v[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.push(v[start..].trim());
    out.retain(|m| !m.is_empty());
    out
}

fn is_key(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'.' | b'*')
        })
}

/// Parses `Signature-Input`.
pub fn parse_signature_input(value: &str) -> Result<Vec<SignatureInput<'_>>, DidAuthError> {
    let mut out = Vec::new();
    for m in split_members(value) {
        let (label, rest) = m.split_once('=').ok_or_else(|| bad("member without `=`"))?;
        if !is_key(label) {
            return Err(bad(format!("bad label `{label}`")));
        }
        let inner = rest
            .strip_prefix('(')
            .ok_or_else(|| bad("Signature-Input member is not an inner list"))?;
        let close = inner.find(')').ok_or_else(|| bad("unclosed inner list"))?;
        let mut components = Vec::new();
        for item in inner[..close].split([' ']).filter(|s| !s.is_empty()) {
            let name = item
                .strip_prefix('"')
                .and_then(|s| s.strip_suffix('"'))
                .ok_or_else(|| bad(format!("component `{item}` is not a plain string")))?;
            if name.is_empty() || name.contains('"') || components.contains(&name) {
                return Err(bad(format!("bad or repeated component `{name}`")));
            }
            components.push(name);
        }
        if components.is_empty() {
            return Err(bad("no covered components"));
        }
        let mut sig = SignatureInput {
            label,
            components,
            params_raw: rest,
            created: None,
            expires: None,
            nonce: None,
            keyid: None,
        };
        let mut params = &inner[close + 1..];
        while !params.is_empty() {
            params = params
                .strip_prefix(';')
                .ok_or_else(|| bad("expected `;` between parameters"))?;
            let name_len = params
                .bytes()
                .take_while(|c| {
                    c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || matches!(c, b'_' | b'-' | b'.' | b'*')
                })
                .count();
            let name = &params[..name_len];
            if name.is_empty() {
                return Err(bad("empty parameter name"));
            }
            params = &params[name_len..];
            let mut str_val = None;
            let mut int_val = None;
            if let Some(p) = params.strip_prefix('=') {
                if let Some(q) = p.strip_prefix('"') {
                    let end = q
                        .find('"')
                        .ok_or_else(|| bad("unterminated string parameter"))?;
                    if q[..end].contains('\\') {
                        return Err(bad("escapes in string parameters are not supported"));
                    }
                    str_val = Some(&q[..end]);
                    params = &q[end + 1..];
                } else {
                    let end = p.find(';').unwrap_or(p.len());
                    let tok = &p[..end];
                    int_val = tok.parse::<i64>().ok();
                    if tok.is_empty() {
                        return Err(bad(format!("parameter `{name}` has no value")));
                    }
                    params = &p[end..];
                }
            }
            let dup = || bad(format!("parameter `{name}` repeated"));
            match name {
                "created" => {
                    if sig.created.is_some() {
                        return Err(dup());
                    }
                    sig.created = Some(int_val.ok_or_else(|| bad("`created` is not an integer"))?);
                }
                "expires" => {
                    if sig.expires.is_some() {
                        return Err(dup());
                    }
                    sig.expires = Some(int_val.ok_or_else(|| bad("`expires` is not an integer"))?);
                }
                "nonce" => {
                    if sig.nonce.is_some() {
                        return Err(dup());
                    }
                    sig.nonce = Some(str_val.ok_or_else(|| bad("`nonce` is not a string"))?);
                }
                "keyid" => {
                    if sig.keyid.is_some() {
                        return Err(dup());
                    }
                    sig.keyid = Some(str_val.ok_or_else(|| bad("`keyid` is not a string"))?);
                }
                _ => {}
            }
        }
        out.push(sig);
    }
    Ok(out)
}

/// Parses `Signature`: label → signature bytes.
pub fn parse_signature(value: &str) -> Result<Vec<(&str, Vec<u8>)>, DidAuthError> {
    let mut out = Vec::new();
    for m in split_members(value) {
        let (label, rest) = m.split_once('=').ok_or_else(|| bad("member without `=`"))?;
        let b64 = rest
            .strip_prefix(':')
            .and_then(|r| r.strip_suffix(':'))
            .ok_or_else(|| bad("Signature member is not a byte sequence"))?;
        let bytes = B64STD
            .decode(b64)
            .map_err(|_| bad("Signature is not base64"))?;
        out.push((label, bytes));
    }
    Ok(out)
}

/// The first `Signature-Input` member that has a `Signature` with the
/// same label, and those signature bytes.
pub fn select<'a>(
    input: &'a str,
    signature: &'a str,
) -> Result<(SignatureInput<'a>, Vec<u8>), DidAuthError> {
    let inputs = parse_signature_input(input)?;
    let mut sigs = parse_signature(signature)?;
    for i in inputs {
        if let Some(pos) = sigs.iter().position(|(l, _)| *l == i.label) {
            let (_, bytes) = sigs.swap_remove(pos);
            return Ok((i, bytes));
        }
    }
    Err(bad("no Signature matches a Signature-Input label"))
}

/// The signature base (§2.5) for `sig` over `req`.
pub fn signature_base(
    sig: &SignatureInput<'_>,
    req: &RequestParts<'_>,
) -> Result<Vec<u8>, DidAuthError> {
    let mut out = Vec::with_capacity(256);
    for c in &sig.components {
        out.push(b'"');
        out.extend_from_slice(c.as_bytes());
        out.extend_from_slice(b"\": ");
        match *c {
            "@method" => out.extend_from_slice(req.method.as_bytes()),
            "@target-uri" => out.extend_from_slice(req.target_uri.as_bytes()),
            "@authority" => out.extend_from_slice(req.authority.as_bytes()),
            "@scheme" => {
                let scheme = req.target_uri.split_once("://").map(|x| x.0).unwrap_or("");
                out.extend_from_slice(scheme.to_ascii_lowercase().as_bytes());
            }
            "@request-target" => out.extend_from_slice(req.request_target.as_bytes()),
            "@path" => {
                let path = req.request_target.split('?').next().unwrap_or("");
                out.extend_from_slice(path.as_bytes());
            }
            "@query" => {
                let q = req
                    .request_target
                    .split_once('?')
                    .map(|x| x.1)
                    .unwrap_or("");
                out.push(b'?');
                out.extend_from_slice(q.as_bytes());
            }
            name if name.starts_with('@') => {
                return Err(bad(format!("unsupported derived component `{name}`")));
            }
            name => {
                let mut found = false;
                for (n, v) in req.headers {
                    if n.eq_ignore_ascii_case(name) {
                        if found {
                            out.extend_from_slice(b", ");
                        }
                        out.extend_from_slice(v.trim_ascii());
                        found = true;
                    }
                }
                if !found {
                    return Err(bad(format!("covered header `{name}` is missing")));
                }
            }
        }
        out.push(b'\n');
    }
    out.extend_from_slice(b"\"@signature-params\": ");
    out.extend_from_slice(sig.params_raw.as_bytes());
    Ok(out)
}

/// `Content-Digest` of an empty body (RFC 9530), as anp writes it.
pub const EMPTY_CONTENT_DIGEST_SHA256: &str =
    "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:";

/// Whether a `Content-Digest` value has a `sha-256` member for an empty body.
pub fn content_digest_is_empty_body(v: &str) -> bool {
    split_members(v)
        .into_iter()
        .any(|m| m == EMPTY_CONTENT_DIGEST_SHA256)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = r#"sig1=("@method" "@target-uri" "@authority");created=1700000000;expires=1700000300;nonce="n1";keyid="did:wba:a.example#key-1""#;

    #[test]
    fn parses_anp_input_and_builds_base() {
        let (s, bytes) = select(INPUT, "sig1=:AAEC:").unwrap();
        assert_eq!(bytes, [0, 1, 2]);
        assert_eq!(s.created, Some(1_700_000_000));
        assert_eq!(s.expires, Some(1_700_000_300));
        assert_eq!(s.nonce, Some("n1"));
        assert_eq!(s.keyid, Some("did:wba:a.example#key-1"));
        let base = signature_base(
            &s,
            &RequestParts {
                method: "GET",
                target_uri: "ws://gw.example:8089/ws",
                authority: "gw.example:8089",
                request_target: "/ws",
                headers: &[],
            },
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(base).unwrap(),
            "\"@method\": GET\n\"@target-uri\": ws://gw.example:8089/ws\n\"@authority\": gw.example:8089\n\"@signature-params\": (\"@method\" \"@target-uri\" \"@authority\");created=1700000000;expires=1700000300;nonce=\"n1\";keyid=\"did:wba:a.example#key-1\""
        );
    }

    #[test]
    fn picks_matching_label_among_several() {
        let input = format!("other=(\"@method\");created=1, {}", INPUT);
        let (s, _) = select(&input, "sig1=:AAEC:, zzz=:AA==:").unwrap();
        assert_eq!(s.label, "sig1");
    }

    #[test]
    fn refuses_malformed() {
        for (i, s) in [
            (INPUT, "sig2=:AAEC:"),
            ("sig1=\"@method\";created=1", "sig1=:AA==:"),
            ("sig1=();created=1", "sig1=:AA==:"),
            ("sig1=(\"@method\" \"@method\");created=1", "sig1=:AA==:"),
            ("sig1=(\"@method\");created=x", "sig1=:AA==:"),
            ("sig1=(\"@method\");created=1;created=2", "sig1=:AA==:"),
            ("sig1=(\"@method\");created=1", "sig1=AA=="),
            ("sig1=(\"@method\");created=1", "sig1=:!!:"),
        ] {
            assert!(
                matches!(select(i, s), Err(DidAuthError::Malformed(_))),
                "{i} / {s}"
            );
        }
    }

    #[test]
    fn header_components_join_values() {
        let (s, _) = select("sig1=(\"x-a\" \"@query\");created=1", "sig1=:AA==:").unwrap();
        let headers: [(&str, &[u8]); 2] = [("X-A", b" one "), ("x-a", b"two")];
        let base = signature_base(
            &s,
            &RequestParts {
                method: "GET",
                target_uri: "http://h/p?q=1",
                authority: "h",
                request_target: "/p?q=1",
                headers: &headers,
            },
        )
        .unwrap();
        assert!(base.starts_with(b"\"x-a\": one, two\n\"@query\": ?q=1\n"));
    }
}
