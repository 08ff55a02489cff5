//! The WebSocket opening handshake (RFC 6455 §4), sans IO: checks an
//! upgrade request's headers and writes the 101 (gateway side); writes the
//! upgrade request and checks the server's response (receiver side).
//!
//! Owns: the handshake header rules and the accept-key check. Must never:
//! read a socket, parse the request head itself (the gateway's HTTP/1.1
//! head parser hands us its headers), or judge authentication (that is the
//! caller's, on the same headers; PROTOCOL.md §1).
//!
//! The accept key comes from `tungstenite::handshake::derive_accept_key` and
//! the client key from `tungstenite::handshake::client::generate_key`.
//! Decoding a key to check its length needs base64, and tungstenite 0.30
//! does not re-export its `data-encoding` dependency, which is not on our
//! dependency list either: hence the small decoder at the end of this file.

use crate::http::headers::is_tchar;
use tungstenite::handshake::derive_accept_key;

use super::error::HandshakeError;

/// Most bytes a server's response head may take before we give up waiting
/// for its end: a refusal is a short head plus a short body (PROTOCOL.md §1),
/// and an unbounded wait would let a bad server make us buffer forever.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Most header lines accepted in a server's response head.
pub const MAX_RESPONSE_HEADERS: usize = 64;

/// Check an upgrade request (RFC 6455 §4.2.1) and return the value of the
/// `Sec-WebSocket-Accept` header to answer with (§4.2.2).
///
/// `headers` are (name, raw value) pairs as the head parser saw them; names
/// are compared case-insensitively and repeated headers are all looked at.
pub fn server_accept_key(
    headers: &[(&str, &[u8])],
    method: &str,
) -> Result<String, HandshakeError> {
    // §4.2.1 item 1: "An HTTP/1.1 or higher GET request". Methods are
    // case-sensitive (RFC 9110 §9.1).
    if method != "GET" {
        return Err(HandshakeError::MethodNotGet(method.to_owned()));
    }
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };

    // §4.2.1 item 3: Upgrade contains "websocket", case-insensitive.
    let mut upgrade = values("Upgrade").peekable();
    if upgrade.peek().is_none() {
        return Err(HandshakeError::MissingHeader("Upgrade"));
    }
    if !upgrade.any(|v| has_token(v, "websocket")) {
        return Err(HandshakeError::BadUpgrade);
    }

    // §4.2.1 item 4: Connection includes the "Upgrade" token,
    // case-insensitive, in a comma-separated list.
    let mut connection = values("Connection").peekable();
    if connection.peek().is_none() {
        return Err(HandshakeError::MissingHeader("Connection"));
    }
    if !connection.any(|v| has_token(v, "upgrade")) {
        return Err(HandshakeError::BadConnection);
    }

    // §4.2.1 item 6: version 13. Anything else gets 426 plus our version
    // (§4.4), see `HandshakeError::http_status`.
    let mut version = values("Sec-WebSocket-Version").peekable();
    if version.peek().is_none() {
        return Err(HandshakeError::MissingHeader("Sec-WebSocket-Version"));
    }
    if !version.all(|v| trim(v) == b"13") {
        return Err(HandshakeError::BadVersion);
    }

    // §4.2.1 item 5: one key, base64 of 16 bytes. A repeated key is refused:
    // which one would the accept value answer?
    let mut keys = values("Sec-WebSocket-Key");
    let key = keys
        .next()
        .ok_or(HandshakeError::MissingHeader("Sec-WebSocket-Key"))?;
    if keys.next().is_some() {
        return Err(HandshakeError::BadKey);
    }
    let key = trim(key);
    match base64_decode(key) {
        Some(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    // §4.2.2 item 5.4: SHA-1 of key + GUID, base64. The key is hashed as
    // sent (its base64 text), not decoded.
    Ok(derive_accept_key(key))
}

/// Write the whole 101 response (RFC 6455 §4.2.2 item 5) into `out`,
/// followed by `extra_headers` (e.g. `X-ANPX-Features`, PROTOCOL.md §7).
///
/// An extra header whose name or value contains CR or LF (or whose name is
/// not a token) is skipped, not written: emitting it would let its content
/// forge headers or end the head early (response splitting). Debug builds
/// assert instead, since it is the caller's bug.
pub fn write_101(out: &mut Vec<u8>, accept: &str, extra_headers: &[(&str, &str)]) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    out.extend_from_slice(b"Upgrade: websocket\r\n");
    out.extend_from_slice(b"Connection: Upgrade\r\n");
    write_header(out, "Sec-WebSocket-Accept", accept);
    write_extra_headers(out, extra_headers);
    out.extend_from_slice(b"\r\n");
}

