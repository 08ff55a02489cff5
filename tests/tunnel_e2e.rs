//! End-to-end: real `anp-proxy gateway` and `anp-proxy receiver` processes,
//! a real local HTTP app (tests/common/app.rs), raw HTTP/1.1 clients.
//! Every test binds port 0, owns its processes, and waits on stdout lines,
//! channels and condvars — never on sleeps. Timeouts are hang guards only.

mod common;

use common::app::{pattern_body, sha256_hex};
use common::client::{self, build_request, chunked, send_raw, Conn};
use common::procs::{Relay, Token};
use common::{App, Gateway, GatewayConfig, Receiver, Setup, ALICE_TOKEN, BOB_TOKEN};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Deterministic pseudo-random bytes (xorshift), different from the app's
/// download pattern so an echo can't be confused with a generated body.
fn random_body(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn hex_target(r: &common::Response) -> String {
    String::from_utf8_lossy(&r.echo_target()).into_owned()
}

// ---------------------------------------------------------------- methods

#[test]
fn every_method_reaches_the_app_unchanged_and_head_has_no_body() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    for method in [
        "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "HEAD",
    ] {
        let target = format!("/alice/m/{method}");
        let body: Vec<u8> = if matches!(method, "GET" | "HEAD") {
            vec![]
        } else {
            format!("body of {method}").into_bytes()
        };
        let headers: &[(&str, &str)] = if method == "HEAD" {
            &[("X-Test-Body-Len", "1000")]
        } else {
            &[]
        };
        let r = c.request(method, &target, headers, &body);
        assert_eq!(
            r.status,
            200,
            "{method} {target}: expected 200 from the app, got {}",
            r.summary()
        );
        assert_eq!(
            r.header("x-echo-method"),
            Some(method),
            "{method}: expected the app to see method {method}, got {}",
            r.summary()
        );
        assert_eq!(
            hex_target(&r),
            target,
            "{method}: expected target {target} at the app"
        );
        if method == "HEAD" {
            assert!(
                r.body.is_empty(),
                "HEAD: expected no body, got {} bytes",
                r.body.len()
            );
            if let Some(cl) = r.header("content-length") {
                assert_eq!(
                    cl, "1000",
                    "HEAD: expected the app's Content-Length 1000 (or none), got {cl}"
                );
            }
        } else {
            assert_eq!(
                r.body, body,
                "{method}: expected the request body echoed back"
            );
        }
    }
    // The connection must still be framed correctly after the HEAD response.
    let r = c.request("GET", "/alice/after-head", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "GET after HEAD on the same connection: expected 200, got {}",
        r.summary()
    );
    assert_eq!(
        hex_target(&r),
        "/alice/after-head",
        "GET after HEAD: expected its own echo"
    );
    let seen: Vec<String> = s.app.requests().iter().map(|q| q.method.clone()).collect();
    assert_eq!(
        seen,
        ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "HEAD", "GET"],
        "expected the app to receive exactly these methods in order"
    );
}

// ---------------------------------------------------------------- targets

#[test]
fn query_string_reaches_the_app_byte_exact() {
    let s = Setup::new();
    let targets = [
        "/alice/q?a=1&a=2&b=%20x%2Fy&c=%E4%B8%AD&empty=&flag",
        "/alice/q?",
        "/alice/q?x=%2B+plus&y=a%26b&z=%3D%3F#not-a-fragment-on-the-wire",
        "/alice/q?UPPER=%7e%7E",
    ];
    for t in targets {
        // A fragment is never sent by real clients; strip it like they do.
        let t = t.split('#').next().unwrap();
        let r = client::request(s.gw.addr, "GET", t, &[], &[]);
        assert_eq!(r.status, 200, "GET {t}: expected 200, got {}", r.summary());
        assert_eq!(
            r.echo_target(),
            t.as_bytes(),
            "GET {t}: expected the app to receive the same raw target"
        );
    }
    let app_targets: Vec<Vec<u8>> = s.app.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        app_targets[0],
        targets[0].as_bytes(),
        "app log: expected the first raw target byte-exact"
    );
}

#[test]
fn non_ascii_path_reaches_the_app_byte_exact() {
    let s = Setup::new();
    for t in [
        "/alice/%E6%B5%8B%E8%AF%95/caf%C3%A9",
        "/alice/a%2Fb/c%3Fd", // encoded slash and question mark must stay encoded
        "/alice/%e6%b5%8b",   // lower-case hex must not be normalised
        "/alice/sp%20ace/%25percent",
        "/alice/caf%C3%A9?q=%C3%A9",
    ] {
        let r = client::request(s.gw.addr, "GET", t, &[], &[]);
        assert_eq!(r.status, 200, "GET {t}: expected 200, got {}", r.summary());
        assert_eq!(
            r.echo_target(),
            t.as_bytes(),
            "GET {t}: expected the app to receive the raw target unchanged"
        );
    }
}

#[test]
fn path_prefix_is_not_stripped() {
    let s = Setup::new();
    for t in [
        "/alice",
        "/alice/",
        "/alice/x/y",
        "/alice/x/y/",
        "/shared/alice/deep/er?x=1",
    ] {
        let r = client::request(s.gw.addr, "GET", t, &[], &[]);
        assert_eq!(r.status, 200, "GET {t}: expected 200, got {}", r.summary());
        assert_eq!(
            hex_target(&r),
            t,
            "GET {t}: expected the app to see the full path including the route prefix"
        );
    }
}

// ---------------------------------------------------------------- bodies

const SIZES: [usize; 7] = [0, 1, 65_535, 65_536, 65_537, 1 << 20, 16 << 20];

#[test]
fn content_length_uploads_are_echoed_intact() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    for (i, &n) in SIZES.iter().enumerate() {
        let body = random_body(n, i as u64 + 1);
        let sha = sha256_hex(&body);
        let t = format!("/alice/upload/{n}");
        let r = c.request(
            "POST",
            &t,
            &[("Content-Type", "application/octet-stream")],
            &body,
        );
        assert_eq!(
            r.status,
            200,
            "POST {n} bytes: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            r.header("x-echo-body-len"),
            Some(n.to_string().as_str()),
            "POST {n} bytes: expected the app to receive {n} bytes"
        );
        assert_eq!(
            r.header("x-echo-body-sha256"),
            Some(sha.as_str()),
            "POST {n} bytes: expected the app to receive the same bytes (sha256)"
        );
        assert_eq!(
            r.body.len(),
            n,
            "POST {n} bytes: expected {n} bytes echoed back"
        );
        assert!(
            r.body == body,
            "POST {n} bytes: expected the echoed body to equal the upload"
        );
    }
}

