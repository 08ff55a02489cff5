//! End-to-end: the `binmeta` extension (docs/PROTOCOL.md §7.5). Our gateway
//! and receiver negotiate it and relay heads byte for byte; a raw tunnel
//! peer sees the documented layout on the wire and is answered in it; a
//! peer that offers `binmeta` without `stream` keeps JSON; a broken binary
//! meta fails its request with 502 and nothing else.

mod common;

use anp_proxy::protocol::anpx::binmeta::{self, Builder};
use anp_proxy::protocol::anpx::{self, FrameType, MetaRef};
use anp_proxy::ws::Event;
use bytes::{Bytes, BytesMut};
use common::client::{self, Conn};
use common::rawpeer::RawPeer;
use common::scripted_app::ScriptedApp;
use common::{Gateway, GatewayConfig, Receiver, ALICE_TOKEN};

/// The next request frame's request_id and raw `http_meta`.
fn next_request_raw(peer: &mut RawPeer) -> (String, Vec<u8>) {
    loop {
        match peer.next_event() {
            Some(Event::Binary(msg)) => {
                let f = anpx::decode_frame(&msg).expect("gateway sent valid ANPX");
                assert_eq!(f.ty, FrameType::Request);
                return (
                    f.request_id.expect("request_id").to_string(),
                    f.http_meta.expect("http_meta").to_vec(),
                );
            }
            Some(Event::Close { code, reason }) => panic!("tunnel closed: {code:?} {reason}"),
            Some(_) => continue,
            None => panic!("tunnel connection closed"),
        }
    }
}

fn send_response(peer: &mut RawPeer, request_id: &str, meta: &[u8], body: &[u8]) {
    let mut frame = BytesMut::new();
    anpx::encode_frame(
        FrameType::Response,
        request_id,
        Some(MetaRef::Response(meta)),
        body,
        None,
        &mut frame,
    );
    peer.send_binary(&frame);
}

#[test]
fn our_peers_negotiate_binmeta_and_relay_heads_exactly() {
    let app = ScriptedApp::start(|x| {
        x.write(
            b"HTTP/1.1 201 Made Here\r\nSet-Cookie: a=1\r\nX-App: v\r\n\
              Set-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok",
        );
    });
    let gw = Gateway::start(&GatewayConfig::default());
    let mut rx = Receiver::start(gw.addr, app.addr, ALICE_TOKEN, 1);
    rx.wait_connected(1);
    rx.proc.wait_log(&["tunnel connected", "binmeta"]);
    let r = client::request(
        gw.addr,
        "GET",
        "/alice/a%20b/c%2Fd?x=1&x=2&y",
        &[("X-Dup", "one"), ("x-dup", "two"), ("X-Case", "KeEp")],
        &[],
    );
    assert_eq!(
        (r.status, r.reason.as_str()),
        (201, "Made Here"),
        "{}",
        r.summary()
    );
    assert_eq!(r.headers_all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(r.header("x-app"), Some("v"));
    let seen = app.next_request();
    assert_eq!(seen.target, "/alice/a%20b/c%2Fd?x=1&x=2&y");
    let dups: Vec<(&str, &str)> = seen
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-dup") || n == "X-Case")
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        dups,
        [("X-Dup", "one"), ("x-dup", "two"), ("X-Case", "KeEp")]
    );
}

