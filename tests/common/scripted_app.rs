//! An app whose every byte on the wire the test writes, request by request,
//! and which numbers its connections: for what the receiver must do when an
//! app misbehaves (bytes after its response, unsolicited 1xx, answers before
//! the body, odd `Connection` fields). `std::net`, one thread per
//! connection, Content-Length bodies only.
//!
//! Each request head is reported on a channel ([`ScriptedApp::next_request`])
//! before the test's script gets the [`Exchange`] to answer on; the body is
//! read when the script asks ([`Exchange::read_body`]) or after it returns.
//! Scripts synchronise with the test through channels of their own, never
//! through time.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Hang guard on anything the test or a script waits for.
pub const WAIT: Duration = Duration::from_secs(30);

/// One request head as the app received it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Which accepted connection it came on, from 1.
    pub conn: usize,
    pub method: String,
    pub target: String,
    /// Field lines in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request being answered: the script writes raw bytes.
pub struct Exchange<'a> {
    pub req: &'a Seen,
    reader: &'a mut BufReader<TcpStream>,
    body_left: usize,
}

impl Exchange<'_> {
    /// Writes `bytes` as they are; false if the receiver has gone (a
    /// script writing late bytes expects that when they are refused).
    pub fn write(&mut self, bytes: &[u8]) -> bool {
        let s = self.reader.get_mut();
        s.write_all(bytes).and_then(|()| s.flush()).is_ok()
    }

    /// Closes the connection both ways (the app hangs up).
    pub fn close(&mut self) {
        let _ = self.reader.get_ref().shutdown(std::net::Shutdown::Both);
    }

    /// Whether the whole request body is already here, read with its
    /// head (it came in the same write, or right after).
    #[allow(dead_code)]
    pub fn body_came_with_head(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int, the bytes waiting on the socket.
        let rc = unsafe {
            libc::ioctl(
                self.reader.get_ref().as_raw_fd(),
                libc::FIONREAD,
                &mut queued,
            )
        };
        assert_eq!(rc, 0, "FIONREAD");
        self.reader.buffer().len() + queued as usize >= self.body_left
    }

    /// Reads (and discards) what is left of the request body.
    pub fn read_body(&mut self) -> io::Result<()> {
        let n = std::mem::take(&mut self.body_left);
        let got = io::copy(&mut self.reader.by_ref().take(n as u64), &mut io::sink())?;
        if got as usize == n {
            Ok(())
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        }
    }
}

type Script = dyn Fn(&mut Exchange) + Send + Sync;

pub struct ScriptedApp {
    pub addr: SocketAddr,
    seen: Receiver<Seen>,
    accepted: Arc<AtomicUsize>,
}

impl ScriptedApp {
    pub fn start(script: impl Fn(&mut Exchange) + Send + Sync + 'static) -> ScriptedApp {
        // A backlog of 1,024 (std's is 128): a test may have the receiver
        // dial hundreds of connections at once, and SYNs dropped by a full
        // queue come back only after the kernel's 1 s retry.
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("scripted app: socket");
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("scripted app: bind 127.0.0.1:0");
        sock.listen(1024).expect("scripted app: listen");
        let listener: TcpListener = sock.into();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let script: Arc<Script> = Arc::new(script);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let conn = count.fetch_add(1, Ordering::SeqCst) + 1;
                let (tx, script) = (tx.clone(), script.clone());
                thread::spawn(move || serve(conn, stream, &tx, &*script));
            }
        });
        ScriptedApp {
            addr,
            seen,
            accepted,
        }
    }

    /// The next request head the app received (in arrival order).
    pub fn next_request(&self) -> Seen {
        self.seen
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("scripted app: expected a request within {WAIT:?}"))
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve(conn: usize, stream: TcpStream, seen: &Sender<Seen>, script: &Script) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut reader = BufReader::new(stream);
    while let Some((req, body_len)) = read_head(conn, &mut reader) {
        let _ = seen.send(req.clone());
        let mut x = Exchange {
            req: &req,
            reader: &mut reader,
            body_left: body_len,
        };
        script(&mut x);
        if x.read_body().is_err() {
            return;
        }
    }
}

/// A request head, or `None` at EOF or on anything this app does not speak.
fn read_head(conn: usize, r: &mut BufReader<TcpStream>) -> Option<(Seen, usize)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':')?;
        headers.push((n.to_string(), v.trim().to_string()));
    }
    let seen = Seen {
        conn,
        method,
        target,
        headers,
    };
    if seen.header("transfer-encoding").is_some() {
        return None; // not needed by its tests: close rather than guess
    }
    let len = seen
        .header("content-length")
        .map_or(Some(0), |v| v.parse().ok())?;
    Some((seen, len))
}
