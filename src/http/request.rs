//! Request head parser for the gateway's public port (RFC 9112 §2–§3, §6).
//!
//! Owns: finding the end of a request head, enforcing the size limits, and
//! deciding how the body is framed. Must never accept a head that two
//! HTTP implementations could frame differently — that is request
//! smuggling (RFC 9112 §11.2) — so anything ambiguous is an error, and
//! every error closes the connection.
//!
//! httparse does the tokenising. A strict pre-scan runs first because
//! httparse accepts a bare LF as a line ending (RFC 9112 §2.2 allows a
//! recipient to), and a front-end that does while the app behind it does
//! not is exactly the disagreement smuggling needs. The pre-scan also finds
//! the end of the head, so the request-line and head limits are checked
//! before httparse sees a byte and without re-parsing on every read.

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::ops::Range;

use super::framing::{is_valid_authority, span, tokeniser_error, Framing, STACK_HEADERS};
use super::headers::{is_tchar, list_elements, token_list_contains};
use super::{find_header, slice_str, HeadError, HeaderList, HeaderPos, Limits};

/// How the request body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// Neither Content-Length nor Transfer-Encoding: no body (§6.3 item 7).
    None,
    /// Exactly this many bytes follow the head (may be 0).
    ContentLength(u64),
    /// Chunked transfer coding (RFC 9112 §7.1); decode with
    /// `ChunkedDecoder`.
    Chunked,
}

/// Which request-target form was used (RFC 9112 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query` (§3.2.1).
    Origin,
    /// `http://authority/path?query` (§3.2.2). `path` is what follows the
    /// authority and may be empty or start with `?`; use
    /// [`RequestHead::path_and_query`] for an origin-form string.
    Absolute {
        authority: Range<usize>,
        path: Range<usize>,
    },
    /// `*`, only with OPTIONS (§3.2.4).
    Asterisk,
}

/// A parsed request head. Ranges index the buffer given to
/// [`parse_request_head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, leading empty lines and the final CRLF included:
    /// the body (or the next pipelined request) starts here.
    pub head_len: usize,
    pub method: Range<usize>,
    /// The request-target as received (not normalised: dot-segments and
    /// percent-encodings are the router's business).
    pub target: Range<usize>,
    pub form: TargetForm,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    pub headers: HeaderList,
    pub body: BodyKind,
    /// Whether the connection may carry another request after this one
    /// (RFC 9112 §9.3).
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request (RFC 9110 §10.1.1;
    /// ignored in HTTP/1.0 as that section requires).
    pub expect_continue: bool,
    /// The effective authority: the Host value, or for absolute-form the
    /// target's authority, which RFC 9112 §3.2.2 says wins over Host.
    pub host: Option<Range<usize>>,
    /// `Upgrade` present and `Connection: upgrade`, in HTTP/1.1 (RFC 9110
    /// §7.8 says an Upgrade in HTTP/1.0 must be ignored).
    pub upgrade: bool,
}

