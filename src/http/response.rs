//! Response head parser for the receiver's client to the local app
//! (RFC 9112 §4, §6.3).
//!
//! Owns: finding the end of a response head and deciding how its body is
//! framed. The app is trusted more than the internet but may be sloppy, so
//! this side is lenient where leniency cannot change the framing — bare LF
//! line endings (RFC 9112 §2.2 allows a recipient to accept them),
//! whitespace before a colon (§5.1 lets a proxy strip it), several spaces
//! after the status code — and strict wherever the body length would
//! become a guess. The head is re-encoded before it reaches the client, so
//! none of the leniency leaks downstream. Any error here means the caller
//! answers the client with 502 (§6.3 item 5) and drops the app connection.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::framing::{span, tokeniser_error, Framing, STACK_HEADERS};
use super::headers::list_elements;
use super::{find_header, slice_str, HeadError, HeaderList, HeaderPos, Limits};

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body whatever the fields say: a response to HEAD, 1xx, 204, 304
    /// (§6.3 item 1).
    None,
    /// Exactly this many bytes (§6.3 item 6).
    ContentLength(u64),
    /// Chunked (§6.3 item 4). If the app also sent Content-Length it must
    /// not be forwarded (§6.3 item 3).
    Chunked,
    /// No framing field: the body runs until the app closes (§6.3 item 8).
    UntilClose,
}

/// A parsed response head. Ranges index the buffer given to
/// [`parse_response_head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the head, final empty line included.
    pub head_len: usize,
    /// 100..=599.
    pub status: u16,
    /// The reason phrase; empty if absent or if it held obs-text.
    pub reason: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    pub headers: HeaderList,
    pub body: ResponseBody,
    /// Whether the app connection can be reused after this response
    /// (RFC 9112 §9.3); false whenever the body runs until close or the
    /// framing was suspicious (Content-Length beside Transfer-Encoding).
    pub keep_alive: bool,
    /// Content-Length and Transfer-Encoding were both present; the body
    /// is chunked and Content-Length must be dropped when forwarding
    /// (RFC 9112 §6.3 item 3).
    pub content_length_ignored: bool,
}

impl ResponseHead {
    pub fn reason<'a>(&self, buf: &'a [u8]) -> &'a str {
        slice_str(buf, &self.reason)
    }

    /// An interim response the caller skips before the final one
    /// (RFC 9110 §15.2). 101 is excluded: it ends HTTP on the connection
    /// rather than preceding a final response.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// First value of field `name` (case-insensitive).
    pub fn header<'a>(&self, buf: &'a [u8], name: &str) -> Option<&'a [u8]> {
        find_header(&self.headers, buf, name)
    }
}

