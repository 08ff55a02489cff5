//! The fixed 24-byte frame header (PROTOCOL.md §2), read and written through
//! a zerocopy struct so the byte layout is the type, not offset arithmetic.

use zerocopy::byteorder::big_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::error::DecodeError;

pub const HEADER_LEN: usize = 24;
pub const MAGIC: [u8; 4] = *b"ANPX";
pub const VERSION: u8 = 1;
/// Flags bit 0: this frame is one chunk of a larger message (§5).
pub const FLAG_CHUNKED: u8 = 0x01;
/// `header_crc` covers bytes 0..12: magic, version, type, flags, reserved, total_len.
const HEADER_CRC_SPAN: usize = 12;

/// Byte 5 of the header.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    Request = 0x01,
    Response = 0x02,
    Error = 0xFF,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Option<FrameType> {
        match b {
            0x01 => Some(FrameType::Request),
            0x02 => Some(FrameType::Response),
            0xFF => Some(FrameType::Error),
            _ => None,
        }
    }
}

/// Whether a frame's `body_crc` is computed (ANPX v1) or left 0 (the
/// `nocrc` extension, docs/PROTOCOL.md §7.9). On decode, `Omitted` means
/// a zero `body_crc` is not checked; a non-zero one always is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyCrc {
    #[default]
    Computed,
    Omitted,
}

/// The header exactly as on the wire, big-endian, no alignment needs.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone, Copy)]
#[repr(C)]
pub struct Header {
    pub magic: [u8; 4],
    pub version: u8,
    pub ty: u8,
    pub flags: u8,
    pub reserved: u8,
    pub total_len: U32,
    pub header_crc: U32,
    pub body_crc: U32,
    /// Zero on send, ignored on receive (§2: the reference pads 20 bytes to 24).
    pub padding: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);

impl Header {
    /// A header for a frame of `total_len` bytes whose body hashes to
    /// `body_crc`; `header_crc` is filled in.
    pub fn new(ty: FrameType, flags: u8, total_len: u32, body_crc: u32) -> Header {
        let mut h = Header {
            magic: MAGIC,
            version: VERSION,
            ty: ty as u8,
            flags,
            reserved: 0,
            total_len: U32::new(total_len),
            header_crc: U32::new(0),
            body_crc: U32::new(body_crc),
            padding: [0; 4],
        };
        h.header_crc = U32::new(h.computed_header_crc());
        h
    }

    pub fn computed_header_crc(&self) -> u32 {
        crc32fast::hash(&self.as_bytes()[..HEADER_CRC_SPAN])
    }

    /// Checks the header of `msg` in the reference decoder's order (magic,
    /// version, header crc, then length) so the same input gives the same
    /// error kind as the vectors expect. The body crc is left to the caller.
    pub fn parse(msg: &[u8]) -> Result<&Header, DecodeError> {
        let (h, _) =
            Header::ref_from_prefix(msg).map_err(|_| DecodeError::TooShort { len: msg.len() })?;
        if h.magic != MAGIC {
            return Err(DecodeError::BadMagic { found: h.magic });
        }
        if h.version != VERSION {
            return Err(DecodeError::BadVersion(h.version));
        }
        let computed = h.computed_header_crc();
        if h.header_crc.get() != computed {
            return Err(DecodeError::HeaderCrc {
                expected: h.header_crc.get(),
                computed,
            });
        }
        if h.total_len.get() as usize != msg.len() {
            return Err(DecodeError::TotalLength {
                declared: h.total_len.get(),
                actual: msg.len(),
            });
        }
        Ok(h)
    }

    pub fn frame_type(&self) -> Result<FrameType, DecodeError> {
        FrameType::from_u8(self.ty).ok_or(DecodeError::UnknownFrameType(self.ty))
    }

    pub fn chunked(&self) -> bool {
        self.flags & FLAG_CHUNKED != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let h = Header::new(FrameType::Response, FLAG_CHUNKED, 30, 0xDEAD_BEEF);
        let mut msg = h.as_bytes().to_vec();
        assert_eq!(&msg[..4], b"ANPX");
        assert_eq!(msg[5], 0x02);
        assert_eq!(&msg[8..12], &30u32.to_be_bytes());
        assert_eq!(&msg[16..20], &0xDEAD_BEEFu32.to_be_bytes());
        assert_eq!(&msg[20..24], &[0; 4]);
        msg.extend_from_slice(&[0; 6]);
        let parsed = Header::parse(&msg).unwrap();
        assert!(parsed.chunked());
        assert_eq!(parsed.frame_type(), Ok(FrameType::Response));
    }

    #[test]
    fn padding_is_ignored_but_crc_span_is_not() {
        let mut msg = Header::new(FrameType::Request, 0, 24, 0)
            .as_bytes()
            .to_vec();
        msg[21] = 0xAA;
        assert!(Header::parse(&msg).is_ok());
        msg[7] = 1; // reserved is inside the crc span
        assert_eq!(Header::parse(&msg).unwrap_err().kind(), "header crc");
    }

    #[test]
    fn unknown_type_is_reported() {
        let mut h = Header::new(FrameType::Request, 0, 24, 0);
        h.ty = 7;
        assert_eq!(h.frame_type(), Err(DecodeError::UnknownFrameType(7)));
    }
}
