//! Field-name and field-value helpers shared by the request and response
//! sides: the hop-by-hop set a proxy strips, comma-separated token lists,
//! canonical reason phrases and a status-line writer.
//!
//! Pure functions over bytes; never allocate except to grow the caller's
//! output buffer.

/// Fields that describe one connection, not the message, and so must not be
/// forwarded by a proxy (RFC 9110 §7.6.1; `Keep-Alive` and
/// `Proxy-Connection` are the legacy ones RFC 9110 names there; `TE`,
/// `Trailer`, `Transfer-Encoding`, `Upgrade` and the `Proxy-Auth*` pair are
/// per-hop by their own definitions, §10.1.4, §6.6.2, RFC 9112 §6.1,
/// §7.8, §11.7). Case-insensitive (RFC 9110 §5.1).
pub fn is_hop_by_hop(name: impl AsRef<[u8]>) -> bool {
    let name = name.as_ref();
    // Dispatch on length first so the common case (a long, ordinary name)
    // costs one compare at most.
    let candidates: &[&str] = match name.len() {
        2 => &["te"],
        7 => &["trailer", "upgrade"],
        10 => &["connection", "keep-alive"],
        16 => &["proxy-connection"],
        17 => &["transfer-encoding"],
        18 => &["proxy-authenticate"],
        19 => &["proxy-authorization"],
        _ => return false,
    };
    candidates
        .iter()
        .any(|c| name.eq_ignore_ascii_case(c.as_bytes()))
}

/// What a proxy must not forward from one message (RFC 9110 §7.6.1): the
/// fixed hop-by-hop set of [`is_hop_by_hop`] plus every field that a
/// `Connection` field of the same message names. Built once per message
/// from its fields, then asked once per field. The one rule for all four
/// crossings: client → gateway → receiver → app and back.
///
/// Allocates only when a `Connection` field names something outside the
/// fixed set (`Connection: keep-alive` alone costs nothing).
#[derive(Debug, Default)]
pub struct HopByHop<'a> {
    named: Vec<&'a [u8]>,
}

impl<'a> HopByHop<'a> {
    /// Collects the names listed by every `Connection` field among
    /// `fields` (`(name, value)` pairs, in any order; several `Connection`
    /// fields combine, RFC 9110 §5.3).
    pub fn of<I>(fields: I) -> Self
    where
        I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
    {
        let mut named = Vec::new();
        for (name, value) in fields {
            if name.eq_ignore_ascii_case(b"connection") {
                // Names already in the fixed set need no entry.
                named.extend(connection_tokens(value).filter(|t| !is_hop_by_hop(t)));
            }
        }
        HopByHop { named }
    }

    /// Whether the field `name` must be dropped rather than forwarded.
    /// Case-insensitive (RFC 9110 §5.1).
    pub fn drops(&self, name: impl AsRef<[u8]>) -> bool {
        let name = name.as_ref();
        is_hop_by_hop(name) || self.named.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Optional whitespace, RFC 9110 §5.6.3.
fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Trim OWS on both sides.
pub fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = v {
        if !is_ows(*first) {
            break;
        }
        v = rest;
    }
    while let [rest @ .., last] = v {
        if !is_ows(*last) {
            break;
        }
        v = rest;
    }
    v
}

/// Elements of a comma-separated list (`#element`, RFC 9110 §5.6.1),
/// trimmed of OWS, with empty elements skipped as that section requires.
pub fn list_elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

/// Names listed in a `Connection` value (RFC 9110 §7.6.1): a proxy strips
/// the fields they name as well as `Connection` itself.
pub fn connection_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    list_elements(value)
}

/// Whether a comma-separated token list contains `token`, compared
/// case-insensitively (tokens such as `close`, `upgrade`, `chunked` are
/// case-insensitive, RFC 9110 §7.6.1, RFC 9112 §7).
pub fn token_list_contains(value: &[u8], token: &str) -> bool {
    list_elements(value).any(|e| e.eq_ignore_ascii_case(token.as_bytes()))
}

/// `tchar` of RFC 9110 §5.6.2.
pub fn is_tchar(b: u8) -> bool {
    matches!(b,
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+'
        | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

/// Canonical reason phrase of every status code in the IANA HTTP Status
/// Code Registry (RFC 9110 §15 and the RFCs it lists); "" for anything
/// else, including the "(Unused)" codes 306 and 418.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        208 => "Already Reported",
        226 => "IM Used",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        305 => "Use Proxy",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        423 => "Locked",
        424 => "Failed Dependency",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        506 => "Variant Also Negotiates",
        507 => "Insufficient Storage",
        508 => "Loop Detected",
        510 => "Not Extended",
        511 => "Network Authentication Required",
        _ => "",
    }
}

/// What a response says of its connection (RFC 9112 §9.3, §9.6). One
/// that closes says `close`. One that persists says nothing to an
/// HTTP/1.1 client, for which persisting is the default, and `keep-alive`
/// to an HTTP/1.0 one: without it an HTTP/1.0 client takes the response
/// as the connection's last and waits for a close that never comes
/// (`ab -k` hangs until the idle timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persist {
    Close,
    Open { http10: bool },
}

