//! Building frames (PROTOCOL.md §2–3) and splitting a message into chunks
//! (§5). Only tags from the §3 table are written, so any peer can read the
//! output; `chunk_tot = None` is for the negotiated `stream` extension (§7)
//! and must not be sent to a plain-v1 peer.

use bytes::{BufMut, BytesMut};
use zerocopy::IntoBytes;

use super::header::{BodyCrc, FrameType, Header, FLAG_CHUNKED, HEADER_LEN};
use super::tlv::{
    put_tlv, tlv_len, TAG_CHUNK_IDX, TAG_CHUNK_TOT, TAG_FINAL_CHUNK, TAG_HTTP_BODY, TAG_HTTP_META,
    TAG_REQUEST_ID, TAG_RESP_META, TLV_HEAD_LEN,
};

/// The reference's default `chunk_size` (§5).
pub const DEFAULT_CHUNK_SIZE: usize = 65_536;
/// Smaller `chunk_size`s are raised to this: below it the per-frame overhead
/// (~90 bytes with a UUID request_id) would dominate.
pub const MIN_CHUNK_SIZE: usize = 1024;
/// Body bytes per chunk never go below this, even when a huge request_id
/// leaves no room under `chunk_size` (those frames then exceed it).
const MIN_BODY_PER_CHUNK: usize = 256;

/// Already-serialised meta JSON; the variant picks the TLV tag (§3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaRef<'a> {
    /// `http_meta`, tag 0x02.
    Request(&'a [u8]),
    /// `resp_meta`, tag 0x04.
    Response(&'a [u8]),
}

impl MetaRef<'_> {
    fn tag_and_json(&self) -> (u8, &[u8]) {
        match *self {
            MetaRef::Request(j) => (TAG_HTTP_META, j),
            MetaRef::Response(j) => (TAG_RESP_META, j),
        }
    }

    fn wire_len(&self) -> usize {
        tlv_len(self.tag_and_json().1.len())
    }
}

/// Chunk fields of one frame of a chunked message (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    pub idx: u32,
    /// `None` only under the `stream` extension (§7).
    pub tot: Option<u32>,
    pub final_chunk: bool,
}

/// Appends one frame to `out`. Chunked (flag bit 0) iff `chunk` is `Some`.
/// The body TLV is left out when `body` is empty (§3: no body TLV = empty).
///
/// # Panics
/// If the frame would be 4 GiB or larger (`total_len` is a u32).
pub fn encode_frame(
    ty: FrameType,
    request_id: &str,
    meta: Option<MetaRef<'_>>,
    body: &[u8],
    chunk: Option<ChunkInfo>,
    out: &mut BytesMut,
) {
    encode_frame_with(ty, request_id, meta, body, chunk, BodyCrc::Computed, out);
}

/// [`encode_frame`]; with [`BodyCrc::Omitted`] (a `nocrc` tunnel) the
/// body's CRC is not computed and `body_crc` is 0.
pub fn encode_frame_with(
    ty: FrameType,
    request_id: &str,
    meta: Option<MetaRef<'_>>,
    body: &[u8],
    chunk: Option<ChunkInfo>,
    crc: BodyCrc,
    out: &mut BytesMut,
) {
    let start = out.len();
    out.reserve(frame_len(request_id, meta, body.len(), chunk));
    put_front(out, request_id, meta, chunk);
    if !body.is_empty() {
        put_tlv(out, TAG_HTTP_BODY, body);
    }
    if chunk.is_some_and(|c| c.final_chunk) {
        put_tlv(out, TAG_FINAL_CHUNK, &[1]);
    }
    let total = u32::try_from(out.len() - start).expect("ANPX frame must be shorter than 4 GiB");
    let body_crc = match crc {
        BodyCrc::Computed => crc32fast::hash(&out[start + HEADER_LEN..]),
        BodyCrc::Omitted => 0,
    };
    let flags = if chunk.is_some() { FLAG_CHUNKED } else { 0 };
    let header = Header::new(ty, flags, total, body_crc);
    out[start..start + HEADER_LEN].copy_from_slice(header.as_bytes());
}

