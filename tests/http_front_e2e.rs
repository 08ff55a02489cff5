//! Hardening of the gateway's HTTP front (issue #6, RFC 9110/9112), end to
//! end on the real binaries: every malformed or abusive request gets the
//! exact status, the connection is closed where the byte stream can no
//! longer be trusted, nothing reaches the app, and a keep-alive connection
//! opened *before* the bad request (the "bystander") is still served by the
//! tunnel right after it.
//!
//! Cases already covered in tests/tunnel_e2e.rs are not repeated here:
//! Content-Length with Transfer-Encoding, differing Content-Lengths, an
//! invalid chunk size (`zz`), bare LF, 414, 431 and the forwarding headers.

mod common;

use common::client::{read_response, Conn};
use common::{GatewayConfig, Setup};
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Hang guard for the timeout cases: far above `header_timeout = 1`.
const GENEROUS: Duration = Duration::from_secs(30);

/// A keep-alive client connection opened, and served once, before the bad
/// request; [`Bystander::check`] asserts it is still served afterwards.
struct Bystander {
    c: Conn,
    n: u32,
}

impl Bystander {
    fn open(s: &Setup) -> Bystander {
        let mut b = Bystander {
            c: Conn::connect(s.gw.addr),
            n: 0,
        };
        b.check("before the bad request");
        b
    }

    fn check(&mut self, when: &str) {
        self.n += 1;
        let t = format!("/alice/bystander/{}", self.n);
        let r = self.c.request("GET", &t, &[], &[]);
        assert_eq!(
            r.status,
            200,
            "bystander keep-alive connection, GET {t} {when}: expected 200 from the tunnel, got {}",
            r.summary()
        );
        assert_eq!(
            r.echo_target(),
            t.as_bytes(),
            "bystander GET {t} {when}: expected the app's echo of its own target"
        );
    }
}

/// Sends `bytes` on a fresh connection and asserts the answer is `want`,
/// then (if `must_close`) that the gateway closes the connection, that no
/// request under `path` reached the app, and that `by` is still served.
fn assert_refused(
    s: &Setup,
    by: &mut Bystander,
    bytes: &[u8],
    want: u16,
    must_close: bool,
    path: &str,
    what: &str,
) {
    let mut c = Conn::connect(s.gw.addr);
    c.write_raw(bytes, &["POST"])
        .unwrap_or_else(|e| panic!("{what}: expected to send the request: {e}"));
    let r = c
        .read()
        .unwrap_or_else(|e| panic!("{what}: expected a {want} response, got none: {e}"));
    assert_eq!(
        r.status,
        want,
        "{what}: expected {want}, got {}",
        r.summary()
    );
    if must_close {
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{what}: expected the {want} to say `connection: close`: {}",
            r.summary()
        );
        assert!(
            c.is_closed_by_peer(),
            "{what}: expected the gateway to close the connection after {want}"
        );
    }
    let reached: Vec<String> = s
        .app
        .requests_to(path)
        .iter()
        .map(|r| String::from_utf8_lossy(&r.target).into_owned())
        .collect();
    assert!(
        reached.is_empty(),
        "{what}: expected nothing under {path} to reach the app, got {reached:?}"
    );
    by.check(&format!("right after {what}"));
}

fn assert_400(s: &Setup, by: &mut Bystander, bytes: &[u8], path: &str, what: &str) {
    assert_refused(s, by, bytes, 400, true, path, what);
}

// ------------------------------------------------------------ Content-Length

#[test]
fn malformed_content_length_is_refused_with_400_and_closed() {
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    for (i, v) in [
        "+5",
        "",
        "5a",
        "-1",
        "0x10",
        "99999999999999999999999",
        "5 5",
        "5,",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/alice/bad-cl/{i}");
        let req = format!("POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {v}\r\n\r\n");
        assert_400(
            &s,
            &mut by,
            req.as_bytes(),
            &path,
            &format!("Content-Length: {v:?}"),
        );
    }
}

// --------------------------------------------------------- Transfer-Encoding

