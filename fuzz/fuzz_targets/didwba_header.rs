//! The `Authorization: DIDWba …` header parser (`auth::didwba::header`).
//!
//! Invariants beyond "no panic": every parsed field is a non-empty slice of
//! the input; the nonce limit and the no-`#` rule hold; a parsed header
//! written back in the SDKs' quoted form parses to the same fields; the
//! signed content (JCS) is built without panicking and names the field
//! `domain_field` says.
#![no_main]

use anp_proxy::auth::didwba::header::{parse, DidWbaHeader, MAX_NONCE_LEN};
use anp_proxy_fuzz::within;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(h) = parse(value) else {
        return;
    };
    let fields = [
        h.did,
        h.nonce,
        h.timestamp,
        h.verification_method,
        h.signature,
    ];
    for f in fields.iter().chain(h.version.iter()) {
        assert!(!f.is_empty(), "empty field accepted");
        assert!(
            within(value.as_bytes(), f.as_bytes()),
            "field is not a slice of the input"
        );
    }
    assert!(h.nonce.len() <= MAX_NONCE_LEN);
    assert!(!h.verification_method.contains('#'));

    let content = h.signed_content("gw.example");
    let field = format!("\"{}\":\"gw.example\"", h.domain_field());
    assert!(
        content.windows(field.len()).any(|w| w == field.as_bytes()),
        "signed content lacks {field}"
    );

    // Quoted values cannot hold `"`; only such headers can be re-written.
    if fields
        .iter()
        .chain(h.version.iter())
        .all(|f| !f.contains('"'))
    {
        let again = rewrite(&h);
        assert_eq!(
            parse(&again).as_ref(),
            Ok(&h),
            "re-written header parsed differently: {again}"
        );
    }
});

fn rewrite(h: &DidWbaHeader<'_>) -> String {
    let mut s = String::from("DIDWba ");
    if let Some(v) = h.version {
        s += &format!("v=\"{v}\", ");
    }
    s += &format!(
        "did=\"{}\", nonce=\"{}\", timestamp=\"{}\", verification_method=\"{}\", signature=\"{}\"",
        h.did, h.nonce, h.timestamp, h.verification_method, h.signature
    );
    s
}