impl Persist {
    /// From the decision to keep the connection and the client's version.
    pub fn new(keep_alive: bool, http10: bool) -> Self {
        match keep_alive {
            true => Persist::Open { http10 },
            false => Persist::Close,
        }
    }

    pub fn closes(self) -> bool {
        self == Persist::Close
    }

    /// The `Connection` field line, if this needs one.
    pub fn write_field(self, out: &mut Vec<u8>) {
        match self {
            Persist::Close => out.extend_from_slice(b"connection: close\r\n"),
            Persist::Open { http10: true } => out.extend_from_slice(b"connection: keep-alive\r\n"),
            Persist::Open { http10: false } => {}
        }
    }
}

/// `reason-phrase = 1*( HTAB / SP / VCHAR / obs-text )` (RFC 9112 §4).
/// Anything else (above all CR and LF) would let a reason copied from the
/// app split the response.
fn is_valid_reason(reason: &[u8]) -> bool {
    reason
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
}

/// Append `HTTP/1.1 {status} {reason}\r\n` (RFC 9112 §4). A reason holding
/// bytes the grammar forbids is replaced by the canonical one, so a
/// reason relayed from the app can never inject a line. A status outside
/// 100..=999 is a caller bug; it is clamped rather than written as a
/// malformed status-line.
pub fn write_status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    debug_assert!(
        (100..=999).contains(&status),
        "status {status} not 3 digits"
    );
    let status = status.clamp(100, 999);
    let reason = if is_valid_reason(reason) {
        reason
    } else {
        reason_phrase(status).as_bytes()
    };
    // Hand-formatted: `write!` goes through the fmt machinery, which is
    // several times slower than three digit pushes on this per-response path.
    let digits = [
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ];
    out.reserve(9 + 3 + 1 + reason.len() + 2);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&digits);
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_set_is_exact_and_case_insensitive() {
        for name in [
            "Connection",
            "KEEP-ALIVE",
            "proxy-connection",
            "Proxy-Authenticate",
            "Proxy-Authorization",
            "te",
            "Trailer",
            "Transfer-Encoding",
            "upgrade",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "Content-Length",
            "Host",
            "Trailers",
            "Tee",
            "Proxy",
            "X-Forwarded-For",
            "",
            "connectio",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn connection_tokens_trim_and_skip_empty() {
        let t: Vec<&[u8]> = connection_tokens(b" close ,, X-Foo\t,keep-alive,").collect();
        assert_eq!(t, vec![&b"close"[..], b"X-Foo", b"keep-alive"]);
        assert_eq!(connection_tokens(b"").count(), 0);
        assert_eq!(connection_tokens(b" , ,").count(), 0);
    }

    fn fields<'a>(pairs: &'a [(&'a str, &'a str)]) -> HopByHop<'a> {
        HopByHop::of(pairs.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    #[test]
    fn hop_by_hop_covers_the_fixed_set_and_what_connection_names() {
        let h = fields(&[
            ("X-Internal", "secret"),
            ("Connection", "keep-alive, X-Internal"),
            ("connection", " x-other ,,"),
            ("X-Kept", "yes"),
        ]);
        for gone in [
            "x-internal",
            "X-INTERNAL",
            "X-Other",
            "Connection",
            "Keep-Alive",
            "TE",
        ] {
            assert!(h.drops(gone), "{gone}");
        }
        for kept in ["X-Kept", "X-Internals", "Content-Type", "close", ""] {
            assert!(!h.drops(kept), "{kept}");
        }
        // Only the names, not the fixed set already covered, are kept.
        assert_eq!(h.named, vec![&b"X-Internal"[..], b"x-other"]);
    }

    #[test]
    fn hop_by_hop_without_connection_names_only_the_fixed_set() {
        let h = fields(&[("X-Internal", "secret"), ("Connection", "keep-alive")]);
        assert!(h.named.is_empty() && h.named.capacity() == 0);
        assert!(!h.drops("X-Internal"));
        assert!(h.drops(b"transfer-encoding"));
        // A value that merely mentions a name is not a Connection field.
        let h = fields(&[("X-Connection", "X-Internal")]);
        assert!(!h.drops("X-Internal"));
    }

    #[test]
    fn token_list_contains_is_case_insensitive_and_whole_token() {
        assert!(token_list_contains(b"keep-alive, Upgrade", "upgrade"));
        assert!(token_list_contains(b"CLOSE", "close"));
        assert!(!token_list_contains(b"closed", "close"));
        assert!(!token_list_contains(b"x-close", "close"));
        assert!(!token_list_contains(b"", "close"));
    }

    #[test]
    fn trim_ows_both_sides() {
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
    }

    #[test]
    fn reason_phrases_registered_and_unknown() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(422), "Unprocessable Content");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(511), "Network Authentication Required");
        assert_eq!(reason_phrase(306), "");
        assert_eq!(reason_phrase(418), "");
        assert_eq!(reason_phrase(299), "");
        assert_eq!(reason_phrase(0), "");
    }

    #[test]
    fn status_line_written_exactly() {
        let mut out = Vec::new();
        write_status_line(&mut out, 200, b"OK");
        write_status_line(&mut out, 404, b"");
        write_status_line(&mut out, 502, b"Bad\r\nX-Injected: 1");
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nHTTP/1.1 404 \r\nHTTP/1.1 502 Bad Gateway\r\n".to_vec()
        );
    }
}
