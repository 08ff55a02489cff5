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
pub mod date;
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

/// The field lines of a parsed head, in order. Its storage comes from a
/// free list of the thread (a core's runtime) and goes back to it when
/// the head is dropped: parsing a head allocates nothing once the list
/// has vectors (issue 11: one allocation per request on each side).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeaderList(Vec<HeaderPos>);

thread_local! {
    static HEADER_LISTS: crate::pool::FreeList<Vec<HeaderPos>> =
        const { crate::pool::FreeList::new(HEADER_LISTS_KEEP) };
}

/// Lists kept per thread: about the requests a core has in flight at once
/// whose heads are alive together.
const HEADER_LISTS_KEEP: usize = 1024;
/// A list grown past this (a head with that many fields) is not kept.
const HEADER_LIST_KEEP_MAX: usize = 64;

impl HeaderList {
    /// An empty list with room for `n` fields.
    pub fn with_capacity(n: usize) -> Self {
        let mut v = HEADER_LISTS.with(|l| l.take()).unwrap_or_default();
        v.reserve(n);
        HeaderList(v)
    }
}

impl Drop for HeaderList {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        if v.capacity() == 0 || v.capacity() > HEADER_LIST_KEEP_MAX {
            return;
        }
        v.clear();
        // `try_with`: a head dropped while the thread's locals are torn
        // down just frees its vector.
        let _ = HEADER_LISTS.try_with(|l| l.give(v));
    }
}

impl Clone for HeaderList {
    fn clone(&self) -> Self {
        let mut c = HeaderList::with_capacity(self.0.len());
        c.0.extend_from_slice(&self.0);
        c
    }
}

impl From<Vec<HeaderPos>> for HeaderList {
    fn from(v: Vec<HeaderPos>) -> Self {
        HeaderList(v)
    }
}

impl std::ops::Deref for HeaderList {
    type Target = Vec<HeaderPos>;
    fn deref(&self) -> &Vec<HeaderPos> {
        &self.0
    }
}

impl std::ops::DerefMut for HeaderList {
    fn deref_mut(&mut self) -> &mut Vec<HeaderPos> {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a HeaderList {
    type Item = &'a HeaderPos;
    type IntoIter = std::slice::Iter<'a, HeaderPos>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
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
