//! The streaming test app the receiver forwards to: `std::net`, one thread
//! per connection, keep-alive. Unlike tests/common/app.rs it never holds a
//! body: uploads are hashed as they are read, downloads are produced as
//! they are written, and event streams are written one event at a time in
//! lock-step with the test (event n+1 only after the test says it received
//! event n). What it saw is reported on a channel ([`AppEvent`]), so tests
//! wait on facts, never on time.
//!
//! | request | answer |
//! |---|---|
//! | `POST /alice/upload?id=I[&notify=N]` (Content-Length or chunked) | 200, `X-Upload-Len`, `X-Upload-Sha256`; `UploadProgress` once N body bytes were read; `UploadAborted` if the body ends early |
//! | `GET /alice/download?id=I&len=N&seed=S[&framing=chunked]` | N bytes of [`Source`]`(S, N)`; `DownloadDone` / `DownloadFailed` |
//! | `GET /alice/events?id=I&n=N&framing=chunked\|close\|length` | N fixed-size SSE events, each after the test's go-ahead through [`StreamApp::gate`] |
//! | `GET /alice/stall?id=I&framing=chunked\|length` | head and a first piece, then waits on the gate (`BodyStarted`) |
//! | `GET /alice/hold?id=I` | reports `Arrived`, waits on the gate before any head |

use super::wire::{Source, BLOCK};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Hang guard on anything the app waits for.
pub const APP_WAIT: Duration = Duration::from_secs(60);

/// Size of one event of `/alice/events`: `data: NNNNNN TTTTTTTTTTTTTTTTTTTT\n\n`.
pub const EVENT_LEN: usize = 6 + 6 + 1 + 20 + 2;

/// The process-wide origin of event timestamps (app and client share it).
pub fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppEvent {
    UploadProgress {
        id: String,
        read: u64,
    },
    UploadDone {
        id: String,
        read: u64,
    },
    /// The body ended (EOF or error) before its framing said it was complete.
    UploadAborted {
        id: String,
        read: u64,
        expected: Option<u64>,
        error: String,
    },
    DownloadDone {
        id: String,
        written: u64,
    },
    DownloadFailed {
        id: String,
        written: u64,
        error: String,
    },
    BodyStarted {
        id: String,
    },
    Arrived {
        id: String,
    },
    /// The gate was dropped or timed out before event `n`.
    EventsStopped {
        id: String,
        n: usize,
    },
}

type Gates = Arc<Mutex<HashMap<String, Receiver<()>>>>;

pub struct StreamApp {
    pub addr: SocketAddr,
    events: Receiver<AppEvent>,
    gates: Gates,
    /// Events read by [`StreamApp::wait`] that did not match, kept in order.
    backlog: Vec<AppEvent>,
}

impl StreamApp {
    pub fn start() -> StreamApp {
        let _ = epoch();
        let listener = TcpListener::bind("127.0.0.1:0").expect("stream app: bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (tx, events) = mpsc::channel();
        let gates: Gates = Arc::default();
        let g = gates.clone();
        thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                let (tx, g) = (tx.clone(), g.clone());
                thread::spawn(move || {
                    let _ = serve(s, &tx, &g);
                });
            }
        });
        StreamApp {
            addr,
            events,
            gates,
            backlog: Vec::new(),
        }
    }

    /// A go-ahead channel for the request with `id`: each `send(())` lets
    /// it take one more step; dropping the sender stops it.
    pub fn gate(&self, id: &str) -> Sender<()> {
        let (tx, rx) = mpsc::channel();
        self.gates.lock().unwrap().insert(id.to_string(), rx);
        tx
    }

    /// Waits (hang guard `within`) for the first event matching `pred`;
    /// others are kept for later waits.
    pub fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        mut pred: impl FnMut(&AppEvent) -> bool,
    ) -> AppEvent {
        if let Some(i) = self.backlog.iter().position(&mut pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if pred(&e) => return e,
                Ok(e) => self.backlog.push(e),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => panic!(
                    "stream app: expected {what} within {within:?}; saw only {:?}",
                    self.backlog
                ),
            }
        }
    }

    pub fn wait(&mut self, what: &str, pred: impl FnMut(&AppEvent) -> bool) -> AppEvent {
        self.wait_for(what, APP_WAIT, pred)
    }

    /// Events received so far without waiting (drains the channel).
    pub fn seen(&mut self) -> Vec<AppEvent> {
        while let Ok(e) = self.events.try_recv() {
            self.backlog.push(e);
        }
        self.backlog.clone()
    }
}

