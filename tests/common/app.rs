//! The local HTTP app the receiver forwards to: a small HTTP/1.1 server on
//! `std::net`, one thread per connection, keep-alive, `Content-Length` and
//! chunked request bodies. What it answers is driven by request headers, so a
//! test (or anyone trying a request by hand through the proxy) can ask for a
//! status, a body size, chunked encoding, several `Set-Cookie`s or a held
//! response without changing this code:
//!
//! | request header | effect |
//! |---|---|
//! | (none) | 200, body = request body (or, for an app started with [`App::saying`], what it says about the request), `X-Echo-*` headers describe the request |
//! | `X-Test-Status: N`, `X-Test-Reason: text` | that status line |
//! | `X-Test-Body-Len: N` | a deterministic body of N bytes ([`pattern_body`]) |
//! | `X-Test-Chunked: 1` | the body goes out with `Transfer-Encoding: chunked` |
//! | `X-Test-Set-Cookies: N` | N `Set-Cookie: c{i}=v{i}; Path=/` plus three `X-Dup` |
//! | `X-Test-Hold: NAME` | record arrival, block until [`App::release`] or the connection dies |
//!
//! Echo headers, present on every response: `X-Echo-Method`, `X-Echo-Target`
//! (hex of the raw request-target), `X-Echo-Headers` (hex of the header lines
//! exactly as received, CRLF-separated), `X-Echo-Body-Len`,
//! `X-Echo-Body-Sha256`. Every request is also logged for [`App::requests`].
//!
//! It never sleeps to synchronise: held requests wait on a `Condvar`; the
//! periodic wake-up in [`hold`] only exists to notice a dead connection.

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for something the app should see (hang guard only).
pub const APP_WAIT: Duration = Duration::from_secs(30);
/// Longest time a held request stays held if nobody releases it.
const MAX_HOLD: Duration = Duration::from_secs(120);
/// Largest head the app accepts (the gateway's own limit is lower).
const MAX_HEAD: usize = 1 << 20;

/// Byte `i` of every generated body: deterministic, not periodic in 256.
pub fn pattern_byte(i: usize) -> u8 {
    ((i * 31 + 7) % 251) as u8
}

/// The body the app sends for `X-Test-Body-Len: n`.
pub fn pattern_body(n: usize) -> Vec<u8> {
    (0..n).map(pattern_byte).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One request as the app received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The raw request-target bytes.
    pub target: Vec<u8>,
    /// Header lines in order, names as sent (case kept), values raw.
    pub headers: Vec<(String, String)>,
    /// The header block exactly as received (lines joined by CRLF).
    pub raw_headers: Vec<u8>,
    pub body_len: usize,
    pub body_sha256: String,
    /// Whether the body came chunked.
    pub chunked: bool,
}

impl RecordedRequest {
    /// The request-target as text (lossy).
    pub fn target_text(&self) -> String {
        String::from_utf8_lossy(&self.target).into_owned()
    }

    /// First value of header `name` (case-insensitive).
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
}

#[derive(Default)]
struct Shared {
    /// Connections accepted so far.
    accepted: usize,
    arrived: HashSet<String>,
    released: HashSet<String>,
    /// Held requests whose connection the peer closed before release.
    abandoned: HashSet<String>,
    log: Vec<RecordedRequest>,
}

/// What an app started with [`App::saying`] answers instead of the echo.
type Say = dyn Fn(&RecordedRequest) -> Vec<u8> + Send + Sync;

struct State {
    shared: Mutex<Shared>,
    changed: Condvar,
    say: Option<Box<Say>>,
}

/// A running test app. It lives until the test process ends (threads are
/// detached); every test makes its own.
pub struct App {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl App {
    pub fn start() -> App {
        App::start_with(None)
    }

    /// An app whose default body is `say(request)` instead of the request's
    /// body (e.g. `app saw GET /path`), for tests that read the answer as
    /// text; the `X-Test-*` headers and `X-Echo-*` headers work as usual.
    pub fn saying(say: impl Fn(&RecordedRequest) -> Vec<u8> + Send + Sync + 'static) -> App {
        App::start_with(Some(Box::new(say)))
    }

    fn start_with(say: Option<Box<Say>>) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").expect("test app: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("test app: local_addr");
        let incoming = std::iter::from_fn(move || Some(listener.accept().map(|(s, _)| s)));
        let state = App::serve(say, incoming, |s: TcpStream| {
            let _ = s.set_nodelay(true);
            Ok(s)
        });
        App { addr, state }
    }

