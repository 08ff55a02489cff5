//! TLV fields of a frame body (PROTOCOL.md §3): `tag` (1 byte), `len`
//! (u32 BE), `value`. Reading borrows from the frame; writing appends.

use bytes::{BufMut, BytesMut};

use super::error::DecodeError;

pub const TAG_REQUEST_ID: u8 = 0x01;
pub const TAG_HTTP_META: u8 = 0x02;
pub const TAG_HTTP_BODY: u8 = 0x03;
pub const TAG_RESP_META: u8 = 0x04;
pub const TAG_CHUNK_IDX: u8 = 0x0A;
pub const TAG_CHUNK_TOT: u8 = 0x0B;
pub const TAG_FINAL_CHUNK: u8 = 0x0C;

/// Tag + length prefix of every TLV.
pub const TLV_HEAD_LEN: usize = 5;

/// Walks the TLVs of a frame body, yielding `(tag, value)` borrowed from it.
/// Stops after the first error (a length overrun leaves nothing to resync on).
pub struct TlvIter<'a> {
    body: &'a [u8],
    /// Offset of `body[0]` inside the whole frame, for error messages.
    base: usize,
    pos: usize,
    failed: bool,
}

impl<'a> TlvIter<'a> {
    /// `base` is where `body` starts in the frame (24 for a frame body).
    pub fn new(body: &'a [u8], base: usize) -> TlvIter<'a> {
        TlvIter {
            body,
            base,
            pos: 0,
            failed: false,
        }
    }
}

impl<'a> Iterator for TlvIter<'a> {
    type Item = Result<(u8, &'a [u8]), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos == self.body.len() {
            return None;
        }
        let rest = &self.body[self.pos..];
        let overrun = DecodeError::TlvLength {
            tag: rest[0],
            offset: self.base + self.pos,
        };
        let Some((head, after)) = rest.split_first_chunk::<TLV_HEAD_LEN>() else {
            self.failed = true;
            return Some(Err(overrun));
        };
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some(value) = after.get(..len) else {
            self.failed = true;
            return Some(Err(overrun));
        };
        self.pos += TLV_HEAD_LEN + len;
        Some(Ok((head[0], value)))
    }
}

/// Bytes one TLV with a `len`-byte value takes on the wire.
pub const fn tlv_len(len: usize) -> usize {
    TLV_HEAD_LEN + len
}

/// Appends one TLV.
///
/// # Panics
/// If `value` is 4 GiB or longer: callers bound values by the chunk size.
pub fn put_tlv(out: &mut BytesMut, tag: u8, value: &[u8]) {
    let len = u32::try_from(value.len()).expect("TLV value must be shorter than 4 GiB");
    out.put_u8(tag);
    out.put_u32(len);
    out.put_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_fields_in_order() {
        let mut b = BytesMut::new();
        put_tlv(&mut b, TAG_REQUEST_ID, b"abc");
        put_tlv(&mut b, 0xF3, b"");
        put_tlv(&mut b, TAG_HTTP_BODY, b"xy");
        let got: Vec<_> = TlvIter::new(&b, 24).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![
                (TAG_REQUEST_ID, &b"abc"[..]),
                (0xF3, &b""[..]),
                (TAG_HTTP_BODY, &b"xy"[..])
            ]
        );
    }

    #[test]
    fn overrun_and_short_head_are_errors() {
        let mut b = BytesMut::new();
        put_tlv(&mut b, TAG_HTTP_BODY, b"xyz");
        let cut = &b[..b.len() - 1];
        let mut it = TlvIter::new(cut, 24);
        assert_eq!(
            it.next(),
            Some(Err(DecodeError::TlvLength {
                tag: TAG_HTTP_BODY,
                offset: 24
            }))
        );
        assert_eq!(it.next(), None);
        let head_only = [TAG_HTTP_BODY, 0, 0];
        assert_eq!(
            TlvIter::new(&head_only, 24)
                .next()
                .unwrap()
                .unwrap_err()
                .kind(),
            "tlv length"
        );
    }
}
