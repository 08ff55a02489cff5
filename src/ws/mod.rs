//! WebSocket (RFC 6455) for the gateway ↔ receiver tunnel, sans IO.
//!
//! Each binary message carries one ANPX frame and text messages carry JSON
//! control messages (PROTOCOL.md §1, §6). This module turns bytes into typed
//! values and back; it owns no socket and no runtime, so it can be fuzzed and
//! tested in microseconds. The IO loop that drives it lives beside it.
//!
//! - [`frame`]: frame decoding (limits, unmasking, reassembly) and encoding.
//! - [`handshake`]: the opening handshake, both sides.
//! - [`error`]: [`WsError`] (with its close code) and [`HandshakeError`].
//! - [`ping_limit`]: a pings-per-second budget (a flood fails with 1008).
//! - [`queue`]: a tunnel's outgoing queue (allocates nothing while idle).
//!
//! Never: block, touch a socket, or negotiate extensions (no
//! permessage-deflate: ANPX bodies are sent as they are, so RSV bits are
//! always an error).

pub mod conn;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod ping_limit;
pub mod queue;

pub use error::{HandshakeError, WsError};
pub use frame::{
    apply_mask, encode_close, encode_frame, encode_header, encode_raw_frame, header_len, mask_for,
    Decoder, Event, Limits, Masking, OpCodeKind, Role, MAX_CONTROL_PAYLOAD,
};
pub use handshake::{
    client_key, parse_server_response, server_accept_key, write_101, write_client_request,
    BodyHint, ServerResponse,
};
