//! A raw HTTP/1.1 client over `std::net::TcpStream`: tests write exactly the
//! bytes they mean (smuggling attempts, odd targets, pipelining) and read
//! responses with Content-Length, chunked, read-until-close and no-body
//! (HEAD, 1xx, 204, 304) framing. Reads time out after [`READ_TIMEOUT`] so a
//! hang fails the test instead of blocking it forever.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Status codes of interim (1xx) responses that preceded this one.
    pub interim: Vec<u16>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The `X-Echo-Target` header decoded back to raw bytes.
    pub fn echo_target(&self) -> Vec<u8> {
        let h = self
            .header("x-echo-target")
            .unwrap_or_else(|| panic!("expected X-Echo-Target in {}", self.summary()));
        hex::decode(h).expect("X-Echo-Target is hex")
    }

    /// The header lines the app received, `(name, value)` in order.
    pub fn echo_headers(&self) -> Vec<(String, String)> {
        let h = self
            .header("x-echo-headers")
            .unwrap_or_else(|| panic!("expected X-Echo-Headers in {}", self.summary()));
        let raw = hex::decode(h).expect("X-Echo-Headers is hex");
        let raw = String::from_utf8_lossy(&raw).into_owned();
        raw.split("\r\n")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap_or((l, ""));
                (n.to_string(), v.trim().to_string())
            })
            .collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// One-line description for assertion messages (body truncated).
    pub fn summary(&self) -> String {
        let body = String::from_utf8_lossy(&self.body[..self.body.len().min(300)]).into_owned();
        format!(
            "{} {:?}, headers {:?}, body {} bytes {:?}",
            self.status,
            self.reason,
            self.headers
                .iter()
                .filter(|(n, _)| !n.eq_ignore_ascii_case("x-echo-headers"))
                .collect::<Vec<_>>(),
            self.body.len(),
            body
        )
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.by_ref().take(1 << 20).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a complete response",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed inside a line",
        ));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| bad("non-UTF-8 response line"))
}

/// A response head: status, reason phrase, headers.
pub type Head = (u16, String, Vec<(String, String)>);

/// Reads one response head (status line + headers).
fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP/1.x status line: {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (n, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.push((n.to_string(), v.trim().to_string()));
    }
    Ok((status, reason, headers))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r)?;
        let size_txt = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16)
            .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            loop {
                if read_line(r)?.is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(bad("chunk data not followed by CRLF"));
        }
    }
}

/// Reads one final response (skipping and recording 1xx) for a request with
/// method `method` (HEAD responses carry no body).
pub fn read_response(r: &mut impl BufRead, method: &str) -> io::Result<Response> {
    let mut interim = Vec::new();
    loop {
        let (status, reason, headers) = read_head(r)?;
        if (100..200).contains(&status) && status != 101 {
            interim.push(status);
            continue;
        }
        let body = read_body(r, method, status, &headers)?;
        return Ok(Response {
            status,
            reason,
            headers,
            body,
            interim,
        });
    }
}

fn read_body(
    r: &mut impl BufRead,
    method: &str,
    status: u16,
    headers: &[(String, String)],
) -> io::Result<Vec<u8>> {
    if method.eq_ignore_ascii_case("HEAD")
        || status == 204
        || status == 304
        || status == 101
        || (100..200).contains(&status)
    {
        return Ok(Vec::new());
    }
    if let Some(te) = header(headers, "transfer-encoding") {
        if te.to_ascii_lowercase().contains("chunked") {
            return read_chunked(r);
        }
    }
    if let Some(cl) = header(headers, "content-length") {
        let n: usize = cl
            .trim()
            .parse()
            .map_err(|_| bad(format!("bad Content-Length {cl:?}")))?;
        let mut b = vec![0u8; n];
        r.read_exact(&mut b)?;
        return Ok(b);
    }
    let mut b = Vec::new();
    r.read_to_end(&mut b)?;
    Ok(b)
}

