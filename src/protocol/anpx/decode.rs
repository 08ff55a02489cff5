//! One frame from one WebSocket binary message (PROTOCOL.md §2–3): validate
//! the header and both CRCs, then read the TLVs, borrowing every value from
//! the message (no copies).

use super::error::DecodeError;
use super::header::{BodyCrc, FrameType, Header, HEADER_LEN};
use super::tlv::{
    TlvIter, TAG_CHUNK_IDX, TAG_CHUNK_TOT, TAG_FINAL_CHUNK, TAG_HTTP_BODY, TAG_HTTP_META,
    TAG_REQUEST_ID, TAG_RESP_META,
};

/// A decoded frame. Absent TLVs are `None`; an absent body is an empty body
/// (§3). Which of these a frame must have depends on its role in a message
/// and is checked by the reassembler, except that a chunked frame must carry
/// `chunk_idx` (§5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub ty: FrameType,
    pub chunked: bool,
    pub request_id: Option<&'a str>,
    pub http_meta: Option<&'a [u8]>,
    pub resp_meta: Option<&'a [u8]>,
    pub body: Option<&'a [u8]>,
    pub chunk_idx: Option<u32>,
    pub chunk_tot: Option<u32>,
    pub final_chunk: bool,
}

/// Decodes one whole frame; `msg` is exactly one WebSocket binary message.
///
/// Unknown tags, including the 0xF0–0xFF extension range, are skipped (§3:
/// unlike the reference decoder, which fails on them). A known tag seen twice
/// is refused rather than resolved by guessing which copy wins.
pub fn decode_frame(msg: &[u8]) -> Result<Frame<'_>, DecodeError> {
    decode_frame_with(msg, BodyCrc::Computed)
}

/// [`decode_frame`] on a tunnel that negotiated `nocrc` (`crc` =
/// [`BodyCrc::Omitted`]): a `body_crc` of 0 is taken as "not computed"
/// and not checked (PROTOCOL.md §7.9). The header CRC is always checked.
pub fn decode_frame_with(msg: &[u8], crc: BodyCrc) -> Result<Frame<'_>, DecodeError> {
    let header = Header::parse(msg)?;
    let body = &msg[HEADER_LEN..];
    let expected = header.body_crc.get();
    if !(expected == 0 && crc == BodyCrc::Omitted) {
        let computed = crc32fast::hash(body);
        if expected != computed {
            return Err(DecodeError::BodyCrc { expected, computed });
        }
    }
    let mut frame = Frame {
        ty: header.frame_type()?,
        chunked: header.chunked(),
        request_id: None,
        http_meta: None,
        resp_meta: None,
        body: None,
        chunk_idx: None,
        chunk_tot: None,
        final_chunk: false,
    };
    let mut final_seen = false;
    for tlv in TlvIter::new(body, HEADER_LEN) {
        let (tag, value) = tlv?;
        match tag {
            TAG_REQUEST_ID => {
                let id = std::str::from_utf8(value).map_err(|_| DecodeError::InvalidField {
                    field: "request_id",
                    reason: "not UTF-8",
                })?;
                set_once(&mut frame.request_id, id, tag)?;
            }
            TAG_HTTP_META => set_once(&mut frame.http_meta, value, tag)?,
            TAG_RESP_META => set_once(&mut frame.resp_meta, value, tag)?,
            TAG_HTTP_BODY => set_once(&mut frame.body, value, tag)?,
            TAG_CHUNK_IDX => set_once(&mut frame.chunk_idx, be_u32(value, "chunk_idx")?, tag)?,
            TAG_CHUNK_TOT => set_once(&mut frame.chunk_tot, be_u32(value, "chunk_tot")?, tag)?,
            TAG_FINAL_CHUNK => {
                if final_seen {
                    return Err(DecodeError::DuplicateTag(tag));
                }
                final_seen = true;
                frame.final_chunk = match value {
                    [0] => false,
                    [1] => true,
                    _ => {
                        return Err(DecodeError::InvalidField {
                            field: "final_chunk",
                            reason: "not a single byte 0 or 1",
                        })
                    }
                };
            }
            _ => {} // unknown or extension tag: skipped (§3)
        }
    }
    if frame.chunked && frame.chunk_idx.is_none() {
        return Err(DecodeError::InvalidField {
            field: "chunk_idx",
            reason: "missing in a chunked frame",
        });
    }
    Ok(frame)
}

