//! The binary meta of the `binmeta` extension (PROTOCOL.md §7.5): the
//! request's method, target and header lines, and the response's status,
//! reason and header lines, as length-prefixed bytes in the `http_meta` /
//! `resp_meta` TLVs instead of JSON.
//!
//! It is also the form both roles keep a head in between the HTTP side and
//! the tunnel: the gateway writes a client's head straight into a
//! [`Builder`] from the parsed ranges, and the receiver writes the app's
//! request head straight from a [`Request`]'s slices. JSON is made from it
//! (or read into it) only for a peer that did not negotiate `binmeta`.
//!
//! Layout, all integers big-endian:
//!
//! ```text
//! request:  B1 | u32 len, method | u32 len, target | u32 n | n × (u32 len, name | u32 len, value)
//! response: B1 | u16 status | u32 len, reason     | u32 n | n × (u32 len, name | u32 len, value)
//! ```
//!
//! The first byte, `0xB1`, can never start a JSON text, so a reader tells
//! the two forms apart by it. Bytes are carried as they are: names,
//! values, target and reason need not be UTF-8.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::error::MetaError;

/// First byte of a binary meta.
pub const MARKER: u8 = 0xB1;

/// Is this TLV value a binary meta (rather than JSON)?
pub fn is_binary(meta: &[u8]) -> bool {
    meta.first() == Some(&MARKER)
}

/// Writes a binary meta: the head first ([`Builder::request`] or
/// [`Builder::response`]), then the header lines in order.
pub struct Builder {
    buf: BytesMut,
    /// `buf` is the thread's arena (given back by `finish`).
    arena: bool,
    count_at: usize,
    count: u32,
}

fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u32(b.len() as u32);
    buf.put_slice(b);
}

thread_local! {
    /// Where this thread (a core's runtime) writes the metas it builds:
    /// each is split off as `Bytes` that share this buffer, and its room
    /// comes back once every meta written in it is dropped. So building a
    /// meta allocates nothing (issue 11: one request cost two allocations
    /// here, a buffer and its shared header on `freeze`); a new buffer is
    /// allocated when this one is full and some meta in it still lives
    /// (a meta lives until its frame is encoded, or a plain-v1 response
    /// is complete).
    static ARENA: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Size of an arena buffer: room for dozens of typical metas.
const ARENA_SIZE: usize = 16 * 1024;

/// A buffer for a meta of about `capacity` bytes: the arena (true), or,
/// for a meta too large to share one, a buffer of its own.
fn take_buf(capacity: usize) -> (BytesMut, bool) {
    if capacity > ARENA_SIZE / 4 {
        return (BytesMut::with_capacity(capacity), false);
    }
    let mut buf = ARENA.with(|a| std::mem::take(&mut *a.borrow_mut()));
    if buf.capacity() < capacity && !buf.try_reclaim(capacity) {
        buf = BytesMut::with_capacity(ARENA_SIZE);
    }
    (buf, true)
}

impl Builder {
    /// `capacity`: a guess of the whole size (the client's head length is
    /// a good one), so the buffer need not grow.
    pub fn request(method: &[u8], target: &[u8], capacity: usize) -> Builder {
        let (mut buf, arena) = take_buf(capacity.max(64));
        buf.put_u8(MARKER);
        put_bytes(&mut buf, method);
        put_bytes(&mut buf, target);
        Builder::fields_from(buf, arena)
    }

    pub fn response(status: u16, reason: &[u8], capacity: usize) -> Builder {
        let (mut buf, arena) = take_buf(capacity.max(64));
        buf.put_u8(MARKER);
        buf.put_u16(status);
        put_bytes(&mut buf, reason);
        Builder::fields_from(buf, arena)
    }

    fn fields_from(mut buf: BytesMut, arena: bool) -> Builder {
        let count_at = buf.len();
        buf.put_u32(0);
        Builder {
            buf,
            arena,
            count_at,
            count: 0,
        }
    }

    /// One header line.
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        self.field_parts(name, &[value]);
    }

    /// One header line whose value is `parts` joined (no separator added):
    /// a forwarding header built from what a client sent plus our hop.
    pub fn field_parts(&mut self, name: &[u8], parts: &[&[u8]]) {
        put_bytes(&mut self.buf, name);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.buf.put_u32(len as u32);
        for p in parts {
            self.buf.put_slice(p);
        }
        self.count += 1;
    }

    fn finish(mut self) -> Bytes {
        self.buf[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_be_bytes());
        let meta = self.buf.split().freeze();
        if self.arena {
            ARENA.with(|a| *a.borrow_mut() = self.buf);
        }
        meta
    }

    pub fn finish_request(self) -> Request {
        Request::parse(self.finish()).expect("a built request meta parses")
    }

    pub fn finish_response(self) -> Response {
        Response::parse(self.finish()).expect("a built response meta parses")
    }
}

