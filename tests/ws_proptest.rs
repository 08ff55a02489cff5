//! Property tests of the WebSocket frame codec (RFC 6455 §5): what the
//! encoders write, the decoder reads back, however the bytes are split
//! across reads; the mask is an involution; junk never panics.

use anp_proxy::ws::{
    apply_mask, encode_frame, encode_raw_frame, Decoder, Event, Limits, OpCodeKind, Role,
};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    max_frame_payload: 1 << 20,
    max_message: 1 << 20,
    max_fragments: 1 << 10,
};

/// One message the sender writes.
#[derive(Debug, Clone)]
enum Msg {
    /// A data message, split into fragments at `cuts` (byte offsets, any
    /// order, duplicates allowed: they make empty fragments), with pings
    /// injected after the fragments listed in `pings_after`.
    Data {
        text: bool,
        payload: Vec<u8>,
        cuts: Vec<usize>,
        pings_after: Vec<usize>,
    },
    /// A standalone ping.
    Ping(Vec<u8>),
}

fn msg() -> impl Strategy<Value = Msg> {
    let data = (
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..600),
        ".{0,200}",
        prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
    )
        .prop_map(|(text, bin, s, cuts, pings)| {
            // Text must be UTF-8; cuts may land inside a code point, which
            // is legal for fragments (RFC 6455 §5.6 validates the message).
            let payload = if text { s.into_bytes() } else { bin };
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
            let pings_after = pings.iter().map(|i| i.index(cuts.len() + 1)).collect();
            Msg::Data {
                text,
                payload,
                cuts,
                pings_after,
            }
        });
    prop_oneof![
        4 => data,
        1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
    ]
}

/// Encode as a client (masked, random key per frame) and list the events
/// the peer's decoder must produce.
fn encode(msgs: &[Msg]) -> (BytesMut, Vec<Event>) {
    let mut out = BytesMut::new();
    let mut expected = Vec::new();
    let ping = |out: &mut BytesMut, expected: &mut Vec<Event>, n: usize| {
        let body = vec![n as u8; n % 7];
        encode_frame(out, Role::Client, OpCodeKind::Ping, &body);
        expected.push(Event::Ping(body.into()));
    };
    for m in msgs {
        match m {
            Msg::Ping(p) => {
                encode_frame(&mut out, Role::Client, OpCodeKind::Ping, p);
                expected.push(Event::Ping(Bytes::copy_from_slice(p)));
            }
            Msg::Data {
                text,
                payload,
                cuts,
                pings_after,
            } => {
                let mut bounds = cuts.clone();
                bounds.sort_unstable();
                bounds.push(payload.len());
                let mut start = 0;
                for (i, &end) in bounds.iter().enumerate() {
                    let first = i == 0;
                    let last = i + 1 == bounds.len();
                    let opcode = match (first, text) {
                        (false, _) => OpCodeKind::Continuation,
                        (true, true) => OpCodeKind::Text,
                        (true, false) => OpCodeKind::Binary,
                    };
                    encode_raw_frame(
                        &mut out,
                        opcode,
                        last,
                        &payload[start..end],
                        Some(rand::random()),
                    );
                    start = end;
                    if !last {
                        for _ in pings_after.iter().filter(|&&p| p == i) {
                            ping(&mut out, &mut expected, i);
                        }
                    }
                }
                let body = Bytes::copy_from_slice(payload);
                expected.push(if *text {
                    Event::Text(body)
                } else {
                    Event::Binary(body)
                });
            }
        }
    }
    (out, expected)
}

/// Feed `wire` to a decoder in reads of the given sizes (cycled), draining
/// events after each read, as the IO loop does.
fn decode_in_pieces(role: Role, wire: &[u8], sizes: &[usize]) -> Result<Vec<Event>, String> {
    let mut dec = Decoder::new(role, LIMITS);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    let mut pos = 0;
    let mut sizes = sizes.iter().cycle();
    while pos < wire.len() {
        let n = (*sizes.next().unwrap()).min(wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(ev)) => events.push(ev),
                Ok(None) => {
                    // Ok(None) may consume whole non-final fragments, never
                    // a partial frame, and must ask for at least one byte.
                    if dec.needed() == 0 {
                        return Err("Ok(None) with needed() == 0".into());
                    }
                    if !dec.in_message() && buf.len() != before {
                        return Err("consumed bytes without an event or open message".into());
                    }
                    break;
                }
                Err(e) => return Err(format!("decode error: {e}")),
            }
        }
    }
    if !buf.is_empty() || dec.in_message() {
        return Err(format!(
            "{} bytes left, in_message={}",
            buf.len(),
            dec.in_message()
        ));
    }
    Ok(events)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn messages_survive_arbitrary_splits(
        msgs in prop::collection::vec(msg(), 1..8),
        sizes in prop::collection::vec(1usize..300, 1..16),
    ) {
        let (wire, expected) = encode(&msgs);
        let got = decode_in_pieces(Role::Server, &wire, &sizes);
        prop_assert_eq!(got, Ok(expected));
    }

    #[test]
    fn server_frames_decode_on_the_client(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..70_000), 1..4),
        size in 1usize..5000,
    ) {
        let mut wire = BytesMut::new();
        for p in &payloads {
            encode_frame(&mut wire, Role::Server, OpCodeKind::Binary, p);
        }
        let expected: Vec<Event> =
            payloads.iter().map(|p| Event::Binary(Bytes::copy_from_slice(p))).collect();
        prop_assert_eq!(decode_in_pieces(Role::Client, &wire, &[size]), Ok(expected));
    }

    #[test]
    fn mask_twice_is_identity(data in prop::collection::vec(any::<u8>(), 0..200), key: [u8; 4]) {
        let mut buf = data.clone();
        apply_mask(&mut buf, key);
        let naive: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
        prop_assert_eq!(&buf, &naive);
        apply_mask(&mut buf, key);
        prop_assert_eq!(buf, data);
    }

    #[test]
    fn random_bytes_never_panic(
        junk in prop::collection::vec(any::<u8>(), 0..400),
        server: bool,
        max in 0usize..300,
    ) {
        let role = if server { Role::Server } else { Role::Client };
        let limits = Limits { max_frame_payload: max, max_message: max, max_fragments: 4 };
        let mut dec = Decoder::new(role, limits);
        let mut buf = BytesMut::from(&junk[..]);
        // Each event consumes at least a 2-byte header, so this ends.
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
        prop_assert!(buf.len() <= junk.len());
    }

    #[test]
    fn valid_prefix_then_junk_never_panics(
        msgs in prop::collection::vec(msg(), 1..4),
        junk in prop::collection::vec(any::<u8>(), 0..64),
        flip in any::<prop::sample::Index>(),
    ) {
        // Corrupt one byte of a valid stream: decoding may fail, must not panic.
        let (mut wire, _) = encode(&msgs);
        let at = flip.index(wire.len());
        wire[at] ^= 0x5a;
        wire.extend_from_slice(&junk);
        let mut dec = Decoder::new(Role::Server, LIMITS);
        while let Ok(Some(_)) = dec.decode(&mut wire) {}
    }
}