#[test]
fn chunked_uploads_are_echoed_intact() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    let cases: [(usize, usize); 9] = [
        (0, 1),
        (1, 1),
        (100, 7),
        (65_537, 1),
        (65_537, 4096),
        (1 << 20, 65_536),
        (1 << 20, 100_003),
        (16 << 20, 1 << 20),
        (16 << 20, 65_535),
    ];
    for (i, &(n, chunk)) in cases.iter().enumerate() {
        let body = random_body(n, 100 + i as u64);
        let sha = sha256_hex(&body);
        let t = format!("/alice/chunked/{n}/{chunk}");
        let mut req = build_request(
            "PUT",
            t.as_bytes(),
            &[("Transfer-Encoding", "chunked")],
            &[],
        );
        req.extend_from_slice(&chunked(&body, chunk));
        c.write_raw(&req, &["PUT"])
            .unwrap_or_else(|e| panic!("PUT {t}: expected to send: {e}"));
        let r = c.read().unwrap_or_else(|e| {
            panic!("PUT {t} (chunked {n} B in {chunk} B chunks): expected a response: {e}")
        });
        assert_eq!(
            r.status,
            200,
            "chunked PUT {n} B / {chunk} B chunks: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            r.header("x-echo-body-len"),
            Some(n.to_string().as_str()),
            "chunked PUT {n} B / {chunk}: expected the app to receive {n} bytes"
        );
        assert_eq!(
            r.header("x-echo-body-sha256"),
            Some(sha.as_str()),
            "chunked PUT {n} B / {chunk}: expected identical bytes at the app"
        );
        assert!(
            r.body == body,
            "chunked PUT {n} B / {chunk}: expected the echoed body to equal the upload"
        );
    }
}

#[test]
fn downloads_of_every_size_arrive_intact() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    for n in SIZES {
        let len = n.to_string();
        let r = c.request(
            "GET",
            &format!("/alice/download/{n}"),
            &[("X-Test-Body-Len", &len)],
            &[],
        );
        assert_eq!(
            r.status,
            200,
            "download {n} B: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            r.body.len(),
            n,
            "download {n} B: expected {n} bytes, got {}",
            r.body.len()
        );
        assert!(
            r.body == pattern_body(n),
            "download {n} B: expected the app's exact bytes"
        );
    }
}

#[test]
fn chunked_responses_from_the_app_arrive_intact() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    for n in SIZES {
        let len = n.to_string();
        let r = c.request(
            "GET",
            &format!("/alice/dl-chunked/{n}"),
            &[("X-Test-Body-Len", &len), ("X-Test-Chunked", "1")],
            &[],
        );
        assert_eq!(
            r.status,
            200,
            "chunked download {n} B: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            r.body.len(),
            n,
            "chunked download {n} B: expected {n} bytes, got {}",
            r.body.len()
        );
        assert!(
            r.body == pattern_body(n),
            "chunked download {n} B: expected the app's exact bytes"
        );
    }
    // An echo answered chunked, too.
    let body = random_body(200_000, 9);
    let r = c.request(
        "POST",
        "/alice/echo-chunked",
        &[("X-Test-Chunked", "1")],
        &body,
    );
    assert_eq!(
        r.status,
        200,
        "chunked echo: expected 200, got {}",
        r.summary()
    );
    assert!(
        r.body == body,
        "chunked echo: expected the upload echoed intact ({} bytes back)",
        r.body.len()
    );
}

// ---------------------------------------------------------------- headers

#[test]
fn several_set_cookie_headers_survive_in_order() {
    let s = Setup::new();
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/cookies",
        &[("X-Test-Set-Cookies", "5")],
        &[],
    );
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    let expected: Vec<String> = (0..5).map(|i| format!("c{i}=v{i}; Path=/")).collect();
    assert_eq!(
        r.headers_all("set-cookie"),
        expected,
        "expected 5 separate Set-Cookie headers in the app's order"
    );
    let dup = r.headers_all("x-dup");
    let dup_ok = dup == ["first", "second", "third"] || dup == ["first, second, third"];
    assert!(
        dup_ok,
        "expected X-Dup first,second,third in order (separate or comma-joined), got {dup:?}"
    );
    // Many of them (about 4 KiB of Set-Cookie lines).
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/cookies/many",
        &[("X-Test-Set-Cookies", "200")],
        &[],
    );
    assert_eq!(
        r.status,
        200,
        "200 Set-Cookies: expected 200, got {}",
        r.summary()
    );
    let expected: Vec<String> = (0..200).map(|i| format!("c{i}=v{i}; Path=/")).collect();
    assert_eq!(
        r.headers_all("set-cookie"),
        expected,
        "expected 200 separate Set-Cookie headers in the app's order"
    );
}

#[test]
fn forwarding_headers_are_added() {
    let s = Setup::new();
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/fwd",
        &[("Host", "public.example:8443")],
        &[],
    );
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    let h = r.echo_headers();
    let get = |n: &str| -> Vec<&str> {
        h.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(
        get("x-forwarded-for"),
        ["127.0.0.1"],
        "expected X-Forwarded-For: 127.0.0.1 at the app; app saw {h:?}"
    );
    assert_eq!(
        get("x-forwarded-proto"),
        ["http"],
        "expected X-Forwarded-Proto: http at the app; app saw {h:?}"
    );
    assert_eq!(
        get("x-forwarded-host"),
        ["public.example:8443"],
        "expected X-Forwarded-Host: public.example:8443; app saw {h:?}"
    );
    let fwd = get("forwarded");
    assert_eq!(
        fwd.len(),
        1,
        "expected one Forwarded header at the app; app saw {h:?}"
    );
    let f = fwd[0].to_ascii_lowercase();
    assert!(
        f.contains("for=127.0.0.1") || f.contains("for=\"127.0.0.1"),
        "expected Forwarded for=127.0.0.1, got {f:?}"
    );
    assert!(
        f.contains("proto=http"),
        "expected Forwarded proto=http, got {f:?}"
    );
    assert!(
        f.contains("host=\"public.example:8443\"") || f.contains("host=public.example:8443"),
        "expected Forwarded host=public.example:8443, got {f:?}"
    );
}

