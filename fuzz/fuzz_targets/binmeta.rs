//! The binary meta of `binmeta` (docs/PROTOCOL.md §7.5): what a peer sends
//! in `http_meta` / `resp_meta`. Invariants beyond "no panic": a meta that
//! parses has every part inside the input, walks exactly its field count,
//! and built again from its parts gives the same bytes back.
#![no_main]

use anp_proxy::protocol::anpx::binmeta::{Builder, Request, Response};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = Bytes::copy_from_slice(data);
    if let Ok(r) = Request::parse(raw.clone()) {
        let mut b = Builder::request(r.method(), r.target(), data.len());
        let n = r.fields().size_hint().0;
        let mut seen = 0;
        for (name, value) in r.fields() {
            b.field(name, value);
            seen += 1;
        }
        assert_eq!(seen, n);
        assert_eq!(b.finish_request().as_bytes(), data);
    }
    if let Ok(r) = Response::parse(raw) {
        assert!((100..=999).contains(&r.status()));
        let mut b = Builder::response(r.status(), r.reason(), data.len());
        for (name, value) in r.fields() {
            b.field(name, value);
        }
        assert_eq!(b.finish_response().as_bytes(), data);
    }
});