/// A fresh `Sec-WebSocket-Key`: base64 of 16 random bytes (RFC 6455 §4.1).
/// tungstenite's generator draws the bytes from a CSPRNG-backed `rand`.
pub fn client_key() -> String {
    tungstenite::handshake::client::generate_key()
}

/// Write the upgrade request (RFC 6455 §4.1) into `out`. `host_header` is
/// the `Host` value (`host` or `host:port`), `path` the request-target (e.g.
/// `/ws`), `key` from [`client_key`]; `extra_headers` carries
/// `Authorization` and `X-ANPX-Features` (PROTOCOL.md §1, §7). Extra
/// headers with CR/LF are skipped as in [`write_101`].
pub fn write_client_request(
    out: &mut Vec<u8>,
    host_header: &str,
    path: &str,
    key: &str,
    extra_headers: &[(&str, &str)],
) {
    debug_assert!(
        !path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()),
        "request-target must not contain whitespace or controls"
    );
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    write_header(out, "Host", host_header);
    out.extend_from_slice(b"Upgrade: websocket\r\n");
    out.extend_from_slice(b"Connection: Upgrade\r\n");
    write_header(out, "Sec-WebSocket-Key", key);
    out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    write_extra_headers(out, extra_headers);
    out.extend_from_slice(b"\r\n");
}

/// How the body after a response head ends (RFC 9112 §6.3), so the caller
/// can read a refusal's body (PROTOCOL.md §1: 401/403 with a JSON reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyHint {
    /// No body: a 101 (the bytes after the head are WebSocket frames), 1xx,
    /// 204 or 304.
    None,
    /// Exactly this many bytes (`Content-Length`).
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// A complete server response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerResponse {
    /// Length of the head including the final CRLF CRLF; bytes after it are
    /// WebSocket frames (101) or the refusal body.
    pub head_len: usize,
    /// HTTP status code; 101 means the tunnel is open.
    pub status: u16,
    /// Reason phrase, for logs.
    pub reason: String,
    /// Headers in order, values decoded lossily (for logs and feature
    /// negotiation; PROTOCOL.md §7).
    pub headers: Vec<(String, String)>,
    /// How the body after the head is delimited.
    pub body_hint: BodyHint,
}

