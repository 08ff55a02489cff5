//! What a proxy changes on the way through (RFC 9110 §7.6): hop-by-hop
//! headers out, `X-Forwarded-*` and `Forwarded` in; and the response head
//! written back to the client. Pure functions over buffers.

use std::net::{IpAddr, SocketAddr};

use crate::http::headers::{HopByHop, Persist};
use crate::http::{self, RequestHead, TargetForm};
use crate::protocol::anpx::binmeta::{self, Builder};
use crate::protocol::anpx::{latin1_to_string, RequestMeta};

fn is_forwarding_header(name: &[u8]) -> bool {
    [
        &b"x-forwarded-for"[..],
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// `ip` as text on the stack (no allocation per request).
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> IpText {
        use std::io::Write;
        let mut buf = [0u8; 48];
        let mut w = &mut buf[..];
        match ip {
            // Per request: four `itoa`s, not the formatting machinery
            // (`write!` was 1.4 % of the gateway's CPU at 1 KiB).
            IpAddr::V4(v4) => {
                for (i, o) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        let _ = w.write_all(b".");
                    }
                    let _ = w.write_all(itoa::Buffer::new().format(o).as_bytes());
                }
            }
            IpAddr::V6(_) => {
                let _ = write!(w, "{ip}");
            }
        }
        let len = 48 - w.len();
        IpText { buf, len }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Builds the request meta from a parsed head, straight from its ranges
/// into one buffer: the origin-form target as received, the client's
/// header lines in order (duplicates kept) minus what a proxy must drop,
/// and this hop's forwarding headers. `chunked_len`: the dechunked body
/// length when the client sent chunked (the app then gets a
/// `Content-Length`).
pub fn build_request_meta(
    head: &RequestHead,
    buf: &[u8],
    peer: SocketAddr,
    tls: bool,
    chunked_len: Option<usize>,
    trust_forwarded: bool,
) -> binmeta::Request {
    let target = origin_form(&buf[head.target.clone()]);
    // The head's length bounds what is copied; 192 for our own lines.
    let mut b = Builder::request(head.method(buf).as_bytes(), target, head.head_len + 192);
    let seen = client_headers(&mut b, head, buf, chunked_len, trust_forwarded);
    if let Some(n) = chunked_len {
        b.field(b"content-length", itoa::Buffer::new().format(n).as_bytes());
    }
    push_forwarding(&mut b, seen, peer, tls);
    b.finish_request()
}

/// [`build_request_meta`] for a WebSocket upgrade (PROTOCOL.md §7.6):
/// the same fields, plus the client's `Upgrade` field(s), which name the
/// protocol the app is asked to switch to. `Connection` stays out (the
/// receiver writes `Connection: upgrade` to the app itself); the
/// `Sec-WebSocket-*` fields are end-to-end and travel as any other.
pub fn build_upgrade_meta(
    head: &RequestHead,
    buf: &[u8],
    peer: SocketAddr,
    tls: bool,
    trust_forwarded: bool,
) -> binmeta::Request {
    let target = origin_form(&buf[head.target.clone()]);
    let mut b = Builder::request(head.method(buf).as_bytes(), target, head.head_len + 192);
    let seen = client_headers(&mut b, head, buf, None, trust_forwarded);
    for h in &head.headers {
        if buf[h.name.clone()].eq_ignore_ascii_case(b"upgrade") {
            b.field(b"upgrade", &buf[h.value.clone()]);
        }
    }
    push_forwarding(&mut b, seen, peer, tls);
    b.finish_request()
}

/// The 101 written to the client for an upgraded stream: the app's
/// fields as relayed (its `Upgrade` and `Sec-WebSocket-*`), minus any
/// framing or other hop-by-hop field, plus `Connection: upgrade`. What
/// follows on the connection is the app's bytes.
pub fn write_upgrade_head(out: &mut Vec<u8>, meta: &binmeta::Response) {
    http::headers::write_status_line(out, 101, b"Switching Protocols");
    let hop = HopByHop::of(meta.fields());
    for (name, value) in meta.fields() {
        let keep = name.eq_ignore_ascii_case(b"upgrade") || !hop.drops(name);
        if !keep
            || name.eq_ignore_ascii_case(b"content-length")
            || !valid_field_name(name)
            || !valid_field_value(value)
        {
            continue;
        }
        write_field(out, name, value);
    }
    out.extend_from_slice(b"connection: upgrade\r\n\r\n");
}

/// What the client's own forwarding headers said (kept only with
/// `trust_forwarded`), and its Host.
#[derive(Default)]
struct Forwarded<'a> {
    xff: Option<Vec<u8>>,
    fwd: Option<Vec<u8>>,
    host: Option<&'a [u8]>,
    have_proto: bool,
    have_host: bool,
}