/// A keep-alive client connection. Requests may be pipelined: each write
/// queues the method so responses are framed correctly when read in order.
pub struct Conn {
    pub addr: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pending: VecDeque<String>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        Conn::try_connect(addr).unwrap_or_else(|e| panic!("expected to connect to {addr}: {e}"))
    }

    /// [`Conn::connect`], saying why it could not.
    pub fn try_connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr)?;
        Ok(Conn::on(addr, stream))
    }

    fn on(addr: SocketAddr, stream: TcpStream) -> Conn {
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        let _ = stream.set_nodelay(true);
        let writer = stream.try_clone().unwrap();
        Conn {
            addr,
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
            pending: VecDeque::new(),
        }
    }

    /// [`Conn::connect`] from a chosen local address (Linux routes all of
    /// 127.0.0.0/8 to loopback, so `127.0.0.2` is a second client).
    pub fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> Conn {
        Conn::try_connect_from(addr, local)
            .unwrap_or_else(|e| panic!("expected to connect to {addr} from {local}: {e}"))
    }

    /// [`Conn::connect_from`] that returns the error.
    pub fn try_connect_from(addr: SocketAddr, local: std::net::IpAddr) -> io::Result<Conn> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        sock.bind(&SocketAddr::new(local, 0).into())?;
        sock.connect(&addr.into())?;
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_write_timeout(Some(READ_TIMEOUT))?;
        let _ = stream.set_nodelay(true);
        let writer = stream.try_clone()?;
        Ok(Conn {
            addr,
            reader: BufReader::with_capacity(64 * 1024, stream),
            writer,
            pending: VecDeque::new(),
        })
    }

    /// A second handle on the socket, for writing from another thread.
    pub fn try_clone_writer(&self) -> TcpStream {
        self.writer.try_clone().expect("clone the client socket")
    }

    pub fn set_read_timeout(&self, t: Duration) {
        self.writer.set_read_timeout(Some(t)).unwrap();
    }

    /// Writes raw bytes; `methods` lists the method of each request they
    /// contain (for response framing).
    pub fn write_raw(&mut self, bytes: &[u8], methods: &[&str]) -> io::Result<()> {
        self.pending.extend(methods.iter().map(|m| m.to_string()));
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Sends a request built from parts: `Host` and `Content-Length` are
    /// added unless `headers` has them (or has `Transfer-Encoding`).
    pub fn send(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let req = build_request(method, target.as_bytes(), headers, body);
        self.write_raw(&req, &[method])
    }

    /// Reads the next response in order.
    pub fn read(&mut self) -> io::Result<Response> {
        let method = self
            .pending
            .pop_front()
            .unwrap_or_else(|| "GET".to_string());
        read_response(&mut self.reader, &method)
    }

    /// Reads just a head (e.g. an interim `100 Continue`) without a body.
    pub fn read_head_only(&mut self) -> io::Result<Head> {
        read_head(&mut self.reader)
    }

    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.send(method, target, headers, body)
            .unwrap_or_else(|e| panic!("expected to send {method} {target} to {}: {e}", self.addr));
        self.read().unwrap_or_else(|e| {
            panic!(
                "expected a response to {method} {target} from {}: {e}",
                self.addr
            )
        })
    }

    /// True if the server has closed the connection (reads EOF) within the read timeout.
    pub fn is_closed_by_peer(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.reader.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }
}

pub fn build_request(
    method: &str,
    target: &[u8],
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let has = |n: &str| headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(n));
    let mut req = Vec::with_capacity(body.len() + 512);
    req.extend_from_slice(method.as_bytes());
    req.push(b' ');
    req.extend_from_slice(target);
    req.extend_from_slice(b" HTTP/1.1\r\n");
    if !has("host") {
        req.extend_from_slice(b"Host: test.local\r\n");
    }
    for (n, v) in headers {
        req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    if !has("content-length")
        && !has("transfer-encoding")
        && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH"))
    {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    req
}

/// Encodes `body` as chunked with the given chunk size (last chunk may be shorter).
pub fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk.max(1) * 12 + 16);
    for c in body.chunks(chunk.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// One request on a fresh connection; `bytes` is written as is.
pub fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Response {
    send_raw_method(addr, bytes, "GET")
}

pub fn send_raw_method(addr: SocketAddr, bytes: &[u8], method: &str) -> Response {
    let mut c = Conn::connect(addr);
    c.pending.push_back(method.to_string());
    // Written from another thread while this one reads: a server may answer
    // (413, 431…) before it has read everything, and must still be heard.
    let mut w = c.writer.try_clone().unwrap();
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&data);
        let _ = w.flush();
    });
    let r = c.read();
    let _ = c.writer.shutdown(std::net::Shutdown::Both); // unblocks the writer if the server stopped reading
    let _ = writer.join();
    r.unwrap_or_else(|e| {
        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        panic!("expected a response from {addr} to {shown:?}…: {e}")
    })
}

/// GET-like helper on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    Conn::connect(addr).request(method, target, headers, body)
}

/// [`request`] on a new connection, returning an IO failure (refused,
/// reset, closed before a response) instead of panicking.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let mut c = Conn::try_connect(addr)?;
    c.send(method, target, headers, body)?;
    c.read()
}