impl ServerResponse {
    /// Whether the upgrade succeeded (and was verified).
    pub fn is_upgrade(&self) -> bool {
        self.status == 101
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parse the server's answer to our upgrade request.
///
/// `Ok(None)`: the head is not complete yet, read more. A 101 is verified
/// (RFC 6455 §4.1: `Upgrade: websocket`, `Connection: upgrade`,
/// `Sec-WebSocket-Accept` matching `key`) and an error if wrong. Any other
/// status is *returned*, not an error: the caller reads and logs the refusal
/// body (PROTOCOL.md §1) and decides whether to retry.
pub fn parse_server_response(
    buf: &[u8],
    key: &str,
) -> Result<Option<ServerResponse>, HandshakeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let head_len = match response.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(HandshakeError::HeadTooLarge(MAX_RESPONSE_HEAD));
        }
        httparse::Status::Partial => return Ok(None),
    };
    if head_len > MAX_RESPONSE_HEAD {
        return Err(HandshakeError::HeadTooLarge(MAX_RESPONSE_HEAD));
    }
    // httparse guarantees code and reason on a complete parse.
    let status = response.code.unwrap_or_default();
    let reason = response.reason.unwrap_or_default().to_owned();
    let raw = response.headers;
    let values = |name: &'static str| {
        raw.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };

    let body_hint = if status == 101 {
        // §4.1 items 2–4 of the client's checks on the server's handshake.
        if !values("Upgrade").any(|v| has_token(v, "websocket")) {
            return Err(HandshakeError::BadUpgrade);
        }
        if !values("Connection").any(|v| has_token(v, "upgrade")) {
            return Err(HandshakeError::BadConnection);
        }
        let expected = derive_accept_key(key.as_bytes());
        let mut accepts = values("Sec-WebSocket-Accept");
        match (accepts.next(), accepts.next()) {
            (Some(v), None) if trim(v) == expected.as_bytes() => {}
            _ => return Err(HandshakeError::WrongAccept),
        }
        BodyHint::None
    } else {
        body_hint(
            status,
            values("Transfer-Encoding"),
            values("Content-Length"),
        )?
    };

    let headers = raw
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok(Some(ServerResponse {
        head_len,
        status,
        reason,
        headers,
        body_hint,
    }))
}

/// RFC 9112 §6.3 for a response to GET: no body for 1xx/204/304; chunked
/// wins over Content-Length; several Content-Length values must agree.
fn body_hint<'a>(
    status: u16,
    transfer_encoding: impl Iterator<Item = &'a [u8]>,
    content_length: impl Iterator<Item = &'a [u8]>,
) -> Result<BodyHint, HandshakeError> {
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(BodyHint::None);
    }
    let mut te = transfer_encoding.peekable();
    if te.peek().is_some() {
        // §6.3 item 4: chunked must be the final coding, else read to close.
        let last = te.last().and_then(|v| v.rsplit(|&b| b == b',').next());
        return Ok(match last.map(trim) {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => BodyHint::Chunked,
            _ => BodyHint::UntilClose,
        });
    }
    let mut length = None;
    for value in content_length {
        for item in value.split(|&b| b == b',') {
            let n = parse_decimal(trim(item)).ok_or(HandshakeError::BadContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(HandshakeError::BadContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(BodyHint::UntilClose, BodyHint::Length))
}

fn parse_decimal(s: &[u8]) -> Option<usize> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// Whether the comma-separated header value contains `token`,
/// ASCII-case-insensitively (RFC 9110 §5.6.1 lists; RFC 6455 §4.2.1).
/// Whole tokens only: `Connection: upgrades` does not contain `upgrade`.
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| trim(item).eq_ignore_ascii_case(token.as_bytes()))
}

/// Strip optional whitespace (SP / HTAB, RFC 9110 §5.6.3) from both ends.
fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn write_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn write_extra_headers(out: &mut Vec<u8>, headers: &[(&str, &str)]) {
    for &(name, value) in headers {
        let name_ok = !name.is_empty() && name.bytes().all(is_tchar);
        let value_ok = !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
        debug_assert!(name_ok && value_ok, "unsafe header {name:?}: {value:?}");
        if name_ok && value_ok {
            write_header(out, name, value);
        }
    }
}