struct Req {
    path: String,
    query: HashMap<String, String>,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn q(&self, k: &str) -> &str {
        self.query.get(k).map(String::as_str).unwrap_or("")
    }
    fn qn(&self, k: &str) -> u64 {
        self.q(k).parse().unwrap_or(0)
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut l = Vec::new();
    if r.by_ref().take(64 * 1024).read_until(b'\n', &mut l)? == 0 {
        return Ok(None);
    }
    if l.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in line"));
    }
    while matches!(l.last(), Some(b'\n' | b'\r')) {
        l.pop();
    }
    Ok(Some(String::from_utf8_lossy(&l).into_owned()))
}

fn read_req(r: &mut impl BufRead) -> io::Result<Option<Req>> {
    let Some(first) = line(r)? else {
        return Ok(None);
    };
    let mut parts = first.split(' ');
    let _method = parts.next();
    let target = parts.next().ok_or_else(|| bad("no target"))?;
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let mut headers = Vec::new();
    loop {
        let l = line(r)?.ok_or_else(|| bad("eof in head"))?;
        if l.is_empty() {
            break;
        }
        let (n, v) = l
            .split_once(':')
            .ok_or_else(|| bad("header without colon"))?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Req {
        path: path.to_string(),
        query,
        headers,
    }))
}

fn serve(s: TcpStream, tx: &Sender<AppEvent>, gates: &Gates) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut w = s.try_clone()?;
    let mut r = BufReader::with_capacity(BLOCK, s);
    while let Some(req) = read_req(&mut r)? {
        let keep = match req.path.as_str() {
            "/alice/upload" => upload(&req, &mut r, &mut w, tx)?,
            "/alice/download" => download(&req, &mut w, tx)?,
            "/alice/events" => events(&req, &mut w, tx, gates)?,
            "/alice/stall" => stall(&req, &mut w, tx, gates)?,
            "/alice/hold" => hold(&req, &mut w, tx, gates)?,
            _ => {
                w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
                true
            }
        };
        if !keep {
            let _ = w.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
    Ok(())
}

fn take_gate(gates: &Gates, id: &str) -> Option<Receiver<()>> {
    gates.lock().unwrap().remove(id)
}

/// Reads the body incrementally, hashing it; reports how it ended.
fn upload(
    req: &Req,
    r: &mut BufReader<TcpStream>,
    w: &mut TcpStream,
    tx: &Sender<AppEvent>,
) -> io::Result<bool> {
    let id = req.q("id").to_string();
    let notify = req.qn("notify");
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let expected: Option<u64> = if chunked {
        None
    } else {
        Some(
            req.header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    };
    let mut h = Sha256::new();
    let mut read = 0u64;
    let mut notified = notify == 0;
    let mut buf = vec![0u8; BLOCK];
    let mut feed = |piece: &[u8], read: &mut u64| {
        h.update(piece);
        *read += piece.len() as u64;
        if !notified && *read >= notify {
            notified = true;
            let _ = tx.send(AppEvent::UploadProgress {
                id: id.clone(),
                read: *read,
            });
        }
    };
    let result: io::Result<()> = (|| {
        if let Some(total) = expected {
            while read < total {
                let want = ((total - read) as usize).min(buf.len());
                let n = r.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in body"));
                }
                feed(&buf[..n], &mut read);
            }
            return Ok(());
        }
        loop {
            let l = line(r)?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF at chunk size"))?;
            let size = u64::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("bad chunk size {l:?}")))?;
            if size == 0 {
                while !line(r)?.ok_or_else(|| bad("eof in trailers"))?.is_empty() {}
                return Ok(());
            }
            let mut left = size;
            while left > 0 {
                let want = (left as usize).min(buf.len());
                let n = r.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in chunk"));
                }
                feed(&buf[..n], &mut read);
                left -= n as u64;
            }
            if !line(r)?.ok_or_else(|| bad("eof after chunk"))?.is_empty() {
                return Err(bad("chunk not followed by CRLF"));
            }
        }
    })();
    if let Err(e) = result {
        let _ = tx.send(AppEvent::UploadAborted {
            id,
            read,
            expected,
            error: e.to_string(),
        });
        return Ok(false);
    }
    let _ = tx.send(AppEvent::UploadDone { id, read });
    let sha = hex::encode(h.finalize());
    let resp = format!(
        "HTTP/1.1 200 OK\r\nX-Upload-Len: {read}\r\nX-Upload-Sha256: {sha}\r\nContent-Length: 2\r\n\r\nok"
    );
    w.write_all(resp.as_bytes())?;
    Ok(true)
}

