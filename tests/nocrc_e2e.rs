//! `nocrc` (PROTOCOL.md §7.9) at the wire: a receiver whose gateway
//! answered `nocrc` sends its response frames with `body_crc` 0; one whose
//! gateway did not computes every body CRC, as ANPX v1 has it. Our gateway
//! negotiates it unless `tunnel_body_crc = true`, and large bodies cross
//! whole both ways either way.
//!
//! A stand-in gateway (tests/common/standin.rs) reads the receiver's
//! frames off the socket; the real gateway and receiver for the rest.

mod common;

use anp_proxy::protocol::anpx::{self, BodyCrc, RequestMeta};
use common::app::pattern_body;
use common::scripted_app::ScriptedApp;
use common::standin::{self, read_frame};
use common::{client, GatewayConfig, Setup};

fn get(path: &str) -> RequestMeta {
    RequestMeta {
        method: "GET".into(),
        path: path.into(),
        headers: vec![("host".into(), "t".into())],
        query: vec![],
        raw_target: None,
        header_list: None,
    }
}

/// The receiver's response frame (the ANPX message), with the 101
/// answering `features`.
fn response_frame_with(features: &str) -> Vec<u8> {
    let app = ScriptedApp::start(|x| {
        x.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello, world");
    });
    let (mut s, _rx) = standin::accept_receiver(features, app.addr);
    standin::send_v1_request(&mut s, "nc-1", &get("/alice/nc"), b"");
    loop {
        let f = read_frame(&mut s);
        if f.opcode == 2 {
            return f.payload; // binary: the ANPX response (pings skipped)
        }
    }
}

/// Bytes 16..20 of the ANPX header.
fn body_crc(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[16..20].try_into().unwrap())
}

#[test]
fn with_nocrc_the_receiver_leaves_the_body_crc_zero() {
    let f = response_frame_with("nocrc");
    assert_eq!(body_crc(&f), 0, "body CRC not computed");
    let d = anpx::decode_frame_with(&f, BodyCrc::Omitted).expect("header CRC still valid");
    assert_eq!(d.body, Some(&b"hello, world"[..]));
    assert!(
        anpx::decode_frame(&f).is_err(),
        "a peer that did not negotiate it would refuse the frame"
    );
}

#[test]
fn without_it_every_body_crc_is_computed() {
    let f = response_frame_with("");
    assert_ne!(body_crc(&f), 0);
    let d = anpx::decode_frame(&f).expect("a v1 gateway checks and accepts it");
    assert_eq!(d.body, Some(&b"hello, world"[..]));
}

/// 3 MiB up and back and 2 MiB down: many frames, in both directions.
fn large_bodies_cross_whole(s: &Setup) {
    let body = pattern_body(3 << 20);
    let r = client::request(s.gw.addr, "POST", "/alice/echo", &[], &body);
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(r.body == body, "the echoed body differs");
    let r = client::request(
        s.gw.addr,
        "GET",
        "/alice/big",
        &[("X-Test-Body-Len", "2097152")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(r.body == pattern_body(2 << 20), "the app's body differs");
}

#[test]
fn our_gateway_negotiates_it_and_large_bodies_cross_whole() {
    let mut s = Setup::new();
    let line = s.rx.proc.wait_log(&["tunnel connected", "features="]);
    assert!(line.contains("nocrc"), "{line}");
    large_bodies_cross_whole(&s);
}

#[test]
fn tunnel_body_crc_keeps_every_body_crc() {
    let cfg = GatewayConfig {
        extra_gateway_toml: "tunnel_body_crc = true\n".into(),
        ..GatewayConfig::default()
    };
    let mut s = Setup::with(&cfg, 1);
    let line = s.rx.proc.wait_log(&["tunnel connected", "features="]);
    assert!(!line.contains("nocrc"), "{line}");
    assert!(line.contains("stream"), "{line}");
    large_bodies_cross_whole(&s);
}