/// The part of a frame before its body TLV: a header placeholder (filled
/// in last, it needs the length and CRC), request_id, chunk fields, meta.
fn put_front(
    out: &mut BytesMut,
    request_id: &str,
    meta: Option<MetaRef<'_>>,
    chunk: Option<ChunkInfo>,
) {
    out.put_bytes(0, HEADER_LEN);
    put_tlv(out, TAG_REQUEST_ID, request_id.as_bytes());
    if let Some(c) = chunk {
        put_tlv(out, TAG_CHUNK_IDX, &c.idx.to_be_bytes());
        if let Some(tot) = c.tot {
            put_tlv(out, TAG_CHUNK_TOT, &tot.to_be_bytes());
        }
    }
    if let Some(m) = meta {
        let (tag, json) = m.tag_and_json();
        put_tlv(out, tag, json);
    }
}

/// [`encode_frame`] without copying the body: appends to `out` the frame
/// as it is before the body bytes (header, TLVs, the body TLV's tag and
/// length) and after them (the final-chunk TLV), and returns the offset in
/// `out` where the body goes. The frame on the wire is
/// `out[..split] ++ body ++ out[split..]`; the header's `body_crc` covers
/// it all (or is 0: [`BodyCrc::Omitted`], a `nocrc` tunnel).
/// `out` must be empty (it becomes the frame's head buffer).
pub fn encode_frame_split(
    ty: FrameType,
    request_id: &str,
    meta: Option<MetaRef<'_>>,
    body: &[u8],
    chunk: Option<ChunkInfo>,
    crc: BodyCrc,
    out: &mut BytesMut,
) -> usize {
    debug_assert!(out.is_empty());
    out.reserve(frame_len(request_id, meta, 0, chunk) + TLV_HEAD_LEN);
    put_front(out, request_id, meta, chunk);
    if !body.is_empty() {
        let len = u32::try_from(body.len()).expect("TLV value must be shorter than 4 GiB");
        out.put_u8(TAG_HTTP_BODY);
        out.put_u32(len);
    }
    let split = out.len();
    if chunk.is_some_and(|c| c.final_chunk) {
        put_tlv(out, TAG_FINAL_CHUNK, &[1]);
    }
    let total =
        u32::try_from(out.len() + body.len()).expect("ANPX frame must be shorter than 4 GiB");
    let body_crc = match crc {
        BodyCrc::Computed => {
            let mut h = crc32fast::Hasher::new();
            h.update(&out[HEADER_LEN..split]);
            h.update(body);
            h.update(&out[split..]);
            h.finalize()
        }
        BodyCrc::Omitted => 0,
    };
    let flags = if chunk.is_some() { FLAG_CHUNKED } else { 0 };
    let header = Header::new(ty, flags, total, body_crc);
    out[..HEADER_LEN].copy_from_slice(header.as_bytes());
    split
}

/// Bytes [`encode_frame`] will append for these inputs.
pub fn frame_len(
    request_id: &str,
    meta: Option<MetaRef<'_>>,
    body_len: usize,
    chunk: Option<ChunkInfo>,
) -> usize {
    let mut n = HEADER_LEN + tlv_len(request_id.len());
    if let Some(m) = meta {
        n += m.wire_len();
    }
    if body_len > 0 {
        n += tlv_len(body_len);
    }
    if let Some(c) = chunk {
        n += tlv_len(4);
        if c.tot.is_some() {
            n += tlv_len(4);
        }
        if c.final_chunk {
            n += tlv_len(1);
        }
    }
    n
}

