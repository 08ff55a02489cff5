//! Property tests of the sans-IO HTTP/1.1 layer: arbitrary input never
//! panics, what the parsers accept is internally consistent, and chunked
//! encoding round-trips through the decoder whatever the read boundaries.

use anp_proxy::http::{
    parse_request_head, parse_response_head, write_chunk_header, ChunkedDecoder, ChunkedError,
    ChunkedStep, Limits, LAST_CHUNK,
};
use bytes::BytesMut;
use proptest::prelude::*;

/// Fragments that steer random input into the interesting parts of the
/// grammar instead of failing on the first byte.
const FRAGMENTS: &[&str] = &[
    "GET ",
    "POST ",
    "OPTIONS ",
    "HTTP/1.1 ",
    "HTTP/1.0 ",
    "200 OK",
    "100 Continue",
    "/",
    "/a?b",
    "*",
    "http://h/x",
    " HTTP/1.1",
    " HTTP/1.0",
    "\r\n",
    "\r",
    "\n",
    " ",
    "\t",
    ":",
    ",",
    "Host: h",
    "Host",
    "Content-Length: ",
    "Content-Length",
    "Transfer-Encoding: ",
    "chunked",
    "gzip",
    "Connection: ",
    "close",
    "keep-alive",
    "upgrade",
    "Upgrade: ws",
    "Expect: 100-continue",
    "0",
    "5",
    "18446744073709551616",
    "\0",
    "\u{7f}",
    "\u{e9}",
];

fn small_limits() -> impl Strategy<Value = Limits> {
    (0usize..64, 0usize..256, 0usize..8).prop_map(|(l, h, n)| Limits {
        max_request_line: l,
        max_head: h,
        max_headers: n,
    })
}

fn http_like() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(FRAGMENTS), 0..40)
        .prop_map(|parts| parts.concat().into_bytes())
}

/// What must hold of any request head the parser accepts.
fn check_request(buf: &[u8], limits: &Limits) {
    if let Ok(Some(h)) = parse_request_head(buf, limits) {
        assert!(h.head_len <= buf.len());
        assert!(h.head_len <= limits.max_head);
        assert!(h.headers.len() <= limits.max_headers);
        let head = &buf[..h.head_len];
        assert!(head.ends_with(b"\r\n\r\n"));
        // No bare LF or CR survived.
        for (i, &b) in head.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(head[i - 1], b'\r');
            }
            if b == b'\r' {
                assert_eq!(head[i + 1], b'\n');
            }
        }
        for r in [&h.method, &h.target]
            .into_iter()
            .chain(h.headers.iter().flat_map(|p| [&p.name, &p.value]))
            .chain(h.host.iter())
        {
            assert!(r.end <= h.head_len);
        }
        assert!(!h.method(buf).is_empty());
        // Every strict prefix is incomplete or an error, never a head.
        for cut in 0..h.head_len {
            assert!(!matches!(
                parse_request_head(&buf[..cut], limits),
                Ok(Some(_))
            ));
        }
    }
}