#[test]
fn transfer_encoding_not_ending_in_chunked_is_refused_with_400_and_closed() {
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    // RFC 9112 §6.3 item 4: the body length cannot be determined: 400 + close.
    // `chunked, chunked`: chunked applied twice (RFC 9112 §6.1), also 400.
    for (i, te) in ["gzip", "chunked, chunked", "chunked, gzip", "identity"]
        .iter()
        .enumerate()
    {
        let path = format!("/alice/bad-te/{i}");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        assert_400(
            &s,
            &mut by,
            req.as_bytes(),
            &path,
            &format!("Transfer-Encoding: {te}"),
        );
    }
    // The same list split over two field lines is one list (RFC 9110 §5.3).
    assert_400(
        &s,
        &mut by,
        b"POST /alice/bad-te/two-lines HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "/alice/bad-te/two-lines",
        "Transfer-Encoding: chunked on two lines",
    );
}

#[test]
fn unsupported_transfer_coding_before_chunked_is_refused_with_501_and_closed() {
    // `gzip, chunked` is well framed (chunked is last), but the gateway
    // implements no coding besides chunked: RFC 9112 §6.1 says a server
    // SHOULD answer a transfer coding it does not understand with 501. The
    // body is not read, so the connection is closed too.
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    for (i, te) in ["gzip, chunked", "x-unknown, chunked"].iter().enumerate() {
        let path = format!("/alice/te-501/{i}");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        assert_refused(
            &s,
            &mut by,
            req.as_bytes(),
            501,
            true,
            &path,
            &format!("Transfer-Encoding: {te}"),
        );
    }
}

#[test]
fn overflowing_chunk_size_is_refused_with_400_and_closed() {
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    assert_400(
        &s,
        &mut by,
        b"POST /alice/chunk-overflow HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n",
        "/alice/chunk-overflow",
        "chunk size FFFFFFFFFFFFFFFFFF (overflows u64)",
    );
    // After a first good chunk, too (the body is already on its way).
    assert_400(
        &s,
        &mut by,
        b"POST /alice/chunk-overflow-2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10000000000000000\r\nx\r\n0\r\n\r\n",
        "/alice/chunk-overflow-2",
        "second chunk size 10000000000000000 (2^64)",
    );
}

// ---------------------------------------------------------- head syntax

#[test]
fn bare_cr_in_head_is_refused_with_400_and_closed() {
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    assert_400(
        &s,
        &mut by,
        b"GET /alice/cr-1 HTTP/1.1\rHost: t\r\n\r\n",
        "/alice/cr-1",
        "bare CR ending the request-line",
    );
    assert_400(
        &s,
        &mut by,
        b"GET /alice/cr-2 HTTP/1.1\r\nHost: t\r\nX-A: one\rX-B: two\r\n\r\n",
        "/alice/cr-2",
        "bare CR inside a field value",
    );
}

#[test]
fn obs_fold_is_refused_with_400_and_closed() {
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    assert_400(
        &s,
        &mut by,
        b"GET /alice/fold-sp HTTP/1.1\r\nHost: t\r\nX-A: one\r\n two\r\n\r\n",
        "/alice/fold-sp",
        "obs-fold (continuation line starting with SP)",
    );
    assert_400(
        &s,
        &mut by,
        b"GET /alice/fold-tab HTTP/1.1\r\nHost: t\r\nX-A: one\r\n\ttwo\r\n\r\n",
        "/alice/fold-tab",
        "obs-fold (continuation line starting with HTAB)",
    );
}

#[test]
fn whitespace_between_field_name_and_colon_is_refused_with_400_and_closed() {
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    assert_400(
        &s,
        &mut by,
        b"GET /alice/ws-colon-1 HTTP/1.1\r\nHost : t\r\n\r\n",
        "/alice/ws-colon-1",
        "`Host : t`",
    );
    assert_400(
        &s,
        &mut by,
        b"POST /alice/ws-colon-2 HTTP/1.1\r\nHost: t\r\nContent-Length\t: 5\r\n\r\nhello",
        "/alice/ws-colon-2",
        "`Content-Length<TAB>: 5`",
    );
}