/// Reads the binary layout; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<Range<usize>, MetaError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(MetaError::Binary("length runs past the end"))?;
        let r = self.at..end;
        self.at = end;
        Ok(r)
    }

    fn u16(&mut self) -> Result<u16, MetaError> {
        let r = self.take(2)?;
        Ok(u16::from_be_bytes([self.b[r.start], self.b[r.start + 1]]))
    }

    fn u32(&mut self) -> Result<u32, MetaError> {
        let r = self.take(4)?;
        let mut v = [0u8; 4];
        v.copy_from_slice(&self.b[r]);
        Ok(u32::from_be_bytes(v))
    }

    fn bytes(&mut self) -> Result<Range<usize>, MetaError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn marker(&mut self) -> Result<(), MetaError> {
        match self.b.get(self.at) {
            Some(&MARKER) => {
                self.at += 1;
                Ok(())
            }
            _ => Err(MetaError::Binary("no binary meta marker")),
        }
    }

    /// The header lines: checked to the last byte, nothing after them.
    fn fields(&mut self) -> Result<(usize, u32), MetaError> {
        let n = self.u32()?;
        let start = self.at;
        for _ in 0..n {
            self.bytes()?;
            self.bytes()?;
        }
        if self.at != self.b.len() {
            return Err(MetaError::Binary("bytes after the last header line"));
        }
        Ok((start, n))
    }
}

/// The header lines of a parsed meta, in order.
#[derive(Clone)]
pub struct Fields<'a> {
    rest: &'a [u8],
    left: u32,
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated by `parse`: lengths are within the buffer.
        let mut take = || {
            let (len, rest) = self.rest.split_at(4);
            let n = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let (v, rest) = rest.split_at(n);
            self.rest = rest;
            v
        };
        let name = take();
        let value = take();
        Some((name, value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// The buffer of a validated meta and where its header lines start: what
/// requests and responses share.
#[derive(Clone, PartialEq, Eq)]
struct Parsed {
    raw: Bytes,
    fields: usize,
    count: u32,
}

impl Parsed {
    fn fields(&self) -> Fields<'_> {
        Fields {
            rest: &self.raw[self.fields..],
            left: self.count,
        }
    }
}

/// A request meta, validated; its parts borrow the one buffer.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    p: Parsed,
    method: Range<usize>,
    target: Range<usize>,
}

impl Request {
    pub fn parse(raw: Bytes) -> Result<Request, MetaError> {
        let mut r = Reader { b: &raw, at: 0 };
        r.marker()?;
        let method = r.bytes()?;
        let target = r.bytes()?;
        let (fields, count) = r.fields()?;
        Ok(Request {
            p: Parsed { raw, fields, count },
            method,
            target,
        })
    }

    pub fn method(&self) -> &[u8] {
        &self.p.raw[self.method.clone()]
    }

    /// The request-target as the client sent it (origin form).
    pub fn target(&self) -> &[u8] {
        &self.p.raw[self.target.clone()]
    }

    pub fn fields(&self) -> Fields<'_> {
        self.p.fields()
    }

    /// The wire form, for the `http_meta` TLV.
    pub fn as_bytes(&self) -> &[u8] {
        &self.p.raw
    }

    /// The same request with one more header line (a rebuild: for the
    /// rare path that learns a field after the meta was built).
    pub fn with_field(&self, name: &[u8], value: &[u8]) -> Request {
        let size = self.p.raw.len() + name.len() + value.len() + 8;
        let mut b = Builder::request(self.method(), self.target(), size);
        for (n, v) in self.fields() {
            b.field(n, v);
        }
        b.field(name, value);
        b.finish_request()
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &String::from_utf8_lossy(self.method()))
            .field("target", &String::from_utf8_lossy(self.target()))
            .field("fields", &self.p.count)
            .finish()
    }
}

/// A response meta, validated; its parts borrow the one buffer.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    p: Parsed,
    status: u16,
    reason: Range<usize>,
}

impl Response {
    /// Also refuses a `status` outside 100..=999, as the JSON form does.
    pub fn parse(raw: Bytes) -> Result<Response, MetaError> {
        let mut r = Reader { b: &raw, at: 0 };
        r.marker()?;
        let status = r.u16()?;
        if !(100..=999).contains(&status) {
            return Err(MetaError::Status(status.into()));
        }
        let reason = r.bytes()?;
        let (fields, count) = r.fields()?;
        Ok(Response {
            p: Parsed { raw, fields, count },
            status,
            reason,
        })
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    pub fn reason(&self) -> &[u8] {
        &self.p.raw[self.reason.clone()]
    }

    pub fn fields(&self) -> Fields<'_> {
        self.p.fields()
    }