/// Parse a response head at the start of `buf`. `request_was_head` says
/// whether it answers a HEAD request (whose response never has a body).
///
/// `Ok(None)`: incomplete, read more. `Err(_)`: answer the client 502.
pub fn parse_response_head(
    buf: &[u8],
    limits: &Limits,
    request_was_head: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    // httparse never looks past the window, so a flood costs max_head.
    let window = &buf[..buf.len().min(limits.max_head)];

    let mut config = httparse::ParserConfig::default();
    config
        .allow_spaces_after_header_name_in_responses(true)
        .allow_multiple_spaces_in_response_status_delimiters(true);
    // Left at their strict defaults: obs-fold (§5.2 would require
    // rewriting the value, and ranges cannot) and skipping invalid lines
    // (a dropped line could be a framing field).
    //
    // Slots on the stack first: a heap of `max_headers` slots (1,000 on the
    // receiver) cost a 32 KB zeroed allocation per call, 8 % of the
    // receiver's CPU at 1 KiB. Only a head with more headers than the stack
    // holds pays for the heap, and only when the limit allows it.
    //
    // The stack slots are left uninitialised: httparse writes each one it
    // fills, and `res.headers` covers only those. Filling all 128 with
    // EMPTY_HEADER first (4 KiB of stores) was two thirds of this
    // function's own time, about 1.2 % of the receiver's CPU at 1 KiB.
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap;
    let mut res = httparse::Response::new(&mut []);
    let mut parsed = config.parse_response_with_uninit_headers(
        &mut res,
        window,
        &mut stack[..limits.max_headers.min(STACK_HEADERS)],
    );
    if matches!(parsed, Err(httparse::Error::TooManyHeaders)) && limits.max_headers > STACK_HEADERS
    {
        heap = vec![httparse::EMPTY_HEADER; limits.max_headers];
        res = httparse::Response::new(&mut heap);
        parsed = config.parse_response(&mut res, window);
    }
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Err(HeadError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(tokeniser_error(e)),
    };
    let (Some(version_minor), Some(status), Some(reason)) = (res.version, res.code, res.reason)
    else {
        return Err(HeadError::Malformed("incomplete status-line"));
    };
    // Codes outside 100..=599 have no class to fall back to (RFC 9110 §15).
    if !(100..=599).contains(&status) {
        return Err(HeadError::InvalidStatus);
    }
    let head = &window[..head_len];

    let mut headers = HeaderList::with_capacity(res.headers.len());
    let mut framing = Framing::default();
    let (mut conn_close, mut conn_keep_alive) = (false, false);
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            framing.add_content_length(h.value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.add_transfer_encoding(h.value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in list_elements(h.value) {
                conn_close |= t.eq_ignore_ascii_case(b"close");
                conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.push(HeaderPos {
            name: span(head, name),
            value: span(head, h.value),
        });
    }

    let mut keep_alive = !conn_close && (version_minor == 1 || conn_keep_alive);
    let mut content_length_ignored = false;
    if framing.te_present {
        // RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is
        // faulty even with a Content-Length.
        if version_minor == 0 {
            return Err(HeadError::TransferEncodingInHttp10);
        }
        // §6.3 item 4 would read a non-chunked coding until close, but the
        // proxy strips Transfer-Encoding, so the client would get coded
        // bytes with nothing saying so: refuse instead.
        framing.check_transfer_encoding()?;
        if framing.content_length.is_some() {
            // §6.3 item 3: Transfer-Encoding wins; the app may be
            // desynchronised, so do not reuse the connection.
            content_length_ignored = true;
            keep_alive = false;
        }
    }

    // RFC 9112 §6.3, in its order.
    let body = if request_was_head || (100..200).contains(&status) || status == 204 || status == 304
    {
        ResponseBody::None
    } else if framing.te_present {
        ResponseBody::Chunked
    } else if let Some(n) = framing.content_length {
        ResponseBody::ContentLength(n)
    } else {
        keep_alive = false;
        ResponseBody::UntilClose
    };

    Ok(Some(ResponseHead {
        head_len,
        status,
        reason: span(head, reason.as_bytes()),
        version_minor,
        headers,
        body,
        keep_alive,
        content_length_ignored,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8], head: bool) -> Result<Option<ResponseHead>, HeadError> {
        parse_response_head(buf, &Limits::default(), head)
    }

    fn ok(buf: &[u8]) -> ResponseHead {
        parse(buf, false).expect("parse error").expect("incomplete")
    }

    #[test]
    fn content_length_response() {
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello";
        let h = ok(buf);
        assert_eq!(h.status, 200);
        assert_eq!(h.reason(buf), "OK");
        assert_eq!(h.head_len, buf.len() - 5);
        assert_eq!(h.body, ResponseBody::ContentLength(5));
        assert!(h.keep_alive);
        assert_eq!(h.header(buf, "x-a"), Some(&b"b"[..]));
        assert!(!h.is_interim());
    }

    #[test]
    fn incomplete_at_every_split_point() {
        let full = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nServer: x\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut], false), Ok(None), "cut at {cut}");
        }
        assert_eq!(ok(full).head_len, full.len());
    }

    #[test]
    fn interim_1xx_returned_without_body() {
        let buf = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let h = ok(buf);
        assert_eq!(h.status, 100);
        assert!(h.is_interim());
        assert_eq!(h.body, ResponseBody::None);
        let rest = &buf[h.head_len..];
        assert_eq!(ok(rest).status, 200);

        let h = ok(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nContent-Length: 9\r\n\r\n");
        assert!(h.is_interim());
        assert_eq!(h.body, ResponseBody::None);
        assert!(!ok(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_interim());
    }

    #[test]
    fn no_body_for_204_304_and_head() {
        for buf in [
            &b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ] {
            let h = ok(buf);
            assert_eq!(h.body, ResponseBody::None, "{}", h.status);
            assert!(h.keep_alive);
        }
        let h = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.body, ResponseBody::None);
        // The same head for GET has a body.
        assert_eq!(
            ok(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n").body,
            ResponseBody::ContentLength(1000)
        );
    }

    #[test]
    fn chunked_response() {
        let h = ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body, ResponseBody::Chunked);
        assert!(h.keep_alive);
        assert!(!h.content_length_ignored);
    }

    #[test]
    fn te_wins_over_cl_and_connection_not_reused() {
        let h = ok(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body, ResponseBody::Chunked);
        assert!(h.content_length_ignored);
        assert!(!h.keep_alive);
    }

    #[test]
    fn until_close_without_framing() {
        let h = ok(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n");
        assert_eq!(h.body, ResponseBody::UntilClose);
        assert!(!h.keep_alive);
    }

    #[test]
    fn keep_alive_rules() {
        assert!(
            !ok(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive
        );
        assert!(!ok(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
        let h = ok(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n");
        assert!(h.keep_alive);
        assert_eq!(h.version_minor, 0);
    }

    #[test]
    fn framing_errors() {
        let cases: [(&[u8], HeadError); 6] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                HeadError::DifferingContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                HeadError::InvalidContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                HeadError::ChunkedNotLast,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                HeadError::ChunkedTwice,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                HeadError::UnsupportedTransferCoding,
            ),
            (
                b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::TransferEncodingInHttp10,
            ),
        ];
        for (buf, want) in cases {
            assert_eq!(
                parse(buf, false),
                Err(want),
                "{}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    #[test]
    fn invalid_status_refused() {
        for buf in [&b"HTTP/1.1 099 X\r\n\r\n"[..], b"HTTP/1.1 600 X\r\n\r\n"] {
            assert_eq!(parse(buf, false), Err(HeadError::InvalidStatus));
        }
        assert!(matches!(
            parse(b"HTTP/1.1 2000 OK\r\n\r\n", false),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"ICY 200 OK\r\n\r\n", false),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn lenient_where_unambiguous() {
        // Bare LF line endings, space before colon, double space.
        let buf = b"HTTP/1.1  200 OK\nContent-Length : 2\n\nhi";
        let h = ok(buf);
        assert_eq!(h.body, ResponseBody::ContentLength(2));
        assert_eq!(h.headers[0].name(buf), "Content-Length");
        assert_eq!(&buf[h.head_len..], b"hi");
        // No reason phrase at all.
        let buf = b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(ok(buf).reason(buf), "");
    }

    #[test]
    fn strict_where_ambiguous() {
        // obs-fold and bare CR are refused.
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse(
            b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",
            false
        )
        .is_err());
    }

    #[test]
    fn obs_text_reason_is_empty_range() {
        let buf = b"HTTP/1.1 200 \xffok\r\nContent-Length: 0\r\n\r\n";
        let h = ok(buf);
        assert_eq!(h.reason(buf), "");
    }

    #[test]
    fn limits_apply() {
        let limits = Limits {
            max_head: 40,
            max_headers: 1,
            ..Limits::default()
        };
        let big = b"HTTP/1.1 200 OK\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        assert_eq!(
            parse_response_head(big, &limits, false),
            Err(HeadError::HeadTooLarge)
        );
        assert_eq!(
            parse_response_head(&big[..40], &limits, false),
            Err(HeadError::HeadTooLarge)
        );
        let two = b"HTTP/1.1 200 OK\r\nA: 1\r\nB: 2\r\n\r\n";
        assert_eq!(
            parse_response_head(two, &limits, false),
            Err(HeadError::TooManyHeaders)
        );
    }

    /// More headers than the stack holds: the limit, not the stack, decides.
    #[test]
    fn heads_past_the_stack_slots_follow_the_limit() {
        let head = |n: usize| {
            let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..n {
                h.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            h.extend_from_slice(b"\r\n");
            h
        };
        let limits = Limits {
            max_headers: 1000,
            ..Limits::default()
        };
        for n in [STACK_HEADERS, STACK_HEADERS + 1, 1000] {
            let h = parse_response_head(&head(n), &limits, false)
                .unwrap()
                .unwrap();
            assert_eq!(h.headers.len(), n);
        }
        assert_eq!(
            parse_response_head(&head(1001), &limits, false),
            Err(HeadError::TooManyHeaders)
        );
    }
}
