//! The tunnel's wire protocol: ANPX v1 frames (PROTOCOL.md §2–5) and the
//! negotiated extensions (§7). Sans-IO: bytes in, typed values out.

pub mod anpx;
pub mod control;
pub mod features;
pub mod reconnect;
pub mod request_id;
pub mod stream;