/// Strict standard-alphabet base64 (RFC 4648 §4) with padding: length a
/// multiple of 4, `=` only at the end, and zero "trailing bits" so each
/// value has one encoding (what tungstenite's own server check accepts).
fn base64_decode(input: &[u8]) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    if !input.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let quads = input.len() / 4;
    for (i, quad) in input.chunks_exact(4).enumerate() {
        let pad = match quad {
            [_, _, b'=', b'='] => 2,
            [_, _, _, b'='] => 1,
            _ => 0,
        };
        if pad > 0 && i + 1 != quads {
            return None;
        }
        let mut word = 0u32;
        for &c in &quad[..4 - pad] {
            word = word << 6 | sextet(c)?;
        }
        word <<= 6 * pad;
        let bytes = word.to_be_bytes();
        let keep = 3 - pad;
        // Bits below the kept bytes must be zero (RFC 4648 §3.5).
        if bytes[1 + keep..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&bytes[1..1 + keep]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    /// RFC 6455 §1.3 prints "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" (…9k**Y**G…).
    /// The brief quoted it as "…9kxG…", a typo: SHA-1 of key + GUID is
    /// b37a4f2c c0624f16 90f64606 cf385945 b2bec4ea (checked independently
    /// with Python's hashlib), whose base64 is the value below.
    const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn request_headers<'a>(overrides: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a [u8])> {
        let mut base: Vec<(&str, &str)> = vec![
            ("Host", "server.example.com"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY),
            ("Sec-WebSocket-Version", "13"),
        ];
        for &(name, value) in overrides {
            base.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            if !value.is_empty() {
                base.push((name, value));
            }
        }
        base.into_iter().map(|(n, v)| (n, v.as_bytes())).collect()
    }

    fn accept(overrides: &[(&str, &str)]) -> Result<String, HandshakeError> {
        server_accept_key(&request_headers(overrides), "GET")
    }

    #[test]
    fn rfc_1_3_example_accept_key() {
        assert_eq!(derive_accept_key(RFC_KEY.as_bytes()), RFC_ACCEPT);
        assert_eq!(accept(&[]).unwrap(), RFC_ACCEPT);
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive_lists() {
        let headers: Vec<(&str, &[u8])> = vec![
            ("upgrade", b"WebSocket"),
            ("CONNECTION", b"keep-alive, UPGRADE"),
            ("sec-websocket-key", b" dGhlIHNhbXBsZSBub25jZQ== "),
            ("Sec-Websocket-Version", b"13"),
        ];
        assert_eq!(server_accept_key(&headers, "GET").unwrap(), RFC_ACCEPT);
        // Connection split over two header lines.
        let headers: Vec<(&str, &[u8])> = vec![
            ("Upgrade", b"websocket"),
            ("Connection", b"keep-alive"),
            ("Connection", b"Upgrade"),
            ("Sec-WebSocket-Key", RFC_KEY.as_bytes()),
            ("Sec-WebSocket-Version", b"13"),
        ];
        assert_eq!(server_accept_key(&headers, "GET").unwrap(), RFC_ACCEPT);
    }

    #[test]
    fn request_violations() {
        let e = server_accept_key(&request_headers(&[]), "POST").unwrap_err();
        assert!(
            matches!(e, HandshakeError::MethodNotGet(ref m) if m == "POST"),
            "{e:?}"
        );
        assert_eq!(e.http_status(), Some(405));

        let e = accept(&[("Upgrade", "")]).unwrap_err();
        assert!(
            matches!(e, HandshakeError::MissingHeader("Upgrade")),
            "{e:?}"
        );
        let e = accept(&[("Upgrade", "h2c")]).unwrap_err();
        assert!(matches!(e, HandshakeError::BadUpgrade), "{e:?}");
        let e = accept(&[("Connection", "")]).unwrap_err();
        assert!(
            matches!(e, HandshakeError::MissingHeader("Connection")),
            "{e:?}"
        );
        let e = accept(&[("Connection", "keep-alive")]).unwrap_err();
        assert!(matches!(e, HandshakeError::BadConnection), "{e:?}");
        let e = accept(&[("Connection", "upgrades")]).unwrap_err();
        assert!(
            matches!(e, HandshakeError::BadConnection),
            "token, not substring"
        );
        assert_eq!(e.http_status(), Some(400));

        let e = accept(&[("Sec-WebSocket-Version", "8")]).unwrap_err();
        assert!(matches!(e, HandshakeError::BadVersion), "{e:?}");
        assert_eq!(e.http_status(), Some(426));
        let e = accept(&[("Sec-WebSocket-Version", "")]).unwrap_err();
        assert!(matches!(e, HandshakeError::MissingHeader(_)), "{e:?}");

        let e = accept(&[("Sec-WebSocket-Key", "")]).unwrap_err();
        assert!(
            matches!(e, HandshakeError::MissingHeader("Sec-WebSocket-Key")),
            "{e:?}"
        );
        // 15 bytes, 17 bytes, not base64, non-canonical trailing bits.
        for bad in [
            "AAAAAAAAAAAAAAAAAAAA",
            "AAAAAAAAAAAAAAAAAAAAAAA=",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZ!==",
            "dGhlIHNhbXBsZSBub25jZR==",
        ] {
            let e = accept(&[("Sec-WebSocket-Key", bad)]).unwrap_err();
            assert!(matches!(e, HandshakeError::BadKey), "{bad}: {e:?}");
        }
        let mut two_keys = request_headers(&[]);
        two_keys.push(("Sec-WebSocket-Key", b"AAAAAAAAAAAAAAAAAAAAAA=="));
        let e = server_accept_key(&two_keys, "GET").unwrap_err();
        assert!(matches!(e, HandshakeError::BadKey), "{e:?}");
    }

    #[test]
    fn write_101_exact_bytes() {
        let mut out = Vec::new();
        write_101(&mut out, RFC_ACCEPT, &[("X-ANPX-Features", "exact,stream")]);
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
              X-ANPX-Features: exact,stream\r\n\r\n"
        );
    }

    #[test]
    fn write_client_request_exact_bytes() {
        let mut out = Vec::new();
        write_client_request(
            &mut out,
            "gw.example:8080",
            "/ws",
            RFC_KEY,
            &[("Authorization", "Bearer t")],
        );
        assert_eq!(
            out,
            b"GET /ws HTTP/1.1\r\n\
              Host: gw.example:8080\r\n\
              Upgrade: websocket\r\n\
              Connection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\
              Authorization: Bearer t\r\n\r\n"
        );
    }

    /// Both halves against each other through httparse, as the IO loops
    /// would run them.
    #[test]
    fn client_and_server_agree() {
        let key = client_key();
        let mut request = Vec::new();
        write_client_request(
            &mut request,
            "h",
            "/ws",
            &key,
            &[("X-ANPX-Features", "exact")],
        );
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Request::new(&mut slots);
        assert!(parsed.parse(&request).unwrap().is_complete());
        let headers: Vec<(&str, &[u8])> =
            parsed.headers.iter().map(|h| (h.name, h.value)).collect();
        let accept = server_accept_key(&headers, parsed.method.unwrap()).unwrap();

        let mut response = Vec::new();
        write_101(&mut response, &accept, &[("X-ANPX-Features", "exact")]);
        let head_len = response.len();
        response.extend_from_slice(&[0x82, 0x00]); // a first frame right behind
        let got = parse_server_response(&response, &key).unwrap().unwrap();
        assert!(got.is_upgrade());
        assert_eq!(got.head_len, head_len);
        assert_eq!(got.body_hint, BodyHint::None);
        assert_eq!(got.header("x-anpx-features"), Some("exact"));
    }

    #[test]
    fn client_keys_are_16_random_bytes() {
        let (a, b) = (client_key(), client_key());
        assert_eq!(base64_decode(a.as_bytes()).map(|k| k.len()), Some(16));
        assert_ne!(a, b);
    }

    fn rfc_101() -> Vec<u8> {
        let mut out = Vec::new();
        write_101(&mut out, RFC_ACCEPT, &[]);
        out
    }

    #[test]
    fn partial_response_needs_more() {
        let full = rfc_101();
        for cut in 0..full.len() {
            assert_eq!(
                parse_server_response(&full[..cut], RFC_KEY).unwrap(),
                None,
                "{cut}"
            );
        }
        assert!(parse_server_response(&full, RFC_KEY).unwrap().is_some());
    }

    #[test]
    fn wrong_or_missing_accept_is_an_error() {
        let e = parse_server_response(&rfc_101(), "AAAAAAAAAAAAAAAAAAAAAA==").unwrap_err();
        assert!(matches!(e, HandshakeError::WrongAccept), "{e:?}");
        assert_eq!(e.http_status(), None);
        let no_accept = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let e = parse_server_response(no_accept, RFC_KEY).unwrap_err();
        assert!(matches!(e, HandshakeError::WrongAccept), "{e:?}");
        let no_upgrade = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let e = parse_server_response(no_upgrade, RFC_KEY).unwrap_err();
        assert!(matches!(e, HandshakeError::BadUpgrade), "{e:?}");
        let no_conn = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let e = parse_server_response(no_conn, RFC_KEY).unwrap_err();
        assert!(matches!(e, HandshakeError::BadConnection), "{e:?}");
    }

    #[test]
    fn refusal_is_returned_not_an_error() {
        let body = br#"{"error":"bad token"}"#;
        let mut raw = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        let head_len = raw.len();
        raw.extend_from_slice(body);
        let got = parse_server_response(&raw, RFC_KEY).unwrap().unwrap();
        assert_eq!(got.status, 403);
        assert!(!got.is_upgrade());
        assert_eq!(got.reason, "Forbidden");
        assert_eq!(got.head_len, head_len);
        assert_eq!(got.body_hint, BodyHint::Length(body.len()));
        assert_eq!(&raw[got.head_len..], body);
        assert_eq!(got.header("content-type"), Some("application/json"));

        let chunked = b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n";
        let got = parse_server_response(chunked, RFC_KEY).unwrap().unwrap();
        assert_eq!((got.status, got.body_hint), (401, BodyHint::Chunked));
        let bare = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        let got = parse_server_response(bare, RFC_KEY).unwrap().unwrap();
        assert_eq!(got.body_hint, BodyHint::UntilClose);
    }

    #[test]
    fn malformed_responses_are_errors() {
        let e = parse_server_response(b"HTTP/1.1 abc Nope\r\n\r\n", RFC_KEY).unwrap_err();
        assert!(matches!(e, HandshakeError::Malformed(_)), "{e:?}");
        let e = parse_server_response(b"SSH-2.0-OpenSSH\r\n\r\n", RFC_KEY).unwrap_err();
        assert!(matches!(e, HandshakeError::Malformed(_)), "{e:?}");
        let e = parse_server_response(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            RFC_KEY,
        )
        .unwrap_err();
        assert!(matches!(e, HandshakeError::BadContentLength), "{e:?}");
        let e = parse_server_response(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: -1\r\n\r\n",
            RFC_KEY,
        )
        .unwrap_err();
        assert!(matches!(e, HandshakeError::BadContentLength), "{e:?}");
        // A head that never ends is cut off.
        let mut endless = b"HTTP/1.1 403 Forbidden\r\nX-Pad: ".to_vec();
        endless.resize(MAX_RESPONSE_HEAD, b'a');
        assert_eq!(parse_server_response(&endless, RFC_KEY).unwrap(), None);
        endless.push(b'a');
        let e = parse_server_response(&endless, RFC_KEY).unwrap_err();
        assert!(matches!(e, HandshakeError::HeadTooLarge(_)), "{e:?}");
    }

    #[test]
    fn base64_decoder() {
        assert_eq!(base64_decode(b"").unwrap(), b"");
        assert_eq!(base64_decode(b"Zg==").unwrap(), b"f");
        assert_eq!(base64_decode(b"Zm8=").unwrap(), b"fo");
        assert_eq!(base64_decode(b"Zm9v").unwrap(), b"foo");
        assert_eq!(base64_decode(b"Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(
            base64_decode(RFC_KEY.as_bytes()).unwrap(),
            b"the sample nonce"
        );
        for bad in [
            &b"Zg="[..],
            b"Zg==Zg==",
            b"Zh==",
            b"Zm9=",
            b"Z===",
            b"Zm9v\n",
        ] {
            assert_eq!(
                base64_decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
