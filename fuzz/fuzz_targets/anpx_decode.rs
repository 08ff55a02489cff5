//! ANPX frame decoder (PROTOCOL.md §2–3) and the `stream` classifier.
//!
//! Each input is decoded twice: as received (header, CRC and length checks)
//! and with the header fixed up (`fix_anpx_frame`) so mutations reach the
//! TLV walk. Invariants beyond "no panic": a decoded frame borrows only from
//! the message and the message is exactly `total_len` long; re-encoding
//! what was decoded decodes to the same fields; `classify` agrees with
//! `decode_frame` on the request id.
#![no_main]

use anp_proxy::protocol::anpx::{
    decode_frame, decode_frame_with, encode_frame, BodyCrc, ChunkInfo, Frame, FrameType, MetaRef,
};
use anp_proxy::protocol::stream::{classify, Incoming};
use anp_proxy_fuzz::{fix_anpx_frame, within, ANPX_HEADER_LEN};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut fixed = data.to_vec();
    fix_anpx_frame(&mut fixed);
    if fixed != data {
        check(&fixed);
    }
    // `nocrc` (PROTOCOL.md §7.9): the same frame with body_crc 0 decodes
    // on a tunnel that negotiated it, to the same fields.
    if fixed.len() >= ANPX_HEADER_LEN {
        let with_crc = decode_frame(&fixed)
            .ok()
            .map(|f| f.request_id.map(str::to_owned));
        fixed[16..20].fill(0);
        if let Ok(f) = decode_frame_with(&fixed, BodyCrc::Omitted) {
            assert!(f.body.is_none_or(|b| within(&fixed[ANPX_HEADER_LEN..], b)));
            if let Some(id) = with_crc {
                assert_eq!(f.request_id, id.as_deref(), "nocrc decodes the same frame");
            }
        } else {
            assert!(with_crc.is_none(), "a valid frame refused with body_crc 0 under nocrc");
        }
    }
});

fn check(msg: &[u8]) {
    let Ok(frame) = decode_frame(msg) else {
        return;
    };
    assert!(msg.len() >= ANPX_HEADER_LEN);
    let total = u32::from_be_bytes([msg[8], msg[9], msg[10], msg[11]]);
    assert_eq!(
        total as usize,
        msg.len(),
        "decoded a frame whose total_len is not its length"
    );
    for s in [frame.http_meta, frame.resp_meta, frame.body]
        .into_iter()
        .flatten()
    {
        assert!(
            within(&msg[ANPX_HEADER_LEN..], s),
            "field outside the frame body"
        );
    }
    if let Some(id) = frame.request_id {
        assert!(within(&msg[ANPX_HEADER_LEN..], id.as_bytes()));
    }
    if frame.chunked {
        assert!(frame.chunk_idx.is_some(), "chunked frame without chunk_idx");
    }
    round_trip(&frame);

    let bytes = Bytes::copy_from_slice(msg);
    for expect in [FrameType::Request, FrameType::Response] {
        match classify(&bytes, expect, BodyCrc::Computed) {
            Ok(Incoming::Whole {
                request_id,
                meta,
                body,
            })
            | Ok(Incoming::Start {
                request_id,
                meta,
                body,
                ..
            }) => {
                assert_eq!(Some(request_id.as_str()), frame.request_id);
                assert!(within(&bytes, &meta) && within(&bytes, &body));
            }
            Ok(Incoming::More {
                request_id,
                idx,
                body,
                ..
            }) => {
                assert_eq!(Some(request_id.as_str()), frame.request_id);
                assert!(idx > 0 && within(&bytes, &body));
            }
            Ok(Incoming::Error { request_id, .. }) => {
                assert_eq!(frame.ty, FrameType::Error);
                assert_eq!(Some(request_id.as_str()), frame.request_id);
            }
            Err(_) => {}
        }
    }
}

/// Encodes the fields `encode_frame` can express and decodes them again.
fn round_trip(f: &Frame<'_>) {
    let Some(id) = f.request_id else { return };
    let meta = match (f.ty, f.http_meta, f.resp_meta) {
        (_, Some(_), Some(_)) => return, // both metas: not something we send
        (FrameType::Error, Some(_), _) | (FrameType::Error, _, Some(_)) => return,
        (_, Some(m), None) => Some(MetaRef::Request(m)),
        (_, None, Some(m)) => Some(MetaRef::Response(m)),
        (_, None, None) => None,
    };
    let chunk = if f.chunked {
        Some(ChunkInfo {
            idx: f.chunk_idx.expect("checked above"),
            tot: f.chunk_tot,
            final_chunk: f.final_chunk,
        })
    } else if f.chunk_idx.is_some() || f.chunk_tot.is_some() || f.final_chunk {
        return; // chunk fields on an unchunked frame are not re-encoded
    } else {
        None
    };
    let body = f.body.unwrap_or_default();
    let mut out = BytesMut::new();
    encode_frame(f.ty, id, meta, body, chunk, &mut out);
    let g = decode_frame(&out).expect("a re-encoded frame must decode");
    assert_eq!(g.ty, f.ty);
    assert_eq!(g.chunked, f.chunked);
    assert_eq!(g.request_id, f.request_id);
    assert_eq!(g.http_meta, f.http_meta);
    assert_eq!(g.resp_meta, f.resp_meta);
    assert_eq!(g.body.unwrap_or_default(), body);
    assert_eq!(g.chunk_idx, f.chunk_idx);
    assert_eq!(g.chunk_tot, f.chunk_tot);
    assert_eq!(g.final_chunk, f.final_chunk);
}
