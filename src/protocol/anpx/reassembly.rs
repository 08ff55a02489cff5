//! Turning frames into whole messages (PROTOCOL.md §5). Sans-IO: the caller
//! pushes each WebSocket binary message and gets a message when one is
//! complete. Memory is bounded by [`Limits`]; an error for one request drops
//! only that request's partial state.
//!
//! Bodies are never copied for unchunked frames (the body is a slice of the
//! WebSocket message); a chunked body is copied once, when complete.

use std::collections::{BTreeMap, HashMap};

use bytes::{Bytes, BytesMut};

use super::decode::{decode_frame, Frame};
use super::error::ReassemblyError;
use super::header::FrameType;
use super::meta::{RequestMeta, ResponseMeta};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest body of one message, in bytes.
    pub max_message_size: usize,
    /// Most chunked messages held incomplete at once.
    pub max_assemblies: usize,
}

/// A complete message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Request {
        request_id: String,
        meta: RequestMeta,
        body: Bytes,
    },
    Response {
        request_id: String,
        meta: ResponseMeta,
        body: Bytes,
    },
    /// Type 0xFF; the body decoded as UTF-8, invalid sequences replaced
    /// (an error text is for humans, refusing it would lose the error).
    Error { request_id: String, message: String },
}

impl Message {
    pub fn request_id(&self) -> &str {
        match self {
            Message::Request { request_id, .. }
            | Message::Response { request_id, .. }
            | Message::Error { request_id, .. } => request_id,
        }
    }
}

/// One chunked message being collected.
#[derive(Debug)]
struct Assembly {
    ty: FrameType,
    /// From chunk_tot (any frame may carry it, all must agree).
    tot: Option<u32>,
    /// Index of the frame that said final_chunk = 1.
    final_idx: Option<u32>,
    /// By index: frames may arrive in any order.
    chunks: BTreeMap<u32, Bytes>,
    body_len: usize,
    /// The meta may come in any chunk (§5: the reference sends resp_meta last).
    meta: Option<Bytes>,
}

impl Assembly {
    /// Number of chunks the message has, once a frame has said so.
    fn expected(&self) -> Option<u32> {
        self.tot.or(self.final_idx.map(|i| i + 1))
    }

    fn complete(&self) -> bool {
        self.expected()
            .is_some_and(|n| self.chunks.len() as u64 == u64::from(n))
    }
}

#[derive(Debug)]
pub struct Reassembler {
    limits: Limits,
    partial: HashMap<String, Assembly>,
}

impl Reassembler {
    pub fn new(limits: Limits) -> Reassembler {
        Reassembler {
            limits,
            partial: HashMap::new(),
        }
    }

    /// Incomplete messages held.
    pub fn len(&self) -> usize {
        self.partial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partial.is_empty()
    }

    /// Drops the partial state of `request_id` (its request timed out or was
    /// cancelled). Frames of a request that already failed start a fresh
    /// assembly that never completes; callers drop it here too.
    pub fn forget(&mut self, request_id: &str) {
        self.partial.remove(request_id);
    }

    /// Adds one WebSocket binary message. `Ok(None)`: a chunk was stored and
    /// its message is not complete yet.
    pub fn push(&mut self, msg: Bytes) -> Result<Option<Message>, ReassemblyError> {
        let frame = decode_frame(&msg)?;
        let request_id = frame.request_id.ok_or(ReassemblyError::MissingRequestId)?;
        let body = frame.body.map(|b| msg.slice_ref(b)).unwrap_or_default();
        let meta = frame_meta(&frame).map(|m| msg.slice_ref(m));
        if !frame.chunked {
            if frame.ty == FrameType::Error {
                // An error ends the request even mid-message (e.g. the
                // upstream failed after part of a response was sent).
                self.partial.remove(request_id);
            }
            if body.len() > self.limits.max_message_size {
                return Err(ReassemblyError::TooLarge {
                    request_id: request_id.to_owned(),
                    limit: self.limits.max_message_size,
                });
            }
            return finish(frame.ty, request_id.to_owned(), meta, body).map(Some);
        }
        let result = self.push_chunk(&frame, request_id, meta, body);
        if result.is_err() {
            self.partial.remove(request_id);
        }
        result
    }