#[test]
fn client_sent_forwarding_headers_are_not_trusted_by_default() {
    let s = Setup::new();
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/spoof",
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
        ],
        &[],
    );
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    let h = r.echo_headers();
    let all: String = h.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    assert!(
        !all.contains("6.6.6.6"),
        "expected the client's spoofed 6.6.6.6 not to reach the app untrusted; app saw:\n{all}"
    );
    assert!(
        !all.contains("evil.example"),
        "expected the client's X-Forwarded-Host not to reach the app; app saw:\n{all}"
    );
    let xff: Vec<&str> = h
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        xff,
        ["127.0.0.1"],
        "expected X-Forwarded-For replaced by 127.0.0.1; app saw:\n{all}"
    );
}

#[test]
fn hop_by_hop_headers_are_not_forwarded() {
    let s = Setup::new();
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/hop",
        &[
            ("Connection", "keep-alive, X-Custom"),
            ("X-Custom", "hop-only"),
            ("Keep-Alive", "timeout=5, max=7"),
            ("Proxy-Connection", "keep-alive"),
            ("Proxy-Authorization", "Basic aG9wOmhvcA=="),
            ("TE", "trailers"),
            ("Trailer", "X-Trail"),
            ("X-End-To-End", "kept"),
        ],
        &[],
    );
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    let h = r.echo_headers();
    let all: String = h.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
    for gone in [
        "x-custom",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
    ] {
        assert!(
            !h.iter().any(|(k, _)| k.eq_ignore_ascii_case(gone)),
            "expected hop-by-hop header {gone} not to reach the app; app saw:\n{all}"
        );
    }
    for (k, v) in &h {
        if k.eq_ignore_ascii_case("connection") {
            assert!(
                !v.to_ascii_lowercase().contains("x-custom"),
                "expected the client's Connection tokens not forwarded; app saw Connection: {v}"
            );
        }
    }
    assert!(
        !all.contains("hop-only"),
        "expected the value of Connection-listed X-Custom absent at the app; app saw:\n{all}"
    );
    assert!(
        h.iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("x-end-to-end") && v == "kept"),
        "expected end-to-end header X-End-To-End: kept at the app; app saw:\n{all}"
    );
}

// ---------------------------------------------------------------- statuses

#[test]
fn app_statuses_and_reason_phrases_arrive_unchanged() {
    let s = Setup::new();
    let statuses = [
        200, 201, 202, 203, 206, 301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 409, 410, 418,
        422, 429, 500, 501, 502, 503, 504, 599,
    ];
    for st in statuses {
        let reason = format!("Custom Reason {st} from app");
        let r = client::request(
            s.gw.addr,
            "POST",
            &format!("/alice/status/{st}"),
            &[
                ("X-Test-Status", &st.to_string()),
                ("X-Test-Reason", &reason),
            ],
            b"status-body",
        );
        assert_eq!(
            r.status,
            st,
            "X-Test-Status {st}: expected the app's status {st}, got {}",
            r.summary()
        );
        assert_eq!(
            r.reason, reason,
            "X-Test-Status {st}: expected the app's reason phrase {reason:?}, got {:?}",
            r.reason
        );
        assert_eq!(
            r.body,
            b"status-body",
            "X-Test-Status {st}: expected the app's body, got {}",
            r.summary()
        );
        assert_eq!(
            r.header("x-echo-method"),
            Some("POST"),
            "X-Test-Status {st}: expected the app's headers through, got {}",
            r.summary()
        );
    }
}

#[test]
fn no_content_and_not_modified_arrive_without_body() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    for st in [204u16, 304] {
        let r = c.request(
            "GET",
            &format!("/alice/nobody/{st}"),
            &[("X-Test-Status", &st.to_string())],
            b"",
        );
        assert_eq!(r.status, st, "expected {st}, got {}", r.summary());
        assert!(
            r.body.is_empty(),
            "{st}: expected no body, got {} bytes",
            r.body.len()
        );
        assert!(
            r.header("transfer-encoding").is_none(),
            "{st}: expected no Transfer-Encoding, got {}",
            r.summary()
        );
        if st == 204 {
            assert!(
                r.header("content-length").is_none(),
                "204: expected no Content-Length (RFC 9110 §8.6), got {}",
                r.summary()
            );
        }
        // Framing check: the next response on this connection must be intact.
        let r2 = c.request("GET", &format!("/alice/after/{st}"), &[], &[]);
        assert_eq!(
            r2.status,
            200,
            "request after {st} on the same connection: expected 200, got {}",
            r2.summary()
        );
        assert_eq!(
            hex_target(&r2),
            format!("/alice/after/{st}"),
            "request after {st}: expected its own echo"
        );
    }
}

// ---------------------------------------------------------------- concurrency

#[test]
fn thousand_concurrent_requests_over_one_tunnel_each_get_their_own_response() {
    let s = Setup::new();
    assert_eq!(s.rx.connected(), 1, "expected exactly one tunnel");
    const CLIENTS: usize = 1000;
    let addr = s.gw.addr;
    let start = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let start = start.clone();
            thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    let mut c = Conn::connect(addr);
                    let body = format!("request-{id}-").repeat(1 + id % 13).into_bytes();
                    let target = format!("/alice/concurrent/{id}?id={id}");
                    let req = build_request("POST", target.as_bytes(), &[], &body);
                    start.wait(); // everybody sends at once
                    c.write_raw(&req, &["POST"])
                        .unwrap_or_else(|e| panic!("client {id}: expected to send: {e}"));
                    let r = c
                        .read()
                        .unwrap_or_else(|e| panic!("client {id}: expected a response: {e}"));
                    assert_eq!(
                        r.status,
                        200,
                        "client {id}: expected 200, got {}",
                        r.summary()
                    );
                    assert_eq!(
                        hex_target(&r),
                        target,
                        "client {id}: expected the echo of its own target"
                    );
                    assert_eq!(r.body, body, "client {id}: expected its own body back");
                })
                .expect("spawn client thread")
        })
        .collect();
    let mut failures = Vec::new();
    for (id, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            failures.push(format!("{id}: {}", msg.unwrap_or_default()));
        }
    }
    assert!(
        failures.is_empty(),
        "expected all {CLIENTS} concurrent requests to succeed; {} failed, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        s.app.requests_to("/alice/concurrent/").len(),
        CLIENTS,
        "expected the app to receive each request exactly once"
    );
}

// ---------------------------------------------------------------- routing

