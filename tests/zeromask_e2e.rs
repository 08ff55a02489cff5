//! `zeromask` (PROTOCOL.md §7.7) at the wire: a receiver whose gateway
//! answered `zeromask` masks every frame with the all-zero key, so the
//! bytes it sends are the payload; one whose gateway did not masks with a
//! random key, as RFC 6455 has it. With our own gateway the extension is
//! negotiated, and large bodies come back whole both ways.
//!
//! A stand-in gateway (tests/common/standin.rs) reads the receiver's
//! frames off the socket; the real gateway and receiver for the rest.

mod common;

use common::standin;
use common::Setup;

/// The key of the receiver's first response frame, and whether its bytes
/// on the wire were the payload itself, with the 101 answering `features`.
fn response_frame_with(features: &str) -> (Option<[u8; 4]>, bool) {
    let f = standin::first_response_frame(
        features,
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello, world",
    );
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
    // Bodies as their own iovecs, many frames each way.
    s.large_bodies_cross_whole();
}
