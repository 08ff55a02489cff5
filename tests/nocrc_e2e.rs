//! `nocrc` (PROTOCOL.md §7.9) at the wire: a receiver whose gateway
//! answered `nocrc` sends its response frames with `body_crc` 0; one whose
//! gateway did not computes every body CRC, as ANPX v1 has it. Our gateway
//! negotiates it unless `tunnel_body_crc = true`, and large bodies cross
//! whole both ways either way.
//!
//! A stand-in gateway (tests/common/standin.rs) reads the receiver's
//! frames off the socket; the real gateway and receiver for the rest.

mod common;

use anp_proxy::protocol::anpx::{self, BodyCrc};
use common::standin;
use common::{GatewayConfig, Setup};

/// The receiver's response frame (the ANPX message), with the 101
/// answering `features`.
fn response_frame_with(features: &str) -> Vec<u8> {
    standin::first_response_frame(
        features,
        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhello, world",
    )
    .payload
}

/// Bytes 16..20 of the ANPX header.
fn body_crc(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[16..20].try_into().unwrap())
}

#[test]
fn with_nocrc_the_receiver_leaves_the_body_crc_zero() {
    let f = response_frame_with("stream, nocrc");
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

#[test]
fn our_gateway_negotiates_it_and_large_bodies_cross_whole() {
    let mut s = Setup::new();
    let line = s.rx.proc.wait_log(&["tunnel connected", "features="]);
    assert!(line.contains("nocrc"), "{line}");
    s.large_bodies_cross_whole();
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
    s.large_bodies_cross_whole();
}
