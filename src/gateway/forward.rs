//! What a proxy changes on the way through (RFC 9110 §7.6): hop-by-hop
//! headers out, `X-Forwarded-*` and `Forwarded` in; and the response head
//! written back to the client. Pure functions over buffers.

use std::net::{IpAddr, SocketAddr};

use crate::http::headers::HopByHop;
use crate::http::{self, RequestHead};
use crate::protocol::anpx::{latin1_to_string, string_to_latin1, RequestMeta, ResponseMeta};

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

fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// Builds the ANPX request meta from a parsed head. `chunked_len`: the
/// dechunked body length when the client sent chunked (the app then gets
/// a `Content-Length`).
#[allow(clippy::too_many_arguments)]
pub fn build_request_meta(
    head: &RequestHead,
    buf: &[u8],
    path: &str,
    _raw_path: &[u8],
    raw_query: &[u8],
    peer: SocketAddr,
    tls: bool,
    chunked_len: Option<usize>,
    trust_forwarded: bool,
) -> RequestMeta {
    let (mut list, seen) = client_headers(head, buf, chunked_len, trust_forwarded);
    if let Some(n) = chunked_len {
        list.push(("content-length".into(), n.to_string()));
    }
    push_forwarding(&mut list, seen, peer, tls);
    let headers = flat_headers(&list);
    let target = &buf[head.target.clone()];
    RequestMeta {
        method: head.method(buf).to_owned(),
        path: path.to_owned(),
        headers,
        query: parse_query(raw_query),
        raw_target: Some(latin1_to_string(origin_form(target))),
        header_list: Some(list),
    }
}

/// What the client's own forwarding headers said (kept only with
/// `trust_forwarded`), and its Host.
#[derive(Default)]
struct Forwarded {
    xff: Option<String>,
    fwd: Option<String>,
    host: Option<String>,
    have_proto: bool,
    have_host: bool,
}

/// The client's header lines that travel on, in order, duplicates kept:
/// hop-by-hop fields (and those `Connection` names), `Expect`, a
/// Content-Length replaced by the dechunked length, and forwarding
/// headers unless trusted are left out.
fn client_headers(
    head: &RequestHead,
    buf: &[u8],
    chunked_len: Option<usize>,
    trust_forwarded: bool,
) -> (Vec<(String, String)>, Forwarded) {
    let hop = HopByHop::of(
        head.headers
            .iter()
            .map(|h| (&buf[h.name.clone()], &buf[h.value.clone()])),
    );
    let mut list: Vec<(String, String)> = Vec::with_capacity(head.headers.len() + 4);
    let mut seen = Forwarded::default();
    let join = |prior: Option<String>, v: String| match prior {
        Some(p) => format!("{p}, {v}"),
        None => v,
    };
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
            let v = latin1_to_string(value);
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                seen.xff = Some(join(seen.xff.take(), v));
                continue;
            }
            if name.eq_ignore_ascii_case(b"forwarded") {
                seen.fwd = Some(join(seen.fwd.take(), v));
                continue;
            }
            seen.have_proto |= name.eq_ignore_ascii_case(b"x-forwarded-proto");
            seen.have_host |= name.eq_ignore_ascii_case(b"x-forwarded-host");
        }
        if name.eq_ignore_ascii_case(b"host") {
            seen.host = Some(latin1_to_string(value));
        }
        let name_s = std::str::from_utf8(name).unwrap_or_default();
        list.push((name_s.to_owned(), latin1_to_string(value)));
    }
    (list, seen)
}

/// `X-Forwarded-For/-Proto/-Host` and `Forwarded` (RFC 7239) for this hop,
/// appended to what a trusted client sent.
fn push_forwarding(list: &mut Vec<(String, String)>, seen: Forwarded, peer: SocketAddr, tls: bool) {
    let proto = if tls { "https" } else { "http" };
    let ip = peer.ip().to_canonical();
    let ip_s = ip.to_string();
    list.push((
        "x-forwarded-for".into(),
        match seen.xff {
            Some(p) => format!("{p}, {ip_s}"),
            None => ip_s,
        },
    ));
    if !seen.have_proto {
        list.push(("x-forwarded-proto".into(), proto.into()));
    }
    if let (Some(h), false) = (&seen.host, seen.have_host) {
        list.push(("x-forwarded-host".into(), h.clone()));
    }
    let mut fwd = format!("for={}", forwarded_for(ip));
    if let Some(h) = &seen.host {
        if h.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b';' && b != b',')
        {
            fwd.push_str(";host=");
            fwd.push_str(h);
        } else {
            fwd.push_str(&format!(";host={:?}", h));
        }
    }
    fwd.push_str(";proto=");
    fwd.push_str(proto);
    list.push((
        "forwarded".into(),
        match seen.fwd {
            Some(p) => format!("{p}, {fwd}"),
            None => fwd,
        },
    ));
}

/// The flat v1 map: lower-case names, duplicates joined (RFC 9110 §5.3).
fn flat_headers(list: &[(String, String)]) -> Vec<(String, String)> {
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
pub fn write_response_head(out: &mut Vec<u8>, meta: &ResponseMeta, framing: Framing, close: bool) {
    let status = meta.status;
    let reason = if !meta.reason.is_empty()
        && meta
            .reason
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
    {
        meta.reason.as_str()
    } else {
        http::headers::reason_phrase(status)
    };
    http::headers::write_status_line(out, status, reason);
    let keep_cl = framing == Framing::None && status != 204;
    let fields = meta.header_list.as_deref().unwrap_or(&meta.headers);
    // Connection tokens are ASCII, so the Latin-1 text of an exact value
    // reads the same as its bytes.
    let hop = HopByHop::of(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    for (name, value) in fields {
        if hop.drops(name)
            || (name.eq_ignore_ascii_case("content-length") && !keep_cl)
            || !valid_field_name(name.as_bytes())
        {
            continue;
        }
        let value: Vec<u8> = if meta.header_list.is_some() {
            match string_to_latin1(value) {
                Some(v) => v,
                None => value.as_bytes().to_vec(),
            }
        } else {
            value.as_bytes().to_vec()
        };
        if !valid_field_value(&value) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None | Framing::Close => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut out = Vec::new();
        write_response_head(&mut out, &meta, Framing::Length(3), false);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\ncontent-length: 3\r\n\r\n"
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
            let mut out = Vec::new();
            write_response_head(&mut out, &meta, Framing::Length(0), false);
            let s = String::from_utf8(out).unwrap().to_ascii_lowercase();
            assert_eq!(
                s, "http/1.1 200 ok\r\nx-kept: yes\r\ncontent-length: 0\r\n\r\n",
                "{:?}",
                meta.header_list
            );
        }
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
        let meta = build_request_meta(&head, raw, "/", b"/", b"", peer, false, None, false);
        let names = crate::protocol::anpx::meta::list_names(&meta.header_list);
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
        assert!(!meta
            .headers
            .iter()
            .any(|(n, _)| n.starts_with("x-hop") || n == "x-second"));
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
        write_response_head(&mut out, &meta, Framing::None, false);
        assert!(String::from_utf8_lossy(&out).contains("content-length: 42\r\n"));
        meta.status = 204;
        out.clear();
        write_response_head(&mut out, &meta, Framing::None, false);
        assert!(!String::from_utf8_lossy(&out).contains("content-length"));
        meta.status = 200;
        out.clear();
        write_response_head(&mut out, &meta, Framing::Chunked, true);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("transfer-encoding: chunked\r\n") && !s.contains("content-length"));
        assert!(s.ends_with("connection: close\r\n\r\n"));
    }
}
