//! Sans-IO HTTP/1.1 (RFC 9112) for the gateway's public front and the
//! receiver's client to the local app: head parsers, a chunked body
//! decoder/encoder, and field helpers.
//!
//! Bytes in, typed values or "need more bytes" (`Ok(None)`,
//! `ChunkedStep::NeedMore`) out. This module never performs IO, never
//! blocks, never touches shared state, and never allocates beyond the one
//! `Vec<HeaderPos>` a head's field count forces. Parsed heads hold byte
//! ranges into the caller's buffer, so the caller can freeze the head into
//! a `Bytes` and slice it without copying.
//!
//! The request side faces the public internet and is strict on purpose
//! (request smuggling defences, RFC 9112 §11.2); the response side faces an
//! app we proxy for and is lenient only where leniency cannot change how a
//! message is framed.

pub mod chunked;
pub mod error;
mod framing;
pub mod headers;
pub mod request;
pub mod response;

use std::ops::Range;

pub use chunked::{write_chunk_header, ChunkedDecoder, ChunkedStep, LAST_CHUNK};
pub use error::{ChunkedError, HeadError};
pub use request::{parse_request_head, BodyKind, RequestHead, TargetForm};
pub use response::{parse_response_head, ResponseBody, ResponseHead};

/// Size limits enforced while a head is parsed, before any buffer grows
/// past them (DESIGN.md "HTTP front").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Longest request-line, CRLF excluded; longer → 414 (RFC 9112 §3
    /// recommends supporting at least 8000 octets).
    pub max_request_line: usize,
    /// Longest head, leading empty lines and the final CRLF included;
    /// longer → 431.
    pub max_head: usize,
    /// Most field lines in one head; more → 431.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 * 1024,
            max_head: 64 * 1024,
            max_headers: 100,
        }
    }
}

/// Where one field line sits in the parsed buffer. The value is trimmed of
/// leading and trailing whitespace (RFC 9112 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderPos {
    pub name: Range<usize>,
    pub value: Range<usize>,
}

impl HeaderPos {
    /// The field name as received (a token, so always ASCII).
    pub fn name<'a>(&self, buf: &'a [u8]) -> &'a str {
        slice_str(buf, &self.name)
    }

    /// The field value bytes (may hold obs-text, so not necessarily UTF-8).
    pub fn value<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.value.clone()).unwrap_or_default()
    }

    /// Case-insensitive name comparison (RFC 9110 §5.1).
    pub fn is(&self, buf: &[u8], name: &str) -> bool {
        buf.get(self.name.clone())
            .is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// First value of the field `name`, if any.
fn find_header<'a>(headers: &[HeaderPos], buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|h| h.is(buf, name))
        .map(|h| h.value(buf))
}

/// `buf[range]` as text; "" when the range does not fit `buf` or is not
/// UTF-8 (only possible if the caller passes a different buffer than the
/// one parsed — accessors must not panic on that).
fn slice_str<'a>(buf: &'a [u8], range: &Range<usize>) -> &'a str {
    buf.get(range.clone())
        .and_then(|b| std::str::from_utf8(b).ok())
        .unwrap_or_default()
}