    /// The wire form, for the `resp_meta` TLV.
    pub fn as_bytes(&self) -> &[u8] {
        &self.p.raw
    }

    /// From the JSON form (a peer without `binmeta`): the `exact` list when
    /// present (its values are Latin-1 code points, §7.1), else the flat map.
    pub fn from_json_meta(m: &super::ResponseMeta) -> Response {
        let list = m.header_list.as_deref().unwrap_or(&m.headers);
        let size = list
            .iter()
            .map(|(n, v)| n.len() + v.len() + 8)
            .sum::<usize>();
        let mut b = Builder::response(m.status, m.reason.as_bytes(), size + m.reason.len() + 16);
        let mut bytes = Vec::new();
        for (name, value) in list {
            let value = match (m.header_list.is_some(), value.is_ascii()) {
                (true, false) => {
                    bytes.clear();
                    match super::string_to_latin1(value) {
                        Some(v) => bytes.extend_from_slice(&v),
                        None => bytes.extend_from_slice(value.as_bytes()),
                    }
                    &bytes[..]
                }
                _ => value.as_bytes(),
            };
            b.field(name.as_bytes(), value);
        }
        b.finish_response()
    }

    /// The JSON form for a peer without `binmeta`: the flat v1 map (lower-
    /// case names, repeated fields joined, RFC 9110 §5.3), and with `exact`
    /// the list as Latin-1 text as well.
    pub fn to_json_meta(&self, exact: bool) -> super::ResponseMeta {
        let list: Vec<(String, String)> = self
            .fields()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    super::latin1_to_string(v),
                )
            })
            .collect();
        super::ResponseMeta {
            status: self.status,
            reason: String::from_utf8_lossy(self.reason()).into_owned(),
            headers: flat(&list),
            header_list: exact.then_some(list),
        }
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("reason", &String::from_utf8_lossy(self.reason()))
            .field("fields", &self.p.count)
            .finish()
    }
}