#[test]
fn longest_segment_prefix_routing() {
    let s = Setup::new();
    for (t, want) in [
        ("/alice", 200),
        ("/alice/x", 200),
        ("/alice/x/y?z=1", 200),
        ("/alicex", 404),
        ("/alicex/y", 404),
        ("/shared/alice/1", 200),
        ("/shared/alice", 200),
        ("/shared", 404),
        ("/shared/alicex", 404),
        ("/shared/bob", 404),
        ("/", 404),
        ("/ALICE", 404),
    ] {
        let r = client::request(s.gw.addr, "GET", t, &[], &[]);
        assert_eq!(
            r.status,
            want,
            "GET {t}: expected {want}, got {}",
            r.summary()
        );
        if want == 200 {
            assert_eq!(hex_target(&r), t, "GET {t}: expected alice's app to answer");
        }
    }
}

#[test]
fn nested_prefixes_of_two_identities_route_to_the_longest() {
    let cfg = GatewayConfig {
        tokens: vec![
            Token {
                name: "alice".into(),
                token: ALICE_TOKEN.into(),
                paths: vec!["/team".into()],
            },
            Token {
                name: "bob".into(),
                token: BOB_TOKEN.into(),
                paths: vec!["/team/bob".into()],
            },
        ],
        ..GatewayConfig::default()
    };
    let app_a = App::start();
    let app_b = App::start();
    let gw = Gateway::start(&cfg);
    let mut ra = Receiver::start(gw.addr, app_a.addr, ALICE_TOKEN, 1);
    let mut rb = Receiver::start(gw.addr, app_b.addr, BOB_TOKEN, 1);
    ra.wait_connected(1);
    rb.wait_connected(1);
    for (t, to_bob) in [
        ("/team", false),
        ("/team/x", false),
        ("/team/bobby", false),
        ("/team/bob", true),
        ("/team/bob/", true),
        ("/team/bob/deep/er?q=1", true),
    ] {
        let r = client::request(gw.addr, "GET", t, &[], &[]);
        assert_eq!(r.status, 200, "GET {t}: expected 200, got {}", r.summary());
        let by_a = app_a.requests().iter().any(|q| q.target == t.as_bytes());
        let by_b = app_b.requests().iter().any(|q| q.target == t.as_bytes());
        let who = if to_bob { "bob" } else { "alice" };
        assert_eq!((by_a, by_b), (!to_bob, to_bob), "GET {t}: expected only {who}'s app to receive it (alice got it: {by_a}, bob got it: {by_b})");
    }
}

#[test]
fn no_route_gives_404_with_json_naming_the_path() {
    let s = Setup::new();
    let path = "/nobody/owns/this";
    let r = client::request(s.gw.addr, "GET", path, &[], &[]);
    assert_eq!(
        r.status,
        404,
        "GET {path}: expected 404, got {}",
        r.summary()
    );
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("404: expected a JSON body, got {:?}: {e}", r.body_text()));
    assert!(
        v.to_string().contains(path),
        "404: expected the JSON body to name {path}, got {v}"
    );
    assert!(
        s.app.requests().is_empty(),
        "404: expected nothing to reach the app"
    );
}

#[test]
fn known_route_without_receiver_gives_503_with_retry_after() {
    let s = Setup::new(); // alice is connected, bob is not
    let r = client::request(s.gw.addr, "GET", "/bob/anything", &[], &[]);
    assert_eq!(
        r.status,
        503,
        "GET /bob/anything (bob has no receiver): expected 503, got {}",
        r.summary()
    );
    let ra = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("503: expected a Retry-After header, got {}", r.summary()));
    assert!(
        ra.trim().parse::<u64>().is_ok(),
        "503: expected Retry-After in delay-seconds, got {ra:?}"
    );
    assert!(
        s.app.requests().is_empty(),
        "503: expected nothing to reach alice's app"
    );
}

#[test]
fn wrong_token_receiver_is_refused_and_gets_no_routes() {
    let s = Setup::new();
    // A receiver claiming to be bob with a bad secret, dialling through a
    // relay that tells us when the gateway has answered its upgrade.
    let relay = Relay::start(s.gw.addr);
    let app_b = App::start();
    let _rb = Receiver::start(relay.addr, app_b.addr, "bob-wrong-secret", 1);
    let line = relay.next_status_line();
    assert!(
        line.starts_with("HTTP/1.1 401") || line.starts_with("HTTP/1.1 403"),
        "upgrade with a wrong token: expected the gateway to refuse with 401/403, got {line:?}"
    );
    let r = client::request(s.gw.addr, "GET", "/bob/x", &[], &[]);
    assert_eq!(
        r.status,
        503,
        "GET /bob/x with only a refused receiver: expected 503, got {}",
        r.summary()
    );
    assert!(
        app_b.requests().is_empty(),
        "expected the wrong-token receiver's app to receive nothing"
    );
    // The refused receiver keeps retrying (DESIGN: reconnects with backoff).
    let line = relay.next_status_line();
    assert!(
        line.starts_with("HTTP/1.1 40"),
        "retry with the wrong token: expected another refusal, got {line:?}"
    );
}

// ---------------------------------------------------------------- tunnel auth

fn upgrade_request(gw: &Gateway, auth: Option<&str>) -> Vec<u8> {
    let mut req = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        gw.addr
    );
    if let Some(a) = auth {
        req += &format!("Authorization: {a}\r\n");
    }
    req += "\r\n";
    req.into_bytes()
}

#[test]
fn tunnel_upgrade_with_a_bad_token_is_refused_with_401() {
    let gw = Gateway::start_default();
    for auth in [
        Some("Bearer wrong"),
        Some("Bearer alice-secre"),
        Some("Bearer "),
        None,
    ] {
        let r = send_raw(gw.addr, &upgrade_request(&gw, auth));
        assert_eq!(
            r.status,
            401,
            "upgrade with Authorization {auth:?}: expected 401, got {}",
            r.summary()
        );
        assert!(
            serde_json::from_slice::<serde_json::Value>(&r.body).is_ok(),
            "401: expected a short JSON body saying why (PROTOCOL.md §1), got {:?}",
            r.body_text()
        );
    }
    // Control: the same request with the right secret is accepted, so the
    // 401s above are about the token and nothing else.
    let r = send_raw(
        gw.addr,
        &upgrade_request(&gw, Some(&format!("Bearer {BOB_TOKEN}"))),
    );
    assert_eq!(
        r.status,
        101,
        "upgrade with bob's token: expected 101, got {}",
        r.summary()
    );
    assert_eq!(
        r.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "101: expected the RFC 6455 accept value for the sample key"
    );
}

// ---------------------------------------------------------------- failures

