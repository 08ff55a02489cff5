//! ANPX v1, the binary frame format of the tunnel (PROTOCOL.md §2–5), with
//! the wire side of anp-proxy's extensions (§7: the `exact` meta keys, and
//! chunks without `chunk_tot` for `stream`).
//!
//! Owns: the 24-byte header (§2, [`header`]), TLV fields (§3, [`tlv`]),
//! decoding one frame ([`decode`]), the meta JSON (§4, §7, [`meta`]),
//! encoding and chunking (§3, §5, [`encode`]) and reassembling chunked
//! messages under memory limits (§5, [`reassembly`]).
//!
//! Sans-IO: bytes in, typed values out. It never touches a socket, a clock
//! or a runtime, never panics on peer input, and keeps no state beyond the
//! [`Reassembler`]'s partial messages. The WebSocket layer hands it one
//! binary message per frame; the control text messages of §6 are not its
//! business.

pub mod binmeta;
pub mod decode;
pub mod encode;
pub mod error;
pub mod header;
pub mod meta;
pub mod reassembly;
pub mod tlv;

pub use decode::{decode_frame, decode_frame_with, unverified_request_id, Frame};
pub use encode::{
    encode_error, encode_frame, encode_frame_split, encode_frame_with, encode_message,
    encode_message_with, frame_len, ChunkInfo, MetaRef, DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE,
};
pub use error::{DecodeError, MetaError, ReassemblyError};
pub use header::{BodyCrc, FrameType, Header, HEADER_LEN};
pub use meta::{latin1_to_string, string_to_latin1, RequestMeta, ResponseMeta};
pub use reassembly::{Limits, Message, Reassembler};