/// The `request_id` of a frame whose header is valid, read without checking
/// the body CRC or the rest of the body. A receiver's frame that failed
/// [`decode_frame`] on its body CRC can then fail the request it names at
/// once instead of leaving it to time out. Never use it to *deliver*
/// anything: the value is not verified.
pub fn unverified_request_id(msg: &[u8]) -> Option<&str> {
    Header::parse(msg).ok()?;
    TlvIter::new(&msg[HEADER_LEN..], HEADER_LEN)
        .map_while(Result::ok)
        .find(|(tag, _)| *tag == TAG_REQUEST_ID)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

fn set_once<T>(slot: &mut Option<T>, value: T, tag: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateTag(tag));
    }
    *slot = Some(value);
    Ok(())
}

fn be_u32(value: &[u8], field: &'static str) -> Result<u32, DecodeError> {
    let bytes: [u8; 4] = value.try_into().map_err(|_| DecodeError::InvalidField {
        field,
        reason: "not 4 bytes",
    })?;
    Ok(u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::anpx::header::FLAG_CHUNKED;
    use crate::protocol::anpx::tlv::put_tlv;
    use bytes::BytesMut;
    use zerocopy::IntoBytes;

    /// A frame with arbitrary TLV bytes and correct CRCs.
    fn frame_with(ty: FrameType, flags: u8, tlvs: &[u8]) -> Vec<u8> {
        let total = (HEADER_LEN + tlvs.len()) as u32;
        let h = Header::new(ty, flags, total, crc32fast::hash(tlvs));
        let mut v = h.as_bytes().to_vec();
        v.extend_from_slice(tlvs);
        v
    }

    #[test]
    fn unknown_tags_are_skipped() {
        let mut b = BytesMut::new();
        put_tlv(&mut b, 0xF0, b"ext");
        put_tlv(&mut b, TAG_REQUEST_ID, b"r1");
        put_tlv(&mut b, 0x55, b"");
        put_tlv(&mut b, TAG_HTTP_BODY, b"hi");
        let msg = frame_with(FrameType::Request, 0, &b);
        let f = decode_frame(&msg).unwrap();
        assert_eq!(f.request_id, Some("r1"));
        assert_eq!(f.body, Some(&b"hi"[..]));
        assert!(!f.chunked);
    }

    #[test]
    fn field_shapes_are_checked() {
        let cases: [(u8, &[u8], &str); 4] = [
            (TAG_REQUEST_ID, b"\xff\xfe", "invalid field"),
            (TAG_CHUNK_IDX, b"\0\0\0", "invalid field"),
            (TAG_CHUNK_TOT, b"\0\0\0\0\0", "invalid field"),
            (TAG_FINAL_CHUNK, b"\x02", "invalid field"),
        ];
        for (tag, value, kind) in cases {
            let mut b = BytesMut::new();
            put_tlv(&mut b, tag, value);
            let msg = frame_with(FrameType::Response, 0, &b);
            assert_eq!(decode_frame(&msg).unwrap_err().kind(), kind, "tag {tag}");
        }
    }

    #[test]
    fn duplicate_known_tag_is_refused() {
        let mut b = BytesMut::new();
        put_tlv(&mut b, TAG_REQUEST_ID, b"a");
        put_tlv(&mut b, TAG_REQUEST_ID, b"b");
        let msg = frame_with(FrameType::Request, 0, &b);
        assert_eq!(
            decode_frame(&msg),
            Err(DecodeError::DuplicateTag(TAG_REQUEST_ID))
        );
    }

    #[test]
    fn chunked_frame_needs_chunk_idx() {
        let mut b = BytesMut::new();
        put_tlv(&mut b, TAG_REQUEST_ID, b"a");
        let msg = frame_with(FrameType::Request, FLAG_CHUNKED, &b);
        assert_eq!(decode_frame(&msg).unwrap_err().kind(), "invalid field");
    }

    #[test]
    fn unknown_frame_type_after_valid_crcs() {
        let mut msg = frame_with(FrameType::Request, 0, &[]);
        msg[5] = 0x03;
        let crc = crc32fast::hash(&msg[..12]);
        msg[12..16].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(decode_frame(&msg).unwrap_err().kind(), "frame type");
    }
    #[test]
    fn unverified_request_id_survives_a_bad_body_crc_only() {
        let mut b = BytesMut::new();
        put_tlv(&mut b, 0xF0, b"ext");
        put_tlv(&mut b, TAG_REQUEST_ID, b"0123456789abcdef");
        put_tlv(&mut b, TAG_HTTP_BODY, b"hi");
        let mut msg = frame_with(FrameType::Response, 0, &b);
        let last = msg.len() - 1;
        msg[last] ^= 0xff; // the body crc no longer matches
        assert_eq!(decode_frame(&msg).unwrap_err().kind(), "body crc");
        assert_eq!(unverified_request_id(&msg), Some("0123456789abcdef"));
        msg[8] ^= 0x01; // now the header crc fails too: nothing is read
        assert_eq!(unverified_request_id(&msg), None);
    }
}
