//! The client side of HTTP/1.1 as the load generator needs it, sans-IO:
//! build one request, and tell from a buffer whether a whole response has
//! arrived (head + body by Content-Length, chunked, or until close).
//! Never does IO; never copies a body (it is counted and dropped).

use bytes::{Buf, BytesMut};

/// Target parsed from `http://host:port/path?query`.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`, for connect and the Host header.
    pub authority: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let authority = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            authority,
            path: path.to_owned(),
        })
    }
}

/// The bytes of one keep-alive request: GET without a body, POST with a
/// `body_len`-byte body of `b'a'`. Built once and reused for every request.
pub fn build_request(t: &Target, body_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body_len);
    if body_len == 0 {
        out.extend_from_slice(
            format!("GET {} HTTP/1.1\r\nhost: {}\r\n\r\n", t.path, t.authority).as_bytes(),
        );
    } else {
        out.extend_from_slice(
            format!(
                "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
                t.path, t.authority, body_len
            )
            .as_bytes(),
        );
        out.resize(out.len() + body_len, b'a');
    }
    out
}

/// How the body of a response is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Where a chunked body's parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a `size[;ext]\r\n` line.
    Size,
    /// In chunk data; this many bytes (data + CRLF) left.
    Data(usize),
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
}

/// What the parser of one response found so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Need more bytes.
    More,
    /// The response is complete and consumed from the buffer.
    Done {
        status: u16,
        keep_alive: bool,
        body_bytes: usize,
    },
}

/// Incremental parser of one response. It consumes from the front of the
/// buffer as it goes (body bytes are dropped as they arrive, so a 1 MiB
/// body never needs a 1 MiB buffer); call again with the same buffer after
/// more bytes were appended, with `eof` once the peer closed.
#[derive(Debug)]
pub struct ResponseParser {
    head: Option<(u16, bool, BodyKind)>,
    /// Length-delimited body: bytes still to come.
    left: usize,
    body_bytes: usize,
    chunk: Chunk,
}

pub const MAX_HEAD: usize = 64 * 1024;

impl ResponseParser {
    pub fn new() -> ResponseParser {
        ResponseParser {
            head: None,
            left: 0,
            body_bytes: 0,
            chunk: Chunk::Size,
        }
    }

    pub fn advance(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Progress, String> {
        if self.head.is_none() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            let n = match r.parse(buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err("response head too large".into())
                }
                Ok(httparse::Status::Partial) if eof => return Err("eof in response head".into()),
                Ok(httparse::Status::Partial) => return Ok(Progress::More),
                Err(e) => return Err(format!("bad response head: {e}")),
            };
            let status = r.code.unwrap_or(0);
            let mut keep_alive = r.version == Some(1);
            let mut kind = BodyKind::UntilClose;
            for h in r.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    let len = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                        .ok_or("bad content-length")?;
                    if kind != BodyKind::Chunked {
                        kind = BodyKind::Length(len);
                    }
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    if h.value.to_ascii_lowercase().ends_with(b"chunked") {
                        kind = BodyKind::Chunked;
                    }
                } else if h.name.eq_ignore_ascii_case("connection") {
                    let v = h.value.to_ascii_lowercase();
                    if v.windows(5).any(|w| w == b"close") {
                        keep_alive = false;
                    } else if v.windows(10).any(|w| w == b"keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            if status == 204 || status == 304 || (100..200).contains(&status) {
                kind = BodyKind::Length(0);
            }
            if kind == BodyKind::UntilClose {
                keep_alive = false;
            }
            if let BodyKind::Length(len) = kind {
                self.left = len;
                self.body_bytes = len;
            }
            self.head = Some((status, keep_alive, kind));
            buf.advance(n);
        }
        let (status, keep_alive, kind) = self.head.expect("head parsed above");
        let done = |body_bytes| Progress::Done {
            status,
            keep_alive,
            body_bytes,
        };
        match kind {
            BodyKind::Length(_) => {
                let n = self.left.min(buf.len());
                buf.advance(n);
                self.left -= n;
                if self.left == 0 {
                    Ok(done(self.body_bytes))
                } else if eof {
                    Err("eof in response body".into())
                } else {
                    Ok(Progress::More)
                }
            }
            BodyKind::UntilClose => {
                self.body_bytes += buf.len();
                buf.clear();
                if eof {
                    Ok(done(self.body_bytes))
                } else {
                    Ok(Progress::More)
                }
            }
            BodyKind::Chunked => loop {
                match self.chunk {
                    Chunk::Data(left) => {
                        let n = left.min(buf.len());
                        buf.advance(n);
                        if n < left {
                            self.chunk = Chunk::Data(left - n);
                            if eof {
                                return Err("eof in chunk".into());
                            }
                            return Ok(Progress::More);
                        }
                        self.chunk = Chunk::Size;
                    }
                    Chunk::Size | Chunk::Trailer => {
                        let Some(i) = memchr::memchr(b'\n', buf) else {
                            if eof {
                                return Err("eof in chunk size".into());
                            }
                            return Ok(Progress::More);
                        };
                        let line = buf.split_to(i + 1);
                        let line = &line[..i];
                        let line = line.strip_suffix(b"\r").unwrap_or(line);
                        if self.chunk == Chunk::Trailer {
                            if line.is_empty() {
                                return Ok(done(self.body_bytes));
                            }
                            continue;
                        }
                        let hex = line.split(|&b| b == b';').next().unwrap_or(b"");
                        let size = std::str::from_utf8(hex)
                            .ok()
                            .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                            .ok_or("bad chunk size")?;
                        if size == 0 {
                            self.chunk = Chunk::Trailer;
                        } else {
                            self.body_bytes += size;
                            self.chunk = Chunk::Data(size + 2);
                        }
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> (Progress, usize) {
        // Byte by byte: the parser must never depend on how reads split.
        let mut p = ResponseParser::new();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = p.advance(&mut buf, false).unwrap();
            if i + 1 < bytes.len() {
                assert_eq!(r, Progress::More, "at {i}");
            } else {
                return (r, buf.len());
            }
        }
        unreachable!()
    }

    #[test]
    fn content_length() {
        let r = run(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc");
        let want = Progress::Done {
            status: 200,
            keep_alive: true,
            body_bytes: 3,
        };
        assert_eq!(r, (want, 0));
    }

    #[test]
    fn chunked_with_trailer() {
        let r = run(b"HTTP/1.1 404 NF\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n");
        match r.0 {
            Progress::Done {
                status, body_bytes, ..
            } => {
                assert_eq!((status, body_bytes), (404, 5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn target() {
        let t = Target::parse("http://127.0.0.1:81/bytes/9?a=b").unwrap();
        assert_eq!(t.authority, "127.0.0.1:81");
        assert_eq!(t.path, "/bytes/9?a=b");
    }
}