#[test]
fn a_binmeta_peer_gets_the_documented_layout_and_is_answered_in_it() {
    let mut gw = Gateway::start(&GatewayConfig::default());
    let mut peer = RawPeer::connect(gw.addr, ALICE_TOKEN, "exact, stream, binmeta");
    let mut c = Conn::connect(gw.addr);
    c.write_raw(
        b"POST /alice/x%2Fy?q=%FF HTTP/1.1\r\nHost: h\r\nX-Raw: caf\xe9\r\n\
          X-Raw: second\r\nContent-Length: 3\r\n\r\nabc",
        &["POST"],
    )
    .unwrap();
    let (rid, meta) = next_request_raw(&mut peer);
    assert_eq!(meta[0], binmeta::MARKER, "binary meta expected: {meta:?}");
    let req = binmeta::Request::parse(Bytes::from(meta)).expect("valid binary meta");
    assert_eq!(req.method(), b"POST");
    assert_eq!(req.target(), b"/alice/x%2Fy?q=%FF");
    let fields: Vec<(&[u8], &[u8])> = req.fields().collect();
    let raw: Vec<&[u8]> = fields
        .iter()
        .filter(|(n, _)| *n == b"X-Raw")
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(raw, [&b"caf\xe9"[..], b"second"], "bytes and order kept");
    assert!(fields
        .iter()
        .any(|(n, v)| *n == b"x-forwarded-for" && *v == b"127.0.0.1"));

    let mut b = Builder::response(202, b"Taken", 0);
    b.field(b"X-One", b"1");
    b.field(b"x-one", b"2");
    send_response(&mut peer, &rid, b.finish_response().as_bytes(), b"done");
    let r = c.read().expect("response");
    assert_eq!(
        (r.status, r.reason.as_str()),
        (202, "Taken"),
        "{}",
        r.summary()
    );
    assert_eq!(r.headers_all("x-one"), ["1", "2"]);
    assert_eq!(r.body, b"done");

    // A binary meta that runs past its end fails that request only.
    c.send("GET", "/alice/broken", &[], &[]).unwrap();
    let (rid, _) = next_request_raw(&mut peer);
    let mut b = Builder::response(200, b"OK", 0);
    b.field(b"X-A", b"1");
    let whole = b.finish_response();
    let cut = &whole.as_bytes()[..whole.as_bytes().len() - 1];
    send_response(&mut peer, &rid, cut, b"");
    assert_eq!(c.read().expect("a 502").status, 502);
    gw.proc.wait_log(&["binary meta"]);
    c.send("GET", "/alice/after", &[], &[]).unwrap();
    let (rid, _) = next_request_raw(&mut peer);
    send_response(
        &mut peer,
        &rid,
        Builder::response(200, b"OK", 0)
            .finish_response()
            .as_bytes(),
        b"fine",
    );
    let r = c.read().expect("the tunnel still serves");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"fine"[..]));
}

#[test]
fn binmeta_without_stream_keeps_json() {
    let gw = Gateway::start(&GatewayConfig::default());
    let mut peer = RawPeer::connect(gw.addr, ALICE_TOKEN, "exact, binmeta");
    let mut c = Conn::connect(gw.addr);
    c.send("GET", "/alice/plain?a=1", &[], &[]).unwrap();
    let (rid, meta) = next_request_raw(&mut peer);
    let json: serde_json::Value = serde_json::from_slice(&meta).expect("JSON meta");
    assert_eq!(json["raw_target"], "/alice/plain?a=1");
    send_response(
        &mut peer,
        &rid,
        &common::rawpeer::resp_meta(200, &[]),
        b"ok",
    );
    assert_eq!(c.read().expect("response").status, 200);
}

/// The receiver's side at the wire: to a gateway that answered `stream,
/// binmeta` (a stand-in here) it sends `resp_meta` in the binary form,
/// with the app's status, reason and header lines as they came; to one
/// that answered `stream` only, JSON.
#[test]
fn the_receiver_answers_a_binmeta_gateway_in_binary_and_others_in_json() {
    use anp_proxy::protocol::anpx::RequestMeta;
    use common::standin::{self, read_frame};
    for (features, binary) in [("stream, binmeta", true), ("stream", false)] {
        let app = ScriptedApp::start(|x| {
            x.write(b"HTTP/1.1 201 Made It\r\nX-One: 1\r\nx-two: 2\r\nContent-Length: 2\r\n\r\nok");
        });
        let (mut s, _rx) = standin::accept_receiver(features, app.addr);
        let meta = RequestMeta {
            method: "GET".into(),
            path: "/alice/bin".into(),
            headers: vec![("host".into(), "t".into())],
            query: vec![],
            raw_target: None,
            header_list: None,
        };
        standin::send_v1_request(&mut s, "bm-1", &meta, b"");
        let f = loop {
            let f = read_frame(&mut s);
            if f.opcode == 2 {
                break f;
            }
        };
        let frame = anpx::decode_frame(&f.payload).expect("valid ANPX");
        assert_eq!(frame.ty, FrameType::Response);
        let rm = frame.resp_meta.expect("resp_meta in the first frame");
        assert_eq!(binmeta::is_binary(rm), binary, "{features}");
        if binary {
            let r = binmeta::Response::parse(Bytes::copy_from_slice(rm)).unwrap();
            assert_eq!((r.status(), r.reason()), (201, &b"Made It"[..]));
            let fields: Vec<_> = r.fields().collect();
            assert_eq!(fields[..2], [(&b"X-One"[..], &b"1"[..]), (b"x-two", b"2")]);
        } else {
            let json: serde_json::Value = serde_json::from_slice(rm).unwrap();
            assert_eq!(json["status"], 201, "{json}");
        }
    }
}