/// Encodes a whole message, pushing one `BytesMut` per WebSocket message.
///
/// If the message fits in one frame of at most `chunk_size` bytes it is sent
/// unchunked. Otherwise it is split (§5): every frame carries request_id,
/// chunk_idx and chunk_tot, the meta rides in chunk 0 (so a gateway can start
/// answering early, unlike the reference which sends resp_meta last), and
/// the last frame has final_chunk = 1. Each frame is at most `chunk_size`
/// bytes, except that chunk 0 always carries the whole meta: a meta (or
/// request_id) too big for `chunk_size` gives a larger frame, since a meta
/// cannot be split.
///
/// `chunk_size` below [`MIN_CHUNK_SIZE`] is raised to it.
pub fn encode_message(
    ty: FrameType,
    request_id: &str,
    meta: Option<MetaRef<'_>>,
    body: &[u8],
    chunk_size: usize,
    out: &mut Vec<BytesMut>,
) {
    encode_message_with(
        ty,
        request_id,
        meta,
        body,
        chunk_size,
        BodyCrc::Computed,
        |f| out.push(f),
    );
}

/// [`encode_message`], each frame handed to `emit` as it is made (no
/// vector of frames: the usual message is one frame); `crc`: body CRCs
/// computed, or left 0 on a `nocrc` tunnel.
pub fn encode_message_with(
    ty: FrameType,
    request_id: &str,
    meta: Option<MetaRef<'_>>,
    body: &[u8],
    chunk_size: usize,
    crc: BodyCrc,
    mut emit: impl FnMut(BytesMut),
) {
    let chunk_size = chunk_size.max(MIN_CHUNK_SIZE);
    if frame_len(request_id, meta, body.len(), None) <= chunk_size {
        let mut frame = crate::pool::frame_heads::take();
        encode_frame_with(ty, request_id, meta, body, None, crc, &mut frame);
        emit(frame);
        return;
    }
    // Room is budgeted as if every frame had chunk_tot, final_chunk and a
    // body TLV head: a few bytes lost per frame buys a chunk count known
    // before the first frame is written (chunk_tot is on every frame).
    let fixed = HEADER_LEN + tlv_len(request_id.len()) + 2 * tlv_len(4) + tlv_len(1) + TLV_HEAD_LEN;
    let per_chunk = chunk_size.saturating_sub(fixed).max(MIN_BODY_PER_CHUNK);
    let meta_len = meta.map_or(0, |m| m.wire_len());
    let first = chunk_size.saturating_sub(fixed + meta_len).min(body.len());
    let rest = body.len() - first;
    let tot = u32::try_from(1 + rest.div_ceil(per_chunk)).expect("chunk count fits u32");

    let slices = std::iter::once(&body[..first]).chain(body[first..].chunks(per_chunk));
    for (idx, slice) in (0..tot).zip(slices) {
        let chunk = ChunkInfo {
            idx,
            tot: Some(tot),
            final_chunk: idx + 1 == tot,
        };
        let meta = if idx == 0 { meta } else { None };
        let mut frame = crate::pool::frame_heads::take();
        encode_frame_with(ty, request_id, meta, slice, Some(chunk), crc, &mut frame);
        emit(frame);
    }
}