#[test]
fn missing_or_duplicate_host_is_refused_with_400_and_closed() {
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    assert_400(
        &s,
        &mut by,
        b"GET /alice/no-host HTTP/1.1\r\nAccept: */*\r\n\r\n",
        "/alice/no-host",
        "HTTP/1.1 without Host",
    );
    assert_400(
        &s,
        &mut by,
        b"GET /alice/two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "/alice/two-hosts",
        "two different Host fields",
    );
    assert_400(
        &s,
        &mut by,
        b"GET /alice/same-hosts HTTP/1.1\r\nHost: t\r\nhost: t\r\n\r\n",
        "/alice/same-hosts",
        "two identical Host fields",
    );
}

// ---------------------------------------------------------------- timeouts

/// A config whose `header_timeout` (head deadline, and the longest pause in
/// a body) is 1 s.
fn short_header_timeout() -> GatewayConfig {
    GatewayConfig {
        extra_gateway_toml: "header_timeout = 1\n".into(),
        ..GatewayConfig::default()
    }
}

/// Reads one response from `s` (within [`GENEROUS`]) and then asserts EOF.
fn expect_408_then_close(s: TcpStream, what: &str) {
    s.set_read_timeout(Some(GENEROUS)).unwrap();
    let mut r = BufReader::new(s);
    let resp = read_response(&mut r, "GET").unwrap_or_else(|e| {
        panic!("{what}: expected a `408` status line before the close, got none: {e}")
    });
    assert_eq!(
        resp.status,
        408,
        "{what}: expected 408, got {}",
        resp.summary()
    );
    assert_eq!(
        resp.header("connection"),
        Some("close"),
        "{what}: expected the 408 to say `connection: close`: {}",
        resp.summary()
    );
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "{what}: expected nothing after the 408, got {:?}",
            String::from_utf8_lossy(&rest)
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{what}: expected the gateway to close the connection after the 408: {e}"
        ),
    }
}

#[test]
fn slowloris_head_gets_408_and_is_closed() {
    let s = Setup::with(&short_header_timeout(), 1);
    let mut by = Bystander::open(&s);
    // One byte every 100 ms: each gap is far below header_timeout, the
    // whole head (~13 s) far above it. Only a deadline on the whole head
    // stops it; a per-read idle timer would let it through and answer 200.
    let head = format!(
        "GET /alice/slowloris HTTP/1.1\r\nHost: t\r\nX-Padding: {}\r\n\r\n",
        "p".repeat(80)
    );
    let sock = TcpStream::connect(s.gw.addr).expect("connect");
    let mut w = sock.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let trickle = thread::spawn(move || {
        for b in head.as_bytes() {
            if st.load(Ordering::Relaxed) || w.write_all(&[*b]).is_err() {
                return false;
            }
            thread::sleep(Duration::from_millis(100)); // the attack's pace, not synchronisation
        }
        true
    });
    // Others are served while the slow head is held.
    by.check("while a slowloris head trickles in");
    expect_408_then_close(sock, "head trickled byte by byte past header_timeout");
    stop.store(true, Ordering::Relaxed);
    let finished = trickle.join().unwrap();
    assert!(
        !finished,
        "expected the 408 before the trickled head was complete"
    );
    assert!(
        s.app.requests_to("/alice/slowloris").is_empty(),
        "slowloris: expected nothing to reach the app"
    );
    by.check("right after the slowloris connection got 408");
}

