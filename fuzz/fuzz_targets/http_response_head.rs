//! The receiver's response head parser (`http::parse_response_head`, RFC
//! 9112 §4, §6.3; lenient where framing cannot change), for GET and HEAD.
//!
//! Invariants beyond "no panic": ranges within the head, the head within
//! the buffer and `max_head`; status in 100..=599; HEAD, 1xx, 204 and 304
//! have no body; prefix-stable as for requests (a shorter read of a head
//! that parses is `Ok(None)`; bytes after the head change nothing).
#![no_main]

use anp_proxy::http::{parse_response_head, Limits, ResponseBody, ResponseHead};
use anp_proxy_fuzz::range_within;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let small = Limits {
        max_request_line: 64,
        max_head: 256,
        max_headers: 4,
    };
    let many = Limits {
        max_headers: 200,
        ..Limits::default()
    };
    for limits in [Limits::default(), small, many] {
        for was_head in [false, true] {
            check(data, &limits, was_head);
        }
    }
});

fn check(buf: &[u8], limits: &Limits, was_head: bool) {
    let Ok(Some(h)) = parse_response_head(buf, limits, was_head) else {
        return;
    };
    let n = h.head_len;
    assert!(
        n <= buf.len() && n <= limits.max_head,
        "head_len {n} out of bounds"
    );
    assert!(
        buf[..n].ends_with(b"\n"),
        "head does not end with a line ending"
    );
    assert!(h.headers.len() <= limits.max_headers);
    assert!((100..=599).contains(&h.status));
    assert!(h.version_minor <= 1);
    assert!(range_within(&h.reason, n));
    for hp in &h.headers {
        assert!(!hp.name.is_empty() && range_within(&hp.name, n));
        assert!(range_within(&hp.value, n));
    }
    if was_head || (100..200).contains(&h.status) || h.status == 204 || h.status == 304 {
        assert_eq!(h.body, ResponseBody::None);
    }
    if h.body == ResponseBody::UntilClose {
        assert!(
            !h.keep_alive,
            "a close-delimited body on a kept-alive connection"
        );
    }
    let _ = (h.reason(buf), h.is_interim());

    let same = |b: &[u8]| -> ResponseHead {
        parse_response_head(b, limits, was_head)
            .unwrap_or_else(|e| panic!("head alone failed: {e:?}"))
            .expect("head alone is incomplete")
    };
    assert_eq!(same(&buf[..n]), h, "bytes after the head changed the parse");
    for k in [0, n / 2, n.saturating_sub(2), n - 1] {
        match parse_response_head(&buf[..k], limits, was_head) {
            Ok(None) => {}
            other => panic!("prefix of {k} of a {n}-byte head gave {other:?}"),
        }
    }
}