    fn push_chunk(
        &mut self,
        frame: &Frame<'_>,
        request_id: &str,
        meta: Option<Bytes>,
        body: Bytes,
    ) -> Result<Option<Message>, ReassemblyError> {
        let err_id = || request_id.to_owned();
        let is_new = !self.partial.contains_key(request_id);
        if is_new && self.partial.len() >= self.limits.max_assemblies {
            // Checked before storing anything. A message that would complete
            // with this very frame is also refused: simpler, and only
            // reachable when the table is already full.
            return Err(ReassemblyError::TooManyAssemblies {
                request_id: err_id(),
                limit: self.limits.max_assemblies,
            });
        }
        let asm = self
            .partial
            .entry(request_id.to_owned())
            .or_insert_with(|| Assembly {
                ty: frame.ty,
                tot: None,
                final_idx: None,
                chunks: BTreeMap::new(),
                body_len: 0,
                meta: None,
            });
        let inconsistent = |what| ReassemblyError::Inconsistent {
            request_id: err_id(),
            what,
        };
        if asm.ty != frame.ty {
            return Err(inconsistent("frame type changed between chunks"));
        }
        if let Some(tot) = frame.chunk_tot {
            if asm.tot.is_some_and(|t| t != tot) {
                return Err(inconsistent("chunk_tot changed between chunks"));
            }
            asm.tot = Some(tot);
        }
        let idx = frame
            .chunk_idx
            .expect("decode_frame requires chunk_idx on chunked frames");
        if frame.final_chunk {
            if asm.final_idx.is_some() {
                return Err(inconsistent("final_chunk on two chunks"));
            }
            // A last index of u32::MAX means 2^32 chunks, which chunk_tot
            // (a u32, PROTOCOL.md §3) cannot count; refusing it here also
            // keeps `final_idx + 1` below from overflowing.
            if idx == u32::MAX {
                return Err(ReassemblyError::ChunkOutOfRange {
                    request_id: err_id(),
                    idx,
                    total: u32::MAX,
                });
            }
            asm.final_idx = Some(idx);
        }
        if let (Some(tot), Some(fin)) = (asm.tot, asm.final_idx) {
            if fin + 1 != tot {
                return Err(inconsistent("final_chunk is not chunk chunk_tot - 1"));
            }
        }
        if asm.chunks.contains_key(&idx) {
            return Err(ReassemblyError::DuplicateChunk {
                request_id: err_id(),
                idx,
            });
        }
        asm.chunks.insert(idx, body);
        // The count just learned may also condemn chunks stored earlier.
        if let Some(total) = asm.expected() {
            let highest = *asm.chunks.keys().next_back().expect("just inserted");
            if highest >= total {
                return Err(ReassemblyError::ChunkOutOfRange {
                    request_id: err_id(),
                    idx: highest,
                    total,
                });
            }
        }
        asm.body_len += asm.chunks[&idx].len();
        if asm.body_len > self.limits.max_message_size
            || asm.chunks.len() > max_chunks(self.limits.max_message_size)
        {
            return Err(ReassemblyError::TooLarge {
                request_id: err_id(),
                limit: self.limits.max_message_size,
            });
        }
        if let Some(m) = meta {
            if asm.meta.is_some() {
                return Err(inconsistent("meta in two chunks"));
            }
            asm.meta = Some(m);
        }
        if !asm.complete() {
            return Ok(None);
        }
        let asm = self.partial.remove(request_id).expect("present");
        let body = if asm.chunks.len() == 1 {
            asm.chunks.into_values().next().unwrap_or_default()
        } else {
            // The one copy on this path: chunks are separate WebSocket
            // messages, the caller wants one contiguous body.
            let mut joined = BytesMut::with_capacity(asm.body_len);
            for chunk in asm.chunks.values() {
                joined.extend_from_slice(chunk);
            }
            joined.freeze()
        };
        finish(asm.ty, err_id(), asm.meta, body).map(Some)
    }
}