/// Produces the body as it is written.
fn download(req: &Req, w: &mut TcpStream, tx: &Sender<AppEvent>) -> io::Result<bool> {
    let id = req.q("id").to_string();
    let len = req.qn("len");
    let chunked = req.q("framing") == "chunked";
    let head = if chunked {
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
    } else {
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n")
    };
    let mut src = Source::new(req.qn("seed"), len);
    let mut written = 0u64;
    let result: io::Result<()> = (|| {
        w.write_all(head.as_bytes())?;
        while let Some(b) = src.next_block() {
            if chunked {
                w.write_all(format!("{:x}\r\n", b.len()).as_bytes())?;
            }
            w.write_all(b)?;
            if chunked {
                w.write_all(b"\r\n")?;
            }
            written += b.len() as u64;
        }
        if chunked {
            w.write_all(b"0\r\n\r\n")?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            let _ = tx.send(AppEvent::DownloadDone { id, written });
            Ok(true)
        }
        Err(e) => {
            let _ = tx.send(AppEvent::DownloadFailed {
                id,
                written,
                error: e.to_string(),
            });
            Ok(false)
        }
    }
}

/// One event: `data: {n:06} {nanos since epoch:020}\n\n`, stamped just
/// before it is written.
fn event_bytes(n: usize) -> Vec<u8> {
    let t = epoch().elapsed().as_nanos();
    let e = format!("data: {n:06} {t:020}\n\n");
    debug_assert_eq!(e.len(), EVENT_LEN);
    e.into_bytes()
}

/// Lock-step events: event 0 at once, event n+1 after the gate's n-th go-ahead.
fn events(req: &Req, w: &mut TcpStream, tx: &Sender<AppEvent>, gates: &Gates) -> io::Result<bool> {
    let id = req.q("id").to_string();
    let n = req.qn("n") as usize;
    let framing = req.q("framing").to_string();
    let Some(gate) = take_gate(gates, &id) else {
        w.write_all(b"HTTP/1.1 409 Conflict\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(true);
    };
    let mut head =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            .to_string();
    match framing.as_str() {
        "chunked" => head += "Transfer-Encoding: chunked\r\n",
        "length" => head += &format!("Content-Length: {}\r\n", n * EVENT_LEN),
        _ => head += "Connection: close\r\n",
    }
    head += "\r\n";
    w.write_all(head.as_bytes())?;
    for i in 0..n {
        if i > 0 && gate.recv_timeout(APP_WAIT).is_err() {
            let _ = tx.send(AppEvent::EventsStopped { id, n: i });
            return Ok(false);
        }
        let e = event_bytes(i);
        if framing == "chunked" {
            let mut c = format!("{:x}\r\n", e.len()).into_bytes();
            c.extend_from_slice(&e);
            c.extend_from_slice(b"\r\n");
            w.write_all(&c)?;
        } else {
            w.write_all(&e)?;
        }
    }
    match framing.as_str() {
        "chunked" => {
            w.write_all(b"0\r\n\r\n")?;
            Ok(true)
        }
        "length" => Ok(true),
        _ => Ok(false),
    }
}

/// Head and a first piece, then nothing until the gate opens (or drops).
fn stall(req: &Req, w: &mut TcpStream, tx: &Sender<AppEvent>, gates: &Gates) -> io::Result<bool> {
    let id = req.q("id").to_string();
    let gate = take_gate(gates, &id);
    let first = b"first piece of a body that will not end\n";
    if req.q("framing") == "length" {
        w.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                first.len() + 1000
            )
            .as_bytes(),
        )?;
        w.write_all(first)?;
    } else {
        w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        w.write_all(format!("{:x}\r\n", first.len()).as_bytes())?;
        w.write_all(first)?;
        w.write_all(b"\r\n")?;
    }
    let _ = tx.send(AppEvent::BodyStarted { id });
    if let Some(g) = gate {
        let _ = g.recv_timeout(APP_WAIT);
    }
    Ok(false)
}

/// Arrives, then waits before answering anything.
fn hold(req: &Req, w: &mut TcpStream, tx: &Sender<AppEvent>, gates: &Gates) -> io::Result<bool> {
    let id = req.q("id").to_string();
    let gate = take_gate(gates, &id);
    let _ = tx.send(AppEvent::Arrived { id });
    if let Some(g) = gate {
        if g.recv_timeout(APP_WAIT).is_err() {
            return Ok(false);
        }
    }
    w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nheld")?;
    Ok(true)
}