#[test]
fn receiver_killed_mid_request_gives_502() {
    let mut s = Setup::new();
    let addr = s.gw.addr;
    let client = thread::spawn(move || {
        client::request(
            addr,
            "GET",
            "/alice/held",
            &[("X-Test-Hold", "kill-me")],
            &[],
        )
    });
    s.app.wait_arrived("kill-me");
    s.rx.kill();
    let r = client.join().expect("client thread");
    s.app.release("kill-me");
    assert_eq!(
        r.status,
        502,
        "request in flight when its receiver was SIGKILLed: expected 502, got {}",
        r.summary()
    );
}

#[test]
fn slow_app_gives_504_after_timeout() {
    let cfg = GatewayConfig {
        timeout: 1.0,
        ..GatewayConfig::default()
    };
    let s = Setup::with(&cfg, 1);
    let t0 = Instant::now();
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/slow",
        &[("X-Test-Hold", "slow")],
        &[],
    );
    let elapsed = t0.elapsed();
    assert!(
        s.app.has_arrived("slow"),
        "expected the slow request to have reached the app before the 504"
    );
    s.app.release("slow");
    assert_eq!(
        r.status,
        504,
        "app held past timeout = 1 s: expected 504, got {}",
        r.summary()
    );
    assert!(
        elapsed >= Duration::from_millis(900),
        "504: expected it no sooner than the 1 s timeout, got it after {elapsed:?}"
    );
    // The late response must not leak into anyone else's exchange.
    let mut c = Conn::connect(s.gw.addr);
    for i in 0..5 {
        let t = format!("/alice/after-timeout/{i}");
        let r = c.request("GET", &t, &[], &[]);
        assert_eq!(
            r.status,
            200,
            "GET {t} after a 504: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            hex_target(&r),
            t,
            "GET {t} after a 504: expected its own response, not the late one"
        );
    }
}

#[test]
fn restarted_receiver_serves_again() {
    let mut s = Setup::new();
    let r = client::request(s.gw.addr, "GET", "/alice/before", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "before restart: expected 200, got {}",
        r.summary()
    );
    s.rx.kill();
    // Between kill and reconnect the route has no tunnel: 503, or 502 if the
    // gateway had not yet noticed the drop. Either way, not 200 or a hang.
    let r = client::request(s.gw.addr, "GET", "/alice/during", &[], &[]);
    assert!(
        r.status == 503 || r.status == 502,
        "with the receiver killed: expected 503 (or 502), got {}",
        r.summary()
    );
    let mut rx2 = Receiver::start(s.gw.addr, s.app.addr, ALICE_TOKEN, 1);
    rx2.wait_connected(1);
    for i in 0..10 {
        let t = format!("/alice/after/{i}");
        let r = client::request(s.gw.addr, "GET", &t, &[], &[]);
        assert_eq!(
            r.status,
            200,
            "GET {t} after the receiver restarted: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            hex_target(&r),
            t,
            "GET {t} after restart: expected the app's echo"
        );
    }
}

// ---------------------------------------------------------------- HTTP/1.1 front

#[test]
fn expect_100_continue_gets_100_before_the_final_response() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    c.set_read_timeout(Duration::from_secs(30));
    let body = b"hello after continue";
    let head = format!(
        "POST /alice/expect HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_raw(head.as_bytes(), &[]).unwrap();
    let (st, reason, _) = c.read_head_only().unwrap_or_else(|e| panic!("Expect: 100-continue: expected `100 Continue` before sending the body, got no answer: {e}"));
    assert_eq!(
        st, 100,
        "Expect: 100-continue: expected 100 first, got {st} {reason}"
    );
    c.write_raw(body, &["POST"]).unwrap();
    let r = c
        .read()
        .unwrap_or_else(|e| panic!("expected the final response after the body: {e}"));
    assert_eq!(
        r.status,
        200,
        "final response: expected 200, got {}",
        r.summary()
    );
    assert_eq!(r.body, body, "final response: expected the body echoed");
    assert!(
        r.interim.is_empty(),
        "expected no second interim response, got {:?}",
        r.interim
    );

    // A route with no tunnel answers the final status at once, without 100.
    let mut c = Conn::connect(s.gw.addr);
    c.write_raw(b"POST /bob/expect HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n", &["POST"]).unwrap();
    let r = c.read().unwrap_or_else(|e| {
        panic!("Expect to /bob (no tunnel): expected a final response without the body: {e}")
    });
    assert_eq!(
        r.status,
        503,
        "Expect to /bob (no tunnel): expected 503, got {}",
        r.summary()
    );
    assert!(
        r.interim.is_empty(),
        "Expect to /bob (no tunnel): expected no 100 Continue, got {:?}",
        r.interim
    );
}

#[test]
fn three_pipelined_requests_get_three_responses_in_order() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    let mut bytes = build_request(
        "GET",
        b"/alice/pipe/1",
        &[("X-Test-Body-Len", "1048576")],
        &[],
    );
    bytes.extend(build_request("POST", b"/alice/pipe/2", &[], b"second"));
    bytes.extend(build_request("GET", b"/alice/pipe/3?x=3", &[], &[]));
    c.write_raw(&bytes, &["GET", "POST", "GET"]).unwrap();
    let r1 = c.read().expect("pipelined: expected response 1");
    let r2 = c.read().expect("pipelined: expected response 2");
    let r3 = c.read().expect("pipelined: expected response 3");
    assert_eq!(
        (r1.status, hex_target(&r1)),
        (200, "/alice/pipe/1".to_string()),
        "pipelined #1: expected 200 for /alice/pipe/1"
    );
    assert!(
        r1.body == pattern_body(1 << 20),
        "pipelined #1: expected its 1 MiB body"
    );
    assert_eq!(
        (r2.status, hex_target(&r2)),
        (200, "/alice/pipe/2".to_string()),
        "pipelined #2: expected 200 for /alice/pipe/2"
    );
    assert_eq!(r2.body, b"second", "pipelined #2: expected its own body");
    assert_eq!(
        (r3.status, hex_target(&r3)),
        (200, "/alice/pipe/3?x=3".to_string()),
        "pipelined #3: expected 200 for /alice/pipe/3?x=3"
    );
}