    /// The same app on a unix-domain socket at `path` (`addr` is unset:
    /// 0.0.0.0:0).
    pub fn start_unix(path: &Path) -> App {
        let listener = UnixListener::bind(path).expect("test app: bind unix socket");
        let incoming = std::iter::from_fn(move || Some(listener.accept().map(|(s, _)| s)));
        let state = App::serve(None, incoming, Ok);
        App {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            state,
        }
    }

    /// The same app over TLS with the PEM certificate chain and key given:
    /// an `https://` upstream.
    pub fn start_tls(cert: &Path, key: &Path) -> App {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("test app: TLS certificate and key");
        let cfg = Arc::new(cfg);
        let listener = TcpListener::bind("127.0.0.1:0").expect("test app: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("test app: local_addr");
        let incoming = std::iter::from_fn(move || Some(listener.accept().map(|(s, _)| s)));
        let state = App::serve(None, incoming, move |tcp: TcpStream| {
            let _ = tcp.set_nodelay(true);
            let conn = rustls::ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
            Ok(rustls::StreamOwned::new(conn, tcp))
        });
        App { addr, state }
    }

    /// Accepts from `incoming` (each through `wrap`) on a thread, one
    /// thread per connection.
    fn serve<S: Conn, T: Send + 'static>(
        say: Option<Box<Say>>,
        incoming: impl Iterator<Item = io::Result<T>> + Send + 'static,
        wrap: impl Fn(T) -> io::Result<S> + Send + 'static,
    ) -> Arc<State> {
        let state = Arc::new(State {
            shared: Mutex::new(Shared::default()),
            changed: Condvar::new(),
            say,
        });
        let st = state.clone();
        thread::Builder::new()
            .name("app-accept".into())
            .spawn(move || {
                for stream in incoming {
                    let Ok(stream) = stream.and_then(&wrap) else {
                        continue;
                    };
                    st.shared.lock().unwrap().accepted += 1;
                    let st = st.clone();
                    let _ = thread::Builder::new()
                        .name("app-conn".into())
                        .stack_size(256 * 1024)
                        .spawn(move || {
                            let _ = serve_connection(stream, &st);
                        });
                }
            })
            .expect("test app: spawn accept thread");
        state
    }

    /// Connections accepted so far (a pooled upstream connection is one).
    pub fn connections(&self) -> usize {
        self.state.shared.lock().unwrap().accepted
    }

    /// Every request received so far, in arrival order (of completed bodies).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.shared.lock().unwrap().log.clone()
    }

    /// Requests whose raw target starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.target.starts_with(prefix.as_bytes()))
            .collect()
    }

    /// Blocks until a request with `X-Test-Hold: name` has reached the app.
    pub fn wait_arrived(&self, name: &str) {
        self.wait_for(name, "arrive", |g| g.arrived.contains(name));
    }

    /// Blocks until the held request `name` has had its connection closed
    /// by the peer (the receiver gave the call up) before its release.
    #[allow(dead_code)] // not every test binary uses it
    pub fn wait_abandoned(&self, name: &str) {
        self.wait_for(name, "be abandoned", |g| g.abandoned.contains(name));
    }

    fn wait_for(&self, name: &str, what: &str, done: impl Fn(&Shared) -> bool) {
        let deadline = Instant::now() + APP_WAIT;
        let mut g = self.state.shared.lock().unwrap();
        while !done(&g) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "test app: expected held request {name:?} to {what} within {APP_WAIT:?}, it did not"
            );
            g = self
                .state
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap()
                .0;
        }
    }

    pub fn has_arrived(&self, name: &str) -> bool {
        self.state.shared.lock().unwrap().arrived.contains(name)
    }

    /// Lets the held request `name` answer.
    pub fn release(&self, name: &str) {
        self.state
            .shared
            .lock()
            .unwrap()
            .released
            .insert(name.to_string());
        self.state.changed.notify_all();
    }
}

