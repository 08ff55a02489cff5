//! The receiver's HTTP/1.1 client to the local app: a keep-alive
//! connection pool per core, request heads rebuilt from ANPX meta (exact
//! target and header list when negotiated), responses read whole
//! (Content-Length, chunked, or until close).

use std::cell::RefCell;
use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::url::Url;
use crate::http::{self, ChunkedDecoder, ChunkedStep, ResponseBody};
use crate::protocol::anpx::{latin1_to_string, string_to_latin1, RequestMeta, ResponseMeta};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to upstream {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("upstream io: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before a complete response")]
    Closed,
    #[error("upstream sent an invalid response: {0}")]
    BadResponse(String),
    #[error("upstream response body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request cannot be sent upstream: {0}")]
    BadRequest(&'static str),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
}

pub struct Upstream {
    url: Url,
    idle: RefCell<Vec<TcpStream>>,
    max_idle: usize,
    max_body: usize,
    limits: http::Limits,
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

const PATH_SET: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'%');
const QUERY_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The request-target: the exact one when the gateway sent it, otherwise
/// rebuilt from the decoded path and query (plain ANPX v1).
fn request_target(meta: &RequestMeta) -> Result<Vec<u8>, UpstreamError> {
    let t = match &meta.raw_target {
        Some(raw) => {
            string_to_latin1(raw).ok_or(UpstreamError::BadRequest("raw_target not latin-1"))?
        }
        None => {
            let mut t = percent_encoding::utf8_percent_encode(&meta.path, PATH_SET).to_string();
            for (i, (k, v)) in meta.query.iter().enumerate() {
                t.push(if i == 0 { '?' } else { '&' });
                t.extend(percent_encoding::utf8_percent_encode(k, QUERY_SET));
                t.push('=');
                t.extend(percent_encoding::utf8_percent_encode(v, QUERY_SET));
            }
            t.into_bytes()
        }
    };
    if t.is_empty() || t.iter().any(|b| *b <= b' ' || *b == 0x7f) {
        return Err(UpstreamError::BadRequest(
            "request-target has spaces or controls",
        ));
    }
    Ok(t)
}