#[test]
fn hundred_sequential_requests_on_one_keepalive_connection() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    for i in 0..100 {
        let t = format!("/alice/ka/{i}");
        let body = format!("body-{i}").into_bytes();
        let (m, b): (&str, &[u8]) = if i % 2 == 0 {
            ("GET", &[])
        } else {
            ("POST", &body)
        };
        let r = c.request(m, &t, &[], b);
        assert_eq!(
            r.status,
            200,
            "keep-alive request {i}: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            hex_target(&r),
            t,
            "keep-alive request {i}: expected its own echo"
        );
        assert_eq!(r.body, b, "keep-alive request {i}: expected its own body");
    }
    assert_eq!(
        s.app.requests_to("/alice/ka/").len(),
        100,
        "expected the app to receive all 100 requests"
    );
}

/// A keep-alive connection reads its next head at once for 5 ms
/// (`HOT_READ`, gateway/conn.rs), then cancels that read and waits
/// without a buffer. Requests that come just before, just after and
/// across that moment, whole or with the head split around it, must all
/// be answered, each with its own echo: a cancel that lost the bytes its
/// read had taken would leave a request unanswered (or the next one
/// misparsed). The pauses shape the traffic; nothing waits on them.
#[test]
fn keep_alive_requests_around_the_hot_read_window_are_all_answered() {
    let s = Setup::new();
    let addr = s.gw.addr;
    let gaps_ms = [0u64, 1, 3, 4, 5, 6, 7, 9, 15];
    let workers: Vec<_> = (0..6)
        .map(|w| {
            thread::spawn(move || {
                let mut c = Conn::connect(addr);
                c.set_read_timeout(Duration::from_secs(20));
                for i in 0..36 {
                    let gap = Duration::from_millis(gaps_ms[(i + w) % gaps_ms.len()]);
                    thread::sleep(gap);
                    let t = format!("/alice/hot/{w}/{i}");
                    let req = build_request("GET", t.as_bytes(), &[], &[]);
                    if i % 3 == 1 {
                        // The head split: its first bytes inside the
                        // window, the rest after the same gap again.
                        c.write_raw(&req[..7], &["GET"]).expect("first bytes sent");
                        thread::sleep(gap);
                        c.write_raw(&req[7..], &[]).expect("rest of the head sent");
                    } else {
                        c.write_raw(&req, &["GET"]).expect("request sent");
                    }
                    let r = c.read().unwrap_or_else(|e| {
                        panic!("{t} after a {gap:?} pause: expected a response, got {e}")
                    });
                    assert_eq!(r.status, 200, "{t}: expected 200, got {}", r.summary());
                    assert_eq!(hex_target(&r), t, "{t}: expected its own echo");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a client thread failed");
    }
    assert_eq!(
        s.app.requests_to("/alice/hot/").len(),
        6 * 36,
        "expected the app to receive every request exactly once"
    );
}

#[test]
fn health_endpoint_answers_a_bare_ok() {
    let gw = Gateway::start_default(); // no receiver at all
    let r = client::request(gw.addr, "GET", "/health", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "GET /health: expected 200, got {}",
        r.summary()
    );
    // Anyone can ask the public port: it learns nothing about tunnels
    // (the admin port's /health has the details).
    assert_eq!(r.body, b"ok\n", "GET /health: {}", r.summary());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain"),
        "{}",
        r.summary()
    );
}

// ---------------------------------------------------------------- refusals

fn assert_refused_and_closed(s: &Setup, bytes: &[u8], want: u16, what: &str) {
    let mut c = Conn::connect(s.gw.addr);
    let _ = c.write_raw(bytes, &["POST"]);
    let r = c
        .read()
        .unwrap_or_else(|e| panic!("{what}: expected a {want} response: {e}"));
    assert_eq!(
        r.status,
        want,
        "{what}: expected {want}, got {}",
        r.summary()
    );
    if want == 400 {
        assert!(
            c.is_closed_by_peer(),
            "{what}: expected the gateway to close the connection after 400"
        );
    }
}

#[test]
fn content_length_with_transfer_encoding_is_refused_with_400() {
    let s = Setup::new();
    assert_refused_and_closed(
        &s,
        b"POST /alice/smuggle HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /alice/smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        400,
        "Content-Length + Transfer-Encoding",
    );
    assert!(
        s.app.requests().is_empty(),
        "CL+TE: expected nothing to reach the app, got {:?}",
        s.app
            .requests()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.target).into_owned())
            .collect::<Vec<_>>()
    );
}

#[test]
fn differing_duplicate_content_lengths_are_refused_with_400() {
    let s = Setup::new();
    assert_refused_and_closed(
        &s,
        b"POST /alice/dup-cl HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        400,
        "two different Content-Length values",
    );
    assert!(
        s.app.requests().is_empty(),
        "duplicate CL: expected nothing to reach the app"
    );
}

#[test]
fn invalid_chunk_size_is_refused_with_400() {
    let s = Setup::new();
    assert_refused_and_closed(
        &s,
        b"POST /alice/bad-chunk HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
        "invalid chunk size `zz`",
    );
}

#[test]
fn bare_lf_in_head_is_refused_with_400() {
    let s = Setup::new();
    assert_refused_and_closed(
        &s,
        b"GET /alice/lf HTTP/1.1\nHost: t\n\n",
        400,
        "bare-LF line endings",
    );
    assert!(
        s.app.requests().is_empty(),
        "bare LF: expected nothing to reach the app"
    );
}

#[test]
fn header_block_over_64k_is_refused_with_431() {
    let s = Setup::new();
    let big = "a".repeat(66 * 1024);
    let r = send_raw(
        s.gw.addr,
        &build_request("GET", b"/alice/big-head", &[("X-Big", &big)], &[]),
    );
    assert_eq!(
        r.status,
        431,
        "one 66 KiB header: expected 431, got {}",
        r.summary()
    );
    let many: Vec<(String, String)> = (0..70)
        .map(|i| (format!("X-H{i}"), "b".repeat(1000)))
        .collect();
    let many_ref: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = send_raw(
        s.gw.addr,
        &build_request("GET", b"/alice/many-head", &many_ref, &[]),
    );
    assert_eq!(
        r.status,
        431,
        "70 headers of 1000 bytes (>64 KiB): expected 431, got {}",
        r.summary()
    );
    assert!(
        s.app.requests().is_empty(),
        "431: expected nothing to reach the app"
    );
}

#[test]
fn request_target_over_8k_is_refused_with_414() {
    let s = Setup::new();
    let target = format!("/alice/{}", "x".repeat(9 * 1024));
    let r = send_raw(
        s.gw.addr,
        &build_request("GET", target.as_bytes(), &[], &[]),
    );
    assert_eq!(
        r.status,
        414,
        "9 KiB request-target: expected 414, got {}",
        r.summary()
    );
    // Control: a long but allowed target goes through.
    let ok = format!("/alice/{}", "y".repeat(4 * 1024));
    let r = client::request(s.gw.addr, "GET", &ok, &[], &[]);
    assert_eq!(
        r.status,
        200,
        "4 KiB request-target: expected 200, got {}",
        r.summary()
    );
    assert_eq!(
        hex_target(&r),
        ok,
        "4 KiB target: expected it byte-exact at the app"
    );
}

#[test]
fn body_over_max_body_size_is_refused_with_413() {
    let cfg = GatewayConfig {
        max_body_size: 1 << 20,
        ..GatewayConfig::default()
    };
    let s = Setup::with(&cfg, 1);
    // Exactly the limit is fine.
    let body = random_body(1 << 20, 5);
    let r = client::request(s.gw.addr, "POST", "/alice/at-limit", &[], &body);
    assert_eq!(
        r.status,
        200,
        "body of exactly max_body_size: expected 200, got {}",
        r.summary()
    );
    assert!(
        r.body == body,
        "body of exactly max_body_size: expected it echoed"
    );
    // Declared length over the limit.
    let over = random_body((1 << 20) + 1, 6);
    let r = send_raw(
        s.gw.addr,
        &build_request("POST", b"/alice/over-cl", &[], &over),
    );
    assert_eq!(
        r.status,
        413,
        "Content-Length max_body_size+1: expected 413, got {}",
        r.summary()
    );
    // Chunked body that grows over the limit.
    let mut req = build_request(
        "POST",
        b"/alice/over-chunked",
        &[("Transfer-Encoding", "chunked")],
        &[],
    );
    req.extend(chunked(&random_body(2 << 20, 7), 65_536));
    let r = send_raw(s.gw.addr, &req);
    assert_eq!(
        r.status,
        413,
        "chunked body of 2 MiB with max_body_size 1 MiB: expected 413, got {}",
        r.summary()
    );
    assert!(
        s.app.requests_to("/alice/over-cl").is_empty(),
        "413 by Content-Length: expected the oversized request not to reach the app"
    );
}

#[test]
fn too_many_header_fields_are_refused_with_431() {
    let s = Setup::new();
    // 150 tiny fields: far below 64 KiB, above the 100-field limit (config default max_headers).
    let many: Vec<(String, String)> = (0..150)
        .map(|i| (format!("X-F{i}"), "v".to_string()))
        .collect();
    let many_ref: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = send_raw(
        s.gw.addr,
        &build_request("GET", b"/alice/many-fields", &many_ref, &[]),
    );
    assert_eq!(
        r.status,
        431,
        "150 header fields (limit 100): expected 431, got {}",
        r.summary()
    );
    assert!(
        s.app.requests().is_empty(),
        "431: expected nothing to reach the app"
    );
}

#[test]
fn trusted_forwarding_headers_are_appended_to() {
    let cfg = GatewayConfig {
        extra_gateway_toml: "trust_forwarded = true\n".into(),
        ..GatewayConfig::default()
    };
    let s = Setup::with(&cfg, 1);
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/trusted",
        &[("X-Forwarded-For", "6.6.6.6")],
        &[],
    );
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    let h = r.echo_headers();
    let xff: Vec<&str> = h
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|(_, v)| v.as_str())
        .collect();
    let joined = xff.join(", ");
    assert_eq!(joined, "6.6.6.6, 127.0.0.1", "trust_forwarded = true: expected the client's X-Forwarded-For appended to, app saw {xff:?}");
}

