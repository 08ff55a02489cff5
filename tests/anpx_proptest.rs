//! Properties of the ANPX codec (PROTOCOL.md §2–5, §7): whatever we encode,
//! at any chunk size and in any arrival order, reassembles to the input; and
//! damaged or arbitrary input never panics the decoder.

use std::collections::HashSet;

use anp_proxy::protocol::anpx::{
    decode_frame, encode_error, encode_message, latin1_to_string, FrameType, Header, Limits,
    Message, MetaRef, Reassembler, RequestMeta, ResponseMeta, HEADER_LEN,
};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use zerocopy::IntoBytes;

const LIMITS: Limits = Limits {
    max_message_size: 1 << 20,
    max_assemblies: 8,
};

/// Deterministic filler: proptest-generating 300 KiB byte by byte is slow.
fn bytes_from_seed(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Fisher–Yates with the same generator.
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.swap(i, (seed >> 33) as usize % (i + 1));
    }
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![0..2_000usize, 0..300 * 1024usize];
    (len, any::<u64>()).prop_map(|(len, seed)| bytes_from_seed(len, seed | 1))
}

fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}"
}

/// A flat JSON object: keys unique, first occurrence kept (duplicates would
/// collapse on decode, by design).
fn flat(key: BoxedStrategy<String>) -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((key, ".{0,40}"), 0..8).prop_map(|v| {
        let mut seen = HashSet::new();
        v.into_iter()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect()
    })
}

/// `exact` header list: names drawn so that duplicates are common.
fn header_list() -> impl Strategy<Value = Option<Vec<(String, String)>>> {
    let name = prop_oneof![
        Just("Set-Cookie".to_owned()),
        Just("x-a".to_owned()),
        token()
    ];
    prop::option::of(prop::collection::vec((name, ".{0,40}"), 0..8))
}

fn request_meta() -> impl Strategy<Value = RequestMeta> {
    let raw = prop::option::of(prop::collection::vec(any::<u8>(), 0..80))
        .prop_map(|o| o.map(|b| latin1_to_string(&b)));
    (
        "[A-Z]{1,10}",
        "/.{0,60}",
        flat(token().boxed()),
        flat(".{0,12}".boxed()),
        raw,
        header_list(),
    )
        .prop_map(
            |(method, path, headers, query, raw_target, header_list)| RequestMeta {
                method,
                path,
                headers,
                query,
                raw_target,
                header_list,
            },
        )
}

fn response_meta() -> impl Strategy<Value = ResponseMeta> {
    (
        100u16..=999,
        ".{0,30}",
        flat(token().boxed()),
        header_list(),
    )
        .prop_map(|(status, reason, headers, header_list)| ResponseMeta {
            status,
            reason,
            headers,
            header_list,
        })
}

fn request_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        ".{1,40}"
    ]
}

