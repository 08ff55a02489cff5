//! End-to-end: fields named in `Connection` are for one hop only and never
//! cross the proxy (RFC 9110 §7.6.1), in either direction: what the client
//! names does not reach the app, what the app names does not reach the
//! client, even when the peer across the tunnel is a plain v1 one that
//! relays fields as they came (each end strips them on its own).
//!
//! Real gateway and receiver processes, a scripted app
//! (tests/common/scripted_app.rs), a raw tunnel peer (tests/common/rawpeer.rs)
//! standing in for a plain v1 receiver, and a few lines here standing in
//! for a plain v1 gateway.

mod common;

use anp_proxy::protocol::anpx::{self, FrameType, MetaRef, RequestMeta};
use bytes::BytesMut;
use common::client::{self, Conn};
use common::rawpeer::{self, RawPeer};
use common::scripted_app::ScriptedApp;
use common::standin;
use common::{Gateway, GatewayConfig, Receiver, Response, ALICE_TOKEN};
use std::net::TcpStream;

/// The app's answer: two `Connection` fields naming three fields in
/// different cases, and one field that is the app's to send.
const NAMING: &[u8] = b"HTTP/1.1 200 OK\r\n\
    Connection: X-Internal, keep-alive\r\n\
    X-Internal: secret\r\n\
    x-other: 2\r\n\
    connection: X-OTHER, x-third\r\n\
    X-Third: 3\r\n\
    X-Kept: yes\r\n\
    Content-Length: 2\r\n\r\nok";

fn assert_only_kept(r: &Response, via: &str) {
    assert_eq!(
        (r.status, r.body_text().as_str()),
        (200, "ok"),
        "{via}: {}",
        r.summary()
    );
    for gone in ["x-internal", "x-other", "x-third"] {
        assert!(
            r.header(gone).is_none(),
            "{via}: the app named {gone} in Connection, yet the client got it: {}",
            r.summary()
        );
    }
    for (n, v) in &r.headers {
        assert!(
            !n.eq_ignore_ascii_case("connection") || v.eq_ignore_ascii_case("close"),
            "{via}: the app's Connection field reached the client ({n}: {v})"
        );
        assert!(!v.contains("secret"), "{via}: {n}: {v}");
    }
    assert_eq!(r.header("x-kept"), Some("yes"), "{via}: {}", r.summary());
}

#[test]
fn fields_the_app_names_in_connection_do_not_reach_the_client() {
    let app = ScriptedApp::start(|x| {
        x.write(NAMING);
    });
    let gw = Gateway::start(&GatewayConfig::default());
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let r = client::request(gw.addr, "GET", "/alice/naming", &[], &[]);
    assert_only_kept(&r, "through our receiver");
}

#[test]
fn fields_a_plain_v1_receiver_relays_are_stripped_by_the_gateway() {
    let gw = Gateway::start(&GatewayConfig::default());
    let mut peer = RawPeer::connect(gw.addr, ALICE_TOKEN, "");
    let mut c = Conn::connect(gw.addr);
    c.send("GET", "/alice/relayed", &[], &[]).unwrap();
    let req = peer.next_request();
    // The reference receiver's flat v1 map: names lower-cased, repeated
    // fields joined with ", ".
    let meta = rawpeer::resp_meta(
        200,
        &[
            ("connection", "X-Internal, keep-alive, X-OTHER, x-third"),
            ("x-internal", "secret"),
            ("x-other", "2"),
            ("x-third", "3"),
            ("x-kept", "yes"),
        ],
    );
    let mut frame = BytesMut::new();
    anpx::encode_frame(
        FrameType::Response,
        &req.request_id,
        Some(MetaRef::Response(&meta)),
        b"ok",
        None,
        &mut frame,
    );
    peer.send_binary(&frame);
    let r = c.read().expect("a response relayed from the plain v1 peer");
    assert_only_kept(&r, "through a plain v1 receiver");
}

#[test]
fn fields_the_client_names_in_connection_do_not_reach_the_app() {
    let app = ScriptedApp::start(|x| {
        x.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let gw = Gateway::start(&GatewayConfig::default());
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let r = client::request(
        gw.addr,
        "GET",
        "/alice/named",
        &[
            ("X-Hop", "secret"),
            ("Connection", "keep-alive, x-hop"),
            ("connection", "X-SECOND"),
            ("x-second", "2"),
            ("X-Kept", "yes"),
        ],
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.summary());
    let seen = app.next_request();
    for gone in ["x-hop", "x-second", "connection"] {
        assert!(
            seen.header(gone).is_none(),
            "the client named {gone} in Connection (or it is Connection), yet the app got it: {:?}",
            seen.headers
        );
    }
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains("secret")),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.header("x-kept"), Some("yes"), "{:?}", seen.headers);
}

/// Plays a plain v1 gateway for one receiver (a bare 101: no features)
/// and sends `meta` as one whole request frame. Returns the tunnel socket
/// (kept open) and the receiver.
fn v1_gateway_sends(meta: &RequestMeta, app: std::net::SocketAddr) -> (TcpStream, Receiver) {
    let (mut s, rx) = standin::accept_receiver("", app);
    standin::send_v1_request(&mut s, "v1-req-1", meta, b"");
    (s, rx)
}