/// A well-formed request head with random fields, and what it holds.
fn valid_request() -> impl Strategy<Value = (Vec<u8>, Vec<(String, String)>)> {
    let name =
        prop::sample::select(&["Accept", "User-Agent", "X-Id", "Cookie", "Content-Type"][..]);
    let value = "[ -~]{0,40}".prop_map(|v| v.trim_matches(|c| c == ' ').to_string());
    (
        prop::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH"][..]),
        "(/[a-zA-Z0-9._~%-]{0,12}){1,4}(\\?[a-z0-9=&]{0,20})?",
        0u8..2,
        prop::collection::vec((name, value), 0..10),
        prop::option::of(0u64..1_000_000),
        0usize..3,
    )
        .prop_map(|(method, path, minor, fields, cl, empty_lines)| {
            let mut head = "\r\n".repeat(empty_lines);
            head.push_str(&format!("{method} {path} HTTP/1.{minor}\r\n"));
            let mut all = Vec::new();
            if minor == 1 {
                all.push(("Host".to_string(), "example.com:8080".to_string()));
            }
            all.extend(fields.into_iter().map(|(n, v)| (n.to_string(), v)));
            if let Some(n) = cl {
                all.push(("Content-Length".to_string(), n.to_string()));
            }
            for (n, v) in &all {
                head.push_str(&format!("{n}: {v}\r\n"));
            }
            head.push_str("\r\n");
            (head.into_bytes(), all)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn request_parser_never_panics_on_bytes(buf in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_request_head(&buf, &Limits::default());
    }

    #[test]
    fn request_parser_consistent_on_http_like(buf in http_like(), limits in small_limits()) {
        check_request(&buf, &Limits::default());
        check_request(&buf, &limits);
    }

    #[test]
    fn response_parser_never_panics(
        buf in prop_oneof![prop::collection::vec(any::<u8>(), 0..512), http_like()],
        limits in small_limits(),
        head in any::<bool>(),
    ) {
        for l in [&Limits::default(), &limits] {
            if let Ok(Some(h)) = parse_response_head(&buf, l, head) {
                prop_assert!(h.head_len <= buf.len());
                prop_assert!(h.head_len <= l.max_head);
                prop_assert!((100..=599).contains(&h.status));
                prop_assert!(h.reason.end <= h.head_len);
                for p in &h.headers {
                    prop_assert!(p.name.end <= h.head_len && p.value.end <= h.head_len);
                }
            }
        }
    }

    #[test]
    fn chunked_decoder_never_panics(
        buf in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            prop::collection::vec(prop::sample::select(&b"0123456789abcdefF;= \t\r\nxX:"[..]), 0..512),
        ],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        budget in 0usize..64,
    ) {
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(buf.len() + 1)).collect();
        points.sort_unstable();
        points.push(buf.len());
        let mut dec = ChunkedDecoder::new(budget);
        let mut input = BytesMut::new();
        let mut fed = 0;
        let mut data_len = 0usize;
        'feed: for p in points {
            input.extend_from_slice(&buf[fed..p]);
            fed = p;
            loop {
                match dec.decode(&mut input) {
                    Ok(ChunkedStep::Data(d)) => {
                        prop_assert!(!d.is_empty());
                        data_len += d.len();
                    }
                    Ok(ChunkedStep::NeedMore) => {
                        prop_assert!(input.is_empty());
                        break;
                    }
                    Ok(ChunkedStep::Done) | Err(_) => break 'feed,
                }
            }
        }
        prop_assert!(data_len <= buf.len());
    }

    #[test]
    fn chunked_round_trip_any_split(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
        trailing in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut wire = BytesMut::new();
        for c in &chunks {
            write_chunk_header(&mut wire, c.len());
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(LAST_CHUNK);
        let body_len = wire.len();
        wire.extend_from_slice(&trailing);

        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.sort_unstable();
        points.push(wire.len());

        let mut dec = ChunkedDecoder::new(0);
        let mut input = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut done = false;
        'feed: for p in points {
            input.extend_from_slice(&wire[fed..p]);
            fed = p;
            loop {
                match dec.decode(&mut input).map_err(|e: ChunkedError| e.reason()) {
                    Ok(ChunkedStep::Data(d)) => out.extend_from_slice(&d),
                    Ok(ChunkedStep::NeedMore) => break,
                    Ok(ChunkedStep::Done) => {
                        done = true;
                        // Exactly the body was consumed.
                        prop_assert_eq!(fed - input.len(), body_len);
                        break 'feed;
                    }
                    Err(e) => prop_assert!(false, "decode error: {}", e),
                }
            }
        }
        prop_assert!(done);
        prop_assert_eq!(out, chunks.concat());
    }

    #[test]
    fn valid_requests_parse_exactly((buf, fields) in valid_request(), extra in prop::collection::vec(any::<u8>(), 0..8)) {
        let mut wire = buf.clone();
        wire.extend_from_slice(&extra);
        let h = parse_request_head(&wire, &Limits::default()).unwrap().unwrap();
        prop_assert_eq!(h.head_len, buf.len());
        prop_assert_eq!(h.headers.len(), fields.len());
        for (p, (n, v)) in h.headers.iter().zip(&fields) {
            prop_assert_eq!(p.name(&wire), n.as_str());
            prop_assert_eq!(p.value(&wire), v.as_bytes());
        }
        for cut in 0..buf.len() {
            prop_assert_eq!(parse_request_head(&wire[..cut], &Limits::default()), Ok(None));
        }
    }

    #[test]
    fn mutated_requests_stay_consistent(
        (buf, _) in valid_request(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(&b"\r\n \t:,\x00\x7f\xffA0/"[..])), 1..4),
    ) {
        let mut buf = buf;
        for (i, b) in edits {
            let at = i.index(buf.len());
            buf[at] = b;
        }
        check_request(&buf, &Limits::default());
    }
}
