//! RFC 9421 `Signature-Input` and `Signature` parsing (`auth::didwba::sigs`)
//! and the signature base built from a parsed member.
//!
//! Input: `Signature-Input` value, optionally a LF and a `Signature` value.
//! Invariants beyond "no panic": labels are sf-keys and unique components
//! are non-empty slices of the input; `params_raw` is the member's value
//! starting at its inner list; `select` finds only labels both headers
//! have; a signature base ends with `"@signature-params": ` + `params_raw`
//! and has one line per covered component.
#![no_main]

use anp_proxy::auth::didwba::sigs::{
    content_digest_is_empty_body, parse_signature, parse_signature_input, select, signature_base,
    RequestParts,
};
use anp_proxy_fuzz::within;
use libfuzzer_sys::fuzz_target;

const HEADERS: &[(&str, &[u8])] = &[
    (
        "content-digest",
        b"sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:",
    ),
    ("host", b"gw.example:8089"),
    ("x-dup", b" a "),
    ("X-Dup", b"b"),
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (input, signature) = text.split_once('\n').unwrap_or((text, ""));
    let _ = content_digest_is_empty_body(input);

    if let Ok(sigs) = parse_signature_input(input) {
        let req = RequestParts {
            method: "GET",
            target_uri: "http://gw.example:8089/ws?x=1",
            authority: "gw.example:8089",
            request_target: "/ws?x=1",
            headers: HEADERS,
        };
        for s in &sigs {
            assert!(!s.label.is_empty() && within(input.as_bytes(), s.label.as_bytes()));
            assert!(s.label.bytes().all(|c| c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, b'_' | b'-' | b'.' | b'*')));
            assert!(
                s.params_raw.starts_with('(') && within(input.as_bytes(), s.params_raw.as_bytes())
            );
            assert!(!s.components.is_empty());
            for (i, c) in s.components.iter().enumerate() {
                assert!(!c.is_empty() && !c.contains('"'));
                assert!(within(s.params_raw.as_bytes(), c.as_bytes()));
                assert!(!s.components[..i].contains(c), "repeated component {c}");
            }
            for v in s.nonce.iter().chain(s.keyid.iter()) {
                assert!(within(s.params_raw.as_bytes(), v.as_bytes()));
            }
            if let Ok(base) = signature_base(s, &req) {
                let tail = format!("\"@signature-params\": {}", s.params_raw);
                assert!(
                    base.ends_with(tail.as_bytes()),
                    "base does not end with the params"
                );
                let lines = base.iter().filter(|&&b| b == b'\n').count();
                assert_eq!(lines, s.components.len(), "one line per component");
            }
        }
    }
    if let Ok(parsed) = parse_signature(signature) {
        for (label, _) in &parsed {
            assert!(within(signature.as_bytes(), label.as_bytes()));
        }
    }
    if let Ok((chosen, _bytes)) = select(input, signature) {
        let labels: Vec<&str> = parse_signature(signature)
            .expect("select parsed it")
            .into_iter()
            .map(|(l, _)| l)
            .collect();
        assert!(
            labels.contains(&chosen.label),
            "selected a label Signature lacks"
        );
    }
});
