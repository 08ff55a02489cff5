//! `anp-bench-app`: the small, fast HTTP/1.1 origin that `make bench` puts
//! behind every target (direct, nginx, anp-proxy), so that what differs
//! between the runs is only the proxy in between.
//!
//! Answers any request whose path is `/bytes/N` or carries `?size=N` with an
//! N-byte body (`Content-Length`, keep-alive); any other path gets 2 bytes.
//! A request body (Content-Length only) is read and thrown away. One monoio
//! runtime per thread, each with its own `SO_REUSEPORT` listener on the same
//! port, so the kernel spreads connections over cores with no shared state.
//!
//! Must never: allocate a body per response (bodies are slices of one
//! shared buffer), or be slower than the proxies it is compared against.
//!
//! Usage: `anp-bench-app [--port 0] [--threads N]`; prints
//! `anp-bench-app listening on http://127.0.0.1:PORT` once bound.

use std::io::Write as _;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

/// Largest body served; larger sizes are clamped (a bench never needs more).
const MAX_BODY: usize = 16 << 20;
/// Below this the head and body go out in one write (one syscall); above it
/// the body is written from the shared buffer without a copy.
const COALESCE_LIMIT: usize = 64 * 1024;
/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

fn main() {
    let mut port: u16 = 0;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--port" => port = v.parse().expect("--port takes a number"),
            "--threads" => threads = v.parse().expect("--threads takes a number"),
            _ => {
                eprintln!("usage: anp-bench-app [--port 0] [--threads N]");
                std::process::exit(2);
            }
        }
    }
    let first = bind(SocketAddr::from(([127, 0, 0, 1], port))).expect("cannot bind");
    let addr = first.local_addr().expect("local_addr");
    let mut listeners = vec![first];
    for _ in 1..threads.max(1) {
        listeners.push(bind(addr).expect("cannot bind a second SO_REUSEPORT listener"));
    }
    let body = Bytes::from(vec![b'x'; MAX_BODY]);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let body = body.clone();
            std::thread::Builder::new()
                .name(format!("bench-app-{i}"))
                .spawn(move || {
                    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .enable_timer()
                        .build()
                        .expect("cannot build runtime");
                    rt.block_on(serve(l, body));
                })
                .expect("spawn")
        })
        .collect();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "anp-bench-app listening on http://{addr}");
    let _ = out.flush();
    for h in handles {
        let _ = h.join();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

async fn serve(listener: std::net::TcpListener, body: Bytes) {
    let listener = TcpListener::from_std(listener).expect("from_std");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(conn(stream, body.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                eprintln!("anp-bench-app: accept: {e}");
                monoio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// What one parsed request head asks for.
struct Req {
    head_len: usize,
    body_len: usize,
    size: usize,
    close: bool,
    /// HTTP/1.0 kept alive: said in the response, or the client (`ab -k`)
    /// waits for a close.
    http10: bool,
}

fn parse(buf: &[u8]) -> Result<Option<Req>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let mut body_len = 0;
    let http10 = r.version == Some(0);
    let mut close = http10;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(()); // the bench clients never send chunked bodies
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = h.value.to_ascii_lowercase();
            close = v.windows(5).any(|w| w == b"close")
                || (http10 && !v.windows(10).any(|w| w == b"keep-alive"));
        }
    }
    let size = requested_size(r.path.unwrap_or("/")).min(MAX_BODY);
    Ok(Some(Req {
        head_len,
        body_len,
        size,
        close,
        http10,
    }))
}

/// `/bytes/N` or `…?size=N` (also `&size=N`); 2 otherwise.
fn requested_size(path: &str) -> usize {
    if let Some(rest) = path.strip_prefix("/bytes/") {
        let digits = rest.split(['?', '/']).next().unwrap_or("");
        return digits.parse().unwrap_or(2);
    }
    if let Some((_, q)) = path.split_once('?') {
        for kv in q.split('&') {
            if let Some(v) = kv.strip_prefix("size=") {
                return v.parse().unwrap_or(2);
            }
        }
    }
    2
}

async fn conn(mut s: TcpStream, body: Bytes) {
    let mut buf = BytesMut::with_capacity(8192);
    // Bytes of a request body still to be discarded.
    let mut skip = 0usize;
    loop {
        // Serve every complete request already buffered (pipelining works).
        loop {
            if skip > 0 {
                let n = skip.min(buf.len());
                let _ = buf.split_to(n);
                skip -= n;
                if skip > 0 {
                    break;
                }
            }
            let req = match parse(&buf) {
                Ok(Some(r)) => r,
                Ok(None) if buf.len() > MAX_HEAD => return,
                Ok(None) => break,
                Err(()) => {
                    let bad = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                    let _ = s.write_all(bad.to_vec()).await;
                    return;
                }
            };
            let _ = buf.split_to(req.head_len);
            skip = req.body_len;
            let mut head = Vec::with_capacity(128 + req.size.min(COALESCE_LIMIT));
            let _ = write!(
                head,
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n{}\r\n",
                req.size,
                match (req.close, req.http10) {
                    (true, _) => "connection: close\r\n",
                    (false, true) => "connection: keep-alive\r\n",
                    (false, false) => "",
                }
            );
            let ok = if req.size <= COALESCE_LIMIT {
                head.extend_from_slice(&body[..req.size]);
                s.write_all(head).await.0.is_ok()
            } else {
                s.write_all(head).await.0.is_ok()
                    && s.write_all(body.slice(..req.size)).await.0.is_ok()
            };
            if !ok || req.close {
                return;
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8192);
        }
        // Append after what is buffered: monoio reads a BytesMut at its start.
        let (res, b) = anp_proxy::net::read_append(&mut s, buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
