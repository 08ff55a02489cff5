//! The gateway's request head parser (`http::parse_request_head`, RFC 9112
//! §2–3, §6), with the default limits and with small ones.
//!
//! Invariants beyond "no panic": every range lies within the head and the
//! head within the buffer; limits hold; the parser is prefix-stable — any
//! shorter read of a head that parses is "need more" (`Ok(None)`), never an
//! error, and bytes after the head (a pipelined request, a body) change
//! nothing.
#![no_main]

use anp_proxy::http::{parse_request_head, BodyKind, Limits, RequestHead, TargetForm};
use anp_proxy_fuzz::range_within;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let small = Limits {
        max_request_line: 64,
        max_head: 256,
        max_headers: 4,
    };
    // Above the parser's 128 stack slots: the heap path.
    let many = Limits {
        max_headers: 200,
        ..Limits::default()
    };
    for limits in [Limits::default(), small, many] {
        check(data, &limits);
    }
});

fn check(buf: &[u8], limits: &Limits) {
    let Ok(Some(h)) = parse_request_head(buf, limits) else {
        return;
    };
    let n = h.head_len;
    assert!(
        n <= buf.len() && n <= limits.max_head,
        "head_len {n} out of bounds"
    );
    assert!(
        buf[..n].ends_with(b"\r\n\r\n"),
        "head does not end with an empty line"
    );
    assert!(h.headers.len() <= limits.max_headers);
    assert!(!h.method.is_empty() && range_within(&h.method, n));
    assert!(!h.target.is_empty() && range_within(&h.target, n));
    assert!(h.version_minor <= 1);
    for hp in &h.headers {
        assert!(!hp.name.is_empty() && range_within(&hp.name, n));
        assert!(range_within(&hp.value, n));
    }
    if let Some(host) = &h.host {
        assert!(range_within(host, n));
    }
    if let TargetForm::Absolute { authority, path } = &h.form {
        assert!(range_within(authority, n) && range_within(path, n));
        assert!(h.target.start <= authority.start && path.end <= h.target.end);
    }
    match h.body {
        BodyKind::Chunked => assert!(h.header(buf, "transfer-encoding").is_some()),
        BodyKind::ContentLength(_) => assert!(h.header(buf, "content-length").is_some()),
        BodyKind::None => {}
    }
    // Accessors never panic on their own buffer.
    let _ = (
        h.method(buf),
        h.target(buf),
        h.host(buf),
        h.path_and_query(buf),
    );

    let same = |b: &[u8]| -> RequestHead {
        parse_request_head(b, limits)
            .unwrap_or_else(|e| panic!("head alone failed: {e:?}"))
            .expect("head alone is incomplete")
    };
    assert_eq!(same(&buf[..n]), h, "bytes after the head changed the parse");
    for k in [0, n / 2, n.saturating_sub(2), n - 1] {
        match parse_request_head(&buf[..k], limits) {
            Ok(None) => {}
            other => panic!("prefix of {k} of a {n}-byte head gave {other:?}"),
        }
    }
}