impl RequestHead {
    pub fn method<'a>(&self, buf: &'a [u8]) -> &'a str {
        slice_str(buf, &self.method)
    }

    pub fn target<'a>(&self, buf: &'a [u8]) -> &'a str {
        slice_str(buf, &self.target)
    }

    /// The effective authority (see [`RequestHead::host`]).
    pub fn host<'a>(&self, buf: &'a [u8]) -> Option<&'a str> {
        self.host.as_ref().map(|r| slice_str(buf, r))
    }

    /// The target as origin-form (`/path?query`), what routing and the
    /// forwarded request use. Borrowed except for an absolute-form target
    /// with an empty path and a query (`http://h?q`), where a `/` has to be
    /// prepended — rare enough that the allocation does not matter.
    pub fn path_and_query<'a>(&self, buf: &'a [u8]) -> Cow<'a, str> {
        match &self.form {
            TargetForm::Origin | TargetForm::Asterisk => Cow::Borrowed(self.target(buf)),
            TargetForm::Absolute { path, .. } => {
                let p = slice_str(buf, path);
                if p.is_empty() {
                    Cow::Borrowed("/")
                } else if p.starts_with('/') {
                    Cow::Borrowed(p)
                } else {
                    Cow::Owned(format!("/{p}"))
                }
            }
        }
    }

    /// The raw path and raw query (without `?`) of the target, as bytes of
    /// `buf`: from the parsed form, no search. An absolute-form target
    /// with an empty path (`http://h`, `http://h?q`) has the path `/`.
    pub fn path_query<'a>(&self, buf: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        let t: &'a [u8] = match &self.form {
            TargetForm::Origin | TargetForm::Asterisk => &buf[self.target.clone()],
            TargetForm::Absolute { path, .. } => &buf[path.clone()],
        };
        let (p, q) = match t.iter().position(|b| *b == b'?') {
            Some(i) => (&t[..i], &t[i + 1..]),
            None => (t, &[][..]),
        };
        (if p.is_empty() { b"/" } else { p }, q)
    }

    /// First value of field `name` (case-insensitive).
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        find_header(&self.headers, buf, name)
    }
}