/// The flat v1 map: lower-case names, duplicates joined (RFC 9110 §5.3).
pub fn flat(list: &[(String, String)]) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = Vec::with_capacity(list.len());
    for (n, v) in list {
        let lower = n.to_ascii_lowercase();
        match headers.iter_mut().find(|(k, _)| *k == lower) {
            Some((_, existing)) => {
                existing.push_str(", ");
                existing.push_str(v);
            }
            None => headers.push((lower, v.clone())),
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(method: &[u8], target: &[u8], fields: &[(Vec<u8>, Vec<u8>)]) -> Request {
        let mut b = Builder::request(method, target, 0);
        for (n, v) in fields {
            b.field(n, v);
        }
        b.finish_request()
    }

    #[test]
    fn layout_is_the_documented_one() {
        let r = request(b"GET", b"/a?b", &[(b"Host".to_vec(), b"h".to_vec())]);
        let want: &[u8] = b"\xB1\0\0\0\x03GET\0\0\0\x04/a?b\0\0\0\x01\0\0\0\x04Host\0\0\0\x01h";
        assert_eq!(r.as_bytes(), want);
        let mut b = Builder::response(204, b"No Content", 0);
        b.field_parts(b"x-forwarded-for", &[b"1.2.3.4", b", ", b"5.6.7.8"]);
        let resp = b.finish_response();
        assert_eq!(&resp.as_bytes()[..3], b"\xB1\x00\xCC");
        let got: Vec<_> = resp.fields().collect();
        assert_eq!(got, [(&b"x-forwarded-for"[..], &b"1.2.3.4, 5.6.7.8"[..])]);
        assert!(!is_binary(b"{\"status\":200}") && is_binary(resp.as_bytes()));
    }

    #[test]
    fn a_field_added_later_follows_the_others() {
        let f = |n: &[u8], v: &[u8]| (n.to_vec(), v.to_vec());
        let r = request(b"POST", b"/up", &[f(b"host", b"h"), f(b"a", b"1")]);
        let more = r.with_field(b"content-length", b"12");
        let want = request(
            b"POST",
            b"/up",
            &[f(b"host", b"h"), f(b"a", b"1"), f(b"content-length", b"12")],
        );
        assert_eq!(more, want);
        assert_eq!(r.fields().count(), 2, "the original is unchanged");
    }

    /// Metas share the thread's arena: one that is kept while thousands
    /// of others are built and dropped (the arena filled, reclaimed and
    /// written over many times) keeps its bytes, and each parses back to
    /// what was written. (That building allocates nothing is counted by
    /// `bench.py --allocs`, not here.)
    #[test]
    fn metas_built_in_the_arena_keep_their_bytes_while_others_come_and_go() {
        let build = |i: usize| {
            let mut b = Builder::request(b"GET", format!("/r/{i}").as_bytes(), 64);
            b.field(b"x-n", i.to_string().as_bytes());
            b.finish_request()
        };
        let kept: Vec<Request> = (0..50).map(build).collect();
        // One buffer: each meta is written right after the one before.
        for w in kept.windows(2) {
            let end = w[0].as_bytes().as_ptr_range().end;
            assert_eq!(w[1].as_bytes().as_ptr(), end, "metas share the arena");
        }
        let mut live = std::collections::VecDeque::new();
        for round in 0..5000 {
            live.push_back((round, build(1000 + round)));
            // A few in flight at once, dropped in order.
            if live.len() > 8 {
                let (r, m) = live.pop_front().unwrap();
                assert_eq!(m.target(), format!("/r/{}", 1000 + r).as_bytes());
            }
        }
        for (i, m) in kept.iter().enumerate() {
            let want = build(i);
            assert_eq!(m.as_bytes(), want.as_bytes(), "meta {i}");
            assert_eq!(
                m.fields().collect::<Vec<_>>(),
                want.fields().collect::<Vec<_>>()
            );
        }
        // A meta too large to share the arena has a buffer of its own.
        let big = vec![b'v'; ARENA_SIZE];
        let mut b = Builder::response(200, b"OK", ARENA_SIZE + 64);
        b.field(b"x-big", &big);
        let r = b.finish_response();
        assert_eq!(r.fields().next().map(|(_, v)| v.len()), Some(ARENA_SIZE));
        assert_eq!(build(7).as_bytes(), kept[7].as_bytes());
    }

    #[test]
    fn truncated_or_trailing_bytes_are_refused() {
        let r = request(b"POST", b"/", &[(b"a".to_vec(), b"1".to_vec())]);
        let raw = r.as_bytes();
        for cut in 0..raw.len() {
            assert!(
                Request::parse(Bytes::copy_from_slice(&raw[..cut])).is_err(),
                "cut {cut}"
            );
        }
        let mut long = raw.to_vec();
        long.push(0);
        assert!(Request::parse(Bytes::from(long)).is_err());
        let mut huge = raw.to_vec();
        huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Request::parse(Bytes::from(huge)).is_err());
        let bad_status = b"\xB1\x00\x63\0\0\0\0\0\0\0\0";
        assert_eq!(
            Response::parse(Bytes::from_static(bad_status)),
            Err(MetaError::Status(99))
        );
    }

    #[test]
    fn json_forms_keep_bytes_and_order() {
        let mut b = Builder::response(200, b"OK", 0);
        b.field(b"Set-Cookie", b"a=1");
        b.field(b"set-cookie", b"b=\xff");
        b.field(b"X-One", b"v");
        let r = b.finish_response();
        let exact = r.to_json_meta(true);
        assert_eq!(
            exact.headers,
            [
                ("set-cookie".to_string(), "a=1, b=\u{ff}".to_string()),
                ("x-one".into(), "v".into())
            ]
        );
        assert_eq!(Response::from_json_meta(&exact), r);
        let v1 = r.to_json_meta(false);
        assert!(v1.header_list.is_none());
        let back = Response::from_json_meta(&v1);
        assert_eq!(back.fields().count(), 2);
    }

    proptest! {
        /// Whatever is built parses back to the same parts; whatever bytes
        /// arrive never panic the parser.
        #[test]
        fn round_trip_and_no_panic(
            method in proptest::collection::vec(any::<u8>(), 0..12),
            target in proptest::collection::vec(any::<u8>(), 0..40),
            fields in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..10),
                 proptest::collection::vec(any::<u8>(), 0..30)), 0..12),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let r = request(&method, &target, &fields);
            prop_assert_eq!(r.method(), &method[..]);
            prop_assert_eq!(r.target(), &target[..]);
            let got: Vec<(Vec<u8>, Vec<u8>)> =
                r.fields().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            prop_assert_eq!(got, fields);
            let again = Request::parse(Bytes::copy_from_slice(r.as_bytes())).unwrap();
            prop_assert_eq!(again, r);
            let mut j = vec![MARKER];
            j.extend_from_slice(&junk);
            let _ = Request::parse(Bytes::from(j.clone()));
            let _ = Response::parse(Bytes::from(j));
        }
    }
}