fn join(prior: &mut Option<Vec<u8>>, v: &[u8]) {
    match prior {
        Some(p) => {
            p.extend_from_slice(b", ");
            p.extend_from_slice(v);
        }
        None => *prior = Some(v.to_vec()),
    }
}

/// Writes the client's header lines that travel on, in order, duplicates
/// kept: hop-by-hop fields (and those `Connection` names), `Expect`, a
/// Content-Length replaced by the dechunked length, and forwarding
/// headers unless trusted are left out.
fn client_headers<'a>(
    b: &mut Builder,
    head: &RequestHead,
    buf: &'a [u8],
    chunked_len: Option<usize>,
    trust_forwarded: bool,
) -> Forwarded<'a> {
    let hop = HopByHop::of(
        head.headers
            .iter()
            .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()])),
    );
    let mut seen = Forwarded::default();
    for h in &head.headers {
        let name = &buf[h.name.clone()];
        let value = &buf[h.value.clone()];
        if hop.drops(name) || name.eq_ignore_ascii_case(b"expect") {
            continue;
        }
        if chunked_len.is_some() && name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        if is_forwarding_header(name) {
            if !trust_forwarded {
                continue;
            }
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                join(&mut seen.xff, value);
                continue;
            }
            if name.eq_ignore_ascii_case(b"forwarded") {
                join(&mut seen.fwd, value);
                continue;
            }
            seen.have_proto |= name.eq_ignore_ascii_case(b"x-forwarded-proto");
            seen.have_host |= name.eq_ignore_ascii_case(b"x-forwarded-host");
        }
        if name.eq_ignore_ascii_case(b"host") {
            // RFC 9110 §7.2: a proxy forwarding an absolute-form request
            // sends the target's authority as Host, not the client's Host
            // (the effective authority, which routing used too).
            let host = head.host(buf).map_or(value, str::as_bytes);
            seen.host = Some(host);
            b.field(name, host);
            continue;
        }
        b.field(name, value);
    }
    // HTTP/1.0 may come without Host: an absolute-form target's authority
    // then still goes on.
    if seen.host.is_none() {
        if let (TargetForm::Absolute { .. }, Some(h)) = (&head.form, head.host(buf)) {
            seen.host = Some(h.as_bytes());
            b.field(b"host", h.as_bytes());
        }
    }
    seen
}

/// `X-Forwarded-For/-Proto/-Host` and `Forwarded` (RFC 7239) for this hop,
/// appended to what a trusted client sent.
fn push_forwarding(b: &mut Builder, seen: Forwarded<'_>, peer: SocketAddr, tls: bool) {
    let proto: &[u8] = if tls { b"https" } else { b"http" };
    let ip = peer.ip().to_canonical();
    let ip_s = IpText::new(ip);
    match &seen.xff {
        Some(p) => b.field_parts(b"x-forwarded-for", &[p, b", ", ip_s.as_bytes()]),
        None => b.field(b"x-forwarded-for", ip_s.as_bytes()),
    }
    if !seen.have_proto {
        b.field(b"x-forwarded-proto", proto);
    }
    if let (Some(h), false) = (seen.host, seen.have_host) {
        b.field(b"x-forwarded-host", h);
    }
    // RFC 7239 §6: an IPv6 address is quoted and bracketed.
    let (open, close): (&[u8], &[u8]) = match ip {
        IpAddr::V4(_) => (b"", b""),
        IpAddr::V6(_) => (b"\"[", b"]\""),
    };
    let quoted;
    let host: (&[u8], &[u8]) = match seen.host {
        Some(h)
            if h.iter()
                .all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b';' && *b != b',') =>
        {
            (b";host=", h)
        }
        Some(h) => {
            quoted = format!("{:?}", crate::protocol::anpx::latin1_to_string(h));
            (b";host=", quoted.as_bytes())
        }
        None => (b"", b""),
    };
    let (prior, sep): (&[u8], &[u8]) = match &seen.fwd {
        Some(p) => (p, b", "),
        None => (b"", b""),
    };
    b.field_parts(
        b"forwarded",
        &[
            prior,
            sep,
            b"for=",
            open,
            ip_s.as_bytes(),
            close,
            host.0,
            host.1,
            b";proto=",
            proto,
        ],
    );
}