/// An unchunked error frame (type 0xFF); the message travels in the
/// http_body TLV (§3). Under the `cancel` extension (§7) the same frame sent
/// by the gateway means "the client went away".
pub fn encode_error(request_id: &str, message: &str) -> BytesMut {
    let mut out = BytesMut::new();
    encode_frame(
        FrameType::Error,
        request_id,
        None,
        message.as_bytes(),
        None,
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::anpx::decode::decode_frame;

    #[test]
    fn empty_body_has_no_body_tlv() {
        let mut out = Vec::new();
        encode_message(
            FrameType::Response,
            "r",
            Some(MetaRef::Response(b"{}")),
            b"",
            0,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].len(),
            frame_len("r", Some(MetaRef::Response(b"{}")), 0, None)
        );
        let f = decode_frame(&out[0]).unwrap();
        assert_eq!(
            (f.body, f.resp_meta, f.chunked),
            (None, Some(&b"{}"[..]), false)
        );
    }

    #[test]
    fn frame_len_matches_output() {
        let chunk = Some(ChunkInfo {
            idx: 3,
            tot: None,
            final_chunk: true,
        });
        let mut out = BytesMut::from(&b"prefix"[..]);
        encode_frame(
            FrameType::Request,
            "id",
            Some(MetaRef::Request(b"{}")),
            b"abc",
            chunk,
            &mut out,
        );
        assert_eq!(
            out.len() - 6,
            frame_len("id", Some(MetaRef::Request(b"{}")), 3, chunk)
        );
        let f = decode_frame(&out[6..]).unwrap();
        assert_eq!(
            (f.chunk_idx, f.chunk_tot, f.final_chunk),
            (Some(3), None, true)
        );
    }

    #[test]
    fn small_chunk_size_is_raised_and_frames_fit() {
        let body = vec![7u8; 10_000];
        let mut out = Vec::new();
        encode_message(
            FrameType::Request,
            "id",
            Some(MetaRef::Request(b"{}")),
            &body,
            10,
            &mut out,
        );
        assert!(out.len() > 1);
        let mut joined = Vec::new();
        for (i, frame) in out.iter().enumerate() {
            assert!(
                frame.len() <= MIN_CHUNK_SIZE,
                "frame {i} is {} bytes",
                frame.len()
            );
            let f = decode_frame(frame).unwrap();
            assert_eq!(f.chunk_idx, Some(i as u32));
            assert_eq!(f.chunk_tot, Some(out.len() as u32));
            assert_eq!(f.final_chunk, i + 1 == out.len());
            assert_eq!(f.http_meta.is_some(), i == 0);
            joined.extend_from_slice(f.body.unwrap_or_default());
        }
        assert_eq!(joined, body);
    }

    #[test]
    fn oversized_meta_goes_alone_in_chunk_zero() {
        let meta = vec![b' '; 2000];
        let mut out = Vec::new();
        encode_message(
            FrameType::Response,
            "id",
            Some(MetaRef::Response(&meta)),
            b"xy",
            1024,
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(decode_frame(&out[0]).unwrap().body, None);
        assert_eq!(decode_frame(&out[1]).unwrap().body, Some(&b"xy"[..]));
    }

    #[test]
    fn error_frame() {
        let f = encode_error("rid", "boom");
        let d = decode_frame(&f).unwrap();
        assert_eq!(
            (d.ty, d.request_id, d.body),
            (FrameType::Error, Some("rid"), Some(&b"boom"[..]))
        );
    }

    #[test]
    fn split_encoding_is_the_same_frame() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        for (meta, body, chunk) in [
            (
                None,
                &body[..],
                Some(ChunkInfo {
                    idx: 3,
                    tot: None,
                    final_chunk: true,
                }),
            ),
            (
                Some(MetaRef::Request(b"{\"a\":1}")),
                &body[..10],
                Some(ChunkInfo {
                    idx: 0,
                    tot: None,
                    final_chunk: false,
                }),
            ),
            (
                None,
                &[][..],
                Some(ChunkInfo {
                    idx: 9,
                    tot: Some(10),
                    final_chunk: true,
                }),
            ),
            (Some(MetaRef::Response(b"{}")), &body[..], None),
        ] {
            let mut whole = BytesMut::new();
            encode_frame(FrameType::Request, "rid-1", meta, body, chunk, &mut whole);
            let mut head = BytesMut::new();
            let split = encode_frame_split(
                FrameType::Request,
                "rid-1",
                meta,
                body,
                chunk,
                BodyCrc::Computed,
                &mut head,
            );
            let mut joined = head[..split].to_vec();
            joined.extend_from_slice(body);
            joined.extend_from_slice(&head[split..]);
            assert_eq!(joined, whole.to_vec());
        }
    }
}