#[test]
fn receiver_with_tunnels_0_opens_one_per_gateway_worker_when_scaling_is_off() {
    let app = App::start();
    let gw = Gateway::start(&GatewayConfig {
        workers: 2,
        // With scaling on (the default) it starts with one: scale_e2e.rs.
        extra_gateway_toml: "tunnel_scale_up = 0\n".into(),
        ..GatewayConfig::default()
    });
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 0);
    rx.wait_connected(2); // the gateway reports 2 workers in its 101
                          // Many client connections land on both cores; each must be served.
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let addr = gw.addr;
            thread::spawn(move || {
                let t = format!("/alice/spread/{i}");
                let r = client::request(addr, "GET", &t, &[], &[]);
                assert_eq!(r.status, 200, "GET {t}: expected 200, got {}", r.summary());
                assert_eq!(hex_target(&r), t, "GET {t}: expected its own echo");
            })
        })
        .collect();
    for h in handles {
        h.join()
            .expect("a client over 2 tunnels failed (see its panic above)");
    }
}

#[test]
fn client_that_leaves_mid_request_does_not_disturb_others() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    c.send("GET", "/alice/abandoned", &[("X-Test-Hold", "gone")], &[])
        .unwrap();
    s.app.wait_arrived("gone");
    drop(c); // client goes away while the app still works on it
    s.app.release("gone"); // its late response must be dropped quietly
    let mut c = Conn::connect(s.gw.addr);
    for i in 0..20 {
        let t = format!("/alice/next/{i}");
        let r = c.request("GET", &t, &[], &[]);
        assert_eq!(
            r.status,
            200,
            "GET {t} after another client left mid-request: expected 200, got {}",
            r.summary()
        );
        assert_eq!(
            hex_target(&r),
            t,
            "GET {t}: expected its own response, not the abandoned one"
        );
    }
}

#[test]
fn client_connection_close_is_honoured() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    let r = c.request("GET", "/alice/close-me", &[("Connection", "close")], &[]);
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    assert_eq!(hex_target(&r), "/alice/close-me", "expected the app's echo");
    assert!(
        c.is_closed_by_peer(),
        "Connection: close from the client: expected the gateway to close after the response"
    );
}

#[test]
fn refused_request_with_body_keeps_the_connection_usable_or_closes_it() {
    let s = Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    // 404 with an unread body: the gateway must either drain it or close;
    // it must never parse the body as the next request.
    let r = c.request(
        "POST",
        "/nobody/here",
        &[],
        b"GET /alice/smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(
        r.status,
        404,
        "POST to an unrouted path: expected 404, got {}",
        r.summary()
    );
    match c
        .send("GET", "/alice/real", &[], &[])
        .and_then(|_| c.read())
    {
        Ok(r2) => {
            assert_eq!(
                r2.status,
                200,
                "request after a 404 with a body: expected 200, got {}",
                r2.summary()
            );
            assert_eq!(
                hex_target(&r2),
                "/alice/real",
                "request after a 404 with a body: expected its own echo"
            );
        }
        Err(_) => { /* the gateway closed the connection: allowed */ }
    }
    assert!(
        s.app.requests_to("/alice/smuggled").is_empty(),
        "expected the 404 request's body never to be parsed as a request"
    );
}

