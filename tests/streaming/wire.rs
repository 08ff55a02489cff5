//! Client-side pieces of the streaming tests: an HTTP/1.1 connection whose
//! response body is read **incrementally** (Content-Length, chunked or
//! until close — EOF before the framing says "done" is an error the test
//! can see), a deterministic body source that costs no per-byte work, and
//! RSS sampling of a child process from `/proc/<pid>/status`.

use sha2::{Digest, Sha256};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

/// Hang guard on every client read and write.
pub const IO_WAIT: Duration = Duration::from_secs(60);

/// Size of one generated block (and of the tests' reads and writes).
pub const BLOCK: usize = 1 << 20;

// ------------------------------------------------------------ body source

/// 1 MiB of xorshift bytes, made once per process.
fn base_block() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut v = Vec::with_capacity(BLOCK);
        while v.len() < BLOCK {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    })
}

/// A deterministic body of `len` bytes produced block by block: block `k`
/// is the base block with its first 8 bytes replaced by `k ^ seed`, so a
/// lost, repeated or reordered block changes the hash, and producing a
/// block costs an 8-byte write (no per-byte work, nothing held but 1 MiB).
pub struct Source {
    seed: u64,
    left: u64,
    k: u64,
    buf: Vec<u8>,
}

impl Source {
    pub fn new(seed: u64, len: u64) -> Source {
        Source {
            seed,
            left: len,
            k: 0,
            buf: base_block().to_vec(),
        }
    }

    /// The next block (the last may be short); `None` at the end.
    pub fn next_block(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        let n = (self.left as usize).min(BLOCK);
        let stamp = (self.k ^ self.seed).to_le_bytes();
        self.buf[..8].copy_from_slice(&stamp);
        self.k += 1;
        self.left -= n as u64;
        Some(&self.buf[..n])
    }
}

/// SHA-256 (hex) of `Source::new(seed, len)`.
pub fn source_sha256(seed: u64, len: u64) -> String {
    let mut s = Source::new(seed, len);
    let mut h = Sha256::new();
    while let Some(b) = s.next_block() {
        h.update(b);
    }
    hex::encode(h.finalize())
}

// ------------------------------------------------------------ client

pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.by_ref().take(64 * 1024).read_until(b'\n', &mut line)?;
    if n == 0 || line.last() != Some(&b'\n') {
        return Err(eof("connection closed inside a line"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| bad("non-UTF-8 line"))
}

/// How the body in progress is framed.
enum Framing {
    Length(u64),
    /// `left` bytes of the current chunk (0: a size line comes next).
    Chunked {
        left: u64,
        first: bool,
    },
    Close,
    Done,
}

/// A client connection reading one response at a time, its body as it comes.
pub struct HttpConn {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
    framing: Framing,
}

impl HttpConn {
    pub fn connect(addr: SocketAddr) -> HttpConn {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.set_read_timeout(Some(IO_WAIT)).unwrap();
        s.set_write_timeout(Some(IO_WAIT)).unwrap();
        let _ = s.set_nodelay(true);
        HttpConn {
            writer: s.try_clone().unwrap(),
            reader: BufReader::with_capacity(BLOCK, s),
            framing: Framing::Done,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Writes `data` as one chunk of a chunked body (`0`-length: the end).
    pub fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        self.write(format!("{:x}\r\n", data.len()).as_bytes())?;
        self.write(data)?;
        self.write(b"\r\n")
    }

    /// Writes a request head (`Host` added).
    pub fn send_head(&mut self, method: &str, target: &str, headers: &[(&str, &str)]) {
        let mut h = format!("{method} {target} HTTP/1.1\r\nHost: test.local\r\n");
        for (n, v) in headers {
            h += &format!("{n}: {v}\r\n");
        }
        h += "\r\n";
        self.write(h.as_bytes())
            .unwrap_or_else(|e| panic!("write {method} {target}: {e}"));
    }

    /// Reads the next final response head and prepares its body.
    pub fn read_head(&mut self, method: &str) -> io::Result<Head> {
        loop {
            let line = read_line(&mut self.reader)?;
            let mut parts = line.splitn(3, ' ');
            let _v = parts.next();
            let status: u16 = parts
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
            let mut headers = Vec::new();
            loop {
                let l = read_line(&mut self.reader)?;
                if l.is_empty() {
                    break;
                }
                let (n, v) = l
                    .split_once(':')
                    .ok_or_else(|| bad(format!("bad header {l:?}")))?;
                headers.push((n.to_string(), v.trim().to_string()));
            }
            if (100..200).contains(&status) {
                continue;
            }
            let head = Head { status, headers };
            let chunked = head
                .header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
            self.framing = if method == "HEAD" || status == 204 || status == 304 {
                Framing::Done
            } else if chunked {
                Framing::Chunked {
                    left: 0,
                    first: true,
                }
            } else if let Some(n) = head.header("content-length") {
                Framing::Length(n.parse().map_err(|_| bad("bad Content-Length"))?)
            } else {
                Framing::Close
            };
            return Ok(head);
        }
    }

    /// Reads body bytes into `buf`: `Ok(0)` once the body is complete;
    /// `Err(UnexpectedEof)` if the connection ends before its framing does.
    pub fn read_body(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.framing {
                Framing::Done => return Ok(0),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Ok(0);
                }
                Framing::Length(left) => {
                    let want = (*left).min(buf.len() as u64) as usize;
                    let n = self.reader.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(eof("EOF before Content-Length was reached"));
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
                Framing::Close => {
                    let n = self.reader.read(buf)?;
                    if n == 0 {
                        self.framing = Framing::Done;
                    }
                    return Ok(n);
                }
                Framing::Chunked { left, first } if *left == 0 => {
                    if !*first {
                        let l = read_line(&mut self.reader)
                            .map_err(|_| eof("EOF after chunk data (no final chunk)"))?;
                        if !l.is_empty() {
                            return Err(bad("chunk data not followed by CRLF"));
                        }
                    }
                    *first = false;
                    let line = read_line(&mut self.reader)
                        .map_err(|_| eof("EOF before the final chunk `0\\r\\n\\r\\n`"))?;
                    let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
                    if size == 0 {
                        loop {
                            if read_line(&mut self.reader)
                                .map_err(|_| eof("EOF inside the trailer section"))?
                                .is_empty()
                            {
                                break;
                            }
                        }
                        self.framing = Framing::Done;
                        return Ok(0);
                    }
                    *left = size;
                }
                Framing::Chunked { left, .. } => {
                    let want = (*left).min(buf.len() as u64) as usize;
                    let n = self.reader.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(eof("EOF inside chunk data"));
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
            }
        }
    }

    /// Reads the rest of the body, hashing it: (length, SHA-256 hex).
    pub fn hash_body(&mut self) -> io::Result<(u64, String)> {
        let mut buf = vec![0u8; BLOCK];
        let mut h = Sha256::new();
        let mut total = 0u64;
        loop {
            let n = self.read_body(&mut buf)?;
            if n == 0 {
                return Ok((total, hex::encode(h.finalize())));
            }
            h.update(&buf[..n]);
            total += n as u64;
        }
    }

    /// Reads the rest of the body into memory (small bodies only).
    pub fn body_bytes(&mut self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.read_body(&mut buf)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }
}

// ------------------------------------------------------------ memory

/// `VmRSS` or `VmHWM` of `pid`, in bytes.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Samples the RSS of some processes in a thread until stopped. Sampling
/// is measurement, not synchronisation: nothing waits on it.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<u64>>>,
    pids: Vec<u32>,
}

/// What a process used during a transfer.
#[derive(Debug, Clone, Copy)]
pub struct MemUse {
    pub max_sampled_rss: u64,
    pub hwm: u64,
    pub samples: usize,
}

impl RssSampler {
    pub fn start(pids: &[u32]) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let ps = pids.to_vec();
        let handle = thread::spawn(move || {
            let mut max = vec![0u64; ps.len() + 1];
            let mut samples = 0u64;
            while !st.load(Ordering::Relaxed) {
                for (i, p) in ps.iter().enumerate() {
                    if let Some(r) = proc_status_kib(*p, "VmRSS") {
                        max[i] = max[i].max(r);
                    }
                }
                samples += 1;
                thread::sleep(Duration::from_millis(10));
            }
            max[ps.len()] = samples;
            max
        });
        RssSampler {
            stop,
            handle: Some(handle),
            pids: pids.to_vec(),
        }
    }

    /// Stops sampling; per pid: highest sampled VmRSS and VmHWM now.
    pub fn finish(mut self) -> Vec<MemUse> {
        self.stop.store(true, Ordering::Relaxed);
        let max = self.handle.take().unwrap().join().unwrap();
        let samples = max[self.pids.len()] as usize;
        self.pids
            .iter()
            .enumerate()
            .map(|(i, p)| MemUse {
                max_sampled_rss: max[i],
                hwm: proc_status_kib(*p, "VmHWM")
                    .unwrap_or_else(|| panic!("expected /proc/{p}/status to have VmHWM")),
                samples,
            })
            .collect()
    }
}

pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}