/// The JSON meta for a peer without `binmeta` (PROTOCOL.md §4): method,
/// percent-decoded path, the flat header map and the query map; with
/// `exact`, also the raw target and the header list as Latin-1 text.
pub fn request_json(meta: &binmeta::Request, exact: bool) -> Vec<u8> {
    let target = meta.target();
    let (raw_path, raw_query) = match target.iter().position(|b| *b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &b""[..]),
    };
    let list: Vec<(String, String)> = meta
        .fields()
        .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), latin1_to_string(v)))
        .collect();
    let json = RequestMeta {
        method: String::from_utf8_lossy(meta.method()).into_owned(),
        path: percent_encoding::percent_decode(raw_path)
            .decode_utf8_lossy()
            .into_owned(),
        headers: binmeta::flat(&list),
        query: parse_query(raw_query),
        raw_target: exact.then(|| latin1_to_string(target)),
        header_list: exact.then_some(list),
    };
    let mut out = Vec::with_capacity(512);
    json.to_json(&mut out);
    out
}

/// The origin-form part of a target (absolute-form loses scheme+authority).
fn origin_form(target: &[u8]) -> &[u8] {
    if target.starts_with(b"/") || target == b"*" {
        return target;
    }
    if let Some(i) = target.windows(3).position(|w| w == b"://") {
        let rest = &target[i + 3..];
        return match rest.iter().position(|b| *b == b'/' || *b == b'?') {
            Some(j) if rest[j] == b'/' => &rest[j..],
            _ => b"/",
        };
    }
    target
}

/// `a=1&a=2&b=%20x` → decoded pairs in order (`+` is a space, as form
/// decoding does; the reference's `query` map is built the same way).
pub fn parse_query(q: &[u8]) -> Vec<(String, String)> {
    let dec = |s: &[u8]| {
        let plus: Vec<u8> = s
            .iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect();
        percent_encoding::percent_decode(&plus)
            .decode_utf8_lossy()
            .into_owned()
    };
    q.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|b| *b == b'=') {
            Some(i) => (dec(&p[..i]), dec(&p[i + 1..])),
            None => (dec(p), String::new()),
        })
        .collect()
}

fn valid_field_value(v: &[u8]) -> bool {
    !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

fn valid_field_name(n: &[u8]) -> bool {
    !n.is_empty()
        && n.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// How a response body is delimited towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 1xx, 204, 304): the app's Content-Length, if any, is
    /// kept for HEAD and 304, where it describes the representation.
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 client, unknown length).
    Close,
}