#[test]
fn chunked_upload_with_extensions_and_trailers_is_echoed_intact() {
    let s = Setup::new();
    let body = b"hello, chunked world";
    let mut req = build_request(
        "POST",
        b"/alice/chunk-ext",
        &[("Transfer-Encoding", "chunked")],
        &[],
    );
    req.extend_from_slice(b"5;name=value\r\nhello\r\n");
    req.extend_from_slice(b"F;quoted=\"x y\"\r\n, chunked world\r\n");
    req.extend_from_slice(b"0\r\nX-Trailer-One: 1\r\n\r\n");
    let mut c = Conn::connect(s.gw.addr);
    c.write_raw(&req, &["POST"]).unwrap();
    let r = c.read().unwrap_or_else(|e| {
        panic!("chunked body with extensions and trailers: expected a response: {e}")
    });
    assert_eq!(
        r.status,
        200,
        "chunk extensions + trailer: expected 200, got {}",
        r.summary()
    );
    assert_eq!(
        r.body, body,
        "chunk extensions + trailer: expected the decoded body echoed"
    );
    // The connection stays in sync after the trailer section.
    let r = c.request("GET", "/alice/after-trailer", &[], &[]);
    assert_eq!(
        (r.status, hex_target(&r)),
        (200, "/alice/after-trailer".to_string()),
        "request after a chunked body with trailers: expected its own 200"
    );
}

#[test]
fn admin_endpoints_are_not_on_the_public_port() {
    let s = Setup::new();
    for path in ["/stats", "/metrics"] {
        let r = client::request(s.gw.addr, "GET", path, &[], &[]);
        assert_eq!(r.status, 404, "GET {path} on the public port: expected 404 (admin is on its own loopback listener), got {}", r.summary());
    }
}

#[test]
fn idle_keepalive_connection_is_closed_after_keepalive_timeout() {
    let cfg = GatewayConfig {
        keepalive_timeout: 1.0,
        ..GatewayConfig::default()
    };
    let s = Setup::with(&cfg, 1);
    let mut c = Conn::connect(s.gw.addr);
    let r = c.request("GET", "/alice/idle", &[], &[]);
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    let t0 = Instant::now();
    c.set_read_timeout(Duration::from_secs(20));
    assert!(
        c.is_closed_by_peer(),
        "keepalive_timeout = 1: expected the gateway to close the idle connection (waited {:?})",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "keepalive_timeout = 1: expected the close well before 15 s, took {:?}",
        t0.elapsed()
    );
}

#[test]
fn request_headers_reach_the_app_in_order_with_duplicates() {
    let s = Setup::new();
    let mut hs: Vec<(String, String)> = vec![
        ("X-Multi".into(), "first".into()),
        ("X-Other".into(), "between".into()),
        ("X-Multi".into(), "second".into()),
        ("X-Empty".into(), "".into()),
        ("X-Spaces".into(), "a  b\tc".into()),
        ("Cookie".into(), "a=1".into()),
        ("Cookie".into(), "b=2".into()),
    ];
    hs.extend((0..60).map(|i| (format!("X-Seq-{i}"), format!("value-{i}"))));
    let refs: Vec<(&str, &str)> = hs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = client::request(s.gw.addr, "GET", "/alice/headers", &refs, &[]);
    assert_eq!(r.status, 200, "expected 200, got {}", r.summary());
    let seen = r.echo_headers();
    let seen_ours: Vec<(String, String)> = seen
        .iter()
        .filter(|(k, _)| hs.iter().any(|(n, _)| n.eq_ignore_ascii_case(k)))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    let sent: Vec<(String, String)> = hs
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect();
    // Duplicates may legitimately be combined into one comma-separated line
    // (RFC 9110 §5.3) except Cookie, which joins with "; "; accept only those two shapes.
    if seen_ours != sent {
        let multi: Vec<&str> = seen_ours
            .iter()
            .filter(|(k, _)| k == "x-multi")
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(
            multi == ["first", "second"] || multi == ["first, second"],
            "expected X-Multi first then second at the app, got {multi:?}"
        );
        let cookie: Vec<&str> = seen_ours
            .iter()
            .filter(|(k, _)| k == "cookie")
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(
            cookie == ["a=1", "b=2"] || cookie == ["a=1; b=2"],
            "expected Cookie a=1 then b=2 at the app, got {cookie:?}"
        );
        let seq: Vec<&(String, String)> = seen_ours
            .iter()
            .filter(|(k, _)| k.starts_with("x-seq-"))
            .collect();
        let want_seq: Vec<&(String, String)> = sent
            .iter()
            .filter(|(k, _)| k.starts_with("x-seq-"))
            .collect();
        assert_eq!(
            seq, want_seq,
            "expected the 60 X-Seq-* headers in their order at the app"
        );
        for (k, v) in [
            ("x-empty", ""),
            ("x-spaces", "a  b\tc"),
            ("x-other", "between"),
        ] {
            assert!(
                seen_ours.iter().any(|(a, b)| a == k && b == v),
                "expected {k}: {v:?} at the app, got {seen_ours:?}"
            );
        }
    }
}

#[test]
fn utf8_header_value_reaches_the_app_unchanged() {
    let s = Setup::new();
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/utf8-header",
        &[("X-Name", "café 测试")],
        &[],
    );
    assert_eq!(
        r.status,
        200,
        "header value with UTF-8 bytes (obs-text): expected 200, got {}",
        r.summary()
    );
    let seen = r.echo_headers();
    let v: Vec<&str> = seen
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-name"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        v,
        ["café 测试"],
        "expected the UTF-8 header value byte-exact at the app"
    );
}

#[test]
fn header_block_just_under_64k_is_forwarded() {
    let s = Setup::new();
    let big = "h".repeat(60 * 1024);
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/big-but-ok",
        &[("X-Big", &big)],
        &[],
    );
    assert_eq!(
        r.status,
        200,
        "one 60 KiB header (limit 64 KiB): expected 200, got {}",
        r.summary()
    );
    let req = s.app.requests_to("/alice/big-but-ok");
    assert_eq!(req.len(), 1, "expected the request at the app once");
    assert_eq!(
        req[0].header("x-big").map(str::len),
        Some(big.len()),
        "expected the 60 KiB header value intact at the app"
    );
}