/// Writes the upstream request head.
pub fn write_request_head(
    out: &mut Vec<u8>,
    meta: &RequestMeta,
    body_len: usize,
    upstream_host: &str,
) -> Result<(), UpstreamError> {
    if !is_token(meta.method.as_bytes()) {
        return Err(UpstreamError::BadRequest("method is not a token"));
    }
    out.extend_from_slice(meta.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(&request_target(meta)?);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let exact = meta.header_list.is_some();
    let list = meta.header_list.as_ref().unwrap_or(&meta.headers);
    let mut has_host = false;
    let mut had_cl = false;
    for (name, value) in list {
        let n = name.as_bytes();
        if http::headers::is_hop_by_hop(name) || !is_token(n) {
            continue;
        }
        if name.eq_ignore_ascii_case("content-length") {
            had_cl = true;
            continue; // recomputed below from the body actually sent
        }
        let v = if exact {
            string_to_latin1(value).unwrap_or_else(|| value.as_bytes().to_vec())
        } else {
            value.as_bytes().to_vec()
        };
        if v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            continue;
        }
        if name.eq_ignore_ascii_case("host") {
            if has_host {
                continue;
            }
            has_host = true;
        }
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(&v);
        out.extend_from_slice(b"\r\n");
    }
    if !has_host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(upstream_host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || had_cl || matches!(meta.method.as_str(), "POST" | "PUT" | "PATCH") {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body_len.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

enum Read {
    Data,
    Eof,
}

async fn read_more<S: AsyncReadRent>(io: &mut S, buf: &mut BytesMut) -> io::Result<Read> {
    if buf.capacity() - buf.len() < 8 * 1024 {
        buf.reserve(64 * 1024);
    }
    let b = std::mem::take(buf);
    let (res, b) = crate::net::read_append(io, b).await;
    *buf = b;
    match res? {
        0 => Ok(Read::Eof),
        _ => Ok(Read::Data),
    }
}

impl Upstream {
    pub fn new(url: Url, max_idle: usize, max_body: usize) -> Self {
        Self {
            url,
            idle: RefCell::new(Vec::new()),
            max_idle,
            max_body,
            limits: http::Limits {
                max_request_line: 64 * 1024,
                max_head: 256 * 1024,
                max_headers: 1000,
            },
        }
    }

    async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let addr = self.url.authority();
        let s = TcpStream::connect(addr.as_str())
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    /// Calls the app once; a pooled connection that turns out stale
    /// (closed before any response byte) is retried on a fresh one.
    pub async fn call(
        &self,
        meta: &RequestMeta,
        body: &Bytes,
    ) -> Result<(ResponseMeta, Bytes), UpstreamError> {
        let mut head = Vec::with_capacity(1024);
        write_request_head(&mut head, meta, body.len(), &self.url.host_header())?;
        let head = Bytes::from(head);
        let is_head = meta.method == "HEAD";
        let pooled = self.idle.borrow_mut().pop();
        if let Some(conn) = pooled {
            match self.exchange(conn, &head, body, is_head).await {
                Err(Attempt::Stale) => {}
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(r) => return Ok(r),
            }
        }
        let conn = self.connect().await?;
        match self.exchange(conn, &head, body, is_head).await {
            Ok(r) => Ok(r),
            Err(Attempt::Stale) => Err(UpstreamError::Closed),
            Err(Attempt::Failed(e)) => Err(e),
        }
    }

    async fn exchange(
        &self,
        mut conn: TcpStream,
        head: &Bytes,
        body: &Bytes,
        is_head: bool,
    ) -> Result<(ResponseMeta, Bytes), Attempt> {
        // Head and body as two writes: the body is a refcounted slice of
        // the tunnel frame, sent without a copy.
        let (r, _) = conn.write_all(head.clone()).await;
        r.map_err(|_| Attempt::Stale)?;
        if !body.is_empty() {
            let (r, _) = conn.write_all(body.clone()).await;
            r.map_err(|e| Attempt::Failed(e.into()))?;
        }
        let mut buf = BytesMut::with_capacity(16 * 1024);
        let resp = loop {
            match http::parse_response_head(&buf, &self.limits, is_head) {
                Ok(Some(h)) if (100..200).contains(&h.status) => {
                    // Interim responses are not forwarded (DESIGN.md).
                    let _ = buf.split_to(h.head_len);
                    continue;
                }
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => return Err(Attempt::Failed(UpstreamError::BadResponse(e.to_string()))),
            }
            let empty = buf.is_empty();
            match read_more(&mut conn, &mut buf).await {
                Ok(Read::Data) => {}
                Ok(Read::Eof) | Err(_) if empty => return Err(Attempt::Stale),
                Ok(Read::Eof) => return Err(Attempt::Failed(UpstreamError::Closed)),
                Err(e) => return Err(Attempt::Failed(e.into())),
            }
        };
        let head_bytes = buf.split_to(resp.head_len).freeze();
        let mut keep = resp.keep_alive;
        let body = match resp.body {
            ResponseBody::None => Bytes::new(),
            ResponseBody::ContentLength(n) => {
                let n = n as usize;
                if n > self.max_body {
                    return Err(Attempt::Failed(UpstreamError::TooLarge(self.max_body)));
                }
                if buf.capacity() < n {
                    buf.reserve(n - buf.len());
                }
                while buf.len() < n {
                    match read_more(&mut conn, &mut buf).await {
                        Ok(Read::Data) => {}
                        Ok(Read::Eof) => return Err(Attempt::Failed(UpstreamError::Closed)),
                        Err(e) => return Err(Attempt::Failed(e.into())),
                    }
                }
                buf.split_to(n).freeze()
            }
            ResponseBody::Chunked => {
                let mut dec = ChunkedDecoder::new(64 * 1024);
                let mut out = BytesMut::new();
                loop {
                    match dec.decode(&mut buf) {
                        Ok(ChunkedStep::Data(d)) => {
                            if out.len() + d.len() > self.max_body {
                                return Err(Attempt::Failed(UpstreamError::TooLarge(
                                    self.max_body,
                                )));
                            }
                            out.extend_from_slice(&d);
                        }
                        Ok(ChunkedStep::Done) => break,
                        Ok(ChunkedStep::NeedMore) => match read_more(&mut conn, &mut buf).await {
                            Ok(Read::Data) => {}
                            Ok(Read::Eof) => return Err(Attempt::Failed(UpstreamError::Closed)),
                            Err(e) => return Err(Attempt::Failed(e.into())),
                        },
                        Err(e) => {
                            return Err(Attempt::Failed(UpstreamError::BadResponse(e.to_string())))
                        }
                    }
                }
                out.freeze()
            }
            ResponseBody::UntilClose => {
                keep = false;
                loop {
                    if buf.len() > self.max_body {
                        return Err(Attempt::Failed(UpstreamError::TooLarge(self.max_body)));
                    }
                    match read_more(&mut conn, &mut buf).await {
                        Ok(Read::Data) => {}
                        Ok(Read::Eof) => break,
                        Err(e) => return Err(Attempt::Failed(e.into())),
                    }
                }
                std::mem::take(&mut buf).freeze()
            }
        };
        if keep && buf.is_empty() {
            let mut idle = self.idle.borrow_mut();
            if idle.len() < self.max_idle {
                idle.push(conn);
            }
        }
        Ok((response_meta(&resp, &head_bytes), body))
    }
}

enum Attempt {
    /// The connection was dead before any response byte: safe to retry.
    Stale,
    Failed(UpstreamError),
}

/// ANPX response meta: the flat v1 map and the exact header list.
fn response_meta(resp: &http::ResponseHead, buf: &[u8]) -> ResponseMeta {
    let mut list = Vec::with_capacity(resp.headers.len());
    let mut flat: Vec<(String, String)> = Vec::with_capacity(resp.headers.len());
    for h in &resp.headers {
        let name = String::from_utf8_lossy(&buf[h.name.clone()]).into_owned();
        if http::headers::is_hop_by_hop(&name) {
            continue;
        }
        let value = latin1_to_string(&buf[h.value.clone()]);
        let lower = name.to_ascii_lowercase();
        match flat.iter_mut().find(|(k, _)| *k == lower) {
            Some((_, v)) => {
                v.push_str(", ");
                v.push_str(&value);
            }
            None => flat.push((lower, value.clone())),
        }
        list.push((name, value));
    }
    ResponseMeta {
        status: resp.status,
        reason: String::from_utf8_lossy(&buf[resp.reason.clone()]).into_owned(),
        headers: flat,
        header_list: Some(list),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(raw: Option<&str>) -> RequestMeta {
        RequestMeta {
            method: "GET".into(),
            path: "/a b/中".into(),
            headers: vec![("host".into(), "gw".into())],
            query: vec![("q".into(), "1 2".into()), ("q".into(), "&".into())],
            raw_target: raw.map(Into::into),
            header_list: None,
        }
    }

    #[test]
    fn plain_v1_target_is_reencoded() {
        let mut out = Vec::new();
        write_request_head(&mut out, &meta(None), 0, "up:1").unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("GET /a%20b/%E4%B8%AD?q=1%202&q=%26 HTTP/1.1\r\n"),
            "{s}"
        );
        assert!(s.contains("host: gw\r\n"));
    }

    #[test]
    fn exact_target_wins_and_controls_are_refused() {
        let mut out = Vec::new();
        write_request_head(&mut out, &meta(Some("/x?a=%20&a")), 3, "up:1").unwrap();
        assert!(out.starts_with(b"GET /x?a=%20&a HTTP/1.1\r\n"));
        assert!(String::from_utf8_lossy(&out).contains("content-length: 3\r\n"));
        let mut out = Vec::new();
        assert!(write_request_head(&mut out, &meta(Some("/x y")), 0, "up").is_err());
    }
}

#[cfg(test)]
mod split_tests {
    use crate::http;

    #[test]
    fn response_head_prefixes_are_incomplete_not_errors() {
        let full = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi";
        let limits = http::Limits::default();
        for i in 0..full.len() - 2 {
            let r = http::parse_response_head(&full[..i], &limits, false);
            assert!(
                matches!(r, Ok(None) | Ok(Some(_))),
                "prefix {i}: {:?}",
                r.err()
            );
        }
    }
}