#[test]
fn slow_body_gets_408_and_is_closed() {
    let s = Setup::with(&short_header_timeout(), 1);
    let mut by = Bystander::open(&s);
    let mut sock = TcpStream::connect(s.gw.addr).expect("connect");
    // 10 of the announced 100 bytes, then silence (the socket stays open).
    sock.write_all(
        b"POST /alice/slow-body HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .expect("send head and the first 10 body bytes");
    by.check("while a body stalls");
    let keep = sock.try_clone().unwrap(); // not dropped before the 408 arrives
    expect_408_then_close(sock, "Content-Length 100, 10 bytes sent, then silence");
    drop(keep);
    assert!(
        s.app.requests_to("/alice/slow-body").is_empty(),
        "slow body: expected no complete request to reach the app"
    );
    by.check("right after the slow body got 408");

    // Chunked: one chunk, then silence.
    let mut sock = TcpStream::connect(s.gw.addr).expect("connect");
    sock.write_all(b"POST /alice/slow-chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .expect("send head and one chunk");
    let keep = sock.try_clone().unwrap();
    expect_408_then_close(sock, "chunked body, one chunk, then silence");
    drop(keep);
    assert!(
        s.app.requests_to("/alice/slow-chunked").is_empty(),
        "slow chunked body: expected no complete request to reach the app"
    );
    by.check("right after the slow chunked body got 408");
}

// ---------------------------------------------------------------- Upgrade

#[test]
fn websocket_upgrade_an_app_declines_is_its_answer_and_closes() {
    // Our receiver negotiates `upgrade` (PROTOCOL.md §7.6), so the upgrade
    // reaches the app with its Upgrade field and `Connection: upgrade`.
    // This app speaks no WebSocket: its 200 is the answer, the connection
    // is closed after it (tests/ws_passthrough_e2e.rs has the 101 path and
    // the 501 of a receiver without the extension).
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    let mut c = Conn::connect(s.gw.addr);
    c.write_raw(
        b"GET /alice/chat HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        &["GET"],
    )
    .unwrap();
    let r = c.read().expect("the app's answer");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(r.header("connection"), Some("close"), "{}", r.summary());
    assert!(
        c.is_closed_by_peer(),
        "expected the connection closed after the declined upgrade"
    );
    let seen = s.app.requests_to("/alice/chat");
    assert_eq!(seen.len(), 1, "the upgrade reached the app once");
    assert_eq!(seen[0].header("upgrade"), Some("websocket"));
    assert_eq!(seen[0].header("connection"), Some("upgrade"));
    assert_eq!(
        seen[0].header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    by.check("right after the declined upgrade");
}

#[test]
fn h2c_upgrade_is_ignored_and_served_over_http11() {
    // RFC 9110 §7.8: a server may ignore Upgrade and keep HTTP/1.1. The
    // gateway does for anything but websocket: it answers the request with
    // the app's 200 (no 101), and Upgrade, HTTP2-Settings and Connection
    // are hop-by-hop, so the app sees none of them.
    let s = Setup::new();
    let mut by = Bystander::open(&s);
    let mut c = Conn::connect(s.gw.addr);
    c.write_raw(
        b"GET /alice/h2c HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        &["GET"],
    )
    .unwrap();
    let r = c.read().expect("a response to the h2c upgrade request");
    assert_eq!(
        r.status,
        200,
        "Upgrade: h2c: expected the request served over HTTP/1.1 (200, no 101), got {}",
        r.summary()
    );
    assert!(
        r.interim.is_empty(),
        "Upgrade: h2c: expected no interim response, got {:?}",
        r.interim
    );
    assert_eq!(r.echo_target(), b"/alice/h2c");
    assert!(
        r.header("upgrade").is_none(),
        "expected no Upgrade in the response: {}",
        r.summary()
    );
    let seen = s.app.requests_to("/alice/h2c");
    assert_eq!(seen.len(), 1, "expected the app to get the request once");
    for h in ["upgrade", "http2-settings", "connection"] {
        assert!(
            seen[0].header(h).is_none(),
            "expected hop-by-hop {h} not forwarded to the app, got {:?}",
            seen[0].header(h)
        );
    }
    // The connection stays HTTP/1.1 keep-alive.
    let r = c.request("GET", "/alice/h2c-after", &[], &[]);
    assert_eq!(
        r.status,
        200,
        "request after the ignored h2c upgrade on the same connection: {}",
        r.summary()
    );
    assert_eq!(r.echo_target(), b"/alice/h2c-after");
    by.check("after an h2c upgrade request");
}
