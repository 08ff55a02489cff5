//! `zeromask` (PROTOCOL.md §7.7) at the wire: a receiver whose gateway
//! answered `zeromask` masks every frame with the all-zero key, so the
//! bytes it sends are the payload; one whose gateway did not masks with a
//! random key, as RFC 6455 has it. With our own gateway the extension is
//! negotiated, and large bodies come back whole both ways.
//!
//! A stand-in gateway (tests/common/standin.rs) reads the receiver's
//! frames off the socket; the real gateway and receiver for the rest.

mod common;

use anp_proxy::protocol::anpx::RequestMeta;
use common::app::pattern_body;
use common::scripted_app::ScriptedApp;
use common::standin::{self, read_frame};
use common::{client, Setup};

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

/// The key of the receiver's first response frame, and whether its bytes
/// on the wire were the payload itself, with the 101 answering `features`.
fn response_frame_with(features: &str) -> (Option<[u8; 4]>, bool) {
    let app = ScriptedApp::start(|x| {
        x.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello, world");
    });
    let (mut s, _rx) = standin::accept_receiver(features, app.addr);
    standin::send_v1_request(&mut s, "zm-1", &get("/alice/zm"), b"");
    let f = loop {
        let f = read_frame(&mut s);
        if f.opcode == 2 {
            break f; // binary: the ANPX response (pings are skipped)
        }
    };
    assert!(
        f.payload.windows(12).any(|w| w == b"hello, world"),
        "the response body is in the frame"
    );
    (f.key, f.sent == f.payload)
}

#[test]
fn with_zeromask_the_receiver_sends_payloads_as_they_are() {
    let (key, plain) = response_frame_with("zeromask");
    assert_eq!(key, Some([0; 4]), "MASK bit set, all-zero key");
    assert!(plain);
}

#[test]
fn without_it_the_receiver_masks_with_a_random_key() {
    let (key, plain) = response_frame_with("");
    let key = key.expect("a client's frames are masked");
    assert_ne!(key, [0; 4]);
    assert!(!plain);
}

#[test]
fn our_gateway_negotiates_it_and_large_bodies_cross_whole() {
    let mut s = Setup::new();
    let line = s.rx.proc.wait_log(&["tunnel connected", "features="]);
    assert!(line.contains("zeromask"), "{line}");
    // 3 MiB up and back: many frames, bodies as their own iovecs.
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