#[test]
fn fields_a_plain_v1_gateway_relays_are_stripped_by_the_receiver() {
    let app = ScriptedApp::start(|x| {
        x.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    // What a v1 gateway that forwards the client's fields as they came
    // would send: the flat map, the Connection-named fields still in it.
    let meta = RequestMeta {
        method: "GET".into(),
        path: "/alice/from-v1".into(),
        headers: vec![
            ("host".into(), "t".into()),
            ("connection".into(), "keep-alive, X-Hop, x-second".into()),
            ("x-hop".into(), "secret".into()),
            ("x-second".into(), "2".into()),
            ("x-kept".into(), "yes".into()),
        ],
        query: vec![],
        raw_target: None,
        header_list: None,
    };
    let (_tunnel, _rx) = v1_gateway_sends(&meta, app.addr);
    let seen = app.next_request();
    assert_eq!(seen.target, "/alice/from-v1");
    for gone in ["x-hop", "x-second", "connection"] {
        assert!(
            seen.header(gone).is_none(),
            "the v1 gateway's request named {gone} in Connection, yet the app got it: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("x-kept"), Some("yes"), "{:?}", seen.headers);
}

/// An HTTP/1.0 client keeps its connection only when the response says
/// `Connection: keep-alive` (RFC 9112 §9.3); without it, it waits for a
/// close that never comes (`ab -k` hung until the idle timeout). Every
/// kind of answer says it: a proxied one, the gateway's own refusal and
/// `/health`. Each is followed by another request on the same connection,
/// which is served. Without `keep-alive` asked, the answer says `close`
/// and the connection ends; so does a `/health` whose body goes unread
/// (one place decides the field: `http::headers::Persist`).
#[test]
fn an_http10_client_that_asks_for_keep_alive_is_told_and_kept() {
    let s = common::Setup::new();
    let mut c = Conn::connect(s.gw.addr);
    let asks = [
        ("/alice/one", 200),
        ("/nobody/here", 404),
        ("/health", 200),
        ("/alice/two", 200),
    ];
    for (path, status) in asks {
        let req = format!("GET {path} HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        c.write_raw(req.as_bytes(), &["GET"]).unwrap();
        let r = c
            .read()
            .unwrap_or_else(|e| panic!("GET {path} HTTP/1.0 on a kept connection: no answer: {e}"));
        assert_eq!(r.status, status, "GET {path}: {}", r.summary());
        assert_eq!(
            r.header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("keep-alive"),
            "GET {path}: an HTTP/1.0 client must be told its connection persists: {}",
            r.summary()
        );
    }
    assert_eq!(
        s.app.requests().len(),
        2,
        "both proxied requests reached the app"
    );

    // A `/health` with a body it does not read ends the connection, and
    // says so.
    let mut h = Conn::connect(s.gw.addr);
    h.write_raw(
        b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
        &["GET"],
    )
    .unwrap();
    let r = h.read().unwrap();
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(r.header("connection"), Some("close"), "{}", r.summary());
    assert!(h.is_closed_by_peer(), "/health with an unread body: closed");

    c.write_raw(b"GET /alice/last HTTP/1.0\r\n\r\n", &["GET"])
        .unwrap();
    let r = c.read().unwrap();
    assert_eq!(r.status, 200, "{}", r.summary());
    assert_eq!(r.header("connection"), Some("close"), "{}", r.summary());
    assert!(c.is_closed_by_peer(), "HTTP/1.0 without keep-alive: closed");
}

/// RFC 9110 §6.6.1: every response the client gets carries one `Date`:
/// the gateway's own (a 404, `/health`), a relayed one the app sent
/// without Date (the gateway adds it), and a relayed one with the app's
/// Date (kept as it is, no second).
#[test]
fn every_response_carries_one_date_and_the_apps_own_is_kept() {
    const THEIRS: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    let app = ScriptedApp::start(|x| {
        let date = if x.req.target.ends_with("/dated") {
            format!("Date: {THEIRS}\r\n")
        } else {
            String::new()
        };
        x.write(format!("HTTP/1.1 200 OK\r\n{date}Content-Length: 2\r\n\r\nok").as_bytes());
    });
    let gw = Gateway::start(&GatewayConfig::default());
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    let before = std::time::SystemTime::now();
    for (path, status) in [
        ("/nobody/x", 404),
        ("/health", 200),
        ("/alice/undated", 200),
    ] {
        let r = client::request(gw.addr, "GET", path, &[], &[]);
        assert_eq!(r.status, status, "{path}: {}", r.summary());
        let dates = r.headers_all("date");
        assert_eq!(dates.len(), 1, "{path}: {}", r.summary());
        let when = httpdate::parse_http_date(dates[0]).unwrap();
        let off = when
            .duration_since(before)
            .or_else(|e| Ok::<_, ()>(e.duration()))
            .unwrap();
        assert!(off.as_secs() <= 2, "{path}: {} is not now", dates[0]);
    }
    let r = client::request(gw.addr, "GET", "/alice/dated", &[], &[]);
    assert_eq!(r.headers_all("date"), [THEIRS], "{}", r.summary());
}