/// Encodes, checks frame sizes, pushes in shuffled order, returns the message.
fn round_trip(
    ty: FrameType,
    rid: &str,
    meta: MetaRef<'_>,
    body: &[u8],
    chunk_size: usize,
    order: u64,
) -> Result<Message, TestCaseError> {
    let mut frames = Vec::new();
    encode_message(ty, rid, Some(meta), body, chunk_size, &mut frames);
    let meta_len = match meta {
        MetaRef::Request(j) | MetaRef::Response(j) => j.len(),
    };
    // Only chunk 0 may exceed chunk_size, and only when the meta alone
    // (with the chunk fields) does not fit.
    let meta_frame = HEADER_LEN + 5 + rid.len() + 3 * 9 + 5 + meta_len;
    for (i, f) in frames.iter().enumerate() {
        let bound = if i == 0 {
            chunk_size.max(meta_frame)
        } else {
            chunk_size
        };
        prop_assert!(f.len() <= bound, "frame {i}: {} > {bound}", f.len());
    }
    let mut frames: Vec<Bytes> = frames.into_iter().map(BytesMut::freeze).collect();
    shuffle(&mut frames, order);
    let mut r = Reassembler::new(LIMITS);
    let last = frames.pop().expect("at least one frame");
    for f in frames {
        prop_assert_eq!(
            r.push(f).map_err(|e| TestCaseError::fail(e.to_string()))?,
            None
        );
    }
    let msg = r
        .push(last)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(r.is_empty());
    msg.ok_or_else(|| TestCaseError::fail("incomplete after every frame"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn request_round_trip(
        rid in request_id(),
        meta in request_meta(),
        body in body(),
        chunk_size in 1024usize..=70_000,
        order in any::<u64>(),
    ) {
        let mut json = Vec::new();
        meta.to_json(&mut json);
        let got = round_trip(FrameType::Request, &rid, MetaRef::Request(&json), &body, chunk_size, order)?;
        prop_assert_eq!(got, Message::Request { request_id: rid, meta, body: body.into() });
    }

    #[test]
    fn response_round_trip(
        rid in request_id(),
        meta in response_meta(),
        body in body(),
        chunk_size in 1024usize..=70_000,
        order in any::<u64>(),
    ) {
        let mut json = Vec::new();
        meta.to_json(&mut json);
        let got = round_trip(FrameType::Response, &rid, MetaRef::Response(&json), &body, chunk_size, order)?;
        prop_assert_eq!(got, Message::Response { request_id: rid, meta, body: body.into() });
    }
}

proptest! {
    #[test]
    fn error_round_trip(rid in request_id(), text in ".{0,200}") {
        let got = Reassembler::new(LIMITS).push(encode_error(&rid, &text).freeze());
        prop_assert_eq!(got, Ok(Some(Message::Error { request_id: rid, message: text })));
    }

    /// Any single damaged byte is caught by magic/version/CRC/length checks,
    /// except the 4 padding bytes, which are ignored (§2).
    #[test]
    fn single_byte_corruption_is_detected(
        body_len in 0usize..5_000,
        chunk_size in 1024usize..4_096,
        pick in any::<prop::sample::Index>(),
        pos in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let json = br#"{"status":200,"reason":"OK","headers":{}}"#;
        let mut frames = Vec::new();
        encode_message(FrameType::Response, "rid", Some(MetaRef::Response(json)), &bytes_from_seed(body_len, 7), chunk_size, &mut frames);
        let which = pick.index(frames.len());
        let original = frames[which].clone();
        let at = pos.index(original.len());
        let mut bad = original.to_vec();
        bad[at] ^= mask;
        let decoded = decode_frame(&bad);
        if (20..24).contains(&at) {
            prop_assert_eq!(decoded, decode_frame(&original));
        } else {
            prop_assert!(decoded.is_err(), "byte {} of frame {} changed unnoticed", at, which);
        }
        // And the reassembler survives it among the good frames.
        let mut r = Reassembler::new(LIMITS);
        for (i, f) in frames.into_iter().enumerate() {
            let f = if i == which { Bytes::from(bad.clone()) } else { f.freeze() };
            let _ = r.push(f);
        }
    }

    #[test]
    fn truncated_or_extended_frames_are_refused(cut in any::<prop::sample::Index>(), extra in 1usize..8) {
        let frame = encode_error("rid", "some error text");
        let n = cut.index(frame.len());
        prop_assert!(decode_frame(&frame[..n]).is_err());
        let mut longer = frame.to_vec();
        longer.extend(std::iter::repeat_n(0u8, extra));
        prop_assert_eq!(decode_frame(&longer).unwrap_err().kind(), "total length");
    }

    /// Arbitrary TLV bytes behind a valid header (right CRCs and length):
    /// the TLV walker and the reassembler return, whatever the bytes.
    #[test]
    fn arbitrary_tlv_bodies_never_panic(
        tlvs in prop::collection::vec(any::<u8>(), 0..300),
        ty in prop_oneof![Just(FrameType::Request), Just(FrameType::Response), Just(FrameType::Error)],
        flags in any::<u8>(),
    ) {
        let header = Header::new(ty, flags, (HEADER_LEN + tlvs.len()) as u32, crc32fast::hash(&tlvs));
        let mut msg = header.as_bytes().to_vec();
        msg.extend_from_slice(&tlvs);
        let _ = decode_frame(&msg);
        let _ = Reassembler::new(LIMITS).push(Bytes::from(msg));
    }
}