struct Head {
    method: String,
    target: Vec<u8>,
    headers: Vec<(String, String)>,
    raw_headers: Vec<u8>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one CRLF- (or LF-) terminated line, without the terminator.
/// `Ok(None)` on a clean EOF before any byte.
fn read_line(r: &mut impl BufRead, limit: &mut usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*limit as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > *limit {
        return Err(bad("head too large"));
    }
    *limit -= n;
    if line.last() != Some(&b'\n') {
        return Err(bad("eof inside a line"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut limit = MAX_HEAD;
    let request_line = loop {
        match read_line(r, &mut limit)? {
            None => return Ok(None),
            Some(l) if l.is_empty() => continue, // RFC 9112 §2.2: ignore leading empty lines
            Some(l) => break l,
        }
    };
    let mut parts = request_line.splitn(3, |b| *b == b' ');
    let method = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let target = parts
        .next()
        .ok_or_else(|| bad("no request-target"))?
        .to_vec();
    let _version = parts.next().ok_or_else(|| bad("no version"))?;
    let mut headers = Vec::new();
    let mut raw_headers = Vec::new();
    loop {
        let line = read_line(r, &mut limit)?.ok_or_else(|| bad("eof in head"))?;
        if line.is_empty() {
            break;
        }
        if !raw_headers.is_empty() {
            raw_headers.extend_from_slice(b"\r\n");
        }
        raw_headers.extend_from_slice(&line);
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| bad("header without colon"))?;
        let name = String::from_utf8_lossy(&line[..colon]).into_owned();
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim()
            .to_string();
        headers.push((name, value));
    }
    Ok(Some(Head {
        method,
        target,
        headers,
        raw_headers,
    }))
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut limit = 4096;
        let line = read_line(r, &mut limit)?.ok_or_else(|| bad("eof in chunk size"))?;
        let size_txt = String::from_utf8_lossy(&line);
        let size_txt = size_txt.split(';').next().unwrap_or("").trim().to_string();
        let size = usize::from_str_radix(&size_txt, 16)
            .map_err(|_| bad(format!("bad chunk size {size_txt:?}")))?;
        if size == 0 {
            // trailer section
            loop {
                let mut limit = MAX_HEAD;
                let t = read_line(r, &mut limit)?.ok_or_else(|| bad("eof in trailers"))?;
                if t.is_empty() {
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
            return Err(bad("chunk not followed by CRLF"));
        }
    }
}

/// A connection the app serves: TCP, a unix socket, or TLS over TCP.
pub trait Conn: Read + Write + Send + 'static {
    /// True when the peer has closed (or reset) the connection.
    fn peer_closed(&self) -> bool;
    fn shutdown_write(&mut self);
}

impl Conn for TcpStream {
    fn peer_closed(&self) -> bool {
        peer_closed(
            self.set_nonblocking(true).is_err(),
            |b| self.peek(b),
            || {
                let _ = self.set_nonblocking(false);
            },
        )
    }
    fn shutdown_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Conn for UnixStream {
    fn peer_closed(&self) -> bool {
        // No peek on std's UnixStream: a closed unix peer is seen by the
        // next read instead.
        false
    }
    fn shutdown_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Conn for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn peer_closed(&self) -> bool {
        self.sock.peer_closed()
    }
    fn shutdown_write(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        self.sock.shutdown_write();
    }
}

fn serve_connection(mut stream: impl Conn, st: &State) -> io::Result<()> {
    // Reads go through the buffer; writes to the stream beneath it.
    let _ = stream.flush();
    #[allow(unused_mut)]
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        if head
            .get("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            let writer = reader.get_mut();
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        let chunked = head.get("transfer-encoding").is_some_and(|v| {
            v.to_ascii_lowercase()
                .split(',')
                .any(|t| t.trim() == "chunked")
        });
        let body = if chunked {
            read_chunked(&mut reader)?
        } else {
            let len: usize = match head.get("content-length") {
                Some(v) => v
                    .parse()
                    .map_err(|_| bad(format!("bad content-length {v:?}")))?,
                None => 0,
            };
            let mut b = vec![0u8; len];
            reader.read_exact(&mut b)?;
            b
        };
        let body_sha = sha256_hex(&body);
        let recorded = RecordedRequest {
            method: head.method.clone(),
            target: head.target.clone(),
            headers: head.headers.clone(),
            raw_headers: head.raw_headers.clone(),
            body_len: body.len(),
            body_sha256: body_sha.clone(),
            chunked,
        };
        let echo_len = body.len();
        let body = match &st.say {
            Some(say) => say(&recorded),
            None => body,
        };
        st.shared.lock().unwrap().log.push(recorded);

        if let Some(name) = head.get("x-test-hold") {
            if !hold(st, name, reader.get_ref()) {
                return Ok(()); // connection died while held
            }
        }

        let close = head.get("connection").is_some_and(|v| {
            v.to_ascii_lowercase()
                .split(',')
                .any(|t| t.trim() == "close")
        });
        let response = build_response(&head, body, echo_len, &body_sha, close)?;
        let writer = reader.get_mut();
        writer.write_all(&response)?;
        writer.flush()?;
        if close {
            writer.shutdown_write();
            return Ok(());
        }
    }
}

/// Records that `name` arrived, then waits for [`App::release`]. Returns
/// false if the peer closed the connection meanwhile.
fn hold(st: &State, name: &str, conn: &impl Conn) -> bool {
    let mut g = st.shared.lock().unwrap();
    g.arrived.insert(name.to_string());
    st.changed.notify_all();
    let deadline = Instant::now() + MAX_HOLD;
    while !g.released.contains(name) {
        if Instant::now() >= deadline {
            return false;
        }
        if conn.peer_closed() {
            g.abandoned.insert(name.to_string());
            st.changed.notify_all();
            return false;
        }
        // Wakes on release; the 100 ms bound is only there to look at the socket.
        g = st
            .changed
            .wait_timeout(g, Duration::from_millis(100))
            .unwrap()
            .0;
    }
    true
}

/// True when the peer has closed (or reset) the connection: a
/// non-blocking peek (`failed`: it could not be made non-blocking).
fn peer_closed(
    failed: bool,
    peek: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    restore: impl FnOnce(),
) -> bool {
    if failed {
        return true;
    }
    let mut b = [0u8; 1];
    let r = peek(&mut b);
    restore();
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

pub fn reason_for(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        414 => "URI Too Long",
        418 => "I'm a teapot",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// The response to `head`: `body` (the echo, or what the app says) unless
/// `X-Test-Body-Len` asks for another; `echo_len` and `echo_sha` describe
/// the request's body.
fn build_response(
    head: &Head,
    body: Vec<u8>,
    echo_len: usize,
    echo_sha: &str,
    close: bool,
) -> io::Result<Vec<u8>> {
    let status: u16 = match head.get("x-test-status") {
        Some(v) => v
            .parse()
            .map_err(|_| bad(format!("bad X-Test-Status {v:?}")))?,
        None => 200,
    };
    let reason = head
        .get("x-test-reason")
        .map(str::to_string)
        .unwrap_or_else(|| reason_for(status).to_string());
    let body = match head.get("x-test-body-len") {
        Some(v) => pattern_body(
            v.parse()
                .map_err(|_| bad(format!("bad X-Test-Body-Len {v:?}")))?,
        ),
        None => body,
    };
    let chunked = head.get("x-test-chunked") == Some("1");
    let no_body_status = status == 204 || status == 304;
    let is_head = head.method == "HEAD";

    let mut out = Vec::with_capacity(body.len() + 1024);
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    let mut h = |name: &str, value: &str| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    h("X-Echo-Method", &head.method);
    h("X-Echo-Target", &hex::encode(&head.target));
    h("X-Echo-Headers", &hex::encode(&head.raw_headers));
    h("X-Echo-Body-Len", &echo_len.to_string());
    h("X-Echo-Body-Sha256", echo_sha);
    if let Some(n) = head.get("x-test-set-cookies") {
        let n: usize = n.parse().map_err(|_| bad("bad X-Test-Set-Cookies"))?;
        for i in 0..n {
            h("Set-Cookie", &format!("c{i}=v{i}; Path=/"));
        }
        h("X-Dup", "first");
        h("X-Dup", "second");
        h("X-Dup", "third");
    }
    if close {
        h("Connection", "close");
    }
    if no_body_status {
        // RFC 9110 §15.3.5 / §15.4.5: no content, no framing needed.
    } else if chunked {
        h("Transfer-Encoding", "chunked");
    } else {
        h("Content-Length", &body.len().to_string());
    }
    out.extend_from_slice(b"\r\n");
    if no_body_status || is_head {
        return Ok(out);
    }
    if chunked {
        // Uneven chunk sizes, so a proxy that re-chunks or passes through is exercised.
        let sizes = [1usize, 7, 4096, 8191, 65_536, 100_000];
        let mut pos = 0;
        let mut k = 0;
        while pos < body.len() {
            let n = sizes[k % sizes.len()].min(body.len() - pos);
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&body[pos..pos + n]);
            out.extend_from_slice(b"\r\n");
            pos += n;
            k += 1;
        }
        out.extend_from_slice(b"0\r\n\r\n");
    } else {
        out.extend_from_slice(&body);
    }
    Ok(out)
}