/// Parse a request head at the start of `buf`.
///
/// `Ok(None)`: the head is incomplete, read more and call again with the
/// grown buffer. `Ok(Some(head))`: `buf[..head.head_len]` is the head.
/// `Err(e)`: answer `e.status()` and close the connection.
pub fn parse_request_head(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HeadError> {
    let Some(scan) = scan_head(buf, limits)? else {
        return Ok(None);
    };
    let head = &buf[..scan.head_end];

    // Slots on the stack first, left uninitialised (see
    // `parse_response_head`); the heap only for a head with more than
    // STACK_HEADERS headers under a limit that allows it. Default config
    // on purpose: it refuses obs-fold, whitespace before the colon, and
    // repeated spaces in the request-line (RFC 9112 §3, §5.1).
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap;
    let mut req = httparse::Request::new(&mut []);
    let mut parsed =
        req.parse_with_uninit_headers(head, &mut stack[..limits.max_headers.min(STACK_HEADERS)]);
    if matches!(parsed, Err(httparse::Error::TooManyHeaders)) && limits.max_headers > STACK_HEADERS
    {
        heap = vec![httparse::EMPTY_HEADER; limits.max_headers];
        req = httparse::Request::new(&mut heap);
        parsed = req.parse(head);
    }
    match parsed {
        Ok(httparse::Status::Complete(n)) if n == scan.head_end => {}
        // The pre-scan found the empty line, so httparse must agree.
        Ok(_) => return Err(HeadError::Malformed("head end mismatch")),
        Err(httparse::Error::HeaderName) => {
            return Err(classify_field_name_error(head, scan.line_end + 2))
        }
        Err(e) => return Err(tokeniser_error(e)),
    }
    let (Some(method), Some(path), Some(version_minor)) = (req.method, req.path, req.version)
    else {
        return Err(HeadError::Malformed("incomplete request-line"));
    };
    let method_range = span(head, method.as_bytes());
    let target_range = span(head, path.as_bytes());

    let mut headers = HeaderList::with_capacity(req.headers.len());
    let mut framing = Framing::default();
    let mut host = None;
    let mut host_count = 0u32;
    let (mut conn_close, mut conn_keep_alive, mut conn_upgrade) = (false, false, false);
    let mut expect_continue = false;
    let mut upgrade_present = false;

    for h in req.headers.iter() {
        let pos = HeaderPos {
            name: span(head, h.name.as_bytes()),
            value: span(head, h.value),
        };
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            framing.add_content_length(h.value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.add_transfer_encoding(h.value);
        } else if name.eq_ignore_ascii_case(b"host") {
            host_count += 1;
            host = Some(pos.value.clone());
            if !is_valid_authority(h.value) {
                return Err(HeadError::InvalidHost);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in list_elements(h.value) {
                conn_close |= t.eq_ignore_ascii_case(b"close");
                conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                conn_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= token_list_contains(h.value, "100-continue");
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade_present = true;
        }
        headers.push(pos);
    }

    // Framing (RFC 9112 §6.1, §6.3). Checked before anything else about
    // the request so a smuggling attempt is logged as one.
    if framing.te_present {
        if version_minor == 0 {
            return Err(HeadError::TransferEncodingInHttp10);
        }
        if framing.content_length.is_some() {
            return Err(HeadError::ContentLengthWithTransferEncoding);
        }
        framing.check_transfer_encoding()?;
    }
    let body = match (framing.te_present, framing.content_length) {
        (true, _) => BodyKind::Chunked,
        (false, Some(n)) => BodyKind::ContentLength(n),
        (false, None) => BodyKind::None,
    };

    // Host (RFC 9112 §3.2): exactly one in HTTP/1.1, at most one in 1.0.
    if host_count > 1 {
        return Err(HeadError::MultipleHost);
    }
    if host_count == 0 && version_minor == 1 {
        return Err(HeadError::MissingHost);
    }

    let form = target_form(head, method, path)?;
    if let TargetForm::Absolute { authority, .. } = &form {
        host = Some(authority.clone());
    }

    let http11 = version_minor == 1;
    Ok(Some(RequestHead {
        head_len: scan.head_end,
        method: method_range,
        target: target_range,
        form,
        version_minor,
        headers,
        body,
        // RFC 9112 §9.3: 1.1 persists unless "close"; 1.0 only with
        // "keep-alive" (§9.3, Appendix C.2.2).
        keep_alive: !conn_close && (http11 || conn_keep_alive),
        expect_continue: expect_continue && http11,
        host,
        upgrade: http11 && upgrade_present && conn_upgrade,
    }))
}

/// Where the pre-scan found the request-line and the head end.
struct Scan {
    /// Offset of the CR ending the request-line.
    line_end: usize,
    /// Offset just past the empty line ending the head.
    head_end: usize,
}

/// Find the end of the head, refusing bare CR/LF and line-leading
/// whitespace on the way and enforcing `max_request_line` and `max_head`.
/// Looks at no more than `max_head` bytes, so a flood costs at most that.
fn scan_head(buf: &[u8], limits: &Limits) -> Result<Option<Scan>, HeadError> {
    let window = &buf[..buf.len().min(limits.max_head)];

    // RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF)
    // received before the request-line. They still count in head_len.
    let mut line_start = 0;
    while window.get(line_start..line_start + 2) == Some(b"\r\n") {
        line_start += 2;
    }
    let request_line_start = line_start;
    let mut request_line_end = None;

    let mut pos = line_start;
    while let Some(off) = memchr::memchr2(b'\r', b'\n', &window[pos..]) {
        let p = pos + off;
        if window[p] == b'\n' {
            // Every LF that is part of a CRLF is stepped over below, so
            // any LF found here has no CR before it.
            return Err(HeadError::BareLf);
        }
        match window.get(p + 1) {
            Some(b'\n') => {}
            Some(_) => return Err(HeadError::BareCr),
            None => break, // the LF has not arrived yet
        }
        match request_line_end {
            None => {
                if p - request_line_start > limits.max_request_line {
                    return Err(HeadError::UriTooLong);
                }
                request_line_end = Some(p);
            }
            Some(line_end) if p == line_start => {
                return Ok(Some(Scan {
                    line_end,
                    head_end: p + 2,
                }));
            }
            Some(_) => {}
        }
        line_start = p + 2;
        // RFC 9112 §5.2 (obs-fold) and §2.2 (whitespace between start-line
        // and first field): a line may not start with SP or HTAB.
        if matches!(window.get(line_start), Some(b' ' | b'\t')) {
            return Err(HeadError::ObsFold);
        }
        pos = line_start;
    }

    if request_line_end.is_none() {
        // A trailing CR may be the start of the CRLF, not part of the line.
        let partial = window.len() - request_line_start - usize::from(window.ends_with(b"\r"));
        if partial > limits.max_request_line {
            return Err(HeadError::UriTooLong);
        }
    }
    if buf.len() >= limits.max_head {
        // `window` is full and holds no complete head: any head here would
        // be longer than max_head.
        return Err(HeadError::HeadTooLarge);
    }
    Ok(None)
}

/// httparse reports "invalid field name" for several causes; tell the one
/// RFC 9112 §5.1 singles out (whitespace before the colon, which must be
/// answered with 400) from other garbage.
fn classify_field_name_error(head: &[u8], fields_start: usize) -> HeadError {
    let fields = head.get(fields_start..).unwrap_or_default();
    for line in fields.split(|&b| b == b'\n') {
        let name_len = line.iter().take_while(|&&b| is_tchar(b)).count();
        let rest = &line[name_len..];
        let after_ws = rest.iter().position(|&b| b != b' ' && b != b'\t');
        if name_len > 0 && after_ws.is_some_and(|i| i > 0 && rest[i] == b':') {
            return HeadError::SpaceBeforeColon;
        }
    }
    HeadError::Malformed("invalid field name")
}

/// Classify the request-target (RFC 9112 §3.2). The gateway serves
/// origin-form, accepts absolute-form as §3.2.2 requires of servers, and
/// `*` only for OPTIONS; authority-form (CONNECT) is not served. No form
/// has a fragment (origin-form is path and query; absolute-form is an
/// absolute-URI, RFC 3986 §4.3): a `#` is refused rather than routed on as
/// part of the path while the app may read it as the fragment's start.
fn target_form(head: &[u8], method: &str, target: &str) -> Result<TargetForm, HeadError> {
    let t = target.as_bytes();
    if t.contains(&b'#') {
        return Err(HeadError::InvalidTarget(
            "'#' (a fragment) in request-target",
        ));
    }
    if t.first() == Some(&b'/') {
        return Ok(TargetForm::Origin);
    }
    if t == b"*" {
        return if method == "OPTIONS" {
            Ok(TargetForm::Asterisk)
        } else {
            Err(HeadError::InvalidTarget("'*' target without OPTIONS"))
        };
    }
    // Scheme names are case-insensitive (RFC 3986 §3.1).
    let after_scheme = if t.len() >= 7 && t[..7].eq_ignore_ascii_case(b"http://") {
        7
    } else if t.len() >= 8 && t[..8].eq_ignore_ascii_case(b"https://") {
        8
    } else {
        return Err(HeadError::InvalidTarget(
            "request-target not origin-form or http(s) absolute-form",
        ));
    };
    let rest = &t[after_scheme..];
    let authority_len = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?'))
        .unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    // An http(s) URI with an empty host is invalid (RFC 9110 §4.2.1, §4.2.2).
    if authority.is_empty() || !is_valid_authority(authority) {
        return Err(HeadError::InvalidTarget(
            "invalid authority in absolute-form",
        ));
    }
    Ok(TargetForm::Absolute {
        authority: span(head, authority),
        path: span(head, &rest[authority_len..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head's field list goes back to the thread's free list when the
    /// head is dropped and serves the next head empty: the next request
    /// sees its own fields only, in order.
    #[test]
    fn a_reused_field_list_holds_only_the_next_heads_fields() {
        let l = Limits::default();
        let big = b"GET /a HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        let small = b"GET /b HTTP/1.1\r\nHost: g\r\nZ: 9\r\n\r\n";
        let first = parse_request_head(big, &l).unwrap().unwrap();
        assert_eq!(first.headers.len(), 5);
        let kept = first.clone();
        let storage = first.headers.as_ptr();
        drop(first);
        for _ in 0..3 {
            let h = parse_request_head(small, &l).unwrap().unwrap();
            // The same vector, back from the list (no allocation).
            assert_eq!(h.headers.as_ptr(), storage);
            let names: Vec<_> = h.headers.iter().map(|p| p.name(small)).collect();
            assert_eq!(names, ["Host", "Z"]);
            assert_eq!(h.headers[1].value(small), b"9");
        }
        // A clone is a list of its own.
        let names: Vec<_> = kept.headers.iter().map(|p| p.name(big)).collect();
        assert_eq!(names, ["Host", "A", "B", "C", "D"]);
    }

    #[test]
    fn path_query_from_each_form() {
        for (req, path, query) in [
            (
                &b"GET /a/b?x=1&y HTTP/1.1\r\nHost: h\r\n\r\n"[..],
                &b"/a/b"[..],
                &b"x=1&y"[..],
            ),
            (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n", b"/a", b""),
            (
                b"GET http://h:1/p?q HTTP/1.1\r\nHost: h:1\r\n\r\n",
                b"/p",
                b"q",
            ),
            (b"GET http://h:1 HTTP/1.1\r\nHost: h:1\r\n\r\n", b"/", b""),
            (b"GET http://h?q HTTP/1.1\r\nHost: h\r\n\r\n", b"/", b"q"),
            (b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", b"*", b""),
        ] {
            let h = parse_request_head(req, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!(
                h.path_query(req),
                (path, query),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request_head(buf, &Limits::default())
    }

    fn ok(buf: &[u8]) -> RequestHead {
        parse(buf).expect("parse error").expect("incomplete head")
    }

    fn status_of(buf: &[u8]) -> u16 {
        parse(buf).expect_err("expected an error").status()
    }

    fn err(buf: &[u8]) -> HeadError {
        parse(buf).expect_err("expected an error")
    }

    const SIMPLE: &[u8] = b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n";

    #[test]
    fn simple_get() {
        let h = ok(SIMPLE);
        assert_eq!(h.head_len, SIMPLE.len());
        assert_eq!(h.method(SIMPLE), "GET");
        assert_eq!(h.target(SIMPLE), "/a/b?c=d");
        assert_eq!(h.form, TargetForm::Origin);
        assert_eq!(h.version_minor, 1);
        assert_eq!(h.host(SIMPLE), Some("example.com"));
        assert_eq!(h.headers.len(), 2);
        assert_eq!(h.headers[1].name(SIMPLE), "User-Agent");
        assert_eq!(h.headers[1].value(SIMPLE), b"t");
        assert_eq!(h.header(SIMPLE, "user-agent"), Some(&b"t"[..]));
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert!(!h.upgrade);
    }

    #[test]
    fn incomplete_at_every_split_point() {
        let full =
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(ok(full).head_len, full.len());
    }

    #[test]
    fn pipelined_heads() {
        let first = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n";
        let second = b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n";
        let buf = [&first[..], &second[..]].concat();
        let h1 = ok(&buf);
        assert_eq!(h1.head_len, first.len());
        let rest = &buf[h1.head_len..];
        let h2 = ok(rest);
        assert_eq!(h2.target(rest), "/2");
        assert_eq!(h2.head_len, second.len());
    }

    #[test]
    fn body_bytes_after_head_are_not_scanned() {
        // A bare LF in the body is the body's business, not the head's.
        let buf = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\na\nb\r";
        let h = ok(buf);
        assert_eq!(h.body, BodyKind::ContentLength(4));
        assert_eq!(&buf[h.head_len..], b"a\nb\r");
    }

    #[test]
    fn leading_empty_lines_skipped_and_counted() {
        let buf = b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
        let h = ok(buf);
        assert_eq!(h.head_len, buf.len());
        assert_eq!(h.method(buf), "GET");
        assert_eq!(parse(b"\r\n"), Ok(None));
        assert_eq!(parse(b"\r\n\r"), Ok(None));
    }

    #[test]
    fn cl_and_te_is_400() {
        let e = err(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(e, HeadError::ContentLengthWithTransferEncoding);
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn invalid_content_length_is_400() {
        for v in [
            "+5",
            "",
            "5 5",
            "-1",
            "0x5",
            "18446744073709551616",
            "5,",
            ",5",
            "5;",
        ] {
            let buf = format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {v}\r\n\r\n");
            assert_eq!(
                err(buf.as_bytes()),
                HeadError::InvalidContentLength,
                "{v:?}"
            );
            assert_eq!(status_of(buf.as_bytes()), 400);
        }
    }

    #[test]
    fn differing_content_lengths_are_400() {
        let e =
            err(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert_eq!(e, HeadError::DifferingContentLength);
        assert_eq!(e.status(), 400);
        let e = err(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n");
        assert_eq!(e, HeadError::DifferingContentLength);
    }

    #[test]
    fn identical_content_lengths_accepted() {
        let h =
            ok(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 005\r\n\r\n");
        assert_eq!(h.body, BodyKind::ContentLength(5));
        let h = ok(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 7, 7\r\n\r\n");
        assert_eq!(h.body, BodyKind::ContentLength(7));
        let h = ok(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 18446744073709551615\r\n\r\n");
        assert_eq!(h.body, BodyKind::ContentLength(u64::MAX));
    }

    #[test]
    fn chunked_accepted_case_insensitively_across_lines() {
        let h = ok(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: CHUNKED\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
        // Empty list elements are ignored (RFC 9110 §5.6.1).
        let h = ok(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ,\r\nTransfer-Encoding: chunked ,\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked);
    }

    #[test]
    fn te_not_ending_in_chunked_is_400() {
        for te in ["gzip", "chunked, gzip", "", "chunked;x=1", "identity"] {
            let buf = format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(err(buf.as_bytes()), HeadError::ChunkedNotLast, "{te:?}");
            assert_eq!(status_of(buf.as_bytes()), 400);
        }
    }

    #[test]
    fn chunked_twice_is_400() {
        let e = err(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n");
        assert_eq!(e, HeadError::ChunkedTwice);
        assert_eq!(e.status(), 400);
        let e = err(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(e, HeadError::ChunkedTwice);
    }

    #[test]
    fn other_coding_before_chunked_is_501() {
        let e = err(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(e, HeadError::UnsupportedTransferCoding);
        assert_eq!(e.status(), 501);
    }

    #[test]
    fn te_in_http10_is_400() {
        let e = err(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(e, HeadError::TransferEncodingInHttp10);
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn missing_host_in_http11_is_400() {
        let e = err(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n");
        assert_eq!(e, HeadError::MissingHost);
        assert_eq!(e.status(), 400);
        // HTTP/1.0 may omit it.
        let h = ok(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(h.host, None);
        assert_eq!(h.version_minor, 0);
    }

    #[test]
    fn multiple_host_is_400() {
        let e = err(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n");
        assert_eq!(e, HeadError::MultipleHost);
        assert_eq!(e.status(), 400);
        assert_eq!(
            err(b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n"),
            HeadError::MultipleHost
        );
    }

    #[test]
    fn invalid_host_is_400() {
        for v in ["a b", "a/b", "user@evil", "a,b\"", "h\x7f"] {
            let buf = format!("GET / HTTP/1.1\r\nHost: {v}\r\n\r\n");
            let e = parse(buf.as_bytes()).expect_err(v);
            assert_eq!(e.status(), 400, "{v:?}");
        }
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            HeadError::InvalidHost
        );
        // Empty Host is allowed (RFC 9112 §3.2).
        let buf = b"GET / HTTP/1.1\r\nHost:\r\n\r\n";
        assert_eq!(ok(buf).host(buf), Some(""));
    }

    #[test]
    fn bare_lf_is_400() {
        for buf in [
            &b"GET / HTTP/1.1\nHost: h\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: h\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n\n",
            b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"\r\n\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nb\r\n\r\n",
            // Refused before the head is complete, too.
            b"GET / HTTP/1.1\n",
        ] {
            assert_eq!(
                parse(buf),
                Err(HeadError::BareLf),
                "{:?}",
                String::from_utf8_lossy(buf)
            );
            assert_eq!(status_of(buf), 400);
        }
    }

    #[test]
    fn bare_cr_is_400() {
        for buf in [
            &b"GET / HTTP/1.1\rHost: h\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n",
            b"\rGET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\r\n",
        ] {
            assert_eq!(
                parse(buf),
                Err(HeadError::BareCr),
                "{:?}",
                String::from_utf8_lossy(buf)
            );
            assert_eq!(status_of(buf), 400);
        }
    }

    #[test]
    fn obs_fold_is_400() {
        let e = err(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: one\r\n two\r\n\r\n");
        assert_eq!(e, HeadError::ObsFold);
        assert_eq!(e.status(), 400);
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: one\r\n\ttwo\r\n\r\n"),
            HeadError::ObsFold
        );
        // Whitespace between the request-line and the first field.
        assert_eq!(
            err(b"GET / HTTP/1.1\r\n Host: h\r\n\r\n"),
            HeadError::ObsFold
        );
    }

    #[test]
    fn obs_fold_refused_by_httparse_too() {
        // The stack rule says httparse refuses obs-fold in requests by
        // default; pin that, so the pre-scan is not our only defence.
        let mut slots = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut slots);
        assert_eq!(
            req.parse(b"GET / HTTP/1.1\r\nX-A: one\r\n two\r\n\r\n"),
            Err(httparse::Error::HeaderName)
        );
        let mut slots = [httparse::EMPTY_HEADER; 4];
        let mut req = httparse::Request::new(&mut slots);
        assert_eq!(
            req.parse(b"GET / HTTP/1.1\r\nHost : h\r\n\r\n"),
            Err(httparse::Error::HeaderName)
        );
    }

    #[test]
    fn space_before_colon_is_400() {
        let e = err(b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length : 5\r\n\r\n");
        assert_eq!(e, HeadError::SpaceBeforeColon);
        assert_eq!(e.status(), 400);
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost\t: h\r\n\r\n"),
            HeadError::SpaceBeforeColon
        );
        // Other field-name garbage is malformed, not this.
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHo(st: h\r\n\r\n"),
            HeadError::Malformed("invalid field name")
        );
    }

    #[test]
    fn target_must_be_origin_form() {
        for buf in [
            &b"GET example.com HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET http://u@h/x HTTP/1.1\r\nHost: h\r\n\r\n",
            // A fragment, in any form.
            b"GET /x#f HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /x?q=1#f HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET http://h/x#f HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET http://h#f HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            let e = parse(buf).expect_err(&String::from_utf8_lossy(buf));
            assert!(matches!(e, HeadError::InvalidTarget(_)), "{e:?}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn asterisk_for_options() {
        let buf = b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n";
        let h = ok(buf);
        assert_eq!(h.form, TargetForm::Asterisk);
        assert_eq!(h.target(buf), "*");
    }

    #[test]
    fn absolute_form_accepted_and_authority_wins() {
        let buf = b"GET http://Example.com:80/a?b HTTP/1.1\r\nHost: other\r\n\r\n";
        let h = ok(buf);
        assert!(matches!(h.form, TargetForm::Absolute { .. }));
        assert_eq!(h.path_and_query(buf), "/a?b");
        assert_eq!(h.host(buf), Some("Example.com:80"));

        let buf = b"GET HTTPS://h HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(ok(buf).path_and_query(buf), "/");
        let buf = b"GET http://h?q=1 HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(ok(buf).path_and_query(buf), "/?q=1");
    }

    #[test]
    fn request_line_too_long_is_414() {
        let limits = Limits {
            max_request_line: 32,
            ..Limits::default()
        };
        let long = format!("GET /{} HTTP/1.1\r\nHost: h\r\n\r\n", "a".repeat(40));
        let e = parse_request_head(long.as_bytes(), &limits).unwrap_err();
        assert_eq!(e, HeadError::UriTooLong);
        assert_eq!(e.status(), 414);
        // Before the CRLF has arrived.
        let partial = format!("GET /{}", "a".repeat(40));
        assert_eq!(
            parse_request_head(partial.as_bytes(), &limits)
                .unwrap_err()
                .status(),
            414
        );
        // Exactly at the limit, CR received but not LF yet: still fine.
        let at = format!("GET /{} HTTP/1.1\r", "a".repeat(32 - 14));
        assert_eq!(at.len() - 1, 32);
        assert_eq!(parse_request_head(at.as_bytes(), &limits), Ok(None));
    }

    #[test]
    fn head_too_large_is_431() {
        let limits = Limits {
            max_head: 64,
            ..Limits::default()
        };
        let big = format!("GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n", "a".repeat(60));
        let e = parse_request_head(big.as_bytes(), &limits).unwrap_err();
        assert_eq!(e, HeadError::HeadTooLarge);
        assert_eq!(e.status(), 431);
        // Incomplete but already past the limit.
        assert_eq!(
            parse_request_head(&big.as_bytes()[..64], &limits).unwrap_err(),
            HeadError::HeadTooLarge
        );
        // A head of exactly max_head bytes is fine.
        let exact = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(64 - 32)
        );
        assert_eq!(exact.len(), 64);
        assert_eq!(
            parse_request_head(exact.as_bytes(), &limits)
                .unwrap()
                .unwrap()
                .head_len,
            64
        );
    }

    #[test]
    fn too_many_headers_is_431() {
        let limits = Limits {
            max_headers: 3,
            ..Limits::default()
        };
        let three = b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\n\r\n";
        assert!(parse_request_head(three, &limits).unwrap().is_some());
        let four = b"GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        let e = parse_request_head(four, &limits).unwrap_err();
        assert_eq!(e, HeadError::TooManyHeaders);
        assert_eq!(e.status(), 431);
        // Default limit, 101 fields.
        let mut many = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).unwrap_err().status(), 431);
    }

    #[test]
    fn headers_above_stack_slots_use_heap() {
        let limits = Limits {
            max_headers: 200,
            ..Limits::default()
        };
        let mut many = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 0..150 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let h = parse_request_head(&many, &limits).unwrap().unwrap();
        assert_eq!(h.headers.len(), 151);
    }

    #[test]
    fn keep_alive_defaults() {
        assert!(ok(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").keep_alive);
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n").keep_alive);
        assert!(
            !ok(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, close\r\n\r\n").keep_alive
        );
        assert!(!ok(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!ok(b"GET / HTTP/1.0\r\nConnection: closed-ish\r\n\r\n").keep_alive);
    }

    #[test]
    fn expect_continue_only_in_http11() {
        assert!(
            ok(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
                .expect_continue
        );
        assert!(!ok(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        assert!(!ok(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\n\r\n").expect_continue);
    }

    #[test]
    fn upgrade_needs_both_fields() {
        assert!(ok(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n").upgrade);
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n").upgrade);
        assert!(!ok(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n\r\n").upgrade);
        assert!(
            !ok(b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n").upgrade
        );
    }

    #[test]
    fn malformed_request_lines_are_400() {
        for buf in [
            &b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
            b"GET /\r\nHost: h\r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a\x01 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n",
        ] {
            let e = parse(buf).expect_err(&String::from_utf8_lossy(buf));
            assert!(matches!(e, HeadError::Malformed(_)), "{e:?}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn header_values_are_trimmed_ranges() {
        let buf = b"GET / HTTP/1.1\r\nHost:   h  \r\nX-Empty:\r\n\r\n";
        let h = ok(buf);
        assert_eq!(h.host(buf), Some("h"));
        assert_eq!(h.headers[1].value(buf), b"");
        // Accessors never panic on a foreign buffer.
        assert_eq!(h.method(b""), "");
        assert_eq!(h.headers[0].value(b"x"), b"");
    }
}
