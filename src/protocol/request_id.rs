//! The `request_id`s anp-proxy's gateway issues: 16 lowercase hex digits
//! of a u64 (the issuing core's index in the top bits). Peers may use any
//! UTF-8 id; these are ours (docs/ARCHITECTURE.md, "Wire details").

/// A `request_id` held by a receiver (any peer's id) or read off a frame:
/// inline up to 24 bytes, so ours (16) and most peers' cost no allocation
/// per request; longer ones (the reference's 36-byte UUIDs) live on the
/// heap as a `String` would.
pub type RequestId = compact_str::CompactString;

/// `request_id` on the wire: 16 lowercase hex digits of a u64 (core index
/// in the top bits). Formatted on the stack: no allocation per request.
pub fn format_request_id(id: u64, buf: &mut [u8; 16]) -> &str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((id >> (60 - 4 * i)) & 0xf) as usize];
    }
    std::str::from_utf8(buf).unwrap_or("0000000000000000")
}

pub fn parse_request_id(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut b = [0u8; 16];
        for id in [0u64, 1, (3 << 48) | 77, u64::MAX] {
            let s = format_request_id(id, &mut b).to_owned();
            assert_eq!(s.len(), 16);
            assert_eq!(parse_request_id(&s), Some(id));
        }
        assert_eq!(parse_request_id("xyz"), None);
        assert_eq!(
            parse_request_id("2265b1f5-91b7-4d8f-b358-1027c386bbc4"),
            None
        );
    }
}