/// Most chunks one message may hold. A held chunk costs ~150 bytes of
/// bookkeeping (map entry, and the frame's header and TLV heads kept alive by
/// the body slice) even with an empty body, so the body limit alone would not
/// bound memory. Real senders put at least ~900 body bytes in every chunk but
/// the first and last (chunk_size >= 1024, see encode.rs; the reference uses
/// 65,536), so one chunk per 512 bytes of limit never refuses them.
fn max_chunks(max_message_size: usize) -> usize {
    max_message_size / 512 + 2
}

/// The meta TLV that belongs to this frame type; the other one is ignored.
fn frame_meta<'a>(frame: &Frame<'a>) -> Option<&'a [u8]> {
    match frame.ty {
        FrameType::Request => frame.http_meta,
        FrameType::Response => frame.resp_meta,
        FrameType::Error => None,
    }
}

fn finish(
    ty: FrameType,
    request_id: String,
    meta: Option<Bytes>,
    body: Bytes,
) -> Result<Message, ReassemblyError> {
    if ty == FrameType::Error {
        let message = String::from_utf8_lossy(&body).into_owned();
        return Ok(Message::Error {
            request_id,
            message,
        });
    }
    let Some(meta) = meta else {
        return Err(ReassemblyError::MissingMeta { request_id });
    };
    match ty {
        FrameType::Request => match RequestMeta::from_json(&meta) {
            Ok(meta) => Ok(Message::Request {
                request_id,
                meta,
                body,
            }),
            Err(source) => Err(ReassemblyError::BadMeta { request_id, source }),
        },
        FrameType::Response => match ResponseMeta::from_json(&meta) {
            Ok(meta) => Ok(Message::Response {
                request_id,
                meta,
                body,
            }),
            Err(source) => Err(ReassemblyError::BadMeta { request_id, source }),
        },
        FrameType::Error => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::anpx::encode::{
        encode_error, encode_frame, encode_message, ChunkInfo, MetaRef,
    };

    const LIMITS: Limits = Limits {
        max_message_size: 1 << 20,
        max_assemblies: 4,
    };

    fn req_json() -> Vec<u8> {
        br#"{"method":"POST","path":"/p","headers":{"h":"v"},"query":{}}"#.to_vec()
    }

    fn resp_json() -> Vec<u8> {
        br#"{"status":201,"reason":"Created","headers":{}}"#.to_vec()
    }

    /// One chunk frame of a response `rid`.
    fn chunk(rid: &str, idx: u32, tot: Option<u32>, fin: bool, meta: bool, body: &[u8]) -> Bytes {
        let m = resp_json();
        let meta = meta.then_some(MetaRef::Response(&m));
        let info = ChunkInfo {
            idx,
            tot,
            final_chunk: fin,
        };
        let mut out = BytesMut::new();
        encode_frame(FrameType::Response, rid, meta, body, Some(info), &mut out);
        out.freeze()
    }

    fn body_of(m: Message) -> Bytes {
        match m {
            Message::Response { body, .. } | Message::Request { body, .. } => body,
            Message::Error { .. } => panic!("error message"),
        }
    }

    #[test]
    fn unchunked_empty_body_and_zero_copy() {
        let mut r = Reassembler::new(LIMITS);
        let mut out = Vec::new();
        encode_message(
            FrameType::Request,
            "a",
            Some(MetaRef::Request(&req_json())),
            b"",
            65536,
            &mut out,
        );
        let msg = r.push(out.pop().unwrap().freeze()).unwrap().unwrap();
        assert_eq!(msg.request_id(), "a");
        assert!(body_of(msg).is_empty());

        let mut out = Vec::new();
        encode_message(
            FrameType::Request,
            "b",
            Some(MetaRef::Request(&req_json())),
            b"data",
            65536,
            &mut out,
        );
        let frame = out.pop().unwrap().freeze();
        let range = frame.as_ptr_range();
        let body = body_of(r.push(frame.clone()).unwrap().unwrap());
        assert_eq!(&body[..], b"data");
        assert!(range.contains(&body.as_ptr()), "body must borrow the frame");
        assert!(r.is_empty());
    }

    #[test]
    fn meta_in_last_chunk_out_of_order() {
        let mut r = Reassembler::new(LIMITS);
        assert_eq!(
            r.push(chunk("x", 2, Some(3), true, true, b"cc")).unwrap(),
            None
        );
        assert_eq!(
            r.push(chunk("x", 0, Some(3), false, false, b"aa")).unwrap(),
            None
        );
        assert_eq!(r.len(), 1);
        let m = r
            .push(chunk("x", 1, Some(3), false, false, b"bb"))
            .unwrap()
            .unwrap();
        let Message::Response { meta, body, .. } = m else {
            panic!()
        };
        assert_eq!((meta.status, &body[..]), (201, &b"aabbcc"[..]));
        assert!(r.is_empty());
    }

    #[test]
    fn stream_style_without_chunk_tot_completes_on_final() {
        let mut r = Reassembler::new(LIMITS);
        assert_eq!(
            r.push(chunk("s", 1, None, true, false, b"2")).unwrap(),
            None
        );
        let m = r
            .push(chunk("s", 0, None, false, true, b"1"))
            .unwrap()
            .unwrap();
        assert_eq!(&body_of(m)[..], b"12");
    }

    #[test]
    fn duplicate_index_fails_and_drops_state() {
        let mut r = Reassembler::new(LIMITS);
        r.push(chunk("d", 0, Some(3), false, true, b"a")).unwrap();
        let e = r
            .push(chunk("d", 0, Some(3), false, false, b"a"))
            .unwrap_err();
        assert_eq!(
            e,
            ReassemblyError::DuplicateChunk {
                request_id: "d".into(),
                idx: 0
            }
        );
        assert_eq!(e.request_id(), Some("d"));
        assert!(r.is_empty());
    }

    #[test]
    fn index_out_of_range() {
        let mut r = Reassembler::new(LIMITS);
        let e = r
            .push(chunk("o", 3, Some(3), false, false, b"a"))
            .unwrap_err();
        assert_eq!(e.kind(), "chunk out of range");
        // An index stored before the final chunk revealed the count.
        r.push(chunk("o", 5, None, false, false, b"a")).unwrap();
        let e = r.push(chunk("o", 1, None, true, false, b"a")).unwrap_err();
        assert_eq!(
            e,
            ReassemblyError::ChunkOutOfRange {
                request_id: "o".into(),
                idx: 5,
                total: 2
            }
        );
        assert!(r.is_empty());
    }

    /// Found by `fuzz/fuzz_targets/anpx_reassemble.rs` (regression input
    /// `fuzz/seeds/anpx_reassemble/regress-final-chunk-u32-max`): a final
    /// chunk at index u32::MAX overflowed `final_idx + 1` (a panic with
    /// overflow checks, as in debug builds), with or without chunk_tot.
    #[test]
    fn final_chunk_at_u32_max_is_out_of_range() {
        for tot in [None, Some(3), Some(u32::MAX)] {
            let mut r = Reassembler::new(LIMITS);
            let e = r
                .push(chunk("m", u32::MAX, tot, true, true, b"tail"))
                .unwrap_err();
            assert_eq!(e.kind(), "chunk out of range", "chunk_tot {tot:?}");
            assert!(r.is_empty());
        }
        // chunk_tot first, then the final chunk at u32::MAX.
        let mut r = Reassembler::new(LIMITS);
        assert_eq!(r.push(chunk("m", 0, Some(3), false, true, b"a")), Ok(None));
        let e = r
            .push(chunk("m", u32::MAX, Some(3), true, false, b"b"))
            .unwrap_err();
        assert_eq!(e.kind(), "chunk out of range");
        assert!(r.is_empty());
    }

    #[test]
    fn inconsistent_frames() {
        let mut r = Reassembler::new(LIMITS);
        r.push(chunk("i", 0, Some(3), false, true, b"a")).unwrap();
        assert_eq!(
            r.push(chunk("i", 1, Some(4), false, false, b"a"))
                .unwrap_err()
                .kind(),
            "inconsistent"
        );
        r.push(chunk("i", 0, Some(3), false, true, b"a")).unwrap();
        assert_eq!(
            r.push(chunk("i", 1, Some(3), false, true, b"a"))
                .unwrap_err()
                .kind(),
            "inconsistent"
        );
        r.push(chunk("i", 0, Some(3), false, true, b"a")).unwrap();
        assert_eq!(
            r.push(chunk("i", 1, Some(3), true, false, b"a"))
                .unwrap_err()
                .kind(),
            "inconsistent"
        );
        assert!(r.is_empty());
    }

    #[test]
    fn too_large_chunked_and_unchunked() {
        let limits = Limits {
            max_message_size: 10,
            max_assemblies: 4,
        };
        let mut r = Reassembler::new(limits);
        r.push(chunk("t", 0, Some(2), false, true, b"123456"))
            .unwrap();
        let e = r
            .push(chunk("t", 1, Some(2), true, false, b"12345"))
            .unwrap_err();
        assert_eq!(
            e,
            ReassemblyError::TooLarge {
                request_id: "t".into(),
                limit: 10
            }
        );
        assert!(r.is_empty());
        let mut out = Vec::new();
        encode_message(
            FrameType::Response,
            "u",
            Some(MetaRef::Response(&resp_json())),
            &[0; 11],
            65536,
            &mut out,
        );
        assert_eq!(
            r.push(out.pop().unwrap().freeze()).unwrap_err().kind(),
            "too large"
        );
        // At exactly the limit it passes.
        r.push(chunk("t", 0, Some(2), false, true, b"12345"))
            .unwrap();
        assert!(r
            .push(chunk("t", 1, Some(2), true, false, b"12345"))
            .unwrap()
            .is_some());
    }

    #[test]
    fn empty_chunks_are_bounded_too() {
        let limits = Limits {
            max_message_size: 1024,
            max_assemblies: 4,
        };
        let mut r = Reassembler::new(limits);
        let n = max_chunks(1024) as u32;
        for i in 0..n {
            r.push(chunk("e", i, None, false, false, b"")).unwrap();
        }
        assert_eq!(
            r.push(chunk("e", n, None, false, false, b""))
                .unwrap_err()
                .kind(),
            "too large"
        );
    }

    #[test]
    fn too_many_assemblies_refuses_only_the_new_one() {
        let mut r = Reassembler::new(LIMITS);
        for i in 0..4 {
            r.push(chunk(&format!("m{i}"), 0, Some(2), false, true, b"a"))
                .unwrap();
        }
        let e = r
            .push(chunk("m9", 0, Some(2), false, true, b"a"))
            .unwrap_err();
        assert_eq!(
            e,
            ReassemblyError::TooManyAssemblies {
                request_id: "m9".into(),
                limit: 4
            }
        );
        assert_eq!(r.len(), 4);
        // Existing ones still complete; forget frees a slot.
        assert!(r
            .push(chunk("m0", 1, Some(2), true, false, b"b"))
            .unwrap()
            .is_some());
        r.forget("m1");
        assert_eq!(r.len(), 2);
        r.push(chunk("m9", 0, Some(2), false, true, b"a")).unwrap();
    }

    #[test]
    fn missing_and_bad_meta() {
        let mut r = Reassembler::new(LIMITS);
        let e = r
            .push(chunk("n", 0, Some(1), true, false, b"a"))
            .unwrap_err();
        assert_eq!(
            e,
            ReassemblyError::MissingMeta {
                request_id: "n".into()
            }
        );
        let mut f = BytesMut::new();
        encode_frame(
            FrameType::Response,
            "b",
            Some(MetaRef::Response(b"{\"status\":42}")),
            b"",
            None,
            &mut f,
        );
        let e = r.push(f.freeze()).unwrap_err();
        assert_eq!((e.kind(), e.request_id()), ("meta status", Some("b")));
    }

    #[test]
    fn error_frame_ends_partial_response() {
        let mut r = Reassembler::new(LIMITS);
        r.push(chunk("z", 0, Some(3), false, true, b"a")).unwrap();
        let m = r
            .push(encode_error("z", "upstream reset \u{2014}").freeze())
            .unwrap()
            .unwrap();
        assert_eq!(
            m,
            Message::Error {
                request_id: "z".into(),
                message: "upstream reset \u{2014}".into()
            }
        );
        assert!(r.is_empty());
    }

    #[test]
    fn decode_errors_pass_through() {
        let mut r = Reassembler::new(LIMITS);
        let e = r.push(Bytes::from_static(b"ANPX")).unwrap_err();
        assert_eq!((e.kind(), e.request_id()), ("too short", None));
    }
}