/// Writes the status line and headers of a proxied response. Headers from
/// the receiver are re-validated: a name or value that could split the
/// response is dropped; hop-by-hop headers, the fields the app's
/// `Connection` names (our receiver strips them already; a plain v1 or
/// third-party one may not) and the app's framing headers are replaced by
/// ours.
pub fn write_response_head(
    out: &mut Vec<u8>,
    meta: &binmeta::Response,
    framing: Framing,
    persist: Persist,
) {
    let status = meta.status();
    let reason = match meta.reason() {
        b"" => http::headers::reason_phrase(status).as_bytes(),
        // Replaced by the canonical one if it could split the head.
        r => r,
    };
    http::headers::write_status_line(out, status, reason);
    let keep_cl = framing == Framing::None && status != 204;
    let hop = HopByHop::of(meta.fields());
    let mut dated = false;
    for (name, value) in meta.fields() {
        if hop.drops(name)
            || (name.eq_ignore_ascii_case(b"content-length") && !keep_cl)
            || !valid_field_name(name)
            || !valid_field_value(value)
        {
            continue;
        }
        dated |= name.len() == 4 && name.eq_ignore_ascii_case(b"date");
        write_field(out, name, value);
    }
    // RFC 9110 §6.6.1: a response forwarded without a Date gets one (the
    // app's own Date, when it sent one, goes on as it is).
    if !dated {
        http::date::write_date_field(out);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    persist.write_field(out);
    out.extend_from_slice(b"\r\n");
}

/// One header line, `name: value\r\n` (already validated).
fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_text_is_the_address_as_displayed() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.12.7",
            "127.0.0.1",
            "192.168.100.9",
            "::1",
            "2001:db8::8a2e:370:7334",
            "fe80::1",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(addr).as_bytes(), ip.as_bytes());
        }
    }
    use crate::protocol::anpx::ResponseMeta;

    #[test]
    fn query_pairs_keep_order_and_duplicates() {
        let q = parse_query(b"a=1&a=2&b=%20x%2Fy&c=%E4%B8%AD&empty=&flag&p=a+b");
        assert_eq!(
            q,
            vec![
                ("a".into(), "1".into()),
                ("a".into(), "2".into()),
                ("b".into(), " x/y".into()),
                ("c".into(), "中".into()),
                ("empty".into(), "".into()),
                ("flag".into(), "".into()),
                ("p".into(), "a b".into()),
            ]
        );
    }

    #[test]
    fn response_head_drops_splitting_values_and_hop_by_hop() {
        let meta = ResponseMeta {
            status: 200,
            reason: "OK".into(),
            headers: vec![],
            header_list: Some(vec![
                ("Set-Cookie".into(), "a=1".into()),
                ("Set-Cookie".into(), "b=2".into()),
                ("X-Bad".into(), "x\r\nInjected: 1".into()),
                ("Connection".into(), "keep-alive".into()),
                ("Transfer-Encoding".into(), "chunked".into()),
                ("Content-Length".into(), "999".into()),
            ]),
        };
        assert_eq!(
            undated(&client_head(&meta, 3)),
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\ncontent-length: 3\r\n\r\n"
        );
    }

    /// The client's head for `meta` with a `len`-byte body, kept open.
    fn client_head(meta: &ResponseMeta, len: u64) -> String {
        let mut out = Vec::new();
        write_response_head(
            &mut out,
            &binmeta::Response::from_json_meta(meta),
            Framing::Length(len),
            Persist::Open { http10: false },
        );
        String::from_utf8(out).unwrap()
    }

    /// `s` without its `date:` line, which must be there exactly once.
    fn undated(s: &str) -> String {
        let is_date = |l: &str| l.to_ascii_lowercase().starts_with("date: ");
        let lines: Vec<&str> = s.split("\r\n").collect();
        assert_eq!(lines.iter().filter(|l| is_date(l)).count(), 1, "{s:?}");
        lines
            .into_iter()
            .filter(|l| !is_date(l))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    /// RFC 9110 §6.6.1: a relayed response without Date gets one (tested
    /// above); one with the app's Date keeps it and gets no second.
    #[test]
    fn a_response_keeps_the_apps_date_or_gets_one() {
        let theirs = "Sun, 06 Nov 1994 08:49:37 GMT";
        let meta = ResponseMeta {
            status: 404,
            reason: "Not Found".into(),
            headers: vec![],
            header_list: Some(vec![("Date".into(), theirs.into())]),
        };
        assert_eq!(
            client_head(&meta, 0),
            format!("HTTP/1.1 404 Not Found\r\nDate: {theirs}\r\ncontent-length: 0\r\n\r\n")
        );
    }

    #[test]
    fn response_head_drops_what_the_apps_connection_names() {
        // A plain v1 receiver relays the flat map; ours the exact list.
        let exact = vec![
            (
                "Connection".to_string(),
                "X-Internal, keep-alive".to_string(),
            ),
            ("X-Internal".into(), "secret".into()),
            ("x-other".into(), "2".into()),
            ("connection".into(), "X-OTHER".into()),
            ("X-Kept".into(), "yes".into()),
        ];
        let flat = exact
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect();
        for (headers, header_list) in [(flat, None), (vec![], Some(exact))] {
            let meta = ResponseMeta {
                status: 200,
                reason: "OK".into(),
                headers,
                header_list,
            };
            let s = undated(&client_head(&meta, 0)).to_ascii_lowercase();
            assert_eq!(
                s, "http/1.1 200 ok\r\nx-kept: yes\r\ncontent-length: 0\r\n\r\n",
                "{:?}",
                meta.header_list
            );
        }
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_field_and_the_101_says_connection_upgrade() {
        let raw: &[u8] = b"GET /chat?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
            Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: k==\r\n\
            Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n";
        let head = http::parse_request_head(raw, &http::Limits::default())
            .unwrap()
            .unwrap();
        assert!(head.upgrade);
        let peer: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let meta = build_upgrade_meta(&head, raw, peer, false, false);
        assert_eq!(meta.target(), b"/chat?x=1");
        let fields: Vec<(&[u8], &[u8])> = meta.fields().collect();
        let names: Vec<&str> = fields
            .iter()
            .map(|(n, _)| std::str::from_utf8(n).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Host",
                "Sec-WebSocket-Key",
                "Sec-WebSocket-Version",
                "Sec-WebSocket-Protocol",
                "upgrade",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "forwarded"
            ],
            "no Connection; the Upgrade field travels"
        );
        assert!(fields.contains(&(&b"upgrade"[..], &b"websocket"[..])));
        // The ordinary meta of the same head has no Upgrade (hop-by-hop).
        let plain = build_request_meta(&head, raw, peer, false, None, false);
        assert!(!plain
            .fields()
            .any(|(n, _)| n.eq_ignore_ascii_case(b"upgrade")));

        let mut b = Builder::response(101, b"Switching Protocols", 256);
        b.field(b"Upgrade", b"websocket");
        b.field(b"Connection", b"Upgrade");
        b.field(b"Sec-WebSocket-Accept", b"abc=");
        b.field(b"Content-Length", b"0");
        b.field(b"X-Bad", b"a\r\nInjected: 1");
        let mut out = Vec::new();
        write_upgrade_head(&mut out, &b.finish_response());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: abc=\r\nconnection: upgrade\r\n\r\n"
        );
    }

    #[test]
    fn request_meta_drops_what_the_clients_connection_names() {
        let raw: &[u8] = b"GET / HTTP/1.1\r\nHost: h\r\nX-Hop: 1\r\n\
            Connection: x-hop\r\nConnection: X-Second, Keep-Alive\r\nX-SECOND: 2\r\n\
            Keep-Alive: 5\r\nX-Kept: yes\r\n\r\n";
        let head = http::parse_request_head(raw, &http::Limits::default())
            .unwrap()
            .unwrap();
        let peer: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let meta = build_request_meta(&head, raw, peer, false, None, false);
        let names: Vec<&str> = meta
            .fields()
            .map(|(n, _)| std::str::from_utf8(n).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "Host",
                "X-Kept",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-forwarded-host",
                "forwarded"
            ]
        );
        // The JSON form of a plain v1 peer says the same.
        let json = RequestMeta::from_json(&request_json(&meta, false)).unwrap();
        assert!(json.header_list.is_none() && json.raw_target.is_none());
        assert!(!json
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("x-hop") || n == "x-second"));
        assert_eq!(json.headers.len(), names.len());
    }

    /// An absolute-form target's authority replaces the client's Host
    /// (RFC 9110 §7.2) in Host and the forwarding headers; an HTTP/1.0
    /// request without Host gets it too. Origin-form keeps its Host.
    #[test]
    fn an_absolute_form_targets_authority_is_the_host_sent_on() {
        let peer: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let meta = |raw: &[u8]| {
            let head = http::parse_request_head(raw, &http::Limits::default())
                .unwrap()
                .unwrap();
            let m = build_request_meta(&head, raw, peer, false, None, false);
            let f: Vec<(String, String)> = m
                .fields()
                .map(|(n, v)| (latin1_to_string(n), latin1_to_string(v)))
                .collect();
            (latin1_to_string(m.target()), f)
        };
        let (target, f) =
            meta(b"GET http://app.example:8080/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(target, "/p?q=1");
        assert!(
            f.contains(&("Host".into(), "app.example:8080".into())),
            "{f:?}"
        );
        assert!(!f.iter().any(|(_, v)| v == "other"), "{f:?}");
        assert!(f.contains(&("x-forwarded-host".into(), "app.example:8080".into())));
        let (_, f) = meta(b"GET http://app.example/p HTTP/1.0\r\n\r\n");
        assert!(f.contains(&("host".into(), "app.example".into())), "{f:?}");
        let (_, f) = meta(b"GET /p HTTP/1.1\r\nHost: mine\r\n\r\n");
        assert!(f.contains(&("Host".into(), "mine".into())), "{f:?}");
    }

    /// This hop's forwarding headers: appended to a trusted client's,
    /// IPv6 quoted and bracketed in `Forwarded` (RFC 7239 §6); the JSON form
    /// splits path and query.
    #[test]
    fn forwarding_headers_and_the_json_form() {
        let raw: &[u8] = b"POST /a%20b?x=1&y=%2F HTTP/1.1\r\nHost: h.example:8080\r\n\
            X-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\n\
            X-Forwarded-For: 10.0.0.2\r\n\r\n";
        let head = http::parse_request_head(raw, &http::Limits::default())
            .unwrap()
            .unwrap();
        let peer: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        let fields = |m: &binmeta::Request| -> Vec<(String, String)> {
            m.fields()
                .map(|(n, v)| (latin1_to_string(n), latin1_to_string(v)))
                .collect()
        };
        let trusted = build_request_meta(&head, raw, peer, true, Some(7), true);
        assert_eq!(trusted.target(), b"/a%20b?x=1&y=%2F");
        let got = fields(&trusted);
        let want = [
            ("Host", "h.example:8080"),
            ("content-length", "7"),
            ("x-forwarded-for", "10.0.0.1, 10.0.0.2, 2001:db8::1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "h.example:8080"),
            (
                "forwarded",
                "for=10.0.0.1, for=\"[2001:db8::1]\";host=h.example:8080;proto=https",
            ),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        let untrusted = build_request_meta(
            &head,
            raw,
            "192.0.2.9:1".parse().unwrap(),
            false,
            None,
            false,
        );
        let got = fields(&untrusted);
        assert!(got.contains(&("x-forwarded-for".into(), "192.0.2.9".into())));
        assert!(got.contains(&(
            "forwarded".into(),
            "for=192.0.2.9;host=h.example:8080;proto=http".into()
        )));
        let json = RequestMeta::from_json(&request_json(&untrusted, true)).unwrap();
        assert_eq!(json.method, "POST");
        assert_eq!(json.path, "/a b");
        assert_eq!(
            json.query,
            [("x".to_string(), "1".to_string()), ("y".into(), "/".into())]
        );
        assert_eq!(json.raw_target.as_deref(), Some("/a%20b?x=1&y=%2F"));
        assert_eq!(json.header_list.unwrap().len(), got.len());
    }

    #[test]
    fn head_and_304_keep_content_length_204_has_none() {
        let mut meta = ResponseMeta {
            status: 200,
            reason: "OK".into(),
            headers: vec![("content-length".into(), "42".into())],
            header_list: None,
        };
        let mut out = Vec::new();
        write_response_head(
            &mut out,
            &binmeta::Response::from_json_meta(&meta),
            Framing::None,
            Persist::Open { http10: false },
        );
        assert!(String::from_utf8_lossy(&out).contains("content-length: 42\r\n"));
        meta.status = 204;
        out.clear();
        write_response_head(
            &mut out,
            &binmeta::Response::from_json_meta(&meta),
            Framing::None,
            Persist::Open { http10: false },
        );
        assert!(!String::from_utf8_lossy(&out).contains("content-length"));
        meta.status = 200;
        out.clear();
        write_response_head(
            &mut out,
            &binmeta::Response::from_json_meta(&meta),
            Framing::Chunked,
            Persist::Close,
        );
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("transfer-encoding: chunked\r\n") && !s.contains("content-length"));
        assert!(s.ends_with("connection: close\r\n\r\n"));
    }
}
